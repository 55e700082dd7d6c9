"""Run directories and checkpoints.

    RUN_DIR/
      config.yaml                  the resolved config (load with `load_run_config`)
      tokenizer.json | tokenizer_ref.json   the tokenizer the data was made with
      data.json                    the data directory trained on and its manifest summary
      metrics.jsonl                one JSON object per step (and one per validation)
      tensorboard/                 with `caracal train --tensorboard`
      checkpoints/step_00000100/   model.safetensors (weights), trainer.pt (optimizer, schedule, data
                                   position, RNG states; read with weights_only=True), meta.json

A checkpoint directory is assembled under a temporary name and renamed into place, so a crash leaves either
the whole checkpoint or none. Weights are safetensors; nothing is unpickled.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file, save_file

from caracal_cli.config import CaracalError, Config, config_from_dict
from caracal_cli.fileio import UMASK, atomic_write, write_json
from caracal_cli.mixers import mixer_config

CONFIG_FILE = "config.yaml"
WEIGHTS_FILE = "model.safetensors"
STATE_FILE = "trainer.pt"
META_FILE = "meta.json"


class CheckpointError(CaracalError):
    pass


def _plain(value: Any) -> Any:
    """Tuples to lists, recursively, so yaml.safe_dump accepts the config."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def config_yaml(config: Config) -> str:
    """The resolved config as YAML, as `save_run_config` writes it and `load_run_config` reads it. Each mixer
    is written with every key, defaults included, so a run loads as trained when a default changes."""
    data = config.to_dict()
    data["model"]["mixers"] = {
        letter: dataclasses.asdict(mixer_config(raw, config.model, f"model.mixers.{letter}"))
        for letter, raw in config.model.mixers.items()}
    return yaml.safe_dump(_plain(data), sort_keys=False)


def save_run_config(run_dir: str | Path, config: Config) -> None:
    with atomic_write(Path(run_dir) / CONFIG_FILE, "w") as handle:
        handle.write(config_yaml(config))


def load_run_config(run_dir: str | Path) -> Config:
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{run_dir}: no {CONFIG_FILE} (is this a run directory made by `caracal train`?)")
    raw = yaml.safe_load(path.read_text())
    return config_from_dict(raw, name=raw.get("name", Path(run_dir).name))


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors for safetensors: tied weights stored once (under the first name), contiguous, CPU."""
    seen, out = set(), {}
    for name, tensor in model.state_dict().items():
        key = (tensor.data_ptr(), tensor.shape) if tensor.device.type != "meta" else name
        if key in seen:
            continue
        seen.add(key)
        out[name] = tensor.detach().to("cpu").contiguous()
    return out


def checkpoint_dirs(run_dir: str | Path) -> list[Path]:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step_*") if (p / META_FILE).is_file())


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    dirs = checkpoint_dirs(run_dir)
    return dirs[-1] if dirs else None


def save_checkpoint(run_dir: str | Path, step: int, weights: dict[str, torch.Tensor],
                    trainer_state: dict[str, Any] | None, meta: dict[str, Any], keep: int | None = None) -> Path:
    """Write checkpoints/step_{step}/ atomically (assembled in a temporary directory, then renamed) and keep
    only the newest `keep` checkpoints."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
    try:
        os.chmod(tmp, 0o777 & ~UMASK)  # mkdtemp makes 0700: a checkpoint is shared like the rest of the run
        save_file(weights, str(tmp / WEIGHTS_FILE))
        if trainer_state is not None:
            torch.save(trainer_state, tmp / STATE_FILE)
        write_json(tmp / META_FILE, {"step": step, **meta})
        for file in tmp.iterdir():
            os.chmod(file, 0o666 & ~UMASK)
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep is not None:
        for old in checkpoint_dirs(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_trainer_state(checkpoint: str | Path) -> dict[str, Any]:
    path = Path(checkpoint) / STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (this checkpoint holds weights only)")
    return torch.load(path, map_location="cpu", weights_only=True)


def resolve_checkpoint(path: str | Path) -> tuple[Path, Path]:
    """(run_dir, checkpoint_dir) for a run directory (its newest checkpoint) or a checkpoint directory."""
    path = Path(path)
    if path.is_file() or path.name == "checkpoints":  # a checkpoint's file, or the folder of a run's checkpoints
        path = path.parent
    if (path / WEIGHTS_FILE).is_file():
        run_dir = path.parent.parent if path.parent.name == "checkpoints" else path
        return run_dir, path
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such run or checkpoint directory")
    latest = latest_checkpoint(path)
    if latest is None:
        raise CheckpointError(f"{path}: no checkpoints yet")
    return path, latest


def load_weights(model: torch.nn.Module, checkpoint: str | Path) -> None:
    """Load a checkpoint's safetensors into `model`, which must have exactly its parameters (a tied output
    head is stored once, as the embedding)."""
    state = load_file(str(Path(checkpoint) / WEIGHTS_FILE))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"head.weight"} if model.config.tie_embeddings else set()
    if set(missing) - tied or unexpected:
        raise CheckpointError(f"{checkpoint}: weights do not match the run's config (missing "
                              f"{sorted(set(missing) - tied)}, unexpected {sorted(unexpected)})")


def load_model(path: str | Path, device: str | torch.device = "cpu", with_tokenizer: bool = True):
    """(model, config, tokenizer, checkpoint_dir) from a run directory or a checkpoint directory; the tokenizer
    is None with with_tokenizer=False (scoring token ids needs no tokenizer library)."""
    from caracal_cli.model import build_model
    from caracal_cli.tokenizer import load_tokenizer

    run_dir, ckpt = resolve_checkpoint(path)
    config = load_run_config(run_dir)
    model = build_model(config.model)
    load_weights(model, ckpt)
    model.to(device).eval()
    return model, config, load_tokenizer(run_dir) if with_tokenizer else None, ckpt


def read_meta(checkpoint: str | Path) -> dict[str, Any]:
    return json.loads((Path(checkpoint) / META_FILE).read_text())


def latest_run(runs_dir: str | Path = "runs") -> Path:
    """The run under `runs_dir`, at any depth, whose newest checkpoint was written last."""
    from caracal_cli.runs import newest_run

    return newest_run(runs_dir)
