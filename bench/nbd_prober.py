#!/usr/bin/env python3
"""First-write prober for bench/ha-failover.sh: a minimal NBD client (fixed newstyle,
NBD_OPT_GO, simple replies) that writes 4 KiB to a new segment (every other one, so the
controller's read-ahead never maps it first) every INTERVAL seconds, one write at a time,
and logs each write: "<start, unix s> <latency s> <ok|error text>". Every write is a write
fault: it succeeds only once the controller (the leader) has committed an allocation.

    nbd_prober.py HOST PORT EXPORT SEGMENT_BYTES INTERVAL_S LOG

Runs until killed (SIGTERM). A write that fails is logged and the next one goes on; a lost
connection is logged and the prober exits (that is an error the benchmark reports).
"""
import os
import signal
import socket
import struct
import sys
import time

NBD_OPT_GO = 7
NBD_REP_ACK = 1
NBD_REP_INFO = 3
NBD_CMD_WRITE = 1
REQ_MAGIC = 0x25609513
REPLY_MAGIC = 0x67446698
OPT_REPLY_MAGIC = 0x3E889045565A9


def recv_exact(s, n):
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("the server closed the connection")
        buf += chunk
    return buf


def connect(host, port, export):
    s = socket.create_connection((host, port), timeout=5)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    magic, opt, hflags = struct.unpack(">8s8sH", recv_exact(s, 18))
    if magic != b"NBDMAGIC" or opt != b"IHAVEOPT":
        raise ConnectionError("not a fixed-newstyle NBD server")
    cflags = 1 | (2 if hflags & 2 else 0)  # FIXED_NEWSTYLE, NO_ZEROES if offered
    s.sendall(struct.pack(">I", cflags))
    name = export.encode()
    data = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
    s.sendall(b"IHAVEOPT" + struct.pack(">II", NBD_OPT_GO, len(data)) + data)
    size = None
    while True:
        magic, _opt, rtype, length = struct.unpack(">QIII", recv_exact(s, 20))
        if magic != OPT_REPLY_MAGIC:
            raise ConnectionError("bad option reply magic")
        body = recv_exact(s, length)
        if rtype & 0x80000000:
            raise ConnectionError(f"NBD_OPT_GO refused ({rtype:#x}): {body!r}")
        if rtype == NBD_REP_INFO and len(body) >= 12 and struct.unpack(">H", body[:2])[0] == 0:
            size = struct.unpack(">Q", body[2:10])[0]
        if rtype == NBD_REP_ACK:
            break
    s.settimeout(None)  # a write may wait through a failover: its latency is the measure
    return s, size


def main():
    host, port, export, seg, interval, log = sys.argv[1:7]
    seg, interval = int(seg), float(interval)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    s, size = connect(host, int(port), export)
    out = open(log, "a", buffering=1)
    payload = os.urandom(4096)
    handle = 0
    i = 0
    while True:
        off = 2 * i * seg
        if size is not None and off + 4096 > size:
            out.write(f"{time.time():.6f} 0 error: ran out of segments\n")
            return 1
        handle += 1
        t0 = time.time()
        try:
            s.sendall(struct.pack(">IHHQQI", REQ_MAGIC, 0, NBD_CMD_WRITE, handle, off, 4096) + payload)
            magic, err, h = struct.unpack(">IIQ", recv_exact(s, 16))
        except (OSError, ConnectionError) as e:
            out.write(f"{t0:.6f} {time.time() - t0:.6f} error: connection: {e}\n")
            return 1
        t1 = time.time()
        if magic != REPLY_MAGIC or h != handle:
            out.write(f"{t0:.6f} {t1 - t0:.6f} error: bad reply\n")
            return 1
        out.write(f"{t0:.6f} {t1 - t0:.6f} {'ok' if err == 0 else f'error: NBD error {err}'}\n")
        i += 1
        time.sleep(max(0.0, interval - (time.time() - t0)))


if __name__ == "__main__":
    sys.exit(main())
