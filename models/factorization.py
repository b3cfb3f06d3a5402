"""Matrix-factorization recommenders (ALS, BPR, LMF) fitted with implicit's CPU implementations.

The learned state is two float32 arrays, ``user_factors`` and ``item_factors``, such that
``user_factors @ item_factors.T`` is the score matrix (BPR and LMF carry implicit's bias columns).
Scoring, fold-in and item similarity are plain numpy, with the per-model matrices they need
(``YᵀY``, normalized item factors) computed once on first use and cached.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar, Literal

import numpy as np
import scipy.sparse as sp
from implicit.cpu.als import AlternatingLeastSquares
from implicit.cpu.bpr import BayesianPersonalizedRanking
from implicit.cpu.lmf import LogisticMatrixFactorization
from pydantic import NonNegativeInt, PositiveFloat, PositiveInt
from scipy.linalg import lapack
from threadpoolctl import threadpool_limits

from .base import ModelConfig, ProgressCallback, Recommender
from .errors import ArtifactError, InvalidInputError

logger = logging.getLogger(__name__)


class ALSConfig(ModelConfig):
    """Hyperparameters of implicit-feedback alternating least squares (Hu, Koren & Volinsky)."""

    factors: PositiveInt = 256
    """The number of latent factors."""
    regularization: PositiveFloat = 20.0
    """L2 penalty on user and item factors (strong: see ``docs/quality.md``)."""
    alpha: PositiveFloat = 2.0
    """Confidence scaling: implicit multiplies every matrix value by alpha (C_ui = alpha * r_ui)."""
    iterations: PositiveInt = 15
    """The number of ALS sweeps (users then items)."""
    use_cg: bool = True
    """Solve each least-squares step with conjugate gradient (faster) instead of Cholesky."""
    calculate_training_loss: bool = True
    """Compute the training loss after each iteration (into ``training_loss``)."""
    random_state: NonNegativeInt | None = 42
    """Seed of the initial factors; None for a random seed."""
    num_threads: NonNegativeInt = 0
    """Threads implicit uses for fitting; 0 means one per core."""
    formulation: Literal["implicit", "spark"] = "implicit"
    """Which least-squares problem the factors solve, and so how fold-in solves a new user.
    ``implicit`` (implicit's ALS, what :meth:`ALS.fit` runs): confidence ``C = alpha·r`` on a
    user's items and penalty ``λ``. ``spark`` (``pyspark.ml``'s implicit ALS, fitted by
    ``affinity train --engine spark``): confidence ``C = 1 + alpha·|r|`` and penalty
    ``λ·n``, ``n`` the number of the row's positive entries (the ALS-WR scaling); its
    ``regularization`` and ``alpha`` therefore mean something else, with other good values
    (``docs/quality.md``)."""


class BPRConfig(ModelConfig):
    """Hyperparameters of Bayesian personalized ranking (Rendle et al.), trained by SGD."""

    factors: PositiveInt = 64
    """The number of latent factors (implicit adds one item-bias column)."""
    learning_rate: PositiveFloat = 0.002
    """SGD step size. implicit's 0.01 over-fits within 100 epochs on MovieLens; a fifth of it
    over 300 epochs scored higher on the validation split of every data set measured
    (docs/quality.md)."""
    regularization: PositiveFloat = 0.01
    """L2 penalty applied at each SGD update."""
    iterations: PositiveInt = 300
    """The number of epochs over the positive interactions."""
    verify_negative_samples: bool = True
    """Resample negatives the user actually interacted with (slower, usually better)."""
    fold_in_regularization: PositiveFloat = 1.0
    """Ridge strength of the fold-in projection, relative to the mean eigenvalue of YᵀY."""
    random_state: NonNegativeInt | None = 42
    """Seed of the initial factors and of negative sampling; None for a random seed."""
    num_threads: NonNegativeInt = 0
    """Threads implicit uses for fitting; 0 means one per core (results then vary run to run)."""


class LMFConfig(ModelConfig):
    """Hyperparameters of logistic matrix factorization (Johnson 2014)."""

    factors: PositiveInt = 30
    """The number of latent factors (implicit adds user- and item-bias columns)."""
    learning_rate: PositiveFloat = 1.0
    """AdaGrad step size."""
    regularization: PositiveFloat = 3.0
    """L2 penalty on the factors. implicit's 0.6 over 30 epochs ties popularity on MovieLens;
    3.0 over 100 epochs scored higher on the validation split of every data set measured
    (docs/quality.md)."""
    iterations: PositiveInt = 100
    """The number of training epochs."""
    neg_prop: PositiveInt = 30
    """Negative samples drawn per positive interaction."""
    fold_in_regularization: PositiveFloat = 1.0
    """Ridge strength of the fold-in projection, relative to the mean eigenvalue of YᵀY."""
    random_state: NonNegativeInt | None = 42
    """Seed of the initial factors and of negative sampling; None for a random seed."""
    num_threads: NonNegativeInt = 0
    """Threads implicit uses for fitting; 0 means one per core (results then vary run to run)."""


class _FactorModel(Recommender):
    """Shared scoring, similarity and persistence of models with user and item factor matrices."""

    bias_columns: ClassVar[int] = 0
    """Trailing columns implicit reserves for biases (they hold a constant or a bias per row)."""

    user_factors: np.ndarray
    item_factors: np.ndarray

    def __init__(self, config: ModelConfig | None = None, **params: Any) -> None:
        super().__init__(config, **params)
        self._reset_caches()

    def _reset_caches(self) -> None:
        self._unit_items: np.ndarray | None = None
        self._items_t: np.ndarray | None = None

    def _set_factors(self, user_factors: np.ndarray, item_factors: np.ndarray) -> None:
        self.user_factors = np.ascontiguousarray(user_factors, dtype=np.float32)
        self.item_factors = np.ascontiguousarray(item_factors, dtype=np.float32)
        self._reset_caches()

    @property
    def _free_items(self) -> np.ndarray:
        """Item factors without implicit's bias columns."""
        k = self.bias_columns
        return self.item_factors[:, : self.item_factors.shape[1] - k]

    def score_users(self, userids: np.ndarray, user_items: sp.csr_matrix) -> np.ndarray:
        return self.score_vectors(self.user_vectors(userids))

    def user_vectors(self, userids: np.ndarray) -> np.ndarray:
        """The trained users' factor rows (what :meth:`score_vectors` multiplies)."""
        return self.user_factors[np.asarray(userids, dtype=np.int64)]

    def user_vector(self, userid: int) -> np.ndarray:
        """One trained user's factor row (a view; what a single request scores with)."""
        return self.user_factors[userid]

    def history_vectors(self, history: sp.csr_matrix) -> np.ndarray:
        """Factor rows of users described by ``history`` rows (fold-in)."""
        raise NotImplementedError

    def fold_in_items(self, items: np.ndarray, values: np.ndarray) -> np.ndarray:
        """:meth:`history_vectors` of one user whose history is distinct ``items``."""
        history = sp.csr_matrix(
            (
                np.asarray(values, dtype=np.float32),
                np.asarray(items, dtype=np.int64),
                [0, len(items)],
            ),
            shape=(1, self.n_items),
        )
        return self.history_vectors(history)[0]

    def score_vectors(self, vectors: np.ndarray) -> np.ndarray:
        """Scores ``vectors @ item_factorsᵀ`` of user vectors against every item.

        A batch of users is one GEMM against a contiguous copy of the transposed item factors:
        OpenBLAS handles a small batch times a transposed operand several times slower.
        """
        vectors = np.asarray(vectors, dtype=np.float32)
        if len(vectors) == 1:
            return vectors @ self.item_factors.T
        items_t = self._items_t
        if items_t is None:
            items_t = self._items_t = np.ascontiguousarray(self.item_factors.T)
        return vectors @ items_t

    def item_unit_vectors(self) -> np.ndarray:
        """Item factors scaled to length 1, bias columns left out (they are not taste); a zero
        vector stays zero. Cosine similarity is the dot product of two rows (a fresh array)."""
        free = self._free_items
        norms = np.linalg.norm(free, axis=1, keepdims=True)
        return np.divide(free, norms, out=np.zeros_like(free), where=norms > 0)

    def score_similar(self, itemids: np.ndarray) -> np.ndarray:
        """Cosine similarity of item factors (see :meth:`item_unit_vectors`)."""
        unit = self._unit_items
        if unit is None:
            unit = self._unit_items = self.item_unit_vectors()
        return unit[np.asarray(itemids, dtype=np.int64)] @ unit.T

    def _arrays(self) -> dict[str, np.ndarray]:
        return {"user_factors": self.user_factors, "item_factors": self.item_factors}

    def _load_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        try:
            users, items = arrays["user_factors"], arrays["item_factors"]
        except KeyError as exc:
            raise ArtifactError(f"{self.algorithm} model lacks array {exc.args[0]!r}") from None
        if users.ndim != 2 or items.ndim != 2 or users.shape[1] != items.shape[1]:
            raise ArtifactError(
                f"{self.algorithm} factor shapes {users.shape} and {items.shape} do not match"
            )
        if users.shape[0] != self.n_users or items.shape[0] != self.n_items:
            raise ArtifactError(
                f"{self.algorithm} factors cover {users.shape[0]} users x {items.shape[0]} items, "
                f"model shape is {self.n_users} x {self.n_items}"
            )
        if users.shape[1] <= self.bias_columns:
            raise ArtifactError(f"{self.algorithm} factors have too few columns")
        self._set_factors(users, items)


class ALS(_FactorModel):
    """Implicit-feedback ALS; fold-in solves the user's exact weighted least-squares problem."""

    algorithm = "als"
    Config = ALSConfig

    def _reset_caches(self) -> None:
        super()._reset_caches()
        self._gram: np.ndarray | None = None

    def _fit(self, user_items: sp.csr_matrix, progress: ProgressCallback | None) -> None:
        cfg = self.config
        assert isinstance(cfg, ALSConfig)
        if cfg.formulation != "implicit":
            raise InvalidInputError(
                f"ALS with formulation={cfg.formulation!r} is fitted by that engine "
                "(affinity train --engine spark), not by implicit",
                field="formulation",
            )

        def on_iteration(iteration: int, elapsed: float, loss: float | None) -> None:
            if loss is not None:
                self.training_loss.append(float(loss))
            logger.debug("als iteration %d took %.3fs, loss %s", iteration + 1, elapsed, loss)
            if progress is not None:
                progress(iteration + 1, None if loss is None else float(loss))

        with threadpool_limits(1, "blas"):
            model = AlternatingLeastSquares(
                factors=cfg.factors,
                regularization=cfg.regularization,
                alpha=cfg.alpha,
                dtype=np.float32,
                use_cg=cfg.use_cg,
                iterations=cfg.iterations,
                calculate_training_loss=cfg.calculate_training_loss,
                num_threads=cfg.num_threads,
                random_state=cfg.random_state,
            )
            model.fit(user_items, show_progress=False, callback=on_iteration)
        self._set_factors(model.user_factors, model.item_factors)

    def _regularized_gram(self) -> np.ndarray:
        """YᵀY + λI in float64 (YᵀY alone for the ``spark`` formulation, whose penalty depends
        on the row), computed once per model."""
        gram = self._gram
        if gram is None:
            cfg = self.config
            assert isinstance(cfg, ALSConfig)
            items = self.item_factors.astype(np.float64)
            gram = items.T @ items
            if cfg.formulation == "implicit":
                gram[np.diag_indices_from(gram)] += cfg.regularization
            self._gram = gram
        return gram

    def _row_terms(self, values: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
        """For one history's values: the weight of each item's ``y yᵀ`` term, its weight in the
        right-hand side, and the penalty added to the diagonal beyond :meth:`_regularized_gram`.

        ``implicit``: ``C = alpha·r``; weights ``|C| - 1`` and ``max(C, 0)``; no extra penalty.
        ``spark``: ``C = 1 + alpha·|r|``; weights ``alpha·|r|`` and ``C`` where ``r > 0`` (0
        elsewhere); penalty ``λ`` times the number of positive values.
        """
        cfg = self.config
        assert isinstance(cfg, ALSConfig)
        values = np.asarray(values, dtype=np.float64)
        if cfg.formulation == "implicit":
            confidence = values * cfg.alpha
            return np.abs(confidence) - 1.0, np.maximum(confidence, 0.0), 0.0
        extra = cfg.alpha * np.abs(values)
        positive = values > 0
        return extra, np.where(positive, 1.0 + extra, 0.0), cfg.regularization * positive.sum()

    def fold_in(self, history: sp.csr_matrix) -> np.ndarray:
        """User factors for ``history`` rows, solved exactly as the fitting engine solves users.

        Each row's factors are ``x = (YᵀY + Σ_i w_i y_i y_iᵀ + λ' I)⁻¹ Σ_i b_i y_i`` with the
        weights of :meth:`_row_terms` (for implicit's formulation, ``w = |C| - 1``, ``b = C`` for
        ``C = alpha·r > 0`` and ``λ' = λ``); a negative value is read as a confident dislike, as
        both engines do.
        """
        history = sp.csr_matrix(history, dtype=np.float32)
        if not history.has_canonical_format:
            history = history.copy()
            history.sum_duplicates()
        gram = self._regularized_gram()
        n_rows, n_factors = history.shape[0], gram.shape[0]
        lhs = np.broadcast_to(gram, (n_rows, n_factors, n_factors)).copy()
        rhs = np.zeros((n_rows, n_factors))
        indptr = history.indptr
        diagonal = np.arange(n_factors)
        # One small gather per row: the work is O(history length x factors²), never O(n_items).
        for row in range(n_rows):
            start, end = indptr[row], indptr[row + 1]
            if start == end:
                continue
            weight, target, penalty = self._row_terms(history.data[start:end])
            factors = self.item_factors[history.indices[start:end]].astype(np.float64)
            lhs[row] += (factors.T * weight) @ factors
            lhs[row, diagonal, diagonal] += penalty
            rhs[row] = target @ factors
        return np.linalg.solve(lhs, rhs[:, :, None])[:, :, 0].astype(np.float32)

    def fold_in_items(self, items: np.ndarray, values: np.ndarray) -> np.ndarray:
        """:meth:`fold_in` of one user whose history is distinct ``items`` with ``values``.

        The same solve without building a sparse matrix: a request's fold-in is then a gather
        of ``len(items)`` factor rows and one 64x64 solve.
        """
        weight, target, penalty = self._row_terms(values)
        factors = self.item_factors[np.asarray(items, dtype=np.int64)].astype(np.float64)
        lhs = self._regularized_gram() + (factors.T * weight) @ factors
        if penalty:
            lhs[np.diag_indices_from(lhs)] += penalty
        rhs = target @ factors
        # lhs = Σ_other y yᵀ + Σ_history |c| y yᵀ + λI is symmetric positive definite: a Cholesky
        # solve (LAPACK posv, called directly) costs less than numpy's general solve per request
        # (docs/benchmarks.md, "Where the time goes": fold-in).
        _, solution, info = lapack.dposv(lhs, rhs)
        if info != 0:  # pragma: no cover - only for a numerically broken model
            solution = np.linalg.solve(lhs, rhs)
        return np.asarray(solution, dtype=np.float32)

    def history_vectors(self, history: sp.csr_matrix) -> np.ndarray:
        return self.fold_in(history)

    def score_history(self, history: sp.csr_matrix) -> np.ndarray:
        return self.score_vectors(self.fold_in(history))


class _ProjectedFactorModel(_FactorModel):
    """Factor models without a closed-form fold-in (BPR, LMF): fold-in is a ridge projection.

    A new user's taste vector is the ridge regression of their binary history onto the item
    factors, ``x = (YᵀY + λI)⁻¹ Yᵀ h``; it is rescaled to the median length of the trained
    users' vectors so that implicit's item biases weigh as much as they do for trained users.
    The bias columns of the user vector take the trained users' median values.
    """

    def _reset_caches(self) -> None:
        super()._reset_caches()
        self._projection: tuple[np.ndarray, float, np.ndarray] | None = None

    def _projection_parts(self) -> tuple[np.ndarray, float, np.ndarray]:
        """``(YᵀY + λI)⁻¹``, the typical user vector length and the users' bias columns."""
        parts = self._projection
        if parts is None:
            cfg = self.config
            assert isinstance(cfg, BPRConfig | LMFConfig)
            free = self._free_items.astype(np.float64)
            gram = free.T @ free
            ridge = cfg.fold_in_regularization * max(np.trace(gram) / len(gram), 1e-12)
            gram[np.diag_indices_from(gram)] += ridge
            k = self.bias_columns
            n_free = self.user_factors.shape[1] - k
            user_free = self.user_factors[:, :n_free]
            length = float(np.median(np.linalg.norm(user_free, axis=1))) if len(user_free) else 1.0
            bias = np.median(self.user_factors[:, n_free:], axis=0).astype(np.float32)
            parts = (np.linalg.inv(gram), length, bias)
            self._projection = parts
        return parts

    def fold_in(self, history: sp.csr_matrix) -> np.ndarray:
        """User vectors (including the bias columns) for ``history`` rows."""
        inverse, length, bias = self._projection_parts()
        history = sp.csr_matrix(history, dtype=np.float32)
        # BPR and LMF train on which items a user touched, so the projection uses that too.
        # float32 like the factors, so scipy does not upcast the whole item matrix per call.
        liked = sp.csr_matrix(
            ((history.data > 0).astype(np.float32), history.indices, history.indptr),
            shape=history.shape,
        )
        n_free = self.item_factors.shape[1] - self.bias_columns
        # Multiply by the contiguous factor matrix and drop the bias columns afterwards: slicing
        # first would make scipy copy the whole (strided) item matrix on every request.
        summed = np.asarray(liked @ self.item_factors, dtype=np.float64)[:, :n_free]
        taste = summed @ inverse
        norms = np.linalg.norm(taste, axis=1, keepdims=True)
        taste = np.divide(taste * length, norms, out=np.zeros_like(taste), where=norms > 0)
        biases = np.broadcast_to(bias, (history.shape[0], len(bias)))
        return np.hstack([taste.astype(np.float32), biases])

    def history_vectors(self, history: sp.csr_matrix) -> np.ndarray:
        return self.fold_in(history)

    def score_history(self, history: sp.csr_matrix) -> np.ndarray:
        return self.score_vectors(self.fold_in(history))


class BPR(_ProjectedFactorModel):
    """Bayesian personalized ranking; ``training_loss`` holds 1 - the sampled training AUC."""

    algorithm = "bpr"
    Config = BPRConfig
    bias_columns = 1  # users: a constant 1; items: the item bias

    def _fit(self, user_items: sp.csr_matrix, progress: ProgressCallback | None) -> None:
        cfg = self.config
        assert isinstance(cfg, BPRConfig)
        samples = user_items.nnz

        def on_epoch(epoch: int, elapsed: float, correct: int, skipped: int) -> None:
            # implicit reports how many sampled (positive, negative) pairs were ranked right.
            checked = samples - skipped
            loss = 1.0 - correct / checked if checked > 0 else None
            if loss is not None:
                self.training_loss.append(loss)
            if progress is not None:
                progress(epoch + 1, loss)

        with threadpool_limits(1, "blas"):
            model = BayesianPersonalizedRanking(
                factors=cfg.factors,
                learning_rate=cfg.learning_rate,
                regularization=cfg.regularization,
                dtype=np.float32,
                iterations=cfg.iterations,
                num_threads=cfg.num_threads,
                verify_negative_samples=cfg.verify_negative_samples,
                random_state=cfg.random_state,
            )
            model.fit(user_items, show_progress=False, callback=on_epoch)
        self._set_factors(model.user_factors, model.item_factors)


class LMF(_ProjectedFactorModel):
    """Logistic matrix factorization; implicit reports no loss, so ``training_loss`` stays empty."""

    algorithm = "lmf"
    Config = LMFConfig
    bias_columns = 2  # users: 1 and the user bias; items: the item bias and 1

    def _fit(self, user_items: sp.csr_matrix, progress: ProgressCallback | None) -> None:
        cfg = self.config
        assert isinstance(cfg, LMFConfig)

        def on_epoch(epoch: int, elapsed: float, *_: Any) -> None:
            if progress is not None:
                progress(epoch + 1, None)

        with threadpool_limits(1, "blas"):
            model = LogisticMatrixFactorization(
                factors=cfg.factors,
                learning_rate=cfg.learning_rate,
                regularization=cfg.regularization,
                dtype=np.float32,
                iterations=cfg.iterations,
                neg_prop=cfg.neg_prop,
                num_threads=cfg.num_threads,
                random_state=cfg.random_state,
            )
            model.fit(user_items, show_progress=False, callback=on_epoch)
        self._set_factors(model.user_factors, model.item_factors)
