"""Models from the Hugging Face Hub: ``org/name`` (optionally ``@revision``) wherever a model is taken.

A repo holding a groma-core model folder (``recipe.yaml`` + safetensors, as ``groma train`` / ``groma convert`` write
it) is downloaded and loaded as it is. A repo holding a reference Groma release (``config.json`` + ``pytorch_model.bin``
or shards with their index, tokenizer files) is downloaded, converted once by the streaming converter into the cache
folder (:func:`groma_home` ``/models``), keyed by repo, resolved commit and dtype, and loaded from there afterwards
without the network.

A cached conversion is built in a temporary sibling folder and renamed into place only when it is complete, with its
marker file (:data:`MARKER`) listing every file and its size; a folder without a valid marker is never used and is
rebuilt. A lock file serialises conversions of one key between processes: the second waits and reuses the first's.
Downloads go through huggingface_hub (``HF_TOKEN``, ``HF_HOME``, ``HF_HUB_CACHE``, ``HF_HUB_OFFLINE``, resumed
downloads, its progress bars).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from groma_core.errors import CheckpointError, GromaError, echo, one_line

#: the marker file of a complete cached conversion (what it holds: repo, commit, dtype, files with their sizes)
MARKER = "groma-cache.json"
#: files of a groma-core model folder repo (the recipe, weights, index, tokenizer folder, conversion report)
MODEL_FOLDER_PATTERNS = ["recipe.yaml", "*.safetensors", "*.safetensors.index.json", "conversion.json", "tokenizer/*"]
#: files of a reference release besides its weights (the configuration and the tokenizer)
REFERENCE_PATTERNS = [
    "config.json",
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
]
#: what is looked at first to tell the two kinds apart (small files only)
PROBE_PATTERNS = ["recipe.yaml", "config.json", "*.index.json"]
#: the dtype label of a conversion that keeps the tensors as saved
AS_SAVED = "as-saved"

_REPO_PART = r"[A-Za-z0-9](?:[\w.-]{0,94}[A-Za-z0-9_])?"
HUB_ID = re.compile(rf"(?P<repo>{_REPO_PART}/{_REPO_PART})(?:@(?P<revision>[\w./-]{{1,200}}))?")


@dataclass(frozen=True)
class HubId:
    """A model repo on the Hub and the revision asked for (None: the default branch)."""

    repo: str
    revision: str | None = None

    def __str__(self) -> str:
        return self.repo + (f"@{self.revision}" if self.revision else "")


def parse_hub_id(model: str | os.PathLike | None) -> HubId | None:
    """The Hub id ``model`` names, or None when it is a local path that exists, a ``Path`` object, or does not have
    the form ``org/name[@revision]`` (a recipe name, ``x.yaml``, ``./dir``, ``/abs/dir`` are never Hub ids)."""
    if model is None or not isinstance(model, str):
        return None
    if Path(os.path.expanduser(model)).exists():  # a local path always wins
        return None
    if model.endswith((".yaml", ".yml")) or model.startswith((".", "/", "~")):
        return None
    match = HUB_ID.fullmatch(model)
    if match is None or "--" in match["repo"] or ".." in match["repo"]:
        return None
    return HubId(match["repo"], match["revision"])


def groma_home() -> Path:
    """``$GROMA_HOME``, else ``$XDG_CACHE_HOME/groma``, else ``~/.cache/groma``."""
    if os.environ.get("GROMA_HOME"):
        return Path(os.path.expanduser(os.environ["GROMA_HOME"]))
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "groma"


def models_dir() -> Path:
    """Where cached conversions live: one folder per repo, one subfolder per commit and dtype."""
    return groma_home() / "models"


def hf_cache_dir() -> str:
    """The Hub cache huggingface_hub uses, read from the environment now (``HF_HUB_CACHE``, else ``HF_HOME/hub``,
    else huggingface_hub's default), so that a change of ``HF_HOME`` after import is honoured."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.path.expanduser(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return os.path.join(os.path.expanduser(os.environ["HF_HOME"]), "hub")
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


# -- downloading ---------------------------------------------------------------------------------------------------
def _download(hub_id: HubId, patterns: list[str], what: str) -> Path:
    """``snapshot_download`` of the files matching ``patterns``; huggingface_hub's failures as one-line errors."""
    from huggingface_hub import errors as hf_errors
    from huggingface_hub import snapshot_download

    offline = os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}
    fetch = f"hf download {hub_id.repo}" + (f" --revision {hub_id.revision}" if hub_id.revision else "")
    try:
        folder = snapshot_download(
            hub_id.repo, revision=hub_id.revision, allow_patterns=patterns, cache_dir=hf_cache_dir()
        )
    except hf_errors.GatedRepoError:
        raise GromaError(
            f"{hub_id}: a gated repo on the Hugging Face Hub; ask for access at https://huggingface.co/{hub_id.repo} "
            "and log in (`hf auth login`, or set HF_TOKEN)"
        ) from None
    except hf_errors.RevisionNotFoundError:
        raise GromaError(
            f"{hub_id}: the repo has no revision {echo(hub_id.revision)} (give a branch, tag or commit of "
            f"https://huggingface.co/{hub_id.repo})"
        ) from None
    except hf_errors.RepositoryNotFoundError:
        token = "" if (os.environ.get("HF_TOKEN") or _has_saved_token()) else "; if it is private, log in first "
        token = token and token + "(`hf auth login`, or set HF_TOKEN)"
        raise GromaError(
            f"{hub_id}: no such local path, and no model repo of that name on the Hugging Face Hub{token}"
        ) from None
    except hf_errors.LocalEntryNotFoundError:
        if offline:
            raise GromaError(
                f"{hub_id}: no such local path, and not in the Hugging Face cache ({hf_cache_dir()}), which "
                "HF_HUB_OFFLINE=1 forbids downloading into; download it where there is network "
                f"(`{fetch}` with the same HF_HOME) or unset HF_HUB_OFFLINE"
            ) from None
        raise GromaError(
            f"{hub_id}: the Hugging Face Hub cannot be reached and the {what} is not in the cache ({hf_cache_dir()}); "
            f"check the network (or a proxy), or download it where there is network: `{fetch}`"
        ) from None
    except hf_errors.HFValidationError as exc:
        raise GromaError(f"{hub_id}: not a valid Hugging Face repo id ({one_line(exc, 200)})") from None
    except hf_errors.HfHubHTTPError as exc:
        raise GromaError(f"{hub_id}: the Hugging Face Hub answered with an error ({one_line(exc, 300)})") from None
    except OSError as exc:  # a full disk or an unwritable cache while downloading
        raise GromaError(f"{hub_id}: downloading into {hf_cache_dir()} failed ({one_line(exc, 300)})") from None
    return Path(folder)


def _has_saved_token() -> bool:
    from huggingface_hub import get_token

    return get_token() is not None


# -- the cache of conversions -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CachedModel:
    """A complete cached conversion, as :func:`cached_models` lists it."""

    id: str
    repo: str
    revision: str | None
    commit: str
    dtype: str
    size: int
    path: Path


def _repo_folder(repo: str) -> Path:
    return models_dir() / repo.replace("/", "--")


def _key(commit: str, dtype: str | None, overrides: tuple[str, ...]) -> str:
    key = f"{commit[:12]}-{dtype or AS_SAVED}"
    if overrides:  # one conversion per set of conversion overrides
        import hashlib

        key += "-set" + hashlib.sha256(json.dumps(list(overrides)).encode()).hexdigest()[:8]
    return key


def _read_marker(folder: Path) -> dict | None:
    """The marker of a complete conversion, or None when it is absent, unreadable or a listed file is missing or
    has another size (a folder edited or truncated by hand)."""
    try:
        marker = json.loads((folder / MARKER).read_text(encoding="utf-8"))
        files = marker["files"]
        for name, size in files.items():
            if (folder / name).stat().st_size != size:
                return None
        return marker
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def cached_models() -> list[CachedModel]:
    """The complete conversions under :func:`models_dir`, sorted by repo then creation time."""
    found = []
    root = models_dir()
    if not root.is_dir():
        return []
    for folder in sorted(root.glob("*/*")):
        if not folder.is_dir() or folder.name.startswith("."):
            continue
        marker = _read_marker(folder)
        if marker is None:
            continue
        found.append(
            CachedModel(
                id=f"{marker['repo']}@{folder.name}",
                repo=marker["repo"],
                revision=marker.get("revision"),
                commit=marker["commit"],
                dtype=marker.get("dtype") or AS_SAVED,
                size=sum(marker["files"].values()),
                path=folder,
            )
        )
    return found


def remove_cached_model(model_id: str) -> CachedModel:
    """Delete the cached conversion ``model_id`` (as :func:`cached_models` lists it); an unknown id is an error."""
    for entry in cached_models():
        if entry.id == model_id:
            shutil.rmtree(entry.path)
            return entry
    known = ", ".join(m.id for m in cached_models()) or "none"
    raise GromaError(f"groma models rm {echo(model_id)}: no cached model with that ID (cached: {known})")


def _find_cached(
    hub_id: HubId, dtype: str | None, overrides: tuple[str, ...], commit: str | None = None
) -> Path | None:
    """A complete conversion of ``hub_id`` in ``dtype`` with ``overrides``: of ``commit`` when given, else one made
    from the same revision as asked (or whose commit the revision names), the newest first."""
    folder = _repo_folder(hub_id.repo)
    if not folder.is_dir():
        return None
    candidates = []
    for sub in folder.iterdir():
        if sub.name.startswith(".") or not sub.is_dir():
            continue
        marker = _read_marker(sub)
        if marker is None or marker.get("repo") != hub_id.repo or marker.get("dtype") != dtype:
            continue
        if tuple(marker.get("convert_overrides") or ()) != overrides:
            continue
        if commit is not None:
            matches = marker.get("commit") == commit
        else:
            asked = hub_id.revision
            matches = marker.get("revision") == asked or (
                asked is not None and len(asked) >= 7 and str(marker.get("commit", "")).startswith(asked)
            )
        if matches:
            candidates.append((marker.get("created", 0), sub))
    return max(candidates)[1] if candidates else None


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` between processes (``fcntl.flock``; where there is none, no lock)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # not POSIX: conversions of one key at once are not guarded
        yield
        return
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _folder_files(folder: Path) -> dict[str, int]:
    return {
        p.relative_to(folder).as_posix(): p.stat().st_size
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MARKER
    }


def _needed_bytes(files: list[Path], dtype: str | None) -> int:
    """About what a conversion writes: the source's size, halved for a 16-bit dtype (the releases are fp32)."""
    total = sum(f.stat().st_size for f in files)
    return total // 2 if dtype in ("float16", "bfloat16") else total


def _gib(n: int) -> str:
    return f"{n / 1024**3:.1f} GiB"


# -- resolving -----------------------------------------------------------------------------------------------------
def download_reference(hub_id: HubId) -> Path:
    """Download a reference Groma release (configuration, weights, tokenizer files; nothing else) and return its
    snapshot folder; a repo that holds no reference release is an error saying what was expected."""
    probe = _download(hub_id, PROBE_PATTERNS, "repo")
    if (probe / "recipe.yaml").is_file():
        raise GromaError(
            f"{hub_id}: holds a groma-core model folder (recipe.yaml), which needs no conversion; use it directly "
            f"(--model {hub_id})"
        )
    return _download_release(hub_id, probe)


def _download_release(hub_id: HubId, probe: Path) -> Path:
    _check_reference_config(hub_id, probe)
    if (probe / "model.safetensors.index.json").is_file():
        weights = ["model.safetensors.index.json", "model-*-of-*.safetensors"]
    elif (probe / "pytorch_model.bin.index.json").is_file():
        weights = ["pytorch_model.bin.index.json", "pytorch_model-*-of-*.bin"]
    else:
        weights = ["pytorch_model.bin", "model.safetensors"]
    folder = _download(hub_id, REFERENCE_PATTERNS + weights, "release")
    revision = f" --revision {hub_id.revision}" if hub_id.revision else ""
    fetch = f"run again online or `hf download {hub_id.repo}{revision}`"
    indexes = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
    index = next((folder / n for n in indexes if (folder / n).is_file()), None)
    if index is None and not any((folder / n).is_file() for n in ("pytorch_model.bin", "model.safetensors")):
        raise GromaError(
            f"{hub_id}: not a Groma checkpoint: expected pytorch_model.bin (or pytorch_model-0000x-of-0000y.bin with "
            f"pytorch_model.bin.index.json, or safetensors) beside config.json; if the download was cut short, {fetch}"
        )
    from groma_core.api import read_weight_map

    if index is not None:
        try:
            shards = dict.fromkeys(read_weight_map(index).values())
        except CheckpointError as exc:
            raise GromaError(f"{hub_id}: {one_line(exc, 300)}") from None
        missing = [name for name in shards if not (folder / name).is_file()]
        if missing:
            raise GromaError(
                f"{hub_id}: the download is incomplete: {', '.join(missing)} of {index.name} not in {folder}; {fetch}"
            )
    return folder


def _check_reference_config(hub_id: HubId, probe: Path) -> None:
    config_file = probe / "config.json"
    expected = (
        "expected a reference Groma release (config.json with model_type 'groma' or 'ddetr' and pytorch_model*.bin) "
        "or a groma-core model folder (recipe.yaml + safetensors)"
    )
    if not config_file.is_file():
        raise GromaError(f"{hub_id}: not a Groma checkpoint: no recipe.yaml and no config.json; {expected}")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise GromaError(f"{hub_id}: config.json is not valid JSON ({one_line(exc, 200)})") from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type not in ("groma", "ddetr"):
        raise GromaError(
            f"{hub_id}: not a Groma checkpoint: config.json has model_type {echo(model_type)}; {expected}"
        )


def resolve_hub_model(
    hub_id: HubId, dtype: str | None = None, convert_overrides: tuple[str, ...] = (), *, progress: bool = True
) -> Path:
    """The local folder to load ``hub_id`` from: the Hub snapshot of a groma-core model folder, or the cached
    conversion of a reference release in ``dtype`` (None: tensors as saved), converted now when there is none.
    ``convert_overrides``: ``key.sub=value`` changes to the recipe derived from the release's config.json (as
    ``groma convert --set``), for settings the reference hard-codes; each set of them is its own conversion."""
    convert_overrides = tuple(convert_overrides)
    if dtype is not None:
        from groma_core.api import DTYPES

        if dtype not in DTYPES:
            raise GromaError(f"dtype {echo(dtype)}: expected one of {', '.join(DTYPES)}")
    cached = _find_cached(hub_id, dtype, convert_overrides)
    if cached is not None:  # converted before: no network
        return cached
    probe = _download(hub_id, PROBE_PATTERNS, "repo")
    if (probe / "recipe.yaml").is_file():
        folder = _download(hub_id, MODEL_FOLDER_PATTERNS, "model")
        from groma_core.api import weight_files

        try:
            weight_files(folder)
        except CheckpointError as exc:
            raise GromaError(
                f"{hub_id}: a groma-core model folder without its weights ({one_line(exc, 200)}); expected "
                "model.safetensors or model-*.safetensors with model.safetensors.index.json beside recipe.yaml"
            ) from None
        return folder
    commit = probe.name
    cached = _find_cached(hub_id, dtype, convert_overrides, commit)
    if cached is not None:
        return cached
    source = _download_release(hub_id, probe)
    return _convert_into_cache(hub_id, source, commit, dtype, convert_overrides, progress)


def _convert_into_cache(
    hub_id: HubId, source: Path, commit: str, dtype: str | None, overrides: tuple[str, ...], progress: bool
) -> Path:
    from groma_core.convert import convert_checkpoint, source_files

    parent = _repo_folder(hub_id.repo)
    key = _key(commit, dtype, overrides)
    final = parent / key
    with _locked(parent / f".{key}.lock"):
        if _read_marker(final) is not None:  # another process converted it while this one waited
            return final
        if final.exists():  # no valid marker: edited, truncated or from an older layout; never used
            shutil.rmtree(final)
        for stale in parent.glob(f".{key}.tmp-*"):  # left by a conversion that was killed
            shutil.rmtree(stale, ignore_errors=True)
        _, files = source_files(source)
        need = _needed_bytes(files, dtype)
        free = shutil.disk_usage(parent).free
        if free < need:
            raise GromaError(
                f"{hub_id}: converting needs about {_gib(need)} free in {parent}, which has {_gib(free)}; free some "
                "space or set GROMA_HOME to a disk with more"
            )
        tmp = parent / f".{key}.tmp-{os.getpid()}"
        if progress:
            print(
                f"groma: converting {hub_id} (commit {commit[:12]}, {dtype or 'dtype as saved'}) once into {final}",
                file=sys.stderr,
            )
        try:
            convert_checkpoint(source, tmp, dtype=dtype, progress=progress, recipe_overrides=overrides)
            marker = {
                "repo": hub_id.repo,
                "revision": hub_id.revision,
                "commit": commit,
                "dtype": dtype,
                "convert_overrides": list(overrides),
                "source": str(source),
                "created": time.time(),
                "files": _folder_files(tmp),
            }
            (tmp / MARKER).write_text(json.dumps(marker, indent=1))
            os.replace(tmp, final)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            reason = one_line(exc, 300)
            raise GromaError(f"{hub_id}: converting into {tmp} failed ({reason}); nothing was kept") from None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final
