"""Which device a command runs on: the one place that reads `--device`."""

from __future__ import annotations

import torch

from caracal_cli.config import CaracalError


class DeviceError(CaracalError):
    pass


AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}  # fp32: no autocast


def resolve_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """`auto` → this process's GPU (`local_rank`) when CUDA is available, else the CPU; `cuda` or `cuda:N`
    where there is no CUDA, or an unknown name, is refused."""
    if name in ("", "auto"):
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.split(":")[0] == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"--device {name}: no CUDA device is available here")
        return torch.device("cuda", local_rank) if name == "cuda" else torch.device(name)
    if name != "cpu":
        raise DeviceError(f"unknown device {name!r} (known: auto, cpu, cuda, cuda:N)")
    return torch.device("cpu")


def to_device(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host batch on `device`. To a GPU through pinned memory: a copy from pageable memory waits for the
    stream's queued work first, so the host could not launch the next kernels while the GPU computes."""
    if device.type == "cuda":
        return batch.pin_memory().to(device, non_blocking=True)
    return batch.to(device)
