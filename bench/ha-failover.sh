#!/usr/bin/env bash
# HA failover under load (issue 18, "Benchmarks"): a 3-member etcd, 3 `tabula controller
# --etcd` processes and 2 `tabula agent`s given every controller's address, all on
# loopback. fio (ioengine=nbd) runs 4K random writes with verification against a vdisk on
# each agent for the whole run, logging every I/O's latency; a prober (bench/nbd_prober.py)
# writes 4K to a new segment every 50 ms (each write is an allocation by the leader). Then,
# KILLS times: kill -9 the leader, time until a standby reports leader (a) and until a first
# write succeeds again (b), the longest fio I/O in that failover (c), probe errors (d);
# restart the killed controller (it rejoins as a standby), wait until every controller has
# applied as much as the leader, next kill.
#
#   bench/ha-failover.sh                       # 10 kills, --election-ttl 1s; ~4 min after the build
#   bench/ha-failover.sh --kills 3 --ttl 2s    # the default election TTL
#   bench/ha-failover.sh --scale 500           # then 500 simulated agents through one more kill
#
# Prints markdown tables. Every process it starts is stopped by pid on exit; LIMIT (seconds,
# default 900) bounds the run after the build.
set -euo pipefail
cd "$(dirname "$0")/.."

KILLS=10
TTL=1s
SCALE=0
while [ $# -gt 0 ]; do
    case "$1" in
    --kills) KILLS=$2; shift 2 ;;
    --ttl) TTL=$2; shift 2 ;;
    --scale) SCALE=$2; shift 2 ;;
    *) echo "usage: $0 [--kills N] [--ttl 1s|2s] [--scale AGENTS]"; exit 2 ;;
    esac
done
LIMIT="${LIMIT:-900}"
SEG=64K            # segment size of the vdisks
SEG_BYTES=65536
RATE="${RATE:-500}" # fio IOPS per agent (the machine has few cores: leave CPU to the control plane)
SETTLE="${SETTLE:-3}" # seconds between a recovery and the next kill

for tool in etcd fio python3 curl timeout; do
    command -v "$tool" >/dev/null || { echo "missing $tool (apt-get install etcd-server fio python3 curl coreutils)"; exit 1; }
done
[ -n "${NO_BUILD:-}" ] || cargo build --release --quiet -p tabula-bench -p tabula
BIN="$PWD/target/release/tabula"
BENCH="$PWD/target/release/tabula-bench"
HELP="python3 $PWD/bench/ha_failover.py"
WORK="$(mktemp -d /var/tmp/tabula-ha-bench.XXXXXX)"
# shellcheck source=bench/lib.sh
source bench/lib.sh # (the script runs from the repository root)

start_etcd # sets ETCD

# ---- controllers ----
declare -a C_PORT C_PID
for i in 0 1 2; do C_PORT[i]=$(free_port); done
CTLS="$(for i in 0 1 2; do printf 'http://127.0.0.1:%s,' "${C_PORT[i]}"; done)"
CTLS="${CTLS%,}"
start_controller() { # index
    local i=$1
    "$BIN" controller --etcd "$ETCD" --name "c$i" --data-dir "$WORK/c$i" \
        --api-listen "127.0.0.1:${C_PORT[i]}" --election-ttl "$TTL" --container-size 4T \
        >>"$WORK/c$i.log" 2>&1 &
    C_PID[i]=$!
    PIDS+=("${C_PID[i]}")
    for _ in $(seq 200); do
        curl -sf --max-time 0.5 "http://127.0.0.1:${C_PORT[i]}/v1/ha" >/dev/null && return 0
        kill -0 "${C_PID[i]}" 2>/dev/null || break
        sleep 0.1
    done
    echo "controller c$i failed to start:"; tail -20 "$WORK/c$i.log"; exit 1
}
start_controller 0
for _ in $(seq 200); do $HELP leader "${C_PORT[@]}" >/dev/null && break; sleep 0.1; done
start_controller 1
start_controller 2
cli() { "$BIN" --controller "$CTLS" "$@"; }
cli container add pool --path "$WORK/pool.img" --size 64G >/dev/null

# ---- agents, vdisks, load ----
declare -a A_PORT
for i in 1 2; do
    A_PORT[i]=$(free_port)
    "$BIN" --controller "$CTLS" agent --nbd-listen "127.0.0.1:${A_PORT[i]}" --name "a$i" \
        --fault-wait 30s >"$WORK/a$i.log" 2>&1 &
    PIDS+=($!)
    cli vdisk create "fio$i" --size 1G --segment-size "$SEG" >/dev/null
done
cli vdisk create probe --size 64G --segment-size "$SEG" >/dev/null
for i in 1 2; do
    ok=
    for _ in $(seq 100); do
        if fio --name=fill --ioengine=nbd --uri="nbd://127.0.0.1:${A_PORT[i]}/fio$i" --rw=write \
            --bs=1M --iodepth=4 --size=64M >"$WORK/fill$i.out" 2>&1; then ok=1; break; fi
        sleep 0.2
    done
    [ -n "$ok" ] || { echo "agent a$i never served fio$i:"; tail "$WORK/a$i.log" "$WORK/fill$i.out"; exit 1; }
done
# The fio region (64 MiB) is allocated now: what fio does from here is allocated I/O.
declare -a FIO_PID
for i in 1 2; do
    fio --name="ha$i" --ioengine=nbd --uri="nbd://127.0.0.1:${A_PORT[i]}/fio$i" --rw=randwrite \
        --bs=4k --iodepth=4 --size=64M --time_based --runtime="$LIMIT" --rate_iops="$RATE" \
        --verify=crc32c --verify_backlog=256 --verify_fatal=1 \
        --write_lat_log="$WORK/fio$i" --log_avg_msec=0 --log_unix_epoch=1 \
        --output-format=json --output="$WORK/fio$i.json" >"$WORK/fio$i.out" 2>&1 &
    FIO_PID[i]=$!
    PIDS+=("${FIO_PID[i]}")
done
python3 bench/nbd_prober.py 127.0.0.1 "${A_PORT[1]}" probe "$SEG_BYTES" 0.05 "$WORK/probe.log" \
    2>"$WORK/probe.err" &
PROBE_PID=$!
PIDS+=("$PROBE_PID")
sleep 5 # a baseline before the first kill

# ---- the kills ----
echo "machine: $(nproc) cores, load average at start: $(cut -d' ' -f1-3 /proc/loadavg); election TTL $TTL; fio $RATE IOPS per agent (x2), iodepth 4, 4K randwrite + crc32c verify; prober 4K first write every 50 ms, $SEG segments"
echo
: >"$WORK/kills"
for k in $(seq "$KILLS"); do
    victim=$($HELP leader "${C_PORT[@]}") || { echo "kill $k: no single leader"; exit 1; }
    t_kill=$(date +%s.%N)
    kill -9 "${C_PID[victim]}"
    stop "${C_PID[victim]}"
    read -r t_leader _ < <($HELP wait-leader "$victim" "$(within 30)" "${C_PORT[@]}") ||
        { echo "kill $k: no new leader"; exit 1; }
    echo "$k c$victim $t_kill $t_leader" >>"$WORK/kills"
    $HELP wait-alloc "$WORK/probe.log" "$t_kill" "$(within 30)" || { echo "kill $k: allocation did not resume"; exit 1; }
    start_controller "$victim"
    $HELP caught-up "$(within 60)" "${C_PORT[@]}" || { echo "kill $k: c$victim did not catch up"; exit 1; }
    for i in 1 2; do kill -0 "${FIO_PID[i]}" 2>/dev/null || { echo "fio $i stopped:"; cat "$WORK/fio$i.out"; exit 1; }; done
    kill -0 "$PROBE_PID" 2>/dev/null || { echo "the prober stopped:"; tail -3 "$WORK/probe.log"; exit 1; }
    sleep "$SETTLE"
done

# ---- stop the load; fio's verdict ----
stop "$PROBE_PID"
for i in 1 2; do
    kill -INT "${FIO_PID[i]}" 2>/dev/null || true
    wait "${FIO_PID[i]}" || true
done
fio_errors=$(python3 - "$WORK/fio1.json" "$WORK/fio2.json" <<'EOF'
import json, sys
n = 0
for p in sys.argv[1:]:
    raw = open(p).read()
    j = json.loads(raw[raw.index("{"):])["jobs"][0]
    n += j["error"] + j.get("total_err", 0)
print(n)
EOF
)
echo "## Failover under load: $KILLS leader kills (kill -9), election TTL $TTL"
echo
$HELP report "$WORK/kills" "$WORK/probe.log" "$WORK"/fio1_lat.*.log "$WORK"/fio2_lat.*.log
echo "- fio errors (I/O or verification, both agents): $fio_errors"
cli check >/dev/null && echo "- tabula check after the run: ok" || { echo "- tabula check after the run: FAILED"; cli check || true; }
echo

# ---- control-plane scale: simulated agents through one more kill ----
if [ "$SCALE" -gt 0 ]; then
    echo "## $SCALE simulated agents (tabula-bench failover) through one leader kill, election TTL $TTL"
    echo
    "$BENCH" failover --controller "$CTLS" --agents "$SCALE" --prefix "sc" \
        --ready-file "$WORK/scale.ready" --killed-file "$WORK/scale.killed" \
        --wait-kill "$(within 600)" --limit 60 >"$WORK/scale.out" 2>"$WORK/scale.err" &
    SC_PID=$!
    PIDS+=("$SC_PID")
    while [ ! -f "$WORK/scale.ready" ]; do
        kill -0 "$SC_PID" 2>/dev/null || { echo "tabula-bench failover stopped:"; cat "$WORK/scale.err"; exit 1; }
        [ "$SECONDS" -lt "$DEADLINE" ] || { echo "out of time setting up $SCALE agents"; exit 1; }
        sleep 0.2
    done
    $HELP caught-up "$(within 60)" "${C_PORT[@]}" || { echo "not caught up before the scale kill"; exit 1; }
    victim=$($HELP leader "${C_PORT[@]}")
    t_kill=$(date +%s.%N)
    kill -9 "${C_PID[victim]}"
    echo "$t_kill" >"$WORK/scale.killed.tmp" && mv "$WORK/scale.killed.tmp" "$WORK/scale.killed"
    stop "${C_PID[victim]}"
    read -r t_leader _ < <($HELP wait-leader "$victim" "$(within 30)" "${C_PORT[@]}") || true
    wait "$SC_PID" && rc=0 || rc=$?
    cat "$WORK/scale.out"
    grep -v '^$' "$WORK/scale.err" | sed 's/^/    /'
    python3 -c "import sys; print(f'- new leader reported {float(sys.argv[2]) - float(sys.argv[1]):.2f} s after the kill')" "$t_kill" "${t_leader:-nan}"
    [ "$rc" = 0 ] || { echo "tabula-bench failover failed ($rc)"; exit 1; }
    echo
fi
echo "load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)"
