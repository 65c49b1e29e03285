"""A headless Chromium (Debian's, via Selenium) finds a learned concept in the MLflow UI.

It searches the registry by tag, opens the concept's version page (tags, source run), and
follows the source run link to the concept's attention overlay, which must render.
CI installs chromium + chromium-driver (scripts/ci_services.sh); locally the test skips
with the reason when they are missing.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
from helpers.servers import jobs_for, write_dataset

pytest_plugins = ("helpers.server_fixtures",)

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
DRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
NAME = "web.images-k.kite"

pytestmark = pytest.mark.skipif(not (Path(CHROMIUM).exists() and Path(DRIVER).exists()),
                                reason="needs Debian's chromium and chromium-driver "
                                       "(apt-get install -y chromium chromium-driver)")


@pytest.fixture(scope="module")
def published_kite(tmp_path_factory, tiny_model, mlflow_server):
    """One job tracked on the test MLflow server and published to its registry."""
    from mcpl.config import RunOptions
    from mcpl.job.cards import concept_cards
    from mcpl.pipeline.registry.publish import publish
    from mcpl.pipeline.runner import run_one
    from mcpl.pipeline.tracking.observer import MlflowObserver
    from mcpl.pipeline.tracking.tracker import Tracker

    tmp = tmp_path_factory.mktemp("web")
    root = write_dataset(tmp / "web", [{"image": "k.png", "colours": ("blue", "yellow"),
                                        "sentence": "a photo of a <kite|object> and a <sky|thing>"}])
    job = jobs_for(root, tiny_model)[0]
    tracker = Tracker(mlflow_server.uri, tmp / "spool", "browser")
    outcome = run_one(job, tmp / "out", RunOptions(samples=1, sample_steps=2, progress=False),
                      [MlflowObserver(tracker)]).to_dict()
    publish(concept_cards(tmp / "out" / outcome["out_dir"]), mlflow_server.uri, "browser",
            {job.job_id: outcome["run_id"]}, snapshot=False)
    return outcome


@pytest.fixture(scope="module")
def browser():
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-extensions", "--window-size=1400,1000"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    yield driver
    driver.quit()


def wait_for(driver, condition, timeout: float = 60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition(driver)
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out on {driver.current_url}: {driver.find_element('tag name', 'body').text[:2000]}")


def body(driver) -> str:
    return driver.find_element("tag name", "body").text


def test_find_concept_by_tag_and_see_its_overlay(browser, mlflow_server, published_kite):
    from urllib.parse import quote

    base = mlflow_server.uri
    browser.get(f"{base}/#/models?searchInput={quote(chr(39).join(['tags.concept = ', 'kite', '']))}")
    wait_for(browser, lambda d: NAME in body(d))
    assert "web.images-k.sky" not in body(browser)  # the tag filter, not just a list

    browser.get(f"{base}/#/models/{NAME}/versions/1")
    wait_for(browser, lambda d: "Source Run" in body(d) and "<kite>" in body(d))
    text = body(browser)
    assert "sha256" in text and "source_image" in text and "images/k.png" in text
    link = wait_for(browser, lambda d: next((a.get_attribute("href") for a in d.find_elements("tag name", "a")
                                              if "/artifacts/concepts/kite" in (a.get_attribute("href") or "")),
                                             None))
    assert published_kite["run_id"] in link

    browser.get(link.rstrip("/") + "/overlay.png")

    def overlay_shown(d):
        images = d.find_elements("tag name", "img")
        return any((img.get_attribute("src") or "").startswith("blob:")
                   and d.execute_script("return arguments[0].naturalWidth", img) > 0 for img in images)

    wait_for(browser, overlay_shown)
    assert "concepts/kite/overlay.png" in body(browser)
