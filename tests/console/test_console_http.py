"""The console over HTTP against a real server: login, admin-only writes, CSRF, bounds,
escaping, and the numbers on each page."""

from __future__ import annotations

import re
import time
from typing import Any

import pytest

from service.console.metrics import MetricsWindow, quantile, summarize
from tests.console.conftest import ADMIN, EVIL, TOKEN, World


def _client(world: World) -> Any:
    client = world.app.test_client()  # type: ignore[attr-defined]
    client.environ_base["wsgi.url_scheme"] = "https"  # the session cookie is Secure
    return client


def _csrf(html: str) -> str:
    found = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert found, "no CSRF token on the page"
    return found.group(1)


def _login(client: Any, token: str) -> Any:
    page = client.get("/login")
    return client.post("/login", data={"token": token, "csrf_token": _csrf(page.text)})


@pytest.mark.parametrize(
    "path", ["/", "/users", "/user?id=u01", "/experiments", "/audiences", "/users/cell"]
)
def test_every_page_needs_a_login(world: World, path: str) -> None:
    response = _client(world).get(path)
    assert response.status_code == 302
    assert response.headers["Location"].startswith("/login")


def test_a_wrong_token_is_refused_and_the_cookie_is_strict(world: World) -> None:
    client = _client(world)
    assert _login(client, "nope").status_code == 401
    assert client.get("/").status_code == 302
    response = _login(client, TOKEN)
    assert response.status_code == 302
    cookie = response.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Secure" in cookie
    assert TOKEN not in cookie  # the session holds the role, never the token
    assert client.get("/").status_code == 200


def test_login_needs_the_csrf_token(world: World) -> None:
    client = _client(world)
    client.get("/login")
    assert client.post("/login", data={"token": TOKEN}).status_code == 400


def test_login_never_redirects_off_site(world: World) -> None:
    client = _client(world)
    page = client.get("/login")
    response = client.post(
        "/login?next=//evil.example/", data={"token": TOKEN, "csrf_token": _csrf(page.text)}
    )
    assert response.headers["Location"] == "/"


def test_writes_need_the_admin_token_and_csrf(world: World) -> None:
    reader = _client(world)
    _login(reader, TOKEN)
    token = _csrf(reader.get("/experiments").text)
    form = {"csrf_token": token, "name": "spring"}
    assert reader.post("/experiments/stop", data=form).status_code == 403
    assert reader.post("/audiences/export", data={**form, "items": "i01"}).status_code == 403
    admin = _client(world)
    _login(admin, ADMIN)
    assert admin.post("/experiments/stop", data={"name": "spring"}).status_code == 400  # no CSRF
    assert b"Start an experiment" not in reader.get("/experiments").data


def test_an_admin_exports_an_audience_as_csv(world: World) -> None:
    admin = _client(world)
    _login(admin, ADMIN)
    token = _csrf(admin.get("/audiences").text)
    response = admin.post(
        "/audiences/export",
        data={"csrf_token": token, "items": "i01,i02", "max_users": "5", "name": "spring/sale"},
    )
    if response.status_code == 302:  # FindAudience not served: the page says why
        assert "not exported" in admin.get("/audiences").text
        return
    assert response.status_code == 200
    assert response.headers["Content-Disposition"] == 'attachment; filename="spring_sale.csv"'
    lines = response.text.splitlines()
    assert lines[0] == "rank,user_id,score" and 1 < len(lines) <= 6


def test_oversized_requests_are_refused(world: World) -> None:
    client = _client(world)
    _login(client, TOKEN)
    assert client.get("/user?id=" + "x" * 300).status_code == 400
    assert client.get("/user?id=u01&" + "&".join(f"p{i}=1" for i in range(50))).status_code == 400
    assert client.get("/user?" + "q=" + "y" * 5000).status_code == 414
    assert client.get("/user?id=u01&k=100000").status_code == 400
    assert client.get("/users/cell?from=nope&to=active").status_code == 400
    big = client.post("/experiments/start", data={"name": "x" * 40_000})
    assert big.status_code == 413


def test_ids_are_escaped_and_scripts_are_forbidden(world: World) -> None:
    client = _client(world)
    _login(client, TOKEN)
    response = client.get("/user", query_string={"id": EVIL})
    assert response.status_code == 200
    assert EVIL not in response.text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in response.text
    assert "script-src" not in response.headers["Content-Security-Policy"]  # default-src 'none'
    assert "default-src 'none'" in response.headers["Content-Security-Policy"]
    assert "<script" not in client.get("/users").text


def test_overview_shows_the_model_rates_and_latency(world: World) -> None:
    client = _client(world)
    _login(client, TOKEN)
    html = client.get("/").text
    assert "affinity" in html and "ready" in html
    assert "answers recorded" in html and "events received" in html
    assert 'id="latency"' in html and "Recommend" in html
    assert "spring / control" in html


def test_users_page_shows_stages_tiers_and_transitions(world: World) -> None:
    client = _client(world)
    _login(client, TOKEN)
    html = client.get("/users").text
    assert 'id="stages"' in html and 'id="tiers"' in html and 'id="transitions"' in html
    link = re.search(r'href="(/users/cell\?[^"]+)"', html)
    assert link
    cell = client.get(link.group(1).replace("&amp;", "&"))
    assert cell.status_code == 200 and 'id="cell-users"' in cell.text


def test_experiments_page_shows_arms_intervals_and_the_rule(world: World) -> None:
    client = _client(world)
    _login(client, TOKEN)
    html = client.get("/experiments").text
    assert "spring" in html and "control" in html and "treatment" in html
    assert "Decision rule" in html and "[" in html


def test_metrics_window_reads_rates_and_percentiles() -> None:
    text = """# TYPE affinity_requests_total counter
affinity_requests_total{method="Recommend",code="OK"} %d
affinity_requests_total{method="Recommend",code="INTERNAL"} %d
# TYPE affinity_request_latency_seconds histogram
affinity_request_latency_seconds_bucket{method="Recommend",code="OK",le="0.01"} %d
affinity_request_latency_seconds_bucket{method="Recommend",code="OK",le="0.1"} %d
affinity_request_latency_seconds_bucket{method="Recommend",code="OK",le="+Inf"} %d
affinity_request_latency_seconds_count{method="Recommend",code="OK"} %d
affinity_request_latency_seconds_sum{method="Recommend",code="OK"} 1
"""
    pages = iter([text % (0, 0, 0, 0, 0, 0), text % (100, 4, 50, 100, 100, 100)])
    clock = iter([0.0, 60.0])
    window = MetricsWindow(
        "http://x/metrics", fetch=lambda url: next(pages), clock=lambda: next(clock)
    )
    window.scrape()
    window.scrape()
    found = window.summary()
    assert found is not None
    (recommend,) = found.methods
    assert recommend.requests == 104 and recommend.errors == 4
    assert recommend.per_minute == pytest.approx(104)
    assert recommend.p50_ms == pytest.approx(10.0)
    assert recommend.p95_ms == pytest.approx(91.0)
    assert found.errors_by_code == {"INTERNAL": 4}
    assert quantile([(0.1, 0.0), (float("inf"), 0.0)], 0.5) is None
    assert summarize is not None


def test_every_transition_cell_lists_exactly_the_users_it_counts(world: World) -> None:
    """Each user's row keeps the stage the computation before gave them, so a cell's users
    are the ones the logged matrix counts (the gone column aside: they are not stored)."""
    from datetime import datetime

    from service.console.data import GONE, cell_users, last_transitions
    from service.events import EventStore

    matrix = last_transitions(world.tracking_uri)
    assert matrix is not None and matrix.previous_as_of
    previous = datetime.fromisoformat(matrix.previous_as_of.replace("Z", "+00:00"))
    checked = 0
    with EventStore.open(world.events_uri) as store:
        for i, frm in enumerate(matrix.rows):
            for j, to in enumerate(matrix.cols):
                if to == GONE:
                    continue
                listed = cell_users(store, frm, to, previous, limit=10_000)
                assert listed.total == matrix.users[i][j] == len(listed.user_ids), (frm, to)
                checked += listed.total
    assert checked > 0


# ------------------------------------------------------------------ logins over time
def _second_app(world: World, **changes: Any) -> Any:
    """Another console over the same server and store (its own throttle and, unless given,
    its own session secret), as a second replica would be."""
    from dataclasses import replace

    from service.console.app import create_app

    return create_app(replace(world.config, **changes))


def test_repeated_failed_logins_are_throttled_per_address(world: World) -> None:
    app = _second_app(world, login_failures=3, login_window_seconds=1.5)
    guesser, other = app.test_client(), app.test_client()
    for client, address in ((guesser, "203.0.113.7"), (other, "198.51.100.2")):
        client.environ_base.update({"wsgi.url_scheme": "https", "REMOTE_ADDR": address})
    for _ in range(3):
        assert _login(guesser, "guess").status_code == 401
    refused = _login(guesser, TOKEN)  # even the right token waits out the window
    assert refused.status_code == 429
    assert 1 <= int(refused.headers["Retry-After"]) <= 2
    assert "Too many failed logins" in refused.text
    assert guesser.get("/").status_code == 302
    assert _login(other, TOKEN).status_code == 302  # another address is not held back
    time.sleep(1.6)
    assert _login(guesser, TOKEN).status_code == 302
    assert guesser.get("/").status_code == 200


def test_replicas_with_one_secret_accept_each_others_sessions(world: World) -> None:
    secret = b"s" * 32
    first, second = _second_app(world, secret_key=secret), _second_app(world, secret_key=secret)
    stranger = _second_app(world)  # a secret of its own, drawn at start-up
    client = first.test_client()
    client.environ_base["wsgi.url_scheme"] = "https"
    assert _login(client, TOKEN).status_code == 302
    cookie = client.get_cookie("affinity_console")
    assert cookie is not None
    for app, status in ((second, 200), (stranger, 302)):
        other = app.test_client()
        other.environ_base["wsgi.url_scheme"] = "https"
        other.set_cookie("affinity_console", cookie.value, domain="localhost")
        assert other.get("/").status_code == status


def test_the_login_throttle_slides_and_stays_bounded() -> None:
    from service.console.app import LoginThrottle

    now = [100.0]
    throttle = LoginThrottle(2, 10.0, max_addresses=3, clock=lambda: now[0])
    throttle.failed("a")
    now[0] = 104.0
    throttle.failed("a")
    assert throttle.retry_after("a") == pytest.approx(6.0)  # until the first leaves the window
    now[0] = 110.5
    assert throttle.retry_after("a") == 0.0  # one failure left in the window
    throttle.failed("a")
    assert throttle.retry_after("a") == pytest.approx(3.5)
    throttle.succeeded("a")
    assert throttle.retry_after("a") == 0.0
    for address in "bcdef":
        throttle.failed(address)
        throttle.failed(address)
    assert len(throttle._failures) == 3  # the stalest addresses dropped
    assert throttle.retry_after("b") == 0.0 and throttle.retry_after("f") > 0


def test_the_console_secret_comes_from_its_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    import argparse

    from models.errors import InvalidInputError
    from service.console.cli import build

    args = argparse.Namespace(
        target="127.0.0.1:1", metrics_url="off", scrape_seconds=15.0, insecure_cookies=False
    )
    monkeypatch.setenv("AFFINITY_CONSOLE_SECRET", "x" * 40)
    _, config = build(args)
    assert config.secret_key == b"x" * 40
    config.api.close()
    monkeypatch.setenv("AFFINITY_CONSOLE_SECRET", "short")
    with pytest.raises(InvalidInputError, match="AFFINITY_CONSOLE_SECRET must be at least 32"):
        build(args)
    monkeypatch.delenv("AFFINITY_CONSOLE_SECRET")
    _, first = build(args)
    _, second = build(args)
    assert first.secret_key != second.secret_key  # drawn per process without the setting
    first.api.close()
    second.api.close()
