"""Spectral-Window Hybrid (SWH; arXiv 2601.01313): a global spectral branch beside a local attention branch.

    s   = RMSNorm(k ∗ proj(x))       k_c(t) = exp(−|α_c|·t)·cos(ω_c·t): a damped oscillator per channel,
                                     applied as a causal FFT convolution (pad to 2L, float32) — O(L log L)
    a   = ChunkedSWA(RoPE(q), RoPE(k), v)   chunks of W tokens; a chunk attends causally to itself and to the
                                     whole previous chunk (W+1 … 2W keys), RoPE at global positions
    out = out_proj(s + a)

Built like the public code (VladimerKhasia/SWH, swh.py: α, ω ~ N(0, 1), chunks of 32, float32 FFT), with two
changes so a model fits Llama's parameter count: both branches have width `width` (≤ d_model), and the
attention's own output projection is folded into out_proj (two linear maps in a row are one linear map).
Cached decoding is exact and static: the kernel is a damped complex exponential, so the spectral branch is a
first-order recurrence whose state is one complex number per channel; the local branch keeps a ring of the last
2W keys and values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from caracal_cli.config import ConfigError, ModelConfig, require_positive
from caracal_cli.mixers.attention import Rotary
from caracal_cli.mixers.fftconv import path_label
from caracal_cli.mixers.mhf import causal_fft_conv
from caracal_cli.mixers.precision import autocast_off


def oscillator_kernel(decay: torch.Tensor, freq: torch.Tensor, length: int, dtype: torch.dtype) -> torch.Tensor:
    """k[t, c] = exp(−|decay_c|·t)·cos(freq_c·t) for t < length: [length, C]."""
    t = torch.arange(length, device=decay.device, dtype=dtype).unsqueeze(1)
    return torch.exp(-decay.to(dtype).abs() * t) * torch.cos(freq.to(dtype) * t)


def block_causal_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, chunk: int) -> torch.Tensor:
    """[…, len(q_pos), len(k_pos)] booleans (positions may carry leading batch axes): key j is visible to
    query i when j ≤ i and j lies in i's chunk or the one before (j ≥ 0 marks a real key)."""
    i, j = q_pos.unsqueeze(-1), k_pos.unsqueeze(-2)
    return (j <= i) & (j >= 0) & (j // chunk >= i // chunk - 1)


def chunked_window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk: int) -> torch.Tensor:
    """Block-causal sliding-window attention in O(L·2W): q, k, v [B, H, L, dh] → [B, H, L, dh].

    The sequence is cut into chunks of W; chunk c's queries see chunk c−1's keys and chunk c's (causally).
    Chunk 0's "previous chunk" is zero padding, masked out; the end is zero-padded to a whole chunk (those
    keys come after every real query, so the causal mask hides them)."""
    B, H, L, dh = q.shape
    W = chunk
    nc = -(-L // W)
    if nc * W != L:
        q, k, v = (F.pad(t, [0, 0, 0, nc * W - L]) for t in (q, k, v))
    q, k, v = (t.reshape(B, H, nc, W, dh) for t in (q, k, v))
    with_prev = lambda t: torch.cat([F.pad(t, [0, 0, 0, 0, 1, 0])[:, :, :-1], t], dim=3)  # noqa: E731
    keys, values = with_prev(k), with_prev(v)  # [B, H, nc, 2W, dh]
    pos = torch.arange(nc * W, device=q.device).reshape(nc, W)
    key_pos = torch.cat([pos - W, pos], dim=1)  # chunk 0's padding gets negative positions
    mask = block_causal_mask(pos, key_pos, W)  # [nc, W, 2W], in one op (a loop over chunks was L/W launches)
    y = F.scaled_dot_product_attention(  # chunks folded into the head axis: 4-D inputs for every backend
        q.reshape(B, H * nc, W, dh), keys.reshape(B, H * nc, 2 * W, dh), values.reshape(B, H * nc, 2 * W, dh),
        attn_mask=mask.repeat(H, 1, 1))
    return y.reshape(B, H, nc * W, dh)[:, :, :L]


class SWH(nn.Module):
    """Spectral-Window Hybrid mixer: [B, L, D] → [B, L, D], causal."""

    @dataclass
    class Config:
        kind: str = "swh"
        width: int | None = None  # branch width; None: d_model (the public code). Presets narrow it.
        heads: int | None = None  # local-branch heads; None: model.n_head. Head size = width / heads.
        chunk: int = 32  # W: the public code's chunk; each query sees W+1 … 2W keys
        rope: bool = True  # RoPE in the local branch (SWH always uses it; false is an ablation)

        def validate(self, model: ModelConfig, where: str) -> None:
            require_positive(self, where, ("width", "heads", "chunk"))
            width, heads = self.width or model.d_model, self.heads or model.n_head
            if width % heads:
                raise ConfigError(f"{where}.width={width} is not divisible by {where}.heads={heads}")
            if self.rope and (width // heads) % 2:
                raise ConfigError(f"{where}: RoPE needs an even head size, got width/heads = {width // heads}")

    def __init__(self, cfg: Config, model: ModelConfig):
        super().__init__()
        self.cfg = cfg
        d, w = model.d_model, cfg.width or model.d_model
        self.n_head = cfg.heads or model.n_head
        self.d_head = w // self.n_head
        self.rotary = Rotary(self.d_head, model.rope_theta, model.context) if cfg.rope else None
        self.proj = nn.Linear(d, w, bias=False)  # spectral branch input
        self.decay = nn.Parameter(torch.randn(w))  # α, ω ~ N(0, 1) as the public code; plain parameters, so
        self.freq = nn.Parameter(torch.randn(w))  # the model's GPT-2 init leaves them alone
        self.norm = nn.RMSNorm(w, eps=model.norm_eps)
        self.qkv = nn.Linear(d, 3 * w, bias=False)
        self.out_proj = nn.Linear(w, d, bias=False)
        self.out_proj.residual_projection = True

    def path(self, device: torch.device) -> str:
        return f"{path_label(device)} + chunked SWA (sdpa + block-causal mask, chunk {self.cfg.chunk})"

    def forward(self, x: torch.Tensor, cache: dict | None = None) -> torch.Tensor:
        B, L, _ = x.shape
        stepping = cache is not None and L == 1  # the position stays on the device: no host sync
        start = cache["pos"] if stepping else 0 if cache is None else int(cache["pos"])
        s = self._spectral(self.proj(x), None if cache is None else cache["state"])
        s = self.norm(s.to(torch.promote_types(s.dtype, torch.float32)))
        q, k, v = self.qkv(x).view(B, L, 3, self.n_head, self.d_head).permute(2, 0, 3, 1, 4)  # 3×[B, H, L, dh]
        if self.rotary is not None:
            q, k = self.rotary(q, k, start)
        if stepping:
            a = self._attend_step(q, k, v, cache)
        else:
            a = chunked_window_attention(q, k, v, self.cfg.chunk) if start == 0 else \
                self._attend_cached(q, k, v, cache, start)
            if cache is not None:
                self._remember(k, v, cache, start)
        return self.out_proj(s + a.transpose(1, 2).reshape(B, L, -1))

    def step(self, x: torch.Tensor, cache: dict) -> torch.Tensor:
        """One decoding token [B, 1, D]: static shapes and no host sync, so a CUDA graph can hold it."""
        return self.forward(x, cache)

    def _spectral(self, u: torch.Tensor, state: torch.Tensor | None) -> torch.Tensor:
        """k ∗ u for u [B, L, w]. The kernel is Re(λ^t) with λ_c = exp(−|α_c| + iω_c), so the convolution is the
        real part of h_t = λ·h_{t−1} + u_t: a cache carries h (`state`: [B, w, 2], its real and imaginary parts)
        from chunk to chunk, exactly, in O(w) per token, and the chunk itself is convolved by FFT."""
        work = torch.float64 if u.dtype == torch.float64 else torch.float32
        L = u.shape[1]
        y = u if L == 1 else causal_fft_conv(u, oscillator_kernel(self.decay, self.freq, L, work).unsqueeze(0))
        if state is None:
            return y
        with autocast_off(u.device):
            if L == 1:  # a decoding step, in real arithmetic: no complex tensor for a compiler or a CUDA graph
                r = torch.exp(-self.decay.to(work).abs())
                lam_re, lam_im = r * torch.cos(self.freq.to(work)), r * torch.sin(self.freq.to(work))
                h_re, h_im = state[..., 0], state[..., 1]
                new_re = lam_re * h_re - lam_im * h_im + u[:, 0].to(work)  # h = λ·h + u
                new_im = lam_re * h_im + lam_im * h_re
                state.copy_(torch.stack([new_re, new_im], dim=-1))
                return new_re.unsqueeze(1).to(u.dtype)  # y = Re(h)
            h = torch.view_as_complex(state)
            log_lam = torch.complex(-self.decay.to(work).abs(), self.freq.to(work))  # [w]
            powers = torch.exp(torch.arange(L + 1, device=u.device, dtype=work).unsqueeze(1) * log_lam)  # λ^0…λ^L
            y = y.to(work) + (powers[1:] * h.unsqueeze(1)).real  # what the past adds: Re(λ^{i+1} h)
            h.copy_(powers[L] * h + (powers[:L].flip(0) * u.to(work)).sum(1))
        return y.to(u.dtype)

    # --- cached decoding: the spectral state, and the local branch's ring of the last 2W keys and values -----
    def init_cache(self, batch: int, max_len: int, device=None, dtype=None) -> dict:
        """Static: O(1) in `max_len` (the spectral recurrence's state, a ring of 2W keys and values)."""
        ring = (batch, self.n_head, 2 * self.cfg.chunk, self.d_head)
        work = torch.float64 if dtype == torch.float64 else torch.float32
        if self.rotary is not None:
            self.rotary.reserve(max_len, device)
        return {"pos": torch.zeros((), dtype=torch.long, device=device),
                "state": torch.zeros(batch, self.proj.out_features, 2, device=device, dtype=work),  # Re, Im of h
                "k": torch.zeros(ring, device=device, dtype=dtype), "v": torch.zeros(ring, device=device, dtype=dtype)}

    def _attend_step(self, q, k, v, cache: dict) -> torch.Tensor:
        """One token at the device-side position: written into its ring slot, then attending to the slots whose
        positions (recomputed from pos; negative: never written) the block-causal mask allows."""
        pos, size = cache["pos"], cache["k"].shape[2]
        cache["k"].index_copy_(2, (pos % size).view(1), k.to(cache["k"].dtype))
        cache["v"].index_copy_(2, (pos % size).view(1), v.to(cache["v"].dtype))
        held = pos - (pos - torch.arange(size, device=q.device)) % size  # the position each slot holds
        mask = block_causal_mask(pos.view(1), held, self.cfg.chunk)
        cache["pos"].add_(1)
        return F.scaled_dot_product_attention(q, cache["k"].to(q.dtype), cache["v"].to(q.dtype), attn_mask=mask)

    def _attend_cached(self, q, k, v, cache: dict, start: int) -> torch.Tensor:
        T, size = q.shape[2], cache["k"].shape[2]
        held = min(start, size)
        order = torch.arange(start - held, start, device=q.device)
        keys = torch.cat([cache["k"][:, :, order % size].to(k.dtype), k], dim=2)
        values = torch.cat([cache["v"][:, :, order % size].to(v.dtype), v], dim=2)
        q_pos = torch.arange(start, start + T, device=q.device)
        mask = block_causal_mask(q_pos, torch.cat([order, q_pos]), self.cfg.chunk)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)

    def _remember(self, k, v, cache: dict, start: int) -> None:
        T, size = k.shape[2], cache["k"].shape[2]
        keep = slice(max(0, T - size), T)  # a chunk longer than the ring keeps only its last 2W
        slots = torch.arange(start, start + T, device=k.device)[keep] % size
        cache["k"][:, :, slots] = k[:, :, keep].to(cache["k"].dtype)
        cache["v"][:, :, slots] = v[:, :, keep].to(cache["v"].dtype)
        cache["pos"].fill_(start + T)

    def extra_flops(self, seq_len: int) -> float:
        """Forward FLOPs per token beyond the weight matmuls: the input's rFFT and the inverse (2L points,
        2.5·n·log₂n each) and the complex product per channel — the kernel's FFT is shared by the batch and not
        counted — plus 4·width per visible key in the local branch (W+1 … 2W keys, fewer at the start)."""
        n, L, W = 2 * seq_len, seq_len, self.cfg.chunk
        w = self.proj.out_features
        spectral = w * (2 * 2.5 * n * math.log2(n) + 6 * (n // 2 + 1)) / L
        visible = sum(min(t + 1, t % W + 1 + W) for t in range(L)) / L
        return spectral + 4.0 * w * visible
