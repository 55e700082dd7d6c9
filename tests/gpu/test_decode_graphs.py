"""The CUDA-graph decoding path (`generate.Decoder`) against the eager step and the full forward, every family,
on a CUDA machine; skipped elsewhere. Mamba and Mamba-2 prefill through the reference path here (a cached
forward); their decoding step is mamba_ssm's selective_state_update where the library runs."""

import pytest
import torch

from caracal_cli.config import ModelConfig, list_presets, load_preset
from caracal_cli.generate import Decoder, generate_ids
from caracal_cli.mixers import build_mixer
from caracal_cli.model import build_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

DEMO_PRESETS = [name for name in list_presets() if name.endswith("demo")]


def demo_model(preset: str):
    torch.manual_seed(0)
    overrides = ["model.vocab_size=512"] + ["model.mixers.F.decode_block=16"] * (preset == "demo")
    return build_model(load_preset(preset, overrides).model).cuda().eval()


def teacher_forced(decoder: Decoder, ids: torch.Tensor, prompt: int) -> torch.Tensor:
    """Logits [B, L − prompt, vocab] of positions prompt−1 … L−2, the prompt prefilled and the rest stepped."""
    logits = [decoder.start(ids[:, :prompt], ids.shape[1] - prompt).float()]
    logits += [decoder.step(ids[:, t]).float().clone() for t in range(prompt, ids.shape[1] - 1)]
    return torch.stack(logits, 1)


@pytest.mark.parametrize("preset", DEMO_PRESETS)
@pytest.mark.parametrize("batch", [1, 8])
def test_graph_steps_equal_eager_steps_and_the_full_forward(preset, batch):
    """bf16 autocast: the graph replays the eager step's kernels, so the logits agree to rounding noise; both
    stay within bf16 tolerance of the full forward. Two prompts share one bucket and its graph."""
    model = demo_model(preset)
    graph = Decoder(model, graphs=True, autocast=torch.bfloat16, prefill_chunk=24)
    eager = Decoder(model, graphs=False, autocast=torch.bfloat16, prefill_chunk=24)
    for prompt in (40, 33):
        ids = torch.randint(0, 512, (batch, 120), device="cuda")
        got, want = teacher_forced(graph, ids, prompt), teacher_forced(eager, ids, prompt)
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
            full = model(ids)[:, prompt - 1:-1].float()
        scale = full.abs().max()
        assert (got - full).abs().max() / scale < 5e-2, preset
    assert len(graph._slots) == 1 and graph._slots[(batch, 128)].graph is not None


@pytest.mark.parametrize("preset", DEMO_PRESETS)
def test_compiled_graph_steps_equal_eager_steps(preset):
    """`compile_step`: a graph of the Inductor-compiled step (fused kernels, MHF's block sum as the composition)
    against the eager step under bf16 autocast, two prompts in one bucket; and the full forward."""
    model = demo_model(preset)
    compiled = Decoder(model, graphs=True, autocast=torch.bfloat16, compile_step=True)
    eager = Decoder(model, graphs=False, autocast=torch.bfloat16)
    for prompt in (40, 33):
        ids = torch.randint(0, 512, (4, 120), device="cuda")
        got, want = teacher_forced(compiled, ids, prompt), teacher_forced(eager, ids, prompt)
        torch.testing.assert_close(got, want, rtol=3e-2, atol=3e-2)
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
            full = model(ids)[:, prompt - 1:-1].float()
        assert (got - full).abs().max() / full.abs().max() < 5e-2, preset


@pytest.mark.parametrize("preset", DEMO_PRESETS)
def test_greedy_generation_is_identical_with_and_without_graphs(preset):
    """float32: the same tokens, graph or eager, and the same again on a second prompt in the same bucket."""
    model = demo_model(preset)
    graph, eager = Decoder(model, graphs=True), Decoder(model, graphs=False)
    for prompt in ([5, 17, 3, 99], [7] * 30):
        fast = list(generate_ids(model, prompt, 60, temperature=0, decoder=graph))
        slow = list(generate_ids(model, prompt, 60, temperature=0, decoder=eager))
        assert fast == slow, preset



@pytest.mark.parametrize("c", [256, 4096, 16384])
def test_fold_through_the_kernels_equals_the_float32_fold(c):
    """MHF's fold of finished blocks on a bf16 cache (batch 4, d = 768, S = 256): the Triton convolution of the
    reversed streams (fft_impl auto; c = 16384 is the on-chip kernels' longest) against the float32 cuFFT fold
    (fft_impl torch)."""
    torch.manual_seed(0)
    mixer = build_mixer({"kind": "mhf"}, ModelConfig(d_model=768, n_head=12), "mhf").cuda()
    v = torch.randn(4, c + 256, 768, device="cuda").to(torch.bfloat16)
    g = (0.5 + 0.5 * torch.randn(4, c + 256, 768, device="cuda")).to(torch.bfloat16)
    folds = {}
    for impl in ("auto", "torch"):
        mixer.cfg.fft_impl = impl
        cache = {"v": v, "g": g, "folded": torch.zeros(4, 256, 768, device="cuda")}
        with torch.inference_mode():
            mixer._fold(cache, c)
        folds[impl] = cache["folded"]
    got, want = folds["auto"], folds["torch"]
    assert (got - want).norm() / want.norm() < 1e-2
