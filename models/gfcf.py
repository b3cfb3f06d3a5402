"""GF-CF (Shen et al., CIKM 2021): a training-free graph filter for implicit feedback.

With ``R`` the binary user x item matrix and ``R̃ = D_U^-1/2 R D_I^-1/2`` its degree-normalized
form, a user with interactions ``r`` scores the items

    s = r (R̃ᵀ R̃  +  alpha D_I^-1/2 V Vᵀ D_I^1/2)

The first term is a linear low-pass filter over the item-item graph (two-hop propagation with
symmetric normalization); the second is an ideal low-pass filter that keeps only the ``factors``
strongest frequencies: ``V`` holds the top right singular vectors of ``R̃``. Both terms are
closed-form: fitting is one sparse product and one truncated SVD, no epochs and no learning
rate.

Like EASE, the learned state is one dense ``n_items x n_items`` matrix (the two terms summed), so a
user's scores are a sum of rows and a new user is folded in from their items exactly as a trained
one is scored; fitting refuses a catalog whose matrix would not fit the memory budget, with an
estimate. The truncated SVD is exact (dense when one side of ``R̃`` is short, Lanczos otherwise),
as in the paper.
"""

from __future__ import annotations

import logging

import numpy as np
import scipy.sparse as sp
from pydantic import Field, PositiveFloat, PositiveInt
from scipy.sparse.linalg import svds

from .base import ModelConfig, ProgressCallback
from .item_matrix import ItemMatrixModel, dense_items_gb

logger = logging.getLogger(__name__)

_WORKING_COPIES = 2
"""Dense n_items² float32 matrices alive at the peak of a fit (the filter and one product)."""
_DENSE_SIDE = 3000
"""A matrix whose short side is at most this is decomposed densely (see the SVD function)."""
_DENSE_CELLS = 50_000_000
"""... and only when it has at most this many cells (400 MB as float64)."""
_ROW_BLOCK = 2048
"""Rows of the dense filter computed at a time (bounds the temporary products)."""


def estimate_memory_gb(n_items: int) -> float:
    """Peak memory in GB (10⁹ bytes) that fitting GF-CF on ``n_items`` items needs."""
    return dense_items_gb(n_items, _WORKING_COPIES)


class GFCFConfig(ModelConfig):
    """Hyperparameters of GF-CF."""

    beta: float = Field(0.4, ge=0.0, le=1.0)
    """Exponent of the item-degree normalization ``D_I^-beta``; the paper's 0.5 penalizes
    popular items more (the default was chosen on validation splits: docs/quality.md)."""
    alpha: float = Field(0.3, ge=0.0)
    """Weight of the ideal low-pass filter against the linear one (0: the linear filter alone)."""
    factors: PositiveInt = 256
    """Singular vectors the ideal low-pass filter keeps (capped by the matrix's rank)."""
    max_memory_gb: PositiveFloat = 8.0
    """Refuse to fit when the estimated peak memory (n_items² x 4 bytes x 2) exceeds this."""
    random_state: int = 0
    """Seed of the Lanczos iteration's starting vector (large matrices only)."""


def _normalized(matrix: sp.csr_matrix, beta: float) -> tuple[sp.csr_matrix, np.ndarray]:
    """``R̃ = D_U^-1/2 R D_I^-beta`` of the binary ``matrix`` and the item degrees."""
    binary = sp.csr_matrix(
        ((matrix.data != 0).astype(np.float32), matrix.indices, matrix.indptr), shape=matrix.shape
    )
    binary.eliminate_zeros()
    user_degree = np.asarray(binary.sum(axis=1), dtype=np.float64).ravel()
    item_degree = np.asarray(binary.sum(axis=0), dtype=np.float64).ravel()
    inv_user = np.divide(
        1.0, np.sqrt(user_degree), out=np.zeros_like(user_degree), where=user_degree > 0
    )
    inv_item = np.divide(
        1.0, item_degree**beta, out=np.zeros_like(item_degree), where=item_degree > 0
    )
    normalized = (
        sp.diags(inv_user.astype(np.float32)) @ binary @ sp.diags(inv_item.astype(np.float32))
    )
    return sp.csr_matrix(normalized, dtype=np.float32), item_degree


def top_right_singular_vectors(matrix: sp.csr_matrix, k: int, seed: int = 0) -> np.ndarray:
    """The ``k`` leading right singular vectors of the sparse ``matrix``, as ``(n_cols, k)``.

    A matrix with a short side is decomposed densely (exact, and fast when one side is small);
    otherwise ARPACK's Lanczos iteration finds the ``k`` leading triplets without densifying it.
    """
    n_rows, n_cols = matrix.shape
    k = min(k, n_rows, n_cols)
    if k >= min(n_rows, n_cols) - 1 or (
        min(n_rows, n_cols) <= _DENSE_SIDE and n_rows * n_cols <= _DENSE_CELLS
    ):
        _, _, vt = np.linalg.svd(matrix.toarray().astype(np.float64), full_matrices=False)
        return np.ascontiguousarray(vt[:k].T, dtype=np.float32)
    _, values, vt = svds(matrix.astype(np.float64), k=k, random_state=seed)
    order = np.argsort(-values, kind="stable")
    return np.ascontiguousarray(vt[order].T, dtype=np.float32)


class GFCF(ItemMatrixModel):
    """Graph filter collaborative filtering; ``score_similar`` returns rows of the filter.

    Row ``i`` of the filter is how much an interaction with item ``i`` raises every item's score,
    so similar items and fold-in come from the same matrix that ranks trained users.
    """

    algorithm = "gfcf"
    Config = GFCFConfig
    label = "GF-CF"
    working_copies = _WORKING_COPIES

    def _fit(self, user_items: sp.csr_matrix, progress: ProgressCallback | None) -> None:
        cfg = self.config
        assert isinstance(cfg, GFCFConfig)
        self._check_budget(cfg.max_memory_gb)
        normalized, item_degree = _normalized(user_items, cfg.beta)
        weights = np.asarray((normalized.T @ normalized).toarray(), dtype=np.float32)
        if cfg.alpha > 0:
            vectors = top_right_singular_vectors(normalized, cfg.factors, cfg.random_state)
            root = (item_degree**cfg.beta).astype(np.float32)
            inv_root = np.divide(1.0, root, out=np.zeros_like(root), where=root > 0)
            left = vectors * inv_root[:, None]  # D^-1/2 V
            right = np.ascontiguousarray((vectors * root[:, None]).T)  # Vᵀ D^1/2
            for start in range(0, self.n_items, _ROW_BLOCK):
                rows = slice(start, start + _ROW_BLOCK)
                weights[rows] += np.float32(cfg.alpha) * (left[rows] @ right)
        self.weights = weights
        logger.debug("GF-CF fitted on %d items (alpha=%g)", self.n_items, cfg.alpha)
        if progress is not None:
            progress(1, None)
