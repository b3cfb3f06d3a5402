"""What the ranking rules cost in accuracy and buy in diversity, coverage and novelty.

``python -m bench.rules_quality`` splits each shared data set by a public protocol, carves the
validation split from the training part (:func:`training.split.train_validation_test`, as
tuning does: rules and their defaults are chosen on validation, never on the test part), fits
one model with its default configuration on the rest, and evaluates it on validation with
``training.evaluate.evaluate`` under each rule at a few settings (:data:`SETTINGS`): accuracy
(NDCG@10, recall@10) against intra-list diversity, catalog coverage and novelty. Each setting is
one MLflow run (experiment ``rules-<protocol>``); the table and the plot go into
``docs/quality.md`` ("Ranking rules") and ``docs/img/rules_tradeoff.png``.

Categories: ml-latest-small's are each movie's first listed genre (``movies.csv``; MovieLens
lists genres alphabetically, so "Action" and "Adventure" come first); UCI Online Retail has none,
so each product gets one derived from its description's last product word
(:func:`retail_category`, about 80% of the products; the rest have none and are never capped).
Diversity is reported both ways: over the model's item vectors (what ``affinity train`` logs as
``diversity_at_10`` for a factor model, and what MMR works with) and over the categories (what a
category cap works with).
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

import mlflow
import numpy as np
import pandas as pd

from bench.datasets import DATASETS_DIR, load_dataset
from bench.quality import PROTOCOLS
from models.artifact import ItemCatalog
from models.ranking import ItemFilter
from models.ranking_metrics import intra_list_diversity
from models.rules import Boost, Diversity, Exploration, Promotion, Rules
from registry.mlflow_store import configure_tracking
from training.confidence import ConfidenceConfig, build_matrix, vocabulary_codes
from training.evaluate import build_holdout, describe_rules, evaluate
from training.fit import fit_model
from training.split import train_validation_test

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
DOC_PATH = ROOT / "docs" / "quality.md"
PLOT_PATH = ROOT / "docs" / "img" / "rules_tradeoff.png"
DATASETS = ("ml-latest-small", "uci-online-retail")
K = 10
ALGORITHMS = ("als", "ease")
"""The default algorithm of ``affinity train`` (item vectors) and the best of the quality
tables (no item vectors: MMR and diversity go by its item-item scores and the categories)."""
NEW_DAYS = 90.0
"""Exploration explores items first seen at most this many days before the end of the data the
model was fitted on (115 movies of ml-latest-small's, 317 retail products, random-75-25)."""
CAMPAIGN_MIN_SHARE = 0.02
"""The boosted and promoted category holds at least this share of the fitted interactions (see
:func:`campaign_category`)."""
BEGIN, END = "<!-- rules-quality:begin -->", "<!-- rules-quality:end -->"


# ------------------------------------------------------------------------------ categories
def movielens_categories(root: Path | None = None) -> dict[str, str]:
    """movieId -> the first genre ``movies.csv`` lists ("" for "(no genres listed)")."""
    movies = pd.read_csv((root or DATASETS_DIR) / "ml-latest-small" / "movies.csv")
    first = movies["genres"].astype(str).str.split("|").str[0]
    first = first.where(first != "(no genres listed)", "")
    return dict(zip(movies["movieId"].astype(str), first, strict=True))


_PRODUCT_WORDS = {
    "bags & purses": "BAG BAGS PURSE TOTE SHOPPER BACKPACK RUCKSACK",
    "storage": "BOX BOXES TIN TINS JAR JARS BASKET BASKETS DRAWER DRAWERS CABINET CRATE "
    "CANISTER CANISTERS BIN ORGANISER CHEST",
    "candles & lights": "CANDLE CANDLES HOLDER HOLDERS T-LIGHT T-LIGHTS LANTERN LANTERNS "
    "LIGHTS LIGHT LAMP NIGHTLIGHT INCENSE MATCHES",
    "kitchen & tableware": "MUG MUGS CUP CUPS BOWL BOWLS PLATE PLATES DISH TRAY TRAYS CUTLERY "
    "TEAPOT SAUCER TEACUP BOTTLE BOTTLES POT POTS JUG GLASS GLASSES SPOON SPOONS COASTER "
    "COASTERS CAKESTAND STAND APRON TUMBLER BEAKER BEAKERS TEASPOONS LADLE PLACEMATS COSY "
    "CLOTH",
    "jewellery": "NECKLACE NECKLAC BRACELET RING EARRINGS CHARM BROOCH BANGLE PENDANT BEAD "
    "BEADS HAIRCLIP HAIRCLIPS CLIP CLIPS SLIDES HAIRBAND",
    "decorations": "DECORATION DECORATIONS GARLAND BUNTING ORNAMENT WREATH BAUBLE BAUBLES STAR "
    "TREE HEART HEARTS FLOWER FLOWERS BIRD BIRDS BUTTERFLY CHIME CHIMES DUCKS",
    "wall & home": "SIGN SIGNS DOORSIGN FRAME FRAMES MIRROR CLOCK PLAQUE HOOK HOOKS HANGER "
    "HANGERS DOORMAT DOORSTOP CUSHION COVER THROW BLANKET CURTAIN MAT RACK SHELF PEG PEGS "
    "TILE MAGNET MAGNETS CHALKBOARD THERMOMETER QUILT LETTERS",
    "stationery & gift wrap": "CARD CARDS WRAP NOTEBOOK NOTEBOOKS STICKERS STICKER TAPE "
    "PENCILS PENCIL PEN PENS ERASER ERASERS RUBBER TISSUES TISSUE BOOK ENVELOPES PAPER "
    "CALENDAR DIARY TAG TAGS LABELS RIBBON RIBBONS CONFETTI NOTEPAD CALCULATOR",
    "toys & games": "TOY TOYS KIT GAME GAMES DOLL DOLLY JIGSAW PUZZLE BALL SKITTLES DOMINOES "
    "SOLDIER SOLDIERS HELICOPTER BALLOON BALLOONS PLAYHOUSE LADDERS ROPE TATTOOS SLATE "
    "BLOCK WORD",
    "textiles & accessories": "DOILY DOILEY DOILIES TOWEL TOWELS HANKIE HANKIES SCARF GLOVES "
    "UMBRELLA PARASOL HAT SLIPPER SHOES WARMER SPONGE",
    "party & baking": "CASES CUPCAKE BAKING STRAWS NAPKIN NAPKINS CUTTER CUTTERS CAKE PARTY",
}
_PRODUCT_WORD = {
    word: category for category, words in _PRODUCT_WORDS.items() for word in words.split()
}


def retail_category(description: str) -> str:
    """A product category derived from an Online Retail description (the data have none): the
    category of the last word that names a kind of product ("JUMBO BAG RED RETROSPOT": bags;
    "WHITE HANGING HEART T-LIGHT HOLDER": candles & lights), "" when no word does."""
    for word in reversed(re.split(r"[\s,/+.]+", description.upper())):
        if word in _PRODUCT_WORD:
            return _PRODUCT_WORD[word]
    return ""


def item_categories(
    dataset: str, item_ids: Sequence[str] | np.ndarray, root: Path | None = None
) -> np.ndarray:
    """The category of each of ``item_ids`` (a model's items) in ``dataset``."""
    if dataset.startswith("ml-latest-small"):
        genres = movielens_categories(root)
        return np.array([genres.get(str(i), "") for i in item_ids], dtype=object)
    if dataset == "uci-online-retail":
        return np.array([retail_category(str(i)) for i in item_ids], dtype=object)
    raise ValueError(f"no categories for {dataset}")


def campaign_category(
    categories: np.ndarray, interactions: np.ndarray, lists: np.ndarray
) -> tuple[str, float, float]:
    """The category a campaign would push: of those holding at least
    :data:`CAMPAIGN_MIN_SHARE` of the interactions (``interactions``: the item of each), the
    one the model's lists (without rules) under-show most, by its share of the list slots over
    its share of the interactions. Returns it with those two shares."""
    placed = lists[lists >= 0]
    best: tuple[float, str, float, float] | None = None
    for name in sorted(set(categories.tolist()) - {""}):
        share = float((categories[interactions] == name).mean())
        if share < CAMPAIGN_MIN_SHARE:
            continue
        shown = float((categories[placed] == name).mean())
        if best is None or shown / share < best[0]:
            best = (shown / share, name, share, shown)
    if best is None:
        raise ValueError("no category holds enough of the interactions for a campaign")
    return best[1], best[2], best[3]


# ------------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class Setting:
    """One rule at one setting: ``make(campaign category, now)`` gives its rules."""

    family: str
    label: str
    make: Callable[[str, float], Rules | None]
    """(campaign category, now) -> the rules."""


Maker = Callable[[str, float], Rules | None]


def _campaign(category: str) -> ItemFilter:
    return ItemFilter.of(categories=[category])


def _no_rules(campaign: str, now: float) -> Rules | None:
    return None


def _cap(n: int) -> Maker:
    return lambda campaign, now: Rules(diversity=Diversity(max_per_category=n))


def _mmr(m: float) -> Maker:
    return lambda campaign, now: Rules(diversity=Diversity(mmr=m))


def _boost(factor: float) -> Maker:
    return lambda campaign, now: Rules(boosts=(Boost(_campaign(campaign), factor),))


def _promote(share: float) -> Maker:
    return lambda campaign, now: Rules(promotion=Promotion(_campaign(campaign), share))


def _explore(share: float) -> Maker:
    return lambda campaign, now: Rules(
        exploration=Exploration(share=share, max_age_days=NEW_DAYS, seed=0, now=now)
    )


SETTINGS: tuple[Setting, ...] = (
    Setting("none", "no rules", _no_rules),
    *(Setting("cap", f"cap {n} per category", _cap(n)) for n in (1, 2, 3, 5)),
    *(Setting("mmr", f"MMR {m:g}", _mmr(m)) for m in (0.1, 0.2, 0.3, 0.5)),
    *(Setting("boost", f"boost campaign x{f:g}", _boost(f)) for f in (1.5, 3.0)),
    *(Setting("promotion", f"promote campaign {s:.0%}", _promote(s)) for s in (0.1, 0.2)),
    *(
        Setting("exploration", f"explore {s:.0%} (new < {NEW_DAYS:g} d)", _explore(s))
        for s in (0.05, 0.1, 0.2)
    ),
)
"""The grid: each rule alone at a few settings (exploration at k=10: 5% and 10% both round to
one place, :func:`models.rules.slot_count`)."""


# --------------------------------------------------------------------------------- results
@dataclass
class Row:
    setting: Setting
    metrics: dict[str, float]
    seconds: float
    ndcg: np.ndarray = field(repr=False, default_factory=lambda: np.empty(0))
    """Per validation user (NaN for users not evaluated), users in one order for every row."""

    def ndcg_change(self, reference: Row) -> tuple[float, float]:
        """Relative change of mean NDCG against ``reference``, and two standard errors of it,
        from the user-by-user paired differences."""
        both = np.isfinite(self.ndcg) & np.isfinite(reference.ndcg)
        diff = self.ndcg[both] - reference.ndcg[both]
        base = float(reference.ndcg[both].mean())
        if len(diff) < 2 or base == 0:
            return float("nan"), float("nan")
        se = float(diff.std(ddof=1) / math.sqrt(len(diff)))
        return float(diff.mean()) / base, 2 * se / base


@dataclass
class DatasetReport:
    dataset: str
    protocol: str
    algorithm: str
    campaign: str
    stats: dict[str, float]
    rows: list[Row] = field(default_factory=list)

    def reference(self) -> Row:
        return self.rows[0]


def run_dataset(
    dataset: str,
    protocol: str,
    *,
    algorithms: Sequence[str] = ALGORITHMS,
    seed: int = 42,
    data_root: Path | None = None,
    settings: Sequence[Setting] = SETTINGS,
    log_runs: bool = True,
    progress: Callable[[str], None] = print,
) -> list[DatasetReport]:
    """Fit each of ``algorithms`` (defaults) on ``dataset``'s tuning part and evaluate it on
    validation under each of ``settings``; one report per algorithm. The campaign category is
    chosen from the first algorithm's lists without rules (:func:`campaign_category`)."""
    spec = PROTOCOLS[protocol]
    frame = load_dataset(dataset, data_root)
    parts = train_validation_test(
        frame,
        method=spec.method,
        test_fraction=spec.test_fraction,
        validation_fraction=spec.test_fraction,
        seed=seed,
    )
    fit_part, validation = parts.train, parts.validation
    train = build_matrix(fit_part, ConfidenceConfig())
    holdout = build_holdout(validation, train.users, train.items)
    categories = item_categories(dataset, train.items.ids, data_root)
    # Each item's first appearance in the data the model was fitted on; "now" is their end.
    codes = vocabulary_codes(fit_part["item_id"], train.items)
    times = fit_part["timestamp"].to_numpy(dtype=np.float64)
    first_seen = np.full(len(train.items), np.inf)
    np.minimum.at(first_seen, codes[codes >= 0], times[codes >= 0])
    now = float(times.max())
    n_items = len(train.items)
    blank = np.full(n_items, "", dtype=object)
    catalog = ItemCatalog(blank, categories, blank.copy(), np.ones(n_items, dtype=bool))
    catalog.first_seen = first_seen
    new = first_seen >= now - NEW_DAYS * 86_400
    if log_runs:
        mlflow.set_experiment(f"rules-{protocol}")
    reports: list[DatasetReport] = []
    campaign = ""
    for algorithm in algorithms:
        started = time.perf_counter()
        model = fit_model(algorithm, {}, train.matrix)
        fit_seconds = time.perf_counter() - started
        if not campaign:
            unruled = evaluate(
                model, train.matrix, holdout.matrix, k=K, unrankable=holdout.unrankable
            )
            assert unruled.per_user is not None
            campaign, campaign_interactions, campaign_slots = campaign_category(
                categories, train.matrix.tocoo().col, unruled.per_user.recommended
            )
        in_campaign = categories == campaign
        stats = {
            "users": len(train.users),
            "items": n_items,
            "fit_pairs": int(train.matrix.nnz),
            "validation_pairs": holdout.n_pairs,
            "validation_users": len(holdout.users),
            "categorized_items": float((categories != "").mean()),
            "categories": len(set(categories) - {""}),
            "campaign_items": int(in_campaign.sum()),
            "campaign_interactions": campaign_interactions,
            "campaign_slots": campaign_slots,
            "new_items": int(new.sum()),
            "fit_seconds": fit_seconds,
        }
        progress(f"{dataset} / {protocol} / {algorithm}: {stats}")
        report = DatasetReport(dataset, protocol, algorithm, campaign, stats)
        for setting in settings:
            rules = setting.make(campaign, now)
            started = time.perf_counter()
            result = evaluate(
                model,
                train.matrix,
                holdout.matrix,
                k=K,
                unrankable=holdout.unrankable,
                rules=rules,
                catalog=catalog,
            )
            seconds = time.perf_counter() - started
            assert result.per_user is not None
            lists = result.per_user.recommended
            placed = lists >= 0
            metrics = dict(result.metrics)
            if result.diversity_basis != "item_vectors":  # the model has none: n/a
                metrics[f"diversity_at_{K}"] = float("nan")
            metrics[f"diversity_categories_at_{K}"] = float(
                np.nanmean(intra_list_diversity(lists, categories=categories))
            )
            metrics[f"campaign_share_at_{K}"] = float(in_campaign[lists[placed]].mean())
            metrics[f"new_share_at_{K}"] = float(new[lists[placed]].mean())
            row = Row(setting, metrics, seconds, np.asarray(result.per_user.ndcg))
            report.rows.append(row)
            change, noise = row.ndcg_change(report.rows[0])
            metrics[f"ndcg_change_at_{K}"] = change
            metrics[f"ndcg_change_2se_at_{K}"] = noise
            progress(
                f"  {algorithm} {setting.label:<26} ndcg {metrics['ndcg_at_10']:.4f} "
                f"ild {metrics['diversity_at_10']:.4f} / "
                f"{metrics['diversity_categories_at_10']:.4f} "
                f"cov {metrics['coverage_at_10']:.4f} nov {metrics['novelty_at_10']:.2f} "
                f"({seconds:.1f}s)"
            )
            if log_runs:
                with mlflow.start_run(run_name=f"{dataset}/{algorithm}/{setting.label}"):
                    mlflow.set_tags(
                        {
                            "dataset": dataset,
                            "protocol": protocol,
                            "algorithm": algorithm,
                            "split": "validation",
                            "rule": setting.family,
                            "rules": describe_rules(rules),
                            "diversity_basis": result.diversity_basis,
                        }
                    )
                    values = {k: v for k, v in metrics.items() if math.isfinite(v)}
                    mlflow.log_metrics({**values, "time_evaluate_seconds": seconds})
        reports.append(report)
    return reports


# ---------------------------------------------------------------------------------- report
def _change(value: float, reference: float) -> str:
    if not (math.isfinite(value) and math.isfinite(reference)) or reference == 0:
        return ""
    return f" ({100 * (value / reference - 1):+.1f}%)"


def _value(value: float, digits: int) -> str:
    return f"{value:.{digits}f}" if math.isfinite(value) else "n/a"


def render_table(report: DatasetReport) -> str:
    """The markdown table of one data set's settings, changes relative to no rules."""
    ref = report.reference().metrics
    s = report.stats
    lines = [
        f"#### {report.dataset}, {report.protocol} validation split, {report.algorithm} (defaults)",
        "",
        f"{s['validation_users']:,} validation users, {s['items']:,} items in "
        f"{s['categories']} categories ({s['categorized_items']:.0%} of the items have one); "
        f"campaign category **{report.campaign}** ({s['campaign_items']:,} items, "
        f"{s['campaign_interactions']:.1%} of the fitted interactions, "
        f"{s['campaign_slots']:.1%} of the list places without rules); "
        f"{s['new_items']:,} items first seen in the last {NEW_DAYS:g} days of the fitted data.",
        "",
        "| rule | NDCG@10 | NDCG change ± 2 SE | recall@10 | ILD (vectors) | "
        "ILD (categories) | coverage | novelty (bits) | campaign share | new share | time (s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in report.rows:
        m = row.metrics

        first = row is report.rows[0]

        def cell(name: str, digits: int = 4, m: dict[str, float] = m, first: bool = first) -> str:
            return _value(m[name], digits) + ("" if first else _change(m[name], ref[name]))

        change, noise = m["ndcg_change_at_10"], m["ndcg_change_2se_at_10"]
        lines.append(
            "| "
            + " | ".join(
                [
                    row.setting.label,
                    f"{m['ndcg_at_10']:.4f}",
                    "" if row is report.rows[0] else f"{100 * change:+.1f}% ± {100 * noise:.1f}%",
                    cell("recall_at_10"),
                    cell("diversity_at_10"),
                    cell("diversity_categories_at_10"),
                    cell("coverage_at_10"),
                    cell("novelty_at_10", 2),
                    f"{m['campaign_share_at_10']:.1%}",
                    f"{m['new_share_at_10']:.1%}",
                    f"{row.seconds:.1f}",
                ]
            )
            + " |"
        )
    return "\n".join(lines) + "\n"


def render_section(reports: Sequence[DatasetReport], command: str) -> str:
    body = "\n".join(render_table(r) for r in reports)
    return f"{body}\nCommand: `{command}`\n"


def update_document(path: Path, section: str) -> None:
    """Replace the text between the rules-quality markers of ``path`` with ``section``."""
    text = path.read_text(encoding="utf-8")
    block = f"{BEGIN}\n{section}{END}"
    pattern = re.compile(re.escape(BEGIN) + r".*?" + re.escape(END), re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text)
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text, encoding="utf-8")


FAMILY_STYLE = {
    "none": ("black", "o"),
    "cap": ("tab:blue", "s"),
    "mmr": ("tab:orange", "^"),
    "boost": ("tab:green", "D"),
    "promotion": ("tab:red", "v"),
    "exploration": ("tab:purple", "P"),
}


def plot(reports: Sequence[DatasetReport], path: Path) -> None:
    """Each setting's change of NDCG@10 (y) against its change of a beyond-accuracy metric (x),
    relative to no rules: one column per data set and model, one row per metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = (
        ("diversity_categories_at_10", "ILD (categories)"),
        ("coverage_at_10", "catalog coverage"),
        ("novelty_at_10", "novelty"),
    )
    fig, axes = plt.subplots(
        len(rows),
        len(reports),
        figsize=(4.0 * len(reports), 3.3 * len(rows)),
        squeeze=False,
        sharey="col",
    )
    for c, report in enumerate(reports):
        ref = report.reference().metrics
        for r, (name, title) in enumerate(rows):
            ax = axes[r][c]
            ax.axhline(0, color="grey", lw=0.6)
            ax.axvline(0, color="grey", lw=0.6)
            points: dict[tuple[float, float], list[str]] = {}
            for row in report.rows[1:]:
                color, marker = FAMILY_STYLE[row.setting.family]
                x = 100 * (row.metrics[name] / ref[name] - 1)
                y = 100 * row.metrics["ndcg_change_at_10"]
                ax.scatter(x, y, c=color, marker=marker, s=22)
                label = (
                    row.setting.label.replace(" per category", "")
                    .replace("campaign ", "")
                    .replace(f" (new < {NEW_DAYS:g} d)", "")
                )
                points.setdefault((round(x, 6), round(y, 6)), []).append(label)
            for (x, y), labels in points.items():  # equal settings (explore 5% = 10%) once
                ax.annotate(
                    " = ".join(labels),
                    (x, y),
                    fontsize=6,
                    xytext=(3, 2),
                    textcoords="offset points",
                )
            ax.set_xlabel(f"{title} change (%)")
            if c == 0:
                ax.set_ylabel("NDCG@10 change (%)")
            if r == 0:
                ax.set_title(f"{report.dataset}, {report.algorithm}", fontsize=9)
            ax.grid(alpha=0.3)
    handles = [
        plt.Line2D([], [], color=color, marker=marker, linestyle="", label=family)
        for family, (color, marker) in FAMILY_STYLE.items()
        if family != "none"
    ]
    fig.legend(handles=handles, loc="upper center", ncol=len(handles), frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.965))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


# -------------------------------------------------------------------------------------- CLI
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.rules_quality", description=__doc__)
    parser.add_argument("--dataset", action="append", choices=list(DATASETS))
    parser.add_argument("--protocol", choices=list(PROTOCOLS), default="random-75-25")
    parser.add_argument(
        "--algorithms", default=",".join(ALGORITHMS), help="comma-separated algorithm names"
    )
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--data-root", type=Path, default=None)
    parser.add_argument("--output", type=Path, default=DOC_PATH, help="markdown file to update")
    parser.add_argument("--plot", type=Path, default=PLOT_PATH, help="PNG to write")
    parser.add_argument("--no-write", action="store_true", help="touch neither file")
    parser.add_argument("--no-mlflow", action="store_true", help="log no MLflow runs")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not args.no_mlflow:
        configure_tracking()
    given = shlex.join(list(sys.argv[1:] if argv is None else argv))
    command = f"python -m bench.rules_quality {given}".strip()
    algorithms = [name.strip() for name in args.algorithms.split(",") if name.strip()]
    reports = [
        report
        for dataset in args.dataset or DATASETS
        for report in run_dataset(
            dataset,
            args.protocol,
            algorithms=algorithms,
            seed=args.seed,
            data_root=args.data_root,
            log_runs=not args.no_mlflow,
            progress=lambda message: print(message, flush=True),
        )
    ]
    section = render_section(reports, command)
    print(section, flush=True)
    if not args.no_write:
        update_document(args.output, section)
        plot(reports, args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
