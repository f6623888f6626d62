"""Headless Chromium (Debian's `chromium` and `chromium-driver`) driven by selenium, for the
dashboard's tests: a real browser parses the pages, runs their script and submits their forms.

Missing pieces fail the test with what to install; nothing is skipped. Every wait is bounded:
page loads and scripts have timeouts, and `wait_until` polls with a deadline.
"""

from __future__ import annotations

import base64
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from services.process import which

PAGE_LOAD_TIMEOUT = 30.0
WINDOW = (1280, 900)
T = TypeVar("T")


def _need(name: str, package: str) -> str:
    found = which(name)
    if found is None:
        pytest.fail(
            f"{name} is not installed: scripts/setup-deps.sh installs it "
            f"(apt-get install -y {package})"
        )
    return found


def start_chromium(workdir: Path, javascript: bool = True, size: tuple[int, int] = WINDOW) -> Any:
    """A headless Chromium under chromedriver; `javascript=False` reads pages as a browser
    with scripts off does. The caller quits it."""
    chromium = _need("chromium", "chromium")
    chromedriver = _need("chromedriver", "chromium-driver")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.options import Options
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail(
            "selenium is not installed: pip install -e '.[test]' (scripts/setup-deps.sh does)"
        )
    workdir.mkdir(parents=True, exist_ok=True)
    options = Options()
    options.binary_location = chromium
    for argument in (
        "--headless=new",
        "--no-sandbox",  # the tests run as root
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--disable-extensions",
        "--hide-scrollbars",
        f"--window-size={size[0]},{size[1]}",
        f"--user-data-dir={workdir / 'profile'}",
    ):
        options.add_argument(argument)
    if not javascript:
        options.add_experimental_option(
            "prefs", {"profile.managed_default_content_settings.javascript": 2}
        )
    # An explicit driver path: selenium then downloads nothing.
    service = Service(executable_path=chromedriver, log_output=str(workdir / "chromedriver.log"))
    driver = webdriver.Chrome(service=service, options=options)
    driver.set_page_load_timeout(PAGE_LOAD_TIMEOUT)
    driver.set_script_timeout(10)
    return driver


def basic_auth(driver: Any, user: str, password: str) -> None:
    """Sends an Authorization header with every request of `driver` (pages, the script's
    fetches, form posts), as a browser does once the user has logged in."""
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    driver.execute_cdp_cmd("Network.enable", {})
    driver.execute_cdp_cmd(
        "Network.setExtraHTTPHeaders", {"headers": {"Authorization": f"Basic {token}"}}
    )


def wait_until(predicate: Callable[[], T], timeout: float = 15.0, what: str = "condition") -> T:
    """Polls `predicate` (exceptions count as not yet) until it returns a truthy value."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while True:
        try:
            value = predicate()
        except Exception as exc:  # the page may be between two loads
            value, last = None, exc  # type: ignore[assignment]
        if value:
            return value
        if time.monotonic() >= deadline:
            note = f" (last error: {last!r})" if last else ""
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}{note}")
        time.sleep(0.1)


def screenshot(driver: Any, path: Path, copy_to: Path | None = None) -> Path:
    """The whole page as a PNG at `path` (the viewport is stretched to the page's height, at
    most 2400 px); also copied into `copy_to` when given."""
    height = driver.execute_script("return document.documentElement.scrollHeight")
    metrics = {
        "width": WINDOW[0],
        "height": min(max(int(height), 400), 2400),
        "deviceScaleFactor": 1,
        "mobile": False,
    }
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics)
    try:
        time.sleep(0.3)  # a layout at the new size
        path.parent.mkdir(parents=True, exist_ok=True)
        assert driver.save_screenshot(str(path)), f"no screenshot written to {path}"
    finally:
        driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    if copy_to is not None:
        copy_to.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, copy_to / path.name)
    return path


__all__ = ["basic_auth", "screenshot", "start_chromium", "wait_until"]
