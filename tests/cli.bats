#!/usr/bin/env bats
# The command line: help, version, usage errors, --list.

load lib/common

setup() { common_setup; }
teardown() { common_teardown; }

@test "--help lists the options and exits 0" {
	run "$IMGFS" --help
	[ "$status" -eq 0 ]
	for opt in --format --read-only --no-backing --view --partition --snapshot \
		--list --json --pid-file -f -d -s -o --version; do
		[[ "$output" == *"$opt"* ]] || { echo "missing $opt"; return 1; }
	done
}

@test "--version prints the version" {
	run "$IMGFS" --version
	[ "$status" -eq 0 ]
	[[ "$output" == imgfs\ * ]]
}

@test "no arguments is a usage error" {
	run "$IMGFS"
	[ "$status" -eq 1 ]
	[[ "$output" == *usage* ]]
}

@test "an unknown option is a usage error" {
	run "$IMGFS" --frobnicate a b
	[ "$status" -eq 1 ]
}

@test "--list shows disk with its size and format" {
	qemu-img create -q -f qcow2 a.qcow2 100M
	run "$IMGFS" --list a.qcow2
	[ "$status" -eq 0 ]
	echo "$output" | grep -E '^disk +0 +104857600 +r[wo] +qcow2'
}

@test "--list --json is valid JSON with every view" {
	qemu-img create -q -f qcow2 a.qcow2 100M
	qemu-img snapshot -c first a.qcow2
	run "$IMGFS" --list --json a.qcow2
	[ "$status" -eq 0 ]
	echo "$output" | jq -e '.format == "qcow2" and (.views | length) == 2'
	echo "$output" | jq -e '.views[0].name == "disk" and .views[0].length == 104857600'
	echo "$output" | jq -e '.views[1].name == "snap@first" and .views[1].writable == false'
}

@test "--list of a missing image fails with one line" {
	run "$IMGFS" --list nope.img
	[ "$status" -eq 2 ]
	[ "${#lines[@]}" -eq 1 ]
}

@test "an encrypted image is refused with a clear message" {
	qemu-img create -q -f qcow2 enc.qcow2 16M
	mkdir mnt
	for method in 1 2; do   # crypt_method (header bytes 32-35): AES, LUKS
		printf "\\x0$method" | dd of=enc.qcow2 bs=1 seek=35 conv=notrunc status=none
		run "$IMGFS" enc.qcow2 mnt
		[ "$status" -eq 2 ]
		[[ "$output" == *ncrypt* ]]
		not_mounted mnt
	done
}

@test "unknown incompatible feature bits are refused" {
	qemu-img create -q -f qcow2 a.qcow2 16M
	# incompatible features are bytes 72-79; set bit 40
	printf '\x01' | dd of=a.qcow2 bs=1 seek=74 conv=notrunc status=none
	mkdir mnt
	run "$IMGFS" a.qcow2 mnt
	[ "$status" -eq 2 ]
	[[ "$output" == *ncompatible* ]]
	not_mounted mnt
}

@test "a json: backing file name is refused" {
	qemu-img create -q -f raw base.raw 1M
	qemu-img create -q -f qcow2 -b base.raw -F raw a.qcow2
	qemu-img rebase -u -f qcow2 -b 'json:{"file.driver":"file","file.filename":"/etc/passwd"}' -F raw a.qcow2
	mkdir mnt
	run "$IMGFS" a.qcow2 mnt
	[ "$status" -eq 2 ]
	[[ "$output" == *json* ]]
	not_mounted mnt
}

@test "a backing chain that loops is refused" {
	qemu-img create -q -f qcow2 a.qcow2 1M
	qemu-img create -q -f qcow2 -b a.qcow2 -F qcow2 b.qcow2
	qemu-img rebase -u -b b.qcow2 -F qcow2 a.qcow2
	mkdir mnt
	run "$IMGFS" b.qcow2 mnt
	[ "$status" -eq 2 ]
	[[ "$output" == *loop* ]]
}

@test "a backing file in a format imgfs does not read is refused" {
	qemu-img create -q -f vmdk b.vmdk 1M
	qemu-img create -q -f qcow2 -b b.vmdk -F vmdk a.qcow2
	mkdir mnt
	run "$IMGFS" a.qcow2 mnt
	[ "$status" -eq 2 ]
	[ "${#lines[@]}" -eq 1 ]
	[[ "$output" == *vmdk* ]]
	not_mounted mnt
}
