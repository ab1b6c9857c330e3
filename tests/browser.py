"""A headless chromium for the page tests (selenium + the system's chromium and chromedriver), and screenshots.

Missing pieces skip the tests, except under MLX_LORA_REQUIRE_BROWSER=1 (set by .ci/run), where they fail: CI
must not pass by skipping the only tests that look at the pages.
"""

from __future__ import annotations

import base64
import os
import shutil
from pathlib import Path

import pytest

try:
    from selenium.webdriver.common.by import By  # re-exported: test modules import it from here
except ImportError:  # the `browser` fixture then skips, or fails when the browser is required
    By = None

REQUIRE = "MLX_LORA_REQUIRE_BROWSER"
SCREENSHOTS = "MLX_LORA_SCREENSHOTS"  # a folder (e.g. docs/images) that screenshots are also copied to
# Resolved now, against the folder pytest started in: a test may chdir elsewhere before its screenshot.
COPY_TO = Path(os.environ[SCREENSHOTS]).resolve() if os.environ.get(SCREENSHOTS) else None
WINDOW = (1200, 900)


def unavailable(reason: str):
    """Skip, or fail when the browser is required."""
    if os.environ.get(REQUIRE) == "1":
        pytest.fail(f"{reason} ({REQUIRE}=1: the browser tests must run)", pytrace=False)
    pytest.skip(reason)


def _find(env: str, names: tuple[str, ...]) -> str | None:
    """$env when set, else the first of `names` on PATH; only an executable file counts (given a missing path,
    selenium would fall back to downloading a driver)."""
    path = os.environ.get(env) or next((p for p in map(shutil.which, names) if p), None)
    return path if path and os.path.isfile(path) and os.access(path, os.X_OK) else None


def start_browser():
    """A selenium driver for headless chromium. The driver binary is given explicitly: without it selenium's
    own manager would try to download one, and these machines are offline."""
    try:
        from selenium import webdriver
        from selenium.common.exceptions import WebDriverException
        from selenium.webdriver.chrome.options import Options
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        unavailable("selenium is not installed (pip install -e '.[dev]')")
    binary = _find("CHROMIUM", ("chromium", "chromium-browser", "google-chrome"))
    driver_path = _find("CHROMEDRIVER", ("chromedriver",))
    if not binary or not driver_path:
        unavailable("chromium or chromedriver not found (Debian: apt-get install chromium chromium-driver)")
    options = Options()
    options.binary_location = binary
    for arg in (
        "--headless=new",
        "--no-sandbox",  # CI runs as root, where chromium's sandbox refuses to start
        "--disable-dev-shm-usage",  # small /dev/shm in containers crashes tabs
        "--disable-gpu",
        "--no-first-run",
        "--disable-extensions",
        "--disable-background-networking",  # offline machines: no update or metrics calls
        "--disable-component-update",
        "--hide-scrollbars",
        f"--window-size={WINDOW[0]},{WINDOW[1]}",
    ):
        options.add_argument(arg)
    try:
        return webdriver.Chrome(service=Service(driver_path), options=options)
    except WebDriverException as exc:
        unavailable(f"chromium did not start: {str(exc).splitlines()[0]}")


def screenshot(driver, path: Path, height: int | None = None) -> Path:
    """A PNG of the page's top `height` CSS pixels (default: the whole page), taken through the DevTools protocol,
    which captures beyond the window without resizing it; also copied to $MLX_LORA_SCREENSHOTS when set, which is
    how docs/images/ is refreshed."""
    width, full = driver.execute_script(
        "return [document.documentElement.clientWidth, document.documentElement.scrollHeight]"
    )
    clip = {"x": 0, "y": 0, "width": width, "height": min(height or full, full), "scale": 1}
    shot = driver.execute_cdp_cmd(
        "Page.captureScreenshot", {"format": "png", "clip": clip, "captureBeyondViewport": True}
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(base64.b64decode(shot["data"]))
    if COPY_TO:
        COPY_TO.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, COPY_TO / path.name)
    return path
