"""`caracal demo` end to end on the embedded corpus (shortened): every stage runs and reports."""

import json
import types
from pathlib import Path

from test_loader import make_dataset
from typer.testing import CliRunner

from caracal_cli import demo, prepare
from caracal_cli import train as train_module
from caracal_cli.cli import app
from caracal_cli.shards import load_manifest


def test_demo_runs_every_stage_and_improves_perplexity(tmp_path):
    out = tmp_path / "demo"
    args = ["demo", "--out", str(out), "--steps", "12", "--device", "cpu", "--json",
            "--set", "train.eval_every=1000", "--set", "train.eval_tokens=16384"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output[result.output.index("{\n"):])
    assert summary["steps"] == 12
    assert summary["val_ppl_after"] < 0.5 * summary["val_ppl_before"]
    assert set(summary["eval"]) == {"shakespeare_next_line", "shakespeare_last_word"}
    assert 0 <= summary["eval"]["shakespeare_next_line"]["acc"] <= 1
    assert summary["sample"].startswith("ROMEO:")
    for key in ("data", "run", "checkpoint", "results", "tasks_dir"):
        assert Path(summary[key]).exists(), key
    assert "validation perplexity" in result.output and "caracal generate --checkpoint" in result.output
    assert "caracal loglikelihood" not in result.output and "it/s]" not in result.output  # no lm-eval bars

    again = CliRunner().invoke(app, args)  # a re-run reuses the prepared data and the finished run
    assert again.exit_code == 0, again.output
    assert json.loads(again.output[again.output.index("{\n"):])["steps"] == 12


def test_an_interrupted_demo_reports_it_and_exits_130(tmp_path, monkeypatch):
    """Ctrl-C during training: the demo neither evaluates the half-trained model nor claims success."""
    data = make_dataset(tmp_path / "demo" / "data", 4_000, 1_000, vocab_size=4096)
    monkeypatch.setattr(prepare, "prepare_shakespeare",
                        lambda out, **_: types.SimpleNamespace(manifest=load_manifest(data)))
    monkeypatch.setattr(train_module, "evaluate_val_loss", lambda *args, **kwargs: 8.0)
    asked = {}

    def stopped(*args, **kwargs):
        asked.update(kwargs)
        return {"stopped_by": "SIGINT", "step": 3, "checkpoint": None}

    monkeypatch.setattr(train_module, "train", stopped)
    summary = demo.run_demo(tmp_path / "demo", steps=10, device="cpu", say=lambda line: None)
    assert summary["stopped_by"] == "SIGINT" and summary["steps"] == 3 and "eval" not in summary
    assert "caracal demo" in asked["resume_command"]  # the trainer's own hint would skip the evaluation
    monkeypatch.setattr(demo, "run_demo", lambda *args, **kwargs: summary)
    result = CliRunner().invoke(app, ["demo", "--out", str(tmp_path / "demo"), "--device", "cpu"])
    assert result.exit_code == 130
    assert "demo interrupted (SIGINT) during training, after step 3 of 10: nothing was evaluated" in \
        result.output.replace("\n", " ")
