"""Compare mamba_ssm's CUDA kernels with caracal's reference PyTorch path on the same weights.

    PYTHONPATH=/tmp/site:$PWD python scripts/gpu_check_mamba.py [--d-model 768 --length 1024 --batch 2]

For Mamba and Mamba-2 (the presets' settings: d_state 16, expand 2, headdim 64), in float32 and under bf16
autocast: one forward and backward through each path from the same input, then the largest differences of
the output and of every gradient (input and parameters). "rel" is max|library − reference| / max|reference|.
The first Mamba-2 call autotunes Triton kernels (over a minute per dtype on an H100).
"""

from __future__ import annotations

import argparse

import torch

from caracal_cli.config import ModelConfig
from caracal_cli.mixers import build_mixer
from caracal_cli.mixers.mamba import mamba_backend

CONFIGS = {
    "mamba": {"kind": "mamba", "d_state": 16, "d_conv": 4, "expand": 2},
    "mamba2": {"kind": "mamba2", "d_state": 16, "d_conv": 4, "expand": 2, "headdim": 64},
}


def run_path(mixer, impl: str, x: torch.Tensor, weights: torch.Tensor, dtype: torch.dtype):
    """Output and gradients (input first, then parameters by name) of one path."""
    mixer.cfg.impl = impl
    mixer.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        y = mixer(x)
    (y.float() * weights).sum().backward()
    grads = {"input": x.grad.float()} | {n: p.grad.float().clone() for n, p in mixer.named_parameters()}
    return y.detach().float(), grads


def compare(kind: str, dtype: torch.dtype, d_model: int = 768, length: int = 1024, batch: int = 2,
            seed: int = 0, device: str = "cuda") -> dict:
    """Largest output and gradient differences between the library and reference paths."""
    torch.manual_seed(seed)
    mixer = build_mixer(CONFIGS[kind], ModelConfig(d_model=d_model, n_head=d_model // 64)).to(device)
    x = torch.randn(batch, length, d_model, device=device)
    weights = torch.randn(batch, length, d_model, device=device)
    paths = {}
    for impl in ("library", "reference"):
        mixer.cfg.impl = impl
        paths[impl] = mixer.path(torch.device(device))
    y_lib, g_lib = run_path(mixer, "library", x, weights, dtype)
    y_ref, g_ref = run_path(mixer, "reference", x, weights, dtype)
    mixer.cfg.impl = "auto"
    diff = lambda a, b: ((a - b).abs().max().item(), ((a - b).abs().max() / b.abs().max()).item())  # noqa: E731
    out_abs, out_rel = diff(y_lib, y_ref)
    grad_errors = {name: diff(g_lib[name], g_ref[name]) for name in g_ref}
    worst = max(grad_errors, key=lambda name: grad_errors[name][1])
    return {"kind": kind, "dtype": str(dtype).removeprefix("torch."), "out_abs": out_abs, "out_rel": out_rel,
            "grad_abs": grad_errors[worst][0], "grad_rel": grad_errors[worst][1], "worst_grad": worst,
            "grad_rel_all": {name: err[1] for name, err in grad_errors.items()}, "paths": paths}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--d-model", type=int, default=768)
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=2)
    args = parser.parse_args()
    backend = mamba_backend()
    if not (backend.available and torch.cuda.is_available()):
        raise SystemExit(f"needs CUDA and mamba_ssm: cuda={torch.cuda.is_available()}, {backend.reason}")
    print(f"{backend.reason}, causal-conv1d: {backend.causal_conv1d}, torch {torch.__version__}, "
          f"{torch.cuda.get_device_name()}, d_model={args.d_model} L={args.length} B={args.batch}")
    rows = [compare(kind, dtype, args.d_model, args.length, args.batch)
            for kind in CONFIGS for dtype in (torch.float32, torch.bfloat16)]
    for row in rows[::2]:
        print(f"  {row['kind']}: library = {row['paths']['library']}; reference = {row['paths']['reference']}")
    print(f"{'mixer':8} {'dtype':9} {'out max abs':>12} {'out rel':>9} {'grad max abs':>13} {'grad rel':>9}  "
          "worst grad")
    for row in rows:
        print(f"{row['kind']:8} {row['dtype']:9} {row['out_abs']:12.2e} {row['out_rel']:9.2e} "
              f"{row['grad_abs']:13.2e} {row['grad_rel']:9.2e}  {row['worst_grad']}")
    print("summary: " + " | ".join(f"{r['kind']} {r['dtype']} out {r['out_rel']:.1e} grad {r['grad_rel']:.1e}"
                                   for r in rows))


if __name__ == "__main__":
    main()
