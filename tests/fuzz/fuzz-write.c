/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * libFuzzer harness for the qcow2 write path, differential against a model:
 * a byte array holding what the disk must read as.  The input is
 *
 *     LE32 n | n bytes: an image file | ops, OP_SIZE bytes each
 *
 * (make-write-seeds builds seeds from real qemu-img images).  The image is
 * opened writable the way imgfs opens it (image_open, no_backing, a small
 * metadata cache so L2 slices are written back under eviction), the whole
 * disk view read into the model, and up to MAX_OPS ops applied to the
 * disk's bdev: writes (odd offsets and lengths up to 256 KiB, a pattern
 * derived from the op; FUA or not), write-zeroes (with and without
 * BDEV_MAY_UNMAP), discard (reads back as zeroes), flush.  Snapshot views
 * are read too: writes must copy-on-write around them.
 *
 * The model knows a byte when the initial read of it succeeded or an op
 * that wrote it succeeded; a failed op makes its own range unknown.
 *
 * The image is healthy when every byte of the disk read at the start and
 * its refcounts held (below).  Only then is the model exact: a refcount
 * too low lets the allocator hand out a cluster still in use, so on a
 * damaged image anything may read back; there, only crashes, the
 * sanitizers and bdev_map are checked.
 *
 * Invariants checked on a healthy image (abort() is a finding):
 *  - an op fails only once the engine has set the corrupt bit (the
 *    overlap check found metadata where data was to go: hostile layouts
 *    the open allowed, such as an L2 entry naming the L1 table); after
 *    that, no content is checked (what is durable is not known);
 *  - after every op that succeeded, its range reads back as the model;
 *  - at the end, before and after image_close and a fresh read-only
 *    open of the same file, every known byte of the disk reads as the
 *    model and every snapshot view as it did at the start (writes must
 *    copy-on-write around shared clusters);
 *  - the reopened image is neither dirty nor corrupt, no cluster is
 *    referenced (header, L1 and L2 tables, data, compressed bytes,
 *    snapshot table and L1s, refcount table and blocks) more times than
 *    its refcount says, and an active L1 or L2 entry with the COPIED flag
 *    names a cluster of refcount exactly 1.  A leak (refcount too high)
 *    is fine.
 * On any image: bdev_map of a range that read fine names exactly the
 * bytes read (the zero-copy paths send those).
 *
 * Nothing from the input may name a host file: backing files are not
 * opened (an image with a backing file is then read-only: skipped), and an
 * input with a data-file extension naming anything but a plain name in
 * the harness's own directory is skipped, as is any image that opens with
 * an external data file (there is none to write to).
 *
 * Build and run: tools/fuzz write [SECONDS]   (replay: tests/fuzz/replay.c)
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "bdev.h"
#include "image.h"
#include "qcow2-write.h"
#include "util.h"

#define MAX_DISK     (8u << 20)   /* bigger virtual disks are skipped */
#define MAX_OP_LEN   (256u << 10)
#define MAX_OPS      64
#define OP_SIZE      9
#define MAX_SNAPS    4
#define CHUNK        (64u << 10)
#define MAX_DIR_SCAN (2u << 20)

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerInitialize(int *argc, char ***argv);

/* what the disk must read as; known[i]: byte i is known */
struct model {
	uint8_t *bytes, *known;
	uint64_t size;
};

static char dir[64], img_path[96];
static uint8_t *buf, *map_buf, *op_buf;
static struct model disk, snaps[MAX_SNAPS];
static pid_t owner;

#define FAIL(...) do { fprintf(stderr, __VA_ARGS__); fputc('\n', stderr); abort(); } while (0)

static void cleanup(void)
{
	if (getpid() != owner) /* a forked replay child: the parent cleans up */
		return;
	unlink(img_path);
	rmdir(dir);
	free(buf);
	free(map_buf);
	free(op_buf);
	for (unsigned i = 0; i < MAX_SNAPS; i++) {
		free(snaps[i].bytes);
		free(snaps[i].known);
	}
	free(disk.bytes);
	free(disk.known);
}

static void model_alloc(struct model *m)
{
	m->bytes = malloc(MAX_DISK);
	m->known = malloc(MAX_DISK);
	if (!m->bytes || !m->known)
		abort();
}

static void setup(void)
{
	if (dir[0])
		return;
	log_set_level(getenv("FUZZ_VERBOSE") ? LOG_LVL_DEBUG : LOG_LVL_ERR);
	snprintf(dir, sizeof(dir), "%s/fuzz-write-XXXXXX",
		 getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp");
	if (strlen(dir) > 40)
		snprintf(dir, sizeof(dir), "/tmp/fuzz-write-XXXXXX");
	if (!mkdtemp(dir))
		abort();
	snprintf(img_path, sizeof(img_path), "%s/img", dir);
	buf = malloc(CHUNK);
	map_buf = malloc(CHUNK);
	op_buf = malloc(MAX_OP_LEN);
	if (!buf || !map_buf || !op_buf)
		abort();
	model_alloc(&disk);
	for (unsigned i = 0; i < MAX_SNAPS; i++)
		model_alloc(&snaps[i]);
	owner = getpid();
	atexit(cleanup);
}

/* Does a data-file extension anywhere in the image name something outside
 * our directory?  Conservative: a "DATA" magic at any byte counts. */
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
	FAIL("%s: bdev_map at %llu+%zu says %lld bytes in %u extents, not what pread read",
	     d->kind, (unsigned long long)off, n, (long long)m, x.n);
}

/* Compare buf[0, n), read at off, with the model; what names the moment. */
static void expect(const struct model *m, uint64_t off, size_t n, const char *what)
{
	for (size_t i = 0; i < n; i++)
		if (m->known[off + i] && m->bytes[off + i] != buf[i])
			FAIL("%s: byte %llu reads 0x%02x, the model says 0x%02x",
			     what, (unsigned long long)(off + i), buf[i], m->bytes[off + i]);
}

/*
 * Read [off, off + len) of d in CHUNK pieces; a piece that fails is read
 * again sector by sector.  learn: fill the model (a sector that fails is
 * unknown; returns false if any did).  Else, when strict, check against
 * the model: a byte that reads otherwise, or a sector that fails while it
 * holds a known byte, is a finding.  bdev_map is checked in any case.
 */
static bool read_span(struct bdev *d, struct model *m, uint64_t off, uint64_t len,
		      bool learn, bool strict, const char *what)
{
	bool all = true;

	while (len) {
		size_t n = (size_t)MIN(len, CHUNK);

		if (bdev_pread(d, buf, n, off) == 0) {
			check_map(d, off, n);
			if (learn) {
				memcpy(m->bytes + off, buf, n);
				memset(m->known + off, 1, n);
			} else if (strict) {
				expect(m, off, n, what);
			}
		} else {
			for (size_t p = 0; p < n;) {
				size_t k = MIN(n - p, 512 - ((off + p) & 511));
				bool ok = bdev_pread(d, buf, k, off + p) == 0;

				if (learn) {
					if (ok)
						memcpy(m->bytes + off + p, buf, k);
					memset(m->known + off + p, ok, k);
					all &= ok;
				} else if (ok && strict) {
					expect(m, off + p, k, what);
				} else if (strict && memchr(m->known + off + p, 1, k)) {
					FAIL("%s: bytes %llu+%zu were known but do not read",
					     what, (unsigned long long)(off + p), k);
				}
				p += k;
			}
		}
		off += n;
		len -= n;
	}
	return all;
}

/* ---- refcounts, counted from the tables (§ "Host cluster management") ---- */

struct refs {
	struct qcow2 *s;
	uint32_t *n;      /* references per host cluster */
	uint64_t count;   /* clusters in the file */
	bool bad;         /* a reference past the file, or an unreadable table */
	bool strict;      /* bad is a finding */
};

static void ref_range(struct refs *rf, uint64_t off, uint64_t len)
{
	unsigned bits = rf->s->cluster_bits;

	if (!len)
		return;
	if (off + len < off || ((off + len - 1) >> bits) >= rf->count) {
		rf->bad = true;
		return;
	}
	for (uint64_t c = off >> bits; c <= (off + len - 1) >> bits; c++)
		rf->n[c]++;
}

/* A COPIED flag promises refcount 1 (§ "Cluster mapping"): the write path
 * then writes in place, so on a shared cluster it would change a snapshot. */
static void copied(struct refs *rf, const uint64_t *rc, uint64_t host, const char *what,
		   uint64_t where)
{
	uint64_t c = host >> rf->s->cluster_bits;

	if (c >= rf->count || rc[c] == 1)
		return;
	if (rf->strict)
		FAIL("%s at 0x%llx: cluster 0x%llx has COPIED but refcount %llu", what,
		     (unsigned long long)where, (unsigned long long)host,
		     (unsigned long long)rc[c]);
	rf->bad = true;
}

/* The L2 tables under l1 and the clusters they name; active (the active
 * L1): also the COPIED flags, against rc. */
static void ref_tree(struct refs *rf, const uint64_t *l1, uint32_t l1_size,
		     const uint64_t *rc, bool active)
{
	struct qcow2 *s = rf->s;
	uint8_t *l2 = malloc(s->cluster_size);
	uint64_t per = s->cluster_size / s->l2_entry_size;

	if (!l2)
		abort();
	for (uint32_t i = 0; i < l1_size && !rf->bad; i++) {
		uint64_t l2_off = l1[i] & QCOW2_OFFSET_MASK;

		if (!l2_off)
			continue;
		ref_range(rf, l2_off, s->cluster_size);
		if (rf->bad || bdev_pread(s->file, l2, s->cluster_size, l2_off) < 0) {
			rf->bad = true;
			break;
		}
		if (active && (l1[i] & QCOW2_OFLAG_COPIED))
			copied(rf, rc, l2_off, "L1 entry", s->l1.offset + i * 8);
		for (uint64_t j = 0; j < per; j++) {
			uint64_t ent = be64(l2 + j * s->l2_entry_size), host;

			if (ent & QCOW2_OFLAG_COMPRESSED) {
				uint64_t coff, csize;

				qcow2_compressed_decode(s->cluster_bits, ent, &coff, &csize);
				ref_range(rf, coff, csize);
				continue;
			}
			host = ent & QCOW2_OFFSET_MASK;
			if (!host)
				continue;
			ref_range(rf, host, s->cluster_size);
			if (active && (ent & QCOW2_OFLAG_COPIED))
				copied(rf, rc, host, "L2 entry", l2_off + j * s->l2_entry_size);
		}
	}
	free(l2);
}

/* Every cluster's refcount, read from the refcount table and blocks; NULL
 * when they cannot be read (damage). */
static uint64_t *load_refcounts(struct qcow2 *s, uint64_t count)
{
	uint64_t rt_bytes = (uint64_t)s->refcount_table_clusters << s->cluster_bits;
	uint64_t per = (s->cluster_size * 8) >> s->refcount_order;
	uint64_t *rc = calloc(count ? count : 1, sizeof(*rc));
	uint8_t *rt = malloc(rt_bytes ? rt_bytes : 1), *rb = malloc(s->cluster_size);

	if (!rc || !rt || !rb)
		abort();
	if (bdev_pread(s->file, rt, rt_bytes, s->refcount_table_offset) < 0)
		goto bad;
	for (uint64_t i = 0; i < rt_bytes / 8 && i * per < count; i++) {
		uint64_t rb_off = be64(rt + i * 8) & ~511ull;

		if (!rb_off)
			continue;
		if (rb_off & (s->cluster_size - 1) ||
		    bdev_pread(s->file, rb, s->cluster_size, rb_off) < 0)
			goto bad;
		for (uint64_t j = 0; j < per && i * per + j < count; j++)
			rc[i * per + j] = qcow2_rc_entry_get(rb, s->refcount_order, j);
	}
	free(rt);
	free(rb);
	return rc;
bad:
	free(rc);
	free(rt);
	free(rb);
	return NULL;
}

/*
 * Do the refcounts cover every reference?  false when they do not, or the
 * tables cannot be walked.  strict: a reference the refcount does not
 * cover is a finding (the image held at the start), as is a COPIED flag
 * on a shared cluster.
 */
static bool refs_hold(struct qcow2 *s, bool strict)
{
	struct refs rf = { .s = s, .strict = strict };
	uint64_t *rc;
	bool ok;

	rf.count = align_up(qcow2_file_size(s->file), s->cluster_size) >> s->cluster_bits;
	rf.n = calloc(rf.count ? rf.count : 1, sizeof(*rf.n));
	if (!rf.n)
		abort();
	rc = load_refcounts(s, rf.count);
	if (!rc) {
		if (strict)
			FAIL("the refcount table or a refcount block no longer reads");
		free(rf.n);
		return false;
	}
	ref_range(&rf, 0, s->cluster_size);
	ref_range(&rf, s->l1.offset, (uint64_t)s->l1.size * 8);
	ref_tree(&rf, s->l1.table, s->l1.size, rc, true);
	for (unsigned i = 0; i < s->nsnaps && !rf.bad; i++) {
		struct qcow2_l1 l1 = {
			.offset = s->snaps[i].l1_offset, .size = s->snaps[i].l1_size,
			.what = "snapshot L1 table",
		};
		struct err e = { 0 };

		if (qcow2_check_l1(s, l1.offset, l1.size, l1.what, &e) < 0 ||
		    qcow2_load_l1(s, &l1, &e) < 0) {
			rf.bad = true;
			free(l1.table);
			break;
		}
		ref_range(&rf, l1.offset, (uint64_t)l1.size * 8);
		ref_tree(&rf, l1.table, l1.size, rc, false);
		free(l1.table);
	}
	if (s->nsnaps)
		ref_range(&rf, s->snapshots_offset, s->snapshots_size);
	ref_range(&rf, s->refcount_table_offset,
		  (uint64_t)s->refcount_table_clusters << s->cluster_bits);
	/* the refcount blocks: counted from the table load_refcounts read */
	{
		uint64_t rt_bytes = (uint64_t)s->refcount_table_clusters << s->cluster_bits;
		uint8_t *rt = malloc(rt_bytes ? rt_bytes : 1);

		if (!rt)
			abort();
		if (bdev_pread(s->file, rt, rt_bytes, s->refcount_table_offset) < 0)
			rf.bad = true;
		for (uint64_t i = 0; !rf.bad && i < rt_bytes / 8; i++) {
			uint64_t rb_off = be64(rt + i * 8) & ~511ull;

			if (rb_off)
				ref_range(&rf, rb_off, s->cluster_size);
		}
		free(rt);
	}
	if (rf.bad && strict)
		FAIL("a table names a cluster past the end of the file, or does not read");
	ok = !rf.bad;
	for (uint64_t c = 0; ok && c < rf.count; c++) {
		if (rf.n[c] <= rc[c])
			continue;
		if (strict)
			FAIL("host cluster %llu (offset 0x%llx) is referenced %u times, its refcount is %llu",
			     (unsigned long long)c, (unsigned long long)(c << s->cluster_bits),
			     rf.n[c], (unsigned long long)rc[c]);
		ok = false;
	}
	free(rc);
	free(rf.n);
	return ok;
}

/* ---- the ops -------------------------------------------------------------- */

enum { OP_WRITE, OP_WRITE_FUA, OP_ZERO, OP_ZERO_UNMAP, OP_ZERO_FUA, OP_DISCARD,
       OP_FLUSH, OP_KINDS };

struct op {
	unsigned kind;
	uint64_t off, len;
	uint8_t seed;
};

/* op: kind, LE32 offset (modulo the disk size), LE24 length (bounded by
 * MAX_OP_LEN and the disk's end), pattern seed.  A seed of 0 writes zeroes
 * through pwrite (the data path, not the zero flag). */
static struct op decode_op(const uint8_t *p, uint64_t size)
{
	struct op o;
	uint32_t len = p[5] | p[6] << 8 | (uint32_t)p[7] << 16;

	o.kind = p[0] % OP_KINDS;
	o.off = (p[1] | p[2] << 8 | p[3] << 16 | (uint32_t)p[4] << 24) % size;
	o.len = MIN(len % (MAX_OP_LEN + 1), size - o.off);
	if (!o.len)
		o.len = 1;
	o.seed = p[8];
	return o;
}

/* The bytes a write of op puts at disk offset pos: a function of the op
 * and the position, so a byte that lands in the wrong place shows. */
static uint8_t pattern(const struct op *o, uint64_t pos)
{
	if (!o->seed)
		return 0;
	return (uint8_t)(o->seed + pos * 131 + (pos >> 9) * 7);
}

static int apply(struct bdev *d, const struct op *o)
{
	switch (o->kind) {
	case OP_WRITE:
	case OP_WRITE_FUA:
		for (uint64_t i = 0; i < o->len; i++)
			op_buf[i] = pattern(o, o->off + i);
		return bdev_pwrite(d, op_buf, o->len, o->off,
				   o->kind == OP_WRITE_FUA ? BDEV_FUA : 0);
	case OP_ZERO:
		return bdev_zero(d, o->off, o->len, 0);
	case OP_ZERO_UNMAP:
		return bdev_zero(d, o->off, o->len, BDEV_MAY_UNMAP);
	case OP_ZERO_FUA:
		return bdev_zero(d, o->off, o->len, BDEV_MAY_UNMAP | BDEV_FUA);
	case OP_DISCARD:
		return bdev_discard(d, o->off, o->len);
	default:
		return bdev_flush(d);
	}
}

static void model_apply(const struct op *o, bool ok)
{
	if (o->kind == OP_FLUSH)
		return;
	memset(disk.known + o->off, ok, o->len);
	if (!ok)
		return;
	if (o->kind == OP_WRITE || o->kind == OP_WRITE_FUA)
		memcpy(disk.bytes + o->off, op_buf, o->len);
	else
		memset(disk.bytes + o->off, 0, o->len);
}

static const char *const op_names[OP_KINDS] = {
	"write", "write FUA", "zero", "zero may-unmap", "zero may-unmap FUA",
	"discard", "flush",
};

/* Snapshot views (not slices of disk), the first MAX_SNAPS of them. */
static unsigned snapshot_views(struct image *img, struct view **out)
{
	struct view **views;
	unsigned n = image_list_views(img, &views, NULL), k = 0;

	for (unsigned i = 0; i < n && k < MAX_SNAPS; i++)
		if (views[i]->kind == VIEW_SNAPSHOT && views[i]->dev->size <= MAX_DISK)
			out[k++] = views[i];
	free(views);
	return k;
}

/* Every known byte of the disk and of the snapshots reads as the model. */
static void check_all(struct image *img, unsigned nsnaps, const char *what)
{
	struct view *sv[MAX_SNAPS];
	unsigned k = snapshot_views(img, sv);

	read_span(img->disk, &disk, 0, disk.size, false, true, what);
	if (k != nsnaps)
		FAIL("%s: %u snapshot views, there were %u", what, k, nsnaps);
	for (unsigned i = 0; i < k; i++) {
		if (sv[i]->dev->size != snaps[i].size)
			FAIL("%s: snapshot view %s changed size", what, sv[i]->name);
		read_span(sv[i]->dev, &snaps[i], 0, snaps[i].size, false, true, what);
	}
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
	setup();
	return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct image_opts opts = { .no_backing = true, .cache_bytes = 16u << 10 };
	struct image_opts ro = {
		.read_only = true, .no_backing = true, .force_share = true,
	};
	struct view *sv[MAX_SNAPS];
	struct image *img;
	struct qcow2 *s;
	struct err e = { 0 };
	const uint8_t *ops;
	size_t img_len, nops;
	unsigned nsnaps;
	bool healthy, corrupt;

	setup();
	if (size < 4)
		return 0;
	img_len = MIN(data[0] | data[1] << 8 | data[2] << 16 | (size_t)data[3] << 24, size - 4);
	ops = data + 4 + img_len;
	nops = MIN((size - 4 - img_len) / OP_SIZE, MAX_OPS);
	if (names_host_file(data + 4, img_len))
		return 0;
	if (write_image(data + 4, img_len) < 0)
		abort();
	if (image_open(img_path, &opts, &img, &e) < 0)
		return 0;
	s = qcow2_state(img->top);
	if (!s || !s->w || s->data_file || img->disk->read_only ||
	    !img->disk->size || img->disk->size > MAX_DISK) {
		image_close(img);
		return 0;
	}

	/* the start: what the disk and the snapshots read as */
	disk.size = img->disk->size;
	healthy = read_span(img->disk, &disk, 0, disk.size, true, false, NULL);
	nsnaps = snapshot_views(img, sv);
	for (unsigned i = 0; i < nsnaps; i++) {
		snaps[i].size = sv[i]->dev->size;
		read_span(sv[i]->dev, &snaps[i], 0, snaps[i].size, true, false, NULL);
	}
	if (!healthy && getenv("FUZZ_VERBOSE"))
		fprintf(stderr, "fuzz-write: some of the disk does not read\n");
	if (!refs_hold(s, false)) {
		healthy = false;
		if (getenv("FUZZ_VERBOSE"))
			fprintf(stderr, "fuzz-write: the refcounts do not cover every reference\n");
	}

	for (size_t i = 0; i < nops; i++) {
		struct op o = decode_op(ops + i * OP_SIZE, disk.size);
		int r = apply(img->disk, &o);

		if (r < 0 && healthy && !atomic_load(&s->w->corrupt))
			FAIL("op %zu: %s at %llu+%llu failed on a healthy image: %s", i,
			     op_names[o.kind], (unsigned long long)o.off,
			     (unsigned long long)o.len, strerror(-r));
		model_apply(&o, r == 0);
		if (r == 0 && o.kind != OP_FLUSH) {
			char what[80];

			snprintf(what, sizeof(what), "after op %zu (%s at %llu+%llu)", i,
				 op_names[o.kind], (unsigned long long)o.off,
				 (unsigned long long)o.len);
			read_span(img->disk, &disk, o.off, o.len, false, healthy, what);
		}
	}

	/* the end: in memory, then what reached the file.  Not on a damaged
	 * image (a refcount too low lets the allocator hand out a cluster
	 * still in use), nor once the corrupt bit is set (what is durable is
	 * not known). */
	corrupt = atomic_load(&s->w->corrupt);
	if (getenv("FUZZ_VERBOSE"))
		fprintf(stderr, "fuzz-write: %s image, %zu ops%s\n", healthy ? "healthy" : "damaged",
			nops, corrupt ? ", corrupt bit set" : "");
	if (!healthy || corrupt) {
		image_close(img);
		return 0;
	}
	check_all(img, nsnaps, "before close");
	/* every op succeeded (a failure without the corrupt bit aborted) */
	if (image_close(img) < 0)
		FAIL("image_close failed after every op succeeded");
	if (image_open(img_path, &ro, &img, &e) < 0)
		FAIL("reopening after a clean close: %s", e.msg);
	s = qcow2_state(img->top);
	if (s->incompat & (QCOW2_INCOMPAT_DIRTY | QCOW2_INCOMPAT_CORRUPT))
		FAIL("after a clean close the image is %s",
		     s->incompat & QCOW2_INCOMPAT_DIRTY ? "dirty" : "corrupt");
	check_all(img, nsnaps, "after reopening");
	refs_hold(s, true);
	image_close(img);
	return 0;
}
