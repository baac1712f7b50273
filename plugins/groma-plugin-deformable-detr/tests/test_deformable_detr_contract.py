"""The proposer as a user meets it: discovery, the output contract, batching, errors, freezing, the attention op."""

from __future__ import annotations

import pytest
import torch
from groma_plugin_deformable_detr import DeformableDetrOptions, multi_scale_deformable_attention

from groma_core.boxes import cxcywh_to_xyxy
from groma_core.plugins import PluginManager
from groma_core.stages import BuildContext, RegionProposer
from groma_core.types import ImageFeatures

LEVELS = ["last-3", "last-2", "last-1", "last"]
SMALL = dict(
    d_model=32,
    encoder_layers=1,
    decoder_layers=2,
    encoder_attention_heads=4,
    decoder_attention_heads=4,
    encoder_ffn_dim=64,
    decoder_ffn_dim=64,
    num_queries=20,
    box_head_hidden=16,
)


def small_features(batch: int = 2, channels: int = 24, side: int = 8) -> ImageFeatures:
    generator = torch.Generator().manual_seed(0)
    levels = {name: torch.randn(batch, channels, side, side, generator=generator) for name in LEVELS}
    return ImageFeatures(tokens=torch.zeros(batch, 4, channels), levels=levels)


def build(options: dict, channels: int = 24) -> RegionProposer:
    manager = PluginManager()
    entry = manager.get("region_proposer", "deformable-detr")
    context = BuildContext(level_channels=dict.fromkeys(LEVELS, channels))
    return manager.build("region_proposer", "deformable-detr", entry.config(**options), context)


def test_the_plugin_is_discovered_through_its_entry_point():
    manager = PluginManager()
    entry = manager.get("region_proposer", "deformable-detr")
    assert entry.distribution == "groma-plugin-deformable-detr"
    assert entry.config is DeformableDetrOptions
    record = next(r for r in manager.records if r.distribution == "groma-plugin-deformable-detr")
    assert record.status == "ok" and ("region_proposer", "deformable-detr") in record.stages


def test_output_contract_on_the_golden_weights(golden, golden_stage, make_features, make_proposer):
    images = golden.images()
    proposals = golden_stage(make_features(images))
    queries = golden_stage.options.num_queries
    assert len(proposals.boxes) == len(images)
    for boxes, scores in zip(proposals.boxes, proposals.scores, strict=True):
        assert boxes.shape == (queries, 4) and boxes.dtype == torch.float32
        assert torch.isfinite(boxes).all()
        assert (boxes[:, 2] >= boxes[:, 0]).all() and (boxes[:, 3] >= boxes[:, 1]).all()
        centres = (boxes[:, :2] + boxes[:, 2:]) / 2
        assert ((centres >= 0) & (centres <= 1)).all()
        assert ((scores >= 0) & (scores <= 1)).all()
    layers = golden_stage.options.decoder_layers
    extras = proposals.extras
    assert extras["logits_coco"].shape == extras["logits_sa1b"].shape == (len(images), layers, queries, 1)
    assert extras["boxes_cxcywh"].shape == (len(images), layers, queries, 4)
    assert torch.equal(cxcywh_to_xyxy(extras["boxes_cxcywh"][:, -1]), torch.stack(proposals.boxes))
    assert extras["encoder_logits"].shape[-1] == 1 and extras["encoder_boxes_cxcywh"].shape[-1] == 4

    clipped = make_proposer(clip_boxes=True)(make_features(images))
    for boxes, unclipped in zip(clipped.boxes, proposals.boxes, strict=True):
        assert ((boxes >= 0) & (boxes <= 1)).all()
        assert torch.equal(boxes, unclipped.clamp(0, 1))


def test_a_batch_of_two_equals_two_single_runs(golden, golden_stage, make_features):
    images = golden.images()[:2]
    if len(images) < 2:
        pytest.skip("the golden set has a single image")
    batched = golden_stage(make_features(images))
    for b, image in enumerate(images):
        single = golden_stage(make_features([image]))
        assert torch.allclose(batched.boxes[b], single.boxes[0], atol=1e-5, rtol=0)
        assert torch.allclose(batched.scores[b], single.scores[0], atol=1e-5, rtol=0)


def test_an_unknown_level_name_is_reported_with_the_available_levels():
    with pytest.raises(ValueError, match=r"\['lats'\].*available levels: \['last', 'last-1'"):
        build({**SMALL, "in_levels": ["last-1", "lats"]})
    stage = build({**SMALL, "in_levels": ["last"]})
    features = small_features()
    features.levels = {"final": features.levels["last"]}
    with pytest.raises(KeyError, match=r"no level 'last'; available: \['final'\]"):
        stage(features)


def test_a_level_of_the_wrong_width_is_reported_with_both_shapes():
    stage = build(SMALL)
    features = small_features(channels=16)
    with pytest.raises(ValueError, match=r"level 'last-3' must have shape \(B, 24, h, w\), got \(2, 16, 8, 8\)"):
        stage(features)


def test_frozen_by_default_and_trainable_when_asked():
    frozen = build(SMALL)
    assert not any(p.requires_grad for p in frozen.parameters())
    out = frozen(small_features())
    assert not out.extras["logits_coco"].requires_grad

    trainable = build({**SMALL, "frozen": False}).train()
    out = trainable(small_features())
    loss = out.extras["logits_coco"].sum() + out.extras["boxes_cxcywh"].sum() + out.extras["encoder_logits"].sum()
    loss.backward()
    grads = {name: p.grad for name, p in trainable.named_parameters()}
    assert grads["input_proj.conv.weight"] is not None and grads["input_proj.conv.weight"].abs().sum() > 0
    assert grads["transformer.class_embed_enc.weight"].abs().sum() > 0
    # the box of layer 1 stacks its offsets on layer 0's reference: layer 0's box head gets gradient from it
    assert grads["transformer.bbox_embed.0.layers.0.weight"] is not None


def test_dropout_is_active_in_training_mode_only():
    stage = build({**SMALL, "frozen": False})
    features = small_features()
    stage.eval()
    first, second = stage(features).extras["logits_coco"], stage(features).extras["logits_coco"]
    assert torch.equal(first, second)
    stage.train()
    torch.manual_seed(0)
    assert not torch.equal(stage(features).extras["logits_coco"], first)


def test_deformable_attention_at_pixel_centres_reads_those_pixels():
    generator = torch.Generator().manual_seed(1)
    batch, heads, head_dim, shapes = 2, 3, 5, [(4, 6), (2, 3)]
    value = torch.randn(batch, sum(h * w for h, w in shapes), heads, head_dim, generator=generator)
    # query 0 samples pixel (row 1, col 4) of level 0 and pixel (row 1, col 0) of level 1; query 1 samples outside
    centre = [((4 + 0.5) / 6, (1 + 0.5) / 4), ((0 + 0.5) / 3, (1 + 0.5) / 2)]
    locations = torch.zeros(batch, 2, heads, 2, 1, 2)
    for level, (x, y) in enumerate(centre):
        locations[:, 0, :, level, 0] = torch.tensor([x, y])
    locations[:, 1] = torch.tensor([1.5, -0.7])
    weights = torch.rand(batch, 2, heads, 2, 1, generator=generator)
    out = multi_scale_deformable_attention(value, shapes, locations, weights)
    assert out.shape == (batch, 2, heads * head_dim)
    pixel0 = value[:, 1 * 6 + 4]
    pixel1 = value[:, 24 + 1 * 3 + 0]
    expected = weights[:, 0, :, 0] * pixel0 + weights[:, 0, :, 1] * pixel1  # (B, heads, head_dim)
    torch.testing.assert_close(out[:, 0], expected.reshape(batch, -1))
    assert torch.equal(out[:, 1], torch.zeros(batch, heads * head_dim))


def test_runs_in_bfloat16_and_keeps_float32_boxes_at_the_boundary():
    stage = build(SMALL).eval().to(torch.bfloat16)
    features = small_features()
    features.levels = {name: level.bfloat16() for name, level in features.levels.items()}
    proposals = stage(features)
    assert proposals.boxes[0].dtype == proposals.scores[0].dtype == torch.float32
    assert torch.isfinite(proposals.boxes[0]).all() and ((proposals.scores[0] >= 0) & (proposals.scores[0] <= 1)).all()
