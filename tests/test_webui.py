"""The Studio's Chat and Compare tabs in a real headless Chromium (Debian's chromium +
chromium-driver, Selenium); the whole train-and-chat flow is tests/test_studio_browser.py.

The page must load, a chat message must get a reply that arrives in several steps (streamed),
and the compare tab must answer with the base and the adapter side by side. Screenshots are kept
in test-artifacts/ (git-ignored) for a person to look at.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import make_adapter

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")

# Records every length the last bot message goes through, so streaming is seen without polling.
OBSERVE = """
window.__lens = [];
new MutationObserver(() => {
  const bots = document.querySelectorAll('#chatbot [data-testid="bot"]');
  if (bots.length) window.__lens.push(bots[bots.length - 1].textContent.length);
}).observe(document.querySelector('#chatbot'),
           {subtree: true, childList: true, characterData: true});
"""


def test_cli_does_not_import_gradio():
    code = "import sys, loraforge.cli, loraforge.serve.run; assert 'gradio' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.fixture(scope="module")
def ui_url(tiny_model_dir, tmp_path_factory):
    from loraforge.infer.engine import Engine

    adapter = make_adapter(tiny_model_dir, tmp_path_factory.mktemp("runs") / "grace", seed=1)
    engine = Engine(str(tiny_model_dir), {"grace": str(adapter)}, dtype="float32")
    yield from _studio(engine, tmp_path_factory.mktemp("studio-home"), default_chat="grace")


def _studio(engine, home: Path, **kw):
    """The studio over ``engine`` on a free port: yields its URL, closes both after."""
    from loraforge.webui.app import CSS, build_studio
    from loraforge.webui.jobs import JobStore

    demo = build_studio(engine, JobStore(home), home / "data", **kw)
    demo.queue(default_concurrency_limit=4)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo.launch(
        server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, css=CSS, quiet=True
    )
    yield f"http://127.0.0.1:{port}/"
    demo.close()
    engine.close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if not (CHROMIUM and DRIVER):
        reason = "chromium / chromedriver not installed (apt-get install chromium chromium-driver)"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}: .ci/run should have installed them")
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}",
        "--window-size=1280,1000",
    ):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    yield driver
    driver.quit()


def wait_for(fn, timeout: float = 90.0, what: str = "condition"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = fn()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def open_tab(browser, name: str) -> None:
    from selenium.webdriver.common.by import By

    wait_for(
        lambda: [
            b for b in browser.find_elements(By.CSS_SELECTOR, "button[role=tab]") if b.text == name
        ],
        what=f"the {name} tab",
    )[0].click()


def test_chat_streams_a_reply(ui_url, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    browser.get(ui_url)
    open_tab(browser, "Chat")
    box = wait_for(
        lambda: browser.find_elements(By.CSS_SELECTOR, "#chat-input textarea"), what="chat input"
    )[0]
    picker = browser.find_element(By.CSS_SELECTOR, "#model-picker input")
    assert picker.get_attribute("value") == "grace"
    browser.execute_script(OBSERVE)
    box.send_keys("Hello there, who are you?", Keys.ENTER)

    def settled():  # the reply stopped growing for a second
        lens = browser.execute_script("return window.__lens")
        if not lens:
            return False
        time.sleep(1.0)
        return lens == browser.execute_script("return window.__lens")

    wait_for(settled, what="the reply to finish")
    lens = browser.execute_script("return window.__lens")
    bots = browser.find_elements(By.CSS_SELECTOR, '#chatbot [data-testid="bot"]')
    users = browser.find_elements(By.CSS_SELECTOR, '#chatbot [data-testid="user"]')
    ARTIFACTS.mkdir(exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "webui-chat.png"))
    assert "Hello there, who are you?" in users[-1].text
    assert bots and bots[-1].text.strip()
    assert len(set(lens)) >= 3, f"the reply did not stream: text lengths seen {sorted(set(lens))}"

    # a second turn: the history Gradio sends back must be turned into a conversation again
    browser.execute_script("window.__lens = []")
    box.send_keys("Tell me more.", Keys.ENTER)
    wait_for(settled, what="the second reply")
    assert len(browser.find_elements(By.CSS_SELECTOR, '#chatbot [data-testid="bot"]')) == 2
    browser.save_screenshot(str(ARTIFACTS / "webui-chat-2.png"))


def test_compare_tab_answers_side_by_side(ui_url, browser):
    from selenium.webdriver.common.by import By

    browser.get(ui_url)
    open_tab(browser, "Compare")
    question = wait_for(
        lambda: [
            e
            for e in browser.find_elements(By.CSS_SELECTOR, "#compare-question textarea")
            if e.is_displayed()
        ],
        what="the question box",
    )[0]
    question.send_keys("What is your name?")
    browser.find_element(By.CSS_SELECTOR, "#compare-go").click()

    def answers():
        vals = [
            browser.find_element(By.CSS_SELECTOR, f"#compare-{i} textarea").get_attribute("value")
            for i in range(2)
        ]
        return vals if all(vals) else None

    def settled():  # both columns answered and stopped changing for a second
        before = answers()
        time.sleep(1.0)
        return before if before and before == answers() else None

    final = wait_for(settled, what="both columns to answer")
    ARTIFACTS.mkdir(exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "webui-compare.png"))
    assert final[0] != final[1]  # base and adapter answer differently


@pytest.fixture(scope="module")
def tools_ui_url(tiny_model_dir, tmp_path_factory):
    """The studio over an engine whose answers are scripted by what the prompt holds: a call of
    get_weather when the tools are in it, an answer from the result once a result is in it."""
    from loraforge.infer.engine import Engine
    from loraforge.tools import call_text

    class ScriptedEngine(Engine):
        def submit(self, ids, params, adapter=None):
            prompt = self.tokenizer.decode(ids)
            text = "Sure."
            if "get_weather" in prompt:
                call = {"function": {"name": "get_weather", "arguments": WEATHER}}
                text = "It is 18 °C in Paris." if '"temperature"' in prompt else call_text([call])
            return Scripted(text[i : i + 4] for i in range(0, len(text), 4))

    class Scripted(list):  # a request handle: iterating gives the text, in pieces
        def cancel(self) -> None:
            pass

    engine = ScriptedEngine(str(tiny_model_dir), {}, dtype="float32")
    yield from _studio(engine, tmp_path_factory.mktemp("studio-tools-home"))


WEATHER = {"city": "Paris", "unit": "celsius"}


def test_chat_shows_a_tool_call_and_takes_its_result(tools_ui_url, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    def shown(selector):
        return [e for e in browser.find_elements(By.CSS_SELECTOR, selector) if e.is_displayed()]

    browser.get(tools_ui_url)
    open_tab(browser, "Chat")
    wait_for(lambda: shown("#chat-input textarea"), what="chat input")
    assert not shown("#tool-result textarea")  # no call waiting: no result box
    [b for b in browser.find_elements(By.CSS_SELECTOR, "button") if "Tools" in b.text][0].click()
    wait_for(lambda: shown("#tools-example"), what="the example button")[0].click()
    wait_for(
        lambda: (
            "convert_currency"
            in browser.find_element(By.CSS_SELECTOR, "#chat-tools textarea").get_attribute("value")
        ),
        what="the example tools",
    )
    shown("#chat-input textarea")[0].send_keys("What's the weather in Paris?", Keys.ENTER)
    result = wait_for(lambda: shown("#tool-result textarea"), what="the tool result box")[0]
    chat = browser.find_element(By.CSS_SELECTOR, "#chatbot").text
    assert "Tool call: get_weather" in chat and "Paris" in chat, chat
    label = browser.find_element(By.CSS_SELECTOR, "#tool-result").text
    assert "Result of get_weather(" in label, label
    result.send_keys('{"temperature": 18, "unit": "celsius"}')
    ARTIFACTS.mkdir(exist_ok=True)
    browser.execute_script("document.querySelector('#chatbot').scrollIntoView()")
    browser.save_screenshot(str(ARTIFACTS / "studio-tools-call.png"))
    browser.find_element(By.CSS_SELECTOR, "#tool-send").click()
    wait_for(
        lambda: "It is 18 °C in Paris." in browser.find_element(By.CSS_SELECTOR, "#chatbot").text,
        what="the answer from the tool result",
    )
    chat = browser.find_element(By.CSS_SELECTOR, "#chatbot").text
    assert "Result of get_weather" in chat
    wait_for(lambda: not shown("#tool-result textarea"), what="the result box to go")
    browser.execute_script("document.querySelector('#chatbot').scrollIntoView()")
    browser.save_screenshot(str(ARTIFACTS / "studio-tools.png"))


@pytest.mark.parametrize("verb", ["studio", "webui"])
def test_cli_studio_subprocess(tiny_model_dir, tmp_path, verb):
    """`loraforge studio` (and its former name `webui`): binds 127.0.0.1 and serves the page."""
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "loraforge.cli", verb, "--model", str(tiny_model_dir)]
    cmd += ["--port", str(port), "--dtype", "float32"]
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "LORAFORGE_HOME": str(tmp_path)}
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    try:

        def up():
            assert proc.poll() is None, proc.stdout.read()  # it died: show why
            return _get(httpx, f"http://127.0.0.1:{port}/")

        page = wait_for(up, what="the web UI")
        assert "loraforge studio" in page.text
        assert (tmp_path / "studio" / "jobs.sqlite").is_file()  # the job DB under the home
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _get(httpx, url: str):
    try:
        r = httpx.get(url)
        return r if r.status_code == 200 else None
    except httpx.TransportError:
        return None


def test_cli_studio_api_key_guards_the_page(tiny_model_dir, tmp_path):
    """`studio --api-key K`: nothing but the login form without it; any user name with K logs in."""
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "loraforge.cli", "studio", "--model", str(tiny_model_dir)]
    cmd += ["--port", str(port), "--dtype", "float32", "--api-key", "s3cret"]
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "LORAFORGE_HOME": str(tmp_path)}
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    url = f"http://127.0.0.1:{port}"
    try:

        def up():
            assert proc.poll() is None, proc.stdout.read()
            return _get(httpx, f"{url}/")

        wait_for(up, what="the studio")
        assert httpx.get(f"{url}/config").status_code == 401  # the app's config needs a login
        with httpx.Client() as c:
            bad = c.post(f"{url}/login", data={"username": "me", "password": "guess"})
            assert bad.status_code >= 400
            good = c.post(f"{url}/login", data={"username": "me", "password": "s3cret"})
            assert good.status_code == 200, good.text[:300]
            config = c.get(f"{url}/config")
            assert config.status_code == 200 and "loraforge studio" in config.text
    finally:
        proc.terminate()
        proc.wait(timeout=30)
