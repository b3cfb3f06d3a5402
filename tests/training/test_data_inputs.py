"""Several interaction logs as one input, and erasures: each log is validated and quarantined as
a single log is, and an erased user's rows at or before the erasure reach no frame or file."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from models.errors import DataError
from training.data import QUARANTINE_COLUMNS, dataset_fingerprint, load_interactions, log_files

HEADER = "user_id,item_id,event,timestamp\n"
T0 = 1_740_787_200  # 2025-03-01T00:00:00Z
ERASED_AT = datetime.fromtimestamp(T0 + 100, UTC)


def _csv(path: Path, rows: list[str]) -> Path:
    path.write_text(HEADER + "".join(f"{row}\n" for row in rows))
    return path


def _parquet(path: Path, rows: list[tuple[str, str, str, int]]) -> Path:
    users, items, events, seconds = zip(*rows, strict=True)
    table = pa.table(
        {
            "user_id": list(users),
            "item_id": list(items),
            "event": list(events),
            "timestamp": pa.array([s * 1_000_000 for s in seconds], pa.timestamp("us", tz="UTC")),
            "value": [1.0] * len(rows),
        }
    )
    pq.write_table(table, path)
    return path


def _quarantine(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype=str, keep_default_na=False)


@pytest.mark.parametrize("categorical", [False, True])
def test_several_logs_are_validated_alike_and_concatenated(
    tmp_path: Path, categorical: bool
) -> None:
    a = _csv(tmp_path / "a.csv", [f"u1,i1,view,{T0}", f"u2,i2,click,{T0 + 1}", "u3,i3,teleport,1"])
    b = _parquet(tmp_path / "b.parquet", [("u9", "i1", "purchase", T0 + 2), ("", "i4", "view", 5)])
    result = load_interactions([a, b], quarantine_path=tmp_path / "q.csv", categorical=categorical)
    assert (result.rows_read, result.rows_accepted, result.rows_quarantined) == (5, 3, 2)
    assert result.rows_erased == 0 and result.sources == (a, b) and result.source is None
    frame = result.frame
    assert frame["user_id"].astype(str).tolist() == ["u1", "u2", "u9"]
    assert frame["timestamp"].tolist() == [T0, T0 + 1, T0 + 2]
    assert frame["weight"].tolist() == [1.0, 2.0, 10.0]
    if categorical:
        for name in ("user_id", "item_id", "event"):
            categories = list(frame[name].cat.categories)
            assert categories == sorted(categories)
    # Each log gives the same rows and reasons as it does alone.
    alone = [load_interactions(p, quarantine_path=tmp_path / f"{p.name}.q.csv") for p in (a, b)]
    assert sum(r.rows_accepted for r in alone) == result.rows_accepted
    assert sum(alone[0].reasons.values()) + sum(alone[1].reasons.values()) == 2
    assert dataset_fingerprint(frame) == dataset_fingerprint(
        pd.concat([r.frame for r in alone], ignore_index=True)
    )
    # One quarantine file; "file" names the log and "line" counts within it.
    rejected = _quarantine(tmp_path / "q.csv")
    assert list(rejected.columns) == [*QUARANTINE_COLUMNS, "file"]
    assert rejected[["line", "reason", "file"]].values.tolist() == [
        ["4", "unknown_event", str(a)],
        ["2", "missing_user_id", str(b)],
    ]


def test_a_single_log_keeps_its_quarantine_format(tmp_path: Path) -> None:
    log = _csv(tmp_path / "a.csv", [f"u1,i1,view,{T0}", "u3,i3,teleport,1"])
    result = load_interactions(log)
    assert result.source == log and result.sources == (log,)
    assert result.quarantine_path == tmp_path / "a.csv.quarantine.csv"
    assert list(_quarantine(result.quarantine_path).columns) == list(QUARANTINE_COLUMNS)


def test_a_directory_is_every_log_under_it(tmp_path: Path) -> None:
    lake = tmp_path / "lake"
    for day, user in (("2025-03-02", "u2"), ("2025-03-01", "u1")):
        (lake / f"day={day}").mkdir(parents=True)
        _parquet(lake / f"day={day}" / "part-0.parquet", [(user, "i1", "view", T0)])
    (lake / "_SUCCESS").write_text("")
    (lake / ".staging").mkdir()
    _parquet(lake / ".staging" / "part-9.parquet", [("hidden", "i1", "view", T0)])
    _csv(lake / "old.csv.quarantine.csv", ["not,a,log,at all"])
    assert [p.parent.name for p in log_files(lake)] == ["day=2025-03-01", "day=2025-03-02"]
    result = load_interactions(lake)
    assert result.frame["user_id"].tolist() == ["u1", "u2"]
    # A file named twice, directly and through its folder, is read once.
    assert len(log_files([lake, lake / "day=2025-03-01" / "part-0.parquet"])) == 2
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no interaction log"):
        load_interactions(tmp_path / "empty")
    with pytest.raises(DataError, match="no interaction log given"):
        load_interactions([])


def test_each_log_must_have_a_valid_row_as_a_single_one_must(tmp_path: Path) -> None:
    good = _csv(tmp_path / "good.csv", [f"u1,i1,view,{T0}"])
    bad = _csv(tmp_path / "bad.csv", ["u1,i1,teleport,1"])
    with pytest.raises(DataError, match=r"bad\.csv has no valid rows"):
        load_interactions([good, bad], quarantine_path=tmp_path / "q.csv")
    assert len(_quarantine(tmp_path / "q.csv")) == 1  # written before failing, to be read
    empty = _csv(tmp_path / "empty.csv", [])
    with pytest.raises(DataError, match=r"empty\.csv has a header but no data rows"):
        load_interactions([good, empty])


@pytest.mark.parametrize("categorical", [False, True])
def test_erased_users_rows_at_or_before_the_erasure_are_dropped_everywhere(
    tmp_path: Path, categorical: bool
) -> None:
    log = _csv(
        tmp_path / "log.csv",
        [
            f"gone,i1,view,{T0}",  # before: dropped
            f"gone,i2,click,{T0 + 100}",  # at the erasure: dropped
            f"gone,i3,click,{T0 + 101}",  # after (came back): kept
            "gone,i4,view,yesterday",  # unreadable time: cannot be after, dropped
            f"gone,i5,teleport,{T0}",  # invalid too, but erased first: in no quarantine
            f"gone,i6,teleport,{T0 + 500}",  # invalid after the erasure: quarantined
            f"gone,i7,view,{T0},1,surplus",  # wrong field count naming the user: dropped
            f"kept,i1,view,{T0}",
            f" gone ,i8,view,{T0}",  # ids are stripped before they are compared
        ],
    )
    parquet = _parquet(tmp_path / "store.parquet", [("gone", "i9", "view", T0 + 50)])
    result = load_interactions(
        [log, parquet],
        quarantine_path=tmp_path / "q.csv",
        categorical=categorical,
        erasures={"gone": ERASED_AT},
    )
    assert (result.rows_read, result.rows_accepted) == (10, 2)
    assert (result.rows_quarantined, result.rows_erased) == (1, 7)
    assert result.frame["item_id"].astype(str).tolist() == ["i3", "i1"]
    rejected = _quarantine(tmp_path / "q.csv")
    assert rejected["item_id"].tolist() == ["i6"]
    assert not rejected["raw"].str.contains("gone").any()
    # Erasures as unix seconds mean the same.
    again = load_interactions(log, erasures={"gone": float(T0 + 100)})
    assert again.rows_erased == 6
    # Erasing every row leaves nothing to train on: an error, not an empty model.
    with pytest.raises(DataError, match="no rows left to train on"):
        load_interactions(parquet, erasures={"gone": ERASED_AT})


def test_erasures_of_unknown_users_change_nothing(tmp_path: Path) -> None:
    log = _csv(tmp_path / "log.csv", [f"u1,i1,view,{T0}", f"u2,i2,view,{T0}"])
    plain = load_interactions(log)
    erased = load_interactions(log, erasures={"nobody": ERASED_AT})
    assert erased.rows_erased == 0
    pd.testing.assert_frame_equal(plain.frame, erased.frame)
    assert np.array_equal(plain.frame["timestamp"], [T0, T0])
