"""Fixtures shared by every test package."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url


@pytest.fixture(scope="session")
def _empty_tracking_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An MLflow SQLite database with its schema created once (migrations take seconds).

    Tests copy it to get a fresh, real tracking store without paying for the migrations again.
    """
    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    mlflow.MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


POSTGRES_ENV = "AFFINITY_TEST_POSTGRES_URI"


@pytest.fixture(params=["sqlite", "postgresql"])
def events_db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty event-store database of each kind: a SQLite file, and a schema of its own
    in the PostgreSQL of ``AFFINITY_TEST_POSTGRES_URI`` (required when ``CI`` is set)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'store' / 'events.db'}"
        return
    base = os.environ.get(POSTGRES_ENV)
    if not base:
        message = (
            f"{POSTGRES_ENV} is not set: start PostgreSQL with "
            f'`export {POSTGRES_ENV}="$(bash scripts/postgres.sh)"`'
        )
        if os.environ.get("CI"):
            pytest.fail(f"CI must test the event store on PostgreSQL: {message}")
        pytest.skip(message)
    schema = f"events_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(base)
    try:
        with admin.begin() as conn:
            conn.execute(text(f'CREATE SCHEMA "{schema}"'))
        url = make_url(base).update_query_dict({"options": f"-csearch_path={schema}"})
        yield url.render_as_string(hide_password=False)
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
    finally:
        admin.dispose()
