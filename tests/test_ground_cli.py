"""`groma ground` and `groma chat` end to end with the default plugins at tiny size (random weights)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from groma_core.testing.tiny import make_sentencepiece


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tok")
    make_sentencepiece(d)
    return d


@pytest.fixture(scope="module")
def pictures(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("pics")
    for i, size in enumerate([(120, 80), (64, 100), (90, 90)]):
        img = Image.new("RGB", size, (40 * i, 180, 90))
        img.paste((220, 30, 30), (5, 5, size[0] // 2, size[1] // 2))
        img.save(d / f"pic{i}.png")
    return d


def groma(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "groma_core.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        input=stdin,
        timeout=600,
    )


def model_args(tokenizer_dir: Path) -> list[str]:
    return ["--model", "groma-tiny", "--set", f"language_backbone.tokenizer={tokenizer_dir}", "--max-new-tokens", "6"]


def test_ground_json_picture_and_box(tokenizer_dir, pictures, tmp_path):
    out_png = tmp_path / "annotated.png"
    res = groma(
        "ground",
        str(pictures / "pic0.png"),
        "What is <box>?",
        "--box",
        "10",
        "10",
        "60",
        "40",
        "--json",
        "--out",
        str(out_png),
        *model_args(tokenizer_dir),
    )
    assert res.returncode == 0, res.stderr
    (answer,) = json.loads(res.stdout)
    assert answer["image"].endswith("pic0.png") and answer["image_size"] == [120, 80]
    assert isinstance(answer["text"], str) and "phrases" in answer and len(answer["regions"]) >= 1
    # the user box is one of the regions, normalized
    assert any(abs(r[0] - 10 / 120) < 1e-5 and abs(r[3] - 40 / 80) < 1e-5 for r in answer["regions"])
    assert Image.open(out_png).size == (120, 80)


def test_ground_on_a_folder_runs_batched(tokenizer_dir, pictures, tmp_path):
    res = groma(
        "ground",
        str(pictures),
        "[grounding]Describe the image.",
        "--batch-size",
        "2",
        "--out",
        str(tmp_path / "out"),
        *model_args(tokenizer_dir),
    )
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["pic0.png", "pic1.png", "pic2.png"]
    assert sum(line.startswith(str(pictures)) for line in res.stdout.splitlines()) == 3


@pytest.mark.parametrize(
    "args, message",
    [
        (["missing.png", "Hi."], "missing.png"),
        (["{pic}", "What is <box>?"], "1 box placeholder(s)"),
        (["{pic}", "What is <box>?", "--box", "10", "10", "500", "40"], "outside"),
        (["{pic}", "Hi.", "--box", "10", "10", "50", "40"], "0 box placeholder(s)"),
        (["{pic}", "What is <box>?", "--box", "50", "10", "20", "40"], "x2"),
        (["{pic}", "What is <1,2,x,4>?"], "numbers"),
    ],
)
def test_ground_bad_input_is_one_line(tokenizer_dir, pictures, args, message):
    args = [a.replace("{pic}", str(pictures / "pic0.png")) for a in args]
    res = groma("ground", *args, *model_args(tokenizer_dir))
    assert res.returncode == 1
    assert message in res.stderr and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_chat_keeps_history_and_reads_boxes(tokenizer_dir, pictures):
    res = groma(
        "chat",
        str(pictures / "pic1.png"),
        *model_args(tokenizer_dir),
        stdin="What is <5,5,30,50>?\nAnd what is next to it?\n",
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("groma:") == 2


def test_bad_images_devices_and_models_are_one_line_errors(tokenizer_dir, pictures, tmp_path):
    import io

    cases = {}
    (tmp_path / "empty.jpg").write_bytes(b"")
    cases["empty.jpg"] = "empty.jpg"
    (tmp_path / "notes.jpg").write_text("just some text\n")
    cases["notes.jpg"] = "not an image"
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(buf, "JPEG")
    (tmp_path / "cut.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    cases["cut.jpg"] = "cut.jpg"
    Image.new("RGB", (1, 1)).save(tmp_path / "dot.png")
    cases["dot.png"] = "1x1"
    out = tmp_path / "annotated.png"
    for name, message in cases.items():
        res = groma("ground", str(tmp_path / name), "Hi.", "--out", str(out), *model_args(tokenizer_dir))
        assert res.returncode == 1 and message in res.stderr and name in res.stderr, (name, res.stderr)
        assert len(res.stderr.strip().splitlines()) == 1 and not out.exists()
    env_big = {"GROMA_MAX_IMAGE_PIXELS": "100"}
    big = subprocess.run(
        [
            sys.executable,
            "-m",
            "groma_core.cli",
            "ground",
            str(pictures / "pic0.png"),
            "Hi.",
            *model_args(tokenizer_dir),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, **env_big},
        timeout=300,
    )
    assert big.returncode == 1 and "pic0.png" in big.stderr and "GROMA_MAX_IMAGE_PIXELS" in big.stderr
    res = groma("ground", str(pictures / "pic0.png"), "Hi.", *model_args(tokenizer_dir), "--device", "tpu9")
    assert res.returncode == 1 and "--device 'tpu9'" in res.stderr and "Traceback" not in res.stderr
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "recipe.yaml").write_text(
        (Path(__file__).parents[1] / "recipes" / "groma-tiny.yaml").read_text() + "\nweights: .\n"
    )
    res = groma(
        "ground",
        str(pictures / "pic0.png"),
        "Hi.",
        "--model",
        str(tmp_path / "model"),
        "--set",
        f"language_backbone.tokenizer={tokenizer_dir}",
    )
    assert res.returncode == 1 and "no .safetensors files" in res.stderr and "Traceback" not in res.stderr
