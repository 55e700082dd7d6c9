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


def run(preset: str, data: str, out: Path, steps: int, compile: bool, limit: int, extra: list[str]) -> dict:
    run_dir = out / preset
    cmd = [sys.executable, "-m", "caracal_cli", "train", "--preset", preset, "--data", data, "--out", str(run_dir),
           "--device", "cuda", "--max-steps", str(steps), "--set", "train.eval_every=100000",
           "--set", "train.checkpoint_every=100000", "--set", "train.eval_tokens=262144", "--set", "train.log_every=1"]
    cmd += (["--compile"] if compile else []) + [a for e in extra for a in ("--set", e)]
    began = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=limit)
        log, code = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as err:
        log, code = (err.stdout or b"").decode() + (err.stderr or b"").decode(), "timeout"
    (out / f"{preset}.log").write_text(log)
    row = {"preset": preset, "exit": code, "seconds": round(time.perf_counter() - began, 1)}
    auto = run_dir / "autobatch.json"
    if auto.is_file():
        choice = json.loads(auto.read_text())
        row.update(micro_batch=choice["micro_batch"], probe_peak_gib=choice["peak_gib"], probe_s=choice["seconds"],
                   checkpointing=choice["activation_checkpointing"])
    steps_logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
                    if '"tokens_per_s"' in line] if (run_dir / "metrics.jsonl").is_file() else []
    timed = steps_logged[2:] or steps_logged[1:]
    if timed:
        row["tokens_per_s"] = round(statistics.median(r["tokens_per_s"] for r in timed))
        row["mfu_pct"] = round(100 * statistics.median(r["mfu"] for r in timed), 1) if timed[0]["mfu"] else None
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
