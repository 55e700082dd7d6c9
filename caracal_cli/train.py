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
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from caracal_cli import autobatch
from caracal_cli.autobatch import AutoBatch
from caracal_cli.checkpoint import (
    config_yaml, intact_checkpoint, latest_checkpoint, load_run_config, load_trainer_state, load_weights,
    model_state, prune_checkpoints, read_meta, remove_orphans, save_checkpoint, save_run_config,
)
from caracal_cli.config import CaracalError, Config, apply_overrides, config_from_dict, load_preset, warn
from caracal_cli.device import AUTOCAST_DTYPES, resolve_device, to_device
from caracal_cli.fileio import DirectoryLock, atomic_path, write_json
from caracal_cli.loader import TrainBatches, ValidationWindows, open_dataset, split_summary
from caracal_cli.model import (
    build_model, count_parameters, flops_per_token, forced_path_errors, kernel_paths, set_activation_checkpointing,
)
from caracal_cli.monitor import Console, Loggers, MetricsLog, TensorBoard, WandB, peak_flops_for, read_metrics
from caracal_cli.recipe import BatchPlan, build_optimizer, learning_rate, plan_batches, planned_steps
from caracal_cli.runs import check_resume_overrides, config_changes, record_config_change
from caracal_cli.shards import MANIFEST, keep_folder_manifest
from caracal_cli.tokenizer import REFERENCE_FILE, TOKENIZER_FILE

DATA_FILE = "data.json"  # in the run directory: the data directory and its manifest summary
AUTOBATCH_FILE = "autobatch.json"  # in the run directory: how `train.micro_batch: auto` chose
TRACE_DIR = "traces"  # in the run directory: `--profile-steps`' torch.profiler traces, one per rank


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
        if preset is not None:
            raise TrainError("--resume continues a run with its saved config: drop --preset")
        run_dir = Path(resume)
        if not run_dir.is_dir():
            raise TrainError(f"{run_dir}: no such run directory")
        config = load_run_config(run_dir)
        latest = latest_checkpoint(run_dir)
        if latest is None:
            raise TrainError(f"{run_dir}: no checkpoints to resume from")
        if overrides:  # a longer budget or another schedule; refused with the reason for what would break the run
            check_resume_overrides(overrides, read_meta(latest).get("tokens"))
            config = config_from_dict(apply_overrides(config.to_dict(), overrides), name=config.name)
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
    if not files and not (data_dir / MANIFEST).is_file():
        return []  # a plain llm.c folder: `keep_folder_manifest` saves its tokenizer reference in the run
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
    if run_dir is None:  # a new run: its config (and --dry-run) names the data it trains on
        config.data.path = str(path)
    return path


def dry_run_report(setup: RunSetup, world_size: int, device: str = "auto") -> str:
    """What `--dry-run` prints: the resolved config and the batch plan, checked as a real run would be
    (`train.micro_batch: auto` is resolved on `device` as the run would: real steps on a GPU)."""
    lines = [config_yaml(setup.config).rstrip(), "", f"world size:        {world_size}"]
    try:
        config, choice = choose_micro_batch(setup.config, resolve_device(device), world_size,
                                            Console(True, 1, 0, False))
    except CaracalError as err:  # auto with nothing that fits (a large preset on a CPU): said, not fatal here
        lines += [f"micro-batch:       auto: {err}",
                  f"total steps:       {planned_steps(setup.config.train)} ({setup.config.train.tokens} tokens)"]
    else:
        plan = plan_batches(config.train, config.model.context, world_size)
        how = "" if choice.method == "explicit" else f" (auto: {choice.summary()})"
        lines += [f"micro-batch:       {plan.micro_batch} sequences × {plan.context} tokens per process{how}",
                  f"grad accumulation: {plan.grad_accum} micro-steps",
                  f"tokens per step:   {plan.tokens_per_step}",
                  f"total steps:       {plan.total_steps} ({setup.config.train.tokens} tokens)",
                  f"warmup steps:      {plan.warmup_steps}"]
    lines += [f"data:              {setup.data_dir}",
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
    they save a checkpoint and stop, so this process only waits; a SIGTERM is passed on, and torchrun, which
    passes it to the workers, ends with status 1 on it: 143 is returned then, as one process exits. A worker
    that dies of a fatal signal (a C++ abort, a segfault) prints every thread's Python stack first
    (faulthandler)."""
    proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONFAULTHANDLER": os.environ.get("PYTHONFAULTHANDLER", "1")})
    terminated = []

    def terminate(signum, frame):
        terminated.append(signum)
        proc.send_signal(signum)

    previous = {signal.SIGINT: signal.signal(signal.SIGINT, signal.SIG_IGN),
                signal.SIGTERM: signal.signal(signal.SIGTERM, terminate)}
    try:
        code = proc.wait()
        return 128 + signal.SIGTERM if terminated and code else code
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
    return torch.autocast("cuda", dtype=AUTOCAST_DTYPES[dtype])


EVAL_BATCH_FACTOR = 4  # a no-grad forward keeps one layer's activations, not every layer's: 4x the training micro-batch


def validation_batch(config: Config, windows: int) -> int:
    """Windows per validation forward: the largest divisor of `windows` (so every window is used and shapes
    stay static for a compiled model) up to EVAL_BATCH_FACTOR × the training micro-batch."""
    micro = config.train.micro_batch if config.train.micro_batch != "auto" else 1
    cap = max(1, min(windows, micro * EVAL_BATCH_FACTOR))
    return next(size for size in range(cap, 0, -1) if windows % size == 0)


@torch.no_grad()
def evaluate_val_loss(model: torch.nn.Module, data_dir: str | Path, config: Config,
                      device: str | torch.device, tokens: int | None = None,
                      windows: ValidationWindows | None = None,
                      should_stop: Callable[[], bool] | None = None) -> float | None:
    """Mean next-token loss (nats) over the first `tokens` tokens (default `train.eval_tokens`) of the `val`
    split, in order, in batches of `validation_batch` windows (halved on CUDA out-of-memory). Under
    torch.distributed the batches are split among the ranks and every rank runs the same number of forwards
    (FSDP gathers weights inside them). None when `should_stop()` turned true on any rank between batches."""
    device = torch.device(device)
    if windows is None:
        windows = ValidationWindows(data_dir, open_dataset(data_dir, config.model.vocab_size),
                                    config.model.context, tokens or config.train.eval_tokens)
    world, rank = (dist.get_world_size(), dist.get_rank()) if dist.is_initialized() else (1, 0)
    size = validation_batch(config, len(windows))
    while True:
        try:
            return _val_loss(model, windows, config, device, size, world, rank, should_stop)
        except torch.OutOfMemoryError:
            if size == 1 or world > 1:  # ranks cannot retry alone: their collectives would no longer match
                raise
            size = next(s for s in range(size // 2, 0, -1) if len(windows) % s == 0)
            gc.collect()
            torch.cuda.empty_cache()


def _val_loss(model, windows: ValidationWindows, config: Config, device: torch.device, size: int, world: int,
              rank: int, should_stop: Callable[[], bool] | None) -> float | None:
    batches = [(first, size) for first in range(0, len(windows), size)]
    totals = torch.zeros(2, dtype=torch.float64, device=device)  # (summed loss, tokens)
    was_training = model.training
    model.eval()
    # Called directly, a compiled model's forward runs eager: compiling the no-grad forward cost 15-30 s at small
    # on an H200, far more than the forwards. FSDP2's hooks live in __call__, so a sharded model goes through it.
    forward = model if hasattr(model, "unshard") else model.forward
    try:
        for round_start in range(0, len(batches), world):
            if should_stop is not None and _any_rank(should_stop(), world, device):
                return None
            index = round_start + rank
            x, y = windows.batch(*batches[index if index < len(batches) else 0])
            x, y = to_device(x, device), to_device(y, device)
            with autocast(device, config.train.dtype):
                loss = forward(x, targets=y, reduction="sum")
            if index < len(batches):  # a padding batch only keeps the ranks in step
                totals += torch.stack([loss.double(),
                                       torch.tensor(y.numel(), dtype=torch.float64, device=device)])
    finally:
        model.train(was_training)
    if world > 1:
        dist.all_reduce(totals)
    return (totals[0] / totals[1]).item()


def _any_rank(flag: bool, world: int, device: torch.device) -> bool:
    if world == 1:
        return flag
    value = torch.tensor([float(flag)], device=device)
    dist.all_reduce(value)
    return value.item() > 0


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


class StopNow(BaseException):
    """A second Ctrl-C: leave the step now (not an Exception, so no `except Exception` swallows it)."""


class StopRequest:
    """SIGINT/SIGTERM set a flag that the loop reads between steps, and the first Ctrl-C says so at once. A
    second Ctrl-C leaves the current step: one process saves the last completed step; under torchrun the ranks
    could not agree on a step to save, so it says it exits without saving. Between `hold()` and `release()` (an
    optimizer update, a save) the second Ctrl-C waits for `release()`."""

    def __init__(self, resume_command: str | None = None, announce: bool = True, can_save: bool = True):
        self.caught: set[int] = set()
        self._previous: dict[int, Any] = {}
        self.resume_command, self.announce, self.can_save = resume_command, announce, can_save
        self.now = self._in_critical = False

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _say(self, text: str) -> None:
        if self.announce:
            sys.stderr.write(f"\n{text}\n")
            sys.stderr.flush()

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and signal.SIGINT in self.caught:
            self._say("second Ctrl-C: stopping now, " + ("saving the last completed step" if self.can_save else
                      "WITHOUT saving (a multi-process run saves only at a step's end; the newest checkpoint "
                      "stays)"))
            if not self.can_save:
                os._exit(130)
            self.now = True
            if not self._in_critical:
                raise StopNow
            return
        if not self.caught:
            self._say(f"{signal.Signals(signum).name}: stopping after this step"
                      + (f"; resume with: {self.resume_command}" if self.resume_command else "")
                      + (" (Ctrl-C again to stop at once)" if signum == signal.SIGINT else ""))
        self.caught.add(signum)

    def hold(self) -> None:
        self._in_critical = True

    def release(self) -> None:
        self._in_critical = False
        if self.now:
            raise StopNow

    @contextlib.contextmanager
    def held(self):
        self.hold()
        yield
        self.release()

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def shard_model(model: torch.nn.Module, prefetch: int) -> None:
    """FSDP2 in place: each block is a unit whose weights are all-gathered just before it runs (and whose gradients
    are reduce-scattered as soon as its backward ends), the embedding, final norm and head one root unit.
    `prefetch` blocks ahead are all-gathered explicitly, so the all-gather overlaps the current block's compute
    even when the CPU is not far ahead of the GPU. The last block keeps its weights after forward: backward
    starts with it."""
    from torch.distributed.fsdp import fully_shard

    blocks = list(model.blocks)
    for i, block in enumerate(blocks):
        fully_shard(block, reshard_after_forward=i < len(blocks) - 1)
    fully_shard(model)
    if prefetch:  # else FSDP2's own order: one block ahead in backward, none in forward (an empty list stops it)
        for i, block in enumerate(blocks):
            block.set_modules_to_forward_prefetch(blocks[i + 1:i + 1 + prefetch])
            block.set_modules_to_backward_prefetch(blocks[max(0, i - prefetch):i][::-1])


@contextlib.contextmanager
def step_profiler(steps: int, run_dir: Path, rank: int, device: torch.device):
    """torch.profiler over `steps` optimizer steps after this session's first two (compilation, warm-up), written
    to RUN/traces/rank{R}.json.gz (Chrome / Perfetto format) when they end or the run does. Yields the function to
    call after each step; nothing is recorded at 0."""
    if not steps:
        yield lambda: None
        return
    from torch.profiler import ProfilerActivity, profile, schedule

    path = run_dir / TRACE_DIR / f"rank{rank}.json.gz"
    path.parent.mkdir(parents=True, exist_ok=True)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, schedule=schedule(wait=1, warmup=1, active=steps, repeat=1),
                 on_trace_ready=lambda prof: prof.export_chrome_trace(str(path))) as prof:
        yield prof.step


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
          allow_incomplete: bool = False, wandb: bool = False, profile_steps: int = 0,
          resume_command: str | None = None) -> dict[str, Any]:
    """Train `config` on the dataset in `data_dir`, writing `run_dir`; with `resume`, continue `run_dir` from
    its newest intact checkpoint with its saved config (`config` and `data_dir` may then be None; other data
    than the run's is refused). `max_steps` stops after that optimizer step (counted from the run's start).
    Under torchrun, every process calls this; rank 0 holds the run directory's lock while it runs. An
    incomplete dataset is refused unless `allow_incomplete`. `profile_steps` records a trace (`step_profiler`).
    `resume_command` is what a run stopped by a signal tells the user to run (`caracal train --resume RUN`).

    Returns {run_dir, step, tokens, loss, val_loss, val_ppl, checkpoint, stopped_by, steps_run, elapsed,
    tokens_per_s, mfu}; tokens_per_s and mfu average this session's steps after the first (compilation)."""
    ranks = ranks_from_env()
    run_dir = Path(run_dir)
    if resume:
        setup = resolve_run(None, [], data_dir, None, run_dir)
        if config is not None:  # changed on resume: only keys a resumed run can honour (config_changes refuses)
            config_changes(setup.config, config)
            setup.config = config
    else:
        if config is None:
            raise TrainError("train() needs a config for a new run")
        if latest_checkpoint(run_dir) is not None:
            raise TrainError(f"{run_dir} already holds checkpoints: continue it with --resume {run_dir}")
        setup = RunSetup(config, _data_dir(config, data_dir), run_dir, False)
    config, data_dir = setup.config, setup.data_dir
    manifest = open_dataset(data_dir, config.model.vocab_size, allow_incomplete)
    if setup.resume:
        check_same_data(run_dir, data_dir, manifest, update=False)
    dev = resolve_device(device, ranks.local_rank)
    _check_forced_paths(config, dev)
    compile = config.train.compile if compile is None else compile
    lock = DirectoryLock(run_dir, "run directory").acquire() if ranks.main else None  # one writer per run
    try:
        sinks = [TensorBoard(run_dir)] if tensorboard and ranks.main else []
        if wandb and ranks.main:
            sinks.append(WandB(run_dir, config.to_dict(), setup.resume))
        board = Loggers(sinks) if sinks else None
        created_group = _init_process_group(ranks, dev)
        try:
            console = Console(ranks.main and not quiet, config.train.log_every, 0, progress)
            config, choice = choose_micro_batch(config, dev, ranks.world_size, console)
            tc = config.train
            plan = plan_batches(tc, config.model.context, ranks.world_size)
            job = Job(config=config, data_dir=data_dir, manifest=manifest, run_dir=run_dir, resume=setup.resume,
                      plan=plan, ranks=ranks, device=dev,
                      batches=TrainBatches(data_dir, manifest, config.model.context, plan.micro_batch,
                                           plan.grad_accum, ranks.world_size, ranks.rank, tc.seed),
                      val_windows=ValidationWindows(data_dir, manifest, config.model.context, tc.eval_tokens),
                      tokenizer_files=_tokenizer_files(data_dir),
                      end_step=plan.total_steps if max_steps is None else min(plan.total_steps, max_steps),
                      compile=compile, peak_flops=peak_flops, micro_batch_choice=choice,
                      profile_steps=profile_steps, resume_command=resume_command or f"caracal train --resume {run_dir}")
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


def _check_forced_paths(config: Config, device: torch.device) -> None:
    """Refuse a `fast` kernel setting the device cannot run before the run directory is touched."""
    compute = AUTOCAST_DTYPES[config.train.dtype] if device.type == "cuda" else torch.float32
    errors = forced_path_errors(config.model, device, compute)
    if errors:
        raise TrainError("; ".join(f"model.mixers.{letter}: {error}" for letter, error in errors.items())
                         + " (auto chooses the kernels where they run)")


def choose_micro_batch(config: Config, device: torch.device, world_size: int,
                       console: Console | None = None) -> tuple[Config, AutoBatch]:
    """`config` with `train.micro_batch: auto` resolved (by real steps on CUDA, see `autobatch`), and how it was
    chosen; an explicit integer (also what a resumed run saved) is kept as it is."""
    autobatch.apply_memory_limit(config, device)
    if config.train.micro_batch != "auto":
        return config, autobatch.resolve(config, device, world_size)
    say = console.print if console is not None else (lambda text: None)
    say(f"micro-batch auto: {'probing real training steps (eager)' if device.type == 'cuda' else 'estimating'}"
        f" on {device}")
    choice = autobatch.resolve(config, device, world_size, log=say)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)  # the run's own peak, not the probe's
    say(f"micro-batch auto → {choice.summary()}")
    return autobatch.resolved_config(config, choice), choice


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
    micro_batch_choice: AutoBatch | None = None
    profile_steps: int = 0
    resume_command: str = ""  # what a stopped run tells the user to run (`caracal train --resume RUN` by default)


def _run(job: Job, board: Loggers | None, console: Console) -> dict[str, Any]:
    config, data_dir, manifest, run_dir, plan, ranks = (job.config, job.data_dir, job.manifest, job.run_dir,
                                                        job.plan, job.ranks)
    dev, batches, end_step = job.device, job.batches, job.end_step
    tc = config.train
    state = TrainState()
    metrics = MetricsLog(run_dir)
    checkpoint, validated = _resume_point(run_dir, ranks) if job.resume else (None, False)

    torch.manual_seed(tc.seed)
    model = build_model(config.model)
    set_activation_checkpointing(model, tc.activation_checkpointing)
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
        shard_model(model, tc.fsdp_prefetch)
        train_model = model
    elif ranks.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel

        # No buffer needs syncing (RoPE's tables are computed alike on every rank): skip the per-step broadcast.
        # Gradients are views into the all-reduce buckets: no copy between them, and no second gradient buffer.
        train_model = DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None,
                                              broadcast_buffers=False, bucket_cap_mb=tc.ddp_bucket_mb,
                                              gradient_as_bucket_view=True)
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

    changes = config_changes(load_run_config(run_dir), config) if job.resume else {}
    if ranks.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        remove_orphans(run_dir)  # a killed writer's temporary files and checkpoint directories
        if job.resume:
            # a run killed between a checkpoint and the pruning after it (at its last step, no save would follow)
            prune_checkpoints(run_dir, tc.keep_checkpoints, spare=checkpoint)
            check_same_data(run_dir, data_dir, manifest)  # refused before; here data.json follows a move
            metrics.truncate_after(state.step)
            if changes:
                record_config_change(run_dir, changes, state.step)
                save_run_config(run_dir, config)
        else:
            metrics.path.unlink(missing_ok=True)  # the rows of an earlier attempt, killed before a checkpoint
            save_run_config(run_dir, config)
            for file in job.tokenizer_files:  # copied, not loaded: training needs no tokenizer library
                with atomic_path(run_dir / file.name) as tmp:
                    shutil.copyfile(file, tmp)
            write_json(run_dir / DATA_FILE, {"path": str(data_dir.resolve()), "tokenizer": manifest["tokenizer"],
                                             "splits": split_summary(manifest), "source": manifest.get("source"),
                                             "fingerprint": data_fingerprint(manifest)})
            if job.micro_batch_choice is not None and job.micro_batch_choice.method != "explicit":
                write_json(run_dir / AUTOBATCH_FILE, job.micro_batch_choice.to_dict())
        keep_folder_manifest(run_dir, manifest, job.resume)
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
    if changes:
        console.print("changed on resume (config_history.jsonl): " + ", ".join(
            f"{key} {old} → {new}" for key, (old, new) in changes.items()))

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

    def evaluate() -> bool:
        """Validation; False (nothing recorded) when a stop request cut it short."""
        val_loss = evaluate_val_loss(model, data_dir, config, dev, windows=job.val_windows,
                                     should_stop=lambda: bool(stop.caught))
        if val_loss is None:
            return False
        state.val_loss = val_loss
        record = {"step": state.step, "tokens": state.tokens, "val_loss": state.val_loss,
                  "val_ppl": math.exp(min(state.val_loss, 700)), "elapsed": round(state.elapsed, 3)}
        if ranks.main:
            metrics.write(record)
            if board is not None:
                board.write(record)
        console.print(f"step {state.step} | val loss {state.val_loss:.4f} | val ppl {record['val_ppl']:.2f}")
        return True

    start_step, session_start = state.step, time.perf_counter()
    timed_tokens, timed_seconds, step_time, timed_steps = 0, 0.0, None, 0
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
        with (StopRequest(job.resume_command, console.enabled, can_save=ranks.world_size == 1) as stop,
              step_profiler(job.profile_steps, run_dir, ranks.rank, dev) as profiled_step):
            # A run stopped during a mid-run validation saved its step without it; an uninterrupted run recorded
            # one there, so the resume owes it before the next step.
            if 0 < state.step < end_step and last_eval != state.step and state.step % tc.eval_every == 0:
                if evaluate():
                    last_eval = state.step
                else:  # stopped again: the step's checkpoint is already saved
                    state.stopped_by = "SIGTERM" if signal.SIGTERM in stop.caught else "SIGINT"
                    console.print(f"{state.stopped_by}: validation of step {state.step} stopped; resume with: "
                                  f"{job.resume_command}")
            for step in range(start_step, end_step if state.stopped_by is None else start_step):
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
                stop.hold()  # from the update until the step is counted, a second Ctrl-C waits
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
                stop.release()
                if step > start_step:  # the first step of a session pays for compilation and warm caches
                    timed_tokens, timed_seconds = timed_tokens + plan.tokens_per_step, timed_seconds + dt
                    # ETA: the mean of this session's timed steps, then a slow average (one step's jump barely
                    # moves it)
                    timed_steps += 1
                    step_time = dt if step_time is None else step_time + (dt - step_time) / min(timed_steps, 20)
                tokens_per_s = plan.tokens_per_step / dt
                record = {"step": state.step, "tokens": state.tokens, "loss": loss_value, "lr": lr,
                          "grad_norm": grad_norm, "tokens_per_s": round(tokens_per_s, 1),
                          "mfu": flops * tokens_per_s / (peak * ranks.world_size) if peak else None,
                          "elapsed": round(state.elapsed, 3)}
                if ranks.main:
                    metrics.write(record)
                    if board is not None:
                        board.write(record)
                console.step(record, (end_step - state.step) * (step_time or dt))
                profiled_step()

                stopping = sigint > 0 or sigterm > 0
                if state.step % tc.eval_every == 0 and state.step < end_step and not stopping:
                    if not evaluate():  # stopped by a signal on some rank: save this step and go
                        stopping, sigterm = True, float(signal.SIGTERM in stop.caught)
                    last_eval = state.step
                if state.step % tc.checkpoint_every == 0 or stopping:
                    with stop.held():
                        save(loss_value)
                        last_save = state.step
                if stopping:
                    state.stopped_by = "SIGTERM" if sigterm > 0 else "SIGINT"
                    console.print(f"{state.stopped_by}: stopped after step {state.step}, "
                                  f"checkpoint {state.checkpoint}; resume with: {job.resume_command}")
                    break
            # the end (reached now, or earlier by a run killed before its final validation): validate and save
            if state.stopped_by is None and (state.step > start_step or state.step == end_step):
                if last_eval != state.step:
                    began = time.perf_counter()
                    if evaluate():
                        console.print(f"final validation: {time.perf_counter() - began:.1f} s")
                    else:  # a signal during the final validation: save the step and stop, as between steps
                        state.stopped_by = "SIGTERM" if signal.SIGTERM in stop.caught else "SIGINT"
                        console.print(f"{state.stopped_by}: final validation stopped after "
                                      f"{time.perf_counter() - began:.1f} s")
                if last_save != state.step:
                    began = time.perf_counter()
                    save(state.loss)
                    console.print(f"checkpoint {state.checkpoint}: {time.perf_counter() - began:.1f} s")
    except StopNow:  # a second Ctrl-C: the weights and optimizer are still those of the last completed step
        state.stopped_by = "SIGINT"
        if state.step > start_step and last_save != state.step:
            save(state.loss)
        saved = f"saved step {state.step}: {state.checkpoint}" if state.checkpoint else "no step completed"
        console.print(f"SIGINT: stopped during step {state.step + 1}; {saved}"
                      + (f"; resume with: {job.resume_command}" if state.checkpoint else ""))
    finally:
        console.close()
    session = time.perf_counter() - session_start
    peak_gib = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None
    if peak_gib is not None:
        console.print(f"peak memory {peak_gib:.1f} GiB (torch.cuda.max_memory_allocated)")
    tokens_per_s = timed_tokens / timed_seconds if timed_seconds else (
        (state.step - start_step) * plan.tokens_per_step / session if state.step > start_step else None)
    return {"run_dir": str(run_dir), "step": state.step, "tokens": state.tokens, "loss": state.loss,
            "val_loss": state.val_loss,
            "val_ppl": math.exp(min(state.val_loss, 700)) if state.val_loss is not None else None,
            "checkpoint": str(state.checkpoint) if state.checkpoint else None, "stopped_by": state.stopped_by,
            "steps_run": state.step - start_step, "elapsed": state.elapsed, "tokens_per_s": tokens_per_s,
            "mfu": flops * tokens_per_s / (peak * ranks.world_size) if peak and tokens_per_s else None,
            "world_size": ranks.world_size, "params": params,
            "peak_gib": peak_gib}


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
