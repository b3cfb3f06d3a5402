"""Stage strategies served: a real server with an event store whose ``user_segments`` puts users
in lifecycle stages; each user's list gets their stage's strategy and the response names both;
a new ``affinity segments`` computation reaches the worker; bad settings are refused."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import delete, insert

from models.errors import InvalidInputError
from models.ranking import RankingPipeline
from models.strategies import StrategyConfig
from protos.affinity.v1 import recommender_pb2 as pb
from service.config import load_settings
from service.events import USER_SEGMENTS, EventStore
from service.loader import ModelHolder
from service.servicer import RecommenderServicer
from service.stages import StageTable, StageView, map_onto
from service.wire import ListingEncoder, stage_fields
from tests.service.conftest import client_for, loaded_model, running, settings_for

NOW = datetime(2025, 6, 1, tzinfo=UTC)


def write_stages(store: EventStore, stages: dict[str, str], computed_at: datetime) -> None:
    """Replace ``user_segments`` as ``affinity segments`` does (only the stage matters here)."""
    rows = [
        {
            "user_id": user,
            "stage": stage,
            "stage_since": NOW - timedelta(days=3),
            "tier": "other",
            "recency_score": 3,
            "frequency_score": 3,
            "monetary_score": 3,
            "recency_days": 3,
            "frequency": 1,
            "monetary": 0.0,
            "first_seen": NOW - timedelta(days=90),
            "last_seen": NOW - timedelta(days=3),
            "activated_at": None,
            "as_of": NOW,
            "computed_at": computed_at,
        }
        for user, stage in stages.items()
    ]
    with store.engine.begin() as conn:
        conn.execute(delete(USER_SEGMENTS))
        conn.execute(insert(USER_SEGMENTS), rows)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[EventStore]:
    with EventStore.open(f"sqlite:///{tmp_path / 'events.db'}") as opened:
        yield opened


def test_each_stage_gets_its_strategy_named_in_the_response(
    artifact_dir: Path, pipeline: RankingPipeline, store: EventStore, tmp_path: Path
) -> None:
    # u01 at risk, u02 dormant, walk-in churned (the model never saw them); u03 is not in the
    # table (the model knows them: active), "stranger" neither (new).
    write_stages(store, {"u01": "at_risk", "u02": "dormant", "walk-in": "churned"}, NOW)
    settings = settings_for(
        artifact_dir,
        tmp_path,
        stage_strategies='{"at_risk": "win_back", "new": "new_user"}',
        stage_poll_seconds=0.1,
    )
    holder = ModelHolder()
    holder.swap(loaded_model(pipeline))
    servicers: list[RecommenderServicer] = []
    try:
        with (
            running(settings, holder, store=store, on_servicer=servicers.append) as port,
            client_for(port, timeout=20) as client,
        ):
            got = {
                u: client.recommend(u, k=5) for u in ("u01", "u02", "u03", "stranger", "walk-in")
            }
            assert {u: (r.stage, r.strategy) for u, r in got.items()} == {
                "u01": ("at_risk", "win_back"),
                "u02": ("dormant", "win_back"),  # the measured default
                "u03": ("active", "personalized"),
                "stranger": ("new", "new_user"),
                "walk-in": ("churned", "win_back"),
            }
            config = settings.strategy_config
            assert config is not None
            win_back = config.strategy("win_back")
            for user in ("u01", "u02"):
                expected = pipeline.recommend(user, 5, strategy=win_back)
                assert got[user].item_ids == expected.item_ids
                assert got[user].item_ids != pipeline.recommend(user, 5).item_ids
            assert got["u03"].item_ids == pipeline.recommend("u03", 5).item_ids
            stranger = pipeline.recommend("stranger", 5, strategy=config.strategy("new_user"))
            assert got["stranger"].item_ids == stranger.item_ids

            # A new computation: u01 came back (active), u03 is now at risk; the worker follows
            # within its poll interval.
            write_stages(store, {"u01": "active", "u03": "at_risk"}, NOW + timedelta(days=1))
            deadline = time.monotonic() + 10
            while client.recommend("u01", k=5).stage != "active":
                assert time.monotonic() < deadline, "the new stages never reached the worker"
                time.sleep(0.05)
            after = client.recommend("u03", k=5)
            assert (after.stage, after.strategy) == ("at_risk", "win_back")
            assert client.recommend("u02", k=5).stage == "active"  # left the table: known
            assert client.recommend("walk-in", k=5).stage == "new"  # left it: unknown
    finally:
        for servicer in servicers:
            if servicer.stages is not None:
                servicer.stages.stop()


def test_without_stage_strategies_the_response_names_none(
    artifact_dir: Path, pipeline: RankingPipeline, store: EventStore, tmp_path: Path
) -> None:
    write_stages(store, {"u01": "at_risk"}, NOW)
    settings = settings_for(artifact_dir, tmp_path)  # stage_strategies defaults to off
    holder = ModelHolder()
    holder.swap(loaded_model(pipeline))
    with running(settings, holder, store=store) as port, client_for(port, timeout=20) as client:
        result = client.recommend("u01", k=5)
    assert (result.stage, result.strategy) == ("", "")
    assert result.item_ids == pipeline.recommend("u01", 5).item_ids


def test_the_view_maps_the_table_onto_the_models_users(
    pipeline: RankingPipeline, store: EventStore
) -> None:
    users = pipeline.vocabularies()[0]
    view = StageView(StrategyConfig(), poll_seconds=3600)
    assert view.place("u05", users).stage == "active"  # nothing read yet: known -> active
    assert view.place("someone", users).stage == "new"
    write_stages(store, {"u05": "dormant", "later": "reactivated"}, NOW)
    view.store = store
    assert view.refresh()
    assert not view.refresh()  # the same computation: nothing reloaded
    assert (view.place("u05", users).stage, view.place("u05", users).strategy_name) == (
        "dormant",
        "win_back",
    )
    assert view.place("later", users).stage == "reactivated"
    codes, others = map_onto(view.table, users)
    assert codes.dtype.name == "uint8" and len(codes) == len(users)
    assert others == {"later": 6}
    assert len(StageTable.empty()) == 0


def test_the_stage_fields_are_written_as_protobuf_writes_them(pipeline: RankingPipeline) -> None:
    loaded = loaded_model(pipeline, version="3")
    encoder = ListingEncoder(pipeline, loaded.meta.ref)
    recs = pipeline.recommend("u01", 5)
    encoded = encoder.recommend(
        recs, pb.SOURCE_PERSONALIZED, "r1", b"", stage_fields("at_risk", "win_back")
    )
    message = pb.RecommendResponse.FromString(encoded)
    assert (message.stage, message.strategy) == ("at_risk", "win_back")
    expected = pb.RecommendResponse.FromString(
        encoder.recommend(recs, pb.SOURCE_PERSONALIZED, "r1")
    )
    expected.stage, expected.strategy = "at_risk", "win_back"
    assert encoded == expected.SerializeToString()


@pytest.mark.parametrize(
    ("value", "named"),
    [
        ('{"at_risk": "nope"}', "at_risk"),
        ('{"win_back": {"favourites": 0}}', "win_back.favourites"),
        ("maybe", "not off, default or a JSON object"),
    ],
)
def test_a_bad_strategy_setting_is_refused_naming_the_field(value: str, named: str) -> None:
    with pytest.raises(InvalidInputError) as info:
        load_settings(stage_strategies=value, model_uri=".")
    assert info.value.field == "stage_strategies"
    assert "AFFINITY_STAGE_STRATEGIES" in str(info.value) and named in str(info.value)


def test_a_shadow_arm_ranks_with_the_users_stage_strategy(
    artifact_dir: Path, pipeline: RankingPipeline, store: EventStore, tmp_path: Path
) -> None:
    """The shadow list of an at-risk user is made with win-back, as the answer was: a shadow
    arm of the served model records the list the user was shown."""
    from service.experiments import ExperimentBook, parse_config
    from service.recorder import ResponseRecorder
    from service.servicer import SHADOW

    write_stages(store, {"u01": "at_risk"}, NOW)
    settings = settings_for(
        artifact_dir, tmp_path, stage_strategies="default", experiment_poll_seconds=0.1
    )
    ExperimentBook(store).start(
        parse_config(
            {
                "name": "quiet",
                "arms": [
                    {"name": "champion", "model": "champion", "share": 1.0},
                    {"name": "mirror", "model": str(artifact_dir), "shadow": True},
                ],
            }
        )
    )
    holder = ModelHolder()
    holder.swap(loaded_model(pipeline))
    recorder = ResponseRecorder(store, interval=0.05)
    recorder.start()
    try:
        with running(settings, holder, store=store, recorder=recorder) as port:
            with client_for(port, timeout=20) as client:
                shown = client.recommend("u01", k=5)
            assert (shown.stage, shown.strategy, shown.arm) == ("at_risk", "win_back", "champion")
            recorder.flush()
    finally:
        recorder.stop()
    shadow = [r for r in store.responses_for_user("u01") if r.method == SHADOW]
    assert len(shadow) == 1 and shadow[0].arm == "mirror"
    assert list(shadow[0].item_ids) == shown.item_ids
    assert shown.item_ids != pipeline.recommend("u01", 5).item_ids  # win-back, not plain
