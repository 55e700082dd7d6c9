"""Before/after table for MHF's causal FFT convolution on a CUDA GPU (issue 10).

For each L (65536 tokens per step, d=1024, bf16): forward and forward+backward ms of the torch.fft reference
(the "before"), the Triton fast path (fftconv.py) and its tile variants, causal flash attention (SDPA,
16 × 64 heads) and sliding-window attention for scale, the fast path's stages, and the whole MHF module with
each FFT implementation; relative error against float64; the memory-traffic floor from a measured copy.

    PYTHONPATH=$PWD python3 scripts/bench_fftconv.py [--lengths 512 2048 …] [--sweep 8192] [--swa 2048]

Prints a compact table last and writes JSON to $OUT/bench_fftconv.json when OUT is set.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.nn.functional as F

from caracal_cli.config import ModelConfig
from caracal_cli.mixers import build_mixer, fftconv
from caracal_cli.mixers.mhf import causal_fft_conv_reference

D, HEADS, TOKENS = 1024, 16, 65536
SWEEP = {  # tile settings tried at the --sweep lengths, each over fftconv.DEFAULT_TILES (c64/32 r4 s3); "triton
    # fast" runs the length's tuned tiles (fftconv.TUNED_TILES)
    "c64/32 r4 s3": {},  # the defaults themselves, where a length's tuned tiles differ
    "c64/16 r4": dict(block_c2=16),
    "c32/32 r4": dict(block_c=32),
    "c64/32 r1": dict(rows_per_prog=1),
    "c64/32 r8": dict(rows_per_prog=8),
    "c64/32 r4 s2": dict(stages=2),
    "c64/64 r4": dict(block_c2=64),  # wider spectral tiles: at T = 32 a [T, 32] tile is below Hopper's M = 64
    "c64/128 r2": dict(block_c2=128, rows_per_prog=2),
    "c128/32 r4": dict(block_c=128),
    "c64/32 r4 aL": dict(left=fftconv.LEFT_A),  # A on the left of analysis and synthesis (M = P)
    "c32/32 r4 aL": dict(block_c=32, left=fftconv.LEFT_A),
    "c64/32 r8 aL": dict(rows_per_prog=8, left=fftconv.LEFT_A),
    "c128/32 r4 aL": dict(block_c=128, left=fftconv.LEFT_A),
    # 16384's tuned tiles with 16-channel spectral tiles (8 warps: ~150 registers), or with two pipeline
    # stages (less shared memory); on an H200 both were slower there: 4.00 and 3.47 against 2.97 ms
    "c64/16 r8 aL w8": dict(block_c2=16, rows_per_prog=8, left=fftconv.LEFT_A, warps=(8, 8, 8)),
    "c64/32 r8 aL s2": dict(rows_per_prog=8, left=fftconv.LEFT_A, stages=2),
    # the forward keeps its transforms along n1 for the backward, and without (16384's tuned tiles keep them)
    "c64/32 r8 aL kT": dict(rows_per_prog=8, left=fftconv.LEFT_A, keep=fftconv.KEEP_TRANSFORMS),
    "c64/32 r8 aL kS": dict(rows_per_prog=8, left=fftconv.LEFT_A, keep=fftconv.KEEP_SPECTRA),
}


def batch_for(L: int) -> int:
    """Sequences per step: TOKENS tokens, or one sequence where L is longer (131,072: twice the tokens)."""
    return max(1, TOKENS // L)


def other_splits(L: int) -> dict[str, dict]:
    """Tile variants with each (P, T) factorisation of L's padded length other than SPLITS's."""
    default = fftconv.split_for(L)
    out = {}
    for p in (16, 32, 64, 128):
        try:
            split = fftconv.split_for(L, p)
        except ValueError:
            continue
        if split != default:
            out[f"split {split[0]}x{split[1]}"] = dict(fftconv.DEFAULT_TILES, split_p=p)
    return out


def ms(fn) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def rel(a, b) -> float:
    return ((a.double() - b).norm() / b.norm()).item()


def copy_bandwidth() -> float:
    """Bytes read + written per second by a 1 GiB device-to-device copy."""
    a = torch.empty(1 << 29, dtype=torch.float16, device="cuda").normal_()
    b = torch.empty_like(a)
    return 2 * a.numel() * a.element_size() / (ms(lambda: b.copy_(a)) * 1e-3)


def conv_case(fn, v, g, dy, exact):
    """fwd ms, fwd+bwd ms and errors of y, dv, dg for fn(v, g)."""
    fwd = ms(lambda: fn(v, g))
    both = ms(lambda: torch.autograd.grad(fn(v, g), (v, g), dy))
    y = fn(v, g)
    dv, dg = torch.autograd.grad(y, (v, g), dy)
    row = dict(fwd=fwd, fwd_bwd=both)
    if exact is not None:
        row.update(err_y=rel(y, exact[0]), err_dv=rel(dv, exact[1]), err_dg=rel(dg, exact[2]))
    return row


def odd_size_checks() -> dict:
    """Errors of y, dv, dg at lengths and widths that exercise padding and masks, bf16 and fp16, one strided g."""
    out = {}
    for L, Dm, dtype in ((1, 96, torch.bfloat16), (300, 96, torch.bfloat16), (5000, 80, torch.float16),
                         (16384, 64, torch.bfloat16), (777, 1024, torch.float16),
                         (40000, 64, torch.bfloat16)):  # past 16384: the spectral stage in torch.fft
        v = torch.randn(2, L, Dm, device="cuda").to(dtype).requires_grad_()
        g_cl = (0.5 * torch.randn(2, Dm, L, device="cuda") + 0.5).to(dtype)
        g = g_cl.transpose(1, 2).detach().requires_grad_()  # a [B, D, L] buffer, like MHF's gate conv output
        dy = torch.randn(2, L, Dm, device="cuda").to(dtype)
        y = fftconv.causal_fft_conv_fast(v, g)
        dv, dg = torch.autograd.grad(y, (v, g), dy)
        v64, g64 = v.detach().double().requires_grad_(), g.detach().double().requires_grad_()
        y64 = causal_fft_conv_reference(v64, g64)
        dv64, dg64 = torch.autograd.grad(y64, (v64, g64), dy.double())
        count = torch.arange(1, L + 1, device="cuda", dtype=torch.float64)[None, :, None]
        out[f"L={L} D={Dm} {str(dtype)[6:]}"] = dict(y=rel(y, y64), dv=rel(dv, dv64), dg=rel(dg, dg64),
                                                     y_mean_scaled=rel(y / count, y64 / count),
                                                     finite=bool(torch.isfinite(y).all()))
    return out


# Bytes per token-channel each stage must move (bf16 inputs and outputs, fp16 complex spectra: 4 bytes each;
# their scales, one per P or T values, and the transforms a forward keeps for the backward are left out)
STAGE_BYTES = {"analysis(v,g)": 12, "spectral": 12, "synthesis(y)": 6, "analysis(dy)": 6, "spectral(2 out)": 20,
               "synthesis(dv,dg)": 12}


def stage_times(v, g, dy, **tiles) -> dict:
    st = fftconv.TritonStages(v.shape[1], v.device, v.dtype, **tiles)
    B = v.shape[0]
    z = st.analysis([v, g], False)
    zv, zg = fftconv._part(z, 0, B), fftconv._part(z, B, B)
    kept = torch.empty_like(z[0]) if st.keep_transforms else None
    w = st.spectral(zv, zg, keep=kept)
    if kept is not None:  # the backward starts from the forward's transforms
        zv, zg = fftconv._part((kept, z[1]), 0, B), fftconv._part((kept, z[1]), B, B)
    zd = st.analysis([dy], True)
    w2 = st.spectral(zd, zg, zv, transformed=st.keep_transforms)
    return {
        "analysis(v,g)": ms(lambda: st.analysis([v, g], False)),
        "spectral": ms(lambda: st.spectral(fftconv._part(z, 0, B), fftconv._part(z, B, B), keep=kept)),
        "synthesis(y)": ms(lambda: st.synthesis(w, False, v.dtype)),
        "analysis(dy)": ms(lambda: st.analysis([dy], True)),
        "spectral(2 out)": ms(lambda: st.spectral(zd, zg, zv, transformed=st.keep_transforms)),
        "synthesis(dv,dg)": ms(lambda: st.synthesis(w2, True, v.dtype)),
    }


def attention_case(L: int, window: int | None) -> dict:
    B = batch_for(L)
    q, k, v = (torch.randn(B, HEADS, L, D // HEADS, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    do = torch.randn_like(q)
    if window is None:
        fn = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
    else:
        from caracal_cli.mixers.attention import _compiled_flex, _sliding_block_mask

        mask = _sliding_block_mask(L, window, "cuda")
        fn = lambda: _compiled_flex()(q, k, v, block_mask=mask)  # noqa: E731
    return dict(fwd=ms(fn), fwd_bwd=ms(lambda: torch.autograd.grad(fn(), (q, k, v), do)))


def mhf_case(L: int, impl: str) -> dict:
    model = ModelConfig(d_model=D, n_head=HEADS, context=L)
    mhf = build_mixer({"kind": "mhf", "fft_impl": impl}, model).cuda()
    x = torch.randn(batch_for(L), L, D, device="cuda", requires_grad=True)

    def fwd():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return mhf(x)

    dy = torch.randn(batch_for(L), L, D, device="cuda", dtype=torch.bfloat16)
    return dict(fwd=ms(fwd), fwd_bwd=ms(lambda: torch.autograd.grad(fwd(), [x, *mhf.parameters()], dy)),
                path=mhf.path(x.device) if impl != "torch" else "torch.fft (float32)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192, 16384])
    ap.add_argument("--sweep", type=int, nargs="*", default=[16384], help="lengths at which to try tile configs")
    ap.add_argument("--swa", type=int, nargs="*", default=[2048], help="lengths at which to time SWA-256 (compiles)")
    ap.add_argument("--mhf", type=int, nargs="*", default=[512, 1024, 2048, 4096, 8192, 16384],
                    help="lengths at which to time the whole MHF module")
    ap.add_argument("--budget-s", type=float, default=1e9, help="skip optional parts once this much time is spent")
    args = ap.parse_args()
    start = time.time()
    out_dir = os.environ.get("OUT")
    torch.manual_seed(0)
    bw = copy_bandwidth()
    import triton

    info = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                copy_bandwidth_TBps=bw / 1e12, d=D, tokens=TOKENS)
    print(json.dumps(info), flush=True)
    results: dict[str, dict] = {}
    checks = odd_size_checks()
    info["checks"] = checks
    for name, row in checks.items():
        print(f"check {name:28s} " + " ".join(f"{k}={v:.2e}" if isinstance(v, float) else f"{k}={v}"
                                               for k, v in row.items()), flush=True)

    def record(L, name, row):
        results.setdefault(str(L), {})[name] = row
        print(f"L={L:6d} {name:28s} " + " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                                  for k, v in row.items()), flush=True)
        if out_dir:
            with open(os.path.join(out_dir, "bench_fftconv.json"), "w") as f:
                json.dump(dict(info=info, results=results), f, indent=1)

    def spare() -> bool:
        return time.time() - start < args.budget_s

    for L in args.lengths:
        B = batch_for(L)
        n = B * L * D
        record(L, "floor (traffic)", dict(fwd=6 * n / bw * 1e3, fwd_bwd=16 * n / bw * 1e3))
        v = torch.randn(B, L, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        g = (0.5 * torch.randn(B, L, D, device="cuda") + 0.5).bfloat16().requires_grad_()
        dy = torch.randn(B, L, D, device="cuda", dtype=torch.bfloat16)
        v64, g64 = v.detach().double().requires_grad_(), g.detach().double().requires_grad_()
        y64 = causal_fft_conv_reference(v64, g64)
        exact = (y64.detach(), *torch.autograd.grad(y64, (v64, g64), dy.double()))
        del v64, g64, y64
        for name, fn in (("torch.fft fp32 (before)", causal_fft_conv_reference),
                         ("triton fast", fftconv.causal_fft_conv_fast)):
            try:
                record(L, name, conv_case(fn, v, g, dy, exact))
            except Exception as e:  # a failing variant must not hide the others' numbers
                record(L, name, dict(error=repr(e)[:300]))
        try:
            record(L, "triton stages", stage_times(v.detach(), g.detach(), dy))
        except Exception as e:
            record(L, "triton stages", dict(error=repr(e)[:300]))
        if L in args.sweep and spare():
            variants = {name: {**fftconv.DEFAULT_TILES, **tiles} for name, tiles in SWEEP.items()}
            for cfg, tiles in {**variants, **other_splits(L)}.items():
                try:
                    record(L, f"triton {cfg}",
                           conv_case(lambda a, b, t=tiles: fftconv.causal_fft_conv_fast(a, b, **t), v, g, dy, exact))
                except Exception as e:
                    record(L, f"triton {cfg}", dict(error=repr(e)[:300]))
        del v, g, dy, exact
        record(L, "flash attention 16x64", attention_case(L, None))
        if L in args.swa and spare():
            try:
                record(L, "SWA-256 flex", attention_case(L, 256))
            except Exception as e:
                record(L, "SWA-256 flex", dict(error=repr(e)[:300]))
        if L in args.mhf and spare():
            for impl in ("torch", "auto"):
                record(L, f"MHF module ({impl})", mhf_case(L, impl))
        torch.cuda.empty_cache()

    worst = max(max(r["y"], r["dv"], r["dg"]) for r in checks.values())
    print(f"\nodd-size checks (L=1…16384, masked D, fp16, strided g): worst rel. error {worst:.2e}; of y/(t+1) "
          + ", ".join(f"{k.split()[0]} {r['y_mean_scaled']:.1e}" for k, r in checks.items()))
    print(f"elapsed {time.time() - start:.0f} s; copy bandwidth {bw / 1e12:.2f} TB/s; ms at d={D}, {TOKENS} tokens")
    names = sorted({name for row in results.values() for name in row if name != "triton stages"},
                   key=lambda s: (not s.startswith("floor"), not s.startswith("torch"), s))
    Ls = list(results)
    print(f"{'variant':30s}" + "".join(f"{'L=' + L:>15s}" for L in Ls) + "   (fwd / fwd+bwd)")
    for name in names:
        cells = []
        for L in Ls:
            row = results[L].get(name)
            cells.append("-" if row is None else "err" if "error" in row else f"{row['fwd']:.2f}/{row['fwd_bwd']:.2f}")
        print(f"{name:30s}" + "".join(f"{c:>15s}" for c in cells))
    for name in names:
        errs = [results[L][name].get("err_y") for L in Ls if name in results[L]]
        if any(e is not None for e in errs):
            worst = max(max(results[L][name].get(k, 0) for k in ("err_y", "err_dv", "err_dg"))
                        for L in Ls if name in results[L] and "err_y" in results[L][name])
            print(f"max rel. error (y, dv, dg) {name}: {worst:.2e}")
    for L in Ls:
        if "triton stages" in results[L] and "error" not in results[L]["triton stages"]:
            n = batch_for(int(L)) * int(L) * D  # the keys are strings (JSON)
            print(f"stages L={L} (ms, TB/s): " + ", ".join(f"{k} {t:.3f} {STAGE_BYTES[k] * n / t / 1e9:.2f}"
                                                          for k, t in results[L]["triton stages"].items()))


if __name__ == "__main__":
    main()
