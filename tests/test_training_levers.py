"""Aspect-keeping (letterbox) preprocessing and the detection stage's attribute loss: what reaches the model and
what comes back to the user."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from PIL import Image

from groma_core.boxes import IDENTITY_FRAME, from_input_frame, to_input_frame
from groma_core.data.shapes import ShapesConfig, write_shapes_dataset
from groma_core.inference import Groma
from groma_core.schema import DatasetSpec
from groma_core.training import TrainingConfig, run_training
from groma_core.training.datasets import open_dataset
from groma_core.training.objectives import Objective

SIDE = 112


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    write_shapes_dataset(out, ShapesConfig(images=8, seed=5, width=(200, 260), height=(100, 140)))
    return out


def build_model(sp_dir, letterbox: bool):
    from groma_core.api import build

    return build(
        "groma-tiny",
        [
            f"language_backbone.tokenizer={sp_dir}",
            f"image_tokenizer.input_size={SIDE}",
            f"image_tokenizer.letterbox={str(letterbox).lower()}",
            "region_proposer.num_queries=16",
            "region_proposer.frozen=false",
        ],
    )


@pytest.fixture(scope="module")
def boxed(sp_dir):
    return build_model(sp_dir, letterbox=True)


def spec(shapes, fmt: str, file: str) -> DatasetSpec:
    ann = shapes / "annotations" / f"{file}_train.json"
    return DatasetSpec(format=fmt, ann=str(ann), images=str(shapes / "images"))


def test_letterbox_keeps_the_aspect_ratio_and_pads_with_the_mean_colour(boxed):
    image = Image.new("RGB", (200, 100), (250, 10, 10))
    pixels = boxed.image_tokenizer.preprocess([image])[0]
    assert pixels.shape == (3, SIDE, SIDE)
    assert boxed.image_tokenizer.input_frame(200, 100) == (1.0, 0.5, 0.0, 0.0)
    inside, padding = pixels[:, : SIDE // 2, :], pixels[:, SIDE // 2 :, :]
    assert (inside[0] > 1.5).all() and (inside[1] < -1.5).all()  # red, normalized
    assert torch.count_nonzero(padding) == 0  # zero = the mean colour after normalization


@pytest.mark.parametrize("size", [(1, 1000), (1000, 1), (1, 1), (2, 1000), (1000, 2)])
def test_extreme_aspect_ratios_give_boxes_back_in_the_original_pixels(boxed, size):
    width, height = size
    image = Image.new("RGB", size, (0, 200, 0))
    assert boxed.image_tokenizer.preprocess([image]).shape == (1, 3, SIDE, SIDE)
    frame = boxed.image_tokenizer.input_frame(width, height)
    whole = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    placed = to_input_frame(whole, frame)
    assert placed.min() >= 0 and placed.max() <= 1
    assert torch.allclose(from_input_frame(placed, frame), whole, atol=1e-6)
    # a region of the padded square, partly or wholly in the padding, comes back inside the image
    back = from_input_frame(torch.tensor([[0.2, 0.2, 0.9, 0.9], [0.95, 0.95, 1.0, 1.0]]), frame)
    assert back.min() >= 0 and back.max() <= 1
    if min(size) < 2:  # the API refuses images under 2 pixels a side, with one line; the frame still holds
        return
    answer = Groma(boxed).describe_region(image, [0, 0, width, height], max_new_tokens=4)
    for phrase in answer.phrases:
        for x1, y1, x2, y2 in phrase.boxes_px:
            assert 0 <= x1 <= x2 <= width and 0 <= y1 <= y2 <= height


def test_the_reference_resize_leaves_boxes_as_they_are(sp_dir):
    model = build_model(sp_dir, letterbox=False)
    assert model.image_tokenizer.input_frame(640, 240) == IDENTITY_FRAME
    boxes = torch.tensor([[-0.1, 0.2, 1.2, 0.5]])
    assert torch.equal(from_input_frame(boxes, IDENTITY_FRAME), boxes)  # unclipped, as the reference reports them


def colour_share(pixels: torch.Tensor, box: torch.Tensor, rgb) -> float:
    """The share of the box's input pixels (normalized xyxy of the input) that have the shape's colour."""
    from groma_plugin_dinov2.preprocess import IMAGENET_MEAN, IMAGENET_STD

    side = pixels.shape[-1]
    x1, y1, x2, y2 = (box * side).round().int().tolist()
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    rgb01 = (pixels[:, y1:y2, x1:x2] * std + mean) * 255
    close = (rgb01 - torch.tensor(rgb, dtype=torch.float32)[:, None, None]).abs().amax(0) < 40
    return close.float().mean().item()


def test_training_samples_carry_boxes_in_the_letterboxed_input(shapes, boxed):
    scenes = json.loads((shapes / "annotations" / "scenes_train.json").read_text())["images"]
    by_file = {s["file_name"]: s for s in scenes}
    data = open_dataset(spec(shapes, "region-caption", "region_captions"), boxed)
    checked = 0
    for i in range(len(data)):
        sample = data[i]
        scene = by_file[sample["image_file"]]
        (box,) = sample["refer_boxes"]
        frame = boxed.image_tokenizer.input_frame(scene["width"], scene["height"])
        assert box[3] <= frame[1] + 1e-6  # inside the placed image, above the padding
        target = next(o for o in scene["objects"] if box_matches(o, box, frame, scene))
        if not target["occluded_by"] and target["area"] > 150:
            assert colour_share(sample["pixel_values"], box, target["rgb"]) > 0.3
            checked += 1
    assert checked >= 3


def box_matches(obj, box, frame, scene) -> bool:
    x, y, w, h = obj["bbox"]
    width, height = scene["width"], scene["height"]
    original = torch.tensor([x / width, y / height, (x + w) / width, (y + h) / height])
    return torch.allclose(to_input_frame(original, frame), box, atol=1e-4)


def test_detection_samples_under_letterbox_keep_boxes_on_their_shapes(shapes, boxed):
    data = open_dataset(DatasetSpec(format="detection", ann=str(shapes / "annotations" / "detection_train.json"),
                                    images=str(shapes / "images"), source="coco"), boxed)
    torch.manual_seed(0)
    for i in range(4):
        sample = data[i]
        placed = sample["pixel_values"].abs().amax(0) > 0  # the image; the padding is exactly zero
        rows, cols = torch.nonzero(placed.any(1)).flatten(), torch.nonzero(placed.any(0)).flatten()
        assert rows[0] == 0 and cols[0] == 0 and (rows[-1] < SIDE - 1 or cols[-1] < SIDE - 1)  # a crop keeps its aspect
        for _, _, x2, y2 in (sample["boxes"] * SIDE).tolist():
            assert x2 <= cols[-1] + 1.5 and y2 <= rows[-1] + 1.5  # every box on the image, none in the padding


def attribute_config(weight: float) -> TrainingConfig:
    return TrainingConfig.model_validate(
        {
            "stages": [
                {
                    "name": "detection",
                    "objective": "detection",
                    "train": ["region_proposer", "region_encoder"],
                    "data": [{"name": "shapes", "source": "coco"}],
                    "batch_size": 2,
                    "lr": 2e-4,
                    "max_steps": 2,
                    "attribute_loss": weight,
                }
            ],
            "progress": False,
            "tensorboard": False,
        }
    )


def test_attribute_loss_trains_the_region_encoder_and_logs_its_terms(shapes, sp_dir, tmp_path):
    model = build_model(sp_dir, letterbox=True)
    data = open_dataset(DatasetSpec(format="detection", ann=str(shapes / "annotations" / "detection_train.json"),
                                    images=str(shapes / "images"), source="coco"), model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    run_training(model, attribute_config(1.0), {"shapes": data}, tmp_path)
    log = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert all(np.isfinite(x["attribute_ce"]) and x["attribute_ce"] > 0 for x in log)
    assert all(np.isfinite(x["attribute_box"]) for x in log)
    after = model.state_dict()
    changed = {k.split(".")[0] for k in after if not torch.equal(after[k], before[k])}
    assert changed == {"region_proposer", "region_encoder"}  # the readout has no parameters: nothing to drop


def test_image_crop_trains_on_the_augmented_original_images(shapes, sp_dir, tmp_path):
    """``region_encoder.image_crop`` makes the model carry the original images through training: the detection
    stage with the attribute loss trains the crop stem, which only pixels of the original images reach."""
    from groma_core.api import build

    model = build("groma-tiny", [f"language_backbone.tokenizer={sp_dir}", f"image_tokenizer.input_size={SIDE}",
                                 "image_tokenizer.letterbox=true", "region_proposer.num_queries=16",
                                 "region_proposer.frozen=false", "region_encoder.image_crop=8"])
    assert model.needs_images
    data = open_dataset(DatasetSpec(format="detection", ann=str(shapes / "annotations" / "detection_train.json"),
                                    images=str(shapes / "images"), source="coco"), model)
    assert data.keep_images and data[0]["image"].size != (SIDE, SIDE)  # the original, not the encoder's input
    stem = model.region_encoder.extractor.crop_stem
    before = [p.detach().clone() for p in stem.parameters()]
    run_training(model, attribute_config(1.0), {"shapes": data}, tmp_path)
    assert all(not torch.equal(b, p) for b, p in zip(before, stem.parameters()))


def test_attribute_loss_lowers_on_a_fixed_batch(shapes, sp_dir):
    """A few optimizer steps on one batch make the region tokens name their boxes' categories better."""
    model = build_model(sp_dir, letterbox=False)
    data = open_dataset(DatasetSpec(format="detection", ann=str(shapes / "annotations" / "detection_train.json"),
                                    images=str(shapes / "images"), source="coco"), model)
    from groma_core.training.data import collate

    torch.manual_seed(0)
    batch = collate([{**data[i], "dataset": "shapes", "source": "coco"} for i in range(3)])
    objective = Objective(model, "detection", attribute_loss=1.0)
    optimizer = torch.optim.Adam(model.region_encoder.parameters(), lr=3e-3)
    first = None
    for _ in range(15):
        features = model.image_tokenizer(batch["pixel_values"])
        terms = objective._attributes(features, batch)
        first = first if first is not None else terms["attribute_ce"].item()
        optimizer.zero_grad()
        (terms["attribute_ce"] + terms["attribute_box"]).backward()
        optimizer.step()
    assert terms["attribute_ce"].item() < 0.5 * first


def test_an_attributes_stage_trains_the_region_encoder_alone_without_running_the_proposer(shapes, sp_dir, tmp_path):
    """``objective: attributes`` trains what it lists (here the region encoder, with its image crop stem) on the
    attribute loss of a detection file's true boxes: the proposer is never called, so its weights and its
    detection loss stay out; the loss logged is the attribute loss's."""
    from groma_core.api import build

    model = build("groma-tiny", [f"language_backbone.tokenizer={sp_dir}", f"image_tokenizer.input_size={SIDE}",
                                 "image_tokenizer.letterbox=true", "region_proposer.num_queries=16",
                                 "region_encoder.image_crop=8"])
    data = open_dataset(DatasetSpec(format="detection", ann=str(shapes / "annotations" / "detection_train.json"),
                                    images=str(shapes / "images"), source="coco"), model)
    calls = []
    model.region_proposer.register_forward_hook(lambda *_: calls.append(1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = TrainingConfig.model_validate({"stages": [{
        "name": "attributes", "objective": "attributes", "train": ["region_encoder"], "data": [{"name": "shapes"}],
        "batch_size": 2, "lr": 2e-3, "max_steps": 3, "attribute_loss": 1.0}], "progress": False,
        "tensorboard": False})  # fmt: skip
    run_training(model, config, {"shapes": data}, tmp_path)
    after = model.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert {k.split(".")[0] for k in changed} == {"region_encoder"}
    assert any(".crop_stem." in k for k in changed) and not calls
    log = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert all(abs(x["loss"] - x["attribute_ce"] - x["attribute_box"]) < 1e-4 * x["loss"] for x in log)


def test_an_attributes_stage_needs_a_weight_and_reads_detection_files_only():
    base = {"name": "s", "objective": "attributes", "train": ["region_encoder"], "data": [{"name": "x"}],
            "batch_size": 1, "lr": 1e-3}
    with pytest.raises(ValueError, match="give it a weight above 0"):
        TrainingConfig.model_validate({"stages": [base]})
    from groma_core.schema import RecipeTraining

    datasets = {"x": {"format": "detection", "ann": "a.json", "images": "i"},
                "y": {"format": "rec", "ann": "a.json", "images": "i"}}
    staged = {**base, "attribute_loss": 1.0}
    RecipeTraining.model_validate({"datasets": datasets, "stages": [staged]})
    with pytest.raises(ValueError, match="objective 'attributes' cannot read 'y' \\(format rec\\)"):
        RecipeTraining.model_validate({"datasets": datasets, "stages": [{**staged, "data": [{"name": "y"}]}]})


def crops_config(steps: int) -> TrainingConfig:
    return TrainingConfig.model_validate({"stages": [{
        "name": "crops", "objective": "crops", "train": ["region_encoder"], "data": [{"name": "shapes"}],
        "batch_size": 4, "lr": 3e-3, "max_steps": steps, "max_grad_norm": None}], "progress": False,
        "tensorboard": False, "log_every": 1})  # fmt: skip


@pytest.mark.parametrize("labels,classes", [("category", 128), ("head", 8)])
def test_a_crops_stage_teaches_the_crop_classifier_the_categories_alone(shapes, sp_dir, tmp_path, labels, classes):
    """``objective: crops`` trains the region encoder's crop classifier (``crop_classes``) to name each true box's
    category (or its name's head word, ``crop_labels: head``) from its crop of the original image: its loss falls, its
    accuracy is logged, and nothing else runs or changes (neither the image tokenizer nor the proposer is called; the
    class codes wait for the detection stage)."""
    from groma_core.api import build

    model = build("groma-tiny", [f"language_backbone.tokenizer={sp_dir}", f"image_tokenizer.input_size={SIDE}",
                                 "image_tokenizer.letterbox=true", "region_proposer.num_queries=16",
                                 "region_encoder.image_crop=8", f"region_encoder.crop_classes={classes}",
                                 f"region_encoder.crop_labels={labels}"])
    data = open_dataset(DatasetSpec(format="detection", ann=str(shapes / "annotations" / "detection_train.json"),
                                    images=str(shapes / "images"), source="coco"), model)
    calls = []
    model.region_proposer.register_forward_hook(lambda *_: calls.append(1))
    model.image_tokenizer.register_forward_hook(lambda *_: calls.append(1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    run_training(model, crops_config(45), {"shapes": data}, tmp_path)
    after = model.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed and all(k.startswith("region_encoder.extractor.crop_classifier.") for k in changed)
    assert not calls
    log = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert all(0.0 <= x["accuracy"] <= 1.0 for x in log)
    first, last = np.mean([x["loss"] for x in log[:5]]), np.mean([x["loss"] for x in log[-5:]])
    assert last < 0.7 * first  # 8 images, ~35 boxes seen ~5 times each: the classifier fits them


def _attribute_batch(shapes, sp_dir, overrides: list[str]):
    """A tiny model with ``overrides``, the shapes detection file opened for it, a batch of two images, and a
    detection objective with the attribute loss."""
    from groma_core.api import build
    from groma_core.training.data import collate

    model = build("groma-tiny", [f"language_backbone.tokenizer={sp_dir}", f"image_tokenizer.input_size={SIDE}",
                                 "region_proposer.num_queries=16", *overrides])
    data = open_dataset(DatasetSpec(format="detection", ann=str(shapes / "annotations" / "detection_train.json"),
                                    images=str(shapes / "images"), source="coco"), model)
    torch.manual_seed(0)
    batch = collate([{**data[i], "dataset": "shapes", "source": "coco"} for i in range(2)])
    return model, data, batch, Objective(model, "detection", attribute_loss=1.0)


def test_the_attribute_loss_reads_the_region_token_without_the_crop_classifiers_code(shapes, sp_dir, tmp_path):
    """With a crop classifier, a detection stage's attribute loss trains the region's own token: the classifier's code
    (half the token at ``crop_code_scale: 1``) is left out, so the loss is the same whatever the code's scale, and the
    stage changes neither the classifier nor the code map, while the rest of the region encoder learns."""
    model, data, batch, objective = _attribute_batch(shapes, sp_dir, [
        "image_tokenizer.letterbox=true", "region_proposer.frozen=false", "region_encoder.image_crop=8",
        "region_encoder.crop_classes=8", "region_encoder.crop_labels=head"])
    extractor = model.region_encoder.extractor
    with torch.no_grad():
        features = model.encode_images(batch["pixel_values"], batch.get("images"))
        losses, tokens = [], []
        for scale in (1.0, 4.0):
            extractor.crop_code_scale = scale
            losses.append(objective._attributes(features, batch)["attribute_ce"])
            tokens.append(torch.cat(model.region_encoder(features, list(batch["boxes"]))))
    assert not torch.allclose(tokens[0], tokens[1])  # the code is in the tokens the language model reads ...
    torch.testing.assert_close(losses[0], losses[1], rtol=0, atol=0)  # ... and not in what the attribute loss reads
    extractor.crop_code_scale = 1.0
    before = {k: v.clone() for k, v in model.state_dict().items()}
    run_training(model, attribute_config(1.0), {"shapes": data}, tmp_path)
    after = model.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k]) and k.startswith("region_encoder.")}
    assert changed and not {k for k in changed if ".crop_classifier." in k or ".crop_code." in k}


def test_the_attribute_loss_reads_the_region_token_without_the_box_code(shapes, sp_dir):
    """With ``box_code_scale``, the attribute loss reads the region's own token too: the box code (a fixed map of
    where the region is, at a share of the token's norm) is in the tokens the language model reads, not in the loss,
    so the loss is the same whatever the code's scale."""
    model, _, batch, objective = _attribute_batch(shapes, sp_dir, ["region_encoder.box_code_scale=1.0"])
    with torch.no_grad():
        features = model.encode_images(batch["pixel_values"], batch.get("images"))
        losses, tokens = [], []
        for scale in (1.0, 4.0):
            model.region_encoder.extractor.box_code_scale = scale
            terms = objective._attributes(features, batch)
            losses.append(terms["attribute_ce"] + terms["attribute_box"])
            tokens.append(torch.cat(model.region_encoder(features, list(batch["boxes"]))))
    assert not torch.allclose(tokens[0], tokens[1])  # the code is in the tokens the language model reads ...
    torch.testing.assert_close(losses[0], losses[1], rtol=0, atol=0)  # ... and not in what the attribute loss reads


def test_a_crops_stage_needs_a_crop_classifier_and_categories(shapes, sp_dir, tmp_path):
    model = build_model(sp_dir, letterbox=True)
    data = open_dataset(DatasetSpec(format="detection", ann=str(shapes / "annotations" / "detection_train.json"),
                                    images=str(shapes / "images"), source="coco"), model)
    from groma_core.api import build
    from groma_core.errors import InputError, RecipeError

    with pytest.raises(RecipeError, match="'crops' needs a region encoder with a crop classifier"):
        run_training(model, crops_config(1), {"shapes": data}, tmp_path)

    small = build("groma-tiny", [f"language_backbone.tokenizer={sp_dir}", f"image_tokenizer.input_size={SIDE}",
                                 "region_encoder.image_crop=8", "region_encoder.crop_classes=4"])
    batch = {"dataset": "shapes", "boxes": [torch.tensor([[0.1, 0.1, 0.5, 0.5]])], "box_labels": [torch.tensor([9])],
             "pixel_values": torch.zeros(1, 3, SIDE, SIDE), "images": [Image.new("RGB", (40, 30))]}
    with pytest.raises(InputError, match="category_id 9 is not below the crop classifier's 4 classes"):
        Objective(small, "crops")(batch)
    with pytest.raises(InputError, match="needs the original images and a category_id"):
        Objective(small, "crops")({**batch, "box_labels": None})
    small.region_encoder.options.crop_labels = "head"
    with pytest.raises(InputError, match="head word 6 is not below the crop classifier's 4 classes"):
        Objective(small, "crops")({**batch, "box_heads": [torch.tensor([6])]})
    with pytest.raises(InputError, match="needs the original images and a named category"):
        Objective(small, "crops")(batch)


def test_detection_samples_name_the_head_word_of_each_boxs_category(shapes, sp_dir):
    """A detection file's category names give each box the index of its name's last word among the file's sorted
    head words (``red_circle`` -> ``circle``), the target of ``crop_labels: head``."""
    from groma_core.data import category_words

    assert category_words("red_circle") == ("red", "circle")
    assert category_words(" Traffic  light ") == ("traffic", "light")
    model = build_model(sp_dir, letterbox=True)
    spec = DatasetSpec(format="detection", ann=str(shapes / "annotations" / "detection_train.json"),
                       images=str(shapes / "images"), source="coco")
    assert "box_heads" not in open_dataset(spec, model)[0]  # read only for a model whose crops name head words
    from groma_core.api import build

    model = build("groma-tiny", [f"language_backbone.tokenizer={sp_dir}", f"image_tokenizer.input_size={SIDE}",
                                 "region_encoder.image_crop=8", "region_encoder.crop_classes=8",
                                 "region_encoder.crop_labels=head"])
    data = open_dataset(spec, model)
    names = {c["id"]: c["name"] for c in json.loads((shapes / "annotations" / "detection_train.json").read_text())[
        "categories"]}
    heads = data.head_vocabulary
    assert heads == sorted({n.split("_")[-1] for n in names.values()}) and "circle" in heads and "red" not in heads
    sample = data[0]
    assert len(sample["box_heads"]) == len(sample["box_labels"]) > 0
    for head, label in zip(sample["box_heads"].tolist(), sample["box_labels"].tolist()):
        assert heads[head] == names[label].split("_")[-1]


def test_attribute_loss_needs_categories_and_a_detection_stage(shapes, sp_dir):
    with pytest.raises(ValueError, match="attribute_loss is for detection and attributes stages"):
        TrainingConfig.model_validate({"stages": [{
            "name": "s", "objective": "lm", "train": ["language_backbone"], "data": [{"name": "x"}], "batch_size": 1,
            "lr": 1e-3, "attribute_loss": 1.0}]})  # fmt: skip
    model = build_model(sp_dir, letterbox=False)
    objective = Objective(model, "detection", attribute_loss=1.0, attribute_classes=4)
    batch = {"dataset": "shapes", "boxes": [torch.tensor([[0.1, 0.1, 0.5, 0.5]])], "box_labels": [torch.tensor([9])],
             "pixel_values": torch.zeros(1, 3, SIDE, SIDE)}
    features = model.image_tokenizer(batch["pixel_values"])
    from groma_core.errors import InputError

    with pytest.raises(InputError, match="category_id 9 is not below attribute_classes"):
        objective._attributes(features, batch)
    with pytest.raises(InputError, match="needs a category_id on every box"):
        objective._attributes(features, {**batch, "box_labels": None})


def test_rec_turns_ask_the_expressions_of_one_image_together(tmp_path, sp_dir):
    data = tmp_path / "shapes"
    write_shapes_dataset(data, ShapesConfig(images=10, seed=9, rec_per_image=8))
    model = build_model(sp_dir, letterbox=False)
    single = open_dataset(spec(data, "rec", "rec"), model)
    grouped = open_dataset(DatasetSpec(format="rec", ann=str(data / "annotations" / "rec_train.json"),
                                       images=str(data / "images"), turns=3), model)
    per_image: dict[str, list[str]] = {}
    for r in single.records:
        per_image.setdefault(r.image.file_name, []).append(r.expression)
    assert max(len(v) for v in per_image.values()) > 3  # some image is split over several samples
    assert len(grouped) == sum(-(-len(v) // 3) for v in per_image.values())
    asked: dict[str, list[str]] = {}
    for i in range(len(grouped)):
        sample = grouped[i]
        record = grouped.records[i]
        assert 1 <= len(record) <= 3 and len({r.image.file_name for r in record}) == 1
        assert sample["ground_boxes"].shape == (len(record), 4)  # one box per question, in order
        text = model.tokenizer.decode(sample["input_ids"])
        assert text.count("<ground_box>") == len(record)
        asked.setdefault(sample["image_file"], []).extend(r.expression for r in record)
    assert asked == per_image  # every expression asked once
    with pytest.raises(ValueError, match="turns is an option of the rec format"):
        DatasetSpec(format="grounded-caption", ann="a.json", images="i", turns=2)


def test_bare_phrases_put_each_phrases_regions_right_after_it(tmp_path, sp_dir):
    data = tmp_path / "shapes"
    write_shapes_dataset(data, ShapesConfig(images=6, seed=4))
    model = build_model(sp_dir, letterbox=False)
    ann, images = str(data / "annotations" / "flickr_train.json"), str(data / "images")
    plain = open_dataset(DatasetSpec(format="grounded-caption", ann=ann, images=images), model)
    bare = open_dataset(DatasetSpec(format="grounded-caption", ann=ann, images=images, bare_phrases=True), model)
    assert len(plain) == len(bare) > 0
    for i in range(len(bare)):
        random.seed(i)
        a = plain[i]
        random.seed(i)
        b = bare[i]
        assert torch.equal(a["ground_boxes"], b["ground_boxes"])  # the same regions, in the same order
        supervised = model.tokenizer.decode([t for t in b["labels"] if t != -100])
        for tag in ("<p>", "</p>", "<roi>", "</roi>"):
            assert tag not in supervised
        record = bare.records[i]
        for phrase in record.phrases:  # every phrase is followed by exactly its own placeholders
            words = record.caption[phrase.span[0] : phrase.span[1]].split()[-1]
            assert words + " " + "<ground_box> " * len(phrase.boxes) in supervised + " "
    with pytest.raises(ValueError, match="bare_phrases is an option of the grounded-caption format"):
        DatasetSpec(format="rec", ann="a.json", images="i", bare_phrases=True)


def test_box_jitter_moves_the_true_boxes_as_a_proposer_misses_them(shapes, sp_dir):
    """``box_jitter: s`` (crops stages and the attribute loss) moves each true box's centre by N(0, s) of its sides
    and scales each side by exp(N(0, s)), drawn from the objective's seeded generator (a resumed stage draws the same);
    0 leaves the boxes as they are, and a stage with nothing that reads true boxes refuses it."""
    from groma_core.api import build
    from groma_core.schema import StageConfig

    model = build("groma-tiny", [f"language_backbone.tokenizer={sp_dir}", f"image_tokenizer.input_size={SIDE}"])
    xy = torch.rand(4000, 2) * 0.5
    boxes = [torch.cat([xy, xy + 0.05 + torch.rand(4000, 2) * 0.4], dim=1)]
    assert torch.equal(Objective(model, "crops")._jittered(boxes)[0], boxes[0])
    moved = [Objective(model, "crops", torch.Generator().manual_seed(7), box_jitter=0.1)._jittered(boxes)[0]
             for _ in range(2)]
    torch.testing.assert_close(moved[0], moved[1], rtol=0, atol=0)  # the same seed, the same boxes
    side, new_side = boxes[0][:, 2:] - boxes[0][:, :2], moved[0][:, 2:] - moved[0][:, :2]
    offset = ((moved[0][:, :2] + moved[0][:, 2:]) - (boxes[0][:, :2] + boxes[0][:, 2:])) / 2 / side
    scale = (new_side / side).log()
    # 8,000 draws each: the standard deviation of N(0, 0.1) is estimated within ~2% (one s.e. 0.8%); 5% allowed
    assert offset.std().item() == pytest.approx(0.1, rel=0.05) and scale.std().item() == pytest.approx(0.1, rel=0.05)
    assert abs(offset.mean().item()) < 0.01 and (new_side > 0).all()

    stage = {"name": "s", "train": ["region_encoder"], "data": [{"name": "shapes"}], "batch_size": 2, "lr": 1e-3}
    StageConfig.model_validate({**stage, "objective": "crops", "box_jitter": 0.1})
    StageConfig.model_validate({**stage, "objective": "detection", "attribute_loss": 1.0, "box_jitter": 0.1})
    with pytest.raises(ValueError, match="box_jitter moves the true boxes of a crops stage or of attribute_loss"):
        StageConfig.model_validate({**stage, "objective": "detection", "box_jitter": 0.1})


def test_a_jittered_crops_stage_reads_other_crops_than_the_true_boxes(shapes, sp_dir):
    """With ``box_jitter`` a crops stage's loss is computed on the moved boxes' crops (a different loss than on the
    true boxes' crops); with 0 it is the loss of the true boxes exactly."""
    from groma_core.api import build
    from groma_core.training.data import collate

    model = build("groma-tiny", [f"language_backbone.tokenizer={sp_dir}", f"image_tokenizer.input_size={SIDE}",
                                 "image_tokenizer.letterbox=true", "region_encoder.image_crop=8",
                                 "region_encoder.crop_classes=8", "region_encoder.crop_labels=head"])
    data = open_dataset(DatasetSpec(format="detection", ann=str(shapes / "annotations" / "detection_train.json"),
                                    images=str(shapes / "images"), source="coco"), model)
    batch = collate([{**data[i], "dataset": "shapes", "source": "coco"} for i in range(2)])
    with torch.no_grad():
        plain = Objective(model, "crops")(batch)[0]
        again = Objective(model, "crops", torch.Generator().manual_seed(1), box_jitter=0.0)(batch)[0]
        jittered = Objective(model, "crops", torch.Generator().manual_seed(1), box_jitter=0.2)(batch)[0]
    torch.testing.assert_close(plain, again, rtol=0, atol=0)
    assert not torch.isclose(plain, jittered, rtol=1e-4, atol=0)
