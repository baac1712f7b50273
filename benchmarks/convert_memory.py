"""Peak memory of `groma convert` on a synthetic full-size Groma-7B checkpoint.

Writes a reference-layout checkpoint with every tensor of the released model (names and shapes from
groma-7b-keys.tsv, random values, 3 `.bin` shards like groma-7b-pretrain) and converts it in a child process while
sampling that process's memory. The target: peak resident memory under 2 GB beyond the largest single tensor.

    python benchmarks/convert_memory.py WORKDIR [--dtype float16] [--keep]

Prints the machine, the checkpoint size, the wall time, the peak anonymous memory (what the converter allocates),
the peak resident set (including file pages of the memory-mapped source, which the kernel can drop at will) and
the largest tensor.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
KEYS = ROOT.parent / "shared" / "reference" / "groma-7b-keys.tsv"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def released_config() -> dict:
    """A reference config.json equivalent to the released one (the plugins' defaults are the released sizes)."""
    return {
        "model_type": "groma",
        "nms_thres": 0.6,
        "box_score_thres": 0.15,
        "max_region_num": 100,
        "num_new_token": 114,
        "llm_cfg": {
            "model_type": "llama",
            "hidden_size": 4096,
            "intermediate_size": 11008,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "num_key_value_heads": 32,
            "vocab_size": 32000,
            "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-5,
            "tie_word_embeddings": False,
        },
        "perceiver_cfg": {
            "model_type": "ddetr",
            "vis_output_layer": -1,
            "vis_encoder_cfg": {
                "model_type": "dinov2",
                "hidden_size": 1024,
                "num_hidden_layers": 24,
                "num_attention_heads": 16,
                "image_size": 518,
                "patch_size": 14,
            },
            "ddetr_cfg": {"num_feature_levels": 1, "two_stage": True, "with_box_refine": True, "num_labels": 1},
        },
    }


def write_checkpoint(directory: Path, dtype: torch.dtype, shards: int = 3) -> tuple[int, int]:
    """Write the synthetic checkpoint shard by shard; return (bytes, largest tensor bytes)."""
    directory.mkdir(parents=True, exist_ok=True)
    rows = [line.rstrip("\n").split("\t") for line in KEYS.read_text().splitlines()[1:]]
    unique = [(k, tuple(int(x) for x in s.split("x"))) for k, s, _, _, alias in rows if not alias]
    aliases = [(k, alias) for k, _, _, _, alias in rows if alias]
    per_shard = -(-len(unique) // shards)
    weight_map, total, largest = {}, 0, 0
    g = torch.Generator().manual_seed(0)
    for i in range(shards):
        name = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = {}
        for key, shape in unique[i * per_shard : (i + 1) * per_shard]:
            t = torch.empty(shape, dtype=dtype)
            t.uniform_(-0.02, 0.02, generator=g) if t.numel() < 50_000_000 else t.fill_(0.01)
            part[key] = t
            largest = max(largest, t.numel() * t.element_size())
        for alias, original in aliases:
            if original in part:
                part[alias] = part[original].clone()
        torch.save(part, directory / name)
        weight_map.update({k: name for k in part})
        total += sum(t.numel() * t.element_size() for t in part.values())
        del part
    (directory / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (directory / "config.json").write_text(json.dumps(released_config()))
    return total, largest


def sample_memory(pid: int, peaks: dict, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
        except (FileNotFoundError, ProcessLookupError):
            break
        for name in ("RssAnon", "RssFile", "VmRSS", "VmHWM"):
            if name in fields:
                peaks[name] = max(peaks.get(name, 0), int(fields[name].split()[0]) * 1024)
        time.sleep(0.05)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workdir", type=Path)
    parser.add_argument("--dtype", default="float16", choices=list(DTYPES), help="dtype of the synthetic source")
    parser.add_argument("--keep", action="store_true", help="keep the files afterwards")
    args = parser.parse_args()
    src, dst = args.workdir / "reference", args.workdir / "converted"
    shutil.rmtree(args.workdir, ignore_errors=True)
    t0 = time.time()
    size, largest = write_checkpoint(src, DTYPES[args.dtype])
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}, torch {torch.__version__}"
    )
    print(
        f"synthetic checkpoint: {size / 1e9:.2f} GB ({args.dtype}), largest tensor {largest / 1e6:.0f} MB, "
        f"written in {time.time() - t0:.0f} s"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    t0 = time.time()
    proc = subprocess.Popen(
        [sys.executable, "-m", "groma_core.cli", "convert", str(src), str(dst), "--quiet"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    peaks: dict[str, int] = {}
    stop = threading.Event()
    sampler = threading.Thread(target=sample_memory, args=(proc.pid, peaks, stop))
    sampler.start()
    out, err = proc.communicate()
    stop.set()
    sampler.join()
    elapsed = time.time() - t0
    if proc.returncode:
        print(err, file=sys.stderr)
        return proc.returncode
    print(out.strip())
    gb = 1024**3
    print(f"conversion: {elapsed:.0f} s, {size / elapsed / 1e9:.2f} GB/s")
    print(
        f"peak anonymous memory: {peaks.get('RssAnon', 0) / gb:.2f} GiB; peak resident set (incl. mapped file "
        f"pages): {peaks.get('VmHWM', 0) / gb:.2f} GiB; largest tensor {largest / gb:.2f} GiB"
    )
    beyond = peaks.get("VmHWM", 0) - largest
    print(
        f"peak resident set beyond the largest tensor: {beyond / gb:.2f} GiB (target < 2 GiB): "
        f"{'met' if beyond < 2 * gb else 'NOT met'}"
    )
    if not args.keep:
        shutil.rmtree(args.workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
