"""Pack a trained checkpoint directory as the embedded default model (``groma_core/default_model``).

    python scripts/pack_default_model.py runs/shapes-tiny/final groma_core/default_model

Copies the recipe (its tokenizer path pointing at a copy of the tokenizer inside the folder; without the `train`
section, whose data paths are the trainer's: `recipes/shapes-tiny.yaml` has it; region order seeded so that the same
question gets the same answer) and stores the weights in float16 (the recipe's dtype, float32, is restored at load).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import yaml
from safetensors.torch import load_file, save_file


def pack(source: Path, dest: Path) -> None:
    recipe = yaml.safe_load((source / "recipe.yaml").read_text(encoding="utf-8"))
    tokenizer = Path(recipe["language_backbone"]["tokenizer"])
    if not tokenizer.is_absolute():
        tokenizer = source / tokenizer
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    shutil.copytree(tokenizer, dest / "tokenizer")
    recipe["language_backbone"]["tokenizer"] = "tokenizer"
    recipe["weights"] = "model.safetensors"
    recipe.pop("train", None)
    recipe.setdefault("region_selection", {})["seed"] = 0
    state = load_file(str(source / "model.safetensors"))
    half = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in state.items()}
    save_file(half, str(dest / "model.safetensors"), metadata={"format": "pt"})
    (dest / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="checkpoint directory (recipe.yaml + model.safetensors)")
    parser.add_argument("dest", type=Path, help="folder to (re)write")
    args = parser.parse_args()
    pack(args.source, args.dest)
    size = sum(f.stat().st_size for f in args.dest.rglob("*") if f.is_file())
    print(f"packed {args.source} -> {args.dest} ({size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
