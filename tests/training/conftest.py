"""Shared helpers of the training tests."""

from __future__ import annotations

import numpy as np
import pandas as pd


def interaction_frame(rows: list[tuple[str, str, float]]) -> pd.DataFrame:
    """Interaction rows (user, item, weight), one view each in row order, as
    :func:`training.data.load_interactions` returns them."""
    users, items, weights = zip(*rows, strict=True)
    return pd.DataFrame(
        {
            "user_id": list(users),
            "item_id": list(items),
            "event": "view",
            "timestamp": np.arange(len(rows), dtype=np.int64),
            "value": 1.0,
            "weight": list(weights),
        }
    )
