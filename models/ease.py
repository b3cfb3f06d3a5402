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

from .base import ModelConfig, ProgressCallback
from .item_matrix import ItemMatrixModel, dense_items_gb

logger = logging.getLogger(__name__)

_WORKING_COPIES = 3
"""Dense n_items² float32 matrices alive at the peak of a fit (Gram, inverse, LAPACK work)."""


def estimate_memory_gb(n_items: int) -> float:
    """Peak memory in GB (10⁹ bytes) that fitting EASE on ``n_items`` items needs."""
    return dense_items_gb(n_items, _WORKING_COPIES)


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


class EASE(ItemMatrixModel):
    """Embarrassingly shallow autoencoder; ``score_similar`` returns rows of ``B``.

    Row ``i`` of ``B`` holds how much an interaction with item ``i`` raises every other item's
    score, which is exactly "users who liked i will like j" and what fold-in sums up.
    """

    algorithm = "ease"
    Config = EASEConfig
    label = "EASE"
    working_copies = _WORKING_COPIES

    def _input(self, rows: sp.csr_matrix) -> sp.csr_matrix:
        cfg = self.config
        assert isinstance(cfg, EASEConfig)
        return super()._input(rows) if cfg.binary else sp.csr_matrix(rows, dtype=np.float32)

    def _fit(self, user_items: sp.csr_matrix, progress: ProgressCallback | None) -> None:
        cfg = self.config
        assert isinstance(cfg, EASEConfig)
        self._check_budget(cfg.max_memory_gb)
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
