"""Training datasets: the reference's annotation formats (written by the shapes generator) rendered as the engine's
samples with the reference's prompts and label masking; the stage-1 augmentation; stage 1 of the tiny default
pipeline on shapes detection data."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from groma_core import tokens as T
from groma_core.data import FORMAT_FILES, ShapesConfig, write_shapes_dataset
from groma_core.model import IGNORE_INDEX
from groma_core.schema import DatasetSpec, DetectionAugment
from groma_core.training import augment_detection, open_dataset, run_training
from groma_core.training.data import seeded

LM_FORMATS = [f for f in FORMAT_FILES if f != "detection"]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    write_shapes_dataset(out, ShapesConfig(images=8, seed=3, width=(160, 240), height=(120, 200)))
    return out


@pytest.fixture(scope="module")
def model(sp_dir):
    from groma_core.api import build

    overrides = [
        f"language_backbone.tokenizer={sp_dir}",
        "image_tokenizer.input_size=112",
        "region_proposer.frozen=false",
        "region_proposer.num_queries=32",
    ]
    return build("groma-tiny", overrides)


def spec(shapes, fmt: str, template: str = "default", **extra) -> DatasetSpec:
    file = f"{FORMAT_FILES[fmt]}_train"
    return DatasetSpec(
        format=fmt, ann=str(shapes / "annotations" / f"{file}.json"), images=str(shapes / "images"),
        template=template, **extra,
    )  # fmt: skip


def load(shapes, name: str):
    return json.loads((shapes / "annotations" / f"{name}.json").read_text())


def supervised(sample) -> list[int]:
    return [t for t, label in zip(sample["input_ids"], sample["labels"]) if label != IGNORE_INDEX]


def expected_ids(tok, answers: list[str], template: str) -> list[int]:
    """What the labels should cover: each answer's own ids, plus the closing </s> of each turn under llava."""
    ids = []
    for answer in answers:
        ids += tok.encode(answer, add_bos=False) + ([tok.eos_id] if template == "llava" else [])
    return ids


def grounded(phrase: str, n: int) -> str:
    return f"<p>{phrase}</p><roi>{'<ground_box>' * n}</roi>"


def expected_answers(shapes, fmt: str, index: int) -> list[str]:
    """The answer texts of sample ``index``, built straight from the annotation file."""
    if fmt == "rec":
        return ["<roi><ground_box></roi>"]
    if fmt == "grounding":
        ann = load(shapes, "lvis_ground_train")
        counts: dict[tuple[int, int], int] = {}
        for image in ann["images"]:
            for a in ann["annotations"]:
                if a["image_id"] == image["id"]:
                    counts[(image["id"], a["category_id"])] = counts.get((image["id"], a["category_id"]), 0) + 1
        return [f"<roi>{'<ground_box>' * list(counts.values())[index]}</roi>"]
    if fmt == "grounded-caption":
        ann = load(shapes, "flickr_train")
        image = [im for im in ann["images"] if any(a["image_id"] == im["id"] for a in ann["annotations"])][index]
        caption = image["caption"]
        spans: dict[tuple[int, int], int] = {}
        for a in ann["annotations"]:
            if a["image_id"] == image["id"]:
                for s, e in a["tokens_positive"]:
                    spans[(s, e)] = spans.get((s, e), 0) + 1
        text, end = "", 0
        for (s, e), n in sorted(spans.items()):
            text += caption[end:s] + grounded(caption[s:e], n)
            end = e
        return [(text + caption[end:]).strip()]
    if fmt == "region-caption":
        return [load(shapes, "region_captions_train")["annotations"][index]["caption"].strip().lower().capitalize()]
    if fmt == "refcocog-caption":
        return [load(shapes, "rec_train")["images"][index]["caption"].strip().lower().capitalize()]
    if fmt == "conversation":
        turns = load(shapes, "captions_train")[index]["conversations"]
        return [t["value"].replace("\n", " ") for t in turns[1::2]]
    if fmt == "instruct":
        return [t["value"] for t in load(shapes, "instruct_train")[index]["conversation"][1::2]]
    raise AssertionError(fmt)


@pytest.mark.parametrize("template", ["default", "llava"])
@pytest.mark.parametrize("fmt", [f for f in LM_FORMATS if f != "region-caption-multi"])
def test_labels_cover_exactly_the_answers(shapes, model, fmt, template):
    tok = model.tokenizer
    data = open_dataset(spec(shapes, fmt, template), model)
    for index in (0, len(data) - 1):
        with seeded(index):
            sample = data[index]
        answers = expected_answers(shapes, fmt, index)
        got = supervised(sample)
        assert got == expected_ids(tok, answers, template), fmt
        assert tok.decode(got) == tok.decode(expected_ids(tok, answers, template))
        assert len(sample["input_ids"]) == len(sample["labels"])
        assert tok.token_id(T.SEP) not in sample["input_ids"]
        eos = [j for j, t in enumerate(sample["input_ids"]) if t == tok.eos_id]
        if template == "default":
            assert not eos and tok.eos_id not in sample["labels"]  # stage 2 never supervises EOS
        else:
            assert sample["labels"][eos[0]] == IGNORE_INDEX  # the fixed first turn's </s>
            assert [sample["labels"][j] for j in eos[1:]] == [tok.eos_id] * len(answers)
        assert sample["pixel_values"].shape == (3, *model.image_tokenizer.image_size)


def test_prompts_follow_the_reference_formats(shapes, model):
    tok = model.tokenizer
    grounding_id, image_id, region_id = tok.token_id(T.GROUNDING), tok.token_id(T.IMAGE), tok.token_id(T.REGION)
    for fmt in LM_FORMATS:
        data = open_dataset(spec(shapes, fmt, "llava"), model)
        for index in range(len(data)):
            with seeded(index):
                sample = data[index]
            ids = sample["input_ids"]
            assert ids.count(image_id) == 1 and ids.count(region_id) == 1, fmt
            assert ids.index(image_id) < ids.index(region_id) < ids.index(tok.eos_id), fmt  # the fixed first turn
            assert (grounding_id in ids) == (fmt in ("grounded-caption", "instruct")), fmt
            n_ground = len(sample.get("ground_boxes", ()))
            assert ids.count(tok.token_id(T.GROUND_BOX)) == n_ground, fmt
            n_refer = len(sample.get("refer_boxes", ()))
            assert ids.count(tok.token_id(T.REFER_FEAT)) == ids.count(tok.token_id(T.REFER_BOX)) == n_refer, fmt
            for key in ("ground_boxes", "refer_boxes"):
                if key in sample:
                    boxes = sample[key]
                    assert ((boxes >= 0) & (boxes <= 1)).all() and (boxes[:, 2:] > boxes[:, :2]).all()
    rec = load(shapes, "rec_train")
    data = open_dataset(spec(shapes, "rec"), model)
    image = rec["images"][0]
    box = next(a["bbox"] for a in rec["annotations"] if a["image_id"] == image["id"])
    x, y, w, h = box
    want = torch.tensor(
        [[x / image["width"], y / image["height"], (x + w) / image["width"], (y + h) / image["height"]]]
    )
    torch.testing.assert_close(data[0]["ground_boxes"], want)
    assert f"<p> {image['caption']} </p>" in tok.decode(data[0]["input_ids"])


def test_multi_round_region_captions_ask_about_each_kept_region(shapes, model):
    tok = model.tokenizer
    data = open_dataset(spec(shapes, "region-caption-multi", "llava"), model)
    regions = load(shapes, "region_captions_multi_train")
    for index in range(len(data)):
        with seeded(index):
            sample = data[index]
        n = len(sample["refer_boxes"])
        assert 1 <= n <= 10
        assert sample["input_ids"].count(tok.token_id(T.REFER_FEAT)) == n
        assert [sample["labels"][j] for j, t in enumerate(sample["input_ids"]) if t == tok.eos_id][1:] == [
            tok.eos_id
        ] * n
    captions = {a["caption"].strip().lower().capitalize() for a in regions["annotations"]}
    with seeded(0):
        sample = data[0]
    text = tok.decode(supervised(sample))
    assert all(part.strip() in captions for part in text.split("</s>") if part.strip())


def colour_bbox(pixels: np.ndarray, rgb, window) -> tuple[int, int, int, int] | None:
    """The bounding box of the pixels of colour ``rgb`` inside ``window`` (x1, y1, x2, y2), or None."""
    x1, y1, x2, y2 = window
    match = np.abs(pixels[y1:y2, x1:x2] - np.asarray(rgb, dtype=float)).max(-1) < 30
    ys, xs = np.nonzero(match)
    if not len(xs):
        return None
    return x1 + xs.min(), y1 + ys.min(), x1 + xs.max() + 1, y1 + ys.max() + 1


@pytest.mark.parametrize("crop", [True, False], ids=["crop", "whole"])
def test_detection_augmentation_keeps_boxes_on_their_shapes(shapes, crop):
    from PIL import Image

    scenes = load(shapes, "scenes_train")["images"]
    augment = DetectionAugment().scaled(224)
    assert augment.scales == (200, 250, 300) and augment.crop == (224, 448)
    if not crop:
        augment = DetectionAugment(augment.scales, (10_000, 10_000), augment.max_side, flip=0.5)
    checked, flips = 0, set()
    for seed in range(16):
        scene = scenes[seed % len(scenes)]
        image = Image.open(shapes / "images" / scene["file_name"]).convert("RGB")
        boxes = [(o["bbox"][0], o["bbox"][1], o["bbox"][0] + o["bbox"][2], o["bbox"][1] + o["bbox"][3])
                 for o in scene["objects"]]  # fmt: skip
        random.seed(seed)
        out, norm, kept = augment_detection(image, boxes, (224, 224), augment)
        assert out.size == (224, 224) and len(norm) == len(kept) and len(kept) >= 1
        random.seed(seed)
        again = augment_detection(image, boxes, (224, 224), augment)
        assert torch.equal(again[1], norm)  # the same seed gives the same draw
        if not crop:
            assert kept == list(range(len(boxes)))
        pixels = np.asarray(out).astype(float)
        for box, k in zip(norm.tolist(), kept):
            px = [v * 224 for v in box]
            assert px[2] - px[0] >= 2 and px[3] - px[1] >= 2
            rgb = scene["objects"][k]["rgb"]
            inner = [round(v) for v in px]
            assert colour_bbox(pixels, rgb, inner) is not None, (seed, k)  # the box lies on its shape
            if not crop:  # uncut boxes enclose their shape tightly
                window = [max(0, inner[0] - 4), max(0, inner[1] - 4), min(224, inner[2] + 4), min(224, inner[3] + 4)]
                found = colour_bbox(pixels, rgb, window)
                assert np.abs(np.array(found) - np.array(px)).max() <= 4, (seed, k, found, px)  # bilinear edges
                centre = (px[0] + px[2]) / 2 / 224
                original = (boxes[k][0] + boxes[k][2]) / 2 / image.width
                flips.add(bool(abs(centre - (1 - original)) < abs(centre - original)))
            checked += 1
    assert checked >= 16
    if not crop:
        assert flips == {True, False}  # both flipped and unflipped draws happen


def test_detection_samples_and_three_stage1_steps(shapes, model, tmp_path):
    from groma_core.training import TrainingConfig

    data = open_dataset(spec(shapes, "detection", source="coco"), model)
    with seeded(1):
        sample = data[0]
    assert set(sample) == {"pixel_values", "boxes", "box_labels", "image_file", "skipped"}
    assert sample["image_file"] == data.records[0].image.file_name and sample["skipped"] == 0
    assert sample["boxes"].shape[1] == 4 and len(sample["boxes"]) >= 1
    assert len(sample["box_labels"]) == len(sample["boxes"])  # each kept box keeps its file's category
    config = TrainingConfig.model_validate(
        {
            "stages": [
                {
                    "name": "detection",
                    "objective": "detection",
                    "train": ["region_proposer"],
                    "data": [{"name": "shapes", "source": "coco"}],
                    "batch_size": 2,
                    "lr": 2e-4,
                    "weight_decay": 1e-4,
                    "no_decay_bias_norm": False,
                    "lr_multipliers": {"sampling_offsets": 0.1, "reference_points": 0.1},
                    "max_steps": 3,
                }
            ],
            "progress": False,
            "tensorboard": False,
        }
    )
    before = {k: v.clone() for k, v in model.state_dict().items()}
    run_training(model, config, {"shapes": data}, tmp_path)
    log = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in log] == [1, 2, 3]
    assert all(np.isfinite(x["loss"]) and x["loss"] > 0 for x in log)
    assert {"loss_ce", "loss_bbox", "loss_giou", "loss_ce_enc"} <= set(log[0])
    after = model.state_dict()
    changed = {k.split(".")[0] for k in after if not torch.equal(after[k], before[k])}
    assert changed == {"region_proposer"}
    model.load_state_dict(before)


def test_expanded_labels_stay_on_their_tokens(shapes, model):
    """The model supervises exactly the answer tokens of a dataset sample after expanding <image>/<region>."""
    data = open_dataset(spec(shapes, "rec", "llava"), model)
    with seeded(0):
        sample = data[0]
    with torch.no_grad():
        inputs = model.prepare_inputs(
            sample["pixel_values"][None], [sample["input_ids"]], ground_boxes=[sample["ground_boxes"]],
            labels=[sample["labels"]],
        )  # fmt: skip
    ids, labels = inputs.ids[0], inputs.labels[0]
    supervised_at = (labels != IGNORE_INDEX).nonzero().flatten()
    assert len(supervised_at) == len(supervised(sample))
    assert torch.equal(labels[supervised_at], ids[supervised_at])
