"""Holdout evaluation: seen items excluded, hand-checked metrics, cohorts, baseline and reports."""

from __future__ import annotations

import math
from pathlib import Path
from typing import ClassVar

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from threadpoolctl import threadpool_limits

import models.ranking as ranking
from models.base import ModelConfig, ProgressCallback, Recommender
from models.errors import InvalidInputError
from models.popularity import Popularity
from models.ranking import ListKind, ListRequest, RankingPipeline
from models.ranking_metrics import per_user_metrics, relevance_matrix
from models.topk import top_k_ids, topk
from models.vocabulary import Vocabulary
from tests.training.conftest import interaction_frame
from training.confidence import ConfidenceConfig, build_matrix
from training.evaluate import (
    Holdout,
    build_holdout,
    evaluate,
    evaluate_with_baseline,
)
from training.split import random_split, temporal_split

L3 = 1.0 / math.log2(3)
DATASETS = Path(__file__).resolve().parents[2] / "../shared/datasets"


class _NoConfig(ModelConfig):
    pass


class FixedScores(Recommender):
    """Test-only model whose scores are a given (users x items) table."""

    algorithm = "fixed"
    Config: ClassVar[type[ModelConfig]] = _NoConfig

    def __init__(self, table: np.ndarray) -> None:
        super().__init__()
        self.table = np.asarray(table, dtype=np.float32)

    def _fit(self, user_items: sp.csr_matrix, progress: ProgressCallback | None) -> None:
        assert user_items.shape == self.table.shape

    def score_users(self, userids: np.ndarray, user_items: sp.csr_matrix) -> np.ndarray:
        return self.table[userids]

    def score_history(self, history: sp.csr_matrix) -> np.ndarray:
        raise NotImplementedError

    def score_similar(self, itemids: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _arrays(self) -> dict[str, np.ndarray]:
        return {"table": self.table}

    def _load_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        self.table = arrays["table"]


def _csr(rows: list[list[int]], n_items: int) -> sp.csr_matrix:
    dense = np.zeros((len(rows), n_items), dtype=np.float32)
    for u, items in enumerate(rows):
        dense[u, items] = 1.0
    return sp.csr_matrix(dense)


# 4 users x 5 items.   train          test
#   user 0             {0}            {1, 3}
#   user 1             {0, 1}         {2}
#   user 2             {}             {1}     (only in the test period: empty train row)
#   user 3             {2}            {}      (nothing held out: not evaluated)
TRAIN = _csr([[0], [0, 1], [], [2]], 5)
TEST = _csr([[1, 3], [2], [1], []], 5)
# Popularity on TRAIN scores items [2, 1, 1, 0, 0]; ties go to the lower index. At k=2, with
# training items excluded: user 0 gets [1, 2] (hit at rank 1), user 1 [2, 3] (hit at rank 1),
# user 2 [0, 1] (hit at rank 2).


def test_evaluate_popularity_on_a_hand_computed_split() -> None:
    result = evaluate(Popularity().fit(TRAIN), TRAIN, TEST, k=2)
    m = result.metrics
    assert result.users == 3
    assert m["precision_at_2"] == pytest.approx(0.5)  # one hit in two slots for everyone
    assert m["recall_at_2"] == pytest.approx((1 / 2 + 1 + 1) / 3)
    # user 0: DCG 1, ideal over min(2, 2): 1 + 1/log2 3; user 1: 1/1; user 2: (1/log2 3) / 1
    assert m["ndcg_at_2"] == pytest.approx((1 / (1 + L3) + 1 + L3) / 3)
    # AP: user 0: 1 / min(2, 2); user 1: 1 / 1; user 2: (1/2) / 1
    assert m["map_at_2"] == pytest.approx((0.5 + 1 + 0.5) / 3)
    assert m["mrr_at_2"] == pytest.approx((1 + 1 + 0.5) / 3)
    assert m["hit_rate_at_2"] == pytest.approx(1.0)
    # items listed: {1, 2} | {2, 3} | {0, 1} = 4 of 5 items
    assert m["coverage_at_2"] == pytest.approx(4 / 5)
    # popularity shares over the 3 users with training items: [2/3, 1/3, 1/3, 0, 0]; item 3 is
    # floored at 1/3. Self-information: item 0 log2(1.5), items 1, 2, 3 log2(3).
    b3, b15 = math.log2(3), math.log2(1.5)
    assert m["novelty_at_2"] == pytest.approx((b3 + b3 + (b15 + b3) / 2) / 3)


def test_training_items_are_never_recommended() -> None:
    result = evaluate(Popularity().fit(TRAIN), TRAIN, TEST, k=4)
    assert result.per_user is not None
    for row, user in zip(result.per_user.recommended, [0, 1, 2], strict=True):
        assert not set(row.tolist()) & set(TRAIN[user].indices.tolist())


def test_k_larger_than_the_catalog_pads_lists() -> None:
    result = evaluate(Popularity().fit(TRAIN), TRAIN, TEST, k=8)
    assert result.per_user is not None
    assert result.per_user.recommended.shape == (3, 8)
    # user 1 has 3 unseen items: one hit in 8 slots
    assert result.per_user.precision[1] == pytest.approx(1 / 8)


def test_batches_and_progress_do_not_change_results() -> None:
    calls: list[tuple[int, int]] = []
    whole = evaluate(Popularity().fit(TRAIN), TRAIN, TEST, k=2)
    batched = evaluate(
        Popularity().fit(TRAIN),
        TRAIN,
        TEST,
        k=2,
        batch_size=1,
        progress=lambda done, total: calls.append((done, total)),
    )
    assert batched.to_flat_dict() == whole.to_flat_dict()  # NaN (diversity) left out
    assert calls == [(1, 3), (2, 3), (3, 3)]


def _cohort_case() -> tuple[sp.csr_matrix, sp.csr_matrix, np.ndarray]:
    # training items per user: 3 (lt5), 7, 20, 5 (5to20), 25, 21 (gt20); each holds out item 39.
    sizes = [3, 7, 25, 20, 5, 21]
    train = _csr([list(range(n)) for n in sizes], 40)
    test = _csr([[39]] * len(sizes), 40)
    # the model ranks item 39 first for users 0, 2, 4 only
    table = np.tile(np.linspace(1.0, 0.0, 40, dtype=np.float32), (len(sizes), 1))
    table[[0, 2, 4], 39] = 2.0
    return train, test, table


def test_cohorts_split_users_by_training_interactions() -> None:
    train, test, table = _cohort_case()
    result = evaluate(FixedScores(table).fit(train), train, test, k=5)
    cohorts = result.cohorts
    assert {n: c.users for n, c in cohorts.items()} == {"lt5": 1, "5to20": 3, "gt20": 2}
    # lt5 = {user 0: hit}; 5to20 = {1: miss, 3: miss, 4: hit}; gt20 = {2: hit, 5: miss}
    assert cohorts["lt5"].metrics["hit_rate_at_5"] == pytest.approx(1.0)
    assert cohorts["5to20"].metrics["hit_rate_at_5"] == pytest.approx(1 / 3)
    assert cohorts["gt20"].metrics["hit_rate_at_5"] == pytest.approx(1 / 2)
    assert result.metrics["hit_rate_at_5"] == pytest.approx(3 / 6)


def test_flat_dict_names_and_empty_cohorts() -> None:
    flat = evaluate(Popularity().fit(TRAIN), TRAIN, TEST, k=10).to_flat_dict()
    assert flat["eval_users"] == 3
    assert flat["cohort_lt5_users"] == 3
    assert flat["cohort_lt5_ndcg_at_10"] == flat["ndcg_at_10"]
    # every user has < 5 training items: the other cohorts report a count but no metric
    assert flat["cohort_gt20_users"] == 0
    assert "cohort_gt20_ndcg_at_10" not in flat
    assert all(not math.isnan(v) for v in flat.values())


def test_baseline_comparison_against_an_oracle() -> None:
    # a model that scores exactly the held-out items highest must beat popularity
    oracle = FixedScores(TEST.toarray()).fit(TRAIN)
    calls: list[tuple[int, int]] = []
    both = evaluate_with_baseline(
        oracle, TRAIN, TEST, k=2, progress=lambda d, t: calls.append((d, t))
    )
    assert both.model.metrics["recall_at_2"] == pytest.approx(1.0)
    alone = evaluate(Popularity().fit(TRAIN), TRAIN, TEST, k=2)
    assert both.baseline.to_flat_dict() == alone.to_flat_dict()
    assert both.lift("ndcg_at_2") > 0
    flat = both.to_flat_dict()
    assert flat["recall_at_2"] == pytest.approx(1.0)
    assert flat["baseline_recall_at_2"] == pytest.approx(both.baseline.metrics["recall_at_2"])
    assert "baseline_cohort_lt5_users" in flat
    assert calls == [(1, 2), (2, 2)]
    model_eval, baseline_eval = both  # unpacks as (model, baseline)
    assert model_eval is both.model and baseline_eval is both.baseline
    report = both.report_markdown()
    assert report == both.model.report_markdown(baseline=both.baseline)
    assert "| ndcg_at_2 | 1.0000 |" in report
    assert "popularity (baseline)" in report
    assert "| gt20 | 0 | n/a" in report


def test_mismatched_inputs_are_rejected() -> None:
    model = Popularity().fit(TRAIN)
    with pytest.raises(InvalidInputError, match="share users and items"):
        evaluate(model, TRAIN, TEST[:, :4])
    with pytest.raises(InvalidInputError, match="fitted on"):
        evaluate(model, TRAIN[:3], TEST[:3])
    with pytest.raises(InvalidInputError, match="k must be positive"):
        evaluate(model, TRAIN, TEST, k=0)
    with pytest.raises(InvalidInputError, match="item_popularity"):
        evaluate(model, TRAIN, TEST, item_popularity=np.ones(3))


def _matrices(train: pd.DataFrame, test: pd.DataFrame) -> tuple[sp.csr_matrix, Holdout]:
    """The binary train matrix and the holdout on the train part's users and items."""
    users = Vocabulary(sorted(train["user_id"].unique()), kind="user")
    items = Vocabulary(sorted(train["item_id"].unique()))
    pairs = train.drop_duplicates(["user_id", "item_id"])
    rows = users.lookup(pairs["user_id"].tolist())
    cols = items.lookup(pairs["item_id"].tolist())
    data = np.ones(len(rows), dtype=np.float32)
    matrix = sp.csr_matrix((data, (rows, cols)), shape=(len(users), len(items)))
    return matrix, build_holdout(test.assign(weight=1.0), users, items)


@pytest.mark.realdata
@pytest.mark.slow
def test_movielens_als_beats_popularity_on_both_protocols() -> None:
    ratings = DATASETS / "ml-latest-small" / "ratings.csv"
    if not ratings.exists():
        pytest.skip("../shared/datasets not present")
    try:
        from models.algorithms import get_algorithm

        als_class = get_algorithm("als")
    except ImportError:
        pytest.skip("ALS is not available in this build")
    frame = pd.read_csv(ratings).rename(columns={"userId": "user_id", "movieId": "item_id"})
    frame["user_id"] = frame["user_id"].astype(str)
    frame["item_id"] = frame["item_id"].astype(str)
    for part in (random_split(frame, seed=1), temporal_split(frame, fraction=0.2)):
        train, test = _matrices(part.train, part.test)
        assert test.pairs_unknown_item == part.stats.cold_item_pairs > 0
        with threadpool_limits(1, "blas"):
            model = als_class(factors=32, iterations=10, random_state=0).fit(train)
            both = evaluate_with_baseline(
                model, train, test.matrix, k=10, unrankable=test.unrankable
            )
        assert both.model.users == part.stats.test_users
        # MovieLens users all rated >= 20 movies, so nobody lands in the smallest cohort
        assert both.model.cohorts["lt5"].users == 0
        assert both.lift("ndcg_at_10") > 0, part.stats.method
        assert both.model.metrics["coverage_at_10"] > both.baseline.metrics["coverage_at_10"]


def test_an_empty_holdout_gives_no_metric_but_does_not_fail() -> None:
    empty = sp.csr_matrix(TRAIN.shape, dtype=np.float32)
    result = evaluate(Popularity().fit(TRAIN), TRAIN, empty, k=3)
    assert result.users == 0
    assert result.to_flat_dict() == {
        "eval_users": 0.0,
        "cohort_lt5_users": 0.0,
        "cohort_5to20_users": 0.0,
        "cohort_gt20_users": 0.0,
    }
    assert "| ndcg_at_3 | n/a |" in result.report_markdown()


# ------------------------------------------------------------- fast top-k
def _score_tables() -> list[tuple[str, np.ndarray]]:
    rng = np.random.default_rng(7)
    real = rng.standard_normal((30, 1_000)).astype(np.float32)
    ties = rng.integers(0, 4, (30, 1_000)).astype(np.float32)  # ties at every boundary
    shared = np.broadcast_to(rng.integers(0, 40, 1_000).astype(np.float32), (30, 1_000)).copy()
    filtered = real.copy()
    filtered[rng.random(filtered.shape) < 0.97] = -np.inf  # rows with fewer than k candidates
    filtered[0] = -np.inf
    ragged = rng.standard_normal((30, 1_000 + 37)).astype(np.float32)  # a partial last block
    return [
        ("real", real),
        ("ties", ties),
        ("shared", shared),
        ("filtered", filtered),
        ("ragged", ragged),
    ]


@pytest.mark.parametrize("k", [1, 10, 15, 40])
@pytest.mark.parametrize(
    ("name", "scores"), _score_tables(), ids=lambda v: v if isinstance(v, str) else ""
)
def test_top_k_ids_returns_what_topk_returns(name: str, scores: np.ndarray, k: int) -> None:
    expected = topk(scores, k)[0]
    got = top_k_ids(scores, k)
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, expected, err_msg=name)


def test_top_k_ids_on_a_hand_built_row() -> None:
    # 300 columns: blocks of 64 plus a partial one; the best three sit in different blocks.
    row = np.zeros((1, 300), dtype=np.float32)
    row[0, [5, 130, 299, 64]] = [3.0, 5.0, 4.0, 1.0]
    np.testing.assert_array_equal(top_k_ids(row, 3), [[130, 299, 5]])
    row[0, 130] = -np.inf  # a filtered item is never returned
    np.testing.assert_array_equal(top_k_ids(row, 3), [[299, 5, 64]])


def test_evaluation_ranks_each_user_as_the_pipeline_ranks_one_request() -> None:
    rng = np.random.default_rng(3)
    n_users, n_items = 60, 700
    table = rng.integers(0, 6, (n_users, n_items)).astype(np.float32)  # many ties
    table[:, 11] = np.nan  # non-finite scores are never recommended
    train = sp.random(n_users, n_items, density=0.05, format="csr", random_state=4)
    test = sp.random(n_users, n_items, density=0.02, format="csr", random_state=5)
    model = FixedScores(table).fit(sp.csr_matrix(train))
    result = evaluate(model, train, test, k=10, batch_size=7)
    assert result.per_user is not None
    users = np.flatnonzero(np.diff(relevance_matrix(test).indptr))
    pipeline = RankingPipeline.for_training(model, sp.csr_matrix(train))
    expected = [pipeline.rank(ListRequest(ListKind.USER, 10, user=int(u))).ids for u in users]
    np.testing.assert_array_equal(result.per_user.recommended, np.array(expected))
    seen = sp.csr_matrix(train)
    for u, recs in zip(users, result.per_user.recommended, strict=True):
        assert not set(recs.tolist()) & set(seen[u].indices.tolist())
        assert 11 not in recs  # a NaN score is never recommended


def test_baseline_comparison_equals_two_separate_evaluations() -> None:
    rng = np.random.default_rng(8)
    table = rng.standard_normal((50, 300)).astype(np.float32)
    train = sp.random(50, 300, density=0.05, format="csr", random_state=1)
    test = sp.random(50, 300, density=0.03, format="csr", random_state=2)
    model = FixedScores(table).fit(sp.csr_matrix(train))
    both = evaluate_with_baseline(model, train, test, k=5)
    alone = evaluate(model, train, test, k=5)
    baseline = evaluate(Popularity().fit(sp.csr_matrix(train)), train, test, k=5)
    assert both.model.to_flat_dict() == alone.to_flat_dict()
    assert both.baseline.to_flat_dict() == baseline.to_flat_dict()


# ------------------------------------------- held-out items unseen in training
# Training: u1 {a, c}, u2 {a, b}, u3 {a}, u4 {b}; popularity ranks a (3 users) > b (2) > c (1).
# Held out: u1 {y}: an item nobody trained on, the user's only one; u2 {w} with weight 0: not
# relevant; u3 {b, z}: z unseen in training (two events, one pair); u4 {a, c}; ghost {a}: a
# user unseen in training. At k=2 popularity recommends u1 [b, -], u3 [b, c], u4 [a, c].
HELD_TRAIN = interaction_frame(
    [("u1", "a", 1), ("u1", "c", 1), ("u2", "a", 1), ("u2", "b", 1), ("u3", "a", 1), ("u4", "b", 1)]
)
HELD_TEST = interaction_frame(
    [
        ("u1", "y", 1),
        ("u2", "w", 0),
        ("u3", "b", 1),
        ("u3", "z", 1),
        ("u3", "z", 2),
        ("u4", "a", 1),
        ("u4", "c", 1),
        ("ghost", "a", 1),
    ]
)


def _held_out() -> tuple[sp.csr_matrix, Holdout]:
    train = build_matrix(HELD_TRAIN, ConfidenceConfig())
    return train.matrix, build_holdout(HELD_TEST, train.users, train.items)


def test_the_holdout_counts_known_users_items_unseen_in_training() -> None:
    _, holdout = _held_out()
    # users in vocabulary order u1..u4; items a, b, c
    np.testing.assert_array_equal(holdout.unrankable, [1, 0, 1, 0])
    assert holdout.matrix.toarray().tolist() == [[0, 0, 0], [0, 0, 0], [0, 1, 0], [1, 0, 1]]
    assert (holdout.pairs_unknown_item, holdout.items_unknown, holdout.users_unknown) == (2, 2, 1)
    assert holdout.n_pairs == 5
    np.testing.assert_array_equal(holdout.users, [0, 2, 3])  # u2's only pair is not relevant


def test_items_unseen_in_training_count_as_misses() -> None:
    train, holdout = _held_out()
    model = Popularity().fit(train)
    result = evaluate(model, train, holdout.matrix, k=2, unrankable=holdout.unrankable)
    # Per user (u1, u3, u4):
    #   recall    0 / 1,  1 / 2,  2 / 2
    #   NDCG      0,      1 / (1 + 1/log2 3) (ideal list: 2 hits),  1
    #   MAP       0,      (1/1) / min(2, 2),  (1/1 + 2/2) / 2
    #   precision 0 / 2,  1 / 2,  2 / 2 (k, whatever is held out)
    assert result.users == 3
    assert result.metrics["recall_at_2"] == pytest.approx((0 + 0.5 + 1) / 3)
    assert result.metrics["ndcg_at_2"] == pytest.approx((0 + 1 / (1 + L3) + 1) / 3)
    assert result.metrics["map_at_2"] == pytest.approx((0 + 0.5 + 1) / 3)
    assert result.metrics["precision_at_2"] == pytest.approx((0 + 0.5 + 1) / 3)
    assert result.metrics["hit_rate_at_2"] == pytest.approx(2 / 3)
    assert result.cohorts["lt5"].users == 3
    # Dropping the unseen items instead (u1 not evaluated, u3's z forgotten) flatters the model.
    dropped = evaluate(model, train, holdout.matrix, k=2).metrics
    assert dropped["recall_at_2"] == pytest.approx(1.0)
    assert dropped["ndcg_at_2"] == pytest.approx(1.0)
    assert dropped["map_at_2"] == pytest.approx(1.0)
    assert dropped["precision_at_2"] == pytest.approx(0.75)


def test_the_baseline_is_charged_the_same_misses() -> None:
    train, holdout = _held_out()
    model = Popularity().fit(train)
    both = evaluate_with_baseline(model, train, holdout.matrix, k=2, unrankable=holdout.unrankable)
    alone = evaluate(model, train, holdout.matrix, k=2, unrankable=holdout.unrankable)
    assert both.baseline.to_flat_dict() == alone.to_flat_dict()
    assert both.model.to_flat_dict() == alone.to_flat_dict()


def test_a_split_keeps_cold_items_and_the_holdout_turns_them_into_misses() -> None:
    # u1..u4 share items a..d; "solo" is u1's latest item, nobody else's.
    rows = [(f"u{u}", item, 1.0) for u in range(1, 5) for item in "abcd"] + [("u1", "solo", 1.0)]
    frame = interaction_frame(rows)
    part = temporal_split(frame, fraction=0.2)
    assert ("u1", "solo") in set(zip(part.test["user_id"], part.test["item_id"], strict=True))
    train = build_matrix(part.train, ConfidenceConfig())
    holdout = build_holdout(part.test, train.users, train.items)
    assert holdout.pairs_unknown_item == part.stats.cold_item_pairs == 1
    assert holdout.n_pairs == part.stats.test_pairs


def test_a_restricted_holdout_keeps_only_the_chosen_users() -> None:
    _, holdout = _held_out()
    kept = holdout.restrict(np.array([True, True, False, True]))
    np.testing.assert_array_equal(kept.unrankable, [1, 0, 0, 0])
    np.testing.assert_array_equal(kept.users, [0, 3])
    assert kept.n_pairs == 3


def test_bad_unrankable_counts_are_rejected() -> None:
    train, holdout = _held_out()
    model = Popularity().fit(train)
    with pytest.raises(InvalidInputError, match="one count per row"):
        evaluate(model, train, holdout.matrix, unrankable=np.array([1, 0]))
    with pytest.raises(InvalidInputError, match="negative"):
        evaluate(model, train, holdout.matrix, unrankable=np.array([1, 0, -1, 0]))
    with pytest.raises(InvalidInputError, match="integer"):
        per_user_metrics(np.array([[0]]), sp.csr_matrix((1, 3)), unrankable=np.array([0.5]))
    with pytest.raises(InvalidInputError, match="one count per row"):
        Holdout(matrix=holdout.matrix, unrankable=np.zeros(2, dtype=np.int64))


@pytest.mark.parametrize("k", [1, 10, 25])
@pytest.mark.parametrize("values", ["counts", "distinct", "non-finite", "tiny catalog"])
def test_popularity_ranking_shared_by_all_users_matches_the_masked_top_k(
    k: int, values: str
) -> None:
    """The evaluation's shortcut for a score row every user shares (popularity, trending)
    returns the array the general path returns: heavy users, ties at the k-th place (integer
    counts), unrankable items and catalogs smaller than k included."""
    rng = np.random.default_rng(11)
    n_users, n_items = 80, 8 if values == "tiny catalog" else 600
    row = {
        "counts": rng.integers(0, 12, n_items),
        "distinct": rng.permutation(n_items),
        "non-finite": np.where(rng.random(n_items) < 0.9, np.nan, rng.random(n_items)),
        "tiny catalog": rng.integers(0, 3, n_items),
    }[values].astype(np.float32)
    density = rng.random(n_users)[:, None] * 0.3  # from no training item to 30% of the catalog
    dense = (rng.random((n_users, n_items)) < density).astype(np.float32)
    dense[3] = 1.0  # a user who has every item: nothing left to recommend
    train = sp.csr_matrix(dense)
    mask = np.ones(n_items, dtype=bool)
    mask[::7] = False  # a filter: never returned either
    got = ranking._shared_ranking_ids(row, train, mask, k)
    expected, _ = ranking._masked_best(np.broadcast_to(row, (n_users, n_items)), train, mask, k)
    assert not np.isin(got, np.flatnonzero(~mask)).any()
    expected = np.pad(expected, ((0, 0), (0, k - expected.shape[1])), constant_values=-1)
    np.testing.assert_array_equal(got, expected)
    assert (got[3] == -1).all()


def test_evaluation_takes_the_shared_ranking_for_popularity(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[int] = []
    original = ranking._shared_ranking_ids

    def counting(row: np.ndarray, rows: sp.csr_matrix, mask: np.ndarray, k: int) -> np.ndarray:
        calls.append(rows.shape[0])
        return original(row, rows, mask, k)

    monkeypatch.setattr(ranking, "_shared_ranking_ids", counting)
    result = evaluate(Popularity().fit(TRAIN), TRAIN, TEST, k=2)
    assert calls == [3]  # one batch: the three users with held-out items
    assert result.metrics["precision_at_2"] == pytest.approx(0.5)  # the hand-computed value
