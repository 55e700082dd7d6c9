"""Where a training step's time goes: one preset's forward + loss + backward + AdamW under torch.profiler, its
kernels summed by kind (matmul, FFT, attention, SSM scan, loss, optimizer, …), with tokens/s and MFU.

    PYTHONPATH=$PWD python3 scripts/profile_step.py --preset tiny [--compile [--compile-mode M]] [--micro-batch 32]
        [--set k=v …]

On CUDA it sums each kernel's GPU time; on a CPU, each operator's own CPU time (a rough guide only). Prints the
table by kind and the heaviest kernels; writes everything as JSON to --json (default $OUT/profile_<preset>.json
when OUT is set).
"""

from __future__ import annotations

import argparse
import re
import time
from collections import defaultdict

import torch
from torch._dynamo.utils import counters
from torch.profiler import ProfilerActivity, profile

from caracal_cli.config import COMPILE_MODES, load_preset
from caracal_cli.device import resolve_device
from caracal_cli.fileio import write_report
from caracal_cli.loss import LOSS_PROFILE_LABEL
from caracal_cli.model import build_model, flops_per_token
from caracal_cli.monitor import peak_flops_for
from caracal_cli.recipe import build_optimizer

# First match wins; names are lower-cased kernel names (CUDA) or operator names (CPU).
KINDS = [
    ("loss ops", r"logsumexp|nll_loss|cross_entropy|log_softmax|chunkedlinearcrossentropy"),
    ("fft", r"fft|_analysis_kernel|_spectral_kernel|_synthesis_kernel"),
    ("attention", r"flash|fmha|flex|attention|sdpa|triton_tem"),
    ("ssm scan", r"selective_scan|ssd|chunk_scan|chunk_state|state_passing|bmm_chunk|causal_conv1d"),
    ("matmul", r"gemm|cutlass|xmma|cublas|aten::mm$|aten::addmm|aten::bmm|aten::matmul|aten::linear|nvjet"),
    ("conv", r"conv"),
    ("optimizer", r"adam|multi_tensor|foreach|optimizer"),
    ("norm", r"norm|rms"),
    ("softmax/reduce", r"softmax|reduce|sum_|aten::sum|aten::mean|aten::max"),
    ("fused (inductor)", r"triton_poi|triton_red|triton_per"),
    ("copy/cast", r"copy|memcpy|memset|cat|aten::to$|_to_copy|fill"),
]


def kind_of(name: str) -> str:
    lowered = name.lower()
    for kind, pattern in KINDS:
        if re.search(pattern, lowered):
            return kind
    return "elementwise/other"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="section.key=value")
    ap.add_argument("--micro-batch", type=int, default=None,
                    help="sequences per step (default: the preset's; auto resolved as `caracal train` would)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model first")
    ap.add_argument("--compile-mode", default="default", choices=COMPILE_MODES, help="torch.compile's mode")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3, help="profiled steps")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--top", type=int, default=15, help="heaviest kernels listed")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    config = load_preset(args.preset, args.overrides)
    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    batch = args.micro_batch or config.train.micro_batch
    if batch == "auto":
        from caracal_cli.autobatch import resolve

        batch = resolve(config, device).micro_batch
    length = config.model.context
    model = build_model(config.model).to(device)
    optimizer = build_optimizer(model, config.train, device)
    runner = torch.compile(model, mode=args.compile_mode) if args.compile else model
    ids = torch.randint(0, config.model.vocab_size, (batch, length + 1), device=device)
    dtype = torch.bfloat16 if cuda else torch.float32

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=cuda):
            loss = runner(ids[:, :-1], targets=ids[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    begin = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    step_s = (time.perf_counter() - begin) / args.steps  # timed without the profiler's overhead

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(args.steps):
            step()
        sync()
    per_kernel: dict[str, float] = defaultdict(float)
    loss_ms = 0.0
    for event in prof.key_averages():
        if event.key == LOSS_PROFILE_LABEL:  # a range, not a kernel: its children's time, counted below too
            loss_ms = (event.device_time_total if cuda else event.cpu_time_total) / 1e3 / args.steps
    if cuda:
        # Kernels alone, event by event: an operator's device time is its kernels' again, and key_averages
        # merges a kernel with a host event of the same name (Inductor's launches) under one device type.
        for event in prof.events():
            if event.device_type == torch.autograd.DeviceType.CUDA and not event.is_user_annotation:
                per_kernel[event.name] += event.time_range.elapsed_us() / 1e3 / args.steps
    else:
        for event in prof.key_averages():
            if event.self_cpu_time_total > 0 and event.key.startswith("aten::"):
                per_kernel[event.key] += event.self_cpu_time_total / 1e3 / args.steps
    by_kind: dict[str, float] = defaultdict(float)
    for name, ms in per_kernel.items():
        by_kind[kind_of(name)] += ms
    counted = sum(by_kind.values())

    tokens = batch * length
    flops = flops_per_token(model, length)["train"] * tokens
    peak = peak_flops_for(device)  # None on a CPU or an unknown GPU
    report = {
        "preset": args.preset, "overrides": args.overrides, "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if cuda else None, "torch": torch.__version__,
        "compiled": args.compile, "compile_mode": args.compile_mode if args.compile else None,
        "micro_batch": batch, "context": length, "tokens_per_step": tokens,
        "step_ms": step_s * 1e3, "tokens_per_s": tokens / step_s, "train_flops_per_step": flops,
        "peak_flops": peak, "mfu": flops / step_s / peak if peak else None,
        "measured": "GPU kernel time" if cuda else "CPU operator self time",
        "by_kind_ms": dict(sorted(by_kind.items(), key=lambda kv: -kv[1])),
        "loss_ms": loss_ms,  # the chunked loss with its gradients, across kinds (its matmuls are in "matmul")
        "top_kernels_ms": dict(sorted(per_kernel.items(), key=lambda kv: -kv[1])[:args.top]),
        # The share of the step the device computes; the rest waits on the host (Python, launches, graph breaks).
        "busy": counted / (step_s * 1e3) if cuda else None,
        "graph_breaks": sum(counters["graph_break"].values()) if args.compile else None,
        "recompiles": counters["stats"].get("unique_graphs", 0) if args.compile else None,
    }
    compiled = f", compiled ({args.compile_mode})" if args.compile else ", eager"
    print(f"{args.preset} on {report['gpu'] or device}: {batch} x {length} tokens{compiled}, "
          f"step {report['step_ms']:.1f} ms, "
          f"{report['tokens_per_s']:,.0f} tokens/s"
          + (f", MFU {100 * report['mfu']:.1f}% of {peak / 1e12:.0f} TFLOP/s" if peak else ""))
    print(f"\n{report['measured']} per step, by kind ({counted:.1f} ms counted):")
    for kind, ms in report["by_kind_ms"].items():
        print(f"  {kind:<20}{ms:9.2f} ms {100 * ms / counted:6.1f}%")
    print(f"  of which the loss and its gradients (all kinds): {loss_ms:.2f} ms {100 * loss_ms / counted:.1f}%")
    if cuda:
        print(f"  kernels busy {100 * report['busy']:.0f}% of the step")
    if args.compile:
        print(f"  torch.compile: {report['recompiles']} graphs compiled, {report['graph_breaks']} graph breaks")
    print(f"\nheaviest {args.top}:")
    for name, ms in report["top_kernels_ms"].items():
        print(f"  {ms:9.2f} ms  {kind_of(name):<18} {name[:90]}")
    path = write_report(report, args.json, f"profile_{args.preset}.json")
    if path:
        print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
