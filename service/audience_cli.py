"""``affinity audience``: an audience for a campaign from the shell, written as CSV or Parquet.

The server finds the audience (``FindAudience``, the admin token; service/audiences.py), so its
model, event store, segments and frequency cap decide who enters; this command writes the
members (``user_id, score, rank``) to a file and logs the definition and the file as a run of
the MLflow experiment ``affinity-audiences`` (unless ``--no-mlflow``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from models.errors import InvalidInputError
from service.client import AffinityClient, AudienceMember

logger = logging.getLogger(__name__)

MLFLOW_EXPERIMENT = "affinity-audiences"
FORMATS = (".csv", ".parquet")
DEFAULT_TIMEOUT = 300.0
"""Seconds the whole stream may take (a large audience is not a five-second call)."""


@dataclass(frozen=True)
class Written:
    """An audience file: where, how many members, their best and worst scores."""

    path: Path
    users: int
    best: float | None
    worst: float | None


def out_format(path: Path) -> str:
    """``csv`` or ``parquet`` from the file's suffix; anything else is refused."""
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise InvalidInputError(f"--out {str(path)!r}: name a .csv or .parquet file", field="--out")
    return suffix[1:]


def write_members(members: Iterable[AudienceMember], path: Path) -> Written:
    """Write ``members`` (best first) as ``user_id, score, rank`` to ``path`` (.csv or
    .parquet), through a temporary file so a failed stream never leaves half a file."""
    import pyarrow as pa

    kind = out_format(path)
    users: list[str] = []
    scores: list[float] = []
    ranks: list[int] = []
    for member in members:
        users.append(member.user_id)
        scores.append(member.score)
        ranks.append(member.rank)
    table = pa.table(
        {
            "user_id": pa.array(users, pa.string()),
            "score": pa.array(scores, pa.float64()),
            "rank": pa.array(ranks, pa.int64()),
        }
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    if kind == "parquet":
        import pyarrow.parquet as pq

        pq.write_table(table, partial)
    else:
        import pyarrow.csv as pcsv

        pcsv.write_csv(table, partial)
    partial.replace(path)
    return Written(path, len(users), scores[0] if scores else None, scores[-1] if scores else None)


def definition_of(args: argparse.Namespace) -> dict[str, Any]:
    """The request the command sends, as the run's parameters and definition file show it."""
    return {
        "item_ids": list(args.item),
        "category": args.category or "",
        "stages": list(args.stage),
        "tiers": list(args.tier),
        "last_seen_within_days": args.last_seen_days,
        "exclude_interacted": bool(args.exclude_interacted),
        "max_users": args.max_users,
        "max_audiences_per_user": args.max_per_user,
        "cap_window_days": args.cap_window_days,
        "record": bool(args.record),
        "name": args.name or "",
    }


def log_audience(
    definition: dict[str, Any],
    written: Written,
    *,
    target: str,
    tracking_uri: str | None = None,
    mlflow_experiment: str = MLFLOW_EXPERIMENT,
) -> str:
    """Log the audience as a run of ``mlflow_experiment``: the definition as parameters and as
    ``audience/definition.json``, the size and scores as metrics, the file as an artifact under
    ``audience/``. Returns the run id."""
    import mlflow

    from registry import mlflow_store

    mlflow_store.configure_tracking()
    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment(mlflow_experiment)
    params = {
        key: json.dumps(value) if isinstance(value, list | dict) else str(value)
        for key, value in definition.items()
    }
    # MLflow caps a parameter's value; the full lists are in definition.json.
    params = {
        key: value if len(value) <= 500 else value[:497] + "..." for key, value in params.items()
    }
    metrics = {"users": float(written.users)}
    if written.best is not None and written.worst is not None:
        metrics.update(score_best=written.best, score_worst=written.worst)
    with mlflow.start_run(run_name=definition.get("name") or "audience") as run:
        mlflow.log_params(params)
        mlflow.log_metrics(metrics)
        mlflow.set_tags(
            {
                "affinity.audience": definition.get("name") or "",
                "affinity.audience_recorded": str(bool(definition.get("record"))).lower(),
                "affinity.target": target,
            }
        )
        mlflow.log_dict(definition, "audience/definition.json")
        mlflow.log_artifact(str(written.path), "audience")
        return str(run.info.run_id)


def _admin_token(args: argparse.Namespace) -> str:
    if not args.admin_token:
        raise InvalidInputError(
            "--admin-token (or AFFINITY_ADMIN_TOKEN) is required: FindAudience is an admin RPC",
            field="admin_token",
        )
    return str(args.admin_token)


def audience(client: AffinityClient, args: argparse.Namespace) -> int:
    """Find the audience, write it, log it; prints a summary (``--json``: as JSON)."""
    if bool(args.item) == bool(args.category):
        raise InvalidInputError("give --item (one or more) or --category, not both", field="--item")
    if args.record and not args.name:
        raise InvalidInputError("--record needs --name", field="--name")
    if args.out is not None:
        out_format(args.out)  # refuse a bad name before the server does any work
    definition = definition_of(args)
    members = client.find_audience(
        item_ids=args.item,
        category=args.category or "",
        stages=args.stage,
        tiers=args.tier,
        last_seen_within_days=args.last_seen_days,
        exclude_interacted=args.exclude_interacted,
        max_users=args.max_users,
        max_audiences_per_user=args.max_per_user,
        cap_window_days=args.cap_window_days,
        record=args.record,
        name=args.name or "",
        admin_token=_admin_token(args),
    )
    with tempfile.TemporaryDirectory(prefix="affinity-audience-") as tmp:
        path = args.out if args.out is not None else Path(tmp) / "audience.csv"
        written = write_members(members, path)
        run_id = None
        if not args.no_mlflow:
            try:
                run_id = log_audience(
                    definition, written, target=client.target, tracking_uri=args.tracking_uri
                )
            except Exception as exc:  # MLflow's own errors: a reason, not a traceback
                kept = f"written to {args.out}, " if args.out is not None else ""
                print(
                    f"error: the audience ({written.users} users) was {kept}but could not be "
                    f"logged to MLflow: {exc} (--no-mlflow skips it)",
                    file=sys.stderr,
                )
                return 1
        if args.out is None and not args.json:
            print(path.read_text(), end="")
    summary = {
        "name": definition["name"],
        "users": written.users,
        "out": str(args.out) if args.out is not None else None,
        "recorded": bool(args.record),
        "mlflow_run_id": run_id,
    }
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        where = f" -> {args.out}" if args.out is not None else ""
        run = f" (MLflow run {run_id})" if run_id else ""
        recorded = ", recorded" if args.record else ""
        print(f"audience {definition['name'] or '-'}: {written.users} users{where}{recorded}{run}")
    return 0


def register(subparsers: Any, run_client: Any, connection_options: Any) -> None:
    """Add ``affinity audience`` (``run_client`` and ``connection_options`` are service/cli.py's:
    the same connection flags and error handling as every client command)."""
    parser = subparsers.add_parser(
        "audience",
        help="the users most likely to engage with some items or a category (FindAudience)",
        description="An audience for a campaign: the users the served model scores highest "
        "against the items (or every available item of a category), filtered by lifecycle "
        "stage, value tier and last-seen window, without users who already interacted "
        "(--exclude-interacted), capped in size and by a frequency cap over recorded "
        "audiences. Writes user_id, score, rank to --out (.csv or .parquet; default: CSV on "
        "stdout) and logs the definition and the file to MLflow. Needs the admin token. "
        "Example: affinity audience --category shoes --stage at_risk --max-users 5000 "
        "--exclude-interacted --record --name shoes-winback --out shoes.parquet",
    )
    what = parser.add_argument_group("what the audience is for (one of)")
    what.add_argument(
        "--item",
        nargs="+",
        action="extend",
        default=[],
        metavar="ITEM",
        help="item ids (repeatable); a user's score is their mean score over them",
    )
    what.add_argument("--category", help="a category: every available item of it")
    who = parser.add_argument_group("who may enter")
    who.add_argument(
        "--stage",
        action="append",
        default=[],
        metavar="STAGE",
        help="keep users in this lifecycle stage (repeatable; see docs/segments.md)",
    )
    who.add_argument(
        "--tier", action="append", default=[], metavar="TIER", help="keep this value tier"
    )
    who.add_argument(
        "--last-seen-days",
        type=float,
        metavar="DAYS",
        help="keep users seen within this many days",
    )
    who.add_argument(
        "--exclude-interacted",
        action="store_true",
        help="leave out users who already interacted with the items",
    )
    who.add_argument(
        "--max-users", type=int, default=1000, metavar="N", help="audience size (default 1000)"
    )
    who.add_argument(
        "--max-per-user",
        type=int,
        default=0,
        metavar="N",
        help="frequency cap: leave out users already in N recorded audiences within "
        "--cap-window-days (default 0: no cap)",
    )
    who.add_argument(
        "--cap-window-days",
        type=float,
        default=0.0,
        metavar="DAYS",
        help="the frequency cap's window",
    )
    out = parser.add_argument_group("output")
    out.add_argument(
        "--record",
        action="store_true",
        help="record the audience on the server so it counts toward the frequency cap",
    )
    out.add_argument("--name", help="the audience's name (needed with --record)")
    out.add_argument(
        "--out", type=Path, metavar="FILE", help="FILE.csv or FILE.parquet (default: stdout)"
    )
    out.add_argument(
        "--tracking-uri",
        help="MLflow tracking URI [env MLFLOW_TRACKING_URI; default sqlite:///mlflow.db]",
    )
    out.add_argument("--no-mlflow", action="store_true", help="do not log an MLflow run")
    parser.add_argument(
        "--admin-token",
        default=os.environ.get("AFFINITY_ADMIN_TOKEN"),
        help="the server's admin token [env AFFINITY_ADMIN_TOKEN]",
    )
    connection_options(parser)
    parser.set_defaults(func=run_client(audience), timeout=DEFAULT_TIMEOUT)
