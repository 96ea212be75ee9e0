"""The dashboard as a person sees it: served over HTTP, rendered by a real headless Chromium.

The plugin's FastAPI app is mounted under /bem-fleet (as the api-server mounts it, so the pages'
relative links and image URLs are the deployed ones) and served by uvicorn on a free port;
Airflow's login is replaced as in test_dashboard.py. The artifacts are made by the functions the
phases and the gates DAG use (curves, forest plot, promotion reports). Screenshots go to
``$BEM_FLEET_TEST_ARTIFACTS/dashboard`` (default ``tests/.artifacts/dashboard``, git-ignored).

Needs Debian's ``chromium`` and ``chromium-driver`` (.ci/run installs them) and selenium (dev
requirements). Without them the tests are skipped, or fail under BEM_FLEET_REQUIRE_SERVICES=1.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import struct
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from bem_tasks.fleet.runs import write_manifest
from bem_tasks.io import atomic_write_json
from tests.conftest import unavailable

ROOT = Path(__file__).resolve().parents[2]
PREFIX = "/bem-fleet"
CURVE = "bem_fleet/run1/mission_a/train_experts/seed_0/loss.png"
FOREST = "bem_promotion_gates/g2/forest_mission_a.png"
WEEK = 7 * 24 * 3600.0


def screenshot_dir() -> Path:
    base = os.environ.get("BEM_FLEET_TEST_ARTIFACTS") or ROOT / "tests" / ".artifacts"
    path = Path(base) / "dashboard"
    path.mkdir(parents=True, exist_ok=True)
    return path


def png_size(data: bytes) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


# ----------------------------------------------------------------------------- artifacts


def make_artifacts(root: Path) -> None:
    """One fleet run of mission_a with a training curve, and two gates runs judging it."""
    from bem_tasks.gates import Decision, GateOutcome
    from bem_tasks.missions.common import plot_series
    from bem_tasks.stats.plots import plot_forest

    phase = root / "bem_fleet/run1/mission_a/train_experts/seed_0"
    loss = [(step, 2.5 * 0.97**step + 0.3) for step in range(0, 200, 5)]
    plot_series(phase / "loss.png", {"loss": loss, "lr": [(s, 3e-4) for s, _ in loss]},
                "mission_a train_experts", "step")  # fmt: skip
    atomic_write_json(phase / "metrics.json", {"final_loss": round(loss[-1][1], 4)})
    write_manifest(
        phase, config_hash="h", seed=0,
        extra={"mission": "mission_a", "phase": "train_experts", "duration_s": 12.5},
    )  # fmt: skip

    for run, observed, decision in (("g1", 0.8, "REJECTED"), ("g2", 2.1, "PROMOTED")):
        passed = decision == "PROMOTED"
        gate = GateOutcome(
            gate="em_gain", kind="superiority", metric="em", slice="test", family="quality",
            op=">=", threshold=1.5, relative=False, statistic="mean",
            status="passed" if passed else "failed",
            reason="CI above the threshold" if passed else "CI reaches below the threshold",
            observed=observed, ci_low=observed - 0.4, ci_high=observed + 0.5,
            p_adjusted=0.01 if passed else 0.3, n=3000,
        )  # fmt: skip
        d = Decision(
            mission="mission_a", decision=decision, summary=f"{decision.lower()} by em_gain",
            candidate="router", baseline="baseline", alpha=0.05, power=0.8, gates=[gate],
        )  # fmt: skip
        atomic_write_json(root / f"bem_promotion_gates/{run}/promotion_report.json",
                          {"decisions": [d.to_json()]})  # fmt: skip
    plot_forest(
        [{"mission": "mission_a", "metric": "em", "slice": "test", "n": 3000,
          "statistic": "mean", "estimate": 2.1, "ci_low": 1.7, "ci_high": 2.6,
          "p_adjusted": 0.01, "alpha": 0.05, "null_value": 1.5, "threshold": 1.5}],
        root / FOREST, title="mission_a: router vs baseline",
    )  # fmt: skip
    # g1 judged a week before g2 (the trend orders and dates the runs by their report's mtime)
    g2 = (root / "bem_promotion_gates/g2/promotion_report.json").stat().st_mtime
    os.utime(root / "bem_promotion_gates/g1/promotion_report.json", (g2 - WEEK, g2 - WEEK))


# ----------------------------------------------------------------------------- server, browser


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture(scope="module")
def dashboard(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """(base URL of the dashboard, artifact root) with uvicorn serving it in a thread."""
    import uvicorn
    from fastapi import FastAPI

    root = tmp_path_factory.mktemp("artifacts")
    make_artifacts(root)
    old = os.environ.get("BEM_FLEET_ARTIFACT_ROOT")
    os.environ["BEM_FLEET_ARTIFACT_ROOT"] = str(root)
    spec = importlib.util.spec_from_file_location(
        "bem_fleet_dashboard_chromium", ROOT / "plugins" / "bem_fleet_dashboard.py"
    )
    assert spec is not None and spec.loader is not None
    plugin = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plugin)
    plugin.app.dependency_overrides[plugin.can_read_fleet] = lambda: None
    server_app = FastAPI()
    server_app.mount(PREFIX, plugin.app)  # what the api-server does with fastapi_apps
    port = _free_port()
    server = uvicorn.Server(
        uvicorn.Config(server_app, host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}{PREFIX}", root
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        if old is None:
            os.environ.pop("BEM_FLEET_ARTIFACT_ROOT", None)
        else:
            os.environ["BEM_FLEET_ARTIFACT_ROOT"] = old


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    chromium = shutil.which("chromium")
    driver_bin = shutil.which("chromedriver")
    if not chromium or not driver_bin:
        unavailable(
            "no headless Chromium: /usr/bin/chromium and /usr/bin/chromedriver come with "
            "`apt-get install -y chromium chromium-driver` (.ci/run does it)"
        )
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        unavailable("selenium is not installed (requirements-dev.txt: `make install`)")
    options = webdriver.ChromeOptions()
    options.binary_location = str(chromium)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--window-size=1280,900"):  # fmt: skip
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # An explicit driver: selenium never tries to download one (no network on CI for that).
    driver = webdriver.Chrome(service=Service(executable_path=str(driver_bin)), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def full_page_screenshot(driver: Any, name: str) -> Path:
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1280, min(max(int(height) + 100, 900), 8000))
    path = screenshot_dir() / name
    assert driver.save_screenshot(str(path)), f"Chromium did not write {path}"
    driver.set_window_size(1280, 900)
    return path


def severe_console_messages(driver: Any) -> list[str]:
    """Errors in the browser console (a failed image, a script error), less the browser's own
    request for /favicon.ico, which Airflow's server answers and this test's does not."""
    return [
        e["message"]
        for e in driver.get_log("browser")
        if e["level"] == "SEVERE" and "/favicon.ico " not in e["message"]
    ]


def images(driver: Any) -> list[dict[str, Any]]:
    """Every <img> once all have finished loading (or failed): src, natural size, complete."""
    from selenium.webdriver.support.ui import WebDriverWait

    script = "return Array.from(document.images).map(i => ({src: i.currentSrc, alt: i.alt, complete: i.complete, width: i.naturalWidth, height: i.naturalHeight}))"  # noqa: E501
    WebDriverWait(driver, 20).until(lambda d: all(i["complete"] for i in d.execute_script(script)))
    found: list[dict[str, Any]] = driver.execute_script(script)
    return found


# ----------------------------------------------------------------------------- tests


def test_fleet_page_renders_runs_and_decisions(browser: Any, dashboard: tuple[str, Path]) -> None:
    from selenium.webdriver.common.by import By

    url, _ = dashboard
    browser.get(f"{url}/?refresh=0")

    assert browser.title == "BEM Fleet"
    assert browser.find_element(By.TAG_NAME, "h1").text == "BEM Fleet"
    headings = [h.text for h in browser.find_elements(By.TAG_NAME, "h2")]
    assert "bem_fleet / run1" in headings
    assert {"bem_promotion_gates / g1", "bem_promotion_gates / g2"} <= set(headings)
    decisions = [s.text for s in browser.find_elements(By.CSS_SELECTOR, "h3 span")]
    assert sorted(decisions) == ["PROMOTED", "REJECTED"]
    promoted = browser.find_element(By.CSS_SELECTOR, "span.PROMOTED")
    assert promoted.value_of_css_property("color") == "rgba(26, 127, 55, 1)"  # #1a7f37
    cells = [td.text for td in browser.find_elements(By.TAG_NAME, "td")]
    assert "train_experts" in cells and "em_gain" in cells
    assert "final_loss=0.3066" in cells  # 2.5 * 0.97**195 + 0.3, the last point of the curve
    body = browser.find_element(By.TAG_NAME, "body").text
    for bad in ("Internal Server Error", "Not Found", "Traceback", "not valid JSON"):
        assert bad not in body
    assert not browser.find_elements(By.CSS_SELECTOR, ".ERROR")
    assert not severe_console_messages(browser)
    shot = full_page_screenshot(browser, "fleet.png")
    assert png_size(shot.read_bytes())[0] == 1280


def test_mission_page_shows_trend_forest_and_curves(
    browser: Any, dashboard: tuple[str, Path]
) -> None:
    """Reached by the fleet page's link, as a person would; every image loads."""
    from selenium.webdriver.common.by import By

    url, root = dashboard
    browser.get(f"{url}/?refresh=0")
    browser.find_elements(By.LINK_TEXT, "mission_a")[0].click()

    assert browser.current_url == f"{url}/mission/mission_a"
    assert browser.title == "BEM Fleet: mission_a"
    assert [h.text for h in browser.find_elements(By.TAG_NAME, "h2")] == [
        "Trends",
        "Forest plot (newest gates run)",
        "Curves of the newest run (bem_fleet/run1/mission_a)",
    ]
    rows = [
        [td.text for td in tr.find_elements(By.TAG_NAME, "td")]
        for tr in browser.find_elements(By.CSS_SELECTOR, "table tr")
    ][1:]
    # oldest first, dated by each report's mtime
    assert [(r[0], r[1], r[3], r[4], r[5], r[6]) for r in rows] == [
        ("em_gain", "g1", "REJECTED", "0.8", "[0.4, 1.3]", "failed"),
        ("em_gain", "g2", "PROMOTED", "2.1", "[1.7, 2.6]", "passed"),
    ]
    dated = [root / f"bem_promotion_gates/{g}/promotion_report.json" for g in ("g1", "g2")]
    assert [r[2] for r in rows] == [
        datetime.fromtimestamp(p.stat().st_mtime, UTC).isoformat(timespec="minutes") for p in dated
    ]
    shown = {i["src"].removeprefix(url): i for i in images(browser)}
    trend = httpx.get(f"{url}/mission/mission_a/trend.png", timeout=30).content
    expected = {
        "/mission/mission_a/trend.png": png_size(trend),
        f"/file/{FOREST}": png_size((root / FOREST).read_bytes()),
        f"/file/{CURVE}": png_size((root / CURVE).read_bytes()),
    }
    assert set(shown) == set(expected)
    for src, (width, height) in expected.items():
        assert (shown[src]["width"], shown[src]["height"]) == (width, height), src
        assert width > 0 and height > 0
    body = browser.find_element(By.TAG_NAME, "body").text
    assert "No gates run has judged" not in body and "None yet." not in body
    assert not browser.find_elements(By.CSS_SELECTOR, ".ERROR")
    assert not severe_console_messages(browser)
    full_page_screenshot(browser, "mission_a.png")

    # an unknown mission is a plain 404, reported by the browser as such
    browser.get(f"{url}/mission/mission_zz")
    assert "unknown mission 'mission_zz'" in browser.find_element(By.TAG_NAME, "body").text
