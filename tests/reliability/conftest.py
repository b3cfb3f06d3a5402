"""Fixtures of the reliability tests: the service tests' synthetic model and MLflow registry."""

from __future__ import annotations

from tests.service.conftest import artifact_dir, pipeline, tracking

__all__ = ["artifact_dir", "pipeline", "tracking"]
