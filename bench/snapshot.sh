#!/usr/bin/env bash
# Snapshots and copy-on-write (issue 4): tabula against qcow2 on the same machine in the same
# run.
#
#   1. tabula, large table: a real `tabula controller`; `tabula-bench snapshot` allocates
#      1,000,000 segments of a 1 TiB vdisk in random order through a simulated agent that
#      holds the vdisk, then times snapshot create (wall time, the controller's hold_ms, the
#      hold as the agent saw it, how long write faults on the same and on another vdisk
#      waited), copy-on-write round trips on that table, and snapshot delete. Then a real
#      `tabula agent` holds the table: snapshots are taken without I/O, then while fio runs
#      random 4K reads and writes on it (QD1), and all are deleted the same way; the
#      longest read and write latency is the stall a client sees.
#   2. qcow2, large table: 1 TiB images with 1,000,000 allocated clusters (1M and 64K
#      clusters; allocated with preallocation=metadata, i.e. sequentially, no data
#      written): offline `qemu-img snapshot -c` / `-d` and external overlay creation; then
#      in qemu-storage-daemon over QMP, internal snapshots taken and deleted without I/O,
#      then the same under the fio load, and external overlays under it.
#   3. First write after a snapshot against steady state, on the data path: fio over NBD,
#      QD1, one 4K write at the start of each 1 MiB (segment or cluster), on a fully written
#      image: `tabula serve` (redirect, copy-out, and a clone of the snapshot) and qcow2 in
#      qemu-storage-daemon (1M and 64K clusters; internal snapshot, external overlay),
#      interleaved, ROUNDS rounds, medians.
#
#   bench/snapshot.sh            # about 15 minutes after the build
#   bench/snapshot.sh --quick    # about 4 minutes: 100,000 segments, 256 MiB, one round
#
# Knobs (environment): SEGMENTS, FW_SIZE (part 3 image size), ROUNDS, LIVE (seconds of fio
# before and after each live operation), LIMIT (seconds for everything). Prints markdown.
# Every process it starts is stopped on exit; its files live in one temporary directory.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = --quick ]; then
    SEGMENTS="${SEGMENTS:-100000}" FW_SIZE="${FW_SIZE:-256M}" ROUNDS="${ROUNDS:-1}"
    LIVE="${LIVE:-1}" COW_SAMPLES="${COW_SAMPLES:-300}" LIMIT="${LIMIT:-1200}"
else
    SEGMENTS="${SEGMENTS:-1000000}" FW_SIZE="${FW_SIZE:-2G}" ROUNDS="${ROUNDS:-3}"
    LIVE="${LIVE:-2}" COW_SAMPLES="${COW_SAMPLES:-1000}" LIMIT="${LIMIT:-2700}"
fi
SNAPS=3

for tool in fio qemu-img qemu-storage-daemon nbdinfo python3 timeout; do
    command -v "$tool" >/dev/null || {
        echo "missing $tool (apt-get install fio qemu-utils qemu-system-common libnbd-bin python3)"
        exit 1
    }
done
cargo build --release --quiet -p tabula-bench -p tabula
WORK="$(mktemp -d /var/tmp/tabula-snap-bench.XXXXXX)"
# Private copies: a rebuild in the tree during the run does not swap the binaries.
cp target/release/tabula target/release/tabula-bench "$WORK/"
BIN="$WORK/tabula"
BENCH="$WORK/tabula-bench"
RES="$WORK/results.tsv"
: >"$RES"
# shellcheck source=bench/lib.sh
source bench/lib.sh # (the script runs from the repository root)
now_ms() { echo $(($(date +%s%N) / 1000000)); }
rss_mib() { awk '$1 == "VmRSS:" {printf "%.0f", $2 / 1024}' "/proc/$1/status" 2>/dev/null || echo -; }
bytes() { python3 -c 'import sys;n=sys.argv[1];u={"K":1<<10,"M":1<<20,"G":1<<30,"T":1<<40};print(int(n[:-1])*u[n[-1]] if n[-1] in u else int(n))' "$1"; }
FW_BYTES=$(bytes "$FW_SIZE")
FW_SEGS=$((FW_BYTES >> 20))

# wait_for CMD...: up to 10 s until CMD succeeds.
wait_for() {
    for _ in $(seq 100); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
    return 1
}

# ---- fio ----
# fio_json FILE: the JSON fio wrote (it may print a line before it).
FIO_PY='
import json, sys
def load(path):
    raw = open(path).read()
    return json.loads(raw[raw.index("{"):])
'
# pass_fio URI CASE PHASE ROUND: one 4K write at the start of each 1 MiB, QD1, in order.
pass_fio() {
    local uri=$1 case=$2 phase=$3 round=$4 out="$WORK/pass.json"
    timeout --kill-after=5 "$(within 600)" fio --name=pass --ioengine=nbd --uri="$uri" \
        --rw=write:1020k --bs=4k --number_ios="$FW_SEGS" --size="$FW_BYTES" --iodepth=1 \
        --output-format=json --output="$out" >/dev/null
    python3 -c "$FIO_PY"'
w = load(sys.argv[1])["jobs"][0]["write"]
c = w["clat_ns"]
case, phase, rnd, n = sys.argv[2:6]
assert w["total_ios"] == int(n), (w["total_ios"], n)
print("pass", case, phase, rnd, "%.1f" % (c["mean"] / 1e3), "%.1f" % (c["percentile"]["50.000000"] / 1e3),
      "%.1f" % (c["percentile"]["99.000000"] / 1e3), "%.1f" % (c["max"] / 1e3), sep="\t")
' "$out" "$case" "$phase" "$round" "$FW_SEGS" >>"$RES"
}
# fill_fio URI: writes the whole image once, and flushes (so the steady-state pass does not
# compete with the writeback of the fill).
fill_fio() {
    timeout --kill-after=5 "$(within 300)" fio --name=fill --ioengine=nbd --uri="$1" --rw=write \
        --bs=1M --iodepth=8 --size="$FW_BYTES" --end_fsync=1 --output-format=json >/dev/null
}

# live_op URI LABEL CMD...: random 4K reads (QD1, as fast as they go) and random 4K writes
# (QD1, 100/s) on URI for LIVE s, then CMD (its output in $WORK/op.out), then LIVE s more.
# Records CMD's time (the QMP round trip if CMD printed one as "ms", else its wall time),
# hold_ms if CMD printed one, and the longest read and write. URI "none": no I/O at all.
live_op() {
    local uri=$1 label=$2; shift 2
    if [ "$uri" = none ]; then
        local t0 t1
        t0=$(now_ms)
        timeout --kill-after=5 "$(within 600)" "$@" >"$WORK/op.out"
        t1=$(now_ms)
        record_op - "$label" "$((t1 - t0))"
        return
    fi
    cat >"$WORK/live.fio" <<EOF
[global]
ioengine=nbd
uri=$uri
bs=4k
iodepth=1
time_based=1
runtime=600
randrepeat=0
[reader]
rw=randread
[writer]
rw=randwrite
rate_iops=100
EOF
    fio "$WORK/live.fio" --output-format=json --output="$WORK/live.json" >/dev/null 2>&1 &
    local fio_pid=$!
    PIDS+=("$fio_pid")
    sleep "$LIVE"
    local t0 t1
    t0=$(now_ms)
    timeout --kill-after=5 "$(within 600)" "$@" >"$WORK/op.out"
    t1=$(now_ms)
    sleep "$LIVE"
    kill -INT "$fio_pid" 2>/dev/null || true
    for _ in $(seq 300); do kill -0 "$fio_pid" 2>/dev/null || break; sleep 0.1; done
    stop "$fio_pid"
    record_op "$WORK/live.json" "$label" "$((t1 - t0))"
}
# record_op FIO_JSON|- LABEL WALL_MS: one row of the live table.
record_op() {
    python3 -c "$FIO_PY"'
import re
label, wall = sys.argv[2], sys.argv[3]
out = open(sys.argv[4]).read()
m = re.search(r"\"hold_ms\":\s*([0-9.]+)", out)
hold = "%.0f" % float(m.group(1)) if m else "-"
m = re.search(r"\"ms\":\s*([0-9.]+)", out)
wall = "%.0f" % float(m.group(1)) if m else wall
row = ["live", label, wall, hold]
for job in load(sys.argv[1])["jobs"] if sys.argv[1] != "-" else [None, None]:
    if job is None:
        row += ["-", "-"]
        continue
    side = job["read"] if job["jobname"] == "reader" else job["write"]
    row += ["%.0f" % (side["clat_ns"]["max"] / 1e6), "%.0f" % (side["clat_ns"]["percentile"]["50.000000"] / 1e3)]
print(*row, sep="\t")
' "$1" "$2" "$3" "$WORK/op.out" >>"$RES"
}

# ---- qemu-storage-daemon ----
QMP_PY="$WORK/qmp.py"
cat >"$QMP_PY" <<'EOF'
import json, socket, sys, time
# qmp.py SOCKET COMMAND [JSON-ARGS]: one QMP command; prints its answer with "ms", the time
# from sending it to the answer; fails on an error.
path, cmd = sys.argv[1], sys.argv[2]
args = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
s = socket.socket(socket.AF_UNIX)
s.connect(path)
f = s.makefile("rw")
def recv():
    while True:
        m = json.loads(f.readline())
        if "event" not in m:
            return m
recv()
f.write(json.dumps({"execute": "qmp_capabilities"}) + "\n"); f.flush(); recv()
t0 = time.monotonic()
f.write(json.dumps({"execute": cmd, "arguments": args}) + "\n"); f.flush()
r = recv()
r["ms"] = (time.monotonic() - t0) * 1e3
print(json.dumps(r))
sys.exit(1 if "error" in r else 0)
EOF
qmp() { python3 "$QMP_PY" "$QSD_SOCK" "$@"; }
# start_qsd IMAGE: exports it as nbd://127.0.0.1:$QSD_PORT/img (node disk0); sets QSD_PID.
start_qsd() {
    QSD_PORT=$(free_port)
    QSD_SOCK="$WORK/qmp-$QSD_PORT.sock"
    qemu-storage-daemon --blockdev "driver=file,filename=$1,node-name=file0" \
        --blockdev driver=qcow2,file=file0,node-name=disk0 \
        --nbd-server "addr.type=inet,addr.host=127.0.0.1,addr.port=$QSD_PORT" \
        --export type=nbd,id=e0,node-name=disk0,name=img,writable=on \
        --chardev "socket,path=$QSD_SOCK,server=on,wait=off,id=m0" --monitor chardev=m0 \
        >>"$WORK/qsd.log" 2>&1 &
    QSD_PID=$!
    PIDS+=("$QSD_PID")
    wait_for qmp query-version || { echo "qemu-storage-daemon failed:"; cat "$WORK/qsd.log"; exit 1; }
    QSD_URI="nbd://127.0.0.1:$QSD_PORT/img"
}
# timed CMD...: runs CMD, prints its wall time in ms.
timed() { local t0; t0=$(now_ms); timeout --kill-after=5 "$(within 600)" "$@" >/dev/null; echo $(($(now_ms) - t0)); }

echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(qemu-img --version | head -1), $(fio --version)"
echo "date: $(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- crates || echo ' (+ uncommitted changes in crates/)'), load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
echo

# ==== 1. tabula, large table ====
CTL_PORT=$(free_port)
CTL_URL="http://127.0.0.1:$CTL_PORT"
# Periodic table replacement off: it would resend the big table in the middle of a measurement.
"$BIN" controller --data-dir "$WORK/big" --api-listen "127.0.0.1:$CTL_PORT" \
    --container-size 2T --refresh-interval 0 2>"$WORK/controller.log" &
CTL_PID=$!
PIDS+=("$CTL_PID")
wait_for "$BIN" --controller "$CTL_URL" status || { echo "tabula controller failed:"; cat "$WORK/controller.log"; exit 1; }
echo "## 1. tabula: snapshots of a 1 TiB vdisk with $SEGMENTS segments allocated in random order"
echo
echo "### Simulated holder (tabula-bench snapshot)"
echo
timeout --kill-after=5 "$(within 900)" "$BENCH" snapshot --controller "$CTL_URL" \
    --controller-pid "$CTL_PID" --segments "$SEGMENTS" --snapshots "$SNAPS" \
    --cow-samples "$COW_SAMPLES" 2>"$WORK/bench.err" || { cat "$WORK/bench.err"; exit 1; }
echo
echo "redb file after the run: $(du -m "$WORK/big/tabula.redb" | cut -f1) MiB (apparent $(($(stat -c %s "$WORK/big/tabula.redb") >> 20)) MiB)."
echo
# The simulated agents' sessions are over; wait until the controller forgot them (one
# lease plus its sweep), or their leases would be waited out by the next snapshot.
for _ in $(seq 60); do
    n=$("$BIN" --controller "$CTL_URL" status --json | python3 -c 'import json,sys; print(len(json.load(sys.stdin)["agents"]))')
    [ "$n" = 0 ] && break
    sleep 1
done
[ "$n" = 0 ] || { echo "the simulated agents were not forgotten within 60 s"; exit 1; }
NBD_PORT=$(free_port)
"$BIN" --controller "$CTL_URL" agent --nbd-listen "127.0.0.1:$NBD_PORT" --name real \
    2>"$WORK/agent.log" &
AGENT_PID=$!
PIDS+=("$AGENT_PID")
ok=
for _ in $(seq 100); do
    if nbdinfo "nbd://127.0.0.1:$NBD_PORT/big-other" >/dev/null 2>&1; then ok=1; break; fi
    sleep 0.2
done
[ -n "$ok" ] || { echo "the agent never served:"; cat "$WORK/agent.log"; exit 1; }
rss0=$(rss_mib "$AGENT_PID")
t0=$(now_ms)
timeout "$(within 120)" nbdinfo "nbd://127.0.0.1:$NBD_PORT/big" >/dev/null
attach=$(($(now_ms) - t0))
echo "### A real \`tabula agent\` holding the table, under fio"
echo
echo "Attaching the table (nbdinfo, end to end): $attach ms; agent VmRSS $rss0 -> $(rss_mib "$AGENT_PID") MiB."
echo
URI="nbd://127.0.0.1:$NBD_PORT/big"
# Without I/O (i1..), then under fio (r1..); the snapshots accumulate, then all are deleted.
for load in none "$URI"; do
    for i in $(seq "$SNAPS"); do
        if [ "$load" = none ]; then s="i$i" how=" (no I/O)"; else s="r$i" how=; fi
        live_op "$load" "tabula snapshot create big@$s$how" "$BIN" --controller "$CTL_URL" snapshot create big "$s" --json
        echo "mem	tabula after big@$s	$(rss_mib "$CTL_PID")	$(rss_mib "$AGENT_PID")" >>"$RES"
    done
done
for load in none "$URI"; do
    for i in $(seq "$SNAPS"); do
        if [ "$load" = none ]; then s="i$i" how=" (no I/O)"; else s="r$i" how=; fi
        live_op "$load" "tabula snapshot delete big@$s$how" "$BIN" --controller "$CTL_URL" snapshot delete "big@$s"
    done
done
echo "mem	tabula after the deletes	$(rss_mib "$CTL_PID")	$(rss_mib "$AGENT_PID")" >>"$RES"
timeout "$(within 300)" "$BIN" --controller "$CTL_URL" check >"$WORK/check.out" ||
    { echo "tabula check failed:"; cat "$WORK/check.out"; exit 1; }
stop "$AGENT_PID"
stop "$CTL_PID"

# ==== 2. qcow2, large table ====
for cl in 1M 64K; do
    img="$WORK/big-$cl.qcow2"
    qemu-img create -q -f qcow2 -o "cluster_size=$cl,preallocation=metadata" "$img" \
        $((SEGMENTS * $(bytes $cl)))
    qemu-img resize -q "$img" 1T
    alloc=$(qemu-img check "$img" | awk '/allocated/ {print $1}')
    echo "qinfo	$cl	$alloc" >>"$RES"
    for i in $(seq "$SNAPS"); do
        echo "offline	$cl	qemu-img snapshot -c s$i	$(timed qemu-img snapshot -c "s$i" "$img")" >>"$RES"
    done
    echo "offline	$cl	qemu-img create -b (external overlay)	$(timed qemu-img create -f qcow2 -b "$img" -F qcow2 "$WORK/ov.qcow2")" >>"$RES"
    rm -f "$WORK/ov.qcow2"
    for i in $(seq "$SNAPS"); do
        echo "offline	$cl	qemu-img snapshot -d s$i	$(timed qemu-img snapshot -d "s$i" "$img")" >>"$RES"
    done
    start_qsd "$img"
    for i in $(seq "$SNAPS"); do
        live_op none "qcow2 $cl internal snapshot n$i (QMP, no I/O)" python3 "$QMP_PY" "$QSD_SOCK" blockdev-snapshot-internal-sync "{\"device\":\"disk0\",\"name\":\"n$i\"}"
    done
    for i in $(seq "$SNAPS"); do
        live_op none "qcow2 $cl delete internal snapshot n$i (QMP, no I/O)" python3 "$QMP_PY" "$QSD_SOCK" blockdev-snapshot-delete-internal-sync "{\"device\":\"disk0\",\"name\":\"n$i\"}"
    done
    for i in $(seq "$SNAPS"); do
        live_op "$QSD_URI" "qcow2 $cl internal snapshot l$i (QMP)" python3 "$QMP_PY" "$QSD_SOCK" blockdev-snapshot-internal-sync "{\"device\":\"disk0\",\"name\":\"l$i\"}"
    done
    for i in $(seq "$SNAPS"); do
        live_op "$QSD_URI" "qcow2 $cl delete internal snapshot l$i (QMP)" python3 "$QMP_PY" "$QSD_SOCK" blockdev-snapshot-delete-internal-sync "{\"device\":\"disk0\",\"name\":\"l$i\"}"
    done
    top=disk0
    for i in $(seq "$SNAPS"); do
        live_op "$QSD_URI" "qcow2 $cl external overlay o$i (QMP)" python3 "$QMP_PY" "$QSD_SOCK" blockdev-snapshot-sync "{\"node-name\":\"$top\",\"snapshot-file\":\"$WORK/o$i-$cl.qcow2\",\"snapshot-node-name\":\"o$i\",\"format\":\"qcow2\"}"
        top="o$i"
    done
    stop "$QSD_PID"
    rm -f "$img" "$WORK"/o*-"$cl".qcow2
done

# ==== 3. first write after a snapshot, on the data path ====
API_PORT=$(free_port)
SNBD_PORT=$(free_port)
"$BIN" serve --data-dir "$WORK/serve" --nbd-listen "127.0.0.1:$SNBD_PORT" \
    --api-listen "127.0.0.1:$API_PORT" --container-size 32G 2>"$WORK/serve.log" &
SERVE_PID=$!
PIDS+=("$SERVE_PID")
T="$BIN --controller http://127.0.0.1:$API_PORT"
wait_for $T status || { echo "tabula serve failed:"; cat "$WORK/serve.log"; exit 1; }
turi() { echo "nbd://127.0.0.1:$SNBD_PORT/$1"; }

tabula_cycle() { # POLICY ROUND
    local policy=$1 r=$2 v="fw-$1-$2"
    $T vdisk create "$v" --size "$FW_SIZE" --cow "$policy" >/dev/null
    fill_fio "$(turi "$v")"
    pass_fio "$(turi "$v")" "tabula $policy" "1 steady state" "$r"
    $T snapshot create "$v" s --json >"$WORK/op.out"
    python3 -c 'import json,sys; print("create", sys.argv[1], sys.argv[2], "%.2f" % json.load(open(sys.argv[3]))["hold_ms"], sep="\t")' \
        "tabula $policy" "$r" "$WORK/op.out" >>"$RES"
    pass_fio "$(turi "$v")" "tabula $policy" "2 first write after the snapshot" "$r"
    pass_fio "$(turi "$v")" "tabula $policy" "3 second write" "$r"
    if [ "$policy" = redirect ]; then
        $T vdisk clone "$v@s" "$v-c" >/dev/null
        pass_fio "$(turi "$v-c")" "tabula $policy" "4 first write to a clone of it" "$r"
        pass_fio "$(turi "$v-c")" "tabula $policy" "5 second write to the clone" "$r"
        $T vdisk delete "$v-c" >/dev/null
    fi
    $T vdisk delete "$v" --with-snapshots >/dev/null
}

qcow2_cycle() { # CLUSTER ROUND
    local cl=$1 r=$2 img="$WORK/fw-$1-$2.qcow2"
    qemu-img create -q -f qcow2 -o "cluster_size=$cl" "$img" "$FW_SIZE"
    start_qsd "$img"
    fill_fio "$QSD_URI"
    pass_fio "$QSD_URI" "qcow2 $cl" "1 steady state" "$r"
    qmp blockdev-snapshot-internal-sync '{"device":"disk0","name":"s"}' >/dev/null
    pass_fio "$QSD_URI" "qcow2 $cl" "2 first write after the snapshot" "$r"
    pass_fio "$QSD_URI" "qcow2 $cl" "3 second write" "$r"
    qemu-img create -q -f qcow2 -o "cluster_size=$cl" -b "$img" -F qcow2 "$img.ov" "$FW_SIZE"
    qmp blockdev-snapshot-sync "{\"node-name\":\"disk0\",\"snapshot-file\":\"$img.ov\",\"snapshot-node-name\":\"ov\",\"format\":\"qcow2\",\"mode\":\"existing\"}" >/dev/null
    pass_fio "$QSD_URI" "qcow2 $cl" "4 first write to an external overlay" "$r"
    pass_fio "$QSD_URI" "qcow2 $cl" "5 second write to the overlay" "$r"
    stop "$QSD_PID"
    rm -f "$img" "$img.ov"
}

for r in $(seq "$ROUNDS"); do
    tabula_cycle redirect "$r"
    qcow2_cycle 1M "$r"
    tabula_cycle copy-out "$r"
    qcow2_cycle 64K "$r"
done
timeout "$(within 120)" $T check >"$WORK/check.out" || { echo "tabula check failed:"; cat "$WORK/check.out"; exit 1; }
stop "$SERVE_PID"

# ==== report ====
python3 - "$RES" "$SEGMENTS" "$FW_SIZE" "$FW_SEGS" "$ROUNDS" "$LIVE" <<'EOF'
import statistics, sys
from collections import defaultdict
res, segments, fw_size, fw_segs, rounds, live = sys.argv[1:7]
rows = [l.rstrip("\n").split("\t") for l in open(res) if l.strip()]
kind = lambda k: [r[1:] for r in rows if r[0] == k]

print("## Live operations under fio: tabula (a real agent holding the big table) and qcow2 (qemu-storage-daemon)")
print()
print("fio over NBD: random 4K reads at QD1 as fast as they go, and random 4K writes at QD1, 100/s, for %s s before and after each operation (none for the rows marked no I/O). Time: the CLI's wall time for tabula, the QMP command's round trip for qcow2." % live)
print()
print("| operation | time ms | hold_ms | longest read ms | longest write ms | read p50 µs | write p50 µs |")
print("|---|---:|---:|---:|---:|---:|---:|")
for label, wall, hold, rmax, rp50, wmax, wp50 in kind("live"):
    print(f"| {label} | {wall} | {hold} | {rmax} | {wmax} | {rp50} | {wp50} |")
print()
mem = kind("mem")
if mem:
    print("| memory (VmRSS, MiB) | controller | agent |")
    print("|---|---:|---:|")
    for label, c, a in mem:
        print(f"| {label} | {c} | {a} |")
    print()

print("## 2. qcow2: 1 TiB images with %s allocated clusters (preallocation=metadata: sequential, no data)" % segments)
print()
for cl, alloc in kind("qinfo"):
    print(f"- {cl} clusters: qemu-img check: {alloc} clusters allocated")
print()
print("| cluster | offline operation | wall ms |")
print("|---|---|---:|")
for cl, op, ms in kind("offline"):
    print(f"| {cl} | {op} | {ms} |")
print()

print("## 3. First write after a snapshot vs steady state (fio over NBD, QD1, 4K at the start of each 1 MiB, %s image = %s writes per pass, median of %s round(s))" % (fw_size, fw_segs, rounds))
print()
passes = defaultdict(list)
order = []
for case, phase, rnd, mean, p50, p99, mx in kind("pass"):
    if (case, phase) not in passes:
        order.append((case, phase))
    passes[(case, phase)].append(tuple(map(float, (mean, p50, p99, mx))))
med = lambda v, i: statistics.median(x[i] for x in v)
print("| system | pass | mean µs | p50 µs | p99 µs | max µs | mean / steady |")
print("|---|---|---:|---:|---:|---:|---:|")
cases = []
for case, _ in order:
    if case not in cases:
        cases.append(case)
for case, phase in [(c, p) for c in cases for p in sorted(p for (c2, p) in order if c2 == c)]:
    v = passes[(case, phase)]
    base = passes.get((case, "1 steady state"))
    ratio = "%.1fx" % (med(v, 0) / med(base, 0)) if base else "-"
    print(f"| {case} | {phase[2:]} | {med(v,0):.0f} | {med(v,1):.0f} | {med(v,2):.0f} | {med(v,3):.0f} | {ratio} |")
print()
holds = kind("create")
if holds:
    by = defaultdict(list)
    for case, rnd, h in holds:
        by[case].append(float(h))
    print("tabula hold_ms of these snapshots (fully written %s vdisk, one agent, median): " % fw_size +
          ", ".join(f"{c} {statistics.median(v):.2f}" for c, v in by.items()))
    print()
EOF
echo "load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)"
