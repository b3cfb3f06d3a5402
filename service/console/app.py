"""The console's web application: login, five pages, two admin writes.

Pages render on the server with Jinja2 (autoescaped) and need nothing from outside: the CSS is
ours, there is no script at all, and the Content-Security-Policy says so, so an id that slipped
past escaping still could not run. Requests are bounded (body, query length, each parameter),
sessions are signed cookies (HttpOnly, SameSite=Strict, Secure unless turned off for plain-HTTP
development) that hold the role only, never a token, and each write form carries the session's
CSRF token.
"""

from __future__ import annotations

import csv
import hmac
import io
import logging
import math
import secrets
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import wraps
from pathlib import Path
from typing import Any, TypeVar

import grpc
from flask import (
    Flask,
    Response,
    abort,
    flash,
    g,
    redirect,
    render_template,
    request,
    session,
    stream_with_context,
    url_for,
)

from models.lifecycle import STAGES
from protos.affinity.v1 import recommender_pb2 as pb
from service.console import charts, data
from service.console.metrics import MetricsWindow
from service.events import MAX_ID, EventStore
from service.experiment_report import METRICS, decide, experiment_report
from service.experiments import ExperimentNotFound

logger = logging.getLogger(__name__)

HERE = Path(__file__).parent
MAX_BODY = 16 * 1024
"""The largest request body (the forms are small)."""
MAX_QUERY = 2048
"""The longest query string."""
MAX_PARAMS = 40
"""The most parameters in a query string or form."""
MAX_VALUE = MAX_ID
"""The longest parameter value: an id's limit."""
ROLE_READ, ROLE_ADMIN = "read", "admin"
F = TypeVar("F", bound=Callable[..., Any])


@dataclass
class ConsoleConfig:
    """What a console talks to and how it checks who is asking."""

    api: data.Api
    events_uri: str
    tracking_uri: str | None = None
    token: str | None = None
    """The read token (the server's ``AFFINITY_TOKEN``); unset: pages open without a login."""
    admin_token: str | None = None
    """The admin token: writes need a login with it; unset: no writes."""
    metrics: MetricsWindow | None = None
    secure_cookies: bool = True
    secret_key: bytes = field(default_factory=lambda: secrets.token_bytes(32))
    """Signs the session cookies: ``AFFINITY_CONSOLE_SECRET`` where set, so that replicas
    accept each other's sessions; otherwise drawn per process."""
    login_failures: int = 5
    """Failed logins one client address may make within ``login_window_seconds``; past them
    its logins are refused (429) until the oldest failure leaves the window."""
    login_window_seconds: float = 60.0


class LoginThrottle:
    """Failed logins per client address over a sliding window, against guessing tokens.

    After ``limit`` failures within ``window`` seconds an address's logins are refused until
    the oldest of them leaves the window (:meth:`retry_after`); a login with a right token
    clears its count. At most ``max_addresses`` addresses are kept, the stalest dropped first,
    so a flood of addresses cannot grow it without bound. One per console process: behind a
    proxy every client has the proxy's address, and replicas count apart.
    """

    def __init__(
        self,
        limit: int,
        window: float,
        *,
        max_addresses: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limit = limit
        self.window = window
        self.max_addresses = max_addresses
        self._clock = clock
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()
        self._lock = threading.Lock()

    def _recent(self, address: str, now: float) -> deque[float] | None:
        times = self._failures.get(address)
        if times is None:
            return None
        while times and times[0] <= now - self.window:
            times.popleft()
        if not times:
            del self._failures[address]
            return None
        return times

    def retry_after(self, address: str) -> float:
        """Seconds until ``address`` may try again (0: now)."""
        with self._lock:
            now = self._clock()
            times = self._recent(address, now)
            if times is None or len(times) < self.limit:
                return 0.0
            return max(times[-self.limit] + self.window - now, 0.0)

    def failed(self, address: str) -> None:
        with self._lock:
            now = self._clock()
            times = self._recent(address, now)
            if times is None:
                times = self._failures[address] = deque(maxlen=self.limit)
            times.append(now)
            self._failures.move_to_end(address)
            while len(self._failures) > self.max_addresses:
                self._failures.popitem(last=False)

    def succeeded(self, address: str) -> None:
        with self._lock:
            self._failures.pop(address, None)


def create_app(config: ConsoleConfig, store: EventStore | None = None) -> Flask:
    """The console as a WSGI application (serve it with waitress: :mod:`service.console.cli`)."""
    app = Flask(
        __name__,
        template_folder=str(HERE / "templates"),
        static_folder=str(HERE / "static"),
        static_url_path="/static",
    )
    app.config.update(
        SECRET_KEY=config.secret_key,
        MAX_CONTENT_LENGTH=MAX_BODY,
        MAX_FORM_PARTS=MAX_PARAMS,
        SESSION_COOKIE_NAME="affinity_console",
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Strict",
        SESSION_COOKIE_SECURE=config.secure_cookies,
        PERMANENT_SESSION_LIFETIME=timedelta(hours=12),
        TEMPLATES_AUTO_RELOAD=False,
    )
    app.jinja_env.autoescape = True
    app.extensions["affinity_console"] = config
    opened = store or data_store(config.events_uri)
    app.extensions["affinity_store"] = opened
    app.jinja_env.globals.update(number=_number, percent=_percent, when=_when, ms=_ms)

    @app.before_request
    def bounds() -> None:
        if len(request.query_string) > MAX_QUERY:
            abort(414 if request.method == "GET" else 400)
        if len(request.args) > MAX_PARAMS:
            abort(400)
        for values in request.args.listvalues():
            if len(values) > MAX_PARAMS or any(len(v) > MAX_VALUE for v in values):
                abort(400)
        if request.method == "POST":
            if request.content_length is not None and request.content_length > MAX_BODY:
                abort(413)
            if any(len(v) > 4 * MAX_VALUE for vs in request.form.listvalues() for v in vs):
                abort(400)
        g.role = _role(config)

    @app.after_request
    def headers(response: Response) -> Response:
        response.headers["Content-Security-Policy"] = (
            "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
            "frame-ancestors 'none'; base-uri 'none'"
        )
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["X-Frame-Options"] = "DENY"
        response.headers["Referrer-Policy"] = "no-referrer"
        response.headers["Cache-Control"] = "no-store"
        return response

    @app.context_processor
    def common() -> dict[str, Any]:
        return {
            "role": g.get("role"),
            "csrf_token": _csrf_token(),
            "can_write": config.admin_token is not None,
        }

    for code, title in (
        (400, "Bad request"),
        (403, "Forbidden"),
        (404, "Not found"),
        (405, "Method not allowed"),
        (413, "Request too large"),
        (414, "Request too long"),
    ):
        app.register_error_handler(code, _error_page(code, title))

    _routes(app, config, opened)
    return app


def data_store(uri: str) -> EventStore:
    return EventStore.open(uri)


def _error_page(code: int, title: str) -> Callable[[Exception], tuple[str, int]]:
    def handler(exc: Exception) -> tuple[str, int]:
        return render_template("error.html", code=code, title=title), code

    return handler


# ------------------------------------------------------------------------- auth


def _role(config: ConsoleConfig) -> str | None:
    role = session.get("role")
    if role == ROLE_ADMIN and config.admin_token is not None:
        return ROLE_ADMIN
    if role == ROLE_READ:
        return ROLE_READ
    if config.token is None:
        return ROLE_READ  # the service itself is open: so is reading
    return None


def _csrf_token() -> str:
    token = session.get("csrf")
    if not isinstance(token, str):
        token = secrets.token_urlsafe(32)
        session["csrf"] = token
    return token


def _check_csrf() -> None:
    sent = request.form.get("csrf_token", "")
    expected = session.get("csrf")
    if not isinstance(expected, str) or not hmac.compare_digest(sent, expected):
        abort(400, "CSRF token missing or wrong: reload the page and try again")


def _same(given: str, secret: str | None) -> bool:
    return secret is not None and hmac.compare_digest(given.encode(), secret.encode())


def reader(view: F) -> F:
    @wraps(view)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        if g.role is None:
            return redirect(url_for("login", next=request.path))
        return view(*args, **kwargs)

    return wrapped  # type: ignore[return-value]


def admin(view: F) -> F:
    @wraps(view)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        if g.role is None:
            return redirect(url_for("login", next=request.path))
        _check_csrf()
        if g.role != ROLE_ADMIN:
            abort(403)
        return view(*args, **kwargs)

    return wrapped  # type: ignore[return-value]


# ------------------------------------------------------------------------- pages


def _routes(app: Flask, config: ConsoleConfig, store: EventStore) -> None:
    api = config.api

    throttle = LoginThrottle(config.login_failures, config.login_window_seconds)
    app.extensions["affinity_login_throttle"] = throttle

    @app.route("/login", methods=["GET", "POST"])
    def login() -> Any:
        error = ""
        if request.method == "POST":
            _check_csrf()
            address = request.remote_addr or ""
            wait = throttle.retry_after(address)
            if wait > 0:
                seconds = math.ceil(wait)
                logger.warning("console: login refused for %s (too many failures)", address)
                page = render_template(
                    "login.html",
                    error=f"Too many failed logins from this address: try again in {seconds} s.",
                )
                return page, 429, {"Retry-After": str(seconds)}
            given = request.form.get("token", "")
            role = (
                ROLE_ADMIN
                if _same(given, config.admin_token)
                else ROLE_READ
                if _same(given, config.token)
                else None
            )
            if role is None:
                throttle.failed(address)
                error = "That token is not the console's read or admin token."
                logger.warning("console: failed login from %s", address)
            else:
                throttle.succeeded(address)
                csrf = secrets.token_urlsafe(32)
                session.clear()
                session.permanent = True
                session.update(role=role, csrf=csrf)
                target = request.args.get("next", "")
                # Only a path of ours: never an open redirect.
                if not target.startswith("/") or target.startswith("//"):
                    target = url_for("overview")
                return redirect(target)
        return render_template("login.html", error=error), (401 if error else 200)

    @app.post("/logout")
    def logout() -> Any:
        _check_csrf()
        session.clear()
        return redirect(url_for("login"))

    @app.get("/")
    @reader
    def overview() -> Any:
        now = datetime.now(UTC)
        problems: list[str] = []
        arms: list[dict[str, Any]] = []
        try:
            info = api.model_info()
            arms.append(
                {
                    "arm": "served",
                    "name": info.model.name,
                    "version": info.model.version,
                    "run_id": info.model.run_id,
                    "algorithm": info.model.algorithm,
                    "loaded_at": info.loaded_at,
                    "n_users": info.num_users,
                    "n_items": info.num_items,
                    "from_cache": info.from_cache,
                    "run": data.run_facts(config.tracking_uri, info.model.run_id),
                    "ready": True,
                    "error": "",
                }
            )
            for experiment in api.experiments():
                if experiment.status != "running":
                    continue
                for state in experiment.serving:
                    arms.append(
                        {
                            "arm": f"{experiment.name} / {state['arm']}",
                            "name": info.model.name,
                            "version": state["model_version"],
                            "run_id": "",
                            "algorithm": "",
                            "loaded_at": None,
                            "n_users": None,
                            "n_items": None,
                            "from_cache": False,
                            "run": None,
                            "ready": state["ready"],
                            "error": state["error"],
                        }
                    )
        except grpc.RpcError as exc:
            problems.append(f"serving model: {data.rpc_problem(exc)}")
        rates = data.hour_rates(store, now)
        swaps = data.recent_swaps(store, now)
        metrics = config.metrics.summary() if config.metrics is not None else None
        return render_template(
            "overview.html",
            page="overview",
            arms=arms,
            rates=rates,
            swaps=swaps,
            metrics=metrics,
            metrics_url=config.metrics.url if config.metrics is not None else "",
            metrics_error=config.metrics.last_error if config.metrics is not None else "",
            problems=problems,
            now=now,
        )

    @app.get("/users")
    @reader
    def users() -> Any:
        seg = data.segments(store)
        transitions = data.last_transitions(config.tracking_uri)
        return render_template(
            "users.html",
            page="users",
            seg=seg,
            stage_bars=charts.bar_chart(seg.stages),
            tier_bars=charts.bar_chart(seg.tiers),
            stage_lines=charts.line_chart(seg.history) if seg.history else None,
            transitions=transitions,
        )

    @app.get("/users/cell")
    @reader
    def cell() -> Any:
        frm, to = request.args.get("from", ""), request.args.get("to", "")
        if frm not in (*STAGES, data.NO_PREVIOUS) or to not in (*STAGES, data.GONE):
            abort(400)
        transitions = data.last_transitions(config.tracking_uri)
        previous = None
        if transitions is not None and transitions.previous_as_of:
            previous = datetime.fromisoformat(transitions.previous_as_of)
        found = data.cell_users(store, frm, to, previous)
        return render_template("cell.html", page="users", frm=frm, to=to, found=found)

    @app.get("/user")
    @reader
    def user() -> Any:
        user_id = request.args.get("id", "").strip()
        k = _bounded_int(request.args.get("k"), 10, 1, 50)
        view: dict[str, Any] = {"user_id": user_id, "k": k, "problems": {}}
        if user_id:
            _user_view(api, store, user_id, k, view)
        return render_template("user.html", page="user", **view)

    @app.get("/experiments")
    @reader
    def experiments() -> Any:
        rows: list[dict[str, Any]] = []
        problem = ""
        try:
            listed = api.experiments()
        except grpc.RpcError as exc:
            listed, problem = [], data.rpc_problem(exc)
        for experiment in reversed(listed):
            entry: dict[str, Any] = {"info": experiment, "report": None, "decision": None}
            try:
                report = experiment_report(store, experiment.name)
                entry["report"] = report
                entry["decision"] = decide(report)
            except ExperimentNotFound:
                entry["error"] = "not in the console's event store: is it the server's?"
            except Exception as exc:  # a report that cannot be computed yet is shown as such
                entry["error"] = str(exc)
            rows.append(entry)
        return render_template(
            "experiments.html",
            page="experiments",
            rows=rows,
            problem=problem,
            metrics=METRICS,
            running=any(r["info"].status == "running" for r in rows),
        )

    @app.post("/experiments/start")
    @admin
    def start_experiment() -> Any:
        form = request.form
        arms: list[tuple[str, str, float, bool]] = []
        try:
            for i in range(4):
                name = form.get(f"arm{i}_name", "").strip()
                if not name:
                    continue
                model = form.get(f"arm{i}_model", "").strip()
                share = form.get(f"arm{i}_share", "").strip()
                shadow = form.get(f"arm{i}_shadow") == "on"
                value = 0.0 if shadow else float(share.rstrip("%")) / (100 if "%" in share else 1)
                if not math.isfinite(value):
                    raise ValueError(share)
                arms.append((name, model, value, shadow))
            info = api.start_experiment(
                form.get("name", "").strip(),
                arms,
                control=form.get("control", "").strip(),
                primary_metric=form.get("primary_metric", "").strip(),
                min_users=_bounded_int(form.get("min_users"), 0, 0, 100_000_000),
            )
            flash(f"started experiment {info.name}", "ok")
        except ValueError:
            flash("a share is not a number (0.5 or 50%)", "error")
        except grpc.RpcError as exc:
            flash(f"not started: {data.rpc_problem(exc)}", "error")
        return redirect(url_for("experiments"))

    @app.post("/experiments/stop")
    @admin
    def stop_experiment() -> Any:
        try:
            info = api.stop_experiment(request.form.get("name", ""))
            flash(f"stopped experiment {info.name}", "ok")
        except grpc.RpcError as exc:
            flash(f"not stopped: {data.rpc_problem(exc)}", "error")
        return redirect(url_for("experiments"))

    @app.get("/audiences")
    @reader
    def audiences() -> Any:
        args = request.args
        view: dict[str, Any] = {
            "stages": STAGES,
            "form": args,
            "members": None,
            "size": 0,
            "capped": False,
            "problem": "",
        }
        if args.get("preview"):
            if g.role != ROLE_ADMIN:
                view["problem"] = "FindAudience is an admin RPC: log in with the admin token"
            else:
                try:
                    audience = _audience_request(args, record=False)
                    cap = min(audience.max_users, data.MAX_AUDIENCE_PREVIEW)
                    audience.max_users = cap
                    members = list(api.find_audience(audience))
                    view.update(members=members[:50], size=len(members), capped=len(members) >= cap)
                except ValueError as exc:
                    view["problem"] = str(exc)
                except grpc.RpcError as exc:
                    view["problem"] = data.rpc_problem(exc)
        return render_template("audiences.html", page="audiences", **view)

    @app.post("/audiences/export")
    @admin
    def export_audience() -> Any:
        try:
            audience = _audience_request(request.form, record=request.form.get("record") == "on")
            stream = api.find_audience(audience)
            first = next(iter(stream), None)
        except ValueError as exc:
            flash(str(exc), "error")
            return redirect(url_for("audiences"))
        except grpc.RpcError as exc:
            flash(f"not exported: {data.rpc_problem(exc)}", "error")
            return redirect(url_for("audiences"))

        def rows() -> Iterator[str]:
            out = io.StringIO()
            writer = csv.writer(out)
            writer.writerow(["rank", "user_id", "score"])
            members = [first] if first is not None else []
            for member in _chain(members, stream):
                writer.writerow([member.rank, _csv_safe(member.user_id), repr(member.score)])
                if out.tell() > 64 * 1024:
                    yield out.getvalue()
                    out.seek(0)
                    out.truncate()
            yield out.getvalue()

        name = _filename(request.form.get("name", "") or "audience")
        return Response(
            stream_with_context(rows()),
            mimetype="text/csv",
            headers={"Content-Disposition": f'attachment; filename="{name}.csv"'},
        )


def _chain(
    first: list[pb.AudienceMember], rest: Iterator[pb.AudienceMember]
) -> Iterator[pb.AudienceMember]:
    yield from first
    yield from rest


def _csv_safe(value: str) -> str:
    """A cell a spreadsheet will not run as a formula."""
    return "'" + value if value[:1] in ("=", "+", "-", "@", "\t", "\r") else value


def _filename(name: str) -> str:
    cleaned = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:64]
    return cleaned or "audience"


def _bounded_int(raw: str | None, default: int, low: int, high: int) -> int:
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        abort(400)
    if not low <= value <= high:
        abort(400)
    return value


def _audience_request(form: Any, *, record: bool) -> pb.FindAudienceRequest:
    """A ``FindAudienceRequest`` from the form: the options of ``affinity audience``."""
    items = [i.strip() for i in form.get("items", "").replace("\n", ",").split(",") if i.strip()]
    category = form.get("category", "").strip()
    if bool(items) == bool(category):
        raise ValueError("give one or more item ids, or a category (exactly one of the two)")
    if len(items) > 100:
        raise ValueError("at most 100 item ids")
    request_ = pb.FindAudienceRequest(
        item_ids=items,
        category=category,
        stages=[s for s in form.getlist("stages") if s in STAGES],
        tiers=[t.strip() for t in form.get("tiers", "").split(",") if t.strip()][:20],
        exclude_interacted=form.get("exclude_interacted") == "on",
        max_users=_bounded_int(form.get("max_users"), 1000, 1, 10_000_000),
        max_audiences_per_user=_bounded_int(form.get("max_audiences_per_user"), 0, 0, 1000),
        record=record,
        name=form.get("name", "").strip()[:MAX_ID],
    )
    for name in ("last_seen_within_days", "cap_window_days"):
        raw = form.get(name, "").strip()
        if raw:
            try:
                value = float(raw)
            except ValueError:
                raise ValueError(f"{name.replace('_', ' ')}: not a number") from None
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name.replace('_', ' ')}: must be a number >= 0")
            setattr(request_, name, value)
    return request_


def _user_view(
    api: data.Api, store: EventStore, user_id: str, k: int, view: dict[str, Any]
) -> None:
    problems: dict[str, str] = view["problems"]
    try:
        view["profile"] = api.user_profile(user_id)
    except grpc.RpcError as exc:
        problems["profile"] = (
            "no profile: the user has neither segments nor events"
            if exc.code() == grpc.StatusCode.NOT_FOUND
            else data.rpc_problem(exc)
        )
    view["events"] = data.recent_events(store, user_id)
    try:
        result = api.recommend(user_id, k)
        view["result"] = result
        view["stage"] = getattr(result, "stage", "")
        view["strategy"] = getattr(result, "strategy", "")
    except grpc.RpcError as exc:
        problems["recommend"] = data.rpc_problem(exc)
    recent = [e.item_id for e in view["events"]]
    profile = view.get("profile")
    if profile is not None and profile.recent_item_ids:
        recent = list(profile.recent_item_ids)
    seeds = list(dict.fromkeys(recent))[:3]
    explained: list[dict[str, Any]] = []
    for item_id in seeds:
        try:
            similar = api.similar_items([item_id], 5)
            explained.append({"item_id": item_id, "similar": similar.items})
        except grpc.RpcError as exc:
            explained.append({"item_id": item_id, "similar": [], "problem": data.rpc_problem(exc)})
    view["explained"] = explained
    if "result" in view:
        liked_by = {i.item_id: s["item_id"] for s in explained for i in s["similar"]}
        view["because"] = liked_by


# ------------------------------------------------------------------------- formatting


def _number(value: float | int | None, digits: int = 0) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:,.{digits}f}"


def _percent(value: float | None, digits: int = 2) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    return f"{value * 100:.{digits}f}%"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} ms"


def _when(value: datetime | None) -> str:
    if value is None:
        return "-"
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
