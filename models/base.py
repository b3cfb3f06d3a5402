"""The one recommender interface every algorithm implements, in implicit's vocabulary.

Algorithms work on contiguous indices (see :mod:`models.vocabulary`) and implement three scoring
primitives; this base class turns them into batched top-k recommendation with the usual filters:

* ``score_users(userids, user_items)``: known users, dense ``(batch, n_items)`` scores;
* ``score_history(history)``: users described only by a CSR matrix of items (fold-in);
* ``score_similar(itemids)``: item-to-item similarity rows.

Ranking never sorts the whole catalog: :func:`topk` uses ``argpartition`` and sorts only ``k``.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, Self

import numpy as np
import scipy.sparse as sp
from pydantic import BaseModel, ConfigDict, ValidationError

from models.errors import ArtifactError, InvalidInputError, NotReadyError
from models.npz import read_npz, write_npz

ProgressCallback = Callable[[int, float | None], None]
"""Called after each training iteration with ``(iteration, loss or None)``."""

NEG_INF = np.float32(-np.inf)


def _describe(algorithm: str, exc: ValidationError) -> str:
    """One line naming each bad hyperparameter, e.g. ``als: factors: must be > 0 (got -1)``."""
    parts = []
    for err in exc.errors():
        name = ".".join(str(p) for p in err["loc"]) or "params"
        got = f" (got {err['input']!r})" if err["type"] != "extra_forbidden" else ""
        msg = "unknown hyperparameter" if err["type"] == "extra_forbidden" else err["msg"]
        parts.append(f"{name}: {msg}{got}")
    return f"invalid {algorithm} hyperparameters: " + "; ".join(parts)


class ModelConfig(BaseModel):
    """Base of the per-algorithm hyperparameter objects (validated, immutable)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def topk(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Best ``k`` columns of each row of ``scores``, best first, without sorting whole rows.

    Entries equal to ``-inf`` are never returned: their ids come back as ``-1`` and their scores
    as ``-inf``, so callers can tell "fewer than k candidates" from real results.
    """
    scores = np.atleast_2d(scores)
    n_rows, n_cols = scores.shape
    k = min(k, n_cols)
    if k <= 0:
        return np.empty((n_rows, 0), np.int64), np.empty((n_rows, 0), np.float32)
    if k < n_cols:
        part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    else:
        part = np.broadcast_to(np.arange(n_cols), (n_rows, n_cols)).copy()
    part_scores = np.take_along_axis(scores, part, axis=1)
    # Stable sort by score descending, ties broken by ascending item index for determinism.
    order = np.lexsort((part, -part_scores), axis=1)
    ids = np.take_along_axis(part, order, axis=1).astype(np.int64)
    top_scores = np.take_along_axis(part_scores, order, axis=1).astype(np.float32)
    invalid = ~np.isfinite(top_scores) & (top_scores < 0)
    ids[invalid] = -1
    return ids, top_scores


TOPK_BLOCK = 64
"""Columns per block in :func:`top_k_ids`' first pass (block maxima bound the k-th score)."""


def top_k_ids(scores: np.ndarray, k: int) -> np.ndarray:
    """The ids :func:`topk` returns for ``scores``, without a full partition per row.

    The ``k``-th largest of a row's block maxima (blocks of :data:`TOPK_BLOCK` columns) is a lower
    bound on the row's ``k``-th largest score, so only the few blocks whose maximum reaches it
    hold candidates: one pass over the matrix instead of an ``argpartition`` of every row. Rows
    whose ``k``-th and ``k+1``-th scores tie (where ``topk``'s choice among the tied items is its
    partition's) and rows with fewer than ``k`` finite scores go through ``topk`` itself, so the
    result is the same array in every case.
    """
    scores = np.atleast_2d(scores)
    n_rows, n_cols = scores.shape
    n_full = n_cols // TOPK_BLOCK
    n_blocks = -(-n_cols // TOPK_BLOCK)
    if n_rows == 0 or k <= 0 or n_full < max(k, 4):
        return topk(scores, k)[0]
    block_max = np.empty((n_rows, n_blocks), dtype=scores.dtype)
    full = scores[:, : n_full * TOPK_BLOCK].reshape(n_rows, n_full, TOPK_BLOCK)
    block_max[:, :n_full] = full.max(axis=2)
    if n_blocks > n_full:
        block_max[:, n_full] = scores[:, n_full * TOPK_BLOCK :].max(axis=1)
    bound = np.partition(block_max, n_blocks - k, axis=1)[:, n_blocks - k]
    fast = bound > NEG_INF  # a -inf bound would make every entry a candidate
    # Candidate entries: those reaching the bound in the blocks whose maximum reaches it.
    cand_row, cand_block = np.nonzero((block_max >= bound[:, None]) & fast[:, None])
    cols = cand_block[:, None] * TOPK_BLOCK + np.arange(TOPK_BLOCK)
    inside = cols < n_cols
    cols = np.minimum(cols, n_cols - 1)
    rows = np.broadcast_to(cand_row[:, None], cols.shape)
    values = scores[rows, cols]
    keep = inside & (values >= bound[cand_row, None])
    rows, cols, values = rows[keep], cols[keep], values[keep]
    order = np.lexsort((cols, -values, rows))
    rows, cols, values = rows[order], cols[order], values[order]
    counts = np.bincount(rows, minlength=n_rows)
    starts = np.cumsum(counts) - counts
    ids = np.full((n_rows, k), -1, dtype=np.int64)
    picked = np.flatnonzero(fast)
    ids[picked] = cols[starts[picked, None] + np.arange(k)]
    # The k-th candidate ties with the next one: let topk pick among the tied items.
    longer = picked[counts[picked] > k]
    tied = longer[values[starts[longer] + k] == values[starts[longer] + k - 1]]
    slow = np.union1d(np.flatnonzero(~fast), tied)
    if len(slow):
        ids[slow] = topk(scores[slow], k)[0]
    return ids


class Recommender(ABC):
    """Base class of all Affinity algorithms (ALS, BPR, LMF, item-KNN, EASE, popularity, ...).

    Subclasses set :attr:`algorithm` and :attr:`Config`, implement ``_fit``, the three scoring
    primitives and ``_arrays`` / ``_load_arrays``.
    """

    algorithm: ClassVar[str]
    Config: ClassVar[type[ModelConfig]]

    def __init__(self, config: ModelConfig | None = None, **params: Any) -> None:
        try:
            if config is None:
                config = self.Config(**params)
            elif params:
                # model_copy(update=...) would skip validation; re-validate the merged values.
                config = self.Config.model_validate({**config.model_dump(), **params})
        except ValidationError as exc:
            raise InvalidInputError(_describe(self.algorithm, exc), field="params") from None
        self.config = config
        self.n_users = 0
        self.n_items = 0
        self.training_loss: list[float] = []
        self._fitted = False

    # ----------------------------------------------------------------- training
    def fit(self, user_items: sp.csr_matrix, progress: ProgressCallback | None = None) -> Self:
        """Fit on a (users x items) confidence matrix; returns ``self``."""
        user_items = sp.csr_matrix(user_items, dtype=np.float32)
        if user_items.nnz == 0:
            raise InvalidInputError("cannot fit on an empty interaction matrix")
        self.n_users, self.n_items = user_items.shape
        self.training_loss = []
        self._fit(user_items, progress)
        self._fitted = True
        return self

    @abstractmethod
    def _fit(self, user_items: sp.csr_matrix, progress: ProgressCallback | None) -> None: ...

    # ------------------------------------------------------------------ scoring
    @abstractmethod
    def score_users(self, userids: np.ndarray, user_items: sp.csr_matrix) -> np.ndarray:
        """Dense float32 scores ``(len(userids), n_items)``; ``user_items`` holds their rows.

        Return a new array or a read-only view, never an array the model keeps: the evaluation
        masks a writable float32 array that owns its memory in place instead of copying it.
        """

    @abstractmethod
    def score_history(self, history: sp.csr_matrix) -> np.ndarray:
        """Dense scores for users described only by ``history`` rows (fold-in)."""

    @abstractmethod
    def score_similar(self, itemids: np.ndarray) -> np.ndarray:
        """Dense similarity ``(len(itemids), n_items)`` of each query item to every item."""

    # ------------------------------------------------------------ public API
    def recommend(
        self,
        userids: np.ndarray | int,
        user_items: sp.csr_matrix,
        N: int = 10,
        filter_already_liked_items: bool = True,
        filter_items: np.ndarray | None = None,
        items: np.ndarray | None = None,
        recalculate_user: bool = False,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top ``N`` items for known users, in batch.

        ``user_items`` is either the full (users x items) matrix or just the rows of ``userids``.
        ``filter_items`` is a deny list, ``items`` an allow list (item indices). With
        ``recalculate_user`` the user's representation is recomputed from ``user_items`` (fold-in).
        Returns ``(ids, scores)`` of shape ``(batch, N)`` (1-d for a scalar ``userids``); slots
        without a candidate hold id ``-1`` and score ``-inf``.
        """
        self._require_fitted()
        scalar = np.isscalar(userids)
        users = np.atleast_1d(np.asarray(userids, dtype=np.int64))
        if users.size and (users.min() < 0 or users.max() >= self.n_users):
            raise InvalidInputError(f"user index out of range [0, {self.n_users})")
        rows = self._rows_for(users, user_items)
        scores = self.score_history(rows) if recalculate_user else self.score_users(users, rows)
        ids, top = self._rank(
            scores, N, rows if filter_already_liked_items else None, filter_items, items
        )
        return (ids[0], top[0]) if scalar else (ids, top)

    def recommend_history(
        self,
        history: sp.csr_matrix,
        N: int = 10,
        filter_already_liked_items: bool = True,
        filter_items: np.ndarray | None = None,
        items: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top ``N`` for users the model has never seen, each given as a row of item weights."""
        self._require_fitted()
        history = self._check_history(history)
        scores = self.score_history(history)
        return self._rank(
            scores, N, history if filter_already_liked_items else None, filter_items, items
        )

    def similar_items(
        self,
        itemids: np.ndarray | int,
        N: int = 10,
        filter_items: np.ndarray | None = None,
        items: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Items most similar to each query item; the query item itself is never returned."""
        self._require_fitted()
        scalar = np.isscalar(itemids)
        query = np.atleast_1d(np.asarray(itemids, dtype=np.int64))
        if query.size and (query.min() < 0 or query.max() >= self.n_items):
            raise InvalidInputError(f"item index out of range [0, {self.n_items})")
        scores = np.array(self.score_similar(query), dtype=np.float32, copy=True)
        scores[np.arange(len(query)), query] = NEG_INF
        ids, top = self._rank(scores, N, None, filter_items, items)
        return (ids[0], top[0]) if scalar else (ids, top)

    # ----------------------------------------------------------- persistence
    @abstractmethod
    def _arrays(self) -> dict[str, np.ndarray]:
        """The learned state as named numpy arrays (no object dtype)."""

    @abstractmethod
    def _load_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        """Restore the learned state written by :meth:`_arrays`."""

    def to_arrays(self) -> dict[str, np.ndarray]:
        self._require_fitted()
        arrays = self._arrays()
        arrays["_shape"] = np.array([self.n_users, self.n_items], dtype=np.int64)
        if self.training_loss:
            arrays["_training_loss"] = np.asarray(self.training_loss, dtype=np.float64)
        return arrays

    @classmethod
    def from_arrays(cls, params: dict[str, Any], arrays: dict[str, np.ndarray]) -> Self:
        model = cls(**params)
        try:
            model.n_users, model.n_items = (int(v) for v in arrays["_shape"])
        except KeyError:
            raise ArtifactError("model arrays lack '_shape'") from None
        if "_training_loss" in arrays:
            model.training_loss = [float(x) for x in arrays["_training_loss"]]
        model._load_arrays(arrays)
        model._fitted = True
        return model

    def save(self, path: str | Path) -> None:
        """Write ``model.npz`` and ``model.json`` into the directory ``path``."""
        directory = Path(path)
        directory.mkdir(parents=True, exist_ok=True)
        write_npz(directory / "model.npz", self.to_arrays())
        meta = {"algorithm": self.algorithm, "params": self.config.model_dump(mode="json")}
        (directory / "model.json").write_text(json.dumps(meta, indent=2))

    @classmethod
    def load(cls, path: str | Path) -> Recommender:
        """Load a model written by :meth:`save` (no pickle: ``allow_pickle=False``)."""
        from models.registry import get_algorithm

        directory = Path(path)
        try:
            meta = json.loads((directory / "model.json").read_text())
            arrays = read_npz(directory / "model.npz")
        except (OSError, ValueError) as exc:
            raise ArtifactError(f"cannot read model in {directory}: {exc}") from exc
        algo = get_algorithm(meta["algorithm"])
        return algo.from_arrays(meta["params"], arrays)

    # --------------------------------------------------------------- helpers
    @property
    def is_fitted(self) -> bool:
        return self._fitted

    def _require_fitted(self) -> None:
        if not self._fitted:
            raise NotReadyError(f"{self.algorithm} model is not fitted")

    def _rows_for(self, users: np.ndarray, user_items: sp.csr_matrix) -> sp.csr_matrix:
        user_items = sp.csr_matrix(user_items)
        if user_items.shape[1] != self.n_items:
            raise InvalidInputError(
                f"user_items has {user_items.shape[1]} columns, model has {self.n_items} items"
            )
        if user_items.shape[0] == len(users) and user_items.shape[0] != self.n_users:
            return user_items
        return user_items[users]

    def _check_history(self, history: sp.csr_matrix) -> sp.csr_matrix:
        history = sp.csr_matrix(history, dtype=np.float32)
        if history.shape[1] != self.n_items:
            raise InvalidInputError(
                f"history has {history.shape[1]} columns, model has {self.n_items} items"
            )
        return history

    def _item_indices(self, values: np.ndarray, name: str) -> np.ndarray:
        # A negative index would silently wrap around to the end of the catalog.
        indices = np.asarray(values, dtype=np.int64).ravel()
        if indices.size and (indices.min() < 0 or indices.max() >= self.n_items):
            raise InvalidInputError(
                f"{name} holds item indices outside [0, {self.n_items})", field=name
            )
        return indices

    def _rank(
        self,
        scores: np.ndarray,
        n: int,
        seen: sp.csr_matrix | None,
        filter_items: np.ndarray | None,
        items: np.ndarray | None,
    ) -> tuple[np.ndarray, np.ndarray]:
        if n <= 0:
            raise InvalidInputError("N must be positive", field="k")
        scores = np.array(scores, dtype=np.float32, copy=True)
        scores[~np.isfinite(scores)] = NEG_INF
        if seen is not None and seen.nnz:
            coo = seen.tocoo()
            scores[coo.row, coo.col] = NEG_INF
        if filter_items is not None and len(filter_items):
            scores[:, self._item_indices(filter_items, "filter_items")] = NEG_INF
        if items is not None:
            allowed = np.zeros(self.n_items, dtype=bool)
            allowed[self._item_indices(items, "items")] = True
            scores[:, ~allowed] = NEG_INF
        return topk(scores, n)
