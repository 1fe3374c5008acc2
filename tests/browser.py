"""Headless Chromium for the dashboard's tests: Debian's `chromium` driven through its own
`chromedriver` (Selenium), never a browser downloaded at test time. `make test` installs both
when missing; CI sets KEYBRAKE_REQUIRE_BROWSER=1 so a missing browser fails instead of skipping."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCREENSHOTS = ROOT / "build" / "screenshots"  # test artifacts (git-ignored)


def _binary(*names: str) -> str | None:
    for name in names:
        found = shutil.which(name)
        if found:
            return found
    return None


@contextmanager
def chromium() -> Iterator[object]:
    browser = _binary("chromium", "chromium-browser")
    driver_path = _binary("chromedriver")
    if browser is None or driver_path is None:
        message = "Debian's chromium and chromium-driver are not installed (make tools)"
        if os.environ.get("KEYBRAKE_REQUIRE_BROWSER"):
            pytest.fail(message)
        pytest.skip(message)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in (
        "--headless=new",
        "--no-sandbox",  # root in a container has no user namespaces for the sandbox
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1280,1700",
        "--lang=en-US",
        "--no-first-run",
        "--disable-background-networking",  # nothing leaves loopback
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def screenshot(driver: object, name: str) -> Path:
    """Save the page as `build/screenshots/<name>.png` (a test artifact); returns the path."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    driver.save_screenshot(str(path))  # type: ignore[attr-defined]
    return path
