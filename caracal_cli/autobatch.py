"""`train.micro_batch: auto`: the largest micro-batch whose real training step fits the device.

Candidates are the divisors of the per-rank sequences of one optimizer step (so gradient accumulation stays
exact). On CUDA each candidate is tried as a real step — the model, the loss and AdamW as configured, two
micro-steps (the second runs with the gradients of the first held, as accumulation does) and the update —
and fits when it raises no out-of-memory error and its peak allocation stays under `HEADROOM` of the limit
(the device's memory, or `train.memory_limit_gb` when smaller). The meta-device estimate of `info` only
seeds the search. The steps run eager, also for `--compile`: a compiled step keeps less (Inductor recomputes
elementwise work instead of saving it; on an H200, Caracal-large at 64 sequences peaked at 65.7 GiB eager and
56.6 compiled, Caracal-small at 512 at 119.3 and 100.5), and compiling each probed shape would cost about a
minute each, twice (the run's own model compiles again). On a CPU, which keeps no peak counter, the estimate
decides, under half the host's memory and at most `CPU_TOKENS` tokens per micro-batch.

If not even one sequence fits, the search runs again with every block checkpointed (`activation_checkpointing:
block`) and says so. Under torchrun every rank probes alone and all take the smallest answer.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from caracal_cli.config import CaracalError, Config

HEADROOM = 0.9  # a fitting step's peak allocation stays under this share of the limit (fragmentation, evals)
CPU_TOKENS = 16384  # CPU micro-batches stay this small: larger ones do not run faster there


@dataclass
class Probe:
    """One tried size: its peak GiB, or None where it ran out of memory."""
    micro_batch: int
    peak_gib: float | None

    def fits(self, limit_gib: float) -> bool:
        return self.peak_gib is not None and self.peak_gib <= HEADROOM * limit_gib


@dataclass
class AutoBatch:
    """What `resolve` chose, and how: written to the run directory as `autobatch.json`."""
    micro_batch: int
    activation_checkpointing: str
    method: str  # probe | estimate | explicit
    limit_gib: float | None = None
    peak_gib: float | None = None
    seconds: float = 0.0
    tried: list[Probe] = field(default_factory=list)
    note: str = ""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def summary(self) -> str:
        peak = f", peak {self.peak_gib:.1f} GiB" if self.peak_gib is not None else ""
        limit = f" of {self.limit_gib:.1f} GiB" if self.limit_gib is not None else ""
        ckpt = ", blocks checkpointed" if self.activation_checkpointing != "none" else ""
        return (f"micro-batch {self.micro_batch} ({self.method}{peak}{limit}{ckpt}, {self.seconds:.1f} s)"
                + (f"; {self.note}" if self.note else ""))


def candidates(config: Config, world_size: int) -> list[int]:
    """Micro-batch sizes that split one step's sequences on each rank exactly, ascending."""
    per_rank, rest = divmod(config.train.global_batch_tokens, config.model.context * world_size)
    if rest or per_rank < 1:
        raise CaracalError(
            f"train.global_batch_tokens={config.train.global_batch_tokens} is not a whole number of sequences "
            f"of {config.model.context} tokens per rank at world size {world_size}")
    return [m for m in range(1, per_rank + 1) if per_rank % m == 0]


def largest_fitting(sizes: list[int], fits: Callable[[int], bool], start: int | None = None) -> int | None:
    """The largest of ascending `sizes` for which `fits` holds, assuming that it holds up to some size and not
    beyond; a binary search that tries `start` (an index) first. None if not even the smallest fits."""
    lo, hi = -1, len(sizes)  # sizes[lo] fits (or lo = -1); sizes[hi] does not (or hi = len)
    probe = start if start is not None and 0 <= start < len(sizes) else len(sizes) // 2
    while hi - lo > 1:
        if fits(sizes[probe]):
            lo = probe
        else:
            hi = probe
        probe = (lo + hi) // 2
    return sizes[lo] if lo >= 0 else None


def device_gib(device: torch.device) -> float:
    """The memory a run may use on `device`: the GPU's, or half the host's RAM on a CPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory / 2**30
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30 / 2


def limit_gib(config: Config, total: float) -> float:
    """`total` capped by train.memory_limit_gb."""
    cap = config.train.memory_limit_gb
    return total if cap is None else min(total, cap)


def apply_memory_limit(config: Config, device: torch.device) -> None:
    """Hold this process to train.memory_limit_gb on CUDA (as a smaller card would), for the probe and the run."""
    if device.type == "cuda" and config.train.memory_limit_gb is not None:
        torch.cuda.set_per_process_memory_fraction(min(1.0, config.train.memory_limit_gb / device_gib(device)), device)


def _estimate_gib(config: Config, micro_batch: int, checkpointing: str, device: str = "cpu") -> float:
    from caracal_cli.info import train_memory_estimate

    return train_memory_estimate(config, micro_batch, checkpointing, device)["total_gib"]


def _seed_index(config: Config, sizes: list[int], limit: float, checkpointing: str, device: str) -> int:
    """Where the probe starts: the largest size the estimate fits (the estimate is linear in the size)."""
    base = _estimate_gib(config, 1, checkpointing, device)
    per_sequence = max(_estimate_gib(config, 2, checkpointing, device) - base, 1e-9)
    fitting = [i for i, m in enumerate(sizes) if base + (m - 1) * per_sequence <= HEADROOM * limit]
    return fitting[-1] if fitting else 0


class CudaStepProbe:
    """Peak GiB of one real step at a given micro-batch on CUDA (model, loss, AdamW as configured), or None on
    out-of-memory. The model is built once per setting, on the device, under a forked RNG, and freed by
    `close`: the run itself then starts from exactly the state it would have had."""

    def __init__(self):
        self.key, self.model, self.optimizer = None, None, None

    def __call__(self, config: Config, device: torch.device, micro_batch: int, checkpointing: str) -> float | None:
        from caracal_cli.train import autocast

        tc = config.train
        loss = None
        try:
            with torch.random.fork_rng(devices=[device]):
                self._prepare(config, device, checkpointing)
                self.optimizer.zero_grad(set_to_none=True)
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
                ids = torch.randint(0, config.model.vocab_size, (micro_batch, config.model.context + 1),
                                    device=device)
                for _ in range(2):  # the second micro-step holds the first one's gradients
                    with autocast(device, tc.dtype):
                        loss = self.model(ids[:, :-1], targets=ids[:, 1:])
                    loss.backward()
                    loss = None
                self.optimizer.step()
                torch.cuda.synchronize(device)
                return torch.cuda.max_memory_allocated(device) / 2**30
        except torch.OutOfMemoryError:
            return None
        finally:
            del loss
            if self.optimizer is not None:
                self.optimizer.zero_grad(set_to_none=True)
            gc.collect()
            torch.cuda.empty_cache()

    def _prepare(self, config: Config, device: torch.device, checkpointing: str) -> None:
        from caracal_cli.model import build_model, set_activation_checkpointing
        from caracal_cli.recipe import build_optimizer

        if self.key == checkpointing:
            return
        self.close()
        with torch.device(device):
            self.model = build_model(config.model)
        set_activation_checkpointing(self.model, checkpointing)
        self.optimizer = build_optimizer(self.model, config.train, device)
        self.key = checkpointing

    def close(self) -> None:
        self.key, self.model, self.optimizer = None, None, None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def resolve(config: Config, device: torch.device, world_size: int = 1, log: Callable[[str], None] = lambda text: None,
            step_peak: Callable[..., float | None] | None = None, total_gib: float | None = None) -> AutoBatch:
    """The micro-batch (and block checkpointing) this run uses. `step_peak(config, device, micro_batch,
    checkpointing)` measures one step and `total_gib` is the device's memory (fakes in tests); the
    defaults are a real step on CUDA and `device_gib`."""
    tc = config.train
    if tc.micro_batch != "auto":
        return AutoBatch(int(tc.micro_batch), tc.activation_checkpointing, "explicit")
    started = time.perf_counter()
    sizes = candidates(config, world_size)
    limit = limit_gib(config, device_gib(device) if total_gib is None else total_gib)
    if device.type != "cuda" and step_peak is None:
        sizes = [m for m in sizes if m * config.model.context <= CPU_TOKENS] or sizes[:1]
        step_peak = lambda cfg, dev, m, ckpt: _estimate_gib(cfg, m, ckpt)  # noqa: E731
        method = "estimate"
    else:
        step_peak = step_peak or CudaStepProbe()
        method = "probe"
    tried: list[Probe] = []

    def fits(m: int, checkpointing: str) -> bool:
        peak = step_peak(config, device, m, checkpointing)
        tried.append(Probe(m, None if peak is None else round(peak, 2)))
        log(f"  micro-batch {m}: " + ("out of memory" if peak is None else f"peak {peak:.1f} GiB")
            + (" (blocks checkpointed)" if checkpointing != "none" else ""))
        return tried[-1].fits(limit)

    note = ""
    try:
        for checkpointing in dict.fromkeys([tc.activation_checkpointing, "block"]):
            start = _seed_index(config, sizes, limit, checkpointing, device.type)
            chosen = largest_fitting(sizes, lambda m, c=checkpointing: fits(m, c), start)  # noqa: B023
            if chosen is not None:
                break
            if checkpointing == "none":
                note = "no micro-batch of 1 fits without activation checkpointing: blocks are checkpointed"
                log(note)
        else:
            raise CaracalError(f"{config.name}: not even one sequence of {config.model.context} tokens fits in "
                               f"{limit:.1f} GiB with every block checkpointed; use a smaller model or context")
    finally:
        if isinstance(step_peak, CudaStepProbe):
            step_peak.close()
    chosen, checkpointing = agree_across_ranks(chosen, checkpointing, world_size)
    peak = next((p.peak_gib for p in reversed(tried) if p.micro_batch == chosen and p.peak_gib is not None), None)
    return AutoBatch(chosen, checkpointing, method, round(limit, 2), peak, round(time.perf_counter() - started, 2),
                     tried, note)


def agree_across_ranks(micro_batch: int, checkpointing: str, world_size: int) -> tuple[int, str]:
    """Every rank's choice → the smallest micro-batch, with checkpointing if any rank needed it (collective
    under torch.distributed): what fits the tightest rank fits them all."""
    import torch.distributed as dist

    if world_size == 1 or not dist.is_initialized():
        return micro_batch, checkpointing
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    value = torch.tensor([micro_batch, -int(checkpointing != "none")], dtype=torch.int64, device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return int(value[0]), "block" if value[1] < 0 else "none"


def resolved_config(config: Config, choice: AutoBatch) -> Config:
    """`config` with the chosen micro-batch written in: what the run saves, so a resume reuses it exactly."""
    train = dataclasses.replace(config.train, micro_batch=choice.micro_batch,
                                activation_checkpointing=choice.activation_checkpointing)
    return dataclasses.replace(config, train=train)
