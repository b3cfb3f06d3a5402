import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Source(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SOURCE_UNSPECIFIED: _ClassVar[Source]
    SOURCE_PERSONALIZED: _ClassVar[Source]
    SOURCE_FOLD_IN: _ClassVar[Source]
    SOURCE_POPULAR: _ClassVar[Source]

class Reason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REASON_MODEL: _ClassVar[Reason]
    REASON_BOOSTED: _ClassVar[Reason]
    REASON_PROMOTED: _ClassVar[Reason]
    REASON_EXPLORED: _ClassVar[Reason]

class EventStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EVENT_STATUS_UNSPECIFIED: _ClassVar[EventStatus]
    EVENT_STATUS_ACCEPTED: _ClassVar[EventStatus]
    EVENT_STATUS_DUPLICATE: _ClassVar[EventStatus]
    EVENT_STATUS_REJECTED: _ClassVar[EventStatus]
SOURCE_UNSPECIFIED: Source
SOURCE_PERSONALIZED: Source
SOURCE_FOLD_IN: Source
SOURCE_POPULAR: Source
REASON_MODEL: Reason
REASON_BOOSTED: Reason
REASON_PROMOTED: Reason
REASON_EXPLORED: Reason
EVENT_STATUS_UNSPECIFIED: EventStatus
EVENT_STATUS_ACCEPTED: EventStatus
EVENT_STATUS_DUPLICATE: EventStatus
EVENT_STATUS_REJECTED: EventStatus

class ItemFilter(_message.Message):
    __slots__ = ("item_types", "categories")
    ITEM_TYPES_FIELD_NUMBER: _ClassVar[int]
    CATEGORIES_FIELD_NUMBER: _ClassVar[int]
    item_types: _containers.RepeatedScalarFieldContainer[str]
    categories: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, item_types: _Optional[_Iterable[str]] = ..., categories: _Optional[_Iterable[str]] = ...) -> None: ...

class RecommendRequest(_message.Message):
    __slots__ = ("user_id", "k", "recent_item_ids", "exclude_item_ids", "filter", "include_seen", "rules")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    RECENT_ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_SEEN_FIELD_NUMBER: _ClassVar[int]
    RULES_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    k: int
    recent_item_ids: _containers.RepeatedScalarFieldContainer[str]
    exclude_item_ids: _containers.RepeatedScalarFieldContainer[str]
    filter: ItemFilter
    include_seen: bool
    rules: RankingRules
    def __init__(self, user_id: _Optional[str] = ..., k: _Optional[int] = ..., recent_item_ids: _Optional[_Iterable[str]] = ..., exclude_item_ids: _Optional[_Iterable[str]] = ..., filter: _Optional[_Union[ItemFilter, _Mapping]] = ..., include_seen: _Optional[bool] = ..., rules: _Optional[_Union[RankingRules, _Mapping]] = ...) -> None: ...

class ScoredItem(_message.Message):
    __slots__ = ("item_id", "score", "item_type", "category", "reason")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    ITEM_TYPE_FIELD_NUMBER: _ClassVar[int]
    CATEGORY_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    score: float
    item_type: str
    category: str
    reason: Reason
    def __init__(self, item_id: _Optional[str] = ..., score: _Optional[float] = ..., item_type: _Optional[str] = ..., category: _Optional[str] = ..., reason: _Optional[_Union[Reason, str]] = ...) -> None: ...

class RankingRules(_message.Message):
    __slots__ = ("diversity", "boosts", "no_boosts", "promotion", "exploration", "rotation")
    DIVERSITY_FIELD_NUMBER: _ClassVar[int]
    BOOSTS_FIELD_NUMBER: _ClassVar[int]
    NO_BOOSTS_FIELD_NUMBER: _ClassVar[int]
    PROMOTION_FIELD_NUMBER: _ClassVar[int]
    EXPLORATION_FIELD_NUMBER: _ClassVar[int]
    ROTATION_FIELD_NUMBER: _ClassVar[int]
    diversity: Diversity
    boosts: _containers.RepeatedCompositeFieldContainer[Boost]
    no_boosts: bool
    promotion: Promotion
    exploration: Exploration
    rotation: Rotation
    def __init__(self, diversity: _Optional[_Union[Diversity, _Mapping]] = ..., boosts: _Optional[_Iterable[_Union[Boost, _Mapping]]] = ..., no_boosts: _Optional[bool] = ..., promotion: _Optional[_Union[Promotion, _Mapping]] = ..., exploration: _Optional[_Union[Exploration, _Mapping]] = ..., rotation: _Optional[_Union[Rotation, _Mapping]] = ...) -> None: ...

class Diversity(_message.Message):
    __slots__ = ("max_per_category", "mmr")
    MAX_PER_CATEGORY_FIELD_NUMBER: _ClassVar[int]
    MMR_FIELD_NUMBER: _ClassVar[int]
    max_per_category: int
    mmr: float
    def __init__(self, max_per_category: _Optional[int] = ..., mmr: _Optional[float] = ...) -> None: ...

class Boost(_message.Message):
    __slots__ = ("item_types", "categories", "factor")
    ITEM_TYPES_FIELD_NUMBER: _ClassVar[int]
    CATEGORIES_FIELD_NUMBER: _ClassVar[int]
    FACTOR_FIELD_NUMBER: _ClassVar[int]
    item_types: _containers.RepeatedScalarFieldContainer[str]
    categories: _containers.RepeatedScalarFieldContainer[str]
    factor: float
    def __init__(self, item_types: _Optional[_Iterable[str]] = ..., categories: _Optional[_Iterable[str]] = ..., factor: _Optional[float] = ...) -> None: ...

class Promotion(_message.Message):
    __slots__ = ("item_types", "categories", "share")
    ITEM_TYPES_FIELD_NUMBER: _ClassVar[int]
    CATEGORIES_FIELD_NUMBER: _ClassVar[int]
    SHARE_FIELD_NUMBER: _ClassVar[int]
    item_types: _containers.RepeatedScalarFieldContainer[str]
    categories: _containers.RepeatedScalarFieldContainer[str]
    share: float
    def __init__(self, item_types: _Optional[_Iterable[str]] = ..., categories: _Optional[_Iterable[str]] = ..., share: _Optional[float] = ...) -> None: ...

class Exploration(_message.Message):
    __slots__ = ("share", "max_age_days", "seed", "max_interactions")
    SHARE_FIELD_NUMBER: _ClassVar[int]
    MAX_AGE_DAYS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    MAX_INTERACTIONS_FIELD_NUMBER: _ClassVar[int]
    share: float
    max_age_days: float
    seed: int
    max_interactions: int
    def __init__(self, share: _Optional[float] = ..., max_age_days: _Optional[float] = ..., seed: _Optional[int] = ..., max_interactions: _Optional[int] = ...) -> None: ...

class Rotation(_message.Message):
    __slots__ = ("rate", "half_life_seconds")
    RATE_FIELD_NUMBER: _ClassVar[int]
    HALF_LIFE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    rate: float
    half_life_seconds: float
    def __init__(self, rate: _Optional[float] = ..., half_life_seconds: _Optional[float] = ...) -> None: ...

class ModelRef(_message.Message):
    __slots__ = ("name", "version", "run_id", "algorithm")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    run_id: str
    algorithm: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., run_id: _Optional[str] = ..., algorithm: _Optional[str] = ...) -> None: ...

class RecommendResponse(_message.Message):
    __slots__ = ("items", "source", "model", "recommendation_id", "experiment", "arm", "stage", "strategy")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    RECOMMENDATION_ID_FIELD_NUMBER: _ClassVar[int]
    EXPERIMENT_FIELD_NUMBER: _ClassVar[int]
    ARM_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[ScoredItem]
    source: Source
    model: ModelRef
    recommendation_id: str
    experiment: str
    arm: str
    stage: str
    strategy: str
    def __init__(self, items: _Optional[_Iterable[_Union[ScoredItem, _Mapping]]] = ..., source: _Optional[_Union[Source, str]] = ..., model: _Optional[_Union[ModelRef, _Mapping]] = ..., recommendation_id: _Optional[str] = ..., experiment: _Optional[str] = ..., arm: _Optional[str] = ..., stage: _Optional[str] = ..., strategy: _Optional[str] = ...) -> None: ...

class SimilarItemsRequest(_message.Message):
    __slots__ = ("item_ids", "k", "exclude_item_ids", "filter", "rules")
    ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    RULES_FIELD_NUMBER: _ClassVar[int]
    item_ids: _containers.RepeatedScalarFieldContainer[str]
    k: int
    exclude_item_ids: _containers.RepeatedScalarFieldContainer[str]
    filter: ItemFilter
    rules: RankingRules
    def __init__(self, item_ids: _Optional[_Iterable[str]] = ..., k: _Optional[int] = ..., exclude_item_ids: _Optional[_Iterable[str]] = ..., filter: _Optional[_Union[ItemFilter, _Mapping]] = ..., rules: _Optional[_Union[RankingRules, _Mapping]] = ...) -> None: ...

class SimilarItemsResponse(_message.Message):
    __slots__ = ("items", "model", "recommendation_id")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    RECOMMENDATION_ID_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[ScoredItem]
    model: ModelRef
    recommendation_id: str
    def __init__(self, items: _Optional[_Iterable[_Union[ScoredItem, _Mapping]]] = ..., model: _Optional[_Union[ModelRef, _Mapping]] = ..., recommendation_id: _Optional[str] = ...) -> None: ...

class PopularRequest(_message.Message):
    __slots__ = ("k", "filter", "trending", "exclude_item_ids", "rules")
    K_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    TRENDING_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    RULES_FIELD_NUMBER: _ClassVar[int]
    k: int
    filter: ItemFilter
    trending: bool
    exclude_item_ids: _containers.RepeatedScalarFieldContainer[str]
    rules: RankingRules
    def __init__(self, k: _Optional[int] = ..., filter: _Optional[_Union[ItemFilter, _Mapping]] = ..., trending: _Optional[bool] = ..., exclude_item_ids: _Optional[_Iterable[str]] = ..., rules: _Optional[_Union[RankingRules, _Mapping]] = ...) -> None: ...

class PopularResponse(_message.Message):
    __slots__ = ("items", "model", "recommendation_id")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    RECOMMENDATION_ID_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[ScoredItem]
    model: ModelRef
    recommendation_id: str
    def __init__(self, items: _Optional[_Iterable[_Union[ScoredItem, _Mapping]]] = ..., model: _Optional[_Union[ModelRef, _Mapping]] = ..., recommendation_id: _Optional[str] = ...) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("model", "loaded_at", "num_users", "num_items", "source_uri", "from_cache", "dataset_fingerprint")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    LOADED_AT_FIELD_NUMBER: _ClassVar[int]
    NUM_USERS_FIELD_NUMBER: _ClassVar[int]
    NUM_ITEMS_FIELD_NUMBER: _ClassVar[int]
    SOURCE_URI_FIELD_NUMBER: _ClassVar[int]
    FROM_CACHE_FIELD_NUMBER: _ClassVar[int]
    DATASET_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    model: ModelRef
    loaded_at: _timestamp_pb2.Timestamp
    num_users: int
    num_items: int
    source_uri: str
    from_cache: bool
    dataset_fingerprint: str
    def __init__(self, model: _Optional[_Union[ModelRef, _Mapping]] = ..., loaded_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., num_users: _Optional[int] = ..., num_items: _Optional[int] = ..., source_uri: _Optional[str] = ..., from_cache: _Optional[bool] = ..., dataset_fingerprint: _Optional[str] = ...) -> None: ...

class Event(_message.Message):
    __slots__ = ("event_id", "user_id", "item_id", "event", "timestamp", "value", "price", "recommendation_id", "shown_item_ids")
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    EVENT_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    PRICE_FIELD_NUMBER: _ClassVar[int]
    RECOMMENDATION_ID_FIELD_NUMBER: _ClassVar[int]
    SHOWN_ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    event_id: str
    user_id: str
    item_id: str
    event: str
    timestamp: _timestamp_pb2.Timestamp
    value: float
    price: float
    recommendation_id: str
    shown_item_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, event_id: _Optional[str] = ..., user_id: _Optional[str] = ..., item_id: _Optional[str] = ..., event: _Optional[str] = ..., timestamp: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., value: _Optional[float] = ..., price: _Optional[float] = ..., recommendation_id: _Optional[str] = ..., shown_item_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class LogEventsRequest(_message.Message):
    __slots__ = ("events",)
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[Event]
    def __init__(self, events: _Optional[_Iterable[_Union[Event, _Mapping]]] = ...) -> None: ...

class EventOutcome(_message.Message):
    __slots__ = ("event_id", "status", "reason", "field")
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    FIELD_FIELD_NUMBER: _ClassVar[int]
    event_id: str
    status: EventStatus
    reason: str
    field: str
    def __init__(self, event_id: _Optional[str] = ..., status: _Optional[_Union[EventStatus, str]] = ..., reason: _Optional[str] = ..., field: _Optional[str] = ...) -> None: ...

class LogEventsResponse(_message.Message):
    __slots__ = ("outcomes", "accepted", "duplicates", "rejected")
    OUTCOMES_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    DUPLICATES_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    outcomes: _containers.RepeatedCompositeFieldContainer[EventOutcome]
    accepted: int
    duplicates: int
    rejected: int
    def __init__(self, outcomes: _Optional[_Iterable[_Union[EventOutcome, _Mapping]]] = ..., accepted: _Optional[int] = ..., duplicates: _Optional[int] = ..., rejected: _Optional[int] = ...) -> None: ...

class DeleteUserRequest(_message.Message):
    __slots__ = ("user_id",)
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    def __init__(self, user_id: _Optional[str] = ...) -> None: ...

class DeleteUserResponse(_message.Message):
    __slots__ = ("events_deleted", "responses_deleted", "erased_at")
    EVENTS_DELETED_FIELD_NUMBER: _ClassVar[int]
    RESPONSES_DELETED_FIELD_NUMBER: _ClassVar[int]
    ERASED_AT_FIELD_NUMBER: _ClassVar[int]
    events_deleted: int
    responses_deleted: int
    erased_at: _timestamp_pb2.Timestamp
    def __init__(self, events_deleted: _Optional[int] = ..., responses_deleted: _Optional[int] = ..., erased_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ExperimentArm(_message.Message):
    __slots__ = ("name", "model", "share", "shadow")
    NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SHARE_FIELD_NUMBER: _ClassVar[int]
    SHADOW_FIELD_NUMBER: _ClassVar[int]
    name: str
    model: str
    share: float
    shadow: bool
    def __init__(self, name: _Optional[str] = ..., model: _Optional[str] = ..., share: _Optional[float] = ..., shadow: _Optional[bool] = ...) -> None: ...

class ExperimentSpec(_message.Message):
    __slots__ = ("name", "arms", "control", "salt", "primary_metric", "min_users")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ARMS_FIELD_NUMBER: _ClassVar[int]
    CONTROL_FIELD_NUMBER: _ClassVar[int]
    SALT_FIELD_NUMBER: _ClassVar[int]
    PRIMARY_METRIC_FIELD_NUMBER: _ClassVar[int]
    MIN_USERS_FIELD_NUMBER: _ClassVar[int]
    name: str
    arms: _containers.RepeatedCompositeFieldContainer[ExperimentArm]
    control: str
    salt: str
    primary_metric: str
    min_users: int
    def __init__(self, name: _Optional[str] = ..., arms: _Optional[_Iterable[_Union[ExperimentArm, _Mapping]]] = ..., control: _Optional[str] = ..., salt: _Optional[str] = ..., primary_metric: _Optional[str] = ..., min_users: _Optional[int] = ...) -> None: ...

class ArmState(_message.Message):
    __slots__ = ("arm", "model", "ready", "error", "fallbacks")
    ARM_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    FALLBACKS_FIELD_NUMBER: _ClassVar[int]
    arm: str
    model: ModelRef
    ready: bool
    error: str
    fallbacks: int
    def __init__(self, arm: _Optional[str] = ..., model: _Optional[_Union[ModelRef, _Mapping]] = ..., ready: _Optional[bool] = ..., error: _Optional[str] = ..., fallbacks: _Optional[int] = ...) -> None: ...

class Experiment(_message.Message):
    __slots__ = ("spec", "status", "revision", "created_at", "updated_at", "allocation", "arms")
    SPEC_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    ALLOCATION_FIELD_NUMBER: _ClassVar[int]
    ARMS_FIELD_NUMBER: _ClassVar[int]
    spec: ExperimentSpec
    status: str
    revision: int
    created_at: _timestamp_pb2.Timestamp
    updated_at: _timestamp_pb2.Timestamp
    allocation: _containers.RepeatedScalarFieldContainer[str]
    arms: _containers.RepeatedCompositeFieldContainer[ArmState]
    def __init__(self, spec: _Optional[_Union[ExperimentSpec, _Mapping]] = ..., status: _Optional[str] = ..., revision: _Optional[int] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., updated_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., allocation: _Optional[_Iterable[str]] = ..., arms: _Optional[_Iterable[_Union[ArmState, _Mapping]]] = ...) -> None: ...

class StartExperimentRequest(_message.Message):
    __slots__ = ("spec",)
    SPEC_FIELD_NUMBER: _ClassVar[int]
    spec: ExperimentSpec
    def __init__(self, spec: _Optional[_Union[ExperimentSpec, _Mapping]] = ...) -> None: ...

class UpdateExperimentRequest(_message.Message):
    __slots__ = ("name", "shares")
    class SharesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHARES_FIELD_NUMBER: _ClassVar[int]
    name: str
    shares: _containers.ScalarMap[str, float]
    def __init__(self, name: _Optional[str] = ..., shares: _Optional[_Mapping[str, float]] = ...) -> None: ...

class StopExperimentRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class GetExperimentRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ListExperimentsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListExperimentsResponse(_message.Message):
    __slots__ = ("experiments",)
    EXPERIMENTS_FIELD_NUMBER: _ClassVar[int]
    experiments: _containers.RepeatedCompositeFieldContainer[Experiment]
    def __init__(self, experiments: _Optional[_Iterable[_Union[Experiment, _Mapping]]] = ...) -> None: ...

class GetUserProfileRequest(_message.Message):
    __slots__ = ("user_id",)
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    def __init__(self, user_id: _Optional[str] = ...) -> None: ...

class NameCount(_message.Message):
    __slots__ = ("name", "count")
    NAME_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    name: str
    count: int
    def __init__(self, name: _Optional[str] = ..., count: _Optional[int] = ...) -> None: ...

class NameShare(_message.Message):
    __slots__ = ("name", "share")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHARE_FIELD_NUMBER: _ClassVar[int]
    name: str
    share: float
    def __init__(self, name: _Optional[str] = ..., share: _Optional[float] = ...) -> None: ...

class UserProfile(_message.Message):
    __slots__ = ("user_id", "first_seen", "last_seen", "active_days_7", "active_days_30", "active_days_90", "event_counts", "monetary", "recency_score", "frequency_score", "monetary_score", "tier", "stage", "stage_since", "top_categories", "item_types", "recent_item_ids", "segments_as_of", "orders", "activated_at", "live_events")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    FIRST_SEEN_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_DAYS_7_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_DAYS_30_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_DAYS_90_FIELD_NUMBER: _ClassVar[int]
    EVENT_COUNTS_FIELD_NUMBER: _ClassVar[int]
    MONETARY_FIELD_NUMBER: _ClassVar[int]
    RECENCY_SCORE_FIELD_NUMBER: _ClassVar[int]
    FREQUENCY_SCORE_FIELD_NUMBER: _ClassVar[int]
    MONETARY_SCORE_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    STAGE_SINCE_FIELD_NUMBER: _ClassVar[int]
    TOP_CATEGORIES_FIELD_NUMBER: _ClassVar[int]
    ITEM_TYPES_FIELD_NUMBER: _ClassVar[int]
    RECENT_ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    SEGMENTS_AS_OF_FIELD_NUMBER: _ClassVar[int]
    ORDERS_FIELD_NUMBER: _ClassVar[int]
    ACTIVATED_AT_FIELD_NUMBER: _ClassVar[int]
    LIVE_EVENTS_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    first_seen: _timestamp_pb2.Timestamp
    last_seen: _timestamp_pb2.Timestamp
    active_days_7: int
    active_days_30: int
    active_days_90: int
    event_counts: _containers.RepeatedCompositeFieldContainer[NameCount]
    monetary: float
    recency_score: int
    frequency_score: int
    monetary_score: int
    tier: str
    stage: str
    stage_since: _timestamp_pb2.Timestamp
    top_categories: _containers.RepeatedCompositeFieldContainer[NameShare]
    item_types: _containers.RepeatedCompositeFieldContainer[NameShare]
    recent_item_ids: _containers.RepeatedScalarFieldContainer[str]
    segments_as_of: _timestamp_pb2.Timestamp
    orders: int
    activated_at: _timestamp_pb2.Timestamp
    live_events: int
    def __init__(self, user_id: _Optional[str] = ..., first_seen: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., last_seen: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., active_days_7: _Optional[int] = ..., active_days_30: _Optional[int] = ..., active_days_90: _Optional[int] = ..., event_counts: _Optional[_Iterable[_Union[NameCount, _Mapping]]] = ..., monetary: _Optional[float] = ..., recency_score: _Optional[int] = ..., frequency_score: _Optional[int] = ..., monetary_score: _Optional[int] = ..., tier: _Optional[str] = ..., stage: _Optional[str] = ..., stage_since: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., top_categories: _Optional[_Iterable[_Union[NameShare, _Mapping]]] = ..., item_types: _Optional[_Iterable[_Union[NameShare, _Mapping]]] = ..., recent_item_ids: _Optional[_Iterable[str]] = ..., segments_as_of: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., orders: _Optional[int] = ..., activated_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., live_events: _Optional[int] = ...) -> None: ...

class FindAudienceRequest(_message.Message):
    __slots__ = ("item_ids", "category", "stages", "tiers", "last_seen_within_days", "exclude_interacted", "max_users", "max_audiences_per_user", "cap_window_days", "record", "name", "batch_size")
    ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    CATEGORY_FIELD_NUMBER: _ClassVar[int]
    STAGES_FIELD_NUMBER: _ClassVar[int]
    TIERS_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_WITHIN_DAYS_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_INTERACTED_FIELD_NUMBER: _ClassVar[int]
    MAX_USERS_FIELD_NUMBER: _ClassVar[int]
    MAX_AUDIENCES_PER_USER_FIELD_NUMBER: _ClassVar[int]
    CAP_WINDOW_DAYS_FIELD_NUMBER: _ClassVar[int]
    RECORD_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    item_ids: _containers.RepeatedScalarFieldContainer[str]
    category: str
    stages: _containers.RepeatedScalarFieldContainer[str]
    tiers: _containers.RepeatedScalarFieldContainer[str]
    last_seen_within_days: float
    exclude_interacted: bool
    max_users: int
    max_audiences_per_user: int
    cap_window_days: float
    record: bool
    name: str
    batch_size: int
    def __init__(self, item_ids: _Optional[_Iterable[str]] = ..., category: _Optional[str] = ..., stages: _Optional[_Iterable[str]] = ..., tiers: _Optional[_Iterable[str]] = ..., last_seen_within_days: _Optional[float] = ..., exclude_interacted: _Optional[bool] = ..., max_users: _Optional[int] = ..., max_audiences_per_user: _Optional[int] = ..., cap_window_days: _Optional[float] = ..., record: _Optional[bool] = ..., name: _Optional[str] = ..., batch_size: _Optional[int] = ...) -> None: ...

class AudienceMember(_message.Message):
    __slots__ = ("user_id", "score", "rank", "batch")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    score: float
    rank: int
    batch: _containers.RepeatedCompositeFieldContainer[AudienceMember]
    def __init__(self, user_id: _Optional[str] = ..., score: _Optional[float] = ..., rank: _Optional[int] = ..., batch: _Optional[_Iterable[_Union[AudienceMember, _Mapping]]] = ...) -> None: ...
