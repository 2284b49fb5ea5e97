#!/usr/bin/env python3
"""A deterministic random write workload for the qcow2 write tests.

  run TARGET SIZE SEED NOPS LOG   apply NOPS random ops to TARGET's first SIZE
                                  bytes (aligned and unaligned writes, punch
                                  hole, zero range, fsync); LOG records each op
                                  as it is started and each completed fsync,
                                  with the CLOCK_MONOTONIC ns it returned at
  qemu LOG BASE                   the same ops as qemu-io commands, one a line,
                                  at BASE bytes into the disk.  A punch hole is
                                  "write -z": it must read back as zeroes, and
                                  qemu's own discard leaves partial clusters
  verify LOG ORIG RESULT BASE [SYNCED]
                                  after a crash: every byte the ops up to the
                                  last completed fsync (or up to op SYNCED)
                                  wrote reads back from RESULT (a raw file of
                                  the disk); bytes later ops touched are not
                                  checked
"""
import ctypes
import os
import random
import sys
import time

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

libc = ctypes.CDLL(None, use_errno=True)
libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]


def fallocate(fd, mode, off, length):
    if libc.fallocate(fd, mode, off, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def gen_ops(size, seed, nops):
    r = random.Random(seed)
    for _ in range(nops):
        k = r.random()
        if k < 0.30:      # aligned write
            ln = 4096 * r.randint(1, 32)
            off = 4096 * r.randrange(0, (size - ln) // 4096 + 1)
            yield ("write", off, ln, r.randint(1, 255))
        elif k < 0.65:    # unaligned write
            ln = r.choice([1, 7, 511, 513, 4095, 4097, 65535, 65537, r.randint(1, 200000)])
            off = r.randrange(0, size - ln + 1)
            yield ("write", off, ln, r.randint(1, 255))
        elif k < 0.77:
            ln = r.choice([4096, 65536, 131072, r.randint(1, 300000)])
            off = r.randrange(0, size - ln + 1)
            if r.random() < 0.4:
                off -= off % 4096
            yield ("punch", off, ln, 0)
        elif k < 0.89:
            ln = r.choice([4096, 65536, r.randint(1, 300000)])
            off = r.randrange(0, size - ln + 1)
            if r.random() < 0.4:
                off -= off % 65536
            yield ("zero", off, ln, 0)
        else:
            yield ("fsync", 0, 0, 0)


def run(target, size, seed, nops, log):
    with open(log, "w") as lf:
        fd = os.open(target, os.O_WRONLY)
        for i, (op, off, ln, pat) in enumerate(gen_ops(size, seed, nops)):
            lf.write(f"op {i} {op} {off} {ln} {pat}\n")
            lf.flush()
            if op == "write":
                os.pwrite(fd, bytes([pat]) * ln, off)
            elif op == "punch":
                fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, off, ln)
            elif op == "zero":
                fallocate(fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, off, ln)
            else:
                os.fsync(fd)
                lf.write(f"synced {i} {time.monotonic_ns()}\n")
                lf.flush()
                os.fsync(lf.fileno())
        os.fsync(fd)
        lf.write(f"synced {nops} {time.monotonic_ns()}\n")
    os.close(fd)


def read_log(log):
    ops, synced = [], -1
    with open(log) as lf:
        for line in lf:
            w = line.split()
            if w[0] == "op":
                ops.append((w[2], int(w[3]), int(w[4]), int(w[5])))
            elif w[0] == "synced":
                synced = int(w[1])
    return ops, synced


def qemu(log, base):
    ops, _ = read_log(log)
    for op, off, ln, pat in ops:
        if op == "write":
            print(f"write -P {pat} {base + off} {ln}")
        elif op in ("punch", "zero"):
            print(f"write -z {base + off} {ln}")


def verify(log, orig, result, base, synced=None):
    ops, last = read_log(log)
    if synced is None:
        synced = last
    with open(orig, "rb") as f:
        f.seek(base)
        size = max((off + ln for _, off, ln, _ in ops), default=0)
        want = bytearray(f.read(size).ljust(size, b"\0"))
    later = []
    for i, (op, off, ln, pat) in enumerate(ops):
        if i <= synced:
            want[off:off + ln] = bytes([pat if op == "write" else 0]) * ln
        else:
            later.append((off, ln))
    with open(result, "rb") as f:
        f.seek(base)
        got = f.read(size).ljust(size, b"\0")
    # bytes a later op touched may hold anything: take them as they are
    for off, ln in later:
        want[off:off + ln] = got[off:off + ln]
    if got != want:
        bad = next(i for i in range(size) if got[i] != want[i])
        nbad = sum(1 for c in range(0, size, 65536) if got[c:c + 65536] != want[c:c + 65536])
        print(f"bytes differ after the last fsync (op {synced}) in {nbad} 64 KiB chunk(s);"
              f" first at {bad}: got {got[bad]} want {want[bad]}")
        return 1
    print(f"ok: ops up to {synced} of {len(ops)} verified")
    return 0


if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "run":
        run(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6])
    elif cmd == "qemu":
        qemu(sys.argv[2], int(sys.argv[3]))
    elif cmd == "verify":
        sys.exit(verify(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]),
                        int(sys.argv[6]) if len(sys.argv) > 6 else None))
    else:
        sys.exit(__doc__)
