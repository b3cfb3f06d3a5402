"""``affinity segments`` end to end: logs and the event store in, stages and tiers stored in the
event store (SQLite and PostgreSQL), exported and logged to a real MLflow store; transitions on a
second computation; erasures; prices; and the UCI Online Retail data against an independent
pandas computation of the same definitions."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from sqlalchemy import select

from affinity.cli import main
from affinity.segments import CONFIG_ENV, GONE, NO_PREVIOUS, load_config, run_segments
from models.errors import InvalidInputError
from models.lifecycle import STAGES, SegmentsConfig
from service.events import SEGMENT_HISTORY, USER_SEGMENTS, Event, EventStore
from training.generate import generate

RETAIL = (
    Path(__file__).resolve().parents[2] / "shared/datasets/uci-online-retail/online_retail.parquet"
)
DAY = 86_400
T0 = datetime(2024, 1, 1, tzinfo=UTC)


@pytest.fixture
def tracking(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, _empty_tracking_db: Path
) -> Iterator[str]:
    """A fresh MLflow SQLite tracking store, the working directory tmp_path (as training's)."""
    shutil.copyfile(_empty_tracking_db, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    previous = mlflow.get_tracking_uri()
    yield uri
    mlflow.set_tracking_uri(previous)


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("generated")
    return generate(folder, users=200, items=80, interactions=6_000, seed=7).interactions_path


def stored(uri: str) -> pd.DataFrame:
    with EventStore.open(uri) as store, store.engine.connect() as conn:
        rows = conn.execute(select(USER_SEGMENTS)).mappings().all()
    return pd.DataFrame([dict(r) for r in rows])


def write_log(path: Path, rows: list[tuple]) -> Path:
    """A CSV log of (user, item, event, day offset from T0, value[, price]) rows."""
    frame = pd.DataFrame(
        [
            {
                "user_id": r[0],
                "item_id": r[1],
                "event": r[2],
                "timestamp": (T0 + timedelta(days=r[3])).isoformat() if r[3] is not None else "x",
                "value": r[4],
                "price": r[5] if len(r) > 5 else "",
            }
            for r in rows
        ]
    )
    frame.to_csv(path, index=False)
    return path


# --- end to end -----------------------------------------------------------------------------


def test_command_end_to_end(
    generated: Path, events_db: str, tracking: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "export"
    args = ["segments", "--interactions", str(generated), "--store", events_db]
    code = main([*args, "--out", str(out), "--json", "--quiet"])
    assert code == 0, capsys.readouterr().err
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    table = stored(events_db)
    users = pd.read_parquet(generated)["user_id"].nunique()
    assert summary["users"] == len(table) == users
    assert sum(summary["stages"].values()) == sum(summary["tiers"].values()) == users
    assert table["user_id"].is_unique and set(table["stage"]) <= set(STAGES)
    assert summary["rows"]["rows_read"] == summary["rows"]["rows_used"] == 6_000
    # The export holds the same users and stages.
    exported = pd.read_parquet(out / "user_segments.parquet")
    assert exported.set_index("user_id")["stage"].to_dict() == dict(
        zip(table["user_id"], table["stage"], strict=True)
    )
    assert (out / "transitions.csv").is_file()
    # The MLflow run: counts as metrics, the transitions, three plots.
    run = mlflow.get_run(summary["run_id"])
    assert run.data.metrics["users"] == users
    for stage, n in summary["stages"].items():
        assert run.data.metrics[f"stage_{stage}"] == n
    for tier, n in summary["tiers"].items():
        assert run.data.metrics[f"tier_{tier}"] == n
    artifacts = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, dst_path=str(tmp_path))
    names = {p.relative_to(artifacts).as_posix() for p in Path(artifacts).rglob("*") if p.is_file()}
    assert {
        "plots/stage_sizes.png",
        "plots/transitions.png",
        "plots/rfm.png",
        "transitions/transitions.csv",
        "transitions/transitions.json",
        "config.json",
    } <= names
    matrix = json.loads((Path(artifacts) / "transitions/transitions.json").read_text())
    # A first computation: everyone comes from no previous stage.
    assert matrix["from"][-1] == NO_PREVIOUS
    assert sum(matrix["users"][-1]) == users and sum(map(sum, matrix["users"][:-1])) == 0
    # A user's segment is personal data: DeleteUser's erasure removes it with their events.
    erased = str(table["user_id"].iloc[0])
    with EventStore.open(events_db) as store:
        store.delete_user(erased)
    assert erased not in set(stored(events_db)["user_id"])
    assert len(stored(events_db)) == users - 1


def test_second_computation_transitions_and_reactivation(tmp_path: Path) -> None:
    log = write_log(
        tmp_path / "log.csv",
        [
            ("comeback", "i1", "purchase", 0, 1),  # gone 100 days, then back
            ("comeback", "i2", "view", 100, 1),
            ("steady", "i1", "purchase", 0, 1),
            ("steady", "i1", "view", 95, 1),
            ("steady", "i1", "view", 99, 1),
            ("fading", "i3", "purchase", 50, 2),  # quiet since day 50
            ("late", "i4", "view", 99, 1),  # appears after the first computation
        ],
    )
    uri = f"sqlite:///{tmp_path / 'events.db'}"
    first = run_segments(
        interactions=[log],
        store_uri=uri,
        as_of=(T0 + timedelta(days=90)).timestamp(),
        mlflow_run=False,
    )
    before = stored(uri).set_index("user_id")
    assert before["stage"].to_dict() == {
        "comeback": "dormant",
        "steady": "dormant",
        "fading": "at_risk",
    }
    assert first.rows.after_as_of == 4 and first.rows.used == 3
    second = run_segments(
        interactions=[log],
        store_uri=uri,
        as_of=(T0 + timedelta(days=101)).timestamp(),
        mlflow_run=False,
    )
    after = stored(uri).set_index("user_id")
    assert after["stage"].to_dict() == {
        "comeback": "reactivated",
        "steady": "reactivated",
        "fading": "at_risk",
        "late": "new",
    }
    # Unchanged stage keeps its stage_since; a comeback starts at this computation.
    assert after.loc["fading", "stage_since"] == before.loc["fading", "stage_since"]
    assert after.loc["comeback", "stage_since"] == T0 + timedelta(days=101)
    m = second.transitions
    assert m.loc["dormant", "reactivated"] == 2
    assert m.loc["at_risk", "at_risk"] == 1
    assert m.loc[NO_PREVIOUS, "new"] == 1
    assert int(m.to_numpy().sum()) == 4
    assert second.to_json()["changed_stage"] == 2
    with EventStore.open(uri) as store, store.engine.connect() as conn:
        history = conn.execute(select(SEGMENT_HISTORY.c.as_of).distinct()).all()
    assert len(history) == 2
    # Going back in time is refused.
    with pytest.raises(InvalidInputError) as err:
        run_segments(
            interactions=[log], store_uri=uri, as_of=T0.timestamp() + 50 * DAY, mlflow_run=False
        )
    assert err.value.field == "as-of"


def test_prices_quarantine_and_row_accounting(tmp_path: Path) -> None:
    log = write_log(
        tmp_path / "log.csv",
        [
            ("a", "i1", "purchase", 1, 2, 10.0),  # 20
            ("a", "i2", "purchase", 1, 1, 5.0),  # same order (same time): 5
            ("a", "i2", "purchase", 3, 3, ""),  # no price: its value, 3
            ("a", "i3", "view", 4, 1, 99.0),  # not an order: no money
            ("b", "i1", "purchase", 2, 1, "cheap"),  # bad price: left out, counted
            ("b", "i1", "purchase", None, 1, 1.0),  # bad timestamp: quarantined
            ("b", "i1", "view", 2, 1, ""),
        ],
    )
    result = run_segments(
        interactions=[log],
        store_uri=f"sqlite:///{tmp_path / 'events.db'}",
        quarantine_path=tmp_path / "q.csv",
        mlflow_run=False,
    )
    table = result.table.set_index("user_id")
    assert table.loc["a", "monetary"] == pytest.approx(28.0)
    assert table.loc["a", "frequency"] == 2
    assert table.loc["b", "frequency"] == 0 and table.loc["b", "monetary"] == 0
    rows = result.rows
    assert (rows.read, rows.used, rows.quarantined, rows.bad_price) == (7, 5, 1, 1)
    assert rows.reasons == {"bad_timestamp": 1, "bad_price": 1}
    assert result.users == 2 == sum(result.sizes["stage"].values())


def test_event_store_input_and_erasures(tmp_path: Path, generated: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'events.db'}"
    now = datetime.now(UTC)
    with EventStore.open(uri) as store:
        at = now - timedelta(days=2)
        store.append(
            [
                Event("e1", "shopper", "i1", "purchase", timestamp=at, value=2, price=7.5),
                Event("e2", "shopper", "i2", "impression", timestamp=now, shown_item_ids=("i2",)),
                Event("e3", "browser", "i1", "view", timestamp=at),
            ]
        )
        log_users = pd.read_parquet(generated)["user_id"].unique()
        erased = str(log_users[0])
        store.delete_user(erased, now=now)
    result = run_segments(
        interactions=[generated], use_events=True, store_uri=uri, mlflow_run=False
    )
    table = result.table.set_index("user_id")
    assert erased not in table.index
    assert result.rows.erased > 0 and result.rows.ignored_event == 1
    assert table.loc["shopper", "monetary"] == pytest.approx(15.0)
    # The impression did not make the shopper seen later than the purchase.
    assert table.loc["shopper", "last_seen"] == pytest.approx(int(at.timestamp()))
    assert result.users == len(log_users) - 1 + 2
    assert erased not in set(stored(uri)["user_id"])


def test_bad_config_file_stops_with_the_field(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, generated: Path
) -> None:
    bad = tmp_path / "segments.toml"
    bad.write_text("[windows]\nactive_days = 30\nat_risk_days = 20\n")
    args = ["segments", "--interactions", str(generated), "--store", f"sqlite:///{tmp_path}/e.db"]
    assert main([*args, "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "segments.toml" in err and "at_risk_days" in err
    monkeypatch.setenv(CONFIG_ENV, str(bad))
    assert main(args) == 2
    assert "at_risk_days" in capsys.readouterr().err
    bad.write_text("activation_events = [purchase\n")
    assert main([*args, "--config", str(bad)]) == 2
    assert "not valid TOML" in capsys.readouterr().err
    assert main([*args, "--config", str(tmp_path / "missing.toml")]) == 2
    assert "missing.toml" in capsys.readouterr().err
    monkeypatch.delenv(CONFIG_ENV)
    assert main([*args, "--as-of", "yesterday"]) == 2
    assert "--as-of" in capsys.readouterr().err
    assert main(["segments", "--store", f"sqlite:///{tmp_path}/e.db"]) == 2
    assert "--interactions" in capsys.readouterr().err


def test_config_file_changes_the_definitions(tmp_path: Path) -> None:
    path = tmp_path / "segments.toml"
    path.write_text(
        'activation_events = ["purchase", "like"]\ndefault_tier = "everyone"\n'
        "[windows]\nactive_days = 7\nat_risk_days = 14\ndormant_days = 28\n"
        '[[tiers]]\nname = "recent"\nr = [4, 5]\n'
    )
    config = load_config(path)
    assert config.windows.active_days == 7 and config.tier_names == ("recent", "everyone")
    log = write_log(
        tmp_path / "log.csv",
        [("liker", "i1", "like", 0, 1), ("liker", "i1", "view", 10, 1), ("x", "i1", "view", 20, 1)],
    )
    result = run_segments(
        interactions=[log], store_uri=f"sqlite:///{tmp_path}/e.db", config=config, mlflow_run=False
    )
    table = result.table.set_index("user_id")
    assert table.loc["liker", "stage"] == "at_risk"  # 10 days idle > 7
    assert not np.isnan(table.loc["liker", "activated_at"])
    assert set(table["tier"]) <= {"recent", "everyone"}


# --- the UCI Online Retail data -------------------------------------------------------------


@pytest.mark.realdata
def test_uci_online_retail_agrees_with_pandas(tmp_path: Path) -> None:
    if not RETAIL.is_file():
        pytest.skip(f"{RETAIL} is absent (the UCI Online Retail data set; see docs/segments.md)")
    raw = pd.read_parquet(RETAIL)
    rows = raw[raw["CustomerID"].notna() & (raw["Quantity"] > 0)]
    when = pd.to_datetime(rows["InvoiceDate"]).dt.tz_localize("UTC")
    log = tmp_path / "retail.parquet"
    pd.DataFrame(
        {
            "user_id": rows["CustomerID"].astype("int64").astype(str),
            "item_id": rows["Description"].fillna("").str.strip(),
            "event": "purchase",
            "timestamp": when,
            "value": rows["Quantity"].astype(float),
            "price": rows["UnitPrice"],
        }
    ).to_parquet(log, index=False)
    result = run_segments(
        interactions=[log], store_uri=f"sqlite:///{tmp_path / 'e.db'}", mlflow_run=False
    )

    # The same definitions, written directly in pandas.
    df = pd.DataFrame(
        {
            "customer": rows["CustomerID"].astype("int64").astype(str),
            "when": when,
            "amount": rows["Quantity"] * rows["UnitPrice"],
        }
    )
    df = df[rows["Description"].fillna("").str.strip().to_numpy() != ""]  # the loader's rule
    as_of = df["when"].max()
    per = df.groupby("customer").agg(
        last=("when", "max"), orders=("when", "nunique"), money=("amount", "sum")
    )
    per["recency"] = (as_of - per["last"]).dt.total_seconds() // DAY

    def score(values: pd.Series) -> pd.Series:
        below = values.rank(method="min") - 1
        equal = values.map(values.value_counts())
        n = len(values)
        return ((5 * (2 * below + equal) + 2 * n - 1) // (2 * n)).astype(int)

    expected = pd.DataFrame(
        {"r": score(-per["recency"]), "f": score(per["orders"]), "m": score(per["money"])}
    )
    rules = [  # the default tier map, first match wins
        ("champions", (4, 5), (4, 5), (1, 5)),
        ("loyal", (3, 5), (3, 5), (1, 5)),
        ("new_customers", (4, 5), (1, 1), (1, 5)),
        ("promising", (3, 5), (1, 2), (1, 5)),
        ("cant_lose", (1, 2), (4, 5), (4, 5)),
        ("at_risk", (1, 2), (3, 5), (1, 5)),
        ("hibernating", (2, 2), (1, 2), (1, 5)),
        ("lost", (1, 1), (1, 2), (1, 5)),
    ]

    def tier(row: pd.Series) -> str:
        for name, r, f, m in rules:
            if r[0] <= row.r <= r[1] and f[0] <= row.f <= f[1] and m[0] <= row.m <= m[1]:
                return name
        return "other"

    expected["tier"] = expected.apply(tier, axis=1)
    got = result.table.set_index("user_id").loc[expected.index]
    assert len(result.table) == len(expected) == 4_339
    assert (got["recency_score"] == expected["r"]).all()
    assert (got["frequency_score"] == expected["f"]).all()
    assert (got["monetary_score"] == expected["m"]).all()
    assert (got["tier"] == expected["tier"]).all()
    assert np.allclose(got["monetary"], per["money"])
    assert (got["frequency"] == per["orders"]).all()
    idle_days = (as_of - per["last"]).dt.total_seconds() / DAY
    assert result.sizes["stage"]["churned"] == int((idle_days > 120).sum())
    assert result.sizes["stage"]["dormant"] == int(((idle_days > 60) & (idle_days <= 120)).sum())
    assert sum(result.sizes["tier"].values()) == 4_339


def test_segments_config_defaults_are_documented() -> None:
    # docs/segments.md shows the defaults; keep the two in step.
    docs = (Path(__file__).resolve().parents[1] / "docs/segments.md").read_text()
    config = SegmentsConfig()
    for rule in config.tiers:
        assert f'name = "{rule.name}"' in docs
    for name, value in config.windows.model_dump().items():
        assert f"{name} = {value:g}" in docs
    assert GONE in docs and NO_PREVIOUS in docs
