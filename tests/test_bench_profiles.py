"""``bench/profiles.py`` at a tiny size: the store it builds is one ``GetUserProfile`` reads (the
stored part and the events since), and it reports the latencies it measured."""

from __future__ import annotations

import json
from pathlib import Path

from bench import profiles as bench


def test_the_benchmark_builds_a_readable_store_and_reports(tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    code = bench.main(
        [
            "--users", "300", "--new-users", "20", "--lookups", "50",
            "--db", str(tmp_path / "events.db"), "--json", str(out),
        ]
    )  # fmt: skip
    assert code == 0
    result = json.loads(out.read_text())
    assert result["store"]["users"] == 300 and result["store"]["new_users"] == 20
    assert result["store"]["users_with_live_events"] == 90
    assert result["command"].startswith("python -m bench.profiles --users 300")
    for mode in ("in_process", "grpc"):
        assert 0 < result[mode]["p50_ms"] <= result[mode]["p99_ms"]


def test_a_benchmark_profile_merges_its_live_events(tmp_path: Path) -> None:
    from service.events import EventStore
    from service.profiles import merge, read_user

    path = tmp_path / "events.db"
    bench.build(path, users=50, live_share=1.0, new_users=3, seed=1)
    with EventStore.open(f"sqlite:///{path}") as store:
        stored = read_user(store, "user-0000007")
        assert stored.segment is not None and stored.events
        profile = merge("user-0000007", stored, now=stored.events[0].ts + 1)
        stored_counts = sum(stored.segment.profile["events"].values())
        assert sum(profile.events.values()) == stored_counts + len(stored.events)
        new = read_user(store, "new-0000002")
        assert new.segment is None and new.run.cuts is not None
        assert merge("new-0000002", new, now=new.events[0].ts + 1).scores != (0, 0, 0)
