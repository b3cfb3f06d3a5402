"""Shared fixtures of the model tests: a synthetic two-taste data set, fitted models, bundles
and the ranking pipelines over them.

Users come in two taste clusters: even users only touch items ``0..29``, odd users only items
``30..59``, with Zipf-like popularity inside each cluster, so recommendation quality is checkable.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import scipy.sparse as sp

from models.algorithms import get_algorithm
from models.artifact import ItemCatalog, ModelBundle
from models.base import Recommender
from models.ranking import RankingPipeline
from models.vocabulary import Vocabulary

N_USERS = 200
HALF = 30
N_ITEMS = 2 * HALF
ITEMS_PER_USER = 10

# Small, quick hyperparameters that still learn the two clusters.
TEST_PARAMS: dict[str, dict[str, Any]] = {
    "als": {"factors": 8, "regularization": 0.1, "alpha": 1.0, "iterations": 15},
    "bpr": {"factors": 8, "learning_rate": 0.05, "iterations": 100, "num_threads": 1},
    "lmf": {"factors": 8, "iterations": 30, "num_threads": 1},
    "itemknn": {"K": 20},
    "bm25": {"K": 20},
    "ease": {"l2": 10.0},
    "gfcf": {"factors": 8},
}
NON_PERSONALIZED = frozenset({"popularity", "trending"})


@dataclass(frozen=True)
class Synthetic:
    """A (users x items) matrix with two clean taste clusters."""

    user_items: sp.csr_matrix
    item_cluster: np.ndarray
    user_cluster: np.ndarray

    @property
    def n_users(self) -> int:
        return int(self.user_items.shape[0])

    @property
    def n_items(self) -> int:
        return int(self.user_items.shape[1])

    def cluster_items(self, cluster: int) -> np.ndarray:
        return np.flatnonzero(self.item_cluster == cluster)

    def history(self, *rows: list[int], weight: float = 1.0) -> sp.csr_matrix:
        """One history row (each item weighing ``weight``) per list of item indices."""
        data, row_ids, col_ids = [], [], []
        for r, items in enumerate(rows):
            data += [weight] * len(items)
            row_ids += [r] * len(items)
            col_ids += list(items)
        return sp.csr_matrix(
            (np.asarray(data, np.float32), (row_ids, col_ids)), shape=(len(rows), self.n_items)
        )


def make_synthetic(seed: int = 0) -> Synthetic:
    rng = np.random.default_rng(seed)
    popularity = 1.0 / np.arange(1, HALF + 1) ** 0.7
    popularity /= popularity.sum()
    user_cluster = np.arange(N_USERS) % 2
    cols = np.concatenate(
        [
            rng.choice(HALF, size=ITEMS_PER_USER, replace=False, p=popularity) + HALF * c
            for c in user_cluster
        ]
    )
    rows = np.repeat(np.arange(N_USERS), ITEMS_PER_USER)
    # Integer confidences (1-3), as an interaction log with repeat views would give.
    data = rng.integers(1, 4, size=len(rows)).astype(np.float32)
    matrix = sp.csr_matrix((data, (rows, cols)), shape=(N_USERS, N_ITEMS))
    return Synthetic(matrix, np.arange(N_ITEMS) // HALF, user_cluster)


@pytest.fixture(scope="session")
def synthetic() -> Synthetic:
    return make_synthetic()


@pytest.fixture(scope="session")
def fitted(synthetic: Synthetic) -> Callable[[str], Recommender]:
    """``fitted(name)``: that algorithm fitted once on the synthetic data (do not mutate it)."""
    cache: dict[str, Recommender] = {}

    def get(name: str) -> Recommender:
        if name not in cache:
            model = get_algorithm(name)(**TEST_PARAMS.get(name, {}))
            cache[name] = model.fit(synthetic.user_items)
        return cache[name]

    return get


def make_catalog(n_items: int) -> ItemCatalog:
    """Types alternate content/product, categories cycle news/sport/music, items 0, 30 are gone.

    Items 0 and 30 are the most popular of their clusters, so "unavailable" is visible.
    """
    idx = np.arange(n_items)
    return ItemCatalog(
        item_type=np.where(idx % 2 == 0, "content", "product"),
        category=np.array(["news", "sport", "music"])[idx % 3],
        title=np.array([f"Item {i}" for i in idx]),
        available=~np.isin(idx, [0, HALF]),
    )


def make_bundle(model: Recommender, data: Synthetic) -> ModelBundle:
    """A complete bundle around ``model``; "trending" counts only the last quarter of users."""
    user_items = data.user_items
    recent = user_items[int(N_USERS * 0.75) :]
    return ModelBundle(
        model=model,
        users=Vocabulary([f"u{u}" for u in range(data.n_users)], kind="user"),
        items=Vocabulary([f"i{i}" for i in range(data.n_items)], kind="item"),
        seen=user_items,
        catalog=make_catalog(data.n_items),
        popularity=np.bincount(user_items.indices, minlength=data.n_items).astype(np.float32),
        trending=np.asarray(recent.sum(axis=0), dtype=np.float32).ravel(),
        info={"dataset_fingerprint": "synthetic-0"},
    )


@pytest.fixture(scope="session")
def bundle_for(
    synthetic: Synthetic, fitted: Callable[[str], Recommender]
) -> Callable[[str], ModelBundle]:
    """``bundle_for(name)``: a bundle around the shared fitted model of that algorithm."""
    return lambda name: make_bundle(fitted(name), synthetic)


@pytest.fixture(scope="session")
def training_pipeline(
    synthetic: Synthetic, fitted: Callable[[str], Recommender]
) -> Callable[[str], RankingPipeline]:
    """``training_pipeline(name)``: the pipeline evaluation ranks that model with (every item
    available, each user's training items seen, no id maps)."""
    cache: dict[str, RankingPipeline] = {}

    def get(name: str) -> RankingPipeline:
        if name not in cache:
            cache[name] = RankingPipeline.for_training(fitted(name), synthetic.user_items)
        return cache[name]

    return get


@pytest.fixture(scope="session")
def pipeline_for(
    bundle_for: Callable[[str], ModelBundle],
) -> Callable[[str], RankingPipeline]:
    """``pipeline_for(name)``: the pipeline serving that model's bundle (catalog, id maps)."""
    cache: dict[str, RankingPipeline] = {}

    def get(name: str) -> RankingPipeline:
        if name not in cache:
            cache[name] = RankingPipeline.from_bundle(bundle_for(name))
        return cache[name]

    return get
