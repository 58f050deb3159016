"""The web dashboard, loaded in a real headless Chromium against a running pipeline."""
from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.support.ui import WebDriverWait

from tests.observe.conftest import get

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"

pytestmark = pytest.mark.integration


@pytest.fixture
def browser(tmp_path, monkeypatch) -> Iterator[webdriver.Chrome]:
    """Debian's chromium, headless, driven by Debian's chromedriver (nothing is downloaded)."""
    assert os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER), (
        "the dashboard test needs Debian's chromium and chromium-driver (.ci/apt-packages.txt)")
    monkeypatch.setenv("SE_OFFLINE", "true")  # Selenium Manager must not try to fetch a driver
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--no-first-run",
                 "--disable-sync", f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def _rate(text: str) -> float:
    scale = {"k": 1e3, "M": 1e6, "G": 1e9}.get(text[-1:], 1.0)
    number = text[:-1] if text[-1:] in "kMG" else text
    try:
        return float(number) * scale
    except ValueError:
        return 0.0


# One read of the page per call: the page redraws every second, so elements fetched one by
# one could go stale between two calls.
_SNAPSHOT_JS = """
const text = (root, sel) => { const e = root.querySelector(sel); return e ? e.textContent : null; };
return {
  stages: [...document.querySelectorAll('#stages tbody tr')].map(
      r => [r.dataset.node, text(r, 'td.rate')]),
  graph: [...document.querySelectorAll('#graph g.node')].map(
      g => [g.dataset.node, text(g, 'text.name'), text(g, 'text.rate')]),
  edges: document.querySelectorAll('#graph path.edge').length,
  lanes: [...document.querySelectorAll('#partitions tbody tr')].map(r => [r.dataset.lane, text(r, 'td.lag')]),
  summary: text(document, '#summary'),
};
"""


def test_dashboard_shows_stages_and_live_rates(live_run, browser):
    assert get(live_run.url + "/")[1].startswith("text/html")
    live_run.wait_flowing()
    browser.get(live_run.url + "/")

    def flowing(driver: webdriver.Chrome) -> dict | None:
        page = driver.execute_script(_SNAPSHOT_JS)
        rates = {name: _rate(rate or "") for name, rate in page["stages"]}
        return page if len(rates) == 4 and all(v > 0 for v in rates.values()) else None

    page = WebDriverWait(browser, 30, poll_frequency=0.2).until(flowing)
    assert [name for name, _ in page["stages"]] == ["ticks", "clean", "enrich", "out"]
    graph = {node: (name, rate) for node, name, rate in page["graph"]}
    assert set(graph) == {"ticks", "clean", "enrich", "out"}
    assert graph["clean"][0] == "clean" and graph["clean"][1].endswith("rows/s")
    assert page["edges"] == 3
    assert dict(page["lanes"]) == {"ticks[0]": "1.5k", "ticks[1]": "1.5k"}
    assert "health: ok" in page["summary"]
    assert browser.title == "streamfn"
