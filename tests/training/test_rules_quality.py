"""The ranking-rules quality bench (``bench/rules_quality.py``): derived categories, the campaign
choice, a run on a small generated frame, the report in ``docs/quality.md`` and, on the shared
data, that each rule moves the metric it is for."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import bench.rules_quality as rq
from bench.datasets import DATASETS_DIR


@pytest.mark.parametrize(
    ("description", "category"),
    [
        ("JUMBO BAG RED RETROSPOT", "bags & purses"),
        ("WHITE HANGING HEART T-LIGHT HOLDER", "candles & lights"),
        ("PACK OF 72 RETROSPOT CAKE CASES", "party & baking"),
        ("SET/6 RED SPOTTY PAPER CUPS", "kitchen & tableware"),
        ("POSTAGE", ""),
    ],
)
def test_retail_categories_come_from_the_last_product_word(description: str, category: str) -> None:
    assert rq.retail_category(description) == category


def test_the_campaign_is_the_category_the_lists_show_least() -> None:
    categories = np.array(["a", "a", "b", "b", "c", ""])
    # interactions: a 50%, b 40%, c 1 of 10 (10%); "" never counts
    interactions = np.array([0, 0, 1, 1, 0, 2, 3, 2, 3, 4])
    lists = np.array([[0, 1, 4, -1], [0, 2, 4, 5]])  # b shown 1/7, c 2/7 of the places
    name, share, shown = rq.campaign_category(categories, interactions, lists)
    assert (name, share) == ("b", pytest.approx(0.4)) and shown == pytest.approx(1 / 7)
    with pytest.raises(ValueError, match="no category"):
        rq.campaign_category(np.array(["", ""]), np.array([0, 1]), lists[:, :1])


def _frame(n_users: int = 60, n_items: int = 40, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(n_users):
        taste = u % 4
        liked = rng.choice(np.arange(taste * 10, taste * 10 + 10), size=6, replace=False)
        liked = np.concatenate([liked, rng.choice(n_items, size=3, replace=False)])
        rows += [(f"u{u}", f"i{i}", int(1_000_000 + 3_600 * (u + 7 * i))) for i in set(liked)]
    users, items, stamps = zip(*rows, strict=True)
    return pd.DataFrame(
        {
            "user_id": list(users),
            "item_id": list(items),
            "event": "rating",
            "timestamp": np.array(stamps, dtype=np.int64),
            "value": 1.0,
            "weight": 1.0,
        }
    )


def test_a_run_reports_every_setting_and_writes_the_document(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    frame = _frame()
    monkeypatch.setattr(rq, "load_dataset", lambda name, root: frame)
    monkeypatch.setattr(
        rq,
        "item_categories",
        lambda dataset, ids, root: np.array(["abcd"[int(str(i)[1:]) % 4] for i in ids]),
    )
    wanted = ("none", "cap", "promotion")
    settings = [s for s in rq.SETTINGS if s.family in wanted][:4]  # none, cap 1, cap 2, cap 3
    settings.append(next(s for s in rq.SETTINGS if s.family == "promotion"))
    monkeypatch.setattr(rq, "fit_model", _small_als)
    (report,) = rq.run_dataset(
        "ml-latest-small", "random-75-25", algorithms=("als",), settings=settings, log_runs=False
    )
    assert [row.setting.label for row in report.rows] == [s.label for s in settings]
    by_label = {row.setting.label: row.metrics for row in report.rows}
    assert by_label["cap 1 per category"]["diversity_categories_at_10"] == pytest.approx(1.0)
    assert (
        by_label["cap 3 per category"]["diversity_categories_at_10"]
        >= by_label["no rules"]["diversity_categories_at_10"]
    )
    assert by_label["promote campaign 10%"]["campaign_share_at_10"] >= 0.1 - 1e-9
    for row in report.rows:
        assert 0 < row.metrics["diversity_at_10"] <= 2  # ALS: measured over its item vectors
    table = rq.render_table(report)
    assert "| cap 1 per category |" in table and "± " in table

    doc = tmp_path / "quality.md"
    doc.write_text(f"# Quality\n\nbefore\n\n{rq.BEGIN}\nold\n{rq.END}\n\nafter\n")
    section = rq.render_section([report], "python -m bench.rules_quality --x")
    rq.update_document(doc, section)
    rq.update_document(doc, section)  # idempotent
    text = doc.read_text()
    assert text.count(rq.BEGIN) == 1 and "old" not in text and "after" in text
    assert "Command: `python -m bench.rules_quality --x`" in text
    rq.plot([report], tmp_path / "img" / "plot.png")
    assert (tmp_path / "img" / "plot.png").stat().st_size > 1000


def _small_als(algorithm: str, params: dict, matrix):  # type: ignore[no-untyped-def]
    from training.fit import fit_model

    return fit_model(algorithm, {"factors": 8, "iterations": 5, **params}, matrix)


@pytest.mark.realdata
@pytest.mark.slow
def test_on_movielens_each_rule_moves_its_metric() -> None:
    if not (DATASETS_DIR / "ml-latest-small" / "ratings.csv").exists():
        pytest.skip("../shared/datasets not present")
    labels = {"no rules", "cap 3 per category", "promote campaign 10%", "explore 10% (new < 90 d)"}
    settings = [s for s in rq.SETTINGS if s.label in labels]
    (report,) = rq.run_dataset(
        "ml-latest-small", "random-75-25", algorithms=("als",), settings=settings, log_runs=False
    )
    m = {row.setting.label: row.metrics for row in report.rows}
    none = m["no rules"]
    assert (
        m["cap 3 per category"]["diversity_categories_at_10"]
        > 1.1 * (none["diversity_categories_at_10"])
    )
    assert m["promote campaign 10%"]["campaign_share_at_10"] == pytest.approx(0.1, abs=0.01)
    explored = m["explore 10% (new < 90 d)"]
    assert explored["new_share_at_10"] == pytest.approx(0.1, abs=0.01)
    assert explored["coverage_at_10"] > 1.1 * none["coverage_at_10"]
    # Rules cost accuracy on held-out data, and never improve it much.
    for label, metrics in m.items():
        assert metrics["ndcg_at_10"] <= none["ndcg_at_10"] * 1.02, label
