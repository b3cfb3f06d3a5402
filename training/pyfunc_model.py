"""The MLflow pyfunc flavour of an Affinity model (models-from-code: no pickled Python object).

MLflow loads this file as code; the model's state is the Affinity artifact directory passed as the
``affinity`` artifact, read with the same checksum-verified, pickle-free loader the service uses.
Input: a DataFrame with a ``user_id`` column (and optionally ``recent_item_ids``, a list of item
ids per row). Output: one row per recommendation with ``user_id``, ``rank``, ``item_id``, ``score``
and ``source``. Parameter ``k`` (default 10) sets the list length.
"""

from typing import Any

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel


class AffinityPyfuncModel(PythonModel):
    """Serves :class:`models.engine.Engine` recommendations through MLflow's pyfunc API."""

    def load_context(self, context):  # type: ignore[no-untyped-def]
        from models.artifact import load_artifact
        from models.engine import Engine

        self.engine = Engine(load_artifact(context.artifacts["affinity"]))

    # A DataFrame hint tells MLflow not to derive a schema: the logged signature is explicit.
    def predict(self, context, model_input: pd.DataFrame, params=None):  # type: ignore[no-untyped-def]
        k = int((params or {}).get("k", 10))
        frame = pd.DataFrame(model_input)
        if "user_id" not in frame.columns:
            raise ValueError("input must have a 'user_id' column")
        recent_col = frame["recent_item_ids"] if "recent_item_ids" in frame.columns else None
        rows: list[dict[str, Any]] = []
        for pos, user in enumerate(frame["user_id"].astype(str)):
            recent = recent_col.iloc[pos] if recent_col is not None else None
            recent_ids = [str(x) for x in recent] if recent is not None and len(recent) else []
            result = self.engine.recommend(user, k, recent_item_ids=recent_ids)
            for rank, (item, score) in enumerate(
                zip(result.item_ids, result.scores, strict=True), start=1
            ):
                rows.append(
                    {
                        "user_id": user,
                        "rank": rank,
                        "item_id": item,
                        "score": float(score),
                        "source": str(result.source),
                    }
                )
        return pd.DataFrame(rows, columns=["user_id", "rank", "item_id", "score", "source"])


mlflow.models.set_model(AffinityPyfuncModel())
