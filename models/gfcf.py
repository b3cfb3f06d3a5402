"""GF-CF (Shen et al., CIKM 2021): a training-free graph filter for implicit feedback.

With ``R`` the binary user x item matrix and ``R̃ = D_U^-1/2 R D_I^-1/2`` its degree-normalized
form, a user with interactions ``r`` scores the items

    s = r (R̃ᵀ R̃  +  alpha D_I^-1/2 V Vᵀ D_I^1/2)

The first term is a linear low-pass filter over the item-item graph (two-hop propagation with
symmetric normalization); the second is an ideal low-pass filter that keeps only the ``factors``
strongest frequencies: ``V`` holds the top right singular vectors of ``R̃``. Both terms are
closed-form: fitting is one sparse product and one truncated SVD, no epochs and no learning
rate.

Later work refines the filter. With ``sharpen`` > 0 the leading spectrum of the linear term is
sharpened as BSPM (Choi et al., SIGIR 2023) does with one Runge-Kutta step: each of its ``factors``
largest eigenvalues ``λ`` becomes ``λ p(Tλ)`` (``p``: the Taylor polynomial of ``e^-x`` to the
fourth order), one more thin term ``V diag(λ (p(Tλ) - 1)) Vᵀ`` beside the ideal filter. On Gowalla
this lifts recall@20 from the paper's 0.1849 to about 0.192 (docs/quality.md).

The filter is kept in one of two forms, which score identically:

- **dense** (catalogs up to ``dense_max_items``): like EASE, one ``n_items x n_items`` matrix (the
  two terms summed), so a user's scores are a sum of rows;
- **factored** (larger catalogs, the sparse logs the model is for): the sparse ``R̃`` and its
  transpose plus the two thin ``n_items x factors`` halves of the ideal filter, so memory grows with
  the interactions and the catalog, not the catalog squared. A user's scores are
  ``(r R̃ᵀ) R̃ + alpha (r D^-β V)(Vᵀ D^β)``: two sparse products and one thin dense one.

Either way a new user is folded in from their items exactly as a trained one is scored, and
fitting refuses a catalog whose form would not fit the memory budget, with an estimate. The
truncated SVD is exact (dense when one side of ``R̃`` is short, Lanczos otherwise), as in the paper.
"""

from __future__ import annotations

import logging
from typing import Literal

import numpy as np
import scipy.sparse as sp
from pydantic import Field, PositiveFloat, PositiveInt
from scipy.sparse.linalg import svds

from .base import ModelConfig, ProgressCallback
from .errors import ArtifactError, ModelTooLargeError
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


_SPARSE_ENTRY_BYTES = 8 * 3
"""Per interaction while fitting the factored form: ``R̃`` and its transpose (float32 value and
int32 index each) and the float64 copy the Lanczos iteration works on (value and index)."""
_LANCZOS_VECTORS = 2
"""ARPACK keeps about ``2 x factors`` float64 basis vectors of each side of the matrix."""


def estimate_memory_gb(n_items: int) -> float:
    """Peak memory in GB (10⁹ bytes) that fitting the dense form on ``n_items`` items needs."""
    return dense_items_gb(n_items, _WORKING_COPIES)


def estimate_factored_memory_gb(
    n_users: int, n_items: int, n_interactions: int, factors: int
) -> float:
    """Peak memory in GB that fitting the factored form needs: linear in every size."""
    sparse = n_interactions * _SPARSE_ENTRY_BYTES
    lanczos = (n_users + n_items) * _LANCZOS_VECTORS * factors * 8
    halves = 2 * n_items * factors * 4
    return (sparse + lanczos + halves) / 1e9


class GFCFConfig(ModelConfig):
    """Hyperparameters of GF-CF."""

    beta: float = Field(0.4, ge=0.0, le=1.0)
    """Exponent of the item-degree normalization ``D_I^-beta``; the paper's 0.5 penalizes
    popular items more (the default was chosen on validation splits: docs/quality.md)."""
    alpha: float = Field(0.3, ge=0.0)
    """Weight of the ideal low-pass filter against the linear one (0: the linear filter alone)."""
    factors: PositiveInt = 256
    """Singular vectors the ideal low-pass filter (and the sharpening) keep (capped by the
    matrix's rank)."""
    sharpen: float = Field(0.0, ge=0.0, le=10.0)
    """Strength ``T`` of the sharpening of the linear filter's leading spectrum (0: off, the
    paper's GF-CF). Each of the ``factors`` leading eigenvalues ``λ`` of ``R̃ᵀR̃`` becomes
    ``λ p(Tλ)`` with ``p`` the fourth-order Taylor polynomial of ``e^-x``: what one Runge-Kutta
    step of the sharpening process of BSPM (Choi et al., SIGIR 2023) does to it. Strong, broad
    co-occurrence is damped so that the rarer, more specific neighbours rank higher."""
    form: Literal["auto", "dense", "factored"] = "auto"
    """How the filter is kept (the lists are the same): ``dense``, one n_items² matrix;
    ``factored``, the sparse normalized interactions and the thin ideal filter, linear in size;
    ``auto``, dense up to ``dense_max_items`` items and factored above."""
    dense_max_items: PositiveInt = 16_000
    """``auto`` keeps the filter dense up to this catalog size (a 1 GB matrix)."""
    max_memory_gb: PositiveFloat = 8.0
    """Refuse to fit when the estimated peak memory exceeds this (dense: n_items² x 4 bytes x 2;
    factored: see :func:`estimate_factored_memory_gb`)."""
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


def top_right_singular_pairs(
    matrix: sp.csr_matrix, k: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` largest singular values of the sparse ``matrix`` (descending) and their right
    singular vectors as ``(n_cols, k)``.

    A matrix with a short side is decomposed densely (exact, and fast when one side is small);
    otherwise ARPACK's Lanczos iteration finds the ``k`` leading triplets without densifying it.
    """
    n_rows, n_cols = matrix.shape
    k = min(k, n_rows, n_cols)
    if k >= min(n_rows, n_cols) - 1 or (
        min(n_rows, n_cols) <= _DENSE_SIDE and n_rows * n_cols <= _DENSE_CELLS
    ):
        _, values, vt = np.linalg.svd(matrix.toarray().astype(np.float64), full_matrices=False)
        return values[:k], np.ascontiguousarray(vt[:k].T, dtype=np.float32)
    _, values, vt = svds(matrix.astype(np.float64), k=k, random_state=seed)
    order = np.argsort(-values, kind="stable")
    return values[order], np.ascontiguousarray(vt[order].T, dtype=np.float32)


def top_right_singular_vectors(matrix: sp.csr_matrix, k: int, seed: int = 0) -> np.ndarray:
    """The ``k`` leading right singular vectors of the sparse ``matrix``, as ``(n_cols, k)``."""
    return top_right_singular_pairs(matrix, k, seed)[1]


def sharpening(eigenvalues: np.ndarray, strength: float) -> np.ndarray:
    """What sharpening adds to each eigenvalue ``λ`` of ``R̃ᵀR̃``: ``λ (p(Tλ) - 1)``.

    ``p(x) = 1 - x + x²/2 - x³/6 + x⁴/24`` (one fourth-order Runge-Kutta step of ``dy/dt = -y P``
    over ``T``), so the filter's eigenvalue becomes ``λ p(Tλ)``.
    """
    x = strength * np.asarray(eigenvalues, dtype=np.float64)
    taylor = 1.0 - x + x**2 / 2.0 - x**3 / 6.0 + x**4 / 24.0
    return eigenvalues * (taylor - 1.0)


class GFCF(ItemMatrixModel):
    """Graph filter collaborative filtering; ``score_similar`` returns rows of the filter.

    Row ``i`` of the filter is how much an interaction with item ``i`` raises every item's score,
    so similar items and fold-in come from the same filter that ranks trained users. In the
    factored form that row is computed on demand instead of stored.
    """

    algorithm = "gfcf"
    Config = GFCFConfig
    label = "GF-CF"
    working_copies = _WORKING_COPIES

    weights: np.ndarray | None = None  # type: ignore[assignment]
    _graph: sp.csr_matrix | None = None
    """Factored form: ``R̃`` (users x items)."""
    _graph_t: sp.csr_matrix | None = None
    """Factored form: ``R̃ᵀ`` (items x users), for the first hop from a user's items."""
    _left: np.ndarray | None = None
    """Left halves of the spectral terms, (n_items, f): ``alpha D^-β V`` and the sharpening's
    ``V diag(...)`` side by side; zero columns when both are off."""
    _right: np.ndarray | None = None
    """Their right halves, (f, n_items): ``Vᵀ D^β`` and ``Vᵀ``."""

    @property
    def factored(self) -> bool:
        """Whether the filter is kept factored (see :class:`GFCFConfig`)."""
        return self.weights is None

    def _wants_factored(self) -> bool:
        cfg = self.config
        assert isinstance(cfg, GFCFConfig)
        return cfg.form == "factored" or (cfg.form == "auto" and self.n_items > cfg.dense_max_items)

    def _fit(self, user_items: sp.csr_matrix, progress: ProgressCallback | None) -> None:
        cfg = self.config
        assert isinstance(cfg, GFCFConfig)
        factored = self._wants_factored()
        if factored:
            needed = estimate_factored_memory_gb(
                self.n_users, self.n_items, int(user_items.nnz), cfg.factors
            )
            if needed > cfg.max_memory_gb:
                raise ModelTooLargeError(
                    f"GF-CF (factored) on {self.n_users} users, {self.n_items} items and "
                    f"{user_items.nnz} interactions needs about {needed:.2f} GB, over "
                    f"max_memory_gb={cfg.max_memory_gb:g}; raise max_memory_gb or lower factors"
                )
        else:
            self._check_budget(cfg.max_memory_gb)
        normalized, item_degree = _normalized(user_items, cfg.beta)
        left, right = self._ideal_halves(normalized, item_degree)
        self.weights = None
        self._graph = self._graph_t = self._left = self._right = None
        if factored:
            self._graph = normalized
            self._graph_t = sp.csr_matrix(normalized.T)
            self._left, self._right = left, right
        else:
            # C order: scipy's toarray() may give Fortran order here, and every sparse-row
            # product against a Fortran matrix copies it first (hundreds of ms per list).
            weights = np.ascontiguousarray((normalized.T @ normalized).toarray(), dtype=np.float32)
            for start in range(0, self.n_items, _ROW_BLOCK):
                rows = slice(start, start + _ROW_BLOCK)
                weights[rows] += left[rows] @ right
            self.weights = weights
        logger.debug(
            "GF-CF fitted on %d items (alpha=%g, %s)",
            self.n_items,
            cfg.alpha,
            "factored" if factored else "dense",
        )
        if progress is not None:
            progress(1, None)

    def _ideal_halves(
        self, normalized: sp.csr_matrix, item_degree: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """The spectral terms as two thin factors ``left @ right``: the ideal low-pass filter
        ``alpha D^-β V Vᵀ D^β`` and the sharpening ``V diag(λ (p(Tλ) - 1)) Vᵀ``, side by side."""
        cfg = self.config
        assert isinstance(cfg, GFCFConfig)
        lefts: list[np.ndarray] = []
        rights: list[np.ndarray] = []
        if cfg.alpha > 0 or cfg.sharpen > 0:
            values, vectors = top_right_singular_pairs(normalized, cfg.factors, cfg.random_state)
            if cfg.alpha > 0:
                root = (item_degree**cfg.beta).astype(np.float32)
                inv_root = np.divide(1.0, root, out=np.zeros_like(root), where=root > 0)
                lefts.append(vectors * (np.float32(cfg.alpha) * inv_root)[:, None])
                rights.append(vectors * root[:, None])
            if cfg.sharpen > 0:
                change = sharpening(values**2, cfg.sharpen).astype(np.float32)
                lefts.append(vectors * change[None, :])
                rights.append(vectors)
        if not lefts:
            empty = np.zeros((self.n_items, 0), dtype=np.float32)
            return empty, np.ascontiguousarray(empty.T)
        left = np.ascontiguousarray(np.hstack(lefts), dtype=np.float32)
        right = np.ascontiguousarray(np.hstack(rights).T, dtype=np.float32)
        return left, right

    # ------------------------------------------------------------------ scoring
    def _filter(self, rows: sp.csr_matrix) -> np.ndarray:
        """``rows`` (n x n_items) times the filter, from the factored form."""
        assert self._graph is not None and self._graph_t is not None
        assert self._left is not None and self._right is not None
        users = rows @ self._graph_t
        scores = np.asarray((users @ self._graph).toarray(), dtype=np.float32)
        if self._left.shape[1]:
            scores += np.asarray(rows @ self._left, dtype=np.float32) @ self._right
        return scores

    def score_history(self, history: sp.csr_matrix) -> np.ndarray:
        if not self.factored:
            return super().score_history(history)
        return self._filter(self._input(history))

    def score_similar(self, itemids: np.ndarray) -> np.ndarray:
        if not self.factored:
            return super().score_similar(itemids)
        items = np.asarray(itemids, dtype=np.int64)
        unit = sp.csr_matrix(
            (np.ones(len(items), dtype=np.float32), items, np.arange(len(items) + 1)),
            shape=(len(items), self.n_items),
        )
        return self._filter(unit)

    # ----------------------------------------------------------- persistence
    def _arrays(self) -> dict[str, np.ndarray]:
        if not self.factored:
            return super()._arrays()
        assert self._graph is not None and self._left is not None and self._right is not None
        return {
            "graph_data": self._graph.data,
            "graph_indices": self._graph.indices,
            "graph_indptr": self._graph.indptr,
            "ideal_left": self._left,
            "ideal_right": self._right,
        }

    def _load_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        if "weights" in arrays:
            super()._load_arrays(arrays)
            return
        names = ("graph_data", "graph_indices", "graph_indptr", "ideal_left", "ideal_right")
        missing = [name for name in names if name not in arrays]
        if missing:
            raise ArtifactError(
                f"gfcf model lacks array 'weights' (dense form) or {', '.join(map(repr, missing))} "
                "(factored form)"
            )
        try:
            graph = sp.csr_matrix(
                (
                    np.asarray(arrays["graph_data"], dtype=np.float32),
                    np.asarray(arrays["graph_indices"]),
                    np.asarray(arrays["graph_indptr"]),
                ),
                shape=(self.n_users, self.n_items),
            )
            graph.check_format(full_check=True)
        except ValueError as exc:
            raise ArtifactError(f"gfcf graph arrays are inconsistent: {exc}") from None
        left = np.ascontiguousarray(arrays["ideal_left"], dtype=np.float32)
        right = np.ascontiguousarray(arrays["ideal_right"], dtype=np.float32)
        if left.ndim != 2 or left.shape[0] != self.n_items or right.shape != left.shape[::-1]:
            raise ArtifactError(
                f"gfcf ideal filter halves have shapes {left.shape} and {right.shape}, expected "
                f"({self.n_items}, f) and (f, {self.n_items})"
            )
        self.weights = None
        self._graph, self._graph_t = graph, sp.csr_matrix(graph.T)
        self._left, self._right = left, right
