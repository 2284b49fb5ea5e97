#!/usr/bin/env bats
# Bash completion (tools/completion): the completion functions are called
# the way bash calls them — COMP_WORDS split as bash splits them ("--view="
# is two words), COMP_CWORD the word under the cursor — and COMPREPLY is
# what the user would be offered.

load lib/common

setup() {
	common_setup
	SRC=${IMGFS_SRCDIR:-$BATS_TEST_DIRNAME/..}
	# shellcheck source=/dev/null
	source "$SRC/tools/completion/imgfs"
	# shellcheck source=/dev/null
	source "$SRC/tools/completion/imgfs-nbd"
}
teardown() {
	common_teardown
}

# An MBR disk with p1, p5 (in the extended p2, which is no view), and two
# qcow2 snapshots.
make_image() {
	truncate -s 32M raw.img
	sfdisk -q raw.img <<-EOF >/dev/null
		label: dos
		start=2048, size=8MiB, type=83
		type=5
		size=4MiB
	EOF
	qemu-img convert -f raw -O qcow2 raw.img disk.qcow2
	qemu-img snapshot -c before-upgrade disk.qcow2
	qemu-img snapshot -c after disk.qcow2
}

# usage: complete_with FUNCTION WORD... — the last WORD is the one being completed
complete_with() {
	local fn=$1
	shift
	COMP_WORDS=("$@")
	COMP_CWORD=$((${#COMP_WORDS[@]} - 1))
	COMP_LINE="${COMP_WORDS[*]}"
	COMP_POINT=${#COMP_LINE}
	COMPREPLY=()
	# as in an interactive shell: no errexit inside the completion function
	"$fn" || true
	printf '%s\n' "${COMPREPLY[@]}" | sort >"$T/reply"
}

# usage: offered WORD... — COMPREPLY is exactly these words
offered() {
	if ! diff -u <(printf '%s\n' "$@" | sort) "$T/reply"; then
		echo "completion offered something else (- expected, + offered)" >&2
		return 1
	fi
}

@test "both programs register a completion" {
	complete -p imgfs | grep -q -- "-F _imgfs imgfs"
	complete -p imgfs-nbd | grep -q -- "-F _imgfs_nbd imgfs-nbd"
}

@test "imgfs --l completes to --list and --load-snapshot=" {
	complete_with _imgfs "$IMGFS" --l
	offered --list --load-snapshot=
}

@test "imgfs completes every option --help lists" {
	complete_with _imgfs "$IMGFS" -
	opts=$("$IMGFS" --help | grep -o -- '--[a-z][a-z-]*' | sort -u)
	[ "$(wc -l <<<"$opts")" -ge 10 ]
	for o in $opts; do
		grep -qx -- "$o=\?" "$T/reply" || { echo "missing $o" >&2; return 1; }
	done
}

@test "imgfs-nbd completes every option --help lists" {
	complete_with _imgfs_nbd "$IMGFS_NBD" -
	opts=$("$IMGFS_NBD" --help | grep -o -- '--[a-z][a-z-]*' | sort -u)
	[ "$(wc -l <<<"$opts")" -ge 10 ]
	for o in $opts; do
		grep -qx -- "$o=\?" "$T/reply" || { echo "missing $o" >&2; return 1; }
	done
}

@test "imgfs --format= offers the formats" {
	complete_with _imgfs "$IMGFS" --format = ""
	offered raw qcow2
	complete_with _imgfs "$IMGFS" --format = q
	offered qcow2
}

@test "imgfs --view= offers the views of the image on the command line" {
	make_image
	complete_with _imgfs "$IMGFS" disk.qcow2 --view = ""
	offered disk p1 p5 snap@before-upgrade snap@after
	complete_with _imgfs "$IMGFS" disk.qcow2 --view = snap@b
	offered snap@before-upgrade
}

@test "imgfs -P offers partition numbers, -l snapshot names, once the image is there" {
	make_image
	complete_with _imgfs "$IMGFS" disk.qcow2 -P ""
	offered 1 5
	complete_with _imgfs "$IMGFS" -r -l ""
	offered
	complete_with _imgfs "$IMGFS" -r disk.qcow2 img.raw -l ""
	offered before-upgrade after
	complete_with _imgfs "$IMGFS" -f disk.qcow2 --snapshot = a
	offered after
}

@test "imgfs --view= also works when bash does not split at '='" {
	make_image
	complete_with _imgfs "$IMGFS" disk.qcow2 --view=p
	offered --view=p1 --view=p5
}

@test "the view completion works without jq too" {
	make_image
	mkdir nojq
	for t in awk sort grep cat; do ln -s "$(command -v $t)" nojq/; done
	PATH="$PWD/nojq" complete_with _imgfs "$IMGFS" disk.qcow2 --view = s
	offered snap@before-upgrade snap@after
}

@test "imgfs -o completes each mount option after a comma" {
	complete_with _imgfs "$IMGFS" -o allow_o
	offered allow_other
	complete_with _imgfs "$IMGFS" -o ro,allow_other,no_b
	offered ro,allow_other,no_backing
}

@test "imgfs completes image files and mountpoints" {
	make_image
	mkdir mnt
	complete_with _imgfs "$IMGFS" d
	offered disk.qcow2
	complete_with _imgfs "$IMGFS" disk.qcow2 m
	offered mnt
}

@test "imgfs-nbd completes mnt/ to the view files of a mount" {
	make_image
	mkdir mnt
	mount_imgfs disk.qcow2 mnt
	complete_with _imgfs_nbd "$IMGFS_NBD" -r mnt/
	offered mnt/disk mnt/p1 mnt/p5 mnt/snap@after mnt/snap@before-upgrade
	complete_with _imgfs_nbd "$IMGFS_NBD" mnt/p
	offered mnt/p1 mnt/p5
}

@test "imgfs-nbd --view= offers the views of a mount directory, -P those of an image" {
	make_image
	mkdir mnt
	mount_imgfs disk.qcow2 mnt
	complete_with _imgfs_nbd "$IMGFS_NBD" mnt --view = s
	offered snap@after snap@before-upgrade
	complete_with _imgfs_nbd "$IMGFS_NBD" -P ""
	offered
	complete_with _imgfs_nbd "$IMGFS_NBD" disk.qcow2 -P ""
	offered 1 5
	complete_with _imgfs_nbd "$IMGFS_NBD" disk.qcow2 --load-snapshot = b
	offered before-upgrade
}

@test "imgfs-nbd -f and --bind offer their values" {
	complete_with _imgfs_nbd "$IMGFS_NBD" -f ""
	offered raw qcow2
	complete_with _imgfs_nbd "$IMGFS_NBD" --bind = 127
	offered 127.0.0.1
}
