"""Loaders that turn the public benchmark data sets into Affinity's interaction frame.

Each loader returns the frame :func:`training.data.load_interactions` produces (``user_id``,
``item_id``, ``event``, ``timestamp`` as int64 unix seconds, ``value``, ``weight``), so the bench
splits, builds matrices and fits exactly as ``affinity train`` does.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from models.errors import DataError, InvalidInputError
from training.data import FRAME_COLUMNS

logger = logging.getLogger(__name__)

DATASETS_DIR = Path(__file__).resolve().parents[1] / "../shared/datasets"
"""Where the shared public data sets live, relative to the repository root."""

DENSE_MIN_RATINGS = 10
"""``ml-latest-small-dense`` keeps movies with at least this many ratings (about 2.2k movies)."""


def _frame(users: pd.Series, items: pd.Series, event: str, seconds: np.ndarray) -> pd.DataFrame:
    n = len(users)
    return pd.DataFrame(
        {
            "user_id": users.astype(str).to_numpy(),
            "item_id": items.astype(str).to_numpy(),
            "event": np.full(n, event, dtype=object),
            "timestamp": np.asarray(seconds, dtype=np.int64),
            "value": np.ones(n, dtype=np.float64),
            "weight": np.ones(n, dtype=np.float64),
        },
        columns=list(FRAME_COLUMNS),
    )


def load_movielens(root: Path | None = None) -> pd.DataFrame:
    """ml-latest-small ``ratings.csv``: every rating (0.5 to 5 stars) is one positive event.

    This is the Microsoft Recommenders MovieLens protocol: the star value is ignored, so each
    (user, movie) pair has weight 1 and the matrix is binary.
    """
    path = (root or DATASETS_DIR) / "ml-latest-small" / "ratings.csv"
    if not path.is_file():
        raise DataError(f"{path} not found")
    ratings = pd.read_csv(path, dtype={"userId": np.int64, "movieId": np.int64})
    return _frame(ratings["userId"], ratings["movieId"], "rating", ratings["timestamp"].to_numpy())


def load_movielens_dense(
    root: Path | None = None, min_ratings: int = DENSE_MIN_RATINGS
) -> pd.DataFrame:
    """ml-latest-small restricted to movies with at least ``min_ratings`` ratings (derived).

    MovieLens-100k (943 users, 1,682 movies, 6.3% dense) is denser than ml-latest-small (610
    users, 9,724 movies, 1.7% dense); dropping rare movies gives a catalog of a similar size and
    density for an honest estimate of how the models behave there. It is a derived set, not
    ML-100k, and the report labels it so.
    """
    frame = load_movielens(root)
    counts = frame["item_id"].value_counts()
    keep = frame["item_id"].isin(counts.index[counts >= min_ratings])
    return frame[keep].reset_index(drop=True)


def load_movielens_100k(root: Path | None = None) -> pd.DataFrame:
    """MovieLens-100k ``u.data`` (user, item, rating, timestamp; tab-separated), if present.

    Not among the shared data sets; put GroupLens' ``ml-100k`` folder next to them to run the
    published Microsoft Recommenders comparison directly. Every rating is one positive event.
    """
    path = (root or DATASETS_DIR) / "ml-100k" / "u.data"
    if not path.is_file():
        raise DataError(f"{path} not found: download ml-100k from GroupLens to compare on it")
    ratings = pd.read_csv(
        path, sep="\t", names=["user", "item", "rating", "timestamp"], dtype=np.int64
    )
    return _frame(ratings["user"], ratings["item"], "rating", ratings["timestamp"].to_numpy())


def load_online_retail(root: Path | None = None) -> pd.DataFrame:
    """UCI Online Retail purchases: rows with a CustomerID and Quantity > 0, item = Description.

    Each purchase row is one event of weight 1, so a customer's repeat purchases of an item add
    up to the pair's confidence, as ``affinity train`` does with a purchase log.
    """
    path = (root or DATASETS_DIR) / "uci-online-retail" / "online_retail.parquet"
    if not path.is_file():
        raise DataError(f"{path} not found")
    raw = pd.read_parquet(path, columns=["Description", "Quantity", "InvoiceDate", "CustomerID"])
    description = raw["Description"].astype("string").str.strip()
    keep = raw["CustomerID"].notna() & (raw["Quantity"] > 0) & description.notna()
    keep &= description.str.len().fillna(0) > 0
    rows = raw[keep.to_numpy()]
    stamps = pd.to_datetime(rows["InvoiceDate"])
    if stamps.dt.tz is None:
        stamps = stamps.dt.tz_localize("UTC")
    seconds = ((stamps - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(1, "s")).to_numpy(np.int64)
    customers = rows["CustomerID"].astype(np.int64)
    return _frame(customers, description[keep.to_numpy()], "purchase", seconds)


LOADERS: dict[str, Callable[[Path | None], pd.DataFrame]] = {
    "ml-latest-small": load_movielens,
    "ml-latest-small-dense": load_movielens_dense,
    "uci-online-retail": load_online_retail,
    "ml-100k": load_movielens_100k,
}
"""Data set name -> loader taking the datasets folder (None: :data:`DATASETS_DIR`)."""


def load_dataset(name: str, root: Path | None = None) -> pd.DataFrame:
    """The interaction frame of the named data set (see :data:`LOADERS`)."""
    try:
        loader = LOADERS[name]
    except KeyError:
        raise InvalidInputError(
            f"unknown dataset {name!r}; choose one of {', '.join(LOADERS)}", field="dataset"
        ) from None
    frame = loader(root)
    logger.info(
        "%s: %d events, %d users, %d items",
        name,
        len(frame),
        frame["user_id"].nunique(),
        frame["item_id"].nunique(),
    )
    return frame
