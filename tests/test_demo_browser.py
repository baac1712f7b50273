"""`groma demo` in a real browser: the command serves the embedded model and Playwright drives Debian's headless
Chromium (``/usr/bin/chromium``, or ``$GROMA_CHROMIUM``) through the page as a user would: upload, caption, draw a
box with the mouse and ask about it, chat, bad files; and, served with a recipe whose proposer gives masks (the
embedded model with the example plugin's windows), the masks tinted on the picture. ``GROMA_DEMO_SCREENSHOT=path``
also writes the screenshot of the grounded caption there (the README's picture comes from it).

Skipped, with the reason, only when Chromium, Playwright or the demo extra is missing; under CI (``CI=true``, which
.ci/run sets and where both are installed) a missing piece fails instead."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import time
import urllib.request
import zlib
from pathlib import Path

import pytest
from PIL import Image

CHROMIUM = os.environ.get("GROMA_CHROMIUM", "/usr/bin/chromium")
ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "images" / "shapes.png"
DEFAULT_MODEL = ROOT / "groma_core" / "default_model"
BLUE_CIRCLE = (40, 55, 165, 175)  # pixels of the example around its blue circle
WAIT_MS = int(os.environ.get('GROMA_DEMO_WAIT_MS', 120_000))


def _missing() -> str | None:
    modules = [m for m in ("gradio", "gradio_image_annotation", "playwright") if importlib.util.find_spec(m) is None]
    if modules:
        return f'not installed: {", ".join(modules)} (pip install "groma-core[demo]" playwright)'
    if not os.access(CHROMIUM, os.X_OK):
        return f"no Chromium at {CHROMIUM} (apt-get install chromium, or set GROMA_CHROMIUM)"
    return None


MISSING = _missing()
if MISSING and os.environ.get("CI") == "true":
    pytest.fail(f"the browser test must run in CI: {MISSING}", pytrace=False)
pytestmark = pytest.mark.skipif(MISSING is not None, reason=MISSING or "")


def serve_demo(log: Path, *args: str, env: dict[str, str] | None = None):
    """`groma demo ARGS` on a free port, as a user starts it (``env`` added to the environment); yields its URL and
    stops it afterwards."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False",
           **(env or {})}
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "groma_core.cli", "demo", "--port", str(port), "--max-new-tokens", "64", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 180
    while True:
        try:
            urllib.request.urlopen(url, timeout=5).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"groma demo did not start: {log.read_text()[-2000:]}")
            time.sleep(0.5)
    yield url
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`groma demo` on the embedded model."""
    yield from serve_demo(tmp_path_factory.mktemp("demo") / "server.log")


@pytest.fixture(scope="module")
def mask_server(tmp_path_factory):
    """`groma demo --model` on a recipe that extends the embedded model with a proposer that gives masks: the
    example third-party plugin (examples/groma-plugin-grid-proposer, installed with pip) with ``masks: true``, an
    ellipse in each window. (A tiny SAM with random weights would do, but its masks are noise over the whole picture:
    every box the full image, one region left after NMS.)"""
    folder = tmp_path_factory.mktemp("masks")
    site = folder / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
         "--target", str(site), str(ROOT / "examples" / "groma-plugin-grid-proposer")],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    (folder / "masks.yaml").write_text(
        f"extends: {DEFAULT_MODEL}\n"
        "region_proposer: {plugin: sliding-window, scales: [0.25, 0.5], masks: true}\n"
        "region_selection: {score_threshold: 0.0}\n"
    )
    python_path = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))
    yield from serve_demo(folder / "server.log", "--model", str(folder / "masks.yaml"), env={"PYTHONPATH": python_path})


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"], headless=True)
        yield b
        b.close()


def open_page(browser, url: str):
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(WAIT_MS)
    page.goto(url)
    page.wait_for_selector("#groma-run")
    yield page
    context.close()


@pytest.fixture
def page(browser, server):
    yield from open_page(browser, server)


@pytest.fixture
def mask_page(browser, mask_server):
    yield from open_page(browser, mask_server)


def status(page) -> str:
    return page.inner_text("#groma-status").strip()


def wait_status(page, text: str) -> str:
    try:
        page.wait_for_function("t => document.querySelector('#groma-status').innerText.includes(t)", arg=text)
    except Exception as exc:  # noqa: BLE001 - say what the page shows instead
        raise AssertionError(f"waited for {text!r}; the page says {status(page)!r}") from exc
    return status(page)


def upload(page, path: Path) -> None:
    page.set_input_files("#groma-upload input[type=file]", str(path))


SNAPSHOT = """() => [document.querySelector('#groma-status').innerText,
                     (document.querySelector('#groma-json a') || {}).href || '']"""


def run(page, task: str, question: str = "") -> str:
    """Run a task and wait for its outcome: a new answer file to download, or a new message."""
    page.get_by_label(task, exact=True).check()
    page.fill("#groma-question textarea", question)
    before = page.evaluate(SNAPSHOT)
    page.click("#groma-run")
    page.wait_for_function(f"before => {{ const now = ({SNAPSHOT})(); return now[0] !== before[0] || now[1] !== "
                           "before[1] && now[1] !== ''; }", arg=before)
    page.wait_for_function("() => document.querySelector('#groma-status').innerText.trim() !== ''")
    return status(page)


def answer_json(page) -> dict:
    """The answer as the user downloads it (the link of the download box)."""
    href = page.locator("#groma-json a").first.get_attribute("href")
    return json.loads(page.request.get(href).text())


def shown_picture(page) -> Image.Image:
    """The annotated picture as the page shows it (the image file its <img> loads)."""
    src = page.locator("#groma-picture img").first.get_attribute("src")
    return Image.open(io.BytesIO(page.request.get(src).body())).convert("RGB")


def mask_pixels(picture: Image.Image, answer: dict) -> int:
    """How many pixels of the page's ``picture`` differ from the same answer drawn without masks (the boxes and
    labels of its phrases, from its JSON): the pixels that the masks tinted. The picture is a lossless PNG."""
    import numpy as np

    from groma_core.types import GroundedAnswer, GroundedPhrase
    from groma_core.visualize import draw_answer

    phrases = [
        GroundedPhrase(p["phrase"], tuple(p["span"]), p["region_ids"], [tuple(b) for b in p["boxes"]],
                       [tuple(b) for b in p["boxes_px"]])
        for p in answer["phrases"]
    ]
    plain = draw_answer(Image.open(EXAMPLE).convert("RGB"), GroundedAnswer(raw_text="", text="", phrases=phrases))
    assert plain.size == picture.size, "the picture is shown at the image's own size"
    return int((np.asarray(picture, dtype=np.int16) != np.asarray(plain, dtype=np.int16)).any(-1).sum())


def draw_box(page, box: tuple[float, float, float, float], image_size=(512, 384)) -> None:
    """Drag with the mouse from one corner of ``box`` (pixels of the image) to the other on the picture."""
    canvas = page.locator("#groma-canvas canvas")
    page.wait_for_timeout(1000)  # the canvas draws the new picture a moment after the page says it is loaded
    bb = canvas.bounding_box()
    cw, ch = canvas.evaluate("c => [c.width, c.height]")
    w, h = image_size
    scale = min(cw / w, ch / h)  # the picture is fitted into the canvas and centred
    left, top = (cw - w * scale) / 2, (ch - h * scale) / 2
    css = bb["width"] / cw

    def at(x, y):
        return bb["x"] + (left + x * scale) * css, bb["y"] + (top + y * scale) * css

    page.mouse.move(*at(box[0], box[1]))
    page.mouse.down()
    page.mouse.move(*at((box[0] + box[2]) / 2, (box[1] + box[3]) / 2), steps=5)
    page.mouse.move(*at(box[2], box[3]), steps=5)
    page.mouse.up()


def test_example_grounded_caption_shows_coloured_phrases_and_boxes(page, tmp_path):
    page.get_by_text("shapes.png", exact=True).first.click()  # the shipped example
    assert wait_status(page, "pixels").startswith("shapes.png: 512x384 pixels")
    assert run(page, "Grounded caption").startswith("done: ")
    page.wait_for_selector("#groma-picture img")
    phrases = page.locator("#groma-answer .groma-phrase")
    assert phrases.count() >= 1
    record = answer_json(page)
    assert [p["phrase"] for p in record["answers"][0]["phrases"]] == phrases.all_inner_texts()
    assert "rgb(230, 25, 75)" in phrases.first.evaluate("e => getComputedStyle(e).borderBottomColor")
    assert not any(p["has_masks"] for p in record["answers"][0]["phrases"])  # the detector gives no masks
    assert mask_pixels(shown_picture(page), record["answers"][0]) == 0  # so the picture is boxes and labels only
    shot = tmp_path / "demo.png"
    page.screenshot(path=str(shot), full_page=True)
    assert Image.open(shot).width >= 1000
    if os.environ.get("GROMA_DEMO_SCREENSHOT"):
        shutil.copy(shot, os.environ["GROMA_DEMO_SCREENSHOT"])


def test_masks_of_a_proposer_that_gives_them_are_tinted_on_the_picture(mask_page):
    page = mask_page
    page.get_by_text("shapes.png", exact=True).first.click()
    wait_status(page, "pixels")
    assert run(page, "Grounded caption").startswith("done: ")
    page.wait_for_selector("#groma-picture img")
    answer = answer_json(page)["answers"][0]
    assert answer["phrases"] and all(p["has_masks"] for p in answer["phrases"]), "the regions come with their masks"
    assert mask_pixels(shown_picture(page), answer) > 1000, "the masks are painted under the boxes"


def test_draw_a_box_with_the_mouse_and_ask_about_it(page):
    upload(page, EXAMPLE)
    wait_status(page, "pixels")
    draw_box(page, BLUE_CIRCLE)
    assert run(page, "Ask about drawn boxes") == "done: 0 grounded phrase(s), 1 drawn box(es)"
    assert page.inner_text("#groma-answer").startswith("box 1: ")
    record = answer_json(page)
    assert record["answers"][0]["label"] == "box 1" and record["answers"][0]["text"]
    (drawn,) = record["drawn_boxes_px"]
    assert drawn == pytest.approx(BLUE_CIRCLE, abs=3), "the box arrives in pixels of the image, where it was drawn"
    # a referring question about the same box, then a second chat turn
    assert run(page, "Chat", "What is <box1>?").startswith("done: ")
    assert run(page, "Chat", "[grounding]What else is in the image?").startswith("done: ")
    assert page.locator("#groma-answer .groma-user").all_inner_texts() == [
        "you: What is <box1>?",
        "you: [grounding]What else is in the image?",
    ]
    assert [t["user"] for t in answer_json(page)["turns"]][0] == "What is <roi><refer_box></roi><refer_feat>?"


def _bomb() -> bytes:
    """A small PNG whose header claims 30000 x 30000 pixels."""
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    ihdr = bytearray(data[12:29])
    ihdr[4:12] = struct.pack(">II", 30000, 30000)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    return bytes(data)


def test_bad_files_and_questions_give_a_message_and_the_page_keeps_working(page, tmp_path):
    data = EXAMPLE.read_bytes()
    (tmp_path / "corrupt.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "notes.txt").write_text("not a picture\n" * 20)
    (tmp_path / "bomb.png").write_bytes(_bomb())
    expected = {
        "corrupt.png": "Error: corrupt.png: the image data is truncated or damaged",
        "notes.txt": "Error: notes.txt: not an image",
        "bomb.png": "Error: bomb.png: image is 900,000,000 pixels, more than the limit of 40,000,000 pixels",
    }
    for name, message in expected.items():
        upload(page, tmp_path / name)
        assert wait_status(page, message).startswith(message), status(page)
    assert run(page, "Grounded caption") == "Error: no image: upload one or click an example first"
    upload(page, EXAMPLE)
    wait_status(page, "pixels")
    assert run(page, "Locate", "   ").startswith("Error: Locate: the question is empty")
    assert run(page, "Ask about drawn boxes").startswith("Error: Ask about drawn boxes: no box drawn")
    assert run(page, "Grounded caption").startswith("done: ")  # and the page still answers
