"""The contract test kit: checks that a stage keeps the call contract of its interface.

A plugin author calls these from their own tests::

    from groma_core.testing.contract import check_registered_stage
    check_registered_stage("region_proposer", "my-proposer", {"option": 1})

Each check raises ``AssertionError`` with a message that says which promise was broken.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from groma_core.plugins import PluginManager
from groma_core.stages import BuildContext, ImageTokenizer, LanguageBackbone, RegionEncoder, RegionProposer
from groma_core.types import ImageFeatures, Proposals


def sample_images() -> list[Image.Image]:
    """Two small RGB images of different sizes and content."""
    a = Image.new("RGB", (96, 64), (230, 230, 230))
    a.paste((200, 30, 30), (8, 8, 50, 40))
    b = Image.new("RGB", (64, 112), (20, 20, 20))
    b.paste((30, 200, 60), (10, 50, 60, 100))
    return [a, b]


def sample_features(batch: int = 2, channels: int = 16, size: int = 8, seed: int = 0) -> ImageFeatures:
    """Random image features with the four standard level names, carrying the sample images (for stages that work
    on pixels)."""
    g = torch.Generator().manual_seed(seed)
    levels = {n: torch.randn(batch, channels, size, size, generator=g) for n in ("last-3", "last-2", "last-1", "last")}
    images = (sample_images() * batch)[:batch]
    return ImageFeatures(tokens=levels["last"].flatten(2).transpose(1, 2), levels=levels, images=images)


def _close(a: Tensor, b: Tensor, what: str, atol: float = 1e-4) -> None:
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} vs {tuple(b.shape)}"
    diff = (a.float() - b.float()).abs().max().item() if a.numel() else 0.0
    assert diff <= atol, f"{what}: batched and single results differ by {diff:.3g} (> {atol})"


def check_image_tokenizer(stage: ImageTokenizer) -> ImageFeatures:
    """preprocess/forward shapes, announced levels, and batch independence."""
    stage.eval()
    images = sample_images()
    pixels = stage.preprocess(images)
    h, w = stage.image_size
    assert pixels.shape == (2, 3, h, w), f"preprocess: expected (2, 3, {h}, {w}), got {tuple(pixels.shape)}"
    assert pixels.dtype.is_floating_point, "preprocess must return floats"
    with torch.no_grad():
        feats = stage(pixels)
        single = stage(pixels[1:])
    assert isinstance(feats, ImageFeatures), f"forward must return ImageFeatures, got {type(feats).__name__}"
    assert feats.tokens.shape == (2, stage.num_tokens, stage.token_dim), (
        f"tokens: expected (2, {stage.num_tokens}, {stage.token_dim}), got {tuple(feats.tokens.shape)}"
    )
    assert set(feats.levels) == set(stage.level_channels), (
        f"levels {sorted(feats.levels)} differ from level_channels {sorted(stage.level_channels)}"
    )
    for name, fmap in feats.levels.items():
        expected = (2, stage.level_channels[name], *stage.level_sizes[name])
        assert tuple(fmap.shape) == expected, f"level {name!r}: expected {expected}, got {tuple(fmap.shape)}"
    _close(feats.tokens[1:], single.tokens, "image tokens")
    return feats


def _check_proposals(props: Proposals, batch: int) -> None:
    from groma_core.errors import ProposalError
    from groma_core.model import check_proposals

    assert isinstance(props, Proposals), f"forward must return Proposals, got {type(props).__name__}"
    for i, boxes in enumerate(props.boxes):
        assert boxes.dtype == torch.float32, f"boxes[{i}] must be float32, got {boxes.dtype}"
    try:  # what the pipeline checks at run time: one list per image, finite normalized xyxy, scores in [0, 1]
        check_proposals(props, batch, "under test")
    except ProposalError as err:
        raise AssertionError(str(err)) from None


def check_region_proposer(stage: RegionProposer, features: ImageFeatures | None = None) -> Proposals:
    """Proposals per image, normalized xyxy boxes, scores in [0, 1], batch independence."""
    stage.eval()
    features = features or sample_features()
    with torch.no_grad():
        props = stage(features)
        images = features.images[1:] if features.images is not None else None
        single = stage(ImageFeatures(features.tokens[1:], {k: v[1:] for k, v in features.levels.items()}, images))
    batch = features.batch_size
    _check_proposals(props, batch)
    _check_proposals(single, 1)
    _close(props.boxes[1], single.boxes[0], "proposal boxes", atol=1e-5)
    _check_without_images(stage, features)
    return props


def _check_without_images(stage, features: ImageFeatures, *args: Any) -> None:
    """A stage that reads the original images declares ``needs_images`` (else training would not pass them) and,
    given none, fails with a one-line InputError that says so (``args``: what the stage takes after the
    features)."""
    from groma_core.errors import InputError

    bare = ImageFeatures(features.tokens, features.levels, None)
    needs = bool(getattr(stage, "needs_images", False))
    try:
        with torch.no_grad():
            stage(bare, *args)
    except InputError as err:
        assert needs, (
            f"{type(stage).__name__} fails without features.images ({err}) but does not declare it: set the class "
            "attribute needs_images = True, so that training and evaluation pass the original images"
        )
        assert "\n" not in str(err).strip(), f"the error without images must be one line, got: {err}"
        return
    except Exception as err:  # noqa: BLE001 - any other failure is the finding
        raise AssertionError(
            f"{type(stage).__name__} crashes without features.images ({type(err).__name__}: {err}); "
            + ("raise groma_core.errors.InputError saying it needs the original images" if needs else
               "if it reads the original images, set needs_images = True and raise groma_core.errors.InputError "
               "when they are None")
        ) from None
    assert not needs, (
        f"{type(stage).__name__} declares needs_images but works without features.images: drop the declaration, "
        "or read the images"
    )


def check_region_encoder(stage: RegionEncoder, features: ImageFeatures | None = None) -> list[Tensor]:
    """One vector per region at ``hidden_size``, zero regions allowed, batch independence."""
    stage.eval()
    features = features or sample_features()
    regions = [torch.tensor([[0.1, 0.1, 0.5, 0.6], [0.4, 0.2, 0.9, 0.9], [0.0, 0.0, 1.0, 1.0]]), torch.zeros(0, 4)]
    regions = regions[: features.batch_size]
    images, frames = features.images, features.frames
    with torch.no_grad():
        out = stage(features, regions)
        first = ImageFeatures(
            features.tokens[:1],
            {k: v[:1] for k, v in features.levels.items()},
            images[:1] if images else None,
            frames[:1] if frames else None,
        )
        single = stage(first, regions[:1])
    assert len(out) == len(regions), f"expected {len(regions)} outputs, got {len(out)}"
    for i, (o, r) in enumerate(zip(out, regions)):
        assert o.shape == (r.shape[0], stage.hidden_size), (
            f"output {i}: expected ({r.shape[0]}, {stage.hidden_size}), got {tuple(o.shape)}"
        )
    _close(out[0], single[0], "region tokens")
    _check_without_images(stage, features, regions)
    return out


def check_language_backbone(stage: LanguageBackbone) -> None:
    """Embedding of new tokens, logits over the full vocabulary, and cached decoding equal to full recomputation."""
    stage.eval()
    tok = stage.tokenizer
    assert tok is not None, "a language backbone used in a pipeline needs a tokenizer"
    ids = torch.tensor([tok.encode("<p>a red box</p><roi><r0></roi>")])
    with torch.no_grad():
        emb = stage.embed(ids)
        assert emb.shape == (1, ids.shape[1], stage.hidden_size), f"embed: got {tuple(emb.shape)}"
        mask = torch.ones_like(ids)
        pos = torch.arange(ids.shape[1])[None]
        full = stage(emb, mask, pos)
        assert full.logits.shape == (1, ids.shape[1], stage.vocab_size), (
            f"logits: expected (1, {ids.shape[1]}, {stage.vocab_size}), got {tuple(full.logits.shape)}"
        )
        head = stage(emb[:, :-1], mask[:, :-1], pos[:, :-1], use_cache=True)
        step = stage(emb[:, -1:], mask, pos[:, -1:], past_key_values=head.past_key_values, use_cache=True)
    _close(step.logits[:, -1], full.logits[:, -1], "cached vs full logits")


CHECKS = {
    "image_tokenizer": check_image_tokenizer,
    "region_proposer": check_region_proposer,
    "region_encoder": check_region_encoder,
    "language_backbone": check_language_backbone,
}


def check_registered_stage(
    kind: str,
    name: str,
    options: Mapping[str, Any] | None = None,
    context: BuildContext | None = None,
    manager: PluginManager | None = None,
) -> Any:
    """Build a registered stage from ``options`` (validated by its config class) and run its kind's checks."""
    manager = manager or PluginManager()
    entry = manager.get(kind, name)
    config = entry.config.model_validate(dict(options or {}))
    if context is None:
        feats = sample_features()
        context = BuildContext(
            level_channels={k: v.shape[1] for k, v in feats.levels.items()},
            level_sizes={k: tuple(v.shape[-2:]) for k, v in feats.levels.items()},
            token_dim=feats.tokens.shape[-1],
            image_size=(64, 64),
            hidden_size=32,
        )
    stage = entry.build(config, context)
    CHECKS[kind](stage)
    return stage
