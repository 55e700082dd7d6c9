"""Caracal's models as a transformers model class, for the families transformers has no class of its own for
(Caracal, SWH, the Jamba-like hybrid; the others export to LlamaForCausalLM, MambaForCausalLM, Mamba2ForCausalLM).

Importing this module registers `CaracalConfig` (model_type "caracal") with `AutoConfig` and
`CaracalForCausalLM` with `AutoModelForCausalLM`, so an exported folder loads with
``AutoModelForCausalLM.from_pretrained(DIR)``: no `trust_remote_code`, no code in the checkpoint. `import
caracal_cli` arranges for this module to be imported as soon as transformers is (see `caracal_cli/__init__.py`),
so the CLI itself never pays for importing transformers. The weights are the caracal model's own state dict under
``model.``; the config carries the run's resolved `model` section.
"""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

from caracal_cli.config import ModelConfig, from_dict
from caracal_cli.mixers.attention import Rotary
from caracal_cli.model import LanguageModel

MODEL_TYPE = "caracal"


class CaracalConfig(PretrainedConfig):
    """`caracal_model`: the `model` section of a caracal run's config.yaml (every mixer key resolved)."""

    model_type = MODEL_TYPE
    caracal_model: dict | None = None
    vocab_size: int = 50257
    hidden_size: int = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    tie_word_embeddings: bool = True

    def model_config(self) -> ModelConfig:
        cfg = from_dict(ModelConfig, dict(self.caracal_model or {}), "caracal_model")
        cfg.validate()
        return cfg


class CaracalForCausalLM(PreTrainedModel, GenerationMixin):
    """caracal's `LanguageModel` as a transformers causal LM: forward(input_ids) -> logits [B, L, vocab]."""

    config_class = CaracalConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"

    def __init__(self, config: CaracalConfig):
        super().__init__(config)
        self.model = LanguageModel(config.model_config())
        if config.tie_word_embeddings:
            self._tied_weights_keys = {"model.head.weight": "model.embed.weight"}
        self.post_init()

    def _init_weights(self, module):  # caracal's own init ran in LanguageModel; loading overwrites it anyway
        pass

    _tables_ready = False

    def _build_tables(self, device) -> None:
        """RoPE's cos/sin tables are buffers outside the checkpoint; from_pretrained builds the model on the meta
        device and never fills them, so they are computed here, once, before the first forward."""
        for module in self.model.modules():
            if isinstance(module, Rotary):
                module._build(module.cos.shape[0], device)
        self._tables_ready = True

    def get_input_embeddings(self):
        return self.model.embed

    def get_output_embeddings(self):
        return self.model.head

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, **kwargs) -> CausalLMOutput:
        """Left padding is not supported (caracal's mixers see every position); a mask of all ones is fine."""
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("CaracalForCausalLM does not take padded batches: pass sequences of one length")
        if not self._tables_ready:
            self._build_tables(input_ids.device)
        logits = self.model(input_ids)
        loss = None
        if labels is not None:  # transformers' convention: labels are the inputs, shifted here
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                                     ignore_index=-100)
        return CausalLMOutput(loss=loss, logits=logits)

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, **kwargs):
        """No cache: each step reads the whole prefix. The mask goes on, so a padded batch is refused, not misread."""
        return {"input_ids": input_ids, "attention_mask": attention_mask}


AutoConfig.register(MODEL_TYPE, CaracalConfig, exist_ok=True)
AutoModelForCausalLM.register(CaracalConfig, CaracalForCausalLM, exist_ok=True)
