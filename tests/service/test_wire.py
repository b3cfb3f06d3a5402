"""Listing responses encoded by service.wire decode to the messages protobuf itself builds."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import pytest

from models.artifact import ItemCatalog
from models.ranking import ItemFilter, RankingPipeline, Recommendations, Source
from models.vocabulary import Vocabulary
from protos.affinity.v1 import recommender_pb2 as pb
from service.servicer import SOURCES
from service.wire import (
    LISTING_FIELDS,
    RECOMMEND_FIELDS,
    SCORED_ITEM_FIELDS,
    ListingEncoder,
    experiment_fields,
)

from .conftest import build_bundle, loaded_model


def scored_items(recs: Recommendations, catalog: ItemCatalog) -> list[pb.ScoredItem]:
    """The items as the servicer built them before service.wire: one message per item."""
    return [
        pb.ScoredItem(
            item_id=item_id,
            score=score,
            item_type=str(catalog.item_type[index]),
            category=str(catalog.category[index]),
        )
        for item_id, score, index in zip(
            recs.item_ids, recs.scores, recs.indices.tolist(), strict=True
        )
    ]


def listings(pipeline: RankingPipeline) -> list[Recommendations]:
    """Every kind of list the service returns: personalized, folded in, popular fallback,
    filtered, similar items, popular and trending."""
    return [
        pipeline.recommend("u01", 5),
        pipeline.recommend("u50", 10, exclude_item_ids=["i60"]),
        pipeline.recommend("nobody", 4, recent_item_ids=["i01", "i02", "i03"]),
        pipeline.recommend("nobody", 6),
        pipeline.recommend("u02", 8, item_filter=ItemFilter.of(["product"], [])),
        pipeline.similar_items(["i05"], 7),
        pipeline.popular(9),
        pipeline.popular(3, trending=True),
    ]


def test_recommend_bytes_are_the_message_protobuf_builds(pipeline: RankingPipeline) -> None:
    loaded = loaded_model(pipeline, version="3")
    encoder = ListingEncoder(pipeline, loaded.meta.ref)
    for number, recs in enumerate(listings(pipeline)):
        assert len(recs) > 0
        rec_id = f"{number:032x}"
        expected = pb.RecommendResponse(
            items=scored_items(recs, pipeline.bundle.catalog),
            source=SOURCES[recs.source],
            model=loaded.meta.ref,
            recommendation_id=rec_id,
        )
        encoded = encoder.recommend(recs, SOURCES[recs.source], rec_id)
        assert pb.RecommendResponse.FromString(encoded) == expected
        # No score is zero here, so even the bytes are protobuf's own.
        assert all(score != 0.0 for score in recs.scores)
        assert encoded == expected.SerializeToString()
        # The pieces cached on the first call give the same bytes again.
        assert encoder.recommend(recs, SOURCES[recs.source], rec_id) == encoded
        # During an experiment the arm's two fields follow, as protobuf writes them.
        expected.experiment, expected.arm = "spring-test", "challenger"
        arm = experiment_fields("spring-test", "challenger")
        assert encoder.recommend(recs, SOURCES[recs.source], rec_id, arm) == (
            expected.SerializeToString()
        )


def test_similar_and_popular_bytes_are_the_messages_protobuf_builds(
    pipeline: RankingPipeline,
) -> None:
    loaded = loaded_model(pipeline, version="12")
    encoder = ListingEncoder(pipeline, loaded.meta.ref)
    for message in (pb.SimilarItemsResponse, pb.PopularResponse):
        for recs in listings(pipeline):
            expected = message(
                items=scored_items(recs, pipeline.bundle.catalog),
                model=loaded.meta.ref,
                recommendation_id="r" * 32,
            )
            encoded = encoder.listing(recs, "r" * 32)
            assert message.FromString(encoded) == expected
            assert encoded == expected.SerializeToString()


def test_unusual_ids_empty_fields_and_zero_scores_round_trip() -> None:
    bundle = build_bundle(0)
    n = len(bundle.items)
    # Ids of every length class of a varint (over 127 bytes needs two), non-ASCII text,
    # and items without a type or category (left out of the encoding, as protobuf does).
    ids = [f"{'é' * (i * 3)}-{i}" for i in range(n)]
    catalog = ItemCatalog(
        item_type=np.array(["" if i % 3 == 0 else "product" for i in range(n)]),
        category=np.array(["" if i % 2 == 0 else f"catégorie {i}" for i in range(n)]),
        title=np.array([""] * n),
        available=np.ones(n, dtype=bool),
    )
    pipeline = RankingPipeline.from_bundle(replace(bundle, items=Vocabulary(ids), catalog=catalog))
    loaded = loaded_model(pipeline, version="1")
    encoder = ListingEncoder(pipeline, loaded.meta.ref)
    indices = np.array([0, n - 1, 1, 2, 30, 3], dtype=np.int64)
    recs = Recommendations(
        item_ids=[ids[i] for i in indices],
        scores=[0.0, -0.0, 1e-30, -2.5, 3.4e38, 0.125],
        source=Source.POPULAR,
        indices=indices,
    )
    assert len(ids[n - 1].encode()) > 127
    expected = pb.RecommendResponse(
        items=scored_items(recs, catalog),
        source=pb.SOURCE_POPULAR,
        model=loaded.meta.ref,
        recommendation_id="x",
    )
    decoded = pb.RecommendResponse.FromString(encoder.recommend(recs, pb.SOURCE_POPULAR, "x"))
    assert decoded == expected
    assert [item.item_id for item in decoded.items] == recs.item_ids
    assert decoded.items[0].item_type == "" and decoded.items[2].category == "catégorie 1"
    # An empty list: only the response's own fields.
    empty = Recommendations([], [], Source.PERSONALIZED, np.empty(0, np.int64))
    assert pb.SimilarItemsResponse.FromString(encoder.listing(empty, "")) == (
        pb.SimilarItemsResponse(model=loaded.meta.ref)
    )


@pytest.mark.parametrize("source", [Source.PERSONALIZED, Source.FOLD_IN, Source.POPULAR])
def test_every_source_is_written(pipeline: RankingPipeline, source: Source) -> None:
    recs = replace(pipeline.popular(2), source=source)
    loaded = loaded_model(pipeline)
    encoded = ListingEncoder(pipeline, loaded.meta.ref).recommend(recs, SOURCES[source], "id")
    assert pb.RecommendResponse.FromString(encoded).source == SOURCES[source]


@pytest.mark.parametrize(
    ("message", "written"),
    [
        (pb.ScoredItem, SCORED_ITEM_FIELDS),
        (pb.RecommendResponse, RECOMMEND_FIELDS),
        (pb.SimilarItemsResponse, LISTING_FIELDS),
        (pb.PopularResponse, LISTING_FIELDS),
    ],
    ids=lambda value: getattr(getattr(value, "DESCRIPTOR", None), "name", ""),
)
def test_the_encoder_writes_every_field_of_the_listing_messages(
    message: Any, written: tuple[str, ...]
) -> None:
    """A field added to the .proto must be added to service.wire too, or it is never sent."""
    declared = set(message.DESCRIPTOR.fields_by_name)
    missing = sorted(declared - set(written))
    assert not missing, f"service.wire does not write {message.DESCRIPTOR.name}: {missing}"
    assert declared == set(written)


def test_the_listing_responses_share_their_field_numbers() -> None:
    """One cached item piece (with the items tag) serves all three responses, and similar and
    popular share one encoding: their numbering must agree."""
    fields = {
        message.DESCRIPTOR.name: message.DESCRIPTOR.fields_by_name
        for message in (pb.RecommendResponse, pb.SimilarItemsResponse, pb.PopularResponse)
    }
    assert len({by_name["items"].number for by_name in fields.values()}) == 1
    similar, popular = fields["SimilarItemsResponse"], fields["PopularResponse"]
    assert [similar[name].number for name in LISTING_FIELDS] == [
        popular[name].number for name in LISTING_FIELDS
    ]


def test_reasons_are_written_only_when_a_rule_claimed_an_item(pipeline: RankingPipeline) -> None:
    """A list whose items are all the model's is the same bytes as one made without rules;
    other reasons are written as protobuf writes them, whatever the order of the scores."""
    from models.rules import Boost, Promotion, Rules

    loaded = loaded_model(pipeline, version="4")
    encoder = ListingEncoder(pipeline, loaded.meta.ref)
    plain = pipeline.recommend("u01", 10)
    zeros = replace(plain, reasons=np.zeros(len(plain), dtype=np.uint8))
    source = SOURCES[plain.source]
    assert encoder.recommend(zeros, source, "z") == encoder.recommend(plain, source, "z")
    rules = Rules(
        boosts=(Boost(ItemFilter.of([], ["b"]), 3.0),),
        promotion=Promotion(ItemFilter.of(["product"], []), 0.3),
    )
    for recs in (
        pipeline.recommend("u01", 10, rules=rules),
        pipeline.similar_items(["i05"], 7, rules=rules),
        pipeline.popular(9, rules=rules),
    ):
        assert recs.reasons is not None and recs.reasons.any()
        items = scored_items(recs, pipeline.bundle.catalog)
        for item, reason in zip(items, recs.reasons.tolist(), strict=True):
            item.reason = reason
        expected = pb.RecommendResponse(
            items=items, source=source, model=loaded.meta.ref, recommendation_id="r"
        )
        for _ in range(2):  # the second time from the cached pieces
            encoded = encoder.recommend(recs, source, "r")
            assert pb.RecommendResponse.FromString(encoded) == expected
            assert encoded == expected.SerializeToString()
        listing = encoder.listing(recs, "r")
        assert pb.PopularResponse.FromString(listing).items == expected.items
    # Scores out of order (a rule arranged the list) are written as they are.
    shuffled = pipeline.recommend("u01", 10, rules=Rules(promotion=rules.promotion))
    decoded = pb.RecommendResponse.FromString(encoder.recommend(shuffled, source, "s"))
    assert [item.score for item in decoded.items] == pytest.approx(shuffled.scores)
    assert [item.reason for item in decoded.items] == shuffled.reasons.tolist()  # type: ignore[union-attr]
