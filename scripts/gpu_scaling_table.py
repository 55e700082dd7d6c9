"""`caracal train` on 1, 2, 4, 8 GPUs (DDP or FSDP2) against one GPU: the same global batch and data order (a fixed
micro-batch; accumulation makes up the rest), so the loss curves should agree within bf16 noise. Per run: tokens/s,
tokens/s per GPU and its share of one GPU's (scaling efficiency), MFU, the last step's loss and the largest loss
difference to the one-GPU run over all steps. Medians of the logged steps after the first two (`gpu_train_table`).

    python scripts/gpu_scaling_table.py --data DIR --presets small --mode ddp --gpus 1,2,4,8 --micro-batch 64 \\
        [--steps 50] [--compile] [--stop-at K] [--trace N] [--reuse] [--json OUT]

--stop-at K also runs the largest GPU count again, sends it SIGTERM once step K is logged (it saves and stops, as
under a scheduler), resumes it with --resume and reports its largest loss difference to the uninterrupted run.
--trace N records N steps of each multi-GPU run with torch.profiler (`caracal train --profile-steps`; the medians
barely notice a few slower steps) and reports the share of NCCL kernel time that ran beside compute kernels:
gradient reduction overlapping the backward.
GPU counts above torch.cuda.device_count() are left out (on --device cpu, gloo processes stand in for GPUs).
"""

from __future__ import annotations

import argparse
import bisect
import gzip
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from gpu_train_table import logged_steps, run_logged, step_rates, train_command

KEYS = ["preset", "mode", "gpus", "exit", "tokens_per_s", "tokens_per_s_per_gpu", "efficiency_pct", "mfu_pct",
        "last_loss", "loss_diff", "max_loss_diff", "comm_overlap_pct", "resume_max_loss_diff", "seconds"]


def loss_curve(run_dir: Path) -> dict[int, float]:
    return {row["step"]: row["loss"] for row in logged_steps(run_dir)}


def max_difference(curve: dict[int, float], reference: dict[int, float]) -> float | None:
    """The largest |loss - reference loss| over the steps both logged."""
    common = curve.keys() & reference.keys()
    return max(abs(curve[s] - reference[s]) for s in common) if common else None


def comm_overlap(trace: Path) -> float | None:
    """Share (%) of the NCCL kernels' GPU time during which a compute kernel ran too (on another stream), from a
    Chrome trace of torch.profiler; None without NCCL kernels (a CPU run: gloo runs on host threads)."""
    with gzip.open(trace, "rt") as handle:
        events = json.load(handle)["traceEvents"]
    kernels = [(e["ts"], e["ts"] + e["dur"], "nccl" in e["name"].lower()) for e in events if e.get("cat") == "kernel"]
    comm = [(start, end) for start, end, is_comm in kernels if is_comm]
    if not comm:
        return None
    busy: list[list[float]] = []  # compute kernels' time as disjoint, sorted intervals
    for start, end in sorted((start, end) for start, end, is_comm in kernels if not is_comm):
        if busy and start <= busy[-1][1]:
            busy[-1][1] = max(busy[-1][1], end)
        else:
            busy.append([start, end])
    starts, overlapped = [b[0] for b in busy], 0.0
    for start, end in comm:
        i = max(0, bisect.bisect_right(starts, start) - 1)
        while i < len(busy) and busy[i][0] < end:
            overlapped += max(0.0, min(end, busy[i][1]) - max(start, busy[i][0]))
            i += 1
    return round(100 * overlapped / sum(end - start for start, end in comm), 1)


def run_stopped(cmd: list[str], run_dir: Path, at_step: int, log: Path, limit: int) -> int | str:
    """Run `cmd`, sending it SIGTERM once metrics.jsonl logs step `at_step` (it finishes the step, saves and exits
    143); its exit status, or "timeout"."""
    deadline = time.monotonic() + limit
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                reached = any(row["step"] >= at_step for row in logged_steps(run_dir))
            except ValueError:  # a line half written
                reached = False
            if reached:
                proc.send_signal(signal.SIGTERM)
                break
            time.sleep(0.1)
        try:
            return proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            return "timeout"


def launch_args(gpus: int) -> list[str]:
    return ["--nproc-per-node", str(gpus)] if gpus > 1 else []


def run_dir_of(args, preset: str, gpus: int) -> Path:
    """One GPU's run is the same in either mode: a DDP table and an FSDP2 one (with --reuse) share it."""
    return args.out / (f"{preset}-1gpu" if gpus == 1 else f"{preset}-{args.mode}-{gpus}gpu")


def command(args, preset: str, run_dir: Path, gpus: int, profile_steps: int = 0) -> list[str]:
    """The run: the preset's recipe at a fixed micro-batch, so every GPU count reads the same global batches."""
    sets = [f"train.micro_batch={args.micro_batch}", f"train.parallel={args.mode}", *args.extra]
    cmd = train_command(preset, args.data, run_dir, args.steps, args.compile, sets, args.device) + launch_args(gpus)
    return cmd + (["--profile-steps", str(profile_steps)] if profile_steps else [])


def measure(args, preset: str, gpus: int) -> dict:
    """One run of `preset` on `gpus` (or the finished one already in --out, with --reuse)."""
    run_dir = run_dir_of(args, preset, gpus)
    traced = args.trace if gpus > 1 else 0
    row = {"preset": preset, "mode": args.mode if gpus > 1 else "one", "gpus": gpus}
    if args.reuse and args.steps in loss_curve(run_dir):
        row.update(exit="reused", seconds=None)
    else:
        shutil.rmtree(run_dir, ignore_errors=True)  # an earlier attempt: a new run refuses its checkpoints
        row["exit"], row["seconds"], _ = run_logged(command(args, preset, run_dir, gpus, traced),
                                                    args.out / f"{run_dir.name}.log", args.limit_s)
    steps = logged_steps(run_dir)
    row.update(step_rates(steps), last_loss=steps[-1]["loss"] if steps else None)
    if row.get("tokens_per_s"):
        row["tokens_per_s_per_gpu"] = round(row["tokens_per_s"] / gpus)
    trace = run_dir / "traces" / "rank0.json.gz"
    if traced and trace.is_file():
        row["comm_overlap_pct"] = comm_overlap(trace)
    if args.stop_at and gpus == max(args.gpus):
        row.update(resume_check(args, preset, gpus))
    return row


def resume_check(args, preset: str, gpus: int) -> dict:
    """The run again, stopped by SIGTERM after step --stop-at and resumed to the end: how each part exited, the
    checkpoint it stopped at, and its largest loss difference to the uninterrupted run."""
    run_dir = run_dir_of(args, preset, gpus)
    again = run_dir.with_name(run_dir.name + "-resumed")
    shutil.rmtree(again, ignore_errors=True)
    stopped = run_stopped(command(args, preset, again, gpus), again, args.stop_at,
                          args.out / f"{again.name}-stop.log", args.limit_s)
    saved = sorted(p.name for p in (again / "checkpoints").glob("step_*"))
    resume_cmd = [sys.executable, "-m", "caracal_cli", "train", "--resume", str(again), "--device", args.device,
                  "--max-steps", str(args.steps), *launch_args(gpus)] + (["--compile"] if args.compile else [])
    resumed, _, _ = run_logged(resume_cmd, args.out / f"{again.name}.log", args.limit_s)
    return {"stop_exit": stopped, "stopped_at": saved[0] if saved else None, "resume_exit": resumed,
            "resume_max_loss_diff": max_difference(loss_curve(again), loss_curve(run_dir))}


def compare(row: dict, one: dict, curve: dict[int, float], one_curve: dict[int, float]) -> None:
    """`row`'s scaling efficiency and loss differences against the one-GPU row `one`."""
    if row.get("tokens_per_s_per_gpu") and one.get("tokens_per_s"):
        row["efficiency_pct"] = round(100 * row["tokens_per_s_per_gpu"] / one["tokens_per_s"], 1)
    if row.get("last_loss") is not None and one.get("last_loss") is not None:
        row["loss_diff"] = row["last_loss"] - one["last_loss"]
    row["max_loss_diff"] = max_difference(curve, one_curve)


def table(rows: list[dict]) -> str:
    def cell(value):
        return f"{value:.4g}" if isinstance(value, float) else "" if value is None else str(value)

    lines = ["| " + " | ".join(KEYS) + " |", "|" + " --- |" * len(KEYS)]
    return "\n".join(lines + ["| " + " | ".join(cell(row.get(k)) for k in KEYS) + " |" for row in rows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", required=True, help="comma-separated")
    parser.add_argument("--data", required=True)
    parser.add_argument("--gpus", default="1,2,4,8", help="comma-separated process counts")
    parser.add_argument("--mode", choices=["ddp", "fsdp"], default="ddp")
    parser.add_argument("--micro-batch", type=int, default=32, help="fixed, so every count sees the same batches")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--stop-at", type=int, default=0, help="stop the largest count at this step and resume it")
    parser.add_argument("--trace", type=int, default=0, help="profile this many steps of each multi-GPU run")
    parser.add_argument("--reuse", action="store_true", help="read runs in --out that reached --steps")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", type=Path, default=Path("/tmp/scaling-table"))
    parser.add_argument("--limit-s", type=int, default=540, help="per run")
    parser.add_argument("--set", dest="extra", action="append", default=[])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    args.gpus = sorted({int(n) for n in args.gpus.split(",")})
    if args.device == "cuda":
        import torch

        available = torch.cuda.device_count()
        if dropped := [n for n in args.gpus if n > available]:
            print(f"left out {dropped}: {available} GPUs here", flush=True)
        args.gpus = [n for n in args.gpus if n <= available]
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for preset in args.presets.split(","):
        one = one_curve = None
        for gpus in args.gpus:
            rows.append(measure(args, preset, gpus))
            curve = loss_curve(run_dir_of(args, preset, gpus))
            if gpus == 1:
                one, one_curve = rows[-1], curve
            elif one is not None:
                compare(rows[-1], one, curve, one_curve)
            print(json.dumps(rows[-1]), flush=True)
            if args.json:
                args.json.write_text(json.dumps(rows, indent=1))
    print(table(rows))


if __name__ == "__main__":
    main()
