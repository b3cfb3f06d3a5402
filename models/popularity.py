"""Non-personalized baselines: global popularity and trending (recency-weighted popularity).

They are the cold-start source of the service and the baseline every trained model must beat.
Per-segment popularity (by ``item_type`` or ``category``) is the global ranking restricted to the
segment's items, which the ranking pipeline's filter masks provide.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from pydantic import Field

from .base import ModelConfig, ProgressCallback, Recommender


class PopularityConfig(ModelConfig):
    """Popularity has no hyperparameters beyond how it counts."""

    count: str = Field("users", pattern="^(users|weight)$")
    """'users': number of distinct users per item; 'weight': sum of confidence weights."""


class Popularity(Recommender):
    """Ranks every item by how many users interacted with it; the same list for everyone."""

    algorithm = "popularity"
    Config = PopularityConfig

    scores_: np.ndarray

    def _fit(self, user_items: sp.csr_matrix, progress: ProgressCallback | None) -> None:
        cfg = self.config
        assert isinstance(cfg, PopularityConfig)
        if cfg.count == "users":
            counts = np.bincount(user_items.indices, minlength=self.n_items)
        else:
            counts = np.asarray(user_items.sum(axis=0)).ravel()
        self.scores_ = counts.astype(np.float32)

    def shared_scores(self) -> np.ndarray:
        """The one score row every user gets (see :class:`models.scoring.SharedScorer`)."""
        return self.scores_

    def score_users(self, userids: np.ndarray, user_items: sp.csr_matrix) -> np.ndarray:
        return np.broadcast_to(self.scores_, (len(userids), self.n_items))

    def score_history(self, history: sp.csr_matrix) -> np.ndarray:
        return np.broadcast_to(self.scores_, (history.shape[0], self.n_items))

    def score_similar(self, itemids: np.ndarray) -> np.ndarray:
        return np.broadcast_to(self.scores_, (len(itemids), self.n_items))

    def _arrays(self) -> dict[str, np.ndarray]:
        return {"scores": self.scores_}

    def _load_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        self.scores_ = np.asarray(arrays["scores"], dtype=np.float32)


class TrendingConfig(ModelConfig):
    """Trending decays each interaction's weight with its age."""

    half_life_days: float = Field(7.0, gt=0)
    """Days after which an interaction counts half as much as one made at the reference time."""


class Trending(Popularity):
    """Popularity where recent interactions count more (exponential decay by age).

    Fit it on a matrix whose values are already recency-decayed weights (the training pipeline
    builds that matrix with ``half_life_days``); it sums the weights per item.
    """

    algorithm = "trending"
    Config = TrendingConfig  # type: ignore[assignment]

    def _fit(self, user_items: sp.csr_matrix, progress: ProgressCallback | None) -> None:
        self.scores_ = np.asarray(user_items.sum(axis=0), dtype=np.float32).ravel()
