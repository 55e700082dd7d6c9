"""The next-token loss: chunked cross-entropy against the plain head, its padding of the vocabulary, and the
fused Triton softmax-gradient against its PyTorch reference (run by Triton's interpreter on the CPU)."""

import os

import pytest
import torch

from caracal_cli.loss import LOSS_CHUNK_ELEMENTS, ROW_ALIGN, TRITON_AVAILABLE, loss_path, next_token_loss, \
    padded_vocab, softmax_grad_reference, softmax_grad_triton

def _plain_loss(hidden, weight, targets, reduction):
    logits = hidden.flatten(0, 1) @ weight.t()
    return torch.nn.functional.cross_entropy(logits.float() if logits.dtype != torch.float64 else logits,
                                             targets.flatten(), reduction=reduction)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("chunk_rows", [1, 7, 30, 1000])  # 30 rows: uneven chunks, one row, one chunk, more
def test_chunked_loss_and_gradients_equal_plain_cross_entropy(chunk_rows, reduction):
    torch.manual_seed(0)
    hidden = torch.randn(2, 15, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 50, (2, 15))
    got = next_token_loss(hidden, weight, targets, reduction, chunk_rows=chunk_rows)
    want = _plain_loss(hidden, weight, targets, reduction)
    assert torch.allclose(got, want, rtol=1e-12, atol=0)
    upstream = torch.tensor(0.37, dtype=torch.float64)  # a non-unit upstream gradient reaches both inputs
    got_grads = torch.autograd.grad(got * upstream, (hidden, weight))
    want_grads = torch.autograd.grad(want * upstream, (hidden, weight))
    for g, w in zip(got_grads, want_grads, strict=True):
        assert torch.allclose(g, w, rtol=1e-10, atol=1e-14)
    with torch.no_grad():  # the no-grad path (validation) gives the same number
        assert torch.allclose(next_token_loss(hidden, weight, targets, reduction, chunk_rows=chunk_rows), want,
                              rtol=1e-12, atol=0)


def test_chunked_loss_under_bf16_autocast_matches_the_plain_head():
    torch.manual_seed(0)
    hidden = torch.randn(4, 32, 64, requires_grad=True)
    weight = torch.randn(300, 64, requires_grad=True)
    targets = torch.randint(0, 300, (4, 32))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = next_token_loss(hidden, weight, targets, chunk_rows=20)
        want = _plain_loss(hidden, weight, targets, "mean")
    assert got.dtype == torch.float32
    assert abs(got.item() - want.item()) < 1e-3 * want.item()
    got_grads = torch.autograd.grad(got, (hidden, weight))
    want_grads = torch.autograd.grad(want, (hidden, weight))
    for g, w in zip(got_grads, want_grads, strict=True):
        assert g.dtype == w.dtype == torch.float32
        assert ((g - w).norm() / w.norm()).item() < 2e-2


def test_padding_rows_get_no_probability_and_no_gradient():
    torch.manual_seed(0)
    vocab, width = 50, 128
    logits = torch.randn(6, width, dtype=torch.float64)
    logits[:, vocab:] = 1e3  # whatever the padded columns hold, they must not count
    targets = torch.randint(0, vocab, (6,))
    want = torch.nn.functional.cross_entropy(logits[:, :vocab], targets, reduction="none")
    want_grad = torch.softmax(logits[:, :vocab], -1) - torch.nn.functional.one_hot(targets, vocab)
    loss = softmax_grad_reference(logits, targets, vocab, grad=True)
    assert torch.allclose(loss, want, rtol=1e-12)
    assert torch.allclose(logits[:, :vocab], want_grad, rtol=1e-12, atol=1e-15)
    assert (logits[:, vocab:] == 0).all()


def test_default_chunks_are_aligned_and_bounded():
    """GPT-2's head pads to 50304 rows; a chunk is a multiple of ROW_ALIGN rows within the element budget."""
    vocab = 50257
    padded = padded_vocab(vocab)
    chunk = max(ROW_ALIGN, LOSS_CHUNK_ELEMENTS // padded // ROW_ALIGN * ROW_ALIGN)
    assert padded == 50304 and chunk % ROW_ALIGN == 0 and chunk * padded <= LOSS_CHUNK_ELEMENTS


def test_loss_path_picks_the_reference_off_cuda():
    assert loss_path(torch.device("cpu"), torch.bfloat16) == "torch"
    assert loss_path(torch.device("cuda"), torch.float64) == "torch"
    assert loss_path(torch.device("cuda"), torch.bfloat16, impl="torch") == "torch"
    with pytest.raises(ValueError, match="loss impl"):
        loss_path(torch.device("cpu"), torch.float32, impl="fast")


@pytest.mark.skipif(not (TRITON_AVAILABLE and os.environ.get("TRITON_INTERPRET") == "1"),
                    reason="runs the Triton kernel on the CPU only with triton installed and TRITON_INTERPRET=1 "
                           "(conftest sets it where there is no GPU; tests/gpu runs the kernel compiled)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
# vocab below one block, not a multiple of it, exactly one
@pytest.mark.parametrize("vocab, width", [(10, 128), (5000, 5120), (4096, 4096)])
def test_triton_softmax_gradient_equals_the_reference_in_the_interpreter(dtype, vocab, width):
    torch.manual_seed(0)
    x = (torch.randn(5, width) * 4).to(dtype)
    x[0, :vocab] += 80  # a row far from zero: the running maximum matters
    t = torch.randint(0, vocab, (5,))
    ref, fused = x.clone(), x.clone()
    want = softmax_grad_reference(ref, t, vocab, True)
    got = softmax_grad_triton(fused, t, vocab, True)
    loss_only = softmax_grad_triton(x.clone(), t, vocab, False)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss_only, want, rtol=1e-5, atol=1e-5)
    step = 2 ** -8 if dtype == torch.bfloat16 else 1e-6  # one bf16 step at 1 (the target's p − 1)
    assert (fused.float() - ref.float()).abs().max().item() <= step
    assert (fused[:, vocab:] == 0).all()
