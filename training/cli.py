"""Training's subcommands of the ``affinity`` command: ``generate``, ``train``, ``batch-recommend``.

:func:`register_cli` adds them to an argparse subparsers object; each sets ``func(args) -> int``
(the exit status). The command itself, with its error handling, is :mod:`affinity.cli`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from models.ann import MIN_ITEMS as ANN_MIN_ITEMS
from models.errors import InvalidInputError


def _progress_printer(quiet: bool = False):  # type: ignore[no-untyped-def]
    start = time.perf_counter()

    def emit(message: str) -> None:
        if not quiet:
            print(f"[{time.perf_counter() - start:7.1f}s] {message}", file=sys.stderr, flush=True)

    return emit


def _parse_param(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise InvalidInputError(f"--param expects KEY=VALUE, got {text!r}", field="param")
    try:
        value = json.loads(raw)
    except ValueError:
        value = raw
    return key.strip(), value


def _parse_weights(items: Sequence[str]) -> dict[str, float] | None:
    if not items:
        return None
    weights = {}
    for text in items:
        key, value = _parse_param(text)
        try:
            weights[key] = float(value)
        except (TypeError, ValueError):
            raise InvalidInputError(
                f"--event-weight {key} must be a number, got {value!r}", field="event-weight"
            ) from None
    return weights


# ------------------------------------------------------------------ commands
def cmd_generate(args: argparse.Namespace) -> int:
    from training.generate import generate

    progress = _progress_printer(args.quiet)
    progress(
        f"generating {args.interactions:,} interactions for {args.users:,} users "
        f"and {args.items:,} items"
    )
    result = generate(
        args.out,
        users=args.users,
        items=args.items,
        interactions=args.interactions,
        seed=args.seed,
    )
    progress(f"wrote {result}")
    return 0


def cmd_train(
    args: argparse.Namespace,
    *,
    interactions: Sequence[Path] | None = None,
    erasures: Mapping[str, datetime] | None = None,
    report: Mapping[str, Any] | None = None,
) -> int:
    """Run ``affinity train``. A caller composing other inputs (``affinity train --events``)
    passes the logs to read instead of ``--interactions``, the erasures to apply to them, and
    ``report``: more entries of the printed summary."""
    from training.confidence import ConfidenceConfig
    from training.fit import Engine
    from training.pipeline import TrainOptions, run_training

    logs = list(interactions if interactions is not None else args.interactions or [])
    if not logs:
        raise InvalidInputError(
            "give --interactions (interaction logs) or --events (the event store)",
            field="interactions",
        )
    progress = _progress_printer(args.quiet)
    params = dict(_parse_param(p) for p in args.param)
    opts = TrainOptions(
        interactions=logs[0] if len(logs) == 1 else logs,
        items=args.items,
        test=args.test,
        algorithm=args.algorithm,
        params=params,
        split=args.split,
        test_fraction=args.test_fraction,
        k=args.k,
        tune=args.tune,
        model_name=args.model_name,
        force_promote=args.force_promote,
        event_weights=_parse_weights(args.event_weight),
        confidence=ConfidenceConfig(
            half_life_days=args.half_life_days,
            min_user_interactions=args.min_user_interactions,
            min_item_interactions=args.min_item_interactions,
        ),
        seed=args.seed,
        primary_metric=args.primary_metric,
        experiment=args.experiment,
        quarantine_path=args.quarantine,
        eval_users=args.eval_users,
        ann_min_items=args.ann_min_items,
        erasures=erasures,
        engine=Engine(args.engine, args.spark_master),
    )
    result = run_training(opts, progress)
    summary = {**result.to_json(), **(report or {})}
    if args.json:
        print(json.dumps(summary))
    else:
        m, b = result.metrics, result.baseline_metrics
        print(
            f"run {result.run_id}: {result.model_name} v{result.model_version} "
            f"({'promoted to champion' if result.promoted else 'challenger'})"
        )
        auto = result.auto
        how = f" (chosen by auto on validation {auto.metric}: {auto.summary()})" if auto else ""
        print(f"  algorithm: {result.algorithm}{how}")
        for name in sorted(m):
            if not name.startswith("cohort_"):
                print(f"  {name:<22} {m[name]:8.4f}   baseline {b.get(name, float('nan')):8.4f}")
        print(f"  rows: {result.rows}")
        for key, value in (report or {}).items():
            print(f"  {key}: {value}")
        print(f"  {result.decision}")
    return 0


def cmd_batch_recommend(args: argparse.Namespace) -> int:
    from models.ranking import ItemFilter
    from registry.mlflow_store import configure_tracking
    from training.batch import batch_recommend, rules_from_options

    rules = rules_from_options(  # bad rules fail before the model loads
        diversity_cap=args.diversity_cap,
        mmr=args.mmr,
        boosts=args.boost,
        promote=args.promote,
        explore=args.explore,
        explore_max_age_days=args.explore_max_age_days,
        explore_seed=args.explore_seed,
        explore_max_interactions=args.explore_max_interactions,
    )
    configure_tracking()
    progress = _progress_printer(args.quiet)
    n = batch_recommend(
        args.model,
        args.users,
        args.k,
        args.out,
        progress,
        item_filter=ItemFilter.of(args.item_type, args.category),
        exclude_item_ids=args.exclude_item,
        rules=rules,
    )
    progress(f"wrote {n:,} rows to {args.out}")
    return 0


# -------------------------------------------------------------------- parser
def register_cli(subparsers: Any) -> None:
    """Add training's subcommands to an ``argparse`` subparsers object."""
    from models.algorithms import algorithm_names

    gen = subparsers.add_parser(
        "generate",
        help="write realistic synthetic interaction logs",
        description="Write DIR/interactions.parquet and DIR/items.parquet: "
        "seeded synthetic logs with a view-to-purchase funnel.",
    )
    gen.add_argument("--out", type=Path, required=True, help="output directory")
    gen.add_argument("--users", type=int, default=2000, help="number of users (default 2000)")
    gen.add_argument("--items", type=int, default=500, help="number of items (default 500)")
    gen.add_argument(
        "--interactions",
        type=int,
        default=50_000,
        help="number of interaction events (default 50000)",
    )
    gen.add_argument("--seed", type=int, default=42, help="random seed (default 42)")
    gen.add_argument("--quiet", action="store_true", help="no progress output")
    gen.set_defaults(func=cmd_generate)

    tr = subparsers.add_parser(
        "train",
        help="train, evaluate, log to MLflow and register a model",
        description="Train a model on interaction logs (--interactions) and/or the event "
        "store (--events), evaluate it against the popularity baseline on a holdout, log the "
        "run to MLflow, register a new version and promote it to 'champion' if it beats the "
        "current one.",
    )
    tr.add_argument(
        "--interactions",
        type=Path,
        nargs="+",
        action="extend",
        metavar="LOG",
        help="interaction logs (.csv or .parquet: user_id, item_id, event, timestamp [, value]) "
        "or folders of them, each validated alike; repeatable. Required unless --events",
    )
    tr.add_argument(
        "--items",
        type=Path,
        help="item catalog (.csv or .parquet): item_id, item_type, category, available [, title]",
    )
    tr.add_argument(
        "--test",
        type=Path,
        help="evaluate on this holdout file instead of "
        "splitting; training then uses all of --interactions",
    )
    tr.add_argument(
        "--algorithm",
        default="auto",
        choices=["auto", *algorithm_names()],
        help="algorithm (default auto: fit als, ease, gfcf and bm25 with their defaults on a "
        "validation split carved from the training part, keep the best on --metric, and go on "
        "as if it had been named; a candidate too large for the data is skipped)",
    )
    tr.add_argument(
        "--engine",
        choices=["local", "spark"],
        default="local",
        help="where to fit: local (implicit and numpy, every algorithm; the default) or spark "
        "(pyspark.ml's implicit ALS on --spark-master; needs the spark extra and Java 17+; "
        "--algorithm auto then means als)",
    )
    tr.add_argument(
        "--spark-master",
        default="local[*]",
        help="Spark master URL for --engine spark (default local[*]: every core of this machine)",
    )
    tr.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="hyperparameter of the named --algorithm, repeatable (e.g. --algorithm als "
        "--param factors=128)",
    )
    tr.add_argument(
        "--split",
        choices=["temporal", "random"],
        default="temporal",
        help="holdout protocol: each user's last fraction by time, or a random "
        "stratified per-user split (default temporal)",
    )
    tr.add_argument(
        "--test-fraction",
        type=float,
        default=0.2,
        help="fraction of each user's interactions held out (default 0.2)",
    )
    tr.add_argument("--k", type=int, default=10, help="list length for metrics (default 10)")
    tr.add_argument(
        "--tune",
        type=int,
        default=0,
        metavar="N",
        help="run N hyperparameter-search trials on a validation split first (with --algorithm "
        "auto: of the algorithm it chooses)",
    )
    tr.add_argument(
        "--model-name", default="affinity", help="registered model name (default affinity)"
    )
    tr.add_argument(
        "--force-promote",
        action="store_true",
        help="make the new version champion even if it is not better",
    )
    tr.add_argument(
        "--event-weight",
        action="append",
        default=[],
        metavar="EVENT=WEIGHT",
        help="override or add an event weight, repeatable (e.g. --event-weight purchase=20)",
    )
    tr.add_argument(
        "--half-life-days",
        type=float,
        default=None,
        help="recency half-life for confidence weights (default: no decay)",
    )
    tr.add_argument(
        "--min-user-interactions",
        type=int,
        default=1,
        help="drop users with fewer distinct items (default 1)",
    )
    tr.add_argument(
        "--min-item-interactions",
        type=int,
        default=1,
        help="drop items with fewer distinct users (default 1)",
    )
    tr.add_argument(
        "--eval-users",
        type=int,
        default=10_000,
        metavar="N",
        help="evaluate on a seeded sample of at most N held-out users (default 10000; 0: all)",
    )
    tr.add_argument(
        "--ann-min-items",
        type=int,
        default=ANN_MIN_ITEMS,
        metavar="N",
        help="ship an approximate index (faiss, the ann extra) with ALS, BPR or LMF models over at "
        f"least N items (default {ANN_MIN_ITEMS}; 0: never)",
    )
    tr.add_argument("--seed", type=int, default=42, help="random seed (default 42)")
    tr.add_argument(
        "--metric",
        "--primary-metric",
        dest="primary_metric",
        default="ndcg",
        help="what tuning optimises and the promotion gate compares, measured at --k: ndcg, "
        "recall, precision, map, mrr or hit_rate (default ndcg; ndcg_at_K with K = --k works too)",
    )
    tr.add_argument(
        "--experiment", default="affinity", help="MLflow experiment name (default affinity)"
    )
    tr.add_argument(
        "--quarantine",
        type=Path,
        help="where to write malformed rows (default: a temporary file logged to the MLflow "
        "run under quarantine/; one over 50 MiB is kept in the temp folder, its path printed)",
    )
    tr.add_argument(
        "--json",
        action="store_true",
        help="print one JSON summary object as the last line of stdout",
    )
    tr.add_argument("--quiet", action="store_true", help="no progress output")
    tr.set_defaults(func=cmd_train)

    br = subparsers.add_parser(
        "batch-recommend",
        help="offline recommendations for a list of users",
        description="Write user_id, rank, item_id, score for each user id in "
        "--users (one per line) to --out (.csv or .parquet).",
    )
    br.add_argument(
        "--model",
        default="models:/affinity@champion",
        help="models:/NAME@ALIAS, models:/NAME/VERSION or a local artifact "
        "directory (default models:/affinity@champion)",
    )
    br.add_argument("--users", type=Path, required=True, help="file with one user id per line")
    br.add_argument("--k", type=int, default=10, help="items per user (default 10)")
    br.add_argument("--out", type=Path, required=True, help="output file (.csv or .parquet)")
    br.add_argument(
        "--item-type",
        action="append",
        default=[],
        metavar="TYPE",
        help="only items of this type (content or product); repeat for several",
    )
    br.add_argument(
        "--category",
        action="append",
        default=[],
        metavar="CATEGORY",
        help="only items of this category; repeat for several",
    )
    br.add_argument(
        "--exclude-item",
        action="append",
        default=[],
        metavar="ITEM_ID",
        help="never recommend this item to anyone; repeat for several",
    )
    _add_rule_flags(br)
    br.add_argument("--quiet", action="store_true", help="no progress output")
    br.set_defaults(func=cmd_batch_recommend)


def _add_rule_flags(parser: argparse.ArgumentParser) -> None:
    """The ranking-rule flags of ``batch-recommend`` (see ``models/rules.py``); the pyfunc's
    parameters of the same names (``registry/pyfunc_model.py``) build the same rules."""
    from training.batch import DEFAULT_EXPLORE_MAX_AGE_DAYS

    rules = parser.add_argument_group(
        "ranking rules",
        "applied to every list as Recommend applies them (docs/quality.md, 'Ranking rules'); "
        "SPEC is [category:|type:]NAME, several joined by commas (no prefix: a category)",
    )
    rules.add_argument(
        "--diversity-cap",
        type=int,
        default=0,
        metavar="N",
        help="at most N items of any one category per list (0: no cap; a list may come back "
        "shorter than --k when the categories run out)",
    )
    rules.add_argument(
        "--mmr",
        type=float,
        default=0.0,
        metavar="LAMBDA",
        help="relevance/diversity trade-off of maximal marginal relevance, 0 (off) to 1",
    )
    rules.add_argument(
        "--boost",
        action="append",
        default=[],
        metavar="SPEC=FACTOR",
        help="multiply the scores of matching items by FACTOR (> 0; below 1 demotes); "
        "repeat for several (e.g. --boost category:home=1.5)",
    )
    rules.add_argument(
        "--promote",
        default=None,
        metavar="SPEC=SHARE",
        help="fill SHARE (0 to 1) of the places with the best matching items, spread "
        "through the list (e.g. --promote category:toys=0.2)",
    )
    rules.add_argument(
        "--explore",
        type=float,
        default=0.0,
        metavar="SHARE",
        help="give SHARE (0 to 1) of the places to new items in a seeded draw (0: off)",
    )
    rules.add_argument(
        "--explore-max-age-days",
        type=float,
        default=DEFAULT_EXPLORE_MAX_AGE_DAYS,
        metavar="DAYS",
        help="how new an explored item must be: first seen at most DAYS ago "
        f"(default {DEFAULT_EXPLORE_MAX_AGE_DAYS:g})",
    )
    rules.add_argument(
        "--explore-seed", type=int, default=0, metavar="SEED", help="seed of the draw (default 0)"
    )
    rules.add_argument(
        "--explore-max-interactions",
        type=int,
        default=None,
        metavar="N",
        help="explore only items with at most N users in the training data",
    )
