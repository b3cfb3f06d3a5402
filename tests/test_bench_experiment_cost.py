"""Smoke run of the experiment cost benchmark (``bench/experiment_cost.py``): a tiny model, one
worker, short slices; its numbers are its own business, only that it runs, that the experiment
it measures is really routing users to both arms, and that it reports what it promises."""

from __future__ import annotations

import json
from pathlib import Path

from bench import experiment_cost


def test_experiment_cost_smoke_run(tmp_path: Path) -> None:
    results = tmp_path / "results"
    argv = ["--size", "tiny", "--duration", "1", "--rounds", "1", "--concurrency", "1"]
    argv += ["--requests", "200", "--check-users", "100", "--workdir", str(tmp_path)]
    argv += ["--results", str(results)]
    assert experiment_cost.main(argv) == 0
    report = json.loads((results / "experiment-cost.json").read_text())
    assert report["command"].startswith("python -m bench.experiment_cost --size tiny")
    arms = report["arms"]
    assert arms["none"] == {"-": 100} and arms["shadow"] == {"champion": 100}
    assert set(arms["ab"]) == {"champion", "challenger"} and sum(arms["ab"].values()) == 100
    assert set(report["ratios"]) == {"ab / none, c=1", "shadow / none, c=1"}
    assert all(ratio > 0 for ratio in report["ratios"].values())
    assert set(report["resident_mib"]) == {"none", "ab", "shadow"}
    assert all(r["errors"] == {} and r["ok"] == r["requests"] > 0 for r in report["results"])
