#!/usr/bin/env bash
# Drain throughput: a vdisk (and a snapshot sharing all of it) and a second vdisk, all
# filled in the default container, are drained, live, to a remote container served by
# `tabula container serve`; once idle, once while fio writes 4K random to the second vdisk
# (whose runs are being moved under it). fio's rate during the drain is compared with its
# rate just before. The ceiling is the same bytes copied by nbdcopy from a local file to the
# same kind of remote server, in the same run.
#
#   bench/drain.sh               # about 2 minutes
#   SIZE=256M bench/drain.sh     # quick look
set -euo pipefail
cd "$(dirname "$0")/.."

SIZE="${SIZE:-2G}"
LIMIT="${LIMIT:-900}"
for tool in fio nbdcopy python3; do
    command -v "$tool" >/dev/null || { echo "missing $tool (apt-get install fio libnbd-bin)"; exit 1; }
done
cargo build --release --quiet
BIN="$PWD/target/release/tabula"
WORK="$(mktemp -d /var/tmp/tabula-drain.XXXXXX)"
source bench/lib.sh

# fio's write MiB/s from its JSON report (fio may print a line before the JSON).
fio_mib() {
    python3 -c '
import json,sys; raw=open(sys.argv[1]).read(); j=json.loads(raw[raw.index("{"):])["jobs"][0]
print("%.1f" % (j["write"]["bw_bytes"]/2**20))' "$1"
}

# One run: serve, fill, snapshot, add the remote container, drain (with fio load if $1).
# Prints "MiB/s-of-drain fio-MiB/s-during-drain".
run_drain() {
    local load=$1 dir="$WORK/run-$1"
    mkdir -p "$dir"
    local nbd api rport
    nbd=$(free_port); api=$(free_port); rport=$(free_port)
    "$BIN" serve --data-dir "$dir/data" --nbd-listen 127.0.0.1:$nbd --api-listen 127.0.0.1:$api \
        --container-size 8G 2>"$dir/serve.log" &
    PIDS+=($!)
    "$BIN" container serve "$dir/remote.img" --size 8G --listen 127.0.0.1:$rport 2>"$dir/remote.log" &
    PIDS+=($!)
    local t="$BIN --controller http://127.0.0.1:$api"
    for _ in $(seq 100); do $t status >/dev/null 2>&1 && break; sleep 0.1; done
    $t vdisk create vd --size "$SIZE" >/dev/null
    timeout "$(within 300)" fio --name=fill --ioengine=nbd --uri="nbd://127.0.0.1:$nbd/vd" --rw=write \
        --bs=1M --iodepth=8 --size="$SIZE" >/dev/null
    $t snapshot create vd s1 >/dev/null
    $t vdisk create hot --size 512M >/dev/null
    timeout "$(within 300)" fio --name=fill --ioengine=nbd --uri="nbd://127.0.0.1:$nbd/hot" --rw=write \
        --bs=1M --iodepth=8 --size=512M >/dev/null
    $t container add remote --uri "nbd://127.0.0.1:$rport/disk0" >/dev/null
    local fio_pid="" before="-"
    local job=(--name=load --ioengine=nbd --uri="nbd://127.0.0.1:$nbd/hot" --rw=randwrite --bs=4k
        --iodepth=8 --size=512M --time_based --output-format=json)
    if [ "$load" = load ]; then
        timeout "$(within 60)" fio "${job[@]}" --runtime=5 >"$dir/before.json" 2>/dev/null
        before=$(fio_mib "$dir/before.json")
        timeout "$(within 300)" fio "${job[@]}" --runtime=600 >"$dir/fio.json" 2>/dev/null &
        fio_pid=$!
        sleep 1
    fi
    timeout "$(within 600)" $t container drain default >/dev/null 2>"$dir/drain.err"
    local rate
    rate=$($t container show default --json | python3 -c '
import json,sys; d=json.load(sys.stdin)["drain"]; print("%.1f" % (d["moved"]/2**20/(d["elapsed_ms"]/1000)))')
    local fio_rate="-"
    if [ -n "$fio_pid" ]; then
        kill -INT "$fio_pid" 2>/dev/null || true
        wait "$fio_pid" 2>/dev/null || true
        fio_rate=$(fio_mib "$dir/fio.json")
    fi
    $t check >/dev/null
    echo "$rate $fio_rate $before"
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    PIDS=()
}

# The ceiling: nbdcopy of the same number of bytes, file to a fresh remote server.
copy_ceiling() {
    local port; port=$(free_port)
    "$BIN" container serve "$WORK/ceiling.img" --size 8G --listen 127.0.0.1:$port 2>/dev/null &
    PIDS+=($!)
    sleep 1
    local bytes start end
    bytes=$(numfmt --from=iec "$SIZE")
    dd if=/dev/urandom of="$WORK/src.img" bs=1M count=$((bytes >> 20)) status=none
    start=$(date +%s.%N)
    nbdcopy "$WORK/src.img" "nbd://127.0.0.1:$port/disk0" 2>/dev/null
    end=$(date +%s.%N)
    python3 -c "print('%.1f' % ($bytes/2**20/($end-$start)))"
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    PIDS=()
}

# (Redirected, not in a subshell, so the cleanup trap sees every process started.)
run_drain idle >"$WORK/idle.out"
run_drain load >"$WORK/load.out"
copy_ceiling >"$WORK/ceiling.out"
read -r idle _ <"$WORK/idle.out"
read -r busy fio_during fio_before <"$WORK/load.out"
read -r ceiling <"$WORK/ceiling.out"
echo "drain of $SIZE (a vdisk and a snapshot sharing it) + 512M (a second vdisk), default container -> tabula container serve:"
echo "  idle:               $idle MiB/s"
echo "  under fio 4K randwrite QD8: $busy MiB/s"
echo "  fio on a vdisk being drained: $fio_during MiB/s during the drain, $fio_before MiB/s just before"
echo "  nbdcopy file -> same server: $ceiling MiB/s"
python3 -c "print('  drain / nbdcopy: idle %.2fx, under fio %.2fx' % ($idle/$ceiling, $busy/$ceiling))"
