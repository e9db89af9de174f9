#!/usr/bin/env bash
# Distributed-mode benchmarks (issue 3, item 6), against a real `tabula controller` process
# over the real gRPC channel:
#
#   1. fault round trip p50/p99/p999 and allocation rate with 1, 4 and 16 simulated agents
#      (`tabula-bench faults`), each on its own vdisk and all on one shared vdisk, with 4K
#      and 1M segments;
#   2. time for a fresh agent to get a table of ~1,000,000 entries (`tabula-bench table`);
#   3. memory of a real `tabula agent` per million entries (VmRSS before and after it
#      attaches the big vdisk, through nbdinfo).
#
#   bench/distributed.sh                          # ~6-7 minutes after the build; LIMIT=600 s caps it
#   SECS=3 ENTRIES=100000 bench/distributed.sh    # quick look
#
# Prints markdown tables. Every process it starts is killed on exit.
set -euo pipefail
cd "$(dirname "$0")/.."

SECS="${SECS:-10}"           # measured seconds per faults run (plus 1 s warm-up)
ENTRIES="${ENTRIES:-1000000}" # table size to build
BUDGET="${BUDGET:-200}"       # seconds allowed for building it; what is reached is measured
RUNS="${RUNS:-5}"             # fresh agents timed on the big table
INFLIGHT="${INFLIGHT:-128}"   # faults in flight while building
LIMIT="${LIMIT:-600}"         # seconds for everything after the build

for tool in nbdinfo python3 timeout; do
    command -v "$tool" >/dev/null || { echo "missing $tool (apt-get install libnbd-bin python3 coreutils)"; exit 1; }
done
cargo build --release --quiet -p tabula-bench -p tabula
BIN="$PWD/target/release/tabula"
BENCH="$PWD/target/release/tabula-bench"
WORK="$(mktemp -d /var/tmp/tabula-dist-bench.XXXXXX)"
# shellcheck source=bench/lib.sh
source bench/lib.sh # (the script runs from the repository root)

# start_controller NAME [extra args]: sets CTL_PID and CTL_URL.
start_controller() {
    local name=$1; shift
    local port; port=$(free_port)
    "$BIN" controller --data-dir "$WORK/$name" --api-listen "127.0.0.1:$port" \
        --container-size 4T "$@" 2>"$WORK/$name.log" &
    CTL_PID=$!
    PIDS+=("$CTL_PID")
    CTL_URL="http://127.0.0.1:$port"
    for _ in $(seq 100); do
        "$BIN" --controller "$CTL_URL" status >/dev/null 2>&1 && return 0
        kill -0 "$CTL_PID" 2>/dev/null || break
        sleep 0.1
    done
    echo "tabula controller failed to start:"; cat "$WORK/$name.log"; exit 1
}


kib() { awk -v k="$2" '$1 == k":" {print $2}' "/proc/$1/status"; }

echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
echo

# ---- 1. fault round trip and allocation rate ----
start_controller faults
echo "## Write faults: round trip and allocation rate (${SECS} s per row, after 1 s warm-up)"
echo
header=--header
for seg in 4K 1M; do
    for mode in own shared; do
        for n in 1 4 16; do
            [ "$mode" = shared ] && [ "$n" = 1 ] && continue
            extra=()
            [ "$mode" = shared ] && extra=(--shared)
            timeout --kill-after=5 "$(within $((SECS + 40)))" "$BENCH" faults --controller "$CTL_URL" \
                --agents "$n" --seconds "$SECS" --segment-size "$seg" "${extra[@]}" \
                --prefix "f-$seg-$mode-$n" --controller-pid "$CTL_PID" $header
            header=
        done
    done
done
"$BIN" --controller "$CTL_URL" check >/dev/null || { echo "tabula check failed after the fault runs"; exit 1; }
stop "$CTL_PID"
echo

# ---- 2. distributing a big table ----
# Periodic table replacement is off here so that it does not resend the big table to every
# holder in the middle of a measurement.
start_controller table --refresh-interval 0
echo "## Distributing a table of ~${ENTRIES} entries (4K segments, every other one written)"
echo
# Leave time for the measurements after the build.
left=$((DEADLINE - SECONDS - 90))
budget=$((BUDGET < left ? BUDGET : left))
[ "$budget" -ge 10 ] || { echo "not enough of LIMIT=$LIMIT s left to build the table"; exit 1; }
timeout --kill-after=5 "$(within $((budget + 150)))" "$BENCH" table --controller "$CTL_URL" \
    --entries "$ENTRIES" --name big --budget "$budget" --runs "$RUNS" --inflight "$INFLIGHT" \
    --controller-pid "$CTL_PID"
echo

# ---- 3. agent memory per million entries ----
NBD_PORT=$(free_port)
"$BIN" --controller "$CTL_URL" agent --nbd-listen "127.0.0.1:$NBD_PORT" --name mem \
    2>"$WORK/agent.log" &
AGENT_PID=$!
PIDS+=("$AGENT_PID")
# Attaching the small probe vdisk first puts the session, the container file and the NBD
# server into the baseline; what the big one adds is its table.
ok=
for _ in $(seq 100); do
    if nbdinfo "nbd://127.0.0.1:$NBD_PORT/big-probe" >/dev/null 2>&1; then ok=1; break; fi
    sleep 0.2
done
[ -n "$ok" ] || { echo "the agent never served big-probe:"; cat "$WORK/agent.log"; exit 1; }
sleep 1
rss0=$(kib "$AGENT_PID" VmRSS)
t0=$(date +%s.%N)
timeout "$(within 120)" nbdinfo "nbd://127.0.0.1:$NBD_PORT/big" >/dev/null
t1=$(date +%s.%N)
sleep 1
rss1=$(kib "$AGENT_PID" VmRSS)
hwm=$(kib "$AGENT_PID" VmHWM)
entries=$("$BIN" --controller "$CTL_URL" vdisk show big --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["entries"])')
echo "## Agent memory (a real \`tabula agent\` process attaching the table through nbdinfo)"
echo
python3 - "$entries" "$rss0" "$rss1" "$hwm" "$t0" "$t1" <<'EOF'
import sys
n, rss0, rss1, hwm = (int(x) for x in sys.argv[1:5])
t0, t1 = float(sys.argv[5]), float(sys.argv[6])
mib = lambda k: k / 1024
per_m = lambda k: k / 1024 * 1e6 / n
print("| measure | value |")
print("|---|---:|")
print(f"| entries | {n} |")
print(f"| VmRSS before (probe vdisk attached) | {mib(rss0):.1f} MiB |")
print(f"| VmRSS after attaching the table | {mib(rss1):.1f} MiB |")
print(f"| **per million entries (RSS growth)** | **{per_m(rss1 - rss0):.0f} MiB** |")
print(f"| peak (VmHWM) growth per million entries, while decoding | {per_m(hwm - rss0):.0f} MiB |")
print(f"| nbdinfo on the table's vdisk, end to end (attach included) | {(t1 - t0) * 1e3:.0f} ms |")
EOF
"$BIN" --controller "$CTL_URL" check >/dev/null || { echo "tabula check failed after the table run"; exit 1; }
echo
echo "load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)"
