"""The serving fast paths give the plain float32 answers: block top-k and batched scoring.

``top_k_row`` must return exactly what a full sort returns (ids and order, ties by item index),
and the ranking pipeline, whose "more like this" batches concurrent requests into one pass, must
answer every user with the same list as a naive per-user ``item_factors @ user`` ranking, also
under concurrency.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import numpy as np
import pytest
import scipy.sparse as sp

from models.artifact import ItemCatalog, ModelBundle
from models.batching import ScoreBatcher
from models.factorization import ALS
from models.ranking import RankingPipeline
from models.topk import NEG_INF, top_k_row, topk
from models.vocabulary import Vocabulary


@pytest.mark.parametrize("n", [500, 5_000, 20_011])
@pytest.mark.parametrize("k", [1, 10, 37])
def test_block_top_k_equals_full_partition(n: int, k: int) -> None:
    rng = np.random.default_rng(n + k)
    for trial in range(20):
        scores = rng.standard_normal(n).astype(np.float32)
        if trial % 3 == 1:  # heavy ties: few distinct values
            scores = np.round(scores, 1)
        if trial % 3 == 2:  # most items filtered out
            scores[rng.random(n) < 0.95] = NEG_INF
        ids, top = top_k_row(scores.copy(), k)
        want_ids, want_top = topk(scores[None, :], k)
        np.testing.assert_array_equal(top, want_top[0])
        # The same ids in the same order, ties at the k-th place included: a full sort by
        # (score descending, item index), where -inf items are never returned.
        np.testing.assert_array_equal(ids, want_ids[0])
        order = np.lexsort((np.arange(n), -scores))[:k]
        order = np.where(np.isneginf(scores[order]), -1, order)
        np.testing.assert_array_equal(ids, order)


def test_block_top_k_with_everything_filtered_returns_no_ids() -> None:
    ids, _ = top_k_row(np.full(10_000, NEG_INF, dtype=np.float32), 10)
    assert (ids == -1).all()


def test_batcher_answers_each_caller_with_its_own_row_under_concurrency() -> None:
    rng = np.random.default_rng(0)
    items = rng.standard_normal((3_000, 16)).astype(np.float32)
    gate = threading.Event()
    sizes: list[int] = []

    def score(vectors: list[np.ndarray]) -> list[np.ndarray]:
        gate.wait(5)  # hold the first batch so the others queue behind it
        sizes.append(len(vectors))
        return list(np.stack(vectors) @ items.T)

    batcher = ScoreBatcher(score)
    users = rng.standard_normal((24, 16)).astype(np.float32)
    results: dict[int, np.ndarray] = {}

    def call(i: int) -> None:
        results[i] = batcher(users[i])

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(users))]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 5
    while len(batcher._queue) < len(users) - 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    gate.set()
    for t in threads:
        t.join(10)
    assert sorted(results) == list(range(len(users)))
    for i, row in results.items():
        np.testing.assert_allclose(row, items @ users[i], rtol=1e-5, atol=1e-5)
    assert sum(sizes) == len(users)
    assert max(sizes) > 1  # queued requests were scored together


def test_batcher_hands_a_scoring_error_to_every_caller_of_the_batch() -> None:
    def broken(vectors: list[np.ndarray]) -> list[np.ndarray]:
        raise RuntimeError("boom")

    batcher = ScoreBatcher(broken)
    with pytest.raises(RuntimeError, match="boom"):
        batcher(np.ones(4, dtype=np.float32))
    # The batcher is not left "busy": the next call computes again instead of hanging.
    with pytest.raises(RuntimeError, match="boom"):
        batcher(np.ones(4, dtype=np.float32))


@pytest.fixture(scope="module")
def big_pipeline() -> tuple[RankingPipeline, ALS, sp.csr_matrix]:
    rng = np.random.default_rng(7)
    n_users, n_items, factors = 300, 6_000, 16
    model = ALS(factors=factors)
    model.n_users, model.n_items = n_users, n_items
    model._set_factors(
        rng.standard_normal((n_users, factors)).astype(np.float32),
        rng.standard_normal((n_items, factors)).astype(np.float32),
    )
    model._fitted = True
    seen = sp.random(n_users, n_items, density=0.003, format="csr", dtype=np.float32, rng=rng)
    seen.data[:] = 1.0
    bundle = ModelBundle(
        model=model,
        users=Vocabulary([f"u{i}" for i in range(n_users)], kind="user"),
        items=Vocabulary([f"i{i}" for i in range(n_items)], kind="item"),
        seen=seen,
        catalog=ItemCatalog.empty(n_items),
        popularity=np.zeros(n_items, np.float32),
        trending=np.zeros(n_items, np.float32),
    )
    return RankingPipeline.from_bundle(bundle), model, seen


def naive(model: ALS, seen: sp.csr_matrix, user: int, k: int) -> list[int]:
    scores = model.item_factors @ model.user_factors[user]
    scores[seen[user].indices] = -np.inf
    return [int(i) for i in np.lexsort((np.arange(len(scores)), -scores))[:k]]


def number(item_id: str) -> int:
    return int(item_id[1:])


def recall_at(k: int, got: list[int], want: list[int]) -> float:
    return len(set(got) & set(want)) / k


@pytest.mark.parametrize("threads", [1, 8])
def test_pipeline_matches_naive_float32_ranking(
    big_pipeline: tuple[RankingPipeline, ALS, sp.csr_matrix], threads: int
) -> None:
    pipeline, model, seen = big_pipeline
    got: dict[int, list[int]] = {}

    def work(users: range) -> None:
        for u in users:
            got[u] = pipeline.recommend(f"u{u}", 10).indices.tolist()

    chunks: list[Callable[[], None]] = [
        (lambda r=range(t, model.n_users, threads): work(r)) for t in range(threads)
    ]
    pool = [threading.Thread(target=c) for c in chunks]
    for t in pool:
        t.start()
    for t in pool:
        t.join(60)
    assert len(got) == model.n_users
    recalls = [recall_at(10, got[u], naive(model, seen, u, 10)) for u in range(model.n_users)]
    # Batched GEMM and per-user GEMV may round the last bit differently; only near-ties may move.
    assert np.mean(recalls) >= 0.99
    exact = np.mean([got[u] == naive(model, seen, u, 10) for u in range(model.n_users)])
    assert exact >= 0.95
    # Evaluation's batch search gives every user the very list served.
    batch = pipeline.rank_users(np.arange(model.n_users), 10)
    assert [row.tolist() for row in batch] == [got[u] for u in range(model.n_users)]


def test_single_user_fold_in_equals_the_sparse_fold_in(
    big_pipeline: tuple[RankingPipeline, ALS, sp.csr_matrix],
) -> None:
    _, model, _ = big_pipeline
    rng = np.random.default_rng(3)
    items = np.sort(rng.choice(model.n_items, size=50, replace=False))
    values = rng.uniform(0.5, 3.0, size=50).astype(np.float32)
    values[:3] = -1.0  # dislikes take the same path too
    row = sp.csr_matrix(
        (values, (np.zeros(50, np.int64), items)), shape=(1, model.n_items), dtype=np.float32
    )
    np.testing.assert_allclose(
        model.fold_in_items(items, values), model.fold_in(row)[0], rtol=1e-5, atol=1e-6
    )


def test_pipeline_fold_in_ranks_like_the_sparse_path(
    big_pipeline: tuple[RankingPipeline, ALS, sp.csr_matrix],
) -> None:
    pipeline, model, seen = big_pipeline
    recent = [f"i{i}" for i in (5, 17, 17, 400, 4000, 5999)]  # a repeat counts twice
    got = pipeline.recommend("new-user", 10, recent_item_ids=recent)
    # Each recent item weighs the median training confidence (1 here); a repeat adds up.
    weight = float(np.median(seen.data))
    items = [number(i) for i in recent]
    history = sp.csr_matrix(
        (np.full(len(items), weight, np.float32), (np.zeros(len(items), np.int64), items)),
        shape=(1, model.n_items),
    )
    assert history[0, 17] == 2 * weight
    scores = model.score_history(history)[0]
    scores[[5, 17, 400, 4000, 5999]] = -np.inf
    want = np.lexsort((np.arange(len(scores)), -scores))[:10]
    assert got.indices.tolist() == want.tolist()


def naive_similar(model: ALS, query: list[int], k: int) -> list[int]:
    unit = model.item_factors / np.linalg.norm(model.item_factors, axis=1, keepdims=True)
    scores = (unit[query] @ unit.T).mean(axis=0)
    scores[query] = -np.inf
    return [int(i) for i in np.lexsort((np.arange(len(scores)), -scores))[:k]]


@pytest.mark.parametrize("threads", [1, 8])
def test_similar_items_match_a_naive_cosine_ranking(
    big_pipeline: tuple[RankingPipeline, ALS, sp.csr_matrix], threads: int
) -> None:
    pipeline, model, _ = big_pipeline
    rng = np.random.default_rng(11)
    queries = [rng.choice(model.n_items, size=1 + i % 3, replace=False).tolist() for i in range(96)]
    got: dict[int, list[int]] = {}

    def work(start: int) -> None:
        for i in range(start, len(queries), threads):
            recs = pipeline.similar_items([f"i{q}" for q in queries[i]], 10)
            got[i] = recs.indices.tolist()

    pool = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(60)
    assert len(got) == len(queries)
    recalls = [recall_at(10, got[i], naive_similar(model, q, 10)) for i, q in enumerate(queries)]
    assert np.mean(recalls) >= 0.99
    assert all(not set(got[i]) & set(q) for i, q in enumerate(queries))  # never the query items
