#!/usr/bin/env bats
# imgfs under mount(8): "mount -t fuse.imgfs", fstab lines (mount --fstab,
# mount -T), through mount.fuse3, and umount.  mount(8) runs its helpers
# with PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin,
# so the tests put imgfs where make install would: a symlink at
# /usr/local/bin/imgfs, made and removed under a lock (several suites may
# want it at once), never over another imgfs.

load lib/common

LINK=/usr/local/bin/imgfs

setup() {
	common_setup
	command -v mount.fuse3 >/dev/null || skip "no mount.fuse3"
	qemu-img create -q -f qcow2 a.qcow2 8M
	qemu-io -c "write -P 0x5c 0 1M" a.qcow2 >/dev/null
	qemu-img snapshot -c before a.qcow2
	qemu-io -c "write -P 0x77 0 1M" a.qcow2 >/dev/null
	mkdir mnt
	link_imgfs
}
teardown() {
	common_teardown
	if [ -n "${_LINKED:-}" ] && [ "$(readlink "$LINK")" = "$IMGFS" ]; then
		rm -f "$LINK"
	fi
	[ -z "${_LOCKFD:-}" ] || exec {_LOCKFD}>&-
}

link_imgfs() {
	local lockdir=/run/lock
	[ -d "$lockdir" ] || lockdir=/tmp
	exec {_LOCKFD}>"$lockdir/imgfs-tests-usr-local-bin.lock"
	flock -w 120 "$_LOCKFD"
	if [ -e "$LINK" ] && [ "$(readlink "$LINK")" != "$IMGFS" ]; then
		skip "$LINK is another imgfs"
	fi
	ln -sfn "$IMGFS" "$LINK"
	_LINKED=1
}

# usage: track_mount MNT PIDFILE — clean up in teardown whatever happens
track_mount() {
	_MOUNTS+=("$1")
	_PIDFILES+=("$2")
}

# The mount's line in /proc/self/mounts
mount_line() {
	grep " $(realpath -s "$1") " /proc/self/mounts
}

@test "mount -t fuse.imgfs -o ro,allow_other mounts every view, umount ends the daemon" {
	track_mount "$PWD/mnt" "$PWD/pid"
	mount -t fuse.imgfs "$PWD/a.qcow2" "$PWD/mnt" -o "ro,allow_other,pid_file=$PWD/pid"
	[ "$(stat -c %s mnt/disk)" = 8388608 ]
	[ -e mnt/snap@before ]
	mount_line mnt | grep -q "^$PWD/a.qcow2 $PWD/mnt fuse.imgfs ro,.*allow_other"
	pid=$(cat pid)
	alive "$pid"
	umount mnt
	wait_gone "$pid"
	not_mounted mnt
	qemu-img check -q a.qcow2
}

@test "an fstab line mounts with mount --fstab FILE MNT, and its image options apply" {
	touch snap.raw
	track_mount "$PWD/snap.raw" "$PWD/pid"
	echo "$PWD/a.qcow2 $PWD/snap.raw fuse.imgfs ro,noauto,snapshot=before,pid_file=$PWD/pid 0 0" >fstab
	mount --fstab "$PWD/fstab" "$PWD/snap.raw"
	[ "$(stat -c %s snap.raw)" = 8388608 ]
	cmp <(head -c 1M snap.raw) <(head -c 1M /dev/zero | tr '\0' '\134')
	pid=$(cat pid)
	umount snap.raw
	wait_gone "$pid"
	not_mounted snap.raw
	[ ! -s snap.raw ]
}

@test "the fstab line of the man page mounts with mount -T FILE MNT" {
	track_mount "$PWD/mnt" "$PWD/pid"
	printf '# imgfs\n%s %s fuse.imgfs ro,noauto,pid_file=%s 0 0\n' "$PWD/a.qcow2" "$PWD/mnt" "$PWD/pid" >fstab
	mount -T "$PWD/fstab" "$PWD/mnt"
	qemu_raw a.qcow2 ref.raw
	cmp mnt/disk ref.raw
	pid=$(cat pid)
	umount "$PWD/mnt"
	wait_gone "$pid"
	not_mounted mnt
}

@test "fstab options that belong to mount(8) and systemd do not stop the mount" {
	track_mount "$PWD/mnt" "$PWD/pid"
	echo "$PWD/a.qcow2 $PWD/mnt fuse.imgfs defaults,ro,noauto,nofail,_netdev,x-systemd.automount,x-systemd.requires=local-fs.target,comment=vm,noatime,nosuid,nodev,pid_file=$PWD/pid 0 0" >fstab
	mount -T "$PWD/fstab" "$PWD/mnt"
	[ "$(stat -c %s mnt/disk)" = 8388608 ]
	mount_line mnt | grep -q "ro,nosuid,nodev,noatime"
	pid=$(cat pid)
	umount mnt
	wait_gone "$pid"
	not_mounted mnt
}

@test "imgfs itself accepts the options mount.fuse3 may pass on" {
	# mount.fuse3 run by hand passes defaults, x-*, comment= and the atime
	# flavours unchanged
	track_mount "$PWD/mnt" "$PWD/pid"
	mount.fuse3 "$PWD/a.qcow2" "$PWD/mnt" -t imgfs \
		-o "defaults,noauto,nofail,_netdev,users,x-systemd.automount,comment=x,relatime,lazytime,dev,suid,ro,pid_file=$PWD/pid"
	[ "$(stat -c %s mnt/disk)" = 8388608 ]
	pid=$(cat pid)
	umount mnt
	wait_gone "$pid"
	not_mounted mnt
}

@test "-o fsname= names the mount's source, as mount(8) shows it" {
	track_mount "$PWD/mnt" "$PWD/pid"
	mount -t fuse.imgfs "$PWD/a.qcow2" "$PWD/mnt" -o "ro,fsname=vm-disk,pid_file=$PWD/pid"
	mount_line mnt | grep -q "^vm-disk $PWD/mnt fuse.imgfs "
	pid=$(cat pid)
	umount mnt
	wait_gone "$pid"
}

@test "an unknown -o option is named on one line, exit status 1, no mount" {
	run "$IMGFS" -o ro,no_such_option a.qcow2 mnt
	[ "$status" -eq 1 ]
	[ "${#lines[@]}" -eq 1 ]
	[[ "${lines[0]}" == *"unknown mount option"*no_such_option* ]]
	not_mounted mnt
}

@test "an unknown option in fstab fails the mount with imgfs's message" {
	_MOUNTS+=("$PWD/mnt")
	echo "$PWD/a.qcow2 $PWD/mnt fuse.imgfs ro,noauto,no_such_option 0 0" >fstab
	run mount -T "$PWD/fstab" "$PWD/mnt"
	[ "$status" -ne 0 ]
	[[ "$output" == *"unknown mount option"*no_such_option* ]]
	not_mounted mnt
}

@test "a missing image in fstab fails the mount with a line naming it" {
	_MOUNTS+=("$PWD/mnt")
	echo "$PWD/nope.qcow2 $PWD/mnt fuse.imgfs ro,noauto 0 0" >fstab
	run mount -T "$PWD/fstab" "$PWD/mnt"
	[ "$status" -ne 0 ]
	[[ "$output" == *nope.qcow2* ]]
	not_mounted mnt
}

@test "an fstab line with x-systemd.automount becomes mount units that mount as systemd runs them" {
	gen=/usr/lib/systemd/system-generators/systemd-fstab-generator
	[ -x "$gen" ] || gen=/lib/systemd/system-generators/systemd-fstab-generator
	[ -x "$gen" ] || skip "no systemd-fstab-generator"
	track_mount "$PWD/mnt" "$PWD/pid"
	echo "$PWD/a.qcow2 $PWD/mnt fuse.imgfs ro,nofail,x-systemd.automount,pid_file=$PWD/pid 0 0" >fstab
	mkdir units
	SYSTEMD_FSTAB="$PWD/fstab" "$gen" "$PWD/units" "$PWD/units" "$PWD/units"
	unit=units/$(systemd-escape --path "$PWD/mnt").mount
	[ -f "${unit%.mount}.automount" ]
	what=$(sed -n 's/^What=//p' "$unit")
	where=$(sed -n 's/^Where=//p' "$unit")
	type=$(sed -n 's/^Type=//p' "$unit")
	options=$(sed -n 's/^Options=//p' "$unit")
	[ "$type" = fuse.imgfs ]
	# systemd's mount unit runs: mount WHAT WHERE -t TYPE -o OPTIONS
	mount "$what" "$where" -t "$type" -o "$options"
	[ "$(stat -c %s mnt/disk)" = 8388608 ]
	pid=$(cat pid)
	umount "$where"
	wait_gone "$pid"
	not_mounted mnt
}
