"""Presets as typed data: YAML files in `presets/`, inheritance, dotted `--set` overrides, validation.

A preset has four sections (model, data, train, eval). The model's layer stack is a pattern string whose
letters name mixer configs inside the preset, e.g. ``pattern: FFA`` with
``mixers: {F: {kind: mhf}, A: {kind: attention, window: 256}}``; the pattern repeats to fill ``n_layer``.
Every section is a dataclass; unknown keys, wrong types and impossible values raise `ConfigError` naming the key.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class CaracalError(ValueError):
    """A problem with the user's input or files: the CLI prints its message as one line, with no traceback."""


def warn(message: str) -> None:
    """A one-line warning on stderr: something was worked around (a damaged checkpoint skipped, a stale lock
    taken over) and the run goes on."""
    import sys

    print(f"warning: {message}", file=sys.stderr, flush=True)


class ConfigError(CaracalError):
    """A preset or override that cannot be used; the message names the key and the problem."""


def presets_dir() -> Path:
    """The shipped presets: top-level `presets/` in a source checkout, `caracal_cli/presets/` in a wheel."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "presets", here / "presets"):
        if candidate.is_dir():
            return candidate
    raise ConfigError("cannot find the presets directory (reinstall caracal)")


def list_presets() -> list[str]:
    return sorted(p.stem for p in presets_dir().glob("*.yaml") if not p.stem.startswith("_"))


def did_you_mean(name: str, choices) -> str:
    """' (did you mean 'tiny'?)' for the closest of `choices` to a mistyped `name`, or ''."""
    close = difflib.get_close_matches(name, list(choices), n=2, cutoff=0.6)
    return f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""


@dataclass
class ModelConfig:
    family: str = "caracal"  # a label for tables; the architecture is `pattern` + `mixers`
    vocab_size: int = 50257
    d_model: int = 512
    n_layer: int = 12
    n_head: int = 8
    context: int = 512  # training context; RoPE / learned positions are built for it (RoPE extends past it)
    pattern: str = "FFA"
    mixers: dict[str, dict[str, Any]] = field(
        default_factory=lambda: {"F": {"kind": "mhf"}, "A": {"kind": "attention", "window": 256}}
    )
    mlp: str = "swiglu"  # swiglu | gelu | none
    mlp_hidden: int | None = None  # default: 8/3·d rounded up to 128 (swiglu), 4·d (gelu)
    pos_emb: str = "none"  # none | rope | learned
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    init_std: float = 0.02

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_head

    def layer_kinds(self) -> list[str]:
        """The pattern letter of every layer, the pattern repeated (and cut) to n_layer."""
        return [self.pattern[i % len(self.pattern)] for i in range(self.n_layer)]

    def validate(self, mixers: bool = True) -> None:
        """`mixers=False` skips the mixer entries (checking them imports torch)."""
        require_positive(self, "model", ["vocab_size", "d_model", "n_layer", "n_head", "context", "mlp_hidden"])
        if self.d_model % self.n_head:
            raise ConfigError(f"model.d_model={self.d_model} is not divisible by model.n_head={self.n_head}")
        if not self.pattern:
            raise ConfigError("model.pattern is empty")
        for letter in self.pattern:
            if letter not in self.mixers:
                raise ConfigError(f"model.pattern letter {letter!r} has no entry in model.mixers")
        for name in ("init_std", "rope_theta", "norm_eps"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"model.{name} must be > 0, got {getattr(self, name)}")
        _choice("model.mlp", self.mlp, ["swiglu", "gelu", "none"])
        _choice("model.pos_emb", self.pos_emb, ["none", "rope", "learned"])
        if not mixers:
            return
        from caracal_cli.mixers import mixer_config  # late: mixers import this module

        for letter, raw in self.mixers.items():
            mixer_config(raw, self, where=f"model.mixers.{letter}")


@dataclass
class DataConfig:
    path: str | None = None  # a directory made by `caracal prepare`
    tokenizer: str = "gpt2"
    val_tokens: int = 10_485_760  # evaluated prefix of the validation split (llm.c's 10M)


# torch.compile's CUDA-graph modes (reduce-overhead, max-autotune) are left out: on an H200 training failed in
# both, llama-tiny in its first backward (a graph's output overwritten by the next replay, with the chunked loss
# running eager between graphs), tiny (Caracal) with allocations in the graph pool that no graph tracked.
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")


@dataclass
class TrainConfig:
    tokens: int = 10_000_000_000
    global_batch_tokens: int = 524_288
    # sequences per device per micro-step, or auto: the largest that fits the device (see autobatch.py)
    micro_batch: int | str = "auto"
    memory_limit_gb: float | None = None  # caps auto's search and this process's CUDA memory (24: the paper's GPUs)
    activation_checkpointing: str = "none"  # none | block (recompute each block in the backward)
    lr: float = 9e-4
    min_lr_ratio: float = 0.1  # cosine decays to 10% of peak ("GPT-3 style")
    warmup_tokens: int = 375_000_000
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 1337
    dtype: str = "bf16"  # autocast dtype on GPU; CPU runs in float32
    compile: bool = False
    # torch.compile's mode when compiling: default | max-autotune-no-cudagraphs (autotunes the matmuls)
    compile_mode: str = "default"
    parallel: str = "ddp"  # ddp | fsdp
    # Overlap of gradient reduction with backward (under torchrun): DDP all-reduces each bucket of this many MB as
    # soon as backward has filled it (torch's default size); FSDP2 all-gathers this many blocks ahead of the one
    # computing, in forward and backward (0: only FSDP2's own prefetch, one block in backward).
    ddp_bucket_mb: int = 25
    fsdp_prefetch: int = 1
    eval_every: int = 250
    eval_tokens: int = 1_048_576
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    log_every: int = 10

    def validate(self) -> None:
        require_positive(self, "train", ["tokens", "global_batch_tokens", "eval_every",
                                  "eval_tokens", "checkpoint_every", "keep_checkpoints", "log_every", "ddp_bucket_mb"])
        for name in ("warmup_tokens", "weight_decay", "grad_clip", "seed", "fsdp_prefetch"):  # grad_clip 0: no clipping
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        if self.seed >= 2**64:  # torch's generators take 64-bit seeds
            raise ConfigError(f"train.seed must be < 2**64, got {self.seed}")
        if self.micro_batch != "auto" and (isinstance(self.micro_batch, str) or self.micro_batch < 1):
            raise ConfigError(f"train.micro_batch must be a positive integer or auto, got {self.micro_batch!r}")
        if self.memory_limit_gb is not None and not self.memory_limit_gb > 0:
            raise ConfigError(f"train.memory_limit_gb must be > 0, got {self.memory_limit_gb}")
        _choice("train.activation_checkpointing", self.activation_checkpointing, ["none", "block"])
        if not self.lr > 0:
            raise ConfigError(f"train.lr must be > 0, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"train.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"train.betas must be two numbers in [0, 1), got {self.betas}")
        _choice("train.dtype", self.dtype, ["bf16", "fp16", "fp32"])
        _choice("train.parallel", self.parallel, ["ddp", "fsdp"])
        _choice("train.compile_mode", self.compile_mode, list(COMPILE_MODES))


@dataclass
class EvalConfig:
    tasks: list[str] = field(default_factory=lambda: ["paper"])
    batch_size: int = 16
    num_fewshot: int = 0


@dataclass
class Config:
    name: str = "custom"
    description: str = ""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def require_positive(obj: Any, section: str, names: list[str] | tuple[str, ...]) -> None:
    """Refuse a field below 1 (None, where allowed, means a default and passes), naming `section.name`."""
    for name in names:
        value = getattr(obj, name)
        if value is not None and value < 1:
            raise ConfigError(f"{section}.{name} must be >= 1, got {value}")


def _choice(key: str, value: str, allowed: list[str]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key} must be one of {', '.join(allowed)}; got {value!r}")


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check `value` against a dataclass field's annotation, converting only the lossless cases (int→float,
    list→tuple). Wrong types raise ConfigError naming `key`."""
    origin = typing.get_origin(annotation)
    if annotation is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        inner = typing.get_args(annotation)[0] if typing.get_args(annotation) else Any
        items = [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, str):  # YAML 1.1 reads 6e-4 (no dot) as a string
            with contextlib.suppress(ValueError):
                value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{key} must be finite, got {value!r}")
        return float(value)
    if annotation is int:
        if isinstance(value, str):  # YAML 1.1 reads 1e8 (no dot) as a string
            with contextlib.suppress(ValueError):
                value = float(value)
        if isinstance(value, float) and value.is_integer():  # 1.0e9 in YAML is a float
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return value
    return value


def from_dict(cls: type, raw: dict[str, Any], where: str) -> Any:
    """Build dataclass `cls` from `raw`, refusing unknown keys and wrong types (messages name `where.key`)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        if key not in fields:
            hint = did_you_mean(key, fields)
            raise ConfigError(f"unknown key {where}.{key}" + (hint or f" (known: {', '.join(sorted(fields))})"))
        sub = hints[key]
        if dataclasses.is_dataclass(sub):
            kwargs[key] = from_dict(sub, value, f"{where}.{key}")
        else:
            kwargs[key] = _coerce(value, sub, f"{where}.{key}")
    return cls(**kwargs)


def _deep_merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def read_yaml_mapping(path: Path, what: str = "a preset") -> dict[str, Any]:
    """The mapping in YAML file `path` ({} when empty); anything else is a ConfigError naming the file."""
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file ({what} is YAML)") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({' '.join(str(err).split())})") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: {what} must be a YAML mapping")
    return raw


def _resolve_path(name_or_path: str | Path) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"preset file not found: {path}")
        return path
    shipped = presets_dir() / f"{name_or_path}.yaml"
    if not shipped.is_file():
        names = list_presets()
        raise ConfigError(f"unknown preset {name_or_path!r}" + (did_you_mean(str(name_or_path), names) or
                                                                f" (known: {', '.join(names)})"))
    return shipped


def _load_raw(name_or_path: str | Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    path = _resolve_path(name_or_path).resolve()
    if path in seen:
        raise ConfigError(f"preset inheritance loops through {path.name}")
    raw = read_yaml_mapping(path)
    parent = raw.pop("inherit", None)
    if parent is None:
        return raw
    if not isinstance(parent, str):
        raise ConfigError(f"{path}: inherit must name one preset (a string), got {parent!r}")
    parent_path = path.parent / f"{parent}.yaml" if (path.parent / f"{parent}.yaml").exists() else parent
    base = _load_raw(parent_path, seen + (path,))
    base.pop("description", None)
    if isinstance(raw.get("model"), dict) and "mixers" in raw["model"]:  # naming mixers defines all of them
        base.get("model", {}).pop("mixers", None)
    return _deep_merge(base, raw)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`model.window=128` → (['model', 'window'], 128); the value is read as YAML (numbers, lists, bools)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.path=value")
    key, value = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {text!r} has an empty key part")
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError:
        parsed = value
    return parts, parsed


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    raw = _deep_merge(raw, {})
    for text in overrides:
        parts, value = parse_override(text)
        node = raw
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {part} is not a section")
            else:
                child = node[part] = dict(child)
            node = child
        node[parts[-1]] = value
    return raw


def config_from_dict(raw: dict[str, Any], name: str = "custom") -> Config:
    raw = dict(raw)
    raw.setdefault("name", name)
    config = from_dict(Config, raw, "config")
    config.model.validate()
    config.train.validate()
    return config


def check_preset(name_or_path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> None:
    """What `load_preset` refuses, less the mixer entries' own keys, without importing torch: the CLI calls it
    first, so a mistyped preset or key is reported in a fraction of a second."""
    config = from_dict(Config, apply_overrides(_load_raw(name_or_path), list(overrides)), "config")
    config.model.validate(mixers=False)
    config.train.validate()


def load_preset(name_or_path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a shipped preset by name (`large`, `llama-tiny`) or a YAML file, apply `key=value` overrides,
    validate, and return the typed config."""
    raw = apply_overrides(_load_raw(name_or_path), list(overrides))
    return config_from_dict(raw, name=Path(str(name_or_path)).stem)
