"""Train/test/validation splits: determinism, pair-disjointness, time order and fractions."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from models.errors import DataError, InvalidInputError
from training.data import with_categorical_ids
from training.split import (
    Split,
    _lexsort,
    given_split,
    random_split,
    split,
    temporal_split,
    train_validation_test,
)


def _log(seed: int = 0, n_users: int = 40, n_items: int = 30) -> pd.DataFrame:
    """A log where each user has 3..25 distinct items, each seen 1..3 times at random times."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(n_users):
        n = int(rng.integers(3, 26))
        for item in rng.choice(n_items, size=min(n, n_items), replace=False):
            for _ in range(int(rng.integers(1, 4))):
                rows.append((f"u{u}", f"i{item}", int(rng.integers(1_000, 2_000))))
    frame = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"])
    frame["event"] = "view"
    return frame


def _pairs(frame: pd.DataFrame) -> set[tuple[str, str]]:
    return set(zip(frame["user_id"], frame["item_id"], strict=True))


@pytest.fixture(scope="module")
def log() -> pd.DataFrame:
    return _log()


def test_random_split_is_deterministic_for_a_seed_and_ignores_row_order(log: pd.DataFrame) -> None:
    first = random_split(log, seed=3)
    again = random_split(log.sample(frac=1.0, random_state=9), seed=3)
    other = random_split(log, seed=4)
    assert _pairs(first.test) == _pairs(again.test)
    assert _pairs(first.train) == _pairs(again.train)
    assert _pairs(first.test) != _pairs(other.test)


EVERY_SPLIT = pytest.mark.parametrize(
    "make",
    [
        lambda f: random_split(f, seed=1),
        lambda f: temporal_split(f, fraction=0.3),
        lambda f: temporal_split(f, cutoff=1_600),
    ],
    ids=["random", "temporal-per-user", "temporal-cutoff"],
)
"""Each way of splitting, as a function of the log (random, per-user temporal, global cut-off)."""


@EVERY_SPLIT
def test_no_pair_lands_in_both_parts(log: pd.DataFrame, make) -> None:
    result: Split = make(log)
    assert result.stats.test_pairs > 0
    assert not _pairs(result.train) & _pairs(result.test)
    assert len(_pairs(result.test)) == result.stats.test_pairs
    assert len(_pairs(result.train)) == result.stats.train_pairs
    assert list(result.train.columns) == list(log.columns)


def test_random_split_keeps_every_event_of_a_pair_together(log: pd.DataFrame) -> None:
    result = random_split(log, seed=1)
    events = log.groupby(["user_id", "item_id"]).size()
    for part in (result.train, result.test):
        counts = part.groupby(["user_id", "item_id"]).size()
        assert (counts == events.loc[counts.index]).all()
    # only the events of cold users' test pairs are lost; cold items' test pairs are kept
    dropped = len(log) - len(result.train) - len(result.test)
    assert (dropped > 0) == (result.stats.cold_user_pairs > 0)


@pytest.mark.parametrize("fraction", [0.2, 0.25, 0.5])
def test_random_split_train_share_per_user(log: pd.DataFrame, fraction: float) -> None:
    result = random_split(log, fraction=fraction, seed=5)
    n_pairs = log.drop_duplicates(["user_id", "item_id"]).groupby("user_id").size()
    train_pairs = result.train.drop_duplicates(["user_id", "item_id"]).groupby("user_id").size()
    for user, n in n_pairs.items():
        assert train_pairs.get(user, 0) == round(n * (1 - fraction)), user


def test_temporal_per_user_holds_out_each_users_latest_pairs(log: pd.DataFrame) -> None:
    fraction = 0.3
    result = temporal_split(log, fraction=fraction)
    n_pairs = log.drop_duplicates(["user_id", "item_id"]).groupby("user_id").size()
    train_pairs = result.train.drop_duplicates(["user_id", "item_id"]).groupby("user_id").size()
    for user, n in n_pairs.items():
        assert train_pairs[user] == round(n * (1 - fraction))
    last_train = result.train.groupby("user_id")["timestamp"].max()
    first_test = result.test.groupby("user_id")["timestamp"].min()
    for user, start in first_test.items():
        assert start >= last_train[user], user


def test_temporal_per_user_on_a_hand_built_log() -> None:
    # user a: items x (t=1, again t=9), y (t=2), z (t=3), w (t=4); fraction 0.5 -> 2 train pairs.
    # Pairs by first time: x, y | z, w. x's repeat at t=9 is after the test period starts (t=3),
    # so it is dropped; train keeps x@1, y@2; test z@3, w@4.
    frame = pd.DataFrame(
        {
            "user_id": ["a"] * 5 + ["b"] * 4,
            "item_id": ["x", "y", "z", "w", "x", "z", "w", "x", "y"],
            "timestamp": [1, 2, 3, 4, 9, 1, 2, 3, 4],
        }
    )
    result = temporal_split(frame, fraction=0.5)
    a_train = result.train[result.train.user_id == "a"]
    a_test = result.test[result.test.user_id == "a"]
    assert sorted(zip(a_train.item_id, a_train.timestamp, strict=True)) == [("x", 1), ("y", 2)]
    assert sorted(zip(a_test.item_id, a_test.timestamp, strict=True)) == [("w", 4), ("z", 3)]
    assert result.stats.late_train_rows == 1


def test_temporal_ties_are_broken_by_item_id() -> None:
    frame = pd.DataFrame(
        {"user_id": ["a"] * 4 + ["b"] * 4, "item_id": ["d", "c", "b", "a"] * 2, "timestamp": 5}
    )
    result = temporal_split(frame, fraction=0.5)
    # all four pairs share one time: the two smallest item ids go to train, for every row order
    assert sorted(result.train[result.train.user_id == "a"].item_id) == ["a", "b"]
    reordered = temporal_split(frame.iloc[::-1], fraction=0.5)
    assert _pairs(reordered.test) == _pairs(result.test)


def test_global_cutoff_is_respected(log: pd.DataFrame) -> None:
    result = temporal_split(log, cutoff=1_600)
    assert (result.train["timestamp"] < 1_600).all()
    assert (result.test["timestamp"] >= 1_600).all()
    # a pair first seen before the cut-off never moves to test, even if seen again after it
    first_seen = log.groupby(["user_id", "item_id"])["timestamp"].min()
    for pair in _pairs(result.test):
        assert first_seen[pair] >= 1_600


def test_global_cutoff_on_datetime_column_accepts_a_date_string() -> None:
    frame = pd.DataFrame(
        {
            "user_id": ["a", "a", "b", "b", "a"],
            "item_id": ["x", "y", "x", "y", "z"],
            "timestamp": pd.to_datetime(
                ["2024-01-01", "2024-01-05", "2024-01-02", "2024-02-01", "2024-02-03"]
            ),
        }
    )
    result = temporal_split(frame, cutoff="2024-01-15")
    assert _pairs(result.train) == {("a", "x"), ("a", "y"), ("b", "x")}
    # item z appears only after the cut-off: a cold item, kept in the test part and counted
    assert _pairs(result.test) == {("b", "y"), ("a", "z")}
    assert result.stats.cold_item_pairs == 1
    assert result.stats.cold_items == 1
    assert result.stats.cold_users == 0


def test_datetime_cutoff_against_unix_seconds() -> None:
    frame = pd.DataFrame(
        {
            "user_id": ["a", "a", "b", "b"],
            "item_id": ["x", "y", "y", "x"],
            "timestamp": [1_700_000_000, 1_700_100_000, 1_700_000_500, 1_700_200_000],
        }
    )
    cut = pd.Timestamp(1_700_050_000, unit="s", tz="UTC")
    result = temporal_split(frame, cutoff=cut)
    assert _pairs(result.test) == {("a", "y"), ("b", "x")}


def test_cold_users_are_dropped_and_cold_items_of_known_users_kept() -> None:
    frame = pd.DataFrame(
        {
            "user_id": ["a", "a", "b", "a", "a", "new", "new", "b", "new"],
            "item_id": ["x", "y", "x", "fresh", "fresh", "x", "y", "y", "brandnew"],
            "timestamp": [1, 2, 3, 10, 11, 11, 12, 13, 14],
        }
    )
    result = temporal_split(frame, cutoff=10)
    # Test candidates: (a, fresh) a known user's cold item: kept, both events; (b, y) kept;
    # (new, x), (new, y) and (new, brandnew) a cold user's: dropped, whatever the item.
    assert _pairs(result.test) == {("b", "y"), ("a", "fresh")}
    assert len(result.test) == 3
    stats = result.stats
    assert (stats.test_pairs, stats.test_users, stats.test_items) == (2, 2, 2)
    assert (stats.cold_user_pairs, stats.cold_item_pairs, stats.cold_pairs) == (3, 1, 4)
    assert (stats.cold_users, stats.cold_items) == (1, 1)
    assert stats.as_dict()["split_cold_item_pairs"] == 1
    assert "split_method" not in stats.as_dict()


def _log_with_rare_items() -> pd.DataFrame:
    """The random log plus, for every user, one item nobody else has, seen last."""
    frame = _log(seed=4)
    rare = pd.DataFrame({"user_id": frame["user_id"].unique(), "timestamp": 5_000, "event": "view"})
    rare["item_id"] = "rare-" + rare["user_id"]
    return pd.concat([frame, rare[frame.columns]], ignore_index=True)


@pytest.mark.parametrize(
    "make",
    [lambda f: random_split(f, fraction=0.5, seed=1), lambda f: temporal_split(f, fraction=0.2)],
    ids=["random", "temporal"],
)
def test_both_splits_keep_the_test_pairs_of_items_unseen_in_training(make) -> None:
    frame = _log_with_rare_items()
    result: Split = make(frame)
    train_items = set(result.train["item_id"])
    train_users = set(result.train["user_id"])
    cold = {(u, i) for u, i in _pairs(result.test) if i not in train_items}
    # The temporal split holds out every rare item (each user's latest); random about half.
    assert cold and all(i.startswith("rare-") for _, i in cold)
    assert len(cold) == result.stats.cold_item_pairs
    assert len({i for _, i in cold}) == result.stats.cold_items
    # Nothing is lost: no user is cold here, so every pair is in one part or the other.
    assert result.stats.cold_user_pairs == 0
    assert _pairs(result.train) | _pairs(result.test) == _pairs(frame)
    assert {u for u, _ in _pairs(result.test)} <= train_users


@pytest.mark.parametrize("method", ["random", "temporal"])
def test_validation_is_inside_train_part_and_disjoint_from_test(log: pd.DataFrame, method) -> None:
    result = train_validation_test(log, method, test_fraction=0.2, seed=2)
    train, validation, test = result
    assert len(validation) > 0
    full_train = _pairs(result.train_full)
    assert _pairs(validation) <= full_train
    assert _pairs(train) <= full_train
    assert not _pairs(validation) & _pairs(test)
    assert not _pairs(train) & _pairs(validation)
    assert not _pairs(train) & _pairs(test)
    assert _pairs(result.train_full) == _pairs(split(log, method, fraction=0.2, seed=2).train)


def test_validation_with_global_cutoff_defaults_to_an_equal_period_before(
    log: pd.DataFrame,
) -> None:
    train, validation, test = train_validation_test(log, "temporal", cutoff=1_800)
    # last event 1999 -> the test period is 1800..1999, validation starts at 1800 - 199 = 1601
    assert log["timestamp"].max() == 1_999
    assert (test["timestamp"] >= 1_800).all()
    assert len(validation) > 0
    assert validation["timestamp"].between(1_601, 1_799).all()
    assert (train["timestamp"] < 1_601).all()
    with pytest.raises(InvalidInputError, match="earlier"):
        train_validation_test(log, "temporal", cutoff=1_800, validation_cutoff=1_900)


def test_zero_test_fraction_only_carves_validation(log: pd.DataFrame) -> None:
    train, validation, test = train_validation_test(log, "random", test_fraction=0.0)
    assert test.empty
    assert _pairs(train) | _pairs(validation) <= _pairs(log)
    assert not _pairs(train) & _pairs(validation)
    # the validation share falls back to the method's default, 25% of each user's pairs
    direct = random_split(log, fraction=0.25, seed=43)
    assert _pairs(validation) == _pairs(direct.test)


def test_bad_inputs_are_rejected(log: pd.DataFrame) -> None:
    with pytest.raises(DataError, match="timestamp"):
        temporal_split(log.drop(columns="timestamp"))
    with pytest.raises(DataError, match="no rows"):
        random_split(log.iloc[:0])
    with pytest.raises(InvalidInputError, match="fraction"):
        random_split(log, fraction=1.0)
    with pytest.raises(InvalidInputError, match="method"):
        split(log, "by-coin")  # type: ignore[arg-type]
    with pytest.raises(DataError, match="test part"):
        temporal_split(log, cutoff=10_000)
    with pytest.raises(DataError, match="train part"):
        temporal_split(log, cutoff=0)


@EVERY_SPLIT
def test_categorical_ids_split_like_text_ids(log: pd.DataFrame, make) -> None:
    # The pipeline hands the split categorical ids (training.data.with_categorical_ids).
    text = make(log)
    categorical = make(with_categorical_ids(log))
    assert categorical.stats == text.stats
    for part in ("train", "test"):
        as_text = {"user_id": str, "item_id": str}
        got = getattr(categorical, part).astype(as_text)
        pd.testing.assert_frame_equal(got, getattr(text, part).astype(as_text))


def test_packed_sort_keys_order_like_lexsort() -> None:
    rng = np.random.default_rng(2)
    n = 5_000
    user = rng.integers(0, 50, n)
    item = rng.permutation(n)  # unique per row, like a user's items
    times = rng.integers(-1_000, 1_000, n)
    np.testing.assert_array_equal(_lexsort((item, times, user)), np.lexsort((item, times, user)))
    # Keys too wide to pack in 63 bits fall back to lexsort and still agree.
    wide = times * (2**50)
    np.testing.assert_array_equal(_lexsort((item, wide, user)), np.lexsort((item, wide, user)))
    draw = rng.random(n)
    np.testing.assert_array_equal(_lexsort((draw, user)), np.lexsort((draw, user)))


def test_given_split_keeps_a_published_split_as_it_is(log: pd.DataFrame) -> None:
    # Mark each user's first pair as the published test part; every row of a pair goes with it.
    first = log.groupby("user_id", sort=False)["item_id"].transform("first")
    marked = (log["item_id"] == first).to_numpy()
    result = given_split(log, marked)
    assert result.stats.method == "given"
    assert _pairs(result.test) == _pairs(log[marked])
    assert _pairs(result.train) == _pairs(log[~marked])
    assert len(result.train) + len(result.test) == len(log)


def test_given_split_drops_cold_users_and_keeps_cold_items() -> None:
    frame = pd.DataFrame(
        {
            "user_id": ["a", "a", "b", "c"],
            "item_id": ["x", "new", "x", "x"],
            "event": "view",
            "timestamp": [1, 2, 3, 4],
        }
    )
    # a's "new" item was never trained on (kept, a miss); c has no training row (dropped).
    result = given_split(frame, np.array([False, True, False, True]))
    assert _pairs(result.test) == {("a", "new")}
    assert result.stats.cold_user_pairs == 1 and result.stats.cold_item_pairs == 1


def test_given_split_refuses_a_mask_of_the_wrong_length(log: pd.DataFrame) -> None:
    with pytest.raises(InvalidInputError, match="is_test has 3 values"):
        given_split(log, np.zeros(3, dtype=bool))
