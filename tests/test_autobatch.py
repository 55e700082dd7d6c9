"""`train.micro_batch: auto`: the search against a fake memory model, the recorded choice and exact resume, the
ranks' agreement over gloo, and a stop request honoured inside validation."""

import json
import os
import signal
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from caracal_cli import autobatch
from caracal_cli import train as train_module
from caracal_cli.checkpoint import latest_checkpoint, load_run_config
from caracal_cli.config import CaracalError, ConfigError, load_preset
from caracal_cli.monitor import read_metrics
from caracal_cli.recipe import learning_rate
from caracal_cli.train import AUTOBATCH_FILE, evaluate_val_loss, train, validation_batch
from test_loader import make_dataset
from test_train import TINY, signal_at_step, weights

pytestmark = pytest.mark.usefixtures("one_thread")
AUTO = [o for o in TINY if not o.startswith("train.micro_batch")] + ["train.micro_batch=auto"]
CPU = torch.device("cpu")
GPU_GIB = 80.0  # the fake device's memory


def fake_memory(base: float, per_sequence: float, calls: list | None = None,
                checkpointed: tuple[float, float] | None = None):
    """A step's peak GiB, a line in the micro-batch (`checkpointed`: the line with blocks checkpointed); None
    (out of memory) past 100 GiB."""
    def step_peak(config, device, micro_batch, checkpointing):
        b, slope = checkpointed if checkpointing == "block" and checkpointed else (base, per_sequence)
        peak = b + micro_batch * slope
        if calls is not None:
            calls.append((micro_batch, checkpointing))
        return None if peak > 100 else peak
    return step_peak


def preset(*overrides):
    return load_preset("small", ["train.global_batch_tokens=24576", *overrides])  # 48 sequences per step


def test_candidates_are_the_divisors_of_a_ranks_sequences_per_step():
    config = preset()
    assert autobatch.candidates(config, 1) == [1, 2, 3, 4, 6, 8, 12, 16, 24, 48]
    assert autobatch.candidates(config, 2) == [1, 2, 3, 4, 6, 8, 12, 24]
    with pytest.raises(CaracalError, match="not a whole number of sequences"):
        autobatch.candidates(config, 5)


@pytest.mark.parametrize("start", [None, 0, 3, 9])
def test_search_finds_the_largest_fitting_size_in_few_probes(start):
    sizes = [1, 2, 3, 4, 6, 8, 12, 16, 24, 48]
    for limit in range(0, 50):
        tried = []
        fits = lambda m: tried.append(m) or m <= limit  # noqa: B023, E731
        want = max((m for m in sizes if m <= limit), default=None)
        assert autobatch.largest_fitting(sizes, fits, start) == want
        assert len(tried) <= 5 and len(set(tried)) == len(tried)  # log2(10) + 1, never the same size twice


def test_resolve_takes_the_largest_divisor_under_the_headroom_and_honours_the_cap():
    calls = []
    choice = autobatch.resolve(preset("train.memory_limit_gb=40"), CPU, step_peak=fake_memory(4, 1.5, calls),
                               total_gib=GPU_GIB)
    # 0.9 × 40 = 36 GiB: 4 + 1.5·m ≤ 36 → m ≤ 21 → 16 (the divisors of 48 are 1 2 3 4 6 8 12 16 24 48)
    assert (choice.micro_batch, choice.method, choice.activation_checkpointing) == (16, "probe", "none")
    assert choice.peak_gib == 28 and choice.limit_gib == 40 and len(choice.tried) == len(calls) <= 5
    capped = autobatch.resolve(preset("train.memory_limit_gb=20"), CPU, step_peak=fake_memory(4, 1.5),
                               total_gib=GPU_GIB)
    assert capped.micro_batch == 8  # 0.9 × 20 = 18: 4 + 12 = 16 fits, 4 + 18 does not
    assert autobatch.resolve(preset("train.micro_batch=6"), CPU).method == "explicit"


def test_checkpointing_only_when_not_even_one_sequence_fits_without_it():
    calls = []
    choice = autobatch.resolve(preset("train.memory_limit_gb=40"), CPU,
                               step_peak=fake_memory(50, 1.5, calls, checkpointed=(10, 1.0)), total_gib=GPU_GIB)
    # without: 50 GiB > 0.9 × 40 at any size; with: 10 + m ≤ 36 → 24
    assert (choice.micro_batch, choice.activation_checkpointing) == (24, "block") and "checkpointed" in choice.note
    modes = [ckpt for _, ckpt in calls]
    assert (1, "none") in calls and modes == sorted(modes, key=["none", "block"].index)  # none tried first
    roomy = autobatch.resolve(preset("train.memory_limit_gb=100"), CPU,
                              step_peak=fake_memory(50, 1.5, checkpointed=(10, 1.0)), total_gib=GPU_GIB)
    assert (roomy.micro_batch, roomy.activation_checkpointing) == (12, "none")  # 0.9 × 80: 50 + 1.5·12 = 68
    with pytest.raises(CaracalError, match="not even one sequence"):
        autobatch.resolve(preset("train.memory_limit_gb=10"), CPU, step_peak=fake_memory(50, 1.5), total_gib=GPU_GIB)


def test_bad_values_are_refused_naming_the_key():
    for override, message in [("train.micro_batch=0", "positive integer or auto"),
                              ("train.micro_batch=many", "positive integer or auto"),
                              ("train.memory_limit_gb=-1", "memory_limit_gb must be > 0"),
                              ("train.activation_checkpointing=layer", "none, block")]:
        with pytest.raises(ConfigError, match=message):
            load_preset("small", [override])


def test_block_checkpointing_gives_the_same_loss_and_gradients():
    from caracal_cli.model import build_model, set_activation_checkpointing
    from conftest import small_model_config

    model = build_model(small_model_config(vocab_size=300)).double()
    ids = torch.randint(0, 300, (2, 17))
    want = torch.autograd.grad(model(ids[:, :-1], targets=ids[:, 1:]), list(model.parameters()))
    set_activation_checkpointing(model, "block")
    got = torch.autograd.grad(model(ids[:, :-1], targets=ids[:, 1:]), list(model.parameters()))
    assert all(torch.allclose(g, w, rtol=1e-12, atol=1e-15) for g, w in zip(got, want, strict=True))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data"), train_tokens=40_000, val_tokens=4_096)


def test_auto_is_recorded_and_a_resumed_run_reuses_it_bit_identically(data, tmp_path, monkeypatch):
    straight = train(load_preset("demo", AUTO), data, tmp_path / "straight", max_steps=4, device="cpu", quiet=True)
    record = json.loads((tmp_path / "straight" / AUTOBATCH_FILE).read_text())
    assert record["micro_batch"] == 8 and record["method"] == "estimate"  # 512 tokens per step = 8 sequences
    assert load_run_config(tmp_path / "straight").train.micro_batch == 8  # the saved config holds the value
    signal_at_step(monkeypatch, 1, signal.SIGINT)
    run = tmp_path / "interrupted"
    assert train(load_preset("demo", AUTO), data, run, max_steps=4, device="cpu", quiet=True)["step"] == 2
    monkeypatch.setattr(train_module, "learning_rate", learning_rate)
    resumed = train(None, None, run, max_steps=4, resume=True, device="cpu", quiet=True)
    a, b = weights(straight["run_dir"]), weights(run)
    assert resumed["step"] == 4 and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["val_loss"] == straight["val_loss"]


def test_a_sigterm_during_the_final_validation_stops_it_within_one_batch(data, tmp_path, monkeypatch):
    """A slow validation (many batches) must not hold a stop request: the step is saved, nothing more runs."""
    batches = []
    original = train_module.ValidationWindows.batch

    def slow_batch(self, first, count):
        if not batches:  # the final validation (the only one): ask to stop as it starts
            os.kill(os.getpid(), signal.SIGTERM)
        batches.append(first)
        return original(self, first, count)

    config = load_preset("demo", TINY + ["train.eval_tokens=4096", "train.eval_every=100"])  # 64 windows
    monkeypatch.setattr(train_module.ValidationWindows, "batch", slow_batch)
    result = train(config, data, tmp_path / "run", max_steps=2, device="cpu", quiet=True)
    assert result["stopped_by"] == "SIGTERM" and result["step"] == 2
    assert latest_checkpoint(tmp_path / "run").name == "step_00000002"
    assert len(batches) == 1  # the request was seen before the second batch (of 64 windows, in batches of 16)
    assert not [r for r in read_metrics(tmp_path / "run") if "val_loss" in r]


def test_a_validation_stopped_mid_run_is_redone_by_the_resume(data, tmp_path, monkeypatch):
    """A SIGTERM during the validation of step 2 (of 4, every 2) saves step 2 without it; the resume validated
    only at step 4, so metrics.jsonl lacked a row an uninterrupted run has. It is redone before step 3 now."""
    config = load_preset("demo", TINY + ["train.eval_every=2", "train.eval_tokens=4096"])  # 4 batches
    straight = train(config, data, tmp_path / "straight", max_steps=4, device="cpu", quiet=True)
    calls = []
    original = train_module.ValidationWindows.batch

    def stop_the_first(self, first, count):
        if not calls:
            os.kill(os.getpid(), signal.SIGTERM)
        calls.append(first)
        return original(self, first, count)

    monkeypatch.setattr(train_module.ValidationWindows, "batch", stop_the_first)
    run = tmp_path / "run"
    assert train(config, data, run, max_steps=4, device="cpu", quiet=True)["stopped_by"] == "SIGTERM"
    assert latest_checkpoint(run).name == "step_00000002" and not [r for r in read_metrics(run) if "val_loss" in r]
    resumed = train(None, None, run, max_steps=4, resume=True, device="cpu", quiet=True)
    validations = lambda r: [(m["step"], m["val_loss"]) for m in read_metrics(r) if "val_loss" in m]  # noqa: E731
    assert resumed["step"] == 4 and validations(run) == validations(straight["run_dir"])
    assert [s for s, _ in validations(run)] == [2, 4]

def test_validation_batches_use_every_window_in_larger_batches(data):
    config = load_preset("demo", TINY)
    assert [validation_batch(config, n) for n in (64, 7, 66)] == [16, 7, 11]  # at most 4 × micro-batch 4
    stops = iter([False, True])
    model = __import__("caracal_cli.model", fromlist=["build_model"]).build_model(config.model)
    assert evaluate_val_loss(model, data, config, "cpu", tokens=4096, should_stop=lambda: next(stops)) is None


def _agree(rank: int, port: int, choices: list, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        out.put((rank, autobatch.agree_across_ranks(*choices[rank], 2)))
    finally:
        dist.destroy_process_group()


def test_ranks_agree_on_the_tightest_ranks_choice_over_gloo():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("fork")  # the children need nothing that fork breaks: gloo, CPU tensors
    out = ctx.Queue()
    choices = [(16, "none"), (4, "block")]  # rank 1's memory is tighter (a forced limit)
    procs = [ctx.Process(target=_agree, args=(rank, port, choices, out)) for rank in range(2)]
    for p in procs:
        p.start()
    results = dict(out.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    assert results == {0: (4, "block"), 1: (4, "block")}
