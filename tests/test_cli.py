"""The command line: help everywhere, honest 'not built' answers, one-line errors without tracebacks."""

import json

import pytest
import torch
from typer.testing import CliRunner

from caracal_cli.cli import app

runner = CliRunner()
COMMANDS = ["prepare", "train", "eval", "ablate", "speed", "generate", "demo", "info", "export", "import"]


def test_help_lists_every_subcommand():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in COMMANDS:
        assert command in result.output


@pytest.mark.parametrize("command", COMMANDS)
def test_every_subcommand_has_help(command):
    result = runner.invoke(app, [command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def test_info_reports_a_preset_as_json():
    result = runner.invoke(app, ["info", "--preset", "large", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert abs(report["params"] / 1e6 - 724) < 0.02 * 724
    assert report["layers"] == "FFA" * 8 and report["d_head"] == 96
    assert report["flops_per_token_train"] == 3 * report["flops_per_token_forward"]
    assert report["paths"]["MHF"].startswith("torch.fft")


def test_info_estimates_a_preset_that_forces_the_kernels():
    """`fast` kernel settings are a CUDA matter: the memory estimate traces shapes on the meta device and follows
    the reference path there instead of refusing (it raised a RuntimeError with a traceback)."""
    result = runner.invoke(app, ["info", "--preset", "small", "--json", "--set", "model.mixers.F.fft_impl=fast",
                                 "--set", "model.mixers.F.module_impl=fast"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["train_memory_estimate_gib"]["total_gib"] > 0


def test_info_without_preset_lists_presets():
    result = runner.invoke(app, ["info", "--json"])
    assert result.exit_code == 0
    names = {row["preset"] for row in json.loads(result.output)}
    assert {"tiny", "llama-large", "demo"} <= names


@pytest.mark.parametrize(
    "args, message",
    [
        (["info", "--preset", "nope"], "unknown preset 'nope'"),
        (["info", "--preset", "tiny", "--set", "model.n_head=7"], "not divisible"),
        (["info", "--preset", "tiny", "--set", "model.window"], "must look like key.path=value"),
        (["info", "--preset", "tiny", "--device", "gpu"], "unknown device 'gpu'"),
        (["info", "--preset", "tiny", "--set", "model.context=1000000000000"], "cannot estimate a step"),
        (["info", "--preset", "tiny", "--set", "train.seed=1e30"], "train.seed must be < 2**64"),
        (["train", "--preset", "tiny", "--peak-flops", "nan"], "--peak-flops must be a positive number"),
        (["generate", "--prompt", "x", "--seed", "-1"], "--seed must be in [0, 2**64), got -1"),
        (["generate", "--prompt", "x", "--temperature", "inf"], "--temperature must be a finite number"),
        (["eval", "--checkpoint", "nowhere", "--tasks", "paper", "--out", "."], "--out .: is a directory"),
        pytest.param(["info", "--preset", "tiny", "--device", "cuda"], "--device cuda: no CUDA device",
                     marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")),
    ],
)
def test_bad_input_is_one_line_without_traceback(args, message):
    result = runner.invoke(app, args)
    assert result.exit_code == 1
    assert message in result.output.replace("\n", " ")
    assert "Traceback" not in result.output


@pytest.mark.parametrize("user", [None, ("PYTORCH_ALLOC_CONF", "backend:native"),
                                  ("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:64")])
def test_the_cli_asks_for_expandable_segments_unless_the_user_chose(user):
    """Set on import of the CLI, before torch starts CUDA; a user's own allocator setting is left alone."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")}
    env.update([user] if user else [])
    code = "import os, caracal_cli.cli; print(os.environ.get('PYTORCH_CUDA_ALLOC_CONF'))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == ("expandable_segments:True" if user is None else str(env.get("PYTORCH_CUDA_ALLOC_CONF")))
