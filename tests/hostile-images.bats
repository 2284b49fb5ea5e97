#!/usr/bin/env bats
# Malicious images (tests/make-evil-images.py: real qemu-img output with one
# defect patched in).  Each is refused at open with one line naming the
# field, exit 2 and no mount left behind — or, for damage met only while
# reading, mounted with EIO on the damaged range alone: the rest of the disk
# reads right, the daemon stays up and answers.  Never a crash or a hang:
# every imgfs and dd runs under `timeout`.

load lib/common

setup_file() {
	EVIL="$BATS_FILE_TMPDIR/evil"
	export EVIL
	/usr/bin/python3 "$BATS_TEST_DIRNAME/make-evil-images.py" "$EVIL" >/dev/null
}

setup() {
	common_setup
	mkdir mnt
}

teardown() {
	common_teardown
}

# usage: refused IMAGE REGEX [imgfs options...]
# Exit 2, one line on stderr (warnings aside) matching REGEX, no mount left.
refused() {
	local img=$EVIL/$1 re=$2
	shift 2
	_MOUNTS+=("$T/mnt")   # in case it mounts after all: teardown unmounts
	run timeout 30 "$IMGFS" "$@" "$img" mnt
	echo "exit $status: $output"
	[ "$status" -eq 2 ]
	local errs
	errs=$(grep -v '^imgfs: warning: ' <<<"$output")
	[ "$(wc -l <<<"$errs")" -eq 1 ]
	[[ "$errs" =~ $re ]]
	not_mounted mnt
}

# usage: mount_ro IMAGE — imgfs -r IMAGE mnt, bounded in time, cleaned up
# in teardown.
mount_ro() {
	local pidfile
	pidfile=$(mktemp "$T/imgfs-pid.XXXXXX")
	_MOUNTS+=("$T/mnt")
	_PIDFILES+=("$pidfile")
	timeout 30 "$IMGFS" --pid-file="$pidfile" -r "$1" mnt
}

# The bytes of one 4 KiB block of a view, read with O_DIRECT (no page cache,
# no readahead): the daemon answers this read itself.
block() {
	timeout 30 dd if="mnt/${3:-disk}" bs=4k skip=$(($1 / 4096)) count="${2:-1}" \
		iflag=direct status=none
}

# Does [OFF, OFF+LEN) read as the byte BYTE (two hex digits)?
reads_as() {
	local got
	got=$(block "$1" $(($2 / 4096)) | od -An -v -tx1 | tr -s ' \n' '\n' | sed '/^$/d' | sort -u | tr '\n' ' ')
	[ "$got" = "$3 " ] || { echo "at $1+$2: bytes $got, expected $3"; return 1; }
}

# usage: eio_only_there IMAGE BAD-OFFSET GOOD-OFFSET GOOD-BYTE
# Mounted read-only: a read of the bad block fails with EIO (twice: the
# daemon does not die of the first), the good 64 KiB read right after, and
# the daemon is alive and the mount answers.
eio_only_there() {
	local img=$EVIL/$1 bad=$2 good=$3 byte=$4
	mount_ro "$img"
	run block "$bad"
	echo "first read: $status $output"
	[ "$status" -ne 0 ]
	[[ "$output" == *"Input/output error"* ]]
	reads_as "$good" 65536 "$byte"
	run block "$bad"
	[[ "$output" == *"Input/output error"* ]]
	reads_as "$good" 65536 "$byte"
	alive "$(last_pid)"
	[ "$(stat -c %s mnt/disk)" -eq $((8 << 20)) ]
	fusermount3 -u mnt
	wait_gone "$(last_pid)"
}

# usage: mounts_with IMAGE VIEWS...   (mnt lists exactly these views)
mounts_with() {
	local img=$EVIL/$1
	shift
	mount_ro "$img"
	[ "$(cd mnt && ls | sort | tr '\n' ' ')" = "$(printf '%s\n' "$@" | sort | tr '\n' ' ')" ] ||
		{ ls mnt; return 1; }
	alive "$(last_pid)"
}

# ---- the header ---------------------------------------------------------------

@test "cluster_bits 8 is refused" {
	refused cluster-bits-8.qcow2 "cluster_bits 8"
}

@test "cluster_bits 22 is refused" {
	refused cluster-bits-22.qcow2 "cluster_bits 22"
}

@test "cluster_bits 63 is refused" {
	refused cluster-bits-63.qcow2 "cluster_bits 63"
}

@test "version 4 is refused" {
	refused version-4.qcow2 "qcow2 version 4"
}

@test "a header_length below 104 is refused" {
	refused header-length-tiny.qcow2 "header_length 50"
}

@test "a header_length of 4 GiB is refused" {
	refused header-length-huge.qcow2 "header_length 4294967288"
}

@test "refcount_order 7 is refused" {
	refused refcount-order-7.qcow2 "refcount_order 7"
}

@test "a virtual size of 2^62 is refused" {
	refused size-huge.qcow2 "virtual size 4611686018427387904 is too big"
}

@test "an unknown incompatible feature bit is refused, naming the bit" {
	refused incompat-unknown-bit.qcow2 "unknown incompatible feature bit 40"
}

@test "an encrypted image is refused" {
	refused encrypted-aes.qcow2 "encrypted image \(crypt_method 1"
}

@test "an unknown compression type is refused" {
	refused compression-type-2.qcow2 "compression_type 2"
}

@test "a header extension longer than cluster 0 is refused" {
	refused extension-huge.qcow2 "header extension 0x12345678 is too large"
}

@test "an external data file named as json: is refused (CVE-2024-4467)" {
	refused data-file-json.qcow2 "data file name .* json: specification"
}

@test "the corrupt bit refuses a writable open" {
	refused corrupt-bit.qcow2 "marked corrupt"
}

@test "the corrupt bit still allows a read-only mount" {
	mounts_with corrupt-bit.qcow2 disk
	reads_as $((4 << 20)) 65536 22
}

@test "a header cut at 50 bytes is refused" {
	refused truncated-header.qcow2 "bad magic or truncated header"
}

@test "a v3 header cut at 80 bytes is refused" {
	refused truncated-v3-header.qcow2 "v3 header is truncated"
}

# ---- L1 and refcount tables ---------------------------------------------------

@test "an L1 table of 2^25 entries is refused" {
	refused l1-size-huge.qcow2 "active L1 table has 33554432 entries"
}

@test "an L1 table too small for the disk is refused" {
	refused l1-too-small.qcow2 "L1 table is too small"
}

@test "an L1 table past the end of the file is refused" {
	refused l1-offset-past-eof.qcow2 "active L1 table at 0x10000000000 .* past the end of the file"
}

@test "an unaligned L1 table offset is refused" {
	refused l1-offset-unaligned.qcow2 "active L1 table offset 0x[0-9a-f]+ is not cluster-aligned"
}

@test "an L1 table at offset 0 (the header) is refused" {
	refused l1-offset-zero.qcow2 "active L1 table overlaps the header"
}

@test "an L1 table over the refcount table is refused" {
	refused l1-overlaps-reftable.qcow2 "refcount table .* overlaps the active L1 table"
}

@test "a refcount table of 0 clusters is refused" {
	refused reftable-size-0.qcow2 "refcount table is empty"
}

@test "a refcount table of 2^28 clusters is refused" {
	refused reftable-huge.qcow2 "refcount table too large"
}

@test "an unaligned refcount table is refused" {
	refused reftable-unaligned.qcow2 "invalid refcount table offset 0x[0-9a-f]*8"
}

@test "a refcount table past the end of the file is refused" {
	refused reftable-past-eof.qcow2 "refcount table at 0x10000000000 .* past the end of the file"
}

@test "a file cut inside its L1 table is refused" {
	refused truncated-in-l1.qcow2 "active L1 table at 0x[0-9a-f]+ .* past the end of the file"
}

# ---- damage met while reading: EIO there, the rest reads -----------------------

@test "an unaligned L1 entry: EIO for its 2 MiB, the rest reads" {
	eio_only_there l1-entry-unaligned.qcow2 0 $((4 << 20)) 22
}

@test "an L1 entry past the end of the file: EIO for its 2 MiB, the rest reads" {
	eio_only_there l1-entry-past-eof.qcow2 4096 $((4 << 20)) 22
}

@test "an L2 entry pointing past the end of the file: EIO for that cluster only" {
	eio_only_there l2-entry-past-eof.qcow2 0 $((4 << 20)) 22
	mount_ro "$EVIL/l2-entry-past-eof.qcow2"
	reads_as 4096 61440 11
}

@test "an unaligned L2 entry: EIO for that cluster only" {
	eio_only_there l2-entry-unaligned.qcow2 0 $((4 << 20)) 22
}

@test "an L2 entry with reserved bits: EIO for that cluster only" {
	eio_only_there l2-entry-reserved-bits.qcow2 0 $((4 << 20)) 22
}

@test "a file cut inside its data: EIO for the missing clusters, the rest reads" {
	eio_only_there truncated-data.qcow2 $(((4 << 20) + 61440)) 0 11
}

@test "a write into an L2 entry that aliases the L1 table: EIO, the image marked corrupt, reads go on" {
	local pidfile
	pidfile=$(mktemp "$T/imgfs-pid.XXXXXX")
	_MOUNTS+=("$T/mnt")
	_PIDFILES+=("$pidfile")
	cp "$EVIL/l2-entry-aliases-l1.qcow2" alias.qcow2
	timeout 30 "$IMGFS" --pid-file="$pidfile" alias.qcow2 mnt
	run timeout 30 dd if=/dev/zero of=mnt/disk bs=4k count=1 oflag=direct conv=notrunc status=none
	[ "$status" -ne 0 ]
	[[ "$output" == *"Input/output error"* ]]
	reads_as $((4 << 20)) 65536 22
	alive "$(cat "$pidfile")"
	fusermount3 -u mnt
	wait_gone "$(cat "$pidfile")"
	qemu-img info alias.qcow2 | grep -q 'corrupt: true'
	# and a writable open is now refused
	run timeout 30 "$IMGFS" alias.qcow2 mnt
	[ "$status" -eq 2 ]
	[[ "$output" == *"marked corrupt"* ]]
	not_mounted mnt
}

@test "a snapshot name with a NUL: the whole snapshot table stays protected from writes" {
	local pidfile
	pidfile=$(mktemp "$T/imgfs-pid.XXXXXX")
	_MOUNTS+=("$T/mnt")
	_PIDFILES+=("$pidfile")
	cp "$EVIL/snapshot-name-nul.qcow2" nul.qcow2
	timeout 30 "$IMGFS" --pid-file="$pidfile" nul.qcow2 mnt
	run timeout 30 dd if=/dev/zero of=mnt/disk bs=4k count=1 oflag=direct conv=notrunc status=none
	[ "$status" -ne 0 ]
	[[ "$output" == *"Input/output error"* ]]
	alive "$(cat "$pidfile")"
	fusermount3 -u mnt
	wait_gone "$(cat "$pidfile")"
	qemu-img info nul.qcow2 | grep -q 'corrupt: true'
	# the table is intact: its one snapshot is still listed
	qemu-img snapshot -l nul.qcow2 | grep -q '^1 '
}

# ---- compressed clusters --------------------------------------------------------

@test "a compressed descriptor past the end of the file gives EIO" {
	eio_only_there compressed-past-eof.qcow2 0 $((4 << 20)) 22
}

@test "a zlib bomb (1 MiB from one 4 KiB cluster) gives EIO, in bounded memory" {
	eio_only_there compression-bomb-zlib.qcow2 0 $((4 << 20)) 22
}

@test "a zstd bomb (1 MiB from one 4 KiB cluster) gives EIO" {
	eio_only_there compression-bomb-zstd.qcow2 0 $((4 << 20)) 22
}

@test "a zlib cluster that decompresses short gives EIO" {
	eio_only_there compressed-short-zlib.qcow2 0 $((4 << 20)) 22
}

@test "a zstd cluster that decompresses short gives EIO" {
	eio_only_there compressed-short-zstd.qcow2 0 $((4 << 20)) 22
}

@test "a compressed cluster of garbage gives EIO" {
	eio_only_there compressed-garbage-zlib.qcow2 0 $((4 << 20)) 22
}

# ---- snapshots ------------------------------------------------------------------

@test "70000 snapshots are refused" {
	refused snapshot-count-70000.qcow2 "too many snapshots \(70000, at most 65536\)"
}

@test "a snapshot table past the end of the file is refused" {
	refused snapshot-table-past-eof.qcow2 "invalid snapshot table offset 0x10000000000"
}

@test "an unaligned snapshot table is refused" {
	refused snapshot-table-unaligned.qcow2 "invalid snapshot table offset"
}

@test "snapshot extra data of 2 GiB is refused" {
	refused snapshot-extra-huge.qcow2 "extra data too large \(2147483647 bytes"
}

@test "a snapshot name running past the end of the file is refused" {
	refused snapshot-name-past-eof.qcow2 "snapshot table entry 0 runs past the end of the file"
}

@test "a snapshot L1 past the end of the file hides that snapshot only" {
	mounts_with snapshot-l1-past-eof.qcow2 disk
	reads_as 0 65536 11
}

@test "a snapshot L1 of 2^25 entries hides that snapshot only" {
	mounts_with snapshot-l1-huge.qcow2 disk
	reads_as $((4 << 20)) 65536 22
}

@test "65536 snapshots with distinct names open in bounded time" {
	start=$(date +%s%N)
	mount_ro "$EVIL/snapshot-65536-names.qcow2"
	end=$(date +%s%N)
	echo "# mount with 65536 snapshots: $(( (end - start) / 1000000 )) ms" >&3
	[ $(( (end - start) / 1000000000 )) -lt 10 ]
	[ "$(ls mnt | wc -l)" -eq 65537 ]
	[ -f mnt/snap@n65535 ]
}

@test "snapshot names and IDs that are no file names: listed safely, never with '/' or escapes" {
	mount_ro "$EVIL/snapshot-hostile-names.qcow2"
	[ "$(cd mnt && ls | tr '\n' ' ')" = "disk snap@#7 snap@#?1 snap@#?3 snap@#?4 snap@ok " ]
	reads_as 0 65536 11
	run timeout 30 "$IMGFS" --list "$EVIL/snapshot-hostile-names.qcow2"
	[ "$status" -eq 0 ]
	[[ "$output" != *$'\e'* ]]
	[[ "$output" == *"a?[31mred"* ]]
}

# ---- backing files --------------------------------------------------------------

@test "a backing name of 4096 bytes is refused" {
	refused backing-name-4096.qcow2 "backing file name too long \(4096 bytes\)"
}

@test "a json: backing name is refused, never parsed" {
	refused backing-json.qcow2 "backing file name .* json: specification"
}

@test "a protocol backing name is refused" {
	refused backing-protocol.qcow2 "backing file name 'nbd\+unix:.* protocol"
}

@test "an image that is its own backing file is refused" {
	refused backing-self.qcow2 "backing chain loops back"
}

@test "a backing loop of two images is refused" {
	refused backing-loop-a.qcow2 "backing chain loops back"
}

@test "a backing chain of 70 images is refused" {
	refused chain/c70.qcow2 "backing chain deeper than 64 images"
}

@test "a backing file that is a FIFO is refused, without blocking" {
	refused backing-fifo.qcow2 "backing-fifo.pipe: not a regular file"
}

# ---- partition tables -----------------------------------------------------------

@test "an EBR that links to itself ends the chain: p1 and p5 only" {
	mounts_with ebr-loop.img disk p1 p5
}

@test "an EBR loop inside a qcow2 image ends the chain too" {
	mounts_with ebr-loop.qcow2 disk p1 p5
}

@test "an EBR chain that goes backwards ends there" {
	mounts_with ebr-backward.img disk p1 p5 p6
}

@test "an MBR partition past the end of the disk is not shown" {
	mounts_with mbr-past-end.img disk p1
}

@test "a GPT of 2^32-1 entries is not read" {
	mounts_with gpt-entries-4g.img disk
}

@test "a GPT entry size of 0 is not read" {
	mounts_with gpt-entry-size-0.img disk
}

@test "a GPT entry size of 2 GiB is not read" {
	mounts_with gpt-entry-size-huge.img disk
}

@test "a GPT header size of 4 GiB is not read" {
	mounts_with gpt-header-size-huge.img disk
}

@test "a GPT whose entry arrays fail their CRC is not read" {
	mounts_with gpt-bad-array-crc.img disk
}

@test "a GPT with a damaged primary header is read from its backup" {
	mounts_with gpt-primary-damaged.img disk p1
}

# ---- not images at all ----------------------------------------------------------

@test "an empty file mounts as an empty raw disk" {
	mounts_with empty.img disk
	[ "$(stat -c %s mnt/disk)" -eq 0 ]
}

@test "a one-byte file mounts as a one-byte raw disk" {
	mounts_with one-byte.img disk
	[ "$(stat -c %s mnt/disk)" -eq 1 ]
}

@test "16 snapshots sharing one 32 MiB L1: memory for snapshot L1s stays bounded (256 MiB)" {
	mount_ro "$EVIL/snapshot-l1-shared.qcow2"
	ok=0 eio=0
	for i in $(seq 0 15); do
		if block 0 1 "snap@big$i" >/dev/null; then
			ok=$((ok + 1))
		else
			eio=$((eio + 1))
		fi
	done
	rss=$(awk '/^VmRSS:/ { print $2 }' "/proc/$(last_pid)/status")
	echo "# $ok snapshot L1s loaded, $eio refused; daemon VmRSS $rss kB" >&3
	[ "$ok" -eq 8 ] && [ "$eio" -eq 8 ]
	[ "$rss" -lt $((400 * 1024)) ]
	reads_as 0 65536 11
	alive "$(last_pid)"
}

@test "over NBD too: the damaged cluster is EIO for that request only, the server stays up" {
	"$IMGFS_NBD" --fork --pid-file="$T/nbd.pid" -k "$T/nbd.sock" -t -r "$EVIL/l2-entry-past-eof.qcow2"
	track_pid "$(cat "$T/nbd.pid")"
	uri="nbd+unix:///?socket=$T/nbd.sock"
	run timeout 30 qemu-io -f raw -r -c 'read 0 4k' "$uri"
	[[ "$output" == *"Input/output error"* ]]
	run timeout 30 qemu-io -f raw -r -c "read -P 0x22 $((4 << 20)) 64k" -c 'read -P 0x11 4k 60k' "$uri"
	[ "$status" -eq 0 ]
	[[ "$output" != *"Pattern verification failed"* ]]
	[ "$(grep -c 'read .*/.* bytes' <<<"$output")" -eq 2 ]
	alive "$(cat "$T/nbd.pid")"
}
