"""Turn accepted interactions into the user x item confidence matrix the algorithms fit on.

The formula, for user ``u`` and item ``i`` with events ``e``::

    confidence(u, i) = AGG over e of  weight(e) * 0.5 ** (age(e) / half_life)

where ``weight(e) = event weight * value`` (see :mod:`training.data`), ``age`` is measured from the
reference time (the newest timestamp in the data unless given), ``AGG`` is ``sum`` (default) or
``max``, the decay factor is 1 when ``half_life_days`` is None, and ``log_scale`` replaces the
result by ``log(1 + confidence)``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp
from pydantic import BaseModel, ConfigDict, Field

from models.errors import DataError
from models.vocabulary import Vocabulary

logger = logging.getLogger(__name__)

SECONDS_PER_DAY = 86_400


class ConfidenceConfig(BaseModel):
    """How interactions become confidence values (formula in the module docstring)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    half_life_days: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    """Days after which an event counts half as much; None turns recency decay off."""
    min_user_interactions: int = Field(default=1, ge=1)
    """Users with fewer distinct items than this are dropped (repeated until stable)."""
    min_item_interactions: int = Field(default=1, ge=1)
    """Items with fewer distinct users than this are dropped (repeated until stable)."""
    aggregate: Literal["sum", "max"] = "sum"
    """How repeated events of one user-item pair combine."""
    log_scale: bool = False
    """Replace each confidence ``c`` by ``log(1 + c)`` to damp heavy users and repeat events."""


@dataclass
class InteractionMatrix:
    """A users x items CSR matrix (float32) with the vocabularies that label its axes.

    ``dropped`` counts what did not make it into the matrix: ``rows_unknown_user`` /
    ``rows_unknown_item`` / ``rows_unknown`` (rows whose id is not in a given vocabulary),
    ``pairs_zero`` (pairs whose confidence is 0), ``users_below_min`` / ``items_below_min`` /
    ``pairs_below_min`` (removed by the min-count filter) and ``filter_rounds``.
    """

    matrix: sp.csr_matrix
    users: Vocabulary
    items: Vocabulary
    dropped: dict[str, int] = field(default_factory=dict)
    reference_time: int = 0
    """Unix seconds that ages were measured from."""

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self.users), len(self.items))


def _to_seconds(values: pd.Series | np.ndarray) -> np.ndarray:
    """Unix seconds (int64) from int seconds or a datetime64 column."""
    series = pd.Series(values) if not isinstance(values, pd.Series) else values
    if pd.api.types.is_datetime64_any_dtype(series.dtype):
        if getattr(series.dtype, "tz", None) is None:
            series = series.dt.tz_localize("UTC")
        delta = (series - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(1, "s")
        return delta.to_numpy(dtype=np.int64)
    return series.to_numpy(dtype=np.int64)


def _time_to_seconds(now: Any) -> int:
    if isinstance(now, datetime | pd.Timestamp | np.datetime64):
        ts = pd.Timestamp(now)
        if ts.tzinfo is None:
            ts = ts.tz_localize("UTC")
        return int((ts - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(1, "s"))
    return int(now)


def recency_weights(
    frame: pd.DataFrame, half_life_days: float | None, now: Any = None
) -> np.ndarray:
    """Per-row decay factor ``0.5 ** (age_days / half_life_days)`` (all ones when None).

    ``now`` (unix seconds or a datetime; naive means UTC) defaults to the newest timestamp in
    ``frame``; events after ``now`` count fully.
    """
    n = len(frame)
    if half_life_days is None or n == 0:
        return np.ones(n, dtype=np.float64)
    if half_life_days <= 0:
        raise DataError(f"half_life_days must be > 0, got {half_life_days}")
    seconds = _to_seconds(frame["timestamp"])
    reference = int(seconds.max()) if now is None else _time_to_seconds(now)
    age_days = np.maximum(reference - seconds, 0) / SECONDS_PER_DAY
    return np.exp2(-age_days / half_life_days)


def vocabulary_codes(ids: pd.Series, vocab: Vocabulary) -> np.ndarray:
    """Index of each id in ``vocab`` (-1 if unknown), as int64.

    The distinct ids are looked up once and spread back over the rows: a log repeats each id
    many times, and hashing the column once is much cheaper than one lookup per row.
    """
    if isinstance(ids.dtype, pd.CategoricalDtype):
        codes, uniques = ids.cat.codes.to_numpy(), ids.cat.categories.astype("str")
    else:
        codes, uniques = pd.factorize(ids.astype("str"))
    found = pd.Index(vocab.ids).get_indexer(pd.Index(uniques))
    # factorize codes a missing id as -1, which picks the trailing -1.
    return np.append(found, -1).astype(np.int64)[codes]


def stable_sort(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(order, keys[order])`` with ``order = np.argsort(keys, kind="stable")``, computed faster.

    For integer keys, each key is packed with its row number into one int64 (key in the high
    bits). The packed values are unique, so sorting the values themselves, several times
    cheaper than a stable argsort of millions of keys, yields exactly the stable order, read back
    from the low bits. Keys whose range does not leave room for the row number fall back to
    ``np.argsort``.
    """
    n = len(keys)
    if n and np.issubdtype(keys.dtype, np.integer):
        low, high = int(keys.min()), int(keys.max())
        row_bits = (n - 1).bit_length()
        if (high - low).bit_length() + row_bits <= 63:
            packed = (keys.astype(np.int64) - low) << row_bits
            packed |= np.arange(n, dtype=np.int64)
            packed.sort()
            order = packed & ((1 << row_bits) - 1)
            packed >>= row_bits
            packed += low
            return order, packed.astype(keys.dtype, copy=False)
    order = np.argsort(keys, kind="stable")
    return order, keys[order]


def _codes(ids: pd.Series, vocab: Vocabulary | None) -> tuple[np.ndarray, np.ndarray | None]:
    """Index per row (-1 if unknown), plus the sorted unique ids when no vocabulary is given."""
    if vocab is None:
        # A categorical factorizes by its codes (observed values only, in category order).
        text = ids if isinstance(ids.dtype, pd.CategoricalDtype) else ids.astype("str")
        codes, uniques = pd.factorize(text, sort=True)
        return codes.astype(np.int64), np.asarray(uniques, dtype=str)
    return vocabulary_codes(ids, vocab), None


def _present(ids: np.ndarray | None) -> np.ndarray:
    assert ids is not None
    return ids


def _surviving(ids: np.ndarray | None, keep: np.ndarray, kind: str) -> Vocabulary:
    return Vocabulary(_present(ids)[keep], kind=kind)


def build_matrix(
    frame: pd.DataFrame,
    config: ConfidenceConfig | None = None,
    *,
    users: Vocabulary | None = None,
    items: Vocabulary | None = None,
    reference_time: Any = None,
) -> InteractionMatrix:
    """Aggregate ``frame`` (from :func:`training.data.load_interactions`) into a CSR matrix.

    Without vocabularies, the axes are the sorted distinct ids that survive the min-count
    filter. A given vocabulary fixes its axis as is: rows with ids outside it are dropped and
    counted, and the min-count filter does not apply to that axis (its rows/columns stay, maybe
    empty). ``reference_time`` (unix seconds or datetime) defaults to the newest timestamp.
    """
    cfg = config or ConfidenceConfig()
    dropped = dict.fromkeys(
        (
            "rows_unknown_user",
            "rows_unknown_item",
            "rows_unknown",
            "pairs_zero",
            "users_below_min",
            "items_below_min",
            "pairs_below_min",
            "filter_rounds",
        ),
        0,
    )
    if len(frame):
        seconds = _to_seconds(frame["timestamp"])
        reference = (
            int(seconds.max()) if reference_time is None else _time_to_seconds(reference_time)
        )
    else:
        reference = 0 if reference_time is None else _time_to_seconds(reference_time)

    u, user_ids = _codes(frame["user_id"], users)
    i, item_ids = _codes(frame["item_id"], items)
    n_users = len(users if users is not None else _present(user_ids))
    n_items = len(items if items is not None else _present(item_ids))
    contribution = frame["weight"].to_numpy(dtype=np.float64) * recency_weights(
        frame, cfg.half_life_days, now=reference
    )

    known = (u >= 0) & (i >= 0)
    dropped["rows_unknown_user"] = int((u < 0).sum())
    dropped["rows_unknown_item"] = int((i < 0).sum())
    dropped["rows_unknown"] = int((~known).sum())
    if not known.all():
        u, i, contribution = u[known], i[known], contribution[known]

    # Sort by pair once; then sum/max of each run of equal keys is one reduceat.
    key = u * max(n_items, 1) + i
    order, key = stable_sort(key)
    contribution = contribution[order]
    if len(key):
        starts = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
        reduce = np.add if cfg.aggregate == "sum" else np.maximum
        values = reduce.reduceat(contribution, starts)
        key = key[starts]
    else:
        values = contribution
    rows, cols = key // max(n_items, 1), key % max(n_items, 1)

    nonzero = values > 0
    dropped["pairs_zero"] = int((~nonzero).sum())
    rows, cols, values = rows[nonzero], cols[nonzero], values[nonzero]
    if cfg.log_scale:
        values = np.log1p(values)

    keep_user = np.ones(n_users, dtype=bool)
    keep_item = np.ones(n_items, dtype=bool)
    if users is None or items is None:
        while True:
            dropped["filter_rounds"] += 1
            alive = keep_user[rows] & keep_item[cols]
            new_user, new_item = keep_user, keep_item
            if users is None:
                counts = np.bincount(rows[alive], minlength=n_users)
                new_user = keep_user & (counts >= cfg.min_user_interactions)
            if items is None:
                counts = np.bincount(cols[alive], minlength=n_items)
                new_item = keep_item & (counts >= cfg.min_item_interactions)
            if np.array_equal(new_user, keep_user) and np.array_equal(new_item, keep_item):
                break
            keep_user, keep_item = new_user, new_item
        alive = keep_user[rows] & keep_item[cols]
        dropped["users_below_min"] = int((~keep_user).sum())
        dropped["items_below_min"] = int((~keep_item).sum())
        dropped["pairs_below_min"] = int((~alive).sum())
        rows, cols, values = rows[alive], cols[alive], values[alive]

    user_vocab = users if users is not None else _surviving(user_ids, keep_user, "user")
    item_vocab = items if items is not None else _surviving(item_ids, keep_item, "item")
    if len(user_vocab) == 0 or len(item_vocab) == 0:
        raise DataError(
            f"no interactions left to build a matrix from ({len(frame)} rows; dropped: "
            f"{', '.join(f'{k} {v}' for k, v in dropped.items() if v)}); lower "
            f"min_user_interactions / min_item_interactions or provide more data"
        )
    new_row = np.cumsum(keep_user) - 1
    new_col = np.cumsum(keep_item) - 1
    matrix = sp.csr_matrix(
        (values.astype(np.float32), (new_row[rows], new_col[cols])),
        shape=(len(user_vocab), len(item_vocab)),
    )
    matrix.sort_indices()
    logger.info(
        "confidence matrix %d users x %d items, %d pairs; dropped %s",
        matrix.shape[0],
        matrix.shape[1],
        matrix.nnz,
        {k: v for k, v in dropped.items() if v},
    )
    return InteractionMatrix(
        matrix=matrix, users=user_vocab, items=item_vocab, dropped=dropped, reference_time=reference
    )
