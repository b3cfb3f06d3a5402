"""``GetUserProfile`` latency on a SQLite event store with a million users' segments.

The store is built directly (bulk inserts in a few transactions, not through ``affinity
segments``, which would need a log of tens of millions of rows): every user has a
``user_segments`` row with a profile of the shape :func:`affinity.segments.profiles` writes
(events by name, active days, categories, types, ten recent items), one ``segment_runs`` row holds
the configuration and cut points, a share of the users have events after the computation (the
live part of their profile), and some users have only events (new since the computation). Then
profiles of random users are looked up in-process (``service.profiles.user_profile``, what the
servicer calls) and over gRPC (a real server on loopback, one client thread), and the p50/p99
latencies are printed with the command.

    python -m bench.profiles --users 1000000
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import tiny_artifact

DAY = 86_400
EVENT_NAMES = ("view", "click", "like", "add_to_cart", "purchase")
CATEGORIES = tuple(f"cat{c}" for c in range(30))
STAGES = ("new", "activated", "active", "at_risk", "dormant", "churned", "reactivated")
TIERS = ("champions", "loyal", "new_customers", "promising", "at_risk", "hibernating", "lost")
_BATCH = 50_000


def _text(seconds: float) -> str:
    """A time as ``UTCDateTime`` keeps it on SQLite (naive UTC, microseconds)."""
    return datetime.fromtimestamp(seconds, UTC).isoformat(" ", "microseconds")[:26]


def build(path: Path, users: int, live_share: float, new_users: int, seed: int) -> dict[str, Any]:
    """The store at ``path``: ``users`` segment rows with profiles, live events for
    ``live_share`` of them (1 to 20 each) and ``new_users`` users with events only."""
    from sqlalchemy import insert

    from affinity.segments import PROFILE_VERSION
    from models.lifecycle import SegmentsConfig, rfm_cut_points
    from service.events import SEGMENT_RUNS, EventStore

    rng = np.random.default_rng(seed)
    now = time.time()
    as_of = now - 3 * DAY
    uri = f"sqlite:///{path}"
    started = time.perf_counter()
    with EventStore.open(uri) as store:  # the schema, by the migrations
        recency = rng.integers(0, 365, users)
        frequency = rng.geometric(0.4, users) - 1
        monetary = np.round(frequency * rng.gamma(2.0, 30.0, users), 2)
        cuts = rfm_cut_points(recency, frequency, monetary)
        with store.engine.begin() as conn:
            conn.execute(
                insert(SEGMENT_RUNS),
                [
                    {
                        "as_of": datetime.fromtimestamp(as_of, UTC),
                        "computed_at": datetime.fromtimestamp(now, UTC),
                        "users": users,
                        "config": SegmentsConfig().model_dump(mode="json"),
                        "cut_points": cuts.to_json(),
                    }
                ],
            )
    db = sqlite3.connect(path)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=OFF")
    as_of_text, computed_text = _text(as_of), _text(now)
    as_of_day = int(as_of // DAY)
    counts_all = rng.geometric(0.15, (users, len(EVENT_NAMES)))
    n_days_all = rng.integers(1, 25, users)
    day_offsets = rng.integers(0, 90, (users, 24))
    recent_items = rng.integers(0, 120, (users, 10))
    # Five distinct categories per user: a random start and stride over the 30 (coprime).
    cat_start = rng.integers(0, len(CATEGORIES), users)
    cat_counts = rng.integers(1, 40, (users, 5))
    type_counts = rng.integers(1, 60, (users, 2))
    scores = rng.integers(1, 6, (users, 3))
    last_all = as_of - recency * DAY - rng.integers(0, DAY, users)
    first_all = last_all - rng.integers(0, 400, users) * DAY
    for start in range(0, users, _BATCH):
        rows = []
        for u in range(start, min(start + _BATCH, users)):
            last, first = float(last_all[u]), float(first_all[u])
            days = sorted({as_of_day - d for d in day_offsets[u, : n_days_all[u]].tolist()})
            counts = dict(zip(EVENT_NAMES, counts_all[u].tolist(), strict=True))
            if not frequency[u]:
                del counts["purchase"]
            c0 = int(cat_start[u])
            profile = {
                "v": PROFILE_VERSION,
                "events": counts,
                "days": days,
                "recent": [[f"i{i}", int(last) - k * 3600] for k, i in enumerate(recent_items[u])],
                "categories": {
                    CATEGORIES[(c0 + 7 * k) % len(CATEGORIES)]: n
                    for k, n in enumerate(cat_counts[u].tolist())
                },
                "types": dict(zip(("product", "content"), type_counts[u].tolist(), strict=True)),
            }
            r, f, m = scores[u].tolist()
            rows.append(
                (
                    f"user-{u:07d}",
                    STAGES[u % len(STAGES)],
                    _text(last),
                    TIERS[u % len(TIERS)],
                    r,
                    f,
                    m,
                    int(recency[u]),
                    int(frequency[u]),
                    float(monetary[u]),
                    _text(first),
                    _text(last),
                    _text(first) if frequency[u] else None,
                    as_of_text,
                    computed_text,
                    json.dumps(profile, separators=(",", ":")),
                )
            )
        with db:
            db.executemany(
                "INSERT INTO user_segments (user_id, stage, stage_since, tier, recency_score, "
                "frequency_score, monetary_score, recency_days, frequency, monetary, "
                "first_seen, last_seen, activated_at, as_of, computed_at, profile) "
                "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                rows,
            )
    segments_s = time.perf_counter() - started
    live_users = rng.choice(users, int(users * live_share), replace=False)
    owners = [f"user-{u:07d}" for u in live_users] + [f"new-{u:07d}" for u in range(new_users)]
    per_user = rng.integers(1, 21, len(owners))
    event_rows: list[tuple[Any, ...]] = []

    def flush() -> None:
        with db:
            db.executemany(
                "INSERT INTO events (event_id, user_id, item_id, event, ts, value, price, "
                "received_at) VALUES (?,?,?,?,?,?,?,?)",
                event_rows,
            )
        event_rows.clear()

    total = int(per_user.sum())
    stamps = rng.uniform(as_of + 1, now, total)
    names = rng.choice(len(EVENT_NAMES), total, p=[0.6, 0.2, 0.08, 0.07, 0.05]).tolist()
    items = rng.integers(0, 120, total).tolist()
    prices = rng.integers(1, 100, total).tolist()
    k = 0
    for owner, n in zip(owners, per_user.tolist(), strict=True):
        for _ in range(n):
            name = EVENT_NAMES[names[k]]
            when = _text(float(stamps[k]))
            price = float(prices[k]) if name == "purchase" else None
            event_rows.append((f"ev-{k}", owner, f"i{items[k]}", name, when, 1.0, price, when))
            k += 1
        if len(event_rows) >= _BATCH:
            flush()
    events = k
    flush()
    db.execute("ANALYZE")
    db.close()
    return {
        "users": users,
        "users_with_live_events": len(live_users),
        "new_users": new_users,
        "events": events,
        "build_seconds": round(time.perf_counter() - started, 1),
        "segments_seconds": round(segments_s, 1),
        "db_mib": round(path.stat().st_size / 2**20, 1),
    }


def _percentiles(seconds: list[float]) -> dict[str, float]:
    ms = np.asarray(seconds) * 1000
    return {
        "p50_ms": round(float(np.percentile(ms, 50)), 3),
        "p99_ms": round(float(np.percentile(ms, 99)), 3),
        "mean_ms": round(float(ms.mean()), 3),
    }


def measure(path: Path, lookups: int, users: int, new_users: int, seed: int) -> dict[str, Any]:
    """p50/p99 of ``lookups`` random profiles in-process and over gRPC."""
    from models.artifact import load_artifact
    from models.ranking import RankingPipeline
    from service.client import AffinityClient
    from service.config import ServeSettings
    from service.events import EventStore, GroupCommit
    from service.loader import LoadedModel, ModelHolder, ModelMeta
    from service.profiles import user_profile
    from service.server import create_server
    from service.servicer import RecommenderServicer

    rng = np.random.default_rng(seed + 1)
    ids = [
        f"new-{int(rng.integers(0, new_users)):07d}"
        if new_users and rng.random() < 0.02
        else f"user-{int(rng.integers(0, users)):07d}"
        for _ in range(lookups)
    ]
    with tempfile.TemporaryDirectory(prefix="affinity-bench-profiles-") as tmp:
        artifact = tiny_artifact(Path(tmp) / "model")
        pipeline = RankingPipeline.from_bundle(load_artifact(artifact))
        holder = ModelHolder()
        meta = ModelMeta("bench", "1", "", "als", str(artifact), "")
        holder.swap(LoadedModel(pipeline, meta))
        results: dict[str, Any] = {}
        with EventStore.open(f"sqlite:///{path}") as store:
            servicer = RecommenderServicer(holder, events=GroupCommit(store))
            for uid in ids[:200]:  # warm: the page cache, the statement cache
                user_profile(servicer, uid)
            times = []
            for uid in ids:
                t0 = time.perf_counter()
                user_profile(servicer, uid)
                times.append(time.perf_counter() - t0)
            results["in_process"] = _percentiles(times)
            values: dict[str, Any] = {
                "model_uri": str(artifact),
                "host": "127.0.0.1",
                "port": 0,
                "workers": 1,
                "poll_seconds": 0,
                "cache_dir": Path(tmp) / "cache",
            }
            settings = ServeSettings(**values)
            server, port = create_server(settings, holder, store=store)
            server.start()
            try:
                with AffinityClient(f"127.0.0.1:{port}") as client:
                    for uid in ids[:200]:
                        client.user_profile(uid)
                    times = []
                    for uid in ids:
                        t0 = time.perf_counter()
                        client.user_profile(uid)
                        times.append(time.perf_counter() - t0)
                results["grpc"] = _percentiles(times)
            finally:
                server.stop(None).wait()
    results["lookups"] = lookups
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=1_000_000, help="users with segments")
    parser.add_argument(
        "--live-share", type=float, default=0.3, help="share of them with events since (0.3)"
    )
    parser.add_argument("--new-users", type=int, default=20_000, help="users with events only")
    parser.add_argument("--lookups", type=int, default=20_000, help="profiles looked up per mode")
    parser.add_argument("--db", type=Path, default=None, help="keep the store here (rebuilt)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="affinity-profiles-store-") as tmp:
        path = args.db or Path(tmp) / "events.db"
        if path.exists():
            path.unlink()
        store = build(path, args.users, args.live_share, args.new_users, args.seed)
        print(f"store: {json.dumps(store)}", flush=True)
        timing = measure(path, args.lookups, args.users, args.new_users, args.seed)
    command = "python -m bench.profiles " + " ".join(sys.argv[1:] if argv is None else argv)
    result = {"command": command.strip(), "store": store, **timing}
    print(json.dumps(result, indent=2))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
