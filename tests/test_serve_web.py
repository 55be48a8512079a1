"""The web chat page, end to end in headless Chromium (Debian's chromium + chromium-driver, no downloads)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from serve_util import RunningServer
from tiny import make_tiny_bert_dir, make_tiny_llama_dir

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
        # the vendored scripts load without the key (they are as public as the page)
        wait.until(lambda d: d.execute_script("return !!(window.marked && window.DOMPurify && window.hljs)"))
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
        # under the answer: its length and speed, from the stream's usage and timing
        stats = browser.find_element(By.CSS_SELECTOR, ".msg.assistant .stats").text
        assert re.fullmatch(r"\d+ tokens? · \d+\.\d tokens/s · \d+\.\d\d s to first token", stats), stats

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


# -- the chat page's own features --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def chat_server(tmp_path_factory, one_thread):
    model = make_tiny_llama_dir(tmp_path_factory.mktemp("web") / "tiny", context=512)
    with RunningServer(model) as srv:
        yield srv


def _fresh_page(browser, url: str):
    """The page with nothing stored from an earlier test (same origin, same browser)."""
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(url + "/")
    browser.execute_script("localStorage.clear()")
    browser.refresh()
    wait = WebDriverWait(browser, 30)
    wait.until(lambda d: d.find_element("id", "model").text == "tiny")
    return wait


def _send(browser, wait, text: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    before = len(browser.find_elements(By.CSS_SELECTOR, ".msg.assistant.done"))
    browser.find_element(By.ID, "input").send_keys(text, Keys.ENTER)
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".msg.assistant.done")) > before
               and not d.find_elements(By.CSS_SELECTOR, ".msg.streaming"))
    assert not browser.find_elements(By.CSS_SELECTOR, ".msg.error")


def _set(browser, field: str, value: str) -> None:
    browser.execute_script("const e = document.getElementById(arguments[0]); e.value = arguments[1];"
                           "e.dispatchEvent(new Event('input'));", field, value)


def _texts(browser, selector: str) -> list[str]:
    from selenium.webdriver.common.by import By

    return [e.text for e in browser.find_elements(By.CSS_SELECTOR, selector)]


def test_chats_survive_a_reload(browser, chat_server):
    from selenium.webdriver.common.by import By

    wait = _fresh_page(browser, chat_server.url)
    _set(browser, "max-tokens", "6")
    _send(browser, wait, "first question")
    browser.find_element(By.ID, "new-chat").click()
    assert not browser.find_elements(By.CSS_SELECTOR, ".msg")
    _send(browser, wait, "second question")
    answer = browser.find_element(By.CSS_SELECTOR, ".msg.assistant .content").text

    browser.refresh()
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#chats .open")) == 2)
    assert _texts(browser, "#chats .open") == ["second question", "first question"]  # newest first
    # the chat on screen before the reload is back, answer and all, and so are the settings
    assert _texts(browser, ".msg.user .content") == ["second question"]
    assert _texts(browser, ".msg.assistant .content") == [answer]
    assert browser.find_element(By.ID, "max-tokens").get_attribute("value") == "6"

    browser.find_elements(By.CSS_SELECTOR, "#chats .open")[1].click()
    assert _texts(browser, ".msg.user .content") == ["first question"]
    assert len(browser.find_elements(By.CSS_SELECTOR, ".msg.assistant.done")) == 1
    assert browser.find_element(By.CSS_SELECTOR, "#chats .current .open").text == "first question"

    # deleting a chat is kept too
    browser.find_element(By.CSS_SELECTOR, "#chats li[data-id] .delete").click()  # the newest: "second question"
    assert _texts(browser, "#chats .open") == ["first question"]
    browser.refresh()
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#chats .open"))
    assert _texts(browser, "#chats .open") == ["first question"]
    assert _texts(browser, ".msg.user .content") == ["first question"]

    # a chat started in a second tab shows up here, and this tab's next save keeps it
    first_tab = browser.current_window_handle
    browser.switch_to.new_window("tab")
    browser.get(chat_server.url + "/")
    wait.until(lambda d: d.find_element(By.ID, "model").text == "tiny")
    browser.find_element(By.ID, "new-chat").click()
    _send(browser, wait, "from another tab")
    browser.close()
    browser.switch_to.window(first_tab)
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#chats .open")) == 2)
    _send(browser, wait, "a follow-up")
    browser.refresh()
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#chats .open"))
    assert _texts(browser, "#chats .open") == ["first question", "from another tab"]
    assert _texts(browser, ".msg.user .content") == ["first question", "a follow-up"]


def test_answer_cut_at_max_tokens_says_so(browser, chat_server, tmp_path):
    from selenium.webdriver.common.by import By

    wait = _fresh_page(browser, chat_server.url)
    _set(browser, "max-tokens", "3")
    _set(browser, "temperature", "0")
    _send(browser, wait, "Tell me a long story")
    notice = browser.find_element(By.CSS_SELECTOR, ".msg.assistant .notice.truncated")
    assert notice.is_displayed() and "max tokens" in notice.text
    assert browser.find_element(By.CSS_SELECTOR, ".msg.assistant .stats").text.startswith("3 tokens · ")
    browser.save_screenshot(str(tmp_path / "truncated.png"))
    # the notice is kept with the answer
    browser.refresh()
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.assistant .notice.truncated"))


def test_seed_and_top_p_reach_the_server(browser, chat_server):
    """The controls are sent as OpenAI's fields; with a seed, sampling at temperature 1 repeats on regenerate."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    from lmforge.engine.sampling import DEFAULT_TEMPERATURE

    wait = _fresh_page(browser, chat_server.url)
    # the controls start where the server's defaults are
    assert browser.find_element(By.ID, "temperature").get_attribute("value") == f"{DEFAULT_TEMPERATURE:g}"
    assert browser.find_element(By.ID, "temperature-value").text == f"{DEFAULT_TEMPERATURE:g}"
    assert browser.find_element(By.ID, "top-p").get_attribute("value") == "1"
    # record what the page sends, then let the request through unchanged
    browser.execute_script("window.sent = []; const f = window.fetch;"
                           "window.fetch = (url, init) => { if (init && init.body) window.sent.push(JSON.parse(init.body));"
                           " return f(url, init); };")
    _set(browser, "max-tokens", "12")
    _set(browser, "temperature", "1")
    _set(browser, "top-p", "0.9")
    _set(browser, "seed", "1234")
    _send(browser, wait, "Pick some words")
    first = browser.find_element(By.CSS_SELECTOR, ".msg.assistant .content").text
    browser.find_element(By.CSS_SELECTOR, ".msg.assistant .regenerate").click()
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.assistant.done"))
    assert browser.find_element(By.CSS_SELECTOR, ".msg.assistant .content").text == first
    sent = browser.execute_script("return window.sent")
    assert len(sent) == 2
    for body in sent:
        assert body["top_p"] == 0.9 and body["seed"] == 1234 and body["temperature"] == 1
        assert body["max_tokens"] == 12 and body["stream_options"] == {"include_usage": True}
        assert body["messages"] == [{"role": "user", "content": "Pick some words"}]

    # a seed or budget that cannot be sent as typed stops the request and says why
    browser.find_element(By.ID, "input").send_keys("not sent")
    for field, bad in (("seed", "-5"), ("seed", "1.5"), ("max-tokens", "0")):
        _set(browser, field, bad)
        browser.find_element(By.ID, "input").send_keys(Keys.ENTER)
        assert field.replace("-", " ") in browser.find_element(By.ID, "status").text
        assert browser.find_element(By.ID, "input").get_attribute("value") == "not sent"
        assert len(browser.execute_script("return window.sent")) == 2
        _set(browser, field, "1234" if field == "seed" else "12")
    browser.find_element(By.ID, "input").clear()

    # without a seed none is sent (the server picks one)
    _set(browser, "seed", "")
    browser.find_element(By.CSS_SELECTOR, ".msg.assistant .regenerate").click()
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.assistant.done"))
    assert "seed" not in browser.execute_script("return window.sent")[-1]


def test_edit_regenerate_and_copy(browser, chat_server):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    wait = _fresh_page(browser, chat_server.url)
    _set(browser, "max-tokens", "5")
    _send(browser, wait, "alpha")
    _send(browser, wait, "beta")
    assert len(browser.find_elements(By.CSS_SELECTOR, ".msg")) == 4

    # editing the first question sends it again and drops what followed it
    browser.find_elements(By.CSS_SELECTOR, ".msg.user .edit")[0].click()
    box = browser.find_element(By.CSS_SELECTOR, ".msg.user .edit-box")
    assert box.get_attribute("value") == "alpha"
    box.clear()
    box.send_keys("gamma", Keys.ENTER)
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".msg.assistant.done")) == 1
               and not d.find_elements(By.CSS_SELECTOR, ".msg.streaming"))
    assert _texts(browser, ".msg.user .content") == ["gamma"]
    assert len(browser.find_elements(By.CSS_SELECTOR, ".msg")) == 2
    assert _texts(browser, "#chats .open") == ["gamma"]

    # editing an answer keeps it (no new request), marked as edited; Escape would have cancelled
    browser.find_element(By.CSS_SELECTOR, ".msg.assistant .edit").click()
    box = browser.find_element(By.CSS_SELECTOR, ".msg.assistant .edit-box")
    box.clear()
    box.send_keys("a better answer")
    browser.find_element(By.CSS_SELECTOR, ".msg.assistant .save").click()
    assert _texts(browser, ".msg.assistant .content") == ["a better answer"]
    assert "edited" in browser.find_element(By.CSS_SELECTOR, ".msg.assistant .role").text.lower()
    browser.find_element(By.CSS_SELECTOR, ".msg.assistant .edit").click()
    browser.find_element(By.CSS_SELECTOR, ".msg.assistant .edit-box").send_keys("!!!", Keys.ESCAPE)
    assert _texts(browser, ".msg.assistant .content") == ["a better answer"]

    # regenerate replaces the answer with a fresh one from the server
    browser.find_element(By.CSS_SELECTOR, ".msg.assistant .regenerate").click()
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.assistant.done")
               and not d.find_elements(By.CSS_SELECTOR, ".msg.streaming"))
    assert _texts(browser, ".msg.assistant .content") != ["a better answer"]
    assert len(browser.find_elements(By.CSS_SELECTOR, ".msg")) == 2

    # copy puts the message's text on the clipboard: paste it into the message box
    browser.find_element(By.CSS_SELECTOR, ".msg.user .copy").click()
    wait.until(lambda d: d.find_element(By.CSS_SELECTOR, ".msg.user .copy").text == "Copied")
    browser.find_element(By.ID, "input").send_keys(Keys.CONTROL, "v")
    assert browser.find_element(By.ID, "input").get_attribute("value") == "gamma"


HOSTILE = """| model | size |
|---|---|
| tiny | 1 KB |

```python
def f(x):
    return x + 1
```

<script>window.__xss = 1</script>
<img src="x" onerror="window.__xss = 2">
Inline <b onmouseover="window.__xss = 3">bold?</b> and [a link](javascript:window.__xss=4).
"""


def test_markdown_renders_tables_and_code_and_never_runs_model_html(browser, chat_server, tmp_path):
    from selenium.webdriver.common.by import By

    wait = _fresh_page(browser, chat_server.url)
    wait.until(lambda d: d.execute_script("return !!window.hljs"))
    html = browser.execute_script("return renderMarkdown(arguments[0])", HOSTILE)
    assert "<table>" in html and "<th>model</th>" in html and "<td>1 KB</td>" in html
    assert '<span class="hljs-keyword">def</span>' in html
    assert "&lt;script&gt;" in html and "<script" not in html and "<img" not in html and "<b " not in html

    # the same text as a stored answer, shown through the page's own path after a reload
    chat = {"id": "c1", "title": "hostile", "system": "", "updated": 1,
            "messages": [{"role": "user", "content": "show me"},
                         {"role": "assistant", "content": HOSTILE, "finish": "stop",
                          "stats": {"tokens": 60, "tps": 12.5, "ttft": 40}}]}
    browser.execute_script("localStorage.setItem('lmforge-chats', arguments[0]);"
                           "localStorage.setItem('lmforge-current-chat', 'c1')", json.dumps([chat]))
    browser.refresh()
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.assistant .content pre code .hljs-keyword"))
    content = browser.find_element(By.CSS_SELECTOR, ".msg.assistant .content")
    cells = [c.text for c in content.find_elements(By.CSS_SELECTOR, "table th, table td")]
    assert cells == ["model", "size", "tiny", "1 KB"]
    assert "<script>window.__xss = 1</script>" in content.text  # shown as text
    assert not content.find_elements(By.CSS_SELECTOR, "script, img, [onerror], [onmouseover]")
    assert not content.find_elements(By.CSS_SELECTOR, "a[href^='javascript']")
    for e in content.find_elements(By.CSS_SELECTOR, "a, b"):
        e.click()
    assert browser.execute_script("return window.__xss") is None
    assert browser.find_element(By.CSS_SELECTOR, ".msg.assistant .stats").text == \
        "60 tokens · 12.5 tokens/s · 0.04 s to first token"
    browser.save_screenshot(str(tmp_path / "markdown.png"))


def test_encoder_server_shows_an_embeddings_page(browser, tmp_path, one_thread):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    path = make_tiny_bert_dir(tmp_path / "bert", ["hello", "world", "the", "cat", "sat", "dog", "ran"])
    texts = ["hello world", "the cat sat", "the dog ran"]
    with RunningServer(path) as srv:
        browser.get(srv.url + "/")
        wait = WebDriverWait(browser, 30)
        wait.until(lambda d: d.find_element(By.ID, "embeddings").is_displayed())
        for chat_part in ("composer", "log", "sidebar", "settings"):
            assert not browser.find_element(By.ID, chat_part).is_displayed(), chat_part
        browser.find_element(By.ID, "embed-input").send_keys("\n".join(texts), Keys.CONTROL, Keys.ENTER)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#embed-result table.sim"))
        assert browser.find_element(By.ID, "embed-summary").text.startswith("3 vectors of 32 dimensions")
        shown = np.array([[float(c.text) for c in row.find_elements(By.CSS_SELECTOR, "td")]
                          for row in browser.find_elements(By.CSS_SELECTOR, "#embed-result table.sim tbody tr")])
        vecs = srv.lm.embed(texts)
        vecs = vecs / np.linalg.norm(vecs, axis=-1, keepdims=True)
        # cosines lie in [-1, 1]; the page shows three decimals
        np.testing.assert_allclose(shown, vecs @ vecs.T, rtol=0, atol=1.5e-3)
        browser.save_screenshot(str(tmp_path / "embeddings.png"))
