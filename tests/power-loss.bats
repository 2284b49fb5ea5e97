# Power loss: what the disk may hold when the power goes, not just what a
# killed daemon left in the page cache.  tests/lib/writelog.so, preloaded
# into the daemon, records every write and every completed fdatasync to the
# image; tests/lib/powerloss.py rebuilds the image as a power loss between
# two of those barriers may leave it (everything before the first, any
# subset of what came after, torn at sectors).  The engine's ordering
# (formats/qcow2-write.h: data and refcounts before L2, L2 before L1, frees
# last) must make every such image one qemu-img check calls clean or only
# leaking, with every fsync'd write in it.

load lib/common

WL="$BATS_TEST_DIRNAME/lib/qcow2_workload.py"
PL="$BATS_TEST_DIRNAME/lib/powerloss.py"
WRITELOG_SO="${IMGFS_BUILDDIR:-$BATS_TEST_DIRNAME/..}/tests/lib/writelog.so"
MiB=$((1024 * 1024))
# power losses checked per image
CRASHES=24

setup() {
	common_setup
	mkdir mnt crashed
	[ -e "$WRITELOG_SO" ] || skip "tests/lib/writelog.so is not built (make check builds it)"
}
teardown() { common_teardown; }

# imgfs with the recorder preloaded, as a program mount_imgfs can run (a
# variable set on the call would reach mount_imgfs' mktemp too).  An ASan
# build needs its runtime first in LD_PRELOAD, before any other library.
# usage: recording_imgfs IMAGE LOG  (prints the wrapper's path)
recording_imgfs() {
	local asan
	asan=$(ldd "$IMGFS" | awk '/libasan/ { print $3 }')
	cat >imgfs-recorded <<-EOF
		#!/bin/sh
		IMGFS_WRITELOG_FILE='$1' IMGFS_WRITELOG='$2' \\
		LD_PRELOAD='${asan:+$asan }$WRITELOG_SO' exec '$IMGFS' "\$@"
	EOF
	chmod +x imgfs-recorded
	printf '%s\n' "$PWD/imgfs-recorded"
}

# Keep a copy of IMAGE as before.qcow2, then mount it with the recorder in
# the daemon, run the workload through the mount (ops.log says what it
# fsync'd, and when) and unmount.  usage: record_workload IMAGE SIZE SEED NOPS
record_workload() {
	local img=$1
	cp "$img" before.qcow2
	IMGFS=$(recording_imgfs "$PWD/$img" "$PWD/write.log") mount_imgfs "$img" mnt
	python3 "$WL" run mnt/disk "$2" "$3" "$4" ops.log
	unmount_imgfs mnt
	# the recording misses nothing: replayed in full, it is the image left
	python3 "$PL" all before.qcow2 write.log all.qcow2
	same_bytes all.qcow2 "$img"
}

# CRASHES power losses, each with its own seed: two after each of the first
# EARLY barriers (where the workload's first writes make L2 tables and
# refcount blocks), one torn at random and one with only the last writes
# landed (powerloss.py: even and odd seeds), the rest spread evenly up to
# the last barrier.  After each: qemu-img check finds no corruption (0
# clean, 3 leaks only; 2 is corruption), every write the workload had
# fsync'd by then reads back through qemu, imgfs (read-only) reads what
# qemu reads, and the snapshot in snap.raw, if there is one, is untouched.
# One of them is then mounted writable, which repairs it.
# usage: power_losses NOPS
EARLY=8
power_losses() {
	local nops=$1 nb i k owed
	nb=$(python3 "$PL" barriers write.log)
	echo "$nb barriers"
	[ "$nb" -ge $((2 * EARLY)) ]
	qemu_raw before.qcow2 orig.raw
	for i in $(seq 0 $((CRASHES - 1))); do
		k=$((i / 2))
		[ "$i" -lt $((2 * EARLY)) ] ||
			k=$((EARLY + (i - 2 * EARLY) * (nb - EARLY) / (CRASHES - 1 - 2 * EARLY)))
		owed=$(python3 "$PL" crash before.qcow2 write.log ops.log "$k" "$i" crash.qcow2)
		run qemu-img check crash.qcow2
		[ "$status" -eq 0 ] || [ "$status" -eq 3 ] ||
			{ echo "power loss after barrier $k (seed $i): $output"; false; }
		qemu_raw crash.qcow2 crash.raw
		python3 "$WL" verify ops.log orig.raw crash.raw 0 "$owed" ||
			{ echo "power loss after barrier $k (seed $i)"; false; }
		if [ -e snap.raw ]; then
			qemu_raw crash.qcow2 crash-snap.raw -l snapshot.name=s
			same_bytes crash-snap.raw snap.raw
		fi
		mount_imgfs crash.qcow2 crashed -r
		same_bytes crashed/disk crash.raw
		unmount_imgfs crashed
		if [ "$i" -eq $((2 * EARLY)) ]; then
			# a writable open repairs it: no leaks after, same bytes
			mount_imgfs crash.qcow2 crashed
			unmount_imgfs crashed
			qemu-img check crash.qcow2
			qemu_raw crash.qcow2 repaired.raw
			same_bytes repaired.raw crash.raw
		fi
	done
	# after the last barrier (the unmount's), every op is owed
	[ "$owed" -eq "$nops" ]
}

@test "64 KiB clusters: a power loss at any barrier leaves only leaks and every fsync'd write" {
	qemu-img create -q -f qcow2 a.qcow2 32M
	qemu-io -f qcow2 -c "write -P 0x11 0 1M" -c "write -P 0x44 12M 2M" -c "write -z 13M 64k" \
		a.qcow2 >/dev/null
	record_workload a.qcow2 $((16 * MiB)) 61 300
	power_losses 300
}

@test "512-byte clusters: power losses while refcount blocks and the table grow" {
	qemu-img create -q -f qcow2 -o cluster_size=512 a.qcow2 32M
	# 7 MiB of data: the workload takes the host file past the 8 MiB one
	# table cluster covers
	qemu-io -f qcow2 -c "write -P 0x11 16M 7M" a.qcow2 >/dev/null
	record_workload a.qcow2 $((16 * MiB)) 62 250
	# the refcount table did move and grow during the recording
	[ "$(od -An -t u4 --endian=big -j 56 -N 4 before.qcow2 | tr -d ' ')" -eq 1 ]
	[ "$(od -An -t u4 --endian=big -j 56 -N 4 a.qcow2 | tr -d ' ')" -gt 1 ]
	power_losses 250
}

@test "over a backing file: a power loss never shows backing data where fsync'd writes were" {
	pattern_file back.raw $((32 * MiB)) 63
	qemu-img convert -O qcow2 back.raw back.qcow2
	qemu-img create -q -f qcow2 -b back.qcow2 -F qcow2 a.qcow2
	record_workload a.qcow2 $((16 * MiB)) 64 300
	power_losses 300
}

@test "4 KiB clusters under a snapshot: the L2 tables copied on first write survive a power loss" {
	qemu-img create -q -f qcow2 -o cluster_size=4096 a.qcow2 32M
	qemu-io -f qcow2 -c "write -P 0x11 0 16M" a.qcow2 >/dev/null
	qemu-img snapshot -c s a.qcow2
	qemu_raw a.qcow2 snap.raw
	# every L2 table is shared with the snapshot: the first write under
	# each copies it, and the new L1 entry must not land before the copy
	record_workload a.qcow2 $((16 * MiB)) 65 300
	power_losses 300
}
