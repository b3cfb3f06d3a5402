"""Event ingestion under faults (issue 16): small runs of the ``events-kill`` and ``events-fuzz``
campaigns of ``bench/reliability.py`` against a real 2-worker supervised server, and fast checks
of the campaigns' own bookkeeping (the ack ledger, the fuzz oracle, the outage phases).

The PostgreSQL outage itself (``events-pg-down``) stops the cluster, so it stays a campaign run by
hand; here only its fresh-database helper runs against ``AFFINITY_TEST_POSTGRES_URI``.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from sqlalchemy import create_engine, text

from bench.reliability import (
    TS_MAX,
    TS_MIN,
    _event_message,
    _phase_codes,
    campaign_events_fuzz,
    campaign_events_kill,
    expected_verdict,
    fresh_postgres,
    fuzz_cases,
    ingestion_check,
    main,
    pg_cluster_for,
    stored_event_ids,
)
from service.events import Event, EventStore

POSTGRES_ENV = "AFFINITY_TEST_POSTGRES_URI"
NOW = 1_800_000_000


def _record(out: Path, name: str) -> dict[str, Any]:
    record: dict[str, Any] = json.loads((out / f"{name}.json").read_text())
    return record


# --------------------------------------------------------------------------- live campaigns
@pytest.mark.slow
def test_sigkilled_workers_lose_no_acknowledged_event(tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert campaign_events_kill(
        tmp_path, out, kills=2, clients=2, batch=50, lead=1.5, gap=0.5, tail=1.5, max_seconds=60
    )
    record = _record(out, "events-kill")
    assert len(record["kills"]) == 2
    assert all(kill["replacement_listening_s"] is not None for kill in record["kills"])
    assert record["acknowledged_ids"] == record["acked_events"] > 0
    assert record["acknowledged_but_missing"] == 0
    assert record["stored_more_than_once"] == 0
    assert record["failed_batches"] == 0
    assert record["worker_restarts"] == 2


@pytest.mark.slow
def test_fuzzed_log_events_never_fail_internally_nor_store_a_rejected_event(
    tmp_path: Path,
) -> None:
    out = tmp_path / "out"
    assert campaign_events_fuzz(tmp_path, out, requests=250, max_events=20)
    record = _record(out, "events-fuzz")
    assert record["requests"] == 250
    assert set(record["codes"]) <= {"OK", "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED"}
    assert record["violations"] == {}
    assert record["event_outcomes"]["accepted"] > 0
    assert record["event_outcomes"]["rejected"] > 0
    assert record["rejected_ids_stored"] == 0
    assert record["stored_rows"] == record["distinct_accepted_ids"]
    assert record["workers_unchanged"]


# --------------------------------------------------------------------------- bookkeeping
def test_ingestion_check_finds_missing_and_repeated_ids() -> None:
    stored = Counter({"a": 1, "b": 2, "extra": 1})
    check = ingestion_check({"a", "b", "c"}, stored)
    assert check["acknowledged_but_missing"] == 1 and check["examples_missing"] == ["c"]
    assert check["stored_more_than_once"] == 1 and check["examples_repeated"] == ["b"]
    assert check["stored_without_an_ack"] == 1
    assert check["stored_rows"] == 4


def _fields(**changes: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "event_id": "e1",
        "user_id": "u1",
        "item_id": "i1",
        "event": "click",
        "timestamp": None,
        "value": None,
        "price": None,
        "recommendation_id": "",
        "shown_item_ids": [],
    }
    fields.update(changes)
    return fields


@pytest.mark.parametrize(
    ("changes", "verdict"),
    [
        ({}, "accept"),
        ({"event": " Impression\t", "shown_item_ids": ["i1", "i2"]}, "accept"),
        ({"event_id": " "}, "reject"),
        ({"event_id": "x" * 128}, "accept"),
        ({"event_id": "x" * 129}, "reject"),
        ({"user_id": "a\x00b"}, "reject"),
        ({"recommendation_id": "\t"}, "reject"),
        ({"event": "clicks"}, "reject"),
        ({"value": float("nan")}, "reject"),
        ({"price": -1.0}, "reject"),
        ({"value": -0.0}, "accept"),
        ({"shown_item_ids": ["i1"]}, "reject"),
        ({"timestamp": (TS_MIN, 0)}, "accept"),
        ({"timestamp": (TS_MIN - 1, 0)}, "reject"),
        ({"timestamp": (TS_MAX, 0)}, "reject"),
        ({"timestamp": (NOW, -1)}, "reject"),
        ({"timestamp": (NOW, 1_000_000_000)}, "reject"),
        ({"timestamp": (NOW + 290, 0)}, "accept"),
        ({"timestamp": (NOW + 300, 0)}, "either"),
        ({"timestamp": (NOW + 302, 0)}, "reject"),
    ],
)
def test_the_fuzz_oracle_knows_the_documented_rules(changes: dict[str, Any], verdict: str) -> None:
    assert expected_verdict(_fields(**changes), NOW, NOW + 1) == verdict


@settings(max_examples=150, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(case=fuzz_cases(max_events=20, now=NOW))
def test_every_generated_case_is_a_message_protobuf_can_carry(case: tuple[str, Any]) -> None:
    kind, payload = case
    events = [payload[0]] if kind == "raw" else payload
    assert kind in ("events", "raw")
    assert 0 <= len(events) <= 21
    for fields in events:
        _event_message(fields).SerializeToString()


def test_outage_phases_split_calls_by_when_they_ran() -> None:
    calls = [
        (0.0, 1.0, "OK"),  # before the stop
        (1.5, 2.5, "UNAVAILABLE"),  # in flight while it stopped
        (3.0, 3.1, "UNAVAILABLE"),  # inside the outage
        (9.0, 11.0, "OK"),  # in flight while it started
        (12.0, 12.1, "OK"),  # after
    ]
    phases = _phase_codes(calls, (2.0, 2.8, 10.0, 11.5))
    assert phases["before"] == Counter({"OK": 1})
    assert phases["outage"] == Counter({"UNAVAILABLE": 1})
    assert phases["transition"] == Counter({"UNAVAILABLE": 1, "OK": 1})
    assert phases["after"] == Counter({"OK": 1})


def test_the_cluster_of_a_uri_is_found_by_its_port() -> None:
    listing = (
        "14 main 5433 online postgres /var/lib/postgresql/14/main /var/log/x.log\n"
        "15 main 5432 down postgres /var/lib/postgresql/15/main /var/log/y.log\n"
    )
    base = "postgresql+psycopg://u:p@127.0.0.1"
    assert pg_cluster_for(f"{base}:5432/db", listing) == ("15", "main")
    assert pg_cluster_for(f"{base}:5433/db", listing) == ("14", "main")
    assert pg_cluster_for(f"{base}/db", listing) == ("15", "main")  # the default port
    assert pg_cluster_for(f"{base}:6000/db", listing) is None
    assert pg_cluster_for("postgresql://u:p@db.example.com:5432/db", listing) is None


def test_events_pg_down_without_a_uri_says_why_it_did_not_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv(POSTGRES_ENV, raising=False)
    assert main(["events-pg-down", "--out", str(tmp_path)]) == 2
    assert "SKIP events-pg-down: no PostgreSQL URI" in capsys.readouterr().out
    assert not (tmp_path / "events-pg-down.json").exists()


def test_a_fresh_postgres_database_is_isolated_and_dropped() -> None:
    base = os.environ.get(POSTGRES_ENV)
    if not base:
        message = (
            f"{POSTGRES_ENV} is not set: start PostgreSQL with "
            f'`export {POSTGRES_ENV}="$(bash scripts/postgres.sh)"`'
        )
        if os.environ.get("CI"):
            pytest.fail(f"CI must test the event store on PostgreSQL: {message}")
        pytest.skip(message)
    with fresh_postgres(base) as (uri, where):
        with EventStore.open(uri) as store:
            assert store.count() == 0  # nothing from other runs
            store.append([Event("e1", "u1", "i1", "click"), Event("e2", "u1", "i2", "view")])
            store.append([Event("e1", "u1", "i1", "click")])
        assert stored_event_ids(uri) == Counter({"e1": 1, "e2": 1})
    kind, name = where.split()
    catalog = {"database": ("pg_database", "datname"), "schema": ("pg_namespace", "nspname")}
    table, column = catalog[kind]
    engine = create_engine(base)
    try:
        with engine.connect() as conn:
            query = text(f"SELECT count(*) FROM {table} WHERE {column} = :name")
            assert conn.execute(query, {"name": name}).scalar() == 0  # dropped
    finally:
        engine.dispose()
