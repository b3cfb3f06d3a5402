"""The command line: settings validation, the client commands, and real multi-worker serving."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from affinity.cli import main
from models.ranking import RankingPipeline
from service.cli import SERVE_OPTIONS
from service.client import AffinityClient
from service.config import ServeSettings
from service.cpus import parse_cpu_list
from service.loader import ModelHolder
from service.logs import JsonFormatter
from tests.service.conftest import free_port, loaded_model, running, settings_for

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def target(
    pipeline: RankingPipeline, artifact_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    holder = ModelHolder()
    holder.swap(loaded_model(pipeline, version="3"))
    with running(settings_for(artifact_dir, tmp_path_factory.mktemp("cli")), holder) as port:
        yield f"127.0.0.1:{port}"


def test_serve_help_documents_every_option_and_its_variable(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for flag, (field, _, _) in SERVE_OPTIONS.items():
        assert flag in text
        assert str(ServeSettings.model_fields[field].validation_alias) in text
    # Every settings field is reachable from the command line.
    assert {field for field, _, _ in SERVE_OPTIONS.values()} == set(ServeSettings.model_fields)


def test_one_command_holds_training_and_service_subcommands(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    listed = capsys.readouterr().out.split()
    training = ["generate", "train", "batch-recommend"]
    service = ["serve", "recommend", "similar", "popular", "model-info", "health", "events"]
    assert all(command in listed for command in training + service)
    # A user mistake: one line naming the subcommand, exit code 2, no traceback.
    assert main(["generate", "--out", str(tmp_path), "--users", "0", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("affinity generate: error:")


@pytest.mark.parametrize(
    ("argv", "env", "field"),
    [
        (["--port", "70000"], {}, "port"),
        (["--max-k", "0"], {}, "max_k"),
        ([], {"AFFINITY_MAX_IN_FLIGHT": "0"}, "max_in_flight"),
        ([], {"AFFINITY_POLL_SECONDS": "soon"}, "poll_seconds"),
        (["--model", "/no/such/dir"], {}, "model_uri"),
        (["--model", "models:/affinity"], {}, "model_uri"),
        (["--tls-cert", "/no/cert.pem", "--tls-key", "/no/key.pem"], {}, "tls_cert"),
        (["--workers", "2", "--port", "0"], {}, "workers"),
    ],
)
def test_bad_configuration_fails_before_serving_with_the_field_named(
    argv: list[str],
    env: dict[str, str],
    field: str,
    artifact_dir: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    base = ["serve", "--model", str(artifact_dir), "--workers", "1", "--port", str(free_port())]
    assert main([*base, *argv]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith("error:") and field in err


def test_environment_configures_and_options_override(monkeypatch: pytest.MonkeyPatch) -> None:
    from service.config import load_settings

    monkeypatch.setenv("AFFINITY_MAX_K", "77")
    monkeypatch.setenv("AFFINITY_PORT", "6000")
    settings = load_settings(port=7000, workers=1)
    assert (settings.max_k, settings.port) == (77, 7000)
    assert settings.model_uri == "models:/affinity@champion"


def test_recommend_prints_a_table_or_json(target: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["recommend", "--target", target, "--user", "u02", "-k", "4"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert "recommendation_id" in table[0] and "v3" in table[0]
    assert table[1].split()[:3] == ["#", "item_id", "score"]
    assert len(table) == 2 + 4

    argv = ["recommend", "--target", target, "--user", "nobody", "-k", "3", "--json"]
    assert main([*argv, "--recent", "i21", "i22", "--item-type", "product"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["source"] == "fold_in"
    assert len(data["items"]) == 3
    assert {item["item_type"] for item in data["items"]} == {"product"}


def test_similar_popular_model_info_and_health_commands(
    target: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["similar", "i03", "-k", "2", "--target", target, "--json"]) == 0
    similar = json.loads(capsys.readouterr().out)
    assert len(similar["items"]) == 2 and "i03" not in {i["item_id"] for i in similar["items"]}
    assert main(["popular", "--trending", "-k", "2", "--target", target, "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["items"]) == 2
    assert main(["model-info", "--target", target, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["model"]["version"] == "3" and info["num_items"] == 40
    assert main(["health", "--target", target]) == 0
    assert capsys.readouterr().out.strip() == "SERVING"


def test_client_errors_print_one_line_and_fail(
    target: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["similar", "no-such-item", "--target", target]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: NOT_FOUND")
    assert main(["recommend", "--user", "u1", "-k", "0", "--target", target]) == 1
    assert "INVALID_ARGUMENT" in capsys.readouterr().err
    dead = f"127.0.0.1:{free_port()}"
    assert main(["health", "--target", dead, "--timeout", "0.5"]) == 1
    assert capsys.readouterr().err.startswith("error: ")


def test_json_log_lines_carry_extra_fields() -> None:
    record = logging.LogRecord("service.servicer", logging.INFO, __file__, 1, "%s ok", ("x",), None)
    record.recommendation_id = "abc123"
    line = JsonFormatter().format(record)
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["msg"] == "x ok" and entry["recommendation_id"] == "abc123"
    assert entry["level"] == "INFO"


@pytest.mark.slow
def test_two_workers_share_a_port_and_stop_on_sigterm(artifact_dir: Path, tmp_path: Path) -> None:
    port = free_port()
    env = {
        **os.environ,
        "AFFINITY_CACHE_DIR": str(tmp_path / "cache"),
        "AFFINITY_EVENTS_URI": f"sqlite:///{tmp_path / 'events.db'}",
        "PYTHONPATH": str(REPO),
    }
    command = [sys.executable, "-m", "affinity", "serve", "--workers", "2"]
    command += ["--port", str(port), "--host", "127.0.0.1", "--model", str(artifact_dir)]
    command += ["--log-format", "json", "--grace-seconds", "2"]
    metrics_port = free_port()
    command += ["--metrics-port", str(metrics_port), "--metrics-host", "127.0.0.1"]
    proc = subprocess.Popen(command, cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
    try:
        with AffinityClient(f"127.0.0.1:{port}", timeout=2) as client:
            deadline = time.monotonic() + 60
            while True:
                try:
                    if client.health() == "SERVING":
                        break
                except Exception:
                    if time.monotonic() > deadline:
                        raise
                time.sleep(0.2)
            results = [client.recommend(f"u{u:02d}", k=3) for u in range(20)]
            assert all(len(r.items) == 3 for r in results)
            assert client.model_info().model.name == artifact_dir.name
        # One /metrics endpoint, on the requested address, merges both workers' counters.
        url = f"http://127.0.0.1:{metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read().decode()
        served = [
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("affinity_requests_total{")
            and 'method="Recommend"' in line
            and 'code="OK"' in line
        ]
        assert sum(served) == 20
        assert _listening_addresses(metrics_port) in ([], ["127.0.0.1"])  # [] where no /proc
        pinned = _thread_cpus(proc.pid)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err[-2000:]
    entries = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    listening = {e["pid"] for e in entries if e["msg"].startswith("listening on")}
    assert len(listening) == 2  # two worker processes bound the same port
    assert any("recommendation_id" in e for e in entries)
    # --cpus auto: with a worker per CPU, each worker, every thread of it, on a CPU of its own;
    # with more CPUs than workers the machine is shared and nothing is pinned.
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if cpus and Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children").exists():
        assert set(pinned) == listening
        logged = {e["pid"]: e["cpu"] for e in entries if e["msg"].startswith("pinned to CPU")}
        if len(cpus) <= 2:
            assert all(len(threads) == 1 for threads in pinned.values()), pinned
            on = {pid: next(iter(threads)) for pid, threads in pinned.items()}
            assert set(on.values()) == set(cpus)
            assert logged == on
        else:
            assert all(threads == set(cpus) for threads in pinned.values()), pinned
            assert logged == {}


def _thread_cpus(pid: int) -> dict[int, set[int]]:
    """For each child process of ``pid``: the CPUs its threads may run on (Linux /proc)."""
    children = Path(f"/proc/{pid}/task/{pid}/children")
    if not children.exists():
        return {}
    found: dict[int, set[int]] = {}
    for child in map(int, children.read_text().split()):
        masks = set()
        for status in Path(f"/proc/{child}/task").glob("*/status"):
            for line in status.read_text().splitlines():
                if line.startswith("Cpus_allowed_list:"):
                    masks.add(line.split(":", 1)[1].strip())
        found[child] = {int(cpu) for mask in masks for cpu in parse_cpu_list(mask)}
    return found


def _listening_addresses(port: int) -> list[str]:
    """IPv4 addresses with a socket listening on ``port``, from ``/proc/net/tcp`` (Linux)."""
    table = Path("/proc/net/tcp")
    if not table.exists():
        return []
    found = []
    for line in table.read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, hex_port = local.split(":")
        if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
            found.append(".".join(str(b) for b in reversed(bytes.fromhex(address))))
    return found


def test_corrupt_local_artifact_fails_before_serving(artifact_dir: Path, tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt"
    shutil.copytree(artifact_dir, corrupt)
    data = bytearray((corrupt / "seen.npz").read_bytes())
    data[-10] ^= 0x01
    (corrupt / "seen.npz").write_bytes(data)
    port = free_port()
    command = [sys.executable, "-m", "affinity", "serve", "--model", str(corrupt)]
    command += ["--workers", "2", "--port", str(port), "--cache-dir", str(tmp_path / "cache")]
    done = subprocess.run(
        command,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1].startswith("error: checksum mismatch for seen.npz")
