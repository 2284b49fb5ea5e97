#!/usr/bin/env bats
# The parallel engine under concurrent load (issue 6): fio writes and
# verifies through the disk view, a partition view and an NBD export of
# another partition of one mounted image at once, while a reader keeps the
# disk view's page cache busy over the NBD-written range.  Afterwards every
# view agrees with the disk byte for byte (page caches invalidated on every
# write path) and qemu-img check is clean.  Correctness only: no timings.

load lib/common

MiB=$((1024 * 1024))

setup() {
	common_setup
	command -v fio >/dev/null || skip "fio is not installed"
	mkdir mnt
}
teardown() {
	exec 7<&- 2>/dev/null
	[ -z "${_FROZEN:-}" ] || fsfreeze -u "$_FROZEN"
	common_teardown
	[ -z "${_HOST:-}" ] || umount "$_HOST" 2>/dev/null || umount -l "$_HOST"
}

# 64 MiB: MBR; p1 at 8 MiB (8 MiB); p2 at 16 MiB (32 MiB).
# usage: make_image FORMAT (makes img.FORMAT)
make_image() {
	truncate -s 64M src.raw
	printf 'label: dos\nstart=16384, size=16384, type=83\nstart=32768, size=65536, type=83\n' |
		sfdisk -q src.raw
	if [ "$1" = qcow2 ]; then
		qemu-img convert -f raw -O qcow2 -o cluster_size=65536 src.raw img.qcow2
	else
		mv src.raw img.raw
	fi
}

# usage: stress IMAGE FORMAT
stress() {
	local img=$1 fmt=$2 uri="nbd+unix:///?socket=$T/p2.sock" pids=() p st=0
	mount_imgfs "$img" mnt --format="$fmt"
	"$IMGFS_NBD" -k "$T/p2.sock" -t -e 2 mnt/p2 &
	track_pid $!
	for _ in $(seq 50); do nbdinfo --size "$uri" >/dev/null 2>&1 && break; sleep 0.1; done

	# the disk view, buffered, between the MBR and p1: 1-4 MiB and 4-7 MiB
	fio --name=disk --filename=mnt/disk --ioengine=psync --rw=randwrite --bs=4k \
		--offset=1M --size=3M --numjobs=2 --offset_increment=3M \
		--verify=crc32c --do_verify=1 --group_reporting --output="$T/disk.out" &
	pids+=($!)
	# p1, O_DIRECT, 16 KiB blocks
	fio --name=p1 --filename=mnt/p1 --ioengine=psync --direct=1 --rw=randwrite --bs=16k \
		--size=4M --numjobs=2 --offset_increment=4M \
		--verify=crc32c --do_verify=1 --group_reporting --output="$T/p1.out" &
	pids+=($!)
	# p2 over NBD, two connections, 16 requests in flight each
	fio --name=p2 --ioengine=nbd --uri="$uri" --rw=randwrite --bs=4k --iodepth=16 \
		--size=16M --numjobs=2 --offset_increment=16M \
		--verify=crc32c --do_verify=1 --group_reporting --output="$T/p2.out" &
	pids+=($!)
	# and a reader of p2's bytes through the disk view's page cache meanwhile
	fio --name=r --filename=mnt/disk --ioengine=psync --rw=randread --bs=64k \
		--offset=16M --size=32M --invalidate=0 --time_based --runtime=3 \
		--output="$T/r.out" &
	pids+=($!)
	for p in "${pids[@]}"; do wait "$p" || st=1; done
	cat "$T"/*.out >&2
	[ "$st" -eq 0 ]
	for f in disk p1 p2 r; do grep -q 'err= 0' "$T/$f.out"; done

	# every view shows what the disk holds, through the kernel's caches
	cmp -n $((8 * MiB)) -i $((8 * MiB)):0 mnt/disk mnt/p1
	cmp -n $((32 * MiB)) -i $((16 * MiB)):0 mnt/disk mnt/p2
	nbdcopy "$uri" "$T/p2.nbd"
	cmp "$T/p2.nbd" mnt/p2
	unmount_imgfs mnt
}

@test "qcow2: fio verify through disk, p1 and NBD on p2 at once; every view agrees" {
	make_image qcow2
	stress img.qcow2 qcow2
	qemu-img check img.qcow2
}

@test "raw: fio verify through disk, p1 and NBD on p2 at once; every view agrees" {
	make_image raw
	stress img.raw raw
}

# A write must drop the other views' cached copies before it is answered,
# and dropping a page waits for the read in flight that holds it — a read
# only a FUSE worker can answer.  With one worker, a write that waited for
# that inside its worker would hang the mount; it must not.
@test "one FUSE worker: writes through p1 while the disk view reads the same bytes neither hang nor leave stale pages" {
	make_image qcow2
	mount_imgfs img.qcow2 mnt --max-threads=1
	p1_writer_disk_readers mnt 4
	# what every reader of disk sees now is what p1 holds
	cmp -n $((8 * MiB)) -i $((8 * MiB)):0 mnt/disk mnt/p1
	unmount_imgfs mnt
	qemu-img check img.qcow2
}

@test "SIGTERM while a write's invalidation waits for a read no worker will answer: the daemon aborts its connection and ends" {
	local d w r
	command -v fsfreeze >/dev/null || skip "fsfreeze is not installed"
	# the image on an ext4 of its own: freezing it holds the daemon's writes
	truncate -s 128M host.img
	mkfs.ext4 -q -F host.img
	mkdir host
	mount -o loop host.img host || skip "cannot mount a loop device"
	_HOST=$T/host
	(cd host && make_image qcow2)
	mount_imgfs host/img.qcow2 mnt --max-threads=1
	d=$(last_pid)
	# a reader of p1's bytes through disk, open (and its attributes fresh)
	# before the worker is taken
	exec 7<mnt/disk
	python3 -c 'import os; os.pread(7, 4096, 0)'
	fsfreeze -f host
	_FROZEN=$T/host
	# the one worker takes a write to p1 and blocks in pwrite on the frozen host
	dd if=/dev/urandom of=mnt/p1 bs=64k count=1 conv=notrunc status=none &
	w=$!
	track_pid $w
	sleep 0.5
	# a buffered read of the same bytes: queued behind it, its pages locked
	# (by pread on the open descriptor: dd's fstat would be a GETATTR,
	# queued the same way but holding no page)
	python3 -c 'import os; os.pread(7, 65536, 8 << 20)' &
	r=$!
	track_pid $r
	exec 7<&-
	sleep 0.5
	kill -TERM "$d"
	sleep 0.5
	fsfreeze -u host
	_FROZEN=
	# the write ends; its reply waits for that read's pages, and the
	# workers are gone: without the abort the daemon would never end
	for _ in $(seq 150); do
		alive "$d" || break
		sleep 0.1
	done
	if alive "$d"; then
		abort_fuse mnt
		echo "the daemon hung after SIGTERM" >&2
		return 1
	fi
	wait_gone $w
	wait_gone $r
	# no dead mount left behind
	run is_mounted mnt
	[ "$status" -ne 0 ]
	# and the image it left is consistent
	run qemu-img check host/img.qcow2
	echo "$output"
	[ "$status" -eq 0 ] || [ "$status" -eq 3 ]
}
