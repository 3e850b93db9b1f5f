"""The Studio end to end in a real headless Chromium: a real `loraforge studio` process, real
`loraforge sft` jobs on a tiny random model, every step screenshotted into test-artifacts/.

upload the shop example (bad records) -> they are named, Start stays disabled -> upload a good
file -> preview marks the trained spans -> start -> the loss chart gains points -> stop ->
resume -> finished -> chat answers with the new adapter; then a second job, the studio is
killed and restarted mid-job, and the job is listed as still running.

Optimizer steps of the tiny model take milliseconds, too fast to press Stop in between: a
sitecustomize (test-only, on PYTHONPATH) slows each step of the sft processes down.
`make test-studio` runs this file alone.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import write_item_conversations
from test_webui import ARTIFACTS, _get, open_tab, wait_for
from test_webui import browser as chromium  # noqa: F401 (the fixture, here named chromium)

ROOT = Path(__file__).resolve().parents[1]
SLOW_STEPS = """
import os, sys
if "sft" in sys.argv and "--config" in sys.argv:  # only the studio's training jobs
    import time, torch
    _step = torch.optim.AdamW.step
    def slow_step(self, *a, **k):
        time.sleep(float(os.environ["STUDIO_TEST_STEP_DELAY"]))
        return _step(self, *a, **k)
    torch.optim.AdamW.step = slow_step
"""


class Studio:
    """A `loraforge studio` process that can be killed and started again on the same home."""

    def __init__(self, model: Path, home: Path, hooks: Path):
        self.model, self.home, self.hooks = model, home, hooks
        self.proc: subprocess.Popen | None = None
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/"

    def start(self) -> None:
        import httpx

        cmd = [sys.executable, "-m", "loraforge.cli", "studio", "--model", str(self.model)]
        cmd += ["--port", str(self.port), "--dtype", "float32"]
        env = {
            **os.environ,
            "GRADIO_ANALYTICS_ENABLED": "False",
            "LORAFORGE_HOME": str(self.home),
            "PYTHONPATH": str(self.hooks),
            "STUDIO_TEST_STEP_DELAY": "0.5",
        }
        log = (self.home / "studio.log").open("a")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)

        def up():
            assert self.proc.poll() is None, (self.home / "studio.log").read_text()[-3000:]
            return _get(httpx, self.url)

        wait_for(up, timeout=180, what="the studio to serve")

    def kill(self) -> None:
        """As a person's Ctrl-C would (SIGINT to the studio only, not to its jobs)."""
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def studio(tiny_model_dir, tmp_path_factory):
    hooks = tmp_path_factory.mktemp("hooks")
    (hooks / "sitecustomize.py").write_text(SLOW_STEPS)
    s = Studio(tiny_model_dir, tmp_path_factory.mktemp("home"), hooks)
    s.start()
    yield s
    s.kill()
    from loraforge.webui.jobs import JobStore

    store = JobStore(s.home / "studio")  # leave no job running
    for job in store.list():
        if job.state == "running":
            store.stop(job.id, grace_s=5)


def shot(browser, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / f"studio-{name}.png"))


def css(browser, selector: str):
    """Displayed elements matching ``selector``; [] while the page is re-rendering them (the
    refresh every second replaces the chart and the status)."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By

    try:
        return [e for e in browser.find_elements(By.CSS_SELECTOR, selector) if e.is_displayed()]
    except StaleElementReferenceException:
        return []


def read(fn, default):
    """``fn()``, or ``default`` when the element was replaced in between."""
    from selenium.common.exceptions import StaleElementReferenceException

    try:
        return fn()
    except StaleElementReferenceException:
        return default


def value(browser, selector: str) -> str:
    found = css(browser, selector)
    return read(lambda: found[0].get_attribute("value") or "", "") if found else ""


def set_number(browser, elem: str, number: int) -> None:
    from selenium.webdriver.common.keys import Keys

    box = wait_for(lambda: css(browser, f"#{elem} input[type=number]"), what=elem)[0]
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(str(number), Keys.TAB)


def options(browser) -> list:
    """The open dropdown's options (Gradio 6 renders them as li[role=option])."""
    return css(browser, "li[role=option]")


def chart_points(browser) -> int:
    svg = css(browser, "#loss-svg")
    return read(lambda: int(svg[0].get_attribute("data-train-points")), 0) if svg else 0


def job_status(browser) -> str:
    found = css(browser, "#job-status")
    return read(lambda: found[0].text, "") if found else ""


def click(browser, elem: str) -> None:
    wait_for(lambda: css(browser, f"#{elem}"), what=elem)[0].click()


def upload(browser, path: Path) -> None:
    from selenium.webdriver.common.by import By

    field = wait_for(
        lambda: browser.find_elements(By.CSS_SELECTOR, "#data-upload input[type=file]"),
        what="the upload field",
    )[0]
    field.send_keys(str(path))


def test_studio_upload_train_stop_resume_chat_restart(studio, chromium, tmp_path):  # noqa: F811
    from selenium.webdriver.common.keys import Keys

    browser = chromium
    browser.get(studio.url)
    # 1. the shop example: its three bad records are named, Start stays disabled
    upload(browser, ROOT / "examples" / "shop.jsonl")
    wait_for(lambda: "shop.jsonl:7" in value(browser, "#doctor textarea"), what="the doctor")
    doctor = value(browser, "#doctor textarea")
    assert "shop.jsonl:5: no assistant turn" in doctor
    assert "shop.jsonl:6: unknown format" in doctor and "unknown role 'robot'" in doctor
    open_tab(browser, "Train")
    assert not css(browser, "#start")[0].is_enabled()
    open_tab(browser, "Data")
    shot(browser, "1-data-bad")

    # 2. a good file: no problem, the preview marks what is trained, Start is enabled
    good = write_item_conversations(tmp_path / "items.jsonl", n=48)
    upload(browser, good)
    wait_for(lambda: "0 problems" in value(browser, "#doctor textarea"), what="a clean verdict")
    marks = wait_for(lambda: css(browser, "#preview mark.trained"), what="the preview")
    assert marks[0].text.startswith("item ")  # the answer is marked, the question is not
    assert "what is item" not in " ".join(m.text for m in marks)
    shot(browser, "2-data-good")

    # 3. settings: few slow steps, a loss line and a checkpoint every step or two
    open_tab(browser, "Train")
    set_number(browser, "cfg-max_steps", 24)
    [b for b in css(browser, "button") if b.text.startswith("Advanced")][0].click()
    set_number(browser, "cfg-logging_steps", 1)
    set_number(browser, "cfg-save_steps", 2)
    wait_for(lambda: "--save-steps 2" in value(browser, "#sft-command textarea"), what="command")
    command = value(browser, "#sft-command textarea")
    kept = studio.home / "studio" / "data" / good.name  # uploads are kept under the data dir
    assert "--max-steps 24" in command and f"--dataset {kept}" in command
    shot(browser, "3-train")
    click(browser, "start")

    # 4. the job runs in its own process; the chart gains points
    wait_for(lambda: "running" in job_status(browser), timeout=60, what="the job to run")
    wait_for(lambda: chart_points(browser) >= 2, timeout=180, what="loss points")
    first = chart_points(browser)
    wait_for(lambda: chart_points(browser) > first, timeout=60, what="more loss points")
    shot(browser, "4-job-running")

    # 5. stop, then resume from the last checkpoint, to the end
    wait_for(lambda: chart_points(browser) >= 5, timeout=60, what="a checkpoint")
    click(browser, "job-stop")
    wait_for(lambda: "stopped" in job_status(browser), timeout=60, what="the job to stop")
    at_stop = chart_points(browser)
    assert at_stop < 24
    shot(browser, "5-job-stopped")
    click(browser, "job-resume")
    wait_for(lambda: "finished" in job_status(browser), timeout=300, what="the job to finish")
    assert chart_points(browser) == 24  # one line per step, none repeated after the resume
    log = value(browser, "#job-log textarea")
    assert "resumed from" in log and "adapter:" in log
    shot(browser, "6-job-finished")
    adapter = next((studio.home / "studio" / "runs").iterdir())
    assert (adapter / "adapter_model.safetensors").is_file()  # an ordinary adapter dir

    # 6. the new adapter answers in Chat
    open_tab(browser, "Chat")
    picker = wait_for(lambda: css(browser, "#model-picker input"), what="the picker")[0]
    picker.click()
    option = wait_for(
        lambda: [o for o in options(browser) if o.get_attribute("aria-label") == adapter.name],
        what="the new adapter in the model list",
    )[0]
    option.click()
    assert value(browser, "#model-picker input") == adapter.name
    box = css(browser, "#chat-input textarea")[0]
    box.send_keys("Who are you?", Keys.ENTER)
    bot = '#chatbot [data-testid="bot"]'
    wait_for(lambda: [b for b in css(browser, bot) if b.text.strip()], what="a reply")
    shot(browser, "7-chat")

    # 7. a second job; the studio is restarted mid-job and finds it still running
    open_tab(browser, "Train")
    set_number(browser, "cfg-max_steps", 400)
    click(browser, "start")
    wait_for(lambda: chart_points(browser) >= 1, timeout=180, what="the second job's points")
    studio.kill()
    studio.start()
    browser.get(studio.url)
    open_tab(browser, "Jobs")

    def table() -> str | None:
        text = " ".join(read(lambda e=e: e.text, "") for e in css(browser, "#jobs"))
        return text if "running" in text else None

    listed = wait_for(table, what="the job table to list the running job")
    assert "finished" in listed, listed
    shot(browser, "8-restarted")
    picker = wait_for(lambda: css(browser, "#job-pick input"), what="the job picker")[0]
    picker.click()
    wait_for(lambda: [o for o in options(browser) if "#2" in o.get_attribute("aria-label")])[
        0
    ].click()
    wait_for(lambda: "running" in job_status(browser), what="the running job's view")
    click(browser, "job-stop")
    wait_for(lambda: "stopped" in job_status(browser), timeout=60, what="the job to stop")
