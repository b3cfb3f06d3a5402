"""The ``affinity.v1.Recommender`` servicer: validate, rank through the pipeline, answer.

It raises domain errors (:mod:`models.errors`) and leaves their mapping to status codes to
:class:`service.interceptors.ErrorInterceptor`.
"""

from __future__ import annotations

import itertools
import logging
import time
import uuid
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from functools import lru_cache

import grpc
from prometheus_client import Counter

from models.artifact import ITEM_TYPES
from models.errors import InvalidInputError, NotReadyError
from models.ranking import ItemFilter, Recommendations, Source
from models.rules import Rules
from protos.affinity.v1 import recommender_pb2 as pb
from protos.affinity.v1 import recommender_pb2_grpc as pb_grpc
from service import telemetry
from service.audiences import find_audience
from service.events import (
    MAX_EVENT_ID,
    Activity,
    EventStore,
    GroupCommit,
    Outcome,
    RawEvent,
    Status,
    count_outcomes,
)
from service.experiment_router import ExperimentRouter, Routing
from service.experiments import (
    Experiment,
    ExperimentBook,
    parse_config,
)
from service.interceptors import SERVICE, DeadlineExceededError
from service.live import LiveActivity, UserActivity
from service.loader import LoadedModel, ModelHolder
from service.profiles import user_profile
from service.recorder import ResponseRecorder
from service.rules import RuleResolver, with_rotation
from service.stages import Placement, StageView, stage_counter
from service.wire import serialize

logger = logging.getLogger(__name__)

NO_FILTER = ItemFilter()

_ID_PREFIX = uuid.uuid4().hex[:16]
_ID_COUNTER = itertools.count()


SHADOW = "shadow"
"""The recorded ``method`` of a shadow arm's list (ranked, recorded, never shown)."""


def new_recommendation_id() -> str:
    """A 32-hex-digit id unique to this response: a random per-process prefix and a counter.

    As unique as a fresh ``uuid4`` for attributing feedback, without a system call per request
    (worker processes import this module afresh, so each draws its own prefix).
    """
    return f"{_ID_PREFIX}{next(_ID_COUNTER):016x}"


@lru_cache(maxsize=64)
def _source_counter(method: str, source: str) -> Counter:
    """The labelled child of ``RESPONSES_BY_SOURCE``, looked up once per (method, source)."""
    return telemetry.RESPONSES_BY_SOURCE.labels(method=method, source=source)


EVENT_STATUSES = {
    Status.ACCEPTED: pb.EVENT_STATUS_ACCEPTED,
    Status.DUPLICATE: pb.EVENT_STATUS_DUPLICATE,
    Status.REJECTED: pb.EVENT_STATUS_REJECTED,
}
# The range of google.protobuf.Timestamp: 0001-01-01T00:00:00Z to 9999-12-31T23:59:59Z.
_MIN_SECONDS, _MAX_SECONDS = -62_135_596_800, 253_402_300_799
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class _Unconvertible(Exception):
    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


def event_from_proto(message: pb.Event) -> RawEvent:
    """The store's :class:`RawEvent` for a request's event, or ``_Unconvertible`` (a timestamp no
    datetime can hold); everything else is the store's to check."""
    timestamp = None
    if message.HasField("timestamp"):
        seconds, nanos = message.timestamp.seconds, message.timestamp.nanos
        if not (_MIN_SECONDS <= seconds <= _MAX_SECONDS and 0 <= nanos < 1_000_000_000):
            raise _Unconvertible(
                "timestamp", f"not a valid time (seconds={seconds}, nanos={nanos})"
            )
        # What Timestamp.ToDatetime(tzinfo=UTC) gives (microseconds, nanoseconds truncated).
        timestamp = _EPOCH + timedelta(seconds=seconds, microseconds=nanos // 1000)
    shown = message.shown_item_ids
    return RawEvent(
        message.event_id,
        message.user_id,
        message.item_id,
        message.event,
        timestamp,
        message.value if message.HasField("value") else 1.0,
        message.price if message.HasField("price") else None,
        message.recommendation_id or None,
        tuple(shown) if shown else (),
    )


_OUTCOME_STATUS = {status: int(value) for status, value in EVENT_STATUSES.items()}


def outcomes_to_proto(outcomes: Sequence[Outcome]) -> pb.LogEventsResponse:
    """The response for ``outcomes``; only a rejection has a reason and a field to send."""
    response = pb.LogEventsResponse()
    add = response.outcomes.add
    status_of = _OUTCOME_STATUS
    accepted = duplicates = 0
    for o in outcomes:
        status = o.status
        if status is Status.ACCEPTED:
            accepted += 1
            add(event_id=o.event_id, status=status_of[status])
        elif status is Status.DUPLICATE:
            duplicates += 1
            add(event_id=o.event_id, status=status_of[status])
        else:
            add(
                event_id=o.event_id,
                status=status_of[status],
                reason=o.reason or "",
                field=o.field or "",
            )
    response.accepted = accepted
    response.duplicates = duplicates
    response.rejected = len(outcomes) - accepted - duplicates
    return response


SOURCES = {
    Source.PERSONALIZED: pb.SOURCE_PERSONALIZED,
    Source.FOLD_IN: pb.SOURCE_FOLD_IN,
    Source.POPULAR: pb.SOURCE_POPULAR,
}


class RecommenderServicer(pb_grpc.RecommenderServicer):
    """Answers the ranking RPCs from whatever model ``holder`` serves when each request starts,
    and ``LogEvents`` into ``events`` (a group-committing event store; ``None``: UNAVAILABLE).

    With ``live``, a user's events since the model's training data personalize their lists and
    their dislikes and erasure apply at once (and, when it keeps them, the items each answer
    showed feed the rotation rule); with ``recorder``, every answer is recorded for attribution,
    with its items' reasons and its exploration's seed and day; ``DeleteUser`` erases a user from
    ``events``' store. ``rules`` resolves each list's ranking rules from the server's defaults and
    the request's ``RankingRules`` (default: none). ``experiments`` routes each user of a running
    experiment to their arm's model (service/experiment_router.py). ``stages`` gives each
    user's list the strategy of their lifecycle stage and names both in the response
    (service/stages.py; None: off).
    """

    def __init__(
        self,
        holder: ModelHolder,
        *,
        max_k: int = 1000,
        max_ids: int = 1000,
        events: GroupCommit | None = None,
        max_events: int = 1000,
        live: LiveActivity | None = None,
        recorder: ResponseRecorder | None = None,
        erasure_sweep_seconds: float = 1.0,
        rules: RuleResolver | None = None,
        experiments: ExperimentRouter | None = None,
        stages: StageView | None = None,
    ) -> None:
        self.holder = holder
        self.experiments = experiments
        self.stages = stages
        self.rules = rules if rules is not None else RuleResolver(max_ids=max_ids)
        self.max_k = max_k
        self.max_ids = max_ids
        self.events = events
        self.max_events = max_events
        self.live = live
        self.recorder = recorder
        self.erasure_sweep_seconds = erasure_sweep_seconds

    @property
    def store(self) -> EventStore | None:
        return self.events.store if self.events is not None else None

    # ------------------------------------------------------------ validation
    def _check_k(self, k: int) -> None:
        if k <= 0 or k > self.max_k:
            raise InvalidInputError(f"k must be between 1 and {self.max_k}, got {k}", field="k")

    def _check_ids(self, **fields: Sequence[str]) -> None:
        for name, values in fields.items():
            if len(values) > self.max_ids:
                raise InvalidInputError(
                    f"{name} holds {len(values)} ids; at most {self.max_ids} are allowed",
                    field=name,
                )

    def _filter(self, flt: pb.ItemFilter, loaded: LoadedModel) -> ItemFilter:
        if not flt.item_types and not flt.categories:
            return NO_FILTER  # the common case, checked without building sets per request
        self._check_ids(
            **{"filter.item_types": flt.item_types, "filter.categories": flt.categories}
        )
        known = set(ITEM_TYPES) | set(loaded.pipeline.item_types)
        for item_type in flt.item_types:
            if item_type not in known:
                raise InvalidInputError(
                    f"filter.item_types holds unknown item type {item_type!r}; "
                    f"expected one of {', '.join(sorted(known))}",
                    field="filter.item_types",
                )
        return ItemFilter.of(list(flt.item_types), list(flt.categories))

    @staticmethod
    def _start(context: grpc.ServicerContext) -> None:
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            raise DeadlineExceededError("deadline passed before the request could be handled")

    def _user_rules(self, request: pb.RecommendRequest, loaded: LoadedModel) -> Rules | None:
        """The ranking rules of a user's list: the request's over the server's defaults, with
        the rotation of the items recently shown to the user (from the live view)."""
        given = request.HasField("rules")
        if not given and self.rules.off:
            return None  # the common case: one attribute check
        pipeline = loaded.pipeline
        plan = self.rules.plan(
            request.rules if given else None,
            recommend=True,
            item_types=pipeline.item_types if given else (),
        )
        rules = plan.rules
        if plan.rotation is not None:
            live = self.live
            shown = live.shown(request.user_id) if live is not None else None
            if shown is not None:
                rules = with_rotation(plan, pipeline.vocabularies()[1], shown)
        if rules is not None and rules.exploration is not None:
            rules = rules.settled()  # the day the draw uses, read once and recorded
        return rules

    def _list_rules(
        self, request: pb.SimilarItemsRequest | pb.PopularRequest, loaded: LoadedModel
    ) -> Rules | None:
        """The ranking rules of an item or popular list (no exploration, no rotation)."""
        given = request.HasField("rules")
        if not given and self.rules.off:
            return None
        return self.rules.plan(
            request.rules if given else None,
            recommend=False,
            item_types=loaded.pipeline.item_types if given else (),
        ).rules

    # ------------------------------------------------------------ responses
    def _record(
        self,
        method: str,
        loaded: LoadedModel,
        recs: Recommendations,
        rec_id: str,
        user_id: str | None = None,
        rules: Rules | None = None,
        experiment: str | None = None,
        arm: str | None = None,
        placed: Placement | None = None,
    ) -> None:
        _source_counter(method, str(recs.source)).inc()
        if placed is not None:
            stage_counter(placed.stage, placed.strategy_name).inc()
        recorder = self.recorder
        live = self.live
        keeps_shown = user_id is not None and live is not None and live.keeps_shown
        if recorder is not None or keeps_shown:
            at = time.time()
            if keeps_shown:
                assert live is not None and user_id is not None
                live.showed(user_id, recs.item_ids, at)
            if recorder is not None:
                _record_answer(
                    recorder, rec_id, method, loaded, recs, user_id, rules, experiment, arm, at
                )
        if not logger.isEnabledFor(logging.INFO):
            return
        logger.info(
            "%s answered %d items (%s)",
            method,
            len(recs),
            recs.source,
            extra={
                "method": method,
                "recommendation_id": rec_id,
                "source": str(recs.source),
                "items": len(recs),
                "model_version": loaded.meta.version,
                # The recorded answer has no columns for these: the log line keeps them.
                "stage": placed.stage if placed is not None else "",
                "strategy": placed.strategy_name if placed is not None else "",
            },
        )

    # ----------------------------------------------------------------- RPCs
    def Recommend(self, request: pb.RecommendRequest, context: grpc.ServicerContext) -> bytes:
        """A serialized ``RecommendResponse`` (see :mod:`service.wire`)."""
        self._start(context)
        self._check_k(request.k)
        self._check_ids(
            recent_item_ids=request.recent_item_ids, exclude_item_ids=request.exclude_item_ids
        )
        router = self.experiments
        routing = router.routing if router is not None else None
        view = self.stages
        if routing is None and view is None:  # the common case: two attribute reads
            loaded = self.holder.get()
            recs, rules = self._user_list(request, loaded)
            rec_id = new_recommendation_id()
            self._record("Recommend", loaded, recs, rec_id, request.user_id, rules)
            return loaded.encoder.recommend(recs, SOURCES[recs.source], rec_id)
        arm = None
        if routing is None:
            loaded = self.holder.get()
        else:
            arm = routing.arm_for(request.user_id)
            loaded = routing.serving(arm, self.holder)
        placed = None
        if view is not None:
            placed = view.place(request.user_id, loaded.pipeline.vocabularies()[0])
        recs, rules = self._user_list(request, loaded, placed)
        rec_id = new_recommendation_id()
        self._record(
            "Recommend",
            loaded,
            recs,
            rec_id,
            request.user_id,
            rules,
            routing.name if routing is not None else None,
            arm.name if arm is not None else None,
            placed,
        )
        if routing is not None and routing.shadows:
            self._shadow(routing, request)
        return loaded.encoder.recommend(
            recs,
            SOURCES[recs.source],
            rec_id,
            arm.wire if arm is not None else b"",
            placed.wire if placed is not None else b"",
        )

    def _shadow(self, routing: Routing, request: pb.RecommendRequest) -> None:
        """Rank ``request`` with each shadow arm's model and record the list (never shown, so
        it neither counts as an impression nor feeds rotation), with the strategy of the user's
        stage as the answer had it. A shadow failure is logged and counted, never the caller's
        error."""
        recorder = self.recorder
        view = self.stages
        for arm in routing.shadows:
            loaded = arm.holder.current
            if loaded is None:
                arm.fell_back(routing.name)
                continue
            try:
                placed = None
                if view is not None:
                    placed = view.place(request.user_id, loaded.pipeline.vocabularies()[0])
                recs, rules = self._user_list(request, loaded, placed)
            except Exception as exc:
                arm.fell_back(routing.name)
                logger.warning("shadow arm %s could not rank: %s", arm.name, exc)
                continue
            if recorder is None:
                continue
            _record_answer(
                recorder,
                new_recommendation_id(),
                SHADOW,
                loaded,
                recs,
                request.user_id,
                rules,
                routing.name,
                arm.name,
            )

    def _user_list(
        self, request: pb.RecommendRequest, loaded: LoadedModel, placed: Placement | None = None
    ) -> tuple[Recommendations, Rules | None]:
        """``request``'s list from ``loaded``'s model, with the user's live events and rules
        (and the strategy of their lifecycle stage, ``placed``)."""
        item_filter = self._filter(request.filter, loaded)
        recent = list(request.recent_item_ids)
        disliked: list[str] = []
        as_unknown = False
        if self.live is not None:
            activity = self.live.get(request.user_id)
            if activity is not None:
                as_unknown = _erased_for(activity, loaded)
                recent += _fresh_items(activity, loaded, as_unknown)
                disliked = activity.disliked_items()
        rules = self._user_rules(request, loaded)
        recs = loaded.pipeline.recommend(
            request.user_id,
            request.k,
            recent_item_ids=recent,
            exclude_item_ids=list(request.exclude_item_ids),
            item_filter=item_filter,
            include_seen=request.include_seen,
            disliked_item_ids=disliked,
            as_unknown=as_unknown,
            rules=rules,
            strategy=placed.strategy if placed is not None else None,
        )
        return recs, rules

    def SimilarItems(self, request: pb.SimilarItemsRequest, context: grpc.ServicerContext) -> bytes:
        """A serialized ``SimilarItemsResponse``."""
        self._start(context)
        self._check_k(request.k)
        if not request.item_ids:
            raise InvalidInputError("item_ids must hold at least one item id", field="item_ids")
        self._check_ids(item_ids=request.item_ids, exclude_item_ids=request.exclude_item_ids)
        loaded = self.holder.get()
        item_filter = self._filter(request.filter, loaded)
        recs = loaded.pipeline.similar_items(
            list(request.item_ids),
            request.k,
            exclude_item_ids=list(request.exclude_item_ids),
            item_filter=item_filter,
            rules=self._list_rules(request, loaded),
        )
        rec_id = new_recommendation_id()
        self._record("SimilarItems", loaded, recs, rec_id)
        return loaded.encoder.listing(recs, rec_id)

    def Popular(self, request: pb.PopularRequest, context: grpc.ServicerContext) -> bytes:
        """A serialized ``PopularResponse``."""
        self._start(context)
        self._check_k(request.k)
        self._check_ids(exclude_item_ids=request.exclude_item_ids)
        loaded = self.holder.get()
        item_filter = self._filter(request.filter, loaded)
        recs = loaded.pipeline.popular(
            request.k,
            item_filter=item_filter,
            exclude_item_ids=list(request.exclude_item_ids),
            trending=request.trending,
            rules=self._list_rules(request, loaded),
        )
        rec_id = new_recommendation_id()
        self._record("Popular", loaded, recs, rec_id)
        return loaded.encoder.listing(recs, rec_id)

    def GetModelInfo(
        self, request: pb.GetModelInfoRequest, context: grpc.ServicerContext
    ) -> pb.ModelInfo:
        self._start(context)
        loaded = self.holder.get()
        meta, pipeline = loaded.meta, loaded.pipeline
        info = pb.ModelInfo(
            model=loaded.meta.ref,
            num_users=pipeline.n_users,
            num_items=pipeline.n_items,
            source_uri=meta.source_uri,
            from_cache=meta.from_cache,
            dataset_fingerprint=meta.dataset_fingerprint,
        )
        info.loaded_at.FromDatetime(meta.loaded_at)
        return info

    def LogEvents(
        self, request: pb.LogEventsRequest, context: grpc.ServicerContext
    ) -> pb.LogEventsResponse:
        """One outcome per event, in order; OK means the accepted ones are committed."""
        self._start(context)
        n = len(request.events)
        if n == 0 or n > self.max_events:
            raise InvalidInputError(
                f"events must hold 1 to {self.max_events} events, got {n}; "
                "split a longer batch into several requests",
                field="events",
            )
        if self.events is None:
            raise NotReadyError("this server has no event store")
        messages = request.events
        try:
            convertible = [event_from_proto(message) for message in messages]
        except _Unconvertible:
            return self._log_some(messages)
        stored: list[Activity | None] | None = [] if self.live is not None else None
        outcomes = self.events.append(convertible, stored=stored)
        if stored:
            self._apply_live(stored)
        return outcomes_to_proto(outcomes)

    def _log_some(self, messages: Sequence[pb.Event]) -> pb.LogEventsResponse:
        """``LogEvents`` for a batch where some events cannot even be converted: those are
        rejected here, the others stored, the outcomes in request order."""
        assert self.events is not None
        outcomes: list[Outcome | None] = [None] * len(messages)
        convertible: list[RawEvent] = []
        positions: list[int] = []
        for i, message in enumerate(messages):
            try:
                convertible.append(event_from_proto(message))
            except _Unconvertible as exc:
                event_id = message.event_id[:MAX_EVENT_ID]
                outcomes[i] = Outcome(event_id, Status.REJECTED, str(exc), exc.field)
                continue
            positions.append(i)
        unconvertible = [o for o in outcomes if o is not None]
        if convertible:
            stored: list[Activity | None] | None = [] if self.live is not None else None
            for i, outcome in zip(
                positions, self.events.append(convertible, stored=stored), strict=True
            ):
                outcomes[i] = outcome
            if stored:
                self._apply_live(stored)
        count_outcomes(unconvertible)
        return outcomes_to_proto([o for o in outcomes if o is not None])

    def _apply_live(self, stored: list[Activity | None]) -> None:
        """This worker's acknowledged events, as stored, into its live view at once (the others
        read them from the store within their poll interval)."""
        assert self.live is not None
        self.live.applied([row for row in stored if row is not None])

    def DeleteUser(
        self, request: pb.DeleteUserRequest, context: grpc.ServicerContext
    ) -> pb.DeleteUserResponse:
        """Erase a user: their events and recorded responses, in the store and in every
        worker's live view (this one at once, the others within their poll interval)."""
        self._start(context)
        store = self.store
        if store is None:
            raise NotReadyError("this server has no event store")
        if self.recorder is not None:
            self.recorder.flush()  # this worker's answers to the user go with the rest
        erasure = store.delete_user(request.user_id)
        if self.live is not None:
            self.live.forget(erasure.user_id, erasure.erased_at)
        responses = erasure.responses
        if self.erasure_sweep_seconds > 0:
            # Other workers may be recording answers they gave the user just before the erasure
            # (their recorders write every fraction of a second): sweep once more after that.
            time.sleep(self.erasure_sweep_seconds)
            responses += store.delete_responses(erasure.user_id, erasure.erased_at)
        telemetry.ERASURES.inc()
        response = pb.DeleteUserResponse(events_deleted=erasure.events, responses_deleted=responses)
        response.erased_at.FromDatetime(erasure.erased_at)
        return response

    # ---------------------------------------------------------- experiments
    def _book(self) -> ExperimentBook:
        store = self.store
        if store is None:
            raise NotReadyError("this server has no event store: experiments live there")
        return ExperimentBook(store)

    def _experiment_message(self, experiment: Experiment) -> pb.Experiment:
        config = experiment.config
        message = pb.Experiment(
            spec=pb.ExperimentSpec(
                name=config.name,
                arms=[
                    pb.ExperimentArm(name=a.name, model=a.model, share=a.share, shadow=a.shadow)
                    for a in config.arms
                ],
                control=config.control,
                salt=config.salt,
                primary_metric=config.primary_metric,
                min_users=config.min_users,
            ),
            status=experiment.status,
            revision=experiment.revision,
            allocation=[f"{arm}:{start}-{end}" for start, end, arm in config.allocation],
        )
        message.created_at.FromDatetime(experiment.created_at)
        message.updated_at.FromDatetime(experiment.updated_at)
        router = self.experiments
        routing = router.routing if router is not None else None
        if routing is not None and routing.name == experiment.name:
            for arm in (*routing.live, *routing.shadows):
                loaded = arm.holder.current
                state = message.arms.add(
                    arm=arm.name,
                    ready=loaded is not None,
                    error=arm.error,
                    fallbacks=arm.fallbacks,
                )
                if loaded is not None:
                    state.model.CopyFrom(loaded.meta.ref)
        return message

    def StartExperiment(
        self, request: pb.StartExperimentRequest, context: grpc.ServicerContext
    ) -> pb.Experiment:
        """Validate, store and run an experiment; this worker follows it at once, the others
        within their poll interval."""
        self._start(context)
        spec = request.spec
        data: dict[str, object] = {
            "name": spec.name,
            "arms": [
                {"name": a.name, "model": a.model, "share": a.share, "shadow": a.shadow}
                for a in spec.arms
            ],
        }
        for key in ("control", "salt", "primary_metric"):
            if getattr(spec, key):
                data[key] = getattr(spec, key)
        if spec.min_users:
            data["min_users"] = spec.min_users
        config = parse_config(data)
        if self.experiments is not None:
            self.experiments.check_models(config)
        experiment = self._book().start(config)
        self._follow()
        return self._experiment_message(experiment)

    def UpdateExperiment(
        self, request: pb.UpdateExperimentRequest, context: grpc.ServicerContext
    ) -> pb.Experiment:
        self._start(context)
        experiment = self._book().set_shares(request.name, dict(request.shares))
        self._follow()
        return self._experiment_message(experiment)

    def StopExperiment(
        self, request: pb.StopExperimentRequest, context: grpc.ServicerContext
    ) -> pb.Experiment:
        self._start(context)
        experiment = self._book().stop(request.name)
        self._follow()
        return self._experiment_message(experiment)

    def GetExperiment(
        self, request: pb.GetExperimentRequest, context: grpc.ServicerContext
    ) -> pb.Experiment:
        self._start(context)
        return self._experiment_message(self._book().get(request.name))

    def ListExperiments(
        self, request: pb.ListExperimentsRequest, context: grpc.ServicerContext
    ) -> pb.ListExperimentsResponse:
        self._start(context)
        return pb.ListExperimentsResponse(
            experiments=[self._experiment_message(e) for e in self._book().list()]
        )

    # --------------------------------------------------- user operations
    def GetUserProfile(
        self, request: pb.GetUserProfileRequest, context: grpc.ServicerContext
    ) -> pb.UserProfile:
        """A user's profile (service/profiles.py)."""
        self._start(context)
        return user_profile(self, request.user_id)

    def FindAudience(
        self, request: pb.FindAudienceRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.AudienceMember]:
        """The users most likely to engage with some items or a category (service/audiences.py),
        streamed best first."""
        self._start(context)
        yield from find_audience(self, request, context)

    def _follow(self) -> None:
        """Have this worker pick up a changed experiment now (the others poll for it)."""
        if self.experiments is not None:
            self.experiments.wake()


def _record_answer(
    recorder: ResponseRecorder,
    rec_id: str,
    method: str,
    loaded: LoadedModel,
    recs: Recommendations,
    user_id: str | None,
    rules: Rules | None,
    experiment: str | None,
    arm: str | None,
    at: float | None = None,
) -> None:
    """Queue one answer on the recorder, with its reasons, exploration and experiment arm."""
    meta = loaded.meta
    reasons = recs.reasons
    exploration = rules.exploration if rules is not None else None
    recorder.record(
        rec_id,
        method,
        user_id,
        recs.item_ids,
        recs.source.value,
        meta.name,
        meta.version,
        # None when every item is the model's: the column stays NULL.
        reasons=reasons.tolist() if reasons is not None and reasons.any() else None,
        exploration_seed=exploration.seed if exploration is not None else None,
        exploration_day=exploration.day if exploration is not None else None,
        experiment=experiment,
        arm=arm,
        at=at,
    )


def _erased_for(activity: UserActivity, loaded: LoadedModel) -> bool:
    """Whether the serving model still holds an erased user (trained before the erasure)."""
    erased_at = activity.erased_at
    if erased_at is None:
        return False
    trained_at = loaded.meta.trained_at
    if trained_at is None or trained_at <= erased_at:
        telemetry.LIVE_APPLIED.labels("erased").inc()
        return True
    return False


def _fresh_items(activity: UserActivity, loaded: LoadedModel, as_unknown: bool) -> list[str]:
    """The items of the user's events the model was not fitted on: after its data, or every
    kept event of an erased user the model still holds (those came after the erasure)."""
    cutoff = _EPOCH if as_unknown else (loaded.meta.data_until or _EPOCH)
    items = activity.items_after(cutoff)
    if items:
        telemetry.LIVE_APPLIED.labels("fold_in").inc()
    if activity.dislikes:
        telemetry.LIVE_APPLIED.labels("dislike").inc()
    return items


def add_to_server(servicer: RecommenderServicer, server: grpc.Server) -> None:
    """Register ``servicer``'s methods on ``server``, as the generated
    ``add_RecommenderServicer_to_server`` does, except that the listing methods' responses,
    which the servicer returns already encoded (:mod:`service.wire`), are sent as they are."""
    handlers = {
        "Recommend": grpc.unary_unary_rpc_method_handler(
            servicer.Recommend,
            request_deserializer=pb.RecommendRequest.FromString,
            response_serializer=serialize,
        ),
        "SimilarItems": grpc.unary_unary_rpc_method_handler(
            servicer.SimilarItems,
            request_deserializer=pb.SimilarItemsRequest.FromString,
            response_serializer=serialize,
        ),
        "Popular": grpc.unary_unary_rpc_method_handler(
            servicer.Popular,
            request_deserializer=pb.PopularRequest.FromString,
            response_serializer=serialize,
        ),
    }
    handlers["GetModelInfo"] = grpc.unary_unary_rpc_method_handler(
        servicer.GetModelInfo,
        request_deserializer=pb.GetModelInfoRequest.FromString,
        response_serializer=pb.ModelInfo.SerializeToString,
    )
    handlers["LogEvents"] = grpc.unary_unary_rpc_method_handler(
        servicer.LogEvents,
        request_deserializer=pb.LogEventsRequest.FromString,
        response_serializer=pb.LogEventsResponse.SerializeToString,
    )
    handlers["DeleteUser"] = grpc.unary_unary_rpc_method_handler(
        servicer.DeleteUser,
        request_deserializer=pb.DeleteUserRequest.FromString,
        response_serializer=pb.DeleteUserResponse.SerializeToString,
    )
    handlers["FindAudience"] = grpc.unary_stream_rpc_method_handler(
        servicer.FindAudience,
        request_deserializer=pb.FindAudienceRequest.FromString,
        response_serializer=pb.AudienceMember.SerializeToString,
    )
    for name, request_type, response_type in (
        ("GetUserProfile", pb.GetUserProfileRequest, pb.UserProfile),
        ("StartExperiment", pb.StartExperimentRequest, pb.Experiment),
        ("UpdateExperiment", pb.UpdateExperimentRequest, pb.Experiment),
        ("StopExperiment", pb.StopExperimentRequest, pb.Experiment),
        ("GetExperiment", pb.GetExperimentRequest, pb.Experiment),
        ("ListExperiments", pb.ListExperimentsRequest, pb.ListExperimentsResponse),
    ):
        handlers[name] = grpc.unary_unary_rpc_method_handler(
            getattr(servicer, name),
            request_deserializer=request_type.FromString,
            response_serializer=response_type.SerializeToString,
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    # Looked up by method name without the generic handlers' search (missing from grpc's stubs).
    server.add_registered_method_handlers(SERVICE, handlers)  # type: ignore[attr-defined]
