"""A real world for the console: an MLflow registry with the toy model, a gRPC server on a
loopback port with an event store holding generated events, recorded answers, two segments
computations and a running experiment, and the console served by waitress in front of it."""

from __future__ import annotations

import contextlib
import shutil
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import mlflow
import pytest
from prometheus_client import REGISTRY, generate_latest

from affinity.segments import run_segments
from service.console.app import ConsoleConfig, create_app
from service.console.data import Api
from service.console.metrics import MetricsWindow
from service.events import Event, EventStore
from service.loader import ModelHolder, ModelLoader
from service.recorder import ResponseRecorder
from tests.service import conftest as service_fixtures
from tests.service.conftest import MODEL_NAME, client_for, register, running, settings_for

TOKEN, ADMIN = "console-read-token", "console-admin-token"
EVIL = "<script>alert(1)</script>"
"""A user id and an item id that must show as text, never run."""

artifact_dir = service_fixtures.artifact_dir
"""The toy model of the service tests (a session fixture)."""


@dataclass
class World:
    console_url: str
    grpc_port: int
    events_uri: str
    tracking_uri: str
    config: ConsoleConfig
    app: object


def _events(now: datetime) -> list[Event]:
    events: list[Event] = []
    n = 0
    for u in range(40):
        user = f"u{u:02d}"
        base = 0 if u < 30 else 20
        # Older activity for everyone; recent activity for a third of them.
        for day in (50, 40, 30, 20):
            item = f"i{base + (u + day) % 20:02d}"
            events.append(Event(f"e{n}", user, item, "view", now - timedelta(days=day)))
            n += 1
        if u % 3 == 0:
            for day in (3, 1):
                item = f"i{base + (u + day) % 20:02d}"
                events.append(Event(f"e{n}", user, item, "click", now - timedelta(days=day)))
                events.append(
                    Event(
                        f"e{n}p", user, item, "purchase", now - timedelta(days=day), price=9.5 + u
                    )
                )
                n += 1
    events.append(Event("evil-1", EVIL, "i01", "view", now - timedelta(days=2)))
    events.append(Event("evil-2", "u01", EVIL, "view", now - timedelta(days=2)))
    return events


@pytest.fixture(scope="package")
def world(
    tmp_path_factory: pytest.TempPathFactory, artifact_dir: Path, _empty_tracking_db: Path
) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("console")
    shutil.copyfile(_empty_tracking_db, tmp / "mlflow.db")
    tracking = f"sqlite:///{tmp}/mlflow.db"
    events_uri = f"sqlite:///{tmp}/events.db"
    now = datetime.now(UTC)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", tracking)
        mp.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        mp.setenv("AFFINITY_EVENTS_URI", events_uri)
        previous = mlflow.get_tracking_uri()
        mlflow.set_tracking_uri(tracking)
        try:
            exp = mlflow.create_experiment("console-tests", artifact_location=str(tmp / "art"))
            mlflow.create_experiment("affinity-segments", artifact_location=str(tmp / "seg"))
            mlflow.set_experiment(experiment_id=exp)
            register(artifact_dir)
            with EventStore.open(events_uri) as store:
                outcomes = store.append(_events(now))
                assert all(o.status == "accepted" for o in outcomes), outcomes
            for as_of in (now - timedelta(days=10), now):
                run_segments(use_events=True, store_uri=events_uri, as_of=as_of.timestamp())
            settings = settings_for(
                f"models:/{MODEL_NAME}@champion",
                tmp,
                token=TOKEN,
                admin_token=ADMIN,
                events_uri=events_uri,
                tracking_uri=tracking,
                experiment_poll_seconds=0.2,
            )
            holder = ModelHolder()
            assert ModelLoader(settings, holder).load_initial()
            with contextlib.ExitStack() as stack:
                store = stack.enter_context(EventStore.open(events_uri))
                recorder = ResponseRecorder(store, interval=0.05)
                recorder.start()
                stack.callback(recorder.stop)
                port = stack.enter_context(
                    running(settings, holder, store=store, recorder=recorder)
                )
                metrics = MetricsWindow(
                    "http://in-process/metrics",
                    fetch=lambda url: generate_latest(REGISTRY).decode(),
                )
                metrics.scrape()  # before the traffic: the window is its difference
                _traffic(port)
                metrics.scrape()
                yield _serve_console(stack, port, events_uri, tracking, metrics)
        finally:
            mlflow.set_tracking_uri(previous)


def _traffic(port: int) -> None:
    """Answers (some in an experiment) and clicks that credit them."""
    import time

    with client_for(port, token=TOKEN, timeout=30) as client:
        deadline = time.monotonic() + 30
        while client.health() != "SERVING" and time.monotonic() < deadline:
            time.sleep(0.05)
        for u in range(0, 40, 2):
            client.recommend(f"u{u:02d}", 5)
        client.start_experiment(
            "spring",
            [("control", "champion", 0.5, False), ("treatment", "champion", 0.5, False)],
            admin_token=ADMIN,
        )
        time.sleep(0.6)  # the experiment router's poll
        clicks = []
        for u in range(40):
            result = client.recommend(f"u{u:02d}", 5)
            if u % 4 == 0:
                clicks.append(
                    {
                        "event_id": f"click-{u}",
                        "user_id": f"u{u:02d}",
                        "item_id": result.items[0].item_id,
                        "event": "click",
                        "recommendation_id": result.recommendation_id,
                    }
                )
        client.log_events(clicks)
        client.recommend(EVIL, 5)
        time.sleep(0.5)  # the response recorder's flush


def _serve_console(
    stack: contextlib.ExitStack, port: int, events_uri: str, tracking: str, metrics: MetricsWindow
) -> World:
    import waitress.server

    config = ConsoleConfig(
        api=Api(f"127.0.0.1:{port}", token=TOKEN, admin_token=ADMIN, timeout=30),
        events_uri=events_uri,
        tracking_uri=tracking,
        token=TOKEN,
        admin_token=ADMIN,
        metrics=metrics,
        secure_cookies=True,
    )
    app = create_app(config)
    server = waitress.server.create_server(app, host="127.0.0.1", port=0, threads=4)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    stack.callback(config.api.close)
    stack.callback(thread.join, 5)
    stack.callback(server.close)
    return World(
        console_url=f"http://127.0.0.1:{server.effective_port}",  # type: ignore[union-attr]
        grpc_port=port,
        events_uri=events_uri,
        tracking_uri=tracking,
        config=config,
        app=app,
    )
