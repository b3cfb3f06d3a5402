"""Do audiences find the users who engage next? Recall of ``FindAudience``'s scoring on a holdout.

``python -m bench.audience_quality`` splits each data set in time (the last
:data:`HOLDOUT_SHARE` of its events are the holdout), fits the default model (ALS, default
configuration, the training confidence) on the rest, and for each target (the
:data:`TOP_ITEMS` items most interacted with in the holdout, and the :data:`TOP_CATEGORIES`
largest categories where the data have categories) builds audiences of ``N`` users three ways:

- **model**: the users the model scores highest against the items (:mod:`models.audience`,
  what ``FindAudience`` ranks by);
- **most active**: the users with the most distinct items in the training part;
- **random, same stage**: users drawn at random from the audience's candidate pool.

Each is drawn from the same pool: the users of the training part, without those who already
interacted with the target there (``exclude_interacted``), in one of two pools: every user, and
the users of one lifecycle stage at the split time (:func:`models.lifecycle.assign_stages`, default
windows; the stage holding most of the holdout's engaged users). recall@N is the share of the
pool's users who interacted with the target in the holdout that the audience contains, averaged
over the targets; ``N`` is a share of the pool (:data:`SHARES`), since the data sets differ a
hundredfold in users. A generated log (``training/generate.py``) joins the two shared data sets;
missing shared data are skipped with a note.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
from threadpoolctl import threadpool_limits

from bench.datasets import DATASETS_DIR, load_dataset
from models.audience import category_items, interacted, score_users, top_users
from models.lifecycle import Activity, Windows, assign_stages
from training.confidence import build_matrix, vocabulary_codes
from training.fit import fit_model

logger = logging.getLogger(__name__)

DATASETS = ("ml-latest-small", "uci-online-retail", "generated")
HOLDOUT_SHARE = 0.1
"""The newest share of a data set's events held out."""
TOP_ITEMS = 50
TOP_CATEGORIES = 5
SHARES = (0.02, 0.05, 0.10)
"""Audience sizes as shares of the candidate pool."""
METHODS = ("model", "most active", "random")


@dataclass
class Target:
    """One thing an audience is built for: items (model indices) and who engaged later."""

    kind: str
    """``item`` or ``category``."""
    name: str
    items: np.ndarray
    engaged: np.ndarray
    """Boolean over the model's users: interacted with the target in the holdout."""


@dataclass
class PoolReport:
    """Mean recall@N per method and size over one pool's targets."""

    pool: str
    users: int
    targets: int
    sizes: list[int]
    recall: dict[str, list[float]]


@dataclass
class DatasetReport:
    dataset: str
    users: int
    items: int
    train_events: int
    holdout_events: int
    fit_seconds: float
    score_ms: float
    """Mean time to score every user against one target."""
    stage: str
    pools: dict[str, PoolReport] = field(default_factory=dict)


def recall_at(audience: np.ndarray, engaged: np.ndarray) -> float:
    """Share of the ``engaged`` users (a boolean mask) among ``audience`` (user indices)."""
    total = int(engaged.sum())
    return float(engaged[audience].sum()) / total if total else float("nan")


def time_split(frame: pd.DataFrame, holdout_share: float) -> tuple[pd.DataFrame, pd.DataFrame, int]:
    """Events before the split time (the ``1 - holdout_share`` quantile of the timestamps) and
    from it on, and the split time."""
    cut = int(np.quantile(frame["timestamp"].to_numpy(), 1.0 - holdout_share))
    early = frame["timestamp"].to_numpy() < cut
    return frame[early].reset_index(drop=True), frame[~early].reset_index(drop=True), cut


def stages_at(train: pd.DataFrame, users: Sequence[str], as_of: int) -> np.ndarray:
    """Each user's lifecycle stage at ``as_of`` from their first and last training event."""
    grouped = train.groupby("user_id")["timestamp"].agg(["min", "max"])
    grouped = grouped.reindex(pd.Index(list(users)))
    result = assign_stages(
        Activity.of(grouped["min"].to_numpy(float), grouped["max"].to_numpy(float)),
        float(as_of),
        Windows(),
    )
    return np.asarray(result.stage, dtype=object)


def _categories(
    dataset: str, item_ids: np.ndarray, root: Path | None, generated: Path | None
) -> np.ndarray | None:
    if dataset == "generated" and generated is not None:
        items = pd.read_parquet(generated / "items.parquet")
        names = dict(zip(items["item_id"].astype(str), items["category"].astype(str), strict=True))
        return np.array([names.get(str(i), "") for i in item_ids], dtype=object)
    try:
        from bench.rules_quality import item_categories

        return item_categories(dataset, item_ids, root)
    except (ValueError, OSError):
        return None


def targets_of(
    holdout: pd.DataFrame,
    users_vocab: object,
    items_vocab: object,
    categories: np.ndarray | None,
    n_users: int,
    *,
    top_items: int,
    top_categories: int,
) -> list[Target]:
    """The holdout's most engaged items and largest categories, with who engaged with each."""
    u = vocabulary_codes(holdout["user_id"], users_vocab)  # type: ignore[arg-type]
    i = vocabulary_codes(holdout["item_id"], items_vocab)  # type: ignore[arg-type]
    known = (u >= 0) & (i >= 0)
    u, i = u[known], i[known]
    pairs = sp.csr_matrix(
        (np.ones(len(u), np.float32), (i, u)),
        shape=(len(items_vocab), n_users),  # type: ignore[arg-type]
    )
    pairs.sum_duplicates()
    engaged_users = np.diff(pairs.indptr)
    out: list[Target] = []
    for item in np.argsort(-engaged_users, kind="stable")[:top_items]:
        if engaged_users[item] == 0:
            break
        mask = np.zeros(n_users, dtype=bool)
        mask[pairs.indices[pairs.indptr[item] : pairs.indptr[item + 1]]] = True
        out.append(Target("item", str(items_vocab.id(int(item))), np.array([item]), mask))  # type: ignore[attr-defined]
    if categories is not None:
        named = pd.Series(categories[i]).where(lambda s: s != "")
        for name in named.value_counts().index[:top_categories]:
            items = category_items(categories, np.ones(len(categories), bool), str(name))
            mask = np.zeros(n_users, dtype=bool)
            mask[u[np.isin(i, items)]] = True
            out.append(Target("category", str(name), items, mask))
    return out


def run_dataset(
    dataset: str,
    *,
    root: Path | None = None,
    generated: Path | None = None,
    holdout_share: float = HOLDOUT_SHARE,
    top_items: int = TOP_ITEMS,
    top_categories: int = TOP_CATEGORIES,
    shares: Sequence[float] = SHARES,
    factors: int | None = None,
    seed: int = 0,
) -> DatasetReport:
    """The recall table of one data set (see the module docstring)."""
    if dataset == "generated":
        from training.data import load_interactions

        assert generated is not None
        frame = load_interactions(generated / "interactions.parquet").frame
    else:
        frame = load_dataset(dataset, root)
    train, holdout, cut = time_split(frame, holdout_share)
    built = build_matrix(train)
    matrix, users, items = built.matrix, built.users, built.items
    params: dict[str, object] = {"random_state": seed}
    if factors is not None:
        params["factors"] = factors
    start = time.perf_counter()
    model = fit_model("als", params, matrix)
    fit_seconds = time.perf_counter() - start
    n_users = matrix.shape[0]
    categories = _categories(dataset, items.ids, root, generated)
    targets = targets_of(
        holdout,
        users,
        items,
        categories,
        n_users,
        top_items=top_items,
        top_categories=top_categories,
    )
    stages = stages_at(train, users.ids.tolist(), cut)
    engaged_any = np.logical_or.reduce([t.engaged for t in targets])
    stage_counts = pd.Series(stages[engaged_any]).value_counts()
    stage = str(stage_counts.index[0])
    activity = np.diff(matrix.indptr).astype(np.float32)
    rng = np.random.default_rng(seed)
    report = DatasetReport(
        dataset, n_users, matrix.shape[1], len(train), len(holdout), fit_seconds, 0.0, stage
    )
    pools = {"all users": np.ones(n_users, dtype=bool), f"stage {stage}": stages == stage}
    recalls: dict[str, dict[str, list[list[float]]]] = {
        p: {m: [[] for _ in shares] for m in METHODS} for p in pools
    }
    scoring = 0.0
    for target in targets:
        start = time.perf_counter()
        with threadpool_limits(1, "blas"):  # as the server scores
            scores = score_users(model, matrix, target.items).scores
        scoring += time.perf_counter() - start
        fresh = (
            ~interacted(matrix, target.items) if target.kind == "item" else np.ones(n_users, bool)
        )
        for pool_name, pool in pools.items():
            candidates = pool & fresh
            engaged = target.engaged & candidates
            if not engaged.any():
                continue
            ids = np.flatnonzero(candidates)
            for s, share in enumerate(shares):
                n = max(1, round(share * int(pool.sum())))
                found = {
                    "model": top_users(scores, n, candidates)[0],
                    "most active": top_users(activity, n, candidates)[0],
                    "random": rng.choice(ids, size=min(n, len(ids)), replace=False),
                }
                for method, audience in found.items():
                    recalls[pool_name][method][s].append(recall_at(audience, engaged))
    report.score_ms = 1000 * scoring / max(1, len(targets))
    for pool_name, pool in pools.items():
        size = int(pool.sum())
        report.pools[pool_name] = PoolReport(
            pool_name,
            size,
            len(recalls[pool_name]["model"][0]),
            [max(1, round(share * size)) for share in shares],
            {
                m: [float(np.mean(v)) if v else float("nan") for v in recalls[pool_name][m]]
                for m in METHODS
            },
        )
    return report


def render(reports: Sequence[DatasetReport], shares: Sequence[float]) -> str:
    lines = [
        "| data set | pool (users, targets) | N | model | most active | random, same pool |",
        "|---|---|---|---|---|---|",
    ]
    for report in reports:
        for pool in report.pools.values():
            for s, share in enumerate(shares):
                recall = {m: pool.recall[m][s] for m in METHODS}
                best = max(recall.values())
                cells = [
                    f"**{recall[m]:.3f}**" if recall[m] == best else f"{recall[m]:.3f}"
                    for m in METHODS
                ]
                lines.append(
                    f"| {report.dataset} | {pool.pool} ({pool.users}, {pool.targets}) | "
                    f"{pool.sizes[s]} ({share:.0%}) | {' | '.join(cells)} |"
                )
    lines.append("")
    for report in reports:
        lines.append(
            f"- {report.dataset}: {report.users} users, {report.items} items, "
            f"{report.train_events} training / {report.holdout_events} holdout events; ALS fit "
            f"{report.fit_seconds:.1f} s; scoring every user against a target "
            f"{report.score_ms:.2f} ms; stage pool: `{report.stage}`"
        )
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.audience_quality", description=__doc__)
    parser.add_argument("--datasets", default=",".join(DATASETS), help="comma-separated")
    parser.add_argument("--data-root", type=Path, default=None, help=f"default {DATASETS_DIR}")
    parser.add_argument("--holdout-share", type=float, default=HOLDOUT_SHARE)
    parser.add_argument("--top-items", type=int, default=TOP_ITEMS)
    parser.add_argument("--top-categories", type=int, default=TOP_CATEGORIES)
    parser.add_argument(
        "--shares", default=",".join(str(s) for s in SHARES), help="audience sizes, pool shares"
    )
    parser.add_argument("--factors", type=int, default=None, help="ALS factors (default: ALS's)")
    parser.add_argument("--generated-users", type=int, default=20_000)
    parser.add_argument("--generated-items", type=int, default=2_000)
    parser.add_argument("--generated-interactions", type=int, default=400_000)
    parser.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    shares = [float(s) for s in args.shares.split(",") if s.strip()]
    names = [n.strip() for n in args.datasets.split(",") if n.strip()]
    reports: list[DatasetReport] = []
    with tempfile.TemporaryDirectory(prefix="audience-quality-") as tmp:
        generated: Path | None = None
        for name in names:
            if name == "generated":
                from training.generate import generate

                generated = Path(tmp) / "generated"
                generate(
                    generated,
                    users=args.generated_users,
                    items=args.generated_items,
                    interactions=args.generated_interactions,
                    seed=args.seed,
                )
            elif not ((args.data_root or DATASETS_DIR) / name).exists():
                print(
                    f"skipped {name}: not under {args.data_root or DATASETS_DIR}", file=sys.stderr
                )
                continue
            reports.append(
                run_dataset(
                    name,
                    root=args.data_root,
                    generated=generated,
                    holdout_share=args.holdout_share,
                    top_items=args.top_items,
                    top_categories=args.top_categories,
                    shares=shares,
                    factors=args.factors,
                    seed=args.seed,
                )
            )
    given = argv if argv is not None else sys.argv[1:]
    print(f"$ python -m bench.audience_quality {shlex.join(given)}")
    print(render(reports, shares))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
