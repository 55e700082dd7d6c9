"""Where one MHF module's time goes: forward + backward of the module and of its parts alone, eager and
compiled, and the module's kernels summed by kind (as scripts/profile_step.py sums a training step's).

    PYTHONPATH=$PWD python3 scripts/profile_mixer.py --d-model 768 --n-head 12 --lengths 512 2048 \
        [--tokens 65536] [--impls torch auto] [--parts module …] [--set key=value …] [--compile] [--json FILE]

Parts: the whole module; its three linears alone; the FFT convolution alone; the pre-convolution with the
LayerNorm; SiLU with the grouped gate convolution. bf16 autocast on CUDA, float32 on a CPU (a rough guide only).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from profile_step import kind_of  # noqa: E402

from caracal_cli.config import ModelConfig, parse_override  # noqa: E402
from caracal_cli.fileio import write_report  # noqa: E402
from caracal_cli.mixers import build_mixer, gate_conv, pre_norm  # noqa: E402
from caracal_cli.mixers.mhf import causal_fft_conv  # noqa: E402


def parts(mixer) -> dict:
    """name → fn(x) of the module and of each of its parts, all on x [B, L, D]."""
    def linears(x):
        return mixer.out(mixer.value(x) * mixer.gate_in(x))

    def compute_dtype(x):
        return torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype

    # The two stages around the convolution run as the module runs them: the Triton kernels where
    # `fused_parts` puts them (asked at trace time, so compiled `auto` gets the composition), else PyTorch.
    def pre_norm_part(x):
        if "pre_norm" in mixer.fused_parts(x.device, compute_dtype(x)):
            return pre_norm.conv_layer_norm(x, mixer.pre_conv.conv.weight, mixer.norm.weight, mixer.norm.bias,
                                            mixer.norm.eps, compute_dtype(x), emit_cast=False)[0]
        return mixer.norm(mixer.pre_conv(x))

    def gate(x):
        if "gate" in mixer.fused_parts(x.device, compute_dtype(x)):
            return gate_conv.silu_gate_conv(x.to(compute_dtype(x)), mixer.gate_conv.conv.weight,
                                            mixer.gate_conv.conv.bias)
        return mixer.gate_conv(F.silu(x))

    def conv(x):
        v = x.to(torch.get_autocast_dtype(x.device.type)) if torch.is_autocast_enabled(x.device.type) else x
        return causal_fft_conv(v, v.detach().flip(1).requires_grad_(), mixer.cfg.fft_impl)

    return {"module": mixer, "linears": linears, "fft conv": conv, "pre-conv + norm": pre_norm_part,
            "silu + gate conv": gate}


def time_ms(fn, x, dy, repeats: int, sync) -> float:
    def once():
        x.grad = None
        fn(x).backward(dy)
    for _ in range(3):
        once()
    sync()
    begin = time.perf_counter()
    for _ in range(repeats):
        once()
    sync()
    return (time.perf_counter() - begin) / repeats * 1e3


def kernels(fn, x, dy, sync, cuda: bool) -> dict[str, float]:
    """GPU time of each kernel (by name, ms) in one forward + backward; empty on a CPU."""
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        x.grad = None
        fn(x).backward(dy)
        sync()
    per_kernel: dict[str, float] = defaultdict(float)
    for event in prof.events():
        if cuda and event.device_type == torch.autograd.DeviceType.CUDA and not event.is_user_annotation:
            per_kernel[event.name] += event.time_range.elapsed_us() / 1e3
    return dict(sorted(per_kernel.items(), key=lambda kv: -kv[1]))


def by_kind(per_kernel: dict[str, float]) -> dict[str, float]:
    kinds: dict[str, float] = defaultdict(float)
    for name, ms in per_kernel.items():
        kinds[kind_of(name)] += ms
    return dict(sorted(kinds.items(), key=lambda kv: -kv[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d-model", type=int, default=768)
    ap.add_argument("--n-head", type=int, default=12)
    ap.add_argument("--lengths", type=int, nargs="+", default=[512, 2048])
    ap.add_argument("--tokens", type=int, default=65536, help="tokens per step (batch = tokens / L)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="MHF key=value")
    ap.add_argument("--compile", action="store_true", help="also time each part under torch.compile")
    ap.add_argument("--parts", nargs="+", default=None, help="only these parts (default: all)")
    ap.add_argument("--impls", nargs="+", default=["auto"], help="MHF module_impl values to time, in one run")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    dtype = torch.bfloat16 if cuda else torch.float32
    raw = {"kind": "mhf", **{".".join(keys): value for keys, value in map(parse_override, args.overrides)}}
    model_cfg = ModelConfig(d_model=args.d_model, n_head=args.n_head)
    rows = []
    for impl, length in ((impl, length) for impl in args.impls for length in args.lengths):
        torch.manual_seed(0)
        mixer = build_mixer({**raw, "module_impl": impl}, model_cfg, "mixer").to(device)
        batch = max(1, args.tokens // length)
        x = torch.randn(batch, length, args.d_model, device=device, requires_grad=True)
        dy = torch.randn_like(x)
        for name, fn in parts(mixer).items():
            if args.parts and name not in args.parts:
                continue
            for compiled in (False, True) if args.compile else (False,):
                run = torch.compile(fn) if compiled else fn

                def under_autocast(x, run=run):
                    with torch.autocast(device.type, dtype=dtype, enabled=cuda):
                        return run(x)
                ms = time_ms(under_autocast, x, dy, args.repeats, sync)
                per_kernel = kernels(under_autocast, x, dy, sync, cuda) if name == "module" else {}
                kinds = by_kind(per_kernel)
                rows.append({"part": name, "module_impl": impl, "length": length, "batch": batch,
                             "compiled": compiled, "ms": ms, "kernel_ms": sum(per_kernel.values()),
                             "kernels_by_kind_ms": kinds, "top_kernels_ms": dict(list(per_kernel.items())[:12])})
                print(f"{impl:5s} L={length:6d} {'compiled' if compiled else 'eager':8s} {name:18s} {ms:8.2f} ms"
                      + (f"   kernels {sum(per_kernel.values()):.2f} ms: " + ", ".join(
                          f"{k} {v:.2f}" for k, v in kinds.items()) if kinds else ""), flush=True)
                for kernel, kernel_ms in list(per_kernel.items())[:8]:
                    print(f"{'':40s}{kernel_ms:7.3f} ms  {kernel[:80]}")
            torch._dynamo.reset()
    report = {"d_model": args.d_model, "n_head": args.n_head, "tokens": args.tokens, "overrides": args.overrides,
              "device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__, "rows": rows}
    path = write_report(report, args.json, "profile_mixer.json")
    if path:
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
