"""The service's subcommands of the ``affinity`` command: ``serve`` and the client commands.

:func:`register_cli` adds ``serve``, ``recommend``, ``similar``, ``popular``, ``model-info``,
``health``, ``events log|export|prune`` and ``users delete|show`` to an argparse subparsers object;
each sets ``func(args) -> int`` (the exit status). ``events export`` and ``events prune`` open the
event store themselves (``--events-uri``); the others call a server.
Errors print a one-line reason to stderr and return non-zero. The command itself is
:mod:`affinity.cli`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc

from models.errors import AffinityError, InvalidInputError
from protos.affinity.v1 import recommender_pb2 as pb
from service.client import AffinityClient, Event, Result
from service.config import ServeSettings, load_settings

DEFAULT_TARGET = "localhost:50051"

# serve option -> settings field; help text and environment variable come from the schema.
SERVE_OPTIONS: dict[str, tuple[str, type, dict[str, Any]]] = {
    "--model": ("model_uri", str, {"metavar": "URI"}),
    "--tracking-uri": ("tracking_uri", str, {"metavar": "URI"}),
    "--host": ("host", str, {}),
    "--port": ("port", int, {"metavar": "N"}),
    "--workers": ("workers", int, {"metavar": "N"}),
    "--cpus": ("cpus", str, {"metavar": "LIST"}),
    "--metrics-port": ("metrics_port", int, {"metavar": "N"}),
    "--metrics-host": ("metrics_host", str, {"metavar": "ADDR"}),
    "--poll-seconds": ("poll_seconds", float, {"metavar": "S"}),
    "--tls-cert": ("tls_cert", str, {"metavar": "PEM"}),
    "--tls-key": ("tls_key", str, {"metavar": "PEM"}),
    "--token": ("token", str, {}),
    "--admin-token": ("admin_token", str, {}),
    "--max-k": ("max_k", int, {"metavar": "N"}),
    "--max-ids": ("max_ids", int, {"metavar": "N"}),
    "--max-events": ("max_events", int, {"metavar": "N"}),
    "--events-uri": ("events_uri", str, {"metavar": "URI"}),
    "--extra-events": ("extra_events", str, {"metavar": "NAMES"}),
    "--max-future-skew": ("max_future_skew_seconds", float, {"metavar": "S"}),
    "--record-responses": ("record_responses", str, {"metavar": "BOOL"}),
    "--response-buffer": ("response_buffer", int, {"metavar": "N"}),
    "--ann": ("ann", str, {"metavar": "BOOL"}),
    "--live": ("live", str, {"metavar": "BOOL"}),
    "--live-window-days": ("live_window_days", float, {"metavar": "DAYS"}),
    "--live-poll-seconds": ("live_poll_seconds", float, {"metavar": "S"}),
    "--experiment-poll-seconds": ("experiment_poll_seconds", float, {"metavar": "S"}),
    "--stage-strategies": ("stage_strategies", str, {"metavar": "off|default|JSON"}),
    "--stage-poll-seconds": ("stage_poll_seconds", float, {"metavar": "S"}),
    "--dislike-weight": ("dislike_weight", float, {"metavar": "W"}),
    "--rules-max-per-category": ("rules_max_per_category", int, {"metavar": "N"}),
    "--rules-mmr": ("rules_mmr", float, {"metavar": "X"}),
    "--rules-boosts": ("rules_boosts", str, {"metavar": "FILTER:FACTOR;..."}),
    "--rules-promotion": ("rules_promotion", str, {"metavar": "FILTER:SHARE"}),
    "--rules-explore-share": ("rules_explore_share", float, {"metavar": "SHARE"}),
    "--rules-explore-max-age-days": ("rules_explore_max_age_days", float, {"metavar": "DAYS"}),
    "--rules-explore-seed": ("rules_explore_seed", int, {"metavar": "N"}),
    "--rules-explore-max-interactions": ("rules_explore_max_interactions", int, {"metavar": "N"}),
    "--rules-rotation-rate": ("rules_rotation_rate", float, {"metavar": "R"}),
    "--rules-rotation-half-life": ("rules_rotation_half_life_seconds", float, {"metavar": "S"}),
    "--rules-rotation-allowed": ("rules_rotation_allowed", str, {"metavar": "BOOL"}),
    "--max-in-flight": ("max_in_flight", int, {"metavar": "N"}),
    "--max-message-bytes": ("max_message_bytes", int, {"metavar": "N"}),
    "--max-concurrent-streams": ("max_concurrent_streams", int, {"metavar": "N"}),
    "--cache-dir": ("cache_dir", str, {"metavar": "DIR"}),
    "--log-format": ("log_format", str, {"choices": ["json", "text"]}),
    "--log-level": ("log_level", str, {"choices": ["DEBUG", "INFO", "WARNING", "ERROR"]}),
    "--grace-seconds": ("grace_seconds", float, {"metavar": "S"}),
    "--max-connection-age": ("max_connection_age_seconds", float, {"metavar": "S"}),
    "--max-connection-age-grace": ("max_connection_age_grace_seconds", float, {"metavar": "S"}),
    "--registry-timeout": ("registry_timeout_seconds", int, {"metavar": "S"}),
    "--registry-retries": ("registry_retries", int, {"metavar": "N"}),
}


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 1


# ------------------------------------------------------------------- serve
def _serve(args: argparse.Namespace) -> int:
    overrides = {field: getattr(args, field) for field, _, _ in SERVE_OPTIONS.values()}
    try:
        settings = load_settings(**overrides)
    except AffinityError as exc:
        return _fail(str(exc))
    from service.server import run

    try:
        return run(settings)
    except (AffinityError, OSError) as exc:
        return _fail(str(exc))


def _add_serve(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="serve a model over gRPC",
        description="Serve recommendations over gRPC. Every option can also be set with the "
        "environment variable shown; options win over the environment.",
    )
    fields = ServeSettings.model_fields
    for flag, (field, kind, extra) in SERVE_OPTIONS.items():
        info = fields[field]
        description = (info.description or "").replace("``", "'")
        default = "" if info.default_factory is not None else f"; default {info.default!r}"
        if field in ("token", "admin_token"):
            default = ""
        parser.add_argument(
            flag,
            dest=field,
            type=kind,
            default=None,
            help=f"{description} [env {info.validation_alias}{default}]",
            **extra,
        )
    parser.set_defaults(func=_serve)


# ----------------------------------------------------------------- clients
def _client(args: argparse.Namespace) -> AffinityClient:
    roots: bytes | None = None
    if args.ca_cert:
        roots = Path(args.ca_cert).read_bytes()
    elif args.tls:
        roots = b""
    return AffinityClient(
        args.target, token=args.token, root_certificates=roots, timeout=args.timeout
    )


def _print_result(result: Result, as_json: bool) -> None:
    if as_json:
        print(json.dumps(result.to_dict(), indent=2))
        return
    model = result.model
    head = f"model {model.name} v{model.version or '-'} ({model.algorithm})"
    if result.source:
        head += f"  source {result.source}"
    if result.stage:
        head += f"  stage {result.stage} ({result.strategy})"
    if result.experiment:
        head += f"  experiment {result.experiment} arm {result.arm}"
    print(f"{head}  recommendation_id {result.recommendation_id}")
    rows = [
        (str(rank), item.item_id, f"{item.score:.4f}", item.item_type, item.category, item.reason)
        for rank, item in enumerate(result.items, start=1)
    ]
    header = ("#", "item_id", "score", "item_type", "category", "reason")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        cells = (cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        print("  ".join(cells).rstrip())


def _run_client(action: Callable[[AffinityClient, argparse.Namespace], int]) -> Callable[..., int]:
    def handler(args: argparse.Namespace) -> int:
        try:
            with _client(args) as client:
                return action(client, args)
        except grpc.RpcError as exc:
            code = exc.code().name if hasattr(exc, "code") else "ERROR"
            details = exc.details() if hasattr(exc, "details") else str(exc)
            return _fail(f"{code}: {details}")
        except (OSError, AffinityError) as exc:
            return _fail(str(exc))

    return handler


def rules_of(args: argparse.Namespace) -> pb.RankingRules | None:
    """The ``RankingRules`` of a client command's rule options; ``None`` when none is given
    (the server's defaults then apply untouched)."""
    from service.rules import parse_weighted

    rules = pb.RankingRules()
    if args.diversity_cap is not None:
        rules.diversity.max_per_category = args.diversity_cap
    if args.mmr is not None:
        rules.diversity.mmr = args.mmr
    for text in args.boost:
        flt, factor = parse_weighted(text, "--boost")
        rules.boosts.add(item_types=flt.item_types, categories=flt.categories, factor=factor)
    if args.no_boosts:
        rules.no_boosts = True
    if args.promote is not None:
        flt, share = parse_weighted(args.promote, "--promote")
        rules.promotion.item_types.extend(flt.item_types)
        rules.promotion.categories.extend(flt.categories)
        rules.promotion.share = share
    for option, part, name in _USER_RULES:
        value = getattr(args, option, None)
        if value is not None:
            setattr(getattr(rules, part), name, value)
    return rules if rules.ListFields() else None


_USER_RULES = (
    ("explore", "exploration", "share"),
    ("explore_max_age_days", "exploration", "max_age_days"),
    ("explore_seed", "exploration", "seed"),
    ("explore_max_interactions", "exploration", "max_interactions"),
    ("rotation_rate", "rotation", "rate"),
    ("rotation_half_life", "rotation", "half_life_seconds"),
)
"""The rule options of ``recommend`` only: (option, RankingRules part, field)."""


def _recommend(client: AffinityClient, args: argparse.Namespace) -> int:
    result = client.recommend(
        args.user,
        args.k,
        recent_item_ids=args.recent,
        exclude_item_ids=args.exclude,
        item_types=args.item_type,
        categories=args.category,
        include_seen=args.include_seen,
        rules=rules_of(args),
    )
    _print_result(result, args.json)
    return 0


def _similar(client: AffinityClient, args: argparse.Namespace) -> int:
    items = [*args.items, *args.item_flags]
    if not items:
        raise InvalidInputError("give at least one query item (ITEM or --item)", field="item_ids")
    result = client.similar_items(
        items,
        args.k,
        exclude_item_ids=args.exclude,
        item_types=args.item_type,
        categories=args.category,
        rules=rules_of(args),
    )
    _print_result(result, args.json)
    return 0


def _popular(client: AffinityClient, args: argparse.Namespace) -> int:
    result = client.popular(
        args.k,
        trending=args.trending,
        exclude_item_ids=args.exclude,
        item_types=args.item_type,
        categories=args.category,
        rules=rules_of(args),
    )
    _print_result(result, args.json)
    return 0


def _model_info(client: AffinityClient, args: argparse.Namespace) -> int:
    info = client.model_info()
    data = info.to_dict()
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        model = data.pop("model")
        for key, value in {**model, **data}.items():
            print(f"{key:20} {value}")
    return 0


def _health(client: AffinityClient, args: argparse.Namespace) -> int:
    deadline = time.monotonic() + max(0.0, args.wait)
    while True:
        try:
            status = client.health(args.service)
        except grpc.RpcError as exc:
            if time.monotonic() >= deadline:
                raise
            status = f"unreachable ({exc.code().name})"
        if status == "SERVING" or time.monotonic() >= deadline:
            break
        time.sleep(0.5)
    print(json.dumps({"service": args.service, "status": status}) if args.json else status)
    return 0 if status == "SERVING" else 1


EVENTS_FILE_UNREADABLE = 2


def read_events_file(path: Path) -> list[Event]:
    """The events of a JSON Lines file (one object per line, blank lines skipped).

    Raises ``OSError`` or :class:`InvalidInputError` naming the line that cannot be read.
    """
    events: list[Event] = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                data = json.loads(line)
                if not isinstance(data, dict):
                    raise InvalidInputError("expected a JSON object")
                events.append(Event.from_dict(data))
            except (ValueError, InvalidInputError) as exc:
                raise InvalidInputError(f"{path}:{number}: {exc}") from None
    return events


def _log_events(client: AffinityClient, args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        raise InvalidInputError("--batch-size must be >= 1", field="batch_size")
    try:
        events = read_events_file(Path(args.file))
    except (OSError, InvalidInputError) as exc:
        print(f"error: cannot read events: {exc}", file=sys.stderr)
        return EVENTS_FILE_UNREADABLE
    accepted = duplicates = rejected = 0
    reasons: list[dict[str, str]] = []
    for start in range(0, len(events), args.batch_size):
        result = client.log_events(events[start : start + args.batch_size])
        accepted += result.accepted
        duplicates += result.duplicates
        rejected += result.rejected
        reasons += [
            {"event_id": o.event_id, "field": o.field, "reason": o.reason}
            for o in result.outcomes
            if o.status == "rejected"
        ]
    counts = {"events": len(events), "accepted": accepted, "duplicates": duplicates}
    if args.json:
        print(json.dumps({**counts, "rejected": rejected, "rejections": reasons}, indent=2))
    else:
        print(f"{len(events)} events: {accepted} accepted, ", end="")
        print(f"{duplicates} duplicate, {rejected} rejected")
        for entry in reasons:
            print(f"rejected {entry['event_id']!r}: {entry['reason']}")
    return 1 if rejected else 0


def _delete_user(client: AffinityClient, args: argparse.Namespace) -> int:
    if not args.admin_token:
        raise InvalidInputError(
            "--admin-token (or AFFINITY_ADMIN_TOKEN) is required to erase a user",
            field="admin_token",
        )
    result = client.delete_user(args.user_id, admin_token=args.admin_token)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print(
            f"erased user {args.user_id!r}: {result.events_deleted} events and "
            f"{result.responses_deleted} recorded responses deleted"
        )
    return 0


def _show_user(client: AffinityClient, args: argparse.Namespace) -> int:
    profile = client.user_profile(args.user_id)
    if args.json:
        print(json.dumps(profile.to_dict(), indent=2))
        return 0

    def when(value: datetime | None) -> str:
        return value.isoformat().replace("+00:00", "Z") if value is not None else "-"

    def shares(values: dict[str, float]) -> str:
        return ", ".join(f"{name} {share:.0%}" for name, share in values.items()) or "-"

    p = profile
    counts = ", ".join(f"{name} {n}" for name, n in p.event_counts.items()) or "-"
    scored = f"R{p.recency_score} F{p.frequency_score} M{p.monetary_score}"
    lines = [
        f"user {p.user_id}",
        f"  first seen      {when(p.first_seen)}",
        f"  last seen       {when(p.last_seen)}",
        f"  active days     {p.active_days_7} of 7, {p.active_days_30} of 30, "
        f"{p.active_days_90} of 90",
        f"  events          {counts}",
        f"  orders          {p.orders}  (monetary {p.monetary:,.2f})",
        f"  stage           {p.stage} since {when(p.stage_since)}",
        f"  tier            {p.tier or '(not scored yet)'}  ({scored})",
        f"  activated       {when(p.activated_at)}",
        f"  categories      {shares(p.top_categories)}",
        f"  item types      {shares(p.item_types)}",
        f"  recent items    {', '.join(p.recent_item_ids) or '-'}",
        f"  segments as of  {when(p.segments_as_of)}  (+{p.live_events} events since)",
    ]
    print("\n".join(lines))
    return 0


# ------------------------------------------------------------- event store
def _store_uri(args: argparse.Namespace) -> str:
    from service.events import events_uri

    return str(args.events_uri or events_uri())


def _export_events(args: argparse.Namespace) -> int:
    from service.events import EventStore
    from service.export import export_events, parse_when

    since = parse_when(args.since, name="since") if args.since else None
    until = parse_when(args.until, name="until") if args.until else None
    with EventStore.open(_store_uri(args)) as store:
        try:
            result = export_events(
                store,
                args.out,
                since=since,
                until=until,
                overwrite=args.overwrite,
                batch_size=args.batch_size,
            )
        except OSError as exc:
            return _fail(f"cannot write the export to {args.out}: {exc}")
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print(
            f"exported {result.events:,} events: {len(result.days)} days, {result.files} files "
            f"in {result.out}, {result.seconds:.2f} s"
        )
    return 0


def _prune_events(args: argparse.Namespace) -> int:
    from service.events import EventStore
    from service.retention import cutoff_of, prune

    cutoff = cutoff_of(args.older_than)
    with EventStore.open(_store_uri(args)) as store:
        pruned = prune(store, cutoff, dry_run=args.dry_run)
    if args.json:
        print(
            json.dumps(
                {
                    "dry_run": args.dry_run,
                    "older_than": cutoff.isoformat(),
                    "events": pruned.events,
                    "responses": pruned.responses,
                },
                indent=2,
            )
        )
    else:
        verb = "would remove" if args.dry_run else "removed"
        print(
            f"{verb} {pruned.events:,} events and {pruned.responses:,} recorded responses "
            f"older than {cutoff.isoformat(timespec='seconds')}"
        )
    return 0


def _report_events(args: argparse.Namespace) -> int:
    from service.attribution import attribution
    from service.events import EventStore
    from service.retention import cutoff_of

    now = datetime.now(UTC)
    since = cutoff_of(args.since, now=now)
    window = now - cutoff_of(args.window, now=now)
    with EventStore.open(_store_uri(args)) as store:
        report = attribution(store, since=since, window=window)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
        return 0
    print(
        f"answers served since {since.isoformat(timespec='seconds')} and the events credited "
        f"to them within {report.window} (last touch, by recommendation_id)"
    )
    header = ("model", "version", "method", "answers", "engaged", "converted", "revenue")
    rows = [
        (
            v.model_name,
            v.model_version or "-",
            v.method,
            f"{v.answers:,}",
            f"{v.engagement_rate:.2%}",
            f"{v.conversion_rate:.2%}",
            f"{v.revenue:,.2f}",
        )
        for v in report.versions
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        cells = (cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        print("  ".join(cells).rstrip())
    lost = ", ".join(f"{n:,} {why}" for why, n in report.uncredited.items())
    print(f"not credited: {lost}")
    return 0


def _store_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--events-uri",
        metavar="URI",
        help="the event store: sqlite:///PATH or postgresql+psycopg://USER:PASSWORD@HOST/DB "
        "[env AFFINITY_EVENTS_URI; default sqlite:///./events.db]",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a line")


def _connection_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("connection")
    group.add_argument(
        "--target",
        default=os.environ.get("AFFINITY_TARGET", DEFAULT_TARGET),
        help=f"server address host:port [env AFFINITY_TARGET; default {DEFAULT_TARGET}]",
    )
    group.add_argument(
        "--token",
        default=os.environ.get("AFFINITY_TOKEN"),
        help="bearer token sent as 'authorization: Bearer <token>' [env AFFINITY_TOKEN]",
    )
    group.add_argument("--ca-cert", metavar="PEM", help="CA certificate to verify a TLS server")
    group.add_argument("--tls", action="store_true", help="use TLS with the system CA roots")
    group.add_argument(
        "--timeout", type=float, default=5.0, help="deadline of the call in seconds (default 5)"
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _filter_options(parser: argparse.ArgumentParser, *, k_help: str) -> None:
    parser.add_argument("-k", "--k", dest="k", type=int, default=10, help=k_help)
    parser.add_argument(
        "--exclude", nargs="+", default=[], metavar="ITEM", help="item ids never to return"
    )
    parser.add_argument(
        "--item-type",
        action="append",
        default=[],
        metavar="TYPE",
        help="keep only this item type, 'content' or 'product' (repeatable)",
    )
    parser.add_argument(
        "--category", action="append", default=[], help="keep only this category (repeatable)"
    )


def _rule_options(parser: argparse.ArgumentParser, *, user: bool) -> None:
    """The ranking rule options; each one given overrides the server's default of that field."""
    group = parser.add_argument_group(
        "ranking rules",
        "Each option overrides the server's default for that field only (AFFINITY_RULES_*). "
        "FILTER is category=NAME|NAME and/or item_type=TYPE terms joined by ','.",
    )
    group.add_argument(
        "--diversity-cap",
        type=int,
        metavar="N",
        help="at most N items of one category (0: no cap); the list may come back shorter",
    )
    group.add_argument(
        "--mmr",
        type=float,
        metavar="X",
        help="relevance/diversity trade-off in [0, 1] (maximal marginal relevance; 0: off)",
    )
    group.add_argument(
        "--boost",
        action="append",
        default=[],
        metavar="FILTER:FACTOR",
        help="multiply the scores of matching items, e.g. category=sale:1.5 (repeatable; "
        "replaces the server's default boosts)",
    )
    group.add_argument(
        "--no-boosts", action="store_true", help="no boosts, not even the server's defaults"
    )
    group.add_argument(
        "--promote",
        metavar="FILTER:SHARE",
        help="give SHARE of the places, spread through the list, to the best matching items, "
        "e.g. category=new:0.2 (share 0 turns the server's default promotion off)",
    )
    if not user:
        parser.set_defaults(**{option: None for option, _, _ in _USER_RULES})
        return
    group.add_argument(
        "--explore",
        type=float,
        metavar="SHARE",
        help="give SHARE of the places to new, little-known items, by a seeded draw (0: off)",
    )
    group.add_argument(
        "--explore-max-age-days",
        type=float,
        metavar="DAYS",
        help="explorable items first appeared at most DAYS ago",
    )
    group.add_argument("--explore-seed", type=int, metavar="N", help="seed of the draw")
    group.add_argument(
        "--explore-max-interactions",
        type=int,
        metavar="N",
        help="explorable items have at most N users in the training data",
    )
    group.add_argument(
        "--rotation-rate",
        type=float,
        metavar="R",
        help="demote the items recently shown to the user by R in [0, 1] (0: off; the server "
        "must keep shown items)",
    )
    group.add_argument(
        "--rotation-half-life",
        type=float,
        metavar="S",
        help="half-life in seconds of the rotation's demotion",
    )


def register_cli(subparsers: Any) -> None:
    """Add the service's subcommands to an ``argparse`` subparsers object."""
    _add_serve(subparsers)

    rec = subparsers.add_parser("recommend", help="ask a server for a user's recommendations")
    rec.add_argument("--user", required=True, help="user id as in the interaction logs")
    _filter_options(rec, k_help="number of items (default 10)")
    rec.add_argument(
        "--recent",
        nargs="+",
        default=[],
        metavar="ITEM",
        help="fresh interactions the model has not seen, most recent first",
    )
    rec.add_argument(
        "--include-seen", action="store_true", help="also return items the user already has"
    )
    _rule_options(rec, user=True)
    _connection_options(rec)
    rec.set_defaults(func=_run_client(_recommend))

    sim = subparsers.add_parser("similar", help="ask a server for items similar to some items")
    sim.add_argument("items", nargs="*", metavar="ITEM", help="query item ids")
    sim.add_argument(
        "--item",
        dest="item_flags",
        action="append",
        default=[],
        metavar="ITEM",
        help="a query item id (repeatable; same as the positional ITEM)",
    )
    _filter_options(sim, k_help="number of items (default 10)")
    _rule_options(sim, user=False)
    _connection_options(sim)
    sim.set_defaults(func=_run_client(_similar))

    pop = subparsers.add_parser("popular", help="ask a server for the most popular items")
    _filter_options(pop, k_help="number of items (default 10)")
    pop.add_argument("--trending", action="store_true", help="rank by recency-weighted popularity")
    _rule_options(pop, user=False)
    _connection_options(pop)
    pop.set_defaults(func=_run_client(_popular))

    info = subparsers.add_parser("model-info", help="show the model a server is answering with")
    _connection_options(info)
    info.set_defaults(func=_run_client(_model_info))

    health = subparsers.add_parser(
        "health", help="check a server's health (exit 0 only when SERVING)"
    )
    health.add_argument(
        "--service", default="", help="service name to check (default '': the whole server)"
    )
    health.add_argument(
        "--wait",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="keep asking until SERVING or this many seconds have passed (default 0)",
    )
    _connection_options(health)
    health.set_defaults(func=_run_client(_health))

    events = subparsers.add_parser(
        "events", help="send events to a server; export or prune the event store"
    )
    actions = events.add_subparsers(dest="events_command", metavar="ACTION", required=True)
    log = actions.add_parser(
        "log",
        help="send the events of a JSON Lines file with LogEvents",
        description="Send events, one JSON object per line (event_id, user_id, item_id, event, "
        "and optionally timestamp as ISO 8601 with a zone, value, price, recommendation_id, "
        "shown_item_ids). Prints the counts and why each rejected event was rejected. Exit "
        "status: 0 all stored (accepted or duplicate), 1 some rejected or the call failed "
        "(UNAVAILABLE: run it again, duplicates are harmless), 2 the file cannot be read.",
    )
    log.add_argument("--file", required=True, metavar="EVENTS.jsonl", help="the events to send")
    log.add_argument(
        "--batch-size",
        type=int,
        default=500,
        metavar="N",
        help="events per request, at most the server's max_events (default 500)",
    )
    _connection_options(log)
    log.set_defaults(func=_run_client(_log_events))

    export = actions.add_parser(
        "export",
        help="write the event store's events as Parquet partitioned by day",
        description="Write the stored events as Parquet files in hive-style day partitions, "
        "OUT/day=YYYY-MM-DD/part-*.parquet (the UTC day of each event's timestamp), readable "
        "by pandas (pd.read_parquet(OUT)), pyarrow.dataset, DuckDB and Spark. Columns: "
        "event_id, user_id, item_id, event, timestamp, value, price, recommendation_id, "
        "shown_item_ids, received_at. The store is read in pages, in bounded memory. OUT must "
        "be empty unless --overwrite, which replaces the day partitions this export writes "
        "(so re-running never duplicates events).",
    )
    export.add_argument("--out", required=True, type=Path, metavar="DIR", help="output folder")
    export.add_argument(
        "--since",
        metavar="DATE",
        help="only events at or after this ISO date or date-time (naive: UTC)",
    )
    export.add_argument(
        "--until",
        metavar="DATE",
        help="only events before this ISO date or date-time (naive: UTC)",
    )
    export.add_argument(
        "--overwrite",
        action="store_true",
        help="export into a non-empty DIR, replacing each day partition written",
    )
    export.add_argument(
        "--batch-size",
        type=int,
        default=10_000,
        metavar="N",
        help="events read from the store per query (default 10000)",
    )
    _store_options(export)
    export.set_defaults(func=_export_events)

    prune_parser = actions.add_parser(
        "prune",
        help="remove events and recorded responses older than a cutoff (retention)",
        description="Remove the events that happened, and the responses served, before now "
        "minus --older-than, in one transaction; --dry-run only counts them. Run it from a "
        "scheduler to keep a retention period: the server never deletes on its own.",
    )
    prune_parser.add_argument(
        "--older-than",
        metavar="DURATION",
        help="a duration (90d, 12h, 30m, 45s, 2w) or an ISO date/date-time in the past",
    )
    prune_parser.add_argument(
        "--dry-run", action="store_true", help="count what would be removed; remove nothing"
    )
    _store_options(prune_parser)
    prune_parser.set_defaults(func=_prune_events)

    report = actions.add_parser(
        "report",
        help="attribution: what each model version's answers earned (clicks, purchases, revenue)",
        description="Credit the events that name a recommendation_id to the recorded answer "
        "(last touch, within --window of it) and report, per model version and method, the "
        "answers served, the share that earned a click-like event or a purchase, and revenue. "
        "Events not credited are counted by reason.",
    )
    report.add_argument(
        "--since",
        default="7d",
        metavar="DURATION",
        help="report on the last DURATION (7d, 24h) or since an ISO date (default 7d)",
    )
    report.add_argument(
        "--window",
        default="24h",
        metavar="DURATION",
        help="how long after an answer its events are credited to it (default 24h)",
    )
    _store_options(report)
    report.set_defaults(func=_report_events)

    users = subparsers.add_parser("users", help="manage users on a server (erasure)")
    user_actions = users.add_subparsers(dest="users_command", metavar="ACTION", required=True)
    delete = user_actions.add_parser(
        "delete",
        help="erase a user: delete their events and recorded responses (DeleteUser)",
        description="Erase a user on the server: their stored events and recorded responses "
        "are deleted, the server treats them as unknown from then on, and training with "
        "--events drops their older rows from log files too. Needs the admin token.",
    )
    delete.add_argument("--user-id", required=True, metavar="ID", help="the user to erase")
    delete.add_argument(
        "--admin-token",
        default=os.environ.get("AFFINITY_ADMIN_TOKEN"),
        help="the server's admin token [env AFFINITY_ADMIN_TOKEN]",
    )
    _connection_options(delete)
    delete.set_defaults(func=_run_client(_delete_user))
    show = user_actions.add_parser(
        "show",
        help="a user's profile: activity, value, stage and tier, tastes (GetUserProfile)",
        description="Show a user's profile: first and last seen, active days in the last 7, "
        "30 and 90 days, events by type, orders and monetary value, lifecycle stage and since "
        "when, RFM scores and tier, top categories and item types, the most recent items; "
        "from the last 'affinity segments' and the events since (docs/segments.md).",
    )
    show.add_argument("user_id", metavar="ID", help="the user")
    _connection_options(show)
    show.set_defaults(func=_run_client(_show_user))

    from service.console import cli as console_cli

    console_cli.register(subparsers)
    from service import experiment_cli

    experiment_cli.register(subparsers, _run_client, _connection_options)

    from service import audience_cli

    audience_cli.register(subparsers, _run_client, _connection_options)
