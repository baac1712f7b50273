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


def predictions(run_dir: Path) -> list[dict]:
    lines = (run_dir / "predictions.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def rec_by_type(run_dir: Path, ann: Path) -> str:
    """REC accuracy per expression type (attribute, size, position, relation) from a run's predictions."""
    from groma_core.evaluation.metrics import rec_accuracy

    kinds = {str(img["id"]): img["ref_type"] for img in json.loads(ann.read_text(encoding="utf-8"))["images"]}
    by_kind: dict[str, list[dict]] = {}
    for p in predictions(run_dir):
        by_kind.setdefault(kinds[p["id"]], []).append(p)
    parts = []
    for kind, rows in sorted(by_kind.items()):
        accuracy = rec_accuracy([r["pred_box"] for r in rows], [r["gt_box"] for r in rows]).accuracy
        parts.append(f"{kind} {accuracy:.3f} ({len(rows)})")
    return ", ".join(parts)


def names_colour_and_shape(run_dir: Path, data: Path) -> tuple[int, int]:
    """How many region captions name the box's own colour and shape as their first colour and shape words."""
    from groma_core.data.shapes import PALETTE, SHAPES

    scenes = json.loads((data / "annotations" / "scenes_train.json").read_text(encoding="utf-8"))["images"]
    objects = {str(o["id"]): o for s in scenes for o in s["objects"]}
    named = total = 0
    for p in predictions(run_dir):
        obj = objects[p["id"]]
        words = p["caption"].lower().replace(",", " ").split()
        colour = next((w for w in words if w in PALETTE), None)
        shape = next((w for w in words if w in SHAPES), None)
        named += (colour, shape) == (obj["colour"], obj["shape"])
        total += 1
    return named, total


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
        ("grounded-caption", "flickr_train.json", ["--ignore-words", "small,large"]),
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

    loaded = groma_core.Groma.load(args.model)
    load_s = time.perf_counter() - warm_began
    began = time.perf_counter()
    loaded.caption(str(EXAMPLE))  # the CAPTION prompt
    answer_s = time.perf_counter() - began

    rec, cap, det, grounded = (results[k] for k in ("rec", "region-caption", "detection", "grounded-caption"))
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
    print(f"REC by expression type: {rec_by_type(work / 'eval-rec', ann / 'rec_train.json')}")
    g = grounded["metrics"]
    print(
        f"grounded captions ({grounded['num_samples']} images): phrase precision {g['phrase_precision']:.3f}, "
        f"recall {g['phrase_recall']:.3f} ({g['predicted_phrases']:.0f} phrases, "
        f"{g['ground_truth_boxes']:.0f} shapes); "
        f"CIDEr {g['CIDEr']:.3f}, Bleu_4 {g['Bleu_4']:.3f}"
    )
    named, total = names_colour_and_shape(work / "eval-region-caption", data)
    print(f"region captions naming the box's colour and shape: {named / total:.3f} ({named} of {total})")
    scores = ", ".join(f"{k} {v:.3f}" for k, v in cap["metrics"].items() if isinstance(v, float))
    print(f"region captions ({cap['num_samples']} regions): {scores}")
    recalls = ", ".join(f"{k} {v:.3f}" for k, v in det["metrics"].items() if isinstance(v, float))
    print(f"detection ({det['num_samples']} images): {recalls}")
    print(f"`groma ground` on the example image, cold process (import + load + answer + draw): {cold:.1f} s")
    print(f"in process: load {load_s:.2f} s, one grounded caption {answer_s:.2f} s")


if __name__ == "__main__":
    main()
