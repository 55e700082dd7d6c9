"""On CUDA the next-token loss turns each chunk's logits into their gradient with a Triton kernel; elsewhere
PyTorch does. Compare the two on the GPU (skipped without CUDA) at GPT-2's vocabulary and a ragged chunk."""

import pytest
import torch

from caracal_cli.loss import accumulate_grad_w, loss_path, next_token_loss, softmax_grad_reference, softmax_grad_triton

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (Triton loss)")]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_kernel_equals_reference_at_gpt2_vocabulary(dtype):
    torch.manual_seed(0)
    vocab, width = 50257, 50304
    x = (torch.randn(300, width, device="cuda") * 5).to(dtype)
    t = torch.randint(0, vocab, (300,), device="cuda")
    ref, fused = x.clone(), x.clone()
    want = softmax_grad_reference(ref, t, vocab, True)
    got = softmax_grad_triton(fused, t, vocab, True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    step = 2 ** -8 if dtype == torch.bfloat16 else 1e-6
    assert (fused.float() - ref.float()).abs().max().item() <= step
    assert (fused[:, vocab:] == 0).all()


def test_fused_loss_and_gradients_equal_the_reference_under_autocast():
    torch.manual_seed(0)
    assert loss_path(torch.device("cuda"), torch.bfloat16) == "triton"
    hidden = torch.randn(4, 700, 256, device="cuda", requires_grad=True)
    weight = (torch.randn(50257, 256, device="cuda") * 0.02).requires_grad_()
    targets = torch.randint(0, 50257, (4, 700), device="cuda")
    results = {}
    for impl in ("auto", "torch"):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = next_token_loss(hidden, weight, targets, chunk_rows=1152, impl=impl)  # 2800 rows: a ragged end
        results[impl] = (loss, *torch.autograd.grad(loss, (hidden, weight)))
    for got, want in zip(results["auto"], results["torch"], strict=True):
        assert got.dtype == want.dtype
        assert ((got - want).norm() / want.norm()).item() < 1e-3


def test_head_gradient_accumulates_in_float32_in_one_gemm():
    """accumulate_grad_w's CUDA form (addmm into float32) against the float64 sum of the chunks' products."""
    torch.manual_seed(0)
    chunks = [(torch.randn(1000, 384, device="cuda").bfloat16(), torch.randn(1000, 256, device="cuda").bfloat16())
              for _ in range(3)]
    grad_w = torch.zeros(384, 256, device="cuda")
    for logits, hc in chunks:
        grad_w = accumulate_grad_w(grad_w, logits, hc)
    want = sum(logits.double().t() @ hc.double() for logits, hc in chunks)
    assert grad_w.dtype == torch.float32
    assert ((grad_w.double() - want).norm() / want.norm()).item() < 1e-5
