"""The app in a real browser (headless Chromium): the page renders its controls offline, and a click generates.

The first test needs only the `chromium` binary (`--dump-dom`, `--screenshot`); the second drives the page through
`chromedriver`'s W3C WebDriver HTTP API with httpx (no selenium). Screenshots are left in pytest's temp folder
(`--basetemp` makes the place predictable). Debian: `apt-get install chromium chromium-driver`.
"""

from __future__ import annotations

import base64
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from gradio_client import handle_file
from PIL import Image
from test_app import free_port, served, write_photos  # noqa: F401  (the module-scoped app fixture)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1400,1000"]
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary (apt-get install chromium)")
ELEMENT = "element-6066-11e4-a52e-4f735466cecf"  # the W3C WebDriver key of an element reference


def chromium(url: str, profile: Path, *args: str) -> str:
    run = subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "--virtual-time-budget=20000", *args, url],
                         capture_output=True, text=True, timeout=120, check=True)
    return run.stdout


def test_page_renders_main_controls_offline(served, tmp_path):  # noqa: F811
    client, _ = served
    dom = chromium(client.src, tmp_path / "profile", "--dump-dom")
    for control in ('id="generate-button"', 'id="prompt"', 'id="negative-prompt"', 'id="results"',
                    ">Generate<", ">Train<", ">Fuse &amp; export<", ">Concept library<", ">Regions<", ">Concepts<"):
        assert control in dom, control
    shot = tmp_path / "app.png"
    chromium(client.src, tmp_path / "profile", f"--screenshot={shot}")
    with Image.open(shot) as image:
        assert image.size == (1400, 1000)
        assert len(image.convert("L").getcolors(1 << 16)) > 16  # not a blank page
    print(f"screenshot: {shot}")


class Browser:
    """The few WebDriver commands the test needs, over chromedriver's HTTP API."""

    def __init__(self, session: str) -> None:
        self.session = session

    def call(self, method: str, path: str, body: dict | None = None) -> object:
        reply = httpx.request(method, f"{self.session}{path}", json=body, timeout=60).json()
        if isinstance(reply.get("value"), dict) and "error" in reply["value"]:
            raise RuntimeError(f"{path}: {reply['value']['message'].splitlines()[0]}")
        return reply["value"]

    def js(self, script: str, *args: object) -> object:
        return self.call("POST", "/execute/sync", {"script": script, "args": list(args)})

    def wait_for(self, script: str, *args: object, timeout: float = 60) -> object:
        """Poll a JavaScript expression until it is truthy."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.js(f"return {script}", *args)
            if value:
                return value
            time.sleep(0.25)
        raise TimeoutError(script)

    def click(self, element: dict) -> None:
        self.call("POST", f"/element/{element[ELEMENT]}/click", {})

    def type(self, element: dict, text: str) -> None:
        self.call("POST", f"/element/{element[ELEMENT]}/value", {"text": text})

    def screenshot(self, path: Path) -> Path:
        path.write_bytes(base64.b64decode(str(self.call("GET", "/screenshot"))))
        return path


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Browser]:
    if CHROMEDRIVER is None:
        pytest.skip("no chromedriver (apt-get install chromium-driver)")
    port = free_port()
    driver = subprocess.Popen([CHROMEDRIVER, f"--port={port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    root = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(f"{root}/status", timeout=2)
                break
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        options = {"binary": CHROMIUM, "args": [*FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]}
        reply = httpx.post(f"{root}/session", timeout=120, json={
            "capabilities": {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": options}}}).json()
        browser = Browser(f"{root}/session/{reply['value']['sessionId']}")
        try:
            yield browser
        finally:
            browser.call("DELETE", "")
    finally:
        driver.terminate()
        driver.wait(timeout=30)


def test_generate_from_the_browser(served, browser, tmp_path):  # noqa: F811
    client, _ = served
    browser.call("POST", "/url", {"url": client.src})
    prompt = browser.wait_for("document.querySelector('#prompt textarea')")
    browser.type(prompt, "a photo of")
    # pick dogA in the concept dropdown, then close the option list
    picker = browser.wait_for("document.querySelector('input[aria-label=\"Concepts\"]')")
    browser.click(picker)
    browser.click(browser.wait_for("document.querySelector('[role=option][aria-label=\"dogA\"]')"))
    browser.type(picker, "\ue00c")  # Escape
    # its row: a weight slider and a button inserting the trigger into the prompt
    browser.click(browser.wait_for(
        "Array.from(document.querySelectorAll('button')).find(b => b.textContent.trim() === 'Insert <doga>')"))
    assert browser.wait_for("(v => v.endsWith('<doga>') && v)(document.querySelector('#prompt textarea').value)") \
        == "a photo of <doga>"
    browser.js("const input = document.querySelector('.concept-weight input[type=number]');"
               "Object.getOwnPropertyDescriptor(HTMLInputElement.prototype, 'value').set.call(input, '1.5');"
               "input.dispatchEvent(new Event('input', {bubbles: true}));"
               "input.dispatchEvent(new Event('change', {bubbles: true}));")
    time.sleep(2)  # the slider's change event updates the weights the Generate button sends
    browser.click(browser.wait_for("document.querySelector('#generate-button')"))
    browser.wait_for("document.querySelector('#results img')")
    parameters = browser.wait_for("document.querySelector('#parameters textarea').value")
    seed = browser.js("return document.querySelector('#used-seed input').value")
    assert f"Seed: {seed}," in parameters
    assert 'Concepts: "dogA: 1.5"' in parameters
    offsite = browser.js("return performance.getEntriesByType('resource').map(e => e.name)"
                         ".filter(u => !u.startsWith(location.origin) && !u.startsWith('data:'))")
    assert offsite == []  # no fonts, scripts or analytics from elsewhere
    print(f"screenshot: {browser.screenshot(tmp_path / 'generated.png')}")
    # a click on a library card adds that concept to the picker and describes it
    browser.click(browser.wait_for(
        "Array.from(document.querySelectorAll('button[role=tab]')).find(b => b.textContent.trim() === 'Concept library')"))
    browser.click(browser.wait_for(
        "Array.from(document.querySelectorAll('#concept-library .thumbnail-item'))"
        ".find(c => c.textContent.includes('catB'))"))
    details = browser.wait_for("(t => t.includes('catB') && t)(document.querySelector('#concept-details').innerText)")
    assert "trigger <catb>" in details and "matches the loaded model" in details
    chips = browser.js("return document.querySelector('input[aria-label=\"Concepts\"]').closest('.block').innerText")
    assert "dogA" in chips and "catB" in chips


def test_train_tab_shows_thumbnails_loss_curve_and_samples(served, browser, tmp_path):  # noqa: F811
    client, backend = served
    photos = [handle_file(p) for p in write_photos(tmp_path / "photos", n=2, seed=3)]
    client.predict(photos=photos, concept_name="sampled", token="<sampledA>", class_word="toy", steps=2, rank=4,
                   sample_every=1, api_name="/train")
    assert client.predict(api_name="/train_status").startswith("Trained sampled")
    browser.call("POST", "/url", {"url": client.src})
    browser.click(browser.wait_for(
        "Array.from(document.querySelectorAll('button[role=tab]')).find(b => b.textContent.trim() === 'Train')"))
    assert browser.wait_for("document.querySelector('#train-steps input[type=number]')") is not None
    # the page polls the job: its loss curve (a Vega chart) and its two samples appear
    browser.wait_for("document.querySelector('#train-loss canvas, #train-loss svg')")
    assert browser.wait_for("(n => n === 2 && n)(document.querySelectorAll('#train-samples img').length)") == 2
    # uploads show as thumbnails
    upload = browser.wait_for("document.querySelector('#photos input[type=file]')")
    browser.type(upload, str(tmp_path / "photos" / "photo0.png"))
    browser.wait_for("document.querySelector('#photo-thumbnails img')")
    print(f"screenshot: {browser.screenshot(tmp_path / 'train.png')}")
