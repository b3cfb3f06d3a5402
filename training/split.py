"""Train / validation / test splits of an interaction log for offline evaluation.

Events are grouped into distinct (user, item) pairs first and whole pairs are assigned to one
side, so a pair never appears in both parts; each side keeps the raw events of its pairs.

Test pairs of a user with no training event (a cold user) are dropped: the cold-start fallback
serves those users, not the model. Test pairs of a known user whose item has no training event
(a cold item) stay in the test part: the user did want that item, so evaluation counts it as a
relevant item no model could rank (a miss; see :func:`training.evaluate.build_holdout`) rather
than making recall look better by forgetting it. ``docs/metrics.md`` describes the protocols for
readers of the MLflow UI.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
import pandas as pd

from models.errors import DataError, InvalidInputError
from training.confidence import stable_sort

logger = logging.getLogger(__name__)

Method = Literal["temporal", "random"]

DEFAULT_FRACTION: dict[str, float] = {"temporal": 0.2, "random": 0.25}
"""Share of each user's pairs held out when the caller gives no fraction."""


@dataclass(frozen=True)
class SplitStats:
    """Sizes of both parts and what was dropped, ready to be logged as MLflow metrics."""

    method: str
    train_rows: int
    """Events in the train part."""
    test_rows: int
    """Events in the test part: cold-user pairs dropped, cold-item pairs kept."""
    train_pairs: int
    test_pairs: int
    """Pairs in the test part, the ``cold_item_pairs`` included."""
    train_users: int
    train_items: int
    test_users: int
    """Users in the test part; every one has training events."""
    test_items: int
    """Items in the test part, the ``cold_items`` included."""
    cold_user_pairs: int
    """Test pairs whose user has no training event: dropped from the test part (the cold-start
    fallback serves those users, collaborative filtering cannot)."""
    cold_item_pairs: int
    """Test pairs of a known user whose item has no training event: kept in the test part and
    counted as misses (relevant, but no model can recommend an item it never saw)."""
    cold_pairs: int
    """``cold_user_pairs + cold_item_pairs``: test pairs no model can score, dropped or missed."""
    cold_users: int
    """Distinct users with test pairs but no training event (their pairs are dropped)."""
    cold_items: int
    """Distinct items of the ``cold_item_pairs`` (kept, counted as misses)."""
    late_train_rows: int
    """Temporal only: repeat events of train pairs after the cut, dropped so no training event
    is later than the test period starts."""

    def as_dict(self, prefix: str = "split_") -> dict[str, int]:
        """The counts (not the method name) under ``prefix``-ed keys."""
        return {
            prefix + name: int(value)
            for name, value in asdict(self).items()
            if isinstance(value, int | np.integer)
        }


@dataclass(frozen=True)
class Split:
    """The two parts of one split: raw event rows with the input frame's columns."""

    train: pd.DataFrame
    test: pd.DataFrame
    stats: SplitStats


@dataclass(frozen=True)
class TrainValidationTest:
    """A test split and a validation split carved from its train part with the same method.

    Unpacks as ``train, validation, test = ...``: tune on ``train`` against ``validation``,
    then refit on :attr:`train_full` (train plus validation pairs) and evaluate once on ``test``.
    """

    test_split: Split
    validation_split: Split

    @property
    def train(self) -> pd.DataFrame:
        return self.validation_split.train

    @property
    def validation(self) -> pd.DataFrame:
        return self.validation_split.test

    @property
    def test(self) -> pd.DataFrame:
        return self.test_split.test

    @property
    def train_full(self) -> pd.DataFrame:
        """The train part of the test split, the one to fit the final model on."""
        return self.test_split.train

    def __iter__(self) -> Iterator[pd.DataFrame]:
        return iter((self.train, self.validation, self.test))


# --------------------------------------------------------------- internals
@dataclass(frozen=True)
class _Pairs:
    """Distinct (user, item) pairs of a frame, sorted by (user id, item id)."""

    row_pair: np.ndarray
    user: np.ndarray
    item: np.ndarray
    n_users: int
    n_items: int

    def __len__(self) -> int:
        return len(self.user)


def _check_frame(frame: pd.DataFrame, columns: tuple[str, ...]) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise DataError(f"interaction frame lacks column(s) {', '.join(missing)}")
    if frame.empty:
        raise DataError("interaction frame has no rows to split")
    for column in ("user_id", "item_id"):
        if frame[column].isna().any():
            raise DataError(f"interaction frame has missing values in {column!r}")


def _check_fraction(fraction: float, name: str = "fraction") -> float:
    if not 0.0 < fraction < 1.0:
        raise InvalidInputError(f"{name} must be between 0 and 1 (exclusive)", field=name)
    return float(fraction)


def _pairs(frame: pd.DataFrame) -> _Pairs:
    # sort=True makes the pair order (and so the random draw per pair) independent of row order.
    user_codes, users = pd.factorize(frame["user_id"], sort=True)
    item_codes, items = pd.factorize(frame["item_id"], sort=True)
    n_items = len(items)
    keys = user_codes.astype(np.int64) * n_items + item_codes.astype(np.int64)
    # np.unique(keys, return_inverse=True), spelled out: one sort, no second pass.
    order, sorted_keys = stable_sort(keys)
    first = np.ones(len(keys), dtype=bool)
    first[1:] = sorted_keys[1:] != sorted_keys[:-1]
    row_pair = np.empty(len(keys), dtype=np.int64)
    row_pair[order] = np.cumsum(first) - 1
    unique_keys = sorted_keys[first]
    return _Pairs(
        row_pair=row_pair,
        user=unique_keys // n_items,
        item=unique_keys % n_items,
        n_users=len(users),
        n_items=n_items,
    )


def _time_values(series: pd.Series) -> np.ndarray:
    """Timestamps as a sortable int64 / float64 array (datetimes as nanoseconds, UTC)."""
    if series.isna().any():
        raise DataError("interaction frame has missing timestamps; a temporal split needs them")
    if isinstance(series.dtype, pd.DatetimeTZDtype):
        series = series.dt.tz_convert("UTC").dt.tz_localize(None)
    if pd.api.types.is_datetime64_any_dtype(series):
        return series.to_numpy(dtype="datetime64[ns]").view(np.int64)
    if pd.api.types.is_integer_dtype(series):
        return series.to_numpy(dtype=np.int64)
    if pd.api.types.is_float_dtype(series):
        return series.to_numpy(dtype=np.float64)
    raise DataError("timestamp must be numeric (unix seconds) or a datetime64 column")


def _cutoff_value(cutoff: Any, series: pd.Series) -> Any:
    """``cutoff`` in the units of :func:`_time_values` for this column."""
    is_number = isinstance(cutoff, int | float | np.number) and not isinstance(cutoff, bool)
    datetime_column = isinstance(series.dtype, pd.DatetimeTZDtype) or (
        pd.api.types.is_datetime64_any_dtype(series)
    )
    try:
        if datetime_column:
            stamp = pd.Timestamp(cutoff, unit="s") if is_number else pd.Timestamp(cutoff)
            if stamp.tzinfo is not None:
                stamp = stamp.tz_convert("UTC").tz_localize(None)
            return int(stamp.to_datetime64().astype("datetime64[ns]").astype(np.int64))
        if is_number:
            return cutoff
        stamp = pd.Timestamp(cutoff)
        if stamp.tzinfo is None:
            stamp = stamp.tz_localize("UTC")
        # A datetime cut-off against numeric timestamps: those are unix seconds.
        return stamp.timestamp()
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(f"cannot use {cutoff!r} as a time cut-off: {exc}") from None


def _first_time(pairs: _Pairs, times: np.ndarray) -> np.ndarray:
    """Time of each pair's first event."""
    sentinel = np.iinfo(np.int64).max if times.dtype == np.int64 else np.inf
    first = np.full(len(pairs), sentinel, dtype=times.dtype)
    np.minimum.at(first, pairs.row_pair, times)
    return first


def _lexsort(keys: tuple[np.ndarray, ...]) -> np.ndarray:
    """``np.lexsort(keys)`` (last key primary) for keys whose combination is unique.

    Non-negative integer keys whose ranges fit in 63 bits together are packed into one int64
    and sorted once, several times faster than a multi-key lexsort; since no two rows share
    all keys, both orders are the same.
    """
    if all(np.issubdtype(key.dtype, np.integer) for key in keys) and len(keys[0]):
        lows = [int(key.min()) for key in keys]
        highs = [int(key.max()) for key in keys]
        widths = [(high - low).bit_length() for high, low in zip(highs, lows, strict=True)]
        if sum(widths) <= 63:
            packed = np.zeros(len(keys[0]), dtype=np.int64)
            shift = 0
            for key, low, width in zip(keys, lows, widths, strict=True):
                packed |= (key.astype(np.int64) - low) << shift
                shift += width
            return np.argsort(packed)
    return np.lexsort(keys)


def _last_per_user(pairs: _Pairs, sort_keys: tuple[np.ndarray, ...], fraction: float) -> np.ndarray:
    """Test mask over pairs: each user's pairs ordered by ``sort_keys``, the last share to test.

    Per user, ``round(n * (1 - fraction))`` pairs (half to even, as Python's ``round``) stay in
    train; the rest go to test.
    """
    # lexsort sorts by its last key first: user, then the keys in the order given. Every key
    # list ends with one that tells a user's pairs apart (item id or a random draw).
    order = _lexsort((*reversed(sort_keys), pairs.user))
    counts = np.bincount(pairs.user, minlength=pairs.n_users)
    n_train = np.rint(counts * (1.0 - fraction)).astype(np.int64)
    starts = np.cumsum(counts) - counts
    rank = np.arange(len(pairs)) - np.repeat(starts, counts)
    is_test = np.empty(len(pairs), dtype=bool)
    is_test[order] = rank >= np.repeat(n_train, counts)
    return is_test


def _distinct(codes: np.ndarray, size: int) -> int:
    """How many distinct values ``codes`` (each in ``range(size)``) holds; no sort needed."""
    present = np.zeros(size, dtype=bool)
    present[codes] = True
    return int(np.count_nonzero(present))


def _finish(
    frame: pd.DataFrame,
    pairs: _Pairs,
    pair_test: np.ndarray,
    train_rows: np.ndarray,
    method: str,
    late_train_rows: int,
) -> Split:
    """Drop the test pairs of cold users, cut the frame and count everything.

    Test pairs of known users with a cold item are kept (see the module docstring).
    """
    row_user = pairs.user[pairs.row_pair]
    row_item = pairs.item[pairs.row_pair]
    if not train_rows.any():
        raise DataError(f"the {method} split left no interaction in the train part")
    if not pair_test.any():
        raise DataError(
            f"the {method} split left no interaction in the test part: users have too few "
            "interactions for the fraction, or the cut-off is after the last event"
        )
    known_user = np.zeros(pairs.n_users, dtype=bool)
    known_user[row_user[train_rows]] = True
    known_item = np.zeros(pairs.n_items, dtype=bool)
    known_item[row_item[train_rows]] = True
    cold_user = pair_test & ~known_user[pairs.user]
    kept_test = pair_test & ~cold_user
    cold_item = kept_test & ~known_item[pairs.item]
    test_rows = kept_test[pairs.row_pair]
    train_pair = np.zeros(len(pairs), dtype=bool)
    train_pair[pairs.row_pair[train_rows]] = True

    stats = SplitStats(
        method=method,
        train_rows=int(train_rows.sum()),
        test_rows=int(test_rows.sum()),
        train_pairs=int(train_pair.sum()),
        test_pairs=int(kept_test.sum()),
        train_users=int(known_user.sum()),
        train_items=int(known_item.sum()),
        test_users=int(_distinct(pairs.user[kept_test], pairs.n_users)),
        test_items=int(_distinct(pairs.item[kept_test], pairs.n_items)),
        cold_user_pairs=int(cold_user.sum()),
        cold_item_pairs=int(cold_item.sum()),
        cold_pairs=int(cold_user.sum() + cold_item.sum()),
        cold_users=int(_distinct(pairs.user[cold_user], pairs.n_users)),
        cold_items=int(_distinct(pairs.item[cold_item], pairs.n_items)),
        late_train_rows=late_train_rows,
    )
    if stats.cold_user_pairs:
        logger.info(
            "%s split: dropped %d test pairs of %d users unseen in train (cold-start fallback)",
            method,
            stats.cold_user_pairs,
            stats.cold_users,
        )
    if stats.cold_item_pairs:
        logger.info(
            "%s split: kept %d test pairs of %d items unseen in train; they count as misses",
            method,
            stats.cold_item_pairs,
            stats.cold_items,
        )
    if not stats.test_pairs:
        logger.warning(
            "%s split: every test pair was of a user unseen in train; the test part is empty",
            method,
        )
    # Boolean masks select faster than integer positions for arrow-backed text columns.
    train = frame[train_rows].reset_index(drop=True)
    test = frame[test_rows].reset_index(drop=True)
    return Split(train=train, test=test, stats=stats)


def _temporal_global(frame: pd.DataFrame, cut: Any) -> Split:
    pairs = _pairs(frame)
    times = _time_values(frame["timestamp"])
    pair_test = _first_time(pairs, times) >= cut
    row_test_pair = pair_test[pairs.row_pair]
    train_rows = ~row_test_pair & (times < cut)
    late = int((~row_test_pair & (times >= cut)).sum())
    return _finish(frame, pairs, pair_test, train_rows, "temporal", late)


def _temporal_per_user(frame: pd.DataFrame, fraction: float) -> Split:
    pairs = _pairs(frame)
    times = _time_values(frame["timestamp"])
    first = _first_time(pairs, times)
    pair_test = _last_per_user(pairs, (first, pairs.item), fraction)
    # The user's test period starts at the first test pair's first event; later repeat events of
    # train pairs are dropped so that no train row is later than a test row of the same user.
    sentinel = np.iinfo(np.int64).max if times.dtype == np.int64 else np.inf
    start = np.full(pairs.n_users, sentinel, dtype=times.dtype)
    np.minimum.at(start, pairs.user[pair_test], first[pair_test])
    row_test_pair = pair_test[pairs.row_pair]
    in_time = times <= start[pairs.user[pairs.row_pair]]
    train_rows = ~row_test_pair & in_time
    late = int((~row_test_pair & ~in_time).sum())
    return _finish(frame, pairs, pair_test, train_rows, "temporal", late)


# ------------------------------------------------------------------ public
def temporal_split(
    frame: pd.DataFrame, *, cutoff: Any = None, fraction: float = DEFAULT_FRACTION["temporal"]
) -> Split:
    """Hold out the most recent interactions, by a global cut-off or per user.

    A pair's time is the time of its first event (when the user found the item). With
    ``cutoff`` (anything :class:`pandas.Timestamp` takes, or a number: in the column's units if
    it is numeric, unix seconds if it holds datetimes), pairs first seen at or after it are test
    and train keeps only events before it. Without it, each user's last ``fraction`` of pairs by
    first-event time are test (ties broken by item id), and train events after the user's test
    period starts are dropped.
    """
    _check_frame(frame, ("user_id", "item_id", "timestamp"))
    if cutoff is not None:
        return _temporal_global(frame, _cutoff_value(cutoff, frame["timestamp"]))
    return _temporal_per_user(frame, _check_fraction(fraction))


def random_split(
    frame: pd.DataFrame, *, fraction: float = DEFAULT_FRACTION["random"], seed: int = 42
) -> Split:
    """Hold out a random ``fraction`` of each user's pairs (stratified by user).

    Per user, ``round(n_pairs * (1 - fraction))`` pairs go to train, chosen by a seeded draw
    over the pairs sorted by (user id, item id): the same frame and seed give the same split
    whatever the row order.
    """
    _check_frame(frame, ("user_id", "item_id"))
    fraction = _check_fraction(fraction)
    pairs = _pairs(frame)
    draw = np.random.default_rng(seed).random(len(pairs))
    pair_test = _last_per_user(pairs, (draw,), fraction)
    train_rows = ~pair_test[pairs.row_pair]
    return _finish(frame, pairs, pair_test, train_rows, "random", 0)


def given_split(frame: pd.DataFrame, is_test: np.ndarray | pd.Series) -> Split:
    """Hold out the rows ``is_test`` marks: a split published with a data set, kept as given.

    A pair with any marked row is a test pair (published splits never put one pair on both
    sides); cold users and items are handled as by the other splits.
    """
    _check_frame(frame, ("user_id", "item_id"))
    marked = np.asarray(is_test, dtype=bool)
    if marked.shape != (len(frame),):
        raise InvalidInputError(
            f"is_test has {marked.shape[0] if marked.ndim else 0} values for {len(frame)} rows",
            field="is_test",
        )
    pairs = _pairs(frame)
    pair_test = np.zeros(len(pairs), dtype=bool)
    pair_test[pairs.row_pair[marked]] = True
    train_rows = ~pair_test[pairs.row_pair]
    return _finish(frame, pairs, pair_test, train_rows, "given", 0)


def split(
    frame: pd.DataFrame,
    method: Method,
    *,
    fraction: float | None = None,
    cutoff: Any = None,
    seed: int = 42,
) -> Split:
    """Dispatch to :func:`temporal_split` or :func:`random_split` by name."""
    if method == "temporal":
        return temporal_split(
            frame,
            cutoff=cutoff,
            fraction=DEFAULT_FRACTION["temporal"] if fraction is None else fraction,
        )
    if method == "random":
        if cutoff is not None:
            raise InvalidInputError("a cut-off applies to the temporal split only", field="cutoff")
        return random_split(
            frame, fraction=DEFAULT_FRACTION["random"] if fraction is None else fraction, seed=seed
        )
    raise InvalidInputError(
        f"unknown split method {method!r}; choose 'temporal' or 'random'", field="method"
    )


def _no_holdout(frame: pd.DataFrame, method: str) -> Split:
    """The whole frame as train part, for callers that hold their test set elsewhere."""
    pairs = _pairs(frame)
    stats = SplitStats(
        method=method,
        train_rows=len(frame),
        test_rows=0,
        train_pairs=len(pairs),
        test_pairs=0,
        train_users=pairs.n_users,
        train_items=pairs.n_items,
        test_users=0,
        test_items=0,
        cold_user_pairs=0,
        cold_item_pairs=0,
        cold_pairs=0,
        cold_users=0,
        cold_items=0,
        late_train_rows=0,
    )
    return Split(train=frame.reset_index(drop=True), test=frame.iloc[:0], stats=stats)


def train_validation_test(
    frame: pd.DataFrame,
    method: Method = "temporal",
    *,
    test_fraction: float | None = None,
    validation_fraction: float | None = None,
    cutoff: Any = None,
    validation_cutoff: Any = None,
    seed: int = 42,
) -> TrainValidationTest:
    """Split off the test part, then carve validation from the train part the same way.

    ``test_fraction`` defaults to the method's default (0.2 temporal, 0.25 random); 0 keeps no
    test part (for a holdout supplied separately). ``validation_fraction`` defaults to
    ``test_fraction``. With a global ``cutoff`` the validation cut-off defaults to one
    test-period length earlier (``cutoff - (last event - cutoff)``). The random validation draw
    uses ``seed + 1``.
    """
    if method not in DEFAULT_FRACTION:
        raise InvalidInputError(
            f"unknown split method {method!r}; choose 'temporal' or 'random'", field="method"
        )
    if test_fraction == 0 and cutoff is None:
        _check_frame(frame, ("user_id", "item_id"))
        outer = _no_holdout(frame, method)
    else:
        outer = split(frame, method, fraction=test_fraction, cutoff=cutoff, seed=seed)
    if method == "temporal" and cutoff is not None:
        times = _time_values(frame["timestamp"])
        cut = _cutoff_value(cutoff, frame["timestamp"])
        if validation_cutoff is None:
            inner_cut = cut - (times.max() - cut)
        else:
            inner_cut = _cutoff_value(validation_cutoff, frame["timestamp"])
            if inner_cut >= cut:
                raise InvalidInputError(
                    "validation_cutoff must be earlier than cutoff", field="validation_cutoff"
                )
        _check_frame(outer.train, ("user_id", "item_id", "timestamp"))
        inner = _temporal_global(outer.train, inner_cut)
    else:
        if validation_fraction is None:
            validation_fraction = test_fraction or DEFAULT_FRACTION[method]
        inner = split(outer.train, method, fraction=validation_fraction, seed=seed + 1)
    logger.info(
        "%s split: %d train, %d validation, %d test pairs",
        method,
        inner.stats.train_pairs,
        inner.stats.test_pairs,
        outer.stats.test_pairs,
    )
    return TrainValidationTest(test_split=outer, validation_split=inner)
