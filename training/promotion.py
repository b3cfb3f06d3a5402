"""The promotion gate: ``champion`` moves only to a version that is better on the same holdout.

The current champion is downloaded and evaluated on this run's holdout through the same ranking
pipeline as every list (its own id maps are translated to this run's, users it does not know are
folded in from their training items), so both numbers come from the same users and the same
held-out items, those unseen in this run's training part counted as misses for both. A better
new version gets alias ``champion``; otherwise it gets ``challenger``. ``--force-promote``
overrides.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp

from models.artifact import ModelBundle
from models.ranking import RankingPipeline
from models.ranking_metrics import active_users, summarize
from models.vocabulary import MISSING
from registry import mlflow_store
from training.evaluate import Holdout

logger = logging.getLogger(__name__)


@dataclass
class GateDecision:
    promoted: bool
    champion_version: str | None
    champion_metric: float | None
    new_metric: float
    message: str


def evaluate_bundle_on_split(
    bundle: ModelBundle, train: Any, test: Holdout, *, k: int, batch_size: int = 512
) -> dict[str, float]:
    """Metrics of a previously trained bundle on a split built with other id maps.

    ``train`` is this run's training :class:`~training.confidence.InteractionMatrix`, ``test``
    its :class:`~training.evaluate.Holdout` (on the same users and items).
    """
    users = test.users
    # Column map: this run's item index -> the bundle's item index (or MISSING).
    to_bundle = bundle.items.lookup(train.items.ids.tolist())
    # Reverse: the bundle's item index -> this run's item index (or -1).
    from_bundle = np.full(len(bundle.items), -1, dtype=np.int64)
    known = to_bundle != MISSING
    from_bundle[to_bundle[known]] = np.flatnonzero(known)
    # Each user's items as this run's training part has them, in the bundle's indices: the
    # champion must not recommend them (as for the new model), a model that scores from a
    # user's items scores from them, and a user the champion never saw is folded in from them.
    # The champion's own seen lists would leak this run's held-out items into its scores.
    run_users = bundle.users.lookup(train.users.ids.tolist())
    coo = train.matrix.tocoo()
    keep = known[coo.col] & (run_users[coo.row] != MISSING)
    seen = sp.csr_matrix(
        (coo.data[keep], (run_users[coo.row[keep]], to_bundle[coo.col[keep]])),
        shape=(len(bundle.users), len(bundle.items)),
        dtype=np.float32,
    )
    # Ranked as the new model is evaluated: every item of the catalog is a candidate (the
    # availability of the champion's day does not judge this run's holdout).
    pipeline = RankingPipeline(
        bundle.model, seen=seen, popularity=bundle.popularity, items=bundle.items
    )
    bundle_users = run_users[users]
    recs = np.full((len(users), k), -1, dtype=np.int64)
    for start in range(0, len(users), batch_size):
        sl = slice(start, start + batch_size)
        rows = train.matrix[users[sl]].tocoo()
        in_bundle = known[rows.col]
        history = sp.csr_matrix(
            (rows.data[in_bundle], (rows.row[in_bundle], to_bundle[rows.col[in_bundle]])),
            shape=(rows.shape[0], len(bundle.items)),
            dtype=np.float32,
        )
        ids = pipeline.rank_users(bundle_users[sl], k, history=history, allowed=from_bundle >= 0)
        recs[sl] = np.where(ids >= 0, from_bundle[np.maximum(ids, 0)], -1)
    item_users = np.bincount(train.matrix.indices, minlength=len(train.items))
    return summarize(
        recs,
        test.matrix[users],
        k=k,
        n_items=len(train.items),
        unrankable=test.unrankable[users],
        item_popularity=item_users,
        n_users=active_users(train.matrix),
    )


def decide(
    *,
    model_name: str,
    new_version: str,
    new_metric: float,
    metric_name: str,
    train: Any,
    test: Holdout,
    k: int,
    force: bool = False,
) -> GateDecision:
    """Compare with the current champion and move the aliases; returns the decision."""
    current = mlflow_store.get_alias_version(model_name, mlflow_store.CHAMPION)
    champion_metric: float | None = None
    if current is not None and str(current.version) != str(new_version):
        try:
            bundle = mlflow_store.load_model_uri(f"models:/{model_name}/{current.version}")
            champion_metric = float(
                evaluate_bundle_on_split(bundle, train, test, k=k).get(metric_name, math.nan)
            )
        except Exception as exc:  # a broken champion must not block a good new model
            logger.warning("could not evaluate champion v%s: %s", current.version, exc)
            champion_metric = math.nan
    if current is None:
        promoted, why = True, "no champion yet"
    elif force:
        promoted, why = True, "--force-promote"
    elif champion_metric is None or math.isnan(champion_metric):
        promoted, why = True, "champion could not be evaluated"
    else:
        promoted = new_metric > champion_metric
        why = "better" if promoted else "not better"
    alias = mlflow_store.CHAMPION if promoted else mlflow_store.CHALLENGER
    mlflow_store.set_alias(model_name, alias, new_version)
    champ = "n/a" if champion_metric is None else f"{champion_metric:.4f}"
    message = (
        f"version {new_version} -> {alias} ({why}: {metric_name} new {new_metric:.4f} vs "
        f"champion{'' if current is None else ' v' + str(current.version)} {champ})"
    )
    logger.info("promotion gate: %s", message)
    return GateDecision(
        promoted=promoted,
        champion_version=None if current is None else str(current.version),
        champion_metric=champion_metric,
        new_metric=new_metric,
        message=message,
    )
