"""Training runs as a researcher handles them day to day: finding them, plotting and comparing their metrics,
changing a run's budget or schedule on resume, and the summary a run ends with.

Nothing here imports torch: `caracal plot`, `caracal compare` and the checks of `--resume RUN --set …` answer
in a fraction of a second.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

from caracal_cli.config import CaracalError, Config, parse_override, read_yaml_mapping

# A run directory's files, as `checkpoint` and `monitor` write them (named here too: importing those loads torch).
CONFIG_FILE, METRICS_FILE, HISTORY_FILE = "config.yaml", "metrics.jsonl", "config_history.jsonl"
WEIGHTS_FILE, META_FILE = "model.safetensors", "meta.json"


class RunError(CaracalError):
    pass


# --- finding runs -----------------------------------------------------------------------------------------
def is_run(path: Path) -> bool:
    return (path / CONFIG_FILE).is_file() and ((path / METRICS_FILE).is_file() or (path / "checkpoints").is_dir())


def find_runs(root: str | Path = "runs") -> list[Path]:
    """Every run directory under `root`, at any depth (`runs/demo/run`, `runs/ablate/full/…`)."""
    found = []
    for here, dirs, _ in os.walk(root):
        path = Path(here)
        if is_run(path):
            found.append(path)
            dirs[:] = []  # a run holds no runs: skip its checkpoints, eval results, …
        else:
            dirs[:] = [d for d in dirs if not d.startswith(".")]
    return sorted(found)


def _newest_checkpoint(run: Path) -> Path | None:
    root = run / "checkpoints"
    steps = sorted(p for p in root.glob("step_*") if (p / META_FILE).is_file()) if root.is_dir() else []
    return steps[-1] if steps else None


def newest_run(root: str | Path = "runs", with_checkpoint: bool = True) -> Path:
    """The run under `root` (any depth) written to last: its newest checkpoint's time, or with
    `with_checkpoint=False` its metrics' time (a run still in its first steps can be plotted)."""
    stamps = []
    for run in find_runs(root):
        newest = _newest_checkpoint(run)
        if newest is None and not with_checkpoint and (run / METRICS_FILE).is_file():
            newest = run / METRICS_FILE
        if newest is not None:
            stamps.append((newest.stat().st_mtime, str(run)))
    if not stamps:
        what = "with a checkpoint " if with_checkpoint else ""
        raise RunError(f"no run {what}under {root}/ (train one with `caracal train`, or name the run directory)")
    return Path(max(stamps)[1])


def run_dir_of(path: str | Path) -> Path:
    """The run directory of `path`: the run itself, a checkpoint inside it, its `checkpoints/` folder, or a file
    in either."""
    path = Path(path)
    if not path.exists():
        raise RunError(f"{path}: no such run or checkpoint")
    for candidate in (path, *path.parents[:3]):
        if is_run(candidate):
            return candidate
    raise RunError(f"{path}: not inside a run directory (one with {CONFIG_FILE}, made by `caracal train`)")


# --- metrics --------------------------------------------------------------------------------------------
def read_metrics(run: str | Path, missing_ok: bool = False) -> list[dict[str, Any]]:
    """The records of RUN/metrics.jsonl ([] with `missing_ok` when there is none yet); a torn last line (the run
    was killed while appending) is left out, a damaged line elsewhere is an error naming it."""
    path = Path(run) / METRICS_FILE
    if not path.is_file():
        if missing_ok:
            return []
        raise RunError(f"{run}: no {METRICS_FILE} yet")
    lines = path.read_text(errors="replace").splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError("not an object")
        except ValueError as err:
            if number == len(lines):
                break
            raise RunError(f"{path}:{number}: not a metrics record ({err})") from None
        records.append(record)
    return records


def curve(records: list[dict], metric: str, x: str = "tokens") -> tuple[list[float], list[float]]:
    """(x, y) of every record that has `metric` (train records have loss, validations val_loss)."""
    points = [(r[x], r[metric]) for r in records if r.get(metric) is not None and r.get(x) is not None]
    return [p[0] for p in points], [p[1] for p in points]


def final_metrics(run: Path) -> dict[str, Any]:
    """What a run reached: steps, tokens, training time, last and best validation, median throughput."""
    records = read_metrics(run)
    train = [r for r in records if "loss" in r]
    vals = [r for r in records if r.get("val_loss") is not None]
    speeds = sorted(r["tokens_per_s"] for r in train[1:] if r.get("tokens_per_s"))  # the first pays for warm-up
    mfus = sorted(r["mfu"] for r in train[1:] if r.get("mfu"))
    last = records[-1] if records else {}
    best = min(vals, key=lambda r: r["val_loss"]) if vals else None
    return {"step": last.get("step"), "tokens": last.get("tokens"), "elapsed_s": last.get("elapsed"),
            "loss": train[-1]["loss"] if train else None,
            "val_loss": vals[-1]["val_loss"] if vals else None,
            "val_ppl": vals[-1].get("val_ppl") if vals else None,
            "best_val_loss": best["val_loss"] if best else None, "best_val_step": best["step"] if best else None,
            "tokens_per_s": speeds[len(speeds) // 2] if speeds else None,
            "mfu": mfus[len(mfus) // 2] if mfus else None}


def labels(runs: list[Path]) -> list[str]:
    """Short distinct names: each run's path below the runs' common folder (`demo/run`, `tiny-2026…`)."""
    resolved = [r.resolve() for r in runs]
    common = Path(os.path.commonpath(resolved)) if len(runs) > 1 else resolved[0].parent
    names = [str(r.relative_to(common)) if r != common else r.name for r in resolved]
    return names if len(set(names)) == len(names) else [str(r) for r in runs]


def _save_figure(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    from caracal_cli.fileio import atomic_path

    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_runs(runs: list[Path], metric: str, out: Path) -> dict[str, Any]:
    """One PNG of `metric` against tokens for every run, and the rows of its table (last and best value)."""
    plt = _pyplot()
    names = labels(runs)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    rows, missing = [], []
    for i, (run, name) in enumerate(zip(runs, names, strict=True)):
        records = read_metrics(run)
        xs, ys = curve(records, metric)
        if not ys:  # e.g. no validation yet: the other runs are still plotted
            known = sorted({k for r in records for k, v in r.items() if isinstance(v, (int, float))} - {"step"})
            missing.append(f"{run}: no {metric!r} in {METRICS_FILE} (it has {', '.join(known)})")
            continue
        ax.plot(xs, ys, marker="o" if len(ys) < 30 else None, markersize=3, label=name, color=f"C{i % 10}")
        best = min(range(len(ys)), key=ys.__getitem__)
        rows.append({"run": name, "path": str(run), "points": len(ys), "last": ys[-1], "last_tokens": xs[-1],
                     "best": ys[best], "best_tokens": xs[best]})
    if not rows:
        plt.close(fig)
        raise RunError("; ".join(missing))
    ax.set_xlabel("tokens")
    ax.set_ylabel(metric)
    if metric.endswith(("loss", "ppl")) and all(r["best"] > 0 for r in rows):
        ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"{metric} — {', '.join(names)}" if len(names) < 4 else metric, fontsize=10)
    _save_figure(fig, out)
    return {"metric": metric, "png": str(out), "runs": rows, "missing": missing}


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'train': {'lr': 1}} → {'train.lr': 1}."""
    flat = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def config_diff(runs: list[Path]) -> dict[str, list[Any]]:
    """The config keys whose values differ between runs: {key: [value of each run]} (None where absent)."""
    flats = [flatten(read_yaml_mapping(run / CONFIG_FILE, "a run's config")) for run in runs]
    keys = sorted(set().union(*flats))
    return {key: [f.get(key) for f in flats] for key in keys
            if key not in ("name", "description") and len({json.dumps(f.get(key)) for f in flats}) > 1}


def compare_runs(runs: list[Path], out: Path) -> dict[str, Any]:
    """compare.png (training and validation loss against tokens and against training time, every run on each
    panel) and compare.json: the config keys that differ and each run's final metrics."""
    if len(runs) < 2:
        raise RunError("compare needs two runs or more (caracal plot shows one)")
    plt = _pyplot()
    names = labels(runs)
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    for i, (run, name) in enumerate(zip(runs, names, strict=True)):
        records = read_metrics(run)
        for row, metric in enumerate(("loss", "val_loss")):
            for col, x in enumerate(("tokens", "elapsed")):
                xs, ys = curve(records, metric, x)
                if ys:  # a run keeps its colour on every panel, even where another run has no points
                    axes[row][col].plot(xs, ys, marker="o" if len(ys) < 30 else None, markersize=3, label=name,
                                        color=f"C{i % 10}")
    for row, metric in enumerate(("training loss", "validation loss")):
        for col, x in enumerate(("tokens", "training time (s)")):
            ax = axes[row][col]
            ax.set_xlabel(x)
            ax.set_ylabel(metric)
            ax.grid(True, alpha=0.3)
            if ax.lines:
                ax.legend(fontsize=8)
    fig.suptitle(f"caracal compare — {', '.join(names)}", fontsize=10)
    report = {"runs": [{"name": name, "path": str(run), **final_metrics(run)} for run, name in
                       zip(runs, names, strict=True)],
              "config_diff": config_diff(runs), "png": str(out / "compare.png"), "json": str(out / "compare.json")}
    _save_figure(fig, out / "compare.png")
    from caracal_cli.fileio import write_json

    write_json(out / "compare.json", report)
    return report


# --- changing a run on resume ---------------------------------------------------------------------------
# What `--resume RUN --set` may change: the budget and schedule (the LR of every step is a function of the step
# and these), clipping, and how often the run evaluates, saves and logs. Anything else is refused with a reason.
RESUMABLE = {"train.tokens", "train.lr", "train.min_lr_ratio", "train.warmup_tokens", "train.grad_clip",
             "train.eval_every", "train.eval_tokens", "train.checkpoint_every", "train.keep_checkpoints",
             "train.log_every", "train.compile", "train.compile_mode", "train.parallel", "train.ddp_bucket_mb",
             "train.fsdp_prefetch", "description"}
REFUSED = [
    ("model.", "it changes the model: the checkpoint's weights and optimizer state would not fit it"),
    ("data.", "a run's data is fixed (its batches are computed from the dataset, seed and step); --data DIR "
              "points it at a moved copy of the same dataset"),
    ("train.micro_batch", "it changes the batch per rank, so steps would no longer be the ones the run planned"),
    ("train.global_batch_tokens", "it changes the batch per step, so the data a step reads and the step count "
                                  "would no longer match the checkpoint"),
    ("train.seed", "the seed fixes the data order the run has been reading"),
    ("train.dtype", "the run's precision (and fp16's loss-scaler state) stays as it started"),
    ("train.betas", "AdamW's settings are restored with its state from the checkpoint"),
    ("train.weight_decay", "AdamW's settings are restored with its state from the checkpoint"),
]


def refuse_resume_change(key: str) -> None:
    if key in RESUMABLE or key.startswith("eval."):  # eval.* are `caracal eval`'s defaults, not training's
        return
    reason = next((why for prefix, why in REFUSED if key == prefix or key.startswith(prefix)),
                  "it is not one of the keys a resumed run can honour")
    raise RunError(f"--resume cannot change {key}: {reason} (changeable: {', '.join(sorted(RESUMABLE))})")


def check_resume_overrides(overrides: list[str], tokens_done: int | None = None) -> None:
    """Refuse, before anything loads, every `--set` a resumed run cannot honour, and a token budget that
    ends before the checkpoint."""
    for text in overrides:
        parts, value = parse_override(text)
        refuse_resume_change(".".join(parts))
        if parts == ["train", "tokens"] and tokens_done is not None and isinstance(value, (int, float)) \
                and value <= tokens_done:
            raise RunError(f"train.tokens={value} does not extend the run: its newest checkpoint has "
                           f"{tokens_done} tokens")


def config_changes(old: Config, new: Config) -> dict[str, list[Any]]:
    """{key: [old, new]} for every config key that differs; a key a resumed run cannot honour raises."""
    before, after = flatten(old.to_dict()), flatten(new.to_dict())
    changes = {key: [before.get(key), after.get(key)] for key in sorted(set(before) | set(after))
               if key != "name" and json.dumps(before.get(key), default=str) != json.dumps(after.get(key), default=str)}
    for key in changes:
        refuse_resume_change(key)
    return changes


def record_config_change(run_dir: Path, changes: dict[str, list[Any]], step: int) -> None:
    """Append a resumed run's config changes to RUN_DIR/config_history.jsonl (config.yaml holds the current
    config; the history says what it was before each resume and from which step it applies)."""
    entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "from_step": step,
             "changes": {key: {"from": old, "to": new} for key, (old, new) in changes.items()}}
    with open(run_dir / HISTORY_FILE, "a") as handle:
        handle.write(json.dumps(entry, default=str) + "\n")


def read_history(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / HISTORY_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


# --- the end of a run -----------------------------------------------------------------------------------
def duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m{rest % 60:02d}s" if hours else f"{rest // 60}m{rest % 60:02d}s"


def summary_lines(result: dict[str, Any], wall_seconds: float) -> list[str]:
    """The lines `caracal train` ends with: time, tokens, throughput, MFU, best and final validation, the final
    checkpoint and the commands that come next."""
    run = Path(result["run_dir"])
    final = final_metrics(run) if (run / METRICS_FILE).is_file() else {}
    mfu = f", MFU {100 * result['mfu']:.1f}%" if result.get("mfu") else ""
    speed = f"{result['tokens_per_s'] / 1e3:.1f}k tokens/s" if result.get("tokens_per_s") else "? tokens/s"
    lines = [f"{'stopped' if result.get('stopped_by') else 'done'}: step {result['step']}, "
             f"{result['tokens']:,} tokens; this session {duration(wall_seconds)} "
             f"({result['steps_run']} steps), training time in all {duration(result.get('elapsed'))}; "
             f"{speed}{mfu}"]
    if result.get("val_loss") is not None:
        best = ""
        if final.get("best_val_loss") is not None and final["best_val_loss"] < result["val_loss"]:
            best = f"; best {final['best_val_loss']:.4f} at step {final['best_val_step']}"
        lines.append(f"validation: loss {result['val_loss']:.4f}, perplexity {result['val_ppl']:.2f}{best}")
    if result.get("checkpoint"):
        lines.append(f"checkpoint: {result['checkpoint']}")
    commands = [f"caracal train --resume {run}"] if result.get("stopped_by") else [
        f"caracal eval --checkpoint {run} --tasks paper", f"caracal plot {run} --metric val_loss",
        f"caracal train --resume {run} --set train.tokens=N    # train on, to N tokens in all"]
    return lines + [("next: " if i == 0 else "      ") + command for i, command in enumerate(commands)]


# --- warnings before a run ------------------------------------------------------------------------------
CPU_FLOPS = 2e11  # FLOP/s a CPU sustains on this training, generously (2 cores here: ~1e10)


def plan_warnings(config: Config, data_dir: Path, device: str, world_size: int) -> list[str]:
    """What `--dry-run` warns about: epochs over the data, a large model on the CPU, a step that would not fit
    the GPU's memory (by `caracal info`'s estimate)."""
    import torch

    from caracal_cli.device import resolve_device
    from caracal_cli.info import _meta_model, train_memory_estimate
    from caracal_cli.model import count_parameters, flops_per_token

    warnings, tc = [], config.train
    manifest_file = Path(data_dir) / "manifest.json"  # a plain llm.c folder has none
    manifest = json.loads(manifest_file.read_text()) if manifest_file.is_file() else {"splits": {}}
    train_tokens = sum(int(shard["tokens"]) for shard in manifest["splits"].get("train", []))
    if train_tokens and tc.tokens > train_tokens:
        warnings.append(f"train.tokens={tc.tokens:,} is {tc.tokens / train_tokens:,.1f} epochs over the data's "
                        f"{train_tokens:,} training tokens: expect the model to memorize it (lower train.tokens "
                        f"or prepare more data)")
    dev = resolve_device(device)
    model = _meta_model(config)
    params = count_parameters(model)["total"]
    if dev.type == "cpu" and params > 20e6:
        days = flops_per_token(model, config.model.context)["train"] * tc.tokens / (CPU_FLOPS * world_size) / 86400
        warnings.append(f"{config.name} ({params / 1e6:.0f}M parameters) on the CPU: {tc.tokens:,} tokens would "
                        f"take {days:,.0f} days or more; use a GPU, or a demo preset (--preset demo)")
    if dev.type == "cuda" and tc.micro_batch != "auto":  # auto is probed on the GPU itself
        need = train_memory_estimate(config, device="cuda")["total_gib"]
        have = torch.cuda.get_device_properties(dev).total_memory / 2**30
        if need > 0.9 * have:
            warnings.append(f"one step at train.micro_batch={tc.micro_batch} needs about {need:.1f} GiB (estimate) "
                            f"and the GPU has {have:.1f} GiB: lower train.micro_batch")
    return warnings
