"""MHF's gate stream after its first projection, SiLU then a causal convolution grouped by head, as one fused op:

    y[b, t, o] = bias[o] + Σ_{j<k} Σ_{c<dh} weight[o, c, j] · silu(g1[b, t−(k−1)+j, h·dh + c]),   h = o // dh

(nn.Conv1d(D, D, k, groups=H) applied causally). In eager PyTorch this costs cuDNN's layout transposes and
elementwise kernels around a few GFLOPs of products; the Triton kernels here read g1 and write y once (forward)
and recompute SiLU in the backward instead of keeping silu(g1).

Rows are the flattened [B·L] tokens; a program takes BLOCK_M of them and one head. Tap j multiplies the rows
shifted back by k−1−j (zero where the shift crosses the start of the row's own sequence, so samples never mix)
by a [dh, dh] weight tile on the tensor cores. The backward is two kernels: d g1 (the same product against the
transposed taps, shifted forward and masked at the sequence's end, times silu'), and d weight / d bias as a
deterministic reduction: persistent programs each sum a fixed set of row blocks into fp32 partials, which torch
sums afterwards (no atomics). Bytes moved: the forward reads g1 and writes y; the backward reads dy and g1 twice
and writes dg1 (≈ 0.7 GB at 65,536 tokens, d = 768 in bf16, ≈ 0.15 ms of HBM time on an H200). Each program also
reads its head's k·dh² weights from L2: 1.5× its rows' bytes at dh = 64, 6× at dh = 128 (64 rows a program).

`gate_conv_path` is the one place that picks the implementation; `silu_gate_conv_reference` (F.conv1d) is the
exact reference and the path everywhere else. The kernels run inside custom operators (`caracal::silu_gate_conv`
and its two gradient ops), so torch.compile keeps them in the model's graph.
"""

from __future__ import annotations

import importlib.util
import os

import torch
import torch.nn.functional as F

TRITON_AVAILABLE = importlib.util.find_spec("triton") is not None
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # read, like triton.jit, when the kernels are defined
# (rows per program, warps) by d_head, read off sm_90 builds at k ≤ 4 (bf16): the forward and input-gradient
# kernels keep k weight tiles and k SiLU tiles live at once, ≤ 100 registers a thread at dh ≤ 64 (dh = 128 takes 64
# rows: 255, the forward spilling 16 bytes at k = 3); the weight-gradient loop pipelines its loads through shared
# memory (≤ 64 KB, ≤ 170 registers). 64 rows is also the M of Hopper's wgmma per warp group. At dh = 64 (d = 768,
# 12 heads, 65,536 rows, one H100, `scripts/bench_gate_conv.py`) 64 rows × 4 warps ran the forward in 0.191 ms
# against 0.227 for 128 × 8 (the input gradient 0.164 against 0.158).
ROW_TILES = {16: (128, 8), 32: (128, 8), 64: (64, 4), 128: (64, 8)}
REDUCE_TILES = {16: (64, 4), 32: (64, 4), 64: (64, 4), 128: (64, 8)}
# The weight-gradient reduction: about this many programs per streaming multiprocessor (each loops over many row
# blocks), with at most this many bytes of fp32 partials ([programs, H, k, dh, dh]). 4 per SM took the weight
# gradient from 0.474 to 0.339 ms in the run above (2 per SM left the GPU's load units idle; 8 was no faster).
REDUCE_PROGRAMS_PER_SM = 4
MAX_PARTIAL_BYTES = 8 << 20
INTERPRETER_SMS = 8  # CPU tensors (Triton's interpreter): enough programs to exercise the reduction


def gate_conv_path(device: torch.device, dtype: torch.dtype, d_head: int) -> str:
    """'triton' or 'torch': the implementation `silu_gate_conv` runs. The one place that decides."""
    if (device.type == "cuda" and TRITON_AVAILABLE and dtype in (torch.bfloat16, torch.float16)
            and 16 <= d_head <= 128 and d_head & (d_head - 1) == 0):  # tl.dot needs every dimension ≥ 16
        return "triton"
    return "torch"


def silu_gate_conv_reference(g1: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The op in plain PyTorch: g1 [B, L, D], weight [D, dh, k] (nn.Conv1d's grouped layout), bias [D] or None;
    returns [B, L, D] in g1's dtype."""
    D, dh, k = weight.shape
    h = F.pad(F.silu(g1), (0, 0, k - 1, 0)).transpose(1, 2)  # [B, D, k−1+L]
    b = None if bias is None else bias.to(g1.dtype)
    return F.conv1d(h, weight.to(g1.dtype), b, groups=D // dh).transpose(1, 2)


def silu_gate_conv(g1: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """conv(silu(g1)) grouped by head and causal, as defined in the module docstring: g1 [B, L, D], weight
    [D, dh, k], bias [D] or None → [B, L, D] in g1's dtype. The Triton kernels where `gate_conv_path` allows."""
    if gate_conv_path(g1.device, g1.dtype, weight.shape[1]) == "triton":
        return silu_gate_conv_fused(g1.contiguous(), weight, bias)
    return silu_gate_conv_reference(g1, weight, bias)


# --- custom operators ------------------------------------------------------------------------------------------
# They run the kernels on whatever device g1 is on: the tests call them directly on CPU tensors (the interpreter).

def _taps(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """weight [D, dh, k] as [k, dh (c), D (o)] in the operand dtype: tap j's [c, o] tile of a head has contiguous
    rows (the kernels read it per program; a copy of 2·D·dh·k bytes)."""
    return weight.permute(2, 1, 0).to(dtype).contiguous()


def _fp32_dot(dtype: torch.dtype) -> bool:
    """Products in float32: for float32 inputs (tests), and in the interpreter, whose tl.dot reads bf16 operands
    as integers. bf16 and fp16 operands multiply exactly in float32, so the interpreter still sees their rounding."""
    return dtype == torch.float32 or INTERPRETED


@torch.library.custom_op("caracal::silu_gate_conv", mutates_args=())
def silu_gate_conv_fused(g1: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The forward kernel on g1's device, any dtype (tests run it on CPU tensors in the interpreter): g1
    [B, L, D] (made contiguous), weight [D, dh, k] with dh a power of two ≥ 16, bias [D] or None."""
    g1 = g1.contiguous()
    B, L, D = g1.shape
    _, dh, k = weight.shape
    y = torch.empty_like(g1)
    block, warps = ROW_TILES[dh]
    grid = (triton.cdiv(B * L, block), D // dh)
    _forward_kernel[grid](g1, _taps(weight, g1.dtype), g1 if bias is None else bias, y, B * L, L, D,
                          K=k, DH=dh, BLOCK_M=block, HAS_BIAS=bias is not None, FP32_DOT=_fp32_dot(g1.dtype),
                          num_warps=warps)
    return y


@silu_gate_conv_fused.register_fake
def _(g1, weight, bias):
    return torch.empty_like(g1, memory_format=torch.contiguous_format)


@torch.library.custom_op("caracal::silu_gate_conv_input_grad", mutates_args=())
def silu_gate_conv_input_grad(dy: torch.Tensor, g1: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """d g1 = silu'(g1) · Σ_j dy[t + k−1−j] @ W_jᵀ, in g1's dtype."""
    dy, g1 = dy.contiguous(), g1.contiguous()
    B, L, D = g1.shape
    _, dh, k = weight.shape
    dg1 = torch.empty_like(g1)
    block, warps = ROW_TILES[dh]
    grid = (triton.cdiv(B * L, block), D // dh)
    _input_grad_kernel[grid](dy, g1, _taps(weight, g1.dtype), dg1, B * L, L, D, K=k, DH=dh, BLOCK_M=block,
                             FP32_DOT=_fp32_dot(g1.dtype), num_warps=warps)
    return dg1


@silu_gate_conv_input_grad.register_fake
def _(dy, g1, weight):
    return torch.empty_like(g1, memory_format=torch.contiguous_format)


def _reduce_programs(device: torch.device, blocks: int, heads: int, k: int, d_head: int) -> int:
    """Programs per head (P) of the weight-gradient reduction: about REDUCE_PROGRAMS_PER_SM per SM in all
    (P·H·k), each looping over many row blocks, with partials of P·H·k·dh²·4 ≤ MAX_PARTIAL_BYTES bytes (on an
    H100 or H200 at D = 768, H = 12, k = 3: P = 14, 8.3 MB)."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else INTERPRETER_SMS
    wanted = triton.cdiv(REDUCE_PROGRAMS_PER_SM * sms, heads * k)
    fits = MAX_PARTIAL_BYTES // (heads * k * d_head * d_head * 4)
    return max(1, min(blocks, wanted, fits))


@torch.library.custom_op("caracal::silu_gate_conv_weight_grad", mutates_args=())
def silu_gate_conv_weight_grad(dy: torch.Tensor, g1: torch.Tensor, d_head: int,
                               kernel: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(d weight [D, dh, k], d bias [D]), both float32: d W_j = Σ_t silu(g1[t−(k−1)+j])ᵀ dy[t] per head."""
    dy, g1 = dy.contiguous(), g1.contiguous()
    B, L, D = g1.shape
    heads, (block, warps) = D // d_head, REDUCE_TILES[d_head]
    blocks = triton.cdiv(B * L, block)
    programs = _reduce_programs(g1.device, blocks, heads, kernel, d_head)
    dw = torch.empty(programs, heads, kernel, d_head, d_head, device=g1.device, dtype=torch.float32)
    db = torch.empty(programs, heads, d_head, device=g1.device, dtype=torch.float32)
    _weight_grad_kernel[(kernel, programs, heads)](dy, g1, dw, db, B * L, L, D, blocks, K=kernel, DH=d_head,
                                                  BLOCK_M=block, FP32_DOT=_fp32_dot(g1.dtype), num_warps=warps)
    # partials [.., H, k, dh (c), dh (o)] → nn.Conv1d's [D (h, o), dh (c), k]
    dw = dw.sum(0).permute(0, 3, 2, 1).reshape(D, d_head, kernel)
    return dw, db.sum(0).reshape(D)


@silu_gate_conv_weight_grad.register_fake
def _(dy, g1, d_head, kernel):
    D = g1.shape[-1]
    return g1.new_empty((D, d_head, kernel), dtype=torch.float32), g1.new_empty((D,), dtype=torch.float32)


def _setup(ctx, inputs, output):
    g1, weight, bias = inputs
    ctx.save_for_backward(g1, weight)
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward(ctx, dy):
    g1, weight = ctx.saved_tensors
    need_g1, need_weight, need_bias = ctx.needs_input_grad
    dg1 = dweight = dbias = None
    if need_g1:
        dg1 = silu_gate_conv_input_grad(dy, g1, weight)
    if need_weight or need_bias:
        dw, db = silu_gate_conv_weight_grad(dy, g1, weight.shape[1], weight.shape[2])
        dweight = dw.to(weight.dtype) if need_weight else None
        dbias = db.to(ctx.bias_dtype) if need_bias else None
    return dg1, dweight, dbias


silu_gate_conv_fused.register_autograd(_backward, setup_context=_setup)


# --- Triton kernels ------------------------------------------------------------------------------------------
# g1, y, dy, dg1 are [B·L, D] row-major; a head's dh channels are one contiguous run of 2·dh bytes per row
# (128 bytes at dh = 64 in bf16). Row offsets are int64: B·L·D passes 2³¹ at a few million tokens.

if TRITON_AVAILABLE:
    import triton
    import triton.language as tl

    @triton.jit
    def _mm(a, b, acc, FP32_DOT: tl.constexpr):
        """a @ b + acc; FP32_DOT: the operands as float32, multiplied exactly (not in tf32)."""
        if FP32_DOT:
            out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        else:
            out = tl.dot(a, b, acc)
        return out

    @triton.jit
    def _silu_rows(g1_ptr, rows, shift, L, N, D, cols):
        """silu(g1[rows − shift]) [BLOCK_M, DH] in float32, zero where the shift leaves the row's sequence."""
        ok = (rows < N) & (rows % L >= shift)
        x = tl.load(g1_ptr + (rows - shift)[:, None] * D + cols[None, :], mask=ok[:, None], other=0.0)
        x = x.to(tl.float32)
        return x * tl.sigmoid(x)

    @triton.jit
    def _forward_kernel(g1_ptr, taps_ptr, bias_ptr, y_ptr, N, L, D, K: tl.constexpr, DH: tl.constexpr,
                        BLOCK_M: tl.constexpr, HAS_BIAS: tl.constexpr, FP32_DOT: tl.constexpr):
        """y[rows, head] = bias + Σ_j silu(g1[rows − (K−1−j)]) @ W_j, W_j the head's [c, o] tile of tap j."""
        rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.program_id(1) * DH + tl.arange(0, DH)
        c = tl.arange(0, DH)
        acc = tl.zeros((BLOCK_M, DH), dtype=tl.float32)
        for j in tl.static_range(K):
            w = tl.load(taps_ptr + j * DH * D + c[:, None] * D + cols[None, :])  # [c, o]
            x = _silu_rows(g1_ptr, rows, K - 1 - j, L, N, D, cols).to(y_ptr.dtype.element_ty)
            acc = _mm(x, w, acc, FP32_DOT)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols).to(tl.float32)[None, :]
        tl.store(y_ptr + rows[:, None] * D + cols[None, :], acc.to(y_ptr.dtype.element_ty), mask=(rows < N)[:, None])

    @triton.jit
    def _input_grad_kernel(dy_ptr, g1_ptr, taps_ptr, dg1_ptr, N, L, D, K: tl.constexpr, DH: tl.constexpr,
                           BLOCK_M: tl.constexpr, FP32_DOT: tl.constexpr):
        """dg1[rows] = silu'(g1[rows]) · Σ_j dy[rows + K−1−j] @ W_jᵀ: output t fed inputs t−(K−1)…t, so input t
        gets the gradients of outputs t…t+K−1, which lie in its own sequence."""
        rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.program_id(1) * DH + tl.arange(0, DH)
        c = tl.arange(0, DH)
        inside = rows < N
        acc = tl.zeros((BLOCK_M, DH), dtype=tl.float32)
        for j in tl.static_range(K):
            shift = K - 1 - j
            w_t = tl.load(taps_ptr + j * DH * D + c[None, :] * D + cols[:, None])  # [o, c]
            ok = inside & (rows % L + shift < L)
            dy = tl.load(dy_ptr + (rows + shift)[:, None] * D + cols[None, :], mask=ok[:, None], other=0.0)
            acc = _mm(dy.to(dg1_ptr.dtype.element_ty), w_t, acc, FP32_DOT)
        x = tl.load(g1_ptr + rows[:, None] * D + cols[None, :], mask=inside[:, None], other=0.0).to(tl.float32)
        s = tl.sigmoid(x)
        acc *= s * (1.0 + x * (1.0 - s))  # silu'(x)
        tl.store(dg1_ptr + rows[:, None] * D + cols[None, :], acc.to(dg1_ptr.dtype.element_ty), mask=inside[:, None])

    @triton.jit
    def _weight_grad_kernel(dy_ptr, g1_ptr, dw_ptr, db_ptr, N, L, D, blocks, K: tl.constexpr, DH: tl.constexpr,
                            BLOCK_M: tl.constexpr, FP32_DOT: tl.constexpr):
        """Program (j, p, h) sums silu(g1[rows − (K−1−j)])ᵀ dy[rows] over row blocks p, p + P, … into the
        partial dw[p, h, j] [c, o]; the tap-0 programs also sum dy (d bias) into db[p, h]. The K programs of
        one (p, h) read the same dy blocks in the same order, mostly from L2."""
        j, p, h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        programs, heads = tl.num_programs(1), tl.num_programs(2)
        cols = h * DH + tl.arange(0, DH)
        c = tl.arange(0, DH)
        acc = tl.zeros((DH, DH), dtype=tl.float32)
        bias_acc = tl.zeros((DH,), dtype=tl.float32)
        for block in range(p, blocks, programs):
            rows = tl.arange(0, BLOCK_M).to(tl.int64) + block * BLOCK_M  # block < 2³¹ / BLOCK_M
            dy = tl.load(dy_ptr + rows[:, None] * D + cols[None, :], mask=(rows < N)[:, None], other=0.0)
            x = _silu_rows(g1_ptr, rows, K - 1 - j, L, N, D, cols).to(dy.dtype)
            acc = _mm(tl.trans(x), dy, acc, FP32_DOT)
            bias_acc += tl.sum(dy.to(tl.float32), axis=0)
        part = (p * heads + h) * K + j
        tl.store(dw_ptr + part * DH * DH + c[:, None] * DH + c[None, :], acc)
        if j == 0:
            tl.store(db_ptr + (p * heads + h) * DH + c, bias_acc)
