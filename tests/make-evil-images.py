#!/usr/bin/python3
# SPDX-License-Identifier: LGPL-2.1-or-later
"""Craft malicious disk images for tests/hostile-images.bats.

    tests/make-evil-images.py OUTDIR

Each image starts as real qemu-img output (a few small base images made
here) and gets one defect patched in: header fields, L1/L2 entries,
refcount table, compressed clusters, snapshot table, backing names and
chains, MBR/EBR and GPT tables, truncated and empty files.  Written as
OUTDIR/NAME.qcow2 (or .img for raw disks); tests/hostile-images.bats says
what imgfs must do with each.  Python 3 standard library only.

Base geometry (every qcow2 base): version 3, 4 KiB clusters, virtual size
8 MiB, so one L2 table maps 2 MiB: guest 0..64 KiB holds bytes 0x11 and
guest 4 MiB..4 MiB+64 KiB holds 0x22, under L1 entries 0 and 2.  Damage
put under L1 entry 0 leaves 4 MiB readable.
"""
import os
import shutil
import struct
import subprocess
import sys
import zlib

CL = 4096
MiB = 1 << 20
OFFSET_MASK = 0x00fffffffffffe00
COMPRESSED = 1 << 62
COPIED = 1 << 63


def run(*args, cwd=None):
    subprocess.run(args, check=True, cwd=cwd, stdout=subprocess.DEVNULL)


class Image:
    """A qcow2 file in memory, patched in place and saved under a new name."""

    def __init__(self, path):
        with open(path, "rb") as f:
            self.b = bytearray(f.read())

    def u32(self, off):
        return struct.unpack_from(">I", self.b, off)[0]

    def u64(self, off):
        return struct.unpack_from(">Q", self.b, off)[0]

    def set16(self, off, v):
        struct.pack_into(">H", self.b, off, v)

    def set32(self, off, v):
        struct.pack_into(">I", self.b, off, v)

    def set64(self, off, v):
        struct.pack_into(">Q", self.b, off, v)

    # header fields (qcow2.rst "Header")
    @property
    def l1_offset(self):
        return self.u64(40)

    @property
    def reftable_offset(self):
        return self.u64(48)

    @property
    def snapshots_offset(self):
        return self.u64(64)

    def l1(self, i):
        return self.u64(self.l1_offset + 8 * i)

    def l2_entry_off(self, guest):
        """File offset of the L2 entry mapping guest offset (4 KiB clusters)."""
        l2 = self.l1(guest // (CL * CL // 8)) & OFFSET_MASK
        assert l2, "guest offset %d is not allocated" % guest
        return l2 + 8 * ((guest // CL) % (CL // 8))

    def save(self, path):
        with open(path, "wb") as f:
            f.write(self.b)


def crc32(b):
    return zlib.crc32(bytes(b)) & 0xffffffff


def make_bases(d):
    """The real images everything else is patched from."""
    def qio(img, *cmds, fmt="qcow2"):
        args = ["qemu-io", "-f", fmt]
        for c in cmds:
            args += ["-c", c]
        run(*args, img, cwd=d)

    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096",
        "base.qcow2", "8M", cwd=d)
    qio("base.qcow2", "write -P 0x11 0 64k", "write -P 0x22 4M 64k")
    # compressed: data that compresses, but not to nothing
    with open(os.path.join(d, "src.raw"), "wb") as f:
        f.truncate(8 * MiB)
        f.seek(0)
        f.write(bytes((i * 7 + i // 4096) & 0xff for i in range(64 * 1024)))
        f.seek(4 * MiB)
        f.write(b"\x22" * 65536)
    for name, extra in (("comp-zlib.qcow2", ""), ("comp-zstd.qcow2", ",compression_type=zstd")):
        run("qemu-img", "convert", "-q", "-c", "-f", "raw", "-O", "qcow2",
            "-o", "cluster_size=4096" + extra, "src.raw", name, cwd=d)
    shutil.copy(os.path.join(d, "base.qcow2"), os.path.join(d, "snap.qcow2"))
    run("qemu-img", "snapshot", "-c", "s1", "snap.qcow2", cwd=d)
    run("qemu-img", "create", "-q", "-f", "raw", "backing.raw", "8M", cwd=d)
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096",
        "-b", "backing.raw", "-F", "raw", "overlay.qcow2", "8M", cwd=d)
    qio("overlay.qcow2", "write -P 0x11 0 64k", "write -P 0x22 4M 64k")


def backing_name_at(img):
    return img.u64(8), img.u32(16)


def set_backing_name(img, name, fmt_ext=True):
    """Replace the backing file name (kept where qemu put it, in cluster 0)."""
    off, _ = backing_name_at(img)
    assert off
    name = name.encode() if isinstance(name, str) else name
    end = off + len(name)
    assert end <= CL, "name does not fit cluster 0"
    img.b[off:CL] = bytes(CL - off)
    img.b[off:end] = name
    img.set32(16, len(name))


def deflate_raw(data, level=9):
    c = zlib.compressobj(level, zlib.DEFLATED, -12)
    return c.compress(data) + c.flush()


def put_compressed(img, guest, payload):
    """Point guest's L2 entry at payload, appended at the end of the file as a
    compressed cluster (descriptor: 4 KiB clusters, so x = 62 - 4)."""
    while len(img.b) % 512:
        img.b.append(0)
    host = len(img.b)
    img.b += payload + bytes(-len(payload) % 512)
    nsec = (len(payload) + 511) // 512
    x = 62 - (12 - 8)
    assert nsec - 1 < (1 << 4)
    img.set64(img.l2_entry_off(guest), COMPRESSED | ((nsec - 1) << x) | host)


def mbr_entry(boot, ptype, start, count):
    return struct.pack("<B3sB3sII", boot, b"\0\0\0", ptype, b"\0\0\0", start, count)


def mbr_sector(entries):
    s = bytearray(512)
    for i, e in enumerate(entries):
        s[0x1be + 16 * i:0x1be + 16 * (i + 1)] = e
    s[510:512] = b"\x55\xaa"
    return s


def gpt_disk(path, nsect=256, nentries=128, entry_size=128, array_crc=None,
             header_size=92, damage_primary=False):
    """A raw disk with a protective MBR and a GPT holding one partition
    (LBA 40-99), primary and backup, with correct CRCs unless told."""
    disk = bytearray(nsect * 512)
    disk[0:512] = mbr_sector([mbr_entry(0, 0xee, 1, nsect - 1)])
    arr = bytearray(128 * 128)
    ent = bytearray(128)
    ent[0:16] = bytes.fromhex("af3dc60f838447728e793d69d8477de4")  # linux data
    ent[16:32] = bytes(range(1, 17))
    struct.pack_into("<QQ", ent, 32, 40, 99)
    ent[56:56 + 6] = "one".encode("utf-16-le")
    arr[0:128] = ent

    def header(my, alt, entries_lba):
        h = bytearray(512)
        h[0:8] = b"EFI PART"
        struct.pack_into("<IIII", h, 8, 0x00010000, header_size, 0, 0)
        struct.pack_into("<QQQQ", h, 24, my, alt, 34, nsect - 34)
        h[56:72] = bytes(range(16, 32))
        acrc = crc32(arr[:min(len(arr), nentries * entry_size)]) if array_crc is None else array_crc
        struct.pack_into("<QIII", h, 72, entries_lba, nentries, entry_size, acrc)
        struct.pack_into("<I", h, 16, crc32(h[:min(header_size, 512)]))
        return h

    disk[512:1024] = header(1, nsect - 1, 2)
    disk[1024:1024 + len(arr)] = arr
    disk[(nsect - 33) * 512:(nsect - 1) * 512] = arr
    disk[(nsect - 1) * 512:] = header(nsect - 1, 1, nsect - 33)
    if damage_primary:
        disk[512 + 40] ^= 0xff   # FirstUsableLBA: the CRC no longer matches
    with open(path, "wb") as f:
        f.write(disk)


def main():
    out = os.path.abspath(sys.argv[1])
    bases = os.path.join(out, ".base")
    os.makedirs(bases, exist_ok=True)
    make_bases(bases)
    B = lambda n: Image(os.path.join(bases, n))
    made = []

    def save(img, name):
        img.save(os.path.join(out, name))
        made.append(name)

    # ---- header --------------------------------------------------------
    for bits in (8, 22, 63):
        i = B("base.qcow2"); i.set32(20, bits); save(i, "cluster-bits-%d.qcow2" % bits)
    i = B("base.qcow2"); i.set32(4, 4); save(i, "version-4.qcow2")
    i = B("base.qcow2"); i.set32(100, 50); save(i, "header-length-tiny.qcow2")
    i = B("base.qcow2"); i.set32(100, 0xfffffff8); save(i, "header-length-huge.qcow2")
    i = B("base.qcow2"); i.set32(96, 7); save(i, "refcount-order-7.qcow2")
    i = B("base.qcow2"); i.set64(24, 1 << 62); save(i, "size-huge.qcow2")
    i = B("base.qcow2"); i.set32(32, 1); save(i, "encrypted-aes.qcow2")
    i = B("base.qcow2"); i.set64(72, i.u64(72) | 1 << 40); save(i, "incompat-unknown-bit.qcow2")
    i = B("base.qcow2"); i.set64(72, i.u64(72) | 1 << 1); save(i, "corrupt-bit.qcow2")
    i = B("base.qcow2"); i.set32(100, 112); i.b[104] = 2; i.set64(72, i.u64(72) | 1 << 3)
    save(i, "compression-type-2.qcow2")
    i = B("base.qcow2"); i.b = i.b[:50]; save(i, "truncated-header.qcow2")
    i = B("base.qcow2"); i.b = i.b[:80]; save(i, "truncated-v3-header.qcow2")
    # a header extension whose length runs past cluster 0
    i = B("base.qcow2"); hl = i.u32(100)
    i.set32(hl, 0x12345678); i.set32(hl + 4, 0xffffff00); save(i, "extension-huge.qcow2")
    # an external data file named as a protocol (CVE-2024-4467)
    i = B("base.qcow2"); hl = i.u32(100)
    name = b"json:{\"file.driver\":\"file\",\"file.filename\":\"/etc/shadow\"}"
    i.set32(hl, 0x44415441); i.set32(hl + 4, len(name)); i.b[hl + 8:hl + 8 + len(name)] = name
    i.set32(hl + 8 + ((len(name) + 7) & ~7), 0)
    i.set64(72, i.u64(72) | 1 << 2); save(i, "data-file-json.qcow2")

    # ---- L1 and refcount table -----------------------------------------
    i = B("base.qcow2"); i.set32(36, 0x2000000); save(i, "l1-size-huge.qcow2")
    i = B("base.qcow2"); i.set32(36, 0); save(i, "l1-too-small.qcow2")
    i = B("base.qcow2"); i.set64(40, 1 << 40); save(i, "l1-offset-past-eof.qcow2")
    i = B("base.qcow2"); i.set64(40, i.l1_offset + 512); save(i, "l1-offset-unaligned.qcow2")
    i = B("base.qcow2"); i.set64(40, 0); save(i, "l1-offset-zero.qcow2")
    i = B("base.qcow2"); i.set64(40, i.reftable_offset); save(i, "l1-overlaps-reftable.qcow2")
    i = B("base.qcow2"); i.set32(56, 0); save(i, "reftable-size-0.qcow2")
    i = B("base.qcow2"); i.set32(56, 0x10000000); save(i, "reftable-huge.qcow2")
    i = B("base.qcow2"); i.set64(48, i.reftable_offset + 8); save(i, "reftable-unaligned.qcow2")
    i = B("base.qcow2"); i.set64(48, 1 << 40); save(i, "reftable-past-eof.qcow2")

    # ---- damage found while reading: L1 / L2 entries ---------------------
    i = B("base.qcow2"); i.set64(i.l1_offset, COPIED | (i.l1(0) & OFFSET_MASK) + 512)
    save(i, "l1-entry-unaligned.qcow2")
    i = B("base.qcow2"); i.set64(i.l1_offset, COPIED | 1 << 40); save(i, "l1-entry-past-eof.qcow2")
    i = B("base.qcow2"); i.set64(i.l2_entry_off(0), COPIED | 1 << 40); save(i, "l2-entry-past-eof.qcow2")
    i = B("base.qcow2"); e = i.l2_entry_off(0); i.set64(e, i.u64(e) + 512)
    save(i, "l2-entry-unaligned.qcow2")
    i = B("base.qcow2"); e = i.l2_entry_off(0); i.set64(e, i.u64(e) | 1 << 60)
    save(i, "l2-entry-reserved-bits.qcow2")

    # an L2 entry whose data cluster is the L1 table: a write there would
    # rewrite the mapping (qemu's overlap check, iotest 060)
    i = B("base.qcow2"); i.set64(i.l2_entry_off(0), COPIED | i.l1_offset)
    save(i, "l2-entry-aliases-l1.qcow2")

    # ---- compressed clusters -------------------------------------------
    i = B("comp-zlib.qcow2"); e = i.l2_entry_off(0)
    i.set64(e, COMPRESSED | (1 << 40)); save(i, "compressed-past-eof.qcow2")
    i = B("comp-zlib.qcow2")
    put_compressed(i, 0, deflate_raw(b"\x5a" * (1 << 20)))  # 1 MiB out of one 4 KiB cluster
    save(i, "compression-bomb-zlib.qcow2")
    i = B("comp-zlib.qcow2")
    put_compressed(i, 0, deflate_raw(b"\x5a" * 1000))
    save(i, "compressed-short-zlib.qcow2")
    i = B("comp-zlib.qcow2")
    put_compressed(i, 0, b"\xff" * 700)
    save(i, "compressed-garbage-zlib.qcow2")
    # zstd: a frame that declares and holds 1 MiB (made by the zstd CLI if
    # there is one; else a hand-made frame of RLE blocks)
    i = B("comp-zstd.qcow2")
    put_compressed(i, 0, zstd_rle_frame(0x5a, 1 << 20))
    save(i, "compression-bomb-zstd.qcow2")
    i = B("comp-zstd.qcow2")
    put_compressed(i, 0, zstd_rle_frame(0x5a, 1000))
    save(i, "compressed-short-zstd.qcow2")

    # ---- snapshots -----------------------------------------------------
    i = B("snap.qcow2"); i.set32(60, 70000); save(i, "snapshot-count-70000.qcow2")
    i = B("snap.qcow2"); i.set64(64, 1 << 40); save(i, "snapshot-table-past-eof.qcow2")
    i = B("snap.qcow2"); i.set64(64, i.snapshots_offset + 8); save(i, "snapshot-table-unaligned.qcow2")
    i = B("snap.qcow2"); so = i.snapshots_offset
    i.set64(so, 1 << 40); save(i, "snapshot-l1-past-eof.qcow2")
    i = B("snap.qcow2"); so = i.snapshots_offset
    i.set32(so + 8, 0x2000000); save(i, "snapshot-l1-huge.qcow2")
    i = B("snap.qcow2"); so = i.snapshots_offset
    i.set32(so + 36, 0x7fffffff); save(i, "snapshot-extra-huge.qcow2")
    i = B("snap.qcow2"); so = i.snapshots_offset
    i.set16(so + 14, 0xffff); i.b = i.b[:so + 4096]; save(i, "snapshot-name-past-eof.qcow2")

    # 16 snapshots of an 8 TiB disk sharing one 32 MiB L1 table (a sparse
    # region at the end of the file): reading them all must not take 512 MiB
    i = B("snap.qcow2"); so = i.snapshots_offset
    id_len, name_len, extra = struct.unpack_from(">HHI", i.b, so + 12)[0], \
        struct.unpack_from(">H", i.b, so + 14)[0], i.u32(so + 36)
    assert extra >= 16
    l1_off = (len(i.b) + CL - 1) // CL * CL
    tbl_off = l1_off + (32 << 20)
    table = bytearray()
    for n in range(16):
        ident, name = str(n + 1).encode(), b"big%d" % n
        ent = bytearray(i.b[so:so + 40 + extra])
        struct.pack_into(">QIHH", ent, 0, l1_off, 4 << 20, len(ident), len(name))
        struct.pack_into(">I", ent, 32, 0)
        struct.pack_into(">Q", ent, 48, 8 << 40)        # disk_size: 8 TiB
        ent += ident + name
        ent += bytes(-len(ent) % 8)
        table += ent
    i.b += bytes(tbl_off - len(i.b)) + table
    i.set32(60, 16); i.set64(64, tbl_off)
    save(i, "snapshot-l1-shared.qcow2")

    # snapshot tables rebuilt from snap.qcow2's one entry, same L1
    def snapshots(pairs, name):
        i = B("snap.qcow2"); so = i.snapshots_offset
        extra = i.u32(so + 36)
        tbl_off = (len(i.b) + CL - 1) // CL * CL
        table = bytearray()
        for ident, nm in pairs:
            ent = bytearray(i.b[so:so + 40 + extra])
            struct.pack_into(">HH", ent, 12, len(ident), len(nm))
            ent += ident + nm
            table += ent + bytes(-len(ent) % 8)
        i.b += bytes(tbl_off - len(i.b)) + table
        i.set32(60, len(pairs)); i.set64(64, tbl_off)
        save(i, name)
    # 65536 snapshots, all names distinct: opening must not compare each pair
    snapshots([(b"%d" % (n + 1), b"n%05d" % n) for n in range(65536)],
              "snapshot-65536-names.qcow2")
    # names and IDs that are not file names: '/', escapes, duplicates, '#'
    snapshots([(b"../x", b""), (b"7", b"a\x1b[31mred"), (b"2", b"#2"),
               (b"2", b""), (b"5", b"ok")], "snapshot-hostile-names.qcow2")

    # a snapshot name with a NUL early and 5000 bytes after it (the table
    # spans two clusters, its strings' strlen one), refcounted as qemu
    # would, and guest cluster 0 mapped onto the table's second cluster:
    # a write there must be caught by the overlap check, not land in the
    # table
    snapshots([(b"1", b"a\0" + b"b" * 5000)], "snapshot-name-nul.qcow2")
    i = Image(os.path.join(out, "snapshot-name-nul.qcow2"))
    so = i.snapshots_offset
    i.b += bytes(-len(i.b) % CL)
    refblock = i.u64(i.reftable_offset) & OFFSET_MASK
    for c in range(so // CL, len(i.b) // CL):
        struct.pack_into(">H", i.b, refblock + 2 * c, 1)
    i.set64(i.l2_entry_off(0), COPIED | (so + CL))
    i.save(os.path.join(out, "snapshot-name-nul.qcow2"))

    # ---- backing files -------------------------------------------------
    i = B("overlay.qcow2"); i.set32(16, 4096); save(i, "backing-name-4096.qcow2")
    i = B("overlay.qcow2")
    set_backing_name(i, 'json:{"file.driver":"file","file.filename":"/etc/passwd"}')
    save(i, "backing-json.qcow2")
    i = B("overlay.qcow2"); set_backing_name(i, "nbd+unix:///x?socket=/run/x.sock")
    save(i, "backing-protocol.qcow2")
    i = B("overlay.qcow2"); set_backing_name(i, "backing-self.qcow2")
    # qemu's backing format says qcow2 so the loop is followed
    save(i, "backing-self.qcow2")
    fix_backing_fmt(os.path.join(out, "backing-self.qcow2"), "qcow2")
    i = B("overlay.qcow2"); set_backing_name(i, "backing-loop-b.qcow2"); save(i, "backing-loop-a.qcow2")
    i = B("overlay.qcow2"); set_backing_name(i, "backing-loop-a.qcow2"); save(i, "backing-loop-b.qcow2")
    for n in ("backing-loop-a.qcow2", "backing-loop-b.qcow2"):
        fix_backing_fmt(os.path.join(out, n), "qcow2")
    i = B("overlay.qcow2"); set_backing_name(i, "backing-fifo.pipe"); save(i, "backing-fifo.qcow2")
    fix_backing_fmt(os.path.join(out, "backing-fifo.qcow2"), "raw")
    fifo = os.path.join(out, "backing-fifo.pipe")
    if not os.path.exists(fifo):
        os.mkfifo(fifo)
    # a chain of 70 overlays: deeper than imgfs's bound of 64
    chain = os.path.join(out, "chain")
    os.makedirs(chain, exist_ok=True)
    run("qemu-img", "create", "-q", "-f", "raw", "c0.img", "1M", cwd=chain)
    prev, fmt = "c0.img", "raw"
    for n in range(1, 71):
        cur = "c%d.qcow2" % n
        run("qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", prev, "-F", fmt,
            "-o", "cluster_size=4096", cur, "1M", cwd=chain)
        prev, fmt = cur, "qcow2"

    # ---- partition tables (raw disks, and one inside a qcow2) ----------
    nsect = 2048
    disk = bytearray(nsect * 512)
    # p1 primary; p2 extended at 100 whose first EBR links back to itself
    disk[0:512] = mbr_sector([mbr_entry(0x80, 0x83, 8, 64),
                              mbr_entry(0, 0x05, 100, 1000)])
    disk[100 * 512:101 * 512] = mbr_sector([mbr_entry(0, 0x83, 8, 50),
                                            mbr_entry(0, 0x05, 0, 200)])
    write(out, "ebr-loop.img", disk)
    made.append("ebr-loop.img")
    disk = bytearray(nsect * 512)
    disk[0:512] = mbr_sector([mbr_entry(0, 0x83, 8, 64), mbr_entry(0, 0x05, 100, 1000)])
    # EBR chain: 100 -> 300 -> 200 (backwards: the chain ends there)
    disk[100 * 512:101 * 512] = mbr_sector([mbr_entry(0, 0x83, 8, 50), mbr_entry(0, 0x05, 200, 50)])
    disk[300 * 512:301 * 512] = mbr_sector([mbr_entry(0, 0x83, 8, 50), mbr_entry(0, 0x05, 100, 50)])
    disk[200 * 512:201 * 512] = mbr_sector([mbr_entry(0, 0x83, 8, 20), mbr_entry(0, 0, 0, 0)])
    write(out, "ebr-backward.img", disk)
    disk = bytearray(nsect * 512)
    disk[0:512] = mbr_sector([mbr_entry(0, 0x83, 8, 64), mbr_entry(0, 0x83, 1000, 0xffffff00)])
    write(out, "mbr-past-end.img", disk)
    gpt_disk(os.path.join(out, "gpt-entries-4g.img"), nentries=0xffffffff)
    gpt_disk(os.path.join(out, "gpt-entry-size-0.img"), entry_size=0)
    gpt_disk(os.path.join(out, "gpt-entry-size-huge.img"), entry_size=0x80000000)
    gpt_disk(os.path.join(out, "gpt-header-size-huge.img"), header_size=0xffffffff)
    gpt_disk(os.path.join(out, "gpt-bad-array-crc.img"), array_crc=0x12345678)
    gpt_disk(os.path.join(out, "gpt-primary-damaged.img"), damage_primary=True)
    # the EBR loop inside a qcow2, read through the qcow2 layer
    run("qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=4096",
        os.path.join(out, "ebr-loop.img"), os.path.join(out, "ebr-loop.qcow2"))

    # ---- files that are not images at all ------------------------------
    write(out, "empty.img", b"")
    write(out, "one-byte.img", b"Q")
    i = B("base.qcow2"); i.b = i.b[:i.l1_offset + 4]; save(i, "truncated-in-l1.qcow2")
    i = B("base.qcow2"); i.b = i.b[:len(i.b) - 32768]; save(i, "truncated-data.qcow2")
    print("\n".join(sorted(os.listdir(out))))


def write(d, name, data):
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def fix_backing_fmt(path, fmt):
    """Set the backing format extension's value (qemu wrote "raw")."""
    img = Image(path)
    off = img.u32(100)
    while off + 8 <= CL:
        magic, ln = img.u32(off), img.u32(off + 4)
        if magic == 0:
            break
        if magic == 0xe2792aca:
            fb = fmt.encode()
            img.set32(off + 4, len(fb))
            img.b[off + 8:off + 8 + ((ln + 7) & ~7)] = bytes((ln + 7) & ~7)
            img.b[off + 8:off + 8 + len(fb)] = fb
            assert (len(fb) + 7) & ~7 == (ln + 7) & ~7
            break
        off += 8 + ((ln + 7) & ~7)
    img.save(path)


def zstd_rle_frame(byte, size):
    """A zstd frame of RLE blocks (RFC 8878 §3.1.1) producing size bytes of
    byte, without the content size in the header: what a bomb looks like."""
    out = bytearray(struct.pack("<I", 0xFD2FB528))
    out.append(0x00)   # frame header descriptor: no FCS, no checksum, window
    out.append(0x58)   # window descriptor: 2^(10+11) = 2 MiB window
    left = size
    while left:
        n = min(left, 128 * 1024 - 1)
        left -= n
        last = 1 if left == 0 else 0
        hdr = last | (1 << 1) | (n << 3)   # block type 1: RLE
        out += struct.pack("<I", hdr)[:3]
        out.append(byte)
    return bytes(out)


if __name__ == "__main__":
    main()
