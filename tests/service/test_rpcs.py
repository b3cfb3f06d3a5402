"""Every RPC over a real channel: answers, filters, fold-in, error codes and health."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import REGISTRY

from models.ranking import RankingPipeline
from protos.affinity.v1 import recommender_pb2 as pb
from protos.affinity.v1 import recommender_pb2_grpc as pb_grpc
from service.client import AffinityClient
from service.loader import LoadedModel, ModelHolder
from tests.service.conftest import (
    CLUSTER_ITEMS,
    GatedPipeline,
    client_for,
    cluster_of,
    loaded_model,
    running,
    settings_for,
    status_of,
)

MAX_K, MAX_IDS = 50, 5


@pytest.fixture(scope="module")
def port(
    artifact_dir: Path, pipeline: RankingPipeline, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[int]:
    holder = ModelHolder()
    holder.swap(loaded_model(pipeline, version="7"))
    settings = settings_for(
        artifact_dir, tmp_path_factory.mktemp("rpcs"), max_k=MAX_K, max_ids=MAX_IDS
    )
    with running(settings, holder) as bound:
        yield bound


@pytest.fixture
def client(port: int) -> Iterator[AffinityClient]:
    with client_for(port) as c:
        yield c


def test_recommend_known_user_gets_own_cluster_unseen_items(
    client: AffinityClient, pipeline: RankingPipeline
) -> None:
    result = client.recommend("u03", k=5)
    seen = set(pipeline.bundle.items.decode(pipeline.bundle.seen[3].indices))
    assert len(result.items) == 5
    assert result.source == "personalized"
    assert not seen & set(result.item_ids)
    assert [cluster_of(i) for i in result.item_ids].count("a") >= 4
    scores = [item.score for item in result.items]
    assert scores == sorted(scores, reverse=True)
    assert result.model.version == "7"
    assert result.model.algorithm == "als"
    uuid.UUID(hex=result.recommendation_id)


def test_items_carry_catalog_type_and_category(client: AffinityClient) -> None:
    for item in client.recommend("u40", k=10).items:
        number = int(item.item_id[1:])
        assert item.item_type == ("content" if number % 2 == 0 else "product")
        assert item.category == cluster_of(item.item_id)


def test_recommendation_ids_are_unique(client: AffinityClient) -> None:
    ids = {client.popular(k=1).recommendation_id for _ in range(5)}
    assert len(ids) == 5


def test_include_seen_returns_seen_items(client: AffinityClient, pipeline: RankingPipeline) -> None:
    seen = set(pipeline.bundle.items.decode(pipeline.bundle.seen[3].indices))
    result = client.recommend("u03", k=8, include_seen=True)
    assert seen & set(result.item_ids)


def test_unknown_user_without_history_gets_popular(client: AffinityClient) -> None:
    result = client.recommend("stranger", k=5)
    assert result.source == "popular"
    assert result.item_ids == client.popular(k=5).item_ids


def test_fold_in_moves_recommendations_toward_recent_items(client: AffinityClient) -> None:
    recent_b = [f"i{i}" for i in range(CLUSTER_ITEMS, CLUSTER_ITEMS + 4)]
    recent_a = ["i00", "i01", "i02", "i03"]
    toward_b = client.recommend("stranger", k=6, recent_item_ids=recent_b)
    toward_a = client.recommend("stranger", k=6, recent_item_ids=recent_a)
    assert toward_b.source == toward_a.source == "fold_in"
    assert [cluster_of(i) for i in toward_b.item_ids].count("b") >= 5
    assert [cluster_of(i) for i in toward_a.item_ids].count("a") >= 5
    assert not set(recent_b) & set(toward_b.item_ids)
    # A cluster-"a" user with fresh cluster-"b" activity drifts toward "b".
    before = client.recommend("u03", k=10)
    after = client.recommend("u03", k=10, recent_item_ids=[*recent_b, "i24"])
    count_b = [cluster_of(i) for i in after.item_ids].count("b")
    assert count_b > [cluster_of(i) for i in before.item_ids].count("b")


def test_filters_and_exclusions_hold(client: AffinityClient) -> None:
    result = client.recommend("u03", k=6, item_types=["product"], categories=["b"])
    assert len(result.items) == 6
    assert all(i.item_type == "product" and i.category == "b" for i in result.items)
    first = client.recommend("u03", k=3).item_ids
    again = client.recommend("u03", k=3, exclude_item_ids=first)
    assert not set(first) & set(again.item_ids)
    popular = client.popular(k=40)
    assert "i39" not in popular.item_ids  # unavailable items are never returned


def test_similar_items_exclude_queries_and_stay_in_cluster(client: AffinityClient) -> None:
    result = client.similar_items(["i22", "i24"], k=5, exclude_item_ids=["i26"])
    assert len(result.items) == 5
    assert not {"i22", "i24", "i26"} & set(result.item_ids)
    assert [cluster_of(i) for i in result.item_ids].count("b") >= 4
    only_content = client.similar_items(["i22"], k=4, item_types=["content"])
    assert {i.item_type for i in only_content.items} == {"content"}


def test_popular_and_trending_rank_differently(client: AffinityClient) -> None:
    popular = client.popular(k=5)
    trending = client.popular(k=5, trending=True)
    assert all(cluster_of(i) == "b" for i in trending.item_ids)
    assert popular.item_ids != trending.item_ids
    scores = [i.score for i in popular.items]
    assert scores == sorted(scores, reverse=True)
    in_a = client.popular(k=3, categories=["a"], exclude_item_ids=popular.item_ids)
    assert all(i.category == "a" and i.item_id not in popular.item_ids for i in in_a.items)


def test_model_info_describes_the_model(client: AffinityClient) -> None:
    info = client.model_info()
    assert (info.num_users, info.num_items) == (60, 40)
    assert info.model.version == "7"
    assert info.dataset_fingerprint == "synthetic-0"
    assert not info.from_cache
    assert info.loaded_at is not None


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda c: c.recommend("u01", k=0), "k"),
        (lambda c: c.recommend("u01", k=-3), "k"),
        (lambda c: c.recommend("u01", k=MAX_K + 1), "k"),
        (lambda c: c.popular(k=0), "k"),
        (lambda c: c.similar_items(["i01"], k=MAX_K + 1), "k"),
        (lambda c: c.similar_items([], k=3), "item_ids"),
        (lambda c: c.recommend("u01", recent_item_ids=["i01"] * (MAX_IDS + 1)), "recent_item_ids"),
        (lambda c: c.recommend("u01", exclude_item_ids=["x"] * (MAX_IDS + 1)), "exclude_item_ids"),
        (lambda c: c.similar_items(["i01"] * (MAX_IDS + 1)), "item_ids"),
        (lambda c: c.popular(categories=["a"] * (MAX_IDS + 1)), "filter.categories"),
        (lambda c: c.recommend("u01", item_types=["gadget"]), "filter.item_types"),
        (lambda c: c.popular(item_types=["gadget"]), "filter.item_types"),
    ],
)
def test_bad_input_is_invalid_argument_naming_the_field(
    client: AffinityClient, call: object, field: str
) -> None:
    with pytest.raises(grpc.RpcError) as info:
        call(client)  # type: ignore[operator]
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    assert field in info.value.details()  # type: ignore[attr-defined]


def test_similar_items_of_unknown_item_is_not_found(client: AffinityClient) -> None:
    assert status_of(lambda: client.similar_items(["nope"], k=3)) == grpc.StatusCode.NOT_FOUND


def test_requests_are_counted_by_method_code_and_source(client: AffinityClient) -> None:
    def sample(name: str, labels: dict[str, str]) -> float:
        return REGISTRY.get_sample_value(name, labels) or 0.0

    ok = {"method": "Popular", "code": "OK"}
    bad = {"method": "Popular", "code": "INVALID_ARGUMENT"}
    popular = {"method": "Popular", "source": "popular"}
    before = [
        sample("affinity_requests_total", ok),
        sample("affinity_requests_total", bad),
        sample("affinity_responses_by_source_total", popular),
        sample("affinity_request_latency_seconds_count", ok),
    ]
    client.popular(k=2)
    status_of(lambda: client.popular(k=0))
    after = [
        sample("affinity_requests_total", ok),
        sample("affinity_requests_total", bad),
        sample("affinity_responses_by_source_total", popular),
        sample("affinity_request_latency_seconds_count", ok),
    ]
    assert [a - b for a, b in zip(after, before, strict=True)] == [1, 1, 1, 1]


def test_reflection_lists_the_services(port: int) -> None:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        response = next(iter(stub.ServerReflectionInfo(iter([request]), timeout=5)))
    names = {s.name for s in response.list_services_response.service}
    assert {"affinity.v1.Recommender", "grpc.health.v1.Health"} <= names


class _BrokenPipeline(RankingPipeline):
    def popular(self, *args: object, **kwargs: object) -> object:
        raise RuntimeError("secret internal detail")


def test_unexpected_errors_are_internal_with_a_generic_message(
    pipeline: RankingPipeline, artifact_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    holder = ModelHolder()
    holder.swap(
        LoadedModel(_BrokenPipeline.from_bundle(pipeline.bundle), loaded_model(pipeline).meta)
    )
    with running(settings_for(artifact_dir, tmp_path), holder) as port, client_for(port) as c:
        with pytest.raises(grpc.RpcError) as info:
            c.popular(k=3)
        assert c.recommend("u01", k=2).items  # other methods still work
    assert info.value.code() == grpc.StatusCode.INTERNAL  # type: ignore[attr-defined]
    assert "secret" not in info.value.details()  # type: ignore[attr-defined]
    assert "secret internal detail" in caplog.text  # the traceback is logged


def test_health_and_unavailable_until_a_model_is_loaded(
    pipeline: RankingPipeline, artifact_dir: Path, tmp_path: Path
) -> None:
    holder = ModelHolder()
    with running(settings_for(artifact_dir, tmp_path), holder) as port, client_for(port) as c:
        assert c.health() == "NOT_SERVING"
        assert c.health("affinity.v1.Recommender") == "NOT_SERVING"
        assert status_of(lambda: c.recommend("u01", k=3)) == grpc.StatusCode.UNAVAILABLE
        assert status_of(c.model_info) == grpc.StatusCode.UNAVAILABLE
        holder.swap(loaded_model(pipeline, version="1"))
        assert c.health() == "SERVING"
        assert c.health("affinity.v1.Recommender") == "SERVING"
        assert c.recommend("u01", k=3).model.version == "1"


def test_expired_deadline_is_deadline_exceeded(
    pipeline: RankingPipeline, artifact_dir: Path, tmp_path: Path
) -> None:
    gated = GatedPipeline.from_bundle(pipeline.bundle)
    holder = ModelHolder()
    holder.swap(LoadedModel(gated, loaded_model(pipeline).meta))
    with (
        running(settings_for(artifact_dir, tmp_path), holder) as port,
        grpc.insecure_channel(f"127.0.0.1:{port}") as channel,
    ):
        stub = pb_grpc.RecommenderStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.Recommend(pb.RecommendRequest(user_id="u01", k=3), timeout=0.2)
        gated.gate.set()
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED  # type: ignore[attr-defined]
        health = health_pb2_grpc.HealthStub(channel)
        response = health.Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert response.status == health_pb2.HealthCheckResponse.SERVING
        assert stub.Recommend(pb.RecommendRequest(user_id="u01", k=3), timeout=5).items
