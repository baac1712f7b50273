"""How well the shape name can be read from the ORIGINAL image's pixels (not the encoder's 280 px input): a small CNN
on each true box cropped from the picture and resized to S x S, with the box's log aspect and log size beside it.

    python benchmarks/crop_probe.py DATA VAL [--size 16] [--train-images 2000] [--val-images 300]
        [--keep-aspect] [--no-box] [--labels shape|category|two|words]

DATA and VAL are `groma data shapes` folders (training data, validation data of another seed); the probe trains on
DATA's detection file and reports the shape name's accuracy on VAL's, overall and by the shape's size in the
encoder's 280 px input. What `mlvl-roialign`'s `image_crop` gives the region tokens to read (benchmarks/README.md).
``--labels`` chooses what the CNN is taught to name (the shape alone, the colour x shape category, the colour and the
shape by two softmaxes, or both words by one softmax over the twenty words); the shape is always what is scored.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

INPUT_SIDE = 280  #: the embedded recipe's encoder input, for the size buckets


def read(
    root: Path, size: int, limit: int, keep_aspect: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, np.ndarray]:
    """Crops (N, 3, S, S), box features (N, 2), shape labels (N,), colour labels (N,), side of each shape in the
    encoder input (N,).
    ``keep_aspect``: the crop is the square around the box's centre with the box's longer side (a rectangle stays a
    rectangle), cut by the encoder's own RoIAlign as ``image_crop`` does."""
    from groma_plugin_roialign.encoder import square_windows
    from groma_plugin_roialign.ops import roi_align

    from groma_core.data.shapes import PALETTE, SHAPES

    data = json.loads((root / "annotations" / "detection_train.json").read_text())
    names = {c["id"]: c["name"] for c in data["categories"]}
    images = {i["id"]: i for i in data["images"]}
    by_image: dict[int, list[dict]] = {}
    for a in data["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    crops, boxes, labels, colours, sides = [], [], [], [], []
    for image_id in list(by_image)[:limit]:
        info = images[image_id]
        picture = Image.open(root / "images" / info["file_name"]).convert("RGB")
        pixels = torch.from_numpy(np.asarray(picture, dtype=np.float32) / 255.0 - 0.5).permute(2, 0, 1)[None]
        xywh = torch.tensor([a["bbox"] for a in by_image[image_id]], dtype=torch.float32)
        xyxy = torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], dim=1)
        windows = square_windows(xyxy) if keep_aspect else xyxy
        rois = torch.cat([windows.new_zeros(len(windows), 1), windows], dim=1)
        crops.extend(roi_align(pixels, rois, size, sampling_ratio=2, aligned=True))
        for a in by_image[image_id]:
            x, y, w, h = a["bbox"]
            boxes.append([math.log(w / h), math.log(w * h) / 10])
            labels.append(SHAPES.index(names[a["category_id"]].split("_")[-1]))
            colours.append(list(PALETTE).index(names[a["category_id"]].split("_")[0]))
            sides.append(max(w, h) * INPUT_SIDE / max(info["width"], info["height"]))
    return torch.stack(crops), torch.tensor(boxes), torch.tensor(labels), torch.tensor(colours), np.array(sides)


class CropNet(nn.Module):
    def __init__(self, classes: int):
        super().__init__()
        from groma_plugin_roialign.extractor import CROP_FEATURES, crop_convs

        self.convs = nn.Sequential(*crop_convs())  # the image_crop stem's CNN, without its map to the region width
        self.head = nn.Sequential(nn.Linear(CROP_FEATURES + 2, 128), nn.ReLU(), nn.Linear(128, classes))

    def forward(self, crops: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([self.convs(crops), boxes], dim=1))


def label_loss(logits: torch.Tensor, shape: torch.Tensor, colour: torch.Tensor, shapes: int, labels: str) -> Tensor:
    """The loss of ``--labels`` (the shapes' logits first): the shape's CE; the category's (colour x shape) CE; a CE
    each for the shape and the colour; or one softmax over the shape and colour words, half the target on each."""
    if labels == "shape":
        return F.cross_entropy(logits, shape)
    if labels == "category":
        return F.cross_entropy(logits, colour * shapes + shape)
    if labels == "two":
        return F.cross_entropy(logits[:, :shapes], shape) + F.cross_entropy(logits[:, shapes:], colour)
    target = torch.zeros_like(logits)
    target[torch.arange(len(shape)), shape] = 0.5
    target[torch.arange(len(shape)), shapes + colour] = 0.5
    return -(target * logits.log_softmax(-1)).sum(-1).mean()


def shape_of(logits: torch.Tensor, shapes: int, labels: str) -> torch.Tensor:
    """The shape each row of logits names under ``--labels``."""
    return logits.argmax(1) % shapes if labels == "category" else logits[:, :shapes].argmax(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path)
    parser.add_argument("val", type=Path)
    parser.add_argument("--size", type=int, default=16)
    parser.add_argument("--train-images", type=int, default=2000)
    parser.add_argument("--val-images", type=int, default=300)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--keep-aspect", action="store_true", help="square crops around the box (image_crop's way)")
    parser.add_argument("--no-box", action="store_true", help="the crop alone, without the box's aspect and size")
    parser.add_argument("--labels", choices=["shape", "category", "two", "words"], default="shape",
                        help="what the CNN is taught to name (the shape is scored)")
    args = parser.parse_args()
    began = time.time()
    torch.set_num_threads(1)
    x, b, y, c, _ = read(args.data, args.size, args.train_images, args.keep_aspect)
    vx, vb, vy, _, sides = read(args.val, args.size, args.val_images, args.keep_aspect)
    if args.no_box:
        b, vb = torch.zeros_like(b), torch.zeros_like(vb)
    print(f"machine: {platform.machine()}, torch {torch.__version__}, 1 thread; {len(y)} training / {len(vy)} "
          f"validation shapes, crops {args.size} x {args.size}{' (square, aspect kept)' if args.keep_aspect else ''}"
          f"{', no box features' if args.no_box else ''}; taught to name: {args.labels}")
    torch.manual_seed(0)
    shapes, colours = int(y.max()) + 1, int(c.max()) + 1
    net = CropNet({"shape": shapes, "category": shapes * colours}.get(args.labels, shapes + colours))
    optimizer = torch.optim.Adam(net.parameters(), 2e-3)
    for step in range(1, args.steps + 1):
        pick = torch.randint(len(y), (128,))
        loss = label_loss(net(x[pick], b[pick]), y[pick], c[pick], shapes, args.labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 500 == 0 or step == args.steps:
            with torch.no_grad():
                right = (shape_of(net(vx, vb), shapes, args.labels) == vy).numpy()
            small, middle, large = sides < 20, (sides >= 20) & (sides < 40), sides >= 40
            print(f"step {step}: shape name {right.mean():.3f}; by side in the {INPUT_SIDE} px input: < 20 px "
                  f"{right[small].mean():.3f} ({small.sum()}), 20-40 px {right[middle].mean():.3f}, >= 40 px "
                  f"{right[large].mean():.3f}")
    print(f"took {time.time() - began:.0f} s")


if __name__ == "__main__":
    main()
