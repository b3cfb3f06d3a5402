"""The confidence matrix: aggregation, recency decay, min-count filter, fixed vocabularies."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError

from models.errors import DataError
from models.vocabulary import Vocabulary
from training.confidence import (
    ConfidenceConfig,
    InteractionMatrix,
    build_matrix,
    recency_weights,
    stable_sort,
    vocabulary_codes,
)
from training.data import EventWeights, load_interactions, with_categorical_ids

DAY = 86_400
T0 = 1_704_067_200  # 2024-01-01T00:00:00Z


def _frame(rows: list[tuple[str, str, str, int]], value: float = 1.0) -> pd.DataFrame:
    """Rows of (user, item, event, timestamp) weighted with the default event weights."""
    weights = EventWeights().as_dict()
    frame = pd.DataFrame(rows, columns=["user_id", "item_id", "event", "timestamp"])
    frame["timestamp"] = frame["timestamp"].astype(np.int64)
    frame["value"] = value
    frame["weight"] = frame["event"].map(weights) * frame["value"]
    return frame


def _dense(result: InteractionMatrix) -> dict[tuple[str, str], float]:
    coo = result.matrix.tocoo()
    return {
        (result.users.id(int(r)), result.items.id(int(c))): float(v)
        for r, c, v in zip(coo.row, coo.col, coo.data, strict=True)
    }


def test_duplicates_are_summed_by_default_and_max_on_request() -> None:
    frame = _frame(
        [
            ("u1", "i1", "view", T0),
            ("u1", "i1", "view", T0),
            ("u1", "i1", "click", T0),
            ("u1", "i2", "purchase", T0),
            ("u2", "i1", "like", T0),
        ]
    )
    summed = build_matrix(frame, ConfidenceConfig())
    assert summed.matrix.dtype == np.float32
    assert summed.matrix.shape == (2, 2)
    assert _dense(summed) == {("u1", "i1"): 4.0, ("u1", "i2"): 10.0, ("u2", "i1"): 4.0}
    maxed = build_matrix(frame, ConfidenceConfig(aggregate="max"))
    assert _dense(maxed)[("u1", "i1")] == 2.0


def test_half_life_halves_an_event_one_half_life_old() -> None:
    frame = _frame(
        [
            ("u1", "i1", "view", T0 + 4 * DAY),  # newest: the reference time
            ("u1", "i2", "view", T0 + 2 * DAY),  # one half-life old
            ("u1", "i3", "click", T0),  # two half-lives old
            ("u2", "i2", "view", T0 + 2 * DAY),
            ("u2", "i2", "view", T0 + 4 * DAY),
        ]
    )
    result = build_matrix(frame, ConfidenceConfig(half_life_days=2.0))
    assert result.reference_time == T0 + 4 * DAY
    dense = _dense(result)
    assert dense[("u1", "i1")] == pytest.approx(1.0)
    assert dense[("u1", "i2")] == pytest.approx(0.5)
    assert dense[("u1", "i3")] == pytest.approx(2 * 0.25)
    assert dense[("u2", "i2")] == pytest.approx(1.5)


def test_recency_weights_reference_time_and_future_events() -> None:
    frame = _frame([("u", "i", "view", T0), ("u", "i", "view", T0 + 10 * DAY)])
    assert recency_weights(frame, None).tolist() == [1.0, 1.0]
    assert recency_weights(frame, 10.0).tolist() == pytest.approx([0.5, 1.0])
    now = datetime(2024, 1, 21, tzinfo=UTC)  # T0 + 20 days
    assert recency_weights(frame, 10.0, now=now).tolist() == pytest.approx([0.25, 0.5])
    # Events after "now" are not boosted above full weight.
    assert recency_weights(frame, 10.0, now=T0).tolist() == pytest.approx([1.0, 1.0])


def test_datetime_timestamps_give_the_same_matrix() -> None:
    frame = _frame([("u1", "i1", "view", T0), ("u1", "i2", "view", T0 + DAY)])
    as_datetime = frame.assign(timestamp=pd.to_datetime(frame["timestamp"], unit="s", utc=True))
    config = ConfidenceConfig(half_life_days=1.0)
    assert _dense(build_matrix(as_datetime, config)) == _dense(build_matrix(frame, config))


def test_min_count_filter_repeats_until_stable() -> None:
    # i3 has one user; dropping it leaves u3 with one item, which then drops u3 too.
    frame = _frame(
        [
            ("u1", "i1", "view", T0),
            ("u1", "i2", "view", T0),
            ("u2", "i1", "view", T0),
            ("u2", "i2", "view", T0),
            ("u3", "i2", "view", T0),
            ("u3", "i3", "view", T0),
        ]
    )
    config = ConfidenceConfig(min_user_interactions=2, min_item_interactions=2)
    result = build_matrix(frame, config)
    assert result.users.ids.tolist() == ["u1", "u2"]
    assert result.items.ids.tolist() == ["i1", "i2"]
    assert result.matrix.nnz == 4
    assert result.dropped["users_below_min"] == 1
    assert result.dropped["items_below_min"] == 1
    assert result.dropped["pairs_below_min"] == 2
    assert result.dropped["filter_rounds"] >= 2


def test_min_count_counts_distinct_items_not_events() -> None:
    frame = _frame(
        [("u1", "i1", "view", T0)] * 3 + [("u2", "i1", "view", T0), ("u2", "i2", "view", T0)]
    )
    result = build_matrix(frame, ConfidenceConfig(min_user_interactions=2))
    assert result.users.ids.tolist() == ["u2"]


def test_filtering_everything_is_a_clear_error() -> None:
    frame = _frame([("u1", "i1", "view", T0)])
    with pytest.raises(DataError, match="min_user_interactions"):
        build_matrix(frame, ConfidenceConfig(min_user_interactions=5))


def test_given_vocabularies_drop_and_count_unknown_ids() -> None:
    users = Vocabulary(["u1", "u2", "u3"], kind="user")
    items = Vocabulary(["i1", "i2"], kind="item")
    frame = _frame(
        [
            ("u1", "i1", "view", T0),
            ("u2", "i2", "click", T0),
            ("u9", "i1", "view", T0),  # unknown user
            ("u1", "i9", "view", T0),  # unknown item
            ("u9", "i9", "view", T0),  # both
        ]
    )
    # The min-count filter does not shrink fixed vocabularies.
    result = build_matrix(
        frame, ConfidenceConfig(min_user_interactions=3), users=users, items=items
    )
    assert result.users is users
    assert result.items is items
    assert result.matrix.shape == (3, 2)
    assert _dense(result) == {("u1", "i1"): 1.0, ("u2", "i2"): 2.0}
    assert result.dropped["rows_unknown_user"] == 2
    assert result.dropped["rows_unknown_item"] == 2
    assert result.dropped["rows_unknown"] == 3


def test_zero_weight_events_leave_no_entries() -> None:
    frame = _frame([("u1", "i1", "view", T0), ("u2", "i2", "view", T0)])
    frame.loc[1, "weight"] = 0.0
    result = build_matrix(frame)
    assert result.users.ids.tolist() == ["u1"]
    assert result.items.ids.tolist() == ["i1"]
    assert result.dropped["pairs_zero"] == 1


def test_log_scale() -> None:
    frame = _frame([("u1", "i1", "purchase", T0)])
    result = build_matrix(frame, ConfidenceConfig(log_scale=True))
    assert result.matrix[0, 0] == pytest.approx(np.log1p(10.0))


def test_rows_are_sorted_canonical_csr() -> None:
    rng = np.random.default_rng(0)
    rows = [
        (f"u{rng.integers(20)}", f"i{rng.integers(15)}", "view", T0 + int(rng.integers(0, 9 * DAY)))
        for _ in range(400)
    ]
    frame = _frame(rows)
    result = build_matrix(frame, ConfidenceConfig())
    assert result.matrix.has_canonical_format
    expected = frame.groupby(["user_id", "item_id"])["weight"].sum()
    dense = _dense(result)
    assert dense == pytest.approx({key: float(v) for key, v in expected.items()})


@pytest.mark.parametrize(
    "bad",
    [
        {"half_life_days": 0},
        {"half_life_days": -1.0},
        {"min_user_interactions": 0},
        {"aggregate": "mean"},
        {"unknown_field": 1},
    ],
)
def test_invalid_config_is_rejected(bad: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        ConfidenceConfig(**bad)  # type: ignore[arg-type]


def test_from_a_loaded_log(tmp_path: Path) -> None:
    log = tmp_path / "log.csv"
    log.write_text(
        "user_id,item_id,event,timestamp,value\n"
        "a,x,view,2024-01-02T00:00:00Z,1\n"
        "a,x,purchase,2024-01-02T00:00:00Z,2\n"
        "b,y,click,2024-01-01T00:00:00Z,1\n"
    )
    frame = load_interactions(log).frame
    result = build_matrix(frame, ConfidenceConfig(half_life_days=1.0))
    assert _dense(result) == pytest.approx({("a", "x"): 21.0, ("b", "y"): 1.0})


@pytest.mark.parametrize(
    "config",
    [ConfidenceConfig(), ConfidenceConfig(min_user_interactions=2, half_life_days=3)],
    ids=["defaults", "filtered-decayed"],
)
def test_categorical_ids_build_the_same_matrix(config: ConfidenceConfig) -> None:
    rng = np.random.default_rng(5)
    rows = [
        (f"u{u}", f"i{i}", "view", T0 + int(t))
        for u, i, t in zip(
            rng.integers(0, 30, 400),
            rng.integers(0, 40, 400),
            rng.integers(0, 9 * DAY, 400),
            strict=True,
        )
    ]
    text = _frame(rows)
    categorical = with_categorical_ids(text)
    expected, got = build_matrix(text, config), build_matrix(categorical, config)
    assert got.users.ids.tolist() == expected.users.ids.tolist()
    assert got.items.ids.tolist() == expected.items.ids.tolist()
    assert (got.matrix != expected.matrix).nnz == 0
    assert got.dropped == expected.dropped
    # With fixed vocabularies that miss some ids (rows of unknown ids are dropped and counted).
    users = Vocabulary(["u1", "u2", "u3", "u99"], kind="user")
    items = Vocabulary([f"i{k}" for k in range(0, 40, 2)], kind="item")
    expected = build_matrix(text, config, users=users, items=items)
    got = build_matrix(categorical, config, users=users, items=items)
    assert (got.matrix != expected.matrix).nnz == 0
    assert got.dropped == expected.dropped


def test_vocabulary_codes_marks_unknown_ids() -> None:
    vocab = Vocabulary(["a", "b", "c"], kind="item")
    ids = pd.Series(["b", "x", "a", "b", "c", " a"], dtype="str")
    expected = [1, -1, 0, 1, 2, -1]
    assert vocabulary_codes(ids, vocab).tolist() == expected
    assert vocabulary_codes(ids.astype("category"), vocab).tolist() == expected


@pytest.mark.parametrize(
    "keys",
    [
        np.array([5, 3, 5, 1, 3, 3, 0, 5], dtype=np.int64),
        np.array([-4, 7, -4, 2, 7], dtype=np.int32),  # negative keys, narrow dtype
        np.array([2**61, 0, 2**61, 5], dtype=np.int64),  # too wide to pack: plain argsort
        np.array([0.5, -1.0, 0.5, 0.25]),  # not integers: plain argsort
        np.zeros(0, dtype=np.int64),
        np.array([9], dtype=np.int64),
        np.random.default_rng(3).integers(0, 50, 10_000),  # many ties
    ],
)
def test_stable_sort_is_a_stable_argsort(keys: np.ndarray) -> None:
    order, sorted_keys = stable_sort(keys)
    np.testing.assert_array_equal(order, np.argsort(keys, kind="stable"))
    np.testing.assert_array_equal(sorted_keys, np.sort(keys, kind="stable"))
    assert sorted_keys.dtype == keys.dtype
