#!/usr/bin/env python3
"""The report of bench/peers.sh: reads its results (one row per fio run) and fio's JSON,
takes medians over the rounds and prints Markdown: absolute figures, then ratios.

    peers_report.py RESULTS.tsv [--meta KEY=VALUE]...

RESULTS.tsv columns: round, server, transport, job, status (ok/fail), fio JSON path, server
CPU seconds during the run, server VmRSS and VmHWM after it (KiB), "x" if there is a server
process, note (e.g. allocated=N).
"""

import argparse
import json
import statistics
from collections import defaultdict

JOBS = [
    ("seqwrite", "seq write 1M QD8"),
    ("seqread", "seq read 1M QD8"),
    ("randwrite", "rand write 4K QD32"),
    ("randread", "rand read 4K QD32"),
    ("multiconn", "rand write 4K, 4 conns x QD8"),
    ("firstwrite", "first writes 4K QD32 (fresh thin target)"),
    ("aftersnap", "rand write 4K QD32 right after a snapshot"),
    ("seqfill", "seq read 1M QD8 after a seq 1M fill"),
    ("randfill", "seq read 1M QD8 after a random 4K fill"),
]
LABEL = dict(JOBS)
SERVE, AGENT = "tabula serve", "tabula agent+controller"
KIT, QRAW, QCOW = "nbdkit file", "qemu-nbd raw", "qemu-nbd qcow2"
NULL, DIRECT = "nbdkit null", "fio io_uring direct"
SERVERS = [SERVE, AGENT, KIT, QRAW, QCOW, NULL, DIRECT]
TABULA = [SERVE, AGENT]


def load_fio(path):
    raw = open(path).read()
    return json.loads(raw[raw.index("{") :])  # fio may print a line before the JSON


def figures(path):
    """MiB/s, IOPS, p50 µs, p99 µs and bytes moved of one fio run (all its jobs)."""
    jobs = load_fio(path)["jobs"]
    j = jobs[0]  # one job, or numjobs with group_reporting: the group's sums
    side = j["write"] if j["write"]["io_bytes"] > 0 else j["read"]
    pct = side["clat_ns"]["percentile"]
    moved = sum(x["read"]["io_bytes"] + x["write"]["io_bytes"] for x in jobs)
    ios = sum(x["read"]["total_ios"] + x["write"]["total_ios"] for x in jobs)
    return {
        "mibs": side["bw_bytes"] / 2**20,
        "iops": side["iops"],
        "p50": pct["50.000000"] / 1e3,
        "p99": pct["99.000000"] / 1e3,
        "bytes": moved,
        "ios": ios,
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("results")
    ap.add_argument("--meta", action="append", default=[])
    a = ap.parse_args()
    meta = dict(m.split("=", 1) for m in a.meta)

    runs = defaultdict(list)  # (server, transport, job) -> [dict]
    failed = []
    for line in open(a.results):
        if not line.strip():
            continue
        cols = line.rstrip("\n").split("\t")
        rnd, server, tr, job, status, path, cpu, rss, hwm, has_server = cols[:10]
        note = cols[10] if len(cols) > 10 else ""
        if status != "ok":
            failed.append(f"{server} {tr} {job} round {rnd}")
            continue
        try:
            f = figures(path)
        except (OSError, ValueError, KeyError) as e:
            failed.append(f"{server} {tr} {job} round {rnd} (fio output unreadable: {e})")
            continue
        if has_server:
            cpu = float(cpu)
            f["cpu_gib"] = cpu / (f["bytes"] / 2**30) if f["bytes"] else None
            f["rss"], f["hwm"] = int(rss) / 1024, int(hwm) / 1024
        if note.startswith("allocated="):
            f["alloc_frac"] = int(note.split("=", 1)[1]) / max(f["ios"], 1)
        runs[(server, tr, job)].append(f)

    def med(server, tr, job, field):
        vals = [r[field] for r in runs.get((server, tr, job), []) if r.get(field) is not None]
        return statistics.median(vals) if vals else None

    transports = [t for t in ("tcp", "unix") if any(k[1] == t for k in runs)]
    p = print
    p("# tabula and its peers: fio over NBD, same machine, same run")
    p()
    for k, label in (
        ("date", "Date"),
        ("commit", "Commit"),
        ("machine", "Machine"),
        ("tools", "Tools"),
        ("knobs", "Knobs"),
        ("backing", "Backing files on"),
        ("elapsed", "Run time"),
    ):
        if meta.get(k):
            p(f"- {label}: {meta[k]}")
    p(
        "- Client: fio `ioengine=nbd`, over TCP loopback (`tcp`) and a Unix socket (`unix`); "
        "`-` is fio itself on a raw file (`ioengine=io_uring`, `direct=1`, no NBD). Each "
        "server and transport is its own process(es), interleaved job by job, the order "
        "rotating each round. Steady-state jobs run on fully written images (SIZE)."
    )
    p(
        "- Figures are medians over the rounds. Latency: fio's completion latency. CPU: the "
        "server's utime+stime during the run (tabula agent+controller: both processes) per "
        "GiB moved. RSS: VmRSS after the run; peak: VmHWM so far (servers run for the whole "
        "benchmark, except the fresh qcow2 images' qemu-nbd, started per run)."
    )
    p(
        "- Cache modes differ by design: qemu-nbd uses O_DIRECT (`--cache=none "
        "--aio=native`); nbdkit file and tabula's file container go through the page cache."
    )
    if meta.get("dead"):
        p(f"- **Did not start (left out): {meta['dead']}**")
    if meta.get("checks"):
        p(f"- `tabula check` after the run: {meta['checks']}")
    p()

    def fmt(v, spec):
        return "-" if v is None else format(v, spec)

    p("## Absolute figures")
    p()
    p("| job | server | transport | MiB/s | IOPS | p50 µs | p99 µs | CPU s/GiB | RSS MiB | peak RSS MiB | runs |")
    p("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for job, label in JOBS:
        for server in SERVERS:
            for tr in transports + ["-"]:
                rs = runs.get((server, tr, job))
                if not rs:
                    continue
                m = lambda f: med(server, tr, job, f)  # noqa: E731
                cpu = m("cpu_gib")
                extra = ""
                if m("alloc_frac") is not None:
                    extra = f" ({m('alloc_frac'):.2f} segments allocated per write)"
                p(
                    f"| {label}{extra} | {server} | {tr} | {fmt(m('mibs'), '.1f')} | {fmt(m('iops'), '.0f')} "
                    f"| {fmt(m('p50'), '.0f')} | {fmt(m('p99'), '.0f')} | {fmt(cpu, '.2f')} "
                    f"| {fmt(m('rss'), '.0f')} | {fmt(m('hwm'), '.0f')} | {len(rs)} |"
                )
    p()

    # ---- ratios ----
    cols = [SERVE, AGENT, KIT, QRAW, QCOW]
    p("## Ratios (of the medians)")
    p()
    p(
        "Throughput ratios: above 1 is better than the reference; p99 ratio: below 1 is "
        "better. `-`: not measured or not applicable."
    )
    p()
    p("| ratio | transport | " + " | ".join(cols) + " |")
    p("|---|---|" + "---:|" * len(cols))

    def ratio(x, y):
        return None if x is None or not y else x / y

    def row(name, tr, values):
        cells = [fmt(values.get(c), ".2f") + ("x" if values.get(c) is not None else "") for c in cols]
        if all(v is None for v in values.values()):
            return
        p(f"| {name} | {tr} | " + " | ".join(cells) + " |")

    steady = ["seqwrite", "seqread", "randwrite", "randread", "multiconn"]
    for job in steady:
        for tr in transports:
            peers = [v for v in (med(KIT, tr, job, "mibs"), med(QRAW, tr, job, "mibs")) if v is not None]
            best = max(peers) if peers else None
            row(
                f"{LABEL[job]}: vs the better of qemu-nbd raw and nbdkit file",
                tr,
                {s: ratio(med(s, tr, job, "mibs"), best) for s in TABULA},
            )
    for job in ["randwrite", "randread", "multiconn"]:
        dev = med(DIRECT, "-", job, "iops")
        for tr in transports:
            row(
                f"{LABEL[job]}: IOPS vs fio io_uring direct (device limit)",
                tr,
                {s: ratio(med(s, tr, job, "iops"), dev) for s in cols},
            )
    for job in ["seqwrite", "seqread"]:
        for tr in transports:
            lims = [v for v in (med(DIRECT, "-", job, "mibs"), med(NULL, tr, job, "mibs")) if v is not None]
            lim = min(lims) if lims else None
            row(
                f"{LABEL[job]}: vs the lesser of device limit and nbdkit null",
                tr,
                {s: ratio(med(s, tr, job, "mibs"), lim) for s in cols},
            )
    for job in steady:
        for tr in transports:
            ref = med(QRAW, tr, job, "p99")
            row(
                f"{LABEL[job]}: p99 vs qemu-nbd raw p99",
                tr,
                {s: ratio(med(s, tr, job, "p99"), ref) for s in [SERVE, AGENT, KIT, QCOW]},
            )
    for tr in transports:
        q = med(QCOW, tr, "firstwrite", "iops")
        row("first writes: IOPS vs qemu-nbd qcow2 first writes", tr,
            {s: ratio(med(s, tr, "firstwrite", "iops"), q) for s in TABULA})
        row("first writes: IOPS vs the same server's steady rand write 4K QD32", tr,
            {s: ratio(med(s, tr, "firstwrite", "iops"), med(s, tr, "randwrite", "iops")) for s in TABULA + [QCOW]})
        row("seq read after a random 4K fill / after a seq 1M fill", tr,
            {s: ratio(med(s, tr, "randfill", "mibs"), med(s, tr, "seqfill", "mibs")) for s in TABULA + [QCOW]})
        row("rand write 4K right after a snapshot / steady rand write 4K", tr,
            {s: ratio(med(s, tr, "aftersnap", "iops"), med(s, tr, "randwrite", "iops")) for s in TABULA})
    p()
    if failed:
        p("Runs that failed (left out of the medians): " + "; ".join(failed))
        p()


if __name__ == "__main__":
    main()
