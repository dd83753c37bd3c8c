"""The review page in a real headless browser (Debian's chromium driven by Selenium): sign in with
the key, filter, mark a false alarm fine, apply, and see the next identical request pass.

Skipped unless Selenium, chromium and chromedriver are installed
(``apt-get install chromium chromium-driver``; ``pip install selenium``). With
``MLPM_GUARD_SCREENSHOTS=DIR`` the pages are also saved as PNG files there (the docs' screenshots).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

webdriver = pytest.importorskip("selenium.webdriver")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from selenium.webdriver.common.by import By  # noqa: E402
from server_helpers import serving  # noqa: E402
from test_review import KEY, check, look_alike, start, tiny_prototypes  # noqa: E402,F401

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="needs chromium and chromedriver")


@pytest.fixture()
def browser():
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,1400"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    driver.set_page_load_timeout(120)
    yield driver
    driver.quit()


def text_of(driver, element_id: str, expected: str) -> str:
    """The element's text once it holds ``expected`` (a form's next page may still be loading)."""
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    def ready(d):
        try:
            text = d.find_element(By.ID, element_id).text
        except (NoSuchElementException, StaleElementReferenceException):
            return False
        return text if expected in text else False

    return WebDriverWait(driver, 60, ignored_exceptions=(StaleElementReferenceException,)).until(ready)


def shot(driver, name: str) -> None:
    folder = os.environ.get("MLPM_GUARD_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(Path(folder) / f"{name}.png"))


def test_sign_in_filter_mark_fine_apply_and_pass(tmp_path, tiny_backbone, tiny_prototypes, look_alike, browser):
    guard, store, app = start(tmp_path, tiny_backbone, tiny_prototypes)
    with serving(app) as url:
        first = check(url, look_alike)
        check(url, "What is the capital of France?")
        assert first["route"] == "refuse"
        guard.decision_log.flush()

        browser.get(f"{url}/review")
        assert browser.current_url.endswith("/review/login")
        browser.find_element(By.ID, "key").send_keys(KEY)
        shot(browser, "review-login")
        browser.find_element(By.ID, "login").click()
        assert text_of(browser, "version", "v0001") == "v0001"
        assert browser.find_element(By.ID, "histogram").is_displayed()

        filter_form = browser.find_element(By.ID, "filter")
        filter_form.find_element(By.NAME, "route").send_keys("refuse")
        filter_form.submit()
        table = text_of(browser, "decisions", look_alike)
        assert look_alike in table and "What is the capital of France?" not in table
        shot(browser, "review-filtered")

        row = guard.decision_log.decisions()[-1]
        assert row.text == look_alike
        browser.find_element(By.ID, f"fine-{row.id}").click()
        text_of(browser, "note", "marked fine")
        assert look_alike in browser.find_element(By.ID, "corrections").text

        browser.find_element(By.ID, "preview").click()
        text_of(browser, "cost", "held-back harmful probes")
        shot(browser, "review-cost")
        browser.find_element(By.ID, "apply").click()
        text_of(browser, "note", "now serving v0002")
        assert browser.find_element(By.ID, "version").text == "v0002"
        shot(browser, "review-applied")

        again = check(url, look_alike)
        assert again["route"] == "pass" and again["p_unsafe"] < first["p_unsafe"]
