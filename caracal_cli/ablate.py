"""The paper's ablation studies as data: each variant is a list of `--set` overrides of a base preset, trained on
the same data, token budget, seed and schedule, then evaluated the same way.

Resumable: a finished variant leaves `ablation.json` in its run directory and is skipped on a re-run; an
interrupted one resumes from its newest checkpoint. A variant that fails is reported with its error and the
study goes on.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from caracal_cli.config import CaracalError, load_preset
from caracal_cli.fileio import stopping_signal, write_json

RESULT_FILE = "ablation.json"


class StudyStopped(BaseException):
    """SIGINT or SIGTERM stopped a variant's training (its checkpoint saved): the study stops with it, and
    running the same command again resumes that variant. Not an Exception: the per-variant `except Exception`
    that reports a failed variant and goes on must not catch it."""

    def __init__(self, signal_name: str, run_dir: Path):
        super().__init__(f"{signal_name} during {run_dir}")
        self.signal_name, self.run_dir = signal_name, run_dir


@dataclass(frozen=True)
class Variant:
    name: str
    label: str
    overrides: tuple[str, ...]
    paper_avg_acc: float  # the paper's average accuracy for this variant (its ablation tables)


@dataclass(frozen=True)
class Study:
    name: str
    title: str
    paper_size: str  # the size the paper ran it at
    variants: tuple[Variant, ...]


STUDIES = {
    "components": Study("components", "Component ablation (paper: Caracal-L, 10B tokens)", "large", (
        Variant("full", "Full model (default)", (), 49.01),
        Variant("no_swa", "w/o SWA", ("model.pattern=F",), 48.22),
        Variant("no_swa_pc", "w/o SWA & PC", ("model.pattern=F", "model.mixers.F.pre_conv=false"), 47.82),
        Variant("with_pe", "with PE (RoPE in the SWA layers)", ("model.pos_emb=rope",), 48.94),
        Variant("sslp", "SSLP (single-stage linear gate)", ("model.mixers.F.gate=linear",), 48.05),
    )),
    "ratio": Study("ratio", "MHF:SWA ratio (paper: Caracal-S, 10B tokens)", "small", (
        Variant("5to1", "5:1", ("model.pattern=FFFFFA",), 43.04),
        Variant("3to1", "3:1", ("model.pattern=FFFA",), 43.19),
        Variant("2to1", "2:1 (default)", ("model.pattern=FFA",), 43.35),
        Variant("1to1", "1:1", ("model.pattern=FA",), 43.26),
    )),
}


def studies_for(name: str) -> list[Study]:
    if name == "all":
        return list(STUDIES.values())
    if name not in STUDIES:
        raise CaracalError(f"unknown study {name!r} (known: {', '.join(STUDIES)}, all)")
    return [STUDIES[name]]


def budget_overrides(preset: str, tokens: int | None, steps: int | None, overrides: list[str] = ()) -> list[str]:
    """The token budget every variant shares: --tokens sets it, --steps sets it to steps × the global batch
    (of the preset with the user's overrides)."""
    if tokens is not None and steps is not None:
        raise CaracalError("give --tokens or --steps, not both")
    if steps is not None:
        if steps < 1:
            raise CaracalError(f"--steps must be >= 1, got {steps}")
        return [f"train.tokens={steps * load_preset(preset, overrides).train.global_batch_tokens}"]
    if tokens is not None:
        if tokens < 1:
            raise CaracalError(f"--tokens must be >= 1, got {tokens}")
        return [f"train.tokens={tokens}"]
    return []


def layer_summary(pattern_letters: list[str], mixers: dict) -> str:
    """'8 mhf + 4 attention(w=256)' for a layer list."""
    counts: dict[str, int] = {}
    for letter in pattern_letters:
        spec = mixers[letter]
        name = spec["kind"] + (f"(w={spec['window']})" if spec.get("window") else "")
        counts[name] = counts.get(name, 0) + 1
    return " + ".join(f"{n} {k}" for k, n in counts.items())


def _train_variant(config, overrides: list[str], preset: str, data: Path, run_dir: Path, device: str,
                   nproc_per_node: int) -> None:
    """Train (or resume) one variant: in process, or under torchrun through the CLI."""
    from caracal_cli.checkpoint import latest_checkpoint, read_meta
    from caracal_cli.recipe import planned_steps

    latest = latest_checkpoint(run_dir)
    if latest is not None and read_meta(latest)["step"] >= planned_steps(config.train):
        return  # trained; only the evaluation was missing
    if nproc_per_node > 1:
        from caracal_cli.train import launch, torchrun_command

        args = ["train", "--out", str(run_dir), "--device", device]
        if latest is not None:
            args += ["--resume", str(run_dir)]
        else:
            args += ["--preset", preset, "--data", str(data)] + [a for o in overrides for a in ("--set", o)]
        code = launch(torchrun_command(args, nproc_per_node))
        if (stopped_by := stopping_signal(code)) is not None:  # the ranks saved a checkpoint and stopped
            raise StudyStopped(stopped_by, run_dir)
        if code != 0:
            raise CaracalError(f"torchrun exited with status {code}")
        return
    from caracal_cli.train import train

    if latest is not None:
        result = train(None, data, run_dir, resume=True, device=device, quiet=True)
    else:
        result = train(config, data, run_dir, device=device, quiet=True)
    if result["stopped_by"]:  # a half-trained variant must be neither evaluated nor recorded as done
        raise StudyStopped(result["stopped_by"], run_dir)


def run_variant(study: Study, variant: Variant, preset: str, shared: list[str], data: Path, out: Path,
                tasks: list[str] | None, include_path: Path | None, limit: float | None, device: str,
                nproc_per_node: int) -> dict[str, Any]:
    """Train and evaluate one variant; the result is saved in its run directory as ablation.json."""
    import torch

    from caracal_cli.checkpoint import load_model
    from caracal_cli.model import build_model, count_parameters
    from caracal_cli.train import evaluate_val_loss

    run_dir = out / study.name / variant.name
    if (run_dir / RESULT_FILE).is_file():
        return {**json.loads((run_dir / RESULT_FILE).read_text()), "cached": True}
    overrides = shared + list(variant.overrides)
    config = load_preset(preset, overrides)
    with torch.device("meta"):
        params = count_parameters(build_model(config.model))["total"]
    started = time.time()
    _train_variant(config, overrides, preset, data, run_dir, device, nproc_per_node)
    model, config, _, ckpt = load_model(run_dir, "cuda" if device == "cuda" else "cpu", with_tokenizer=False)
    val_loss = evaluate_val_loss(model, data, config, next(model.parameters()).device, config.train.eval_tokens)
    result: dict[str, Any] = {
        "variant": variant.name, "label": variant.label, "overrides": list(variant.overrides),
        "layers": layer_summary(config.model.layer_kinds(), config.model.mixers), "params": params,
        "tokens": config.train.tokens, "val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0)),
        "paper_avg_acc": variant.paper_avg_acc, "checkpoint": str(ckpt), "seconds": None,
    }
    if tasks:
        from caracal_cli.evaluate import evaluate_checkpoint

        summary = evaluate_checkpoint(run_dir, tasks, include_path=include_path, limit=limit, device=device,
                                      bootstrap_iters=0)
        result["tasks"] = summary["tasks"]
        result["avg_acc"] = summary["average_acc"]
    result["seconds"] = round(time.time() - started, 1)
    write_json(run_dir / RESULT_FILE, result)
    return result


def run_studies(study: str, size: str, data: str | Path, out: str | Path, tokens: int | None = None,
                steps: int | None = None, tasks: list[str] | None = None, include_path: str | Path | None = None,
                limit: float | None = None, overrides: list[str] | None = None, device: str = "auto",
                nproc_per_node: int = 1, on_variant=None) -> dict[str, Any]:
    """Run the chosen studies at `size` (a preset name: tiny … large, demo) and write ablation.md/.json."""
    preset = size
    load_preset(preset)  # fail early on an unknown size
    data, out = Path(data), Path(out)
    from caracal_cli.loader import open_dataset

    open_dataset(data, load_preset(preset, overrides or []).model.vocab_size)  # fail early on bad data
    if tasks:  # a bad task, --limit or missing dataset is refused now, not after every variant has trained
        from caracal_cli.evaluate import (check_limit, require_datasets, resolve_task_names, task_manager_for,
                                          use_offline_hub)

        check_limit(limit)
        names = resolve_task_names(tasks)
        use_offline_hub()  # as each variant's evaluation will run
        require_datasets(names, task_manager_for(names, include_path))
    shared = list(overrides or []) + budget_overrides(preset, tokens, steps, list(overrides or []))
    report: dict[str, Any] = {"size": size, "data": str(data), "budget_overrides": shared,
                              "command": sys.argv, "studies": {}}
    for chosen in studies_for(study):
        rows = []
        for variant in chosen.variants:
            try:
                row = run_variant(chosen, variant, preset, shared, data, out, tasks,
                                  None if include_path is None else Path(include_path), limit, device,
                                  nproc_per_node)
            except KeyboardInterrupt:
                raise
            except Exception as err:  # one failed variant must not sink the study: report it in the table
                row = {"variant": variant.name, "label": variant.label, "paper_avg_acc": variant.paper_avg_acc,
                       "error": f"{type(err).__name__}: {err}".strip()}
            rows.append(row)
            if on_variant is not None:
                on_variant(chosen, row)
        report["studies"][chosen.name] = {"title": chosen.title, "paper_size": chosen.paper_size, "rows": rows}
    write_json(out / "ablation.json", report)
    (out / "ablation.md").parent.mkdir(parents=True, exist_ok=True)
    from caracal_cli.fileio import atomic_write

    with atomic_write(out / "ablation.md", "w") as handle:
        handle.write(markdown_report(report))
    return report


def _task_names(rows: list[dict]) -> list[str]:
    names: list[str] = []
    for row in rows:
        for task in row.get("tasks", {}):
            if task not in names:
                names.append(task)
    return names


def _main_metric(metrics: dict[str, float]) -> float | None:
    for key in ("acc_norm", "acc"):
        if key in metrics:
            return metrics[key]
    return None


def table_rows(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Header and cells of a study's table (markdown and rich share them)."""
    tasks = _task_names(rows)
    header = ["Variant", "Layers", "Params", "Val loss", "PPL", *tasks, "Avg acc", "Paper avg acc"]
    cells = []
    for row in rows:
        if "error" in row:
            cells.append([row["label"], "failed", "", "", "", *[""] * len(tasks), row["error"][:120],
                          f"{row['paper_avg_acc']:.2f}"])
            continue
        accs = []
        for task in tasks:
            value = _main_metric(row.get("tasks", {}).get(task, {}))
            accs.append("" if value is None else f"{100 * value:.2f}")
        avg = row.get("avg_acc")
        cells.append([row["label"], row["layers"], f"{row['params'] / 1e6:.1f}M", f"{row['val_loss']:.4f}",
                      f"{row['val_ppl']:.2f}", *accs, "" if avg is None else f"{100 * avg:.2f}",
                      f"{row['paper_avg_acc']:.2f}"])
    return header, cells


def markdown_report(report: dict[str, Any]) -> str:
    lines = [f"# Caracal ablations at size `{report['size']}`", "",
             f"Data: `{report['data']}`; shared overrides: `{' '.join(report['budget_overrides']) or 'none'}`.",
             "The paper's column is its reported average accuracy at its own size and 10B tokens; ours are "
             "measured at the budget above, so compare the ordering, not the values.", ""]
    for study in report["studies"].values():
        header, cells = table_rows(study["rows"])
        lines += [f"## {study['title']}", "", "| " + " | ".join(header) + " |",
                  "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in cells]
        lines.append("")
    return "\n".join(lines)
