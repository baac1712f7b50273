"""Reference checkpoint keys: loading the golden weights, full-size shapes on the meta device, config reading."""

from __future__ import annotations

import pytest
import torch
from groma_plugin_deformable_detr import DeformableDetrOptions, build_proposer

from groma_core.errors import CheckpointError
from groma_core.reference import load_reference_weights, map_reference_keys, persistent_state_keys
from groma_core.stages import BuildContext
from groma_core.testing.fixtures import golden_root

LEVELS = ["last-3", "last-2", "last-1", "last"]
KEYS_TSV = golden_root().parent / "groma-7b-keys.tsv"
#: the released config's ``perceiver_cfg.ddetr_cfg``: a diff against transformers' DeformableDetrConfig defaults
RELEASED_DDETR_CFG = {
    "auxiliary_loss": True,
    "class_cost": 2,
    "cls_loss_coefficient": 2,
    "id2label": {"0": "LABEL_0"},
    "num_feature_levels": 1,
    "two_stage": True,
    "with_box_refine": True,
}


def test_golden_weights_load_and_cover_every_parameter(golden, golden_stage):
    weights = golden.weights()
    mapping, dropped = map_reference_keys(golden_stage, list(weights))
    assert dropped == []
    assert len(set(mapping.values())) == len(mapping), "two reference keys map onto one parameter"
    assert set(mapping.values()) == set(persistent_state_keys(golden_stage))
    state = golden_stage.state_dict()
    for ref_key, own in mapping.items():
        assert torch.equal(state[own], weights[ref_key]), ref_key


def test_a_checkpoint_with_a_misshapen_tensor_is_refused(golden, golden_stage):
    weights = dict(golden.weights())
    key = "perceiver.ddetr_transformer.decoder.bbox_embed.0.layers.0.weight"
    weights[key] = torch.zeros(3, 3)
    with pytest.raises(CheckpointError, match="bbox_embed.0.layers.0.weight"):
        load_reference_weights(golden_stage, weights)


@pytest.mark.skipif(not KEYS_TSV.is_file(), reason="groma-7b-keys.tsv not found")
def test_full_size_on_meta_has_exactly_the_released_shapes():
    rows = [line.split("\t") for line in KEYS_TSV.read_text().splitlines()[1:]]
    released = {
        key: tuple(int(n) for n in shape.split("x"))
        for key, shape, _dtype, _numel, alias in (row + [""] * (5 - len(row)) for row in rows)
        if key.startswith(("perceiver.input_proj.", "perceiver.ddetr_transformer.")) and not alias.strip()
    }
    options = DeformableDetrOptions.from_reference_config({"perceiver_cfg": {"ddetr_cfg": RELEASED_DDETR_CFG}})
    assert options == DeformableDetrOptions()
    with torch.device("meta"):
        stage = build_proposer(options, BuildContext(level_channels=dict.fromkeys(LEVELS, 1024)))
    own = persistent_state_keys(stage)
    mapping, dropped = map_reference_keys(stage, list(released))
    assert dropped == []
    assert sorted(mapping.values()) == sorted(own)
    assert {ref: tuple(own[mapping[ref]]) for ref in released} == released
    assert sum(p.numel() for p in stage.parameters()) == 11_114_921 + 262_912  # blueprint §2.7


def test_unsupported_reference_configs_are_refused_with_the_field_named():
    with pytest.raises(ValueError, match="num_feature_levels is 4"):
        DeformableDetrOptions.from_reference_config({"perceiver_cfg": {"ddetr_cfg": {"two_stage": True}}})
    cfg = {**RELEASED_DDETR_CFG, "id2label": {"0": "a", "1": "b"}}
    with pytest.raises(ValueError, match="class-agnostic"):
        DeformableDetrOptions.from_reference_config({"perceiver_cfg": {"ddetr_cfg": cfg}})


def test_golden_config_sizes_are_read(golden):
    cfg = golden.groma_config["perceiver_cfg"]["ddetr_cfg"]
    options = DeformableDetrOptions.from_reference_config(golden.groma_config)
    assert (options.d_model, options.encoder_layers, options.decoder_layers) == (
        cfg["d_model"],
        cfg["encoder_layers"],
        cfg["decoder_layers"],
    )
    assert options.num_queries == cfg["num_queries"]
