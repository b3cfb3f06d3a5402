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
    a, b = load_artifact(tmp_path), load_artifact(tmp_path, mapped=False)
    users = np.arange(a.model.n_users)
    ids_a, scores_a = a.model.recommend(users, a.seen, N=5)
    ids_b, scores_b = b.model.recommend(users, b.seen, N=5)
    np.testing.assert_array_equal(ids_a, ids_b)
    np.testing.assert_array_equal(scores_a, scores_b)


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
