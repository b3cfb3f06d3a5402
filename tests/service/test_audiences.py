"""Audiences end to end (``FindAudience``, ``affinity audience``): a real server with an event
store on SQLite and PostgreSQL, the two-cluster model of tests/service/conftest.py (users
u30-u59 use items i20-i39, category "b"), segments rows written as ``affinity segments`` would,
recorded audiences and their frequency cap, erasure, the CLI's files and MLflow run, fuzzing.
"""

from __future__ import annotations

import contextlib
import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import mlflow
import numpy as np
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import insert, select

from affinity.cli import main
from models.ranking import RankingPipeline
from protos.affinity.v1 import recommender_pb2 as pb
from protos.affinity.v1 import recommender_pb2_grpc as pb_grpc
from service.client import AffinityClient, AudienceMember
from service.events import AUDIENCE_MEMBERS, AUDIENCES, USER_SEGMENTS, EventStore, RawEvent
from service.loader import ModelHolder
from tests.service.conftest import (
    CLUSTER_ITEMS,
    N_USERS,
    client_for,
    loaded_model,
    running,
    settings_for,
    status_of,
)

TOKEN, ADMIN = "read-token", "admin-token"
CLUSTER_B = {f"u{u:02d}" for u in range(N_USERS // 2, N_USERS)}
NOW = datetime.now(UTC)


@dataclass
class Server:
    client: AffinityClient
    store: EventStore
    port: int

    def audience(self, **kwargs: Any) -> list[AudienceMember]:
        return list(self.client.find_audience(admin_token=ADMIN, **kwargs))


@contextlib.contextmanager
def serving(
    pipeline: RankingPipeline, artifact_dir: Path, tmp_path: Path, events_uri: str
) -> Iterator[Server]:
    holder = ModelHolder()
    holder.swap(loaded_model(pipeline))
    config = settings_for(artifact_dir, tmp_path, token=TOKEN, admin_token=ADMIN)
    store = EventStore.open(events_uri)
    try:
        with (
            running(config, holder, store=store) as port,
            client_for(port, token=TOKEN, timeout=30) as client,
        ):
            yield Server(client, store, port)
    finally:
        store.close()


@pytest.fixture
def server(
    pipeline: RankingPipeline, artifact_dir: Path, tmp_path: Path, events_db: str
) -> Iterator[Server]:
    with serving(pipeline, artifact_dir, tmp_path, events_db) as srv:
        yield srv


def expected_scores(pipeline: RankingPipeline, item_ids: list[str]) -> dict[str, float]:
    """Each user's mean ALS score over ``item_ids``, computed here from the factors."""
    users, items = pipeline.vocabularies()
    model: Any = pipeline.model
    idx = items.lookup(item_ids)
    scores = (model.user_factors @ model.item_factors[idx].T).mean(axis=1)
    return dict(zip(users.ids.tolist(), scores.tolist(), strict=True))


def add_segments(store: EventStore, rows: dict[str, tuple[str, str, datetime]]) -> None:
    """``user_segments`` rows as ``affinity segments`` writes them: user -> (stage, tier,
    last_seen)."""
    records = [
        {
            "user_id": user,
            "stage": stage,
            "stage_since": NOW - timedelta(days=40),
            "tier": tier,
            "recency_score": 3,
            "frequency_score": 3,
            "monetary_score": 3,
            "recency_days": (NOW - last_seen).days,
            "frequency": 1,
            "monetary": 10.0,
            "first_seen": NOW - timedelta(days=400),
            "last_seen": last_seen,
            "activated_at": None,
            "as_of": NOW,
            "computed_at": NOW,
        }
        for user, (stage, tier, last_seen) in rows.items()
    ]
    with store.engine.begin() as conn:
        conn.execute(insert(USER_SEGMENTS), records)


def users_of(members: list[AudienceMember]) -> list[str]:
    return [m.user_id for m in members]


# ----------------------------------------------------------------------- ranking


def test_an_audience_for_cluster_b_items_is_the_cluster_b_users_best_first(
    server: Server, pipeline: RankingPipeline
) -> None:
    items = ["i20", "i21", "i25"]
    members = server.audience(item_ids=items, max_users=N_USERS // 2)
    assert set(users_of(members)) == CLUSTER_B
    assert [m.rank for m in members] == list(range(1, 31))
    want = expected_scores(pipeline, items)
    best_first = sorted(want, key=lambda u: (-want[u], u))[:30]
    assert users_of(members) == best_first
    for member in members:
        assert member.score == pytest.approx(want[member.user_id], rel=1e-4, abs=1e-5)
    # A category is every available item of it: "b" is i20-i38 (i39 is unavailable).
    category = server.audience(category="b", max_users=N_USERS)
    want_b = expected_scores(pipeline, [f"i{i}" for i in range(CLUSTER_ITEMS, 39)])
    assert users_of(category) == sorted(want_b, key=lambda u: (-want_b[u], u))
    assert set(users_of(category)[:30]) == CLUSTER_B
    # The size cap keeps the best.
    assert users_of(server.audience(item_ids=items, max_users=5)) == best_first[:5]
    # One member per message (the default of the wire) or several: the same members.
    stub = pb_grpc.RecommenderStub(server.client._channel)
    metadata = (("authorization", f"Bearer {ADMIN}"),)
    for batch_size in (0, 1, 7):
        request = pb.FindAudienceRequest(item_ids=items, max_users=30, batch_size=batch_size)
        messages = list(stub.FindAudience(request, metadata=metadata, timeout=20))
        assert len(messages) == (5 if batch_size == 7 else 30)
        got = flattened(iter(messages))
        assert [(m.user_id, m.rank) for m in got] == [(m.user_id, m.rank) for m in members]


def test_stage_tier_and_last_seen_filters(server: Server) -> None:
    recent, old = NOW - timedelta(days=1), NOW - timedelta(days=100)
    add_segments(
        server.store,
        {f"u{u}": ("at_risk", "champions", recent if u < 35 else old) for u in range(30, 40)}
        | {f"u{u}": ("active", "loyal", old) for u in range(40, 50)}
        | {"u05": ("at_risk", "loyal", recent)},
    )
    at_risk = server.audience(category="b", stages=["at_risk"], max_users=100)
    assert set(users_of(at_risk)) == {f"u{u}" for u in range(30, 40)} | {"u05"}
    assert users_of(at_risk)[-1] == "u05"  # a cluster-a user scores lowest for "b"
    loyal = server.audience(category="b", tiers=["loyal"], max_users=100)
    assert set(users_of(loyal)) == {f"u{u}" for u in range(40, 50)} | {"u05"}
    both = server.audience(category="b", stages=["at_risk"], tiers=["loyal"], max_users=100)
    assert users_of(both) == ["u05"]
    # Seen within a week: by the segments' last_seen, or by an event in the store (u50 has no
    # segment row; u55's only recent event is an impression, which is not being seen).
    server.store.append(
        [
            RawEvent("e1", "u50", "i01", "click", NOW - timedelta(hours=2)),
            RawEvent("e2", "u55", "i01", "impression", NOW - timedelta(hours=2)),
            RawEvent("e3", "u56", "i01", "click", NOW - timedelta(days=9)),
        ]
    )
    seen = server.audience(category="b", last_seen_within_days=7, max_users=100)
    assert set(users_of(seen)) == {"u30", "u31", "u32", "u33", "u34", "u05", "u50"}
    assert server.audience(category="b", last_seen_within_days=0, max_users=100) == []


def test_exclude_interacted_leaves_out_the_models_and_the_stores_interactions(
    server: Server, pipeline: RankingPipeline
) -> None:
    users, items = pipeline.vocabularies()
    seen = pipeline.bundle.seen if pipeline.bundle is not None else None
    assert seen is not None
    had_i20 = {users.id(u) for u in seen[:, items.index("i20")].nonzero()[0]}
    assert had_i20 and had_i20 < CLUSTER_B  # hand check: only cluster-b users have i20
    fresh = sorted(CLUSTER_B - had_i20)[0]
    server.store.append([RawEvent("e-fresh", fresh, "i20", "purchase", NOW)])
    members = server.audience(item_ids=["i20"], exclude_interacted=True, max_users=N_USERS)
    assert set(users_of(members)) == {f"u{u:02d}" for u in range(N_USERS)} - had_i20 - {fresh}
    everyone = server.audience(item_ids=["i20"], max_users=N_USERS)
    assert len(everyone) == N_USERS


def test_recorded_audiences_and_the_frequency_cap(server: Server) -> None:
    capped = {"max_audiences_per_user": 1, "cap_window_days": 30.0, "max_users": 10}
    first = server.audience(category="b", record=True, name="spring-1", **capped)
    second = server.audience(category="b", record=True, name="spring-2", **capped)
    uncapped = server.audience(category="b", max_users=20)
    # The second takes the next ten: every user of the first is at the cap of one.
    assert users_of(first) == users_of(uncapped)[:10]
    assert users_of(second) == users_of(uncapped)[10:20]
    # A cap of two lets the first ten back in (each is in one audience); one keeps them out.
    again = server.audience(
        category="b", max_users=10, max_audiences_per_user=2, cap_window_days=30.0
    )
    assert users_of(again) == users_of(first)
    third = server.audience(category="b", **capped)
    assert not set(users_of(third)) & (set(users_of(first)) | set(users_of(second)))
    # Only recorded audiences count (the last two were not recorded).
    with server.store.engine.connect() as conn:
        audiences = conn.execute(select(AUDIENCES).order_by(AUDIENCES.c.id)).mappings().all()
        members = conn.execute(
            select(AUDIENCE_MEMBERS.c.audience_id, AUDIENCE_MEMBERS.c.user_id)
        ).all()
    assert [(a["name"], a["users"]) for a in audiences] == [("spring-1", 10), ("spring-2", 10)]
    definition = audiences[0]["definition"]
    assert definition["category"] == "b" and definition["max_audiences_per_user"] == 1
    assert definition["model"]["algorithm"] == "als" and definition["basis"] == "factors"
    by_audience = {a["id"]: a["name"] for a in audiences}
    stored = {(by_audience[a], u) for a, u in members}
    assert stored == {("spring-1", u) for u in users_of(first)} | {
        ("spring-2", u) for u in users_of(second)
    }


def test_delete_user_removes_memberships_and_the_user_never_returns(server: Server) -> None:
    recorded = server.audience(category="b", max_users=5, record=True, name="to-erase")
    top = recorded[0].user_id
    server.client.delete_user(top, admin_token=ADMIN)
    with server.store.engine.connect() as conn:
        left = set(conn.execute(select(AUDIENCE_MEMBERS.c.user_id)).scalars())
    assert left == set(users_of(recorded)) - {top}
    assert top not in users_of(server.audience(category="b", max_users=N_USERS))


# ------------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    ("request_fields", "field"),
    [
        ({"item_ids": ["i20", "nope"]}, "item_ids"),
        ({"category": "no-such-category"}, "category"),
        ({}, "category"),
        ({"item_ids": ["i20"], "category": "b"}, "item_ids"),
        ({"item_ids": ["i20"], "stages": ["sleeping"]}, "stages"),
        ({"item_ids": ["i20"], "tiers": ["Not A Tier"]}, "tiers"),
        ({"item_ids": ["i20"], "max_users": 0}, "max_users"),
        ({"item_ids": ["i20"], "max_users": 10_000_001}, "max_users"),
        ({"item_ids": ["i20"], "last_seen_within_days": -1.0}, "last_seen_within_days"),
        ({"item_ids": ["i20"], "last_seen_within_days": float("nan")}, "last_seen_within_days"),
        ({"item_ids": ["i20"], "max_audiences_per_user": -1}, "max_audiences_per_user"),
        ({"item_ids": ["i20"], "max_audiences_per_user": 1}, "cap_window_days"),
        ({"item_ids": ["i20"], "cap_window_days": -2.0}, "cap_window_days"),
        ({"item_ids": ["i20"], "record": True}, "name"),
    ],
)
def test_a_bad_request_is_invalid_argument_naming_the_field(
    pipeline: RankingPipeline,
    artifact_dir: Path,
    tmp_path: Path,
    request_fields: dict[str, Any],
    field: str,
) -> None:
    with serving(pipeline, artifact_dir, tmp_path, f"sqlite:///{tmp_path / 'e.db'}") as srv:
        fields_ = {"max_users": 10, **request_fields}
        with pytest.raises(grpc.RpcError) as info:
            srv.audience(**fields_)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    assert field in str(info.value.details())  # type: ignore[attr-defined]


def test_audiences_need_the_admin_token_and_an_event_store(
    pipeline: RankingPipeline, artifact_dir: Path, tmp_path: Path
) -> None:
    with serving(pipeline, artifact_dir, tmp_path, f"sqlite:///{tmp_path / 'e.db'}") as srv:
        client = srv.client
        assert (
            status_of(lambda: list(client.find_audience(category="b", admin_token=TOKEN)))
            == grpc.StatusCode.PERMISSION_DENIED
        )
        assert (
            status_of(lambda: list(client.find_audience(category="b", admin_token="wrong")))
            == grpc.StatusCode.UNAUTHENTICATED
        )
    holder = ModelHolder()
    holder.swap(loaded_model(pipeline))
    config = settings_for(artifact_dir, tmp_path / "nostore", admin_token=ADMIN)
    with running(config, holder) as port, client_for(port) as client:
        assert (
            status_of(lambda: list(client.find_audience(category="b", admin_token=ADMIN)))
            == grpc.StatusCode.UNAVAILABLE
        )


# --------------------------------------------------------------------------- CLI


def test_the_cli_writes_csv_and_parquet_and_logs_an_mlflow_run(
    server: Server, tracking: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["audience", "--target", f"127.0.0.1:{server.port}", "--token", TOKEN]
    admin = [*base, "--admin-token", ADMIN, "--tracking-uri", tracking]
    want = server.audience(category="b", max_users=12)
    out_csv = tmp_path / "out" / "b.csv"
    assert main([*admin, "--category", "b", "--max-users", "12", "--out", str(out_csv)]) == 0
    assert "12 users" in capsys.readouterr().out
    with out_csv.open() as handle:
        rows = list(csv.DictReader(handle))
    assert [r["user_id"] for r in rows] == users_of(want)
    assert [int(r["rank"]) for r in rows] == list(range(1, 13))
    assert [float(r["score"]) for r in rows] == pytest.approx([m.score for m in want])

    out_parquet = tmp_path / "b.parquet"
    args = ["--item", "i20", "i21", "--max-users", "7", "--record", "--name", "cli-b"]
    assert main([*admin, *args, "--out", str(out_parquet), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    table = pq.read_table(out_parquet).to_pydict()
    assert table["user_id"] == users_of(server.audience(item_ids=["i20", "i21"], max_users=7))
    assert table["rank"] == list(range(1, 8)) and summary["users"] == 7 and summary["recorded"]

    client = mlflow.MlflowClient(tracking_uri=tracking)
    run = client.get_run(summary["mlflow_run_id"])
    assert run.data.params["item_ids"] == '["i20", "i21"]'
    assert run.data.params["record"] == "True" and run.data.metrics["users"] == 7.0
    assert run.data.tags["affinity.audience"] == "cli-b"
    assert client.get_experiment(run.info.experiment_id).name == "affinity-audiences"
    logged = {a.path for a in client.list_artifacts(run.info.run_id, "audience")}
    assert logged == {"audience/definition.json", "audience/b.parquet"}
    with server.store.engine.connect() as conn:
        assert conn.execute(select(AUDIENCES.c.name)).scalars().all() == ["cli-b"]

    # Mistakes are one-line reasons, not tracebacks.
    assert main([*admin, "--category", "b", "--out", str(tmp_path / "b.xlsx")]) != 0
    assert ".csv or .parquet" in capsys.readouterr().err
    assert main([*base, "--category", "b", "--no-mlflow"]) != 0
    assert "admin-token" in capsys.readouterr().err
    assert main([*admin, "--item", "nope", "--no-mlflow"]) != 0
    assert "INVALID_ARGUMENT" in capsys.readouterr().err


# ------------------------------------------------------------------------- fuzz

names = st.one_of(
    st.sampled_from(["", "a", "b", "i20", "at_risk", "champions", "x" * 300]),
    st.text(st.characters(codec="utf-8"), max_size=20),
)
windows = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -0.0, 1.0, 30.0, 36_500.0, 36_501.0, 1e308]),
)
requests = st.builds(
    pb.FindAudienceRequest,
    item_ids=st.lists(st.one_of(st.sampled_from(["i20", "i01", "i39"]), names), max_size=6),
    category=names,
    stages=st.lists(st.one_of(st.sampled_from(["new", "at_risk", "churned"]), names), max_size=3),
    tiers=st.lists(names, max_size=3),
    last_seen_within_days=st.one_of(st.none(), windows),
    exclude_interacted=st.booleans(),
    max_users=st.one_of(st.integers(-(2**63), 2**63 - 1), st.integers(-2, 70)),
    max_audiences_per_user=st.one_of(st.integers(-(2**31), 2**31 - 1), st.integers(-1, 3)),
    cap_window_days=windows,
    record=st.booleans(),
    name=names,
    batch_size=st.one_of(st.integers(-(2**31), 2**31 - 1), st.integers(-1, 4)),
)


def flattened(messages: Iterator[pb.AudienceMember]) -> list[pb.AudienceMember]:
    return [member for message in messages for member in (message.batch or [message])]


def test_find_audience_fuzzed_never_answers_internal(server: Server) -> None:
    stub = pb_grpc.RecommenderStub(server.client._channel)
    metadata = (("authorization", f"Bearer {ADMIN}"),)

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
    @given(request=requests)
    def check(request: pb.FindAudienceRequest) -> None:
        try:
            members = flattened(stub.FindAudience(request, metadata=metadata, timeout=20))
        except grpc.RpcError as exc:
            code = exc.code()  # type: ignore[attr-defined]
            assert code in (grpc.StatusCode.INVALID_ARGUMENT,), exc.details()  # type: ignore[attr-defined]
            return
        assert [m.rank for m in members] == list(range(1, len(members) + 1))
        scores = np.array([m.score for m in members])
        assert np.all(np.diff(scores) <= 0)

    check()
    # Still answering afterwards.
    assert len(server.audience(category="b", max_users=3)) == 3


raw_bodies = st.one_of(
    st.binary(max_size=300),
    st.builds(
        lambda n, b: bytes([n << 3 | 2, len(b)]) + b, st.integers(1, 11), st.binary(max_size=50)
    ),
)


def test_find_audience_raw_bytes_are_never_internal(server: Server) -> None:
    call = server.client._channel.unary_stream("/affinity.v1.Recommender/FindAudience")
    metadata = (("authorization", f"Bearer {ADMIN}"),)

    @settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
    @given(body=raw_bodies)
    def check(body: bytes) -> None:
        try:
            list(call(body, metadata=metadata, timeout=20))
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT, exc.details()  # type: ignore[attr-defined]

    check()
    bad = bytes([2 << 3 | 2, 3]) + b"\xff\xfe "  # category: invalid UTF-8
    with pytest.raises(grpc.RpcError) as info:
        list(call(bad, metadata=metadata, timeout=10))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]


def test_audience_streams_are_counted_timed_and_limited_like_other_calls(server: Server) -> None:
    """The metrics and the in-flight limit wrap streaming calls too: each FindAudience is
    counted once with its final code, and its in-flight place is given back when it ends."""
    from prometheus_client import REGISTRY

    def count(code: str) -> float:
        sample = REGISTRY.get_sample_value(
            "affinity_requests_total", {"method": "FindAudience", "code": code}
        )
        return sample or 0.0

    ok, bad = count("OK"), count("INVALID_ARGUMENT")
    assert len(server.audience(item_ids=["i20"], max_users=5)) == 5
    with pytest.raises(grpc.RpcError):
        server.audience(item_ids=["no-such-item"], max_users=5)
    assert count("OK") == ok + 1 and count("INVALID_ARGUMENT") == bad + 1
    assert REGISTRY.get_sample_value("affinity_requests_in_flight") == 0.0
