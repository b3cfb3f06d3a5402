"""End to end: events in the store (and log files) -> `affinity train --events` -> MLflow run.

The store is filled through ``EventStore.append`` as ``LogEvents`` fills it, on SQLite and, with
``AFFINITY_TEST_POSTGRES_URI``, on PostgreSQL (skipped locally without it, a failure in CI). The
checks are what the issue asks: the store's training events are trained on, alone or with log
files, validated and quarantined as a log file is; impressions and dislikes are skipped and
counted; an erased user's rows at or before the erasure reach training from no input.
"""

from __future__ import annotations

import json
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from sqlalchemy.engine import make_url

from affinity.cli import main
from registry.mlflow_store import load_model_uri
from service.events import Event, EventRules, EventStore
from training.generate import generate

ALS = ["--algorithm", "als", "--param", "factors=8", "--param", "iterations=3"]


@pytest.fixture
def private_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The temporary folder of the run (the store's export, the pipeline's work folder)."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> pd.DataFrame:
    out = tmp_path_factory.mktemp("logs")
    generate(out, users=300, items=80, interactions=8_000, seed=5)
    frame = pd.read_parquet(out / "interactions.parquet")
    for name in ("user_id", "item_id", "event"):
        frame[name] = frame[name].astype(str)
    return frame


def as_events(frame: pd.DataFrame, prefix: str) -> list[Event]:
    return [
        Event(
            event_id=f"{prefix}{i}",
            user_id=row.user_id,
            item_id=row.item_id,
            event=row.event,
            timestamp=row.timestamp.to_pydatetime(),
            value=float(row.value),
        )
        for i, row in enumerate(frame.itertuples(index=False))
    ]


def train(capsys: pytest.CaptureFixture[str], *args: str) -> dict:
    capsys.readouterr()
    assert main(["train", *args, "--json", "--quiet"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def _download(uri: str) -> Path:
    return Path(mlflow.artifacts.download_artifacts(uri, dst_path=tempfile.mkdtemp(dir=Path.cwd())))


def test_train_on_the_store_and_logs_with_erasures(
    events_db: str,
    generated: pd.DataFrame,
    store: str,
    private_tmp: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Half the interactions in the store, half in a log file; the same users in both.
    in_store, in_log = generated.iloc[::2], generated.iloc[1::2]
    log = tmp_path / "log.csv"
    in_log.to_csv(log, index=False)
    users = generated["user_id"].value_counts().index
    returning, gone = str(users[0]), str(users[1])
    with EventStore.open(events_db) as store:
        store.append(as_events(in_store, "g"))
        store.append(
            [
                Event("imp1", "u-x", "i00001", "impression", shown_item_ids=("i00001", "i00002")),
                Event("imp2", "u-x", "i00003", "impression"),
                Event("dis1", "u-x", "i00004", "dislike"),
            ]
        )
        erased_at = datetime.now(UTC) - timedelta(seconds=30)
        for user in (returning, gone):
            store.delete_user(user, now=erased_at)
        # Late arrivals from before the erasure (dropped), and the returning user acting again.
        late = [
            Event("late1", gone, "i00001", "click", timestamp=erased_at - timedelta(days=1)),
            Event("late2", returning, "i00002", "view", timestamp=erased_at),
            Event(
                "back1",
                returning,
                "i00003",
                "purchase",
                timestamp=erased_at + timedelta(seconds=10),
            ),
        ]
        store.append(late)
        store_training = store.count() - 3
    erased_in_log = int(in_log["user_id"].isin([returning, gone]).sum())

    summary = train(capsys, "--events", events_db, "--interactions", str(log), *ALS)

    assert summary["events_store"] == {
        "uri": make_url(events_db).render_as_string(hide_password=True),
        "events": store_training + 3,
        "training_events": store_training,
        "skipped": {"dislike": 1, "impression": 2},
        "erased_users": 2,
    }
    read = store_training + len(in_log)
    erased = erased_in_log + 2  # late1 and late2 (at the erasure itself)
    assert summary["rows"] == {
        "read": read,
        "accepted": read - erased,
        "quarantined": 0,
        "erased": erased,
    }
    bundle = load_model_uri("models:/affinity@champion")
    assert gone not in bundle.users
    logged = json.loads(
        (_download(f"runs:/{summary['run_id']}/quarantine/summary.json")).read_text()
    )
    assert logged["erased"] == erased
    # The store's export and the work folder are gone.
    assert list(private_tmp.iterdir()) == []


def test_train_on_the_store_alone_quarantines_as_a_log(
    events_db: str,
    generated: pd.DataFrame,
    store: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # A configured extra event the training weights do not know is quarantined, as in a log.
    with EventStore.open(events_db, rules=EventRules(extra_events=frozenset({"bookmark"}))) as s:
        s.append(as_events(generated, "g"))
        s.append(
            [
                Event(
                    "b1", "u00001", "i00001", "bookmark", timestamp=datetime(2024, 1, 1, tzinfo=UTC)
                )
            ]
        )
    summary = train(capsys, "--events", events_db, *ALS)
    assert summary["rows"] == {
        "read": len(generated) + 1,
        "accepted": len(generated),
        "quarantined": 1,
        "erased": 0,
    }
    path = _download(f"runs:/{summary['run_id']}/quarantine/quarantine.csv")
    rejected = pd.read_csv(path, dtype=str, keep_default_na=False)
    assert rejected[["reason", "user_id", "event"]].values.tolist() == [
        ["unknown_event", "u00001", "bookmark"]
    ]
    # Given a weight, the same event trains.
    summary = train(capsys, "--events", events_db, "--event-weight", "bookmark=3", *ALS)
    assert summary["rows"]["accepted"] == len(generated) + 1


def test_train_needs_logs_or_the_store(
    tmp_path: Path, store: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["train", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "give --interactions" in err and "--events" in err
    # A store without a training event, and no logs: nothing to train on.
    uri = f"sqlite:///{tmp_path / 'events.db'}"
    with EventStore.open(uri) as store:
        store.append([Event("imp", "u1", "i1", "impression")])
    assert main(["train", "--events", uri, "--quiet"]) == 2
    assert "holds no training events" in capsys.readouterr().err


def test_train_events_defaults_to_the_configured_store(
    tmp_path: Path,
    generated: pd.DataFrame,
    store: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    uri = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    with EventStore.open(uri) as store:
        store.append(as_events(generated.iloc[:2_000], "g"))
    monkeypatch.setenv("AFFINITY_EVENTS_URI", uri)
    summary = train(capsys, "--events", "--algorithm", "popularity")
    assert summary["events_store"]["uri"] == uri
    assert summary["rows"]["read"] == 2_000
