"""Evaluation per lifecycle stage (training/evaluate.py): each test user's stage from the training
part as of its end, every metric per stage in MLflow's names and in the report, checked by hand
on a popularity model."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from models.errors import InvalidInputError
from models.popularity import Popularity
from models.vocabulary import Vocabulary
from training.evaluate import evaluate, evaluate_with_baseline, user_stages

DAY = 86_400


def test_each_users_stage_is_computed_from_the_training_part_as_of_its_end() -> None:
    end = 1_000 * DAY
    frame = pd.DataFrame(
        {
            "user_id": ["new", "buyer", "buyer", "steady", "steady", "gone", "quiet", "shown"],
            "item_id": ["a", "a", "b", "a", "b", "a", "a", "a"],
            "event": ["view", "view", "purchase", "view", "view", "view", "view", "impression"],
            "timestamp": [
                end - 3 * DAY,  # first seen 3 days ago, never bought: new
                end - 60 * DAY,
                end - 5 * DAY,  # bought 5 days ago: activated
                end - 100 * DAY,
                end,  # seen for 100 days, last today: active (and the newest event: as_of)
                end - 200 * DAY,  # 200 days idle: churned
                end - 45 * DAY,  # 45 days idle: at_risk
                end - DAY,  # only an impression: no stage
            ],
        }
    )
    users = Vocabulary(["new", "buyer", "steady", "gone", "quiet", "shown", "absent"], kind="user")
    stages = user_stages(frame, users)
    assert stages.tolist() == ["new", "activated", "active", "churned", "at_risk", "", ""]
    # As of 20 days earlier, "buyer" has not bought yet (later events are left out) and was
    # last seen 60 - 20 = 40 days before: at_risk; "steady" 100 - 20 = 80 days before: dormant.
    earlier = user_stages(frame, users, as_of=float(end - 20 * DAY))
    assert earlier[[1, 2]].tolist() == ["at_risk", "dormant"]


def _matrices() -> tuple[sp.csr_matrix, sp.csr_matrix]:
    # 4 users x 5 items; popularity (distinct training users): item 0: 3, item 1: 2, others 0.
    train = sp.csr_matrix(
        np.array(
            [
                [1, 0, 0, 0, 0],
                [1, 1, 0, 0, 0],
                [1, 1, 0, 0, 0],
                [0, 0, 0, 0, 0],
            ],
            dtype=np.float32,
        )
    )
    test = sp.csr_matrix(
        np.array(
            [
                [0, 1, 0, 0, 0],  # top-1 for user 0 (0 seen) is item 1: a hit
                [0, 0, 0, 0, 1],  # user 1 gets item 2 (ties by index): a miss
                [0, 0, 1, 0, 0],  # user 2 gets item 2: a hit
                [1, 0, 0, 0, 0],  # user 3 gets item 0: a hit
            ],
            dtype=np.float32,
        )
    )
    return train, test


def test_every_metric_is_reported_per_stage() -> None:
    train, test = _matrices()
    model = Popularity().fit(train)
    stages = np.array(["at_risk", "at_risk", "active", ""], dtype=object)
    result = evaluate(model, train, test, k=1, stages=stages)
    at_risk, active = result.stages["at_risk"], result.stages["active"]
    assert (at_risk.users, active.users) == (2, 1)
    assert at_risk.metrics["ndcg_at_1"] == pytest.approx(0.5)  # one hit of two users
    assert at_risk.metrics["recall_at_1"] == pytest.approx(0.5)
    assert at_risk.metrics["coverage_at_1"] == pytest.approx(2 / 5)  # items 1 and 2 shown
    assert active.metrics["ndcg_at_1"] == pytest.approx(1.0)
    assert result.stages["dormant"].users == 0 and math.isnan(
        result.stages["dormant"].metrics["ndcg_at_1"]
    )
    # Overall: 3 hits of 4; the user without a stage counts there only.
    assert result.metrics["ndcg_at_1"] == pytest.approx(0.75)
    flat = result.to_flat_dict()
    assert flat["ndcg_at_1.stage_at_risk"] == pytest.approx(0.5)
    assert flat["eval_users.stage_at_risk"] == 2.0
    assert flat["novelty_at_1.stage_active"] == pytest.approx(
        result.stages["active"].metrics["novelty_at_1"]
    )
    assert flat["eval_users.stage_dormant"] == 0.0
    assert "ndcg_at_1.stage_dormant" not in flat  # NaN is left out
    report = result.report_markdown()
    assert "## By lifecycle stage" in report
    assert "| at_risk | 2 | " in report and "| active | 1 | " in report


def test_the_baseline_is_reported_per_stage_too_and_bad_stages_are_refused() -> None:
    train, test = _matrices()
    model = Popularity().fit(train)
    stages = np.array(["new", "new", "new", "new"], dtype=object)
    comparison = evaluate_with_baseline(model, train, test, k=1, stages=stages)
    assert comparison.baseline.stages["new"].users == 4
    assert "baseline_ndcg_at_1.stage_new" in comparison.to_flat_dict()
    with pytest.raises(InvalidInputError, match="unknown stage") as info:
        evaluate(model, train, test, k=1, stages=np.array(["lapsed"] * 4, dtype=object))
    assert info.value.field == "stages"
    with pytest.raises(InvalidInputError, match="one stage per user"):
        evaluate(model, train, test, k=1, stages=np.array(["new"], dtype=object))
