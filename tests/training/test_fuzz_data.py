"""Fuzz the interaction-log reader with generated, corrupted logs: bad encodings, wrong types,
missing columns, duplicated headers, huge fields, out-of-range timestamps and mixed CSV dialects.

Every log either loads with ``rows_read == rows_accepted + rows_quarantined`` (and the quarantine
file holding exactly the rejected rows) or fails with a :class:`DataError` that says what is
wrong; nothing else ever escapes. ``AFFINITY_FUZZ_EXAMPLES`` sets the examples per test.
"""

from __future__ import annotations

import csv
import gzip
import io
import os
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from models.errors import DataError
from training.data import LoadResult, load_interactions

EXAMPLES = int(os.environ.get("AFFINITY_FUZZ_EXAMPLES", "60"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
COLUMNS = ["user_id", "item_id", "event", "timestamp", "value"]

# Cells as bytes, so that encodings other than UTF-8 can be written.
good_cells = {
    "user_id": st.sampled_from([b"u1", b"u2", b"user-3", b" u4 "]),
    "item_id": st.sampled_from([b"i1", b"i2", b"item-3"]),
    "event": st.sampled_from([b"view", b"click", b"PURCHASE", b"rating"]),
    "timestamp": st.sampled_from([b"1704067200", b"2024-01-01T00:00:00", b"2024-01-01 10:00:00Z"]),
    "value": st.sampled_from([b"", b"1", b"2.5", b"4"]),
}
bad_cells = st.one_of(
    st.just(b""),
    st.sampled_from(
        [
            b"-1",
            b"nan",
            b"inf",
            b"-inf",
            b"1e400",
            b"99999999999999999999",
            b"-62135596800",
            b"0001-01-01",
            b"9999-12-31T23:59:59",
            b"2024-13-45",
            b"1704067200000",
            b"true",
            b"null",
            b"NULL",
            b"None",
            b"\x00",
            b"\xef\xbb\xbf",
            b"1,5",
            b"1;5",
        ]
    ),
    st.text(max_size=20).map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.text(max_size=10).map(lambda t: t.encode("utf-16")),
    st.binary(max_size=20),  # mostly invalid UTF-8
    st.sampled_from(["café", "naïve", "Zürich"]).map(lambda t: t.encode("latin-1")),
    st.builds(lambda b, n: b * n, st.sampled_from([b"x", b"\xe2\x82\xac"]), st.integers(1, 60_000)),
)


@st.composite
def csv_logs(draw: st.DrawFn) -> tuple[bytes, str]:
    """A CSV/TSV log as bytes (possibly gzipped) and its file name."""
    delimiter = draw(st.sampled_from([b",", b"\t", b";", b"|"]))
    suffix = {b",": ".csv", b"\t": ".tsv"}.get(delimiter, draw(st.sampled_from([".csv", ".tsv"])))
    header = draw(
        st.one_of(
            st.permutations(COLUMNS),
            st.lists(st.sampled_from([*COLUMNS, "extra", ""]), min_size=0, max_size=7),
        )
    )
    header_line = delimiter.join(h.encode() for h in header)
    if draw(st.booleans()):
        header_line = b"\xef\xbb\xbf" + header_line  # byte-order mark
    newline = draw(st.sampled_from([b"\n", b"\r\n", b"\r"]))
    lines = [header_line]
    for _ in range(draw(st.integers(0, 12))):
        cells = [
            draw(st.one_of(good_cells.get(name, bad_cells), bad_cells))
            if draw(st.integers(0, 4)) == 0
            else draw(good_cells.get(name, bad_cells))
            for name in header
        ]
        extra = draw(st.integers(-2, 2))
        cells = cells[: len(cells) + extra] if extra < 0 else cells + [b"x"] * extra
        if draw(st.integers(0, 6)) == 0:
            cells = [b'"' + c.replace(b'"', b'""') + b'"' for c in cells]  # another quoting
        if draw(st.integers(0, 8)) == 0:
            lines.append(b"")  # blank line
        # A line ending of another dialect now and then.
        end = draw(st.sampled_from([newline, newline, newline, b"\r\n", b"\n"]))
        lines.append(delimiter.join(cells) + (end if end != newline else b""))
    body = newline.join(lines) + (newline if draw(st.booleans()) else b"")
    if draw(st.booleans()):
        return gzip.compress(body), suffix + ".gz"
    return body, suffix


def _check(path: Path) -> LoadResult | None:
    quarantine = path.with_suffix(".q.csv")
    try:
        result = load_interactions(path, quarantine_path=quarantine)
    except DataError as exc:
        message = str(exc)
        assert message and str(path) in message, message
        return None
    assert result.rows_read == result.rows_accepted + result.rows_quarantined
    assert result.rows_accepted == len(result.frame) > 0
    with open(quarantine, newline="", encoding="utf-8") as fh:
        rejected = list(csv.DictReader(fh))
    assert len(rejected) == result.rows_quarantined
    assert sum(result.reasons.values()) == result.rows_quarantined
    return result


@FUZZ
@given(log=csv_logs())
def test_corrupt_csv_logs_are_accounted_for_or_refused_clearly(log: tuple[bytes, str]) -> None:
    data, suffix = log
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"log{suffix}"
        path.write_bytes(data)
        _check(path)


@FUZZ
@given(
    rows=st.lists(
        st.tuples(
            st.sampled_from(["u1", "u2", "", " ", "\x00", "é" * 1000]),
            st.sampled_from(["i1", "i2", "", "\u202e"]),
            st.sampled_from(["view", "click", "bogus", ""]),
            st.sampled_from([b"1704067200", b"2024-01-01", b"x", b"", b"\xff\xfe"]),
        ),
        min_size=1,
        max_size=10,
    ),
    bad_row=st.binary(min_size=1, max_size=30),
    position=st.integers(0, 10),
)
def test_well_framed_csv_counts_every_row(
    rows: list[tuple[str, str, str, bytes]], bad_row: bytes, position: int
) -> None:
    # Framing is controlled here (no delimiters, quotes or newlines in cells) so the number of
    # rows is known: every one must be read, and land in the frame or the quarantine.
    body = io.BytesIO()
    body.write(b"user_id,item_id,event,timestamp\n")
    lines = [b",".join([u.encode(), i.encode(), e.encode(), t]) for u, i, e, t in rows]
    clean = bad_row.translate(None, b',"\r\n') or b"?"
    lines.insert(min(position, len(lines)), clean + b",i1,view,1704067200")
    body.write(b"\n".join(lines) + b"\n")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "log.csv"
        path.write_bytes(body.getvalue())
        result = _check(path)
    if result is not None:
        # A line of empty cells only is blank: skipped, not a row.
        blank = sum(1 for line in lines if line.replace(b",", b"") == b"")
        assert result.rows_read == len(lines) - blank


parquet_columns = {
    "user_id": st.sampled_from(
        [pa.array(["u1", "u2", None]), pa.array([1, 2, 3]), pa.array([1.5, None, 3.0])]
    ),
    "item_id": st.sampled_from([pa.array(["i1", "", "i3"]), pa.array([True, False, None])]),
    "event": st.sampled_from(
        [pa.array(["view", "CLICK", "nope"]), pa.array([1, 2, 3]), pa.array([None, None, None])]
    ),
    "timestamp": st.sampled_from(
        [
            pa.array([1704067200, -5, 10**15]),
            pa.array([1.7e9, float("nan"), float("inf")]),
            pa.array(["2024-01-01", "garbage", "9999-12-31T23:59:59"]),
            pa.array([0, 1, 2], type=pa.timestamp("ns")),
            pa.array([None, None, None], type=pa.timestamp("s")),
            pa.array([19000, 19001, None], type=pa.date32()),
        ]
    ),
    "value": st.sampled_from(
        [
            pa.array([1.0, -1.0, float("nan")]),
            pa.array(["1", "x", ""]),
            pa.array([None, 2, 3]),
            pa.array([b"\xff", b"1", b"2"]),
        ]
    ),
}


@FUZZ
@given(
    columns=st.fixed_dictionaries({}, optional=parquet_columns),
    dictionary=st.booleans(),
)
def test_parquet_with_wrong_types_and_missing_columns(
    columns: dict[str, pa.Array], dictionary: bool
) -> None:
    arrays = {
        name: col.dictionary_encode() if dictionary and pa.types.is_string(col.type) else col
        for name, col in columns.items()
    }
    table = pa.table(arrays) if arrays else pa.table({"other": pa.array([1, 2, 3])})
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "log.parquet"
        pq.write_table(table, path)
        result = _check(path)
    if result is not None:
        assert result.rows_read == table.num_rows


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (b"", "empty"),
        (b"user_id,user_id,item_id,event,timestamp\nu,u,i,view,1\n", "duplicate"),
        (b"user_id,item_id,timestamp\nu,i,1\n", "event"),
        (b"user_id,item_id,event,timestamp\n", "no data rows"),
        (b"user_id,item_id,event,timestamp\n,,bogus,x\n", "no valid rows"),
        (b"\xff\xfe\x00u\x00s\x00e\x00r", "cannot read"),
    ],
)
def test_nothing_usable_gives_a_clear_message(tmp_path: Path, data: bytes, words: str) -> None:
    path = tmp_path / "log.csv"
    path.write_bytes(data)
    with pytest.raises(DataError, match=words):
        load_interactions(path, quarantine_path=tmp_path / "q.csv")
