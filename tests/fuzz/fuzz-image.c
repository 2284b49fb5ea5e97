/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * libFuzzer harness for opening an image: the input is an image file (qcow2,
 * or anything else, which is probed as raw).  It is opened read-only the way
 * imgfs opens it (image_open: probe, qcow2 header, extensions, L1, snapshot
 * table, partition tables, snapshot views), then every view is walked with
 * block status and read, within a budget so each input stays cheap:
 *
 *  - at most WALK_CALLS block-status calls and READ_BUDGET bytes read per
 *    view, reads in small and odd-sized pieces (partial compressed clusters
 *    go through the decompressed-cluster cache, whole ones straight into the
 *    buffer);
 *  - the view's first and last bytes are always read, wherever the walk ends.
 *
 * Invariants checked (abort() is a finding): a block-status run is never 0
 * nor longer than asked; a range it calls ZERO reads as zeroes when the read
 * succeeds; bdev_map of a range that read fine names exactly the bytes read
 * (the zero-copy paths send those).  Errors (-EIO for damage) are fine: they are the point.
 *
 * Nothing from the input may name a host file.  Backing files are not
 * opened (no_backing: unallocated reads as zeroes).  An external data file
 * is opened by name, so an input whose data-file extension names anything
 * but a plain file name in the harness's own directory is skipped; the
 * directory holds a 64 KiB file "data" for those that name it.
 *
 * Build and run: tools/fuzz image [SECONDS]   (replay: tests/fuzz/replay.c)
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "bdev.h"
#include "image.h"
#include "util.h"

#define WALK_CALLS   512
#define READ_BUDGET  (2u << 20)
#define CHUNK        (64u << 10)
#define MAX_DIR_SCAN (2u << 20)
#define QCOW2_EXT_DATA_FILE 0x44415441u

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerInitialize(int *argc, char ***argv);

static char dir[64], img_path[96];
static uint8_t *buf, *map_buf;
static pid_t owner;

static void cleanup(void)
{
	char data_path[96];

	if (getpid() != owner) /* a forked replay child: the parent cleans up */
		return;
	snprintf(data_path, sizeof(data_path), "%s/data", dir);
	unlink(img_path);
	unlink(data_path);
	rmdir(dir);
	free(buf);
	free(map_buf);
}

static void setup(void)
{
	char data_path[96];
	uint8_t pat[4096];
	int fd;

	if (dir[0])
		return;
	log_set_level(getenv("FUZZ_VERBOSE") ? LOG_LVL_DEBUG : LOG_LVL_ERR);
	snprintf(dir, sizeof(dir), "%s/fuzz-image-XXXXXX",
		 getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp");
	if (strlen(dir) > 40)
		snprintf(dir, sizeof(dir), "/tmp/fuzz-image-XXXXXX");
	if (!mkdtemp(dir))
		abort();
	snprintf(img_path, sizeof(img_path), "%s/img", dir);
	snprintf(data_path, sizeof(data_path), "%s/data", dir);
	for (unsigned i = 0; i < sizeof(pat); i++)
		pat[i] = (uint8_t)(i * 7 + 1);
	fd = open(data_path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
	if (fd < 0)
		abort();
	for (int i = 0; i < 16; i++)
		if (write(fd, pat, sizeof(pat)) != (ssize_t)sizeof(pat))
			abort();
	close(fd);
	buf = malloc(CHUNK);
	map_buf = malloc(CHUNK);
	if (!buf || !map_buf)
		abort();
	owner = getpid();
	atexit(cleanup);
}

/* Does a data-file extension anywhere in cluster 0 name something outside
 * our directory?  Conservative: a "DATA" magic at any byte counts (the
 * extensions start at header_length, which need not be 8-aligned). */
static bool names_host_file(const uint8_t *data, size_t size)
{
	size_t end = MIN(size, MAX_DIR_SCAN);

	for (size_t off = 0; off + 8 <= end; off++) {
		uint32_t len;
		const uint8_t *name;

		if (be32(data + off) != QCOW2_EXT_DATA_FILE)
			continue;
		len = be32(data + off + 4);
		name = data + off + 8;
		if (len > end - off - 8)
			len = (uint32_t)(end - off - 8);
		if (len == 0)
			continue;
		if (memchr(name, '/', len) || (len >= 2 && name[0] == '.' && name[1] == '.') ||
		    (len == 1 && name[0] == '.'))
			return true;
	}
	return false;
}

static int write_image(const uint8_t *data, size_t size)
{
	int fd = open(img_path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
	size_t off = 0;

	if (fd < 0)
		return -1;
	while (off < size) {
		ssize_t n = write(fd, data + off, size - off);

		if (n <= 0) {
			close(fd);
			return -1;
		}
		off += (size_t)n;
	}
	close(fd);
	return 0;
}

/* bdev_map of a range that read as buf[0, n): the extents must name those
 * same bytes, and cover exactly what it says it mapped. */
static void check_map(struct bdev *d, uint64_t off, size_t n)
{
	struct bdev_extent ext[16];
	struct bdev_extents x = { .ext = ext, .max = 16 };
	int64_t m = bdev_map(d, off, n, &x);
	uint64_t got = 0;

	if (m < 0) {
		bdev_extents_release(&x);
		return; /* an error is fine; a wrong mapping is not */
	}
	if ((uint64_t)m > n)
		goto bad;
	for (unsigned i = 0; i < x.n; i++) {
		if (got + ext[i].len > (uint64_t)m)
			goto bad;
		if (ext[i].fd < 0) {
			if (!buf_is_zero(buf + got, ext[i].len))
				goto bad;
		} else {
			ssize_t r = pread(ext[i].fd, map_buf, ext[i].len, (off_t)ext[i].pos);

			if (r != (ssize_t)ext[i].len || memcmp(map_buf, buf + got, ext[i].len))
				goto bad;
		}
		got += ext[i].len;
	}
	if (got == (uint64_t)m) {
		bdev_extents_release(&x);
		return;
	}
bad:
	fprintf(stderr, "%s: bdev_map at %llu+%zu says %lld bytes in %u extents, not what pread read\n",
		d->kind, (unsigned long long)off, n, (long long)m, x.n);
	abort();
}

/* bdev_pread_nowait of a range that read as buf[0, n): -EAGAIN, or the
 * same bytes (right after the read, most of it is in memory). */
static void check_nowait(struct bdev *d, uint64_t off, size_t n)
{
	if (bdev_pread_nowait(d, map_buf, n, off) == 0 && memcmp(map_buf, buf, n)) {
		fprintf(stderr, "%s: bdev_pread_nowait at %llu+%zu reads other bytes than bdev_pread\n",
			d->kind, (unsigned long long)off, n);
		abort();
	}
}

/* Read [off, off+len) in pieces of step bytes (step <= CHUNK), checking
 * ZERO runs read as zeroes and that bdev_map names the bytes read; *budget
 * bounds the bytes read. */
static void read_range(struct bdev *d, uint64_t off, uint64_t len, size_t step,
		       bool want_zero, uint64_t *budget)
{
	while (len && *budget) {
		size_t n = (size_t)MIN(MIN(len, step), *budget);

		if (bdev_pread(d, buf, n, off) == 0) {
			if (want_zero && !buf_is_zero(buf, n)) {
				fprintf(stderr, "%s: block status says zero at %llu+%zu but it reads data\n",
					d->kind, (unsigned long long)off, n);
				abort();
			}
			check_map(d, off, n);
			check_nowait(d, off, n);
		}
		off += n;
		len -= n;
		*budget -= n;
	}
}

static void walk_view(struct view *v)
{
	struct bdev *d = v->dev;
	uint64_t size = d->size, off = 0, budget = READ_BUDGET;
	unsigned calls = 0;

	/* the edges, whatever the walk does */
	read_range(d, 0, MIN(size, 4096), 4096, false, &budget);
	if (size > 4096)
		read_range(d, size - MIN(size, 4096), MIN(size, 4096), 1536, false, &budget);
	/* an unaligned read across the first clusters */
	if (size > 1024)
		read_range(d, 513, MIN(size - 513, 3 * 65536), 65536 - 512, false, &budget);

	while (off < size && calls < WALK_CALLS && budget) {
		uint64_t want = size - off, run = 0;
		unsigned status = 0, depth = 0;
		size_t step;

		calls++;
		if (bdev_block_status(d, off, want, &run, &status, &depth) < 0) {
			/* damaged: the next cluster may be fine */
			run = MIN(want, 65536 - (off & 65535));
			read_range(d, off, MIN(run, 4096), 4096, false, &budget);
			off += run;
			continue;
		}
		if (run == 0 || run > want) {
			fprintf(stderr, "%s: block status at %llu for %llu returned a run of %llu\n",
				d->kind, (unsigned long long)off, (unsigned long long)want,
				(unsigned long long)run);
			abort();
		}
		/* vary the piece size: small reads of compressed clusters hit
		 * the decompressed-cluster cache, large ones decompress directly */
		step = (calls & 1) ? 4096 + 512 : CHUNK;
		read_range(d, off, MIN(run, 256u << 10), step, status & BDEV_ST_ZERO, &budget);
		off += run;
	}
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
	setup();
	return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct image_opts opts = {
		.read_only = true, .no_backing = true, .force_share = true,
		.cache_bytes = 1u << 20,
	};
	struct view **views;
	struct image *img;
	struct err e = { 0 };
	unsigned n;

	setup();
	if (names_host_file(data, size))
		return 0;
	if (write_image(data, size) < 0)
		abort();
	if (image_open(img_path, &opts, &img, &e) < 0) {
		/* a refusal must say why, in one line */
		if (!e.msg[0] || strchr(e.msg, '\n')) {
			fprintf(stderr, "refused with a bad message: '%s'\n", e.msg);
			abort();
		}
		return 0;
	}
	n = image_list_views(img, &views, NULL);
	for (unsigned i = 0; i < n; i++)
		walk_view(views[i]);
	free(views);
	image_close(img);
	return 0;
}
