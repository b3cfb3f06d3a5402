"""The Kubernetes manifests (deploy/kubernetes/): valid against Kubernetes' own schemas, and
consistent with the server they run.

No cluster runs in CI: ``kubernetes-validate`` checks every resource against the JSON schemas of
the Kubernetes API that it bundles (no network), in strict mode, so a misspelt field fails too.
The rest checks what a schema cannot: ports, labels and resources agree with each other and with
``ServeSettings``.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes_validate import utils as k8s

from service.config import ServeSettings, parse_registry_uri

FOLDER = Path(__file__).resolve().parents[1] / "deploy" / "kubernetes"
OLDEST = "1.27.0"
"""The oldest Kubernetes the manifests are for: native gRPC probes are GA from 1.27."""
VERSIONS = (OLDEST, k8s.latest_version())
MEMORY_PER_WORKER_MIB = 1536
"""deploy/kubernetes/README.md: memory is 1.5 GiB per worker."""


def documents(path: Path) -> list[dict[str, Any]]:
    with path.open() as f:
        return [doc for doc in yaml.safe_load_all(f) if doc]


def validate(path: Path) -> None:
    """Raise if any resource of ``path`` breaks the schema of any of :data:`VERSIONS`."""
    for doc in documents(path):
        for version in VERSIONS:
            k8s.validate(doc, version, strict=True)


def mebibytes(quantity: str) -> float:
    """A Kubernetes memory quantity in MiB (``3Gi``, ``1536Mi``)."""
    for suffix, scale in (("Gi", 1024), ("Mi", 1), ("Ki", 1 / 1024)):
        if quantity.endswith(suffix):
            return float(quantity.removesuffix(suffix)) * scale
    raise ValueError(f"write memory in Ki, Mi or Gi: {quantity!r}")


def resources() -> dict[str, dict[str, Any]]:
    """The kustomization's resources by kind."""
    (kustomization,) = documents(FOLDER / "kustomization.yaml")
    found: dict[str, dict[str, Any]] = {}
    for name in kustomization["resources"]:
        for doc in documents(FOLDER / name):
            found[doc["kind"]] = doc
    return found


def container() -> dict[str, Any]:
    (main,) = resources()["Deployment"]["spec"]["template"]["spec"]["containers"]
    return main


def env() -> dict[str, dict[str, Any]]:
    return {item["name"]: item for item in container()["env"]}


def test_the_kustomization_lists_every_manifest() -> None:
    (kustomization,) = documents(FOLDER / "kustomization.yaml")
    on_disk = {p.name for p in FOLDER.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == on_disk
    assert set(resources()) == {"ConfigMap", "Deployment", "Service", "PodDisruptionBudget"}


@pytest.mark.parametrize("name", sorted(p.name for p in FOLDER.glob("*.yaml")))
def test_every_manifest_is_valid_kubernetes(name: str) -> None:
    if name == "kustomization.yaml":  # kustomize's own file, not an API resource
        return
    validate(FOLDER / name)


@pytest.mark.parametrize(
    ("old", "new", "reason"),
    [
        ("replicas: 3", "replicas: three", "is not of type 'integer'"),
        (
            "grpc:\n              port: 50051",
            "grpc:\n              prot: 50051",
            "'port' is a required",
        ),
        ("periodSeconds: 5", "periodSecond: 5", "periodSecond"),
        ("kind: Deployment", "kind: Deploymnet", "Couldn't find schema"),
    ],
)
def test_a_broken_manifest_fails_validation(
    tmp_path: Path, old: str, new: str, reason: str
) -> None:
    broken = tmp_path / "deployment.yaml"
    shutil.copyfile(FOLDER / "deployment.yaml", broken)
    text = broken.read_text()
    assert old in text
    broken.write_text(text.replace(old, new, 1))
    with pytest.raises((k8s.ValidationError, k8s.SchemaNotFoundError)) as info:
        validate(broken)
    assert reason in str(getattr(info.value, "message", info.value))


def test_probes_service_and_server_use_one_port() -> None:
    main = container()
    default_port = ServeSettings.model_fields["port"].default
    (grpc_port,) = [p["containerPort"] for p in main["ports"] if p["name"] == "grpc"]
    assert grpc_port == default_port == int(env()["AFFINITY_PORT"]["value"])
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert main[probe]["grpc"] == {"port": default_port}, probe  # native gRPC health probes
    service = resources()["Service"]["spec"]
    assert service["clusterIP"] == "None"  # headless: DNS lists every ready pod
    (port,) = service["ports"]
    assert port["port"] == default_port and port["targetPort"] == "grpc"
    metrics = [p["containerPort"] for p in main["ports"] if p["name"] == "metrics"]
    assert metrics == [int(env()["AFFINITY_METRICS_PORT"]["value"])]


def test_labels_select_the_pods() -> None:
    found = resources()
    deployment = found["Deployment"]["spec"]
    labels = deployment["template"]["metadata"]["labels"]
    for selector in (
        deployment["selector"]["matchLabels"],
        found["Service"]["spec"]["selector"],
        found["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"],
    ):
        assert selector.items() <= labels.items()
    assert found["PodDisruptionBudget"]["spec"]["maxUnavailable"] < deployment["replicas"]


def test_resources_follow_the_worker_count() -> None:
    workers = int(env()["AFFINITY_WORKERS"]["value"])
    resources = container()["resources"]
    for side in ("requests", "limits"):  # equal: the Guaranteed QoS class
        assert resources[side]["cpu"] == str(workers), side  # one CPU per worker
        assert mebibytes(resources[side]["memory"]) == workers * MEMORY_PER_WORKER_MIB, side


def test_environment_names_real_settings_and_external_services() -> None:
    variables = env()
    known = {str(info.validation_alias) for info in ServeSettings.model_fields.values()}
    assert set(variables) <= known, set(variables) - known  # a misspelt name would be ignored
    # MLflow and PostgreSQL are outside the manifests: a ConfigMap and a Secret name them.
    assert variables["MLFLOW_TRACKING_URI"]["valueFrom"]["configMapKeyRef"]["name"] == "affinity"
    assert "secretKeyRef" in variables["AFFINITY_EVENTS_URI"]["valueFrom"]
    assert variables["AFFINITY_TOKEN"]["valueFrom"]["secretKeyRef"]["optional"] is True
    config = resources()["ConfigMap"]["data"]
    model = variables["AFFINITY_MODEL_URI"]["valueFrom"]["configMapKeyRef"]
    assert parse_registry_uri(config[model["key"]]) == ("affinity", "champion", None)
    for name, item in variables.items():
        if "value" in item:  # literal values pass the server's own validation
            field = next(
                f for f, i in ServeSettings.model_fields.items() if i.validation_alias == name
            )
            ServeSettings(**{field: item["value"], "model_uri": "models:/affinity@champion"})


def test_pods_outlive_the_servers_own_shutdown() -> None:
    spec = resources()["Deployment"]["spec"]["template"]["spec"]
    grace = float(env()["AFFINITY_GRACE_SECONDS"]["value"])
    # service/server.py: the supervisor waits grace + 10 s for its workers before killing them.
    assert spec["terminationGracePeriodSeconds"] > grace + 10
