"""The mlvl-roialign region encoder: discovery, options, call contract, quirks, full-size shapes."""

from __future__ import annotations

import pytest
import torch
from groma_plugin_roialign import MlvlRoIAlignEncoder, RoIAlignEncoderOptions, build_region_encoder, roi_align
from pydantic import ValidationError

from groma_core.boxes import cxcywh_to_xyxy
from groma_core.plugins import PluginManager
from groma_core.reference import map_reference_keys
from groma_core.stages import BuildContext
from groma_core.testing.contract import check_registered_stage
from groma_core.testing.fixtures import GoldenSet, golden_root, golden_sets
from groma_core.types import ImageFeatures

LEVELS = ("last-3", "last-2", "last-1", "last")


def _context(channels: int = 8, hidden: int = 12, grid: int = 4, image: int = 56) -> BuildContext:
    return BuildContext(
        level_channels={name: channels for name in LEVELS},
        level_sizes={name: (grid, grid) for name in LEVELS},
        token_dim=4 * channels,
        image_size=(image, image),
        hidden_size=hidden,
    )


def _small(**overrides) -> MlvlRoIAlignEncoder:
    options = RoIAlignEncoderOptions(gn_groups=4, region_dim=16, pos_embed_dim=8, roi_output_size=3, **overrides)
    torch.manual_seed(0)
    return build_region_encoder(options, _context()).eval()


def _features(batch: int = 2, channels: int = 8, grid: int = 4) -> ImageFeatures:
    generator = torch.Generator().manual_seed(5)
    levels = {name: torch.randn(batch, channels, grid, grid, generator=generator) for name in LEVELS}
    return ImageFeatures(tokens=torch.zeros(batch, 4, 4 * channels), levels=levels)


BOXES = torch.tensor([[0.1, 0.2, 0.5, 0.6], [0.3, 0.1, 0.9, 0.4], [0.0, 0.0, 1.0, 1.0]])


def test_discovered_through_the_entry_point():
    manager = PluginManager(env={})
    entry = manager.get("region_encoder", "mlvl-roialign")
    assert entry.distribution == "groma-plugin-roialign"
    assert entry.config is RoIAlignEncoderOptions
    stage = manager.build("region_encoder", "mlvl-roialign", RoIAlignEncoderOptions(gn_groups=4), _context())
    assert isinstance(stage, MlvlRoIAlignEncoder)
    assert stage.hidden_size == 12


def test_keeps_the_region_encoder_contract():
    options = {"gn_groups": 8, "region_dim": 24, "roi_output_size": 5}
    stage = check_registered_stage("region_encoder", "mlvl-roialign", options, manager=PluginManager(env={}))
    assert isinstance(stage, MlvlRoIAlignEncoder)


def test_one_token_per_region_and_empty_images():
    encoder, features = _small(), _features()
    first = ImageFeatures(features.tokens[:1], {k: v[:1] for k, v in features.levels.items()})
    with torch.no_grad():
        out = encoder(features, [BOXES, torch.zeros(0, 4)])
        alone = encoder(first, [BOXES])
        none = encoder(_features(), [torch.zeros(0, 4), torch.zeros(0, 4)])
    assert [t.shape for t in out] == [(3, 12), (0, 12)]
    torch.testing.assert_close(out[0], alone[0], rtol=0, atol=1e-5)
    assert [t.shape for t in none] == [(0, 12), (0, 12)]


def test_regions_of_each_image_are_pooled_from_that_image():
    features = _features()
    swapped = ImageFeatures(features.tokens, {k: v.flip(0) for k, v in features.levels.items()})
    encoder = _small()
    with torch.no_grad():
        out = encoder(features, [BOXES[:1], BOXES[1:]])
        out_swapped = encoder(swapped, [BOXES[1:], BOXES[:1]])
    torch.testing.assert_close(out[0], out_swapped[1], rtol=0, atol=1e-5)
    torch.testing.assert_close(out[1], out_swapped[0], rtol=0, atol=1e-5)


def test_quirk_options_change_what_is_pooled():
    box = torch.tensor([[0.2, 0.3, 0.6, 0.5]])  # cxcywh (0.4, 0.4, 0.4, 0.2)
    fused = [torch.zeros(1, 8, 16, 16), torch.zeros(1, 8, 8, 8), torch.zeros(1, 8, 4, 4)]
    quirky, geometric = _small(), _small(corner_format_quirk=False, stride_quirk=False)
    rois, cxcywh = quirky.rois([box], torch.device("cpu"))
    torch.testing.assert_close(rois, torch.tensor([[0.0, 0.4 * 56, 0.4 * 56, 0.4 * 56, 0.2 * 56]]))
    torch.testing.assert_close(cxcywh, torch.tensor([[0.4, 0.4, 0.4, 0.2]]))
    rois, cxcywh = geometric.rois([box], torch.device("cpu"))
    torch.testing.assert_close(rois, torch.tensor([[0.0, 0.2 * 56, 0.3 * 56, 0.6 * 56, 0.5 * 56]]))
    torch.testing.assert_close(cxcywh, torch.tensor([[0.4, 0.4, 0.4, 0.2]]))  # the position MLP always sees cxcywh
    assert quirky.spatial_scales(fused) == [(32 / 56, 32 / 56), (16 / 56, 16 / 56), (8 / 56, 8 / 56)]
    assert geometric.spatial_scales(fused) == [(16 / 56, 16 / 56), (8 / 56, 8 / 56), (4 / 56, 4 / 56)]


def test_full_size_scales_reproduce_the_reference_strides():
    context = _context(channels=16, grid=32, image=448)
    encoder = build_region_encoder(RoIAlignEncoderOptions(gn_groups=4), context)
    maps = [torch.zeros(1, 16, s, s) for s in (128, 64, 32)]
    assert encoder.spatial_scales(maps) == [(1 / (14 / 8),) * 2, (1 / (14 / 4),) * 2, (1 / (14 / 2),) * 2]
    encoder = build_region_encoder(RoIAlignEncoderOptions(gn_groups=4, stride_quirk=False), context)
    assert encoder.spatial_scales(maps) == [(128 / 448,) * 2, (64 / 448,) * 2, (32 / 448,) * 2]


def test_geometric_setting_pools_only_inside_the_box():
    # with both quirks off, changing the map far outside a box leaves its RoIAlign features unchanged
    encoder = _small(corner_format_quirk=False, stride_quirk=False)
    box = torch.tensor([[0.3, 0.3, 0.5, 0.5]])  # the quirks read it as x, y from 0.8 down to 0.4
    rois, _ = encoder.rois([box], torch.device("cpu"))
    fmap = torch.randn(1, 8, 16, 16)
    changed = fmap.clone()
    changed[..., 10:, :] = 7.0
    changed[..., :, 10:] = 7.0
    scales = encoder.spatial_scales([fmap])
    before, after = encoder.extractor.pool([fmap], rois, scales)[0], encoder.extractor.pool([changed], rois, scales)[0]
    assert torch.equal(before, after)
    quirky = _small()
    rois, _ = quirky.rois([box], torch.device("cpu"))
    scales = quirky.spatial_scales([fmap])
    before, after = quirky.extractor.pool([fmap], rois, scales)[0], quirky.extractor.pool([changed], rois, scales)[0]
    assert not torch.equal(before, after)


def test_pooling_uses_the_roi_align_semantics():
    encoder = _small()
    fused = [torch.randn(2, 8, 16, 16), torch.randn(2, 8, 8, 8), torch.randn(2, 8, 4, 4)]
    rois, _ = encoder.rois([BOXES, BOXES[:1]], torch.device("cpu"))
    scales = encoder.spatial_scales(fused)
    pooled = encoder.extractor.pool(fused, rois, scales)
    for level, fmap in enumerate(fused):
        expected = roi_align(fmap, rois, 3, spatial_scale=scales[level], sampling_ratio=2, aligned=True)
        assert torch.equal(pooled[level], expected)


@pytest.mark.parametrize(
    "regions, error, message",
    [
        ([BOXES[:, :3], BOXES], ValueError, r"regions\[0\] must have shape \(N, 4\).*got \(3, 3\)"),
        ([BOXES, BOXES[None]], ValueError, r"regions\[1\] must have shape \(N, 4\).*got \(1, 3, 4\)"),
        ([BOXES], ValueError, "regions has 1 entries for a batch of 2 images"),
    ],
)
def test_bad_regions_are_named(regions, error, message):
    with pytest.raises(error, match=message):
        _small()(_features(), regions)


def test_missing_level_is_named():
    features = _features()
    del features.levels["last-1"]
    with pytest.raises(KeyError, match="levels names 'last-1'.*'last', 'last-2', 'last-3'"):
        _small()(features, [BOXES, BOXES])


def test_wrong_level_width_is_named():
    features = _features(channels=6)
    with pytest.raises(ValueError, match=r"level 'last-2' must have shape \(B, 8, h, w\), got \(2, 6, 4, 4\)"):
        _small()(features, [BOXES, BOXES])


def test_build_errors_are_clear():
    with pytest.raises(ValueError, match="publishes no level 'p5'"):
        build_region_encoder(RoIAlignEncoderOptions(levels=["p5"], level_scales=[1]), _context())
    with pytest.raises(ValueError, match="no language-model hidden_size"):
        build_region_encoder(RoIAlignEncoderOptions(gn_groups=4), _context(hidden=0))
    with pytest.raises(ValueError, match="gn_groups=64 must divide the level channels \\(8\\)"):
        build_region_encoder(RoIAlignEncoderOptions(), _context())
    with pytest.raises(ValidationError, match="level_scales has 2 entries but levels has 3"):
        RoIAlignEncoderOptions(level_scales=[2, 1])
    with pytest.raises(ValidationError, match="extra"):
        RoIAlignEncoderOptions(roi_size=7)


def test_other_levels_and_widths_can_be_chosen():
    options = RoIAlignEncoderOptions(
        levels=["last-1", "last"],
        level_scales=[2, 1],
        gn_groups=2,
        in_channels=8,
        num_fuse=1,
        region_dim=6,
        roi_output_size=2,
        sampling_ratio=0,
    )
    encoder = build_region_encoder(options, BuildContext(image_size=(56, 56), hidden_size=5))
    out = encoder(_features(), [BOXES, BOXES[:2]])
    assert [t.shape for t in out] == [(3, 5), (2, 5)]


def test_runs_in_bfloat16():
    encoder = _small()
    features = _features()
    with torch.no_grad():
        reference = encoder(features, [BOXES, BOXES])
        low = encoder.to(torch.bfloat16)(features, [BOXES, BOXES])
    assert low[0].dtype == torch.bfloat16
    torch.testing.assert_close(low[0].float(), reference[0], rtol=0.05, atol=0.05)


def test_from_reference_config():
    sets = golden_sets()
    config = GoldenSet(sets[0]).groma_config if sets else {"model_type": "groma"}
    options = RoIAlignEncoderOptions.from_reference_config(config)
    assert options.region_dim == 1024 and options.corner_format_quirk and options.stride_quirk
    assert options.levels == ["last-2", "last-1", "last"] and options.level_scales == [4, 2, 1]
    assert RoIAlignEncoderOptions.from_reference_config(config, region_dim=64).region_dim == 64
    with pytest.raises(ValueError, match="model_type 'groma'"):
        RoIAlignEncoderOptions.from_reference_config({"model_type": "llava"})


def test_full_size_on_meta_device_matches_the_released_checkpoint():
    keys_file = golden_root().parent / "groma-7b-keys.tsv"
    if not keys_file.is_file():
        pytest.skip(f"no {keys_file}")
    released = {}
    for line in keys_file.read_text().splitlines():
        key, shape = line.split("\t")[:2]
        if key.startswith("region_encoder."):
            released[key] = tuple(int(s) for s in shape.split("x"))
    context = BuildContext(
        level_channels={name: 1024 for name in LEVELS}, image_size=(448, 448), hidden_size=4096, token_dim=4096
    )
    with torch.device("meta"):
        encoder = build_region_encoder(RoIAlignEncoderOptions.from_reference_config({"model_type": "groma"}), context)
    own = {k: tuple(v.shape) for k, v in encoder.state_dict().items()}
    mapping, dropped = map_reference_keys(encoder, list(released))
    assert not dropped and len(released) == 39
    assert sorted(mapping.values()) == sorted(own)
    assert {ref: own[mine] for ref, mine in mapping.items()} == released


def test_round_trip_of_reference_boxes_is_negligible():
    generator = torch.Generator().manual_seed(0)
    cxcywh = torch.rand(500, 4, generator=generator) * 0.5 + 0.25
    _, back = _small().rois([cxcywh_to_xyxy(cxcywh)], torch.device("cpu"))
    assert (back - cxcywh).abs().max() < 2e-7


def test_head_convs_add_trainable_layers_and_default_keeps_the_reference_keys():
    plain, deeper = _small(), _small(head_convs=2)
    extra = set(deeper.state_dict()) - set(plain.state_dict())
    assert extra == {f"extractor.head_convs.{i}.{p}" for i in range(2) for p in ("weight", "bias")}
    assert not any("head_convs" in key for key in plain.state_dict())  # the reference layout, untouched
    features = _features()
    tokens = torch.cat(deeper(features, [BOXES, BOXES[:1]]))
    tokens.square().sum().backward()
    assert all(deeper.extractor.head_convs[i].weight.grad.abs().sum() > 0 for i in range(2))
    with torch.no_grad():
        deeper.extractor.head_convs[1].weight.mul_(2.0)
        changed = torch.cat(deeper(features, [BOXES, BOXES[:1]]))
    assert not torch.allclose(changed, tokens.detach())


def test_log_box_size_feeds_the_position_mlp_log_sizes():
    """With ``log_box_size`` the position MLP sees (cx, cy, log w, log h): a wide and a tall box of equal area
    differ by the same amount at any scale (the aspect ratio is linear), where (w, h) shrinks it with the box."""
    plain, logged = _small(), _small(log_box_size=True)
    logged.load_state_dict(plain.state_dict())  # the same weights: the option adds none
    seen: list[torch.Tensor] = []
    logged.extractor.pos_embed[0].register_forward_hook(lambda module, args, out: seen.append(args[0]))
    boxes = torch.tensor([[0.1, 0.1, 0.5, 0.3], [0.1, 0.1, 0.3, 0.5], [0.1, 0.1, 0.14, 0.12], [0.1, 0.1, 0.12, 0.14]])
    features = _features(batch=1)
    with torch.no_grad():
        logged(features, [boxes])
        differs = not torch.allclose(logged(features, [boxes])[0], plain(features, [boxes])[0])
    x = seen[0]
    torch.testing.assert_close(x[:, 2:], xyxy_sizes(boxes).log())
    aspect = x[:, 2] - x[:, 3]
    torch.testing.assert_close(aspect[0] - aspect[1], aspect[2] - aspect[3])  # log 4 at both scales
    assert differs


def xyxy_sizes(boxes: torch.Tensor) -> torch.Tensor:
    return boxes[:, 2:] - boxes[:, :2]


def test_image_crop_reads_each_region_from_the_original_image_at_full_resolution():
    """``image_crop`` pools an N x N crop of each region from the original image (a box of the input frame taken back
    through the letterbox frame), so two images whose encoder features are equal but whose pixels differ inside a
    box give different tokens; without the images it says what it needs in one line."""
    from PIL import Image

    from groma_core.errors import InputError

    stage = _small(image_crop=8)
    assert stage.needs_images and not _small().needs_images
    extra = set(stage.state_dict()) - set(_small().state_dict())
    assert extra and all(key.startswith("extractor.crop_stem.") for key in extra)
    # a 200 x 100 image letterboxed into a square input: it fills the width, the top half of the height
    red = Image.new("RGB", (200, 100), (255, 255, 255))
    red.paste((255, 0, 0), (150, 20, 190, 60))
    blue = red.copy()
    blue.paste((0, 0, 255), (150, 20, 190, 60))
    frame = (1.0, 0.5, 0.0, 0.25)  # x_input = x, y_input = 0.25 + 0.5 y
    box_in_input = torch.tensor([[150 / 200, 0.25 + 0.5 * 20 / 100, 190 / 200, 0.25 + 0.5 * 60 / 100]])
    features = _features(batch=2)
    features.levels = {k: torch.cat([v[:1], v[:1]]) for k, v in features.levels.items()}  # equal features
    features.images, features.frames = [red, blue], [frame, frame]
    crops = stage.crops(features, [box_in_input, box_in_input], torch.device("cpu"))
    assert crops.shape == (2, 3, 8, 8)
    torch.testing.assert_close(crops[0].mean((1, 2)), torch.tensor([0.5, -0.5, -0.5]))  # all red, inside the box
    torch.testing.assert_close(crops[1].mean((1, 2)), torch.tensor([-0.5, -0.5, 0.5]))
    # a wide box (40 x 10 px) is cut as the 40 x 40 square around it: its aspect shows in the crop (the red band in
    # the middle rows, white above and below), where a stretched crop would be all red
    wide = Image.new("RGB", (200, 100), (255, 255, 255))
    wide.paste((255, 0, 0), (150, 35, 190, 45))
    box_wide = torch.tensor([[150 / 200, 0.25 + 0.5 * 35 / 100, 190 / 200, 0.25 + 0.5 * 45 / 100]])
    features.images = [wide, wide]
    crop = stage.crops(features, [box_wide, box_wide], torch.device("cpu"))[0]
    torch.testing.assert_close(crop[:, 3:5].mean((1, 2)), torch.tensor([0.5, -0.5, -0.5]))  # rows 15-25 of 40: red
    torch.testing.assert_close(crop[:, :2].mean((1, 2)), torch.tensor([0.5, 0.5, 0.5]))  # rows 0-10: white
    features.images = [red, blue]
    with torch.no_grad():
        a, b = stage(features, [box_in_input, box_in_input])
    assert not torch.allclose(a, b)
    features.images = None
    with pytest.raises(InputError, match="image_crop needs the original images") as info:
        stage(features, [box_in_input, box_in_input])
    assert "\n" not in str(info.value)


def test_image_crop_keeps_the_region_encoder_contract():
    options = {"gn_groups": 8, "region_dim": 24, "roi_output_size": 5, "image_crop": 8}
    stage = check_registered_stage("region_encoder", "mlvl-roialign", options, manager=PluginManager(env={}))
    assert stage.needs_images


def test_crop_classes_give_each_token_the_code_of_the_class_its_crop_shows():
    """``crop_classes``: the crop's CNN names a class, and the token gains the code of the class probabilities
    (the ``crop_code`` map; ``crop_code=False`` leaves it out), scaled to ``crop_code_scale`` times the token's own
    norm: a red and a blue box on equal encoder features differ by exactly the difference of their codes. The
    classifier learns from its own loss (``crop_logits``) and never from the token's, so a language model trained on
    the tokens cannot unteach it; a classifier without a crop is refused in one line."""
    from PIL import Image

    stage = _small(image_crop=8, crop_classes=5, crop_code_scale=0.5).train()
    extra = set(stage.state_dict()) - set(_small().state_dict())
    assert {k.split(".")[1] for k in extra} == {"crop_classifier", "crop_code"}  # no crop vector beside
    red = Image.new("RGB", (200, 100), (255, 255, 255))
    red.paste((255, 0, 0), (150, 20, 190, 60))
    blue = red.copy()
    blue.paste((0, 0, 255), (150, 20, 190, 60))
    box = torch.tensor([[150 / 200, 0.25 + 0.5 * 20 / 100, 190 / 200, 0.25 + 0.5 * 60 / 100]])
    features = _features(batch=2)
    features.levels = {k: torch.cat([v[:1], v[:1]]) for k, v in features.levels.items()}
    features.images, features.frames = [red, blue], [(1.0, 0.5, 0.0, 0.25)] * 2
    logits = stage.crop_logits(features, [box, box])
    assert logits.shape == (2, 5) and not torch.allclose(logits[0], logits[1])
    a, b = stage(features, [box, box])
    with torch.no_grad():
        rest, rest_b = stage(features, [box, box], crop_code=False)  # the token without its code (equal for both)
    torch.testing.assert_close(rest, rest_b)
    code = torch.nn.functional.normalize(stage.extractor.crop_code(logits.detach().softmax(-1)), dim=-1)
    scale = 0.5 * rest.norm()
    torch.testing.assert_close((a - b)[0], (code[0] - code[1]) * scale, atol=1e-5, rtol=1e-4)  # float32, ~1e0 values
    torch.testing.assert_close(a.detach(), rest + code[:1] * scale, atol=1e-5, rtol=1e-4)
    (a.sum() + b.sum()).backward()
    assert stage.extractor.crop_code.weight.grad is not None
    assert all(p.grad is None for p in stage.extractor.crop_classifier.parameters())
    with pytest.raises(ValidationError, match="set image_crop > 0 too"):
        RoIAlignEncoderOptions(crop_classes=5)
    from groma_core.errors import InputError

    with pytest.raises(InputError, match="crop_logits needs a crop classifier"):
        _small(image_crop=8).crop_logits(features, [box, box])


def test_a_wide_crop_cnn_names_the_same_classes_with_more_layers():
    """``crop_cnn: wide`` gives the crop classifier five convs (32 -> 128 channels) instead of three, for crops of any
    size and classes as many as ``crop_classes``; ``small`` (the default) keeps the tensors, and so the checkpoints,
    of models trained before the option; an unknown kind is refused by the options."""
    from PIL import Image

    small, wide = _small(image_crop=8, crop_classes=5), _small(image_crop=8, crop_classes=5, crop_cnn="wide")
    convs = [m for m in wide.extractor.crop_classifier if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [32, 32, 64, 64, 128]
    assert sum(isinstance(m, torch.nn.Conv2d) for m in small.extractor.crop_classifier) == 3
    torch.manual_seed(0)
    reference = RoIAlignEncoderOptions(gn_groups=4, region_dim=16, pos_embed_dim=8, roi_output_size=3, image_crop=8,
                                       crop_classes=5)
    assert set(small.state_dict()) == set(build_region_encoder(reference, _context()).state_dict())
    assert set(wide.state_dict()) != set(small.state_dict())
    features = _features(batch=1)
    features.images, features.frames = [Image.new("RGB", (64, 48), (0, 200, 0))], [(1.0, 0.75, 0.0, 0.0)]
    for size in (8, 16, 24):
        wide.options.image_crop = size
        assert wide.crop_logits(features, [BOXES]).shape == (3, 5)
    with pytest.raises(ValidationError, match="crop_cnn"):
        RoIAlignEncoderOptions(image_crop=8, crop_cnn="deep")


def test_a_box_code_tells_the_language_model_where_each_region_is():
    """``box_code_scale``: each token gains a fixed code of its box (no parameters, nothing stored, the other weights
    starting as without it), at that multiple of the token's own norm (``box_code=False`` leaves it out), so that
    where a region is stays readable by a linear map however large the pooled features make the rest of the token
    (training grows them: the box's learned embedding ends a few percent of a trained token, benchmarks/README.md,
    session 17). Features 100x larger here stand in for that."""

    def build(**overrides) -> MlvlRoIAlignEncoder:
        options = RoIAlignEncoderOptions(gn_groups=4, region_dim=16, pos_embed_dim=8, roi_output_size=3, **overrides)
        torch.manual_seed(0)
        return build_region_encoder(options, _context(hidden=192)).eval()

    plain, coded = build(), build(box_code_scale=0.5)
    assert set(coded.state_dict()) == set(plain.state_dict())  # the frequencies are rebuilt, not stored
    for key, value in plain.state_dict().items():
        torch.testing.assert_close(coded.state_dict()[key], value)  # the same initial weights
    generator = torch.Generator().manual_seed(3)
    centre = torch.rand(400, 2, generator=generator) * 0.8 + 0.1
    size = torch.rand(400, 2, generator=generator) * 0.15 + 0.05
    boxes = torch.cat([centre - size / 2, centre + size / 2], dim=1)
    features = _features(batch=1, grid=8)
    features.levels = {name: 100 * level for name, level in features.levels.items()}
    with torch.no_grad():
        (tokens,) = coded(features, [boxes])
        (own,) = coded(features, [boxes], box_code=False)
        (without,) = plain(features, [boxes])
    torch.testing.assert_close(own, without)  # box_code=False: the encoder without the option
    torch.testing.assert_close((tokens - own).norm(dim=-1), 0.5 * own.norm(dim=-1), rtol=1e-4, atol=1e-5)

    def held_out_error(x: torch.Tensor) -> float:  # a linear map fit on 300 boxes, its mean error on the other 100
        x = torch.cat([x, torch.ones(len(x), 1)], dim=1).double()
        solution = torch.linalg.lstsq(x[:300], centre[:300].double()).solution
        return (x[300:] @ solution - centre[300:].double()).abs().mean().item()

    # float64 least squares on 300 samples of 193 features; measured 0.015 of the image's side with the code against
    # 0.10 without (0.20 for a constant guess)
    assert held_out_error(tokens) < 0.03 and held_out_error(tokens) * 3 < held_out_error(without)
    with pytest.raises(ValidationError, match="greater than or equal to 0"):
        RoIAlignEncoderOptions(box_code_scale=-1.0)


def test_crop_classes_keep_the_region_encoder_contract():
    options = {"gn_groups": 8, "region_dim": 24, "roi_output_size": 5, "image_crop": 8, "crop_classes": 4}
    stage = check_registered_stage("region_encoder", "mlvl-roialign", options, manager=PluginManager(env={}))
    assert stage.needs_images
