# Shared helpers for the bats suites: temp dirs, images made with the real
# tools, and mounts/processes that are always cleaned up — by PID, even when
# a test fails.  Load with:   load lib/common   and call  common_setup  /
# common_teardown  from setup/teardown (or use the default ones below).

: "${IMGFS:=${IMGFS_BUILDDIR:-$BATS_TEST_DIRNAME/..}/imgfs}"
: "${IMGFS_NBD:=${IMGFS_BUILDDIR:-$BATS_TEST_DIRNAME/..}/imgfs-nbd}"
export IMGFS IMGFS_NBD
export IMGFS_RUNTIME_DIR="${IMGFS_RUNTIME_DIR:-/tmp}"

_MOUNTS=()
_PIDFILES=()
_PIDS=()

common_setup() {
	T="$BATS_TEST_TMPDIR"
	cd "$T" || return 1
}

# Run imgfs in the background (daemonised) and remember the mount and its pid.
# IMGFS_TEST_MOUNT_OPTS (words) go before the test's own options: a whole
# suite can run again with, say, --io-uring.
# usage: mount_imgfs IMAGE MOUNTPOINT [OPTIONS...]
mount_imgfs() {
	local image=$1 mnt=$2
	shift 2
	local pidfile
	pidfile=$(mktemp "$BATS_TEST_TMPDIR/imgfs-pid.XXXXXX")
	_MOUNTS+=("$mnt")
	_PIDFILES+=("$pidfile")
	# shellcheck disable=SC2086 # words, on purpose
	"$IMGFS" --pid-file="$pidfile" ${IMGFS_TEST_MOUNT_OPTS:-} "$@" "$image" "$mnt"
}

# The pid of the most recent mount_imgfs daemon.
last_pid() {
	cat "${_PIDFILES[-1]}"
}

# Remember a process started by the test, killed in teardown.
track_pid() {
	_PIDS+=("$1")
}

# A path made absolute without touching it (realpath stats: a hung mount hangs it).
abs_path() {
	case $1 in
	/*) printf '%s\n' "$1" ;;
	*) printf '%s/%s\n' "$PWD" "${1#./}" ;;
	esac
}

is_mounted() {
	grep -q " $(abs_path "$1") fuse" /proc/self/mounts
}

# Unmount and wait for the daemon to exit; fails if it leaves anything behind.
unmount_imgfs() {
	local mnt=$1 pid=""
	for i in "${!_MOUNTS[@]}"; do
		if [ "${_MOUNTS[$i]}" = "$mnt" ]; then
			pid=$(cat "${_PIDFILES[$i]}" 2>/dev/null) || pid=""
		fi
	done
	fusermount3 -u "$mnt"
	wait_gone "$pid"
}

# Is the process running?  A zombie has exited: its reaper may be slow.
alive() {
	local st
	st=$(sed -n 's/^[0-9]* (.*) \([A-Z]\).*/\1/p' "/proc/$1/stat" 2>/dev/null) || return 1
	[ -n "$st" ] && [ "$st" != Z ] && [ "$st" != X ]
}

# Wait (up to 10 s) for a pid to exit.
wait_gone() {
	local pid=$1
	[ -n "$pid" ] || return 0
	for _ in $(seq 100); do
		alive "$pid" || return 0
		sleep 0.1
	done
	echo "process $pid did not exit" >&2
	return 1
}

# End a FUSE mount's connection (a hung one): every request in it fails.
# From mountinfo, so a hung mount is never stat()ed.
abort_fuse() {
	local dev
	dev=$(awk -v m="$(abs_path "$1")" '$5 == m { print $3 }' /proc/self/mountinfo | tail -1)
	[ -n "$dev" ] || return 1
	grep -q ' /sys/fs/fuse/connections ' /proc/self/mounts ||
		mount -t fusectl fusectl /sys/fs/fuse/connections
	echo 1 > "/sys/fs/fuse/connections/${dev#*:}/abort"
}

common_teardown() {
	local m p f
	for p in "${_PIDS[@]}"; do
		kill "$p" 2>/dev/null
	done
	for m in "${_MOUNTS[@]}"; do
		if is_mounted "$m"; then
			fusermount3 -u "$m" 2>/dev/null || umount -l "$m" 2>/dev/null
		fi
	done
	for f in "${_PIDFILES[@]}"; do
		p=$(cat "$f" 2>/dev/null) || continue
		[ -n "$p" ] || continue
		kill "$p" 2>/dev/null
		wait_gone "$p" 2>/dev/null || kill -9 "$p" 2>/dev/null
	done
	for p in "${_PIDS[@]}"; do
		wait_gone "$p" 2>/dev/null || kill -9 "$p" 2>/dev/null
	done
	for m in "${_MOUNTS[@]}"; do
		if is_mounted "$m"; then
			umount -l "$m" 2>/dev/null
		fi
	done
	# a mount the test did not expect to succeed: unmounting ends its daemon
	local mp
	while read -r _ mp _; do
		case "$mp" in
		"$BATS_TEST_TMPDIR"/*)
			echo "teardown: unmounting stray $mp" >&2
			fusermount3 -u "$mp" 2>/dev/null || umount -l "$mp" 2>/dev/null
			;;
		esac
	done < <(grep ' fuse' /proc/self/mounts)
	cd / || true
}

# Byte-for-byte equality, with a useful message.
same_bytes() {
	if ! cmp "$1" "$2"; then
		echo "$1 and $2 differ" >&2
		return 1
	fi
}

# The raw bytes of an image as qemu sees them.
# usage: qemu_raw IMAGE OUT [extra qemu-img convert args]
qemu_raw() {
	local img=$1 out=$2
	shift 2
	qemu-img convert -U "$@" -O raw "$img" "$out"
}

# Deterministic pseudo-random bytes: usage: pattern_file FILE SIZE_BYTES SEED
pattern_file() {
	python3 - "$1" "$2" "$3" <<'PY'
import random, sys
path, size, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
r = random.Random(seed)
with open(path, "wb") as f:
    left = size
    while left:
        n = min(left, 1 << 20)
        f.write(r.randbytes(n))
        left -= n
PY
}

# Run imgfs -f (with the given options) on mnt, stderr to $T/err; return
# once mounted.
foreground() {
	"$IMGFS" -f "$@" 2>"$T/err" &
	track_pid $!
	_MOUNTS+=("$PWD/mnt")
	for _ in $(seq 100); do
		is_mounted mnt && return 0
		sleep 0.05
	done
	cat "$T/err" >&2
	return 1
}

# End the foreground daemon and wait for it (its status is ours), so $T/err
# is complete.
stop_foreground() {
	fusermount3 -u mnt
	wait "${_PIDS[-1]}"
}

# Wait (60 s at most) for processes that use MNT; if they are still there,
# the mount hung, and a hung mount holds its callers in the kernel past any
# signal: abort its connection and fail.
# usage: wait_or_abort MNT PID...
wait_or_abort() {
	local mnt=$1 p
	shift
	for _ in $(seq 600); do
		for p in "$@"; do
			if alive "$p"; then
				sleep 0.1
				continue 2
			fi
		done
		return 0
	done
	abort_fuse "$mnt"
	echo "the mount hung" >&2
	return 1
}

# A write through p1 must drop disk's cached copy of the same bytes before
# it is answered, and dropping a page waits for the read in flight that
# holds it.  For SECONDS: a verified fio writer on MNT/p1 (8 MiB long, at
# 8 MiB on the disk) and two buffered readers of those bytes through
# MNT/disk (readahead in flight); fails if the mount hangs or fio errs.
# usage: p1_writer_disk_readers MNT SECONDS
p1_writer_disk_readers() {
	local mnt=$1 secs=$2 r w
	fio --name=r --filename="$mnt/disk" --ioengine=psync --rw=randread --bs=256k \
		--offset=8M --size=8M --numjobs=2 --invalidate=1 --time_based --runtime="$secs" \
		--output="$T/r.out" &
	r=$!
	track_pid $r
	fio --name=w --filename="$mnt/p1" --ioengine=psync --rw=randwrite --bs=64k \
		--size=8M --time_based --runtime="$secs" --verify=crc32c --do_verify=1 \
		--output="$T/w.out" &
	w=$!
	track_pid $w
	wait_or_abort "$mnt" $w $r || return 1
	wait $w
	wait $r
	cat "$T/w.out" "$T/r.out" >&2
	grep -q 'err= 0' "$T/w.out"
	grep -q 'err= 0' "$T/r.out"
}

# "! cmd" does not fail a bats test (set -e ignores it): use these instead.
not_mounted() {
	if is_mounted "$1"; then
		echo "$1 is still mounted" >&2
		return 1
	fi
}
