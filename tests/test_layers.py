"""The package's layers import downward only: every import of a groma_core module, at the top of a file or inside a
function, goes to its own layer or one below. Read from the source (no import runs), so a lazy import that points
up is caught as well as a top-level one."""

from __future__ import annotations

import ast
from pathlib import Path

import groma_core

ROOT = Path(groma_core.__file__).parent

#: lowest first; a module not named here belongs to the layer of its longest listed prefix
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    (
        "interfaces and types",
        (
            "groma_core.errors",
            "groma_core.types",
            "groma_core.boxes",
            "groma_core.tokens",
            "groma_core.config",
            "groma_core.hookspecs",
            "groma_core.stages",
            "groma_core.schema",
            "groma_core.kv_cache",
            "groma_core.images",
            "groma_core.prompt",
            "groma_core.grounding",
            "groma_core.visualize",
        ),
    ),
    (
        "pipeline",
        (
            "groma_core.selection",
            "groma_core.model",
            "groma_core.processor",
            "groma_core.plugins",
            "groma_core.builtin",
            "groma_core.reference",
        ),
    ),
    (
        "api",
        (
            "groma_core",
            "groma_core.api",
            "groma_core.inference",
            "groma_core.recipe",
            "groma_core.quantization",
            "groma_core.hub",
            "groma_core.convert",
            "groma_core.default_model",
            "groma_core.recipes",
        ),
    ),
    ("data formats", ("groma_core.data",)),
    ("training and evaluation", ("groma_core.training", "groma_core.evaluation")),
    ("cli", ("groma_core.cli", "groma_core.cli_data", "groma_core.demo", "groma_core.testing")),
]

#: wrong arrows that exist today, each to be removed (issue 17 item 5); the test fails on any other one, and on an
#: entry here that is no longer needed
KNOWN: set[tuple[str, str]] = set()


def layer_of(module: str) -> int:
    best, level = -1, -1
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, level = len(prefix), index
    assert level >= 0, f"{module}: in no layer of tests/test_layers.py; add it to LAYERS"
    return level


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """The groma_core modules a file imports anywhere in it (``from groma_core import tokens`` is groma_core.tokens)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.split(".")[0] == "groma_core")
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.split(".")[0] != "groma_core":
                continue
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                is_module = (ROOT.parent / Path(*sub.split("."))).with_suffix(".py").is_file() or (
                    ROOT.parent / Path(*sub.split("."))
                ).is_dir()
                out.add(sub if is_module else node.module)
    return out


def wrong_arrows() -> set[tuple[str, str]]:
    wrong = set()
    for path in sorted(ROOT.rglob("*.py")):
        source = module_name(path)
        for target in imports_of(path):
            if layer_of(target) > layer_of(source):
                wrong.add((source, target))
    return wrong


def test_layers_import_downward_only():
    wrong = wrong_arrows()
    new = sorted(wrong - KNOWN)
    assert not new, "imports that point up a layer (tests/test_layers.py LAYERS):\n" + "\n".join(
        f"  {s} ({LAYERS[layer_of(s)][0]}) -> {t} ({LAYERS[layer_of(t)][0]})" for s, t in new
    )
    fixed = sorted(KNOWN - wrong)
    assert not fixed, f"no longer imported, remove from KNOWN: {fixed}"


def test_the_checker_sees_a_lazy_upward_import(tmp_path):
    """The checker itself: an import inside a function body counts."""
    path = tmp_path / "lazy.py"
    path.write_text("def f():\n    from groma_core.training import run_training\n    from groma_core import api\n")
    assert imports_of(path) == {"groma_core.training", "groma_core.api"}
    assert layer_of("groma_core.training.engine") > layer_of("groma_core.model")
