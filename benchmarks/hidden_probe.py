"""Does a model's language-model state hold the REC answer? A fresh pointer on frozen hidden states.

For single-expression REC samples rendered as in training (the ground-truth box joined to the selected regions),
the hidden state at the position that predicts `<rK>` and the region tokens are taken from the model, frozen; a fresh
pointer of the model's own form (`q(h) . k(region / rms(region)) / sqrt(H)`, with the box's geometry in the key where
the model's pointer reads it) is trained on one dataset's expressions and tested on another's, beside the model's own
teacher-forced `<rK>` accuracy on the same samples. A fresh pointer that does much better than the model's head means
the head is the limit; one that does no better means the answer is not in the hidden state. Needs a model trained
with `region_pointer: true`.

`--state` picks what the fresh pointer's query reads: `answer` (the hidden state at the `<rK>` prediction, what the
model's own pointer reads), `expression` (the mean of the hidden states over the expression's words, between the
`<p>` and `</p>` before the answer), `words` (the mean of the language model's input embeddings of those words: a bag
of words, no context), or several of these side by side, joined by `+` (`answer+words`; `both` is
`answer+expression`). An `expression` pointer well above the
`answer` one means the language model understands the expression where it reads it but does not carry that to
where it answers.

    python benchmarks/hidden_probe.py MODEL TRAIN_DATA VAL_DATA [--train 3000] [--val 300] [--steps 15000]
                                      [--state answer]
"""

from __future__ import annotations

import argparse
import functools
import platform
import random
import time
from pathlib import Path

import torch
from pointer_probe import accuracy, fit
from torch import nn

STATES = ("answer", "expression", "words")
ALIASES = {"both": "answer+expression"}


def collect(
    model, root: Path, count: int, states: tuple[str, ...] = ("answer",)
) -> tuple[dict[str, list[tuple[torch.Tensor, torch.Tensor, int, str]]], float]:
    """For each of ``states`` (as ``--state``), (query state, region tokens, target index, "all") per sample, and the
    model's own teacher-forced accuracy."""
    from groma_core import tokens as T
    from groma_core.schema import DatasetSpec
    from groma_core.training.datasets import open_dataset

    spec = DatasetSpec(format="rec", ann="annotations/rec_train.json", images="images", template="llava")
    dataset = open_dataset(spec, model, root, "rec")
    index_of = {token: k for k, token in enumerate(model.tokenizer.region_ids)}
    p_open, p_close = model.tokenizer.token_id(T.P_OPEN), model.tokenizer.token_id(T.P_CLOSE)
    samples: dict[str, list] = {state: [] for state in states}
    right = []
    with torch.no_grad():
        for i in range(min(count, len(dataset))):
            s = dataset[i]
            inputs = model.prepare_inputs(
                s["pixel_values"][None],
                [s["input_ids"]],
                ground_boxes=[s["ground_boxes"]],
                labels=[s["labels"]],
                images=[s["image"]] if "image" in s else None,  # for a region encoder that reads the pictures
            )
            out = model.language_backbone(inputs.inputs_embeds, inputs.attention_mask, inputs.position_ids)
            logits = model._pointer_logits(inputs)(out.logits, out.hidden_states)
            targets = inputs.labels[0, 1:]
            where = [j for j in range(len(targets)) if int(targets[j]) in index_of]
            if not where:
                continue
            j = where[0]  # position j predicts the token at j + 1
            ids = inputs.ids[0, : j + 1].tolist()
            start = max(k for k, t in enumerate(ids) if t == p_open) + 1
            end = max(k for k, t in enumerate(ids) if t == p_close)
            query = {
                "answer": out.hidden_states[0, j],
                "expression": out.hidden_states[0, start:end].mean(0),
                "words": inputs.inputs_embeds[0, start:end].mean(0),
            }
            regions = (inputs.region_tokens[0].float(), inputs.regions.boxes[0].float())
            for state in states:
                parts = ALIASES.get(state, state).split("+")
                # side by side, each part at unit RMS: the words' embeddings are ~35 times smaller than the states
                joined = torch.cat([query[part] / query[part].pow(2).mean().sqrt() for part in parts])
                samples[state].append((joined.float(), regions, index_of[int(targets[j])], "all"))
            right.append(int(logits[0, j].argmax() == targets[j]))
    return samples, sum(right) / max(len(right), 1)


class FreshPointer(nn.Module):
    """A fresh :class:`~groma_core.model.RegionPointer` (the model's own form, box geometry in the key when ``box``),
    its query first mapped to the language model's width when the probed state is wider (``answer+words``). Scores one
    sample: ``query`` (Q,), ``regions`` = (tokens (K, H), boxes (K, 4) normalised xyxy) -> (K,)."""

    def __init__(self, width: int, query_width: int, box: bool):
        super().__init__()
        from groma_core.model import RegionPointer

        self.pointer = RegionPointer(width, box=box)
        self.fold = nn.Identity() if query_width == width else nn.Linear(query_width, width)

    def forward(self, query: torch.Tensor, regions: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        tokens, boxes = regions
        valid = torch.ones(1, tokens.shape[0], dtype=torch.bool)
        return self.pointer(self.fold(query)[None, None], tokens[None], valid, boxes[None])[0, 0]


def _report(probe: nn.Module, state: str, train: list, val: list, step: int) -> None:
    on_val, on_train = accuracy(probe, val)[0], accuracy(probe, train[: len(val)])[0]
    print(f"step {step}: fresh pointer on the {state} state: validation {on_val:.3f}, train {on_train:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("train_data", type=Path)
    parser.add_argument("val_data", type=Path)
    parser.add_argument("--train", type=int, default=3000, help="training expressions")
    parser.add_argument("--val", type=int, default=300, help="validation expressions")
    parser.add_argument("--steps", type=int, default=15000, help="single-expression steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--state",
        default="answer",
        help=f"what the fresh pointer's query reads: {', '.join(STATES)} or a '+' of them; several comma-separated",
    )
    args = parser.parse_args()

    import groma_core

    began = time.perf_counter()
    model = groma_core.load(args.model).eval()
    if model.region_pointer is None:
        raise SystemExit(f"{args.model}: trained without region_pointer; this probe compares with the model's pointer")
    states = tuple(args.state.split(","))
    parts = {part for state in states for part in ALIASES.get(state, state).split("+")}
    if unknown := parts - set(STATES):
        raise SystemExit(
            f"--state: unknown {', '.join(sorted(unknown))} (choose from {', '.join(STATES)}, joined by '+', or both)"
        )
    trains, train_own = collect(model, args.train_data, args.train, states)
    vals, val_own = collect(model, args.val_data, args.val, states)
    threads = torch.get_num_threads()
    print(f"model {args.model}; machine {platform.machine()}, torch {torch.__version__}, {threads} threads")
    print(f"the model's own teacher-forced <rK> accuracy: train {train_own:.3f}, validation {val_own:.3f}")
    for state in states:
        torch.manual_seed(args.seed)
        width, box = model.language_backbone.hidden_size, model.region_pointer.box is not None
        probe = FreshPointer(width, trains[state][0][0].shape[0], box)
        report = functools.partial(_report, probe, state, trains[state], vals[state])
        fit(probe, trains[state], args.steps, random.Random(args.seed), report, reports=3)
    print(f"took {time.perf_counter() - began:.0f} s")


if __name__ == "__main__":
    main()
