"""The researcher's daily loop without training anything: a fast CLI (no torch for --help and usage errors),
finding runs at any depth, `caracal plot` and `caracal compare` (their PNGs read back), the summary a run ends
with, narrow-terminal tables, --threads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import matplotlib.image
import pytest
import yaml
from typer.testing import CliRunner

from caracal_cli import cli
from caracal_cli.cli import app
from caracal_cli.runs import (RunError, compare_runs, config_diff, find_runs, final_metrics, newest_run, plot_runs,
                              run_dir_of, summary_lines)

runner = CliRunner()


def fake_run(path: Path, lr: float = 1e-3, steps: int = 6, slope: float = 0.5, checkpoint: bool = True) -> Path:
    """A run directory as `caracal train` leaves it: config.yaml, metrics.jsonl, a checkpoint's meta.json."""
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(yaml.safe_dump({"name": "demo", "model": {"d_model": 128},
                                                      "train": {"lr": lr, "tokens": 512 * steps}}))
    records = []
    for step in range(1, steps + 1):
        records.append({"step": step, "tokens": 512 * step, "loss": 6 - slope * step, "lr": lr,
                        "tokens_per_s": 1000.0 + step, "mfu": None, "elapsed": 0.5 * step})
        if step % 3 == 0:
            records.append({"step": step, "tokens": 512 * step, "val_loss": 6.2 - slope * step + 2 * (step == 6),
                            "val_ppl": 400.0, "elapsed": 0.5 * step})
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if checkpoint:
        ckpt = path / "checkpoints" / f"step_{steps:08d}"
        ckpt.mkdir(parents=True)
        (ckpt / "meta.json").write_text(json.dumps({"step": steps}))
        (ckpt / "model.safetensors").write_bytes(b"")
    return path


def python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})


# --- a fast command line ------------------------------------------------------------------------------------
def test_the_cli_module_imports_without_torch_and_quickly():
    result = python("import sys, time; t = time.perf_counter(); import caracal_cli.cli; "
                    "print(time.perf_counter() - t, 'torch' in sys.modules)")
    seconds, torch_loaded = result.stdout.split()
    assert torch_loaded == "False", result.stderr
    assert float(seconds) < 2.0  # ~0.2 s on 2 idle cores; torch alone takes 2.5 s


@pytest.mark.parametrize("args, message", [
    (["train", "--preset", "tny"], "unknown preset 'tny' (did you mean 'tiny'?)"),
    (["train", "--preset", "tiny", "--set", "train.lrr=1"], "unknown key config.train.lrr (did you mean 'lr'?)"),
    (["info", "--preset", "smal"], "did you mean 'small'"),
    (["demo", "--set", "model.n_layers=2"], "did you mean 'n_layer'?"),
    (["train", "--resume", "runs/x", "--set", "model.d_model=8"], "--resume cannot change model.d_model"),
])
def test_usage_errors_are_found_before_torch_loads(args, message):
    code = ("import sys; from caracal_cli.cli import app\n"
            f"try:\n    app({args!r}, prog_name='caracal')\n"
            "except SystemExit as e:\n    print('exit', e.code, 'torch' in sys.modules)")
    result = python(code)
    assert result.stdout.strip().endswith("exit 1 False"), result.stdout + result.stderr
    assert message in result.stderr.replace("\n", " ")


def test_help_has_no_bool_placeholders_and_every_command_an_example():
    top = runner.invoke(app, ["--help"])
    assert "<bool>" not in top.output and "--version" in top.output
    for command in ["info", "train", "eval", "generate", "plot", "compare", "speed", "demo"]:
        result = runner.invoke(app, [command, "--help"])
        assert "Example" in result.output and "<bool>" not in result.output, command


def test_wide_tables_become_a_list_on_a_narrow_terminal(monkeypatch, capsys):
    from rich.table import Table

    table = Table(title="Shipped presets")
    for column in ("preset", "family", "params", "d_model", "n_layer", "n_head", "pattern", "context"):
        table.add_column(column)
    table.add_row("jamba-demo", "jamba", "2.1M", "128", "6", "4", "MMMMAMMM", "128")
    monkeypatch.setattr(cli.console, "width", 120)
    cli.print_table(table)
    assert "┃ preset" in capsys.readouterr().out
    monkeypatch.setattr(cli.console, "width", 50)
    cli.print_table(table)
    out = capsys.readouterr().out
    assert "jamba-demo: family jamba, params 2.1M, d_model 128" in out and "…" not in out


def test_threads_sets_openmp_and_torch_threads(monkeypatch):
    import torch

    before = torch.get_num_threads()
    for name in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY"):
        monkeypatch.setenv(name, "x")  # recorded, so the test's changes are undone
        monkeypatch.delenv(name)
    try:
        assert cli.set_threads(1) == 1 and torch.get_num_threads() == 1
        assert os.environ["OMP_NUM_THREADS"] == "1" and os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    finally:
        torch.set_num_threads(before)
    defaults = ("import os; from caracal_cli.cli import set_threads; "
                "print(set_threads(None, processes=10**6), set_threads(None), os.environ['OMP_WAIT_POLICY'])")
    assert python(defaults).stdout.split() == ["1", "1", "PASSIVE"]  # at least one thread; then it is set
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert python(defaults).stdout.split() == ["3", "3", "PASSIVE"]  # the user's setting wins


# --- finding runs ---------------------------------------------------------------------------------------
def test_runs_are_found_at_any_depth_and_from_any_checkpoint(tmp_path):
    old = fake_run(tmp_path / "runs" / "tiny-1")
    time.sleep(0.01)
    new = fake_run(tmp_path / "runs" / "demo" / "run")
    fresh = fake_run(tmp_path / "runs" / "ablate" / "full", checkpoint=False)
    assert find_runs(tmp_path / "runs") == sorted([old, new, fresh])
    assert newest_run(tmp_path / "runs") == new  # the newest checkpoint; `fresh` has none yet
    assert newest_run(tmp_path / "runs", with_checkpoint=False) == fresh
    checkpoint = new / "checkpoints" / "step_00000006"
    for inside in (new, checkpoint, checkpoint / "model.safetensors", new / "checkpoints"):
        assert run_dir_of(inside) == new
    with pytest.raises(RunError, match="not inside a run directory"):
        run_dir_of(tmp_path)
    with pytest.raises(RunError, match="no run with a checkpoint under"):
        newest_run(tmp_path / "empty")


# --- plot and compare -----------------------------------------------------------------------------------
def test_plot_writes_a_png_and_a_table_of_last_and_best(tmp_path):
    run = fake_run(tmp_path / "runs" / "a")
    report = plot_runs([run], "val_loss", tmp_path / "val.png")
    image = matplotlib.image.imread(report["png"])
    assert image.shape[0] > 300 and image.shape[1] > 600 and image[..., :3].std() > 0.05  # a real picture
    [row] = report["runs"]
    assert row["points"] == 2 and row["last"] == pytest.approx(5.2) and row["best"] == pytest.approx(4.7)
    result = runner.invoke(app, ["plot", "--runs-dir", str(tmp_path / "runs"), "--metric", "lr"])
    assert result.exit_code == 0, result.output
    assert (run / "plots" / "lr.png").is_file() and "0.001" in result.output
    missing = runner.invoke(app, ["plot", str(run), "--metric", "accuracy"])
    assert missing.exit_code == 1 and "no 'accuracy' in metrics.jsonl (it has" in missing.output


def test_compare_diffs_configs_and_puts_curves_on_one_figure(tmp_path):
    a = fake_run(tmp_path / "a" / "run", lr=1e-3)
    b = fake_run(tmp_path / "b" / "run", lr=3e-3, steps=9, slope=0.4)
    assert config_diff([a, b]) == {"train.lr": [1e-3, 3e-3], "train.tokens": [3072, 4608]}
    result = runner.invoke(app, ["compare", str(a), str(b / "checkpoints" / "step_00000009"), "--out",
                                 str(tmp_path / "cmp")])
    assert result.exit_code == 0, result.output
    assert "train.lr" in result.output and "a/run" in result.output and "b/run" in result.output
    report = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert [r["step"] for r in report["runs"]] == [6, 9]
    first = report["runs"][0]
    assert first["best_val_loss"] == pytest.approx(4.7) and first["val_loss"] == pytest.approx(5.2)
    image = matplotlib.image.imread(tmp_path / "cmp" / "compare.png")
    assert image.shape[0] > 600 and image[..., :3].std() > 0.05
    with pytest.raises(RunError, match="two runs or more"):
        compare_runs([a], tmp_path / "one")


def test_plot_and_compare_refuse_damaged_runs_in_one_line(tmp_path):
    """A torn last metrics line (a run killed while appending) is left out; a damaged line elsewhere, a config
    that is not a mapping, or an --out that is a directory is one line (they raised tracebacks)."""
    a, b = fake_run(tmp_path / "a"), fake_run(tmp_path / "b")
    with open(a / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 7, "lo')
    assert runner.invoke(app, ["plot", str(a), "-o", str(tmp_path / "a.png")]).exit_code == 0
    (b / "config.yaml").write_text("- 1\n")
    for args, message in ((["plot", str(a), "-o", str(tmp_path)], f"{tmp_path}: is a directory"),
                          (["compare", str(a), str(b), "-o", str(tmp_path / "c")], "must be a YAML mapping")):
        result = runner.invoke(app, args)
        assert result.exit_code == 1 and message in result.output and "Traceback" not in result.output
    (a / "metrics.jsonl").write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    result = runner.invoke(app, ["plot", str(a)])
    assert result.exit_code == 1 and "metrics.jsonl:2: not a metrics record" in result.output


def test_final_metrics_and_the_end_of_run_summary(tmp_path):
    run = fake_run(tmp_path / "run")
    final = final_metrics(run)
    assert final["best_val_loss"] == pytest.approx(4.7) and final["best_val_step"] == 3
    assert final["tokens_per_s"] == 1004.0  # the median after the first (warm-up) step
    result = {"run_dir": str(run), "step": 6, "tokens": 3072, "steps_run": 6, "elapsed": 3.0, "tokens_per_s": 1004.0,
              "mfu": 0.25, "val_loss": 5.2, "val_ppl": 181.3, "checkpoint": str(run / "checkpoints" / "step_6"),
              "stopped_by": None}
    text = "\n".join(summary_lines(result, 75.0))
    for part in ("done: step 6, 3,072 tokens", "this session 1m15s", "1.0k tokens/s", "MFU 25.0%",
                 "validation: loss 5.2000, perplexity 181.30; best 4.7000 at step 3",
                 f"caracal eval --checkpoint {run}",
                 f"caracal train --resume {run} --set train.tokens="):
        assert part in text, part
