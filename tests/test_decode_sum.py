"""MHF's decoding sum (mixers/decode_sum.py): the Triton kernel, in Triton's interpreter on the CPU, against the
PyTorch reference at every position of several blocks, and a Caracal model decoded through it against the full
forward; the path choice."""

import os

import pytest
import torch

from caracal_cli.config import load_preset
from caracal_cli.generate import Decoder
from caracal_cli.mixers import decode_sum
from caracal_cli.model import build_model

pytestmark = pytest.mark.usefixtures("one_thread")
interpreter = pytest.mark.skipif(
    not (decode_sum.TRITON_AVAILABLE and os.environ.get("TRITON_INTERPRET") == "1"),
    reason="runs the Triton kernel on the CPU only with triton installed and TRITON_INTERPRET=1")


def filled_caches(batch: int, positions: int, length: int, d: int, S: int, dtype: torch.dtype):
    """Streams written up to `positions` (the rest zero, as a decoding cache holds them) and a fold."""
    v = torch.zeros(batch, length, d, dtype=dtype)
    g = torch.zeros(batch, length, d, dtype=dtype)
    v[:, :positions] = torch.randn(batch, positions, d).to(dtype)
    g[:, :positions] = torch.randn(batch, positions, d).to(dtype)
    return v, g, torch.randn(batch, S, d)


@interpreter
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("scale", ["sqrt", "mean", "none"])
def test_kernel_equals_the_reference_at_every_position(dtype, scale):
    """Blocks of S = 8 (the first, where both sums would count the same pairs, and later ones), d = 80 (a partial
    channel tile), more than BLOCK_I positions in a block (S = 40): every offset in its block."""
    torch.manual_seed(0)
    for S, d, positions in ((8, 80, range(24)), (40, 24, (0, 31, 32, 33, 39, 40, 41, 72, 79, 80, 119))):
        length = 3 * S
        for t in positions:
            v, g, folded = filled_caches(2, t + 1, length, d, S, dtype)
            pos = torch.tensor(t)
            got = decode_sum.block_sum_fused(v, g, folded, pos, scale)
            want = decode_sum.block_sum_reference(v, g, folded, pos, scale)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=f"S={S}, t={t}")


@interpreter
def test_caracal_decodes_through_the_kernel_as_the_full_forward(monkeypatch):
    """Every position of a demo Caracal model, decoded one token at a time with the kernel summing each block
    (decode_block 4, so many blocks and folds), equals the full forward."""
    monkeypatch.setattr(decode_sum, "decode_sum_path", lambda device, dtype: "triton")
    calls = []
    fused = decode_sum.block_sum_fused
    monkeypatch.setattr(decode_sum, "block_sum_fused", lambda *a: calls.append(1) or fused(*a))
    torch.manual_seed(0)
    model = build_model(load_preset("demo", ["model.vocab_size=101", "model.mixers.F.decode_block=4"]).model).eval()
    ids = torch.randint(0, 101, (2, 18))
    decoder = Decoder(model, graphs=False)
    logits = [decoder.start(ids[:, :5], 13)]
    logits += [decoder.step(ids[:, t]) for t in range(5, 17)]
    with torch.no_grad():
        full = model(ids)[:, 4:17]
    torch.testing.assert_close(torch.stack(logits, 1), full, rtol=1e-4, atol=1e-4)
    assert calls  # the kernel did the steps' sums


def test_path_choice():
    assert decode_sum.decode_sum_path(torch.device("cpu"), torch.bfloat16) == "torch"
    assert decode_sum.decode_sum_path(torch.device("cuda"), torch.float64) == "torch"
    expected = "triton" if decode_sum.TRITON_AVAILABLE else "torch"
    assert decode_sum.decode_sum_path(torch.device("cuda"), torch.bfloat16) == expected


@interpreter
def test_fold_through_the_convolution_kernels_equals_the_cufft_fold(monkeypatch):
    """The fold's Triton branch with the real kernels (interpreted; float32, so their own arithmetic is checked)
    on a slice of a longer cache, against the float32 FFT branch, at the first fold (c = S) and a later one."""
    from caracal_cli.config import ModelConfig
    from caracal_cli.mixers import build_mixer, fftconv

    mixer = build_mixer({"kind": "mhf"}, ModelConfig(d_model=16, n_head=2), "m")
    torch.manual_seed(0)
    v, g = torch.randn(2, 40, 16), torch.randn(2, 40, 16)
    for c in (8, 24):
        folds = []
        for path in ("triton", "torch"):
            monkeypatch.setattr(fftconv, "fft_conv_path", lambda *args, path=path, **kwargs: path)
            cache = {"v": v, "g": g, "folded": torch.zeros(2, 8, 16)}
            mixer._fold(cache, c)
            folds.append(cache["folded"])
        torch.testing.assert_close(*folds, rtol=1e-4, atol=1e-4, msg=f"c={c}")


@pytest.mark.parametrize("S", [1, 3, 8])
def test_fold_of_the_reversed_streams_is_the_sum_of_finished_pairs(monkeypatch, S):
    """The fold's Triton branch (its convolution swapped for the float64 reference here) and the cuFFT branch
    both give F_{c+i} = Σ_{j, k < c, j+k = c+i} v_j g_k, summed directly, for c = S (the first fold) and later."""
    from caracal_cli.config import ModelConfig
    from caracal_cli.mixers import build_mixer, fftconv, mhf

    mixer = build_mixer({"kind": "mhf"}, ModelConfig(d_model=16, n_head=2), "m")
    monkeypatch.setattr(fftconv, "causal_fft_conv_fast", mhf.causal_fft_conv_reference)
    torch.manual_seed(0)
    for c in (S, 2 * S, 5 * S):
        v, g = (torch.randn(2, c + S, 16, dtype=torch.float64) for _ in range(2))
        want = torch.stack([sum(v[:, j] * g[:, c + i - j] for j in range(i + 1, c)) if i + 1 < c else
                            torch.zeros(2, 16, dtype=torch.float64) for i in range(S)], 1)
        for path in ("triton", "torch"):
            monkeypatch.setattr(fftconv, "fft_conv_path", lambda *args, path=path, **kwargs: path)
            cache = {"v": v, "g": g, "folded": torch.zeros(2, S, 16, dtype=torch.float64)}
            mixer._fold(cache, c)
            torch.testing.assert_close(cache["folded"], want, rtol=1e-12, atol=1e-12, msg=f"{path}, c={c}")
