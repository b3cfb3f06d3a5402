"""Shared helpers of the training tests."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest


@pytest.fixture
def store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, _empty_tracking_db: Path
) -> Iterator[str]:
    """A fresh MLflow tracking store (SQLite) for one test; the working directory is tmp_path,
    so ./mlruns lands there. Yields its URI, also set as ``MLFLOW_TRACKING_URI``."""
    shutil.copyfile(_empty_tracking_db, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    previous = mlflow.get_tracking_uri()
    yield uri
    mlflow.set_tracking_uri(previous)


def interaction_frame(rows: list[tuple[str, str, float]]) -> pd.DataFrame:
    """Interaction rows (user, item, weight), one view each in row order, as
    :func:`training.data.load_interactions` returns them."""
    users, items, weights = zip(*rows, strict=True)
    return pd.DataFrame(
        {
            "user_id": list(users),
            "item_id": list(items),
            "event": "view",
            "timestamp": np.arange(len(rows), dtype=np.int64),
            "value": 1.0,
            "weight": list(weights),
        }
    )
