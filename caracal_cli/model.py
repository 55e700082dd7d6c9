"""The shared language-model shell: token embedding, pre-norm residual blocks (mixer + MLP), final norm and
tied output head. Which mixer sits in each block comes from the preset's pattern; the block never asks."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from caracal_cli.config import ModelConfig
from caracal_cli.loss import loss_path, next_token_loss
from caracal_cli.mixers import build_mixer


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def mlp_hidden(cfg: ModelConfig) -> int:
    """SwiGLU: 8/3·d rounded up to a multiple of 128 (Llama's rule; same parameters as a 4·d GELU MLP)."""
    if cfg.mlp_hidden is not None:
        return cfg.mlp_hidden
    if cfg.mlp == "gelu":
        return 4 * cfg.d_model
    return 128 * math.ceil(8 * cfg.d_model / 3 / 128)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hidden = mlp_hidden(cfg)
        self.gated = cfg.mlp == "swiglu"
        self.up = nn.Linear(cfg.d_model, 2 * hidden if self.gated else hidden, bias=False)
        self.down = nn.Linear(hidden, cfg.d_model, bias=False)
        self.down.residual_projection = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            gate, up = self.up(x).chunk(2, dim=-1)
            return self.down(F.silu(gate) * up)
        return self.down(F.gelu(self.up(x)))


class Block(nn.Module):
    def __init__(self, mixer: nn.Module, cfg: ModelConfig):
        super().__init__()
        self.norm1 = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mixer = mixer
        self.norm2 = RMSNorm(cfg.d_model, cfg.norm_eps) if cfg.mlp != "none" else None
        self.mlp = MLP(cfg) if cfg.mlp != "none" else None

    def forward(self, x: torch.Tensor, cache=None, step: bool = False) -> torch.Tensor:
        x = x + (self.mixer.step if step else self.mixer)(self.norm1(x), cache)
        if self.mlp is not None:
            x = x + self.mlp(self.norm2(x))
        return x


class LanguageModel(nn.Module):
    """forward(input_ids [B, L]) -> logits [B, L, vocab]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_embed = nn.Embedding(cfg.context, cfg.d_model) if cfg.pos_emb == "learned" else None
        self.blocks = nn.ModuleList(
            Block(build_mixer(cfg.mixers[letter], cfg, f"model.mixers.{letter}"), cfg)
            for letter in cfg.layer_kinds()
        )
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.checkpoint_blocks = False  # train.activation_checkpointing: block (see set_activation_checkpointing)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2 init: N(0, 0.02) for matrices and embeddings, residual output projections scaled by
        1/√(2·n_layer) so the residual stream's variance does not grow with depth. Mixers with their own
        init (SSMs) mark their parameters `_no_reinit`."""
        std = self.config.init_std
        for module in self.modules():
            if getattr(module, "_no_reinit", False):
                continue
            if isinstance(module, (nn.Linear, nn.Embedding)):
                scale = 1 / math.sqrt(2 * self.config.n_layer) if getattr(module, "residual_projection", False) else 1
                nn.init.normal_(module.weight, 0.0, std * scale)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)

    def forward(self, input_ids: torch.Tensor, caches: list | None = None, targets: torch.Tensor | None = None,
                reduction: str = "mean", last_only: bool = False) -> torch.Tensor:
        """Logits [B, L, vocab] ([B, 1, vocab] with `last_only`, all that a prefill needs); with `targets`
        [B, L], the next-token loss instead, computed without ever holding the whole logits (see
        `next_token_loss`). The loss goes through forward so that DDP and FSDP wrappers see the call."""
        x = self.embed(input_ids)
        if self.pos_embed is not None:
            start = 0 if caches is None else int(caches[0]["pos"])
            positions = torch.arange(start, start + input_ids.shape[1], device=input_ids.device)
            x = x + self.pos_embed(positions)
        recompute = self.checkpoint_blocks and caches is None and torch.is_grad_enabled()
        for i, block in enumerate(self.blocks):
            if recompute:  # keep only each block's input; its inside is recomputed in the backward
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x, None if caches is None else caches[i])
        h = self.norm(x)
        if targets is not None:
            return next_token_loss(h, self.head.weight, targets, reduction)
        return self.head(h[:, -1:] if last_only else h)

    def init_caches(self, batch: int, max_len: int, device=None, dtype=None) -> list[dict]:
        """One static cache per layer for up to `max_len` positions (tensors allocated here, once, the position
        a device tensor): pass it to forward() chunk after chunk, or to decode_step() token after token."""
        device = device or self.embed.weight.device
        dtype = dtype or self.embed.weight.dtype
        return [block.mixer.init_cache(batch, max_len, device, dtype) for block in self.blocks]

    def decode_step(self, input_ids: torch.Tensor, caches: list[dict]) -> torch.Tensor:
        """One token per sequence [B, 1] → next-token logits [B, vocab], at the caches' device-side position:
        static shapes and no host sync, so a CUDA graph can capture it (`generate.Decoder`). Call
        `prepare_step(caches, pos)` before each step."""
        x = self.embed(input_ids)
        if self.pos_embed is not None:
            x = x + self.pos_embed(caches[0]["pos"].view(1))
        for block, cache in zip(self.blocks, caches, strict=True):
            x = block(x, cache, step=True)
        return self.head(self.norm(x))[:, -1]

    def prepare_step(self, caches: list[dict], pos: int) -> None:
        """Host-side work of the mixers that have some before the step at position `pos` (MHF folds a finished
        block), run outside any CUDA graph."""
        for block, cache in zip(self.blocks, caches, strict=True):
            if hasattr(block.mixer, "prepare_step"):
                block.mixer.prepare_step(cache, pos)


def decode_period(model: LanguageModel) -> int:
    """Tokens after which every mixer's per-token decoding work repeats: 1, or MHF's decode_block (it folds its
    history once per block). A timing over whole periods is the steady-state cost per token."""
    return max((getattr(block.mixer, "decode_period", 1) for block in model.blocks), default=1)


def reset_caches(caches: list[dict]) -> None:
    """Empty the caches in place (position 0), keeping their storage: a captured step stays valid."""
    for cache in caches:
        for tensor in cache.values():
            tensor.zero_()


def set_activation_checkpointing(model: LanguageModel, mode: str) -> None:
    """train.activation_checkpointing: none | block (each block's activations recomputed in the backward:
    memory per block falls to its input, for about one more forward of compute)."""
    model.checkpoint_blocks = mode == "block"


def build_model(cfg: ModelConfig) -> LanguageModel:
    """Build the model a preset describes; build under ``torch.device('meta')`` for a free parameter count."""
    cfg.validate()
    return LanguageModel(cfg)


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Unique parameters (tied weights once) and the count without token/position embeddings."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    embedding = model.embed.weight.numel()
    if model.pos_embed is not None:
        embedding += model.pos_embed.weight.numel()
    return {"total": total, "non_embedding": total - embedding}


def flops_per_token(model: LanguageModel, seq_len: int) -> dict[str, float]:
    """Forward FLOPs per token at context `seq_len`: 2 per weight in every matmul (blocks and the output
    head), plus each mixer's own sequence cost (attention ∝ L, FFT ∝ log L). Training is 3× forward."""
    cfg = model.config
    weights = count_parameters(model)["non_embedding"] + cfg.vocab_size * cfg.d_model  # the head's matmul
    matmul = 2.0 * weights
    mixing = float(sum(block.mixer.extra_flops(seq_len) for block in model.blocks))
    forward = matmul + mixing
    return {"matmul": matmul, "mixing": mixing, "forward": forward, "train": 3 * forward}


def forced_path_errors(config: ModelConfig, device: torch.device, dtype: torch.dtype) -> dict[str, str]:
    """Pattern letter → why that mixer's forced kernels (`fft_impl: fast`, `module_impl: fast`) cannot run on
    `device` with `dtype` inputs at the context; empty where everything can. Asked of a model built on the
    meta device (no memory), before a run or a checkpoint's model is built."""
    with torch.device("meta"):
        model = build_model(config)
    errors = {}
    for letter, block in zip(config.layer_kinds(), model.blocks, strict=True):
        check = getattr(block.mixer, "forced_path_error", None)
        error = check(device, dtype, config.context) if check is not None else None
        if error is not None:
            errors.setdefault(letter, error)
    return errors


def kernel_paths(model: LanguageModel, device: torch.device) -> dict[str, str]:
    """Which implementation each mixer kind, and the loss, runs on `device` under bf16 autocast (for `caracal
    info`, the first log line and `caracal speed`'s report)."""
    paths = {}
    for block in model.blocks:
        mixer = block.mixer
        name = type(mixer).__name__ + (f"(window={mixer.window})" if getattr(mixer, "window", None) else "")
        paths[name] = mixer.path(device) if hasattr(mixer, "path") else "pytorch"
    fused = loss_path(device, torch.bfloat16) == "triton"
    paths["loss"] = "triton softmax-gradient" if fused else "pytorch"
    return paths
