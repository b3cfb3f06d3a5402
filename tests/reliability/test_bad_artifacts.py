"""Bad artifacts published through the registry: each is refused with a clear log line and a
metric, the previous model keeps serving, and nothing in the artifact is ever executed."""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import mlflow
import numpy as np
import pytest
from prometheus_client import REGISTRY

from models.artifact import sha256_file
from service.loader import ModelHolder, ModelLoader
from tests.service.conftest import MODEL_NAME, client_for, register, running, settings_for


class _Payload:
    """Unpickling this would create ``target``: proof that code from the artifact ran."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self) -> tuple[object, tuple[str]]:
        code = f"open({str(self.target)!r}, 'w').write('pwned')"
        return (exec, (code,))


def _rehash(artifact: Path) -> None:
    """Make the manifest match the files again, as an attacker who can write it would."""
    manifest = json.loads((artifact / "manifest.json").read_text())
    manifest["files"] = {name: sha256_file(artifact / name) for name in manifest["files"]}
    (artifact / "manifest.json").write_text(json.dumps(manifest))


def _truncate(artifact: Path, marker: Path) -> None:
    path = artifact / "model.npz"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_byte(artifact: Path, marker: Path) -> None:
    data = bytearray((artifact / "seen.npz").read_bytes())
    data[len(data) // 2] ^= 0x01
    (artifact / "seen.npz").write_bytes(data)


def _missing_file(artifact: Path, marker: Path) -> None:
    (artifact / "popularity.npz").unlink()


def _future_format(artifact: Path, marker: Path) -> None:
    manifest = json.loads((artifact / "manifest.json").read_text())
    manifest["format_version"] = int(manifest["format_version"]) + 1
    (artifact / "manifest.json").write_text(json.dumps(manifest))


def _wrong_shapes(artifact: Path, marker: Path) -> None:
    with np.load(artifact / "model.npz") as npz:
        arrays = {key: npz[key] for key in npz.files}
    arrays["item_factors"] = arrays["item_factors"][:-3]  # fewer rows than items
    np.savez(artifact / "model.npz", **arrays)
    _rehash(artifact)


def _pickle(artifact: Path, marker: Path) -> None:
    with np.load(artifact / "items.npz") as npz:
        arrays = {key: npz[key] for key in npz.files}
    titles = np.empty(len(arrays["title"]), dtype=object)
    titles[:] = [_Payload(marker)] * len(titles)
    arrays["title"] = titles
    np.savez(artifact / "items.npz", allow_pickle=True, **arrays)
    _rehash(artifact)


CORRUPTIONS: dict[str, tuple[Callable[[Path, Path], None], str]] = {
    "truncated": (_truncate, "checksum mismatch for model.npz"),
    "flipped-byte": (_flip_byte, "checksum mismatch for seen.npz"),
    "missing-file": (_missing_file, "popularity.npz is missing"),
    "future-format": (_future_format, "format version"),
    "wrong-shapes": (_wrong_shapes, "factors cover"),
    "pickle": (_pickle, "would need pickle"),
}


def _failures() -> float:
    total = 0.0
    for stage in ("download", "verify", "load", "warmup"):
        labels = {"stage": stage}
        total += REGISTRY.get_sample_value("affinity_model_load_failures_total", labels) or 0.0
    return total


@pytest.mark.parametrize("kind", list(CORRUPTIONS))
def test_bad_artifact_is_refused_and_the_old_model_keeps_serving(
    kind: str,
    tracking: str,
    artifact_dir: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    corrupt, message = CORRUPTIONS[kind]
    marker = tmp_path / "executed"
    bad = tmp_path / "bad"
    shutil.copytree(artifact_dir, bad)
    corrupt(bad, marker)
    register(artifact_dir)  # version 1: good, champion
    settings = settings_for(
        f"models:/{MODEL_NAME}@champion", tmp_path, tracking_uri=tracking, poll_seconds=0.05
    )
    holder = ModelHolder()
    loader = ModelLoader(settings, holder)
    assert loader.load_initial()
    caplog.set_level(logging.INFO)
    with running(settings, holder) as port, client_for(port) as client:
        before = _failures()
        loader.start_polling()
        try:
            register(bad)  # version 2 becomes champion
            deadline = time.monotonic() + 20
            while _failures() == before and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            loader.stop()
        assert _failures() == before + 1  # refused once, not retried while the alias stays
        refusals = [
            r for r in caplog.records if r.levelno >= logging.ERROR and "keeping" in r.message
        ]
        assert refusals and message in refusals[0].getMessage()
        assert client.recommend("u05", k=3).model.version == "1"
        assert client.model_info().model.version == "1"
    assert not marker.exists()


def test_pickled_artifact_is_refused_by_the_pyfunc_wrapper_too(
    tracking: str, artifact_dir: Path, tmp_path: Path
) -> None:
    marker = tmp_path / "executed"
    bad = tmp_path / "bad"
    shutil.copytree(artifact_dir, bad)
    _pickle(bad, marker)
    version = register(bad)
    with pytest.raises(Exception) as info:
        mlflow.pyfunc.load_model(f"models:/{MODEL_NAME}/{version}")
    chain: list[BaseException] = []
    exc: BaseException | None = info.value
    while exc is not None and len(chain) < 10:
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    # The pyfunc runs its own copy of the model code, imported under a private package name
    # (registry/pyfunc_model.py), so its ArtifactError is that copy's class, not models.errors'.
    assert any(type(e).__name__ == "ArtifactError" and "pickle" in str(e) for e in chain)
    assert not marker.exists()
    # The payload is live: a loader that allowed pickle would have run it.
    with np.load(bad / "items.npz", allow_pickle=True) as npz:
        npz["title"]
    assert marker.read_text() == "pwned"
