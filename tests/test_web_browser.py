"""One real-browser smoke test of the web pages: headless Chromium (Debian's ``chromium``
and ``chromium-driver``, driven by Selenium) signs in through the form, opens the review
queue, approves a job by clicking, and signs out, against a real server on loopback,
with the pages' CSP in force (a violation would show in the browser's log).

Skips on a laptop without the browser; fails under ``CI=true`` (scripts/test-setup.sh
installs it)."""

from __future__ import annotations

import shutil
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import Api
from test_web_support import pending_job

CHROMIUM = "/usr/bin/chromium"
DRIVER = "/usr/bin/chromedriver"


@pytest.fixture
def server(ready: Api) -> Iterator[str]:
    import uvicorn
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(ready.app, log_level="warning", lifespan="off")
    instance = uvicorn.Server(config)
    thread = threading.Thread(target=instance.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not instance.started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert instance.started, "the server did not start"
    yield f"http://127.0.0.1:{port}"
    instance.should_exit = True
    thread.join(timeout=10)
    sock.close()


@pytest.fixture
def browser(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        missing_reason = "selenium (pip install -e '.[test]')"
    else:
        missing_reason = ""
    if not missing_reason and (shutil.which("chromium") is None
                               or shutil.which("chromedriver") is None):
        missing_reason = "chromium and chromium-driver (apt-get install chromium chromium-driver)"
    if missing_reason:
        from conftest import missing_part
        missing_part(missing_reason)
    monkeypatch.setenv("SE_OFFLINE", "true")  # never let Selenium fetch a driver
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--no-first-run", "--disable-extensions", "--window-size=1280,1000"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    driver.set_page_load_timeout(20)
    yield driver
    driver.quit()


def test_sign_in_review_approve_sign_out_in_a_browser(ready: Api, server: str,
                                                      browser: Any) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    job_id = pending_job(ready)
    driver = browser
    wait = WebDriverWait(driver, 15)
    driver.get(f"{server}/ui/reviews")
    wait.until(lambda d: "/ui/login" in d.current_url)
    driver.find_element(By.ID, "token").send_keys(ready.home.tokens["reviewer"])
    driver.find_element(By.CSS_SELECTOR, "form.card button").click()
    wait.until(lambda d: d.current_url.endswith("/ui/reviews"))
    driver.find_element(By.LINK_TEXT, job_id[:12]).click()
    wait.until(lambda d: d.current_url.endswith(f"/ui/reviews/{job_id}"))
    assert driver.find_element(By.CSS_SELECTOR, "svg.states")
    driver.find_element(By.CSS_SELECTOR, "button.approve").click()
    wait.until(lambda d: "done=approved" in d.current_url)
    flash = driver.find_element(By.CSS_SELECTOR, ".flash").text
    assert "released and signed" in flash
    assert ready.as_("analyst").get(f"/v1/jobs/{job_id}").json()["status"] == "released"
    driver.find_element(By.CSS_SELECTOR, "form.signout button").click()
    wait.until(lambda d: d.current_url.endswith("/ui/login"))
    driver.get(f"{server}/ui/reviews")
    wait.until(lambda d: "/ui/login" in d.current_url)
    problems = [entry["message"] for entry in driver.get_log("browser")
                if entry["level"] == "SEVERE" or "Content Security Policy" in entry["message"]]
    assert problems == []
