"""Attribution: which answers earned which clicks, purchases and revenue, by model version.

The attribution model is last touch by id: an event that carries a ``recommendation_id`` is
credited to that recorded answer (``responses``), and so to the model version, method and time
that made it, if it happened within ``window`` after the answer was served (default 24 hours).
Events without an id, with an id the store never recorded (recording off, or pruned), or outside
the window are not credited; the report counts them, so nothing disappears from the totals.

The report is computed in the database (two grouped queries), so it stays cheap on a large store.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import and_, case, func, select

from models.errors import InvalidInputError
from service.events import EVENTS, RESPONSES, EventStore

DEFAULT_WINDOW = timedelta(hours=24)
CLOCK_SKEW = timedelta(minutes=1)
"""An event stamped by the caller's clock up to this long before its answer is still credited."""
CLICKS = ("click", "view", "like", "share", "add_to_cart")
"""Events that count as engaging with an answer (``purchase`` is counted apart)."""


@dataclass
class VersionReport:
    """What one model version's answers (of one method) earned."""

    model_name: str
    model_version: str
    method: str
    answers: int = 0
    """Answers served (recorded responses)."""
    answers_engaged: int = 0
    """Answers with at least one credited click-like event."""
    answers_converted: int = 0
    """Answers with at least one credited purchase."""
    events: dict[str, int] = field(default_factory=dict)
    """Credited events by name."""
    revenue: float = 0.0
    """Sum of the credited purchases' prices."""

    @property
    def engagement_rate(self) -> float:
        """Share of answers that earned a click-like event (click-through rate per answer)."""
        return self.answers_engaged / self.answers if self.answers else 0.0

    @property
    def conversion_rate(self) -> float:
        return self.answers_converted / self.answers if self.answers else 0.0

    @property
    def revenue_per_answer(self) -> float:
        return self.revenue / self.answers if self.answers else 0.0

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(
            engagement_rate=self.engagement_rate,
            conversion_rate=self.conversion_rate,
            revenue_per_answer=self.revenue_per_answer,
        )
        return data


@dataclass
class AttributionReport:
    since: datetime
    until: datetime
    window: timedelta
    versions: list[VersionReport]
    uncredited: dict[str, int]
    """Events in the period not credited to an answer: ``no_id``, ``unknown_id`` (no recorded
    answer), ``outside_window``."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "since": self.since.isoformat(),
            "until": self.until.isoformat(),
            "window_seconds": self.window.total_seconds(),
            "versions": [v.to_dict() for v in self.versions],
            "uncredited": dict(self.uncredited),
        }


def _seconds_between(dialect: str, start: Any, end: Any) -> Any:
    """``end - start`` in seconds, in SQL (SQLite keeps times as text, PostgreSQL as
    ``timestamptz``)."""
    if dialect == "sqlite":
        return (func.julianday(end) - func.julianday(start)) * 86_400.0
    return func.extract("epoch", end - start)


def attribution(
    store: EventStore,
    *,
    since: datetime,
    until: datetime | None = None,
    window: timedelta = DEFAULT_WINDOW,
) -> AttributionReport:
    """Credit the events of ``[since, until)`` (event time) to the answers they name."""
    if since.tzinfo is None or (until is not None and until.tzinfo is None):
        raise InvalidInputError("since and until must be timezone-aware", field="since")
    if window <= timedelta(0):
        raise InvalidInputError("the attribution window must be positive", field="window")
    until = until or datetime.now(UTC)
    if until <= since:
        raise InvalidInputError("until must be later than since", field="until")
    e, r = EVENTS.c, RESPONSES.c
    in_period = and_(e.ts >= since, e.ts < until)
    credited = _seconds_between(store.dialect, r.served_at, e.ts).between(
        -CLOCK_SKEW.total_seconds(), window.total_seconds()
    )
    keys = (r.model_name, r.model_version, r.method)
    is_click = e.event.in_(CLICKS)
    is_purchase = e.event == "purchase"
    per_event = (
        select(*keys, e.event, func.count(), func.coalesce(func.sum(e.price), 0.0))
        .select_from(EVENTS.join(RESPONSES, e.recommendation_id == r.recommendation_id))
        .where(in_period, credited)
        .group_by(*keys, e.event)
    )
    per_answer = (
        select(
            *keys,
            func.count(func.distinct(case((is_click, r.recommendation_id)))),
            func.count(func.distinct(case((is_purchase, r.recommendation_id)))),
        )
        .select_from(EVENTS.join(RESPONSES, e.recommendation_id == r.recommendation_id))
        .where(in_period, credited)
        .group_by(*keys)
    )
    served = (
        select(*keys, func.count()).where(r.served_at >= since, r.served_at < until).group_by(*keys)
    )
    uncredited_q = (
        select(
            func.count(case((e.recommendation_id.is_(None), 1))),
            func.count(case((and_(e.recommendation_id.is_not(None), r.id.is_(None)), 1))),
            func.count(case((and_(r.id.is_not(None), ~credited), 1))),
        )
        .select_from(EVENTS.outerjoin(RESPONSES, e.recommendation_id == r.recommendation_id))
        .where(in_period, e.event != "impression")
    )
    reports: dict[tuple[str, str, str], VersionReport] = {}

    def report(key: tuple[Any, ...]) -> VersionReport:
        name, version, method = (str(part) for part in key)
        found = reports.get((name, version, method))
        if found is None:
            found = reports[(name, version, method)] = VersionReport(name, version, method)
        return found

    with store.engine.connect() as conn:
        for *key, count in conn.execute(served):
            report(tuple(key)).answers = int(count)
        for *key, name, count, revenue in conn.execute(per_event):
            entry = report(tuple(key))
            entry.events[str(name)] = int(count)
            if name == "purchase":
                entry.revenue += float(revenue or 0.0)
        for *key, engaged, converted in conn.execute(per_answer):
            entry = report(tuple(key))
            entry.answers_engaged = int(engaged)
            entry.answers_converted = int(converted)
        no_id, unknown_id, outside = conn.execute(uncredited_q).one()
    return AttributionReport(
        since=since,
        until=until,
        window=window,
        versions=sorted(reports.values(), key=lambda v: (v.model_name, v.model_version, v.method)),
        uncredited={
            "no_id": int(no_id),
            "unknown_id": int(unknown_id),
            "outside_window": int(outside),
        },
    )
