"""`benchmarks/full_size.py` runs (issue 15 item 7): the Groma-7B architecture at full width and vocabulary, cut to
2 language and 4 vision layers so that the CPU can build it, built on the device in bfloat16 and timed; the script
cannot rot unnoticed."""

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
    args = ["--device", "cpu", "--layers", "2", "--vision-layers", "4", "--new-tokens", "3", "--batches", "1,2"]
    res = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    out = res.stdout
    assert re.search(r"^machine: .* copy bandwidth [\d.]+ GB/s$", out, re.M), out
    built = re.search(r"language model 2 layers, DINOv2 4 layers, bfloat16, random weights built on cpu .* weights "
                      r"([\d.]+) GiB \(language model ([\d.]+) GiB\)", out)
    assert built, out
    # full width: two Vicuna-7B layers (2 x 202M) and the two 32,114 x 4096 tables are ~1.2 GiB in bfloat16
    assert 1.0 < float(built.group(2)) < float(built.group(1)) < 3.0
    for batch in (1, 2):
        assert re.search(
            rf"^batch {batch}: time to first token \d+ ms; decode [\d.]+ tokens/s per sequence, [\d.]+ in all "
            r"\(roofline [\d.]+ tokens/s per step: \d+% of it\)$",
            out,
            re.M,
        ), out
    assert re.search(r"^memory: [\d.]+ GiB peak resident \(host\)$", out, re.M), out
