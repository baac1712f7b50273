"""Building a pipeline from a recipe, and loading one from a checkpoint directory."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import nn

from groma_core.errors import CheckpointError, GromaError
from groma_core.model import GromaModel
from groma_core.plugins import PluginManager
from groma_core.quantization import check_quantization, quantize_model
from groma_core.recipe import Recipe, load_recipe
from groma_core.stages import BuildContext

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


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
    except (RuntimeError, TypeError):
        raise GromaError(f"--device {name!r}: unknown device; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type not in ("cpu", "cuda", "mps"):
        raise GromaError(f"--device {name!r}: unsupported device type; use auto, cpu, cuda, cuda:N or mps")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise GromaError(f"device {name!r} asked for, but CUDA is not available on this machine (use --device cpu)")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise GromaError(f"device {name!r} asked for, but MPS is not available on this machine (use --device cpu)")
    return device


@contextlib.contextmanager
def empty_parameters() -> Iterator[None]:
    """Create parameters on the ``meta`` device (buffers stay real), so that weights loaded afterwards with
    ``load_state_dict(..., assign=True)`` are never initialised first."""
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


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


PATH_OPTIONS = ("pretrained", "tokenizer")


def _is_path_option(options, name: str) -> bool:
    """``pretrained``, ``tokenizer``, or a field declared with ``Field(json_schema_extra={"path": True})``."""
    extra = type(options).model_fields[name].json_schema_extra
    return name in PATH_OPTIONS or (isinstance(extra, dict) and bool(extra.get("path")))


def _resolved_options(recipe: Recipe, kind: str):
    """The stage's options with relative path options resolved against the recipe file's directory, so that a
    checkpoint directory can be moved as a whole (a path that does not exist there is left as given)."""
    options = recipe.stages[kind].options
    if recipe.base_dir is None:
        return options
    updates = {}
    for name in type(options).model_fields:
        value = getattr(options, name, None)
        if not (isinstance(value, str) and value and _is_path_option(options, name)):
            continue
        if not Path(value).expanduser().is_absolute() and (recipe.base_dir / value).exists():
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
    model = GromaModel(image_tokenizer, proposer, encoder, backbone, recipe.core.region_selection, recipe.core.template)
    model.recipe = recipe
    return model


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a weights location (one file, or every ``*.safetensors`` of a directory)."""
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        if files:
            return files
        raise CheckpointError(f"{path}: no .safetensors files in this directory")
    raise CheckpointError(f"{path}: weights not found")


def load_weights(model: nn.Module, path: str | Path, partial: bool = False, exclude: Sequence[str] = ()) -> None:
    """Load safetensors weights (memory-mapped) into ``model``; missing, unknown or misshapen tensors are errors
    that name them. ``partial``: stages (top-level modules) absent from the weights keep their values; a stage
    that is present must be complete. ``exclude``: top-level modules whose tensors are skipped and which keep their
    values."""
    from safetensors import SafetensorError, safe_open

    expected = {k: v for k, v in model.state_dict(keep_vars=True).items()}
    state: dict[str, torch.Tensor] = {}
    for file in weight_files(Path(path)):
        try:
            with safe_open(str(file), framework="pt") as f:  # memory-mapped, one tensor at a time
                for key in f.keys():
                    state[key] = f.get_tensor(key)
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{file}: cannot read safetensors file ({exc})") from None
    if exclude:
        excluded = set(exclude)
        state = {k: v for k, v in state.items() if k.split(".", 1)[0] not in excluded}
        expected = {k: v for k, v in expected.items() if k.split(".", 1)[0] not in excluded}
    unknown = sorted(set(state) - set(expected))
    if partial:
        covered = {k.split(".", 1)[0] for k in state}
        expected = {k: v for k, v in expected.items() if k.split(".", 1)[0] in covered}
    missing = sorted(set(expected) - set(state))
    wrong = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in state
        if k in expected and tuple(state[k].shape) != tuple(expected[k].shape)
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
    if problems:
        raise CheckpointError(f"{path}: " + " | ".join(problems))
    model.load_state_dict(state, strict=not (partial or exclude), assign=True)


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
) -> GromaModel:
    """Load a model from a checkpoint directory (one holding ``recipe.yaml`` and safetensors weights, as written
    by ``groma convert`` or training), a recipe file / shipped recipe name, or, when ``model`` is None, the
    embedded default model (:data:`DEFAULT_MODEL`). ``quantize``: "8bit" or "4bit" language model layers (CUDA, or CPU)
    through bitsandbytes (see :func:`build`)."""
    path = default_model() if model is None else Path(model)
    if path.is_dir():
        recipe_file = path / "recipe.yaml"
        if not recipe_file.is_file():
            raise CheckpointError(f"{path}: not a groma-core checkpoint directory (no recipe.yaml)")
        return build(recipe_file, overrides, manager, quantize=quantize).eval()
    return build(path if path.suffix else str(path), overrides, manager, quantize=quantize).eval()
