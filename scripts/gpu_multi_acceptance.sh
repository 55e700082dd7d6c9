#!/usr/bin/env bash
# Several GPUs for real (issue 23): DDP and FSDP2 over NCCL against one GPU, in parts that each fit a 10-minute slot
# on one node of 2, 4 or 8 GPUs (counts above the node's are left out):
#
#   bash scripts/gpu_multi_acceptance.sh ddp-small   # small, DDP, 1/2/4/8 GPUs, 50 compiled steps of the presets'
#                                                    # recipe at a fixed micro-batch: tokens/s per GPU, efficiency
#                                                    # against one GPU, MFU, loss differences to one GPU
#   bash scripts/gpu_multi_acceptance.sh fsdp-small  # the same under FSDP2 (one GPU's run reused from ddp-small)
#   bash scripts/gpu_multi_acceptance.sh large-1     # large on one GPU: the reference of the next two (~6 min)
#   bash scripts/gpu_multi_acceptance.sh fsdp-large  # large, FSDP2, 2/4/8 GPUs against large-1's run
#   bash scripts/gpu_multi_acceptance.sh ddp-large   # large, DDP, likewise
#   bash scripts/gpu_multi_acceptance.sh resume-small  # small, DDP, every GPU: SIGTERM after step 20, --resume
#                                                    # to 50, loss difference to the uninterrupted run
#   bash scripts/gpu_multi_acceptance.sh resume-large  # large, FSDP2, likewise
#   bash scripts/gpu_multi_acceptance.sh trace       # 3 profiled steps of each on every GPU: the share of NCCL
#                                                    # time beside compute kernels, and rank 0's traces
#   bash scripts/gpu_multi_acceptance.sh checkpoint  # large, FSDP2, 10 steps on every GPU; its checkpoint loaded
#                                                    # in one process: validation loss, `caracal eval`, `generate`
#
# On the device tool: a kind with several GPUs (nvidia-h200-x2/-x4/-x8), the data made here first and carried:
#   python -m caracal_cli prepare shakespeare --out .gpudata/shakespeare-gpt2    # ~3 MB, carry: [".gpudata"]
# then `run` with command `bash scripts/gpu_multi_acceptance.sh PART` (no mamba wheel needed). Parts that compare
# with one GPU reuse its run from $WORK when the machine is still the same (run them in one session, in the order
# above); otherwise they run it again, which may not fit the slot. The part times are estimates from one-GPU
# throughput (small 480k, large 93k tokens/s on an H200), not yet measured. Logs and JSON go to $WORK (default
# /tmp/gpu-multi); each step has its own time limit; with OUT set, each part copies its results there.
set -uo pipefail
part=${1:?usage: gpu_multi_acceptance.sh ddp-small|fsdp-small|large-1|fsdp-large|ddp-large|resume-small|resume-large|trace|checkpoint}
WORK=${WORK:-/tmp/gpu-multi}
source "$(dirname "$0")/gpu_common.sh"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
DATA=${DATA:-.gpudata/shakespeare-gpt2}
[ -f "$DATA/manifest.json" ] || { echo "no dataset at $DATA: python -m caracal_cli prepare shakespeare --out $DATA" >&2; exit 2; }
CARACAL=(python3 -m caracal_cli)
NGPU=$(nvidia-smi -L | wc -l)
# The presets' recipe (524,288 tokens per step), 64 sequences per micro-step on every count, so each count reads
# the same batches in the same order; compiled.
TABLE=(python3 scripts/gpu_scaling_table.py --data "$DATA" --compile --micro-batch "${MICRO:-64}" --reuse)
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'nccl', torch.cuda.nccl.version())"

scaling() {  # scaling NAME PRESET MODE GPUS: one table, its JSON and log collected
    step "$1" 570 "${TABLE[@]}" --out "$WORK/scaling" --steps "${STEPS:-50}" --presets "$2" --mode "$3" --gpus "$4" \
        --limit-s 400 --json "$WORK/$1.json"
    collect "$WORK/$1.json" "$WORK/$1.log" "$WORK/status.log"
    tail -n 8 "$WORK/$1.log"
}

case $part in
ddp-small) scaling ddp_small small ddp "${GPUS:-1,2,4,8}" ;;
fsdp-small) scaling fsdp_small small fsdp "${GPUS:-1,2,4,8}" ;;
large-1) scaling large_1 large fsdp 1 ;;
fsdp-large) scaling fsdp_large large fsdp "${GPUS:-1,2,4,8}" ;;
ddp-large) scaling ddp_large large ddp "${GPUS:-1,2,4,8}" ;;
resume-small|resume-large)
    # The uninterrupted run is reused from the part above when $WORK still holds it.
    if [ "$part" = resume-small ]; then set -- small ddp; else set -- large fsdp; fi
    step "resume_$1" 570 "${TABLE[@]}" --out "$WORK/scaling" --steps "${STEPS:-50}" --presets "$1" --mode "$2" \
        --gpus "$NGPU" --stop-at 20 --limit-s 250 --json "$WORK/resume_$1.json"
    collect "$WORK/resume_$1.json" "$WORK/resume_$1.log" "$WORK/scaling/$1-$2-${NGPU}gpu-resumed-stop.log" \
        "$WORK/scaling/$1-$2-${NGPU}gpu-resumed.log" "$WORK/status.log"
    tail -n 3 "$WORK/resume_$1.log"
    ;;
trace)
    for run in "small ddp" "large fsdp"; do
        set -- $run
        step "trace_$1" 270 "${TABLE[@]}" --out "$WORK/trace" --steps 8 --trace 3 --presets "$1" --mode "$2" \
            --gpus "$NGPU" --limit-s 260 --json "$WORK/trace_$1.json"
        cp "$WORK/trace/$1-$2-${NGPU}gpu/traces/rank0.json.gz" "$WORK/trace_$1_rank0.json.gz" 2>/dev/null
    done
    collect "$WORK"/trace_*.json "$WORK"/trace_*_rank0.json.gz "$WORK"/trace_*.log "$WORK/status.log"
    tail -n 3 "$WORK"/trace_*.log
    ;;
checkpoint)
    run=$WORK/checkpoint_large
    rm -rf "$run" "$WORK/tasks"
    step checkpoint_train 300 "${CARACAL[@]}" train --preset large --data "$DATA" --out "$run" --device cuda \
        --nproc-per-node "$NGPU" --max-steps 10 --set train.parallel=fsdp --set train.micro_batch="${MICRO:-64}" \
        --set train.eval_tokens=262144
    # One process: the gathered checkpoint's validation loss against the one the run logged, then lm-eval on two
    # local tasks from the held-out plays (as `caracal demo` writes them) and a sample.
    step checkpoint_load 120 python3 -c "
import sys
from pathlib import Path
from caracal_cli.checkpoint import load_model
from caracal_cli.monitor import read_metrics
from caracal_cli.train import evaluate_val_loss
model, config, _, checkpoint = load_model(sys.argv[1], 'cuda')
logged = [r['val_loss'] for r in read_metrics(Path(sys.argv[1])) if 'val_loss' in r][-1]
loaded = evaluate_val_loss(model, sys.argv[2], config, 'cuda')
print(f'{checkpoint}: val loss logged {logged:.5f}, loaded in one process {loaded:.5f}')
sys.exit(abs(loaded - logged) > 1e-2)" "$run" "$DATA"
    step checkpoint_tasks 60 python3 -c "
import sys
from pathlib import Path
from caracal_cli.demo import _held_out_lines, write_demo_tasks
from caracal_cli.tokenizer import load_tokenizer
print(','.join(write_demo_tasks(Path(sys.argv[2]), _held_out_lines(Path(sys.argv[1]), load_tokenizer(sys.argv[1])))))" \
        "$DATA" "$WORK/tasks"
    step checkpoint_eval 240 "${CARACAL[@]}" eval --checkpoint "$run" --device cuda --include-path "$WORK/tasks" \
        --tasks "$(tail -n 1 "$WORK/checkpoint_tasks.log")" --bootstrap-iters 0 --out "$WORK/checkpoint_eval.json"
    step checkpoint_generate 90 "${CARACAL[@]}" generate --checkpoint "$run" --device cuda --prompt "ROMEO:" \
        --max-new-tokens 64 --seed 0
    collect "$WORK"/checkpoint_{train,load,eval,generate}.log "$WORK/checkpoint_eval.json" "$WORK/status.log"
    cat "$WORK/checkpoint_load.log"; tail -n 12 "$WORK/checkpoint_eval.log"; cat "$WORK/checkpoint_generate.log"
    ;;
*)
    echo "unknown part $part (ddp-small, fsdp-small, large-1, fsdp-large, ddp-large, resume-small, resume-large," \
        "trace or checkpoint)" >&2
    exit 2
    ;;
esac
