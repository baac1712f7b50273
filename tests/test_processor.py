"""The processor formats and parses, the model computes (issue 17 item 5): a request becomes the prompt ids of the
model's template, its pixels and its user boxes in the input frame; generated ids become the answer with boxes in
the original image's pixels; the task API is exactly processor -> generate -> processor."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

import groma_core
from groma_core.boxes import from_input_frame
from groma_core.inference import CAPTION_PROMPT, REGION_PROMPT, Groma
from groma_core.processor import GromaProcessor, Request
from groma_core.prompt import get_template

EXAMPLE = Path(__file__).parents[1] / "examples" / "images" / "shapes.png"


@pytest.fixture(scope="module")
def model():
    return groma_core.load()  # the embedded model: letterboxed input, so the frames are not the identity


def test_a_request_becomes_the_templates_ids_the_pixels_and_boxes_in_the_input_frame(model):
    image = Image.open(EXAMPLE).convert("RGB")
    box = (40.0, 50.0, 160.0, 180.0)
    batch = model.processor([Request(image, [(REGION_PROMPT, None)], [box])])
    assert isinstance(model.processor, GromaProcessor)
    assert batch.input_ids == [model.tokenizer.encode(get_template(model.template).render([(REGION_PROMPT, None)]))]
    assert torch.equal(batch.pixel_values, model.image_tokenizer.preprocess([image]))
    (frame,) = batch.frames
    assert frame[0] < 1.0 or frame[1] < 1.0  # letterboxed: the image fills one side only
    back = from_input_frame(batch.refer_boxes[0], frame)[0] * torch.tensor([image.width, image.height] * 2)
    assert torch.allclose(back, torch.tensor(box), atol=1e-3)  # float32 round trip of pixel coordinates


def test_the_task_api_is_the_processor_around_generate(model):
    image = Image.open(EXAMPLE).convert("RGB")
    requests = [Request(image, [(CAPTION_PROMPT, None)]), Request(image, [(REGION_PROMPT, None)], [(40, 50, 160, 180)])]
    processor = model.processor
    batch = processor(requests).to(model.device, model.input_dtype)
    # the original images go along: the embedded model's region encoder also reads a crop of each region from them
    out = model.generate(
        batch.pixel_values, batch.input_ids, refer_boxes=batch.refer_boxes, images=batch.images, max_new_tokens=24
    )
    by_hand = processor.post_process(out, batch)
    via_api = Groma(model).answer(requests, max_new_tokens=24)
    assert [a.raw_text for a in by_hand] == [a.raw_text for a in via_api]
    assert [[p.boxes_px for p in a.phrases] for a in by_hand] == [[p.boxes_px for p in a.phrases] for a in via_api]
    # the parsed boxes are in the original image's pixels
    for answer in by_hand:
        for phrase in answer.phrases:
            for x1, y1, x2, y2 in phrase.boxes_px:
                assert 0 <= x1 <= x2 <= image.width and 0 <= y1 <= y2 <= image.height


def test_groma_is_the_task_api_apart_from_the_model_that_computes(model):
    groma = groma_core.Groma.load()  # the embedded model, as the README's Python section starts
    assert isinstance(groma.model, torch.nn.Module) and isinstance(groma.processor, GromaProcessor)
    assert groma.recipe is groma.model.recipe and groma.recipe.core.name == "shapes-tiny"
    for task in ("answer", "caption", "locate", "describe_region", "chat"):
        assert callable(getattr(groma, task)) and not hasattr(groma.model, task), task
    # a model loaded or trained elsewhere gets the same answers through Groma(model)
    mine = Groma(model).locate(str(EXAMPLE), "the blue circle", max_new_tokens=16)
    assert mine.raw_text == groma.locate(str(EXAMPLE), "the blue circle", max_new_tokens=16).raw_text
    assert "Groma('shapes-tiny'" in repr(groma)


def test_training_conversations_supervise_only_the_answers(model):
    ids, labels = model.processor.training_conversation([("What is this?", "a red circle")], template="llava")
    supervised = [t for t, lab in zip(ids, labels) if lab != -100]
    assert model.tokenizer.decode(supervised).strip().startswith("a red circle")
    assert supervised[-1] == model.tokenizer.eos_id  # the answer's </s> ends the turn and is learned
