# qcow2 writes: allocation, copy-on-write, zeroes and discard, flush and
# crash safety, locking.  The peer is qemu: one deterministic random
# workload goes through the mount and, as qemu-io commands, into a copy of
# the image; the two must compare equal and both check clean.

load lib/common

WL="$BATS_TEST_DIRNAME/lib/qcow2_workload.py"
MiB=$((1024 * 1024))

setup() {
	common_setup
	mkdir mnt
}
teardown() { common_teardown; }

# qemu-io with one command per line of a file.  usage: qemu_io_file IMAGE FILE
qemu_io_file() {
	local args=() c
	while IFS= read -r c; do
		args+=(-c "$c")
	done <"$2"
	qemu-io -f qcow2 "${args[@]}" "$1" >/dev/null
}

# Some content of every kind: data, zero clusters, unaligned bits.
# usage: fill IMAGE
fill() {
	qemu-io -f qcow2 -c "write -P 0x11 0 1M" -c "write -P 0x22 3M 100k" \
		-c "write -z 3200k 256k" -c "write -P 0x33 7777777 12345" \
		-c "write -P 0x44 12M 2M" -c "write -z 13M 64k" "$1" >/dev/null
}

# The workload through mnt/VIEW of a.qcow2 and with qemu-io on ref.qcow2;
# then compare equal, check clean (no leaks either), snapshots untouched.
# usage: same_as_qemu VIEW BASE SIZE SEED NOPS
same_as_qemu() {
	local view=$1 base=$2 size=$3 seed=$4 nops=$5 s name
	mount_imgfs a.qcow2 mnt
	for s in mnt/snap@*; do
		[ -e "$s" ] && cp "$s" "before-${s#mnt/}"
	done
	python3 "$WL" run "mnt/$view" "$size" "$seed" "$nops" ops.log
	for s in mnt/snap@*; do
		[ -e "$s" ] && same_bytes "$s" "before-${s#mnt/}"
	done
	unmount_imgfs mnt
	python3 "$WL" qemu ops.log "$base" >ops.qemu
	qemu_io_file ref.qcow2 ops.qemu
	qemu-img compare a.qcow2 ref.qcow2
	qemu-img check a.qcow2
	qemu-img check ref.qcow2
	for s in before-snap@*; do
		[ -e "$s" ] || continue
		name=${s#before-snap@}
		qemu_raw a.qcow2 after.raw -l "snapshot.name=$name"
		same_bytes after.raw "$s"
	done
	# the dirty bit was cleared at unmount
	qemu-img info --output=json a.qcow2 | grep -q '"dirty-flag": false'
}

@test "64 KiB clusters: the random workload gives what qemu-io gives" {
	qemu-img create -q -f qcow2 a.qcow2 32M
	fill a.qcow2
	cp a.qcow2 ref.qcow2
	same_as_qemu disk 0 $((16 * MiB)) 1 400
}

@test "4 KiB clusters: the random workload gives what qemu-io gives" {
	qemu-img create -q -f qcow2 -o cluster_size=4096 a.qcow2 32M
	fill a.qcow2
	cp a.qcow2 ref.qcow2
	same_as_qemu disk 0 $((16 * MiB)) 2 400
}

@test "extended L2 over a backing file: only touched subclusters, backing shows elsewhere" {
	pattern_file back.raw $((32 * MiB)) 7
	qemu-img create -q -f qcow2 -o cluster_size=65536,extended_l2=on -b back.raw -F raw a.qcow2
	fill a.qcow2
	cp a.qcow2 ref.qcow2
	same_as_qemu disk 0 $((16 * MiB)) 3 400
	# a 2 KiB write allocates one 2 KiB subcluster, not the cluster
	mount_imgfs a.qcow2 mnt
	printf 'x%.0s' $(seq 2048) | dd of=mnt/disk bs=2048 seek=$((20 * MiB / 2048)) conv=notrunc status=none
	unmount_imgfs mnt
	qemu-img map --output=json a.qcow2 | grep -q "\"start\": $((20 * MiB)), \"length\": 2048, .*\"data\": true, .*\"offset\""
	qemu-img check a.qcow2
}

@test "refcount_bits=1: the random workload gives what qemu-io gives" {
	qemu-img create -q -f qcow2 -o cluster_size=4096,refcount_bits=1 a.qcow2 32M
	fill a.qcow2
	cp a.qcow2 ref.qcow2
	same_as_qemu disk 0 $((16 * MiB)) 4 300
}

@test "refcount_bits=64 and 8: the random workload gives what qemu-io gives" {
	for bits in 64 8; do
		rm -f a.qcow2 ref.qcow2
		qemu-img create -q -f qcow2 -o cluster_size=4096,refcount_bits=$bits a.qcow2 32M
		fill a.qcow2
		cp a.qcow2 ref.qcow2
		same_as_qemu disk 0 $((16 * MiB)) $((5 + bits)) 200
	done
}

@test "a compressed backing file: COW decompresses from it" {
	pattern_file back.raw $((32 * MiB)) 8
	qemu-img convert -c -O qcow2 back.raw back.qcow2
	qemu-img create -q -f qcow2 -b back.qcow2 -F qcow2 a.qcow2
	fill a.qcow2
	cp a.qcow2 ref.qcow2
	same_as_qemu disk 0 $((16 * MiB)) 5 400
}

@test "compressed clusters and two snapshots: COW keeps both snapshots intact" {
	pattern_file src.raw $((32 * MiB)) 9
	qemu-img convert -c -O qcow2 src.raw a.qcow2
	qemu-img snapshot -c one a.qcow2
	fill a.qcow2
	qemu-img snapshot -c two a.qcow2
	qemu-io -c "write -P 0x55 2M 3M" a.qcow2 >/dev/null
	cp a.qcow2 ref.qcow2
	same_as_qemu disk 0 $((16 * MiB)) 6 400
	# the snapshots still read as qemu reads them in the untouched copy
	qemu_raw a.qcow2 one.raw -l snapshot.name=one
	same_bytes one.raw src.raw
}

@test "an external data file: the random workload gives what qemu-io gives" {
	qemu-img create -q -f qcow2 -o data_file=a.data a.qcow2 32M
	qemu-img create -q -f qcow2 -o data_file=ref.data ref.qcow2 32M
	fill a.qcow2
	fill ref.qcow2
	same_as_qemu disk 0 $((16 * MiB)) 7 400
}

@test "a version 2 image over a backing file: no zero flag, zeroes written" {
	pattern_file back.raw $((32 * MiB)) 10
	qemu-img create -q -f qcow2 -o compat=0.10 -b back.raw -F raw a.qcow2
	qemu-io -f qcow2 -c "write -P 0x11 0 1M" -c "write -P 0x33 7777777 12345" a.qcow2 >/dev/null
	cp a.qcow2 ref.qcow2
	same_as_qemu disk 0 $((16 * MiB)) 8 300
}

@test "an odd-sized version 2 image without backing: discards unmap, the last cluster is partial" {
	qemu-img create -q -f qcow2 -o compat=0.10,cluster_size=4096 a.qcow2 $((16 * MiB + 5 * 512))
	fill a.qcow2
	qemu-io -f qcow2 -c "write -P 0x5c $((16 * MiB - 1000)) 3560" a.qcow2 >/dev/null
	cp a.qcow2 ref.qcow2
	same_as_qemu disk 0 $((16 * MiB + 5 * 512)) 13 400
}

@test "lazy refcounts: written, closed clean" {
	qemu-img create -q -f qcow2 -o lazy_refcounts=on a.qcow2 32M
	fill a.qcow2
	cp a.qcow2 ref.qcow2
	same_as_qemu disk 0 $((16 * MiB)) 11 300
}

@test "writes through a partition land at its offset in the disk" {
	truncate -s 32M src.raw
	printf 'label: dos\nstart=2048, size=8192, type=83\nstart=12288, size=40960, type=83\n' | sfdisk -q src.raw
	qemu-img convert -O qcow2 -o cluster_size=16384 src.raw a.qcow2
	fill_part() { qemu-io -f qcow2 -c "write -P 0x66 $((12288 * 512 + 4096)) 1M" "$1" >/dev/null; }
	fill_part a.qcow2
	cp a.qcow2 ref.qcow2
	same_as_qemu p2 $((12288 * 512)) $((40960 * 512)) 12 300
}

@test "the refcount table grows, several times, on a 512-byte-cluster image" {
	qemu-img create -q -f qcow2 -o cluster_size=512 a.qcow2 64M
	mount_imgfs a.qcow2 mnt
	pattern_file data.raw $((40 * MiB)) 12
	dd if=data.raw of=mnt/disk bs=1M conv=notrunc,fsync status=none
	unmount_imgfs mnt
	qemu-img check a.qcow2
	qemu_raw a.qcow2 out.raw
	cmp -n $((40 * MiB)) out.raw data.raw
	# 40 MiB of 512-byte clusters need refcount blocks for ~82000 clusters:
	# 320 blocks, past the 64 entries of the first one-cluster table
	off=$(od -An -t u8 --endian=big -j 48 -N 8 a.qcow2 | tr -d ' ')
	clusters=$(od -An -t u4 --endian=big -j 56 -N 4 a.qcow2 | tr -d ' ')
	[ "$clusters" -ge 5 ]
}

@test "writes through NBD: write, trim, write-zeroes, flush" {
	qemu-img create -q -f qcow2 a.qcow2 32M
	fill a.qcow2
	cp a.qcow2 ref.qcow2
	"$IMGFS_NBD" --fork --pid-file="$T/nbd.pid" -k "$T/nbd.sock" -t a.qcow2
	pid=$(cat "$T/nbd.pid")
	track_pid "$pid"
	cmds=(-c "write -P 0x77 100000 300000" -c "discard 1M 1M" -c "write -z 5M 123456"
	      -c "write -P 0x78 12M 64k" -c "discard 12M 4096" -c "flush")
	qemu-io -f raw "${cmds[@]}" "nbd+unix:///?socket=$T/nbd.sock" >/dev/null
	kill "$pid"
	wait_gone "$pid"
	# NBD trim of whole clusters reads back as zeroes: so does write -z
	qemu-io -f qcow2 -c "write -P 0x77 100000 300000" -c "write -z 1M 1M" -c "write -z 5M 123456" \
		-c "write -P 0x78 12M 64k" -c "write -z 12M 4096" ref.qcow2 >/dev/null
	qemu-img compare a.qcow2 ref.qcow2
	qemu-img check a.qcow2
}

@test "punch-hole over a backing file reads back zeroes, and frees the clusters" {
	pattern_file back.raw $((8 * MiB)) 13
	qemu-img create -q -f qcow2 -b back.raw -F raw a.qcow2
	qemu-io -f qcow2 -c "write -P 0x11 0 4M" a.qcow2 >/dev/null
	mount_imgfs a.qcow2 mnt
	fallocate -p -o 1000 -l $((3 * MiB)) mnt/disk
	fallocate -p -o $((5 * MiB)) -l $((2 * MiB)) mnt/disk
	cmp -n $((3 * MiB)) -i 1000:0 mnt/disk /dev/zero
	cmp -n $((2 * MiB)) -i $((5 * MiB)):0 mnt/disk /dev/zero
	unmount_imgfs mnt
	qemu_raw a.qcow2 out.raw
	cmp -n $((3 * MiB)) -i 1000:0 out.raw /dev/zero
	cmp -n $((2 * MiB)) -i $((5 * MiB)):0 out.raw /dev/zero
	cmp -n 1000 out.raw <(head -c 1000 /dev/zero | tr '\0' '\021')
	qemu-img check a.qcow2
	# the freed clusters were punched out of the file
	[ "$(du -k a.qcow2 | cut -f1)" -lt 3000 ]
}

@test "a cluster a snapshot shares is copied, never written in place, even with COPIED set" {
	qemu-img create -q -f qcow2 a.qcow2 8M
	qemu-io -c "write -P 0x11 0 1M" a.qcow2 >/dev/null
	qemu-img snapshot -c s a.qcow2
	# forge COPIED back onto the first L2 entry (a lying image)
	l1=$(od -An -t u8 --endian=big -j 40 -N 8 a.qcow2 | tr -d ' ')
	l2=$(( $(od -An -t u8 --endian=big -j "$l1" -N 8 a.qcow2 | tr -d ' ') & 0x00fffffffffffe00 ))
	e=$(od -An -t x1 -j "$l2" -N 8 a.qcow2 | tr -d ' ')
	printf "\\x$(printf %02x $((0x${e:0:2} | 0x80)))" | dd of=a.qcow2 bs=1 seek="$l2" conv=notrunc status=none
	mount_imgfs a.qcow2 mnt
	printf 'new!' | dd of=mnt/disk bs=1 seek=10 conv=notrunc status=none
	cmp -n 1M mnt/snap@s <(head -c 1M /dev/zero | tr '\0' '\021')
	unmount_imgfs mnt
	qemu_raw a.qcow2 s.raw -l snapshot.name=s
	cmp -n 1M s.raw <(head -c 1M /dev/zero | tr '\0' '\021')
}

@test "an overlap with metadata marks the image corrupt and stops writes; reads stay" {
	qemu-img create -q -f qcow2 a.qcow2 8M
	qemu-io -c "write -P 0x11 0 64k" a.qcow2 >/dev/null
	# point guest cluster 0 at the L1 table, with refcount 1 there: a lie
	l1=$(od -An -t u8 --endian=big -j 40 -N 8 a.qcow2 | tr -d ' ')
	l2=$(( $(od -An -t u8 --endian=big -j "$l1" -N 8 a.qcow2 | tr -d ' ') & 0x00fffffffffffe00 ))
	python3 -c "
import struct, sys
f = open('a.qcow2', 'r+b'); f.seek($l2); f.write(struct.pack('>Q', (1 << 63) | $l1))"
	mount_imgfs a.qcow2 mnt
	run dd if=/dev/zero of=mnt/disk bs=512 count=1 conv=notrunc status=none
	[ "$status" -ne 0 ]
	# once corrupt, no further write goes through, even a harmless one
	run dd if=/dev/zero of=mnt/disk bs=4k count=1 seek=1000 oflag=direct conv=notrunc status=none
	[ "$status" -ne 0 ]
	dd if=mnt/disk of=/dev/null bs=64k count=1 skip=1 status=none
	unmount_imgfs mnt
	qemu-img info --output=json a.qcow2 | grep -q '"corrupt": true'
	run "$IMGFS" a.qcow2 mnt
	[ "$status" -ne 0 ]
	[[ "$output" == *corrupt* ]]
}

@test "SIGKILL at random points: only leaks, every fsync'd write reads back, reopen repairs" {
	qemu-img create -q -f qcow2 -o cluster_size=4096 a.qcow2 32M
	fill a.qcow2
	qemu-img snapshot -c s a.qcow2
	qemu_raw a.qcow2 prev.raw
	qemu_raw a.qcow2 snap.raw -l snapshot.name=s
	for seed in 21 22 23 24 25 26; do
		mount_imgfs a.qcow2 mnt
		pid=$(last_pid)
		python3 "$WL" run mnt/disk $((16 * MiB)) "$seed" 5000 "ops$seed.log" 2>"wl$seed.err" &
		wl=$!
		sleep "0.$((seed * 37 % 8 + 1))"
		kill -9 "$pid"
		wait "$wl" || true
		wait_gone "$pid"
		fusermount3 -u mnt 2>/dev/null || umount -l mnt
		# 0 = clean, 3 = leaked clusters only; 2 would be corruption
		run qemu-img check a.qcow2
		echo "$output"
		[ "$status" -eq 0 ] || [ "$status" -eq 3 ]
		qemu_raw a.qcow2 now.raw
		cat "wl$seed.err"
		python3 "$WL" verify "ops$seed.log" prev.raw now.raw 0
		mv now.raw prev.raw
		qemu_raw a.qcow2 s.raw -l snapshot.name=s
		same_bytes s.raw snap.raw
	done
	# a writable open of the image left dirty rebuilds its refcounts
	mount_imgfs a.qcow2 mnt
	unmount_imgfs mnt
	qemu-img check a.qcow2
	qemu-img info --output=json a.qcow2 | grep -q '"dirty-flag": false'
}

# SIGKILL the daemon during the workload, ROUNDS times; after each: only
# leaks, every fsync'd write reads back.  usage: kill_rounds SIZE SEED...
kill_rounds() {
	local size=$1 seed pid wl
	shift
	qemu_raw a.qcow2 prev.raw
	for seed in "$@"; do
		mount_imgfs a.qcow2 mnt
		pid=$(last_pid)
		python3 "$WL" run mnt/disk "$size" "$seed" 5000 "ops$seed.log" 2>/dev/null &
		wl=$!
		sleep "0.$((seed * 37 % 8 + 1))"
		kill -9 "$pid"
		wait "$wl" || true
		wait_gone "$pid"
		fusermount3 -u mnt 2>/dev/null || umount -l mnt
		run qemu-img check a.qcow2
		[ "$status" -eq 0 ] || [ "$status" -eq 3 ] || { echo "$output"; false; }
		qemu_raw a.qcow2 now.raw
		python3 "$WL" verify "ops$seed.log" prev.raw now.raw 0
		mv now.raw prev.raw
	done
	mount_imgfs a.qcow2 mnt
	unmount_imgfs mnt
	qemu-img check a.qcow2
}

@test "SIGKILL while the refcount table grows (512-byte clusters)" {
	qemu-img create -q -f qcow2 -o cluster_size=512 a.qcow2 32M
	kill_rounds $((24 * MiB)) 41 42 43 44
	# the table did grow: one cluster covers 8 MiB of 512-byte clusters
	[ "$(od -An -t u4 --endian=big -j 56 -N 4 a.qcow2 | tr -d ' ')" -gt 1 ]
}

@test "SIGKILL with extended L2 over a compressed backing file" {
	pattern_file back.raw $((32 * MiB)) 45
	qemu-img convert -c -O qcow2 back.raw back.qcow2
	qemu-img create -q -f qcow2 -o cluster_size=65536,extended_l2=on -b back.qcow2 -F qcow2 a.qcow2
	kill_rounds $((16 * MiB)) 46 47 48 49
}

@test "SIGTERM during the workload: closed clean, no leaks, dirty bit clear" {
	qemu-img create -q -f qcow2 -o cluster_size=4096 a.qcow2 32M
	fill a.qcow2
	mount_imgfs a.qcow2 mnt
	pid=$(last_pid)
	python3 "$WL" run mnt/disk $((16 * MiB)) 31 5000 ops.log 2>/dev/null &
	wl=$!
	sleep 0.7
	kill -TERM "$pid"
	wait "$wl" || true
	wait_gone "$pid"
	not_mounted mnt
	qemu-img check a.qcow2
	qemu-img info --output=json a.qcow2 | grep -q '"dirty-flag": false'
}

@test "a writable qcow2 mount holds qemu's write lock: qemu-io cannot write" {
	qemu-img create -q -f qcow2 a.qcow2 8M
	mount_imgfs a.qcow2 mnt
	run qemu-io -f qcow2 -c "write 0 512" a.qcow2
	[ "$status" -ne 0 ]
	[[ "$output" == *lock* ]]
	run qemu-nbd -f qcow2 -k "$T/q.sock" a.qcow2
	[ "$status" -ne 0 ]
	# -U readers get in, as with qemu
	qemu-img check -U a.qcow2
}

@test "a second writable imgfs or imgfs-nbd on a mounted qcow2 image is refused" {
	qemu-img create -q -f qcow2 a.qcow2 8M
	mount_imgfs a.qcow2 mnt
	mkdir mnt2
	run "$IMGFS" a.qcow2 mnt2
	[ "$status" -eq 2 ]
	[[ "$output" == *"in use"* ]]
	not_mounted mnt2
	run "$IMGFS_NBD" -k "$T/n.sock" a.qcow2
	[ "$status" -ne 0 ]
	[[ "$output" == *"in use"* ]]
}

@test "imgfs refuses to write a qcow2 image qemu is writing" {
	qemu-img create -q -f qcow2 a.qcow2 8M
	qemu-io -f qcow2 a.qcow2 &>/dev/null < <(sleep 30) &
	track_pid $!
	sleep 1
	run "$IMGFS" a.qcow2 mnt
	[ "$status" -eq 2 ]
	[[ "$output" == *"in use"* ]]
	not_mounted mnt
}

@test "threads writing disjoint bytes of the same clusters: all land, image clean" {
	pattern_file back.raw $((16 * MiB)) 41
	qemu-img create -q -f qcow2 -o cluster_size=65536 -b back.raw -F raw a.qcow2
	qemu-img snapshot -c s a.qcow2
	mount_imgfs a.qcow2 mnt
	# 8 threads; thread t writes 4 KiB at every 32 KiB + t*4 KiB: each
	# cluster gets COW from the backing file and writes from all of them
	python3 - mnt/disk <<'PY'
import os, sys, threading
fd = os.open(sys.argv[1], os.O_RDWR)
def work(t):
    for k in range(0, 16 * 1024 * 1024, 32768):
        os.pwrite(fd, bytes([t + 1]) * 4096, k + t * 4096)
        if k % (1 << 20) == 0:
            os.pread(fd, 65536, k)
ts = [threading.Thread(target=work, args=(t,)) for t in range(8)]
[t.start() for t in ts]
[t.join() for t in ts]
os.fsync(fd)
PY
	unmount_imgfs mnt
	qemu-img check a.qcow2
	python3 - a.raw <<'PY'
import struct
with open("a.raw", "wb") as f:
    for k in range(0, 16 * 1024 * 1024, 32768):
        f.write(b"".join(bytes([t + 1]) * 4096 for t in range(8)))
PY
	qemu-img compare -f qcow2 -F raw a.qcow2 a.raw
}

@test "fio: two NBD connections, iodepth 16, write and verify on a qcow2 export" {
	qemu-img create -q -f qcow2 -o cluster_size=65536 a.qcow2 64M
	"$IMGFS_NBD" --fork --pid-file="$T/nbd.pid" -k "$T/nbd.sock" -t -e 2 a.qcow2
	pid=$(cat "$T/nbd.pid")
	track_pid "$pid"
	fio --name=w --ioengine=nbd --uri="nbd+unix:///?socket=$T/nbd.sock" --rw=randwrite --bs=4k \
		--iodepth=16 --numjobs=2 --size=16M --offset_increment=16M \
		--verify=crc32c --do_verify=1 --group_reporting --output="$T/fio.out"
	grep -q 'err= 0' "$T/fio.out"
	kill "$pid"
	wait_gone "$pid"
	qemu-img check a.qcow2
}

@test "--no-backing on an overlay is read-only: a write would hide the backing data" {
	qemu-img create -q -f qcow2 base.qcow2 8M
	qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 a.qcow2
	mount_imgfs a.qcow2 mnt --no-backing
	run dd if=/dev/zero of=mnt/disk bs=512 count=1 conv=notrunc status=none
	[ "$status" -ne 0 ]
	[ "$(stat -c %A mnt/disk)" = "-r--r--r--" ]
}

@test "imgfs refuses a qcow2 image qemu-nbd serves writable; readers share with a reader" {
	qemu-img create -q -f qcow2 a.qcow2 8M
	# qemu-nbd makes its socket before it opens (and locks) the image:
	# it holds the lock once it answers
	qemu-nbd -t -f qcow2 -k "$T/q.sock" a.qcow2 &
	track_pid $!
	for _ in $(seq 300); do nbdinfo --size "nbd+unix:///?socket=$T/q.sock" >/dev/null 2>&1 && break; sleep 0.1; done
	nbdinfo --size "nbd+unix:///?socket=$T/q.sock"
	run "$IMGFS" a.qcow2 mnt
	[ "$status" -eq 2 ]
	[[ "$output" == *"in use"* ]]
	run "$IMGFS_NBD" -k "$T/n.sock" a.qcow2
	[ "$status" -ne 0 ]
	not_mounted mnt
	kill "${_PIDS[-1]}"
	wait_gone "${_PIDS[-1]}"
	# qemu-nbd -r is a reader: a read-only mount gets in, a writable one not
	qemu-nbd -t -r -f qcow2 -k "$T/r.sock" a.qcow2 &
	track_pid $!
	for _ in $(seq 300); do nbdinfo --size "nbd+unix:///?socket=$T/r.sock" >/dev/null 2>&1 && break; sleep 0.1; done
	nbdinfo --size "nbd+unix:///?socket=$T/r.sock"
	mount_imgfs a.qcow2 mnt -r
	unmount_imgfs mnt
	run "$IMGFS" a.qcow2 mnt
	[ "$status" -eq 2 ]
	not_mounted mnt
}

@test "truncate grows the disk view like qemu-img resize (the L1 table grows); shrinking is refused" {
	qemu-img create -q -f qcow2 -o cluster_size=512 a.qcow2 1M
	qemu-io -c "write -P 0x11 0 1M" a.qcow2 >/dev/null
	qemu-img snapshot -c s a.qcow2
	cp a.qcow2 ref.qcow2
	mount_imgfs a.qcow2 mnt
	truncate -s 64M mnt/disk
	[ "$(stat -c %s mnt/disk)" = $((64 * MiB)) ]
	[ "$(stat -c %s mnt/snap@s)" = $((1 * MiB)) ]
	printf 'at the end' | dd of=mnt/disk bs=1 seek=$((64 * MiB - 10)) conv=notrunc status=none
	run truncate -s 32M mnt/disk
	[ "$status" -ne 0 ]
	[ "$(stat -c %s mnt/disk)" = $((64 * MiB)) ]
	unmount_imgfs mnt
	qemu-img resize -q ref.qcow2 64M
	qemu-io -c "write -P 0x61 $((64 * MiB - 10)) 1" ref.qcow2 >/dev/null
	qemu-img check a.qcow2
	[ "$(qemu-img info --output=json a.qcow2 | grep -o '"virtual-size": [0-9]*')" = "\"virtual-size\": $((64 * MiB))" ]
	cmp -n 1M <(qemu-img convert -O raw a.qcow2 /dev/stdout) <(qemu-img convert -O raw ref.qcow2 /dev/stdout)
	qemu_raw a.qcow2 out.raw
	[ "$(tail -c 10 out.raw)" = "at the end" ]
	qemu_raw a.qcow2 s.raw -l snapshot.name=s
	cmp -n 1M s.raw <(head -c 1M /dev/zero | tr '\0' '\021')
}

@test "growing an overlay hides the backing file's data past the old end, as qemu-img resize does" {
	pattern_file back.raw $((8 * MiB)) 51
	qemu-img create -q -f qcow2 -b back.raw -F raw a.qcow2 1000000
	qemu-io -f qcow2 -c "write -P 0x22 4096 1000" a.qcow2 >/dev/null
	cp a.qcow2 ref.qcow2
	mount_imgfs a.qcow2 mnt
	truncate -s 8M mnt/disk
	unmount_imgfs mnt
	qemu-img resize -q ref.qcow2 8M
	qemu-img compare a.qcow2 ref.qcow2
	qemu-img check a.qcow2
}
