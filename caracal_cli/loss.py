"""The next-token loss: cross-entropy of the tied head's logits hidden @ weightᵀ, computed chunk by chunk.

The whole logits never exist: at 65536 tokens and GPT-2's vocabulary they and their gradient would take
2 × 12.3 GiB in float32. Each chunk's gradient (softmax − one-hot) is formed in the forward, while its logits
are at hand, and the backward only scales it; so no logits are recomputed and the matmul count equals the
plain head's.

Two details make it fast on a GPU (measured on an H100 at llama-tiny, 16384 tokens per micro-step: the loss
took 35% of the step before them):
- The head's rows are padded with zeros to a multiple of `VOCAB_ALIGN` (and chunks to `ROW_ALIGN` rows), with
  the padded logits masked out. 50257 rows make cuBLAS fall back to unaligned (align-1) kernels 4–5× slower.
- On CUDA, one Triton kernel per chunk turns the logits into their gradient in place and returns each row's
  loss: two reads and one write of the chunk, where the eager ops (cast, log-sum-exp, subtract, exp, one-hot,
  cast back) take about ten passes. `softmax_grad_reference` is the same computation in PyTorch: the CPU path,
  and what the GPU test compares the kernel with.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F

from caracal_cli.mixers.precision import autocast_off

TRITON_AVAILABLE = importlib.util.find_spec("triton") is not None
LOSS_CHUNK_ELEMENTS = 1 << 28  # logits computed at once: 512 MiB in bf16, 1 GiB in float32
LOSS_PROFILE_LABEL = "caracal.next_token_loss"  # the loss's range in torch.profiler (its gradients included)
VOCAB_ALIGN = 128
ROW_ALIGN = 128


@torch.compiler.disable  # the chunk loop and its in-forward gradients stay eager under torch.compile
def next_token_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, reduction: str = "mean",
                    chunk_rows: int | None = None, impl: str = "auto") -> torch.Tensor:
    """Cross-entropy of hidden @ weightᵀ ([B, L, d] × [vocab, d]) against targets [B, L], accumulated in float32
    (float64 for float64 inputs); the one loss of training, validation, the speed benchmark and the memory
    estimate. The matmul runs in the autocast dtype when autocast is on, as the plain head would. `impl`:
    'auto' (the Triton kernel where `loss_path` allows it), 'torch' (the reference)."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be mean or sum, got {reduction!r}")
    h, t = hidden.flatten(0, 1), targets.flatten()
    device_type = h.device.type
    autocast = torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)
    dtype = torch.get_autocast_dtype(device_type) if autocast else h.dtype
    vocab = weight.shape[0]
    chunk = chunk_rows or max(ROW_ALIGN, LOSS_CHUNK_ELEMENTS // padded_vocab(vocab) // ROW_ALIGN * ROW_ALIGN)
    grad_fn = softmax_grad_triton if loss_path(h.device, dtype, impl) == "triton" else softmax_grad_reference
    # The matmuls take `dtype` by explicit casts, so autocast is off for both paths.
    with torch.profiler.record_function(LOSS_PROFILE_LABEL), autocast_off(h.device):
        if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
            total = _ChunkedLinearCrossEntropy.apply(h, weight, t, chunk, dtype, grad_fn)
        else:
            w = _padded_weight(weight, dtype)
            total = sum(grad_fn(h[i:i + chunk].to(dtype) @ w.t(), t[i:i + chunk], vocab, False).sum()
                        for i in range(0, h.shape[0], chunk))
    return total / t.numel() if reduction == "mean" else total


def loss_path(device: torch.device, dtype: torch.dtype, impl: str = "auto") -> str:
    """'triton' or 'torch': which softmax-gradient `next_token_loss` uses. The one place that decides."""
    if impl not in ("auto", "torch"):
        raise ValueError(f"loss impl must be auto or torch, got {impl!r}")
    fused = (impl == "auto" and device.type == "cuda" and TRITON_AVAILABLE
             and dtype in (torch.bfloat16, torch.float16, torch.float32))
    return "triton" if fused else "torch"


def padded_vocab(vocab: int) -> int:
    """The head's rows inside the loss: `vocab` rounded up to a multiple of VOCAB_ALIGN."""
    return -(-vocab // VOCAB_ALIGN) * VOCAB_ALIGN


def _padded_weight(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The head in `dtype` with zero rows up to `padded_vocab` (one copy, as the cast was anyway)."""
    pad = padded_vocab(weight.shape[0]) - weight.shape[0]
    w = weight.detach().to(dtype)
    return F.pad(w, (0, 0, 0, pad)) if pad else w


def _accumulator(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def softmax_grad_reference(logits: torch.Tensor, targets: torch.Tensor, vocab: int, grad: bool) -> torch.Tensor:
    """Each row's loss (float32; float64 for float64 logits) of logits [R, ≥vocab] whose columns from `vocab`
    on are padding. With `grad`, also overwrite the logits with d loss / d logits: softmax − one-hot, and 0 in
    the padding."""
    x = logits[:, :vocab].to(_accumulator(logits.dtype))
    lse = torch.logsumexp(x, dim=-1)
    loss = lse - x.gather(1, targets[:, None]).squeeze(1)
    if grad:
        probs = x.sub_(lse[:, None]).exp_()  # x is a copy, or the logits themselves: either may be overwritten
        probs[torch.arange(len(targets), device=targets.device), targets] -= 1
        logits[:, :vocab] = probs
        logits[:, vocab:] = 0
    return loss


def softmax_grad_triton(logits: torch.Tensor, targets: torch.Tensor, vocab: int, grad: bool, block: int = 4096,
                        warps: int = 8) -> torch.Tensor:
    """`softmax_grad_reference` as one Triton kernel: a program per row, two passes over its logits, `block`
    columns at a time (`scripts/bench_loss.py` times other blocks and warps)."""
    assert logits.stride(1) == 1 and targets.is_contiguous()
    loss = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
    _softmax_grad_kernel[(logits.shape[0],)](logits, logits.stride(0), targets, loss, vocab, logits.shape[1],
                                             GRAD=grad, BLOCK=block, num_warps=warps)
    return loss


def accumulate_grad_w(grad_w: torch.Tensor, logits: torch.Tensor, hc: torch.Tensor) -> torch.Tensor:
    """grad_w + logitsᵀ @ hc in grad_w's dtype. On CUDA with half operands, one GEMM whose epilogue adds into
    float32 (`out_dtype`). Elsewhere the product is formed in the operands' dtype, then cast and added: three
    more passes over a [vocab, d] tensor per chunk, and a rounding more (scripts/bench_loss.py times both)."""
    if grad_w.is_cuda and logits.dtype in (torch.float16, torch.bfloat16) and grad_w.dtype == torch.float32:
        return torch.addmm(grad_w, logits.t(), hc, out_dtype=torch.float32)
    return cast_then_add(grad_w, logits, hc)


def cast_then_add(grad_w: torch.Tensor, logits: torch.Tensor, hc: torch.Tensor) -> torch.Tensor:
    """grad_w += logitsᵀ @ hc with the product in the operands' dtype (any device)."""
    return grad_w.add_((logits.t() @ hc).to(grad_w.dtype))


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of h @ wᵀ whose gradients are computed chunk by chunk in the forward pass."""

    @staticmethod
    def forward(ctx, h, weight, t, chunk: int, dtype: torch.dtype, grad_fn):
        vocab, acc = weight.shape[0], _accumulator(dtype)
        w = _padded_weight(weight, dtype)
        grad_h = torch.empty(h.shape, dtype=dtype, device=h.device) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros(w.shape, dtype=acc, device=w.device) if ctx.needs_input_grad[1] else None
        total = torch.zeros((), dtype=acc, device=h.device)
        for i in range(0, h.shape[0], chunk):
            hc, tc = h[i:i + chunk].to(dtype), t[i:i + chunk]
            logits = hc @ w.t()
            total += grad_fn(logits, tc, vocab, True).sum()  # logits now hold their gradient
            if grad_h is not None:
                torch.mm(logits, w, out=grad_h[i:i + chunk])
            if grad_w is not None:
                grad_w = accumulate_grad_w(grad_w, logits, hc)
        ctx.save_for_backward(grad_h, None if grad_w is None else grad_w[:vocab])
        ctx.dtypes = h.dtype, weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_h, grad_w = ctx.saved_tensors
        h_dtype, w_dtype = ctx.dtypes
        return (None if grad_h is None else (grad_h * grad_total.to(grad_h.dtype)).to(h_dtype),
                None if grad_w is None else (grad_w * grad_total).to(w_dtype), None, None, None, None)


if TRITON_AVAILABLE:
    import triton
    import triton.language as tl

    @triton.jit
    def _softmax_grad_kernel(logits, row_stride, targets, loss, vocab, width, GRAD: tl.constexpr,
                             BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        base = logits + row * row_stride
        # Pass 1: the row's log-sum-exp, with a running maximum (one scalar per block, so masked lanes
        # and the first block's −inf never meet in a subtraction).
        top = float("-inf")
        total = 0.0
        for start in range(0, vocab, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            x = tl.load(base + cols, mask=cols < vocab, other=float("-inf")).to(tl.float32)
            new_top = tl.maximum(top, tl.max(x, 0))
            total = total * tl.exp(top - new_top) + tl.sum(tl.exp(x - new_top), 0)
            top = new_top
        lse = top + tl.log(total)
        target = tl.load(targets + row)
        tl.store(loss + row, lse - tl.load(base + target).to(tl.float32))
        if GRAD:  # Pass 2: softmax − one-hot over the vocabulary, 0 in the padding, in place
            for start in range(0, width, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                x = tl.load(base + cols, mask=cols < vocab, other=float("-inf")).to(tl.float32)
                g = tl.exp(x - lse) - tl.where(cols == target, 1.0, 0.0)
                tl.store(base + cols, g.to(logits.dtype.element_ty), mask=cols < width)
