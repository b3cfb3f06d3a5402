"""The one adapter to MLflow's tracking store and model registry, for training and the service.

Training logs an Affinity artifact as a pyfunc model, registers it and moves the aliases
(``champion``, ``challenger``; never the deprecated stages); the service resolves an alias to a
version and downloads its artifact. The registered pyfunc is built from code
(:mod:`registry.pyfunc_model`) whose state is the artifact directory and a copy of the ``models``
package's source, so ``mlflow models serve`` and the gRPC service read the same ``.npz`` files
and rank them with the same pipeline.

``MLFLOW_TRACKING_URI`` is honoured as is (a server, a database, a file store). Unset, Affinity
uses the embedded default: a SQLite database ``mlflow.db`` in the working directory, with run
artifacts in ``./mlruns``. Open the UI on it with ``mlflow ui --backend-store-uri sqlite:///mlflow.db``.

MLflow is imported inside the functions, not here: importing it takes seconds, and the server
must open its port without waiting for that.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import warnings
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import models
from models.artifact import ModelBundle, find_artifact_dir, load_artifact

if TYPE_CHECKING:
    from mlflow.entities.model_registry import ModelVersion
    from mlflow.models import ModelSignature

logger = logging.getLogger(__name__)

CHAMPION = "champion"
CHALLENGER = "challenger"
ARTIFACT_KEY = "affinity"
CODE_KEY = "affinity_models_code"
"""The pyfunc artifact holding the ``models`` package's source (:mod:`registry.pyfunc_model`)."""
DEFAULT_DB = "mlflow.db"
PYFUNC_CODE = Path(__file__).with_name("pyfunc_model.py")
"""The pyfunc model's code file, logged by path (MLflow models-from-code)."""


# ------------------------------------------------------------------ tracking
def default_tracking_uri(workdir: Path | None = None) -> str:
    """The embedded store's URI: ``sqlite:///<workdir>/mlflow.db``."""
    base = (workdir or Path.cwd()).resolve()
    return f"sqlite:///{base / DEFAULT_DB}"


def configure_tracking() -> str:
    """Point MLflow at ``MLFLOW_TRACKING_URI`` or the embedded default; returns the URI used."""
    import mlflow

    # Download progress bars would interleave with our own progress output.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    uri = os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()
    mlflow.set_tracking_uri(uri)
    logger.debug("MLflow tracking URI: %s", uri)
    return uri


def configure_http(*, retries: int, timeout_seconds: int) -> None:
    """Make registry calls fail in seconds, not minutes, when the tracking server is down."""
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = str(retries)
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(timeout_seconds)
    os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"] = "1"
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"


def _client(tracking_uri: str | None) -> Any:
    import mlflow

    # None for both: the URI set by configure_tracking (or MLFLOW_TRACKING_URI).
    return mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


# ------------------------------------------------------------------ training
def _requirements() -> list[str]:
    reqs = []
    for dist in ("mlflow", "numpy", "scipy", "implicit", "pandas", "pydantic"):
        try:
            reqs.append(f"{dist}=={metadata.version(dist)}")
        except metadata.PackageNotFoundError:  # pragma: no cover
            reqs.append(dist)
    return reqs


def _signature() -> ModelSignature:
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema
    from mlflow.types.schema import Array

    return ModelSignature(
        inputs=Schema(
            [
                ColSpec("string", "user_id"),
                ColSpec(Array(DataType.string), "recent_item_ids", required=False),
                ColSpec(Array(DataType.string), "exclude_item_ids", required=False),
            ]
        ),
        outputs=Schema(
            [
                ColSpec("string", "user_id"),
                ColSpec("long", "rank"),
                ColSpec("string", "item_id"),
                ColSpec("double", "score"),
                ColSpec("string", "source"),
            ]
        ),
        params=ParamSchema(
            [
                ParamSpec("k", "long", 10),
                ParamSpec("item_types", "string", [], shape=(-1,)),
                ParamSpec("categories", "string", [], shape=(-1,)),
                ParamSpec("include_seen", "boolean", False),
                # Ranking rules (registry/pyfunc_model.py; batch-recommend's flags).
                ParamSpec("diversity_cap", "long", 0),
                ParamSpec("mmr", "double", 0.0),
                ParamSpec("boosts", "string", [], shape=(-1,)),
                ParamSpec("promote", "string", ""),
                ParamSpec("explore", "double", 0.0),
                ParamSpec("explore_max_age_days", "double", 90.0),
                ParamSpec("explore_seed", "long", 0),
                ParamSpec("explore_max_interactions", "long", -1),
            ]
        ),
    )


def log_and_register(
    artifact_dir: Path, *, model_name: str, tags: dict[str, str] | None = None
) -> ModelVersion:
    """Log ``artifact_dir`` as a pyfunc model in the active run and register a new version."""
    import mlflow

    if mlflow.active_run() is None:
        raise RuntimeError("log_and_register must be called inside an active MLflow run")
    with tempfile.TemporaryDirectory(prefix="affinity-code-") as tmp, warnings.catch_warnings():
        # The model code travels as an artifact, not in code_paths: MLflow would put code_paths
        # on sys.path as a top-level ``models`` package, which meets (or is shadowed by) any other
        # project's ``models`` in the environment that loads the pyfunc.
        code = _copy_sources(Path(models.__file__).parent, Path(tmp) / "models")
        # The signature is given explicitly, so MLflow's hints about type hints and input
        # examples (which would make it run the model while logging) do not apply.
        warnings.filterwarnings("ignore", message=".*type hints.*", category=UserWarning)
        warnings.filterwarnings("ignore", message=".*input example.*", category=UserWarning)
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(PYFUNC_CODE),
            artifacts={ARTIFACT_KEY: str(artifact_dir), CODE_KEY: str(code)},
            signature=_signature(),
            pip_requirements=_requirements(),
        )
    version = mlflow.register_model(info.model_uri, model_name, tags=tags or {})
    logger.info("registered %s version %s from %s", model_name, version.version, info.model_uri)
    return version


def _copy_sources(package: Path, dst: Path) -> Path:
    """The package's ``.py`` files (no caches, no compiled files) copied into ``dst``."""
    dst.mkdir(parents=True)
    for source in sorted(package.glob("*.py")):
        shutil.copy2(source, dst / source.name)
    return dst


def set_alias(model_name: str, alias: str, version: str | int) -> None:
    """Point ``alias`` of ``model_name`` at ``version``."""
    _client(None).set_registered_model_alias(model_name, alias, str(version))


def get_alias_version(model_name: str, alias: str) -> ModelVersion | None:
    """The version behind ``alias``, or ``None`` when the model or alias does not exist."""
    from mlflow.exceptions import MlflowException

    try:
        return _client(None).get_model_version_by_alias(model_name, alias)  # type: ignore[no-any-return]
    except MlflowException:
        return None


# ------------------------------------------------------------------- serving
def resolve(
    model_name: str,
    *,
    alias: str | None = None,
    version: str | int | None = None,
    tracking_uri: str | None = None,
) -> tuple[str, str]:
    """The ``(version, run_id)`` that ``alias`` (or the pinned ``version``) names now.

    Raises when the registry cannot be reached or has no such model, alias or version.
    """
    client = _client(tracking_uri)
    if alias is not None:
        mv = client.get_model_version_by_alias(model_name, alias)
    else:
        mv = client.get_model_version(model_name, str(version))
    return str(mv.version), str(mv.run_id or "")


def download_model(
    model_uri: str, dst: Path | None = None, *, tracking_uri: str | None = None
) -> Path:
    """Download a ``models:/`` (or ``runs:/``) URI; returns the Affinity artifact directory."""
    import mlflow

    target = Path(dst) if dst is not None else Path(tempfile.mkdtemp(prefix="affinity-model-"))
    local = mlflow.artifacts.download_artifacts(
        artifact_uri=model_uri,
        dst_path=str(target),
        tracking_uri=tracking_uri,
        registry_uri=tracking_uri,
    )
    return find_artifact_dir(Path(local))


def load_model_uri(uri: str) -> ModelBundle:
    """Load a bundle from ``models:/NAME@ALIAS``, ``models:/NAME/VERSION`` or a local directory."""
    path = Path(uri)
    if not uri.startswith(("models:/", "runs:/")) and path.exists():
        return load_artifact(find_artifact_dir(path))
    with tempfile.TemporaryDirectory(prefix="affinity-model-") as tmp:
        return load_artifact(download_model(uri, Path(tmp)))
