"""Lifecycle stages, RFM scores and tiers (models/lifecycle.py): boundaries, precedence, ties,
tiny populations, and a configuration that names the field it rejects."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from models.errors import InvalidInputError
from models.lifecycle import (
    DAY_SECONDS,
    STAGES,
    Activity,
    Scores,
    SegmentsConfig,
    Windows,
    assign_stages,
    assign_tiers,
    quantile_scores,
    rfm_scores,
)

DAY = DAY_SECONDS
AS_OF = 1_000 * DAY
LONG_AGO = AS_OF - 500 * DAY
W = Windows()


def stage_of(
    *,
    last_days: float,
    first_days: float = 500,
    activated_days: float | None = 500,
    previous: str = "",
    previous_since_days: float | None = None,
) -> tuple[str, float]:
    """One user's stage and stage_since (in days before AS_OF)."""
    activity = Activity.of(
        first_seen=np.array([AS_OF - first_days * DAY]),
        last_seen=np.array([AS_OF - last_days * DAY]),
        activated_at=np.array([np.nan if activated_days is None else AS_OF - activated_days * DAY]),
        previous_stage=np.array([previous], dtype=object),
        previous_since=np.array(
            [np.nan if previous_since_days is None else AS_OF - previous_since_days * DAY]
        ),
    )
    result = assign_stages(activity, AS_OF, W)
    return str(result.stage[0]), float((AS_OF - result.since[0]) / DAY)


SECOND = 1 / DAY


@pytest.mark.parametrize(
    ("last_days", "stage"),
    [
        (0, "active"),
        (30, "active"),  # inclusive
        (30 + SECOND, "at_risk"),
        (60, "at_risk"),
        (60 + SECOND, "dormant"),
        (120, "dormant"),
        (120 + SECOND, "churned"),
        (400, "churned"),
    ],
)
def test_idle_boundaries(last_days: float, stage: str) -> None:
    assert stage_of(last_days=last_days)[0] == stage


def test_new_and_activated_boundaries() -> None:
    # Never activated: new for new_days after first seen, then active.
    assert stage_of(last_days=0, first_days=14, activated_days=None)[0] == "new"
    assert stage_of(last_days=0, first_days=14 + SECOND, activated_days=None)[0] == "active"
    # Activated: activated for activated_days after the activation, then active.
    assert stage_of(last_days=0, first_days=3, activated_days=14)[0] == "activated"
    assert stage_of(last_days=0, first_days=30, activated_days=14 + SECOND)[0] == "active"
    # A new user gone quiet is at risk: idleness comes first.
    assert stage_of(last_days=31, first_days=31, activated_days=None)[0] == "at_risk"


def test_reactivation_and_its_period() -> None:
    assert stage_of(last_days=1, previous="dormant", previous_since_days=40) == ("reactivated", 0)
    assert stage_of(last_days=1, previous="churned", previous_since_days=200)[0] == "reactivated"
    # Stays reactivated for reactivated_days, keeping when it started.
    assert stage_of(last_days=1, previous="reactivated", previous_since_days=30) == (
        "reactivated",
        pytest.approx(30),
    )
    assert stage_of(last_days=1, previous="reactivated", previous_since_days=30 + SECOND) == (
        "active",
        0,
    )
    # Back from at risk is active again, not a reactivation.
    assert stage_of(last_days=1, previous="at_risk", previous_since_days=10)[0] == "active"
    # A dormant user still idle stays dormant (idleness precedes reactivation).
    assert stage_of(last_days=70, previous="dormant", previous_since_days=5)[0] == "dormant"


def test_stage_since() -> None:
    # Derived from the data on a first computation.
    assert stage_of(last_days=40) == ("at_risk", pytest.approx(10))
    assert stage_of(last_days=90) == ("dormant", pytest.approx(30))
    assert stage_of(last_days=200) == ("churned", pytest.approx(80))
    assert stage_of(last_days=0, first_days=5, activated_days=None) == ("new", pytest.approx(5))
    assert stage_of(last_days=0, first_days=9, activated_days=3) == ("activated", pytest.approx(3))
    # Unchanged: the previous value is kept, even when the data would say otherwise.
    assert stage_of(last_days=40, previous="at_risk", previous_since_days=7) == (
        "at_risk",
        pytest.approx(7),
    )


def test_every_user_in_exactly_one_stage() -> None:
    rng = np.random.default_rng(3)
    n = 5_000
    last = AS_OF - rng.uniform(0, 300, n) * DAY
    first = last - rng.uniform(0, 200, n) * DAY
    activated = np.where(rng.random(n) < 0.5, first + rng.uniform(0, 1, n) * (last - first), np.nan)
    previous = rng.choice(np.array(["", *STAGES], dtype=object), n)
    since = AS_OF - rng.uniform(0, 100, n) * DAY
    result = assign_stages(Activity.of(first, last, activated, previous, since), AS_OF, W)
    assert len(result.stage) == n
    assert set(result.stage) <= set(STAGES)
    assert sum(int((result.stage == s).sum()) for s in STAGES) == n
    assert (result.since <= AS_OF).all() and not np.isnan(result.since).any()


def test_bad_activity_names_the_array() -> None:
    with pytest.raises(InvalidInputError) as err:
        assign_stages(Activity.of([0.0], [AS_OF + 1]), AS_OF, W)
    assert err.value.field == "last_seen"
    with pytest.raises(InvalidInputError) as err:
        assign_stages(Activity.of([0.0, 1.0], [5.0]), AS_OF, W)
    assert err.value.field == "first_seen"
    with pytest.raises(InvalidInputError) as err:
        assign_stages(
            Activity.of([0.0], [5.0], previous_stage=np.array(["asleep"], dtype=object)), AS_OF, W
        )
    assert err.value.field == "previous_stage"


# --- scores ---------------------------------------------------------------------------------


def test_scores_are_quintiles_for_distinct_values() -> None:
    assert quantile_scores(np.arange(10)).tolist() == [1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    assert quantile_scores(np.arange(5)[::-1]).tolist() == [5, 4, 3, 2, 1]


def test_ties_share_a_score() -> None:
    values = np.array([1, 1, 1, 1, 1, 1, 2, 3, 4, 5])
    scores = quantile_scores(values)
    # Six equal values: mid-rank percentile 0.3 -> ceil(1.5) = 2, all of them.
    assert scores.tolist() == [2, 2, 2, 2, 2, 2, 4, 4, 5, 5]
    assert quantile_scores(np.full(7, 4.2)).tolist() == [3] * 7
    # Order of the input does not matter.
    perm = np.random.default_rng(0).permutation(len(values))
    assert quantile_scores(values[perm]).tolist() == scores[perm].tolist()


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([7.0], [3]),
        ([1.0, 2.0], [2, 4]),
        ([1.0, 2.0, 3.0], [1, 3, 5]),
        ([1.0, 2.0, 3.0, 4.0], [1, 2, 4, 5]),
        ([2.0, 2.0, 9.0], [2, 2, 5]),
        ([], []),
    ],
)
def test_tiny_populations(values: list[float], expected: list[int]) -> None:
    assert quantile_scores(np.array(values)).tolist() == expected


def test_recency_is_reversed_and_nan_refused() -> None:
    scores = rfm_scores(np.array([0, 10, 100]), np.array([1, 1, 1]), np.array([5.0, 5.0, 5.0]))
    assert scores.r.tolist() == [5, 3, 1]
    assert scores.f.tolist() == [3, 3, 3]
    with pytest.raises(InvalidInputError):
        quantile_scores(np.array([1.0, np.nan]))


def test_default_tiers_cover_every_score_once() -> None:
    config = SegmentsConfig()
    combos = np.array(list(itertools.product(range(1, 6), repeat=3)))
    r, f, m = combos.T
    tiers = assign_tiers(Scores(r, f, m), config)
    assert len(tiers) == 125
    assert set(tiers) <= set(config.tier_names)
    assert config.default_tier not in set(tiers)  # the defaults need no catch-all
    lookup = dict(zip(map(tuple, combos.tolist()), tiers, strict=True))
    assert lookup[(5, 5, 5)] == "champions"
    assert lookup[(5, 1, 1)] == "new_customers"
    assert lookup[(1, 5, 5)] == "cant_lose"
    assert lookup[(1, 5, 1)] == "at_risk"
    assert lookup[(1, 1, 1)] == "lost"
    assert lookup[(2, 2, 3)] == "hibernating"


def test_first_rule_wins_and_the_catch_all_takes_the_rest() -> None:
    config = SegmentsConfig.from_mapping(
        {
            "tiers": [{"name": "vip", "m": [5, 5]}, {"name": "recent", "r": [4, 5]}],
            "default_tier": "everyone_else",
        }
    )
    scores = Scores(np.array([5, 5, 1]), np.array([1, 1, 1]), np.array([5, 1, 1]))
    assert assign_tiers(scores, config).tolist() == ["vip", "recent", "everyone_else"]


# --- configuration --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "field", "words"),
    [
        ({"windows": {"activ_days": 3}}, "windows.activ_days", "unknown setting"),
        ({"windows": {"at_risk_days": 20}}, "windows", "at_risk_days"),
        ({"windows": {"dormant_days": -1}}, "windows.dormant_days", "greater than 0"),
        ({"tiers": [{"name": "ok", "r": [4, 9]}]}, "tiers.0.r", "low <= high"),
        ({"tiers": [{"name": "Big Spenders"}]}, "tiers.0.name", "not a tier name"),
        ({"default_tier": "lost"}, "default_tier", "catch-all"),
        ({"activation_events": []}, "activation_events", "at least one"),
        ({"colour": "red"}, "colour", "unknown setting"),
    ],
)
def test_bad_config_names_the_field(data: dict, field: str, words: str) -> None:
    with pytest.raises(InvalidInputError) as err:
        SegmentsConfig.from_mapping(data, source="segments.toml")
    assert err.value.field == field
    assert str(err.value).startswith("segments.toml: ")
    assert words in str(err.value)


def test_config_normalizes_event_names() -> None:
    config = SegmentsConfig.from_mapping({"activation_events": [" Purchase", "like", "LIKE"]})
    assert config.activation_events == ("purchase", "like")
    assert SegmentsConfig.from_mapping({"order_events": "purchase"}).order_events == ("purchase",)
