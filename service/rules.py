"""The ranking rules of a served list: the server's defaults and a request's ``RankingRules``.

The rules themselves are :mod:`models.rules` (each a re-ranking stage of the one pipeline); this
module only turns the settings (``AFFINITY_RULES_*``) and a request's message into one
:class:`models.rules.Rules` value. A request's rules override the defaults field by field (an
unset ``optional`` field, an empty filter or an absent part takes the default), so the common
request, which carries none, costs one attribute check when the defaults are off and reuses one
prebuilt value when they are on.

A filter is written the same way in the settings and on the command line (``affinity serve
--rules-boosts``, ``affinity recommend --boost``)::

    category=shoes|bags,item_type=product:1.5

``key=value`` terms joined by ``,`` (``category`` or ``item_type``; ``|`` separates alternatives
of one key), then ``:`` and the number (a boost's factor, a promotion's share). Several boosts
in one setting are separated by ``;``.

Bad values raise :class:`InvalidInputError` naming the request field (``rules.diversity.mmr``),
which the error interceptor turns into INVALID_ARGUMENT.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import partial
from typing import TYPE_CHECKING, TypeVar

import numpy as np

from models.artifact import ITEM_TYPES
from models.errors import InvalidInputError
from models.ranking import ItemFilter
from models.rules import DAY_SECONDS, Boost, Diversity, Exploration, Promotion, Rotation, Rules
from models.vocabulary import Vocabulary

if TYPE_CHECKING:
    from protos.affinity.v1 import recommender_pb2 as pb
    from service.config import ServeSettings

T = TypeVar("T")

MAX_BOOSTS = 32
"""Most boosts one list may carry (each one is a pass over the candidates)."""
FACTOR_RANGE = (1e-6, 1e6)
"""A boost's factor lies in this range: enough to put any item on top or at the bottom, and
far from overflowing the float32 scores (a factor of 1e300 would make them infinite)."""
SHOWN_HALF_LIVES = 4.0
"""The live view keeps a user's shown items this many default half-lives (weight 1/16 then)."""
FILTER_KEYS = {"category": "categories", "categories": "categories"}
FILTER_KEYS.update({"item_type": "item_types", "item_types": "item_types", "type": "item_types"})


# ------------------------------------------------------------------ the text form
def parse_filter(text: str, name: str) -> ItemFilter:
    """``category=a|b,item_type=product`` as an :class:`ItemFilter` (see the module docstring)."""
    found: dict[str, list[str]] = {"item_types": [], "categories": []}
    for term in text.split(","):
        key, sep, values = term.partition("=")
        key = key.strip().lower()
        if not sep or key not in FILTER_KEYS:
            raise InvalidInputError(
                f"{name}: expected category=NAME or item_type=TYPE terms joined by ',', "
                f"got {term.strip()!r}",
                field=name,
            )
        names = [v.strip() for v in values.split("|") if v.strip()]
        if not names:
            raise InvalidInputError(f"{name}: {key}= needs a value", field=name)
        found[FILTER_KEYS[key]] += names
    for item_type in found["item_types"]:
        if item_type not in ITEM_TYPES:
            raise InvalidInputError(
                f"{name}: unknown item type {item_type!r}; expected one of {', '.join(ITEM_TYPES)}",
                field=name,
            )
    return ItemFilter.of(found["item_types"], found["categories"])


def parse_weighted(text: str, name: str) -> tuple[ItemFilter, float]:
    """``FILTER:NUMBER`` (a boost, a promotion) as its filter and number."""
    spec, sep, number = text.strip().rpartition(":")
    if not sep or not spec:
        raise InvalidInputError(
            f"{name}: expected FILTER:NUMBER such as category=books:1.5, got {text.strip()!r}",
            field=name,
        )
    try:
        value = float(number)
    except ValueError:
        raise InvalidInputError(f"{name}: {number.strip()!r} is not a number", field=name) from None
    if not math.isfinite(value):
        raise InvalidInputError(f"{name}: must be finite, got {number.strip()!r}", field=name)
    return parse_filter(spec, name), value


def parse_boosts(text: str, name: str = "rules_boosts") -> tuple[Boost, ...]:
    """Boosts separated by ``;`` (``category=a:1.5;item_type=product:0.8``); ``""``: none."""
    boosts = []
    for part in text.split(";"):
        if part.strip():
            flt, factor = parse_weighted(part, name)
            _check_factor(factor, name)
            boosts.append(_named(name, partial(Boost, flt, factor)))
    if len(boosts) > MAX_BOOSTS:
        raise InvalidInputError(f"{name}: at most {MAX_BOOSTS} boosts", field=name)
    return tuple(boosts)


def _check_factor(factor: float, name: str) -> None:
    low, high = FACTOR_RANGE
    if math.isfinite(factor) and factor > 0 and not low <= factor <= high:
        raise InvalidInputError(
            f"{name}: a boost's factor must be between {low:g} and {high:g}, got {factor:g}",
            field=name,
        )


def parse_promotion(text: str, name: str = "rules_promotion") -> Promotion | None:
    """One promotion (``category=new:0.2``); ``""``: none."""
    if not text.strip():
        return None
    flt, share = parse_weighted(text, name)
    return _named(name, partial(Promotion, flt, share))


def _named(name: str, make: Callable[[], T]) -> T:
    """``make()``, with a validation error renamed to ``name`` (a setting, a CLI option)."""
    try:
        return make()
    except InvalidInputError as exc:
        raise InvalidInputError(f"{name}: {exc}", field=name) from None


def format_filter(flt: ItemFilter) -> str:
    """The text form of ``flt`` (what :func:`parse_filter` reads)."""
    terms = []
    if flt.categories:
        terms.append("category=" + "|".join(flt.categories))
    if flt.item_types:
        terms.append("item_type=" + "|".join(flt.item_types))
    return ",".join(terms)


# ------------------------------------------------------------------ the defaults
@dataclass(frozen=True)
class RuleDefaults:
    """The server's default rules (``AFFINITY_RULES_*``); all off unless configured."""

    max_per_category: int = 0
    mmr: float = 0.0
    boosts: tuple[Boost, ...] = ()
    promotion: Promotion | None = None
    explore_share: float = 0.0
    explore_max_age_days: float = 7.0
    explore_seed: int = 0
    explore_max_interactions: int | None = None
    rotation_rate: float = 0.0
    rotation_half_life_seconds: float = DAY_SECONDS
    rotation_allowed: bool = False

    @classmethod
    def from_settings(cls, settings: ServeSettings) -> RuleDefaults:
        return cls(
            max_per_category=settings.rules_max_per_category,
            mmr=settings.rules_mmr,
            boosts=parse_boosts(settings.rules_boosts),
            promotion=parse_promotion(settings.rules_promotion),
            explore_share=settings.rules_explore_share,
            explore_max_age_days=settings.rules_explore_max_age_days,
            explore_seed=settings.rules_explore_seed,
            explore_max_interactions=settings.rules_explore_max_interactions,
            rotation_rate=settings.rules_rotation_rate,
            rotation_half_life_seconds=settings.rules_rotation_half_life_seconds,
            rotation_allowed=settings.rules_rotation_allowed,
        )

    @property
    def keeps_shown(self) -> bool:
        """Whether the live view must keep users' shown items (rotation on, or allowed)."""
        return self.rotation_rate > 0 or self.rotation_allowed

    @property
    def shown_keep_seconds(self) -> float:
        """How long the live view keeps a shown item (0: not at all)."""
        return SHOWN_HALF_LIVES * self.rotation_half_life_seconds if self.keeps_shown else 0.0


@dataclass(frozen=True, slots=True)
class Plan:
    """The rules of one list before the user's shown items are known."""

    rules: Rules | None
    """``None``: no rule changes the list (the pipeline's plain path)."""
    rotation: tuple[float, float] | None = None
    """``(rate, half_life_seconds)`` when the list rotates (rate > 0)."""


_NO_PLAN = Plan(None)


class RuleResolver:
    """Resolves the rules of each list from the defaults and the request's ``RankingRules``."""

    def __init__(self, defaults: RuleDefaults | None = None, *, max_ids: int = 1000) -> None:
        self.defaults = defaults = defaults or RuleDefaults()
        self.max_ids = max_ids
        self._recommend = self._resolve(None, recommend=True, known=frozenset(ITEM_TYPES))
        self._listing = self._resolve(None, recommend=False, known=frozenset(ITEM_TYPES))
        self.off = self._recommend.rules is None and self._recommend.rotation is None
        """Whether a request without rules gets none (the fast path)."""

    def plan(
        self,
        message: pb.RankingRules | None,
        *,
        recommend: bool,
        item_types: Sequence[str] = (),
    ) -> Plan:
        """The plan of a list whose request carries ``message`` (``None``: no ``rules`` field);
        ``item_types``: the serving model's own item types (beyond content and product)."""
        if message is None:
            return self._recommend if recommend else self._listing
        return self._resolve(
            message, recommend=recommend, known=frozenset(ITEM_TYPES).union(item_types)
        )

    # ------------------------------------------------------------- field by field
    def _resolve(
        self, message: pb.RankingRules | None, *, recommend: bool, known: frozenset[str]
    ) -> Plan:
        d = self.defaults
        # Diversity
        cap, mmr = d.max_per_category, d.mmr
        if message is not None and message.HasField("diversity"):
            div = message.diversity
            if div.HasField("max_per_category"):
                cap = div.max_per_category
            if div.HasField("mmr"):
                mmr = div.mmr
        diversity = Diversity(cap, mmr) if cap != 0 or mmr != 0 else None
        # Boosts
        boosts = d.boosts
        if message is not None:
            if message.no_boosts:
                if len(message.boosts):
                    raise InvalidInputError(
                        "rules.boosts: must be empty when rules.no_boosts is true",
                        field="rules.boosts",
                    )
                boosts = ()
            elif len(message.boosts):
                boosts = self._boosts(message.boosts, known)
        # Promotion
        promotion = d.promotion
        if message is not None and message.HasField("promotion"):
            promotion = self._promotion(message.promotion, known)
        # Exploration and rotation: a user's list only.
        exploration = None
        rotation = None
        if recommend:
            exploration = self._exploration(message)
            rotation = self._rotation(message)
        elif message is not None:
            for part in ("exploration", "rotation"):
                if message.HasField(part):
                    raise InvalidInputError(
                        f"rules.{part}: applies to Recommend only (a user's list)",
                        field=f"rules.{part}",
                    )
        if diversity is None and not boosts and promotion is None and exploration is None:
            return Plan(None, rotation) if rotation is not None else _NO_PLAN
        return Plan(Rules(diversity, boosts, promotion, exploration), rotation)

    def _boosts(self, messages: Sequence[pb.Boost], known: frozenset[str]) -> tuple[Boost, ...]:
        if len(messages) > MAX_BOOSTS:
            raise InvalidInputError(
                f"rules.boosts: at most {MAX_BOOSTS} boosts, got {len(messages)}",
                field="rules.boosts",
            )
        boosts = []
        for b in messages:
            flt = self._filter(b.item_types, b.categories, "rules.boosts", known)
            _check_factor(b.factor, "rules.boosts.factor")
            boosts.append(Boost(flt, b.factor))
        return tuple(boosts)

    def _filter(
        self, item_types: Sequence[str], categories: Sequence[str], name: str, known: frozenset[str]
    ) -> ItemFilter:
        for field, values in (
            (f"{name}.item_types", item_types),
            (f"{name}.categories", categories),
        ):
            if len(values) > self.max_ids:
                raise InvalidInputError(
                    f"{field} holds {len(values)} values; at most {self.max_ids} are allowed",
                    field=field,
                )
        for item_type in item_types:
            if item_type not in known:
                raise InvalidInputError(
                    f"{name}.item_types holds unknown item type {item_type!r}; "
                    f"expected one of {', '.join(sorted(known))}",
                    field=f"{name}.item_types",
                )
        if not item_types and not categories:
            raise InvalidInputError(f"{name}: give at least one item type or category", field=name)
        return ItemFilter.of(list(item_types), list(categories))

    def _promotion(self, message: pb.Promotion, known: frozenset[str]) -> Promotion | None:
        default = self.defaults.promotion
        if message.HasField("share"):
            share = message.share
            if share == 0:
                return None  # this list turns the default promotion off
        elif default is not None:
            share = default.share
        else:
            raise InvalidInputError(
                "rules.promotion.share: give a share (the server has no default promotion)",
                field="rules.promotion.share",
            )
        if message.item_types or message.categories:
            flt = self._filter(message.item_types, message.categories, "rules.promotion", known)
        elif default is not None:
            flt = default.item_filter
        else:
            raise InvalidInputError(
                "rules.promotion: give item_types or categories to promote "
                "(the server has no default promotion)",
                field="rules.promotion",
            )
        return Promotion(flt, share)

    def _exploration(self, message: pb.RankingRules | None) -> Exploration | None:
        d = self.defaults
        share, age, seed, limit = (
            d.explore_share,
            d.explore_max_age_days,
            d.explore_seed,
            d.explore_max_interactions,
        )
        if message is not None and message.HasField("exploration"):
            ex = message.exploration
            if ex.HasField("share"):
                share = ex.share
            elif share == 0:
                raise InvalidInputError(
                    "rules.exploration.share: give a share (the server explores nothing by "
                    "default)",
                    field="rules.exploration.share",
                )
            if ex.HasField("max_age_days"):
                age = ex.max_age_days
            if ex.HasField("seed"):
                seed = ex.seed
            if ex.HasField("max_interactions"):
                limit = ex.max_interactions
        if share == 0:
            return None
        return Exploration(share, age, seed, limit)

    def _rotation(self, message: pb.RankingRules | None) -> tuple[float, float] | None:
        d = self.defaults
        rate, half_life = d.rotation_rate, d.rotation_half_life_seconds
        if message is None or not message.HasField("rotation"):
            return (rate, half_life) if rate > 0 else None  # validated with the settings
        rot = message.rotation
        if rot.HasField("rate"):
            rate = rot.rate
        elif rate == 0:
            raise InvalidInputError(
                "rules.rotation.rate: give a rate (the server rotates nothing by default)",
                field="rules.rotation.rate",
            )
        if rot.HasField("half_life_seconds"):
            half_life = rot.half_life_seconds
        # Checked here, as Rotation would check them, so a bad value fails every request alike
        # (not only those of users with shown items).
        Rotation(_NO_SHOWN, _NO_AGES, rate, half_life)
        if rate == 0:
            return None
        if not d.keeps_shown:
            raise InvalidInputError(
                "rules.rotation.rate: this server keeps no recently shown items "
                "(AFFINITY_RULES_ROTATION_ALLOWED=false)",
                field="rules.rotation.rate",
            )
        return rate, half_life


_NO_SHOWN = np.empty(0, dtype=np.int64)
_NO_AGES = np.empty(0, dtype=np.float64)


def with_rotation(
    plan: Plan, items: Vocabulary, shown: tuple[Sequence[str], np.ndarray] | None
) -> Rules | None:
    """``plan``'s rules with the rotation of the user's ``shown`` items (ids and ages in
    seconds, from the live view); the plan's rules when nothing rotates."""
    if plan.rotation is None or shown is None or not len(shown[0]):
        return plan.rules
    rate, half_life = plan.rotation
    rotation = Rotation.from_ids(items, shown[0], shown[1], rate=rate, half_life_seconds=half_life)
    if not len(rotation.shown_items):
        return plan.rules
    if plan.rules is None:
        return Rules(rotation=rotation)
    return replace(plan.rules, rotation=rotation)
