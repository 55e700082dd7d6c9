"""`caracal train` on CPU: learning, bit-exact resume after an interruption, torchrun with DDP and FSDP2
(gloo), the recipe (batch plan, LR schedule, weight-decay groups), checkpoint files, NaN stops, CLI errors."""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_loader import make_dataset
from typer.testing import CliRunner

from caracal_cli import train as train_module
from caracal_cli.checkpoint import (config_yaml, latest_checkpoint, load_model, load_run_config, load_trainer_state,
                                   save_run_config)
from caracal_cli.cli import app
from caracal_cli.config import CaracalError, ConfigError, TrainConfig, load_preset
from caracal_cli.model import build_model
from caracal_cli.monitor import read_metrics
from caracal_cli.recipe import learning_rate, parameter_groups, plan_batches
from caracal_cli.train import evaluate_val_loss, train

runner = CliRunner()
# The demo preset shrunk to milliseconds per step: 512 tokens per step in 2 micro-batches of 4 × 64.
TINY = ["model.d_model=64", "model.n_layer=3", "model.context=64", "model.vocab_size=512",
        "model.mixers.A.window=32", "train.micro_batch=4", "train.global_batch_tokens=512", "train.tokens=20480",
        "train.warmup_tokens=1024", "train.eval_tokens=1024", "train.eval_every=4", "train.checkpoint_every=100",
        "train.log_every=1"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("data"), train_tokens=40_000, val_tokens=4_096)


@pytest.fixture(scope="module")
def straight(data, tmp_path_factory) -> dict:
    """Six uninterrupted steps of the tiny config, the reference for resume and torchrun runs."""
    return train(load_preset("demo", TINY), data, tmp_path_factory.mktemp("runs") / "straight", max_steps=6,
                 device="cpu", quiet=True)


def train_losses(run_dir) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir) if "loss" in r]


def weights(run_dir) -> dict[str, torch.Tensor]:
    return load_file(str(latest_checkpoint(run_dir) / "model.safetensors"))


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """`caracal …` in a fresh interpreter (what a user runs; torchrun needs a real process)."""
    return subprocess.run([sys.executable, "-m", "caracal_cli", *args], capture_output=True, text=True,
                          timeout=120, env={**os.environ, **(env or {})})


def outputs(result: subprocess.CompletedProcess) -> str:
    """Both streams' ends: a torchrun worker's last words are in stdout, the launcher's in stderr."""
    return f"stdout:\n{result.stdout[-2000:]}\nstderr:\n{result.stderr[-3000:]}"


def tiny_args(*extra: str) -> list[str]:
    return [arg for item in [*TINY, *extra] for arg in ("--set", item)]


def signal_at_step(monkeypatch, step: int, *signums: int) -> None:
    """Send `signums` to this process as 0-based optimizer step `step` starts (the trainer asks for its learning
    rate first), as Ctrl-C or a scheduler's SIGTERM would mid-run; put `learning_rate` back to stop it."""
    def schedule(index, plan, cfg):
        if index == step:
            for signum in signums:
                os.kill(os.getpid(), signum)
        return learning_rate(index, plan, cfg)

    monkeypatch.setattr(train_module, "learning_rate", schedule)


# --- the recipe -----------------------------------------------------------------------------------------
def test_batch_plan_and_a_clear_refusal_when_it_does_not_divide():
    plan = plan_batches(load_preset("tiny", ["train.micro_batch=64"]).train, 512, world_size=8)
    assert (plan.grad_accum, plan.tokens_per_step, plan.total_steps, plan.warmup_steps) == (2, 524288, 19073, 715)
    with pytest.raises(ConfigError, match=r"global_batch_tokens=4096 is not a multiple of .* 16 × 128 × 3 = 6144"):
        plan_batches(load_preset("demo").train, 128, world_size=3)


def test_learning_rate_warms_up_linearly_then_follows_a_cosine_to_the_floor():
    cfg = TrainConfig(tokens=100 * 1000, global_batch_tokens=1000, micro_batch=10, lr=1.0, min_lr_ratio=0.1,
                      warmup_tokens=10_000)
    plan = plan_batches(cfg, context=10, world_size=1)
    lrs = [learning_rate(s, plan, cfg) for s in range(plan.total_steps)]
    assert lrs[:3] == pytest.approx([0.1, 0.2, 0.3]) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:-1], lrs[10:], strict=True))
    assert lrs[-1] == pytest.approx(0.1)
    assert lrs[9 + 45] == pytest.approx(0.55, abs=0.02)  # half-way down the cosine


def test_weight_decay_only_on_matrices_and_never_on_the_tied_embedding():
    model = build_model(load_preset("demo", TINY).model)
    decay, no_decay = parameter_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    plain = {names[id(p)] for p in no_decay["params"]}
    assert "embed.weight" in plain and "head.weight" not in decayed  # tied: the head is the embedding
    assert all(not n.endswith(("norm1.weight", "norm2.weight", ".bias")) for n in decayed)
    assert "blocks.0.mlp.up.weight" in decayed and "blocks.2.mixer.qkv.weight" in decayed
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.1, 0.0)


def test_ssm_parameters_opt_out_of_weight_decay_like_mamba_ssm():
    model = build_model(load_preset("mamba-demo", ["model.vocab_size=512"]).model)
    decay, _ = parameter_groups(model, 0.1)
    decayed = {n for n, p in model.named_parameters() if any(p is q for q in decay["params"])}
    assert "blocks.0.mixer.A_log" not in decayed  # 2-D in Mamba-1, still no decay
    assert "blocks.0.mixer.in_proj.weight" in decayed


# --- training -------------------------------------------------------------------------------------------
def test_the_demo_preset_learns_and_writes_a_complete_run_directory(data, tmp_path):
    config = load_preset("demo", ["train.micro_batch=4", "train.global_batch_tokens=512", "train.tokens=20480",
                                  "train.warmup_tokens=1024", "train.eval_tokens=2048", "train.eval_every=12",
                                  "train.checkpoint_every=12", "train.keep_checkpoints=1"])
    run = tmp_path / "demo"
    result = train(config, data, run, max_steps=24, device="cpu", quiet=True)
    losses = train_losses(run)
    assert len(losses) == 24 and result["step"] == 24 and result["loss"] == losses[-1]
    assert sum(losses[-4:]) / 4 < losses[0] - 2.0, losses  # from ln(4096) ≈ 8.3 towards the chain's entropy
    vals = [r["val_loss"] for r in read_metrics(run) if "val_loss" in r]
    assert len(vals) == 2 and vals[1] < vals[0] and result["val_ppl"] == pytest.approx(math.exp(vals[1]))
    record = read_metrics(run)[0]
    assert set(record) == {"step", "tokens", "loss", "lr", "grad_norm", "tokens_per_s", "mfu", "elapsed"}
    assert record["mfu"] is None  # CPU without --peak-flops
    # Run directory: config, tokenizer, data summary; the newest checkpoint only (keep_checkpoints=1).
    assert json.loads((run / "data.json").read_text())["splits"]["train"]["tokens"] == 40_000
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_00000024"]
    ckpt = Path(result["checkpoint"])
    state = torch.load(ckpt / "trainer.pt", weights_only=True)
    assert state["step"] == 24 and state["tokens"] == 24 * 512 and state["data"]["next_sequence"] == 24 * 4
    assert "head.weight" not in load_file(str(ckpt / "model.safetensors"))  # tied: stored once
    model, loaded_config, tokenizer, _ = load_model(run)
    # equal once resolved: the run's file spells out every mixer default the preset left implicit
    assert config_yaml(loaded_config) == config_yaml(config) and tokenizer.vocab_size < 512
    assert evaluate_val_loss(model, data, config, "cpu", tokens=2048) == pytest.approx(vals[1], rel=1e-6)


def test_an_interrupted_and_resumed_run_ends_bit_identical(data, straight, tmp_path, monkeypatch):
    run = tmp_path / "interrupted"
    signal_at_step(monkeypatch, 2, signal.SIGINT)  # as Ctrl-C would: step 3 finishes, then a checkpoint
    stopped = train(load_preset("demo", TINY), data, run, max_steps=6, device="cpu", quiet=True)
    assert stopped["stopped_by"] == "SIGINT" and stopped["step"] == 3
    assert latest_checkpoint(run).name == "step_00000003"
    monkeypatch.setattr(train_module, "learning_rate", learning_rate)
    resumed = train(None, None, run, max_steps=6, resume=True, device="cpu", quiet=True)
    assert resumed["step"] == 6 and resumed["steps_run"] == 3
    a, b = weights(straight["run_dir"]), weights(run)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    opt_a = load_trainer_state(straight["checkpoint"])["optimizer"]["state"]
    opt_b = load_trainer_state(resumed["checkpoint"])["optimizer"]["state"]
    assert all(torch.equal(opt_a[p][k], opt_b[p][k]) for p in opt_a for k in opt_a[p])
    assert train_losses(run) == train_losses(straight["run_dir"])  # metrics.jsonl continues without duplicates
    assert resumed["val_loss"] == straight["val_loss"]


def test_a_second_ctrl_c_stops_at_once_and_saves_the_last_completed_step(data, straight, tmp_path, monkeypatch,
                                                                         capfd):
    run = tmp_path / "twice"
    # the first is acknowledged at once and the step goes on; the second abandons it: step 2 is saved
    signal_at_step(monkeypatch, 2, signal.SIGINT, signal.SIGINT)
    stopped = train(load_preset("demo", TINY), data, run, max_steps=6, device="cpu", progress=False)
    err = capfd.readouterr().err
    assert f"SIGINT: stopping after this step; resume with: caracal train --resume {run}" in err
    assert "second Ctrl-C: stopping now, saving the last completed step" in err
    assert stopped["stopped_by"] == "SIGINT" and stopped["step"] == 2
    assert latest_checkpoint(run).name == "step_00000002"
    monkeypatch.setattr(train_module, "learning_rate", learning_rate)
    train(None, None, run, max_steps=6, resume=True, device="cpu", quiet=True)
    a, b = weights(straight["run_dir"]), weights(run)
    assert all(torch.equal(a[k], b[k]) for k in a)  # nothing of the abandoned step leaked into the checkpoint


def test_resume_with_changes_extends_the_run_and_records_them(data, tmp_path):
    run = tmp_path / "extended"
    first = runner.invoke(app, ["train", "--preset", "demo", "--data", str(data), "--out", str(run), "--device",
                                "cpu", "--max-steps", "2", *tiny_args()])
    assert first.exit_code == 0, first.output
    # the end-of-run summary: tokens, throughput, validation, the checkpoint, the next commands
    for text in ("done: step 2, 1,024 tokens", "tokens/s", "validation: loss", "checkpoint: ", "caracal plot"):
        assert text in first.output, text
    refused = runner.invoke(app, ["train", "--resume", str(run), "--set", "train.tokens=1000"])
    assert refused.exit_code == 1 and "does not extend the run" in refused.output
    again = runner.invoke(app, ["train", "--resume", str(run), "--device", "cpu", "--max-steps", "3",
                                "--set", "train.tokens=40960", "--set", "train.lr=1e-3"])
    assert again.exit_code == 0, again.output
    assert "changed on resume (config_history.jsonl): train.lr 0.003 → 0.001, train.tokens 20480 → 40960" \
        in again.output
    saved = load_run_config(run)
    assert saved.train.tokens == 40960 and saved.train.lr == 1e-3
    [entry] = [json.loads(line) for line in (run / "config_history.jsonl").read_text().splitlines()]
    assert entry["from_step"] == 2 and entry["changes"]["train.tokens"] == {"from": 20480, "to": 40960}
    lrs = [r["lr"] for r in read_metrics(run) if "lr" in r]
    assert len(lrs) == 3 and lrs[2] == pytest.approx(learning_rate(2, plan_batches(saved.train, 64, 1), saved.train))


def test_sigterm_saves_a_checkpoint_and_the_cli_exits_143(data, tmp_path, monkeypatch):
    signal_at_step(monkeypatch, 1, signal.SIGTERM)
    run = tmp_path / "terminated"
    result = runner.invoke(app, ["train", "--preset", "demo", "--data", str(data), "--out", str(run),
                                 "--device", "cpu", "--max-steps", "5", *tiny_args()])
    assert result.exit_code == 143, result.output
    assert "SIGTERM: stopped after step 2" in result.output
    assert latest_checkpoint(run).name == "step_00000002"


def test_torchrun_ddp_on_cpu_matches_one_process(data, straight, tmp_path):
    """2 processes (gloo) see the same global batch as 1 process with 2 accumulation steps: the same losses up
    to float rounding."""
    ddp = cli("train", "--preset", "demo", "--data", str(data), "--out", str(tmp_path / "ddp"),
              "--nproc-per-node", "2", "--device", "cpu", "--max-steps", "4", *tiny_args())
    assert ddp.returncode == 0, outputs(ddp)
    assert "world size 2 (ddp)" in ddp.stdout
    assert train_losses(tmp_path / "ddp") == pytest.approx(train_losses(straight["run_dir"])[:4], rel=1e-4)
    norms = [[r["grad_norm"] for r in read_metrics(run) if "grad_norm" in r][:4]
             for run in (tmp_path / "ddp", straight["run_dir"])]
    assert norms[0] == pytest.approx(norms[1], rel=1e-4)  # the global gradient's norm, averaged over ranks


def test_two_nodes_on_one_machine_match_one_process(data, straight, tmp_path):
    """Two torchrun groups over localhost, as two nodes of one GPU each would run (a static rendezvous at node 0's
    address): the same losses as one process. Node 1 gets its own --out, as on a machine without a shared disk:
    only global rank 0 writes the run."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    runs = [tmp_path / "node0", tmp_path / "node1"]
    nodes = [subprocess.Popen([sys.executable, "-m", "caracal_cli", "train", "--preset", "demo", "--data", str(data),
                               "--out", str(runs[rank]), "--nnodes", "2", "--node-rank", str(rank),
                               "--rdzv-endpoint", f"127.0.0.1:{port}", "--nproc-per-node", "1", "--device", "cpu",
                               "--max-steps", "4", *tiny_args()], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for rank in range(2)]
    try:
        streams = [node.communicate(timeout=120) for node in nodes]
    finally:
        for node in nodes:  # a node left waiting for a peer that failed
            if node.poll() is None:
                node.kill()
    results = [subprocess.CompletedProcess(n.args, n.returncode, *out) for n, out in zip(nodes, streams, strict=True)]
    for result in results:
        assert result.returncode == 0, outputs(result)
    assert "world size 2 (ddp)" in results[0].stdout
    assert train_losses(runs[0]) == pytest.approx(train_losses(straight["run_dir"])[:4], rel=1e-4)
    assert not runs[1].exists()


def test_fsdp2_on_cpu_checkpoints_full_state_and_resumes(data, straight, tmp_path):
    run, launch = tmp_path / "fsdp", ["--nproc-per-node", "2", "--device", "cpu"]
    first = cli("train", "--preset", "demo", "--data", str(data), "--out", str(run), *launch, "--max-steps", "2",
                *tiny_args("train.parallel=fsdp"))
    assert first.returncode == 0, outputs(first)
    assert "world size 2 (fsdp)" in first.stdout
    again = cli("train", "--resume", str(run), *launch, "--max-steps", "4")
    assert again.returncode == 0, outputs(again)
    assert "resumed from step_00000002" in again.stdout
    assert train_losses(run) == pytest.approx(train_losses(straight["run_dir"])[:4], rel=1e-4)
    model, config, _, _ = load_model(run)  # the gathered checkpoint is an ordinary one
    val = [r["val_loss"] for r in read_metrics(run) if "val_loss" in r][-1]
    assert evaluate_val_loss(model, data, config, "cpu") == pytest.approx(val, rel=1e-5)


def test_a_non_finite_loss_stops_the_run_naming_the_step_and_the_last_checkpoint(data, tmp_path):
    run = tmp_path / "nan"
    result = runner.invoke(app, ["train", "--preset", "demo", "--data", str(data), "--out", str(run),
                                 "--device", "cpu", *tiny_args("train.lr=1e9", "train.warmup_tokens=0",
                                                               "train.checkpoint_every=1")])
    assert result.exit_code == 1
    message = result.output.replace("\n", "")
    assert "loss is nan at step 2" in message and "step_00000001" in message and "Traceback" not in message


def test_the_step_that_turned_non_finite_left_the_weights_as_checkpointed(data, tmp_path, monkeypatch):
    """Where the update is queued before the host reads the loss (fused AdamW, as on a GPU), the optimizer
    itself skips it: after the stop the weights are step 1's checkpoint, not NaN."""
    built, build = [], train_module.build_optimizer

    def recording(model, tc, device):
        built.append((model, build(model, tc, device)))
        return built[-1][1]

    monkeypatch.setattr(train_module, "build_optimizer", recording)
    config = load_preset("demo", [*TINY, "train.lr=1e9", "train.warmup_tokens=0", "train.checkpoint_every=1"])
    with pytest.raises(train_module.TrainError, match="is nan at step 2"):
        train(config, data, tmp_path / "nan", device="cpu", quiet=True)
    model, optimizer = built[0]
    assert optimizer.defaults["fused"]
    saved = weights(tmp_path / "nan")
    assert latest_checkpoint(tmp_path / "nan").name == "step_00000001"
    live = model.state_dict()
    assert saved and all(torch.equal(live[name], tensor) for name, tensor in saved.items())


# --- the command line -----------------------------------------------------------------------------------
def test_dry_run_prints_the_config_and_the_batch_plan(data):
    result = runner.invoke(app, ["train", "--preset", "demo", "--data", str(data), "--dry-run",
                                 "--nproc-per-node", "2"])
    assert result.exit_code == 0, result.output
    for line in ["d_model: 128", "world size:        2", "micro-batch:       16 sequences × 128 tokens",
                 "grad accumulation: 1 micro-steps", "tokens per step:   4096", "total steps:       732",
                 f"path: {data}"]:  # data.path is the --data given
        assert line in result.output
    assert "is 75.0 epochs over the data's 40,000 training tokens" in result.output.replace("\n", " ")
    large = runner.invoke(app, ["train", "--preset", "tiny", "--data", str(data), "--dry-run", "--device", "cpu"])
    assert "tiny (63M parameters) on the CPU: 10,000,000,000 tokens would take" in large.output.replace("\n", " ")


def _config_only_run(tmp_path) -> Path:
    run = tmp_path / "empty-run"
    run.mkdir()
    save_run_config(run, load_preset("demo"))
    return run


@pytest.mark.parametrize("args, message", [
    (["--preset", "nope"], "unknown preset 'nope'"),
    (["--preset", "demo", "--data", "/no/such/dir"], "/no/such/dir: data directory not found"),
    (["--preset", "demo", "--set", "train.global_batch_tokens=1000"], "is not a multiple of micro_batch"),
    (["--preset", "demo", "--data", "BIG"], "more than the model's vocab_size 4096"),
    (["--resume", "EMPTY"], "no checkpoints to resume from"),
    (["--resume", "EMPTY", "--preset", "demo"], "drop --preset"),
    (["--resume", "EMPTY", "--set", "model.d_model=64"], "--resume cannot change model.d_model: it changes the model"),
    (["--resume", "EMPTY", "--set", "train.micro_batch=2"], "cannot change train.micro_batch: it changes the batch"),
])
def test_bad_input_is_one_line_without_traceback(args, message, data, tmp_path):
    replace = {"BIG": str(make_dataset(tmp_path / "big", 2_000, 500, vocab_size=50257)) if "BIG" in args else "",
               "EMPTY": str(_config_only_run(tmp_path)) if "EMPTY" in args else ""}
    args = [replace.get(a, a) for a in args]
    if "--data" not in args and "--resume" not in args:
        args += ["--data", str(data)]
    result = runner.invoke(app, ["train", *args, "--device", "cpu"])
    assert result.exit_code == 1, result.output
    assert message in result.output.replace("\n", "") and "Traceback" not in result.output


def test_fast_kernels_where_they_cannot_run_are_refused_before_anything_is_written(data, tmp_path):
    out = tmp_path / "run"
    for setting in ("model.mixers.F.fft_impl=fast", "model.mixers.F.module_impl=fast"):
        result = runner.invoke(app, ["train", "--preset", "demo", "--data", str(data), "--set", setting,
                                     "--out", str(out), "--device", "cpu"])
        assert result.exit_code == 1 and "Traceback" not in result.output, result.output
        assert f"{setting.split('.')[-1]} cannot run here: not a CUDA device" in result.output.replace("\n", "")
        assert not out.exists()


def test_checkpoints_follow_the_umask(straight):
    umask = os.umask(0)
    os.umask(umask)
    checkpoint = Path(straight["checkpoint"])
    assert checkpoint.stat().st_mode & 0o777 == 0o777 & ~umask
    assert {f.stat().st_mode & 0o777 for f in checkpoint.iterdir()} == {0o666 & ~umask}


def test_a_new_run_refuses_a_directory_that_holds_checkpoints(data, straight):
    with pytest.raises(CaracalError, match="already holds checkpoints"):
        train(load_preset("demo", TINY), data, straight["run_dir"], device="cpu", quiet=True)


def read_tensorboard(folder: Path) -> list[tuple[int, dict[str, float]]]:
    """(step, {tag: value}) of every scalar event, each record's two CRCs checked (a reader written from the
    TFRecord and Event definitions, independent of the writer's helpers but for the CRC)."""
    import struct

    from caracal_cli.monitor import crc32c

    def masked(data):
        crc = crc32c(data)
        return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF

    def varint(buf, i):
        value, shift = 0, 0
        while True:
            value |= (buf[i] & 0x7F) << shift
            shift, i = shift + 7, i + 1
            if not buf[i - 1] & 0x80:
                return value, i

    def fields(buf):
        i = 0
        while i < len(buf):
            key, i = varint(buf, i)
            number, wire = key >> 3, key & 7
            if wire == 0:
                value, i = varint(buf, i)
            elif wire == 1:
                value, i = struct.unpack("<d", buf[i:i + 8])[0], i + 8
            elif wire == 5:
                value, i = struct.unpack("<f", buf[i:i + 4])[0], i + 4
            else:
                length = buf[i]  # every length here is under 128
                value, i = buf[i + 1:i + 1 + length], i + 1 + length
            yield number, value

    [path] = folder.glob("events.out.tfevents.*")
    data, events = path.read_bytes(), []
    while data:
        header, header_crc = data[:8], struct.unpack("<I", data[8:12])[0]
        length = struct.unpack("<Q", header)[0]
        event, event_crc = data[12:12 + length], struct.unpack("<I", data[12 + length:16 + length])[0]
        assert header_crc == masked(header) and event_crc == masked(event)
        data = data[16 + length:]
        parsed = list(fields(event))
        summary = [v for n, v in parsed if n == 5]
        if summary:
            values = [dict(fields(value)) for _, value in fields(summary[0])]
            events.append((dict(parsed)[2], {v[1].decode(): v[2] for v in values}))
        else:
            assert dict(parsed)[3] == b"brain.Event:2"
    return events


def test_tensorboard_event_files_are_written_without_the_package(data, tmp_path):
    from caracal_cli.monitor import crc32c

    assert crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
    run = tmp_path / "tb"
    train(load_preset("demo", TINY), data, run, max_steps=4, tensorboard=True, device="cpu", quiet=True)
    events = read_tensorboard(run / "tensorboard")
    logged = [(r["step"], r["loss"]) for r in read_metrics(run) if "loss" in r]
    losses = [(step, scalars["train/loss"]) for step, scalars in events if "train/loss" in scalars]
    assert [s for s, _ in losses] == [s for s, _ in logged] == [1, 2, 3, 4]
    assert [v for _, v in losses] == pytest.approx([v for _, v in logged], rel=1e-6)  # stored as float32
    assert [step for step, scalars in events if "val/val_loss" in scalars] == [4]
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        return
    board = EventAccumulator(str(run / "tensorboard"))
    board.Reload()
    assert [e.step for e in board.Scalars("train/loss")] == [1, 2, 3, 4]


def test_wandb_logs_offline(data, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "wb"
    train(load_preset("demo", TINY), data, run, max_steps=2, wandb=True, device="cpu", quiet=True)
    [logged] = list((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert logged.stat().st_size > 0 and (run / "wandb_id").read_text().strip() in logged.name


def test_torchrun_command_relaunches_this_cli():
    cmd = train_module.torchrun_command(["train", "--preset", "demo"], 4)
    assert cmd[1:6] == ["-m", "torch.distributed.run", "--nproc-per-node=4", "--nnodes=1", "--standalone"]
    assert cmd[-5:] == ["-m", "caracal_cli", "train", "--preset", "demo"]
    multi = train_module.torchrun_command(["train"], 8, nnodes=2, node_rank=1, rdzv_endpoint="node0:29500")
    assert "--node-rank=1" in multi and "--rdzv-endpoint=node0:29500" in multi
    assert {"--nnodes=2", "--rdzv-backend=static"} <= set(multi) and "--standalone" not in multi
    one_node = train_module.torchrun_command(["train"], 8, rdzv_endpoint="localhost:29400")
    assert "--rdzv-backend=c10d" in one_node and "--node-rank=0" not in one_node
    with pytest.raises(CaracalError, match="--rdzv-endpoint"):
        train_module.torchrun_command(["train"], 8, nnodes=2)


def test_run_config_records_every_mixer_default(tmp_path):
    """A run keeps the mixer settings it trained with, written out in full: a later change of a default
    (MHF's scale was sqrt) must not change how an old run loads."""
    run = _config_only_run(tmp_path)
    saved = yaml.safe_load((run / "config.yaml").read_text())
    mhf = next(m for m in saved["model"]["mixers"].values() if m["kind"] == "mhf")
    assert mhf["scale"] == "mean" and mhf["fft_impl"] == "auto" and "gate_kernel" in mhf
    mhf["scale"] = "sqrt"
    (run / "config.yaml").write_text(yaml.safe_dump(saved))
    loaded = build_model(load_run_config(run).model)
    assert {b.mixer.cfg.scale for b in loaded.blocks if hasattr(b.mixer, "scale_factors")} == {"sqrt"}
