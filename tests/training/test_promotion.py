"""The promotion gate scores the champion on exactly the holdout the new version was scored on."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from models.algorithms import get_algorithm
from models.artifact import ModelBundle
from tests.training.conftest import interaction_frame
from training.confidence import ConfidenceConfig, build_matrix
from training.data import catalog_arrays
from training.evaluate import build_holdout, evaluate
from training.promotion import evaluate_bundle_on_split
from training.split import random_split


def _log() -> pd.DataFrame:
    """Users who like a block of neighbouring items, plus one item each that nobody else has."""
    rng = np.random.default_rng(5)
    rows = []
    for user in range(60):
        start = int(rng.integers(0, 30))
        items = [f"i{item}" for item in range(start, start + 10)] + [f"own{user}"]
        rows += [(f"u{user}", item) for item in items]
    return interaction_frame([(user, item, 1.0) for user, item in rows])


def test_the_champion_is_charged_the_same_misses_as_the_new_version() -> None:
    part = random_split(_log(), fraction=0.3, seed=2)
    train = build_matrix(part.train, ConfidenceConfig())
    holdout = build_holdout(part.test, train.users, train.items)
    assert holdout.pairs_unknown_item == part.stats.cold_item_pairs > 0
    model = get_algorithm("itemknn")(K=10).fit(train.matrix)
    champion = ModelBundle(
        model=model,
        users=train.users,
        items=train.items,
        seen=train.matrix,
        catalog=catalog_arrays(train.items.ids, None),
        popularity=np.zeros(len(train.items), dtype=np.float32),
        trending=np.zeros(len(train.items), dtype=np.float32),
    )
    gate = evaluate_bundle_on_split(champion, train, holdout, k=5)
    new = evaluate(model, train.matrix, holdout.matrix, k=5, unrankable=holdout.unrankable)
    for name in ("ndcg_at_5", "recall_at_5", "map_at_5", "precision_at_5", "hit_rate_at_5"):
        assert gate[name] == pytest.approx(new.metrics[name]), name
    forgetful = evaluate(model, train.matrix, holdout.matrix, k=5).metrics
    assert gate["recall_at_5"] < forgetful["recall_at_5"]
