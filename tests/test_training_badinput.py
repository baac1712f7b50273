"""Bad training data on real files written by the tests: boxes outside their image or degenerate are clipped or
dropped (with the samples whose text needs them), counted and summarised when a dataset is opened; images that
cannot be decoded are skipped, named once and counted in the train log, without stopping training."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from groma_core.data import FORMAT_FILES, ShapesConfig, write_shapes_dataset
from groma_core.errors import GromaError
from groma_core.schema import DatasetSpec
from groma_core.training import TrainingConfig, open_dataset, run_training
from groma_core.training.data import seeded
from groma_core.training.datasets import GritDataset

LOGGER = "groma_core.training"


@pytest.fixture(scope="module")
def model(sp_dir):
    from groma_core.api import build

    return build(
        "groma-tiny",
        [f"language_backbone.tokenizer={sp_dir}", "image_tokenizer.input_size=112", "region_proposer.num_queries=32"],
    )


@pytest.fixture
def shapes(tmp_path) -> Path:
    """A fresh shapes dataset per test (the tests damage its files)."""
    out = tmp_path / "shapes"
    write_shapes_dataset(out, ShapesConfig(images=8, seed=3, width=(160, 240), height=(120, 200)))
    return out


def ann_file(shapes: Path, fmt: str) -> Path:
    return shapes / "annotations" / f"{FORMAT_FILES[fmt]}_train.json"


def spec(shapes: Path, fmt: str) -> DatasetSpec:
    return DatasetSpec(format=fmt, ann=str(ann_file(shapes, fmt)), images=str(shapes / "images"))


def edit(shapes: Path, fmt: str, change) -> None:
    """Rewrite a format's annotation file through ``change(data)`` (NaN written as JSON's NaN)."""
    path = ann_file(shapes, fmt)
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def summaries(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.getMessage().startswith("dataset ")]


def sizes(data: dict) -> dict[int, tuple[int, int]]:
    return {im["id"]: (im["width"], im["height"]) for im in data["images"]}


# -- boxes -----------------------------------------------------------------------------------------------------
def test_rec_boxes_outside_or_degenerate_drop_their_sample_and_boxes_partly_outside_are_clipped(shapes, model, caplog):
    original = json.loads(ann_file(shapes, "rec").read_text())
    annotations = original["annotations"]
    size = sizes(original)
    width0, _ = size[annotations[0]["image_id"]]
    width4, height4 = size[annotations[4]["image_id"]]

    def damage(data):
        a = data["annotations"]
        a[0]["bbox"] = [width0 + 5, 10, 20, 20]  # entirely right of the image
        a[1]["bbox"] = [10, 10, 0, 15]  # no width
        a[2]["bbox"] = [30, 30, -12, 15]  # negative width
        a[3]["bbox"] = [10, float("nan"), 20, 20]  # not finite
        a[4]["bbox"] = [-15, height4 - 10, 40, 30]  # partly outside, on two sides

    edit(shapes, "rec", damage)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        data = open_dataset(spec(shapes, "rec"), model, name="rec_ft")

    total = len(annotations)
    assert data.dropped == {"box_outside_image": 1, "box_degenerate": 3, "sample_lost_box": 4}
    assert data.clipped == 1 and len(data) == total - 4
    assert summaries(caplog) == [
        f"dataset 'rec_ft' ({ann_file(shapes, 'rec')}): dropped 3 degenerate boxes (no width or height, or not "
        f"finite), 1 box outside the image, 4 samples that lost a box their text needs; clipped 1 box to the image "
        f"({total - 4} of {total} samples kept)"
    ]
    assert [r.levelno for r in caplog.records if r.name == LOGGER] == [logging.WARNING]
    dropped_ids = {a["image_id"] for a in annotations[:4]}
    assert {r.image.id for r in data.records} == {im["id"] for im in original["images"]} - dropped_ids
    index = next(i for i, r in enumerate(data.records) if r.image.id == annotations[4]["image_id"])
    assert data.records[index].box == (0.0, height4 - 10.0, 25.0, float(height4))
    with seeded(0):
        sample = data[index]
    expected = torch.tensor([[0.0, (height4 - 10) / height4, 25 / width4, 1.0]])
    torch.testing.assert_close(sample["ground_boxes"], expected)


def test_a_clean_dataset_reports_nothing_dropped(shapes, model, caplog):
    with caplog.at_level(logging.INFO, logger=LOGGER):
        data = open_dataset(spec(shapes, "rec"), model, name="rec_pt")
    assert data.dropped == {} and data.clipped == 0
    assert [(r.levelno, r.getMessage()) for r in caplog.records if r.name == LOGGER] == [
        (logging.INFO, f"dataset 'rec_pt' ({ann_file(shapes, 'rec')}): {len(data)} samples, every box inside its image")
    ]


def break_first_box(fmt: str):
    """A change that moves one box a sample's text needs outside its image, and the record it belongs to."""

    def change(data):
        if fmt == "instruct":
            k = data[0]["conversation"][1]["box_inds"][0]
            data[0]["boxes"][k] = [data[0]["width"] + 1, 0, 10, 10]
        else:
            width, _ = sizes(data)[data["annotations"][0]["image_id"]]
            data["annotations"][0]["bbox"] = [width + 1, 0, 10, 10]

    return change


@pytest.mark.parametrize("fmt", ["grounded-caption", "region-caption", "refcocog-caption", "instruct"])
def test_a_sample_whose_text_needs_a_dropped_box_is_dropped(shapes, model, fmt):
    before = len(open_dataset(spec(shapes, fmt), model))
    raw = json.loads(ann_file(shapes, fmt).read_text())
    if fmt == "instruct":  # the box is counted once per mention in a gpt turn
        k = raw[0]["conversation"][1]["box_inds"][0]
        mentions = sum(t.get("box_inds", []).count(k) for t in raw[0]["conversation"])
    elif fmt == "grounded-caption":  # and once per phrase it grounds
        mentions = len(raw["annotations"][0]["tokens_positive"])
    else:
        mentions = 1
    edit(shapes, fmt, break_first_box(fmt))
    data = open_dataset(spec(shapes, fmt), model)
    assert data.dropped == {"box_outside_image": mentions, "sample_lost_box": 1}
    assert len(data) == before - 1
    with seeded(0):
        data[0]  # the samples left still render


def test_box_list_formats_keep_the_boxes_left_and_drop_a_sample_left_without_any(shapes, model):
    """Grounding ("all instances of ..."), detection and multi-round region captions lose only the bad boxes;
    a sample (a query, an image) that had boxes and keeps none is dropped."""
    lvis = json.loads(ann_file(shapes, "grounding").read_text())
    per_query: dict[tuple[int, int], list[int]] = {}
    for j, a in enumerate(lvis["annotations"]):
        per_query.setdefault((a["image_id"], a["category_id"]), []).append(j)
    several = next(js for js in per_query.values() if len(js) >= 2)
    single = next(js for js in per_query.values() if len(js) == 1)

    def damage_lvis(data):
        data["annotations"][several[0]]["bbox"] = [5, 5, 10, 0]  # no height
        data["annotations"][single[0]]["bbox"] = [-40, -40, 20, 20]  # above-left of the image

    edit(shapes, "grounding", damage_lvis)
    grounding = open_dataset(spec(shapes, "grounding"), model)
    assert grounding.dropped == {"box_degenerate": 1, "box_outside_image": 1, "sample_no_box": 1}
    assert len(grounding) == len(per_query) - 1
    image_id, category = lvis["annotations"][several[0]]["image_id"], lvis["annotations"][several[0]]["category_id"]
    i = next(i for i, r in enumerate(grounding.records) if (r.image.id, r.category_id) == (image_id, category))
    with seeded(0):
        sample = grounding[i]
    assert len(sample["ground_boxes"]) == len(several) - 1
    answer = [t for t, label in zip(sample["input_ids"], sample["labels"]) if label != -100]
    assert answer.count(model.tokenizer.token_id("<ground_box>")) == len(several) - 1

    detection = json.loads(ann_file(shapes, "detection").read_text())
    counts = {im["id"]: sum(a["image_id"] == im["id"] for a in detection["annotations"]) for im in detection["images"]}
    emptied = detection["images"][0]["id"]
    partial = next(k for k, n in counts.items() if k != emptied and n >= 2)

    def damage_detection(data):
        for a in data["annotations"]:
            if a["image_id"] == emptied:
                a["bbox"] = [float("inf"), 0, 10, 10]
        next(a for a in data["annotations"] if a["image_id"] == partial)["bbox"] = [0, 0, -1, -1]

    edit(shapes, "detection", damage_detection)
    boxes = open_dataset(spec(shapes, "detection"), model)
    assert boxes.dropped == {"box_degenerate": counts[emptied] + 1, "sample_no_box": 1}
    assert [r.image.id for r in boxes.records] == [k for k in counts if k != emptied]
    assert len(next(r for r in boxes.records if r.image.id == partial).boxes) == counts[partial] - 1

    edit(shapes, "region-caption-multi", lambda data: data["annotations"][0].update(bbox=[1, 1, 0, 0]))
    multi = open_dataset(spec(shapes, "region-caption-multi"), model)
    assert multi.dropped == {"box_degenerate": 1} and len(multi) == len(detection["images"])


def test_grit_expressions_that_lose_a_box_are_dropped(shapes, model, tmp_path):
    """GRIT boxes are normalized: corners outside [0, 1] are clipped, expressions that lose a box dropped."""
    caption = "a red square next to a blue circle"
    records = [
        {
            "filename": "000001.png",
            "caption": caption,
            "ref_exps": [
                [0, 12, 0.1, 0.1, 0.3, 0.3],
                [0, 12, 0.5, 0.5, 0.4, 0.6],  # x2 < x1: the whole span 0-12 goes
                [21, 34, 0.6, 0.2, 1.2, 0.5],  # partly outside: clipped
            ],
        },
        {"filename": "000002.png", "caption": caption, "ref_exps": [[0, 12, 1.5, 1.5, 1.8, 1.9]]},
    ]
    ann = tmp_path / "grit.json"
    ann.write_text(json.dumps(records))
    tokenizer = model.image_tokenizer
    data = GritDataset(ann, shapes / "images", tokenizer.preprocess, model.tokenizer, name="grit")
    assert data.dropped == {
        "box_degenerate": 1,
        "box_outside_image": 1,
        "expression_lost_box": 2,
        "sample_no_box": 1,
    }
    assert data.clipped == 1
    assert data.records == [{**records[0], "ref_exps": [[21, 34, 0.6, 0.2, 1.0, 0.5]]}]


# -- images ----------------------------------------------------------------------------------------------------
def damage_images(shapes: Path, files: list[str]) -> None:
    """An empty file, a text file named .png and a truncated PNG, in that order."""
    images = shapes / "images"
    (images / files[0]).write_bytes(b"")
    (images / files[1]).write_text("this is not a picture\n")
    data = (images / files[2]).read_bytes()
    (images / files[2]).write_bytes(data[: len(data) // 2])


def test_an_unreadable_image_is_replaced_by_the_next_sample_and_named_once(shapes, model, caplog):
    data = open_dataset(spec(shapes, "rec"), model, name="rec")
    files = list(dict.fromkeys(r.image.file_name for r in data.records))
    broken = files[1:4]
    damage_images(shapes, broken)
    first = next(i for i, r in enumerate(data.records) if r.image.file_name == broken[0])
    after = next(j for j in range(first, len(data)) if data.records[j].image.file_name not in broken)

    with caplog.at_level(logging.WARNING, logger=LOGGER):
        with seeded(0):
            sample = data[first]
        for _ in range(2):
            for i in range(len(data)):
                with seeded(i):
                    assert data[i]["image_file"] not in broken
    assert sample["image_file"] == data.records[after].image.file_name and sample["skipped"] == 1
    record = data.records[after]
    expected = torch.tensor([record.box]) / torch.tensor([record.image.width, record.image.height] * 2)
    torch.testing.assert_close(sample["ground_boxes"], expected)
    warnings = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert len(warnings) == 3  # once per file
    reasons = ["the file is empty (0 bytes)", "not an image", "the image data is truncated or damaged"]
    for file, reason, warning in zip(broken, reasons, warnings):
        path = shapes / "images" / file
        assert warning.startswith("dataset 'rec': skipping an unreadable image, the next sample takes its place: ")
        assert f"{path}: " in warning
        assert reason in warning
    assert set(data.unreadable) == set(broken)


def test_too_many_unreadable_images_stop_with_a_clear_error(shapes, model):
    data = open_dataset(spec(shapes, "detection"), model, name="boxes")  # one sample per image
    data.max_unreadable_in_a_row = 2
    for record in data.records[0:6:2]:
        (shapes / "images" / record.image.file_name).write_bytes(b"")
    with pytest.raises(GromaError, match=rf"^dataset 'boxes': 3 of its {len(data)} samples' images cannot be read"):
        for i in range(len(data)):
            with seeded(i):
                data[i]

    for record in data.records:
        (shapes / "images" / record.image.file_name).write_bytes(b"")
    fresh = open_dataset(spec(shapes, "detection"), model, name="boxes")
    with pytest.raises(GromaError, match=rf"^dataset 'boxes': {len(fresh)} images in a row cannot be read \(the last"):
        fresh[0]


def projector_stage(**schedule) -> dict:
    """A stage training only the image projector on the 'rec' dataset, two samples per step."""
    return {
        "name": "alignment",
        "train": ["image_projector"],
        "freeze": ["image_tokenizer", "region_proposer"],
        "data": [{"name": "rec"}],
        "batch_size": 2,
        **schedule,
    }


@pytest.mark.parametrize("workers", [0, 1])
def test_training_goes_on_past_unreadable_images_and_logs_how_many_it_skipped(shapes, model, tmp_path, caplog, workers):
    data = open_dataset(spec(shapes, "rec"), model, name="rec")
    files = list(dict.fromkeys(r.image.file_name for r in data.records))
    broken = [files[0], files[len(files) // 2], files[-1]]
    damage_images(shapes, broken)
    assert len(data) % 2 == 0  # one epoch of batches of 2 reads every sample once
    expected = sum(r.image.file_name in broken for r in data.records)
    config = TrainingConfig.model_validate(
        {
            "stages": [projector_stage(epochs=1, lr=1e-4)],
            "num_workers": workers,
            "progress": False,
            "tensorboard": False,
        }
    )
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        result = run_training(model, config, {"rec": data}, tmp_path / "run")
    model.load_state_dict(before)
    log = [json.loads(x) for x in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == len(data) // 2 and log[-1]["skipped_images"] == expected == result.skipped_images["alignment"]
    assert [x["skipped_images"] for x in log] == sorted(x["skipped_images"] for x in log)
    assert any(
        r.getMessage().startswith(f"stage 'alignment': {expected} sample(s) were replaced by the next one")
        for r in caplog.records
    )
    state = json.loads((Path(result.last_checkpoint) / "trainer_state.json").read_text())
    assert state["skipped_images"] == expected


def test_a_resumed_run_skips_the_same_images_and_ends_with_the_same_weights(shapes, model, tmp_path):
    data = open_dataset(spec(shapes, "rec"), model, name="rec")
    files = list(dict.fromkeys(r.image.file_name for r in data.records))
    damage_images(shapes, [files[0], files[2], files[4]])
    stage = projector_stage(max_steps=6, lr=1e-3)
    config = TrainingConfig.model_validate({"stages": [stage], "save_every": 2, "progress": False})
    initial = {k: v.clone() for k, v in model.state_dict().items()}

    class Killed(Exception):
        pass

    def kill_at_step_3(info):
        if info.step == 3:
            raise Killed

    run_training(model, config, {"rec": data}, tmp_path / "straight")
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(initial)
    with pytest.raises(Killed):
        run_training(model, config, {"rec": data}, tmp_path / "resumed", on_step=kill_at_step_3)
    model.load_state_dict(initial)  # a fresh process: the same initial model
    result = run_training(model, config, {"rec": data}, tmp_path / "resumed", resume=True)
    got = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(initial)

    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=0, atol=1e-6, msg=name)

    def log(run):
        return [json.loads(x) for x in (tmp_path / run / "train_log.jsonl").read_text().splitlines()]

    straight, resumed = log("straight"), log("resumed")
    assert [(x["step"], x["skipped_images"]) for x in resumed] == [(x["step"], x["skipped_images"]) for x in straight]
    assert [x["loss"] for x in resumed] == pytest.approx([x["loss"] for x in straight], abs=1e-6)
    assert result.skipped_images["alignment"] == straight[-1]["skipped_images"] > 0
