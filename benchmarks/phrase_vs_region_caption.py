"""Where a grounded caption's wrong shape names come from. For the phrases of a grounded-caption evaluation whose box
lands on a ground-truth shape (IoU >= 0.5): is the phrase right, does a region caption of the same (proposed) box
name that shape, and does a region caption of the ground-truth box?

    python benchmarks/phrase_vs_region_caption.py EVAL_DIR/predictions.jsonl MODEL IMAGES_DIR [--limit 300]

EVAL_DIR is a ``groma eval grounded-caption --out`` folder of a ``groma data shapes`` dataset (images ``%06d.png``).
A phrase or caption is compared by its first two content words (colour and shape; size and place words left out).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
from collections import Counter
from functools import lru_cache
from pathlib import Path

import torch
from PIL import Image

from groma_core.boxes import box_iou
from groma_core.inference import Groma

LEFT_OUT = {"a", "an", "the", "two", "three", "four", "five", "six", "small", "large", "in", "on", "of"}


def name(text: str) -> tuple[str, ...]:
    """The colour and shape a phrase names: its first two words but counts, sizes and places (plural -s dropped)."""
    words = [w for w in re.findall(r"[a-z]+", text.lower().split(" in the ")[0]) if w not in LEFT_OUT]
    return tuple(w[:-1] if w.endswith("s") and len(w) > 3 else w for w in words[:2])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("predictions", type=Path)
    parser.add_argument("model")
    parser.add_argument("images", type=Path)
    parser.add_argument("--limit", type=int, default=300)
    args = parser.parse_args()
    groma = Groma.load(args.model)
    items = []
    for line in args.predictions.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        truth = [(name(p), box) for p, boxes in record["gt_phrases"] for box in boxes]
        for phrase, boxes in record["phrases"]:
            if not boxes or not truth:
                continue
            iou = box_iou(torch.tensor([boxes[0]]), torch.tensor([b for _, b in truth]))[0]
            best = int(iou.argmax())
            if iou[best] >= 0.5:
                items.append((record["id"], name(phrase), truth[best][0], boxes[0], truth[best][1]))
    image_of = lru_cache(maxsize=1)(lambda i: Image.open(args.images / f"{int(i):06d}.png").convert("RGB"))
    counts = Counter()
    for image_id, said, shown, box, true_box in items[: args.limit]:  # an image's phrases come together: one read
        image = image_of(image_id)
        at_box, at_truth = (name(a.text) for a in groma.describe_region([image, image], [box, true_box]))
        counts["phrases on a shape"] += 1
        counts["phrase names it"] += said == shown
        counts["region caption of the phrase's box names it"] += at_box == shown
        counts["region caption of the true box names it"] += at_truth == shown
        counts["phrase says what its box's region caption says"] += said == at_box
    print(f"machine: {os.cpu_count()}-core {platform.machine()}, Python {platform.python_version()}")
    for what, n in counts.items():
        print(f"{what}: {n} ({n / counts['phrases on a shape']:.2f})")


if __name__ == "__main__":
    main()
