"""The optimisation recipe a preset's `train` section describes: batch plan, learning-rate schedule, AdamW
parameter groups. Pure functions, so tests and `--dry-run` see the same numbers the training loop uses."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from caracal_cli.config import ConfigError, TrainConfig


@dataclass(frozen=True)
class BatchPlan:
    world_size: int
    micro_batch: int  # sequences per rank per micro-step
    context: int
    grad_accum: int  # micro-steps per optimizer step
    tokens_per_step: int  # = global_batch_tokens
    total_steps: int  # tokens // tokens_per_step: the schedule's length
    warmup_steps: int

    def to_dict(self) -> dict:
        return asdict(self)


def plan_batches(train: TrainConfig, context: int, world_size: int) -> BatchPlan:
    """Split `train.global_batch_tokens` into micro-batches: grad_accum = global / (micro_batch · context ·
    world), refused with the numbers when it does not divide."""
    if train.micro_batch == "auto":
        raise ConfigError("train.micro_batch is auto: it is chosen on the device when the run starts "
                          "(autobatch.resolve), not planned ahead")
    per_micro_step = train.micro_batch * context * world_size
    if train.global_batch_tokens % per_micro_step:
        raise ConfigError(
            f"train.global_batch_tokens={train.global_batch_tokens} is not a multiple of micro_batch × context × "
            f"world = {train.micro_batch} × {context} × {world_size} = {per_micro_step}; change "
            f"train.global_batch_tokens, train.micro_batch or the number of processes")
    total_steps = planned_steps(train)
    if total_steps < 1:
        raise ConfigError(f"train.tokens={train.tokens} is less than one step of "
                          f"train.global_batch_tokens={train.global_batch_tokens}")
    return BatchPlan(world_size=world_size, micro_batch=train.micro_batch, context=context,
                     grad_accum=train.global_batch_tokens // per_micro_step,
                     tokens_per_step=train.global_batch_tokens, total_steps=total_steps,
                     warmup_steps=min(total_steps, train.warmup_tokens // train.global_batch_tokens))


def planned_steps(train: TrainConfig) -> int:
    """Optimizer steps in the whole token budget (the schedule's length), whatever the micro-batch."""
    return train.tokens // train.global_batch_tokens


def learning_rate(step: int, plan: BatchPlan, train: TrainConfig) -> float:
    """LR of optimizer step `step` (0-based): linear warmup to `train.lr` over the warmup steps, then a cosine
    down to ``min_lr_ratio · lr`` at the last step of the token budget (GPT-3's schedule)."""
    if step < plan.warmup_steps:
        return train.lr * (step + 1) / plan.warmup_steps
    decay_steps = plan.total_steps - plan.warmup_steps
    if decay_steps <= 0:
        return train.lr
    progress = min(1.0, (step - plan.warmup_steps + 1) / decay_steps)
    low = train.lr * train.min_lr_ratio
    return low + 0.5 * (train.lr - low) * (1 + math.cos(math.pi * progress))


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: weight decay on matrices and conv kernels (dim >= 2) only; embeddings (a tied output head
    is the embedding), norms, biases, other vectors and parameters marked `_no_weight_decay` get none. Shared
    parameters appear once."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay, seen = [], [], set()
    for param in model.parameters():  # parameters() yields a tied tensor once
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        # SSM parameters (A_log, D, dt_bias) opt out as mamba_ssm's do; Mamba-1's A_log is a matrix.
        wants_decay = param.dim() >= 2 and id(param) not in embeddings and not getattr(param, "_no_weight_decay", False)
        (decay if wants_decay else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, train: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    return torch.optim.AdamW(parameter_groups(model, train.weight_decay), lr=train.lr, betas=tuple(train.betas),
                             fused=device.type in ("cuda", "cpu") or None)
