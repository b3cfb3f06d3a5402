"""Quality benchmark: every algorithm on a public protocol, with default and tuned parameters.

``python -m bench.quality --protocol random-75-25 --dataset ml-latest-small`` splits the data set
by the named protocol, fits each algorithm with its default configuration and again after
``--trials`` Optuna trials on a validation split carved from the training part (the test part is
never seen by the search), evaluates both on the test part, logs every run to MLflow (experiment
``quality-<protocol>``) and writes the table into ``docs/quality.md`` with the command that made it.
The holdout is the one ``affinity train`` evaluates on (:func:`training.evaluate.build_holdout`):
test items absent from the training part stay relevant, as in the published protocols.
"""

from __future__ import annotations

import argparse
import logging
import math
import re
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import mlflow

from bench.datasets import LOADERS, PUBLISHED_SPLITS, load_dataset
from models.algorithms import get_algorithm
from models.errors import ModelTooLargeError
from registry.mlflow_store import configure_tracking
from training.auto import AUTO, choose_algorithm
from training.confidence import ConfidenceConfig, build_matrix
from training.evaluate import Holdout, build_holdout, evaluate
from training.fit import LOCAL, Engine, fit_model
from training.split import (
    Method,
    TrainValidationTest,
    given_split,
    random_split,
    train_validation_test,
)
from training.tune import SEARCHES, tune

logger = logging.getLogger(__name__)

ALGORITHMS = ("als", "ease", "gfcf", "bpr", "lmf", "itemknn", "bm25", "popularity")
"""Algorithms a quality run covers by default, in table order."""

DEFAULT_TRIALS = 30
"""Optuna trials per algorithm when ``--trials`` is not given."""

DOC_PATH = Path(__file__).resolve().parents[1] / "docs" / "quality.md"

TABLE_METRICS = ("map", "ndcg", "precision", "recall", "coverage", "novelty")

DATASET_NOTES = {
    "ml-100k": "The data are GroupLens' MovieLens-100k (`ml-100k/u.data`), placed locally and "
    "passed with `--data-root`; they are not shipped with Affinity.",
    "ml-latest-small-dense": "A derived data set (ml-latest-small, movies with at least 10 "
    "ratings), not a published one.",
}
"""A sentence each report section of these data sets starts with."""


@dataclass(frozen=True)
class Protocol:
    """A named evaluation protocol: how the test part is held out."""

    name: str
    method: Method | Literal["given"]
    test_fraction: float
    description: str


PROTOCOLS: dict[str, Protocol] = {
    "random-75-25": Protocol(
        "random-75-25",
        "random",
        0.25,
        "each user's interactions split at random 75/25 (stratified per user, seed 42); every "
        "interaction (a rating of any value, a purchase) is positive; top 10 with the user's "
        "training items removed (the Microsoft Recommenders MovieLens protocol)",
    ),
    "temporal-last-20": Protocol(
        "temporal-last-20",
        "temporal",
        0.2,
        "each user's last 20% of interactions by time held out; top 10 with the user's "
        "training items removed",
    ),
    "given": Protocol(
        "given",
        "given",
        0.2,
        "the split published with the data set, kept as given (LightGCN's Gowalla: about 80/20 "
        "of each user's check-ins); validation is 20% of each user's training pairs at random; "
        "every item ranked with the user's training items removed; report at k=20 to compare "
        "with the published figures",
    ),
}


@dataclass
class Result:
    """One fitted and evaluated configuration of one algorithm."""

    algorithm: str
    variant: str
    """``default`` or ``tuned``."""
    metrics: dict[str, float]
    params: dict[str, Any]
    fit_seconds: float
    tune_seconds: float | None = None
    validation_value: float | None = None
    run_id: str = ""
    trials: int = 0
    fits: int = 0
    failed: int = 0
    decision: str = ""
    """How tuning chose its parameters (``training.tune.tune``'s ``decision``)."""
    refused: str = ""
    """Why the model could not be fitted on this data (its memory estimate), if it could not."""

    @property
    def kept_defaults(self) -> bool:
        """Tuning found no candidate better than the defaults by more than noise."""
        return "defaults kept" in self.decision or "defaults scored best" in self.decision


@dataclass
class ProtocolReport:
    """Every result of one protocol on one data set, with the data it ran on."""

    protocol: Protocol
    dataset: str
    k: int
    trials: int
    stats: dict[str, int]
    results: list[Result] = field(default_factory=list)
    command: str = ""

    def best(self, variant: str = "tuned") -> Result | None:
        """The result with the highest NDCG among ``variant`` runs."""
        candidates = [r for r in self.results if r.variant == variant and not r.refused]
        key = f"ndcg_at_{self.k}"
        return max(candidates, key=lambda r: r.metrics[key], default=None)

    def get(self, algorithm: str, variant: str) -> Result | None:
        return next(
            (r for r in self.results if r.algorithm == algorithm and r.variant == variant), None
        )


def _noop(_: str) -> None:
    pass


def _fit_and_evaluate(
    algorithm: str,
    params: dict[str, Any],
    train: Any,
    test: Holdout,
    k: int,
    engine: Engine = LOCAL,
) -> tuple[dict[str, float], float]:
    """Fit on ``train``, log the loss curve to the active run, evaluate on ``test``.

    Items of ``test`` unknown to ``train`` still count as relevant (misses no model avoids).
    """

    def on_iteration(iteration: int, loss: float | None) -> None:
        if loss is not None and math.isfinite(loss):
            mlflow.log_metric("training_loss", float(loss), step=iteration)

    start = time.perf_counter()
    model = fit_model(algorithm, params, train, on_iteration, engine=engine)
    seconds = time.perf_counter() - start
    metrics = evaluate(model, train, test.matrix, k=k, unrankable=test.unrankable).metrics
    return metrics, seconds


def _log_result(result: Result, full_params: dict[str, Any]) -> None:
    mlflow.log_params({f"model.{name}": value for name, value in full_params.items()})
    metrics = {name: value for name, value in result.metrics.items() if math.isfinite(value)}
    metrics["time_fit_seconds"] = result.fit_seconds
    if result.tune_seconds is not None:
        metrics["time_tune_seconds"] = result.tune_seconds
    mlflow.log_metrics(metrics)


def _auto_result(
    parts: TrainValidationTest,
    confidence: ConfidenceConfig,
    train: Any,
    test: Holdout,
    k: int,
    seed: int,
    tags: dict[str, str],
    progress: Callable[[str], None],
) -> Result:
    """What ``affinity train`` does by default: choose on the validation split, refit, test."""
    with mlflow.start_run(run_name=f"{tags['dataset']}/auto/default") as run:
        start = time.perf_counter()
        choice = choose_algorithm(
            parts.train, parts.validation, confidence=confidence, k=k, seed=seed, progress=progress
        )
        choose_seconds = time.perf_counter() - start
        mlflow.set_tags({**tags, "algorithm": choice.chosen, "variant": "auto"})
        metrics, seconds = _fit_and_evaluate(choice.chosen, {}, train, test, k)
        result = Result(
            f"auto: {choice.chosen}",
            "default",
            metrics,
            {},
            seconds,
            tune_seconds=choose_seconds,
            run_id=run.info.run_id,
            fits=sum(1 for c in choice.candidates if c.value is not None),
            decision=choice.summary(),
        )
        mlflow.log_param("auto.candidates", choice.summary())
        _log_result(result, get_algorithm(choice.chosen).Config().model_dump(mode="json"))
    progress(_summary(result, k))
    return result


def _split(dataset: str, spec: Protocol, data_root: Path | None, seed: int) -> TrainValidationTest:
    if spec.method != "given":
        return train_validation_test(
            load_dataset(dataset, data_root),
            method=spec.method,
            test_fraction=spec.test_fraction,
            validation_fraction=spec.test_fraction,
            seed=seed,
        )
    if dataset not in PUBLISHED_SPLITS:
        raise SystemExit(
            f"{dataset} has no published split; the given protocol runs on "
            f"{', '.join(PUBLISHED_SPLITS)}"
        )
    frame, is_test = PUBLISHED_SPLITS[dataset](data_root)
    outer = given_split(frame, is_test)
    inner = random_split(outer.train, fraction=spec.test_fraction, seed=seed + 1)
    return TrainValidationTest(test_split=outer, validation_split=inner)


def run_protocol(
    dataset: str,
    protocol: str,
    *,
    algorithms: Sequence[str] = ALGORITHMS,
    trials: int = DEFAULT_TRIALS,
    k: int = 10,
    seed: int = 42,
    data_root: Path | None = None,
    tune_timeout: float | None = None,
    progress: Callable[[str], None] = _noop,
    fixed: Sequence[tuple[str, dict[str, Any]]] = (),
    spark_master: str = "local[*]",
) -> ProtocolReport:
    """Run ``protocol`` on ``dataset`` for each of ``algorithms``; MLflow must be configured.

    Each algorithm gets a ``default`` run and, when it has a search space and ``trials`` > 0, a
    ``tuned`` run whose Optuna trials are nested runs. Tuning fits on the training part minus a
    validation part carved from it by the same protocol; the final model is refitted on the
    whole training part and evaluated once on the test part. Each ``fixed`` (algorithm, params)
    pair adds a ``fixed`` run with exactly those parameters (a published setting, say). A model
    that refuses the data (over its memory budget) gets a ``refused`` row with the reason.
    """
    spec = PROTOCOLS[protocol]
    parts = _split(dataset, spec, data_root, seed)
    confidence = ConfidenceConfig()
    train = build_matrix(parts.train_full, confidence)
    test = build_holdout(parts.test, train.users, train.items)
    stats = {
        "users": len(train.users),
        "items": len(train.items),
        "train_pairs": int(train.matrix.nnz),
        "test_pairs": test.n_pairs,
        "test_users": len(test.users),
        "validation_pairs": parts.validation_split.stats.test_pairs,
        "test_items_unknown": test.items_unknown,
        "test_pairs_unknown_item": test.pairs_unknown_item,
        # Dropped by the split (no training event) or by the matrix (none with these defaults).
        "test_users_unknown": parts.test_split.stats.cold_users + test.users_unknown,
    }
    progress(f"{dataset} / {protocol}: {stats}")
    report = ProtocolReport(spec, dataset, k, trials, stats)
    mlflow.set_experiment(f"quality-{protocol}")
    tags = {"dataset": dataset, "protocol": protocol, "seed": str(seed)}
    for algorithm, params in fixed:
        cls = get_algorithm(algorithm)
        with mlflow.start_run(run_name=f"{dataset}/{algorithm}/fixed") as run:
            mlflow.set_tags({**tags, "algorithm": algorithm, "variant": "fixed"})
            metrics, seconds = _fit_and_evaluate(algorithm, params, train.matrix, test, k)
            result = Result(algorithm, "fixed", metrics, params, seconds, run_id=run.info.run_id)
            _log_result(result, cls(**params).config.model_dump(mode="json"))
        report.results.append(result)
        progress(_summary(result, k))
    for algorithm in algorithms:
        # "als-spark": ALS fitted on Spark (training.spark), tuned with Spark's own search.
        base = algorithm.removesuffix("-spark")
        engine = Engine("spark", spark_master) if algorithm.endswith("-spark") else LOCAL
        if algorithm == AUTO:
            report.results.append(
                _auto_result(parts, confidence, train.matrix, test, k, seed, tags, progress)
            )
            continue
        cls = get_algorithm(base)
        with mlflow.start_run(run_name=f"{dataset}/{algorithm}/default") as run:
            mlflow.set_tags({**tags, "algorithm": algorithm, "variant": "default"})
            mlflow.log_params(engine.describe())
            try:
                metrics, seconds = _fit_and_evaluate(base, {}, train.matrix, test, k, engine)
            except ModelTooLargeError as exc:
                mlflow.set_tag("refused", str(exc))
                report.results.append(Result(algorithm, "default", {}, {}, 0.0, refused=str(exc)))
                progress(f"{algorithm}: refused: {exc}")
                continue
            result = Result(algorithm, "default", metrics, {}, seconds, run_id=run.info.run_id)
            _log_result(result, cls.Config(**engine.params(base, {})).model_dump(mode="json"))
        report.results.append(result)
        progress(_summary(result, k))
        if trials <= 0 or (base if engine.is_local else f"{base}@spark") not in SEARCHES:
            continue
        with mlflow.start_run(run_name=f"{dataset}/{algorithm}/tuned") as run:
            mlflow.set_tags({**tags, "algorithm": algorithm, "variant": "tuned"})
            start = time.perf_counter()
            mlflow.log_params(engine.describe())
            summary = tune(
                base,
                parts.train,
                parts.validation,
                confidence=confidence,
                n_trials=trials,
                k=k,
                seed=seed,
                progress=progress,
                timeout=tune_timeout,
                engine=engine,
            )
            tune_seconds = time.perf_counter() - start
            params = summary["best_params"]
            metrics, seconds = _fit_and_evaluate(base, params, train.matrix, test, k, engine)
            result = Result(
                algorithm,
                "tuned",
                metrics,
                params,
                seconds,
                tune_seconds=tune_seconds,
                validation_value=summary["best_value"],
                run_id=run.info.run_id,
                trials=len(summary["trials"]),
                fits=sum(1 for t in summary["trials"] if not t["reused"]),
                failed=sum(1 for t in summary["trials"] if t.get("failed") and not t["reused"]),
                decision=summary.get("decision", ""),
            )
            _log_result(result, cls.Config(**engine.params(base, params)).model_dump(mode="json"))
        report.results.append(result)
        progress(_summary(result, k))
    return report


def _summary(result: Result, k: int) -> str:
    text = (
        f"{result.algorithm} {result.variant}: ndcg@{k}={result.metrics[f'ndcg_at_{k}']:.4f} "
        f"fit {result.fit_seconds:.1f}s"
    )
    if result.tune_seconds is not None:
        text += f", tuning {result.tune_seconds:.0f}s, params {result.params}"
    return text


# ------------------------------------------------------------------ report
def _fmt(value: float | None, digits: int = 4) -> str:
    if value is None or not math.isfinite(value):
        return "n/a"
    return f"{value:.{digits}f}"


def _params_text(params: dict[str, Any]) -> str:
    parts = []
    for name, value in params.items():
        if isinstance(value, float):
            value = f"{value:.4g}"
        parts.append(f"{name}={value}")
    return ", ".join(parts) or "(defaults)"


def render_section(report: ProtocolReport) -> str:
    """The markdown section of one protocol run on one data set."""
    k = report.k
    s = report.stats
    note = DATASET_NOTES.get(report.dataset)
    lines = [
        f"### {report.dataset}, {report.protocol.name}",
        "",
        (f"{note} " if note else "")
        + f"Protocol: {report.protocol.description}. Data after the split: {s['users']:,} users, "
        f"{s['items']:,} items, {s['train_pairs']:,} training pairs, {s['test_pairs']:,} test "
        f"pairs over {s['test_users']:,} users; tuning held out {s['validation_pairs']:,} "
        "validation pairs from the training part. " + _unknown_text(s),
        "",
        f"| algorithm | params | MAP@{k} | NDCG@{k} | precision@{k} | recall@{k} | coverage | "
        "novelty | fit (s) | tuning (s) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for result in report.results:
        if result.refused:
            lines.append(
                f"| {result.algorithm} | refused: {result.refused} |" + " n/a |" * 6 + "  |  |"
            )
            continue
        params = "" if result.variant == "default" else _params_text(result.params)
        if result.algorithm.startswith(f"{AUTO}:"):
            params = f"validation NDCG@{k}: {result.decision}"
        if result.variant == "tuned" and result.kept_defaults:
            params = "defaults kept (no gain beyond noise)"
        cells = [f"{result.algorithm} ({result.variant})", params]
        cells += [_fmt(result.metrics.get(f"{name}_at_{k}")) for name in TABLE_METRICS[:5]]
        cells.append(_fmt(result.metrics.get(f"novelty_at_{k}"), 2))
        cells.append(_fmt(result.fit_seconds, 1))
        cells.append(
            ""
            if result.tune_seconds is None
            else f"{result.tune_seconds:.0f} ({result.fits} fits"
            + (f", {result.failed} diverged" if result.failed else "")
            + ")"
        )
        lines.append("| " + " | ".join(cells) + " |")
    best = report.best()
    popularity = report.get("popularity", "default")
    als, ease = report.get("als", "tuned"), report.get("ease", "tuned")
    key = f"ndcg_at_{k}"
    notes = []
    if best is not None:
        notes.append(f"best tuned model: **{best.algorithm}**, NDCG@{k} {best.metrics[key]:.4f}")
    if best is not None and popularity is not None and popularity.metrics[key] > 0:
        notes.append(f"{best.metrics[key] / popularity.metrics[key]:.2f}x popularity")
    if als is not None and ease is not None and ease.metrics[key] > 0:
        notes.append(
            f"tuned ALS reaches {100 * als.metrics[key] / ease.metrics[key]:.1f}% of tuned EASE"
        )
    if notes:
        lines += ["", "; ".join(notes) + "."]
    lines += ["", f"Command: `{report.command}`" if report.command else ""]
    return "\n".join(lines).rstrip() + "\n"


def _unknown_text(stats: dict[str, int]) -> str:
    pairs, items = stats.get("test_pairs_unknown_item", 0), stats.get("test_items_unknown", 0)
    text = (
        f"{pairs:,} test pairs are of {items:,} items absent from the training part: no model "
        "can recommend them, and they still count as relevant (recall and NDCG denominators)."
        if pairs
        else "Every test item appears in the training part."
    )
    users = stats.get("test_users_unknown", 0)
    if users:
        text += f" {users:,} test users absent from the training part are not scored."
    return text


_MARK = "<!-- quality:{key}:{edge} -->"


def update_document(path: Path, report: ProtocolReport) -> None:
    """Insert or replace the report's section in ``path`` between its marker comments."""
    key = f"{report.dataset}:{report.protocol.name}"
    begin, end = _MARK.format(key=key, edge="begin"), _MARK.format(key=key, edge="end")
    block = f"{begin}\n{render_section(report)}{end}\n"
    text = path.read_text(encoding="utf-8") if path.exists() else "# Model quality\n\n"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end) + r"\n?", re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text)
    else:
        text = text.rstrip("\n") + "\n\n" + block
    path.write_text(text, encoding="utf-8")


# -------------------------------------------------------------------- CLI
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.quality", description=__doc__)
    parser.add_argument("--protocol", choices=[*PROTOCOLS, "all"], default="random-75-25")
    parser.add_argument(
        "--dataset", action="append", choices=list(LOADERS), help="repeatable; default all"
    )
    parser.add_argument(
        "--algorithms",
        default=",".join(ALGORITHMS),
        help="comma-separated algorithm names; als-spark fits ALS on Spark (--spark-master)",
    )
    parser.add_argument("--spark-master", default="local[*]", help="for als-spark")
    parser.add_argument("--trials", type=int, default=DEFAULT_TRIALS, help="0: defaults only")
    parser.add_argument(
        "--tune-timeout", type=float, default=None, help="seconds of tuning per algorithm"
    )
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--data-root", type=Path, default=None, help="the shared datasets folder")
    parser.add_argument("--output", type=Path, default=DOC_PATH, help="markdown file to update")
    parser.add_argument("--no-write", action="store_true", help="do not touch the markdown file")
    parser.add_argument(
        "--fixed",
        action="append",
        default=[],
        metavar="ALGO:NAME=VALUE,...",
        help="also run this exact configuration (repeatable), e.g. a paper's setting: "
        "gfcf:alpha=0.3,beta=0.5,factors=256",
    )
    return parser


def _value(text: str) -> Any:
    """A command-line value as the model's config wants it: int, float, else the text."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_fixed(text: str) -> tuple[str, dict[str, Any]]:
    """``gfcf:alpha=0.3,factors=256`` -> ``("gfcf", {"alpha": 0.3, "factors": 256})``."""
    algorithm, _, assignments = text.partition(":")
    params: dict[str, Any] = {}
    for assignment in filter(None, assignments.split(",")):
        name, sep, value = assignment.partition("=")
        if not sep:
            raise SystemExit(f"--fixed {text!r}: {assignment!r} is not NAME=VALUE")
        params[name.strip()] = _value(value.strip())
    get_algorithm(algorithm.strip())(**params)  # unknown algorithm or parameter: fail now
    return algorithm.strip(), params


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m bench.quality``."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    configure_tracking()
    command = "python -m bench.quality " + shlex.join(list(sys.argv[1:] if argv is None else argv))
    protocols = list(PROTOCOLS) if args.protocol == "all" else [args.protocol]
    datasets = args.dataset or ["ml-latest-small", "uci-online-retail"]  # always present
    algorithms = [name.strip() for name in args.algorithms.split(",") if name.strip()]

    def say(message: str) -> None:
        print(message, flush=True)

    for dataset in datasets:
        for protocol in protocols:
            if protocol == "given" and dataset not in PUBLISHED_SPLITS and args.protocol == "all":
                continue  # no published split to keep
            report = run_protocol(
                dataset,
                protocol,
                algorithms=algorithms,
                trials=args.trials,
                k=args.k,
                seed=args.seed,
                data_root=args.data_root,
                tune_timeout=args.tune_timeout,
                progress=say,
                fixed=[parse_fixed(text) for text in args.fixed],
                spark_master=args.spark_master,
            )
            report.command = command
            section = render_section(report)
            print(section, flush=True)
            if not args.no_write:
                update_document(args.output, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
