"""`caracal train`: pretraining on one process or under torchrun (DDP, or FSDP2), resumable bit for bit.

`train()` is a straight-line loop. Everything a resumed run needs is either a function of the step (the data
a step reads, see `loader`; the learning rate, see `recipe`) or stored in the checkpoint (weights, AdamW
state, tokens seen, RNG states), so a run stopped at step k and resumed ends with the same weights as one
that never stopped, as long as the world size is the same (on CPU; GPU kernels may not be deterministic).

Exit paths: finished (a final evaluation and checkpoint); `max_steps` reached (the same, the schedule still
follows the whole token budget); SIGINT/SIGTERM (the current step finishes, a checkpoint is saved, and the
result says which signal: the CLI exits 130 or 143); a non-finite loss (`TrainError` naming the step and the
last good checkpoint, before the optimizer applies the bad step).
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from caracal_cli.checkpoint import (
    config_yaml, intact_checkpoint, latest_checkpoint, load_run_config, load_trainer_state, load_weights,
    model_state, read_meta, remove_orphans, save_checkpoint, save_run_config,
)
from caracal_cli.config import CaracalError, Config, load_preset, warn
from caracal_cli.device import resolve_device, to_device
from caracal_cli.fileio import DirectoryLock, atomic_path, write_json
from caracal_cli.loader import TrainBatches, ValidationWindows, open_dataset, split_summary
from caracal_cli.model import build_model, count_parameters, flops_per_token, kernel_paths
from caracal_cli.monitor import Console, MetricsLog, TensorBoard, peak_flops_for, read_metrics, require_tensorboard
from caracal_cli.recipe import BatchPlan, build_optimizer, learning_rate, plan_batches
from caracal_cli.tokenizer import REFERENCE_FILE, TOKENIZER_FILE

DATA_FILE = "data.json"  # in the run directory: the data directory and its manifest summary


class TrainError(CaracalError):
    """A run that cannot start or go on (no checkpoints to resume, a non-finite loss, …)."""


# --- where and how: processes, device, run directory ----------------------------------------------------
@dataclass(frozen=True)
class Ranks:
    world_size: int = 1
    rank: int = 0
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def ranks_from_env() -> Ranks:
    """torchrun's RANK / WORLD_SIZE / LOCAL_RANK (one process when they are absent)."""
    env = os.environ
    return Ranks(int(env.get("WORLD_SIZE", 1)), int(env.get("RANK", 0)), int(env.get("LOCAL_RANK", 0)))


def default_run_dir(preset: str) -> Path:
    return Path("runs") / f"{Path(preset).stem}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


@dataclass
class RunSetup:
    config: Config
    data_dir: Path
    run_dir: Path
    resume: bool


def resolve_run(preset: str | None, overrides: list[str], data: str | Path | None, out: str | Path | None,
                resume: str | Path | None) -> RunSetup:
    """Config, data directory and run directory of a new run (`preset`) or a resumed one (`resume`)."""
    if resume is not None:
        if preset is not None or overrides:
            raise TrainError("--resume continues a run with its saved config: drop --preset and --set")
        run_dir = Path(resume)
        if not run_dir.is_dir():
            raise TrainError(f"{run_dir}: no such run directory")
        config = load_run_config(run_dir)
        if latest_checkpoint(run_dir) is None:
            raise TrainError(f"{run_dir}: no checkpoints to resume from")
        return RunSetup(config, _data_dir(config, data, run_dir), run_dir, True)
    if preset is None:
        raise TrainError("give --preset NAME (or --resume RUN_DIR)")
    config = load_preset(preset, overrides)
    run_dir = Path(out) if out is not None else default_run_dir(preset)
    if latest_checkpoint(run_dir) is not None:
        raise TrainError(f"{run_dir} already holds checkpoints: continue it with --resume {run_dir}, "
                         f"or choose another --out")
    return RunSetup(config, _data_dir(config, data), run_dir, False)


def _tokenizer_files(data_dir: Path) -> list[Path]:
    """The files `tokenizer.load_tokenizer(data_dir)` reads, to copy into the run directory."""
    files = [data_dir / name for name in (TOKENIZER_FILE, REFERENCE_FILE) if (data_dir / name).is_file()]
    if not files:
        raise TrainError(f"{data_dir}: no {TOKENIZER_FILE} or {REFERENCE_FILE} (was it made by `caracal prepare`?)")
    return files


def _data_dir(config: Config, data: str | Path | None, run_dir: Path | None = None) -> Path:
    if data is None and run_dir is not None and (run_dir / DATA_FILE).is_file():
        data = json.loads((run_dir / DATA_FILE).read_text())["path"]
    if data is None:
        data = config.data.path
    if data is None:
        raise TrainError("no training data: pass --data DIR (made by `caracal prepare`) or set data.path")
    path = Path(data)
    if not path.is_dir():
        raise TrainError(f"{path}: data directory not found (make one with `caracal prepare`)")
    return path


def dry_run_report(setup: RunSetup, world_size: int) -> str:
    """What `--dry-run` prints: the resolved config and the batch plan, checked as a real run would be."""
    plan = plan_batches(setup.config.train, setup.config.model.context, world_size)
    lines = [config_yaml(setup.config).rstrip(), "",
             f"world size:        {plan.world_size}",
             f"micro-batch:       {plan.micro_batch} sequences × {plan.context} tokens per process",
             f"grad accumulation: {plan.grad_accum} micro-steps",
             f"tokens per step:   {plan.tokens_per_step}",
             f"total steps:       {plan.total_steps} ({setup.config.train.tokens} tokens)",
             f"warmup steps:      {plan.warmup_steps}",
             f"data:              {setup.data_dir}",
             f"run directory:     {setup.run_dir}" + (" (resume)" if setup.resume else "")]
    return "\n".join(lines)


def torchrun_command(child_args: list[str], nproc_per_node: int, nnodes: int = 1, node_rank: int = 0,
                     rdzv_endpoint: str | None = None) -> list[str]:
    """`python -m torch.distributed.run … -m caracal_cli <child_args>`: this CLI again, once per process."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc_per_node}",
           f"--nnodes={nnodes}"]
    if nnodes > 1:
        if not rdzv_endpoint:
            raise TrainError("--nnodes > 1 needs --rdzv-endpoint HOST:PORT (the node with --node-rank 0)")
        cmd += ["--rdzv-backend=static", f"--rdzv-endpoint={rdzv_endpoint}", f"--node-rank={node_rank}"]
    elif rdzv_endpoint:
        cmd += ["--rdzv-backend=c10d", f"--rdzv-endpoint={rdzv_endpoint}"]
    else:
        cmd += ["--standalone"]
    return cmd + ["-m", "caracal_cli", *child_args]


def launch(cmd: list[str]) -> int:
    """Run torchrun and return its exit status. Ctrl-C reaches the workers directly (same process group);
    they save a checkpoint and stop, so this process only waits; a SIGTERM is passed on. A worker that dies of
    a fatal signal (a C++ abort, a segfault) prints every thread's Python stack first (faulthandler)."""
    proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONFAULTHANDLER": os.environ.get("PYTHONFAULTHANDLER", "1")})
    previous = {signal.SIGINT: signal.signal(signal.SIGINT, signal.SIG_IGN),
                signal.SIGTERM: signal.signal(signal.SIGTERM, lambda signum, frame: proc.send_signal(signum))}
    try:
        return proc.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _init_process_group(ranks: Ranks, device: torch.device) -> bool:
    """Join torchrun's process group (NCCL on CUDA, gloo on CPU); True if this call created it."""
    if ranks.world_size == 1 or dist.is_initialized():
        return False
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    return True


# --- checkpoint contents --------------------------------------------------------------------------------
def rng_state(device: torch.device) -> dict[str, Any]:
    """torch / numpy / python (and CUDA) RNG states as tensors and plain types (weights_only-loadable)."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    version, py_state, gauss = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
             "python": {"version": version, "state": torch.tensor(py_state, dtype=torch.int64), "gauss": gauss}}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"].tolist()), p["gauss"]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _full_options(**kwargs):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kwargs)


def full_weights(model: torch.nn.Module, sharded: bool) -> dict[str, torch.Tensor]:
    """The whole model's weights on CPU (gathered from every rank under FSDP; collective there), tied tensors
    once under their first name, as `checkpoint.model_state` stores them."""
    if not sharded:
        return model_state(model)
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = get_model_state_dict(model, options=_full_options(cpu_offload=True))
    unique = {name for name, _ in model.named_parameters()}
    tied = {name for name, _ in model.named_parameters(remove_duplicate=False)} - unique
    return {name: t.contiguous() for name, t in state.items() if name not in tied}


# --- evaluation -----------------------------------------------------------------------------------------
def autocast(device: torch.device, dtype: str):
    """bf16/fp16 autocast on CUDA as the config says; CPU runs in float32."""
    if device.type != "cuda" or dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if dtype == "bf16" else torch.float16)


@torch.no_grad()
def evaluate_val_loss(model: torch.nn.Module, data_dir: str | Path, config: Config,
                      device: str | torch.device, tokens: int | None = None,
                      windows: ValidationWindows | None = None) -> float:
    """Mean next-token loss (nats) over the first `tokens` tokens (default `train.eval_tokens`) of the `val`
    split, in order, in micro-batches of `train.micro_batch` windows (rounded down to whole micro-batches
    when there are more than one). Under torch.distributed the batches are split among the ranks and every
    rank runs the same number of forwards (FSDP gathers weights inside them)."""
    device = torch.device(device)
    if windows is None:
        windows = ValidationWindows(data_dir, open_dataset(data_dir, config.model.vocab_size),
                                    config.model.context, tokens or config.train.eval_tokens)
    size = config.train.micro_batch
    count = len(windows) - len(windows) % size if len(windows) >= size else len(windows)
    batches = [(first, min(size, count - first)) for first in range(0, count, size)]
    world, rank = (dist.get_world_size(), dist.get_rank()) if dist.is_initialized() else (1, 0)
    totals = torch.zeros(2, dtype=torch.float64, device=device)  # (summed loss, tokens)
    was_training = model.training
    model.eval()
    for round_start in range(0, len(batches), world):
        index = round_start + rank
        x, y = windows.batch(*batches[index if index < len(batches) else 0])
        x, y = to_device(x, device), to_device(y, device)
        with autocast(device, config.train.dtype):
            loss = model(x, targets=y, reduction="sum")
        if index < len(batches):  # a padding batch only keeps the ranks in step
            totals += torch.stack([loss.double(), torch.tensor(y.numel(), dtype=torch.float64, device=device)])
    if world > 1:
        dist.all_reduce(totals)
    model.train(was_training)
    return (totals[0] / totals[1]).item()


# --- the loop -------------------------------------------------------------------------------------------
@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    tokens: int = 0
    elapsed: float = 0.0  # seconds of training, summed over resumed sessions
    loss: float | None = None
    val_loss: float | None = None
    checkpoint: Path | None = None  # newest checkpoint written
    stopped_by: str | None = None  # SIGINT / SIGTERM


class StopRequest:
    """SIGINT/SIGTERM set a flag that the loop reads between steps; a second SIGINT interrupts at once."""

    def __init__(self):
        self.caught: set[int] = set()
        self._previous: dict[int, Any] = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and signal.SIGINT in self.caught:
            raise KeyboardInterrupt
        self.caught.add(signum)

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def _grad_sync(model: torch.nn.Module, sync: bool, sharded: bool):
    """Skip the gradient all-reduce (DDP) or reduce-scatter (FSDP2) on accumulation micro-steps."""
    if sharded:
        model.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()
    if hasattr(model, "no_sync") and not sync:
        return model.no_sync()
    return contextlib.nullcontext()


def train(config: Config | None, data_dir: str | Path | None, run_dir: str | Path, *, max_steps: int | None = None,
          resume: bool = False, device: str = "auto", tensorboard: bool = False, peak_flops: float | None = None,
          compile: bool | None = None, progress: bool | None = None, quiet: bool = False,
          allow_incomplete: bool = False) -> dict[str, Any]:
    """Train `config` on the dataset in `data_dir`, writing `run_dir`; with `resume`, continue `run_dir` from
    its newest intact checkpoint with its saved config (`config` and `data_dir` may then be None; other data
    than the run's is refused). `max_steps` stops after that optimizer step (counted from the run's start).
    Under torchrun, every process calls this; rank 0 holds the run directory's lock while it runs. An
    incomplete dataset is refused unless `allow_incomplete`.

    Returns {run_dir, step, tokens, loss, val_loss, val_ppl, checkpoint, stopped_by, steps_run, elapsed,
    tokens_per_s, mfu}; tokens_per_s and mfu average this session's steps after the first (compilation)."""
    ranks = ranks_from_env()
    run_dir = Path(run_dir)
    if resume:
        setup = resolve_run(None, [], data_dir, None, run_dir)
    else:
        if config is None:
            raise TrainError("train() needs a config for a new run")
        if latest_checkpoint(run_dir) is not None:
            raise TrainError(f"{run_dir} already holds checkpoints: continue it with --resume {run_dir}")
        setup = RunSetup(config, _data_dir(config, data_dir), run_dir, False)
    config, data_dir, tc = setup.config, setup.data_dir, setup.config.train
    manifest = open_dataset(data_dir, config.model.vocab_size, allow_incomplete)
    if setup.resume:
        check_same_data(run_dir, data_dir, manifest, update=False)
    plan = plan_batches(tc, config.model.context, ranks.world_size)
    job = Job(config=config, data_dir=data_dir, manifest=manifest, run_dir=run_dir, resume=setup.resume,
              plan=plan, ranks=ranks, device=resolve_device(device, ranks.local_rank),
              batches=TrainBatches(data_dir, manifest, config.model.context, plan.micro_batch, plan.grad_accum,
                                   ranks.world_size, ranks.rank, tc.seed),
              val_windows=ValidationWindows(data_dir, manifest, config.model.context, tc.eval_tokens),
              tokenizer_files=_tokenizer_files(data_dir),
              end_step=plan.total_steps if max_steps is None else min(plan.total_steps, max_steps),
              compile=tc.compile if compile is None else compile, peak_flops=peak_flops)
    if tensorboard:
        require_tensorboard()  # on every rank, before any of them waits for the others
    lock = DirectoryLock(run_dir, "run directory").acquire() if ranks.main else None  # one writer per run
    try:
        board = TensorBoard(run_dir) if tensorboard and ranks.main else None
        created_group = _init_process_group(ranks, job.device)
        try:
            return _run(job, board, Console(ranks.main and not quiet, tc.log_every, job.end_step, progress))
        finally:
            if board is not None:
                board.close()
            if created_group:
                # FSDP2's hooks keep the model, its DTensors and the device mesh in reference cycles: collect
                # them while the group still exists, so that none of its work is freed during shutdown.
                gc.collect()
                dist.destroy_process_group()
    finally:
        if lock is not None:
            lock.release()


@dataclass
class Job:
    """Everything a run fixes before its first step."""
    config: Config
    data_dir: Path
    manifest: dict[str, Any]
    run_dir: Path
    resume: bool
    plan: BatchPlan
    ranks: Ranks
    device: torch.device
    batches: TrainBatches
    val_windows: ValidationWindows
    tokenizer_files: list[Path]
    end_step: int
    compile: bool
    peak_flops: float | None


def _run(job: Job, board: TensorBoard | None, console: Console) -> dict[str, Any]:
    config, data_dir, manifest, run_dir, plan, ranks = (job.config, job.data_dir, job.manifest, job.run_dir,
                                                        job.plan, job.ranks)
    dev, batches, end_step = job.device, job.batches, job.end_step
    tc = config.train
    state = TrainState()
    metrics = MetricsLog(run_dir)
    checkpoint, validated = _resume_point(run_dir, ranks) if job.resume else (None, False)

    torch.manual_seed(tc.seed)
    model = build_model(config.model)
    if checkpoint is not None:
        load_weights(model, checkpoint)
    model.to(dev)
    params = count_parameters(model)["total"]
    flops = flops_per_token(model, config.model.context)["train"]
    paths = kernel_paths(model, dev)
    sharded = tc.parallel == "fsdp" and ranks.world_size > 1
    if job.compile:  # in place, so parameter names (and checkpoints) stay as they are
        for module in (model.blocks if sharded else [model]):
            module.compile(mode=tc.compile_mode)
    if sharded:
        from torch.distributed.fsdp import fully_shard

        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
        train_model = model
    elif ranks.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel

        # No buffer needs syncing (RoPE's tables are computed alike on every rank): skip the per-step broadcast.
        train_model = DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None,
                                              broadcast_buffers=False)
    else:
        train_model = model
    optimizer = build_optimizer(model, tc, dev)
    scaler = torch.amp.GradScaler(dev.type, enabled=dev.type == "cuda" and tc.dtype == "fp16")

    if checkpoint is not None:
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        saved = load_trainer_state(checkpoint)
        set_optimizer_state_dict(model, optimizer, saved["optimizer"], options=_full_options())
        if saved.get("scaler"):
            scaler.load_state_dict(saved["scaler"])
        rngs = saved["rng"]
        set_rng_state(rngs[ranks.rank] if len(rngs) == ranks.world_size else rngs[0], dev)
        state = TrainState(step=saved["step"], tokens=saved["tokens"], elapsed=saved["elapsed"],
                           loss=saved.get("loss"), val_loss=read_meta(checkpoint).get("val_loss"),
                           checkpoint=checkpoint)
        if ranks.main:
            _warn_inexact_resume(read_meta(checkpoint), ranks.world_size, dev, tc)

    if ranks.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        remove_orphans(run_dir)  # a killed writer's temporary files and checkpoint directories
        if job.resume:
            check_same_data(run_dir, data_dir, manifest)  # refused before; here data.json follows a move
            metrics.truncate_after(state.step)
        else:
            metrics.path.unlink(missing_ok=True)  # the rows of an earlier attempt, killed before a checkpoint
            save_run_config(run_dir, config)
            for file in job.tokenizer_files:  # copied, not loaded: training needs no tokenizer library
                with atomic_path(run_dir / file.name) as tmp:
                    shutil.copyfile(file, tmp)
            write_json(run_dir / DATA_FILE, {"path": str(data_dir.resolve()), "tokenizer": manifest["tokenizer"],
                                             "splits": split_summary(manifest), "source": manifest.get("source"),
                                             "fingerprint": data_fingerprint(manifest)})
    peak = peak_flops_for(dev, job.peak_flops)
    gpu = f" ({torch.cuda.get_device_name(dev)})" if dev.type == "cuda" else ""
    mode = "fsdp" if sharded else "ddp" if ranks.world_size > 1 else "single process"
    console.print(f"device {dev}{gpu} | world size {ranks.world_size} ({mode}) | {params / 1e6:.2f}M parameters"
                  f" | kernels: {', '.join(f'{k}: {v}' for k, v in paths.items())}"
                  f" | compile {f'on ({tc.compile_mode})' if job.compile else 'off'}")
    console.print(f"{config.name}: {plan.micro_batch} seq × {plan.context} tokens × {plan.grad_accum} accum × "
                  f"{plan.world_size} ranks = {plan.tokens_per_step} tokens/step, steps {state.step}→{end_step} "
                  f"of {plan.total_steps} | data {data_dir} ({len(batches.stream)} train tokens) | "
                  f"run {run_dir}" + (f" | resumed from {checkpoint.name}" if checkpoint else ""))

    def save(meta_loss: float | None) -> Path:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        weights = full_weights(model, sharded)
        trainer = {"step": state.step, "tokens": state.tokens, "elapsed": state.elapsed, "loss": meta_loss,
                   "optimizer": get_optimizer_state_dict(model, optimizer, options=_full_options(cpu_offload=True)),
                   "scaler": scaler.state_dict() if scaler.is_enabled() else None,
                   "rng": _gather(rng_state(dev), ranks),
                   "data": {"seed": tc.seed, "sequences_per_step": batches.sequences_per_step,
                            "next_sequence": state.step * batches.sequences_per_step,
                            "epoch": batches.epoch_of(state.step)},
                   "world_size": ranks.world_size}
        path = run_dir / "checkpoints" / f"step_{state.step:08d}"
        if ranks.main:
            path = save_checkpoint(run_dir, state.step, weights, trainer,
                                   {"tokens": state.tokens, "loss": meta_loss, "val_loss": state.val_loss,
                                    "config": config.name, "world_size": ranks.world_size,
                                    "device": dev.type, "threads": _threads(tc)}, keep=tc.keep_checkpoints)
        if ranks.world_size > 1:
            dist.barrier()
        state.checkpoint = path
        return path

    def evaluate() -> None:
        state.val_loss = evaluate_val_loss(model, data_dir, config, dev, windows=job.val_windows)
        record = {"step": state.step, "tokens": state.tokens, "val_loss": state.val_loss,
                  "val_ppl": math.exp(min(state.val_loss, 700)), "elapsed": round(state.elapsed, 3)}
        if ranks.main:
            metrics.write(record)
            if board is not None:
                board.write(record)
        console.print(f"step {state.step} | val loss {state.val_loss:.4f} | val ppl {record['val_ppl']:.2f}")

    start_step, session_start = state.step, time.perf_counter()
    timed_tokens, timed_seconds, step_time = 0, 0.0, None
    # A resumed run has its checkpoint; its validation is done unless it was killed before writing it.
    last_save = state.step if checkpoint is not None else -1
    last_eval = state.step if validated else -1

    def fetch(step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = batches.batch(step, micro)
        return to_device(x, dev), to_device(y, dev)

    # The host waits for the GPU once per step, to read its report. Where fused AdamW can skip an update on the
    # GPU (found_inf: a non-finite loss or gradient norm), the update and the next step's first batch are
    # queued before that wait, so the GPU does not idle while the host catches up (on an H200, llama-tiny's
    # GPU idled ~5.6 ms at each step's boundary: launching the update, preparing the batch).
    update_first = bool(optimizer.defaults.get("fused")) and not scaler.is_enabled() and not sharded

    def update() -> None:
        scaler.step(optimizer)  # the optimizer's own step when the scaler is off (bf16, float32)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    ahead: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
    console.start(start_step, end_step)
    try:
        with StopRequest() as stop:
            for step in range(start_step, end_step):
                t0 = time.perf_counter()
                lr = learning_rate(step, plan, tc)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                loss_sum = torch.zeros((), device=dev)
                for micro in range(plan.grad_accum):
                    x, y = ahead.pop((step, micro), None) or fetch(step, micro)
                    with _grad_sync(train_model, micro == plan.grad_accum - 1, sharded):
                        with autocast(dev, tc.dtype):
                            loss = train_model(x, targets=y)
                        scaler.scale(loss / plan.grad_accum).backward()
                    loss_sum += loss.detach()
                scaler.unscale_(optimizer)
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(),
                                                           tc.grad_clip if tc.grad_clip > 0 else math.inf)
                if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP2
                    grad_norm = grad_norm.full_tensor()
                # One collective and one wait for the GPU per step: mean loss, the gradient norm (the same on
                # every rank) and whether any rank was asked to stop.
                report = torch.stack([loss_sum / plan.grad_accum, grad_norm.float(),
                                      torch.tensor(float(signal.SIGINT in stop.caught), device=dev),
                                      torch.tensor(float(signal.SIGTERM in stop.caught), device=dev)])
                if ranks.world_size > 1:
                    dist.all_reduce(report)
                if update_first:
                    optimizer.found_inf = (~torch.isfinite(report[:2]).all()).float()
                    update()
                if step + 1 < end_step:
                    ahead[(step + 1, 0)] = fetch(step + 1, 0)
                loss_value, grad_norm, sigint, sigterm = report.tolist()
                loss_value, grad_norm = loss_value / ranks.world_size, grad_norm / ranks.world_size
                # A non-finite gradient norm stops the run too, except under fp16's loss scaler, which skips the
                # steps whose gradients overflow.
                checks = [("loss", loss_value)] + ([] if scaler.is_enabled() else [("gradient norm", grad_norm)])
                bad = [f"{name} is {value}" for name, value in checks if not math.isfinite(value)]
                if bad:
                    last = latest_checkpoint(run_dir)
                    raise TrainError(f"{bad[0]} at step {step + 1}; stopped before applying it "
                                     f"(last good checkpoint: {last if last else 'none saved yet'})")
                if not update_first:
                    update()

                dt = time.perf_counter() - t0
                state.step, state.tokens, state.loss = step + 1, state.tokens + plan.tokens_per_step, loss_value
                state.elapsed += dt
                if step > start_step:  # the first step of a session pays for compilation and warm caches
                    timed_tokens, timed_seconds = timed_tokens + plan.tokens_per_step, timed_seconds + dt
                step_time = dt if step_time is None else 0.9 * step_time + 0.1 * dt
                tokens_per_s = plan.tokens_per_step / dt
                record = {"step": state.step, "tokens": state.tokens, "loss": loss_value, "lr": lr,
                          "grad_norm": grad_norm, "tokens_per_s": round(tokens_per_s, 1),
                          "mfu": flops * tokens_per_s / (peak * ranks.world_size) if peak else None,
                          "elapsed": round(state.elapsed, 3)}
                if ranks.main:
                    metrics.write(record)
                    if board is not None:
                        board.write(record)
                console.step(record, (end_step - state.step) * step_time)

                stopping = sigint > 0 or sigterm > 0
                if state.step % tc.eval_every == 0 and state.step < end_step and not stopping:
                    evaluate()
                    last_eval = state.step
                if state.step % tc.checkpoint_every == 0 or stopping:
                    save(loss_value)
                    last_save = state.step
                if stopping:
                    state.stopped_by = "SIGTERM" if sigterm > 0 else "SIGINT"
                    console.print(f"{state.stopped_by}: stopped after step {state.step}, "
                                  f"checkpoint {state.checkpoint}")
                    break
            # the end (reached now, or earlier by a run killed before its final validation): validate and save
            if state.stopped_by is None and (state.step > start_step or state.step == end_step):
                if last_eval != state.step:
                    evaluate()
                if last_save != state.step:
                    save(state.loss)
    finally:
        console.close()
    session = time.perf_counter() - session_start
    tokens_per_s = timed_tokens / timed_seconds if timed_seconds else (
        (state.step - start_step) * plan.tokens_per_step / session if state.step > start_step else None)
    return {"run_dir": str(run_dir), "step": state.step, "tokens": state.tokens, "loss": state.loss,
            "val_loss": state.val_loss,
            "val_ppl": math.exp(min(state.val_loss, 700)) if state.val_loss is not None else None,
            "checkpoint": str(state.checkpoint) if state.checkpoint else None, "stopped_by": state.stopped_by,
            "steps_run": state.step - start_step, "elapsed": state.elapsed, "tokens_per_s": tokens_per_s,
            "mfu": flops * tokens_per_s / (peak * ranks.world_size) if peak and tokens_per_s else None,
            "world_size": ranks.world_size, "params": params}


def _resume_point(run_dir: Path, ranks: Ranks) -> tuple[Path, bool]:
    """Rank 0's choice, shared with every rank: the newest intact checkpoint (a damaged newer one is skipped
    with a warning), and whether metrics.jsonl holds a validation at its step (a run killed between its last
    checkpoint and its final validation has none, and a resume writes it)."""
    choice: list[Any] = [None, False]
    if ranks.main:
        checkpoint = intact_checkpoint(run_dir)
        if checkpoint is None:
            raise TrainError(f"{run_dir}: no checkpoints to resume from")
        step = read_meta(checkpoint)["step"]
        choice = [checkpoint, any(r.get("step") == step and "val_loss" in r for r in read_metrics(run_dir))]
    if ranks.world_size > 1:
        dist.broadcast_object_list(choice, src=0)
    return choice[0], choice[1]


def data_fingerprint(manifest: dict[str, Any]) -> str:
    """SHA-256 of the manifest's shard list (names, token counts, checksums): the same data, wherever it lies."""
    import hashlib

    return hashlib.sha256(json.dumps(manifest["splits"], sort_keys=True).encode()).hexdigest()


def check_same_data(run_dir: Path, data_dir: Path, manifest: dict[str, Any], update: bool = True) -> None:
    """Refuse to resume `run_dir` on data other than it trained on (another tokenizer, other shards): the
    batches would differ from the run's. The same data at a new path is accepted, and (with `update`) the run's
    data.json is pointed at it."""
    if not (run_dir / DATA_FILE).is_file():
        return
    recorded = json.loads((run_dir / DATA_FILE).read_text())
    ours, theirs = recorded.get("tokenizer") or {}, manifest["tokenizer"]
    keys = ("name", "vocab_size", "eot_id")
    different = [f"{k} {ours.get(k)!r} vs {theirs.get(k)!r}" for k in keys if ours.get(k) != theirs.get(k)]
    different += [f"{path.name} differs" for path in _tokenizer_files(data_dir)
                  if (run_dir / path.name).is_file() and (run_dir / path.name).read_bytes() != path.read_bytes()]
    if different:
        raise TrainError(f"{data_dir}: its tokenizer is not the run's ({', '.join(different)}); resume on the "
                         f"run's data, or start a new run")
    same = (recorded["fingerprint"] == data_fingerprint(manifest) if "fingerprint" in recorded
            else recorded.get("splits") == split_summary(manifest))
    if not same:
        now = split_summary(manifest)
        was = recorded.get("splits") or {}
        diff = ", ".join(f"{split}: {was.get(split, {}).get('tokens')} tokens in {was.get(split, {}).get('shards')} "
                         f"shards then, {now.get(split, {}).get('tokens')} in {now.get(split, {}).get('shards')} now"
                         for split in sorted(set(was) | set(now)))
        raise TrainError(f"{data_dir}: not the data the run trained on ({recorded.get('path')}; "
                         f"{diff or 'other shards'}); resume on the run's data, or start a new run")
    path = str(data_dir.resolve())
    if update and recorded.get("path") != path:
        warn(f"the run's data moved: {recorded.get('path')} → {path} (the same shards); data.json now says so")
        write_json(run_dir / DATA_FILE, {**recorded, "path": path})


def _threads(tc) -> int:
    """The CPU threads this run computes with: the config's `threads` where it has one, else torch's."""
    return getattr(tc, "threads", None) or torch.get_num_threads()


def _warn_inexact_resume(meta: dict[str, Any], world_size: int, device: torch.device, tc) -> None:
    """A resume at another world size, or on CPU with another thread count, trains correctly (the batches are
    the same) but sums in another order: say that it will not match an uninterrupted run bit for bit."""
    changes = []
    if meta.get("world_size", world_size) != world_size:
        changes.append(f"world size {meta['world_size']} → {world_size}")
    if device.type == "cpu" and meta.get("device") == "cpu" and meta.get("threads", _threads(tc)) != _threads(tc):
        changes.append(f"CPU threads {meta['threads']} → {_threads(tc)}")
    if changes:
        warn(f"resuming with {', '.join(changes)}: the same batches, summed in another order, so the result "
             f"will not be bit-identical to an uninterrupted run")


def _gather(obj: Any, ranks: Ranks) -> list[Any]:
    """Every rank's `obj`, in rank order (collective under torch.distributed)."""
    if ranks.world_size == 1:
        return [obj]
    out: list[Any] = [None] * ranks.world_size
    dist.all_gather_object(out, obj)
    return out
