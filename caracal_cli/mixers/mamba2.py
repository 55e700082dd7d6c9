"""Mamba-2 (Dao & Gu 2024, "Transformers are SSMs", arXiv 2405.21060): the SSD mixer, with mamba_ssm's parameters.

    z, xBC, Δ = in_proj(u)                                 [B, L, E], [B, L, E + 2GN], [B, L, H]
    x, B, C   = SiLU(CausalDepthwiseConv1d(xBC))           x as H heads of P = headdim; B, C in G groups
    Δ   = softplus(Δ + dt_bias);  per head, a scalar decay a_t = exp(Δ_t A_h):
    S_t = a_t S_{t−1} + Δ_t x_t ⊗ B_t                      S: [P, N] per head
    y_t = S_t C_t + D_h x_t;  out = out_proj(RMSNorm_G(y ⊙ SiLU(z)))   (gated RMSNorm per group)

Parameter names, shapes and initialisation are those of `mamba_ssm.modules.mamba2.Mamba2` (A ~ U[1, 16],
D = 1 per head, Δ offset log-uniform in [dt_min, dt_max]; the library's defaults for everything this config
does not name: no D per channel, rmsnorm on, norm after the gate, no Δ limit). Paths as in `mamba.py`: the
library's Triton SSD kernels on CUDA (`use_mem_eff_path` only with causal-conv1d, which it needs), or the
reference SSD chunked form in PyTorch: quadratic attention-like products inside chunks of `reference_chunk`,
the recurrence only across chunks. Cached decoding runs the reference path for a prefill or a chunk; a one-token
step runs the reference recurrence or, on the library path, mamba_ssm's fused `selective_state_update`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from caracal_cli.config import ConfigError, ModelConfig, require_positive
from caracal_cli.mixers.precision import autocast_off
from caracal_cli.mixers.mamba import (
    attach_library,
    causal_depthwise_conv,
    choose_path,
    depthwise_conv_layer,
    describe_path,
    inverse_softplus_dt,
    mamba_backend,
    run_library,
    selective_state_update,
    validate_impl,
    work_dtype,
)


def ssd_chunked_scan(x, dt, A, B, C, chunk: int, s0=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The SSD recurrence above without D, in chunks. x: [b, L, H, P]; dt: [b, L, H] (after softplus);
    A: [H] (< 0); B, C: [b, L, G, N] (head h reads group h // (H/G)); s0: [b, H, P, N] or None.
    Returns y [b, L, H, P] and the final state [b, H, P, N].

    Inside a chunk, y_t = Σ_{s≤t} (C_t·B_s) exp(cum_t − cum_s) Δ_s x_s, with cum the in-chunk cumulative Δ·A;
    the differences are masked to −∞ above the diagonal before exp, so nothing overflows. Each chunk's end
    state is carried to the next by a short loop over chunks, and read out by exp(cum_t) C_t."""
    b, L, H, P = x.shape
    G, N = B.shape[2:]
    T = min(chunk, L)
    nc = -(-L // T)
    if nc * T != L:  # pad the end with Δ = 0: no decay, no input, so the state carries over unchanged
        pad = nc * T - L
        x, B, C = (F.pad(t, [0, 0, 0, 0, 0, pad]) for t in (x, B, C))
        dt = F.pad(dt, [0, 0, 0, pad])
    x = x.reshape(b, nc, T, G, H // G, P)
    dt = dt.reshape(b, nc, T, G, H // G)
    B, C = B.reshape(b, nc, T, G, N), C.reshape(b, nc, T, G, N)
    cum = torch.cumsum(dt * A.reshape(G, H // G), dim=2)  # [b, c, T, G, h]

    causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril().reshape(T, T, 1, 1)
    decay = torch.exp((cum.unsqueeze(3) - cum.unsqueeze(2)).masked_fill(~causal, -math.inf))  # [b,c,t,s,G,h]
    scores = torch.einsum("bctgn,bcsgn->bctsg", C, B).unsqueeze(-1) * decay * dt.unsqueeze(2)
    y = torch.einsum("bctsgh,bcsghp->bctghp", scores, x)

    to_end = (torch.exp(cum[:, :, -1:] - cum) * dt).unsqueeze(-1) * x  # [b, c, s, G, h, P]
    chunk_states = torch.einsum("bcsghp,bcsgn->bcghpn", to_end, B)  # each chunk's end state from zero
    chunk_decay = torch.exp(cum[:, :, -1])[..., None, None]  # [b, c, G, h, 1, 1]
    state = x.new_zeros(b, G, H // G, P, N) if s0 is None else s0.reshape(b, G, H // G, P, N)
    entering = []
    for c in range(nc):
        entering.append(state)
        state = chunk_decay[:, c] * state + chunk_states[:, c]
    entering = torch.stack(entering, dim=1)  # [b, c, G, h, P, N]
    y = y + torch.einsum("bctgn,bcghpn->bctghp", C, entering) * torch.exp(cum).unsqueeze(-1)
    return y.reshape(b, nc * T, H, P)[:, :L], state.reshape(b, H, P, N)


class GatedRMSNorm(nn.Module):
    """mamba_ssm's RMSNormGated with norm_before_gate=False: RMSNorm per group of (y ⊙ SiLU(z)), times weight."""

    def __init__(self, dim: int, group_size: int, eps: float = 1e-5):
        super().__init__()
        self.group_size, self.eps = group_size, eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        work = work_dtype(y.dtype)
        h = y.to(work) * F.silu(z.to(work))
        g = h.reshape(*h.shape[:-1], -1, self.group_size)
        g = g * torch.rsqrt(g.square().mean(-1, keepdim=True) + self.eps)
        return g.reshape(h.shape) * self.weight.to(work)


class Mamba2(nn.Module):
    """Mamba-2 mixer: [B, L, D] → [B, L, D], causal. Keys and defaults as mamba_ssm's `Mamba2`."""

    @dataclass
    class Config:
        kind: str = "mamba2"
        d_state: int = 128
        d_conv: int = 4
        expand: int = 2
        headdim: int = 64
        ngroups: int = 1
        A_init_range: tuple[float, float] = (1.0, 16.0)
        dt_min: float = 0.001
        dt_max: float = 0.1
        dt_init_floor: float = 1e-4
        conv_bias: bool = True
        bias: bool = False
        chunk_size: int = 256  # the library's SSD chunk (its Triton kernels are tuned for it)
        reference_chunk: int = 64  # the reference's chunk: same result, about 2x faster than 256 on a CPU
        impl: str = "auto"  # auto (mamba_ssm on CUDA when it imports) | library | reference

        def validate(self, model: ModelConfig, where: str) -> None:
            require_positive(self, where, ("d_state", "d_conv", "expand", "headdim", "ngroups", "chunk_size",
                                           "reference_chunk"))
            inner = self.expand * model.d_model
            if inner % self.headdim:
                raise ConfigError(f"{where}.headdim={self.headdim} does not divide expand·d_model={inner}")
            if (inner // self.headdim) % self.ngroups:
                raise ConfigError(f"{where}.ngroups={self.ngroups} does not divide the {inner // self.headdim} heads")
            lo, hi = self.A_init_range
            if not 0 < lo <= hi:
                raise ConfigError(f"{where}.A_init_range must satisfy 0 < low <= high, got {self.A_init_range}")
            if not 0 < self.dt_min <= self.dt_max:
                raise ConfigError(f"{where}: need 0 < dt_min <= dt_max, got {self.dt_min}, {self.dt_max}")
            validate_impl(self.impl, where)

    def __init__(self, cfg: Config, model: ModelConfig):
        super().__init__()
        self.cfg = cfg
        d, E, N, G = model.d_model, cfg.expand * model.d_model, cfg.d_state, cfg.ngroups
        self.nheads = E // cfg.headdim
        self.in_proj = nn.Linear(d, 2 * E + 2 * G * N + self.nheads, bias=cfg.bias)  # [z, x, B, C, Δ]
        self.conv1d = depthwise_conv_layer(E + 2 * G * N, cfg.d_conv, cfg.conv_bias)
        self.dt_bias = nn.Parameter(inverse_softplus_dt(self.nheads, cfg.dt_min, cfg.dt_max, cfg.dt_init_floor))
        self.A_log = nn.Parameter(torch.log(torch.empty(self.nheads).uniform_(*cfg.A_init_range)))
        self.D = nn.Parameter(torch.ones(self.nheads))
        self.dt_bias._no_weight_decay = self.A_log._no_weight_decay = self.D._no_weight_decay = True
        self.norm = GatedRMSNorm(E, group_size=E // G)
        self.out_proj = nn.Linear(E, d, bias=cfg.bias)
        self.out_proj.residual_projection = True
        attach_library(self, self._build_library)

    def path(self, device: torch.device) -> str:
        backend = mamba_backend()
        kernel = "mem-eff fused path" if backend.causal_conv1d else "use_mem_eff_path=False, F.conv1d"
        return describe_path(self.cfg.impl, device, f"Mamba2 (Triton SSD, {kernel})",
                             f"PyTorch SSD chunks of {self.cfg.reference_chunk}")

    def _build_library(self) -> nn.Module:
        c = self.cfg
        return mamba_backend().mamba2(
            self.in_proj.in_features, d_state=c.d_state, d_conv=c.d_conv, expand=c.expand, headdim=c.headdim,
            ngroups=c.ngroups, A_init_range=tuple(c.A_init_range), dt_min=c.dt_min, dt_max=c.dt_max,
            dt_init_floor=c.dt_init_floor, bias=c.bias, conv_bias=c.conv_bias, chunk_size=c.chunk_size,
            use_mem_eff_path=mamba_backend().causal_conv1d, device="meta")

    def forward(self, x: torch.Tensor, cache: dict | None = None) -> torch.Tensor:
        library = choose_path(self.cfg.impl, x.device) == "library"
        if cache is None and library:
            return run_library(self, self._build_library, x)
        Bsz, T, _ = x.shape
        if library and T == 1:
            return self._library_step(x, cache)
        H, P, N, G = self.nheads, self.cfg.headdim, self.cfg.d_state, self.cfg.ngroups
        E = H * P
        z, xBC, dt = self.in_proj(x).split([E, E + 2 * G * N, H], dim=-1)
        xBC = F.silu(causal_depthwise_conv(xBC, self.conv1d, None if cache is None else cache["conv"]))
        work = work_dtype(xBC.dtype)
        with autocast_off(x.device):
            xs, B, C = xBC.to(work).split([E, G * N, G * N], dim=-1)
            xs, B, C = xs.reshape(Bsz, T, H, P), B.reshape(Bsz, T, G, N), C.reshape(Bsz, T, G, N)
            dt = F.softplus(dt.to(work) + self.dt_bias.to(work))  # [B, T, H]
            A = -torch.exp(self.A_log.to(work))
            if cache is not None and T == 1:  # the decoding step
                group = torch.arange(H, device=x.device) // (H // G)
                Bh, Ch = B[:, 0, group], C[:, 0, group]  # [B, H, N]
                s = torch.exp(dt[:, 0] * A)[..., None, None] * cache["ssm"] + \
                    (dt[:, 0, :, None] * xs[:, 0]).unsqueeze(-1) * Bh.unsqueeze(2)
                y = torch.einsum("bhpn,bhn->bhp", s, Ch).unsqueeze(1)
                cache["ssm"].copy_(s)
            else:
                y, s = ssd_chunked_scan(xs, dt, A, B, C, self.cfg.reference_chunk,
                                        None if cache is None else cache["ssm"])
                if cache is not None:
                    cache["ssm"].copy_(s)
            y = (y + self.D.to(work)[:, None] * xs).reshape(Bsz, T, E)
            y = self.norm(y, z)
        if cache is not None:
            cache["pos"].add_(T)
        return self.out_proj(y.to(x.dtype))

    def step(self, x: torch.Tensor, cache: dict) -> torch.Tensor:
        """One decoding token [B, 1, D]: one recurrence step, static shapes and no host sync (a CUDA graph can
        hold it)."""
        return self.forward(x, cache)

    def _library_step(self, x: torch.Tensor, cache: dict) -> torch.Tensor:
        """The step with mamba_ssm's fused `selective_state_update` (per-head scalars, broadcast over headdim
        inside the op, as its own Mamba2.step passes them), then the gated norm."""
        Bsz = x.shape[0]
        H, P, N, G = self.nheads, self.cfg.headdim, self.cfg.d_state, self.cfg.ngroups
        E = H * P
        z, xBC, dt = self.in_proj(x[:, 0]).split([E, E + 2 * G * N, H], dim=-1)
        xBC = F.silu(causal_depthwise_conv(xBC.unsqueeze(1), self.conv1d, cache["conv"]))[:, 0]
        xs, B, C = xBC.split([E, G * N, G * N], dim=-1)
        y = selective_state_update(cache["ssm"], xs.reshape(Bsz, H, P), dt, -torch.exp(self.A_log.float()),
                                   B.reshape(Bsz, G, N), C.reshape(Bsz, G, N), self.D, None, self.dt_bias)
        with autocast_off(x.device):
            y = self.norm(y.reshape(Bsz, 1, E), z.unsqueeze(1))
        cache["pos"].add_(1)
        return self.out_proj(y.to(x.dtype))

    def init_cache(self, batch: int, max_len: int, device=None, dtype=None) -> dict:
        dtype = dtype or torch.float32
        channels = self.conv1d.in_channels
        return {"pos": torch.zeros((), dtype=torch.long, device=device),
                "conv": torch.zeros(batch, self.cfg.d_conv - 1, channels, device=device, dtype=dtype),
                "ssm": torch.zeros(batch, self.nheads, self.cfg.headdim, self.cfg.d_state, device=device,
                                   dtype=work_dtype(dtype))}

    def extra_flops(self, seq_len: int) -> float:
        """Forward FLOPs per token of the chunked SSD beyond the weight matmuls, T = min(chunk_size, L):
        C·Bᵀ and the weighted sum over x inside the chunk (causal half: (T+1)·(G·N + E)), the chunk states and
        their read-out (2·E·N each)."""
        T = min(self.cfg.chunk_size, seq_len)
        E, N, G = self.nheads * self.cfg.headdim, self.cfg.d_state, self.cfg.ngroups
        return (T + 1) * (G * N + E) + 4.0 * E * N
