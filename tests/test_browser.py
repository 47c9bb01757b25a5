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


def test_refine_continues_a_thread_under_the_email_draft(browser, demo_url, tmp_path):
    run_task(browser, demo_url, "task-email-generate")
    wait = WebDriverWait(browser, 30)
    assert browser.find_element(By.ID, "refine").is_displayed()
    body = browser.find_element(By.TAG_NAME, "body")
    for n, message in enumerate(("make the casual one shorter", "now in Portuguese"), start=1):
        browser.find_element(By.ID, "refine-message").send_keys(message)
        browser.find_element(By.ID, "refine-send").click()
        wait.until(lambda b, n=n: body.get_attribute("data-refine-state") in {"done", "failed"}
                   and len(b.find_elements(By.CSS_SELECTOR, "#turns > li")) == n)
        assert body.get_attribute("data-refine-state") == "done"
    turns = browser.find_elements(By.CSS_SELECTOR, "#turns > li")
    assert [t.find_element(By.CSS_SELECTOR, ".message").text for t in turns] == [
        "1. make the casual one shorter", "2. now in Portuguese"]
    assert all(len(t.find_elements(By.CSS_SELECTOR, ".variations .card")) == 3 for t in turns)
    browser.save_screenshot(str(tmp_path / "refine.png"))
    # Another task without threads offers no Refine box.
    run_task(browser, demo_url, "task-lead-qualify")
    assert not browser.find_element(By.ID, "refine").is_displayed()


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


def run_batch(browser, url, *, cancel=False):
    """Click "Qualify all leads" (and Cancel at once, with `cancel`); wait, bounded, for the batch's `done`."""
    if browser.current_url != url:
        browser.get(url)
    wait = WebDriverWait(browser, 30)
    body = browser.find_element(By.TAG_NAME, "body")
    wait.until(lambda b: body.get_attribute("data-batch-state") in {"idle", "completed", "cancelled", "failed"})
    browser.find_element(By.ID, "batch-start").click()
    if cancel:
        wait.until(lambda b: body.get_attribute("data-batch-state") in {"running", "completed", "failed"})
        browser.find_element(By.ID, "batch-cancel").click()
    wait.until(lambda b: body.get_attribute("data-batch-state") in {"completed", "cancelled", "failed"})
    counts = {k: int(browser.find_element(By.ID, f"batch-{k}").text)
              for k in ("done", "total", "succeeded", "cached", "failed", "cancelled", "running")}
    return body.get_attribute("data-batch-state"), counts


def test_qualify_all_leads_runs_one_batch_and_shows_every_lead_scored(browser, demo_url, tmp_path):
    browser.get(demo_url)
    leads = [o.text for o in Select(WebDriverWait(browser, 30).until(
        lambda b: b.find_element(By.ID, "lead") if b.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "ready"
        else None)).options]
    assert browser.find_element(By.ID, "batch-start").text == "Qualify all leads"
    state, counts = run_batch(browser, demo_url)
    # Every lead of the session is the demo user's own: all are qualified, none fails.
    assert state == "completed"
    assert counts["total"] == counts["done"] == counts["succeeded"] == len(leads) >= 2
    assert counts["failed"] == counts["cancelled"] == counts["running"] == 0 and counts["cached"] <= len(leads)
    assert browser.find_element(By.ID, "batch-bar").get_attribute("value") == str(len(leads))
    rows = browser.find_elements(By.CSS_SELECTOR, "#batch-items li")
    assert [r.find_element(By.CSS_SELECTOR, ".name").text for r in rows] == leads  # names, not ids
    for row in rows:
        assert row.get_attribute("data-status") == "succeeded"
        score = int(row.find_element(By.CSS_SELECTOR, ".score").text)
        badge = row.find_element(By.CSS_SELECTOR, ".badge").text
        assert badge == ("Hot" if score >= 70 else "Warm" if score >= 40 else "Cold")
    assert "done: completed" in browser.find_element(By.ID, "batch-status").text
    assert not browser.find_element(By.ID, "batch-cancel").is_enabled()
    assert browser.find_element(By.TAG_NAME, "body").get_attribute("data-state") in {"ready", "succeeded", "failed"}
    browser.save_screenshot(str(tmp_path / "batch.png"))

    # The same batch again: every answer is in the cache now, so every item is a free hit.
    state, counts = run_batch(browser, demo_url)
    assert state == "completed" and counts["succeeded"] == counts["cached"] == len(leads)
    assert all("cached" in r.find_element(By.CSS_SELECTOR, ".state").text
               for r in browser.find_elements(By.CSS_SELECTOR, "#batch-items li"))


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
        state, _ = run_batch(browser, demo_url)
        assert state == "completed" and browser.find_element(By.ID, "batch").is_displayed() and fits()
    finally:
        browser.set_window_size(1400, 1000)
