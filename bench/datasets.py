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


def _adjacency_lists(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """LightGCN's ``user item item ...`` lines as parallel (user, item) arrays."""
    users: list[np.ndarray] = []
    items: list[np.ndarray] = []
    with path.open() as lines:
        for number, line in enumerate(lines, 1):
            fields = line.split()
            if not fields:
                continue
            try:
                row = np.asarray(fields, dtype=np.int64)
            except ValueError:
                raise DataError(f"{path}:{number}: not a line of integer ids") from None
            users.append(np.full(len(row) - 1, row[0], dtype=np.int64))
            items.append(row[1:])
    if not users:
        raise DataError(f"{path} holds no interactions")
    return np.concatenate(users), np.concatenate(items)


def _graph_training_pairs(folder: Path, n_users: int) -> tuple[np.ndarray, np.ndarray]:
    """The training pairs from ``train.txt``, else from ``s_adj_mat.npz`` (the bipartite graph).

    The LightGCN-PyTorch repository ships Gowalla's training part as the unnormalized adjacency
    matrix ``[[0, R], [Rᵀ, 0]]`` of the user-item graph; its upper-right block is ``R``.
    """
    text = folder / "train.txt"
    if text.is_file():
        return _adjacency_lists(text)
    graph = folder / "s_adj_mat.npz"
    if not graph.is_file():
        raise DataError(
            f"{folder} has neither train.txt nor s_adj_mat.npz: see docs/quality.md for where "
            "to get the LightGCN splits"
        )
    import scipy.sparse as sp

    adjacency = sp.load_npz(graph).tocsr()
    users_block = adjacency[:n_users, n_users:].tocoo()
    if adjacency[:n_users, :n_users].nnz:
        raise DataError(f"{graph} is not a user-item graph (its user-user block is not empty)")
    return users_block.row.astype(np.int64), users_block.col.astype(np.int64)


def load_graph_benchmark_split(
    name: str, root: Path | None = None
) -> tuple[pd.DataFrame, np.ndarray]:
    """A LightGCN-protocol data set (Gowalla, Yelp2018, Amazon-book) and its published split.

    Returns the frame of every interaction (train and test parts; one event of weight 1 per pair,
    no timestamps) and a mask of the test rows. These are the splits of He et al. (SIGIR 2020)
    that LightGCN, GF-CF and later graph models report recall@20 and NDCG@20 on; they are not
    shipped with Affinity (docs/quality.md says where to get them).
    """
    folder = (root or DATASETS_DIR) / name
    test_path = folder / "test.txt"
    if not test_path.is_file():
        raise DataError(f"{test_path} not found: see docs/quality.md for the LightGCN splits")
    test_users, test_items = _adjacency_lists(test_path)
    n_users = int(test_users.max()) + 1
    train_users, train_items = _graph_training_pairs(folder, n_users)
    users = np.concatenate([train_users, test_users])
    items = np.concatenate([train_items, test_items])
    is_test = np.zeros(len(users), dtype=bool)
    is_test[len(train_users) :] = True
    frame = _frame(pd.Series(users), pd.Series(items), "checkin", np.zeros(len(users)))
    return frame, is_test


def load_gowalla(root: Path | None = None) -> pd.DataFrame:
    """Gowalla check-ins as LightGCN published them (29,858 users, 40,981 places, 0.08% dense)."""
    return load_graph_benchmark_split("gowalla", root)[0]


LOADERS: dict[str, Callable[[Path | None], pd.DataFrame]] = {
    "ml-latest-small": load_movielens,
    "ml-latest-small-dense": load_movielens_dense,
    "uci-online-retail": load_online_retail,
    "ml-100k": load_movielens_100k,
    "gowalla": load_gowalla,
}
"""Data set name -> loader taking the datasets folder (None: :data:`DATASETS_DIR`)."""

PUBLISHED_SPLITS: dict[str, Callable[[Path | None], tuple[pd.DataFrame, np.ndarray]]] = {
    "gowalla": lambda root: load_graph_benchmark_split("gowalla", root),
}
"""Data sets with a published train/test split (the ``given`` protocol): frame and test mask."""


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
