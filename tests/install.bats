#!/usr/bin/env bats
# make install DESTDIR=...: the programs, the man pages, the bash
# completions and the example systemd units land where a Linux system looks
# for them, and make uninstall takes them all away again.

load lib/common

setup() {
	common_setup
	[ -n "${IMGFS_BUILDDIR:-}" ] || skip "IMGFS_BUILDDIR is not set (make check sets it)"
	[ -f "$IMGFS_BUILDDIR/Makefile" ] || skip "no Makefile in $IMGFS_BUILDDIR"
	DEST="$T/root"
}
teardown() {
	common_teardown
}

# make in the build tree, not as part of the make that runs this test
bmake() {
	env -u MAKEFLAGS -u MFLAGS -u MAKELEVEL make -s -C "$IMGFS_BUILDDIR" "$@"
}

# usage: dir VAR — the build's installation directory VAR, expanded
dir() {
	# shellcheck disable=SC2016 # $(VAR) is for make
	printf 'print-dir:\n\t@echo $(%s)\n' "$1" |
		env -u MAKEFLAGS -u MFLAGS -u MAKELEVEL make -s -C "$IMGFS_BUILDDIR" -f Makefile -f - print-dir
}

@test "make install DESTDIR= installs programs, man pages, completions and units in their places" {
	bindir=$(dir bindir)
	mandir=$(dir mandir)
	compdir=$(dir bashcompletiondir)
	unitdir=$(dir systemdsystemunitdir)
	datadir=$(dir datadir)
	prefix=$(dir prefix)
	[ "$mandir" = "$datadir/man" ]
	[ "$compdir" = "$datadir/bash-completion/completions" ] || [ -n "$compdir" ]
	[ -n "$unitdir" ]
	bmake install DESTDIR="$DEST" >"$T/log" 2>&1 || { cat "$T/log"; return 1; }
	(cd "$DEST" && find . -type f | sort) | tee "$T/files"

	[ -x "$DEST$bindir/imgfs" ]
	[ -x "$DEST$bindir/imgfs-nbd" ]
	"$DEST$bindir/imgfs" --version | grep -q '^imgfs '
	[ -f "$DEST$mandir/man1/imgfs.1" ]
	[ -f "$DEST$mandir/man8/imgfs-nbd.8" ]
	[ -f "$DEST$compdir/imgfs" ]
	[ -f "$DEST$compdir/imgfs-nbd" ]
	for u in 'imgfs@.service' 'imgfs-nbd@.socket' 'imgfs-nbd@.service'; do
		[ -f "$DEST$unitdir/$u" ]
		[ "$(stat -c %a "$DEST$unitdir/$u")" = 644 ]
	done
	# nothing outside the prefix
	run grep -v "^\./${prefix#/}/" "$T/files"
	[ -z "$output" ]
}

@test "the installed units run the installed programs" {
	bindir=$(dir bindir)
	unitdir=$(dir systemdsystemunitdir)
	bmake install DESTDIR="$DEST" >"$T/log" 2>&1 || { cat "$T/log"; return 1; }
	grep -q "^ExecStart=$bindir/imgfs " "$DEST$unitdir/imgfs@.service"
	grep -q "^ExecStart=$bindir/imgfs-nbd " "$DEST$unitdir/imgfs-nbd@.service"
}

@test "the installed man pages and completions work from where they are" {
	mandir=$(dir mandir)
	compdir=$(dir bashcompletiondir)
	bmake install DESTDIR="$DEST" >"$T/log" 2>&1 || { cat "$T/log"; return 1; }
	if command -v man >/dev/null; then
		MANPATH="$DEST$mandir" LC_ALL=C.UTF-8 MANWIDTH=80 man 8 imgfs-nbd >"$T/page"
		grep -q "^NAME" "$T/page"
		MANPATH="$DEST$mandir" LC_ALL=C.UTF-8 MANWIDTH=80 man 1 imgfs | grep -q "fuse.imgfs"
	fi
	bash -c "source '$DEST$compdir/imgfs' && source '$DEST$compdir/imgfs-nbd' && complete -p imgfs imgfs-nbd"
}

@test "make uninstall DESTDIR= removes every installed file" {
	bmake install DESTDIR="$DEST" >"$T/log" 2>&1 || { cat "$T/log"; return 1; }
	bmake uninstall DESTDIR="$DEST" >"$T/log" 2>&1 || { cat "$T/log"; return 1; }
	run find "$DEST" -type f
	[ -z "$output" ]
}
