"""How often a model picks the right region when the answer's words are given: teacher-forced ``<rK>`` accuracy.

A one-minute gate before a full training run: for each sample of a grounded-caption or REC annotation file (rendered
as training renders it), the model reads the whole answer and, at every position whose next token is a region
index ``<rK>``, its most likely next token is compared with the right one. Chance is picking one of the sample's
regions at random. Unlike ``groma eval``, the phrase is the annotation's, so what is measured is the lookup
phrase -> region alone, not what the model would say.

    python benchmarks/binding_teacher_forced.py MODEL ANN IMAGES [--format grounded-caption|rec] [--bare-phrases]
        [--samples 60] [--template llava]
"""

from __future__ import annotations

import argparse
import platform

import torch

from groma_core.api import load
from groma_core.schema import DatasetSpec
from groma_core.training.datasets import open_dataset


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("ann", help="annotation file (grounded-caption: Flickr30k-Entities style; rec: RefCOCO style)")
    ap.add_argument("images", help="folder the annotation's file names are relative to")
    ap.add_argument("--format", choices=("grounded-caption", "rec"), default="grounded-caption")
    ap.add_argument("--bare-phrases", action="store_true", help="grounded-caption: phrases directly followed by <rK>")
    ap.add_argument("--samples", type=int, default=60)
    ap.add_argument("--template", choices=("llava", "default"), default="llava")
    ap.add_argument("--seed", type=int, default=0, help="seed of the instruction choice and the region order")
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    model = load(args.model).eval()
    options = {"bare_phrases": True} if args.bare_phrases else {}
    spec = DatasetSpec(format=args.format, ann=args.ann, images=args.images, template=args.template, **options)
    dataset = open_dataset(spec, model)
    region_ids = torch.tensor(model.tokenizer.region_ids)
    hits = answers = 0
    chance = 0.0
    with torch.no_grad():
        for i in range(min(args.samples, len(dataset))):
            sample = dataset[i]
            out = model(sample["pixel_values"][None], [sample["input_ids"]], ground_boxes=[sample["ground_boxes"]],
                        labels=[sample["labels"]])  # fmt: skip
            target = out.inputs.labels[0, 1:]
            predicted = out.logits[0, :-1].argmax(-1)
            is_region = torch.isin(target, region_ids.to(target.device))
            hits += int((predicted[is_region] == target[is_region]).sum())
            answers += int(is_region.sum())
            chance += int(is_region.sum()) / max(1, out.inputs.regions.boxes[0].shape[0])
    if not answers:
        raise SystemExit(f"{args.ann}: no <rK> answers in the first {args.samples} samples")
    print(f"model: {args.model}; {args.format}{' (bare phrases)' if args.bare_phrases else ''}, {args.ann}")
    print(f"teacher-forced <rK> accuracy {hits / answers:.3f} on {answers} answers of "
          f"{min(args.samples, len(dataset))} samples (chance {chance / answers:.3f})")  # fmt: skip
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")  # fmt: skip


if __name__ == "__main__":
    main()
