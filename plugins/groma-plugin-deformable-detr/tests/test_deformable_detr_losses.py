"""Stage-1 detection losses: a hand-computed case, parity with transformers' Deformable DETR matcher and losses,
which heads get gradients, images without targets, multi-process normalisation, and a short overfit."""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from groma_plugin_deformable_detr import DeformableDetrOptions, DeformableDetrProposer, build_proposer
from groma_plugin_deformable_detr.losses import DetectionLossWeights, detection_loss, hungarian_match, match_cost

from groma_core.boxes import box_iou, cxcywh_to_xyxy
from groma_core.stages import BuildContext
from groma_core.types import ImageFeatures

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("scipy") is None, reason="the detection losses need scipy's linear_sum_assignment"
)

LEVELS = ["last-3", "last-2", "last-1", "last"]
TINY = dict(
    d_model=32,
    encoder_layers=1,
    decoder_layers=2,
    encoder_attention_heads=4,
    decoder_attention_heads=4,
    encoder_ffn_dim=64,
    decoder_ffn_dim=64,
    num_queries=20,
    box_head_hidden=16,
    dropout=0.0,
    frozen=False,
)


def tiny_proposer(seed: int = 0) -> DeformableDetrProposer:
    torch.manual_seed(seed)
    return build_proposer(DeformableDetrOptions(**TINY), BuildContext(level_channels=dict.fromkeys(LEVELS, 24)))


def random_features(batch: int = 1, seed: int = 0) -> ImageFeatures:
    generator = torch.Generator().manual_seed(seed)
    levels = {name: torch.randn(batch, 24, 8, 8, generator=generator) for name in LEVELS}
    return ImageFeatures(tokens=torch.zeros(batch, 4, 24), levels=levels)


def random_boxes(generator: torch.Generator, *shape: int) -> torch.Tensor:
    centres = torch.rand(*shape, 2, generator=generator) * 0.8 + 0.1
    sizes = torch.rand(*shape, 2, generator=generator) * 0.45 + 0.05
    return torch.cat([centres, sizes], -1)


# ---------------------------------------------------------------------------------------------------------------
# hand-computed: 2 queries, 1 target
# target (0.5, 0.5, 0.4, 0.4) = xyxy (0.3, 0.3, 0.7, 0.7), area 0.16
# query 0: (0.5, 0.5, 0.2, 0.2) = (0.4, 0.4, 0.6, 0.6) inside it: IoU = GIoU = 0.04 / 0.16, L1 = 0.4
# query 1: (0.2, 0.2, 0.4, 0.4) = (0, 0, 0.4, 0.4): intersection 0.01, union 0.31, hull 0.49, L1 = 0.6
# COCO head: p0 = 0.5, p1 = 0.9; SA-1B head: p0 = 0.9, p1 = 0.5
# ---------------------------------------------------------------------------------------------------------------
TARGET = torch.tensor([[0.5, 0.5, 0.4, 0.4]])
QUERY_BOXES = torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.2, 0.2, 0.4, 0.4]])
GIOU = [0.25, 0.01 / 0.31 - (0.49 - 0.31) / 0.49]
L1 = [0.4, 0.6]
LOGIT_09 = math.log(9.0)


def hand_extras() -> dict[str, torch.Tensor]:
    coco = torch.tensor([[0.0], [LOGIT_09]])
    return {
        "logits_coco": coco[None, None],
        "logits_sa1b": coco.flip(0)[None, None],
        "boxes_cxcywh": QUERY_BOXES[None, None],
        "encoder_logits": coco[None],
        "encoder_boxes_cxcywh": QUERY_BOXES[None],
    }


def class_cost(p: float) -> float:
    """transformers' focal-style matching cost of a positive with probability p (alpha 0.25, gamma 2)."""
    return 0.25 * (1 - p) ** 2 * -math.log(p + 1e-8) - 0.75 * p**2 * -math.log(1 - p + 1e-8)


def focal(p: float, positive: bool) -> float:
    """Sigmoid focal loss (alpha 0.25, gamma 2) of one prediction with probability p."""
    return 0.25 * (1 - p) ** 2 * -math.log(p) if positive else 0.75 * p**2 * -math.log(1 - p)


def test_hand_computed_matching_costs_and_losses():
    weights = DetectionLossWeights()
    cost = match_cost(torch.tensor([[0.0], [LOGIT_09]]), QUERY_BOXES, TARGET, weights)
    expected = [2 * class_cost(p) + 5 * l1 - 2 * giou for p, l1, giou in zip([0.5, 0.9], L1, GIOU)]
    torch.testing.assert_close(cost[:, 0], torch.tensor(expected), rtol=0, atol=1e-6)
    # the confident query wins although its box is worse (cost 0.873 vs 1.327) ...
    logits = hand_extras()["logits_coco"][:, 0]
    assert hungarian_match(logits, QUERY_BOXES[None], [TARGET], weights)[0][0].tolist() == [1]
    # ... and the better box wins without the class cost
    boxes_only = DetectionLossWeights(class_cost=0)
    assert hungarian_match(logits, QUERY_BOXES[None], [TARGET], boxes_only)[0][0].tolist() == [0]

    losses = detection_loss(hand_extras(), [{"boxes": TARGET}], "coco")
    expected_terms = {
        "loss_ce": focal(0.5, False) + focal(0.9, True),  # summed over the queries, / num_boxes = 1
        "loss_bbox": L1[1],
        "loss_giou": 1 - GIOU[1],
    }
    for name, value in expected_terms.items():
        assert losses[name].item() == pytest.approx(value, abs=1e-6)
        assert losses[name + "_enc"].item() == pytest.approx(value, abs=1e-6)  # encoder outputs = the same queries
    layer_total = 2 * expected_terms["loss_ce"] + 5 * expected_terms["loss_bbox"] + 2 * expected_terms["loss_giou"]
    assert losses["loss"].item() == pytest.approx(2 * layer_total, abs=1e-5)
    assert not any(name.startswith("loss_ce_0") for name in losses)  # one decoder layer: no auxiliary loss

    # an SA-1B batch reads the other head, which prefers query 0 (its box is the better one too)
    sa1b = detection_loss(hand_extras(), [{"boxes": TARGET}], "sa1b")
    assert sa1b["loss_ce"].item() == pytest.approx(focal(0.9, True) + focal(0.5, False), abs=1e-6)
    assert sa1b["loss_bbox"].item() == pytest.approx(L1[0], abs=1e-6)
    assert sa1b["loss_giou"].item() == pytest.approx(1 - GIOU[0], abs=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# parity with transformers
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("source", ["coco", "sa1b"])
def test_every_term_and_match_equals_transformers(source):
    from transformers import DeformableDetrConfig
    from transformers.loss.loss_deformable_detr import (
        DeformableDetrForObjectDetectionLoss,
        DeformableDetrHungarianMatcher,
        DeformableDetrImageLoss,
    )

    generator = torch.Generator().manual_seed(1)
    batch, layers, queries, tokens = 3, 4, 15, 40
    extras = {
        "logits_coco": torch.randn(batch, layers, queries, 1, generator=generator) * 2,
        "logits_sa1b": torch.randn(batch, layers, queries, 1, generator=generator) * 2,
        "boxes_cxcywh": random_boxes(generator, batch, layers, queries),
        "encoder_logits": torch.randn(batch, tokens, 1, generator=generator) * 2,
        "encoder_boxes_cxcywh": random_boxes(generator, batch, tokens),
    }
    targets = [random_boxes(generator, n) for n in (3, 0, 5)]
    ours = detection_loss(extras, [{"boxes": t} for t in targets], source)

    labels = [{"class_labels": torch.zeros(len(t), dtype=torch.long), "boxes": t} for t in targets]
    config = DeformableDetrConfig(
        num_labels=1, class_cost=2, bbox_cost=5, giou_cost=2, auxiliary_loss=True, decoder_layers=layers
    )
    logits, boxes = extras[f"logits_{source}"], extras["boxes_cxcywh"]
    _, theirs, _ = DeformableDetrForObjectDetectionLoss(
        logits[:, -1], labels, "cpu", boxes[:, -1], config, logits.transpose(0, 1), boxes.transpose(0, 1)
    )
    matcher = DeformableDetrHungarianMatcher(class_cost=2, bbox_cost=5, giou_cost=2)
    criterion = DeformableDetrImageLoss(matcher, num_classes=1, focal_alpha=0.25, losses=["labels", "boxes"])
    encoder = {"logits": extras["encoder_logits"], "pred_boxes": extras["encoder_boxes_cxcywh"]}
    theirs.update({name + "_enc": value for name, value in criterion(encoder, labels).items()})

    weights = DetectionLossWeights()
    coefficients = {"loss_ce": 2, "loss_bbox": 5, "loss_giou": 2}
    suffixes = ["", *(f"_{i}" for i in range(layers - 1)), "_enc"]
    names = [term + suffix for suffix in suffixes for term in coefficients]
    assert sorted(ours) == sorted([*names, "loss"])
    for name in names:
        torch.testing.assert_close(ours[name], theirs[name], rtol=0, atol=1e-5, msg=name)
    total = sum(coefficients[term] * theirs[term + suffix] for suffix in suffixes for term in coefficients)
    torch.testing.assert_close(ours["loss"], total, rtol=0, atol=1e-4)

    outputs = [(logits[:, i], boxes[:, i]) for i in range(layers)]
    outputs.append((extras["encoder_logits"], extras["encoder_boxes_cxcywh"]))
    for output_logits, output_boxes in outputs:
        mine = hungarian_match(output_logits, output_boxes, targets, weights)
        reference = matcher({"logits": output_logits, "pred_boxes": output_boxes}, labels)
        for (rows, cols), (ref_rows, ref_cols) in zip(mine, reference, strict=True):
            assert torch.equal(rows, ref_rows) and torch.equal(cols, ref_cols)


# ---------------------------------------------------------------------------------------------------------------
# on the real proposer
# ---------------------------------------------------------------------------------------------------------------
TARGETS = torch.tensor([[0.3, 0.35, 0.3, 0.4], [0.7, 0.6, 0.25, 0.3], [0.5, 0.8, 0.6, 0.2]])


@pytest.mark.parametrize(("source", "other"), [("coco", "sa1b"), ("sa1b", "coco")])
def test_gradients_reach_the_sources_head_and_the_shared_heads_only(source, other):
    stage = tiny_proposer()
    detection_loss(stage(random_features()).extras, [{"boxes": TARGETS}], source)["loss"].backward()
    transformer = stage.transformer
    assert all(p.grad is None for p in getattr(transformer, f"class_embed_{other}").parameters())
    trained = [*getattr(transformer, f"class_embed_{source}").parameters(), *transformer.class_embed_enc.parameters()]
    trained += [head.layers[-1].weight for head in transformer.bbox_embed]  # every decoder layer's + the encoder's
    trained += list(stage.input_proj.parameters())
    for parameter in trained:
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0


def test_images_without_targets_get_the_focal_loss_only():
    stage = tiny_proposer()
    extras = stage(random_features(batch=2)).extras
    losses = detection_loss(extras, [{"boxes": torch.zeros(0, 4)}, {"boxes": torch.zeros(0, 4)}], "coco")
    for name, value in losses.items():
        if "bbox" in name or "giou" in name:
            assert value.item() == 0.0, name
    probs = extras["logits_coco"][:, -1].sigmoid()
    all_negative = (0.75 * probs**2 * -torch.log1p(-probs)).sum()  # every query a negative, num_boxes clamped to 1
    torch.testing.assert_close(losses["loss_ce"], all_negative, rtol=1e-5, atol=1e-6)
    losses["loss"].backward()
    assert all(torch.isfinite(p.grad).all() for p in stage.parameters() if p.grad is not None)

    # one image with targets, one without: the empty image only adds negatives to the focal loss
    mixed = detection_loss(extras, [{"boxes": TARGETS}, {"boxes": torch.zeros(0, 4)}], "coco")
    alone = detection_loss({k: v[:1] for k, v in extras.items()}, [{"boxes": TARGETS}], "coco")
    torch.testing.assert_close(mixed["loss_bbox"], alone["loss_bbox"])
    torch.testing.assert_close(mixed["loss_giou"], alone["loss_giou"])
    assert mixed["loss_ce"] > alone["loss_ce"]


@pytest.fixture
def one_thread():
    """Run on one intra-op thread: far faster for these tiny tensors on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_a_few_adam_steps_move_the_top_proposals_onto_the_targets(one_thread):
    stage = tiny_proposer()
    features = random_features()
    optimizer = torch.optim.Adam(stage.parameters(), lr=1e-2)

    def best_iou_among_top_proposals() -> torch.Tensor:
        with torch.no_grad():
            proposals = stage(features)
        top = proposals.extras["logits_coco"][0, -1, :, 0].topk(len(TARGETS)).indices
        return box_iou(cxcywh_to_xyxy(TARGETS), proposals.boxes[0][top]).max(1).values

    before = best_iou_among_top_proposals()
    first = None
    for _ in range(100):
        losses = detection_loss(stage(features).extras, [{"boxes": TARGETS}], "coco")
        first = first if first is not None else losses["loss"].item()
        optimizer.zero_grad()
        losses["loss"].backward()
        optimizer.step()
    after = best_iou_among_top_proposals()
    assert (before < 0.1).all()
    assert (after > 0.5).all(), after
    assert losses["loss"].item() < first / 2


# ---------------------------------------------------------------------------------------------------------------
# options and errors
# ---------------------------------------------------------------------------------------------------------------
def test_weights_from_the_reference_config(golden):
    assert DetectionLossWeights.from_reference_config(golden.groma_config) == DetectionLossWeights()
    defaults = DetectionLossWeights.from_reference_config({"perceiver_cfg": {"ddetr_cfg": {}}})
    assert (defaults.class_cost, defaults.auxiliary) == (1, False)  # transformers 4.32's defaults


def test_switching_off_the_auxiliary_and_encoder_losses():
    losses = detection_loss(
        tiny_proposer()(random_features()).extras,
        [{"boxes": TARGETS}],
        "coco",
        DetectionLossWeights(auxiliary=False, encoder=False),
    )
    assert sorted(losses) == ["loss", "loss_bbox", "loss_ce", "loss_giou"]
    with pytest.raises(ValueError, match="at least one cost"):
        DetectionLossWeights(class_cost=0, bbox_cost=0, giou_cost=0)


def test_bad_calls_are_refused_with_clear_messages():
    extras, target = hand_extras(), [{"boxes": TARGET}]
    with pytest.raises(ValueError, match=r"mixes sources \['coco', 'sa1b'\]"):
        detection_loss({k: v.expand(2, *v.shape[1:]) for k, v in extras.items()}, target * 2, ["coco", "sa1b"])
    with pytest.raises(ValueError, match="unknown source 'lvis'"):
        detection_loss(extras, target, "lvis")
    with pytest.raises(ValueError, match="got 2 targets for a batch of 1"):
        detection_loss(extras, target * 2, "coco")
    with pytest.raises(ValueError, match=r"must have shape \(n, 4\), got \(4,\)"):
        detection_loss(extras, [{"boxes": TARGET[0]}], "coco")
    with pytest.raises(ValueError, match="w, h >= 0"):
        detection_loss(extras, [{"boxes": torch.tensor([[0.5, 0.5, -0.1, 0.2]])}], "coco")
    with pytest.raises(KeyError, match="encoder_logits"):
        detection_loss({k: v for k, v in extras.items() if k != "encoder_logits"}, target, "coco")
    with pytest.raises(ValueError, match=r"\(B, L, Q, 1\)"):
        detection_loss({**extras, "logits_coco": extras["logits_coco"][..., 0]}, target, "coco")
    nan_boxes = torch.full_like(extras["boxes_cxcywh"], float("nan"))
    with pytest.raises(FloatingPointError, match="decoder layer 0"):
        detection_loss({**extras, "boxes_cxcywh": nan_boxes}, target, "coco")


def test_num_boxes_is_local_unless_all_reduced(tmp_path):
    script = textwrap.dedent(
        """
        import sys, torch, torch.distributed as dist, torch.multiprocessing as mp
        from groma_plugin_deformable_detr.losses import DetectionLossWeights, detection_loss

        def run(rank, store, out_dir):
            dist.init_process_group("gloo", init_method=store, rank=rank, world_size=2)
            boxes = torch.tensor([[0.5, 0.5, 0.2, 0.2]]).repeat(1 + 2 * rank, 1)  # 1 box on rank 0, 3 on rank 1
            extras = {
                "logits_coco": torch.zeros(1, 1, 4, 1), "logits_sa1b": torch.zeros(1, 1, 4, 1),
                "boxes_cxcywh": torch.tensor([[0.4, 0.5, 0.2, 0.2]]).repeat(1, 1, 4, 1),
                "encoder_logits": torch.zeros(1, 4, 1), "encoder_boxes_cxcywh": torch.full((1, 4, 4), 0.5),
            }
            local = detection_loss(extras, [{"boxes": boxes}], "coco")
            weights = DetectionLossWeights(all_reduce_num_boxes=True)
            reduced = detection_loss(extras, [{"boxes": boxes}], "coco", weights)
            with open(f"{out_dir}/rank{rank}.txt", "w") as out:
                out.write(f"{local['loss_bbox'].item()} {reduced['loss_bbox'].item()}")
            dist.destroy_process_group()

        if __name__ == "__main__":
            mp.spawn(run, args=(sys.argv[1], sys.argv[2]), nprocs=2)
        """
    )
    (tmp_path / "run.py").write_text(script)
    result = subprocess.run(
        [sys.executable, str(tmp_path / "run.py"), f"file://{tmp_path / 'store'}", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr
    # every matched box is 0.1 off in cx: L1 sum = 0.1 per box; local / n_local boxes vs / mean(1, 3) = 2
    local, reduced = zip(*[map(float, (tmp_path / f"rank{r}.txt").read_text().split()) for r in range(2)])
    assert local == pytest.approx((0.1, 0.1)) and reduced == pytest.approx((0.05, 0.15))
