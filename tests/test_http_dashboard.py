"""The dashboard in a real headless Chromium (Debian's chromium and chromium-driver, driven by
selenium) against a real gateway and a real training daemon."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

webdriver = pytest.importorskip("selenium.webdriver", reason="the test extra installs selenium")
pytest.importorskip("aiohttp", reason="the http extra installs aiohttp")

from tests.daemonproc import Daemon, wait_for  # noqa: E402
from tests.gatewayproc import Gateway  # noqa: E402
from tests.test_http import TOKEN, start_training  # noqa: E402

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(CHROMIUM is None or DRIVER is None, reason=(
    "chromium and chromedriver not found (Debian packages chromium, chromium-driver; .ci/run "
    "installs them)"))


def browser(profile: Path):
    from selenium.webdriver.chrome.service import Service
    opts = webdriver.ChromeOptions()
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run",
                 "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--window-size=1440,900"):
        opts.add_argument(flag)
    opts.binary_location = CHROMIUM
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(options=opts, service=Service(executable_path=DRIVER))


def console_errors(drv) -> list[str]:
    return [e["message"] for e in drv.get_log("browser") if e["level"] == "SEVERE"]


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    d = Daemon(tmp_path_factory.mktemp("dash-daemon")).start()
    start_training(d)
    yield d
    d.stop()


@pytest.fixture(scope="module")
def gateway(daemon, tmp_path_factory):
    g = Gateway(daemon.run / "cllmd.sock", tmp_path_factory.mktemp("dash-gw") / "gw.log").start()
    yield g
    g.stop()


@pytest.fixture(scope="module")
def page(gateway, tmp_path_factory):
    drv = browser(tmp_path_factory.mktemp("chromium-profile"))
    try:
        drv.get(gateway.url + "/")
        yield drv
    finally:
        drv.quit()


def el(drv, id_):
    return drv.find_element("id", id_)


def click(drv, element) -> None:
    # into the middle of the view, clear of the sticky header
    drv.execute_script("arguments[0].scrollIntoView({block: 'center'})", element)
    element.click()


def test_dashboard_loads_without_console_errors(page):
    assert page.title == "cllmd"
    wait_for(lambda: "live" in el(page, "conn").get_attribute("class"), 60, "the live feed")
    wait_for(lambda: el(page, "h-params").text not in ("", "–"), 30, "the model's figures")
    assert len(page.find_elements("css selector", "#ring .sphere")) == 12
    assert console_errors(page) == []


def test_dashboard_loss_curve_gains_points_while_training(page, daemon):
    wait_for(lambda: daemon.client.request("train.status")["state"] == "running", 600,
             "training to run (the first step compiles the kernels)")
    before = wait_for(lambda: page.execute_script("return window.cllm.lossPoints()"), 120, "a first point")
    wait_for(lambda: page.execute_script("return window.cllm.lossPoints()") > before + 3, 120,
             "the loss curve to gain points")
    assert int(el(page, "loss-chart").get_attribute("data-points")) > before
    wait_for(lambda: el(page, "state").text.lower() == "training", 30, "the state pill")
    wait_for(lambda: int(el(page, "ring").get_attribute("data-working") or 0) > 0, 60,
             "a sphere drawn working")
    assert console_errors(page) == []


def test_dashboard_pause_button_pauses_the_daemon(page, daemon):
    wait_for(lambda: el(page, "pause").text == "Pause", 30, "the pause button")
    click(page, el(page, "pause"))
    wait_for(lambda: daemon.client.request("train.status")["state"] == "paused", 30, "the daemon to pause")
    wait_for(lambda: el(page, "state").text.lower() == "paused" and el(page, "pause").text == "Resume",
             30, "the page to show it")


def test_dashboard_config_form_changes_the_daemon(page, daemon):
    lr = el(page, "config").find_element("name", "lr")
    lr.clear()
    lr.send_keys("0.0007")
    click(page, el(page, "config").find_element("css selector", "button"))
    wait_for(lambda: abs(daemon.client.request("train.config.get")["lr"] - 7e-4) < 1e-12, 30,
             "the daemon's lr to change")
    wait_for(lambda: "applied lr" in el(page, "control-msg").text, 10, "the page to confirm it")


def test_dashboard_resume_button(page, daemon):
    click(page, el(page, "pause"))
    wait_for(lambda: daemon.client.request("train.status")["state"] == "running", 30, "the daemon to resume")


def test_dashboard_chat_streams_a_reply(page, daemon):
    el(page, "system").send_keys("You answer in words.")
    el(page, "chat-input").send_keys("Tell me about the spheres")
    click(page, el(page, "send"))
    reply = "#messages .bubble.assistant"
    wait_for(lambda: int(page.find_element("css selector", reply).get_attribute("data-chunks")) > 1,
             120, "pieces of the reply")
    wait_for(lambda: "streaming" not in page.find_element("css selector", reply).get_attribute("class"),
             120, "the reply to end")
    assert int(el(page, "c-tokens").text) > 1
    assert el(page, "c-tps").text != "–"
    assert page.find_element("css selector", reply).text.strip()
    assert console_errors(page) == []
    shot = os.environ.get("CLLM_HTTP_SCREENSHOT")
    if shot:   # docs/dashboard.png is made this way (see docs/http.md)
        wait_for(lambda: page.execute_script("return window.cllm.lossPoints()") > 60, 300, "a long curve")
        page.set_window_size(1440, 1180)
        page.execute_script("window.scrollTo(0, 0)")
        page.save_screenshot(shot)
        page.set_window_size(1440, 900)


def test_dashboard_model_switcher_switches_the_daemon(page, daemon, tmp_path):
    from selenium.webdriver.support.ui import Select
    from cllmd.model import Model, ModelConfig
    from cllmd.tokenizer import BytesTokenizer
    source = tmp_path / "other.cllm"
    Model(ModelConfig(vocab_size=257, n_layer=1, n_head=2, n_embd=16, block_size=32), seed=1,
          tokenizer=BytesTokenizer()).save(source)
    first = daemon.client.request("models.list")["active"]
    daemon.client.request("model.create", name="other", **{"from": str(source)}, timeout=120)
    try:
        page.refresh()
        wait_for(lambda: len(page.find_elements("css selector", "#model option")) == 2, 60, "two models")
        assert el(page, "model").is_enabled()
        page.execute_script("arguments[0].scrollIntoView({block: 'center'})", el(page, "model"))
        Select(el(page, "model")).select_by_value("other")
        wait_for(lambda: daemon.client.request("models.list")["active"] == "other", 180,
                 "the daemon to switch models")
        wait_for(lambda: "model other is active" in el(page, "log").text, 60, "the model event on the page")
        assert console_errors(page) == []
    finally:
        daemon.client.request("model.use", name=first, timeout=180)
        daemon.client.request("model.rm", name="other", timeout=60)


def test_dashboard_asks_for_the_token(daemon, tmp_path):
    g = Gateway(daemon.run / "cllmd.sock", tmp_path / "gw.log", token=TOKEN).start()
    drv = browser(tmp_path / "profile")
    try:
        drv.get(g.url + "/")
        wait_for(lambda: el(drv, "login").get_attribute("open") is not None, 30, "the token dialog")
        el(drv, "token").send_keys(TOKEN)
        el(drv, "login-form").find_element("css selector", "button").click()
        wait_for(lambda: "live" in el(drv, "conn").get_attribute("class"), 60, "the live feed with the token")
        # the failed tries before the token show as console errors (401); nothing else may
        assert [e for e in console_errors(drv) if "401" not in e] == []
    finally:
        drv.quit()
        g.stop()
