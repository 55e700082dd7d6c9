# Shared by gpu_acceptance.sh and gpu_multi_acceptance.sh (sourced, after WORK is set): how a part runs a step
# under a time limit and hands its results back.

mkdir -p "$WORK"

collect() {  # collect FILE…: copy each existing file to $OUT (the device tool's folder), named by its path in $WORK
    [ -n "${OUT:-}" ] && for f in "$@"; do [ -f "$f" ] && cp "$f" "$OUT/$(echo "${f#$WORK/}" | tr / _)"; done
    true
}

step() {  # step NAME SECONDS COMMAND…: run with a limit, log to $WORK/NAME.log, say how it ended
    local name=$1 limit=$2; shift 2
    # -k: a trainer that catches SIGTERM to write its checkpoint is killed 10 s later if it is still running
    timeout -k 10 "$limit" "$@" > "$WORK/$name.log" 2>&1
    echo "$name: exit $?" | tee -a "$WORK/status.log"
}
