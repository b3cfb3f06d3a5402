"""``affinity experiment start|update|stop|status|report``: live experiments from the shell.

``start``, ``update`` and ``stop`` call the server's admin RPCs (the admin token), so the server
validates the configuration and checks the arms' models exist before anything is stored;
``status`` asks the server too, which adds how its worker serves each arm. ``report`` reads
the event store directly (service/experiment_report.py).
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from models.errors import InvalidInputError
from service.client import AffinityClient, ExperimentInfo


def parse_arm(text: str, *, shadow: bool = False) -> tuple[str, str, float, bool]:
    """``NAME=MODEL:SHARE`` (a live arm) or ``NAME=MODEL`` (with ``shadow``) as a tuple."""
    flag = "--shadow" if shadow else "--arm"
    name, sep, rest = text.partition("=")
    if not sep or not name or not rest:
        form = "NAME=MODEL" if shadow else "NAME=MODEL:SHARE"
        raise InvalidInputError(f"{flag} {text!r}: expected {form}", field=flag)
    if shadow:
        return name, rest, 0.0, True
    model, sep, share = rest.rpartition(":")
    if not sep or not model:
        raise InvalidInputError(f"{flag} {text!r}: expected NAME=MODEL:SHARE", field=flag)
    try:
        value = float(share.rstrip("%")) / (100 if share.endswith("%") else 1)
    except ValueError:
        raise InvalidInputError(
            f"{flag} {text!r}: share {share!r} is not a number (0.5 or 50%)", field=flag
        ) from None
    return name, model, value, False


def _shares(pairs: list[str]) -> dict[str, float]:
    shares: dict[str, float] = {}
    for pair in pairs:
        name, sep, share = pair.partition("=")
        try:
            if not sep:
                raise ValueError
            shares[name] = float(share.rstrip("%")) / (100 if share.endswith("%") else 1)
        except ValueError:
            raise InvalidInputError(
                f"--share {pair!r}: expected ARM=SHARE (0.5 or 50%)", field="--share"
            ) from None
    return shares


def _admin_token(args: argparse.Namespace) -> str:
    if not args.admin_token:
        raise InvalidInputError(
            "--admin-token (or AFFINITY_ADMIN_TOKEN) is required to change experiments",
            field="admin_token",
        )
    return str(args.admin_token)


def _print(info: ExperimentInfo, as_json: bool) -> None:
    if as_json:
        print(json.dumps(info.to_dict(), indent=2))
        return
    print(
        f"experiment {info.name}: {info.status} (revision {info.revision}), control "
        f"{info.control}, primary metric {info.primary_metric}, min users {info.min_users}"
    )
    serving = {s["arm"]: s for s in info.serving}
    for arm in info.arms:
        kind = "shadow" if arm["shadow"] else f"{arm['share']:.2%}"
        line = f"  {arm['name']:<16} {kind:>8}  model {arm['model']}"
        state = serving.get(arm["name"])
        if state is not None:
            if state["ready"]:
                line += f"  serving v{state['model_version'] or '-'}"
            else:
                line += f"  NOT READY ({state['error']}): its users get the served model"
            if state["fallbacks"]:
                line += f"  fallbacks {state['fallbacks']}"
        print(line)
    print(f"  buckets: {', '.join(info.allocation) or '-'}")


def start(client: AffinityClient, args: argparse.Namespace) -> int:
    arms = [parse_arm(text) for text in args.arm] + [
        parse_arm(text, shadow=True) for text in args.shadow
    ]
    info = client.start_experiment(
        args.name,
        arms,
        control=args.control or "",
        salt=args.salt or "",
        primary_metric=args.primary_metric or "",
        min_users=args.min_users or 0,
        admin_token=_admin_token(args),
    )
    _print(info, args.json)
    return 0


def update(client: AffinityClient, args: argparse.Namespace) -> int:
    info = client.update_experiment(args.name, _shares(args.share), admin_token=_admin_token(args))
    _print(info, args.json)
    return 0


def stop(client: AffinityClient, args: argparse.Namespace) -> int:
    info = client.stop_experiment(args.name, admin_token=_admin_token(args))
    _print(info, args.json)
    return 0


def status(client: AffinityClient, args: argparse.Namespace) -> int:
    if args.name:
        _print(client.experiment(args.name), args.json)
        return 0
    infos = client.experiments()
    if args.json:
        print(json.dumps([info.to_dict() for info in infos], indent=2))
    elif not infos:
        print("no experiments")
    for info in infos if not args.json else ():
        _print(info, False)
    return 0


def register(subparsers: Any, run_client: Any, connection_options: Any) -> None:
    """Add ``affinity experiment ...`` (``run_client`` and ``connection_options`` are
    service/cli.py's: the same connection flags and error handling as every client command)."""
    parser = subparsers.add_parser(
        "experiment",
        help="run live experiments: champion against challenger on real traffic",
        description="Live experiments: users are split between arms (registered models) by a "
        "stable hash; every answer names its arm, so later events count for it. See "
        "docs/experiments.md.",
    )
    actions = parser.add_subparsers(dest="experiment_command", metavar="ACTION", required=True)

    def admin(sub: argparse.ArgumentParser) -> None:
        sub.add_argument(
            "--admin-token",
            default=os.environ.get("AFFINITY_ADMIN_TOKEN"),
            help="the server's admin token [env AFFINITY_ADMIN_TOKEN]",
        )
        connection_options(sub)

    begin = actions.add_parser(
        "start",
        help="start an experiment (StartExperiment)",
        description="Start an experiment. Example: affinity experiment start spring "
        "--arm champion=champion:0.9 --arm challenger=challenger:0.1",
    )
    begin.add_argument("name", help="experiment name (letters, digits, '_', '.', '-')")
    begin.add_argument(
        "--arm",
        action="append",
        default=[],
        metavar="NAME=MODEL:SHARE",
        help="a live arm: its name, the model (registry alias, version number or models:/ URI) "
        "and its share of users (0.1 or 10%%); the shares add up to 1 (repeat for each arm)",
    )
    begin.add_argument(
        "--shadow",
        action="append",
        default=[],
        metavar="NAME=MODEL",
        help="a shadow arm: ranks every request of the experiment, recorded, never shown",
    )
    begin.add_argument("--control", help="the arm the others are compared with (default first)")
    begin.add_argument("--salt", help="mixed into the user hash (default the name)")
    begin.add_argument(
        "--primary-metric",
        choices=("ctr", "conversion", "revenue"),
        help="the metric promotion is decided on (default ctr)",
    )
    begin.add_argument(
        "--min-users", type=int, help="users per arm before promotion may decide (default 1000)"
    )
    admin(begin)
    begin.set_defaults(func=run_client(start))

    change = actions.add_parser(
        "update",
        help="change the arms' shares, moving only the users it must (UpdateExperiment)",
    )
    change.add_argument("name")
    change.add_argument(
        "--share",
        action="append",
        default=[],
        required=True,
        metavar="ARM=SHARE",
        help="an arm's new share (0.2 or 20%%); repeat; the live arms still add up to 1",
    )
    admin(change)
    change.set_defaults(func=run_client(update))

    end = actions.add_parser("stop", help="stop an experiment (StopExperiment)")
    end.add_argument("name")
    admin(end)
    end.set_defaults(func=run_client(stop))

    show = actions.add_parser(
        "status",
        help="an experiment's configuration and how the server serves its arms (all if no name)",
    )
    show.add_argument("name", nargs="?")
    connection_options(show)
    show.set_defaults(func=run_client(status))

    from service.experiment_report import add_report_arguments

    report = actions.add_parser(
        "report",
        help="compare the arms with the control (user-level 95% intervals) and decide",
        description="Per arm: users, answers, click-through rate, conversion and revenue per "
        "user with 95% intervals computed at the user level, each arm's difference from the "
        "control, and the promotion decision; recorded as an MLflow run unless --no-mlflow. "
        "With --promote-when-better the champion alias moves to the challenger only when the "
        "primary metric's interval excludes zero in its favour after --min-users users.",
    )
    add_report_arguments(report)
