#!/usr/bin/env bats
# Where imgfs's messages go: standard error in the foreground, syslog (the
# journal) once daemonised, tagged with the image's name; -v adds
# informational messages; each refused or failed request is logged with the
# image, the view, the offset and the reason — once, not once per retry.

load lib/common

setup() {
	common_setup
	truncate -s 8M r.img
	mkdir mnt
}
teardown() {
	common_teardown
	if [ -n "${_DEVLOG:-}" ]; then
		rm -f /dev/log
	fi
	[ -z "${_LOCKFD:-}" ] || exec {_LOCKFD}>&-
}

@test "in the foreground, a write at the end of a view is logged with image, view, offset and reason" {
	foreground --format=raw r.img mnt
	run dd if=/dev/zero of=mnt/disk bs=4k seek=2048 count=1 conv=notrunc
	[ "$status" -ne 0 ]
	stop_foreground
	cat "$T/err"
	grep -q "^imgfs: warning: $PWD/r.img: view disk: write of 4096 bytes at offset 8388608: .*(ENOSPC)$" "$T/err"
}

@test "a refusal repeated in a loop is logged once" {
	foreground --format=raw r.img mnt
	for _ in $(seq 20); do
		dd if=/dev/zero of=mnt/disk bs=512 seek=16384 count=1 conv=notrunc 2>/dev/null || true
	done
	stop_foreground
	cat "$T/err"
	[ "$(grep -c "view disk: write" "$T/err")" -eq 1 ]
}

@test "a write to a snapshot and a truncation are refused and logged with the view" {
	qemu-img create -q -f qcow2 a.qcow2 8M
	qemu-img snapshot -c s1 a.qcow2
	foreground a.qcow2 mnt
	run sh -c 'echo x >mnt/snap@s1'
	[ "$status" -ne 0 ]
	stop_foreground
	cat "$T/err"
	grep -q "$PWD/a.qcow2: view snap@s1: open for writing: snapshots are read-only (EROFS)" "$T/err"
	foreground --format=raw r.img mnt
	run truncate -s 1M mnt/disk
	[ "$status" -ne 0 ]
	stop_foreground
	cat "$T/err"
	grep -q "$PWD/r.img: view disk: truncate at offset 1048576: .*(EPERM)" "$T/err"
}

@test "an I/O error from a damaged image is logged once, with the view and the offset" {
	qemu-img create -q -f qcow2 d.qcow2 8M
	qemu-io -c "write -P 0x11 0 128k" d.qcow2 >/dev/null
	# the first L2 entry now points 1 GiB in: past the end of the file
	python3 - <<-'PY'
		import struct
		with open("d.qcow2", "r+b") as f:
		    l1_offset = struct.unpack(">Q", f.read(48)[40:48])[0]
		    f.seek(l1_offset)
		    l2_offset = struct.unpack(">Q", f.read(8))[0] & 0x00fffffffffffe00
		    f.seek(l2_offset)
		    f.write(struct.pack(">Q", 1 << 63 | 1 << 30))
	PY
	foreground -r d.qcow2 mnt
	for _ in 1 2 3; do
		run dd if=mnt/disk of=/dev/null bs=64k count=1 iflag=direct
		[ "$status" -ne 0 ]
	done
	# the rest of the disk still reads
	dd if=mnt/disk of=/dev/null bs=64k skip=2 count=1 iflag=direct
	stop_foreground
	cat "$T/err"
	[ "$(grep -c "$PWD/d.qcow2: view disk: read of 65536 bytes at offset 0: .*(EIO)" "$T/err")" -eq 1 ]
}

@test "-v adds informational messages, and by default there are none" {
	foreground --format=raw r.img mnt
	stop_foreground
	run grep -c "info:" "$T/err"
	[ "$output" = 0 ]
	foreground -v --format=raw r.img mnt
	stop_foreground
	grep -q "^imgfs: info: $PWD/r.img mounted on $PWD/mnt" "$T/err"
}

@test "daemonised, messages go to syslog tagged imgfs[IMAGE]" {
	# a stand-in for journald/rsyslog: a datagram socket at /dev/log
	local lockdir=/run/lock
	[ -d "$lockdir" ] || lockdir=/tmp
	exec {_LOCKFD}>"$lockdir/imgfs-tests-dev-log.lock"
	flock -w 120 "$_LOCKFD"
	[ ! -e /dev/log ] || skip "/dev/log exists: a system logger runs here"
	python3 -c '
import os, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.bind("/dev/log")
os.chmod("/dev/log", 0o666)
with open(sys.argv[1], "ab", buffering=0) as f:
    f.write(b"ready\n")
    while True:
        f.write(s.recv(65536) + b"\n")
' "$T/syslog" &
	track_pid $!
	_DEVLOG=1
	for _ in $(seq 100); do
		grep -q ready "$T/syslog" 2>/dev/null && break
		sleep 0.05
	done
	cp r.img 'my disk.img'
	mount_imgfs 'my disk.img' mnt -v --format=raw
	pid=$(last_pid)
	dd if=/dev/zero of=mnt/disk bs=4k seek=2048 count=1 conv=notrunc 2>/dev/null || true
	unmount_imgfs mnt
	cat "$T/syslog"
	# "my disk.img": a space would end the tag, so it is written "_"
	grep -q "imgfs\[my_disk.img\]\[$pid\]: $PWD/my disk.img mounted on $PWD/mnt" "$T/syslog"
	grep -q "imgfs\[my_disk.img\]\[$pid\]: $PWD/my disk.img: view disk: write of 4096 bytes at offset 8388608: .*(ENOSPC)" "$T/syslog"
	# the daemon's own messages reached syslog, not a terminal
	run grep -c "^<[0-9]*>" "$T/syslog"
	[ "$output" -ge 2 ]
}
