"""Inference speed of a Groma pipeline: images per second at batch 1 and batch 8, and the time of each stage
(image tokenizer, proposer + selection, region encoder, prefill, decode).

    python benchmarks/inference_speed.py [--model groma-tiny] [--set key=value ...] [--new-tokens 16]

With the default `groma-tiny` recipe (the Groma architecture at tiny size, random weights) it trains its own small
tokenizer into a temporary folder. Prints the machine and the figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

import torch
from PIL import Image

from groma_core.api import load
from groma_core.model import decode
from groma_core.prompt import TEMPLATES
from groma_core.testing.tiny import make_sentencepiece


def sample_images(n: int) -> list[Image.Image]:
    out = []
    for i in range(n):
        img = Image.new("RGB", (320 + 40 * (i % 4), 240 + 30 * (i % 3)), (20 * i % 255, 120, 200))
        img.paste((200, 40, 40), (20 + 5 * i, 30, 140, 150))
        out.append(img)
    return out


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


@torch.no_grad()
def run(model, images, new_tokens: int) -> dict[str, float]:
    tok = model.tokenizer
    ids = [tok.encode(TEMPLATES["llava"].render([("[grounding]Describe the image.", None)]))] * len(images)
    times: dict[str, float] = {}
    pixels, times["preprocess"] = timed(lambda: model.image_tokenizer.preprocess(images))
    feats, times["image tokenizer"] = timed(lambda: model.encode_images(pixels))
    props, t_prop = timed(lambda: model.region_proposer(feats))
    regions, t_sel = timed(lambda: model.select(props))
    times["proposer + selection"] = t_prop + t_sel
    _, times["region encoder"] = timed(lambda: model.region_encoder(feats, regions.boxes))
    inputs = model.prepare_inputs(pixels, ids, features=feats, proposals=props, padding_side="left")
    out, times["prefill"] = timed(
        lambda: model.language_backbone(
            inputs.inputs_embeds, inputs.attention_mask, inputs.position_ids, use_cache=True
        )
    )
    _, total_decode = timed(
        lambda: decode(
            model.language_backbone,
            inputs.inputs_embeds,
            inputs.attention_mask,
            inputs.position_ids,
            new_tokens,
            eos_id=None,
            pad_id=tok.pad_id,
        )
    )
    times["decode"] = max(total_decode - times["prefill"], 0.0)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="groma-tiny")
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    overrides = list(args.set)
    if args.model == "groma-tiny" and not any(o.startswith("language_backbone.tokenizer=") for o in overrides):
        tok_dir = tempfile.mkdtemp()
        make_sentencepiece(tok_dir)
        overrides.append(f"language_backbone.tokenizer={tok_dir}")
    model, load_time = timed(lambda: load(args.model, overrides))
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; model {args.model}, loaded in {load_time:.2f} s"
    )
    for batch in (1, 8):
        images = sample_images(batch)
        run(model, images, 2)  # warm-up
        runs = [run(model, images, args.new_tokens) for _ in range(args.repeats)]
        best = {k: min(r[k] for r in runs) for k in runs[0]}
        total = sum(best.values())
        split = ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in best.items())
        print(f"batch {batch}: {batch / total:.2f} images/s ({args.new_tokens} new tokens each); {split}")


if __name__ == "__main__":
    main()
