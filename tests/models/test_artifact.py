"""The artifact directory: a faithful round trip, and refusal of anything corrupt or unsafe."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from models import FORMAT_VERSION
from models.algorithms import algorithm_names
from models.artifact import (
    FILES,
    MANIFEST,
    ItemCatalog,
    ModelBundle,
    load_artifact,
    save_artifact,
    sha256_file,
    verify_artifact,
)
from models.errors import ArtifactError, UnsupportedFormatError
from models.npz import write_npz
from models.ranking import ItemFilter, RankingPipeline

BundleFor = Callable[[str], ModelBundle]

EXECUTED: list[str] = []
"""Filled by :class:`Payload` if unpickling ever runs it."""


def _record(message: str) -> None:
    EXECUTED.append(message)


class Payload:
    """An object whose unpickling calls back into this module (what a malicious pickle does)."""

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (_record, ("payload ran",))


@pytest.fixture
def artifact(bundle_for: BundleFor, tmp_path: Path) -> Path:
    directory = tmp_path / "artifact"
    save_artifact(bundle_for("als"), directory)
    return directory


def fix_checksum(directory: Path, name: str) -> None:
    """Make the manifest agree with a rewritten file, so only deeper checks can catch it."""
    manifest = json.loads((directory / MANIFEST).read_text())
    manifest["files"][name] = sha256_file(directory / name)
    (directory / MANIFEST).write_text(json.dumps(manifest))


def rewrite_npz(directory: Path, name: str, **changes: np.ndarray) -> None:
    with np.load(directory / name) as npz:
        arrays = {key: npz[key] for key in npz.files}
    arrays.update(changes)
    np.savez(directory / name, **arrays)  # type: ignore[arg-type]
    fix_checksum(directory, name)


@pytest.mark.parametrize("name", algorithm_names())
def test_round_trip_gives_identical_answers(
    name: str, bundle_for: BundleFor, tmp_path: Path
) -> None:
    bundle = bundle_for(name)
    manifest = save_artifact(bundle, tmp_path)
    assert manifest["format_version"] == FORMAT_VERSION
    assert manifest["algorithm"] == name
    assert set(manifest["files"]) == set(FILES)
    loaded = load_artifact(tmp_path)
    assert loaded.info["dataset_fingerprint"] == "synthetic-0"
    before, after = RankingPipeline.from_bundle(bundle), RankingPipeline.from_bundle(loaded)
    flt = ItemFilter.of(item_types=["product"])
    users = np.arange(len(bundle.users))
    np.testing.assert_array_equal(
        before.rank_users(users, 8, item_filter=flt), after.rank_users(users, 8, item_filter=flt)
    )
    for ask in (
        lambda e: e.recommend("u3", 8),
        lambda e: e.recommend("u4", 8, recent_item_ids=["i40", "i41"], item_filter=flt),
        lambda e: e.recommend("stranger", 8, recent_item_ids=["i2", "i3"]),
        lambda e: e.similar_items(["i5", "i7"], 6),
        lambda e: e.popular(5, trending=True),
    ):
        a, b = ask(before), ask(after)
        assert len(a) > 0
        assert (a.item_ids, a.source) == (b.item_ids, b.source)
        assert a.scores == b.scores


def test_flipped_byte_is_refused(artifact: Path) -> None:
    path = artifact / "model.npz"
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(ArtifactError, match=r"checksum mismatch for model\.npz"):
        load_artifact(artifact)


def test_truncated_file_is_refused(artifact: Path) -> None:
    path = artifact / "seen.npz"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ArtifactError, match=r"seen\.npz"):
        load_artifact(artifact)
    # Even with a matching checksum the truncated archive cannot be read.
    fix_checksum(artifact, "seen.npz")
    with pytest.raises(ArtifactError, match=r"seen\.npz"):
        load_artifact(artifact)


def test_missing_file_is_refused(artifact: Path) -> None:
    (artifact / "items.npz").unlink()
    with pytest.raises(ArtifactError, match=r"items\.npz is missing"):
        verify_artifact(artifact)


def test_missing_manifest_is_refused(artifact: Path) -> None:
    (artifact / MANIFEST).unlink()
    with pytest.raises(ArtifactError, match="not an Affinity model artifact"):
        load_artifact(artifact)


def test_future_format_version_is_unsupported(artifact: Path) -> None:
    manifest = json.loads((artifact / MANIFEST).read_text())
    manifest["format_version"] = FORMAT_VERSION + 1
    (artifact / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(UnsupportedFormatError, match="upgrade Affinity"):
        load_artifact(artifact)


def test_item_arrays_of_the_wrong_length_are_refused(artifact: Path) -> None:
    with np.load(artifact / "items.npz") as npz:
        available = npz["available"]
    rewrite_npz(artifact, "items.npz", available=available[:-1])
    verify_artifact(artifact)  # the checksums alone no longer catch it
    with pytest.raises(ArtifactError, match=r"items\.available has 59 rows, expected 60"):
        load_artifact(artifact)


def test_model_factors_of_the_wrong_shape_are_refused(artifact: Path) -> None:
    with np.load(artifact / "model.npz") as npz:
        item_factors = npz["item_factors"]
    rewrite_npz(artifact, "model.npz", item_factors=item_factors[:-3])
    with pytest.raises(ArtifactError, match="57 items"):
        load_artifact(artifact)


def test_seen_indices_outside_the_catalog_are_refused(artifact: Path) -> None:
    with np.load(artifact / "seen.npz") as npz:
        indices = npz["indices"].copy()
    indices[0] = 10_000
    rewrite_npz(artifact, "seen.npz", indices=indices)
    with pytest.raises(ArtifactError, match=r"seen\.npz"):
        load_artifact(artifact)


def test_duplicate_item_ids_are_refused(artifact: Path) -> None:
    with np.load(artifact / "vocab.npz") as npz:
        item_ids = npz["item_ids"].copy()
    item_ids[1] = item_ids[0]
    rewrite_npz(artifact, "vocab.npz", item_ids=item_ids)
    with pytest.raises(ArtifactError, match="unique"):
        load_artifact(artifact)


def test_pickled_object_array_is_refused_without_running_it(artifact: Path) -> None:
    payload = np.array([Payload(), "u1"], dtype=object)
    with np.load(artifact / "vocab.npz") as npz:
        item_ids = npz["item_ids"]
    np.savez(artifact / "vocab.npz", user_ids=payload, item_ids=item_ids, allow_pickle=True)
    fix_checksum(artifact, "vocab.npz")
    with pytest.raises(ArtifactError, match="pickle"):
        load_artifact(artifact)
    assert EXECUTED == []


def test_object_arrays_are_never_written(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="object dtype"):
        write_npz(tmp_path / "x.npz", {"ids": np.array(["a", None], dtype=object)})
    assert not (tmp_path / "x.npz").exists()


def test_first_seen_round_trips(bundle_for: BundleFor, tmp_path: Path) -> None:
    bundle = bundle_for("als")
    first_seen = np.where(np.arange(len(bundle.items)) % 4 == 0, np.nan, 1.7e9 + np.arange(60))
    catalog = replace(bundle.catalog, first_seen=first_seen)
    save_artifact(replace(bundle, catalog=catalog), tmp_path)
    loaded = load_artifact(tmp_path)
    assert loaded.catalog.first_seen.dtype == np.float64
    np.testing.assert_array_equal(loaded.catalog.first_seen, first_seen)  # NaN where unknown


def test_an_artifact_without_first_seen_loads_with_it_unknown(artifact: Path) -> None:
    """Artifacts written before ``first_seen`` existed: every item's age is unknown."""
    with np.load(artifact / "items.npz") as npz:
        arrays = {key: npz[key] for key in npz.files if key != "first_seen"}
    np.savez(artifact / "items.npz", **arrays)  # type: ignore[arg-type]
    fix_checksum(artifact, "items.npz")
    verify_artifact(artifact)
    loaded = load_artifact(artifact)
    assert loaded.catalog.first_seen.shape == (60,)
    assert np.isnan(loaded.catalog.first_seen).all()


def test_a_catalog_defaults_to_unknown_first_seen() -> None:
    catalog = ItemCatalog.empty(3)
    assert np.isnan(catalog.first_seen).all() and len(catalog.first_seen) == 3
    named = ItemCatalog(
        item_type=np.array(["", ""]),
        category=np.array(["a", "b"]),
        title=np.array(["", ""]),
        available=np.ones(2, dtype=bool),
    )
    assert np.isnan(named.first_seen).all() and len(named.first_seen) == 2


def test_first_seen_of_the_wrong_length_is_refused(artifact: Path) -> None:
    rewrite_npz(artifact, "items.npz", first_seen=np.zeros(59))
    with pytest.raises(ArtifactError, match=r"items\.first_seen has 59 rows, expected 60"):
        load_artifact(artifact)
