"""``affinity train --events``: train on the event store, alone or with interaction logs.

``training/`` and ``service/`` never import each other, so the two meet here, at the top. The
store's events are written to a temporary Parquet file in the interaction-log format
(:func:`service.export.write_training_log`; ``impression`` and ``dislike`` are not training
interactions and are skipped, and counted), which training then reads together with the
``--interactions`` logs as one input of several files, validated and quarantined alike
(:func:`training.data.load_interactions`). The store's erasures go with them: a row of an erased
user at or before the erasure reaches training from no input, the log files included.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

from models.errors import InvalidInputError
from training import cli as training_cli


def add_events_option(parser: argparse.ArgumentParser) -> None:
    """Give the ``train`` parser ``--events [URI]`` and route it through :func:`train`."""
    parser.add_argument(
        "--events",
        nargs="?",
        const="",
        default=None,
        metavar="URI",
        help="also train on the event store's events (all but impression and dislike); "
        "its erasures then apply to every input. URI as for 'serve --events-uri'; without one "
        "AFFINITY_EVENTS_URI or sqlite:///./events.db",
    )
    parser.set_defaults(func=train)


def train(args: argparse.Namespace) -> int:
    """``affinity train``: with ``--events``, export the store and train on it and the logs."""
    if args.events is None:
        return training_cli.cmd_train(args)
    # Imported here: SQLAlchemy and the store are paid for only by a run that uses them.
    from service.events import EventStore, events_uri
    from service.export import write_training_log

    uri = args.events or events_uri()
    with tempfile.TemporaryDirectory(prefix="affinity-events-") as folder:
        with EventStore.open(uri) as store:
            erasures = store.erasures()
            log = write_training_log(store, Path(folder) / "events-store.parquet")
        report: dict[str, Any] = {
            "uri": _printable(uri),
            "events": log.events,
            "training_events": log.written,
            "skipped": dict(sorted(log.skipped.items())),
            "erased_users": len(erasures),
        }
        if not args.quiet:
            skipped = ", ".join(f"{name} {n:,}" for name, n in sorted(log.skipped.items()))
            print(
                f"event store {report['uri']}: {log.events:,} events, {log.written:,} for "
                f"training, {sum(log.skipped.values()):,} skipped ({skipped or 'none'}); "
                f"{len(erasures):,} erased users",
                file=sys.stderr,
                flush=True,
            )
        logs = [log.path] if log.written else []
        logs += list(args.interactions or [])
        if not logs:
            raise InvalidInputError(
                f"the event store {report['uri']} holds no training events "
                f"({log.events} events, none of them a training interaction) and no "
                "--interactions were given",
                field="events",
            )
        return training_cli.cmd_train(
            args, interactions=logs, erasures=erasures, report={"events_store": report}
        )


def _printable(uri: str) -> str:
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(uri).render_as_string(hide_password=True)
    except ArgumentError:
        return uri
