"""Read interaction logs and item catalogs into validated frames, quarantining unusable rows.

A log is Parquet or CSV with ``user_id``, ``item_id``, ``event``, ``timestamp`` and an optional
``value``; a training run may read several (a directory of them, or a list), each validated alike.
Every row that cannot be used is written to a quarantine CSV with its line number and reason, so
``rows_read == rows_accepted + rows_quarantined`` always holds and nothing is lost silently (plus
``rows_erased`` when erased users' rows are dropped, see :func:`load_interactions`).
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import logging
import math
import tempfile
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from pandas.api.types import union_categoricals
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from models.artifact import ITEM_TYPES, ItemCatalog
from models.errors import DataError, InvalidInputError

logger = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("user_id", "item_id", "event", "timestamp")
"""Columns every interaction log must have."""
LOG_COLUMNS = (*REQUIRED_COLUMNS, "value")
"""Columns read from a log; any other column is ignored."""
FRAME_COLUMNS = ("user_id", "item_id", "event", "timestamp", "value", "weight")
"""Columns of :attr:`LoadResult.frame`, in order."""
QUARANTINE_COLUMNS = ("line", "reason", *LOG_COLUMNS, "raw")
"""Columns of the quarantine CSV; ``raw`` holds the row's text when it had the wrong field count."""

MAX_TIMESTAMP = 10_000_000_000
"""Unix seconds beyond this (year 2286) are rejected: almost always milliseconds, not seconds."""

_PARQUET_SUFFIXES = (".parquet", ".pq")
_CSV_SUFFIXES = {".csv": ",", ".csv.gz": ",", ".tsv": "\t", ".tsv.gz": "\t"}

# Reasons in precedence order: a row with several problems is quarantined under the first one.
REASONS = (
    "wrong_field_count",
    "missing_user_id",
    "missing_item_id",
    "unknown_event",
    "bad_timestamp",
    "timestamp_out_of_range",
    "bad_value",
    "negative_value",
    "non_finite_value",
)
_CODE = {name: code for code, name in enumerate(REASONS, start=1)}


class EventWeights(BaseModel):
    """How much one event of each kind counts; ``weight = event weight * value``.

    Extra keyword arguments declare new event names, e.g. ``EventWeights(bookmark=3)``. Names are
    matched case-insensitively after stripping whitespace. A weight of 0 accepts the event but
    lets it contribute nothing.
    """

    model_config = ConfigDict(extra="allow", frozen=True)

    view: float = Field(default=1.0, ge=0, allow_inf_nan=False)
    """A user saw the item."""
    click: float = Field(default=2.0, ge=0, allow_inf_nan=False)
    """A user opened the item."""
    like: float = Field(default=4.0, ge=0, allow_inf_nan=False)
    """A user liked the item (mostly content)."""
    share: float = Field(default=4.0, ge=0, allow_inf_nan=False)
    """A user shared the item (mostly content)."""
    add_to_cart: float = Field(default=6.0, ge=0, allow_inf_nan=False)
    """A user put the product in the cart."""
    purchase: float = Field(default=10.0, ge=0, allow_inf_nan=False)
    """A user bought the product."""

    @model_validator(mode="before")
    @classmethod
    def _normalize(cls, data: Any) -> Any:
        if not isinstance(data, Mapping):
            return data
        out: dict[str, float] = {}
        for key, raw in data.items():
            name = str(key).strip().lower()
            if not name:
                raise ValueError("event names must not be empty")
            try:
                weight = float(raw)
            except (TypeError, ValueError):
                raise ValueError(
                    f"weight of event {name!r} must be a number, got {raw!r}"
                ) from None
            if not math.isfinite(weight) or weight < 0:
                raise ValueError(f"weight of event {name!r} must be finite and >= 0, got {raw!r}")
            out[name] = weight
        return out

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, float] | EventWeights | None) -> EventWeights:
        """Defaults overridden (or extended) by ``mapping``; raises ``InvalidInputError``."""
        if isinstance(mapping, EventWeights):
            return mapping
        try:
            return cls(**{str(k): v for k, v in (mapping or {}).items()})
        except ValidationError as exc:
            msg = "; ".join(str(e["msg"]) for e in exc.errors())
            raise InvalidInputError(
                f"invalid event weights: {msg}", field="event_weights"
            ) from None

    def as_dict(self) -> dict[str, float]:
        """Every event name and its weight, defaults first."""
        return {name: float(weight) for name, weight in self.model_dump().items()}


@dataclass
class LoadResult:
    """The accepted interactions plus an account of what was rejected.

    ``frame`` has columns ``user_id`` (str), ``item_id`` (str), ``event`` (str, lower case),
    ``timestamp`` (int64 unix seconds, UTC), ``value`` (float64, 1.0 where absent) and ``weight``
    (float64, event weight * value), in source order with a fresh ``RangeIndex``.
    """

    frame: pd.DataFrame
    rows_read: int
    rows_accepted: int
    rows_quarantined: int
    reasons: Counter[str] = field(default_factory=Counter)
    quarantine_path: Path | None = None
    source: Path | None = None
    """The log read, when it was one file."""
    rows_erased: int = 0
    """Rows of erased users dropped (see ``load_interactions(erasures=...)``): with them,
    ``rows_read == rows_accepted + rows_quarantined + rows_erased``."""
    sources: tuple[Path, ...] = ()
    """Every log file read, in order."""


# --------------------------------------------------------------------------------------------
# Reading


def _csv_delimiter(path: Path) -> str | None:
    name = path.name.lower()
    for suffix, delimiter in _CSV_SUFFIXES.items():
        if name.endswith(suffix):
            return delimiter
    return None


def _is_parquet(path: Path) -> bool:
    return path.name.lower().endswith(_PARQUET_SUFFIXES)


def _check_format(path: Path) -> None:
    if not path.exists():
        raise DataError(f"{path} does not exist")
    if not path.is_file():
        raise DataError(f"{path} is not a file")
    if not _is_parquet(path) and _csv_delimiter(path) is None:
        raise DataError(
            f"{path}: unsupported file type; use .parquet/.pq or .csv/.csv.gz/.tsv/.tsv.gz"
        )


def _read_csv_header(path: Path, delimiter: str) -> list[str]:
    opener: Any = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8-sig", newline="") as fh:
            header = next(csv.reader(fh, delimiter=delimiter), None)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc
    if not header:
        raise DataError(f"{path} is empty: expected a header line with column names")
    names = [name.strip() for name in header]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise DataError(f"{path}: duplicate column names {', '.join(duplicates)}")
    return names


def _read_csv_table(
    path: Path, names: list[str], delimiter: str, *, threads: bool
) -> tuple[pa.Table, list[tuple[int | None, str]]]:
    """All columns as text; rows with the wrong number of fields are collected, not dropped."""
    bad: list[tuple[int | None, str]] = []

    def on_invalid(row: Any) -> str:
        bad.append((row.number, row.text))
        return "skip"

    try:
        table = pacsv.read_csv(
            path,
            read_options=pacsv.ReadOptions(use_threads=threads, column_names=names, skip_rows=1),
            parse_options=pacsv.ParseOptions(
                delimiter=delimiter,
                invalid_row_handler=on_invalid,
                # Keep blank lines as rows so record numbers match the file; they are skipped
                # later without being counted.
                ignore_empty_lines=False,
                newlines_in_values=True,
            ),
            convert_options=pacsv.ConvertOptions(
                column_types=dict.fromkeys(names, pa.string()),
                include_columns=[n for n in names if n in LOG_COLUMNS],
                null_values=[],
                strings_can_be_null=False,
                quoted_strings_can_be_null=False,
            ),
        )
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc
    return table, bad


def _text(column: pa.ChunkedArray | pa.Array) -> pd.Series:
    """A column as stripped text with nulls as ''; integral floats print without '.0'."""
    typ = column.type
    if pa.types.is_dictionary(typ):
        column = column.cast(typ.value_type)
        typ = column.type
    if pa.types.is_floating(typ):
        values = column.to_numpy(zero_copy_only=False).astype(np.float64)
        out = np.full(len(values), "", dtype=object)
        finite = np.isfinite(values)
        integral = finite & (np.floor(values) == values) & (np.abs(values) < 2**53)
        out[integral] = values[integral].astype(np.int64).astype(str)
        other = finite & ~integral | np.isinf(values)
        out[other] = values[other].astype(str)
        return pd.Series(out, dtype="str")
    try:
        as_str = column.cast(pa.string())
    except (pa.ArrowException, NotImplementedError) as exc:
        raise DataError(f"a column of type {typ} cannot be read as text: {exc}") from exc
    return pd.Series(as_str.to_pandas(), dtype="str").fillna("").str.strip()


def _categorical_text(column: pa.ChunkedArray) -> pd.Series:
    """A column as a categorical of what :func:`_text` gives, each distinct value handled once.

    Parquet logs usually store ids dictionary-encoded, so this reads the distinct values and
    the integer indices without making a Python string per row. Categories are the sorted
    distinct texts (stripped; '' stands for null), possibly including ones no row uses.
    """
    if not pa.types.is_dictionary(column.type):
        column = column.dictionary_encode()
    array = pa.chunked_array(column.chunks, type=column.type).combine_chunks()
    texts = _text(array.dictionary)
    n = len(texts)
    # A null index and a null dictionary value both read as '' (appended after the values).
    indices = array.indices.fill_null(n).to_numpy(zero_copy_only=False)
    texts = pd.concat([texts, pd.Series([""], dtype="str")], ignore_index=True)
    text_code, categories = pd.factorize(texts, sort=True)
    codes = text_code.astype(np.int32)[indices]
    return pd.Series(pd.Categorical.from_codes(codes, categories=pd.Index(categories, dtype="str")))


def _map_categories(column: pd.Series, func: Any) -> pd.Series:
    """A categorical with ``func`` applied to each category (merging ones that become equal)."""
    mapped = func(pd.Series(column.cat.categories, dtype="str"))
    new_code, categories = pd.factorize(mapped, sort=True)
    codes = np.append(new_code, -1).astype(np.int32)[column.cat.codes.to_numpy()]
    return pd.Series(pd.Categorical.from_codes(codes, categories=pd.Index(categories, dtype="str")))


def _read_parquet(path: Path, *, categorical: bool = False) -> tuple[dict[str, Any], pa.Table]:
    try:
        schema = pq.read_schema(path)
        _require_columns(path, list(schema.names))
        present = [n for n in LOG_COLUMNS if n in schema.names]
        table = pq.read_table(path, columns=present)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc
    cols: dict[str, Any] = {}
    for name in present:
        column = table.column(name)
        typ = column.type
        if name == "timestamp" and (
            pa.types.is_timestamp(typ) or pa.types.is_date(typ) or _numeric(typ)
        ):
            cols[name] = _typed_seconds(column)
        elif name == "value" and _numeric(typ):
            cols[name] = column.to_numpy(zero_copy_only=False).astype(np.float64)
        elif categorical and name in _CATEGORICAL_COLUMNS:
            try:
                cols[name] = _categorical_text(column)
            except DataError as exc:
                raise DataError(f"{path}: column {name!r}: {exc}") from None
        else:
            try:
                cols[name] = _text(column)
            except DataError as exc:
                raise DataError(f"{path}: column {name!r}: {exc}") from None
    return cols, table


_CATEGORICAL_COLUMNS = ("user_id", "item_id", "event")
"""Text columns that ``load_interactions(categorical=True)`` returns as categoricals."""


def _numeric(typ: pa.DataType) -> bool:
    return bool(pa.types.is_integer(typ) or pa.types.is_floating(typ))


def _typed_seconds(column: pa.ChunkedArray) -> np.ndarray:
    """Unix seconds as float64 (NaN for nulls) from a timestamp, date or numeric column."""
    typ = column.type
    if pa.types.is_date(typ):
        column = column.cast(pa.timestamp("s"))
        typ = column.type
    if pa.types.is_timestamp(typ):
        per_second = {"s": 1, "ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000}[typ.unit]
        nulls = np.asarray(column.is_null().to_numpy(zero_copy_only=False), dtype=bool)
        ticks = column.cast(pa.int64()).fill_null(0).to_numpy(zero_copy_only=False)
        seconds = np.floor_divide(ticks, per_second).astype(np.float64)
        seconds[nulls] = np.nan
        return seconds
    return column.to_numpy(zero_copy_only=False).astype(np.float64)


def _require_columns(path: Path, names: list[str]) -> None:
    missing = [c for c in REQUIRED_COLUMNS if c not in names]
    if missing:
        raise DataError(
            f"{path} lacks required column(s) {', '.join(missing)}; "
            f"found {', '.join(names) or 'none'} (expected {', '.join(REQUIRED_COLUMNS)}"
            f" and optionally value)",
            field=missing[0],
        )


# --------------------------------------------------------------------------------------------
# Parsing and validation (vectorized)

_NUMBER = r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?"
_NON_FINITE = r"[+-]?(?:inf|infinity|nan)"
_UNIX_SECONDS = r"[+-]?\d+(?:\.\d*)?"
_ZONE_SUFFIX = r"(?:[zZ]|[+-]\d\d:?\d\d)$"
_CHUNK = 200_000


def _mask(result: pd.Series) -> np.ndarray:
    return result.to_numpy(dtype=bool, na_value=False)


def _cast_float(text: pd.Series) -> np.ndarray:
    """Text that already matched a number pattern as float64 (arrow's parser: fast)."""
    return pa.array(text).cast(pa.float64()).to_numpy(zero_copy_only=False)


def _iso_seconds(text: pd.Series) -> np.ndarray:
    """ISO-8601 text to unix seconds (NaN if unparsable); naive times are taken as UTC.

    Arrow parses clean chunks quickly; a chunk it rejects falls back to pandas, which also
    accepts rarer ISO forms and marks only the bad strings.
    """
    out = np.full(len(text), np.nan, dtype=np.float64)
    zoned = _mask(text.str.contains(_ZONE_SUFFIX, regex=True))
    for lo in range(0, len(text), _CHUNK):
        hi = min(lo + _CHUNK, len(text))
        chunk = text.iloc[lo:hi]
        part = out[lo:hi]
        try:
            for sel, typ in (
                (zoned[lo:hi], pa.timestamp("us", tz="UTC")),
                (~zoned[lo:hi], pa.timestamp("us")),
            ):
                if sel.any():
                    micros = pa.array(chunk[sel]).cast(typ).cast(pa.int64())
                    part[sel] = np.floor_divide(micros.to_numpy(zero_copy_only=False), 1_000_000)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            parsed = pd.to_datetime(chunk, format="ISO8601", utc=True, errors="coerce")
            # Not ``parsed - Timestamp(0)``: that converts to nanoseconds and raises for years
            # past 2262 instead of letting the range check quarantine the row.
            micros = parsed.dt.tz_localize(None).to_numpy(dtype="datetime64[us]")
            valid = ~np.isnat(micros)
            part[:] = np.nan
            part[valid] = np.floor_divide(micros[valid].astype(np.int64), 1_000_000)
    return out


def _parse_timestamp(column: pd.Series | np.ndarray) -> np.ndarray:
    """Unix seconds as float64 (NaN where unparsable) from text or already-typed seconds."""
    if isinstance(column, np.ndarray):
        return column
    text = column.str.strip()
    seconds = np.full(len(text), np.nan, dtype=np.float64)
    numeric = _mask(text.str.fullmatch(_UNIX_SECONDS))
    if numeric.any():
        seconds[numeric] = _cast_float(text[numeric])
    other = ~numeric & _mask(text != "")
    if other.any():
        seconds[other] = _iso_seconds(text[other])
    return seconds


def _parse_value(column: pd.Series | np.ndarray | None, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(values, reason codes): absent or empty values count as 1.0."""
    codes = np.zeros(n, dtype=np.int8)
    if column is None:
        return np.ones(n), codes
    if isinstance(column, np.ndarray):
        values = column.astype(np.float64, copy=True)
        values[np.isnan(values)] = 1.0
    else:
        text = column.str.strip().str.lower()
        values = np.ones(n, dtype=np.float64)
        number = _mask(text.str.fullmatch(_NUMBER)) | _mask(text.str.fullmatch(_NON_FINITE))
        if number.any():
            values[number] = _cast_float(text[number])
        codes[~number & _mask(text != "")] = _CODE["bad_value"]
    with np.errstate(invalid="ignore"):
        codes[~np.isfinite(values) & (codes == 0)] = _CODE["non_finite_value"]
        codes[(values < 0) & (codes == 0)] = _CODE["negative_value"]
    return values, codes


def _stripped(column: pd.Series) -> pd.Series:
    # Categoricals come from _categorical_text, whose categories are stripped already.
    return column if isinstance(column.dtype, pd.CategoricalDtype) else column.str.strip()


def _validate(cols: dict[str, Any], weights: EventWeights) -> tuple[pd.DataFrame, np.ndarray]:
    """Parse the columns; returns the parsed frame and a reason code per row (0 = accepted)."""
    n = len(cols["user_id"])
    user, item, event = (_stripped(cols[name]) for name in ("user_id", "item_id", "event"))
    if isinstance(event.dtype, pd.CategoricalDtype):
        event = _map_categories(event, lambda text: text.str.lower())
    else:
        event = event.str.lower()
    table = weights.as_dict()
    # Factorize first: mapping the few distinct names is much cheaper than a per-row lookup.
    if isinstance(event.dtype, pd.CategoricalDtype):
        codes_seen, names_seen = event.cat.codes.to_numpy(), event.cat.categories
    else:
        codes_seen, names_seen = pd.factorize(event)
    known = {name: k for k, name in enumerate(table)}
    lookup = np.array([known.get(str(name), -1) for name in names_seen] + [-1], dtype=np.int64)
    event_codes = lookup[codes_seen]
    seconds = _parse_timestamp(cols["timestamp"])
    values, value_codes = _parse_value(cols.get("value"), n)

    with np.errstate(invalid="ignore"):
        checks = [
            ("missing_user_id", (user == "").to_numpy(dtype=bool, na_value=True)),
            ("missing_item_id", (item == "").to_numpy(dtype=bool, na_value=True)),
            ("unknown_event", event_codes < 0),
            ("bad_timestamp", np.isnan(seconds)),
            ("timestamp_out_of_range", (seconds < 0) | (seconds >= MAX_TIMESTAMP)),
        ]
    codes = value_codes.copy()
    # Apply in reverse precedence so the first failing check is the one that sticks.
    for name, mask in reversed(checks):
        codes[mask] = _CODE[name]

    event_weight = np.asarray(list(table.values()), dtype=np.float64)
    frame = pd.DataFrame(
        {
            "user_id": user,
            "item_id": item,
            "event": event,
            # Rows outside int64 (inf, 1e20) are quarantined anyway; 0 keeps the cast defined.
            "timestamp": np.floor(
                np.where(np.abs(seconds) < 2.0**62, seconds, 0.0)  # NaN fails the test too
            ).astype(np.int64),
            "value": values,
            "weight": event_weight[np.maximum(event_codes, 0)] * values,
        },
        copy=False,  # the columns are fresh: a dict of them would otherwise be copied
    )
    return frame, codes


def _source_text(cols: dict[str, Any], table: pa.Table | None, rows: np.ndarray) -> pd.DataFrame:
    """The original fields of ``rows`` as text, for the quarantine file."""
    out: dict[str, Any] = {}
    for name in LOG_COLUMNS:
        if name not in cols:
            out[name] = [""] * len(rows)
        elif table is not None:
            out[name] = _text(table.column(name).take(pa.array(rows, pa.int64()))).tolist()
        else:
            out[name] = cols[name].iloc[rows].tolist()
    return pd.DataFrame(out)


def _default_quarantine_path(source: Path) -> Path:
    return source.with_name(source.name + ".quarantine.csv")


def _write_quarantine(path: Path, rejected: pd.DataFrame, columns: list[str]) -> Path:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        rejected.to_csv(path, index=False, columns=columns)
    except OSError as exc:
        raise DataError(f"cannot write the quarantine file {path}: {exc}") from exc
    return path


InteractionInputs = str | Path | Sequence[str | Path]
"""What :func:`load_interactions` reads: a log file, a directory of logs, or several of those."""

Erasures = Mapping[str, datetime | float]
"""Erased users and when (an aware datetime, naive meaning UTC, or unix seconds)."""


def log_files(inputs: InteractionInputs) -> list[Path]:
    """The log files ``inputs`` names, in order.

    A file is itself; a directory stands for every log file under it (``.parquet``/``.pq``,
    ``.csv``/``.csv.gz``/``.tsv``/``.tsv.gz``, sorted by path, so a hive-partitioned export such
    as ``affinity events export`` writes is one input), skipping names that start with ``.`` or
    ``_`` (as Spark and pyarrow do) and ``*.quarantine.csv`` files. A file named twice is read
    once. Raises :class:`DataError` when nothing is named or a directory holds no log.
    """
    items = [inputs] if isinstance(inputs, str | Path) else list(inputs)
    if not items:
        raise DataError("no interaction log given")
    files: dict[Path, Path] = {}
    for item in items:
        path = Path(item)
        if path.is_dir():
            found = sorted(
                f
                for f in path.rglob("*")
                if f.is_file() and _is_log_file(f) and not _hidden(f.relative_to(path))
            )
            if not found:
                raise DataError(
                    f"{path} holds no interaction log (.parquet/.pq or .csv/.csv.gz/.tsv/.tsv.gz)"
                )
        else:
            found = [path]
        for f in found:
            files.setdefault(f.resolve(), f)
    return list(files.values())


def _is_log_file(path: Path) -> bool:
    if path.name.lower().endswith(".quarantine.csv"):
        return False
    return _is_parquet(path) or _csv_delimiter(path) is not None


def _hidden(relative: Path) -> bool:
    return any(part.startswith((".", "_")) for part in relative.parts)


def _erasure_cutoffs(erasures: Erasures | None) -> dict[str, float]:
    """Each erased user's erasure time in unix seconds."""
    cutoffs: dict[str, float] = {}
    for user, when in (erasures or {}).items():
        if isinstance(when, datetime):
            aware = when if when.tzinfo is not None else when.replace(tzinfo=UTC)
            cutoffs[str(user)] = aware.timestamp()
        else:
            cutoffs[str(user)] = float(when)
    return cutoffs


def _erased_rows(frame: pd.DataFrame, cutoffs: dict[str, float]) -> np.ndarray:
    """Rows of an erased user at or before the erasure; a row whose timestamp cannot be read
    counts as before (it cannot be shown to come after)."""
    users = frame["user_id"]
    if isinstance(users.dtype, pd.CategoricalDtype):
        per_category = np.array(
            [cutoffs.get(str(name), np.nan) for name in users.cat.categories] + [np.nan]
        )
        limit = per_category[users.cat.codes.to_numpy()]  # code -1 (no value) -> NaN
    else:
        limit = users.map(cutoffs).to_numpy(dtype=np.float64, na_value=np.nan)
    # _validate put 0 where the timestamp did not parse, so those rows compare as before.
    with np.errstate(invalid="ignore"):
        return ~np.isnan(limit) & (frame["timestamp"].to_numpy(dtype=np.float64) <= limit)


def _mentions_user(raw: str, delimiter: str, users: dict[str, float]) -> bool:
    """Whether a row with the wrong field count names an erased user in any field."""
    fields = next(csv.reader([raw], delimiter=delimiter), [])
    return any(value.strip() in users for value in fields)


@dataclass
class _Part:
    """One log file, read and validated (see :func:`_read_log`)."""

    source: Path
    accepted: pd.DataFrame
    rejected: pd.DataFrame
    """The quarantined rows (:data:`QUARANTINE_COLUMNS`), by line."""
    rows_read: int
    rows_erased: int
    reasons: Counter[str]


def _read_log(
    source: Path, weights: EventWeights, *, categorical: bool, cutoffs: dict[str, float]
) -> _Part:
    """Read and validate one log file; its erased rows are counted and left out."""
    _check_format(source)
    table: pa.Table | None
    ragged: list[tuple[int | None, str]] = []
    delimiter: str | None = None
    if _is_parquet(source):
        cols, table = _read_parquet(source, categorical=categorical)
        lines = np.arange(1, table.num_rows + 1, dtype=np.int64)
        blank = np.zeros(table.num_rows, dtype=bool)
    else:
        delimiter = _csv_delimiter(source)
        assert delimiter is not None
        names = _read_csv_header(source, delimiter)
        _require_columns(source, names)
        csv_table, ragged = _read_csv_table(source, names, delimiter, threads=True)
        if ragged:
            # Record numbers are only known single-threaded; pay for that only when needed.
            csv_table, ragged = _read_csv_table(source, names, delimiter, threads=False)
        table = None
        cols = {name: csv_table.column(name).to_pandas() for name in csv_table.column_names}
        cols = {name: pd.Series(col, dtype="str") for name, col in cols.items()}
        n_records = csv_table.num_rows + len(ragged)
        bad_numbers = np.array([num for num, _ in ragged if num is not None], dtype=np.int64)
        lines = np.arange(2, n_records + 2, dtype=np.int64)
        if len(bad_numbers):
            parsed_row = np.ones(n_records, dtype=bool)
            parsed_row[bad_numbers - 2] = False
            lines = lines[parsed_row]
        blank = np.ones(csv_table.num_rows, dtype=bool)
        for col in cols.values():
            blank &= (col == "").to_numpy(dtype=bool)
        if blank.any():
            keep = ~blank
            cols = {name: col[keep].reset_index(drop=True) for name, col in cols.items()}
            lines = lines[keep]
            logger.info("%s: skipped %d blank line(s)", source, int(blank.sum()))

    frame, codes = _validate(cols, weights)
    rows_read = len(frame) + len(ragged)
    erased = _erased_rows(frame, cutoffs) if cutoffs else np.zeros(len(frame), dtype=bool)
    if cutoffs and ragged:
        assert delimiter is not None
        kept = [row for row in ragged if not _mentions_user(row[1], delimiter, cutoffs)]
        rows_erased = int(erased.sum()) + len(ragged) - len(kept)
        ragged = kept
    else:
        rows_erased = int(erased.sum())
    bad_rows = np.flatnonzero((codes != 0) & ~erased)
    rejected = _source_text(cols, table, bad_rows)
    rejected.insert(0, "line", lines[bad_rows])
    rejected.insert(1, "reason", np.asarray(REASONS, dtype=object)[codes[bad_rows] - 1])
    rejected["raw"] = ""
    if ragged:
        extra = pd.DataFrame(
            {
                "line": [num if num is not None else 0 for num, _ in ragged],
                "reason": "wrong_field_count",
                "raw": [text for _, text in ragged],
            }
        )
        rejected = pd.concat([rejected, extra], ignore_index=True).fillna("")
    rejected = rejected.sort_values("line", kind="stable").reset_index(drop=True)

    accepted = frame[(codes == 0) & ~erased].reset_index(drop=True)
    if categorical:  # a CSV log's columns are still text
        for name in _CATEGORICAL_COLUMNS:
            if not isinstance(accepted[name].dtype, pd.CategoricalDtype):
                accepted[name] = pd.Categorical(accepted[name].astype("str"))
    reasons: Counter[str] = Counter(
        {str(reason): int(count) for reason, count in rejected["reason"].value_counts().items()}
    )
    part = _Part(source, accepted, rejected, rows_read, rows_erased, reasons)
    assert part.rows_read == len(accepted) + len(rejected) + part.rows_erased
    return part


def _combined(frames: list[pd.DataFrame], categorical: bool) -> pd.DataFrame:
    """The accepted rows of several logs, in order; categoricals over the union of values."""
    if len(frames) == 1:
        return frames[0]
    if not categorical:
        return pd.concat(frames, ignore_index=True)
    columns: dict[str, Any] = {}
    for name in FRAME_COLUMNS:
        if name in _CATEGORICAL_COLUMNS:
            union = union_categoricals([f[name] for f in frames], sort_categories=True)
            columns[name] = pd.Series(union)
        else:
            columns[name] = np.concatenate([f[name].to_numpy() for f in frames])
    return pd.DataFrame(columns, copy=False)


def _check_rows(part: _Part, written: Path | None) -> None:
    if part.rows_read == 0:
        raise DataError(f"{part.source} has a header but no data rows")
    if len(part.accepted) == 0 and part.rows_erased == 0:
        top = ", ".join(f"{reason} {count}" for reason, count in part.reasons.most_common(3))
        raise DataError(
            f"{part.source} has no valid rows: all {len(part.rejected)} rows were quarantined "
            f"({top}); see {written}"
        )


def load_interactions(
    path: InteractionInputs,
    *,
    event_weights: EventWeights | Mapping[str, float] | None = None,
    quarantine_path: str | Path | None = None,
    categorical: bool = False,
    erasures: Erasures | None = None,
) -> LoadResult:
    """Read, validate and weight an interaction log, or several (see :func:`log_files`).

    ``timestamp`` may be ISO-8601 (naive means UTC) or unix seconds; the result holds int64 unix
    seconds. Malformed rows go to ``quarantine_path`` (a CSV with ``line``, ``reason``, the
    original fields as text, and ``raw`` for rows with the wrong number of fields); ``line`` is
    the 1-based record number in a CSV file (the header is line 1, blank lines count but are not
    rows) or the 1-based row index in a Parquet file. When ``quarantine_path`` is given the file
    is always written (header only if nothing was rejected); when it is None a file named
    ``<log>.quarantine.csv`` is written beside the log (or in the temp directory if that is
    read-only) only if some row was rejected. A row with several problems is quarantined under
    the first reason in :data:`REASONS`. Ids and event names are stripped of surrounding
    whitespace and event names lower-cased; an empty ``value`` means 1.0.

    Several files (a directory, or a list) are each read and validated exactly as one file is,
    and their accepted rows concatenated in order. Their quarantine is one file with a last
    column ``file`` naming the log each row came from (``line`` counts within that file); by
    default it lies beside the first input named. Each file must have a valid row, as a single
    log must.

    ``erasures`` (user id -> when the user was erased) drops every row of an erased user whose
    timestamp is at or before the erasure, valid or not (a row whose timestamp cannot be read,
    and a row with the wrong field count naming the user, are dropped too): they are counted in
    ``rows_erased`` and written nowhere, the quarantine included.

    With ``categorical``, ``user_id``, ``item_id`` and ``event`` come back as pandas
    categoricals of the same text (sorted categories, which may include values of rejected
    rows), as :func:`with_categorical_ids` would make them; a Parquet log is then read without
    a Python string per row (each distinct value is parsed once).

    Raises :class:`DataError` for a missing, unreadable or unsupported file, a missing required
    column, or a log without a single valid row.
    """
    files = log_files(path)
    weights = EventWeights.from_mapping(event_weights)
    cutoffs = _erasure_cutoffs(erasures)
    parts = [_read_log(f, weights, categorical=categorical, cutoffs=cutoffs) for f in files]
    several = len(parts) > 1
    columns = list(QUARANTINE_COLUMNS)
    if several:
        for part in parts:
            part.rejected["file"] = str(part.source)
        columns.append("file")
    rejected = pd.concat([p.rejected for p in parts], ignore_index=True) if several else None
    if rejected is None:
        rejected = parts[0].rejected
    written: Path | None = None
    if quarantine_path is not None:
        written = _write_quarantine(Path(quarantine_path), rejected, columns)
    elif len(rejected):
        first = Path(path) if isinstance(path, str | Path) else Path(next(iter(path)))
        default = _default_quarantine_path(first if several else parts[0].source)
        try:
            written = _write_quarantine(default, rejected, columns)
        except DataError:
            # Logs often sit in read-only places; losing the rejected rows would be worse.
            fallback = Path(tempfile.gettempdir()) / default.name
            logger.warning("%s is not writable; quarantine goes to %s", default.parent, fallback)
            written = _write_quarantine(fallback, rejected, columns)

    reasons: Counter[str] = Counter()
    for part in parts:
        reasons.update(part.reasons)
    result = LoadResult(
        frame=_combined([p.accepted for p in parts], categorical),
        rows_read=sum(p.rows_read for p in parts),
        rows_accepted=sum(len(p.accepted) for p in parts),
        rows_quarantined=len(rejected),
        reasons=reasons,
        quarantine_path=written,
        source=None if several else parts[0].source,
        rows_erased=sum(p.rows_erased for p in parts),
        sources=tuple(files),
    )
    assert result.rows_read == result.rows_accepted + result.rows_quarantined + result.rows_erased
    for part in parts:
        logger.log(
            logging.WARNING if len(part.rejected) else logging.INFO,
            "%s: read %d rows, accepted %d, quarantined %d%s%s",
            part.source,
            part.rows_read,
            len(part.accepted),
            len(part.rejected),
            f", dropped {part.rows_erased} of erased users" if part.rows_erased else "",
            f" ({dict(part.reasons)}; see {written})" if len(part.rejected) else "",
        )
    for part in parts:
        _check_rows(part, written)
    if result.rows_accepted == 0:
        raise DataError(
            f"no rows left to train on: all {result.rows_read} rows of "
            f"{', '.join(str(f) for f in files)} were quarantined ({result.rows_quarantined}) "
            f"or belong to erased users ({result.rows_erased})"
        )
    return result


# --------------------------------------------------------------------------------------------
# Item catalog

_TRUE = frozenset({"true", "1", "yes", "y", "t"})
_FALSE = frozenset({"false", "0", "no", "n", "f"})


def load_catalog(path: str | Path) -> pd.DataFrame:
    """Read an item catalog (Parquet or CSV): item_id, item_type, category, title, available,
    and optionally first_seen (or created_at): when the item appeared, ISO-8601 or unix seconds.

    ``item_id`` is required and must be unique and non-empty. ``item_type`` must be ``content``,
    ``product`` or empty (unknown), case-insensitive; ``available`` accepts true/false, 1/0,
    yes/no (empty means available). Missing optional columns get empty text / ``True``. A catalog
    is small and usually broken systematically, so any bad row raises :class:`DataError` naming
    the first offending lines instead of being quarantined.
    """
    source = Path(path)
    _check_format(source)
    if _is_parquet(source):
        try:
            table = pq.read_table(source)
        except (pa.ArrowException, OSError) as exc:
            raise DataError(f"cannot read {source}: {exc}") from exc
        raw = {name: _text(table.column(name)) for name in table.column_names}
        first_line = 1
    else:
        delimiter = _csv_delimiter(source)
        try:
            df = pd.read_csv(
                source,
                sep=delimiter,
                dtype=str,
                keep_default_na=False,
                skipinitialspace=True,
            )
        except (pd.errors.ParserError, pd.errors.EmptyDataError, OSError, ValueError) as exc:
            raise DataError(f"cannot read catalog {source}: {exc}") from exc
        raw = {str(name).strip(): df[name].astype("str").str.strip() for name in df.columns}
        first_line = 2
    if "item_id" not in raw:
        raise DataError(
            f"catalog {source} lacks required column item_id; found {', '.join(raw) or 'none'}",
            field="item_id",
        )
    n = len(raw["item_id"])
    blank = pd.Series([""] * n, dtype="str")
    item_id = raw["item_id"]
    item_type = raw.get("item_type", blank).str.lower()
    available_text = raw.get("available", blank).str.lower()

    def fail(what: str, mask: np.ndarray, values: pd.Series) -> None:
        rows = np.flatnonzero(mask)
        if len(rows):
            sample = ", ".join(f"line {r + first_line} ({values.iloc[r]!r})" for r in rows[:5])
            raise DataError(f"catalog {source}: {len(rows)} row(s) with {what}: {sample}")

    fail("an empty item_id", (item_id == "").to_numpy(dtype=bool), item_id)
    fail("a duplicate item_id", item_id.duplicated().to_numpy(dtype=bool), item_id)
    allowed = [*ITEM_TYPES, ""]
    fail(
        f"an item_type other than {' / '.join(ITEM_TYPES)}",
        ~item_type.isin(allowed).to_numpy(dtype=bool),
        item_type,
    )
    fail(
        "an available flag that is not true/false/1/0/yes/no",
        ~available_text.isin([*_TRUE, *_FALSE, ""]).to_numpy(dtype=bool),
        available_text,
    )
    catalog = pd.DataFrame(
        {
            "item_id": item_id,
            "item_type": item_type,
            "category": raw.get("category", blank),
            "title": raw.get("title", blank),
            "available": ~available_text.isin(_FALSE).to_numpy(dtype=bool),
        }
    )
    # When an item first appeared (its age for exploration): overrides the log's earliest event.
    created = next((name for name in ("first_seen", "created_at") if name in raw), None)
    if created is not None:
        text = raw[created]
        seconds = _parse_timestamp(text)
        fail(
            f"a {created} that is not a time (ISO-8601 or unix seconds)",
            np.isnan(seconds) & (text != "").to_numpy(dtype=bool),
            text,
        )
        catalog["first_seen"] = seconds
    logger.info(
        "%s: %d catalog items, %d unavailable", source, n, int((~catalog["available"]).sum())
    )
    return catalog


def catalog_arrays(item_ids: np.ndarray, catalog_df: pd.DataFrame | None) -> ItemCatalog:
    """Catalog metadata aligned with ``item_ids``; unknown items are available, type/category ''."""
    ids = np.asarray(item_ids).astype(str)
    n = len(ids)
    if catalog_df is None:
        return ItemCatalog.empty(n)
    index = pd.Index(catalog_df["item_id"].astype(str))
    pos = index.get_indexer(pd.Index(ids))
    found = pos >= 0
    missing = int(n - found.sum())
    if missing:
        logger.info("%d of %d items are not in the catalog; treated as available", missing, n)

    def aligned(column: str) -> np.ndarray:
        out = np.full(n, "", dtype=object)
        if column in catalog_df:
            out[found] = catalog_df[column].astype(str).to_numpy(dtype=object)[pos[found]]
        return out.astype(str)

    available = np.ones(n, dtype=bool)
    if "available" in catalog_df:
        available[found] = catalog_df["available"].to_numpy(dtype=bool)[pos[found]]
    first_seen = np.full(n, np.nan, dtype=np.float64)
    if "first_seen" in catalog_df:
        first_seen[found] = catalog_df["first_seen"].to_numpy(dtype=np.float64)[pos[found]]
    return ItemCatalog(
        item_type=aligned("item_type"),
        category=aligned("category"),
        title=aligned("title"),
        available=available,
        first_seen=first_seen,
    )


# --------------------------------------------------------------------------------------------
# Fingerprint


def dataset_fingerprint(frame: pd.DataFrame) -> str:
    """A sha256 hex digest of the accepted interactions, independent of row order.

    Each row of ``user_id, item_id, event, timestamp, value`` is hashed to 64 bits with pandas'
    stable row hash; the sorted hashes and the row count are fed to sha256. ``weight`` is left
    out on purpose: the same log weighted differently is the same dataset (event weights are
    logged as parameters). Digests are stable across runs and machines for one pandas version.
    """
    columns = ["user_id", "item_id", "event", "timestamp", "value"]
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise DataError(f"cannot fingerprint a frame without column(s) {', '.join(missing)}")
    canonical = pd.DataFrame(
        {
            "user_id": _hashable_text(frame["user_id"]),
            "item_id": _hashable_text(frame["item_id"]),
            "event": _hashable_text(frame["event"]),
            "timestamp": frame["timestamp"].to_numpy(dtype=np.int64),
            "value": frame["value"].to_numpy(dtype=np.float64),
        }
    )
    hashes = np.sort(pd.util.hash_pandas_object(canonical, index=False).to_numpy(dtype=np.uint64))
    digest = hashlib.sha256(b"affinity-interactions-v1\n")
    digest.update(f"{len(hashes)}\n".encode())
    digest.update(hashes.astype("<u8").tobytes())
    return digest.hexdigest()


def _hashable_text(column: pd.Series) -> pd.Series:
    # pandas hashes a categorical by its values (each distinct one once), so text categories
    # hash as the text itself would, without materializing a string per row.
    if isinstance(column.dtype, pd.CategoricalDtype) and pd.api.types.is_string_dtype(
        column.cat.categories.dtype
    ):
        return column
    return column.astype("str")


def with_categorical_ids(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with ``user_id`` and ``item_id`` as pandas categoricals (sorted categories).

    The rows and values are the same; splitting, building matrices and fingerprinting then work
    on integer codes instead of hashing the same millions of strings again at every step.
    """
    out = frame.copy(deep=False)
    for name in ("user_id", "item_id"):
        if not isinstance(out[name].dtype, pd.CategoricalDtype):
            out[name] = pd.Categorical(out[name].astype("str"))
    return out
