#!/usr/bin/env bats
# imgfs-nbd: images, views and mounts over NBD, checked with real clients
# (nbdinfo, nbdcopy, nbdsh, qemu-img, qemu-io, fio) and with hostile ones.

load lib/common

setup() {
	common_setup
	# nbdsh and the libnbd module belong to Debian's python3; a python3
	# earlier on PATH (pyenv, venv) would not have them.
	PY=/usr/bin/python3
	qemu-img create -q -f qcow2 a.qcow2 64M
	qemu-io -f qcow2 -c 'write -P 0x11 0 1M' -c 'write -P 0x22 10M 64k' \
		-c 'write -z 20M 1M' -c 'write -P 0x33 40M 3M' a.qcow2 >/dev/null
	truncate -s 32M r.raw
	printf 'label: dos\nstart=2048, size=8192, type=83\nstart=16384, type=83\n' | sfdisk -q r.raw
}
teardown() { common_teardown; }

nbdsh() { PATH=/usr/bin:$PATH command nbdsh "$@"; }

# Start imgfs-nbd on a Unix socket in the background; ready when it returns.
# usage: start_nbd NAME [imgfs-nbd options] PATH   -> sets URI and NBD_PID
start_nbd() {
	local name=$1
	shift
	"$IMGFS_NBD" --fork --pid-file="$T/$name.pid" -k "$T/$name.sock" "$@"
	NBD_PID=$(cat "$T/$name.pid")
	track_pid "$NBD_PID"
	SOCK="$T/$name.sock"
	URI="nbd+unix:///?socket=$SOCK"
}

# Extents as "start length data" lines, adjacent equal ones merged.
# usage: extents qemu|nbd FILE
extents() {
	$PY - "$1" "$2" <<'PY'
import json, sys
kind, path = sys.argv[1], sys.argv[2]
rows = json.load(open(path))
out = []
for r in rows:
    if kind == "qemu":
        s, n, d = r["start"], r["length"], r["data"]
    else:
        s, n, d = r["offset"], r["length"], not (r["type"] & 1)
    if out and out[-1][2] == d and out[-1][0] + out[-1][1] == s:
        out[-1][1] += n
    else:
        out.append([s, n, d])
for s, n, d in out:
    print(s, n, d)
PY
}

# A raw-socket client; prints what happened.  usage: hostile KIND
hostile() {
	NBDWIRE_DIR="$BATS_TEST_DIRNAME/lib" $PY - "$SOCK" "$1" <<'PY'
import os, struct, sys, time
path, kind = sys.argv[1], sys.argv[2]
sys.path.insert(0, os.environ["NBDWIRE_DIR"])
from nbdwire import IHAVEOPT, REQ, conn, eof, recvn
s = conn(path)
hello = recvn(s, 18)
assert hello[:8] == b"NBDMAGIC"
if kind == "stall":
    t = time.time()
    print("dropped after", round(eof(s) and time.time() - t), "s")
    sys.exit(0)
s.sendall(struct.pack(">I", 3))
if kind == "bad-option-magic":
    s.sendall(b"X" * 16)
elif kind == "oversized-option":
    s.sendall(struct.pack(">QII", IHAVEOPT, 7, 0xFFFFFFFF))
elif kind == "huge-name":
    s.sendall(struct.pack(">QII", IHAVEOPT, 7, 65000) + struct.pack(">I", 64994) + b"a" * 64994 + b"\0\0")
    rep = recvn(s, 20)
    print("reply", hex(struct.unpack(">QIII", rep)[2]))
    s.sendall(struct.pack(">QII", IHAVEOPT, 2, 0))
    recvn(s, 20)
else:
    s.sendall(struct.pack(">QII", IHAVEOPT, 1, 0))       # EXPORT_NAME ""
    recvn(s, 10)
    if kind == "oversized-write":
        s.sendall(struct.pack(">IHHQQI", REQ, 0, 1, 1, 0, 33 * 1024 * 1024) + b"\0" * 4096)
    elif kind == "bad-request-magic":
        s.sendall(b"\xde\xad\xbe\xef" + b"\0" * 24)
    elif kind == "unknown-command":
        s.sendall(struct.pack(">IHHQQI", REQ, 0, 77, 5, 0, 0))
        magic, err, cookie = struct.unpack(">IIQ", recvn(s, 16))
        print("error", err)
        sys.exit(0)
print("disconnected" if eof(s) else "still open")
PY
}

# ---- images -----------------------------------------------------------------

@test "nbdinfo sees the qcow2 image's size, flags and block sizes" {
	start_nbd a a.qcow2
	run nbdinfo --json "$URI"
	[ "$status" -eq 0 ]
	echo "$output" | jq -e '.exports[0]["export-size"] == 67108864'
	echo "$output" | jq -e '.exports[0]["block_size_maximum"] == 33554432'
	echo "$output" | jq -e '.exports[0]["block_size_preferred"] == 4096'
	echo "$output" | jq -e '.exports[0]["can_flush"] == true'
	echo "$output" | jq -e '.exports[0]["can_df"] == true'
}

@test "multi-conn is offered only when more than one client may connect" {
	start_nbd one -f raw r.raw
	[ "$(nbdinfo --json "$URI" | jq '.exports[0].can_multi_conn')" = false ]
	start_nbd two -e 2 -f raw r.raw -r
	[ "$(nbdinfo --json "$URI" | jq '.exports[0].can_multi_conn')" = true ]
}

@test "nbdinfo --list shows the export name and description" {
	start_nbd a -x myexport -D "my description" a.qcow2
	run nbdinfo --list "$URI"
	[ "$status" -eq 0 ]
	[[ "$output" == *'export="myexport"'* ]]
	[[ "$output" == *'description: my description'* ]]
}

@test "nbdinfo --map agrees with qemu-img map on what is data" {
	qemu-img map --output=json a.qcow2 > q.json
	start_nbd a -t a.qcow2
	nbdinfo --map --json "$URI" > n.json
	diff <(extents qemu q.json) <(extents nbd n.json)
}

@test "nbdcopy of the export equals qemu-img convert -O raw" {
	qemu-img convert -O raw a.qcow2 ref.raw
	start_nbd a a.qcow2
	nbdcopy "$URI" out.raw
	same_bytes out.raw ref.raw
}

# Data replies go straight from the files that hold the bytes (sendfile),
# zeroes from memory; compressed clusters are read and sent as before.
@test "sendfile replies give qemu's bytes over backing, zero and compressed clusters, structured or simple" {
	qemu-img create -q -f qcow2 base.qcow2 8M
	qemu-io -c "write -P 0x61 0 8M" base.qcow2 >/dev/null
	qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 top.qcow2
	qemu-io -c "write -P 0x62 1M 1M" -c "write -z 2176k 64k" -c "write -c -P 0x63 3M 64k" \
		-c "write -P 0x64 4000k 3M" top.qcow2 >/dev/null
	qemu-img convert -O raw top.qcow2 ref.raw
	start_nbd a -t -r top.qcow2
	nbdcopy "$URI" out.raw
	same_bytes out.raw ref.raw
	$PY -c '
import nbd, sys
h = nbd.NBD()
h.set_request_structured_replies(False)
h.connect_uri(sys.argv[1])
assert not h.get_structured_replies_negotiated()
with open(sys.argv[2], "wb") as f:
    for off in range(0, h.get_size(), 900 * 1024):
        f.write(h.pread(min(900 * 1024, h.get_size() - off), off))
' "$URI" simple.raw
	same_bytes simple.raw ref.raw
}

@test "qemu-img compare finds the export identical to the image" {
	start_nbd a a.qcow2
	qemu-img compare -U a.qcow2 "$URI"
}

@test "-A reports allocation depth through a backing chain" {
	qemu-img create -q -f qcow2 -b a.qcow2 -F qcow2 top.qcow2
	qemu-io -f qcow2 -c 'write -P 0x55 10M 64k' top.qcow2 >/dev/null
	start_nbd a -A top.qcow2
	run nbdinfo --map=qemu:allocation-depth "$URI"
	[ "$status" -eq 0 ]
	echo "$output"
	[[ "$(echo "$output" | grep -w 10485760)" == *local* ]]
	[[ "$(echo "$output" | grep -w 0)" == *"backing depth 2"* ]]
	[[ "$output" == *absent* ]]
}

@test "qemu-io reads the patterns qemu-io wrote" {
	start_nbd a -t a.qcow2
	qemu-io -r -f raw -c 'read -P 0x11 0 1M' -c 'read -P 0x22 10M 64k' \
		-c 'read -P 0 20M 1M' -c 'read -P 0x33 40M 3M' "$URI"
}

@test "writes through a raw export land in the image" {
	start_nbd r -t -f raw r.raw
	qemu-io -f raw -c 'write -P 0x66 1M 1M' -c 'write -z -u 3M 64k' "$URI"
	qemu-io -f raw -c 'read -P 0x66 1M 1M' -c 'read -P 0 3M 64k' "$URI"
	kill "$NBD_PID"
	wait_gone "$NBD_PID"
	qemu-io -f raw -c 'read -P 0x66 1M 1M' r.raw
}

@test "-P 1 exports partition 1 and -o an offset into it" {
	pattern_file pat 4194304 7
	dd if=pat of=r.raw bs=512 seek=2048 conv=notrunc status=none
	start_nbd p -t -P 1 -f raw r.raw -r
	[ "$(nbdinfo --size "$URI")" -eq $((8192 * 512)) ]
	nbdcopy "$URI" p1.raw
	dd if=r.raw of=ref.raw bs=512 skip=2048 count=8192 status=none
	same_bytes p1.raw ref.raw
	start_nbd o -P 1 -o 4096 -f raw r.raw -r -e 2
	nbdcopy "$URI" o.raw
	dd if=r.raw of=ref2.raw bs=512 skip=$((2048 + 8)) count=$((8192 - 8)) status=none
	same_bytes o.raw ref2.raw
}

@test "-l exports an internal snapshot as it was" {
	qemu-img snapshot -c before a.qcow2
	qemu-io -f qcow2 -c 'write -P 0x77 0 1M' a.qcow2 >/dev/null
	qemu-img convert -O raw -l snapshot.name=before a.qcow2 ref.raw
	start_nbd s -t -l before a.qcow2
	[ "$(nbdinfo --json "$URI" | jq '.exports[0].is_read_only')" = true ]
	nbdcopy "$URI" snap.raw
	same_bytes snap.raw ref.raw
}

@test "-r refuses writes with EPERM" {
	start_nbd r -r -f raw r.raw
	run nbdsh -u "$URI" -c '
h.set_strict_mode(0)
try:
    h.pwrite(b"x" * 512, 0)
    print("written")
except nbd.Error as e:
    print(e.errno)
'
	[ "$output" = EPERM ]
}

@test "fio: two connections, iodepth 16, write and verify on a raw export" {
	truncate -s 128M f.raw
	start_nbd f -t -e 2 -f raw f.raw
	fio --name=w --ioengine=nbd --uri="$URI" --rw=randwrite --bs=4k \
		--iodepth=16 --numjobs=2 --size=32M --offset_increment=32M \
		--verify=crc32c --do_verify=1 --group_reporting \
		--output="$T/fio.out"
	grep -q 'err= 0' "$T/fio.out"
}

@test "nbdsh with strict mode off: the errors the spec names" {
	truncate -s 128M big.raw
	start_nbd r -t -f raw big.raw
	run nbdsh -u "$URI" -c '
h.set_strict_mode(0)
size = h.get_size()
def e(f):
    try:
        f()
        return "ok"
    except nbd.Error as x:
        return x.errno
print(e(lambda: h.pread(512, size)),
      e(lambda: h.pread(1024, size - 512)),
      e(lambda: h.pwrite(b"x" * 512, size)),
      e(lambda: h.zero(512, size)),
      e(lambda: h.trim(512, size)),
      e(lambda: h.pread(512, 0, flags=1 << 9)),
      e(lambda: h.pread(0, 0)),
      e(lambda: h.pwrite(b"", 0)),
      e(lambda: h.pread(3, 1)),
      e(lambda: h.pread(64 << 20, 0)),
      e(lambda: h.block_status(0, 0, lambda *a: 0)),
      e(lambda: h.cache(4096, 0)),
      e(lambda: h.flush()))
'
	echo "$output"
	[ "$output" = "EINVAL EINVAL ENOSPC ENOSPC EINVAL EINVAL ok ok ok EOVERFLOW EINVAL ok ok" ]
}

@test "requests in flight come back matched by cookie" {
	start_nbd a -t a.qcow2
	run nbdsh -u "$URI" -c '
# 16 reads of 64 KiB: the first MiB, 0x11 throughout
bufs = [nbd.Buffer(65536) for _ in range(16)]
cookies = [h.aio_pread(bufs[i], i * 65536) for i in range(16)]
while h.aio_in_flight() > 0:
    h.poll(-1)
for i, c in enumerate(cookies):
    assert h.aio_command_completed(c)
    assert bufs[i].to_bytearray() == bytearray([0x11]) * 65536, i
print("ok")
'
	[ "$output" = ok ]
}

# ---- hostile clients, each followed by a good one ----------------------------

@test "a bad option magic is dropped; the next client is served" {
	start_nbd a -t a.qcow2
	run hostile bad-option-magic
	[ "$output" = disconnected ]
	nbdinfo --size "$URI"
}

@test "an oversized option is dropped; the next client is served" {
	start_nbd a -t a.qcow2
	run hostile oversized-option
	[ "$output" = disconnected ]
	nbdinfo --size "$URI"
}

@test "a 64 KB export name gets NBD_REP_ERR_INVALID; the next client is served" {
	start_nbd a -t a.qcow2
	run hostile huge-name
	[ "${lines[0]}" = "reply 0x80000003" ]
	nbdinfo --size "$URI"
}

@test "a write over 32 MiB is dropped unbuffered; the next client is served" {
	start_nbd r -t -f raw r.raw
	run hostile oversized-write
	[ "$output" = disconnected ]
	nbdinfo --size "$URI"
}

@test "a bad request magic is dropped; an unknown command gets EINVAL" {
	start_nbd a -t a.qcow2
	run hostile bad-request-magic
	[ "$output" = disconnected ]
	run hostile unknown-command
	[ "$output" = "error 22" ]
	nbdinfo --size "$URI"
}

@test "a client stalled in the handshake is dropped and the next one served" {
	start_nbd a -t --handshake-limit=1 a.qcow2
	hostile stall > stall.out &
	local staller=$!
	sleep 0.3
	# -e 1: the good client waits for the staller's slot
	timeout 8 nbdinfo --size "$URI"
	wait "$staller"
	grep -qE "dropped after [12] s" stall.out
}

# ---- sockets handed in ---------------------------------------------------------

@test "--fd serves an inherited listening socket" {
	pid=$($PY - "$IMGFS_NBD" "$T/fd.sock" a.qcow2 <<'PY'
import socket, subprocess, sys
nbd, path, img = sys.argv[1:]
s = socket.socket(socket.AF_UNIX)
s.bind(path)
s.listen(8)
p = subprocess.Popen([nbd, "--fd=%d" % s.fileno(), "-t", img], pass_fds=[s.fileno()],
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
print(p.pid)
PY
)
	track_pid "$pid"
	# no waiting for readiness: the socket already listens
	qemu-img compare -U a.qcow2 "nbd+unix:///?socket=$T/fd.sock"
}

@test "systemd socket activation" {
	systemd-socket-activate -l "$T/sa.sock" "$IMGFS_NBD" -t a.qcow2 2>/dev/null &
	track_pid $!
	for _ in $(seq 50); do [ -S "$T/sa.sock" ] && break; sleep 0.1; done
	qemu-img compare -U a.qcow2 "nbd+unix:///?socket=$T/sa.sock"
}

@test "nbdcopy runs imgfs-nbd itself: nbdcopy -- [ imgfs-nbd ... ]" {
	qemu-img convert -O raw a.qcow2 ref.raw
	nbdcopy -- [ "$IMGFS_NBD" -f qcow2 a.qcow2 ] out.raw
	same_bytes out.raw ref.raw
}

@test "without -t the server exits when its client leaves" {
	start_nbd a a.qcow2
	nbdinfo --size "$URI"
	wait_gone "$NBD_PID"
	[ ! -e "$SOCK" ]
}

# ---- views of a mount, served by the mount's daemon ----------------------------

@test "a view of a mount is served by the mount's daemon, coherent with it" {
	mkdir mnt
	mount_imgfs r.raw mnt --format=raw
	start_nbd p1 -t mnt/p1
	[ "$(nbdinfo --size "$URI")" -eq $((8192 * 512)) ]
	qemu-io -f raw -c 'write -P 0x99 4096 64k' "$URI"
	[ "$(od -An -tx1 -j 4096 -N 4 mnt/p1 | tr -d ' ')" = 99999999 ]
	printf 'ABCD' | dd of=mnt/p1 bs=1 seek=0 conv=notrunc status=none
	[ "$(nbdsh -u "$URI" -c 'print(h.pread(4, 0).decode())')" = ABCD ]
	# the daemon holds the image: a second opener would be refused
	run "$IMGFS_NBD" -k "$T/x.sock" -f raw r.raw
	[ "$status" -ne 0 ]
}

@test "a single-file mount is exported through its daemon" {
	cp r.raw m.raw
	mount_imgfs m.raw m.raw --format=raw -P 1
	start_nbd fm -t m.raw
	[ "$(nbdinfo --size "$URI")" -eq $((8192 * 512)) ]
	qemu-io -f raw -c 'write -P 0x5a 0 4k' "$URI"
	[ "$(od -An -tx1 -N 2 m.raw | tr -d ' ')" = 5a5a ]
}

@test "hostile clients of a mount's export never take the mount down" {
	mkdir mnt
	mount_imgfs r.raw mnt --format=raw
	start_nbd p1 -t -e 0 --handshake-limit=1 mnt/p1
	for kind in bad-option-magic oversized-option oversized-write bad-request-magic stall; do
		hostile "$kind"
	done
	nbdinfo --size "$URI"
	cmp -n 4096 mnt/disk r.raw
}

@test "a snapshot view of a mount is exported read-only, as it was" {
	qemu-img snapshot -c before a.qcow2
	qemu-io -f qcow2 -c 'write -P 0x77 0 1M' a.qcow2 >/dev/null
	mkdir mnt
	mount_imgfs a.qcow2 mnt
	start_nbd snap -t mnt/snap@before
	[ "$(nbdinfo --json "$URI" | jq '.exports[0].is_read_only')" = true ]
	qemu-io -r -f raw -c 'read -P 0x11 0 1M' "$URI"
}

@test "a mount directory exports every view by name, disk by default" {
	mkdir mnt
	mount_imgfs r.raw mnt --format=raw
	start_nbd all -t -e 0 mnt
	run nbdinfo --list "$URI"
	[[ "$output" == *'export="disk"'* ]]
	[[ "$output" == *'export="p1"'* ]]
	[[ "$output" == *'export="p2"'* ]]
	[ "$(nbdinfo --size "$URI")" -eq $((32 * 1024 * 1024)) ]
	[ "$(nbdinfo --size "nbd+unix:///p1?socket=$SOCK")" -eq $((8192 * 512)) ]
	start_nbd p2 -t -P 2 mnt
	[ "$(nbdinfo --size "$URI")" -eq $(((32 * 2048 - 16384) * 512)) ]
}

@test "a mount directory's exports follow a rewritten partition table" {
	mkdir mnt
	mount_imgfs r.raw mnt --format=raw
	start_nbd all -t -e 0 mnt
	run nbdinfo --list "$URI"
	[[ "$output" != *'export="p3"'* ]]
	printf 'label: dos\nstart=2048, size=2048, type=83\nstart=4096, size=2048, type=83\nstart=8192, type=83\n' |
		sfdisk -q --no-reread --no-tell-kernel mnt/disk
	run nbdinfo --list "$URI"
	[[ "$output" == *'export="p3"'* ]]
	[ "$(nbdinfo --size "nbd+unix:///p2?socket=$SOCK")" -eq $((2048 * 512)) ]
}

@test "the export ends with imgfs-nbd, and the view can be exported again" {
	mkdir mnt
	mount_imgfs r.raw mnt --format=raw
	start_nbd p1 -t -r mnt/p1
	nbdinfo --size "$URI"
	kill "$NBD_PID"
	wait_gone "$NBD_PID"
	run nbdinfo --size "$URI"
	[ "$status" -ne 0 ]
	start_nbd again -t mnt/p1
	nbdinfo --size "$URI"
	# without -t, the daemon stops serving when the client leaves, and imgfs-nbd exits
	start_nbd once mnt/disk
	nbdinfo --size "$URI"
	wait_gone "$NBD_PID"
}

@test "unmounting ends the export, and imgfs-nbd exits 0" {
	mkdir mnt
	mount_imgfs r.raw mnt --format=raw
	"$IMGFS_NBD" -k "$T/p1.sock" -t mnt/p1 &
	local pid=$! st=0
	track_pid "$pid"
	for _ in $(seq 50); do nbdinfo --size "nbd+unix:///?socket=$T/p1.sock" && break; sleep 0.1; done
	unmount_imgfs mnt
	wait "$pid" || st=$?
	[ "$st" -eq 0 ]
}

@test "imgfs-nbd fails when the mount's daemon dies under it" {
	mkdir mnt
	mount_imgfs r.raw mnt --format=raw
	"$IMGFS_NBD" -k "$T/p1.sock" -t mnt/p1 2>"$T/nbd.err" &
	local pid=$!
	track_pid "$pid"
	for _ in $(seq 50); do nbdinfo --size "nbd+unix:///?socket=$T/p1.sock" && break; sleep 0.1; done
	kill -9 "$(last_pid)"
	local st=0
	wait "$pid" || st=$?
	[ "$st" -eq 1 ]
	grep -q "went away" "$T/nbd.err"
}

@test "TCP: listens on 127.0.0.1 by default, on the port given" {
	port=$($PY -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
	"$IMGFS_NBD" --fork --pid-file="$T/tcp.pid" -t -p "$port" a.qcow2
	track_pid "$(cat "$T/tcp.pid")"
	grep -q "0100007F:$(printf '%04X' "$port") 00000000:0000 0A" /proc/net/tcp
	qemu-img compare -U a.qcow2 "nbd://127.0.0.1:$port"
}

@test "imgfs-nbd refuses a directory that is not a mount, and bad options" {
	mkdir plain
	run "$IMGFS_NBD" -k "$T/x.sock" plain
	[ "$status" -ne 0 ]
	[[ "$output" == *"not an imgfs mount"* ]]
	run "$IMGFS_NBD" -k "$T/x.sock" -p 1 a.qcow2
	[ "$status" -ne 0 ]
	run "$IMGFS_NBD" --shared=x a.qcow2
	[ "$status" -ne 0 ]
}

@test "imgfs-nbd names a number option out of range and what it expected" {
	# a missing image: an option wrongly accepted exits 1, it does not serve
	run "$IMGFS_NBD" --shared=257 missing.qcow2
	[ "$status" -eq 2 ]
	[ "$output" = "imgfs-nbd: --shared=257: expected 0 to 256" ]
	run "$IMGFS_NBD" -o -1 missing.qcow2
	[ "$status" -eq 2 ]
	[ "$output" = "imgfs-nbd: --offset=-1: expected a byte count" ]
	run "$IMGFS_NBD" -P 0 missing.qcow2
	[ "$status" -eq 2 ]
	[ "$output" = "imgfs-nbd: --partition=0: expected a number from 1" ]
	run "$IMGFS_NBD" --fd=3x missing.qcow2
	[ "$status" -eq 2 ]
	[ "$output" = "imgfs-nbd: --fd=3x: expected a descriptor number" ]
	run "$IMGFS_NBD" --handshake-limit=3601 missing.qcow2
	[ "$status" -eq 2 ]
	[ "$output" = "imgfs-nbd: --handshake-limit=3601: expected 1 to 3600 seconds" ]
}
