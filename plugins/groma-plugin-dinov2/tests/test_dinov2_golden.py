"""Parity with the reference implementation's DINOv2 tensors, for every golden fixture set."""

from __future__ import annotations

import pytest
import torch
from groma_plugin_dinov2 import LEVEL_NAMES, Dinov2Options
from groma_plugin_dinov2.encoder import interpolate_position_embeddings
from PIL import Image

from groma_core.reference import load_reference_weights

FEATURE_ATOL = 1e-4
PIXEL_ATOL = 1e-6


def max_diff(actual: torch.Tensor, expected: torch.Tensor, what: str) -> float:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    return (actual - expected).abs().max().item()


def test_options_from_the_reference_config_match_the_fixture_encoder(golden):
    encoder = golden.groma_config["perceiver_cfg"]["vis_encoder_cfg"]
    options = Dinov2Options.from_reference_config(golden.groma_config)
    for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "patch_size", "image_size"):
        assert getattr(options, name) == encoder[name], name


def test_every_reference_tensor_of_the_encoder_loads(golden, golden_stage):
    report = load_reference_weights(golden_stage, golden.weights(), where=str(golden.dir))
    expected = {k for k in golden.weights() if k.startswith("perceiver.vis_encoder.")}
    assert set(report.loaded) == expected
    assert report.dropped == []
    for key in expected:  # the values landed where the names say
        assert torch.equal(golden_stage.state_dict()[golden_stage.reference_key(key)], golden.weights()[key]), key


def test_pixel_values_from_the_fixture_images_match(golden, golden_stage):
    for image in golden.images():
        png = Image.open(golden.dir / golden.meta["images"][image]["png"])
        pixels = golden_stage.preprocess([png])
        expected = golden.tensors(f"image_{image}")["pixel_values"]
        assert pixels.dtype == torch.float32
        assert max_diff(pixels, expected, f"{golden.name}/{image} pixel_values") <= PIXEL_ATOL


def test_position_embeddings_are_interpolated_as_transformers_4_32(golden, golden_stage):
    table = golden_stage.dinov2.embeddings.position_embeddings
    grid = golden_stage.grid
    size = golden_stage.image_size[0]
    actual = interpolate_position_embeddings(table, grid * grid, size, size, size // grid)
    expected = golden.tensors("common")["vis_pos_embed_interp"]
    assert max_diff(actual, expected, "vis_pos_embed_interp") <= 1e-6


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_levels_and_merged_tokens_match_one_image_at_a_time_and_batched(golden, make_golden, attention):
    golden_stage = make_golden(attn_implementation=attention)
    images = golden.images()
    pixels = torch.cat([golden.tensors(f"image_{image}")["pixel_values"] for image in images])
    for group in [[i] for i in range(len(images))] + [list(range(len(images)))]:
        features = golden_stage(pixels[group])
        for b, index in enumerate(group):
            ref = golden.tensors(f"image_{images[index]}")
            hidden = ref["vis_hidden_states_last4"][:, 0, 1:]  # (4, g*g, C), CLS dropped
            g = golden_stage.grid
            where = f"{golden.name}/{images[index]} in batch {group}"
            for k, name in enumerate(LEVEL_NAMES):
                expected = hidden[k].reshape(g, g, -1).permute(2, 0, 1)[None]
                assert max_diff(features.levels[name][b : b + 1], expected, f"{where} {name}") <= FEATURE_ATOL
            tokens = features.tokens[b : b + 1]
            assert max_diff(tokens, ref["image_tokens_merged"], f"{where} tokens") <= FEATURE_ATOL


def test_the_installed_transformers_interpolation_drifts_from_the_reference(golden, make_golden):
    drifted = make_golden(position_interpolation="installed")
    ref = golden.tensors(f"image_{golden.images()[0]}")
    features = drifted(ref["pixel_values"])
    last = ref["vis_hidden_states_last4"][3, :, 1:]
    assert max_diff(features.levels["last"].flatten(2).transpose(1, 2), last, "last") > 1e-3
