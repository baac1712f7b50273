"""The ``groma`` command line."""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Callable, Sequence

from groma_core import __version__
from groma_core.errors import GromaError, RecipeError

Command = Callable[[argparse.Namespace], int]


def _manager():
    from groma_core.plugins import PluginManager, PluginWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PluginWarning)  # `groma plugins` shows them; other commands stay quiet
        return PluginManager()


def cmd_plugins(args: argparse.Namespace) -> int:
    """List installed plugins, the stages they register and any load error."""
    manager = _manager()
    rows = []
    for record in manager.records:
        if record.stages:
            for kind, name in record.stages:
                rows.append((name, kind, record.distribution, record.version, record.status, record.error or ""))
        else:
            rows.append(("-", "-", record.distribution, record.version, record.status, record.error or ""))
    if args.json:
        keys = ("name", "stage", "distribution", "version", "status", "error")
        print(json.dumps([dict(zip(keys, r)) for r in rows], indent=1))
        return 0
    header = ("NAME", "STAGE", "DISTRIBUTION", "VERSION", "STATUS")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(5)]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    for r in rows:
        print("  ".join(str(v).ljust(w) for v, w in zip(r[:5], widths)).rstrip())
        if r[5]:
            print(f"    error: {r[5]}")
    return 0


def cmd_recipes(args: argparse.Namespace) -> int:
    """List the shipped recipes with their one-line purpose."""
    from groma_core.recipe import recipe_purpose, recipes_dir, shipped_recipes

    recipes = shipped_recipes()
    if not recipes:
        print(f"no recipes found in {recipes_dir()}")
        return 0
    width = max(len(p.stem) for p in recipes)
    for path in recipes:
        print(f"{path.stem.ljust(width)}  {recipe_purpose(path)}")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    """Check a recipe without loading weights; print every problem at once."""
    from groma_core.recipe import load_recipe

    try:
        recipe = load_recipe(args.recipe, args.overrides, _manager())
    except RecipeError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    stages = ", ".join(f"{k}={c.plugin}" for k, c in recipe.stages.items())
    print(f"ok: {recipe.source} ({stages})")
    if args.print:
        print(recipe.to_yaml(), end="")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    """Convert a reference Groma checkpoint directory (config.json + .bin or safetensors) into a groma-core one."""
    from groma_core.convert import convert_checkpoint

    report = convert_checkpoint(
        args.src,
        args.dst,
        dtype=args.dtype,
        manager=_manager(),
        shard_bytes=int(args.shard_gb * 1024**3),
        progress=not args.quiet,
        recipe_overrides=args.set,
    )
    print(
        f"wrote {report.written} tensors ({report.parameters:,} parameters) in {len(report.shards)} shard(s) to "
        f"{args.dst}; dropped {report.aliases_dropped} alias keys"
    )
    if report.dropped_by_stage:
        print(f"not kept by their stage: {len(report.dropped_by_stage)} ({', '.join(report.dropped_by_stage[:5])})")
    if report.unknown:
        print(
            f"unknown keys, not loaded: {len(report.unknown)}: {', '.join(report.unknown[:20])}"
            + (" ..." if len(report.unknown) > 20 else "")
        )
    return 0


def _add_recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="recipe file, or the name of a shipped recipe (see `groma recipes`)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="override recipe values")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="groma", description="Grounded multimodal language models with swappable stages (Groma)."
    )
    parser.add_argument("--version", action="version", version=f"groma-core {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("plugins", help="list installed plugins and their stages", description=cmd_plugins.__doc__)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_plugins)

    p = sub.add_parser("recipes", help="list the shipped recipes", description=cmd_recipes.__doc__)
    p.set_defaults(func=cmd_recipes)

    p = sub.add_parser("validate", help="check a recipe without loading weights", description=cmd_validate.__doc__)
    _add_recipe_args(p)
    p.add_argument("--print", action="store_true", help="print the validated recipe with all defaults filled in")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("convert", help="convert a reference Groma checkpoint", description=cmd_convert.__doc__)
    p.add_argument("src", help="reference checkpoint directory (config.json + pytorch_model*.bin or safetensors)")
    p.add_argument("dst", help="output directory (recipe.yaml + safetensors shards + tokenizer files)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="cast floating tensors")
    p.add_argument("--shard-gb", type=float, default=2.0, help="largest shard size in GiB (default 2)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="key.sub=value",
        help="override a value of the recipe derived from config.json (repeatable)",
    )
    p.set_defaults(func=cmd_convert)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (GromaError, OSError, ValueError, KeyError) as exc:
        if args.debug:
            raise
        message = str(exc).strip() or type(exc).__name__
        print(f"groma: error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
