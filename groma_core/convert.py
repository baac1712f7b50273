"""Converting a reference Groma checkpoint directory into a groma-core checkpoint directory.

The reference saves ``GromaModel.state_dict()`` (fp32 ``pytorch_model.bin``, sharded ``.bin`` with an index, or
safetensors) beside its ``config.json``. The converter streams: it reads one source file at a time (``torch.load``
with ``mmap=True, weights_only=True``, or safetensors), maps each key onto the groma-core model through the stages'
``reference_key``, checks its shape against the model built on the ``meta`` device, and writes safetensors shards of
bounded size. Alias keys are checked equal to their originals and dropped; unknown keys are reported, never loaded;
missing keys, misshapen ones and integer tensors where the model holds floating-point ones are errors that name them.

Shards are written as ``*.safetensors.partial`` and renamed only when everything is checked; a conversion that fails
removes them. The destination must be new, empty, or hold only what a conversion writes: an earlier conversion
there is replaced (its shards, index and tokenizer files never mix with the new ones); a folder holding anything else
is refused.
"""

from __future__ import annotations

import gc
import json
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor

from groma_core.errors import CheckpointError, GromaError, echo, one_line
from groma_core.plugins import PluginManager
from groma_core.recipe import Recipe, apply_overrides, validate_recipe
from groma_core.reference import alias_original
from groma_core.stages import empty_parameters

#: reference key prefix of the image projector (owned by the core) -> its groma-core name
CORE_PREFIXES = {"img_txt_bridge.": "image_projector.layers."}
DEFAULT_PLUGINS = {
    "image_tokenizer": "dinov2",
    "region_proposer": "deformable-detr",
    "region_encoder": "mlvl-roialign",
    "language_backbone": "vicuna",
}
TOKENIZER_FILES = (
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.json",
)
DETECTOR_STAGES = ("image_tokenizer", "region_proposer")
#: what a conversion writes into its destination (besides the tokenizer folder)
SHARD_NAME = re.compile(r"model-\d{5}-of-\d{5}\.safetensors|model-\d{5}\.safetensors\.partial")
INDEX_FILE = "model.safetensors.index.json"
REPORT_FILE = "conversion.json"


@dataclass
class ConversionReport:
    """What a conversion did, written as ``conversion.json`` beside the weights."""

    source: str
    layout: str
    written: int = 0
    aliases_dropped: int = 0
    dropped_by_stage: list[str] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)
    shards: list[str] = field(default_factory=list)
    parameters: int = 0


def recipe_from_reference_config(
    config: dict[str, Any], manager: PluginManager | None = None, stages: Sequence[str] = tuple(DEFAULT_PLUGINS)
) -> dict[str, Any]:
    """A recipe mapping for the model a reference ``config.json`` (``GromaConfig.to_dict()``) describes; stages
    not in ``stages`` get their plugin's default options."""
    manager = manager or PluginManager()
    recipe: dict[str, Any] = {
        "name": "groma-converted",
        "description": "converted from a reference Groma checkpoint",
        "region_selection": {
            "nms_iou": float(config.get("nms_thres", 0.6)),
            "score_threshold": float(config.get("box_score_thres", 0.15)),
            "max_regions": int(config.get("max_region_num", 100)),
        },
    }
    for kind, plugin in DEFAULT_PLUGINS.items():
        if kind not in stages:
            recipe[kind] = {"plugin": plugin}
            continue
        options_cls = manager.get(kind, plugin).config
        options = options_cls.from_reference_config(config)
        recipe[kind] = {"plugin": plugin, **options.model_dump(mode="json", exclude_defaults=True)}
    return recipe


# -- reading the source ----------------------------------------------------------------------------------------
def source_files(src: Path) -> tuple[str, list[Path]]:
    """The layout and weight files of a reference checkpoint directory."""
    if not src.is_dir():
        raise CheckpointError(f"{src}: not a directory")
    for index_name in ("pytorch_model.bin.index.json", "model.safetensors.index.json"):
        index = src / index_name
        if index.is_file():
            from groma_core.api import read_weight_map

            files = [src / f for f in dict.fromkeys(read_weight_map(index).values())]
            absent = [f.name for f in files if not f.is_file()]
            if absent:
                raise CheckpointError(f"{index}: shard(s) listed but missing: {', '.join(absent)}")
            return "sharded", files
    for single in ("pytorch_model.bin", "model.safetensors"):
        if (src / single).is_file():
            return "single", [src / single]
    found = sorted(p.name for p in src.iterdir())
    raise CheckpointError(
        f"{src}: no pytorch_model.bin, model.safetensors or index file (found: {', '.join(found) or 'nothing'})"
    )


class SourceFile:
    """One weight file of the source, read lazily and memory-mapped. :meth:`release` unmaps it, so that the pages
    read so far stop counting as resident memory; the next :meth:`get` maps it again (reading the index only)."""

    def __init__(self, path: Path):
        self.path = path
        self._state: dict[str, Tensor] | None = None

    def _load(self) -> dict[str, Tensor]:
        if self._state is not None:
            return self._state
        path = self.path
        if path.suffix == ".safetensors":
            from safetensors import SafetensorError

            try:  # safetensors maps the file and copies each tensor out when it is accessed
                self._state = _LazySafetensors(path)
            except (SafetensorError, OSError) as exc:
                raise CheckpointError(f"{path}: cannot read safetensors file ({one_line(exc, 200)})") from None
            return self._state
        try:  # weights_only: a pickle that would build other objects (and run code) is refused, never run
            state = torch.load(str(path), map_location="cpu", mmap=True, weights_only=True)
        except Exception as exc:  # noqa: BLE001 - torch raises many types for truncated/corrupt pickles
            reason = one_line(f"{type(exc).__name__}: {exc}", 300)
            raise CheckpointError(f"{path}: cannot read checkpoint ({reason})") from None
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        if not isinstance(state, dict) or not all(
            isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()
        ):
            raise CheckpointError(f"{path}: not a state dict (expected a mapping of names to tensors)")
        self._state = state
        return state

    def keys(self) -> list[str]:
        return list(self._load().keys())

    def get(self, key: str) -> Tensor:
        return self._load()[key]

    def release(self) -> None:
        self._state = None
        gc.collect()


class _LazySafetensors(dict):
    """A read-only mapping over a safetensors file that reads a tensor when it is asked for."""

    def __init__(self, path: Path):
        from safetensors import safe_open

        super().__init__()
        self._file = safe_open(str(path), framework="pt")
        self._keys = list(self._file.keys())

    def keys(self):  # type: ignore[override]
        return self._keys

    def __getitem__(self, key: str) -> Tensor:
        from safetensors import SafetensorError

        try:
            return self._file.get_tensor(key)
        except SafetensorError as exc:
            raise CheckpointError(f"cannot read tensor {key} ({one_line(exc, 200)})") from None


# -- mapping ---------------------------------------------------------------------------------------------------
class KeyMapper:
    """Maps reference keys onto the state-dict keys of a groma-core model (built on the meta device)."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.expected = {k: tuple(v.shape) for k, v in model.state_dict(keep_vars=True).items()}
        self.floating = {k: v.is_floating_point() for k, v in model.state_dict(keep_vars=True).items()}
        self.stages = [
            (name, getattr(model, name))
            for name in ("image_tokenizer", "region_proposer", "region_encoder", "language_backbone")
        ]

    def map(self, key: str) -> tuple[str, str | None]:
        """("alias" | "core" | "stage" | "dropped" | "unknown", own key or None)."""
        if alias_original(key) is not None:
            return "alias", alias_original(key)
        for prefix, own in CORE_PREFIXES.items():
            if key.startswith(prefix):
                return "core", own + key[len(prefix) :]
        for name, stage in self.stages:
            if stage.reference_prefixes and key.startswith(stage.reference_prefixes):
                own = stage.reference_key(key)
                return ("dropped", None) if own is None else ("stage", f"{name}.{own}")
        return "unknown", None


def convert_checkpoint(
    src: str | Path,
    dst: str | Path,
    dtype: str | None = None,
    manager: PluginManager | None = None,
    shard_bytes: int = 1024**3,
    config: dict[str, Any] | None = None,
    progress: bool = False,
    recipe_overrides: Sequence[str] = (),
) -> ConversionReport:
    """Convert the reference checkpoint in ``src`` into ``dst`` (recipe.yaml, safetensors shards, tokenizer files).

    ``config``: the reference configuration (defaults to ``src/config.json``). ``dtype``: cast floating tensors
    (float32, float16 or bfloat16); the recipe records it. ``recipe_overrides``: ``key.sub=value`` changes to the
    recipe derived from the configuration (for settings the reference hard-codes).
    """
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    from groma_core.api import DTYPES, _construct

    src, dst = Path(src), Path(dst)
    manager = manager or PluginManager()
    if not src.is_dir():
        raise CheckpointError(f"{src}: not a directory")
    if config is None:
        config_path = src / "config.json"
        if not config_path.is_file():
            raise CheckpointError(f"{src}: no config.json (the reference configuration is needed for the recipe)")
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{config_path}: not valid JSON ({one_line(exc, 200)})") from None
        if not isinstance(config, dict):
            raise CheckpointError(
                f"{config_path}: expected a JSON object (the reference GromaConfig), got {type(config).__name__}"
            )
    detector_only = config.get("model_type") == "ddetr"  # groma-det-pretrain: DINOv2 + Deformable DETR only
    layout, files = source_files(src)
    _check_destination(dst)
    try:
        if detector_only:
            layout = f"detector-only {layout}"
            recipe_map = recipe_from_reference_config({"perceiver_cfg": config}, manager, DETECTOR_STAGES)
            recipe_map["partial_weights"] = True
            recipe_map["description"] = (
                "detector-only checkpoint (image tokenizer + region proposer) from groma-det-pretrain"
            )
        else:
            recipe_map = recipe_from_reference_config(config, manager)
    except GromaError:  # a default plugin that is not installed
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        reason = f"missing {exc}" if isinstance(exc, KeyError) else one_line(exc, 300)
        raise CheckpointError(f"{src}/config.json: not a reference Groma configuration ({reason})") from None
    if dtype:
        if dtype not in DTYPES:
            raise CheckpointError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
        recipe_map["dtype"] = dtype
    recipe_map, _ = apply_overrides(recipe_map, recipe_overrides)
    recipe: Recipe = validate_recipe(recipe_map, manager, source=f"{src}/config.json")
    with empty_parameters():
        model = _construct(recipe, manager)
    mapper = KeyMapper(model)
    cast = DTYPES[dtype] if dtype else None

    dst.mkdir(parents=True, exist_ok=True)
    for stale in dst.glob("*.safetensors.partial"):  # left by an interrupted conversion
        stale.unlink()
    report = ConversionReport(source=str(src), layout=layout)
    pending_aliases: dict[str, Tensor] = {}
    seen_originals: dict[str, Tensor] = {}
    written: dict[str, tuple[int, ...]] = {}
    shard: dict[str, Tensor] = {}
    shard_size = 0
    tmp_names: list[Path] = []

    def flush() -> None:
        nonlocal shard, shard_size
        if not shard:
            return
        name = dst / f"model-{len(tmp_names) + 1:05d}.safetensors.partial"
        tmp_names.append(name)  # removed with the others if the write fails
        try:
            save_file(shard, str(name), metadata={"format": "pt"})
        except SafetensorError as exc:  # a full disk, a file-size limit: the OS's reason, as an OSError
            reason = str(exc).removeprefix("Error while serializing: ").removeprefix("I/O error: ")
            raise OSError(f"cannot write {name.name}: {one_line(reason, 120)}") from None
        shard, shard_size = {}, 0
        gc.collect()

    problems: list[str] = []
    iterator: Any = files
    if progress:
        from tqdm import tqdm

        iterator = tqdm(files, desc="converting", unit="file")
    try:  # whatever stops the conversion (a bad tensor, a damaged later shard, Ctrl-C), no partial file stays
        for file in iterator:
            source = SourceFile(file)
            for key in source.keys():
                tensor = source.get(key)
                if detector_only:
                    key = "perceiver." + key
                kind, own = mapper.map(key)
                if kind == "alias":
                    pending_aliases[key] = tensor.clone()  # small heads; a clone does not pin the mapped file
                    continue
                if kind == "unknown":
                    report.unknown.append(key)
                    continue
                if kind == "dropped":
                    report.dropped_by_stage.append(key)
                    continue
                assert own is not None
                if own not in mapper.expected:
                    problems.append(f"{key} -> {own}: the model has no such tensor")
                    continue
                if tuple(tensor.shape) != mapper.expected[own]:
                    problems.append(f"{key}: shape {tuple(tensor.shape)} but {own} expects {mapper.expected[own]}")
                    continue
                if tensor.is_floating_point() != mapper.floating[own]:
                    wanted = "floating-point" if mapper.floating[own] else "integer"
                    problems.append(
                        f"{key}: dtype {str(tensor.dtype).removeprefix('torch.')} but {own} holds {wanted} values"
                    )
                    continue
                if own in written:
                    problems.append(f"{key}: {own} given twice")
                    continue
                if _is_alias_target(key):
                    seen_originals[key] = tensor.clone()
                out = tensor.to(cast) if cast is not None and tensor.is_floating_point() else tensor
                shard[own] = out.contiguous()
                written[own] = tuple(tensor.shape)
                shard_size += out.numel() * out.element_size()
                if shard_size >= shard_bytes:
                    flush()
                    source.release()  # what was written stops counting as resident memory
            source.release()
        flush()
        for alias, tensor in pending_aliases.items():
            original = alias_original(alias)
            if original not in seen_originals:
                problems.append(f"{alias}: alias of {original}, which is not in the checkpoint")
            elif not torch.equal(tensor, seen_originals[original]):
                problems.append(f"{alias}: differs from {original}, which it should duplicate")
            else:
                report.aliases_dropped += 1
        expected = mapper.expected
        if detector_only:
            expected = {k: v for k, v in expected.items() if k.split(".", 1)[0] in DETECTOR_STAGES}
        missing = sorted(set(expected) - set(written))
        if missing:
            problems.append(
                f"{len(missing)} tensor(s) missing: " + ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else "")
            )
        if problems:
            raise CheckpointError(
                f"{src}: cannot convert: " + "; ".join(problems[:12]) + (" ..." if len(problems) > 12 else "")
            )
    except BaseException:
        for name in tmp_names:
            name.unlink(missing_ok=True)
        raise

    # everything is checked: replace an earlier conversion's files (its index first, so that an interruption from
    # here on leaves a folder that refuses to load rather than one that mixes two checkpoints)
    (dst / INDEX_FILE).unlink(missing_ok=True)
    (dst / REPORT_FILE).unlink(missing_ok=True)
    for old in dst.iterdir():
        if SHARD_NAME.fullmatch(old.name) and old not in tmp_names:
            old.unlink()
    total = len(tmp_names)
    weight_map = {}
    for i, name in enumerate(tmp_names, 1):
        final = dst / f"model-{i:05d}-of-{total:05d}.safetensors"
        name.replace(final)
        report.shards.append(final.name)
        from safetensors import safe_open

        with safe_open(str(final), framework="pt") as f:
            for key in f.keys():
                weight_map[key] = final.name
    (dst / INDEX_FILE).write_text(json.dumps({"weight_map": weight_map}, indent=1))
    report.written = len(written)
    report.parameters = sum(int(torch.Size(s).numel()) for s in written.values())

    for f in TOKENIZER_FILES:  # an earlier conversion's tokenizer files must not mix with this one's
        (dst / "tokenizer" / f).unlink(missing_ok=True)
    tokenizer_files = [f for f in TOKENIZER_FILES if (src / f).is_file()]
    if tokenizer_files and not detector_only:
        (dst / "tokenizer").mkdir(exist_ok=True)
        for f in tokenizer_files:
            shutil.copyfile(src / f, dst / "tokenizer" / f)
        recipe_map["language_backbone"]["tokenizer"] = "tokenizer"
    recipe_map["weights"] = "."
    header = (
        f"# Converted from {src} by `groma convert`.\n"
        f'# Run: groma ground IMAGE "[grounding]Describe the image." --model {dst}\n'
    )
    (dst / "recipe.yaml").write_text(header + yaml.safe_dump(recipe_map, sort_keys=False))
    (dst / REPORT_FILE).write_text(json.dumps(report.__dict__, indent=1))
    return report


def _check_destination(dst: Path) -> None:
    """Refuse a destination that is not a folder, or that holds anything besides what a conversion writes (an
    earlier conversion's files are replaced; anything else might be the user's and is never mixed or removed)."""
    if dst.exists() and not dst.is_dir():
        raise CheckpointError(f"{dst}: exists and is not a folder; give a new or empty folder as the destination")
    if not dst.is_dir():
        return
    own = {"recipe.yaml", REPORT_FILE, INDEX_FILE, "tokenizer"}
    foreign = sorted(
        p.name for p in dst.iterdir() if p.name not in own and not SHARD_NAME.fullmatch(p.name) and p.name[:1] != "."
    )
    if foreign:
        shown = ", ".join(echo(n, 40) for n in foreign[:4]) + (" ..." if len(foreign) > 4 else "")
        raise CheckpointError(
            f"{dst}: the folder holds files that no conversion wrote ({shown}); give a new or empty folder, or one "
            "that holds an earlier conversion (which is then replaced)"
        )


def _is_alias_target(key: str) -> bool:
    return key.startswith("perceiver.ddetr_transformer.decoder.") and key.split(".")[3] in (
        "bbox_embed",
        "class_embed_enc",
        "class_embed_coco",
        "class_embed_sa1b",
    )
