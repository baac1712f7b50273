"""Recipes: YAML files that name a plugin and its options for each stage, validated before anything is built.

Every problem of a recipe is reported at once, each with its dotted path in the file, a "did you mean" where a close
name exists, and the installed plugin names for an unknown plugin.
"""

from __future__ import annotations

import difflib
import os
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from groma_core.errors import PluginConflictError, RecipeError, UnknownPluginError
from groma_core.plugins import PluginManager
from groma_core.selection import SelectionConfig
from groma_core.stages import STAGE_KINDS
from groma_core.training.datasets import RecipeTraining

STAGE_SECTIONS = tuple(STAGE_KINDS)  # image_tokenizer, region_proposer, region_encoder, language_backbone


class GenerationConfig(BaseModel):
    """Decoding defaults (the reference decodes greedily with up to 1024 new tokens)."""

    model_config = ConfigDict(extra="forbid")

    max_new_tokens: int = Field(1024, ge=1, description="stop after this many new tokens")
    do_sample: bool = Field(False, description="sample instead of greedy decoding")
    temperature: float = Field(1.0, gt=0, description="sampling temperature")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling mass")
    top_k: int = Field(0, ge=0, description="sample among the k best tokens (0: all)")


class CoreRecipe(BaseModel):
    """The recipe fields that belong to groma-core (the stage sections are validated by their plugins)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field("", description="short name of the model")
    description: str = Field("", description="one-line purpose, shown by `groma recipes`")
    dtype: Literal["float32", "float16", "bfloat16"] = Field("float32", description="parameter dtype")
    device: str = Field("auto", description="auto, cpu, cuda, cuda:N or mps")
    weights: str | None = Field(None, description="safetensors file or directory, relative to the recipe file")
    init_seed: int = Field(0, description="seed of the random initialisation of weights not loaded from files")
    weights_exclude: list[
        Literal["image_tokenizer", "region_proposer", "region_encoder", "language_backbone", "image_projector"]
    ] = Field(
        default_factory=list,
        description="parts whose tensors in `weights` are ignored, keeping their own initialisation (e.g. a swapped "
        "proposer with its own pretrained weights next to converted Groma weights)",
    )
    partial_weights: bool = Field(
        False,
        description="the weights cover only some stages (e.g. a detector-only checkpoint); the others keep their "
        "own initialisation, such as their `pretrained` directories",
    )
    template: Literal["llava", "default"] = Field("llava", description="conversation template")
    region_selection: SelectionConfig = Field(default_factory=SelectionConfig)
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    train: RecipeTraining | None = Field(
        None,
        description="training stages and the datasets they read (`groma train`); dataset paths are checked only "
        "when training starts",
    )


@dataclass
class StageChoice:
    """One validated stage section: the plugin name and its options instance."""

    plugin: str
    options: BaseModel


@dataclass
class Recipe:
    """A validated recipe."""

    core: CoreRecipe
    stages: dict[str, StageChoice]
    source: str = "<recipe>"
    base_dir: Path | None = None
    raw: dict[str, Any] = field(default_factory=dict)

    def weights_path(self) -> Path | None:
        """The weights location, resolved against the recipe file's directory."""
        if not self.core.weights:
            return None
        p = Path(os.path.expanduser(self.core.weights))
        return p if p.is_absolute() or self.base_dir is None else self.base_dir / p

    def to_dict(self) -> dict[str, Any]:
        """The recipe as plain data (what `groma validate --print` shows and checkpoints store)."""
        out = self.core.model_dump(mode="json")
        for kind, choice in self.stages.items():
            out[kind] = {"plugin": choice.plugin, **choice.options.model_dump(mode="json")}
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# -- reading -------------------------------------------------------------------------------------------------
def read_recipe_file(path: str | Path) -> dict[str, Any]:
    """Parse a recipe file into a mapping, with a clear error when it is missing, not YAML, or not a mapping."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(str(path), ["file not found"])
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise RecipeError(str(path), ["not a text file"]) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise RecipeError(str(path), [f"{where}not valid YAML ({problem})"]) from None
    if not isinstance(data, dict):
        raise RecipeError(str(path), [f"a recipe must be a mapping of sections, got {type(data).__name__}"])
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """``key.sub=value`` -> (["key", "sub"], value parsed as YAML)."""
    if "=" not in text:
        raise RecipeError("override", [f"{text!r}: expected key.sub=value"])
    key, value = text.split("=", 1)
    parts = [p for p in key.strip().split(".")]
    if not all(parts):
        raise RecipeError("override", [f"{text!r}: empty key"])
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError:
        parsed = value
    return parts, parsed


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> tuple[dict[str, Any], dict[str, str]]:
    """Apply ``key.sub=value`` overrides to a recipe mapping (a copy); return it and {dotted path: override}.
    A number indexes a list (``train.stages.0.lr=1e-4``)."""
    import copy

    data = copy.deepcopy(data)
    origin: dict[str, str] = {}
    problems: list[str] = []
    for text in overrides:
        parts, value = parse_override(text)
        node: Any = data
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    problems.append(
                        f"override {text!r}: {'.'.join(parts[:i])} is a list of {len(node)}; "
                        f"{part!r} is not an index of it"
                    )
                    break
                key: Any = int(part)
            elif isinstance(node, dict):
                key = part
            else:
                problems.append(f"override {text!r}: {'.'.join(parts[:i])} is not a section")
                break
            if last:
                node[key] = value
                origin[".".join(parts)] = text
            else:
                if isinstance(node, dict) and (key not in node or node[key] is None):
                    node[key] = {}
                node = node[key]
    if problems:
        raise RecipeError("overrides", problems)
    return data, origin


# -- validation ----------------------------------------------------------------------------------------------
def _did_you_mean(name: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model an annotation holds (directly, optional, or as list items / mapping values)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in reversed(typing.get_args(annotation)):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _fields_at(model: type[BaseModel], loc: Sequence[Any]) -> list[str]:
    """Field names of the (nested) model that holds location ``loc``."""
    current: Any = model
    for part in loc[:-1]:
        fields = getattr(current, "model_fields", None)
        if fields is None:
            return []
        if part not in fields:
            continue  # a list index or a mapping key: the items' model stays current
        current = _model_in(fields[part].annotation)
        if current is None:
            return []
    fields = getattr(current, "model_fields", None)
    return list(fields) if fields else []


def _pydantic_problems(exc: ValidationError, model: type[BaseModel], prefix: str, data: Any) -> list[str]:
    problems = []
    for err in exc.errors():
        loc = [str(p) for p in err["loc"]]
        path = ".".join([prefix, *loc]) if prefix else ".".join(loc)
        if err["type"] == "extra_forbidden":
            hint = _did_you_mean(loc[-1], _fields_at(model, loc))
            allowed = _fields_at(model, loc)
            problems.append(f"{path}: unknown option{hint}; valid options: {', '.join(allowed)}")
        elif err["type"] == "missing":
            problems.append(f"{path}: required option is missing")
        elif err["type"] == "value_error":  # a model's own check: its message names what is wrong
            message = str(err["ctx"]["error"]) if "error" in err.get("ctx", {}) else err["msg"]
            problems += [f"{path}: {line}" for line in message.splitlines()]
        else:
            given = err.get("input")
            problems.append(f"{path}: {err['msg']} (got {given!r})")
    return problems


def validate_recipe(
    data: Mapping[str, Any],
    manager: PluginManager | None = None,
    source: str = "<recipe>",
    base_dir: Path | None = None,
    origin: Mapping[str, str] | None = None,
) -> Recipe:
    """Check a recipe mapping against the core schema and each stage plugin's options; raise a
    :class:`RecipeError` listing every problem, or return the validated :class:`Recipe`."""
    manager = manager or PluginManager()
    problems: list[str] = []
    stages: dict[str, StageChoice] = {}
    for kind in STAGE_SECTIONS:
        section = data.get(kind)
        if section is None:
            problems.append(f"{kind}: missing section (it names its plugin with `plugin:`)")
            continue
        if not isinstance(section, dict):
            problems.append(f"{kind}: must be a mapping with a `plugin:` key, got {type(section).__name__}")
            continue
        plugin = section.get("plugin")
        if not isinstance(plugin, str) or not plugin:
            installed = ", ".join(manager.names(kind)) or "(none)"
            problems.append(f"{kind}.plugin: missing; installed {kind} plugins: {installed}")
            continue
        try:
            entry = manager.get(kind, plugin)
        except (UnknownPluginError, PluginConflictError) as exc:
            problems.append(f"{kind}.plugin: {exc}")
            continue
        options = {k: v for k, v in section.items() if k != "plugin"}
        try:
            stages[kind] = StageChoice(plugin, entry.config.model_validate(options))
        except ValidationError as exc:
            problems += _pydantic_problems(exc, entry.config, kind, options)
    core_data = {k: v for k, v in data.items() if k not in STAGE_SECTIONS}
    core: CoreRecipe | None = None
    try:
        core = CoreRecipe.model_validate(core_data)
    except ValidationError as exc:
        found = _pydantic_problems(exc, CoreRecipe, "", core_data)
        # a misspelled stage section reads as an unknown core key: suggest the section names too
        problems += [
            p + _did_you_mean(p.split(":")[0], STAGE_SECTIONS) if "unknown option" in p and "did you" not in p else p
            for p in found
        ]
    if origin:
        problems = [_mark_override(p, origin) for p in problems]
    if problems:
        raise RecipeError(source, problems)
    assert core is not None
    return Recipe(core, stages, source, base_dir, dict(data))


def _mark_override(problem: str, origin: Mapping[str, str]) -> str:
    path = problem.split(":", 1)[0]
    for key, text in origin.items():
        if path == key or path.startswith(key + "."):
            return f"{problem} [from override {text!r}]"
    return problem


def recipes_dir() -> Path:
    """Where the shipped recipes are: ``$GROMA_RECIPES_DIR`` or the repository's ``recipes/``."""
    if os.environ.get("GROMA_RECIPES_DIR"):
        return Path(os.environ["GROMA_RECIPES_DIR"])
    return Path(__file__).resolve().parents[1] / "recipes"


def resolve_recipe_path(name_or_path: str | Path) -> Path:
    """A recipe file path, or the name of a shipped recipe (``groma-7b`` -> ``recipes/groma-7b.yaml``)."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    shipped = recipes_dir() / f"{name_or_path}.yaml"
    if shipped.is_file():
        return shipped
    if not p.suffix and not p.exists():
        names = [r.stem for r in shipped_recipes()]
        raise RecipeError(
            str(name_or_path),
            [
                f"no such recipe file or shipped recipe{_did_you_mean(str(p), names)}; "
                f"shipped: {', '.join(names) or '(none)'}"
            ],
        )
    return p


def load_recipe(path: str | Path, overrides: Sequence[str] = (), manager: PluginManager | None = None) -> Recipe:
    """Read, override and validate a recipe file (or a shipped recipe name)."""
    path = resolve_recipe_path(path)
    data = read_recipe_file(path)
    data, origin = apply_overrides(data, overrides)
    return validate_recipe(data, manager, str(path), path.resolve().parent, origin)


def recipe_purpose(path: Path) -> str:
    """The one-line purpose of a recipe: its ``description``, else its first comment line."""
    try:
        text = path.read_text(encoding="utf-8")
        data = yaml.safe_load(text)
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return "(unreadable)"
    if isinstance(data, dict) and data.get("description"):
        return str(data["description"])
    for line in text.splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""


def shipped_recipes() -> list[Path]:
    """The recipe files shipped in :func:`recipes_dir`."""
    d = recipes_dir()
    return sorted(d.glob("*.yaml")) if d.is_dir() else []
