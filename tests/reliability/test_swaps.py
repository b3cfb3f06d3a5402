"""Model swaps: promotions under load from several client processes never fail a request, every
answer comes from a recent champion, and a swapped-out model is freed at once."""

from __future__ import annotations

import gc
import time
import weakref
from collections import Counter
from pathlib import Path

import pytest

from bench.reliability import (
    MODEL_NAME,
    build_registry,
    request_loop,
    serving,
    stale_responses,
)
from models.ranking import RankingPipeline
from service.loader import ModelHolder, ModelMeta, load_directory
from tests.service.conftest import build_bundle, client_for, running, settings_for


def test_a_swapped_out_model_is_freed_without_waiting_for_the_garbage_collector(
    artifact_dir: Path, tmp_path: Path
) -> None:
    # A reference cycle would keep every old pipeline (hundreds of MB in production) until a
    # full collection, which a busy server may not run for a long time: memory would grow.
    holder = ModelHolder()
    old: list[weakref.ref[RankingPipeline]] = []
    gc.disable()
    try:
        with running(settings_for(artifact_dir, tmp_path), holder) as port, client_for(port) as c:
            for version in range(6):
                meta = ModelMeta("m", str(version), "", "", "test")
                loaded = load_directory(artifact_dir, meta)
                old.append(weakref.ref(loaded.pipeline))
                holder.swap(loaded)
                del loaded
                # Exercise the pipeline's caches (filters) before the next swap.
                assert c.recommend("u01", k=3, item_types=["content"]).model.version == str(version)
                assert c.popular(k=2, categories=["a"]).items
                assert sum(ref() is not None for ref in old) == 1
    finally:
        gc.enable()


@pytest.mark.slow
def test_promotions_under_load_from_several_processes(tmp_path: Path) -> None:
    registry = build_registry(tmp_path / "registry", [build_bundle(0), build_bundle(1)])
    poll, interval, promotions = 0.1, 0.35, 20
    users = [f"u{u:02d}" for u in range(60)] + ["someone-new"]
    with serving(
        f"models:/{MODEL_NAME}@champion",
        tmp_path,
        tracking_uri=registry.tracking_uri,
        workers=2,
        poll_seconds=poll,
    ) as server:
        timeline = [(0.0, "1")]
        with request_loop(server.target, promotions * interval + 1.5, users, 2) as results:
            time.sleep(0.5)
            for i in range(promotions):
                version = registry.versions[(i + 1) % 2]
                registry.promote(version)
                timeline.append((time.time(), version))
                time.sleep(interval)
        log = server.log_text()
    calls = [c for r in results for c in r.calls]
    codes: Counter[str] = Counter()
    for r in results:
        codes.update(r.codes)
    assert len(results) == 2 and len(calls) > 100
    assert codes == {"OK": len(calls)}  # not a single failed request
    assert {c[2] for c in calls} == {"1", "2"}
    # A worker may answer with the previous champion until its next poll has loaded the new one.
    bad, _ = stale_responses(calls, timeline, lag=poll + 1.5)
    assert bad == 0
    assert log.count("serving model") >= promotions  # both workers followed the moves
