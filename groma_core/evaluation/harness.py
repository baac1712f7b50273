"""The evaluation harness: reads a benchmark's annotations, runs the model sample by sample (batched), writes every
prediction as a JSON line as soon as it exists, resumes where a run stopped, shards samples over ``torchrun``
processes, and writes a summary with the metric, the model, the recipe, the annotation file's sha256, the seed and
the software versions. Protocols: ``shared/reference/groma-reference.md`` §5.

The instructions are the reference's template sets (``REC_INSTRUCTIONS`` etc. in
:mod:`groma_core.training.datasets`, the lists the released weights were trained on). The reference's eval scripts
draw one template per sample with an unseeded ``random.choice`` over the whole set; here each sample's template is
drawn from the same set with a generator seeded by (seed, sample id), so the result does not depend on the number
of processes or the batch size (batched generation gives the answers of one-at-a-time generation) and a run can be
repeated exactly.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import random
import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from groma_core.boxes import from_input_frame
from groma_core.data.formats import (
    read_detection,
    read_grounded_captions,
    read_lvis_ground,
    read_rec,
    read_region_captions,
)
from groma_core.data.instructions import (
    CAPTION_INSTRUCTIONS,
    DETAILED_REGION_INSTRUCTIONS,
    GROUNDING_INSTRUCTIONS,
    REC_INSTRUCTIONS,
    REGION_INSTRUCTIONS,
)
from groma_core.errors import GromaError, InputError
from groma_core.evaluation.metrics import (
    GroundingSample,
    caption_scores,
    clean_generated_caption,
    detection_metrics,
    lvis_ground_recall,
    phrase_grounding,
    rec_accuracy,
)
from groma_core.images import load_image
from groma_core.inference import REFER, Groma, Request
from groma_core.tokens import GROUNDING, P_CLOSE, P_OPEN


@dataclass
class Sample:
    """One evaluation sample: a unique id, its position in the benchmark, its image and task data."""

    id: str
    index: int
    image: Path | Any  # a path, or the decoded PIL image once the harness has read it
    data: dict[str, Any] = field(default_factory=dict)


class Task(ABC):
    """A benchmark: how to read its samples, ask the model, and score the predictions."""

    name: str = ""
    templates: tuple[str, ...] = ()
    #: the reference's answer length for the benchmark; None for a task that generates no text
    max_new_tokens: int | None = None

    def __init__(self, ann_file: str | Path, images_dir: str | Path, max_new_tokens: int | None = None):
        """``max_new_tokens``: the longest answer in tokens (default: the reference's for the benchmark)."""
        if max_new_tokens is not None:
            if self.max_new_tokens is None:
                raise InputError(f"max_new_tokens: the {self.name} task generates no text")
            if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
                raise InputError(f"max_new_tokens: expected a positive integer, got {max_new_tokens!r}")
            self.max_new_tokens = max_new_tokens
        self.ann_file = Path(ann_file)
        self.images_dir = Path(images_dir)
        if not self.images_dir.is_dir():
            raise InputError(f"{self.images_dir}: image folder not found")
        try:
            self.samples = self.read()
        except InputError:  # a reader's own message already names the file and the entry
            raise
        except KeyError as exc:
            raise InputError(f"{self.ann_file}: an entry lacks the field {exc.args[0]!r}") from None
        except (TypeError, ValueError, IndexError) as exc:
            raise InputError(f"{self.ann_file}: malformed entry ({exc})") from None
        if not self.samples:
            raise InputError(f"{self.ann_file}: no samples")

    def template_for(self, sample: Sample, seed: int) -> str:
        """The instruction template of a sample, drawn from :attr:`templates` with a generator seeded by (seed, sample
        id) (the reference draws with an unseeded ``random.choice`` over the same set)."""
        return random.Random(f"{seed}:{self.name}:{sample.id}").choice(self.templates)

    @abstractmethod
    def read(self) -> list[Sample]:
        """The samples of :attr:`ann_file` in a fixed order, read with the format's reader in :mod:`groma_core.data`
        (the one training uses), whose errors name the file, the entry and the key."""

    @abstractmethod
    def predict(self, groma: Groma, samples: list[Sample], seed: int, batch_size: int) -> list[dict[str, Any]]:
        """One JSON-serialisable prediction per sample (each with its ``id``)."""

    @abstractmethod
    def score(self, predictions: list[dict[str, Any]]) -> dict[str, float]:
        """The benchmark's metrics over all predictions."""

    @abstractmethod
    def failed(self, sample: Sample, reason: str) -> dict[str, Any]:
        """The record of a sample whose image could not be read: an empty answer (scored as wrong) and the reason."""


def _image_path(images_dir: Path, file_name: str) -> Path:
    return images_dir / file_name


class RecTask(Task):
    """Referring expression comprehension (RefCOCO-style annotations: each "image" entry is one expression)."""

    name = "rec"
    # groma/eval/eval_rec.py:14,36: random.choice over refcoco_rec.py's six INSTRUCTIONS, expression in <p></p>
    templates = tuple(t.format(P_OPEN + "{}" + P_CLOSE) for t in REC_INSTRUCTIONS)
    max_new_tokens = 3

    def read(self) -> list[Sample]:
        """The expressions as training reads them (:func:`groma_core.data.read_rec`: exactly one box each)."""

        return [
            Sample(
                str(r.image.id),
                i,
                _image_path(self.images_dir, r.image.file_name),
                {"expression": r.expression, "gt_box": list(r.box)},
            )
            for i, r in enumerate(read_rec(self.ann_file))
        ]

    def predict(self, groma, samples, seed, batch_size):
        requests = [
            Request(s.image, [(self.template_for(s, seed).format(s.data["expression"].strip()), None)]) for s in samples
        ]
        answers = groma.answer(requests, max_new_tokens=self.max_new_tokens, do_sample=False)
        out = []
        for s, r, a in zip(samples, requests, answers):
            first = next((p for p in a.phrases if p.boxes_px), None)  # the first <rK> of the answer
            box = list(first.boxes_px[0]) if first else None
            out.append(
                {"id": s.id, "prompt": r.turns[0][0], "answer": a.raw_text, "pred_box": box, "gt_box": s.data["gt_box"]}
            )
        return out

    def failed(self, sample, reason):
        return {"id": sample.id, "error": reason, "pred_box": None, "gt_box": sample.data["gt_box"]}

    def score(self, predictions):
        result = rec_accuracy([p["pred_box"] for p in predictions], [p["gt_box"] for p in predictions])
        return result.as_dict()


class LvisGroundTask(Task):
    """LVIS-Ground: one query per (image, category present), every box of the answer in order; AS-MANY recall."""

    name = "lvis-ground"
    # groma/eval/eval_lvis.py:16,69: random.choice over coco.py's six INSTRUCTIONS (= lvis.py's), category in <p></p>
    templates = tuple(t.format(P_OPEN + "{}" + P_CLOSE) for t in GROUNDING_INSTRUCTIONS)
    max_new_tokens = 10

    def read(self) -> list[Sample]:
        queries = sorted(read_lvis_ground(self.ann_file), key=lambda q: (str(q.image.id), str(q.category_id)))
        return [
            Sample(
                f"{q.image.id}:{q.category_id}",
                i,
                _image_path(self.images_dir, q.image.file_name),
                {
                    "image_id": q.image.id,
                    "category_id": q.category_id,
                    "category": q.category,  # groma/eval/eval_lvis.py:58
                    "gt_boxes": [list(b) for b in q.boxes],
                    "gt_areas": list(q.areas),
                },
            )
            for i, q in enumerate(queries)
        ]

    def predict(self, groma, samples, seed, batch_size):
        requests = [Request(s.image, [(self.template_for(s, seed).format(s.data["category"]), None)]) for s in samples]
        answers = groma.answer(requests, max_new_tokens=self.max_new_tokens, do_sample=False)
        return [
            {
                "id": s.id,
                "answer": a.raw_text,
                "pred_boxes": [list(b) for p in a.phrases for b in p.boxes_px],
                **{k: s.data[k] for k in ("image_id", "category_id", "gt_boxes", "gt_areas")},
            }
            for s, a in zip(samples, answers)
        ]

    def failed(self, sample, reason):
        keys = ("image_id", "category_id", "gt_boxes", "gt_areas")
        return {"id": sample.id, "error": reason, "pred_boxes": [], **{k: sample.data[k] for k in keys}}

    def score(self, predictions):
        samples = [
            GroundingSample(
                p["image_id"], p["category_id"], p["pred_boxes"] or _no_boxes(), p["gt_boxes"], p["gt_areas"]
            )
            for p in predictions
        ]
        return lvis_ground_recall(samples).as_dict()


def _no_boxes():
    return torch.zeros(0, 4).numpy()


class RegionCaptionTask(Task):
    """Region captioning: the ground-truth box goes in as a user box; the caption is scored against the references
    (Visual Genome style: a ``caption`` per annotation; RefCOCOg style: the "image" entry's ``caption``)."""

    name = "region-caption"
    # random.choice over the reference's lists, the box as <roi><refer_box></roi><refer_feat>: vg, groma/eval/
    # model_vg.py:14,43 (visual_genome.py's four); refcocog, groma/eval/model_refcocog.py:15,81 (refcoco_cap.py's five)
    styles = {
        "vg": tuple(t.format(REFER) for t in REGION_INSTRUCTIONS),
        "refcocog": tuple(t.format(REFER) for t in DETAILED_REGION_INSTRUCTIONS),
    }
    max_new_tokens = 100

    def __init__(self, ann_file, images_dir, style: str = "vg", max_new_tokens: int | None = None):
        if style not in self.styles:
            raise InputError(f"--style {style!r}: expected one of {', '.join(self.styles)}")
        self.templates = self.styles[style]
        super().__init__(ann_file, images_dir, max_new_tokens)

    def read(self) -> list[Sample]:
        return [
            Sample(
                str(r.id if r.id is not None else i),
                i,
                _image_path(self.images_dir, r.image.file_name),
                {"box": list(r.box), "references": list(r.references)},
            )
            for i, r in enumerate(read_region_captions(self.ann_file))
        ]

    def predict(self, groma, samples, seed, batch_size):
        requests = [Request(s.image, [(self.template_for(s, seed), None)], [s.data["box"]]) for s in samples]
        answers = groma.answer(requests, max_new_tokens=self.max_new_tokens, do_sample=False)
        return [
            {"id": s.id, "caption": clean_generated_caption(a.raw_text), "references": s.data["references"]}
            for s, a in zip(samples, answers)
        ]

    def failed(self, sample, reason):
        return {"id": sample.id, "error": reason, "caption": "", "references": sample.data["references"]}

    def score(self, predictions):
        preds = {p["id"]: p["caption"] for p in predictions}
        refs = {p["id"]: p["references"] for p in predictions}
        return caption_scores(preds, refs).as_dict()


class DetectionTask(Task):
    """Class-agnostic COCO AP/AR of the region proposer alone (no language model). Crowd annotations
    (``iscrowd``) are kept as COCO keeps them: regions whose detections are neither right nor wrong."""

    name = "detection"
    templates = ("",)

    def read(self) -> list[Sample]:
        return [
            Sample(
                str(d.image.id),
                i,
                _image_path(self.images_dir, d.image.file_name),
                {"gt_boxes": [list(b) for b in d.boxes], "gt_areas": list(d.areas), "gt_crowd": list(d.crowd)},
            )
            for i, d in enumerate(read_detection(self.ann_file))
        ]

    @torch.no_grad()
    def predict(self, groma, samples, seed, batch_size):
        images = [load_image(s.image) for s in samples]
        model = groma.model  # the proposer alone: no prompt, no processor
        pixels = model.image_tokenizer.preprocess(images).to(model.device, model.input_dtype)
        proposals = model.propose(model.encode_images(pixels, images))
        out = []
        for s, img, boxes, scores in zip(samples, images, proposals.boxes, proposals.scores):
            w, h = img.size
            order = scores.float().argsort(descending=True, stable=True)[:100]
            frame = model.image_tokenizer.input_frame(w, h)
            px = from_input_frame(boxes[order].float().cpu(), frame).clamp(0, 1) * torch.tensor([w, h, w, h])
            out.append({"id": s.id, "pred_boxes": px.tolist(), "pred_scores": scores[order].float().tolist(), **s.data})
        return out

    def failed(self, sample, reason):
        return {"id": sample.id, "error": reason, "pred_boxes": [], "pred_scores": [], **sample.data}

    def score(self, predictions):
        return detection_metrics(
            [p["pred_boxes"] or _no_boxes() for p in predictions],
            [p["pred_scores"] for p in predictions],
            [p["gt_boxes"] or _no_boxes() for p in predictions],
            [p["gt_areas"] for p in predictions],
            gt_crowd=[p.get("gt_crowd") for p in predictions],  # None: a run written before crowd boxes were kept
        ).as_dict()


class GroundedCaptionTask(Task):
    """Grounded captions (a Flickr30k-Entities style file, as ``groma data shapes`` writes ``flickr_*.json``): the
    ``[grounding]`` caption of each image; its phrases are scored by :func:`phrase_grounding` at IoU 0.5 (precision
    over the predicted phrases, recall over the ground-truth boxes) and its text by the caption scores against the
    file's caption. ``ignore_words``: words left out when phrases are matched (besides articles and counts), e.g.
    size words that the references use inconsistently."""

    name = "grounded-caption"
    templates = tuple(GROUNDING + t for t in CAPTION_INSTRUCTIONS)
    max_new_tokens = 100

    def __init__(self, ann_file, images_dir, max_new_tokens: int | None = None, ignore_words: Sequence[str] = ()):
        self.ignore_words = frozenset(w.strip().lower() for w in ignore_words if w.strip())
        super().__init__(ann_file, images_dir, max_new_tokens)

    def read(self) -> list[Sample]:
        """The captions and their phrases (:func:`groma_core.data.read_grounded_captions`, which reads the file)."""

        records = read_grounded_captions(self.ann_file)
        return [
            Sample(
                str(r.image.id),
                i,
                _image_path(self.images_dir, r.image.file_name),
                {"caption": r.caption, "phrases": [[p.text, [list(b) for b in p.boxes]] for p in r.phrases]},
            )
            for i, r in enumerate(records)
        ]

    def predict(self, groma, samples, seed, batch_size):
        requests = [Request(s.image, [(self.template_for(s, seed), None)]) for s in samples]
        answers = groma.answer(requests, max_new_tokens=self.max_new_tokens, do_sample=False)
        return [
            {
                "id": s.id,
                "caption": clean_generated_caption(a.raw_text),
                "phrases": [[p.phrase, [list(b) for b in p.boxes_px]] for p in a.phrases],
                "reference": s.data["caption"],
                "gt_phrases": s.data["phrases"],
            }
            for s, a in zip(samples, answers)
        ]

    def failed(self, sample, reason):
        return {"id": sample.id, "error": reason, "caption": "", "phrases": [], "reference": sample.data["caption"],
                "gt_phrases": sample.data["phrases"]}  # fmt: skip

    def score(self, predictions):
        def as_pairs(phrases):
            return [(text, np.asarray(boxes, dtype=np.float64).reshape(-1, 4)) for text, boxes in phrases]

        grounding = phrase_grounding(
            [as_pairs(p["phrases"]) for p in predictions],
            [as_pairs(p["gt_phrases"]) for p in predictions],
            ignore_words=self.ignore_words,
        )
        preds = {p["id"]: p["caption"] for p in predictions}
        refs = {p["id"]: [p["reference"]] for p in predictions}
        return {**grounding.as_dict(), **caption_scores(preds, refs).as_dict()}


TASKS: dict[str, type[Task]] = {
    "rec": RecTask,
    "lvis-ground": LvisGroundTask,
    "region-caption": RegionCaptionTask,
    "detection": DetectionTask,
    "grounded-caption": GroundedCaptionTask,
}


# -- running ---------------------------------------------------------------------------------------------------
def _dist() -> tuple[int, int]:
    """(rank, world size), initialising torch.distributed from torchrun's environment when needed."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _read_predictions(out_dir: Path) -> dict[str, dict]:
    done: dict[str, dict] = {}
    for path in sorted(out_dir.glob("predictions*.jsonl")):
        for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                if line_no == len(path.read_text(encoding="utf-8").splitlines()):
                    continue  # a line cut short by an interruption: that sample is recomputed
                raise InputError(f"{path}:{line_no}: not a JSON line") from None
            done[str(record["id"])] = record
    return done


def _recipe_hash(model) -> str | None:
    recipe = getattr(model, "recipe", None)
    if recipe is None:
        return None
    return hashlib.sha256(json.dumps(recipe.to_dict(), sort_keys=True).encode()).hexdigest()


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def versions() -> dict[str, str]:
    import transformers

    from groma_core import __version__

    return {
        "groma_core": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def evaluate(
    task: Task,
    model,
    out_dir: str | Path,
    *,
    seed: int = 0,
    batch_size: int = 8,
    resume: bool = False,
    limit: int | None = None,
    model_name: str = "",
    progress: bool = True,
) -> dict[str, Any]:
    """Run ``task`` with ``model`` (a :class:`~groma_core.model.GromaModel` or the task API around one); write
    ``predictions.jsonl`` and ``summary.json`` into ``out_dir``; return the summary (on the first process; the
    others return an empty dict)."""
    groma = model if isinstance(model, Groma) else Groma(model)
    model = groma.model
    rank, world = _dist()
    out_dir = Path(out_dir)
    samples = task.samples[:limit] if limit else task.samples
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        if not resume and any(out_dir.glob("predictions*.jsonl")):
            raise GromaError(f"{out_dir} already holds predictions: pass --resume to continue, or choose another --out")
    _barrier()
    identity = {
        "task": task.name,
        "model": model_name,
        "recipe_sha256": _recipe_hash(model),
        "annotation_sha256": sha256_of(task.ann_file),
        "seed": seed,
        "max_new_tokens": task.max_new_tokens,
    }
    run_file = out_dir / "run.json"
    if rank == 0:
        if resume and run_file.is_file():
            before = json.loads(run_file.read_text(encoding="utf-8"))
            before.setdefault("max_new_tokens", type(task).max_new_tokens)  # runs written before it was recorded
            changed = [f"{k} ({before.get(k)!r} then, {v!r} now)" for k, v in identity.items() if before.get(k) != v]
            if changed:
                raise GromaError(f"--resume refused: {out_dir} holds a run with a different " + "; ".join(changed))
        run_file.write_text(json.dumps(identity, indent=1), encoding="utf-8")
    _barrier()
    done = _read_predictions(out_dir) if resume else {}
    mine = [s for s in samples if s.index % world == rank and s.id not in done]
    shard = out_dir / (f"predictions.rank{rank}.jsonl" if world > 1 else "predictions.part.jsonl")
    bar = None
    if progress and rank == 0:
        from tqdm import tqdm

        bar = tqdm(total=len(mine), desc=f"{task.name}", unit="sample", file=sys.stderr, dynamic_ncols=True)
    start = time.time()
    with open(shard, "a", encoding="utf-8") as f:
        for i in range(0, len(mine), batch_size):
            batch = mine[i : i + batch_size]
            readable, records = [], {}
            for sample in batch:  # each image is read once, here; a broken one is recorded, not fatal
                try:
                    readable.append(Sample(sample.id, sample.index, load_image(sample.image), sample.data))
                except InputError as exc:
                    records[sample.id] = task.failed(sample, str(exc))
            if readable:
                records.update((r["id"], r) for r in task.predict(groma, readable, seed, batch_size))
            for sample in batch:
                f.write(json.dumps(records[sample.id]) + "\n")
                f.flush()
            if bar:
                bar.update(len(batch))
    if bar:
        bar.close()
    _barrier()
    summary: dict[str, Any] = {}
    if rank == 0:
        records = _read_predictions(out_dir)
        order = {s.id: s.index for s in samples}
        merged = sorted((r for r in records.values() if r["id"] in order), key=lambda r: order[r["id"]])
        if len(merged) != len(samples):
            raise GromaError(f"only {len(merged)} of {len(samples)} samples have predictions")
        final = out_dir / "predictions.jsonl"
        tmp = out_dir / "predictions.jsonl.tmp"
        tmp.write_text("".join(json.dumps(r) + "\n" for r in merged), encoding="utf-8")
        for part in out_dir.glob("predictions*.jsonl"):
            part.unlink()
        tmp.replace(final)
        recipe = getattr(model, "recipe", None)
        failures = [r for r in merged if r.get("error")]
        if failures:
            print(
                f"{len(failures)} sample(s) could not be read and count as wrong, e.g. {failures[0]['error']}",
                file=sys.stderr,
            )
        summary = {
            "task": task.name,
            "metrics": task.score(merged),
            "num_samples": len(merged),
            "unreadable_images": len(failures),
            "model": model_name,
            "recipe": recipe.to_dict() if recipe is not None else None,
            "annotation_file": str(task.ann_file),
            "annotation_sha256": sha256_of(task.ann_file),
            "seed": seed,
            "max_new_tokens": task.max_new_tokens,
            "world_size": world,
            "seconds": round(time.time() - start, 3),
            "versions": versions(),
        }
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    _barrier()
    return summary
