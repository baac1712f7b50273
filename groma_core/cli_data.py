"""The ``groma data`` commands: datasets written in the reference Groma's own annotation formats."""

from __future__ import annotations

import argparse

from groma_core.data.shapes import (
    PHRASE_STYLES,
    ShapesConfig,
    parse_count_range,
    parse_size_ranges,
    write_shapes_dataset,
)

_DEFAULTS = ShapesConfig()


def cmd_data_shapes(args: argparse.Namespace) -> int:
    """Write a synthetic dataset of coloured shapes (images + detection, REC, region caption, grounded caption,
    LVIS-Ground, Groma Instruct and caption-conversation annotations, split into train and val). The same options
    and seed always give byte-identical files; OUT/dataset.json lists the files and counts."""
    width, height = parse_size_ranges(args.size)
    config = ShapesConfig(
        images=args.images,
        seed=args.seed,
        width=width,
        height=height,
        objects=parse_count_range(args.objects),
        val_fraction=args.val_fraction,
        rec_per_image=args.rec_per_image,
        phrases=args.phrases,
    )
    summary = write_shapes_dataset(args.out, config, overwrite=args.overwrite)
    for split, counts in summary["splits"].items():
        print(f"{split}: {counts['images']} images, {counts['objects']} shapes, "
              f"{counts['referring_expressions']} referring expressions, {counts['lvis_queries']} LVIS-Ground queries, "
              f"{counts['conversations']} conversations")
    print(f"wrote {args.out} (layout and files in {args.out}/dataset.json)")
    return 0


def add_data_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``data`` command and its subcommands to the ``groma`` parser's subparsers."""
    data = subparsers.add_parser(
        "data",
        help="make datasets in the reference's annotation formats",
        description="Make datasets in the reference Groma's annotation formats.",
    )
    data.set_defaults(func=lambda _args: _print_help(data))
    kinds = data.add_subparsers(dest="data_command", metavar="DATASET")
    p = kinds.add_parser("shapes", help="synthetic images of coloured shapes with every annotation format",
                         description=cmd_data_shapes.__doc__)
    p.add_argument("out", help="output folder (absent or empty, or an earlier shapes dataset with --overwrite)")
    p.add_argument("--images", type=int, default=_DEFAULTS.images,
                   help=f"number of images (default {_DEFAULTS.images})")
    p.add_argument("--seed", type=int, default=_DEFAULTS.seed, help=f"random seed (default {_DEFAULTS.seed})")
    default_size = f"{_DEFAULTS.width[0]}-{_DEFAULTS.width[1]}x{_DEFAULTS.height[0]}-{_DEFAULTS.height[1]}"
    p.add_argument("--size", default=default_size, metavar="WxH",
                   help=f"image sizes in pixels, each side a number or a MIN-MAX range (default {default_size})")
    default_objects = f"{_DEFAULTS.objects[0]}-{_DEFAULTS.objects[1]}"
    p.add_argument("--objects", default=default_objects, metavar="MIN-MAX",
                   help=f"shapes per image (default {default_objects})")
    p.add_argument("--val-fraction", type=float, default=_DEFAULTS.val_fraction,
                   help=f"share of images in the val split (default {_DEFAULTS.val_fraction})")
    p.add_argument("--rec-per-image", type=int, default=_DEFAULTS.rec_per_image,
                   help=f"most referring expressions per image (default {_DEFAULTS.rec_per_image})")
    p.add_argument("--phrases", choices=PHRASE_STYLES, default=_DEFAULTS.phrases,
                   help="grounded captions and answers: 'grouped' names alike shapes in one phrase with all their "
                        "boxes (\"two blue squares\"), 'each' gives every shape its own phrase, left to right "
                        f"(default {_DEFAULTS.phrases})")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier shapes dataset in OUT")
    p.set_defaults(func=cmd_data_shapes)


def _print_help(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 0
