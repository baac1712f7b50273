"""`benchmarks/full_size.py` runs (issue 15 item 7): the Groma-7B architecture at full width and vocabulary, cut to
2 language and 4 vision layers so that the CPU can build it, built on the device and timed; the script cannot rot
unnoticed. It runs in float32 here: on CPUs without native bfloat16 arithmetic (CI's AVX2 machines) torch multiplies
bfloat16 matrices some 400 times slower, and this test ran past 15 minutes there in bfloat16."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "full_size.py"


@pytest.mark.heavy
def test_full_size_benchmark_reports_its_figures_at_reduced_depth():
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    args = "--device cpu --layers 2 --vision-layers 4 --new-tokens 3 --batches 1 --dtype float32".split()
    res = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    out = res.stdout
    assert re.search(r"^machine: .* copy bandwidth [\d.]+ GB/s$", out, re.M), out
    built = re.search(
        r"language model 2 layers, DINOv2 4 layers, float32, random weights built on cpu .* weights "
        r"([\d.]+) GiB \(language model ([\d.]+) GiB\)",
        out,
    )
    assert built, out
    # full width: two Vicuna-7B layers (2 x 202M) and the two 32,114 x 4096 tables are ~2.5 GiB in float32
    assert 2.0 < float(built.group(2)) < float(built.group(1)) < 6.0
    batch = re.search(
        r"^batch 1: time to first token \d+ ms; decode [\d.]+ tokens/s per sequence, [\d.]+ in all "
        r"\(roofline [\d.]+ tokens/s per step: (\d+)% of it\)$",
        out,
        re.M,
    )
    assert batch, out
    # each decode step reads the 2.5 GiB of language-model weights, far more than any cache, so it cannot beat the
    # copy-bandwidth roofline; 150% leaves room for the noise of the bandwidth measurement (decode was once timed
    # as the difference of two prefills and printed billions of per cent)
    assert 0 < int(batch.group(1)) <= 150, out
    assert re.search(r"^memory: [\d.]+ GiB peak resident \(host\)$", out, re.M), out
