"""8-bit / 4-bit loading (`quantize=` / `--quantize`): which layers it replaces, the quantized model itself (run for
real through bitsandbytes' CPU backend: the layers, their int8 / packed 4-bit storage, logits close to the float
model's, a full answer, the command line), and the one-line errors where it cannot run. The CUDA path, the one the
feature is made for, needs a GPU: not run here."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

from groma_core import quantization
from groma_core.api import load
from groma_core.cli import build_parser
from groma_core.errors import GromaError, InputError
from groma_core.inference import Groma, Request
from groma_core.quantization import check_quantization, quantizable_linears, quantize_model

pytestmark = pytest.mark.filterwarnings(  # torch's own, when importing bitsandbytes imports torch.utils.mkldnn
    "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"
)
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
BNB_MESSAGE = "--quantize 8bit: bitsandbytes is not installed; install it with `pip install bitsandbytes`"
GROMA = str(Path(sys.executable).with_name("groma"))
PROMPT = "Locate <p>the square</p> in the image."
PROMPTS = [PROMPT, "Describe the image.", "What is in the picture?"]
#: groma-tiny's decoder at width 128: bitsandbytes' CPU 4-bit layout does not take the recipe's width 32
WIDE = ["language_backbone.hidden_size=128", "language_backbone.intermediate_size=256"]
HIDE_BNB = "import sys; sys.modules['bitsandbytes'] = None; "  # `import bitsandbytes` fails, as if not installed
PROJECTIONS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"]
PROJECTIONS += ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


@pytest.fixture(scope="module")
def tok(sp_dir) -> Path:
    return sp_dir  # the session's SentencePiece model (tests/conftest.py)


@pytest.fixture(scope="module")
def picture(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("pic") / "pic.png"
    Image.new("RGB", (64, 48), (200, 30, 30)).save(path)
    return path


def run(*args: str, prelude: str = "") -> subprocess.CompletedProcess:
    """The command line, as `groma ARGS`, or with ``prelude`` (Python) run first in the same process."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    if prelude:
        code = prelude + "from groma_core.cli import main; sys.exit(main(sys.argv[1:]))"
        command = [sys.executable, "-c", code, *args]
    else:
        command = [GROMA, *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)


# -- the real quantized model, on the CPU ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def float_model(tok):
    """groma-tiny at width 128, its decoder projections drawn at the scale 1/sqrt(fan_in): at the recipe's 0.02 the
    decoder layers hardly change the logits, and a comparison of logits would not see their quantization."""
    torch.manual_seed(0)
    model = load("groma-tiny", [f"language_backbone.tokenizer={tok}", *WIDE])
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for linear in quantizable_linears(model).values():
            linear.weight.normal_(0, linear.in_features**-0.5, generator=generator)
    return model


@pytest.fixture(scope="module", params=["8bit", "4bit"])
def quantized(request, float_model):
    return request.param, quantize_model(copy.deepcopy(float_model), request.param, "cpu")


@pytest.fixture(scope="module")
def prompt_inputs(float_model):
    """The language backbone's inputs for a few prompts on a few images (the vision stages, which quantization does
    not touch, run once)."""
    from groma_core.prompt import TEMPLATES

    images = [Image.new("RGB", (64, 48), c) for c in [(200, 30, 30), (30, 200, 30), (240, 240, 240)]]
    ids = [float_model.tokenizer.encode(TEMPLATES["llava"].render([(p, None)])) for p in PROMPTS]
    with torch.no_grad():
        return float_model.prepare_inputs(float_model.image_tokenizer.preprocess(images), ids)


@pytest.fixture(scope="module")
def reference_logits(float_model, prompt_inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """The float model's prompt logits, and how far the decoder layers move them: the distance, at each position,
    to the logits of the same model with every decoder layer made the identity."""
    reference = prompt_logits(float_model, prompt_inputs)
    identity = copy.deepcopy(float_model)
    for name, linear in quantizable_linears(identity).items():
        if name.endswith(("o_proj", "down_proj")):  # each layer adds nothing to its residual stream
            nn.init.zeros_(linear.weight)
    return reference, (prompt_logits(identity, prompt_inputs) - reference).norm(dim=-1)


def prompt_logits(model, inputs) -> torch.Tensor:
    """The logits at every real position of the prompts (the last of each: the first greedy step's), (N, vocab)."""
    with torch.no_grad():
        out = model.language_backbone(inputs.inputs_embeds, inputs.attention_mask, inputs.position_ids)
    return out.logits[inputs.attention_mask.bool()].float()


def stored_bytes(layer: nn.Module) -> int:
    """Bytes a quantized decoder projection keeps for its weight: the weight and its quantization scales."""
    weight = layer.weight
    if hasattr(layer, "state"):  # 8-bit: a scale per output row, on the weight until the first forward moves it
        scales = weight.SCB if getattr(weight, "SCB", None) is not None else layer.state.SCB
    else:  # 4-bit: an absmax per block
        scales = weight.quant_state.absmax
    return sum(t.numel() * t.element_size() for t in (weight, scales))


def test_only_the_decoder_layers_projections_are_replaced(tok):
    model = load("groma-tiny", [f"language_backbone.tokenizer={tok}"])
    expected = {f"language_backbone.llm.model.layers.{i}.{p}" for i in range(2) for p in PROJECTIONS}
    assert set(quantizable_linears(model)) == expected  # not lm_head, extra_lm_head, embeddings or vision stages


def test_the_decoder_projections_become_bitsandbytes_layers_stored_in_int8_or_packed_4bit(float_model, quantized):
    import bitsandbytes as bnb

    mode, model = quantized
    originals = quantizable_linears(float_model)
    float_bytes = quantized_bytes = 0
    for name, original in originals.items():
        layer = model.get_submodule(name)
        out_features, in_features = original.weight.shape
        assert layer.weight.device.type == "cpu"
        if mode == "8bit":
            assert type(layer) is bnb.nn.Linear8bitLt
            assert layer.weight.dtype == torch.int8 and layer.weight.shape == (out_features, in_features)
        else:
            assert type(layer) is bnb.nn.Linear4bit
            assert layer.weight.dtype == torch.uint8 and layer.weight.numel() * 2 == out_features * in_features
            assert layer.weight.quant_state.quant_type == "nf4"
        float_bytes += original.weight.numel() * original.weight.element_size()
        quantized_bytes += stored_bytes(layer)
    # float32 -> int8 plus a scale per row (1/4 + 1/128); -> 4 bits plus an absmax per 64 weights (1/8 + 1/64)
    assert quantized_bytes < float_bytes * (0.27 if mode == "8bit" else 0.15)


def test_the_quantized_layers_compute_what_the_float_layers_did(float_model, quantized):
    mode, model = quantized
    x = torch.randn(5, 256, generator=torch.Generator().manual_seed(2))
    for name, original in quantizable_linears(float_model).items():
        inputs = x[:, : original.in_features]
        with torch.no_grad():
            expected, got = original(inputs), model.get_submodule(name)(inputs)
        assert got.dtype == torch.float32 and got.shape == expected.shape
        # LLM.int8() errs by about 1%, NF4 by about 9% on these random weights
        assert (got - expected).norm() / expected.norm() < (0.03 if mode == "8bit" else 0.2), name


def test_everything_but_the_decoder_projections_is_untouched(float_model, quantized):
    _, model = quantized
    replaced = tuple(f"{name}." for name in quantizable_linears(float_model))
    kept = {n: m for n, m in float_model.named_modules() if n and not (n + ".").startswith(replaced)}
    assert {n: type(m) for n, m in model.named_modules() if n in kept} == {n: type(m) for n, m in kept.items()}
    for tensors, quantized_tensors in (
        (float_model.named_parameters(), dict(model.named_parameters())),
        (float_model.named_buffers(), dict(model.named_buffers())),
    ):
        for name, tensor in tensors:
            if not name.startswith(replaced):
                other = quantized_tensors[name]
                assert other.dtype == tensor.dtype and torch.equal(other, tensor), name
    backbone = model.language_backbone
    assert type(backbone.llm.lm_head) is nn.Linear and type(backbone.extra_lm_head) is nn.Linear
    assert type(backbone.llm.get_input_embeddings()) is nn.Embedding and type(backbone.new_input_embs) is nn.Embedding
    assert not any("bitsandbytes" in type(m).__module__ for n, m in model.named_modules() if n in kept)


def test_the_quantized_models_logits_stay_close_to_the_float_models(quantized, prompt_inputs, reference_logits):
    """Measured against what the decoder layers contribute (the logits of the same model with every layer made the
    identity): the quantized logits differ from the float ones by a small part of it. The greedy choices agree at
    most positions, not all: on random weights the top logits are often near ties that even 8-bit rounding swaps."""
    mode, model = quantized
    reference, contribution = reference_logits
    logits = prompt_logits(model, prompt_inputs)
    error = (logits - reference).norm(dim=-1)
    assert logits.shape == reference.shape and torch.isfinite(logits).all()
    # measured here: 8-bit about 2%, 4-bit 15-20% of the decoder's contribution at each position
    assert (error / contribution).median() < (0.06 if mode == "8bit" else 0.35)
    assert (error / contribution).max() < (0.15 if mode == "8bit" else 0.6)
    # measured here: the same argmax at 98% (8-bit) and 69% (4-bit) of the positions
    assert (logits.argmax(-1) == reference.argmax(-1)).float().mean() > (0.85 if mode == "8bit" else 0.5)
    last = prompt_inputs.attention_mask.sum(1).cumsum(0) - 1  # the first greedy step of each prompt
    for i in last.tolist():
        correlation = torch.corrcoef(torch.stack([logits[i], reference[i]]))[0, 1]
        assert correlation > (0.99 if mode == "8bit" else 0.9)


def test_the_quantized_model_answers(quantized, picture):
    _, model = quantized
    answers = Groma(model).answer([Request(str(picture), [(PROMPT, None)])], max_new_tokens=4)
    assert len(answers) == 1 and answers[0].raw_text.strip()
    assert answers[0].image_size == (64, 48)


def test_load_with_quantize_returns_the_quantized_model_on_the_cpu(tok):
    import bitsandbytes as bnb

    model = load("groma-tiny", [f"language_backbone.tokenizer={tok}", *WIDE], quantize="4bit")
    names = [f"language_backbone.llm.model.layers.{i}.{p}" for i in range(2) for p in PROJECTIONS]
    layers = [model.get_submodule(name) for name in names]
    assert all(type(layer) is bnb.nn.Linear4bit and layer.weight.dtype == torch.uint8 for layer in layers)
    assert model.device == torch.device("cpu") and not model.training


def test_ground_with_quantize_8bit_on_the_cpu(tok, picture, tmp_path):
    out = tmp_path / "answer.png"
    model = ["--model", "groma-tiny", "--set", f"language_backbone.tokenizer={tok}"]
    model += [arg for setting in WIDE for arg in ("--set", setting)]
    options = ["--quantize", "8bit", "--device", "cpu", "--max-new-tokens", "4", "--out", str(out)]
    res = run("ground", str(picture), PROMPT, *model, *options)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith(f"{picture}: ") and out.is_file()
    # bitsandbytes' warning on every 8-bit matmul of float32 inputs (cast to float16) is shown once
    assert res.stderr.count("MatMul8bitLt: inputs will be cast") <= 1


# -- where it cannot run: one-line errors ---------------------------------------------------------------------------


def test_an_unknown_value_is_refused_before_anything_is_read():
    for value in ("3bit", "8-bit", "", 8):
        with pytest.raises(InputError, match=r"--quantize .*: unknown value; use 8bit or 4bit"):
            check_quantization(value)
    with pytest.raises(InputError, match="unknown value"):  # not "recipe not found": checked first
        load("no-such-recipe", quantize="int8")


def test_cuda_and_the_cpu_are_accepted_other_devices_are_refused_first(monkeypatch):
    check_quantization("8bit", "cpu")
    check_quantization("4bit", "cpu")
    with pytest.raises(GromaError) as err:
        check_quantization("8bit", "mps")
    assert str(err.value) == "--quantize 8bit: 8-bit/4-bit loading needs a CUDA device (or the CPU); got mps"
    monkeypatch.setattr(quantization, "_bitsandbytes_version", lambda: "0.45.5")
    with pytest.raises(GromaError) as err:  # the device is still what is said first
        check_quantization("4bit", "mps")
    assert "got mps" in str(err.value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    check_quantization("8bit", "cuda")  # an older bitsandbytes does on CUDA


@NO_CUDA
def test_cuda_asked_for_on_a_machine_without_it():
    with pytest.raises(GromaError) as err:
        check_quantization("4bit", "cuda")
    assert str(err.value) == "--quantize 4bit: 8-bit/4-bit loading needs a CUDA device; CUDA is not available here"


def test_on_the_cpu_a_bitsandbytes_without_a_cpu_backend_is_refused(monkeypatch):
    monkeypatch.setattr(quantization, "_bitsandbytes_version", lambda: "0.45.5")
    with pytest.raises(GromaError) as err:
        check_quantization("8bit", "cpu")
    assert str(err.value) == (
        "--quantize 8bit on the CPU needs bitsandbytes >= 0.50 (installed: 0.45.5); upgrade it with "
        "`pip install -U bitsandbytes`, or use a CUDA device"
    )
    monkeypatch.setattr(quantization, "_bitsandbytes_version", lambda: "0.50.0.dev0")
    check_quantization("8bit", "cpu")


def test_without_bitsandbytes_the_message_says_how_to_install_it(tok):
    code = HIDE_BNB + (
        "from groma_core.api import load; from groma_core.errors import GromaError\n"
        "for call in (lambda: load('groma-tiny', ['language_backbone.tokenizer=' + sys.argv[1]], quantize='8bit'),\n"
        "             lambda: __import__('groma_core.quantization').quantization.check_quantization('4bit', 'cpu')):\n"
        "    try:\n        call()\n    except GromaError as exc:\n        print(exc)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    res = subprocess.run([sys.executable, "-c", code, str(tok)], capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == [BNB_MESSAGE, BNB_MESSAGE.replace("8bit", "4bit")]


def test_ground_chat_and_eval_without_bitsandbytes_fail_in_one_line_with_exit_code_2(tok, picture, tmp_path):
    out = tmp_path / "answer.png"
    model = ["--model", "groma-tiny", "--set", f"language_backbone.tokenizer={tok}", "--device", "cpu"]
    res = run("ground", str(picture), PROMPT, *model, "--out", str(out), "--quantize", "8bit", prelude=HIDE_BNB)
    assert res.returncode == 2
    assert res.stderr.splitlines() == [f"groma: error: {BNB_MESSAGE}"] and res.stdout == ""
    assert not out.exists()
    bench = ["--ann", "a.json", "--images", str(tmp_path), "--out", str(tmp_path / "ev")]
    res = run("eval", "rec", *bench, *model, "--quantize", "8bit", prelude=HIDE_BNB)
    assert res.returncode == 2 and res.stderr.splitlines() == [f"groma: error: {BNB_MESSAGE}"]
    assert not (tmp_path / "ev").exists()
    res = run("chat", str(picture), *model, "--quantize", "4bit", prelude=HIDE_BNB)
    assert res.returncode == 2 and res.stderr.splitlines() == [f"groma: error: {BNB_MESSAGE.replace('8bit', '4bit')}"]


def test_the_option_is_on_the_commands_that_load_a_model():
    parser = build_parser()
    for argv in (["ground", "x.png", "hi"], ["chat", "x.png"], ["eval", "rec", "--ann", "a", "--images", "i"]):
        assert parser.parse_args([*argv, "--quantize", "4bit"]).quantize == "4bit"
        assert parser.parse_args(argv).quantize is None


def test_an_unknown_value_on_the_command_line_is_a_usage_error(picture):
    res = run("ground", str(picture), "hi", "--model", "groma-tiny", "--quantize", "3bit")
    assert res.returncode == 2 and "argument --quantize: invalid choice: '3bit'" in res.stderr
