"""Every registered mixer: causal, right shapes and dtypes, gradients everywhere, cached decoding exact.
Plus the oracles: FFT convolution vs direct convolution, SWA vs naive masked attention, RoPE as a rotation."""

import pytest
import torch

from caracal_cli.mixers import MIXERS, build_mixer
from caracal_cli.mixers.attention import Attention, _sliding_block_mask, apply_rope, attention_path, rope_tables
from caracal_cli.mixers.mhf import CausalConv1d, causal_fft_conv
from caracal_cli.model import reset_caches
from conftest import MIXER_EXAMPLES, all_mixer_examples, small_model_config

EXAMPLES = all_mixer_examples()
IDS = [name for name, _ in EXAMPLES]
RAWS = [raw for _, raw in EXAMPLES]


def make(raw, dtype=torch.float64, **model_overrides):
    return build_mixer(raw, small_model_config(**model_overrides)).to(dtype)


def test_every_registered_mixer_has_examples():
    assert set(MIXERS) <= set(MIXER_EXAMPLES)


@pytest.mark.parametrize("raw", RAWS, ids=IDS)
@pytest.mark.parametrize("pos_emb", ["none", "rope"])
def test_mixer_is_causal(raw, pos_emb):
    mixer = make(raw, pos_emb=pos_emb)
    x = torch.randn(2, 16, 32, dtype=torch.float64)
    y = mixer(x)
    for t in (0, 5, 14):
        x2 = x.clone()
        x2[:, t + 1:] = torch.randn_like(x2[:, t + 1:]) * 10
        y2 = mixer(x2)
        torch.testing.assert_close(y2[:, : t + 1], y[:, : t + 1], rtol=1e-10, atol=1e-10)
        assert not torch.allclose(y2[:, t + 1:], y[:, t + 1:])  # the future did change something


@pytest.mark.parametrize("raw", RAWS, ids=IDS)
def test_gradients_reach_every_parameter(raw):
    mixer = make(raw, dtype=torch.float32)
    x = torch.randn(2, 12, 32, requires_grad=True)
    mixer(x).square().mean().backward()
    for name, p in mixer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert x.grad.abs().sum() > 0


@pytest.mark.parametrize("raw", RAWS, ids=IDS)
def test_bf16_autocast_shapes_and_dtypes(raw):
    mixer = make(raw, dtype=torch.float32)
    x = torch.randn(2, 12, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = mixer(x)
    assert y.shape == x.shape and y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    torch.testing.assert_close(y.float(), mixer(x), rtol=0.05, atol=0.05)


@pytest.mark.parametrize("raw", RAWS, ids=IDS)
@pytest.mark.parametrize("prefill, chunk", [(1, 1), (6, 1), (2, 3)])
def test_cached_decoding_equals_full_forward(raw, prefill, chunk):
    """Prefill, then one token (or a chunk of 3: before and after a 5-key window's ring wraps) at a time."""
    mixer = make(raw, pos_emb="rope")
    x = torch.randn(2, 14, 32, dtype=torch.float64)
    full = mixer(x)
    cache = mixer.init_cache(2, 14, dtype=torch.float64)
    steps = [mixer(x[:, :prefill], cache)] + [mixer(x[:, t:t + chunk], cache) for t in range(prefill, 14, chunk)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("raw", RAWS, ids=IDS)
def test_static_step_equals_full_forward_and_the_cache_restarts(raw):
    """The graph-safe path: a prefill of 5, then prepare_step + step per token in caches longer than needed (a
    bucket: unused slots must stay masked); the same caches, emptied in place, then serve another sequence."""
    mixer = make(raw, pos_emb="rope")
    cache = mixer.init_cache(2, 32, dtype=torch.float64)
    for length in (14, 11):
        x = torch.randn(2, length, 32, dtype=torch.float64)
        reset_caches([cache])
        steps = [mixer(x[:, :5], cache)]
        for t in range(5, length):
            if hasattr(mixer, "prepare_step"):
                mixer.prepare_step(cache, t)
            steps.append(mixer.step(x[:, t:t + 1], cache))
        torch.testing.assert_close(torch.cat(steps, 1), mixer(x), rtol=1e-10, atol=1e-10)
        assert int(cache["pos"]) == length and all(isinstance(v, torch.Tensor) for v in cache.values())


def test_mhf_step_reads_only_the_first_and_the_current_block():
    """MHF's blocked decoding: once the finished blocks are folded, a step in block [c, c+S) reads the history
    only at [0, S) and [c, t], so its work does not grow with t. NaN between them leaves the outputs exact."""
    mixer = make({"kind": "mhf", "decode_block": 4})
    x = torch.randn(2, 16, 32, dtype=torch.float64)
    cache = mixer.init_cache(2, 16, dtype=torch.float64)
    steps = [mixer(x[:, :12], cache)]  # ends on a block boundary: the step's preparation folds [0, 12)
    mixer.prepare_step(cache, 12)
    cache["v"][:, 4:12] = cache["g"][:, 4:12] = float("nan")
    steps += [mixer.step(x[:, t:t + 1], cache) for t in range(12, 16)]
    torch.testing.assert_close(torch.cat(steps, 1), mixer(x), rtol=1e-10, atol=1e-10)


def direct_causal_conv(v, g):
    """O(L²) oracle: y_t = Σ_{j≤t} v_j ⊙ g_{t−j}."""
    L = v.shape[1]
    y = torch.zeros_like(v)
    for t in range(L):
        for j in range(t + 1):
            y[:, t] += v[:, j] * g[:, t - j]
    return y


@pytest.mark.parametrize("length", [1, 2, 7, 33])
def test_fft_convolution_equals_direct_convolution(length):
    v, g = torch.randn(2, length, 5, dtype=torch.float64), torch.randn(2, length, 5, dtype=torch.float64)
    torch.testing.assert_close(causal_fft_conv(v, g), direct_causal_conv(v, g), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("length", [1, 2, 7, 33])
def test_fft_convolution_gradients_equal_direct_convolution(length):
    # The reference's backward is written out (correlations by FFT): each gradient against autograd through
    # the O(L²) oracle, then gradcheck; the result is a contiguous [B, L, D] tensor.
    v, g = (torch.randn(2, length, 5, dtype=torch.float64, requires_grad=True) for _ in range(2))
    dy = torch.randn(2, length, 5, dtype=torch.float64)
    y = causal_fft_conv(v, g)
    assert y.is_contiguous()
    got = torch.autograd.grad(y, (v, g), dy)
    want = torch.autograd.grad(direct_causal_conv(v, g), (v, g), dy)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(causal_fft_conv, (v, g))
    (dg_only,) = torch.autograd.grad(causal_fft_conv(v.detach(), g), g, dy)  # one input needing a gradient
    torch.testing.assert_close(dg_only, want[1], rtol=1e-12, atol=1e-12)


def test_fft_convolution_with_a_filter_shared_across_the_batch():
    # SWH passes its kernel as [1, L, D]: its gradient is summed over the batch, as through an expand.
    v = torch.randn(3, 9, 4, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 9, 4, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(3, 9, 4, dtype=torch.float64)
    got = torch.autograd.grad(causal_fft_conv(v, k), (v, k), dy)
    want = torch.autograd.grad(direct_causal_conv(v, k.expand(3, -1, -1)), (v, k), dy)
    assert got[1].shape == (1, 9, 4)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_fft_convolution_gradients_keep_each_inputs_dtype():
    v = torch.randn(2, 16, 4, dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(2, 16, 4, dtype=torch.float32, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = causal_fft_conv(v, g)
    y.float().sum().backward()
    assert (y.dtype, v.grad.dtype, g.grad.dtype) == (torch.bfloat16, torch.bfloat16, torch.float32)


def test_fft_convolution_float32_and_bf16_inputs():
    v, g = torch.randn(2, 64, 8, dtype=torch.float64), torch.randn(2, 64, 8, dtype=torch.float64)
    exact = direct_causal_conv(v, g)
    torch.testing.assert_close(causal_fft_conv(v.float(), g.float()).double(), exact, rtol=1e-4, atol=1e-4)
    y = causal_fft_conv(v.bfloat16(), g.bfloat16())
    assert y.dtype == torch.bfloat16
    assert ((y.double() - exact).norm() / exact.norm()) < 1e-2


def naive_attention(q, k, v, window):
    """Softmax over an explicit score matrix with −inf outside the causal band."""
    L = q.shape[2]
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    i, j = torch.arange(L).unsqueeze(1), torch.arange(L).unsqueeze(0)
    allowed = (j <= i) & ((i - j) < window if window else True)
    return scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v


@pytest.mark.parametrize("groups", [12, 3])  # depthwise (shifted products) and grouped (nn.Conv1d)
def test_causal_conv_equals_left_padded_conv1d_and_steps_with_its_state(groups):
    conv = CausalConv1d(12, 3, groups=groups, bias=True)
    x = torch.randn(2, 9, 12)
    want = torch.nn.functional.conv1d(torch.nn.functional.pad(x.transpose(1, 2), (2, 0)), conv.conv.weight,
                                      conv.conv.bias, groups=groups).transpose(1, 2)
    assert torch.allclose(conv(x), want, atol=1e-6)
    state = torch.zeros(2, 2, 12)
    steps = torch.cat([conv(x[:, t:t + 1], state) for t in range(9)], dim=1)
    assert torch.allclose(steps, want, atol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert conv(x).dtype == torch.bfloat16 and torch.allclose(conv(x).float(), want, atol=5e-2)


@pytest.mark.parametrize("window", [None, 1, 4, 256])
def test_attention_equals_naive_masked_attention(window):
    mixer = make({"kind": "attention", "window": window})
    x = torch.randn(2, 20, 32, dtype=torch.float64)
    B, L, D = x.shape
    q, k, v = mixer.qkv(x).view(B, L, 3, 4, 8).permute(2, 0, 3, 1, 4)
    expected = mixer.out(naive_attention(q, k, v, window).transpose(1, 2).reshape(B, L, D))
    torch.testing.assert_close(mixer(x), expected, rtol=1e-10, atol=1e-10)


def test_rope_is_a_relative_rotation():
    cos, sin = rope_tables(32, 16, 10000.0)
    q, k = torch.randn(1, 1, 1, 16, dtype=torch.float64), torch.randn(1, 1, 1, 16, dtype=torch.float64)
    at = lambda x, p: apply_rope(x, cos[p:p + 1].double(), sin[p:p + 1].double())  # noqa: E731
    torch.testing.assert_close(at(q, 7).norm(), q.norm())  # a rotation keeps the norm
    dot = lambda m, n: (at(q, m) * at(k, n)).sum()  # noqa: E731
    torch.testing.assert_close(dot(9, 3), dot(26, 20), rtol=1e-5, atol=1e-5)  # only m − n matters
    assert not torch.allclose(dot(9, 3), dot(9, 4))


def test_rope_tables_are_buffers_outside_the_compiled_graph_and_grow_past_the_context():
    """RoPE's cos/sin are computed once, not inside every forward: a compiled graph only reads them (Inductor had
    fused their pow/cos/sin into the rotation kernels), and checkpoints do not carry them."""
    mixer = build_mixer({"kind": "attention"}, small_model_config(pos_emb="rope", context=16))
    assert set(mixer.state_dict()) == {"qkv.weight", "out.weight"}
    ops: list[str] = []

    def record(graph_module, example_inputs):
        ops.extend(str(node.target) for node in graph_module.graph.nodes if node.op.startswith("call_"))
        return graph_module.forward

    torch._dynamo.reset()
    x = torch.randn(2, 16, 32)
    torch.testing.assert_close(torch.compile(mixer, backend=record, fullgraph=True)(x), mixer(x))
    assert ops and not [op for op in ops if "cos" in op or "sin" in op or "pow" in op], ops
    cos, sin = rope_tables(40, 8, 10000.0)
    mixer(torch.randn(1, 40, 32))  # past the 16-position context: the tables grow
    assert mixer.rotary.cos.shape[0] >= 40
    torch.testing.assert_close(mixer.rotary.cos[:40], cos)
    torch.testing.assert_close(mixer.rotary.sin[:40], sin)


def test_attention_path_is_reported():
    mixer = make({"kind": "attention", "window": 8})
    assert isinstance(mixer, Attention)
    assert mixer.path(torch.device("cpu")) == "sdpa+band-mask"
    assert mixer.path(torch.device("cuda")).startswith("flex_attention")
    assert attention_path(torch.device("cuda"), 8, 1024) == "flex_attention"
    assert attention_path(torch.device("cuda"), 8, 1000) == "sdpa+band-mask"  # lm-eval's odd lengths
    assert attention_path(torch.device("cuda"), None, 1000) == "sdpa-flash"


@pytest.mark.parametrize("length", [128, 512, 1280])
@pytest.mark.parametrize("window", [1, 64, 127, 128, 129, 256, 300, 4096])
def test_sliding_block_mask_from_block_arithmetic_equals_create_block_mask(length, window):
    """The SWA layers' flex_attention mask, built per block, equals the one create_block_mask finds by evaluating
    every (q, k) pair: the same partial and full blocks, in the same order, both ways (forward and backward)."""
    from torch.nn.attention.flex_attention import create_block_mask

    got = _sliding_block_mask(length, window, "cpu")
    want = create_block_mask(lambda b, h, q, k: (k <= q) & (q - k < window), None, None, length, length, device="cpu")
    assert torch.equal(got.to_dense(), want.to_dense())
    for counts, indices in (("kv_num_blocks", "kv_indices"), ("full_kv_num_blocks", "full_kv_indices"),
                            ("q_num_blocks", "q_indices"), ("full_q_num_blocks", "full_q_indices")):
        n = getattr(got, counts)[0, 0]
        assert torch.equal(n, getattr(want, counts)[0, 0]), counts
        for row, count in enumerate(n.tolist()):
            assert torch.equal(getattr(got, indices)[0, 0, row, :count], getattr(want, indices)[0, 0, row, :count])


def test_sliding_block_mask_at_131072_positions_stays_small():
    """create_block_mask needed [L, L] (17 GB of booleans alone) here; the block form holds [L/128, L/128]."""
    mask = _sliding_block_mask(131072, 256, "cpu")
    assert mask.kv_indices.shape == (1, 1, 1024, 1024) and mask.kv_num_blocks.max() == 2
    assert mask.full_kv_num_blocks.max() == 1
