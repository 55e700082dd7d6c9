"""The token-mixer registry: one line per mixer kind.

Contract (every mixer): ``forward(x: [B, L, D], cache=None) -> [B, L, D]``, causal; a nested ``Config``
dataclass (with ``kind`` and ``validate(model, where)``) holding its preset keys; ``init_cache(batch, max_len,
device, dtype)`` returning the per-layer state that cached decoding passes back as ``cache``: tensors allocated
once, the position ``"pos"`` a device tensor; ``step(x: [B, 1, D], cache)``, one decoding token with static
shapes and no host sync (a CUDA graph captures it), after the optional host-side ``prepare_step(cache, pos)``;
and ``extra_flops(seq_len)``, forward FLOPs per token beyond its weight matmuls.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from caracal_cli.config import ConfigError, ModelConfig, from_dict
from caracal_cli.mixers.attention import Attention
from caracal_cli.mixers.mamba import Mamba
from caracal_cli.mixers.mamba2 import Mamba2
from caracal_cli.mixers.mhf import MHF
from caracal_cli.mixers.swh import SWH

MIXERS: dict[str, type[nn.Module]] = {
    "mhf": MHF,
    "attention": Attention,
    "mamba": Mamba,
    "mamba2": Mamba2,
    "swh": SWH,
}


def mixer_config(raw: dict[str, Any], model: ModelConfig, where: str) -> Any:
    """Validate one mixer entry of a preset (``{kind: mhf, …}``) into its typed config."""
    if not isinstance(raw, dict) or "kind" not in raw:
        raise ConfigError(f"{where} must be a mapping with a 'kind' (one of {', '.join(MIXERS)})")
    if raw["kind"] not in MIXERS:
        raise ConfigError(f"{where}.kind {raw['kind']!r} is not a mixer (known: {', '.join(MIXERS)})")
    cfg = from_dict(MIXERS[raw["kind"]].Config, raw, where)
    cfg.validate(model, where)
    return cfg


def build_mixer(raw: dict[str, Any], model: ModelConfig, where: str = "mixer") -> nn.Module:
    cfg = mixer_config(raw, model, where)
    return MIXERS[cfg.kind](cfg, model)
