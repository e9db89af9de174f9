#!/usr/bin/env bash
# Compares `tabula serve` with nbdkit's file plugin on the same machine in the same run,
# using fio's NBD engine over TCP loopback. Each job runs on both servers, interleaved,
# ROUNDS times; the script prints medians and the tabula/nbdkit ratio.
#
#   bench/fio-compare.sh              # ~6 minutes
#   RUNTIME=10 ROUNDS=1 bench/fio-compare.sh   # quick look
set -euo pipefail
cd "$(dirname "$0")/.."

RUNTIME="${RUNTIME:-20}"
ROUNDS="${ROUNDS:-3}"
SIZE="${SIZE:-1G}"
for tool in fio nbdkit python3; do
    command -v "$tool" >/dev/null || { echo "missing $tool (apt-get install fio nbdkit)"; exit 1; }
done
cargo build --release --quiet
BIN="$PWD/target/release/tabula"
WORK="$(mktemp -d /var/tmp/tabula-bench.XXXXXX)"
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT

TPORT=11809; KPORT=11810; APORT=11700
"$BIN" serve --data-dir "$WORK/tabula" --nbd-listen 127.0.0.1:$TPORT --api-listen 127.0.0.1:$APORT \
    --container-size 8G 2>"$WORK/tabula.log" &
TPID=$!
PIDS+=($TPID)
for _ in $(seq 100); do "$BIN" --controller http://127.0.0.1:$APORT status >/dev/null 2>&1 && break; sleep 0.1; done
kill -0 "$TPID" 2>/dev/null || { echo "tabula serve failed to start:"; cat "$WORK/tabula.log"; exit 1; }
"$BIN" --controller http://127.0.0.1:$APORT vdisk create bench --size "$SIZE" >/dev/null
"$BIN" --controller http://127.0.0.1:$APORT vdisk create fresh --size "$SIZE" >/dev/null

fallocate -l "$SIZE" "$WORK/nbdkit.img"
nbdkit -f -p $KPORT --exit-with-parent file "$WORK/nbdkit.img" 2>"$WORK/nbdkit.log" &
PIDS+=($!)
sleep 1

# fio JOB URI -> prints "MiB/s IOPS p50_us p99_us"
run_fio() {
    local rw=$1 bs=$2 qd=$3 uri=$4 extra=${5:-}
    fio --name=j --ioengine=nbd --uri="$uri" --rw="$rw" --bs="$bs" --iodepth="$qd" \
        --size="$SIZE" --runtime="$RUNTIME" --time_based $extra --output-format=json 2>/dev/null |
    python3 -c '
import json,sys
raw=sys.stdin.read()
j=json.loads(raw[raw.index("{"):])["jobs"][0]  # fio may print a line before the JSON
side=j["write"] if j["write"]["io_bytes"]>0 else j["read"]
cl=side["clat_ns"]["percentile"]
print("%.1f %.0f %.0f %.0f" % (side["bw_bytes"]/2**20, side["iops"], cl["50.000000"]/1000, cl["99.000000"]/1000))'
}

# Fill both so steady-state jobs hit allocated space.
fio --name=fill --ioengine=nbd --uri=nbd://127.0.0.1:$TPORT/bench --rw=write --bs=1M --iodepth=8 --size="$SIZE" >/dev/null
fio --name=fill --ioengine=nbd --uri=nbd://127.0.0.1:$KPORT/ --rw=write --bs=1M --iodepth=8 --size="$SIZE" >/dev/null

declare -A R
JOBS=("randwrite 4k 32" "randread 4k 32" "write 1M 8" "read 1M 8")
for round in $(seq "$ROUNDS"); do
    for job in "${JOBS[@]}"; do
        set -- $job
        R["tabula $job"]+="$(run_fio "$1" "$2" "$3" nbd://127.0.0.1:$TPORT/bench);"
        R["nbdkit $job"]+="$(run_fio "$1" "$2" "$3" nbd://127.0.0.1:$KPORT/);"
    done
done
# First writes: every 4K write lands in unallocated space of a fresh vdisk (bounded by runtime).
FIRST="$(run_fio randwrite 4k 32 nbd://127.0.0.1:$TPORT/fresh)"

python3 - "$ROUNDS" "$FIRST" <<PY
import statistics, sys
rounds=int(sys.argv[1]); first=sys.argv[2].split()
data = {}
$(for k in "${!R[@]}"; do echo "data['$k'] = '${R[$k]}'"; done)
def med(s, i):
    vals=[float(x.split()[i]) for x in s.strip(';').split(';')]
    return statistics.median(vals)
print(f"fio ioengine=nbd over TCP loopback, {rounds} round(s), medians; nbdkit = file plugin on a preallocated raw file")
print(f"{'job':<18} {'server':<7} {'MiB/s':>9} {'IOPS':>9} {'p50 us':>8} {'p99 us':>8} {'ratio':>6}")
for job in ["randwrite 4k 32","randread 4k 32","write 1M 8","read 1M 8"]:
    t=data['tabula '+job]; k=data['nbdkit '+job]
    ratio = med(t,0)/med(k,0)
    for name,s in (("tabula",t),("nbdkit",k)):
        print(f"{job:<18} {name:<7} {med(s,0):>9.1f} {med(s,1):>9.0f} {med(s,2):>8.0f} {med(s,3):>8.0f} {(f'{ratio:.2f}x' if name=='tabula' else ''):>6}")
print(f"{'first-write 4k 32':<18} {'tabula':<7} {float(first[0]):>9.1f} {float(first[1]):>9.0f} {float(first[2]):>8.0f} {float(first[3]):>8.0f}")
PY
