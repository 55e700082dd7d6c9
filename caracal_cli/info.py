"""What a preset builds: parameters, pattern, dimensions, FLOPs per token and kernel paths (`caracal info`)."""

from __future__ import annotations

import torch

from caracal_cli.config import Config, list_presets, load_preset
from caracal_cli.model import build_model, count_parameters, flops_per_token, mixer_paths
from caracal_cli.monitor import PEAK_FLOPS


def _meta_model(config: Config):
    with torch.device("meta"):  # no memory, no init cost: counts and shapes only
        return build_model(config.model)


def describe_preset(config: Config, device: str = "cpu") -> dict:
    m = config.model
    model = _meta_model(config)
    params = count_parameters(model)
    flops = flops_per_token(model, m.context)
    return {
        "name": config.name,
        "description": config.description,
        "family": m.family,
        "params": params["total"],
        "params_non_embedding": params["non_embedding"],
        "layers": "".join(m.layer_kinds()),
        "mixers": {k: str(v) for k, v in m.mixers.items()},
        "d_model": m.d_model,
        "n_layer": m.n_layer,
        "n_head": m.n_head,
        "d_head": m.d_head,
        "vocab_size": m.vocab_size,
        "context": m.context,
        "pos_emb": m.pos_emb,
        "mlp": m.mlp,
        "flops_per_token_forward": flops["forward"],
        "flops_per_token_train": flops["train"],
        "flops_formula": {"matmul (2 x weights incl. head)": flops["matmul"],
                          "mixing (attention 4*d*keys, FFT 2.5*n*log2 n)": flops["mixing"],
                          "train = 3 x forward": flops["train"]},
        "mfu_formula": "flops_per_token_train x tokens/s / (world size x peak); peak "
                       + ", ".join(f"{gpu} {peak / 1e12:.0f} TFLOP/s" for gpu, peak in PEAK_FLOPS.items())
                       + " (bf16 dense), or --peak-flops",
        "paths": mixer_paths(model, torch.device(device)),
    }


def preset_table() -> list[dict]:
    rows = []
    for name in list_presets():
        config = load_preset(name)
        params = count_parameters(_meta_model(config))
        rows.append({"preset": name, "family": config.model.family, "params": params["total"],
                     "d_model": config.model.d_model, "n_layer": config.model.n_layer,
                     "n_head": config.model.n_head, "pattern": config.model.pattern,
                     "context": config.model.context})
    return rows
