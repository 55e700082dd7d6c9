"""Kill training at seeded random points, as kill -9 would, and resume until it finishes; print a JSON report.

    python tests/fault_injection.py DATA_DIR WORK_DIR SEED TRIALS

Each attempt runs in a forked child (this process imports torch but never computes, so forking is safe and
costs no second interpreter start). The child counts events (each step's learning rate, each metrics row,
each file renamed into place or checksummed, each torch.save, each checkpoint pruned) and sends itself SIGKILL
at event K, K drawn from a seeded generator; the parent then starts the next attempt: `--resume` once the
run holds a checkpoint, else the same fresh run again, as a user would. `test_reliability.py` runs this and
compares every trial's final weights, metrics and directory with an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import pathlib
import random
import shutil
import signal
import sys

import torch

from caracal_cli import checkpoint, monitor
from caracal_cli import train as train_module
from caracal_cli.config import load_preset

# test_train.TINY with frequent validations and checkpoints, so kills land in every phase
TINY = ["model.d_model=64", "model.n_layer=3", "model.context=64", "model.vocab_size=512",
        "model.mixers.A.window=32", "train.micro_batch=4", "train.global_batch_tokens=512", "train.tokens=20480",
        "train.warmup_tokens=1024", "train.eval_tokens=1024", "train.eval_every=3", "train.checkpoint_every=2",
        "train.keep_checkpoints=2", "train.log_every=1"]
STEPS = 6


def _count_events(kill_at: int, calls: list[int]) -> None:
    """Wrap the functions where a kill can land between two writes; the kill_at-th call dies first."""

    def wrap(owner, name):
        real = getattr(owner, name)

        def counted(*args, **kwargs):
            calls[0] += 1
            if calls[0] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*args, **kwargs)

        setattr(owner, name, counted)

    wrap(train_module, "learning_rate")
    wrap(monitor.MetricsLog, "write")
    wrap(os, "replace")  # every atomic write (fileio.atomic_path) renames into place
    wrap(pathlib.Path, "rename")  # a checkpoint directory into place, an old one out of the way
    wrap(checkpoint, "sha256_file")  # between a checkpoint's files and its checksums
    wrap(torch, "save")
    wrap(shutil, "rmtree")


def _attempt(data: str, run: str, kill_at: int) -> int:
    """One attempt in a forked child: its exit status (-SIGNAL when killed), or for an attempt that finished,
    the number of events it counted."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        code, calls = 1, [0]
        try:
            torch.set_num_threads(1)
            _count_events(kill_at, calls)
            if checkpoint.latest_checkpoint(run) is not None:
                train_module.train(None, None, run, max_steps=STEPS, resume=True, device="cpu", quiet=True)
            else:
                train_module.train(load_preset("demo", TINY), data, run, max_steps=STEPS, device="cpu", quiet=True)
            os.write(write, str(calls[0]).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    _, status = os.waitpid(pid, 0)
    with os.fdopen(read) as pipe:
        events = pipe.read()
    code = os.waitstatus_to_exitcode(status)
    return int(events) if code == 0 else code if code < 0 else -1000 - code


def main(data: str, work: str, seed: int, trials: int) -> dict:
    reference = os.path.join(work, "reference")
    events = _attempt(data, reference, 0)  # never killed: it counts the events of a whole run
    assert events > 0, events
    rng = random.Random(seed)
    report = {"reference": reference, "events": events, "trials": []}
    for trial in range(trials):
        run = os.path.join(work, f"trial{trial}")
        kills = []
        for _ in range(20):
            kill_at = rng.randint(1, events)
            code = _attempt(data, run, kill_at)
            if code >= 0:
                break
            if code != -signal.SIGKILL:
                raise SystemExit(f"trial {trial}: the attempt to be killed at event {kill_at} failed ({code})")
            kills.append(kill_at)
        else:
            assert _attempt(data, run, 0) >= 0
        report["trials"].append({"run": run, "kills": kills})
    return report


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))))
