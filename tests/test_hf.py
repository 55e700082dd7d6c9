"""Hugging Face interop: exported folders load with transformers' Auto classes and give caracal's logits (float64)
for every family; caracal → HF → caracal round trips are byte-identical; foreign configs are translated, imported
runs fine-tune; lm-eval's `hf` model on an exported Llama gives caracal's numbers; bad input fails in one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_loader import _tokenizer, make_dataset
from typer.testing import CliRunner

pytest.importorskip("transformers")

from caracal_cli import hf  # noqa: E402
from caracal_cli.checkpoint import (latest_checkpoint, load_model, load_run_config, model_state,  # noqa: E402
                                    save_checkpoint, save_run_config)
from caracal_cli.cli import app  # noqa: E402
from caracal_cli.config import load_preset  # noqa: E402
from caracal_cli.model import build_model, count_parameters  # noqa: E402
from caracal_cli.tokenizer import load_tokenizer  # noqa: E402

runner = CliRunner()
SMALL = ["model.d_model=32", "model.n_layer=2", "model.n_head=2", "model.context=32", "model.vocab_size=300"]
# preset and overrides of a small model of every family; the first three have transformers classes of their own
FAMILIES = {
    "llama": ("llama-tiny", []),
    "mamba": ("mamba-tiny", []),
    "mamba2": ("mamba2-tiny", ["model.mixers.M.headdim=16", "model.mixers.M.ngroups=2"]),
    "caracal": ("tiny", ["model.n_layer=3", "model.mixers.A.window=8"]),
    "jamba": ("jamba-tiny", ["model.pattern=MA"]),
    "swh": ("swh-tiny", ["model.mixers.S.width=16", "model.mixers.S.heads=2", "model.mixers.S.chunk=4"]),
}
NATIVE = {"llama": "LlamaForCausalLM", "mamba": "MambaForCausalLM", "mamba2": "Mamba2ForCausalLM"}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """A run directory with random weights per family, and its export."""
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for family, (preset, sets) in FAMILIES.items():
        torch.manual_seed(0)
        config = load_preset(preset, SMALL + sets)
        run = root / family
        save_run_config(run, config)
        _tokenizer().save(run)
        save_checkpoint(run, 7, model_state(build_model(config.model)), None, {})
        hf.export_hf(run, root / f"{family}-hf")
        out[family] = run
    return out


@pytest.fixture
def float64_transformers(monkeypatch):
    """transformers computes norms, residuals and scans of these classes in float32 whatever the model's dtype;
    in a float64 comparison "float32" means float64, so the two implementations are compared exactly."""
    import transformers.models.llama.modeling_llama as llama
    import transformers.models.mamba.modeling_mamba as mamba
    import transformers.models.mamba2.modeling_mamba2 as mamba2

    class Float64Torch:
        float32 = torch.float64

        def __getattr__(self, name):
            return getattr(torch, name)

    for module in (llama, mamba, mamba2):
        monkeypatch.setattr(module, "torch", Float64Torch())
    to_float = torch.Tensor.float
    monkeypatch.setattr(torch.Tensor, "float", lambda t, *a, **k: t if t.dtype == torch.float64 else to_float(t))


def exported(runs, family: str) -> Path:
    return runs[family].parent / f"{family}-hf"


@pytest.mark.parametrize("family", FAMILIES)
def test_exported_model_gives_caracals_logits_in_float64(runs, family, float64_transformers):
    from transformers import AutoModelForCausalLM

    folder = exported(runs, family)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float64).eval()
    assert type(model).__name__ == NATIVE.get(family, "CaracalForCausalLM")
    if family in NATIVE:  # transformers' own class and nothing of ours: loading needs no caracal
        assert type(model).__module__.startswith("transformers.models.")
        assert "auto_map" not in json.loads((folder / "config.json").read_text())
    assert not list(folder.glob("*.py"))
    ours, *_ = load_model(runs[family])
    ours = ours.double()
    assert model.num_parameters() == count_parameters(ours)["total"]
    ids = torch.randint(0, 300, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ours(ids), rtol=0, atol=1e-12)


@pytest.mark.parametrize("family", ["llama", "mamba", "mamba2", "caracal"])
def test_round_trip_is_byte_identical(runs, family, tmp_path):
    back = tmp_path / "back"
    summary = hf.import_hf(exported(runs, family), back)
    assert summary["params"] == summary["hf_params"]
    original = latest_checkpoint(runs[family]) / "model.safetensors"
    assert (latest_checkpoint(back) / "model.safetensors").read_bytes() == original.read_bytes()
    assert (back / "config.yaml").read_text() == (runs[family] / "config.yaml").read_text()
    assert load_tokenizer(back).encode("the lazy fox") == load_tokenizer(runs[family]).encode("the lazy fox")


@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_foreign_checkpoint_is_translated_and_gives_the_same_logits(runs, family, tmp_path):
    """A folder made by transformers carries no caracal metadata: the config is read from its config.json (for
    caracal's own families, its `caracal_model` section, with the family's tiny preset's recipe)."""
    folder = tmp_path / "foreign"
    folder.mkdir()
    for file in exported(runs, family).iterdir():
        (folder / file.name).write_bytes(file.read_bytes())
    config = json.loads((folder / "config.json").read_text())
    del config["caracal"]
    (folder / "config.json").write_text(json.dumps(config))
    settings = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**settings, "eos_token": "<|endoftext|>"}))

    summary = hf.import_hf(folder, tmp_path / "run", ["train.tokens=4096"])
    imported = load_run_config(tmp_path / "run")
    assert imported.name == "hf-foreign" and imported.model.family == family and imported.train.tokens == 4096
    original = load_run_config(runs[family]).model
    for key in ("d_model", "n_layer", "vocab_size", "norm_eps", "tie_embeddings", "pos_emb", "mlp"):
        assert getattr(imported.model, key) == getattr(original, key), key
    assert summary["params"] == count_parameters(build_model(original))["total"]
    a, *_ = load_model(tmp_path / "run")
    b, *_ = load_model(runs[family])
    ids = torch.randint(0, 300, (1, 24))
    with torch.no_grad():
        assert torch.equal(a(ids), b(ids))
    assert load_tokenizer(tmp_path / "run").eot_id == _tokenizer().eot_id


def test_generate_of_an_exported_caracal_is_caracals_greedy_decoding(runs):
    from transformers import AutoModelForCausalLM

    from caracal_cli.generate import generate_ids

    model = AutoModelForCausalLM.from_pretrained(exported(runs, "caracal"))
    ours, *_ = load_model(runs["caracal"])
    prompt = torch.randint(0, 300, (1, 7))
    produced = model.generate(prompt, max_new_tokens=6, do_sample=False)[0, 7:].tolist()
    assert produced == list(generate_ids(ours, prompt[0].tolist(), 6, 0.0, None, None, 0))


def test_the_exported_gpt2_tokenizer_is_caracals():
    import random

    from caracal_cli.tokenizer import gpt2

    theirs, ours, rng = hf.hf_tokenizer(gpt2()), gpt2(), random.Random(0)
    pieces = ["the", " ", "\n", "é", "東京", "  x", "'s", "123", "!", "\t", "ab", "\U0001f600", " don't"]
    for _ in range(300):
        text = "".join(rng.choice(pieces) for _ in range(20))
        assert theirs.encode(text, add_special_tokens=False).ids == ours.encode(text)
    assert theirs.token_to_id("<|endoftext|>") == ours.eot_id


HF_MADE = {  # configs as transformers users write them: its defaults for everything else
    "llama": ("LlamaConfig", dict(hidden_size=32, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
                                  max_position_embeddings=64)),
    "mamba": ("MambaConfig", dict(hidden_size=32, state_size=8, num_hidden_layers=2, time_step_rank=5)),
    "mamba2": ("Mamba2Config", dict(hidden_size=32, state_size=8, num_hidden_layers=2, num_heads=8, head_dim=8,
                                    n_groups=2, chunk_size=16, tie_word_embeddings=True)),
}


@pytest.mark.parametrize("family", HF_MADE)
def test_a_checkpoint_saved_by_transformers_imports_with_its_logits(family, tmp_path, float64_transformers):
    import transformers

    config_class, settings = HF_MADE[family]
    config = getattr(transformers, config_class)(vocab_size=300, eos_token_id=0, **settings)
    torch.manual_seed(0)
    theirs = transformers.AutoModelForCausalLM.from_config(config).double().eval()
    with torch.no_grad():  # off the init (norms and D start at one), onto values a float32 checkpoint holds exactly
        for param in theirs.parameters():
            param.copy_((param + 0.1 * torch.randn_like(param)).to(torch.float32))
    theirs.save_pretrained(tmp_path / "hf")
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=hf.hf_tokenizer(_tokenizer()),
                                                     eos_token="<|endoftext|>")
    tokenizer.save_pretrained(tmp_path / "hf")
    summary = hf.import_hf(tmp_path / "hf", tmp_path / "run")
    assert summary["family"] == family and summary["params"] == theirs.num_parameters()
    ours, config, tok, _ = load_model(tmp_path / "run")
    assert config.model.tie_embeddings == theirs.config.tie_word_embeddings and tok.eot_id == 0
    ids = torch.randint(0, 300, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(ours.double()(ids), theirs.double()(ids).logits, rtol=0, atol=1e-10)


@pytest.mark.parametrize("preset", ["llama-tiny", "mamba-small", "mamba2-medium"])
def test_a_foreign_config_of_a_shipped_shape_infers_that_preset(preset):
    model = load_preset(preset).model
    native = hf.native_class(model)
    config = native.to_hf(model, hf._mixer(model), 50256) | {"model_type": native.model_type}
    section, names = hf._model_section(json.loads(json.dumps(config)))
    assert names is native.names and hf._infer_config(config, section, "hf-x").name == preset


def test_a_hub_id_that_cannot_be_fetched_is_one_line(tmp_path, monkeypatch):
    import huggingface_hub

    def offline(*args, **kwargs):
        raise huggingface_hub.errors.LocalEntryNotFoundError("Connection refused\nmore lines")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    result = runner.invoke(app, ["import", "state-spaces/mamba-130m-hf", "--out", str(tmp_path / "r")])
    assert result.exit_code == 1 and result.output.count("\n") == 1
    assert "state-spaces/mamba-130m-hf: not a local folder, and the Hub could not provide it" in result.output


def test_exported_caracal_loads_after_import_caracal_cli_alone(runs):
    """`import caracal_cli` (and the CLI) does not import transformers, yet registers CaracalForCausalLM when
    transformers is imported."""
    code = ("import importlib.util, sys, caracal_cli, caracal_cli.cli\n"
            "assert 'transformers' not in sys.modules, 'imported at startup'\n"
            "assert importlib.util.find_spec('transformers') and 'transformers' not in sys.modules  # a probe\n"
            "from transformers import AutoModelForCausalLM\n"
            f"model = AutoModelForCausalLM.from_pretrained({str(exported(runs, 'swh'))!r})\n"
            "print(type(model).__name__, model.num_parameters())\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    ours, *_ = load_model(runs["swh"])
    assert result.stdout.split() == ["CaracalForCausalLM", str(count_parameters(ours)["total"])]


def test_lm_eval_hf_model_on_an_exported_llama_gives_caracals_numbers(runs):
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from caracal_cli.evaluate import CaracalLM

    theirs = HFLM(pretrained=str(exported(runs, "llama")), device="cpu", batch_size=2, dtype="float32")
    ours = CaracalLM(checkpoint=str(runs["llama"]), device="cpu", batch_size=2)
    pairs = [("the quick brown", " fox"), ("over the", " lazy dog"), ("", "jumps")]
    texts = ["the quick brown fox jumps over the lazy dog; " * 3]

    def ask(lm, kind, args):
        return getattr(lm, kind)([Instance(request_type=kind, doc={}, arguments=a, idx=0) for a in args])

    for kind, args in (("loglikelihood", pairs), ("loglikelihood_rolling", [(t,) for t in texts])):
        a, b = ask(theirs, kind, args), ask(ours, kind, args)
        for x, y in zip(a, b, strict=True):
            x, y = (x, y) if kind == "loglikelihood" else ((x, None), (y, None))
            assert x[0] == pytest.approx(y[0], abs=1e-4) and x[1] == y[1]


def test_an_imported_run_fine_tunes_with_train_resume(runs, tmp_path):
    from caracal_cli.train import train

    data = make_dataset(tmp_path / "data", train_tokens=8_000, val_tokens=1_024)
    run = tmp_path / "run"
    sets = ["train.micro_batch=4", "train.global_batch_tokens=256", "train.tokens=1024", "train.warmup_tokens=256",
            "train.eval_tokens=256", "train.eval_every=100", "train.checkpoint_every=100"]
    result = runner.invoke(app, ["import", str(exported(runs, "mamba")), "--out", str(run), *[
        arg for s in sets for arg in ("--set", s)]])
    assert result.exit_code == 0, result.output
    before = latest_checkpoint(run) / "model.safetensors"
    summary = train(None, data, run, resume=True, max_steps=2, device="cpu", quiet=True)
    assert summary["step"] == 2 and latest_checkpoint(run).name == "step_00000002"
    assert (latest_checkpoint(run) / "model.safetensors").read_bytes() != before.read_bytes()
    speed = runner.invoke(app, ["speed", "--models", str(run), "--mode", "prefill", "--lengths", "32",
                                "--tokens-per-step", "64", "--repeats", "1", "--warmup", "0", "--device", "cpu",
                                "--out", str(tmp_path / "speed")])  # the imported model, measured as it is
    assert speed.exit_code == 0, speed.output
    report = json.loads((tmp_path / "speed" / "speed.json").read_text())
    assert [(r["preset"], r["status"]) for r in report["results"]] == [(str(run / "config.yaml"), "ok")]


def test_cli_export_and_import_refuse_bad_input_in_one_line(runs, tmp_path):
    def fails(*args):
        result = runner.invoke(app, list(args))
        assert result.exit_code == 1 and "Traceback" not in result.output and result.output.startswith("error:")
        return result.output

    assert "--overwrite" in fails("export", str(runs["llama"]), "--out", str(exported(runs, "llama")))
    assert "--format" in fails("export", str(runs["llama"]), "--format", "gguf", "--out", str(tmp_path / "x"))
    (tmp_path / "a-file").write_text("")
    assert "is a file, not a folder" in fails("export", str(runs["llama"]), "--out", str(tmp_path / "a-file"),
                                              "--overwrite")
    folder = tmp_path / "bad"
    folder.mkdir()
    assert "config.json" in fails("import", str(folder), "--out", str(tmp_path / "r"))
    for file in exported(runs, "llama").iterdir():
        (folder / file.name).write_bytes(file.read_bytes())
    config = json.loads((folder / "config.json").read_text())
    del config["caracal"]
    (folder / "config.json").write_text(json.dumps({**config, "num_key_value_heads": 1}))
    assert "grouped-query" in fails("import", str(folder), "--out", str(tmp_path / "r"))
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    assert "gpt2" in fails("import", str(folder), "--out", str(tmp_path / "r"))
    (folder / "config.json").write_text(json.dumps({**config, "intermediate_size": 256}))
    assert "shape" in fails("import", str(folder), "--out", str(tmp_path / "r"))
    for malformed, message in (([config], "not a JSON object"), ({**config, "hidden_size": "64"}, "wrong type"),
                               ({**config, "caracal": {"config": "- 1"}}, "not the metadata `caracal export`"),
                               ({"model_type": "caracal"}, "without a caracal_model mapping")):
        (folder / "config.json").write_text(json.dumps(malformed))
        assert message in fails("import", str(folder), "--out", str(tmp_path / "r"))
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "tokenizer.json").write_text("{")
    assert "not a valid tokenizer.json" in fails("import", str(folder), "--out", str(tmp_path / "r"))
    assert not (tmp_path / "r").exists()


def test_a_full_disk_during_export_is_one_line_and_leaves_nothing(runs, tmp_path, monkeypatch):
    import safetensors.torch
    from safetensors import SafetensorError

    def full(tensors, filename, *args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    result = runner.invoke(app, ["export", str(runs["llama"]), "--out", str(tmp_path / "exported")])
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert "model.safetensors: Error while serializing: I/O error: No space left on device" in result.output
    assert list(tmp_path.iterdir()) == []  # neither the folder nor its temporary


def test_export_stopped_by_sigterm_leaves_the_old_folder_and_no_temporary(runs, tmp_path, monkeypatch):
    """A SIGTERM while the new folder was being put in place left a hidden temporary folder the size of the
    model (nothing removed it); the command's cleanup runs now, and --overwrite keeps the old export whole.
    Folders come out with the umask's permissions, not mkdtemp's 0700."""
    import signal
    import time

    from caracal_cli.fileio import UMASK

    out = tmp_path / "exported"
    assert runner.invoke(app, ["export", str(runs["llama"]), "--out", str(out)]).exit_code == 0
    assert out.stat().st_mode & 0o777 == 0o777 & ~UMASK
    assert (out / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~UMASK  # save_file alone makes 0600
    before = sorted(p.name for p in out.iterdir())

    def terminated(tmp, final):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)

    monkeypatch.setattr(hf, "replace_dir", terminated)
    result = runner.invoke(app, ["export", str(runs["llama"]), "--out", str(out), "--overwrite"])
    assert result.exit_code == 143 and "export interrupted (SIGTERM)" in result.output, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exported"]
    assert sorted(p.name for p in out.iterdir()) == before
