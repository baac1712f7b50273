"""Recipes: YAML files that name a plugin and its options for each stage, validated before anything is built.

Every problem of a recipe is reported at once, each with its dotted path in the file, a "did you mean" where a close
name exists, and the installed plugin names for an unknown plugin.
"""

from __future__ import annotations

import difflib
import inspect
import os
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from groma_core import tokens as T
from groma_core.errors import PluginConflictError, RecipeError, UnknownPluginError, echo
from groma_core.plugins import PluginManager
from groma_core.selection import SelectionConfig
from groma_core.stages import STAGE_KINDS
from groma_core.training.datasets import RecipeTraining

STAGE_SECTIONS = tuple(STAGE_KINDS)  # image_tokenizer, region_proposer, region_encoder, language_backbone

MAX_RECIPE_BYTES = 1 << 20
"""Largest recipe file read (1 MiB; the shipped recipes are a few KiB)."""
MAX_RECIPE_DEPTH = 32
"""Deepest nesting of mappings and lists in a recipe or an override value, YAML aliases expanded."""
MAX_RECIPE_VALUES = 100_000
"""Most values (mappings, lists and scalars) a recipe or an override may hold once its YAML aliases are expanded
(a few hundred bytes of nested aliases, a "billion laughs", would otherwise expand to billions)."""


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
class _RecipeLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
    """YAML's safe loader (libyaml's when installed: the pure-Python one is ~4x slower); a scalar that its tag
    cannot hold (``!!float vicuna``) is a YAML error with its position, not a bare ValueError."""


def _marked(constructor: Any) -> Any:
    def construct(loader: Any, node: Any) -> Any:
        try:
            return constructor(loader, node)
        except (ValueError, TypeError, OverflowError) as exc:
            raise yaml.constructor.ConstructorError(
                None, None, f"{echo(node.value)} is not a valid {_short_tag(node.tag)} ({exc})", node.start_mark
            ) from None

    return construct


def _short_tag(tag: str) -> str:
    return "!!" + tag[len("tag:yaml.org,2002:") :] if tag.startswith("tag:yaml.org,2002:") else tag


for _tag, _constructor in list(_RecipeLoader.yaml_constructors.items()):
    if _tag is not None and not inspect.isgeneratorfunction(_constructor):
        _RecipeLoader.add_constructor(_tag, _marked(_constructor))


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """One line for a YAML error: where (line, column) and what."""
    mark = getattr(exc, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
    problem = getattr(exc, "problem", None) or str(exc)
    return f"{where}not valid YAML ({' '.join(str(problem).split())[:200]})"


def _check_yaml_size(text: str) -> str | None:
    """Why ``text`` is too deep or too large once its aliases are expanded (None when it is fine), found from the
    YAML event stream alone, before anything is built (cost: one pass over the text)."""
    anchors: dict[str, tuple[int, int]] = {}  # anchor -> (values, height) of the node it names
    open_anchors: set[str] = set()
    stack: list[tuple[str | None, int, int]] = []  # per open collection: (anchor, values before it, height below)
    total = 0

    def child(values: int, height: int) -> str | None:
        nonlocal total
        total += values
        if total > MAX_RECIPE_VALUES:
            return f"holds more than {MAX_RECIPE_VALUES:,} values (YAML aliases counted as expanded)"
        if len(stack) + height > MAX_RECIPE_DEPTH:
            return f"is nested more than {MAX_RECIPE_DEPTH} levels deep"
        if stack:
            anchor, before, below = stack[-1]
            stack[-1] = (anchor, before, max(below, height))
        return None

    for event in yaml.parse(text, Loader=_RecipeLoader):
        if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            problem = child(1, 1)
            if problem:
                return problem
            if event.anchor:
                open_anchors.add(event.anchor)
            stack.append((event.anchor, total, 0))
        elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            anchor, before, below = stack.pop()
            if stack:
                up_anchor, up_before, up_below = stack[-1]
                stack[-1] = (up_anchor, up_before, max(up_below, below + 1))
            if anchor:
                open_anchors.discard(anchor)
                anchors[anchor] = (total - before + 1, below + 1)
        elif isinstance(event, yaml.ScalarEvent):
            problem = child(1, 0)
            if problem:
                return problem
            if event.anchor:
                anchors[event.anchor] = (1, 0)
        elif isinstance(event, yaml.AliasEvent):
            if event.anchor in open_anchors:
                return f"has a YAML alias *{event.anchor[:40]} inside the node it names (a cycle)"
            problem = child(*anchors.get(event.anchor, (1, 0)))
            if problem:
                return problem
    return None


def load_yaml(text: str) -> Any:
    """Parse YAML text with the safe loader, after checking its depth and size with aliases expanded (see
    :data:`MAX_RECIPE_DEPTH` and :data:`MAX_RECIPE_VALUES`). Raises ``ValueError`` with a one-line reason, or a
    ``yaml.YAMLError``."""
    try:
        problem = _check_yaml_size(text)
    except yaml.YAMLError as exc:
        if "maximum nesting depth" not in str(exc):  # libyaml's own limit (1,000 levels)
            raise
        problem = f"is nested more than {MAX_RECIPE_DEPTH} levels deep"
    if problem:
        raise ValueError(problem)
    return yaml.load(text, Loader=_RecipeLoader)


def read_recipe_file(path: str | Path) -> dict[str, Any]:
    """Parse a recipe file into a mapping, with a clear error when it is missing, too large, not YAML, too deep,
    or not a mapping."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(str(path), ["file not found"])
    try:
        size = path.stat().st_size
        if size > MAX_RECIPE_BYTES:
            raise RecipeError(
                str(path), [f"the file is {size:,} bytes; a recipe may have at most {MAX_RECIPE_BYTES:,} bytes"]
            )
        data = load_yaml(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise RecipeError(str(path), ["not a text file"]) from None
    except OSError as exc:
        raise RecipeError(str(path), [f"cannot be read ({exc.strerror or exc})"]) from None
    except yaml.YAMLError as exc:
        raise RecipeError(str(path), [_yaml_problem(exc)]) from None
    except ValueError as exc:
        raise RecipeError(str(path), [f"the recipe {exc}"]) from None
    if not isinstance(data, dict):
        raise RecipeError(str(path), [f"a recipe must be a mapping of sections, got {type(data).__name__}"])
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """``key.sub=value`` -> (["key", "sub"], value parsed as YAML; text that is not YAML stays text)."""
    if "=" not in text:
        raise RecipeError("override", [f"{echo(text)}: expected key.sub=value"])
    key, value = text.split("=", 1)
    parts = [p for p in key.strip().split(".")]
    if not all(parts):
        raise RecipeError("override", [f"{echo(text)}: empty key"])
    if len(parts) > MAX_RECIPE_DEPTH:
        raise RecipeError("override", [f"{echo(text)}: key is nested more than {MAX_RECIPE_DEPTH} levels deep"])
    try:
        parsed = load_yaml(value) if value.strip() else ""
    except yaml.YAMLError:
        parsed = value
    except ValueError as exc:
        raise RecipeError("override", [f"{echo(text)}: the value {exc}"]) from None
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
                        f"override {echo(text)}: {'.'.join(parts[:i])} is a list of {len(node)}; "
                        f"{echo(part)} is not an index of it"
                    )
                    break
                key: Any = int(part)
            elif isinstance(node, dict):
                key = part
            else:
                problems.append(f"override {echo(text)}: {'.'.join(parts[:i])} is not a section")
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
        loc = [_path_part(p) for p in err["loc"]]
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
            problems.append(f"{path}: {err['msg']} (got {echo(err.get('input'))})")
    return problems


def _path_part(part: Any) -> str:
    """A part of a dotted path as it is shown: a key of unusual length or characters is shown shortened."""
    text = str(part)
    return text if len(text) <= 40 and text.isprintable() else echo(text, 40)


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
            what = "missing" if plugin in (None, "") else f"expected a plugin name, got {type(plugin).__name__}"
            given = "" if plugin in (None, "") else f" {echo(plugin)}"
            problems.append(f"{kind}.plugin: {what}{given}; installed {kind} plugins: {installed}")
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
    if core is not None and core.region_selection.max_regions > T.MAX_REGIONS:
        problems.append(
            f"region_selection.max_regions: {core.region_selection.max_regions} regions, but Groma's tokenizer has "
            f"{T.MAX_REGIONS} region tokens (<r0>..<r{T.MAX_REGIONS - 1}>); at most {T.MAX_REGIONS}"
        )
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
            return f"{problem} [from override {echo(text)}]"
    return problem


def recipes_dir() -> Path:
    """Where the shipped recipes are: ``$GROMA_RECIPES_DIR``, else the package's ``groma_core/recipes``: package data
    in a wheel, and in a checkout a link to the repository's ``recipes/`` (the one copy of the files, so relative
    paths in them keep meaning the repository's folders); else ``recipes/`` beside the package (a checkout whose
    links were written as plain files)."""
    if os.environ.get("GROMA_RECIPES_DIR"):
        return Path(os.environ["GROMA_RECIPES_DIR"])
    package = Path(__file__).resolve().parent
    shipped = package / "recipes"
    return shipped.resolve() if shipped.is_dir() else package.parent / "recipes"


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
