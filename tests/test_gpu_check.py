"""The one-shot GPU check (benchmarks/gpu_check.sh) where it can run here: without a GPU it refuses at
once, saying why, before installing anything; its Python part goes through every step on the CPU
provider (--dry-run-on-cpu): real servers, real wrk load, the answers compared with the CPU provider."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from conftest import REPO
from serving import runtime

pytestmark = pytest.mark.slow


@pytest.mark.skipif(runtime.gpu_present(), reason="this machine has an NVIDIA GPU: `make gpu-check` runs the real check")
@pytest.mark.parametrize("command", [["bash", "benchmarks/gpu_check.sh"], [sys.executable, "-m", "benchmarks.gpu_check"]],
                         ids=["script", "python"])
def test_without_a_gpu_the_check_refuses_at_once(command):
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "no NVIDIA GPU on this machine" in done.stderr and "nothing was" in done.stderr
    assert done.stdout == ""  # refused before any install or measurement


@pytest.mark.skipif(shutil.which("wrk") is None,
                    reason="wrk (Debian package) is not installed; the GPU check installs it itself on its host")
def test_the_check_runs_start_to_finish_on_the_cpu(tmp_path):
    out = tmp_path / "gpu_check.json"
    done = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--dry-run-on-cpu", "--connections", "4",
                           "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["passed"] and result["checks"] == {"both_models_on_cpu": True, "classifier_matches_cpu": True,
                                                     "dehazer_matches_cpu": True}
    assert result["served_providers"] == {"classifier": "CPUExecutionProvider", "dehazer": "CPUExecutionProvider"}
    assert result["parity"]["classifier"]["max_abs_probability_difference"] < 1e-5
    for row in (*result["served"], result["dehaze"], *result["batching_off"]):
        assert row["requests_ok"] > 0 and row["errors"] == {}, row
    assert result["served"][0]["p1"] > 0 and result["batching_off"][0]["p2"] > 0 and result["dehaze"]["p5"] > 0
