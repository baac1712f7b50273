"""Behaviour of the dinov2 image tokenizer: shapes, merge order, weights, pretrained directories, errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from groma_plugin_dinov2 import LEVEL_NAMES, Dinov2ImageTokenizer, Dinov2Options, merge_neighbours
from groma_plugin_dinov2.encoder import ATTENTION_RENAMES, ReferencePositionEmbeddings
from PIL import Image

from groma_core.errors import InputError
from groma_core.plugins import PluginManager
from groma_core.reference import map_reference_keys
from groma_core.stages import BuildContext, ImageTokenizer
from groma_core.testing.fixtures import golden_root


def test_the_plugin_is_found_through_its_entry_point():
    entry = PluginManager().get("image_tokenizer", "dinov2")
    assert entry.distribution == "groma-plugin-dinov2"
    assert entry.config is Dinov2Options
    stage = entry.build(Dinov2Options(hidden_size=32, num_hidden_layers=4, num_attention_heads=4), BuildContext())
    assert isinstance(stage, ImageTokenizer)


def test_merge_concatenates_each_2x2_neighbourhood_row_offset_first():
    rows, cols = torch.meshgrid(torch.arange(4.0), torch.arange(6.0), indexing="ij")
    patches = torch.stack([rows, cols], dim=-1)[None]  # p(r, c) = [r, c]
    tokens = merge_neighbours(patches)
    assert tokens.shape == (1, 2 * 3, 8)
    for i in range(2):
        for j in range(3):
            expected = [2 * i, 2 * j, 2 * i + 1, 2 * j, 2 * i, 2 * j + 1, 2 * i + 1, 2 * j + 1]
            assert tokens[0, i * 3 + j].tolist() == expected


def test_announced_shapes_match_the_forward(make_tiny, tiny_options):
    stage = make_tiny(**tiny_options)
    features = stage(torch.randn(2, 3, 112, 112))
    assert stage.image_size == (112, 112)
    assert (stage.num_tokens, stage.token_dim) == (16, 128)
    assert features.tokens.shape == (2, stage.num_tokens, stage.token_dim)
    assert list(features.levels) == list(LEVEL_NAMES)
    for name in LEVEL_NAMES:
        assert stage.level_channels[name] == 32 and stage.level_sizes[name] == (8, 8)
        assert features.levels[name].shape == (2, 32, 8, 8)


def test_levels_are_the_last_four_layers_before_the_final_layernorm(make_tiny, tiny_options):
    stage = make_tiny(**tiny_options)
    pixels = torch.randn(1, 3, 112, 112)
    features = stage(pixels)
    with torch.no_grad():
        out = stage.dinov2(pixel_values=pixels, output_hidden_states=True)
    for k, name in enumerate(LEVEL_NAMES):
        expected = out.hidden_states[k - 4][:, 1:].transpose(1, 2).reshape(1, 32, 8, 8)
        torch.testing.assert_close(features.levels[name], expected, rtol=0, atol=0)
    assert not torch.allclose(features.levels["last"].flatten(2).transpose(1, 2), out.last_hidden_state[:, 1:])


def test_tokens_are_the_merged_last_level(make_tiny, tiny_options):
    stage = make_tiny(**tiny_options)
    features = stage(torch.randn(1, 3, 112, 112))
    p = features.levels["last"][0]  # (C, 8, 8): p[:, row, col]
    for i, j in [(0, 0), (1, 2), (3, 3)]:
        quad = [p[:, 2 * i, 2 * j], p[:, 2 * i + 1, 2 * j], p[:, 2 * i, 2 * j + 1], p[:, 2 * i + 1, 2 * j + 1]]
        torch.testing.assert_close(features.tokens[0, i * 4 + j], torch.cat(quad), rtol=0, atol=0)


def test_unmerged_tokens_and_an_earlier_token_layer(make_tiny, tiny_options):
    stage = make_tiny(**tiny_options, merge_tokens=False, token_layer=-2)
    features = stage(torch.randn(1, 3, 112, 112))
    assert (stage.num_tokens, stage.token_dim) == (64, 32)
    assert features.tokens.shape == (1, 64, 32)
    torch.testing.assert_close(features.tokens, features.levels["last-1"].flatten(2).transpose(1, 2), rtol=0, atol=0)


def test_a_batch_gives_the_same_features_as_single_images(make_tiny, tiny_options):
    stage = make_tiny(**tiny_options)
    pixels = torch.randn(2, 3, 112, 112)
    batched = stage(pixels)
    for b in range(2):
        single = stage(pixels[b : b + 1])
        torch.testing.assert_close(batched.tokens[b : b + 1], single.tokens, rtol=1e-5, atol=1e-5)


def test_frozen_encoder_has_no_gradients_unless_unfrozen(make_tiny, tiny_options):
    pixels = torch.randn(1, 3, 112, 112, requires_grad=True)
    frozen = make_tiny(**tiny_options)
    assert not any(p.requires_grad for p in frozen.parameters())
    assert not frozen(pixels).tokens.requires_grad
    trainable = make_tiny(**tiny_options, frozen=False)
    trainable(pixels).tokens.sum().backward()
    assert trainable.dinov2.encoder.layer[0].mlp.fc1.weight.grad is not None


def test_pixel_level_is_off_by_default_and_sees_detail_finer_than_a_patch(make_tiny, tiny_options):
    plain = make_tiny(**tiny_options)
    assert plain.pixel_stem is None and "pixels" not in plain.level_channels and "pixels" not in plain(
        torch.randn(1, 3, 112, 112)
    ).levels
    stage = make_tiny(**tiny_options, frozen=False, pixel_level_stride=4)
    assert stage.level_channels["pixels"] == 32 and stage.level_sizes["pixels"] == (28, 28)
    pixels = torch.randn(1, 3, 112, 112)
    features = stage(pixels)
    assert features.levels["pixels"].shape == (1, 32, 28, 28)
    # the encoder's own levels and tokens are those of the same weights without the stem
    plain.dinov2.load_state_dict(stage.dinov2.state_dict())
    torch.testing.assert_close(features.tokens, plain(pixels).tokens, rtol=0, atol=0)
    # one changed pixel changes exactly the stem cell that holds it (row 50, col 9 -> cell 12, 2)
    moved = pixels.clone()
    moved[0, :, 50, 9] += 1.0
    diff = (stage(moved).levels["pixels"] - features.levels["pixels"]).abs().amax(dim=1)[0]
    assert diff[12, 2] > 0 and diff.count_nonzero() == 1
    features.levels["pixels"].sum().backward()
    assert stage.pixel_stem[0].weight.grad is not None
    frozen = make_tiny(**tiny_options, pixel_level_stride=4)
    assert not any(p.requires_grad for p in frozen.parameters())


def test_pixel_level_stride_must_divide_the_input():
    with pytest.raises(ValueError, match="pixel_level_stride 5 does not divide input_size 112"):
        Dinov2Options(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, input_size=112, pixel_level_stride=5)


@pytest.mark.parametrize(
    "shape", [(1, 1, 112, 112), (1, 3, 224, 224), (3, 112, 112), (1, 112, 112, 3)], ids=["gray", "size", "3d", "hwc"]
)
def test_wrong_pixel_shapes_are_rejected_naming_both_shapes(make_tiny, tiny_options, shape):
    stage = make_tiny(**tiny_options)
    with pytest.raises(ValueError, match=r"\(B, 3, 112, 112\), got " + re_shape(shape)):
        stage(torch.zeros(shape))


def re_shape(shape: tuple[int, ...]) -> str:
    return r"\(" + ", ".join(map(str, shape)) + r"\)"


def test_preprocess_rejects_an_empty_batch_and_non_images(make_tiny, tiny_options):
    stage = make_tiny(**tiny_options)
    with pytest.raises(InputError, match="at least one image"):
        stage.preprocess([])
    with pytest.raises(InputError, match=r"images\[1\] must be a PIL"):
        stage.preprocess([Image.new("RGB", (20, 20)), torch.zeros(3, 20, 20)])


def test_preprocess_then_forward_on_images_of_any_size_and_mode(make_tiny, tiny_options):
    stage = make_tiny(**tiny_options)
    images = [Image.new("RGB", (300, 100), (200, 10, 10)), Image.new("L", (50, 90), 128), Image.new("RGBA", (7, 7))]
    pixels = stage.preprocess(images)
    assert pixels.shape == (3, 3, 112, 112) and pixels.dtype == torch.float32
    assert stage(pixels).tokens.shape == (3, 16, 128)


def test_impossible_geometries_are_rejected():
    with pytest.raises(ValueError, match="input_size 100 is not a multiple of the encoder's patch_size 14"):
        Dinov2ImageTokenizer(Dinov2Options(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, input_size=100))
    with pytest.raises(ValueError, match="even patch grid"):
        Dinov2ImageTokenizer(Dinov2Options(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, input_size=98))
    with pytest.raises(ValueError, match="token_layer -5 does not exist"):
        Dinov2Options(num_hidden_layers=4, token_layer=-5)
    with pytest.raises(ValueError, match="hidden_size 30 is not divisible by num_attention_heads 4"):
        Dinov2Options(hidden_size=30, num_attention_heads=4)


def test_a_saved_encoder_loads_back_from_its_directory(make_tiny, tiny_options, tmp_path):
    built = make_tiny(**tiny_options)
    built.dinov2.save_pretrained(tmp_path)
    loaded = make_tiny(pretrained=str(tmp_path), input_size=112)
    assert isinstance(loaded.dinov2.embeddings, ReferencePositionEmbeddings)
    assert loaded.level_channels == built.level_channels and loaded.token_dim == built.token_dim
    pixels = torch.randn(1, 3, 112, 112)
    a, b = built(pixels), loaded(pixels)
    torch.testing.assert_close(b.tokens, a.tokens, rtol=0, atol=0)
    for name in LEVEL_NAMES:
        torch.testing.assert_close(b.levels[name], a.levels[name], rtol=0, atol=0)


def test_a_pretrained_directory_must_agree_with_explicit_sizes(make_tiny, tiny_options, tmp_path):
    make_tiny(**tiny_options).dinov2.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="has hidden_size=32 but the options ask for 64"):
        make_tiny(pretrained=str(tmp_path), hidden_size=64)
    with pytest.raises(FileNotFoundError, match="not a directory with a config.json"):
        make_tiny(pretrained=str(tmp_path / "missing"))


def test_reference_names_map_onto_the_installed_transformers_names(make_tiny, tiny_options):
    stage = make_tiny(**tiny_options)
    own = set(stage.state_dict())
    for old, new in ATTENTION_RENAMES:
        for style in (old, new):  # transformers 4.x (reference) and 5.x names
            key = stage.reference_key(f"perceiver.vis_encoder.encoder.layer.3{style}weight")
            assert key in own, key
    assert stage.reference_key("perceiver.vis_encoder.layernorm.bias") == "dinov2.layernorm.bias"
    assert stage.reference_key("perceiver.vis_encoder.embeddings.mask_token") == "dinov2.embeddings.mask_token"


def released_groma_config() -> dict:
    """The released config's ``perceiver_cfg``, as far as this stage reads it."""
    encoder = {"model_type": "dinov2", "hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16}
    return {"perceiver_cfg": {"vis_encoder_cfg": {**encoder, "image_size": 518, "patch_size": 14}}}


def test_the_released_reference_config_gives_the_default_options():
    options = Dinov2Options.from_reference_config(released_groma_config())
    assert options == Dinov2Options()


def test_reference_config_omissions_take_transformers_defaults_and_indices_count_from_the_embeddings():
    config = {"perceiver_cfg": {"vis_output_layer": 23, "vis_encoder_cfg": {"num_hidden_layers": 24}}}
    options = Dinov2Options.from_reference_config(config)
    assert (options.hidden_size, options.num_attention_heads, options.image_size) == (768, 12, 224)
    assert options.token_layer == -2  # hidden_states[23] of 25 = the second-to-last layer


def test_reference_configs_this_stage_cannot_reproduce_are_refused():
    config = released_groma_config()
    config["perceiver_cfg"]["vis_encoder_cfg"]["hidden_act"] = "relu"
    with pytest.raises(ValueError, match="hidden_act is 'relu'; only 'gelu'"):
        Dinov2Options.from_reference_config(config)


def test_full_size_model_on_the_meta_device_has_the_released_checkpoint_shapes():
    tsv = golden_root().parent / "groma-7b-keys.tsv"
    if not tsv.is_file():
        pytest.skip(f"{tsv} not found")
    shapes = read_key_shapes(tsv, "perceiver.vis_encoder.")
    with torch.device("meta"):
        options = Dinov2Options.from_reference_config(released_groma_config())
        stage = PluginManager().build("image_tokenizer", "dinov2", options, BuildContext())
    own = {k: tuple(v.shape) for k, v in stage.state_dict().items()}
    mapping, dropped = map_reference_keys(stage, list(shapes))
    assert dropped == [] and len(mapping) == len(shapes) == 439
    assert sorted(mapping.values()) == sorted(own), "every parameter comes from exactly one checkpoint tensor"
    for ref_key, own_key in mapping.items():
        assert own[own_key] == shapes[ref_key], ref_key
    assert stage.token_dim == 4096 and stage.num_tokens == 256 and stage.level_sizes["last"] == (32, 32)


def read_key_shapes(tsv: Path, prefix: str) -> dict[str, tuple[int, ...]]:
    """key -> shape of the rows of the checkpoint key list whose key starts with ``prefix`` (aliases skipped)."""
    lines = tsv.read_text().splitlines()
    header = lines[0].split("\t")
    key_col, shape_col, alias_col = header.index("key"), header.index("shape"), header.index("alias_of")
    shapes = {}
    for line in lines[1:]:
        cells = line.split("\t")
        if cells[key_col].startswith(prefix) and (len(cells) <= alias_col or not cells[alias_col]):
            shapes[cells[key_col]] = tuple(int(n) for n in cells[shape_col].split("x"))
    return shapes
