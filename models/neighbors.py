"""Item-based nearest-neighbour recommenders (cosine and BM25 weighted), fitted with implicit.

The learned state is implicit's sparse item-item similarity matrix, keeping the ``K`` most similar
items of each item. A user's scores are ``history @ similarity``: the summed similarity of every
item to the items in the user's history, so known and new users are scored the same way.
"""

from __future__ import annotations

import logging
from typing import ClassVar

import numpy as np
import scipy.sparse as sp
from implicit.nearest_neighbours import (
    BM25Recommender,
    CosineRecommender,
    ItemItemRecommender,
    bm25_weight,
    normalize,
)
from pydantic import Field, NonNegativeFloat, NonNegativeInt, PositiveInt
from threadpoolctl import threadpool_limits

from .base import ModelConfig, ProgressCallback, Recommender
from .errors import ArtifactError

logger = logging.getLogger(__name__)


class ItemKNNConfig(ModelConfig):
    """Hyperparameters of cosine item-item nearest neighbours."""

    K: PositiveInt = 20
    """The number of neighbours kept per item."""
    num_threads: NonNegativeInt = 0
    """Threads implicit uses for the all-pairs search; 0 means one per core."""


class BM25ItemKNNConfig(ItemKNNConfig):
    """Hyperparameters of item-item nearest neighbours on BM25-weighted interactions."""

    K1: NonNegativeFloat = 1.2
    """BM25 term-frequency saturation: 0 treats every interaction alike."""
    B: float = Field(0.75, ge=0.0, le=1.0)
    """BM25 length normalization: how much an item's weights shrink with its interaction count."""


class ItemKNN(Recommender):
    """Item-item cosine similarity over the users who interacted with each item."""

    algorithm = "itemknn"
    Config: ClassVar[type[ModelConfig]] = ItemKNNConfig

    similarity: sp.csr_matrix

    def _weighted(self, user_items: sp.csr_matrix) -> sp.csr_matrix:
        """The (users x items) matrix whose item columns are compared; here L2-normalized."""
        return sp.csr_matrix(normalize(user_items.T).T)

    def _make(self) -> ItemItemRecommender:
        cfg = self.config
        assert isinstance(cfg, ItemKNNConfig)
        return CosineRecommender(K=cfg.K, num_threads=cfg.num_threads)

    def _fit(self, user_items: sp.csr_matrix, progress: ProgressCallback | None) -> None:
        model = self._make()
        # Weighting here and calling the base fit with CSR input mirrors implicit's subclasses,
        # which hand a COO matrix to their own CSR check and so raise a ParameterWarning.
        weighted = self._weighted(user_items)
        with threadpool_limits(1, "blas"):
            ItemItemRecommender.fit(model, weighted, show_progress=False)
        self._set_similarity(sp.csr_matrix(model.similarity, dtype=np.float32))
        logger.debug("%s kept %d item pairs", self.algorithm, self.similarity.nnz)
        if progress is not None:
            progress(1, None)

    def _set_similarity(self, similarity: sp.csr_matrix) -> None:
        similarity.sort_indices()
        self.similarity = similarity

    def score_users(self, userids: np.ndarray, user_items: sp.csr_matrix) -> np.ndarray:
        rows = sp.csr_matrix(user_items, dtype=np.float32)
        if rows.shape[0] != len(userids):
            rows = rows[np.asarray(userids, dtype=np.int64)]
        return self.score_history(rows)

    def score_history(self, history: sp.csr_matrix) -> np.ndarray:
        rows = sp.csr_matrix(history, dtype=np.float32)
        return np.asarray((rows @ self.similarity).toarray(), dtype=np.float32)

    def score_similar(self, itemids: np.ndarray) -> np.ndarray:
        """The similarity rows of the query items (zero outside each item's K neighbours)."""
        return self.similarity[np.asarray(itemids, dtype=np.int64)].toarray()

    def _arrays(self) -> dict[str, np.ndarray]:
        sim = self.similarity
        return {
            "similarity_data": sim.data.astype(np.float32),
            "similarity_indices": sim.indices.astype(np.int32),
            "similarity_indptr": sim.indptr.astype(np.int64),
        }

    def _load_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        try:
            data = arrays["similarity_data"]
            indices = arrays["similarity_indices"]
            indptr = arrays["similarity_indptr"]
        except KeyError as exc:
            raise ArtifactError(f"{self.algorithm} model lacks array {exc.args[0]!r}") from None
        n = self.n_items
        valid = (
            data.ndim == indices.ndim == indptr.ndim == 1
            and len(indptr) == n + 1
            and len(data) == len(indices) == (int(indptr[-1]) if len(indptr) else -1)
            and indptr[0] == 0
            and bool(np.all(np.diff(indptr) >= 0))
            and (len(indices) == 0 or (indices.min() >= 0 and indices.max() < n))
        )
        if not valid:
            raise ArtifactError(
                f"{self.algorithm} similarity arrays do not form a {n} x {n} CSR matrix"
            )
        self._set_similarity(
            sp.csr_matrix(
                (data.astype(np.float32), indices.astype(np.int32), indptr.astype(np.int64)),
                shape=(n, n),
            )
        )


class BM25ItemKNN(ItemKNN):
    """Item-item similarity on BM25-weighted interactions: heavy users and items count less."""

    algorithm = "bm25"
    Config = BM25ItemKNNConfig

    def _weighted(self, user_items: sp.csr_matrix) -> sp.csr_matrix:
        cfg = self.config
        assert isinstance(cfg, BM25ItemKNNConfig)
        return sp.csr_matrix(bm25_weight(user_items.T, cfg.K1, cfg.B).T)

    def _make(self) -> ItemItemRecommender:
        cfg = self.config
        assert isinstance(cfg, BM25ItemKNNConfig)
        return BM25Recommender(K=cfg.K, K1=cfg.K1, B=cfg.B, num_threads=cfg.num_threads)
