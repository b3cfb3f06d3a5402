"""Model lifecycle against a real MLflow registry: alias following, hot swap, corrupt artifacts,
the on-disk cache, graceful shutdown and the in-flight limit."""

from __future__ import annotations

import logging
import shutil
import threading
import time
from pathlib import Path

import grpc
import pytest
from prometheus_client import REGISTRY

from models.errors import ArtifactError
from models.ranking import RankingPipeline
from protos.affinity.v1 import recommender_pb2 as pb
from protos.affinity.v1 import recommender_pb2_grpc as pb_grpc
from service.health import HealthServicer
from service.loader import LoadedModel, ModelHolder, ModelLoader
from service.memory import malloc_trim
from tests.service.conftest import (
    MODEL_NAME,
    GatedPipeline,
    client_for,
    free_port,
    loaded_model,
    register,
    running,
    settings_for,
    status_of,
)


def _wait_for(predicate: object, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


def _failures(stage: str) -> float:
    labels = {"stage": stage}
    return REGISTRY.get_sample_value("affinity_model_load_failures_total", labels) or 0.0


@pytest.mark.slow
def test_hot_swap_under_load_and_corrupt_version_refused(
    tracking: str, artifact_dir: Path, tmp_path: Path
) -> None:
    register(artifact_dir)
    settings = settings_for(f"models:/{MODEL_NAME}@champion", tmp_path, tracking_uri=tracking)
    holder = ModelHolder()
    loader = ModelLoader(settings, holder)
    assert loader.load_initial()
    assert holder.get().meta.version == "1"
    assert holder.get().meta.run_id

    failures: list[BaseException] = []
    versions: set[str] = set()
    stop = threading.Event()
    with running(settings, holder) as port, client_for(port) as client:

        def hammer() -> None:
            while not stop.is_set():
                try:
                    versions.add(client.recommend("u05", k=5).model.version)
                except grpc.RpcError as exc:
                    failures.append(exc)

        threads = [threading.Thread(target=hammer) for _ in range(3)]
        for t in threads:
            t.start()
        try:
            register(artifact_dir)  # version 2 becomes champion
            assert loader.refresh()
            _wait_for(lambda: "2" in versions)
        finally:
            stop.set()
            for t in threads:
                t.join()
        assert failures == []
        assert versions == {"1", "2"}
        assert client.model_info().model.version == "2"

        # Version 3 has one flipped byte: it is refused and version 2 keeps serving.
        corrupt = tmp_path / "corrupt"
        shutil.copytree(artifact_dir, corrupt)
        data = bytearray((corrupt / "model.npz").read_bytes())
        data[len(data) // 2] ^= 0xFF
        (corrupt / "model.npz").write_bytes(data)
        register(corrupt)
        before = _failures("verify")
        with pytest.raises(ArtifactError, match="checksum"):
            loader.refresh()
        assert _failures("verify") == before + 1
        assert client.recommend("u05", k=5).model.version == "2"
        assert loader.refresh()  # the refused version is not retried while the alias stays
    cached = loader.cache.last_good(loader.cache_key)
    assert cached is not None and cached[1]["version"] == "2"


def test_poller_follows_the_alias(
    tracking: str, artifact_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    register(artifact_dir)
    settings = settings_for(
        f"models:/{MODEL_NAME}@champion", tmp_path, tracking_uri=tracking, poll_seconds=0.1
    )
    holder = ModelHolder()
    loader = ModelLoader(settings, holder)
    assert loader.load_initial()
    loader.start_polling()
    caplog.set_level(logging.INFO, logger="service.memory")
    try:
        register(artifact_dir)
        _wait_for(lambda: holder.get().meta.version == "2")
        assert holder.swaps == 2
        # The tick after the swap hands the replaced model's freed memory back to the OS
        # (where the C library can: glibc's malloc_trim).
        if malloc_trim() is not None:
            _wait_for(lambda: "freed memory to the OS" in caplog.text)
    finally:
        loader.stop()
    assert caplog.text.count("freed memory to the OS") <= 1  # once per swap, not every tick


def test_restart_with_unreachable_registry_serves_the_cached_model(
    tracking: str, artifact_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    register(artifact_dir)
    uri = f"models:/{MODEL_NAME}@champion"
    first = ModelLoader(settings_for(uri, tmp_path, tracking_uri=tracking), ModelHolder())
    assert first.load_initial()

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    unreachable = f"http://127.0.0.1:{free_port()}"
    settings = settings_for(uri, tmp_path, tracking_uri=unreachable)
    holder = ModelHolder()
    with running(settings, holder) as port, client_for(port) as client:
        assert client.health() == "NOT_SERVING"
        started = time.monotonic()
        assert ModelLoader(settings, holder).load_initial()
        assert time.monotonic() - started < 10
        info = client.model_info()
        assert info.from_cache
        assert info.model.version == "1"
        assert client.health() == "SERVING"
        assert client.recommend("u05", k=3).items
    # The cache belongs to the URI: another alias does not get the champion's model.
    challenger = settings_for(
        f"models:/{MODEL_NAME}@challenger", tmp_path, tracking_uri=unreachable
    )
    assert not ModelLoader(challenger, ModelHolder()).load_initial()


def test_unreachable_registry_without_cache_stays_not_serving(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    settings = settings_for(
        f"models:/{MODEL_NAME}@champion",
        tmp_path,
        tracking_uri=f"http://127.0.0.1:{free_port()}",
    )
    holder = ModelHolder()
    assert not ModelLoader(settings, holder).load_initial()
    assert holder.current is None


def test_graceful_shutdown_finishes_in_flight_calls(
    pipeline: RankingPipeline, artifact_dir: Path, tmp_path: Path
) -> None:
    from service.server import create_server

    gated = GatedPipeline.from_bundle(pipeline.bundle)
    holder = ModelHolder()
    holder.swap(LoadedModel(gated, loaded_model(pipeline).meta))
    health_servicer = HealthServicer()
    server, port = create_server(
        settings_for(artifact_dir, tmp_path), holder, health_servicer=health_servicer
    )
    server.start()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel, client_for(port) as probe:
        stub = pb_grpc.RecommenderStub(channel)
        pending = stub.Recommend.future(pb.RecommendRequest(user_id="u01", k=3), timeout=10)
        assert gated.entered.acquire(timeout=5)
        # What serve() does on SIGTERM: report NOT_SERVING, then stop with a grace period.
        health_servicer.enter_graceful_shutdown()
        assert probe.health() == "NOT_SERVING"
        stopped = server.stop(grace=5)
        time.sleep(0.2)
        with pytest.raises(grpc.RpcError) as refused:
            stub.Popular(pb.PopularRequest(k=2), timeout=2)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
        gated.gate.set()
        assert len(pending.result(timeout=10).items) == 3
        assert stopped.wait(timeout=10)


def test_requests_past_the_in_flight_limit_are_resource_exhausted(
    pipeline: RankingPipeline, artifact_dir: Path, tmp_path: Path
) -> None:
    gated = GatedPipeline.from_bundle(pipeline.bundle)
    holder = ModelHolder()
    holder.swap(LoadedModel(gated, loaded_model(pipeline).meta))
    settings = settings_for(artifact_dir, tmp_path, max_in_flight=2)
    with running(settings, holder) as port, client_for(port) as client:
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        stub = pb_grpc.RecommenderStub(channel)
        held = [
            stub.Recommend.future(pb.RecommendRequest(user_id="u01", k=3), timeout=10)
            for _ in range(2)
        ]
        assert gated.entered.acquire(timeout=5) and gated.entered.acquire(timeout=5)
        started = time.monotonic()
        code = status_of(lambda: client.popular(k=3))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert time.monotonic() - started < 1.0  # refused at once, not queued
        assert client.health() == "SERVING"  # probes are not limited
        gated.gate.set()
        assert all(len(f.result(timeout=10).items) == 3 for f in held)
        assert client.popular(k=3).items  # capacity is back
        channel.close()
