"""The web panel in a real browser: headless Chromium driven by Selenium (chromedriver from Debian,
installed by scripts/install-system) against `python -m harness serve` in a subprocess.

Opens the panel, starts the demo, watches live numbers change, scales a group and sees its users
follow, stops the run, and opens it in the history tab; saves a screenshot at each step (their
paths are printed; run with `-s` to see them)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

from tests.clitools import free_port

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"

pytestmark = pytest.mark.slow


@pytest.fixture
def panel(tmp_path: Path) -> Iterator[str]:
    """`python -m harness serve` on a free loopback port with its own database; yields its URL."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("HARNESS_")}
    env["PYTHONPATH"] = str(ROOT)
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "harness", "serve", "--port", str(port), "--db", str(tmp_path / "h.db")],
        cwd=tmp_path,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                pytest.fail(
                    f"harness serve exited with {proc.returncode}:\n{(tmp_path / 'serve.log').read_text()}"
                )
            try:
                with urllib.request.urlopen(url + "api/session", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the panel did not answer in 30 s:\n{(tmp_path / 'serve.log').read_text()}")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()


@pytest.fixture
def browser(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """Headless Chromium through the Debian chromedriver; Selenium Manager never downloads anything."""
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.fail("chromium and chromedriver are needed: scripts/install-system installs them")
    monkeypatch.setenv("SE_OFFLINE", "true")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--window-size=1400,1000",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--disable-extensions",
        "--disable-background-networking",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(driver: Any, what: str, check: Callable[[Any], Any], timeout: float = 30) -> Any:
    """Wait until `check(driver)` is truthy; fail naming `what` and showing the page's state."""
    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.25).until(check)
    except Exception as exc:  # a TimeoutException, or a stale element mid-update
        state = driver.execute_script(
            "return {status: (document.getElementById('run-status')||{}).textContent,"
            " rps: (document.getElementById('card-rps')||{}).textContent, hash: location.hash}"
        )
        raise AssertionError(f"timed out waiting for {what}; page state {state}") from exc


def text(driver: Any, element_id: str) -> str:
    """An element's text ('' when it is not there)."""
    return str(
        driver.execute_script(
            "var e=document.getElementById(arguments[0]);return e?e.textContent:''", element_id
        )
    )


def number(value: str) -> float | None:
    """The number shown in a card ('1.2k' → 1200), or None."""
    m = re.match(r"\s*(-?[\d,.]+)\s*([kM]?)", value)
    if not m:
        return None
    scale = {"": 1, "k": 1e3, "M": 1e6}[m.group(2)]
    return float(m.group(1).replace(",", "")) * scale


def test_panel_start_scale_stop_history(panel: str, browser: Any, tmp_path: Path) -> None:
    shots = tmp_path / "screenshots"
    shots.mkdir()
    saved: list[Path] = []

    def shot(name: str) -> None:
        path = shots / f"{len(saved) + 1:02d}-{name}.png"
        browser.save_screenshot(str(path))
        saved.append(path)
        print(f"screenshot: {path}")

    # -- Start: pick the demo, validate it, start it for 40 s ---------------------------------------
    browser.get(panel)
    wait_for(
        browser,
        "the demo profile in the list",
        lambda d: d.execute_script("return !!document.querySelector('#profile-select option[value=demo]')"),
    )
    Select(browser.find_element(By.ID, "profile-select")).select_by_value("demo")
    wait_for(
        browser,
        "the demo YAML",
        lambda d: "name: demo" in d.find_element(By.ID, "profile-yaml").get_property("value"),
    )
    duration = browser.find_element(By.ID, "duration")
    duration.clear()
    duration.send_keys("40s")
    browser.find_element(By.ID, "validate-btn").click()
    wait_for(browser, "the validation verdict", lambda d: "valid" in text(d, "validate-msg"))
    assert text(browser, "validate-msg").startswith("✓"), text(browser, "validate-msg")
    shot("start")
    browser.find_element(By.ID, "start-btn").click()

    # -- Live: numbers arrive over Socket.IO --------------------------------------------------------
    wait_for(
        browser,
        "the live tab",
        lambda d: d.find_element(By.ID, "tab-live").get_attribute("aria-selected") == "true",
    )
    run_id = wait_for(
        browser,
        "the run id in the URL",
        lambda d: d.execute_script("var m=/^#live\\/(.+)$/.exec(location.hash);return m&&m[1]"),
    )
    wait_for(browser, "a non-zero rps card", lambda d: (number(text(d, "card-rps")) or 0) > 0, timeout=40)
    first_rps = text(browser, "card-rps")
    wait_for(browser, "the rps card to change", lambda d: text(d, "card-rps") != first_rps, timeout=20)
    assert (number(text(browser, "card-users")) or 0) > 0
    assert text(browser, "run-status") == "running"
    assert browser.execute_script("return document.querySelectorAll('#stats-table tbody tr').length") >= 3
    assert (
        int(browser.execute_script("return +document.getElementById('live-charts').dataset.points || 0")) > 0
    )
    shot("live")

    # -- scale `browse` to 7 users and see the users column follow ----------------------------------
    box = wait_for(browser, "the scale input of browse", lambda d: d.find_elements(By.ID, "scale-browse"))[0]
    box.clear()
    box.send_keys("7")
    browser.find_element(By.ID, "scale-btn-browse").click()
    wait_for(browser, "browse at 7 users", lambda d: text(d, "group-users-browse") == "7", timeout=30)
    # the operator action reaches the charts' time axis with the next ticks (pushed, not polled)
    wait_for(browser, "the scaling marker", lambda d: "scaled by hand" in text(d, "live-legend"), timeout=10)
    browser.execute_script("document.getElementById('groups-table').scrollIntoView()")
    shot("scaled")
    browser.execute_script("window.scrollTo(0, 0)")

    # -- stop: the run ends as aborted --------------------------------------------------------------
    browser.find_element(By.ID, "stop-btn").click()
    wait_for(browser, "the aborted status", lambda d: text(d, "run-status") == "aborted", timeout=45)
    shot("stopped")

    # -- History: the run is listed; opening it draws its charts ------------------------------------
    browser.find_element(By.ID, "tab-history").click()
    row = wait_for(
        browser,
        "the run in the history table",
        lambda d: d.find_elements(By.CSS_SELECTOR, f"#history-table tbody tr[data-run='{run_id}']"),
    )[0]
    assert "aborted" in row.text
    row.click()
    wait_for(
        browser,
        "the run's charts",
        lambda d: d.execute_script(
            "var b=document.getElementById('detail-charts');return b.dataset.rendered==='1'"
            " && b.querySelectorAll('.chart-card[data-drawn] canvas').length===4"
        ),
    )
    assert int(browser.execute_script("return +document.getElementById('detail-charts').dataset.points")) >= 3
    assert browser.execute_script("return document.querySelectorAll('#detail-stats tbody tr').length") >= 3
    links = browser.execute_script(
        "return Array.from(document.querySelectorAll('#detail-downloads a')).map(a => a.getAttribute('href'))"
    )
    assert [link.split("?")[0].rsplit("/", 1)[1] for link in links] == ["html", "json", "junit", "csv"]
    browser.execute_script("document.getElementById('run-detail').scrollIntoView()")
    time.sleep(0.5)
    shot("history")

    # -- a narrow screen: nothing spills out sideways -----------------------------------------------
    browser.set_window_size(420, 1000)
    browser.execute_script("window.scrollTo(0, 0)")
    time.sleep(0.5)
    overflow = browser.execute_script("return document.documentElement.scrollWidth - window.innerWidth")
    shot("narrow")
    assert overflow <= 1, f"the page is {overflow}px wider than a 420px window"

    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, json.dumps(errors, indent=1)
    assert all(p.stat().st_size > 10_000 for p in saved)
