#!/usr/bin/env bats
# Partition views (SPEC §3): every pN of a mounted image is the byte range
# that sfdisk says partition N has, whatever made the table; bad tables
# hide bad entries but never take the mount down.

load lib/common

setup() {
	common_setup
	PATH="$PATH:/usr/sbin:/sbin"
	mkdir mnt
}

teardown() {
	common_teardown
}

# Lines "N START SIZE" (sectors), one per partition sfdisk sees in a raw
# image; MBR extended containers left out (they are no view).
sfdisk_parts() {
	sfdisk --json "$1" | python3 -c '
import json, re, sys
t = json.load(sys.stdin)["partitiontable"]
for p in t.get("partitions", []):
    if t["label"] == "dos" and p["type"] in ("5", "f", "85"):
        continue
    print(re.search(r"(\d+)$", p["node"]).group(1), p["start"], p["size"])'
}

# Fill every partition of a raw image with its own pseudo-random bytes, so
# that a view at the wrong offset cannot compare equal by accident.
fill_partitions() {
	local raw=$1 n start size
	while read -r n start size; do
		pattern_file "$T/fill" $((size * 512)) "$n"
		dd if="$T/fill" of="$raw" bs=1M oflag=seek_bytes seek=$((start * 512)) \
			conv=notrunc,sparse status=none
	done < <(sfdisk_parts "$raw")
	rm -f "$T/fill"
}

# Every partition sfdisk sees in RAW is MNT/pN, byte-identical to its slice
# of RAW, and there is no other pN.
check_partitions() {
	local raw=$1 mnt=$2 n start size count=0
	while read -r n start size; do
		[ -f "$mnt/p$n" ] || { echo "$mnt/p$n missing" >&2; return 1; }
		dd if="$raw" of="$T/slice" bs=1M iflag=skip_bytes,count_bytes \
			skip=$((start * 512)) count=$((size * 512)) status=none
		same_bytes "$T/slice" "$mnt/p$n" || return 1
		count=$((count + 1))
	done < <(sfdisk_parts "$raw")
	rm -f "$T/slice"
	[ "$(ls "$mnt" | grep -c '^p[0-9][0-9]*$')" -eq "$count" ] ||
		{ echo "$mnt has $(ls "$mnt" | tr '\n' ' '), expected $count partitions" >&2; return 1; }
}

# 3 primaries, then an extended partition holding 5 logicals.
make_mbr() {
	truncate -s 64M "$1"
	sfdisk -q --no-reread --no-tell-kernel "$1" <<-EOF
		label: dos
		start=2048, size=8MiB, type=83, bootable
		size=4MiB, type=82
		size=4MiB, type=7
		type=5
		size=2MiB, type=83
		size=3MiB, type=83
		size=1MiB, type=c
		size=2MiB, type=83
		type=83
	EOF
}

# GPT entries 1, 2, 5, 9 and 128, the last beyond 4 GiB.
make_gpt() {
	truncate -s 6G "$1"
	sgdisk -n 1:2048:+1M -t 1:ef00 -c 1:"EFI system" \
		-n 2:0:+2M -t 2:8300 -c 2:root \
		-n 5:0:+1M -t 5:8200 \
		-n 9:0:+3M -c 9:nine \
		-n 128:9437184:+8M -t 128:8302 -c 128:"beyond 4 GiB" "$1" >/dev/null
}

to_qcow2() {
	qemu-img convert -f raw -O qcow2 "$1" "$2"
}

# Write an MBR-layout entry with python: FILE SECTOR SLOT TYPE START COUNT.
put_entry() {
	python3 - "$@" <<'PY'
import struct, sys
path, sector, slot, typ, start, count = sys.argv[1], *map(lambda v: int(v, 0), sys.argv[2:])
with open(path, "r+b") as f:
    f.seek(sector * 512 + 0x1be + slot * 16)
    f.write(struct.pack("<B3sB3sII", 0, b"\0" * 3, typ, b"\0" * 3, start, count))
    f.seek(sector * 512 + 510)
    f.write(b"\x55\xaa")
PY
}

# Set a GPT header field (at byte off, width 4 or 8) and fix its CRC.
gpt_header_set() {
	python3 - "$@" <<'PY'
import struct, sys, zlib
path, lba, off, width, val = sys.argv[1], *map(lambda v: int(v, 0), sys.argv[2:])
with open(path, "r+b") as f:
    f.seek(lba * 512)
    h = bytearray(f.read(512))
    h[off:off + width] = val.to_bytes(width, "little")
    size = struct.unpack_from("<I", h, 12)[0]
    h[16:20] = b"\0" * 4
    h[16:20] = struct.pack("<I", zlib.crc32(bytes(h[:size])))
    f.seek(lba * 512)
    f.write(h)
PY
}

@test "MBR: p1-p3 are the primaries and p5-p9 the logicals, each the slice sfdisk reports" {
	make_mbr raw.img
	fill_partitions raw.img
	to_qcow2 raw.img img.qcow2
	mount_imgfs img.qcow2 mnt -r
	check_partitions raw.img mnt
	[ -f mnt/p5 ] && [ -f mnt/p9 ]
}

@test "MBR: the extended container is not a view" {
	make_mbr raw.img
	to_qcow2 raw.img img.qcow2
	mount_imgfs img.qcow2 mnt -r
	[ -f mnt/p3 ]
	[ ! -e mnt/p4 ]
}

@test "each partition's extended attributes give its offset and length in bytes" {
	make_mbr raw.img
	to_qcow2 raw.img img.qcow2
	mount_imgfs img.qcow2 mnt -r
	read -r n start size < <(sfdisk_parts raw.img | awk '$1 == 6')
	[ "$(getfattr --only-values -n user.imgfs.offset mnt/p6)" = $((start * 512)) ]
	[ "$(getfattr --only-values -n user.imgfs.length mnt/p6)" = $((size * 512)) ]
	[ "$(stat -c %s mnt/p6)" = $((size * 512)) ]
}

@test "GPT: pN is the entry index, p128 lies beyond 4 GiB" {
	make_gpt raw.img
	fill_partitions raw.img
	to_qcow2 raw.img img.qcow2
	mount_imgfs img.qcow2 mnt -r
	check_partitions raw.img mnt
	[ -f mnt/p1 ]
	[ -f mnt/p2 ]
	[ -f mnt/p5 ]
	[ -f mnt/p9 ]
	[ -f mnt/p128 ]
	[ ! -e mnt/p3 ]
}

@test "--list --json gives each GPT partition's type, GUID and name as sfdisk does" {
	truncate -s 64M raw.img
	sgdisk -n 1:2048:+4M -t 1:ef00 -c 1:"EFI system" \
		-n 3:0:+8M -c 3:'data "x" é' -n 4:0:+1M raw.img >/dev/null
	"$IMGFS" --list --json raw.img > list.json
	sfdisk --json raw.img > sfdisk.json
	python3 - <<-'PY'
		import json, re
		views = {v["name"]: v for v in json.load(open("list.json"))["views"]}
		parts = json.load(open("sfdisk.json"))["partitiontable"]["partitions"]
		assert sorted(n for n in views if n != "disk") == ["p1", "p3", "p4"], views
		for p in parts:
		    v = views["p" + re.search(r"(\d+)$", p["node"]).group(1)]
		    assert v["offset"] == p["start"] * 512 and v["length"] == p["size"] * 512, (v, p)
		    assert v["type"] == p["type"].lower(), (v, p)
		    assert v["label"] == p.get("name", ""), (v, p)
		    assert p["uuid"].lower() in v["info"], (v, p)
	PY
}

@test "GPT: a damaged primary header is replaced by the backup" {
	truncate -s 64M raw.img
	sgdisk -n 1:2048:+4M -n 3:0:+8M -n 7:0:0 raw.img >/dev/null
	fill_partitions raw.img
	cp --sparse=always raw.img good.img
	printf '\xff' | dd of=raw.img bs=1 seek=$((512 + 40)) conv=notrunc status=none
	to_qcow2 raw.img img.qcow2
	mount_imgfs img.qcow2 mnt -r
	check_partitions good.img mnt
}

@test "GPT: a damaged primary entry array is replaced by the backup" {
	truncate -s 64M raw.img
	sgdisk -n 1:2048:+4M -n 3:0:+8M -n 7:0:0 raw.img >/dev/null
	fill_partitions raw.img
	cp --sparse=always raw.img good.img
	printf '\xff' | dd of=raw.img bs=1 seek=$((1024 + 20)) conv=notrunc status=none
	to_qcow2 raw.img img.qcow2
	mount_imgfs img.qcow2 mnt -r
	check_partitions good.img mnt
}

@test "an ext4 filesystem in a partition passes fsck through the mount" {
	make_mbr raw.img
	read -r n start size < <(sfdisk_parts raw.img | awk '$1 == 5')
	mkfs.ext4 -q -F -E offset=$((start * 512)) raw.img $((size / 2))k
	to_qcow2 raw.img img.qcow2
	mount_imgfs img.qcow2 mnt -r
	fsck.ext4 -n -f mnt/p5
}

@test "mkfs.ext4 through a partition view gives a filesystem qemu-img sees in that slice" {
	make_mbr raw.img
	to_qcow2 raw.img img.qcow2
	mount_imgfs img.qcow2 mnt
	mkfs.ext4 -q -F mnt/p6
	fsck.ext4 -n -f mnt/p6
	unmount_imgfs mnt
	qemu-img check img.qcow2
	qemu_raw img.qcow2 out.raw
	read -r n start size < <(sfdisk_parts out.raw | awk '$1 == 6')
	dd if=out.raw of=p6.raw bs=512 skip="$start" count="$size" status=none
	fsck.ext4 -n -f p6.raw
}

@test "bytes written to p5 are at p5's offset in disk and in the image" {
	make_mbr raw.img
	read -r n start size < <(sfdisk_parts raw.img | awk '$1 == 5')
	mount_imgfs raw.img mnt --format=raw
	pattern_file data 1048576 5
	dd if=data of=mnt/p5 bs=64k seek=1 conv=notrunc,fsync status=none
	dd if=mnt/disk of=got bs=64k iflag=skip_bytes skip=$((start * 512 + 65536)) count=16 status=none
	same_bytes data got
	unmount_imgfs mnt
	dd if=raw.img of=got bs=64k iflag=skip_bytes skip=$((start * 512 + 65536)) count=16 status=none
	same_bytes data got
}

@test "a table written through disk makes its partitions appear" {
	truncate -s 64M raw.img
	mount_imgfs raw.img mnt --format=raw
	[ ! -e mnt/p1 ]
	sfdisk -q --no-reread --no-tell-kernel mnt/disk <<-EOF
		label: dos
		start=2048, size=8MiB, type=83
		type=5
		size=4MiB
	EOF
	# sfdisk writes the MBR, then the EBR: the EBR's write must re-read
	# the table too (it is one of partition_table.table_sectors)
	for _ in $(seq 50); do [ -e mnt/p5 ] && break; sleep 0.1; done
	[ -f mnt/p1 ]
	[ -f mnt/p5 ]
	[ "$(stat -c %s mnt/p1)" = $((8 << 20)) ]
	[ "$(stat -c %s mnt/p5)" = $((4 << 20)) ]
}

@test "a GPT written through disk by sgdisk makes its partitions appear" {
	truncate -s 64M raw.img
	mount_imgfs raw.img mnt --format=raw
	sgdisk -n 2:2048:+4M -n 4:0:+1M mnt/disk >/dev/null
	for _ in $(seq 50); do [ -e mnt/p4 ] && break; sleep 0.1; done
	[ -f mnt/p2 ]
	[ -f mnt/p4 ]
	[ ! -e mnt/p1 ]
	[ "$(stat -c %s mnt/p2)" = $((4 << 20)) ]
}

@test "an EBR chain that loops ends the logicals, and the mount stays up" {
	truncate -s 16M raw.img
	put_entry raw.img 0 0 0x05 2048 30000
	put_entry raw.img 2048 0 0x83 1 100     # p5
	put_entry raw.img 2048 1 0x05 1000 100  # next EBR at 3048
	put_entry raw.img 3048 0 0x83 1 100     # p6
	put_entry raw.img 3048 1 0x05 0 100     # back to the first EBR
	timeout 20 "$IMGFS" --list --format=raw raw.img
	mount_imgfs raw.img mnt --format=raw -r
	[ -f mnt/p5 ]
	[ -f mnt/p6 ]
	[ ! -e mnt/p7 ]
	[ "$(getfattr --only-values -n user.imgfs.offset mnt/p6)" = $((3049 * 512)) ]
	same_bytes raw.img mnt/disk
}

@test "a partition past the end of the disk or over the table is not shown" {
	truncate -s 16M raw.img
	put_entry raw.img 0 0 0x83 2048 100       # p1 fine
	put_entry raw.img 0 1 0x83 4096 1000000   # p2 ends past 16 MiB
	put_entry raw.img 0 2 0x83 0 100          # p3 over the MBR
	put_entry raw.img 0 3 0x83 8192 100       # p4 fine
	mount_imgfs raw.img mnt --format=raw -r
	[ -f mnt/p1 ]
	[ -f mnt/p4 ]
	[ ! -e mnt/p2 ]
	[ ! -e mnt/p3 ]
	same_bytes raw.img mnt/disk
}

@test "a GPT with an absurd entry count in both headers shows no partitions, the disk still" {
	truncate -s 64M raw.img
	sgdisk -n 1:2048:+4M raw.img >/dev/null
	gpt_header_set raw.img 1 80 4 0xffffffff
	gpt_header_set raw.img $(((64 << 11) - 1)) 80 4 0xffffffff
	mount_imgfs raw.img mnt --format=raw -r
	[ "$(ls mnt)" = disk ]
	same_bytes raw.img mnt/disk
}

@test "a GPT with bad CRCs in both copies shows no partitions, the disk still" {
	truncate -s 64M raw.img
	sgdisk -n 1:2048:+4M raw.img >/dev/null
	printf '\xff' | dd of=raw.img bs=1 seek=$((512 + 16)) conv=notrunc status=none
	printf '\xff' | dd of=raw.img bs=1 seek=$((64 * 1048576 - 512 + 16)) conv=notrunc status=none
	mount_imgfs raw.img mnt --format=raw -r
	[ "$(ls mnt)" = disk ]
	same_bytes raw.img mnt/disk
}
