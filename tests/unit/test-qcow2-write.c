/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The qcow2 write path: refcount entry arithmetic at every width, the
 * allocator (reuse after free, self-covering refcount blocks, table
 * growth), copy-on-write from a backing file and from snapshot-shared
 * clusters, zeroes and discard, and the rebuild of a dirty image's
 * refcounts.  Images are made with qemu-img in a temporary directory and
 * judged by qemu-img check / compare afterwards.
 */
#include <errno.h>
#include <fcntl.h>
#include <glib.h>
#include <glib/gstdio.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "formats.h"
#include "image.h"
#include "qcow2-write.h"

#include "qemu-helpers.h"

static struct image_opts opts;

static struct bdev *open_rw(const char *path)
{
	struct open_ctx ctx;
	struct err e = { 0 };
	struct bdev *d = NULL;

	memset(&ctx, 0, sizeof(ctx));
	ctx.opts = &opts;
	if (image_open_dev(path, "qcow2", true, &ctx, &d, &e) < 0)
		g_error("open %s: %s", path, e.msg);
	g_assert_false(d->read_only);
	return d;
}

/* qemu-img check: 0 = clean, 3 = leaks, 2 = corruption */
static void assert_clean(const char *path)
{
	char *out;
	int st = shs(&out, "qemu-img check %s", path);

	if (st != 0)
		g_error("qemu-img check %s: status %d\n%s", path, st, out);
	g_free(out);
}

/* ---- refcount entries ------------------------------------------------------- */

static void test_rc_entries(void)
{
	for (unsigned order = 0; order <= 6; order++) {
		unsigned bits = 1u << order;
		uint64_t max = bits == 64 ? UINT64_MAX : (1ull << bits) - 1;
		uint64_t n = 512 * 8 / bits;
		uint8_t *b = g_malloc0(512);

		for (uint64_t i = 0; i < n; i++)
			qcow2_rc_entry_set(b, order, i, (i * 0x9e3779b97f4a7c15ull) & max);
		for (uint64_t i = 0; i < n; i++)
			g_assert_cmpuint(qcow2_rc_entry_get(b, order, i), ==,
					 (i * 0x9e3779b97f4a7c15ull) & max);
		/* setting one entry leaves its neighbours alone */
		qcow2_rc_entry_set(b, order, 5, max);
		g_assert_cmpuint(qcow2_rc_entry_get(b, order, 4), ==, (4 * 0x9e3779b97f4a7c15ull) & max);
		g_assert_cmpuint(qcow2_rc_entry_get(b, order, 6), ==, (6 * 0x9e3779b97f4a7c15ull) & max);
		g_assert_cmpuint(qcow2_rc_entry_get(b, order, 5), ==, max);
		g_free(b);
	}
}

static void test_rc_layout(void)
{
	uint8_t b[16];

	/* below 8 bits: LSB-first within each byte (§ "Refcount blocks") */
	memset(b, 0, sizeof(b));
	qcow2_rc_entry_set(b, 0, 0, 1);
	qcow2_rc_entry_set(b, 0, 9, 1);
	g_assert_cmphex(b[0], ==, 0x01);
	g_assert_cmphex(b[1], ==, 0x02);
	memset(b, 0, sizeof(b));
	qcow2_rc_entry_set(b, 1, 1, 3);
	qcow2_rc_entry_set(b, 1, 3, 1);
	g_assert_cmphex(b[0], ==, 0x4c);
	memset(b, 0, sizeof(b));
	qcow2_rc_entry_set(b, 2, 1, 0xa);
	g_assert_cmphex(b[0], ==, 0xa0);
	/* 8 bits and more: big-endian */
	memset(b, 0, sizeof(b));
	qcow2_rc_entry_set(b, 4, 1, 0x1234);
	g_assert_cmphex(b[2], ==, 0x12);
	g_assert_cmphex(b[3], ==, 0x34);
	memset(b, 0, sizeof(b));
	qcow2_rc_entry_set(b, 5, 1, 0x01020304);
	g_assert_cmpmem(b + 4, 4, "\x01\x02\x03\x04", 4);
	memset(b, 0, sizeof(b));
	qcow2_rc_entry_set(b, 6, 1, 0x0102030405060708ull);
	g_assert_cmpmem(b + 8, 8, "\x01\x02\x03\x04\x05\x06\x07\x08", 8);
}

/* ---- the allocator ----------------------------------------------------------- */

static void test_alloc_reuse(void)
{
	char *img = tpath("alloc.qcow2");
	struct bdev *d;
	struct qcow2 *s;
	uint64_t a, b, c, rc;

	if (!have_qemu())
		return;
	sh("qemu-img create -q -f qcow2 %s 64M", img);
	d = open_rw(img);
	s = qcow2_state(d);
	pthread_mutex_lock(&s->w->lock);
	/* header, refcount table, refcount block, L1: the next is cluster 4 */
	g_assert_cmpint(qcow2_alloc_clusters(s, 1, &a), ==, 0);
	g_assert_cmphex(a, ==, 4 * 65536);
	g_assert_cmpint(qcow2_alloc_clusters(s, 3, &b), ==, 0);
	g_assert_cmphex(b, ==, 5 * 65536);
	g_assert_cmpint(qcow2_rc_get(s, 6, &rc), ==, 0);
	g_assert_cmpuint(rc, ==, 1);
	/* a free waits for the flush; then the hole is found again */
	qcow2_free_later(s, a, 1);
	g_assert_cmpint(qcow2_rc_get(s, 4, &rc), ==, 0);
	g_assert_cmpuint(rc, ==, 1);
	g_assert_cmpint(qcow2_meta_flush(s), ==, 0);
	g_assert_cmpint(qcow2_rc_get(s, 4, &rc), ==, 0);
	g_assert_cmpuint(rc, ==, 0);
	g_assert_cmpint(qcow2_alloc_clusters(s, 1, &c), ==, 0);
	g_assert_cmphex(c, ==, a);
	/* clean up: everything allocated here is freed again */
	qcow2_free_later(s, c, 1);
	qcow2_free_later(s, b, 3);
	g_assert_cmpint(qcow2_meta_flush(s), ==, 0);
	pthread_mutex_unlock(&s->w->lock);
	bdev_close(d);
	assert_clean(img);
	g_free(img);
}

/* Fill an image of small clusters: refcount blocks cover themselves, the
 * table grows; every width. */
static void test_alloc_widths(void)
{
	static const unsigned widths[] = { 1, 2, 4, 8, 16, 32, 64 };

	if (!have_qemu())
		return;
	for (unsigned k = 0; k < G_N_ELEMENTS(widths); k++) {
		char *img = tpath("w.qcow2"), *raw = tpath("w.raw");
		size_t len = 3 << 20;
		uint8_t *buf = g_malloc(len);
		struct bdev *d;
		FILE *f;

		sh("qemu-img create -q -f qcow2 -o cluster_size=512,refcount_bits=%u %s 8M", widths[k], img);
		for (size_t i = 0; i < len; i++)
			buf[i] = (uint8_t)(i * 7 + k + (i >> 9));
		d = open_rw(img);
		g_assert_cmpint(bdev_pwrite(d, buf, len, 12345, 0), ==, 0);
		/* overwrite part in place, zero a range, discard another */
		g_assert_cmpint(bdev_pwrite(d, buf, 70000, 100000, 0), ==, 0);
		g_assert_cmpint(bdev_zero(d, 200704, 65536, 0), ==, 0);
		g_assert_cmpint(bdev_discard(d, 1 << 20, 300000), ==, 0);
		g_assert_cmpint(bdev_flush(d), ==, 0);
		bdev_close(d);
		assert_clean(img);

		f = fopen(raw, "wb");
		g_assert_nonnull(f);
		g_assert_cmpint(ftruncate(fileno(f), 8 << 20), ==, 0);
		g_assert_cmpint(fseek(f, 12345, SEEK_SET), ==, 0);
		fwrite(buf, 1, len, f);
		fseek(f, 100000, SEEK_SET);
		fwrite(buf, 1, 70000, f);
		fclose(f);
		sh("qemu-io -f raw -c 'write -z 200704 65536' -c 'write -z 1048576 300000' %s", raw);
		sh("qemu-img compare -f qcow2 -F raw %s %s", img, raw);
		g_free(buf);
		g_free(img);
		g_free(raw);
	}
}

/* 512-byte clusters with 64-bit refcounts: a block covers 64 clusters and
 * the first one-cluster table 2 MiB; 6 MiB of data grows it several times,
 * the blocks cover themselves, the old tables are freed. */
static void test_alloc_reftable_growth(void)
{
	char *img = tpath("grow.qcow2"), *raw = tpath("grow.raw");
	size_t len = 6 << 20;
	uint8_t *buf = g_malloc(len);
	struct bdev *d;
	struct qcow2 *s;
	uint64_t rt_before;

	if (!have_qemu())
		return;
	sh("qemu-img create -q -f qcow2 -o cluster_size=512,refcount_bits=64 %s 8M", img);
	for (size_t i = 0; i < len; i++)
		buf[i] = (uint8_t)(i * 13 + (i >> 12));
	d = open_rw(img);
	s = qcow2_state(d);
	rt_before = s->w->rt_entries;
	for (size_t off = 0; off < len; off += 65536)
		g_assert_cmpint(bdev_pwrite(d, buf + off, 65536, off, 0), ==, 0);
	g_assert_cmpint(bdev_flush(d), ==, 0);
	g_assert_cmpuint(s->w->rt_entries, >, rt_before * 2);
	g_assert_cmpuint(s->refcount_table_clusters, >, 1);
	bdev_close(d);
	assert_clean(img);
	g_assert_true(g_file_set_contents(raw, (const char *)buf, len, NULL));
	sh("truncate -s 8M %s && qemu-img compare -f qcow2 -F raw %s %s", raw, img, raw);
	g_free(buf);
	g_free(img);
	g_free(raw);
}

/* A new L2 table is zeroed on disk and its slices go into the cache as
 * they are: none is read back (16 reads of 4 KiB with 64 KiB clusters). */
static void test_new_l2_not_read_back(void)
{
	char *img = tpath("newl2.qcow2");
	struct bdev *d;
	struct qcow2 *s;
	uint64_t hits, misses;
	unsigned n;

	if (!have_qemu())
		return;
	sh("qemu-img create -q -f qcow2 %s 64M", img);
	d = open_rw(img);
	s = qcow2_state(d);
	g_assert_cmpint(bdev_pwrite(d, "X", 1, 3 << 20, 0), ==, 0);
	qcow2_cache_stats(s->l2_cache, &hits, &misses, &n);
	g_assert_cmpuint(misses, ==, 0);
	g_assert_cmpuint(n, ==, 65536 / 4096);
	bdev_close(d);
	assert_clean(img);
	sh("qemu-io -c 'read -P 0x58 3M 1' -c 'read -P 0 0 3M' %s >/dev/null", img);
	g_free(img);
}

/* ---- merged data writes -------------------------------------------------------- */

/*
 * One request over clusters of every kind, whose data goes out as one
 * pwrite per host-contiguous run: clusters in place, new ones, a
 * compressed one, a zero one, ones a snapshot shares, partial edges copied
 * from the backing file or the old cluster.  Every byte must land at its
 * own guest offset: compared with a raw copy that got the same bytes.
 */
struct merge_case {
	const char *opts;    /* qemu-img create -o */
	const char *setup;   /* qemu-io commands before and after snapshot "one" */
	const char *setup2;
	uint64_t off, len;   /* the request */
};

static void check_merged_write(const struct merge_case *c)
{
	char *back = tpath("mb.raw"), *img = tpath("m.qcow2"), *ref = tpath("mref.raw");
	char *snap0 = tpath("msnap0.raw"), *snap1 = tpath("msnap1.raw");
	size_t bsize = 8 << 20;
	uint8_t *bdata = g_malloc(bsize), *buf = g_malloc(c->len);
	struct bdev *d;
	int fd;

	/* bytes that differ within every cluster, so a shifted copy shows */
	for (size_t i = 0; i < bsize; i++)
		bdata[i] = (uint8_t)(i * 31 + (i >> 9) + 1);
	for (size_t i = 0; i < c->len; i++)
		buf[i] = (uint8_t)(i * 7 + (i >> 11) + 0x80);
	g_assert_true(g_file_set_contents(back, (const char *)bdata, bsize, NULL));
	sh("qemu-img create -q -f qcow2 -o %s -b %s -F raw %s 8M", c->opts, back, img);
	sh("qemu-io %s %s >/dev/null", c->setup, img);
	sh("qemu-img snapshot -c one %s", img);
	sh("qemu-io %s %s >/dev/null", c->setup2, img);
	sh("qemu-img convert -O raw %s %s", img, ref);
	sh("qemu-img convert -O raw -l snapshot.name=one %s %s", img, snap0);

	d = open_rw(img);
	g_assert_cmpint(bdev_pwrite(d, buf, c->len, c->off, 0), ==, 0);
	bdev_close(d);

	fd = open(ref, O_WRONLY);
	g_assert_cmpint(fd, >=, 0);
	g_assert_cmpint(pwrite(fd, buf, c->len, (off_t)c->off), ==, (ssize_t)c->len);
	close(fd);
	assert_clean(img);
	sh("qemu-img compare -q -f qcow2 -F raw %s %s", img, ref);
	/* the snapshot's clusters were copied, not written */
	sh("qemu-img convert -O raw -l snapshot.name=one %s %s && cmp %s %s", img, snap1, snap0, snap1);
	g_free(bdata);
	g_free(buf);
	g_free(back);
	g_free(img);
	g_free(ref);
	g_free(snap0);
	g_free(snap1);
}

static void test_merged_writes(void)
{
	/* 64 KiB clusters; the request runs from inside cluster 1 to inside
	 * cluster 11: 1 unallocated (head from the backing file), 2-3 in
	 * place, 4 new, 5 compressed, 7 zero, 8 written after the snapshot,
	 * 9-10 shared with the snapshot, 11 unallocated (tail) */
	static const char setup[] =
		"-c 'write -P 0x33 576k 128k'";
	static const char setup2[] =
		"-c 'write -P 0x11 128k 128k' -c 'write -c -P 0x22 320k 64k' "
		"-c 'write -z 448k 64k' -c 'write -P 0x44 516k 6k' -c 'write -P 0x55 708k 4k'";
	static const struct merge_case cases[] = {
		{ "cluster_size=65536", setup, setup2, 65536 + 1000, 10 * 65536 + 4000 },
		/* extended L2: 2 KiB subclusters, some allocated in 8 and 11 */
		{ "cluster_size=65536,extended_l2=on", setup, setup2, 65536 + 1000, 10 * 65536 + 4000 },
		/* 4 KiB clusters: an L2 table maps 2 MiB, and the request
		 * crosses into a table it allocates in the middle; it starts
		 * inside a cluster written in place */
		{ "cluster_size=4096", "-c 'write -P 0x33 2036k 8k'",
		  "-c 'write -P 0x11 2024k 8k' -c 'write -c -P 0x22 2044k 4k' -c 'write -P 0x44 2033k 1k'",
		  2024 * 1024 + 1000, 24 * 1024 - 1000 + 30000 },
	};

	if (!have_qemu())
		return;
	for (size_t i = 0; i < G_N_ELEMENTS(cases); i++)
		check_merged_write(&cases[i]);
}

/* ---- copy-on-write --------------------------------------------------------------- */

static void test_cow_backing(void)
{
	char *back = tpath("back.raw"), *img = tpath("cow.qcow2"), *out;
	uint8_t got[65536], want[65536];
	struct bdev *d;

	if (!have_qemu())
		return;
	sh("truncate -s 1M %s && qemu-io -f raw -c 'write -P 0x5a 0 1M' %s >/dev/null", back, back);
	sh("qemu-img create -q -f qcow2 -b %s -F raw %s 1M", back, img);
	d = open_rw(img);
	g_assert_cmpint(bdev_pwrite(d, "X", 1, 65536 + 1000, 0), ==, 0);
	g_assert_cmpint(bdev_pread(d, got, sizeof(got), 65536), ==, 0);
	memset(want, 0x5a, sizeof(want));
	want[1000] = 'X';
	g_assert_cmpmem(got, sizeof(got), want, sizeof(want));
	bdev_close(d);
	assert_clean(img);
	/* one cluster allocated, the rest still the backing file's */
	g_assert_cmpint(shs(&out, "qemu-img map --output=json %s", img), ==, 0);
	g_assert_nonnull(strstr(out, "\"start\": 65536, \"length\": 65536, \"depth\": 0"));
	g_free(out);
	g_free(back);
	g_free(img);
}

/*
 * Large writes whose ends fall inside new clusters (the kernel's 1 MiB -
 * 16 bytes): the bytes around them come from the backing file, the
 * request's bytes go straight to the host; unaligned at both ends, over
 * several clusters, and a large write inside one 2 MiB cluster.
 */
static void test_cow_large_unaligned(void)
{
	static const struct { const char *opts; uint64_t off, len; } cases[] = {
		{ "cluster_size=65536", 16, (1 << 20) - 16 },
		{ "cluster_size=65536", 65536 + 4097, (1 << 20) + 3 },
		{ "cluster_size=65536", 3 * 65536, (1 << 20) - 16 },
		{ "cluster_size=2097152", 1000, (512 << 10) },
		{ "cluster_size=65536,extended_l2=on", 2048 + 7, (256 << 10) },
	};

	if (!have_qemu())
		return;
	for (size_t i = 0; i < G_N_ELEMENTS(cases); i++) {
		char *back = tpath("lback.raw"), *img = tpath("lcow.qcow2");
		uint64_t size = 4 << 20;
		uint8_t *want = g_malloc(size), *got = g_malloc(size);
		gsize got_len;
		struct bdev *d;
		char *out;

		sh("truncate -s 4M %s && qemu-io -f raw -c 'write -P 0x5a 0 4M' %s >/dev/null", back, back);
		sh("qemu-img create -q -f qcow2 -o %s -b %s -F raw %s 4M", cases[i].opts, back, img);
		memset(want, 0x5a, size);
		for (uint64_t k = 0; k < cases[i].len; k++)
			want[cases[i].off + k] = (uint8_t)(k * 7 + 1);
		d = open_rw(img);
		g_assert_cmpint(bdev_pwrite(d, want + cases[i].off, cases[i].len, cases[i].off, 0), ==, 0);
		g_assert_cmpint(bdev_pread(d, got, size, 0), ==, 0);
		g_assert_true(memcmp(got, want, size) == 0);
		bdev_close(d);
		assert_clean(img);
		/* and qemu reads the same bytes */
		out = g_strdup_printf("%s.out", img);
		sh("qemu-img convert -f qcow2 -O raw %s %s", img, out);
		g_free(got);
		g_assert_true(g_file_get_contents(out, (gchar **)&got, &got_len, NULL));
		g_assert_cmpuint(got_len, ==, size);
		g_assert_true(memcmp(got, want, size) == 0);
		g_free(got);
		g_free(want);
		g_free(out);
		g_free(back);
		g_free(img);
	}
}

static void test_cow_snapshot(void)
{
	char *img = tpath("snap.qcow2");
	uint8_t buf[512], old[512];
	struct bdev *d, *sd;
	struct err e = { 0 };
	struct qcow2 *s;
	uint64_t ent, rc;

	if (!have_qemu())
		return;
	sh("qemu-img create -q -f qcow2 %s 4M", img);
	sh("qemu-io -c 'write -P 0x11 0 128k' %s >/dev/null", img);
	sh("qemu-img snapshot -c one %s", img);
	d = open_rw(img);
	s = qcow2_state(d);
	memset(buf, 0x22, sizeof(buf));
	g_assert_cmpint(bdev_pwrite(d, buf, sizeof(buf), 100, 0), ==, 0);
	g_assert_cmpint(bdev_flush(d), ==, 0);
	/* the active L2 table was copied and the data cluster moved */
	g_assert_true(s->l1.table[0] & QCOW2_OFLAG_COPIED);
	g_assert_cmpint(qcow2_cache_read(s->l2_cache, s->l1.table[0] & QCOW2_OFFSET_MASK, 0, &ent, 8), ==, 0);
	ent = be64(&ent);
	g_assert_true(ent & QCOW2_OFLAG_COPIED);
	pthread_mutex_lock(&s->w->lock);
	g_assert_cmpint(qcow2_rc_get(s, (ent & QCOW2_OFFSET_MASK) >> s->cluster_bits, &rc), ==, 0);
	pthread_mutex_unlock(&s->w->lock);
	g_assert_cmpuint(rc, ==, 1);
	/* the snapshot still reads the old bytes */
	g_assert_cmpint(qcow2_snapshot_open(d, 0, &sd, &e), ==, 0);
	g_assert_cmpint(bdev_pread(sd, old, sizeof(old), 100), ==, 0);
	memset(buf, 0x11, sizeof(buf));
	g_assert_cmpmem(old, sizeof(old), buf, sizeof(buf));
	bdev_close(sd);
	bdev_close(d);
	assert_clean(img);
	g_free(img);
}

static void test_zero_keeps_backing_hidden(void)
{
	char *back = tpath("zb.raw"), *img = tpath("zb.qcow2");
	uint8_t got[8192], zero[8192] = { 0 };
	struct bdev *d;

	if (!have_qemu())
		return;
	sh("truncate -s 1M %s && qemu-io -f raw -c 'write -P 0x77 0 1M' %s >/dev/null", back, back);
	sh("qemu-img create -q -f qcow2 -b %s -F raw %s 1M", back, img);
	d = open_rw(img);
	/* discard an unallocated range: zeroes, not the backing file */
	g_assert_cmpint(bdev_discard(d, 65536, 131072), ==, 0);
	g_assert_cmpint(bdev_pread(d, got, sizeof(got), 65536 + 8192), ==, 0); /* 8 KiB in */
	g_assert_cmpmem(got, sizeof(got), zero, sizeof(zero));
	/* an unaligned discard writes real zeroes at the edges */
	g_assert_cmpint(bdev_discard(d, 300000, 5000), ==, 0);
	g_assert_cmpint(bdev_pread(d, got, 5000, 300000), ==, 0);
	g_assert_cmpmem(got, 5000, zero, 5000);
	g_assert_cmpint(bdev_pread(d, got, 1, 305000), ==, 0);
	g_assert_cmphex(got[0], ==, 0x77);
	bdev_close(d);
	assert_clean(img);
	g_free(back);
	g_free(img);
}

/* ---- freed clusters and readers in flight ------------------------------------ */

/* The host offset guest cluster off maps to (one whole cluster). */
static uint64_t host_of(struct bdev *d, uint64_t off)
{
	struct bdev_extent ext[4];
	struct bdev_extents x = { .ext = ext, .max = G_N_ELEMENTS(ext) };
	uint64_t pos;

	g_assert_cmpint(bdev_map(d, off, 65536, &x), ==, 65536);
	g_assert_cmpuint(x.n, ==, 1);
	g_assert_cmpint(ext[0].fd, >=, 0);
	pos = ext[0].pos;
	bdev_extents_release(&x);
	return pos;
}

/*
 * A mapping is used after bdev_map returns (FUSE splice, NBD sendfile).
 * If the range is discarded and flushed meanwhile, the freed host cluster
 * must not be punched out or given to another guest cluster before the
 * mapping is released: the reader would send zeroes, or another part of the
 * disk.  Writes and flushes must not wait for the reader either.
 */
static void test_map_pins_freed_cluster(void)
{
	char *img = tpath("pin.qcow2");
	uint8_t a[65536], b[65536], got[65536], zero[65536] = { 0 };
	struct bdev_extent ext[4];
	struct bdev_extents x = { .ext = ext, .max = G_N_ELEMENTS(ext) };
	struct bdev *d;
	uint64_t h, h2;

	if (!have_qemu())
		return;
	memset(a, 0xa1, sizeof(a));
	memset(b, 0xb2, sizeof(b));
	sh("qemu-img create -q -f qcow2 %s 64M", img);
	d = open_rw(img);
	g_assert_cmpint(bdev_pwrite(d, a, sizeof(a), 0, 0), ==, 0);
	g_assert_cmpint(bdev_flush(d), ==, 0);
	h = host_of(d, 0);

	/* the reader maps guest cluster 0 ... */
	g_assert_cmpint(bdev_map(d, 0, sizeof(a), &x), ==, (int64_t)sizeof(a));
	g_assert_cmpuint(x.n, ==, 1);
	g_assert_cmphex(ext[0].pos, ==, h);
	/* ... a discard frees its host cluster, a write allocates; reads
	 * through the device in between leave nothing pinned */
	g_assert_cmpint(bdev_discard(d, 0, sizeof(a)), ==, 0);
	g_assert_cmpint(bdev_flush(d), ==, 0);
	g_assert_cmpint(bdev_pread(d, got, sizeof(got), 0), ==, 0);
	g_assert_cmpmem(got, sizeof(got), zero, sizeof(zero));
	g_assert_cmpint(bdev_pwrite(d, b, sizeof(b), 1 << 20, 0), ==, 0);
	g_assert_cmpint(bdev_flush(d), ==, 0);
	h2 = host_of(d, 1 << 20);
	g_assert_cmphex(h2, !=, h);
	/* ... and still reads what guest cluster 0 held when it mapped it */
	g_assert_cmpint(pread(ext[0].fd, got, sizeof(got), (off_t)ext[0].pos), ==, (ssize_t)sizeof(got));
	g_assert_cmpmem(got, sizeof(got), a, sizeof(a));
	bdev_extents_release(&x);

	/* released: the next flush frees it, and the allocator finds it */
	g_assert_cmpint(bdev_flush(d), ==, 0);
	g_assert_cmpint(bdev_pwrite(d, b, sizeof(b), 2 << 20, 0), ==, 0);
	g_assert_cmphex(host_of(d, 2 << 20), ==, h);
	g_assert_cmpint(bdev_pread(d, got, sizeof(got), 2 << 20), ==, 0);
	g_assert_cmpmem(got, sizeof(got), b, sizeof(b));
	bdev_close(d);
	assert_clean(img);
	sh("qemu-io -c 'read -P 0 0 64k' -c 'read -P 0xb2 1M 64k' -c 'read -P 0xb2 2M 64k' %s >/dev/null",
	   img);
	g_free(img);
}

/* A free still held for a reader at close is applied then: no leak. */
static void test_held_free_at_close(void)
{
	char *img = tpath("pinclose.qcow2");
	uint8_t a[65536];
	struct bdev_extent ext[4];
	struct bdev_extents x = { .ext = ext, .max = G_N_ELEMENTS(ext) };
	struct bdev *d;

	if (!have_qemu())
		return;
	memset(a, 0x5c, sizeof(a));
	sh("qemu-img create -q -f qcow2 %s 64M", img);
	d = open_rw(img);
	g_assert_cmpint(bdev_pwrite(d, a, sizeof(a), 0, 0), ==, 0);
	g_assert_cmpint(bdev_map(d, 0, sizeof(a), &x), ==, (int64_t)sizeof(a));
	g_assert_cmpint(bdev_discard(d, 0, sizeof(a)), ==, 0);
	g_assert_cmpint(bdev_flush(d), ==, 0);
	bdev_extents_release(&x);
	bdev_close(d);
	assert_clean(img); /* a leaked cluster fails it (status 3) */
	g_free(img);
}

/* ---- dirty images -------------------------------------------------------------- */

static void test_dirty_repair(void)
{
	char *img = tpath("dirty.qcow2"), *out;
	struct bdev *d;

	if (!have_qemu())
		return;
	sh("qemu-img create -q -f qcow2 -o lazy_refcounts=on,cluster_size=4096 %s 8M", img);
	sh("qemu-io -c 'write -P 0x33 0 1M' %s >/dev/null", img);
	/* a lazy-refcount crash: dirty bit set, refcounts of data lost
	 * (zero the refcount block's entries past the metadata) */
	sh("python3 -c \"import struct; f = open('%s', 'r+b'); f.seek(72); "
	   "v = struct.unpack('>Q', f.read(8))[0] | 1; f.seek(72); f.write(struct.pack('>Q', v)); "
	   "f.seek(48); rt = struct.unpack('>Q', f.read(8))[0]; f.seek(rt); "
	   "rb = struct.unpack('>Q', f.read(8))[0]; f.seek(rb + 2 * 8); f.write(bytes(4096 - 16))\"", img);
	g_assert_cmpint(shs(&out, "qemu-img check %s", img), ==, 2);
	g_free(out);
	d = open_rw(img);
	bdev_close(d);
	assert_clean(img);
	g_assert_cmpint(shs(&out, "qemu-img info --output=json %s", img), ==, 0);
	g_assert_nonnull(strstr(out, "\"dirty-flag\": false"));
	g_free(out);
	sh("qemu-io -c 'read -P 0x33 0 1M' %s >/dev/null", img);
	g_free(img);
}

int main(int argc, char **argv)
{
	int r;

	g_test_init(&argc, &argv, NULL);
	log_set_level(LOG_LVL_ERR);
	tmpdir = g_dir_make_tmp("imgfs-qcow2w-XXXXXX", NULL);
	g_assert_nonnull(tmpdir);
	g_test_add_func("/qcow2-write/refcount/entries", test_rc_entries);
	g_test_add_func("/qcow2-write/refcount/layout", test_rc_layout);
	g_test_add_func("/qcow2-write/alloc/reuse", test_alloc_reuse);
	g_test_add_func("/qcow2-write/alloc/widths", test_alloc_widths);
	g_test_add_func("/qcow2-write/alloc/reftable-growth", test_alloc_reftable_growth);
	g_test_add_func("/qcow2-write/alloc/new-l2-not-read-back", test_new_l2_not_read_back);
	g_test_add_func("/qcow2-write/merge/every-kind-of-cluster", test_merged_writes);
	g_test_add_func("/qcow2-write/cow/backing", test_cow_backing);
	g_test_add_func("/qcow2-write/cow/large-unaligned", test_cow_large_unaligned);
	g_test_add_func("/qcow2-write/cow/snapshot", test_cow_snapshot);
	g_test_add_func("/qcow2-write/zero/backing-hidden", test_zero_keeps_backing_hidden);
	g_test_add_func("/qcow2-write/discard/map-pins-freed-cluster", test_map_pins_freed_cluster);
	g_test_add_func("/qcow2-write/discard/held-free-at-close", test_held_free_at_close);
	g_test_add_func("/qcow2-write/dirty/repair", test_dirty_repair);
	r = g_test_run();
	shs(NULL, "rm -rf %s", tmpdir);
	g_free(tmpdir);
	return r;
}
