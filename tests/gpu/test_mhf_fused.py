"""MHF's fused path on CUDA (the kernels compiled, not interpreted): the pre-convolution + LayerNorm and the
SiLU + gate convolution kernels against their references, and the whole module against its PyTorch
composition, eager and compiled (skipped without CUDA)."""

import pytest
import torch

from caracal_cli.config import ModelConfig
from caracal_cli.mixers import build_mixer, gate_conv, pre_norm

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (Triton)")]


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("d", [768, 1536])
def test_pre_norm_kernel_against_float64(d):
    torch.manual_seed(0)
    x = (torch.randn(4, 300, d, device="cuda") + 0.3).requires_grad_()
    w = (0.5 * torch.randn(d, 3, device="cuda")).requires_grad_()
    gamma = (1 + 0.1 * torch.randn(d, device="cuda")).requires_grad_()
    beta = (0.1 * torch.randn(d, device="cuda")).requires_grad_()
    leaves = (x, w, gamma, beta)
    ref = pre_norm.conv_layer_norm_reference(*(t.double() for t in leaves), 1e-5)
    dn = torch.randn_like(ref)
    want = torch.autograd.grad((ref * dn).sum() + (x.double() * dn).sum(), leaves)
    x_norm, x_cast = pre_norm.conv_layer_norm(*leaves, 1e-5, torch.bfloat16, emit_cast=True)
    assert rel(x_norm, ref) < 1e-2 and rel(x_cast, x) < 1e-2
    got = torch.autograd.grad((x_norm.float() * dn.float()).sum() + (x_cast.float() * dn.float()).sum(), leaves)
    for name, a, b in zip(("x", "taps", "gamma", "beta"), got, want, strict=True):
        assert rel(a, b) < 2e-2, name


@pytest.mark.parametrize("d, heads", [(768, 12), (1024, 8)])
def test_gate_kernel_against_float64(d, heads):
    torch.manual_seed(0)
    assert gate_conv.gate_conv_path(torch.device("cuda"), torch.bfloat16, d // heads) == "triton"
    g1 = torch.randn(4, 300, d, device="cuda").to(torch.bfloat16).requires_grad_()
    w = (torch.randn(d, d // heads, 3, device="cuda") / (3 * d // heads) ** 0.5).requires_grad_()
    b = (0.1 * torch.randn(d, device="cuda")).requires_grad_()
    ref = gate_conv.silu_gate_conv_reference(g1.double(), w.double(), b.double())
    dy = torch.randn_like(ref)
    want = torch.autograd.grad((ref * dy).sum(), (g1, w, b))
    y = gate_conv.silu_gate_conv(g1, w, b)
    assert y.dtype == torch.bfloat16 and rel(y, ref) < 1e-2
    got = torch.autograd.grad((y.float() * dy.float()).sum(), (g1, w, b))
    for name, a, c in zip(("g1", "weight", "bias"), got, want, strict=True):
        assert rel(a, c) < 2e-2, name


@pytest.mark.parametrize("compiled", [False, True])
def test_fused_module_equals_the_composition_in_bf16(compiled):
    """Same parameters: the fused module's output and gradients against module_impl=torch under bf16 autocast
    (compiled: module_impl=fast, since auto leaves a compiled module to Inductor). Both round; the fused path
    less: its convolution and norm run in float32."""
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=768, n_head=12)
    fused = build_mixer({"kind": "mhf", "module_impl": "fast" if compiled else "auto"}, cfg, "m").cuda()
    reference = build_mixer({"kind": "mhf", "module_impl": "torch"}, cfg, "m").cuda()
    reference.load_state_dict(fused.state_dict())
    assert fused.fused_parts(torch.device("cuda"), torch.bfloat16) == ["pre_norm", "gate"]
    x = torch.randn(8, 512, 768, device="cuda")
    results = []
    for mixer in (fused, reference):
        run = torch.compile(mixer, fullgraph=True) if compiled else mixer
        xs = x.clone().requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = run(xs)
        y.float().square().mean().backward()
        results.append((y, xs.grad, {n: p.grad for n, p in mixer.named_parameters()}))
    (y1, dx1, g1), (y2, dx2, g2) = results
    assert rel(y1, y2) < 2e-2 and rel(dx1, dx2) < 3e-2
    for name in g1:
        assert rel(g1[name], g2[name]) < 3e-2, name
