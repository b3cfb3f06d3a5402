"""The report of a live experiment: what each arm's users did, with intervals, and the decision.

Every ``Recommend`` answer given during an experiment names its experiment and arm in the event
store (``responses.experiment``, ``responses.arm``); events that carry the answer's
``recommendation_id`` and happen within ``window`` of it are credited to it, as in
:mod:`service.attribution` (last touch by id). One grouped query returns, per arm and user, the
answers the user got (impressions; shadow arms' lists are not), the answers that earned a
click-like event, those events, whether the user made a credited purchase and the credited
revenue (the purchases' ``price``, as attribution counts it).

The statistics are at the **user** level, since one user's answers are not independent of each
other: click-through rate is a ratio of two per-user means (clicked answers / answers) with a
delta-method interval; conversion is the share of users who converted and revenue the mean per
user, both with the interval of a mean. An arm's difference from the control arm adds the
variances (independent groups). :func:`decide` promotes a challenger only when both arms have
enough users and the 95% interval of the primary metric's difference lies above zero.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import and_, case, func, select

from models.errors import AffinityError, InvalidInputError
from service.attribution import CLICKS, CLOCK_SKEW, DEFAULT_WINDOW, _seconds_between
from service.events import EVENTS, RESPONSES, EventStore
from service.experiments import METRICS, ExperimentBook, ExperimentConfig, ExperimentError

logger = logging.getLogger(__name__)

Z95 = 1.959963984540054
"""The standard normal quantile of a two-sided 95% interval."""
SHADOW = "shadow"
"""The ``method`` of a shadow arm's recorded list (ranked, never shown)."""
MLFLOW_EXPERIMENT = "affinity-experiments"
"""The MLflow experiment that holds the report runs (training's runs are in ``affinity``)."""
CHAMPION = "champion"
METRIC_LABELS = {"ctr": "CTR", "conversion": "conversion", "revenue": "revenue/user"}
_VERSION = re.compile(r"^\d+$")
_ALIAS = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]{0,255}$")


# --- statistics over per-user arrays ----------------------------------------------------------


@dataclass(frozen=True)
class Estimate:
    """A point estimate with its standard error and 95% interval (``nan`` where undefined)."""

    value: float
    se: float
    low: float
    high: float

    @classmethod
    def of(cls, value: float, se: float) -> Estimate:
        return cls(float(value), float(se), float(value - Z95 * se), float(value + Z95 * se))

    @property
    def defined(self) -> bool:
        return math.isfinite(self.value) and math.isfinite(self.se)

    def to_dict(self) -> dict[str, float | None]:
        return {
            "value": _finite(self.value),
            "se": _finite(self.se),
            "low": _finite(self.low),
            "high": _finite(self.high),
        }


NAN_ESTIMATE = Estimate(math.nan, math.nan, math.nan, math.nan)


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def mean_estimate(values: np.ndarray) -> Estimate:
    """The mean of per-user ``values`` with the interval of a mean (sample variance, normal
    approximation); ``nan`` with no users, an undefined standard error with one."""
    x = np.asarray(values, dtype=np.float64)
    n = x.size
    if n == 0:
        return NAN_ESTIMATE
    se = float(np.std(x, ddof=1) / math.sqrt(n)) if n > 1 else math.nan
    return Estimate.of(float(x.mean()), se)


def ratio_estimate(numerator: np.ndarray, denominator: np.ndarray) -> Estimate:
    """``sum(numerator) / sum(denominator)`` over users (a ratio of two per-user means) with
    its delta-method interval.

    With ``Y`` the numerator and ``X`` the denominator per user and ``R = mean(Y) / mean(X)``,
    ``Var(R) ~ (Var(Y) - 2 R Cov(X, Y) + R^2 Var(X)) / (n mean(X)^2)``: the first-order
    expansion of the ratio, so users who see many lists and click many of them weigh as one
    correlated unit, not as many independent trials.
    """
    y = np.asarray(numerator, dtype=np.float64)
    x = np.asarray(denominator, dtype=np.float64)
    if y.shape != x.shape:
        raise InvalidInputError(
            f"numerator and denominator need one value per user each, got {y.size} and {x.size}",
            field="numerator",
        )
    n = x.size
    if n == 0 or x.sum() <= 0:
        return NAN_ESTIMATE
    mx, my = float(x.mean()), float(y.mean())
    ratio = my / mx
    if n == 1:
        return Estimate.of(ratio, math.nan)
    cov = np.cov(y, x, ddof=1)
    variance = (cov[0, 0] - 2.0 * ratio * cov[0, 1] + ratio * ratio * cov[1, 1]) / (n * mx * mx)
    return Estimate.of(ratio, math.sqrt(max(float(variance), 0.0)))


def difference_estimate(treatment: Estimate, control: Estimate) -> Estimate:
    """``treatment - control`` of two independent groups: the variances add."""
    return Estimate.of(treatment.value - control.value, math.hypot(treatment.se, control.se))


def lift_estimate(treatment: Estimate, control: Estimate) -> Estimate:
    """Relative lift ``treatment / control - 1`` with its delta-method interval (independent
    groups); undefined when the control's value is zero."""
    if not control.value:
        return NAN_ESTIMATE
    t, c = treatment.value, control.value
    se = math.sqrt((treatment.se / c) ** 2 + (t * control.se / (c * c)) ** 2)
    return Estimate.of(t / c - 1.0, se)


# --- per-user data and the report ------------------------------------------------------------


@dataclass(frozen=True)
class ArmData:
    """What every user of one arm got and did, one entry per user (the same order in each)."""

    answers: np.ndarray
    """Answers the user was shown (impressions)."""
    clicked: np.ndarray
    """Of those, answers that earned at least one credited click-like event."""
    clicks: np.ndarray
    """Credited click-like events."""
    converted: np.ndarray
    """Whether the user made a credited purchase (0 or 1)."""
    revenue: np.ndarray
    """Credited revenue: the sum of the credited purchases' prices."""

    def __post_init__(self) -> None:
        n = len(self.answers)
        for name in ("clicked", "clicks", "converted", "revenue"):
            if len(getattr(self, name)) != n:
                raise InvalidInputError(
                    f"{name}: {len(getattr(self, name))} values for {n} users", field=name
                )

    @property
    def users(self) -> int:
        return len(self.answers)

    @classmethod
    def empty(cls) -> ArmData:
        ints = np.zeros(0, dtype=np.int64)
        return cls(ints, ints, ints, ints, np.zeros(0, dtype=np.float64))

    @classmethod
    def of(
        cls,
        answers: Sequence[float] | np.ndarray,
        clicked: Sequence[float] | np.ndarray,
        clicks: Sequence[float] | np.ndarray,
        converted: Sequence[float] | np.ndarray,
        revenue: Sequence[float] | np.ndarray,
    ) -> ArmData:
        return cls(
            np.asarray(answers, dtype=np.int64),
            np.asarray(clicked, dtype=np.int64),
            np.asarray(clicks, dtype=np.int64),
            np.asarray(converted, dtype=np.int64),
            np.asarray(revenue, dtype=np.float64),
        )


@dataclass(frozen=True)
class ArmSummary:
    """One arm's totals and user-level metrics."""

    name: str
    model: str
    share: float
    users: int
    answers: int
    clicked: int
    clicks: int
    converters: int
    revenue: float
    ctr: Estimate
    """Clicked answers / answers, delta-method interval."""
    conversion: Estimate
    """Share of users with a credited purchase."""
    revenue_per_user: Estimate
    versions: list[tuple[str, str, int]] = field(default_factory=list)
    """``(model name, model version, answers)`` the arm served, most answers first."""

    def metric(self, name: str) -> Estimate:
        return {"ctr": self.ctr, "conversion": self.conversion, "revenue": self.revenue_per_user}[
            name
        ]

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "model": self.model,
            "share": self.share,
            "users": self.users,
            "answers": self.answers,
            "clicked_answers": self.clicked,
            "clicks": self.clicks,
            "converters": self.converters,
            "revenue": self.revenue,
            "ctr": self.ctr.to_dict(),
            "conversion": self.conversion.to_dict(),
            "revenue_per_user": self.revenue_per_user.to_dict(),
            "versions": [
                {"model_name": name, "model_version": version, "answers": answers}
                for name, version, answers in self.versions
            ],
        }


@dataclass(frozen=True)
class Comparison:
    """One arm against the control arm on one metric."""

    arm: str
    control: str
    metric: str
    difference: Estimate
    """``arm - control``."""
    lift: Estimate
    """``arm / control - 1``."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "arm": self.arm,
            "control": self.control,
            "metric": self.metric,
            "difference": self.difference.to_dict(),
            "lift": self.lift.to_dict(),
        }


@dataclass(frozen=True)
class ExperimentReport:
    """Every live arm of an experiment over a period, compared with its control arm."""

    config: ExperimentConfig
    status: str
    since: datetime
    until: datetime
    window: timedelta
    arms: list[ArmSummary]
    comparisons: list[Comparison]
    shadow_answers: dict[str, int] = field(default_factory=dict)
    """Lists recorded for each shadow arm (ranked, never shown: not in the metrics)."""
    users_in_several_arms: int = 0
    """Users with answers from more than one arm (shares changed during the experiment)."""
    srm_p_value: float | None = None
    """Chi-square test of the users per arm against the arms' shares (sample ratio mismatch):
    a tiny value means the split is not what the configuration says, and the comparison is
    suspect."""

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def control(self) -> str:
        return self.config.control

    def arm(self, name: str) -> ArmSummary:
        for arm in self.arms:
            if arm.name == name:
                return arm
        raise InvalidInputError(
            f"arm: {name!r} is not a live arm of experiment {self.name!r} "
            f"(live arms: {', '.join(a.name for a in self.arms)})",
            field="arm",
        )

    def comparison(self, arm: str, metric: str) -> Comparison:
        for found in self.comparisons:
            if found.arm == arm and found.metric == metric:
                return found
        raise InvalidInputError(
            f"arm: no comparison of {arm!r} on {metric!r} (is it the control arm?)", field="arm"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "experiment": self.name,
            "status": self.status,
            "control": self.control,
            "primary_metric": self.config.primary_metric,
            "min_users": self.config.min_users,
            "since": self.since.isoformat(),
            "until": self.until.isoformat(),
            "window_seconds": self.window.total_seconds(),
            "arms": [arm.to_dict() for arm in self.arms],
            "comparisons": [c.to_dict() for c in self.comparisons],
            "shadow_answers": dict(self.shadow_answers),
            "users_in_several_arms": self.users_in_several_arms,
            "srm_p_value": self.srm_p_value,
            "config": self.config.model_dump(mode="json"),
        }


def summarize_arm(name: str, data: ArmData, *, model: str = "", share: float = 0.0) -> ArmSummary:
    """One arm's totals and its three metrics with intervals."""
    return ArmSummary(
        name=name,
        model=model,
        share=share,
        users=data.users,
        answers=int(data.answers.sum()),
        clicked=int(data.clicked.sum()),
        clicks=int(data.clicks.sum()),
        converters=int(np.count_nonzero(data.converted)),
        revenue=float(data.revenue.sum()),
        ctr=ratio_estimate(data.clicked, data.answers),
        conversion=mean_estimate((data.converted > 0).astype(np.float64)),
        revenue_per_user=mean_estimate(data.revenue),
    )


def summarize(
    config: ExperimentConfig,
    data: Mapping[str, ArmData],
    *,
    since: datetime,
    until: datetime,
    window: timedelta = DEFAULT_WINDOW,
    status: str = "running",
    versions: Mapping[str, list[tuple[str, str, int]]] | None = None,
    shadow_answers: Mapping[str, int] | None = None,
    users_in_several_arms: int = 0,
) -> ExperimentReport:
    """The report of per-user ``data`` by arm (what :func:`user_aggregates` returns, or a
    simulation's): every live arm of ``config`` (with zeros where it has no users), each one
    compared with the control arm on every metric."""
    versions = versions or {}
    arms: list[ArmSummary] = []
    for arm in config.live_arms:
        summary = summarize_arm(
            arm.name, data.get(arm.name, ArmData.empty()), model=arm.model, share=arm.share
        )
        arms.append(_with_versions(summary, versions.get(arm.name, [])))
    known = {arm.name for arm in config.arms}
    for name in sorted(set(data) - known):  # answers of an arm since removed from the config
        arms.append(_with_versions(summarize_arm(name, data[name]), versions.get(name, [])))
    control = next(arm for arm in arms if arm.name == config.control)
    comparisons = [
        Comparison(
            arm=arm.name,
            control=control.name,
            metric=metric,
            difference=difference_estimate(arm.metric(metric), control.metric(metric)),
            lift=lift_estimate(arm.metric(metric), control.metric(metric)),
        )
        for arm in arms
        if arm.name != control.name
        for metric in METRICS
    ]
    return ExperimentReport(
        config=config,
        status=status,
        since=since,
        until=until,
        window=window,
        arms=arms,
        comparisons=comparisons,
        shadow_answers=dict(shadow_answers or {}),
        users_in_several_arms=users_in_several_arms,
        srm_p_value=_srm_p_value(config, arms),
    )


def _with_versions(summary: ArmSummary, versions: list[tuple[str, str, int]]) -> ArmSummary:
    return ArmSummary(**{**summary.__dict__, "versions": sorted(versions, key=lambda v: -v[2])})


def _srm_p_value(config: ExperimentConfig, arms: list[ArmSummary]) -> float | None:
    from scipy.stats import chisquare

    shares = {arm.name: arm.share for arm in config.live_arms}
    observed = np.array([arm.users for arm in arms if arm.name in shares], dtype=np.float64)
    total = observed.sum()
    if total == 0:
        return None
    expected = np.array([shares[arm.name] for arm in arms if arm.name in shares]) * total
    return float(chisquare(observed, expected).pvalue)


# --- the queries -----------------------------------------------------------------------------


def _check_period(since: datetime, until: datetime, window: timedelta) -> None:
    if since.tzinfo is None or until.tzinfo is None:
        raise InvalidInputError("since and until must be timezone-aware", field="since")
    if until <= since:
        raise InvalidInputError(
            f"until ({until.isoformat()}) must be later than since ({since.isoformat()})",
            field="until",
        )
    if window <= timedelta(0):
        raise InvalidInputError("the attribution window must be positive", field="window")


def user_aggregates(
    store: EventStore,
    experiment: str,
    *,
    since: datetime,
    until: datetime,
    window: timedelta = DEFAULT_WINDOW,
) -> dict[str, ArmData]:
    """Per arm, what each user who got an answer of ``experiment`` served in ``[since, until)``
    got and did (shadow lists excluded; users who did nothing count with zeros).

    An event is credited to the answer its ``recommendation_id`` names when it happened within
    ``window`` after it (and up to :data:`~service.attribution.CLOCK_SKEW` before), whether or
    not that is before ``until``: every answer of the period gets its full window.
    """
    _check_period(since, until, window)
    e, r = EVENTS.c, RESPONSES.c
    credited = _seconds_between(store.dialect, r.served_at, e.ts).between(
        -CLOCK_SKEW.total_seconds(), window.total_seconds()
    )
    shown = and_(
        r.experiment == experiment,
        r.method != SHADOW,
        r.user_id.is_not(None),
        r.served_at >= since,
        r.served_at < until,
    )
    is_click = e.event.in_(CLICKS)
    is_purchase = e.event == "purchase"
    per_answer = (
        select(
            e.recommendation_id.label("rid"),
            func.count(case((is_click, 1))).label("clicks"),
            func.count(case((is_purchase, 1))).label("purchases"),
            func.coalesce(func.sum(case((is_purchase, e.price))), 0.0).label("revenue"),
        )
        .select_from(EVENTS.join(RESPONSES, e.recommendation_id == r.recommendation_id))
        .where(shown, credited)
        .group_by(e.recommendation_id)
        .subquery()
    )
    a = per_answer.c
    per_user = (
        select(
            r.arm,
            r.user_id,
            func.count(),
            func.count(case((a.clicks > 0, 1))),
            func.coalesce(func.sum(a.clicks), 0),
            func.max(case((a.purchases > 0, 1), else_=0)),
            func.coalesce(func.sum(a.revenue), 0.0),
        )
        .select_from(RESPONSES.outerjoin(per_answer, a.rid == r.recommendation_id))
        .where(shown)
        .group_by(r.arm, r.user_id)
        .order_by(r.arm, r.user_id)
    )
    columns: dict[str, list[list[float]]] = {}
    with store.engine.connect() as conn:
        for arm, _user, answers, clicked, clicks, converted, revenue in conn.execute(per_user):
            rows = columns.setdefault(str(arm), [[], [], [], [], []])
            rows[0].append(answers)
            rows[1].append(clicked)
            rows[2].append(clicks)
            rows[3].append(converted)
            rows[4].append(float(revenue))
    return {arm: ArmData.of(*rows) for arm, rows in columns.items()}


def _arm_details(
    store: EventStore, experiment: str, since: datetime, until: datetime
) -> tuple[dict[str, list[tuple[str, str, int]]], dict[str, int], int]:
    """The model versions each live arm served, the shadow lists per shadow arm, and the users
    with answers from more than one live arm."""
    r = RESPONSES.c
    period = and_(r.experiment == experiment, r.served_at >= since, r.served_at < until)
    versions_q = (
        select(r.arm, r.model_name, r.model_version, func.count())
        .where(period, r.method != SHADOW)
        .group_by(r.arm, r.model_name, r.model_version)
    )
    shadow_q = select(r.arm, func.count()).where(period, r.method == SHADOW).group_by(r.arm)
    arms_per_user = (
        select(r.user_id)
        .where(period, r.method != SHADOW, r.user_id.is_not(None))
        .group_by(r.user_id)
        .having(func.count(func.distinct(r.arm)) > 1)
        .subquery()
    )
    several_q = select(func.count()).select_from(arms_per_user)
    versions: dict[str, list[tuple[str, str, int]]] = {}
    with store.engine.connect() as conn:
        for arm, model_name, version, count in conn.execute(versions_q):
            versions.setdefault(str(arm), []).append((str(model_name), str(version), int(count)))
        shadow = {str(arm): int(count) for arm, count in conn.execute(shadow_q)}
        several = int(conn.execute(several_q).scalar_one())
    return versions, shadow, several


def experiment_report(
    store: EventStore,
    name: str,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    window: timedelta = DEFAULT_WINDOW,
) -> ExperimentReport:
    """The report of the stored experiment ``name`` over ``[since, until)`` (default: from its
    creation until now). Raises ``ExperimentNotFound`` for an unknown name."""
    experiment = ExperimentBook(store).get(name)
    since = since or experiment.created_at
    until = until or datetime.now(UTC)
    _check_period(since, until, window)
    data = user_aggregates(store, name, since=since, until=until, window=window)
    versions, shadow, several = _arm_details(store, name, since, until)
    return summarize(
        experiment.config,
        data,
        since=since,
        until=until,
        window=window,
        status=experiment.status,
        versions=versions,
        shadow_answers=shadow,
        users_in_several_arms=several,
    )


# --- the decision ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Decision:
    """Whether to promote the challenger arm's model, and why."""

    experiment: str
    promote: bool
    reason: str
    metric: str
    control: str
    challenger: str | None
    challenger_model: str | None
    """The challenger arm's ``model`` (a registry alias or version)."""
    min_users: int
    users: dict[str, int]
    difference: Estimate | None = None
    lift: Estimate | None = None
    challenger_versions: list[tuple[str, str, int]] = field(default_factory=list)
    """The model versions the challenger arm served during the experiment."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "experiment": self.experiment,
            "promote": self.promote,
            "reason": self.reason,
            "metric": self.metric,
            "control": self.control,
            "challenger": self.challenger,
            "challenger_model": self.challenger_model,
            "min_users": self.min_users,
            "users": dict(self.users),
            "difference": None if self.difference is None else self.difference.to_dict(),
            "lift": None if self.lift is None else self.lift.to_dict(),
            "challenger_versions": [
                {"model_name": name, "model_version": version, "answers": answers}
                for name, version, answers in self.challenger_versions
            ],
        }


def decide(
    report: ExperimentReport,
    metric: str | None = None,
    min_users: int | None = None,
    arm: str | None = None,
) -> Decision:
    """Promote the challenger (``arm``, or the one live arm besides the control) only when the
    challenger and the control arm each have at least ``min_users`` users and the 95% interval
    of ``metric``'s difference (challenger - control) lies entirely above zero.

    ``metric`` and ``min_users`` default to the experiment's ``primary_metric`` and
    ``min_users``. Raises :class:`InvalidInputError` for an unknown metric or arm.
    """
    config = report.config
    metric = metric or config.primary_metric
    if metric not in METRICS:
        raise InvalidInputError(
            f"metric: {metric!r} is not one of {', '.join(METRICS)}", field="metric"
        )
    min_users = config.min_users if min_users is None else min_users
    if isinstance(min_users, bool) or not isinstance(min_users, int) or min_users < 1:
        raise InvalidInputError(
            f"min_users: must be a whole number >= 1, got {min_users!r}", field="min_users"
        )
    control = report.arm(report.control)
    users = {summary.name: summary.users for summary in report.arms}
    base: dict[str, Any] = {
        "experiment": report.name,
        "metric": metric,
        "control": control.name,
        "min_users": min_users,
        "users": users,
    }
    if arm is None:
        others = [a.name for a in report.arms if a.name != control.name]
        if len(others) != 1:
            return Decision(
                promote=False,
                reason=f"{len(others)} live arms besides the control {control.name!r} "
                f"({', '.join(others)}): name the one to decide on",
                challenger=None,
                challenger_model=None,
                **base,
            )
        arm = others[0]
    if arm == control.name:
        raise InvalidInputError(
            f"arm: {arm!r} is the control arm; name a challenger to compare with it", field="arm"
        )
    challenger = report.arm(arm)
    label = METRIC_LABELS[metric]
    found = report.comparison(challenger.name, metric)
    verdict: dict[str, Any] = {
        **base,
        "challenger": challenger.name,
        "challenger_model": challenger.model,
        "difference": found.difference,
        "lift": found.lift,
        "challenger_versions": list(challenger.versions),
    }
    short = sorted(
        (summary for summary in (control, challenger) if summary.users < min_users),
        key=lambda s: s.name,
    )
    if short:
        counts = ", ".join(f"{s.name!r} has {s.users:,}" for s in short)
        return Decision(
            promote=False,
            reason=f"too few users to decide: each arm needs at least {min_users:,}; {counts}",
            **verdict,
        )
    diff = found.difference
    if not diff.defined:
        return Decision(
            promote=False,
            reason=f"the {label} difference has no interval (no variation between users)",
            **verdict,
        )
    interval = f"{_signed(diff.value, metric)} [{_signed(diff.low, metric)}, "
    interval += f"{_signed(diff.high, metric)}]"
    what = f"{label} of {challenger.name!r} - {control.name!r}: {interval} (95%)"
    if diff.low > 0:
        return Decision(
            promote=True,
            reason=f"{what}: better, the interval lies above zero",
            **verdict,
        )
    if diff.high < 0:
        return Decision(
            promote=False, reason=f"{what}: worse, the interval lies below zero", **verdict
        )
    return Decision(
        promote=False,
        reason=f"{what}: the interval includes zero, no difference shown",
        **verdict,
    )


def _signed(value: float, metric: str) -> str:
    if metric == "revenue":
        return f"{value:+,.4g}"
    return f"{100 * value:+.3f} pp"


# --- MLflow ----------------------------------------------------------------------------------


def _use_tracking(tracking_uri: str | None) -> str:
    """Point MLflow at ``tracking_uri`` (default: ``MLFLOW_TRACKING_URI`` or the embedded
    store, as training does); returns the URI."""
    import mlflow

    from registry import mlflow_store

    uri = mlflow_store.configure_tracking()
    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
        uri = tracking_uri
    return uri


def _params(report: ExperimentReport) -> dict[str, str]:
    config = report.config
    params = {
        "experiment": config.name,
        "control": config.control,
        "salt": config.salt,
        "primary_metric": config.primary_metric,
        "min_users": str(config.min_users),
        "since": report.since.isoformat(),
        "until": report.until.isoformat(),
        "window_hours": f"{report.window.total_seconds() / 3600:g}",
    }
    for arm in config.arms:
        params[f"{arm.name}.model"] = arm.model
        params[f"{arm.name}.share"] = f"{arm.share:g}"
        params[f"{arm.name}.shadow"] = str(arm.shadow).lower()
    return params


def _metrics(report: ExperimentReport) -> dict[str, float]:
    metrics: dict[str, float] = {}
    names = {"ctr": "ctr", "conversion": "conversion", "revenue": "revenue_per_user"}
    for arm in report.arms:
        metrics[f"{arm.name}.users"] = arm.users
        metrics[f"{arm.name}.impressions"] = arm.answers
        metrics[f"{arm.name}.clicked_answers"] = arm.clicked
        metrics[f"{arm.name}.clicks"] = arm.clicks
        metrics[f"{arm.name}.converters"] = arm.converters
        metrics[f"{arm.name}.revenue"] = arm.revenue
        for metric, name in names.items():
            estimate = arm.metric(metric)
            metrics[f"{arm.name}.{name}"] = estimate.value
            metrics[f"{arm.name}.{name}_low"] = estimate.low
            metrics[f"{arm.name}.{name}_high"] = estimate.high
    for c in report.comparisons:
        name = names[c.metric]
        metrics[f"{c.arm}.{name}_diff"] = c.difference.value
        metrics[f"{c.arm}.{name}_diff_low"] = c.difference.low
        metrics[f"{c.arm}.{name}_diff_high"] = c.difference.high
        metrics[f"{c.arm}.{name}_lift"] = c.lift.value
        metrics[f"{c.arm}.{name}_lift_low"] = c.lift.low
        metrics[f"{c.arm}.{name}_lift_high"] = c.lift.high
    if report.srm_p_value is not None:
        metrics["srm_p_value"] = report.srm_p_value
    return {k: float(v) for k, v in metrics.items() if math.isfinite(float(v))}


def plot_report(report: ExperimentReport, path: Path) -> Path:
    """A PNG of each arm's metrics with their 95% intervals as error bars, one panel per metric;
    the control arm is drawn with open squares and labelled, so it reads in black and white."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.2 * len(METRICS), 0.6 * len(report.arms) + 2.0))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(METRICS), sharey=True, squeeze=False)[0]
    names = [arm.name for arm in report.arms]
    for ax, metric in zip(axes, METRICS, strict=True):
        scale = 1.0 if metric == "revenue" else 100.0
        for y, arm in enumerate(report.arms):
            estimate = arm.metric(metric)
            if not math.isfinite(estimate.value):
                continue
            control = arm.name == report.control
            err = (
                [
                    [scale * (estimate.value - estimate.low)],
                    [scale * (estimate.high - estimate.value)],
                ]
                if estimate.defined
                else None
            )
            ax.errorbar(
                [scale * estimate.value],
                [y],
                xerr=err,
                fmt="s" if control else "o",
                mfc="white" if control else "black",
                color="black",
                capsize=4,
                ms=7,
            )
            ax.annotate(
                f"{scale * estimate.value:.3g}",
                (scale * estimate.value, y),
                xytext=(0, 7),
                textcoords="offset points",
                ha="center",
                fontsize=8,
            )
        ax.set_xlabel("revenue per user" if metric == "revenue" else f"{METRIC_LABELS[metric]} (%)")
        ax.grid(axis="x", alpha=0.3, linestyle=":")
        ax.set_ylim(-0.7, len(names) - 0.3)
    axes[0].set_yticks(
        range(len(names)),
        [f"{n} (control)" if n == report.control else n for n in names],
    )
    fig.suptitle(
        f"experiment {report.name}: 95% intervals, user level (primary: "
        f"{METRIC_LABELS[report.config.primary_metric]})",
        fontsize=10,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def log_report(
    report: ExperimentReport,
    decision: Decision,
    tracking_uri: str | None = None,
    *,
    mlflow_experiment: str = MLFLOW_EXPERIMENT,
) -> str:
    """Log the report as an MLflow run of ``mlflow_experiment``: the experiment's configuration
    as parameters, every arm's metrics and difference as metrics (``<arm>.ctr``,
    ``<arm>.ctr_low``, ``<arm>.ctr_diff``, ...), the decision as tags, the plot and the report
    JSON as artifacts. Returns the run id."""
    import mlflow

    _use_tracking(tracking_uri)
    mlflow.set_experiment(mlflow_experiment)
    with mlflow.start_run(run_name=f"{report.name}-report") as run:
        mlflow.log_params(_params(report))
        mlflow.log_metrics(_metrics(report))
        mlflow.set_tags(
            {
                "affinity.experiment": report.name,
                "affinity.experiment_status": report.status,
                "decision.promote": str(decision.promote).lower(),
                "decision.metric": decision.metric,
                "decision.control": decision.control,
                "decision.challenger": decision.challenger or "",
                "decision.min_users": str(decision.min_users),
                "decision.reason": decision.reason,
            }
        )
        mlflow.log_dict(
            {"report": report.to_dict(), "decision": decision.to_dict()}, "experiment/report.json"
        )
        with tempfile.TemporaryDirectory(prefix="affinity-experiment-") as tmp:
            mlflow.log_artifact(str(plot_report(report, Path(tmp) / "metrics.png")), "experiment")
        return str(run.info.run_id)


@dataclass(frozen=True)
class Promotion:
    """What :func:`promote` did to the registry."""

    model_name: str
    version: str
    previous: str | None
    """The version ``champion`` named before (``None`` when it named none)."""
    alias: str = CHAMPION

    def to_dict(self) -> dict[str, Any]:
        return {
            "model_name": self.model_name,
            "version": self.version,
            "previous": self.previous,
            "alias": self.alias,
        }


def promote(
    decision: Decision,
    *,
    model_name: str | None = None,
    tracking_uri: str | None = None,
    run_id: str | None = None,
) -> Promotion:
    """Move the registry alias ``champion`` of ``model_name`` to the challenger arm's model
    version, only when ``decision.promote``; tag the version (and the report run ``run_id``)
    with the decision.

    The arm's ``model`` (an alias or a version number) is resolved in the registry now; the
    version must be the one the arm served during the experiment (when the recorded answers
    name one), so a ``challenger`` alias moved since the experiment began is not promoted on
    another model's results. ``model_name`` defaults to the name the arm's answers recorded.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    from registry import mlflow_store

    if not decision.promote or decision.challenger is None or decision.challenger_model is None:
        raise ExperimentError(
            f"experiment {decision.experiment!r}: the decision is not to promote "
            f"({decision.reason})"
        )
    served = decision.challenger_versions
    names = sorted({name for name, _, _ in served})
    if model_name is None:
        if len(names) != 1:
            raise InvalidInputError(
                f"model_name: the arm {decision.challenger!r} recorded "
                f"{len(names)} model names ({', '.join(names) or 'none'}); name one",
                field="model_name",
            )
        model_name = names[0]
    model = decision.challenger_model
    if _VERSION.match(model):
        alias, version = None, model
    elif _ALIAS.match(model):
        alias, version = model, None
    else:
        raise ExperimentError(
            f"arm {decision.challenger!r} serves {model!r}, not a registry alias or version: "
            "promote it by registering it"
        )
    uri = _use_tracking(tracking_uri)
    try:
        resolved, _ = mlflow_store.resolve(
            model_name, alias=alias, version=version, tracking_uri=uri
        )
    except MlflowException as exc:
        raise ExperimentError(
            f"cannot resolve {model_name!r} {model!r} in the registry at {uri}: "
            f"{str(exc).splitlines()[0]}"
        ) from None
    tested = sorted({v for name, v, _ in served if name == model_name})
    if len(tested) > 1:
        raise ExperimentError(
            f"arm {decision.challenger!r} served versions {', '.join(tested)} of {model_name!r} "
            "during the experiment: the result is not one model's; promote by hand"
        )
    if tested and tested[0] != resolved:
        raise ExperimentError(
            f"{model_name!r} {model!r} names version {resolved} now, but arm "
            f"{decision.challenger!r} served version {tested[0]} during the experiment; "
            "promote by hand"
        )
    current = mlflow_store.get_alias_version(model_name, CHAMPION)
    previous = None if current is None else str(current.version)
    mlflow_store.set_alias(model_name, CHAMPION, resolved)
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    tags = {
        "promoted_by_experiment": decision.experiment,
        "promotion_decision": decision.reason,
    }
    for key, value in tags.items():
        client.set_model_version_tag(model_name, resolved, key, value)
    if run_id:
        client.set_tag(run_id, "promoted_version", resolved)
        client.set_tag(run_id, "previous_champion", previous or "")
    logger.info(
        "experiment %s: %s@%s moved from version %s to %s (%s)",
        decision.experiment,
        model_name,
        CHAMPION,
        previous,
        resolved,
        decision.reason,
    )
    return Promotion(model_name=model_name, version=resolved, previous=previous)


# --- the command -----------------------------------------------------------------------------


def add_report_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``affinity experiment report NAME``; sets ``func`` to
    :func:`cmd_experiment_report`."""
    parser.add_argument("name", metavar="NAME", help="the experiment")
    parser.add_argument(
        "--since",
        metavar="DURATION",
        help="report on answers of the last DURATION (7d, 24h) or since an ISO date "
        "(default: since the experiment was created)",
    )
    window = parser.add_mutually_exclusive_group()
    window.add_argument(
        "--window",
        metavar="DURATION",
        help="how long after an answer its events are credited to it (default 24h)",
    )
    window.add_argument("--window-hours", type=float, metavar="H", help="the same window in hours")
    parser.add_argument(
        "--metric",
        choices=METRICS,
        help="decide on this metric (default: the experiment's primary metric)",
    )
    parser.add_argument(
        "--min-users",
        type=int,
        metavar="N",
        help="users each arm needs before deciding (default: the experiment's min_users)",
    )
    parser.add_argument(
        "--arm", metavar="NAME", help="the challenger arm (default: the one live non-control arm)"
    )
    parser.add_argument(
        "--promote-when-better",
        action="store_true",
        help="move the registry alias 'champion' to the challenger's model version when the "
        "decision is to promote",
    )
    parser.add_argument(
        "--model-name",
        metavar="NAME",
        help="the registered model (default: the name the challenger's answers recorded)",
    )
    parser.add_argument(
        "--tracking-uri",
        metavar="URI",
        help="MLflow tracking/registry URI [env MLFLOW_TRACKING_URI; default sqlite:///mlflow.db]",
    )
    parser.add_argument(
        "--no-mlflow", action="store_true", help="do not log the report as an MLflow run"
    )
    parser.add_argument(
        "--events-uri",
        metavar="URI",
        help="the event store: sqlite:///PATH or postgresql+psycopg://USER:PASSWORD@HOST/DB "
        "[env AFFINITY_EVENTS_URI; default sqlite:///./events.db]",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.set_defaults(func=cmd_experiment_report)


def _window_of(args: argparse.Namespace, now: datetime) -> timedelta:
    from service.retention import cutoff_of

    hours = getattr(args, "window_hours", None)
    text = getattr(args, "window", None)
    if hours is not None:
        if not (math.isfinite(hours) and hours > 0):
            raise InvalidInputError(
                f"--window-hours must be a positive number of hours, got {hours:g}",
                field="window_hours",
            )
        return timedelta(hours=hours)
    if not text:
        return DEFAULT_WINDOW
    try:
        return now - cutoff_of(text, now=now)
    except InvalidInputError:
        raise InvalidInputError(
            f"--window: expected a positive duration such as 24h, 2d or 90m; got {text!r}",
            field="window",
        ) from None


def _since_of(args: argparse.Namespace, now: datetime) -> datetime | None:
    from service.retention import cutoff_of

    text = getattr(args, "since", None)
    if not text:
        return None
    try:
        return cutoff_of(text, now=now)
    except InvalidInputError:
        raise InvalidInputError(
            f"--since: expected a duration such as 7d or 12h, or an ISO date in the past such "
            f"as 2026-01-31; got {text!r}",
            field="since",
        ) from None


def cmd_experiment_report(args: argparse.Namespace) -> int:
    """``affinity experiment report NAME``: print the report (a table, or JSON with ``--json``),
    log it to MLflow unless ``--no-mlflow``, promote with ``--promote-when-better``. Returns 0;
    2 with a one-line reason for a user mistake (unknown experiment, bad option)."""
    from service.events import events_uri

    try:
        now = datetime.now(UTC)
        since = _since_of(args, now)
        window = _window_of(args, now)
        with EventStore.open(getattr(args, "events_uri", None) or events_uri()) as store:
            report = experiment_report(store, args.name, since=since, until=now, window=window)
        decision = decide(
            report,
            metric=getattr(args, "metric", None),
            min_users=getattr(args, "min_users", None),
            arm=getattr(args, "arm", None),
        )
        run_id = None
        if not getattr(args, "no_mlflow", False):
            run_id = log_report(report, decision, getattr(args, "tracking_uri", None))
        promotion = None
        if getattr(args, "promote_when_better", False) and decision.promote:
            promotion = promote(
                decision,
                model_name=getattr(args, "model_name", None),
                tracking_uri=getattr(args, "tracking_uri", None),
                run_id=run_id,
            )
    except AffinityError as exc:
        print(f"affinity experiment report: error: {exc}", file=sys.stderr)
        return 2
    if getattr(args, "json", False):
        out = {
            "report": report.to_dict(),
            "decision": decision.to_dict(),
            "mlflow_run_id": run_id,
            "promotion": None if promotion is None else promotion.to_dict(),
        }
        print(json.dumps(out, indent=2))
        return 0
    print(format_report(report, decision))
    if run_id:
        print(f"logged as MLflow run {run_id}")
    if promotion is not None:
        print(
            f"promoted: {promotion.model_name}@{promotion.alias} -> version {promotion.version} "
            f"(was {promotion.previous or 'none'})"
        )
    elif getattr(args, "promote_when_better", False):
        print("not promoted: the decision is to keep the control")
    return 0


def _interval(estimate: Estimate, metric: str) -> str:
    if not math.isfinite(estimate.value):
        return "-"
    if metric == "revenue":
        if not estimate.defined:
            return f"{estimate.value:,.3f}"
        return f"{estimate.value:,.3f} [{estimate.low:,.3f}, {estimate.high:,.3f}]"
    if not estimate.defined:
        return f"{100 * estimate.value:.2f}%"
    return f"{100 * estimate.value:.2f}% [{100 * estimate.low:.2f}, {100 * estimate.high:.2f}]"


def format_report(report: ExperimentReport, decision: Decision) -> str:
    """The report as a readable table, the comparisons and the decision."""
    lines = [
        f"experiment {report.name} ({report.status}): answers served "
        f"{report.since.isoformat(timespec='seconds')} .. "
        f"{report.until.isoformat(timespec='seconds')}, events credited within "
        f"{report.window.total_seconds() / 3600:g} h of an answer; user-level 95% intervals",
    ]
    header = ("arm", "model", "users", "answers", "clicks", "CTR", "conversion", "revenue/user")
    rows = [
        (
            f"{arm.name}{' *' if arm.name == report.control else ''}",
            arm.model or "-",
            f"{arm.users:,}",
            f"{arm.answers:,}",
            f"{arm.clicks:,}",
            _interval(arm.ctr, "ctr"),
            _interval(arm.conversion, "conversion"),
            _interval(arm.revenue_per_user, "revenue"),
        )
        for arm in report.arms
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        cells = (cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        lines.append("  ".join(cells).rstrip())
    lines.append("(* control)")
    for c in report.comparisons:
        primary = " (primary)" if c.metric == report.config.primary_metric else ""
        diff, lift = c.difference, c.lift
        text = (
            f"{c.arm} - {c.control}, {METRIC_LABELS[c.metric]}{primary}: "
            f"{_signed(diff.value, c.metric)} [{_signed(diff.low, c.metric)}, "
            f"{_signed(diff.high, c.metric)}]"
            if diff.defined
            else f"{c.arm} - {c.control}, {METRIC_LABELS[c.metric]}{primary}: no interval"
        )
        if lift.defined:
            text += (
                f", lift {100 * lift.value:+.1f}% [{100 * lift.low:+.1f}, {100 * lift.high:+.1f}]"
            )
        lines.append(text)
    for arm, count in sorted(report.shadow_answers.items()):
        lines.append(f"shadow arm {arm}: {count:,} lists ranked, not shown (not in the metrics)")
    if report.users_in_several_arms:
        lines.append(
            f"warning: {report.users_in_several_arms:,} users got answers from more than one arm"
        )
    if report.srm_p_value is not None and report.srm_p_value < 0.001:
        lines.append(
            f"warning: users per arm do not match the shares (sample ratio mismatch, "
            f"p = {report.srm_p_value:.2g}): check the assignment before trusting the result"
        )
    verb = "promote" if decision.promote else "keep the control"
    lines.append(f"decision: {verb}: {decision.reason}")
    return "\n".join(lines)
