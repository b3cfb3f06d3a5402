"""Live experiments end to end: assignment, arms served by their own models, recording, admin.

A real MLflow registry holds two versions (``champion`` v1, ``challenger`` v2, trained on other
seeds so their lists differ); real servers on loopback ports follow the event store's running
experiment. Every answer names the arm, whose model answered it, and the recorded answer keeps
both; a user's arm holds across requests, servers, restarts, share changes that do not concern
them, and alias moves.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import REGISTRY

from affinity.cli import main
from models.artifact import save_artifact
from models.errors import InvalidInputError
from protos.affinity.v1 import recommender_pb2 as pb
from protos.affinity.v1 import recommender_pb2_grpc as pb_grpc
from service.client import AffinityClient
from service.config import ServeSettings
from service.events import EventStore, Response
from service.experiments import (
    BUCKETS,
    Arm,
    ExperimentBook,
    ExperimentError,
    bucket,
    bucket_with,
    keyed_hasher,
    parse_config,
    reallocate,
    salt_key,
)
from service.loader import ModelHolder, ModelLoader
from service.recorder import ResponseRecorder
from service.servicer import SHADOW
from tests.service.conftest import (
    MODEL_NAME,
    build_bundle,
    client_for,
    register,
    running,
    settings_for,
    status_of,
)

TOKEN, ADMIN = "read-token", "admin-token"
USERS = [f"u{u:02d}" for u in range(200)] + [f"new-{u}" for u in range(200)]


def _wait_for(predicate: Any, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


def config(name: str = "spring", **arms: float) -> Any:
    shares = arms or {"champion": 0.5, "challenger": 0.5}
    return parse_config(
        {"name": name, "arms": [{"name": a, "model": a, "share": s} for a, s in shares.items()]}
    )


# ----------------------------------------------------------------- assignment


def test_a_users_bucket_is_the_same_in_every_process_and_release() -> None:
    """Workers and hosts must agree, whatever their hash seed: keyed BLAKE2b, not hash()."""
    code = "from service.experiments import bucket; print(bucket('user-42', 'spring'))"
    outputs = {
        subprocess.run(
            [sys.executable, "-c", code],
            env={**os.environ, "PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        for seed in ("1", "2", "random")
    }
    assert outputs == {str(bucket("user-42", "spring"))}
    # Pinned: a change to the hash would move every running experiment's users.
    assert [bucket(u, "spring") for u in ("user-42", "u00", "")] == [7778, 869, 8338]
    assert bucket("user-42", "spring") != bucket("user-42", "autumn")  # the salt reshuffles
    # The request path's prepared hasher gives the same buckets.
    hasher = keyed_hasher(salt_key("spring"))
    assert all(bucket_with(f"u{i}", hasher) == bucket(f"u{i}", "spring") for i in range(500))


def test_shares_split_users_in_proportion() -> None:
    experiment = config(champion=0.9, challenger=0.1)
    experiment.allocation = reallocate(experiment.arms)
    counts = Counter(experiment.assign(f"user-{i}") for i in range(20_000))
    assert abs(counts["challenger"] / 20_000 - 0.1) < 0.01


def test_changing_shares_moves_only_the_users_it_must() -> None:
    arms = [Arm(name=n, model=n, share=s) for n, s in (("a", 0.5), ("b", 0.3), ("c", 0.2))]
    before = reallocate(arms)
    # b gives 0.1 to c; a keeps its share, so none of a's users may move.
    moved = [
        arms[0],
        arms[1].model_copy(update={"share": 0.2}),
        arms[2].model_copy(update={"share": 0.3}),
    ]
    after = reallocate(moved, before)

    def owners(runs: list[tuple[int, int, str]]) -> list[str]:
        out = [""] * BUCKETS
        for start, end, name in runs:
            out[start:end] = [name] * (end - start)
        return out

    old, new = owners(before), owners(after)
    changed = [(o, n) for o, n in zip(old, new, strict=True) if o != n]
    assert len(changed) == 1000  # exactly the 10% that changed hands
    assert set(changed) == {("b", "c")}
    assert Counter(new) == {"a": 5000, "b": 2000, "c": 3000}
    # Removing an arm frees only its buckets.
    dropped = reallocate([arms[0].model_copy(update={"share": 0.7}), arms[1]], before)
    assert all(n == o for o, n in zip(old, owners(dropped), strict=True) if o in ("a", "b"))


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"name": "x", "arms": [{"name": "a", "model": "m", "share": 1.0}]}, "arms"),
        ({"name": "bad name", "arms": []}, "name"),
        (
            {
                "name": "x",
                "arms": [
                    {"name": "a", "model": "m", "share": 0.6},
                    {"name": "b", "model": "n", "share": 0.6},
                ],
            },
            "arms",
        ),
        (
            {
                "name": "x",
                "arms": [
                    {"name": "a", "model": "m", "share": 0.5},
                    {"name": "a", "model": "n", "share": 0.5},
                ],
            },
            "arms",
        ),
        (
            {
                "name": "x",
                "arms": [
                    {"name": "a", "model": "m", "share": 0.33335},
                    {"name": "b", "model": "n", "share": 0.66665},
                ],
            },
            "arms.0.share",
        ),
        (
            {
                "name": "x",
                "arms": [
                    {"name": "a", "model": "m", "share": 1.0},
                    {"name": "s", "model": "n", "share": 0.1, "shadow": True},
                ],
            },
            "arms.1.share",
        ),
        (
            {
                "name": "x",
                "arms": [
                    {"name": "a", "model": "", "share": 0.5},
                    {"name": "b", "model": "n", "share": 0.5},
                ],
            },
            "arms.0.model",
        ),
        (
            {
                "name": "x",
                "control": "nope",
                "arms": [
                    {"name": "a", "model": "m", "share": 0.5},
                    {"name": "b", "model": "n", "share": 0.5},
                ],
            },
            "control",
        ),
        (
            {
                "name": "x",
                "primary_metric": "clicks",
                "arms": [
                    {"name": "a", "model": "m", "share": 0.5},
                    {"name": "b", "model": "n", "share": 0.5},
                ],
            },
            "primary_metric",
        ),
    ],
)
def test_a_bad_configuration_is_refused_naming_the_field(data: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidInputError) as info:
        parse_config(data)
    assert info.value.field == field, str(info.value)
    assert field.split(".")[0] in str(info.value)


def test_the_book_runs_one_experiment_at_a_time_and_a_restart_keeps_the_buckets(
    events_db: str,
) -> None:
    with EventStore.open(events_db) as store:
        book = ExperimentBook(store)
        first = book.start(config(champion=0.8, challenger=0.2))
        assert first.running and first.revision == 1
        with pytest.raises(ExperimentError, match="'spring' is running"):
            book.start(config("other"))
        changed = book.set_shares("spring", {"champion": 0.7, "challenger": 0.3})
        assert changed.revision == 2
        book.stop("spring")
        assert book.running() is None
        again = book.start(config(champion=0.7, challenger=0.3))
        assert again.config.allocation == changed.config.allocation  # nobody reshuffled
        assert [e.name for e in book.list()] == ["spring"]
        # Recorded answers keep their experiment and arm on both databases.
        answer = Response(
            "rec-1",
            "Recommend",
            "u1",
            ("i1",),
            "personalized",
            "affinity",
            "2",
            datetime.now(UTC),
            experiment="spring",
            arm="challenger",
        )
        store.record_responses(
            [answer, replace(answer, recommendation_id="rec-2", experiment=None, arm=None)]
        )
        assert (store.response("rec-1").experiment, store.response("rec-1").arm) == (
            "spring",
            "challenger",
        )
        assert store.response("rec-2").experiment is None


# ------------------------------------------------------------------ servers


@pytest.fixture
def registry(tracking: str, artifact_dir: Path, tmp_path: Path) -> dict[str, str]:
    """champion -> v1 (the test artifact), challenger -> v2 (another seed: other lists)."""
    other = tmp_path / "challenger-artifact"
    save_artifact(build_bundle(7), other)
    return {"tracking": tracking, "v1": register(artifact_dir), "v2": register(other, "challenger")}


@contextlib.contextmanager
def fleet(
    registry: dict[str, str], tmp_path: Path, store_path: Path, **overrides: Any
) -> Iterator[tuple[AffinityClient, ResponseRecorder, ServeSettings]]:
    """A server following models:/affinity@champion with an event store and a recorder."""
    settings = settings_for(
        f"models:/{MODEL_NAME}@champion",
        tmp_path,
        tracking_uri=registry["tracking"],
        token=TOKEN,
        admin_token=ADMIN,
        experiment_poll_seconds=0.1,
        **overrides,
    )
    holder = ModelHolder()
    loader = ModelLoader(settings, holder)
    assert loader.load_initial()
    store = EventStore.open(f"sqlite:///{store_path}")
    recorder = ResponseRecorder(store, interval=0.05)
    recorder.start()
    try:
        with (
            running(settings, holder, store=store, recorder=recorder) as port,
            client_for(port, token=TOKEN, timeout=20) as client,
        ):
            yield client, recorder, settings
    finally:
        recorder.stop()
        store.close()


def arms_of(client: AffinityClient, users: list[str]) -> dict[str, tuple[str, str, str]]:
    """Each user's (experiment, arm, model version)."""
    out = {}
    for user in users:
        result = client.recommend(user, k=5)
        out[user] = (result.experiment, result.arm, result.model.version)
    return out


def recorded(store_path: Path) -> list[Response]:
    with EventStore.open(f"sqlite:///{store_path}") as store:
        return [r for u in USERS for r in store.responses_for_user(u, limit=1000)]


def test_each_user_is_answered_by_their_arms_model_and_the_record_keeps_the_arm(
    registry: dict[str, str], tmp_path: Path
) -> None:
    store_path = tmp_path / "events.db"
    with fleet(registry, tmp_path, store_path) as (client, recorder, _):
        before = arms_of(client, USERS[:20])
        assert {value for value in before.values()} == {("", "", registry["v1"])}
        info = client.start_experiment(
            "spring",
            [("champion", "champion", 0.5), ("challenger", "challenger", 0.5)],
            admin_token=ADMIN,
        )
        assert info.status == "running" and info.allocation
        _wait_for(lambda: client.recommend("u01", k=3).experiment == "spring")
        first = arms_of(client, USERS)
        version = {"champion": registry["v1"], "challenger": registry["v2"]}
        for user, (experiment, arm, served) in first.items():
            assert experiment == "spring"
            assert served == version[arm], user  # the arm's own model answered
            assert arm == info_arm(user)
        counts = Counter(arm for _, arm, _ in first.values())
        assert 150 < counts["challenger"] < 250  # about half of 400
        assert arms_of(client, USERS) == first  # stable from request to request
        status = client.experiment("spring")
        assert {s["arm"]: s["ready"] for s in status.serving} == {
            "champion": True,
            "challenger": True,
        }
        recorder.flush()
    # Every answer of the experiment was recorded with its arm (u01 was also asked while waiting).
    rows = [r for r in recorded(store_path) if r.experiment == "spring" and r.user_id != "u01"]
    assert len(rows) == 2 * (len(USERS) - 1)
    assert all(r.arm == first[r.user_id or ""][1] for r in rows)
    assert all(r.model_version == version[r.arm or ""] for r in rows)

    # A restarted server (same store, same registry) puts every user in the same arm.
    with fleet(registry, tmp_path / "restart", store_path) as (client, _, _):
        _wait_for(lambda: client.recommend("u01", k=3).experiment == "spring")
        assert arms_of(client, USERS) == first


def info_arm(user: str) -> str:
    return config().model_copy(update={"allocation": reallocate(config().arms)}).assign(user)


def test_share_changes_alias_moves_and_stop(
    registry: dict[str, str], tmp_path: Path, artifact_dir: Path
) -> None:
    store_path = tmp_path / "events.db"
    with fleet(registry, tmp_path, store_path, poll_seconds=0.1) as (client, _, _):
        client.start_experiment(
            "spring",
            [("champion", "champion", 0.5), ("challenger", "challenger", 0.5)],
            admin_token=ADMIN,
        )
        _wait_for(lambda: client.recommend("u01", k=3).experiment == "spring")
        first = arms_of(client, USERS)
        updated = client.update_experiment(
            "spring", {"champion": 0.8, "challenger": 0.2}, admin_token=ADMIN
        )
        assert updated.revision == 2
        _wait_for(lambda: client.experiment("spring").revision == 2)
        time.sleep(0.3)  # a poll interval: every worker has the new routing
        second = arms_of(client, USERS)
        moved = [u for u in USERS if first[u][1] != second[u][1]]
        assert moved and all(first[u][1] == "challenger" for u in moved)  # only these move
        assert all(second[u][1] == "champion" for u in moved)

        # Moving the challenger alias mid-experiment changes the model, never a user's arm.
        v3 = register(artifact_dir, "challenger")
        _wait_for(
            lambda: (
                {v for _, a, v in arms_of(client, USERS[:60]).values() if a == "challenger"} == {v3}
            )
        )
        third = arms_of(client, USERS)
        assert {u: a for u, (_, a, _) in third.items()} == {u: a for u, (_, a, _) in second.items()}

        stopped = client.stop_experiment("spring", admin_token=ADMIN)
        assert stopped.status == "stopped"
        _wait_for(lambda: client.recommend("u01", k=3).experiment == "")
        assert {v for v in arms_of(client, USERS[:40]).values()} == {("", "", registry["v1"])}


def test_a_shadow_arm_ranks_the_same_requests_but_is_only_recorded(
    registry: dict[str, str], tmp_path: Path
) -> None:
    store_path = tmp_path / "events.db"
    with fleet(registry, tmp_path, store_path) as (client, recorder, _):
        client.start_experiment(
            "quiet",
            [("champion", "champion", 1.0), ("challenger", "challenger", 0.0, True)],
            admin_token=ADMIN,
        )
        _wait_for(lambda: client.recommend("u01", k=3).experiment == "quiet")
        shown = {u: client.recommend(u, k=5) for u in USERS[:50]}
        assert {(r.arm, r.model.version) for r in shown.values()} == {("champion", registry["v1"])}
        recorder.flush()
    rows = [r for r in recorded(store_path) if r.experiment == "quiet"]
    shadow = {r.user_id: r for r in rows if r.method == SHADOW}
    live = [r for r in rows if r.method == "Recommend"]
    assert len([r for r in rows if r.method == SHADOW]) == len(live) >= 50  # one per request
    for user in shown:
        row = shadow[user]
        assert row.arm == "challenger" and row.model_version == registry["v2"]
    # The challenger's lists differ from what users were shown (another model).
    assert any(list(shadow[u].item_ids) != r.item_ids for u, r in shown.items())


def _fallbacks(arm: str) -> float:
    value = REGISTRY.get_sample_value(
        "affinity_experiment_fallbacks_total", {"experiment": "ghostly", "arm": arm}
    )
    return value or 0.0


def test_a_missing_arm_model_falls_back_to_the_champion_without_failing_a_request(
    registry: dict[str, str], tmp_path: Path
) -> None:
    store_path = tmp_path / "events.db"
    with fleet(registry, tmp_path, store_path) as (client, _, _):
        # Written straight to the store, as if the alias was deleted after the start check.
        with EventStore.open(f"sqlite:///{store_path}") as store:
            ExperimentBook(store).start(
                parse_config(
                    {
                        "name": "ghostly",
                        "arms": [
                            {"name": "champion", "model": "champion", "share": 0.5},
                            {"name": "ghost", "model": "no-such-alias", "share": 0.5},
                        ],
                    }
                )
            )
        before = _fallbacks("ghost")
        _wait_for(lambda: client.recommend("u01", k=3).experiment == "ghostly")
        answers = arms_of(client, USERS[:100])
        ghosts = [u for u, (_, arm, _) in answers.items() if arm == "ghost"]
        assert ghosts  # users keep their arm ...
        assert {answers[u][2] for u in ghosts} == {registry["v1"]}  # ... served by the champion
        assert _fallbacks("ghost") - before >= len(ghosts)
        state = {s["arm"]: s for s in client.experiment("ghostly").serving}
        assert state["ghost"]["ready"] is False and "no-such-alias" in state["ghost"]["error"]


def test_admin_rpcs_need_the_admin_token_and_refuse_bad_requests_with_the_right_code(
    registry: dict[str, str], tmp_path: Path
) -> None:
    with fleet(registry, tmp_path, tmp_path / "events.db") as (client, _, _):
        arms = [("champion", "champion", 0.5), ("challenger", "challenger", 0.5)]
        assert status_of(lambda: client.start_experiment("x", arms)) == (
            grpc.StatusCode.PERMISSION_DENIED
        )
        with pytest.raises(grpc.RpcError) as info:
            client.start_experiment(
                "x", [("a", "champion", 0.5), ("b", "nope", 0.5)], admin_token=ADMIN
            )
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "arms.1.model" in info.value.details()
        with pytest.raises(grpc.RpcError) as info:
            client.start_experiment("x", [("a", "champion", 0.7)], admin_token=ADMIN)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "arms" in info.value.details()
        client.start_experiment("x", arms, admin_token=ADMIN)
        assert status_of(lambda: client.start_experiment("y", arms, admin_token=ADMIN)) == (
            grpc.StatusCode.FAILED_PRECONDITION
        )
        assert status_of(lambda: client.stop_experiment("nope", admin_token=ADMIN)) == (
            grpc.StatusCode.NOT_FOUND
        )
        assert status_of(lambda: client.experiment("nope")) == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.RpcError) as info:
            client.update_experiment("x", {"ghost": 0.5}, admin_token=ADMIN)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "shares" in info.value.details()
        assert [e.name for e in client.experiments()] == ["x"]


names = st.text(min_size=0, max_size=70)
arm_specs = st.builds(
    pb.ExperimentArm,
    name=names,
    model=st.sampled_from(["champion", "challenger", "", "7", "models:/other@x", "nope"]),
    share=st.floats(allow_nan=True, allow_infinity=True, width=64),
    shadow=st.booleans(),
)
specs = st.builds(
    pb.ExperimentSpec,
    name=names,
    arms=st.lists(arm_specs, max_size=4),
    control=names,
    salt=names,
    primary_metric=st.sampled_from(["", "ctr", "revenue", "bogus"]),
    min_users=st.integers(min_value=-(2**63), max_value=2**63 - 1),
)


def test_experiment_rpcs_fuzzed_never_answer_internal(
    registry: dict[str, str], tmp_path: Path
) -> None:
    with fleet(registry, tmp_path, tmp_path / "events.db") as (client, _, _):
        target = client._channel
        stub = pb_grpc.RecommenderStub(target)
        metadata = (("authorization", f"Bearer {ADMIN}"),)

        @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
        @given(spec=specs, name=names, shares=st.dictionaries(names, st.floats(), max_size=3))
        def check(spec: pb.ExperimentSpec, name: str, shares: dict[str, float]) -> None:
            for call in (
                lambda: stub.StartExperiment(
                    pb.StartExperimentRequest(spec=spec), metadata=metadata, timeout=20
                ),
                lambda: stub.UpdateExperiment(
                    pb.UpdateExperimentRequest(name=name, shares=shares),
                    metadata=metadata,
                    timeout=20,
                ),
                lambda: stub.GetExperiment(
                    pb.GetExperimentRequest(name=name), metadata=metadata, timeout=20
                ),
                lambda: stub.StopExperiment(
                    pb.StopExperimentRequest(name=name), metadata=metadata, timeout=20
                ),
            ):
                try:
                    call()
                except grpc.RpcError as exc:
                    assert exc.code() not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN), (
                        exc.details()
                    )

        check()


def test_the_cli_starts_shows_changes_and_stops_an_experiment(
    registry: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with fleet(registry, tmp_path, tmp_path / "events.db") as (client, _, _):
        target = client.target
        base = ["--target", target, "--token", TOKEN]
        admin = [*base, "--admin-token", ADMIN]
        assert (
            main(
                [
                    "experiment",
                    "start",
                    "cli-test",
                    "--arm",
                    "champion=champion:90%",
                    "--arm",
                    "challenger=challenger:0.1",
                    *admin,
                ]
            )
            == 0
        )
        out = capsys.readouterr().out
        assert "cli-test: running" in out and "90.00%" in out and "10.00%" in out
        _wait_for(lambda: client.recommend("u01", k=3).experiment == "cli-test")
        assert main(["experiment", "status", "cli-test", *base]) == 0
        assert "serving v" in capsys.readouterr().out
        assert (
            main(
                [
                    "experiment",
                    "update",
                    "cli-test",
                    "--share",
                    "champion=0.5",
                    "--share",
                    "challenger=0.5",
                    *admin,
                ]
            )
            == 0
        )
        assert "revision 2" in capsys.readouterr().out
        assert main(["experiment", "stop", "cli-test", *admin]) == 0
        assert "stopped" in capsys.readouterr().out
        # A mistake is a one-line reason, not a traceback.
        assert main(["experiment", "start", "bad", "--arm", "champion", *admin]) != 0
        assert "NAME=MODEL:SHARE" in capsys.readouterr().err
        assert main(["experiment", "stop", "cli-test", *base]) != 0
        assert "admin-token" in capsys.readouterr().err


def test_every_server_on_the_store_follows_an_experiment_another_one_started(
    registry: dict[str, str], tmp_path: Path
) -> None:
    store_path = tmp_path / "events.db"
    with (
        fleet(registry, tmp_path / "a", store_path) as (first, _, _),
        fleet(registry, tmp_path / "b", store_path) as (second, _, _),
    ):
        first.start_experiment(
            "shared",
            [("champion", "champion", 0.5), ("challenger", "challenger", 0.5)],
            admin_token=ADMIN,
        )
        # The other server learns of it by polling the store (experiment_poll_seconds).
        _wait_for(lambda: second.recommend("u01", k=3).experiment == "shared")
        assert arms_of(second, USERS[:100]) == arms_of(first, USERS[:100])
        second.stop_experiment("shared", admin_token=ADMIN)
        _wait_for(lambda: first.recommend("u01", k=3).experiment == "")
