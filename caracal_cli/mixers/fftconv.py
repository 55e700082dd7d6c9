"""Fast causal FFT convolution for MHF on CUDA: y[:, t] = Σ_{j≤t} v[:, j] ⊙ g[:, t−j] for [B, L, D] inputs.

The transform is a two-level ("four-step") FFT (Bailey, "FFTs in external or hierarchical memory", 1990)
whose two levels are small dense DFT matrices applied as matrix products on the tensor cores, the idea of
Monarch / FlashFFTConv (Fu et al., arXiv 2311.05908), written here for two data-dependent streams in three
Triton kernels (and a small fourth that sums the forward's first outputs directly). With the sequence padded
to Lp = P·T and position t = n1 + T·n2 (n1 < T, n2 < P):

    analysis   Z[k2, n1] = tw[k2, n1] · Σ_{n2} A[k2, n2] x[n1 + T·n2]        A: [P, P], one per column (n1, c)
    spectral   W = conj(tw) ⊙ F^H ((F Z_v) ⊙ (F Z_g))                        F: [T, T] along n1, per (k2, c)
    synthesis  y[n1 + T·n2] = √Lp · Re Σ_{k2} conj(A[k2, n2]) W[k2, n1]

A is an *odd-frequency* DFT of size 2P: frequencies (k + ½)/2Lp of the zero-padded signal (length 2Lp, so
the circular convolution is a linear one and nothing from the future wraps in). A real signal's odd-frequency
spectrum pairs bin m with bin 2Lp−1−m as complex conjugates and has no self-paired bin (no DC, no Nyquist),
so exactly the k2 < P half is kept: Lp complex numbers per channel, one per token, and the real part of the
half-sum is the inverse. Spectrum order is scrambled (bin k2 + 2P·k1), which the pointwise product ignores.

Backward: dv_j = Σ_{t≥j} dy_t g_{t−j} is the causal convolution of the reversed dy with g, read reversed; so
the same three stages run with `flip` on the load of dy and the store of dv, dg, and reuse the forward's
spectra of v and g (or, where `keep` says so, their transforms along n1, which the forward's spectral stage
writes beside its output).

Precision (bf16/fp16 inputs): spectra are stored in fp16 under float32 scales, so nothing overflows: after
analysis one per sample and channel (√P·max_t |x|, a bound known before the transform), after the spectral
stage one per (k2, channel) (each product of two transforms divided by its own maximum, since the product of
two spectra scaled by bounds can fall below fp16's normal range); every tensor-core operand is fp16 with one
scale per channel; products accumulate in fp32. A float64
emulation of these roundings gives a relative error of ≈1.8e-3 against float64, about the bf16 output's own
rounding. That error is spread evenly over positions, so its share of y_t falls as 1/√t; the forward's first
EXACT_HEAD outputs are therefore summed directly (a small kernel), which keeps every position under 1e-2 (at
L = 16384: ≈8e-3 at t = 32, 5e-3 at t = 100). MHF's mean scale (y_t / (t+1)) weights the first positions
most: its relative error is 3.4e-3 at L = 16384 (bf16 spectra without the direct head: 1e-1).
float32 and float64 inputs run the exact torch.fft reference: the kernels' float32 mode (float32 spectra,
3×tf32 products, ≈3e-7) is kept for testing the kernels' arithmetic, but its tiles need more shared memory
than an H100 has at P = 128.

`fft_conv_path` is the one place that picks the implementation; `TorchStages` is the same algorithm in plain
PyTorch (any device and dtype, exact in float64), which the CPU tests compare with the torch.fft reference.
The Triton stages run inside a custom operator (`caracal::monarch_conv`, with its backward), so torch.compile
keeps the convolution inside the model's graph; the PyTorch stages run in `_MonarchConv`, the same composition
as an autograd.Function.
"""

from __future__ import annotations

import functools
import importlib.util
import math

import torch

TRITON_AVAILABLE = importlib.util.find_spec("triton") is not None
MIN_PADDED_LEN = 256  # P = T = 16: tl.dot needs every dimension ≥ 16
MAX_ONCHIP_T = 128  # the spectral kernel holds [T, T] DFT matrices on chip: T ≤ 128, so L ≤ 16384
MAX_ONCHIP_LEN = MAX_ONCHIP_T * MAX_ONCHIP_T  # P = T = 128
# Longer sequences keep P = 128 and let T grow: analysis and synthesis stay Triton kernels (T is only an index
# there) and the spectral stage along n1 runs in torch.fft between them (`TritonStages._spectral_torch`), from
# and to the kernels' fp16 storage. Opt-in (fft_impl: fast) until measured against torch.fft on a GPU; `auto`
# runs torch.fft past MAX_ONCHIP_LEN.
MAX_LEN = 262144
# The forward's first outputs, sums of few terms, are recomputed directly: the transforms' rounding error is
# spread evenly over positions, so it weighs most where y_t is smallest.
EXACT_HEAD = 32

# (P, T) for each padded length: the analysis/synthesis level costs ~4P FLOPs per element and each
# spectral transform ~8T, so P ≥ T.
# At 1024, (64, 16) beats (32, 32) on an H200: 2.38 against 3.73 ms forward+backward (d=1024, 65536 tokens).
SPLITS = {256: (16, 16), 512: (32, 16), 1024: (64, 16), 2048: (64, 32), 4096: (64, 64), 8192: (128, 64),
          16384: (128, 128),
          **{n: (MAX_ONCHIP_T, n // MAX_ONCHIP_T) for n in (1 << k for k in range(15, MAX_LEN.bit_length()))}}
# TritonStages' tile settings, and per padded length those that beat them in H200 benches (forward+backward
# ms, default → tuned): 2048 3.30 → 2.33 (at T = 32, 64-channel spectral tiles fill Hopper's M = 64 rows and
# 128-byte lines); 8192 3.19 → 2.78 and 16384 3.94 → 3.49 (A on the left, 8 rows per program; 32-channel
# tiles with the data on the left, the earlier choice: 3.00 and 3.78).
# `left`: the left operand of the analysis and synthesis products, whose rows are the tensor cores' M: the data
# (LEFT_DATA, M = block_c) or the DFT matrix A (LEFT_A, M = P; Hopper's wide instruction needs M ≥ 64).
LEFT_DATA, LEFT_A = 1, 2
# `keep`: what the forward keeps for the backward: the analysis spectra Z_v, Z_g (KEEP_SPECTRA; the backward's
# spectral stage transforms them along n1 again) or their transforms F Z_v, F Z_g, which the forward's spectral
# stage computes anyway (KEEP_TRANSFORMS: the forward writes them, the backward skips two of its five DFTs).
# On an H200 at 16384 (spectral stages, forward + backward): 0.65 + 1.12 ms keeping the spectra, 0.75 + 0.94
# keeping the transforms; the whole convolution 3.03 → 2.97 ms in one sweep. At 512 (T = 16) it cost 0.13 ms.
KEEP_SPECTRA, KEEP_TRANSFORMS = 1, 2
DEFAULT_TILES = dict(block_c=64, block_c2=32, rows_per_prog=4, stages=3, left=LEFT_DATA, keep=KEEP_SPECTRA)
TUNED_TILES = {2048: dict(block_c2=64), 8192: dict(left=LEFT_A, rows_per_prog=8),
               16384: dict(left=LEFT_A, rows_per_prog=8, keep=KEEP_TRANSFORMS),
               # longer: P = 128 as at 16384, whose analysis and synthesis tiles they take (not tuned yet)
               **{n: dict(left=LEFT_A, rows_per_prog=8) for n in SPLITS if n > MAX_ONCHIP_LEN}}


def fft_conv_path(device: torch.device, dtype: torch.dtype, length: int | None = None, impl: str = "auto") -> str:
    """'triton' or 'torch': the implementation `causal_fft_conv` uses. The one place that decides.

    impl 'torch' forces the reference; 'fast' requires the fast path (raises where it cannot run)."""
    if device.type == "meta":  # shape tracing (memory estimates) follows the reference path and never raises
        return "torch"
    reason = None
    if device.type != "cuda":
        reason = "not a CUDA device"
    elif not TRITON_AVAILABLE:
        reason = "triton is not installed"
    elif dtype not in (torch.bfloat16, torch.float16):
        reason = f"{dtype} inputs (the exact reference runs them)"
    elif length is not None and length > MAX_LEN:
        reason = f"L={length} > {MAX_LEN}"
    elif length is not None and length > MAX_ONCHIP_LEN and impl == "auto":
        reason = f"L={length} > {MAX_ONCHIP_LEN} (the kernels with torch.fft's spectral stage: fft_impl=fast)"
    if impl == "torch":
        return "torch"
    if reason is not None:
        if impl == "fast":
            raise RuntimeError(f"fft_impl=fast cannot run here: {reason}")
        return "torch"
    return "triton"


def path_label(device: torch.device, impl: str = "auto") -> str:
    """What a mixer's FFT convolution runs on `device` under autocast (bf16), for reports."""
    if fft_conv_path(device, torch.bfloat16, None, "auto" if impl == "fast" else impl) == "triton":
        if impl == "fast":  # ("fast" raises in forward, not here, where the kernels cannot run)
            return f"triton fft-conv (L ≤ {MAX_ONCHIP_LEN}; to {MAX_LEN} with a torch.fft spectral stage)"
        return f"triton fft-conv (L ≤ {MAX_ONCHIP_LEN}; torch.fft beyond)"
    return "torch.fft (float32)"


def padded_length(length: int) -> int:
    """The transform's length: the next power of two, at least MIN_PADDED_LEN."""
    return max(MIN_PADDED_LEN, 1 << max(0, length - 1).bit_length())


def split_for(length: int, p: int = 0) -> tuple[int, int]:
    """(P, T) for a sequence of `length`: SPLITS's choice for its padded length, or P = p where p > 0
    (benchmarks try other splits: both factors powers of two in 16…128)."""
    padded = padded_length(length)
    if padded not in SPLITS:
        raise ValueError(f"no fast FFT split for L={length} (padded {padded}); at most {MAX_LEN}")
    if not p:
        return SPLITS[padded]
    T = padded // p
    if p * T != padded or not all(16 <= f <= 128 and f & (f - 1) == 0 for f in (p, T)):
        raise ValueError(f"no split P={p} for L={length} (padded {padded}): P and T must be powers of two in 16…128")
    return p, T


@functools.lru_cache(maxsize=64)
def dft_tables(P: int, T: int, device: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Complex A [P(k2), P(n2)] (÷√P), tw [P(k2), T(n1)], F [T(k1), T(n1)] (÷√T), built in float64."""
    N = 2 * P * T
    k2 = torch.arange(P, dtype=torch.float64).unsqueeze(1) + 0.5  # odd frequencies
    n2 = torch.arange(P, dtype=torch.float64).unsqueeze(0)
    n1 = torch.arange(T, dtype=torch.float64).unsqueeze(0)
    k1 = torch.arange(T, dtype=torch.float64).unsqueeze(1)
    A = torch.polar(torch.full((P, P), P ** -0.5, dtype=torch.float64), -2 * math.pi * n2 * k2 / (2 * P))
    tw = torch.polar(torch.ones(P, T, dtype=torch.float64), -2 * math.pi * n1 * k2 / N)
    F = torch.polar(torch.full((T, T), T ** -0.5, dtype=torch.float64), -2 * math.pi * k1 * n1 / T)
    return tuple(m.to(device=device, dtype=dtype) for m in (A, tw, F))


class TorchStages:
    """The three stages in plain PyTorch on complex tensors Z [S·B, P, T, D] (the algorithm's definition)."""

    batch_dim = 0

    def __init__(self, length: int, device, real_dtype: torch.dtype, split_p: int = 0):
        self.L = length
        self.P, self.T = split_for(length, split_p)
        cdtype = torch.complex128 if real_dtype == torch.float64 else torch.complex64
        self.A, self.tw, self.F = dft_tables(self.P, self.T, str(device), cdtype)

    def analysis(self, xs: list[torch.Tensor], flip: bool) -> torch.Tensor:
        P, T, L = self.P, self.T, self.L
        x = torch.cat(xs, 0)
        x = x.flip(1) if flip else x
        x = torch.nn.functional.pad(x, (0, 0, 0, P * T - L)).to(self.A.dtype)
        X = x.view(x.shape[0], P, T, x.shape[2])  # [B, n2, n1, D]
        return torch.einsum("kn,bnmd->bkmd", self.A, X) * self.tw[:, :, None]

    def spectral(self, za: torch.Tensor, zb: torch.Tensor, zc: torch.Tensor | None = None) -> torch.Tensor:
        xa = torch.einsum("jn,bknd->bkjd", self.F, za)
        outs = [torch.einsum("jn,bkjd->bknd", self.F.conj(), xa * torch.einsum("jn,bknd->bkjd", self.F, z))
                for z in ([zb] if zc is None else [zb, zc])]
        return torch.cat(outs, 0) * self.tw.conj()[:, :, None]

    def synthesis(self, w: torch.Tensor, flip: bool, dtype: torch.dtype) -> torch.Tensor:
        P, T = self.P, self.T
        y = torch.einsum("kn,bkmd->bnmd", self.A.conj(), w).real * math.sqrt(P * T)
        y = y.reshape(w.shape[0], P * T, w.shape[-1])[:, : self.L]
        return (y.flip(1) if flip else y).to(dtype)


class _MonarchConv(torch.autograd.Function):
    """Forward: y = synthesis(spectral(Z_v, Z_g)); backward reuses Z_v, Z_g (see the module docstring)."""

    @staticmethod
    def forward(ctx, v, g, stages):
        B = v.shape[0]
        z = stages.analysis([v, g], flip=False)  # [.., 2B, P, T, D]: v's spectra, then g's
        zv, zg = z.narrow(stages.batch_dim, 0, B), z.narrow(stages.batch_dim, B, B)
        ctx.save_for_backward(z)
        ctx.stages, ctx.dtypes = stages, (v.dtype, g.dtype)
        return stages.synthesis(stages.spectral(zv, zg), flip=False, dtype=v.dtype)

    @staticmethod
    def backward(ctx, dy):
        (z,) = ctx.saved_tensors
        stages, bd = ctx.stages, ctx.stages.batch_dim
        B = dy.shape[0]
        zv, zg = z.narrow(bd, 0, B), z.narrow(bd, B, B)
        zd = stages.analysis([dy], flip=True)
        need_v, need_g = ctx.needs_input_grad[:2]
        dv = dg = None
        if need_v and need_g:  # dv = flip(flip(dy) ∗ g), dg = flip(flip(dy) ∗ v): one transform of dy
            both = stages.synthesis(stages.spectral(zd, zg, zv), flip=True, dtype=dy.dtype)
            dv, dg = both[:B].to(ctx.dtypes[0]), both[B:].to(ctx.dtypes[1])
        elif need_v:
            dv = stages.synthesis(stages.spectral(zd, zg), flip=True, dtype=ctx.dtypes[0])
        elif need_g:
            dg = stages.synthesis(stages.spectral(zd, zv), flip=True, dtype=ctx.dtypes[1])
        return dv, dg, None


def monarch_causal_conv(v: torch.Tensor, g: torch.Tensor, split_p: int = 0) -> torch.Tensor:
    """The fast path's algorithm in plain PyTorch, with its custom backward (tests; any device, float64 exact)."""
    work = torch.float64 if v.dtype == torch.float64 else torch.float32
    return _MonarchConv.apply(v, g, TorchStages(v.shape[1], v.device, work, split_p))


def causal_fft_conv_fast(v: torch.Tensor, g: torch.Tensor, **tiles) -> torch.Tensor:
    """The Triton path: v, g [B, L, D] on CUDA (bf16 or fp16), L ≤ MAX_LEN (past MAX_ONCHIP_LEN the spectral
    stage in torch.fft); returns v's dtype. `tiles` are
    TritonStages' tile settings (benchmarks). A custom operator: torch.compile keeps it as one node of the
    model's graph instead of breaking the graph around it."""
    if v.dtype != g.dtype:
        g = g.to(v.dtype)
    if g.shape != v.shape:  # a filter shared across the batch (SWH's): the kernels read one row per sample
        g = g.expand_as(v).contiguous()
    v, g = (x if x.stride(-1) == 1 else x.contiguous() for x in (v, g))
    return monarch_conv(v, g, *_tile_args(**tiles))[0]


def _tile_args(block_c: int = 0, block_c2: int = 0, rows_per_prog: int = 0, warps: tuple[int, int, int] | None = None,
               stages: int = 0, split_p: int = 0, left: int = 0, keep: int = 0) -> tuple:
    """The operators' tile arguments; 0 (and warps None) is the length's tuned setting."""
    return block_c, block_c2, rows_per_prog, list(warps) if warps else None, stages, split_p, left, keep


def _stages(x: torch.Tensor, block_c: int, block_c2: int, rows: int, warps: list[int] | None,
            stages: int, split_p: int, left: int, keep: int) -> TritonStages:
    return TritonStages(x.shape[1], x.device, x.dtype, block_c, block_c2, rows, tuple(warps) if warps else None, stages,
                        split_p, left, keep)


def _part(spectra: tuple[torch.Tensor, torch.Tensor], start: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Samples start..start+n−1 of scaled spectra (values [2, S·B, …], scales [S·B, …])."""
    z, s = spectra
    return z.narrow(1, start, n), s.narrow(0, start, n)


# The operator returns the spectra of v and g (or their transforms along n1: `keep`) beside y (values [2, 2B, P,
# T, D] and their scales [2B, D]), so that the backward reuses them.
@torch.library.custom_op("caracal::monarch_conv", mutates_args=())
def monarch_conv(v: torch.Tensor, g: torch.Tensor, block_c: int, block_c2: int, rows_per_prog: int,
                 warps: list[int] | None, stages: int, split_p: int, left: int,
                 keep: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    st = _stages(v, block_c, block_c2, rows_per_prog, warps, stages, split_p, left, keep)
    B = v.shape[0]
    z, s = st.analysis([v, g], flip=False)
    kept = torch.empty_like(z) if st.keep_transforms else None
    w = st.spectral(_part((z, s), 0, B), _part((z, s), B, B), keep=kept)
    if kept is not None:
        z = kept
    y = st.synthesis(w, flip=False, dtype=v.dtype)
    st.exact_head(v, g, y)
    return y, z, s


@monarch_conv.register_fake
def _(v, g, block_c, block_c2, rows_per_prog, warps, stages, split_p, left, keep):
    P, T = split_for(int(v.shape[1]), split_p)  # int(): under dynamic shapes the graph specialises on L
    zdtype = torch.float32 if v.dtype == torch.float32 else torch.float16
    # contiguous, as the kernels write them (empty_like would copy v's strides)
    return (v.new_empty(v.shape), v.new_empty((2, 2 * v.shape[0], P, T, v.shape[2]), dtype=zdtype),
            v.new_empty((2 * v.shape[0], v.shape[2]), dtype=torch.float32))


@torch.library.custom_op("caracal::monarch_conv_backward", mutates_args=())
def monarch_conv_backward(dy: torch.Tensor, z: torch.Tensor, s: torch.Tensor, block_c: int, block_c2: int,
                          rows_per_prog: int, warps: list[int] | None, stages: int, split_p: int, left: int,
                          keep: int) -> torch.Tensor:
    """[dv; dg] stacked on the batch axis: dv = flip(flip(dy) ∗ g), dg = flip(flip(dy) ∗ v), from one
    transform of dy and what the forward kept of v and g."""
    st = _stages(dy, block_c, block_c2, rows_per_prog, warps, stages, split_p, left, keep)
    B = dy.shape[0]
    w = st.spectral(st.analysis([dy], flip=True), _part((z, s), B, B), _part((z, s), 0, B),
                    transformed=st.keep_transforms)
    return st.synthesis(w, flip=True, dtype=dy.dtype)


@monarch_conv_backward.register_fake
def _(dy, z, s, block_c, block_c2, rows_per_prog, warps, stages, split_p, left, keep):
    return dy.new_empty((2 * dy.shape[0], *dy.shape[1:]))


def _monarch_conv_setup(ctx, inputs, output):
    ctx.tiles = inputs[2:]
    # the kept spectra get no gradient: without this, autograd would pass the backward a zero tensor of their
    # size (≈0.5 GB at 65536 tokens, d = 1024: 0.15 ms of writes on an H200)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(output[1], output[2])


def _monarch_conv_grad(ctx, dy, _dz, _ds):
    z, s = ctx.saved_tensors
    both = monarch_conv_backward(dy.contiguous(), z, s, *ctx.tiles)
    B = dy.shape[0]
    return both[:B], both[B:], *[None] * len(ctx.tiles)


monarch_conv.register_autograd(_monarch_conv_grad, setup_context=_monarch_conv_setup)


# --- Triton kernels ------------------------------------------------------------------------------------------
# Spectra live as real tensors [2 (re, im), S·B, P, T, D]: channel-contiguous rows, like the [B, L, D] input,
# so every load and store moves whole runs of BLOCK_C channels.

@functools.lru_cache(maxsize=64)
def _kernel_tables(P: int, T: int, device: str, fp32: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A [2, P, P] and F [2, T, T] (re, im) in the operand dtype, tw [2, P, T] in float32."""
    A, tw, F = dft_tables(P, T, device, torch.complex128)
    op = torch.float32 if fp32 else torch.float16
    return tuple(torch.stack([m.real, m.imag]).to(dtype).contiguous()
                 for m, dtype in ((A, op), (F, op), (tw, torch.float32)))


class TritonStages:
    """The three stages (and the direct head) as Triton kernels; tile settings are keyword arguments (see
    scripts/bench_fftconv.py)."""

    batch_dim = 1
    # the direct head's tiles: a [32, 32, 16] float32 tile of g is 64 registers a thread with 8 warps
    head_block, head_warps = 16, 8

    def __init__(self, length: int, device, dtype: torch.dtype, block_c: int = 0, block_c2: int = 0,
                 rows_per_prog: int = 0, warps: tuple[int, int, int] | None = None, stages: int = 0,
                 split_p: int = 0, left: int = 0, keep: int = 0):
        self.L = length
        self.P, self.T = split_for(length, split_p)
        self.fp32 = dtype == torch.float32
        self.zdtype = torch.float32 if self.fp32 else torch.float16
        self.A, self.F, self.tw = _kernel_tables(self.P, self.T, str(torch.device(device)), self.fp32)
        given = dict(block_c=block_c, block_c2=block_c2, rows_per_prog=rows_per_prog, stages=stages, left=left,
                     keep=keep)
        tiles = {**DEFAULT_TILES, **TUNED_TILES.get(padded_length(length), {}),
                 **{k: v for k, v in given.items() if v}}
        self.block_c, self.block_c2 = tiles["block_c"], tiles["block_c2"]
        self.rows = tiles["rows_per_prog"]
        self.stages = tiles["stages"]  # software-pipelining depth of each kernel's loop over rows
        if tiles["left"] not in (LEFT_DATA, LEFT_A):
            raise ValueError(f"left={tiles['left']}: {LEFT_DATA} (the data) or {LEFT_A} (the DFT matrix)")
        self.a_left = tiles["left"] == LEFT_A
        if tiles["keep"] not in (KEEP_SPECTRA, KEEP_TRANSFORMS):
            raise ValueError(f"keep={tiles['keep']}: {KEEP_SPECTRA} (the spectra) or {KEEP_TRANSFORMS} (their "
                             "transforms)")
        # past MAX_ONCHIP_T the spectral stage runs in torch.fft, which keeps nothing for the backward
        self.torch_spectral = self.T > MAX_ONCHIP_T
        self.keep_transforms = tiles["keep"] == KEEP_TRANSFORMS and not self.torch_spectral
        # 8 warps once a program's fp32 tiles pass ~32 KB (registers), else 4
        wide, wide2 = self.P * self.block_c >= 8192, self.T * self.block_c2 >= 4096
        self.warps = warps or (8 if wide else 4, 8 if wide2 else 4, 8 if wide else 4)

    def _rows(self, n: int) -> int:
        return min(self.rows, n)

    def analysis(self, xs: list[torch.Tensor], flip: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Spectra of each x in xs, stacked on the batch axis: values [2, S·B, P, T, D], |·| ≤ 1, and one scale
        per sample and channel [S·B, D]. The scale is √P·max_t |x[:, t, c]|, a bound known before the
        transform, so the kernels need no reduction to choose one."""
        B, L, D = xs[0].shape
        z = torch.empty(2, len(xs) * B, self.P, self.T, D, device=xs[0].device, dtype=self.zdtype)
        peak = torch.cat([torch.linalg.vector_norm(x, float("inf"), dim=1) for x in xs]).float()
        peak = torch.where(peak > 0, peak, 1.0)  # an all-zero channel stays zero
        rows = self._rows(self.T)
        for i, x in enumerate(xs):
            x = x if x.stride(-1) == 1 else x.contiguous()
            grid = (self.T // rows, triton.cdiv(D, self.block_c), B)
            _analysis_kernel[grid](x, z[:, i * B:], peak[i * B:], self.A, self.tw, L, D, x.stride(0), x.stride(1),
                                   z.stride(0),
                                   P=self.P, T=self.T, BLOCK_C=self.block_c, ROWS=rows, FLIP=flip, FP32=self.fp32,
                                   A_LEFT=self.a_left, num_warps=self.warps[0], num_stages=self.stages)
        return z, peak * math.sqrt(self.P)

    def spectral(self, a: tuple, b: tuple, c: tuple | None = None, keep: torch.Tensor | None = None,
                 transformed: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """W for the spectra a and b (and a second output for a and c): values [2, n·B, P, T, D] and scales
        [n·B, P, D], one per (k2, c). `keep` [2, 2B, P, T, D] receives F Z_a and F Z_b (÷√T, under the inputs'
        scales); `transformed` says that b and c are such kept transforms."""
        if self.torch_spectral:
            assert keep is None and not transformed, "torch.fft's spectral stage keeps no transforms"
            return self._spectral_torch(a, b, c)
        (za, sa), (zb, sb) = a, b
        two = c is not None
        zc, sc = c if two else b
        B, D = za.shape[1], za.shape[-1]
        out = torch.empty(2, (2 if two else 1) * B, self.P, self.T, D, device=za.device, dtype=self.zdtype)
        scale = torch.empty((2 if two else 1) * B, self.P, D, device=za.device, dtype=torch.float32)
        kept = out if keep is None else keep
        rows = self._rows(self.P)
        grid = (self.P // rows, triton.cdiv(D, self.block_c2), B)
        _spectral_kernel[grid](za, zb, zc, sa, sb, sc, out, out[:, B:] if two else out, scale,
                               scale[B:] if two else scale, kept, kept[:, B:], self.F, self.tw, D,
                               za.stride(0), zb.stride(0), zc.stride(0), out.stride(0), kept.stride(0),
                               P=self.P, T=self.T, BLOCK_C=self.block_c2, ROWS=rows, TWO=two, FP32=self.fp32,
                               KEEP=keep is not None, GIVEN=transformed,
                               num_warps=self.warps[1], num_stages=self.stages)
        return out, scale

    def _spectral_torch(self, a: tuple, b: tuple, c: tuple | None) -> tuple[torch.Tensor, torch.Tensor]:
        """`spectral` with torch.fft along n1, for T > MAX_ONCHIP_T: the same W = conj(tw) ⊙ F^H((F Z_a) ⊙
        (F Z_b)) (F orthonormal) from the stored spectra, in complex64, returned in the kernels' storage (values
        |·| ≤ 1 in the spectra's dtype, one float32 scale per (sample, k2, c)). Memory: a few complex64
        tensors of B·Lp·D elements at once, linear in L."""
        def spectrum(stored: tuple) -> torch.Tensor:  # [B, P, T, D] complex64: values times their scales
            z, scale = stored
            return torch.complex(z[0].float(), z[1].float()) * scale[:, None, None, :]

        fa = torch.fft.fft(spectrum(a), dim=2, norm="ortho")
        conj_tw = torch.complex(self.tw[0], -self.tw[1])[:, :, None]  # [P, T, 1]
        values, scales = [], []
        for other in [b] if c is None else [b, c]:
            w = torch.fft.ifft(fa * torch.fft.fft(spectrum(other), dim=2, norm="ortho"), dim=2, norm="ortho")
            w *= conj_tw
            scale = torch.maximum(w.real.abs().amax(2), w.imag.abs().amax(2))  # [B, P, D]
            scale = torch.where(scale > 0, scale, 1.0)
            w /= scale[:, :, None, :]
            values.append(torch.stack([w.real, w.imag]).to(self.zdtype))
            scales.append(scale)
        return torch.cat(values, 1), torch.cat(scales, 0)

    def exact_head(self, v: torch.Tensor, g: torch.Tensor, y: torch.Tensor) -> None:
        """Overwrite y's first EXACT_HEAD positions with the direct sums Σ_{j≤t} v_j g_{t−j} (float32)."""
        B, L, D = v.shape
        grid = (triton.cdiv(D, self.head_block), B)
        _exact_head_kernel[grid](v, g, y, min(L, EXACT_HEAD), D, v.stride(0), v.stride(1), g.stride(0), g.stride(1),
                                 y.stride(0), y.stride(1), K=EXACT_HEAD, BLOCK_C=self.head_block,
                                 num_warps=self.head_warps)

    def synthesis(self, spectra: tuple, flip: bool, dtype: torch.dtype) -> torch.Tensor:
        w, scale = spectra
        SB, D = w.shape[1], w.shape[-1]
        y = torch.empty(SB, self.L, D, device=w.device, dtype=dtype)
        rows = self._rows(self.T)
        grid = (self.T // rows, triton.cdiv(D, self.block_c), SB)
        _synthesis_kernel[grid](w, scale, y, self.A, self.L, D, w.stride(0), math.sqrt(self.P * self.T),
                                P=self.P, T=self.T, BLOCK_C=self.block_c, ROWS=rows, FLIP=flip, FP32=self.fp32,
                                A_LEFT=self.a_left, num_warps=self.warps[2], num_stages=self.stages)
        return y


if TRITON_AVAILABLE:
    import triton
    import triton.language as tl

    # Analysis and synthesis tiles are [channels, P]: the data is the left operand and A the right one, which
    # the tensor cores read from shared memory. The spectral tiles are [T, channels] with F on the left, so
    # Hopper's wide instruction (M = 64 per warp group) applies with only 32 channels per program; that
    # kernel holds three complex tiles at once. Shared-memory and register use per (P, T) were read off
    # sm_90 builds (no spills; at most 192 KB of shared memory and 215 registers at P = T = 128).

    @triton.jit
    def _mm(a, b, acc, FP32: tl.constexpr):
        if FP32:
            out = tl.dot(a, b, acc, input_precision="tf32x3")
        else:
            out = tl.dot(a, b, acc)
        return out

    @triton.jit
    def _operand(x, FP32: tl.constexpr):
        return x if FP32 else x.to(tl.float16)

    @triton.jit
    def _layout(P: tl.constexpr, BLOCK_C: tl.constexpr, A_LEFT: tl.constexpr):
        """Analysis and synthesis tiles: [P, BLOCK_C] with A on the left, else [BLOCK_C, P]. Returns the index
        along P, it and this program's channels as broadcastable columns or rows (kk, cc), and a zero tile."""
        k = tl.arange(0, P)
        c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        if A_LEFT:
            kk, cc = k[:, None], c[None, :]
            zero = tl.zeros((P, BLOCK_C), dtype=tl.float32)
        else:
            kk, cc = k[None, :], c[:, None]
            zero = tl.zeros((BLOCK_C, P), dtype=tl.float32)
        return k, kk, cc, zero

    @triton.jit
    def _analysis_kernel(x_ptr, z_ptr, peak_ptr, a_ptr, tw_ptr, L, D, stride_b, stride_t, plane,
                         P: tl.constexpr, T: tl.constexpr, BLOCK_C: tl.constexpr, ROWS: tl.constexpr,
                         FLIP: tl.constexpr, FP32: tl.constexpr, A_LEFT: tl.constexpr):
        """Z[b, k2, n1, c] for ROWS values of n1 and BLOCK_C channels: x[c, n2] @ A^T[n2, k2] (or, A_LEFT,
        A[k2, n2] @ x[n2, c]), then tw; the operand is x / peak[b, c] (|·| ≤ 1), the stored value
        Z / (√P·peak), which |A| = 1/√P keeps ≤ 1."""
        b = tl.program_id(2).to(tl.int64)  # per-batch bases in int64, offsets inside a tile in int32
        x_ptr += b * stride_b
        z_ptr += b * P * T * D
        k, kk, cc, _ = _layout(P, BLOCK_C, A_LEFT)  # k: n2 of the input, k2 of the output
        # A's table [2, P, P] (re, im) as one matrix: as the left operand [Ar; Ai] [2P, P] (rows k2, columns n2),
        # as the right one [Arᵀ | Aiᵀ] [P, 2P]; one product gives Z's real and imaginary parts
        r = tl.arange(0, 2 * P)
        a = tl.load(a_ptr + (r[:, None] * P + k[None, :] if A_LEFT else r[None, :] * P + k[:, None]))
        zero = tl.zeros((2 * P, BLOCK_C) if A_LEFT else (BLOCK_C, 2 * P), dtype=tl.float32)
        cmask = cc < D
        inv_peak = 1.0 / tl.load(peak_ptr + b * D + cc, mask=cmask, other=1.0)
        inv_root = 1.0 / tl.sqrt(P * 1.0)
        for i in range(ROWS):
            n1 = tl.program_id(0) * ROWS + i
            t = n1 + T * kk  # positions n1 + T·n2
            src = (L - 1 - t) if FLIP else t
            x = tl.load(x_ptr + (src * stride_t + cc), mask=(t < L) & cmask, other=0.0).to(tl.float32)
            x = _operand(x * inv_peak, FP32)
            zr, zi = _halves(_mm(a, x, zero, FP32) if A_LEFT else _mm(x, a, zero, FP32), P, A_LEFT)
            twr = tl.load(tw_ptr + kk * T + n1) * inv_root
            twi = tl.load(tw_ptr + P * T + kk * T + n1) * inv_root
            off = (kk * T + n1) * D + cc
            tl.store(z_ptr + off, (zr * twr - zi * twi).to(z_ptr.dtype.element_ty), mask=cmask)
            tl.store(z_ptr + plane + off, (zr * twi + zi * twr).to(z_ptr.dtype.element_ty), mask=cmask)

    @triton.jit
    def _col_scale(xr, xi):
        """One scale per column (a channel's sequence), max |·| over re and im (1 for an all-zero column)."""
        m = tl.maximum(tl.max(tl.abs(xr), axis=0), tl.max(tl.abs(xi), axis=0))
        return tl.where(m > 0, m, 1.0)[None, :]

    @triton.jit
    def _halves(x, N: tl.constexpr, ALONG_ROWS: tl.constexpr):
        """Rows 0…N−1 and N…2N−1 of a [2N, C] tile (or, not ALONG_ROWS, those columns of a [C, 2N] one). Where
        the tensor cores' layout gives a thread both row r and r + N, the split stays in registers."""
        if ALONG_ROWS:
            parts = tl.permute(tl.reshape(x, (2, N, x.shape[1])), (1, 2, 0))
        else:
            parts = tl.permute(tl.reshape(x, (x.shape[0], 2, N)), (0, 2, 1))
        return tl.split(parts)

    @triton.jit
    def _dft_cols(fr, fi, ur, ui, FP32: tl.constexpr, INVERSE: tl.constexpr):
        """F @ u (or conj(F) @ u) for F = fr + i·fi [T, T] and u = ur + i·ui [T, C] with |u| ≤ 1 (fp16 or
        float32 operands); float32 out, each |·| ≤ √T. Here F is the left operand: M = T = 128 rows keep the
        tensor cores' wide instruction with few channels per program. (Two products of the stacked [fr; fi]
        (M = 2T) instead of four were measured on an H200: as fast at T ≥ 64, 2-3x slower at T ≤ 32.)"""
        zero = tl.zeros(ur.shape, dtype=tl.float32)
        # Chained accumulators: two live [T, C] products instead of four. A difference negates the first
        # product (registers), not an operand: the operands sit in shared memory for the tensor cores, and a
        # negated one took a round trip through registers and back.
        if INVERSE:  # (fr − i·fi)(ur + i·ui) = (fr·ur + fi·ui) + i(fr·ui − fi·ur)
            outr = _mm(fi, ui, _mm(fr, ur, zero, FP32), FP32)
            outi = _mm(fr, ui, -_mm(fi, ur, zero, FP32), FP32)
        else:  # (fr + i·fi)(ur + i·ui) = (fr·ur − fi·ui) + i(fr·ui + fi·ur)
            outr = _mm(fr, ur, -_mm(fi, ui, zero, FP32), FP32)
            outi = _mm(fi, ur, _mm(fr, ui, zero, FP32), FP32)
        return outr, outi

    @triton.jit
    def _load_unit(z, plane, off, cmask):
        """A stored spectrum tile (|·| ≤ 1), as the operands it already is."""
        return tl.load(z + off, mask=cmask, other=0.0), tl.load(z + plane + off, mask=cmask, other=0.0)

    @triton.jit
    def _transform(z, plane, off, cmask, fr, fi, FP32: tl.constexpr, GIVEN: tl.constexpr):
        """F u for a stored tile u, float32 and |·| ≤ √T; or (GIVEN) a kept F u / √T as it is, |·| ≤ 1."""
        ur, ui = _load_unit(z, plane, off, cmask)
        if GIVEN:
            xr, xi = ur.to(tl.float32), ui.to(tl.float32)
        else:
            xr, xi = _dft_cols(fr, fi, ur, ui, FP32, False)
        return xr, xi

    @triton.jit
    def _keep(z, plane, off, xr, xi, cmask, T: tl.constexpr):
        """Store a transform F u (|·| ≤ √T) as F u / √T."""
        inv_root = 1.0 / tl.sqrt(T * 1.0)
        tl.store(z + off, (xr * inv_root).to(z.dtype.element_ty), mask=cmask)
        tl.store(z + plane + off, (xi * inv_root).to(z.dtype.element_ty), mask=cmask)

    @triton.jit
    def _unit_product(ar, ai, br, bi, FP32: tl.constexpr):
        """The product of two transforms as operands of column maximum 1, and that maximum. A bound would
        not do here: inputs scaled per channel sit well below 1, and their product below fp16's normal range."""
        pr, pi = ar * br - ai * bi, ar * bi + ai * br
        sp = _col_scale(pr, pi)
        inv = 1.0 / sp
        return _operand(pr * inv, FP32), _operand(pi * inv, FP32), sp

    @triton.jit
    def _store_spectrum(out, s, plane, off, yr, yi, bound, cmask, T: tl.constexpr):
        """Store a [T, C] tile that is bound · y with |y| ≤ √T (an inverse transform of operands ≤ 1, rotated)
        as y/√T, with the scale bound·√T."""
        inv_root = 1.0 / tl.sqrt(T * 1.0)
        tl.store(s, bound / inv_root, mask=cmask)
        tl.store(out + off, (yr * inv_root).to(out.dtype.element_ty), mask=cmask)
        tl.store(out + plane + off, (yi * inv_root).to(out.dtype.element_ty), mask=cmask)

    @triton.jit
    def _spectral_kernel(za_ptr, zb_ptr, zc_ptr, sa_ptr, sb_ptr, sc_ptr, out_ptr, out2_ptr, so_ptr, so2_ptr,
                         ka_ptr, kb_ptr, f_ptr, tw_ptr, D, plane_a, plane_b, plane_c, plane_o, plane_k,
                         P: tl.constexpr, T: tl.constexpr, BLOCK_C: tl.constexpr, ROWS: tl.constexpr,
                         TWO: tl.constexpr, FP32: tl.constexpr, KEEP: tl.constexpr, GIVEN: tl.constexpr):
        """For ROWS values of k2 and BLOCK_C channels: W = conj(tw) ⊙ F^H((F Z_a) ⊙ (F Z_b)) along n1
        (and a second output with Z_c in place of Z_b). Tiles are [T (n1 or k1), BLOCK_C]. Inputs carry one
        scale per (sample, c), outputs get one per (k2, c). KEEP: also store F Z_a and F Z_b (÷√T, under the
        inputs' scales) at ka, kb; GIVEN: Z_b and Z_c are such stored transforms (the backward's g and v).

        The stored inputs u are ≤ 1 and are used as they are: |F u| ≤ √T (entries of F are 1/√T). The product
        of two transforms is divided by its own column maximum (`_unit_product`), the one reduction across
        warps per product: a bound (T) would leave it below fp16's normal range."""
        b = tl.program_id(2).to(tl.int64)
        n = tl.arange(0, T)
        c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        cmask = (c < D)[None, :]
        f_off = n[:, None] * T + n[None, :]
        fr = _operand(tl.load(f_ptr + f_off), FP32)
        fi = _operand(tl.load(f_ptr + T * T + f_off), FP32)
        off = n[:, None] * D + c[None, :]
        bound_a = tl.load(sa_ptr + b * D + c, mask=c < D, other=1.0)[None, :]
        bound_b = tl.load(sb_ptr + b * D + c, mask=c < D, other=1.0)[None, :]
        bound_c = tl.load(sc_ptr + b * D + c, mask=c < D, other=1.0)[None, :] if TWO else bound_b
        if GIVEN:  # a kept transform is F u / √T
            root = tl.sqrt(T * 1.0)
            bound_b, bound_c = bound_b * root, bound_c * root
        for i in range(ROWS):
            k2 = tl.program_id(0) * ROWS + i
            base = (b * P + k2) * T * D  # int64; the offsets inside the tile stay int32
            za, zb, zc, out, out2 = za_ptr + base, zb_ptr + base, zc_ptr + base, out_ptr + base, out2_ptr + base
            so_off = (b * P + k2) * D + c[None, :]
            ar, ai = _transform(za, plane_a, off, cmask, fr, fi, FP32, False)
            br, bi = _transform(zb, plane_b, off, cmask, fr, fi, FP32, GIVEN)
            if KEEP:
                _keep(ka_ptr + base, plane_k, off, ar, ai, cmask, T)
                _keep(kb_ptr + base, plane_k, off, br, bi, cmask, T)
            twr = tl.load(tw_ptr + k2 * T + n)[:, None]
            twi = tl.load(tw_ptr + P * T + k2 * T + n)[:, None]
            # the product of two transforms, as operands of column maximum 1 (`_unit_product`)
            pr, pi, sp = _unit_product(ar, ai, br, bi, FP32)
            yr, yi = _dft_cols(fr, fi, pr, pi, FP32, True)
            _store_spectrum(out, so_ptr + so_off, plane_o, off, yr * twr + yi * twi, yi * twr - yr * twi,
                            bound_a * bound_b * sp, cmask, T)
            if TWO:
                br, bi = _transform(zc, plane_c, off, cmask, fr, fi, FP32, GIVEN)
                pr, pi, sp = _unit_product(ar, ai, br, bi, FP32)
                yr, yi = _dft_cols(fr, fi, pr, pi, FP32, True)
                _store_spectrum(out2, so2_ptr + so_off, plane_o, off, yr * twr + yi * twi, yi * twr - yr * twi,
                                bound_a * bound_c * sp, cmask, T)

    @triton.jit
    def _exact_head_kernel(v_ptr, g_ptr, y_ptr, n, D, v_sb, v_st, g_sb, g_st, y_sb, y_st, K: tl.constexpr,
                           BLOCK_C: tl.constexpr):
        """y[b, t, c] = Σ_{j≤t} v[b, j, c] g[b, t−j, c] for t < n = min(K, L), summed in float32. All K outputs
        at once from a [K (t), K (j), BLOCK_C] tile of g[t − j]: one round of (cached) loads, not K in turn."""
        b = tl.program_id(1).to(tl.int64)
        c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
        t = tl.arange(0, K)
        rows = (t < n)[:, None] & (c < D)[None, :]
        v = tl.load(v_ptr + b * v_sb + t[:, None] * v_st + c[None, :], mask=rows, other=0.0).to(tl.float32)
        lag = t[:, None] - t[None, :]  # [t, j]: g's row; j > t contributes nothing
        g = tl.load(g_ptr + b * g_sb + lag[:, :, None] * g_st + c[None, None, :],
                    mask=(lag >= 0)[:, :, None] & rows[:, None, :], other=0.0).to(tl.float32)
        y = tl.sum(g * v[None, :, :], axis=1)
        tl.store(y_ptr + b * y_sb + t[:, None] * y_st + c[None, :], y.to(y_ptr.dtype.element_ty), mask=rows)

    @triton.jit
    def _synthesis_kernel(w_ptr, s_ptr, y_ptr, a_ptr, L, D, plane, scale,
                          P: tl.constexpr, T: tl.constexpr, BLOCK_C: tl.constexpr, ROWS: tl.constexpr,
                          FLIP: tl.constexpr, FP32: tl.constexpr, A_LEFT: tl.constexpr):
        """y[b, n1 + T·n2, c] = √Lp · Σ_{k2} (Re W[c, k2] Re A[k2, n2] + Im W Im A) for ROWS values of n1
        (A_LEFT: Aᵀ[n2, k2] on the left); W arrives scaled, one scale per (k2, c)."""
        b = tl.program_id(2).to(tl.int64)
        w_ptr += b * P * T * D
        s_ptr += b * P * D
        y_ptr += b * L * D
        k, kk, cc, zero = _layout(P, BLOCK_C, A_LEFT)  # k: n2 of the output
        # W's real and imaginary parts as one operand, stacked along k2 (r = k2 + P·part), against A's table
        # [2, P, P] as one matrix: one product per row (A_LEFT: [Arᵀ | Aiᵀ] [P, 2P] on the left; else
        # [Ar; Ai] [2P, P] on the right)
        r = tl.arange(0, 2 * P)
        rr = r[:, None] if A_LEFT else r[None, :]
        a = tl.load(a_ptr + (r[None, :] * P + k[:, None] if A_LEFT else r[:, None] * P + k[None, :]))
        cmask = cc < D
        w_scale = tl.load(s_ptr + rr % P * D + cc, mask=cmask, other=0.0)  # the same for every n1
        for i in range(ROWS):
            n1 = tl.program_id(0) * ROWS + i
            off = rr // P * plane + (rr % P * T + n1) * D + cc
            w = tl.load(w_ptr + off, mask=cmask, other=0.0).to(tl.float32) * w_scale
            if FP32:
                s = scale
            else:  # one scale per channel: max |·| over its column (A_LEFT) or row of w
                m = tl.max(tl.abs(w), axis=0 if A_LEFT else 1)
                m = tl.where(m > 0, m, 1.0)
                s = m[None, :] if A_LEFT else m[:, None]
                w = (w * (1.0 / s)).to(tl.float16)
                s = s * scale
            y = (_mm(a, w, zero, FP32) if A_LEFT else _mm(w, a, zero, FP32)) * s
            t = n1 + T * kk
            dst = (L - 1 - t) if FLIP else t
            tl.store(y_ptr + (dst * D + cc), y.to(y_ptr.dtype.element_ty), mask=(t < L) & cmask)
