"""The MLflow tracking server goes away (a real ``mlflow server`` on loopback, stopped) and comes
back: the service keeps serving, starts from its local cache, and follows the champion again."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest

from service.loader import ModelHolder, ModelLoader
from tests.service.conftest import (
    MODEL_NAME,
    client_for,
    free_port,
    register,
    running,
    settings_for,
)

pytestmark = pytest.mark.slow


@contextlib.contextmanager
def mlflow_server(root: Path, port: int) -> Iterator[str]:
    """A real tracking server on 127.0.0.1:``port`` over a sqlite store in ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination", str(root / "artifacts"),
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]  # fmt: skip
    with open(root / f"server-{time.monotonic_ns()}.log", "wb") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=root)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {proc.returncode}; see {root}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as reply:
                    if reply.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"mlflow server did not start; see {root}")
            time.sleep(0.25)
        yield url
    finally:
        # The CLI runs the web server as a child: stop the whole process group it leads.
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        _wait_closed(port)


def _wait_closed(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1):
                pass
        except OSError:
            return
        time.sleep(0.2)
    raise AssertionError(f"something still answers on port {port}")


def _wait_for(predicate: object, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.1)
    raise AssertionError("condition not met in time")


def test_tracking_server_down_and_back(
    artifact_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "3")
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    port = free_port()
    uri = f"models:/{MODEL_NAME}@champion"
    previous_uri = mlflow.get_tracking_uri()
    loaders: list[ModelLoader] = []
    try:
        with mlflow_server(tmp_path / "mlflow", port) as url:
            mlflow.set_tracking_uri(url)
            # Earlier tests leave another store's experiment active in MLflow's global state.
            mlflow.set_experiment("tracking-down")
            register(artifact_dir)  # version 1, champion
            settings = settings_for(uri, tmp_path, tracking_uri=url, poll_seconds=0.2)
            holder = ModelHolder()
            loader = ModelLoader(settings, holder)
            loaders.append(loader)
            assert loader.load_initial()
            loader.start_polling()
        # The tracking server is gone: the running service keeps answering with version 1.
        with running(settings, holder) as grpc_port, client_for(grpc_port) as client:
            time.sleep(1.0)  # several failed polls
            for _ in range(20):
                assert client.recommend("u05", k=3).model.version == "1"
            assert client.health() == "SERVING"

        # Start-up while it is down (stopped server; a loopback address nobody listens on).
        wrong_host = f"http://127.0.0.2:{free_port()}"
        restarted: list[ModelHolder] = []
        for tracking_uri in (url, wrong_host):
            cold = ModelHolder()
            started = time.monotonic()
            cold_settings = settings_for(uri, tmp_path, tracking_uri=tracking_uri, poll_seconds=0.2)
            cold_loader = ModelLoader(cold_settings, cold)
            loaders.append(cold_loader)
            assert cold_loader.load_initial()
            assert time.monotonic() - started < 15
            assert cold.get().meta.from_cache and cold.get().meta.version == "1"
            cold_loader.start_polling()
            restarted.append(cold)

        # The server comes back (same port and store) and version 2 becomes champion.
        with mlflow_server(tmp_path / "mlflow", port):
            register(artifact_dir)
            _wait_for(lambda: holder.get().meta.version == "2")
            _wait_for(lambda: restarted[0].get().meta.version == "2")
            assert not restarted[0].get().meta.from_cache
            # The wrong host never comes back: that server stays on its cached version.
            assert restarted[1].get().meta.version == "1"
            assert restarted[1].get().meta.from_cache
            for each in loaders:  # before the server goes: no poll left waiting on it
                each.stop()
    finally:
        for each in loaders:
            each.stop()
        mlflow.set_tracking_uri(previous_uri)
