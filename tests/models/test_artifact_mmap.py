"""Loaded artifacts memory-map their big arrays instead of copying them into each process.

Server workers that load the same artifact then share one copy in the page cache; the mapped
arrays are read-only, hold the saved values, and the model answers as a copied one does.
"""

from __future__ import annotations

import mmap
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from models.artifact import ModelBundle, load_artifact, map_npz, save_artifact
from models.errors import ArtifactError
from models.npz import read_npz, write_npz
from models.ranking import ListKind, ListRequest, RankingPipeline


def mapped(array: np.ndarray) -> bool:
    base: object = array
    while isinstance(base, np.ndarray) and base.base is not None:
        base = base.base
    if isinstance(base, memoryview):
        base = base.obj
    return isinstance(base, mmap.mmap)


def test_factors_and_seen_matrix_are_mapped_read_only(
    bundle_for: Callable[[str], ModelBundle], tmp_path: Path
) -> None:
    bundle = bundle_for("als")
    save_artifact(bundle, tmp_path)
    loaded = load_artifact(tmp_path)
    model = loaded.model
    assert mapped(model.item_factors) and mapped(model.user_factors)  # type: ignore[attr-defined]
    assert mapped(loaded.seen.indices) and mapped(loaded.seen.data)
    assert not model.item_factors.flags.writeable  # type: ignore[attr-defined]
    np.testing.assert_array_equal(model.item_factors, bundle.model.item_factors)  # type: ignore[attr-defined]
    assert (loaded.seen != bundle.seen).nnz == 0


def test_mapped_and_copied_loads_recommend_the_same(
    bundle_for: Callable[[str], ModelBundle], tmp_path: Path
) -> None:
    save_artifact(bundle_for("als"), tmp_path)
    a, b = (
        RankingPipeline.from_bundle(load_artifact(tmp_path)),
        RankingPipeline.from_bundle(load_artifact(tmp_path, mapped=False)),
    )
    users = np.arange(a.model.n_users)  # type: ignore[attr-defined]
    np.testing.assert_array_equal(a.rank_users(users, 5), b.rank_users(users, 5))
    for user in range(0, len(users), 20):
        ranked_a = a.rank(ListRequest(ListKind.USER, 5, user=user))
        ranked_b = b.rank(ListRequest(ListKind.USER, 5, user=user))
        np.testing.assert_array_equal(ranked_a.ids, ranked_b.ids)
        np.testing.assert_array_equal(ranked_a.scores, ranked_b.scores)
    similar = ListRequest(ListKind.SIMILAR, 5, items=np.array([3, 33]))
    np.testing.assert_array_equal(a.rank(similar).ids, b.rank(similar).ids)


def test_map_npz_reads_what_write_npz_wrote(tmp_path: Path) -> None:
    arrays = {
        "a": np.arange(12, dtype=np.float32).reshape(3, 4),
        "f": np.asfortranarray(np.arange(6, dtype=np.int64).reshape(2, 3)),
        "s": np.array(["x", "yy"]),
        "empty": np.empty((0, 4), dtype=np.float32),
    }
    write_npz(tmp_path / "m.npz", arrays)
    got = map_npz(tmp_path / "m.npz")
    assert set(got) == set(arrays)
    for name, value in arrays.items():
        np.testing.assert_array_equal(got[name], value)
    assert read_npz(tmp_path / "m.npz").keys() == got.keys()


def test_map_npz_refuses_object_arrays_and_garbage(tmp_path: Path) -> None:
    np.savez(tmp_path / "obj.npz", o=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ArtifactError, match="pickle"):
        map_npz(tmp_path / "obj.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip file")
    with pytest.raises(ArtifactError):
        map_npz(tmp_path / "junk.npz")
