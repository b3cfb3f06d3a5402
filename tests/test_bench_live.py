"""Smoke run of the freshness benchmark (``bench/live.py``): a tiny model, one worker, a few
events; the benchmark's numbers are its own business, only that it runs and what one worker must
give (every event reflected by the first probe, since the acknowledging worker applies it)."""

from __future__ import annotations

import json
from pathlib import Path

from bench import live


def test_freshness_smoke_run(tmp_path: Path) -> None:
    results = tmp_path / "results"
    argv = ["freshness", "--size", "tiny", "--events", "5", "--workers", "1", "--parallel", "2"]
    argv += ["--workdir", str(tmp_path), "--results", str(results), "--max-wait", "2"]
    assert live.main(argv) == 0
    report = json.loads((results / "live-freshness.json").read_text())
    assert report["command"].startswith("python -m bench.live freshness --size tiny")
    # SQLite always; PostgreSQL too when AFFINITY_TEST_POSTGRES_URI is set (as in CI).
    rows = report["rows"]
    assert rows[0]["store"] == "SQLite"
    assert [row["store"] for row in rows[1:]] in ([], ["PostgreSQL"])
    for row in rows:
        assert row["measured"] == 5 and row["failure_count"] == 0
        assert row["first_probe_reflected"] == 1.0
        assert row["first_ms"]["n"] == 5 and row["first_ms"]["missing"] == 0
        assert row["all_workers_ms"]["n"] == 5
        for record in row["records"]:
            assert record["first_probe_same_worker"]
            assert record["probe_log"][0][2] is True
    # The store's files are removed afterwards.
    assert not list((tmp_path / "live").glob("*.db*"))
