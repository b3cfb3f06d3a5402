"""The seam between algorithms and ranking: what the ranking pipeline asks of a model.

Every algorithm is a :class:`Scorer`: dense scores for trained users, for users known only by
their items (fold-in), and item-to-item similarity. Factor models (ALS, BPR, LMF) are also
:class:`VectorScorer`\\ s: they score by the inner product of a user vector with item vectors, so
the pipeline can search an index of the item vectors instead of scoring the whole catalog.
Models that give every user the same scores (popularity) are :class:`SharedScorer`\\ s, ranked
once per batch instead of once per user. The pipeline picks its path with ``isinstance`` on
these protocols, once per model; nothing else about an algorithm is visible to it.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np
import scipy.sparse as sp


@runtime_checkable
class Scorer(Protocol):
    """Dense scores over the whole catalog; every algorithm provides these."""

    n_items: int

    def score_users(self, userids: np.ndarray, user_items: sp.csr_matrix) -> np.ndarray:
        """Float32 scores ``(len(userids), n_items)``; ``user_items`` holds those users' rows.

        A new array or a read-only view, never an array the model keeps: the pipeline masks a
        writable float32 array that owns its memory in place instead of copying it.
        """
        ...

    def score_history(self, history: sp.csr_matrix) -> np.ndarray:
        """Scores for users described only by ``history`` rows of item weights (fold-in)."""
        ...

    def score_similar(self, itemids: np.ndarray) -> np.ndarray:
        """Similarity ``(len(itemids), n_items)`` of each query item to every item."""
        ...


@runtime_checkable
class VectorScorer(Scorer, Protocol):
    """A model whose score of item ``i`` for a user is ``user_vector · item_factors[i]``."""

    item_factors: np.ndarray

    def user_vector(self, userid: int) -> np.ndarray:
        """One trained user's vector."""
        ...

    def user_vectors(self, userids: np.ndarray) -> np.ndarray:
        """Trained users' vectors, one row each."""
        ...

    def history_vectors(self, history: sp.csr_matrix) -> np.ndarray:
        """Vectors of users described by ``history`` rows of item weights (fold-in)."""
        ...

    def fold_in_items(self, items: np.ndarray, values: np.ndarray) -> np.ndarray:
        """The vector of one user whose history is the distinct ``items`` with ``values``."""
        ...

    def item_unit_vectors(self) -> np.ndarray:
        """Item vectors scaled to length 1: similar items are ranked by their dot products."""
        ...


@runtime_checkable
class SharedScorer(Scorer, Protocol):
    """A model that gives every user the same scores (non-personalized baselines)."""

    def shared_scores(self) -> np.ndarray:
        """The one float32 score row every user gets."""
        ...
