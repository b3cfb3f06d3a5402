"""Retention of the event store: remove what is older than a cutoff, on command.

``affinity events prune --older-than 90d`` removes the events that happened, and the recorded
responses served, before now minus 90 days (:meth:`EventStore.prune`, one transaction);
``--dry-run`` counts them and removes nothing. Retention is a command an operator or a scheduler
(cron, a Kubernetes CronJob) runs, not a background job inside the server: what goes, and when,
is always in the log of a command.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

from sqlalchemy import func, select

from models.errors import InvalidInputError
from service.events import EVENTS, RESPONSES, EventStore, Pruned
from service.export import parse_when

_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
_DURATION = re.compile(r"([+-]?\d+(?:\.\d+)?)\s*([smhdw])", re.IGNORECASE)


def cutoff_of(older_than: str | None, *, now: datetime | None = None) -> datetime:
    """The cutoff ``--older-than`` names: now minus a duration (``90d``, ``12h``, ``30m``,
    ``45s``, ``2w``), or an ISO 8601 date or date-time (naive meaning UTC) in the past.

    Raises :class:`InvalidInputError` with a one-line reason for a missing, zero or negative
    duration, a date in the future, or text that is neither.
    """
    now = (now or datetime.now(UTC)).astimezone(UTC)
    text = (older_than or "").strip()
    if not text:
        raise InvalidInputError(
            "--older-than is required: a duration such as 90d, 12h or 30m, or an ISO date",
            field="older_than",
        )
    match = _DURATION.fullmatch(text)
    if match:
        amount = float(match.group(1))
        if amount <= 0:
            raise InvalidInputError(
                f"--older-than must be a positive duration, got {text!r}", field="older_than"
            )
        try:
            return now - timedelta(**{_UNITS[match.group(2).lower()]: amount})
        except OverflowError:
            raise InvalidInputError(
                f"--older-than {text!r} reaches before year 1", field="older_than"
            ) from None
    try:
        cutoff = parse_when(text, name="older_than")
    except InvalidInputError:
        raise InvalidInputError(
            f"--older-than: expected a duration such as 90d, 12h, 30m, 45s or 2w, or an ISO "
            f"date such as 2025-01-31; got {text!r}",
            field="older_than",
        ) from None
    if cutoff >= now:
        raise InvalidInputError(
            f"--older-than {cutoff.isoformat()} is not in the past: it would remove everything",
            field="older_than",
        )
    return cutoff


def prune(store: EventStore, cutoff: datetime, *, dry_run: bool = False) -> Pruned:
    """Remove (or with ``dry_run`` count) the events before ``cutoff`` and the responses
    served before it."""
    if not dry_run:
        return store.prune(cutoff)
    return prunable(store, cutoff)


def prunable(store: EventStore, cutoff: datetime) -> Pruned:
    """How many events and responses :meth:`EventStore.prune` would remove at ``cutoff``."""
    # The store has no counting query for this yet; it reads its own tables, the same
    # conditions as EventStore.prune.
    events = select(func.count()).select_from(EVENTS).where(EVENTS.c.ts < cutoff)
    responses = select(func.count()).select_from(RESPONSES).where(RESPONSES.c.served_at < cutoff)
    with store.engine.connect() as conn:
        return Pruned(
            int(conn.execute(events).scalar_one()), int(conn.execute(responses).scalar_one())
        )
