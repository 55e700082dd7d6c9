"""The paper's 24 GB setting: the micro-batch `train.micro_batch: auto` picks for each preset when held to 24 GiB
(`train.memory_limit_gb=24`: real training steps under torch.cuda.set_per_process_memory_fraction), with its
peak, and whether blocks had to be checkpointed.

    PYTHONPATH=$PWD python3 scripts/gpu_memory_check.py [PRESET ...]
"""

from __future__ import annotations

import sys

import torch

from caracal_cli import autobatch
from caracal_cli.config import list_presets, load_preset


def main(names: list[str]) -> None:
    device = torch.device("cuda", 0)
    rows = []
    for name in names or [n for n in list_presets() if not n.endswith("demo")]:
        config = load_preset(name, ["train.micro_batch=auto", "train.memory_limit_gb=24"])
        autobatch.apply_memory_limit(config, device)
        try:
            summary = autobatch.resolve(config, device).summary()
        except Exception as err:  # report and go on: a missing kernel should not hide the other presets
            summary = f"error: {type(err).__name__}: {err}"[:120]
        rows.append((name, summary))
        print(f"{name:16s} {summary}", flush=True)
    print("\npreset | at 24 GiB")
    for name, summary in rows:
        print(f"{name} | {summary}")


if __name__ == "__main__":
    main(sys.argv[1:])
