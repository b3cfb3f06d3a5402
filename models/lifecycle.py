"""User lifecycle stages and RFM value tiers: the definitions, pure and validated.

Operations teams run users through a lifecycle and treat value tiers differently; this module
says what each stage and tier means, from per-user arrays, with no I/O (``affinity segments``,
:mod:`affinity.segments`, reads the data and stores the result; ``docs/segments.md`` is the
user's guide).

**Stages**: every user is in exactly one, decided in this order, the first that holds wins
(``d`` = days since the user was last seen, as a real number, at the reference time ``as_of``):

1. ``churned``      ``d > windows.dormant_days`` (120)
2. ``dormant``      ``d > windows.at_risk_days`` (60)
3. ``at_risk``      ``d > windows.active_days`` (30)
4. ``reactivated``  seen within ``active_days`` and the previous computation had the user
   ``dormant`` or ``churned``; or had them ``reactivated`` since at most
   ``windows.reactivated_days`` (30) before ``as_of`` (the period a comeback stays one)
5. ``activated``    the first activation event (default ``purchase``) at most
   ``windows.activated_days`` (14) before ``as_of``
6. ``new``          never activated, first seen at most ``windows.new_days`` (14) before ``as_of``
7. ``active``       everyone else: seen within ``active_days``

A window is inclusive: last seen exactly 30 days before is still ``active``.

**Scores**: recency, frequency and monetary value each score 1-5 by where the user stands in the
population, with the mid-rank percentile ``p = (below + equal / 2) / n`` (``below``: users with
a smaller value; ``equal``: users with the same value, the user included) and
``score = ceil(5 * p)``, computed in integers. Equal values get the same score; with distinct
values and ``n`` a multiple of 5 the scores are exact quintiles; a tiny population spreads around
the middle (one user: 3; two: 2 and 4; three: 1, 3, 5; four: 1, 2, 4, 5). Recency counts whole
days since last seen and is reversed (more recent scores higher).

**Tiers**: an ordered list of rules over the three scores (inclusive ranges); a user takes the
first rule that matches and, when none does, the catch-all ``default_tier``, so every user lands
in exactly one.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Self

import numpy as np
from numpy.typing import ArrayLike
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import InvalidInputError

STAGES = ("new", "activated", "active", "at_risk", "dormant", "churned", "reactivated")
"""Every lifecycle stage (see the module docstring for their precedence)."""
SCORE_BINS = 5
"""Recency, frequency and monetary scores run from 1 to this."""
DAY_SECONDS = 86_400.0
_NAME = re.compile(r"^[a-z][a-z0-9_]{0,63}$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Windows(_Strict):
    """The lifecycle's windows, in days (real numbers; each boundary is inclusive)."""

    new_days: float = Field(default=14.0, gt=0, allow_inf_nan=False)
    """A user never activated and first seen at most this long ago is ``new``."""
    activated_days: float = Field(default=14.0, gt=0, allow_inf_nan=False)
    """A user whose first activation is at most this old is ``activated``."""
    active_days: float = Field(default=30.0, gt=0, allow_inf_nan=False)
    """Seen at most this long ago is active; longer ago is ``at_risk``."""
    at_risk_days: float = Field(default=60.0, gt=0, allow_inf_nan=False)
    """Last seen more than this long ago is ``dormant``."""
    dormant_days: float = Field(default=120.0, gt=0, allow_inf_nan=False)
    """Last seen more than this long ago is ``churned``."""
    reactivated_days: float = Field(default=30.0, gt=0, allow_inf_nan=False)
    """How long a user who came back from ``dormant`` or ``churned`` stays ``reactivated``."""

    @model_validator(mode="after")
    def _ordered(self) -> Self:
        if not self.active_days < self.at_risk_days:
            raise ValueError(
                f"at_risk_days ({self.at_risk_days:g}) must be greater than active_days "
                f"({self.active_days:g})"
            )
        if not self.at_risk_days < self.dormant_days:
            raise ValueError(
                f"dormant_days ({self.dormant_days:g}) must be greater than at_risk_days "
                f"({self.at_risk_days:g})"
            )
        return self


ScoreRange = tuple[int, int]


class TierRule(_Strict):
    """One named tier: the inclusive score ranges a user must fall in (all three)."""

    name: str
    """The tier's name: lower case, digits and ``_``, starting with a letter, at most 64."""
    r: ScoreRange = (1, SCORE_BINS)
    """Recency score range ``[low, high]``."""
    f: ScoreRange = (1, SCORE_BINS)
    """Frequency score range ``[low, high]``."""
    m: ScoreRange = (1, SCORE_BINS)
    """Monetary score range ``[low, high]``."""

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError(
                f"{value!r} is not a tier name: use lower case letters, digits and _, starting "
                "with a letter, at most 64 characters"
            )
        return value

    @field_validator("r", "f", "m")
    @classmethod
    def _range(cls, value: ScoreRange) -> ScoreRange:
        low, high = value
        if not 1 <= low <= high <= SCORE_BINS:
            raise ValueError(f"must be [low, high] with 1 <= low <= high <= {SCORE_BINS}")
        return value

    def matches(self, r: np.ndarray, f: np.ndarray, m: np.ndarray) -> np.ndarray:
        """Which users (score arrays) this rule takes."""
        return (
            (r >= self.r[0])
            & (r <= self.r[1])
            & (f >= self.f[0])
            & (f <= self.f[1])
            & (m >= self.m[0])
            & (m <= self.m[1])
        )


DEFAULT_TIERS: tuple[TierRule, ...] = (
    TierRule(name="champions", r=(4, 5), f=(4, 5)),
    TierRule(name="loyal", r=(3, 5), f=(3, 5)),
    TierRule(name="new_customers", r=(4, 5), f=(1, 1)),
    TierRule(name="promising", r=(3, 5), f=(1, 2)),
    TierRule(name="cant_lose", r=(1, 2), f=(4, 5), m=(4, 5)),
    TierRule(name="at_risk", r=(1, 2), f=(3, 5)),
    TierRule(name="hibernating", r=(2, 2), f=(1, 2)),
    TierRule(name="lost", r=(1, 1), f=(1, 2)),
)
"""The classic RFM segment map on recency x frequency (``cant_lose``: frequent, high-spending
customers gone quiet); together they cover every (R, F, M), so the catch-all is for custom maps."""


class SegmentsConfig(_Strict):
    """What ``affinity segments`` computes: events, windows and the tier map (TOML, see
    ``docs/segments.md``)."""

    activation_events: tuple[str, ...] = ("purchase",)
    """Events that activate a user (the first one is the activation), e.g. purchase or like."""
    order_events: tuple[str, ...] = ("purchase",)
    """Events that are orders: frequency counts a user's distinct order times, monetary value
    sums their ``value x price`` (``value`` where a row has no price)."""
    ignored_events: tuple[str, ...] = ("impression",)
    """Events that do not make a user seen (an impression is the service's doing, not theirs)."""
    windows: Windows = Windows()
    """The lifecycle's windows, in days."""
    tiers: tuple[TierRule, ...] = DEFAULT_TIERS
    """Tier rules in order; a user takes the first that matches."""
    default_tier: str = "other"
    """The catch-all tier of users no rule matches."""

    @field_validator("activation_events", "order_events", "ignored_events", mode="before")
    @classmethod
    def _events(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list | tuple):
            return value
        out = []
        for raw in value:
            if not isinstance(raw, str) or not raw.strip():
                raise ValueError(f"event names must be non-empty text, got {raw!r}")
            name = raw.strip().lower()
            if name not in out:
                out.append(name)
        return tuple(out)

    @field_validator("activation_events", "order_events")
    @classmethod
    def _not_empty(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("name at least one event")
        return value

    @field_validator("default_tier")
    @classmethod
    def _default_name(cls, value: str) -> str:
        return TierRule._name(value)

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        names = [rule.name for rule in self.tiers]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"tiers: repeated tier name(s) {', '.join(repeated)}")
        if self.default_tier in names:
            raise ValueError(
                f"default_tier: {self.default_tier!r} is also a rule's name; the catch-all "
                "needs a name of its own"
            )
        clash = sorted(set(self.ignored_events) & {*self.activation_events, *self.order_events})
        if clash:
            raise ValueError(
                f"ignored_events: {', '.join(clash)} cannot be ignored and also activate or order"
            )
        return self

    @property
    def tier_names(self) -> tuple[str, ...]:
        """Every tier a user can land in, the catch-all last."""
        return (*(rule.name for rule in self.tiers), self.default_tier)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], source: str = "configuration") -> Self:
        """Validate ``data`` (e.g. a parsed TOML file); raises :class:`InvalidInputError` whose
        message names ``source`` and each bad field (``windows.at_risk_days``, ``tiers.2.r``)."""
        try:
            return cls.model_validate(dict(data))
        except ValidationError as exc:
            raise InvalidInputError(
                f"{source}: {_describe(exc)}", field=_first_field(exc)
            ) from None


def _field_name(err: Any) -> str:
    return ".".join(str(p) for p in err["loc"])


def _first_field(exc: ValidationError) -> str:
    errors = exc.errors()
    if not errors:
        return "config"
    name = _field_name(errors[0])
    if name:
        return name
    # A check across fields says which one in its message: "default_tier: ...".
    head = str(errors[0]["msg"]).removeprefix("Value error, ").partition(":")[0]
    return head if _NAME.match(head) else "config"


def _describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        name = _field_name(err)
        if err["type"] == "extra_forbidden":
            parts.append(f"{name}: unknown setting")
            continue
        msg = str(err["msg"]).removeprefix("Value error, ")
        # A model-level check names its field in the message already.
        parts.append(f"{name}: {msg}" if name else msg)
    return "; ".join(parts)


# --- scores and tiers -----------------------------------------------------------------------


def quantile_scores(values: ArrayLike, bins: int = SCORE_BINS) -> np.ndarray:
    """Scores 1..``bins`` of each value by its mid-rank percentile in ``values`` (higher value,
    higher score; equal values, equal scores; see the module docstring). Raises
    :class:`InvalidInputError` for a NaN."""
    x = np.asarray(values, dtype=np.float64)
    n = len(x)
    if n == 0:
        return np.zeros(0, dtype=np.int8)
    if np.isnan(x).any():
        raise InvalidInputError("scores need numbers: got NaN", field="values")
    ordered = np.sort(x)
    below = np.searchsorted(ordered, x, side="left").astype(np.int64)
    equal = np.searchsorted(ordered, x, side="right").astype(np.int64) - below
    # ceil(bins * (below + equal / 2) / n) in integers: no rounding at the boundaries.
    scores = (bins * (2 * below + equal) + 2 * n - 1) // (2 * n)
    return scores.astype(np.int8)


@dataclass(frozen=True)
class Scores:
    """Each user's recency, frequency and monetary scores (1-5)."""

    r: np.ndarray
    f: np.ndarray
    m: np.ndarray


def rfm_scores(recency_days: ArrayLike, frequency: ArrayLike, monetary: ArrayLike) -> Scores:
    """Scores of a population: ``recency_days`` (whole days since last seen; fewer is better),
    ``frequency`` (orders) and ``monetary`` (value), one entry per user."""
    recency = np.asarray(recency_days, dtype=np.float64)
    _same_length(recency=recency, frequency=frequency, monetary=monetary)
    return Scores(
        r=quantile_scores(-recency),
        f=quantile_scores(np.asarray(frequency, dtype=np.float64)),
        m=quantile_scores(np.asarray(monetary, dtype=np.float64)),
    )


def assign_tiers(scores: Scores, config: SegmentsConfig) -> np.ndarray:
    """Each user's tier name (the first matching rule, else ``default_tier``)."""
    names = np.array(config.tier_names, dtype=object)
    chosen = np.full(len(scores.r), len(config.tiers), dtype=np.int64)
    open_ = np.ones(len(scores.r), dtype=bool)
    for k, rule in enumerate(config.tiers):
        take = open_ & rule.matches(scores.r, scores.f, scores.m)
        chosen[take] = k
        open_ &= ~take
    return names[chosen]


# --- stages ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Activity:
    """Per-user inputs of the stages, unix seconds (NaN: none), one entry per user.

    ``previous_stage`` and ``previous_since`` come from the last computation (``""`` and NaN for
    a user it did not have); they decide ``reactivated`` and keep ``stage_since`` unchanged.
    """

    first_seen: np.ndarray
    last_seen: np.ndarray
    activated_at: np.ndarray
    previous_stage: np.ndarray
    previous_since: np.ndarray

    @classmethod
    def of(
        cls,
        first_seen: ArrayLike,
        last_seen: ArrayLike,
        activated_at: ArrayLike | None = None,
        previous_stage: ArrayLike | None = None,
        previous_since: ArrayLike | None = None,
    ) -> Activity:
        """Arrays as float64/object with the optional ones filled in (no activation, no past)."""
        first = np.asarray(first_seen, dtype=np.float64)
        n = len(first)
        return cls(
            first_seen=first,
            last_seen=np.asarray(last_seen, dtype=np.float64),
            activated_at=(
                np.full(n, np.nan)
                if activated_at is None
                else np.asarray(activated_at, dtype=np.float64)
            ),
            previous_stage=(
                np.full(n, "", dtype=object)
                if previous_stage is None
                else np.asarray(previous_stage, dtype=object)
            ),
            previous_since=(
                np.full(n, np.nan)
                if previous_since is None
                else np.asarray(previous_since, dtype=np.float64)
            ),
        )


@dataclass(frozen=True)
class StageResult:
    """Each user's stage and when they entered it (unix seconds)."""

    stage: np.ndarray
    since: np.ndarray


def assign_stages(activity: Activity, as_of: float, windows: Windows) -> StageResult:
    """Each user's stage at ``as_of`` (unix seconds) by the precedence of the module docstring.

    ``since``: the previous ``stage_since`` when the stage is unchanged; otherwise when the data
    say the user entered it (``new``: first seen; ``activated``: the activation; ``at_risk``,
    ``dormant``, ``churned``: last seen plus the window; ``active`` with no past computation: the
    end of the new or activated period), capped at ``as_of``; ``as_of`` itself for a user who
    became ``reactivated`` or ``active`` from another stage since the last computation.

    Raises :class:`InvalidInputError` naming the array for unequal lengths, a missing first or
    last seen, last seen before first seen, a user seen after ``as_of`` or an unknown stage.
    """
    a = activity
    _same_length(
        first_seen=a.first_seen,
        last_seen=a.last_seen,
        activated_at=a.activated_at,
        previous_stage=a.previous_stage,
        previous_since=a.previous_since,
    )
    if not math.isfinite(as_of):
        raise InvalidInputError(f"as_of must be a time, got {as_of!r}", field="as_of")
    for name in ("first_seen", "last_seen"):
        if np.isnan(getattr(a, name)).any():
            raise InvalidInputError(f"{name}: every user needs one", field=name)
    if (a.last_seen < a.first_seen).any():
        raise InvalidInputError("last_seen: before first_seen for some users", field="last_seen")
    if (a.last_seen > as_of).any():
        raise InvalidInputError(
            "last_seen: after as_of for some users (leave out later events)", field="last_seen"
        )
    unknown = set(a.previous_stage.tolist()) - {"", *STAGES}
    if unknown:
        raise InvalidInputError(
            f"previous_stage: unknown stage(s) {', '.join(sorted(map(str, unknown)))}",
            field="previous_stage",
        )

    w = windows
    day = DAY_SECONDS
    idle_days = (as_of - a.last_seen) / day
    activated = ~np.isnan(a.activated_at)
    with np.errstate(invalid="ignore"):
        just_activated = activated & ((as_of - a.activated_at) / day <= w.activated_days)
    prev = a.previous_stage
    came_back = np.isin(prev, ["dormant", "churned"])
    with np.errstate(invalid="ignore"):
        still_back = (prev == "reactivated") & (
            (as_of - a.previous_since) / day <= w.reactivated_days
        )
    conditions = [
        ("churned", idle_days > w.dormant_days),
        ("dormant", idle_days > w.at_risk_days),
        ("at_risk", idle_days > w.active_days),
        ("reactivated", came_back | still_back),
        ("activated", just_activated),
        ("new", ~activated & ((as_of - a.first_seen) / day <= w.new_days)),
    ]
    stage = np.full(len(a.first_seen), "active", dtype=object)
    open_ = np.ones(len(stage), dtype=bool)
    for name, holds in conditions:
        take = open_ & holds
        stage[take] = name
        open_ &= ~take

    end_of_start = np.where(
        activated, a.activated_at + w.activated_days * day, a.first_seen + w.new_days * day
    )
    derived = {
        "new": a.first_seen,
        "activated": a.activated_at,
        "at_risk": a.last_seen + w.active_days * day,
        "dormant": a.last_seen + w.at_risk_days * day,
        "churned": a.last_seen + w.dormant_days * day,
        "active": end_of_start,
    }
    since = np.full(len(stage), float(as_of))
    for name, when in derived.items():
        take = stage == name
        since[take] = np.minimum(when[take], as_of)
    had_past = prev != ""
    changed_into = had_past & (prev != stage) & np.isin(stage, ["active", "reactivated"])
    since[changed_into] = as_of
    kept = had_past & (prev == stage) & ~np.isnan(a.previous_since)
    since[kept] = a.previous_since[kept]
    return StageResult(stage=stage, since=since)


def _same_length(**arrays: Any) -> None:
    lengths = {name: len(np.asarray(value)) for name, value in arrays.items()}
    if len(set(lengths.values())) > 1:
        detail = ", ".join(f"{name} {n}" for name, n in lengths.items())
        raise InvalidInputError(
            f"per-user arrays of unequal lengths: {detail}", field=next(iter(lengths))
        )


# --- scoring one user against a stored population -------------------------------------------


@dataclass(frozen=True)
class CutPoints:
    """Where one measure's score steps up in a population: score ``s`` (2..5) is reached at
    ``thresholds[s - 2] = (value, closed)``: by every value above ``value``, and by ``value``
    itself when ``closed``. Built by :func:`cut_points`; scored by :meth:`score`."""

    thresholds: tuple[tuple[float, bool], ...]

    def score(self, value: float) -> int:
        """The score of ``value`` in the population these cut points came from: a member's
        value scores exactly what :func:`quantile_scores` gave it; a value no member has scores
        by the share of the population below it (``ceil(5 * below / n)``, at least 1), so a
        value above every member's scores 5 and one below every member's 1."""
        x = float(value)
        if math.isnan(x):
            raise InvalidInputError("scores need numbers: got NaN", field="value")
        return 1 + sum(1 for t, closed in self.thresholds if x > t or (closed and x == t))

    def to_json(self) -> list[list[float | bool]]:
        return [[t, closed] for t, closed in self.thresholds]

    @classmethod
    def from_json(cls, data: Any) -> CutPoints:
        """From :meth:`to_json`'s list; raises :class:`InvalidInputError` for another shape."""
        try:
            pairs = tuple((float(t), bool(c)) for t, c in data)
        except (TypeError, ValueError):
            raise InvalidInputError(
                f"cut points: not a list of [value, closed] pairs: {data!r}"
            ) from None
        if len(pairs) != SCORE_BINS - 1:
            raise InvalidInputError(f"cut points: {SCORE_BINS - 1} pairs expected, got {data!r}")
        return cls(pairs)


def cut_points(values: ArrayLike, bins: int = SCORE_BINS) -> CutPoints:
    """The cut points of a population's ``values`` (higher value, higher score), consistent
    with :func:`quantile_scores`: ``cut_points(v).score(v[i]) == quantile_scores(v)[i]``.

    Over the real line the score is a step function, monotone in the value: at a member value
    ``u`` it is ``ceil(bins * (below + equal / 2) / n)`` (the tie rule), and between ``u`` and
    the next member value ``ceil(bins * (below + equal) / n)`` (no member to share a tie with).
    Each step's first point is kept, and whether it is a member value (closed) or just past one
    (open). An empty population has no cut points: every value scores 1 ... 5 as if it were
    alone, i.e. 3 (the middle, as :func:`quantile_scores` scores a population of one)."""
    x = np.asarray(values, dtype=np.float64)
    n = len(x)
    if n and np.isnan(x).any():
        raise InvalidInputError("scores need numbers: got NaN", field="values")
    if n == 0:
        middle = (bins + 1) // 2
        return CutPoints(
            tuple(
                (-math.inf, True) if s <= middle else (math.inf, False) for s in range(2, bins + 1)
            )
        )
    distinct, counts = np.unique(x, return_counts=True)
    cum = np.cumsum(counts).astype(np.int64)
    below = cum - counts
    at_value = (bins * (2 * below + counts) + 2 * n - 1) // (2 * n)
    past_value = (bins * (2 * cum) + 2 * n - 1) // (2 * n)
    # Interleaved in value order: at u0, past u0, at u1, past u1, ... (monotone).
    steps = np.empty(2 * len(distinct), dtype=np.int64)
    steps[0::2], steps[1::2] = at_value, past_value
    thresholds = []
    for s in range(2, bins + 1):
        k = int(np.searchsorted(steps, s, side="left"))  # the first point scoring >= s
        thresholds.append((float(distinct[k // 2]), k % 2 == 0))
    return CutPoints(tuple(thresholds))


@dataclass(frozen=True)
class RfmCutPoints:
    """The cut points of a computation's recency (on ``-recency_days``: fewer days score
    higher), frequency and monetary value; stored with it (``segment_runs``)."""

    recency: CutPoints
    frequency: CutPoints
    monetary: CutPoints

    def score(self, recency_days: float, frequency: float, monetary: float) -> tuple[int, int, int]:
        """One user's (R, F, M) scores against the population (see :meth:`CutPoints.score`)."""
        return (
            self.recency.score(-float(recency_days)),
            self.frequency.score(frequency),
            self.monetary.score(monetary),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "recency_negated_days": self.recency.to_json(),
            "frequency": self.frequency.to_json(),
            "monetary": self.monetary.to_json(),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RfmCutPoints:
        return cls(
            recency=CutPoints.from_json(data["recency_negated_days"]),
            frequency=CutPoints.from_json(data["frequency"]),
            monetary=CutPoints.from_json(data["monetary"]),
        )


def rfm_cut_points(
    recency_days: ArrayLike, frequency: ArrayLike, monetary: ArrayLike
) -> RfmCutPoints:
    """The cut points of the population :func:`rfm_scores` scores (same arguments)."""
    _same_length(recency=recency_days, frequency=frequency, monetary=monetary)
    return RfmCutPoints(
        recency=cut_points(-np.asarray(recency_days, dtype=np.float64)),
        frequency=cut_points(frequency),
        monetary=cut_points(monetary),
    )


def tier_of(r: int, f: int, m: int, config: SegmentsConfig) -> str:
    """One user's tier from their scores (the first matching rule, else ``default_tier``)."""
    for rule in config.tiers:
        if (
            rule.r[0] <= r <= rule.r[1]
            and rule.f[0] <= f <= rule.f[1]
            and rule.m[0] <= m <= rule.m[1]
        ):
            return rule.name
    return config.default_tier
