"""The GRU probe of `pointer_probe.py` over the regions the model itself selects (not the ground-truth objects):
how much of REC the candidates cost. Training samples are REC expressions with the ground-truth box joined to the
proposals (as in training); validation candidates are selected as at evaluation (no ground-truth box), and a pick is
right when its IoU with the target is >= 0.5, as REC scores it.

    python benchmarks/candidate_probe.py MODEL TRAIN_DATA VAL_DATA [--scores 0.1,0.3] [--accept-iou 0.5]

`--scores`: cut the candidates at these proposal scores (one probe each; the training target is always kept).
`--accept-iou T`: also train a probe whose label accepts every candidate at IoU >= T with the target (the
log of their summed probability) instead of the one region the target box matched.
"""

from __future__ import annotations

import argparse
import platform
import random
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from pointer_probe import ExpressionPointer, fit  # noqa: E402

from groma_core.boxes import BOX_GEOMETRY, box_geometry, box_iou  # noqa: E402
from groma_core.schema import DatasetSpec  # noqa: E402
from groma_core.training.datasets import open_dataset  # noqa: E402

Sample = tuple[list[str], torch.Tensor, int, torch.Tensor, torch.Tensor]  # words, tokens, target, IoUs, scores


@torch.no_grad()
def collect(model, root: Path, count: int, training: bool) -> list[Sample]:
    """Per REC expression: its words, the selected regions' tokens (box features appended), the index of the
    target's region (training: the one the ground-truth box matched; else -1), each region's IoU with the target box,
    each region's score."""
    spec = DatasetSpec(format="rec", ann="annotations/rec_train.json", images="images", template="llava")
    dataset = open_dataset(spec, model, root, "rec")
    out = []
    for i in range(min(count, len(dataset))):
        s = dataset[i]
        images = [s["image"]] if "image" in s else None  # for a region encoder that reads the original picture
        target_box = s["ground_boxes"].reshape(-1, 4)[:1]
        words = re.search(r"<p>(.*?)</p>", model.tokenizer.decode(s["input_ids"])).group(1).split()
        if training:
            inputs = model.prepare_inputs(
                s["pixel_values"][None], [s["input_ids"]], ground_boxes=[s["ground_boxes"]], images=images
            )
            boxes, scores, tokens = inputs.regions.boxes[0], inputs.regions.scores[0], inputs.region_tokens[0]
            target = int(inputs.regions.ground_index[0][0])
        else:
            features = model.encode_images(s["pixel_values"][None], images)
            regions = model.select(model.propose(features))
            boxes, scores, target = regions.boxes[0], regions.scores[0], -1
            tokens = model.region_encoder(features, [boxes])[0]
        iou = box_iou(target_box.to(boxes), boxes)[0] if boxes.shape[0] else torch.zeros(0)
        out.append((words, torch.cat([tokens.float(), box_geometry(boxes.float())], 1), target, iou, scores.float()))
    return out


def cut(sample: Sample, min_score: float) -> Sample:
    words, tokens, target, iou, scores = sample
    keep = scores >= min_score
    if target >= 0:
        keep[target] = True
    index = keep.nonzero().flatten()
    new_target = int((index == target).nonzero()[0, 0]) if target >= 0 else -1
    return words, tokens[index], new_target, iou[index], scores[index]


def rec_style(probe, samples: list[Sample]) -> float:
    with torch.no_grad():
        right = sum(bool(len(t)) and float(iou[int(probe(w, t).argmax())]) >= 0.5 for w, t, _, iou, _ in samples)
    return right / len(samples)


def train(samples: list[Sample], val: list[Sample], vocabulary, width, steps, accept_iou, seed, label, box_key) -> None:
    """A fresh probe fitted on ``samples`` by ``pointer_probe.fit``; with ``accept_iou``, the loss of a sample is
    minus the log of the probability summed over every candidate at that IoU with the target (the target included)."""
    torch.manual_seed(seed)
    probe = ExpressionPointer(vocabulary, width, box_key=box_key)

    def accepting(scores: torch.Tensor, sample: Sample) -> torch.Tensor:
        accepted = sample[3] >= accept_iou
        accepted[sample[2]] = True
        return torch.logsumexp(scores, 0) - torch.logsumexp(scores[accepted], 0)

    def report(step: int) -> None:
        print(f"  {label}, step {step}: validation REC-style {rec_style(probe, val):.3f}", flush=True)

    fit(probe, samples, steps, random.Random(seed), report, reports=2, loss=None if accept_iou is None else accepting)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="checkpoint directory")
    parser.add_argument("train_data", type=Path, help="a `groma data shapes` folder to train the probe on")
    parser.add_argument("val_data", type=Path, help="a `groma data shapes` folder to report on")
    parser.add_argument("--train-expressions", type=int, default=3000)
    parser.add_argument("--val-expressions", type=int, default=300)
    parser.add_argument("--steps", type=int, default=20000, help="single-expression steps per probe")
    parser.add_argument("--scores", default="0.1", help="proposal score cuts, comma-separated")
    parser.add_argument("--accept-iou", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--box-key", action="store_true", help="the key also maps the region's box (pointer_probe.py)")
    args = parser.parse_args()

    import groma_core

    began = time.perf_counter()
    model = groma_core.load(args.model).eval()
    model.selection.score_threshold = min(float(s) for s in args.scores.split(",")) - 1e-6
    torch.manual_seed(args.seed)
    train_all = collect(model, args.train_data, args.train_expressions, training=True)
    val_all = collect(model, args.val_data, args.val_expressions, training=False)
    vocabulary = {w: i + 1 for i, w in enumerate(sorted({w for s in train_all for w in s[0]}))}
    width = train_all[0][1].shape[1] - BOX_GEOMETRY
    print(f"model {args.model}; {len(train_all)} training / {len(val_all)} validation expressions; "
          f"machine {platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    for min_score in (float(s) for s in args.scores.split(",")):
        train_set = [cut(s, min_score) for s in train_all]
        val_set = [cut(s, min_score) for s in val_all]
        offered = sum(bool((s[3] >= 0.5).any()) for s in val_set) / len(val_set)
        accepted = sum(int((s[3] >= 0.5).sum()) for s in val_set) / len(val_set)
        print(f"candidates at score >= {min_score}: {sum(len(s[1]) for s in val_set) / len(val_set):.1f} per "
              f"validation expression, target offered {offered:.3f}, regions at IoU >= 0.5 with it {accepted:.2f}")
        train(train_set, val_set, vocabulary, width, args.steps, None, args.seed, "exact-index label", args.box_key)
        if args.accept_iou is not None:
            label = f"label accepting IoU >= {args.accept_iou}"
            train(train_set, val_set, vocabulary, width, args.steps, args.accept_iou, args.seed, label, args.box_key)
    print(f"took {time.perf_counter() - began:.0f} s")


if __name__ == "__main__":
    main()
