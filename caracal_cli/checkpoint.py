"""Run directories and checkpoints.

    RUN_DIR/
      config.yaml                  the resolved config (load with `load_run_config`)
      tokenizer.json | tokenizer_ref.json   the tokenizer the data was made with
      data.json                    the data directory trained on and its manifest summary
      metrics.jsonl                one JSON object per step (and one per validation)
      tensorboard/                 with `caracal train --tensorboard`
      checkpoints/step_00000100/   model.safetensors (weights), trainer.pt (optimizer, schedule, data
                                   position, RNG states; read with weights_only=True), meta.json,
                                   checksums.json (SHA-256 of the others, written last)

A checkpoint directory is assembled under a temporary name and renamed into place, so a crash leaves either
the whole checkpoint or none (a leftover temporary directory is removed at the next start, see
`remove_orphans`). Its files are verified against checksums.json before they are read; a run directory's
newest intact checkpoint is the one used, a damaged newer one skipped with a warning. Weights are safetensors;
nothing is unpickled.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file

from caracal_cli.config import CaracalError, Config, config_from_dict, read_yaml_mapping, warn
from caracal_cli.fileio import (atomic_write, replace_dir, set_aside, sha256_file, temp_dir_beside, write_json,
                                write_safetensors)
from caracal_cli.mixers import mixer_config

CONFIG_FILE = "config.yaml"
WEIGHTS_FILE = "model.safetensors"
STATE_FILE = "trainer.pt"
META_FILE = "meta.json"
CHECKSUMS_FILE = "checksums.json"


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
    raw = read_yaml_mapping(path, "a run's config")
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
    tmp = temp_dir_beside(final)  # shared like the rest of the run
    try:
        try:
            write_safetensors(weights, tmp / WEIGHTS_FILE)  # tmp is the checkpoint's own temporary directory
            if trainer_state is not None:
                with atomic_write(tmp / STATE_FILE) as handle:
                    # through Python's file, so a full disk is an OSError rather than a C++ iostream error
                    torch.save(trainer_state, handle)
            write_json(tmp / META_FILE, {"step": step, **meta, "checksums": CHECKSUMS_FILE})
            write_json(tmp / CHECKSUMS_FILE, {p.name: sha256_file(p) for p in sorted(tmp.iterdir())})
        except (OSError, RuntimeError) as err:
            raise CheckpointError(f"cannot write checkpoint {final} ({_write_error(err, root)})") from None
        replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    prune_checkpoints(run_dir, keep)
    return final


def prune_checkpoints(run_dir: str | Path, keep: int | None, spare: Path | None = None) -> None:
    """Remove all but the newest `keep` checkpoints (None: keep all), never `spare` (the one a resume reads)."""
    if keep is None:
        return
    for old in checkpoint_dirs(run_dir)[:-keep]:
        if spare is None or old.resolve() != Path(spare).resolve():
            _remove(old)


def _remove(checkpoint: Path) -> None:
    """Delete a checkpoint directory by first renaming it to a temporary name, so a kill midway leaves an
    orphan for `remove_orphans`, never a half-deleted checkpoint under its own name."""
    shutil.rmtree(set_aside(checkpoint), ignore_errors=True)


def _write_error(err: Exception, root: Path) -> str:
    from caracal_cli.fileio import describe_os_error

    with contextlib.suppress(OSError):
        if shutil.disk_usage(root).free < 1 << 20:
            return "no space left on device"
    return describe_os_error(err) if isinstance(err, OSError) else str(err).splitlines()[0]


def remove_orphans(run_dir: str | Path) -> list[Path]:
    """Remove what a killed writer left: temporary checkpoint directories (checkpoints/.step_*) and temporary
    files (.NAME.*.tmp) of the run directory. Call it only while holding the run's lock."""
    run_dir = Path(run_dir)
    found = [p for p in run_dir.glob(".*.tmp") if p.is_file()]
    found += [p for p in (run_dir / "checkpoints").glob(".step_*") if p.is_dir()]
    for path in found:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return found


def verify_checkpoint(checkpoint: str | Path, files: tuple[str, ...] | None = None) -> str | None:
    """Why `checkpoint` cannot be trusted (a listed file missing or changed), or None when its files match
    checksums.json. `files` limits the check to the files a reader needs. A checkpoint written before
    checksums existed has none to check and passes; one whose meta.json says it was written with them and
    lacks them does not."""
    checkpoint = Path(checkpoint)
    path = checkpoint / CHECKSUMS_FILE
    if not path.is_file():
        try:
            written_with = read_meta(checkpoint).get("checksums")
        except CheckpointError as err:
            return str(err).removeprefix(f"{checkpoint}/")
        return f"{CHECKSUMS_FILE} is missing" if written_with else None
    try:
        sums = json.loads(path.read_text())
    except (OSError, ValueError):
        sums = None
    if not isinstance(sums, dict) or not all(isinstance(v, str) for v in sums.values()):
        return f"{CHECKSUMS_FILE} is damaged"
    for name in files or sorted(sums):
        if name not in sums:
            if (checkpoint / name).exists():
                return f"{name} is not in {CHECKSUMS_FILE}"
            continue
        if not (checkpoint / name).is_file():
            return f"{name} is missing"
        if sha256_file(checkpoint / name) != sums[name]:
            return f"{name} does not match its checksum"
    return None


def intact_checkpoint(run_dir: str | Path, files: tuple[str, ...] | None = None) -> Path | None:
    """The newest checkpoint of `run_dir` whose files pass `verify_checkpoint`, warning about each newer one
    skipped; None when there is no checkpoint. Raises CheckpointError when every checkpoint is damaged."""
    dirs = checkpoint_dirs(run_dir)
    skipped = []
    for checkpoint in reversed(dirs):
        problem = verify_checkpoint(checkpoint, files)
        if problem is None:
            for name, why in skipped:
                warn(f"skipped damaged checkpoint {name} ({why}); using {checkpoint.name}")
            return checkpoint
        skipped.append((checkpoint.name, problem))
    if skipped:
        raise CheckpointError(f"{run_dir}: every checkpoint is damaged ("
                              + "; ".join(f"{name}: {why}" for name, why in skipped) + ")")
    return None


def load_trainer_state(checkpoint: str | Path) -> dict[str, Any]:
    path = Path(checkpoint) / STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (this checkpoint holds weights only)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a damaged zip or pickle: torch raises RuntimeError, UnpicklingError, …
        raise CheckpointError(f"{path}: cannot be read ({str(err).splitlines()[0] if str(err) else err!r})") \
            from None


def resolve_checkpoint(path: str | Path) -> tuple[Path, Path]:
    """(run_dir, checkpoint_dir) for a run directory (its newest intact checkpoint, see `intact_checkpoint`)
    or a checkpoint directory (refused when damaged). Only the weights are verified: that is what is read."""
    path = Path(path)
    if path.is_file() or path.name == "checkpoints":  # a checkpoint's file, or the folder of a run's checkpoints
        path = path.parent
    if (path / WEIGHTS_FILE).is_file():
        if problem := verify_checkpoint(path, (WEIGHTS_FILE,)):
            raise CheckpointError(f"{path}: {problem}")
        run_dir = path.parent.parent if path.parent.name == "checkpoints" else path
        return run_dir, path
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such run or checkpoint directory")
    latest = intact_checkpoint(path, (WEIGHTS_FILE,))
    if latest is None:
        raise CheckpointError(f"{path}: no checkpoints yet")
    return path, latest


def load_weights(model: torch.nn.Module, checkpoint: str | Path) -> None:
    """Load a checkpoint's safetensors into `model`, which must have exactly its parameters (a tied output
    head is stored once, as the embedding), each of the same shape and a floating-point dtype."""
    path = Path(checkpoint) / WEIGHTS_FILE
    try:
        state = load_file(str(path))
    except (OSError, SafetensorError) as err:
        raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from None
    expected = model.state_dict()
    for name, tensor in state.items():
        if name in expected and (tensor.shape != expected[name].shape or not tensor.is_floating_point()):
            raise CheckpointError(f"{path}: {name} is {tensor.dtype} {list(tensor.shape)}, the run's config "
                                  f"makes it {expected[name].dtype} {list(expected[name].shape)}")
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"head.weight"} if model.config.tie_embeddings else set()
    if set(missing) - tied or unexpected:
        raise CheckpointError(f"{checkpoint}: weights do not match the run's config (missing "
                              f"{sorted(set(missing) - tied)}, unexpected {sorted(unexpected)})")


def load_model(path: str | Path, device: str | torch.device = "cpu", with_tokenizer: bool = True,
               dtype: torch.dtype | None = None):
    """(model, config, tokenizer, checkpoint_dir) from a run directory or a checkpoint directory; the tokenizer
    is None with with_tokenizer=False (scoring token ids needs no tokenizer library). `dtype`: what the model
    will compute in (default bf16 on CUDA, float32 elsewhere), for `_relax_forced_paths`."""
    from caracal_cli.model import build_model
    from caracal_cli.tokenizer import load_tokenizer

    run_dir, ckpt = resolve_checkpoint(path)
    config = load_run_config(run_dir)
    device = torch.device(device)
    _relax_forced_paths(config, device, dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32))
    model = build_model(config.model)
    load_weights(model, ckpt)
    model.to(device).eval()
    return model, config, load_tokenizer(run_dir) if with_tokenizer else None, ckpt


def _relax_forced_paths(config: Config, device: torch.device, dtype: torch.dtype) -> None:
    """A run trained with `fast` kernels loads where they cannot run (a CPU, float32 evaluation) with `auto`
    instead, and says so: the same function, to the kernels' tolerance. Training refuses instead (train.py)."""
    from caracal_cli.model import forced_path_errors

    for letter, error in forced_path_errors(config.model, device, dtype).items():
        mixer = config.model.mixers[letter]
        for key in ("fft_impl", "module_impl"):
            if mixer.get(key) == "fast":
                mixer[key] = "auto"
        warn(f"model.mixers.{letter}: {error}; loaded with auto")


def read_meta(checkpoint: str | Path) -> dict[str, Any]:
    path = Path(checkpoint) / META_FILE
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path}: cannot be read ({err})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: not a checkpoint's meta")
    return meta


def latest_run(runs_dir: str | Path = "runs") -> Path:
    """The run under `runs_dir`, at any depth, whose newest checkpoint was written last."""
    from caracal_cli.runs import newest_run

    return newest_run(runs_dir)
