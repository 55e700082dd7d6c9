"""Precision helpers shared by mixers."""

from __future__ import annotations

import contextlib

import torch


def autocast_off(device: torch.device):
    """A context with autocast disabled on `device`, for sums that must run in float32 (FFTs, scans); a no-op
    where autocast does not exist (meta tensors, used to count parameters and memory without allocating)."""
    if device.type == "meta":  # (not torch.amp.is_autocast_available: torch.compile cannot trace it, and the
        return contextlib.nullcontext()  # graph break it made split every compiled decoding step)
    return torch.autocast(device_type=device.type, enabled=False)
