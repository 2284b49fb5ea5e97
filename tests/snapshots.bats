#!/usr/bin/env bats
# qcow2 internal snapshots as read-only files: snap@NAME, or snap@#ID when the
# name cannot be a file name; each equal to qemu-img's reading of it.

load lib/common

setup() {
	common_setup
	qemu-img create -q -f qcow2 a.qcow2 16M
	qemu-io -c "write -P 0x01 0 1M" a.qcow2 >/dev/null
	qemu-img snapshot -c "été ß" a.qcow2                 # id 1
	qemu-io -c "write -P 0x02 512k 1M" -c "write -z 4M 64k" a.qcow2 >/dev/null
	qemu-img snapshot -c "with spaces" a.qcow2           # id 2
	qemu-io -c "write -P 0x03 8M 2M" a.qcow2 >/dev/null
	qemu-img snapshot -c dup a.qcow2                     # id 3
	qemu-io -c "write -P 0x04 9M 64k" a.qcow2 >/dev/null
	qemu-img snapshot -c dup a.qcow2                     # id 4
	qemu-io -c "write -P 0x05 0 4k" a.qcow2 >/dev/null
	mkdir mnt
}
teardown() { common_teardown; }

snap_id() { # the ID qemu gave the snapshot named $2 (the first match)
	qemu-img snapshot -U -l "$1" | awk -v n="$2" 'NR > 2 && index($0, n) { print $1; exit }'
}

@test "every snapshot is a file named after it, or by ID when the name is not unique" {
	mount_imgfs a.qcow2 mnt
	ls mnt >listing
	grep -qx "snap@été ß" listing
	grep -qx "snap@with spaces" listing
	grep -qx "snap@#3" listing
	grep -qx "snap@#4" listing
	[ "$(grep -c '^snap@' listing)" = 4 ]
}

@test "each snapshot view equals qemu-img convert -l of that snapshot" {
	mount_imgfs a.qcow2 mnt
	for id in 1 2 3 4; do
		qemu_raw a.qcow2 "s$id.raw" -l "snapshot.id=$id"
	done
	same_bytes "mnt/snap@été ß" s1.raw
	same_bytes "mnt/snap@with spaces" s2.raw
	same_bytes "mnt/snap@#3" s3.raw
	same_bytes "mnt/snap@#4" s4.raw
	qemu_raw a.qcow2 now.raw
	same_bytes mnt/disk now.raw
}

@test "snapshot files are read-only: no write bits, writes refused" {
	mount_imgfs a.qcow2 mnt
	[ "$(stat -c %A 'mnt/snap@with spaces')" = "-r--r--r--" ]
	run bash -c "echo x >'mnt/snap@with spaces'"
	[ "$status" -ne 0 ]
	[[ "$output" == *"Read-only"* || "$output" == *"Permission denied"* ]]
}

@test "a snapshot taken before a resize keeps its own size" {
	qemu-img resize -q a.qcow2 32M
	qemu-io -c "write -P 0x06 30M 64k" a.qcow2 >/dev/null
	mount_imgfs a.qcow2 mnt
	[ "$(stat -c %s 'mnt/snap@with spaces')" = $((16 * 1024 * 1024)) ]
	[ "$(stat -c %s mnt/disk)" = $((32 * 1024 * 1024)) ]
	# qemu-img reads a snapshot at the current size (zeroes past its end):
	# the first 16 MiB must match, and qemu's tail must be zeroes
	qemu_raw a.qcow2 s2.raw -l snapshot.id=2
	cmp -n $((16 * 1024 * 1024)) "mnt/snap@with spaces" s2.raw
	cmp -i $((16 * 1024 * 1024)):0 -n $((16 * 1024 * 1024)) s2.raw /dev/zero
}

@test "a file mount picks a snapshot by name or by ID with -l" {
	qemu_raw a.qcow2 s2.raw -l snapshot.id=2
	touch f1 f2 f3
	mount_imgfs a.qcow2 f1 -l "with spaces"
	mount_imgfs a.qcow2 f2 -l 2
	mount_imgfs a.qcow2 f3 --view="snap@with spaces"
	same_bytes f1 s2.raw
	same_bytes f2 s2.raw
	same_bytes f3 s2.raw
	[ "$(stat -c %A f1)" = "-r--r--r--" ]
}

@test "-l with an unknown snapshot fails with one line" {
	touch f
	run "$IMGFS" -l nosuch a.qcow2 f
	[ "$status" -ne 0 ]
	[ "${#lines[@]}" -eq 1 ]
	[[ "$output" == *nosuch* ]]
	not_mounted f
}

@test "snapshots of an overlay read unallocated clusters from the backing file" {
	qemu-img create -q -f qcow2 base.qcow2 8M
	qemu-io -c "write -P 0x99 0 8M" base.qcow2 >/dev/null
	qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 top.qcow2
	qemu-io -c "write -P 0x11 1M 64k" top.qcow2 >/dev/null
	qemu-img snapshot -c s top.qcow2
	qemu-io -c "write -P 0x22 1M 2M" top.qcow2 >/dev/null
	qemu_raw top.qcow2 s.raw -l snapshot.name=s
	mount_imgfs top.qcow2 mnt
	same_bytes mnt/snap@s s.raw
}

@test "--list shows each snapshot's ID, date and VM clock" {
	run "$IMGFS" --list --json a.qcow2
	[ "$status" -eq 0 ]
	echo "$output" | jq -e '[.views[] | select(.kind == "snapshot")] | length == 4'
	echo "$output" | jq -e '.views[] | select(.name == "snap@#3") | .label == "dup" and (.info | test("id=3 date=20[0-9-]+T"))'
	echo "$output" | jq -e '.views[] | select(.name == "snap@with spaces") | .offset == null and .writable == false'
}

@test "snapshot views carry the extended attributes" {
	mount_imgfs a.qcow2 mnt
	[ "$(getfattr --only-values -n user.imgfs.view 'mnt/snap@#3')" = "snap@#3" ]
	[ "$(getfattr --only-values -n user.imgfs.length 'mnt/snap@#3')" = 16777216 ]
	[ "$(getfattr --only-values -n user.imgfs.format 'mnt/snap@#3')" = qcow2 ]
}

@test "a snapshot name with a slash is shown by ID" {
	qemu-img create -q -f qcow2 b.qcow2 1M
	qemu-img snapshot -c "a/b" b.qcow2
	qemu-img snapshot -c "" b.qcow2
	mount_imgfs b.qcow2 mnt
	# the slash and the empty name: both by ID
	[ "$(ls mnt | tr '\n' ' ')" = "disk snap@#1 snap@#2 " ]
}
