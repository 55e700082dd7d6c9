"""What a training run reports: metrics.jsonl, the console (a rich progress bar on a terminal, plain lines
otherwise), optional TensorBoard, and model FLOPs utilisation."""

from __future__ import annotations

import json
import math
import os
import socket
import struct
import sys
import time
from pathlib import Path
from typing import Any

import torch

from caracal_cli import runs
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
    """metrics.jsonl: one JSON object per line, appended as the run goes; rewritten only atomically."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / METRICS_FILE

    def truncate_after(self, step: int) -> None:
        """Drop records past `step` (a resumed run logs those steps again, a fresh run, step 0, all of them),
        and a last line torn by a kill."""
        if not self.path.is_file():
            return
        from caracal_cli.fileio import atomic_write

        kept = [record for record in read_metrics(self.path.parent) if record.get("step", 0) <= step]
        with atomic_write(self.path, "w") as handle:
            handle.writelines(json.dumps(record) + "\n" for record in kept)

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of RUN_DIR/metrics.jsonl, [] before the first (see `runs.read_metrics`)."""
    return runs.read_metrics(run_dir, missing_ok=True)


def _crc32c_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
        table.append(crc)
    return table


_CRC32C = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), the checksum of TFRecord framing."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC32C[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _message(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field (wire type 2): a string or a nested message."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def tensorboard_event(wall_time: float, step: int | None = None, scalars: dict[str, float] | None = None,
                      file_version: str | None = None) -> bytes:
    """One `tensorflow.Event` protobuf: wall_time (1, double), step (2, int64), file_version (3, string),
    summary (5) holding one Summary.Value (tag 1, simple_value 2 as float) per scalar."""
    event = b"\x09" + struct.pack("<d", wall_time)
    if step is not None:
        event += b"\x10" + _varint(step)
    if file_version is not None:
        event += _message(3, file_version.encode())
    if scalars:
        values = b"".join(_message(1, _message(1, tag.encode()) + b"\x15" + struct.pack("<f", value))
                          for tag, value in scalars.items())
        event += _message(5, values)
    return event


class TensorBoard:
    """Scalars under RUN_DIR/tensorboard (train/* per step, val/* per evaluation) in TensorBoard's event-file
    format, written here (Event protobufs in TFRecord framing: length, masked CRC-32C, data, masked CRC-32C), so
    `tensorboard --logdir RUN_DIR` reads them and training needs no tensorboard package."""

    def __init__(self, run_dir: str | Path):
        folder = Path(run_dir) / "tensorboard"
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}"
        self.handle = open(self.path, "ab")  # noqa: SIM115 - open for the whole run, closed by close()
        self._record(tensorboard_event(time.time(), file_version="brain.Event:2"))

    def _record(self, event: bytes) -> None:
        header = struct.pack("<Q", len(event))
        self.handle.write(header + struct.pack("<I", _masked_crc(header)) + event
                          + struct.pack("<I", _masked_crc(event)))
        self.handle.flush()

    def write(self, record: dict[str, Any]) -> None:
        scalars = {(f"val/{key}" if key.startswith("val") else f"train/{key}"): float(value)
                   for key, value in record.items() if key not in ("step", "tokens", "elapsed")
                   and isinstance(value, (int, float)) and not isinstance(value, bool)}
        if scalars:
            self._record(tensorboard_event(time.time(), record["step"], scalars))

    def close(self) -> None:
        self.handle.close()


class WandB:
    """Weights & Biases logging (`--wandb`, the optional extra `pip install caracal[wandb]`): the same records
    as metrics.jsonl, the run's config, the run directory's name; WANDB_MODE=offline keeps it on this machine."""

    def __init__(self, run_dir: str | Path, config: dict[str, Any], resume: bool):
        try:
            import wandb
        except ImportError:
            raise CaracalError("--wandb needs the wandb package (pip install 'caracal[wandb]')") from None
        run_dir = Path(run_dir)
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "caracal"), name=run_dir.name,
                              dir=str(run_dir), config=config, id=_wandb_id(run_dir), resume="allow" if resume
                              else None)

    def write(self, record: dict[str, Any]) -> None:
        self.run.log({key: value for key, value in record.items() if key != "step" and value is not None},
                     step=record["step"])

    def close(self) -> None:
        self.run.finish()


def _wandb_id(run_dir: Path) -> str:
    """A W&B run id kept in RUN_DIR/wandb_id, so a resumed run continues the same W&B run."""
    path = run_dir / "wandb_id"
    if not path.is_file():
        run_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(f"{run_dir.name[:40]}-{os.urandom(4).hex()}".replace("/", "-") + "\n")
    return path.read_text().strip()


class Loggers:
    """The optional metric sinks of rank 0 (TensorBoard, W&B), written to together."""

    def __init__(self, sinks: list):
        self.sinks = sinks

    def write(self, record: dict[str, Any]) -> None:
        for sink in self.sinks:
            sink.write(record)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


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
