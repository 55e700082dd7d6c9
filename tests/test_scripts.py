"""The GPU helper scripts' CPU forms: they run, and report what they claim."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_profile_step_accounts_for_a_training_step(tmp_path):
    out = tmp_path / "profile.json"
    run = subprocess.run([sys.executable, "scripts/profile_step.py", "--preset", "demo", "--micro-batch", "2",
                          "--set", "model.context=32", "--warmup", "1", "--steps", "1", "--device", "cpu",
                          "--json", str(out)], cwd=ROOT, capture_output=True, text=True,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr
    report = json.loads(out.read_text())
    assert report["tokens_per_step"] == 2 * 32 and report["step_ms"] > 0 and report["mfu"] is None
    kinds = report["by_kind_ms"]
    assert kinds["matmul"] > 0 and kinds["fft"] > 0 and kinds["attention"] > 0  # demo is FFA: MHF and SWA
    assert 0 < report["loss_ms"] < sum(kinds.values())  # the loss range, gradients included
    assert "by kind" in run.stdout


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton (its interpreter runs the kernel)")
def test_bench_loss_times_every_kernel_variant_and_chunk_size(tmp_path):
    """Its CPU form runs the Triton kernel in the interpreter (the numbers mean nothing there; the shape does)."""
    run = subprocess.run([sys.executable, "scripts/bench_loss.py", "--rows", "512", "--d", "32", "--vocab", "1000",
                          "--chunk-elements", str(128 * 1024)], cwd=ROOT, capture_output=True, text=True,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1",
                              "TRITON_INTERPRET": "1", "OUT": str(tmp_path)})
    assert run.returncode == 0, run.stderr
    report = json.loads((tmp_path / "bench_loss.json").read_text())
    assert report["info"]["chunk_rows"] == 128 and report["info"]["vocab"] == 1000
    assert len(report["kernel"]) == 12 and all(r["ms"] > 0 for r in report["kernel"].values())
    assert len(report["loss"]) == 6 and all(r["ms_fwd_bwd"] > 0 for r in report["loss"].values())
    assert {name.split("grad_w ")[1] for name in report["loss"]} == {"addmm", "cast+add"}
    assert "softmax-gradient kernel, block 4096 warps 8" in run.stdout
