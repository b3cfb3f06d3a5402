"""Smoke run of the garbage-collection pause benchmark (``bench/gc_pauses.py``) on the tiny
model: both variants run in their own process, and the settled heap has its objects frozen."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import gc_pauses


def test_gc_pauses_smoke_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--size", "tiny", "--requests", "3000", "--rounds", "1", "--workdir", str(tmp_path)]
    assert gc_pauses.main(argv) == 0
    out = capsys.readouterr().out
    assert "command: python -m bench.gc_pauses --size tiny" in out
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in out.splitlines()}
    before, settled = rows["as before"], rows["settled (gc.freeze)"]
    assert int(before[3].replace(",", "")) == 0  # nothing frozen as before
    assert int(settled[3].replace(",", "")) > 10_000  # the libraries and the model frozen
    # The collector tracks far fewer objects once the heap is settled.
    assert int(settled[2].replace(",", "")) < int(before[2].replace(",", "")) / 2
