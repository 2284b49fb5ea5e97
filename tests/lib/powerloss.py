#!/usr/bin/env python3
"""What a power loss may leave of an image, from a writelog.so recording.

  barriers WRITELOG               the number of barriers (completed
                                  fdatasync/fsync) in the recording
  all BEFORE WRITELOG OUT         every record applied to a copy of BEFORE:
                                  must be the image the daemon left
  crash BEFORE WRITELOG OPSLOG K SEED OUT
                                  the image after a power loss between
                                  barrier K and barrier K+1 (K = 0: before
                                  the first; K = the count: after the last),
                                  written to OUT; prints the index of the
                                  last workload op (qcow2_workload.py's
                                  OPSLOG) whose fsync that state must keep,
                                  -1 if none

The crash model.  Everything logged before barrier K is on the disk: that
fdatasync returned.  Of the writes after it, until barrier K+1, the disk
holds any subset, landed in any order, torn at 512-byte sectors (the unit a
disk writes atomically).  The writes were buffered, so a sector on the disk
holds what the page cache held at some moment: for each sector, a prefix
(in log order) of the writes that touched it.  Nothing after barrier K+1
began, since writelog.so serialises the calls it records.  SEED picks the
subset.  An even seed tears at random: p, the chance that each next write
to a sector landed, is drawn per crash from {0.1, 0.3, 0.5, 0.7, 0.9}, so
some crashes keep most of them and some almost none.  An odd seed keeps
only the last one to three writes (every sector no earlier write touched):
the state an ordering bug shows in, a pointer on the disk before what it
points at.

A workload fsync (OPSLOG: "synced I NS", NS when fsync returned) is owed to
the state of barrier K when it returned before barrier K completed: the
fdatasync that made it durable was logged before it returned, so it is one
of barriers 1..K.
"""
import random
import struct
import sys

WRITE, ZERO, ALLOC, TRUNCATE, BARRIER = 1, 2, 3, 4, 5
MAGIC, END = 0x31524C57, 0x444E4557
HEAD = struct.Struct("<IIQQQ")
SECTOR = 512


class Rec:
    __slots__ = ("op", "off", "len", "ns", "data")

    def __init__(self, op, off, ln, ns, data):
        self.op, self.off, self.len, self.ns, self.data = op, off, ln, ns, data


def read_log(path):
    """The complete records; a torn last one (a killed daemon) is not one."""
    with open(path, "rb") as f:
        buf = memoryview(f.read())
    recs, pos = [], 0
    while pos + HEAD.size + 4 <= len(buf):
        magic, op, off, ln, ns = HEAD.unpack_from(buf, pos)
        if magic != MAGIC:
            sys.exit(f"{path}: bad record at byte {pos}")
        dlen = ln if op == WRITE else 0
        end = pos + HEAD.size + dlen
        if end + 4 > len(buf) or struct.unpack_from("<I", buf, end)[0] != END:
            break
        recs.append(Rec(op, off, ln, ns, buf[pos + HEAD.size:end]))
        pos = end + 4
    return recs


def apply(img, r, lo=None, hi=None):
    """Record r onto img (a bytearray), only [lo, hi) of it if given."""
    if r.op in (WRITE, ZERO):
        lo = r.off if lo is None else lo
        hi = r.off + r.len if hi is None else hi
        if len(img) < hi:
            img.extend(bytes(hi - len(img)))
        if r.op == WRITE:
            img[lo:hi] = r.data[lo - r.off:hi - r.off]
        else:
            img[lo:hi] = bytes(hi - lo)
    elif r.op == ALLOC and len(img) < r.off + r.len:
        img.extend(bytes(r.off + r.len - len(img)))
    elif r.op == TRUNCATE:
        if len(img) > r.len:
            del img[r.len:]
        else:
            img.extend(bytes(r.len - len(img)))


def crash(before, recs, k, seed):
    bar = [i for i, r in enumerate(recs) if r.op == BARRIER]
    if not 0 <= k <= len(bar):
        sys.exit(f"barrier {k} out of range 0..{len(bar)}")
    start = bar[k - 1] + 1 if k else 0
    stop = bar[k] if k < len(bar) else len(recs)
    with open(before, "rb") as f:
        img = bytearray(f.read())
    for r in recs[:start]:
        apply(img, r)
    rng = random.Random(seed)
    p = rng.choice([0.1, 0.3, 0.5, 0.7, 0.9])
    pending = range(start, stop)
    # per sector, the writes that touched it, in log order
    touch = {}
    for i in pending:
        r = recs[i]
        if r.op in (WRITE, ZERO) and r.len:
            for s in range(r.off // SECTOR, (r.off + r.len - 1) // SECTOR + 1):
                touch.setdefault(s, []).append(i)
    landed = set()
    if seed % 2:
        # the last writes landed, the ones before them did not: what an
        # ordering bug (a pointer written before what it points at, with
        # no barrier between) needs to show
        writes = sorted({i for ws in touch.values() for i in ws})
        cut = writes[max(0, len(writes) - rng.choice([1, 1, 2, 3]))] if writes else 0
        for s, ws in touch.items():
            if ws[0] >= cut:
                landed.update((i, s) for i in ws)
    else:
        for s, ws in touch.items():
            for i in ws:
                if rng.random() >= p:
                    break
                landed.add((i, s))
    for i in pending:
        r = recs[i]
        if r.op in (ALLOC, TRUNCATE):
            if rng.random() < p:
                apply(img, r)
            continue
        if r.op not in (WRITE, ZERO) or not r.len:
            continue
        first, last = r.off // SECTOR, (r.off + r.len - 1) // SECTOR
        s = first
        while s <= last:   # runs of landed sectors, one slice each
            if (i, s) not in landed:
                s += 1
                continue
            e = s
            while e + 1 <= last and (i, e + 1) in landed:
                e += 1
            apply(img, r, max(r.off, s * SECTOR), min(r.off + r.len, (e + 1) * SECTOR))
            s = e + 1
    return img, (recs[bar[k - 1]].ns if k else None)


def owed(opslog, ns):
    """The last op whose fsync returned before ns; -1 if none."""
    last = -1
    if ns is None:
        return last
    with open(opslog) as f:
        for line in f:
            w = line.split()
            if w[0] == "synced" and len(w) > 2 and int(w[2]) < ns:
                last = int(w[1])
    return last


def main(argv):
    cmd = argv[1] if len(argv) > 1 else ""
    if cmd == "barriers" and len(argv) == 3:
        print(sum(r.op == BARRIER for r in read_log(argv[2])))
    elif cmd == "all" and len(argv) == 5:
        with open(argv[2], "rb") as f:
            img = bytearray(f.read())
        for r in read_log(argv[3]):
            apply(img, r)
        with open(argv[4], "wb") as f:
            f.write(img)
    elif cmd == "crash" and len(argv) == 8:
        img, ns = crash(argv[2], read_log(argv[3]), int(argv[5]), int(argv[6]))
        with open(argv[7], "wb") as f:
            f.write(img)
        print(owed(argv[4], ns))
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv)
