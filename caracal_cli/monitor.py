"""What a training run reports: metrics.jsonl, the console (a rich progress bar on a terminal, plain lines
otherwise), optional TensorBoard, and model FLOPs utilisation."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import torch

from caracal_cli.config import CaracalError

METRICS_FILE = "metrics.jsonl"
# Dense bf16 tensor-core peak, FLOP/s (NOTES.md: 989e12 for H100/H200 SXM).
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def peak_flops_for(device: torch.device, override: float | None = None) -> float | None:
    """Peak FLOP/s for MFU: `override` when given, the table's entry for a known GPU, else None (no MFU)."""
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_FLOPS.items() if key in name), None)


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def format_step(record: dict[str, Any], total_steps: int, eta: float) -> str:
    mfu = "n/a" if record.get("mfu") is None else f"{100 * record['mfu']:.1f}%"
    return (f"step {record['step']}/{total_steps} | loss {record['loss']:.4f} | lr {record['lr']:.2e} | "
            f"grad {record['grad_norm']:.3f} | {record['tokens_per_s'] / 1e3:.1f}k tok/s | MFU {mfu} | "
            f"ETA {format_duration(eta)}")


class MetricsLog:
    """metrics.jsonl: one JSON object per line, appended as the run goes."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / METRICS_FILE

    def truncate_after(self, step: int) -> None:
        """Drop records past `step` (a resumed run logs those steps again)."""
        if not self.path.is_file():
            return
        kept = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def require_tensorboard() -> None:
    import importlib.util

    if importlib.util.find_spec("tensorboard") is None:
        raise CaracalError("--tensorboard needs the tensorboard package (pip install tensorboard)")


class TensorBoard:
    """Scalars under RUN_DIR/tensorboard (train/* per step, val/* per evaluation)."""

    def __init__(self, run_dir: str | Path):
        require_tensorboard()
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"))

    def write(self, record: dict[str, Any]) -> None:
        for key, value in record.items():
            if key not in ("step", "tokens", "elapsed") and isinstance(value, (int, float)):
                self.writer.add_scalar(f"train/{key}" if not key.startswith("val") else f"val/{key}",
                                       value, record["step"])

    def close(self) -> None:
        self.writer.close()


class Console:
    """Progress on rank 0: a rich bar (step, loss, lr, tokens/s, MFU, ETA) when stdout is a terminal, else a
    plain line every `log_every` steps. Other ranks print nothing."""

    def __init__(self, enabled: bool, log_every: int, total_steps: int, live: bool | None = None):
        self.enabled, self.log_every, self.total_steps = enabled, log_every, total_steps
        self.live = enabled and (sys.stdout.isatty() if live is None else live)
        self.progress = self.task = None

    def start(self, start_step: int, end_step: int) -> None:
        if not self.live:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        # The ETA is the loop's own (averaged over many steps), not rich's: with steps of 10-20 s, rich's
        # 30-second window holds one or two of them and its estimate jumps.
        self.progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[status]}"))
        self.task = self.progress.add_task("train", total=end_step, completed=start_step, status="")
        self.progress.start()

    def print(self, line: str) -> None:
        if not self.enabled:
            return
        if self.progress is not None:
            self.progress.console.print(line, highlight=False, markup=False)
        else:
            print(line, flush=True)

    def step(self, record: dict[str, Any], eta: float) -> None:
        if not self.enabled:
            return
        if self.progress is not None:
            mfu = "" if record.get("mfu") is None else f" | MFU {100 * record['mfu']:.1f}%"
            self.progress.update(self.task, completed=record["step"],
                                 status=f"loss {record['loss']:.4f} | lr {record['lr']:.2e} | "
                                        f"{record['tokens_per_s'] / 1e3:.1f}k tok/s{mfu} | "
                                        f"ETA {format_duration(eta)}")
        if record["step"] % self.log_every == 0 or record["step"] == self.total_steps:
            self.print(format_step(record, self.total_steps, eta))

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
