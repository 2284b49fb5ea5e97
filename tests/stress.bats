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
teardown() { common_teardown; }

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
	local w r
	make_image qcow2
	mount_imgfs img.qcow2 mnt --max-threads=1
	# buffered readers of p1's bytes through disk: readahead in flight
	fio --name=r --filename=mnt/disk --ioengine=psync --rw=randread --bs=256k \
		--offset=8M --size=8M --numjobs=2 --invalidate=1 --time_based --runtime=4 \
		--output="$T/r.out" &
	r=$!
	track_pid $r
	# and a writer on p1, verified
	fio --name=w --filename=mnt/p1 --ioengine=psync --rw=randwrite --bs=64k \
		--size=8M --time_based --runtime=4 --verify=crc32c --do_verify=1 \
		--output="$T/w.out" &
	w=$!
	track_pid $w
	# a hung mount holds its callers in the kernel, past any signal: end it
	for _ in $(seq 600); do
		alive $w || alive $r || break
		sleep 0.1
	done
	if alive $w || alive $r; then
		abort_fuse mnt
		echo "the mount hung" >&2
		return 1
	fi
	wait $w
	wait $r
	cat "$T"/*.out >&2
	grep -q 'err= 0' "$T/w.out"
	grep -q 'err= 0' "$T/r.out"
	# what every reader of disk sees now is what p1 holds
	cmp -n $((8 * MiB)) -i $((8 * MiB)):0 mnt/disk mnt/p1
	unmount_imgfs mnt
	qemu-img check img.qcow2
}
