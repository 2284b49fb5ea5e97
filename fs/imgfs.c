/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * imgfs: show a disk image (qcow2 or raw) as raw bytes through FUSE — over a
 * regular file (one view) or as a directory of views.
 *
 * Start-up order matters for "the parent exits 0 only once the mount
 * answers": open the image and mount in the first process (so every error
 * reaches the user's terminal as one line), then fork; the child serves the
 * mount, and the parent returns only after a stat() of the mountpoint has
 * been answered by the child.
 */
#include "config.h"
#include "fs.h"
#include "control.h"
#include "daemon.h"
#include "fuse-uring.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/wait.h>
#include <unistd.h>

/* Exit codes (documented in imgfs(1)) */
enum {
	EXIT_OK = 0,
	EXIT_USAGE = 1,   /* bad command line */
	EXIT_IMAGE = 2,   /* the image cannot be opened */
	EXIT_MOUNT = 3,   /* the mount failed */
	EXIT_RUNTIME = 4, /* failure while running or closing */
};

struct cli {
	char *image;
	char *mountpoint;
	int foreground, debug, single, verbose;
	char *format;
	int read_only, no_backing;
	char *cache_size;
	int cached_writes;
	char *pid_file;
	char *view;
	int partition;
	char *snapshot;
	int list, json;
	int own_fsname, own_subtype; /* -o fsname=, subtype= given: keep them */
	unsigned max_read;           /* -o max_read= given (init must agree) */
	int no_splice;
	unsigned max_threads;
	int io_uring;
	int help, version;
	int nonopts;
	int bad;
};

enum { KEY_NONOPT_MY = 100, KEY_RO, KEY_DEBUG, KEY_HELP, KEY_VERSION, KEY_VERBOSE };

#define OPT(t, f, v) { t, offsetof(struct cli, f), v }
static const struct fuse_opt cli_opts[] = {
	OPT("-f", foreground, 1),
	OPT("-s", single, 1),
	OPT("-r", read_only, 1),
	OPT("--read-only", read_only, 1),
	OPT("--format=%s", format, 0),
	OPT("format=%s", format, 0),
	OPT("--no-backing", no_backing, 1),
	OPT("no_backing", no_backing, 1),
	OPT("--cache-size=%s", cache_size, 0),
	OPT("cache_size=%s", cache_size, 0),
	OPT("--no-splice", no_splice, 1),
	OPT("no_splice", no_splice, 1),
	OPT("--max-threads=%u", max_threads, 0),
	OPT("max_threads=%u", max_threads, 0),
	OPT("--io-uring", io_uring, 1),
	OPT("io_uring", io_uring, 1),
	OPT("--cached-writes", cached_writes, 1),
	OPT("cached_writes", cached_writes, 1),
	OPT("--pid-file=%s", pid_file, 0),
	OPT("pid_file=%s", pid_file, 0),
	OPT("--view=%s", view, 0),
	OPT("view=%s", view, 0),
	OPT("-P %i", partition, 0),
	OPT("--partition=%i", partition, 0),
	OPT("partition=%i", partition, 0),
	OPT("-l %s", snapshot, 0),
	OPT("--snapshot=%s", snapshot, 0),
	OPT("--load-snapshot=%s", snapshot, 0),
	OPT("snapshot=%s", snapshot, 0),
	OPT("--list", list, 1),
	OPT("--json", json, 1),
	FUSE_OPT_KEY("ro", KEY_RO),
	FUSE_OPT_KEY("-d", KEY_DEBUG),
	FUSE_OPT_KEY("--debug", KEY_DEBUG),
	FUSE_OPT_KEY("-h", KEY_HELP),
	FUSE_OPT_KEY("--help", KEY_HELP),
	FUSE_OPT_KEY("-V", KEY_VERSION),
	FUSE_OPT_KEY("--version", KEY_VERSION),
	FUSE_OPT_KEY("-v", KEY_VERBOSE),
	FUSE_OPT_KEY("--verbose", KEY_VERBOSE),
	FUSE_OPT_END
};

/*
 * -o options come from three places: the user, mount(8) and mount.fuse3
 * (fstab).  Pass on those libfuse 3 knows; accept and drop those that are
 * mount(8)'s own bookkeeping (mount.fuse3 drops some, not all, and a
 * direct "mount.fuse3 ... -o defaults" passes them on) or that cannot mean
 * anything for a view (atime flavours: a view's times are the image's);
 * anything else is a usage error, named, on one line.
 */
enum mount_opt_kind { MOUNT_OPT_UNKNOWN, MOUNT_OPT_LIBFUSE, MOUNT_OPT_IGNORED };

static enum mount_opt_kind mount_opt_kind(const char *opt)
{
	static const char *const libfuse[] = {
		"allow_other", "allow_root", "auto_unmount", "blkdev",
		"default_permissions", "debug", "ro", "rw", "suid", "nosuid",
		"dev", "nodev", "exec", "noexec", "async", "sync", "dirsync",
		"atime", "noatime", "nodiratime",
	};
	static const char *const libfuse_value[] = {
		"fsname=", "subtype=", "max_read=", "blksize=", "context=",
		"fscontext=", "defcontext=", "rootcontext=", "user=",
	};
	static const char *const ignored[] = {
		"defaults", "auto", "noauto", "nofail", "_netdev", "user",
		"users", "nouser", "owner", "group", "relatime", "norelatime",
		"strictatime", "nostrictatime", "lazytime", "nolazytime",
		"diratime", "symfollow", "nosymfollow",
	};

	for (size_t i = 0; i < ARRAY_SIZE(libfuse); i++)
		if (!strcmp(opt, libfuse[i]))
			return MOUNT_OPT_LIBFUSE;
	for (size_t i = 0; i < ARRAY_SIZE(libfuse_value); i++)
		if (!strncmp(opt, libfuse_value[i], strlen(libfuse_value[i])))
			return MOUNT_OPT_LIBFUSE;
	for (size_t i = 0; i < ARRAY_SIZE(ignored); i++)
		if (!strcmp(opt, ignored[i]))
			return MOUNT_OPT_IGNORED;
	/* x-systemd.automount, x-gvfs-show, comment=...: notes for other tools */
	if (!strncmp(opt, "x-", 2) || !strncmp(opt, "comment=", 8))
		return MOUNT_OPT_IGNORED;
	return MOUNT_OPT_UNKNOWN;
}

static int cli_proc(void *data, const char *arg, int key, struct fuse_args *out)
{
	struct cli *c = data;

	switch (key) {
	case FUSE_OPT_KEY_NONOPT:
		if (c->nonopts == 0)
			c->image = strdup(arg);
		else if (c->nonopts == 1)
			c->mountpoint = strdup(arg);
		else {
			fprintf(stderr, "imgfs: unexpected argument '%s' (usage: imgfs [OPTIONS] IMAGE MOUNTPOINT)\n", arg);
			c->bad = 1;
		}
		c->nonopts++;
		return 0;
	case KEY_RO:
		c->read_only = 1;
		return 1; /* the kernel mount is read-only too */
	case KEY_DEBUG:
		c->debug = 1;
		c->foreground = 1;
		return 1; /* libfuse's own request tracing */
	case KEY_HELP:
		c->help = 1;
		return 0;
	case KEY_VERSION:
		c->version = 1;
		return 0;
	case KEY_VERBOSE:
		c->verbose++;
		return 0;
	case FUSE_OPT_KEY_OPT:
		if (arg[0] == '-' && strcmp(arg, "-o")) {
			fprintf(stderr, "imgfs: unknown option '%s' (see imgfs --help)\n", arg);
			c->bad = 1;
			return 0;
		}
		if (arg[0] == '-')
			return 1;
		switch (mount_opt_kind(arg)) {
		case MOUNT_OPT_LIBFUSE:
			if (!strncmp(arg, "fsname=", 7))
				c->own_fsname = 1;
			else if (!strncmp(arg, "subtype=", 8))
				c->own_subtype = 1;
			else if (!strncmp(arg, "max_read=", 9))
				c->max_read = (unsigned)strtoul(arg + 9, NULL, 0);
			return 1;
		case MOUNT_OPT_IGNORED:
			return 0;
		default:
			fprintf(stderr, "imgfs: unknown mount option '-o %s' (see imgfs --help)\n", arg);
			c->bad = 1;
			return 0;
		}
	default:
		return 1;
	}
}

static void usage(FILE *f)
{
	fputs(
"Usage: imgfs [OPTIONS] IMAGE MOUNTPOINT\n"
"       imgfs --list [--json] IMAGE\n"
"\n"
"Show a qcow2 or raw disk image as raw bytes.  MOUNTPOINT a regular file\n"
"(IMAGE itself, even): that file shows one view, 'disk' unless chosen\n"
"otherwise.  MOUNTPOINT a directory: it shows every view as a file —\n"
"disk, pN for each partition, snap@NAME for each qcow2 internal snapshot.\n"
"\n"
"Image options:\n"
"  --format=raw|qcow2     image format (default: probe; a probed raw image\n"
"                         that starts with another format's magic is refused)\n"
"  -r, --read-only        open the image read-only\n"
"  --no-backing           do not open backing files (unallocated reads as zeroes)\n"
"  --cache-size=SIZE      bound of the qcow2 L2 table cache, bytes or with a\n"
"                         K, M or G suffix (default 32M; at least 16 slices)\n"
"\n"
"View options (file mounts):\n"
"  --view=NAME            show view NAME (disk, pN, snap@NAME)\n"
"  -P N, --partition=N    show partition N\n"
"  -l NAME|ID, --snapshot=NAME|ID\n"
"                         show an internal snapshot (read-only); also\n"
"                         snapshot.id=ID or snapshot.name=NAME\n"
"  --load-snapshot=NAME|ID the same, under qemu-nbd's name\n"
"\n"
"Listing:\n"
"  --list                 print the image's views and exit\n"
"  --json                 with --list: as JSON\n"
"\n"
"Mount options:\n"
"  -f                     stay in the foreground, log to stderr\n"
"  -d, --debug            foreground, with libfuse request tracing\n"
"  -s                     single-threaded (no kernel page cache)\n"
"  --cached-writes        writes go through the kernel page cache (default:\n"
"                         files opened for writing use direct I/O, faster;\n"
"                         a MAP_SHARED mmap of a file opened for writing\n"
"                         needs this option)\n"
"  --no-splice            copy read replies; by default they are spliced from\n"
"                         the image file where it holds the bytes (a user\n"
"                         other than root: if the workers' pipes fit the\n"
"                         user's pipe limit)\n"
"  --max-threads=N        FUSE worker threads at most (default: 2 per CPU,\n"
"                         at least 4, at most 64)\n"
"  --io-uring             read-only mounts: serve requests through FUSE over\n"
"                         io_uring when the kernel offers it (Linux 6.14 or\n"
"                         later, the fuse module's enable_uring parameter on)\n"
"  -o OPT[,OPT...]        mount options: ro, allow_other, default_permissions,\n"
"                         fsname=, and those mount.fuse3 passes; image options\n"
"                         as -o format=, view=, partition=, snapshot=,\n"
"                         no_backing, cache_size=, cached_writes,\n"
"                         no_splice, max_threads=, io_uring, pid_file=\n"
"                         (for fstab);\n"
"                         mount(8)'s own (defaults, noauto, nofail, _netdev,\n"
"                         x-*...) are ignored\n"
"  --pid-file=PATH        write the daemon's pid to PATH\n"
"  -v, --verbose          more log messages (twice: debug)\n"
"  -h, --help             this text\n"
"  -V, --version          the version\n"
"\n"
"Exit status: 0 mounted (or listed), 1 usage error, 2 image cannot be opened,\n"
"3 mount failed, 4 failure while running or unmounting.\n"
"Unmount with fusermount3 -u MOUNTPOINT, umount, or SIGTERM/SIGINT to the daemon.\n",
	      f);
}

/* ---- --list ------------------------------------------------------------------ */

static void json_str(const char *s)
{
	putchar('"');
	for (; *s; s++) {
		unsigned char ch = (unsigned char)*s;

		if (ch == '"' || ch == '\\')
			printf("\\%c", ch);
		else if (ch < 0x20 || ch == 0x7f)
			printf("\\u%04x", ch);
		else
			putchar(ch);
	}
	putchar('"');
}

/* A copy of s fit for a terminal: labels and snapshot names come from the
 * image, and an escape sequence in one must not reach the user's tty. */
static char *printable_dup(const char *s)
{
	char *p = xstrdup(s);

	for (char *c = p; *c; c++)
		if ((unsigned char)*c < 0x20 || *c == 0x7f)
			*c = '?';
	return p;
}

static const char *kind_name(enum view_kind k)
{
	return k == VIEW_DISK ? "disk" : k == VIEW_PARTITION ? "partition" : "snapshot";
}

static int do_list(struct cli *c)
{
	struct image_opts o = {
		.format = c->format, .read_only = true, .no_backing = c->no_backing,
		.force_share = true,
	};
	struct err e = { 0 };
	struct image *img;
	struct view **views;
	unsigned n;

	if (image_open(c->image, &o, &img, &e) < 0) {
		fprintf(stderr, "imgfs: %s\n", e.msg);
		return EXIT_IMAGE;
	}
	n = image_list_views(img, &views, NULL);
	if (c->json) {
		printf("{\"image\": ");
		json_str(img->path);
		printf(", \"format\": ");
		json_str(img->format);
		printf(", \"partition-table\": ");
		json_str(img->part_scheme ? img->part_scheme : "");
		printf(", \"views\": [");
		for (unsigned i = 0; i < n; i++) {
			struct view *v = views[i];

			printf("%s\n  {\"name\": ", i ? "," : "");
			json_str(v->name);
			printf(", \"kind\": \"%s\", ", kind_name(v->kind));
			if (v->offset != UINT64_MAX)
				printf("\"offset\": %llu, ", (unsigned long long)v->offset);
			else
				printf("\"offset\": null, ");
			printf("\"length\": %llu, \"writable\": %s, \"type\": ",
			       (unsigned long long)v->length, v->writable && !img->read_only ? "true" : "false");
			json_str(v->type);
			printf(", \"label\": ");
			json_str(v->label);
			printf(", \"info\": ");
			json_str(v->info);
			putchar('}');
		}
		printf("\n]}\n");
	} else {
		printf("%-20s %14s %16s %-3s %-38s %s\n", "VIEW", "OFFSET", "LENGTH", "RW", "TYPE", "LABEL / INFO");
		for (unsigned i = 0; i < n; i++) {
			struct view *v = views[i];
			char off[32];

			if (v->offset == UINT64_MAX)
				snprintf(off, sizeof(off), "-");
			else
				snprintf(off, sizeof(off), "%llu", (unsigned long long)v->offset);
			char *label = printable_dup(v->label), *info = printable_dup(v->info);

			printf("%-20s %14s %16llu %-3s %-38s %s%s%s\n", v->name, off,
			       (unsigned long long)v->length, v->writable ? "rw" : "ro",
			       v->type, label, label[0] && info[0] ? " " : "", info);
			free(label);
			free(info);
		}
	}
	free(views);
	image_close(img);
	return EXIT_OK;
}

/* ---- mounting -------------------------------------------------------------- */

/* "32M", "4096", "1G": bytes, binary suffixes; more than 0 */
static int parse_cache_size(const char *s, uint64_t *out)
{
	unsigned long long v;
	char *end;
	unsigned shift = 0;

	errno = 0;
	if (*s < '0' || *s > '9')
		return -EINVAL;
	v = strtoull(s, &end, 10);
	if (errno)
		return -EINVAL;
	switch (*end) {
	case 'k': case 'K': shift = 10; end++; break;
	case 'm': case 'M': shift = 20; end++; break;
	case 'g': case 'G': shift = 30; end++; break;
	}
	if (*end == 'i' && end[1] == 'B')
		end += 2;
	else if (*end == 'B' && shift)
		end++;
	if (*end || v == 0 || v > (UINT64_MAX >> 1) >> shift)
		return -EINVAL;
	*out = (uint64_t)v << shift;
	return 0;
}

static struct fs the_fs;

static int control_socket_path(char **out)
{
	const char *dir = getenv("IMGFS_RUNTIME_DIR");
	char *d;

	if (!dir)
		dir = getuid() == 0 ? "/run/imgfs" : getenv("XDG_RUNTIME_DIR");
	if (!dir)
		dir = "/tmp";
	if (mkdir(dir, 0700) < 0 && errno != EEXIST)
		dir = "/tmp";
	d = g_strdup_printf("%s/imgfs-%d.ctl", dir, (int)getpid());
	*out = d;
	return 0;
}

/*
 * The syslog tag names the image: "imgfs[disk.qcow2]", so journalctl -t
 * picks one mount's messages.  openlog() keeps the pointer: static storage.
 * Characters that end a tag in the syslog wire format (space, ':', '[',
 * ']') or that are not printable become '_'.
 */
static const char *syslog_ident(const char *image_path)
{
	static char ident[96];
	const char *base = strrchr(image_path, '/');
	size_t n;

	base = base && base[1] ? base + 1 : image_path;
	n = (size_t)snprintf(ident, sizeof(ident), "imgfs[%.64s", base);
	if (n > sizeof(ident) - 2)
		n = sizeof(ident) - 2;
	for (size_t i = 6; i < n; i++) {
		unsigned char ch = (unsigned char)ident[i];

		if (ch <= ' ' || ch >= 0x7f || ch == ':' || ch == '[' || ch == ']')
			ident[i] = '_';
	}
	ident[n] = ']';
	ident[n + 1] = 0;
	return ident;
}

/*
 * The kernel caps FUSE readahead at the bdi's read_ahead_kb (128 KiB by
 * default) whatever max_readahead we ask for in INIT, so buffered reads
 * arrive as 128 KiB requests.  Raise it to 2 MiB (two max_pages requests) when we may
 * (root): sequential reads then come as 1 MiB requests, two in flight.
 * The mount's device comes from mountinfo: a stat() of the mountpoint would
 * need the loop that is not running yet.
 */
static void tune_readahead(const char *mountpoint)
{
	FILE *f = fopen("/proc/self/mountinfo", "r");
	char line[4096], dev[32] = "", path[64];
	unsigned long cur = 0;

	if (!f)
		return;
	while (fgets(line, sizeof(line), f)) {
		char mdev[32], mnt[4096], *o = mnt;

		if (sscanf(line, "%*s %*s %31s %*s %4095s", mdev, mnt) != 2)
			continue;
		/* mountinfo escapes space, tab, newline and backslash as \ooo */
		for (char *i = mnt; *i; i++, o++) {
			if (i[0] == '\\' && i[1] >= '0' && i[1] <= '3' && i[2] && i[3]) {
				*o = (char)((i[1] - '0') << 6 | (i[2] - '0') << 3 | (i[3] - '0'));
				i += 3;
			} else {
				*o = *i;
			}
		}
		*o = 0;
		if (!strcmp(mnt, mountpoint))
			snprintf(dev, sizeof(dev), "%s", mdev); /* the last one is on top */
	}
	fclose(f);
	if (!dev[0])
		return;
	snprintf(path, sizeof(path), "/sys/class/bdi/%s/read_ahead_kb", dev);
	f = fopen(path, "r+");
	if (!f) {
		log_debug("readahead stays at the kernel's default: %s: %s", path, strerror(errno));
		return;
	}
	if (fscanf(f, "%lu", &cur) == 1 && cur < FS_READAHEAD_KB) {
		rewind(f);
		fprintf(f, "%u\n", FS_READAHEAD_KB);
	}
	if (fclose(f) != 0)
		log_debug("cannot raise %s to %u: %s", path, FS_READAHEAD_KB, strerror(errno));
}

/* Signals end the loop; a backgrounded shell job has SIGINT ignored, and
 * libfuse leaves ignored signals alone, so restore the defaults first. */
static int install_signals(struct fuse_session *se)
{
	signal(SIGINT, SIG_DFL);
	signal(SIGTERM, SIG_DFL);
	signal(SIGHUP, SIG_DFL);
	signal(SIGPIPE, SIG_IGN);
	return fuse_set_signal_handlers(se);
}

/*
 * FUSE workers: few.  The kernel wakes its readers in turn, the one idle
 * longest first, so every idle worker takes a share of the requests and
 * their stacks and buffers go cold; on this project's 2-CPU machine 4
 * workers serve 4-job random reads ~10 % faster than 64 (doc/performance.md).
 * No worker ever waits for another (invalidations have a thread of their
 * own), so any bound is safe; it bounds the host reads in flight, hence
 * two per CPU and at least 4.
 */
static unsigned default_max_threads(void)
{
	long n = sysconf(_SC_NPROCESSORS_ONLN);

	return (unsigned)CLAMP(2 * (n > 0 ? n : 1), 4, 64);
}

/* A number from a /proc file; false if it cannot be read. */
static bool read_proc_ulong(const char *path, unsigned long *v)
{
	FILE *f = fopen(path, "r");
	bool ok;

	if (!f)
		return false;
	ok = fscanf(f, "%lu", v) == 1;
	fclose(f);
	return ok;
}

/*
 * Can each worker's pipe hold a spliced reply?  libfuse splices only when
 * the reply fits the thread's pipe, which it grows up to
 * /proc/sys/fs/pipe-max-size (1 MiB by default: FS_SPLICE_MAX_READ is cut
 * to fit it); otherwise it copies through an mmap, at half the speed of a
 * plain copy.  A user other than root also has all their pipes together
 * capped at pipe-user-pages-soft pages (16384 by default, 0 for none):
 * splice when the workers' pipes take at most half of that, leaving the
 * rest to the user's other pipes.
 */
static bool splice_fits(unsigned workers)
{
	unsigned long max, soft, pipe_pages = (1u << 20) / (unsigned long)sysconf(_SC_PAGESIZE);

	if (!read_proc_ulong("/proc/sys/fs/pipe-max-size", &max) || max < (1u << 20))
		return false;
	if (geteuid() == 0)
		return true;
	if (!read_proc_ulong("/proc/sys/fs/pipe-user-pages-soft", &soft))
		return false;
	return soft == 0 || workers * pipe_pages <= soft / 2;
}

/*
 * --io-uring: requests through the kernel's rings when it offers them
 * (fuse-uring.c); as many queue threads in all as FUSE workers.
 *
 * Read-only mounts only.  A ring entry stays taken until its request is
 * answered, and a write is answered only once the other views' cached
 * pages are dropped, which waits for the reads in flight over them.  When
 * every entry of a CPU's queue is taken, the kernel queues that CPU's next
 * requests and hands them out only as an entry of the queue is answered
 * (an entry registered later does not take them): reads queued behind
 * writes waiting for those very reads hang the mount.  /dev/fuse has no
 * such tie between a request and a thread.
 */
static void use_io_uring(struct fs *fs)
{
	const char *why;
	int r;

	if (fs->single_thread) {
		log_warn("--io-uring: not with -s: requests stay on /dev/fuse");
		return;
	}
	if (!fs->img->read_only) {
		log_warn("--io-uring: for read-only mounts (-r) only: requests stay on /dev/fuse");
		return;
	}
	if (!fuse_uring_possible(&why)) {
		log_warn("--io-uring: %s: requests stay on /dev/fuse", why);
		return;
	}
	r = fuse_uring_install(fs->se, fs->max_threads);
	if (r < 0)
		log_warn("--io-uring: %s: requests stay on /dev/fuse", strerror(-r));
}

static int serve(struct cli *c, struct fs *fs)
{
	struct fuse_loop_config *cfg;
	int r;

	if (c->single)
		return fuse_session_loop(fs->se);
	cfg = fuse_loop_cfg_create();
	fuse_loop_cfg_set_clone_fd(cfg, 1);
	/* idle workers are kept (starting one per burst costs more than it
	 * holds); the bound is max_threads */
	fuse_loop_cfg_set_idle_threads(cfg, fs->max_threads);
	fuse_loop_cfg_set_max_threads(cfg, fs->max_threads);
	r = fuse_session_loop_mt(fs->se, cfg);
	fuse_loop_cfg_destroy(cfg);
	return r;
}

/* How long shutdown waits for the write replies still queued (fs_stop_deferred). */
#define DEFERRED_STOP_MS 5000

/* Undo mountinfo's octal escapes (\040 for a space) in place. */
static void unescape_mountinfo(char *s)
{
	char *o = s;

	for (; *s; s++) {
		if (s[0] == '\\' && s[1] >= '0' && s[1] <= '3' && s[2] >= '0' && s[2] <= '7' &&
		    s[3] >= '0' && s[3] <= '7') {
			*o++ = (char)(((s[1] - '0') << 6) | ((s[2] - '0') << 3) | (s[3] - '0'));
			s += 3;
		} else {
			*o++ = *s;
		}
	}
	*o = 0;
}

/*
 * End the FUSE connection of our mount, so that requests no worker will
 * answer fail: through fusectl's abort file (the connection's number is
 * the mount's minor, read from /proc/self/mountinfo: stat() on the mount
 * could itself hang now), or, as root, a forced unmount, which aborts too.
 */
static void abort_connection(const char *mountpoint)
{
	FILE *f = fopen("/proc/self/mountinfo", "re");
	char *line = NULL, path[64];
	size_t cap = 0;
	unsigned minor = 0;
	bool found = false;
	int fd;

	while (f && getline(&line, &cap, f) > 0) {
		char *mp = NULL, *sep = strstr(line, " - fuse.");
		unsigned maj, min;

		if (sep && sscanf(line, "%*u %*u %u:%u %*s %ms", &maj, &min, &mp) == 3) {
			unescape_mountinfo(mp);
			if (strcmp(mp, mountpoint) == 0) {
				minor = min; /* the last one: a mount over ours hides it */
				found = true;
			}
		}
		free(mp);
	}
	free(line);
	if (f)
		fclose(f);
	if (found) {
		snprintf(path, sizeof(path), "/sys/fs/fuse/connections/%u/abort", minor);
		fd = open(path, O_WRONLY | O_CLOEXEC);
		if (fd >= 0) {
			bool ok = write(fd, "1", 1) == 1;

			close(fd);
			if (ok)
				return;
		}
	}
	if (umount2(mountpoint, MNT_FORCE) < 0 && errno != EBUSY)
		log_warn("cannot abort the FUSE connection of %s (no fusectl, not root): %s",
			 mountpoint, strerror(errno));
}

/*
 * After an abort, libfuse's unmount sees the dead connection and leaves the
 * mount in place (it takes that for "already unmounted"): detach it, so
 * that no "Transport endpoint is not connected" stays behind.
 */
static void unmount_aborted(const char *mountpoint)
{
	pid_t pid;
	int st;

	if (umount2(mountpoint, MNT_DETACH) == 0 || errno == EINVAL)
		return; /* EINVAL: not mounted any more */
	pid = fork();
	if (pid == 0) {
		execlp("fusermount3", "fusermount3", "-u", "-z", "--", mountpoint, (char *)NULL);
		_exit(127);
	}
	if (pid < 0 || waitpid(pid, &st, 0) != pid || !WIFEXITED(st) || WEXITSTATUS(st))
		log_warn("cannot unmount %s: unmount it with fusermount3 -u", mountpoint);
}

/* Wait until the mount answers (the child serves the stat), or the child dies. */
static int parent_wait(pid_t child, const char *mountpoint, dev_t before)
{
	/* every 1 ms for the first 200 ms (a mount usually answers within a
	 * few), then every 10 ms */
	for (unsigned i = 0;; i++) {
		struct stat st;
		int status;

		if (stat(mountpoint, &st) == 0 && st.st_dev != before)
			return 0;
		if (waitpid(child, &status, WNOHANG) == child)
			return -1;
		usleep(i < 200 ? 1000 : 10000);
	}
}

int main(int argc, char **argv)
{
	struct fuse_args args = FUSE_ARGS_INIT(argc, argv);
	/* static: what it points to lives as long as the process */
	static struct cli c;
	struct fs *fs = &the_fs;
	struct image_opts o = { 0 };
	struct err e = { 0 };
	struct stat mst;
	bool aborted;
	struct view *v;
	pid_t child;
	int r, status = EXIT_OK;

	daemon_tune_malloc();

	/* A daemon keeps no descriptor it did not open: an inherited pipe
	 * (a test runner's, a shell's $(...)) would otherwise stay open as long
	 * as the mount and make its reader wait for us.  fusermount3 hands a
	 * descriptor to the programs it runs in _FUSE_COMMFD: keep that case. */
	if (!getenv("_FUSE_COMMFD"))
		close_range(3, ~0u, 0);

	if (fuse_opt_parse(&args, &c, cli_opts, cli_proc) < 0 || c.bad) {
		fuse_opt_free_args(&args);
		return EXIT_USAGE;
	}
	if (c.help) {
		usage(stdout);
		return EXIT_OK;
	}
	if (c.version) {
		printf("imgfs %s (libfuse %d)\n", PACKAGE_VERSION, fuse_version());
		return EXIT_OK;
	}
	log_set_level(c.verbose >= 2 || c.debug ? LOG_LVL_DEBUG : c.verbose ? LOG_LVL_INFO : LOG_LVL_WARN);
	if (c.list) {
		if (!c.image || c.mountpoint) {
			fprintf(stderr, "imgfs: usage: imgfs --list [--json] IMAGE\n");
			return EXIT_USAGE;
		}
		return do_list(&c);
	}
	if (!c.image || !c.mountpoint) {
		fprintf(stderr, "imgfs: usage: imgfs [OPTIONS] IMAGE MOUNTPOINT (see imgfs --help)\n");
		return EXIT_USAGE;
	}
	if ((c.view != NULL) + (c.partition > 0) + (c.snapshot != NULL) > 1) {
		fprintf(stderr, "imgfs: choose one of --view, -P and -l\n");
		return EXIT_USAGE;
	}
	if (stat(c.mountpoint, &mst) < 0) {
		fprintf(stderr, "imgfs: mountpoint %s: %s\n", c.mountpoint, strerror(errno));
		return EXIT_MOUNT;
	}
	if (!S_ISDIR(mst.st_mode) && !S_ISREG(mst.st_mode)) {
		fprintf(stderr, "imgfs: mountpoint %s: not a directory or a regular file\n", c.mountpoint);
		return EXIT_MOUNT;
	}
	/* absolute: the daemon chdirs to / and must still unmount by this path */
	{
		char *abs = realpath(c.mountpoint, NULL);

		if (!abs) {
			fprintf(stderr, "imgfs: mountpoint %s: %s\n", c.mountpoint, strerror(errno));
			return EXIT_MOUNT;
		}
		free(c.mountpoint);
		c.mountpoint = abs;
	}
	fs->dir_mode = S_ISDIR(mst.st_mode);
	if (fs->dir_mode && (c.view || c.partition > 0 || c.snapshot)) {
		fprintf(stderr, "imgfs: --view, -P and -l choose the view of a file mount; %s is a directory (it shows every view)\n",
			c.mountpoint);
		return EXIT_USAGE;
	}

	o.format = c.format;
	/* a snapshot view is never writable: open the image read-only, so
	 * it takes only qemu's reader locks (as qemu-nbd -l does) */
	o.read_only = c.read_only || c.snapshot ||
		      (c.view && !strncmp(c.view, "snap@", 5));
	o.no_backing = c.no_backing;
	if (c.cache_size && parse_cache_size(c.cache_size, &o.cache_bytes) < 0) {
		fprintf(stderr, "imgfs: --cache-size=%s: not a size (bytes, or a number with K, M or G)\n",
			c.cache_size);
		return EXIT_USAGE;
	}
	if (c.max_threads > 1024) {
		fprintf(stderr, "imgfs: --max-threads=%u: at most 1024\n", c.max_threads);
		return EXIT_USAGE;
	}
	if (stat(c.image, &fs->image_st) < 0) {
		fprintf(stderr, "imgfs: %s: %s\n", c.image, strerror(errno));
		return EXIT_IMAGE;
	}
	if (image_open(c.image, &o, &fs->img, &e) < 0) {
		fprintf(stderr, "imgfs: %s\n", e.msg);
		return EXIT_IMAGE;
	}
	if (!fs->dir_mode) {
		v = image_pick_view(fs->img, c.view, c.partition, c.snapshot, &e);
		if (!v) {
			fprintf(stderr, "imgfs: %s\n", e.msg);
			image_close(fs->img);
			return EXIT_USAGE;
		}
		fs->file_view = g_strdup(v->name);
	}
	fs->single_thread = c.single;
	fs->cached_writes = c.cached_writes;
	fs->max_threads = c.max_threads ? c.max_threads : default_max_threads();
	/* splice read replies from the image file (fs-ops.c op_read), in
	 * requests cut to FS_SPLICE_MAX_READ so a reply fits a worker's pipe;
	 * a max_read of the user's own is kept (replies past it are copied) */
	fs->splice = !c.no_splice && !fs->single_thread && splice_fits(fs->max_threads);
	fs->max_read = c.max_read;
	if (fs->splice && !c.max_read) {
		char *mr = g_strdup_printf("-omax_read=%u", FS_SPLICE_MAX_READ);

		fuse_opt_add_arg(&args, mr);
		g_free(mr);
		fs->max_read = FS_SPLICE_MAX_READ;
	}
	fs_init_nodes(fs);

	/* -r: the kernel mount is read-only too, as with -o ro (findmnt shows it) */
	if (c.read_only)
		fuse_opt_add_arg(&args, "-oro");
	if (!fuse_opt_add_arg(&args, "-o") && !fuse_opt_add_arg(&args, "default_permissions")) {
		char *fsname = g_strdup_printf("-ofsname=%s", fs->img->path);
		/* commas in a path would split the option: fsname is cosmetic;
		 * the user's own fsname= or subtype= wins (the last one would) */
		if (!strchr(fs->img->path, ',') && !c.own_fsname)
			fuse_opt_add_arg(&args, fsname);
		if (!c.own_subtype)
			fuse_opt_add_arg(&args, "-osubtype=imgfs");
		g_free(fsname);
	}
	fs->se = fuse_session_new(&args, &fs_ops, sizeof(fs_ops), fs);
	fuse_opt_free_args(&args);
	if (!fs->se) {
		/* libfuse has printed which option it did not know */
		fprintf(stderr, "imgfs: cannot set up the FUSE session (bad -o option?)\n");
		image_close(fs->img);
		return EXIT_USAGE;
	}
	if (fuse_session_mount(fs->se, c.mountpoint) != 0) {
		fprintf(stderr, "imgfs: cannot mount on %s\n", c.mountpoint);
		fuse_session_destroy(fs->se);
		image_close(fs->img);
		return EXIT_MOUNT;
	}
	tune_readahead(c.mountpoint);
	if (c.io_uring)
		use_io_uring(fs);

	if (!c.foreground) {
		fflush(NULL);
		child = fork();
		if (child < 0) {
			fprintf(stderr, "imgfs: fork: %s\n", strerror(errno));
			fuse_session_unmount(fs->se);
			return EXIT_MOUNT;
		}
		if (child > 0) {
			if (parent_wait(child, c.mountpoint, mst.st_dev) < 0) {
				fprintf(stderr, "imgfs: the daemon exited before the mount answered\n");
				fuse_session_unmount(fs->se);
				_exit(EXIT_MOUNT);
			}
			_exit(EXIT_OK);
		}
		setsid();
	}
	if (c.pid_file && (r = daemon_write_pid_file(c.pid_file)) < 0)
		log_warn("cannot write pid file %s: %s", c.pid_file, strerror(-r));
	if (install_signals(fs->se) != 0)
		log_warn("cannot install signal handlers");
	fs_start_deferred(fs);
	fs->observer = image_add_observer(fs->img, fs_on_disk_write, fs);
	control_socket_path(&fs->control_path);
	fs->control = nbd_control_start(fs->img, fs->control_path, &e);
	if (!fs->control) {
		log_warn("NBD control socket %s: %s (imgfs-nbd on this mount will not work)",
			 fs->control_path, e.msg);
		g_free(fs->control_path);
		fs->control_path = NULL;
	}
	if (!c.foreground) {
		log_use_syslog(syslog_ident(fs->img->path));
		daemon_detach_stdio();
		if (chdir("/") < 0)
			log_warn("chdir /: %s", strerror(errno));
	}
	log_info("%s mounted on %s", fs->img->path, c.mountpoint);

	serve(&c, fs);
	/* however the loop ended — unmount, SIGTERM, SIGINT — end the same way */
	fuse_remove_signal_handlers(fs->se);
	aborted = !fs_stop_deferred(fs, DEFERRED_STOP_MS);
	if (aborted) {
		log_warn("write replies wait for reads that no worker will answer any more: "
			 "aborting the FUSE connection of %s", c.mountpoint);
		abort_connection(c.mountpoint);
		fs_join_deferred(fs);
	}
	if (fs->control)
		nbd_control_stop(fs->control);
	image_remove_observer(fs->img, fs->observer);
	if (c.io_uring)
		fuse_uring_stop();
	fuse_session_unmount(fs->se);
	if (aborted)
		unmount_aborted(c.mountpoint);
	fuse_session_destroy(fs->se);
	fs->se = NULL;
	if (image_close(fs->img) < 0) {
		log_err("flushing %s on close failed", c.image);
		status = EXIT_RUNTIME;
	}
	fs_free_nodes(fs);
	if (c.pid_file)
		unlink(c.pid_file);
	if (fs->control_path)
		unlink(fs->control_path);
	return status;
}
