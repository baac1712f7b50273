"""How well a small expression encoder finds the REC target from a model's frozen region tokens: the ceiling the
language side could reach with the vision side as it is.

The region tokens of every ground-truth object of a `groma data shapes` image (as the language model receives them,
letterboxed boxes and all) are computed once by the model's frozen stages; a 1-layer bidirectional GRU over the
expression's words gives a query, and the model's own kind of pointer (a bilinear match with the RMS-normalised
region tokens) picks the object. Trained on one dataset's REC expressions, reported on another's, by expression type.
The candidates are the ground-truth objects only (no proposals, no duplicates), so this is a loose upper bound of
what the model's REC could be with these tokens.

    python benchmarks/pointer_probe.py MODEL TRAIN_DATA VAL_DATA [--train-images 1500] [--steps 20000] [--box-key]

`--box-key`: the key of a region also gets a linear map of its box (centre, size and log size in the input frame),
what the model's `region_pointer_box` option does: how much of REC the box itself gives the pointer.
"""

from __future__ import annotations

import argparse
import collections
import json
import platform
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from groma_core.boxes import BOX_GEOMETRY, box_geometry


def region_tokens(model, root: Path, limit: int) -> dict[str, tuple[torch.Tensor, list[list[float]]]]:
    """file name -> (region tokens of its objects followed by their box features, their xyxy pixel boxes)."""
    from groma_core.boxes import to_input_frame
    from groma_core.images import load_image, to_normalized_xyxy

    scenes = json.loads((root / "annotations" / "scenes_train.json").read_text())["images"][:limit]
    out = {}
    with torch.no_grad():
        for scene in scenes:
            image = load_image(root / "images" / scene["file_name"])
            boxes = [[x, y, x + w, y + h] for x, y, w, h in (o["bbox"] for o in scene["objects"])]
            frame = model.image_tokenizer.input_frame(*image.size)
            normalized = to_input_frame(to_normalized_xyxy(boxes, image.size).float(), frame)
            features = model.encode_images(model.image_tokenizer.preprocess([image]), [image])
            tokens = model.region_encoder(features, [normalized])[0].float()
            out[scene["file_name"]] = (torch.cat([tokens, box_geometry(normalized)], 1), boxes)
    return out


def expressions(root: Path, tokens: dict) -> list[tuple[list[str], torch.Tensor, int, str]]:
    """(words, region tokens of the image, index of the target object, expression type) per REC expression."""
    data = json.loads((root / "annotations" / "rec_train.json").read_text())
    box_of = {a["image_id"]: a["bbox"] for a in data["annotations"]}
    out = []
    for info in data["images"]:
        if info["file_name"] not in tokens:
            continue
        regions, boxes = tokens[info["file_name"]]
        x, y, w, h = box_of[info["id"]]
        target = min(range(len(boxes)), key=lambda j: sum(abs(a - b) for a, b in zip(boxes[j], (x, y, x + w, y + h))))
        out.append((info["caption"].split(), regions, target, info.get("ref_type", "all")))
    return out


class ExpressionPointer(nn.Module):
    """A GRU over the words and a bilinear match with each region; the regions (K, width + BOX_GEOMETRY) are tokens
    followed by box features, which only a ``box_key`` pointer uses."""

    def __init__(self, vocabulary: dict[str, int], width: int, box_key: bool = False):
        super().__init__()
        self.vocabulary, self.width = vocabulary, width
        self.embed = nn.Embedding(len(vocabulary) + 1, 128)
        self.gru = nn.GRU(128, 128, batch_first=True, bidirectional=True)
        self.q = nn.Linear(256, width)
        self.k = nn.Linear(width, width)
        self.box = nn.Linear(BOX_GEOMETRY, width) if box_key else None

    def forward(self, words: list[str], regions: torch.Tensor) -> torch.Tensor:
        ids = torch.tensor([[self.vocabulary.get(w, 0) for w in words]])
        query = self.q(self.gru(self.embed(ids))[0].mean(1))[0]
        tokens, boxes = regions[:, : self.width], regions[:, self.width :]
        keys = self.k(tokens / tokens.pow(2).mean(-1, keepdim=True).sqrt())
        if self.box is not None:
            keys = keys + self.box(boxes)
        return keys @ query / self.width**0.5


def accuracy(score: nn.Module, samples: list[tuple]) -> tuple[float, dict[str, float]]:
    """Share of (query, regions, target, kind) samples whose best-scored region is the target, overall and by kind."""
    right = collections.defaultdict(list)
    with torch.no_grad():
        for query, regions, target, kind in samples:
            right[kind].append(int(score(query, regions).argmax()) == target)
    return sum(sum(v) for v in right.values()) / len(samples), {k: sum(v) / len(v) for k, v in sorted(right.items())}


def fit(
    score: nn.Module, train: list[tuple], steps: int, rng: random.Random, report, reports: int = 5, loss=None
) -> None:
    """Train ``score`` (query, regions) -> (K,) on single samples (query, regions, target, ...) drawn from ``train``,
    AdamW at 1e-3, by ``loss(scores, sample)`` (default: cross-entropy on the sample's target); ``report(step)`` is
    called ``reports`` times along the way."""
    optimizer = torch.optim.AdamW(score.parameters(), lr=1e-3)
    for step in range(1, steps + 1):
        sample = rng.choice(train)
        scores = score(sample[0], sample[1])
        value = F.cross_entropy(scores[None], torch.tensor([sample[2]])) if loss is None else loss(scores, sample)
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
        if step % max(steps // reports, 1) == 0:
            report(step)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="checkpoint directory")
    parser.add_argument("train_data", type=Path, help="a `groma data shapes` folder to train the probe on")
    parser.add_argument("val_data", type=Path, help="a `groma data shapes` folder to report on")
    parser.add_argument("--train-images", type=int, default=1500)
    parser.add_argument("--val-images", type=int, default=300)
    parser.add_argument("--steps", type=int, default=20000, help="single-expression steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--box-key", action="store_true", help="the key also maps the region's box")
    args = parser.parse_args()

    import groma_core

    began = time.perf_counter()
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    model = groma_core.load(args.model).eval()
    train = expressions(args.train_data, region_tokens(model, args.train_data, args.train_images))
    val = expressions(args.val_data, region_tokens(model, args.val_data, args.val_images))
    words = sorted({w for sample in train for w in sample[0]})
    width = train[0][1].shape[1] - BOX_GEOMETRY
    probe = ExpressionPointer({w: i + 1 for i, w in enumerate(words)}, width, box_key=args.box_key)
    print(f"model {args.model}; {len(train)} training / {len(val)} validation expressions; "
          f"machine {platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads")

    def report(step: int) -> None:
        overall, kinds = accuracy(probe, val)
        print(f"step {step}: validation {overall:.3f} ({', '.join(f'{k} {v:.3f}' for k, v in kinds.items())})",
              flush=True)

    fit(probe, train, args.steps, rng, report)
    print(f"took {time.perf_counter() - began:.0f} s")


if __name__ == "__main__":
    main()
