"""``groma demo``: a web page (gradio) to try a model: upload an image or pick an example, draw boxes with the
mouse, ask, and see the grounded answer drawn on the picture.

The page logic (reading uploads, checking boxes, turning answers into coloured HTML and JSON, batching requests
from several users into one generation) lives here without gradio, so that it can be tested on its own;
:func:`build_demo` and :func:`serve` import gradio, which comes with ``pip install "groma-core[demo]"``. Boxes are
drawn with the ``image_annotator`` component of ``gradio-image-annotation`` (gradio itself has no box input).
"""

from __future__ import annotations

import html
import json
import logging
import os
import queue
import socket
import tempfile
import threading
import uuid
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from groma_core.errors import GromaError, InputError, one_line
from groma_core.inference import REFER, ChatSession, Groma, Request, boxes_from_text
from groma_core.types import GroundedAnswer, GroundedPhrase
from groma_core.visualize import PALETTE, draw_answer

log = logging.getLogger("groma_core.demo")

TASKS = ("Grounded caption", "Locate", "Ask about drawn boxes", "Chat")
CAPTION, LOCATE, BOXES, CHAT = TASKS
DEFAULT_MAX_PIXELS = 40_000_000
"""Largest upload the page reads (width x height): 40 megapixels, about a 7,700 x 5,200 photo."""
MAX_UPLOAD = "30mb"
MAX_QUESTION = 2000
EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "examples" / "images"


def install_hint() -> str:
    return 'the web demo needs gradio: pip install "groma-core[demo]"'


# ---------------------------------------------------------------------------------------------------------- inputs


def read_upload(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """The uploaded file as an RGB image, or an :class:`InputError` naming the file and what is wrong with it."""
    from groma_core.images import load_image

    name = Path(path).name
    try:
        return load_image(path, max_pixels=max_pixels, name=name)
    except InputError as exc:
        text = str(exc)
        if "; if you trust the file" in text:  # the library's advice names its API; the page's limit is a flag
            text = text.split("; if you trust the file")[0] + " (the server sets it with groma demo --max-image-pixels)"
            raise InputError(text) from exc
        raise


def drawn_boxes(annotation: dict | None, size: tuple[int, int]) -> list[tuple[float, float, float, float]]:
    """The boxes drawn on the picture (the annotator's value) in pixels, checked against the image ``size``: each
    box must have a width and a height of at least one pixel and lie inside the image."""
    width, height = size
    boxes = []
    for i, box in enumerate((annotation or {}).get("boxes") or [], 1):
        try:
            x1, y1, x2, y2 = (float(box[k]) for k in ("xmin", "ymin", "xmax", "ymax"))
        except (KeyError, TypeError, ValueError):
            got = one_line(repr(box), 80)
            raise InputError(f"box {i}: expected numbers xmin, ymin, xmax, ymax, got {got}") from None
        x1, x2 = sorted((x1, x2))
        y1, y2 = sorted((y1, y2))
        where = f"box {i} ({x1:g}, {y1:g}, {x2:g}, {y2:g})"
        if x2 - x1 < 1 or y2 - y1 < 1:
            raise InputError(f"{where} has zero size: drag with the mouse to draw a box")
        if x1 < -0.5 or y1 < -0.5 or x2 > width + 0.5 or y2 > height + 0.5:
            raise InputError(f"{where} lies outside the image ({width}x{height} pixels)")
        boxes.append((max(0.0, x1), max(0.0, y1), min(float(width), x2), min(float(height), y2)))
    return boxes


def with_box_references(question: str, boxes: Sequence[Sequence[float]]) -> str:
    """The question with ``<box1>``, ``<box2>``... (``<box>``: box 1) replaced by the drawn boxes written as
    ``<x1,y1,x2,y2>`` in pixels, the form :meth:`GromaModel.chat` reads."""
    import re

    def replace(match: re.Match) -> str:
        k = int(match.group(1) or 1)
        if not 1 <= k <= len(boxes):
            drawn = f"{len(boxes)} box(es) are drawn" if boxes else "no box is drawn"
            raise InputError(f"the question refers to {match.group(0)} but {drawn}")
        return "<" + ",".join(f"{v:.1f}" for v in boxes[k - 1]) + ">"

    return re.sub(r"<box(\d*)>", replace, question)


# --------------------------------------------------------------------------------------------------------- outputs


def colour_hex(index: int) -> str:
    r, g, b = PALETTE[index % len(PALETTE)]
    return f"#{r:02x}{g:02x}{b:02x}"


def answer_html(text: str, phrases: Sequence[GroundedPhrase], first_colour: int = 0) -> str:
    """The answer text as HTML, each grounded phrase (its span in ``text``) in the colour of its box on the picture
    (phrase i has colour ``first_colour + i``, as :func:`groma_core.visualize.draw_answer` draws them)."""
    out, pos = [], 0
    for i, phrase in sorted(enumerate(phrases), key=lambda p: p[1].span[0]):
        start, end = phrase.span
        if start < pos or end <= start:  # overlapping or empty span: colour what is left of it
            start = max(start, pos)
            if end <= start:
                continue
        out.append(html.escape(text[pos:start]))
        colour = colour_hex(first_colour + i)
        regions = " ".join(f"r{k}" for k in phrase.region_ids)
        out.append(
            f'<span class="groma-phrase" data-regions="{regions}" style="border-bottom:3px solid {colour};'
            f'background:{colour}33;border-radius:3px;padding:0 2px">{html.escape(text[start:end])}</span>'
        )
        pos = end
    out.append(html.escape(text[pos:]))
    return "".join(out)


@dataclass
class Shown:
    """What a request puts on the page: the picture with its boxes, the answer as HTML and the JSON record."""

    picture: Image.Image
    html: str
    record: dict[str, Any]


def box_phrase(k: int, box: Sequence[float], size: tuple[int, int]) -> GroundedPhrase:
    """A drawn box as a phrase "box k" so that it is drawn (and coloured) like the answer's phrases."""
    w, h = size
    norm = (box[0] / w, box[1] / h, box[2] / w, box[3] / h)
    return GroundedPhrase(f"box {k}", (0, 0), [k - 1], [norm], [tuple(box)])


def show_answers(
    image: Image.Image, items: Sequence[tuple[str, GroundedAnswer]], boxes: Sequence[Sequence[float]] = ()
) -> tuple[Image.Image, str]:
    """Draw the drawn ``boxes`` and every grounded phrase of the answers on ``image``; HTML lines "label: answer"
    whose phrases carry their box's colour."""
    phrases = [box_phrase(k, b, image.size) for k, b in enumerate(boxes, 1)]
    lines = []
    for label, answer in items:
        text = answer.text or answer.raw_text
        body = answer_html(text, answer.phrases, first_colour=len(phrases))
        if label.startswith("box "):
            colour = colour_hex(int(label.split()[1]) - 1)
            label_html = f'<b style="color:{colour}">{html.escape(label)}</b>: '
        else:
            label_html = f"<b>{html.escape(label)}</b>: " if label else ""
        lines.append(f'<p class="groma-answer">{label_html}{body}</p>')
        phrases.extend(answer.phrases)
    combined = GroundedAnswer(raw_text="", text="", phrases=phrases)
    return draw_answer(image, combined), "\n".join(lines)


def answer_record(task: str, image_name: str, prompt: str, answers: Sequence[tuple[str, GroundedAnswer]]) -> dict:
    return {
        "task": task,
        "image": image_name,
        "prompt": prompt,
        "answers": [{"label": label, **answer.to_dict()} for label, answer in answers],
    }


# -------------------------------------------------------------------------------------------------------- batching


@dataclass
class _Job:
    requests: list[Request]
    settings: dict[str, Any]
    future: Future = field(default_factory=Future)


class Batcher:
    """Runs the requests of all users on one model thread, several users' requests with the same generation
    settings in one batched generation (up to ``max_batch`` requests), so that waiting users share the work."""

    def __init__(self, groma: Groma, max_batch: int = 8):
        self.groma = groma
        self.max_batch = max_batch
        self._jobs: queue.Queue[_Job] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="groma-demo-model", daemon=True)
        self._thread.start()
        self.batches: list[int] = []  # requests per generation, for the load test's report

    def answer(self, requests: list[Request], **settings: Any) -> list[GroundedAnswer]:
        job = _Job(list(requests), settings)
        self._jobs.put(job)
        return job.future.result()

    def _loop(self) -> None:
        import torch

        while True:
            jobs = [self._jobs.get()]
            while True:  # take every job waiting now
                try:
                    jobs.append(self._jobs.get_nowait())
                except queue.Empty:
                    break
            groups: dict[str, list[_Job]] = {}
            for job in jobs:
                groups.setdefault(json.dumps(job.settings, sort_keys=True), []).append(job)
            for group in groups.values():
                while group:
                    take, size = [], 0
                    while group and (not take or size + len(group[0].requests) <= self.max_batch):
                        size += len(group[0].requests)
                        take.append(group.pop(0))
                    with torch.inference_mode():
                        self._run(take)

    def _run(self, jobs: list[_Job]) -> None:
        requests = [r for job in jobs for r in job.requests]
        try:
            answers = self.groma.answer(requests, **jobs[0].settings)
            self.batches.append(len(requests))
        except Exception as exc:  # noqa: BLE001 - one user's bad request must not fail the others': retry alone
            if len(jobs) == 1:
                jobs[0].future.set_exception(exc)
                return
            for job in jobs:
                self._run([job])
            return
        for job in jobs:
            job.future.set_result(answers[: len(job.requests)])
            answers = answers[len(job.requests) :]


# ------------------------------------------------------------------------------------------------------- the page


@dataclass
class PageState:
    """One visitor's state: the image (already read and checked), its name and the chat so far."""

    image: Image.Image | None = None
    name: str = ""
    chat: ChatSession | None = None
    chat_html: list[str] = field(default_factory=list)


class DemoApp:
    """The handlers of the page, without gradio: each returns what the page shows."""

    def __init__(
        self,
        model,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        max_batch: int = 8,
        out_dir: Path | None = None,
        max_new_tokens: int | None = None,
    ):
        self.groma = model if isinstance(model, Groma) else Groma(model)
        self.model = self.groma.model
        self.max_pixels = max_pixels
        self.batcher = Batcher(self.groma, max_batch)
        self.out_dir = Path(out_dir or tempfile.mkdtemp(prefix="groma-demo-"))
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.default_max_new_tokens = max_new_tokens or self.groma.generation_settings().get("max_new_tokens", 256)

    def load(self, path: str | None, state: PageState | None) -> tuple[PageState, str]:
        """Read an uploaded (or example) file into the visitor's state; the message says what went wrong."""
        state = PageState()
        if not path:
            return state, ""
        image = read_upload(path, self.max_pixels)
        state.image, state.name = image, Path(path).name
        size = f"{image.width}x{image.height} pixels"
        return state, f"{state.name}: {size}. Draw boxes on it with the mouse if the task needs them."

    def run(
        self,
        state: PageState,
        annotation: dict | None,
        task: str,
        question: str,
        max_new_tokens: int,
        do_sample: bool,
        temperature: float,
        top_p: float,
    ) -> tuple[Shown, str]:
        """Answer one request of the page; an :class:`InputError` says what the visitor must change."""
        if state is None or state.image is None:
            raise InputError("no image: upload one or click an example first")
        question = (question or "").strip()
        if len(question) > MAX_QUESTION:
            raise InputError(f"the question is {len(question)} characters long; at most {MAX_QUESTION} are read")
        if task not in TASKS:
            raise InputError(f"unknown task {one_line(repr(task), 60)}; choose one of {', '.join(TASKS)}")
        image = state.image
        boxes = drawn_boxes(annotation, image.size)
        settings = {
            "max_new_tokens": int(max_new_tokens or self.default_max_new_tokens),
            "do_sample": bool(do_sample),
            "temperature": float(temperature) if do_sample else None,
            "top_p": float(top_p) if do_sample else None,
        }
        shown_boxes: list = []
        if task == CAPTION:
            from groma_core.inference import CAPTION_PROMPT

            prompt = CAPTION_PROMPT
            items = [("", *self.batcher.answer([Request(image, [(prompt, None)])], **settings))]
        elif task == LOCATE:
            from groma_core.inference import LOCATE_PROMPT

            if not question:
                raise InputError("Locate: the question is empty; write the phrase to find, e.g. 'the red circle'")
            if "<" in question or ">" in question:
                raise InputError("Locate: write a phrase without < or > (boxes are not used by this task)")
            prompt = LOCATE_PROMPT.format(question)
            items = [(question, *self.batcher.answer([Request(image, [(prompt, None)])], **settings))]
        elif task == BOXES:
            if not boxes:
                raise InputError("Ask about drawn boxes: no box drawn; drag with the mouse on the picture to draw one")
            shown_boxes = boxes
            if not question:  # a caption of each box, all in one batch
                from groma_core.inference import REGION_PROMPT

                prompt = REGION_PROMPT.replace(REFER, "<box>")
                requests = [Request(image, [(REGION_PROMPT, None)], [b]) for b in boxes]
                answers = self.batcher.answer(requests, **settings)
                items = [(f"box {k}", a) for k, a in enumerate(answers, 1)]
            else:
                prompt = question
                if "<box" not in question:
                    if len(boxes) > 1:
                        raise InputError(
                            "Ask about drawn boxes: say which box the question is about with <box1>, <box2>... "
                            "(or leave the question empty for a caption of each box)"
                        )
                    question = "<box1> " + question
                text, refs = boxes_from_text(with_box_references(question, boxes))
                items = [("", *self.batcher.answer([Request(image, [(text, None)], refs)], **settings))]
        else:
            if not question:
                raise InputError("Chat: the message is empty; write a question (boxes: <box1>, <box2>...)")
            prompt = question
            session = state.chat or ChatSession(image)
            text, refs = boxes_from_text(with_box_references(question, boxes))
            all_boxes = session.boxes_px + refs
            (answer,) = self.batcher.answer([Request(image, [*session.turns, (text, None)], all_boxes)], **settings)
            session.turns.append((text, answer.raw_text))
            session.boxes_px = all_boxes
            state.chat = session
            items = [("", answer)]
            shown_boxes = boxes
        picture, body = show_answers(image, items, shown_boxes)
        record = answer_record(task, state.name, prompt, items)
        record["drawn_boxes_px"] = [list(b) for b in boxes]
        if task == CHAT:
            state.chat_html.append(
                f'<p class="groma-user"><b>you</b>: {html.escape(question)}</p>'
                + body.replace('<p class="groma-answer">', '<p class="groma-answer"><b>groma</b>: ', 1)
            )
            body = "\n".join(state.chat_html)
            record["turns"] = [{"user": u, "groma": a} for u, a in session.turns]
        path = self.out_dir / f"answer-{uuid.uuid4().hex[:12]}.json"
        path.write_text(json.dumps(record, indent=1))
        record["_file"] = str(path)
        n = sum(len(a.phrases) for _, a in items)
        status = f"done: {n} grounded phrase(s)" + (f", {len(shown_boxes)} drawn box(es)" if shown_boxes else "")
        return Shown(picture, body, record), status


# --------------------------------------------------------------------------------------------------------- gradio


def _examples() -> list[str]:
    if not EXAMPLES_DIR.is_dir():
        return []
    return [str(p) for p in sorted(EXAMPLES_DIR.glob("*.png")) if "annotated" not in p.name]


def error_message(exc: BaseException) -> str:
    if isinstance(exc, GromaError):
        return one_line(str(exc), 400)
    log.exception("demo: unexpected error")
    return one_line(f"internal error ({type(exc).__name__}: {exc}); the page keeps working, try again", 400)


def build_demo(
    model,
    *,
    title: str = "groma demo",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_batch: int = 8,
    max_new_tokens: int | None = None,
):
    """The gradio page (``gr.Blocks``) serving ``model``."""
    import gradio as gr
    from gradio_image_annotation import image_annotator

    app = DemoApp(model, max_pixels=max_pixels, max_batch=max_batch, max_new_tokens=max_new_tokens)

    def status_md(text: str, error: bool = False) -> str:
        if not text:
            return ""
        return f"**Error:** {html.escape(text)}" if error else html.escape(text)

    def on_upload(path, state):
        # the drop zone is emptied after each file (the picture moves to the canvas), ready for the next one; that
        # change comes back here with no file and leaves everything as it is
        if not path:
            keep = gr.update()
            return state, keep, keep, keep, keep, keep, keep
        try:
            state, message = app.load(path, state)
        except Exception as exc:  # noqa: BLE001 - shown on the page; the app keeps serving
            return PageState(), None, None, status_md(error_message(exc), True), "", None, None
        value = {"image": state.image, "boxes": []}
        return state, None, value, status_md(message), "", None, None

    def on_run(state, annotation, task, question, max_new_tokens, do_sample, temperature, top_p):
        try:
            shown, message = app.run(state, annotation, task, question, max_new_tokens, do_sample, temperature, top_p)
        except Exception as exc:  # noqa: BLE001 - shown on the page; the app keeps serving
            keep = gr.update()
            return state, keep, keep, keep, keep, keep, status_md(error_message(exc), True)
        path = shown.record.pop("_file")
        boxes = shown.record["drawn_boxes_px"]
        canvas_value = gr.update()
        if boxes:  # number the drawn boxes in their colours, as the question refers to them (<box1>, ...)
            canvas_value = {
                "image": state.image,
                "boxes": [
                    dict(zip(("xmin", "ymin", "xmax", "ymax"), b), label=f"box{k + 1}", color=PALETTE[k % len(PALETTE)])
                    for k, b in enumerate(boxes)
                ],
            }
        return state, canvas_value, shown.picture, shown.html, shown.record, path, status_md(message)

    def on_new_chat(state):
        if state is not None:
            state.chat, state.chat_html = None, []
        return state, "", status_md("new chat: the conversation was cleared")

    css = ".groma-phrase{font-weight:600} #groma-status{min-height:1.5em}"
    with gr.Blocks(title=title, analytics_enabled=False) as demo:
        gr.Markdown(
            f"# {html.escape(title)}\nUpload an image or click an example, choose a task and press **Run**. "
            "For *Ask about drawn boxes* and *Chat*, drag on the picture to draw boxes and refer to them as "
            "`<box1>`, `<box2>`... (an empty question asks for a caption of each drawn box)."
        )
        state = gr.State(PageState())
        with gr.Row():
            with gr.Column(scale=1):
                upload = gr.File(label="Upload an image", type="filepath", elem_id="groma-upload")
                examples = _examples()
                if examples:
                    gr.Examples(examples=[[p] for p in examples], inputs=[upload], label="Examples")
                canvas = image_annotator(
                    label="The picture: drag to draw boxes",
                    sources=[],
                    image_type="pil",
                    box_min_size=1,
                    show_download_button=False,
                    show_share_button=False,
                    show_clear_button=False,
                    use_default_label=True,
                    label_list=["box"],
                    label_colors=[(230, 25, 75)],
                    elem_id="groma-canvas",
                )
                task = gr.Radio(list(TASKS), value=CAPTION, label="Task", elem_id="groma-task")
                question = gr.Textbox(
                    label="Phrase, question or chat message",
                    placeholder="Locate: 'the red circle'; boxes: 'What is <box1>?'",
                    lines=2,
                    elem_id="groma-question",
                )
                with gr.Accordion("Generation settings", open=False):
                    max_new_tokens = gr.Slider(
                        1, 1024, value=min(1024, app.default_max_new_tokens), step=1, label="Max new tokens"
                    )
                    do_sample = gr.Checkbox(False, label="Sample (instead of greedy decoding)")
                    temperature = gr.Slider(0.05, 2.0, value=1.0, step=0.05, label="Temperature")
                    top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="Top p")
                with gr.Row():
                    run = gr.Button("Run", variant="primary", elem_id="groma-run")
                    new_chat = gr.Button("New chat", elem_id="groma-new-chat")
                status = gr.Markdown("", elem_id="groma-status")
            with gr.Column(scale=1):
                # PNG: lossless, so thin box lines and mask tints arrive as drawn (gradio's default is WebP)
                picture = gr.Image(
                    label="Grounded answer", type="pil", format="png", interactive=False, elem_id="groma-picture"
                )
                answer = gr.HTML(label="Answer", elem_id="groma-answer")
                with gr.Accordion("Answer JSON", open=False):
                    record = gr.JSON(label="answer.json")
                download = gr.File(label="Download the answer (JSON)", interactive=False, elem_id="groma-json")
        upload.change(
            on_upload, [upload, state], [state, upload, canvas, status, answer, picture, download],
            api_name="load",
            show_progress_on=[canvas],
        )
        run_io = {
            "fn": on_run,
            "inputs": [state, canvas, task, question, max_new_tokens, do_sample, temperature, top_p],
            "outputs": [state, canvas, picture, answer, record, download, status],
            "show_progress_on": [picture],
        }
        run.click(**run_io, api_name="run")
        question.submit(**run_io, api_name=False)
        new_chat.click(on_new_chat, [state], [state, answer, status], api_name=False)
    demo.groma_app = app  # the handlers, for tests and the load test's batching figures
    demo.groma_css = css
    return demo


def port_problem(host: str, port: int) -> str | None:
    """Why the page cannot listen on host:port (in use, not allowed), or None when it can."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError as exc:
            if exc.errno in (98, 48, 10048):  # EADDRINUSE on Linux, macOS, Windows
                return f"port {port} on {host} is already in use; choose another with --port"
            return f"cannot listen on {host}:{port} ({exc.strerror or exc})"
    return None


def serve(
    model,
    host: str = "127.0.0.1",
    port: int = 7860,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    concurrency: int = 8,
    max_new_tokens: int | None = None,
    title: str = "groma demo",
) -> None:
    """Start the page and serve until interrupted. Requests go through gradio's queue; up to ``concurrency`` run at
    once and share batched generations."""
    import gradio as gr

    demo = build_demo(model, title=title, max_pixels=max_pixels, max_batch=concurrency, max_new_tokens=max_new_tokens)
    demo.queue(default_concurrency_limit=concurrency, max_size=256)
    problem = port_problem(host, port)
    if problem:
        raise GromaError(problem)
    examples = [str(EXAMPLES_DIR)] if EXAMPLES_DIR.is_dir() else []
    try:
        demo.launch(
            server_name=host,
            server_port=port,
            max_file_size=MAX_UPLOAD,
            allowed_paths=examples,
            ssr_mode=False,
            share=False,
            show_error=True,
            quiet=False,
            css=demo.groma_css,
            theme=gr.themes.Default(),
        )
    except OSError as exc:
        raise GromaError(f"cannot start the page on {host}:{port}: {one_line(str(exc), 200)}") from exc
