"""Check that each preset's micro-batch fits a 24 GB GPU (the paper's hardware) at its context: one bf16
training step (forward, backward, AdamW) under torch.cuda.set_per_process_memory_fraction(24 GiB / total).

    PYTHONPATH=$PWD python3 scripts/gpu_memory_check.py [PRESET ...]
"""

from __future__ import annotations

import sys

import torch

from caracal_cli.config import list_presets, load_preset
from caracal_cli.model import build_model


def one_step(name: str) -> tuple[str, float]:
    config = load_preset(name)
    model = build_model(config.model).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    ids = torch.randint(0, config.model.vocab_size, (config.train.micro_batch, config.model.context + 1),
                        device="cuda")
    torch.cuda.reset_peak_memory_stats()
    try:
        for _ in range(2):  # the second step holds the optimizer state too
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(ids[:, :-1], targets=ids[:, 1:])
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        status = "fits"
    except torch.cuda.OutOfMemoryError:
        status = "OOM"
    peak = torch.cuda.max_memory_allocated() / 2**30
    del model, opt, ids
    torch.cuda.empty_cache()
    return status, peak


def main(names: list[str]) -> None:
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(24 * 2**30 / total)
    rows = []
    for name in names or [n for n in list_presets() if not n.endswith("demo")]:
        try:
            status, peak = one_step(name)
        except Exception as err:  # report and go on: a missing kernel should not hide the other presets
            status, peak = f"error: {type(err).__name__}: {err}"[:80], float("nan")
        rows.append((name, load_preset(name).train.micro_batch, status, peak))
        print(f"{name:16s} micro_batch={rows[-1][1]:3d} {status:6s} peak={peak:6.2f} GiB", flush=True)
    print("\npreset | micro-batch | 24 GB | peak GiB")
    for name, micro, status, peak in rows:
        print(f"{name} | {micro} | {status} | {peak:.2f}")


if __name__ == "__main__":
    main(sys.argv[1:])
