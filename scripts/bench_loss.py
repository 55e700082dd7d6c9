"""The next-token loss on a CUDA GPU (issue 5): its softmax-gradient kernel per block size and warp count, and
the whole chunked loss (forward and backward) per chunk size, at a tiny preset's micro-batch (64 × 512 tokens,
d = 512, GPT-2's vocabulary, bf16).

The kernel reads each row twice and writes it once. With fewer, wider programs in flight, a row may still be
in L2 when it is read the second time; the table gives each variant's time and its bandwidth counted as three
passes, against a measured copy. The whole loss runs with the head's gradient accumulated both ways: one GEMM
adding into float32 (`loss.accumulate_grad_w`) and the earlier product, cast and add (`loss.cast_then_add`).

    PYTHONPATH=$PWD python3 scripts/bench_loss.py [--rows 32768] [--d 512]

Prints a table and writes JSON to $OUT/bench_loss.json when OUT is set.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from caracal_cli import loss as L


def ms(fn) -> float:
    if not torch.cuda.is_available():  # a smoke run (TRITON_INTERPRET=1 on a CPU): wall clock, once
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    from triton.testing import do_bench

    return do_bench(fn, warmup=10, rep=50, return_mode="median")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=32768, help="tokens per micro-batch")
    ap.add_argument("--d", type=int, default=512, help="model width")
    ap.add_argument("--vocab", type=int, default=50257)
    ap.add_argument("--chunk-elements", type=int, default=L.LOSS_CHUNK_ELEMENTS, help="logits per kernel timing")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    vocab, width = args.vocab, L.padded_vocab(args.vocab)
    chunk = max(L.ROW_ALIGN, args.chunk_elements // width // L.ROW_ALIGN * L.ROW_ALIGN)
    logits = (torch.randn(chunk, width, device=device) * 3).bfloat16()
    targets = torch.randint(0, vocab, (chunk,), device=device)
    nbytes = logits.numel() * logits.element_size()
    copy_bw = nbytes * 2 / ms(lambda: logits.clone()) / 1e9  # TB/s: one read, one write
    gpu = torch.cuda.get_device_name() if device == "cuda" else "cpu (smoke run)"
    results = {"info": {"gpu": gpu, "torch": torch.__version__, "rows": args.rows, "d": args.d, "vocab": vocab,
                        "chunk_rows": chunk, "copy_TBps": copy_bw}, "kernel": {}, "loss": {}}
    work = logits.clone()
    for warps in (4, 8, 16, 32):
        for block in (2048, 4096, 8192):
            if block < 32 * warps:
                continue
            # in place: from the second call on the buffer holds gradients, which costs the kernel the same
            t = ms(lambda b=block, w=warps: L.softmax_grad_triton(work, targets, vocab, True, b, w))
            results["kernel"][f"block {block} warps {warps}"] = {"ms": t, "TBps_3_passes": 3 * nbytes / t / 1e9}
    hidden = torch.randn(args.rows // 512, 512, args.d, device=device, requires_grad=True)
    weight = (torch.randn(vocab, args.d, device=device) * 0.02).requires_grad_()
    tokens = torch.randint(0, vocab, (args.rows // 512, 512), device=device)
    fused_add = L.accumulate_grad_w
    for add_name, add in (("addmm", fused_add), ("cast+add", L.cast_then_add)):
        L.accumulate_grad_w = add  # the loss looks it up per chunk
        for elements in (1 << 27, 1 << 28, 1 << 29):
            rows = max(L.ROW_ALIGN, elements // width // L.ROW_ALIGN * L.ROW_ALIGN)

            def step(rows=rows):
                with torch.autocast(device, dtype=torch.bfloat16):
                    loss = L.next_token_loss(hidden, weight, tokens, chunk_rows=rows)
                torch.autograd.grad(loss, (hidden, weight))

            results["loss"][f"chunk {rows} rows, grad_w {add_name}"] = {"ms_fwd_bwd": ms(step)}
    L.accumulate_grad_w = fused_add
    print(f"{results['info']['gpu']}: {chunk} x {width} bf16 logits per chunk, copy {copy_bw:.2f} TB/s")
    for name, r in results["kernel"].items():
        print(f"  softmax-gradient kernel, {name:20s} {r['ms']:.3f} ms  {r['TBps_3_passes']:.2f} TB/s (3 passes)")
    for name, r in results["loss"].items():
        print(f"  whole loss fwd+bwd, {name:38s} {r['ms_fwd_bwd']:.2f} ms ({args.rows} tokens)")
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "bench_loss.json"), "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
