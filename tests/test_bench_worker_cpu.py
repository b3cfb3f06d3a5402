"""Smoke run of the worker CPU benchmark (``bench/worker_cpu.py``) on the tiny model: the probe
reaches the worker through its ``sitecustomize`` hook and shows up in its CPU per request."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from bench import common, worker_cpu


def test_probes_do_the_work_they_name() -> None:
    worker_cpu.probe_work("python:10")()
    assert worker_cpu.quiet_probe("scan:200", calls=200) > 0
    with pytest.raises(ValueError, match="unknown probe"):
        worker_cpu.probe_work("sleep:10")
    with pytest.raises(ValueError, match="scan:N takes"):
        worker_cpu.probe_work("scan:0")


def test_cpu_seconds_counts_this_process() -> None:
    before = common.cpu_seconds(os.getpid())
    deadline = time.process_time() + 0.3
    while time.process_time() < deadline:
        pass
    assert common.cpu_seconds(os.getpid()) - before >= 0.2


def test_worker_cpu_smoke_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # A probe of about a millisecond per request: far above the noise of a short run.
    heavy = "python:40000"
    argv = ["--size", "tiny", "--workdir", str(tmp_path), "--results", str(tmp_path)]
    argv += ["--variants", f"off,{heavy}", "--duration", "4", "--rounds", "2"]
    argv += ["--concurrency", "2", "--requests", "200"]
    assert worker_cpu.main(argv) == 0
    out = capsys.readouterr().out
    assert "python -m bench.worker_cpu --size tiny" in out
    report = json.loads((tmp_path / "worker-cpu.json").read_text())
    rows = {row["variant"]: row for row in report["rows"]}
    assert rows["off"]["cpu_us_per_request"] > 0
    probe = rows[heavy]
    # The worker ran the probe ahead of each request: its CPU per request grew by at least
    # half of what the probe costs in a quiet loop.
    assert probe["quiet_us"] > 300
    assert probe["added_us"] > 0.5 * probe["quiet_us"]
    assert f"| {heavy} |" in out
