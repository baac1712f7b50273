"""Where a model's REC accuracy on synthetic shapes is lost: how often region selection offers the target at all,
and how much of each shape's colour and shape name the image features and the region tokens still hold.

    python benchmarks/rec_ceiling.py WORKDIR [--model DIR] [--images 300] [--probe-images 800] [--seed 2]

1. Ceiling: REC is answered by naming one of the selected regions, so accuracy@0.5 can be no higher than the share of
   expressions whose target has a selected region with IoU >= 0.5. Printed at the model's own score threshold and at
   lower ones (with the regions per image that each brings), and over all raw proposals.
2. Probes: a small MLP (fixed seed; for the region tokens also a linear probe) is trained to read the colour
   (12 classes) and the shape name (8 classes) of
   ground-truth shapes from (a) the image-feature levels sampled on a 7x7 grid inside the box, (b) the input pixels
   the same way, (c) the region tokens the language model receives; for the region tokens also the place a region
   caption names (the cell of a 3 x 3 grid holding the box's centre, "in the top left corner"), read just as well
   from the box alone. Held-out accuracy; chance is 1/12, 1/8 and about 1/9.
   The encoder squashes every image to a square (as the reference does), so a circle and an ellipse, or a square and
   a rectangle, can look alike: the pixel probe's commonest confusions are printed.

WORKDIR receives two generated datasets (held-out REC images, probe images); nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F
from default_model import machine  # benchmarks/ is on the path when this script runs


def _xywh_to_xyxy(box: list[float]) -> list[float]:
    x, y, w, h = box
    return [x, y, x + w, y + h]


def dataset(root: Path, images: int, seed: int) -> Path:
    from groma_core.data.shapes import ShapesConfig, write_shapes_dataset

    if not (root / "annotations" / "scenes_train.json").exists():
        write_shapes_dataset(root, ShapesConfig(images=images, seed=seed, val_fraction=0.0, rec_per_image=1))
    return root


@torch.no_grad()
def ceiling(model, root: Path, thresholds: list[float]) -> None:
    from groma_core.boxes import box_iou, to_input_frame
    from groma_core.images import load_image, to_normalized_xyxy
    from groma_core.selection import select_regions

    ann = json.loads((root / "annotations" / "rec_train.json").read_text())
    infos = {i["id"]: i for i in ann["images"]}
    own = model.selection.score_threshold
    settings = {t: model.selection.model_copy(update={"score_threshold": t}) for t in thresholds}
    offered = {"all proposals": [], **{t: [] for t in thresholds}}
    counts: dict[float, list[int]] = {t: [] for t in thresholds}
    for a in ann["annotations"]:
        image = load_image(root / "images" / infos[a["image_id"]]["file_name"])
        target = to_normalized_xyxy([_xywh_to_xyxy(a["bbox"])], image.size).float()
        target = to_input_frame(target, model.image_tokenizer.input_frame(*image.size))  # proposals live there
        proposals = model.region_proposer(model.encode_images(model.image_tokenizer.preprocess([image]), [image]))
        offered["all proposals"].append(bool(box_iou(proposals.boxes[0].float(), target).max() >= 0.5))
        for threshold, setting in settings.items():
            regions = select_regions(proposals, setting).boxes[0].float()
            offered[threshold].append(bool(len(regions)) and bool(box_iou(regions, target).max() >= 0.5))
            counts[threshold].append(len(regions))
    print(f"ceiling of REC accuracy@0.5 on {len(ann['annotations'])} expressions:")
    for key, values in offered.items():
        if key in counts:
            mark = " (the model's setting)" if key == own else ""
            label = f"selected at score >= {key:g}{mark}"
            extra = f", {sum(counts[key]) / len(counts[key]):.1f} regions per image"
        else:
            label, extra = key, ""
        print(f"  {label}: {sum(values) / len(values):.3f}{extra}")


def _centre(box: list[float]) -> tuple[float, float]:
    return box[0] + box[2] / 2, box[1] + box[3] / 2


def grid_sample(level: torch.Tensor, box: list[float], cells: int = 7) -> torch.Tensor:
    """``level`` (C, h, w) sampled at the centres of a cells x cells grid over the normalized xyxy ``box``."""
    x1, y1, x2, y2 = box
    xs = torch.linspace(x1, x2, 2 * cells + 1)[1::2] * 2 - 1
    ys = torch.linspace(y1, y2, 2 * cells + 1)[1::2] * 2 - 1
    grid = torch.stack(torch.meshgrid(ys, xs, indexing="ij")[::-1], -1)[None]
    return F.grid_sample(level[None].float(), grid, align_corners=False)[0].flatten()


@torch.enable_grad()
def probe_accuracy(x: torch.Tensor, labels: list[str], seed: int = 0, linear: bool = False) -> tuple[float, Counter]:
    """Held-out accuracy of an MLP probe (or a linear one) and its confusions (true, predicted)."""
    classes = sorted(set(labels))
    y = torch.tensor([classes.index(v) for v in labels])
    split = int(0.8 * len(x))
    x = (x - x[:split].mean(0)) / (x[:split].std(0) + 1e-2)
    torch.manual_seed(seed)
    if linear:
        net = torch.nn.Sequential(torch.nn.Dropout(0.2), torch.nn.Linear(x.shape[1], len(classes)))
    else:
        net = torch.nn.Sequential(
            torch.nn.Dropout(0.2), torch.nn.Linear(x.shape[1], 256), torch.nn.ReLU(), torch.nn.Linear(256, len(classes))
        )
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0.05)
    for _ in range(600):
        batch = torch.randint(0, split, (256,))
        optimizer.zero_grad()
        F.cross_entropy(net(x[batch]), y[batch]).backward()
        optimizer.step()
    net.eval()
    with torch.no_grad():
        predicted = net(x[split:]).argmax(1)
    confusions = Counter((classes[t], classes[p]) for t, p in zip(y[split:].tolist(), predicted.tolist()) if t != p)
    return (predicted == y[split:]).float().mean().item(), confusions


@torch.no_grad()
def probes(model, root: Path) -> None:
    from groma_core.boxes import to_input_frame
    from groma_core.data.shapes import location_cell
    from groma_core.images import load_image, to_normalized_xyxy

    scenes = json.loads((root / "annotations" / "scenes_train.json").read_text())["images"]
    features: dict[str, list[torch.Tensor]] = {}
    colours, shapes, places = [], [], []
    for scene in scenes:
        image = load_image(root / "images" / scene["file_name"])
        normalized = to_normalized_xyxy([_xywh_to_xyxy(o["bbox"]) for o in scene["objects"]], image.size).float()
        normalized = to_input_frame(normalized, model.image_tokenizer.input_frame(*image.size))
        pixels = model.image_tokenizer.preprocess([image])
        encoded = model.encode_images(pixels, [image])
        maps = {f"image level {name}": level[0] for name, level in encoded.levels.items()}
        maps["input pixels"] = pixels[0]
        for name, level in maps.items():
            features.setdefault(name, []).extend(grid_sample(level, box) for box in normalized.tolist())
        features.setdefault("region tokens", []).extend(model.region_encoder(encoded, [normalized])[0].float())
        colours += [o["colour"] for o in scene["objects"]]
        shapes += [o["shape"] for o in scene["objects"]]
        places += [location_cell(*_centre(o["bbox"]), scene["width"], scene["height"]) for o in scene["objects"]]
    print(
        f"probes on {len(colours)} shapes of {len(scenes)} images (80% train / 20% held out), colour / shape name"
        " (and for the region tokens the place a region caption names, a cell of the 3 x 3 grid):"
    )
    for name, rows in features.items():
        x = torch.stack(rows)
        (colour, _), (shape, confusions) = probe_accuracy(x, colours), probe_accuracy(x, shapes)
        if name != "region tokens":
            print(f"  {name:<22} {colour:.3f} / {shape:.3f}")
            continue
        print(f"  {name:<22} {colour:.3f} / {shape:.3f} / {probe_accuracy(x, places)[0]:.3f}")
        # what the language model reads, through a linear probe (the gate)
        (colour, _), (shape, _) = probe_accuracy(x, colours, linear=True), probe_accuracy(x, shapes, linear=True)
        place = probe_accuracy(x, places, linear=True)[0]
        print(f"  {'region tokens, linear':<22} {colour:.3f} / {shape:.3f} / {place:.3f}")
        if name == "input pixels":
            common = ", ".join(f"{t} as {p} {n}" for (t, p), n in confusions.most_common(4))
            print(f"    most common shape confusions from the pixels: {common} (of {sum(confusions.values())} errors)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdir", type=Path)
    parser.add_argument("--model", help="checkpoint directory (default: the embedded model)")
    parser.add_argument("--images", type=int, default=300, help="held-out REC images for the ceiling")
    parser.add_argument("--probe-images", type=int, default=800)
    parser.add_argument("--seed", type=int, default=2, help="seed of the held-out images (the probe uses seed+1)")
    parser.add_argument("--thresholds", default="0.15,0.1,0.05")
    args = parser.parse_args()

    import groma_core

    began = time.perf_counter()
    model = (groma_core.load(args.model) if args.model else groma_core.load()).eval()
    print(f"model: {args.model or 'embedded default'}; machine: {machine()}, {torch.get_num_threads()} threads")
    thresholds = sorted({model.selection.score_threshold, *map(float, args.thresholds.split(","))}, reverse=True)
    ceiling(model, dataset(args.workdir / "rec", args.images, args.seed), thresholds)
    probes(model, dataset(args.workdir / "probe", args.probe_images, args.seed + 1))
    print(f"took {time.perf_counter() - began:.0f} s")


if __name__ == "__main__":
    main()
