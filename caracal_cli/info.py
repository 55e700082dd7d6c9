"""What a preset builds: parameters, pattern, dimensions, FLOPs per token and kernel paths (`caracal info`)."""

from __future__ import annotations

import contextlib
import warnings

import torch

from caracal_cli.config import CaracalError, Config, list_presets, load_preset
from caracal_cli.model import build_model, count_parameters, flops_per_token, kernel_paths, set_activation_checkpointing
from caracal_cli.monitor import PEAK_FLOPS


def _meta_model(config: Config):
    with torch.device("meta"):  # no memory, no init cost: counts and shapes only
        return build_model(config.model)


def train_memory_estimate(config: Config, micro_batch: int | None = None, checkpointing: str | None = None,
                          device: str = "cpu") -> dict[str, float]:
    """GiB one training step holds at `micro_batch` (default the preset's; 1 for auto): the activations
    autograd saves in one bf16 forward and loss (traced on the meta device, each saved tensor counted once; bf16
    weights stand in for autocast), plus 16 bytes per parameter (fp32 weights, gradients, AdamW's two moments).
    With block checkpointing (default the preset's setting), the blocks' inputs plus one block recomputed.

    An estimate, not a measurement: attention follows `device`'s kernels (on CUDA, flash and flex_attention
    save O(L) per head; on a CPU, a sliding window's band-masked SDPA saves its [L, L] weights), everything else
    the reference paths (MHF's torch.fft, the reference SSM scan); transient buffers and allocator slack are left
    out. `train.micro_batch: auto` measures real steps on a GPU, and `scripts/gpu_memory_check.py` too."""
    from caracal_cli.mixers.attention import fused_attention_on_meta

    micro = micro_batch or (1 if config.train.micro_batch == "auto" else config.train.micro_batch)
    checkpointing = checkpointing or config.train.activation_checkpointing
    model = _meta_model(config).to(torch.bfloat16)
    kernels = fused_attention_on_meta() if torch.device(device).type == "cuda" else contextlib.nullcontext()
    with kernels:
        saved = _saved_bytes(model, micro, config.model.context)
        if checkpointing == "block":
            set_activation_checkpointing(model, "block")
            saved = _saved_bytes(model, micro, config.model.context) + saved / len(model.blocks)
    states = 16 * count_parameters(model)["total"]
    return {"micro_batch": micro, "activations_gib": saved / 2**30, "states_gib": states / 2**30,
            "total_gib": (saved + states) / 2**30}


def _saved_bytes(model, micro: int, context: int) -> int:
    """Bytes of the tensors autograd keeps for the backward of one forward and loss on the meta device."""
    kept: dict[int, torch.Tensor] = {}  # holding them keeps their ids from being reused during the trace

    def pack(tensor):
        base = tensor if tensor._base is None else tensor._base
        kept.setdefault(id(base), base)  # a tensor saved by several ops, or through views, is stored once
        return tensor

    with warnings.catch_warnings(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        warnings.simplefilter("ignore")  # bf16 weights with float32 norms' inputs: fine for counting bytes
        try:
            ids = torch.zeros(micro, context, dtype=torch.long, device="meta")
            model(ids, targets=ids)
        except RuntimeError as err:  # a shape past int64 ("integer multiplication overflow"), even on meta
            raise CaracalError(f"cannot estimate a step of {micro} × {context} tokens ({err})") from None
    return sum(t.numel() * t.element_size() for t in kept.values())


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
        "paths": kernel_paths(model, torch.device(device)),
        "train_memory_estimate_gib": {k: round(v, 1) if isinstance(v, float) else v
                                      for k, v in train_memory_estimate(config, device=device).items()},
        "micro_batch": micro_batch_on(config, device),
    }


def micro_batch_on(config: Config, device: str) -> str:
    """The micro-batch a run of `config` would use on `device` (auto: real steps on CUDA, the estimate on a CPU),
    or why none fits."""
    from caracal_cli.autobatch import resolve

    try:
        return resolve(config, torch.device(device)).summary()
    except CaracalError as err:
        return str(err)


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
