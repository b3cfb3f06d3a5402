"""bench/audience_quality.py end to end on a tiny generated log; its recall, hand-checked."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from bench.audience_quality import main, recall_at, time_split


def test_recall_and_the_time_split() -> None:
    engaged = np.array([True, False, True, True, False])
    assert recall_at(np.array([0, 1]), engaged) == pytest.approx(1 / 3)
    assert recall_at(np.array([0, 2, 3]), engaged) == 1.0
    assert np.isnan(recall_at(np.array([0]), np.zeros(5, bool)))
    frame = pd.DataFrame({"timestamp": np.arange(100)})
    train, holdout, cut = time_split(frame, 0.1)
    assert cut == 89 and len(train) == 89 and holdout["timestamp"].min() == 89


def test_the_bench_beats_random_on_a_generated_log(capsys: pytest.CaptureFixture[str]) -> None:
    args = [
        "--datasets",
        "generated",
        "--generated-users",
        "600",
        "--generated-items",
        "150",
        "--generated-interactions",
        "15000",
        "--top-items",
        "8",
        "--top-categories",
        "2",
        "--shares",
        "0.1",
        "--factors",
        "16",
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| generated")]
    assert len(rows) == 2  # all users, and one stage
    for row in rows:
        cells = [c.strip().strip("*") for c in row.strip("|").split("|")]
        model, _, random = (float(c) for c in cells[3:6])
        assert model > random
