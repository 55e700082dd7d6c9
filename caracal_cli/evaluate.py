"""Evaluation through lm-evaluation-harness (EleutherAI, >= 0.4.13): the `caracal` model class, the paper's task
names, the results table, and local tasks for machines without the Hub.

`CaracalLM` is registered with lm-eval as `caracal` when this module is imported. It scores text with the run's
own tokenizer and the model core: loglikelihoods in length-sorted, right-padded batches (the model is causal, so
padding after a sequence never changes its logits), contexts cut from the left to the model's context length, and
greedy generation through the model's cached decoding. This module imports lm-eval's light API modules (not
`datasets`); import it inside the commands that evaluate, never at `caracal_cli` import time.

By default evaluation is offline (`HF_DATASETS_OFFLINE=1`, `HF_HUB_OFFLINE=1`): tasks read the local Hugging Face
cache or local files (`--include-path`); a missing dataset is reported in one line that names it.
"""

from __future__ import annotations

import difflib
import functools
import json
import logging
import math
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
import yaml

# lm-eval's own models are lazy placeholders added when `lm_eval.models` is imported; `get_model` imports that
# module only while the registry is empty, so registering `caracal` first would hide `hf`, `dummy`, ….
import lm_eval.models  # noqa: F401
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import model_registry, register_model
from lm_eval.models.utils import Collator
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from caracal_cli.checkpoint import load_model, load_run_config, read_meta, resolve_checkpoint
from caracal_cli.config import CaracalError
from caracal_cli.fileio import atomic_write

log = logging.getLogger(__name__)

MODEL_NAME = "caracal"


class EvalError(CaracalError):
    """A problem the user can fix (unknown task, missing dataset): one line, no traceback."""


# --- task names -------------------------------------------------------------------------------------------
# The paper's short names → lm-eval's task names.
PAPER_TASK_NAMES = {
    "lambada": "lambada_openai",
    "hellaswag": "hellaswag",
    "arc_e": "arc_easy",
    "arc_c": "arc_challenge",
    "wino": "winogrande",
    "winogrande": "winogrande",
    "boolq": "boolq",
    "piqa": "piqa",
    "siqa": "social_iqa",
    "swde": "swde",
    "fda": "fda",
}
# `--tasks paper`: the eight tasks of the paper's main table, in its column order.
PAPER_SUITE = ["lambada", "hellaswag", "arc_e", "arc_c", "wino", "boolq", "piqa", "siqa"]
# (header, lm-eval task, metric) in the paper's column order. HellaSwag and ARC-Challenge report acc_norm (accuracy
# with each choice's loglikelihood divided by its length in characters), as is standard for these two tasks.
PAPER_COLUMNS = [
    ("LMB. PPL", "lambada_openai", "perplexity"),
    ("LMB. ACC", "lambada_openai", "acc"),
    ("HELLA. ACC_n", "hellaswag", "acc_norm"),
    ("ARC-E ACC", "arc_easy", "acc"),
    ("ARC-C ACC_n", "arc_challenge", "acc_norm"),
    ("WINO. ACC", "winogrande", "acc"),
    ("BOOLQ ACC", "boolq", "acc"),
    ("PIQA ACC", "piqa", "acc"),
    ("SIQA ACC", "social_iqa", "acc"),
]
PAPER_TASKS = {task for _, task, _ in PAPER_COLUMNS}


def resolve_task_names(tasks: str | Iterable[str]) -> list[str]:
    """lm-eval task names for `tasks` (comma-separated names or a list): paper short names are mapped, `paper`
    expands to the paper's eight tasks, anything else passes through unchanged; duplicates are dropped."""
    items = [tasks] if isinstance(tasks, str) else list(tasks)
    names: list[str] = []
    for item in items:
        for name in (part.strip() for part in item.split(",")):
            expanded = PAPER_SUITE if name == "paper" else [name] if name else []
            for short in expanded:
                mapped = PAPER_TASK_NAMES.get(short, short)
                if mapped not in names:
                    names.append(mapped)
    if not names:
        raise EvalError("no tasks given (e.g. --tasks paper or --tasks lambada,hellaswag)")
    return names


# --- offline ----------------------------------------------------------------------------------------------
def use_offline_hub(online: bool = False) -> None:
    """Keep `datasets` and `huggingface_hub` off the network unless `online`: without this, each dataset missing
    from the cache costs ~23 s of retries before failing. A user's own HF_*_OFFLINE setting wins. Must run before
    `datasets` is imported; if it already was (in-process callers), its import-time flags are set too."""
    if online:
        os.environ["HF_DATASETS_OFFLINE"] = os.environ["HF_HUB_OFFLINE"] = "0"
    else:
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    offline = os.environ["HF_HUB_OFFLINE"].upper() in ("1", "TRUE", "YES", "ON")
    if "datasets" in sys.modules:
        sys.modules["datasets"].config.HF_HUB_OFFLINE = offline
        sys.modules["datasets"].config.HF_DATASETS_OFFLINE = offline
    if "huggingface_hub" in sys.modules:
        sys.modules["huggingface_hub"].constants.HF_HUB_OFFLINE = offline


# --- the lm-eval model ------------------------------------------------------------------------------------
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(device: str | None) -> str:
    """`auto` → cuda when available, else cpu. lm-eval's own CLI always passes its default `cuda:0`, so a CUDA
    device on a machine without one falls back to the CPU (with a warning) instead of failing."""
    from caracal_cli.device import DeviceError, resolve_device

    try:
        return str(resolve_device(device or "auto"))
    except DeviceError:
        if not device.startswith("cuda"):
            raise
        log.warning("no CUDA device here: evaluating on the CPU instead of %s", device)
        return "cpu"


class CaracalLM(TemplateLM):
    """A caracal checkpoint for lm-eval. model_args: `checkpoint=RUN_DIR|CHECKPOINT_DIR,device=cpu,batch_size=16,
    max_gen_toks=256,dtype=float32`. In-process callers may pass `model=` and `tokenizer=` instead of a checkpoint.
    """

    def __init__(self, checkpoint: str | None = None, device: str = "auto", batch_size: int | str = 16,
                 max_gen_toks: int = 256, dtype: str = "float32", max_batch_size: int | None = None, *,
                 model: torch.nn.Module | None = None, tokenizer: Any = None):
        super().__init__()
        self._device = torch.device(pick_device(device))
        if dtype not in DTYPES:
            raise EvalError(f"dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")
        self.checkpoint_dir: Path | None = None
        self.step: int | None = None
        self.preset = "in-memory"
        if model is None:
            if checkpoint is None:
                raise EvalError("CaracalLM needs checkpoint=RUN_DIR (or model= and tokenizer=)")
            model, run_config, tokenizer, self.checkpoint_dir = load_model(checkpoint, self._device,
                                                                            dtype=DTYPES[dtype])
            self.step = read_meta(self.checkpoint_dir).get("step")
            self.preset = run_config.name
        elif tokenizer is None:
            raise EvalError("CaracalLM(model=…) needs the tokenizer the model was trained with")
        self.model = model.to(self._device, DTYPES[dtype]).eval()
        self.tok = tokenizer  # not `self.tokenizer`: lm-eval reads that one as an HF tokenizer (chat templates)
        if isinstance(batch_size, str):  # from model_args or lm-eval's CLI; "auto" is not supported: default
            batch_size = int(batch_size) if batch_size.isdigit() else 16
        self.batch_size = max(1, int(batch_size))
        self.max_gen_toks = int(max_gen_toks)
        self._sampling_warned = False
        self._decoder = None  # made at the first generate_until, kept for its caches and graphs

    # The interface lm-eval asks for.
    @property
    def eot_token_id(self) -> int:
        return self.tok.eot_id

    @property
    def max_length(self) -> int:
        return self.model.config.context

    @property
    def tokenizer_name(self) -> str:
        return self.tok.name

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tok.encode(string)

    def tok_decode(self, tokens: Iterable[int]) -> str:
        return self.tok.decode(tokens)

    def get_model_info(self) -> dict:
        return {"caracal_checkpoint": str(self.checkpoint_dir), "caracal_step": self.step,
                "caracal_preset": self.preset, "caracal_context": self.max_length}

    @torch.inference_mode()
    def _loglikelihood_tokens(self, requests: list[tuple[Any, list[int], list[int]]],
                              disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """(sum of log p(continuation | context), whether greedy decoding yields the continuation) per request.
        Requests sharing context + continuation[:-1] (one-token answers to one question) share one forward."""
        from tqdm import tqdm

        collator = Collator(requests, sort_fn=lambda r: (-len(r[1]) - len(r[2]), tuple(r[1] + r[2])),
                            group_by="contexts", group_fn=lambda r: r[1] + r[2][:-1])
        answers = []
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="caracal loglikelihood")
        for batch in collator.get_batched(n=self.batch_size):
            inputs = []
            for _, context, continuation in batch:
                if len(continuation) > self.max_length:
                    raise EvalError(f"a continuation of {len(continuation)} tokens is longer than the model's "
                                    f"context ({self.max_length})")
                # The last max_length tokens of context + continuation, less the final one (nothing predicts
                # past it): the context is cut from the left.
                inputs.append((context + continuation)[-(self.max_length + 1):][:-1])
            logits = self.model(self._right_padded(inputs))  # [B, L, vocab]
            for (key, context, continuation), tokens, row in zip(batch, inputs, logits, strict=True):
                n = len(continuation)
                scored = row[len(tokens) - n:len(tokens)].unsqueeze(0)  # [1, n, vocab] predicting the continuation
                for req_key, cont, cont_logits in collator.get_cache(key, context, continuation, scored):
                    logprobs = F.log_softmax(cont_logits[0, -len(cont):].float(), dim=-1)  # [len(cont), vocab]
                    target = torch.tensor(cont, device=logprobs.device)
                    total = float(logprobs.gather(1, target[:, None]).sum())
                    greedy = bool((logprobs.argmax(-1) == target).all())
                    answers.append((total, greedy))
                    if req_key is not None:
                        self.cache_hook.add_partial("loglikelihood", req_key, (total, greedy))
                    bar.update(1)
        bar.close()
        return collator.get_original(answers)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole texts (perplexity tasks), in disjoint windows of the model's context as HFLM
        does: the first window is preceded by EOT; each later one sees only the token before it."""
        windows, owner = [], []
        for i, request in enumerate(requests):
            tokens = self.tok_encode(request.args[0])
            for context, target in map(make_disjoint_window, get_rolling_token_windows(
                    tokens, prefix_token=self.prefix_token_id, max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, target))
                owner.append(i)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for i, (logprob, _) in zip(owner, scores, strict=True):
            totals[i] += logprob
        for request, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", (request.args[0],), total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy continuations, cut before the first stop sequence (`until`), at most `max_gen_toks` tokens, and
        never past the model's context (the context is cut from the left to make room). The model has no padding
        mask, so a batch holds contexts of one length only (exact, if less batched than loglikelihood)."""
        from tqdm import tqdm

        prepared = []
        for request in requests:
            context, gen_kwargs = request.args
            until, max_new = self._generation_settings(gen_kwargs)
            keep = max(1, self.max_length - max_new)
            tokens = self.tok_encode(context)[-keep:] or [self.prefix_token_id]
            prepared.append((tokens, tuple(until), max_new, request.args))
        collator = Collator(prepared, sort_fn=lambda p: (-len(p[0]), p[0]), group_by="gen_kwargs",
                            group_fn=lambda p: {"until": p[1], "max_new": p[2], "length": len(p[0])})
        outputs = []
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="caracal generate")
        for batch in collator.get_batched(n=self.batch_size):
            texts = self.greedy_generate([p[0] for p in batch], batch[0][2], list(batch[0][1]))
            outputs.extend(texts)
            for (*_, args), text in zip(batch, texts, strict=True):
                self.cache_hook.add_partial("generate_until", args, text)
            bar.update(len(batch))
        bar.close()
        return collator.get_original(outputs)

    def _generation_settings(self, gen_kwargs: dict) -> tuple[list[str], int]:
        gen_kwargs = dict(gen_kwargs or {})
        until = gen_kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else [s for s in until if s]
        max_new = int(gen_kwargs.pop("max_gen_toks", gen_kwargs.pop("max_new_tokens", self.max_gen_toks)))
        sampling = gen_kwargs.get("do_sample") or float(gen_kwargs.get("temperature", 0) or 0) > 0
        if sampling and not self._sampling_warned:
            log.warning("caracal decodes greedily; ignoring sampling settings %s", gen_kwargs)
            self._sampling_warned = True
        return until, max(1, max_new)

    @torch.inference_mode()
    def greedy_generate(self, contexts: list[list[int]], max_new: int, until: list[str]) -> list[str]:
        """Greedy decoding of a batch of same-length contexts through a `Decoder` (static caches; CUDA graphs on
        CUDA, reused by later batches of the same size and length bucket): one prefill forward, then one token
        per step. Each text stops at EOT or when it contains a stop sequence, and is cut before it."""
        from caracal_cli.generate import Decoder

        ids = torch.tensor(contexts, device=self._device)  # [B, T]
        batch, length = ids.shape
        steps = min(max_new, self.max_length - length)
        if self._decoder is None:
            self._decoder = Decoder(self.model)
        logits = self._decoder.start(ids, steps)  # [B, vocab]
        generated: list[list[int]] = [[] for _ in range(batch)]
        done = [False] * batch
        for step in range(steps):
            next_ids = logits.argmax(-1)  # [B]
            for b, token in enumerate(next_ids.tolist()):
                if done[b]:
                    continue
                if token == self.eot_token_id:
                    done[b] = True
                    continue
                generated[b].append(token)
                if until and any(stop in self.tok_decode(generated[b]) for stop in until):
                    done[b] = True
            if all(done) or step == steps - 1:
                break
            logits = self._decoder.step(next_ids)
        return [cut_at_stop(self.tok_decode(tokens), until) for tokens in generated]

    def _right_padded(self, sequences: list[list[int]]) -> torch.Tensor:
        width = max(len(s) for s in sequences)
        padded = torch.full((len(sequences), width), self.eot_token_id, dtype=torch.long)
        for i, seq in enumerate(sequences):
            padded[i, :len(seq)] = torch.tensor(seq, dtype=torch.long)
        return padded.to(self._device)


def cut_at_stop(text: str, until: list[str]) -> str:
    """`text` up to the earliest occurrence of any stop sequence."""
    cut = min((i for i in (text.find(stop) for stop in until if stop) if i >= 0), default=len(text))
    return text[:cut]


def _register() -> None:
    """Register `CaracalLM` as `caracal` once: importing this module again (a reload, `python -m`) finds the
    name taken by a class of the same name and leaves it, rather than raising as lm-eval would."""
    current = model_registry.get(MODEL_NAME, None)
    if current is None:
        register_model(MODEL_NAME)(CaracalLM)
    elif getattr(current, "__qualname__", None) != CaracalLM.__qualname__:
        raise EvalError(f"lm-eval model name {MODEL_NAME!r} is already taken by {current}")


_register()


# --- running ----------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=4)
def _full_task_manager(include_path: str | None):
    """lm-eval's TaskManager with its ~14,000 built-in task YAMLs (~13 s to index on 2 cores): built once per
    process and include path, so `caracal ablate` pays it once."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path)


def task_manager_for(names: list[str], include_path: str | Path | None = None):
    """A TaskManager that knows `names`: the include path alone when it holds all of them (fast), else lm-eval's
    built-in tasks plus the include path (whose tasks take precedence). Unknown names raise EvalError."""
    from lm_eval.tasks import TaskManager

    local = None
    if include_path is not None:
        if not Path(include_path).is_dir():
            raise EvalError(f"--include-path {include_path}: no such directory")
        local = TaskManager(include_path=str(include_path), include_defaults=False)
        if all(name in local.all_tasks or Path(name).is_file() for name in names):
            return local
    manager = _full_task_manager(None if include_path is None else str(include_path))
    unknown = [name for name in names if name not in manager.all_tasks and not Path(name).is_file()]
    if unknown:
        hints = [f"{name} (did you mean {', '.join(close)}?)" if (close := difflib.get_close_matches(
            name, manager.all_tasks, n=3)) else name for name in unknown]
        raise EvalError(f"unknown task {', '.join(hints)}: not a paper short name ({', '.join(PAPER_TASK_NAMES)}, "
                        f"paper) nor a task lm-eval or --include-path defines (list them: caracal lm-eval ls tasks)")
    return manager


def missing_dataset(err: BaseException) -> tuple[str, str, str] | None:
    """(task, dataset, reason) when `err` was raised while a task loaded its data (lm-eval's `Task.download`):
    dataset is the Hub id (with its subset), or '' for a task over local files; None for any other error."""
    from lm_eval.api.task import Task

    task = None
    for frame, _ in traceback.walk_tb(err.__traceback__):
        owner = frame.f_locals.get("self")
        if frame.f_code.co_name == "download" and isinstance(owner, Task):
            task = owner
    if task is None:
        return None
    name = getattr(task.config, "task", None) or type(task).__name__
    path, subset = task.DATASET_PATH, task.DATASET_NAME
    reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if path in ("json", "csv", "parquet", "text", "arrow"):
        return name, "", reason
    return name, path + (f" ({subset})" if subset and subset != "default" else ""), reason


def hf_cache_dir() -> str:
    return os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")


def missing_datasets_message(names: list[str], manager, first: tuple[str, str, str]) -> str:
    """One message naming every requested task whose dataset is not at hand (each task is loaded on its own
    to find them all; offline, a missing one fails at once), the one command that fetches them on a connected
    machine, and where the cache goes."""
    missing = []
    for name in names:
        try:
            load_tasks(manager, [name])
        except Exception as err:  # noqa: BLE001 - a task that fails otherwise is reported by the real run
            found = missing_dataset(err)
            if found is not None:
                missing.append(found)
    return format_missing(missing or [first])


def require_datasets(names: list[str], manager) -> None:
    """Load every task's data now (the local cache or files; the Hub only when online): for a command that
    evaluates after hours of training (`caracal ablate`), a missing dataset is an EvalError before it trains,
    naming every missing one and the command that fetches them."""
    try:
        load_tasks(manager, names)
    except Exception as err:
        first = missing_dataset(err)
        if first is None:
            raise
        raise EvalError(missing_datasets_message(names, manager, first)) from None


def missing_dataset_message(err: BaseException) -> str | None:
    """`format_missing` for the one dataset whose loading raised `err`; None for any other error."""
    found = missing_dataset(err)
    return None if found is None else format_missing([found])


def format_missing(missing: list[tuple[str, str, str]]) -> str:
    local = [f"task {task}: cannot read its local data files ({reason})" for task, dataset, reason in missing
             if not dataset]
    if local:
        return "; ".join(local)
    listed = ", ".join(f"{task} ({dataset})" for task, dataset, _ in missing)
    if os.environ.get("HF_HUB_OFFLINE") == "0":
        return f"the Hub download failed for {listed}: {missing[0][2]}"
    return (f"datasets not in the local HF cache ({hf_cache_dir()}) and evaluation runs offline: {listed}. "
            f"On a connected machine run `caracal eval --download-only --tasks "
            f"{','.join(task for task, _, _ in missing)}` and copy its HF cache folder to {hf_cache_dir()} here "
            f"(or set HF_HOME); or pass --online, or --include-path DIR with local task files")


def evaluate_checkpoint(checkpoint: str | Path, tasks: str | Iterable[str] | None = None,
                        include_path: str | Path | None = None, limit: float | None = None,
                        batch_size: int | None = None, device: str = "auto", num_fewshot: int | None = None,
                        out: str | Path | None = None, bootstrap_iters: int = 1000, online: bool = False,
                        log_samples: bool = False, lm: CaracalLM | None = None) -> dict:
    """Evaluate a run (its newest checkpoint) or a checkpoint directory on lm-eval tasks and write lm-eval's full
    results JSON to `out` (default `<run_dir>/eval/results-<timestamp>.json`).

    `tasks` defaults to the run config's `eval.tasks`, `batch_size` and `num_fewshot` to its `eval` section. An
    already built `lm` (a CaracalLM) skips loading the checkpoint again. Returns a compact summary:
    `{"tasks": {task: {metric: value}}, "average_acc": float | None, "average_over": [task, …],
    "checkpoint", "run_dir", "step", "results_path"}` (metrics without lm-eval's ",none" filter suffix).
    """
    use_offline_hub(online)
    if out is not None and Path(out).is_dir():  # refused now, not after the evaluation
        raise EvalError(f"--out {out}: is a directory (give the results file's name)")
    run_dir, ckpt = resolve_checkpoint(checkpoint)
    config = load_run_config(run_dir)
    names = resolve_task_names(config.eval.tasks if tasks is None else tasks)
    manager = task_manager_for(names, include_path)
    batch_size = batch_size or config.eval.batch_size
    num_fewshot = config.eval.num_fewshot if num_fewshot is None else num_fewshot
    limit = check_limit(limit)
    if lm is None:
        lm = CaracalLM(checkpoint=str(ckpt), device=device, batch_size=batch_size)

    import lm_eval.evaluator
    from unittest import mock

    # lm-eval records `git describe` of the working directory and lets git print "fatal: not a git repository"
    # to the terminal outside one: the same record, without the message.
    quiet_git = mock.patch.object(lm_eval.evaluator, "get_git_commit_hash", working_dir_git_hash, create=True)
    try:
        with quiet_git:
            results = lm_eval.evaluator.simple_evaluate(
                model=lm, model_args=f"checkpoint={ckpt},batch_size={lm.batch_size}", tasks=names,
                num_fewshot=num_fewshot, limit=limit, device=str(lm.device), batch_size=lm.batch_size,
                bootstrap_iters=bootstrap_iters, log_samples=log_samples, task_manager=manager)
    except Exception as err:
        first = missing_dataset(err)
        if first is None:
            raise
        raise EvalError(missing_datasets_message(names, manager, first)) from None
    step = read_meta(ckpt).get("step")
    summary = {**summarize(results), "checkpoint": str(ckpt), "run_dir": str(run_dir), "step": step}
    results["caracal"] = {"checkpoint": str(ckpt), "run_dir": str(run_dir), "step": step, "tasks": names,
                          "include_path": None if include_path is None else str(include_path),
                          "summary": {k: summary[k] for k in ("tasks", "average_acc", "average_over")}}
    path = Path(out) if out else Path(run_dir) / "eval" / f"results-{time.strftime('%Y%m%d-%H%M%S')}.json"
    write_results(path, results)
    summary["results_path"] = str(path)
    return summary


def working_dir_git_hash() -> str | None:
    """`git describe --always` of the working directory, or None outside a repository (or without git)."""
    try:
        done = subprocess.run(["git", "describe", "--always"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return (done.stdout.strip() or None) if done.returncode == 0 else None


def check_limit(limit: float | None) -> float | None:
    """lm-eval's limit: examples per task (from 1, made a whole number) or a fraction of each task (below 1)."""
    if limit is not None and not 0 < limit < math.inf:  # NaN too
        raise EvalError(f"--limit must be > 0 (a count, or a fraction below 1); got {limit}")
    return int(limit) if limit is not None and limit >= 1 else limit


def download_tasks(tasks: str | Iterable[str], include_path: str | Path | None = None) -> list[str]:
    """Load `tasks` once with the Hub online, which fills the local HF cache (`caracal eval --download-only`);
    returns their lm-eval names."""
    use_offline_hub(online=True)
    names = resolve_task_names(tasks)
    load_tasks(task_manager_for(names, include_path), names)
    return names


def load_tasks(manager, names: list[str]):
    """Build the tasks (each loads its dataset): `TaskManager.load` where this lm-eval has it, the older
    `load_task_or_group` elsewhere."""
    return manager.load(names) if hasattr(manager, "load") else manager.load_task_or_group(names)


def write_results(path: str | Path, results: dict) -> None:
    from lm_eval.utils import handle_non_serializable

    with atomic_write(path, "w") as handle:
        json.dump(results, handle, indent=2, default=handle_non_serializable, ensure_ascii=False)
        handle.write("\n")


# --- summary and table ------------------------------------------------------------------------------------
def summarize(results: dict) -> dict:
    """Per-task metrics as plain floats (`acc`, `acc_stderr`, `perplexity`, …; other filters keep their
    `metric,filter` key) and the average accuracy: over the paper's accuracy columns that were run (acc_norm for
    HellaSwag and ARC-C), or, when none were, over every task's `acc`."""
    tasks: dict[str, dict[str, float]] = {}
    for task, metrics in results.get("results", {}).items():
        values = {}
        for key, value in metrics.items():
            if (key == "sample_len" or isinstance(value, bool) or not isinstance(value, (int, float))
                    or not math.isfinite(value)):
                continue
            metric, _, filt = key.partition(",")
            values[metric if filt in ("", "none") else key] = float(value)
        tasks[task] = values
    accuracies = {task: tasks[task][metric] for _, task, metric in PAPER_COLUMNS
                  if metric != "perplexity" and metric in tasks.get(task, {})}
    if not accuracies:
        accuracies = {task: values["acc"] for task, values in tasks.items() if "acc" in values}
    average = sum(accuracies.values()) / len(accuracies) if accuracies else None
    return {"tasks": tasks, "average_acc": average, "average_over": list(accuracies)}


def results_tables(summary: dict, label: str | None = None) -> list:
    """Rich tables: the paper's columns for the tasks that were run (accuracies in %), then one row per metric
    of every other task."""
    from rich.table import Table

    tasks = summary["tasks"]
    if label is None:
        label = Path(summary["run_dir"]).name if summary.get("run_dir") else "model"
        if summary.get("step") is not None:
            label += f" @ step {summary['step']}"
    tables = []
    columns = [(header, task, metric) for header, task, metric in PAPER_COLUMNS if metric in tasks.get(task, {})]
    if columns:
        table = Table(title="Paper tasks (zero-shot unless --num-fewshot; accuracies in %, ACC_n = acc_norm)")
        table.add_column("model")
        for header, _, _ in columns:
            table.add_column(header, justify="right")
        row = [label]
        for _, task, metric in columns:
            value = tasks[task][metric]
            row.append(f"{value:.2f}" if metric == "perplexity" else f"{100 * value:.1f}")
        if summary["average_acc"] is not None and set(summary["average_over"]) <= PAPER_TASKS:
            table.add_column("AVG. ACC", justify="right")
            row.append(f"{100 * summary['average_acc']:.1f}")
        table.add_row(*row)
        tables.append(table)
    others = [task for task in tasks if task not in PAPER_TASKS]
    if others:
        table = Table(title="Other tasks")
        for name in ("task", "metric", "value", "stderr"):
            table.add_column(name, justify="left" if name in ("task", "metric") else "right")
        for task in others:
            for metric, value in tasks[task].items():
                if "_stderr" in metric:
                    continue
                stderr = tasks[task].get(metric.replace(",", "_stderr,", 1) if "," in metric else f"{metric}_stderr")
                table.add_row(task, metric, f"{value:.4f}", "" if stderr is None else f"{stderr:.4f}")
        if not columns and summary["average_acc"] is not None:
            table.caption = f"average acc ({', '.join(summary['average_over'])}): {100 * summary['average_acc']:.1f}%"
        tables.append(table)
    return tables


# --- local tasks ------------------------------------------------------------------------------------------
def _write_task(directory: str | Path, name: str, docs: list[dict], spec: dict) -> Path:
    directory = Path(directory).resolve()
    data = directory / f"{name}.jsonl"
    with atomic_write(data, "w") as handle:
        for doc in docs:
            handle.write(json.dumps(doc, ensure_ascii=False) + "\n")
    # An absolute data path: lm-eval resolves relative `data_files` against the working directory.
    config = {"task": name, "dataset_path": "json", "dataset_name": None,
              "dataset_kwargs": {"data_files": {"test": str(data)}}, "test_split": "test", **spec,
              "metadata": {"version": 1.0}}
    path = directory / f"{name}.yaml"
    with atomic_write(path, "w") as handle:
        yaml.safe_dump(config, handle, sort_keys=False, allow_unicode=True)
    return path


def write_local_task(directory: str | Path, name: str, examples: list[dict]) -> Path:
    """Write a multiple-choice lm-eval task `name` over local data into `directory` (`name.yaml` + `name.jsonl`)
    and return the YAML's path; evaluate it with `include_path=directory`. Each example is
    `{"question": str, "choices": [str, …], "answer": index}`; a choice is scored as " " + choice after the
    question (metrics acc and acc_norm)."""
    docs = []
    for i, example in enumerate(examples):
        missing = {"question", "choices", "answer"} - set(example)
        if missing or not 0 <= int(example["answer"]) < len(example["choices"]):
            raise EvalError(f"example {i} of task {name}: needs question, choices and an answer index into choices")
        docs.append({"question": example["question"], "choices": list(example["choices"]),
                     "answer": int(example["answer"])})
    spec = {"output_type": "multiple_choice", "doc_to_text": "{{question}}", "doc_to_choice": "choices",
            "doc_to_target": "answer",
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}]}
    return _write_task(directory, name, docs, spec)


def write_local_lambada(directory: str | Path, texts: list[str], name: str = "lambada_openai") -> Path:
    """Write a LAMBADA-style task (predict each text's last word; metrics perplexity and acc, the prompt of
    lm-eval's lambada_openai) over local texts. Named `lambada_openai` by default, so `--tasks lambada` with
    `--include-path directory` evaluates it in place of the Hub dataset."""
    spec = {"output_type": "loglikelihood",
            "doc_to_text": "{{text.split(' ')[:-1]|join(' ')}}", "doc_to_target": "{{' '+text.split(' ')[-1]}}",
            "metric_list": [{"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False},
                            {"metric": "acc", "aggregation": "mean", "higher_is_better": True}]}
    return _write_task(directory, name, [{"text": text} for text in texts], spec)
