"""`caracal speed`: throughput and memory against sequence length, for whole models and for mixers alone.

Fair by construction: every model runs under the same autocast dtype, on the fastest path its mixers choose
(`path(device)`, recorded per model), with warm-up iterations excluded; a point is the median of `repeats`
timed runs (CUDA events on a GPU, `time.perf_counter` on a CPU) and keeps every raw timing. An out-of-memory
point is recorded as OOM, its memory freed, and the sweep goes on; any other failure (a missing preset, a
`torch.compile` error) is recorded as an error with its reason. A sticky device error (an illegal memory access
poisons the CUDA context) ends the device work of the process: the remaining points say so.

Modes, at each length L:
  train    forward + loss + backward at a fixed token budget per step (batch = tokens // L, at least 1)
  prefill  forward only, under inference_mode, at the same budget
  decode   prefill L tokens with the parallel path, then time `decode_tokens` one-token steps over static caches
           (`generate.Decoder`), for each decoding path (eager; graph: the step replayed as a CUDA graph;
           compiled) and batch (`decode_batches`, e.g. 1 and 64); a step is one token for each sequence of the
           batch. The steps are rounded up to whole decoding periods (`model.decode_period`: MHF folds its
           history once per decode_block tokens), so every model's figure is its steady-state cost per token
"""

from __future__ import annotations

import functools
import gc
import importlib.metadata
import json
import os
import platform
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from caracal_cli import __version__
from caracal_cli.checkpoint import CONFIG_FILE
from caracal_cli.config import CaracalError, ConfigError, list_presets, load_preset, parse_override
from caracal_cli.device import AUTOCAST_DTYPES, resolve_device
from caracal_cli.fileio import atomic_path, end_with_parent, sigterm_as_interrupt, signal_name, write_json
from caracal_cli.generate import DECODE_IMPLS
from caracal_cli.mixers import MIXERS, build_mixer
from caracal_cli.mixers.mhf import causal_fft_conv
from caracal_cli.model import build_model, count_parameters, decode_period, kernel_paths

DEFAULT_MODELS = ("caracal", "llama", "mamba", "mamba2", "jamba", "swh")
SIZES = ("tiny", "small", "medium", "large", "demo")
MODES = ("train", "prefill", "decode")
DEFAULT_LENGTHS = (512, 1024, 2048, 4096, 8192, 16384)
# On a CPU the GPU sweep's defaults (small models up to L=16384 at 65,536 tokens a step) grew past 22 GB and ran
# for minutes before the kernel killed them: without options a CPU sweep measures these instead.
CPU_DEFAULTS = {"size": "demo", "lengths": (256, 512, 1024, 2048), "tokens_per_step": 8192, "repeats": 3}
SCHEMA = "caracal-speed/1"

# The bare FFT convolutions the mixer benchmark times against their memory-traffic floor: name → f(v, g) -> y,
# all [B, L, D]. A faster variant is one more line here.
def fft_reference(v: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """MHF's default convolution: torch.fft in float32 on a [B, D, L] view."""
    return causal_fft_conv(v, g, "torch")


def fft_triton(v: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """The opt-in Triton kernels (`fft_impl: fast`); an error row where they cannot run."""
    return causal_fft_conv(v, g, "fast")


FFT_VARIANTS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "causal_fft_conv": fft_reference,
    "causal_fft_conv[triton]": fft_triton,
}


class SpeedError(CaracalError):
    """Bad `caracal speed` options: printed as one line."""


@dataclass
class SpeedSettings:
    models: list[str] = field(default_factory=lambda: list(DEFAULT_MODELS))
    size: str = "small"
    lengths: list[int] = field(default_factory=lambda: list(DEFAULT_LENGTHS))
    tokens_per_step: int = 65536
    modes: list[str] = field(default_factory=lambda: ["train"])
    dtype: str = "fp32"
    compile: bool = False
    repeats: int = 5
    warmup: int = 2
    device: str = "cpu"
    decode_tokens: int = 32
    mixers: bool = False
    overrides: list[str] = field(default_factory=list)  # --set, applied to every model's preset
    # Each model in its own process (the default on CUDA): a library's leaked memory or a poisoned CUDA context
    # (an illegal memory access) then stays with the model that caused it.
    isolate: bool = False
    decode_impls: list[str] = field(default_factory=lambda: ["eager"])  # "graph" (CUDA), "compiled"
    decode_batches: list[int] = field(default_factory=lambda: [1])

    @property
    def torch_dtype(self) -> torch.dtype:
        return AUTOCAST_DTYPES[self.dtype]

    def command(self) -> str:
        """The equivalent `caracal speed` command with every option spelled out."""
        args = ["caracal", "speed", "--models", ",".join(self.models), "--size", self.size,
                "--lengths", ",".join(map(str, self.lengths)), "--tokens-per-step", str(self.tokens_per_step),
                "--mode", "all" if list(self.modes) == list(MODES) else ",".join(self.modes),
                "--dtype", self.dtype, "--repeats", str(self.repeats), "--warmup", str(self.warmup),
                "--decode-tokens", str(self.decode_tokens), "--decode-impl", ",".join(self.decode_impls),
                "--decode-batch", ",".join(map(str, self.decode_batches)), "--device", self.device]
        args += ["--compile"] * self.compile + ["--mixers"] * self.mixers
        for override in self.overrides:
            args += ["--set", override]
        args += ["--isolate" if self.isolate else "--no-isolate"]
        return shlex.join(args)


def known_models() -> list[str]:
    """The issue's six families, plus any family that ships a `<family>-<size>` preset."""
    families = {name.rsplit("-", 1)[0] for name in list_presets()
                if "-" in name and name.rsplit("-", 1)[1] in SIZES}
    return list(DEFAULT_MODELS) + sorted(families - set(DEFAULT_MODELS))


def model_config_file(model: str) -> str | None:
    """A run directory's config.yaml, or a preset YAML given by path: a model measured as it is, whatever --size
    says (an imported checkpoint, a custom model); None for a family name."""
    path = Path(model)
    if (path / CONFIG_FILE).is_file():
        return str(path / CONFIG_FILE)
    return model if path.suffix in (".yaml", ".yml") and path.is_file() else None


def preset_name(model: str, size: str) -> str:
    """Caracal's presets are named by size alone (`small`); every baseline's `<family>-<size>`."""
    return model_config_file(model) or (size if model == "caracal" else f"{model}-{size}")


def _split(text: str, option: str) -> list[str]:
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise SpeedError(f"{option} is empty")
    return items


def _positive_ints(text: str, option: str) -> list[int]:
    """A comma-separated list of positive integers, or a SpeedError naming the option."""
    try:
        values = [int(item) for item in _split(text, option)]
    except ValueError:
        raise SpeedError(f"{option} must be comma-separated integers, got {text!r}") from None
    if any(value < 1 for value in values):
        raise SpeedError(f"{option} must be positive, got {text}")
    return values


def parse_settings(models: str | None = None, size: str | None = None, lengths: str | None = None,
                   tokens_per_step: int | None = None, mode: str = "train", dtype: str | None = None,
                   compile: bool = False, repeats: int | None = None, warmup: int = 2, device: str = "auto",
                   decode_tokens: int = 32, mixers: bool = False,
                   overrides: list[str] | tuple[str, ...] = (), isolate: bool | None = None,
                   decode_impl: str | None = None, decode_batch: str = "1,64") -> SpeedSettings:
    """Check the command-line options and resolve the defaults that depend on the device (CPU_DEFAULTS on a
    CPU, where a sweep whose largest training step would not fit in the memory available is refused)."""
    device = str(resolve_device(device))
    cpu = device == "cpu"
    if size is None:
        size = CPU_DEFAULTS["size"] if cpu else "small"
    if tokens_per_step is None:
        tokens_per_step = CPU_DEFAULTS["tokens_per_step"] if cpu else 65536
    if repeats is None:
        repeats = CPU_DEFAULTS["repeats"] if cpu else 5
    if lengths is None and cpu:
        lengths = ",".join(map(str, CPU_DEFAULTS["lengths"]))
    model_list = list(dict.fromkeys(_split(models, "--models"))) if models is not None else list(DEFAULT_MODELS)
    known = known_models()
    for model in model_list:
        if model not in known and model_config_file(model) is None:
            raise SpeedError(f"unknown model {model!r} (known: {', '.join(known)}; or a run directory or "
                             f"preset YAML)")
    if size not in SIZES:
        raise SpeedError(f"unknown size {size!r} (known: {', '.join(SIZES)})")
    length_list = list(DEFAULT_LENGTHS) if lengths is None else _positive_ints(lengths, "--lengths")
    modes = list(MODES) if mode == "all" else _split(mode, "--mode")
    for item in modes:
        if item not in MODES:
            raise SpeedError(f"unknown mode {item!r} (known: {', '.join(MODES)}, all)")
    for name, value, least in (("--tokens-per-step", tokens_per_step, 1), ("--repeats", repeats, 1),
                               ("--warmup", warmup, 0), ("--decode-tokens", decode_tokens, 1)):
        if value < least:
            raise SpeedError(f"{name} must be >= {least}, got {value}")
    for override in overrides:
        parse_override(override)  # a malformed --set is one error, not one per model
    if cpu and "train" in modes and not mixers:
        _refuse_what_cannot_fit(size, max(length_list), tokens_per_step, overrides)
    if dtype is None:
        dtype = "bf16" if device.startswith("cuda") else "fp32"
    if dtype not in AUTOCAST_DTYPES:
        raise SpeedError(f"unknown dtype {dtype!r} (known: {', '.join(AUTOCAST_DTYPES)})")
    both = ["eager", "graph"]
    impls = both if decode_impl == "both" else _split(decode_impl, "--decode-impl") \
        if decode_impl is not None else both if device.startswith("cuda") else ["eager"]
    for impl in impls:
        if impl not in DECODE_IMPLS:
            raise SpeedError(f"unknown --decode-impl {impl!r} (known: {', '.join(DECODE_IMPLS)}, both)")
    if "graph" in impls and not device.startswith("cuda"):
        raise SpeedError(f"--decode-impl graph replays CUDA graphs; the device is {device}")
    batches = _positive_ints(decode_batch, "--decode-batch")
    return SpeedSettings(model_list, size, length_list, tokens_per_step, modes, dtype, compile, repeats, warmup,
                         device, decode_tokens, mixers, list(overrides),
                         device.startswith("cuda") if isolate is None else isolate, list(dict.fromkeys(impls)),
                         list(dict.fromkeys(batches)))


def _refuse_what_cannot_fit(size: str, length: int, tokens: int, overrides) -> None:
    """Refuse a CPU sweep whose longest training step would need more memory than is available, by `caracal
    info`'s estimate for the Caracal model of that size (a quick trace on the meta device; the SSMs' reference
    scans trace too slowly to check each model)."""
    from caracal_cli.info import train_memory_estimate

    try:
        available = int(next(line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines()
                             if line.startswith("MemAvailable:"))) * 1024
        config = load_preset(preset_name("caracal", size), [*overrides, f"model.context={length}"])
    except (OSError, StopIteration, CaracalError):
        return  # no /proc (not Linux), or a --set the Caracal preset rejects: measured points will tell
    need = train_memory_estimate(config, max(1, tokens // length))["total_gib"] * 2**30
    if need > 0.8 * available:
        raise SpeedError(f"on this CPU a training step of the {size} size at L={length} with {tokens} tokens "
                         f"would need about {need / 2**30:.1f} GiB (estimate for Caracal) and "
                         f"{available / 2**30:.1f} GiB is available: lower --tokens-per-step, --lengths or "
                         f"--size (without them a CPU sweep measures {CPU_DEFAULTS})")


# --- environment and measurement ----------------------------------------------------------------------------
def _package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict[str, Any]:
    """What the figures were measured on. mamba_ssm is looked up, not imported (it cannot import on a CPU)."""
    cuda = device.type == "cuda"
    return {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if cuda else _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "caracal": __version__,
        "mamba_ssm": _package_version("mamba_ssm"),
        "causal_conv1d": _package_version("causal_conv1d"),
        "triton": _package_version("triton"),
        "timer": "torch.cuda.Event (GPU time)" if cuda else "time.perf_counter (wall time)",
        "memory": ("torch.cuda.max_memory_allocated: peak bytes during the point, weights included" if cuda
                   else "n/a: not measured on CPU (torch keeps no peak counter for host memory)"),
        "allocator": os.environ.get("PYTORCH_ALLOC_CONF") or os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
        "argv": list(sys.argv),
    }


def time_runs(run: Callable[[Any], Any], setup: Callable[[], Any], repeats: int, warmup: int,
              device: torch.device) -> list[float]:
    """Milliseconds of `run(setup())` for each of `repeats` runs after `warmup` untimed ones; `setup` is not
    timed. CUDA events measure GPU time between the start and the end of `run`."""
    for _ in range(warmup):
        run(setup())
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
    times = []
    for _ in range(repeats):
        state = setup()
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run(state)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            run(state)
            times.append((time.perf_counter() - begin) * 1e3)
        state = None  # let this run's state go before the next setup makes another
    return times


def summarize(times_ms: list[float]) -> dict[str, Any]:
    """Median and spread (min, max, quartiles) of raw timings, all kept."""
    ordered = sorted(times_ms)
    q1, _, q3 = statistics.quantiles(ordered, n=4, method="inclusive") if len(ordered) > 1 else ordered * 3
    return {"times_ms": times_ms, "median_ms": statistics.median(ordered), "min_ms": ordered[0],
            "max_ms": ordered[-1], "q1_ms": q1, "q3_ms": q3}


def _is_oom(err: BaseException) -> bool:
    if isinstance(err, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and any(
        sign in text for sign in ("out of memory", "can't allocate memory", "CUBLAS_STATUS_ALLOC_FAILED"))


def _reason(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    first = next((line for line in lines if line.strip()), "")
    where = type(err).__module__
    prefix = "torch.compile failed: " if where.startswith(("torch._dynamo", "torch._inductor")) else ""
    return f"{prefix}{type(err).__name__}: {first}"[:300]


class DeviceLost(RuntimeError):
    """A sticky device error (an illegal memory access poisons the CUDA context): nothing more can run on the
    device in this process."""


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def guarded(measure: Callable[[], dict[str, Any]], device: torch.device) -> dict[str, Any]:
    """Run one point: its figures with status ok, or status oom/error with a reason. Memory is freed after
    a failure (the traceback, which holds the point's tensors, is gone once the except block ends); a device
    that cannot even be synchronized afterwards raises DeviceLost."""
    try:
        result = measure()
    except Exception as err:  # a sweep records every failure and goes on: that is its job
        result = {"status": "oom" if _is_oom(err) else "error", "reason": _reason(err)}
    try:
        _free(device)
    except Exception as err:
        raise DeviceLost(result.get("reason") or _reason(err)) from None
    return result


class Sweep:
    """Runs points until the device fails for good; later points are recorded as not run, with the reason."""

    def __init__(self):
        self.lost: str | None = None

    def __call__(self, where: str, measure: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        if self.lost is not None:
            return {"status": "error", "reason": self.lost}
        try:
            return measure()
        except DeviceLost as err:
            self.lost = f"not run: the device failed earlier, at {where} ({err}); run that one on its own"
            return {"status": "error", "reason": f"the device failed: {err}"}


def _memory_before(device: torch.device) -> int | None:
    _free(device)
    if device.type != "cuda":
        return None
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def _memory_peak(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def _autocast(device: torch.device, dtype: torch.dtype):
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


# --- whole models -------------------------------------------------------------------------------------------
def budget_batch(length: int, tokens: int) -> tuple[int, str | None]:
    """Sequences per step for a token budget, and a note when the budget cannot be met exactly."""
    if length > tokens:
        return 1, f"batch 1: L={length} exceeds the {tokens}-token budget"
    batch = tokens // length
    return batch, None if batch * length == tokens else f"{batch * length} tokens per step (budget {tokens})"


def train_point(model, runner, length: int, settings: SpeedSettings, device: torch.device) -> dict[str, Any]:
    """Forward + cross-entropy + backward on random tokens; `runner` is the model or its compiled form."""
    batch, note = budget_batch(length, settings.tokens_per_step)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (batch, length), device=device)
    targets = torch.randint(0, vocab, (batch, length), device=device)

    def setup():
        model.zero_grad(set_to_none=True)

    def run(_):
        with _autocast(device, settings.torch_dtype):
            loss = runner(ids, targets=targets)
        loss.backward()

    times = time_runs(run, setup, settings.repeats, settings.warmup, device)
    model.zero_grad(set_to_none=True)
    return {"batch": batch, "tokens": batch * length, "unit": "ms/step", "note": note, **summarize(times)}


def prefill_point(model, runner, length: int, settings: SpeedSettings, device: torch.device) -> dict[str, Any]:
    """Forward only (inference_mode) at the token budget, ending in the last position's logits (what the next
    token is sampled from)."""
    batch, note = budget_batch(length, settings.tokens_per_step)
    ids = torch.randint(0, model.config.vocab_size, (batch, length), device=device)

    def run(_):
        with torch.inference_mode(), _autocast(device, settings.torch_dtype):
            runner(ids, last_only=True)

    times = time_runs(run, lambda: None, settings.repeats, settings.warmup, device)
    return {"batch": batch, "tokens": batch * length, "unit": "ms/step", "note": note, **summarize(times)}


def decode_point(model, runner, length: int, settings: SpeedSettings, device: torch.device, impl: str = "eager",
                 batch: int = 1) -> dict[str, Any]:
    """Prefill `batch` contexts of `length` tokens (untimed), then time `decode_tokens` greedy steps of one token
    per sequence (rounded up to whole `decode_period`s: a window of 32 tokens from a block boundary held one MHF
    fold, 8 times its share over 256 tokens) through a `generate.Decoder` with caches of exactly length + steps
    positions: its eager step, or (`impl` graph) the same step captured once as a CUDA graph and replayed, or
    (compiled) the step compiled by Inductor, captured likewise on CUDA (compiled in the untimed set-up on CUDA,
    in the warm-up runs elsewhere). Per step; tokens/s counts the batch's tokens. `runner` (a --compile'd model)
    is not used: decoding has its own compiled forms."""
    from caracal_cli.generate import decoder_for

    lacking = sorted({type(block.mixer).__name__ for block in model.blocks if not hasattr(block.mixer, "init_cache")})
    if lacking:
        return {"status": "unsupported", "reason": f"no cached decoding (init_cache) in {', '.join(lacking)}"}
    period, dtype = decode_period(model), settings.torch_dtype
    steps = -(-settings.decode_tokens // period) * period
    context = torch.randint(0, model.config.vocab_size, (batch, length), device=device)
    decoder = decoder_for(model, impl, dtype, keep=1)

    def setup():
        token = decoder.start(context, steps, length=length + steps).argmax(-1)
        if device.type == "cuda":  # the peak is the decoding's (weights, caches, one step), not the prefill's
            torch.cuda.reset_peak_memory_stats(device)
        return token

    def run(token):
        for _ in range(steps):
            token = decoder.step(token).argmax(-1)

    totals = time_runs(run, setup, settings.repeats, settings.warmup, device)
    per_step = [t / steps for t in totals]
    note = f"{steps} steps: whole {period}-token decoding periods" if steps != settings.decode_tokens else None
    return {"batch": batch, "tokens": batch, "context": length, "decode_tokens": steps, "unit": "ms/step",
            "note": note, "cache_dtype": settings.dtype, **summarize(per_step)}


def point_variants(mode: str, settings: SpeedSettings) -> list[dict[str, Any]]:
    """The points measured at each length of a mode: one for train and prefill; one per decoding path and batch."""
    if mode != "decode":
        return [{}]
    return [{"impl": impl, "batch": batch} for impl in settings.decode_impls for batch in settings.decode_batches]


def variant(entry: dict) -> str | None:
    """A decode point's path and batch ("graph ×64"); None for train and prefill (and older reports' decode)."""
    return f"{entry['impl']} ×{entry['batch']}" if entry["mode"] == "decode" and "impl" in entry else None


# One function per mode: (model, runner, length, settings, device) -> figures. Tests replace entries here.
POINTS: dict[str, Callable[..., dict[str, Any]]] = {
    "train": train_point,
    "prefill": prefill_point,
    "decode": decode_point,
}


def measure_point(mode: str, model, runner, length: int, settings: SpeedSettings,
                  device: torch.device, **variant: Any) -> dict[str, Any]:
    """One (mode, length) point of a model (a decode point: per `variant`'s impl and batch), with its peak
    memory, guarded against OOM and errors."""
    model.zero_grad(set_to_none=True)  # a failed train step may have left gradients behind
    return _measured(functools.partial(POINTS[mode], model, runner, length, settings, device, **variant), device)


def _measured(point: Callable[[], dict], device: torch.device) -> dict[str, Any]:
    """Run a point guarded; a measured one gets status ok, its tokens/s and its peak memory."""
    # Compiled code (--compile, or flex_attention inside a mixer) specializes per shape and grad mode: six
    # lengths × train/prefill would pass dynamo's recompile limit (8), after which it silently runs eager.
    # A fresh start per point keeps every point on its compiled path (warm-up pays for the compile).
    torch.compiler.reset()
    static = _memory_before(device)

    def measure():
        figures = point()
        figures.setdefault("status", "ok")
        if figures["status"] == "ok":
            figures.update(tokens_per_s=figures["tokens"] / (figures["median_ms"] / 1e3),
                           peak_mem_bytes=_memory_peak(device), static_mem_bytes=static)
        return figures

    return guarded(measure, device)


def _model_info(name: str, settings: SpeedSettings, device: torch.device,
                sweep: Sweep) -> tuple[Any, dict[str, Any]]:
    """Build one model on the device: (model or None, what the report says about it)."""
    preset = preset_name(name, settings.size)
    info: dict[str, Any] = {"preset": preset}
    try:
        config = load_preset(preset, settings.overrides)
    except ConfigError as err:
        return None, {**info, "status": "error", "reason": str(err)}
    torch.manual_seed(0)
    built: dict[str, Any] = {}

    def build():
        built["model"] = build_model(config.model).to(device)
        return {"status": "ok"}

    outcome = sweep(f"{name} (building it)", lambda: guarded(build, device))
    if outcome["status"] != "ok":
        return None, {**info, **outcome}
    model = built["model"]
    info["weights_mem_bytes"] = torch.cuda.memory_allocated(device) if device.type == "cuda" else None
    return model, {**info, "status": "ok", "family": config.model.family, "params": count_parameters(model)["total"],
                   "layers": "".join(config.model.layer_kinds()), "paths": kernel_paths(model, device),
                   "compiled": settings.compile, "precision": _precision(settings)}


def _flag_held_memory(figures: dict, weights: int | None) -> None:
    """Note a point that started with much more memory held than the model's weights: something an earlier
    failure left behind (inside a library) that inflates this point's peak."""
    static = figures.get("static_mem_bytes")
    if weights is not None and static is not None and static - weights > 2**30:
        held = f"{(static - weights) / 2**30:.1f} GiB beyond the weights was held when this point began"
        figures["note"] = f"{figures['note']}; {held}" if figures.get("note") else held


def _precision(settings: SpeedSettings) -> str:
    if settings.dtype == "fp32":
        return "fp32 weights and activations"
    return f"autocast({settings.dtype}), fp32 weights"


def run_models(settings: SpeedSettings, progress: Callable[[dict], None] | None = None,
               model_done: Callable[[dict], None] | None = None) -> dict[str, Any]:
    """The model sweep: one entry per model × mode × length, in that order. `model_done` gets the report so
    far after each point and each model (the CLI saves it, so a sweep stopped midway keeps what it measured)."""
    device = torch.device(settings.device)
    report = {"schema": SCHEMA, "kind": "models", "command": settings.command(), "settings": asdict(settings),
              "environment": environment(device), "models": {}, "results": []}
    if settings.isolate:
        return _run_isolated(settings, report, progress, model_done)
    sweep = Sweep()
    for name in settings.models:
        model, info = _model_info(name, settings, device, sweep)
        report["models"][name] = info
        runner = model
        if model is not None and settings.compile:
            runner = torch.compile(model)
        for mode, extra, length in _points(settings):
            if model is None:
                figures = {"status": info["status"], "reason": info["reason"]}
            else:
                figures = sweep(f"{name} {mode} L={length}", functools.partial(
                    measure_point, mode, model, runner, length, settings, device, **extra))
                _flag_held_memory(figures, info.get("weights_mem_bytes"))
            entry = {"model": name, "preset": info["preset"], "mode": mode, "length": length, **extra,
                     "reason": None, **figures}
            report["results"].append(entry)
            if model_done:  # after every point: a sweep stopped midway keeps what it measured; saved before the
                model_done(report)  # point's line, which an isolating parent takes as the cue to read it
            if progress:
                progress(entry)
        del model, runner
        sweep(name, lambda: guarded(dict, device))  # frees the model, and notices a device that failed
        if model_done:
            model_done(report)
    report["ratios"] = speed_ratios(report["results"])
    report["device_lost"] = sweep.lost
    return report


def _points(settings: SpeedSettings):
    """(mode, decode variant, length) of every point a model is measured at, in report order."""
    return [(mode, extra, length) for mode in settings.modes for extra in point_variants(mode, settings)
            for length in settings.lengths]


def _run_isolated(settings: SpeedSettings, report: dict, progress: Callable[[dict], None] | None,
                  model_done: Callable[[dict], None] | None) -> dict:
    """run_models with each model measured by a child `caracal speed` process; a child that dies leaves its
    model's points as errors naming how it ended, and the sweep goes on. The child's speed.json, which it rewrites
    after each point, is read at each of its point lines, so `model_done` still gets the report after every point.
    Stopped (KeyboardInterrupt), the child is ended, its points so far are kept, and no temporary directory is left."""
    lost = []
    for name in settings.models:
        child = replace(settings, models=[name], isolate=False)
        with tempfile.TemporaryDirectory(prefix="caracal-speed-") as tmp:
            argv = [sys.executable, "-m", "caracal_cli", *shlex.split(child.command())[1:], "--out", tmp]
            # The child's progress lines (stderr) are passed on as they come; its tables (stdout) are not needed.
            proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                    preexec_fn=_die_with_parent())
            tail: deque[str] = deque(maxlen=20)
            try:
                for line in proc.stderr:
                    tail.append(line)
                    if line.startswith("  "):  # a point's line (the child's header names its command)
                        if progress:
                            sys.stderr.write(line)
                        sub = _child_report(tmp)
                        if model_done and sub:
                            model_done(_with_child(report, name, sub))
                code = proc.wait()
            except KeyboardInterrupt:  # Ctrl-C, or a SIGTERM (run_speed): keep the points the child measured
                _end_child(proc)
                sub = _child_report(tmp)
                if sub:
                    report.update(_with_child(report, name, sub))
                    if model_done:
                        model_done(report)
                raise
            finally:
                _end_child(proc)  # whatever ended this, no child is left running (on a GPU it would hold it)
            sub = _child_report(tmp) if code == 0 else None
        if sub is None:
            last = next((line for line in reversed(tail) if line.strip()), "no output")
            reason = f"the {name} process ended with exit code {code}: {last.strip()}"[:300]
            report["models"][name] = {"preset": preset_name(name, settings.size), "status": "error", "reason": reason}
            entries = [{"model": name, "preset": preset_name(name, settings.size), "mode": mode, "length": length,
                        **extra, "status": "error", "reason": reason} for mode, extra, length in _points(settings)]
            report["results"] += entries
        else:
            report.update(_with_child(report, name, sub))
            entries = sub["results"]
            if sub.get("device_lost"):
                lost.append(f"{name}: {sub['device_lost']}")
        if progress and sub is None:  # the child's own lines showed the points it measured
            for entry in entries:
                progress(entry)
        if model_done:
            model_done(report)
    report["ratios"] = speed_ratios(report["results"])
    report["device_lost"] = "; ".join(lost) or None
    return report


def _child_report(tmp: str) -> dict | None:
    """An isolated child's speed.json so far (written atomically), or None before its first point."""
    try:
        return json.loads((Path(tmp) / "speed.json").read_text())
    except (OSError, ValueError):
        return None


def _with_child(report: dict, name: str, sub: dict) -> dict:
    """The report with a child's model and points added (a copy: the child may measure more)."""
    models = {**report["models"], name: sub["models"][name]} if name in sub["models"] else report["models"]
    return {**report, "models": models, "results": report["results"] + sub["results"]}


def _die_with_parent() -> Callable[[], None] | None:
    """A preexec_fn that ends the child with this process however it ends (kill -9 included); None off Linux."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    libc, parent = ctypes.CDLL(None), os.getpid()  # loaded here: nothing should be imported between fork and exec
    return lambda: end_with_parent(parent, libc)


def _end_child(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """Stop a child still running and reap it: SIGTERM first, which it handles as Ctrl-C (its points so far are in
    its speed.json); SIGKILL after `grace` seconds (a point inside one long kernel cannot stop sooner)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    proc.stderr.close()


def point_key(entry: dict) -> tuple:
    """What a point measures: model, mode, decode variant and length (a merge keeps one point per key)."""
    return entry["model"], entry["mode"], variant(entry), entry["length"]


def speed_ratios(results: list[dict], numerator: str = "caracal", denominator: str = "llama") -> list[dict]:
    """Caracal's tokens/s over Llama's at each mode (and decode variant) and length where both were measured."""
    ok = {point_key(r): r["tokens_per_s"] for r in results if r["status"] == "ok" and "model" in r}  # not mixers
    return [{"mode": mode, "variant": which, "length": length,
             f"{numerator}_over_{denominator}": speed / ok[(denominator, mode, which, length)]}
            for (model, mode, which, length), speed in ok.items()
            if model == numerator and (denominator, mode, which, length) in ok]


# What must agree between runs for their points to share one table: the machine and what each point measures.
MERGE_KEYS = (("environment", "device_name"), ("environment", "torch"), ("settings", "size"),
              ("settings", "dtype"), ("settings", "tokens_per_step"), ("settings", "compile"),
              ("settings", "overrides"), ("settings", "decode_tokens"))


def read_report(path: str | Path) -> dict[str, Any]:
    """A speed.json, or a SpeedError naming what is wrong with it."""
    try:
        report = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise SpeedError(f"no such file: {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SpeedError(f"cannot read {path} as JSON: {err}") from None
    if not isinstance(report, dict):
        raise SpeedError(f"{path} holds no speed report (a JSON {type(report).__name__})")
    return report


def merge_reports(named: list[tuple[str, dict]]) -> dict[str, Any]:
    """One model sweep from the speed.json of several runs (models measured in separate jobs, or a sweep
    finished in parts): a later run's point replaces an earlier one at the same model, mode and length. Runs
    on different GPUs or with settings that change what a point measures are refused, naming the difference."""
    if not named:
        raise SpeedError("--merge needs at least one speed.json")
    for path, report in named:
        if report.get("schema") != SCHEMA or report.get("kind") != "models":
            raise SpeedError(f"{path} is not a model sweep written by caracal speed "
                             f"(schema {report.get('schema')!r}, kind {report.get('kind')!r})")
        shapes = {"settings": dict, "environment": dict, "models": dict, "results": list}
        broken = [key for key, kind in shapes.items() if not isinstance(report.get(key), kind)]
        if broken or not all(isinstance(e, dict) and {"model", "mode", "length", "status"} <= set(e)
                             for e in report["results"]):
            raise SpeedError(f"{path} is a damaged speed report ({', '.join(broken) or 'results'} malformed)")
    first_path, first = named[0]
    for path, report in named[1:]:
        for section, key in MERGE_KEYS:
            mine, theirs = first[section].get(key), report[section].get(key)
            if mine != theirs:
                raise SpeedError(f"cannot merge {path} with {first_path}: {section}.{key} is {theirs!r} there "
                                 f"and {mine!r} here")
    points: dict[tuple, dict] = {}
    models: dict[str, dict] = {}
    for _, report in named:
        models.update(report["models"])
        for entry in report["results"]:
            points[point_key(entry)] = entry
    order = list(models)
    modes = [m for m in ("train", "prefill", "decode") if any(k[1] == m for k in points)]
    results = sorted(points.values(), key=lambda e: (order.index(e["model"]), modes.index(e["mode"]),
                                                     variant(e) or "", e["length"]))
    settings = {**first["settings"], "models": order, "modes": modes,
                "lengths": sorted({e["length"] for e in results})}
    lost = [r["device_lost"] for _, r in named if r.get("device_lost")]
    return {"schema": SCHEMA, "kind": "models",
            "command": "caracal speed --merge " + " ".join(path for path, _ in named),
            "settings": settings, "environment": first["environment"], "models": models, "results": results,
            "ratios": speed_ratios(results), "device_lost": "; ".join(lost) or None,
            "merged_from": [{"path": path, "command": r["command"], "partial": bool(r.get("partial"))}
                            for path, r in named]}


# --- mixers alone -------------------------------------------------------------------------------------------
def copy_bandwidth(device: torch.device, repeats: int = 10) -> dict[str, Any]:
    """Device memory bandwidth from a large tensor copy (read + write counted), in GB/s."""
    nbytes = (1 << 30) if device.type == "cuda" else (1 << 27)
    buffers = [torch.ones(nbytes // 4, dtype=torch.float32, device=device) for _ in range(2)]
    times = time_runs(lambda _: buffers[1].copy_(buffers[0]), lambda: None, repeats, 2, device)
    buffers.clear()
    _free(device)
    median = statistics.median(times)
    return {"bytes": nbytes, "method": f"tensor.copy_ of {nbytes >> 20} MiB (read + write counted)",
            "gb_per_s": 2 * nbytes / (median / 1e3) / 1e9, **summarize(times)}


class MHFLinears(torch.nn.Module):
    """MHF's three d×d projections alone (value, gate, output), the part of the module that is matmuls: what
    the module would cost if everything around them were free."""

    def __init__(self, d: int):
        super().__init__()
        self.value, self.gate, self.out = (torch.nn.Linear(d, d, bias=False) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.value(x)) + self.gate(x)

    def path(self, device: torch.device) -> str:
        return "3 × nn.Linear (d × d)"


def mixer_specs() -> tuple[dict[str, Callable[[Any], torch.nn.Module]], list[str]]:
    """The modules to time alone (name → builder from the size's model config), and notes on those skipped:
    mixers from preset entries, and MHF's projections alone (`MHFLinears`, not a mixer) beside the module."""
    entries = {"mhf": {"kind": "mhf"}, "mhf-composition": {"kind": "mhf", "module_impl": "torch"},  # before/after
               "attention": {"kind": "attention"},
               "swa-256": {"kind": "attention", "window": 256}}
    notes = []
    for kind in ("mamba", "mamba2"):  # the state-space mixers, when registered
        if kind in MIXERS:
            entries[kind] = {"kind": kind}
        else:
            notes.append(f"{kind}: not in the mixer registry here, skipped")
    specs = {name: functools.partial(build_mixer, entry, where=f"mixer {name}") for name, entry in entries.items()}
    specs["mhf-linears"] = lambda model_cfg: MHFLinears(model_cfg.d_model)
    return specs, notes


def _mixer_point(mixer, length: int, d_model: int, settings: SpeedSettings, device: torch.device) -> dict:
    batch, note = budget_batch(length, settings.tokens_per_step)
    dtype = settings.torch_dtype
    x = torch.randn(batch, length, d_model, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn_like(x)

    def setup():
        x.grad = None
        mixer.zero_grad(set_to_none=True)

    def run(_):
        with _autocast(device, dtype):
            y = mixer(x)
        y.backward(dy)

    times = time_runs(run, setup, settings.repeats, settings.warmup, device)
    return {"batch": batch, "tokens": batch * length, "note": note, **summarize(times)}


def _fft_point(fn, length: int, d_model: int, backward: bool, bandwidth: float, settings: SpeedSettings,
               device: torch.device) -> dict:
    """The bare convolution, with its floor: forward reads v and g and writes y in the input dtype;
    forward + backward moves about three times that."""
    batch, note = budget_batch(length, settings.tokens_per_step)
    dtype = settings.torch_dtype
    v = torch.randn(batch, length, d_model, device=device, dtype=dtype, requires_grad=backward)
    g = torch.randn(batch, length, d_model, device=device, dtype=dtype, requires_grad=backward)
    dy = torch.randn_like(v)

    def setup():
        v.grad = g.grad = None

    def run(_):
        if backward:
            fn(v, g).backward(dy)
        else:
            with torch.inference_mode():
                fn(v, g)

    times = time_runs(run, setup, settings.repeats, settings.warmup, device)
    floor_bytes = 3 * v.numel() * v.element_size() * (3 if backward else 1)
    floor_ms = floor_bytes / (bandwidth * 1e9) * 1e3
    figures = summarize(times)
    return {"batch": batch, "tokens": batch * length, "note": note, "floor_bytes": floor_bytes,
            "floor_ms": floor_ms, "over_floor": figures["median_ms"] / floor_ms, **figures}


def _time_mixer(name: str, builder: Callable[[Any], torch.nn.Module], model_cfg, settings: SpeedSettings,
                device: torch.device, sweep: Sweep, record: Callable[[dict], None]) -> str | None:
    """Every length of one mixer; returns its path (None when it could not be built)."""
    torch.manual_seed(0)
    built: dict[str, Any] = {}

    def build():
        built["mixer"] = builder(model_cfg).to(device)
        return {"status": "ok"}

    outcome = sweep(f"{name} (building it)", lambda: guarded(build, device))
    mixer = built.pop("mixer", None)
    for length in settings.lengths:
        figures = outcome if mixer is None else sweep(f"{name} L={length}", functools.partial(
            _measured, functools.partial(_mixer_point, mixer, length, model_cfg.d_model, settings, device), device))
        record({"name": name, "pass": "fwd+bwd", "length": length, "reason": None, **figures})
    if mixer is None:
        return None
    return mixer.path(device) if hasattr(mixer, "path") else "pytorch"


def run_mixers(settings: SpeedSettings, progress: Callable[[dict], None] | None = None,
               model_done: Callable[[dict], None] | None = None) -> dict[str, Any]:
    """Each mixer alone at the size's d_model (forward + backward), and each FFT variant (forward, and
    forward + backward) against its memory-traffic floor. `model_done` gets the report so far after each point,
    as in run_models."""
    device = torch.device(settings.device)
    model_cfg = load_preset(preset_name("caracal", settings.size)).model
    d = model_cfg.d_model
    specs, notes = mixer_specs()
    bandwidth = copy_bandwidth(device)
    report = {"schema": SCHEMA, "kind": "mixers", "command": settings.command(), "settings": asdict(settings),
              "environment": environment(device), "d_model": d, "n_head": model_cfg.n_head,
              "bandwidth": bandwidth, "notes": notes, "paths": {}, "results": []}

    def record(entry):
        report["results"].append(entry)
        if model_done:  # a sweep stopped midway keeps what it measured
            model_done(report)
        if progress:
            progress(entry)

    sweep = Sweep()
    for name, builder in specs.items():
        report["paths"][name] = _time_mixer(name, builder, model_cfg, settings, device, sweep, record)
    for name, fn in FFT_VARIANTS.items():
        report["paths"][name] = f"{fn.__module__}.{fn.__qualname__}"
        for backward in (False, True):
            for length in settings.lengths:
                point = functools.partial(_fft_point, fn, length, d, backward, bandwidth["gb_per_s"], settings,
                                          device)
                figures = sweep(f"{name} L={length}", functools.partial(_measured, point, device))
                record({"name": name, "pass": "fwd+bwd" if backward else "fwd", "length": length,
                        "reason": None, **figures})
    report["device_lost"] = sweep.lost
    return report


class SpeedStopped(SystemExit):
    """A sweep ended by SIGINT or SIGTERM, its measured points saved: exits 128 + the signal's number (130, 143),
    without a traceback, through callers that do not catch it."""

    def __init__(self, signal_name: str, points: int):
        super().__init__(128 + getattr(signal, signal_name))
        self.signal_name, self.points = signal_name, points


def run_speed(settings: SpeedSettings, progress: Callable[[dict], None] | None = None,
              model_done: Callable[[dict], None] | None = None, saved_to: str | Path | None = None) -> dict[str, Any]:
    """The sweep `settings` asks for. A SIGTERM (a scheduler, `timeout`) ends it as Ctrl-C does: the points
    `model_done` saved are kept, one line on stderr says where (`saved_to`, where the caller saves them), and
    SpeedStopped is raised."""
    saved = {"points": 0}

    def save(report):
        saved["points"] = len(report["results"])
        if model_done:
            model_done(report)

    try:
        with sigterm_as_interrupt():
            return run_mixers(settings, progress, save) if settings.mixers else run_models(settings, progress, save)
    except KeyboardInterrupt as err:
        name, points = signal_name(err), saved["points"]
        where = f"saved in {saved_to}" if saved_to else "saved in speed.json"
        kept = f"{points} measured point{'s' * (points > 1)} {where}, marked partial" if points and model_done \
            else "no point was saved"
        sys.stderr.write(f"caracal speed stopped by {name}: {kept}\n")
        raise SpeedStopped(name, points) from None


# --- output -------------------------------------------------------------------------------------------------
def _si(value: float) -> str:
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if value >= scale:
            return f"{value / scale:.2f}{suffix}"
    return f"{value:.1f}"


def _mem(value: int | None) -> str:
    return "n/a" if value is None else f"{value / 2**30:.2f} GiB" if value >= 2**30 else f"{value / 2**20:.0f} MiB"


def _ms(value: float) -> str:
    return f"{value:.3g}" if value < 100 else f"{value:,.0f}"


def _spread(entry: dict) -> str:
    return f"{_ms(entry['min_ms'])}–{_ms(entry['max_ms'])}"


def _status_text(entry: dict) -> str:
    if entry["status"] == "oom":
        return "OOM"
    reason = (entry.get("reason") or "").split(" (known:")[0]  # the list of presets is in the JSON
    return f"{entry['status']}: {reason}"[:90]


def _label(entry: dict) -> str:
    return entry["model"] if variant(entry) is None else f"{entry['model']} {variant(entry)}"


def speed_tables(report: dict):
    """Rich tables of a report: one per mode (models) or one for the mixers."""
    from rich.table import Table

    env, settings = report["environment"], report["settings"]
    where = f"{env['device_name']} ({env['device']}), {settings['dtype']}"
    if report["kind"] == "mixers":
        table = Table(title=f"Mixers alone, d={report['d_model']} — {where}; copy bandwidth "
                            f"{report['bandwidth']['gb_per_s']:.0f} GB/s")
        for col in ("mixer", "pass", "L", "batch", "ms", "min–max", "tokens/s", "peak mem", "floor ms", "× floor",
                    "note"):
            table.add_column(col, justify="left" if col in ("mixer", "pass", "note") else "right")
        for e in report["results"]:
            if e["status"] != "ok":
                table.add_row(e["name"], e["pass"], str(e["length"]), *[""] * 7, _status_text(e))
                continue
            floor = e.get("floor_ms")
            table.add_row(e["name"], e["pass"], str(e["length"]), str(e["batch"]), _ms(e["median_ms"]),
                          _spread(e), _si(e["tokens_per_s"]), _mem(e["peak_mem_bytes"]),
                          "" if floor is None else f"{floor:.3g}", "" if floor is None else f"{e['over_floor']:.1f}",
                          e.get("note") or "")
        return [table]
    ratios = {(r["mode"], r.get("variant"), r["length"]): r["caracal_over_llama"] for r in report["ratios"]}
    tables = []
    for mode in settings["modes"]:
        table = Table(title=f"{mode} — {where}, size {settings['size']}"
                            + (", torch.compile" if settings["compile"] and mode != "decode" else "")
                            + ("; a step is one token per sequence" if mode == "decode" else ""))
        for col in ("model", "L", "batch", "ms/step", "min–max", "tokens/s", "peak mem", "caracal/llama", "note"):
            table.add_column(col, justify="left" if col in ("model", "note") else "right")
        unbuilt = set()
        for e in (e for e in report["results"] if e["mode"] == mode):
            if e["status"] != "ok":
                if report["models"][e["model"]]["status"] != "ok":  # never built: one row, not one per length
                    if e["model"] not in unbuilt:
                        unbuilt.add(e["model"])
                        table.add_row(e["model"], "all", *[""] * 6, _status_text(e))
                    continue
                table.add_row(_label(e), str(e["length"]), *[""] * 6, _status_text(e))
                continue
            ratio = ratios.get((mode, variant(e), e["length"])) if e["model"] == "caracal" else None
            table.add_row(_label(e), str(e["length"]), str(e["batch"]), _ms(e["median_ms"]), _spread(e),
                          _si(e["tokens_per_s"]), _mem(e["peak_mem_bytes"]), "" if ratio is None else f"{ratio:.2f}",
                          e.get("note") or "")
        tables.append(table)
    return tables


def plot_report(report: dict, path: Path) -> None:
    """speed.png: tokens/s and peak memory against L, log-log, one line per model (or mixer), a row of two
    panels per mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if report["kind"] == "mixers":
        groups = {"mixers alone": [(f"{e['name']} ({e['pass']})", e) for e in report["results"]]}
    else:
        groups = {mode: [(_label(e), e) for e in report["results"] if e["mode"] == mode]
                  for mode in report["settings"]["modes"]}
    fig, axes = plt.subplots(len(groups), 2, figsize=(11, 4 * len(groups)), squeeze=False)
    for (title, labelled), (ax_speed, ax_mem) in zip(groups.items(), axes, strict=True):
        lines: dict[str, list[dict]] = {}
        for label, entry in labelled:
            lines.setdefault(label, []).append(entry)
        for label, entries in lines.items():
            ok = [e for e in entries if e["status"] == "ok"]
            if ok:
                ax_speed.plot([e["length"] for e in ok], [e["tokens_per_s"] for e in ok], marker="o", label=label)
            mem = [e for e in ok if e.get("peak_mem_bytes")]
            if mem:
                ax_mem.plot([e["length"] for e in mem], [e["peak_mem_bytes"] / 2**30 for e in mem], marker="o",
                            label=label)
        for ax, ylabel in ((ax_speed, "tokens/s"), (ax_mem, "peak memory (GiB)")):
            ax.set_title(title)
            ax.set_xlabel("sequence length L")
            ax.set_ylabel(ylabel)
            if ax.lines:
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
                ax.legend(fontsize=8)
                ax.grid(True, which="both", alpha=0.3)
            else:
                ax.set_xticks([])
                ax.set_yticks([])
                ax.text(0.5, 0.5, "not measured on CPU" if ax is ax_mem and report["environment"]["device"] == "cpu"
                        else "no successful points", ha="center", va="center", transform=ax.transAxes)
    env = report["environment"]
    settings = report["settings"]
    fig.suptitle(f"caracal speed — {env['device_name']}, {settings['dtype']}, size {settings['size']}"
                 + (", torch.compile" if settings["compile"] else "")
                 + ("; decode: tokens/s over the batch" if "decode" in groups else ""), fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def write_report(report: dict, out_dir: str | Path) -> dict[str, Path]:
    """speed.json (every raw figure) and speed.png in `out_dir`, each written atomically."""
    out = Path(out_dir)
    paths = {"json": out / "speed.json", "png": out / "speed.png"}
    write_json(paths["json"], report)
    plot_report(report, paths["png"])
    return paths


def default_out_dir() -> Path:
    return Path("runs") / f"speed-{time.strftime('%Y%m%d-%H%M%S')}"
