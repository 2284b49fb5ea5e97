#!/usr/bin/env bats
# The directory of views as ls, stat and statfs see it.

load lib/common

setup() {
	common_setup
	truncate -s 64M src.raw
	printf 'label: gpt\nstart=2048, size=8192, name="boot"\nstart=10240, size=20480, name="root"\n' | sfdisk -q src.raw
	qemu-img convert -q -f raw -O qcow2 src.raw a.qcow2
	qemu-img snapshot -c snap1 a.qcow2
	chmod 640 a.qcow2
	mkdir mnt
}
teardown() { common_teardown; }

@test "ls -l shows every view with its size and the image's mode bits" {
	mount_imgfs a.qcow2 mnt -r
	run ls -l mnt
	[ "$status" -eq 0 ]
	echo "$output" | grep -E '^-r--r----- .* 67108864 .* disk$'
	echo "$output" | grep -E '^-r--r----- .* 4194304 .* p1$'
	echo "$output" | grep -E '^-r--r----- .* 10485760 .* p2$'
	echo "$output" | grep -E '^-r--r----- .* 67108864 .* snap@snap1$'
	[ "$(stat -c %a mnt)" = 550 ]
}

@test "inode numbers are stable: the same across lookups and remounts" {
	mount_imgfs a.qcow2 mnt -r
	first=$(ls -i mnt | sort)
	stat mnt/p2 >/dev/null
	[ "$(ls -i mnt | sort)" = "$first" ]
	unmount_imgfs mnt
	mount_imgfs a.qcow2 mnt -r
	[ "$(ls -i mnt | sort)" = "$first" ]
	# all distinct
	[ "$(ls -i mnt | awk '{print $1}' | sort -u | wc -l)" = 4 ]
}

@test "stat and statfs give sensible values" {
	mount_imgfs a.qcow2 mnt -r
	[ "$(stat -c %s mnt/p1)" = 4194304 ]
	[ "$(stat -c %b mnt/p1)" = 8192 ]      # 512-byte blocks
	[ "$(stat -f -c %S mnt)" = 4096 ]
	# total: every view's bytes, in 4 KiB blocks
	[ "$(stat -f -c %b mnt)" = $(( (67108864 * 2 + 4194304 + 10485760) / 4096 )) ]
	[ "$(stat -f -c %T mnt)" = fuseblk ] || [ "$(stat -f -c %T mnt)" = fuse ]
}

@test "--list shows GPT type GUIDs and partition labels" {
	run "$IMGFS" --list --json a.qcow2
	[ "$status" -eq 0 ]
	echo "$output" | jq -e '."partition-table" == "gpt"'
	echo "$output" | jq -e '.views[] | select(.name == "p1") | .label == "boot" and .offset == 1048576 and .length == 4194304'
	echo "$output" | jq -e '.views[] | select(.name == "p2") | .type == "0fc63daf-8483-4772-8e79-3d69d8477de4"'
	run "$IMGFS" --list a.qcow2
	echo "$output" | grep -E '^p2 +5242880 +10485760 .*0fc63daf-8483-4772-8e79-3d69d8477de4 +root'
}

@test "a file mount shows one view; a missing view is an error" {
	touch f
	# read-only: a writable qcow2 mount holds qemu's write lock
	mount_imgfs a.qcow2 f -P 2 -r
	[ "$(stat -c %s f)" = 10485760 ]
	dd if=src.raw bs=512 skip=10240 count=20480 status=none | cmp - f
	touch g
	run "$IMGFS" -r a.qcow2 g -P 7
	[ "$status" -ne 0 ]
	[[ "$output" == *p7* ]]
	not_mounted g
}

@test "the directory cannot be written: no new files, no removal" {
	mount_imgfs a.qcow2 mnt
	run touch mnt/newfile
	[ "$status" -ne 0 ]
	run rm -f mnt/p1
	[ "$status" -ne 0 ]
	[ -e mnt/p1 ]
}
