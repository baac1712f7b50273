"""The synthetic shapes dataset: determinism, every annotation format read back, boxes against pixels, and
referring expressions re-derived from the scene metadata by an independent reading of their grammar."""

from __future__ import annotations

import argparse
import hashlib
import json
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from groma_core.cli_data import add_data_commands
from groma_core.data import (
    PALETTE,
    SHAPES,
    ShapesConfig,
    generate_scene,
    read_detection,
    read_grounded_captions,
    read_instruct,
    read_lvis_ground,
    read_rec,
    read_region_captions,
    write_shapes_dataset,
)
from groma_core.data.shapes import parse_count_range, parse_size_ranges
from groma_core.errors import InputError
from groma_core.evaluation import GroundingSample, lvis_ground_recall, rec_accuracy

CONFIG = ShapesConfig(images=30, seed=7, width=(160, 320), height=(120, 260), val_fraction=0.2)
FORMATS = ("scenes", "detection", "rec", "region_captions", "region_captions_multi", "flickr", "lvis_ground",
           "instruct", "captions")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shapes") / "out"
    write_shapes_dataset(out, CONFIG)
    return out


def digests(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def load(dataset: Path, stem: str, split: str = "train"):
    return json.loads((dataset / "annotations" / f"{stem}_{split}.json").read_text())


def scenes(dataset: Path) -> dict[int, dict]:
    """Image id -> scene record, over both splits."""
    return {image["id"]: image for split in ("train", "val") for image in load(dataset, "scenes", split)["images"]}


def objects_by_id(dataset: Path) -> dict[int, dict]:
    return {obj["id"]: obj for scene in scenes(dataset).values() for obj in scene["objects"]}


def test_same_seed_gives_byte_identical_files_and_another_seed_differs(dataset, tmp_path):
    write_shapes_dataset(tmp_path / "again", CONFIG)
    first, again = digests(dataset), digests(tmp_path / "again")
    assert first == again
    assert len([name for name in first if name.startswith("images/")]) == CONFIG.images
    assert {f"annotations/{stem}_{split}.json" for stem in FORMATS for split in ("train", "val")} <= set(first)

    other = tmp_path / "other"
    write_shapes_dataset(other, replace(CONFIG, seed=8))
    changed = [name for name, digest in digests(other).items() if first.get(name) != digest]
    assert len([name for name in changed if name.startswith("images/")]) == CONFIG.images
    assert "annotations/detection_train.json" in changed


def test_image_k_depends_only_on_seed_and_k(dataset):
    small = ShapesConfig(images=3, seed=CONFIG.seed, width=CONFIG.width, height=CONFIG.height)
    scene = generate_scene(small, 3)
    assert np.array_equal(np.asarray(Image.open(dataset / "images" / "000003.png")), scene.pixels)


def test_summary_counts_match_the_files(dataset):
    summary = json.loads((dataset / "dataset.json").read_text())
    assert summary["seed"] == CONFIG.seed and summary["options"]["images"] == CONFIG.images
    assert summary["splits"]["train"]["images"] + summary["splits"]["val"]["images"] == CONFIG.images
    assert summary["splits"]["val"]["images"] == round(CONFIG.images * CONFIG.val_fraction)
    for split, counts in summary["splits"].items():
        assert set(counts["files"]) == set(FORMATS)
        assert counts["objects"] == len(load(dataset, "detection", split)["annotations"])
        assert counts["referring_expressions"] == len(load(dataset, "rec", split)["images"])
        assert counts["lvis_queries"] == len(load(dataset, "lvis_ground", split)["images"])


def test_scenes_vary_in_size_count_background_and_occlusion(dataset):
    records = list(scenes(dataset).values())
    sizes = {(s["width"], s["height"]) for s in records}
    assert len(sizes) > 20 and any(w != h for w, h in sizes)
    assert all(160 <= w <= 320 and 120 <= h <= 260 for w, h in sizes)
    counts = [len(s["objects"]) for s in records]
    assert min(counts) >= 1 and max(counts) <= 8 and len(set(counts)) >= 4
    assert len({s["background"]["kind"] for s in records}) >= 4
    assert any(o["occluded_by"] for s in records for o in s["objects"])
    assert len({o["shape"] for s in records for o in s["objects"]}) == len(SHAPES)


def test_every_file_reads_back_with_its_reader(dataset):
    for split in ("train", "val"):
        path = dataset / "annotations"
        detection = read_detection(path / f"detection_{split}.json")
        assert sum(len(d.boxes) for d in detection) == len(load(dataset, "detection", split)["annotations"])
        assert read_rec(path / f"rec_{split}.json")
        single = read_region_captions(path / f"region_captions_{split}.json")
        multi = read_region_captions(path / f"region_captions_multi_{split}.json")
        assert len(single) == len(multi) == sum(len(d.boxes) for d in detection)
        assert len(read_grounded_captions(path / f"flickr_{split}.json")) == len(detection)
        assert read_lvis_ground(path / f"lvis_ground_{split}.json")
        assert len(read_instruct(path / f"instruct_{split}.json")) == len(detection)
        captions = load(dataset, "captions", split)
        assert all(c["conversations"][0]["value"].startswith("<image>\n") for c in captions)
    detection = load(dataset, "detection")
    names = {c["id"]: c["name"] for c in detection["categories"]}
    objects = objects_by_id(dataset)
    for a in detection["annotations"]:  # each box's category names its colour and shape (the attribute loss reads it)
        obj = objects[a["id"]]
        assert names[a["category_id"]] == f"{obj['colour']}_{obj['shape']}" and a["iscrowd"] == 0
    labels = [label for d in read_detection(dataset / "annotations" / "detection_train.json") for label in d.labels]
    assert len(set(labels)) > 5 and min(labels) >= 1


def test_boxes_lie_inside_their_images_and_fit_the_drawn_shapes(dataset):
    for scene in scenes(dataset).values():
        pixels = np.asarray(Image.open(dataset / "images" / scene["file_name"]))
        assert pixels.shape == (scene["height"], scene["width"], 3)
        for obj in scene["objects"]:
            x, y, w, h = obj["bbox"]
            assert 0 <= x and 0 <= y and w >= 1 and h >= 1
            assert x + w <= scene["width"] and y + h <= scene["height"]
            own = np.all(pixels[y : y + h, x : x + w] == obj["rgb"], axis=2)
            assert own.sum() >= obj["area"]
            if not obj["occluded_by"]:
                assert obj["area"] == obj["shape_area"]
            # the box is tight: its colour reaches every side
            assert own[0].any() and own[-1].any() and own[:, 0].any() and own[:, -1].any()
            assert obj["rgb"] == list(PALETTE[obj["colour"]])


def test_detection_and_rec_boxes_are_the_scene_boxes(dataset):
    objects = objects_by_id(dataset)
    for annotation in load(dataset, "detection")["annotations"]:
        assert annotation["bbox"] == objects[annotation["id"]]["bbox"]
        assert annotation["area"] == objects[annotation["id"]]["area"]
    rec = load(dataset, "rec")
    images = {image["id"]: image for image in rec["images"]}
    for annotation in rec["annotations"]:
        obj = objects[annotation["original_id"]]
        assert annotation["bbox"] == obj["bbox"]
        assert obj["id"] // 100 == images[annotation["image_id"]]["original_id"]


# An independent reading of the expressions: a candidate "could be meant" when it fits the words; the referent must
# be the only such candidate.
DESCRIPTION = rf"(?:({'|'.join(PALETTE)}) )?({'|'.join(SHAPES)}|shape)"


def fits(obj: dict, colour: str | None, shape: str) -> bool:
    return (colour is None or obj["colour"] == colour) and (shape == "shape" or obj["shape"] == shape)


def centre(obj: dict) -> tuple[float, float]:
    x, y, w, h = obj["bbox"]
    return x + w / 2, y + h / 2


def could_mean(expression: str, objects: list[dict]) -> list[int]:
    """Indices of every shape the expression could describe."""
    match = re.fullmatch(rf"the {DESCRIPTION} (left of|right of|above|below) the {DESCRIPTION}", expression)
    if match:
        colour, shape, relation, anchor_colour, anchor_shape = match.groups()
        anchors = [o for o in objects if fits(o, anchor_colour, anchor_shape)]
        assert len(anchors) == 1, f"{expression!r}: the anchor must be unique"
        ax, ay = centre(anchors[0])
        side = {"left of": lambda x, y: x < ax, "right of": lambda x, y: x > ax,
                "above": lambda x, y: y < ay, "below": lambda x, y: y > ay}[relation]
        return [o["index"] for o in objects
                if o is not anchors[0] and fits(o, colour, shape) and side(*centre(o))]
    match = re.fullmatch(rf"the (leftmost|rightmost|topmost|bottommost|biggest|smallest|small|big) {DESCRIPTION}",
                         expression)
    if match:
        word, colour, shape = match.groups()
        candidates = [o for o in objects if fits(o, colour, shape)]
        if word in ("small", "big"):
            assert len(candidates) == 2, f"{expression!r}: small/big compare two shapes"
        key = {"leftmost": lambda o: centre(o)[0], "rightmost": lambda o: -centre(o)[0],
               "topmost": lambda o: centre(o)[1], "bottommost": lambda o: -centre(o)[1],
               "smallest": lambda o: o["shape_area"], "small": lambda o: o["shape_area"],
               "biggest": lambda o: -o["shape_area"], "big": lambda o: -o["shape_area"]}[word]
        best = min(key(o) for o in candidates)
        return [o["index"] for o in candidates if key(o) == best]
    match = re.fullmatch(rf"the {DESCRIPTION}", expression)
    assert match, f"{expression!r} is outside the grammar"
    return [o["index"] for o in objects if fits(o, *match.groups())]


def test_referring_expressions_pick_out_exactly_their_shape(dataset):
    kinds = set()
    for split in ("train", "val"):
        rec = load(dataset, "rec", split)
        all_scenes = {s["id"]: s for s in load(dataset, "scenes", split)["images"]}
        boxes = {a["image_id"]: a for a in rec["annotations"]}
        for entry in rec["images"]:
            scene = all_scenes[entry["original_id"]]
            target = next(o for o in scene["objects"] if o["id"] == boxes[entry["id"]]["original_id"])
            assert could_mean(entry["caption"], scene["objects"]) == [target["index"]], entry["caption"]
            assert (entry["file_name"], entry["width"], entry["height"]) == (
                scene["file_name"], scene["width"], scene["height"])
            kinds.add(entry["ref_type"])
    assert kinds == {"attribute", "size", "position", "relation"}


def test_flickr_spans_index_the_caption_exactly(dataset):
    objects = objects_by_id(dataset)
    flickr = load(dataset, "flickr")
    captions = {image["id"]: image["caption"] for image in flickr["images"]}
    per_image: dict[int, int] = {}
    for annotation in flickr["annotations"]:
        caption = captions[annotation["image_id"]]
        [[start, end]] = annotation["tokens_positive"]
        phrase = caption[start:end]
        obj = objects[annotation["id"]]
        assert phrase == annotation["phrase"]
        assert obj["colour"] in phrase and obj["shape"] in phrase
        assert annotation["bbox"] == obj["bbox"]
        per_image[annotation["image_id"]] = per_image.get(annotation["image_id"], 0) + 1
    assert per_image == {s["id"]: len(s["objects"]) for s in load(dataset, "scenes")["images"]}
    grouped = [p for c in read_grounded_captions(dataset / "annotations" / "flickr_train.json") for p in c.phrases]
    assert any(len(p.boxes) > 1 for p in grouped)
    assert all(re.match(r"(two|three|four|five|six|seven|eight) ", p.text.lower()) for p in grouped if len(p.boxes) > 1)


def test_each_phrase_style_names_every_shape_once_left_to_right_over_the_same_images(dataset, tmp_path):
    """``phrases="each"`` gives every shape its own grounded phrase, in the order of the shapes' centres from left to
    right, in the grounded captions (and the plain captions made from them) and the conversations alike; the images
    and every other file stay the same."""
    out = tmp_path / "each"
    write_shapes_dataset(out, replace(CONFIG, phrases="each"))
    grouped, each = digests(dataset), digests(out)
    changed = {name for name in grouped if grouped[name] != each[name]}
    stems = ("flickr", "captions", "instruct")
    assert changed == {f"annotations/{stem}_{split}.json" for stem in stems for split in ("train", "val")} | {
        "dataset.json"}
    objects = objects_by_id(out)
    centres = {(o["bbox"][0] + o["bbox"][2] / 2, o["id"]) for o in objects.values()}
    assert len(centres) == len(objects)
    captions = read_grounded_captions(out / "annotations" / "flickr_train.json")
    for caption, scene in zip(captions, [s for s in load(out, "scenes")["images"] if s["objects"]]):
        assert [len(p.boxes) for p in caption.phrases] == [1] * len(scene["objects"])
        xs = [(p.boxes[0][0] + p.boxes[0][2]) / 2 for p in caption.phrases]
        assert xs == sorted(xs)
    for entry in load(out, "instruct"):
        for gpt in entry["conversation"][1::2]:
            assert all(g == "<ground_box>" for g in re.findall(r"</p><roi>((?:<ground_box>)+)</roi>", gpt["value"]))
    with pytest.raises(InputError, match="phrases: expected one of grouped, each, got 'all'"):
        replace(CONFIG, phrases="all")


def test_instruct_gpt_turns_ground_one_box_per_placeholder(dataset):
    all_scenes = scenes(dataset)
    for entry in load(dataset, "instruct"):
        scene = all_scenes[entry["id"]]
        assert entry["boxes"] == [o["bbox"] for o in scene["objects"]]
        turns = entry["conversation"]
        assert 4 <= len(turns) <= 8 and [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
        for human, gpt in zip(turns[::2], turns[1::2]):
            assert "[grounding]" not in human["value"] and "<image>" not in human["value"]
            assert gpt["value"].count("<ground_box>") == len(gpt["box_inds"]) >= 1
            grounded = re.findall(r"<p>([^<]+)</p><roi>((?:<ground_box>)+)</roi>", gpt["value"])
            assert sum(g.count("<ground_box>") for _, g in grounded) == len(gpt["box_inds"])
            inds = iter(gpt["box_inds"])
            for phrase, placeholders in grounded:
                for _ in range(placeholders.count("<ground_box>")):
                    obj = scene["objects"][next(inds)]
                    assert obj["shape"] in phrase or "shape" in phrase, (phrase, obj)


def category_parts(name: str) -> tuple[str | None, str]:
    """(colour or None, shape) of an LVIS-Ground category name such as "red_circle" or "circle"."""
    words = name.split("_")
    return (None, words[0]) if len(words) == 1 else (words[0], words[1])


def test_lvis_ground_queries_hold_every_shape_of_their_category(dataset):
    lvis = load(dataset, "lvis_ground")
    categories = {c["id"]: c for c in lvis["categories"]}
    assert len(categories) == len(SHAPES) * (1 + len(PALETTE))
    assert all(c["frequency"] in ("r", "c", "f") for c in categories.values())
    all_scenes = scenes(dataset)
    queries = read_lvis_ground(dataset / "annotations" / "lvis_ground_train.json")
    entries = {image["id"]: image for image in lvis["images"]}
    seen = set()
    for query in queries:
        entry = entries[query.image.id]
        scene = all_scenes[entry["original_id"]]
        assert entry["coco_url"].replace("http://images.cocodataset.org/", "") == scene["file_name"]
        colour, shape = category_parts(query.category.replace(" ", "_"))
        expected = sorted(tuple(float(v) for v in (x, y, x + w, y + h))
                          for x, y, w, h in (o["bbox"] for o in scene["objects"] if fits(o, colour, shape)))
        assert sorted(query.boxes) == expected and expected
        assert query.category_id not in entry["neg_category_ids"]
        present = {c for c in categories
                   if any(fits(o, *category_parts(categories[c]["name"])) for o in scene["objects"])}
        assert set(entry["neg_category_ids"]) == set(categories) - present
        seen.add((scene["id"], query.category_id))
    assert len(seen) == len(queries)
    assert any(len(q.boxes) > 1 for q in queries)


def test_readers_feed_the_evaluation_metrics(dataset):
    rec = read_rec(dataset / "annotations" / "rec_val.json")
    gt = [sample.box for sample in rec]
    assert rec_accuracy(gt, gt).accuracy == 1.0
    shifted = [(x1 + (x2 - x1), y1, x2 + (x2 - x1), y2) for x1, y1, x2, y2 in gt]  # moved right by its width
    assert rec_accuracy(shifted, gt).accuracy == 0.0
    queries = read_lvis_ground(dataset / "annotations" / "lvis_ground_val.json")
    samples = [GroundingSample(q.image.id, q.category_id, q.boxes, q.boxes, q.areas) for q in queries]
    assert lvis_ground_recall(samples).ar == pytest.approx(1.0)


def test_region_captions_name_colour_and_shape(dataset):
    objects = objects_by_id(dataset)
    single = load(dataset, "region_captions")
    assert len(single["images"]) == len(single["annotations"])
    for annotation in single["annotations"]:
        obj = objects[annotation["original_id"]]
        caption = annotation["caption"]
        assert caption.startswith(("a ", "an ")) and f"{obj['colour']} {obj['shape']}" in caption
        assert annotation["bbox"] == obj["bbox"]


def cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="groma")
    add_data_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(list(argv))
    return args.func(args)


def test_cli_writes_a_dataset_and_guards_the_output_folder(tmp_path, capsys):
    out = tmp_path / "cli"
    assert cli("data", "shapes", str(out), "--images", "4", "--seed", "3", "--size", "128x96-160",
               "--val-fraction", "0.5", "--objects", "2-3") == 0
    printed = capsys.readouterr().out
    assert "train: 2 images" in printed and "val: 2 images" in printed
    summary = json.loads((out / "dataset.json").read_text())
    assert summary["options"]["width"] == [128, 128] and summary["options"]["objects"] == [2, 3]
    for image in Image.open(out / "images" / "000001.png"), Image.open(out / "images" / "000004.png"):
        assert image.size[0] == 128 and 96 <= image.size[1] <= 160 and image.mode == "RGB"
    before = digests(out)
    with pytest.raises(InputError, match="--overwrite"):
        cli("data", "shapes", str(out), "--images", "2")
    assert cli("data", "shapes", str(out), "--images", "4", "--seed", "3", "--size", "128x96-160",
               "--val-fraction", "0.5", "--objects", "2-3", "--overwrite") == 0
    assert digests(out) == before
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(InputError, match="does not hold a shapes dataset"):
        cli("data", "shapes", str(foreign), "--overwrite")
    assert (foreign / "notes.txt").read_text() == "keep me"
    assert cli("data") == 0 and "shapes" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--size", "wide"], "--size"),
        (["--size", "32x400"], "width"),
        (["--objects", "3-1"], "objects"),
        (["--objects", "a"], "--objects"),
        (["--images", "0"], "images"),
        (["--val-fraction", "1"], "val_fraction"),
    ],
)
def test_cli_rejects_bad_options_naming_them(tmp_path, argv, message):
    with pytest.raises(InputError, match=message):
        cli("data", "shapes", str(tmp_path / "x"), *argv)
    assert not (tmp_path / "x").exists()


def test_size_and_count_ranges_parse():
    assert parse_size_ranges("320-640x240-480") == ((320, 640), (240, 480))
    assert parse_size_ranges("512X384") == ((512, 512), (384, 384))
    assert parse_count_range("1-8") == (1, 8) and parse_count_range("4") == (4, 4)


def test_readers_name_the_file_and_key_of_a_broken_record(dataset, tmp_path):
    entries = load(dataset, "instruct")
    gpt = entries[0]["conversation"][1]
    gpt["box_inds"] = gpt["box_inds"] + [0]
    bad = tmp_path / "instruct.json"
    bad.write_text(json.dumps(entries))
    with pytest.raises(InputError, match=r"instruct\.json: \[0\]\.conversation\[1\]: the value holds \d+ <ground_box>"):
        read_instruct(bad)
    rec = load(dataset, "rec")
    del rec["images"][1]["caption"]
    bad = tmp_path / "rec.json"
    bad.write_text(json.dumps(rec))
    with pytest.raises(InputError, match=r"rec\.json: images\[1\]: missing key 'caption'"):
        read_rec(bad)
    flickr = load(dataset, "flickr")
    flickr["annotations"][0]["tokens_positive"] = [[0, 10_000]]
    bad = tmp_path / "flickr.json"
    bad.write_text(json.dumps(flickr))
    with pytest.raises(InputError, match=r"annotations\[0\]\.tokens_positive"):
        read_grounded_captions(bad)
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(InputError, match="not valid JSON"):
        read_detection(tmp_path / "broken.json")
