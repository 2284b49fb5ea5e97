#!/usr/bin/env bats
# When the host fails us: the file system under a qcow2 image fills up, the
# host file returns EIO while metadata is written back or at close, and an
# old overlay records no backing format.  Each error reaches the writer as
# an error, the daemon lives on and unmounts, and qemu-img check finds no
# corruption afterwards (leaked clusters are acceptable: a cluster allocated
# for a write that then failed is lost, as in qemu).

load lib/common

MiB=$((1024 * 1024))

setup() {
	common_setup
	mkdir mnt
}
teardown() {
	common_teardown
	if [ -n "${_NBDFUSE:-}" ]; then
		fusermount3 -u "$T/host" 2>/dev/null || umount -l "$T/host" 2>/dev/null
		wait_gone "$_NBDFUSE" 2>/dev/null || kill -9 "$_NBDFUSE" 2>/dev/null
	fi
	if [ -n "${_TMPFS:-}" ]; then
		umount "$_TMPFS" 2>/dev/null || umount -l "$_TMPFS"
	fi
}

# A file system of SIZE (tmpfs) at $T/small, unmounted in teardown.
small_host() {
	mkdir small
	mount -t tmpfs -o "size=$1" tmpfs small || skip "cannot mount a tmpfs here (root only)"
	_TMPFS="$T/small"
}

# Serve IMAGE as $T/host/NAME through nbdkit's sh plugin and nbdfuse, failing
# as $T/fail says while it exists: "all" fails every write and flush with
# EIO, "START END" the writes that touch bytes [START, END) of IMAGE.
# usage: faulty_host IMAGE
faulty_host() {
	local name=${1##*/}
	command -v nbdkit >/dev/null && command -v nbdfuse >/dev/null ||
		skip "nbdkit and nbdfuse are needed to inject EIO"
	cat >host.sh <<'SH'
#!/bin/bash
case "$1" in
get_size) stat -c %s "$IMAGE" ;;
can_write | can_flush) exit 0 ;;
pread) dd if="$IMAGE" skip="$4" count="$3" iflag=skip_bytes,count_bytes status=none ;;
pwrite)
	if [ -e "$FAIL" ]; then
		read -r start end <"$FAIL"
		if [ "$start" = all ] || { [ "$4" -lt "$end" ] && [ $(($4 + $3)) -gt "$start" ]; }; then
			cat >/dev/null
			echo "EIO injected" >&2
			exit 1
		fi
	fi
	dd of="$IMAGE" seek="$4" conv=notrunc oflag=seek_bytes status=none ;;
flush)
	if [ -e "$FAIL" ] && [ "$(cat "$FAIL")" = all ]; then
		echo "EIO injected" >&2
		exit 1
	fi
	sync "$IMAGE" ;;
*) exit 2 ;;
esac
SH
	chmod +x host.sh
	mkdir host
	IMAGE=$1 FAIL="$T/fail" nbdfuse "host/$name" --command nbdkit -s sh "$T/host.sh" \
		2>"$T/nbdfuse.err" &
	_NBDFUSE=$!
	for _ in $(seq 100); do
		[ -e "host/$name" ] && return 0
		sleep 0.05
	done
	cat "$T/nbdfuse.err" >&2
	return 1
}

# The file offset of the L2 table of guest cluster 0 in IMAGE (v3, 64 KiB
# clusters), from L1 entry 0.
# usage: l2_offset IMAGE
l2_offset() {
	/usr/bin/python3 - "$1" <<'PY'
import struct, sys
with open(sys.argv[1], "rb") as f:
    h = f.read(48)
    f.seek(struct.unpack(">Q", h[40:48])[0])
    print(struct.unpack(">Q", f.read(8))[0] & 0x00FFFFFFFFFFFE00)
PY
}

# Stop serving $T/host: what imgfs wrote is then in the image file itself.
stop_faulty_host() {
	fusermount3 -u host
	wait_gone "$_NBDFUSE"
	_NBDFUSE=
}

# No corruption: clean (0) or only leaked clusters (3).
# usage: check_no_corruption IMAGE
check_no_corruption() {
	run qemu-img check "$1"
	echo "$output"
	[ "$status" -eq 0 ] || [ "$status" -eq 3 ]
	[[ "$output" != *ERROR* ]]
}

@test "a write that does not fit on the host fails with ENOSPC, and what was flushed before stays" {
	small_host 8m
	qemu-img create -q -f qcow2 small/a.qcow2 64M
	pattern_file p1 $MiB 1
	pattern_file p2 $((16 * MiB)) 2
	mount_imgfs small/a.qcow2 mnt
	pid=$(last_pid)
	dd if=p1 of=mnt/disk bs=64k conv=notrunc,fsync status=none
	run dd if=p2 of=mnt/disk bs=1M seek=2 conv=notrunc,fsync
	[ "$status" -ne 0 ]
	[[ "$output" == *"No space left on device"* ]]
	alive "$pid"
	cmp -n $MiB p1 mnt/disk
	unmount_imgfs mnt
	not_mounted mnt
	check_no_corruption small/a.qcow2
	qemu_raw small/a.qcow2 out.raw
	cmp -n $MiB p1 out.raw
}

@test "once the host has room again, writes that failed with ENOSPC succeed" {
	small_host 8m
	qemu-img create -q -f qcow2 small/a.qcow2 64M
	head -c $((5 * MiB)) /dev/zero >small/filler
	pattern_file p1 $((4 * MiB)) 3
	mount_imgfs small/a.qcow2 mnt
	run dd if=p1 of=mnt/disk bs=1M seek=8 conv=notrunc,fsync
	[ "$status" -ne 0 ]
	[[ "$output" == *"No space left on device"* ]]
	rm small/filler
	dd if=p1 of=mnt/disk bs=1M seek=8 conv=notrunc,fsync status=none
	dd if=mnt/disk bs=1M skip=8 count=4 status=none | cmp p1 -
	unmount_imgfs mnt
	check_no_corruption small/a.qcow2
	qemu_raw small/a.qcow2 out.raw
	dd if=out.raw bs=1M skip=8 count=4 status=none | cmp p1 -
}

# qemu-io with one command per line of FILE, read-only, 500 at a time.
# usage: qemu_io_lines IMAGE FILE
qemu_io_lines() {
	local args=() c n=0
	while IFS= read -r c; do
		args+=(-c "$c")
		n=$((n + 1))
		if [ "$n" -eq 500 ]; then
			qemu-io -r -f qcow2 "${args[@]}" "$1" || return 1
			args=()
			n=0
		fi
	done <"$2"
	[ "$n" -eq 0 ] || qemu-io -r -f qcow2 "${args[@]}" "$1"
}

# Random 4 KiB writes over 1 GiB of 4 KiB clusters: nearly every write
# needs a new L2 table, so the host fills up while allocating metadata as
# often as data.  fsync after every 16 writes; a write whose fsync succeeded
# (and that was not written again since) must read back from the image.
@test "small random writes until the host is full: every fsynced write is in the image" {
	small_host 8m
	qemu-img create -q -f qcow2 -o cluster_size=4096 small/a.qcow2 1G
	mount_imgfs small/a.qcow2 mnt
	pid=$(last_pid)
	/usr/bin/python3 - mnt/disk >acked <<'PY'
import os, random, sys
r = random.Random(7)
fd = os.open(sys.argv[1], os.O_RDWR)
acked, pending, failures = {}, {}, 0
for i in range(1, 100000):
    if failures >= 20:
        break
    off = r.randrange(1 << 18) * 4096
    byte = r.randrange(1, 256)
    acked.pop(off, None)
    try:
        os.pwrite(fd, bytes([byte]) * 4096, off)
        pending[off] = byte
    except OSError:
        failures += 1
        pending.pop(off, None)
    if i % 16 == 0:
        try:
            os.fsync(fd)
            acked.update(pending)
        except OSError:
            failures += 1
        pending = {}
os.close(fd)
for off, byte in acked.items():
    print(f"read -P {byte} {off} 4096")
PY
	[ "$(wc -l <acked)" -gt 1000 ]
	alive "$pid"
	unmount_imgfs mnt
	check_no_corruption small/a.qcow2
	# the image as qemu reads it holds every acknowledged write
	run qemu_io_lines small/a.qcow2 acked
	[ "$status" -eq 0 ]
	[[ "$output" != *"verification failed"* ]]
}

@test "an EIO while an L2 table is written back fails the fsync; the next fsync writes it" {
	qemu-img create -q -f qcow2 a.qcow2 64M
	truncate -s 32M a.qcow2 # room to allocate in: an NBD export does not grow
	pattern_file p1 $MiB 4
	faulty_host "$T/a.qcow2"
	mount_imgfs host/a.qcow2 mnt
	pid=$(last_pid)
	dd if=p1 of=mnt/disk bs=64k count=1 conv=notrunc,fsync status=none
	l2=$(l2_offset a.qcow2)
	[ "$l2" -gt 0 ]
	# the data reaches the host at once; the L2 entries wait for a flush
	echo "$l2 $((l2 + 65536))" >fail
	dd if=p1 of=mnt/disk bs=64k seek=16 conv=notrunc status=none
	run sync mnt/disk
	[ "$status" -ne 0 ]
	[[ "$output" == *"Input/output error"* ]]
	alive "$pid"
	rm fail
	sync mnt/disk
	unmount_imgfs mnt
	stop_faulty_host
	check_no_corruption a.qcow2
	qemu_raw a.qcow2 out.raw
	cmp -n 65536 p1 out.raw
	dd if=out.raw bs=64k skip=16 count=16 status=none | cmp p1 -
}

@test "an EIO at close: the daemon still ends, with status 4 and a line naming the image" {
	qemu-img create -q -f qcow2 a.qcow2 64M
	truncate -s 32M a.qcow2
	pattern_file p1 $MiB 5
	faulty_host "$T/a.qcow2"
	"$IMGFS" -f host/a.qcow2 mnt 2>err &
	pid=$!
	track_pid "$pid"
	_MOUNTS+=("$T/mnt")
	for _ in $(seq 100); do is_mounted mnt && break; sleep 0.05; done
	is_mounted mnt
	dd if=p1 of=mnt/disk bs=64k conv=notrunc status=none
	echo all >fail
	fusermount3 -u mnt
	rc=0
	wait "$pid" || rc=$?
	cat err
	[ "$rc" -eq 4 ]
	grep -q "^imgfs: error: $T/host/a.qcow2: closing the image failed: Input/output error" err
	not_mounted mnt
	rm fail
	stop_faulty_host
	check_no_corruption a.qcow2
}

# An overlay from before qemu recorded backing formats: strip the backing
# format extension (0xe2792aca) from IMAGE's header by renaming it to an
# extension no one knows, which readers skip.
# usage: forget_backing_format IMAGE
forget_backing_format() {
	/usr/bin/python3 - "$1" <<'PY'
import struct, sys
with open(sys.argv[1], "r+b") as f:
    h = f.read(4096)
    version = struct.unpack(">I", h[4:8])[0]
    off = 72 if version == 2 else struct.unpack(">I", h[100:104])[0]
    while True:
        magic, length = struct.unpack(">II", h[off:off + 8])
        if magic == 0:
            sys.exit("no backing format extension")
        if magic == 0xE2792ACA:
            f.seek(off)
            f.write(struct.pack(">I", 0x696D6766))
            break
        off += 8 + (length + 7) // 8 * 8
PY
}

@test "a backing file with no recorded format is probed, with a warning, and reads right" {
	pattern_file base.raw $((4 * MiB)) 6
	qemu-img create -q -f qcow2 -b base.raw -F raw ov.qcow2 4M
	qemu-io -f qcow2 -c "write -P 0x5a 1M 64k" ov.qcow2 >/dev/null
	forget_backing_format ov.qcow2
	run qemu-img info ov.qcow2
	[[ "$output" != *"backing file format"* ]]
	"$IMGFS" -f -r ov.qcow2 mnt 2>err &
	track_pid $!
	_MOUNTS+=("$T/mnt")
	for _ in $(seq 100); do is_mounted mnt && break; sleep 0.05; done
	is_mounted mnt
	cat err
	[ "$(cat err)" = "imgfs: warning: $T/ov.qcow2: no backing format recorded; probing $T/base.raw" ]
	qemu_raw ov.qcow2 expected.raw 2>/dev/null
	cmp expected.raw mnt/disk
	# and the data is the base's, but for the overlay's own write
	cmp -n $MiB base.raw mnt/disk
	run qemu-io -f raw -r -c "read -P 0x5a 1M 64k" mnt/disk
	[ "$status" -eq 0 ]
	[[ "$output" != *"verification failed"* ]]
	unmount_imgfs mnt
}

@test "a qcow2 backing file with no recorded format is probed as qcow2" {
	qemu-img create -q -f qcow2 base.qcow2 4M
	qemu-io -f qcow2 -c "write -P 0x11 0 2M" base.qcow2 >/dev/null
	qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 ov.qcow2 4M
	qemu-io -f qcow2 -c "write -P 0x22 1M 64k" ov.qcow2 >/dev/null
	forget_backing_format ov.qcow2
	run "$IMGFS" --list ov.qcow2
	[ "$status" -eq 0 ]
	[[ "$output" == *"warning: $T/ov.qcow2: no backing format recorded; probing $T/base.qcow2"* ]]
	mount_imgfs ov.qcow2 mnt -r
	qemu_raw ov.qcow2 expected.raw 2>/dev/null
	cmp expected.raw mnt/disk
	run qemu-io -f raw -r -c "read -P 0x11 0 1M" -c "read -P 0x22 1M 64k" \
		-c "read -P 0x11 1088k 960k" -c "read -P 0 2M 2M" mnt/disk
	[ "$status" -eq 0 ]
	[[ "$output" != *"verification failed"* ]]
	unmount_imgfs mnt
}
