#!/usr/bin/env python3
"""Drives the edge's operator page in headless Chromium (Debian's chromium and chromedriver, through
the official Selenium bindings) with the keyboard only, and prints one JSON object with what it saw.

Usage: operator_page.py BASE_URL API_KEY CLOUD_PROMPT MESSAGE MAX_TOKENS OUT_DIR

Opens BASE_URL/, records the Tab order, enters the key, picks the cloud prompt, sets max_tokens and
seed 1 (temperature stays 0), sends MESSAGE with Enter, waits for the streamed answer and for the
audit row of its response id, saves screenshots at 1280 and 360 px wide into OUT_DIR, measures
horizontal overflow at 360 px and collects the browser console. The caller (a Rust test) checks it.
"""

import json
import os
import sys
import tempfile
import time

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.keys import Keys

CHROMIUM = os.environ.get("EDGEPROMPT_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("EDGEPROMPT_CHROMEDRIVER", "/usr/bin/chromedriver")


def browser(profile):
    o = webdriver.ChromeOptions()
    o.binary_location = CHROMIUM
    for a in ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
              "--disable-background-networking", "--disable-component-update", "--disable-sync",
              "--disable-dev-shm-usage", "--window-size=1280,1000", f"--user-data-dir={profile}"]:
        o.add_argument(a)
    o.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=o)


def wait(what, f, timeout=180.0):
    t0 = time.time()
    while True:
        v = f()
        if v:
            return v
        if time.time() - t0 > timeout:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.1)


def active_id(d):
    return d.execute_script(
        "const e = document.activeElement; return e ? (e.id || e.tagName.toLowerCase()) : null")


def keys(d, *k):
    ActionChains(d).send_keys(*k).perform()


def tab_to(d, target, limit=40):
    for _ in range(limit):
        if active_id(d) == target:
            return
        keys(d, Keys.TAB)
    raise AssertionError(f"Tab never reached #{target}")


def main():
    base, key, cloud, message, max_tokens, out = sys.argv[1:7]
    os.makedirs(out, exist_ok=True)
    profile = tempfile.mkdtemp(prefix="ep-chromium-")
    d = browser(profile)
    result = {}
    try:
        d.get(base + "/")
        wait("the page's script", lambda: d.execute_script(
            "return document.getElementById('status').textContent !== ''"))
        # The Tab order from the top of the page, once round.
        order = []
        for _ in range(30):
            keys(d, Keys.TAB)
            order.append(active_id(d))
        result["tab_order"] = order
        d.execute_script("document.activeElement.blur()")
        # The key, by keyboard; Enter submits it.
        tab_to(d, "apikey")
        keys(d, key, Keys.ENTER)
        wait("the key accepted and the cloud prompt listed", lambda: d.execute_script(
            "return [...document.getElementById('cloud').options].some(o => o.value === arguments[0])",
            cloud))
        # The cloud prompt: typing its name in the focused select picks it.
        tab_to(d, "cloud")
        keys(d, cloud)
        result["cloud_selected"] = d.execute_script("return document.getElementById('cloud').value")
        # Sampling: open the disclosure, set max_tokens and the seed.
        tab_to(d, "sampling-summary")
        keys(d, Keys.ENTER)
        tab_to(d, "max_tokens")
        keys(d, Keys.CONTROL + "a", Keys.BACKSPACE, max_tokens)
        tab_to(d, "seed")
        keys(d, "1")
        # The message, sent with Enter.
        tab_to(d, "message")
        keys(d, message, Keys.ENTER)
        li = wait("the streamed answer", lambda: d.execute_script(
            "return document.querySelector('#log li.assistant[data-done], #log li.error[data-done]')"))
        # The log's items are not redrawn, but read them in one script too.
        got = d.execute_script(
            "const li = arguments[0]; return {cls: li.className,"
            " text: li.querySelector('span:not(.who)').innerText, id: li.dataset.id,"
            " finish: li.dataset.finish, cached: li.dataset.cached}", li)
        result["answer_class"] = got["cls"]
        result["answer"] = got["text"]
        result["response_id"] = got["id"]
        result["finish"] = got["finish"]
        result["cached_tokens"] = got["cached"]
        result["focus_after"] = active_id(d)
        rid = result["response_id"]
        # The page redraws its tables every second: read a row's cells in one script, atomically.
        row = wait("the audit row", lambda: d.execute_script(
            "const tr = document.querySelector('#requests tr[data-id=\"' + arguments[0] + '\"]');"
            "return tr && {cells: [...tr.cells].map(c => c.innerText),"
            " textup: tr.querySelector('td.textup').innerText}", rid), 30)
        result["audit_cells"] = row["cells"]
        result["audit_text_up"] = row["textup"]
        result["prompts_rows"] = d.execute_script(
            "return [...document.querySelectorAll('#prompts tbody tr')].map(tr => tr.innerText)")
        result["kv_text"] = d.execute_script("return document.getElementById('kvtext').innerText")
        d.execute_script("document.activeElement.blur(); window.scrollTo(0, 0)")
        d.set_window_size(1280, 1250)
        time.sleep(0.3)
        d.save_screenshot(os.path.join(out, "operator-page.png"))
        # Narrow: 360 CSS px wide.
        d.set_window_size(360, 900)
        time.sleep(0.5)
        inner = d.execute_script("return window.innerWidth")
        if inner > 360:
            # The window has a minimum width: emulate the narrow viewport instead.
            d.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                              {"width": 360, "height": 900, "deviceScaleFactor": 1, "mobile": True})
            time.sleep(0.5)
        result["narrow"] = d.execute_script(
            "return {inner: window.innerWidth, scroll: document.documentElement.scrollWidth}")
        d.save_screenshot(os.path.join(out, "operator-page-360.png"))
        result["console"] = [{"level": e["level"], "message": e["message"]} for e in d.get_log("browser")]
    finally:
        d.quit()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
