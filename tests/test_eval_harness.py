"""`groma eval`: the benchmark protocols end to end on a small dataset in the reference's formats, resuming, and
the same result under torchrun with two processes."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

from groma_core import ImageFeatures, Proposals, RegionProposer, StageOptions, hookimpl
from groma_core.errors import GromaError, InputError
from groma_core.evaluation.harness import (
    DetectionTask,
    LvisGroundTask,
    RecTask,
    RegionCaptionTask,
    Sample,
    evaluate,
)
from groma_core.testing.tiny import make_sentencepiece

SHAPES = [  # (file, size, [(category, colour, xywh)])
    ("a.png", (120, 90), [("circle", "red", (10, 10, 40, 40)), ("square", "blue", (60, 30, 50, 50))]),
    ("b.png", (100, 140), [("square", "green", (5, 60, 60, 60))]),
    ("c.png", (90, 90), [("circle", "blue", (30, 30, 30, 30)), ("circle", "red", (2, 2, 20, 20))]),
]
COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30)}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bench")
    (root / "images").mkdir()
    images, anns, rec_images, rec_anns, cats = [], [], [], [], {"circle": 1, "square": 2}
    for i, (name, size, shapes) in enumerate(SHAPES):
        img = Image.new("RGB", size, (240, 240, 240))
        draw = ImageDraw.Draw(img)
        for cat, colour, (x, y, w, h) in shapes:
            (draw.ellipse if cat == "circle" else draw.rectangle)((x, y, x + w, y + h), fill=COLOURS[colour])
        img.save(root / "images" / name)
        images.append({"id": i, "file_name": name, "width": size[0], "height": size[1]})
        for cat, colour, box in shapes:
            aid = len(anns)
            anns.append(
                {
                    "id": aid,
                    "image_id": i,
                    "category_id": cats[cat],
                    "bbox": list(box),
                    "area": box[2] * box[3],
                    "iscrowd": 0,
                    "caption": f"a {colour} {cat}",
                }
            )
            rec_images.append(
                {"id": aid, "file_name": name, "width": size[0], "height": size[1], "caption": f"the {colour} {cat}"}
            )
            rec_anns.append({"id": aid, "image_id": aid, "bbox": list(box), "category_id": 1})
    categories = [{"id": v, "name": k} for k, v in cats.items()]
    (root / "rec.json").write_text(
        json.dumps({"images": rec_images, "annotations": rec_anns, "categories": [{"id": 1, "name": "object"}]})
    )
    (root / "lvis.json").write_text(json.dumps({"images": images, "annotations": anns, "categories": categories}))
    (root / "det.json").write_text(
        json.dumps({"images": images, "annotations": anns, "categories": [{"id": 1, "name": "object"}]})
    )
    (root / "vg.json").write_text(json.dumps({"images": images, "annotations": anns}))
    make_sentencepiece(root / "tok")
    return root


@pytest.fixture(scope="module")
def model(dataset):
    import groma_core

    return groma_core.load("groma-tiny", [f"language_backbone.tokenizer={dataset / 'tok'}"])


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_rec_writes_ordered_predictions_and_a_complete_summary(dataset, model, tmp_path):
    task = RecTask(dataset / "rec.json", dataset / "images")
    summary = evaluate(task, model, tmp_path / "rec", seed=3, batch_size=2, progress=False, model_name="tiny")
    preds = read_jsonl(tmp_path / "rec" / "predictions.jsonl")
    assert [p["id"] for p in preds] == [s.id for s in task.samples]
    assert all(p["prompt"].count("<p>") == 1 for p in preds)
    assert set(summary["metrics"]) == {"accuracy", "mean_iou", "no_box_rate", "count"}
    assert summary["metrics"]["count"] == 5
    import hashlib

    assert summary["annotation_sha256"] == hashlib.sha256((dataset / "rec.json").read_bytes()).hexdigest()
    assert summary["seed"] == 3 and summary["recipe"]["name"] == "groma-tiny" and "torch" in summary["versions"]
    assert json.loads((tmp_path / "rec" / "summary.json").read_text()) == summary


def test_template_choice_is_seeded(dataset):
    task = RecTask(dataset / "rec.json", dataset / "images")
    a = [task.template_for(s, 0) for s in task.samples]
    assert a == [task.template_for(s, 0) for s in task.samples]
    assert any(a != [task.template_for(s, seed) for s in task.samples] for seed in range(1, 6))


# The reference's eval prompts, verbatim (FoundationVision/Groma): groma/eval/eval_rec.py:14,36 draws from
# groma/data/datasets/refcoco_rec.py:12-19, eval_lvis.py:16,69 from coco.py:12-19, model_vg.py:14,43 from
# visual_genome.py:15-20 and model_refcocog.py:15,81 from refcoco_cap.py:12-18.
REFERENCE_REC = (
    "Locate <p>{}</p> in the image.",
    "Can you spot <p>{}</p> in the photograph?",
    "Identify where <p>{}</p> is located in the picture.",
    "Please detect <p>{}</p> in the picture.",
    "Which region matches the description <p>{}</p>?",
    "Please identify the object that corresponds to <p>{}</p>.",
)
REFERENCE_LVIS = (
    "Locate all <p>{}</p> in this image.",
    "Identify all instances of <p>{}</p> in the photo.",
    "Find all instances of <p>{}</p> in the image.",
    "Point out all the <p>{}</p> visible in this picture.",
    "Detect and list each <p>{}</p> that appears in this photo.",
    "What is the position of each <p>{}</p> in the image?",
)
REF = "<roi><refer_box></roi><refer_feat>"
REFERENCE_VG = (
    f"What is {REF}?",
    f"Please briefly describe {REF}.",
    f"Provide a short description for {REF}.",
    f"Please give a concise description of region {REF}.",
)
REFERENCE_REFCOCOG = (
    f"Can you provide me with a detailed description of {REF}?",
    f"Please describe {REF} in details.",
    f"I'm curious about {REF} in the photo. Can you describe it in detail?",
    f"Please give a comprehensive description of the object {REF}.",
    f"What does the object {REF} in the picture look like? Could you give me a detailed description?",
)


def test_template_sets_are_the_references_and_every_one_is_drawn(dataset):
    tasks = [
        (RecTask(dataset / "rec.json", dataset / "images"), REFERENCE_REC),
        (LvisGroundTask(dataset / "lvis.json", dataset / "images"), REFERENCE_LVIS),
        (RegionCaptionTask(dataset / "vg.json", dataset / "images", style="vg"), REFERENCE_VG),
        (RegionCaptionTask(dataset / "vg.json", dataset / "images", style="refcocog"), REFERENCE_REFCOCOG),
    ]
    for task, reference in tasks:
        assert task.templates == reference  # 6, 6, 4 and 5 templates, in the reference's order
        # the reference's eval scripts draw a template per sample (an unseeded random.choice over the whole list),
        # not a fixed one: the seeded draw reaches every template, in roughly equal shares
        drawn = [task.template_for(Sample(str(i), i, None), seed=0) for i in range(600)]
        assert set(drawn) == set(reference)
        assert min(drawn.count(t) for t in reference) > 600 / len(reference) / 2


def test_prompts_normalise_the_text_as_the_reference_does(dataset, tmp_path):
    ann = {
        "images": [{"id": 1, "file_name": "a.png", "width": 120, "height": 90, "caption": " the red circle "}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 7, "bbox": [10, 10, 40, 40], "area": 1600}],
        "categories": [{"id": 7, "name": "Band_Aid"}],
    }
    (tmp_path / "ann.json").write_text(json.dumps(ann))
    lvis = LvisGroundTask(tmp_path / "ann.json", dataset / "images")
    assert lvis.samples[0].data["category"] == "band aid"  # eval_lvis.py:58: replace('_', ' ').strip().lower()

    class Recorder:
        def answer(self, requests, **kwargs):
            self.prompts = [r.turns[0][0] for r in requests]
            return []

    model = Recorder()
    rec = RecTask(tmp_path / "ann.json", dataset / "images")
    rec.predict(model, rec.samples, 0, 1)
    assert model.prompts == [rec.template_for(rec.samples[0], 0).format("the red circle")]  # label.strip()


def test_resume_continues_without_recomputing(dataset, model, tmp_path):
    task = RecTask(dataset / "rec.json", dataset / "images")
    full = evaluate(task, model, tmp_path / "full", progress=False)
    out = tmp_path / "interrupted"
    evaluate(task, model, out, limit=2, progress=False)  # a run that stopped after two samples
    with open(out / "predictions.jsonl", "a") as f:
        f.write('{"id": "9", "prom')  # and a line cut short by the interruption
    computed: list[str] = []
    original = task.predict

    def counting(model_, samples, seed, batch_size):
        computed.extend(s.id for s in samples)
        return original(model_, samples, seed, batch_size)

    task.predict = counting
    with pytest.raises(GromaError, match="--resume"):
        evaluate(task, model, out, progress=False)
    resumed = evaluate(task, model, out, resume=True, progress=False)
    assert computed == [s.id for s in task.samples[2:]]
    assert resumed["metrics"] == full["metrics"]
    assert read_jsonl(out / "predictions.jsonl") == read_jsonl(tmp_path / "full" / "predictions.jsonl")


def test_lvis_ground_region_caption_and_detection_run(dataset, model, tmp_path):
    lvis = evaluate(LvisGroundTask(dataset / "lvis.json", dataset / "images"), model, tmp_path / "l", progress=False)
    assert set(lvis["metrics"]) == {"AR", "AR50", "AR75", "ARs", "ARm", "ARl"} and lvis["num_samples"] == 4
    task = RegionCaptionTask(dataset / "vg.json", dataset / "images", style="vg")
    cap = evaluate(task, model, tmp_path / "c", progress=False)
    assert "CIDEr" in cap["metrics"] and cap["num_samples"] == 5
    preds = read_jsonl(tmp_path / "c" / "predictions.jsonl")
    assert all("<" not in p["caption"] for p in preds)
    det = evaluate(DetectionTask(dataset / "det.json", dataset / "images"), model, tmp_path / "d", progress=False)
    assert list(det["metrics"]) == list(COCO_SUMMARY) and det["num_samples"] == 3
    # the numbers themselves: test_detection_ap_is_cocos_on_chosen_detections and ..._of_the_embedded_model


def test_bad_annotations_are_clear_errors(dataset, tmp_path):
    with pytest.raises(InputError, match=r"nope\.json: cannot read the annotation file \(No such file"):
        RecTask(tmp_path / "nope.json", dataset / "images")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(InputError, match=r"bad\.json: not valid JSON"):
        RecTask(tmp_path / "bad.json", dataset / "images")
    with pytest.raises(InputError, match=r"nope\.json: cannot read the annotation file \(No such file"):
        DetectionTask(tmp_path / "nope.json", dataset / "images")
    with pytest.raises(InputError, match=r"bad\.json: not valid JSON"):
        DetectionTask(tmp_path / "bad.json", dataset / "images")
    with pytest.raises(InputError, match=r"vg\.json: missing key 'categories'"):
        LvisGroundTask(dataset / "vg.json", dataset / "images")
    with pytest.raises(InputError, match="image folder not found"):
        RecTask(dataset / "rec.json", tmp_path / "no-images")


def test_every_task_reads_its_file_as_training_does(dataset, tmp_path):
    """One reader per format (groma_core.data): a detection file without areas gives each box its own area and keeps
    crowd flags; a RefCOCOg-style region-caption file (the captions on the image entries, several references) is
    read by both; a bad entry is refused by evaluation with the reader's message, naming the entry."""
    from groma_core.data import read_detection, read_region_captions

    ann = json.loads((dataset / "det.json").read_text())
    for a in ann["annotations"]:
        del a["area"]
    ann["annotations"][1]["iscrowd"] = 1
    (tmp_path / "det.json").write_text(json.dumps(ann))
    task = DetectionTask(tmp_path / "det.json", dataset / "images")
    training = read_detection(tmp_path / "det.json")
    assert [s.data["gt_areas"] for s in task.samples] == [list(d.areas) for d in training]
    assert task.samples[0].data["gt_areas"] == [1600.0, 2500.0]  # w * h of (10, 10, 40, 40) and (60, 30, 50, 50)
    assert task.samples[0].data["gt_crowd"] == [False, True]

    refcocog = json.loads((dataset / "rec.json").read_text())
    refcocog["images"][0]["caption"] = ["the red circle", "a red round shape"]
    (tmp_path / "refcocog.json").write_text(json.dumps(refcocog))
    captions = RegionCaptionTask(tmp_path / "refcocog.json", dataset / "images", style="refcocog")
    assert captions.samples[0].data["references"] == ["the red circle", "a red round shape"]
    assert read_region_captions(tmp_path / "refcocog.json")[0].caption == "the red circle"
    assert [s.id for s in captions.samples] == [str(a["id"]) for a in refcocog["annotations"]]

    ann["annotations"][2]["iscrowd"] = "yes"
    (tmp_path / "det.json").write_text(json.dumps(ann))
    with pytest.raises(InputError, match=r"det\.json: annotations\[2\]\.iscrowd: expected 0 or 1, got 'yes'"):
        DetectionTask(tmp_path / "det.json", dataset / "images")


@pytest.mark.heavy
def test_two_processes_under_torchrun_give_the_single_process_result(dataset, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    common = [
        "eval",
        "rec",
        "--ann",
        str(dataset / "rec.json"),
        "--images",
        str(dataset / "images"),
        "--model",
        "groma-tiny",
        "--set",
        f"language_backbone.tokenizer={dataset / 'tok'}",
        "--batch-size",
        "2",
    ]
    single = subprocess.run(
        [sys.executable, "-m", "groma_core.cli", *common, "--out", str(tmp_path / "one")],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert single.returncode == 0, single.stderr
    multi = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "groma_core.cli",
            *common,
            "--out",
            str(tmp_path / "two"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert multi.returncode == 0, multi.stderr[-3000:]
    one = json.loads((tmp_path / "one" / "summary.json").read_text())
    two = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert two["world_size"] == 2 and one["metrics"] == two["metrics"]
    assert read_jsonl(tmp_path / "one" / "predictions.jsonl") == read_jsonl(tmp_path / "two" / "predictions.jsonl")


@pytest.mark.heavy
def test_every_eval_command_runs_on_generated_shapes_data(dataset, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}

    def groma(*args):
        return subprocess.run(
            [sys.executable, "-m", "groma_core.cli", *args], capture_output=True, text=True, env=env, timeout=600
        )

    data = tmp_path / "shapes"
    made = groma("data", "shapes", str(data), "--images", "6", "--seed", "5", "--val-fraction", "0.5")
    assert made.returncode == 0, made.stderr
    model = ["--model", "groma-tiny", "--set", f"language_backbone.tokenizer={dataset / 'tok'}", "--limit", "3"]
    for task, ann, metric in [
        ("rec", "rec_val", "accuracy"),
        ("lvis-ground", "lvis_ground_val", "AR"),
        ("region-caption", "region_captions_val", "CIDEr"),
        ("detection", "detection_val", "AP"),
    ]:
        out = groma(
            "eval",
            task,
            "--ann",
            str(data / "annotations" / f"{ann}.json"),
            "--images",
            str(data / "images"),
            "--out",
            str(tmp_path / task),
            *model,
        )
        assert out.returncode == 0, out.stderr[-2000:]
        summary = json.loads((tmp_path / task / "summary.json").read_text())
        assert metric in summary["metrics"] and summary["num_samples"] == 3


def test_absent_image_is_counted_and_the_run_goes_on(dataset, model, tmp_path):
    ann = json.loads((dataset / "rec.json").read_text())
    ann["images"][1]["file_name"] = "gone.png"
    (tmp_path / "rec.json").write_text(json.dumps(ann))
    summary = evaluate(RecTask(tmp_path / "rec.json", dataset / "images"), model, tmp_path / "out", progress=False)
    assert summary["unreadable_images"] == 1 and summary["num_samples"] == 5
    preds = read_jsonl(tmp_path / "out" / "predictions.jsonl")
    assert "gone.png" in preds[1]["error"] and preds[1]["pred_box"] is None


def test_missing_field_names_file_and_field(dataset, tmp_path):
    ann = json.loads((dataset / "rec.json").read_text())
    del ann["images"][2]["caption"]
    (tmp_path / "rec.json").write_text(json.dumps(ann))
    with pytest.raises(InputError, match=r"rec\.json: images\[2\]: missing key 'caption'"):
        RecTask(tmp_path / "rec.json", dataset / "images")


def test_rec_is_read_as_training_reads_it_one_box_per_expression(dataset, tmp_path):
    """One reader per format (groma_core.data.read_rec): an expression with two boxes is refused by evaluation as
    by training, naming the entry."""
    ann = json.loads((dataset / "rec.json").read_text())
    extra = dict(ann["annotations"][0], id=10_000)
    ann["annotations"].append(extra)
    (tmp_path / "rec.json").write_text(json.dumps(ann))
    expected = r"rec\.json: images\[0\] \(id \d+\): a REC entry needs exactly one annotation, got 2"
    with pytest.raises(InputError, match=expected):
        RecTask(tmp_path / "rec.json", dataset / "images")


def test_resume_with_another_annotation_file_is_refused(dataset, model, tmp_path):
    evaluate(RecTask(dataset / "rec.json", dataset / "images"), model, tmp_path / "out", limit=1, progress=False)
    ann = json.loads((dataset / "rec.json").read_text())
    ann["images"][0]["caption"] = "something else"
    (tmp_path / "other.json").write_text(json.dumps(ann))
    other = RecTask(tmp_path / "other.json", dataset / "images")
    with pytest.raises(GromaError, match="--resume refused: .*annotation_sha256"):
        evaluate(other, model, tmp_path / "out", resume=True, progress=False)


# ------------------------------------------------------------------------------------------------------------------
# Detection: the harness's AP is COCO's
# ------------------------------------------------------------------------------------------------------------------

#: pycocotools' ``COCOeval.stats`` in order, under the harness's names (maxDets 1, 10, 100)
COCO_SUMMARY = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR@1", "AR@10", "AR@100", "ARs", "ARm", "ARl")


def pycocotools_summary(ann_file: Path, detections: dict[int, list[tuple[list[float], float]]]) -> dict[str, float]:
    """pycocotools' twelve class-agnostic bbox numbers for an annotation file and xyxy pixel detections per image
    id (every category folded into one, as the harness folds them)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    ann = json.loads(ann_file.read_text())
    ann["categories"] = [{"id": 1, "name": "object"}]
    for a in ann["annotations"]:
        a["category_id"] = 1
    results = [
        {"image_id": i, "category_id": 1, "bbox": [x1, y1, x2 - x1, y2 - y1], "score": score}
        for i, dets in detections.items()
        for (x1, y1, x2, y2), score in dets
    ]
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = ann
        gt.createIndex()
        evaluator = COCOeval(gt, gt.loadRes(results), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return dict(zip(COCO_SUMMARY, evaluator.stats.tolist()))


class GivenBoxesOptions(StageOptions):
    pass


class GivenBoxesProposer(RegionProposer):
    """Proposes for each image the pixel boxes and scores the test lists for its size, in the listed order (not
    sorted by score): a proposer whose output the test chooses, so that the right AP is known."""

    def __init__(self, detections: dict[tuple[int, int], list[tuple[list[float], float]]]):
        super().__init__()
        self.detections = detections

    def forward(self, features: ImageFeatures) -> Proposals:
        boxes, scores = [], []
        for image in features.images:
            listed = self.detections.get(image.size, [])
            w, h = image.size
            px = torch.tensor([b for b, _ in listed], dtype=torch.float64).reshape(-1, 4)
            boxes.append((px / torch.tensor([w, h, w, h], dtype=torch.float64)).float())
            scores.append(torch.tensor([s for _, s in listed], dtype=torch.float32))
        return Proposals(boxes, scores)


class GivenBoxesPlugin:
    def __init__(self, detections):
        self.detections = detections

    @hookimpl
    def register_region_proposers(self, register):
        register(
            "given-boxes",
            lambda options, context: GivenBoxesProposer(self.detections),
            config=GivenBoxesOptions,
            description="the test's boxes",
        )


# Ground truth (COCO xywh) and detections (xyxy pixels, score) chosen so that every rule of COCO's matching
# changes the result; no IoU lies within 0.01 of a threshold, so float32 box round trips cannot flip a match.
CHOSEN_GT = {  # image id: (size, [(xywh, iscrowd)])
    1: ((200, 150), [([10, 10, 50, 50], 0), ([100, 20, 90, 120], 0), ([0, 100, 80, 50], 1)]),  # medium, large, crowd
    2: ((120, 100), [([10, 10, 20, 20], 0), ([50, 40, 60, 50], 0)]),  # small, medium
    3: ((90, 90), []),
}
CHOSEN_DETECTIONS = {
    1: [
        ([100, 20, 190, 140], 0.9),  # the large box exactly
        ([5, 105, 45, 145], 0.97),  # inside the crowd region: ignored, although it is the top-scored detection
        ([18, 10, 68, 60], 0.6),  # the medium box shifted: IoU 0.724, a match at 0.50..0.70 only
        ([102, 22, 190, 140], 0.55),  # a duplicate of the large box (IoU 0.96): a false positive
    ],
    2: [
        ([10, 10, 30, 30], 0.8),  # the small box exactly
        ([60, 0, 110, 30], 0.95),  # nothing there: a false positive ranked first (medium)
        ([90, 5, 110, 25], 0.85),  # nothing there either: a small false positive ranked above the small box
        ([50, 40, 110, 72], 0.4),  # the medium box cut short: IoU 0.64, a match at 0.50..0.60 only
    ],
    3: [([10, 10, 40, 40], 0.3)],  # an image without objects
}


@pytest.fixture(scope="module")
def chosen(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("chosen")
    (root / "images").mkdir()
    images, anns = [], []
    for image_id, (size, objects) in CHOSEN_GT.items():
        Image.new("RGB", size, (200, 200, 200)).save(root / "images" / f"{image_id}.png")
        images.append({"id": image_id, "file_name": f"{image_id}.png", "width": size[0], "height": size[1]})
        for xywh, crowd in objects:
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": image_id,
                    "category_id": 1 + len(anns) % 2,  # two classes: detection is class-agnostic
                    "bbox": xywh,
                    "area": xywh[2] * xywh[3],
                    "iscrowd": crowd,
                }
            )
    ann = {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}
    (root / "det.json").write_text(json.dumps(ann))
    return root


def test_detection_ap_is_cocos_on_chosen_detections(chosen, dataset, tmp_path):
    from groma_core.api import build
    from groma_core.plugins import PluginManager
    from groma_core.recipe import validate_recipe
    from groma_core.testing import tiny

    manager = PluginManager()
    manager.register_plugin(tiny, name="tiny", distribution="groma-core-tests")
    by_size = {CHOSEN_GT[i][0]: dets for i, dets in CHOSEN_DETECTIONS.items()}
    manager.register_plugin(GivenBoxesPlugin(by_size), name="given", distribution="groma-core-tests")
    recipe = {
        "image_tokenizer": {"plugin": "tiny-conv"},
        "region_proposer": {"plugin": "given-boxes"},
        "region_encoder": {"plugin": "roi-pool"},
        "language_backbone": {"plugin": "tiny-llama", "tokenizer": str(dataset / "tok")},
    }
    model = build(validate_recipe(recipe, manager), manager=manager).eval()
    task = DetectionTask(chosen / "det.json", chosen / "images")
    metrics = evaluate(task, model, tmp_path / "det", progress=False)["metrics"]

    # tolerance 1e-6: both sides divide the same integer counts in float64; only the summation order differs
    expected = pycocotools_summary(chosen / "det.json", CHOSEN_DETECTIONS)
    assert metrics == pytest.approx(expected, abs=1e-6)
    # by hand at IoU 0.5, ranked: FP (0.95), TP, FP, TP, TP, FP, TP, FP; the crowd detection (0.97) is ignored.
    # precision after each: 0, 1/2, 1/3, 2/4, 3/5, 3/6, 4/7, 4/8 at recall 0, 1/4, 1/4, 1/2, 3/4, 3/4, 1, 1 of
    # the 4 objects; interpolated (best to the right): 3/5 at the 76 recall points 0..0.75, 4/7 at the 25 points
    # 0.76..1
    assert metrics["AP50"] == pytest.approx((76 * 3 / 5 + 25 * 4 / 7) / 101, abs=1e-9)

    # a matcher that breaks any rule gives a different AP, so the comparison above would catch it
    dropped_crowd = json.loads((chosen / "det.json").read_text())  # what the harness did before: crowd removed
    dropped_crowd["annotations"] = [a for a in dropped_crowd["annotations"] if not a["iscrowd"]]
    (tmp_path / "no-crowd.json").write_text(json.dumps(dropped_crowd))
    crowd_as_object = json.loads((chosen / "det.json").read_text())
    for a in crowd_as_object["annotations"]:
        a["iscrowd"] = 0
    (tmp_path / "crowd-as-object.json").write_text(json.dumps(crowd_as_object))
    listed_order = {  # scores ignored: detections taken in the proposer's order
        i: [(box, 1.0 - k / 10) for k, (box, _) in enumerate(dets)] for i, dets in CHOSEN_DETECTIONS.items()
    }
    wrong = [
        pycocotools_summary(tmp_path / "no-crowd.json", CHOSEN_DETECTIONS)["AP"],
        pycocotools_summary(tmp_path / "crowd-as-object.json", CHOSEN_DETECTIONS)["AP"],
        pycocotools_summary(chosen / "det.json", listed_order)["AP"],
        expected["AP50"],  # IoU thresholds ignored: every overlap above 0.5 a match
        expected["APs"],  # area ranges ignored: the small, medium and large objects score differently
        expected["APm"],
        expected["APl"],
    ]
    assert all(abs(value - expected["AP"]) > 0.02 for value in wrong), (expected, wrong)
    assert len({round(expected[k], 4) for k in ("APs", "APm", "APl")}) == 3


def test_detection_ap_of_the_embedded_model_is_cocos(tmp_path):
    """The whole path on a real proposer: images read, boxes scaled back to pixels, top 100 by score, scored."""
    import groma_core
    from groma_core.data.shapes import ShapesConfig, write_shapes_dataset

    data = tmp_path / "shapes"
    write_shapes_dataset(data, ShapesConfig(images=8, seed=11, val_fraction=0.5))
    ann_file = data / "annotations" / "detection_val.json"
    task = DetectionTask(ann_file, data / "images")
    summary = evaluate(task, groma_core.load(), tmp_path / "det", progress=False)
    preds = read_jsonl(tmp_path / "det" / "predictions.jsonl")
    assert all(len(p["pred_boxes"]) <= 100 for p in preds)
    assert all(p["pred_scores"] == sorted(p["pred_scores"], reverse=True) for p in preds)
    detections = {int(p["id"]): list(zip(p["pred_boxes"], p["pred_scores"])) for p in preds}
    # tolerance 1e-6: the same detections, scored by both in float64
    assert summary["metrics"] == pytest.approx(pycocotools_summary(ann_file, detections), abs=1e-6)
    # the model finds the shapes (README: AP50 0.84 on 500 held-out images); boxes scaled to the wrong size or
    # matched wrongly would score near 0
    assert summary["metrics"]["AP50"] > 0.5


# ------------------------------------------------------------------------------------------------------------------
# --max-new-tokens
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.heavy
def test_eval_honours_max_new_tokens_and_resume_keeps_it(tmp_path, capsys):
    from groma_core.cli import main
    from groma_core.data.shapes import ShapesConfig, write_shapes_dataset

    data = tmp_path / "shapes"
    write_shapes_dataset(data, ShapesConfig(images=6, seed=5, val_fraction=0.5))
    common = ["eval", "region-caption", "--ann", str(data / "annotations" / "region_captions_val.json")]
    common += ["--images", str(data / "images"), "--limit", "4"]  # no --model: the embedded shapes model

    assert main([*common, "--out", str(tmp_path / "default")]) == 0
    assert main([*common, "--out", str(tmp_path / "one"), "--max-new-tokens", "1"]) == 0
    default = [p["caption"] for p in read_jsonl(tmp_path / "default" / "predictions.jsonl")]
    one = [p["caption"] for p in read_jsonl(tmp_path / "one" / "predictions.jsonl")]
    # the benchmark's own limit (100 tokens) lets the model write phrases such as "a small red hexagon"; one token
    # is one SentencePiece piece, at most one word (a piece holds no inner word boundary)
    assert max(len(c.split()) for c in default) >= 3
    assert all(len(c.split()) <= 1 for c in one) and any(one)
    assert all(d.lower().startswith(o.lower()) for d, o in zip(default, one))  # greedy: the first token of each
    summary = json.loads((tmp_path / "one" / "summary.json").read_text())
    assert summary["max_new_tokens"] == 1
    assert json.loads((tmp_path / "default" / "summary.json").read_text())["max_new_tokens"] == 100

    capsys.readouterr()
    resumed = main([*common, "--out", str(tmp_path / "one"), "--max-new-tokens", "2", "--resume"])
    assert resumed == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("groma: error: --resume refused") and "max_new_tokens (1 then, 2 now)" in err
    assert "\n" not in err


def test_max_new_tokens_is_checked(dataset):
    with pytest.raises(InputError, match="max_new_tokens: expected a positive integer, got 0"):
        RecTask(dataset / "rec.json", dataset / "images", max_new_tokens=0)
    with pytest.raises(InputError, match="the detection task generates no text"):
        DetectionTask(dataset / "det.json", dataset / "images", max_new_tokens=5)
    assert RecTask(dataset / "rec.json", dataset / "images").max_new_tokens == 3  # the reference's eval_rec.py
    assert RegionCaptionTask(dataset / "vg.json", dataset / "images", max_new_tokens=7).max_new_tokens == 7
