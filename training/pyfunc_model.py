"""The MLflow pyfunc flavour of an Affinity model (models-from-code: no pickled Python object).

MLflow loads this file as code; the model's state is the Affinity artifact directory passed as the
``affinity`` artifact, read with the same checksum-verified, pickle-free loader the service uses,
and every list comes from the same ranking pipeline as a served one.

Input: a DataFrame with a ``user_id`` column and, optionally, ``recent_item_ids`` (items the user
acted on since training, folded in) and ``exclude_item_ids`` (items never to return), each a list
of item ids per row. Parameters: ``k`` (default 10), ``item_types`` and ``categories`` (lists;
empty means no restriction) and ``include_seen`` (default false), as in the ``Recommend`` RPC.
Output: one row per recommendation with ``user_id``, ``rank``, ``item_id``, ``score`` and
``source``.
"""

from typing import Any

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel

COLUMNS = ["user_id", "rank", "item_id", "score", "source"]


def _ids(value: Any) -> list[str]:
    """A list-of-ids cell (a list, an array, or missing) as a list of strings."""
    if value is None or (isinstance(value, float) and value != value):
        return []
    return [str(x) for x in value]


class AffinityPyfuncModel(PythonModel):
    """Serves :class:`models.ranking.RankingPipeline` lists through MLflow's pyfunc API."""

    def load_context(self, context):  # type: ignore[no-untyped-def]
        from models.artifact import load_artifact
        from models.ranking import RankingPipeline

        self.pipeline = RankingPipeline.from_bundle(load_artifact(context.artifacts["affinity"]))

    # A DataFrame hint tells MLflow not to derive a schema: the logged signature is explicit.
    def predict(self, context, model_input: pd.DataFrame, params=None):  # type: ignore[no-untyped-def]
        from models.ranking import ItemFilter

        params = params or {}
        k = int(params.get("k", 10))
        item_filter = ItemFilter.of(
            [t for t in params.get("item_types") or [] if t],
            [c for c in params.get("categories") or [] if c],
        )
        include_seen = bool(params.get("include_seen", False))
        frame = pd.DataFrame(model_input)
        if "user_id" not in frame.columns:
            raise ValueError("input must have a 'user_id' column")
        recent = frame["recent_item_ids"] if "recent_item_ids" in frame.columns else None
        exclude = frame["exclude_item_ids"] if "exclude_item_ids" in frame.columns else None
        rows: list[tuple[str, int, str, float, str]] = []
        for pos, user in enumerate(frame["user_id"].astype(str)):
            result = self.pipeline.recommend(
                user,
                k,
                recent_item_ids=_ids(recent.iloc[pos]) if recent is not None else [],
                exclude_item_ids=_ids(exclude.iloc[pos]) if exclude is not None else [],
                item_filter=item_filter,
                include_seen=include_seen,
            )
            for rank, (item, score) in enumerate(
                zip(result.item_ids, result.scores, strict=True), start=1
            ):
                rows.append((user, rank, item, float(score), str(result.source)))
        return pd.DataFrame(rows, columns=COLUMNS)


mlflow.models.set_model(AffinityPyfuncModel())
