"""Models whose learned state is one dense item x item matrix (EASE, GF-CF).

A user's scores are their interaction row times the matrix, so trained users, users folded in
from recent items and "more like this" (a row of the matrix) are all scored the same way. The
matrix costs ``n_items² x 4`` bytes, and more while fitting: each model says how many such
matrices its fit holds at once, and a catalog over the memory budget is refused before any work,
with an estimate.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import scipy.sparse as sp

from .base import Recommender
from .errors import ArtifactError, ModelTooLargeError

BYTES = 4
"""Bytes per float32 entry."""


def dense_items_gb(n_items: int, copies: int) -> float:
    """GB (10⁹ bytes) that ``copies`` float32 ``n_items x n_items`` matrices take."""
    return n_items * n_items * BYTES * copies / 1e9


class ItemMatrixModel(Recommender):
    """Scoring, similarity, persistence and the memory budget of an item x item model.

    Subclasses set :attr:`label` and :attr:`working_copies`, fit :attr:`weights`, and may
    override :meth:`_input` (the rows a user is scored from; binary by default).
    """

    label: ClassVar[str]
    """The model's name in messages (``EASE``)."""
    working_copies: ClassVar[int]
    """Dense n_items² float32 matrices alive at the peak of a fit."""

    weights: np.ndarray
    """The ``(n_items, n_items)`` float32 matrix: row ``i`` is what item ``i`` adds to scores."""

    def _check_budget(self, max_memory_gb: float) -> None:
        needed = dense_items_gb(self.n_items, self.working_copies)
        if needed > max_memory_gb:
            raise ModelTooLargeError(
                f"{self.label} on {self.n_items} items needs about {needed:.2f} GB "
                f"(n_items² x {BYTES} bytes x {self.working_copies}), over max_memory_gb="
                f"{max_memory_gb:g}; raise max_memory_gb or drop rare items"
            )

    def _input(self, rows: sp.csr_matrix) -> sp.csr_matrix:
        """The rows as the model scores them: 0/1 interactions unless a subclass says otherwise."""
        rows = sp.csr_matrix(rows, dtype=np.float32)
        return sp.csr_matrix(
            ((rows.data != 0).astype(np.float32), rows.indices, rows.indptr), shape=rows.shape
        )

    def score_users(self, userids: np.ndarray, user_items: sp.csr_matrix) -> np.ndarray:
        rows = sp.csr_matrix(user_items)
        if rows.shape[0] != len(userids):
            rows = rows[np.asarray(userids, dtype=np.int64)]
        return self.score_history(rows)

    def score_history(self, history: sp.csr_matrix) -> np.ndarray:
        return np.asarray(self._input(history) @ self.weights, dtype=np.float32)

    def score_similar(self, itemids: np.ndarray) -> np.ndarray:
        return self.weights[np.asarray(itemids, dtype=np.int64)]

    def _arrays(self) -> dict[str, np.ndarray]:
        return {"weights": self.weights}

    def _load_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        try:
            weights = arrays["weights"]
        except KeyError:
            raise ArtifactError(f"{self.algorithm} model lacks array 'weights'") from None
        if weights.shape != (self.n_items, self.n_items):
            raise ArtifactError(
                f"{self.algorithm} weights have shape {weights.shape}, "
                f"expected {(self.n_items, self.n_items)}"
            )
        self.weights = np.ascontiguousarray(weights, dtype=np.float32)
