"""A headless Chromium (Debian's, via Selenium) in the Prefect and MLflow UIs.

- MLflow: it searches the registry by tag, opens the concept's version page (tags, source
  run), and follows the source run link to the concept's attention overlay, which must render.
- serve.sh on non-default ports: the Prefect UI shows the served flow run (its api_url follows
  the port), and from the MLflow Models page one click on a concept's name shows its picture.

Screenshots go to the test's temporary folder (`MCPL_SCREENSHOTS=DIR` keeps them there).
CI installs chromium + chromium-driver (scripts/ci_services.sh); locally the tests skip
with the reason when they are missing.
"""

from __future__ import annotations

import os
import shutil
import tempfile
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
    profile = tempfile.mkdtemp(prefix="mcpl-chromium-")  # a fresh profile: no state from an earlier run
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--no-first-run", "--disable-extensions", "--window-size=1400,1000", f"--user-data-dir={profile}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def screenshot(driver, name: str, tmp_path: Path) -> Path:
    folder = Path(os.environ.get("MCPL_SCREENSHOTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(folder / f"{name}.png"))
    return folder / f"{name}.png"


def wait_for(driver, condition, timeout: float = 60):
    """Poll `condition` until it is truthy. The UIs re-render while they load (more so on a busy machine):
    an element found a moment ago may be gone, which is "not yet", not a failure."""
    from selenium.common.exceptions import StaleElementReferenceException

    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            value = condition(driver)
        except StaleElementReferenceException:
            value = None
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


def rendered_images(driver, part: str) -> list[str]:
    """src of every <img> whose src contains `part` and that the browser decoded (naturalWidth > 0)."""
    return [img.get_attribute("src") for img in driver.find_elements("tag name", "img")
            if part in (img.get_attribute("src") or "")
            and driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth", img) > 0]


def test_prefect_ui_on_a_non_default_port_shows_the_flow_runs(browser, serve_sh, served_run, tmp_path):
    assert serve_sh.prefect_port != 4200 and served_run["flow_run"]
    browser.get(f"{serve_sh.prefect_ui}/runs")
    try:
        wait_for(browser, lambda d: served_run["flow_run"] in body(d), timeout=90)
    finally:
        screenshot(browser, "prefect_runs", tmp_path)
    text = body(browser)
    assert "Can't connect" not in text and ":4200" not in text
    assert "Completed" in text
    next(a for a in browser.find_elements("tag name", "a") if a.text == served_run["flow_run"]).click()
    try:  # the flow run's page: its logs carry each job's progress lines and the batch's outcome
        wait_for(browser, lambda d: "step 4/4" in body(d) and "2 job(s): 2 trained" in body(d), timeout=90)
    finally:
        screenshot(browser, "prefect_flow_run", tmp_path)


def test_models_page_to_the_concepts_picture_in_one_click(browser, serve_sh, served_run, tmp_path):
    name = served_run["concepts"][0]
    browser.get(f"{serve_sh.mlflow_uri}/#/models")
    wait_for(browser, lambda d: any(a.text == name for a in d.find_elements("tag name", "a")), timeout=90)
    for close in browser.find_elements("css selector", "button[aria-label='Close']"):  # MLflow's one-time promo
        try:
            close.click()
        except Exception:  # noqa: BLE001 - not every close button is visible
            pass
    screenshot(browser, "mlflow_models", tmp_path)
    def click_concept(d) -> bool:  # the one click (on the link as the page shows it now)
        link = next((a for a in d.find_elements("tag name", "a") if a.text == name), None)
        if link is None:
            return False
        link.click()
        return True

    wait_for(browser, click_concept, timeout=60)
    concept = name.rsplit(".", 1)[1]

    def both_pictures(d) -> list[str]:
        shown = rendered_images(d, f"get-artifact?path=concepts/{concept}/")
        return shown if {"overlay.png", "sample.png"} <= {src.split("&")[0].rsplit("/", 1)[1] for src in shown} \
            else []

    try:
        wait_for(browser, both_pictures, timeout=90)  # the concept's attention overlay and its sample
    finally:
        screenshot(browser, "mlflow_model_page", tmp_path)
    assert browser.current_url.endswith(f"/#/models/{name}")
