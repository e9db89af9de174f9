#!/usr/bin/env python3
"""Helpers of bench/ha-failover.sh (polling the controllers' /v1/ha, reading the prober's
and fio's logs, the report). Every wait is bounded by its TIMEOUT.

    ha_failover.py leader PORT...                  index of the one leader (exit 1: none)
    ha_failover.py wait-leader NOT TIMEOUT PORT... "<unix s> <index>" once another leads
    ha_failover.py caught-up TIMEOUT PORT...       returns once all answer with equal applied
    ha_failover.py wait-alloc LOG SINCE TIMEOUT    returns once a probe write started after
                                                   SINCE succeeded
    ha_failover.py report KILLS PROBE_LOG FIO_LAT_LOG...
"""
import json
import statistics
import sys
import time
import urllib.request


def ha(port):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/ha", timeout=0.5) as r:
            return json.load(r)
    except Exception:
        return None


def leaders(ports):
    return [i for i, p in enumerate(ports) if (ha(p) or {}).get("role") == "leader"]


def cmd_leader(ports):
    ls = leaders(ports)
    if len(ls) != 1:
        return 1
    print(ls[0])
    return 0


def cmd_wait_leader(not_i, timeout, ports):
    end = time.time() + timeout
    others = [(i, p) for i, p in enumerate(ports) if i != not_i]
    while time.time() < end:
        for i, p in others:
            if (ha(p) or {}).get("role") == "leader":
                print(f"{time.time():.6f} {i}")
                return 0
        time.sleep(0.01)
    print(f"no new leader within {timeout} s", file=sys.stderr)
    return 1


def cmd_caught_up(timeout, ports):
    end = time.time() + timeout
    while time.time() < end:
        views = [ha(p) for p in ports]
        if all(views) and len({v["applied"] for v in views}) == 1:
            return 0
        time.sleep(0.1)
    print(f"controllers not caught up within {timeout} s: {views}", file=sys.stderr)
    return 1


def probes(log):
    """(start, end, ok, text) per probe write."""
    out = []
    with open(log) as f:
        for line in f:
            t0, lat, rest = line.rstrip("\n").split(" ", 2)
            out.append((float(t0), float(t0) + float(lat), rest == "ok", rest))
    return out


def cmd_wait_alloc(log, since, timeout):
    end = time.time() + timeout
    while time.time() < end:
        if any(ok and t0 >= since for t0, _, ok, _ in probes(log)):
            return 0
        time.sleep(0.02)
    print(f"no first write succeeded within {timeout} s of the kill", file=sys.stderr)
    return 1


def fio_lat(path):
    """(completion unix s, latency s) per I/O of a fio --write_lat_log file written with
    --log_avg_msec=0 --log_unix_epoch=1 (time in ms, latency in ns)."""
    out = []
    with open(path) as f:
        for line in f:
            parts = line.split(",")
            if len(parts) >= 2:
                out.append((int(parts[0]) / 1e3, int(parts[1]) / 1e9))
    return out


def dist(xs, unit=1.0, fmt="{:.2f}"):
    if not xs:
        return "-"
    xs = sorted(x * unit for x in xs)
    return " / ".join(fmt.format(v) for v in (xs[0], statistics.median(xs), xs[-1]))


def cmd_report(kills_path, probe_log, fio_logs):
    kills = []
    with open(kills_path) as f:
        for line in f:
            k, victim, t_kill, t_leader = line.split()
            kills.append((int(k), victim, float(t_kill), float(t_leader)))
    pr = probes(probe_log)
    ios = [(name, fio_lat(name)) for name in fio_logs]
    rows = []
    for n, (k, victim, t_kill, t_leader) in enumerate(kills):
        t_next = kills[n + 1][2] if n + 1 < len(kills) else float("inf")
        # First allocation after the kill: a probe write started after it, or the one in
        # flight at the kill if the new leader answered it.
        cand = [t1 for t0, t1, ok, _ in pr if ok and t1 > t_kill and (t0 >= t_kill or t1 >= t_leader)]
        t_alloc = min(cand) if cand else None
        errors = sum(1 for t0, t1, ok, _ in pr if not ok and t_kill <= t1 < t_next)
        # The longest single fio I/O that completed in this failover's window: I/O that was
        # waiting on the failover completes after the kill.
        stall = 0.0
        for _, lat in ios:
            for t1, l in lat:
                if t_kill <= t1 < t_next:
                    stall = max(stall, l)
        rows.append((k, victim, t_leader - t_kill, (t_alloc - t_kill) if t_alloc else None, stall, errors))
    before = kills[0][2] if kills else float("inf")
    base_probe = [t1 - t0 for t0, t1, ok, _ in pr if ok and t1 < before]
    base_fio = [l for _, lat in ios for t1, l in lat if t1 < before]
    n_io = sum(len(lat) for _, lat in ios)
    probe_errors = [text for _, _, ok, text in pr if not ok]

    print("| kill | leader killed | new leader after s | first allocation after s | longest fio I/O in the window s | probe errors |")
    print("|---:|---|---:|---:|---:|---:|")
    for k, victim, lead, alloc, stall, errs in rows:
        a = f"{alloc:.2f}" if alloc is not None else "never"
        print(f"| {k} | {victim} | {lead:.2f} | {a} | {stall:.3f} | {errs} |")
    print()
    print("| measure (over the kills) | min / median / max |")
    print("|---|---|")
    print(f"| (a) new leader reported, s | {dist([r[2] for r in rows])} |")
    allocs = [r[3] for r in rows if r[3] is not None]
    print(f"| (b) first allocation succeeds again, s | {dist(allocs)} |")
    print(f"| (c) longest fio I/O in the failover window, s | {dist([r[4] for r in rows], fmt='{:.3f}')} |")
    print(f"| (d) errors (probe writes failed) | {sum(r[5] for r in rows)} |")
    print()
    worst_stall_vs_failover = max((r[4] - r[3] for r in rows if r[3] is not None), default=0.0)
    print(f"- kills: {len(rows)}; every failover < 5 s: {'yes' if allocs and len(allocs) == len(rows) and max(allocs) < 5 else 'NO'};"
          f" longest fio I/O minus that failover's first-allocation time, worst: {worst_stall_vs_failover:+.3f} s")
    if base_probe:
        base_probe.sort()
        print(f"- first-write (probe) latency outside failovers: median {statistics.median(base_probe) * 1e3:.1f} ms,"
              f" max {base_probe[-1] * 1e3:.1f} ms ({len(base_probe)} writes before the first kill)")
    if base_fio:
        print(f"- fio I/O before the first kill: median {statistics.median(base_fio) * 1e3:.2f} ms, max {max(base_fio) * 1e3:.1f} ms")
    print(f"- fio I/Os logged: {n_io}; probe writes: {len(pr)}, failed: {len(probe_errors)}"
          + (f" (first: {probe_errors[0]})" if probe_errors else ""))
    return 0


def main():
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "leader":
        return cmd_leader(args)
    if cmd == "wait-leader":
        return cmd_wait_leader(int(args[0]), float(args[1]), args[2:])
    if cmd == "caught-up":
        return cmd_caught_up(float(args[0]), args[1:])
    if cmd == "wait-alloc":
        return cmd_wait_alloc(args[0], float(args[1]), float(args[2]))
    if cmd == "report":
        return cmd_report(args[0], args[1], args[2:])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
