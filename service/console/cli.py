"""``affinity console``: the operations console on a local port, served by waitress.

It reads the server's own settings (``AFFINITY_*``, ``MLFLOW_TRACKING_URI``; see
service/config.py): the gRPC target is this host's ``AFFINITY_PORT`` unless ``--target`` says
otherwise, logins check ``AFFINITY_TOKEN`` and ``AFFINITY_ADMIN_TOKEN`` (session cookies are
signed with ``AFFINITY_CONSOLE_SECRET``, which replicas share), the pages read
``AFFINITY_EVENTS_URI`` and the tracking server, and the latency figures come from scraping the
server's ``--metrics-port``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

from models.errors import AffinityError, InvalidInputError

logger = logging.getLogger(__name__)

DEFAULT_PORT = 8050
SECRET_ENV = "AFFINITY_CONSOLE_SECRET"
"""The key that signs the session cookies (a console setting, not a server's). Unset, each
console process draws its own at start-up: logins then end when it restarts, and replicas
behind one address do not accept each other's sessions; give every replica the same one."""
MIN_SECRET = 32


def register(subparsers: Any) -> None:
    """Add ``console`` to the ``affinity`` command."""
    parser = subparsers.add_parser(
        "console",
        help="serve the operations console (web pages) for the people who run the users",
        description="Serve the operations console: the serving model and the last hour, users "
        "by stage and tier, a user's profile and list, experiments, audiences. It reads the "
        "same settings as `affinity serve` (AFFINITY_TOKEN, AFFINITY_ADMIN_TOKEN, "
        "AFFINITY_EVENTS_URI, MLFLOW_TRACKING_URI, AFFINITY_METRICS_PORT, ...).",
    )
    parser.add_argument(
        "--port", type=int, default=DEFAULT_PORT, metavar="N", help="HTTP port (default 8050)"
    )
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to bind (default 127.0.0.1; put a TLS proxy in front to open it wider)",
    )
    parser.add_argument(
        "--target",
        default=None,
        metavar="HOST:PORT",
        help="the gRPC server (default localhost:AFFINITY_PORT)",
    )
    parser.add_argument(
        "--metrics-url",
        default=None,
        metavar="URL",
        help="the server's Prometheus page (default http://localhost:AFFINITY_METRICS_PORT/"
        "metrics when a metrics port is set; 'off': none)",
    )
    parser.add_argument(
        "--scrape-seconds",
        type=float,
        default=15.0,
        metavar="S",
        help="how often to scrape the metrics (default 15; an hour is kept)",
    )
    parser.add_argument(
        "--insecure-cookies",
        action="store_true",
        help="send the session cookie over plain HTTP too (development only; the default "
        "marks it Secure, which browsers honour on https and on localhost)",
    )
    parser.add_argument("--threads", type=int, default=8, metavar="N", help="waitress threads")
    parser.set_defaults(func=cmd_console)


def cmd_console(args: argparse.Namespace) -> int:
    try:
        app, config = build(args)
    except AffinityError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    import waitress

    if config.metrics is not None:
        config.metrics.start()
    print(f"affinity console on http://{args.host}:{args.port}/ (Ctrl-C stops it)", file=sys.stderr)
    try:
        waitress.serve(
            app,
            host=args.host,
            port=args.port,
            threads=args.threads,
            max_request_body_size=16 * 1024,
            max_request_header_size=16 * 1024,
            ident="affinity-console",
        )
    finally:
        if config.metrics is not None:
            config.metrics.stop()
        config.api.close()
    return 0


def build(args: argparse.Namespace) -> tuple[Any, Any]:
    """The application and its configuration from the settings and ``args``."""
    from service.config import load_settings
    from service.console.app import ConsoleConfig, create_app
    from service.console.data import Api
    from service.console.metrics import MetricsWindow

    settings = load_settings()
    token = settings.token.get_secret_value() if settings.token else None
    admin = settings.admin_token.get_secret_value() if settings.admin_token else None
    roots = settings.tls_cert.read_bytes() if settings.tls_cert else None
    target = args.target or f"localhost:{settings.port or 50051}"
    url = args.metrics_url
    if url is None and settings.metrics_port:
        url = f"http://localhost:{settings.metrics_port}/metrics"
    metrics = MetricsWindow(url, interval=args.scrape_seconds) if url and url != "off" else None
    config = ConsoleConfig(
        api=Api(target, token=token, admin_token=admin, root_certificates=roots),
        events_uri=settings.events_uri,
        tracking_uri=settings.tracking_uri,
        token=token,
        admin_token=admin,
        metrics=metrics,
        secure_cookies=not args.insecure_cookies,
    )
    secret = os.environ.get(SECRET_ENV)
    if secret is not None:  # shared by replicas; without it, one per process
        if len(secret) < MIN_SECRET:
            raise InvalidInputError(
                f"{SECRET_ENV} must be at least {MIN_SECRET} characters (it signs the session "
                f"cookies), got {len(secret)}",
                field=SECRET_ENV,
            )
        config.secret_key = secret.encode()
    return create_app(config), config
