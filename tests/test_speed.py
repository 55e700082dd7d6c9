"""`caracal speed`: the sweep's JSON and plot on CPU, the mixer micro-benchmark, OOM and error points, bad input."""

import json
import os
import signal

import pytest
import torch
from typer.testing import CliRunner

from caracal_cli import speed
from caracal_cli.cli import app
from caracal_cli.mixers.mhf import MHF
from caracal_cli.config import load_preset
from caracal_cli.model import build_model, count_parameters
from tests.conftest import small_model_config

runner = CliRunner()
ENVIRONMENT_KEYS = {"device", "device_name", "torch", "cuda", "cudnn", "python", "mamba_ssm", "timer", "memory",
                    "argv"}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


pytestmark = pytest.mark.usefixtures("one_thread")


def _check_entry(entry: dict, repeats: int) -> None:
    """Measured with positive numbers, or marked OOM / error / unsupported with a reason."""
    if entry["status"] == "ok":
        assert len(entry["times_ms"]) == repeats and all(t > 0 for t in entry["times_ms"])
        assert entry["min_ms"] <= entry["median_ms"] <= entry["max_ms"]
        assert entry["tokens_per_s"] > 0 and entry["batch"] >= 1
    else:
        assert entry["status"] in ("oom", "error", "unsupported") and entry["reason"]


def test_speed_all_modes_writes_json_and_png(tmp_path):
    args = ["speed", "--size", "demo", "--lengths", "64,128", "--tokens-per-step", "256", "--repeats", "2",
            "--warmup", "1", "--models", "caracal,llama", "--mode", "all", "--decode-batch", "1,3",
            "--decode-tokens", "4", "--out", str(tmp_path)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert all(f"{mode} —" in result.output for mode in speed.MODES)  # a table per mode
    report = json.loads((tmp_path / "speed.json").read_text())
    assert report["schema"] == speed.SCHEMA and report["kind"] == "models"
    assert "partial" not in report  # the finished report replaced the one saved after the first model
    assert set(report["environment"]) >= ENVIRONMENT_KEYS
    assert report["environment"]["device"] == "cpu" and report["settings"]["dtype"] == "fp32"
    assert report["command"].startswith("caracal speed --models caracal,llama --size demo")
    points = {speed.point_key(e) for e in report["results"]}
    variants = {"train": [None], "prefill": [None], "decode": ["eager ×1", "eager ×3"]}  # no graphs on a CPU
    assert points == {(m, mode, v, n) for m in ("caracal", "llama") for mode in speed.MODES for v in variants[mode]
                      for n in (64, 128)}
    assert len(report["results"]) == len(points)
    for entry in report["results"]:
        _check_entry(entry, repeats=2)
        assert entry["status"] == "ok", entry  # both models run every mode on CPU
    decode = [e for e in report["results"] if e["mode"] == "decode"]
    assert all(e["unit"] == "ms/step" and e["tokens"] == e["batch"] and e["context"] == e["length"] for e in decode)
    assert sorted({speed._label(e) for e in decode}) == ["caracal eager ×1", "caracal eager ×3", "llama eager ×1",
                                                         "llama eager ×3"]
    # whole decoding periods: the demo's MHF folds once per 32 tokens, so its 4 steps become 32; Llama's stay 4
    assert {(e["model"], e["decode_tokens"]) for e in decode} == {("caracal", 32), ("llama", 4)}
    assert {e["note"] for e in decode if e["model"] == "caracal"} == {"32 steps: whole 32-token decoding periods"}
    assert report["models"]["caracal"]["paths"]["MHF"].startswith("torch.fft")
    assert report["models"]["llama"]["paths"] == {"Attention": "sdpa", "loss": "pytorch"}
    assert {(r["mode"], r["variant"], r["length"]) for r in report["ratios"]} == \
        {(m, v, n) for m in speed.MODES for v in variants[m] for n in (64, 128)}
    assert (tmp_path / "speed.png").read_bytes()[:8] == PNG_MAGIC
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temporary files


def test_set_overrides_every_preset_and_a_preset_that_rejects_it_is_an_error_row(tmp_path):
    args = ["speed", "--size", "demo", "--lengths", "64", "--tokens-per-step", "128", "--repeats", "1",
            "--warmup", "0", "--models", "caracal,llama", "--mode", "prefill", "--out", str(tmp_path),
            "--set", "model.mixers.F.gate_kernel=1"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "speed.json").read_text())
    assert report["command"].endswith("--set model.mixers.F.gate_kernel=1 --no-isolate")
    assert report["settings"]["overrides"] == ["model.mixers.F.gate_kernel=1"]
    with torch.device("meta"):
        default = count_parameters(build_model(load_preset("demo").model))["total"]
    assert report["models"]["caracal"]["params"] < default  # Conv1d_G2 of one tap instead of three
    llama = next(e for e in report["results"] if e["model"] == "llama")
    assert llama["status"] == "error" and "model.mixers.F" in llama["reason"]  # llama-demo has no MHF mixer


def test_isolated_models_give_the_same_report_and_a_dead_process_is_error_rows(tmp_path, monkeypatch):
    settings = speed.parse_settings("caracal,llama", "demo", "64", 128, "prefill", repeats=1, warmup=0,
                                    device="cpu", isolate=True)
    assert settings.command().endswith("--isolate")
    seen = []  # the report so far after each point and model (the CLI saves it: a stopped sweep keeps its points)
    report = speed.run_speed(settings, model_done=lambda r: seen.append([e["model"] for e in r["results"]]))
    assert seen == [["caracal"], ["caracal"], ["caracal", "llama"], ["caracal", "llama"]]
    assert [(e["model"], e["status"]) for e in report["results"]] == [("caracal", "ok"), ("llama", "ok")]
    assert report["models"]["caracal"]["paths"]["MHF"].startswith("torch.fft") and report["device_lost"] is None
    assert report["command"] == settings.command()  # the parent's command, not a child's

    monkeypatch.setattr(speed.sys, "executable", "/bin/false")  # every child "crashes" at once
    report = speed.run_speed(settings)
    assert [e["status"] for e in report["results"]] == ["error", "error"]
    assert all("process ended with exit code 1" in e["reason"] for e in report["results"])


def test_speed_mixers_micro_benchmark(tmp_path):
    args = ["speed", "--mixers", "--size", "demo", "--lengths", "32,64", "--tokens-per-step", "128",
            "--repeats", "1", "--warmup", "0", "--out", str(tmp_path)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "speed.json").read_text())
    assert report["kind"] == "mixers" and report["d_model"] == 128
    assert report["bandwidth"]["gb_per_s"] > 0
    names = {e["name"] for e in report["results"]}
    assert {"mhf", "mhf-composition", "mhf-linears", "attention", "swa-256", *speed.FFT_VARIANTS} <= names
    assert report["paths"]["mhf-linears"] == "3 × nn.Linear (d × d)"
    for kind in ("mamba", "mamba2"):  # timed when registered, else a note says it was skipped
        assert kind in names or any(note.startswith(kind + ":") for note in report["notes"])
    for entry in report["results"]:
        _check_entry(entry, repeats=1)
    fft = [e for e in report["results"] if e["name"] == "causal_fft_conv"]
    assert {(e["pass"], e["length"]) for e in fft} == {(p, n) for p in ("fwd", "fwd+bwd") for n in (32, 64)}
    for entry in fft:
        elements = entry["batch"] * entry["length"] * report["d_model"]
        assert entry["floor_bytes"] == 3 * elements * 4 * (3 if entry["pass"] == "fwd+bwd" else 1)
        assert entry["floor_ms"] > 0 and entry["over_floor"] > 0
    assert report["paths"]["swa-256"] == "sdpa+band-mask"
    assert (tmp_path / "speed.png").read_bytes()[:8] == PNG_MAGIC


@pytest.mark.parametrize("error", [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8 GiB"),
                                   MemoryError()])
def test_out_of_memory_point_is_recorded_and_the_sweep_goes_on(monkeypatch, error):
    real_train = speed.POINTS["train"]

    def train_or_oom(model, runner, length, settings, device):
        if length == 64:
            raise error
        return real_train(model, runner, length, settings, device)

    monkeypatch.setitem(speed.POINTS, "train", train_or_oom)
    settings = speed.parse_settings("caracal,llama", "demo", "32,64,128", tokens_per_step=128, mode="train",
                                    repeats=1, warmup=0, device="cpu")
    report = speed.run_models(settings)
    status = {(e["model"], e["length"]): e["status"] for e in report["results"]}
    assert status == {(m, n): "oom" if n == 64 else "ok" for m in ("caracal", "llama") for n in (32, 64, 128)}
    assert "OOM" in {speed._status_text(e) for e in report["results"]}


def test_a_device_that_fails_for_good_stops_the_sweep_with_reasons(monkeypatch):
    failed = {}
    real_free = speed._free

    def poisoned_train(model, runner, length, settings, device):
        failed["yes"] = True
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    def free(device):
        if failed:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        real_free(device)

    monkeypatch.setitem(speed.POINTS, "train", poisoned_train)
    monkeypatch.setattr(speed, "_free", free)
    settings = speed.parse_settings("caracal,llama", "demo", "32,64", tokens_per_step=64, mode="train",
                                    repeats=1, warmup=0, device="cpu")
    report = speed.run_models(settings)
    first, *rest = report["results"]
    assert first["status"] == "error" and "illegal memory access" in first["reason"]
    assert len(rest) == 3 and all(e["status"] == "error" and e["reason"].startswith("not run") for e in rest)
    assert "caracal train L=32" in report["device_lost"]
    speed.speed_tables(report)


def test_model_without_preset_is_an_error_row_not_a_crash():
    settings = speed.parse_settings("caracal", "demo", "32", tokens_per_step=64, mode="train,prefill", repeats=1,
                                    warmup=0, device="cpu")
    settings.models.append("nosuchfamily")  # as if its presets had not been written yet
    report = speed.run_models(settings)
    rows = [e for e in report["results"] if e["model"] == "nosuchfamily"]
    assert len(rows) == 2 and all(e["status"] == "error" and "unknown preset" in e["reason"] for e in rows)
    assert report["models"]["nosuchfamily"]["status"] == "error"
    assert all(e["status"] == "ok" for e in report["results"] if e["model"] == "caracal")
    speed.speed_tables(report)  # renders


def test_decode_without_init_cache_is_unsupported(monkeypatch):
    monkeypatch.delattr(MHF, "init_cache")
    model = build_model(small_model_config())
    settings = speed.SpeedSettings(repeats=1, warmup=0, decode_tokens=2)
    result = speed.measure_point("decode", model, model, 16, settings, torch.device("cpu"))
    assert result["status"] == "unsupported" and "MHF" in result["reason"]


def test_decode_paths_on_a_cpu():
    """The compiled step runs on a CPU (without a graph there)."""
    assert speed.parse_settings(device="cpu", mode="decode", decode_impl="eager,compiled").decode_impls == \
        ["eager", "compiled"]


def test_token_budget_and_summary():
    assert speed.budget_batch(512, 65536) == (128, None)
    assert speed.budget_batch(16384, 4096)[0] == 1 and "exceeds" in speed.budget_batch(16384, 4096)[1]
    assert speed.budget_batch(3000, 65536)[0] == 21
    summary = speed.summarize([3.0, 1.0, 2.0, 10.0])
    assert summary["median_ms"] == 2.5 and summary["min_ms"] == 1.0 and summary["max_ms"] == 10.0
    assert summary["times_ms"] == [3.0, 1.0, 2.0, 10.0]
    assert speed.preset_name("caracal", "small") == "small" and speed.preset_name("mamba2", "tiny") == "mamba2-tiny"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--models", "caracal,gpt5"], "unknown model 'gpt5'"),
        (["--size", "huge"], "unknown size 'huge'"),
        (["--mode", "serve"], "unknown mode 'serve'"),
        (["--lengths", "512,0"], "--lengths must be positive"),
        (["--lengths", "512,abc"], "comma-separated integers"),
        (["--dtype", "fp8"], "unknown dtype 'fp8'"),
        (["--repeats", "0"], "--repeats must be >= 1"),
        (["--set", "fft_impl"], "override 'fft_impl' must look like key.path=value"),
        (["--decode-impl", "jit"], "unknown --decode-impl 'jit'"),
        (["--decode-batch", "1,x"], "--decode-batch must be comma-separated integers"),
        (["--device", "cpu", "--decode-impl", "graph"], "--decode-impl graph replays CUDA graphs"),
    ],
)
def test_bad_input_is_one_line(args, message):
    result = runner.invoke(app, ["speed", *args])
    assert result.exit_code == 1
    assert message in result.output and len(result.output.strip().splitlines()) == 1
    assert "Traceback" not in result.output


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_cuda_is_one_line():
    result = runner.invoke(app, ["speed", "--device", "cuda"])
    assert result.exit_code == 1 and "no CUDA device" in result.output


def test_a_sweep_stopped_midway_keeps_the_models_it_finished(tmp_path, monkeypatch):
    def stop(*_):
        raise KeyboardInterrupt  # as if the sweep were stopped before the final report
    monkeypatch.setattr(speed, "write_report", stop)
    args = ["speed", "--size", "demo", "--lengths", "64", "--tokens-per-step", "128", "--repeats", "1",
            "--warmup", "0", "--models", "caracal,llama", "--mode", "prefill", "--out", str(tmp_path)]
    runner.invoke(app, args)
    report = json.loads((tmp_path / "speed.json").read_text())
    assert report["partial"] is True
    assert [(e["model"], e["status"]) for e in report["results"]] == [("caracal", "ok"), ("llama", "ok")]
    assert [r["length"] for r in report["ratios"]] == [64]


def _sweep(out, models: str, lengths: str = "64", mode: str = "prefill") -> dict:
    args = ["speed", "--size", "demo", "--lengths", lengths, "--tokens-per-step", "128", "--repeats", "1",
            "--warmup", "0", "--models", models, "--mode", mode, "--out", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return json.loads((out / "speed.json").read_text())


def test_merge_combines_separate_runs_into_one_report(tmp_path):
    """Models measured in separate jobs (or a sweep finished in parts) make one report, table and plot; a later
    file's point replaces an earlier one, and the ratios are those of the merged points."""
    llama = _sweep(tmp_path / "a", "llama", "64,128")
    _sweep(tmp_path / "b", "caracal", "64")
    _sweep(tmp_path / "c", "caracal", "128")
    out = tmp_path / "merged"
    result = runner.invoke(app, ["speed", "--merge", str(tmp_path / "a" / "speed.json"),
                                 "--merge", str(tmp_path / "b" / "speed.json"),
                                 "--merge", str(tmp_path / "c" / "speed.json"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "merged 3 runs" in result.output and "prefill —" in result.output
    report = json.loads((out / "speed.json").read_text())
    assert [(e["model"], e["length"]) for e in report["results"]] == [("llama", 64), ("llama", 128),
                                                                       ("caracal", 64), ("caracal", 128)]
    assert report["results"][:2] == llama["results"]  # points are copied, not re-measured
    assert report["settings"]["models"] == ["llama", "caracal"] and report["settings"]["lengths"] == [64, 128]
    assert {r["length"] for r in report["ratios"]} == {64, 128}
    assert [m["path"] for m in report["merged_from"]] == [str(tmp_path / d / "speed.json") for d in "abc"]
    assert (out / "speed.png").read_bytes()[:8] == PNG_MAGIC


def test_merge_refuses_runs_that_measured_different_things(tmp_path):
    first = _sweep(tmp_path / "a", "llama")
    other = json.loads(json.dumps(first))
    other["settings"]["tokens_per_step"] = 4096
    (tmp_path / "other.json").write_text(json.dumps(other))
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "damaged.json").write_text(json.dumps({**first, "results": [{"model": "llama"}]}))
    for files, message in ((["other.json"], "settings.tokens_per_step is 4096 there and 128 here"),
                           (["damaged.json"], "damaged speed report (results malformed)"),
                           (["bad.json"], "cannot read"), (["missing.json"], "no such file")):
        args = ["speed", "--merge", str(tmp_path / "a" / "speed.json")]
        for name in files:
            args += ["--merge", str(tmp_path / name)]
        result = runner.invoke(app, [*args, "--out", str(tmp_path / "merged")])
        assert result.exit_code == 1 and message in result.output, result.output
        assert "Traceback" not in result.output and not (tmp_path / "merged").exists()
    result = runner.invoke(app, ["speed", "--merge", str(tmp_path / "a" / "speed.json"), "--models", "caracal"])
    assert result.exit_code == 1 and "--merge measures nothing; drop --models" in result.output


def test_a_cpu_sweep_without_options_is_bounded_and_a_step_that_cannot_fit_is_refused():
    settings = speed.parse_settings(device="cpu")
    assert (settings.size, settings.lengths, settings.tokens_per_step, settings.repeats) == (
        "demo", [256, 512, 1024, 2048], 8192, 3)
    assert speed.parse_settings(device="cpu", size="tiny", lengths="512", tokens_per_step=4096).size == "tiny"
    with pytest.raises(speed.SpeedError, match=r"would need about [\d.]+ GiB \(estimate for Caracal\)"):
        speed.parse_settings(device="cpu", size="large", lengths="16384", tokens_per_step=1 << 22)


def ctrl_c_at_the_second_point(monkeypatch, measure_name: str) -> None:
    """Raise KeyboardInterrupt, as Ctrl-C would, when speed's `measure_name` is called the second time."""
    measured, measure = [], getattr(speed, measure_name)

    def stop_at_the_second_point(*args):
        if measured:
            raise KeyboardInterrupt
        measured.append(args)
        return measure(*args)

    monkeypatch.setattr(speed, measure_name, stop_at_the_second_point)


def test_speed_json_is_rewritten_after_every_point(tmp_path, monkeypatch):
    ctrl_c_at_the_second_point(monkeypatch, "measure_point")  # in the middle of the first model
    runner.invoke(app, ["speed", "--size", "demo", "--lengths", "64,128", "--tokens-per-step", "128", "--repeats",
                        "1", "--warmup", "0", "--models", "caracal", "--mode", "prefill", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "speed.json").read_text())
    assert report["partial"] is True and [(e["length"], e["status"]) for e in report["results"]] == [(64, "ok")]


def test_a_mixers_sweep_stopped_midway_keeps_what_it_measured(tmp_path, monkeypatch):
    ctrl_c_at_the_second_point(monkeypatch, "_mixer_point")  # in the middle of the first mixer
    result = runner.invoke(app, ["speed", "--mixers", "--size", "demo", "--lengths", "32,64", "--tokens-per-step",
                                 "128", "--repeats", "1", "--warmup", "0", "--out", str(tmp_path)])
    assert result.exit_code == 130 and "Traceback" not in result.output
    assert f"stopped by SIGINT: 1 measured point saved in {tmp_path / 'speed.json'}, marked partial" in \
        result.output.replace("\n", "")
    report = json.loads((tmp_path / "speed.json").read_text())
    assert report["partial"] is True and report["kind"] == "mixers"
    assert [(e["name"], e["length"], e["status"]) for e in report["results"]] == [("mhf", 32, "ok")]


def test_an_isolated_sweep_stopped_by_sigterm_ends_its_child_and_keeps_its_points(tmp_path, monkeypatch):
    """SIGTERM to the parent alone (as `timeout` or a scheduler sends it): the child is ended and reaped, its
    temporary directory removed, the points it measured saved, and the command exits 143."""
    monkeypatch.setattr(speed.tempfile, "tempdir", str(tmp_path))  # the children's temporary directories
    children, popen = [], speed.subprocess.Popen

    def remember(*args, **kwargs):
        children.append(popen(*args, **kwargs))
        return children[-1]

    sent, read = [], speed._child_report

    def sigterm_after_the_first_point(tmp):
        sub = read(tmp)
        if sub and sub["results"] and not sent:
            sent.append(True)
            os.kill(os.getpid(), signal.SIGTERM)
        return sub

    monkeypatch.setattr(speed.subprocess, "Popen", remember)
    monkeypatch.setattr(speed, "_child_report", sigterm_after_the_first_point)
    handler = signal.getsignal(signal.SIGTERM)
    out = tmp_path / "out"
    result = runner.invoke(app, ["speed", "--size", "demo", "--lengths", "64,128", "--tokens-per-step", "128",
                                 "--repeats", "1", "--warmup", "0", "--models", "caracal,llama", "--mode",
                                 "prefill,train", "--isolate", "--out", str(out)])
    assert result.exit_code == 143 and "Traceback" not in result.output
    assert "stopped by SIGTERM: " in result.output
    assert f"saved in {out / 'speed.json'}, marked partial" in result.output.replace("\n", "")
    assert signal.getsignal(signal.SIGTERM) is handler  # restored once the sweep ended
    assert len(children) == 1 and children[0].returncode == 143  # the child, too, stopped as on Ctrl-C
    with pytest.raises(ProcessLookupError):
        os.kill(children[0].pid, 0)
    assert not list(tmp_path.glob("caracal-speed-*"))
    report = json.loads((out / "speed.json").read_text())
    assert report["partial"] is True and report["results"][0]["model"] == "caracal"
    assert {e["model"] for e in report["results"]} == {"caracal"} and "caracal" in report["models"]
