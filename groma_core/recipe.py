"""Recipes: YAML files that name a plugin and its options for each stage, validated before anything is built.

Every problem of a recipe is reported at once, each with its dotted path in the file, a "did you mean" where a close
name exists, and the installed plugin names for an unknown plugin.
"""

from __future__ import annotations

import copy
import inspect
import json
import os
import re
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from groma_core import tokens as T
from groma_core.errors import (
    GromaError,
    PluginConflictError,
    RecipeError,
    UnknownPluginError,
    did_you_mean,
    echo,
    one_line,
)
from groma_core.plugins import PluginManager
from groma_core.schema import RecipeTraining
from groma_core.selection import SelectionConfig
from groma_core.stages import STAGE_KINDS

STAGE_SECTIONS = tuple(STAGE_KINDS)  # image_tokenizer, region_proposer, region_encoder, language_backbone

MAX_RECIPE_BYTES = 1 << 20
"""Largest recipe file read (1 MiB; the shipped recipes are a few KiB)."""
MAX_RECIPE_DEPTH = 32
"""Deepest nesting of mappings and lists in a recipe or an override value, YAML aliases expanded."""
MAX_EXTENDS_DEPTH = 16
"""Longest chain of recipes extending one another (``extends:``)."""
PATH_OPTIONS = ("pretrained", "tokenizer")
"""Stage options that are paths whatever their declaration (see :func:`is_path_option`)."""
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
        Literal[
            "image_tokenizer",
            "region_proposer",
            "region_encoder",
            "language_backbone",
            "image_projector",
            "region_pointer",
        ]
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
    index_region_tokens: bool = Field(
        False,
        description="add the input embedding of each region's index token <rK> to its region token, so that the "
        "token that describes a region also names it (not in the reference, where <rK> only precedes the region "
        "token; helps a language model trained from scratch to answer with the right <rK>)",
    )
    region_pointer: bool = Field(
        False,
        description="add to each <rK> logit a learned match between the language model's hidden state and region "
        "K's token (a pointer head over the regions; not in the reference, where the language model head alone "
        "scores <rK>; lets a language model trained from scratch learn which region a phrase names; its parameters "
        "are the `region_pointer` part)",
    )
    region_pointer_box: bool = Field(
        False,
        description="with region_pointer: the pointer's key of region K also maps K's box (centre, size and log "
        "size in the input frame), so that a phrase can prefer a region by where it is and how big it is "
        "(\"the leftmost circle\", \"the biggest star\") as well as by what its token says; not in the reference",
    )
    region_pointer_words: bool = Field(
        False,
        description="with region_pointer: the pointer's query also maps the mean input embedding of the last phrase "
        "(<p>...</p>) before the answer, so that a phrase's words reach the match directly and not only through the "
        "language model's state; not in the reference",
    )
    region_pointer_phrase: bool = Field(
        False,
        description="with region_pointer_words: before each grounded phrase of an answer a second pointer chooses "
        "the region it will name (from the state, the last phrase, each region's token and box, and the regions "
        "already named), and the phrase's tokens carry that region's token, so that the words describe one region "
        "as a region caption does; trained by teacher forcing with a cross-entropy over the regions; not in the "
        "reference, where a caption's phrase is written first and its region chosen after it",
    )
    region_pointer_relation: bool = Field(
        False,
        description="with region_pointer: region K's pointer score also reads how its box lies against an anchor "
        "region's (wholly left of, right of, above, below; centre offset; area ratio), the anchor chosen softly from "
        "the state and the last phrase, so that \"the circle left of the star\" can be told from the other circle; "
        "starts at zero and is trained with the pointer; not in the reference",
    )
    region_selection: SelectionConfig = Field(default_factory=SelectionConfig)
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    train: RecipeTraining | None = Field(
        None,
        description="training stages and the datasets they read (`groma train`); dataset paths are checked only "
        "when training starts",
    )

    @model_validator(mode="after")
    def _pointer_options_need_pointer(self) -> CoreRecipe:
        for name in ("region_pointer_box", "region_pointer_words", "region_pointer_phrase", "region_pointer_relation"):
            if getattr(self, name) and not self.region_pointer:
                raise ValueError(f"{name}: true needs region_pointer: true (it is part of the pointer)")
        if self.region_pointer_phrase and not self.region_pointer_words:
            raise ValueError("region_pointer_phrase: true needs region_pointer_words: true (its choice reads the last "
                             "phrase's words)")
        return self


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
    notes: list[str] = field(default_factory=list)
    """What loading changed beyond the files' words (a switched plugin's dropped options, weights left out for a
    swapped stage); the command line prints them on stderr."""

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
    A number indexes a list (``train.stages.0.lr=1e-4``). ``STAGE.plugin=OTHER`` switches the stage's plugin and
    drops the options the file gave the old one (see :func:`override_recipe`)."""
    overridden = override_recipe(data, overrides)
    return overridden.data, overridden.origin


@dataclass
class Overridden:
    """A recipe mapping after ``key.sub=value`` overrides."""

    data: dict[str, Any]
    origin: dict[str, str]
    """dotted path -> the override that set it"""
    switched: dict[str, str] = field(default_factory=dict)
    """stage -> the plugin its section named before an override switched it"""
    notes: list[str] = field(default_factory=list)
    """one line for each switch that dropped options"""


def override_recipe(data: Mapping[str, Any], overrides: Sequence[str]) -> Overridden:
    """Apply ``key.sub=value`` overrides to a copy of a recipe mapping. Setting a stage's ``plugin`` to another
    plugin drops the options the recipe gave the old one (they belong to it), keeps those that overrides set, and
    says so in :attr:`Overridden.notes`."""
    result = Overridden(copy.deepcopy(dict(data)), {})
    problems: list[str] = []
    for text in overrides:
        parts, value = parse_override(text)
        node: Any = result.data
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
                if node is result.data and key in STAGE_SECTIONS:
                    _note_switch(result, key, node.get(key), value)
                if i == 1 and key == "plugin" and parts[0] in STAGE_SECTIONS and node is result.data[parts[0]]:
                    _switch_plugin(result, parts[0], value, text)
                node[key] = value
                result.origin[".".join(parts)] = text
            else:
                if isinstance(node, dict) and (key not in node or node[key] is None):
                    node[key] = {}
                node = node[key]
    if problems:
        raise RecipeError("overrides", problems)
    return result


def _plugin_of(section: Any) -> str | None:
    plugin = section.get("plugin") if isinstance(section, dict) else None
    return plugin if isinstance(plugin, str) and plugin else None


def _note_switch(result: Overridden, kind: str, old: Any, new: Any) -> None:
    """A whole stage section replaced by an override (``region_proposer={plugin: sam}``): remember its old plugin."""
    before, after = _plugin_of(old), _plugin_of(new)
    if before and after and before != after:
        result.switched[kind] = before


def _switch_plugin(result: Overridden, kind: str, plugin: Any, text: str) -> None:
    """``STAGE.plugin=OTHER``: drop the options of the section that no override set (they were the old plugin's)."""
    section = result.data[kind]
    before = _plugin_of(section)
    if before is None or plugin == before:
        return
    result.switched[kind] = before
    if not isinstance(plugin, str):
        return  # not a plugin name: validation says so
    dropped = [k for k in section if k != "plugin" and f"{kind}.{k}" not in result.origin]
    for k in dropped:
        del section[k]
    if dropped:
        names = ", ".join(_path_part(k) for k in dropped[:8])
        more = f" and {len(dropped) - 8} more" if len(dropped) > 8 else ""
        old, new = one_line(before, 80), one_line(plugin, 80)
        result.notes.append(
            f"override {echo(text)}: {kind} switched from {old} to {new}; dropped {len(dropped)} option(s) of {old}: "
            f"{names}{more}"
        )


# -- validation ----------------------------------------------------------------------------------------------
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


def _pydantic_problems(errors: Sequence[Any], model: type[BaseModel], prefix: str) -> list[str]:
    problems = []
    for err in errors:
        loc = [_path_part(p) for p in err["loc"]]
        path = ".".join([prefix, *loc]) if prefix else ".".join(loc)
        if err["type"] == "extra_forbidden":
            hint = did_you_mean(loc[-1], _fields_at(model, loc))
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


def _stage_problems(
    exc: ValidationError, manager: PluginManager, kind: str, plugin: str, previous: str | None
) -> list[str]:
    """The problems of a stage section's options; an unknown option that belongs to another plugin of the stage
    (left from the plugin the section named before) is named as such."""
    config = manager.get(kind, plugin).config
    foreign: list[str] = []
    rest = []
    for err in exc.errors():
        option = err["loc"][0] if len(err["loc"]) == 1 else None
        owners = _plugins_with_option(manager, kind, str(option)) if err["type"] == "extra_forbidden" else []
        if not owners:
            rest.append(err)
        elif previous in owners:
            foreign.append(
                f"{kind}.{_path_part(option)}: an option of {previous}, not of {plugin}: this section switched "
                f"plugin ({previous} -> {plugin}) and keeps the old one's options; remove it"
            )
        else:
            foreign.append(
                f"{kind}.{_path_part(option)}: an option of {', '.join(owners)}, not of {plugin} (left from another "
                f"plugin?); remove it; {plugin}'s options: {', '.join(config.model_fields) or '(none)'}"
            )
    return foreign + _pydantic_problems(rest, config, kind)


def _plugins_with_option(manager: PluginManager, kind: str, option: str) -> list[str]:
    """The installed plugins of ``kind`` that take an option called ``option``."""
    return [name for name in manager.names(kind) if option in manager.get(kind, name).config.model_fields]


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
    switched: Mapping[str, str] | None = None,
) -> Recipe:
    """Check a recipe mapping against the core schema and each stage plugin's options; raise a
    :class:`RecipeError` listing every problem, or return the validated :class:`Recipe`. ``switched``: stage ->
    the plugin its section named before an ``extends`` or an override switched it (its options, left in the
    section, are then named as such)."""
    manager = manager or PluginManager()
    problems: list[str] = []
    if "extends" in data:
        problems.append(
            f"extends: {echo(data['extends'])}: only a recipe file can extend another (load it with load_recipe)"
        )
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
            problems += _stage_problems(exc, manager, kind, plugin, (switched or {}).get(kind))
    core_data = {k: v for k, v in data.items() if k not in STAGE_SECTIONS and k != "extends"}
    core: CoreRecipe | None = None
    try:
        core = CoreRecipe.model_validate(core_data)
    except ValidationError as exc:
        found = _pydantic_problems(exc.errors(), CoreRecipe, "")
        # a misspelled stage section reads as an unknown core key: suggest the section names too
        problems += [
            p + did_you_mean(p.split(":")[0], STAGE_SECTIONS) if "unknown option" in p and "did you" not in p else p
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


MODEL_RECIPE = "recipe.yaml"
"""The recipe file of a model folder (written by ``groma convert`` and by training)."""


def resolve_recipe_path(name_or_path: str | Path) -> Path:
    """A recipe file path, a model folder (its ``recipe.yaml``), the name of a shipped recipe (``groma-7b`` ->
    ``recipes/groma-7b.yaml``), or a Hugging Face Hub repo id (``org/name[@revision]``: the ``recipe.yaml`` of its
    model folder, or of its cached conversion, see :func:`groma_core.hub.resolve_hub_model`)."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    if p.is_dir():
        if (p / MODEL_RECIPE).is_file():
            return p / MODEL_RECIPE
        raise RecipeError(str(p), [f"a folder, but not a model folder (it has no {MODEL_RECIPE})"])
    shipped = recipes_dir() / f"{name_or_path}.yaml"
    if shipped.is_file():
        return shipped
    hub = _hub_model_recipe(str(name_or_path))
    if hub is not None:
        return hub
    if not p.suffix and not p.exists():
        names = [r.stem for r in shipped_recipes()]
        raise RecipeError(
            str(name_or_path),
            [
                f"no such recipe file or shipped recipe{did_you_mean(str(p), names)}; "
                f"shipped: {', '.join(names) or '(none)'}"
            ],
        )
    return p


def load_recipe(path: str | Path, overrides: Sequence[str] = (), manager: PluginManager | None = None) -> Recipe:
    """Read a recipe file (a shipped recipe name, or a model folder) with the recipes it extends, apply the
    overrides, leave a swapped stage's tensors out of the weights, and validate it."""
    manager = manager or PluginManager()
    path = resolve_recipe_path(path)
    composed = compose_recipe(path, manager)
    overridden = override_recipe(composed.data, overrides)
    weights_plugins = None if "weights" in overridden.origin else composed.weights_plugins
    notes = overridden.notes + _exclude_swapped_weights(overridden.data, weights_plugins)
    recipe = validate_recipe(
        overridden.data,
        manager,
        str(path),
        path.parent.resolve(),  # the folder as named: a recipe linked into a Hub snapshot reads its neighbours there
        overridden.origin,
        {**composed.switched, **overridden.switched},
    )
    recipe.notes = notes
    return recipe


# -- extends -------------------------------------------------------------------------------------------------
@dataclass
class Composed:
    """A recipe file with the recipes it extends merged in."""

    data: dict[str, Any]
    chain: list[Path]
    """the files, the loaded one first, then the one it extends, and so on"""
    switched: dict[str, str] = field(default_factory=dict)
    """stage -> the plugin a base named before the extending file switched it"""
    weights_plugins: dict[str, str] | None = None
    """the stage plugins of the file that named ``weights`` (what its tensors belong to)"""


def compose_recipe(path: str | Path, manager: PluginManager | None = None) -> Composed:
    """Read a recipe file and, through its ``extends:``, the recipes it builds on: a shipped recipe name, a recipe
    file or a model folder, relative to the extending file, or ``embedded``: the embedded default model. Mappings
    merge deeply, the extending file winning; a stage section that names another ``plugin`` replaces the base's
    section whole. Relative paths a base wrote (``weights``, ``train.data_root``, stage path options) are made
    absolute, so that they keep meaning what they meant beside that base."""
    return _compose(Path(path), manager or PluginManager(), ())


def _compose(path: Path, manager: PluginManager, chain: tuple[Path, ...]) -> Composed:
    here = path.resolve()
    if here in chain:
        raise RecipeError(str(chain[0]), [f"extends: a cycle: {_chain_text([*chain, here])}"])
    if len(chain) > MAX_EXTENDS_DEPTH:
        raise RecipeError(
            str(chain[0]), [f"extends: more than {MAX_EXTENDS_DEPTH} recipes deep: {_chain_text([*chain, here])}"]
        )
    data = read_recipe_file(path)
    own_weights = "weights" in data
    if "extends" not in data:
        plugins = _stage_plugins(data) if own_weights else None
        return Composed(data, [here], {}, plugins)
    target = data.pop("extends")
    if not isinstance(target, str) or not target.strip():
        raise RecipeError(
            str(path),
            [f"extends: expected the name of a shipped recipe, a recipe file or a model folder, got {echo(target)}"],
        )
    base_path = _extended_path(target, path, [*chain, here])
    base = _compose(base_path, manager, (*chain, here))
    base_data = _absolute_paths(base.data, base_path.parent.resolve(), manager)
    switched: dict[str, str] = dict(base.switched)
    merged = _merge(base_data, data, switched)
    plugins = _stage_plugins(merged) if own_weights else base.weights_plugins
    return Composed(merged, [here, *base.chain], switched, plugins)


def _hub_model_recipe(target: str) -> Path | None:
    """The ``recipe.yaml`` of the model a Hub repo id names (downloaded, and a reference release converted once
    into ``GROMA_HOME``), or None when ``target`` is not a Hub id."""
    from groma_core.hub import parse_hub_id, resolve_hub_model

    hub_id = parse_hub_id(target)
    if hub_id is None:
        return None
    return resolve_hub_model(hub_id) / MODEL_RECIPE


#: the name ``extends:`` gives the embedded default model (its folder inside the package)
EMBEDDED_MODEL = "embedded"


def _extended_path(target: str, path: Path, chain: list[Path]) -> Path:
    """The file ``extends: target`` names, written in ``path``: a file or model folder relative to ``path``'s
    folder (or absolute), else a shipped recipe."""
    if target == EMBEDDED_MODEL:
        from groma_core.api import default_model

        return default_model() / MODEL_RECIPE
    given = Path(os.path.expanduser(target))
    candidate = given if given.is_absolute() else path.parent / given
    if candidate.is_file():
        return candidate
    if candidate.is_dir():
        if (candidate / MODEL_RECIPE).is_file():
            return candidate / MODEL_RECIPE
        raise RecipeError(
            str(path),
            [
                f"extends: {echo(target)} is a folder without {MODEL_RECIPE}, not a model folder "
                f"({_chain_text(chain)} -> {echo(target)})"
            ],
        )
    shipped = recipes_dir() / f"{target}.yaml"
    if "/" not in target and shipped.is_file():
        return shipped
    try:
        hub = _hub_model_recipe(target)
    except GromaError as exc:  # not cached offline, no such repo, not a Groma checkpoint...
        raise RecipeError(str(path), [f"extends: {exc} ({_chain_text(chain)} -> {echo(target)})"]) from None
    if hub is not None:
        return hub
    names = [r.stem for r in shipped_recipes()]
    raise RecipeError(
        str(path),
        [
            f"extends: {echo(target)}: no such recipe file, model folder (relative to {path.parent}) or shipped "
            f"recipe{did_you_mean(target, names)} ({_chain_text(chain)} -> {echo(target)}); shipped: "
            f"{', '.join(names) or '(none)'}"
        ],
    )


def _chain_text(chain: Sequence[Path]) -> str:
    """``a.yaml -> b.yaml -> a.yaml``: shipped recipes by name, files beside the first one by their name there,
    others by their full path."""
    shipped = recipes_dir().resolve()
    start = chain[0].parent if chain else Path()
    shown = []
    for p in chain:
        if p.parent == shipped:
            shown.append(p.stem)
        elif p.is_relative_to(start):
            shown.append(str(p.relative_to(start)))
        else:
            shown.append(str(p))
    return " -> ".join(shown)


def _stage_plugins(data: Mapping[str, Any]) -> dict[str, str]:
    """stage -> the plugin its section names (stages without one left out)."""
    return {kind: plugin for kind in STAGE_SECTIONS if (plugin := _plugin_of(data.get(kind)))}


def _merge(base: Mapping[str, Any], over: Mapping[str, Any], switched: dict[str, str]) -> dict[str, Any]:
    """``over`` merged into a copy of ``base``: mappings merge key by key, anything else is replaced; a stage
    section naming another plugin replaces the base's section (recorded in ``switched``)."""
    out = copy.deepcopy(dict(base))
    for key, value in over.items():
        old = out.get(key)
        before, after = _plugin_of(old), _plugin_of(value)
        if key in STAGE_SECTIONS and before and after and before != after:
            out[key] = copy.deepcopy(value)
            switched[key] = before
        elif isinstance(old, dict) and isinstance(value, dict):
            out[key] = _merge_mappings(old, value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _merge_mappings(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        old = out.get(key)
        out[key] = _merge_mappings(old, value) if isinstance(old, dict) and isinstance(value, dict) else value
    return copy.deepcopy(out)


# -- paths ---------------------------------------------------------------------------------------------------
def is_path_option(config: type[BaseModel], name: str) -> bool:
    """Whether a stage option is a path: ``pretrained``, ``tokenizer``, or a field declared with
    ``Field(json_schema_extra={"path": True})``."""
    field_info = config.model_fields.get(name)
    extra = field_info.json_schema_extra if field_info is not None else None
    return name in PATH_OPTIONS or (isinstance(extra, dict) and bool(extra.get("path")))


def relative_paths(
    data: Mapping[str, Any], folder: Path, manager: PluginManager, *, missing: bool = False
) -> list[tuple[tuple[str, ...], str]]:
    """The relative paths a recipe mapping holds that mean a place beside its file in ``folder``, with where they
    are: ``weights`` and ``train.data_root`` always (an absent data_root of a recipe with datasets is its folder,
    listed as ``.``), a stage path option when it exists in ``folder`` (as the stages resolve it). ``missing``:
    instead, the relative stage path options that do not exist in ``folder`` (taken from the working directory)."""
    found: list[tuple[tuple[str, ...], str]] = []

    def relative(value: Any) -> bool:
        return isinstance(value, str) and bool(value) and not Path(os.path.expanduser(value)).is_absolute()

    if relative(data.get("weights")) and not missing:
        found.append((("weights",), data["weights"]))
    train = data.get("train")
    if isinstance(train, dict) and not missing:
        root = train.get("data_root", "." if train.get("datasets") else None)
        if relative(root):
            found.append((("train", "data_root"), root))
    for kind in STAGE_SECTIONS:
        section = data.get(kind)
        plugin = _plugin_of(section)
        if plugin is None:
            continue
        try:
            config: type[BaseModel] | None = manager.get(kind, plugin).config
        except (UnknownPluginError, PluginConflictError):
            config = None
        for name, value in section.items():
            is_path = is_path_option(config, name) if config is not None else name in PATH_OPTIONS
            if is_path and relative(value) and (folder / os.path.expanduser(value)).exists() != missing:
                found.append(((kind, name), value))
    return found


def _absolute_paths(data: dict[str, Any], folder: Path, manager: PluginManager) -> dict[str, Any]:
    """A copy of ``data`` whose relative paths beside its file in ``folder`` (:func:`relative_paths`) are
    absolute."""
    out = copy.deepcopy(data)
    for keys, value in relative_paths(data, folder, manager):
        node = out
        for key in keys[:-1]:
            node = node[key]
        node[keys[-1]] = os.path.normpath(folder / os.path.expanduser(value))
    return out


# -- weights of swapped stages -------------------------------------------------------------------------------
def _exclude_swapped_weights(data: dict[str, Any], weights_plugins: Mapping[str, str] | None) -> list[str]:
    """Add to ``weights_exclude`` each stage whose plugin is not the one the recipe that named ``weights`` had
    (and the image projector when the image tokenizer or language backbone changed: it sits between them); return
    a note saying so, if anything was added."""
    if not weights_plugins or data.get("weights") in (None, ""):
        return []
    current = _stage_plugins(data)
    swapped = [k for k in STAGE_SECTIONS if k in weights_plugins and k in current and current[k] != weights_plugins[k]]
    excluded = data.get("weights_exclude") or []
    if not swapped or not isinstance(excluded, list):
        return []
    parts = swapped + (["image_projector"] if {"image_tokenizer", "language_backbone"} & set(swapped) else [])
    added = [p for p in parts if p not in excluded]
    if not added:
        return []
    data["weights_exclude"] = [*excluded, *added]
    changes = ", ".join(f"{k} {weights_plugins[k]} -> {current[k]}" for k in swapped)
    return [
        f"weights: swapped {changes}; the tensors of {', '.join(added)} in {one_line(data['weights'], 200)} are not "
        "loaded (added to weights_exclude)"
    ]


# -- copies of shipped recipes -------------------------------------------------------------------------------
def copy_recipe(name: str, dest: str | Path, manager: PluginManager | None = None) -> tuple[Path, list[str], list[str]]:
    """Copy a shipped recipe (or any recipe file) to ``dest`` (a file, or a folder to hold ``NAME.yaml``),
    comments and all, to edit it; the relative paths that meant existing places beside the original are made
    absolute. Refuses to overwrite a file. Returns the new file, the dotted paths made absolute, and those of the
    relative paths left as written (stage paths and ``train.data_root`` that exist nowhere beside the original:
    beside the copy they mean a place of the user's, such as their own data folder)."""
    source = resolve_recipe_path(name)
    target = Path(dest)
    if target.is_dir():
        target = target / source.name
    if not target.parent.is_dir():
        raise RecipeError(str(target), [f"no such folder: {target.parent}"])
    data = read_recipe_file(source)
    folder = source.resolve().parent
    manager = manager or PluginManager()
    left = [".".join(keys) for keys, _ in relative_paths(data, folder, manager, missing=True)]
    paths = []
    for keys, value in relative_paths(data, folder, manager):
        if keys == ("train", "data_root"):
            if "data_root" not in data["train"]:
                continue
            if not (folder / os.path.expanduser(value)).exists():  # data to be put beside the copy
                left.append("train.data_root")
                continue
        paths.append((keys, value))
    text = _rewrite_scalars(
        source.read_text(encoding="utf-8"),
        {keys: os.path.normpath(folder / os.path.expanduser(value)) for keys, value in paths},
    )
    try:
        with open(target, "x", encoding="utf-8") as f:  # "x": never overwrite, even a file made meanwhile
            f.write(text)
    except FileExistsError:
        raise RecipeError(
            str(target), ["already exists; not overwritten (remove it, or copy to another name)"]
        ) from None
    return target, [".".join(keys) for keys, _ in paths], left


_PLAIN_SCALAR = re.compile(r"[A-Za-z0-9_./~+-][A-Za-z0-9_./~+@-]*\Z")


def _rewrite_scalars(text: str, values: Mapping[tuple[str, ...], str]) -> str:
    """``text`` (YAML) with the scalars at the given key paths replaced, everything else (comments, layout) kept."""
    if not values:
        return text
    root = yaml.compose(text, Loader=yaml.SafeLoader)
    spans: list[tuple[int, int, str]] = []

    def walk(node: Any, keys: tuple[str, ...]) -> None:
        if not isinstance(node, yaml.MappingNode):
            return
        for key_node, value_node in node.value:
            here = (*keys, str(key_node.value))
            if here in values and isinstance(value_node, yaml.ScalarNode):
                new = values[here]
                shown = new if _PLAIN_SCALAR.match(new) and yaml.safe_load(new) == new else json.dumps(new)
                spans.append((value_node.start_mark.index, value_node.end_mark.index, shown))
            else:
                walk(value_node, here)

    walk(root, ())
    for start, end, shown in sorted(spans, reverse=True):
        text = text[:start] + shown + text[end:]
    return text


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
