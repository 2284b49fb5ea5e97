# SPDX-License-Identifier: LGPL-2.1-or-later
"""NBD on the wire, for the tests' raw-socket clients (tests/nbd.bats,
tests/nbd-hostile.bats): just enough of the protocol (doc/proto.md of
NetworkBlockDevice/nbd) to speak it well or badly on purpose."""
import socket
import struct

IHAVEOPT = 0x49484156454F5054
REQ, SIMPLE, STRUCT = 0x25609513, 0x67446698, 0x668E33EF
READ, WRITE, DISC, FLUSH, TRIM, CACHE, WZ, BS = 0, 1, 2, 3, 4, 5, 6, 7


def conn(path, timeout=20):
    """A Unix-socket connection to the server at PATH."""
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(timeout)
    s.connect(path)
    return s


def recvn(s, n):
    """Exactly N bytes, or EOFError."""
    b = b""
    while len(b) < n:
        c = s.recv(n - len(b))
        if not c:
            raise EOFError
        b += c
    return b


def eof(s):
    """Read until the server closes the connection; True then."""
    try:
        while s.recv(4096):
            pass
    except (ConnectionResetError, BrokenPipeError):
        pass
    return True


def handshake(s, structured=False):
    """Fixed newstyle, no zeroes, optionally structured replies, then
    NBD_OPT_EXPORT_NAME ""; returns the export's size."""
    assert recvn(s, 18)[:8] == b"NBDMAGIC"
    s.sendall(struct.pack(">I", 3))      # FIXED_NEWSTYLE | NO_ZEROES
    if structured:
        s.sendall(struct.pack(">QII", IHAVEOPT, 8, 0))
        _magic, _opt, typ, ln = struct.unpack(">QIII", recvn(s, 20))
        recvn(s, ln)
        assert typ == 1, typ
    s.sendall(struct.pack(">QII", IHAVEOPT, 1, 0))   # EXPORT_NAME ""
    size, _flags = struct.unpack(">QH", recvn(s, 10))
    return size


def request(s, typ, off, ln, cookie=1, flags=0, payload=b""):
    s.sendall(struct.pack(">IHHQQI", REQ, flags, typ, cookie, off, ln) + payload)


def reply(s):
    """(error, data) for one request, simple or structured; a simple READ
    reply's data is left on the socket (data is None)."""
    magic = struct.unpack(">I", recvn(s, 4))[0]
    if magic == SIMPLE:
        err, _cookie = struct.unpack(">IQ", recvn(s, 12))
        return err, None
    assert magic == STRUCT, hex(magic)
    err, data = 0, b""
    while True:
        flags, typ, _cookie, ln = struct.unpack(">HHQI", recvn(s, 16))
        body = recvn(s, ln)
        if typ & 0x8000:
            err = struct.unpack(">I", body[:4])[0]
        elif typ == 1:
            data += body[8:]
        if flags & 1:
            return err, data
        magic = struct.unpack(">I", recvn(s, 4))[0]
        assert magic == STRUCT
