"""`groma demo` without a browser: the page's handlers on the embedded model (real answers), the batching of several
users' requests, bad input, and the command's start-up errors (port in use, a model that does not load)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from PIL import Image

import groma_core
from groma_core.demo import BOXES, CAPTION, CHAT, LOCATE, DemoApp, PageState, drawn_boxes, with_box_references
from groma_core.errors import InputError
from groma_core.visualize import PALETTE

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "images" / "shapes.png"
BLUE_CIRCLE = (40, 55, 165, 175)  # pixels of examples/images/shapes.png around its blue circle


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    return DemoApp(groma_core.load(), out_dir=tmp_path_factory.mktemp("answers"))


def loaded(app: DemoApp) -> PageState:
    state, message = app.load(str(EXAMPLE), None)
    assert message.startswith("shapes.png: 512x384 pixels")
    return state


def ask(app, state, task, question="", boxes=(), tokens=24):
    annotation = {"boxes": [dict(zip(("xmin", "ymin", "xmax", "ymax"), b)) for b in boxes]}
    return app.run(state, annotation, task, question, tokens, False, 1.0, 1.0)


def test_grounded_caption_colours_each_phrase_like_its_box(app):
    shown, status = ask(app, loaded(app), CAPTION, tokens=48)  # its caption names the background first
    answer = shown.record["answers"][0]
    assert answer["phrases"], "the embedded model grounds phrases in its caption of the example"
    assert status == f"done: {len(answer['phrases'])} grounded phrase(s)"
    assert shown.html.count('class="groma-phrase"') == len(answer["phrases"])
    assert "border-bottom:3px solid #e6194b" in shown.html  # the first phrase in the first box colour (230, 25, 75)
    on_top = {tuple(p["boxes_px"][0]): i for i, p in enumerate(answer["phrases"])}  # phrases sharing a box: last
    for (x1, y1, x2, _), i in on_top.items():
        colour = PALETTE[i % len(PALETTE)]
        assert shown.picture.getpixel((round((x1 + x2) / 2), round(y1) + 1)) == colour, "box drawn in its colour"
        assert "border-bottom:3px solid #{:02x}{:02x}{:02x}".format(*colour) in shown.html, "phrase in that colour"
    saved = json.loads(Path(shown.record["_file"]).read_text())
    assert saved["task"] == CAPTION and saved["answers"][0]["text"] == answer["text"]


def test_drawn_boxes_are_captioned_one_by_one_and_in_their_colours(app):
    other = (300, 60, 460, 200)
    shown, status = ask(app, loaded(app), BOXES, boxes=[BLUE_CIRCLE, other])
    assert status == "done: 0 grounded phrase(s), 2 drawn box(es)"
    assert [a["label"] for a in shown.record["answers"]] == ["box 1", "box 2"]
    assert shown.record["drawn_boxes_px"] == [list(map(float, BLUE_CIRCLE)), list(map(float, other))]
    assert all(a["text"] for a in shown.record["answers"])
    assert shown.picture.getpixel((100, BLUE_CIRCLE[1] + 1)) == (230, 25, 75)
    assert shown.picture.getpixel((380, other[1] + 1)) == (60, 180, 75)


def test_chat_keeps_turns_and_refers_to_drawn_boxes(app):
    state = loaded(app)
    ask(app, state, CHAT, "What is <box1>?", boxes=[BLUE_CIRCLE])
    shown, _ = ask(app, state, CHAT, "[grounding]And what else is in the image?", boxes=[BLUE_CIRCLE])
    assert [t["user"] for t in shown.record["turns"]] == [
        "What is <roi><refer_box></roi><refer_feat>?",
        "[grounding]And what else is in the image?",
    ]
    assert shown.html.count('class="groma-user"') == 2
    assert state.chat.boxes_px == [tuple(map(float, BLUE_CIRCLE))]


def test_locate_names_the_phrase(app):
    shown, _ = ask(app, loaded(app), LOCATE, "the blue circle")
    assert shown.record["prompt"] == "Locate <p>the blue circle</p> in the image."
    assert shown.html.startswith('<p class="groma-answer"><b>the blue circle</b>: ')


@pytest.mark.parametrize(
    ("task", "question", "boxes", "message"),
    [
        (LOCATE, "  ", [], "Locate: the question is empty"),
        (CHAT, "", [], "Chat: the message is empty"),
        (BOXES, "", [], "Ask about drawn boxes: no box drawn"),
        (BOXES, "", [(50, 50, 50, 90)], "box 1 (50, 50, 50, 90) has zero size"),
        (BOXES, "", [(400, 300, 600, 380)], "box 1 (400, 300, 600, 380) lies outside the image (512x384 pixels)"),
        (BOXES, "What is <box2>?", [(10, 10, 50, 50)], "refers to <box2> but 1 box(es) are drawn"),
        (BOXES, "What is it?", [(10, 10, 50, 50), (60, 60, 90, 90)], "say which box"),
        (CAPTION, "x" * 3000, [], "the question is 3000 characters long"),
    ],
)
def test_bad_requests_say_what_to_change(app, task, question, boxes, message):
    with pytest.raises(InputError) as err:
        ask(app, loaded(app), task, question, boxes)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_no_image_yet(app):
    with pytest.raises(InputError, match="no image: upload one or click an example first"):
        ask(app, PageState(), CAPTION)


def test_bad_uploads_name_the_file_and_the_problem(app, tmp_path):
    data = EXAMPLE.read_bytes()
    (tmp_path / "half.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "notes.txt").write_text("not a picture\n" * 20)
    Image.new("RGB", (9000, 5000)).save(tmp_path / "huge.png")  # 45 MP: over the page's 40 MP limit
    cases = {
        "half.png": "half.png: the image data is truncated or damaged",
        "notes.txt": "notes.txt: not an image",
        "huge.png": "huge.png: image is 9000x5000 = 45,000,000 pixels, more than the limit of 40,000,000 pixels",
    }
    for name, message in cases.items():
        with pytest.raises(InputError) as err:
            app.load(str(tmp_path / name), None)
        assert str(err.value).startswith(message), str(err.value)
    assert "--max-image-pixels" in str(err.value)


def test_drawn_boxes_are_ordered_and_clipped_to_the_image():
    annotation = {
        "boxes": [
            {"xmin": 30, "ymin": 40, "xmax": 10, "ymax": 20},
            {"xmin": -0.4, "ymin": 0, "xmax": 100.3, "ymax": 50},
        ]
    }
    boxes = drawn_boxes(annotation, (100, 50))
    assert boxes == [(10.0, 20.0, 30.0, 40.0), (0.0, 0.0, 100.0, 50.0)]
    assert with_box_references("<box> and <box2>", boxes) == "<10.0,20.0,30.0,40.0> and <0.0,0.0,100.0,50.0>"


def test_several_users_share_batched_generations(app, tmp_path):
    """Six users at once, each with its own picture: every one gets the answer about its picture, and the six are
    answered in fewer generations than requests."""
    sizes = [(200 + 10 * i, 150 + 7 * i) for i in range(6)]
    states = []
    for i, size in enumerate(sizes):
        Image.open(EXAMPLE).resize(size).save(tmp_path / f"user{i}.png")
        states.append(app.load(str(tmp_path / f"user{i}.png"), None)[0])
    before = len(app.batcher.batches)
    records: list = [None] * 6
    barrier = threading.Barrier(6)

    def user(i):
        barrier.wait()
        records[i] = ask(app, states[i], CAPTION)[0].record

    threads = [threading.Thread(target=user, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r["image"] for r in records] == [f"user{i}.png" for i in range(6)]
    assert [tuple(r["answers"][0]["image_size"]) for r in records] == sizes
    assert all(r["answers"][0]["text"] for r in records)
    assert sum(app.batcher.batches[before:]) == 6
    assert len(app.batcher.batches[before:]) < 6


# ------------------------------------------------------------------------------------------------- the command

needs_gradio = pytest.mark.skipif(
    any(__import__("importlib").util.find_spec(m) is None for m in ("gradio", "gradio_image_annotation")),
    reason='the demo extra is not installed (pip install "groma-core[demo]")',
)


def groma(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    return subprocess.run(
        [sys.executable, "-m", "groma_core.cli", *args], capture_output=True, text=True, env=env, timeout=timeout
    )


@needs_gradio
def test_port_in_use_is_one_line_naming_the_port():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        res = groma("demo", "--port", str(port))
    assert res.returncode == 1
    assert res.stderr == f"groma: error: port {port} on 127.0.0.1 is already in use; choose another with --port\n"


@needs_gradio
def test_a_model_that_does_not_load_stops_before_the_page(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    res = groma("demo", "--model", str(tmp_path / "nothing-here"), "--port", str(port))
    assert res.returncode == 1
    assert res.stderr.startswith("groma: error: ") and res.stderr.count("\n") == 1
    assert "nothing-here" in res.stderr
    assert "Running on" not in res.stdout + res.stderr

