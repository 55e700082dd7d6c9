import pytest

from caracal_cli.config import ConfigError, list_presets, load_preset


def test_every_shipped_preset_loads_and_validates():
    names = list_presets()
    for expected in ("tiny", "small", "medium", "large", "medium-4k", "demo", "llama-tiny", "llama-large"):
        assert expected in names
    for name in names:
        config = load_preset(name)
        assert config.name == name
        assert config.model.d_model % config.model.n_head == 0


def test_paper_recipe_is_the_default():
    t = load_preset("large").train
    assert (t.lr, t.betas, t.weight_decay, t.grad_clip) == (9e-4, (0.9, 0.95), 0.1, 1.0)
    assert t.global_batch_tokens == 524288 and t.tokens == 10_000_000_000
    m = load_preset("large").model
    assert (m.vocab_size, m.context, m.pattern, m.pos_emb) == (50257, 512, "FFA", "none")
    assert m.mixers["A"] == {"kind": "attention", "window": 256}
    assert (t.ddp_bucket_mb, t.fsdp_prefetch) == (25, 1)  # gradient reduction overlaps backward under torchrun


def test_medium_4k_is_the_second_table_setup():
    c = load_preset("medium-4k")
    assert c.model.context == 4096 and c.train.tokens == 15_000_000_000
    assert c.model.d_model == load_preset("medium").model.d_model


def test_global_batch_divides_for_one_and_eight_gpus():
    for name in list_presets():
        c = load_preset(name)
        micro = 1 if c.train.micro_batch == "auto" else c.train.micro_batch  # auto picks among the divisors
        assert (c.train.micro_batch == "auto") != name.endswith("demo"), name  # GPU presets probe, demos don't
        for world in (1,) if name.endswith("demo") else (1, 8):  # demos are for one CPU
            assert c.train.global_batch_tokens % (micro * c.model.context * world) == 0, (name, world)


def test_inheritance_and_overrides():
    c = load_preset("llama-tiny", ["train.lr=6e-4", "model.mixers.A.window=128", "train.betas=[0.9, 0.99]"])
    assert c.model.pattern == "A" and c.model.pos_emb == "rope" and c.model.d_model == 512
    assert c.train.lr == 6e-4 and c.model.mixers["A"]["window"] == 128 and c.train.betas == (0.9, 0.99)
    assert "F" not in c.model.mixers  # a preset that names mixers replaces its parent's
    assert load_preset("tiny", ["train.tokens=1e8"]).train.tokens == 100_000_000  # YAML reads 1e8 as a string
    with pytest.raises(ConfigError, match="train.tokens must be an integer"):
        load_preset("tiny", ["train.tokens=1.5e0"])


def test_preset_from_a_yaml_path(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("inherit: tiny\nmodel: {n_layer: 6}\n")
    c = load_preset(str(path))
    assert c.name == "mine" and c.model.n_layer == 6 and c.model.d_model == 512


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.n_head=7"], "not divisible by model.n_head"),
        (["model.mixers.A.window=0"], "model.mixers.A.window must be >= 1"),
        (["model.bogus=1"], "unknown key config.model.bogus"),
        (["model.mixers.F.kind=fourier"], "model.mixers.F.kind 'fourier' is not a mixer"),
        (["model.mixers.F.gate=three"], "model.mixers.F.gate must be one of"),
        (["model.d_model=big"], "model.d_model must be an integer"),
        (["train.lr=-1"], "train.lr must be > 0"),
        (["model.pattern=FFX"], "pattern letter 'X'"),
        (["model.pos_emb=alibi"], "model.pos_emb must be one of"),
        (["train.compile_mode=fastest"], "train.compile_mode must be one of default, max-autotune-no-cudagraphs"),
        (["train.ddp_bucket_mb=0"], "train.ddp_bucket_mb must be >= 1"),
        (["train.fsdp_prefetch=-1"], "train.fsdp_prefetch must be >= 0"),
        (["nonsense"], "must look like key.path=value"),
    ],
)
def test_bad_values_are_refused_by_name(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_preset("tiny", overrides)


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ConfigError, match="unknown preset 'huge'.*tiny"):
        load_preset("huge")


def test_inheritance_loop_is_refused(tmp_path):
    (tmp_path / "a.yaml").write_text("inherit: b\n")
    (tmp_path / "b.yaml").write_text("inherit: a\n")
    with pytest.raises(ConfigError, match="loops"):
        load_preset(str(tmp_path / "a.yaml"))
