"""`caracal eval` through lm-evaluation-harness: the model class against direct computations from the model's
logits, local tasks end to end (simple_evaluate, the CLI, lm-eval's own CLI), task names, missing datasets."""

import json
import math
import os
import random
import shutil
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window  # noqa: E402

from caracal_cli import evaluate as ev  # noqa: E402
from caracal_cli.checkpoint import model_state, save_checkpoint, save_run_config  # noqa: E402
from caracal_cli.cli import app  # noqa: E402
from caracal_cli.config import load_preset  # noqa: E402
from caracal_cli.model import build_model  # noqa: E402
from caracal_cli.tokenizer import train_bpe  # noqa: E402

runner = CliRunner()
CONTEXT = 32
NAMES = ["alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi"]
FRUITS = ["apples", "bananas", "cherries", "dates", "figs", "grapes", "lemons", "mangos"]
LIKES = dict(zip(NAMES, FRUITS, strict=True))


def corpus(n_docs: int, seed: int = 0) -> list[str]:
    """Documents of facts "alice likes apples." in random order: a tiny model learns them in seconds."""
    rng = random.Random(seed)
    return [" ".join(f"{name} likes {LIKES[name]}." for name in rng.sample(NAMES, len(NAMES)))
            for _ in range(n_docs)]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run directory holding a tiny Caracal (context 32) trained 150 steps on the facts, and its BPE."""
    torch.manual_seed(0)
    run = tmp_path_factory.mktemp("runs") / "tiny"
    run.mkdir()
    docs = corpus(200)
    tokenizer = train_bpe(docs, 300)
    config = load_preset("demo", [f"model.vocab_size={tokenizer.vocab_size}", "model.d_model=64", "model.n_layer=3",
                                  "model.n_head=4", f"model.context={CONTEXT}", "model.mixers.A.window=16"])
    model = build_model(config.model)
    stream = torch.tensor([t for doc in docs for t in [tokenizer.eot_id] + tokenizer.encode(doc)])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        starts = torch.randint(0, len(stream) - CONTEXT - 1, (16,))
        batch = torch.stack([stream[s:s + CONTEXT + 1] for s in starts.tolist()])
        loss = model(batch[:, :-1], targets=batch[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    save_run_config(run, config)
    tokenizer.save(run)
    save_checkpoint(run, 150, model_state(model), None, {"loss": loss.item()})
    return run


@pytest.fixture(scope="module")
def lm(run_dir):
    return ev.CaracalLM(checkpoint=str(run_dir), device="cpu", batch_size=3)


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    """A multiple-choice task and a LAMBADA-style task over local JSONL, as YAML + JSONL."""
    directory = tmp_path_factory.mktemp("tasks")
    rng = random.Random(1)
    examples = []
    for name in NAMES:
        wrong = rng.sample([f for f in FRUITS if f != LIKES[name]], 2)
        choices = wrong + [LIKES[name]]
        rng.shuffle(choices)
        examples.append({"question": f"{name} likes", "choices": choices, "answer": choices.index(LIKES[name])})
    ev.write_local_task(directory, "tiny_mc", examples)
    ev.write_local_lambada(directory, [f"{name} likes {fruit}" for name, fruit in LIKES.items()])
    return directory


def requests(kind: str, args: list[tuple]) -> list[Instance]:
    return [Instance(request_type=kind, doc={}, arguments=a, idx=0) for a in args]


def direct_loglikelihood(model, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    """The reference: one unbatched forward over the last `context` tokens of context + continuation."""
    whole = (context + continuation)[-(CONTEXT + 1):]
    with torch.no_grad():
        logprobs = F.log_softmax(model(torch.tensor([whole[:-1]]))[0].double(), -1)[-len(continuation):]
    target = torch.tensor(continuation)
    return float(logprobs.gather(1, target[:, None]).sum()), bool((logprobs.argmax(-1) == target).all())


def greedy_by_full_forwards(model, context: list[int], steps: int) -> list[int]:
    ids = list(context)
    with torch.no_grad():
        for _ in range(steps):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(context):]


# --- task names -------------------------------------------------------------------------------------------
def test_paper_short_names_map_to_lm_eval_tasks():
    assert ev.resolve_task_names("lambada,arc_e,arc_c,wino,siqa,swde") == [
        "lambada_openai", "arc_easy", "arc_challenge", "winogrande", "social_iqa", "swde"]
    assert ev.resolve_task_names(["winogrande", "wino", "mmlu"]) == ["winogrande", "mmlu"]  # unknown: pass through
    paper = ev.resolve_task_names("paper")
    assert paper == ["lambada_openai", "hellaswag", "arc_easy", "arc_challenge", "winogrande", "boolq", "piqa",
                     "social_iqa"]
    assert paper == [task for _, task, _ in ev.PAPER_COLUMNS[1:]]  # the table's column order
    with pytest.raises(ev.EvalError):
        ev.resolve_task_names(" , ")


# --- the model class --------------------------------------------------------------------------------------
def test_loglikelihood_equals_direct_computation_in_order(lm):
    tok = lm.tok
    greedy = greedy_by_full_forwards(lm.model, tok.encode("carol likes"), 3)
    pairs = [("alice likes", " apples"), ("bob likes", " figs."), ("", "dave likes dates"),
             ("carol likes", tok.decode(greedy)), ("erin", " likes"), ("grace likes", " grapes"),
             ("heidi likes", " lemons"), ("heidi likes", " mangos")]
    answers = lm.loglikelihood(requests("loglikelihood", pairs), disable_tqdm=True)
    assert len(answers) == len(pairs)
    for (context, continuation), (logprob, is_greedy) in zip(pairs, answers, strict=True):
        assert type(logprob) is float and type(is_greedy) is bool
        ctx = tok.encode(context) if context else [tok.eot_id]
        whole = tok.encode(context + continuation)
        cont = whole[len(ctx):] if context else tok.encode(continuation)
        expected, expected_greedy = direct_loglikelihood(lm.model, ctx, cont)
        assert logprob == pytest.approx(expected, abs=1e-4)
        assert is_greedy == expected_greedy
    assert answers[3][1] is True  # the model's own greedy continuation


def test_contexts_longer_than_the_model_are_cut_from_the_left(lm):
    tok = lm.tok
    context = " ".join(corpus(2, seed=5)) + " frank likes"
    assert len(tok.encode(context)) > 2 * CONTEXT
    [(logprob, _)] = lm.loglikelihood(requests("loglikelihood", [(context, " grapes")]), disable_tqdm=True)
    ctx = tok.encode(context)
    cont = tok.encode(context + " grapes")[len(ctx):]
    assert logprob == pytest.approx(direct_loglikelihood(lm.model, ctx, cont)[0], abs=1e-4)
    # Generation keeps the last (context - max_gen_toks) tokens and never runs past the model's context.
    [text] = lm.generate_until(requests("generate_until", [(context, {"until": [], "max_gen_toks": 8})]),
                               disable_tqdm=True)
    expected = greedy_by_full_forwards(lm.model, ctx[-(CONTEXT - 8):], 8)
    assert text == tok.decode(expected[:expected.index(tok.eot_id)] if tok.eot_id in expected else expected)


def test_rolling_loglikelihood_equals_the_model_loss_in_disjoint_windows(lm):
    tok = lm.tok
    short, long = "alice likes apples.", " ".join(corpus(3, seed=7))
    tokens = tok.encode(long)
    assert len(tokens) > 3 * CONTEXT
    answers = lm.loglikelihood_rolling(requests("loglikelihood_rolling", [(short,), (long,)]), disable_tqdm=True)
    sequence = torch.tensor([tok.eot_id] + tok.encode(short))  # one window: EOT, then the text
    with torch.no_grad():
        expected = -float(lm.model(sequence[None, :-1], targets=sequence[None, 1:])) * (len(sequence) - 1)
    assert type(answers[0]) is float and answers[0] == pytest.approx(expected, rel=1e-5)
    # Longer than the context: disjoint chunks of CONTEXT predicted tokens, each seeing the token before it;
    # the last, shorter chunk sees a full context of earlier tokens (lm-eval's windows, as HFLM scores them).
    sequence = torch.tensor([tok.eot_id] + tokens)
    expected = 0.0
    with torch.no_grad():
        for start in range(0, len(sequence) - 1, CONTEXT):
            end = min(start + CONTEXT, len(sequence) - 1)  # predicts sequence[start + 1 : end + 1]
            if end - start == CONTEXT:
                window = sequence[None, start:end + 1]
                expected -= float(lm.model(window[:, :-1], targets=window[:, 1:])) * CONTEXT
            else:
                first = max(0, end - CONTEXT)
                logits = lm.model(sequence[None, first:end])[0]
                losses = F.cross_entropy(logits, sequence[first + 1:end + 1], reduction="none")
                expected -= float(losses[-(end - start):].sum())
    assert answers[1] == pytest.approx(expected, rel=1e-5)
    # The same windows as lm-eval's own helpers give.
    windows = list(map(make_disjoint_window, get_rolling_token_windows(tokens, tok.eot_id, CONTEXT, 1)))
    assert sum(len(target) for _, target in windows) == len(tokens)
    assert all(len(context) + len(target) <= CONTEXT + 1 for context, target in windows)


def test_generate_until_stops_at_a_stop_sequence_and_equals_full_forward_greedy(lm):
    tok = lm.tok
    prompts = ["alice likes", "bob likes apples. carol", "dave likes dates. erin likes"]
    free = [tok.decode(greedy_by_full_forwards(lm.model, tok.encode(p), 12)) for p in prompts]
    stop = free[0][len(free[0]) // 2:len(free[0]) // 2 + 2]  # a piece of the middle of the first text
    assert stop and free[0].find(stop) > 0
    calls = []
    step = lm.model.decode_step
    lm.model.decode_step = lambda *args: calls.append(1) or step(*args)
    try:
        texts = lm.generate_until(requests("generate_until", [
            (prompts[0], {"until": [stop], "max_gen_toks": 12}),
            (prompts[1], {"until": ["<never>"], "max_gen_toks": 12}),
            (prompts[2], {"until": "\n\n", "max_gen_toks": 5}),
        ]), disable_tqdm=True)
    finally:
        del lm.model.decode_step
    cut = lambda text: text.split(tok.decode([tok.eot_id]))[0]  # noqa: E731 (greedy decoding stops at EOT)
    assert texts[0] == cut(free[0]).split(stop)[0]
    assert texts[1] == cut(free[1])
    assert texts[2] == cut(tok.decode(greedy_by_full_forwards(lm.model, tok.encode(prompts[2]), 5))).split("\n\n")[0]
    assert all(type(t) is str for t in texts)
    assert 0 < len(calls) < 11 + 11 + 4  # the first request stopped early (cached steps, one per token after the first)


def test_batching_and_sorting_keep_request_order(run_dir, lm):
    pairs = [(f"{name} likes", f" {fruit}") for name in NAMES for fruit in FRUITS[:3]]
    batched = lm.loglikelihood(requests("loglikelihood", pairs), disable_tqdm=True)
    single = ev.CaracalLM(checkpoint=str(run_dir), device="cpu", batch_size=1)
    one_by_one = single.loglikelihood(requests("loglikelihood", pairs), disable_tqdm=True)
    for (a, ga), (b, gb) in zip(batched, one_by_one, strict=True):
        assert a == pytest.approx(b, abs=1e-4) and ga == gb


# --- end to end -------------------------------------------------------------------------------------------
def test_simple_evaluate_on_local_tasks(lm, task_dir):
    from lm_eval import simple_evaluate

    manager = ev.task_manager_for(["tiny_mc", "lambada_openai"], task_dir)
    assert manager.include_path == str(task_dir) and "hellaswag" not in manager.all_tasks  # local only: fast
    results = simple_evaluate(model=lm, tasks=["tiny_mc", "lambada_openai"], task_manager=manager,
                              bootstrap_iters=0, log_samples=False)
    mc, lambada = results["results"]["tiny_mc"], results["results"]["lambada_openai"]
    assert mc["acc,none"] >= 0.75  # chance is 1/3: the trained model knows the facts
    assert 0 <= lambada["acc,none"] <= 1 and 1 <= lambada["perplexity,none"] < 50
    summary = ev.summarize(results)
    assert summary["average_over"] == ["lambada_openai"]  # the paper's columns first
    assert summary["tasks"]["tiny_mc"]["acc"] == mc["acc,none"]


def test_cli_eval_with_include_path_prints_the_paper_table_and_writes_json(run_dir, task_dir, tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    shutil.copytree(run_dir, runs / "older")
    shutil.copytree(run_dir, runs / "newer")
    old = time.time() - 3600
    for path in (runs / "older").rglob("*"):
        os.utime(path, (old, old))
    out = tmp_path / "results.json"
    result = runner.invoke(app, ["eval", "--runs-dir", str(runs), "--tasks", "lambada,tiny_mc", "--include-path",
                                 str(task_dir), "--limit", "6", "--batch-size", "4", "--device", "cpu",
                                 "--bootstrap-iters", "0", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "newer" in result.output  # says which run it took
    for header in ("LMB. PPL", "LMB. ACC", "AVG. ACC", "tiny_mc", "acc_norm"):
        assert header in result.output
    saved = json.loads(out.read_text())
    assert saved["results"]["lambada_openai"]["acc,none"] == pytest.approx(
        saved["caracal"]["summary"]["tasks"]["lambada_openai"]["acc"])
    assert saved["caracal"]["step"] == 150 and saved["n-samples"]["tiny_mc"]["effective"] == 6
    assert "samples" not in saved
    # The default output lands in the run directory.
    summary = ev.evaluate_checkpoint(runs / "newer", ["tiny_mc"], include_path=task_dir, limit=2, device="cpu",
                                     bootstrap_iters=0)
    assert summary["results_path"].startswith(str(runs / "newer" / "eval" / "results-"))
    assert set(summary["tasks"]) == {"tiny_mc"} and summary["average_over"] == ["tiny_mc"]


def test_evaluation_outside_a_git_repository_prints_no_git_error(run_dir, task_dir, tmp_path, monkeypatch, capfd):
    # lm-eval runs `git describe` in the working directory and let git's "fatal: not a git repository" through.
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "results.json"
    ev.evaluate_checkpoint(run_dir, ["tiny_mc"], include_path=task_dir, limit=2, device="cpu", bootstrap_iters=0,
                           out=out)
    assert "not a git repository" not in capfd.readouterr().err
    assert json.loads(out.read_text())["git_hash"] is None
    subprocess.run(["git", "init", "-q"], check=True)  # inside one, its commit is still recorded
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty", "-m", "x"],
                   check=True)
    assert ev.working_dir_git_hash() == subprocess.run(["git", "describe", "--always"], capture_output=True,
                                                       text=True, check=True).stdout.strip()


def test_download_only_loads_the_tasks_without_a_checkpoint(task_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):  # --download-only goes online: restored afterwards
        monkeypatch.setenv(name, os.environ.get(name, "1"))
    result = runner.invoke(app, ["eval", "--download-only", "--tasks", "tiny_mc", "--include-path", str(task_dir),
                                 "--runs-dir", str(tmp_path / "no-runs")])
    assert result.exit_code == 0, result.output
    assert f"datasets of tiny_mc are in the HF cache ({tmp_path / 'hf'})" in result.output.replace("\n", " ")


@pytest.mark.parametrize("limit", [0, -1, math.inf, math.nan])
def test_a_limit_that_is_no_count_nor_fraction_is_refused(limit):
    with pytest.raises(ev.EvalError, match="--limit must be > 0"):  # inf and nan raised inside lm-eval
        ev.check_limit(limit)
    assert ev.check_limit(None) is None and ev.check_limit(0.5) == 0.5 and ev.check_limit(6.0) == 6


def test_cli_passes_lm_eval_arguments_through():
    result = runner.invoke(app, ["lm-eval", "--help"])
    assert result.exit_code == 0, result.output
    assert "run" in result.output and "ls" in result.output  # lm-eval's own subcommands
    result = runner.invoke(app, ["eval", "--checkpoint", "nowhere", "--tasks", "tiny_mc"])
    assert result.exit_code == 1 and "nowhere" in result.output and "Traceback" not in result.output


def _run(args: list[str], tmp_path, timeout: int = 120) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env["HF_HOME"] = str(tmp_path / "hf-home")  # an empty Hugging Face cache
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, env=env, timeout=timeout,
                          cwd=tmp_path)


def test_every_missing_dataset_is_named_in_one_line_with_the_command_that_fetches_them(run_dir, tmp_path):
    result = _run(["caracal_cli", "eval", "--checkpoint", str(run_dir), "--tasks", "lambada,arc_e", "--device",
                   "cpu"], tmp_path)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr + result.stdout
    [line] = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert "lambada_openai (EleutherAI/lambada_openai), arc_easy (allenai/ai2_arc (ARC-Easy))" in line
    assert "caracal eval --download-only --tasks lambada_openai,arc_easy" in line
    assert f"copy its HF cache folder to {tmp_path / 'hf-home'}" in line and "--include-path" in line


def test_lm_eval_own_cli_runs_the_caracal_model(run_dir, task_dir, tmp_path):
    result = _run(["caracal_cli.lm_eval_entry", "--model", "caracal", "--model_args",
                   f"checkpoint={run_dir}", "--tasks", "tiny_mc", "--include_path", str(task_dir),
                   "--limit", "4", "--device", "cpu", "--batch_size", "2", "--output_path",
                   str(tmp_path / "out")], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "tiny_mc" in result.stdout and "acc" in result.stdout
    [saved] = (tmp_path / "out").rglob("results_*.json")
    assert json.loads(saved.read_text())["results"]["tiny_mc"]["acc,none"] >= 0


def test_caracal_is_registered_once_with_lm_eval():
    import importlib

    from lm_eval.api.registry import get_model

    assert get_model("caracal") is ev.CaracalLM
    importlib.reload(ev)  # a second import of the module must not raise
    assert get_model("caracal").__qualname__ == "CaracalLM"
    assert get_model("dummy").__name__ == "DummyLM"  # lm-eval's own models stay reachable
