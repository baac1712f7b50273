"""The full-size Groma-7B architecture (recipe `groma-7b`) with random weights, built directly on a device in
bfloat16 (or another `--dtype`), and what it costs there: build time, time to first token, decode tokens/s at batch 1
and 8, peak memory, against the memory-bandwidth roofline of the device (decoding reads every weight once per step, so
tokens/s per sequence cannot exceed bandwidth / weight bytes; the bandwidth is measured here by a copy).

    python benchmarks/full_size.py [--device auto] [--dtype bfloat16] [--layers 32] [--vision-layers 24]
                                   [--new-tokens 32] [--batches 1,8]

`--layers` / `--vision-layers` cut the language model's / DINOv2's depth (the tests run it at 2 and 4, the fewest
DINOv2 takes, on the CPU, so the script cannot rot); the widths and the 32,000-row vocabulary stay the paper's.
`--dtype float32` is for CPUs without native bfloat16 arithmetic (AVX2 only): there torch multiplies bfloat16 matrices
some 400 times slower than float32 ones (a 2048 x 2048 product: 62 s against 0.14 s on a 2-core AVX2 EPYC). The
answers are noise (random weights, a tokenizer trained here on random words): only the figures mean anything. Prints
the machine and the figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import random
import string
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from inference_speed import sample_images  # noqa: E402

from groma_core.api import build, resolve_device  # noqa: E402
from groma_core.model import decode  # noqa: E402
from groma_core.prompt import (
    TEMPLATES,  # noqa: E402
    make_sentencepiece,  # noqa: E402
)

PROMPT = "[grounding]Describe the image."


@contextlib.contextmanager
def built_on(device: torch.device, dtype: torch.dtype) -> Iterator[None]:
    """New tensors on ``device`` in ``dtype`` (floating ones): the random weights never exist on the host."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:
            yield
    finally:
        torch.set_default_dtype(previous)


def vicuna_sized_tokenizer(size: int = 32000) -> str:
    """A SentencePiece word model of exactly ``size`` pieces (Vicuna's base vocabulary), trained here in a second on
    random words: the language model's tables get their full 32,000 rows."""
    rng = random.Random(0)
    words = ["".join(rng.choice(string.ascii_lowercase) for _ in range(7)) for _ in range(size + size // 4)]
    lines = [" ".join(words[i : i + 20]) for i in range(0, len(words), 20)]
    directory = tempfile.mkdtemp()
    make_sentencepiece(directory, size, lines=lines, repeat=1, model_type="word")
    return directory


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device, megabytes: int = 512, repeats: int = 5) -> float:
    """Bytes per second a device-to-device copy moves (read + write), the best of ``repeats``."""
    source = torch.empty(megabytes * 2**20, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    target.copy_(source)
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        target.copy_(source)
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * source.numel() / best


def peak_memory(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB allocated at peak"
    try:  # the host: the process's peak resident set
        import resource

        return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB peak resident (host)"
    except ImportError:
        return "peak memory not measured here"


@torch.no_grad()
def generation(
    model, images: list[Image.Image], new_tokens: int, device: torch.device, dtype: torch.dtype
) -> tuple[float, float]:
    """(seconds from the images to the first new token, seconds for the other ``new_tokens`` - 1) of one batch,
    greedy. Both come from one decode: each step's logits are stamped as they arrive, so the decode time is not the
    difference of two prefills (which, at a few layers on a CPU, is noise larger than the decode itself)."""
    tok = model.tokenizer
    ids = [tok.encode(TEMPLATES[model.template].render([(PROMPT, None)]))] * len(images)
    stamps: list[float] = []

    def stamp(logits: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        synchronize(device)
        stamps.append(time.perf_counter())
        return logits

    synchronize(device)
    start = time.perf_counter()
    pixels = model.image_tokenizer.preprocess(images).to(device, dtype)
    inputs = model.prepare_inputs(pixels, ids, padding_side="left")
    embeds, mask, positions = inputs.inputs_embeds, inputs.attention_mask, inputs.position_ids
    decode(model.language_backbone, embeds, mask, positions, new_tokens, None, tok.pad_id, adjust_logits=stamp)
    return stamps[0] - start, max(stamps[-1] - stamps[0], 1e-9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--layers", type=int, default=32, help="language model layers (Vicuna-7B: 32)")
    parser.add_argument("--vision-layers", type=int, default=24, help="DINOv2 layers (ViT-L: 24)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--batches", default="1,8", help="batch sizes, comma-separated")
    args = parser.parse_args()

    device = resolve_device(args.device)
    tokenizer_dir = vicuna_sized_tokenizer()
    overrides = [
        f"dtype={args.dtype}",
        f"language_backbone.tokenizer={tokenizer_dir}",
        f"language_backbone.num_hidden_layers={args.layers}",
        f"image_tokenizer.num_hidden_layers={args.vision_layers}",
    ]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    synchronize(device)
    start = time.perf_counter()
    dtype = getattr(torch, args.dtype)
    with built_on(device, dtype):
        model = build("groma-7b", overrides)
    model = model.to(device).eval()
    synchronize(device)
    build_time = time.perf_counter() - start
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    lm_weights = sum(t.numel() * t.element_size() for t in model.language_backbone.state_dict().values())
    bandwidth = copy_bandwidth(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    print(
        f"machine: {name} ({device}), {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; copy bandwidth {bandwidth / 1e9:.1f} GB/s"
    )
    print(
        f"groma-7b architecture, language model {args.layers} layers, DINOv2 {args.vision_layers} layers, "
        f"{args.dtype}, random weights built on {device} in {build_time:.1f} s; weights {weights / 2**30:.2f} GiB "
        f"(language model {lm_weights / 2**30:.2f} GiB)"
    )
    roofline = bandwidth / lm_weights
    for batch in (int(b) for b in args.batches.split(",")):
        images = sample_images(batch)
        generation(model, images, 2, device, dtype)  # warm-up
        first, rest = generation(model, images, args.new_tokens, device, dtype)
        per_sequence = (args.new_tokens - 1) / rest
        print(
            f"batch {batch}: time to first token {first * 1000:.0f} ms; decode {per_sequence:.1f} tokens/s per "
            f"sequence, {per_sequence * batch:.1f} in all (roofline {roofline:.1f} tokens/s per step: "
            f"{per_sequence / roofline:.0%} of it)"
        )
    print(f"memory: {peak_memory(device)}")


if __name__ == "__main__":
    main()
