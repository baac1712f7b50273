"""Locating the golden fixtures of the reference implementation (``shared/reference/golden``)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from safetensors.torch import load_file
from torch import Tensor

ENV_GOLDEN = "GROMA_GOLDEN_DIR"


def golden_root() -> Path:
    """``$GROMA_GOLDEN_DIR``, else ``shared/reference/golden`` beside (or inside) the repository checkout."""
    if os.environ.get(ENV_GOLDEN):
        return Path(os.environ[ENV_GOLDEN])
    repo = Path(__file__).resolve().parents[2]
    for candidate in (repo / "shared" / "reference" / "golden", repo.parent / "shared" / "reference" / "golden"):
        if candidate.is_dir():
            return candidate
    return repo.parent / "shared" / "reference" / "golden"


def golden_sets() -> list[Path]:
    """Every fixture set directory (one holding ``meta.json``) under :func:`golden_root`."""
    root = golden_root()
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if (p / "meta.json").is_file())


class GoldenSet:
    """One fixture set: its ``meta.json`` and lazily loaded safetensors files."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        self.meta = json.loads((self.dir / "meta.json").read_text())
        self._cache: dict[str, dict[str, Tensor]] = {}

    @property
    def name(self) -> str:
        return self.dir.name

    @property
    def groma_config(self) -> dict:
        """The reference ``GromaConfig.to_dict()``."""
        return self.meta["config"]["groma"]

    def tensors(self, file: str) -> dict[str, Tensor]:
        """All tensors of ``file`` (e.g. ``"image_img0"``, ``"case_img0_rec"``, ``"weights"``)."""
        if file not in self._cache:
            self._cache[file] = load_file(str(self.dir / f"{file}.safetensors"))
        return self._cache[file]

    def weights(self) -> dict[str, Tensor]:
        return self.tensors("weights")

    def images(self) -> list[str]:
        return sorted(self.meta["images"])

    def cases(self) -> dict[str, dict]:
        return self.meta["cases"]
