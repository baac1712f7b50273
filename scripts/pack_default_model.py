"""Pack a trained checkpoint directory as the embedded default model (``groma_core/default_model``).

    python scripts/pack_default_model.py runs/shapes-tiny/final groma_core/default_model [--as recipes/shapes-tiny.yaml]

Copies the recipe (its tokenizer path pointing at a copy of the tokenizer inside the folder; without the `train`
section, whose data paths are the trainer's: `recipes/shapes-tiny.yaml` has it; region order seeded so that the same
question gets the same answer) and stores the weights in float16 (the recipe's dtype, float32, is restored at load).
With ``--as RECIPE`` the run must have been trained by that recipe's every setting (data paths aside); the packed
recipe then takes its name and description (a run of an experiment file under another name packs as the shipped one).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import yaml
from safetensors.torch import load_file, save_file

#: settings that may differ between a run's recipe and the one it is packed as: names, the trainer's data paths and
#: the generation settings (inference only: the packed model takes the recipe's)
_PATHS = {
    ("name",),
    ("description",),
    ("weights",),
    ("language_backbone", "tokenizer"),
    ("train", "data_root"),
    ("generation",),
}


def _differences(a: object, b: object, at: tuple = ()) -> list[str]:
    if at in _PATHS:
        return []
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b), key=str) for d in _differences(a.get(k), b.get(k), (*at, k))]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _differences(x, y, (*at, i))]
    return [] if a == b else [f"{'.'.join(map(str, at))}: run {a!r}, recipe {b!r}"]


def pack(source: Path, dest: Path, as_recipe: Path | None = None) -> None:
    recipe = yaml.safe_load((source / "recipe.yaml").read_text(encoding="utf-8"))
    if as_recipe is not None:
        from groma_core.recipe import load_recipe

        wanted = load_recipe(as_recipe).to_dict()
        problems = _differences(load_recipe(source).to_dict(), wanted)
        if problems:
            raise SystemExit(f"{source} was not trained by {as_recipe}: " + "; ".join(problems))
        recipe["name"], recipe["description"] = wanted["name"], wanted.get("description")
        recipe["generation"] = wanted["generation"]
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
    parser.add_argument("--as", dest="as_recipe", type=Path, help="recipe file the run must have been trained by")
    args = parser.parse_args()
    pack(args.source, args.dest, args.as_recipe)
    size = sum(f.stat().st_size for f in args.dest.rglob("*") if f.is_file())
    print(f"packed {args.source} -> {args.dest} ({size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
