"""Training checkpoints, written atomically: every file goes into a temporary folder beside the final one, is
flushed to disk, and the folder is renamed into place; the ``latest`` pointer is replaced last. A folder left
half-written by a killed run is therefore never taken for a checkpoint.

Layout: ``<out>/checkpoints/<stage>/step-0000123/`` holding ``model.safetensors``, ``optimizer.pt``,
``scheduler.pt``, ``rng-rank<R>.pt`` (one per process) and ``trainer_state.json`` (written last); the file
``<out>/checkpoints/latest`` names the newest one (``<stage>/step-0000123``).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from groma_core.errors import CheckpointError
from groma_core.training.distributed import DistContext, barrier, broadcast_object

CHECKPOINTS = "checkpoints"
LATEST = "latest"
STATE_FILE = "trainer_state.json"
WEIGHTS_FILE = "model.safetensors"
TMP_PREFIX = ".tmp-"


def checkpoint_name(stage: str, step: int) -> str:
    return f"{stage}/step-{step:07d}"


def fsync_path(path: Path) -> None:
    """Flush a file (or, on POSIX, a folder's entries) to disk."""
    if path.is_dir():
        if os.name != "posix":
            return
        fd = os.open(path, os.O_RDONLY)
    else:
        fd = os.open(path, os.O_RDWR)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomic(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` so that readers see the old or the new content, never a part."""
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}-{uuid.uuid4().hex[:8]}")
    tmp.write_text(text, encoding="utf-8")
    fsync_path(tmp)
    os.replace(tmp, path)
    fsync_path(path.parent)


def save_weights(tensors: dict[str, Tensor], path: Path) -> None:
    """Write tensors as safetensors; tensors sharing storage (tied weights) are written once."""
    from safetensors.torch import save_file

    seen: dict[tuple[int, int, tuple[int, ...]], str] = {}
    out = {}
    for name, t in tensors.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key in seen:
            continue
        seen[key] = name
        out[name] = t.detach().to("cpu").contiguous()
    save_file(out, str(path), metadata={"format": "pt"})


def capture_rng(generator: torch.Generator | None) -> dict[str, Any]:
    """The random states of this process: Python, NumPy, torch (CPU and CUDA) and the training's own generator."""
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "generator": generator.get_state() if generator is not None else None,
    }


def restore_rng(state: dict[str, Any], generator: torch.Generator | None) -> None:
    """Undo :func:`capture_rng`."""
    version, keys, gauss = state["python"]
    random.setstate((version, tuple(keys), gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if generator is not None and state["generator"] is not None:
        generator.set_state(state["generator"])


def save_checkpoint(
    root: Path,
    name: str,
    ctx: DistContext,
    trainer_state: dict[str, Any],
    weights: dict[str, Tensor] | None,
    optimizer: dict[str, Any] | None,
    scheduler: dict[str, Any] | None,
    rng: dict[str, Any],
    keep_last: int,
) -> Path:
    """Write one checkpoint atomically (rank 0 writes the shared files, every rank its RNG state); return its
    folder. Collective: every rank calls it."""
    final = root / name
    tmp = None
    if ctx.is_main:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.parent / f"{TMP_PREFIX}{final.name}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
    tmp = Path(broadcast_object(ctx, str(tmp)))
    torch.save(rng, tmp / f"rng-rank{ctx.rank}.pt")
    if ctx.is_main:
        save_weights(weights or {}, tmp / WEIGHTS_FILE)
        torch.save(optimizer, tmp / "optimizer.pt")
        torch.save(scheduler, tmp / "scheduler.pt")
    barrier(ctx)
    if ctx.is_main:
        (tmp / STATE_FILE).write_text(json.dumps(trainer_state, indent=1), encoding="utf-8")
        for f in tmp.iterdir():
            fsync_path(f)
        fsync_path(tmp)
        if final.exists():  # the same step written again (a resumed run that ends where it was stopped)
            shutil.rmtree(final)
        os.rename(tmp, final)
        fsync_path(final.parent)
        write_text_atomic(root / LATEST, name + "\n")
        prune(root, keep_last)
    barrier(ctx)
    return final


def complete_checkpoints(root: Path) -> list[Path]:
    """Finished checkpoint folders under ``root``, oldest first (by stage order, then step)."""
    found = []
    for state_file in root.glob(f"*/step-*/{STATE_FILE}"):
        folder = state_file.parent
        if folder.name.startswith(TMP_PREFIX):
            continue
        try:
            state = json.loads(state_file.read_text(encoding="utf-8"))
            found.append(((int(state["stage_index"]), int(state["step"])), folder))
        except (OSError, ValueError, KeyError):
            continue
    return [folder for _, folder in sorted(found)]


def latest_checkpoint(root: Path) -> Path | None:
    """The checkpoint ``latest`` names when it is complete, else the newest complete one; None when none is."""
    pointer = root / LATEST
    if pointer.is_file():
        folder = root / pointer.read_text(encoding="utf-8").strip()
        if (folder / STATE_FILE).is_file() and not folder.name.startswith(TMP_PREFIX):
            return folder
    done = complete_checkpoints(root)
    return done[-1] if done else None


def prune(root: Path, keep_last: int) -> None:
    """Remove all but the ``keep_last`` newest checkpoints (never the one ``latest`` names)."""
    latest = latest_checkpoint(root)
    done = complete_checkpoints(root)
    for folder in done[: max(0, len(done) - keep_last)]:
        if folder != latest:
            shutil.rmtree(folder, ignore_errors=True)


def remove_partial(root: Path) -> list[Path]:
    """Delete temporary folders left by interrupted writes; return them."""
    leftovers = _tmp_entries(root)
    for p in leftovers:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    return leftovers


def _tmp_entries(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return [*root.glob(f"{TMP_PREFIX}*"), *root.glob(f"*/{TMP_PREFIX}*")]


def read_trainer_state(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((folder / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{folder}: unreadable {STATE_FILE} ({exc})") from None
