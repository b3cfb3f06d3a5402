"""Approximate top-k inner-product search for large catalogs, re-ranked exactly.

Above a catalog size (``affinity train --ann-min-items``) training builds a faiss index over a
factor model's item vectors and ships it in the artifact (``ann.npz``: the index serialized to
a ``uint8`` array, no pickle, checksummed like every file). The ranking pipeline asks it for a
pool of candidates, re-ranks the pool exactly with the float32 item factors and falls back to
the exact search (:class:`models.search.NormOrderedIndex`) whenever the approximate answer could
be short: a filter that allows too small a share of the catalog, or a pool that leaves fewer
than the requested items after the filters. Filters are applied inside faiss (an id selector)
and checked again on the pool, so no list ever holds an item a filter removes.

Two kinds, chosen by measurement (``docs/benchmarks.md``, "Approximate search"): ``hnsw``, a
graph over the raw vectors searched by inner product, and ``ivf``, clusters that route the
search. Clusters of raw vectors route inner products badly (the longest centroids win every
query), so ``ivf`` searches nearest neighbours instead: each item vector ``v`` gets one more
coordinate ``sqrt(M² - |v|²)`` (``M`` the largest item norm) and each query a zero there, so the
squared distance ``|u|² + M² - 2 u·v`` orders items as ``u·v`` does. The same trick makes the
graph worse (the extra coordinate dominates short vectors and crowds them together), so the
graph keeps the raw vectors.

faiss is optional (``pip install 'affinity-recommender[ann]'``) and imported only here, lazily:
without it a model with an index is searched exactly, as every model without one is.
"""

from __future__ import annotations

import importlib
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from .errors import ArtifactError, InvalidInputError
from .topk import NEG_INF

logger = logging.getLogger(__name__)

ANN_FILE = "ann.npz"
"""The artifact file that holds the approximate index, when the model has one."""
LAYOUT = 1
"""Version of the arrays in :data:`ANN_FILE`; another version is refused at load."""
Kind = Literal["hnsw", "ivf"]
KINDS: tuple[str, ...] = ("hnsw", "ivf")
Storage = Literal["flat", "sq8"]
STORAGES: tuple[str, ...] = ("flat", "sq8")
DEFAULT_KIND: Kind = "hnsw"
"""The index training builds: the only kind faster than the exact search at the recall asked
for, on 1M items (``docs/benchmarks.md``, "Approximate search for large catalogs")."""
MIN_ITEMS = 1_000_000
"""Default catalog size from which training builds the index (``--ann-min-items``). The exact
search scans a share of the catalog, so its cost grows with it; on the serving benchmark's
200,000 items it answers in well under a millisecond, and an index would only add its build
time and about 530 bytes an item. At a million items the index answered 5.5 times as many
lists per second as the exact search, at recall 0.968 (``docs/benchmarks.md``, "Approximate
search for large catalogs")."""
AUGMENTED = {"hnsw": False, "ivf": True}
"""Whether an index kind searches the vectors with the extra coordinate (nearest neighbours)
or the raw vectors (inner products): what measured better for each (see the module docstring)."""
LADDER_HNSW = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
"""Search efforts :func:`build` tries in turn: HNSW's ``efSearch``..."""
LADDER_IVF = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
"""... and IVF's ``nprobe``."""
KEPT_FILTERS = 32
"""Filters whose id selectors an index keeps (each holds a bit per item and its mask)."""
TARGET_RECALL = 0.96
"""Recall@k against the exact search that training tunes the search effort for."""


def faiss_module() -> Any:
    """The faiss module, or :class:`ImportError` with what to install.

    Typed ``Any``: faiss ships stubs that do not cover its SWIG keyword arguments, and the
    module may be absent where the type checker runs."""
    try:
        return importlib.import_module("faiss")
    except ImportError as exc:
        raise ImportError(
            "approximate search needs faiss: pip install 'affinity-recommender[ann]' (faiss-cpu)"
        ) from exc


def faiss_available() -> bool:
    """Whether faiss can be imported here."""
    try:
        faiss_module()
    except ImportError:
        return False
    return True


@dataclass(frozen=True)
class AnnParams:
    """How the index is built and searched; recorded in the manifest and in MLflow."""

    kind: Kind = DEFAULT_KIND
    """``hnsw`` (a graph, faiss ``IndexHNSWFlat``) or ``ivf`` (clusters, ``IndexIVFFlat`` or
    ``IndexIVFScalarQuantizer`` by :attr:`storage`)."""
    graph_degree: int = 32
    """HNSW: links per node (``M``); memory grows by about ``8 * graph_degree`` bytes an item."""
    build_effort: int = 64
    """HNSW: candidate list while inserting (``efConstruction``)."""
    lists: int = 0
    """IVF: number of clusters; 0 picks about ``4 * sqrt(items)``."""
    storage: Storage = "sq8"
    """IVF: how item vectors are kept, ``flat`` (float32) or ``sq8`` (one byte a coordinate,
    a quarter of the memory): the pool is re-ranked with the exact factors either way."""
    effort: int = 0
    """Search effort: HNSW ``efSearch`` or IVF ``nprobe``; 0 lets :func:`build` tune it to
    :data:`TARGET_RECALL` on sampled queries."""
    pool_factor: int = 4
    """Candidates asked of the index per item requested, re-ranked exactly."""
    min_share: float = 0.05
    """A filter that allows less than this share of the catalog is searched exactly."""

    def check(self) -> None:
        """Raise :class:`InvalidInputError` naming the first bad field."""
        if self.kind not in KINDS:
            raise InvalidInputError(
                f"ann kind must be one of {', '.join(KINDS)}, got {self.kind!r}", field="kind"
            )
        if self.storage not in STORAGES:
            raise InvalidInputError(
                f"ann storage must be one of {', '.join(STORAGES)}, got {self.storage!r}",
                field="storage",
            )
        for name in ("graph_degree", "build_effort", "pool_factor"):
            if getattr(self, name) < 1:
                raise InvalidInputError(f"ann {name} must be >= 1", field=name)
        for name in ("lists", "effort"):
            if getattr(self, name) < 0:
                raise InvalidInputError(f"ann {name} must be >= 0", field=name)
        if not 0.0 <= self.min_share <= 1.0:
            raise InvalidInputError("ann min_share must be in [0, 1]", field="min_share")


@dataclass(frozen=True)
class BuildReport:
    """What :func:`build` measured: the manifest's ``info["ann"]`` and the MLflow figures."""

    kind: str
    effort: int
    params: dict[str, Any]
    items: int
    build_seconds: float
    tune_seconds: float
    recall: float
    """Recall@10 of the tuned effort on the sampled queries (NaN when not tuned)."""

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "effort": self.effort,
            "params": self.params,
            "items": self.items,
            "build_seconds": round(self.build_seconds, 3),
            "tune_seconds": round(self.tune_seconds, 3),
            "recall_at_10": None if np.isnan(self.recall) else round(self.recall, 4),
        }


def _indexed(factors: np.ndarray, augmented: bool, chunk: int = 1 << 16) -> np.ndarray:
    """The rows an index holds: the item factors, with ``augmented`` the extra coordinate
    ``sqrt(M² - |v|²)`` too (see the module docstring); rows that are not finite become zero
    vectors (they are never returned anyway)."""
    n, f = factors.shape
    top = _max_norm(factors) if augmented else 0.0
    out = np.zeros((n, f + int(augmented)), dtype=np.float32)
    for start in range(0, n, chunk):
        rows = np.asarray(factors[start : start + chunk], dtype=np.float32)
        rows = np.where(np.isfinite(rows).all(axis=1, keepdims=True), rows, 0.0)
        sq = np.einsum("ij,ij->i", rows.astype(np.float64), rows.astype(np.float64))
        out[start : start + len(rows), :f] = rows
        if augmented:
            out[start : start + len(rows), f] = np.sqrt(np.maximum(top * top - sq, 0.0))
    return out


def _max_norm(factors: np.ndarray, chunk: int = 1 << 16) -> float:
    top = 0.0
    for start in range(0, len(factors), chunk):
        rows = np.asarray(factors[start : start + chunk], dtype=np.float64)
        sq = np.einsum("ij,ij->i", rows, rows)
        sq = sq[np.isfinite(sq)]
        if len(sq):
            top = max(top, float(np.sqrt(sq.max())))
    return top


class ApproximateIndex:
    """A faiss index over item vectors, searched for candidates that are then ranked exactly.

    Thread-safe: faiss searches concurrently without locks and releases the GIL while it
    searches; each calling thread runs its searches on one OpenMP thread (see :meth:`_pin`).
    """

    def __init__(self, index: Any, kind: str, effort: int, params: AnnParams) -> None:
        self._faiss = faiss_module()
        self.index = index
        self.kind = kind
        self.effort = int(effort)
        self.params = params
        self.n_items = int(index.ntotal)
        self.augmented = AUGMENTED[kind]
        self.dims = int(index.d) - int(self.augmented)
        self._local = threading.local()
        self._filters: dict[int, tuple[np.ndarray, _Filter]] = {}

    # ------------------------------------------------------------ persistence
    def to_arrays(self) -> dict[str, np.ndarray]:
        """The index as arrays for ``ann.npz`` (the faiss index as one ``uint8`` array)."""
        p = self.params
        return {
            "layout": np.array(LAYOUT, dtype=np.int64),
            "kind": np.array(self.kind),
            "index": self._faiss.serialize_index(self.index),
            "effort": np.array(self.effort, dtype=np.int64),
            "pool_factor": np.array(p.pool_factor, dtype=np.int64),
            "min_share": np.array(p.min_share, dtype=np.float64),
        }

    @classmethod
    def from_arrays(
        cls, arrays: Mapping[str, np.ndarray], *, n_items: int, dims: int
    ) -> ApproximateIndex:
        """The index of :meth:`to_arrays`; :class:`ArtifactError` unless it covers ``n_items``
        vectors of ``dims`` factors. The bytes must come from a verified artifact: faiss does
        not defend itself against a crafted index (the checksums do)."""
        faiss = faiss_module()
        try:
            layout = int(arrays["layout"])
            kind = str(arrays["kind"])
            data = np.ascontiguousarray(arrays["index"], dtype=np.uint8)
            effort = int(arrays["effort"])
            params = AnnParams(
                kind=kind,  # type: ignore[arg-type]
                pool_factor=int(arrays["pool_factor"]),
                min_share=float(arrays["min_share"]),
            )
        except KeyError as exc:
            raise ArtifactError(f"{ANN_FILE} lacks array {exc.args[0]!r}") from None
        except (TypeError, ValueError) as exc:
            raise ArtifactError(f"{ANN_FILE} is invalid: {exc}") from exc
        if layout != LAYOUT:
            raise ArtifactError(f"{ANN_FILE} has layout {layout}; this build reads {LAYOUT}")
        try:
            params.check()
        except InvalidInputError as exc:
            raise ArtifactError(f"{ANN_FILE} is invalid: {exc}") from exc
        if data.ndim != 1 or not len(data):
            raise ArtifactError(f"{ANN_FILE} holds no index")
        try:
            index = faiss.deserialize_index(data)
        except Exception as exc:  # faiss raises RuntimeError with its own message
            raise ArtifactError(f"{ANN_FILE} cannot be read by faiss: {exc}") from exc
        width = dims + int(AUGMENTED[kind])
        if int(index.ntotal) != n_items or int(index.d) != width:
            raise ArtifactError(
                f"{ANN_FILE} indexes {int(index.ntotal)} vectors of {int(index.d)} coordinates; "
                f"the model has {n_items} items of {dims} factors ({width} for a {kind} index)"
            )
        return cls(index, kind, effort, params)

    # ----------------------------------------------------------------- search
    def _pin(self) -> None:
        """One OpenMP thread for this thread's searches. libgomp keeps the setting per calling
        thread, and threadpoolctl (which the server uses for BLAS) only limits libraries loaded
        when it runs: faiss loads with the model, later, so each request thread sets it once."""
        if not getattr(self._local, "pinned", False):
            self._faiss.omp_set_num_threads(1)
            self._local.pinned = True

    def _search_params(self, effort: int, selector: Any) -> Any:
        faiss = self._faiss
        if self.kind == "hnsw":
            return faiss.SearchParametersHNSW(efSearch=int(effort), sel=selector)
        return faiss.SearchParametersIVF(nprobe=int(effort), sel=selector)

    def _filter(self, mask: np.ndarray | None, keep: bool = True) -> _Filter | None:
        """The id selector and allowed share of ``mask`` (True: allowed). With ``keep`` it is
        kept per mask object (the pipeline hands the same cached mask for the same filter); a
        mask made for one request is converted and forgotten."""
        if mask is None:
            return None
        if not keep:
            return _Filter(self._faiss, mask)
        key = id(mask)
        held = self._filters.get(key)
        if held is not None and held[0] is mask:
            return held[1]
        made = _Filter(self._faiss, mask)
        if len(self._filters) >= KEPT_FILTERS:
            self._filters.clear()
        self._filters[key] = (mask, made)  # holds the mask, so its id stays its own
        return made

    def candidates(
        self,
        vector: np.ndarray,
        pool: int,
        blocked: np.ndarray,
        flt: _Filter | None = None,
        effort: int | None = None,
    ) -> np.ndarray:
        """Up to ``pool`` item ids the index finds nearest to ``vector`` among the items that
        ``flt`` allows (None: all) and that are not ``blocked``, in no useful order."""
        self._pin()
        faiss = self._faiss
        keep: list[Any] = []  # selectors faiss points into must outlive the search
        selector = None if flt is None else flt.selector
        if len(blocked):
            ids = np.ascontiguousarray(blocked, dtype=np.int64)  # repeats are harmless
            batch = faiss.IDSelectorBatch(len(ids), faiss.swig_ptr(ids))
            others = faiss.IDSelectorNot(batch)
            keep += [ids, batch, others]
            selector = others if selector is None else faiss.IDSelectorAnd(selector, others)
        keep.append(selector)
        query = np.zeros((1, self.dims + int(self.augmented)), dtype=np.float32)
        query[0, : self.dims] = vector
        work = self.effort if effort is None else effort
        if flt is not None and flt.share < 1.0:
            # A filter's best items lie deeper in the unfiltered order: a search meets about
            # `share` of the items it looks at that pass, so it looks further in proportion.
            work = int(np.ceil(work / max(flt.share, self.params.min_share, 1e-3)))
        if self.kind == "hnsw":
            work = max(work, pool)  # the graph walk's candidate list must hold the pool
        _, found = self.index.search(query, pool, params=self._search_params(work, selector))
        del keep
        found = found[0]
        return found[found >= 0]

    def search(
        self,
        vector: np.ndarray,
        n: int,
        blocked: np.ndarray,
        mask: np.ndarray | None,
        rows: Callable[[np.ndarray], np.ndarray],
        unusable: np.ndarray | None = None,
        *,
        keep: bool = True,
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """The best ``n`` items for ``vector`` by exact float32 score among the index's
        candidates, best first (equal scores by lowest id), or None where the exact search must
        answer instead: a filter allowing less than ``min_share`` of the catalog, a pool that
        holds fewer than ``n`` allowed items, or a query that is not finite.

        ``blocked`` are item ids never to return, ``mask`` the filter (True: allowed; None:
        every item), ``rows(ids)`` the exact float32 factor rows that score the pool and
        ``unusable`` item ids never to return either (items whose factors are not finite);
        ``keep``: whether ``mask`` is kept by its maker (see :meth:`_filter`)."""
        if n <= 0 or n > self.n_items:
            return None
        flt = self._filter(mask, keep)
        if flt is not None and flt.share < self.params.min_share:
            return None
        vector = np.asarray(vector, dtype=np.float32)
        if not np.isfinite(vector).all():
            return None
        if unusable is not None and len(unusable):
            blocked = np.concatenate([blocked, unusable]) if len(blocked) else unusable
        pool = min(self.n_items, max(n * self.params.pool_factor, n + 10))
        ids = self.candidates(vector, pool, blocked, flt)
        # The selector already left these out; checked again so that no list can hold one.
        if mask is not None and len(ids):
            ids = ids[mask[ids]]
        if len(blocked) and len(ids):
            ordered = np.sort(blocked)
            at = np.minimum(np.searchsorted(ordered, ids), len(ordered) - 1)
            ids = ids[ordered[at] != ids]
        if len(ids) < n:
            return None
        scores = np.asarray(rows(ids) @ vector, dtype=np.float32)
        order = np.lexsort((ids, -scores))[:n]
        ids, scores = ids[order], scores[order]
        if not len(scores) or not scores[-1] > NEG_INF:
            return None
        return ids.astype(np.int64), scores


class _Filter:
    """A filter mask as a faiss id selector (a bitmap, one bit per item) and its allowed share."""

    def __init__(self, faiss: Any, mask: np.ndarray) -> None:
        mask = np.asarray(mask, dtype=bool)
        self.share = float(np.count_nonzero(mask)) / max(1, len(mask))
        self.bits = np.packbits(mask, bitorder="little")
        self.selector: Any = None  # None: every item passes, no selector to consult
        if self.share < 1.0:
            self.selector = faiss.IDSelectorBitmap(len(mask), faiss.swig_ptr(self.bits))


def _sample_queries(query_vectors: np.ndarray | None, items: np.ndarray, n: int, seed: int):
    rng = np.random.default_rng(seed)
    source = query_vectors if query_vectors is not None and len(query_vectors) else items
    pick = rng.choice(len(source), size=min(n, len(source)), replace=False)
    queries = np.asarray(source[np.sort(pick)], dtype=np.float32)
    return queries[np.isfinite(queries).all(axis=1)]


def _exact_top(items: np.ndarray, queries: np.ndarray, k: int, chunk: int = 1 << 18):
    """Exact top ``k`` ids of each query by float32 inner product (a chunk of items at a
    time, so no queries x catalog matrix is held)."""
    best_ids = np.full((len(queries), 0), -1, dtype=np.int64)
    best = np.full((len(queries), 0), NEG_INF, dtype=np.float32)
    for start in range(0, len(items), chunk):
        part = np.asarray(items[start : start + chunk], dtype=np.float32)
        part = np.where(np.isfinite(part).all(axis=1, keepdims=True), part, 0.0)
        scores = queries @ part.T
        ids = np.broadcast_to(np.arange(start, start + len(part)), scores.shape)
        scores = np.concatenate([best, scores], axis=1)
        ids = np.concatenate([best_ids, ids], axis=1)
        top = np.argpartition(-scores, min(k, scores.shape[1] - 1), axis=1)[:, :k]
        best = np.take_along_axis(scores, top, axis=1)
        best_ids = np.take_along_axis(ids, top, axis=1)
    return best_ids


def _recall(index: ApproximateIndex, items: np.ndarray, queries, truth, k: int, effort: int):
    hits = 0
    pool = max(k * index.params.pool_factor, k + 10)
    empty = np.empty(0, dtype=np.int64)
    for query, true in zip(queries, truth, strict=True):
        ids = index.candidates(query, pool, empty, effort=effort)
        if len(ids):
            scores = np.asarray(items[ids], dtype=np.float32) @ query
            ids = ids[np.argsort(-scores, kind="stable")[:k]]
        hits += len(np.intersect1d(ids, true))
    return hits / max(1, truth.size)


def build(
    item_factors: np.ndarray,
    params: AnnParams | None = None,
    *,
    query_vectors: np.ndarray | None = None,
    threads: int = 0,
    seed: int = 0,
    tune_queries: int = 200,
) -> tuple[ApproximateIndex, BuildReport]:
    """Build the index over ``item_factors`` (ids are row numbers) and, unless
    ``params.effort`` is set, tune the search effort: the smallest of a ladder of efforts whose
    recall@10 (after the exact re-ranking) on ``tune_queries`` sampled ``query_vectors``
    (trained users' vectors; item vectors when None) reaches :data:`TARGET_RECALL`.

    ``threads``: OpenMP threads for building (0: one per core)."""
    params = params or AnnParams()
    params.check()
    faiss = faiss_module()
    items = np.asarray(item_factors, dtype=np.float32)
    n, f = items.shape
    if n == 0 or f == 0:
        raise InvalidInputError("an approximate index needs at least one item and one factor")
    # OpenMP threads are a per-thread setting: this thread's searches may have pinned it to one.
    previous = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(int(threads or os.cpu_count() or 1))
    try:
        approx, report = _build(faiss, items, params, query_vectors, seed, tune_queries)
    finally:
        faiss.omp_set_num_threads(previous)
    logger.info(
        "approximate index (%s) over %d items: %.1f s, effort %d, recall@10 %.3f",
        params.kind,
        n,
        report.build_seconds,
        report.effort,
        report.recall,
    )
    return approx, report


def _build(
    faiss: Any,
    items: np.ndarray,
    params: AnnParams,
    query_vectors: np.ndarray | None,
    seed: int,
    tune_queries: int,
) -> tuple[ApproximateIndex, BuildReport]:
    n, f = items.shape
    started = time.perf_counter()
    data = _indexed(items, AUGMENTED[params.kind])
    used: dict[str, Any]
    if params.kind == "hnsw":
        if AUGMENTED["hnsw"]:
            index = faiss.IndexHNSWFlat(f + 1, params.graph_degree, faiss.METRIC_L2)
        else:
            index = faiss.IndexHNSWFlat(f, params.graph_degree, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = params.build_effort
        index.add(data)
        used = {"graph_degree": params.graph_degree, "build_effort": params.build_effort}
        ladder = list(LADDER_HNSW)
    else:
        lists = params.lists or int(min(max(1, n // 39), max(1, round(4 * np.sqrt(n)))))
        quantizer = faiss.IndexFlatL2(f + 1)
        if params.storage == "sq8":
            sq8 = faiss.ScalarQuantizer.QT_8bit
            index = faiss.IndexIVFScalarQuantizer(quantizer, f + 1, lists, sq8, faiss.METRIC_L2)
        else:
            index = faiss.IndexIVFFlat(quantizer, f + 1, lists, faiss.METRIC_L2)
        rng = np.random.default_rng(seed)
        # k-means needs some dozens of points per cluster, not the whole catalog.
        train = data[np.sort(rng.choice(n, size=min(n, lists * 64), replace=False))]
        index.train(train)
        index.add(data)
        used = {"lists": lists, "storage": params.storage}
        ladder = [p for p in LADDER_IVF if p <= lists]
        ladder = ladder or [lists]
    del data
    build_seconds = time.perf_counter() - started
    approx = ApproximateIndex(index, params.kind, params.effort or ladder[-1], params)
    started = time.perf_counter()
    recall = float("nan")
    effort = params.effort
    if not effort:
        queries = _sample_queries(query_vectors, items, tune_queries, seed)
        k = min(10, n)
        truth = _exact_top(items, queries, k)
        effort = ladder[-1]
        for step in ladder:
            recall = _recall(approx, items, queries, truth, k, step)
            if recall >= TARGET_RECALL:
                effort = step
                break
        approx = ApproximateIndex(index, params.kind, effort, params)
    tune_seconds = time.perf_counter() - started
    report = BuildReport(
        kind=params.kind,
        effort=effort,
        params={**used, "pool_factor": params.pool_factor, "min_share": params.min_share},
        items=n,
        build_seconds=build_seconds,
        tune_seconds=tune_seconds,
        recall=recall,
    )
    return approx, report


def load_approximate_index(
    arrays: Mapping[str, np.ndarray], shape: tuple[int, ...]
) -> ApproximateIndex | None:
    """The index of an artifact's ``ann.npz`` for item factors of ``shape``, or None (with a
    warning) where faiss is not installed: the model is then searched exactly."""
    if not faiss_available():
        logger.warning(
            "the artifact has an approximate index, but faiss is not installed: searching "
            "exactly (pip install 'affinity-recommender[ann]')"
        )
        return None
    return ApproximateIndex.from_arrays(arrays, n_items=int(shape[0]), dims=int(shape[1]))
