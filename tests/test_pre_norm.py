"""MHF's pre-convolution + LayerNorm kernel (`caracal_cli/mixers/pre_norm.py`) against its PyTorch reference, in
Triton's interpreter on the CPU (tests/conftest.py sets TRITON_INTERPRET=1); the GPU runs the same kernels
compiled."""

import os

import pytest
import torch

from caracal_cli.mixers import pre_norm

pytestmark = pytest.mark.skipif(not (pre_norm.TRITON_AVAILABLE and os.environ.get("TRITON_INTERPRET") == "1"),
                                reason="runs the Triton kernels on the CPU only with triton and TRITON_INTERPRET=1")


def _inputs(B, L, D, k, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    make = lambda *shape, scale=1.0, shift=0.0: (scale * torch.randn(*shape, generator=gen, dtype=dtype)  # noqa: E731
                                                 + shift).requires_grad_()
    return make(B, L, D, shift=0.3), make(D, 1, k, scale=0.5), make(D, shift=1.0), make(D, scale=0.1)


@pytest.mark.parametrize("B, L, D, k, emit_cast", [(2, 37, 48, 3, True), (3, 5, 16, 1, False), (1, 20, 100, 4, True),
                                                   (2, 9, 24, 3, False)])
def test_kernels_match_the_reference_forward_and_every_gradient(B, L, D, k, emit_cast):
    """float32 through the kernels against float64 through the reference: x_norm, the cast of x, and the
    gradients of x, the taps, γ and β (the cast's gradient adds into dx, as the value stream's does)."""
    x, w, gamma, beta = _inputs(B, L, D, k)
    d_norm, d_cast = torch.randn(B, L, D, dtype=torch.float64), torch.randn(B, L, D, dtype=torch.float64)
    ref = pre_norm.conv_layer_norm_reference(x, w.reshape(D, k), gamma, beta, 1e-5)
    want = torch.autograd.grad((ref * d_norm).sum() + (x * d_cast).sum() * emit_cast, (x, w, gamma, beta))
    leaves = [t.detach().float().requires_grad_() for t in (x, w, gamma, beta)]
    x_norm, x_cast = pre_norm.conv_layer_norm(*leaves, 1e-5, torch.float32, emit_cast)
    assert (x_cast is not None) == emit_cast and x_norm.dtype == torch.float32
    torch.testing.assert_close(x_norm.double(), ref, rtol=1e-5, atol=1e-5)
    if emit_cast:
        torch.testing.assert_close(x_cast, leaves[0].detach(), rtol=0, atol=0)
    loss = (x_norm * d_norm.float()).sum() + ((x_cast * d_cast.float()).sum() if emit_cast else 0)
    got = torch.autograd.grad(loss, leaves)
    for name, a, b in zip(("x", "taps", "gamma", "beta"), got, want, strict=True):
        assert a.shape == b.shape and a.dtype == torch.float32, name
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4 * b.abs().max().item(), msg=name)


def test_bf16_outputs_from_float32_rows():
    """The model's case: the residual stream in float32, x_norm and x's cast in bf16 for the linears."""
    x, w, gamma, beta = (t.detach().float() for t in _inputs(2, 33, 64, 3))
    x_norm, x_cast = pre_norm.conv_layer_norm(x, w, gamma, beta, 1e-5, torch.bfloat16, True)
    ref = pre_norm.conv_layer_norm_reference(x, w.reshape(64, 3), gamma, beta, 1e-5)
    assert x_norm.dtype == x_cast.dtype == torch.bfloat16
    torch.testing.assert_close(x_norm.float(), ref, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(x_cast.float(), x, rtol=1e-2, atol=1e-2)


def test_causal_within_each_sequence():
    """Changing positions ≥ t of one sequence changes nothing before t, and nothing in the other sequence."""
    x, w, gamma, beta = (t.detach().float() for t in _inputs(2, 24, 32, 3))
    base, _ = pre_norm.conv_layer_norm(x, w, gamma, beta, 1e-5, torch.float32)
    x[0, 10:] += torch.randn(14, 32)
    moved, _ = pre_norm.conv_layer_norm(x, w, gamma, beta, 1e-5, torch.float32)
    assert torch.equal(moved[0, :10], base[0, :10]) and torch.equal(moved[1], base[1])
    assert not torch.equal(moved[0, 10:], base[0, 10:])


def test_one_operator_that_compiles_without_graph_breaks():
    x, w, gamma, beta = (t.detach().float().requires_grad_() for t in _inputs(2, 12, 16, 3))
    torch.library.opcheck(pre_norm.conv_layer_norm_op, (x, w.reshape(16, 3), gamma, beta, 1e-5, torch.float32, True))
    _, _, mean, rstd = pre_norm.conv_layer_norm_op(x, w.reshape(16, 3), gamma, beta, 1e-5, torch.float32, True)
    grads = (torch.randn_like(x), torch.randn_like(x))
    saved = (t.detach() for t in (x, w.reshape(16, 3), gamma, mean, rstd))
    torch.library.opcheck(pre_norm.conv_layer_norm_backward_op, (*grads, *saved))

    def stage(*args):
        x_norm, x_cast = pre_norm.conv_layer_norm(*args, 1e-5, torch.float32, True)
        return (x_norm.square() + x_cast * x_norm).sum()

    want = torch.autograd.grad(stage(x, w, gamma, beta), (x, w, gamma, beta))
    torch._dynamo.reset()
    got = torch.autograd.grad(torch.compile(stage, backend="aot_eager", fullgraph=True)(x, w, gamma, beta),
                              (x, w, gamma, beta))
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# --- the MHF module on its fused path (both kernels forced onto the CPU: the interpreter runs them) -----------
def _mhf_pair(monkeypatch, **cfg):
    from caracal_cli.config import ModelConfig
    from caracal_cli.mixers import build_mixer
    from caracal_cli.mixers.mhf import MHF

    model_cfg = ModelConfig(d_model=64, n_head=4)
    torch.manual_seed(0)
    fused = build_mixer({"kind": "mhf", **cfg}, model_cfg, "mixer")
    reference = build_mixer({"kind": "mhf", "module_impl": "torch", **cfg}, model_cfg, "mixer")
    reference.load_state_dict(fused.state_dict())
    real = MHF.fused_parts
    monkeypatch.setattr(MHF, "fused_parts", lambda self, device, dtype, quiet=False: (
        [] if self.cfg.module_impl == "torch" else
        [p for p, present in (("pre_norm", self.pre_conv), ("gate", self.gate_conv)) if present is not None]))
    return fused, reference, real


@pytest.mark.parametrize("cfg", [{}, {"value_from": "x_norm"}, {"gate": "linear"}, {"pre_conv": False},
                                 {"gate_kernel": 1, "pre_kernel": 4}])
def test_mhf_on_the_fused_path_equals_the_composition(monkeypatch, cfg):
    """Same parameters, same function: outputs and every parameter's gradient, float32, across the switches
    that change which kernels run."""
    fused, reference, _ = _mhf_pair(monkeypatch, **cfg)
    x = torch.randn(2, 40, 64)
    results = []
    for mixer in (fused, reference):
        xs = x.clone().requires_grad_()
        y = mixer(xs)
        y.square().mean().backward()
        results.append((y, xs.grad, {n: p.grad for n, p in mixer.named_parameters()}))
    (y1, dx1, g1), (y2, dx2, g2) = results
    torch.testing.assert_close(y1, y2, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(dx1, dx2, rtol=1e-4, atol=1e-6)
    assert g1.keys() == g2.keys()
    for name in g1:
        torch.testing.assert_close(g1[name], g2[name], rtol=1e-4, atol=1e-6, msg=name)


def test_mhf_fused_path_choice(monkeypatch):
    """CUDA in bf16 takes both kernels; a CPU, float32 or module_impl=torch the composition; fast raises where
    the kernels cannot run; `path` names what runs."""
    from caracal_cli.config import ModelConfig
    from caracal_cli.mixers import build_mixer

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    build = lambda n_head=4, **cfg: build_mixer({"kind": "mhf", **cfg}, ModelConfig(d_model=64, n_head=n_head),  # noqa: E731
                                                "m")
    assert build().fused_parts(cuda, torch.bfloat16) == ["pre_norm", "gate"]
    assert build(gate="linear").fused_parts(cuda, torch.float16) == ["pre_norm"]
    assert build().fused_parts(cpu, torch.bfloat16) == build().fused_parts(cuda, torch.float32) == []
    assert build(module_impl="torch").fused_parts(cuda, torch.bfloat16) == []
    assert build(n_head=8).fused_parts(cuda, torch.bfloat16) == ["pre_norm"]  # d_head 8: the gate conv in PyTorch
    with pytest.raises(RuntimeError, match="module_impl=fast"):
        build(module_impl="fast").fused_parts(cpu, torch.bfloat16)
    assert build().path(cuda).endswith("around it: triton conv+LayerNorm and SiLU+gate conv")
    assert "PyTorch composition" in build().path(cpu)


def test_auto_keeps_the_kernels_in_a_compiled_module():
    """Under torch.compile, auto keeps the kernels as fast does (custom operators inside Inductor's graph: 4.8 ms
    against 6.1 for Inductor's fusion of the composition, one H100 run); torch keeps the composition."""
    from caracal_cli.config import ModelConfig
    from caracal_cli.mixers import build_mixer

    for impl, parts in (("auto", 2), ("fast", 2), ("torch", 0)):
        mixer = build_mixer({"kind": "mhf", "module_impl": impl}, ModelConfig(d_model=64, n_head=4), "m")
        probe = lambda x, mixer=mixer: x + len(mixer.fused_parts(torch.device("cuda"), torch.bfloat16))  # noqa: E731
        torch._dynamo.reset()
        assert torch.compile(probe, backend="eager", fullgraph=True)(torch.zeros(1)).item() == parts, impl
