"""Does a model's language-model state hold the REC answer? A fresh pointer on frozen hidden states.

For single-expression REC samples rendered as in training (the ground-truth box joined to the selected regions),
the hidden state at the position that predicts `<rK>` and the region tokens are taken from the model, frozen; a fresh
pointer of the model's own form (`q(h) . k(region / rms(region)) / sqrt(H)`) is trained on one dataset's expressions
and tested on another's, beside the model's own teacher-forced `<rK>` accuracy on the same samples. A fresh pointer
that does much better than the model's head means the head is the limit; one that does no better means the answer
is not in the hidden state. Needs a model trained with `region_pointer: true`.

    python benchmarks/hidden_probe.py MODEL TRAIN_DATA VAL_DATA [--train 3000] [--val 300] [--steps 15000]
"""

from __future__ import annotations

import argparse
import platform
import random
import time
from pathlib import Path

import torch
from pointer_probe import accuracy, fit
from torch import nn


def collect(model, root: Path, count: int) -> tuple[list[tuple[torch.Tensor, torch.Tensor, int, str]], float]:
    """(hidden state, region tokens, target index, "all") per sample, and the model's own teacher-forced accuracy."""
    from groma_core.schema import DatasetSpec
    from groma_core.training.datasets import open_dataset

    spec = DatasetSpec(format="rec", ann="annotations/rec_train.json", images="images", template="llava")
    dataset = open_dataset(spec, model, root, "rec")
    index_of = {token: k for k, token in enumerate(model.tokenizer.region_ids)}
    samples, right = [], []
    with torch.no_grad():
        for i in range(min(count, len(dataset))):
            s = dataset[i]
            inputs = model.prepare_inputs(
                s["pixel_values"][None], [s["input_ids"]], ground_boxes=[s["ground_boxes"]], labels=[s["labels"]]
            )
            out = model.language_backbone(inputs.inputs_embeds, inputs.attention_mask, inputs.position_ids)
            logits = model._pointer_logits(inputs)(out.logits, out.hidden_states)
            targets = inputs.labels[0, 1:]
            where = [j for j in range(len(targets)) if int(targets[j]) in index_of]
            if not where:
                continue
            j = where[0]
            hidden, regions = out.hidden_states[0, j].float(), inputs.region_tokens[0].float()
            samples.append((hidden, regions, index_of[int(targets[j])], "all"))
            right.append(int(logits[0, j].argmax() == targets[j]))
    return samples, sum(right) / max(len(right), 1)


class FreshPointer(nn.Module):
    """The region pointer's form: ``q(h) . k(region / rms(region)) / sqrt(H)``."""

    def __init__(self, width: int):
        super().__init__()
        self.q, self.k = nn.Linear(width, width), nn.Linear(width, width)

    def forward(self, hidden: torch.Tensor, regions: torch.Tensor) -> torch.Tensor:
        keys = self.k(regions / regions.pow(2).mean(-1, keepdim=True).sqrt())
        return keys @ self.q(hidden) / hidden.shape[-1] ** 0.5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("train_data", type=Path)
    parser.add_argument("val_data", type=Path)
    parser.add_argument("--train", type=int, default=3000, help="training expressions")
    parser.add_argument("--val", type=int, default=300, help="validation expressions")
    parser.add_argument("--steps", type=int, default=15000, help="single-expression steps")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import groma_core

    began = time.perf_counter()
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    model = groma_core.load(args.model).eval()
    if model.region_pointer is None:
        raise SystemExit(f"{args.model}: trained without region_pointer; this probe compares with the model's pointer")
    train, train_own = collect(model, args.train_data, args.train)
    val, val_own = collect(model, args.val_data, args.val)
    threads = torch.get_num_threads()
    print(f"model {args.model}; machine {platform.machine()}, torch {torch.__version__}, {threads} threads")
    print(f"the model's own teacher-forced <rK> accuracy: train {train_own:.3f}, validation {val_own:.3f}")
    probe = FreshPointer(train[0][0].shape[0])

    def report(step: int) -> None:
        on_val, on_train = accuracy(probe, val)[0], accuracy(probe, train[: len(val)])[0]
        print(f"step {step}: fresh pointer on the frozen hidden states: validation {on_val:.3f}, train {on_train:.3f}")

    fit(probe, train, args.steps, rng, report, reports=3)
    print(f"took {time.perf_counter() - began:.0f} s")


if __name__ == "__main__":
    main()
