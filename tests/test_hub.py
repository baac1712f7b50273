"""Models from the Hugging Face Hub (`--model org/name`), through the real huggingface_hub, offline.

Tiny checkpoints are laid out as the releases are (groma-7b-finetune: one pytorch_model.bin; groma-7b-pretrain:
pytorch_model-0000x-of-00003.bin + index; both with config.json, tokenizer files and added_tokens.json) in a real Hub
cache folder (models--org--name/blobs, snapshots/<sha>/ links, refs/main) under a temporary HF_HOME; the tests run
with HF_HUB_OFFLINE=1 (conftest), so huggingface_hub resolves everything from that cache as it would after a download.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from groma_core import load
from groma_core.errors import GromaError
from groma_core.hub import MARKER, models_dir
from groma_core.inference import Groma
from groma_core.testing import tiny
from groma_core.testing.fixtures import GoldenSet, require_golden_sets
from groma_core.tokens import NEW_TOKENS

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "images" / "shapes.png"
SHA = "6614b2f0c1d2e3f4a5b6c7d8e9f00112233445566"[:40]
VOCAB = 400  # the SentencePiece model trained here; the LLM's embedding rows are cut to it


@pytest.fixture(scope="module")
def release_files(tmp_path_factory) -> dict[str, bytes]:
    """The files of a tiny groma-7b-finetune-like release: the golden fixture's reference weights (embedding rows cut
    to the tokenizer trained here), its config, and the tokenizer files the release ships."""
    gs = GoldenSet(require_golden_sets()[0])
    state = dict(gs.weights())
    for key in ("llm.model.embed_tokens.weight", "llm.lm_head.weight"):
        state[key] = state[key][:VOCAB].clone()
    config = json.loads(json.dumps(gs.groma_config))
    config["llm_cfg"]["vocab_size"] = VOCAB
    work = tmp_path_factory.mktemp("release")
    tiny.make_sentencepiece(work)
    torch.save(state, work / "pytorch_model.bin")
    files = {
        "config.json": json.dumps(config).encode(),
        "pytorch_model.bin": (work / "pytorch_model.bin").read_bytes(),
        "tokenizer.model": (work / "tokenizer.model").read_bytes(),
        "tokenizer_config.json": json.dumps({"tokenizer_class": "LlamaTokenizer", "model_max_length": 2048}).encode(),
        "special_tokens_map.json": json.dumps({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}).encode(),
        "added_tokens.json": json.dumps({t: VOCAB + i for i, t in enumerate(NEW_TOKENS)}).encode(),
        "generation_config.json": b'{"bos_token_id": 1, "eos_token_id": 2}',
        "preprocessor_config.json": b'{"image_mean": [0.485, 0.456, 0.406]}',
        "trainer_state.json": b'{"global_step": 1}',
        "training_args.bin": b"not needed to run the model",
    }
    return files


def sharded(files: dict[str, bytes], tmp: Path, shards: int = 3) -> dict[str, bytes]:
    """The same release laid out as groma-7b-pretrain: pytorch_model-0000x-of-0000y.bin + index."""
    (tmp / "single.bin").write_bytes(files["pytorch_model.bin"])
    state = torch.load(tmp / "single.bin", weights_only=True)
    out = {k: v for k, v in files.items() if k != "pytorch_model.bin"}
    keys, weight_map = list(state), {}
    for i in range(shards):
        name = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        torch.save({k: state[k] for k in keys[i::shards]}, tmp / name)
        out[name] = (tmp / name).read_bytes()
        weight_map.update({k: name for k in keys[i::shards]})
    out["pytorch_model.bin.index.json"] = json.dumps({"metadata": {}, "weight_map": weight_map}).encode()
    return out


def put_in_hub_cache(hf_home: Path, repo: str, files: dict[str, bytes], sha: str = SHA, ref: str = "main") -> Path:
    """Lay ``files`` out as huggingface_hub's cache holds a downloaded repo: blobs named by their hash, the snapshot
    folder of commit ``sha`` linking to them, and ``refs/<ref>`` naming the commit."""
    repo_dir = hf_home / "hub" / ("models--" + repo.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / sha
    for name, data in files.items():
        blob = repo_dir / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / ref).write_text(sha)
    return snapshot


def groma(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    full = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **env}
    return subprocess.run(
        [sys.executable, "-m", "groma_core.cli", *args], capture_output=True, text=True, env=full, timeout=600
    )


REGION_DIM = "region_encoder.region_dim=64"  # the golden fixture's patched width, which no config.json can express


@pytest.fixture
def homes(tmp_path, monkeypatch) -> dict[str, str]:
    env = {"HF_HOME": str(tmp_path / "hf"), "GROMA_HOME": str(tmp_path / "groma")}
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return env


@pytest.fixture(scope="module")
def by_hand(release_files, tmp_path_factory) -> Path:
    """The release converted by hand, as a user does without the Hub: `groma convert SRC DST`."""
    work = tmp_path_factory.mktemp("by-hand")
    src = work / "groma-7b-finetune"
    src.mkdir()
    for name, data in release_files.items():
        (src / name).write_bytes(data)
    out = groma("convert", str(src), str(work / "converted"), "--quiet", "--set", REGION_DIM, env={})
    assert out.returncode == 0, out.stderr
    return work / "converted"


def caption(model) -> tuple[str, list]:
    answer = Groma(model).caption(Image.open(EXAMPLE).convert("RGB"), max_new_tokens=12)
    return answer.raw_text, [(p.phrase, [list(map(float, b)) for b in p.boxes_px]) for p in answer.phrases]


def logits(model) -> torch.Tensor:
    ids = torch.tensor([[1, 5, 9, 33, 70, VOCAB + 3]])  # a new token too
    with torch.no_grad():
        return model.language_backbone(model.language_backbone.embed(ids), torch.ones_like(ids)).logits


def conversions(repo: str) -> list[Path]:
    folder = models_dir() / repo.replace("/", "--")
    return sorted(p for p in folder.iterdir() if not p.name.startswith(".")) if folder.is_dir() else []


def test_release_converts_once_and_answers_as_the_hand_conversion(release_files, by_hand, homes, capfd):
    put_in_hub_cache(Path(homes["HF_HOME"]), "FoundationVision/groma-7b-finetune", release_files)
    model = load("FoundationVision/groma-7b-finetune", convert_overrides=[REGION_DIM])
    assert "converting FoundationVision/groma-7b-finetune" in capfd.readouterr().err
    expected = load(by_hand)
    assert caption(model) == caption(expected)
    assert torch.equal(logits(model), logits(expected))
    for key, value in expected.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key

    (folder,) = conversions("FoundationVision/groma-7b-finetune")
    assert folder.name.startswith(SHA[:12]) and (folder / MARKER).is_file()
    marker = json.loads((folder / MARKER).read_text())
    assert marker["commit"] == SHA and marker["repo"] == "FoundationVision/groma-7b-finetune"
    assert "tokenizer/added_tokens.json" in marker["files"]
    stamp = (folder.stat().st_ino, (folder / MARKER).stat().st_mtime_ns)

    again = load("FoundationVision/groma-7b-finetune", convert_overrides=[REGION_DIM])
    assert "converting" not in capfd.readouterr().err  # the cached conversion, not a second one
    assert (folder.stat().st_ino, (folder / MARKER).stat().st_mtime_ns) == stamp
    assert caption(again) == caption(expected)

    # the HF download may go (to free its space): the cached conversion still loads, offline, by repo id
    import shutil

    shutil.rmtree(Path(homes["HF_HOME"]) / "hub")
    assert caption(load("FoundationVision/groma-7b-finetune", convert_overrides=[REGION_DIM])) == caption(expected)


def test_sharded_release_at_a_revision_in_bfloat16(release_files, by_hand, homes, tmp_path):
    files = sharded(release_files, tmp_path)
    put_in_hub_cache(Path(homes["HF_HOME"]), "FoundationVision/groma-7b-pretrain", files, ref="v1")
    model = load("FoundationVision/groma-7b-pretrain@v1", dtype="bfloat16", convert_overrides=[REGION_DIM])
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    expected = load(by_hand, dtype="bfloat16")
    assert torch.equal(logits(model), logits(expected))
    (folder,) = conversions("FoundationVision/groma-7b-pretrain")
    assert folder.name == f"{SHA[:12]}-bfloat16-set" + folder.name.rsplit("-set", 1)[1]


def test_killed_or_damaged_conversion_is_never_used_and_is_rebuilt(release_files, by_hand, homes, capfd):
    repo = "FoundationVision/groma-7b-finetune"
    put_in_hub_cache(Path(homes["HF_HOME"]), repo, release_files)
    expected = caption(load(by_hand))
    load(repo, convert_overrides=[REGION_DIM])
    (folder,) = conversions(repo)
    capfd.readouterr()

    # a conversion killed midway: its temporary folder with a partial shard, and the final folder without marker
    partial = folder.parent / f".{folder.name}.tmp-99999"
    partial.mkdir()
    (partial / "model-00001.safetensors.partial").write_bytes(b"\0" * 100)
    (folder / MARKER).unlink()
    assert caption(load(repo, convert_overrides=[REGION_DIM])) == expected
    assert "converting" in capfd.readouterr().err  # rebuilt, not taken as complete
    assert not partial.exists() and (folder / MARKER).is_file()

    # a shard truncated by hand: the marker's sizes no longer match, so it is rebuilt too
    shard = next(folder.glob("model-*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:1000])
    assert caption(load(repo, convert_overrides=[REGION_DIM])) == expected
    assert "converting" in capfd.readouterr().err


def test_two_processes_converting_at_once_convert_once(release_files, homes):
    repo = "FoundationVision/groma-7b-finetune"
    put_in_hub_cache(Path(homes["HF_HOME"]), repo, release_files)
    code = (
        "import sys; from groma_core import load; "
        f"m = load({repo!r}, convert_overrides=[{REGION_DIM!r}]); print(sum(p.numel() for p in m.parameters()))"
    )
    env = {**os.environ, **homes, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )
        for _ in range(2)
    ]
    results = [p.communicate(timeout=600) + (p.returncode,) for p in procs]
    assert [r[2] for r in results] == [0, 0], results
    assert results[0][0] == results[1][0]
    assert sum(r[1].count("groma: converting") for r in results) == 1  # the second waited and reused
    assert len(conversions(repo)) == 1
    assert not list(conversions(repo)[0].parent.glob(".*.tmp-*"))  # no temporary folder left


def test_quantize_with_a_hub_id_quantizes_the_cached_conversion(release_files, by_hand, homes):
    """`--quantize 8bit` with a Hub id: the release is converted once as usual and its language model's projections
    are loaded as bitsandbytes 8-bit layers; the answer is the one of the hand conversion quantized the same way."""
    import bitsandbytes as bnb

    repo = "FoundationVision/groma-7b-finetune"
    put_in_hub_cache(Path(homes["HF_HOME"]), repo, release_files)
    model = load(repo, quantize="8bit", convert_overrides=[REGION_DIM])
    layer = model.get_submodule("language_backbone.llm.model.layers.0.self_attn.q_proj")
    assert type(layer) is bnb.nn.Linear8bitLt and layer.weight.dtype == torch.int8
    assert caption(model) == caption(load(by_hand, quantize="8bit"))
    assert len(conversions(repo)) == 1  # the conversion is the float one; quantization happens at load


def test_detector_only_release_from_the_hub_is_a_detector_pipeline(release_files, homes, tmp_path):
    """groma-det-pretrain (config.json of model_type ddetr, the perceiver's tensors only) by repo id: converted once,
    its proposer gives the boxes of the same release converted by hand, and `groma eval detection` runs on it."""
    from groma_core.convert import convert_checkpoint

    (tmp_path / "full.bin").write_bytes(release_files["pytorch_model.bin"])
    full = torch.load(tmp_path / "full.bin", weights_only=True)
    state = {k[len("perceiver.") :]: v for k, v in full.items() if k.startswith("perceiver.")}
    torch.save(state, tmp_path / "pytorch_model.bin")
    perceiver = json.loads(release_files["config.json"])["perceiver_cfg"]
    assert perceiver["model_type"] == "ddetr"
    files = {
        "config.json": json.dumps(perceiver).encode(),
        "pytorch_model.bin": (tmp_path / "pytorch_model.bin").read_bytes(),
        "preprocessor_config.json": release_files["preprocessor_config.json"],
    }
    repo = "FoundationVision/groma-det-pretrain"
    put_in_hub_cache(Path(homes["HF_HOME"]), repo, files)
    rest = [REGION_DIM, "language_backbone.hidden_size=64", "language_backbone.num_hidden_layers=1",
            "language_backbone.intermediate_size=128"]
    model = load(repo, convert_overrides=rest)
    src = tmp_path / "det"
    src.mkdir()
    for name, data in files.items():
        (src / name).write_bytes(data)
    convert_checkpoint(src, tmp_path / "by-hand", recipe_overrides=rest)
    expected = load(tmp_path / "by-hand")
    image = Image.open(EXAMPLE).convert("RGB")
    with torch.no_grad():
        got = model.propose(model.encode_images(model.image_tokenizer.preprocess([image]), [image]))
        want = expected.propose(expected.encode_images(expected.image_tokenizer.preprocess([image]), [image]))
    assert torch.equal(got.boxes[0], want.boxes[0]) and torch.equal(got.scores[0], want.scores[0])

    detection = {
        "images": [{"id": 1, "file_name": EXAMPLE.name, "width": image.width, "height": image.height}],
        "annotations": [{"id": 1, "image_id": 1, "bbox": [40, 55, 125, 120], "area": 15000, "category_id": 1}],
        "categories": [{"id": 1, "name": "object"}],
    }
    (tmp_path / "det.json").write_text(json.dumps(detection))
    args = ["eval", "detection", "--model", repo, "--ann", str(tmp_path / "det.json"), "--images", str(EXAMPLE.parent),
            "--out", str(tmp_path / "eval")]
    args += [a for setting in rest for a in ("--convert-set", setting)]
    out = groma(*args, env=homes)
    assert out.returncode == 0, out.stderr
    assert len(conversions(repo)) == 1  # the CLI took the conversion load() made
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert summary["num_samples"] == 1 and 0.0 <= summary["metrics"]["AR@100"] <= 1.0


def test_model_folder_repo_loads_without_conversion(by_hand, homes):
    files = {p.relative_to(by_hand).as_posix(): p.read_bytes() for p in by_hand.rglob("*") if p.is_file()}
    put_in_hub_cache(Path(homes["HF_HOME"]), "someone/groma-tuned", files)
    model = load("someone/groma-tuned")
    assert caption(model) == caption(load(by_hand))
    assert not models_dir().exists()  # nothing converted, nothing cached by groma


def test_hub_id_as_a_recipe_validate_and_extends(by_hand, homes, tmp_path):
    """A model on the Hub is a recipe like a local model folder: `groma validate org/name`, and a fine-tuning
    recipe that `extends: org/name` (its weights included) with a change of its own."""
    files = {p.relative_to(by_hand).as_posix(): p.read_bytes() for p in by_hand.rglob("*") if p.is_file()}
    put_in_hub_cache(Path(homes["HF_HOME"]), "someone/groma-tuned", files)
    out = groma("validate", "someone/groma-tuned", env=homes)
    assert out.returncode == 0 and out.stdout.startswith("ok: "), out.stderr
    mine = tmp_path / "mine.yaml"
    mine.write_text("extends: someone/groma-tuned\nregion_selection: {max_regions: 3}\n")
    model = load(mine)
    assert model.selection.max_regions == 3
    assert caption(model) == caption(load(by_hand, ["region_selection.max_regions=3"]))
    missing = tmp_path / "missing.yaml"
    missing.write_text("extends: someone/not-cached\n")
    out = groma("validate", str(missing), env=homes)
    assert out.returncode == 1, out.stderr
    assert "extends: someone/not-cached: no such local path, and not in the Hugging Face cache" in out.stderr
    assert out.stderr.rstrip().endswith("(missing.yaml -> 'someone/not-cached')")  # the chain named


def test_local_path_wins_over_a_hub_id(by_hand, homes, tmp_path, monkeypatch):
    (tmp_path / "someone").mkdir()
    import shutil

    shutil.copytree(by_hand, tmp_path / "someone" / "groma-tuned")
    monkeypatch.chdir(tmp_path)
    assert caption(load("someone/groma-tuned")) == caption(load(by_hand))  # the folder, though no such repo is cached


def test_groma_convert_takes_a_hub_id(release_files, by_hand, homes, tmp_path):
    put_in_hub_cache(Path(homes["HF_HOME"]), "FoundationVision/groma-7b-finetune", release_files)
    repo = "FoundationVision/groma-7b-finetune"
    out = groma("convert", repo, str(tmp_path / "out"), "--quiet", "--set", REGION_DIM, env=homes)
    assert out.returncode == 0, out.stderr
    assert caption(load(tmp_path / "out")) == caption(load(by_hand))


def test_offline_and_not_cached_is_one_line_saying_what_to_download(homes):
    repo = "FoundationVision/groma-7b-finetune"
    out = groma("ground", str(EXAMPLE), "[grounding]Describe.", "--model", repo, env=homes)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    (line,) = out.stderr.strip().splitlines()
    assert "not in the Hugging Face cache" in line and "HF_HUB_OFFLINE=1" in line
    assert "hf download FoundationVision/groma-7b-finetune" in line


def test_not_a_groma_checkpoint_and_unknown_revision(homes):
    llama = {"config.json": b'{"model_type": "llama"}', "model.safetensors": b"x"}
    put_in_hub_cache(Path(homes["HF_HOME"]), "meta/llama-tiny", llama)
    with pytest.raises(GromaError, match=r"meta/llama-tiny: not a Groma checkpoint: config.json has model_type 'lla"):
        load("meta/llama-tiny")
    put_in_hub_cache(Path(homes["HF_HOME"]), "org/notes", {"README.md": b"# nothing here"})
    with pytest.raises(GromaError, match="no recipe.yaml and no config.json; expected a reference Groma release"):
        load("org/notes")
    with pytest.raises(GromaError, match="not in the Hugging Face cache"):  # offline: a revision never downloaded
        load("meta/llama-tiny@v9")


@pytest.mark.heavy
def test_models_lists_and_removes_cached_conversions(release_files, homes):
    put_in_hub_cache(Path(homes["HF_HOME"]), "FoundationVision/groma-7b-finetune", release_files)
    empty = groma("models", env=homes)
    assert empty.returncode == 0 and "no converted models" in empty.stdout
    made = groma(
        "ground", str(EXAMPLE), "[grounding]Describe.", "--model", "FoundationVision/groma-7b-finetune",
        "--convert-set", REGION_DIM, "--dtype", "float16", "--max-new-tokens", "4", env=homes,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    listed = groma("models", env=homes)
    assert listed.returncode == 0
    header, row = listed.stdout.strip().splitlines()
    assert header.split() == ["ID", "REPO", "REVISION", "COMMIT", "DTYPE", "SIZE", "PATH"]
    model_id, repo, revision, commit, dtype, size, unit, path = row.split()
    assert (repo, revision, commit, dtype) == ("FoundationVision/groma-7b-finetune", "(default)", SHA[:12], "float16")
    assert Path(path).is_dir() and model_id.startswith("FoundationVision/groma-7b-finetune@")
    unknown = groma("models", "rm", "FoundationVision/nope@123", env=homes)
    assert unknown.returncode == 1 and "no cached model with that ID" in unknown.stderr
    assert len(unknown.stderr.strip().splitlines()) == 1
    removed = groma("models", "rm", model_id, env=homes)
    assert removed.returncode == 0 and not Path(path).exists()
    assert "no converted models" in groma("models", env=homes).stdout


class FakeHub:
    """A local HTTP server answering as the Hub's API does for a missing repo, a gated repo and an unknown revision
    (status and ``X-Error-Code`` header); huggingface_hub talks to it through ``HF_ENDPOINT``, unpatched."""

    ANSWERS = {"missing": (404, "RepoNotFound"), "gated": (403, "GatedRepo"), "@nope": (404, "RevisionNotFound")}

    def __enter__(self) -> str:
        import http.server
        import threading

        answers = self.ANSWERS

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - the http.server hook's name
                status, code = next(
                    (a for key, a in answers.items() if key.strip("@") in self.path), (500, "Unexpected")
                )
                self.send_response(status)
                self.send_header("X-Error-Code", code)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            do_HEAD = do_GET  # noqa: N815

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_hub_failures_are_one_line_each(homes, tmp_path):
    import socket

    with socket.socket() as s:  # a port nothing listens on: no network
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    cases = ["org/missing", "org/gated", "org/model@nope"]
    code = (
        "import sys; from groma_core.cli import main\n"
        f"for model in {cases!r}:\n"
        f"    main(['ground', {str(EXAMPLE)!r}, 'x', '--model', model])\n"
    )
    env = {**os.environ, **homes, "HF_HUB_OFFLINE": "0", "HF_HUB_ETAG_TIMEOUT": "5", "HF_HUB_DOWNLOAD_TIMEOUT": "5"}
    env.pop("HF_TOKEN", None)
    with FakeHub() as endpoint:
        env["HF_ENDPOINT"] = endpoint
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 3 and all(line.startswith("groma: error: ") for line in lines), out.stderr
    assert "org/missing: no such local path, and no model repo of that name on the Hugging Face Hub" in lines[0]
    assert "log in first" in lines[0]
    assert "org/gated: a gated repo" in lines[1] and "HF_TOKEN" in lines[1]
    assert "org/model@nope: the repo has no revision 'nope'" in lines[2]
    offline_net = subprocess.run(
        [sys.executable, "-m", "groma_core.cli", "ground", str(EXAMPLE), "x", "--model", "org/model"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**env, "HF_ENDPOINT": f"http://127.0.0.1:{closed}"},
    )
    assert offline_net.returncode == 1
    (line,) = offline_net.stderr.strip().splitlines()
    assert "the Hugging Face Hub cannot be reached" in line and "hf download org/model" in line


def test_too_little_disk_space_is_one_line_before_converting(release_files, homes):
    repo = "FoundationVision/groma-7b-finetune"
    files = {k: v for k, v in release_files.items() if k != "pytorch_model.bin"}
    snapshot = put_in_hub_cache(Path(homes["HF_HOME"]), repo, files)
    huge = snapshot.parent.parent / "blobs" / "sparse-weights"
    with open(huge, "wb") as f:  # a sparse file: 8 TiB by its size, no disk used
        f.truncate(8 * 1024**4)
    (snapshot / "pytorch_model.bin").symlink_to(os.path.relpath(huge, snapshot))
    with pytest.raises(GromaError, match=r"converting needs about 8192\.0 GiB free in .*groma-7b-finetune, which"):
        load(repo)
    assert conversions(repo) == [] and not list((models_dir() / "FoundationVision--groma-7b-finetune").glob(".*tmp*"))


def test_a_write_that_fails_midway_leaves_nothing_and_says_so(release_files, homes):
    """The disk fills while the shards are written: the command ends in one line naming the folder and the OS's
    reason, removes what it wrote, and the next call (with room again) converts from the start. The process's file-size
    limit (RLIMIT_FSIZE, SIGXFSZ ignored) makes the write fail as a full disk does, with an OSError from write(),
    without needing a small file system to be mounted."""
    repo = "FoundationVision/groma-7b-finetune"
    put_in_hub_cache(Path(homes["HF_HOME"]), repo, release_files)
    limit = len(release_files["pytorch_model.bin"]) // 4  # the converted shard is about as big as the release
    code = (
        "import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
        f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit})); "
        "from groma_core.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    args = ["ground", str(EXAMPLE), "Describe the image.", "--model", repo, "--convert-set", REGION_DIM,
            "--max-new-tokens", "2"]
    env = {**os.environ, **homes, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr
    line = out.stderr.strip().splitlines()[-1]
    assert re.search(r"converting into .*\.tmp-\d+ failed \(.*File too large.*\); nothing was kept", line), line
    folder = models_dir() / "FoundationVision--groma-7b-finetune"
    assert conversions(repo) == [] and not list(folder.glob(".*tmp*")), "no partial files left"
    assert caption(load(repo, convert_overrides=[REGION_DIM]))  # room again: converted and answering
    assert len(conversions(repo)) == 1


def test_release_with_a_shard_missing_from_the_cache_is_one_line(release_files, homes, tmp_path):
    files = sharded(release_files, tmp_path)
    del files["pytorch_model-00002-of-00003.bin"]  # a download cut short, then offline
    put_in_hub_cache(Path(homes["HF_HOME"]), "FoundationVision/groma-7b-pretrain", files)
    with pytest.raises(GromaError) as failed:
        load("FoundationVision/groma-7b-pretrain")
    message = str(failed.value)
    assert "\n" not in message and "the download is incomplete: pytorch_model-00002-of-00003.bin" in message
    assert "hf download FoundationVision/groma-7b-pretrain" in message
    assert conversions("FoundationVision/groma-7b-pretrain") == []
