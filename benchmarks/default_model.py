"""The embedded default model on held-out synthetic shapes: REC accuracy, region-caption CIDEr, detection AR, and how
long loading it and answering takes from a cold process (the README's main job).

    python benchmarks/default_model.py WORKDIR [--images 500] [--seed 2] [--model DIR] [--train-log FILE]

WORKDIR receives the held-out dataset (``groma data shapes --seed SEED``, a seed the training data did not use) and
the evaluation runs. ``--train-log`` adds the training time from a run's ``train_log.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

GROMA = [sys.executable, "-m", "groma_core.cli"]
CAPTION = "[grounding]Give me a concise description of the image."
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "images" / "shapes.png"


def run(args: list[str]) -> float:
    began = time.perf_counter()
    subprocess.run(GROMA + args, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - began


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    return (
        f"{os.cpu_count()}-core {cpu}, Python {platform.python_version()}, torch {torch.__version__}, "
        f"{time.strftime('%Y-%m-%d')}"
    )


def training_time(log: Path) -> str:
    rows = [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines() if line.strip()]
    stages: dict[str, tuple[int, float]] = {}
    for r in rows:
        stages[r["stage"]] = (r["step"], r["elapsed_s"])
    total = sum(s for _, s in stages.values())
    parts = ", ".join(f"{name} {steps} steps {secs / 60:.1f} min" for name, (steps, secs) in stages.items())
    return f"training: {total / 60:.1f} min ({parts})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdir", type=Path)
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--seed", type=int, default=2)
    parser.add_argument("--model", help="checkpoint directory (default: the embedded model)")
    parser.add_argument("--train-log", type=Path)
    args = parser.parse_args()
    work: Path = args.workdir
    data = work / "heldout"
    if not (data / "dataset.json").is_file():
        seed = str(args.seed)
        run(["data", "shapes", str(data), "--images", str(args.images), "--seed", seed, "--val-fraction", "0"])
    model = ["--model", args.model] if args.model else []
    images = ["--images", str(data / "images")]
    ann = data / "annotations"
    results = {}
    for task, file, extra in (
        ("rec", "rec_train.json", []),
        ("region-caption", "region_captions_train.json", ["--limit", str(args.images)]),
        ("detection", "detection_train.json", []),
    ):
        out = work / f"eval-{task}"
        if not (out / "summary.json").is_file():
            seconds = run(["eval", task, "--ann", str(ann / file), *images, "--out", str(out), *model, *extra])
            print(f"{task}: evaluated in {seconds:.0f} s", file=sys.stderr)
        results[task] = json.loads((out / "summary.json").read_text(encoding="utf-8"))

    # cold process: import, load the model, read the image, answer, draw
    answer = work / "answer.png"
    cold = run(["ground", str(EXAMPLE), CAPTION, "--out", str(answer), *model])
    warm_began = time.perf_counter()
    import groma_core
    from groma_core.api import DEFAULT_MODEL

    loaded = groma_core.load(args.model) if args.model else groma_core.load()
    load_s = time.perf_counter() - warm_began
    began = time.perf_counter()
    loaded.caption(str(EXAMPLE))  # the CAPTION prompt
    answer_s = time.perf_counter() - began

    rec, cap, det = (results[k] for k in ("rec", "region-caption", "detection"))
    print(f"machine: {machine()}")
    if args.train_log:
        print(training_time(args.train_log))
    folder = Path(args.model) if args.model else DEFAULT_MODEL
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    print(f"model folder: {size / 2**20:.1f} MiB")
    print(f"held-out data: {args.images} images, seed {args.seed}")
    print(
        f"REC: accuracy@0.5 {rec['metrics']['accuracy']:.3f} on {rec['num_samples']} expressions "
        f"(mean IoU {rec['metrics']['mean_iou']:.3f})"
    )
    scores = ", ".join(f"{k} {v:.3f}" for k, v in cap["metrics"].items() if isinstance(v, float))
    print(f"region captions ({cap['num_samples']} regions): {scores}")
    recalls = ", ".join(f"{k} {v:.3f}" for k, v in det["metrics"].items() if isinstance(v, float))
    print(f"detection ({det['num_samples']} images): {recalls}")
    print(f"`groma ground` on the example image, cold process (import + load + answer + draw): {cold:.1f} s")
    print(f"in process: load {load_s:.2f} s, one grounded caption {answer_s:.2f} s")


if __name__ == "__main__":
    main()
