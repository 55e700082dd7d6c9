"""`caracal train` as shipped, preset after preset on one GPU: the micro-batch `auto` chose, peak memory,
tokens/s and MFU (medians of the logged steps after the first two: compilation and warm-up), and how long the
final validation and checkpoint took. Each run is its own process with its own time limit.

    python scripts/gpu_train_table.py --data DIR small llama-small … [--steps 8] [--compile] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path


# Every step logged, no validation or checkpoint before the end: the steps time training alone.
TIMING_SETS = ["train.eval_every=100000", "train.checkpoint_every=100000", "train.eval_tokens=262144",
               "train.log_every=1"]


def train_command(preset: str, data: str, run_dir: Path, steps: int, compile: bool, extra: list[str],
                  device: str = "cuda") -> list[str]:
    """`caracal train` of `steps` steps with TIMING_SETS and `extra` (KEY=VALUE) overrides."""
    cmd = [sys.executable, "-m", "caracal_cli", "train", "--preset", preset, "--data", data, "--out", str(run_dir),
           "--device", device, "--max-steps", str(steps)]
    return cmd + (["--compile"] if compile else []) + [a for e in TIMING_SETS + extra for a in ("--set", e)]


def run_logged(cmd: list[str], log: Path, limit: int) -> tuple[int | str, float, str]:
    """Run `cmd` with a time limit, its output also in `log`: (exit status or "timeout", seconds, output)."""
    began = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=limit)
        text, code = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as err:
        text, code = (err.stdout or b"").decode() + (err.stderr or b"").decode(), "timeout"
    log.write_text(text)
    return code, round(time.perf_counter() - began, 1), text


def logged_steps(run_dir: Path) -> list[dict]:
    """metrics.jsonl's training rows (validation rows left out)."""
    path = run_dir / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    return [row for row in rows if "tokens_per_s" in row]


def step_rates(steps: list[dict]) -> dict:
    """tokens/s and MFU (%): medians of the logged steps after the first two (compilation and warm-up)."""
    timed = steps[2:] or steps[1:]
    if not timed:
        return {}
    return {"tokens_per_s": round(statistics.median(r["tokens_per_s"] for r in timed)),
            "mfu_pct": round(100 * statistics.median(r["mfu"] for r in timed), 1) if timed[0]["mfu"] else None}


def run(preset: str, data: str, out: Path, steps: int, compile: bool, limit: int, extra: list[str]) -> dict:
    run_dir = out / preset
    code, seconds, log = run_logged(train_command(preset, data, run_dir, steps, compile, extra),
                                    out / f"{preset}.log", limit)
    row = {"preset": preset, "exit": code, "seconds": seconds}
    auto = run_dir / "autobatch.json"
    if auto.is_file():
        choice = json.loads(auto.read_text())
        row.update(micro_batch=choice["micro_batch"], probe_peak_gib=choice["peak_gib"], probe_s=choice["seconds"],
                   checkpointing=choice["activation_checkpointing"])
    row.update(step_rates(logged_steps(run_dir)))
    for key, pattern in (("peak_gib", r"peak memory ([\d.]+) GiB"), ("final_val_s", r"final validation: ([\d.]+) s"),
                         ("checkpoint_s", r"checkpoint \S+: ([\d.]+) s")):
        found = re.findall(pattern, log)
        if found:
            row[key] = float(found[-1])
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("presets", nargs="+")
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", type=Path, default=Path("/tmp/train-table"))
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--limit-s", type=int, default=300, help="per run")
    parser.add_argument("--set", dest="extra", action="append", default=[])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    keys = ["preset", "exit", "micro_batch", "checkpointing", "peak_gib", "tokens_per_s", "mfu_pct", "probe_s",
            "final_val_s", "checkpoint_s", "seconds"]
    for preset in args.presets:
        rows.append(run(preset, args.data, args.out, args.steps, args.compile, args.limit_s, args.extra))
        print(json.dumps(rows[-1]), flush=True)
        if args.json:
            args.json.write_text(json.dumps(rows, indent=1))
    print("| " + " | ".join(keys) + " |\n|" + " --- |" * len(keys))
    for row in rows:
        print("| " + " | ".join(str(row.get(k, "")) for k in keys) + " |")


if __name__ == "__main__":
    main()
