"""MHF's decoding sum for one token, as one kernel over the static caches. At t = pos, with S = decode_block, the
block start c = S·⌊t/S⌋ and the offset o = t − c (see MHF's cached decoding in mhf.py):

    y[b] = ( Σ_{i ≤ o} v[b, c+i] ⊙ g[b, o−i]  +  [c ≥ S] Σ_{i ≤ o} g[b, c+i] ⊙ v[b, o−i]  +  F[b, o] ) / n(t+1)

with F the fold of the finished blocks and n the scale (√(t+1), t+1 or 1). The PyTorch composition gathers 2S
rows of both streams into float32 copies and multiplies and sums them in separate passes: at batch 64 and d = 768
that is about 20x the bytes the sum needs. The Triton kernel reads only the o + 1 rows of each stream that count
(its loop bound comes from `pos` on the device, so one captured CUDA graph serves every position), in the caches'
dtype, sums in float32 and applies the fold and the scale in the same pass.

`decode_sum_path` is the one place that picks the implementation; `block_sum_reference` is the exact reference
and the path everywhere else (CPU, float64 caches, no Triton).
"""

from __future__ import annotations

import importlib.util

import torch

TRITON_AVAILABLE = importlib.util.find_spec("triton") is not None
SCALES = {"none": 0, "sqrt": 1, "mean": 2}
BLOCK_I, BLOCK_D = 32, 64  # rows of the block per loop step, channels per program (b=1, d=768: 12 programs)


def decode_sum_path(device: torch.device, dtype: torch.dtype) -> str:
    """'triton' or 'torch': the implementation `block_sum` runs for caches of `dtype` on `device`."""
    if device.type == "cuda" and TRITON_AVAILABLE and dtype in (torch.bfloat16, torch.float16, torch.float32):
        return "triton"
    return "torch"


def block_sum_reference(v: torch.Tensor, g: torch.Tensor, folded: torch.Tensor, pos: torch.Tensor,
                        scale: str) -> torch.Tensor:
    """The sum in PyTorch: caches v, g [B, N, d], the fold [B, S, d] (its dtype is the work dtype), pos a device
    scalar; returns y [B, 1, d] in the work dtype. The streams after t are still zero (caches start empty and
    are filled in order), so the S − 1 − o slots of the block not yet reached add nothing, without a mask."""
    S, work = folded.shape[1], folded.dtype
    offset = pos % S
    i = torch.arange(S, device=v.device)
    index = torch.cat([pos - offset + i, (offset - i).clamp(min=0)])  # block c…c+S−1, then lags o…o−S+1
    hv = v.index_select(1, index).to(work)  # [B, 2S, d]
    hg = g.index_select(1, index).to(work)
    y = hv[:, :S] * hg[:, S:] + (pos >= S).to(work) * hg[:, :S] * hv[:, S:]  # j ≥ c; k ≥ c (one of them if c = 0)
    y = y.sum(1, keepdim=True) + folded.index_select(1, offset.view(1))
    count = (pos + 1).to(work)
    return y / count.sqrt() if scale == "sqrt" else y / count if scale == "mean" else y


def block_sum(v: torch.Tensor, g: torch.Tensor, folded: torch.Tensor, pos: torch.Tensor,
              scale: str) -> torch.Tensor:
    """`block_sum_reference`'s result, through the kernel where `decode_sum_path` allows."""
    if decode_sum_path(v.device, v.dtype) == "triton":  # (the fold is float32 for every such cache dtype)
        return block_sum_fused(v, g, folded, pos, scale)
    return block_sum_reference(v, g, folded, pos, scale)


def block_sum_fused(v: torch.Tensor, g: torch.Tensor, folded: torch.Tensor, pos: torch.Tensor,
                    scale: str) -> torch.Tensor:
    """The kernel on v's device (tests run it on CPU tensors in Triton's interpreter): contiguous caches v, g
    [B, N, d] of one dtype, the fold [B, S, d] in float32, pos a long scalar; y [B, 1, d] in float32."""
    B, N, D = v.shape
    S = folded.shape[1]
    y = torch.empty(B, 1, D, device=v.device, dtype=torch.float32)
    grid = (B, triton.cdiv(D, BLOCK_D))
    _block_sum_kernel[grid](v.contiguous(), g.contiguous(), folded.contiguous(), pos, y, N, D, S=S,
                            SCALE=SCALES[scale], BLOCK_I=BLOCK_I, BLOCK_D=BLOCK_D, num_warps=4)
    return y


if TRITON_AVAILABLE:
    import triton
    import triton.language as tl

    @triton.jit
    def _block_sum_kernel(v_ptr, g_ptr, folded_ptr, pos_ptr, y_ptr, N, D, S: tl.constexpr, SCALE: tl.constexpr,
                          BLOCK_I: tl.constexpr, BLOCK_D: tl.constexpr):
        """y[b, cols] for one sequence b and BLOCK_D channels: the o + 1 pairs of each sum, BLOCK_I at a time."""
        b = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        in_d = cols < D
        t = tl.load(pos_ptr).to(tl.int64)
        o = t % S
        c = t - o
        stream = b * N * D
        acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
        for i0 in range(0, o + 1, BLOCK_I):
            i = i0 + tl.arange(0, BLOCK_I)
            ok = (i <= o)[:, None] & in_d[None, :]
            block = stream + (c + i)[:, None] * D + cols[None, :]
            lag = stream + (o - i)[:, None] * D + cols[None, :]
            vb = tl.load(v_ptr + block, mask=ok, other=0.0).to(tl.float32)
            gl = tl.load(g_ptr + lag, mask=ok, other=0.0).to(tl.float32)
            acc += tl.sum(vb * gl, axis=0)
            # the block's gates against the first lags (c + i ≥ S iff c ≥ S; for c = 0 the same pairs again)
            second = ok & (c + i >= S)[:, None]
            gb = tl.load(g_ptr + block, mask=second, other=0.0).to(tl.float32)
            vl = tl.load(v_ptr + lag, mask=second, other=0.0).to(tl.float32)
            acc += tl.sum(gb * vl, axis=0)
        acc += tl.load(folded_ptr + b * S * D + o * D + cols, mask=in_d, other=0.0)
        count = (t + 1).to(tl.float32)
        if SCALE == 1:
            acc = acc / tl.sqrt(count)
        elif SCALE == 2:
            acc = acc / count
        tl.store(y_ptr + b * D + cols, acc, mask=in_d)
