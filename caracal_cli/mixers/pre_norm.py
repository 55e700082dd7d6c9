"""MHF's first stage in one Triton kernel: x_norm = LayerNorm(CausalConv1d_pre(x)), depthwise with k taps.

Unfused, this stage is a pad, k products and sums, a LayerNorm and casts (eager: ~3.5 ms forward + backward at
d=768 and 65,536 tokens on an H200, for ~0.4 GB of tensors). The kernel reads x once (its k shifted rows), keeps
the convolution's output in registers, and writes x_norm in the compute dtype beside, optionally, x cast to it
(the value stream's input, so autocast does not cast x again). The convolution runs in float32, where the
unfused path rounds to bf16 first. The backward recomputes the convolution and the normalisation from x and
the saved row statistics, in two kernels: the first writes dh (the gradient at the convolution's output) and
per-program partial sums of the weight gradients (a fixed number of programs, summed afterwards: deterministic,
no atomics); the second spreads dh back through the taps to dx, which needs dh of the next k−1 positions.

`conv_layer_norm` runs the kernels (a custom operator, so torch.compile keeps it in its graph);
`conv_layer_norm_reference` is the same function in PyTorch, the reference the tests compare with.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F

TRITON_AVAILABLE = importlib.util.find_spec("triton") is not None
# The backward's first kernel runs this many programs at most, each summing its rows' weight gradients into
# partials of [(k+2), D] floats: 1024 of them fill every SM of an H100/H200 several times over (16 MB at d=768).
PARTIAL_PROGRAMS = 1024


def conv_layer_norm_reference(x: torch.Tensor, conv_weight: torch.Tensor, norm_weight: torch.Tensor,
                              norm_bias: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm(depthwise causal conv(x)) over [B, L, D] in x's dtype; conv_weight [D, k]."""
    k = conv_weight.shape[-1]
    h = F.pad(x, (0, 0, k - 1, 0))
    h = sum(h[:, j:j + x.shape[1]] * conv_weight[:, j].to(x.dtype) for j in range(k))
    return F.layer_norm(h, (x.shape[-1],), norm_weight.to(x.dtype), norm_bias.to(x.dtype), eps)


def _blocks(d: int) -> tuple[int, int, int]:
    """(BLOCK_D, rows per program, warps) for rows of d channels: ~4K elements per program."""
    block_d = triton.next_power_of_2(d)
    return block_d, max(1, min(16, 4096 // block_d)), 4 if block_d <= 1024 else 8


@torch.library.custom_op("caracal::conv_layer_norm", mutates_args=())
def conv_layer_norm_op(x: torch.Tensor, conv_weight: torch.Tensor, norm_weight: torch.Tensor,
                       norm_bias: torch.Tensor, eps: float, out_dtype: torch.dtype, emit_cast: bool
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_norm, x cast to out_dtype or an empty tensor, row means, row 1/σ) for contiguous x [B, L, D]."""
    B, L, D = x.shape
    k = conv_weight.shape[-1]
    x_norm = torch.empty(B, L, D, device=x.device, dtype=out_dtype)
    x_cast = torch.empty(B, L, D, device=x.device, dtype=out_dtype) if emit_cast else x.new_empty(0, dtype=out_dtype)
    mean = torch.empty(B * L, device=x.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    block_d, rows, warps = _blocks(D)
    _forward_kernel[(triton.cdiv(B * L, rows),)](
        x, conv_weight.contiguous(), norm_weight, norm_bias, x_norm, x_cast, mean, rstd, B * L, L, D, eps,
        K=k, BLOCK_M=rows, BLOCK_D=block_d, EMIT_CAST=emit_cast, num_warps=warps)
    return x_norm, x_cast, mean, rstd


@conv_layer_norm_op.register_fake
def _(x, conv_weight, norm_weight, norm_bias, eps, out_dtype, emit_cast):
    rows = x.shape[0] * x.shape[1]
    x_norm = x.new_empty(x.shape, dtype=out_dtype)
    x_cast = x.new_empty(x.shape, dtype=out_dtype) if emit_cast else x.new_empty(0, dtype=out_dtype)
    return x_norm, x_cast, x.new_empty(rows, dtype=torch.float32), x.new_empty(rows, dtype=torch.float32)


@torch.library.custom_op("caracal::conv_layer_norm_backward", mutates_args=())
def conv_layer_norm_backward_op(d_norm: torch.Tensor, d_cast: torch.Tensor, x: torch.Tensor,
                                conv_weight: torch.Tensor, norm_weight: torch.Tensor, mean: torch.Tensor,
                                rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx in x's dtype, d conv_weight, d norm_weight, d norm_bias) in the parameters' dtypes; d_cast is empty
    when the cast was not emitted."""
    B, L, D = x.shape
    k = conv_weight.shape[-1]
    block_d, rows, warps = _blocks(D)
    programs = min(PARTIAL_PROGRAMS, triton.cdiv(B * L, rows))
    dh = torch.empty(B, L, D, device=x.device, dtype=torch.float32)
    partial = torch.empty(programs, k + 2, D, device=x.device, dtype=torch.float32)
    _backward_dh_kernel[(programs,)](
        d_norm.contiguous(), x, conv_weight.contiguous(), norm_weight, mean, rstd, dh, partial, B * L, L, D,
        K=k, K_POW2=triton.next_power_of_2(k), BLOCK_M=rows, BLOCK_D=block_d, num_warps=warps)
    dx = torch.empty_like(x)
    _backward_dx_kernel[(triton.cdiv(B * L, rows),)](
        dh, conv_weight.contiguous(), d_cast.contiguous(), dx, B * L, L, D,
        K=k, BLOCK_M=rows, BLOCK_D=block_d, HAS_CAST=d_cast.numel() > 0, num_warps=warps)
    sums = partial.sum(0)  # [k + 2, D]: the taps, then γ, then β
    return (dx, sums[:k].t().contiguous().to(conv_weight.dtype).reshape(conv_weight.shape),  # the fake's strides
            sums[k].to(norm_weight.dtype, copy=True), sums[k + 1].to(norm_weight.dtype, copy=True))


@conv_layer_norm_backward_op.register_fake
def _(d_norm, d_cast, x, conv_weight, norm_weight, mean, rstd):
    return (torch.empty_like(x), torch.empty_like(conv_weight), torch.empty_like(norm_weight),
            torch.empty_like(norm_weight))


def _setup_context(ctx, inputs, output):
    x, conv_weight, norm_weight, _bias, _eps, _dtype, emit_cast = inputs
    ctx.emit_cast = emit_cast
    ctx.save_for_backward(x, conv_weight, norm_weight, output[2], output[3])


def _backward(ctx, d_norm, d_cast, _d_mean, _d_rstd):
    x, conv_weight, norm_weight, mean, rstd = ctx.saved_tensors
    if d_cast is None or not ctx.emit_cast:
        d_cast = x.new_empty(0)
    if d_norm is None:
        d_norm = torch.zeros(x.shape, device=x.device, dtype=torch.float32)
    dx, dw, dg, db = conv_layer_norm_backward_op(d_norm, d_cast, x, conv_weight, norm_weight, mean, rstd)
    return dx, dw, dg, db, None, None, None


conv_layer_norm_op.register_autograd(_backward, setup_context=_setup_context)


def conv_layer_norm(x: torch.Tensor, conv_weight: torch.Tensor, norm_weight: torch.Tensor, norm_bias: torch.Tensor,
                    eps: float, out_dtype: torch.dtype, emit_cast: bool = False
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The kernels: (x_norm, x cast to out_dtype if emit_cast else None) for x [B, L, D], conv_weight [D, k]
    (or nn.Conv1d's [D, 1, k])."""
    x_norm, x_cast, _, _ = conv_layer_norm_op(x.contiguous(), conv_weight.reshape(x.shape[-1], -1), norm_weight,
                                              norm_bias, eps, out_dtype, emit_cast)
    return x_norm, (x_cast if emit_cast else None)


if TRITON_AVAILABLE:
    import triton
    import triton.language as tl

    @triton.jit
    def _conv_rows(x_ptr, w_ptr, rows, pos, cols, rmask, cmask, D, K: tl.constexpr):
        """h[rows] = Σ_j w[:, j] ⊙ x[rows − (K−1) + j], zero before each sequence's start; float32."""
        h = tl.zeros((rows.shape[0], cols.shape[0]), dtype=tl.float32)
        for j in tl.static_range(K):
            shift = K - 1 - j
            ok = rmask & (pos >= shift)
            xs = tl.load(x_ptr + (rows - shift)[:, None] * D + cols[None, :], mask=ok[:, None] & cmask[None, :],
                         other=0.0).to(tl.float32)
            w = tl.load(w_ptr + cols * K + j, mask=cmask, other=0.0).to(tl.float32)
            h += xs * w[None, :]
        return h

    @triton.jit
    def _forward_kernel(x_ptr, w_ptr, gamma_ptr, beta_ptr, xn_ptr, xc_ptr, mean_ptr, rstd_ptr, N, L, D, eps,
                        K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, EMIT_CAST: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_D)
        rmask, cmask = rows < N, cols < D
        mask = rmask[:, None] & cmask[None, :]
        h = _conv_rows(x_ptr, w_ptr, rows, rows % L, cols, rmask, cmask, D, K)
        mean = tl.sum(h, axis=1) / D
        diff = tl.where(mask, h - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(diff * diff, axis=1) / D + eps)
        gamma = tl.load(gamma_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        beta = tl.load(beta_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        offsets = rows[:, None] * D + cols[None, :]
        xn = diff * rstd[:, None] * gamma[None, :] + beta[None, :]
        tl.store(xn_ptr + offsets, xn.to(xn_ptr.dtype.element_ty), mask=mask)
        if EMIT_CAST:
            x = tl.load(x_ptr + offsets, mask=mask, other=0.0)
            tl.store(xc_ptr + offsets, x.to(xc_ptr.dtype.element_ty), mask=mask)
        tl.store(mean_ptr + rows, mean, mask=rmask)
        tl.store(rstd_ptr + rows, rstd, mask=rmask)

    @triton.jit
    def _backward_dh_kernel(dn_ptr, x_ptr, w_ptr, gamma_ptr, mean_ptr, rstd_ptr, dh_ptr, partial_ptr, N, L, D,
                            K: tl.constexpr, K_POW2: tl.constexpr, BLOCK_M: tl.constexpr,
                            BLOCK_D: tl.constexpr):
        """dh = rstd · (ĝ − mean(ĝ) − x̂ · mean(ĝ ⊙ x̂)) with ĝ = dn ⊙ γ, per row; this program's share of
        Σ dh ⊙ x_shifted (the taps), Σ dn ⊙ x̂ (γ) and Σ dn (β) into partial[pid]."""
        pid, programs = tl.program_id(0), tl.num_programs(0)
        cols = tl.arange(0, BLOCK_D)
        cmask = cols < D
        gamma = tl.load(gamma_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        d_gamma = tl.zeros((BLOCK_D,), dtype=tl.float32)
        d_beta = tl.zeros((BLOCK_D,), dtype=tl.float32)
        taps = tl.arange(0, K_POW2)
        d_taps = tl.zeros((K_POW2, BLOCK_D), dtype=tl.float32)  # row j: Σ dh ⊙ x shifted by K−1−j
        for block in range(pid, tl.cdiv(N, BLOCK_M), programs):
            rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
            rmask = rows < N
            mask = rmask[:, None] & cmask[None, :]
            pos = rows % L
            h = _conv_rows(x_ptr, w_ptr, rows, pos, cols, rmask, cmask, D, K)
            mean = tl.load(mean_ptr + rows, mask=rmask, other=0.0)
            rstd = tl.load(rstd_ptr + rows, mask=rmask, other=0.0)
            xhat = tl.where(mask, (h - mean[:, None]) * rstd[:, None], 0.0)
            offsets = rows[:, None] * D + cols[None, :]
            dn = tl.load(dn_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
            gh = dn * gamma[None, :]
            dh = rstd[:, None] * (gh - (tl.sum(gh, axis=1) / D)[:, None]
                                  - xhat * (tl.sum(gh * xhat, axis=1) / D)[:, None])
            dh = tl.where(mask, dh, 0.0)
            tl.store(dh_ptr + offsets, dh, mask=mask)
            d_gamma += tl.sum(dn * xhat, axis=0)
            d_beta += tl.sum(dn, axis=0)
            for j in tl.static_range(K):
                shift = K - 1 - j
                ok = rmask & (pos >= shift)
                xs = tl.load(x_ptr + (rows - shift)[:, None] * D + cols[None, :],
                             mask=ok[:, None] & cmask[None, :], other=0.0).to(tl.float32)
                d_taps += tl.where(taps[:, None] == j, tl.sum(dh * xs, axis=0)[None, :], 0.0)
        out = partial_ptr + pid * (K + 2) * D
        tl.store(out + taps[:, None] * D + cols[None, :], d_taps, mask=(taps < K)[:, None] & cmask[None, :])
        tl.store(out + K * D + cols, d_gamma, mask=cmask)
        tl.store(out + (K + 1) * D + cols, d_beta, mask=cmask)

    @triton.jit
    def _backward_dx_kernel(dh_ptr, w_ptr, dc_ptr, dx_ptr, N, L, D, K: tl.constexpr, BLOCK_M: tl.constexpr,
                            BLOCK_D: tl.constexpr, HAS_CAST: tl.constexpr):
        """dx[t] = Σ_j w[:, j] ⊙ dh[t + K−1−j] (within the sequence) + the cast's gradient."""
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_D)
        rmask, cmask = rows < N, cols < D
        mask = rmask[:, None] & cmask[None, :]
        pos = rows % L
        offsets = rows[:, None] * D + cols[None, :]
        dx = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        if HAS_CAST:
            dx += tl.load(dc_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        for j in tl.static_range(K):
            shift = K - 1 - j
            ok = rmask & (pos + shift < L)
            dh = tl.load(dh_ptr + offsets + shift * D, mask=ok[:, None] & cmask[None, :], other=0.0)
            w = tl.load(w_ptr + cols * K + j, mask=cmask, other=0.0).to(tl.float32)
            dx += dh * w[None, :]
        tl.store(dx_ptr + offsets, dx.to(dx_ptr.dtype.element_ty), mask=mask)
