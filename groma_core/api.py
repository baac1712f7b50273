"""Building a pipeline from a recipe, and loading one from a checkpoint directory."""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from groma_core.errors import CheckpointError, GromaError, RecipeError, echo, one_line
from groma_core.model import GromaModel
from groma_core.plugins import PluginManager
from groma_core.quantization import check_quantization, quantize_model
from groma_core.recipe import Recipe, is_path_option, load_recipe
from groma_core.stages import BuildContext, empty_parameters

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

WEIGHTS_INDEX = "model.safetensors.index.json"
"""The index of a sharded checkpoint (``groma convert`` writes it): which file holds each tensor."""
WEIGHTS_SINGLE = "model.safetensors"
"""The weights file of an unsharded checkpoint directory (training's ``final``, the embedded model)."""


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA, then MPS, then CPU; an unavailable device is a clear error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise GromaError(f"--device {echo(name)}: unknown device; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type not in ("cpu", "cuda", "mps"):
        raise GromaError(f"--device {echo(name)}: unsupported device type; use auto, cpu, cuda, cuda:N or mps")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise GromaError(f"device {echo(name)} asked for, but CUDA is not available on this machine (use --device cpu)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise GromaError(
            f"device {echo(name)} asked for, but this machine has {torch.cuda.device_count()} CUDA device(s) "
            f"(cuda:0..cuda:{torch.cuda.device_count() - 1})"
        )
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise GromaError(f"device {echo(name)} asked for, but MPS is not available on this machine (use --device cpu)")
    return device


def build(
    recipe: Recipe | str | Path,
    overrides: Sequence[str] = (),
    manager: PluginManager | None = None,
    *,
    quantize: str | None = None,
) -> GromaModel:
    """Build the pipeline a recipe describes (stages in the design's order), with freshly initialised weights
    unless the recipe names ``weights``; returned in the recipe's dtype, on CPU (move it with ``.to()``).
    ``quantize="8bit"`` or ``"4bit"``: the language model's decoder layers are loaded in 8 or 4 bits through
    bitsandbytes and the model is returned on the device ``auto`` picks (made for CUDA; the CPU works, slowly, with
    bitsandbytes >= 0.50; see :mod:`groma_core.quantization`; checked before any weight is read)."""
    if quantize is not None:
        check_quantization(quantize)
    manager = manager or PluginManager()
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe, overrides, manager)
    weights = recipe.weights_path()
    if weights is not None and (recipe.core.partial_weights or recipe.core.weights_exclude):
        model = _construct(recipe, manager)
        load_weights(model, weights, partial=recipe.core.partial_weights, exclude=recipe.core.weights_exclude)
    elif weights is not None:
        with empty_parameters():
            model = _construct(recipe, manager)
        load_weights(model, weights)
    else:
        model = _construct(recipe, manager)
    model = model.to(DTYPES[recipe.core.dtype])
    return quantize_model(model, quantize) if quantize is not None else model


def _resolved_options(recipe: Recipe, kind: str):
    """The stage's options with relative path options resolved against the recipe file's directory, so that a
    checkpoint directory can be moved as a whole (a path that does not exist there is left as given)."""
    options = recipe.stages[kind].options
    if recipe.base_dir is None:
        return options
    updates = {}
    for name in type(options).model_fields:
        value = getattr(options, name, None)
        if not (isinstance(value, str) and value and is_path_option(type(options), name)):
            continue
        if not Path(os.path.expanduser(value)).is_absolute() and (recipe.base_dir / value).exists():
            updates[name] = str(recipe.base_dir / value)
    return options.model_copy(update=updates) if updates else options


def _construct(recipe: Recipe, manager: PluginManager) -> GromaModel:
    """The stages in the design's order; random initialisation is seeded by the recipe, without touching the
    caller's random state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.core.init_seed)
        return _construct_stages(recipe, manager)


def _construct_stages(recipe: Recipe, manager: PluginManager) -> GromaModel:
    ctx = BuildContext(source=recipe.source)

    def make(kind: str):
        return manager.build(kind, recipe.stages[kind].plugin, _resolved_options(recipe, kind), ctx)

    image_tokenizer = make("image_tokenizer")
    ctx.level_channels = dict(image_tokenizer.level_channels)
    ctx.level_sizes = dict(image_tokenizer.level_sizes)
    ctx.token_dim = image_tokenizer.token_dim
    ctx.image_size = tuple(image_tokenizer.image_size)
    backbone = make("language_backbone")
    ctx.hidden_size = backbone.hidden_size
    proposer = make("region_proposer")
    encoder = make("region_encoder")
    tokenizer = getattr(backbone, "tokenizer", None)
    n_region_tokens = len(getattr(tokenizer, "region_ids", ()))
    if tokenizer is not None and recipe.core.region_selection.max_regions > n_region_tokens:
        raise RecipeError(
            recipe.source,
            [
                f"region_selection.max_regions: {recipe.core.region_selection.max_regions} regions, but the tokenizer "
                f"has {n_region_tokens} region tokens (<r0>..<r{n_region_tokens - 1}>); at most {n_region_tokens}"
            ],
        )
    model = GromaModel(
        image_tokenizer,
        proposer,
        encoder,
        backbone,
        recipe.core.region_selection,
        recipe.core.template,
        index_region_tokens=recipe.core.index_region_tokens,
        region_pointer=recipe.core.region_pointer,
        region_pointer_box=recipe.core.region_pointer_box,
        region_pointer_words=recipe.core.region_pointer_words,
        region_pointer_phrase=recipe.core.region_pointer_phrase,
        region_pointer_relation=recipe.core.region_pointer_relation,
    )
    model.recipe = recipe
    return model


def read_weight_map(index: Path) -> dict[str, str]:
    """The ``weight_map`` (tensor name -> file name) of a sharded checkpoint's index file (the Hugging Face layout,
    ``*.index.json``), checked to be a JSON object mapping names to non-empty file names."""
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{index}: not a valid index file ({one_line(exc, 200)})") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and v for k, v in weight_map.items()
    ):
        raise CheckpointError(
            f"{index}: not a valid index file (expected a JSON object whose weight_map maps tensor names to file "
            "names)"
        )
    return weight_map


def weight_index(path: Path) -> dict[str, str] | None:
    """The tensor -> file map of a checkpoint directory's :data:`WEIGHTS_INDEX` (None when it has none), checked:
    a JSON object whose ``weight_map`` maps names to files of that directory that exist."""
    index = path / WEIGHTS_INDEX
    if not index.is_file():
        return None
    weight_map = read_weight_map(index)
    for name in dict.fromkeys(weight_map.values()):
        if Path(name).name != name or not name.endswith(".safetensors"):  # a file of this folder, nowhere else
            raise CheckpointError(f"{index}: {echo(name)} is not the name of a .safetensors file of {path}")
        if not (path / name).is_file():
            raise CheckpointError(f"{index}: lists {echo(name)}, which is missing")
    return weight_map


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a weights location: a file; or in a directory, the files its
    :data:`WEIGHTS_INDEX` lists, else its :data:`WEIGHTS_SINGLE`, else its one ``*.safetensors`` file. Never a
    glob over several files: shards a conversion left behind must not mix with the checkpoint's own."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise CheckpointError(f"{path}: weights not found")
    index = weight_index(path)
    if index is not None:
        return [path / name for name in dict.fromkeys(index.values())]
    if (path / WEIGHTS_SINGLE).is_file():
        return [path / WEIGHTS_SINGLE]
    files = sorted(path.glob("*.safetensors"))
    if len(files) == 1:
        return files
    if not files:
        raise CheckpointError(f"{path}: no .safetensors files in this directory")
    raise CheckpointError(
        f"{path}: {len(files)} .safetensors files but no {WEIGHTS_INDEX} to say which hold this checkpoint "
        f"({', '.join(f.name for f in files[:4])}{' ...' if len(files) > 4 else ''})"
    )


def load_weights(
    model: nn.Module,
    path: str | Path,
    partial: bool = False,
    exclude: Sequence[str] = (),
    subset: bool = False,
    assign: bool = True,
) -> list[str]:
    """Load safetensors weights (memory-mapped) into ``model`` and return the names loaded; missing, unknown or
    misshapen tensors are errors that name them. ``partial``: stages (top-level modules) absent from the weights
    keep their values; a stage that is present must be complete. ``exclude``: top-level modules whose tensors are
    skipped and which keep their values. ``subset``: any subset of the model's tensors (a training checkpoint that
    holds only the trained ones); the others keep their values. ``assign``: the model takes the file's tensors
    (memory-mapped, no copy: loading a model); false copies them into the model's own (resuming training, where
    the optimizer holds the parameters)."""
    from safetensors import SafetensorError, safe_open

    expected = {k: v for k, v in model.state_dict(keep_vars=True).items()}
    state: dict[str, torch.Tensor] = {}
    path = Path(path)
    index = weight_index(path) if path.is_dir() else None
    for file in weight_files(path):
        try:
            with safe_open(str(file), framework="pt") as f:  # memory-mapped, one tensor at a time
                held = list(f.keys())
                keys = held if index is None else [k for k, name in index.items() if name == file.name]
                absent = sorted(set(keys) - set(held))
                if absent:
                    raise CheckpointError(
                        f"{path / WEIGHTS_INDEX}: lists {len(absent)} tensor(s) in {file.name} that it does not hold "
                        f"({', '.join(absent[:4])}{' ...' if len(absent) > 4 else ''}); the index and the shards "
                        "do not belong together"
                    )
                for key in keys:
                    state[key] = f.get_tensor(key)
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{file}: cannot read safetensors file ({one_line(exc, 200)})") from None
    if exclude:
        excluded = set(exclude)
        state = {k: v for k, v in state.items() if k.split(".", 1)[0] not in excluded}
        expected = {k: v for k, v in expected.items() if k.split(".", 1)[0] not in excluded}
    unknown = sorted(set(state) - set(expected))
    if subset:
        expected = {k: v for k, v in expected.items() if k in state}
    elif partial:
        covered = {k.split(".", 1)[0] for k in state}
        expected = {k: v for k, v in expected.items() if k.split(".", 1)[0] in covered}
    missing = sorted(set(expected) - set(state))
    wrong = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in state
        if k in expected and tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    wrong_dtype = [
        f"{k}: checkpoint {state[k].dtype} vs model {expected[k].dtype}"
        for k in state
        if k in expected and _dtype_kind(state[k].dtype) != _dtype_kind(expected[k].dtype)
    ]
    problems = []
    if missing:
        problems.append(
            f"{len(missing)} missing tensor(s): {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}"
        )
    if unknown:
        problems.append(
            f"{len(unknown)} unknown tensor(s): {', '.join(unknown[:8])}{' ...' if len(unknown) > 8 else ''}"
        )
    if wrong:
        problems.append("wrong shape: " + "; ".join(wrong[:8]))
    if wrong_dtype:
        problems.append("wrong kind of dtype: " + "; ".join(wrong_dtype[:8]))
    if problems:
        raise CheckpointError(f"{path}: " + " | ".join(problems))
    try:
        model.load_state_dict(state, strict=not (partial or exclude or subset), assign=assign)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: cannot load the tensors ({one_line(exc, 300)})") from None
    return sorted(state)


def _dtype_kind(dtype: torch.dtype) -> str:
    """The kind of a dtype (float, complex, bool or int): tensors load into parameters and buffers of their kind."""
    if dtype.is_floating_point:
        return "float"
    if dtype.is_complex:
        return "complex"
    return "bool" if dtype == torch.bool else "int"


#: the embedded default model: a tiny Groma trained on the synthetic shapes data (``recipes/shapes-tiny.yaml``),
#: shipped inside the package so that ``load()`` and the CLI work with nothing downloaded
DEFAULT_MODEL = Path(__file__).resolve().parent / "default_model"


def default_model() -> Path:
    """The folder of the embedded default model (a checkpoint directory: recipe, weights, tokenizer)."""
    if not (DEFAULT_MODEL / "recipe.yaml").is_file() or not (DEFAULT_MODEL / "model.safetensors").is_file():
        raise CheckpointError(
            f"{DEFAULT_MODEL}: the embedded default model is missing from this installation (a source checkout "
            "without its files?); pass a model explicitly"
        )
    return DEFAULT_MODEL


def load(
    model: str | Path | None = None,
    overrides: Sequence[str] = (),
    manager: PluginManager | None = None,
    *,
    quantize: str | None = None,
    dtype: str | None = None,
    convert_overrides: Sequence[str] = (),
) -> GromaModel:
    """Load a model from a checkpoint directory (one holding ``recipe.yaml`` and safetensors weights, as written
    by ``groma convert`` or training), a recipe file / shipped recipe name, a Hugging Face Hub repo id
    (``org/name`` or ``org/name@revision``: a groma-core model folder, or a reference Groma release converted once
    into the cache, see :mod:`groma_core.hub`), or, when ``model`` is None, the embedded default model
    (:data:`DEFAULT_MODEL`). A local path that exists always wins over a Hub id. ``quantize``: "8bit" or "4bit"
    language model layers (CUDA, or CPU) through bitsandbytes (see :func:`build`). ``dtype``: float32, float16 or
    bfloat16, the dtype of the returned model and of a Hub release's cached conversion (default: the recipe's; a
    release keeps the dtype it was saved in). ``convert_overrides``: ``key.sub=value`` changes made when a Hub
    release is converted (as ``groma convert --set``), for settings its config.json cannot express."""
    if dtype is not None and dtype not in DTYPES:
        raise GromaError(f"dtype {echo(dtype)}: expected one of {', '.join(DTYPES)}")
    overrides = [*overrides, f"dtype={dtype}"] if dtype else list(overrides)
    path = model_location(model, dtype, convert_overrides)
    if path.is_dir():
        recipe_file = path / "recipe.yaml"
        if not recipe_file.is_file():
            raise CheckpointError(f"{path}: not a groma-core checkpoint directory (no recipe.yaml)")
        return build(recipe_file, overrides, manager, quantize=quantize).eval()
    return build(path if path.suffix else str(path), overrides, manager, quantize=quantize).eval()


def model_location(
    model: str | Path | None, dtype: str | None = None, convert_overrides: Sequence[str] = ()
) -> Path:
    """Where :func:`load` reads ``model`` from: the embedded default for None, the local folder of a Hub id (a
    reference release converted into the cache in ``dtype`` now, if it was not before), else the path as given (a
    model folder, a recipe file or a shipped recipe name)."""
    from groma_core.hub import parse_hub_id, resolve_hub_model

    hub_id = parse_hub_id(model)
    if hub_id is not None:
        return resolve_hub_model(hub_id, dtype, tuple(convert_overrides))
    return default_model() if model is None else Path(model)


#: bytes per decoder weight once quantized (bitsandbytes: int8; nf4 two per byte plus a float32 scale per 64)
QUANTIZED_BYTES = {"8bit": 1.0, "4bit": 0.5 + 4 / 64}
_STORED_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
_DECODER_WEIGHT = re.compile(r"^language_backbone\..*\.layers\.\d+\..*\.weight$")


def folder_dtype(folder: Path) -> str:
    """The dtype a model folder loads in: its recipe.yaml's ``dtype`` (float32 when it names none)."""
    import yaml

    recipe = folder / "recipe.yaml"
    data = yaml.safe_load(recipe.read_text()) if recipe.is_file() else None
    return data["dtype"] if isinstance(data, dict) and data.get("dtype") in DTYPES else "float32"


def weights_bytes(folder: Path, dtype: str | None = None, quantize: str | None = None) -> int:
    """About the memory the weights of a model folder take once loaded: each floating tensor in ``dtype`` (None: the
    dtype its recipe.yaml names, as :func:`load` does), the language model's decoder matrices at
    :data:`QUANTIZED_BYTES` with ``quantize``. Read from the safetensors headers alone."""
    from safetensors import safe_open

    dtype = dtype or folder_dtype(folder)
    total = 0.0
    for file in weight_files(folder):
        with safe_open(file, "pt") as handle:
            for name in handle.keys():
                tensor = handle.get_slice(name)
                shape, stored = tensor.get_shape(), tensor.get_dtype()
                count = math.prod(shape)
                floating = stored in ("F64", "F32", "F16", "BF16")
                if quantize and floating and len(shape) == 2 and _DECODER_WEIGHT.match(name):
                    total += count * QUANTIZED_BYTES[quantize]
                elif floating:
                    total += count * DTYPES[dtype].itemsize
                else:
                    total += count * _STORED_BYTES.get(stored, 4)
    return int(total)


def free_memory(device: torch.device) -> int | None:
    """Bytes free on ``device`` now: CUDA's free memory, the host's available memory for the CPU; None where it cannot
    be read (MPS, a host without /proc/meminfo)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type == "cpu":
        try:
            for line in Path("/proc/meminfo").read_text().splitlines():
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            return None
    return None


def memory_check(needed: int, free: int | None, device: torch.device, what: str) -> str:
    """The line saying what loading needs (``what``: e.g. "in bfloat16") against what ``device`` has; a
    :class:`GromaError` when the weights alone do not fit."""
    line = f"the weights need about {_gib(needed)} {what} on {device}"
    if free is None:
        return line
    if needed > free:
        raise GromaError(
            f"{line}, but only {_gib(free)} is free there: use --quantize 8bit or 4bit, a 16-bit --dtype, or a "
            "larger device"
        )
    return f"{line} ({_gib(free)} free)"


def _gib(n: int) -> str:
    return f"{n / 1024**3:.1f} GiB" if n >= 1024**3 else f"{n / 1024**2:.1f} MiB"
