"""`caracal demo` end to end on the embedded corpus (shortened): every stage runs and reports."""

import json
from pathlib import Path

from typer.testing import CliRunner

from caracal_cli.cli import app


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

    again = CliRunner().invoke(app, args)  # a re-run reuses the prepared data and the finished run
    assert again.exit_code == 0, again.output
    assert json.loads(again.output[again.output.index("{\n"):])["steps"] == 12
