"""The approximate index of large catalogs (models/ann.py) behind the ranking pipeline.

A real faiss index over synthetic low-rank factors, with the catalog-size threshold lowered to
a few thousand items: its lists must be close to the exact search's, every filter must hold on
every list, a filter that allows too little must fall back to the exact search (never a short
list), and the index must travel in the artifact under a checksum like every file. A model
without an index must rank exactly as before. Without faiss these tests skip with the reason,
except in CI (``CI`` set), where a skipped test would hide a missing install: there they fail.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from models import ann
from models.artifact import FILES, ItemCatalog, ModelBundle, load_artifact, save_artifact
from models.errors import ArtifactError
from models.factorization import ALS
from models.ranking import ItemFilter, ListKind, ListRequest, RankingPipeline
from models.vocabulary import MISSING, Vocabulary

N_USERS = 400
N_ITEMS = 6000
DIMS = 24
RANK = 8
CATEGORIES = ("a", "b", "c", "d", "rare")


def _need_faiss() -> None:
    if not ann.faiss_available():
        if os.environ.get("CI"):
            pytest.fail("faiss is not installed in CI: .ci/run must install the ann extra")
        pytest.skip("faiss is not installed (pip install 'affinity-recommender[ann]')")


@pytest.fixture(scope="module", autouse=True)
def _faiss() -> None:
    _need_faiss()


def _factors(n: int, basis: np.ndarray, rng: np.random.Generator, spread: float) -> np.ndarray:
    """Rows in the span of ``basis`` plus a little noise, lengths spread log-normally."""
    rows = rng.standard_normal((n, len(basis))) @ basis
    rows += 0.05 * rng.standard_normal(rows.shape)
    rows *= np.exp(spread * rng.standard_normal((n, 1))) / np.linalg.norm(rows, axis=1)[:, None]
    return rows.astype(np.float32)


@pytest.fixture(scope="module")
def bundle() -> ModelBundle:
    """ALS factors of rank 8 in 24 dimensions, a catalog with unavailable items, two types and
    five categories (``rare``: 1% of the items), and 20 seen items per user."""
    rng = np.random.default_rng(5)
    basis = rng.standard_normal((RANK, DIMS))
    model = ALS.from_arrays(
        {"factors": DIMS},
        {
            "user_factors": _factors(N_USERS, basis, rng, 0.2),
            "item_factors": _factors(N_ITEMS, basis, rng, 0.2),
            "_shape": np.array([N_USERS, N_ITEMS]),
        },
    )
    rows = np.repeat(np.arange(N_USERS), 20)
    cols = rng.integers(0, N_ITEMS, size=len(rows))
    seen = sp.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)), (N_USERS, N_ITEMS))
    seen.sum_duplicates()
    category = rng.choice(np.array(CATEGORIES[:4], dtype="<U8"), size=N_ITEMS)
    category[rng.choice(N_ITEMS, size=N_ITEMS // 100, replace=False)] = "rare"
    catalog = ItemCatalog(
        item_type=rng.choice(np.array(["content", "product"]), size=N_ITEMS),
        category=category,
        title=np.full(N_ITEMS, ""),
        available=rng.random(N_ITEMS) > 0.1,
    )
    return ModelBundle(
        model=model,
        users=Vocabulary(np.array([f"u{i}" for i in range(N_USERS)])),
        items=Vocabulary(np.array([f"i{i}" for i in range(N_ITEMS)])),
        seen=seen,
        catalog=catalog,
        popularity=rng.random(N_ITEMS).astype(np.float32),
        trending=rng.random(N_ITEMS).astype(np.float32),
    )


@pytest.fixture(scope="module")
def index(bundle: ModelBundle) -> ann.ApproximateIndex:
    model = bundle.model
    assert isinstance(model, ALS)
    built, report = ann.build(model.item_factors, query_vectors=model.user_factors, seed=1)
    assert report.kind == ann.DEFAULT_KIND and report.items == N_ITEMS
    assert report.recall >= ann.TARGET_RECALL
    return built


@pytest.fixture(scope="module")
def exact(bundle: ModelBundle) -> RankingPipeline:
    return RankingPipeline.from_bundle(bundle)


@pytest.fixture(scope="module")
def approximate(bundle: ModelBundle, index: ann.ApproximateIndex) -> RankingPipeline:
    return RankingPipeline.from_bundle(_with_index(bundle, index))


def _with_index(bundle: ModelBundle, index: ann.ApproximateIndex) -> ModelBundle:
    """``bundle`` with the index's arrays, as :func:`load_artifact` gives an artifact's."""
    return ModelBundle(**{**bundle.__dict__, "ann": index.to_arrays()})


def _recall(got: np.ndarray, want: np.ndarray) -> float:
    return len(np.intersect1d(got, want)) / max(1, len(want))


def test_lists_are_close_to_the_exact_search(
    exact: RankingPipeline, approximate: RankingPipeline
) -> None:
    assert approximate._ann is not None and exact._ann is None
    recalls, same = [], 0
    for user in range(0, N_USERS, 2):
        want = exact.rank(ListRequest(ListKind.USER, 10, user=user))
        got = approximate.rank(ListRequest(ListKind.USER, 10, user=user))
        assert len(got.ids) == 10
        recalls.append(_recall(got.ids, want.ids))
        same += bool(np.array_equal(got.ids, want.ids))
        # The pool is re-ranked exactly: a shared item has the exact float32 score.
        common, at_got, at_want = np.intersect1d(got.ids, want.ids, return_indices=True)
        assert np.allclose(got.scores[at_got], want.scores[at_want], rtol=1e-5, atol=1e-6)
        assert len(common) == 0 or np.all(np.diff(got.scores) <= 0)
    assert np.mean(recalls) >= 0.95
    assert same >= 0.7 * len(recalls)


def _violations(
    pipeline: RankingPipeline,
    ids: np.ndarray,
    flt: ItemFilter,
    blocked: np.ndarray,
) -> list[str]:
    catalog = pipeline.catalog
    problems = []
    for item in ids.tolist():
        if not catalog.available[item]:
            problems.append(f"{item} unavailable")
        if flt.item_types and catalog.item_type[item] not in flt.item_types:
            problems.append(f"{item} of type {catalog.item_type[item]}")
        if flt.categories and catalog.category[item] not in flt.categories:
            problems.append(f"{item} in category {catalog.category[item]}")
        if item in blocked:
            problems.append(f"{item} excluded or seen")
    if len(set(ids.tolist())) != len(ids):
        problems.append("repeated items")
    return problems


def test_every_filter_holds_on_random_requests(
    monkeypatch: pytest.MonkeyPatch,
    bundle: ModelBundle,
    exact: RankingPipeline,
    approximate: RankingPipeline,
) -> None:
    index = approximate._ann
    assert index is not None
    answers: list[bool] = []  # per search: did the index answer (False: the exact search did)
    search = index.search

    def counted(*args: object, **kwargs: object) -> object:
        found = search(*args, **kwargs)  # type: ignore[arg-type]
        answers.append(found is not None)
        return found

    monkeypatch.setattr(index, "search", counted)
    rng = np.random.default_rng(11)
    filters = [
        ItemFilter(),
        ItemFilter.of(item_types=["product"]),
        ItemFilter.of(categories=["a"]),
        ItemFilter.of(categories=["b", "c"], item_types=["content"]),
        ItemFilter.of(categories=["rare"]),  # 1% of the catalog: searched exactly
    ]
    seen = bundle.seen
    recalls = []
    for trial in range(300):
        user = int(rng.integers(N_USERS)) if trial % 3 else MISSING
        recent = rng.choice(N_ITEMS, size=int(rng.integers(0 if user != MISSING else 1, 6)))
        exclude = rng.choice(N_ITEMS, size=int(rng.integers(0, 200)))
        flt = filters[trial % len(filters)]
        k = int(rng.choice([1, 5, 10, 30]))
        request = ListRequest(
            ListKind.USER,
            k,
            user=user,
            recent=recent.astype(np.int64),
            exclude=exclude.astype(np.int64),
            item_filter=flt,
        )
        got = approximate.rank(request)
        want = exact.rank(request)
        blocked = set(exclude.tolist()) | set(recent.tolist())
        if user != MISSING:
            blocked |= set(seen.indices[seen.indptr[user] : seen.indptr[user + 1]].tolist())
        assert not _violations(approximate, got.ids, flt, np.array(sorted(blocked)))
        assert len(got.ids) == len(want.ids) == k  # never short
        recalls.append(_recall(got.ids, want.ids))
    assert np.mean(recalls) >= 0.9
    # The index answered most lists (the rare category and tiny pools went to the exact search).
    assert 0.6 <= np.mean(answers) < 1.0


def test_a_selective_filter_falls_back_to_the_exact_search(
    exact: RankingPipeline, approximate: RankingPipeline
) -> None:
    rare = ItemFilter.of(categories=["rare"])
    share = float(approximate.candidate_mask(rare).mean())
    assert 0 < share < approximate._ann.params.min_share  # type: ignore[union-attr]
    for user in range(20):
        request = ListRequest(ListKind.USER, 10, user=user, item_filter=rare)
        got, want = approximate.rank(request), exact.rank(request)
        assert np.array_equal(got.ids, want.ids) and len(got.ids) == 10


def test_a_pool_left_short_by_exclusions_falls_back(
    exact: RankingPipeline, approximate: RankingPipeline, index: ann.ApproximateIndex
) -> None:
    # Allowed: one category (about a quarter of the items, above min_share), all of it but 12
    # items excluded: the index cannot fill its pool, the exact search answers.
    mask = approximate.candidate_mask(ItemFilter.of(categories=["a"]))
    allowed = np.flatnonzero(mask)
    exclude = allowed[12:]
    request = ListRequest(
        ListKind.USER, 10, user=3, exclude=exclude, item_filter=ItemFilter.of(categories=["a"])
    )
    got, want = approximate.rank(request), exact.rank(request)
    assert np.array_equal(got.ids, want.ids) and len(got.ids) == 10
    rows = approximate._index.rows  # type: ignore[union-attr]
    vector = approximate._vector(3, np.empty(0, np.int64))
    assert index.search(vector, 10, exclude, mask, rows) is None


def test_concurrent_searches_give_the_sequential_lists(approximate: RankingPipeline) -> None:
    requests = [ListRequest(ListKind.USER, 10, user=u) for u in range(120)]
    sequential = [approximate.rank(r).ids for r in requests]
    with ThreadPoolExecutor(8) as pool:
        concurrent = list(pool.map(lambda r: approximate.rank(r).ids, requests))
    for a, b in zip(sequential, concurrent, strict=True):
        assert np.array_equal(a, b)


def test_the_artifact_carries_the_index_under_a_checksum(
    tmp_path: Path, bundle: ModelBundle, index: ann.ApproximateIndex, approximate: RankingPipeline
) -> None:
    manifest = save_artifact(_with_index(bundle, index), tmp_path / "art")
    assert set(manifest["files"]) == {*FILES, ann.ANN_FILE}
    loaded = load_artifact(tmp_path / "art")
    assert loaded.ann is not None
    served = RankingPipeline.from_bundle(loaded)
    assert served._ann is not None and served._ann.effort == index.effort
    for user in range(30):
        request = ListRequest(ListKind.USER, 10, user=user)
        assert np.array_equal(served.rank(request).ids, approximate.rank(request).ids)

    # One flipped byte inside the serialized index: refused like any corrupted file.
    path = tmp_path / "art" / ann.ANN_FILE
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=f"checksum mismatch for {ann.ANN_FILE}"):
        load_artifact(tmp_path / "art")
    # Removed from disk but still listed: refused too.
    path.unlink()
    with pytest.raises(ArtifactError, match=f"{ann.ANN_FILE} is missing"):
        load_artifact(tmp_path / "art")


def test_a_server_can_leave_the_shipped_index_out(
    tmp_path: Path,
    bundle: ModelBundle,
    index: ann.ApproximateIndex,
    exact: RankingPipeline,
    approximate: RankingPipeline,
) -> None:
    """``AFFINITY_ANN=false`` (``affinity serve --ann false``): the artifact keeps its index, the
    worker answers from the exact search, and the lists are the exact pipeline's."""
    from service.config import ServeSettings
    from service.loader import ModelHolder, ModelLoader

    save_artifact(_with_index(bundle, index), tmp_path / "art")
    holders = {}
    for flag in ("true", "false"):
        settings = ServeSettings(model_uri=str(tmp_path / "art"), ann=flag, poll_seconds=0)
        holders[flag] = ModelHolder()
        ModelLoader(settings, holders[flag]).load_initial()
    on, off = (holders[f].get().pipeline for f in ("true", "false"))
    assert on._ann is not None and off._ann is None
    for user in range(30):
        request = ListRequest(ListKind.USER, 10, user=user)
        assert np.array_equal(off.rank(request).ids, exact.rank(request).ids)
        assert np.array_equal(on.rank(request).ids, approximate.rank(request).ids)


def test_an_unknown_extra_file_in_the_manifest_is_refused(
    tmp_path: Path, bundle: ModelBundle
) -> None:
    save_artifact(bundle, tmp_path / "art")
    manifest_path = tmp_path / "art" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["files"]["extra.npz"] = "0" * 64
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="manifest must list checksums"):
        load_artifact(tmp_path / "art")


def test_an_index_of_another_catalog_is_refused(index: ann.ApproximateIndex) -> None:
    arrays = index.to_arrays()
    with pytest.raises(ArtifactError, match="the model has"):
        ann.ApproximateIndex.from_arrays(arrays, n_items=N_ITEMS + 1, dims=DIMS)
    with pytest.raises(ArtifactError, match="layout"):
        ann.ApproximateIndex.from_arrays(
            {**arrays, "layout": np.array(ann.LAYOUT + 1)}, n_items=N_ITEMS, dims=DIMS
        )


def test_a_model_without_an_index_ranks_as_before(
    tmp_path: Path, bundle: ModelBundle, exact: RankingPipeline
) -> None:
    manifest = save_artifact(bundle, tmp_path / "art")
    assert set(manifest["files"]) == set(FILES)
    assert not (tmp_path / "art" / ann.ANN_FILE).exists()
    loaded = load_artifact(tmp_path / "art")
    assert loaded.ann is None
    pipeline = RankingPipeline.from_bundle(loaded)
    assert pipeline._ann is None
    for user in range(30):
        request = ListRequest(ListKind.USER, 10, user=user, item_filter=ItemFilter.of(["product"]))
        got, want = pipeline.rank(request), exact.rank(request)
        assert np.array_equal(got.ids, want.ids) and np.array_equal(got.scores, want.scores)


def test_without_faiss_an_index_is_searched_exactly(
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    bundle: ModelBundle,
    index: ann.ApproximateIndex,
) -> None:
    monkeypatch.setattr(ann, "faiss_available", lambda: False)
    pipeline = RankingPipeline.from_bundle(_with_index(bundle, index))
    assert pipeline._ann is None
    assert "faiss is not installed" in caplog.text


def test_ivf_indexes_work_too(bundle: ModelBundle, exact: RankingPipeline) -> None:
    model = bundle.model
    assert isinstance(model, ALS)
    built, report = ann.build(
        model.item_factors, ann.AnnParams(kind="ivf"), query_vectors=model.user_factors
    )
    assert report.params["lists"] > 1
    pipeline = RankingPipeline.from_bundle(_with_index(bundle, built))
    recalls = []
    for user in range(0, N_USERS, 4):
        request = ListRequest(ListKind.USER, 10, user=user, item_filter=ItemFilter.of(["content"]))
        got = pipeline.rank(request)
        assert not _violations(pipeline, got.ids, ItemFilter.of(["content"]), np.empty(0))
        recalls.append(_recall(got.ids, exact.rank(request).ids))
    assert np.mean(recalls) >= 0.9


def test_bad_build_options_are_refused() -> None:
    with pytest.raises(ValueError, match="kind"):
        ann.AnnParams(kind="lsh").check()  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="min_share"):
        ann.AnnParams(min_share=2.0).check()


# The model's unit vectors of an infinite row divide inf by inf (similar items, not this test).
@pytest.mark.filterwarnings("ignore:invalid value encountered in divide:RuntimeWarning")
def test_items_whose_factors_are_not_finite_are_never_returned(bundle: ModelBundle) -> None:
    model = bundle.model
    assert isinstance(model, ALS)
    factors = model.item_factors.copy()
    # The items most users would get first, broken: the index must skip them.
    broken = np.argsort(-(model.user_factors @ factors.T).mean(axis=0))[:5]
    factors[broken[:3]] = np.nan
    factors[broken[3:]] = np.inf
    damaged = ALS.from_arrays(
        {"factors": DIMS},
        {
            "user_factors": model.user_factors,
            "item_factors": factors,
            "_shape": np.array([N_USERS, N_ITEMS]),
        },
    )
    built, _ = ann.build(factors, query_vectors=model.user_factors)
    pipeline = RankingPipeline.from_bundle(
        ModelBundle(**{**bundle.__dict__, "model": damaged, "ann": built.to_arrays()})
    )
    assert pipeline._ann is not None
    for user in range(40):
        got = pipeline.rank(ListRequest(ListKind.USER, 10, user=user))
        assert len(got.ids) == 10 and not np.isin(got.ids, broken).any()
        assert np.isfinite(got.scores).all()
