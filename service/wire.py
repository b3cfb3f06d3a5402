"""Listing responses written straight in protobuf's wire format.

``Recommend``, ``SimilarItems`` and ``Popular`` answer with a ranked list of ``ScoredItem``.
Built as protobuf messages, each item costs a Python call with four keyword arguments and its
strings are copied into the message and then out again when gRPC serializes it: a sizeable share
of the servicer's own time on the benchmark catalog. Yet everything in a ``ScoredItem`` but its
score is fixed while a model serves. :class:`ListingEncoder` encodes each item's fixed fields
once, the first time the item is returned, and a response is then the concatenation of those
pieces, each score's four bytes and the response's own fields, several times cheaper to build
(``docs/benchmarks.md``, "Where the time goes": building the response).

The bytes decode to the same message the protobuf classes build (``tests/service/test_wire.py``
checks it field by field against them); the only difference in the bytes themselves is that a
score of exactly zero is written out, where protobuf leaves a zero scalar out.

An item's ``reason`` (ranking rules) is written only when it is not ``REASON_MODEL``, as protobuf
leaves a zero enum out: a list made without rules (``Recommendations.reasons`` is ``None``, or
all zero) takes the same path and gives the same bytes as before reasons existed. An item with
another reason is written from a second cache, keyed by item and reason, whose pieces carry the
reason's two bytes after the category (field order) and the item's length with them. Nothing
assumes the scores are sorted: rules that arrange a list leave it out of score order.
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np

from models.ranking import RankingPipeline, Recommendations
from protos.affinity.v1 import recommender_pb2 as pb

SCORED_ITEM_FIELDS = ("item_id", "score", "item_type", "category", "reason")
"""The ``ScoredItem`` fields the encoder writes, in the order it writes them."""
RECOMMEND_FIELDS = (
    "items",
    "source",
    "model",
    "recommendation_id",
    "experiment",
    "arm",
    "stage",
    "strategy",
)
"""The ``RecommendResponse`` fields the encoder writes."""
LISTING_FIELDS = ("items", "model", "recommendation_id")
"""The fields written of ``SimilarItemsResponse`` and ``PopularResponse`` (one encoding)."""


def _numbers(message: Any, names: tuple[str, ...]) -> tuple[int, ...]:
    """The field numbers of ``names`` in ``message``, as the generated descriptor has them."""
    fields = message.DESCRIPTOR.fields_by_name
    return tuple(fields[name].number for name in names)


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _tag(number: int, wire_type: int) -> bytes:
    return _varint(number << 3 | wire_type)


# Field numbers come from the generated code, read once here, so the bytes follow the .proto.
# The cached item pieces carry the items field's tag, so all three responses must number
# ``items`` alike, and PopularResponse must number its fields as SimilarItemsResponse does
# (tests/service/test_wire.py checks both).
_ITEM_ID, _ITEM_SCORE, _ITEM_TYPE, _ITEM_CATEGORY, _ITEM_REASON = _numbers(
    pb.ScoredItem, SCORED_ITEM_FIELDS
)
(
    _ITEMS,
    _RECOMMEND_SOURCE,
    _RECOMMEND_MODEL,
    _RECOMMEND_ID,
    _EXPERIMENT,
    _ARM,
    _STAGE,
    _STRATEGY,
) = _numbers(pb.RecommendResponse, RECOMMEND_FIELDS)
_, _LISTING_MODEL, _LISTING_ID = _numbers(pb.SimilarItemsResponse, LISTING_FIELDS)

_SCORE = struct.Struct("<f").pack
_SCORE_TAG = _tag(_ITEM_SCORE, 5)  # a float: wire type 5, 32-bit
_SCORE_BYTES = len(_SCORE_TAG) + 4


def length_delimited(number: int, payload: bytes) -> bytes:
    """Field ``number`` holding ``payload`` (a string's UTF-8 or an encoded message)."""
    return _tag(number, 2) + _varint(len(payload)) + payload


def _string(number: int, value: str) -> bytes:
    """A proto3 string field; an empty string is left out, as protobuf does."""
    return length_delimited(number, value.encode()) if value else b""


def experiment_fields(experiment: str, arm: str) -> bytes:
    """A ``RecommendResponse``'s ``experiment`` and ``arm`` fields (encoded once per arm)."""
    return _string(_EXPERIMENT, experiment) + _string(_ARM, arm)


def stage_fields(stage: str, strategy: str) -> bytes:
    """A ``RecommendResponse``'s ``stage`` and ``strategy`` fields (encoded once per stage)."""
    return _string(_STAGE, stage) + _string(_STRATEGY, strategy)


class ListingEncoder:
    """Encodes the listing responses of one served model (``pipeline``, named by ``model``).

    It caches, per item index, the encoded ``ScoredItem`` around its score: the items field's
    tag and length with the item id before the score, item type and category after it. The
    cache fills as items are served, so a worker holds pieces only for the items it returned.
    """

    def __init__(self, pipeline: RankingPipeline, model: pb.ModelRef) -> None:
        self._catalog = pipeline.catalog
        self._pieces: list[tuple[bytes, bytes] | None] = [None] * pipeline.n_items
        self._reasoned: dict[tuple[int, int], tuple[bytes, bytes]] = {}
        """The pieces of an item with a reason other than REASON_MODEL, by (index, reason)."""
        encoded = model.SerializeToString()
        self._recommend_model = length_delimited(_RECOMMEND_MODEL, encoded)
        self._listing_model = length_delimited(_LISTING_MODEL, encoded)

    def _item(self, index: int, item_id: str) -> tuple[bytes, bytes]:
        pieces = self._pieces[index]
        if pieces is None:
            head = _string(_ITEM_ID, item_id)
            tail = _string(_ITEM_TYPE, str(self._catalog.item_type[index]))
            tail += _string(_ITEM_CATEGORY, str(self._catalog.category[index]))
            size = len(head) + _SCORE_BYTES + len(tail)
            # Built whole before it is stored: a thread that reads the slot meanwhile sees None
            # and builds the same pieces itself.
            pieces = (_tag(_ITEMS, 2) + _varint(size) + head + _SCORE_TAG, tail)
            self._pieces[index] = pieces
        return pieces

    def _reasoned_item(self, index: int, item_id: str, reason: int) -> tuple[bytes, bytes]:
        key = (index, reason)
        pieces = self._reasoned.get(key)
        if pieces is None:
            head = _string(_ITEM_ID, item_id)
            tail = _string(_ITEM_TYPE, str(self._catalog.item_type[index]))
            tail += _string(_ITEM_CATEGORY, str(self._catalog.category[index]))
            tail += _tag(_ITEM_REASON, 0) + _varint(reason)
            size = len(head) + _SCORE_BYTES + len(tail)
            pieces = (_tag(_ITEMS, 2) + _varint(size) + head + _SCORE_TAG, tail)
            self._reasoned[key] = pieces
        return pieces

    def _items(self, recs: Recommendations) -> list[bytes]:
        parts: list[bytes] = []
        append = parts.append
        reasons = recs.reasons
        if reasons is not None and reasons.any():
            return self._items_with_reasons(recs, reasons)
        for index, item_id, score in zip(
            recs.indices.tolist(), recs.item_ids, recs.scores, strict=True
        ):
            head, tail = self._item(index, item_id)
            append(head)
            append(_SCORE(score))
            append(tail)
        return parts

    def _items_with_reasons(self, recs: Recommendations, reasons: np.ndarray) -> list[bytes]:
        parts: list[bytes] = []
        append = parts.append
        for index, item_id, score, reason in zip(
            recs.indices.tolist(), recs.item_ids, recs.scores, reasons.tolist(), strict=True
        ):
            if reason:
                head, tail = self._reasoned_item(index, item_id, reason)
            else:
                head, tail = self._item(index, item_id)
            append(head)
            append(_SCORE(score))
            append(tail)
        return parts

    def recommend(
        self,
        recs: Recommendations,
        source: int,
        recommendation_id: str,
        experiment: bytes = b"",
        stage: bytes = b"",
    ) -> bytes:
        """A serialized ``RecommendResponse``; ``experiment``: :func:`experiment_fields` of the
        user's arm while an experiment runs; ``stage``: :func:`stage_fields` of the user's
        lifecycle stage and its strategy while stage strategies are on."""
        parts = self._items(recs)
        if source:
            parts.append(_tag(_RECOMMEND_SOURCE, 0) + _varint(source))
        parts.append(self._recommend_model)
        parts.append(_string(_RECOMMEND_ID, recommendation_id))
        parts.append(experiment)
        parts.append(stage)
        return b"".join(parts)

    def listing(self, recs: Recommendations, recommendation_id: str) -> bytes:
        """A serialized ``SimilarItemsResponse`` or ``PopularResponse`` (same fields)."""
        parts = self._items(recs)
        parts.append(self._listing_model)
        parts.append(_string(_LISTING_ID, recommendation_id))
        return b"".join(parts)


def serialize(response: object) -> bytes:
    """gRPC's response serializer for the listing methods: pre-encoded bytes as they are,
    a protobuf message (an error path, an older servicer) through ``SerializeToString``."""
    if isinstance(response, bytes):
        return response
    return response.SerializeToString()  # type: ignore[attr-defined, no-any-return]
