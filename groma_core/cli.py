"""The ``groma`` command line."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from groma_core import __version__
from groma_core.errors import GromaError, RecipeError, did_you_mean, one_line

Command = Callable[[argparse.Namespace], int]


def _manager():
    from groma_core.plugins import PluginManager, PluginWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PluginWarning)  # `groma plugins` shows them; other commands stay quiet
        return PluginManager()


def cmd_plugins(args: argparse.Namespace) -> int:
    """List installed plugins: each stage they register with its description, and any load error; with --options
    NAME, the options of the stage NAME with their types, defaults and descriptions."""
    manager = _manager()
    if args.options:
        return _print_options(manager, args.options, args.json)
    entries = {(e.kind, e.name): e for e in manager.entries()}
    rows = []
    for record in manager.records:
        for kind, name in record.stages:
            entry = entries.get((kind, name))
            description = entry.description if entry is not None and entry.distribution == record.distribution else ""
            rows.append(
                (name, kind, record.name, record.distribution, record.version, record.status, description, record.error)
            )
        if not record.stages:
            rows.append(("-", "-", record.name, record.distribution, record.version, record.status, "", record.error))
    if args.json:
        keys = ("name", "stage", "plugin", "distribution", "version", "status", "description", "error")
        print(json.dumps([dict(zip(keys, (*r[:7], r[7] or ""))) for r in rows], indent=1))
        return 0
    header = ("NAME", "STAGE", "PLUGIN", "DISTRIBUTION", "VERSION", "STATUS", "DESCRIPTION")
    _print_table(header, [r[:7] for r in rows], after=[f"error: {r[7]}" if r[7] else "" for r in rows])
    return 0


def _print_table(header: Sequence[str], rows: Sequence[Sequence[object]], after: Sequence[str] = ()) -> None:
    """Columns padded to their widest cell; ``after[i]``, when not empty, is printed indented below row i."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip())
    for i, row in enumerate(rows):
        print("  ".join(str(v).ljust(w) for v, w in zip(row, widths)).rstrip())
        if i < len(after) and after[i]:
            print(f"    {after[i]}")


def _print_options(manager, name: str, as_json: bool) -> int:
    """``groma plugins --options NAME``: the options of every stage called NAME."""
    from groma_core.errors import UnknownPluginError

    found = [e for e in manager.entries() if e.name == name]
    if not found:
        failed = manager.failed_for(name)
        if failed:
            causes = "; ".join(f"{r.distribution} failed to load ({r.cause})" for r in failed)
            raise UnknownPluginError(f"--options {name}: the plugin is not available: {causes}")
        names = sorted({e.name for e in manager.entries()})
        hint = did_you_mean(name, names)
        raise UnknownPluginError(f"--options {name}: no stage of that name{hint}; installed: {', '.join(names)}")
    described = [(entry, [_option_row(n, f) for n, f in entry.config.model_fields.items()]) for entry in found]
    if as_json:
        keys = ("name", "type", "default", "description")
        print(
            json.dumps(
                [
                    {
                        "name": e.name,
                        "stage": e.kind,
                        "distribution": e.distribution,
                        "description": e.description,
                        "options": [dict(zip(keys, row)) for row in rows],
                    }
                    for e, rows in described
                ],
                indent=1,
            )
        )
        return 0
    for i, (entry, rows) in enumerate(described):
        if i:
            print()
        about = f": {entry.description}" if entry.description else ""
        print(f"{entry.name} ({entry.kind}, {entry.distribution} {entry.version}){about}")
        if rows:
            _print_table(("OPTION", "TYPE", "DEFAULT", "DESCRIPTION"), rows)
        else:
            print("no options")
    return 0


def _option_row(name: str, info) -> tuple[str, str, str, str]:
    """An option's name, type (with its bounds), default (JSON; "required" when it has none) and description."""
    from pydantic_core import PydanticUndefined

    bounds = []
    for constraint in info.metadata:
        for attr, sign in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            if getattr(constraint, attr, None) is not None:
                bounds.append(f"{sign}{getattr(constraint, attr)}")
    kind = _type_name(info.annotation) + (f" ({', '.join(bounds)})" if bounds else "")
    if info.is_required():
        default = "required"
    else:
        value = info.default_factory() if info.default is PydanticUndefined else info.default
        default = json.dumps(value, default=str)
    return name, kind, default, info.description or ""


def _type_name(annotation) -> str:
    """A type as a recipe writer reads it: ``int``, ``list[float]``, ``str | None``, ``"a" | "b"``."""
    import types
    import typing

    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return " | ".join(json.dumps(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if annotation is type(None):
        return "None"
    if origin is not None:
        return f"{getattr(origin, '__name__', str(origin))}[{', '.join(_type_name(a) for a in args)}]"
    return getattr(annotation, "__name__", str(annotation))


def _print_notes(notes: Sequence[str]) -> None:
    """What loading a recipe changed beyond its files' words, one line each on stderr."""
    for note in notes:
        print(f"groma: note: {one_line(note)}", file=sys.stderr)


def cmd_recipes(args: argparse.Namespace) -> int:
    """List the shipped recipes with their one-line purpose (`groma recipes cp NAME DEST` copies one to edit)."""
    from groma_core.recipe import recipe_purpose, recipes_dir, shipped_recipes

    recipes = shipped_recipes()
    if not recipes:
        print(f"no recipes found in {recipes_dir()}")
        return 0
    width = max(len(p.stem) for p in recipes)
    for path in recipes:
        print(f"{path.stem.ljust(width)}  {recipe_purpose(path)}")
    return 0


def cmd_recipes_cp(args: argparse.Namespace) -> int:
    """Copy a shipped recipe to DEST (a file, or a folder to hold NAME.yaml) to edit it; comments are kept, the
    relative paths of the original are made absolute, and an existing file is never overwritten. To change a few
    values of a recipe, a file with `extends: NAME` and only those values is often shorter."""
    from groma_core.recipe import copy_recipe

    target, rewritten, left = copy_recipe(args.name, args.dest, _manager())
    made = f"; relative paths made absolute: {', '.join(rewritten)}" if rewritten else ""
    kept = f"; relative paths not found beside the original, left as written: {', '.join(left)}" if left else ""
    print(f"copied {args.name} to {target}{made}{kept}")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    """Check a recipe (a file, a shipped recipe name or a model folder) without loading weights; print every
    problem at once. With --print, stdout holds only the validated recipe as YAML."""
    from groma_core.recipe import load_recipe

    try:
        recipe = load_recipe(args.recipe, args.overrides, _manager())
    except RecipeError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    _print_notes(recipe.notes)
    stages = ", ".join(f"{k}={c.plugin}" for k, c in recipe.stages.items())
    print(f"ok: {recipe.source} ({stages})", file=sys.stderr if args.print else sys.stdout)
    if args.print:
        print(recipe.to_yaml(), end="")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    """Convert a reference Groma checkpoint directory (config.json + .bin or safetensors) into a groma-core one."""
    from groma_core.convert import convert_checkpoint
    from groma_core.hub import download_reference, parse_hub_id

    hub_id = parse_hub_id(args.src)
    src = download_reference(hub_id) if hub_id is not None else args.src  # a local path that exists wins
    report = convert_checkpoint(
        src,
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


def cmd_models(args: argparse.Namespace) -> int:
    """List the Hub models converted into the cache (GROMA_HOME, default ~/.cache/groma): ID, repo, revision asked
    for, commit, dtype, size on disk and folder. `groma models rm ID` deletes one."""
    from groma_core.hub import cached_models, models_dir

    models = cached_models()
    if not models:
        print(f"no converted models in {models_dir()}")
        return 0
    rows = [
        (m.id, m.repo, m.revision or "(default)", m.commit[:12], m.dtype, _size(m.size), str(m.path)) for m in models
    ]
    _print_table(("ID", "REPO", "REVISION", "COMMIT", "DTYPE", "SIZE", "PATH"), rows)
    return 0


def cmd_models_rm(args: argparse.Namespace) -> int:
    """Delete a converted model from the cache (ID as `groma models` lists it); the Hub download stays in the
    Hugging Face cache (`hf cache` manages that)."""
    from groma_core.hub import remove_cached_model

    entry = remove_cached_model(args.id)
    print(f"removed {entry.id} ({_size(entry.size)}, {entry.path})")
    return 0


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


#: weights from this size on make the command say what they need before loading (smaller ones load silently)
MEMORY_NOTE_BYTES = 256 * 1024**2


def _load_model(args: argparse.Namespace):
    """The model named by --model (a checkpoint directory or a recipe), on --device in --dtype."""
    from groma_core.api import (
        DTYPES,
        folder_dtype,
        free_memory,
        load,
        memory_check,
        model_location,
        resolve_device,
        weights_bytes,
    )

    device = resolve_device(args.device)  # a device this machine lacks is refused before the model is read
    dtype_name = args.dtype
    if dtype_name is None and args.device == "auto" and device.type == "cuda":
        dtype_name = "bfloat16"
        print("note: --device auto found CUDA: computing in bfloat16 (--dtype float32 keeps full precision)",
              file=sys.stderr)
    # no --model: the embedded default; a Hub id is downloaded (and a reference release converted once, in --dtype)
    location = model_location(args.model or None, dtype_name, args.convert_set)
    if location.is_dir():  # a model folder: what its weights take on the device, refused before reading them
        needed = weights_bytes(location, dtype_name, args.quantize)
        what = f"quantized {args.quantize}" if args.quantize else f"in {dtype_name or folder_dtype(location)}"
        line = memory_check(needed, free_memory(device), device, what)  # raises when the weights cannot fit
        if needed >= MEMORY_NOTE_BYTES:
            print(f"memory: {line}", file=sys.stderr)
    model = load(location, args.set, _manager(), dtype=dtype_name)
    _print_notes(model.recipe.notes)
    dtype = DTYPES[dtype_name] if dtype_name else None
    if args.quantize:  # cast first: the 4-bit layers compute in the model's dtype
        from groma_core.quantization import quantize_model

        return quantize_model(model.to(dtype=dtype), args.quantize, device)
    return model.to(device=device, dtype=dtype)


def _print_answer(source: str, answer) -> None:
    print(f"{source}: {answer.text or answer.raw_text}")
    for p in answer.phrases:
        boxes = "; ".join(
            f"<r{k}> [{b[0]:.0f}, {b[1]:.0f}, {b[2]:.0f}, {b[3]:.0f}]" for k, b in zip(p.region_ids, p.boxes_px)
        )
        print(f"  {p.phrase or '(region)'}: {boxes}")
    for w in answer.warnings:
        print(f"  warning: {w}")


def _prompt_with_boxes(prompt: str, boxes: list[list[float]]) -> tuple[str, list]:
    from groma_core.inference import REFER, boxes_from_text

    text, inline = boxes_from_text(prompt)
    text = text.replace("<box>", REFER)
    n_slots = text.count("<refer_feat>")
    all_boxes = inline + [tuple(b) for b in boxes]
    if n_slots != len(all_boxes):
        raise GromaError(
            f"the prompt has {n_slots} box placeholder(s) (<box> or <x1,y1,x2,y2>) but {len(all_boxes)} box(es) "
            "were given"
        )
    return text, all_boxes


def cmd_ground(args: argparse.Namespace) -> int:
    """Answer a grounded prompt about one or more images (a file, a folder or a glob): text, phrases and boxes."""
    from groma_core.images import expand_image_sources, load_image, to_normalized_xyxy
    from groma_core.inference import Request
    from groma_core.visualize import draw_answer

    sources = expand_image_sources([args.image])
    text, boxes = _prompt_with_boxes(args.prompt, args.box or [])
    images = [load_image(s) for s in sources]  # every file is checked before the model is loaded
    for source, image in zip(sources, images):  # and every box against every image
        if boxes:
            to_normalized_xyxy(boxes, image.size, what=f"boxes for {source}")
    from groma_core.inference import Groma

    groma = Groma(_load_model(args))
    results = []
    batches = [list(range(i, min(i + args.batch_size, len(images)))) for i in range(0, len(images), args.batch_size)]
    progress = None
    if len(images) > 1 and not args.json:
        from tqdm import tqdm

        progress = tqdm(total=len(images), unit="image", file=sys.stderr)
    for batch in batches:
        answers = groma.answer(
            [Request(images[i], [(text, None)], boxes) for i in batch], max_new_tokens=args.max_new_tokens
        )
        for i, answer in zip(batch, answers):
            results.append((sources[i], images[i], answer))
        if progress:
            progress.update(len(batch))
    if progress:
        progress.close()
    if args.out:
        from pathlib import Path

        out = Path(args.out)
        if len(results) > 1:
            out.mkdir(parents=True, exist_ok=True)
        for source, image, answer in results:
            target = out / f"{Path(source).stem}.png" if len(results) > 1 else out
            draw_answer(image, answer).save(target)
    if args.json:
        print(json.dumps([{"image": str(s), **a.to_dict()} for s, _, a in results], indent=1))
    else:
        for source, _, answer in results:
            _print_answer(str(source), answer)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    """Interactive grounded chat about an image; write boxes in pixels as <x1,y1,x2,y2>; an empty line or EOF ends."""
    from groma_core.images import load_image
    from groma_core.inference import ChatSession, Groma

    session = ChatSession(load_image(args.image))
    groma = Groma(_load_model(args))
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("you> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line or not line.strip() or line.strip() in {"exit", "quit"}:
            return 0
        try:
            answer = groma.chat(session, line.strip(), max_new_tokens=args.max_new_tokens)
        except GromaError as exc:
            print(f"groma: error: {one_line(exc)}", file=sys.stderr)
            continue
        _print_answer("groma", answer)


def cmd_demo(args: argparse.Namespace) -> int:
    """Serve a web page to try the model: upload an image or pick an example, draw boxes, ask, see the grounded
    answer drawn on the picture. The model is loaded before the page starts; Ctrl+C stops it."""
    import importlib.util

    missing = [m for m in ("gradio", "gradio_image_annotation") if importlib.util.find_spec(m) is None]
    if missing:
        raise GromaError(f'{", ".join(missing)} not installed: the web demo needs: pip install "groma-core[demo]"')
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no telemetry calls from a local demo
    from groma_core.demo import port_problem, serve

    problem = port_problem(args.host, args.port)  # found before minutes of model loading
    if problem:
        raise GromaError(problem)
    model = _load_model(args)
    print(f"groma demo: model {args.model or 'embedded default'} loaded; starting the page", file=sys.stderr)
    serve(
        model,
        args.host,
        args.port,
        max_pixels=args.max_image_pixels, concurrency=args.concurrency,
        max_new_tokens=args.max_new_tokens,
    )
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """Evaluate a model on a benchmark; predictions are written as they are made, so --resume continues a run."""
    from groma_core.evaluation.harness import TASKS, evaluate

    task_cls = TASKS[args.task]
    if args.max_new_tokens is not None and task_cls.max_new_tokens is None:
        raise GromaError(f"--max-new-tokens: the {args.task} task runs the region proposer alone and writes no text")
    kwargs = {"style": args.style} if args.task == "region-caption" else {}
    if args.task == "grounded-caption":
        kwargs = {"ignore_words": args.ignore_words.split(",") if args.ignore_words else ()}
    elif args.ignore_words:
        raise GromaError("--ignore-words: only the grounded-caption task matches phrases")
    task = task_cls(args.ann, args.images, max_new_tokens=args.max_new_tokens, **kwargs)
    model = _load_model(args)
    out = args.out or f"runs/eval-{args.task}"
    summary = evaluate(
        task,
        model,
        out,
        seed=args.seed,
        batch_size=args.batch_size,
        resume=args.resume,
        limit=args.limit,
        model_name=str(args.model),
    )
    if summary:
        metrics = ", ".join(f"{k} {v:.4f}" for k, v in summary["metrics"].items())
        print(f"{args.task}: {metrics} ({summary['num_samples']} samples); written to {out}/summary.json")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """Train a model through the stages of its recipe's ``train`` section: the recipe and every dataset path are
    checked before any weight is loaded; checkpoints, logs and the final model go to --out."""
    with _training_messages():
        return _train(args)


def _train(args: argparse.Namespace) -> int:
    from groma_core.api import build
    from groma_core.recipe import load_recipe
    from groma_core.schema import dataset_path_problems
    from groma_core.training import build_datasets, run_training

    manager = _manager()
    recipe = load_recipe(args.recipe, args.overrides, manager)
    _print_notes(recipe.notes)
    train = recipe.core.train
    if train is None:
        raise RecipeError(recipe.source, ["train: missing section (the training stages and their datasets)"])
    problems = dataset_path_problems(train, recipe.base_dir)
    if problems:
        raise RecipeError(recipe.source, problems)
    out = Path(args.out or f"runs/train-{recipe.core.name or Path(recipe.source).stem}")
    resume: bool | Path = False
    if args.resume is not None:
        resume = True if args.resume == "" else _checkpoint_folder(Path(args.resume))
    model = build(recipe, manager=manager)
    datasets = build_datasets(train, model, recipe.base_dir)
    result = run_training(model, train, datasets, out, resume=resume)
    steps = ", ".join(f"{name} {n} steps" for name, n in result.steps.items()) or "nothing left to train"
    print(f"trained: {steps}; final model in {result.final_dir} (load it with --model {result.final_dir})")
    return 0


@contextlib.contextmanager
def _training_messages() -> Iterator[None]:
    """While training, show the training logger's messages (dataset summaries, skipped images) on stderr as
    ``groma train: ...``, INFO included; the logger is restored afterwards (``main`` may run in-process). Under
    torchrun every process opens the same datasets, so only the first one (RANK 0) prints what opening them found
    (records marked ``once``); every process still prints what happens to its own samples."""
    log = logging.getLogger("groma_core.training")
    handler = logging.StreamHandler(sys.stderr)
    rank = os.environ.get("RANK", "0")
    handler.setFormatter(
        logging.Formatter("groma train: %(message)s" if rank == "0" else f"groma train [rank {rank}]: %(message)s")
    )
    if rank != "0":
        handler.addFilter(lambda record: not getattr(record, "once", False))
    level = log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        yield
    finally:
        log.removeHandler(handler)
        log.setLevel(level)


def _checkpoint_folder(path: Path) -> Path:
    """A checkpoint folder given to --resume: itself, or the newest checkpoint of a training output folder."""
    from groma_core.training.checkpoint import CHECKPOINTS, STATE_FILE, latest_checkpoint

    if (path / STATE_FILE).is_file():
        return path
    latest = latest_checkpoint(path / CHECKPOINTS) if (path / CHECKPOINTS).is_dir() else None
    if latest is None:
        raise GromaError(f"--resume {path}: neither a checkpoint folder nor a training output folder with checkpoints")
    return latest


def positive_int(text: str) -> int:
    """An argparse type: a whole number of at least 1 (a count or a size); anything else is a usage error."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        help="checkpoint directory, recipe, or Hugging Face repo id org/name[@revision] (downloaded; a reference "
        "release is converted once into GROMA_HOME) (default: the embedded tiny model trained on synthetic shapes)",
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default auto)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="compute dtype (default: the recipe's)")
    p.add_argument(
        "--max-new-tokens",
        type=positive_int,
        default=None,
        help="longest answer in tokens (default: the recipe's; for eval, the benchmark's as in the reference)",
    )
    p.add_argument(
        "--quantize",
        choices=["8bit", "4bit"],
        help="load the language model's decoder layers in 8 or 4 bits through bitsandbytes (made for CUDA; runs on "
        "the CPU too, slowly, with bitsandbytes >= 0.50; they compute in --dtype, on CUDA best float16 or bfloat16)",
    )
    p.add_argument("--set", action="append", default=[], metavar="key.sub=value", help="override a recipe value")
    p.add_argument(
        "--convert-set",
        action="append",
        default=[],
        metavar="key.sub=value",
        help="a Hub release only: override a value of the recipe derived from its config.json when it is converted "
        "(as `groma convert --set`; each set of these is cached as its own conversion)",
    )


def _add_recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "recipe", help="recipe file, shipped recipe name (see `groma recipes`), model folder or Hub repo id (org/name)"
    )
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="override recipe values")


class _Parser(argparse.ArgumentParser):
    """argparse's parser whose usage errors end in one line of bounded length, whatever value was given."""

    def error(self, message: str):  # type: ignore[override]
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {one_line(message)}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="groma", description="Grounded multimodal language models with swappable stages (Groma).")
    parser.add_argument("--version", action="version", version=f"groma-core {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("plugins", help="list installed plugins and their stages", description=cmd_plugins.__doc__)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--options", metavar="NAME", help="the options of the stage NAME: types, defaults, descriptions")
    p.set_defaults(func=cmd_plugins)

    p = sub.add_parser("recipes", help="list the shipped recipes, or copy one", description=cmd_recipes.__doc__)
    p.set_defaults(func=cmd_recipes)
    actions = p.add_subparsers(dest="action", metavar="ACTION")
    cp = actions.add_parser("cp", help="copy a shipped recipe to edit it", description=cmd_recipes_cp.__doc__)
    cp.add_argument("name", help="a shipped recipe (see `groma recipes`)")
    cp.add_argument("dest", help="the new file, or a folder to hold NAME.yaml (never overwritten)")
    cp.set_defaults(func=cmd_recipes_cp)

    p = sub.add_parser("validate", help="check a recipe without loading weights", description=cmd_validate.__doc__)
    _add_recipe_args(p)
    p.add_argument(
        "--print", action="store_true", help="print the validated recipe with all defaults filled in (YAML only)"
    )
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("ground", help="answer a grounded prompt about images", description=cmd_ground.__doc__)
    p.add_argument("image", help="an image file, a folder of images, or a glob")
    p.add_argument("prompt", help='e.g. "[grounding]Describe the image." or "What is <box>?" with --box')
    p.add_argument(
        "--box",
        nargs=4,
        type=float,
        action="append",
        metavar=("X1", "Y1", "X2", "Y2"),
        help="a box in pixels of the original image, one per <box> in the prompt (repeatable)",
    )
    p.add_argument("--out", help="write the annotated picture here (a folder when several images)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--batch-size", type=positive_int, default=8, help="images per batch (default 8)")
    _add_model_args(p)
    p.set_defaults(func=cmd_ground)

    p = sub.add_parser("chat", help="interactive grounded chat about an image", description=cmd_chat.__doc__)
    p.add_argument("image", help="the image to talk about")
    _add_model_args(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("demo", help="web page to try a model (needs groma-core[demo])", description=cmd_demo.__doc__)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0: all)")
    p.add_argument("--port", type=positive_int, default=7860, help="port to listen on (default 7860)")
    p.add_argument(
        "--concurrency", type=positive_int, default=8, help="requests answered at once, in one batch (default 8)"
    )
    p.add_argument(
        "--max-image-pixels",
        type=positive_int,
        default=40_000_000,
        help="largest upload in pixels, width x height (default 40,000,000)",
    )
    _add_model_args(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("eval", help="evaluate a model on a benchmark", description=cmd_eval.__doc__)
    p.add_argument(
        "task", choices=["rec", "lvis-ground", "region-caption", "grounded-caption", "detection"], help="the benchmark"
    )
    p.add_argument("--ann", required=True, help="annotation file in the reference's format")
    p.add_argument("--images", required=True, help="folder the annotation's file names are relative to")
    p.add_argument("--out", help="output folder (default runs/eval-TASK)")
    p.add_argument("--seed", type=int, default=0, help="seed of the instruction-template choice (default 0)")
    p.add_argument("--batch-size", type=positive_int, default=8, help="samples per batch (default 8)")
    p.add_argument("--resume", action="store_true", help="continue a run that stopped, keeping its predictions")
    p.add_argument("--limit", type=positive_int, help="only the first N samples")
    p.add_argument("--style", default="vg", choices=["vg", "refcocog"], help="region-caption prompts (default vg)")
    p.add_argument(
        "--ignore-words",
        metavar="W1,W2",
        help="grounded-caption: words left out when phrases are matched, besides articles and counts "
        "(e.g. small,large)",
    )
    _add_model_args(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "train", help="train a model through its recipe's training stages", description=cmd_train.__doc__
    )
    _add_recipe_args(p)
    p.add_argument(
        "--resume",
        nargs="?",
        const="",
        metavar="DIR",
        help="continue from the newest checkpoint in --out, or from DIR (a checkpoint folder or a training output)",
    )
    p.add_argument("--out", help="output folder for checkpoints, logs and the final model (default runs/train-NAME)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "models", help="list (or remove) Hub models converted into the cache", description=cmd_models.__doc__
    )
    p.set_defaults(func=cmd_models)
    actions = p.add_subparsers(dest="action", metavar="ACTION")
    rm = actions.add_parser("rm", help="delete a converted model from the cache", description=cmd_models_rm.__doc__)
    rm.add_argument("id", help="the ID `groma models` lists")
    rm.set_defaults(func=cmd_models_rm)

    from groma_core.cli_data import add_data_commands

    add_data_commands(sub)

    p = sub.add_parser("convert", help="convert a reference Groma checkpoint", description=cmd_convert.__doc__)
    p.add_argument(
        "src",
        help="reference checkpoint directory (config.json + pytorch_model*.bin or safetensors), or a Hugging Face repo "
        "id org/name[@revision] holding one (downloaded first)",
    )
    p.add_argument("dst", help="output directory (recipe.yaml + safetensors shards + tokenizer files)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="cast floating tensors")
    p.add_argument(
        "--shard-gb", type=float, default=1.0, help="shard size in GiB; also bounds the memory used (default 1)"
    )
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
    if getattr(args, "quantize", None):  # an option this machine cannot honour is a usage error, found before any work
        from groma_core.api import resolve_device
        from groma_core.quantization import check_quantization

        try:
            check_quantization(args.quantize, resolve_device(args.device))
        except GromaError as exc:
            if args.debug:
                raise
            print(f"groma: error: {one_line(exc)}", file=sys.stderr)
            return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (GromaError, OSError, ValueError, KeyError) as exc:
        if args.debug:
            raise
        print(f"groma: error: {_error_text(exc)}", file=sys.stderr)
        return 1
    except Exception as exc:  # noqa: BLE001 - a bug still ends in one line; --debug shows the traceback
        if args.debug:
            raise
        print(
            f"groma: error: internal error ({one_line(f'{type(exc).__name__}: {exc}', 300)}); this is a bug: please "
            "report it with the output of the same command run as `groma --debug ...`",
            file=sys.stderr,
        )
        return 1


def _error_text(exc: BaseException) -> str:
    """What the CLI prints for an error: one line of bounded length (a recipe's problems: one bounded line each)."""
    if isinstance(exc, RecipeError):
        return str(exc)
    return one_line(str(exc).strip() or type(exc).__name__)


if __name__ == "__main__":
    sys.exit(main())
