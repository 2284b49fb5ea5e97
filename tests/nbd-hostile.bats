#!/usr/bin/env bats
# imgfs-nbd against hostile clients, beyond the protocol errors of nbd.bats:
# connection floods past -e, slowloris handshakes, clients that vanish in
# the middle of a request or of a reply, and requests at the edges of the
# 32- and 64-bit fields.  Each time: the server stays up, other clients are
# served, and its descriptors and memory come back to where they were.
# Raw-socket clients in Python (Debian's /usr/bin/python3), Unix sockets
# only, every loop bounded and every client under a timeout.

load lib/common

setup() {
	common_setup
	PY=/usr/bin/python3
	# 64 MiB raw disk: 0x5a in the first MiB, sparse after
	truncate -s 64M r.raw
	$PY -c "
with open('r.raw', 'r+b') as f:
    f.write(b'\x5a' * (1 << 20))"
}

teardown() { common_teardown; }

# usage: start_nbd [imgfs-nbd options]   (r.raw, persistent, on $SOCK)
start_nbd() {
	SOCK="$T/n.sock"
	"$IMGFS_NBD" --fork --pid-file="$T/n.pid" -k "$SOCK" -t "$@" -f raw r.raw
	NBD_PID=$(cat "$T/n.pid")
	track_pid "$NBD_PID"
}

nfds() { ls "/proc/$NBD_PID/fd" | wc -l; }
rss_kb() { awk '/^VmRSS:/ { print $2 }' "/proc/$NBD_PID/status"; }
nthreads() { awk '/^Threads:/ { print $2 }' "/proc/$NBD_PID/status"; }

# Wait up to 10 s for the server to hold at most N descriptors.
fds_back_to() {
	for _ in $(seq 100); do
		[ "$(nfds)" -le "$1" ] && return 0
		sleep 0.1
	done
	echo "server holds $(nfds) descriptors, expected at most $1" >&2
	return 1
}

# The clients.  usage: client MODE [ARGS...]
client() {
	NBDWIRE_DIR="$BATS_TEST_DIRNAME/lib" timeout 60 $PY - "$SOCK" "$@" <<'PY'
import os, socket, struct, sys, time
path, mode, args = sys.argv[1], sys.argv[2], sys.argv[3:]
sys.path.insert(0, os.environ["NBDWIRE_DIR"])
from nbdwire import *
_conn = conn
def conn(timeout=20):
    return _conn(path, timeout)

def good():
    """A whole, well-behaved session: read 4 KiB of 0x5a, disconnect."""
    s = conn()
    handshake(s)
    request(s, READ, 4096, 4096)
    err, _ = reply(s)
    assert err == 0, err
    data = recvn(s, 4096)
    assert data == b"\x5a" * 4096
    request(s, DISC, 0, 0)
    s.close()
    print("served")

if mode == "good":
    good()

elif mode == "flood":
    # N connections at once that never speak; hold them SECS seconds
    n, secs = int(args[0]), float(args[1])
    socks = []
    for _ in range(n):
        s = socket.socket(socket.AF_UNIX)
        s.setblocking(False)
        try:
            s.connect(path)
        except BlockingIOError:
            pass
        socks.append(s)
    time.sleep(secs)
    for s in socks:
        s.close()
    print("flooded", n)

elif mode == "slowloris":
    # the handshake, one byte every INTERVAL seconds: when is it dropped?
    interval = float(args[0])
    s = conn(30)
    recvn(s, 18)
    msg = struct.pack(">I", 3) + struct.pack(">QII", IHAVEOPT, 1, 0)
    t = time.time()
    try:
        for b in msg * 8:
            s.send(bytes([b]))
            time.sleep(interval)
        print("never dropped")
    except (BrokenPipeError, ConnectionResetError):
        print("dropped after", round(time.time() - t), "s")

elif mode == "mid-request":
    # vanish in the middle of each kind of request, ROUNDS times
    for i in range(int(args[0])):
        for cut in ("header", "write-payload", "write-huge", "after-requests"):
            s = conn()
            handshake(s, structured=(i % 2 == 1))
            if cut == "header":
                s.sendall(struct.pack(">IHHQ", REQ, 0, READ, 7)[:13])
            elif cut == "write-payload":
                request(s, WRITE, 1 << 21, 1 << 20, payload=b"\x77" * 1000)
            elif cut == "write-huge":
                request(s, WRITE, 1 << 21, 32 << 20, payload=b"\x77" * 65536)
            else:
                for c in range(16):
                    request(s, READ, c << 20, 1 << 20, cookie=c)
            s.close()
    print("done")

elif mode == "mid-reply":
    # ask for many 32 MiB reads, take a few bytes of the answer, vanish
    for i in range(int(args[0])):
        s = conn()
        handshake(s, structured=(i % 2 == 1))
        for c in range(8):
            request(s, READ, (c % 2) << 25, 32 << 20, cookie=c)
        recvn(s, 1000)
        s.close()
    print("done")

elif mode == "edges":
    # each request gets an error, never a crash; the connection goes on
    structured = args[0] == "structured"
    s = conn()
    size = handshake(s, structured)
    M63, M64 = 1 << 63, 1 << 64
    cases = [
        (READ, 0, 0xffffffff, b""),
        (READ, 0, 0xfffffe00, b""),
        (READ, M63 - 1, 1, b""),
        (READ, M63, 0xfffffe00, b""),
        (READ, M64 - 512, 1024, b""),
        (READ, size, 1, b""),
        (READ, size - 512, 0xffffffff, b""),
        (WRITE, M64 - 8, 16, b"x" * 16),
        (WRITE, M63, 512, b"y" * 512),
        (TRIM, M63, 0xffffffff, b""),
        (TRIM, M64 - 4096, 8192, b""),
        (WZ, M64 - 4096, 8192, b""),
        (WZ, 0, 0xffffffff, b""),
        (CACHE, M63, 0xffffffff, b""),
        (BS, M64 - 512, 0xffffffff, b""),
        (BS, 0, 0xffffffff, b""),
    ]
    errs = []
    for i, (typ, off, ln, payload) in enumerate(cases):
        request(s, typ, off, ln, cookie=100 + i, payload=payload)
        err, _ = reply(s)
        errs.append(err)
    request(s, READ, 0, 512, cookie=7)
    err, data = reply(s)
    if data is None:
        data = recvn(s, 512)
    assert err == 0 and data == b"\x5a" * 512, (err, data[:8])
    print(" ".join(map(str, errs)))
PY
}

@test "300 connections at once past -e 4: dropped at the handshake limit, a good client served" {
	start_nbd -e 4 --handshake-limit=1
	base=$(nfds)
	client flood 300 4 &
	local flooder=$!
	sleep 0.5
	alive "$NBD_PID"
	# the flood holds its sockets, but each is dropped after 1 s: the
	# good client gets a slot once the backlog ahead of it is gone
	wait "$flooder"
	run client good
	[ "$output" = served ]
	fds_back_to "$base"
	alive "$NBD_PID"
}

@test "300 connections with -e 0 (cap 256) do not starve a good client" {
	start_nbd -e 0 --handshake-limit=2
	base=$(nfds)
	client flood 300 6 &
	local flooder=$!
	sleep 0.5
	start=$(date +%s)
	run client good
	[ "$output" = served ]
	echo "# a good client behind 300 idle ones: $(( $(date +%s) - start )) s" >&3
	wait "$flooder"
	fds_back_to "$base"
	# the server holds no thread for a connection that is gone
	[ "$(nthreads)" -le 4 ]
}

@test "slowloris handshakes (a byte every 0.4 s) are dropped at the limit, others served meanwhile" {
	start_nbd -e 4 --handshake-limit=2
	for i in 1 2 3; do
		client slowloris 0.4 >"slow$i.out" &
		pids+=($!)
	done
	sleep 0.5
	run client good
	[ "$output" = served ]
	for p in "${pids[@]}"; do
		wait "$p"
	done
	cat slow*.out
	[ "$(grep -c 'dropped after [2-6] s' slow*.out | awk -F: '{ s += $2 } END { print s }')" -eq 3 ]
	alive "$NBD_PID"
}

@test "clients vanishing mid-request (header, write payload, pipelined reads) leave nothing behind" {
	start_nbd -e 2
	client good
	base=$(nfds)
	run client mid-request 25
	[ "$output" = done ]
	alive "$NBD_PID"
	run client good
	[ "$output" = served ]
	fds_back_to "$base"
	# the partial writes wrote nothing: their payloads never arrived whole
	cmp -n $((1 << 20)) <(head -c $((1 << 20)) /dev/zero) <(dd if=r.raw bs=1M skip=2 count=1 status=none)
}

@test "clients vanishing mid-reply of 8 x 32 MiB reads: the server lives, memory stays flat" {
	# in the sanitizer build, ASan's quarantine of freed memory (256 MiB by
	# default) would count as growth: keep it small
	ASAN_OPTIONS="${ASAN_OPTIONS:+$ASAN_OPTIONS:}quarantine_size_mb=16" start_nbd -e 2
	run client mid-reply 4
	[ "$output" = done ]
	client good
	before=$(rss_kb)
	run client mid-reply 30
	[ "$output" = done ]
	run client good
	[ "$output" = served ]
	sleep 1
	after=$(rss_kb)
	echo "# VmRSS after 4 and after 34 abandoned 256 MiB replies: $before kB, $after kB" >&3
	[ "$after" -lt $((before + 65536)) ]
	alive "$NBD_PID"
}

@test "lengths near 2^32 and offsets near 2^63 and 2^64 get errors, and the connection goes on" {
	start_nbd
	run client edges simple
	echo "$output"
	[ "$status" -eq 0 ]
	for e in $output; do
		[ "$e" -ne 0 ]
	done
	run client edges structured
	echo "$output"
	[ "$status" -eq 0 ]
	for e in $output; do
		[ "$e" -ne 0 ]
	done
	alive "$NBD_PID"
	[ "$(stat -c %s r.raw)" -eq $((64 << 20)) ]
}
