"""Every console page in headless Chromium against a real server with generated data: what a
person sees, that nothing shows before the login, that a hostile id stays text, and a screenshot
of each page in ``artifacts/console/`` (CI keeps them).

Chromium comes from Debian (``scripts/chromium.sh``); without it these tests skip, except in CI
(``CI`` set), where a skipped browser test would hide a missing install, so they fail.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from tests.console.conftest import ADMIN, EVIL, TOKEN, World

ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts" / "console"


def _binaries() -> tuple[str, str]:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    try:
        import selenium  # noqa: F401
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail("selenium is not installed in CI: install the dev extra")
        pytest.skip("selenium is not installed")
    if browser is None or driver is None:
        if os.environ.get("CI"):
            pytest.fail("no chromium/chromedriver in CI: .ci/run must run scripts/chromium.sh")
        pytest.skip("no chromium/chromedriver (bash scripts/chromium.sh installs them)")
    return browser, driver


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver = _binaries()
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1280,1000",
        "--force-color-profile=srgb",
    ):
        options.add_argument(flag)
    chrome = webdriver.Chrome(service=Service(driver), options=options)
    chrome.set_page_load_timeout(60)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    try:
        yield chrome
    finally:
        chrome.quit()


def _no_alert(browser: Any) -> None:
    from selenium.common.exceptions import NoAlertPresentException

    with pytest.raises(NoAlertPresentException):
        browser.switch_to.alert  # noqa: B018 (the property raises when there is none)


def _text(browser: Any) -> str:
    from selenium.webdriver.common.by import By

    return str(browser.find_element(By.TAG_NAME, "main").text)


def _follow(browser: Any, element: Any) -> None:
    """Click ``element`` and wait until the page it leads to has loaded.

    The old page carries a marker in its window; the new document starts without it. Waiting on
    the old element going stale is not enough: while Chromium swaps documents, asking about that
    element can fail with an inspector error instead of the stale-element one, so the wait treats
    any driver error during the swap as "not yet".
    """
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.support.ui import WebDriverWait

    browser.execute_script("window.affinityOldPage = true")
    element.click()
    WebDriverWait(browser, 30, ignored_exceptions=(WebDriverException,)).until(
        lambda d: d.execute_script(
            "return window.affinityOldPage === undefined && document.readyState === 'complete'"
        )
    )


def _login(browser: Any, world: World, token: str) -> None:
    from selenium.webdriver.common.by import By

    browser.delete_all_cookies()
    browser.get(world.console_url + "/login")
    browser.find_element(By.ID, "token").send_keys(token)
    _follow(browser, browser.find_element(By.ID, "login"))


def _shot(browser: Any, name: str) -> None:
    browser.save_screenshot(str(ARTIFACTS / f"{name}.png"))


def test_nothing_but_the_login_without_a_token(browser: Any, world: World) -> None:
    browser.delete_all_cookies()
    for path in ("/", "/users", "/experiments", "/audiences", f"/user?id={quote(EVIL)}"):
        browser.get(world.console_url + path)
        assert browser.current_url.startswith(world.console_url + "/login")
        assert "Log in" in _text(browser)
        assert "Serving models" not in browser.page_source
    _login(browser, world, "wrong-token")
    assert "not the console's read or admin token" in _text(browser)
    _shot(browser, "login")


def test_overview(browser: Any, world: World) -> None:
    from selenium.webdriver.common.by import By

    _login(browser, world, TOKEN)
    assert browser.current_url.rstrip("/") == world.console_url
    text = _text(browser)
    assert "Serving models" in text and "Last hour" in text and "Last model swaps" in text
    models = browser.find_element(By.ID, "models").text
    assert "served" in models and "affinity" in models and "ready" in models
    assert "spring / control" in models
    assert "Recommend" in browser.find_element(By.ID, "latency").text
    assert "answers recorded" in browser.find_element(By.ID, "rates").text
    _shot(browser, "overview")


def test_users_and_a_transition_cell(browser: Any, world: World) -> None:
    from selenium.webdriver.common.by import By

    _login(browser, world, TOKEN)
    browser.get(world.console_url + "/users")
    stages = browser.find_element(By.ID, "stages").text
    assert "active" in stages and "%" in stages
    assert browser.find_elements(By.CSS_SELECTOR, "svg.chart")  # the charts render
    assert "Users per lifecycle stage" in browser.page_source
    matrix = browser.find_element(By.ID, "transitions")
    assert "from \\ to" in matrix.text
    _shot(browser, "users")
    link = matrix.find_elements(By.TAG_NAME, "a")[0]
    _follow(browser, link)
    assert browser.find_elements(By.CSS_SELECTOR, "#cell-users li")
    assert "users" in _text(browser)


def test_user_lookup_shows_a_hostile_id_as_text(browser: Any, world: World) -> None:
    from selenium.webdriver.common.by import By

    _login(browser, world, TOKEN)
    browser.get(world.console_url + "/user?id=u03")
    text = _text(browser)
    assert "What Recommend returns now" in text
    rows = browser.find_elements(By.CSS_SELECTOR, "#recommendations tbody tr")
    assert len(rows) == 10
    assert "Recent events" in text and "purchase" in browser.find_element(By.ID, "events").text
    # The profile renders when GetUserProfile answers; otherwise the page says why.
    assert browser.find_elements(By.ID, "profile") or browser.find_elements(
        By.ID, "profile-problem"
    )
    _shot(browser, "user")

    browser.get(world.console_url + "/user?id=" + quote(EVIL))
    _no_alert(browser)
    assert browser.find_element(By.ID, "who").text == EVIL  # shown as the text it is
    assert browser.execute_script("return document.scripts.length") == 0
    assert browser.find_element(By.ID, "events").text.count("i01") == 1
    browser.get(world.console_url + "/user?id=u01")
    _no_alert(browser)
    assert EVIL in browser.find_element(By.ID, "events").text  # the item id, as text
    assert browser.execute_script("return document.scripts.length") == 0


def test_experiments(browser: Any, world: World) -> None:
    from selenium.webdriver.common.by import By

    _login(browser, world, TOKEN)
    browser.get(world.console_url + "/experiments")
    section = browser.find_element(By.ID, "exp-1").text
    assert "spring" in section and "running" in section
    assert "control" in section and "treatment" in section
    assert "Decision rule" in section and "%" in section
    assert not browser.find_elements(By.ID, "start-experiment")  # the read token cannot write
    _shot(browser, "experiments")


def test_audiences_need_the_admin_token(browser: Any, world: World) -> None:
    from selenium.webdriver.common.by import By

    _login(browser, world, TOKEN)
    browser.get(world.console_url + "/audiences?preview=1&items=i01")
    assert "admin" in browser.find_element(By.ID, "audience-problem").text

    _login(browser, world, ADMIN)
    browser.get(world.console_url + "/audiences")
    form = browser.find_element(By.ID, "audience")
    form.find_element(By.NAME, "items").send_keys("i01,i02")
    form.find_element(By.CSS_SELECTOR, "input[value=active]").click()
    _follow(browser, form.find_element(By.CSS_SELECTOR, "button[type=submit]"))
    # FindAudience answers members, or the page says why it could not (a server without it).
    sizes = browser.find_elements(By.ID, "audience-size")
    problems = browser.find_elements(By.ID, "audience-problem")
    assert sizes or problems
    if sizes:
        assert "users" in sizes[0].text
        assert browser.find_elements(By.ID, "export")
    _shot(browser, "audiences")
