# Shared by the bench scripts (sourced, not run). Expects WORK (a temporary directory the
# script owns) and LIMIT (seconds for everything) to be set first.
#
# PIDS: processes the script started; on exit they are stopped and WORK is removed.
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    rm -rf "$WORK"
}
trap cleanup EXIT
# stop PID: ends a process this script started, and forgets it.
stop() {
    local p=$1 keep=() q
    kill "$p" 2>/dev/null || true
    wait "$p" 2>/dev/null || true
    for q in "${PIDS[@]}"; do [ "$q" = "$p" ] || keep+=("$q"); done
    PIDS=("${keep[@]}")
}
trap 'exit 130' INT TERM

DEADLINE=$((SECONDS + LIMIT))
# within N: N seconds, or what is left of LIMIT if less (at least 1).
within() { local left=$((DEADLINE - SECONDS)); [ "$left" -lt "$1" ] && echo $((left > 1 ? left : 1)) || echo "$1"; }
free_port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }
