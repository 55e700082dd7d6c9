#!/usr/bin/env bash
# The GPU acceptance runs of the issues, in three parts that each fit a 10-minute slot on one H100:
#
#   bash scripts/gpu_acceptance.sh tests    # GPU tests and the FFT-convolution bench
#   bash scripts/gpu_acceptance.sh bench    # the bench's sweep of tile settings and (P, T) splits, every length
#   OTHER="DIR …" bash scripts/gpu_acceptance.sh compare  # the FFT-convolution bench of other trees (copies
#                                           # of branches in ignored, carried folders) and of this one, one run
#   bash scripts/gpu_acceptance.sh speed    # caracal speed, small size, every mode: llama, caracal (both FFT
#                                           # paths), swh
#   bash scripts/gpu_acceptance.sh speed-ssm  # the same for mamba, mamba2 and jamba (mamba_ssm's Triton kernels
#                                           # autotune at every new shape: Mamba-2 takes ~4 minutes)
#   MODELS="llama caracal swh" bash scripts/gpu_acceptance.sh decode   # the CUDA-graph decoding tests, then
#                                           # decode points (eager, graph, compiled; batch 1 and 64) per model
#   bash scripts/gpu_acceptance.sh long     # caracal (both FFT paths) vs llama at small, L = 32K … 128K, and
#                                           # the bare convolution there (COMPILE=1: the models compiled;
#                                           # OTHER="DIR …": caracal from earlier trees first, the before)
#   bash scripts/gpu_acceptance.sh mhf      # the fused MHF kernels: GPU tests, the module alone (composition /
#                                           # auto / fast, eager and compiled), caracal vs llama vs the composition
#   bash scripts/gpu_acceptance.sh train    # tiny vs llama-tiny on the same tokens, then a profile of each
#   bash scripts/gpu_acceptance.sh mfu      # profiles of llama-tiny and tiny at micro-batch 32/64, compile modes
#   bash scripts/gpu_acceptance.sh trainer-mfu  # caracal train's own wall-clock MFU, llama-tiny and tiny, the
#                                           # presets' full recipe (524,288 tokens per step: 16 micro-batches)
#   bash scripts/gpu_acceptance.sh kernels  # MHF's gate-convolution tunables and the FFT convolution's tiles at
#                                           # L = 512 and 2048 (where Caracal trails Llama)
#   bash scripts/gpu_acceptance.sh loss     # the loss's softmax-gradient kernel per block and warps, the whole
#                                           # chunked loss per chunk size (scripts/bench_loss.py)
#   bash scripts/gpu_acceptance.sh scale    # tiny with MHF's scale=mean and =sqrt; memory per preset at 24 GB
#   bash scripts/gpu_acceptance.sh ablate   # the MHF:SWA ratio study at the tiny size
#
# Needs: mamba_ssm's wheel in .whl/ (see shared/wheels/README.md; installed into /tmp/site here), and for
# train/ablate the Shakespeare shards (`caracal prepare shakespeare --out .gpudata/shakespeare-gpt2`). Logs and
# JSON go to $WORK (default /tmp/gpu-acceptance); each step has its own time limit, so one stall loses one step.
# With OUT set (the device tool's folder that comes back, at most 8 files), each part copies its results there.
set -uo pipefail
part=${1:?usage: gpu_acceptance.sh tests|bench|compare|speed|speed-ssm|decode|long|mhf|kernels|train|mfu|trainer-mfu|loss|scale|ablate}
WORK=${WORK:-/tmp/gpu-acceptance}
source "$(dirname "$0")/gpu_common.sh"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi
DATA=${DATA:-.gpudata/shakespeare-gpt2}
CARACAL=(python3 -m caracal_cli)  # an array, not a function: `timeout` runs programs only
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"

case $part in
tests)
    step gputests 360 python3 -m pytest -v -s -rs -p no:cacheprovider -m gpu tests
    step bench 160 env OUT="$WORK" python3 scripts/bench_fftconv.py --budget-s 100 --mhf 2048 16384 --swa 2048
    collect "$WORK"/{gputests,bench,status}.log "$WORK/bench_fftconv.json"
    grep -E "PASSED|FAILED|SKIPPED|ERROR|passed|failed" "$WORK/gputests.log" | tail -n 30
    tail -n 30 "$WORK/bench.log"
    ;;
bench)
    # Every tile variant and (P, T) split at each length, to choose SPLITS and the default tiles from.
    step bench 560 env OUT="$WORK" python3 scripts/bench_fftconv.py --budget-s 480 \
        --sweep 512 1024 2048 4096 8192 16384 --mhf 2048 16384 --swa
    collect "$WORK"/{bench,status}.log "$WORK/bench_fftconv.json"
    tail -n 40 "$WORK/bench.log"
    ;;
compare)
    # Before and after on the same machine in one run: every length, no sweep. Each tree in OTHER (up to five,
    # space-separated) runs its own scripts and package; this tree runs last.
    logs=()
    for dir in ${OTHER:?set OTHER to the other trees}; do
        other=$(realpath "$dir") || exit 2
        name=bench_$(basename "$other")
        step "$name" 200 env -C "$other" PYTHONPATH="$other" python3 scripts/bench_fftconv.py --sweep --mhf --swa
        logs+=("$name")
    done
    step bench 200 env OUT="$WORK" python3 scripts/bench_fftconv.py --sweep --mhf --swa
    logs+=(bench)
    files=("${logs[@]/#/$WORK/}")
    collect "${files[@]/%/.log}" "$WORK/status.log" "$WORK/bench_fftconv.json"
    for log in "${logs[@]}"; do
        echo "== $log"; grep -hE "^(triton fast|flash|torch.fft)|^stages|max rel" "$WORK/$log.log"
    done
    ;;
speed|speed-ssm)
    # One run per model, each with its own limit; a run stopped at its limit keeps the models it finished.
    S=(speed --size small --mode all --repeats 3 --warmup 1 --decode-tokens 16 --decode-batch 1)
    if [ "$part" = speed ]; then
        runs=("llama 140" "caracal 190" "swh 130")  # caracal: its kernels compile per length first
        step speed_caracal_torchfft 130 "${CARACAL[@]}" "${S[@]}" --models caracal \
            --set model.mixers.F.fft_impl=torch --out "$WORK/speed_caracal_torchfft"
    else
        runs=("mamba 130" "jamba 130" "mamba2 280")
    fi
    for run in "${runs[@]}"; do
        set -- $run
        step "speed_$1" "$2" "${CARACAL[@]}" "${S[@]}" --models "$1" --out "$WORK/speed_$1"
    done
    for f in "$WORK"/speed_*/speed.json; do cp "$f" "$WORK/$(basename "$(dirname "$f")").json"; done
    collect "$WORK"/speed_*.json "$WORK/status.log"
    cat "$WORK/status.log"
    ;;
decode)
    # Issue 22: every family's graph path against its eager step and the full forward (TESTS=0 skips them: ~70 s,
    # ~4 min with the compiled step's), then the decode table of each model in MODELS (contexts LENGTHS, the paths
    # IMPLS, batch 1 and 64), merged into one report, and one mixer's step against its floor (MIXER=1). Each
    # model runs in one process (--no-isolate): mamba_ssm autotunes once per shape, not once per point.
    [ "${TESTS:-1}" = 1 ] && step gputests_decode 300 python3 -m pytest -v -rs -p no:cacheprovider -m gpu \
        tests/gpu/test_decode_graphs.py
    [ "${MIXER:-0}" = 1 ] && step decode_mixer 90 env OUT="$WORK" python3 scripts/bench_decode_mixer.py \
        --kinds mhf mhf-torch attention mamba mamba2 --steps 32
    merged=()
    for model in ${MODELS:-llama caracal swh}; do
        step "decode_$model" "${LIMIT:-200}" "${CARACAL[@]}" speed --size small --mode decode --models "$model" \
            --lengths "${LENGTHS:-512,1024,2048,4096,8192,16384}" --decode-impl "${IMPLS:-eager,graph,compiled}" \
            --decode-batch 1,64 --no-isolate --repeats 3 --warmup 1 --decode-tokens 32 --out "$WORK/decode_$model"
        [ -f "$WORK/decode_$model/speed.json" ] && merged+=(--merge "$WORK/decode_$model/speed.json")
    done
    [ ${#merged[@]} -gt 0 ] && step decode_merged 60 "${CARACAL[@]}" speed "${merged[@]}" --out "$WORK/decode"
    cp "$WORK/decode/speed.json" "$WORK/decode.json" 2>/dev/null
    collect "$WORK"/{gputests_decode,decode_merged,decode_mixer,status}.log "$WORK/decode.json" "$WORK/decode_mixer.json"
    grep -E "PASSED|FAILED|SKIPPED|ERROR|passed|failed" "$WORK/gputests_decode.log" | tail -n 20
    cat "$WORK/decode_merged.log"
    ;;
long)
    # Issue 21's long contexts: caracal (auto: torch.fft past 16,384), caracal with the Triton long path
    # (fft_impl fast) and llama at small, 131,072 tokens per step (batch 1 at L = 131,072), one run; then the
    # bare convolution at those lengths.
    printf 'inherit: small\nmodel: {mixers: {F: {kind: mhf, fft_impl: fast}, A: {kind: attention, window: 256}}}\n' > "$WORK/caracal-fast.yaml"
    # COMPILE=1: the same sweep with --compile (the torch.fft path stays eager inside the compiled model).
    # OTHER="DIR …": first, caracal alone from each of those trees (copies of earlier commits in carried, ignored
    # folders: `git archive REV | tar -x -C .gpudata/before`), the "before" of the same call.
    L_ARGS=(--size small --lengths "${LENGTHS:-32768,65536,131072}" --tokens-per-step 131072 --repeats 3 --warmup 1
            --no-isolate $([ "${COMPILE:-0}" = 1 ] && echo --compile))
    for dir in ${OTHER:-}; do
        other=$(realpath "$dir") || exit 2
        step "speed_long_$(basename "$other")" "${LIMIT:-300}" env -C "$other" PYTHONPATH="/tmp/site:$other" \
            python3 -m caracal_cli speed "${L_ARGS[@]}" --models caracal --out "$WORK/speed_long_$(basename "$other")"
        grep -E "train L=" "$WORK/speed_long_$(basename "$other").log" | sed "s/^/$(basename "$other"): /"
    done
    step speed_long "${LIMIT:-300}" "${CARACAL[@]}" speed "${L_ARGS[@]}" \
        --models "caracal,$WORK/caracal-fast.yaml,llama" --out "$WORK/speed_long"
    cp "$WORK/speed_long/speed.json" "$WORK/speed_long.json" 2>/dev/null
    step bench_long 150 env OUT="$WORK" python3 scripts/bench_fftconv.py --lengths 32768 131072 --mhf 32768 131072 \
        --budget-s 120
    collect "$WORK"/{speed_long,bench_long,status}.log "$WORK/speed_long.json" "$WORK/bench_fftconv.json" \
        "$WORK"/speed_long_*.log
    grep -E "train L=|ratio" "$WORK/speed_long.log"
    tail -n 20 "$WORK/bench_long.log"
    ;;
mhf)
    # Issue 21: the fused MHF kernels' GPU tests; the module alone with the composition, the kernels where auto
    # puts them, and the kernels everywhere (fast), eager and compiled, kernels by name; then caracal vs llama at
    # small with the composition as a third model (a preset file), eager and compiled, one run each.
    step gputests_mhf 150 python3 -m pytest -v -rs -p no:cacheprovider -m gpu tests/gpu/test_mhf_fused.py
    step profile_mixer 200 python3 scripts/profile_mixer.py --d-model 768 --n-head 12 --lengths 512 2048 --compile \
        --impls torch auto fast --parts module --json "$WORK/profile_mixer.json"
    printf 'inherit: small\nmodel: {mixers: {F: {kind: mhf, module_impl: torch}, A: {kind: attention, window: 256}}}\n' > "$WORK/caracal-composition.yaml"
    for flag in "" --compile; do
        name=speed_mhf${flag:+_compiled}
        step "$name" "${LIMIT:-240}" "${CARACAL[@]}" speed --size small --models "caracal,llama,$WORK/caracal-composition.yaml" \
            --lengths "${LENGTHS:-512,2048,8192}" $flag --out "$WORK/$name"
        cp "$WORK/$name/speed.json" "$WORK/$name.json" 2>/dev/null
    done
    collect "$WORK"/{gputests_mhf,profile_mixer,speed_mhf,speed_mhf_compiled,status}.log "$WORK"/profile_mixer.json \
        "$WORK"/speed_mhf.json "$WORK"/speed_mhf_compiled.json
    grep -E "passed|failed" "$WORK/gputests_mhf.log" | tail -n 3
    grep -vE "^ {40}" "$WORK/profile_mixer.log" | grep -E "^(torch|auto|fast)"
    grep -E "train L=|ratio" "$WORK/speed_mhf.log" "$WORK/speed_mhf_compiled.log"
    ;;
train)
    step train_compare 420 env TOKENS=${TOKENS:-26214400} RUNS=/tmp/compare bash scripts/gpu_train_compare.sh
    for preset in llama-tiny tiny; do
        cp "/tmp/compare/$preset/metrics.jsonl" "$WORK/metrics_$preset.jsonl" 2>/dev/null
        step "profile_$preset" 120 python3 scripts/profile_step.py --preset "$preset" --compile \
            --json "$WORK/profile_$preset.json"
    done
    collect /tmp/compare/summary.json "$WORK"/{train_compare,status}.log "$WORK"/metrics_*.jsonl "$WORK"/profile_*.json
    tail -n 4 "$WORK/train_compare.log"; tail -n 32 "$WORK/profile_llama-tiny.log" "$WORK/profile_tiny.log"
    ;;
mfu)
    # Where llama-tiny's MFU can come from: micro-batch 32 and 64, torch.compile's default and autotuned modes;
    # and tiny (Caracal) at both micro-batches. One line each at the end.
    for run in "llama-tiny 32 default 90" "llama-tiny 64 default 100" "llama-tiny 64 max-autotune-no-cudagraphs 180" \
               "tiny 32 default 100" "tiny 64 default 100"; do
        set -- $run
        step "profile_$1_mb$2_$3" "$4" python3 scripts/profile_step.py --preset "$1" --micro-batch "$2" --compile \
            --compile-mode "$3" --json "$WORK/profile_$1_mb$2_$3.json"
    done
    collect "$WORK"/profile_*_mb*.json "$WORK/status.log"
    grep -h " on NVIDIA" "$WORK"/profile_*_mb*.log
    ;;
trainer-mfu)
    # 40 optimizer steps each, compiled, no evaluation or checkpoint until the end; the median of the logged
    # steps after the first (compilation) is the number to quote.
    for preset in llama-tiny tiny; do
        step "trainer_$preset" 240 "${CARACAL[@]}" train --preset "$preset" --data "$DATA" --device cuda --compile \
            --out "$WORK/trainer_$preset" --max-steps 40 --set train.eval_every=1000 --set train.checkpoint_every=1000 \
            --set train.eval_tokens=65536 --set train.log_every=5
        python3 -c "import json, statistics, sys; r = [json.loads(l) for l in open(sys.argv[1])]; s = [x for x in r if 'mfu' in x][1:]; print(sys.argv[2], 'median of', len(s), 'steps:', round(statistics.median(x['tokens_per_s'] for x in s)), 'tokens/s, MFU', round(100 * statistics.median(x['mfu'] for x in s), 1), '%')" \
            "$WORK/trainer_$preset/metrics.jsonl" "$preset" | tee -a "$WORK/status.log"
        cp "$WORK/trainer_$preset/metrics.jsonl" "$WORK/metrics_trainer_$preset.jsonl" 2>/dev/null
    done
    collect "$WORK"/metrics_trainer_*.jsonl "$WORK"/trainer_*.log "$WORK/status.log"
    cat "$WORK/status.log"
    ;;
loss)
    step bench_loss 150 env OUT="$WORK" python3 scripts/bench_loss.py
    collect "$WORK"/{bench_loss,status}.log "$WORK/bench_loss.json"
    cat "$WORK/bench_loss.log"
    ;;
kernels)
    # Issue 21 at L = 512: the tunables of MHF's gate convolution (its weight gradient is ~8x its bytes), then
    # the FFT convolution's tiles at 512 and 2048.
    step bench_gate_conv 150 env OUT="$WORK" python3 scripts/bench_gate_conv.py
    step bench_short 200 env OUT="$WORK" python3 scripts/bench_fftconv.py --budget-s 150 --lengths 512 2048 \
        --sweep 512 2048 --mhf 512 --swa
    collect "$WORK"/{bench_gate_conv,bench_short,status}.log "$WORK/bench_gate_conv.json" "$WORK/bench_fftconv.json"
    head -n 30 "$WORK/bench_gate_conv.log"
    grep -E "^(variant|floor|torch|triton|MHF)" "$WORK/bench_short.log" | head -n 30
    ;;
scale)
    for scale in mean sqrt; do
        step "train_scale_$scale" 280 env TOKENS=${TOKENS:-26214400} RUNS=/tmp/scale-$scale SKIP_LLAMA=1 \
            CARACAL_SETS="model.mixers.F.scale=$scale" bash scripts/gpu_train_compare.sh
        cp "/tmp/scale-$scale/tiny/metrics.jsonl" "$WORK/metrics_tiny_scale_$scale.jsonl" 2>/dev/null
    done
    step memory 150 python3 scripts/gpu_memory_check.py large medium medium-4k small llama-large swh-large \
        mamba-large mamba2-large jamba-large
    collect "$WORK"/train_scale_*.log "$WORK"/metrics_tiny_scale_*.jsonl "$WORK"/{memory,status}.log
    tail -n 3 "$WORK"/train_scale_*.log; tail -n 12 "$WORK/memory.log"
    ;;
ablate)
    step ablate 540 "${CARACAL[@]}" ablate --study ratio --size tiny --data "$DATA" --tokens ${TOKENS:-20971520} \
        --set train.global_batch_tokens=131072 --set train.warmup_tokens=1048576 --set train.eval_every=40 \
        --set train.eval_tokens=131072 --set train.checkpoint_every=1000 --device cuda --out "$WORK/ablate"
    collect "$WORK"/ablate/ablation.{md,json} "$WORK"/{ablate,status}.log
    cat "$WORK/ablate/ablation.md"
    ;;
*)
    echo "unknown part $part (tests, bench, compare, speed, speed-ssm, train, mfu, trainer-mfu, loss, scale or ablate)" >&2
    exit 2
    ;;
esac
