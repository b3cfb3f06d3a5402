"""Offline recommendations for a list of users (``affinity batch-recommend``).

The lists are made as ``Recommend`` makes them, under the same ranking rules
(:mod:`models.rules`) when given: :func:`rules_from_options` turns the command's rule flags into
a :class:`~models.rules.Rules` value, the one the pyfunc builds from its parameters
(``registry/pyfunc_model.py``) and offline evaluation takes (``training/evaluate.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import pandas as pd
from threadpoolctl import threadpool_limits

from models.errors import DataError, InvalidInputError
from models.ranking import NO_FILTER, ItemFilter, RankingPipeline
from models.rules import Boost, Diversity, Exploration, Promotion, Rules
from registry.mlflow_store import load_model_uri

DEFAULT_EXPLORE_MAX_AGE_DAYS = 90.0
"""How new an item must be to be explored when ``--explore`` is given without an age."""


def parse_filter_spec(text: str, field: str) -> tuple[ItemFilter, float]:
    """``"[category:|type:]NAME[,[category:|type:]NAME...]=NUMBER"`` as an item filter (names
    without a prefix are categories; several are OR-ed within their kind) and the number.

    The syntax of ``--boost`` and ``--promote``, and of the pyfunc's ``boosts`` and
    ``promotion`` parameters."""
    spec, sep, raw = str(text).rpartition("=")
    if not sep or not spec.strip():
        raise InvalidInputError(
            f"{field}: expected [category:|type:]NAME=NUMBER, got {text!r}", field=field
        )
    try:
        number = float(raw)
    except ValueError:
        raise InvalidInputError(f"{field}: {raw!r} is not a number", field=field) from None
    types: list[str] = []
    categories: list[str] = []
    for part in spec.split(","):
        kind, colon, name = part.strip().partition(":")
        if not colon:
            kind, name = "category", kind
        name = name.strip()
        if kind.strip() not in {"category", "type"} or not name:
            raise InvalidInputError(
                f"{field}: expected category:NAME or type:NAME, got {part.strip()!r}", field=field
            )
        (categories if kind.strip() == "category" else types).append(name)
    return ItemFilter.of(types, categories), number


def rules_from_options(
    *,
    diversity_cap: int = 0,
    mmr: float = 0.0,
    boosts: Sequence[str] = (),
    promote: str | None = None,
    explore: float = 0.0,
    explore_max_age_days: float = DEFAULT_EXPLORE_MAX_AGE_DAYS,
    explore_seed: int = 0,
    explore_max_interactions: int | None = None,
) -> Rules | None:
    """The :class:`Rules` of the batch command's flags (None when they ask for nothing).

    ``boosts`` and ``promote`` are :func:`parse_filter_spec` texts (factor; share of the
    places); ``explore`` is the share of the places for items first seen at most
    ``explore_max_age_days`` ago (0: no exploration)."""
    diversity = None
    if diversity_cap or mmr:
        diversity = Diversity(max_per_category=diversity_cap, mmr=mmr)
    boost_rules = []
    for text in boosts:
        flt, factor = parse_filter_spec(text, "boost")
        boost_rules.append(Boost(flt, factor))
    promotion = None
    if promote:
        flt, share = parse_filter_spec(promote, "promote")
        promotion = Promotion(flt, share)
    exploration = None
    if explore:
        exploration = Exploration(
            share=explore,
            max_age_days=explore_max_age_days,
            seed=explore_seed,
            max_interactions=explore_max_interactions,
        )
    rules = Rules(
        diversity=diversity,
        boosts=tuple(boost_rules),
        promotion=promotion,
        exploration=exploration,
    )
    return None if rules.empty else rules


def read_user_ids(path: Path) -> list[str]:
    """One user id per line; blank lines are ignored."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"users file {path} does not exist") from None
    users = [line.strip() for line in text.splitlines() if line.strip()]
    if not users:
        raise DataError(f"users file {path} holds no user ids")
    return users


def batch_recommend(
    model_uri: str,
    users_path: Path,
    k: int,
    out: Path,
    progress: Callable[[str], None] | None = None,
    *,
    item_filter: ItemFilter = NO_FILTER,
    exclude_item_ids: Sequence[str] = (),
    rules: Rules | None = None,
) -> int:
    """Write ``user_id, rank, item_id, score, source`` rows for every user; returns rows written.

    Every user's list is made as ``Recommend`` makes it, with the same ``item_filter``,
    ``exclude_item_ids`` and ranking ``rules`` for all of them (an exploration's clock is read
    once, so every list of one run draws on the same day).
    """
    if k <= 0:
        raise InvalidInputError("--k must be positive", field="k")
    suffix = "".join(out.suffixes).lower()
    if suffix not in {".csv", ".parquet", ".pq", ".csv.gz"}:
        raise InvalidInputError(f"--out must end in .csv or .parquet, got {out.name}", field="out")
    users = read_user_ids(users_path)
    pipeline = RankingPipeline.from_bundle(load_model_uri(model_uri))
    if rules is not None:
        rules = rules.settled()
    rows = []
    with threadpool_limits(1, "blas"):
        for n, user in enumerate(users, start=1):
            result = pipeline.recommend(
                user, k, item_filter=item_filter, exclude_item_ids=exclude_item_ids, rules=rules
            )
            for rank, (item, score) in enumerate(
                zip(result.item_ids, result.scores, strict=True), start=1
            ):
                rows.append((user, rank, item, score, str(result.source)))
            if progress is not None and n % 10_000 == 0:
                progress(f"{n:,}/{len(users):,} users")
    frame = pd.DataFrame(rows, columns=["user_id", "rank", "item_id", "score", "source"])
    out.parent.mkdir(parents=True, exist_ok=True)
    if suffix in {".parquet", ".pq"}:
        frame.to_parquet(out, index=False)
    else:
        frame.to_csv(out, index=False)
    return len(frame)
