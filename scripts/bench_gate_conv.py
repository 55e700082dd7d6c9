"""MHF's fused gate convolution (`mixers/gate_conv.py`) on a CUDA GPU: its three kernels at the shipped tiles,
then the weight-gradient reduction (0.5 ms a layer at small, 65,536 tokens, in a compiled step's profile: about
8x the time its bytes take) over its tunables — rows per program and warps, programs per SM, the cap on fp32
partials — and the forward and input-gradient kernels over their row tiles. Every variant's output is checked
against the shipped one's; bandwidth counts the bytes each kernel must move (bf16 rows read and written once).

    PYTHONPATH=$PWD python3 scripts/bench_gate_conv.py [--d 768] [--heads 12] [--k 3] [--tokens 65536]

Prints a table and writes JSON to $OUT/bench_gate_conv.json when OUT is set. Without CUDA (TRITON_INTERPRET=1
on a CPU) it is a smoke run: the numbers mean nothing there; the shape does.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time

import torch

from caracal_cli.mixers import gate_conv as G


def ms(fn) -> float:
    if not torch.cuda.is_available():  # a smoke run in the interpreter: wall clock, once
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    from triton.testing import do_bench

    return do_bench(fn, warmup=10, rep=50, return_mode="median")


@contextlib.contextmanager
def tunables(**values):
    """Set gate_conv's module-level tunables for the duration (the ops read them at each call)."""
    saved = {name: getattr(G, name) for name in values}
    for name, value in values.items():
        setattr(G, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(G, name, value)


def rel_err(got, want) -> float:
    return max(((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()
               for a, b in zip(got, want, strict=True))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d", type=int, default=768, help="model width")
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--k", type=int, default=3, help="the gate convolution's size (MHF gate_kernel)")
    ap.add_argument("--tokens", type=int, default=65536, help="B·L rows (L = 512)")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32  # the interpreter's dots want float32
    torch.manual_seed(0)
    D, dh, k = args.d, args.d // args.heads, args.k
    L = min(512, args.tokens)
    g1 = torch.randn(args.tokens // L, L, D, device=device, dtype=dtype)
    dy = torch.randn_like(g1)
    weight = torch.randn(D, dh, k, device=device) * dh ** -0.5
    bias = torch.randn(D, device=device)
    row_bytes = g1.numel() * g1.element_size()
    floors = {"forward": 2 * row_bytes, "input grad": 3 * row_bytes, "weight grad": 2 * row_bytes}
    gpu = torch.cuda.get_device_name() if device == "cuda" else "cpu (smoke run)"
    results = {"info": {"gpu": gpu, "torch": torch.__version__, "d": D, "heads": args.heads, "k": k,
                        "tokens": args.tokens, "dtype": str(dtype)}, "shipped": {}, "weight_grad": {}, "rows": {}}
    ops = {"forward": lambda: (G.silu_gate_conv_fused(g1, weight, bias),),
           "input grad": lambda: (G.silu_gate_conv_input_grad(dy, g1, weight),),
           "weight grad": lambda: G.silu_gate_conv_weight_grad(dy, g1, dh, k)}
    want = {name: op() for name, op in ops.items()}
    for name, op in ops.items():
        t = ms(op)
        results["shipped"][name] = {"ms": t, "TBps": floors[name] / t / 1e9}

    reduce_tiles = [(32, 4), (64, 4), (64, 8), (128, 4), (128, 8)]
    for (block, warps) in reduce_tiles:
        for per_sm in (1, 2, 4, 8):
            for cap in (8 << 20, 64 << 20):
                settings = dict(REDUCE_TILES={**G.REDUCE_TILES, dh: (block, warps)}, REDUCE_PROGRAMS_PER_SM=per_sm,
                                MAX_PARTIAL_BYTES=cap)
                name = f"rows {block} warps {warps}, {per_sm}/SM, partials ≤ {cap >> 20} MB"
                with tunables(**settings):
                    try:
                        err = rel_err(ops["weight grad"](), want["weight grad"])
                        t = ms(ops["weight grad"])
                        results["weight_grad"][name] = {"ms": t, "TBps": floors["weight grad"] / t / 1e9,
                                                        "rel_err": err}
                    except Exception as e:  # a tile that does not compile must not hide the others
                        results["weight_grad"][name] = {"error": repr(e)[:200]}
    for (block, warps) in [(64, 4), (64, 8), (128, 4), (128, 8), (256, 8)]:
        with tunables(ROW_TILES={**G.ROW_TILES, dh: (block, warps)}):
            for name in ("forward", "input grad"):
                key = f"{name}, rows {block} warps {warps}"
                try:
                    err = rel_err(ops[name](), want[name])
                    t = ms(ops[name])
                    results["rows"][key] = {"ms": t, "TBps": floors[name] / t / 1e9, "rel_err": err}
                except Exception as e:
                    results["rows"][key] = {"error": repr(e)[:200]}

    print(f"{gpu}: d = {D}, {args.heads} heads, k = {k}, {args.tokens} rows, {dtype}; shipped tiles:")
    for name, r in results["shipped"].items():
        print(f"  {name:12s} {r['ms']:.3f} ms  {r['TBps']:.2f} TB/s of its bytes")
    for section in ("weight_grad", "rows"):
        ranked = sorted(results[section].items(), key=lambda kv: kv[1].get("ms", float("inf")))
        print(f"{section.replace('_', ' ')} variants, fastest first:")
        for name, r in ranked:
            print(f"  {name:48s} " + (f"{r['ms']:.3f} ms  {r['TBps']:.2f} TB/s  err {r['rel_err']:.1e}"
                                      if "ms" in r else r["error"]))
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "bench_gate_conv.json"), "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
