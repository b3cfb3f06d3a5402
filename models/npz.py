"""Reading and writing named arrays as ``.npz`` files, never with pickle."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import ArtifactError


def write_npz(path: str | Path, arrays: dict[str, np.ndarray]) -> None:
    """Write ``arrays`` uncompressed; object arrays are rejected (they would need pickle)."""
    for name, arr in arrays.items():
        if np.asarray(arr).dtype == object:
            raise ArtifactError(f"array {name!r} has object dtype and cannot be stored safely")
    np.savez(path, allow_pickle=False, **arrays)  # type: ignore[arg-type]


def read_npz(path: str | Path) -> dict[str, np.ndarray]:
    """Read every array of an ``.npz`` file with ``allow_pickle=False``."""
    name = Path(path).name
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {key: npz[key] for key in npz.files}
    except ValueError as exc:  # object arrays need pickle, which we refuse
        raise ArtifactError(f"{name} holds data that would need pickle: refused") from exc
    except Exception as exc:
        raise ArtifactError(f"cannot read {name}: {exc}") from exc
