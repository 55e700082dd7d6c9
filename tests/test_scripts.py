"""The GPU helper scripts' CPU forms: they run, and report what they claim."""

import gzip
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



@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton (its interpreter)")
def test_bench_gate_conv_checks_every_variant_against_the_shipped_tiles(tmp_path):
    """The CPU form runs the gate convolution's kernels in the interpreter: every variant of the weight-gradient
    reduction and of the row tiles runs and agrees with the shipped tiles' result."""
    run = subprocess.run([sys.executable, "scripts/bench_gate_conv.py", "--d", "32", "--heads", "2", "--tokens",
                          "64"], cwd=ROOT, capture_output=True, text=True,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1",
                              "TRITON_INTERPRET": "1", "OUT": str(tmp_path)})
    assert run.returncode == 0, run.stderr
    report = json.loads((tmp_path / "bench_gate_conv.json").read_text())
    assert set(report["shipped"]) == {"forward", "input grad", "weight grad"}
    assert len(report["weight_grad"]) == 40 and len(report["rows"]) == 10
    for row in [*report["weight_grad"].values(), *report["rows"].values()]:
        assert "error" not in row and row["rel_err"] < 1e-5, row
    assert "weight grad variants, fastest first:" in run.stdout

# --- scripts/gpu_scaling_table.py on CPU: gloo processes stand in for GPUs ------------------------------
TINY_SETS = ["model.d_model=64", "model.n_layer=3", "model.context=64", "model.vocab_size=512",
             "model.mixers.A.window=32", "train.global_batch_tokens=512", "train.tokens=20480",
             "train.warmup_tokens=1024", "train.eval_tokens=1024"]


def scaling_table(tmp_path, data, *args: str) -> list[dict]:
    out = tmp_path / "table.json"
    run = subprocess.run([sys.executable, "scripts/gpu_scaling_table.py", "--presets", "demo", "--data", str(data),
                          "--device", "cpu", "--out", str(tmp_path / "runs"), "--json", str(out),
                          *args, *[a for s in TINY_SETS for a in ("--set", s)]], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin",
                                                      "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    assert "| preset | mode | gpus |" in run.stdout
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from test_loader import make_dataset

    return make_dataset(tmp_path_factory.mktemp("data"), train_tokens=40_000, val_tokens=4_096)


def test_scaling_table_compares_two_processes_with_one_on_the_same_batches(tmp_path, data):
    # 2 sequences per micro-step: one process accumulates 4, two processes 2 each (DDP's no_sync on the first)
    one, two = scaling_table(tmp_path, data, "--gpus", "1,2", "--micro-batch", "2", "--steps", "4", "--trace", "1")
    assert (one["gpus"], one["mode"], two["gpus"], two["mode"]) == (1, "one", 2, "ddp")
    assert one["exit"] == two["exit"] == 0 and two["tokens_per_s_per_gpu"] == round(two["tokens_per_s"] / 2)
    assert two["efficiency_pct"] == pytest.approx(100 * two["tokens_per_s_per_gpu"] / one["tokens_per_s"], abs=0.1)
    assert two["max_loss_diff"] < 1e-4 * one["last_loss"] and abs(two["loss_diff"]) <= two["max_loss_diff"]
    assert two["comm_overlap_pct"] is None  # a trace was recorded, but gloo runs no GPU kernels
    assert {p.name for p in (tmp_path / "runs" / "demo-ddp-2gpu" / "traces").iterdir()} == {"rank0.json.gz",
                                                                                           "rank1.json.gz"}


def test_scaling_table_stops_two_processes_with_sigterm_and_resumes_them_exactly(tmp_path, data):
    [row] = scaling_table(tmp_path, data, "--gpus", "2", "--micro-batch", "4", "--steps", "40", "--stop-at", "2")
    assert row["stop_exit"] == 143 and row["resume_exit"] == 0  # torchrun's own status 1 is reported as 143
    assert row["stopped_at"] < "step_00000040"
    assert row["resume_max_loss_diff"] == 0.0  # the same world size on CPU: bit for bit


def test_comm_overlap_is_the_share_of_nccl_time_beside_compute(tmp_path):
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from gpu_scaling_table import comm_overlap
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    kernels = [("gemm", 0, 10), ("gemm", 8, 4), ("ncclDevKernel_AllReduce", 5, 20), ("gemm", 20, 10),
               ("ncclDevKernel_ReduceScatter", 40, 10)]
    trace = tmp_path / "rank0.json.gz"
    with gzip.open(trace, "wt") as handle:
        json.dump({"traceEvents": [{"cat": "kernel", "name": n, "ts": ts, "dur": d} for n, ts, d in kernels]
                   + [{"cat": "cpu_op", "name": "nccl:all_reduce", "ts": 0, "dur": 100}]}, handle)
    assert comm_overlap(trace) == 40.0  # 5-12 and 20-25 of 5-25 and 40-50 ran beside a compute kernel
