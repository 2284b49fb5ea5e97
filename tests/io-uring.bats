#!/usr/bin/env bats
# --io-uring: requests served through FUSE over io_uring (kernel >= 6.14,
# the fuse module's enable_uring parameter on; the tests turn it on and put
# it back).  Each test checks that the rings did serve requests (the
# daemon's -v log counts them at unmount) and that what they served is
# right: reads against qemu-img convert, writes read back and checked, the
# coherency of views, and an orderly end on unmount and SIGTERM.

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
	foreground -v --io-uring a.qcow2 mnt
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
	foreground -v --io-uring --no-splice a.qcow2 mnt
	cmp mnt/disk ref.raw
	stop_foreground
	[ "$(served)" -gt 20 ]
}

@test "writes through the rings: fio verifies them, qemu-img check is clean" {
	command -v fio >/dev/null || skip "fio is not installed"
	make_qcow2
	foreground -v --io-uring a.qcow2 mnt
	fio --name=w --filename=mnt/disk --ioengine=psync --rw=randwrite --bs=4k \
		--bsrange=512-256k --size=48M --io_size=16M --numjobs=1 --direct=1 \
		--verify=crc32c --do_verify=1 --randrepeat=0 --output="$T/w.out"
	grep -q 'err= 0' "$T/w.out"
	# buffered, larger than a request, over what fio wrote
	head -c $((3 * MiB + 1234)) /dev/urandom >new.bin
	dd if=new.bin of=mnt/disk bs=1M seek=5 conv=notrunc,fsync status=none
	cmp <(dd if=mnt/disk bs=1M skip=5 count=4 iflag=direct status=none | head -c $((3 * MiB + 1234))) new.bin
	stop_foreground
	[ "$(served)" -gt 100 ]
	qemu-img check -q a.qcow2
	qemu_raw a.qcow2 out.raw
	cmp <(dd if=out.raw bs=1M skip=5 count=4 status=none | head -c $((3 * MiB + 1234))) new.bin
}

# A write through p1 drops disk's cached copy before it is answered; that
# answer comes from the invalidation thread, not the ring thread that took
# the request, and with one thread per queue the ring thread must go on
# serving the reads the invalidation waits for.
@test "a write through p1 is seen through disk at once, one thread per queue" {
	command -v fio >/dev/null || skip "fio is not installed"
	truncate -s 32M src.raw
	printf 'label: dos\nstart=16384, size=16384, type=83\n' | sfdisk -q src.raw
	qemu-img convert -f raw -O qcow2 src.raw a.qcow2
	foreground -v --io-uring --max-threads=1 a.qcow2 mnt
	p1_writer_disk_readers mnt 3
	# disk (cached) shows what p1 holds
	cat mnt/disk >/dev/null
	head -c 1M /dev/urandom >new.bin
	dd if=new.bin of=mnt/p1 bs=1M conv=notrunc,fsync status=none
	cmp <(dd if=mnt/disk bs=1M skip=8 count=1 status=none) new.bin
	cmp <(dd if=mnt/disk bs=1M skip=8 count=8 status=none) mnt/p1
	stop_foreground
	[ "$(served)" -gt 100 ]
}

@test "SIGTERM while readers run through the rings: the daemon ends, the mount is gone" {
	command -v fio >/dev/null || skip "fio is not installed"
	make_qcow2
	mount_imgfs a.qcow2 mnt --io-uring
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
	foreground -v --io-uring a.qcow2 mnt
	cmp mnt/disk ref.raw
	stop_foreground
	grep -q -- '--io-uring: the fuse module.s enable_uring parameter is off' "$T/err"
	[ "$(served)" -eq 0 ]
	# -s has one thread: no rings either
	echo Y >"$PARAM"
	foreground -v --io-uring -s a.qcow2 mnt
	cmp mnt/disk ref.raw
	stop_foreground
	grep -q -- '--io-uring: not with -s' "$T/err"
	[ "$(served)" -eq 0 ]
}
