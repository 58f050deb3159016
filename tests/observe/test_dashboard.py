"""The web dashboard, loaded in a real headless Chromium against a running pipeline."""
from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
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


def test_dashboard_shows_stages_and_live_rates(live_run, browser):
    assert get(live_run.url + "/")[1].startswith("text/html")
    live_run.wait_flowing()
    browser.get(live_run.url + "/")

    def rates_in_the_page(driver: webdriver.Chrome) -> dict[str, float] | None:
        rows = driver.find_elements(By.CSS_SELECTOR, "#stages tbody tr")
        found = {row.get_attribute("data-node"): _rate(row.find_element(By.CSS_SELECTOR, "td.rate").text)
                 for row in rows}
        return found if len(found) == 4 and all(v > 0 for v in found.values()) else None

    rates = WebDriverWait(browser, 30, poll_frequency=0.2).until(rates_in_the_page)
    assert set(rates) == {"ticks", "clean", "enrich", "out"}
    graph = {g.get_attribute("data-node"): g for g in browser.find_elements(By.CSS_SELECTOR, "#graph g.node")}
    assert set(graph) == {"ticks", "clean", "enrich", "out"}
    assert graph["clean"].find_element(By.CSS_SELECTOR, "text.name").text == "clean"
    assert graph["clean"].find_element(By.CSS_SELECTOR, "text.rate").text.endswith("rows/s")
    assert len(browser.find_elements(By.CSS_SELECTOR, "#graph path.edge")) == 3
    lanes = {row.get_attribute("data-lane"): row.find_element(By.CSS_SELECTOR, "td.lag").text
             for row in browser.find_elements(By.CSS_SELECTOR, "#partitions tbody tr")}
    assert lanes == {"ticks[0]": "1.5k", "ticks[1]": "1.5k"}
    assert "health: ok" in browser.find_element(By.ID, "summary").text
    assert browser.title == "streamfn"
