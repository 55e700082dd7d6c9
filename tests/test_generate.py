"""Cached generation for every model family, sampling filters, and `caracal generate`."""

import contextlib
import pytest
import torch
from typer.testing import CliRunner

from caracal_cli.checkpoint import load_run_config, model_state, save_checkpoint, save_run_config
from caracal_cli.cli import app
from caracal_cli.config import list_presets, load_preset
from caracal_cli.generate import (Decoder, _CastLinears, bucket_length, decode_settings, decoder_for, filter_logits,
                                  generate_ids)
from caracal_cli.model import build_model
from caracal_cli.tokenizer import train_bpe

DEMO_PRESETS = [name for name in list_presets() if name.endswith("demo")]


@pytest.mark.parametrize("preset", DEMO_PRESETS)
def test_static_cache_decoding_equals_full_forward_for_every_family(preset):
    """Through the Decoder's eager step, the function a CUDA graph captures: prompts prefilled whole or in chunks,
    in two length buckets (a bucket's caches are reused, emptied in place); every position's logits equal the
    full forward's. Caracal decodes in MHF blocks of 4 here, so finished blocks are folded many times."""
    overrides = ["model.vocab_size=101"] + ["model.mixers.F.decode_block=4"] * (preset == "demo")
    model = build_model(load_preset(preset, overrides).model).eval()
    decoder = Decoder(model, graphs=False)
    for total, prompt, chunk, length in ((20, 7, None, None), (20, 10, 3, 32), (10, 3, 2, None)):
        ids = torch.randint(0, 101, (2, total))
        decoder.prefill_chunk = chunk
        logits = [decoder.start(ids[:, :prompt], total - prompt, length)]
        logits += [decoder.step(ids[:, t]) for t in range(prompt, total - 1)]
        with torch.no_grad():
            full = model(ids)[:, prompt - 1:total - 1]
        torch.testing.assert_close(torch.stack(logits, 1), full, rtol=1e-4, atol=1e-4)
    assert sorted(decoder._slots) == [(2, 32), (2, 64)]  # (batch, length): the first and third share one


@pytest.mark.parametrize("preset", DEMO_PRESETS)
def test_decode_step_reads_nothing_back_to_the_host(preset):
    """What a CUDA graph asks of the step: no value read back (.item(), int(), a branch on a tensor). Tensors on
    the meta device hold no values, so any such read raises there."""
    overrides = ["model.pos_emb=learned"] * (preset == "llama-demo")  # the position embedding's lookup too
    with torch.device("meta"):
        model = build_model(load_preset(preset, overrides).model).eval()
    caches = model.init_caches(2, 64, device="meta")
    with torch.inference_mode():
        logits = model.decode_step(torch.zeros(2, 1, dtype=torch.long, device="meta"), caches)
    assert logits.shape == (2, model.config.vocab_size)


@pytest.mark.parametrize("preset", DEMO_PRESETS)
def test_decode_step_is_one_graph_for_the_compiler(preset):
    """`--decode-impl compiled` needs the step in one Dynamo graph: a break splits it into frames that recompile
    per call, and on an H100 (torch 2.11) one such break (an untraceable autocast query) ended in a failed CUDA-
    graph capture. On CUDA the library kernels (mamba_ssm) are opaque calls inside that graph."""
    model = build_model(load_preset(preset, ["model.vocab_size=101"]).model).eval()
    caches = model.init_caches(2, 64)
    torch._dynamo.reset()
    with torch.inference_mode():
        explained = torch._dynamo.explain(model.decode_step)(torch.zeros(2, 1, dtype=torch.long), caches)
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons


@pytest.mark.parametrize("preset", DEMO_PRESETS)
def test_sixteen_bit_linear_copies_give_autocasts_products(preset):
    """What the graph path captures instead of autocast's per-step casts: bf16 copies of the Linear weights give
    the same logits, bit for bit, under bf16 autocast; the model's own weights are back afterwards, tied ones
    untouched; `refresh` follows a change of the weights."""
    torch.manual_seed(0)
    model = build_model(load_preset(preset, ["model.vocab_size=101"]).model).eval()
    cast = _CastLinears(model, torch.bfloat16)
    assert cast.weights and all(c.dtype == torch.bfloat16 for c in cast.copies)
    assert all(w is not model.embed.weight for w in cast.weights)
    ids = torch.randint(0, 101, (2, 9))

    def decode(swap: bool) -> torch.Tensor:
        caches = model.init_caches(2, 16, torch.device("cpu"), torch.bfloat16)
        out = []
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
            for t in range(ids.shape[1]):
                model.prepare_step(caches, t)
                with cast.swapped() if swap else contextlib.nullcontext():
                    assert cast.weights[0].dtype == (torch.bfloat16 if swap else torch.float32)
                    out.append(model.decode_step(ids[:, t:t + 1], caches).float())
        return torch.stack(out, 1)

    assert torch.equal(decode(True), decode(False))
    assert all(w.dtype == torch.float32 for w in cast.weights)
    with torch.no_grad():
        cast.weights[0].mul_(2)
    cast.refresh()
    assert torch.equal(cast.copies[0], cast.weights[0].to(torch.bfloat16))
    assert torch.equal(decode(True), decode(False))


@pytest.mark.parametrize("preset", ["demo", "swh-demo"])
def test_compiled_step_decodes_as_the_full_forward(preset):
    """`compile_step`: the step compiled by Inductor (on CUDA a graph then holds its kernels; the GPU tests check
    that) mutates the caches as the eager step does: the logits, token by token across MHF blocks (SWH: its
    recurrent state, real and imaginary parts) and a second prompt in the same caches, equal the full forward's."""
    torch.manual_seed(0)
    overrides = ["model.vocab_size=101"] + ["model.mixers.F.decode_block=4"] * (preset == "demo")
    model = build_model(load_preset(preset, overrides).model).eval()
    decoder = Decoder(model, graphs=False, compile_step=True)
    for _ in range(2):
        ids = torch.randint(0, 101, (2, 14))
        logits = [decoder.start(ids[:, :5], 9)] + [decoder.step(ids[:, t]) for t in range(5, 13)]
        with torch.no_grad():
            full = model(ids)[:, 4:13]
        torch.testing.assert_close(torch.stack(logits, 1), full, rtol=1e-4, atol=1e-4)
    assert decoder._decode_step() is decoder._compiled_step is not None


def test_buckets_and_decoder_errors():
    assert [bucket_length(n) for n in (1, 64, 65, 1000)] == [64, 64, 128, 1024]
    model = build_model(load_preset("demo", ["model.vocab_size=101"]).model).eval()
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        Decoder(model, graphs=True)
    decoder = Decoder(model)
    with pytest.raises(ValueError, match="do not fit"):
        decoder.start(torch.zeros(1, 60, dtype=torch.long), 10, length=64)
    decoder.start(torch.zeros(1, 63, dtype=torch.long), 1, length=64)
    decoder.step(torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match="hold 64 positions"):
        decoder.step(torch.zeros(1, dtype=torch.long))


def test_top_k_and_top_p_filters():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    assert torch.isinf(filter_logits(logits, 2, None)).tolist() == [[False, False, True, True, True]]
    probs = logits.softmax(-1)[0]  # 0.64, 0.24, 0.09, ...
    kept = ~torch.isinf(filter_logits(logits, None, 0.8))
    assert kept.tolist() == [[True, True, False, False, False]] and probs[0] < 0.8 < probs[:2].sum()


def test_greedy_generation_equals_repeated_full_forward():
    model = build_model(load_preset("demo", ["model.vocab_size=101"]).model).eval()
    prompt = [5, 17, 3]
    produced = list(generate_ids(model, prompt, 12, temperature=0))
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(12):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert produced == ids[3:]


@pytest.fixture
def run_dir(tmp_path):
    text = ["To be, or not to be, that is the question. " * 20, "All the world's a stage. " * 20]
    tokenizer = train_bpe(text, 400)
    config = load_preset("demo", [f"model.vocab_size={tokenizer.vocab_size}"])
    model = build_model(config.model)
    run = tmp_path / "runs" / "demo-run"
    run.mkdir(parents=True)
    save_run_config(run, config)
    tokenizer.save(run)
    save_checkpoint(run, 1, model_state(model), None, {})
    return run


def test_generate_command_is_repeatable_with_a_seed(run_dir):
    runner = CliRunner()
    args = ["generate", "--checkpoint", str(run_dir), "--prompt", "To be", "--max-new-tokens", "8", "--seed", "3"]
    first, second = runner.invoke(app, args), runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    assert first.output == second.output and first.output.startswith("To be")


def test_generate_reads_stdin_and_finds_the_newest_run(run_dir, monkeypatch):
    monkeypatch.chdir(run_dir.parent.parent)
    result = CliRunner().invoke(app, ["generate", "--max-new-tokens", "4", "--temperature", "0"], input="All the")
    assert result.exit_code == 0, result.output
    assert "using the newest run" in result.output and "All the" in result.output


def test_decode_settings_resolve_auto_per_device(monkeypatch):
    """auto: a CUDA graph in bf16 on CUDA (where bf16 runs), the eager step in fp32 on a CPU; a graph cannot run
    on a CPU; the Decoder follows the settings."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert decode_settings("auto", "auto", cpu) == ("eager", torch.float32)
    assert decode_settings("compiled", "bf16", cpu) == ("compiled", torch.bfloat16)
    with pytest.raises(ValueError, match="graph replays CUDA graphs; the device is cpu"):
        decode_settings("graph", "auto", cpu)
    for impl, dtype, message in (("fast", "auto", "--decode-impl 'fast'"), ("eager", "int8", "--dtype 'int8'")):
        with pytest.raises(ValueError, match=message):
            decode_settings(impl, dtype, cpu)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)  # resolving needs no device
    assert decode_settings("auto", "auto", cuda) == ("graph", torch.bfloat16)
    model = build_model(load_preset("demo", ["model.vocab_size=101"]).model).eval()
    decoder = decoder_for(model, *decode_settings("compiled", "auto", cpu))
    assert not decoder.graphs and decoder.autocast is None and decoder._compiled_step is not None
    assert decoder_for(model, *decode_settings("eager", "bf16", cpu)).autocast == torch.bfloat16


def test_generate_command_decode_options(run_dir):
    """--decode-impl compiled gives the eager step's greedy text on a CPU; a graph there, or an unknown dtype,
    is a one-line error before the checkpoint loads."""
    runner = CliRunner()
    args = ["generate", "--checkpoint", str(run_dir), "--prompt", "To be", "--max-new-tokens", "6",
            "--temperature", "0", "--device", "cpu"]
    eager, compiled = runner.invoke(app, args), runner.invoke(app, [*args, "--decode-impl", "compiled"])
    assert eager.exit_code == compiled.exit_code == 0, compiled.output
    assert eager.output == compiled.output
    for extra, message in ((["--decode-impl", "graph"], "replays CUDA graphs"), (["--dtype", "fp8"], "--dtype")):
        result = runner.invoke(app, [*args, *extra])
        assert result.exit_code == 1 and message in result.output and "Traceback" not in result.output


def test_a_run_trained_with_fast_kernels_loads_where_they_cannot_run(run_dir):
    """`fast` refuses to train where the kernels cannot run; a checkpoint trained with it still generates on a
    CPU, through auto's path, with a warning naming the setting."""
    config = load_run_config(run_dir)
    config.model.mixers["F"]["fft_impl"] = "fast"
    save_run_config(run_dir, config)
    result = CliRunner().invoke(app, ["generate", "--checkpoint", str(run_dir), "--prompt", "To be",
                                      "--max-new-tokens", "4", "--temperature", "0", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "model.mixers.F: fft_impl=fast cannot run here: not a CUDA device; loaded with auto" in result.output


@pytest.mark.parametrize("args, message", [
    (["--checkpoint", "nowhere", "--prompt", "x"], "no such run"),
    (["--runs-dir", "empty", "--prompt", "x"], "no run with a checkpoint"),
    (["--prompt-file", "missing.txt"], "prompt file not found"),
])
def test_generate_errors_are_one_line(args, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["generate", *args])
    assert result.exit_code == 1 and message in result.output and "Traceback" not in result.output
