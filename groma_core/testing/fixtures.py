"""Locating the golden fixtures of the reference implementation.

The repository carries a copy of them (``tests/reference``: ``golden/tiny-a``, ``golden/FORMAT.md`` and the key list
``groma-7b-keys.tsv``, laid out as ``shared/reference``), so a plain clone runs every golden test.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from safetensors.torch import load_file
from torch import Tensor

ENV_GOLDEN = "GROMA_GOLDEN_DIR"
REPO = Path(__file__).resolve().parents[2]
IN_REPO_GOLDEN = REPO / "tests" / "reference" / "golden"


def golden_root() -> Path:
    """Where the fixture sets are, first found of: ``$GROMA_GOLDEN_DIR``; ``shared/reference/golden`` inside or beside
    the repository checkout; the repository's own copy ``tests/reference/golden``. Its parent holds the reference's
    other files (``groma-7b-keys.tsv``)."""
    if os.environ.get(ENV_GOLDEN):
        return Path(os.environ[ENV_GOLDEN])
    for candidate in (REPO / "shared" / "reference" / "golden", REPO.parent / "shared" / "reference" / "golden"):
        if candidate.is_dir():
            return candidate
    return IN_REPO_GOLDEN


def golden_sets() -> list[Path]:
    """Every fixture set directory (one holding ``meta.json``) under :func:`golden_root`."""
    root = golden_root()
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if (p / "meta.json").is_file())


def require_golden_sets() -> list[Path]:
    """:func:`golden_sets`, or a ``FileNotFoundError`` saying where they were looked for: tests that compare with
    the reference fail without them, they never skip."""
    sets = golden_sets()
    if not sets:
        raise FileNotFoundError(
            f"no golden fixture set (a folder holding meta.json) under {golden_root()}: the repository ships "
            f"{IN_REPO_GOLDEN.relative_to(REPO)}/tiny-a; ${ENV_GOLDEN} names another folder of sets"
        )
    return sets


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
