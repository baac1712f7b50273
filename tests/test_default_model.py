"""The embedded default model: shipped in the package, loaded with no arguments, used by the CLI when no --model is
given, and measured on held-out shapes images drawn with a seed the training data did not use."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import groma_core
from groma_core.api import DEFAULT_MODEL
from groma_core.boxes import box_iou, from_input_frame
from groma_core.data.shapes import PALETTE, SHAPES, ShapesConfig, write_shapes_dataset
from groma_core.evaluation.harness import DetectionTask, GroundedCaptionTask, RecTask, RegionCaptionTask, evaluate
from groma_core.images import load_image
from groma_core.inference import Groma
from groma_core.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "images" / "shapes.png"
CAPTION = "[grounding]Give me a concise description of the image."
HELD_OUT_SEED = 12345  # the shipped model was trained on seed 1


@pytest.fixture(scope="module")
def model():
    return groma_core.load()


@pytest.fixture(scope="module")
def held_out(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("heldout") / "shapes"
    write_shapes_dataset(out, ShapesConfig(images=100, seed=HELD_OUT_SEED, val_fraction=0.0, rec_per_image=1))
    return out


def test_the_default_model_ships_inside_the_package_and_is_small():
    files = {p.relative_to(DEFAULT_MODEL).as_posix(): p for p in DEFAULT_MODEL.rglob("*") if p.is_file()}
    assert {"recipe.yaml", "model.safetensors", "tokenizer/tokenizer.model"} <= set(files)
    assert sum(p.stat().st_size for p in files.values()) <= 25 * 2**20
    recipe = load_recipe(DEFAULT_MODEL / "recipe.yaml")  # validates, tokenizer path relative to the folder
    assert recipe.core.weights == "model.safetensors"
    assert recipe.stages["language_backbone"].options.tokenizer == "tokenizer"
    # that a wheel carries the folder is checked by installing one: tests/test_wheel_install.py


def test_load_with_no_argument_is_the_default_model(model):
    assert model.recipe.core.name == "shapes-tiny"
    assert not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())  # stored in float16, run in the recipe's dtype
    answer = Groma(model).caption(str(EXAMPLE))
    assert answer.text.strip()
    assert answer.regions.shape[0] > 0 and answer.phrases  # grounded: phrases with boxes among the regions
    assert all(0.0 <= v <= 1.0 for p in answer.phrases for b in p.boxes for v in b)


@torch.no_grad()
def selected_regions(model, path: Path) -> torch.Tensor:
    """The regions the language model sees for an image (normalized xyxy in the image, whatever the encoder's input
    frame), without generating anything."""
    image = load_image(path)
    pixels = model.image_tokenizer.preprocess([image])
    features = model.encode_images(pixels, [image])
    boxes = model.select(model.region_proposer(features)).boxes[0]
    return from_input_frame(boxes, model.image_tokenizer.input_frame(*image.size))


def test_the_selected_regions_cover_the_held_out_shapes(model, held_out):
    scenes = json.loads((held_out / "annotations" / "scenes_train.json").read_text(encoding="utf-8"))["images"]
    found = total = 0
    for scene in scenes[:40]:
        regions = selected_regions(model, held_out / "images" / scene["file_name"])
        w, h = scene["width"], scene["height"]
        gt = torch.tensor(
            [[x / w, y / h, (x + bw) / w, (y + bh) / h] for x, y, bw, bh in (o["bbox"] for o in scene["objects"])]
        )
        found += int((box_iou(gt, regions).max(dim=1).values > 0.5).sum())
        total += len(gt)
    assert found / total >= 0.85, f"{found} of {total} shapes have a region with IoU > 0.5"


@pytest.fixture(scope="module")
def rec_summary(model, held_out, tmp_path_factory):
    task = RecTask(held_out / "annotations" / "rec_train.json", held_out / "images")
    return evaluate(task, model, tmp_path_factory.mktemp("rec"), progress=False)


def test_rec_on_held_out_images_finds_the_expression_s_shape(rec_summary):
    """Every expression answered with a box, and most of them with the right one: the floor is set below the shipped
    model's 0.87 on these 100 expressions (0.829 on the 1,312 of benchmarks/README.md), to allow for small numerical
    differences between machines."""
    assert rec_summary["num_samples"] == 100
    assert rec_summary["metrics"]["no_box_rate"] <= 0.05
    assert rec_summary["metrics"]["accuracy"] >= 0.75, rec_summary["metrics"]


def test_region_captions_of_held_out_boxes_name_colour_and_shape(model, held_out, tmp_path):
    """A user box on a held-out shape is captioned with that shape's colour and shape (the caption's first colour word
    and first shape word, as ``benchmarks/default_model.py`` scores it): 60 boxes, the floor set below the shipped
    model's 55 of 60 here (0.934 on the 500 held-out regions of benchmarks/README.md), to allow for small numerical
    differences between machines."""
    scenes = json.loads((held_out / "annotations" / "scenes_train.json").read_text(encoding="utf-8"))["images"]
    objects = {str(o["id"]): o for scene in scenes for o in scene["objects"]}
    task = RegionCaptionTask(held_out / "annotations" / "region_captions_train.json", held_out / "images")
    summary = evaluate(task, model, tmp_path, progress=False, limit=60)
    assert summary["num_samples"] == 60
    named = 0
    for line in (tmp_path / "predictions.jsonl").read_text(encoding="utf-8").splitlines():
        prediction = json.loads(line)
        words = prediction["caption"].lower().replace(",", " ").split()
        colour = next((w for w in words if w in PALETTE), None)
        shape = next((w for w in words if w in SHAPES), None)
        shown = objects[prediction["id"]]
        named += (colour, shape) == (shown["colour"], shown["shape"])
    assert named / 60 >= 0.75, f"{named} of 60 region captions name their box's colour and shape"


@pytest.fixture(scope="module")
def grounded_summary(model, held_out, tmp_path_factory):
    """Grounded captions of 40 held-out images, scored as ``benchmarks/default_model.py`` scores them: a phrase is
    right when it names the colour and shape of a ground-truth shape its box overlaps at IoU >= 0.5 (size words
    left out of the match, as the references use them inconsistently)."""
    task = GroundedCaptionTask(
        held_out / "annotations" / "flickr_train.json", held_out / "images", ignore_words=("small", "large")
    )
    return evaluate(task, model, tmp_path_factory.mktemp("grounded"), progress=False, limit=40)


def test_grounded_captions_of_held_out_images_reach_their_floor(grounded_summary):
    """The captions ground phrases on the shapes: precision and recall each above a floor set below what the
    shipped model measures on these 40 images (0.752 and 0.651; 0.797 and 0.653 on the 500 of benchmarks/README.md),
    to allow for small numerical differences between machines."""
    metrics = grounded_summary["metrics"]
    assert grounded_summary["num_samples"] == 40 and metrics["predicted_phrases"] >= 40, metrics
    assert metrics["phrase_precision"] >= 0.65 and metrics["phrase_recall"] >= 0.55, metrics


@pytest.mark.xfail(
    strict=True,
    reason="issue 14, open: the shipped CPU model reaches REC 0.829 and grounded-caption precision / recall 0.80 / "
    "0.65 on 500 held-out shapes (0.87 and 0.75 here; targets 0.85 and 0.90 here, 0.90 and 0.90 on 500 images): a "
    "caption's phrases still misname some shapes and leave a third of them out (benchmarks/README.md, sessions 13-25)",
)
def test_rec_and_grounded_captions_on_held_out_images_reach_the_target(rec_summary, grounded_summary):
    assert rec_summary["metrics"]["accuracy"] >= 0.85
    assert grounded_summary["metrics"]["phrase_precision"] >= 0.90


def test_groma_ground_without_a_model_uses_the_default(tmp_path):
    out = tmp_path / "annotated.png"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    res = subprocess.run(
        [sys.executable, "-m", "groma_core.cli", "ground", str(EXAMPLE), CAPTION, "--out", str(out), "--json"],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    record = data[0] if isinstance(data, list) else data
    assert record["text"].strip()
    assert out.is_file() and out.stat().st_size > 0
    recipe = yaml.safe_load((DEFAULT_MODEL / "recipe.yaml").read_text(encoding="utf-8"))
    assert recipe["name"] == "shapes-tiny"


def test_detection_on_held_out_images_reaches_its_floors(model, held_out, tmp_path):
    """Each detection figure against its own floor, set below what the shipped model measures on 500 held-out
    images (benchmarks/README.md) to allow for the 40 images here."""
    task = DetectionTask(held_out / "annotations" / "detection_train.json", held_out / "images")
    summary = evaluate(task, model, tmp_path / "det", progress=False, limit=40)
    assert summary["num_samples"] == 40
    metrics = summary["metrics"]
    assert metrics["AP50"] >= 0.75 and metrics["AR@100"] >= 0.55 and metrics["AP"] >= 0.35, metrics


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_finds_the_same_regions(model, dtype):
    """In bfloat16 / float16 the proposer's boxes stay finite (CPU grid_sample in half precision once gave NaN for
    every proposal) and the selected regions are those of float32 (IoU > 0.8 each; half precision moves a box by a
    few pixels at most)."""
    half = groma_core.load(dtype=dtype)
    full, low = selected_regions(model, EXAMPLE), selected_regions(half, EXAMPLE).float()
    assert torch.isfinite(low).all() and low.shape[0] > 0
    assert (box_iou(full, low).max(dim=1).values > 0.8).float().mean() >= 0.8
