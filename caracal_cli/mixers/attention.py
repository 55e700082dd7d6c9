"""Causal multi-head attention, full (Llama: Touvron et al. 2023, with RoPE: Su et al. 2021) or sliding-window
(SWA, Beltagy et al. 2020; Caracal inserts one with window 256 after every two MHF layers).

Paths: full attention uses SDPA with `is_causal` (flash attention on CUDA). A sliding window uses
flex_attention with a block-sparse mask on CUDA, and SDPA with an explicit band mask elsewhere: the same
function, which tests compare with a naive masked softmax.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from caracal_cli.config import ConfigError, ModelConfig


def rope_tables(length: int, d_head: int, theta: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape [length, d_head] for rotate-half RoPE."""
    inv_freq = 1.0 / theta ** (torch.arange(0, d_head, 2, device=device, dtype=torch.float32) / d_head)
    angles = torch.outer(torch.arange(length, device=device, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (i, i + d/2) of x [B, H, L, d_head] by position-dependent angles (cos/sin: [L, d_head])."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    work = torch.promote_types(x.dtype, torch.float32)  # bf16 rotates in float32, float64 stays float64
    return (x.to(work) * cos + rotated.to(work) * sin).to(x.dtype)


class Rotary(nn.Module):
    """RoPE for q and k with its cos/sin tables kept as float32 buffers (not saved in checkpoints), computed once
    for `context` positions and grown when a longer sequence comes. Under torch.compile the tables are inputs
    to the rotation: computed inside the graph, Inductor fused their pow/cos/sin into the rotation's kernels,
    per element, forward and backward (2 ms of llama-tiny's 22.5 ms training step on an H200)."""

    def __init__(self, d_head: int, theta: float, context: int):
        super().__init__()
        self.d_head, self.theta = d_head, theta
        self._build(context, None)

    def _build(self, length: int, device) -> None:
        cos, sin = rope_tables(length, self.d_head, self.theta, device)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def reserve(self, length: int, device=None) -> None:
        """Tables for at least `length` positions, in float32 or float64 (a 16-bit cast of the model rebuilds
        them): done before a decoding step is captured, which cannot grow them."""
        if length > self.cos.shape[0] or self.cos.dtype not in (torch.float32, torch.float64):
            self._build(max(length, 2 * self.cos.shape[0]), device if device is not None else self.cos.device)

    def forward(self, q: torch.Tensor, k: torch.Tensor,
                start: int | torch.Tensor = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate q, k [B, H, L, dh] at positions start…start+L−1; a tensor `start` (a decoding step's position,
        L = 1) indexes the tables on the device, with no host sync."""
        if isinstance(start, torch.Tensor):
            cos, sin = self.cos[start.view(1)], self.sin[start.view(1)]
        else:
            self.reserve(start + q.shape[2], q.device)
            cos, sin = self.cos[start:start + q.shape[2]], self.sin[start:start + q.shape[2]]
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin)


def band_mask(q_len: int, kv_len: int, window: int | None, device=None) -> torch.Tensor:
    """Boolean [q_len, kv_len] mask, True where query i (the last q_len of kv_len positions) may see key j:
    j ≤ i and i − j < window."""
    q_pos = torch.arange(kv_len - q_len, kv_len, device=device).unsqueeze(1)
    k_pos = torch.arange(kv_len, device=device).unsqueeze(0)
    mask = k_pos <= q_pos
    if window is not None:
        mask &= q_pos - k_pos < window
    return mask


# Memory estimates trace the model on the meta device, where the CPU's band-masked SDPA would save [L, L]
# weights per head (192 GiB of a 214 GiB estimate at small, L = 32,768) that CUDA's fused kernels never hold.
_FUSED_ON_META = contextvars.ContextVar("fused_attention_on_meta", default=False)


@contextlib.contextmanager
def fused_attention_on_meta():
    """Within it, attention traced on the meta device saves what flash and flex_attention keep for backward."""
    token = _FUSED_ON_META.set(True)
    try:
        yield
    finally:
        _FUSED_ON_META.reset(token)


class _FusedAttentionSaves(torch.autograd.Function):
    """A shape stand-in (meta device only): the output, and what the fused kernels save for backward: q, k, v,
    the output and a float32 log-sum-exp per query row."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = torch.empty_like(q)
        ctx.save_for_backward(q, k, v, out, q.new_empty(q.shape[:-1], dtype=torch.float32))
        return out

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("a memory estimate's stand-in has no backward")


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


@functools.lru_cache(maxsize=32)
def _sliding_block_mask(length: int, window: int, device: str):
    """flex_attention's block-sparse form of the causal band (k ≤ q, q − k < window) over `length` positions,
    from block arithmetic. create_block_mask evaluates the mask at every (q, k) pair, [L, L] in memory: at
    L = 131,072 its booleans and int64 intermediates exceeded an 80 GB GPU, where this needs [L/128, L/128]."""
    from torch.nn.attention.flex_attention import BlockMask

    blocks = torch.arange(-(-length // FLEX_BLOCK), device=device)
    apart = FLEX_BLOCK * (blocks[:, None] - blocks[None, :])  # query block i, key block j: q − k spans apart ± 127
    lowest, highest = apart - (FLEX_BLOCK - 1), apart + (FLEX_BLOCK - 1)
    full = (lowest >= 0) & (highest < window)  # every pair visible: no mask evaluated
    partial = (highest >= 0) & (lowest < window) & ~full  # some pairs visible: the mask decides per element

    def listed(chosen: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per query block, how many key blocks are chosen and their indices, ascending (padding after)."""
        order = torch.sort((~chosen).to(torch.int8), dim=1, stable=True).indices
        return chosen.sum(1).to(torch.int32)[None, None], order.to(torch.int32)[None, None]

    def sliding(b, h, q, k):
        return (k <= q) & (q - k < window)

    return BlockMask.from_kv_blocks(*listed(partial), *listed(full), BLOCK_SIZE=FLEX_BLOCK, mask_mod=sliding,
                                    seq_lengths=(length, length))


FLEX_BLOCK = 128  # flex_attention's block size: lengths that are multiples of it get the block-sparse kernel


def attention_path(device: torch.device, window: int | None, length: int | None = None) -> str:
    """The kernel used for this device, window and length: the one place that chooses it. A sliding window
    on CUDA runs flex_attention at whole multiples of its block (training contexts); other lengths, such as
    lm-eval's requests of every size, take SDPA with a band mask rather than a compilation per length."""
    if window is None:
        return "sdpa-flash" if device.type == "cuda" else "sdpa"
    if device.type == "cuda" and (length is None or length % FLEX_BLOCK == 0):
        return "flex_attention"
    return "sdpa+band-mask"


class Attention(nn.Module):
    """Causal attention over [B, L, D]; `window` None is full attention, an int a sliding window."""

    @dataclass
    class Config:
        kind: str = "attention"
        window: int | None = None

        def validate(self, model: ModelConfig, where: str) -> None:
            if self.window is not None and self.window < 1:
                raise ConfigError(f"{where}.window must be >= 1 (or null for full attention), got {self.window}")

    def __init__(self, cfg: Config, model: ModelConfig):
        super().__init__()
        self.window = cfg.window
        self.n_head, self.d_head = model.n_head, model.d_head
        self.rotary = Rotary(self.d_head, model.rope_theta, model.context) if model.pos_emb == "rope" else None
        self.qkv = nn.Linear(model.d_model, 3 * model.d_model, bias=False)
        self.out = nn.Linear(model.d_model, model.d_model, bias=False)
        self.out.residual_projection = True

    def path(self, device: torch.device) -> str:
        path = attention_path(device, self.window)
        return path + f" (L % {FLEX_BLOCK} == 0; sdpa+band-mask otherwise)" if path == "flex_attention" else path

    def forward(self, x: torch.Tensor, cache: dict | None = None) -> torch.Tensor:
        B, L, D = x.shape
        if cache is not None and L == 1:
            return self.step(x, cache)
        q, k, v = self.qkv(x).view(B, L, 3, self.n_head, self.d_head).permute(2, 0, 3, 1, 4)  # 3×[B, H, L, dh]
        start = 0 if cache is None else int(cache["pos"])
        if self.rotary is not None:
            q, k = self.rotary(q, k, start)
        y = self._attend(q, k, v) if start == 0 else self._attend_cached(q, k, v, cache, start)
        if cache is not None:
            self._remember(k, v, cache, start)
        return self.out(y.transpose(1, 2).reshape(B, L, D))

    def _attend(self, q, k, v) -> torch.Tensor:
        """The whole-sequence path (training, and a prefill from position 0)."""
        L = q.shape[2]
        if q.device.type == "meta" and _FUSED_ON_META.get():
            return _FusedAttentionSaves.apply(q, k, v)
        if self.window is None or self.window >= L:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        if attention_path(q.device, self.window, L) == "flex_attention":
            return _compiled_flex()(q, k, v, block_mask=_sliding_block_mask(L, self.window, str(q.device)))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=band_mask(L, L, self.window, q.device))

    # --- cached decoding: a static KV cache; for a window, a ring of the last `window` keys and values ------
    def init_cache(self, batch: int, max_len: int, device=None, dtype=None) -> dict:
        """Preallocated for `max_len` positions (the ring for min(max_len, window)); "pos" is a device tensor,
        so one captured `step` serves every position."""
        size = max_len if self.window is None else min(max_len, self.window)
        shape = (batch, self.n_head, size, self.d_head)
        if self.rotary is not None:
            self.rotary.reserve(max_len, device)
        zeros = lambda: torch.zeros(shape, device=device, dtype=dtype)  # noqa: E731
        return {"pos": torch.zeros((), dtype=torch.long, device=device), "k": zeros(), "v": zeros()}

    def step(self, x: torch.Tensor, cache: dict) -> torch.Tensor:
        """One token x [B, 1, D] at position cache["pos"]: written at slot pos (mod the ring), attended over every
        slot with the unfilled ones masked. Static shapes and no host sync, so a CUDA graph can hold it; a full
        ring holds exactly the keys the window lets the token see, in an order attention does not depend on."""
        B, _, D = x.shape
        pos, size = cache["pos"], cache["k"].shape[2]
        q, k, v = self.qkv(x).view(B, 1, 3, self.n_head, self.d_head).permute(2, 0, 3, 1, 4)
        if self.rotary is not None:
            q, k = self.rotary(q, k, pos)
        slot = (pos % size).view(1)
        cache["k"].index_copy_(2, slot, k.to(cache["k"].dtype))
        cache["v"].index_copy_(2, slot, v.to(cache["v"].dtype))
        filled = (torch.arange(size, device=x.device) <= pos).view(1, size)  # [1, size]: one query
        y = F.scaled_dot_product_attention(q, cache["k"].to(q.dtype), cache["v"].to(q.dtype), attn_mask=filled)
        cache["pos"].add_(1)
        return self.out(y.transpose(1, 2).reshape(B, 1, D))

    def _attend_cached(self, q, k, v, cache: dict, start: int) -> torch.Tensor:
        """A chunk after position 0: the keys the cache holds (in time order) followed by the chunk's own."""
        T, size = q.shape[2], cache["k"].shape[2]
        held = min(start, size)
        order = torch.arange(start - held, start, device=q.device) % size
        keys = torch.cat([cache["k"][:, :, order].to(k.dtype), k], dim=2)
        values = torch.cat([cache["v"][:, :, order].to(v.dtype), v], dim=2)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=band_mask(T, held + T, self.window, q.device))

    def _remember(self, k, v, cache: dict, start: int) -> None:
        T, size = k.shape[2], cache["k"].shape[2]
        if self.window is None and start + T > size:
            raise ValueError(f"attention cache holds {size} positions; asked for {start + T}")
        keep = slice(max(0, T - size), T)  # a chunk longer than the ring keeps only its last `size`
        slots = torch.arange(start, start + T, device=k.device)[keep] % size
        cache["k"][:, :, slots] = k[:, :, keep].to(cache["k"].dtype)
        cache["v"][:, :, slots] = v[:, :, keep].to(cache["v"].dtype)
        cache["pos"].fill_(start + T)

    def extra_flops(self, seq_len: int) -> float:
        """Forward FLOPs per token of QKᵀ and AV: 4·d per visible key, averaged over positions (a causal
        mask halves full attention, as llm.c counts)."""
        w = seq_len if self.window is None else min(self.window, seq_len)
        # mean over t of min(t+1, w)
        visible = (w * (w + 1) / 2 + (seq_len - w) * w) / seq_len
        return 4 * self.n_head * self.d_head * visible
