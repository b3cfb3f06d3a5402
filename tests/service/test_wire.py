"""Listing responses encoded by service.wire decode to the messages protobuf itself builds."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from models.artifact import ItemCatalog
from models.engine import Engine, ItemFilter, Recommendations, Source
from models.vocabulary import Vocabulary
from protos.affinity.v1 import recommender_pb2 as pb
from service.servicer import SOURCES
from service.wire import ListingEncoder, model_ref

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


def listings(engine: Engine) -> list[Recommendations]:
    """Every kind of list the service returns: personalized, folded in, popular fallback,
    filtered, similar items, popular and trending."""
    return [
        engine.recommend("u01", 5),
        engine.recommend("u50", 10, exclude_item_ids=["i60"]),
        engine.recommend("nobody", 4, recent_item_ids=["i01", "i02", "i03"]),
        engine.recommend("nobody", 6),
        engine.recommend("u02", 8, item_filter=ItemFilter.of(["product"], [])),
        engine.similar_items(["i05"], 7),
        engine.popular(9),
        engine.popular(3, trending=True),
    ]


def test_recommend_bytes_are_the_message_protobuf_builds(engine: Engine) -> None:
    loaded = loaded_model(engine, version="3")
    encoder = ListingEncoder(engine, loaded.meta)
    for number, recs in enumerate(listings(engine)):
        assert len(recs) > 0
        rec_id = f"{number:032x}"
        expected = pb.RecommendResponse(
            items=scored_items(recs, engine.bundle.catalog),
            source=SOURCES[recs.source],
            model=model_ref(loaded.meta),
            recommendation_id=rec_id,
        )
        encoded = encoder.recommend(recs, SOURCES[recs.source], rec_id)
        assert pb.RecommendResponse.FromString(encoded) == expected
        # No score is zero here, so even the bytes are protobuf's own.
        assert all(score != 0.0 for score in recs.scores)
        assert encoded == expected.SerializeToString()
        # The pieces cached on the first call give the same bytes again.
        assert encoder.recommend(recs, SOURCES[recs.source], rec_id) == encoded


def test_similar_and_popular_bytes_are_the_messages_protobuf_builds(engine: Engine) -> None:
    loaded = loaded_model(engine, version="12")
    encoder = ListingEncoder(engine, loaded.meta)
    for message in (pb.SimilarItemsResponse, pb.PopularResponse):
        for recs in listings(engine):
            expected = message(
                items=scored_items(recs, engine.bundle.catalog),
                model=model_ref(loaded.meta),
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
    engine = Engine(replace(bundle, items=Vocabulary(ids), catalog=catalog))
    loaded = loaded_model(engine, version="1")
    encoder = ListingEncoder(engine, loaded.meta)
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
        model=model_ref(loaded.meta),
        recommendation_id="x",
    )
    decoded = pb.RecommendResponse.FromString(encoder.recommend(recs, pb.SOURCE_POPULAR, "x"))
    assert decoded == expected
    assert [item.item_id for item in decoded.items] == recs.item_ids
    assert decoded.items[0].item_type == "" and decoded.items[2].category == "catégorie 1"
    # An empty list: only the response's own fields.
    empty = Recommendations([], [], Source.PERSONALIZED, np.empty(0, np.int64))
    assert pb.SimilarItemsResponse.FromString(encoder.listing(empty, "")) == (
        pb.SimilarItemsResponse(model=model_ref(loaded.meta))
    )


@pytest.mark.parametrize("source", [Source.PERSONALIZED, Source.FOLD_IN, Source.POPULAR])
def test_every_source_is_written(engine: Engine, source: Source) -> None:
    recs = replace(engine.popular(2), source=source)
    loaded = loaded_model(engine)
    encoded = ListingEncoder(engine, loaded.meta).recommend(recs, SOURCES[source], "id")
    assert pb.RecommendResponse.FromString(encoded).source == SOURCES[source]
