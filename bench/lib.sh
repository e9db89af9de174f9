# Shared by the bench scripts (sourced, not run). Expects WORK (a temporary directory the
# script owns) and LIMIT (seconds for everything) to be set first.
# KEEP=1 in the environment keeps WORK (logs) for a look afterwards.
#
# PIDS: processes the script started; on exit they are stopped and WORK is removed.
PIDS=()
cleanup() {
    local p _
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    # Whatever has not exited 10 s after SIGTERM (a hung process) gets SIGKILL.
    for p in "${PIDS[@]}"; do
        for _ in $(seq 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
        kill -0 "$p" 2>/dev/null && { echo "pid $p ignored SIGTERM for 10 s: SIGKILL" >&2; kill -9 "$p" 2>/dev/null; }
    done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    if [ -n "${KEEP:-}" ]; then echo "kept $WORK" >&2; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
# stop PID: ends a process this script started, and forgets it.
stop() {
    local p=$1 keep=() q
    kill "$p" 2>/dev/null || true
    { wait "$p"; } 2>/dev/null || true # (also silences bash's "Killed" notice)
    for q in "${PIDS[@]}"; do [ "$q" = "$p" ] || keep+=("$q"); done
    PIDS=("${keep[@]}")
}
trap 'exit 130' INT TERM

DEADLINE=$((SECONDS + LIMIT))
# within N: N seconds, or what is left of LIMIT if less (at least 1).
within() { local left=$((DEADLINE - SECONDS)); [ "$left" -lt "$1" ] && echo $((left > 1 ? left : 1)) || echo "$1"; }
free_port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }

# start_etcd [MEMBERS]: an etcd cluster (3 members unless told) on loopback (data in WORK, fast elections as in the
# tests' harness); sets ETCD to the comma-separated client URLs once a write succeeds, and
# ETCD_PIDS.
ETCD_PIDS=()
start_etcd() {
    local i cluster="" ep=() client peer n=${1:-3}
    local -a cp pp
    for ((i = 0; i < n; i++)); do
        cp[i]=$(free_port); pp[i]=$(free_port)
        cluster+="${cluster:+,}m$i=http://127.0.0.1:${pp[i]}"
        ep+=("http://127.0.0.1:${cp[i]}")
    done
    for ((i = 0; i < n; i++)); do
        client="http://127.0.0.1:${cp[i]}"; peer="http://127.0.0.1:${pp[i]}"
        etcd --name "m$i" --data-dir "$WORK/etcd-m$i" \
            --listen-client-urls "$client" --advertise-client-urls "$client" \
            --listen-peer-urls "$peer" --initial-advertise-peer-urls "$peer" \
            --initial-cluster "$cluster" --initial-cluster-token "tabula-bench-$$" \
            --initial-cluster-state new --heartbeat-interval 50 --election-timeout 500 \
            --log-level warn >"$WORK/etcd-m$i.log" 2>&1 &
        PIDS+=($!)
        ETCD_PIDS+=($!)
    done
    ETCD="$(IFS=,; echo "${ep[*]}")"
    for _ in $(seq 200); do
        ETCDCTL_API=3 etcdctl --endpoints "$ETCD" --dial-timeout 1s put /bench-ready 1 >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    echo "etcd did not come up:"; tail -5 "$WORK"/etcd-m*.log; exit 1
}
