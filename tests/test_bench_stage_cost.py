"""Smoke run of the stage strategies' cost benchmark (``bench/stage_cost.py``) on the tiny
model: every case runs, and the win-back case times only users whose stage gives win-back."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import stage_cost


def test_stage_cost_smoke_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--size", "tiny", "--users", "200", "--rounds", "1", "--workdir", str(tmp_path)]
    assert stage_cost.main(argv) == 0
    out = capsys.readouterr().out
    assert "`python -m bench.stage_cost --size tiny" in out
    rows = {line.split(" | ")[0].strip("| "): line for line in out.splitlines() if "|" in line}
    assert {"off", "on, no segments", "on, segments", "win_back only"} <= set(rows)
    win_back_users = int(rows["win_back only"].split(" | ")[1].replace(",", ""))
    assert 0 < win_back_users < 200  # at_risk, dormant and churned users only
