"""`groma train`: the shapes-tiny recipe trained on `groma data shapes` output through its five stages in a
subprocess, killed mid-way and resumed to the weights of an uninterrupted run, then loaded and asked a grounded
question; recipe and path problems reported before any weight is loaded."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "shapes-tiny.yaml"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def groma(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "groma_core.cli", *args], capture_output=True, text=True, env=ENV, timeout=300, **kwargs
    )


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """A small shapes dataset written by the CLI, and a tokenizer trained on its text."""
    from groma_core.recipe import load_recipe
    from groma_core.training.datasets import make_tokenizer

    root = tmp_path_factory.mktemp("shapes")
    done = groma("data", "shapes", str(root / "data"), "--images", "12", "--size", "160-200x120-160", "--seed", "5")
    assert done.returncode == 0, done.stderr
    recipe = load_recipe(RECIPE, [f"train.data_root={root / 'data'}"])
    make_tokenizer(recipe.core.train, root / "tokenizer", recipe.base_dir, vocab_size=600)
    return root


def overrides(shapes: Path) -> list[str]:
    return [
        f"train.data_root={shapes / 'data'}",
        f"language_backbone.tokenizer={shapes / 'tokenizer'}",
        "language_backbone.vocab_size=600",
        "train.stages.0.max_steps=2",
        "train.stages.0.batch_size=2",
        "train.stages.1.max_steps=2",
        "train.stages.1.batch_size=2",
        "train.stages.2.max_steps=6",
        "train.stages.2.batch_size=2",
        "train.stages.3.max_steps=2",
        "train.stages.3.batch_size=2",
        "train.stages.4.max_steps=2",
        "train.stages.4.batch_size=2",
        "train.save_every=2",
        "train.keep_last=3",
        "train.log_every=1",
        "train.progress=false",
        "train.tensorboard=false",
    ]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "final" / "model.safetensors"))


@pytest.mark.heavy
def test_train_kill_resume_then_ground(shapes, tmp_path):
    args = ["train", str(RECIPE), *overrides(shapes)]
    straight = groma(*args, "--out", str(tmp_path / "straight"))
    assert straight.returncode == 0, straight.stderr
    assert "final model in" in straight.stdout
    log = [json.loads(x) for x in (tmp_path / "straight" / "train_log.jsonl").read_text().splitlines()]
    assert [(x["stage"], x["step"]) for x in log] == [
        *[("crops", s) for s in (1, 2)],
        *[("detection", s) for s in (1, 2)],
        *[("reading", s) for s in range(1, 7)],
        *[("referring", s) for s in (1, 2)],
        *[("instruction", s) for s in (1, 2)],
    ]

    # a run killed as soon as the reading stage wrote its first checkpoint, then resumed from the output folder
    out = tmp_path / "resumed"
    process = subprocess.Popen(
        [sys.executable, "-m", "groma_core.cli", *args, "--out", str(out)],
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group: the kill takes the data loader's worker with it
    )
    latest = out / "checkpoints" / "latest"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        if latest.is_file() and latest.read_text().startswith("reading/"):
            os.killpg(process.pid, signal.SIGKILL)
            break
        time.sleep(0.01)
    assert process.wait(timeout=60) == -signal.SIGKILL, "the run ended before it could be killed mid-way"
    assert not (out / "final").exists()
    resumed = groma(*args, "--out", str(out), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    expected = weights(tmp_path / "straight")
    got = weights(out)
    assert set(got) == set(expected)
    for name, value in got.items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=1e-6, msg=name)
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert [(x["stage"], x["step"]) for x in log][-3:] == [("referring", 2), ("instruction", 1), ("instruction", 2)]

    import groma_core

    model = groma_core.load(out / "final")
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=1e-6, msg=name)
    image = next((shapes / "data" / "images").glob("*.png"))
    answer = groma(
        "ground", str(image), "[grounding]Give me a concise description of the image.", "--model", str(out / "final"),
        "--max-new-tokens", "8", "--json",
    )  # fmt: skip
    assert answer.returncode == 0, answer.stderr
    result = json.loads(answer.stdout)
    assert result[0]["image"] == str(image) and "text" in result[0]


def test_train_reports_dropped_boxes_and_goes_on_past_unreadable_images(shapes, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(shapes / "data", data)
    rec_file = data / "annotations" / "rec_train.json"
    rec = json.loads(rec_file.read_text())
    rec["annotations"][0]["bbox"] = [-50, -50, 20, 20]  # above-left of its image
    rec_file.write_text(json.dumps(rec))
    images = sorted((data / "images").glob("*.png"))
    for image in images[::2]:
        image.write_bytes(b"")
    args = [*overrides(shapes), f"train.data_root={data}", "train.stages.2.max_steps=2"]
    done = groma("train", str(RECIPE), *args, "--out", str(tmp_path / "out"))
    assert done.returncode == 0, done.stderr
    assert "final model in" in done.stdout
    n = len(rec["images"])
    for name in ("rec_ft", "refcocog_ft"):  # datasets no stage uses are not opened
        assert (
            f"groma train: dataset {name!r} ({rec_file}): dropped 1 box outside the image, 1 sample that lost a box "
            f"its text needs ({n - 1} of {n} samples kept)"
        ) in done.stderr.splitlines()
    # a dataset with nothing to fix says so too
    detection = data / "annotations" / "detection_train.json"
    assert any(
        line.startswith(f"groma train: dataset 'detection' ({detection}): ") and "every box inside its image" in line
        for line in done.stderr.splitlines()
    ), done.stderr
    skipped = [line for line in done.stderr.splitlines() if "skipping an unreadable image" in line]
    assert skipped and all(f"{images[0].parent}/" in line and "the file is empty (0 bytes)" in line for line in skipped)
    log = [json.loads(x) for x in (tmp_path / "out" / "train_log.jsonl").read_text().splitlines()]
    last = {x["stage"]: x["skipped_images"] for x in log}
    assert sum(last.values()) > 0
    for stage, count in last.items():
        if count:
            assert f"stage {stage!r}: {count} sample(s) were replaced by the next one" in done.stderr


def test_only_the_first_process_reports_what_opening_the_datasets_found():
    code = (
        "import logging; from groma_core.cli import _training_messages; from groma_core.training.datasets import ONCE\n"
        "log = logging.getLogger('groma_core.training')\n"
        "with _training_messages():\n"
        "    log.warning('dataset x: dropped 1 box', extra=ONCE)\n"
        "    log.warning('dataset x: skipping an unreadable image')\n"
        "log.warning('after training')\n"
        "assert log.level == logging.NOTSET and not log.handlers"
    )
    outputs = {}
    for rank in ("0", "1"):
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**ENV, "RANK": rank})
        assert done.returncode == 0, done.stderr
        outputs[rank] = done.stderr.splitlines()
    # after training the logger is as it was (Python's last-resort handler prints the bare message)
    assert outputs["0"] == [
        "groma train: dataset x: dropped 1 box",
        "groma train: dataset x: skipping an unreadable image",
        "after training",
    ]
    assert outputs["1"] == ["groma train [rank 1]: dataset x: skipping an unreadable image", "after training"]


def test_problems_are_reported_before_loading_weights(shapes, tmp_path, capsys):
    from groma_core.cli import main

    nowhere = tmp_path / "nowhere"
    assert main(["train", str(RECIPE), f"train.data_root={nowhere}", "train.stages.0.lr=0", "--out", "x"]) == 1
    assert "train.stages.0.lr: Input should be greater than 0" in capsys.readouterr().err
    assert main(["train", str(RECIPE), f"train.data_root={nowhere}", "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    for name in ("detection", "rec_ft", "instruct_ft"):
        assert f"train.datasets.{name}.ann: no such file: {nowhere}" in err
    assert f"train.datasets.rec_ft.images: no such folder: {nowhere / 'images'}" in err
    assert not (tmp_path / "out").exists()
    assert main(["validate", str(RECIPE), "train.stages.1.data.0.name=rec_p"]) == 1
    assert "train: stages.1.data.0.name: 'rec_p' is not in datasets (did you mean 'rec_pt'?)" in capsys.readouterr().err
    assert main(["train", "groma-tiny", "--out", str(tmp_path / "out")]) == 1
    assert "train: missing section" in capsys.readouterr().err
    assert main(["train", str(RECIPE), *overrides(shapes), "--resume", str(tmp_path)]) == 1
    assert f"--resume {tmp_path}: neither a checkpoint folder nor a training output folder" in capsys.readouterr().err


def test_shipped_training_recipes_validate(capsys):
    from groma_core.cli import main

    for recipe in ("shapes-tiny", "groma-7b-train"):
        assert main(["validate", recipe]) == 0, capsys.readouterr().err
