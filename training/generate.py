"""Seeded synthetic interaction logs and item catalogs with real structure for demos and tests.

Users have a few favourite topics (category x sub-genre), items have power-law popularity, and
each engagement runs a view -> click -> like/share -> add_to_cart -> purchase funnel, so a
collaborative-filtering model has personal taste to learn and popularity is a fair baseline.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from models.errors import InvalidInputError

logger = logging.getLogger(__name__)

CATEGORIES: tuple[tuple[str, str], ...] = (
    ("news", "content"),
    ("sports", "content"),
    ("music", "content"),
    ("movies", "content"),
    ("podcasts", "content"),
    ("recipes", "content"),
    ("electronics", "product"),
    ("books", "product"),
    ("fashion", "product"),
    ("home", "product"),
    ("toys", "product"),
    ("beauty", "product"),
)
"""(category, item_type) pairs; the type of an item follows from its category."""
SUBGENRES = 4
"""Sub-genres per category; a topic is one (category, sub-genre) pair."""
EVENTS = ("view", "click", "like", "share", "add_to_cart", "purchase")
"""Funnel steps in the order they happen within one engagement."""
DAYS = 90
"""Length of the generated log."""

_ADJECTIVES = (
    "Bright", "Quiet", "Golden", "Wild", "Urban", "Classic", "Modern", "Hidden", "Lucky",
    "Silver", "Rapid", "Gentle", "Bold", "Tiny", "Grand", "Secret",
)  # fmt: skip
_NOUNS = {
    "news": "Report", "sports": "Match", "music": "Album", "movies": "Film", "podcasts": "Episode",
    "recipes": "Recipe", "electronics": "Gadget", "books": "Novel", "fashion": "Jacket",
    "home": "Lamp", "toys": "Puzzle", "beauty": "Serum",
}  # fmt: skip
_FAVOURITE_TOPICS = 3
_TRENDING_DAYS = 14
_DAY = 86_400


@dataclass
class GenerateResult:
    """Where the generated files are and what they hold."""

    interactions_path: Path
    items_path: Path
    n_users: int
    n_items: int
    n_interactions: int
    start: datetime
    end: datetime
    event_counts: dict[str, int] = field(default_factory=dict)

    def __str__(self) -> str:
        return (
            f"{self.n_interactions:,} interactions ({self.n_users:,} users, {self.n_items:,} "
            f"items, {self.start:%Y-%m-%d} to {self.end:%Y-%m-%d}) to {self.interactions_path} "
            f"and {self.items_path}"
        )


@dataclass
class _World:
    """The latent state the log is sampled from."""

    item_topic: np.ndarray
    item_is_product: np.ndarray
    topic_cum: np.ndarray  # per-topic cumulative popularity, topic t in (t, t + 1]
    topic_order: np.ndarray  # item indices sorted by topic, aligned with topic_cum
    pop_cum: np.ndarray
    trend_cum: np.ndarray
    user_start: np.ndarray
    user_end: np.ndarray
    user_rate: np.ndarray
    user_topics: np.ndarray
    user_topic_cum: np.ndarray
    user_pop_bias: np.ndarray


def _ids(prefix: str, n: int) -> list[str]:
    width = max(5, len(str(n)))
    return [f"{prefix}{k:0{width}d}" for k in range(1, n + 1)]


def _normalized_cumsum(weights: np.ndarray) -> np.ndarray:
    cum = np.cumsum(weights, dtype=np.float64)
    cum /= cum[-1]
    cum[-1] = 1.0
    return cum


def _build_world(rng: np.random.Generator, users: int, items: int, end: int) -> _World:
    n_cat = len(CATEGORIES)
    n_topics = n_cat * SUBGENRES
    cat_share = rng.dirichlet(np.full(n_cat, 3.0))
    item_cat = rng.choice(n_cat, size=items, p=cat_share)
    item_topic = item_cat * SUBGENRES + rng.integers(0, SUBGENRES, size=items)
    is_product = np.array([t == "product" for _, t in CATEGORIES])[item_cat]
    # Zipf-like popularity over a random ranking of the items.
    popularity = (rng.permutation(items) + 1.0) ** -1.05

    order = np.argsort(item_topic, kind="stable")
    sorted_topic = item_topic[order]
    topic_cum = np.empty(items)
    counts = np.bincount(item_topic, minlength=n_topics)
    bounds = np.r_[0, np.cumsum(counts)]
    for t in range(n_topics):
        lo, hi = bounds[t], bounds[t + 1]
        if hi > lo:
            topic_cum[lo:hi] = t + _normalized_cumsum(popularity[order[lo:hi]])
    assert np.all(np.diff(sorted_topic) >= 0)

    hot = rng.random(items) < 0.02
    hot[rng.integers(items)] = True
    trend = popularity * np.where(hot, 25.0, 1.0)

    # Users: new (joined in the last two weeks), dormant (left a month or more ago), active.
    start = end - DAYS * _DAY
    kind = rng.choice(3, size=users, p=[0.6, 0.15, 0.25])
    user_start = np.full(users, float(start))
    user_end = np.full(users, float(end))
    new = kind == 1
    user_start[new] = end - rng.uniform(1, 14, new.sum()) * _DAY
    dormant = kind == 2
    user_start[dormant] = start + rng.uniform(0, 30, dormant.sum()) * _DAY
    user_end[dormant] = np.minimum(
        user_start[dormant] + rng.uniform(7, 45, dormant.sum()) * _DAY, end - 30 * _DAY
    )
    activity = rng.lognormal(0.0, 1.0, users)
    user_rate = activity * (user_end - user_start) / _DAY

    topic_pop = np.repeat(cat_share, SUBGENRES) * rng.uniform(0.5, 1.5, n_topics)
    topic_pop[counts == 0] = 0.0
    user_topics = rng.choice(
        n_topics, size=(users, _FAVOURITE_TOPICS), p=topic_pop / topic_pop.sum()
    )
    taste = rng.dirichlet(np.ones(_FAVOURITE_TOPICS), size=users)
    user_topic_cum = np.cumsum(taste, axis=1)
    user_topic_cum[:, -1] = 1.0
    return _World(
        item_topic=item_topic,
        item_is_product=is_product,
        topic_cum=topic_cum,
        topic_order=order,
        pop_cum=_normalized_cumsum(popularity),
        trend_cum=_normalized_cumsum(trend),
        user_start=user_start,
        user_end=user_end,
        user_rate=user_rate,
        user_topics=user_topics,
        user_topic_cum=user_topic_cum,
        user_pop_bias=rng.beta(2.0, 6.0, users),
    )


def _engagements(
    rng: np.random.Generator, world: _World, user: np.ndarray, end: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(item, start time, funnel flags M x 6) for one engagement per entry of ``user``."""
    m = len(user)
    span = world.user_end[user] - world.user_start[user]
    when = world.user_start[user] + rng.random(m) * span

    slot = (rng.random(m)[:, None] > world.user_topic_cum[user]).sum(axis=1)
    slot = np.minimum(slot, _FAVOURITE_TOPICS - 1)
    topic = world.user_topics[user, slot]
    pos = np.searchsorted(world.topic_cum, topic + rng.random(m), side="right")
    item = world.topic_order[np.minimum(pos, len(world.topic_order) - 1)]

    from_pop = rng.random(m) < world.user_pop_bias[user]
    recent = when > end - _TRENDING_DAYS * _DAY
    draw = rng.random(m)
    popular = np.searchsorted(world.pop_cum, draw, side="right")
    trending = np.searchsorted(world.trend_cum, draw, side="right")
    chosen = np.where(recent, trending, popular)
    n_items = len(world.item_topic)
    item = np.where(from_pop, np.minimum(chosen, n_items - 1), item)

    product = world.item_is_product[item]
    # Engagements that match the user's taste go deeper into the funnel.
    liked = world.item_topic[item] == topic
    flags = np.zeros((m, len(EVENTS)), dtype=bool)
    flags[:, 0] = True
    click_p = np.where(product, 0.25, 0.30) * np.where(liked, 1.0, 0.45)
    flags[:, 1] = rng.random(m) < click_p
    clicked = flags[:, 1]
    flags[:, 2] = clicked & (rng.random(m) < np.where(product, 0.04, 0.35))
    flags[:, 3] = clicked & (rng.random(m) < np.where(product, 0.02, 0.12))
    flags[:, 4] = clicked & product & (rng.random(m) < np.where(liked, 0.35, 0.15))
    flags[:, 5] = flags[:, 4] & (rng.random(m) < 0.45)
    return item, when, flags


def generate(
    out_dir: str | Path,
    *,
    users: int = 2000,
    items: int = 500,
    interactions: int = 50_000,
    seed: int = 42,
) -> GenerateResult:
    """Write ``interactions.parquet`` and ``items.parquet`` into ``out_dir``.

    The log has exactly ``interactions`` rows spanning 90 days that end at midnight UTC on a
    date derived from ``seed`` (2024-01-01 plus ``seed % 366`` days), sorted by time. Every
    user has at least one engagement when ``interactions >= users``. The same arguments give
    the same file content.
    """
    if users < 1 or items < 1 or interactions < 1:
        raise InvalidInputError("users, items and interactions must all be >= 1")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    end_dt = datetime(2024, 1, 1, tzinfo=UTC) + timedelta(days=seed % 366)
    end = int(end_dt.timestamp())
    world = _build_world(rng, users, items, end)

    # Engagements in batches until the funnel has produced enough rows; everyone gets one first.
    expected_depth = 1.35
    parts: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
    total = 0
    first = True
    while total < interactions:
        need = interactions - total
        m = int(need / expected_depth * 1.05) + 16
        sampled = rng.choice(users, size=m, p=world.user_rate / world.user_rate.sum())
        user = np.concatenate([rng.permutation(users), sampled]) if first else sampled
        first = False
        item, when, flags = _engagements(rng, world, user, end)
        parts.append((user, item, when, flags))
        total += int(flags.sum())

    user = np.concatenate([p[0] for p in parts])
    item = np.concatenate([p[1] for p in parts])
    when = np.concatenate([p[2] for p in parts])
    flags = np.concatenate([p[3] for p in parts])
    del parts
    engagement, step = np.nonzero(flags)
    engagement, step = engagement[:interactions], step[:interactions]
    del flags

    # Each funnel step follows the previous one by an exponentially distributed delay.
    # Events of one engagement are contiguous and start with its view (gap 0), so a running
    # sum minus its value at the view gives each event's delay after the view.
    scale = np.array([0.0, 30.0, 60.0, 60.0, 120.0, 600.0])
    elapsed = np.cumsum(rng.exponential(1.0, len(step)) * scale[step])
    group_start = np.flatnonzero(np.r_[True, engagement[1:] != engagement[:-1]])
    sizes = np.diff(np.r_[group_start, len(step)])
    delay = elapsed - np.repeat(elapsed[group_start], sizes)
    timestamp = np.minimum(when[engagement] + delay, end - 1).astype(np.int64)
    del elapsed, delay
    value = np.ones(len(step))
    buys = np.flatnonzero(step == EVENTS.index("purchase"))
    value[buys] += (rng.random(len(buys)) < 0.15).astype(float) + (
        rng.random(len(buys)) < 0.05
    ).astype(float)

    order = np.argsort(timestamp, kind="stable")
    user_idx = user[engagement][order].astype(np.int32)
    item_idx = item[engagement][order].astype(np.int32)
    step = step[order].astype(np.int32)
    timestamp = timestamp[order]
    value = value[order]

    user_ids = _ids("u", users)
    item_ids = _ids("i", items)
    table = pa.table(
        {
            "user_id": pa.DictionaryArray.from_arrays(user_idx, pa.array(user_ids)),
            "item_id": pa.DictionaryArray.from_arrays(item_idx, pa.array(item_ids)),
            "event": pa.DictionaryArray.from_arrays(step, pa.array(EVENTS)),
            "timestamp": pa.array(timestamp, pa.timestamp("s", tz="UTC")),
            "value": pa.array(value, pa.float64()),
        }
    )
    interactions_path = out / "interactions.parquet"
    pq.write_table(table, interactions_path)

    item_cat = world.item_topic // SUBGENRES
    names = [c for c, _ in CATEGORIES]
    available = np.ones(items, dtype=bool)
    # Some products are out of stock and a few content items were taken down.
    available[rng.random(items) < np.where(world.item_is_product, 0.06, 0.01)] = False
    adjective = rng.integers(0, len(_ADJECTIVES), items)
    titles = [
        f"{_ADJECTIVES[a]} {_NOUNS[names[c]]} {k + 1}"
        for k, (a, c) in enumerate(zip(adjective.tolist(), item_cat.tolist(), strict=True))
    ]
    catalog = pa.table(
        {
            "item_id": pa.array(item_ids),
            "item_type": pa.array(np.where(world.item_is_product, "product", "content").tolist()),
            "category": pa.array([names[c] for c in item_cat.tolist()]),
            "title": pa.array(titles),
            "available": pa.array(available),
        }
    )
    items_path = out / "items.parquet"
    pq.write_table(catalog, items_path)

    counts = np.bincount(step, minlength=len(EVENTS))
    result = GenerateResult(
        interactions_path=interactions_path,
        items_path=items_path,
        n_users=users,
        n_items=items,
        n_interactions=len(step),
        start=end_dt - timedelta(days=DAYS),
        end=end_dt,
        event_counts={name: int(c) for name, c in zip(EVENTS, counts, strict=True)},
    )
    logger.info(
        "generated %d interactions (%s) for %d users x %d items in %s",
        result.n_interactions,
        result.event_counts,
        users,
        items,
        out,
    )
    return result
