"""How long an audience takes: scoring a million users at 64 factors and keeping the best.

``python -m bench.audience_speed`` builds a synthetic ALS model (random float32 factors:
the cost does not depend on their values) of ``--users`` users and ``--items`` items and times,
in process with BLAS pinned to one thread as the server pins it:

- **score**: every user against a target of ``--target-items`` items
  (:func:`models.audience.score_users`: one matrix-vector product over the user factors);
- **top-N**: the best ``N`` among a candidate mask that keeps half of the users
  (:func:`models.audience.top_users`);

and, unless ``--no-rpc``, the whole ``FindAudience`` call through a real server on loopback with
a SQLite event store (scoring, the store's erasure and frequency-cap reads, ranking, and
streaming the members to the client), for ``--rpc-users`` users. Each figure is the median of
``--repeats`` runs after one warm-up run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
from threadpoolctl import threadpool_limits

from models.audience import score_users, top_users
from models.factorization import ALS


def synthetic_als(users: int, items: int, factors: int, seed: int = 0) -> ALS:
    """A fitted-looking ALS model with random factors."""
    rng = np.random.default_rng(seed)
    model = ALS(factors=factors)
    model.n_users, model.n_items = users, items
    model._set_factors(
        rng.standard_normal((users, factors), dtype=np.float32) / np.sqrt(factors),
        rng.standard_normal((items, factors), dtype=np.float32) / np.sqrt(factors),
    )
    model._fitted = True
    return model


def median_ms(run: Callable[[], object], repeats: int) -> float:
    run()  # warm-up: page in the factors, build caches
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def in_process(
    users: int, items: int, factors: int, target_items: int, sizes: Sequence[int], repeats: int
) -> list[tuple[str, float]]:
    model = synthetic_als(users, items, factors)
    seen = sp.csr_matrix((users, items), dtype=np.float32)
    target = np.arange(target_items)
    mask = np.random.default_rng(1).random(users) < 0.5
    rows: list[tuple[str, float]] = []
    with threadpool_limits(1, "blas"):
        scores = score_users(model, seen, target).scores
        rows.append(("score", median_ms(lambda: score_users(model, seen, target), repeats)))
        for n in sizes:

            def top(n: int = n) -> object:
                return top_users(scores, n, mask)

            def both(n: int = n) -> object:
                return top_users(score_users(model, seen, target).scores, n, mask)

            rows.append((f"top-{n:,}", median_ms(top, repeats)))
            rows.append((f"score + top-{n:,}", median_ms(both, repeats)))
    return rows


def over_rpc(
    users: int, items: int, factors: int, sizes: Sequence[int], repeats: int
) -> list[tuple[str, float]]:
    """``FindAudience`` end to end through a real server with a SQLite event store."""
    from models.artifact import ItemCatalog
    from models.ranking import RankingPipeline
    from models.vocabulary import Vocabulary
    from service.client import AffinityClient
    from service.config import ServeSettings
    from service.events import EventStore
    from service.loader import LoadedModel, ModelHolder, ModelMeta
    from service.server import create_server

    model = synthetic_als(users, items, factors)
    item_ids = [f"i{i}" for i in range(items)]
    pipeline = RankingPipeline(
        model,
        seen=sp.csr_matrix((users, items), dtype=np.float32),
        popularity=np.zeros(items, np.float32),
        catalog=ItemCatalog(
            item_type=np.full(items, "", dtype=object),
            category=np.array(["c" if i < 50 else "" for i in range(items)], dtype=object),
            title=np.array(item_ids, dtype=object),
            available=np.ones(items, dtype=bool),
        ),
        users=Vocabulary([f"u{u}" for u in range(users)], kind="user"),
        items=Vocabulary(item_ids),
    )
    holder = ModelHolder()
    holder.swap(LoadedModel(pipeline, ModelMeta("bench", "1", "", "als", "bench")))
    rows: list[tuple[str, float]] = []
    with tempfile.TemporaryDirectory(prefix="audience-speed-") as tmp:
        values: dict[str, object] = {
            "model_uri": str(tmp),
            "host": "127.0.0.1",
            "port": 0,
            "workers": 1,
            "poll_seconds": 0,
            "cache_dir": Path(tmp) / "cache",
            "admin_token": "bench",
        }
        settings = ServeSettings(**values)  # type: ignore[arg-type]
        store = EventStore.open(f"sqlite:///{tmp}/events.db")
        server, port = create_server(settings, holder, store=store)
        server.start()
        try:
            with AffinityClient(f"127.0.0.1:{port}", timeout=120) as client:
                targets: dict[str, dict[str, Any]] = {
                    "items": {"item_ids": ["i1", "i2", "i3"]},
                    "category": {"category": "c"},
                }
                for n in sizes:
                    for what, kwargs in targets.items():

                        def call(n: int = n, kwargs: dict[str, Any] = kwargs) -> object:
                            return list(
                                client.find_audience(max_users=n, admin_token="bench", **kwargs)
                            )

                        name = f"FindAudience {what}, {n:,} members"
                        rows.append((name, median_ms(call, repeats)))
        finally:
            server.stop(None).wait()
            store.close()
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.audience_speed", description=__doc__)
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--items", type=int, default=20_000)
    parser.add_argument("--factors", type=int, default=64)
    parser.add_argument("--target-items", type=int, default=10)
    parser.add_argument("--sizes", default="1000,100000", help="audience sizes, comma-separated")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--rpc-users", type=int, default=1_000_000)
    parser.add_argument("--rpc-sizes", default="1000,10000")
    parser.add_argument("--no-rpc", action="store_true")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    print(
        f"$ python -m bench.audience_speed {' '.join(argv if argv is not None else sys.argv[1:])}"
    )
    print(
        f"{args.users:,} users x {args.factors} factors, {args.items:,} items, "
        f"target of {args.target_items} items, half the users candidates:"
    )
    rows = in_process(args.users, args.items, args.factors, args.target_items, sizes, args.repeats)
    if not args.no_rpc:
        rpc_sizes = [int(s) for s in args.rpc_sizes.split(",") if s.strip()]
        print(f"FindAudience over loopback, {args.rpc_users:,} users, SQLite store:")
        rows += over_rpc(args.rpc_users, args.items, args.factors, rpc_sizes, args.repeats)
    print("| step | median ms |\n|---|---|")
    for name, ms in rows:
        print(f"| {name} | {ms:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
