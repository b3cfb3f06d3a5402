"""Lifecycle-stage strategies against plain personalized ranking, stage by stage.

``python -m bench.stage_quality`` cuts each data set at one time (a global temporal split: the
last ``--test-fraction`` of the events by time are held out), fits ALS with its defaults on the
part before the cut, puts every user in a lifecycle stage as of the cut
(:func:`training.evaluate.user_stages`, :mod:`models.lifecycle` with its default windows), and
ranks each stage's users with every strategy of :mod:`models.strategies` through the one
pipeline (``RankingPipeline.rank_users(..., strategy=...)``): NDCG@10, recall@10, catalog
coverage and novelty against the held-out part.

A stage's default strategy is the one with the best NDCG among those that score at least as
well as ``personalized`` on that stage's users on every data set where the stage has at least
``--min-users`` evaluated users; when none does (or no data set has enough users) the default is
``personalized``. The table and the defaults go into the section "Stage strategies" at the end
of ``docs/quality.md`` (appended the first time, replaced between its markers after); set them
in :data:`models.strategies.DEFAULT_STAGE_STRATEGIES`.

Data: ml-latest-small (ratings: nobody activates, so there are no ``activated`` users; each
movie's first genre is its category), UCI Online Retail (purchases; categories derived from the
descriptions, :func:`bench.rules_quality.retail_category`) and a log of
:func:`training.generate.generate` (its catalog's categories). A shared data set that is absent
is skipped.
"""

from __future__ import annotations

import argparse
import functools
import logging
import shlex
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from bench.datasets import load_dataset
from bench.rules_quality import item_categories
from models.artifact import ItemCatalog
from models.errors import DataError
from models.lifecycle import STAGES
from models.ranking import RankingPipeline
from models.ranking_metrics import active_users, item_popularity, mean_metrics, per_user_metrics
from models.strategies import PERSONALIZED, STRATEGIES, StrategyConfig
from training.confidence import ConfidenceConfig, build_matrix, vocabulary_codes
from training.data import load_interactions
from training.evaluate import build_holdout, user_stages
from training.fit import fit_model
from training.generate import generate
from training.split import temporal_split

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
DOC_PATH = ROOT / "docs" / "quality.md"
SHARED = ("ml-latest-small", "uci-online-retail")
GENERATED = "generated"
K = 10
TEST_FRACTION = 0.2
MIN_USERS = 20
TRENDING_DAYS = 30.0
"""Trending: distinct users per item over this many days before the cut."""
METRICS = ("ndcg", "recall", "coverage", "novelty")
BEGIN, END = "<!-- stage-quality:begin -->", "<!-- stage-quality:end -->"


@dataclass
class StageRow:
    """One stage of one data set: its evaluated users and each strategy's metrics."""

    stage: str
    users: int
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    """strategy -> metric name (``ndcg``, ``recall``, ``coverage``, ``novelty``) -> value."""


@dataclass
class DatasetResult:
    name: str
    cut: float
    train_pairs: int
    test_users: int
    rows: list[StageRow]


def _generated_frame(size: tuple[int, int, int], seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    users, items, interactions = size
    with tempfile.TemporaryDirectory(prefix="affinity-stage-bench-") as tmp:
        result = generate(tmp, users=users, items=items, interactions=interactions, seed=seed)
        frame = load_interactions(result.interactions_path).frame
        catalog = pd.read_parquet(result.items_path)
    return frame, catalog


def run_dataset(
    name: str,
    frame: pd.DataFrame,
    categories: Callable[[np.ndarray], np.ndarray],
    *,
    test_fraction: float = TEST_FRACTION,
    strategies: StrategyConfig | None = None,
    progress: Callable[[str], None] = print,
) -> DatasetResult:
    """Every strategy against ``personalized`` on each stage's users of ``frame``
    (``categories(item_ids)``: the category of each of the model's items)."""
    config = strategies if strategies is not None else StrategyConfig()
    seconds = frame["timestamp"].to_numpy(dtype=np.float64)
    cut = float(np.quantile(seconds, 1.0 - test_fraction))
    parts = temporal_split(frame, cutoff=cut)
    train = build_matrix(parts.train, ConfidenceConfig())
    holdout = build_holdout(parts.test, train.users, train.items)
    progress(
        f"{name}: cut at {pd.Timestamp(cut, unit='s')}, {train.matrix.nnz:,} training pairs, "
        f"{len(holdout.users):,} held-out users"
    )
    model = fit_model("als", {}, train.matrix)
    pipeline = RankingPipeline(
        model,
        seen=train.matrix,
        popularity=item_popularity(train.matrix).astype(np.float32),
        trending=_trending(parts.train, train.items, cut),
        catalog=_catalog(parts.train, train.items, categories),
    )
    stages = user_stages(parts.train, train.users, as_of=cut)
    evaluated = holdout.users
    popularity = item_popularity(train.matrix)
    n_active = active_users(train.matrix)
    rows = []
    for stage in STAGES:
        users = evaluated[stages[evaluated] == stage]
        row = StageRow(stage, len(users))
        rows.append(row)
        if not len(users):
            continue
        for strategy in STRATEGIES:
            ids = pipeline.rank_users(users, K, strategy=config.strategy(strategy))
            means = mean_metrics(
                per_user_metrics(
                    ids,
                    holdout.matrix[users],
                    unrankable=holdout.unrankable[users],
                    item_popularity=popularity,
                    n_users=n_active or None,
                )
            )
            row.metrics[strategy] = {m: means[f"{m}_at_{K}"] for m in METRICS}
        best = max(row.metrics, key=lambda s: row.metrics[s]["ndcg"])
        progress(f"  {stage}: {len(users)} users, best {best}")
    return DatasetResult(name, cut, int(train.matrix.nnz), len(evaluated), rows)


def _trending(train: pd.DataFrame, items: object, cut: float) -> np.ndarray:
    """Distinct users per item in the last :data:`TRENDING_DAYS` before the cut."""
    recent = train[train["timestamp"].to_numpy(dtype=np.float64) >= cut - TRENDING_DAYS * 86_400]
    codes = vocabulary_codes(recent["item_id"], items)  # type: ignore[arg-type]
    users = pd.factorize(recent["user_id"])[0]
    keep = codes >= 0
    pairs = np.unique(np.stack([codes[keep], users[keep]]), axis=1)
    n = len(items)  # type: ignore[arg-type]
    return np.bincount(pairs[0], minlength=n).astype(np.float32)


def _catalog(
    train: pd.DataFrame, items: object, categories: Callable[[np.ndarray], np.ndarray]
) -> ItemCatalog:
    """The items' categories and first appearances in the training part (every item available)."""
    ids = np.asarray(items.ids)  # type: ignore[attr-defined]
    codes = vocabulary_codes(train["item_id"], items)  # type: ignore[arg-type]
    times = train["timestamp"].to_numpy(dtype=np.float64)
    first_seen = np.full(len(ids), np.inf)
    np.minimum.at(first_seen, codes[codes >= 0], times[codes >= 0])
    blank = np.full(len(ids), "", dtype=object)
    catalog = ItemCatalog(
        blank, np.asarray(categories(ids), dtype=object), blank.copy(), np.ones(len(ids), bool)
    )
    catalog.first_seen = first_seen
    return catalog


# ------------------------------------------------------------------------------- choice
def choose_defaults(results: Sequence[DatasetResult], min_users: int = MIN_USERS) -> dict[str, str]:
    """Each stage's default strategy (see the module docstring)."""
    chosen = {}
    for stage in STAGES:
        rows = [
            row
            for result in results
            for row in result.rows
            if row.stage == stage and row.users >= min_users and row.metrics
        ]
        best, best_lift = PERSONALIZED, 0.0
        for strategy in STRATEGIES:
            if strategy == PERSONALIZED or not rows:
                continue
            lifts = [r.metrics[strategy]["ndcg"] - r.metrics[PERSONALIZED]["ndcg"] for r in rows]
            if min(lifts) >= 0 and float(np.mean(lifts)) > best_lift:
                best, best_lift = strategy, float(np.mean(lifts))
        chosen[stage] = best
    return chosen


# ------------------------------------------------------------------------------- report
def _fmt(value: float, digits: int = 4) -> str:
    return "n/a" if np.isnan(value) else f"{value:.{digits}f}"


def render_section(
    validation: Sequence[DatasetResult],
    test: Sequence[DatasetResult],
    defaults: dict[str, str],
    command: str,
    min_users: int,
) -> str:
    lines = [
        BEGIN,
        "## Stage strategies: per lifecycle stage against personalized ranking",
        "",
        "Each data set is cut at one time (the last 20% of its events held out: the test "
        "part); the part before it is cut again the same way (its last 20%: the validation "
        "part). For each cut, ALS with its defaults is fitted on what precedes it, every user is "
        "put in a lifecycle stage as of the cut (`models/lifecycle.py`, default windows) and each "
        "stage's held-out users are ranked with every strategy of `models/strategies.py` "
        "(default settings) through the one pipeline. **The defaults are chosen on the "
        "validation cuts only**; the test cuts report how the choice holds on later data. NDCG "
        "and recall at 10; coverage is the share of the catalog the stage's lists show; novelty "
        "the mean self-information of the items shown.",
        "",
    ]
    for result in [*validation, *test]:
        lines += [
            f"### {result.name}",
            "",
            f"Cut at {pd.Timestamp(result.cut, unit='s'):%Y-%m-%d %H:%M} UTC; "
            f"{result.train_pairs:,} training pairs, {result.test_users:,} evaluated users.",
            "",
            "| stage | users | strategy | NDCG@10 | recall@10 | coverage | novelty |",
            "|---|---:|---|---:|---:|---:|---:|",
        ]
        for row in result.rows:
            if not row.metrics:
                lines.append(f"| {row.stage} | {row.users} | (no users) | | | | |")
                continue
            for strategy, values in row.metrics.items():
                lines.append(
                    f"| {row.stage} | {row.users} | {strategy} | {_fmt(values['ndcg'])} | "
                    f"{_fmt(values['recall'])} | {_fmt(values['coverage'])} | "
                    f"{_fmt(values['novelty'], 2)} |"
                )
        lines.append("")
    lines += [
        f"Chosen defaults (on the validation cuts, a strategy must match or beat `personalized` "
        f"on NDCG@10 on every data set where the stage has at least {min_users} evaluated users; "
        "otherwise `personalized` stays):",
        "",
        "| stage | default strategy |",
        "|---|---|",
        *[f"| {stage} | {strategy} |" for stage, strategy in defaults.items()],
        "",
        f"Command: `{command}`",
        END,
    ]
    return "\n".join(lines) + "\n"


def update_document(path: Path, section: str) -> None:
    """Replace the section between its markers, or append it at the end of ``path``."""
    text = path.read_text() if path.exists() else ""
    if BEGIN in text and END in text:
        head, _, rest = text.partition(BEGIN)
        _, _, tail = rest.partition(END)
        text = head + section.rstrip("\n") + tail
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text)


# ------------------------------------------------------------------------------- command
def _from_table(table: dict[str, str], ids: np.ndarray) -> np.ndarray:
    return np.array([table.get(str(i), "") for i in ids], dtype=object)


def _shared_categories(name: str, root: Path | None, ids: np.ndarray) -> np.ndarray:
    return item_categories(name, ids, root)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.stage_quality", description=__doc__)
    parser.add_argument("--dataset", action="append", choices=[*SHARED, GENERATED])
    parser.add_argument("--data-root", type=Path, default=None)
    parser.add_argument(
        "--generated-size",
        default="2000,500,50000",
        help="users,items,interactions of the generated log (default 2000,500,50000)",
    )
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--test-fraction", type=float, default=TEST_FRACTION)
    parser.add_argument("--min-users", type=int, default=MIN_USERS)
    parser.add_argument("--doc", type=Path, default=DOC_PATH)
    parser.add_argument("--no-doc", action="store_true", help="print the section only")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING)
    args = _parser().parse_args(argv)
    names = args.dataset or [*SHARED, GENERATED]
    size = tuple(int(x) for x in args.generated_size.split(","))
    if len(size) != 3:
        print("error: --generated-size is users,items,interactions", file=sys.stderr)
        return 2
    validation: list[DatasetResult] = []
    test: list[DatasetResult] = []
    for name in names:
        categories: Callable[[np.ndarray], np.ndarray]
        if name == GENERATED:
            frame, items = _generated_frame(size, args.seed)  # type: ignore[arg-type]
            table = dict(zip(items["item_id"].astype(str), items["category"], strict=True))
            categories = functools.partial(_from_table, table)
            label = f"generated ({size[0]:,} users, {size[1]:,} items, {size[2]:,} events)"
        else:
            try:
                frame = load_dataset(name, args.data_root)
            except DataError as exc:
                print(f"skipping {name}: {exc}")
                continue
            categories = functools.partial(_shared_categories, name, args.data_root)
            label = name
        seconds = frame["timestamp"].to_numpy(dtype=np.float64)
        before = frame[seconds < np.quantile(seconds, 1.0 - args.test_fraction)]
        validation.append(
            run_dataset(
                f"{label}: validation", before, categories, test_fraction=args.test_fraction
            )
        )
        test.append(
            run_dataset(f"{label}: test", frame, categories, test_fraction=args.test_fraction)
        )
    defaults = choose_defaults(validation, args.min_users)
    argv_text = " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    command = f"python -m bench.stage_quality {argv_text}".strip()
    section = render_section(validation, test, defaults, command, args.min_users)
    print(section)
    if not args.no_doc:
        update_document(args.doc, section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
