#!/usr/bin/env bats
# How a mount starts and ends: the parent returns once the mount answers,
# every way of ending it leaves nothing behind, failures leave no mount.

load lib/common

setup() {
	common_setup
	qemu-img create -q -f qcow2 a.qcow2 8M
	qemu-io -c "write -P 0x5c 0 1M" a.qcow2 >/dev/null
	mkdir mnt
}
teardown() {
	common_teardown
	[ -z "${_FUSE_MODE:-}" ] || chmod "$_FUSE_MODE" /dev/fuse
	[ -z "${_PIPE_SOFT:-}" ] || sysctl -q fs.pipe-user-pages-soft="$_PIPE_SOFT"
	[ -z "${_USER_DIR:-}" ] || rm -rf "$_USER_DIR"
	if [ -n "${_LINKED:-}" ] && [ "$(readlink /usr/local/bin/imgfs)" = "$IMGFS" ]; then
		rm -f /usr/local/bin/imgfs
	fi
}

@test "the parent exits 0 only when the mount answers" {
	mount_imgfs a.qcow2 mnt
	# no waiting: the mount must answer right away
	[ "$(stat -c %s mnt/disk)" = 8388608 ]
	is_mounted mnt
}

@test "fusermount3 -u ends the daemon and leaves no mount" {
	mount_imgfs a.qcow2 mnt
	pid=$(last_pid)
	fusermount3 -u mnt
	wait_gone "$pid"
	not_mounted mnt
}

@test "umount ends the daemon and leaves no mount" {
	mount_imgfs a.qcow2 mnt
	pid=$(last_pid)
	umount mnt
	wait_gone "$pid"
	not_mounted mnt
}

@test "SIGTERM unmounts cleanly" {
	mount_imgfs a.qcow2 mnt
	pid=$(last_pid)
	kill -TERM "$pid"
	wait_gone "$pid"
	not_mounted mnt
	[ ! -e "${_PIDFILES[-1]}" ] || [ ! -s "${_PIDFILES[-1]}" ]
	qemu-img check -q a.qcow2
}

@test "SIGINT unmounts cleanly, even when started from a script in the background" {
	mount_imgfs a.qcow2 mnt
	pid=$(last_pid)
	kill -INT "$pid"
	wait_gone "$pid"
	not_mounted mnt
}

@test "a foreground daemon ends with status 0 on SIGTERM" {
	"$IMGFS" -f a.qcow2 mnt &
	pid=$!
	track_pid "$pid"
	for _ in $(seq 50); do is_mounted mnt && break; sleep 0.1; done
	is_mounted mnt
	kill -TERM "$pid"
	rc=0
	wait "$pid" || rc=$?
	[ "$rc" -eq 0 ]
	not_mounted mnt
}

@test "a file mount over the image itself ends cleanly" {
	before=$(sha256sum <a.qcow2)
	mount_imgfs a.qcow2 a.qcow2
	[ "$(stat -c %s a.qcow2)" = 8388608 ]
	pid=$(last_pid)
	fusermount3 -u a.qcow2
	wait_gone "$pid"
	[ "$(sha256sum <a.qcow2)" = "$before" ]
}

@test "a missing image: non-zero, one line, no mount" {
	run "$IMGFS" nope.qcow2 mnt
	[ "$status" -eq 2 ]
	[ "${#lines[@]}" -eq 1 ]
	[[ "${lines[0]}" == *nope.qcow2* ]]
	not_mounted mnt
}

@test "a missing mountpoint: non-zero, one line, no mount" {
	run "$IMGFS" a.qcow2 nowhere
	[ "$status" -eq 3 ]
	[ "${#lines[@]}" -eq 1 ]
	[[ "${lines[0]}" == *nowhere* ]]
}

@test "a bad format: non-zero, one line, no mount" {
	run "$IMGFS" --format=vmdk a.qcow2 mnt
	[ "$status" -eq 2 ]
	[ "${#lines[@]}" -eq 1 ]
	[[ "${lines[0]}" == *vmdk* ]]
	not_mounted mnt
}

@test "a qcow2 image forced to raw is shown as its raw bytes" {
	mount_imgfs a.qcow2 mnt --format=raw -r
	cmp mnt/disk a.qcow2
}

@test "a raw file that starts with a qcow2 magic is not probed as raw" {
	printf 'QFI\xfb' >fake.img
	truncate -s 1M fake.img
	run "$IMGFS" fake.img mnt
	[ "$status" -ne 0 ]
	not_mounted mnt
}

@test "an unknown -o option: non-zero, no mount" {
	run "$IMGFS" -o no_such_option a.qcow2 mnt
	[ "$status" -ne 0 ]
	not_mounted mnt
}

@test "the pid file names the daemon" {
	mount_imgfs a.qcow2 mnt
	pid=$(last_pid)
	[ -n "$pid" ]
	grep -q imgfs "/proc/$pid/cmdline"
}

@test "mount -t fuse.imgfs works through mount.fuse3" {
	# mount(8) runs helpers with a fixed PATH: put imgfs where make install would
	if [ -e /usr/local/bin/imgfs ] && [ "$(readlink /usr/local/bin/imgfs)" != "$IMGFS" ]; then
		skip "/usr/local/bin/imgfs is another imgfs"
	fi
	ln -sf "$IMGFS" /usr/local/bin/imgfs
	_LINKED=1
	mount -t fuse.imgfs "$PWD/a.qcow2" "$PWD/mnt" -o ro
	_MOUNTS+=("$PWD/mnt")
	[ "$(stat -c %s mnt/disk)" = 8388608 ]
	umount mnt
	not_mounted mnt
}

@test "mount -t fuse with the program#image form works" {
	mount -t fuse "$IMGFS#$PWD/a.qcow2" "$PWD/mnt" -o ro,allow_other
	_MOUNTS+=("$PWD/mnt")
	qemu_raw a.qcow2 ref.raw
	cmp mnt/disk ref.raw
	umount mnt
	not_mounted mnt
}

# Read replies are spliced from the image file (requests cut to fit a pipe);
# --no-splice copies them; a max_read of the user's own is kept.
# Every mode must give qemu's bytes over backing data, zero clusters, a
# compressed cluster and plain clusters.
@test "spliced, copied and max_read-limited reads all give qemu's bytes" {
	[ "$(id -u)" = 0 ] || skip "pipes of 1 MiB for every worker need root here"
	qemu-img create -q -f qcow2 base.qcow2 8M
	qemu-io -c "write -P 0x61 0 8M" base.qcow2 >/dev/null
	qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 top.qcow2
	qemu-io -c "write -P 0x62 1M 1M" -c "write -z 2176k 64k" -c "write -c -P 0x63 3M 64k" \
		-c "write -P 0x64 4000k 3M" top.qcow2 >/dev/null
	qemu_raw top.qcow2 ref.raw
	local opts
	for opts in "" --no-splice "-o max_read=65536"; do
		# shellcheck disable=SC2086
		mount_imgfs top.qcow2 mnt $opts
		case $opts in
		"") grep -q " $PWD/mnt fuse.imgfs .*max_read=917504" /proc/mounts ;;
		--no-splice) run grep " $PWD/mnt fuse.imgfs .*max_read=" /proc/mounts; [ "$status" -ne 0 ] ;;
		*) grep -q " $PWD/mnt fuse.imgfs .*max_read=65536" /proc/mounts ;;
		esac
		echo 3 > /proc/sys/vm/drop_caches
		same_bytes mnt/disk ref.raw
		unmount_imgfs mnt
	done
}

# --max-threads bounds the FUSE workers, and so does the default.  A worker
# is a thread of the daemon waiting in the kernel's FUSE read.
@test "--max-threads and -o max_threads= bound the FUSE workers; a bound past 1024 is a usage error" {
	command -v fio >/dev/null || skip "fio is not installed"
	[ -r "/proc/self/stack" ] || skip "kernel stacks are not readable"
	local opts pid workers max
	for opts in --max-threads=2 "-o max_threads=3" ""; do
		# shellcheck disable=SC2086
		mount_imgfs a.qcow2 mnt $opts
		pid=$(last_pid)
		fio --name=r --filename=mnt/disk --ioengine=psync --direct=1 --rw=randread \
			--bs=4k --numjobs=12 --time_based --runtime=1 --output=/dev/null
		sleep 0.2
		workers=$(grep -l fuse_dev_do_read /proc/"$pid"/task/*/stack | wc -l)
		case $opts in
		--max-threads=2) max=2 ;;
		"-o max_threads=3") max=3 ;;
		*) max=$(( $(nproc) * 2 )); [ $max -ge 4 ] || max=4; [ $max -le 64 ] || max=64 ;;
		esac
		echo "${opts:-default}: $workers workers after 12 readers, bound $max" >&2
		[ "$workers" -le "$max" ]
		# the readers were served in parallel
		[ "$workers" -ge 2 ]
		unmount_imgfs mnt
	done
	run "$IMGFS" --max-threads=1025 a.qcow2 mnt
	[ "$status" -eq 1 ]
	[[ "$output" == *"at most 1024"* ]]
	not_mounted mnt
}

# A user other than root splices too, when the workers' pipes (1 MiB each)
# take at most half of the user's pipe-user-pages-soft; past that, libfuse
# would copy through an mmap at half speed, so imgfs copies itself.
@test "a user other than root splices when the workers' pipes fit the user's pipe limit, and copies when not" {
	[ "$(id -u)" = 0 ] || skip "needs root to run as another user"
	command -v setpriv >/dev/null || skip "setpriv is not installed"
	# a directory the user can reach (the test's own is root's alone)
	_USER_DIR=$(mktemp -d /tmp/imgfs-user.XXXXXX)
	chmod 755 "$_USER_DIR"
	cd "$_USER_DIR"
	mkdir mnt
	qemu-img create -q -f qcow2 -o cluster_size=65536 u.qcow2 8M
	qemu-io -c "write -P 0x71 0 3M" -c "write -c -P 0x72 4M 64k" -c "write -z 5M 1M" u.qcow2 >/dev/null
	qemu_raw u.qcow2 ref.raw
	chown nobody u.qcow2 mnt ref.raw
	# a libfuse mount as a user opens /dev/fuse itself
	_FUSE_MODE=$(stat -c %a /dev/fuse)
	chmod 666 /dev/fuse
	_PIPE_SOFT=$(sysctl -n fs.pipe-user-pages-soft)
	as_nobody() { setpriv --reuid=nobody --regid=nogroup --clear-groups "$@"; }
	local soft
	# 2 workers: 512 pages of pipes; a limit of 1024 fits them, 1000 does not
	for soft in 1024 1000; do
		sysctl -q fs.pipe-user-pages-soft=$soft
		as_nobody "$IMGFS" --max-threads=2 u.qcow2 mnt
		_MOUNTS+=("$_USER_DIR/mnt")
		if [ $soft = 1024 ]; then
			grep -q " $_USER_DIR/mnt fuse.imgfs .*max_read=917504" /proc/mounts
		else
			run grep " $_USER_DIR/mnt fuse.imgfs .*max_read=" /proc/mounts
			[ "$status" -ne 0 ]
		fi
		as_nobody cmp mnt/disk ref.raw
		fusermount3 -u mnt
	done
}
