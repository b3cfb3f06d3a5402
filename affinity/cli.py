"""The ``affinity`` command line: generate sample logs, train, batch-recommend, serve and query.

The subcommands come from the packages that own them (:func:`training.cli.register_cli`,
:func:`service.cli.register_cli`; ``train --events``, which needs both, from
:mod:`affinity.train_events`); this module builds the parser, runs the chosen one and turns
its errors into exit codes. Every subcommand explains its options in ``--help``. Exit code 0 on
success; on a user mistake a one-line reason on stderr and exit code 2 (1 for other failures),
never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from affinity import segments, train_events
from models.errors import AffinityError
from service import cli as service_cli
from training import cli as training_cli

logger = logging.getLogger("affinity")


def build_parser() -> argparse.ArgumentParser:
    """The ``affinity`` parser: training's subcommands, then the service's."""
    parser = argparse.ArgumentParser(
        prog="affinity",
        description="Affinity recommendation service: train models into the MLflow registry "
        "and serve them over gRPC.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    training_cli.register_cli(subparsers)
    service_cli.register_cli(subparsers)
    # train --events reads the service's event store: composed here, where both sides meet.
    train_events.add_events_option(subparsers.choices["train"])
    # segments reads logs (training's loader) and writes to the event store: both sides.
    segments.register_cli(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``affinity`` with ``argv`` (default: the process's arguments); returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        return int(args.func(args) or 0)
    except AffinityError as exc:
        print(f"affinity {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"affinity {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a one-line reason, the traceback only with --verbose
        if args.verbose:
            logger.exception("unexpected failure")
        hint = "" if args.verbose else "; rerun with -v for the traceback"
        print(
            f"affinity {args.command}: failed unexpectedly ({type(exc).__name__}: {exc}){hint}",
            file=sys.stderr,
        )
        return 1
