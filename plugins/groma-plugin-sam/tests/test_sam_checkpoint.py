"""Official segment-anything checkpoints <-> transformers SamModel: key mapping, architecture, loading."""

from __future__ import annotations

import pytest
import torch
from groma_plugin_sam import (
    SamOptions,
    build_sam_model,
    config_from_segment_anything,
    from_segment_anything,
    key_pairs,
    load_segment_anything_checkpoint,
    to_segment_anything,
)
from groma_plugin_sam.checkpoint import config_from_options, config_sizes
from transformers import SamModel

from groma_core.errors import CheckpointError

#: segment-anything's build_sam sizes of the three official checkpoints
OFFICIAL = {
    "vit_b": {
        "hidden_size": 768,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "global_attn_indexes": [2, 5, 8, 11],
    },
    "vit_l": {
        "hidden_size": 1024,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "global_attn_indexes": [5, 11, 17, 23],
    },
    "vit_h": {
        "hidden_size": 1280,
        "num_hidden_layers": 32,
        "num_attention_heads": 16,
        "global_attn_indexes": [7, 15, 23, 31],
    },
}


def _meta_model(**sizes) -> SamModel:
    with torch.device("meta"):
        return SamModel(config_from_options(SamOptions(**sizes)))


def _forward(model: SamModel) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    pixels = torch.randn(1, 3, 64, 64, generator=g)
    points = torch.rand(1, 5, 1, 2, generator=g) * 64
    with torch.no_grad():
        out = model(pixel_values=pixels, input_points=points, multimask_output=True)
    return out.pred_masks, out.iou_scores


@pytest.mark.parametrize("variant", sorted(OFFICIAL))
def test_every_tensor_of_the_official_sizes_maps_both_ways(variant):
    model = _meta_model(**OFFICIAL[variant])
    own = model.state_dict()
    pairs = key_pairs(model.config)
    assert {hf for _, hf in pairs} == set(own)
    official = to_segment_anything(own, model.config)
    assert len(official) == len(own) - 1  # the tied copy of the positional Gaussian matrix is stored once
    back = from_segment_anything(official, model.config)
    assert set(back) == set(own) and all(back[k].shape == own[k].shape for k in own)


def test_official_names_and_shapes_of_vit_b():
    """Spot checks against segment-anything's module tree (build_sam_vit_b): names and shapes of sam_vit_b_01ec64."""
    model = _meta_model(**OFFICIAL["vit_b"])
    official = {k: tuple(v.shape) for k, v in to_segment_anything(model.state_dict(), model.config).items()}
    assert official["image_encoder.pos_embed"] == (1, 64, 64, 768)
    assert official["image_encoder.patch_embed.proj.weight"] == (768, 3, 16, 16)
    assert official["image_encoder.blocks.0.attn.rel_pos_h"] == (27, 64)  # 14 x 14 windows
    assert official["image_encoder.blocks.11.attn.rel_pos_w"] == (127, 64)  # global attention on the 64 x 64 grid
    assert official["image_encoder.neck.0.weight"] == (256, 768, 1, 1) and "image_encoder.neck.0.bias" not in official
    assert official["prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"] == (2, 128)
    assert official["prompt_encoder.point_embeddings.3.weight"] == (1, 256)
    assert official["prompt_encoder.mask_downscaling.6.weight"] == (256, 16, 1, 1)
    assert official["mask_decoder.transformer.layers.1.cross_attn_image_to_token.q_proj.weight"] == (128, 256)
    assert official["mask_decoder.transformer.norm_final_attn.weight"] == (256,)
    assert official["mask_decoder.output_upscaling.3.weight"] == (64, 32, 2, 2)
    assert official["mask_decoder.output_hypernetworks_mlps.3.layers.2.weight"] == (32, 256)
    assert official["mask_decoder.iou_prediction_head.layers.2.weight"] == (4, 256)
    assert official["mask_decoder.mask_tokens.weight"] == (4, 256)


@pytest.mark.parametrize("variant", sorted(OFFICIAL))
def test_architecture_is_read_from_an_official_state_dict(variant):
    model = _meta_model(**OFFICIAL[variant])
    official = to_segment_anything(model.state_dict(), model.config)
    sizes = config_sizes(config_from_segment_anything(official))
    assert sizes == {
        **config_sizes(config_from_options(SamOptions())),
        **OFFICIAL[variant],
        "mlp_dim": 4 * OFFICIAL[variant]["hidden_size"],
    }


def test_round_trip_through_segment_anything_names_keeps_the_outputs(tiny_sam, sam_checkpoint, tiny_options):
    loaded = load_segment_anything_checkpoint(sam_checkpoint, SamOptions(**tiny_options))
    assert config_sizes(loaded.config) == config_sizes(tiny_sam.config)
    assert loaded.config.mask_decoder_config.layer_norm_eps == 1e-5  # segment-anything's nn.LayerNorm default
    for key, value in tiny_sam.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert (
        loaded.shared_image_embedding.positional_embedding
        is loaded.prompt_encoder.shared_embedding.positional_embedding
    )
    for ours, theirs in zip(_forward(loaded), _forward(tiny_sam)):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_pretrained_directory_and_checkpoint_file_load_the_same_model(sam_checkpoint, sam_directory, tiny_options):
    from_file = build_sam_model(SamOptions(**tiny_options, pretrained=sam_checkpoint))
    from_dir = build_sam_model(SamOptions(**tiny_options, pretrained=sam_directory))
    assert from_dir.config.mask_decoder_config.layer_norm_eps == 1e-5
    for ours, theirs in zip(_forward(from_file), _forward(from_dir)):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    transformers_eps = build_sam_model(SamOptions(pretrained=sam_directory, segment_anything_layer_norm=False))
    assert transformers_eps.mask_decoder.transformer.layers[0].layer_norm1.eps == 1e-6


def test_constant_buffers_are_ignored_and_other_extra_or_missing_tensors_are_named(tiny_sam):
    official = to_segment_anything(tiny_sam.state_dict(), tiny_sam.config)
    official["pixel_mean"] = torch.zeros(3, 1, 1)
    from_segment_anything(official, tiny_sam.config)
    broken = dict(official)
    del broken["mask_decoder.iou_token.weight"]
    broken["mask_decoder.extra_head.weight"] = torch.zeros(1)
    with pytest.raises(
        CheckpointError,
        match=r"1 missing tensor\(s\): mask_decoder\.iou_token\.weight .*"
        r"1 unknown tensor\(s\): mask_decoder\.extra_head\.weight",
    ):
        from_segment_anything(broken, tiny_sam.config)


def test_unreadable_and_mismatched_checkpoints_are_clear_errors(tmp_path, sam_checkpoint, tiny_options):
    not_sam = tmp_path / "other.pth"
    torch.save({"backbone.weight": torch.zeros(2)}, not_sam)
    with pytest.raises(CheckpointError, match="no tensor 'image_encoder.patch_embed.proj.weight'"):
        build_sam_model(SamOptions(pretrained=str(not_sam)))
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read it as a torch checkpoint"):
        build_sam_model(SamOptions(pretrained=str(garbage)))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_sam_model(SamOptions(pretrained=str(tmp_path / "missing.pth")))
    with pytest.raises(ValueError, match="hidden_size=32 but the options ask for 768"):
        build_sam_model(
            SamOptions(**{**tiny_options, "hidden_size": 768, "num_attention_heads": 12}, pretrained=sam_checkpoint)
        )


def test_pretrained_under_an_unknown_users_home_is_a_clear_error():
    """``~someone/...`` for a user this machine does not know is a missing directory, not a RuntimeError from
    ``Path.expanduser``."""
    from groma_plugin_sam.checkpoint import load_pretrained_directory

    with pytest.raises(FileNotFoundError, match="~nosuchuser-groma/sam is not a directory with a config.json"):
        load_pretrained_directory("~nosuchuser-groma/sam", SamOptions())
