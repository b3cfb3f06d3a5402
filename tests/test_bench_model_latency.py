"""The per-list cost benchmark: every model it names is fitted, timed on all three list kinds,
and reported; a model over its memory budget gets a refused row instead of ending the run."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import bench.model_latency
import bench.quality
from bench.model_latency import KINDS, main


def _log(users: int = 60, items: int = 40, seed: int = 3) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    pairs = {(u, int(i)) for u in range(users) for i in rng.choice(items, size=8, replace=False)}
    n = len(pairs)
    return pd.DataFrame(
        {
            "user_id": [f"u{u}" for u, _ in sorted(pairs)],
            "item_id": [f"i{i}" for _, i in sorted(pairs)],
            "event": ["purchase"] * n,
            "timestamp": np.arange(n, dtype=np.int64),
            "value": np.ones(n),
            "weight": np.ones(n),
        }
    )


def test_each_model_is_timed_on_every_list_kind_and_refusals_are_rows(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(bench.quality, "load_dataset", lambda name, root: _log())
    seen: list[bench.model_latency.Row] = []
    run = bench.model_latency.run
    monkeypatch.setattr(bench.model_latency, "run", lambda args: seen.extend(run(args)) or seen)
    argv = [
        "--model", "gfcf:form=dense",
        "--model", "gfcf:form=factored",
        "--model", "ease:max_memory_gb=0.000001",
        "--requests", "20",
        "--rounds", "2",
    ]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out

    dense, factored, ease = seen
    for row in (dense, factored):
        assert not row.refused
        assert row.fit_seconds > 0 and row.megabytes > 0
        for kind in KINDS:
            assert len(row.times[kind]) == 20
            assert min(row.times[kind]) > 0
    # The dense filter is the n_items² float32 matrix; the factored form keeps other arrays.
    assert dense.megabytes == pytest.approx(40 * 40 * 4 / 1e6, abs=1e-4)
    assert factored.megabytes != dense.megabytes
    assert ease.refused.startswith("EASE on 40 items needs")
    assert "| ease:max_memory_gb=0.000001 | refused: EASE on 40 items" in out
    assert "p50 of gfcf:form=factored against gfcf:form=dense: known " in out
    assert "Command: `python -m bench.model_latency --model gfcf:form=dense" in out
