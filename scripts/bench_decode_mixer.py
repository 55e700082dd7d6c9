"""One mixer's cost per decoded token against the bytes it must read, from short to long contexts.

    PYTHONPATH=$PWD python3 scripts/bench_decode_mixer.py [--kinds mhf attention mamba mamba2] [--d-model 768]
        [--contexts 512 … 65536] [--batches 1 64] [--steps 64] [--json FILE]

Each point makes a mixer's static cache for context + steps positions, sets its position to the context (a
step's cost does not depend on what the cache holds), captures `step` in a CUDA graph and times `steps`
replays after the context (and the same steps eagerly). MHF's block fold (one FFT over the history, once every
`decode_block` tokens, outside the graph) is timed on its own and spread over the block's tokens.

The floor is the bytes a step must read at the copy bandwidth: the mixer's bf16 weights, plus per sequence
- attention: the keys and values of the t positions before it (2·t·d values);
- MHF: the current block's values and gates (about 4·S·d), plus its share of the fold (2·t·d values once per S);
- Mamba / Mamba-2: the recurrent state read and written back.
On a CPU it runs (eager only, small contexts) as a smoke test; figures there mean nothing.
"""

from __future__ import annotations

import argparse
import time

import torch

from caracal_cli.config import ModelConfig
from caracal_cli.fileio import write_report
from caracal_cli.mixers import build_mixer
from caracal_cli.speed import copy_bandwidth

# mhf-torch: MHF's step through the PyTorch composition (module_impl=torch), the before of decode_sum.py's kernel
MIXER_ENTRIES = {"mhf": {"kind": "mhf"}, "mhf-torch": {"kind": "mhf", "module_impl": "torch"},
                 "attention": {"kind": "attention"}, "mamba": {"kind": "mamba"}, "mamba2": {"kind": "mamba2"}}


def state_bytes(kind: str, mixer, cache: dict, batch: int, t: int) -> float:
    """Bytes of state one step must read (and, for the recurrences, write back) at position t."""
    size = lambda x: x.numel() * x.element_size()  # noqa: E731
    if kind == "attention":
        per_position = size(cache["k"]) / cache["k"].shape[2]
        return 2 * per_position * t
    if kind.startswith("mhf"):
        S = cache["folded"].shape[1]
        row = size(cache["v"]) / cache["v"].shape[1]  # one position of every sequence
        return 4 * S * row + 2 * t * row / S
    return 2 * sum(size(x) for name, x in cache.items() if name != "pos")


def timed(fn, repeats: int, sync) -> float:
    sync()
    begin = time.perf_counter()
    for i in range(repeats):
        fn(i)
    sync()
    return (time.perf_counter() - begin) / repeats * 1e3


def point(kind: str, mixer, context: int, batch: int, steps: int, device, dtype, bandwidth: float) -> dict:
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    d = mixer_width(mixer)
    cache = mixer.init_cache(batch, context + steps, device=device, dtype=dtype)
    x = torch.randn(batch, 1, d, device=device, dtype=dtype)
    prepare = getattr(mixer, "prepare_step", None)
    row: dict = {"kind": kind, "context": context, "batch": batch}
    with torch.inference_mode():
        if prepare is not None:  # the fold at the context's block start, timed alone (after one for FFT plans)
            prepare(cache, context)
            fold_ms = timed(lambda i: prepare(cache, context), 5, sync)
            row["fold_ms"] = fold_ms
            row["fold_per_token_ms"] = fold_ms / cache["folded"].shape[1]

        def eager(i):
            mixer.step(x, cache)
        cache["pos"].fill_(context + 1)  # past the block start: no fold inside the timed steps
        eager(0)
        cache["pos"].fill_(context + 1)
        row["eager_ms"] = timed(eager, steps, sync)
        if cuda:
            cache["pos"].fill_(context + 1)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                mixer.step(x, cache)  # warm-up outside the capture (lazy initialisations, library set-up)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                mixer.step(x, cache)
            cache["pos"].fill_(context + 1)
            row["graph_ms"] = timed(lambda i: graph.replay(), steps, sync)
            del graph
    weights = sum(p.numel() * p.element_size() for p in mixer.parameters())
    floor_bytes = weights + state_bytes(kind, mixer, cache, batch, context)
    best = min(row.get("graph_ms", row["eager_ms"]), row["eager_ms"]) + row.get("fold_per_token_ms", 0.0)
    row.update(weight_bytes=weights, floor_bytes=floor_bytes, floor_ms=floor_bytes / (bandwidth * 1e9) * 1e3,
               per_token_ms=best)
    row["over_floor"] = row["per_token_ms"] / row["floor_ms"]
    if cuda:
        torch.cuda.empty_cache()
    return row


def mixer_width(mixer) -> int:
    return next(m for m in mixer.modules() if isinstance(m, torch.nn.Linear)).in_features


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kinds", nargs="+", default=list(MIXER_ENTRIES), choices=list(MIXER_ENTRIES))
    ap.add_argument("--d-model", type=int, default=768)
    ap.add_argument("--n-head", type=int, default=12)
    ap.add_argument("--contexts", type=int, nargs="+", default=[512, 2048, 4096, 16384, 65536])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--steps", type=int, default=64, help="timed steps per point (fewer than MHF's block)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    bandwidth = copy_bandwidth(device)["gb_per_s"] if cuda else 50.0
    model_cfg = ModelConfig(d_model=args.d_model, n_head=args.n_head)
    rows = []
    print(f"copy bandwidth {bandwidth:.0f} GB/s; d={args.d_model}; ms per step (one token per sequence)")
    print(f"{'mixer':10s} {'batch':>5s} {'context':>8s} {'eager':>8s} {'graph':>8s} {'fold/tok':>9s} "
          f"{'per tok':>8s} {'floor':>8s} {'× floor':>8s}")
    for kind in args.kinds:
        torch.manual_seed(0)
        mixer = build_mixer(MIXER_ENTRIES[kind], model_cfg, kind).to(device=device, dtype=dtype).eval()
        for batch in args.batches:
            for context in args.contexts:
                try:
                    row = point(kind, mixer, context, batch, args.steps, device, dtype, bandwidth)
                except torch.OutOfMemoryError:
                    row = {"kind": kind, "context": context, "batch": batch, "error": "out of memory"}
                    torch.cuda.empty_cache()
                rows.append(row)
                if "error" in row:
                    print(f"{kind:10s} {batch:5d} {context:8d} {row['error']}", flush=True)
                    continue
                graph_ms = row.get("graph_ms", float("nan"))
                print(f"{kind:10s} {batch:5d} {context:8d} {row['eager_ms']:8.3f} {graph_ms:8.3f} "
                      f"{row.get('fold_per_token_ms', 0.0):9.4f} {row['per_token_ms']:8.3f} {row['floor_ms']:8.4f} "
                      f"{row['over_floor']:8.1f}", flush=True)
    report = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
              "bandwidth_gb_per_s": bandwidth, "d_model": args.d_model, "rows": rows}
    path = write_report(report, args.json, "decode_mixer.json")
    if path:
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
