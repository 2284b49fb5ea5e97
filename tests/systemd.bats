#!/usr/bin/env bats
# The example systemd units in tools/systemd, run without systemd: each
# test takes the unit's own ExecStart line, expands it as systemd would for
# an instance, and runs it the way systemd runs it — under
# systemd-socket-activate for the NBD socket unit (so the server is handed
# a listening socket and the client never races its start), as a forking
# service for the mount.

load lib/common

setup() {
	common_setup
	UNITS=${IMGFS_SRCDIR:-$BATS_TEST_DIRNAME/..}/tools/systemd
	qemu-img create -q -f qcow2 a.qcow2 16M
	qemu-io -c "write -P 0x5a 0 1M" a.qcow2 >/dev/null
}
teardown() {
	common_teardown
}

# usage: unit_value UNIT KEY — the values of KEY= in a unit, one a line
unit_value() {
	sed -n "s/^$2=//p" "$1"
}

# usage: expand UNIT PATH TEXT — systemd's specifiers for the instance
# whose escaped name is PATH's (%i escaped, %f the path, %% a percent sign)
expand() {
	local inst text=$3
	inst=$(systemd-escape --path "$2")
	text=${text//%i/$inst}
	text=${text//%I/${inst//-//}}
	text=${text//%f/$2}
	text=${text//%%/%}
	printf '%s\n' "$text"
}

# usage: unit_command UNIT PATH [VAR=VALUE...] — ExecStart of UNIT for the
# instance PATH as an array in CMD: Environment= defaults, then the
# overrides given (what an EnvironmentFile would set), $VAR split into
# words and ${VAR} kept whole as systemd does, our builds for /usr/bin.
unit_command() {
	local unit=$1 path=$2 line kv name
	shift 2
	local -A env=()
	while IFS= read -r kv; do
		kv=${kv#\"}
		kv=${kv%\"}
		kv=$(expand "$unit" "$path" "$kv")
		env[${kv%%=*}]=${kv#*=}
	done < <(unit_value "$unit" Environment)
	for kv in "$@"; do
		env[${kv%%=*}]=${kv#*=}
	done
	line=$(expand "$unit" "$path" "$(unit_value "$unit" "${KEY:-ExecStart}")")
	# "-": a failure is not the unit's failure
	CMD_MAY_FAIL=""
	[[ $line == -* ]] && CMD_MAY_FAIL=1 && line=${line#-}
	CMD=()
	for word in $line; do
		case $word in
		/usr/bin/imgfs-nbd) CMD+=("$IMGFS_NBD") ;;
		/usr/bin/imgfs) CMD+=("$IMGFS") ;;
		\$\{*\})
			name=${word#\$\{}
			CMD+=("${env[${name%\}}]}") ;;
		\$*)
			# shellcheck disable=SC2206 # split as systemd splits $VAR
			CMD+=(${env[${word#\$}]}) ;;
		*) CMD+=("$word") ;;
		esac
	done
}

# Start CMD under systemd-socket-activate listening on $1; return once it listens.
socket_activate() {
	systemd-socket-activate -l "$1" -- "${CMD[@]}" 2>"$T/activate.log" &
	track_pid $!
	# the activator's own set-up, not the server's: once it says it
	# listens, a client may connect before the server has even started
	for _ in $(seq 100); do
		grep -q "^Listening on" "$T/activate.log" && return 0
		sleep 0.05
	done
	cat "$T/activate.log" >&2
	return 1
}

@test "the units name their instance by the escaped image path" {
	for u in 'imgfs@.service' 'imgfs-nbd@.socket' 'imgfs-nbd@.service'; do
		[ -f "$UNITS/$u" ]
		grep -q '%[if]' "$UNITS/$u"
	done
	inst=$(systemd-escape --path "$PWD/a.qcow2")
	[ "$(systemd-escape --unescape --path "$inst")" = "$PWD/a.qcow2" ]
	[ "$(expand x "$PWD/a.qcow2" %f)" = "$PWD/a.qcow2" ]
}

@test "systemd-analyze verify finds nothing wrong in the units" {
	command -v systemd-analyze >/dev/null || skip "no systemd-analyze"
	mkdir units
	cp "$UNITS"/* units/
	# the commands live in /usr/bin once installed; here, only their syntax counts
	sed -i "s|/usr/bin/imgfs|$(dirname "$IMGFS")/imgfs|" units/*
	inst=$(systemd-escape --path "$PWD/a.qcow2")
	run systemd-analyze verify --man=no "units/imgfs@$inst.service" \
		"units/imgfs-nbd@$inst.socket" "units/imgfs-nbd@$inst.service"
	echo "$output"
	[ "$status" -eq 0 ]
	[ -z "$output" ]
}

@test "imgfs-nbd@.service serves the socket of imgfs-nbd@.socket (Unix socket)" {
	listen=$(expand x "$PWD/a.qcow2" "$(unit_value "$UNITS/imgfs-nbd@.socket" ListenStream)")
	[[ "$listen" == /run/imgfs-nbd/*.sock ]]
	# the same socket name, in the test's directory
	sock="$PWD/${listen##*/}"
	[ "${#sock}" -lt 108 ] || sock="$PWD/nbd.sock"
	unit_command "$UNITS/imgfs-nbd@.service" "$PWD/a.qcow2"
	socket_activate "$sock"
	# systemd-escape writes "-" in a path as \x2d: a URI needs it %-encoded
	uri="nbd+unix:///?socket=$(python3 -c 'import sys, urllib.parse; print(urllib.parse.quote(sys.argv[1]))' "$sock")"
	run nbdinfo --size "$uri"
	echo "$output"
	[ "$status" -eq 0 ]
	[ "$output" = 16777216 ]
}

@test "imgfs-nbd@.service over TCP, the drop-in way, serves the image's bytes" {
	port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
	unit_command "$UNITS/imgfs-nbd@.service" "$PWD/a.qcow2" "IMGFS_NBD_OPTIONS=--persistent --shared=0 -r"
	socket_activate "127.0.0.1:$port"
	nbdcopy "nbd://127.0.0.1:$port" got.raw
	qemu_raw a.qcow2 ref.raw
	same_bytes got.raw ref.raw
	# --persistent: a second client is served by the same process
	run nbdinfo --size "nbd://127.0.0.1:$port"
	[ "$output" = 16777216 ]
}

@test "imgfs-nbd@.service exports a view of a running imgfs@ mount" {
	mkdir mnt
	mount_imgfs a.qcow2 mnt
	unit_command "$UNITS/imgfs-nbd@.service" "$PWD/mnt/disk"
	socket_activate "$PWD/nbd.sock"
	run nbdinfo --size "nbd+unix:///?socket=$PWD/nbd.sock"
	[ "$status" -eq 0 ]
	[ "$output" = 16777216 ]
}

@test "imgfs@.service mounts the image when its start command returns, and SIGTERM ends it cleanly" {
	mkdir mnt
	inst=$(systemd-escape --path "$PWD/a.qcow2")
	pidfile=$(expand x "$PWD/a.qcow2" "$(unit_value "$UNITS/imgfs@.service" PIDFile)")
	[ "$pidfile" = "/run/imgfs/$inst.pid" ]
	unit_command "$UNITS/imgfs@.service" "$PWD/a.qcow2" "MOUNTPOINT=$PWD/mnt"
	_MOUNTS+=("$PWD/mnt")
	pf=$(mktemp "$T/pid.XXXXXX")
	_PIDFILES+=("$pf")
	# ExecStartPre makes the mountpoint (here it exists already)
	start=("${CMD[@]}")
	KEY=ExecStartPre unit_command "$UNITS/imgfs@.service" "$PWD/a.qcow2" "MOUNTPOINT=$PWD/mnt"
	[ "${CMD[0]}" = /bin/mkdir ]
	"${CMD[@]}" || [ -n "$CMD_MAY_FAIL" ]
	[ -d /run/imgfs ]
	# Type=forking: the command returning is "started"
	"${start[@]}"
	[ "$(stat -c %s mnt/disk)" = 16777216 ]
	# systemd reads the main pid from PIDFile= as soon as the command returns
	[ -s "$pidfile" ]
	pid=$(cat "$pidfile")
	echo "$pid" >"$pf"
	alive "$pid"
	cmp <(head -c 1M mnt/disk) <(head -c 1M /dev/zero | tr '\0' Z)
	# systemctl stop: KillSignal=SIGTERM to the main pid
	[ "$(unit_value "$UNITS/imgfs@.service" KillSignal)" = SIGTERM ]
	kill -TERM "$pid"
	wait_gone "$pid"
	not_mounted mnt
	[ ! -e "$pidfile" ]
	qemu-img check -q a.qcow2
}

@test "imgfs@.service takes its options from the environment file" {
	mkdir mnt
	unit_command "$UNITS/imgfs@.service" "$PWD/a.qcow2" "MOUNTPOINT=$PWD/mnt" "IMGFS_OPTIONS=-r -o allow_other"
	_MOUNTS+=("$PWD/mnt")
	pidfile=$(expand x "$PWD/a.qcow2" "$(unit_value "$UNITS/imgfs@.service" PIDFile)")
	mkdir -p /run/imgfs
	"${CMD[@]}"
	pf=$(mktemp "$T/pid.XXXXXX")
	cp "$pidfile" "$pf"
	_PIDFILES+=("$pf")
	grep " $PWD/mnt fuse.imgfs " /proc/self/mounts >"$T/m"
	cat "$T/m"
	grep -q " ro," "$T/m"
	grep -q "allow_other" "$T/m"
}
