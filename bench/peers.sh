#!/usr/bin/env bash
# tabula against its peers (issue 6): one run, same machine, same kind of backing file, same
# client (fio), servers interleaved job by job and round by round so drift hits all alike.
#
#   bench/peers.sh                 # about 13 minutes after the build (3 rounds, 3 s per fio run)
#   QUICK=1 bench/peers.sh         # about 2 minutes: 1 round, 1 s runs, small images (validation)
#   RUNTIME=8 bench/peers.sh       # steadier figures: about 31 minutes (it prints its plan first)
#
# Servers, each on TCP loopback and on a Unix socket (a process per server and transport,
# each with its own backing file or data directory under /var/tmp, on real disk):
#   tabula serve                  controller + agent in one process (sparse 4 TiB container)
#   tabula agent+controller       `tabula controller` + one `tabula agent` (CPU and RSS: both)
#   nbdkit file                   on a preallocated raw file (fallocate, then fully written)
#   qemu-nbd raw                  same kind of file, -f raw --cache=none --aio=native
#   qemu-nbd qcow2                a fresh qcow2 image (64K clusters), --cache=none --aio=native
#   nbdkit null                   no storage: the transport's ceiling (sequential jobs only)
#   fio io_uring direct           fio on a raw file, direct=1, no NBD: the device's limit
# Client: fio ioengine=nbd (nbd://127.0.0.1:PORT/EXPORT, nbd+unix:///EXPORT?socket=PATH).
#
# Jobs (every server, both transports, unless said): sequential 1 MiB write and read at QD8;
# random 4 KiB write and read at QD32 (all on a fully written image: steady state); 4
# connections at once (fio numjobs=4, random 4K write QD8 each); and, over TCP only
# (EXTRA_TRANSPORTS), the thin-provisioning jobs: random 4K first writes to a fresh FRESH_SIZE
# thin vdisk / fresh qcow2 image (nearly every write allocates), random 4K writes right after
# `tabula snapshot create` (tabula; the snapshot is deleted after), and a sequential 1M read
# of a fresh FILL_SIZE vdisk / qcow2 image filled by sequential 1M writes vs one filled by
# random 4K writes (tabula and qcow2).
#
# Figures per server, transport and job, medians of ROUNDS runs: MiB/s, IOPS, p50 and p99
# completion latency, server CPU seconds (utime+stime from /proc/PID/stat) per GiB moved,
# server RSS after the job and its peak so far (VmRSS, VmHWM). Then ratios (see the report).
#
# Knobs (environment): RUNTIME (s per fio run), ROUNDS, SIZE (steady-state images), FRESH_SIZE,
# FILL_SIZE, EXTRA_TRANSPORTS ("tcp" or "tcp unix"), QUICK=1, LIMIT (seconds for everything
# after the build; a hung step fails instead of running on), TABULA_BIN (use this binary
# instead of building), OUT (the results file; default bench/results/peers-DATE.md).
# Needs fio, nbdkit, qemu-nbd, qemu-img, python3: apt-get install fio nbdkit qemu-utils python3.
# Prints the Markdown report and writes it to OUT. Every process it starts is stopped on exit;
# its files live in one temporary directory under /var/tmp, removed on exit.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${QUICK:-0}" = 1 ]; then
    RUNTIME="${RUNTIME:-1}" ROUNDS="${ROUNDS:-1}" SIZE="${SIZE:-256M}"
    FRESH_SIZE="${FRESH_SIZE:-16G}" FILL_SIZE="${FILL_SIZE:-64M}"
else
    RUNTIME="${RUNTIME:-3}" ROUNDS="${ROUNDS:-3}" SIZE="${SIZE:-1G}"
    FRESH_SIZE="${FRESH_SIZE:-128G}" FILL_SIZE="${FILL_SIZE:-128M}"
fi
# About 70 runs a round; twice their time and then some before a hung step is cut short.
LIMIT="${LIMIT:-$((ROUNDS * 70 * (RUNTIME + 2) + 600))}"
EXTRA_TRANSPORTS="${EXTRA_TRANSPORTS:-tcp}"
OUT="${OUT:-bench/results/peers-$(date +%Y-%m-%d-%H%M).md}"

missing=()
for tool in fio nbdkit qemu-nbd qemu-img python3 timeout fallocate; do
    command -v "$tool" >/dev/null || missing+=("$tool")
done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "missing: ${missing[*]}"
    echo "install them with: apt-get install fio nbdkit qemu-utils python3 coreutils util-linux"
    exit 1
fi
fio --enghelp 2>/dev/null | grep -qw nbd || { echo "this fio has no nbd engine (Debian's fio package has it)"; exit 1; }

WORK="$(mktemp -d /var/tmp/tabula-peers.XXXXXX)"
if [ -n "${TABULA_BIN:-}" ]; then
    cp "$TABULA_BIN" "$WORK/tabula"
else
    cargo build --release --quiet -p tabula
    # A private copy: a rebuild in the tree during the run does not swap the binary.
    cp target/release/tabula "$WORK/tabula"
fi
BIN="$WORK/tabula"
# shellcheck source=bench/lib.sh
source bench/lib.sh # (the script runs from the repository root)
START=$SECONDS
RES="$WORK/results.tsv"
: >"$RES"
mkdir -p "$WORK/fio"
LOAD0="$(cut -d' ' -f1-3 /proc/loadavg)"
TCK=$(getconf CLK_TCK)

# ticks PID...: their CPU time (utime + stime), in clock ticks.
ticks() {
    local t=0 p v
    for p in "$@"; do
        v=$(awk '{ sub(/.*\) /, ""); print $12 + $13 }' "/proc/$p/stat" 2>/dev/null || echo 0)
        t=$((t + v))
    done
    echo "$t"
}
# mem PID...: "VmRSS VmHWM" summed, in KiB.
mem() {
    local rss=0 hwm=0 p a b
    for p in "$@"; do
        read -r a b < <(awk '$1 == "VmRSS:" {r = $2} $1 == "VmHWM:" {h = $2} END {print r + 0, h + 0}' "/proc/$p/status" 2>/dev/null || echo "0 0")
        rss=$((rss + a)) hwm=$((hwm + b))
    done
    echo "$rss $hwm"
}

# nbd_ready URI: true once the server at URI answers with the NBD greeting.
NBD_PROBE='
import socket, sys, urllib.parse
u = urllib.parse.urlparse(sys.argv[1])
if u.scheme == "nbd+unix":
    s, addr = socket.socket(socket.AF_UNIX), urllib.parse.parse_qs(u.query)["socket"][0]
else:
    s, addr = socket.socket(), (u.hostname, u.port)
s.settimeout(2)
s.connect(addr)
sys.exit(0 if s.recv(8) == b"NBDMAGIC" else 1)
'
# wait_ready LOG PID CMD...: up to 20 s until CMD succeeds; fails (with the log) if PID dies.
wait_ready() {
    local log=$1 pid=$2 _; shift 2
    for _ in $(seq 200); do
        timeout 5 "$@" >/dev/null 2>&1 && return 0
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    echo "server (pid $pid) not ready: $*" >&2
    tail -n 20 "$log" >&2 || true
    return 1
}

# ---- instances: one server process (or two) per transport ----
# Keys: NAME-TRANSPORT. SERVER[key] display name, TR[key] transport, URI[key] fio's target
# (a URI, or a file for fio direct), SPIDS[key] server pids, CTL[key] tabula admin URL.
declare -A SERVER TR URI SPIDS CTL
DEAD=()
# listen_for TRANSPORT SOCK STYLE: sets LISTEN (args) and TURI (URI without the export).
listen_for() {
    local tr=$1 sock=$2 style=$3 port
    if [ "$tr" = tcp ]; then
        port=$(free_port)
        case $style in
            tabula) LISTEN=(--nbd-listen "127.0.0.1:$port") ;;
            nbdkit) LISTEN=(-i 127.0.0.1 -p "$port") ;;
            qemu) LISTEN=(-b 127.0.0.1 -p "$port") ;;
        esac
        TURI="nbd://127.0.0.1:$port/"
    else
        case $style in
            tabula) LISTEN=(--nbd-listen "unix:$sock") ;;
            nbdkit) LISTEN=(-U "$sock") ;;
            qemu) LISTEN=("--socket=$sock") ;;
        esac
        TURI="nbd+unix:///"
        TQUERY="?socket=$sock"
    fi
}
# uri_for TRANSPORT EXPORT: the full URI (after listen_for).
uri_for() { if [ "$1" = tcp ]; then echo "$TURI$2"; else echo "$TURI$2$TQUERY"; fi; }
# export_uri KEY EXPORT: the URI of another export of a tabula instance.
export_uri() { local u=${URI[$1]}; echo "${u%%bench*}$2${u#*bench}"; }

# start_qemu KEY FORMAT FILE TRANSPORT: qemu-nbd on FILE; sets QPID, QURI.
start_qemu() {
    local key=$1 fmt=$2 file=$3 tr=$4
    listen_for "$tr" "$WORK/$key.sock" qemu
    qemu-nbd -f "$fmt" -t -e 8 --cache=none --aio=native "${LISTEN[@]}" "$file" 2>"$WORK/$key.log" &
    QPID=$!
    PIDS+=("$QPID")
    QURI=$(uri_for "$tr" "")
    wait_ready "$WORK/$key.log" "$QPID" python3 -c "$NBD_PROBE" "$QURI"
}

# start_tabula KEY MODE TRANSPORT: MODE serve or agent; creates vdisk "bench" (SIZE).
start_tabula() {
    local key=$1 mode=$2 tr=$3 api pid apid
    api=$(free_port)
    listen_for "$tr" "$WORK/$key.sock" tabula
    CTL[$key]="http://127.0.0.1:$api"
    if [ "$mode" = serve ]; then
        "$BIN" serve --data-dir "$WORK/$key" "${LISTEN[@]}" --api-listen "127.0.0.1:$api" \
            --container-size 4T 2>"$WORK/$key.log" &
        pid=$!
        PIDS+=("$pid")
        SPIDS[$key]=$pid
        SERVER[$key]="tabula serve"
    else
        "$BIN" controller --data-dir "$WORK/$key" --api-listen "127.0.0.1:$api" \
            --container-size 4T 2>"$WORK/$key.log" &
        pid=$!
        PIDS+=("$pid")
        SERVER[$key]="tabula agent+controller"
    fi
    wait_ready "$WORK/$key.log" "$pid" "$BIN" --controller "${CTL[$key]}" status || return 1
    if [ "$mode" = agent ]; then
        "$BIN" --controller "${CTL[$key]}" agent "${LISTEN[@]}" --name "$key" \
            2>"$WORK/$key.agent.log" &
        apid=$!
        PIDS+=("$apid")
        SPIDS[$key]="$apid $pid"
    fi
    URI[$key]=$(uri_for "$tr" bench)
    TR[$key]=$tr
    local log="$WORK/$key.log"
    [ "$mode" = agent ] && log="$WORK/$key.agent.log"
    wait_ready "$log" "${SPIDS[$key]%% *}" python3 -c "$NBD_PROBE" "${URI[$key]}" || return 1
    timeout 60 "$BIN" --controller "${CTL[$key]}" vdisk create bench --size "$SIZE" >/dev/null
}

# fill TARGET SIZE [rand]: writes SIZE once (1M sequential, or 4K random covering it all).
fill() {
    local target=$1 size=$2 how=${3:-seq} eng
    if [ "${target#nbd}" = "$target" ]; then eng=(--ioengine=io_uring --direct=1 "--filename=$target")
    else eng=(--ioengine=nbd "--uri=$target"); fi
    local rw=(--rw=write --bs=1M --iodepth=8)
    [ "$how" = rand ] && rw=(--rw=randwrite --bs=4k --iodepth=32)
    timeout --kill-after=5 "$(within 600)" fio --name=fill "${eng[@]}" "${rw[@]}" --size="$size" \
        --output-format=json --output="$WORK/fill.json" >"$WORK/fill.log" 2>&1 ||
        { echo "fill of $target failed:"; cat "$WORK/fill.log"; return 1; }
}

# start_instance KEY: starts the server(s) of KEY and writes its image once (steady state).
# (Called in a condition, where set -e does not apply: every step is checked.)
start_instance() {
    local key=$1 name=${1%-*} tr=${1##*-} f
    case $name in
        serve | agent) start_tabula "$key" "$name" "$tr" && fill "${URI[$key]}" "$SIZE" ;;
        nbdkit | null)
            listen_for "$tr" "$WORK/$key.sock" nbdkit
            if [ "$name" = nbdkit ]; then
                f="$WORK/$key.img"
                # Written once, so that reads hit the device, not unwritten extents.
                fallocate -l "$SIZE" "$f" && fill "$f" "$SIZE" || return 1
                nbdkit -f --exit-with-parent "${LISTEN[@]}" file "$f" 2>"$WORK/$key.log" &
                SERVER[$key]="nbdkit file"
            else
                nbdkit -f --exit-with-parent "${LISTEN[@]}" null "size=$SIZE" 2>"$WORK/$key.log" &
                SERVER[$key]="nbdkit null"
            fi
            SPIDS[$key]=$!
            PIDS+=("$!")
            URI[$key]=$(uri_for "$tr" "")
            TR[$key]=$tr
            wait_ready "$WORK/$key.log" "${SPIDS[$key]}" python3 -c "$NBD_PROBE" "${URI[$key]}"
            ;;
        qraw)
            f="$WORK/$key.img"
            fallocate -l "$SIZE" "$f" && fill "$f" "$SIZE" && start_qemu "$key" raw "$f" "$tr" || return 1
            SPIDS[$key]=$QPID URI[$key]=$QURI TR[$key]=$tr SERVER[$key]="qemu-nbd raw"
            ;;
        qcow2)
            f="$WORK/$key.qcow2"
            qemu-img create -q -f qcow2 "$f" "$SIZE" && start_qemu "$key" qcow2 "$f" "$tr" || return 1
            SPIDS[$key]=$QPID URI[$key]=$QURI TR[$key]=$tr SERVER[$key]="qemu-nbd qcow2"
            fill "${URI[$key]}" "$SIZE"
            ;;
        direct)
            f="$WORK/direct.img"
            fallocate -l "$SIZE" "$f" && fill "$f" "$SIZE" || return 1
            SPIDS[$key]="" URI[$key]=$f TR[$key]="-" SERVER[$key]="fio io_uring direct"
            ;;
    esac
}

# ---- measurement ----
# job_args JOB: fio's arguments for a job.
job_args() {
    case $1 in
        seqwrite) echo "--rw=write --bs=1M --iodepth=8 --size=$SIZE" ;;
        seqread) echo "--rw=read --bs=1M --iodepth=8 --size=$SIZE" ;;
        randwrite | aftersnap) echo "--rw=randwrite --bs=4k --iodepth=32 --size=$SIZE" ;;
        randread) echo "--rw=randread --bs=4k --iodepth=32 --size=$SIZE" ;;
        multiconn) echo "--rw=randwrite --bs=4k --iodepth=8 --size=$SIZE --numjobs=4 --group_reporting" ;;
        firstwrite) echo "--rw=randwrite --bs=4k --iodepth=32 --size=$FRESH_SIZE --norandommap" ;;
        seqfill | randfill) echo "--rw=read --bs=1M --iodepth=8 --size=$FILL_SIZE" ;;
    esac
}
# run KEY JOB ROUND TARGET "PIDS" [NOTE]: one timed fio run; appends a row to RES.
run() {
    local key=$1 job=$2 round=$3 target=$4 pids=$5 note=${6:-} eng out t0 t1 st=ok
    out="$WORK/fio/$key.$job.$round.json"
    if [ "$key" = direct ]; then eng=(--ioengine=io_uring --direct=1 "--filename=$target")
    else eng=(--ioengine=nbd "--uri=$target"); fi
    # shellcheck disable=SC2046 # job_args is split on purpose
    t0=$(ticks $pids)
    timeout --kill-after=5 "$(within $((RUNTIME + 60)))" fio --name="$job" "${eng[@]}" \
        $(job_args "$job") --time_based --runtime="$RUNTIME" --output-format=json \
        --output="$out" >"$out.log" 2>&1 || st=fail
    t1=$(ticks $pids)
    # shellcheck disable=SC2046
    read -r rss hwm < <(if [ -n "$pids" ]; then mem $pids; else echo "0 0"; fi)
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$round" "${SERVER[$key]}" "${TR[$key]}" \
        "$job" "$st" "$out" "$(awk -v a="$t0" -v b="$t1" -v t="$TCK" 'BEGIN {print (b - a) / t}')" "$rss" "$hwm" \
        "${pids:+x}" "$note" >>"$RES"
    [ "$st" = ok ] || { echo "fio failed: ${SERVER[$key]} ${TR[$key]} $job round $round:" >&2; tail -n 5 "$out.log" >&2; }
    return 0
}

tabula_cli() { timeout 60 "$BIN" --controller "${CTL[$1]}" "${@:2}"; }
# allocated_segments KEY VDISK
allocated_segments() {
    tabula_cli "$1" vdisk show "$2" --json |
        python3 -c 'import json,sys; v=json.load(sys.stdin); print(v["allocated"] // v["segment_size"])'
}

# fresh KEY JOB ROUND: the thin-provisioning jobs, on a target made for the run and removed
# after it. firstwrite: random writes to a fresh FRESH_SIZE target; seqfill / randfill: a
# FILL_SIZE target filled one way, then read sequentially. A step that fails is reported
# and the run skipped (so is its row); the rest goes on.
fresh() {
    local key=$1 job=$2 round=$3 name=${1%-*} tr=${1##*-} size=$FRESH_SIZE how=seq
    [ "$job" = firstwrite ] || size=$FILL_SIZE
    [ "$job" = randfill ] && how=rand
    case $name in
        serve | agent)
            local v="$job$round" u
            u=$(export_uri "$key" "$v")
            tabula_cli "$key" vdisk create "$v" --size "$size" >/dev/null ||
                { echo "$key: vdisk create $v failed" >&2; return 0; }
            if [ "$job" = firstwrite ] || fill "$u" "$size" "$how"; then
                run "$key" "$job" "$round" "$u" "${SPIDS[$key]}"
            fi
            if [ "$job" = firstwrite ]; then
                # How many segments the run allocated (against the writes it made).
                local n
                n=$(allocated_segments "$key" "$v") && sed -i '$ s/\t$/\tallocated='"$n"'/' "$RES"
            fi
            tabula_cli "$key" vdisk delete "$v" >/dev/null || echo "$key: vdisk delete $v failed" >&2
            ;;
        qcow2)
            local img="$WORK/$key-$job$round.qcow2"
            QPID=
            if qemu-img create -q -f qcow2 "$img" "$size" && start_qemu "$key-$job" qcow2 "$img" "$tr"; then
                if [ "$job" = firstwrite ] || fill "$QURI" "$size" "$how"; then
                    run "$key" "$job" "$round" "$QURI" "$QPID"
                fi
            fi
            [ -z "$QPID" ] || stop "$QPID"
            rm -f "$img"
            ;;
    esac
    return 0
}

# aftersnap KEY ROUND: random 4K writes right after a snapshot of the steady vdisk.
aftersnap() {
    local key=$1 round=$2
    tabula_cli "$key" snapshot create bench "s$round" >/dev/null ||
        { echo "$key: snapshot create failed" >&2; return 0; }
    run "$key" aftersnap "$round" "${URI[$key]}" "${SPIDS[$key]}"
    tabula_cli "$key" snapshot delete "bench@s$round" >/dev/null || echo "$key: snapshot delete failed" >&2
}

# ---- plan ----
TRANSPORTS=(tcp unix)
STEADY=()
for tr in "${TRANSPORTS[@]}"; do
    for n in serve agent nbdkit qraw qcow2 null; do STEADY+=("$n-$tr"); done
done
STEADY+=(direct)
EXTRA_TABULA=() EXTRA_THIN=()
for tr in $EXTRA_TRANSPORTS; do
    EXTRA_TABULA+=("serve-$tr" "agent-$tr")
    EXTRA_THIN+=("serve-$tr" "agent-$tr" "qcow2-$tr")
done
JOBS=(seqwrite seqread randwrite randread multiconn firstwrite aftersnap seqfill randfill)
# targets JOB: the instances a job runs on.
targets() {
    local k
    case $1 in
        seqwrite | seqread) printf '%s\n' "${STEADY[@]}" ;;
        randwrite | randread | multiconn) for k in "${STEADY[@]}"; do [ "${k%-*}" = null ] || echo "$k"; done ;;
        firstwrite | seqfill | randfill) printf '%s\n' "${EXTRA_THIN[@]}" ;;
        aftersnap) printf '%s\n' "${EXTRA_TABULA[@]}" ;;
    esac
}
NRUNS=0
for j in "${JOBS[@]}"; do NRUNS=$((NRUNS + $(targets "$j" | wc -l))); done
NRUNS=$((NRUNS * ROUNDS))
echo "planned: $NRUNS fio runs of ${RUNTIME} s ($ROUNDS rounds; SIZE=$SIZE FRESH_SIZE=$FRESH_SIZE FILL_SIZE=$FILL_SIZE):" \
    "about $(((NRUNS * (RUNTIME * 10 + 5) / 10 + ROUNDS * 5 + 30 + 30) / 60)) minutes; log and work files in $WORK" >&2

# ---- setup ----
for key in "${STEADY[@]}"; do
    echo "starting $key" >&2
    if ! start_instance "$key"; then
        echo "$key failed to start; its rows are left out" >&2
        DEAD+=("$key")
    fi
done
alive() { local d; for d in "${DEAD[@]}"; do [ "$d" = "$1" ] && return 1; done; return 0; }

# ---- rounds: per round, per job, every server in turn (the order rotates each round) ----
for round in $(seq "$ROUNDS"); do
    echo "round $round/$ROUNDS ($((SECONDS - START)) s so far)" >&2
    for job in "${JOBS[@]}"; do
        mapfile -t ts < <(targets "$job")
        n=${#ts[@]}
        for i in $(seq 0 $((n - 1))); do
            key=${ts[$(((i + round - 1) % n))]}
            alive "$key" || continue
            case $job in
                firstwrite | seqfill | randfill) fresh "$key" "$job" "$round" ;;
                aftersnap) aftersnap "$key" "$round" ;;
                *) run "$key" "$job" "$round" "${URI[$key]}" "${SPIDS[$key]}" ;;
            esac
        done
    done
done

# tabula's own invariant check on every tabula instance after all that I/O.
CHECKS=""
for key in "${STEADY[@]}"; do
    case ${key%-*} in serve | agent) ;; *) continue ;; esac
    alive "$key" || continue
    if tabula_cli "$key" check >"$WORK/check.out" 2>&1; then CHECKS+="$key ok; "
    else CHECKS+="$key FAILED; "; cat "$WORK/check.out" >&2; fi
done

# ---- report ----
mkdir -p "$(dirname "$OUT")"
python3 bench/peers_report.py "$RES" \
    --meta "date=$(date -u '+%Y-%m-%d %H:%M UTC')" \
    --meta "commit=$(git rev-parse --short HEAD 2>/dev/null || echo -)$(git diff --quiet HEAD 2>/dev/null || echo ' (with local changes)')" \
    --meta "machine=$(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo); load average $LOAD0 at the start, $(cut -d' ' -f1-3 /proc/loadavg) at the end" \
    --meta "tools=$(fio --version), $(nbdkit --version), $(qemu-nbd --version | head -n 1)" \
    --meta "knobs=RUNTIME=$RUNTIME s, ROUNDS=$ROUNDS, SIZE=$SIZE, FRESH_SIZE=$FRESH_SIZE, FILL_SIZE=$FILL_SIZE, EXTRA_TRANSPORTS=$EXTRA_TRANSPORTS" \
    --meta "elapsed=$((SECONDS - START)) s after the build" \
    --meta "backing=$(df --output=source,fstype "$WORK" | tail -n 1 | tr -s ' ')" \
    --meta "dead=${DEAD[*]:-}" --meta "checks=${CHECKS:-none}" | tee "$OUT"
echo "written to $OUT" >&2
