"""`caracal ablate` on the demo preset: every variant of both studies trains, evaluates and lands in one
table; re-runs skip finished variants and resume interrupted ones; a failing variant is reported, not fatal."""

from __future__ import annotations

import json

import pytest
from test_loader import make_dataset
from typer.testing import CliRunner

from caracal_cli import ablate
from caracal_cli.checkpoint import latest_checkpoint, read_meta
from caracal_cli.cli import app
from caracal_cli.config import load_preset
from caracal_cli.train import train

# The demo preset shrunk so one variant trains in about a second.
SMALL = ["model.d_model=32", "model.n_layer=6", "model.context=32", "model.vocab_size=512",
         "model.mixers.A.window=8", "train.micro_batch=4", "train.global_batch_tokens=256",
         "train.warmup_tokens=256", "train.eval_tokens=512", "train.eval_every=100", "train.log_every=100"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data"), train_tokens=20_000, val_tokens=2_048)


def sets(*items):
    return [arg for item in items for arg in ("--set", item)]


def test_both_studies_produce_a_complete_table_and_rerun_from_cache(data, tmp_path):
    out = tmp_path / "ablate"
    args = ["ablate", "--size", "demo", "--data", str(data), "--steps", "3", "--out", str(out),
            "--device", "cpu", *sets(*SMALL)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "ablation.json").read_text())
    for name, study in ablate.STUDIES.items():
        rows = report["studies"][name]["rows"]
        assert [r["variant"] for r in rows] == [v.name for v in study.variants]
        for row in rows:
            assert "error" not in row, row
            assert row["val_loss"] > 0 and row["val_ppl"] > 1 and row["tokens"] == 3 * 256
            assert row["paper_avg_acc"] == next(v.paper_avg_acc for v in study.variants if v.name == row["variant"])
    rows = {r["variant"]: r for r in report["studies"]["components"]["rows"]}
    assert rows["no_swa"]["layers"] == "6 mhf" and rows["full"]["layers"] == "4 mhf + 2 attention(w=8)"
    assert rows["no_swa"]["params"] < rows["full"]["params"]  # an MHF layer is smaller than attention
    markdown = (out / "ablation.md").read_text()
    assert "w/o SWA & PC" in markdown and "| 5:1 |" in markdown and "49.01" in markdown and "43.35" in markdown

    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0 and again.output.count("done (cached)") == 9


def test_an_interrupted_variant_resumes_and_a_failing_one_is_reported(data, tmp_path, monkeypatch):
    out = tmp_path / "ablate"
    shared = SMALL + ablate.budget_overrides("demo", None, 4, SMALL)
    # Interrupt the 2:1 variant after two of its four steps.
    first = out / "ratio" / "2to1"
    train(load_preset("demo", shared + ["model.pattern=FFA"]), data, first, max_steps=2, device="cpu", quiet=True)
    assert read_meta(latest_checkpoint(first))["step"] == 2
    broken = ablate.Variant("broken", "broken variant", ("model.mixers.F.gate=bogus",), 0.0)
    study = ablate.STUDIES["ratio"]
    monkeypatch.setitem(ablate.STUDIES, "ratio", ablate.Study("ratio", study.title, study.paper_size,
                                                              (study.variants[2], broken)))
    report = ablate.run_studies("ratio", "demo", data, out, steps=4, overrides=SMALL, device="cpu")
    resumed, failed = report["studies"]["ratio"]["rows"]
    assert read_meta(latest_checkpoint(first))["step"] == 4 and "error" not in resumed
    assert "model.mixers.F.gate must be one of" in failed["error"]
    assert "failed" in ablate.markdown_report(report)


@pytest.mark.parametrize("signal_name, code", [("SIGTERM", 143), ("SIGINT", 130)])
def test_a_signal_stops_the_study_and_the_variant_is_not_recorded_as_done(data, tmp_path, monkeypatch,
                                                                          signal_name, code):
    """A signal during a variant's training (the trainer saves a checkpoint and returns) stopped only that
    variant: ablate then evaluated the half-trained model, recorded it as done and trained the next one. Now
    the study stops with the signal's exit status, and a re-run resumes that variant."""
    import caracal_cli.train as trainer

    real, calls = trainer.train, []

    def stopped_after_one_step(config, data_dir, run_dir, **kwargs):
        calls.append(run_dir)
        result = real(config, data_dir, run_dir, max_steps=1, **kwargs)
        return {**result, "stopped_by": signal_name}

    monkeypatch.setattr(trainer, "train", stopped_after_one_step)
    out = tmp_path / "ablate"
    args = ["ablate", "--size", "demo", "--study", "ratio", "--data", str(data), "--steps", "3", "--out",
            str(out), "--device", "cpu", *sets(*SMALL)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == code and "Traceback" not in result.output, result.output
    assert f"ablate stopped ({signal_name})" in result.output and "run the same command again" in result.output
    [run_dir] = calls  # the next variant did not start
    assert not (run_dir / ablate.RESULT_FILE).exists() and read_meta(latest_checkpoint(run_dir))["step"] == 1
    monkeypatch.setattr(trainer, "train", real)
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0, again.output
    assert read_meta(latest_checkpoint(run_dir))["step"] == 3 and (run_dir / ablate.RESULT_FILE).is_file()

def test_torchrun_stopped_by_a_signal_stops_the_study(data, tmp_path, monkeypatch):
    """Under torchrun the ranks save and exit 143 (or 130): the study stops with that status; any other failure
    stays one failed variant among the others."""
    import caracal_cli.train as trainer

    statuses = iter([1, 143])
    monkeypatch.setattr(trainer, "launch", lambda cmd: next(statuses))
    args = ["ablate", "--size", "demo", "--study", "ratio", "--data", str(data), "--steps", "1", "--out",
            str(tmp_path), "--device", "cpu", "--nproc-per-node", "2", *sets(*SMALL)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 143 and "ablate stopped (SIGTERM)" in result.output, result.output
    assert "failed: CaracalError: torchrun exited with status 1" in result.output

def test_lm_eval_tasks_are_evaluated_per_variant(data, tmp_path):
    from caracal_cli.evaluate import write_local_task

    tasks_dir = tmp_path / "tasks"
    examples = [{"question": f"the quick brown {w}", "choices": ["fox", "dog"], "answer": i % 2}
                for i, w in enumerate(["a", "b", "c", "d"])]
    write_local_task(tasks_dir, "tiny_mc", examples)
    report = ablate.run_studies("ratio", "demo", data, tmp_path / "out", steps=2, overrides=SMALL,
                                tasks=["tiny_mc"], include_path=tasks_dir, device="cpu")
    for row in report["studies"]["ratio"]["rows"]:
        assert "error" not in row, row
        assert 0 <= row["avg_acc"] <= 1 and "tiny_mc" in row["tasks"]


def test_bad_input_is_refused(data, tmp_path):
    result = CliRunner().invoke(app, ["ablate", "--data", str(data), "--study", "everything", "--size", "demo",
                                      "--out", str(tmp_path)])
    assert result.exit_code == 1 and "unknown study 'everything'" in result.output
    result = CliRunner().invoke(app, ["ablate", "--data", str(tmp_path / "none"), "--size", "demo"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    # A bad --limit (or task: lm-eval's index of tasks takes seconds to build) is refused before any variant
    # trains: each trained, then failed to evaluate.
    result = CliRunner().invoke(app, ["ablate", "--data", str(data), "--size", "demo", "--study", "ratio",
                                      "--out", str(tmp_path / "out"), "--tasks", "lambada", "--limit", "0"])
    assert result.exit_code == 1 and "--limit must be > 0" in result.output and not (tmp_path / "out").exists()



def test_a_missing_dataset_is_refused_before_any_variant_trains(data, tmp_path):
    """Offline, a task whose data is not at hand failed each variant's evaluation after its training; the
    datasets are loaded up front now, and the message names the task."""
    from caracal_cli.evaluate import write_local_task

    tasks_dir = tmp_path / "tasks"
    write_local_task(tasks_dir, "tiny_mc", [{"question": "q", "choices": ["a", "b"], "answer": 0}])
    (tasks_dir / "tiny_mc.jsonl").unlink()
    result = CliRunner().invoke(app, ["ablate", "--data", str(data), "--size", "demo", "--study", "ratio",
                                      "--out", str(tmp_path / "out"), "--tasks", "tiny_mc", "--include-path",
                                      str(tasks_dir), "--device", "cpu", *sets(*SMALL)])
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert "task tiny_mc: cannot read its local data files" in result.output.replace("\n", " ")
    assert not (tmp_path / "out").exists()

def test_failed_variants_make_the_exit_status_1(data, tmp_path):
    """The study goes on past a failed variant and writes its table, but exits 1 (it exited 0)."""
    result = CliRunner().invoke(app, ["ablate", "--data", str(data), "--size", "demo", "--study", "ratio",
                                      "--steps", "1", "--device", "cpu", "--out", str(tmp_path),
                                      *sets(*SMALL, "train.eval_tokens=8")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "error: 4 variant(s) failed (5:1, 3:1, 2:1 (default), 1:1)" in result.output.replace("\n", " ")
    assert (tmp_path / "ablation.md").is_file()


def test_variants_train_under_torchrun_and_resume_there(data, tmp_path, monkeypatch):
    """--nproc-per-node 2 (gloo on CPU): a fresh variant and one interrupted after its first step end alike."""
    study = ablate.STUDIES["ratio"]
    monkeypatch.setitem(ablate.STUDIES, "ratio", ablate.Study("ratio", study.title, study.paper_size,
                                                              (study.variants[2],)))
    fresh = ablate.run_studies("ratio", "demo", data, tmp_path / "fresh", steps=2, overrides=SMALL, device="cpu",
                               nproc_per_node=2)["studies"]["ratio"]["rows"][0]
    partial = tmp_path / "resumed" / "ratio" / "2to1"
    shared = SMALL + ablate.budget_overrides("demo", None, 2, SMALL)
    train(load_preset("demo", shared + ["model.pattern=FFA"]), data, partial, max_steps=1, device="cpu", quiet=True)
    resumed = ablate.run_studies("ratio", "demo", data, tmp_path / "resumed", steps=2, overrides=SMALL,
                                 device="cpu", nproc_per_node=2)["studies"]["ratio"]["rows"][0]
    assert "error" not in fresh and "error" not in resumed
    assert read_meta(latest_checkpoint(partial))["step"] == 2
    assert resumed["val_loss"] == pytest.approx(fresh["val_loss"], rel=1e-5)
