"""The base class every algorithm derives from: validated hyperparameters, fitting, scoring and
its state as arrays.

Algorithms work on contiguous indices (see :mod:`models.vocabulary`) and implement the scoring
primitives of :class:`models.scoring.Scorer`; turning scores into lists is the ranking
pipeline's job (:mod:`models.ranking`), never the algorithm's.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar, Self

import numpy as np
import scipy.sparse as sp
from pydantic import BaseModel, ConfigDict, ValidationError

from .errors import ArtifactError, InvalidInputError, NotReadyError

ProgressCallback = Callable[[int, float | None], None]
"""Called after each training iteration with ``(iteration, loss or None)``."""


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

    # --------------------------------------------------------------- helpers
    @property
    def is_fitted(self) -> bool:
        return self._fitted

    def _require_fitted(self) -> None:
        if not self._fitted:
            raise NotReadyError(f"{self.algorithm} model is not fitted")
