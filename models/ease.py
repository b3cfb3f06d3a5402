"""EASE (Steck 2019): a shallow linear item-item autoencoder with a closed-form solution.

``B = I - P / diag(P)`` with ``P = (XᵀX + λI)⁻¹`` and a zero diagonal, so an item never explains
itself. The dense ``n_items x n_items`` matrix is the learned state, which is why fitting checks
the memory it will need first and refuses catalogs that do not fit the budget.
"""

from __future__ import annotations

import logging
import os

import numpy as np
import scipy.linalg
import scipy.sparse as sp
from pydantic import PositiveFloat
from threadpoolctl import threadpool_limits

from .base import ModelConfig, ProgressCallback, Recommender
from .errors import ArtifactError, ModelTooLargeError

logger = logging.getLogger(__name__)

_WORKING_COPIES = 3
"""Dense n_items² float32 matrices alive at the peak of a fit (Gram, inverse, LAPACK work)."""
_BYTES = 4


def estimate_memory_gb(n_items: int) -> float:
    """Peak memory in GB (10⁹ bytes) that fitting EASE on ``n_items`` items needs."""
    return n_items * n_items * _BYTES * _WORKING_COPIES / 1e9


def _spd_inverse(gram: np.ndarray) -> np.ndarray:
    """Inverse of the symmetric positive definite float32 ``gram``, overwriting it.

    A Cholesky factorization and its inverse (LAPACK potrf + potri) take about half the time of
    a general LU inverse; potri fills one triangle, so the other is mirrored afterwards. Single
    precision is several times faster than double on ml-latest-small and changes no top-10 list
    there: the L2 term keeps the matrix well conditioned (``docs/benchmarks.md``, "Figures behind
    design choices in the code").
    """
    # The transpose of a C-ordered symmetric matrix is the same matrix in Fortran order, which
    # lets LAPACK work in place.
    lapack = scipy.linalg.lapack
    factor, info = lapack.spotrf(gram.T, lower=False, overwrite_a=True, clean=True)
    if info == 0:
        factor, info = lapack.spotri(factor, lower=False, overwrite_c=True)
    if info != 0:
        raise np.linalg.LinAlgError(f"EASE Gram matrix is not positive definite (info={info})")
    inverse = np.triu(factor)
    inverse += np.triu(inverse, 1).T
    return inverse


class EASEConfig(ModelConfig):
    """Hyperparameters of EASE."""

    l2: PositiveFloat = 200.0
    """L2 penalty λ added to the diagonal of XᵀX; larger values favour popular items less."""
    max_memory_gb: PositiveFloat = 8.0
    """Refuse to fit when the estimated peak memory (n_items² x 4 bytes x 3) exceeds this."""
    binary: bool = True
    """Use 0/1 interactions instead of the confidence weights, both to fit and to score."""


class EASE(Recommender):
    """Embarrassingly shallow autoencoder; ``score_similar`` returns rows of ``B``.

    Row ``i`` of ``B`` holds how much an interaction with item ``i`` raises every other item's
    score, which is exactly "users who liked i will like j" and what fold-in sums up.
    """

    algorithm = "ease"
    Config = EASEConfig

    weights: np.ndarray
    """The ``(n_items, n_items)`` float32 matrix B."""

    def _input(self, rows: sp.csr_matrix) -> sp.csr_matrix:
        cfg = self.config
        assert isinstance(cfg, EASEConfig)
        rows = sp.csr_matrix(rows, dtype=np.float32)
        if cfg.binary:
            rows = sp.csr_matrix(
                ((rows.data != 0).astype(np.float32), rows.indices, rows.indptr), shape=rows.shape
            )
        return rows

    def _fit(self, user_items: sp.csr_matrix, progress: ProgressCallback | None) -> None:
        cfg = self.config
        assert isinstance(cfg, EASEConfig)
        needed = estimate_memory_gb(self.n_items)
        if needed > cfg.max_memory_gb:
            raise ModelTooLargeError(
                f"EASE on {self.n_items} items needs about {needed:.2f} GB "
                f"(n_items² x {_BYTES} bytes x {_WORKING_COPIES}), over max_memory_gb="
                f"{cfg.max_memory_gb:g}; raise max_memory_gb or drop rare items"
            )
        x = self._input(user_items)
        # float32 holds co-occurrence counts exactly up to 2^24 and confidence sums closely.
        gram = np.asarray((x.T @ x).toarray(), dtype=np.float32)
        gram[np.diag_indices_from(gram)] += cfg.l2
        # Callers pin BLAS to one thread for implicit's sake; a dense inverse is pure LAPACK
        # and scales with cores, so it gets them all back.
        with threadpool_limits(os.cpu_count() or 1, "blas"):
            inverse = _spd_inverse(gram)
        del gram
        inverse /= -np.diag(inverse)[None, :]
        np.fill_diagonal(inverse, 0.0)
        self.weights = inverse
        logger.debug("EASE fitted on %d items with l2=%g", self.n_items, cfg.l2)
        if progress is not None:
            progress(1, None)

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
            raise ArtifactError("ease model lacks array 'weights'") from None
        if weights.shape != (self.n_items, self.n_items):
            raise ArtifactError(
                f"ease weights have shape {weights.shape}, expected {(self.n_items, self.n_items)}"
            )
        self.weights = np.ascontiguousarray(weights, dtype=np.float32)
