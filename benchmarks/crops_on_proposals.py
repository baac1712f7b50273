"""How well a region encoder's crop classifier names the shapes from the boxes the model itself proposes, against the
true boxes: for each ground-truth shape of a `groma data shapes` folder, the selected proposal with the highest IoU
(>= 0.5) is taken, and the classifier's head word (the shape) is scored on both boxes. Also prints how far those
proposals are from the truth (IoU, centre offset and side ratio), what a ``crops`` stage's ``box_jitter`` imitates.

    python benchmarks/crops_on_proposals.py MODEL DATA [--classifier WEIGHTS ...] [--set OPTION=VALUE ...]
        [--limit 300]

MODEL is a model folder (its image tokenizer and proposer make the proposals); each ``--classifier`` is a
``model.safetensors`` (a checkpoint's or a model folder's) whose crop classifier is scored on the same boxes, its crops
built and cut with MODEL's mlvl-roialign options but those ``--set`` gives (e.g. ``--set crop_cnn=wide``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

import torch
from PIL import Image

from groma_core.boxes import box_iou, from_input_frame, to_input_frame, xyxy_to_cxcywh
from groma_core.inference import Groma

CLASSIFIER = "region_encoder.extractor.crop_classifier."


def truth(data: Path, limit: int) -> list[tuple[Path, torch.Tensor, list[str]]]:
    """(image file, true boxes normalised xyxy (K, 4), each box's shape word) of the first ``limit`` images."""
    ann = json.loads((data / "annotations" / "detection_train.json").read_text(encoding="utf-8"))
    shapes = {c["id"]: c["name"].split("_")[-1] for c in ann["categories"]}
    boxes: dict[int, list[tuple[list[float], str]]] = {}
    for a in ann["annotations"]:
        boxes.setdefault(a["image_id"], []).append((a["bbox"], shapes[a["category_id"]]))
    out = []
    for image in ann["images"][:limit]:
        w, h = image["width"], image["height"]
        rows = boxes.get(image["id"], [])
        xyxy = torch.tensor([[x / w, y / h, (x + bw) / w, (y + bh) / h] for (x, y, bw, bh), _ in rows]).reshape(-1, 4)
        out.append((data / "images" / image["file_name"], xyxy, [s for _, s in rows]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("data", type=Path)
    parser.add_argument("--classifier", action="append", default=[], help="a model.safetensors with a crop classifier")
    parser.add_argument(
        "--set", action="append", default=[], help="an mlvl-roialign option of the --classifier weights"
    )
    parser.add_argument("--limit", type=int, default=300)
    args = parser.parse_args()
    from groma_plugin_roialign.extractor import crop_classifier
    from safetensors.torch import load_file

    groma = Groma.load(args.model)
    model = groma.model
    encoder = model.region_encoder
    images = truth(args.data, args.limit)
    vocabulary = sorted({s for _, _, shapes in images for s in shapes})
    own = encoder.options
    given = {k: type(getattr(own, k))(v) for k, v in (item.split("=", 1) for item in args.set)}
    classifiers = {"model": (encoder.extractor.crop_classifier, own)}
    for path in args.classifier:
        weights = {k[len(CLASSIFIER) :]: v for k, v in load_file(path).items() if k.startswith(CLASSIFIER)}
        if not weights:
            raise SystemExit(f"{path}: no crop classifier ({CLASSIFIER}*) in this file")
        options = own.model_copy(update=given)
        net = crop_classifier(options.crop_cnn, options.crop_classes)
        net.load_state_dict(weights)
        classifiers[path] = (net.eval(), options)
    right = {name: [0, 0] for name in classifiers}  # (on true boxes, on matched proposals)
    ious, offsets, ratios, shapes_seen, matched = [], [], [], 0, 0
    for file, true_boxes, shapes in images:
        if not shapes:
            continue
        image = Image.open(file).convert("RGB")
        frame = model.input_frames([image])[0]
        with torch.no_grad():
            pixels = model.image_tokenizer.preprocess([image]).to(model.device, model.input_dtype)
            features = model.encode_images(pixels, [image])
            regions = model.select(model.propose(features))
        proposed = from_input_frame(regions.boxes[0].float(), frame)
        shapes_seen += len(shapes)
        if proposed.shape[0] == 0:
            continue
        iou = box_iou(true_boxes, proposed)
        best_iou, best = iou.max(1)
        keep = best_iou >= 0.5
        matched += int(keep.sum())
        pairs = true_boxes[keep], proposed[best[keep]]
        ious += best_iou[keep].tolist()
        (true_centre, side), (centre, proposed_side) = (xyxy_to_cxcywh(b).split(2, dim=1) for b in pairs)
        side = side.clamp(min=1e-6)
        offsets += ((centre - true_centre) / side).abs().flatten().tolist()
        ratios += (proposed_side / side).log().abs().flatten().tolist()
        labels = torch.tensor([vocabulary.index(s) for s, k in zip(shapes, keep.tolist()) if k])
        for name, (net, options) in classifiers.items():
            encoder.options = options  # the crop's size
            with torch.no_grad():
                for column, boxes in enumerate(pairs):
                    crops = encoder.crops(features, [to_input_frame(boxes, frame)], model.device)
                    logits = net(crops.to(next(net.parameters()).dtype))
                    right[name][column] += int((logits.argmax(-1).cpu() == labels).sum())
        encoder.options = own

    def quantiles(values: list[float]) -> str:
        q = torch.tensor(values).quantile(torch.tensor([0.5, 0.9]))
        return f"median {q[0]:.3f}, 90th percentile {q[1]:.3f}"

    python = platform.python_version()
    print(f"machine: {os.cpu_count()}-core {platform.machine()}, Python {python}, torch {torch.__version__}")
    print(f"shapes: {shapes_seen}; with a selected proposal at IoU >= 0.5: {matched} ({matched / shapes_seen:.3f})")
    print(
        f"those proposals: IoU {quantiles(ious)}; |centre offset| / side {quantiles(offsets)}; "
        f"|log side ratio| {quantiles(ratios)}"
    )
    for name, (on_truth, on_proposal) in right.items():
        o = classifiers[name][1]
        print(
            f"crop classifier {name} ({o.image_crop} px, {o.crop_cnn} CNN): "
            f"shape right on the true box "
            f"{on_truth / matched:.3f}, on the proposal {on_proposal / matched:.3f} ({matched} shapes)"
        )


if __name__ == "__main__":
    main()
