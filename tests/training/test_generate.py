"""The synthetic data generator: determinism, shape, funnel, popularity skew, user taste."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from models.errors import InvalidInputError
from training.data import load_catalog, load_interactions
from training.generate import DAYS, GenerateResult, generate

USERS, ITEMS, ROWS = 400, 300, 12_000


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> GenerateResult:
    return generate(tmp_path_factory.mktemp("gen"), users=USERS, items=ITEMS, interactions=ROWS)


@pytest.fixture(scope="module")
def log(generated: GenerateResult) -> pd.DataFrame:
    result = load_interactions(generated.interactions_path)
    assert result.rows_quarantined == 0
    return result.frame


@pytest.fixture(scope="module")
def catalog(generated: GenerateResult) -> pd.DataFrame:
    return load_catalog(generated.items_path)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_same_seed_gives_identical_files(tmp_path: Path, generated: GenerateResult) -> None:
    again = generate(tmp_path / "a", users=USERS, items=ITEMS, interactions=ROWS)
    assert _sha(again.interactions_path) == _sha(generated.interactions_path)
    assert _sha(again.items_path) == _sha(generated.items_path)
    other = generate(tmp_path / "b", users=USERS, items=ITEMS, interactions=ROWS, seed=7)
    assert _sha(other.interactions_path) != _sha(generated.interactions_path)


def test_shape_and_clean_load(generated: GenerateResult, log: pd.DataFrame) -> None:
    assert generated.n_interactions == ROWS
    assert len(log) == ROWS
    assert sum(generated.event_counts.values()) == ROWS
    # Every user gets at least one engagement; not every item need be touched.
    assert log["user_id"].nunique() == USERS
    assert log["item_id"].nunique() <= ITEMS
    assert str(generated).startswith(f"{ROWS:,} interactions")


def test_catalog_has_both_types_categories_and_unavailable_items(
    catalog: pd.DataFrame, log: pd.DataFrame
) -> None:
    assert len(catalog) == ITEMS
    assert set(catalog["item_type"]) == {"content", "product"}
    assert catalog["category"].nunique() >= 8
    assert 0 < (~catalog["available"]).sum() < ITEMS * 0.2
    assert (catalog["title"] != "").all()
    assert set(log["item_id"]) <= set(catalog["item_id"])


def test_time_window_is_fixed_by_the_seed(generated: GenerateResult, log: pd.DataFrame) -> None:
    end = int(generated.end.timestamp())
    assert generated.end.hour == 0 and generated.end.minute == 0
    assert (generated.end - generated.start).days == DAYS
    assert log["timestamp"].max() < end
    assert log["timestamp"].min() >= end - DAYS * 86_400
    assert log["timestamp"].is_monotonic_increasing


def test_funnel_order_and_item_types(log: pd.DataFrame, catalog: pd.DataFrame) -> None:
    counts = log["event"].value_counts()
    assert counts["view"] > counts["click"] > counts["add_to_cart"] > counts["purchase"] > 0
    kind = log["item_id"].map(catalog.set_index("item_id")["item_type"])
    assert (kind[log["event"].isin(["purchase", "add_to_cart"])] == "product").all()
    likes = kind[log["event"] == "like"].value_counts()
    assert likes.get("content", 0) > 3 * likes.get("product", 0)
    # Every purchase follows an add-to-cart of the same user and item.
    carts = log[log["event"] == "add_to_cart"].groupby(["user_id", "item_id"])["timestamp"].min()
    buys = log[log["event"] == "purchase"].groupby(["user_id", "item_id"])["timestamp"].min()
    joined = buys.to_frame("buy").join(carts.to_frame("cart"), how="left")
    assert joined["cart"].notna().all()
    assert (joined["cart"] <= joined["buy"]).all()
    assert (log.loc[log["event"] == "purchase", "value"] >= 1).all()


def test_popularity_is_skewed(log: pd.DataFrame) -> None:
    per_item = log["item_id"].value_counts()
    top = per_item.iloc[: ITEMS // 10].sum()
    assert top / len(log) > 0.35


def test_users_have_tastes_a_model_can_learn(log: pd.DataFrame, catalog: pd.DataFrame) -> None:
    # A user's favourite category holds a much larger share of their events than it would if
    # items were handed out regardless of the user (the same log with the items shuffled).
    category = catalog.set_index("item_id")["category"]

    def top_share(frame: pd.DataFrame) -> float:
        counts = frame.groupby(["user_id", "category"]).size()
        per_user = counts.groupby(level=0)
        return float((per_user.max() / per_user.sum()).mean())

    real = log.assign(category=log["item_id"].map(category))
    shuffled = real.assign(
        category=np.random.default_rng(0).permutation(real["category"].to_numpy())
    )
    assert top_share(real) > top_share(shuffled) + 0.1


def test_new_active_and_dormant_users(generated: GenerateResult, log: pd.DataFrame) -> None:
    end = int(generated.end.timestamp())
    span = log.groupby("user_id")["timestamp"].agg(["min", "max"])
    new = (span["min"] > end - 14 * 86_400).mean()
    dormant = (span["max"] < end - 30 * 86_400).mean()
    active = ((span["min"] < end - 60 * 86_400) & (span["max"] > end - 7 * 86_400)).mean()
    assert new > 0.05
    assert dormant > 0.1
    assert active > 0.2


@pytest.mark.parametrize("bad", [{"users": 0}, {"items": 0}, {"interactions": 0}])
def test_invalid_sizes_are_rejected(tmp_path: Path, bad: dict[str, int]) -> None:
    with pytest.raises(InvalidInputError):
        generate(tmp_path, **bad)  # type: ignore[arg-type]


def test_tiny_logs_work(tmp_path: Path) -> None:
    result = generate(tmp_path, users=50, items=5, interactions=10)
    loaded = load_interactions(result.interactions_path)
    assert loaded.rows_accepted == 10


def test_a_million_rows(tmp_path: Path) -> None:
    result = generate(tmp_path, users=50_000, items=10_000, interactions=1_000_000)
    loaded = load_interactions(result.interactions_path)
    assert loaded.rows_accepted == 1_000_000
    assert loaded.rows_quarantined == 0
