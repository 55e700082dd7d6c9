"""The fast causal FFT convolution (mixers/fftconv.py): its algorithm in float64 against the torch.fft reference,
its custom backward by gradcheck, the path choice, and (on CUDA, or in Triton's interpreter) the kernels."""

import os

import pytest
import torch

from caracal_cli.config import ConfigError
from caracal_cli.mixers import build_mixer, fftconv
from caracal_cli.mixers.fftconv import TorchStages, fft_conv_path, monarch_causal_conv, split_for
from caracal_cli.mixers.mhf import causal_fft_conv, causal_fft_conv_reference
from conftest import small_model_config

LENGTHS = [1, 2, 7, 33, 255, 256, 300, 1024, 2049]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("length", [1, 200, 256, 257, 8192, 9000, 16384, 16385, 131072])
def test_split_pads_to_a_supported_power_of_two(length):
    P, T = split_for(length)
    padded = P * T
    assert padded == max(256, 1 << (length - 1).bit_length()) and T >= 16
    assert P >= T if length <= fftconv.MAX_ONCHIP_LEN else P == 128


def test_kernels_take_each_lengths_tuned_tiles_unless_told_otherwise():
    default = fftconv.TritonStages(500, "cpu", torch.bfloat16)
    assert (default.block_c, default.block_c2, default.rows, default.stages) == (64, 32, 4, 3)
    assert fftconv.TritonStages(1500, "cpu", torch.bfloat16).block_c2 == 64  # TUNED_TILES[2048]
    assert fftconv.TritonStages(1500, "cpu", torch.bfloat16, block_c2=16).block_c2 == 16
    assert fftconv.TritonStages(16384, "cpu", torch.bfloat16).a_left and not default.a_left  # TUNED_TILES[16384]
    assert not fftconv.TritonStages(16384, "cpu", torch.bfloat16, left=fftconv.LEFT_DATA).a_left
    with pytest.raises(ValueError, match="left=3"):
        fftconv.TritonStages(500, "cpu", torch.bfloat16, left=3)
    assert fftconv.TritonStages(16384, "cpu", torch.bfloat16).keep_transforms and not default.keep_transforms
    with pytest.raises(ValueError, match="keep=3"):
        fftconv.TritonStages(500, "cpu", torch.bfloat16, keep=3)


def test_longer_than_the_largest_split_is_refused():
    with pytest.raises(ValueError):
        split_for(fftconv.MAX_LEN + 1)


@pytest.mark.parametrize("length", LENGTHS)
def test_algorithm_equals_reference_in_float64(length):
    v, g = torch.randn(2, length, 5, dtype=torch.float64), torch.randn(2, length, 5, dtype=torch.float64)
    assert rel(monarch_causal_conv(v, g), causal_fft_conv_reference(v, g)) < 1e-13


@pytest.mark.parametrize("length, split_p", [(300, 16), (300, 32), (1000, 16), (1000, 32), (5000, 128)])
def test_every_split_of_the_padded_length_is_exact_in_float64(length, split_p):
    """Benchmarks may pick another (P, T) than SPLITS's: every factorisation computes the same convolution."""
    v, g = torch.randn(2, length, 3, dtype=torch.float64), torch.randn(2, length, 3, dtype=torch.float64)
    assert rel(monarch_causal_conv(v, g, split_p), causal_fft_conv_reference(v, g)) < 1e-12
    with pytest.raises(ValueError, match="no split P=8"):
        split_for(length, 8)


def test_algorithm_in_float32_and_its_dtype():
    v, g = torch.randn(2, 700, 6), torch.randn(2, 700, 6) + 1.0  # a mean: large low-frequency bins
    y = monarch_causal_conv(v, g)
    assert y.dtype == torch.float32
    assert rel(y, causal_fft_conv_reference(v.double(), g.double())) < 1e-5


def test_algorithm_is_causal():
    v, g = torch.randn(1, 300, 3, dtype=torch.float64), torch.randn(1, 300, 3, dtype=torch.float64)
    y = monarch_causal_conv(v, g)
    v2, g2 = v.clone(), g.clone()
    v2[:, 150:], g2[:, 150:] = 100.0, -7.0
    torch.testing.assert_close(monarch_causal_conv(v2, g2)[:, :150], y[:, :150], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("length", [5, 40, 300])
def test_custom_backward_passes_gradcheck(length):
    v = torch.randn(2, length, 3, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, length, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(monarch_causal_conv, (v, g), fast_mode=length > 100)


@pytest.mark.parametrize("which", ["v", "g"])
def test_backward_for_one_input_matches_reference_autograd(which):
    v, g = torch.randn(2, 100, 4, dtype=torch.float64), torch.randn(2, 100, 4, dtype=torch.float64)
    (v if which == "v" else g).requires_grad_()
    dy = torch.randn(2, 100, 4, dtype=torch.float64)
    x = v if which == "v" else g
    (fast,) = torch.autograd.grad(monarch_causal_conv(v, g), x, dy)
    (exact,) = torch.autograd.grad(causal_fft_conv_reference(v, g), x, dy)
    torch.testing.assert_close(fast, exact, rtol=1e-12, atol=1e-12)


def test_stages_keep_one_complex_number_per_token():
    stages = TorchStages(1000, "cpu", torch.float64)
    z = stages.analysis([torch.randn(3, 1000, 2, dtype=torch.float64)], flip=False)
    assert z.shape == (3, stages.P, stages.T, 2) and stages.P * stages.T == 1024 and z.is_complex()


def test_path_choice(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert fft_conv_path(cpu, torch.bfloat16) == "torch"
    with pytest.raises(RuntimeError, match="not a CUDA device"):
        fft_conv_path(cpu, torch.bfloat16, 512, impl="fast")
    monkeypatch.setattr(fftconv, "TRITON_AVAILABLE", True)
    assert fft_conv_path(cuda, torch.bfloat16, 2048) == "triton"
    assert fft_conv_path(cuda, torch.float16, 2048) == "triton"
    assert fft_conv_path(cuda, torch.float32, 2048) == "torch"  # float32 and float64 stay exact
    assert fft_conv_path(cuda, torch.float64, 2048) == "torch"
    assert fft_conv_path(cuda, torch.bfloat16, fftconv.MAX_LEN + 1) == "torch"
    # past the on-chip lengths the kernels run with torch.fft's spectral stage only when asked (fft_impl: fast)
    assert fft_conv_path(cuda, torch.bfloat16, 131072) == "torch"
    assert fft_conv_path(cuda, torch.bfloat16, 131072, impl="fast") == "triton"
    with pytest.raises(RuntimeError, match="L=262145"):
        fft_conv_path(cuda, torch.bfloat16, fftconv.MAX_LEN + 1, impl="fast")
    assert fft_conv_path(cuda, torch.bfloat16, 2048, impl="torch") == "torch"
    monkeypatch.setattr(fftconv, "TRITON_AVAILABLE", False)
    assert fft_conv_path(cuda, torch.bfloat16, 2048) == "torch"


def test_mhf_reports_its_path_and_validates_fft_impl(monkeypatch):
    model = small_model_config()
    mhf = build_mixer({"kind": "mhf"}, model)
    assert mhf.path(torch.device("cpu")).startswith("torch.fft (float32); ")
    monkeypatch.setattr(fftconv, "TRITON_AVAILABLE", True)
    assert mhf.path(torch.device("cuda")).startswith("triton")  # auto, the default: the kernels on CUDA
    assert build_mixer({"kind": "mhf", "fft_impl": "torch"}, model).path(torch.device("cuda")).startswith(
        "torch.fft (float32); ")
    with pytest.raises(ConfigError, match="fft_impl"):
        build_mixer({"kind": "mhf", "fft_impl": "cufft"}, model)


def test_swh_reports_the_fft_path_it_runs(monkeypatch):
    """SWH's spectral branch goes through causal_fft_conv with a bf16 input under autocast, so on CUDA it runs
    the kernels (it once reported torch.fft there)."""
    swh = build_mixer({"kind": "swh", "chunk": 4}, small_model_config())
    assert swh.path(torch.device("cpu")).startswith("torch.fft (float32) + ")
    monkeypatch.setattr(fftconv, "TRITON_AVAILABLE", True)
    assert swh.path(torch.device("cuda")).startswith("triton fft-conv")
    assert fft_conv_path(torch.device("cuda"), torch.bfloat16, 1024) == "triton"


def test_fast_impl_fails_loudly_on_cpu():
    mhf = build_mixer({"kind": "mhf", "fft_impl": "fast"}, small_model_config())
    with pytest.raises(RuntimeError, match="fft_impl=fast"):
        mhf(torch.randn(1, 8, 32))


# --- the Triton kernels -----------------------------------------------------------------------------------------

def _check_kernels(device, length, channels, dtype, batch=2, tol=None, split_p=0, left=0, keep=0):
    """Forward and both gradients of the Triton path against float64 autograd of the reference (`left` and
    `keep` 0: the length's tuned settings)."""
    v = torch.randn(batch, length, channels, device=device).to(dtype).requires_grad_()
    g = (0.5 * torch.randn(batch, length, channels, device=device) + 0.5).to(dtype).requires_grad_()
    dy = torch.randn(batch, length, channels, device=device).to(dtype)
    tiles = {} if device == "cuda" else dict(block_c=16, block_c2=16)
    y = fftconv.causal_fft_conv_fast(v, g, split_p=split_p, left=left, keep=keep, **tiles)
    dv, dg = torch.autograd.grad(y, (v, g), dy)
    v64, g64 = v.detach().double().requires_grad_(), g.detach().double().requires_grad_()
    y64 = causal_fft_conv_reference(v64, g64)
    dv64, dg64 = torch.autograd.grad(y64, (v64, g64), dy.double())
    tol = tol or (1e-5 if dtype == torch.float32 else 1e-2)
    assert y.dtype == dtype and dv.dtype == dtype and y.shape == v.shape
    for name, got, want in (("y", y, y64), ("dv", dv, dv64), ("dg", dg, dg64)):
        assert torch.isfinite(got).all(), name
        assert rel(got, want) < tol, (name, rel(got, want))
    if dtype != torch.float32:
        # MHF's default scale divides y_t by t+1, which weights the first positions, the sums of few terms,
        # as heavily as the last. The transforms' rounding error is spread evenly over positions, so its share
        # of y_t falls as 1/√t: the first EXACT_HEAD outputs are summed directly, and fp16 spectra scaled per
        # row keep the rest small (float64 emulation: 3.4e-3 at L = 16384; without the direct head 2.1e-2, with
        # bf16 spectra 1e-1).
        count = torch.arange(1, length + 1, device=device, dtype=torch.float64)[None, :, None]
        assert rel(y / count, y64 / count) < 1e-2, rel(y / count, y64 / count)


@pytest.mark.skipif(not (fftconv.TRITON_AVAILABLE and os.environ.get("TRITON_INTERPRET") == "1"),
                    reason="runs the Triton kernels on the CPU only with triton installed and TRITON_INTERPRET=1")
@pytest.mark.parametrize("length, channels, dtype, tol, split_p, left, keep", [
    (256, 16, torch.float32, 1e-5, 0, 0, 0),  # the kernels' float32 mode: their arithmetic, free of fp16 rounding
    (256, 16, torch.float32, 1e-5, 0, fftconv.LEFT_A, 0),  # the same with A as the left operand
    (256, 16, torch.float32, 1e-5, 0, 0, fftconv.KEEP_TRANSFORMS),  # the backward from the forward's transforms
    (300, 24, torch.bfloat16, 2e-2, 0, 0, 0),  # the interpreter rounds float32 → bf16 toward zero (the GPU: nearest)
    (7, 16, torch.float16, 2e-2, 0, 0, 0),
    (1024, 16, torch.bfloat16, 2e-2, 0, 0, 0),  # long enough for the weighted check to see how spectra are stored
    (1024, 16, torch.bfloat16, 2e-2, 0, fftconv.LEFT_A, 0),
    (1024, 16, torch.float16, 2e-2, 0, fftconv.LEFT_A, fftconv.KEEP_TRANSFORMS),
    (300, 16, torch.float16, 2e-2, 16, 0, 0),  # P < T, as benchmarks may try
])
def test_kernels_in_triton_interpreter(length, channels, dtype, tol, split_p, left, keep):
    _check_kernels("cpu", length, channels, dtype, tol=tol, split_p=split_p, left=left, keep=keep)


def test_long_sequences_split_with_p_128_and_a_torch_spectral_stage():
    for length in (16385, 32768, 131072, fftconv.MAX_LEN):
        st = fftconv.TritonStages(length, "cpu", torch.bfloat16)
        assert st.P == 128 and fftconv.padded_length(length) == st.P * st.T
        assert st.torch_spectral and not st.keep_transforms and st.a_left
    assert not fftconv.TritonStages(16384, "cpu", torch.bfloat16).torch_spectral


@pytest.mark.skipif(not (fftconv.TRITON_AVAILABLE and os.environ.get("TRITON_INTERPRET") == "1"),
                    reason="runs the Triton kernels on the CPU only with triton installed and TRITON_INTERPRET=1")
@pytest.mark.parametrize("length, dtype, tol, keep", [
    (1024, torch.float32, 1e-5, 0),  # float32 storage: torch.fft's stage exactly in the kernels' format
    (1024, torch.bfloat16, 2e-2, 0),
    (300, torch.float16, 2e-2, fftconv.KEEP_TRANSFORMS),  # asked to keep transforms: nothing to keep, spectra kept
])
def test_kernels_with_torch_spectral_stage_in_triton_interpreter(monkeypatch, length, dtype, tol, keep):
    """The long-sequence path at a small size: with the on-chip limit lowered, every T runs the spectral stage in
    torch.fft between the analysis and synthesis kernels; forward and both gradients against float64."""
    monkeypatch.setattr(fftconv, "MAX_ONCHIP_T", 8)
    assert fftconv.TritonStages(length, "cpu", dtype).torch_spectral
    _check_kernels("cpu", length, 16, dtype, tol=tol, keep=keep)


@pytest.mark.skipif(not (fftconv.TRITON_AVAILABLE and os.environ.get("TRITON_INTERPRET") == "1"),
                    reason="runs the Triton kernels on the CPU only with triton installed and TRITON_INTERPRET=1")
def test_kernels_are_one_operator_that_compiles_without_graph_breaks():
    """The fast path is a custom operator with a fake (shape) implementation and a registered backward: opcheck
    tests those registrations, and a compiled caller keeps it inside one graph with the eager gradients."""
    tiles = dict(block_c=16, block_c2=16)
    v = torch.randn(2, 40, 16).to(torch.bfloat16).requires_grad_()
    g = (0.5 * torch.randn(2, 40, 16) + 0.5).to(torch.bfloat16).requires_grad_()
    torch.library.opcheck(fftconv.monarch_conv, (v, g, *fftconv._tile_args(**tiles)))

    def mix(a, b):
        return fftconv.causal_fft_conv_fast(a * 2, b, **tiles).float().square().sum()

    want = torch.autograd.grad(mix(v, g), (v, g))
    torch._dynamo.reset()
    got = torch.autograd.grad(torch.compile(mix, backend="aot_eager", fullgraph=True)(v, g), (v, g))
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.skipif(not (fftconv.TRITON_AVAILABLE and os.environ.get("TRITON_INTERPRET") == "1"),
                    reason="runs the Triton kernels on the CPU only with triton installed and TRITON_INTERPRET=1")
def test_compiled_caracal_on_the_fast_path_breaks_its_graph_only_at_the_loss(monkeypatch):
    """On CUDA the MHF layers take the fast path; compiled, the model is then one graph up to the loss (which
    stays eager by design). Here the path is forced on the CPU and the interpreter runs the kernels."""
    from caracal_cli.model import build_model

    monkeypatch.setattr(fftconv, "fft_conv_path", lambda *args, **kwargs: "triton")
    model = build_model(small_model_config(d_model=64, n_head=4, context=32))
    ids = torch.randint(0, 97, (2, 33))
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(ids[:, :-1], targets=ids[:, 1:])
    reasons = [str(b.reason) for b in explained.break_reasons]
    assert explained.graph_count == 1 and all("next_token_loss" in r for r in reasons), reasons
    eager = model(ids[:, :-1], targets=ids[:, 1:])
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager")(ids[:, :-1], targets=ids[:, 1:])
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the fast path is CUDA-only)")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("length", [1, 300, 1000, 1500, 5000, 16384])
def test_fast_path_on_gpu(length, dtype):
    _check_kernels("cuda", length, 96 if length < 16384 else 64, dtype, batch=2 if length < 16384 else 1)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("left", [fftconv.LEFT_DATA, fftconv.LEFT_A])
@pytest.mark.parametrize("length", [1000, 9000])
def test_fast_path_on_gpu_with_either_left_operand(length, left):
    _check_kernels("cuda", length, 96, torch.bfloat16, left=left)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("keep", [fftconv.KEEP_SPECTRA, fftconv.KEEP_TRANSFORMS])
def test_fast_path_on_gpu_keeping_either_for_the_backward(keep):
    _check_kernels("cuda", 9000, 96, torch.bfloat16, keep=keep)


@pytest.mark.gpu
@gpu
def test_dispatch_and_mhf_module_on_gpu():
    v, g = torch.randn(2, 1024, 64, device="cuda").bfloat16(), torch.randn(2, 1024, 64, device="cuda").bfloat16()
    assert fft_conv_path(v.device, v.dtype, 1024) == "triton"
    assert rel(causal_fft_conv(v, g, "auto"), causal_fft_conv_reference(v.double(), g.double())) < 1e-2
    model = small_model_config(d_model=64, n_head=4)
    fast = build_mixer({"kind": "mhf", "fft_impl": "auto"}, model).cuda()
    ref = build_mixer({"kind": "mhf", "fft_impl": "torch"}, model).cuda()
    ref.load_state_dict(fast.state_dict())
    x = torch.randn(2, 700, 64, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert rel(fast(x), ref(x)) < 2e-2


@pytest.mark.gpu
@gpu
def test_triton_path_takes_a_filter_shared_across_the_batch():
    """SWH convolves every sample with one kernel ([1, L, D]); the kernels must not read past it."""
    v = torch.randn(3, 1000, 64, device="cuda").bfloat16().requires_grad_()
    g = torch.randn(1, 1000, 64, device="cuda").bfloat16().requires_grad_()
    y = causal_fft_conv(v, g, "fast")
    assert rel(y, causal_fft_conv_reference(v.double(), g.double())) < 1e-2
    y.float().square().sum().backward()
    assert g.grad.shape == g.shape and torch.isfinite(g.grad).all()


_SM90_BUILD = """
import json, torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from caracal_cli.mixers import fftconv as fc

def shared(fn, sig, const, warps, stages):
    names = list(fn.arg_names)
    # what the launcher assumes at the model's shapes: 16-byte-aligned pointers and every integer a multiple
    # of 16 (d = 1024, L a power of two); that enables async copies, which take the most shared memory
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n, t in sig.items() if t[0] in "*i"}
    sig = {**sig, **{k: "constexpr" for k in const}}
    kernel = triton.compile(ASTSource(fn, sig, const, attrs), target=GPUTarget("cuda", 90, 128),
                            options=dict(num_warps=warps, num_stages=stages))
    return kernel.metadata.shared

ptr = lambda names, kind: {n: kind for n in names.split()}  # noqa: E731
SIGS = {
    "analysis": (fc._analysis_kernel, {**ptr("x_ptr", "*bf16"), **ptr("z_ptr a_ptr", "*fp16"),
                 **ptr("peak_ptr tw_ptr", "*fp32"), **ptr("L D stride_b stride_t plane", "i32")}, dict(FLIP=True)),
    "spectral": (fc._spectral_kernel, {**ptr("za_ptr zb_ptr zc_ptr out_ptr out2_ptr ka_ptr kb_ptr f_ptr", "*fp16"),
                 **ptr("sa_ptr sb_ptr sc_ptr so_ptr so2_ptr tw_ptr", "*fp32"),
                 **ptr("D plane_a plane_b plane_c plane_o plane_k", "i32")}, dict(TWO=True, KEEP=False)),
    "synthesis": (fc._synthesis_kernel, {**ptr("w_ptr a_ptr", "*fp16"), **ptr("s_ptr", "*fp32"),
                  **ptr("y_ptr", "*bf16"), **ptr("L D plane", "i32"), "scale": "fp32"}, dict(FLIP=True)),
}
out = {"exact_head": shared(fc._exact_head_kernel, {**ptr("v_ptr g_ptr y_ptr", "*bf16"),
       **ptr("n D v_sb v_st g_sb g_st y_sb y_st", "i32")}, dict(K=fc.EXACT_HEAD, BLOCK_C=fc.TritonStages.head_block),
       fc.TritonStages.head_warps, 3)}
# every on-chip length's own split and tuned tiles, each distinct build once, and the longest (T = 2048: only
# analysis and synthesis; its spectral stage is torch.fft)
for length in [n for n in fc.SPLITS if n <= fc.MAX_ONCHIP_LEN] + [fc.MAX_LEN]:
    st = fc.TritonStages(length, "cpu", torch.bfloat16)
    # the spectral stage: the backward's (two outputs; from kept transforms where the length keeps them) and,
    # where it keeps them, the forward's, which writes them
    spectral = [] if st.torch_spectral else [dict(GIVEN=st.keep_transforms)] + (
        [dict(TWO=False, KEEP=True, GIVEN=False)] if st.keep_transforms else [])
    for i, name, block, extra in [(0, "analysis", st.block_c, {}), *[(1, "spectral", st.block_c2, e) for e in spectral],
                                  (2, "synthesis", st.block_c, {})]:
        fn, sig, flags = SIGS[name]
        const = dict(flags, P=st.P, T=st.T, ROWS=st.rows, FP32=False, BLOCK_C=block, **extra)
        if name in ("analysis", "synthesis"):
            const["A_LEFT"] = st.a_left
        key = f"{name} P={st.P} T={st.T} C={block} warps={st.warps[i]} A_LEFT={const.get('A_LEFT')} {extra}"
        if key not in out:
            out[key] = shared(fn, sig, const, st.warps[i], st.stages)
print(json.dumps(out))
"""


@pytest.mark.skipif(not fftconv.TRITON_AVAILABLE, reason="needs triton (its compiler builds for sm_90 without a GPU)")
def test_kernels_fit_hopper_shared_memory():
    """Each kernel, built for sm_90 with every length's split and tiles, fits the 227 KB of shared memory a
    block may use on an H100/H200 (once, a kernel that loaded one more tile per row needed 280 KB and failed
    only on the GPU)."""
    import json
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the compiler, not the interpreter
    done = subprocess.run([sys.executable, "-c", _SM90_BUILD], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    shared = json.loads(done.stdout.strip().splitlines()[-1])
    assert {key.split()[0] for key in shared} == {"analysis", "spectral", "exact_head", "synthesis"}
    assert all(used <= 232448 for used in shared.values()), shared
