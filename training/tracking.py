"""Where MLflow runs and registered models are stored.

``MLFLOW_TRACKING_URI`` is honoured as is (a server, a database, a file store). Unset, Affinity
uses the embedded default: a SQLite database ``mlflow.db`` in the working directory, with run
artifacts in ``./mlruns``. Open the UI on it with ``mlflow ui --backend-store-uri sqlite:///mlflow.db``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import mlflow

logger = logging.getLogger(__name__)

DEFAULT_DB = "mlflow.db"


def default_tracking_uri(workdir: Path | None = None) -> str:
    """The embedded store's URI: ``sqlite:///<workdir>/mlflow.db``."""
    base = (workdir or Path.cwd()).resolve()
    return f"sqlite:///{base / DEFAULT_DB}"


def configure_tracking() -> str:
    """Point MLflow at ``MLFLOW_TRACKING_URI`` or the embedded default; returns the URI used."""
    # Download progress bars would interleave with our own progress output.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    uri = os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()
    mlflow.set_tracking_uri(uri)
    logger.debug("MLflow tracking URI: %s", uri)
    return uri
