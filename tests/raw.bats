#!/usr/bin/env bats
# Raw images: the identity, writable now, with qemu's rules and locks.

load lib/common

setup() {
	common_setup
	pattern_file a.raw $((8 * 1024 * 1024)) 3
	printf 'label: dos\nstart=2048, size=4096, type=83\nstart=8192, type=83\n' | sfdisk -q a.raw
	mkdir mnt
}
teardown() { common_teardown; }

@test "a raw image reads back as itself, in both modes" {
	cp a.raw ref.raw
	mount_imgfs a.raw mnt
	same_bytes mnt/disk ref.raw
	unmount_imgfs mnt
	mount_imgfs a.raw a.raw
	same_bytes a.raw ref.raw
	unmount_imgfs a.raw
	same_bytes a.raw ref.raw
}

@test "writes through mnt/disk land in the image, at the right offsets" {
	mount_imgfs a.raw mnt
	printf 'imgfs was here' | dd of=mnt/disk bs=1 seek=123457 conv=notrunc status=none
	sync mnt/disk
	unmount_imgfs mnt
	[ "$(dd if=a.raw bs=1 skip=123457 count=14 status=none)" = "imgfs was here" ]
}

@test "a write through p1 is seen at once through disk, and the reverse" {
	mount_imgfs a.raw mnt
	cat mnt/disk mnt/p1 >/dev/null   # warm the page cache of both
	printf 'AAAA' | dd of=mnt/p1 bs=1 seek=100 conv=notrunc status=none
	[ "$(dd if=mnt/disk bs=1 skip=$((2048 * 512 + 100)) count=4 status=none)" = AAAA ]
	printf 'BBBB' | dd of=mnt/disk bs=1 seek=$((2048 * 512 + 200)) conv=notrunc status=none
	[ "$(dd if=mnt/p1 bs=1 skip=200 count=4 status=none)" = BBBB ]
}

# A handle opened for writing is direct I/O: its writes reach no cached
# page, so the daemon must drop the view's own pages for readers.
@test "a write is seen at once by a reader of the same view, in both modes" {
	for m in mnt a.raw; do
		mount_imgfs a.raw $m
		f=$m; [ $m = mnt ] && f=mnt/disk
		cat "$f" >/dev/null   # warm the page cache through a read-only handle
		printf "CC$m" | dd of="$f" bs=1 seek=300 conv=notrunc status=none
		[ "$(dd if="$f" bs=1 skip=300 count=$((2 + ${#m})) status=none)" = "CC$m" ]
		unmount_imgfs $m
	done
}

@test "a shared mmap of a file opened for writing needs --cached-writes; read-only it works" {
	local map='import mmap, os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
m = mmap.mmap(fd, 4096)
m[100:104] = b"MMAP"
m.flush()'
	mount_imgfs a.raw mnt
	run /usr/bin/python3 -c "$map" mnt/disk
	[ "$status" -ne 0 ]
	[[ "$output" == *"No such device"* ]]
	# opened read-only, a shared mapping works
	[ "$(/usr/bin/python3 -c 'import mmap, sys
f = open(sys.argv[1], "rb")
sys.stdout.buffer.write(mmap.mmap(f.fileno(), 4096, mmap.MAP_SHARED, mmap.PROT_READ)[:16])' mnt/disk | od -An -tx1)" = "$(head -c 16 a.raw | od -An -tx1)" ]
	unmount_imgfs mnt
	mount_imgfs a.raw mnt --cached-writes
	/usr/bin/python3 -c "$map" mnt/disk
	[ "$(dd if=mnt/disk bs=1 skip=100 count=4 status=none)" = MMAP ]
	unmount_imgfs mnt
	[ "$(dd if=a.raw bs=1 skip=100 count=4 status=none)" = MMAP ]
}

@test "punch-hole and zero-range read back as zeroes" {
	mount_imgfs a.raw mnt
	fallocate -p -o 65536 -l 100000 mnt/disk
	fallocate -z -o 1048576 -l 4096 mnt/disk
	cmp -n 100000 <(dd if=mnt/disk bs=1 skip=65536 count=100000 status=none) /dev/zero
	cmp -n 4096 <(dd if=mnt/disk bs=4096 skip=256 count=1 status=none) /dev/zero
	unmount_imgfs mnt
	cmp -n 100000 <(dd if=a.raw bs=1 skip=65536 count=100000 status=none) /dev/zero
}

@test "fsync on a view succeeds" {
	mount_imgfs a.raw mnt
	dd if=/dev/zero of=mnt/disk bs=4k count=1 seek=10 conv=notrunc,fsync status=none
}

@test "a view does not grow: writing at the end is ENOSPC, truncate is refused" {
	mount_imgfs a.raw mnt
	run dd if=/dev/zero of=mnt/disk bs=4k count=1 seek=2048 conv=notrunc status=none
	[ "$status" -ne 0 ]
	[[ "$output" == *"No space"* ]]
	run truncate -s 1M mnt/disk
	[ "$status" -ne 0 ]
	[ "$(stat -c %s mnt/disk)" = 8388608 ]
}

@test "a read-only mount refuses writes and shows no write bits" {
	mount_imgfs a.raw mnt -r
	run dd if=/dev/zero of=mnt/disk bs=4k count=1 conv=notrunc status=none
	[ "$status" -ne 0 ]
	[ "$(stat -c %A mnt/disk)" = "-r--r--r--" ]
}

@test "a probed raw image refuses a qcow2 header written to sector 0" {
	mount_imgfs a.raw mnt
	run bash -c "printf 'QFI\xfb' | dd of=mnt/disk conv=notrunc status=none"
	[ "$status" -ne 0 ]
	# ordinary sector-0 writes (a new partition table) are fine
	printf 'label: dos\nstart=2048, size=2048, type=83\n' | sfdisk -q --no-reread mnt/disk
}

@test "with --format=raw sector 0 takes any bytes" {
	mount_imgfs a.raw mnt --format=raw
	printf 'QFI\xfb' | dd of=mnt/disk conv=notrunc status=none
	unmount_imgfs mnt
	[ "$(head -c 3 a.raw)" = QFI ]
}

@test "SEEK_DATA and SEEK_HOLE follow the file's allocation" {
	truncate -s 64M sparse.raw
	printf 'x' | dd of=sparse.raw bs=1 seek=$((20 * 1024 * 1024)) conv=notrunc status=none
	mount_imgfs sparse.raw mnt
	python3 -c "
import os
fd = os.open('mnt/disk', os.O_RDONLY)
d = os.lseek(fd, 0, os.SEEK_DATA)
assert 16 * 2**20 <= d <= 20 * 2**20, d
assert os.lseek(fd, d, os.SEEK_HOLE) > 20 * 2**20
"
}

@test "extended attributes describe each view" {
	mount_imgfs a.raw mnt
	[ "$(getfattr --only-values -n user.imgfs.view mnt/p2)" = p2 ]
	[ "$(getfattr --only-values -n user.imgfs.offset mnt/p2)" = $((8192 * 512)) ]
	[ "$(getfattr --only-values -n user.imgfs.length mnt/p2)" = $(( (16384 - 8192) * 512 )) ]
	[ "$(getfattr --only-values -n user.imgfs.format mnt/p2)" = raw ]
	[ "$(getfattr --only-values -n user.imgfs.image mnt/p2)" = "$PWD/a.raw" ]
	getfattr -d mnt/disk | grep -q user.imgfs.length
}

@test "a writable mount holds qemu's write lock: qemu-io cannot write" {
	mount_imgfs a.raw mnt
	run qemu-io -f raw -c "write 0 512" a.raw
	[ "$status" -ne 0 ]
	[[ "$output" == *lock* ]]
}

@test "a second writable imgfs is refused" {
	mount_imgfs a.raw mnt
	mkdir mnt2
	run "$IMGFS" a.raw mnt2
	[ "$status" -eq 2 ]
	[[ "$output" == *"in use"* ]]
	not_mounted mnt2
}

@test "imgfs refuses to write an image qemu is writing" {
	qemu-io -f raw a.raw &>/dev/null < <(sleep 30) &
	track_pid $!
	sleep 1
	run "$IMGFS" a.raw mnt
	[ "$status" -eq 2 ]
	[[ "$output" == *"in use"* ]]
	# a read-only mount is refused too: qemu-io does not share write with readers
	not_mounted mnt
}

@test "two read-only mounts of one image coexist" {
	mount_imgfs a.raw mnt -r
	mkdir mnt2
	mount_imgfs a.raw mnt2 -r
	cmp mnt/disk mnt2/disk
}
