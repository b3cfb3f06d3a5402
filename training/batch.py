"""Offline recommendations for a list of users (``affinity batch-recommend``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import pandas as pd
from threadpoolctl import threadpool_limits

from models.errors import DataError, InvalidInputError
from models.ranking import NO_FILTER, ItemFilter, RankingPipeline
from registry.mlflow_store import load_model_uri


def read_user_ids(path: Path) -> list[str]:
    """One user id per line; blank lines are ignored."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"users file {path} does not exist") from None
    users = [line.strip() for line in text.splitlines() if line.strip()]
    if not users:
        raise DataError(f"users file {path} holds no user ids")
    return users


def batch_recommend(
    model_uri: str,
    users_path: Path,
    k: int,
    out: Path,
    progress: Callable[[str], None] | None = None,
    *,
    item_filter: ItemFilter = NO_FILTER,
    exclude_item_ids: Sequence[str] = (),
) -> int:
    """Write ``user_id, rank, item_id, score, source`` rows for every user; returns rows written.

    Every user's list is made as ``Recommend`` makes it, with the same ``item_filter`` and
    ``exclude_item_ids`` for all of them.
    """
    if k <= 0:
        raise InvalidInputError("--k must be positive", field="k")
    suffix = "".join(out.suffixes).lower()
    if suffix not in {".csv", ".parquet", ".pq", ".csv.gz"}:
        raise InvalidInputError(f"--out must end in .csv or .parquet, got {out.name}", field="out")
    users = read_user_ids(users_path)
    pipeline = RankingPipeline.from_bundle(load_model_uri(model_uri))
    rows = []
    with threadpool_limits(1, "blas"):
        for n, user in enumerate(users, start=1):
            result = pipeline.recommend(
                user, k, item_filter=item_filter, exclude_item_ids=exclude_item_ids
            )
            for rank, (item, score) in enumerate(
                zip(result.item_ids, result.scores, strict=True), start=1
            ):
                rows.append((user, rank, item, score, str(result.source)))
            if progress is not None and n % 10_000 == 0:
                progress(f"{n:,}/{len(users):,} users")
    frame = pd.DataFrame(rows, columns=["user_id", "rank", "item_id", "score", "source"])
    out.parent.mkdir(parents=True, exist_ok=True)
    if suffix in {".parquet", ".pq"}:
        frame.to_parquet(out, index=False)
    else:
        frame.to_csv(out, index=False)
    return len(frame)
