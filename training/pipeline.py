"""One training run, end to end, as a sequence of named stages with typed hand-offs.

:func:`run_training` (what ``affinity train`` calls) reads -> splits -> chooses the algorithm
(``auto`` only) -> fits or tunes -> evaluates -> packages -> logs, registers and promotes,
recording in one MLflow run what an experimenter compares (parameters, dataset statistics and
fingerprint, metrics of the model, the popularity baseline and each user cohort, the training
loss, timings, the evaluation report and the quarantine summary); the gate of
:mod:`training.promotion` decides the new version's alias.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import mlflow
import numpy as np
import pandas as pd
import scipy.sparse as sp

from models import ann
from models.algorithms import get_algorithm
from models.artifact import ItemCatalog, ModelBundle, save_artifact
from models.base import Recommender
from models.errors import InvalidInputError
from models.ranking_metrics import item_popularity, metric_key
from models.scoring import VectorScorer
from models.vocabulary import Vocabulary
from registry import mlflow_store
from training import promotion
from training.auto import AUTO, AutoChoice, DataSize, choose_algorithm
from training.confidence import (
    ConfidenceConfig,
    InteractionMatrix,
    build_matrix,
    recency_weights,
    vocabulary_codes,
)
from training.data import (
    EventWeights,
    LoadResult,
    catalog_arrays,
    dataset_fingerprint,
    load_catalog,
    load_interactions,
)
from training.evaluate import (
    Evaluation,
    Holdout,
    build_holdout,
    evaluate_with_baseline,
    sample_users,
    user_stages,
)
from training.fit import LOCAL, SPARK_ALGORITHMS, Engine, fit_model
from training.split import SplitStats, split, train_validation_test
from training.tune import tune

logger = logging.getLogger(__name__)

Progress = Callable[[str], None]


@dataclass
class TrainOptions:
    """Everything ``affinity train`` can set; defaults are the documented ones."""

    interactions: Path | Sequence[Path]
    """A log file, a directory of logs, or several (``training.data.log_files``)."""
    items: Path | None = None
    test: Path | None = None
    algorithm: str = AUTO
    """A name of :mod:`models.algorithms`, or ``auto``: the best of
    :data:`training.auto.AUTO_CANDIDATES` with their defaults on the validation split."""
    params: dict[str, Any] = field(default_factory=dict)
    """Hyperparameters of ``algorithm`` (none with ``auto``: each candidate uses its defaults)."""
    split: Literal["temporal", "random"] = "temporal"
    test_fraction: float = 0.2
    validation_fraction: float = 0.2
    k: int = 10
    tune: int = 0
    model_name: str = "affinity"
    force_promote: bool = False
    event_weights: dict[str, float] | None = None
    confidence: ConfidenceConfig = field(default_factory=ConfidenceConfig)
    trending_half_life_days: float = 7.0
    seed: int = 42
    primary_metric: str = "ndcg"
    """What tuning optimises and the promotion gate compares: a name of
    :data:`models.ranking_metrics.TARGET_METRICS`, measured at ``k`` (see :attr:`metric`)."""
    experiment: str = "affinity"
    quarantine_path: Path | None = None
    erasures: Mapping[str, datetime] | None = None
    """Erased users and when: their rows at or before it are dropped from every input (the
    ``--events`` store's erasures); ``rows`` then counts them as ``erased``."""
    register: bool = True
    eval_users: int = 10_000
    """Evaluate on at most this many held-out users, sampled with ``seed`` (0: all of them)."""
    engine: Engine = LOCAL
    """Where the model is fitted (``--engine``): here, or ALS on Spark (:mod:`training.spark`)."""
    ann_min_items: int = ann.MIN_ITEMS
    """A factor model (ALS, BPR, LMF) over at least this many items ships an approximate index
    (:mod:`models.ann`) that the server searches instead of the exact one; 0: never."""

    @property
    def metric(self) -> str:
        """The logged name of :attr:`primary_metric` at ``k``, e.g. ``ndcg_at_20``."""
        return metric_key(self.primary_metric, self.k)


@dataclass
class TrainResult:
    """What a training run produced; ``to_json`` is the ``--json`` contract of the CLI."""

    run_id: str
    model_name: str
    model_version: str | None
    promoted: bool
    metrics: dict[str, float]
    baseline_metrics: dict[str, float]
    rows: dict[str, int]
    decision: str = ""
    best_params: dict[str, Any] = field(default_factory=dict)
    algorithm: str = ""
    """The algorithm fitted: the one named, or the one ``auto`` chose."""
    auto: AutoChoice | None = None
    """How ``auto`` chose :attr:`algorithm`; ``None`` when it was named."""

    def to_json(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "model_name": self.model_name,
            "model_version": self.model_version,
            "promoted": self.promoted,
            "metrics": self.metrics,
            "baseline_metrics": self.baseline_metrics,
            "rows": self.rows,
            "decision": self.decision,
            "algorithm": self.algorithm,
            "params": self.best_params,
            "auto": None if self.auto is None else self.auto.to_json(),
        }


def _noop(_: str) -> None:
    pass


# --------------------------------------------------------------------------------------------
# The run


def run_training(opts: TrainOptions, progress: Progress = _noop) -> TrainResult:
    """Run one training end to end and return its summary (see module docstring).

    The run works in a temporary folder (the default quarantine files and the artifact before
    MLflow copies it into the run and the registry) that is removed when the run ends, failed or
    not; a quarantine file too large to log is moved out of it first (see :func:`log_reports`).
    """
    if not opts.engine.is_local and opts.algorithm == AUTO:
        # Spark fits ALS only: there is nothing to choose between.
        opts = replace(opts, algorithm=SPARK_ALGORITHMS[0])
    validate_options(opts)
    mlflow_store.configure_tracking()
    workdir = Path(tempfile.mkdtemp(prefix="affinity-train-"))
    try:
        inputs = read_inputs(opts, workdir, progress)
        data = split_data(opts, inputs, workdir, progress)
        beside_fit = _start_beside_fit(opts, inputs, data)
        mlflow.set_experiment(opts.experiment)
        with mlflow.start_run() as run:
            run_id = run.info.run_id
            mlflow.set_tags(
                {
                    "algorithm": opts.algorithm,
                    "split": _split_name(opts),
                    "interactions_path": _describe(opts.interactions),
                }
            )
            chosen = choose(opts, data, progress)
            # From here on the run is the one of --algorithm <chosen>.
            opts = replace(opts, algorithm=chosen.algorithm)
            fitted = fit_or_tune(opts, inputs, data, progress)
            evaluated = evaluate_model(opts, inputs, data, fitted, beside_fit, progress)
            packaged = package_model(opts, data, fitted, evaluated, run_id, workdir)
            log_reports(inputs, data, evaluated, run_id, workdir, progress)
            registered = register_and_promote(opts, data, evaluated, packaged, progress)
            timings = {
                **inputs.timings,
                **data.timings,
                **chosen.timings,
                **fitted.timings,
                **evaluated.timings,
                **packaged.timings,
                **registered.timings,
                "total_seconds": time.perf_counter() - inputs.started,
            }
            log_summary(chosen, fitted, evaluated, timings)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return TrainResult(
        run_id=run_id,
        model_name=opts.model_name,
        model_version=registered.version,
        promoted=registered.promoted,
        metrics={k: float(v) for k, v in evaluated.metrics.items()},
        baseline_metrics={k: float(v) for k, v in evaluated.baseline_metrics.items()},
        rows=inputs.rows,
        decision=registered.decision,
        best_params=fitted.params,
        algorithm=opts.algorithm,
        auto=chosen.auto,
    )


# --------------------------------------------------------------------------------------------
# Hand-offs between the stages, in the order the run makes them. ``timings`` of each are the
# seconds its stage measured, under the keys the run logs as ``time_<key>``.


@dataclass(frozen=True)
class Inputs:
    """What :func:`read_inputs` hands on: the accepted log, its quarantine and the catalog."""

    loaded: LoadResult
    """The accepted interactions, with the count and reasons of the quarantined rows."""
    rows: dict[str, int]
    """Rows ``read`` = ``accepted`` + ``quarantined`` of the interaction log."""
    weights: EventWeights
    catalog: pd.DataFrame | None
    """Item metadata given with ``--items``, if any."""
    started: float
    """When the run began (``time.perf_counter``): the origin of the timings over stages."""
    timings: dict[str, float]


@dataclass(frozen=True)
class SplitData:
    """What :func:`split_data` hands on: the training and held-out parts, and the tuning split."""

    train: pd.DataFrame
    test: pd.DataFrame
    matrix: InteractionMatrix
    """``train`` as a confidence matrix: what the model is fitted on, and its id maps."""
    tune_fit: pd.DataFrame | None
    """The fit part of the tuning split (``None`` without ``--tune`` or ``auto``)."""
    validation: pd.DataFrame | None
    """The validation part of the tuning split (``None`` without ``--tune`` or ``auto``)."""
    stats: SplitStats | None
    """Statistics of the test split; ``None`` for a holdout given with ``--test``."""
    given: LoadResult | None
    """The holdout given with ``--test``, with its quarantine; ``None`` when split off the log."""
    timings: dict[str, float]


@dataclass(frozen=True)
class Chosen:
    """What :func:`choose` hands on: the algorithm to fit, and how ``auto`` chose it."""

    algorithm: str
    auto: AutoChoice | None
    """Each candidate's validation result; ``None`` when the algorithm was named."""
    timings: dict[str, float]


@dataclass(frozen=True)
class Fitted:
    """What :func:`fit_or_tune` hands on: the fitted model and how it was configured."""

    model: Recommender
    params: dict[str, Any]
    """The model's whole configuration, defaults included (logged as ``model.*``)."""
    tuning: dict[str, Any]
    """The summary of :func:`training.tune.tune`; empty without ``--tune``."""
    ticker: Progress
    """Throttled progress of the fit; evaluation goes on with it so messages keep one pace."""
    timings: dict[str, float]


@dataclass(frozen=True)
class BesideFit:
    """What a run prepares beside the fit (see :func:`_prepare_beside_fit`)."""

    fingerprint: str
    full_holdout: Holdout
    holdout: Holdout
    """``full_holdout`` cut to the evaluated users (``eval_users``, seeded sample)."""
    seen: sp.csr_matrix
    popularity: np.ndarray
    trending: np.ndarray
    catalog: ItemCatalog
    seconds: float


@dataclass(frozen=True)
class Evaluated:
    """What :func:`evaluate_model` hands on: the model's and the baseline's evaluations."""

    evaluation: Evaluation
    baseline: Evaluation
    """The popularity baseline on the same holdout."""
    stats: dict[str, Any]
    """Dataset statistics, logged as ``data_<name>`` metrics."""
    prepared: BesideFit
    """The holdout (``prepared.holdout`` is the one evaluated) and the serving extras."""
    timings: dict[str, float]

    @property
    def metrics(self) -> dict[str, float]:
        return self.evaluation.metrics

    @property
    def baseline_metrics(self) -> dict[str, float]:
        return self.baseline.metrics


@dataclass(frozen=True)
class Packaged:
    """What :func:`package_model` hands on: the artifact, as a bundle and as a folder."""

    bundle: ModelBundle
    artifact_dir: Path
    timings: dict[str, float]


@dataclass(frozen=True)
class Registered:
    """What :func:`register_and_promote` hands on: the new version and the gate's decision."""

    version: str | None
    promoted: bool
    decision: str
    timings: dict[str, float]


# --------------------------------------------------------------------------------------------
# The stages


def validate_options(opts: TrainOptions) -> None:
    """Fail on an unknown algorithm, bad hyperparameters or a bad ``k`` before any work."""
    if not opts.engine.is_local:
        from training.spark import require_pyspark

        opts.engine.check(opts.algorithm)
        require_pyspark()
    if opts.algorithm != AUTO:
        get_algorithm(opts.algorithm)(**opts.engine.params(opts.algorithm, opts.params))
    elif opts.params:
        raise InvalidInputError(
            f"--param {', '.join(opts.params)}: hyperparameters belong to one algorithm, and "
            "--algorithm auto fits each candidate with its defaults; name the algorithm "
            "(e.g. --algorithm als) to set them",
            field="param",
        )
    if opts.k <= 0:
        raise InvalidInputError(f"--k must be positive, got {opts.k}", field="k")
    if opts.ann_min_items < 0:
        raise InvalidInputError(
            f"--ann-min-items must be >= 0 (0: never), got {opts.ann_min_items}",
            field="ann_min_items",
        )
    metric_key(opts.primary_metric, opts.k)  # an unknown metric fails here, not after the fit


def read_inputs(opts: TrainOptions, workdir: Path, progress: Progress) -> Inputs:
    """Read and validate the interaction log (bad rows go to quarantine) and the item catalog."""
    started = time.perf_counter()
    weights = EventWeights.from_mapping(opts.event_weights)
    progress(f"loading interactions from {opts.interactions}")
    # Categorical ids and events: the split, the matrices and the fingerprint then work on
    # integer codes, and a Parquet log is read without a Python string per row.
    loaded = load_interactions(
        opts.interactions,
        event_weights=weights,
        quarantine_path=opts.quarantine_path or workdir / "quarantine.csv",
        categorical=True,
        erasures=opts.erasures,
    )
    rows = _row_counts(loaded, erasures=opts.erasures is not None)
    erased = f" + erased {rows['erased']:,}" if "erased" in rows else ""
    progress(
        f"rows read {rows['read']:,} = accepted {rows['accepted']:,} + "
        f"quarantined {rows['quarantined']:,}{erased}"
    )
    catalog = load_catalog(opts.items) if opts.items is not None else None
    return Inputs(
        loaded=loaded,
        rows=rows,
        weights=weights,
        catalog=catalog,
        started=started,
        timings={"read_seconds": time.perf_counter() - started},
    )


def split_data(opts: TrainOptions, inputs: Inputs, workdir: Path, progress: Progress) -> SplitData:
    """Split the log into training and held-out parts (or read the ``--test`` holdout).

    With ``--tune`` or ``auto``, the training part is split again into a fit part and a
    validation part that the search and the choice score on, so they never see the test part.
    """
    frame = inputs.loaded.frame
    given: LoadResult | None = None
    stats: SplitStats | None = None
    tune_fit: pd.DataFrame | None = None
    validation: pd.DataFrame | None = None
    if opts.test is not None:
        progress(f"loading holdout from {opts.test}")
        given = load_interactions(
            opts.test,
            event_weights=inputs.weights,
            quarantine_path=workdir / "test-quarantine.csv",
            erasures=opts.erasures,
        )
        train_frame, test_frame = frame, given.frame
        if _wants_validation(opts):
            tuning = split(frame, opts.split, fraction=opts.validation_fraction, seed=opts.seed + 1)
            tune_fit, validation = tuning.train, tuning.test
    else:
        progress(f"splitting ({opts.split}, test fraction {opts.test_fraction})")
        if _wants_validation(opts) or opts.test_fraction == 0:
            parts = train_validation_test(
                frame,
                method=opts.split,
                test_fraction=opts.test_fraction,
                validation_fraction=opts.validation_fraction,
                seed=opts.seed,
            )
            train_frame, test_frame = parts.train_full, parts.test
            tune_fit, validation = parts.train, parts.validation
            stats = parts.test_split.stats
        else:
            # The validation split only serves tuning; without it, the test split is the same
            # one train_validation_test makes first.
            outer = split(frame, opts.split, fraction=opts.test_fraction, seed=opts.seed)
            train_frame, test_frame = outer.train, outer.test
            stats = outer.stats
    timings = {"load_seconds": time.perf_counter() - inputs.started}  # reading and splitting
    started = time.perf_counter()
    matrix = build_matrix(train_frame, opts.confidence)
    timings["matrix_seconds"] = time.perf_counter() - started
    return SplitData(
        train=train_frame,
        test=test_frame,
        matrix=matrix,
        tune_fit=tune_fit,
        validation=validation,
        stats=stats,
        given=given,
        timings=timings,
    )


def choose(opts: TrainOptions, data: SplitData, progress: Progress) -> Chosen:
    """The algorithm to fit: the one named, or with ``auto`` the best of
    :data:`training.auto.AUTO_CANDIDATES` with their defaults on the validation split.

    ``auto`` logs the candidates (param ``auto.candidates``), each one's validation value and fit
    seconds (metrics ``auto_validation.<alg>``, ``auto_fit_seconds.<alg>``), each skip's reason
    (tag ``auto_skipped.<alg>``) and the tags ``algorithm_choice=auto`` and ``algorithm``.
    """
    if opts.algorithm != AUTO:
        return Chosen(algorithm=opts.algorithm, auto=None, timings={})
    assert data.tune_fit is not None and data.validation is not None  # split_data made them
    started = time.perf_counter()
    n_users, n_items = data.matrix.matrix.shape
    auto = choose_algorithm(
        data.tune_fit,
        data.validation,
        confidence=opts.confidence,
        k=opts.k,
        metric=opts.metric,
        eval_users=opts.eval_users,
        seed=opts.seed,
        refit_size=DataSize(n_users, n_items, int(data.matrix.matrix.nnz)),
        progress=progress,
    )
    mlflow.log_param("auto.candidates", ",".join(c.algorithm for c in auto.candidates))
    mlflow.log_metrics(
        {
            f"auto_{name}.{c.algorithm}": value
            for c in auto.candidates
            for name, value in (("validation", c.value), ("fit_seconds", c.seconds))
            if value is not None
        }
    )
    skipped = {f"auto_skipped.{c.algorithm}": c.skipped for c in auto.candidates if c.skipped}
    mlflow.set_tags(
        {
            "algorithm_choice": AUTO,
            "algorithm": auto.chosen,
            **{name: reason[:5000] for name, reason in skipped.items()},  # MLflow's tag limit
        }
    )
    return Chosen(
        algorithm=auto.chosen, auto=auto, timings={"auto_seconds": time.perf_counter() - started}
    )


def fit_or_tune(opts: TrainOptions, inputs: Inputs, data: SplitData, progress: Progress) -> Fitted:
    """Tune on the validation split if asked, log the parameters, fit on the training part.

    The training loss of each iteration is logged as the ``training_loss`` metric.
    """
    params = dict(opts.params)
    tuning: dict[str, Any] = {}
    timings: dict[str, float] = {}
    if opts.tune and data.tune_fit is not None and data.validation is not None:
        progress(f"tuning {opts.algorithm}: {opts.tune} trials on the validation split")
        started = time.perf_counter()
        tuning = tune(
            opts.algorithm,
            data.tune_fit,
            data.validation,
            confidence=opts.confidence,
            n_trials=opts.tune,
            k=opts.k,
            base_params=params,
            seed=opts.seed,
            metric=opts.metric,
            progress=progress,
            engine=opts.engine,
        )
        params = {**params, **tuning["best_params"]}
        timings["tune_seconds"] = time.perf_counter() - started

    full_params = get_algorithm(opts.algorithm)(
        **opts.engine.params(opts.algorithm, params)
    ).config.model_dump(mode="json")
    mlflow.log_params(
        {
            "algorithm": opts.algorithm,
            **opts.engine.describe(),
            **{f"model.{k}": v for k, v in full_params.items()},
            "k": opts.k,
            "split": _split_name(opts),
            "test_fraction": opts.test_fraction,
            "seed": opts.seed,
            "tune_trials": opts.tune,
            "eval_users": opts.eval_users,
            "ann_min_items": opts.ann_min_items,
            "primary_metric": opts.metric,
            **{f"confidence.{k}": v for k, v in opts.confidence.model_dump().items()},
            **{f"event_weight.{k}": v for k, v in inputs.weights.as_dict().items()},
        }
    )
    train = data.matrix
    progress(f"fitting {opts.algorithm} on {train.matrix.nnz:,} user-item pairs")
    started = time.perf_counter()
    ticker = _Throttle(progress)

    def on_iteration(iteration: int, loss: float | None) -> None:
        if loss is not None:
            mlflow.log_metric("training_loss", float(loss), step=iteration)
        ticker(f"  iteration {iteration}" + ("" if loss is None else f", loss {loss:.6g}"))

    model = fit_model(opts.algorithm, params, train.matrix, on_iteration, engine=opts.engine)
    timings["fit_seconds"] = time.perf_counter() - started
    return Fitted(model=model, params=full_params, tuning=tuning, ticker=ticker, timings=timings)


def evaluate_model(
    opts: TrainOptions,
    inputs: Inputs,
    data: SplitData,
    fitted: Fitted,
    beside_fit: Future[BesideFit],
    progress: Progress,
) -> Evaluated:
    """Log the dataset statistics, then evaluate the model and the popularity baseline.

    Waits for what :func:`_prepare_beside_fit` prepares (the holdout among it).
    """
    started = time.perf_counter()
    prepared = beside_fit.result()
    timings = {
        "prepare_wait_seconds": time.perf_counter() - started,
        "prepare_seconds": prepared.seconds,
    }
    mlflow.set_tag("dataset_fingerprint", prepared.fingerprint)
    stats = _dataset_stats(inputs.rows, data.matrix, prepared)
    mlflow.log_metrics({f"data_{k}": float(v) for k, v in stats.items()})
    if data.stats is not None:
        mlflow.log_metrics({k: float(v) for k, v in data.stats.as_dict().items()})

    misses = (
        f"; {stats['n_test_pairs_unknown_item']:,} held-out pairs of items unseen in "
        "training count as misses"
        if stats["n_test_pairs_unknown_item"]
        else ""
    )
    progress(
        f"evaluating on {stats['n_eval_users']:,} of {stats['n_test_users']:,} held-out users "
        f"(k={opts.k}){misses}"
    )
    started = time.perf_counter()
    holdout = prepared.holdout
    evaluation, baseline = evaluate_with_baseline(
        fitted.model,
        data.matrix.matrix,
        holdout.matrix,
        k=opts.k,
        item_popularity=prepared.popularity,  # counted once, beside the fit
        unrankable=holdout.unrankable,
        progress=lambda done, total: fitted.ticker(f"  evaluated batch {done}/{total}"),
        catalog=prepared.catalog,  # categories: diversity of models without item vectors
        # Every metric per lifecycle stage, each user's as of the end of the training part.
        stages=user_stages(data.train, data.matrix.users),
    )
    timings["evaluate_seconds"] = time.perf_counter() - started
    mlflow.set_tag("diversity_basis", evaluation.diversity_basis or "none")
    mlflow.log_metrics({k: float(v) for k, v in evaluation.to_flat_dict().items()})
    mlflow.log_metrics({f"baseline_{k}": float(v) for k, v in baseline.to_flat_dict().items()})
    return Evaluated(
        evaluation=evaluation,
        baseline=baseline,
        stats=stats,
        prepared=prepared,
        timings=timings,
    )


def package_model(
    opts: TrainOptions,
    data: SplitData,
    fitted: Fitted,
    evaluated: Evaluated,
    run_id: str,
    workdir: Path,
) -> Packaged:
    """Save the artifact and log it under ``affinity_model/``.

    The artifact holds the model, the id maps, the seen items, the item metadata and the
    popularity and trending lists, and for a factor model over a large catalog an approximate
    index (see :func:`approximate_index`).
    """
    started = time.perf_counter()
    prepared = evaluated.prepared
    ann_arrays, ann_info = approximate_index(opts, fitted.model)
    bundle = ModelBundle(
        model=fitted.model,
        users=data.matrix.users,
        items=data.matrix.items,
        seen=prepared.seen,
        catalog=prepared.catalog,
        popularity=prepared.popularity,
        trending=prepared.trending,
        info={
            "dataset_fingerprint": prepared.fingerprint,
            # The newest interaction the model was fitted on: the server folds in a user's
            # events after it (service/live.py).
            "data_until": _newest(data.train),
            "run_id": run_id,
            "primary_metric": opts.metric,
            "metrics": {k: float(v) for k, v in evaluated.metrics.items()},
            **({"ann": ann_info} if ann_info else {}),
        },
        ann=ann_arrays,
    )
    artifact_dir = workdir / "artifact"
    save_artifact(bundle, artifact_dir)
    mlflow.log_artifacts(str(artifact_dir), "affinity_model")
    return Packaged(
        bundle=bundle,
        artifact_dir=artifact_dir,
        timings={"artifact_seconds": time.perf_counter() - started},
    )


def approximate_index(
    opts: TrainOptions, model: Recommender
) -> tuple[dict[str, np.ndarray] | None, dict[str, Any]]:
    """The approximate index of a factor model over at least ``opts.ann_min_items`` items (as
    the artifact's arrays) and what its build measured, logged to MLflow as ``ann.*``
    parameters and ``ann_*`` metrics; ``(None, {})`` for any other model. Without faiss the
    artifact goes without one (logged as a warning): the server then searches exactly."""
    if (
        opts.ann_min_items <= 0
        or model.n_items < opts.ann_min_items
        or not isinstance(model, VectorScorer)
    ):
        return None, {}
    if not ann.faiss_available():
        logger.warning(
            "%d items >= --ann-min-items %d, but faiss is not installed: the artifact has no "
            "approximate index (pip install 'affinity-recommender[ann]')",
            model.n_items,
            opts.ann_min_items,
        )
        mlflow.set_tag("ann", "skipped: faiss is not installed")
        return None, {}
    logger.info("building an approximate index over %d items", model.n_items)
    index, report = ann.build(
        model.item_factors, query_vectors=model.user_vectors(_sampled_users(model, opts.seed))
    )
    arrays = index.to_arrays()
    info = {**report.to_json(), "index_bytes": int(arrays["index"].nbytes)}
    mlflow.log_params(
        {"ann.kind": report.kind, "ann.effort": report.effort}
        | {f"ann.{k}": v for k, v in report.params.items()}
    )
    metrics = {
        "ann_build_seconds": report.build_seconds,
        "ann_tune_seconds": report.tune_seconds,
        "ann_index_bytes": float(info["index_bytes"]),
    }
    if info["recall_at_10"] is not None:
        metrics["ann_recall_at_10"] = float(info["recall_at_10"])
    mlflow.log_metrics(metrics)
    return arrays, info


def _sampled_users(model: Recommender, seed: int, n: int = 200) -> np.ndarray:
    """Up to ``n`` trained users, sampled with ``seed``: the queries that tune the index."""
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(model.n_users, size=min(n, model.n_users), replace=False))


def _newest(frame: pd.DataFrame) -> str:
    """The latest ``timestamp`` of ``frame`` as ISO 8601 UTC ("" when empty)."""
    if frame.empty:
        return ""
    newest = int(frame["timestamp"].max())
    return datetime.fromtimestamp(newest, UTC).isoformat(timespec="seconds")


QUARANTINE_LOG_LIMIT = 50 * 1024 * 1024
"""Quarantine files up to this size are logged to the run; larger ones are kept on disk."""


def log_reports(
    inputs: Inputs,
    data: SplitData,
    evaluated: Evaluated,
    run_id: str,
    workdir: Path,
    progress: Progress,
) -> None:
    """Log ``evaluation/report.md`` and the quarantine: ``quarantine/summary.json`` and the files.

    Nothing a user needs to fix its log may vanish with the work folder: a quarantine file of at
    most :data:`QUARANTINE_LOG_LIMIT` bytes is logged under ``quarantine/``; a larger one written
    in the work folder is moved to ``<tmp>/affinity-quarantine-<run id>-<name>`` and announced.
    """
    mlflow.log_text(
        evaluated.evaluation.report_markdown(baseline=evaluated.baseline), "evaluation/report.md"
    )
    loaded, given = inputs.loaded, data.given
    summary: dict[str, Any] = {
        **inputs.rows,
        "reasons": dict(loaded.reasons),
        "quarantine_file": _keep_quarantine(
            loaded.quarantine_path if loaded.rows_quarantined else None, workdir, run_id, progress
        ),
        "test_rows": (
            _row_counts(given, erasures=given.rows_erased > 0) if given is not None else None
        ),
    }
    if given is not None:
        summary["test_reasons"] = dict(given.reasons)
        summary["test_quarantine_file"] = _keep_quarantine(
            given.quarantine_path if given.rows_quarantined else None, workdir, run_id, progress
        )
    mlflow.log_dict(summary, "quarantine/summary.json")


def register_and_promote(
    opts: TrainOptions,
    data: SplitData,
    evaluated: Evaluated,
    packaged: Packaged,
    progress: Progress,
) -> Registered:
    """Register the artifact as a new version and apply the promotion gate.

    With ``register`` off, nothing is registered and the decision says so.
    """
    if not opts.register:
        return Registered(version=None, promoted=False, decision="not registered", timings={})
    metric = evaluated.metrics.get(opts.metric, float("nan"))
    progress(f"registering a new version of {opts.model_name}")
    started = time.perf_counter()
    mv = mlflow_store.log_and_register(
        packaged.artifact_dir,
        model_name=opts.model_name,
        tags={
            "algorithm": opts.algorithm,
            "dataset_fingerprint": evaluated.prepared.fingerprint,
            opts.metric: f"{metric:.6f}",
        },
    )
    version = str(mv.version)
    timings = {"register_seconds": time.perf_counter() - started}
    started = time.perf_counter()
    gate = promotion.decide(
        model_name=opts.model_name,
        new_version=version,
        new_metric=float(metric),
        metric_name=opts.metric,
        train=data.matrix,
        test=evaluated.prepared.holdout,
        k=opts.k,
        force=opts.force_promote,
    )
    timings["gate_seconds"] = time.perf_counter() - started
    mlflow.set_tags({"promotion_decision": gate.message, "promoted": str(gate.promoted).lower()})
    if gate.champion_metric is not None:
        mlflow.log_metric(f"champion_{opts.metric}", gate.champion_metric)
    progress(gate.message)
    return Registered(
        version=version, promoted=gate.promoted, decision=gate.message, timings=timings
    )


def log_summary(
    chosen: Chosen, fitted: Fitted, evaluated: Evaluated, timings: dict[str, float]
) -> None:
    """Log the timings as ``time_<key>`` metrics and ``evaluation/report.json``.

    Logged last so that its timings cover the registry and the promotion gate too.
    """
    mlflow.log_metrics({f"time_{k}": v for k, v in timings.items()})
    report = {
        "metrics": evaluated.metrics,
        "baseline_metrics": evaluated.baseline_metrics,
        "cohorts": evaluated.evaluation.to_flat_dict(),
        "dataset": evaluated.stats,
        "timings": timings,
        "tuning": fitted.tuning,
        "auto": None if chosen.auto is None else chosen.auto.to_json(),
    }
    mlflow.log_dict(report, "evaluation/report.json")


# --------------------------------------------------------------------------------------------
# Work beside the fit


def _start_beside_fit(opts: TrainOptions, inputs: Inputs, data: SplitData) -> Future[BesideFit]:
    """Start :func:`_prepare_beside_fit` in a helper thread; the fit runs meanwhile.

    Implicit fits in its own threads without the GIL, and these steps are single-threaded numpy
    and pandas work that would otherwise run alone on one core before and after the fit.
    """
    helper = ThreadPoolExecutor(max_workers=1, thread_name_prefix="affinity-prepare")
    pending = helper.submit(
        _prepare_beside_fit,
        opts,
        inputs.loaded.frame,
        data.train,
        data.test,
        data.matrix,
        inputs.catalog,
    )
    helper.shutdown(wait=False)  # the thread ends with its one task, whatever the run does
    return pending


def _prepare_beside_fit(
    opts: TrainOptions,
    frame: pd.DataFrame,
    train_frame: pd.DataFrame,
    test_frame: pd.DataFrame,
    train: InteractionMatrix,
    catalog_df: pd.DataFrame | None,
) -> BesideFit:
    """Every step of a run that needs the data but not the model."""
    started = time.perf_counter()
    # Held-out items unseen in training stay relevant (misses); unseen users are left out.
    full_holdout = build_holdout(test_frame, train.users, train.items)
    holdout = sample_users(full_holdout, opts.eval_users, opts.seed)
    trending_weights = recency_weights(train_frame, opts.trending_half_life_days)
    # Serving must never re-recommend what a user already has, so the seen lists cover the
    # whole log (training part and holdout), not only the pairs the model was fitted on.
    seen = train.matrix
    if opts.test is None:
        seen = build_matrix(frame, opts.confidence, users=train.users, items=train.items).matrix
    return BesideFit(
        fingerprint=dataset_fingerprint(frame),
        full_holdout=full_holdout,
        holdout=holdout,
        seen=seen,
        popularity=item_popularity(train.matrix).astype(np.float32),
        trending=_item_sums(train_frame, trending_weights, train.items),
        catalog=_with_first_seen(catalog_arrays(train.items.ids, catalog_df), frame, train.items),
        seconds=time.perf_counter() - started,
    )


def _with_first_seen(catalog: ItemCatalog, frame: pd.DataFrame, items: Vocabulary) -> ItemCatalog:
    """``catalog`` with each item's first appearance: the catalog's ``first_seen`` where it
    gives one, otherwise the item's earliest interaction in the whole log (unix seconds)."""
    idx = vocabulary_codes(frame["item_id"], items)
    keep = idx >= 0
    earliest = np.full(len(items), np.inf)
    np.minimum.at(earliest, idx[keep], frame["timestamp"].to_numpy(dtype=np.float64)[keep])
    earliest[np.isinf(earliest)] = np.nan
    given = np.asarray(catalog.first_seen, dtype=np.float64)
    catalog.first_seen = np.where(np.isfinite(given), given, earliest)
    return catalog


def _item_sums(frame: pd.DataFrame, weights: np.ndarray, items: Vocabulary) -> np.ndarray:
    idx = vocabulary_codes(frame["item_id"], items)
    keep = idx >= 0
    return np.bincount(idx[keep], weights=np.asarray(weights)[keep], minlength=len(items)).astype(
        np.float32
    )


# --------------------------------------------------------------------------------------------
# Helpers


def _wants_validation(opts: TrainOptions) -> bool:
    """Whether the run needs the validation split: to tune, or to choose the algorithm."""
    return bool(opts.tune) or opts.algorithm == AUTO


def _split_name(opts: TrainOptions) -> str:
    return "given" if opts.test else opts.split


def _row_counts(loaded: LoadResult, *, erasures: bool = False) -> dict[str, int]:
    rows = {
        "read": loaded.rows_read,
        "accepted": loaded.rows_accepted,
        "quarantined": loaded.rows_quarantined,
    }
    if erasures:
        rows["erased"] = loaded.rows_erased
    return rows


def _describe(inputs: Path | Sequence[Path]) -> str:
    return str(inputs) if isinstance(inputs, str | Path) else ", ".join(map(str, inputs))


def _dataset_stats(
    rows: dict[str, int], train: InteractionMatrix, prepared: BesideFit
) -> dict[str, Any]:
    full_holdout, holdout = prepared.full_holdout, prepared.holdout
    return {
        "rows_read": rows["read"],
        "rows_accepted": rows["accepted"],
        "rows_quarantined": rows["quarantined"],
        "n_users": len(train.users),
        "n_items": len(train.items),
        "n_train_pairs": int(train.matrix.nnz),
        "n_test_pairs": holdout.n_pairs,
        "n_test_pairs_unknown_item": holdout.pairs_unknown_item,
        "n_test_items_unknown": full_holdout.items_unknown,
        "n_test_users": len(full_holdout.users),
        "n_test_users_unknown": full_holdout.users_unknown,
        "n_eval_users": len(holdout.users),
        "density": float(train.matrix.nnz) / max(1, len(train.users) * len(train.items)),
    }


def _keep_quarantine(path: Path | None, workdir: Path, run_id: str, progress: Progress) -> str:
    """Log a quarantine file to the run, or keep it outside ``workdir``; return where it is."""
    if path is None or not path.is_file():
        return ""
    size = path.stat().st_size
    if size <= QUARANTINE_LOG_LIMIT:
        mlflow.log_artifact(str(path), "quarantine")
        return str(path) if not path.is_relative_to(workdir) else f"quarantine/{path.name}"
    if path.is_relative_to(workdir):
        kept = Path(tempfile.gettempdir()) / f"affinity-quarantine-{run_id}-{path.name}"
        shutil.move(str(path), kept)
        path = kept
    progress(f"quarantine file of {size / 2**20:,.0f} MiB not logged to the run; it is at {path}")
    return str(path)


class _Throttle:
    """Forward progress messages at most every ``seconds`` (long fits would flood the terminal)."""

    def __init__(self, progress: Progress, seconds: float = 2.0) -> None:
        self.progress, self.seconds, self.last = progress, seconds, time.perf_counter()

    def __call__(self, message: str) -> None:
        now = time.perf_counter()
        if now - self.last >= self.seconds:
            self.last = now
            self.progress(message)
