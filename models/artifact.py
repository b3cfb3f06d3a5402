"""The model artifact: a directory of ``.npz`` arrays plus a ``manifest.json``.

Artifacts are data, not code. Layout::

    manifest.json     format version, algorithm, hyperparameters, library versions, shapes,
                      dataset fingerprint, created-at, sha256 of every other file
    model.npz         the algorithm's learned arrays (factors, weights, similarity)
    vocab.npz         user_ids, item_ids (fixed-width unicode)
    seen.npz          each user's seen items as CSR (indptr, indices, data)
    items.npz         item_type, category, title, available, first_seen (aligned with item_ids;
                      an artifact written before first_seen existed loads with NaN there)
    popularity.npz    popularity and trending scores per item
    ann.npz           optional: an approximate index over the item factors (models/ann.py), the
                      faiss index serialized to a uint8 array; only large catalogs have one

Every ``.npz`` is read with ``allow_pickle=False``; loading checks the format version, every
checksum and that the shapes agree, and raises :class:`~models.errors.ArtifactError` otherwise.
The big arrays (``model.npz``, ``seen.npz``) are stored uncompressed, so loading memory-maps them
read-only where they lie in the file instead of copying them: server worker processes that load
the same artifact share one copy in the page cache.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import platform
import struct
import zipfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from . import FORMAT_VERSION
from .algorithms import get_algorithm
from .ann import ANN_FILE
from .base import Recommender
from .errors import ArtifactError, InvalidInputError, UnsupportedFormatError
from .npz import read_npz, write_npz
from .vocabulary import Vocabulary

MANIFEST = "manifest.json"
FILES = ("model.npz", "vocab.npz", "seen.npz", "items.npz", "popularity.npz")
OPTIONAL_FILES = (ANN_FILE,)
"""Files an artifact may have beside :data:`FILES`; the manifest checksums those it has."""
ITEM_TYPES = ("content", "product")
"""Item types a catalog may declare; an empty string means unknown."""


@dataclass
class ItemCatalog:
    """Per-item metadata aligned with the item vocabulary."""

    item_type: np.ndarray
    category: np.ndarray
    title: np.ndarray
    available: np.ndarray
    first_seen: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.float64))
    """When each item first appeared (unix seconds, float64; NaN where unknown): its age for
    exploration (:class:`models.rules.Exploration`). Left out, every item's is unknown."""

    def __post_init__(self) -> None:
        if len(self.first_seen) == 0 and len(self.available):
            self.first_seen = np.full(len(self.available), np.nan, dtype=np.float64)

    @classmethod
    def empty(cls, n_items: int) -> ItemCatalog:
        blank = np.full(n_items, "", dtype="<U1")
        return cls(blank, blank.copy(), blank.copy(), np.ones(n_items, dtype=bool))

    def __len__(self) -> int:
        return len(self.available)


@dataclass
class ModelBundle:
    """Everything the service needs to answer requests for one trained model."""

    model: Recommender
    users: Vocabulary
    items: Vocabulary
    seen: sp.csr_matrix
    catalog: ItemCatalog
    popularity: np.ndarray
    trending: np.ndarray
    info: dict[str, Any] = field(default_factory=dict)
    """Free-form facts stored in the manifest (dataset fingerprint, metrics, ...)."""
    ann: dict[str, np.ndarray] | None = None
    """The approximate index's arrays (:meth:`models.ann.ApproximateIndex.to_arrays`), for a
    factor model over a large catalog; None: the model is searched exactly."""

    def validate(self) -> None:
        """Raise :class:`ArtifactError` unless all parts agree on the numbers of users/items."""
        n_users, n_items = len(self.users), len(self.items)
        problems = []
        if (self.model.n_users, self.model.n_items) != (n_users, n_items) and not (
            self.model.n_items == n_items and self.model.n_users == 0
        ):
            problems.append(
                f"model shape {(self.model.n_users, self.model.n_items)} "
                f"!= vocabularies {(n_users, n_items)}"
            )
        if self.seen.shape != (n_users, n_items):
            problems.append(f"seen matrix shape {self.seen.shape} != {(n_users, n_items)}")
        for name in ("item_type", "category", "title", "available", "first_seen"):
            if len(getattr(self.catalog, name)) != n_items:
                problems.append(
                    f"items.{name} has {len(getattr(self.catalog, name))} rows, expected {n_items}"
                )
        for name in ("popularity", "trending"):
            if len(getattr(self, name)) != n_items:
                problems.append(
                    f"{name} has {len(getattr(self, name))} entries, expected {n_items}"
                )
        if problems:
            raise ArtifactError("inconsistent artifact: " + "; ".join(problems))


def find_artifact_dir(root: str | Path) -> Path:
    """The Affinity artifact (the folder holding ``manifest.json``) at or below ``root``.

    A model downloaded from the MLflow registry nests the artifact inside the pyfunc model
    (``artifacts/affinity/``); a local path may point at it directly.
    """
    root = Path(root)
    if (root / MANIFEST).is_file():
        return root
    for manifest in sorted(root.rglob(MANIFEST)):
        return manifest.parent
    raise ArtifactError(f"no Affinity artifact ({MANIFEST}) under {root}")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for dist in ("numpy", "scipy", "implicit"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:  # pragma: no cover - always installed
            versions[dist] = "unknown"
    return versions


def save_artifact(bundle: ModelBundle, directory: str | Path) -> dict[str, Any]:
    """Write ``bundle`` into ``directory`` (created if needed); returns the manifest."""
    bundle.validate()
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    seen = sp.csr_matrix(bundle.seen, dtype=np.float32)
    write_aligned_npz(out / "model.npz", bundle.model.to_arrays())
    write_npz(
        out / "vocab.npz",
        {"user_ids": bundle.users.to_array(), "item_ids": bundle.items.to_array()},
    )
    write_aligned_npz(
        out / "seen.npz",
        {
            "indptr": seen.indptr.astype(np.int64),
            "indices": seen.indices.astype(np.int32),
            "data": seen.data,
        },
    )
    cat = bundle.catalog
    write_npz(
        out / "items.npz",
        {
            "item_type": cat.item_type.astype(str),
            "category": cat.category.astype(str),
            "title": cat.title.astype(str),
            "available": cat.available.astype(bool),
            "first_seen": np.asarray(cat.first_seen, dtype=np.float64),
        },
    )
    write_npz(
        out / "popularity.npz",
        {
            "popularity": bundle.popularity.astype(np.float32),
            "trending": bundle.trending.astype(np.float32),
        },
    )
    names: tuple[str, ...] = FILES
    if bundle.ann is not None:
        write_aligned_npz(out / ANN_FILE, bundle.ann)
        names += (ANN_FILE,)
    manifest = {
        "format_version": FORMAT_VERSION,
        "algorithm": bundle.model.algorithm,
        "params": bundle.model.config.model_dump(mode="json"),
        "library_versions": _library_versions(),
        "shapes": {
            "users": len(bundle.users),
            "items": len(bundle.items),
            "seen_nnz": int(seen.nnz),
        },
        "dataset_fingerprint": bundle.info.get("dataset_fingerprint", ""),
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "info": bundle.info,
        "files": {name: sha256_file(out / name) for name in names},
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))
    return manifest


def read_manifest(directory: str | Path) -> dict[str, Any]:
    """Parse and check the manifest (format version, file list) without loading arrays."""
    path = Path(directory) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise ArtifactError(f"{path} is missing: not an Affinity model artifact") from None
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"cannot parse {path}: {exc}") from exc
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{path} is not a JSON object")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise UnsupportedFormatError(
            f"artifact format version {version!r} is not supported (this build reads "
            f"{FORMAT_VERSION}); upgrade Affinity or retrain"
        )
    files = manifest.get("files")
    if (
        not isinstance(files, dict)
        or not set(FILES) <= set(files)
        or not set(files) <= set(FILES) | set(OPTIONAL_FILES)
    ):
        raise ArtifactError(
            f"manifest must list checksums for exactly {', '.join(FILES)} "
            f"(and {', '.join(OPTIONAL_FILES)} where the artifact has it)"
        )
    return manifest


def verify_artifact(directory: str | Path) -> dict[str, Any]:
    """Check format version and every checksum; returns the manifest."""
    root = Path(directory)
    manifest = read_manifest(root)
    for name, expected in manifest["files"].items():
        path = root / name
        if not path.is_file():
            raise ArtifactError(f"artifact file {name} is missing from {root}")
        actual = sha256_file(path)
        if actual != expected:
            raise ArtifactError(
                f"checksum mismatch for {name}: expected {expected[:12]}..., "
                f"got {actual[:12]}... (corrupt or tampered artifact)"
            )
    return manifest


_LOCAL_HEADER = struct.Struct("<4s5H3L2H")
"""A zip local file header (30 bytes), ending with the name and extra-field lengths."""


_PAD_FIELD = 0xA1F1
"""Header id of the zip "extra" field that pads members to :data:`ALIGN` (readers skip it)."""
ALIGN = 64


def write_aligned_npz(path: str | Path, arrays: dict[str, np.ndarray]) -> None:
    """Like :func:`~models.npz.write_npz`, with every member's data starting at a 64-byte offset.

    The result is an ordinary uncompressed ``.npz`` (``np.load`` reads it); the alignment lets
    :func:`map_npz` hand out memory-mapped arrays that BLAS and scipy use without copying.
    """
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, value in arrays.items():
            arr = np.asanyarray(value)
            if arr.dtype.hasobject:
                raise ArtifactError(f"array {name!r} has object dtype and cannot be stored safely")
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_STORED
            zip64 = arr.nbytes > (1 << 30)  # zipfile then adds a 20-byte zip64 extra field
            assert zf.fp is not None
            start = zf.fp.tell() + _LOCAL_HEADER.size + len(info.filename.encode())
            pad = -(start + (20 if zip64 else 0)) % ALIGN
            if pad:
                pad += ALIGN if pad < 4 else 0  # an extra field needs 4 bytes of header
                info.extra = struct.pack("<HH", _PAD_FIELD, pad - 4) + bytes(pad - 4)
            with zf.open(info, "w", force_zip64=zip64) as fh:
                np.lib.format.write_array(fh, arr, allow_pickle=False)


def map_npz(path: str | Path) -> dict[str, np.ndarray]:
    """Read-only arrays of an uncompressed ``.npz`` that view the file's pages (no copy).

    Each member is an ``.npy`` stored as is; its header is parsed (never with pickle: object
    dtypes are refused) and the array is a view into one shared read-only ``mmap``. A member
    that is compressed or empty falls back to :func:`read_npz`.
    """
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as zf:
            members = zf.infolist()
        if any(m.compress_type != zipfile.ZIP_STORED for m in members):
            return read_npz(path)
        arrays: dict[str, np.ndarray] = {}
        with open(path, "rb") as fh:
            if fh.seek(0, 2) == 0:
                return read_npz(path)
            buffer = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
            for member in members:
                fh.seek(member.header_offset)
                header = _LOCAL_HEADER.unpack(fh.read(_LOCAL_HEADER.size))
                fh.seek(header[-2] + header[-1], 1)
                version = np.lib.format.read_magic(fh)
                if version == (1, 0):
                    shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
                else:
                    shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh)
                if dtype.hasobject:
                    raise ArtifactError(f"{path.name} holds data that would need pickle: refused")
                count = int(np.prod(shape, dtype=np.int64))
                offset = fh.tell()
                flat = np.frombuffer(buffer, dtype=dtype, count=count, offset=offset)
                if offset % max(1, dtype.alignment):
                    flat = flat.copy()  # written unaligned (np.savez): BLAS would copy anyway
                arrays[member.filename.removesuffix(".npy")] = flat.reshape(
                    shape, order="F" if fortran else "C"
                )
        return arrays
    except ArtifactError:
        raise
    except Exception as exc:
        raise ArtifactError(f"cannot read {path.name}: {exc}") from exc


def _need(arrays: dict[str, np.ndarray], name: str, source: str) -> np.ndarray:
    try:
        return arrays[name]
    except KeyError:
        raise ArtifactError(f"{source} lacks array {name!r}") from None


def load_artifact(
    directory: str | Path, *, mapped: bool = True, verify: bool = True
) -> ModelBundle:
    """Verify and load an artifact written by :func:`save_artifact`.

    With ``mapped`` (the default) the factor/weight arrays and the seen matrix are read-only
    memory maps of the files (see :func:`map_npz`); the files must then stay unmodified while
    the bundle is in use (deleting them is fine: the mapping keeps the data). ``verify=False``
    skips the checksums, for a caller that has just run :func:`verify_artifact` itself (hashing
    a large model twice doubles its load time); the manifest is read and checked either way.
    """
    root = Path(directory)
    manifest = verify_artifact(root) if verify else read_manifest(root)
    read_big = map_npz if mapped else read_npz
    try:
        algo = get_algorithm(str(manifest.get("algorithm")))
    except Exception as exc:
        raise ArtifactError(f"artifact algorithm {manifest.get('algorithm')!r} is unknown") from exc
    arrays = read_big(root / "model.npz")
    try:
        model = algo.from_arrays(manifest.get("params") or {}, arrays)
    except ArtifactError:
        raise
    except Exception as exc:
        raise ArtifactError(f"model.npz does not fit algorithm {algo.algorithm}: {exc}") from exc
    vocab = read_npz(root / "vocab.npz")
    try:
        users = Vocabulary(_need(vocab, "user_ids", "vocab.npz"), kind="user")
        items = Vocabulary(_need(vocab, "item_ids", "vocab.npz"), kind="item")
    except InvalidInputError as exc:  # duplicate or non-1-d ids: the file is not trustworthy
        raise ArtifactError(f"vocab.npz is invalid: {exc}") from exc
    seen_arrays = read_big(root / "seen.npz")
    try:
        seen = sp.csr_matrix(
            (
                _need(seen_arrays, "data", "seen.npz"),
                _need(seen_arrays, "indices", "seen.npz"),
                _need(seen_arrays, "indptr", "seen.npz"),
            ),
            shape=(len(users), len(items)),
        )
        # The cheap default check skips index bounds; a bad index would fail mid-request.
        seen.check_format(full_check=True)
    except ArtifactError:
        raise
    except Exception as exc:
        raise ArtifactError(f"seen.npz is not a valid CSR matrix: {exc}") from exc
    item_arrays = read_npz(root / "items.npz")
    catalog = ItemCatalog(
        item_type=_need(item_arrays, "item_type", "items.npz"),
        category=_need(item_arrays, "category", "items.npz"),
        title=_need(item_arrays, "title", "items.npz"),
        available=_need(item_arrays, "available", "items.npz").astype(bool),
    )
    if "first_seen" in item_arrays:  # artifacts written before it existed: unknown (NaN)
        catalog.first_seen = item_arrays["first_seen"].astype(np.float64)
    pop = read_npz(root / "popularity.npz")
    bundle = ModelBundle(
        model=model,
        users=users,
        items=items,
        seen=seen,
        catalog=catalog,
        popularity=_need(pop, "popularity", "popularity.npz").astype(np.float32),
        trending=_need(pop, "trending", "popularity.npz").astype(np.float32),
        info=dict(manifest.get("info") or {}),
    )
    if ANN_FILE in manifest["files"]:
        # Memory-mapped: the index is copied into faiss when a pipeline is built, and the file's
        # pages stay reclaimable page cache instead of a second copy in the process.
        bundle.ann = read_big(root / ANN_FILE)
    bundle.validate()
    return bundle
