"""Audiences for campaigns (``FindAudience``, ``affinity audience``): the users most likely to
engage with some items or a category, filtered, capped and optionally recorded.

A request goes through these steps:

1. **validate**: exactly one of ``item_ids`` (every id known to the model) and ``category`` (a
   category with at least one available item); stage names from :data:`models.lifecycle.STAGES`;
   well-formed tier names; ``max_users`` 1 to :data:`MAX_USERS`; windows finite and >= 0.
   Every refusal is INVALID_ARGUMENT naming the field.
2. **score** every user the model was trained on against the items (:mod:`models.audience`).
   Users who arrived after the model's training are not scored: they join with the next one.
3. **filter** (the event store, :class:`~service.events.EventStore`):

   - ``stages`` / ``tiers``: the user's row in ``user_segments`` (the last ``affinity
     segments``). A user without a row there (not yet computed) has no stage or tier, so any
     stage or tier filter leaves them out;
   - ``last_seen_within_days``: seen (any event but an impression) within the window by
     ``user_segments.last_seen`` or by an event in the store: a user without a segment row who
     has recent events counts as seen;
   - ``exclude_interacted``: users with the items in the model's data, or with an event on one
     of them in the store since the model's data;
   - erased users (``DeleteUser``) the model still holds never appear;
   - the frequency cap: users already in ``max_audiences_per_user`` recorded audiences created
     within ``cap_window_days`` are left out.

4. **rank** the remaining users, best score first, and keep ``max_users``.
5. **record** (``record``): the audience's definition and its members in one write
   transaction, in which the frequency cap and the erasures are read again, so two audiences
   recorded at once cannot both take a capped user and an erasure cannot be overtaken.
6. **stream** the members best first (``batch_size`` of them per message), stopping when the
   caller goes away. A recorded audience is
   committed before its first member is sent: members a caller saw are counted toward the cap.

The streaming RPC is not wrapped by the unary interceptors (service/interceptors.py), so this
module maps domain errors to status codes itself, with the same table.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np
from sqlalchemy import Connection, func, insert, select, text

from models.audience import category_items, interacted, score_users, top_users
from models.errors import AffinityError, InvalidInputError, NotReadyError
from models.lifecycle import STAGES
from models.ranking import RankingPipeline
from models.vocabulary import MISSING
from protos.affinity.v1 import recommender_pb2 as pb
from service.events import (
    AUDIENCE_MEMBERS,
    AUDIENCES,
    ERASURES,
    EVENTS,
    MAX_ID,
    USER_SEGMENTS,
    EventStore,
)
from service.interceptors import status_for

if TYPE_CHECKING:
    from service.loader import LoadedModel
    from service.servicer import RecommenderServicer

logger = logging.getLogger(__name__)

MAX_USERS = 10_000_000
"""The largest audience a request may ask for."""
MAX_BATCH = 10_000
"""The most members one streamed message may carry (``batch_size``): about 400 KB."""
NOT_SEEN = ("impression",)
"""Events that do not make a user seen (the service showed them something; they did nothing)."""
_TIER = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
_IN_BATCH = 500
"""Values per ``IN (...)`` list: far below SQLite's and PostgreSQL's parameter limits."""
_INSERT_BATCH = 5_000


@dataclass(frozen=True)
class AudienceDefinition:
    """A validated ``FindAudienceRequest``: what an audience is and who may enter it."""

    item_ids: tuple[str, ...]
    category: str
    stages: tuple[str, ...]
    tiers: tuple[str, ...]
    last_seen_within_days: float | None
    exclude_interacted: bool
    max_users: int
    max_audiences_per_user: int
    cap_window_days: float
    record: bool
    name: str

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for key in ("item_ids", "stages", "tiers"):
            out[key] = list(out[key])
        return out


MAX_WINDOW_DAYS = 36_500.0
"""The longest window a request may give (a hundred years: beyond any data)."""


def _window(value: float, field: str) -> float:
    if not (math.isfinite(value) and 0 <= value <= MAX_WINDOW_DAYS):
        raise InvalidInputError(
            f"{field} must be a number of days from 0 to {MAX_WINDOW_DAYS:g}, got {value!r}",
            field=field,
        )
    return float(value)


def parse_request(request: pb.FindAudienceRequest, *, max_ids: int) -> AudienceDefinition:
    """Validate ``request`` (everything that needs no model or store); INVALID_ARGUMENT names
    the field."""
    items = tuple(dict.fromkeys(request.item_ids))  # first occurrence order, once each
    if bool(items) == bool(request.category):
        raise InvalidInputError(
            "give exactly one of item_ids (one or more items) and category",
            field="item_ids" if items else "category",
        )
    if len(request.item_ids) > max_ids:
        raise InvalidInputError(
            f"item_ids holds {len(request.item_ids)} ids; at most {max_ids} are allowed",
            field="item_ids",
        )
    for name, values in (("stages", request.stages), ("tiers", request.tiers)):
        if len(values) > 64:
            raise InvalidInputError(f"{name}: at most 64 names", field=name)
    stages = tuple(dict.fromkeys(request.stages))
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise InvalidInputError(
            f"stages: unknown stage {unknown[0]!r}; expected some of {', '.join(STAGES)}",
            field="stages",
        )
    tiers = tuple(dict.fromkeys(request.tiers))
    bad = [t for t in tiers if not _TIER.match(t)]
    if bad:
        raise InvalidInputError(
            f"tiers: {bad[0]!r} is not a tier name (lower case letters, digits and _, "
            "starting with a letter, at most 64 characters)",
            field="tiers",
        )
    if not 1 <= request.max_users <= MAX_USERS:
        raise InvalidInputError(
            f"max_users must be between 1 and {MAX_USERS:,}, got {request.max_users}",
            field="max_users",
        )
    last_seen = (
        _window(request.last_seen_within_days, "last_seen_within_days")
        if request.HasField("last_seen_within_days")
        else None
    )
    cap = request.max_audiences_per_user
    if cap < 0:
        raise InvalidInputError(
            f"max_audiences_per_user must be >= 0 (0: no cap), got {cap}",
            field="max_audiences_per_user",
        )
    cap_window = _window(request.cap_window_days, "cap_window_days")
    if cap > 0 and cap_window <= 0:
        raise InvalidInputError(
            "cap_window_days must be > 0 when max_audiences_per_user is set",
            field="cap_window_days",
        )
    name = request.name.strip()
    if len(name) > MAX_ID or not name.isprintable():
        raise InvalidInputError(
            f"name must be printable text of at most {MAX_ID} characters", field="name"
        )
    if request.record and not name:
        raise InvalidInputError("name the audience to record it", field="name")
    return AudienceDefinition(
        item_ids=items,
        category=request.category,
        stages=stages,
        tiers=tiers,
        last_seen_within_days=last_seen,
        exclude_interacted=request.exclude_interacted,
        max_users=int(request.max_users),
        max_audiences_per_user=int(cap),
        cap_window_days=cap_window if cap > 0 else 0.0,
        record=request.record,
        name=name,
    )


def batch_size(request: pb.FindAudienceRequest) -> int:
    """Members per streamed message (``batch_size``: 0 and 1 both mean one, unbatched)."""
    if not 0 <= request.batch_size <= MAX_BATCH:
        raise InvalidInputError(
            f"batch_size must be between 0 and {MAX_BATCH:,}, got {request.batch_size}",
            field="batch_size",
        )
    return max(1, int(request.batch_size))


def target_items(pipeline: RankingPipeline, definition: AudienceDefinition) -> np.ndarray:
    """The model indices of the audience's items (a category: its available items)."""
    if definition.category:
        catalog = pipeline.catalog
        return category_items(catalog.category, catalog.available, definition.category)
    _, items = pipeline.vocabularies()
    idx = items.lookup(list(definition.item_ids))
    unknown = [i for i, q in zip(definition.item_ids, idx, strict=True) if q == MISSING]
    if unknown:
        shown = ", ".join(repr(i[:64]) for i in unknown[:5])
        raise InvalidInputError(f"item_ids: unknown item id(s) {shown}", field="item_ids")
    return np.unique(idx)


@dataclass(frozen=True)
class Audience:
    """Who entered an audience, best first."""

    user_ids: list[str]
    scores: np.ndarray
    basis: str
    audience_id: int | None = None
    """The recorded audience's id (``None``: not recorded)."""


def build_audience(
    loaded: LoadedModel,
    store: EventStore,
    definition: AudienceDefinition,
    *,
    now: datetime | None = None,
) -> Audience:
    """Score, filter, rank and (with ``record``) record the audience ``definition`` describes."""
    now = (now or datetime.now(UTC)).astimezone(UTC)
    pipeline = loaded.pipeline
    users, _ = pipeline.vocabularies()
    items = target_items(pipeline, definition)
    seen = _seen(pipeline)
    scored = score_users(pipeline.model, seen, items)
    candidates = np.ones(len(scored.scores), dtype=bool)
    with store.engine.connect() as conn:
        if definition.stages or definition.tiers:
            candidates &= _mask(users, _segment_users(conn, definition))
        if definition.last_seen_within_days is not None:
            since = now - timedelta(days=definition.last_seen_within_days)
            candidates &= _mask(users, _seen_since(conn, since))
        if definition.exclude_interacted:
            candidates &= ~interacted(seen, items)
            cutoff = loaded.meta.data_until
            item_ids = pipeline.vocabularies()[1].decode(items)
            candidates &= ~_mask(users, _interacted_since(conn, item_ids, cutoff))
    if not definition.record:
        with store.engine.connect() as conn:
            candidates &= ~_mask(users, _erased(conn, loaded))
            candidates &= ~_mask(users, _capped(conn, definition, now))
        ids, best = top_users(scored.scores, definition.max_users, candidates)
        return Audience(users.decode(ids), best, scored.basis)
    with store.engine.execution_options(affinity_write=True).begin() as conn:
        if store.dialect == "postgresql":
            # Serializes recorders with each other (the cap) and with DeleteUser's delete of
            # memberships (an erasure committed meanwhile is read below); readers go on.
            conn.execute(text("LOCK TABLE audience_members IN SHARE ROW EXCLUSIVE MODE"))
        candidates &= ~_mask(users, _erased(conn, loaded))
        candidates &= ~_mask(users, _capped(conn, definition, now))
        ids, best = top_users(scored.scores, definition.max_users, candidates)
        user_ids = users.decode(ids)
        audience_id = _record(conn, definition, loaded, scored.basis, user_ids, best, now)
    logger.info(
        "recorded audience %r: %d users",
        definition.name,
        len(user_ids),
        extra={"audience_id": audience_id, "users": len(user_ids)},
    )
    return Audience(user_ids, best, scored.basis, audience_id)


def find_audience(
    servicer: RecommenderServicer, request: pb.FindAudienceRequest, context: grpc.ServicerContext
) -> Iterator[pb.AudienceMember]:
    """The users most likely to engage with the request's items or category, best first."""
    try:
        definition = parse_request(request, max_ids=servicer.max_ids)
        batch = batch_size(request)
        store = servicer.store
        if store is None:
            raise NotReadyError("this server has no event store: audiences are filtered there")
        audience = build_audience(servicer.holder.get(), store, definition)
    except AffinityError as exc:
        code = status_for(exc)
        if code is None:
            logger.error("unexpected %s in FindAudience", type(exc).__name__, exc_info=True)
            context.abort(grpc.StatusCode.INTERNAL, "internal error")
        context.abort(code, str(exc))
    except Exception:
        logger.error("unhandled error in FindAudience", exc_info=True)
        context.abort(grpc.StatusCode.INTERNAL, "internal error")
    scores = audience.scores.tolist()
    users = audience.user_ids
    if batch <= 1:
        for rank, (user_id, score) in enumerate(zip(users, scores, strict=True), 1):
            if rank % 1024 == 0 and not context.is_active():
                return  # the caller went away: stop encoding members nobody reads
            yield pb.AudienceMember(user_id=user_id, score=score, rank=rank)
        return
    for start in range(0, len(users), batch):
        if start and not context.is_active():
            return
        stop = min(start + batch, len(users))
        yield pb.AudienceMember(
            batch=[
                pb.AudienceMember(user_id=users[i], score=scores[i], rank=i + 1)
                for i in range(start, stop)
            ]
        )


# --- the store ------------------------------------------------------------------------------


def _seen(pipeline: RankingPipeline) -> Any:
    """The model's users x items matrix of what each user already has (the pipeline's)."""
    bundle = pipeline.bundle
    return bundle.seen if bundle is not None else pipeline._seen


def _mask(users: Any, user_ids: Iterable[str]) -> np.ndarray:
    """A mask over the model's users: True for those among ``user_ids``."""
    mask = np.zeros(len(users), dtype=bool)
    ids = list(user_ids)
    if ids:
        idx = users.lookup(ids)
        mask[idx[idx != MISSING]] = True
    return mask


def _segment_users(conn: Connection, definition: AudienceDefinition) -> list[str]:
    stmt = select(USER_SEGMENTS.c.user_id)
    if definition.stages:
        stmt = stmt.where(USER_SEGMENTS.c.stage.in_(definition.stages))
    if definition.tiers:
        stmt = stmt.where(USER_SEGMENTS.c.tier.in_(definition.tiers))
    return list(conn.execute(stmt).scalars())


def _seen_since(conn: Connection, since: datetime) -> set[str]:
    found = set(
        conn.execute(
            select(USER_SEGMENTS.c.user_id).where(USER_SEGMENTS.c.last_seen >= since)
        ).scalars()
    )
    found.update(
        conn.execute(
            select(EVENTS.c.user_id)
            .where((EVENTS.c.ts >= since) & EVENTS.c.event.not_in(NOT_SEEN))
            .distinct()
        ).scalars()
    )
    return found


def _interacted_since(
    conn: Connection, item_ids: Sequence[str], cutoff: datetime | None
) -> set[str]:
    """Users with an event (not an impression) on one of ``item_ids`` after ``cutoff``."""
    found: set[str] = set()
    for start in range(0, len(item_ids), _IN_BATCH):
        cond = EVENTS.c.item_id.in_(item_ids[start : start + _IN_BATCH]) & EVENTS.c.event.not_in(
            NOT_SEEN
        )
        if cutoff is not None:
            cond = cond & (EVENTS.c.ts > cutoff)
        found.update(conn.execute(select(EVENTS.c.user_id).where(cond).distinct()).scalars())
    return found


def _erased(conn: Connection, loaded: LoadedModel) -> list[str]:
    """Erased users the serving model may still hold: erased after (or without knowing when)
    it was trained. A user erased before the training came back later: their row is new."""
    stmt = select(ERASURES.c.user_id)
    trained_at = loaded.meta.trained_at
    if trained_at is not None:
        stmt = stmt.where(ERASURES.c.erased_at >= trained_at)
    return list(conn.execute(stmt).scalars())


def _capped(conn: Connection, definition: AudienceDefinition, now: datetime) -> list[str]:
    """Users already in ``max_audiences_per_user`` audiences of the cap's window."""
    if definition.max_audiences_per_user <= 0:
        return []
    since = now - timedelta(days=definition.cap_window_days)
    stmt = (
        select(AUDIENCE_MEMBERS.c.user_id)
        .where(AUDIENCE_MEMBERS.c.created_at >= since)
        .group_by(AUDIENCE_MEMBERS.c.user_id)
        .having(func.count() >= definition.max_audiences_per_user)
    )
    return list(conn.execute(stmt).scalars())


def _record(
    conn: Connection,
    definition: AudienceDefinition,
    loaded: LoadedModel,
    basis: str,
    user_ids: list[str],
    scores: np.ndarray,
    now: datetime,
) -> int:
    meta = loaded.meta
    stored = {
        **definition.to_dict(),
        "model": {"name": meta.name, "version": meta.version, "algorithm": meta.algorithm},
        "basis": basis,
    }
    result = conn.execute(
        insert(AUDIENCES).values(
            name=definition.name, definition=stored, users=len(user_ids), created_at=now
        )
    )
    key = result.inserted_primary_key
    assert key is not None
    audience_id = int(key[0])
    values = scores.tolist()
    for start in range(0, len(user_ids), _INSERT_BATCH):
        rows = [
            {
                "audience_id": audience_id,
                "user_id": user_ids[i],
                "score": values[i],
                "rank": i + 1,
                "created_at": now,
            }
            for i in range(start, min(start + _INSERT_BATCH, len(user_ids)))
        ]
        conn.execute(insert(AUDIENCE_MEMBERS), rows)
    return audience_id
