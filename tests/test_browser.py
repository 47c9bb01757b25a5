"""The demo page in a real browser: Debian's chromium, driven by Selenium through chromedriver."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys

import pytest

from tests.helpers import ROOT, free_port

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")

if not (CHROMIUM and CHROMEDRIVER):
    if os.environ.get("CI"):  # .ci/run installs them: missing there is a failure, not a skip
        raise RuntimeError("chromium and chromium-driver are not installed")
    pytest.skip("Debian's chromium and chromium-driver are not installed", allow_module_level=True)

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402


@pytest.fixture(scope="module")
def demo_url():
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    proc = subprocess.Popen([sys.executable, "-m", "adapter.cli", "demo", "--port", str(port)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for line in proc.stdout:
        if line.startswith("Press Ctrl+C"):
            break
    yield f"http://127.0.0.1:{port}/demo"
    proc.stdout.close()
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1400,1000", f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def run_task(browser, url, button, *, fault="", drop=False, expect="succeeded"):
    if browser.current_url != url:
        browser.get(url)
    wait = WebDriverWait(browser, 30)
    wait.until(lambda b: b.find_element(By.TAG_NAME, "body").get_attribute("data-state") in {"ready", "succeeded", "failed"})
    Select(browser.find_element(By.ID, "fault")).select_by_value(fault)
    checkbox = browser.find_element(By.ID, "drop")
    if checkbox.is_selected() != drop:
        checkbox.click()
    browser.find_element(By.ID, button).click()
    wait.until(lambda b: b.find_element(By.TAG_NAME, "body").get_attribute("data-state") in {"succeeded", "failed"})
    assert browser.find_element(By.TAG_NAME, "body").get_attribute("data-state") == expect
    return browser.execute_script("return window.demoTimeline")


def elapsed(timeline, what):
    start = next(m["at"] for m in timeline if m["what"] == "click")
    return next(m["at"] for m in timeline if m["what"] == what) - start


def test_qualify_shows_deltas_then_score_badge_and_bant(browser, demo_url, tmp_path):
    timeline = run_task(browser, demo_url, "task-lead-qualify")
    kinds = [m["what"] for m in timeline]
    assert "delta" in kinds and kinds.index("delta") < kinds.index("result")
    score = int(browser.find_element(By.CSS_SELECTOR, ".lead .score").text)
    badge = browser.find_element(By.CSS_SELECTOR, ".lead .badge").text
    assert badge == ("Hot" if score >= 70 else "Warm" if score >= 40 else "Cold")
    assert len(browser.find_elements(By.CSS_SELECTOR, "table.bant tr")) == 4
    assert browser.find_element(By.ID, "deltas").text.startswith("{")
    browser.save_screenshot(str(tmp_path / "qualify.png"))
    print(f"lead.qualify: click to result {elapsed(timeline, 'result'):.0f} ms")


def test_email_shows_three_variations_side_by_side(browser, demo_url, tmp_path):
    timeline = run_task(browser, demo_url, "task-email-generate")
    cards = browser.find_elements(By.CSS_SELECTOR, ".variations .card")
    assert [c.get_attribute("data-type") for c in cards] == ["formal", "casual", "direct"]
    assert len({c.location["y"] for c in cards}) == 1  # side by side
    assert all(c.find_element(By.CSS_SELECTOR, ".subject").text for c in cards)
    browser.save_screenshot(str(tmp_path / "email.png"))
    print(f"email.generate: click to result {elapsed(timeline, 'result'):.0f} ms")


def test_predict_shows_gauges_and_lists_and_survives_a_dropped_connection(browser, demo_url, tmp_path):
    timeline = run_task(browser, demo_url, "task-deal-predict", drop=True)
    kinds = [m["what"] for m in timeline]
    assert "reconnected" in kinds and kinds.index("reconnected") < kinds.index("result")
    gauges = browser.find_elements(By.CSS_SELECTOR, ".deal .gauge")
    assert [g.get_attribute("data-label") for g in gauges] == ["Win probability", "Health"]
    assert "reconnect" in browser.find_element(By.ID, "status").text
    assert browser.find_elements(By.CSS_SELECTOR, ".deal ul li")
    browser.save_screenshot(str(tmp_path / "predict.png"))
    print(f"deal.predict (with a dropped connection): click to result {elapsed(timeline, 'result'):.0f} ms")


def test_injected_failure_shows_the_problem(browser, demo_url, tmp_path):
    run_task(browser, demo_url, "task-lead-qualify", fault="wrong_shape", expect="failed")
    error = browser.find_element(By.ID, "error")
    assert error.is_displayed()
    assert error.find_element(By.TAG_NAME, "strong").text == "The agent answered invalid output"
    assert "invalid output 2 time(s)" in error.find_element(By.CSS_SELECTOR, ".detail").text
    assert browser.find_element(By.ID, "result").text == ""  # nothing invalid is shown as a result
    browser.save_screenshot(str(tmp_path / "failure.png"))


def test_page_names_the_record_hides_an_empty_output_box_fits_a_phone_and_has_an_icon(browser, demo_url):
    browser.set_window_size(420, 900)
    try:
        browser.get(demo_url)
        WebDriverWait(browser, 30).until(lambda b: b.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "ready")
        assert not browser.find_element(By.ID, "output").is_displayed()  # no empty dark box before a run
        icon = browser.execute_script("return document.querySelector('link[rel~=icon]').href")
        assert browser.execute_script("return fetch(arguments[0]).then(r => r.status)", icon) == 200

        def fits() -> bool:
            return browser.execute_script("return document.documentElement.scrollWidth <= document.documentElement.clientWidth")

        assert fits()
        lead = Select(browser.find_element(By.ID, "lead")).first_selected_option
        run_task(browser, demo_url, "task-lead-qualify", fault="start_fails", expect="failed")
        title = browser.find_element(By.ID, "run-title").text
        assert lead.text in title and lead.get_attribute("value") not in title
        assert not browser.find_element(By.ID, "output").is_displayed()  # a failed start streamed nothing
        run_task(browser, demo_url, "task-lead-qualify")
        assert browser.find_element(By.ID, "output").is_displayed() and fits()
        run_task(browser, demo_url, "task-email-generate")
        assert fits()
    finally:
        browser.set_window_size(1400, 1000)
