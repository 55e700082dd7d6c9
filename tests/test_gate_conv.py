"""MHF's fused SiLU + grouped causal gate convolution (mixers/gate_conv.py): the Triton kernels (in Triton's
interpreter on the CPU) against the F.conv1d reference in float64, causality, the custom operators' registrations
and compiled graph, and the path choice."""

import os

import pytest
import torch

from caracal_cli.mixers import gate_conv
from caracal_cli.mixers.gate_conv import gate_conv_path, silu_gate_conv, silu_gate_conv_fused, silu_gate_conv_reference

pytestmark = pytest.mark.usefixtures("one_thread")
interpreter = pytest.mark.skipif(
    not (gate_conv.TRITON_AVAILABLE and os.environ.get("TRITON_INTERPRET") == "1"),
    reason="runs the Triton kernels on the CPU only with triton installed and TRITON_INTERPRET=1")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _inputs(batch, length, heads, d_head, kernel, dtype, bias=True):
    """g1 [B, L, D] in `dtype`; float32 parameters as nn.Conv1d(D, D, k, groups=H) keeps them."""
    D = heads * d_head
    g1 = torch.randn(batch, length, D).to(dtype).requires_grad_()
    weight = (torch.randn(D, d_head, kernel) / (d_head * kernel) ** 0.5).requires_grad_()
    b = torch.randn(D).requires_grad_() if bias else None
    return g1, weight, b


def _with_grads(fn, g1, weight, bias, dy):
    """fn's output and the gradients of ⟨y, dy⟩ for g1, weight and (where present) bias."""
    params = [g1, weight] + ([bias] if bias is not None else [])
    y = fn(g1, weight, bias)
    return y, torch.autograd.grad(y, params, dy.to(y.dtype))


@interpreter
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("heads", [1, 3])
@pytest.mark.parametrize("d_head", [16, 32])
@pytest.mark.parametrize("kernel", [1, 3])
def test_kernels_match_the_reference(kernel, d_head, heads, bias, dtype, tol):
    """Forward and every gradient against float64 autograd of the reference. L = 100 is no multiple of a row
    block (128 rows, 64 in the reduction), so blocks straddle the three sequences and must not mix them. bf16:
    the interpreter rounds float32 → bf16 toward zero (the GPU: to nearest)."""
    g1, weight, b = _inputs(3, 100, heads, d_head, kernel, dtype, bias)
    dy = torch.randn(g1.shape)
    y, grads = _with_grads(silu_gate_conv_fused, g1, weight, b, dy)
    exact = [t.detach().double().requires_grad_() if t is not None else None for t in (g1, weight, b)]
    y64, grads64 = _with_grads(silu_gate_conv_reference, *exact, dy.double())
    assert y.dtype == dtype and grads[0].dtype == dtype and grads[1].dtype == weight.dtype
    names = ["y", "dg1", "dweight", "dbias"][:1 + len(grads)]
    for name, got, want in zip(names, (y, *grads), (y64, *grads64), strict=True):
        assert torch.isfinite(got).all(), name
        assert rel(got, want) < tol, (name, rel(got, want))


@interpreter
def test_reduction_over_many_row_blocks_and_programs():
    """The weight gradient's persistent programs each sum several row blocks (the partials of 8 programs over 16
    blocks): the sum is the same as one pass."""
    g1, weight, b = _inputs(2, 500, 1, 16, 2, torch.float32)
    dy = torch.randn(g1.shape)
    _, grads = _with_grads(silu_gate_conv_fused, g1, weight, b, dy)
    _, want = _with_grads(silu_gate_conv_reference, g1, weight, b, dy)
    for got, exact in zip(grads, want, strict=True):
        assert rel(got, exact) < 1e-5


@interpreter
def test_backward_skips_the_kernels_of_gradients_not_needed(monkeypatch):
    calls = []
    for name in ("silu_gate_conv_input_grad", "silu_gate_conv_weight_grad"):
        op = getattr(gate_conv, name)
        monkeypatch.setattr(gate_conv, name, lambda *args, op=op, name=name: calls.append(name) or op(*args))
    g1, weight, b = _inputs(2, 40, 1, 16, 3, torch.float32)
    silu_gate_conv_fused(g1.detach(), weight, b).sum().backward()
    assert calls == ["silu_gate_conv_weight_grad"] and weight.grad is not None and b.grad is not None
    calls.clear()
    (dg1,) = torch.autograd.grad(silu_gate_conv_fused(g1, weight.detach(), None).sum(), g1)
    assert calls == ["silu_gate_conv_input_grad"]
    (want,) = torch.autograd.grad(silu_gate_conv_reference(g1, weight, None).sum(), g1)
    assert rel(dg1, want) < 1e-5


@interpreter
@pytest.mark.parametrize("fn", [silu_gate_conv_fused, silu_gate_conv_reference])
def test_is_causal(fn):
    """Changing g1 at positions ≥ t changes no output before t (and the other sample not at all)."""
    g1, weight, b = _inputs(2, 150, 2, 16, 3, torch.float32)
    g1 = g1.detach()
    y = fn(g1, weight, b).detach()
    later = g1.clone()
    later[0, 90:] = 5.0
    y2 = fn(later, weight, b).detach()
    assert torch.equal(y2[0, :90], y[0, :90]) and torch.equal(y2[1], y[1])
    assert not torch.equal(y2[0, 90:], y[0, 90:])


@interpreter
def test_operators_pass_opcheck_and_compile_into_one_graph():
    """The kernels are custom operators with fake (shape) implementations and a registered backward: opcheck
    tests those registrations, and a compiled caller keeps them in one graph with the eager results."""
    g1, weight, b = _inputs(2, 40, 2, 16, 3, torch.bfloat16)
    dy = torch.randn(g1.shape).to(torch.bfloat16)
    torch.library.opcheck(silu_gate_conv_fused, (g1, weight, b))
    torch.library.opcheck(silu_gate_conv_fused, (g1, weight, None))
    torch.library.opcheck(gate_conv.silu_gate_conv_input_grad, (dy, g1.detach(), weight.detach()))
    torch.library.opcheck(gate_conv.silu_gate_conv_weight_grad, (dy, g1.detach(), 16, 3))

    def gate(x, w, bias):
        return silu_gate_conv_fused(x * 2, w, bias).float().square().sum()

    want = torch.autograd.grad(gate(g1, weight, b), (g1, weight, b))
    torch._dynamo.reset()
    got = torch.autograd.grad(torch.compile(gate, backend="aot_eager", fullgraph=True)(g1, weight, b),
                              (g1, weight, b))
    for a, e in zip(got, want, strict=True):
        torch.testing.assert_close(a, e, rtol=0, atol=0)


def test_reference_is_mhfs_causal_grouped_conv():
    """The reference is nn.Conv1d(groups=H) over the left-padded SiLU, as MHF's CausalConv1d computes it."""
    conv = torch.nn.Conv1d(12, 12, 3, groups=3, bias=True).double()
    g1 = torch.randn(2, 9, 12, dtype=torch.float64)
    h = torch.nn.functional.pad(torch.nn.functional.silu(g1), (0, 0, 2, 0))
    want = conv(h.transpose(1, 2)).transpose(1, 2)
    torch.testing.assert_close(silu_gate_conv(g1, conv.weight, conv.bias), want, rtol=1e-12, atol=1e-12)


def test_path_choice(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(gate_conv, "TRITON_AVAILABLE", True)
    assert gate_conv_path(cpu, torch.bfloat16, 64) == "torch"
    assert gate_conv_path(cuda, torch.bfloat16, 64) == "triton"
    assert gate_conv_path(cuda, torch.float16, 128) == "triton"
    assert gate_conv_path(cuda, torch.bfloat16, 16) == "triton"
    assert gate_conv_path(cuda, torch.float32, 64) == "torch"  # float32 and float64 stay exact
    assert gate_conv_path(cuda, torch.float64, 64) == "torch"
    assert gate_conv_path(cuda, torch.bfloat16, 8) == "torch"  # tl.dot needs ≥ 16
    assert gate_conv_path(cuda, torch.bfloat16, 256) == "torch"
    assert gate_conv_path(cuda, torch.bfloat16, 48) == "torch"  # not a power of two
    monkeypatch.setattr(gate_conv, "TRITON_AVAILABLE", False)
    assert gate_conv_path(cuda, torch.bfloat16, 64) == "torch"


_SM90_BUILD = """
import json, sys, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from caracal_cli.mixers import gate_conv as gc

ints = {n: "i32" for n in ("N", "L", "D")}
KERNELS = [  # (kernel, its pointers' types, constants, tiles)
    (gc._forward_kernel, dict(g1_ptr="*bf16", taps_ptr="*bf16", bias_ptr="*fp32", y_ptr="*bf16"),
     dict(HAS_BIAS=True), gc.ROW_TILES),
    (gc._input_grad_kernel, dict(dy_ptr="*bf16", g1_ptr="*bf16", taps_ptr="*bf16", dg1_ptr="*bf16"), {},
     gc.ROW_TILES),
    (gc._weight_grad_kernel, dict(dy_ptr="*bf16", g1_ptr="*bf16", dw_ptr="*fp32", db_ptr="*fp32", blocks="i32"), {},
     gc.REDUCE_TILES),
]
out = {}
for fn, ptrs, const, tiles in KERNELS:
    for d_head in map(int, sys.argv[1:]):
        block, warps = tiles[d_head]
        sig = {**ptrs, **ints}
        names = list(fn.arg_names)
        # what the launcher sees at the model's shapes: 16-byte-aligned pointers and D a multiple of 16
        attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in sig if n.endswith("_ptr") or n == "D"}
        consts = dict(const, K=4, DH=d_head, BLOCK_M=block, FP32_DOT=False)
        sig.update({k: "constexpr" for k in consts})
        kernel = triton.compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", 90, 128),
                                options=dict(num_warps=warps))
        out[f"{fn.__name__} dh={d_head}"] = kernel.metadata.shared
print(json.dumps(out))
"""


@pytest.mark.skipif(not gate_conv.TRITON_AVAILABLE, reason="needs triton (its compiler builds for sm_90 without a GPU)")
def test_kernels_build_for_hopper():
    """The interpreter runs what the compiler may refuse (Python ints where it needs tensors, a dot's shapes): each
    kernel builds for sm_90 at k = 4 with its tiles for d_head 16 and 128, within an H100's shared memory."""
    import json
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the compiler, not the interpreter
    done = subprocess.run([sys.executable, "-c", _SM90_BUILD, "16", "128"], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    shared = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(shared) == 6 and all(used <= 232448 for used in shared.values()), shared
