"""What loading a model needs, said before loading (issue 15 item 3): the weights' size in the chosen dtype or
quantization, read from the safetensors headers, against what the device has free; a model that cannot fit is
refused in one line before its weights are read."""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from groma_core.api import default_model, free_memory, load, memory_check, weights_bytes
from groma_core.errors import GromaError

GROMA = str(Path(sys.executable).with_name("groma"))
PROMPT = "[grounding]Give me a concise description of the image."
EXAMPLE = Path(__file__).parents[1] / "examples" / "images" / "shapes.png"


def loaded_bytes(model: torch.nn.Module) -> int:
    """What the loaded model's tensors take (parameters and saved buffers, quantized storage included)."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


@pytest.mark.parametrize("dtype", [None, "float32", "bfloat16", "float16"])
def test_the_estimate_is_what_the_loaded_model_takes(dtype):
    """Exact for plain dtypes: the headers list every tensor the model loads (1% allows a saved tensor the model
    folds into another)."""
    model = load(dtype=dtype)
    assert weights_bytes(default_model(), dtype) == pytest.approx(loaded_bytes(model), rel=0.01)


def test_the_8bit_estimate_is_what_the_quantized_model_takes():
    """bitsandbytes' int8 layers keep a float32 scale per row besides the int8 matrix: within 5%."""
    quantized = load(quantize="8bit")
    estimate = weights_bytes(default_model(), None, "8bit")
    assert estimate == pytest.approx(loaded_bytes(quantized), rel=0.05)
    assert estimate < weights_bytes(default_model(), None)


def test_a_model_that_does_not_fit_is_refused_with_what_it_needs_and_has():
    cpu = torch.device("cpu")
    with pytest.raises(GromaError) as caught:
        memory_check(14 * 1024**3, 8 * 1024**3, cpu, "in bfloat16")
    message = str(caught.value)
    assert "\n" not in message
    assert "14.0 GiB in bfloat16 on cpu" in message and "only 8.0 GiB is free" in message
    assert "--quantize" in message
    assert memory_check(10 * 1024**2, 8 * 1024**3, cpu, "in float32").endswith("(8.0 GiB free)")
    assert memory_check(10 * 1024**2, None, cpu, "in float32") == "the weights need about 10.0 MiB in float32 on cpu"


def test_free_memory_of_the_host_is_read():
    free = free_memory(torch.device("cpu"))
    if not Path("/proc/meminfo").is_file():
        assert free is None
    else:
        assert 0 < free < os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def run_ground(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    command = [GROMA, "ground", str(EXAMPLE), PROMPT, "--max-new-tokens", "4", *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)


def big_model_folder(folder: Path, elements: int) -> Path:
    """A model folder (the embedded recipe) whose one float16 tensor of ``elements`` values lies in a sparse file:
    its safetensors header is real, its data reads as zeros and takes no disk."""
    folder.mkdir()
    shutil.copy(default_model() / "recipe.yaml", folder / "recipe.yaml")
    header = json.dumps({"language_backbone.llm.lm_head.weight": {"dtype": "F16", "shape": [elements // 1024, 1024],
                                                                  "data_offsets": [0, 2 * elements]}}).encode()
    header += b" " * (-len(header) % 8)
    with open(folder / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        f.truncate(8 + len(header) + 2 * elements)
    return folder


def test_a_small_model_loads_without_a_memory_line():
    res = run_ground("--dtype", "bfloat16")
    assert res.returncode == 0, res.stderr
    assert "memory:" not in res.stderr and "bfloat16 (--dtype" not in res.stderr  # no CUDA note on the CPU
    assert res.stdout.startswith(f"{EXAMPLE}: ")


def test_a_model_larger_than_the_free_memory_is_refused_before_loading(tmp_path):
    free = free_memory(torch.device("cpu"))
    if free is None:
        pytest.skip("the host's free memory cannot be read here")
    elements = (free // 4 // 2**20 + 256) * 2**20  # float32: a little more than what is free
    folder = big_model_folder(tmp_path / "big", elements)
    assert weights_bytes(folder, "float32") == 4 * elements
    res = run_ground("--model", str(folder), "--dtype", "float32", "--device", "cpu")
    assert res.returncode != 0
    line = res.stderr.strip().splitlines()[-1]
    assert re.fullmatch(
        r"groma: error: the weights need about [\d.]+ GiB in float32 on cpu, but only [\d.]+ GiB is free there: use "
        r"--quantize 8bit or 4bit, a 16-bit --dtype, or a larger device",
        line,
    ), res.stderr
    # in float16 they would take half: said before loading, then loading goes on (and finds a tensor the
    # model does not have: the folder is no real checkpoint)
    half = run_ground("--model", str(folder), "--dtype", "float16", "--device", "cpu")
    expected = 2 * elements / 1024**3
    assert f"memory: the weights need about {expected:.1f} GiB in float16 on cpu (" in half.stderr
