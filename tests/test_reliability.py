"""Nothing lost: one writer per run or dataset directory, verified checkpoints with fallback, exact resume (or a
refusal naming why not), and a one-line error for every bad input. Numbers in the names are issue #24's cases;
the last test kills training at seeded random points and checks that resuming ends byte-identical."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from test_loader import make_dataset
from test_train import TINY, tiny_args, train_losses
from typer.testing import CliRunner

from caracal_cli import prepare, shards
from caracal_cli import train as train_module
from caracal_cli.checkpoint import CheckpointError, intact_checkpoint, latest_checkpoint, resolve_checkpoint
from caracal_cli.cli import app
from caracal_cli.config import ConfigError, load_preset
from caracal_cli.fileio import LOCK_FILE, DirectoryLock, LockError, sha256_file
from caracal_cli.loader import DataError, TrainBatches, open_dataset
from caracal_cli.monitor import MetricsLog, read_metrics
from caracal_cli.train import train

runner = CliRunner()
TESTS = Path(__file__).parent


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("data"), train_tokens=40_000, val_tokens=4_096)


def config(*extra: str):
    return load_preset("demo", [*TINY, *extra])


@pytest.fixture(scope="module")
def four_steps(data, tmp_path_factory) -> Path:
    """A run of 4 steps with checkpoints at 2 and 4 (copied by the tests that damage it)."""
    run = tmp_path_factory.mktemp("runs") / "four"
    train(config("train.checkpoint_every=2"), data, run, max_steps=4, device="cpu", quiet=True)
    return run


@pytest.fixture(scope="module")
def six_steps(data, tmp_path_factory) -> dict:
    return train(config("train.checkpoint_every=2"), data, tmp_path_factory.mktemp("runs") / "six", max_steps=6,
                 device="cpu", quiet=True)


def copy_run(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / run.name))


def weights(run) -> dict[str, torch.Tensor]:
    return load_file(str(latest_checkpoint(run) / "model.safetensors"))


def same_weights(a, b) -> bool:
    a, b = weights(a), weights(b)
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def one_line_error(result, message: str) -> None:
    text = result.output.replace("\n", "")
    assert result.exit_code == 1, result.output
    assert message in text and "Traceback" not in result.output, result.output


# --- 1, 2: one writer per directory ---------------------------------------------------------------------
def test_1_a_second_trainer_on_a_run_directory_fails_at_once_naming_the_holder(data, tmp_path):
    run = tmp_path / "run"
    with DirectoryLock(run):  # a trainer already writing there
        result = runner.invoke(app, ["train", "--preset", "demo", "--data", str(data), "--out", str(run),
                                     "--device", "cpu", "--max-steps", "1", *tiny_args()])
        one_line_error(result, f"{run} is in use by pid {os.getpid()} on ")
        assert sorted(p.name for p in run.iterdir()) == [LOCK_FILE]  # the second one wrote nothing
        result = runner.invoke(app, ["train", "--preset", "demo", "--data", str(data), "--out", str(run),
                                     "--device", "cpu", "--nproc-per-node", "2", *tiny_args()])
        one_line_error(result, f"{run} is in use by pid {os.getpid()} on ")  # before torchrun is launched
    assert not run.exists()  # the lock made the directory and took it away again, empty


def test_a_lock_left_by_a_killed_process_is_taken_over_with_a_warning(data, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / LOCK_FILE).write_text(json.dumps({"pid": 999_999_999, "host": "elsewhere", "command": "caracal train"}))
    result = train(config(), data, run, max_steps=1, device="cpu", quiet=True)
    assert result["step"] == 1 and not (run / LOCK_FILE).exists()
    assert "took over a stale lock left by pid 999999999 on elsewhere (caracal train)" in capsys.readouterr().err


def test_2_a_second_preparer_on_a_dataset_directory_fails_naming_the_holder(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("some text to tokenize\n" * 50)
    out = tmp_path / "out"
    with DirectoryLock(out):
        result = runner.invoke(app, ["prepare", "files", str(corpus), "-o", str(out), "--shard-tokens", "100"])
        one_line_error(result, f"{out} is in use by pid {os.getpid()}")
        assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]
    result = runner.invoke(app, ["prepare", "files", str(corpus), "-o", str(out), "--shard-tokens", "100"])
    assert result.exit_code == 0, result.output
    assert not (out / LOCK_FILE).exists()


def prepared(tmp_path: Path) -> tuple[list[str], Path]:
    """A finished `caracal prepare files` run: (its command's arguments, its dataset directory)."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("some text to tokenize\n" * 50)
    out = tmp_path / "out"
    args = ["prepare", "files", str(corpus), "-o", str(out), "--shard-tokens", "100"]
    assert runner.invoke(app, args).exit_code == 0
    return args, out


def mark_incomplete(dataset: Path) -> None:
    manifest = json.loads((dataset / "manifest.json").read_text())
    (dataset / "manifest.json").write_text(json.dumps({**manifest, "complete": False}))


def test_prepare_again_on_a_complete_dataset_takes_no_lock(tmp_path, monkeypatch):
    args, out = prepared(tmp_path)

    def read_only(lock):  # what DirectoryLock.acquire raises in a read-only directory
        raise LockError(f"cannot write to dataset directory {out} ({out / LOCK_FILE}: Read-only file system)")

    monkeypatch.setattr(DirectoryLock, "acquire", read_only)
    result = runner.invoke(app, args)
    assert result.exit_code == 0 and "already complete (checksums verified)" in " ".join(result.output.split())
    mark_incomplete(out)  # a dataset to finish needs the lock: the error names the directory
    one_line_error(runner.invoke(app, args), f"cannot write to dataset directory {out}")
    one_line_error(runner.invoke(app, [*args[:-1], "50"]), f"cannot write to dataset directory {out}")


def run_read_only(directory: Path, *argv: str) -> subprocess.CompletedProcess:
    """`argv` run with `directory` read-only: a read-only bind mount in a mount namespace of its own as root
    (who ignores file modes), its files' modes otherwise."""
    if os.geteuid() == 0:
        argv = ("unshare", "-m", "sh", "-c", 'mount --bind -o ro "$0" "$0" && exec "$@"', str(directory), *argv)
    else:
        for path in [directory, *directory.iterdir()]:
            path.chmod(path.stat().st_mode & ~0o222)
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=60)
    finally:
        for path in [directory, *directory.iterdir()]:
            path.chmod(path.stat().st_mode | 0o200)


def test_prepare_again_on_a_complete_read_only_dataset_reports_it_complete(tmp_path):
    args, out = prepared(tmp_path)
    (out / LOCK_FILE).write_text(json.dumps({"pid": 999_999_999, "host": "elsewhere", "command": "caracal prepare"}))
    if os.geteuid() == 0 and run_read_only(out, "touch", str(out / "probe")).returncode != 1:
        pytest.skip("cannot make a read-only bind mount here (unshare -m and mount --bind need CAP_SYS_ADMIN)")
    caracal = [sys.executable, "-m", "caracal_cli"]
    result = run_read_only(out, *caracal, *args)
    assert result.returncode == 0 and "already complete" in result.stdout, result.stdout + result.stderr
    mark_incomplete(out)
    result = run_read_only(out, *caracal, *args)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stdout + result.stderr
    assert f"cannot write to dataset directory {out}" in (result.stdout + result.stderr).replace("\n", "")


def test_training_refuses_a_dataset_being_written_and_names_the_writer(data, tmp_path):
    dataset = Path(shutil.copytree(data, tmp_path / "data"))
    run = tmp_path / "run"
    args = ["train", "--preset", "demo", "--data", str(dataset), "--out", str(run), "--device", "cpu",
            "--max-steps", "1", *tiny_args()]
    writer = {"pid": os.getpid(), "host": "here", "command": "caracal prepare files c.txt -o data"}
    with open(dataset / LOCK_FILE, "w") as held:  # an open file description of its own: flock conflicts in-process
        fcntl.flock(held, fcntl.LOCK_EX)
        held.write(json.dumps(writer) + "\n")
        held.flush()
        result = runner.invoke(app, args)
        one_line_error(result, f"dataset {dataset} is being written by pid {os.getpid()} on here (caracal prepare "
                               f"files c.txt -o data); wait for it or use another dataset")
        assert not run.exists()
    result = runner.invoke(app, args)  # the writer gone, its lock file left behind: no obstacle to a reader
    assert result.exit_code == 0, result.output
    assert json.loads((dataset / LOCK_FILE).read_text()) == writer  # a reader changes nothing


# --- 3, 6, 7: metrics.jsonl and leftovers ---------------------------------------------------------------
def test_3_a_metrics_rewrite_killed_midway_leaves_the_file_whole(tmp_path, monkeypatch):
    log = MetricsLog(tmp_path)
    for step in range(1, 6):
        log.write({"step": step, "loss": 1.0})
    before = log.path.read_bytes()

    def killed(fd):
        raise KeyboardInterrupt  # as a kill would stop it: after writing the new text, before the rename

    monkeypatch.setattr(os, "fsync", killed)
    with pytest.raises(KeyboardInterrupt):
        log.truncate_after(2)
    assert log.path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]


def test_a_torn_last_metrics_line_is_dropped_on_resume(four_steps, six_steps, tmp_path):
    run = copy_run(four_steps, tmp_path)
    with open(run / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 5, "tokens": 2560, "lo')  # killed while appending
    assert [r["step"] for r in read_metrics(run)][-1] == 4
    result = runner.invoke(app, ["train", "--resume", str(run), "--device", "cpu", "--max-steps", "6"])
    assert result.exit_code == 0, result.output
    assert train_losses(run) == train_losses(six_steps["run_dir"])
    (run / "metrics.jsonl").write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(Exception, match=r"metrics.jsonl:2: not a metrics record"):
        read_metrics(run)


def test_6_7_a_fresh_run_again_drops_stale_rows_and_orphaned_temporary_files(data, tmp_path, monkeypatch):
    run, schedule = tmp_path / "run", train_module.learning_rate

    def killed_in_step_3(step, plan, cfg):
        if step == 2:
            raise KeyboardInterrupt  # no checkpoint yet: the user runs the same command again
        return schedule(step, plan, cfg)

    monkeypatch.setattr(train_module, "learning_rate", killed_in_step_3)
    with pytest.raises(KeyboardInterrupt):
        train(config(), data, run, max_steps=3, device="cpu", quiet=True)
    assert [r["step"] for r in read_metrics(run)] == [1, 2]
    (run / "checkpoints" / ".step_00000002.x1y2").mkdir(parents=True)  # a kill while saving a checkpoint
    (run / "checkpoints" / ".step_00000002.x1y2" / "model.safetensors").write_bytes(b"half")
    (run / ".config.yaml.abc.tmp").write_text("half")
    monkeypatch.setattr(train_module, "learning_rate", schedule)
    train(config(), data, run, max_steps=3, device="cpu", quiet=True)
    assert [r["step"] for r in read_metrics(run) if "loss" in r] == [1, 2, 3]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000003"]
    assert not list(run.glob(".*.tmp"))


# --- 4: verified checkpoints ----------------------------------------------------------------------------
def damage(path: Path, offset: int = 1000, size: int = 4096) -> None:
    data = bytearray(path.read_bytes())
    data[offset:offset + size] = bytes(min(size, len(data) - offset))
    path.write_bytes(bytes(data))


def test_4_a_damaged_newest_checkpoint_falls_back_to_the_newest_intact_one(four_steps, six_steps, tmp_path,
                                                                          capsys):
    run = copy_run(four_steps, tmp_path)
    damage(run / "checkpoints" / "step_00000004" / "trainer.pt")
    resumed = train(None, None, run, max_steps=6, resume=True, device="cpu", quiet=True)
    err = capsys.readouterr().err
    assert "skipped damaged checkpoint step_00000004 (trainer.pt does not match its checksum)" in err
    assert resumed["steps_run"] == 4 and same_weights(run, six_steps["run_dir"])  # from step 2, bit for bit
    assert train_losses(run) == train_losses(six_steps["run_dir"])


@pytest.mark.parametrize("name", ["trainer.pt", "model.safetensors", "meta.json", "checksums.json"])
@pytest.mark.parametrize("how", ["zeroed", "truncated", "deleted", "garbage"])
def test_every_kind_of_damage_to_the_newest_checkpoint_falls_back(four_steps, tmp_path, name, how):
    run = copy_run(four_steps, tmp_path)
    path = run / "checkpoints" / "step_00000004" / name
    if how == "zeroed":
        damage(path, offset=min(1000, path.stat().st_size // 2), size=4096)
    elif how == "truncated":
        path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
    elif how == "deleted":
        path.unlink()
    else:
        path.write_bytes(b"\x00garbage\xff" * 10)
    assert intact_checkpoint(run).name == "step_00000002"


def test_eval_and_generate_verify_the_weights_they_read(four_steps, tmp_path, capsys):
    run = copy_run(four_steps, tmp_path)
    newest = run / "checkpoints" / "step_00000004"
    damage(newest / "trainer.pt")  # not read by eval or generate: the newest still serves them
    assert resolve_checkpoint(run)[1] == newest
    damage(newest / "model.safetensors", offset=200)
    assert resolve_checkpoint(run)[1].name == "step_00000002"
    assert "skipped damaged checkpoint step_00000004 (model.safetensors does not match" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match="model.safetensors does not match its checksum"):
        resolve_checkpoint(newest)
    damage(run / "checkpoints" / "step_00000002" / "model.safetensors", offset=200)
    result = runner.invoke(app, ["generate", "--checkpoint", str(run), "--prompt", "x", "--device", "cpu"])
    one_line_error(result, "every checkpoint is damaged (step_00000004: model.safetensors does not match")


@pytest.mark.parametrize("what", ["int64", "shape", "garbage"])
def test_weights_of_the_wrong_dtype_or_shape_are_refused_in_one_line(four_steps, tmp_path, what):
    run = copy_run(four_steps, tmp_path)
    ckpt = latest_checkpoint(run)
    (ckpt / "checksums.json").unlink()  # as a checkpoint written before checksums: only the load checks it
    meta = json.loads((ckpt / "meta.json").read_text())
    del meta["checksums"]
    (ckpt / "meta.json").write_text(json.dumps(meta))
    state = load_file(str(ckpt / "model.safetensors"))
    if what == "garbage":
        (ckpt / "model.safetensors").write_bytes(b"\xff" * 64)
    else:
        name = "embed.weight"
        state[name] = state[name].long() if what == "int64" else state[name][:, :8].contiguous()
        save_file(state, str(ckpt / "model.safetensors"))
    result = runner.invoke(app, ["generate", "--checkpoint", str(ckpt), "--prompt", "x", "--device", "cpu"])
    one_line_error(result, {"int64": "embed.weight is torch.int64 [", "shape": "embed.weight is torch.float32 [",
                            "garbage": "not a readable safetensors file"}[what])


def test_a_full_disk_while_saving_is_one_line_and_leaves_no_temporary_directory(data, tmp_path, monkeypatch):
    def full(obj, handle, *args, **kwargs):
        raise RuntimeError("basic_ios::clear: iostream error")  # what torch.save says on a full disk

    monkeypatch.setattr(torch, "save", full)
    run = tmp_path / "run"
    result = runner.invoke(app, ["train", "--preset", "demo", "--data", str(data), "--out", str(run),
                                 "--device", "cpu", "--max-steps", "1", *tiny_args()])
    one_line_error(result, f"cannot write checkpoint {run}/checkpoints/step_00000001 (basic_ios::clear")
    assert not list((run / "checkpoints").iterdir())


def test_a_full_disk_while_writing_the_weights_is_one_line_too(data, tmp_path, monkeypatch):
    import safetensors.torch
    from safetensors import SafetensorError

    def full(tensors, filename, *args, **kwargs):
        Path(filename).write_bytes(b"partial")
        raise SafetensorError('Error while serializing: I/O error: No space left on device (os error 28)')

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    run = tmp_path / "run"
    result = runner.invoke(app, ["train", "--preset", "demo", "--data", str(data), "--out", str(run),
                                 "--device", "cpu", "--max-steps", "1", *tiny_args()])
    one_line_error(result, f"cannot write checkpoint {run}/checkpoints/step_00000001 (")
    assert "model.safetensors: Error while serializing: I/O error: No space left" in result.output
    assert not list((run / "checkpoints").iterdir())


# --- 5, 9: resume is exact or says why not --------------------------------------------------------------
def test_5_a_run_killed_before_its_final_validation_writes_it_on_resume(data, six_steps, tmp_path, monkeypatch):
    run, evaluate = tmp_path / "run", train_module.evaluate_val_loss

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "evaluate_val_loss", killed)  # step 4's checkpoint is written, then this
    with pytest.raises(KeyboardInterrupt):
        train(config("train.checkpoint_every=2", "train.eval_every=100"), data, run, max_steps=4, device="cpu",
              quiet=True)
    assert latest_checkpoint(run).name == "step_00000004" and not any("val_loss" in r for r in read_metrics(run))
    monkeypatch.setattr(train_module, "evaluate_val_loss", evaluate)
    resumed = train(None, None, run, max_steps=4, resume=True, device="cpu", quiet=True)
    vals = [r for r in read_metrics(run) if "val_loss" in r]
    assert resumed["steps_run"] == 0 and [r["step"] for r in vals] == [4]
    reference = [r["val_loss"] for r in read_metrics(six_steps["run_dir"]) if r.get("step") == 4 and "val_loss" in r]
    assert vals[0]["val_loss"] == resumed["val_loss"] == reference[0]
    again = train(None, None, run, max_steps=4, resume=True, device="cpu", quiet=True)  # finished: nothing to do
    assert again["steps_run"] == 0 and len([r for r in read_metrics(run) if "val_loss" in r]) == 1


def test_a_run_killed_before_pruning_its_last_checkpoints_prunes_them_on_resume(data, tmp_path, monkeypatch):
    # Found by the fault-injection test: killed after its final checkpoint was in place but before the old ones
    # were removed, a finished run kept one checkpoint too many for good (no later save prunes).
    from caracal_cli import checkpoint as checkpoint_module

    run = tmp_path / "run"
    monkeypatch.setattr(checkpoint_module, "_remove", lambda path: None)  # the kill: nothing pruned
    train(config("train.checkpoint_every=1", "train.keep_checkpoints=2", "train.eval_every=100"), data, run,
          max_steps=3, device="cpu", quiet=True)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [f"step_0000000{i}" for i in (1, 2, 3)]
    monkeypatch.undo()
    resumed = train(None, None, run, max_steps=3, resume=True, device="cpu", quiet=True)
    assert resumed["steps_run"] == 0
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000002", "step_00000003"]


def other_tokenizer_dataset(data: Path, tmp_path: Path) -> Path:
    from caracal_cli.tokenizer import train_bpe

    other = Path(shutil.copytree(data, tmp_path / "other-tokenizer"))
    train_bpe(["a completely different corpus, of the same vocabulary size " * 40], 300).save(other)
    return other


def test_9_resume_refuses_other_data_or_tokenizer_and_follows_the_same_data_moved(four_steps, data, tmp_path,
                                                                                 capsys, monkeypatch):
    run = copy_run(four_steps, tmp_path)
    result = runner.invoke(app, ["train", "--resume", str(run), "--data", str(other_tokenizer_dataset(data, tmp_path)),
                                 "--device", "cpu"])
    one_line_error(result, "its tokenizer is not the run's (tokenizer.json differs)")
    other = make_dataset(tmp_path / "other-data", train_tokens=42_000, val_tokens=4_096, seed=1)
    result = runner.invoke(app, ["train", "--resume", str(run), "--data", str(other), "--device", "cpu"])
    one_line_error(result, "not the data the run trained on")
    recorded = json.loads((run / "data.json").read_text())
    older = tmp_path / "older-run"  # data.json from before fingerprints: the split sizes are compared
    older.mkdir()
    (older / "data.json").write_text(json.dumps({k: v for k, v in recorded.items() if k != "fingerprint"}))
    with pytest.raises(train_module.TrainError, match="train: 40000 tokens in 2 shards then, 42000 in 2 now"):
        train_module.check_same_data(older, other, open_dataset(other, 512), update=False)
    moved = Path(shutil.copytree(data, tmp_path / "moved"))
    # as if computing with two threads (the checkpoint was written with one; two spinning OpenMP threads on a
    # busy 2-core machine are slow, and the check only compares the counts)
    monkeypatch.setattr(train_module, "_threads", lambda tc: 2)
    train(None, moved, run, max_steps=5, resume=True, device="cpu", quiet=True)
    err = capsys.readouterr().err
    assert "the run's data moved" in err and "CPU threads 1 → 2" in err and "not be bit-identical" in err
    assert json.loads((run / "data.json").read_text())["path"] == str(moved.resolve())


def test_a_resume_at_another_world_size_warns_that_it_will_not_be_bit_identical(capsys):
    train_module._warn_inexact_resume({"world_size": 2, "device": "cuda"}, 1, torch.device("cpu"), None)
    assert "resuming with world size 2 → 1: the same batches, summed in another order" in capsys.readouterr().err
    train_module._warn_inexact_resume({"world_size": 1, "device": "cpu", "threads": torch.get_num_threads()}, 1,
                                      torch.device("cpu"), load_preset("demo").train)
    assert capsys.readouterr().err == ""


def test_9_an_incomplete_dataset_is_refused_unless_asked_for(data, tmp_path):
    partial = Path(shutil.copytree(data, tmp_path / "partial"))
    manifest = json.loads((partial / "manifest.json").read_text())
    (partial / "manifest.json").write_text(json.dumps({**manifest, "complete": False}))
    result = runner.invoke(app, ["train", "--preset", "demo", "--data", str(partial), "--out",
                                 str(tmp_path / "run"), "--device", "cpu", "--max-steps", "1", *tiny_args()])
    one_line_error(result, "an incomplete dataset (44,096 tokens so far")
    assert "--allow-incomplete" in result.output and not (tmp_path / "run").exists()
    assert open_dataset(partial, 512, allow_incomplete=True)["complete"] is False


# --- 10, 11, 12, 8: data ----------------------------------------------------------------------------------
def test_10_token_ids_outside_the_vocabulary_are_caught_when_the_data_is_opened(data, tmp_path):
    bad = Path(shutil.copytree(data, tmp_path / "bad"))
    manifest = json.loads((bad / "manifest.json").read_text())
    entry = manifest["splits"]["train"][1]
    tokens = shards.read_shard(bad / entry["file"]).astype(np.int64)
    true_max = int(tokens.max())
    tokens[123] = 400  # the tokenizer has 289 ids, the model 512
    shards.write_shard(bad / entry["file"], tokens, 512)
    entry["max_id"] = 400
    (bad / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=r"train_000001.bin: holds token id 400, outside the tokenizer's "
                                        r"vocabulary of 289 ids"):
        open_dataset(bad, 512)
    entry["max_id"] = true_max  # a manifest that does not know: the shard read at a step says it, in one line
    for entries in manifest["splits"].values():  # with true checksums, so that `verify` gets to the ids
        for e in entries:
            e["sha256"] = sha256_file(bad / e["file"])
    (bad / "manifest.json").write_text(json.dumps(manifest))
    loader = TrainBatches(bad, open_dataset(bad, 512), 64, 4, 2)
    with pytest.raises(DataError, match=r"train split\): token id 400 near token 20,123 is outside"):
        for step in range(loader.windows_per_epoch // 8):
            loader.batch(step, 0), loader.batch(step, 1)
    result = runner.invoke(app, ["prepare", "verify", str(bad)])  # reads every shard's maximum again
    one_line_error(result, f"its largest token id is 400, the manifest says {true_max}")


def test_11_lone_surrogates_are_replaced_and_counted_in_the_manifest(tmp_path):
    corpus = tmp_path / "c.jsonl"
    lines = [json.dumps({"text": f"document {i} " * 20}) for i in range(30)]
    lines[12] = '{"text": "a lone \\ud800 surrogate and \\udfff another"}'
    corpus.write_text("\n".join(lines) + "\n")
    result = prepare.prepare_files([str(corpus)], tmp_path / "out", shard_tokens=200, train_tokenizer=300)
    stats = result.manifest["stats"]
    assert result.manifest["complete"] and (stats["replaced_characters"], stats["replaced_documents"]) == (2, 1)
    assert all("max_id" in e for entries in result.manifest["splits"].values() for e in entries)


def test_running_prepare_again_records_the_max_ids_an_older_manifest_lacks(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("words and more words\n" * 200)
    out = prepare.prepare_files([str(corpus)], tmp_path / "out", shard_tokens=300).out
    manifest = json.loads((out / "manifest.json").read_text())
    recorded = [e.pop("max_id") for entries in manifest["splits"].values() for e in entries]
    (out / "manifest.json").write_text(json.dumps(manifest))
    again = prepare.prepare_files([str(corpus)], out, shard_tokens=300)
    assert again.status == "complete"
    assert [e["max_id"] for entries in again.manifest["splits"].values() for e in entries] == recorded
    assert json.loads((out / "manifest.json").read_text()) == again.manifest


def test_12_pieces_stay_bounded_on_a_giant_line_and_cut_exactly_at_spaces():
    from caracal_cli.tokenizer import gpt2

    assert [len(p) for p in prepare._pieces("x" * 1000, 100, 300)] == [300, 300, 300, 100]
    text = " ".join(f"w{i}ord,x" for i in range(3000))  # no newline at all: cut before single spaces
    pieces = prepare._pieces(text, 1000, 4000)
    assert len(pieces) > 10 and max(map(len, pieces)) <= 4000 and "".join(pieces) == text
    tok = gpt2()
    assert [i for p in pieces for i in tok.encode(p)] == tok.encode(text)


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM])
def test_8_prepare_workers_end_with_their_parent_when_it_is_killed(tmp_path, signum):
    corpus = tmp_path / "big.txt"
    corpus.write_text(("a line of text for the workers to chew on\n" * 20_000 + "\n") * 20)
    proc = subprocess.Popen([sys.executable, "-m", "caracal_cli", "prepare", "files", str(corpus), "-o",
                             str(tmp_path / "out"), "--num-proc", "2"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline, children = time.time() + 60, []
    while time.time() < deadline and len(children) < 2 and proc.poll() is None:
        time.sleep(0.05)
        children = _children(proc.pid)
    time.sleep(0.3)
    children = _children(proc.pid)  # 2 workers and the resource tracker
    assert len(children) >= 2 and proc.poll() is None, "the workers never started"
    proc.send_signal(signum)
    proc.wait()
    deadline = time.time() + 20
    while time.time() < deadline and any(Path(f"/proc/{pid}").exists() for pid in children):
        time.sleep(0.05)
    assert not [pid for pid in children if Path(f"/proc/{pid}").exists()]


# --- one line for every bad input -------------------------------------------------------------------------
@pytest.mark.parametrize("overrides, message", [
    (["train.seed=-5"], "train.seed must be >= 0, got -5"),
    (["model.init_std=-5"], "model.init_std must be > 0, got -5"),
    (["train.grad_clip=-1"], "train.grad_clip must be >= 0"),
    (["train.weight_decay=-0.1"], "train.weight_decay must be >= 0"),
    (["train.warmup_tokens=-10"], "train.warmup_tokens must be >= 0"),
    (["train.eval_tokens=0"], "train.eval_tokens must be >= 1, got 0"),
])
def test_impossible_settings_are_refused_naming_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_preset("demo", overrides)


def test_an_eval_budget_below_one_window_says_so(data, tmp_path):
    result = runner.invoke(app, ["train", "--preset", "demo", "--data", str(data), "--out", str(tmp_path / "r"),
                                 "--device", "cpu", *tiny_args("train.eval_tokens=10")])
    one_line_error(result, "train.eval_tokens=10 is less than one validation window of model.context = 64")


@pytest.mark.parametrize("case", ["inherit-list", "inherit-section", "run-config", "binary", "nested-jsonl",
                                  "out-is-a-file", "read-only", "prompt-file", "prompt-stdin"])
def test_bad_input_is_one_line(case, data, tmp_path):
    path = tmp_path / "input"
    if case == "inherit-list":
        path = tmp_path / "p.yaml"
        path.write_text("inherit: [1, 2]\n")
        args, message = ["info", "--preset", str(path)], "inherit must name one preset (a string), got [1, 2]"
    elif case == "inherit-section":
        path = tmp_path / "p.yaml"
        path.write_text("inherit: demo\nmodel: 3\n")
        args, message = ["info", "--preset", str(path)], "config.model must be a mapping, got 3"
    elif case == "run-config":
        path = tmp_path / "config.yaml"
        path.write_text("- 1\n")
        args, message = ["train", "--resume", str(tmp_path)], "config.yaml: a run's config must be a YAML mapping"
    elif case == "binary":
        path = tmp_path / "p.yaml"
        path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff\xfe")
        args, message = ["info", "--preset", str(path)], "not a text file"
    elif case == "nested-jsonl":
        path = tmp_path / "deep.jsonl"
        path.write_text('{"text": "fine"}\n' + "[" * 200_000 + "\n")
        args, message = ["prepare", "files", str(path), "-o", str(tmp_path / "o")], "deep.jsonl:2: JSON nested"
    elif case in ("out-is-a-file", "read-only"):
        path.write_text("a file")
        out = str(path) if case == "out-is-a-file" else "/sys/caracal-test-run"
        args = ["train", "--preset", "demo", "--data", str(data), "--out", out, "--device", "cpu", *tiny_args()]
        message = f"{path}: exists and is not a directory" if case == "out-is-a-file" else "/sys/caracal-test-run"
    else:
        path.write_bytes(b"ROMEO: \xff\xfe")
        args = ["generate", "--checkpoint", str(tmp_path)]
        args += ["--prompt-file", str(path)] if case == "prompt-file" else []
        message = "the prompt is not UTF-8 text (byte 0xff at offset 7)"
    result = runner.invoke(app, args, input=path.read_bytes() if case == "prompt-stdin" else None)
    one_line_error(result, message)


# --- the fault-injection test ----------------------------------------------------------------------------
def test_training_killed_at_seeded_random_points_resumes_byte_identical(data, tmp_path):
    """tests/fault_injection.py kills two runs with SIGKILL at random events (seeded: steps, metrics rows,
    renames, checksums, torch.save, pruning), resuming each until it finishes."""
    done = subprocess.run([sys.executable, str(TESTS / "fault_injection.py"), str(data), str(tmp_path), "24", "2"],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": os.pathsep.join(
                              [str(TESTS.parent), os.environ.get("PYTHONPATH", "")])})
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    reference = Path(report["reference"])
    expected = (latest_checkpoint(reference) / "model.safetensors").read_bytes()
    rows = [(r["step"], r.get("loss", r.get("val_loss"))) for r in read_metrics(reference)]
    assert sum(len(t["kills"]) for t in report["trials"]) >= 2
    for trial in report["trials"]:
        run = Path(trial["run"])
        assert (latest_checkpoint(run) / "model.safetensors").read_bytes() == expected, trial
        assert [(r["step"], r.get("loss", r.get("val_loss"))) for r in read_metrics(run)] == rows, trial
        assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000004", "step_00000006"]
        assert not list(run.glob(".*")), trial  # no lock, no temporary file left


def test_replace_dir_leaves_the_old_or_the_new_folder_whole(tmp_path, monkeypatch):
    """`export --overwrite`, `import --overwrite` and a re-saved checkpoint swap folders: the old one was deleted
    before the new one was renamed in, so an interruption between them lost both."""
    from caracal_cli.fileio import replace_dir

    def folder(name, text):
        (tmp_path / name).mkdir()
        (tmp_path / name / "a.txt").write_text(text)
        return tmp_path / name

    final = folder("out", "old")
    replace_dir(folder(".new", "new"), final)
    assert (final / "a.txt").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]

    real_rename = Path.rename

    def interrupted(self, target):
        if self.name == ".newer":
            raise KeyboardInterrupt
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", interrupted)
    with pytest.raises(KeyboardInterrupt):
        replace_dir(folder(".newer", "newer"), final)
    assert (final / "a.txt").read_text() == "new"  # the old one, whole, under its name
    assert sorted(p.name for p in tmp_path.iterdir()) == [".newer", "out"]  # the caller removes its temporary


def test_sigterm_is_one_line_and_exit_143_after_the_commands_cleanups(tmp_path, monkeypatch):
    """SIGTERM killed most commands at once, silently and without their cleanups (an interrupted export left
    hundreds of MB in a hidden folder); it now unwinds like Ctrl-C: cleanups run, one line, status 143."""
    from caracal_cli import prepare as prepare_module

    def stopped(*args, **kwargs):
        (tmp_path / "partial").mkdir()
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises here
        finally:
            shutil.rmtree(tmp_path / "partial")

    monkeypatch.setattr(prepare_module, "prepare_shakespeare", stopped)
    result = CliRunner().invoke(app, ["prepare", "shakespeare", "--out", str(tmp_path / "data")])
    assert result.exit_code == 143 and "Traceback" not in result.output, result.output
    assert "prepare shakespeare interrupted (SIGTERM): run the same command again" in result.output
    assert not (tmp_path / "partial").exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # restored after the command
