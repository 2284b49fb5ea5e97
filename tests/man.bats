#!/usr/bin/env bats
# The man pages: they render without a warning, and they document exactly
# the options that --help lists (so neither can drift from the other).

load lib/common

setup() {
	common_setup
	SRC=${IMGFS_SRCDIR:-$BATS_TEST_DIRNAME/..}
	command -v man >/dev/null || skip "man is not installed"
}
teardown() {
	common_teardown
}

# usage: render PAGE — the text in $T/out, man's and groff's complaints in $T/warn
render() {
	LC_ALL=C.UTF-8 MANWIDTH=80 man --warnings -l "$1" >"$T/out" 2>"$T/warn"
}

# The long options of a page's OPTIONS section, from the roff source
# (\-\-no\-backing there is --no-backing), one a line, sorted.
man_long_options() {
	sed -n '/^\.SH OPTIONS/,/^\.SH /p' "$1" |
		grep -o '\\-\\-[a-z]\([a-z]\|\\-\)*' | sed 's/\\//g' | sort -u
}
man_short_options() {
	sed -n '/^\.SH OPTIONS/,/^\.SH /p' "$1" |
		grep -oP '(?<![-a-z])\\-[a-zA-Z](?![a-zA-Z\\])' | sed 's/\\//g' | sort -u
}
help_long_options() {
	"$1" --help | grep -o -- '--[a-z][a-z-]*' | sort -u
}
# from the option lines only, before their descriptions
help_short_options() {
	"$1" --help | grep -E '^ +-' | sed -E 's/^ +//; s/ {2,}.*//' |
		grep -oP '(?<![-a-zA-Z])-[a-zA-Z](?![-a-zA-Z])' | sort -u
}

# usage: same_list WHAT LEFT RIGHT — with a diff on failure
same_list() {
	if ! diff -u <(echo "$2") <(echo "$3") >"$T/diff"; then
		echo "$1 differ (- man page, + --help):" >&2
		cat "$T/diff" >&2
		return 1
	fi
}

@test "imgfs(1) renders without warnings" {
	render "$SRC/doc/imgfs.1"
	cat "$T/warn" >&2
	[ ! -s "$T/warn" ]
	grep -q '^EXIT STATUS' "$T/out"
}

@test "imgfs-nbd(8) renders without warnings" {
	render "$SRC/doc/imgfs-nbd.8"
	cat "$T/warn" >&2
	[ ! -s "$T/warn" ]
	grep -q '^EXIT STATUS' "$T/out"
}

@test "groff finds nothing to warn about in either page, at every warning level" {
	command -v groff >/dev/null || skip "groff is not installed"
	run groff -ww -z -man -t "$SRC/doc/imgfs.1" "$SRC/doc/imgfs-nbd.8"
	[ "$status" -eq 0 ]
	[ -z "$output" ]
}

@test "mandb can read both pages' NAME lines (whatis, apropos)" {
	command -v lexgrog >/dev/null || skip "no lexgrog"
	run lexgrog "$SRC/doc/imgfs.1"
	[ "$status" -eq 0 ]
	[[ "$output" == *'"imgfs - '* ]]
	run lexgrog "$SRC/doc/imgfs-nbd.8"
	[ "$status" -eq 0 ]
	[[ "$output" == *'"imgfs-nbd - '* ]]
}

@test "imgfs(1) documents exactly the long options of imgfs --help" {
	man=$(man_long_options "$SRC/doc/imgfs.1")
	help=$(help_long_options "$IMGFS")
	[ -n "$help" ]
	same_list "long options" "$man" "$help"
}

@test "imgfs(1) documents exactly the short options of imgfs --help" {
	same_list "short options" "$(man_short_options "$SRC/doc/imgfs.1")" "$(help_short_options "$IMGFS")"
}

@test "imgfs-nbd(8) documents exactly the long options of imgfs-nbd --help" {
	man=$(man_long_options "$SRC/doc/imgfs-nbd.8")
	help=$(help_long_options "$IMGFS_NBD")
	[ -n "$help" ]
	same_list "long options" "$man" "$help"
}

@test "imgfs-nbd(8) documents exactly the short options of imgfs-nbd --help" {
	same_list "short options" "$(man_short_options "$SRC/doc/imgfs-nbd.8")" "$(help_short_options "$IMGFS_NBD")"
}

@test "imgfs(1) documents each exit status that --help names" {
	render "$SRC/doc/imgfs.1"
	sed -n '/^EXIT STATUS/,/^[A-Z]/p' "$T/out" >"$T/exit"
	for code in 0 1 2 3 4; do
		"$IMGFS" --help | grep -q "$code [a-z]"
		grep -Eq "^       $code( |\$)" "$T/exit"
	done
}

@test "the man pages carry the programs' version" {
	v=$("$IMGFS_NBD" --version | awk '{print $2}')
	grep -q "^\.TH IMGFS 1 .*\"imgfs $v\"" "$SRC/doc/imgfs.1"
	grep -q "^\.TH IMGFS\\\\-NBD 8 .*\"imgfs $v\"" "$SRC/doc/imgfs-nbd.8"
	"$IMGFS" --version | grep -q "^imgfs $v "
}

@test "every example command of the README is in a man page's EXAMPLES" {
	[ -f "$SRC/README" ] || skip "no README"
	render "$SRC/doc/imgfs.1"
	sed -n '/^EXAMPLES/,/^SEE ALSO/p' "$T/out" >"$T/examples"
	render "$SRC/doc/imgfs-nbd.8"
	sed -n '/^EXAMPLES/,/^SEE ALSO/p' "$T/out" >>"$T/examples"
	n=0
	# the README's command lines: indented, a program name, a comment
	while IFS= read -r cmd; do
		n=$((n + 1))
		grep -qF -- "$cmd" "$T/examples" || { echo "not in EXAMPLES: $cmd" >&2; return 1; }
	done < <(sed -n 's/^    \(imgfs\(-nbd\)\? [^#]*[^# ]\) *#.*/\1/p' "$SRC/README")
	[ "$n" -ge 5 ]
}
