"""The GPU helper scripts' CPU forms: they run, and report what they claim."""

import json
import subprocess
import sys
from pathlib import Path

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
