"""Log an Affinity artifact as an MLflow model, register it, and move registry aliases.

The registered model is a pyfunc built from code (``training/pyfunc_model.py``) whose only state is
the Affinity artifact directory, so ``mlflow models serve`` and the gRPC service read the same
``.npz`` files. Aliases (``champion``, ``challenger``) are used, never the deprecated stages.
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from importlib import metadata
from pathlib import Path

import mlflow
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

import models
from models.artifact import find_artifact_dir, load_artifact

logger = logging.getLogger(__name__)

CHAMPION = "champion"
CHALLENGER = "challenger"
ARTIFACT_KEY = "affinity"
PYFUNC_CODE = Path(__file__).with_name("pyfunc_model.py")


def _requirements() -> list[str]:
    reqs = []
    for dist in ("mlflow", "numpy", "scipy", "implicit", "pandas", "pydantic"):
        try:
            reqs.append(f"{dist}=={metadata.version(dist)}")
        except metadata.PackageNotFoundError:  # pragma: no cover
            reqs.append(dist)
    return reqs


def _signature() -> ModelSignature:
    return ModelSignature(
        inputs=Schema([ColSpec("string", "user_id")]),
        outputs=Schema(
            [
                ColSpec("string", "user_id"),
                ColSpec("long", "rank"),
                ColSpec("string", "item_id"),
                ColSpec("double", "score"),
                ColSpec("string", "source"),
            ]
        ),
        params=ParamSchema([ParamSpec("k", "long", 10)]),
    )


def log_and_register(
    artifact_dir: Path, *, model_name: str, tags: dict[str, str] | None = None
) -> ModelVersion:
    """Log ``artifact_dir`` as a pyfunc model in the active run and register a new version."""
    if mlflow.active_run() is None:
        raise RuntimeError("log_and_register must be called inside an active MLflow run")
    with warnings.catch_warnings():
        # The signature is given explicitly, so MLflow's hints about type hints and input
        # examples (which would make it run the model while logging) do not apply.
        warnings.filterwarnings("ignore", message=".*type hints.*", category=UserWarning)
        warnings.filterwarnings("ignore", message=".*input example.*", category=UserWarning)
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(PYFUNC_CODE),
            artifacts={ARTIFACT_KEY: str(artifact_dir)},
            code_paths=[str(Path(models.__file__).parent)],
            signature=_signature(),
            pip_requirements=_requirements(),
        )
    version = mlflow.register_model(info.model_uri, model_name, tags=tags or {})
    logger.info("registered %s version %s from %s", model_name, version.version, info.model_uri)
    return version


def set_alias(model_name: str, alias: str, version: str | int) -> None:
    """Point ``alias`` of ``model_name`` at ``version``."""
    mlflow.MlflowClient().set_registered_model_alias(model_name, alias, str(version))


def get_alias_version(model_name: str, alias: str) -> ModelVersion | None:
    """The version behind ``alias``, or ``None`` when the model or alias does not exist."""
    try:
        return mlflow.MlflowClient().get_model_version_by_alias(model_name, alias)
    except MlflowException:
        return None


def download_model(model_uri: str, dst: Path | None = None) -> Path:
    """Download a ``models:/`` (or ``runs:/``) URI; returns the Affinity artifact directory."""
    target = Path(dst) if dst is not None else Path(tempfile.mkdtemp(prefix="affinity-model-"))
    local = mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(target))
    return find_artifact_dir(Path(local))


def load_model_uri(uri: str):  # type: ignore[no-untyped-def]
    """Load a bundle from ``models:/NAME@ALIAS``, ``models:/NAME/VERSION`` or a local directory."""
    path = Path(uri)
    if not uri.startswith(("models:/", "runs:/")) and path.exists():
        return load_artifact(find_artifact_dir(path))
    with tempfile.TemporaryDirectory(prefix="affinity-model-") as tmp:
        return load_artifact(download_model(uri, Path(tmp)))
