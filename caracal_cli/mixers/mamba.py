"""Mamba (Gu & Dao 2023, arXiv 2312.00752): the selective state-space mixer, with mamba_ssm's parameters.

    x, z = in_proj(u)                                      each [B, L, E], E = expand·d
    x    = SiLU(CausalDepthwiseConv1d(x))                  k = d_conv
    Δ, B, C = x_proj(x)                                    [B, L, R], [B, L, N], [B, L, N]
    Δ    = softplus(dt_proj(Δ))                            (dt_proj's bias is the Δ offset)
    h_t  = exp(Δ_t A) ⊙ h_{t−1} + Δ_t B_t x_t              h: [B, E, N], A = −exp(A_log) < 0
    y_t  = C_t · h_t + D ⊙ x_t;  out = out_proj(y ⊙ SiLU(z))

Parameter names, shapes and initialisation are those of `mamba_ssm.modules.mamba_simple.Mamba`, so a
state_dict moves between this module and the library's either way. Two paths, chosen in one place
(`choose_path`) and reported by `path()`: the library's CUDA kernels (`impl: library`, or `auto` on CUDA when
mamba_ssm imports) run on this module's own parameters; the reference path (CPU, or any GPU without
mamba_ssm) is plain PyTorch: a scan in chunks of 64 steps inside an autograd Function that keeps the state
only where each chunk begins and recomputes the rest in backward, like the CUDA kernel, so memory stays
O(B·L·E + B·(L/64)·E·N) rather than O(B·L·E·N).
Cached decoding runs the reference path for a prefill or a chunk (the conv state and h carry over from chunk to
chunk); a one-token `step`, static in shape so that a CUDA graph can capture it, runs the reference recurrence or,
on the library path, mamba_ssm's fused `selective_state_update`, as its own `step` does.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from caracal_cli.config import ConfigError, ModelConfig, require_positive
from caracal_cli.mixers.precision import autocast_off

IMPLS = ("auto", "library", "reference")


# --- which implementation runs: the one place that imports mamba_ssm ------------------------------------
@dataclass(frozen=True)
class MambaBackend:
    mamba: type | None  # mamba_ssm.modules.mamba_simple.Mamba, or None when mamba_ssm cannot be imported
    mamba2: type | None
    causal_conv1d: bool  # whether the library found causal-conv1d (its fused paths need it)
    reason: str  # "mamba_ssm 2.3.2.post1", or why it is unavailable
    state_update: Callable | None = None  # its fused one-token step (Triton): selective_state_update

    @property
    def available(self) -> bool:
        return self.mamba is not None


@functools.cache
def mamba_backend() -> MambaBackend:
    """Import mamba_ssm once and record what happened. Any failure counts: the package imports its compiled
    CUDA extension and Triton unconditionally, so on a CPU machine the import itself fails."""
    try:
        import mamba_ssm
        from mamba_ssm.modules import mamba2, mamba_simple
        from mamba_ssm.ops.triton.selective_state_update import selective_state_update
    except Exception as err:  # ImportError, or OSError/RuntimeError from the compiled extension
        return MambaBackend(None, None, False, f"mamba_ssm unavailable: {type(err).__name__}: {err}")
    return MambaBackend(mamba_simple.Mamba, mamba2.Mamba2, mamba2.causal_conv1d_fn is not None,
                        f"mamba_ssm {getattr(mamba_ssm, '__version__', '?')}", selective_state_update)


@torch.library.custom_op("caracal::selective_state_update", mutates_args=("state",),
                         schema="(Tensor(a!) state, Tensor x, Tensor dt, Tensor A, Tensor B, Tensor C, Tensor D, "
                                "Tensor? z, Tensor dt_bias) -> Tensor")
def selective_state_update(state, x, dt, A, B, C, D, z, dt_bias):
    """mamba_ssm's fused one-token step (Δ = softplus(dt + dt_bias)), updating `state` in place, as one op that
    torch.compile does not look into: tracing the library's Python (shape checks, a device context) and its
    Triton launch took the compiled Mamba step past minutes. With a [B, H, P, N] state (Mamba-2), dt [B, H] and
    A, D, dt_bias [H] are per-head scalars, broadcast over headdim here with stride 0, as the kernel expects
    (it then reads them once per head)."""
    if state.dim() == 4:
        Bsz, H, P, N = state.shape
        dt, A = dt[..., None].expand(Bsz, H, P), A[:, None, None].expand(H, P, N)
        D, dt_bias = D[:, None].expand(H, P), dt_bias[:, None].expand(H, P)
    return mamba_backend().state_update(state, x, dt, A, B, C, D, z=z, dt_bias=dt_bias, dt_softplus=True)


@selective_state_update.register_fake
def _(state, x, dt, A, B, C, D, z, dt_bias):
    return torch.empty_like(x)


def choose_path(impl: str, device: torch.device) -> str:
    """'library' or 'reference' for config `impl` on `device`. `library` never falls back silently."""
    if impl == "reference" or (impl == "auto" and device.type != "cuda"):
        return "reference"  # without importing mamba_ssm at all
    backend = mamba_backend()
    if impl == "library":
        if not backend.available:
            raise RuntimeError(f"impl: library needs mamba_ssm, but {backend.reason}; use impl: auto or reference")
        if device.type != "cuda":
            raise RuntimeError(f"impl: library runs mamba_ssm's CUDA kernels; this input is on {device.type}")
        return "library"
    return "library" if backend.available and device.type == "cuda" else "reference"


def validate_impl(impl: str, where: str) -> None:
    if impl not in IMPLS:
        raise ConfigError(f"{where}.impl must be one of {', '.join(IMPLS)}; got {impl!r}")
    if impl == "library" and not mamba_backend().available:
        raise ConfigError(f"{where}.impl is library, but {mamba_backend().reason} "
                          "(install mamba-ssm on a CUDA machine, or use impl: auto)")


def describe_path(impl: str, device: torch.device, library_detail: str, reference_detail: str) -> str:
    """What `caracal info` prints: the path for this device and why."""
    backend = mamba_backend()
    if impl == "library" and device.type != "cuda":
        return f"{backend.reason} (impl: library; a {device.type} input raises)"
    if choose_path(impl, device) == "library":
        return f"{backend.reason} {library_detail}; decoding: selective_state_update step, reference prefill"
    why = ("impl: reference" if impl == "reference" else
           backend.reason if not backend.available else "mamba_ssm runs on CUDA only")
    return f"reference {reference_detail} ({why})"


def attach_library(mixer: nn.Module, build) -> None:
    """Build the library module at construction where mamba_ssm imports (on the meta device: no memory, no
    random draws), so torch.compile never traces its constructor (Dynamo fails inside Mamba2.__init__)."""
    if mixer.cfg.impl != "reference" and mamba_backend().available:
        with torch.random.fork_rng(devices=[]):
            mixer.__dict__["_library"] = build()


def run_library(mixer: nn.Module, build, x: torch.Tensor) -> torch.Tensor:
    """Run mamba_ssm's module on `mixer`'s own Parameter objects (the same dotted names), so both paths train
    and save the same weights. The library module is built once on the meta device and is not a child of
    `mixer` (it would duplicate the state_dict); its parameters are rebound on every call, cheaply, so
    `.to()`, `load_state_dict` and optimizers only ever see the mixer's own."""
    lib = mixer.__dict__.get("_library")
    if lib is None:
        lib = build()
        mixer.__dict__["_library"] = lib
    for name, param in mixer.named_parameters():
        owner, _, leaf = name.rpartition(".")
        setattr(lib.get_submodule(owner), leaf, param)
    missing = {n for n, p in lib.named_parameters() if p.is_meta}
    if missing:
        raise RuntimeError(f"mamba_ssm's {type(lib).__name__} has parameters this mixer lacks: {sorted(missing)}")
    return lib(x)


# --- pieces shared with Mamba-2 ---------------------------------------------------------------------------
def inverse_softplus_dt(n: int, dt_min: float, dt_max: float, floor: float, device=None) -> torch.Tensor:
    """mamba_ssm's Δ offset: Δ log-uniform in [dt_min, dt_max] (clamped at `floor`), stored as softplus⁻¹(Δ)."""
    dt = torch.exp(torch.rand(n, device=device) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
    dt = dt.clamp(min=floor)
    return dt + torch.log(-torch.expm1(-dt))


def depthwise_conv_layer(channels: int, kernel: int, bias: bool) -> nn.Conv1d:
    """The library's conv1d, padding included (its forward relies on it; ours pads explicitly)."""
    return nn.Conv1d(channels, channels, kernel, groups=channels, padding=kernel - 1, bias=bias)


def causal_depthwise_conv(x: torch.Tensor, conv: nn.Conv1d, state: torch.Tensor | None = None) -> torch.Tensor:
    """Depthwise causal conv of x [B, L, C] → [B, L, C]. `state` ([B, k−1, C], the inputs before x) is
    used and updated in place during cached decoding."""
    k = conv.kernel_size[0]
    h = x.transpose(1, 2)  # [B, C, L]
    if state is None:
        h = F.pad(h, (k - 1, 0))
    else:
        h = torch.cat([state.transpose(1, 2).to(h.dtype), h], dim=2)
        state.copy_(h[:, :, h.shape[2] - (k - 1):].transpose(1, 2))
    return F.conv1d(h, conv.weight, conv.bias, groups=h.shape[1]).transpose(1, 2)


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The scan runs in float32 (float64 for float64 inputs, so tests can be exact) whatever autocast says."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class SelectiveScan(torch.autograd.Function):
    """y_t = C_t · h_t with h_t = exp(Δ_t A) ⊙ h_{t−1} + Δ_t x_t B_t (Mamba's S6 recurrence, no D, no gate).

    x, Δ: [B, L, E]; A: [E, N]; B, C: [B, L, N]; h0: [B, E, N] or None → y [B, L, E], h_last [B, E, N].
    Chunks of T = 64 steps: each chunk's a, b and states ([T, B, E, N]) are built, used and dropped, so
    nothing of size B·L·E·N exists for long L; inside a chunk only `h_t = a_t·h_{t−1} + b_t` is sequential,
    one fused op per step on [B, E, N], and the rest is batched over the chunk (few large ops: a CPU's
    thread pool and a GPU's launches both prefer that). Forward saves the state where each chunk begins;
    backward walks the chunks in reverse like mamba_ssm's kernel: recompute the chunk's states, run the
    adjoint g_t = ∂ℓ/∂h_t = C_t ⊗ ∂ℓ/∂y_t + a_{t+1} ⊙ g_{t+1} back through it, then batch the gradients."""

    chunk = 64

    @staticmethod
    def _chunk(x, delta, A, B, t0, t1):
        """a_t = exp(Δ_t A) and b_t = Δ_t x_t B_t for t0 ≤ t < t1, time-major: [T, B, E, N] each."""
        d, dx = delta[:, t0:t1].transpose(0, 1), (delta[:, t0:t1] * x[:, t0:t1]).transpose(0, 1)
        return torch.exp(d.unsqueeze(-1) * A), dx.unsqueeze(-1) * B[:, t0:t1].transpose(0, 1).unsqueeze(2)

    @staticmethod
    def _states(a, b, h):
        """[T + 1, B, E, N]: h, then h_t = a_t·h_{t−1} + b_t for each step of the chunk."""
        hs = torch.empty((a.shape[0] + 1, *h.shape), dtype=h.dtype, device=h.device)
        hs[0] = h
        for i in range(a.shape[0]):
            torch.addcmul(b[i], a[i], hs[i], out=hs[i + 1])
        return hs

    @staticmethod
    def forward(ctx, x, delta, A, B, C, h0):
        Bsz, L, E = x.shape
        T = SelectiveScan.chunk
        h = x.new_zeros(Bsz, E, A.shape[1]) if h0 is None else h0
        checkpoints, ys = [], []
        for t0 in range(0, L, T):
            checkpoints.append(h)
            hs = SelectiveScan._states(*SelectiveScan._chunk(x, delta, A, B, t0, t0 + T), h)
            ys.append(torch.einsum("tben,btn->bte", hs[1:], C[:, t0:t0 + T]))
            h = hs[-1].clone()  # not a view: it would keep the chunk's states alive
        ctx.save_for_backward(x, delta, A, B, C, torch.stack(checkpoints))
        ctx.chunk, ctx.has_h0 = T, h0 is not None
        return torch.cat(ys, 1), h

    @staticmethod
    @once_differentiable
    def backward(ctx, gy, gh_last):
        x, delta, A, B, C, checkpoints = ctx.saved_tensors
        L, T = x.shape[1], ctx.chunk
        g = torch.zeros_like(checkpoints[0]) if gh_last is None else gh_last  # ∂ℓ/∂h_{t1−1} from the future
        g_x, g_delta, g_B, g_C = [], [], [], []
        g_A = torch.zeros_like(A)
        for c in reversed(range(len(checkpoints))):
            t0, t1 = c * T, min(L, (c + 1) * T)
            a, b = SelectiveScan._chunk(x, delta, A, B, t0, t1)
            hs = SelectiveScan._states(a, b, checkpoints[c])
            gh = gy[:, t0:t1].transpose(0, 1).unsqueeze(-1) * C[:, t0:t1].transpose(0, 1).unsqueeze(2)
            gs = torch.empty_like(gh)  # g_t for the chunk
            for i in reversed(range(t1 - t0)):
                torch.add(gh[i], g, out=gs[i])
                g = gs[i] * a[i]  # carried back to h_{t−1}
            g_logit = gs * hs[:-1] * a  # ∂ℓ/∂(Δ_t A)
            d, xc = delta[:, t0:t1], x[:, t0:t1]
            gB = torch.einsum("tben,btn->bte", gs, B[:, t0:t1])  # ∂ℓ/∂(Δ_t x_t)
            g_x.append(gB * d)
            g_delta.append(gB * xc + torch.einsum("tben,en->bte", g_logit, A))
            g_A += torch.einsum("tben,bte->en", g_logit, d)
            g_B.append(torch.einsum("tben,bte->btn", gs, d * xc))
            g_C.append(torch.einsum("tben,bte->btn", hs[1:], gy[:, t0:t1]))
        cat = lambda parts: torch.cat(parts[::-1], 1)  # noqa: E731
        return cat(g_x), cat(g_delta), g_A, cat(g_B), cat(g_C), g if ctx.has_h0 else None


def selective_scan(x, delta, A, B, C, h0=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference scan (see `SelectiveScan`); inputs in the work dtype."""
    return SelectiveScan.apply(x, delta, A, B, C, h0)


# --- the mixer --------------------------------------------------------------------------------------------
class Mamba(nn.Module):
    """Mamba mixer: [B, L, D] → [B, L, D], causal. Keys and defaults as mamba_ssm's `Mamba`."""

    @dataclass
    class Config:
        kind: str = "mamba"
        d_state: int = 16
        d_conv: int = 4
        expand: int = 2
        dt_rank: int | None = None  # None: ⌈d_model / 16⌉ (the library's "auto")
        dt_min: float = 0.001
        dt_max: float = 0.1
        dt_init_floor: float = 1e-4
        conv_bias: bool = True
        bias: bool = False
        impl: str = "auto"  # auto (mamba_ssm on CUDA when it imports) | library | reference

        def validate(self, model: ModelConfig, where: str) -> None:
            require_positive(self, where, ("d_state", "d_conv", "expand"))
            if self.dt_rank is not None and self.dt_rank < 1:
                raise ConfigError(f"{where}.dt_rank must be >= 1 (or null for auto), got {self.dt_rank}")
            if not 0 < self.dt_min <= self.dt_max:
                raise ConfigError(f"{where}: need 0 < dt_min <= dt_max, got {self.dt_min}, {self.dt_max}")
            validate_impl(self.impl, where)

    def __init__(self, cfg: Config, model: ModelConfig):
        super().__init__()
        self.cfg = cfg
        d = model.d_model
        E, N = cfg.expand * d, cfg.d_state
        self.dt_rank = cfg.dt_rank or math.ceil(d / 16)
        self.in_proj = nn.Linear(d, 2 * E, bias=cfg.bias)
        self.conv1d = depthwise_conv_layer(E, cfg.d_conv, cfg.conv_bias)
        self.x_proj = nn.Linear(E, self.dt_rank + 2 * N, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, E, bias=True)
        std = self.dt_rank ** -0.5  # "preserve variance at initialisation", as the library
        with torch.no_grad():
            nn.init.uniform_(self.dt_proj.weight, -std, std)
            self.dt_proj.bias.copy_(inverse_softplus_dt(E, cfg.dt_min, cfg.dt_max, cfg.dt_init_floor))
        self.dt_proj._no_reinit = True  # the GPT-2 init would zero the Δ offset
        self.dt_proj.bias._no_reinit = True  # (mamba_ssm's own marker, for its init code)
        A = torch.arange(1, N + 1, dtype=torch.float32).repeat(E, 1)  # S4D-real: A_n = −n
        self.A_log = nn.Parameter(torch.log(A))
        self.D = nn.Parameter(torch.ones(E))
        self.A_log._no_weight_decay = self.D._no_weight_decay = True
        self.out_proj = nn.Linear(E, d, bias=cfg.bias)
        self.out_proj.residual_projection = True
        attach_library(self, self._build_library)

    def path(self, device: torch.device) -> str:
        backend = mamba_backend()
        fused = "fused mamba_inner_fn" if backend.causal_conv1d else "selective_scan_fn"
        return describe_path(self.cfg.impl, device, f"Mamba ({fused})", "PyTorch chunked scan")

    def _build_library(self) -> nn.Module:
        c = self.cfg
        return mamba_backend().mamba(
            self.in_proj.in_features, d_state=c.d_state, d_conv=c.d_conv, expand=c.expand, dt_rank=self.dt_rank,
            dt_min=c.dt_min, dt_max=c.dt_max, dt_init_floor=c.dt_init_floor, conv_bias=c.conv_bias, bias=c.bias,
            device="meta")

    def forward(self, x: torch.Tensor, cache: dict | None = None) -> torch.Tensor:
        library = choose_path(self.cfg.impl, x.device) == "library"
        if cache is None and library:
            return run_library(self, self._build_library, x)
        T, N = x.shape[1], self.cfg.d_state
        if library and T == 1:
            return self._library_step(x, cache)
        u, z = self.in_proj(x).chunk(2, dim=-1)  # [B, T, E] each
        u = F.silu(causal_depthwise_conv(u, self.conv1d, None if cache is None else cache["conv"]))
        dt, B, C = self.x_proj(u).split([self.dt_rank, N, N], dim=-1)
        dt = F.linear(dt, self.dt_proj.weight)  # the bias is added in the work dtype, as the library does
        work = work_dtype(u.dtype)
        with autocast_off(x.device):
            u, z, B, C = u.to(work), z.to(work), B.to(work), C.to(work)
            delta = F.softplus(dt.to(work) + self.dt_proj.bias.to(work))
            A = -torch.exp(self.A_log.to(work))  # [E, N]
            if cache is not None and T == 1:  # the decoding step
                h = torch.exp(delta[:, 0, :, None] * A) * cache["ssm"] + (delta * u)[:, 0, :, None] * B[:, 0, None]
                y = torch.einsum("ben,bn->be", h, C[:, 0]).unsqueeze(1)
                cache["ssm"].copy_(h)
            else:
                y, h_last = selective_scan(u, delta, A, B, C, None if cache is None else cache["ssm"])
                if cache is not None:
                    cache["ssm"].copy_(h_last)
            y = (y + u * self.D.to(work)) * F.silu(z)
        if cache is not None:
            cache["pos"].add_(T)
        return self.out_proj(y.to(x.dtype))

    def step(self, x: torch.Tensor, cache: dict) -> torch.Tensor:
        """One decoding token [B, 1, D]: the recurrence's step, static shapes and no host sync (a CUDA graph can
        hold it)."""
        return self.forward(x, cache)

    def _library_step(self, x: torch.Tensor, cache: dict) -> torch.Tensor:
        """The step with mamba_ssm's fused kernel for the state update, read-out, D skip and gate (float32
        inside, on this mixer's own parameters)."""
        N = self.cfg.d_state
        u, z = self.in_proj(x[:, 0]).chunk(2, dim=-1)  # [B, E] each
        u = F.silu(causal_depthwise_conv(u.unsqueeze(1), self.conv1d, cache["conv"]))[:, 0]
        dt, B, C = self.x_proj(u).split([self.dt_rank, N, N], dim=-1)
        y = selective_state_update(cache["ssm"], u, F.linear(dt, self.dt_proj.weight), -torch.exp(self.A_log.float()),
                                   B, C, self.D.float(), z, self.dt_proj.bias.float())
        cache["pos"].add_(1)
        return self.out_proj(y.unsqueeze(1).to(x.dtype))

    def init_cache(self, batch: int, max_len: int, device=None, dtype=None) -> dict:
        E = self.D.shape[0]
        dtype = dtype or torch.float32
        return {"pos": torch.zeros((), dtype=torch.long, device=device),
                "conv": torch.zeros(batch, self.cfg.d_conv - 1, E, device=device, dtype=dtype),
                "ssm": torch.zeros(batch, E, self.cfg.d_state, device=device, dtype=work_dtype(dtype))}

    def extra_flops(self, seq_len: int) -> float:
        """Forward FLOPs per token of the scan beyond the weight matmuls: per channel and state, Δ·A and its
        exp, Δ·x·B (2), the update a·h + b (2) and the read-out C·h (2): about 9·E·N."""
        return 9.0 * self.A_log.numel()
