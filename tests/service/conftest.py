"""Shared fixtures of the service tests: a small ALS artifact, an MLflow registry, live servers.

The synthetic world has two taste clusters: users u00-u29 use items i00-i19 (category "a"),
users u30-u59 use items i20-i39 (category "b"). Even items are "content", odd ones "product";
i39 is unavailable.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import mlflow
import numpy as np
import pytest
import scipy.sparse as sp
from threadpoolctl import threadpool_limits

from models.algorithms import get_algorithm
from models.artifact import ItemCatalog, ModelBundle, load_artifact, save_artifact
from models.ranking import RankingPipeline
from models.vocabulary import Vocabulary
from service.client import AffinityClient
from service.config import ServeSettings
from service.loader import LoadedModel, ModelHolder, ModelMeta
from service.server import create_server
from service.servicer import RecommenderServicer

N_USERS, N_ITEMS, CLUSTER_ITEMS = 60, 40, 20
MODEL_NAME = "affinity"


def cluster_of(item_id: str) -> str:
    return "a" if int(item_id[1:]) < CLUSTER_ITEMS else "b"


def build_bundle(seed: int = 0) -> ModelBundle:
    rng = np.random.default_rng(seed)
    rows, cols = [], []
    for u in range(N_USERS):
        base = 0 if u < N_USERS // 2 else CLUSTER_ITEMS
        for i in rng.choice(CLUSTER_ITEMS, size=8, replace=False):
            rows.append(u)
            cols.append(base + int(i))
    matrix = sp.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)), shape=(N_USERS, N_ITEMS))
    with threadpool_limits(1, "blas"):
        # A 200-user toy matrix: the library's regularization default is sized for real data.
        model = get_algorithm("als")(
            factors=8,
            regularization=0.01,
            alpha=1.0,
            iterations=8,
            random_state=seed,
            num_threads=1,
            calculate_training_loss=False,
        ).fit(matrix)
    item_ids = [f"i{i:02d}" for i in range(N_ITEMS)]
    available = np.ones(N_ITEMS, dtype=bool)
    available[N_ITEMS - 1] = False
    catalog = ItemCatalog(
        item_type=np.array(["content" if i % 2 == 0 else "product" for i in range(N_ITEMS)]),
        category=np.array([cluster_of(i) for i in item_ids]),
        title=np.array([f"Item {i}" for i in item_ids]),
        available=available,
    )
    popularity = np.bincount(matrix.indices, minlength=N_ITEMS).astype(np.float32)
    # Trending favours cluster "b", so it ranks differently from all-time popularity.
    trending = popularity + np.where(np.arange(N_ITEMS) >= CLUSTER_ITEMS, 100.0, 0.0)
    return ModelBundle(
        model=model,
        users=Vocabulary([f"u{u:02d}" for u in range(N_USERS)], kind="user"),
        items=Vocabulary(item_ids),
        seen=matrix,
        catalog=catalog,
        popularity=popularity,
        trending=trending.astype(np.float32),
        info={"dataset_fingerprint": f"synthetic-{seed}"},
    )


@pytest.fixture(scope="session")
def artifact_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("artifact") / "affinity-test"
    save_artifact(build_bundle(0), directory)
    return directory


@pytest.fixture(scope="session")
def pipeline(artifact_dir: Path) -> RankingPipeline:
    return RankingPipeline.from_bundle(load_artifact(artifact_dir))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def settings_for(model_uri: str | Path, tmp_path: Path, **overrides: Any) -> ServeSettings:
    values: dict[str, Any] = {
        "model_uri": str(model_uri),
        "host": "127.0.0.1",
        "port": 0,
        "workers": 1,
        "poll_seconds": 0,
        "cache_dir": tmp_path / "cache",
        "max_in_flight": 16,
    }
    values.update(overrides)
    return ServeSettings(**values)


def loaded_model(pipeline: RankingPipeline, version: str = "") -> LoadedModel:
    meta = ModelMeta(
        name="affinity-test",
        version=version,
        run_id="",
        algorithm=pipeline.model.algorithm,
        source_uri="test",
        dataset_fingerprint="synthetic-0",
    )
    return LoadedModel(pipeline, meta)


@contextlib.contextmanager
def running(settings: ServeSettings, holder: ModelHolder, **kwargs: Any) -> Iterator[int]:
    """Start a real server on a free port; yields the port and stops the server afterwards."""
    servicers: list[RecommenderServicer] = []
    given = kwargs.pop("on_servicer", None)

    def keep(servicer: RecommenderServicer) -> None:
        servicers.append(servicer)
        if given is not None:
            given(servicer)

    server, port = create_server(settings, holder, on_servicer=keep, **kwargs)
    server.start()
    try:
        yield port
    finally:
        server.stop(None).wait()
        for servicer in servicers:
            if servicer.experiments is not None:
                servicer.experiments.stop()


@contextlib.contextmanager
def client_for(port: int, **kwargs: Any) -> Iterator[AffinityClient]:
    with AffinityClient(f"127.0.0.1:{port}", **kwargs) as client:
        yield client


def status_of(call: Any) -> grpc.StatusCode:
    """The status code a client call fails with (fails the test if it succeeds)."""
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code()  # type: ignore[no-any-return, attr-defined]


class GatedPipeline(RankingPipeline):
    """A pipeline whose recommend() waits for a gate, to hold requests in flight on purpose."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gate = threading.Event()
        self.entered = threading.Semaphore(0)

    def recommend(self, *args: Any, **kwargs: Any) -> Any:
        self.entered.release()
        self.gate.wait(10)
        return super().recommend(*args, **kwargs)


@pytest.fixture
def tracking(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, _empty_tracking_db: Path
) -> Iterator[str]:
    """A fresh sqlite-backed MLflow tracking store with artifacts under ``tmp_path``."""
    shutil.copyfile(_empty_tracking_db, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.create_experiment("service-tests", artifact_location=str(tmp_path / "art"))
    mlflow.set_experiment(experiment_id=experiment)
    yield uri
    mlflow.set_tracking_uri(previous)


def register(artifact: Path, alias: str | None = "champion") -> str:
    """Register ``artifact`` as a new version of MODEL_NAME (pointing ``alias`` at it)."""
    from registry.mlflow_store import log_and_register, set_alias

    with mlflow.start_run():
        version = log_and_register(artifact, model_name=MODEL_NAME)
    if alias:
        set_alias(MODEL_NAME, alias, version.version)
    return str(version.version)
