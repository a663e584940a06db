"""The page at ``/`` in a real headless Chromium (Debian's package, driven by Playwright): Chromium's
fake microphone plays a committed speech clip in real time, the page streams it over the WebSocket,
and the clip's words must settle on the page as finals; the file upload must show a file's words.
Screenshots are kept in tests/artifacts/."""

from __future__ import annotations

import re
import time
import wave
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from hub.audio import to_pcm
from tests.conftest import DATA, ROOT, reference, word_error_rate
from tests.gateway_support import Gateway

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = ROOT / "tests" / "artifacts"
LEAD_S, TAIL_S = 0.5, 3.0  # silence around the clip: Chromium loops the file, the page stops before it restarts

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(not CHROMIUM.exists(), reason=f"no Chromium at {CHROMIUM} (Debian: apt-get install chromium)"),
]


def padded_clip(path: Path) -> float:
    """coffee.wav with silence before and after, as 16-bit WAV for the fake microphone; returns the speech's end (s)."""
    speech = to_pcm(DATA / "coffee.wav")
    pcm = np.concatenate([np.zeros(int(LEAD_S * 16000), np.float32), speech, np.zeros(int(TAIL_S * 16000), np.float32)])
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(16000)
        out.writeframes((pcm * 32767).astype("<i2").tobytes())
    return LEAD_S + speech.size / 16000


@pytest.fixture(scope="module")
def chromium(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, float]]:
    """A headless Chromium whose microphone plays the padded clip; yields it and where the speech ends."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright (PyPI: playwright) is not installed")
    clip = tmp_path_factory.mktemp("browser") / "clip.wav"
    speech_end = padded_clip(clip)
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM),
            args=[
                "--no-sandbox",
                "--use-fake-ui-for-media-stream",
                "--use-fake-device-for-media-stream",
                f"--use-file-for-fake-audio-capture={clip}",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
            ],
        )
        try:
            yield browser, speech_end
        finally:
            browser.close()


@pytest.fixture
def page(chromium: tuple[Any, float], whisper_gateway: Gateway) -> Iterator[Any]:
    browser, _ = chromium
    context = browser.new_context(viewport={"width": 1000, "height": 800})
    page = context.new_page()
    errors: list[str] = []
    elsewhere: list[str] = []  # the page must work from the gateway alone: no CDN, no internet
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on(
        "request",
        lambda r: None if r.url.startswith((whisper_gateway.url, "data:", "blob:")) else elsewhere.append(r.url),
    )
    page.goto(whisper_gateway.url + "/")
    try:
        yield page
    finally:
        context.close()
    assert not errors, f"the page raised: {errors}"
    assert not elsewhere, f"the page fetched from elsewhere: {elsewhere}"


def screenshot(page: Any, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / name), full_page=True)


def test_speech_into_the_microphone_settles_as_finals(page: Any, chromium: tuple[Any, float]) -> None:
    _, speech_end = chromium
    page.click("#start")
    page.wait_for_selector("#live-status[data-state=recording]", timeout=15_000)
    started = time.monotonic()
    rate = int(re.search(r"\((\d+) Hz\)", page.text_content("#live-status") or "").group(1))  # type: ignore[union-attr]
    assert rate in (44100, 48000), "the page should stream at the browser's own rate"
    seen_live = ""
    while time.monotonic() - started < speech_end + 1.0:  # the clip plays in real time
        seen_live = seen_live or (page.text_content("#finals") or "") + (page.text_content("#partial") or "")
        time.sleep(0.1)
    page.click("#stop")
    page.wait_for_selector("#live-status[data-state=done], #live-status[data-state=error]", timeout=30_000)
    screenshot(page, "browser-live.png")
    status = page.text_content("#live-status") or ""
    assert page.get_attribute("#live-status", "data-state") == "done", status
    finals = " ".join(page.locator("#finals .final").all_text_contents())
    assert word_error_rate(reference("coffee"), finals) <= 0.25, finals
    assert seen_live.strip(), "text should appear while the clip is still playing, not only after Stop"
    assert page.text_content("#partial") == ""  # everything settled
    recorded = float(re.search(r"done: ([\d.]+) s", status).group(1))  # type: ignore[union-attr]
    assert speech_end < recorded < speech_end + TAIL_S


def test_a_file_upload_shows_its_words_and_segments(page: Any) -> None:
    page.set_input_files("#file", str(DATA / "stella.wav"))
    page.click("#transcribe")
    page.wait_for_selector("#file-status[data-state=done], #file-status[data-state=error]", timeout=30_000)
    screenshot(page, "browser-upload.png")
    assert page.get_attribute("#file-status", "data-state") == "done", page.text_content("#file-status")
    text = page.text_content("#file-text") or ""
    assert word_error_rate(reference("stella"), text) <= 0.15, text
    segments = page.locator("#segments li").all_text_contents()
    assert segments and all(re.match(r"\d+:\d\d\.\d – \d+:\d\d\.\d", s) for s in segments), segments
    assert "4.7 s" in (page.text_content("#file-status") or "")  # the clip's length, from verbose_json


def test_a_bad_upload_shows_the_gateways_error(page: Any, tmp_path: Path) -> None:
    junk = tmp_path / "notes.wav"
    junk.write_bytes(b"this is not audio" * 50)
    page.set_input_files("#file", str(junk))
    page.click("#transcribe")
    page.wait_for_selector("#file-status[data-state=error]", timeout=30_000)
    assert (page.text_content("#file-status") or "").startswith("400: ")
