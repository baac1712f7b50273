"""8-bit and 4-bit loading of the language model through bitsandbytes: on a CUDA device (the target), or on the CPU.

After the weights are loaded, every ``nn.Linear`` of the language backbone's decoder (for LLaMA / Vicuna: the
attention's q/k/v/o and the MLP's gate/up/down projections of every layer) is replaced by a bitsandbytes layer
holding the same weights: ``Linear8bitLt`` (LLM.int8(), outlier threshold 6.0) for ``"8bit"``, ``Linear4bit`` (NF4,
computing in the model's dtype) for ``"4bit"``. Moving the model to its device quantizes them (bitsandbytes quantizes
a layer's weight when it first moves to a device). The output head, the embeddings, Groma's new-token tables and the
vision stages keep their dtype.

CUDA is what 8-bit/4-bit loading is for (the memory of a 7B model on one GPU). bitsandbytes >= 0.50
(:data:`MIN_CPU_BITSANDBYTES`) also runs these layers on the CPU, slowly: that is allowed too, and it is how the
tests run the real quantized path on machines without a GPU. Other devices (MPS) are refused.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import re
from types import ModuleType
from typing import TYPE_CHECKING

import torch
from torch import nn

from groma_core.errors import GromaError, InputError
from groma_core.stages import empty_parameters, module_dtype

if TYPE_CHECKING:
    from groma_core.model import GromaModel

QUANTIZE_MODES = ("8bit", "4bit")
INT8_OUTLIER_THRESHOLD = 6.0  #: LLM.int8()'s outlier threshold (the paper's, and transformers' default)
#: the oldest bitsandbytes accepted on the CPU: its CPU backend runs ``Linear8bitLt`` and ``Linear4bit`` (the tests
#: run them with 0.50.2, the pinned version; releases before 0.50 are not tried)
MIN_CPU_BITSANDBYTES = (0, 50)
#: the bitsandbytes loggers whose warnings come again and again (every 8-bit matmul on float32/bfloat16 inputs
#: says they are cast to float16): each different message is shown once per process
_CHATTY_LOGGERS = ("bitsandbytes.autograd._functions", "bitsandbytes.nn.modules", "bitsandbytes.backends.cpu.ops")


def _not_installed(mode: str) -> GromaError:
    return GromaError(f"--quantize {mode}: bitsandbytes is not installed; install it with `pip install bitsandbytes`")


def _device(device: torch.device | str | None) -> torch.device:
    """``device``, or the one ``auto`` picks (CUDA, else MPS, else CPU)."""
    from groma_core.api import resolve_device  # api builds on this module

    return resolve_device("auto") if device is None else torch.device(device)


def _bitsandbytes_version() -> str:
    """The installed bitsandbytes' version, read from its package metadata (without importing it), else from the
    module; "unknown" if neither says."""
    try:
        return importlib.metadata.version("bitsandbytes")
    except importlib.metadata.PackageNotFoundError:  # e.g. a source tree on sys.path
        try:
            return str(_import_bitsandbytes("8bit").__version__)
        except (GromaError, AttributeError):
            return "unknown"


def _version_tuple(version: str) -> tuple[int, int]:
    match = re.match(r"(\d+)\.(\d+)", version)
    return (int(match[1]), int(match[2])) if match else (0, 0)


def check_quantization(mode: str, device: torch.device | str | None = None) -> None:
    """Raise a one-line error unless ``mode`` ("8bit" or "4bit") can be used on ``device`` (default: the device
    ``auto`` picks). Checked in this order: the value; the device (CUDA, available here, or the CPU; on any other,
    installing bitsandbytes would not help, so that is said first); bitsandbytes installed; on the CPU, a
    bitsandbytes with a CPU backend (:data:`MIN_CPU_BITSANDBYTES`)."""
    if not isinstance(mode, str) or mode not in QUANTIZE_MODES:
        raise InputError(f"--quantize {mode!r}: unknown value; use 8bit or 4bit (or leave it out for full precision)")
    device = _device(device)
    if device.type not in ("cuda", "cpu"):
        raise GromaError(f"--quantize {mode}: 8-bit/4-bit loading needs a CUDA device (or the CPU); got {device}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise GromaError(f"--quantize {mode}: 8-bit/4-bit loading needs a CUDA device; CUDA is not available here")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise _not_installed(mode)
    if device.type == "cpu":
        version = _bitsandbytes_version()
        if _version_tuple(version) < MIN_CPU_BITSANDBYTES:
            need = ".".join(map(str, MIN_CPU_BITSANDBYTES))
            raise GromaError(
                f"--quantize {mode} on the CPU needs bitsandbytes >= {need} (installed: {version}); upgrade it with "
                "`pip install -U bitsandbytes`, or use a CUDA device"
            )


def quantizable_linears(model: GromaModel) -> dict[str, nn.Linear]:
    """The layers that 8-bit/4-bit loading replaces, by their name in ``model``: the plain ``nn.Linear`` modules of the
    language backbone's decoder (``language_backbone.llm.base_model``); never the output head, the embeddings,
    Groma's new-token tables (``new_input_embs``, ``extra_lm_head``) or the vision stages."""
    backbone = model.language_backbone
    llm = getattr(backbone, "llm", None)
    decoder = getattr(llm, "base_model", None)
    if not isinstance(decoder, nn.Module):
        raise GromaError(
            f"--quantize: the language backbone {type(backbone).__name__} has no transformers model `llm` whose "
            "decoder layers could be quantized"
        )
    head = llm.get_output_embeddings() if hasattr(llm, "get_output_embeddings") else None
    names = {id(m): name for name, m in model.named_modules()}
    prefix = names[id(decoder)]
    found = {f"{prefix}.{name}": m for name, m in decoder.named_modules() if type(m) is nn.Linear and m is not head}
    if not found:
        raise GromaError(f"--quantize: the language backbone {type(backbone).__name__} has no nn.Linear decoder layers")
    return found


class _OncePerMessage(logging.Filter):
    """Let each different message through once."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message in self.seen:
            return False
        self.seen.add(message)
        return True


def _quiet_repeats() -> None:
    for name in _CHATTY_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _OncePerMessage) for f in logger.filters):
            logger.addFilter(_OncePerMessage())


def _import_bitsandbytes(mode: str) -> ModuleType:
    _quiet_repeats()  # before the import: its CPU backend may already warn then
    try:
        import bitsandbytes
    except ImportError as exc:
        if importlib.util.find_spec("bitsandbytes") is None:
            raise _not_installed(mode) from None
        raise GromaError(f"--quantize {mode}: bitsandbytes is installed but cannot be imported ({exc})") from None
    except (OSError, RuntimeError) as exc:  # e.g. no native library for this CUDA version
        raise GromaError(f"--quantize {mode}: bitsandbytes cannot be loaded on this machine ({exc})") from None
    return bitsandbytes


def _quantized_linear(linear: nn.Linear, mode: str, compute_dtype: torch.dtype, bnb: ModuleType) -> nn.Module:
    """A bitsandbytes layer holding ``linear``'s weights (still unquantized: moving it to its device quantizes
    them)."""
    has_bias = linear.bias is not None
    with empty_parameters():  # the weights are the loaded ones: no throw-away random initialisation
        if mode == "8bit":
            layer = bnb.nn.Linear8bitLt(
                linear.in_features,
                linear.out_features,
                bias=has_bias,
                has_fp16_weights=False,
                threshold=INT8_OUTLIER_THRESHOLD,
            )
        else:
            layer = bnb.nn.Linear4bit(
                linear.in_features, linear.out_features, bias=has_bias, compute_dtype=compute_dtype, quant_type="nf4"
            )
    if mode == "8bit":
        layer.weight = bnb.nn.Int8Params(linear.weight.data, requires_grad=False, has_fp16_weights=False)
    else:
        layer.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, quant_type="nf4", module=layer)
    if has_bias:
        layer.bias = nn.Parameter(linear.bias.data, requires_grad=False)
    layer.train(linear.training)
    return layer


def quantize_model(model: GromaModel, mode: str, device: torch.device | str | None = None) -> GromaModel:
    """Replace the language backbone's decoder ``nn.Linear`` layers (see :func:`quantizable_linears`) by bitsandbytes
    8-bit or 4-bit layers and move ``model`` to ``device`` (default: the device ``auto`` picks; CUDA, or the CPU, see
    :func:`check_quantization`), which quantizes them; returns ``model``. Call it after the weights are loaded and the
    model cast to its dtype."""
    device = _device(device)
    check_quantization(mode, device)
    bnb = _import_bitsandbytes(mode)
    compute_dtype = module_dtype(model.language_backbone)
    for name, linear in quantizable_linears(model).items():
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, _quantized_linear(linear, mode, compute_dtype, bnb))
    return model.to(device)
