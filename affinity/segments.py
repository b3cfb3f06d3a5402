"""``affinity segments``: every user's lifecycle stage and value tier, stored, exported and logged.

The definitions are :mod:`models.lifecycle`'s; this module reads the data and keeps the result.
Inputs are interaction logs (read, validated and quarantined by training's loader,
:func:`training.data.load_interactions`; an optional ``price`` column is read beside it) and/or
the event store's events. Erased users (the store's ``erasures``) are dropped as training drops
them: every row at or before the erasure, logs included. The command then

1. aggregates per user, as of ``--as-of`` (default: the newest event): first and last seen, the
   first activation, frequency = distinct order times (an order is one timestamp of a user's
   order events: an invoice in the UCI Online Retail data), monetary = sum of ``value x price``
   over order events (``value`` alone where a row has no price);
2. assigns stages (with the previous computation's stages, for ``reactivated`` and
   ``stage_since``), RFM scores and tiers;
3. replaces the store's ``user_segments`` (with each user's profile aggregates, read by
   ``GetUserProfile``: :func:`profiles`) and adds this reference time's sizes to
   ``segment_history`` and the computation's score cut points to ``segment_runs``, in one
   transaction;
4. writes ``--out DIR/user_segments.parquet`` (and the transitions), and
5. records an MLflow run: counts per stage and tier as metrics, the transition matrix since the
   previous computation (CSV and JSON) and three plots (PNG).

Every row read is accounted for: ``rows_read == rows_used + rows_quarantined + rows_erased +
rows_bad_price + rows_ignored_event + rows_after_as_of``, and ``users == sum over stages ==
sum over tiers``. A subcommand of :mod:`affinity.cli`, where both sides of the product meet.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
import tomllib
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from models.errors import DataError, InvalidInputError
from models.lifecycle import (
    DAY_SECONDS,
    STAGES,
    Activity,
    RfmCutPoints,
    SegmentsConfig,
    assign_stages,
    assign_tiers,
    rfm_cut_points,
    rfm_scores,
)

if TYPE_CHECKING:
    import pandas as pd

    from service.events import EventStore

CONFIG_ENV = "AFFINITY_SEGMENTS_CONFIG"
"""The environment variable naming the configuration file when ``--config`` is not given."""
DEFAULT_EXPERIMENT = "affinity-segments"
NO_PREVIOUS = "(none)"
"""The transition matrix's row of users the previous computation did not have."""
GONE = "(gone)"
"""The transition matrix's column of users the previous computation had and this one has not
(no event left in the data, or erased)."""
_BATCH = 5_000


# --- configuration --------------------------------------------------------------------------


def load_config(path: str | Path | None = None) -> SegmentsConfig:
    """The configuration from the TOML file ``path``, else ``$AFFINITY_SEGMENTS_CONFIG``, else
    the defaults. Raises :class:`InvalidInputError` naming the file and the field."""
    where = path if path is not None else os.environ.get(CONFIG_ENV) or None
    if where is None:
        return SegmentsConfig()
    source = Path(where)
    origin = "--config" if path is not None else CONFIG_ENV
    try:
        text = source.read_text(encoding="utf-8")
    except OSError as exc:
        raise InvalidInputError(
            f"{origin}: cannot read {source}: {exc.strerror or exc}", field="config"
        ) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise InvalidInputError(f"{source}: not valid TOML: {exc}", field="config") from None
    return SegmentsConfig.from_mapping(data, source=str(source))


def parse_time(text: str, name: str = "as-of") -> float:
    """ISO-8601 (naive means UTC) or unix seconds, as unix seconds."""
    raw = text.strip()
    try:
        return float(raw) if raw.lstrip("+-").replace(".", "", 1).isdigit() else _iso(raw)
    except ValueError:
        raise InvalidInputError(
            f"--{name}: {text!r} is not a time: give ISO-8601 (2011-12-10T00:00:00Z) or unix "
            "seconds",
            field=name,
        ) from None


def _iso(raw: str) -> float:
    when = datetime.fromisoformat(raw.replace("Z", "+00:00").replace("z", "+00:00"))
    return (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()


# --- reading --------------------------------------------------------------------------------


@dataclass
class Rows:
    """Where every row read went."""

    read: int = 0
    used: int = 0
    quarantined: int = 0
    erased: int = 0
    bad_price: int = 0
    ignored_event: int = 0
    after_as_of: int = 0
    reasons: Counter[str] = field(default_factory=Counter)
    """Why rows were quarantined (training's reasons, and ``bad_price``)."""

    def as_dict(self) -> dict[str, int]:
        return {
            "rows_read": self.read,
            "rows_used": self.used,
            "rows_quarantined": self.quarantined,
            "rows_erased": self.erased,
            "rows_bad_price": self.bad_price,
            "rows_ignored_event": self.ignored_event,
            "rows_after_as_of": self.after_as_of,
        }

    def check(self) -> None:
        accounted = (
            self.used
            + self.quarantined
            + self.erased
            + self.bad_price
            + self.ignored_event
            + self.after_as_of
        )
        assert self.read == accounted, (self.read, self.as_dict())


@dataclass
class Inputs:
    """The usable rows of every input: ``user_id``, ``item_id``, ``event``, ``timestamp`` (unix
    seconds), ``value`` and ``price`` (NaN: none), and what became of the others."""

    frame: pd.DataFrame
    rows: Rows
    quarantine_path: Path | None = None
    bad_prices: pd.DataFrame | None = None
    sources: list[str] = field(default_factory=list)


def _loader_weights(config: SegmentsConfig) -> dict[str, float]:
    """Event names the loader must accept besides its own (custom activation or order events)."""
    from training.data import EventWeights

    known = set(EventWeights().as_dict())
    wanted = {*config.activation_events, *config.order_events}
    return {name: 1.0 for name in sorted(wanted - known)}


def read_logs(
    paths: Sequence[Path],
    config: SegmentsConfig,
    erasures: Mapping[str, datetime],
    quarantine_path: Path | None,
) -> Inputs:
    """Read logs through training's loader (validation, quarantine, erasures), with prices."""
    import pandas as pd

    from training.data import load_interactions, log_files

    loaded = load_interactions(
        list(paths),
        event_weights=_loader_weights(config),
        quarantine_path=quarantine_path,
        erasures=erasures,
    )
    frame = loaded.frame
    prices = _log_prices(log_files(list(paths)), frame)
    out = pd.DataFrame(
        {
            "user_id": frame["user_id"].astype("str").to_numpy(dtype=object),
            "item_id": frame["item_id"].astype("str").to_numpy(dtype=object),
            "event": frame["event"].astype("str").to_numpy(dtype=object),
            "timestamp": frame["timestamp"].to_numpy(dtype=np.int64),
            "value": frame["value"].to_numpy(dtype=np.float64),
            "price": prices,
        }
    )
    rows = Rows(
        read=loaded.rows_read,
        quarantined=loaded.rows_quarantined,
        erased=loaded.rows_erased,
        reasons=Counter(loaded.reasons),
    )
    return Inputs(
        out,
        rows,
        loaded.quarantine_path if loaded.rows_quarantined else None,
        sources=[str(p) for p in loaded.sources],
    )


def _log_prices(files: Sequence[Path], accepted: pd.DataFrame) -> np.ndarray:
    """The ``price`` of each accepted row (NaN where absent; a text that is not a number reads
    as ``-inf``, a bad price).

    The loader reads only its own columns, so the files are read again for ``price`` and each
    accepted row is found among the source rows by its parsed fields. Whether the loader
    accepts a row depends on those fields alone (its checks and the erasure rule), so the source
    rows whose fields equal an accepted row's are exactly the accepted ones, in order; a
    timestamp this reading parses differently from the loader breaks the equality, which is
    detected and reported rather than guessed.
    """
    import pandas as pd

    if not any(_has_price(f) for f in files):
        return np.full(len(accepted), np.nan)
    parts = [_source_rows(f) for f in files]
    source = pd.concat(parts, ignore_index=True)
    keys = _row_keys(source)
    wanted = _row_keys(
        pd.DataFrame(
            {
                "user_id": accepted["user_id"].astype("str"),
                "item_id": accepted["item_id"].astype("str"),
                "event": accepted["event"].astype("str"),
                "timestamp": accepted["timestamp"].to_numpy(dtype=np.int64),
                "value": accepted["value"].to_numpy(dtype=np.float64),
            }
        )
    )
    take = np.isin(keys, wanted)
    if int(take.sum()) != len(wanted) or not np.array_equal(keys[take], wanted):
        raise DataError(
            f"cannot match the price column of {', '.join(map(str, files))} to the rows the "
            "loader accepted: give timestamps as ISO-8601 or unix seconds",
            field="price",
        )
    return source["price"].to_numpy(dtype=np.float64)[take]


def _has_price(path: Path) -> bool:
    import pyarrow.parquet as pq

    if path.name.lower().endswith((".parquet", ".pq")):
        return "price" in pq.read_schema(path).names
    import pandas as pd

    sep = "\t" if ".tsv" in path.name.lower() else ","
    header = pd.read_csv(path, sep=sep, nrows=0, dtype=str)
    return "price" in [str(c).strip() for c in header.columns]


def _source_rows(path: Path) -> pd.DataFrame:
    """A log's rows as the loader parses them (ids stripped, events lower case, seconds,
    value 1.0 where empty), with ``price``."""
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    if path.name.lower().endswith((".parquet", ".pq")):
        table = pq.read_table(path)
        raw = {name: table.column(name) for name in table.column_names}
        cols = {name: _arrow_series(raw[name]) for name in raw}
    else:
        sep = "\t" if ".tsv" in path.name.lower() else ","
        df = pd.read_csv(
            path,
            sep=sep,
            dtype=str,
            keep_default_na=False,
            skip_blank_lines=True,
            on_bad_lines="skip",
        ).fillna("")
        cols = {str(name).strip(): df[name] for name in df.columns}
        raw = {}
    n = len(cols["user_id"])
    stamp = raw.get("timestamp")
    if stamp is not None and (pa.types.is_timestamp(stamp.type) or pa.types.is_date(stamp.type)):
        seconds = (
            pd.to_datetime(cols["timestamp"], utc=True) - pd.Timestamp(0, tz="UTC")
        ) // pd.Timedelta(1, "s")
        ts = seconds.to_numpy(dtype=np.float64, na_value=np.nan)
    else:
        ts = _text_seconds(cols["timestamp"])
    value = _numbers(cols["value"], empty=1.0) if "value" in cols else np.ones(n)
    price = _numbers(cols["price"], empty=np.nan) if "price" in cols else np.full(n, np.nan)
    with np.errstate(invalid="ignore"):
        ts = np.where(np.isfinite(ts), np.floor(ts), -1.0)
    return pd.DataFrame(
        {
            "user_id": _stripped(cols["user_id"]),
            "item_id": _stripped(cols["item_id"]),
            "event": _stripped(cols["event"]).str.lower(),
            "timestamp": ts.astype(np.int64),
            "value": value,
            "price": np.where(np.isnan(price) & _nonempty(cols.get("price")), -np.inf, price),
        }
    )


def _arrow_series(column: Any) -> pd.Series:
    import pandas as pd
    import pyarrow as pa

    if pa.types.is_dictionary(column.type):
        column = column.cast(column.type.value_type)
    if pa.types.is_floating(column.type):
        values = column.to_numpy(zero_copy_only=False).astype(np.float64)
        return pd.Series(values)
    if pa.types.is_integer(column.type):
        return pd.Series(column.to_numpy(zero_copy_only=False).astype(np.float64))
    return pd.Series(column.to_pandas())


def _stripped(column: pd.Series) -> pd.Series:
    import pandas as pd

    if pd.api.types.is_numeric_dtype(column.dtype):
        values = column.to_numpy(dtype=np.float64)
        integral = np.isfinite(values) & (np.floor(values) == values)
        text = np.where(integral, np.nan_to_num(values).astype(np.int64).astype(str), "")
        text = np.where(~integral & np.isfinite(values), values.astype(str), text)
        return pd.Series(text, dtype="str")
    return column.astype("str").fillna("").str.strip()


def _numbers(column: pd.Series, *, empty: float) -> np.ndarray:
    import pandas as pd

    if pd.api.types.is_numeric_dtype(column.dtype):
        values = column.to_numpy(dtype=np.float64, na_value=np.nan)
        return np.where(np.isnan(values), empty, values)
    text = column.astype("str").fillna("").str.strip()
    values = pd.to_numeric(text, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    return np.where((text == "").to_numpy(dtype=bool), empty, values)


def _nonempty(column: pd.Series | None) -> np.ndarray | bool:
    import pandas as pd

    if column is None or pd.api.types.is_numeric_dtype(column.dtype):
        return False
    return (column.astype("str").fillna("").str.strip() != "").to_numpy(dtype=bool)


def _text_seconds(column: pd.Series) -> np.ndarray:
    import pandas as pd

    if pd.api.types.is_numeric_dtype(column.dtype):
        return column.to_numpy(dtype=np.float64, na_value=np.nan)
    text = column.astype("str").fillna("").str.strip()
    numeric = pd.to_numeric(text, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    iso = pd.to_datetime(
        text.where(np.isnan(numeric), ""), format="ISO8601", utc=True, errors="coerce"
    )
    seconds = ((iso - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(1, "s")).to_numpy(
        dtype=np.float64, na_value=np.nan
    )
    return np.where(np.isnan(numeric), seconds, numeric)


def _row_keys(frame: pd.DataFrame) -> np.ndarray:
    import pandas as pd

    canonical = pd.DataFrame(
        {
            "user_id": frame["user_id"].astype("str"),
            "item_id": frame["item_id"].astype("str"),
            "event": frame["event"].astype("str"),
            "timestamp": frame["timestamp"].to_numpy(dtype=np.int64),
            "value": frame["value"].to_numpy(dtype=np.float64),
        }
    )
    return pd.util.hash_pandas_object(canonical, index=False).to_numpy(dtype=np.uint64)


def read_store_events(store: EventStore, erasures: Mapping[str, datetime]) -> Inputs:
    """Every stored event as a usable row (the store validated them when they came in); rows of
    an erased user at or before the erasure are dropped and counted."""
    import pandas as pd

    users: list[str] = []
    items: list[str] = []
    events: list[str] = []
    stamps: list[float] = []
    values: list[float] = []
    prices: list[float] = []
    for batch in store.iter_events():
        for row in batch:
            users.append(row["user_id"])
            items.append(row["item_id"])
            events.append(row["event"])
            stamps.append(row["ts"].timestamp())
            values.append(float(row["value"]))
            price = row["price"]
            prices.append(np.nan if price is None else float(price))
    frame = pd.DataFrame(
        {
            "user_id": np.asarray(users, dtype=object),
            "item_id": np.asarray(items, dtype=object),
            "event": np.asarray(events, dtype=object),
            "timestamp": np.floor(np.asarray(stamps, dtype=np.float64)).astype(np.int64),
            "value": np.asarray(values, dtype=np.float64),
            "price": np.asarray(prices, dtype=np.float64),
        }
    )
    cutoffs = {user: when.timestamp() for user, when in erasures.items()}
    limit = frame["user_id"].map(cutoffs).to_numpy(dtype=np.float64, na_value=np.nan)
    with np.errstate(invalid="ignore"):
        erased = ~np.isnan(limit) & (frame["timestamp"].to_numpy(np.float64) <= limit)
    rows = Rows(read=len(frame), erased=int(erased.sum()))
    return Inputs(frame[~erased].reset_index(drop=True), rows, sources=["event store"])


def combine(parts: Sequence[Inputs]) -> Inputs:
    """Several inputs as one: their rows in order, their counts added."""
    import pandas as pd

    rows = Rows()
    for part in parts:
        for name in ("read", "quarantined", "erased"):
            setattr(rows, name, getattr(rows, name) + getattr(part.rows, name))
        rows.reasons.update(part.rows.reasons)
    frame = pd.concat([p.frame for p in parts], ignore_index=True)
    quarantine = next((p.quarantine_path for p in parts if p.quarantine_path), None)
    return Inputs(frame, rows, quarantine, sources=[s for p in parts for s in p.sources])


# --- per-user aggregates --------------------------------------------------------------------


@dataclass(frozen=True)
class Aggregates:
    """Per-user figures at ``as_of`` (unix seconds), users sorted by id."""

    as_of: float
    user_id: np.ndarray
    first_seen: np.ndarray
    last_seen: np.ndarray
    activated_at: np.ndarray
    frequency: np.ndarray
    monetary: np.ndarray
    used: pd.DataFrame | None = field(default=None, repr=False)
    """The rows aggregated (for the profiles), and each one's user as an index of ``user_id``."""
    codes: np.ndarray | None = field(default=None, repr=False)

    @property
    def recency_days(self) -> np.ndarray:
        """Whole days since last seen."""
        return np.floor((self.as_of - self.last_seen) / DAY_SECONDS).astype(np.int64)


def aggregate(inputs: Inputs, config: SegmentsConfig, as_of: float | None) -> Aggregates:
    """Drop the rows that cannot count (a bad price, an ignored event, after ``as_of``: counted
    in ``inputs.rows``) and aggregate the rest per user."""
    import pandas as pd

    frame, rows = inputs.frame, inputs.rows
    price = frame["price"].to_numpy(dtype=np.float64)
    with np.errstate(invalid="ignore"):
        bad_price = ~np.isnan(price) & (~np.isfinite(price) | (price < 0))
    rows.bad_price = int(bad_price.sum())
    if rows.bad_price:
        rows.reasons["bad_price"] += rows.bad_price
        inputs.bad_prices = frame[bad_price].reset_index(drop=True)
    ignored = frame["event"].isin(config.ignored_events).to_numpy(dtype=bool) & ~bad_price
    rows.ignored_event = int(ignored.sum())
    usable = frame[~bad_price & ~ignored]
    if as_of is None:
        if usable.empty:
            raise DataError(
                f"no usable events: {rows.read} rows read, {rows.quarantined} quarantined, "
                f"{rows.erased} of erased users, {rows.bad_price} with a bad price, "
                f"{rows.ignored_event} ignored ({', '.join(config.ignored_events)})"
            )
        as_of = float(usable["timestamp"].max())
    late = usable["timestamp"].to_numpy(dtype=np.float64) > as_of
    rows.after_as_of = int(late.sum())
    usable = usable[~late]
    rows.used = len(usable)
    rows.check()
    if usable.empty:
        raise DataError(
            f"no events at or before --as-of {_iso_text(as_of)}: {rows.after_as_of} come later",
            field="as-of",
        )
    codes, users = pd.factorize(usable["user_id"], sort=True)
    n = len(users)
    ts = usable["timestamp"].to_numpy(dtype=np.float64)
    first = np.full(n, np.inf)
    last = np.full(n, -np.inf)
    np.minimum.at(first, codes, ts)
    np.maximum.at(last, codes, ts)
    event = usable["event"]
    activation = event.isin(config.activation_events).to_numpy(dtype=bool)
    activated = np.full(n, np.inf)
    np.minimum.at(activated, codes[activation], ts[activation])
    activated[np.isinf(activated)] = np.nan
    order = event.isin(config.order_events).to_numpy(dtype=bool)
    orders = pd.DataFrame({"u": codes[order], "t": ts[order]}).drop_duplicates()
    frequency = np.bincount(orders["u"].to_numpy(), minlength=n).astype(np.int64)
    value = usable["value"].to_numpy(dtype=np.float64)
    row_price = usable["price"].to_numpy(dtype=np.float64)
    amount = np.where(np.isnan(row_price), value, value * row_price)
    monetary = np.bincount(codes[order], weights=amount[order], minlength=n)
    return Aggregates(
        as_of=float(as_of),
        user_id=np.asarray(users, dtype=object),
        first_seen=first,
        last_seen=last,
        activated_at=activated,
        frequency=frequency,
        monetary=monetary,
        used=usable,
        codes=codes,
    )


# --- computing ------------------------------------------------------------------------------


def compute(
    agg: Aggregates, config: SegmentsConfig, previous: pd.DataFrame | None = None
) -> pd.DataFrame:
    """Every user's stage, ``stage_since``, scores and tier: one row per user (see
    :data:`service.events.USER_SEGMENTS` for the columns; times as unix seconds)."""
    import pandas as pd

    n = len(agg.user_id)
    prev_stage = np.full(n, "", dtype=object)
    prev_since = np.full(n, np.nan)
    if previous is not None and len(previous):
        index = pd.Index(previous["user_id"]).get_indexer(pd.Index(agg.user_id))
        found = index >= 0
        prev_stage[found] = previous["stage"].to_numpy(dtype=object)[index[found]]
        prev_since[found] = previous["stage_since"].to_numpy(dtype=np.float64)[index[found]]
    stages = assign_stages(
        Activity.of(agg.first_seen, agg.last_seen, agg.activated_at, prev_stage, prev_since),
        agg.as_of,
        config.windows,
    )
    recency = agg.recency_days
    scores = rfm_scores(recency, agg.frequency, agg.monetary)
    return pd.DataFrame(
        {
            "user_id": agg.user_id,
            "stage": stages.stage,
            "stage_since": stages.since,
            "tier": assign_tiers(scores, config),
            "recency_score": scores.r.astype(np.int64),
            "frequency_score": scores.f.astype(np.int64),
            "monetary_score": scores.m.astype(np.int64),
            "recency_days": recency,
            "frequency": agg.frequency,
            "monetary": agg.monetary,
            "first_seen": agg.first_seen,
            "last_seen": agg.last_seen,
            "activated_at": agg.activated_at,
            "previous_stage": prev_stage,
        }
    )


def transition_matrix(previous: pd.DataFrame | None, current: pd.DataFrame) -> pd.DataFrame:
    """Users by previous stage (rows, :data:`NO_PREVIOUS` for newcomers) and current stage
    (columns, :data:`GONE` for users no longer there)."""
    import pandas as pd

    rows = [*STAGES, NO_PREVIOUS]
    cols = [*STAGES, GONE]
    before = (
        previous[["user_id", "stage"]]
        if previous is not None
        else pd.DataFrame({"user_id": [], "stage": []})
    )
    merged = before.merge(
        current[["user_id", "stage"]], on="user_id", how="outer", suffixes=("_before", "_now")
    )
    frm = merged["stage_before"].fillna(NO_PREVIOUS)
    to = merged["stage_now"].fillna(GONE)
    matrix = pd.crosstab(frm, to).reindex(index=rows, columns=cols, fill_value=0)
    matrix.index.name, matrix.columns.name = "from", "to"
    return matrix.astype(np.int64)


# --- profiles -------------------------------------------------------------------------------

PROFILE_VERSION = 1
"""The shape of ``user_segments.profile`` (docs/segments.md, "Profiles")."""
PROFILE_DAYS = 90
"""Active days are kept for the last this many UTC days up to ``as_of``'s (the longest window a
profile reports: later days come from the events after ``as_of``)."""
RECENT_ITEMS = 10
"""The most recent distinct items kept per user."""
TOP_ITEMS = 100
"""Without a catalog: the items a user interacted with most, kept to be mapped to categories and
types by the served model's catalog when the profile is read."""
NOT_TASTE = frozenset({"dislike"})
"""Events that say what a user does not want: counted, but not their items' categories, types
or recent items."""


def profiles(agg: Aggregates, catalog: pd.DataFrame | None = None) -> list[dict[str, Any]]:
    """Each user's profile aggregates (in ``agg.user_id`` order) over the rows aggregated:

    - ``events``: events by name (``ignored_events`` are not among the rows);
    - ``days``: the distinct UTC day numbers (``floor(ts / 86400)``) with an event among the last
      :data:`PROFILE_DAYS` days ending with ``as_of``'s, ascending;
    - ``categories`` and ``types``: interactions (dislikes left out) by the catalog's category
      and item type of their item (items the catalog lacks or leaves blank are not listed),
      when ``catalog`` is given; else ``items``: the :data:`TOP_ITEMS` items with the most
      interactions (ties: item id), for the server to map with its model's catalog;
    - ``recent``: the :data:`RECENT_ITEMS` most recent distinct items as ``[item_id, unix
      seconds]`` (each item's latest interaction), newest first (ties: item id).
    """
    import pandas as pd

    assert agg.used is not None and agg.codes is not None
    n = len(agg.user_id)
    out: list[dict[str, Any]] = [
        {"v": PROFILE_VERSION, "events": {}, "days": [], "recent": []} for _ in range(n)
    ]
    codes = agg.codes
    used = agg.used
    ts = used["timestamp"].to_numpy(dtype=np.int64)
    event = used["event"].to_numpy(dtype=object)
    rows = pd.DataFrame({"u": codes, "event": event})
    counted = rows.groupby(["u", "event"], sort=False).size().reset_index(name="n")
    counted = counted.sort_values(["u", "n", "event"], ascending=[True, False, True])
    for u, name, k in zip(
        counted["u"].tolist(), counted["event"].tolist(), counted["n"].tolist(), strict=True
    ):
        out[u]["events"][name] = k
    day = ts // int(DAY_SECONDS)
    first_day = int(agg.as_of // DAY_SECONDS) - PROFILE_DAYS + 1
    recent_days = pd.DataFrame({"u": codes, "d": day})[day >= first_day].drop_duplicates()
    recent_days = recent_days.sort_values(["u", "d"])
    for u, d in zip(recent_days["u"].tolist(), recent_days["d"].tolist(), strict=True):
        out[u]["days"].append(d)
    taste = ~pd.Series(event).isin(NOT_TASTE).to_numpy(dtype=bool)
    items = used["item_id"].astype("str").to_numpy(dtype=object)[taste]
    owner, when = codes[taste], ts[taste]
    if catalog is not None:
        index = pd.Index(catalog["item_id"].astype("str"))
        pos = index.get_indexer(pd.Index(items))
        for key, column in (("categories", "category"), ("types", "item_type")):
            names = np.full(len(items), "", dtype=object)
            found = pos >= 0
            names[found] = catalog[column].astype("str").to_numpy(dtype=object)[pos[found]]
            _count_into(out, key, owner, names)
    else:
        _count_into(out, "items", owner, items, limit=TOP_ITEMS)
    latest = (
        pd.DataFrame({"u": owner, "item": items, "t": when})
        .groupby(["u", "item"], sort=False)["t"]
        .max()
        .reset_index()
        .sort_values(["u", "t", "item"], ascending=[True, False, True])
    )
    latest = latest[latest.groupby("u").cumcount() < RECENT_ITEMS]
    for u, item, t in zip(
        latest["u"].tolist(), latest["item"].tolist(), latest["t"].tolist(), strict=True
    ):
        out[u]["recent"].append([item, t])
    return out


def _count_into(
    out: list[dict[str, Any]],
    key: str,
    owner: np.ndarray,
    names: np.ndarray,
    limit: int | None = None,
) -> None:
    """``out[u][key]``: each user's rows by name, most first (ties: name), blanks left out."""
    import pandas as pd

    for profile in out:
        profile[key] = {}
    frame = pd.DataFrame({"u": owner, "name": names})
    frame = frame[frame["name"] != ""]
    counted = frame.groupby(["u", "name"], sort=False).size().reset_index(name="n")
    counted = counted.sort_values(["u", "n", "name"], ascending=[True, False, True])
    if limit is not None:
        counted = counted[counted.groupby("u").cumcount() < limit]
    for u, name, k in zip(
        counted["u"].tolist(), counted["name"].tolist(), counted["n"].tolist(), strict=True
    ):
        out[u][key][name] = k


# --- the store ------------------------------------------------------------------------------


def read_previous(store: EventStore, erasures: Mapping[str, datetime]) -> pd.DataFrame:
    """The stored segments of the last computation (times as unix seconds), without users
    erased since their row was computed."""
    import pandas as pd
    from sqlalchemy import select

    from service.events import USER_SEGMENTS as T

    stmt = select(T.c.user_id, T.c.stage, T.c.stage_since, T.c.last_seen, T.c.as_of)
    with store.engine.connect() as conn:
        found = conn.execute(stmt).all()
    frame = pd.DataFrame(
        {
            "user_id": [r.user_id for r in found],
            "stage": [r.stage for r in found],
            "stage_since": [r.stage_since.timestamp() for r in found],
            "last_seen": [r.last_seen.timestamp() for r in found],
            "as_of": [r.as_of.timestamp() for r in found],
        }
    )
    if erasures and len(frame):
        cut = frame["user_id"].map({u: w.timestamp() for u, w in erasures.items()})
        stale = cut.notna().to_numpy() & (frame["last_seen"].to_numpy() <= cut.to_numpy(float))
        frame = frame[~stale].reset_index(drop=True)
    return frame


def _when(seconds: float) -> datetime | None:
    return None if math.isnan(seconds) else datetime.fromtimestamp(seconds, UTC)


def write_segments(
    store: EventStore,
    table: pd.DataFrame,
    config: SegmentsConfig,
    as_of: float,
    computed_at: datetime,
    user_profiles: Sequence[Mapping[str, Any]] | None = None,
    cuts: RfmCutPoints | None = None,
) -> None:
    """Replace ``user_segments`` with ``table`` (and each user's profile aggregates, in
    ``table``'s order), record this reference time's sizes in ``segment_history`` and the
    computation (its configuration and score cut points) in ``segment_runs``, in one
    transaction."""
    from sqlalchemy import delete, insert

    from service.events import SEGMENT_HISTORY, SEGMENT_RUNS, USER_SEGMENTS

    as_of_dt = datetime.fromtimestamp(as_of, UTC)
    columns: dict[str, list[Any]] = {
        name: table[name].astype("str").tolist() for name in ("user_id", "stage", "tier")
    }
    for name in ("recency_score", "frequency_score", "monetary_score", "recency_days", "frequency"):
        columns[name] = table[name].to_numpy(dtype=np.int64).tolist()
    columns["monetary"] = table["monetary"].to_numpy(dtype=np.float64).tolist()
    for name in ("stage_since", "first_seen", "last_seen", "activated_at"):
        columns[name] = [_when(v) for v in table[name].to_numpy(dtype=np.float64).tolist()]
    if "previous_stage" in table:  # "" for users the previous computation did not have
        columns["previous_stage"] = [str(s) or None for s in table["previous_stage"].tolist()]
    if user_profiles is not None:
        if len(user_profiles) != len(table):
            raise ValueError(f"{len(user_profiles)} profiles for {len(table)} users")
        columns["profile"] = list(user_profiles)
    fixed = {"as_of": as_of_dt, "computed_at": computed_at}
    records = [
        {**dict(zip(columns, values, strict=True)), **fixed}
        for values in zip(*columns.values(), strict=True)
    ]
    sizes = segment_sizes(table, config)
    history = [
        {"as_of": as_of_dt, "kind": kind, "name": name, "users": int(n), "computed_at": computed_at}
        for kind, counts in sizes.items()
        for name, n in counts.items()
    ]
    with store.engine.begin() as conn:
        conn.execute(delete(USER_SEGMENTS))
        for start in range(0, len(records), _BATCH):
            conn.execute(insert(USER_SEGMENTS), records[start : start + _BATCH])
        conn.execute(delete(SEGMENT_HISTORY).where(SEGMENT_HISTORY.c.as_of == as_of_dt))
        conn.execute(insert(SEGMENT_HISTORY), history)
        if cuts is not None:
            conn.execute(delete(SEGMENT_RUNS).where(SEGMENT_RUNS.c.as_of == as_of_dt))
            conn.execute(
                insert(SEGMENT_RUNS),
                [
                    {
                        "as_of": as_of_dt,
                        "computed_at": computed_at,
                        "users": len(table),
                        "config": config.model_dump(mode="json"),
                        "cut_points": cuts.to_json(),
                    }
                ],
            )


def read_history(store: EventStore) -> pd.DataFrame:
    """``segment_history`` as a frame: as_of (UTC), kind, name, users."""
    import pandas as pd
    from sqlalchemy import select

    from service.events import SEGMENT_HISTORY as H

    with store.engine.connect() as conn:
        found = conn.execute(select(H.c.as_of, H.c.kind, H.c.name, H.c.users)).all()
    return pd.DataFrame(
        {
            "as_of": pd.to_datetime([r.as_of for r in found], utc=True),
            "kind": [r.kind for r in found],
            "name": [r.name for r in found],
            "users": [int(r.users) for r in found],
        }
    )


def segment_sizes(table: pd.DataFrame, config: SegmentsConfig) -> dict[str, dict[str, int]]:
    """Users per stage and per tier, every name listed (0 for an empty one)."""
    stage = table["stage"].value_counts()
    tier = table["tier"].value_counts()
    return {
        "stage": {name: int(stage.get(name, 0)) for name in STAGES},
        "tier": {name: int(tier.get(name, 0)) for name in config.tier_names},
    }


# --- plots ----------------------------------------------------------------------------------


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_stage_history(history: pd.DataFrame, path: Path) -> Path:
    """Users per stage over the computations' reference times; each line has its own marker
    and line style and is labelled with its name and size at its last point."""
    plt = _pyplot()
    stages = history[history["kind"] == "stage"]
    fig, ax = plt.subplots(figsize=(9, 5))
    markers = "os^vDPX"
    styles = ["-", "--", "-.", ":", "-", "--", "-."]
    for k, name in enumerate(STAGES):
        line = stages[stages["name"] == name].sort_values("as_of")
        if line.empty:
            continue
        x = line["as_of"].dt.tz_localize(None)
        ax.plot(x, line["users"], marker=markers[k], linestyle=styles[k], label=name)
        ax.annotate(
            f"{name}: {int(line['users'].iloc[-1]):,}",
            (x.iloc[-1], line["users"].iloc[-1]),
            textcoords="offset points",
            xytext=(6, 0),
            va="center",
            fontsize=8,
        )
    ax.set_title("Users per lifecycle stage over time")
    ax.set_xlabel("as of")
    ax.set_ylabel("users")
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)
    fig.autofmt_xdate()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _heatmap(ax: Any, values: np.ndarray, labels: np.ndarray, cmap: str) -> None:
    image = ax.imshow(values, cmap=cmap, aspect="auto")
    top = float(np.nanmax(values)) if values.size and np.nanmax(values) > 0 else 1.0
    for (i, j), text in np.ndenumerate(labels):
        dark = values[i, j] > top * 0.6
        ax.text(
            j, i, text, ha="center", va="center", fontsize=8, color="white" if dark else "black"
        )
    ax.figure.colorbar(image, ax=ax, shrink=0.8)


def plot_transitions(matrix: pd.DataFrame, path: Path) -> Path:
    """The transition matrix as a heatmap with the number of users in every cell."""
    plt = _pyplot()
    values = matrix.to_numpy(dtype=np.float64)
    fig, ax = plt.subplots(figsize=(9, 6.5))
    _heatmap(ax, values, np.vectorize(lambda v: f"{int(v):,}")(values), "Blues")
    ax.set_xticks(range(len(matrix.columns)), list(matrix.columns), rotation=30, ha="right")
    ax.set_yticks(range(len(matrix.index)), list(matrix.index))
    ax.set_xlabel("stage now")
    ax.set_ylabel("stage at the previous computation")
    ax.set_title("Stage transitions since the previous computation (users)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_rfm(table: pd.DataFrame, path: Path) -> Path:
    """Recency score (rows, 5 at the top) x frequency score (columns): users and mean
    monetary value in every cell."""
    plt = _pyplot()
    scores = range(5, 0, -1), range(1, 6)
    grouped = table.groupby(["recency_score", "frequency_score"])["monetary"]
    count, mean = grouped.size(), grouped.mean()
    values = np.zeros((5, 5))
    labels = np.full((5, 5), "", dtype=object)
    for i, r in enumerate(scores[0]):
        for j, f in enumerate(scores[1]):
            n = int(count.get((r, f), 0))
            values[i, j] = n
            labels[i, j] = f"{n:,}\nM {mean.get((r, f), 0.0):,.0f}" if n else "0"
    fig, ax = plt.subplots(figsize=(8, 6.5))
    _heatmap(ax, values, labels, "Greens")
    ax.set_xticks(range(5), [f"F={f}" for f in scores[1]])
    ax.set_yticks(range(5), [f"R={r}" for r in scores[0]])
    ax.set_xlabel("frequency score")
    ax.set_ylabel("recency score")
    ax.set_title("Users by recency x frequency score (count, mean monetary value)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --- the run --------------------------------------------------------------------------------


@dataclass
class SegmentsResult:
    """What one ``affinity segments`` computed and where it went."""

    as_of: float
    users: int
    sizes: dict[str, dict[str, int]]
    rows: Rows
    transitions: pd.DataFrame
    table: pd.DataFrame
    previous_as_of: float | None
    run_id: str | None = None
    exported: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "as_of": _iso_text(self.as_of),
            "previous_as_of": _iso_text(self.previous_as_of) if self.previous_as_of else None,
            "users": self.users,
            "stages": self.sizes["stage"],
            "tiers": self.sizes["tier"],
            "rows": self.rows.as_dict(),
            "reasons": dict(sorted(self.rows.reasons.items())),
            "changed_stage": changed(self.transitions),
            "run_id": self.run_id,
            "exported": self.exported,
        }


def changed(matrix: pd.DataFrame) -> int:
    """Users the previous computation had in another stage (newcomers and the gone left out)."""
    inner = matrix.loc[list(STAGES), list(STAGES)].to_numpy()
    return int(inner.sum() - np.trace(inner))


def _iso_text(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat().replace("+00:00", "Z")


def run_segments(
    *,
    interactions: Sequence[Path] = (),
    use_events: bool = False,
    store_uri: str | None = None,
    as_of: float | None = None,
    config: SegmentsConfig | None = None,
    out: Path | None = None,
    experiment: str = DEFAULT_EXPERIMENT,
    quarantine_path: Path | None = None,
    mlflow_run: bool = True,
    progress: Any = None,
    items: Path | None = None,
) -> SegmentsResult:
    """Compute, store, export and log every user's stage and tier (the module docstring), and
    their profile aggregates (categories and types from the ``items`` catalog when given)."""
    from service.events import EventStore, events_uri

    say = progress or (lambda message: None)
    config = config or SegmentsConfig()
    if not interactions and not use_events:
        raise InvalidInputError(
            "give --interactions (logs) and/or --events (the event store's events)",
            field="interactions",
        )
    uri = store_uri or events_uri()
    catalog = None
    if items is not None:
        from training.data import load_catalog

        catalog = load_catalog(items)
    computed_at = datetime.now(UTC)
    with EventStore.open(uri) as store:
        erasures = store.erasures()
        parts = []
        if interactions:
            say(f"reading {len(interactions)} log input(s)")
            parts.append(read_logs(interactions, config, erasures, quarantine_path))
        if use_events:
            say("reading the event store's events")
            parts.append(read_store_events(store, erasures))
        inputs = combine(parts)
        agg = aggregate(inputs, config, as_of)
        previous = read_previous(store, erasures)
        previous_as_of = float(previous["as_of"].max()) if len(previous) else None
        if previous_as_of is not None and agg.as_of < previous_as_of:
            raise InvalidInputError(
                f"--as-of {_iso_text(agg.as_of)} is before the stored computation's "
                f"({_iso_text(previous_as_of)}): segments move forward in time; give a later "
                "--as-of or another --store",
                field="as-of",
            )
        table = compute(agg, config, previous)
        matrix = transition_matrix(previous if len(previous) else None, table)
        say(f"profiles of {len(table):,} users")
        cuts = rfm_cut_points(table["recency_days"], table["frequency"], table["monetary"])
        user_profiles = profiles(agg, catalog)
        write_segments(store, table, config, agg.as_of, computed_at, user_profiles, cuts)
        history = read_history(store)
    result = SegmentsResult(
        as_of=agg.as_of,
        users=len(table),
        sizes=segment_sizes(table, config),
        rows=inputs.rows,
        transitions=matrix,
        table=table,
        previous_as_of=previous_as_of,
    )
    assert sum(result.sizes["stage"].values()) == result.users == sum(result.sizes["tier"].values())
    say(f"{result.users:,} users as of {_iso_text(agg.as_of)}; stored in {_printable(uri)}")
    if out is not None:
        result.exported = export(table, matrix, agg.as_of, out)
        say(f"wrote {', '.join(result.exported)}")
    if mlflow_run:
        with tempfile.TemporaryDirectory(prefix="affinity-segments-") as tmp:
            result.run_id = log_run(result, inputs, config, history, Path(tmp), experiment, uri)
        say(f"MLflow run {result.run_id} (experiment {experiment})")
    return result


def _export_frame(table: pd.DataFrame, as_of: float) -> pd.DataFrame:
    import pandas as pd

    frame = table.drop(columns=["previous_stage"]).copy()
    for name in ("stage_since", "first_seen", "last_seen", "activated_at"):
        frame[name] = pd.to_datetime(frame[name], unit="s", utc=True)
    frame["as_of"] = pd.Timestamp(as_of, unit="s", tz="UTC")
    return frame


def export(table: pd.DataFrame, matrix: pd.DataFrame, as_of: float, out: Path) -> list[str]:
    """``out/user_segments.parquet`` and ``out/transitions.csv``; returns their paths."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        segments = out / "user_segments.parquet"
        _export_frame(table, as_of).to_parquet(segments, index=False)
        transitions = out / "transitions.csv"
        matrix.to_csv(transitions)
    except OSError as exc:
        raise InvalidInputError(f"--out: cannot write to {out}: {exc}", field="out") from None
    return [str(segments), str(transitions)]


def log_run(
    result: SegmentsResult,
    inputs: Inputs,
    config: SegmentsConfig,
    history: pd.DataFrame,
    workdir: Path,
    experiment: str,
    store_uri: str,
) -> str:
    """One MLflow run: parameters, counts as metrics, the transitions and the plots."""
    import mlflow

    from registry import mlflow_store

    mlflow_store.configure_tracking()
    mlflow.set_experiment(experiment)
    with mlflow.start_run(run_name=f"segments {_iso_text(result.as_of)}") as run:
        mlflow.set_tags(
            {
                "as_of": _iso_text(result.as_of),
                "previous_as_of": _iso_text(result.previous_as_of)
                if result.previous_as_of
                else "none",
                "inputs": ", ".join(inputs.sources),
                "event_store": _printable(store_uri),
            }
        )
        flat = {
            "activation_events": ",".join(config.activation_events),
            "order_events": ",".join(config.order_events),
            "ignored_events": ",".join(config.ignored_events),
            "default_tier": config.default_tier,
            "tiers": ",".join(rule.name for rule in config.tiers),
            **{f"windows.{k}": v for k, v in config.windows.model_dump().items()},
        }
        mlflow.log_params(flat)
        mlflow.log_dict(config.model_dump(mode="json"), "config.json")
        metrics: dict[str, float] = {"users": float(result.users)}
        metrics.update({f"stage_{k}": float(v) for k, v in result.sizes["stage"].items()})
        metrics.update({f"tier_{k}": float(v) for k, v in result.sizes["tier"].items()})
        metrics.update({k: float(v) for k, v in result.rows.as_dict().items()})
        metrics["changed_stage"] = float(changed(result.transitions))
        mlflow.log_metrics(metrics)
        matrix = result.transitions
        csv_path = workdir / "transitions.csv"
        matrix.to_csv(csv_path)
        mlflow.log_artifact(str(csv_path), "transitions")
        mlflow.log_dict(
            {
                "from": list(matrix.index),
                "to": list(matrix.columns),
                "users": matrix.to_numpy().tolist(),
                "previous_as_of": _iso_text(result.previous_as_of)
                if result.previous_as_of
                else None,
                "as_of": _iso_text(result.as_of),
            },
            "transitions/transitions.json",
        )
        plots = workdir / "plots"
        plots.mkdir()
        plot_stage_history(history, plots / "stage_sizes.png")
        plot_transitions(matrix, plots / "transitions.png")
        plot_rfm(result.table, plots / "rfm.png")
        mlflow.log_artifacts(str(plots), "plots")
        mlflow.log_dict(
            {**result.rows.as_dict(), "reasons": dict(sorted(result.rows.reasons.items()))},
            "quarantine/summary.json",
        )
        if inputs.quarantine_path is not None and inputs.quarantine_path.is_file():
            mlflow.log_artifact(str(inputs.quarantine_path), "quarantine")
        if inputs.bad_prices is not None:
            bad = workdir / "bad_price.csv"
            inputs.bad_prices.to_csv(bad, index=False)
            mlflow.log_artifact(str(bad), "quarantine")
        return str(run.info.run_id)


def _printable(uri: str) -> str:
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(uri).render_as_string(hide_password=True)
    except ArgumentError:
        return uri


# --- the command ----------------------------------------------------------------------------


def cmd_segments(args: argparse.Namespace) -> int:
    """Run ``affinity segments``."""
    start = time.perf_counter()

    def progress(message: str) -> None:
        if not args.quiet:
            print(f"[{time.perf_counter() - start:7.1f}s] {message}", file=sys.stderr, flush=True)

    config = load_config(args.config)
    result = run_segments(
        interactions=list(args.interactions or []),
        use_events=args.events,
        store_uri=args.store,
        as_of=parse_time(args.as_of) if args.as_of else None,
        config=config,
        out=args.out,
        experiment=args.experiment,
        quarantine_path=args.quarantine,
        progress=progress,
        items=args.items,
    )
    summary = result.to_json()
    if args.json:
        print(json.dumps(summary))
        return 0
    print(f"segments as of {summary['as_of']}: {result.users:,} users (run {result.run_id})")
    for kind in ("stage", "tier"):
        print(f"  {kind}s:")
        for name, n in result.sizes[kind].items():
            share = n / result.users if result.users else 0.0
            print(f"    {name:<16} {n:>9,}  {share:6.1%}")
    rows = result.rows
    print(
        f"  rows: {rows.read:,} read, {rows.used:,} used, {rows.quarantined:,} quarantined, "
        f"{rows.erased:,} erased, {rows.bad_price:,} bad price, {rows.ignored_event:,} "
        f"ignored, {rows.after_as_of:,} after as-of"
    )
    if result.previous_as_of is not None:
        print(
            f"  {summary['changed_stage']:,} users changed stage since {summary['previous_as_of']}"
        )
    return 0


def register_cli(subparsers: Any) -> None:
    """Add ``segments`` to an ``argparse`` subparsers object."""
    from training.data import LOG_COLUMNS

    parser = subparsers.add_parser(
        "segments",
        help="every user's lifecycle stage and value tier (RFM), stored and logged",
        description="Compute every user's lifecycle stage (new, activated, active, at_risk, "
        "dormant, churned, reactivated) and value tier (RFM scores, e.g. champions, loyal, "
        "lost) from interaction logs and/or the event store; store them in the event store "
        "(user_segments, segment_history), optionally export Parquet, and record an MLflow "
        "run with the counts, the transitions since the previous computation and plots. "
        "Definitions and the configuration file: docs/segments.md.",
    )
    parser.add_argument(
        "--interactions",
        type=Path,
        nargs="+",
        action="extend",
        metavar="LOG",
        help=f"interaction logs (.csv or .parquet: {', '.join(LOG_COLUMNS)} [, price]) or "
        "folders of them; monetary value is value x price where a row has a price",
    )
    parser.add_argument(
        "--events",
        action="store_true",
        help="also read the event store's events (--store)",
    )
    parser.add_argument(
        "--items",
        type=Path,
        default=None,
        metavar="CATALOG",
        help="item catalog (.csv or .parquet, as for 'affinity train --items'): the profiles "
        "count each user's categories and item types by it (without one, the server maps "
        "each user's most used items with its model's catalog)",
    )
    parser.add_argument(
        "--store",
        metavar="URI",
        default=None,
        help="the event store the segments go to (and whose erasures apply); as for 'serve "
        "--events-uri'; default AFFINITY_EVENTS_URI or sqlite:///./events.db",
    )
    parser.add_argument(
        "--as-of",
        metavar="TIME",
        default=None,
        help="reference time, ISO-8601 (naive: UTC) or unix seconds; later events are left "
        "out (default: the newest event)",
    )
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        metavar="FILE",
        help=f"TOML file of stage windows, events and tier rules (default ${CONFIG_ENV}, "
        "else the built-in defaults; docs/segments.md)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        metavar="DIR",
        help="also write DIR/user_segments.parquet and DIR/transitions.csv",
    )
    parser.add_argument(
        "--experiment",
        default=DEFAULT_EXPERIMENT,
        help=f"MLflow experiment name (default {DEFAULT_EXPERIMENT})",
    )
    parser.add_argument(
        "--quarantine",
        type=Path,
        default=None,
        help="where to write the logs' malformed rows (default: beside the log, when any)",
    )
    parser.add_argument(
        "--json", action="store_true", help="print one JSON summary object on stdout"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    parser.set_defaults(func=cmd_segments)
