"""open_clip / OpenAI CLIP checkpoints: key conversion, checkpoint formats, and the converted tower's numerics.

open_clip cannot be imported on these machines (it needs torchvision), so its ViT is rebuilt here by hand from its
documented architecture, with its parameter names (``OpenClipLayoutViT``): the conversion is checked against that
independent forward. The test that uses open_clip itself runs only where it imports.
"""

from __future__ import annotations

import json
from collections import OrderedDict

import pytest
import torch
from groma_plugin_clip import ClipOptions, build_clip, convert_visual, read_checkpoint, visual_state_dict
from groma_plugin_clip.open_clip_weights import open_clip_visual
from safetensors.torch import save_file
from torch import Tensor, nn
from transformers import CLIPVisionConfig, CLIPVisionModel

from groma_core.api import empty_parameters
from groma_core.stages import BuildContext


class QuickGELU(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


class OpenClipLayoutBlock(nn.Module):
    """open_clip's ``ResidualAttentionBlock``: pre-norm attention (``nn.MultiheadAttention``, sequence first) and
    MLP ``c_fc`` -> activation -> ``c_proj``."""

    def __init__(self, width: int, heads: int, mlp_width: int, activation: type[nn.Module]):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            OrderedDict(
                [("c_fc", nn.Linear(width, mlp_width)), ("gelu", activation()), ("c_proj", nn.Linear(mlp_width, width))]
            )
        )

    def forward(self, x: Tensor) -> Tensor:  # (L, N, C)
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class OpenClipLayoutViT(nn.Module):
    """open_clip's (and OpenAI CLIP's) ``VisionTransformer`` with its tensor names; ``hidden_states`` returns the
    tokens after ``ln_pre`` and after each block (batch first)."""

    def __init__(self, image_size=56, patch=14, width=32, layers=4, heads=4, mlp_width=64, out_dim=16, act=QuickGELU):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, patch, stride=patch, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(width) * width**-0.5)
        self.positional_embedding = nn.Parameter(torch.randn((image_size // patch) ** 2 + 1, width) * width**-0.5)
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.ModuleList(
            OpenClipLayoutBlock(width, heads, mlp_width, act) for _ in range(layers)
        )
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(torch.randn(width, out_dim) * width**-0.5)
        with torch.no_grad():  # no parameter keeps its default (LayerNorm ones, zero biases): each mapping shows
            for p in self.parameters():
                p.add_(0.1 * torch.randn_like(p))

    def hidden_states(self, pixels: Tensor) -> list[Tensor]:
        x = self.conv1(pixels).flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(x.shape[0], 1, -1)
        x = self.ln_pre(torch.cat([cls, x], dim=1) + self.positional_embedding)
        states = [x]
        x = x.transpose(0, 1)
        for block in self.transformer.resblocks:
            x = block(x)
            states.append(x.transpose(0, 1))
        return states

    def forward(self, pixels: Tensor) -> Tensor:
        """The image embedding: ``ln_post`` of the CLS token, projected."""
        return self.ln_post(self.hidden_states(pixels)[-1][:, 0]) @ self.proj


class OpenClipLayoutModel(nn.Module):
    """A whole CLIP model as open_clip saves it: ``visual.*`` beside text-tower tensors."""

    def __init__(self, **vit):
        super().__init__()
        self.visual = OpenClipLayoutViT(**vit)
        self.token_embedding = nn.Embedding(10, 8)
        self.logit_scale = nn.Parameter(torch.tensor(4.6))

    def forward(self, pixels: Tensor) -> Tensor:
        return self.visual(pixels)


# TorchScript records each module's qualified class name; pytest's importlib name of this file has dashes, which
# TorchScript refuses: give the classes the module name OpenAI's archives record instead.
for _cls in (QuickGELU, OpenClipLayoutBlock, OpenClipLayoutViT, OpenClipLayoutModel):
    _cls.__module__ = "clip.model"


def save_checkpoint(model: OpenClipLayoutModel, path, style: str) -> None:
    """Write ``model`` as open_clip's state dict, its training checkpoint, a safetensors file or OpenAI's
    TorchScript archive."""
    state = model.state_dict()
    if style == "state-dict":
        torch.save(state, path)
    elif style == "training":
        torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    elif style == "safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.jit.save(torch.jit.trace(model.eval(), torch.randn(1, 3, 56, 56)), str(path))


def clip_stage(**options):
    """A clip tokenizer read at 56 px unless ``input_size`` is given."""
    return build_clip(ClipOptions(**{"input_size": 56, **options}), BuildContext()).eval()


SUFFIX = {"state-dict": ".bin", "training": ".pt", "safetensors": ".safetensors", "torchscript": ".pt"}


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::torch.jit.TracerWarning")
@pytest.mark.parametrize("style", list(SUFFIX))
def test_converted_tower_computes_what_the_open_clip_layout_computes(style, tmp_path):
    torch.manual_seed(0)
    reference = OpenClipLayoutModel().eval()
    path = tmp_path / f"clip{SUFFIX[style]}"
    save_checkpoint(reference, path, style)
    stage = clip_stage(open_clip_checkpoint=str(path), num_attention_heads=4, attn_implementation="eager")
    config = stage.clip.config
    assert (config.hidden_size, config.num_hidden_layers, config.image_size) == (32, 4, 56)
    pixels = torch.randn(2, 3, 56, 56)
    features = stage(pixels)
    with torch.no_grad():
        states = reference.visual.hidden_states(pixels)
        pooled = stage.clip(pixel_values=pixels).pooler_output @ reference.visual.proj
    for name, state in zip(("last-3", "last-2", "last-1", "last"), states[-4:]):
        torch.testing.assert_close(features.levels[name].flatten(2).transpose(1, 2), state[:, 1:], rtol=0, atol=1e-5)
    torch.testing.assert_close(pooled, reference(pixels).detach(), rtol=0, atol=1e-5)


def test_gelu_towers_convert_with_hidden_act_gelu(tmp_path):
    torch.manual_seed(1)
    reference = OpenClipLayoutModel(act=nn.GELU).eval()
    save_checkpoint(reference, tmp_path / "clip.bin", "state-dict")
    stage = clip_stage(open_clip_checkpoint=str(tmp_path / "clip.bin"), num_attention_heads=4, hidden_act="gelu")
    pixels = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        expected = reference.visual.hidden_states(pixels)[-1][:, 1:]
    torch.testing.assert_close(stage(pixels).levels["last"].flatten(2).transpose(1, 2), expected, rtol=0, atol=1e-5)


def test_heads_default_to_a_head_width_of_64(tmp_path):
    torch.manual_seed(2)
    reference = OpenClipLayoutModel(width=128, heads=2, mlp_width=256, layers=4).eval()
    save_checkpoint(reference, tmp_path / "clip.bin", "state-dict")
    stage = clip_stage(open_clip_checkpoint=str(tmp_path / "clip.bin"))
    assert stage.clip.config.num_attention_heads == 2
    pixels = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        expected = reference.visual.hidden_states(pixels)[-1][:, 1:]
    torch.testing.assert_close(stage(pixels).levels["last"].flatten(2).transpose(1, 2), expected, rtol=0, atol=1e-5)


#: transformers CLIPVisionModel names -> open_clip names, written out by hand (the inverse of the conversion)
HF_TO_OPEN_CLIP = {
    "embeddings.patch_embedding.weight": "conv1.weight",
    "embeddings.class_embedding": "class_embedding",
    "embeddings.position_embedding.weight": "positional_embedding",
    "pre_layrnorm.weight": "ln_pre.weight",
    "pre_layrnorm.bias": "ln_pre.bias",
    "post_layernorm.weight": "ln_post.weight",
    "post_layernorm.bias": "ln_post.bias",
}
HF_TO_OPEN_CLIP_BLOCK = {
    "layer_norm1": "ln_1",
    "self_attn.out_proj": "attn.out_proj",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}


def to_open_clip(hf_state: dict[str, Tensor], proj: Tensor) -> dict[str, Tensor]:
    """A CLIPVisionModel state dict written with open_clip's names (q, k, v packed into ``in_proj``)."""
    out = {"proj": proj}
    layers = {int(k.split(".")[2]) for k in hf_state if k.startswith("encoder.layers.")}
    for key, name in HF_TO_OPEN_CLIP.items():
        out[name] = hf_state[key]
    for i in sorted(layers):
        hf, oc = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            for a, b in HF_TO_OPEN_CLIP_BLOCK.items():
                out[f"{oc}{b}.{kind}"] = hf_state[f"{hf}{a}.{kind}"]
            qkv = [hf_state[f"{hf}self_attn.{p}_proj.{kind}"] for p in "qkv"]
            out[f"{oc}attn.in_proj_{kind}"] = torch.cat(qkv)
    return out


def test_every_key_maps_and_the_round_trip_is_exact(tmp_path):
    torch.manual_seed(3)
    config = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, image_size=56, patch_size=14
    )
    original = CLIPVisionModel(config).eval()
    hf_state = original.state_dict()
    visual = to_open_clip(hf_state, proj=torch.randn(32, 16))
    converted, dropped = convert_visual(visual)
    assert sorted(converted) == sorted(hf_state) and dropped == ["proj"]
    torch.save({f"visual.{k}": v for k, v in visual.items()}, tmp_path / "clip.bin")
    stage = clip_stage(open_clip_checkpoint=str(tmp_path / "clip.bin"), num_attention_heads=4)
    for key, tensor in stage.clip.state_dict().items():
        assert torch.equal(tensor, hf_state[key]), key
    pixels = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        expected = original(pixel_values=pixels, output_hidden_states=True).hidden_states
    features = stage(pixels)
    for name, state in zip(("last-3", "last-2", "last-1", "last"), expected[-4:]):
        torch.testing.assert_close(features.levels[name].flatten(2).transpose(1, 2), state[:, 1:], rtol=0, atol=0)


def test_half_precision_checkpoints_load_into_float32_towers(tmp_path):
    torch.manual_seed(4)
    reference = OpenClipLayoutModel().half()
    save_checkpoint(reference, tmp_path / "clip.bin", "state-dict")
    stage = clip_stage(open_clip_checkpoint=str(tmp_path / "clip.bin"), num_attention_heads=4)
    weight = stage.clip.encoder.layers[0].self_attn.k_proj.weight
    assert weight.dtype == torch.float32
    in_proj = reference.visual.transformer.resblocks[0].attn.in_proj_weight
    assert torch.equal(weight, in_proj[32:64].float())


def test_the_checkpoint_fixes_the_sizes_and_explicit_ones_must_agree(tmp_path):
    save_checkpoint(OpenClipLayoutModel(), tmp_path / "clip.bin", "state-dict")
    stage = clip_stage(open_clip_checkpoint=str(tmp_path / "clip.bin"), num_attention_heads=4, input_size=336)
    config = stage.clip.config
    sizes = (config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.patch_size)
    assert sizes == (32, 64, 4, 14) and config.image_size == 56 and stage.image_size == (336, 336)
    assert stage.interpolate_positions and stage.level_sizes["last"] == (24, 24)
    with pytest.raises(ValueError, match="has hidden_size=32 but the options ask for 1024"):
        clip_stage(open_clip_checkpoint=str(tmp_path / "clip.bin"), hidden_size=1024)
    with pytest.raises(ValueError, match="hidden_size 32 is not divisible by num_attention_heads 5"):
        clip_stage(open_clip_checkpoint=str(tmp_path / "clip.bin"), num_attention_heads=5)


@pytest.mark.parametrize("context", ["empty_parameters", "meta_device"])
def test_building_without_real_parameters_keeps_the_checkpoint_shapes(tmp_path, context):
    """groma_core.build creates parameters empty before loading a Groma checkpoint; a test builds on meta."""
    save_checkpoint(OpenClipLayoutModel(), tmp_path / "clip.bin", "state-dict")
    with empty_parameters() if context == "empty_parameters" else torch.device("meta"):
        stage = clip_stage(open_clip_checkpoint=str(tmp_path / "clip.bin"), num_attention_heads=4)
    converted, _ = convert_visual(visual_state_dict(read_checkpoint(tmp_path / "clip.bin")))
    own = {k: tuple(v.shape) for k, v in stage.clip.state_dict().items()}
    assert own == {k: tuple(v.shape) for k, v in converted.items()}


def test_towers_that_do_not_convert_are_refused_naming_the_tensors(tmp_path):
    visual = {f"visual.{k}": v for k, v in OpenClipLayoutModel().visual.state_dict().items()}
    scaled = {**visual, "visual.transformer.resblocks.0.ls_1.gamma": torch.ones(32)}
    torch.save(scaled, tmp_path / "scaled.bin")
    with pytest.raises(ValueError, match=r"1 visual tensors have no CLIPVisionModel equivalent.*ls_1.gamma"):
        clip_stage(open_clip_checkpoint=str(tmp_path / "scaled.bin"), num_attention_heads=4)
    no_ln_pre = {k: v for k, v in visual.items() if ".ln_pre." not in k}
    torch.save(no_ln_pre, tmp_path / "no_ln_pre.bin")
    with pytest.raises(ValueError, match=r"does not fit CLIPVisionModel: missing \['pre_layrnorm.bias'"):
        clip_stage(open_clip_checkpoint=str(tmp_path / "no_ln_pre.bin"), num_attention_heads=4)
    torch.save({k: v for k, v in visual.items() if "positional" not in k}, tmp_path / "no_positions.bin")
    with pytest.raises(ValueError, match=r"the visual tower lacks \['positional_embedding'\]"):
        clip_stage(open_clip_checkpoint=str(tmp_path / "no_positions.bin"), num_attention_heads=4)
    with pytest.raises(ValueError, match="a timm tower"):
        visual_state_dict({"visual.trunk.blocks.0.attn.qkv.weight": torch.zeros(3, 1)})
    with pytest.raises(ValueError, match=r"not a ViT \(a ResNet\?\)"):
        visual_state_dict({"visual.layer1.0.conv1.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"no visual tower: .* found e.g. \['logit_scale'\]"):
        visual_state_dict({"logit_scale": torch.zeros(())})
    with pytest.raises(FileNotFoundError, match="open_clip_checkpoint: .*missing.pt is not a file"):
        read_checkpoint(tmp_path / "missing.pt")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="holds no state dict"):
        read_checkpoint(tmp_path / "list.pt")


def test_open_clip_model_without_open_clip_is_a_clear_error():
    try:
        import open_clip  # noqa: F401
    except Exception:
        with pytest.raises(ImportError, match="open_clip_model 'ViT-L-14-336' needs the open_clip package"):
            clip_stage(open_clip_model="ViT-L-14-336")
    else:
        pytest.skip("open_clip imports here")


def test_open_clip_itself_builds_the_tower_where_it_imports(tmp_path):
    open_clip = pytest.importorskip("open_clip")
    config = {
        "embed_dim": 16,
        "quick_gelu": True,
        "vision_cfg": {"image_size": 56, "layers": 4, "width": 64, "head_width": 16, "patch_size": 14},
        "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 4, "layers": 1},
    }
    (tmp_path / "groma-tiny-vit.json").write_text(json.dumps(config))
    open_clip.add_model_config(tmp_path / "groma-tiny-vit.json")
    torch.manual_seed(6)
    model = open_clip.create_model("groma-tiny-vit").eval()
    torch.save(model.state_dict(), tmp_path / "tiny.bin")
    _, architecture = open_clip_visual("groma-tiny-vit", str(tmp_path / "tiny.bin"))
    assert architecture == {"num_attention_heads": 4, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}
    stage = clip_stage(open_clip_model="groma-tiny-vit", open_clip_checkpoint=str(tmp_path / "tiny.bin"))
    pixels = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        pooled = stage.clip(pixel_values=pixels).pooler_output @ model.visual.proj
        expected = model.encode_image(pixels)
    torch.testing.assert_close(pooled, expected, rtol=0, atol=1e-5)
