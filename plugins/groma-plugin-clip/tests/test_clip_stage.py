"""Behaviour of the clip image tokenizer: contract, levels, merge, position interpolation, weights, errors."""

from __future__ import annotations

import pytest
import torch
from groma_plugin_clip import LEVEL_NAMES, ClipImageTokenizer, ClipOptions, merge_2x2
from PIL import Image
from transformers import CLIPConfig, CLIPModel

from groma_core.errors import InputError
from groma_core.plugins import PluginManager
from groma_core.stages import BuildContext, ImageTokenizer
from groma_core.testing.contract import check_registered_stage


def test_the_plugin_is_found_through_its_entry_point(tiny_options):
    entry = PluginManager().get("image_tokenizer", "clip")
    assert entry.distribution == "groma-plugin-clip"
    assert entry.config is ClipOptions
    assert isinstance(entry.build(ClipOptions(**tiny_options), BuildContext()), ImageTokenizer)


@pytest.mark.parametrize("input_size", [56, 84], ids=["pretraining-size", "interpolated"])
def test_the_contract_kit_passes(tiny_options, input_size):
    stage = check_registered_stage("image_tokenizer", "clip", {**tiny_options, "input_size": input_size})
    grid = input_size // 14
    assert stage.level_sizes["last"] == (grid, grid) and stage.num_tokens == grid * grid // 4


def test_merge_concatenates_each_2x2_neighbourhood_row_offset_first():
    rows, cols = torch.meshgrid(torch.arange(4.0), torch.arange(6.0), indexing="ij")
    patches = torch.stack([rows, cols], dim=-1)[None]  # p(r, c) = [r, c]
    tokens = merge_2x2(patches)
    assert tokens.shape == (1, 2 * 3, 8)
    for i in range(2):
        for j in range(3):
            expected = [2 * i, 2 * j, 2 * i + 1, 2 * j, 2 * i, 2 * j + 1, 2 * i + 1, 2 * j + 1]
            assert tokens[0, i * 3 + j].tolist() == expected
    with pytest.raises(ValueError, match="even patch grid, got 3x6"):
        merge_2x2(torch.zeros(1, 3, 6, 2))


def test_levels_are_the_last_four_layers_without_the_final_layernorm(make_tiny, tiny_options):
    stage = make_tiny(**tiny_options)
    pixels = torch.randn(2, 3, 56, 56)
    features = stage(pixels)
    with torch.no_grad():
        out = stage.clip(pixel_values=pixels, output_hidden_states=True)
    assert list(features.levels) == list(LEVEL_NAMES)
    for k, name in enumerate(LEVEL_NAMES):
        expected = out.hidden_states[k - 4][:, 1:].transpose(1, 2).reshape(2, 32, 4, 4)
        torch.testing.assert_close(features.levels[name], expected, rtol=0, atol=0)
    normed = stage.clip.post_layernorm(out.last_hidden_state[:, 1:])
    assert not torch.allclose(features.levels["last"].flatten(2).transpose(1, 2), normed)


def test_tokens_are_the_merged_last_level(make_tiny, tiny_options):
    stage = make_tiny(**tiny_options)
    features = stage(torch.randn(1, 3, 56, 56))
    assert features.tokens.shape == (1, 4, 128) == (1, stage.num_tokens, stage.token_dim)
    p = features.levels["last"][0]  # (C, 4, 4): p[:, row, col]
    for i, j in [(0, 0), (0, 1), (1, 1)]:
        quad = [p[:, 2 * i, 2 * j], p[:, 2 * i + 1, 2 * j], p[:, 2 * i, 2 * j + 1], p[:, 2 * i + 1, 2 * j + 1]]
        torch.testing.assert_close(features.tokens[0, i * 2 + j], torch.cat(quad), rtol=0, atol=0)


def test_unmerged_tokens_and_an_earlier_token_layer(make_tiny, tiny_options):
    stage = make_tiny(**tiny_options, merge_tokens=False, token_layer=-2)
    features = stage(torch.randn(1, 3, 56, 56))
    assert (stage.num_tokens, stage.token_dim) == (16, 32)
    torch.testing.assert_close(features.tokens, features.levels["last-1"].flatten(2).transpose(1, 2), rtol=0, atol=0)


def test_another_input_size_interpolates_the_position_table(make_tiny, tiny_options):
    native = make_tiny(**tiny_options)
    larger = make_tiny(**{**tiny_options, "input_size": 84})
    assert not native.interpolate_positions and larger.interpolate_positions
    pixels = torch.randn(1, 3, 84, 84)
    features = larger(pixels)
    assert features.levels["last"].shape == (1, 32, 6, 6) and features.tokens.shape == (1, 9, 128)
    with torch.no_grad():
        expected = larger.clip(pixel_values=pixels, output_hidden_states=True, interpolate_pos_encoding=True)
        table = larger.clip.embeddings.interpolate_pos_encoding(torch.zeros(1, 37, 32), 84, 84)
    torch.testing.assert_close(features.levels["last"].flatten(2).transpose(1, 2), expected.last_hidden_state[:, 1:])
    assert table.shape == (1, 37, 32)  # the 4x4 table resized to 6x6, CLS row kept
    torch.testing.assert_close(table[0, 0], larger.clip.embeddings.position_embedding.weight[0], rtol=0, atol=0)


def test_a_batch_gives_the_same_features_as_single_images(make_tiny, tiny_options):
    stage = make_tiny(**tiny_options)
    pixels = torch.randn(3, 3, 56, 56)
    batched = stage(pixels)
    for b in range(3):
        torch.testing.assert_close(batched.tokens[b : b + 1], stage(pixels[b : b + 1]).tokens, rtol=1e-5, atol=1e-5)


def test_frozen_tower_has_no_gradients_unless_unfrozen(make_tiny, tiny_options):
    pixels = torch.randn(1, 3, 56, 56, requires_grad=True)
    frozen = make_tiny(**tiny_options)
    assert not any(p.requires_grad for p in frozen.parameters())
    assert not frozen(pixels).tokens.requires_grad
    trainable = make_tiny(**tiny_options, frozen=False)
    trainable(pixels).tokens.sum().backward()
    assert trainable.clip.encoder.layers[0].mlp.fc1.weight.grad is not None


@pytest.mark.parametrize("shape", [(1, 1, 56, 56), (1, 3, 84, 84), (3, 56, 56)], ids=["gray", "size", "3d"])
def test_wrong_pixel_shapes_are_rejected_naming_both_shapes(make_tiny, tiny_options, shape):
    stage = make_tiny(**tiny_options)
    got = ", ".join(map(str, shape))
    with pytest.raises(InputError, match=rf"\(B, 3, 56, 56\), got \({got}\)"):
        stage(torch.zeros(shape))


def test_preprocess_then_forward_on_images_of_any_size_and_mode(make_tiny, tiny_options):
    stage = make_tiny(**tiny_options)
    images = [Image.new("RGB", (300, 100), (200, 10, 10)), Image.new("L", (50, 90), 128), Image.new("RGBA", (7, 7))]
    pixels = stage.preprocess(images)
    assert pixels.shape == (3, 3, 56, 56) and pixels.dtype == torch.float32
    assert stage(pixels).tokens.shape == (3, 4, 128)
    with pytest.raises(InputError, match="at least one image"):
        stage.preprocess([])


def test_impossible_geometries_and_options_are_rejected(tiny_options):
    with pytest.raises(ValueError, match="input_size 60 is not a multiple of the encoder's patch_size 14"):
        ClipImageTokenizer(ClipOptions(**{**tiny_options, "input_size": 60}))
    with pytest.raises(ValueError, match="even patch grid; input_size 42 gives 3x3"):
        ClipImageTokenizer(ClipOptions(**{**tiny_options, "input_size": 42}))
    with pytest.raises(ValueError, match="token_layer -5 does not exist"):
        ClipOptions(num_hidden_layers=4, token_layer=-5)
    with pytest.raises(ValueError, match="hidden_size 30 is not divisible by num_attention_heads 4"):
        ClipOptions(hidden_size=30, num_attention_heads=4)
    with pytest.raises(ValueError, match="exclusive"):
        ClipOptions(pretrained="a", open_clip_checkpoint="b")
    with pytest.raises(ValueError, match="Extra inputs are not permitted"):
        ClipOptions(hidden_sise=32)


def test_a_saved_tower_loads_back_from_its_directory(make_tiny, tiny_options, tmp_path):
    built = make_tiny(**tiny_options)
    built.clip.save_pretrained(tmp_path)
    loaded = make_tiny(pretrained=str(tmp_path), input_size=56)
    assert loaded.level_channels == built.level_channels and loaded.token_dim == built.token_dim
    pixels = torch.randn(1, 3, 56, 56)
    a, b = built(pixels), loaded(pixels)
    torch.testing.assert_close(b.tokens, a.tokens, rtol=0, atol=0)
    for name in LEVEL_NAMES:
        torch.testing.assert_close(b.levels[name], a.levels[name], rtol=0, atol=0)


def test_the_vision_tower_of_a_whole_clip_model_directory_is_taken(make_tiny, tiny_options, tmp_path):
    vision = {k: v for k, v in tiny_options.items() if k != "input_size"}
    text = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
    torch.manual_seed(1)
    clip = CLIPModel(CLIPConfig(vision_config=vision, text_config=text)).eval()
    clip.save_pretrained(tmp_path)
    stage = make_tiny(pretrained=str(tmp_path), input_size=56)
    pixels = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        expected = clip.vision_model(pixel_values=pixels).last_hidden_state[:, 1:]
    torch.testing.assert_close(stage(pixels).levels["last"].flatten(2).transpose(1, 2), expected, rtol=0, atol=0)


def test_a_pretrained_directory_must_agree_with_explicit_sizes(make_tiny, tiny_options, tmp_path):
    make_tiny(**tiny_options).clip.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="has hidden_size=32 but the options ask for 64"):
        make_tiny(pretrained=str(tmp_path), hidden_size=64, input_size=56)
    with pytest.raises(ValueError, match="has hidden_act='quick_gelu' but the options ask for 'gelu'"):
        make_tiny(pretrained=str(tmp_path), hidden_act="gelu", input_size=56)
    with pytest.raises(FileNotFoundError, match="not a directory with a config.json"):
        make_tiny(pretrained=str(tmp_path / "missing"))


def test_full_size_defaults_are_clip_vit_l_14_at_336_px_on_the_meta_device():
    with torch.device("meta"):
        stage = PluginManager().build("image_tokenizer", "clip", ClipOptions(), BuildContext())
    assert stage.image_size == (336, 336) and not stage.interpolate_positions
    assert (stage.num_tokens, stage.token_dim) == (144, 4096)
    assert stage.level_channels == dict.fromkeys(LEVEL_NAMES, 1024)
    assert stage.level_sizes == dict.fromkeys(LEVEL_NAMES, (24, 24))
    assert sum(p.numel() for p in stage.parameters()) == 303_507_456  # CLIP ViT-L/14-336's vision tower
    assert stage.clip.config.hidden_act == "quick_gelu" and stage.clip.config.layer_norm_eps == 1e-5
