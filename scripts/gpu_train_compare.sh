#!/usr/bin/env bash
# Train Caracal `tiny` and `llama-tiny` on the same tokens of the embedded Shakespeare corpus on one GPU
# (about 2.5 minutes of training each on an H100, plus compilation; the whole script takes about 8 minutes)
# and print: model, tokens/s, MFU, final train loss, validation loss.
#
# The corpus is small (1.48M GPT-2 tokens of train split, 67K of val): the default budget is many epochs, so
# the validation loss measures memorisation as much as modelling; the table says how many epochs each saw and
# the best validation loss along the way. Both runs read identical batches (same seed, batch and steps).
#
# Prepare the data on a machine with the package installed (it travels with the working tree, ~3 MB):
#   caracal prepare shakespeare --out .gpudata/shakespeare-gpt2
# Then on the GPU machine, from the repository root (torch, typer, rich, pyyaml, safetensors installed;
# no network, no `datasets` or `lm-eval` needed):
#   bash scripts/gpu_train_compare.sh
# Knobs (environment): TOKENS (per model), BATCH (global batch tokens), LR, DATA, RUNS, COMPILE_CARACAL=0|1,
# CARACAL_SETS and LLAMA_SETS (extra `key=value` overrides for one model, space-separated), SKIP_LLAMA=1.
set -euo pipefail

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PYTHON=${PYTHON:-python}
DATA=${DATA:-.gpudata/shakespeare-gpt2}
RUNS=${RUNS:-runs/gpu-compare-$(date +%Y%m%d-%H%M%S)}
BATCH=${BATCH:-131072}                 # 32 sequences × 512 tokens × 8 accumulation steps
# 400 steps of 131072 tokens (35.5 epochs). Measured on an H100 (torch 2.11, compiled, 200 steps): Llama
# 396K tokens/s, Caracal 309K, so ~2.2 and ~2.8 minutes of steps, plus ~0.7 / ~2 minutes of compilation.
TOKENS=${TOKENS:-52428800}
LR=${LR:-9e-4}
COMPILE_CARACAL=${COMPILE_CARACAL:-1}

if [ ! -f "$DATA/manifest.json" ]; then
    echo "error: no dataset at $DATA (make it with: caracal prepare shakespeare --out $DATA)" >&2
    exit 1
fi
"$PYTHON" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; \
print('torch', torch.__version__, '|', torch.cuda.get_device_name())"

STEPS=$((TOKENS / BATCH))
COMMON=(--data "$DATA" --device cuda
        --set "train.tokens=$TOKENS" --set "train.global_batch_tokens=$BATCH" --set "train.lr=$LR"
        --set "train.warmup_tokens=$((TOKENS / 20))" --set "train.eval_every=$((STEPS / 4))"
        --set train.eval_tokens=65536 --set "train.checkpoint_every=$STEPS" --set train.keep_checkpoints=1
        --set train.log_every=100)

train() {  # train PRESET [extra args…]
    local preset=$1; shift
    echo "=== $preset ($STEPS steps of $BATCH tokens) ==="
    "$PYTHON" -m caracal_cli train --preset "$preset" --out "$RUNS/$preset" "${COMMON[@]}" "$@"
}

CARACAL_ARGS=()
for override in ${CARACAL_SETS:-}; do CARACAL_ARGS+=(--set "$override"); done

LLAMA_ARGS=()
for override in ${LLAMA_SETS:-}; do LLAMA_ARGS+=(--set "$override"); done

[ "${SKIP_LLAMA:-0}" = 1 ] || train llama-tiny --compile "${LLAMA_ARGS[@]}"
if [ "$COMPILE_CARACAL" = 1 ]; then
    if ! train tiny --compile "${CARACAL_ARGS[@]}"; then
        echo "Caracal with torch.compile failed; training it eagerly instead" >&2
        rm -rf "$RUNS/tiny"
        train tiny "${CARACAL_ARGS[@]}"
        echo eager > "$RUNS/tiny/eager"
    fi
else
    train tiny "${CARACAL_ARGS[@]}"
    echo eager > "$RUNS/tiny/eager"
fi

"$PYTHON" - "$RUNS" "$DATA" <<'EOF'
import json, statistics, sys
from pathlib import Path

runs, data = Path(sys.argv[1]), Path(sys.argv[2])
manifest = json.loads((data / "manifest.json").read_text())
train_tokens = sum(s["tokens"] for s in manifest["splits"]["train"])
rows = []
for preset in ("tiny", "llama-tiny"):
    if not (runs / preset / "metrics.jsonl").exists():
        continue
    records = [json.loads(line) for line in (runs / preset / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    vals = [r for r in records if "val_loss" in r]
    timed = steps[10:] or steps  # the first steps pay for compilation
    mfu = [r["mfu"] for r in timed if r["mfu"] is not None]
    rows.append({
        "model": f"{preset}{' (eager)' if (runs / preset / 'eager').exists() else ' (compiled)'}",
        "tokens/s": statistics.median(r["tokens_per_s"] for r in timed),
        "MFU": f"{100 * statistics.median(mfu):.1f}%" if mfu else "n/a",
        "train loss": steps[-1]["loss"], "val loss": vals[-1]["val_loss"],
        "best val": min(r["val_loss"] for r in vals), "epochs": steps[-1]["tokens"] / train_tokens,
        "minutes": steps[-1]["elapsed"] / 60})
print()
print(f"{'model':<24}{'tokens/s':>12}{'MFU':>8}{'train loss':>12}{'val loss':>10}{'best val':>10}"
      f"{'epochs':>8}{'minutes':>9}")
for r in rows:
    print(f"{r['model']:<24}{r['tokens/s']:>12,.0f}{r['MFU']:>8}{r['train loss']:>12.4f}{r['val loss']:>10.4f}"
          f"{r['best val']:>10.4f}{r['epochs']:>8.1f}{r['minutes']:>9.1f}")
(runs / "summary.json").write_text(json.dumps(rows, indent=2))
EOF
