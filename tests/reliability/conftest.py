"""Fixtures of the reliability tests: the service tests' synthetic model and MLflow registry."""

from __future__ import annotations

from tests.service.conftest import _empty_tracking_db, artifact_dir, engine, tracking

__all__ = ["_empty_tracking_db", "artifact_dir", "engine", "tracking"]
