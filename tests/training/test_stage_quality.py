"""The stage-strategy bench (``bench/stage_quality.py``) at a tiny size: a generated log, every
strategy per stage, the choice of defaults and the section it appends to ``docs/quality.md``."""

from __future__ import annotations

from pathlib import Path

import pytest

import bench.stage_quality as sq


def _row(stage: str, users: int, ndcg: dict[str, float]) -> sq.StageRow:
    row = sq.StageRow(stage, users)
    row.metrics = {
        s: {"ndcg": v, "recall": 0.0, "coverage": 0.0, "novelty": 0.0} for s, v in ndcg.items()
    }
    return row


def test_a_default_must_match_personalized_on_every_data_set() -> None:
    first = sq.DatasetResult(
        "one",
        0.0,
        0,
        0,
        [
            _row("at_risk", 30, {"personalized": 0.10, "new_user": 0.05, "win_back": 0.12}),
            _row("dormant", 30, {"personalized": 0.10, "new_user": 0.11, "win_back": 0.13}),
            _row("churned", 5, {"personalized": 0.10, "new_user": 0.00, "win_back": 0.30}),
        ],
    )
    second = sq.DatasetResult(
        "two",
        0.0,
        0,
        0,
        [
            _row("at_risk", 25, {"personalized": 0.20, "new_user": 0.10, "win_back": 0.19}),
            _row("dormant", 40, {"personalized": 0.20, "new_user": 0.20, "win_back": 0.21}),
        ],
    )
    chosen = sq.choose_defaults([first, second], min_users=20)
    assert chosen["at_risk"] == "personalized"  # win_back loses on the second data set
    assert chosen["dormant"] == "win_back"  # best mean lift, never below personalized
    assert chosen["churned"] == "personalized"  # 5 users: too few to decide
    assert chosen["new"] == "personalized"  # no users anywhere


def test_the_bench_runs_on_a_tiny_generated_log(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    doc = tmp_path / "quality.md"
    doc.write_text("# Quality\n\nearlier sections\n")
    argv = ["--dataset", "generated", "--generated-size", "300,80,6000", "--doc", str(doc)]
    assert sq.main(argv) == 0
    text = doc.read_text()
    assert text.startswith("# Quality\n\nearlier sections\n")  # appended, nothing replaced
    assert text.count(sq.BEGIN) == 1 and text.rstrip().endswith(sq.END)
    assert ("| active |" in text and "| win_back |" in text) or "win_back" in text
    assert "Command: `python -m bench.stage_quality --dataset generated" in text
    # Every strategy is measured for a stage with users.
    for strategy in ("personalized", "new_user", "win_back"):
        assert "| active | " in text and f" | {strategy} | " in text
    # A second run replaces its own section, still at the end.
    assert sq.main(argv) == 0
    assert doc.read_text().count(sq.BEGIN) == 1
