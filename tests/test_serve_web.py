"""The web chat page, end to end in headless Chromium (Debian's chromium + chromium-driver, no downloads)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from serve_util import RunningServer
from tiny import make_tiny_llama_dir

CHROMIUM = Path("/usr/bin/chromium")
DRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"

pytestmark = pytest.mark.skipif(not CHROMIUM.exists() or not Path(DRIVER).exists(),
                                reason="needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1100,800"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(options=opts, service=Service(DRIVER))
    yield driver
    driver.quit()


def test_chat_page_streams_an_answer(tmp_path, browser, one_thread):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    model = make_tiny_llama_dir(tmp_path / "tiny", context=512)
    with RunningServer(model, api_keys=["sk-web"]) as srv:
        browser.get(srv.url + "/")
        wait = WebDriverWait(browser, 30)
        # without the key the page says so; with it the model's name appears
        wait.until(lambda d: "API key" in d.find_element(By.ID, "model").text)
        browser.find_element(By.ID, "api-key").send_keys("sk-web", Keys.TAB)
        wait.until(lambda d: d.find_element(By.ID, "model").text == "tiny")

        browser.find_element(By.ID, "system").send_keys("You are brief.")
        browser.find_element(By.ID, "max-tokens").send_keys("40")
        browser.execute_script("document.getElementById('temperature').value = '0';"
                               "document.getElementById('temperature').dispatchEvent(new Event('input'));")
        box = browser.find_element(By.ID, "input")
        box.send_keys("Hello there", Keys.ENTER)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.assistant.done"))
        answer = browser.find_element(By.CSS_SELECTOR, ".msg.assistant .content").text
        assert answer.strip()
        assert browser.find_element(By.CSS_SELECTOR, ".msg.user .content").text == "Hello there"
        assert not browser.find_elements(By.CSS_SELECTOR, ".msg.error"), answer

        # a second turn sends the whole conversation; afterwards the stop button is off again
        box.send_keys("And again", Keys.ENTER)
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".msg.assistant.done")) == 2)
        assert len(browser.find_elements(By.CSS_SELECTOR, ".msg")) == 4
        assert browser.find_element(By.ID, "stop").get_attribute("disabled") == "true"
        assert not browser.find_elements(By.CSS_SELECTOR, ".msg.error")

        # markdown: code blocks and emphasis render as HTML, and text is escaped
        html = browser.execute_script("return renderMarkdown('**b** `x<y`\\n```py\\nprint(1)\\n```')")
        assert "<strong>b</strong>" in html and "<code>x&lt;y</code>" in html and "<pre><code" in html

        shot = tmp_path / "chat.png"
        assert browser.save_screenshot(str(shot))
        assert shot.stat().st_size > 5000
        # streamed: the server saw a streaming request per turn (SSE), visible in its metrics
        assert srv.app.state.server.metrics.ttft.count >= 2
