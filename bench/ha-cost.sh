#!/usr/bin/env bash
# The price of replicated commits (issue 18, "Benchmarks"): write-fault round trip and
# allocation rate (`tabula-bench faults`, simulated agents over the real gRPC channel) against
# a single `tabula controller` and against 3 `tabula controller --etcd` on a 3-member etcd
# (agents given every controller's address), same run, interleaved ROUNDS times. Prints
# each run's row, then the median rates and the HA/single ratio per agent count.
#
#   bench/ha-cost.sh                 # ~7 minutes after the build
#   SECS=3 ROUNDS=1 bench/ha-cost.sh # quick look
#   ETCD_MEMBERS=1 bench/ha-cost.sh  # etcd without its own replication (not highly available)
set -euo pipefail
cd "$(dirname "$0")/.."

SECS="${SECS:-8}"       # measured seconds per run (plus 1 s warm-up)
ROUNDS="${ROUNDS:-2}"   # each configuration this many times, alternating modes
AGENTS="${AGENTS:-1 4 16 64}"
SEG="${SEG:-1M}"
LIMIT="${LIMIT:-600}"
ETCD_MEMBERS="${ETCD_MEMBERS:-3}" # 1: what etcd costs without its own replication

for tool in etcd etcdctl python3 curl timeout; do
    command -v "$tool" >/dev/null || { echo "missing $tool (apt-get install etcd-server etcd-client python3 curl coreutils)"; exit 1; }
done
[ -n "${NO_BUILD:-}" ] || cargo build --release --quiet -p tabula-bench -p tabula
BIN="$PWD/target/release/tabula"
BENCH="$PWD/target/release/tabula-bench"
WORK="$(mktemp -d /var/tmp/tabula-ha-cost.XXXXXX)"
# shellcheck source=bench/lib.sh
source bench/lib.sh # (the script runs from the repository root)

wait_api() { # url pid log
    for _ in $(seq 200); do
        curl -s --max-time 0.5 -o /dev/null "$1/v1/status" && return 0
        kill -0 "$2" 2>/dev/null || break
        sleep 0.1
    done
    echo "controller at $1 failed to start:"; tail -20 "$3"; exit 1
}

# Single mode.
port=$(free_port)
"$BIN" controller --data-dir "$WORK/single" --api-listen "127.0.0.1:$port" --container-size 4T \
    2>"$WORK/single.log" &
SINGLE_PID=$!
PIDS+=("$SINGLE_PID")
SINGLE="http://127.0.0.1:$port"
wait_api "$SINGLE" "$SINGLE_PID" "$WORK/single.log"

# HA: 3 controllers on a 3-member etcd; c0 starts first and leads.
start_etcd "$ETCD_MEMBERS"
HA=""
declare -a HA_PID
for i in 0 1 2; do
    port=$(free_port)
    "$BIN" controller --etcd "$ETCD" --name "c$i" --data-dir "$WORK/c$i" \
        --api-listen "127.0.0.1:$port" 2>"$WORK/c$i.log" &
    HA_PID[i]=$!
    PIDS+=("${HA_PID[i]}")
    HA+="${HA:+,}http://127.0.0.1:$port"
    wait_api "http://127.0.0.1:$port" "${HA_PID[i]}" "$WORK/c$i.log"
    if [ "$i" = 0 ]; then
        for _ in $(seq 200); do
            curl -s --max-time 0.5 "http://127.0.0.1:$port/v1/ha" | grep -q '"role":"leader"' && break
            sleep 0.1
        done
    fi
done
LEADER_PID=${HA_PID[0]}
curl -s "${HA%%,*}/v1/ha" | grep -q '"role":"leader"' || { echo "c0 does not lead"; exit 1; }
# An HA control plane has no default container (--container-size is single-mode only): a
# file container of the same size as the single controller's default one.
"$BIN" --controller "$HA" container add pool --path "$WORK/ha-pool.img" --size 4T >/dev/null

applied() { curl -s --max-time 2 "${HA%%,*}/v1/ha" | python3 -c 'import json,sys; print(json.load(sys.stdin)["applied"])'; }
# ticks PID...: user + system CPU of the processes so far, in clock ticks (1/100 s).
ticks() { local t=0 p; for p in "$@"; do t=$((t + $(awk '{print $14 + $15}' "/proc/$p/stat"))); done; echo "$t"; }
: >"$WORK/ha-extra"

echo "machine: $(nproc) cores, load average at start: $(cut -d' ' -f1-3 /proc/loadavg); etcd members: $ETCD_MEMBERS; $SEG segments, own vdisk per agent, ${SECS} s per run"
echo
echo "## Write faults: single controller vs 3 controllers on etcd"
echo
: >"$WORK/rows"
header=--header
for r in $(seq "$ROUNDS"); do
    for n in $AGENTS; do
        for mode in single ha; do
            if [ "$mode" = single ]; then url=$SINGLE; pid=$SINGLE_PID; else url=$HA; pid=$LEADER_PID; fi
            # Where the time goes in HA: records committed (batches) and CPU of etcd and
            # the standbys over the whole invocation (setup and warm-up included).
            rec0=$(applied); cpu0=$(ticks "${ETCD_PIDS[@]}"); sb0=$(ticks "${HA_PID[1]}" "${HA_PID[2]}")
            row=$(timeout --kill-after=5 "$(within $((SECS + 60)))" "$BENCH" faults --controller "$url" \
                --agents "$n" --seconds "$SECS" --segment-size "$SEG" --prefix "r$r-$mode-$n" \
                --controller-pid "$pid" $header)
            header=
            printf '%s\n' "$row" | sed "s/^| own vdisk/| $mode/"
            printf '%s %s %s\n' "$mode" "$n" "$(printf '%s\n' "$row" | tail -1)" >>"$WORK/rows"
            if [ "$mode" = ha ]; then
                echo "$n $(( $(applied) - rec0 )) $(( $(ticks "${ETCD_PIDS[@]}") - cpu0 )) $(( $(ticks "${HA_PID[1]}" "${HA_PID[2]}") - sb0 ))" >>"$WORK/ha-extra"
            fi
        done
    done
done
echo
python3 - "$WORK/rows" <<'EOF'
import statistics, sys
rate = {}
p50 = {}
for line in open(sys.argv[1]):
    mode, n, row = line.split(" ", 2)
    cols = [c.strip() for c in row.strip().strip("|").split("|")]
    rate.setdefault((mode, int(n)), []).append(float(cols[4]))
    p50.setdefault((mode, int(n)), []).append(float(cols[5]))
print("| agents | single: alloc/s | HA: alloc/s | **HA / single** | single p50 µs | HA p50 µs |")
print("|---:|---:|---:|---:|---:|---:|")
for n in sorted({n for _, n in rate}):
    s, h = statistics.median(rate[("single", n)]), statistics.median(rate[("ha", n)])
    print(f"| {n} | {s:.0f} | {h:.0f} | **{h / s:.2f}x** | {statistics.median(p50[('single', n)]):.0f} | {statistics.median(p50[('ha', n)]):.0f} |")
EOF
echo
python3 - "$WORK/rows" "$WORK/ha-extra" "$SECS" <<'EOF'
import statistics, sys
secs = float(sys.argv[3])
faults = {}
for line in open(sys.argv[1]):
    mode, n, row = line.split(" ", 2)
    if mode == "ha":
        cols = [c.strip() for c in row.strip().strip("|").split("|")]
        faults.setdefault(int(n), []).append(int(cols[3]))
runs = {}
for line in open(sys.argv[2]):
    n, rec, etcd, sb = (int(x) for x in line.split())
    runs.setdefault(n, []).append((rec, etcd, sb))
print("HA, where the time goes (per invocation; faults = those in the window scaled by (window + 1 s warm-up) / window; one record per vdisk created is taken off):")
print()
print("| agents | records committed (median) | faults per record (batch) | etcd CPU µs/fault (all members) | standbys CPU µs/fault (2) |")
print("|---:|---:|---:|---:|---:|")
for n in sorted(runs):
    tot = [f * (secs + 1) / secs for f in faults[n]]
    rec = [r for r, _, _ in runs[n]]
    batch = [t / max(1, r - n) for t, r in zip(tot, rec)]
    etcd = [e * 1e4 / t for t, (_, e, _) in zip(tot, runs[n])]
    sb = [s * 1e4 / t for t, (_, _, s) in zip(tot, runs[n])]
    print(f"| {n} | {statistics.median(rec):.0f} | {statistics.median(batch):.2f} | {statistics.median(etcd):.0f} | {statistics.median(sb):.0f} |")
EOF
"$BIN" --controller "$SINGLE" check >/dev/null || { echo "tabula check failed (single)"; exit 1; }
"$BIN" --controller "$HA" check >/dev/null || { echo "tabula check failed (HA)"; exit 1; }
echo
echo "load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)"
