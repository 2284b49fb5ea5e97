#!/usr/bin/env bats
# --io-uring: requests served through FUSE over io_uring (kernel >= 6.14,
# the fuse module's enable_uring parameter on; the tests turn it on and put
# it back).  Each test checks that the rings did serve requests (the
# daemon's -v log counts them at unmount) and that what they served is
# right (reads against qemu-img convert), that the daemon ends in order on
# unmount and SIGTERM, and that mounts the rings must not serve (writable,
# -s, no kernel support) say so and work through /dev/fuse.

load lib/common

PARAM=/sys/module/fuse/parameters/enable_uring
MiB=$((1024 * 1024))

setup() {
	common_setup
	[ -e "$PARAM" ] || skip "this kernel has no FUSE over io_uring"
	[ -w "$PARAM" ] || skip "cannot turn on FUSE over io_uring (not root)"
	_OLD_PARAM=$(cat "$PARAM")
	echo Y >"$PARAM"
	mkdir mnt
}
teardown() {
	common_teardown
	[ -z "${_OLD_PARAM:-}" ] || echo "$_OLD_PARAM" >"$PARAM"
}

# The number of requests the log says the rings served (0 if none).
served() {
	sed -n 's/.*FUSE io_uring: \([0-9]*\) requests served through the rings.*/\1/p' "$T/err" |
		tail -1 | grep . || echo 0
}

# usage: make_qcow2 — a.qcow2 (64 MiB: patterned data, a compressed part,
# a hole, zeroes) and ref.raw, what qemu-img makes of it
make_qcow2() {
	pattern_file p.raw $((24 * MiB)) 3
	qemu-img convert -f raw -O qcow2 -o cluster_size=65536 p.raw a.qcow2
	qemu-img resize -q a.qcow2 64M
	qemu-io -f qcow2 -c "write -c -P 0x5a $((32 * MiB)) 4M" \
		-c "write -z $((40 * MiB)) 1M" a.qcow2 >/dev/null
	qemu-img convert -f qcow2 -O raw a.qcow2 ref.raw
}

@test "reads through the rings give what qemu-img convert gives (spliced, copied, O_DIRECT)" {
	make_qcow2
	foreground -v --io-uring -r a.qcow2 mnt
	grep -q 'FUSE io_uring: [0-9]* queues x [0-9]* threads' "$T/err"
	cmp mnt/disk ref.raw
	# 4 KiB O_DIRECT reads at scattered offsets, each one a request
	for off in 0 7 4095 6144 8191 9000 12287 16383; do
		dd if=mnt/disk of="$T/b" bs=4k skip=$off count=1 iflag=direct status=none
		dd if=ref.raw of="$T/r" bs=4k skip=$off count=1 status=none
		cmp "$T/b" "$T/r"
	done
	stop_foreground
	[ "$(served)" -gt 20 ]
	# the same with replies copied instead of spliced
	foreground -v --io-uring -r --no-splice a.qcow2 mnt
	cmp mnt/disk ref.raw
	stop_foreground
	[ "$(served)" -gt 20 ]
}

@test "a directory mount reads every view through the rings" {
	pattern_file src.raw $((32 * MiB)) 5
	printf 'label: dos\nstart=2048, size=16384, type=83\nstart=20480, size=40960, type=83\n' |
		sfdisk -q src.raw
	qemu-img convert -f raw -O qcow2 src.raw a.qcow2
	foreground -v --io-uring -r a.qcow2 mnt
	cmp mnt/disk src.raw
	cmp mnt/p1 <(dd if=src.raw bs=512 skip=2048 count=16384 status=none)
	cmp mnt/p2 <(dd if=src.raw bs=512 skip=20480 count=40960 status=none)
	[ "$(ls mnt | tr '\n' ' ')" = "disk p1 p2 " ]
	stop_foreground
	[ "$(served)" -gt 20 ]
}

@test "SIGTERM while readers run through the rings: the daemon ends, the mount is gone" {
	command -v fio >/dev/null || skip "fio is not installed"
	make_qcow2
	mount_imgfs a.qcow2 mnt -r --io-uring
	local pid
	pid=$(last_pid)
	fio --name=r --filename=mnt/disk --ioengine=psync --rw=randread --bs=4k \
		--numjobs=4 --direct=1 --time_based --runtime=10 --output="$T/r.out" &
	track_pid $!
	sleep 1
	kill -TERM "$pid"
	wait_gone "$pid"
	if alive "$pid"; then
		echo "the daemon did not end" >&2
		return 1
	fi
	not_mounted mnt
}

@test "without the kernel's offer, --io-uring says so and /dev/fuse serves" {
	make_qcow2
	echo N >"$PARAM"
	foreground -v --io-uring -r a.qcow2 mnt
	cmp mnt/disk ref.raw
	stop_foreground
	grep -q -- '--io-uring: the fuse module.s enable_uring parameter is off' "$T/err"
	[ "$(served)" -eq 0 ]
	# -s has one thread: no rings either
	echo Y >"$PARAM"
	foreground -v --io-uring -r -s a.qcow2 mnt
	cmp mnt/disk ref.raw
	stop_foreground
	grep -q -- '--io-uring: not with -s' "$T/err"
	[ "$(served)" -eq 0 ]
}

# A write is answered once other views' cached pages are dropped, which
# waits for the reads in flight over them; on the rings those reads can be
# queued behind the write's own entry (imgfs.c use_io_uring): a writable
# mount stays on /dev/fuse, and works as without the option.
@test "a writable mount stays on /dev/fuse: writes through p1 are seen through disk, with one thread" {
	command -v fio >/dev/null || skip "fio is not installed"
	truncate -s 32M src.raw
	printf 'label: dos\nstart=16384, size=16384, type=83\n' | sfdisk -q src.raw
	qemu-img convert -f raw -O qcow2 src.raw a.qcow2
	foreground -v --io-uring --max-threads=1 a.qcow2 mnt
	grep -q -- '--io-uring: for read-only mounts (-r) only' "$T/err"
	p1_writer_disk_readers mnt 3
	head -c 1M /dev/urandom >new.bin
	dd if=new.bin of=mnt/p1 bs=1M conv=notrunc,fsync status=none
	cmp <(dd if=mnt/disk bs=1M skip=8 count=1 status=none) new.bin
	stop_foreground
	[ "$(served)" -eq 0 ]
	qemu-img check -q a.qcow2
}
