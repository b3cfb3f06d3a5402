"""Fixtures shared by every test package."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest


@pytest.fixture(scope="session")
def _empty_tracking_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An MLflow SQLite database with its schema created once (migrations take seconds).

    Tests copy it to get a fresh, real tracking store without paying for the migrations again.
    """
    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    mlflow.MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path
