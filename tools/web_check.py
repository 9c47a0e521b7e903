"""The web chat page in a real browser: opens `/` of an `infopt-pack serve` server in headless
Chromium (Selenium, with the system's chromedriver), sends a message, waits for the answer to
stream in and end, and saves a screenshot. Exits non-zero when any step fails.

    python -m infopt.tools.web_check [URL] [--api-key KEY] [--screenshot docs/img/web_chat.png]
    python -m infopt.tools.web_check --model MODEL   # starts its own server (default model)

Needs Debian's `chromium` and `chromium-driver` (or any Chromium with its matching driver on
PATH); Selenium Manager is never asked to download one.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

DEFAULT_SCREENSHOT = "docs/img/web_chat.png"
DEFAULT_MESSAGE = "Write a haiku about the sea."
POLL_S = 0.1
# Records the answer's length each time the page grows it, one entry per task that did: two or
# more entries mean the text arrived in pieces, not at once.
WATCH_ANSWER = """
window.answerLengths = [];
new MutationObserver(() => {
  const all = document.querySelectorAll('.msg.assistant'), a = all[all.length - 1];
  const n = a ? a.textContent.length : 0;
  if (n > (window.answerLengths.at(-1) || 0)) window.answerLengths.push(n);
}).observe(document.getElementById('log'), {subtree: true, childList: true, characterData: true});
"""


@contextmanager
def own_server(model: str | None, timeout: float) -> Iterator[str]:
    """A server started for the check on a free port, stopped (Ctrl-C) afterwards."""
    cmd = [sys.executable, "-m", "infopt.cli", "serve", *([model] if model else []), "--port", "0"]
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        line = process.stdout.readline()  # the "Serving ... at URL/" line, once it listens
        if "http://" not in line:
            raise SystemExit(f"the server did not start (exit {process.wait(timeout)})")
        yield line.split(" at ")[1].split("/ ")[0]
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()


def browser() -> Any:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (chromium and driver):
        raise SystemExit(
            "needs chromium and chromedriver on PATH (Debian: apt-get install chromium "
            "chromium-driver)"
        )
    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager: never download a driver
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(arg)
    options.add_argument("--window-size=900,640")
    return webdriver.Chrome(service=Service(executable_path=driver), options=options)


def check(url: str, message: str, api_key: str | None, screenshot: Path, timeout: float) -> dict:
    """Sends `message` on the page at `url`; returns what it saw. Raises SystemExit on a
    failure, after saving the screenshot (it shows what went wrong)."""
    from selenium.webdriver.common.by import By

    driver = browser()
    try:
        driver.get(url.rstrip("/") + "/")
        if api_key:  # where the page keeps a key it asked for
            driver.execute_script("sessionStorage.setItem('infopt-api-key', arguments[0])", api_key)
        driver.execute_script(WATCH_ANSWER)
        driver.find_element(By.ID, "input").send_keys(message)
        started = time.monotonic()
        driver.find_element(By.ID, "send").click()
        while time.monotonic() - started < timeout:
            state, text, done, error = driver.execute_script(
                "const all = document.querySelectorAll('.msg.assistant'), a = all[all.length - 1];"
                "const e = document.querySelector('.msg.error');"
                "return [document.body.dataset.state, a ? a.textContent : '',"
                " !!(a && a.classList.contains('done')), e ? e.textContent : ''];"
            )
            if error:
                fail(driver, screenshot, f"the page shows an error: {error}")
            if done and state == "idle":
                break
            time.sleep(POLL_S)
        else:
            fail(driver, screenshot, f"no finished answer within {timeout:.0f} s")
        seconds = time.monotonic() - started
        if not text.strip():
            fail(driver, screenshot, "the answer is empty")
        steps = driver.execute_script("return window.answerLengths")
        if len(steps) < 2:
            fail(driver, screenshot, f"the answer appeared at once, not streamed ({steps})")
        users = driver.find_elements(By.CSS_SELECTOR, ".msg.user")
        if [u.text for u in users] != [message]:
            fail(driver, screenshot, f"the conversation shows {[u.text for u in users]}")
        save(driver, screenshot)
        return {"answer": text, "seconds": round(seconds, 2), "updates": len(steps)}
    finally:
        driver.quit()


def save(driver: Any, screenshot: Path) -> None:
    screenshot.parent.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(screenshot))


def fail(driver: Any, screenshot: Path, why: str) -> None:
    save(driver, screenshot)
    raise SystemExit(f"web check failed: {why} (screenshot: {screenshot})")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("url", nargs="?", help="a running server (default: start one)")
    parser.add_argument("--model", help="the model of the server started (default: default)")
    parser.add_argument("--api-key", default=os.environ.get("INFOPT_API_KEY"))
    parser.add_argument("--message", default=DEFAULT_MESSAGE)
    parser.add_argument("--screenshot", type=Path, default=Path(DEFAULT_SCREENSHOT))
    parser.add_argument("--timeout", type=float, default=120, help="seconds for the answer")
    args = parser.parse_args(argv)
    if args.url and args.model:
        parser.error("give a URL or --model, not both")

    def run(url: str) -> None:
        seen = check(url, args.message, args.api_key, args.screenshot, args.timeout)
        print(
            f"ok: answered in {seen['seconds']} s, streamed in {seen['updates']} updates; "
            f"screenshot {args.screenshot}"
        )
        print(f"answer: {seen['answer']!r}")

    if args.url:
        run(args.url)
    else:
        with own_server(args.model, timeout=args.timeout) as url:
            run(url)


if __name__ == "__main__":
    main()
