"""Lifecycle-stage strategies: how a user's list is made for the stage they are in.

A user in a lifecycle stage (:mod:`models.lifecycle`: new, activated, active, at_risk, dormant,
churned, reactivated) gets that stage's strategy. A strategy is a re-ranking stage (step 3) of
the one ranking pipeline (:mod:`models.ranking`), carried by the request
(``ListRequest.strategy``), so a served list, a batch ranking and an offline evaluation apply it
alike. A request without a strategy pays nothing for this module.

The strategies (:data:`STRATEGIES`):

- ``personalized``: the plain ranking (no stage).
- ``new_user``: the model's candidates blended with what is popular within the top categories
  of the user's items (their first or recent ones: a new user has few), plus a share of the
  places for new items. Each candidate scores ``(1 - weight) * model + weight * popular`` where
  ``model`` is the model's score scaled to [0, 1] over the candidates and ``popular`` is
  ``1 - rank / n`` in the list of the ``n`` most popular items of those categories (0 outside
  it). ``slot_count(k, new_share)`` evenly spaced places (:func:`models.rules.slot_positions`)
  go to the best new items by that score: items first seen at most ``new_item_days`` before the
  newest item of the catalog (the catalog's clock, so a list is the same served or offline).
- ``win_back``: the model's candidates blended with items near the user's favourites and what
  is trending in their top categories: ``(1 - near_weight - trending_weight) * model +
  near_weight * near + trending_weight * trending``, with ``near`` the highest similarity
  (:meth:`RankingPipeline.max_similarity`, clipped to [0, 1]) to the user's ``favourites``
  items of highest confidence, and ``trending`` ``1 - rank / n`` in the trending list of their
  top categories.

A user's categories are the categories of their items (the model's row of the user and the
request's recent items), weighed by confidence; the top ``categories`` of them. A user without
any (a cold start, or a catalog without categories) takes the popular and trending lists of the
whole catalog. Every item a strategy adds comes from the request's own candidates or popular
lists (:meth:`RankingPipeline.candidates`, :meth:`RankingPipeline.popular_candidates`), so it
never escapes the request's filters, exclusions or seen items. A strategy's list carries its
blended scores; a later rule's stage (boosts, diversity) acts on them.

:class:`StrategyConfig` maps each stage to a strategy (validated, errors name the field); its
defaults (:data:`DEFAULT_STAGE_STRATEGIES`) are the ones ``bench/stage_quality.py`` measured to
score at least as well as ``personalized`` on each stage's users (``docs/quality.md``).
"""

from __future__ import annotations

import json
import math
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Self

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import InvalidInputError
from .lifecycle import DAY_SECONDS, STAGES

if TYPE_CHECKING:
    from .ranking import ItemMask, ListRequest, RankingPipeline

StrategyName = Literal["personalized", "new_user", "win_back"]
STRATEGIES: tuple[str, ...] = ("personalized", "new_user", "win_back")
"""Every strategy, by name (see the module docstring)."""
PERSONALIZED = "personalized"
STAGE_CODES = {stage: code for code, stage in enumerate(STAGES)}
"""A stage's code: its index in :data:`models.lifecycle.STAGES`."""
NEW_CODE, ACTIVE_CODE = STAGE_CODES["new"], STAGE_CODES["active"]
STRATEGY_CANDIDATES_PER_SLOT = 2
"""Candidates a strategy chooses from per place (it blends them with items of its own)."""
POPULAR_PER_SLOT = 2
"""Items of the category popular (or trending) list per place of the list."""
CATEGORY_MASKS = 256
"""Masks of users' top categories kept per pipeline."""

DEFAULT_STAGE_STRATEGIES: dict[str, str] = {
    "new": "personalized",
    "activated": "personalized",
    "active": "personalized",
    "at_risk": "win_back",
    "dormant": "win_back",
    "churned": "win_back",
    "reactivated": "personalized",
}
"""The strategy of each stage when the configuration names none: measured by
``bench/stage_quality.py`` (``docs/quality.md``, "Stage strategies"); a stage whose best
strategy did not score at least as well as ``personalized`` on NDCG keeps ``personalized``."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NewUserParams(_Strict):
    """The ``new_user`` strategy's settings."""

    categories: int = Field(default=3, ge=1, le=100)
    """How many of the user's top categories the popular items come from."""
    weight: float = Field(default=0.5, ge=0, le=1, allow_inf_nan=False)
    """Weight of the category popularity against the model's score."""
    new_share: float = Field(default=0.2, ge=0, le=1, allow_inf_nan=False)
    """Share of the places for new items (0: none)."""
    new_item_days: float = Field(default=30.0, gt=0, allow_inf_nan=False)
    """New items first appeared at most this many days before the catalog's newest item."""


class WinBackParams(_Strict):
    """The ``win_back`` strategy's settings."""

    categories: int = Field(default=3, ge=1, le=100)
    """How many of the user's top categories the trending items come from."""
    favourites: int = Field(default=5, ge=1, le=1000)
    """How many of the user's items of highest confidence count as favourites."""
    near_weight: float = Field(default=0.3, ge=0, le=1, allow_inf_nan=False)
    """Weight of the closeness to the favourites."""
    trending_weight: float = Field(default=0.3, ge=0, le=1, allow_inf_nan=False)
    """Weight of the trending rank in the user's top categories."""

    @model_validator(mode="after")
    def _weights(self) -> Self:
        if self.near_weight + self.trending_weight > 1.0 + 1e-9:
            raise ValueError(
                f"trending_weight: near_weight + trending_weight must be at most 1, got "
                f"{self.near_weight + self.trending_weight:g}"
            )
        return self


def _stage_field(stage: str) -> Any:
    return Field(default=DEFAULT_STAGE_STRATEGIES[stage])


class StrategyConfig(_Strict):
    """Which strategy each lifecycle stage gets, and the strategies' settings (JSON:
    ``{"at_risk": "win_back", "new_user": {"new_share": 0.1}}``; what it leaves out keeps the
    defaults)."""

    new: StrategyName = _stage_field("new")
    """Strategy of ``new`` users (and of users unknown to the model and to the segments)."""
    activated: StrategyName = _stage_field("activated")
    """Strategy of ``activated`` users."""
    active: StrategyName = _stage_field("active")
    """Strategy of ``active`` users (and of users the model knows but the segments do not)."""
    at_risk: StrategyName = _stage_field("at_risk")
    """Strategy of ``at_risk`` users."""
    dormant: StrategyName = _stage_field("dormant")
    """Strategy of ``dormant`` users."""
    churned: StrategyName = _stage_field("churned")
    """Strategy of ``churned`` users."""
    reactivated: StrategyName = _stage_field("reactivated")
    """Strategy of ``reactivated`` users."""
    new_user: NewUserParams = NewUserParams()
    """Settings of the ``new_user`` strategy."""
    win_back: WinBackParams = WinBackParams()
    """Settings of the ``win_back`` strategy."""

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], source: str = "stage strategies") -> Self:
        """Validate ``data``; raises :class:`InvalidInputError` whose message names ``source``
        and each bad field (``at_risk``, ``new_user.new_share``), its ``field`` the first."""
        try:
            return cls.model_validate(dict(data))
        except ValidationError as exc:
            raise InvalidInputError(f"{source}: {_describe(exc)}", field=_first(exc)) from None

    @classmethod
    def parse(cls, text: str, source: str = "stage strategies") -> Self | None:
        """The configuration of a setting's text: ``off`` (or empty) is None, ``default`` the
        measured defaults, else a JSON object over them."""
        text = text.strip()
        if text.lower() in ("", "off", "none", "false"):
            return None
        if text.lower() in ("default", "on", "true"):
            return cls()
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InvalidInputError(
                f"{source}: not off, default or a JSON object ({exc.msg} at {exc.pos})",
                field="config",
            ) from None
        if not isinstance(data, dict):
            raise InvalidInputError(
                f"{source}: a JSON object of stage -> strategy is expected, got "
                f"{type(data).__name__}",
                field="config",
            )
        return cls.from_mapping(data, source)

    def strategy_of(self, stage: str) -> Strategy | None:
        """The strategy of ``stage``; None for ``personalized`` (the plain ranking)."""
        if stage not in STAGE_CODES:
            raise InvalidInputError(
                f"unknown stage {stage!r}; expected one of {', '.join(STAGES)}", field="stage"
            )
        return self.strategy(getattr(self, stage))

    def strategy(self, name: str) -> Strategy | None:
        """The strategy called ``name`` with this configuration's settings (None: personalized)."""
        if name == "new_user":
            return Strategy("new_user", self.new_user)
        if name == "win_back":
            return Strategy("win_back", self.win_back)
        if name == PERSONALIZED:
            return None
        raise InvalidInputError(
            f"unknown strategy {name!r}; expected one of {', '.join(STRATEGIES)}", field="strategy"
        )

    def by_stage(self) -> dict[str, str]:
        """Stage -> strategy name, every stage."""
        return {stage: str(getattr(self, stage)) for stage in STAGES}


def _describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        name = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            parts.append(
                f"{name}: unknown setting (stages: {', '.join(STAGES)}; strategy settings: "
                "new_user, win_back)"
            )
            continue
        msg = str(err["msg"]).removeprefix("Value error, ")
        parts.append(f"{name}: {msg}" if name else msg)
    return "; ".join(parts)


def _first(exc: ValidationError) -> str:
    errors = exc.errors()
    if not errors:
        return "config"
    name = ".".join(str(p) for p in errors[0]["loc"])
    if errors[0]["type"] == "value_error":
        # A check across fields names its field first in the message ("trending_weight: ...").
        head = str(errors[0]["msg"]).removeprefix("Value error, ").partition(":")[0]
        if head.isidentifier():
            name = f"{name}.{head}" if name else head
    return name or "config"


@dataclass(frozen=True, eq=False)
class Strategy:
    """One strategy with its settings, as a request carries it (``ListRequest.strategy``)."""

    name: str
    params: NewUserParams | WinBackParams


# ------------------------------------------------------------------------------- the stages
class StrategyStages:
    """The strategies' stages for one pipeline, and the catalog facts they share (category
    codes, masks of top categories, the new items). The pipeline is held weakly: it holds this.
    """

    def __init__(self, pipeline: RankingPipeline) -> None:
        self._pipeline = weakref.ref(pipeline)
        names, codes = np.unique(np.asarray(pipeline.catalog.category), return_inverse=True)
        codes = codes.astype(np.int64)
        blank = np.flatnonzero(names == "")
        if len(blank):
            codes[codes == blank[0]] = -1
        self.codes = codes
        """Each item's category number, -1 for items without one."""
        self.n_categories = len(names)
        self._masks: dict[bytes, ItemMask] = {}
        self._new: dict[float, ItemMask | None] = {}
        self._plans: dict[int, tuple[Strategy, tuple[Any, ...]]] = {}

    @property
    def pipeline(self) -> RankingPipeline:
        pipeline = self._pipeline()
        if pipeline is None:  # pragma: no cover - the pipeline is gone, nobody can call us
            raise ReferenceError("ranking pipeline was garbage collected")
        return pipeline

    def stages(self, strategy: Strategy) -> tuple[Any, ...]:
        """The stages of ``strategy`` on this pipeline, built once per ``Strategy`` object."""
        kept = self._plans.get(id(strategy))
        if kept is not None and kept[0] is strategy:
            return kept[1]
        params = strategy.params
        stages: tuple[Any, ...]
        if strategy.name == "new_user" and isinstance(params, NewUserParams):
            stages = (NewUserStage(self, params),)
        elif strategy.name == "win_back" and isinstance(params, WinBackParams):
            stages = (WinBackStage(self, params),)
        else:
            raise InvalidInputError(
                f"unknown strategy {strategy.name!r} with {type(params).__name__}",
                field="strategy",
            )
        if len(self._plans) >= 64:
            self._plans.clear()
        self._plans[id(strategy)] = (strategy, stages)
        return stages

    def top_categories(self, items: np.ndarray, weights: np.ndarray, n: int) -> np.ndarray:
        """The numbers of the ``n`` categories of ``items`` with most weight (ties: lower
        number first), sorted; empty when none of the items has a category."""
        if not len(items) or not self.n_categories:
            return np.empty(0, dtype=np.int64)
        codes = self.codes[items]
        named = codes >= 0
        if not named.any():
            return np.empty(0, dtype=np.int64)
        totals = np.bincount(codes[named], weights=weights[named], minlength=self.n_categories)
        order = np.lexsort((np.arange(len(totals)), -totals))
        chosen = order[: min(n, int((totals > 0).sum()))]
        return np.sort(chosen).astype(np.int64)

    def category_mask(self, categories: np.ndarray) -> ItemMask:
        """The items in ``categories`` (sorted numbers), one kept mask object per set."""
        from .ranking import ItemMask

        key = categories.tobytes()
        kept = self._masks.get(key)
        if kept is None:
            # One lookup per item through a table over the category numbers (-1: none).
            chosen = np.zeros(self.n_categories + 1, dtype=bool)
            chosen[np.asarray(categories, dtype=np.int64) + 1] = True
            mask = chosen[self.codes + 1]
            mask.setflags(write=False)
            if len(self._masks) >= CATEGORY_MASKS:
                self._masks.clear()  # a bound on memory; a mask is rebuilt in microseconds
            kept = self._masks[key] = ItemMask(mask)
        return kept

    def new_items(self, days: float) -> ItemMask | None:
        """The items first seen at most ``days`` before the catalog's newest item; None when
        the catalog knows no first appearances."""
        if days not in self._new:
            from .ranking import ItemMask

            first_seen = np.asarray(self.pipeline.catalog.first_seen, dtype=np.float64)
            known = np.isfinite(first_seen)
            found: ItemMask | None = None
            if known.any():
                newest = float(first_seen[known].max())
                with np.errstate(invalid="ignore"):
                    mask = known & (first_seen >= newest - days * DAY_SECONDS)
                mask.setflags(write=False)
                found = ItemMask(mask)
            self._new[days] = found
        return self._new[days]


def _member(values: np.ndarray, pool: np.ndarray) -> np.ndarray:
    """``np.isin(values, pool)``; for a list's few dozen ids one broadcast comparison, which costs
    a few microseconds where ``np.isin``'s sorting costs tens."""
    if len(values) * len(pool) <= 1 << 14:
        return (np.asarray(values)[:, None] == np.asarray(pool)[None, :]).any(axis=1)
    return np.isin(values, pool)


def _unite(
    ids: np.ndarray, scores: np.ndarray, more: np.ndarray, request: ListRequest, pipeline: Any
) -> tuple[np.ndarray, np.ndarray]:
    """``ids`` followed by the items of ``more`` not among them, with the scores step 1 gives
    those for ``request``."""
    extra = more[~_member(more, ids)] if len(more) else more
    if not len(extra):
        return ids, scores
    extra_scores = pipeline.item_scores(request, extra)
    return np.concatenate([ids, extra]), np.concatenate([scores, extra_scores]).astype(np.float32)


def _scaled(scores: np.ndarray) -> np.ndarray:
    """Scores scaled to [0, 1] over the candidates (all 1 when they are equal)."""
    scores = np.asarray(scores, dtype=np.float64)
    if not len(scores):
        return scores
    finite = np.isfinite(scores)
    if not finite.any():
        return np.zeros(len(scores))
    low, high = float(scores[finite].min()), float(scores[finite].max())
    out = np.ones(len(scores)) if high <= low else (scores - low) / (high - low)
    return np.where(finite, out, 0.0)


def _rank_relevance(ids: np.ndarray, ranked: np.ndarray) -> np.ndarray:
    """``1 - rank / n`` of each of ``ids`` in the list ``ranked`` (best first), 0 outside it."""
    out = np.zeros(len(ids))
    if not len(ranked) or not len(ids):
        return out
    order = np.argsort(ranked, kind="stable")
    sorted_ids = ranked[order]
    at = np.minimum(np.searchsorted(sorted_ids, ids), len(sorted_ids) - 1)
    found = sorted_ids[at] == ids
    rank = order[at[found]]
    out[found] = 1.0 - rank / len(ranked)
    return out


def _by_value(ids: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``ids`` and ``values`` best first (value, then lowest item index)."""
    order = np.lexsort((ids, -values))
    return ids[order], values[order]


class _StrategyStage:
    """A strategy's stage: a :class:`~models.ranking.RerankStage` for the requests that carry
    its strategy."""

    candidates_per_slot = STRATEGY_CANDIDATES_PER_SLOT
    orders = False

    def __init__(self, context: StrategyStages) -> None:
        self.context = context

    def _categories(self, request: ListRequest, n: int) -> tuple[np.ndarray, np.ndarray, Any]:
        """The user's items, their weights, and the mask of their top ``n`` categories (None:
        the whole catalog)."""
        pipeline = self.context.pipeline
        items, weights = pipeline.user_items(request)
        top = self.context.top_categories(items, weights, n)
        within = self.context.category_mask(top) if len(top) else None
        return items, weights, within


class NewUserStage(_StrategyStage):
    """The ``new_user`` strategy (see the module docstring)."""

    def __init__(self, context: StrategyStages, params: NewUserParams) -> None:
        super().__init__(context)
        self.params = params
        self.orders = params.new_share > 0

    def __call__(
        self, ids: np.ndarray, scores: np.ndarray, request: ListRequest
    ) -> tuple[np.ndarray, np.ndarray]:
        params, pipeline, k = self.params, self.context.pipeline, request.k
        ids = np.asarray(ids, dtype=np.int64)
        scores = np.asarray(scores, dtype=np.float32)
        _, _, within = self._categories(request, params.categories)
        popular, _ = pipeline.popular_candidates(request, POPULAR_PER_SLOT * k, within=within)
        new = self.context.new_items(params.new_item_days) if params.new_share > 0 else None
        count = 0
        if new is not None:
            from .rules import slot_count

            count = slot_count(k, params.new_share)
            fresh, _ = pipeline.candidates(
                request, POPULAR_PER_SLOT * count, within=new, backfill=False
            )
            popular_new, _ = pipeline.popular_candidates(request, count, within=new)
            ids, scores = _unite(
                ids, scores, np.concatenate([fresh, popular_new]), request, pipeline
            )
        ids, scores = _unite(ids, scores, popular, request, pipeline)
        blend = (1.0 - params.weight) * _scaled(scores) + params.weight * _rank_relevance(
            ids, popular
        )
        ids, blend = _by_value(ids, blend)
        if not self.orders:
            return ids, blend.astype(np.float32)
        return self._arrange(ids, blend, new, count, request)

    def _arrange(
        self,
        ids: np.ndarray,
        blend: np.ndarray,
        new: ItemMask | None,
        count: int,
        request: ListRequest,
    ) -> tuple[np.ndarray, np.ndarray]:
        """The list with the best new items at evenly spaced places, the rest by the blend."""
        from .rules import slot_positions

        k = request.k
        placed = np.full(k, -1, dtype=np.int64)
        taken = np.zeros(len(ids), dtype=bool)
        if new is not None and count:
            rows = np.flatnonzero(new.mask[ids])[:count]
            places = slot_positions(k, count)[: len(rows)]
            placed[places] = rows
            taken[rows] = True
        rest = iter(np.flatnonzero(~taken).tolist())
        for place in range(k):
            if placed[place] < 0:
                placed[place] = next(rest, -1)
        rows = placed[placed >= 0]
        out_ids, out_scores = ids[rows], blend[rows].astype(np.float32)
        if len(out_ids) < k:  # it makes the whole list: the model's next best, then popular
            more, _ = self.context.pipeline.candidates(request, k - len(out_ids), skip=ids)
            out_ids = np.concatenate([out_ids, np.asarray(more, dtype=np.int64)])
            out_scores = np.concatenate([out_scores, np.zeros(len(more), np.float32)])
        return out_ids, out_scores


class WinBackStage(_StrategyStage):
    """The ``win_back`` strategy (see the module docstring)."""

    def __init__(self, context: StrategyStages, params: WinBackParams) -> None:
        super().__init__(context)
        self.params = params

    def __call__(
        self, ids: np.ndarray, scores: np.ndarray, request: ListRequest
    ) -> tuple[np.ndarray, np.ndarray]:
        params, pipeline, k = self.params, self.context.pipeline, request.k
        ids = np.asarray(ids, dtype=np.int64)
        scores = np.asarray(scores, dtype=np.float32)
        items, weights, within = self._categories(request, params.categories)
        trending, _ = pipeline.popular_candidates(
            request, POPULAR_PER_SLOT * k, within=within, trending=True
        )
        ids, scores = _unite(ids, scores, trending, request, pipeline)
        near = np.zeros(len(ids))
        if len(items) and params.near_weight > 0:
            favourites = items[np.lexsort((items, -weights))][: params.favourites]
            near = np.clip(pipeline.max_similarity(ids, favourites), 0.0, 1.0).astype(np.float64)
        model_weight = 1.0 - params.near_weight - params.trending_weight
        blend = (
            max(model_weight, 0.0) * _scaled(scores)
            + params.near_weight * near
            + params.trending_weight * _rank_relevance(ids, trending)
        )
        if not math.isfinite(float(blend.sum())):  # pragma: no cover - inputs are finite
            blend = np.nan_to_num(blend)
        out_ids, out = _by_value(ids, blend)
        return out_ids, out.astype(np.float32)
