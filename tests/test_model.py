"""Whole models: the paper's parameter table, every preset builds, causality, gradients, cached decoding,
and training stability at short and long context."""

import pytest
import torch

from caracal_cli.config import list_presets, load_preset
from caracal_cli.info import train_memory_estimate
from caracal_cli.model import build_model, count_parameters, flops_per_token
from conftest import small_model_config

# Millions of parameters in the paper's table (GPT-2 vocabulary, tied embeddings).
PAPER_PARAMS = {
    "tiny": 63, "small": 120, "medium": 345, "large": 724,
    "llama-tiny": 64, "llama-small": 124, "llama-medium": 360, "llama-large": 757,
    "mamba-tiny": 66, "mamba-small": 129, "mamba-medium": 372, "mamba-large": 793,
    "mamba2-tiny": 64, "mamba2-small": 125, "mamba2-medium": 357, "mamba2-large": 764,
    "jamba-tiny": 71, "jamba-small": 138, "jamba-medium": 409, "jamba-large": 866,
}


def meta_model(name):
    with torch.device("meta"):
        return build_model(load_preset(name).model)


@pytest.mark.parametrize("name", sorted(PAPER_PARAMS))
def test_parameter_counts_match_the_paper_within_2_percent(name):
    total = count_parameters(meta_model(name))["total"] / 1e6
    assert abs(total - PAPER_PARAMS[name]) / PAPER_PARAMS[name] < 0.02, total


@pytest.mark.parametrize("name", list_presets())
def test_every_preset_builds_on_the_meta_device(name):
    model = meta_model(name)
    config = load_preset(name).model
    assert len(model.blocks) == config.n_layer
    flops = flops_per_token(model, config.context)
    assert flops["forward"] > 2 * count_parameters(model)["non_embedding"]


PATTERNS = {
    "caracal": dict(pattern="FFA"),
    "llama": dict(pattern="A", mixers={"A": {"kind": "attention"}}, pos_emb="rope"),
    "caracal-learned-pe": dict(pattern="FFA", pos_emb="learned"),
    "caracal-gelu": dict(pattern="FFFFFA", n_layer=6, mlp="gelu"),
    "mamba": dict(pattern="M", mixers={"M": {"kind": "mamba"}}, mlp="none"),
    "mamba2": dict(pattern="M", mixers={"M": {"kind": "mamba2", "d_state": 8, "headdim": 16, "reference_chunk": 8}},
                   mlp="none"),
    "jamba": dict(pattern="MA", mixers={"M": {"kind": "mamba"}, "A": {"kind": "attention"}}),
    "swh": dict(pattern="S", mixers={"S": {"kind": "swh", "width": 24, "heads": 3, "chunk": 4}}),
}


@pytest.mark.parametrize("name", list(PATTERNS))
def test_model_is_causal(name):
    model = build_model(small_model_config(**PATTERNS[name])).double()
    ids = torch.randint(0, 97, (2, 24))
    logits = model(ids)
    assert logits.shape == (2, 24, 97)
    ids2 = ids.clone()
    ids2[:, 11:] = torch.randint(0, 97, (2, 13))
    torch.testing.assert_close(model(ids2)[:, :11], logits[:, :11], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", list(PATTERNS))
def test_model_gradients_reach_every_parameter(name):
    model = build_model(small_model_config(**PATTERNS[name]))
    ids = torch.randint(0, 97, (2, 16))
    model(ids[:, :-1], targets=ids[:, 1:]).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, pname


@pytest.mark.parametrize("name", list(PATTERNS))
def test_cached_decoding_equals_full_forward(name):
    model = build_model(small_model_config(**PATTERNS[name])).double()
    ids = torch.randint(0, 97, (1, 20))
    full = model(ids)
    caches = model.init_caches(1, 20)
    steps = [model(ids[:, :4], caches)] + [model(ids[:, t:t + 1], caches) for t in range(4, 20)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-9, atol=1e-9)


def test_bf16_autocast_forward():
    model = build_model(small_model_config())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(torch.randint(0, 97, (2, 16)))
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()


@pytest.mark.parametrize("length", [512, 8192])
def test_training_is_stable_at_short_and_long_context(length):
    """The MHF sums up to L terms: its output scale must not grow with L, and loss must fall at 8K too."""
    config = small_model_config(context=length, pattern="FFA", vocab_size=64)
    model = build_model(config)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    period = torch.randint(0, 64, (37,))
    ids = period.repeat(length // 37 + 2)[: length + 1].unsqueeze(0)
    with torch.no_grad():
        h = model.embed(ids[:, :-1])
        out = model.blocks[0].mixer(model.blocks[0].norm1(h))
    assert out.std() < 1.0  # init scale independent of L (√(t+1) normalisation)
    losses = []
    for _ in range(8):
        loss = model(ids[:, :-1], targets=ids[:, 1:])
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0] - 0.5, losses


@pytest.mark.parametrize("name", [n for n in list_presets() if n.split("-")[0] in
                                  ("tiny", "small", "medium", "large", "llama", "swh") and not n.endswith("demo")])
def test_paper_24_gb_setting_resolves_by_estimate(name):
    """The paper trained on 24 GB GPUs: `--set train.memory_limit_gb=24` must leave every preset a micro-batch
    (by `caracal info`'s estimate: saved activations of the pure-PyTorch path + weights, gradients and AdamW
    moments; the Mamba family's reference scan saves far more than its CUDA kernels, so it is measured on a GPU
    instead), without checkpointing at context 512."""
    from caracal_cli.autobatch import resolve

    config = load_preset(name, ["train.memory_limit_gb=24"])
    estimate = lambda cfg, dev, m, ckpt: train_memory_estimate(cfg, m, ckpt)["total_gib"]  # noqa: E731
    choice = resolve(config, torch.device("cpu"), step_peak=estimate, total_gib=80)
    assert choice.micro_batch >= 1
    assert choice.activation_checkpointing == "none" or config.model.context > 512, choice



@pytest.mark.parametrize("name", ["small", "llama-small"])
def test_memory_estimate_for_cuda_holds_no_attention_weights(name):
    """On CUDA, flash and flex_attention keep O(L) per head for the backward, so the estimate for a CUDA
    device grows linearly in the context; the CPU's estimate counts the [L, L] weights that band-masked SDPA
    saves (at small, L = 32,768 × 4 the CUDA estimate is 86 GiB where an H100 measured 75, the CPU's 856)."""
    def estimate(context, device):
        config = load_preset(name, [f"model.context={context}", "train.micro_batch=1"])
        return train_memory_estimate(config, device=device)["activations_gib"]

    lengths = {L: estimate(L, "cuda") for L in (1024, 2048, 4096)}
    long = lengths[4096]
    assert abs((long - lengths[2048]) / (lengths[2048] - lengths[1024]) - 2) < 0.05  # equal steps per token
    config = load_preset(name).model
    layers = sum(config.mixers[kind]["kind"] == "attention" for kind in config.layer_kinds())
    assert estimate(4096, "cpu") - long > layers * config.n_head * 4096**2 * 4 / 2**30 * 0.99

def test_loss_keeps_no_logits_sized_tensor_for_the_backward():
    model = build_model(small_model_config(vocab_size=4000)).double()  # logits dwarf every activation
    ids = torch.randint(0, model.config.vocab_size, (2, 33))
    rows, vocab = 2 * 32, model.config.vocab_size
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        loss = model(ids[:, :-1], targets=ids[:, 1:])
    assert max(saved) < rows * vocab
    logits = model(ids[:, :-1])
    want = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
    assert torch.allclose(loss, want, rtol=1e-12)
    assert torch.allclose(model(ids, last_only=True), model(ids)[:, -1:], rtol=1e-12, atol=1e-15)


def test_compiled_model_gives_the_eager_loss_and_gradients():
    """torch.compile traces the blocks and leaves the FFT convolution and the chunked loss eager (graph breaks);
    aot_eager runs dynamo and AOTAutograd as inductor would, without generating code."""
    torch._dynamo.reset()
    model = build_model(small_model_config(vocab_size=300))
    ids = torch.randint(0, 300, (2, 17))
    eager = model(ids[:, :-1], targets=ids[:, 1:])
    want = torch.autograd.grad(eager, list(model.parameters()))
    compiled = torch.compile(model, backend="aot_eager", fullgraph=False)
    loss = compiled(ids[:, :-1], targets=ids[:, 1:])
    got = torch.autograd.grad(loss, list(model.parameters()))
    assert torch.allclose(loss, eager, rtol=1e-5)
    for g, w in zip(got, want, strict=True):
        assert torch.allclose(g, w, rtol=1e-4, atol=1e-6)
