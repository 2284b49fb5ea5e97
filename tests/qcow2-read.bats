#!/usr/bin/env bats
# The read path: a corpus of images made by qemu-img/qemu-io, each mounted in
# both modes (directory and over the image file itself) and required to be
# byte-identical to `qemu-img convert -O raw`, with the image file unchanged
# and `qemu-img check` clean afterwards.

load lib/common

setup() { common_setup; }
teardown() { common_teardown; }

# Scatter recognisable writes over an image with qemu-io.
# usage: scribble IMAGE [qemu-io -f FORMAT args]
scribble() {
	local img=$1 size
	size=$(qemu-img info --output=json "$img" | jq '."virtual-size"')
	qemu-io -f qcow2 \
		-c "write -P 0x11 0 64k" \
		-c "write -P 0x22 $((size / 3)) 4k" \
		-c "write -P 0x33 $((size / 2 + 512)) 3584" \
		-c "write -P 0x44 $((size - 65536)) 65536" \
		-c "write -P 0x55 1000448 131072" \
		"$img" >/dev/null
}

# Mount IMAGE on a directory and over itself; each time compare with
# qemu-img's reading, and check the file is unchanged and still clean.
check_image() {
	local img=$1
	shift
	local ref="$T/ref.raw" before after
	qemu_raw "$img" "$ref" "$@"
	before=$(sha256sum <"$img")

	mkdir -p "$T/mnt"
	mount_imgfs "$img" "$T/mnt"
	same_bytes "$T/mnt/disk" "$ref"
	unmount_imgfs "$T/mnt"

	mount_imgfs "$img" "$img"
	same_bytes "$img" "$ref"
	unmount_imgfs "$img"

	after=$(sha256sum <"$img")
	[ "$before" = "$after" ] || { echo "image file changed by a read-only mount" >&2; return 1; }
	qemu-img check -q "$img"
}

@test "qcow2 v3, 64 KiB clusters" {
	qemu-img create -q -f qcow2 a.qcow2 16M
	scribble a.qcow2
	check_image a.qcow2
}

@test "qcow2 with 512-byte clusters" {
	qemu-img create -q -f qcow2 -o cluster_size=512 a.qcow2 8M
	scribble a.qcow2
	check_image a.qcow2
}

@test "qcow2 with 2 MiB clusters" {
	qemu-img create -q -f qcow2 -o cluster_size=2M a.qcow2 32M
	scribble a.qcow2
	check_image a.qcow2
}

@test "qcow2 version 2 (compat=0.10)" {
	qemu-img create -q -f qcow2 -o compat=0.10 a.qcow2 16M
	scribble a.qcow2
	check_image a.qcow2
}

@test "qcow2 version 2 over a backing file" {
	qemu-img create -q -f qcow2 -o compat=0.10 base.qcow2 16M
	qemu-io -c "write -P 0xa1 0 16M" base.qcow2 >/dev/null
	qemu-img create -q -f qcow2 -o compat=0.10 -b base.qcow2 -F qcow2 a.qcow2
	scribble a.qcow2
	check_image a.qcow2
}

@test "size that is not a multiple of the cluster size" {
	qemu-img create -q -f qcow2 a.qcow2 10001920
	scribble a.qcow2
	check_image a.qcow2
}

@test "refcount width 1 bit" {
	qemu-img create -q -f qcow2 -o refcount_bits=1 a.qcow2 16M
	scribble a.qcow2
	check_image a.qcow2
}

@test "refcount width 64 bits" {
	qemu-img create -q -f qcow2 -o refcount_bits=64 a.qcow2 16M
	scribble a.qcow2
	check_image a.qcow2
}

@test "extended L2 with partial subcluster writes" {
	qemu-img create -q -f qcow2 -o extended_l2=on,cluster_size=64k a.qcow2 16M
	qemu-io -c "write -P 0x61 2048 2048" -c "write -P 0x62 70000 5000" \
		-c "write -P 0x63 $((3*65536 + 31*2048)) 2048" a.qcow2 >/dev/null
	scribble a.qcow2
	check_image a.qcow2
}

@test "extended L2 over a backing file: unwritten subclusters show the backing file" {
	qemu-img create -q -f qcow2 base.qcow2 4M
	qemu-io -c "write -P 0xb0 0 4M" base.qcow2 >/dev/null
	qemu-img create -q -f qcow2 -o extended_l2=on -b base.qcow2 -F qcow2 a.qcow2
	qemu-io -c "write -P 0x71 4096 2048" -c "write -z 8192 2048" \
		-c "write -P 0x72 $((65536 + 30*2048)) 4096" a.qcow2 >/dev/null
	check_image a.qcow2
}

@test "zero clusters hide the backing file" {
	qemu-img create -q -f qcow2 base.qcow2 8M
	qemu-io -c "write -P 0xc5 0 8M" base.qcow2 >/dev/null
	qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 a.qcow2
	qemu-io -c "write -z 65536 131072" -c "write -z -u 1M 64k" -c "write -P 0x5a 2M 4k" a.qcow2 >/dev/null
	check_image a.qcow2
}

@test "zlib-compressed clusters" {
	qemu-img create -q -f raw src.raw 8M
	qemu-io -f raw -c "write -P 0x41 0 1M" -c "write -P 0x42 3M 5000" src.raw >/dev/null
	pattern_file rnd 1048576 7
	dd if=rnd of=src.raw bs=1M seek=5 conv=notrunc status=none
	qemu-img convert -q -f raw -O qcow2 -c -o compression_type=zlib src.raw a.qcow2
	check_image a.qcow2
}

@test "zstd-compressed clusters" {
	qemu-img create -q -f raw src.raw 8M
	qemu-io -f raw -c "write -P 0x43 0 1M" -c "write -P 0x44 3M 5000" src.raw >/dev/null
	pattern_file rnd 1048576 8
	dd if=rnd of=src.raw bs=1M seek=5 conv=notrunc status=none
	qemu-img convert -q -f raw -O qcow2 -c -o compression_type=zstd src.raw a.qcow2
	check_image a.qcow2
}

@test "compressed clusters with 2 MiB clusters and extended L2" {
	pattern_file src.raw 8388608 9
	qemu-img convert -q -f raw -O qcow2 -c -o cluster_size=2M,compression_type=zstd src.raw a.qcow2
	check_image a.qcow2
	qemu-img convert -q -f raw -O qcow2 -c -o extended_l2=on,compression_type=zlib src.raw b.qcow2
	check_image b.qcow2
}

@test "a 3-deep mixed backing chain across directories" {
	mkdir -p base mid top
	qemu-img create -q -f raw base/base.raw 16M
	qemu-io -f raw -c "write -P 0xd1 0 16M" base/base.raw >/dev/null
	qemu-img create -q -f qcow2 -b ../base/base.raw -F raw mid/mid.qcow2
	qemu-io -c "write -P 0xd2 1M 2M" -c "write -z 8M 1M" mid/mid.qcow2 >/dev/null
	qemu-img create -q -f qcow2 -o cluster_size=4k -b ../mid/mid.qcow2 -F qcow2 top/top.qcow2
	qemu-io -c "write -P 0xd3 2M 4k" -c "write -P 0xd4 12M 100k" top/top.qcow2 >/dev/null
	check_image top/top.qcow2
}

@test "a backing file smaller than its overlay reads as zeroes past its end" {
	qemu-img create -q -f qcow2 base.qcow2 4M
	qemu-io -c "write -P 0xe1 0 4M" base.qcow2 >/dev/null
	qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 a.qcow2 16M
	qemu-io -c "write -P 0xe2 6M 4k" a.qcow2 >/dev/null
	check_image a.qcow2
}

@test "--no-backing reads unallocated clusters as zeroes" {
	qemu-img create -q -f qcow2 base.qcow2 8M
	qemu-io -c "write -P 0xf1 0 8M" base.qcow2 >/dev/null
	qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 a.qcow2
	qemu-io -c "write -P 0xf2 1M 64k" a.qcow2 >/dev/null
	cp a.qcow2 alone.qcow2
	qemu-img rebase -u -b '' alone.qcow2
	qemu_raw alone.qcow2 ref.raw
	mkdir mnt
	mount_imgfs a.qcow2 mnt --no-backing
	same_bytes mnt/disk ref.raw
}

@test "external data file" {
	qemu-img create -q -f qcow2 -o data_file=a.data a.qcow2 16M
	scribble a.qcow2
	check_image a.qcow2
}

@test "external data file with data_file_raw" {
	qemu-img create -q -f qcow2 -o data_file=b.data,data_file_raw=on b.qcow2 16M
	scribble b.qcow2
	check_image b.qcow2
	cmp b.data ref.raw
}

@test "an image left dirty with lazy refcounts reads correctly" {
	qemu-img create -q -f qcow2 -o lazy_refcounts=on a.qcow2 16M
	scribble a.qcow2
	# set the dirty bit (incompatible feature bit 0, header byte 79) as a crash would
	printf '\x01' | dd of=a.qcow2 bs=1 seek=79 conv=notrunc status=none
	qemu-img info a.qcow2 | grep -q "corrupt: false"
	qemu_raw a.qcow2 ref.raw
	mkdir mnt
	mount_imgfs a.qcow2 mnt -r
	same_bytes mnt/disk ref.raw
}

@test "many L2 tables: 4 KiB clusters, writes spread over 256 MiB" {
	qemu-img create -q -f qcow2 -o cluster_size=4k a.qcow2 256M
	args=()
	for i in $(seq 0 40); do args+=(-c "write -P $((i + 1)) $((i * 6553600 + i * 512)) 8192"); done
	qemu-io "${args[@]}" a.qcow2 >/dev/null
	check_image a.qcow2
}

@test "a 1 TiB sparse image with data beyond 4 GiB mounts at once" {
	qemu-img create -q -f qcow2 big.qcow2 1T
	qemu-io -c "write -P 0x31 0 64k" -c "write -P 0x32 5G 64k" \
		-c "write -P 0x33 $((1024**4 - 65536)) 64k" big.qcow2 >/dev/null
	mkdir mnt
	start=$(date +%s%N)
	mount_imgfs big.qcow2 mnt
	head -c 1 mnt/disk >/dev/null
	end=$(date +%s%N)
	echo "# mount + first byte of a 1 TiB image: $(( (end - start) / 1000000 )) ms" >&3
	[ "$(stat -c %s mnt/disk)" = $((1024**4)) ]
	for spec in "0 0x31" "$((5 * 1024**3)) 0x32" "$((1024**4 - 65536)) 0x33"; do
		set -- $spec
		# qemu-io exits 1 when the pattern does not match
		qemu-io -f raw -r -c "read -P $2 $1 64k" mnt/disk >/dev/null
	done
	# holes read as zeroes, and SEEK_DATA skips them
	qemu-io -f raw -r -c "read -P 0 1G 1M" -c "read -P 0 $((600 * 1024**3)) 1M" mnt/disk >/dev/null
	python3 -c "
import os
fd = os.open('mnt/disk', os.O_RDONLY)
assert os.lseek(fd, 65536, os.SEEK_DATA) == 5 * 1024**3, os.lseek(fd, 65536, os.SEEK_DATA)
assert os.lseek(fd, 0, os.SEEK_HOLE) == 65536
"
}

@test "SEEK_DATA/SEEK_HOLE keep holes in cp --sparse=always" {
	qemu-img create -q -f qcow2 a.qcow2 64M
	qemu-io -c "write -P 0x77 10M 1M" -c "write -P 0x78 40M 64k" a.qcow2 >/dev/null
	qemu_raw a.qcow2 ref.raw
	mkdir mnt
	mount_imgfs a.qcow2 mnt
	cp --sparse=always mnt/disk copy.raw
	same_bytes copy.raw ref.raw
	used=$(du -k copy.raw | cut -f1)
	[ "$used" -lt 4096 ]
}

@test "reads are identical from many threads at once" {
	pattern_file src.raw $((32 * 1024 * 1024)) 11
	qemu-img convert -q -f raw -O qcow2 -o cluster_size=4k src.raw a.qcow2
	mkdir mnt
	mount_imgfs a.qcow2 mnt
	for j in 1 2 3 4; do
		( dd if=mnt/disk bs=4k iflag=direct status=none | cmp - src.raw ) &
		pids+=($!)
	done
	for p in "${pids[@]}"; do wait "$p"; done
}
