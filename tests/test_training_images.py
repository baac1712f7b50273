"""Training with a stage that reads the original images (a pixel proposer, as sam, owlv2, rt-detr, detectron2 and
third-party proposers are): the datasets carry each sample's image, after its augmentation, to the stage, whether
the stage is trained (a detection stage) or frozen (a language stage); a model without such a stage is not given
them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from groma_core.boxes import box_iou
from groma_core.data import ShapesConfig, write_shapes_dataset
from groma_core.errors import InputError
from groma_core.inference import Groma
from groma_core.model import GromaModel
from groma_core.prompt import GromaTokenizer, SentencePieceCodec
from groma_core.schema import DatasetSpec
from groma_core.selection import SelectionConfig
from groma_core.stages import RegionProposer
from groma_core.testing.tiny import GridProposer, RoIPoolEncoder, TinyConvTokenizer, TinyLlamaBackbone
from groma_core.training import TrainingConfig, run_training
from groma_core.training.data import collate
from groma_core.training.datasets import open_dataset
from groma_core.types import Proposals

CELLS = 3


class PixelGridProposer(RegionProposer):
    """A small third-party style proposer that ignores the features and looks at the original images: each image
    is resized to 24 x 24, a conv scores and nudges the cells of a 3 x 3 grid; it has a detection loss."""

    needs_images = True

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 8, stride=8)
        self.seen: list[tuple[int, int]] = []

    def forward(self, features):
        if features.images is None:
            raise InputError("pixel-grid: features.images is None")
        self.seen += [image.size for image in features.images]
        arrays = [np.asarray(image.convert("RGB").resize((24, 24)), dtype=np.float32) for image in features.images]
        pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 255.0
        out = self.conv(pixels.to(self.conv.weight)).flatten(2).transpose(1, 2)  # (B, 9, 5)
        ticks = torch.linspace(0, 1, CELLS + 1)
        grid = torch.stack([
            torch.stack([ticks[j], ticks[i], ticks[j + 1], ticks[i + 1]]) for i in range(CELLS) for j in range(CELLS)
        ]).to(out)
        boxes = (grid + 0.05 * torch.tanh(out[..., 1:])).clamp(0, 1)
        boxes = torch.cat([boxes[..., :2], torch.maximum(boxes[..., 2:], boxes[..., :2])], dim=-1)
        logits = out[..., 0]
        return Proposals(list(boxes), list(torch.sigmoid(logits)), extras={"logits": logits})

    def detection_loss(self, proposals, targets, source):
        terms = []
        for i, target in enumerate(targets):
            best, _ = box_iou(proposals.boxes[i], target.to(proposals.boxes[i])).max(dim=1)
            terms.append(F.binary_cross_entropy_with_logits(proposals.extras["logits"][i], (best > 0.1).float()))
        return {"loss_objectness": torch.stack(terms).mean()}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    write_shapes_dataset(root, ShapesConfig(images=8, seed=3, width=(96, 128), height=(64, 96), objects=(1, 3)))
    return root


def make_model(sp_dir, proposer: RegionProposer) -> GromaModel:
    torch.manual_seed(0)
    tok = GromaTokenizer(SentencePieceCodec(sp_dir / "tokenizer.model"))
    return GromaModel(
        TinyConvTokenizer(64, 8, 16), proposer, RoIPoolEncoder(16, 32), TinyLlamaBackbone(tok, 32, 2, 4),
        SelectionConfig(score_threshold=0.0), "default",
    )


def datasets(model: GromaModel, shapes) -> dict:
    specs = {
        "boxes": DatasetSpec(format="detection", ann="annotations/detection_train.json", images="images"),
        "rec": DatasetSpec(format="rec", ann="annotations/rec_train.json", images="images"),
    }
    return {name: open_dataset(spec, model, shapes, name) for name, spec in specs.items()}


STAGES = [
    {"name": "detection", "objective": "detection", "train": ["region_proposer"], "data": [{"name": "boxes"}],
     "batch_size": 2, "lr": 1e-2, "max_steps": 3, "warmup_steps": 0},
    {"name": "referring", "train": ["image_projector", "language_backbone"], "freeze": ["region_proposer"],
     "data": [{"name": "rec"}], "batch_size": 2, "lr": 1e-3, "max_steps": 3},
]


def test_a_pixel_proposer_gets_the_images_trained_and_frozen(sp_dir, shapes, tmp_path):
    proposer = PixelGridProposer()
    model = make_model(sp_dir, proposer)
    assert model.needs_images
    data = datasets(model, shapes)
    batch = collate([{**data["rec"][i], "dataset": "rec", "source": "coco"} for i in range(2)])
    assert [image.mode for image in batch["images"]] == ["RGB", "RGB"]

    before = {k: v.detach().clone() for k, v in proposer.named_parameters()}
    config = TrainingConfig.model_validate({"stages": [STAGES[0]], "progress": False})
    run_training(model, config, data, tmp_path / "detection")
    assert len(proposer.seen) == 3 * 2, "the proposer read the images of every sample of the detection stage"
    trained = {k: v.detach().clone() for k, v in proposer.named_parameters()}
    assert any(not torch.equal(before[k], trained[k]) for k in before), "the detection stage trained the proposer"

    proposer.seen.clear()
    config = TrainingConfig.model_validate({"stages": [STAGES[1]], "progress": False})
    run_training(model, config, data, tmp_path / "referring")
    assert len(proposer.seen) == 3 * 2, "the frozen proposer read the images of every sample of the language stage"
    assert all(torch.equal(trained[k], v) for k, v in proposer.named_parameters()), "frozen stays frozen"


def test_detection_samples_carry_the_augmented_image_of_their_boxes(sp_dir, shapes):
    """The image a detection sample carries is the one after the random rescale, crop and flip, at the input size,
    and each of the sample's boxes lies on a shape of its category's colour in it (checked on 12 draws)."""
    import json

    from groma_core.data import PALETTE

    model = make_model(sp_dir, PixelGridProposer())
    boxes = datasets(model, shapes)["boxes"]
    categories = json.loads((shapes / "annotations" / "detection_train.json").read_text())["categories"]
    colour_of = {c["id"]: PALETTE[c["name"].split("_")[0]] for c in categories}
    names = {c["id"]: c["name"] for c in categories}
    torch.manual_seed(0)
    for draw in range(12):
        sample = boxes[draw % len(boxes)]
        image = np.asarray(sample["image"], dtype=np.float64)
        assert sample["image"].size == (64, 64), "the augmented image at the tokenizer's input size"
        for box, label in zip(sample["boxes"].tolist(), sample["box_labels"].tolist()):
            x1, y1, x2, y2 = (round(v * 64) for v in box)
            crop = image[y1 : max(y2, y1 + 1), x1 : max(x2, x1 + 1)].reshape(-1, 3)
            distance = np.sqrt(((crop - colour_of[label]) ** 2).sum(axis=1)).min()
            assert distance < 40, f"draw {draw}: no {names[label]} pixel inside its box {box} (nearest {distance:.0f})"


def test_a_model_without_such_a_stage_does_not_carry_images(sp_dir, shapes):
    model = make_model(sp_dir, GridProposer(3))
    assert not model.needs_images
    data = datasets(model, shapes)
    assert "image" not in data["boxes"][0] and "image" not in data["rec"][0]
    assert "images" not in collate([{**data["rec"][i], "dataset": "rec", "source": "coco"} for i in range(2)])


def test_a_pixel_proposer_without_images_fails_clearly(sp_dir):
    model = make_model(sp_dir, PixelGridProposer())
    with pytest.raises(InputError, match="features.images is None"):
        model.region_proposer(model.encode_images(torch.zeros(1, 3, 64, 64)))


class TopLeftLetterbox(TinyConvTokenizer):
    """The tiny tokenizer keeping the aspect ratio: the image scaled into the top-left of the square input."""

    def input_frame(self, width: int, height: int):
        side = max(width, height)
        return (width / side, height / side, 0.0, 0.0)


def test_proposals_on_the_original_image_are_mapped_into_a_letterboxed_input(sp_dir):
    """A pixel proposer answers in the original image; the core works in the letterboxed input frame and hands the
    user boxes of the original image again: the regions of an answer are the proposer's boxes, unchanged."""
    from PIL import Image

    from groma_core.inference import Request

    torch.manual_seed(0)
    tok = GromaTokenizer(SentencePieceCodec(sp_dir / "tokenizer.model"))
    proposer = PixelGridProposer()
    model = GromaModel(
        TopLeftLetterbox(64, 8, 16), proposer, RoIPoolEncoder(16, 32), TinyLlamaBackbone(tok, 32, 2, 4),
        SelectionConfig(score_threshold=0.0, nms_iou=1.0), "default",
    ).eval()
    image = Image.new("RGB", (120, 60), (200, 40, 40))
    with torch.no_grad():
        own = proposer(model.encode_images(model.image_tokenizer.preprocess([image]), [image]))
        mapped = model.propose(model.encode_images(model.image_tokenizer.preprocess([image]), [image]))
        answer = Groma(model).answer([Request(image, [("[grounding]Describe the image.", None)])], max_new_tokens=2)[0]
    torch.testing.assert_close(mapped.boxes[0], own.boxes[0] * torch.tensor([1.0, 0.5, 1.0, 0.5]))
    assert answer.regions.shape[0] == 9
    for region in answer.regions:  # float32 round trip through the frame: within 1e-6 of a proposer box
        assert torch.isclose(own.boxes[0], region, atol=1e-6).all(dim=1).any(), region
