"""Interaction-log loading: validation, quarantine, formats, event weights, catalog, fingerprint."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from models.errors import DataError, InvalidInputError
from training.data import (
    FRAME_COLUMNS,
    QUARANTINE_COLUMNS,
    EventWeights,
    catalog_arrays,
    dataset_fingerprint,
    load_catalog,
    load_interactions,
    with_categorical_ids,
)

HEADER = "user_id,item_id,event,timestamp,value\n"
GOOD = "u1,i1,view,1704067200,1\n"
DATASETS = Path(__file__).resolve().parents[2] / "../shared/datasets"


def _write(tmp_path: Path, text: str, name: str = "log.csv") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _quarantine(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype=str, keep_default_na=False)


@pytest.mark.parametrize(
    ("row", "reason"),
    [
        (",i1,view,1704067200,1", "missing_user_id"),
        ("   ,i1,view,1704067200,1", "missing_user_id"),
        ("u2,,view,1704067200,1", "missing_item_id"),
        ("u2,i1,teleport,1704067200,1", "unknown_event"),
        ("u2,i1,,1704067200,1", "unknown_event"),
        ("u2,i1,view,yesterday,1", "bad_timestamp"),
        ("u2,i1,view,,1", "bad_timestamp"),
        ("u2,i1,view,2024-02-30T00:00:00Z,1", "bad_timestamp"),
        ("u2,i1,view,1704067200000,1", "timestamp_out_of_range"),
        ("u2,i1,view,1969-12-31T00:00:00Z,1", "timestamp_out_of_range"),
        ("u2,i1,view,1704067200,lots", "bad_value"),
        ("u2,i1,view,1704067200,-2", "negative_value"),
        ("u2,i1,view,1704067200,inf", "non_finite_value"),
        ("u2,i1,view,1704067200,NaN", "non_finite_value"),
        ("u2,i1,view,1704067200", "wrong_field_count"),
        ("u2,i1,view,1704067200,1,surplus", "wrong_field_count"),
    ],
)
def test_each_kind_of_bad_row_is_quarantined_with_line_and_reason(
    tmp_path: Path, row: str, reason: str
) -> None:
    log = _write(tmp_path, HEADER + GOOD + row + "\n" + "u3,i2,click,1704067300,2\n")
    qpath = tmp_path / "q.csv"
    result = load_interactions(log, quarantine_path=qpath)

    assert (result.rows_read, result.rows_accepted, result.rows_quarantined) == (3, 2, 1)
    assert result.reasons == {reason: 1}
    assert list(result.frame["user_id"]) == ["u1", "u3"]
    rejected = _quarantine(qpath)
    assert list(rejected.columns) == list(QUARANTINE_COLUMNS)
    assert rejected[["line", "reason"]].values.tolist() == [["3", reason]]
    # The original text survives: either as fields or, for ragged rows, as the raw line.
    text = rejected.iloc[0]
    if reason == "wrong_field_count":
        assert text["raw"] == row
    else:
        fields = row.split(",")
        assert text[["user_id", "item_id", "event", "timestamp", "value"]].tolist() == fields


def test_mixed_file_keeps_line_numbers_and_the_invariant(tmp_path: Path) -> None:
    lines = [
        HEADER.strip(),  # 1
        "u1,i1,view,1704067200,1",  # 2 ok
        "u1,i2,click,2024-01-01T00:00:00Z,",  # 3 ok, value absent -> 1
        "",  # 4 blank: skipped, still counted as a line
        "u2,i1,view,1704067200",  # 5 too few fields
        "u2,i3,purchase,1704067200,abc",  # 6 bad value
        '"u3","i4","like","1704067200","2"',  # 7 ok, quoted
        "u4,i1,view,1704067200,1,1",  # 8 too many fields
        "u5,,view,1704067200,1",  # 9 missing item
        "u6,i9,Share ,1704067201,1",  # 10 ok: event names ignore case and spaces
    ]
    log = _write(tmp_path, "\n".join(lines) + "\n")
    result = load_interactions(log, quarantine_path=tmp_path / "q.csv")

    assert result.rows_read == 8  # the blank line 4 is no row
    assert result.rows_accepted == 4
    assert result.rows_quarantined == 4
    assert result.rows_read == result.rows_accepted + result.rows_quarantined
    assert sum(result.reasons.values()) == result.rows_quarantined
    rejected = _quarantine(tmp_path / "q.csv")
    assert rejected["line"].astype(int).tolist() == [5, 6, 8, 9]
    assert rejected["reason"].tolist() == [
        "wrong_field_count",
        "bad_value",
        "wrong_field_count",
        "missing_item_id",
    ]
    assert result.frame["event"].tolist() == ["view", "click", "like", "share"]
    assert result.frame["user_id"].tolist() == ["u1", "u1", "u3", "u6"]


def test_blank_lines_are_skipped_not_counted(tmp_path: Path) -> None:
    log = _write(tmp_path, HEADER + GOOD + "\n\n" + "u1,i2,view,1704067200,1\n\n")
    result = load_interactions(log, quarantine_path=tmp_path / "q.csv")
    assert (result.rows_read, result.rows_accepted, result.rows_quarantined) == (2, 2, 0)


def test_frame_columns_and_types(tmp_path: Path) -> None:
    log = _write(tmp_path, HEADER + GOOD + "u2,i1,purchase,1704067260,3\n")
    frame = load_interactions(log).frame
    assert tuple(frame.columns) == FRAME_COLUMNS
    assert frame["timestamp"].dtype == np.int64
    assert frame["value"].dtype == np.float64
    assert frame["weight"].dtype == np.float64
    assert frame["user_id"].tolist() == ["u1", "u2"]
    assert frame["weight"].tolist() == [1.0, 30.0]


def test_value_column_is_optional_and_empty_cells_mean_one(tmp_path: Path) -> None:
    log = _write(tmp_path, "user_id,item_id,event,timestamp\nu1,i1,click,1704067200\n")
    frame = load_interactions(log).frame
    assert frame["value"].tolist() == [1.0]
    assert frame["weight"].tolist() == [2.0]
    log = _write(tmp_path, HEADER + "u1,i1,like,1704067200,\n", "empty.csv")
    assert load_interactions(log).frame["weight"].tolist() == [4.0]


def test_unix_seconds_and_iso_timestamps_agree(tmp_path: Path) -> None:
    stamps = [
        "1704067200",
        "1704067200.9",
        "2024-01-01T00:00:00Z",
        "2024-01-01T00:00:00.500+00:00",
        "2024-01-01 02:00:00+02:00",
        "2023-12-31T19:00:00-0500",
        "2024-01-01",
        "2024-01-01T00:00:00",
    ]
    body = "".join(f"u{k},i1,view,{ts},1\n" for k, ts in enumerate(stamps))
    result = load_interactions(_write(tmp_path, HEADER + body))
    assert result.rows_quarantined == 0
    assert result.frame["timestamp"].tolist() == [1704067200] * len(stamps)


def test_a_bad_timestamp_among_iso_strings_spoils_only_its_row(tmp_path: Path) -> None:
    body = (
        "u1,i1,view,2024-01-01T00:00:00Z,1\n"
        "u2,i1,view,not-a-date,1\n"
        "u3,i1,view,2024-01-02,1\n"
        "u4,i1,view,2024-01-02T10:00:00+01:00,1\n"
    )
    result = load_interactions(_write(tmp_path, HEADER + body), quarantine_path=tmp_path / "q")
    assert result.reasons == {"bad_timestamp": 1}
    assert result.frame["timestamp"].tolist() == [1704067200, 1704153600, 1704186000]


def test_custom_event_weights_add_events_and_change_weights(tmp_path: Path) -> None:
    log = _write(tmp_path, HEADER + "u1,i1,bookmark,1704067200,2\nu1,i2,view,1704067200,1\n")
    default = load_interactions(log, quarantine_path=tmp_path / "q.csv")
    assert default.reasons == {"unknown_event": 1}

    custom = load_interactions(log, event_weights={"Bookmark": 3, "view": 0.5})
    assert custom.rows_quarantined == 0
    assert custom.frame["weight"].tolist() == [6.0, 0.5]
    weights = EventWeights.from_mapping({"bookmark": 3})
    assert weights.as_dict()["purchase"] == 10.0
    assert weights.as_dict()["bookmark"] == 3.0


@pytest.mark.parametrize("bad", [{"view": -1}, {"view": "heavy"}, {"like": float("nan")}])
def test_invalid_event_weights_are_rejected(bad: dict[str, object]) -> None:
    with pytest.raises(InvalidInputError, match="event weights"):
        EventWeights.from_mapping(bad)  # type: ignore[arg-type]


def test_default_event_weights() -> None:
    assert EventWeights().as_dict() == {
        "view": 1.0,
        "click": 2.0,
        "like": 4.0,
        "share": 4.0,
        "add_to_cart": 6.0,
        "purchase": 10.0,
    }


def test_quarantine_file_beside_the_log_only_when_needed(tmp_path: Path) -> None:
    clean = load_interactions(_write(tmp_path, HEADER + GOOD, "clean.csv"))
    assert clean.quarantine_path is None
    assert not (tmp_path / "clean.csv.quarantine.csv").exists()

    dirty = load_interactions(_write(tmp_path, HEADER + GOOD + "u1,,view,1,1\n", "dirty.csv"))
    assert dirty.quarantine_path == tmp_path / "dirty.csv.quarantine.csv"
    assert len(_quarantine(dirty.quarantine_path)) == 1


def test_explicit_quarantine_path_is_always_written(tmp_path: Path) -> None:
    qpath = tmp_path / "runs" / "q.csv"
    qpath.parent.mkdir()
    qpath.write_text("stale content from an earlier run\n")
    result = load_interactions(_write(tmp_path, HEADER + GOOD), quarantine_path=qpath)
    assert result.quarantine_path == qpath
    rejected = _quarantine(qpath)
    assert list(rejected.columns) == list(QUARANTINE_COLUMNS)
    assert len(rejected) == 0


def test_missing_file_is_a_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_interactions(tmp_path / "nope.csv")


def test_unsupported_extension_is_a_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"unsupported file type.*\.parquet"):
        load_interactions(_write(tmp_path, HEADER + GOOD, "log.json"))


def test_missing_column_is_named(tmp_path: Path) -> None:
    log = _write(tmp_path, "user_id,item_id,timestamp\nu1,i1,1704067200\n")
    with pytest.raises(DataError, match=r"lacks required column.*event") as info:
        load_interactions(log)
    assert info.value.field == "event"


def test_no_valid_rows_says_how_many_and_where(tmp_path: Path) -> None:
    log = _write(tmp_path, HEADER + "u1,i1,jump,1,1\n,i1,view,1,1\n")
    qpath = tmp_path / "q.csv"
    with pytest.raises(DataError, match=r"no valid rows: all 2 rows were quarantined") as info:
        load_interactions(log, quarantine_path=qpath)
    assert str(qpath) in str(info.value)
    assert len(_quarantine(qpath)) == 2


def test_header_only_and_empty_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no data rows"):
        load_interactions(_write(tmp_path, HEADER, "header.csv"))
    with pytest.raises(DataError, match="empty"):
        load_interactions(_write(tmp_path, "", "empty.csv"))


def test_unreadable_files_are_data_errors(tmp_path: Path) -> None:
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"this is not parquet at all")
    with pytest.raises(DataError, match="cannot read"):
        load_interactions(broken)
    latin1 = tmp_path / "latin1.csv"
    latin1.write_bytes(HEADER.encode() + "u1,caf\xe9,view,1,1\n".encode("latin-1"))
    with pytest.raises(DataError, match="cannot read"):
        load_interactions(latin1)


def test_tsv_and_gzipped_csv(tmp_path: Path) -> None:
    tsv = _write(tmp_path, HEADER.replace(",", "\t") + GOOD.replace(",", "\t"), "log.tsv")
    assert load_interactions(tsv).frame["item_id"].tolist() == ["i1"]
    gz = tmp_path / "log.csv.gz"
    gz.write_bytes(gzip.compress((HEADER + GOOD + "u2,i2,click,1704067200,1\n").encode()))
    assert load_interactions(gz).rows_accepted == 2


def test_parquet_with_typed_columns(tmp_path: Path) -> None:
    table = pa.table(
        {
            "user_id": pa.array([1, 2, 3, None], pa.int64()),
            "item_id": pa.DictionaryArray.from_arrays(
                pa.array([0, 1, 0, 1], pa.int32()), pa.array(["a", "b"])
            ),
            "event": pa.array(["view", "purchase", "click", "view"]),
            "timestamp": pa.array(
                [1704067200_000, 1704067201_000, None, 1704067200_000], pa.timestamp("ms", "UTC")
            ),
            "value": pa.array([None, 2.0, 1.0, 1.0]),
        }
    )
    path = tmp_path / "log.parquet"
    pq.write_table(table, path)
    result = load_interactions(path, quarantine_path=tmp_path / "q.csv")

    assert (result.rows_read, result.rows_accepted, result.rows_quarantined) == (4, 2, 2)
    assert result.frame["user_id"].tolist() == ["1", "2"]
    assert result.frame["item_id"].tolist() == ["a", "b"]
    assert result.frame["timestamp"].tolist() == [1704067200, 1704067201]
    assert result.frame["weight"].tolist() == [1.0, 20.0]
    rejected = _quarantine(tmp_path / "q.csv")
    # Parquet rows are numbered by their 1-based row index.
    assert rejected[["line", "reason"]].values.tolist() == [
        ["3", "bad_timestamp"],
        ["4", "missing_user_id"],
    ]


def test_parquet_with_text_columns_matches_csv(tmp_path: Path) -> None:
    body = "u1,i1,view,2024-01-01T00:00:00Z,1\nu2,i2,like,1704067300,2\n"
    csv_result = load_interactions(_write(tmp_path, HEADER + body))
    frame = pd.read_csv(tmp_path / "log.csv", dtype=str, keep_default_na=False)
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), tmp_path / "log.pq")
    pq_result = load_interactions(tmp_path / "log.pq")
    pd.testing.assert_frame_equal(csv_result.frame, pq_result.frame)
    assert dataset_fingerprint(csv_result.frame) == dataset_fingerprint(pq_result.frame)


def test_parquet_missing_column_is_named(tmp_path: Path) -> None:
    path = tmp_path / "log.parquet"
    pq.write_table(pa.table({"user_id": ["u"], "item_id": ["i"], "event": ["view"]}), path)
    with pytest.raises(DataError, match="timestamp"):
        load_interactions(path)


def test_fingerprint_ignores_order_and_sees_changes(tmp_path: Path) -> None:
    body = "".join(f"u{k % 3},i{k % 5},view,{1704067200 + k},1\n" for k in range(20))
    frame = load_interactions(_write(tmp_path, HEADER + body)).frame
    digest = dataset_fingerprint(frame)
    assert len(digest) == 64
    assert dataset_fingerprint(frame.sample(frac=1.0, random_state=1)) == digest
    changed = frame.copy()
    changed.loc[3, "timestamp"] += 1
    assert dataset_fingerprint(changed) != digest
    assert dataset_fingerprint(frame.iloc[1:]) != digest


# ------------------------------------------------------------------------------------- catalog

CATALOG = (
    "item_id,item_type,category,available,title\n"
    "i1,content,news,true,Morning News\n"
    "i2,Product,books,0,A Novel\n"
    "i3,product,books,yes,Another\n"
    "i4,,misc,NO,\n"
    "i5,content,news,,Untitled\n"
)


def test_catalog_parses_types_and_flags(tmp_path: Path) -> None:
    catalog = load_catalog(_write(tmp_path, CATALOG, "items.csv"))
    assert catalog["item_id"].tolist() == ["i1", "i2", "i3", "i4", "i5"]
    assert catalog["item_type"].tolist() == ["content", "product", "product", "", "content"]
    assert catalog["available"].tolist() == [True, False, True, False, True]
    assert catalog["title"].tolist()[0] == "Morning News"


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ("i9,service,news,true,x", "item_type other than"),
        ("i9,content,news,maybe,x", "available flag"),
        ("i1,content,news,true,x", "duplicate item_id"),
        (",content,news,true,x", "empty item_id"),
    ],
)
def test_bad_catalog_rows_name_the_line(tmp_path: Path, row: str, message: str) -> None:
    with pytest.raises(DataError, match=rf"{message}.*line 7"):
        load_catalog(_write(tmp_path, CATALOG + row + "\n", "items.csv"))


def test_catalog_without_item_id_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="item_id"):
        load_catalog(_write(tmp_path, "id,item_type\n1,content\n", "items.csv"))


def test_catalog_arrays_align_with_the_item_order(tmp_path: Path) -> None:
    path = tmp_path / "items.parquet"
    pq.write_table(
        pa.table(
            {
                "item_id": ["i1", "i2", "i3"],
                "item_type": ["content", "product", "product"],
                "category": ["news", "books", "toys"],
                "title": ["N", "B", "T"],
                "available": [True, False, True],
            }
        ),
        path,
    )
    catalog = load_catalog(path)
    arrays = catalog_arrays(np.array(["i3", "unknown", "i2"]), catalog)
    assert arrays.item_type.tolist() == ["product", "", "product"]
    assert arrays.category.tolist() == ["toys", "", "books"]
    assert arrays.title.tolist() == ["T", "", "B"]
    assert arrays.available.tolist() == [True, True, False]
    assert arrays.item_type.dtype.kind == "U"

    empty = catalog_arrays(np.array(["a", "b"]), None)
    assert len(empty) == 2
    assert empty.available.all()


# ------------------------------------------------------------------------------------ real data


@pytest.mark.realdata
def test_movielens_ratings_pass_without_quarantine(tmp_path: Path) -> None:
    ratings = DATASETS / "ml-latest-small" / "ratings.csv"
    if not ratings.exists():
        pytest.skip("../shared/datasets not present")
    raw = pd.read_csv(ratings, dtype=str, keep_default_na=False)
    log = raw.rename(columns={"userId": "user_id", "movieId": "item_id", "rating": "value"})
    log["event"] = "view"
    log.to_csv(tmp_path / "ratings.csv", index=False)
    pq.write_table(pa.Table.from_pandas(log, preserve_index=False), tmp_path / "ratings.parquet")

    for name in ("ratings.csv", "ratings.parquet"):
        result = load_interactions(tmp_path / name, quarantine_path=tmp_path / f"{name}.q")
        assert result.rows_quarantined == 0
        assert result.rows_accepted == len(raw)
        assert result.frame["user_id"].nunique() == raw["userId"].nunique()
        assert result.frame["timestamp"].tolist()[:50] == raw["timestamp"].astype(int).tolist()[:50]


@pytest.mark.realdata
def test_online_retail_quarantines_anonymous_rows_and_returns(tmp_path: Path) -> None:
    source = DATASETS / "uci-online-retail" / "online_retail.parquet"
    if not source.exists():
        pytest.skip("../shared/datasets not present")
    table = pq.read_table(source, columns=["CustomerID", "Description", "InvoiceDate", "Quantity"])
    table = table.rename_columns(["user_id", "item_id", "timestamp", "value"])
    table = table.append_column("event", pa.array(["purchase"] * table.num_rows))
    pq.write_table(table, tmp_path / "retail.parquet")

    result = load_interactions(tmp_path / "retail.parquet", quarantine_path=tmp_path / "q.csv")
    # The dataset README: rows with a CustomerID and Quantity > 0 are the 397,924 purchases.
    assert result.rows_read == table.num_rows
    assert result.rows_accepted == 397_924
    assert result.rows_read == result.rows_accepted + result.rows_quarantined
    assert set(result.reasons) <= {"missing_user_id", "negative_value", "missing_item_id"}
    assert not result.frame["user_id"].str.endswith(".0").any()


def test_categorical_ids_keep_the_values_and_the_fingerprint(tmp_path: Path) -> None:
    body = "".join(f"u{k % 7},i{k % 11},click,{1704067200 + k},2\n" for k in range(60))
    frame = load_interactions(_write(tmp_path, HEADER + body)).frame
    categorical = with_categorical_ids(frame)
    assert isinstance(categorical["user_id"].dtype, pd.CategoricalDtype)
    assert isinstance(categorical["item_id"].dtype, pd.CategoricalDtype)
    assert categorical["user_id"].astype(str).tolist() == frame["user_id"].tolist()
    assert categorical["item_id"].astype(str).tolist() == frame["item_id"].tolist()
    assert list(categorical.columns) == list(FRAME_COLUMNS)
    assert dataset_fingerprint(categorical) == dataset_fingerprint(frame)
    assert isinstance(frame["user_id"].dtype, pd.StringDtype)  # the input is left alone


@pytest.mark.parametrize("dictionary", [True, False])
def test_categorical_load_of_parquet_matches_the_text_load(
    tmp_path: Path, dictionary: bool
) -> None:
    # Ids and events with surrounding blanks, mixed case, nulls and a float-typed id column:
    # every distinct value is cleaned once, yet each row must read as the text load reads it.
    table = pa.table(
        {
            "user_id": pa.array(["u1", " u1 ", None, "u2", "u10", "u2", " ", "u1"]),
            "item_id": pa.array([1.0, 2.0, 2.0, None, 10.0, 1.5, 3.0, 1.0]),
            "event": pa.array(
                ["view", " Click", "VIEW", "like", "view ", "teleport", "view", None]
            ),
            "timestamp": pa.array([1704067200 + k for k in range(8)], pa.int64()),
            "value": pa.array([1.0, 2.0, None, 1.0, 3.0, 1.0, 1.0, 1.0]),
        }
    )
    if dictionary:
        table = table.set_column(0, "user_id", table.column("user_id").dictionary_encode())
        table = table.set_column(2, "event", table.column("event").dictionary_encode())
    path = tmp_path / "log.parquet"
    pq.write_table(table, path, row_group_size=3)  # several chunks, each with its dictionary
    text = load_interactions(path, quarantine_path=tmp_path / "q1.csv")
    cat = load_interactions(path, quarantine_path=tmp_path / "q2.csv", categorical=True)
    assert (cat.rows_accepted, dict(cat.reasons)) == (text.rows_accepted, dict(text.reasons))
    assert text.rows_accepted == 3 and text.rows_quarantined == 5
    for name in ("user_id", "item_id", "event"):
        assert isinstance(cat.frame[name].dtype, pd.CategoricalDtype)
        assert cat.frame[name].astype(str).tolist() == text.frame[name].tolist()
    assert list(cat.frame.columns) == list(FRAME_COLUMNS)
    pd.testing.assert_frame_equal(
        cat.frame[["timestamp", "value", "weight"]], text.frame[["timestamp", "value", "weight"]]
    )
    assert dataset_fingerprint(cat.frame) == dataset_fingerprint(text.frame)
    assert _quarantine(tmp_path / "q1.csv").equals(_quarantine(tmp_path / "q2.csv"))


def test_categorical_load_of_csv_matches_the_text_load(tmp_path: Path) -> None:
    body = "".join(
        f" u{k % 7},i{k % 11} ,{('View', 'click ')[k % 2]},{1704067200 + k},2\n" for k in range(40)
    )
    path = _write(tmp_path, HEADER + body + ",i1,view,1704067200,1\n")
    text = load_interactions(path)
    cat = load_interactions(path, categorical=True)
    assert cat.rows_quarantined == text.rows_quarantined == 1
    for name in ("user_id", "item_id", "event"):
        assert isinstance(cat.frame[name].dtype, pd.CategoricalDtype)
        assert cat.frame[name].astype(str).tolist() == text.frame[name].tolist()
    assert dataset_fingerprint(cat.frame) == dataset_fingerprint(text.frame)
