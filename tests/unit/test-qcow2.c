/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The qcow2 read path against qemu: images are made with qemu-img/qemu-io
 * in a temporary directory, read through imgfs, and compared byte for byte
 * with what `qemu-img convert -O raw` says they hold.  Malformed headers are
 * made by patching good images; each must be refused with a clear message.
 */
#include <errno.h>
#include <glib.h>
#include <glib/gstdio.h>
#include <sys/stat.h>
#include <unistd.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <zlib.h>
#include <zstd.h>

#include "formats.h"
#include "image.h"
#include "qcow2-int.h"

#include "qemu-helpers.h"

static struct image_opts default_opts;

static int open_img(const char *path, const struct image_opts *opts,
		    struct bdev **dev, struct err *e)
{
	struct open_ctx ctx;

	memset(&ctx, 0, sizeof(ctx));
	ctx.opts = opts ? opts : &default_opts;
	return image_open_dev(path, "qcow2", false, &ctx, dev, e);
}

static struct bdev *must_open(const char *path, const struct image_opts *opts)
{
	struct err e = { 0 };
	struct bdev *dev = NULL;
	int r = open_img(path, opts, &dev, &e);

	if (r < 0)
		g_error("open %s: %d %s", path, r, e.msg);
	return dev;
}

/* Read dev fully, with reads of size chunk, into a new buffer. */
static uint8_t *read_all(struct bdev *dev, size_t chunk)
{
	uint8_t *buf = g_malloc(dev->size ? dev->size : 1);

	for (uint64_t off = 0; off < dev->size; off += chunk) {
		size_t n = MIN(chunk, dev->size - off);
		int r = bdev_pread(dev, buf + off, n, off);

		if (r < 0)
			g_error("read %zu at %" G_GUINT64_FORMAT ": %d", n, off, r);
	}
	return buf;
}

/*
 * bdev_map in pieces of chunk bytes (at most 16 extents each): the bytes
 * the extents name must be ref's.  Returns how many bytes were mapped (the
 * rest is left to bdev_pread: compressed clusters, a full extent list).
 */
static uint64_t check_map(struct bdev *dev, size_t chunk, const uint8_t *ref)
{
	uint8_t *buf = g_malloc(chunk);
	uint64_t mapped = 0;

	for (uint64_t off = 0; off < dev->size; off += chunk) {
		struct bdev_extent ext[16];
		struct bdev_extents x = { .ext = ext, .max = G_N_ELEMENTS(ext) };
		uint64_t n = MIN(chunk, dev->size - off), got = 0;
		int64_t m = bdev_map(dev, off, n, &x);

		g_assert_cmpint(m, >=, 0);
		g_assert_cmpuint((uint64_t)m, <=, n);
		for (unsigned i = 0; i < x.n; i++) {
			if (ext[i].fd < 0)
				memset(buf + got, 0, ext[i].len);
			else
				g_assert_cmpint(pread(ext[i].fd, buf + got, ext[i].len, (off_t)ext[i].pos),
						==, (ssize_t)ext[i].len);
			got += ext[i].len;
		}
		g_assert_cmpuint(got, ==, (uint64_t)m);
		bdev_extents_release(&x);
		if (memcmp(buf, ref + off, got))
			g_error("bdev_map: wrong bytes in [%" G_GUINT64_FORMAT ", +%" G_GUINT64_FORMAT ")",
				off, got);
		mapped += got;
	}
	g_free(buf);
	return mapped;
}

/* Compare dev with `qemu-img convert [args] -O raw path`. */
static void compare_with_qemu(struct bdev *dev, const char *path, const char *args)
{
	char *raw = tpath("ref.raw");
	gchar *ref = NULL;
	gsize ref_len = 0;
	static const size_t chunks[] = { 1 << 20, 12345, 65536 + 512 };

	sh("qemu-img convert %s -O raw '%s' '%s'", args ? args : "", path, raw);
	g_assert_true(g_file_get_contents(raw, &ref, &ref_len, NULL));
	/* qemu reads a snapshot at the image's current size (load_tmp keeps
	 * it); ours ends at the snapshot's own disk_size: the rest is zero */
	if (args && strstr(args, "snapshot") && ref_len > dev->size) {
		g_assert_true(buf_is_zero(ref + dev->size, ref_len - dev->size));
		ref_len = dev->size;
	}
	g_assert_cmpuint(ref_len, ==, dev->size);
	for (unsigned i = 0; i < G_N_ELEMENTS(chunks); i++) {
		uint8_t *got = read_all(dev, chunks[i]);

		if (memcmp(got, ref, ref_len)) {
			gsize j = 0;

			while (got[j] == (uint8_t)ref[j])
				j++;
			g_error("%s: first difference at byte %" G_GSIZE_FORMAT " (chunk %zu): got 0x%02x, qemu 0x%02x",
				path, j, chunks[i], got[j], (uint8_t)ref[j]);
		}
		g_free(got);
	}
	/* zero-copy reads see the same bytes; only compressed clusters and
	 * full extent lists stop a mapping, so plain images map whole */
	for (unsigned i = 0; i < G_N_ELEMENTS(chunks); i++) {
		uint64_t m = check_map(dev, chunks[i], (const uint8_t *)ref);

		if (!strstr(path, "compress") && !strstr(path, "zlib") && !strstr(path, "zstd") && chunks[i] == 1u << 20)
			g_assert_cmpuint(m, >, 0);
	}
	g_free(ref);
	g_unlink(raw);
	g_free(raw);
}

static void check_image(const char *path)
{
	struct bdev *dev = must_open(path, NULL);

	compare_with_qemu(dev, path, NULL);
	bdev_close(dev);
}

/* A handful of writes that exercise partial clusters and runs. */
#define PATTERN_WRITES \
	"-c 'write -P 0x11 0 64k' -c 'write -P 0x22 100k 3k' " \
	"-c 'write -P 0x33 1m 1m' -c 'write -P 0x44 3m 512' -c 'write -P 0x55 4095k 1k' " \
	"-c 'write -P 0x66 7m 1536'"

static void patch(const char *path, uint64_t off, const void *p, size_t n)
{
	FILE *f = fopen(path, "r+b");

	g_assert_nonnull(f);
	g_assert_cmpint(fseeko(f, (off_t)off, SEEK_SET), ==, 0);
	g_assert_cmpuint(fwrite(p, 1, n, f), ==, n);
	fclose(f);
}

static void patch32(const char *path, uint64_t off, uint32_t v)
{
	uint8_t b[4];

	put_be32(b, v);
	patch(path, off, b, 4);
}

static void patch64(const char *path, uint64_t off, uint64_t v)
{
	uint8_t b[8];

	put_be64(b, v);
	patch(path, off, b, 8);
}

static uint64_t peek64(const char *path, uint64_t off)
{
	FILE *f = fopen(path, "rb");
	uint8_t b[8];

	g_assert_nonnull(f);
	g_assert_cmpint(fseeko(f, (off_t)off, SEEK_SET), ==, 0);
	g_assert_cmpuint(fread(b, 1, 8, f), ==, 8);
	fclose(f);
	return be64(b);
}

/* ---- decoding (pure) --------------------------------------------------- */

static void test_probe(void)
{
	g_assert_true(qcow2_probe("QFI\xfb\0\0\0\3", 8));
	g_assert_false(qcow2_probe("QFI\xfa", 4));
	g_assert_false(qcow2_probe("QFI", 3));
}

static void geom(struct qcow2 *s, unsigned version, unsigned cluster_bits, bool ext)
{
	memset(s, 0, sizeof(*s));
	s->version = version;
	s->cluster_bits = cluster_bits;
	s->cluster_size = 1ull << cluster_bits;
	s->extended_l2 = ext;
	s->subcluster_bits = cluster_bits - (ext ? 5 : 0);
}

static void test_l2_standard(void)
{
	struct qcow2 s;
	const char *why;
	uint64_t host;

	geom(&s, 3, 16, false);
	g_assert_cmpint(qcow2_l2_decode(&s, 0, 0, 0, &host, &why), ==, QC_UNALLOC);
	g_assert_cmpint(qcow2_l2_decode(&s, QCOW2_OFLAG_COPIED | 0x50000, 0, 0, &host, &why), ==, QC_NORMAL);
	g_assert_cmpuint(host, ==, 0x50000);
	g_assert_cmpint(qcow2_l2_decode(&s, 0x50000, 0, 0, &host, &why), ==, QC_NORMAL); /* shared */
	g_assert_cmpint(qcow2_l2_decode(&s, 1, 0, 0, &host, &why), ==, QC_ZERO);           /* zero plain */
	g_assert_cmpint(qcow2_l2_decode(&s, 0x50001, 0, 0, &host, &why), ==, QC_ZERO);     /* zero alloc */
	g_assert_cmpint(qcow2_l2_decode(&s, 0x50200, 0, 0, &host, &why), ==, QC_INVALID);  /* unaligned */
	g_assert_nonnull(why);
	g_assert_cmpint(qcow2_l2_decode(&s, 0x50000 | 1ull << 56, 0, 0, &host, &why), ==, QC_INVALID);
	g_assert_cmpint(qcow2_l2_decode(&s, 0x50000 | 2, 0, 0, &host, &why), ==, QC_INVALID);
	g_assert_cmpint(qcow2_l2_decode(&s, QCOW2_OFLAG_COMPRESSED | 0x1234, 0, 0, &host, &why), ==, QC_COMPRESSED);
	/* offset 0 with COPIED is only a cluster with an external data file */
	g_assert_cmpint(qcow2_l2_decode(&s, QCOW2_OFLAG_COPIED, 0, 0, &host, &why), ==, QC_UNALLOC);
	s.data_file = (struct bdev *)&s;
	g_assert_cmpint(qcow2_l2_decode(&s, QCOW2_OFLAG_COPIED, 0, 0, &host, &why), ==, QC_NORMAL);
	g_assert_cmpuint(host, ==, 0);
	g_assert_cmpint(qcow2_l2_decode(&s, QCOW2_OFLAG_COMPRESSED | 0x1234, 0, 0, &host, &why), ==, QC_INVALID);

	geom(&s, 2, 16, false); /* v2 has no zero flag */
	g_assert_cmpint(qcow2_l2_decode(&s, 1, 0, 0, &host, &why), ==, QC_INVALID);
	geom(&s, 3, 9, false); /* 512-byte clusters: any 512-aligned offset */
	g_assert_cmpint(qcow2_l2_decode(&s, 0x50200, 0, 0, &host, &why), ==, QC_NORMAL);
}

static void test_l2_extended(void)
{
	struct qcow2 s;
	const char *why;
	uint64_t host, e = QCOW2_OFLAG_COPIED | 0x100000;
	/* subclusters 0 and 2 allocated, 1 zero, 3 unallocated */
	uint64_t bm = 0x5ull | (0x2ull << 32);

	geom(&s, 3, 16, true);
	g_assert_cmpint(qcow2_l2_decode(&s, e, bm, 0, &host, &why), ==, QC_NORMAL);
	g_assert_cmpint(qcow2_l2_decode(&s, e, bm, 1, &host, &why), ==, QC_ZERO);
	g_assert_cmpint(qcow2_l2_decode(&s, e, bm, 2, &host, &why), ==, QC_NORMAL);
	g_assert_cmpint(qcow2_l2_decode(&s, e, bm, 3, &host, &why), ==, QC_UNALLOC);
	g_assert_cmpint(qcow2_l2_decode(&s, e, bm, 31, &host, &why), ==, QC_UNALLOC);
	/* plain: no host cluster; zero bits still count */
	g_assert_cmpint(qcow2_l2_decode(&s, 0, 1ull << 63, 31, &host, &why), ==, QC_ZERO);
	g_assert_cmpint(qcow2_l2_decode(&s, 0, 0, 5, &host, &why), ==, QC_UNALLOC);
	/* invalid: allocated without a host cluster, allocated and zero */
	g_assert_cmpint(qcow2_l2_decode(&s, 0, 1, 5, &host, &why), ==, QC_INVALID);
	g_assert_cmpint(qcow2_l2_decode(&s, e, 1ull | 1ull << 32, 5, &host, &why), ==, QC_INVALID);
	/* bit 0 is reserved with extended L2; compressed needs an empty bitmap */
	g_assert_cmpint(qcow2_l2_decode(&s, e | 1, 1, 0, &host, &why), ==, QC_INVALID);
	g_assert_cmpint(qcow2_l2_decode(&s, QCOW2_OFLAG_COMPRESSED | 0x1234, 0, 0, &host, &why), ==, QC_COMPRESSED);
	g_assert_cmpint(qcow2_l2_decode(&s, QCOW2_OFLAG_COMPRESSED | 0x1234, 1, 0, &host, &why), ==, QC_INVALID);
}

static void test_compressed_desc(void)
{
	uint64_t off, size;

	/* 64 KiB: x = 54; offset 0x123456789, 3 additional sectors */
	qcow2_compressed_decode(16, QCOW2_OFLAG_COMPRESSED | 3ull << 54 | 0x123456789ull, &off, &size);
	g_assert_cmpuint(off, ==, 0x123456789ull);
	g_assert_cmpuint(size, ==, 4 * 512 - 0x189);
	/* 2 MiB: x = 49; offsets above 4 GiB (qemu 4.1.1 fix) */
	qcow2_compressed_decode(21, QCOW2_OFLAG_COMPRESSED | 4095ull << 49 | 0x1000000200ull, &off, &size);
	g_assert_cmpuint(off, ==, 0x1000000200ull);
	g_assert_cmpuint(size, ==, 4096 * 512);
	/* 512 B: x = 61; a one-bit sector count */
	qcow2_compressed_decode(9, QCOW2_OFLAG_COMPRESSED | 1ull << 61 | 0x10010ull, &off, &size);
	g_assert_cmpuint(off, ==, 0x10010ull);
	g_assert_cmpuint(size, ==, 1024 - 0x10);
	qcow2_compressed_decode(9, QCOW2_OFLAG_COMPRESSED | 0x10000ull, &off, &size);
	g_assert_cmpuint(size, ==, 512);
	/* 4 KiB: x = 58 */
	qcow2_compressed_decode(12, QCOW2_OFLAG_COMPRESSED | 7ull << 58 | 0xfffe00ull, &off, &size);
	g_assert_cmpuint(off, ==, 0xfffe00ull);
	g_assert_cmpuint(size, ==, 8 * 512);
}

static void test_cache_lru(void)
{
	char *path = tpath("cache.bin");
	uint8_t *data = g_malloc(1 << 20);
	struct err e = { 0 };
	struct bdev *file;
	struct qcow2_cache *c;
	uint64_t hits, misses;
	unsigned n;

	for (unsigned i = 0; i < 1 << 20; i++)
		data[i] = (uint8_t)(i * 7 + (i >> 12));
	g_assert_true(g_file_set_contents(path, (char *)data, 1 << 20, NULL));
	g_assert_cmpint(file_open(path, FILE_NO_LOCK, &file, &e), ==, 0);
	c = qcow2_cache_new(file, 4096, 1); /* rounds up to the minimum */
	for (unsigned round = 0; round < 3; round++)
		for (uint64_t off = 0; off < 1 << 20; off += 4096) {
			uint8_t got[100];

			g_assert_cmpint(qcow2_cache_read(c, off, 17, got, sizeof(got)), ==, 0);
			g_assert_cmpmem(got, sizeof(got), data + off + 17, sizeof(got));
		}
	qcow2_cache_stats(c, &hits, &misses, &n);
	g_assert_cmpuint(n, <=, 16);
	g_assert_cmpuint(misses, ==, 3 * 256); /* a cycle larger than the cache always misses */
	{
		uint8_t got[8];

		g_assert_cmpint(qcow2_cache_read(c, 255 * 4096, 0, got, 8), ==, 0);
		qcow2_cache_stats(c, &hits, &misses, &n);
		g_assert_cmpuint(hits, ==, 1);
		g_assert_cmpint(qcow2_cache_read(c, 0, 4090, got, 8), ==, -EINVAL);
	}
	qcow2_cache_free(c);
	bdev_close(file);
	g_free(data);
	g_unlink(path);
	g_free(path);
}

/* ---- headers ----------------------------------------------------------- */

/* Patch a fresh copy of a good image, open it, expect failure naming what. */
static void expect_refused(const char *good, void (*fix)(const char *), int code,
			   const char *what)
{
	char *bad = tpath("bad.qcow2");
	struct err e = { 0 };
	struct bdev *dev = NULL;
	int r;

	sh("cp '%s' '%s'", good, bad);
	fix(bad);
	r = open_img(bad, NULL, &dev, &e);
	if (r == 0)
		g_error("%s: opened an image with %s", bad, what);
	if (code)
		g_assert_cmpint(r, ==, code);
	g_assert_cmpint(e.code, ==, r);
	if (!strstr(e.msg, what) || !strstr(e.msg, bad))
		g_error("message for %s does not name it and the file: %s", what, e.msg);
	g_test_message("refused: %s", e.msg);
	g_unlink(bad);
	g_free(bad);
}

static void fix_version(const char *p) { patch32(p, 4, 4); }
static void fix_cbits_small(const char *p) { patch32(p, 20, 8); }
static void fix_cbits_big(const char *p) { patch32(p, 20, 22); }
static void fix_unknown_incompat(const char *p) { patch64(p, 72, 1ull << 5); }
static void fix_crypt(const char *p) { patch32(p, 32, 2); }
static void fix_hdrlen_small(const char *p) { patch32(p, 100, 96); }
static void fix_hdrlen_big(const char *p) { patch32(p, 100, 65536 + 8); }
static void fix_l1_small(const char *p) { patch32(p, 36, 0); }
static void fix_l1_unaligned(const char *p) { patch64(p, 40, peek64(p, 40) + 512); }
static void fix_l1_past_eof(const char *p) { patch64(p, 40, 1ull << 40); }
static void fix_l1_at_zero(const char *p) { patch64(p, 40, 0); }
static void fix_backing_nul(const char *p) { patch64(p, 8, 0x200); patch32(p, 16, 4); patch32(p, 0x200, 0x61006200); }
static void fix_l1_huge(const char *p) { patch32(p, 36, 0x7fffffff); }
static void fix_reftable_empty(const char *p) { patch32(p, 56, 0); }
static void fix_reftable_huge(const char *p) { patch32(p, 56, 1000); }
static void fix_reftable_unaligned(const char *p) { patch64(p, 48, 0x10100); }
static void fix_refcount_order(const char *p) { patch32(p, 96, 7); }
static void fix_backing_off(const char *p) { patch64(p, 8, 0x20000); patch32(p, 16, 4); }
static void fix_backing_len(const char *p) { patch64(p, 8, 0x200); patch32(p, 16, 1024); }
static void fix_nb_snap(const char *p) { patch32(p, 60, 65537); }
static void fix_snap_unaligned(const char *p) { patch32(p, 60, 1); patch64(p, 64, 0x10200); }
static void fix_snap_past_eof(const char *p) { patch32(p, 60, 1); patch64(p, 64, 1ull << 40); }
static void fix_ctype(const char *p) { uint8_t b = 1; patch(p, 104, &b, 1); }
static void fix_ctype_bit(const char *p) { patch64(p, 72, QCOW2_INCOMPAT_COMPRESSION); }
static void fix_size_huge(const char *p) { patch64(p, 24, 1ull << 62); }
static void fix_ext_too_large(const char *p) { patch32(p, 112 + 4, 0x100000); }
static void fix_data_file_bit(const char *p) { patch64(p, 72, QCOW2_INCOMPAT_DATA_FILE); }
static void fix_data_raw_bit(const char *p) { patch64(p, 88, QCOW2_AUTOCLEAR_DATA_RAW); }
static void fix_truncate(const char *p) { g_assert_cmpint(truncate(p, 50), ==, 0); }
static void fix_magic(const char *p) { patch32(p, 0, 0x514649fa); }

static void test_header_refusals(void)
{
	char *good;

	if (!have_qemu())
		return;
	good = tpath("good.qcow2");
	/* 64 KiB clusters; the first extension (feature table) sits at 112 */
	sh("qemu-img create -q -f qcow2 '%s' 64M", good);
	sh("qemu-io -f qcow2 -c 'write -P 1 0 4k' '%s' >/dev/null", good);
	check_image(good);

	expect_refused(good, fix_magic, -EINVAL, "magic");
	expect_refused(good, fix_truncate, 0, "qcow2");
	expect_refused(good, fix_version, -ENOTSUP, "version 4");
	expect_refused(good, fix_cbits_small, -EINVAL, "cluster_bits 8");
	expect_refused(good, fix_cbits_big, -EINVAL, "cluster_bits 22");
	expect_refused(good, fix_unknown_incompat, -ENOTSUP, "incompatible feature bit 5");
	expect_refused(good, fix_crypt, -ENOTSUP, "crypt_method 2");
	expect_refused(good, fix_hdrlen_small, -EINVAL, "header_length 96");
	expect_refused(good, fix_hdrlen_big, -EINVAL, "header_length 65544");
	expect_refused(good, fix_l1_small, -EINVAL, "L1 table is too small");
	expect_refused(good, fix_l1_unaligned, -EINVAL, "not cluster-aligned");
	expect_refused(good, fix_l1_past_eof, -EINVAL, "past the end of the file");
	expect_refused(good, fix_l1_at_zero, -EINVAL, "overlaps the header");
	expect_refused(good, fix_backing_nul, -EINVAL, "NUL byte");
	expect_refused(good, fix_l1_huge, -EFBIG, "L1 table has 2147483647 entries");
	expect_refused(good, fix_reftable_empty, -EINVAL, "refcount table is empty");
	expect_refused(good, fix_reftable_huge, -EFBIG, "refcount table too large");
	expect_refused(good, fix_reftable_unaligned, -EINVAL, "refcount table offset 0x10100");
	expect_refused(good, fix_refcount_order, -EINVAL, "refcount_order 7");
	expect_refused(good, fix_backing_off, -EINVAL, "backing file offset 0x20000");
	expect_refused(good, fix_backing_len, -EINVAL, "backing file name too long");
	expect_refused(good, fix_nb_snap, -EFBIG, "too many snapshots (65537");
	expect_refused(good, fix_snap_unaligned, -EINVAL, "snapshot table offset 0x10200");
	expect_refused(good, fix_snap_past_eof, -EINVAL, "snapshot table offset");
	expect_refused(good, fix_ctype, -EINVAL, "compression_type 1");
	expect_refused(good, fix_ctype_bit, -EINVAL, "compression_type 0");
	expect_refused(good, fix_size_huge, -EFBIG, "virtual size");
	expect_refused(good, fix_ext_too_large, -EINVAL, "too large");
	expect_refused(good, fix_data_file_bit, -EINVAL, "external data file");
	expect_refused(good, fix_data_raw_bit, -EINVAL, "data-file-raw requires a data file");
	g_unlink(good);
	g_free(good);
}

/* Feature bits that do not stop reading, and those that stop writing. */
static void test_header_features(void)
{
	char *img;
	struct err e = { 0 };
	struct bdev *file, *dev;

	if (!have_qemu())
		return;
	img = tpath("features.qcow2");
	sh("qemu-img create -q -f qcow2 -o cluster_size=4k '%s' 1M && "
	   "qemu-io -f qcow2 -c 'write -P 0x3c 0 64k' '%s' >/dev/null", img, img);
	/* unknown compatible and autoclear bits are ignored for reading */
	patch64(img, 80, 1ull << 40);
	patch64(img, 88, 1ull << 40);
	check_image(img);
	/* the corrupt bit: readable, never writable */
	patch64(img, 72, QCOW2_INCOMPAT_CORRUPT);
	dev = must_open(img, NULL);
	g_assert_true(dev->read_only);
	bdev_close(dev);
	g_assert_cmpint(file_open(img, FILE_NO_LOCK, &file, &e), ==, 0);
	g_assert_cmpint(qcow2_open(file, img, true, NULL, &dev, &e), ==, -EROFS);
	g_assert_nonnull(strstr(e.msg, "corrupt"));
	/* without it, a writable open gives a writable device, and the first
	 * write clears the unknown autoclear bit (spec: autoclear bits) */
	patch64(img, 72, 0);
	memset(&e, 0, sizeof(e));
	g_assert_cmpint(file_open(img, FILE_NO_LOCK | FILE_WRITABLE, &file, &e), ==, 0);
	g_assert_cmpint(qcow2_open(file, img, true, NULL, &dev, &e), ==, 0);
	g_assert_false(dev->read_only);
	g_assert_cmpint(bdev_pwrite(dev, "x", 1, 0, 0), ==, 0);
	bdev_close(dev);
	g_assert_cmphex(peek64(img, 88), ==, 0);
	/* extended L2 needs subclusters of at least 512 bytes */
	patch64(img, 72, QCOW2_INCOMPAT_EXTL2);
	memset(&e, 0, sizeof(e));
	g_assert_cmpint(open_img(img, NULL, &dev, &e), ==, -EINVAL);
	g_assert_nonnull(strstr(e.msg, "extended L2"));
	g_unlink(img);

	/* persistent bitmaps are ignored for reading, but must be well formed */
	sh("qemu-img create -q -f qcow2 '%s' 1M && qemu-io -f qcow2 -c 'write -P 0x3d 0 64k' '%s' >/dev/null && "
	   "qemu-img bitmap --add '%s' b0 && qemu-io -f qcow2 -c 'write -P 0x3e 64k 64k' '%s' >/dev/null",
	   img, img, img, img);
	g_assert_true(peek64(img, 88) & QCOW2_AUTOCLEAR_BITMAPS);
	check_image(img);
	{
		uint64_t off = 112;

		for (;;) {
			uint64_t w = peek64(img, off);

			g_assert_cmpuint(w >> 32, !=, 0);
			if (w >> 32 == QCOW2_EXT_BITMAPS) {
				patch32(img, off + 8, 0); /* nb_bitmaps */
				break;
			}
			off += 8 + (((uint32_t)w + 7) & ~7u);
		}
	}
	memset(&e, 0, sizeof(e));
	g_assert_cmpint(open_img(img, NULL, &dev, &e), ==, -EINVAL);
	g_assert_nonnull(strstr(e.msg, "bitmaps extension"));
	patch64(img, 88, 0); /* without autoclear bit 0 the extension is stale */
	check_image(img);
	g_unlink(img);

	/* a real encrypted image (legacy AES: LUKS key setup takes seconds;
	 * crypt_method 2 is covered by the header refusals) */
	sh("qemu-img create -q --object secret,id=sec0,data=abc -f qcow2 "
	   "-o encrypt.format=aes,encrypt.key-secret=sec0 '%s' 1M", img);
	memset(&e, 0, sizeof(e));
	g_assert_cmpint(open_img(img, NULL, &dev, &e), ==, -ENOTSUP);
	g_assert_nonnull(strstr(e.msg, "crypt_method 1, AES"));
	g_unlink(img);
	g_free(img);
}

/* The unknown-bit message names the feature from the image's own table. */
static void test_header_feature_name(void)
{
	char *img;
	struct err e = { 0 };
	struct bdev *dev;
	uint64_t off = 112;

	if (!have_qemu())
		return;
	img = tpath("fname.qcow2");
	sh("qemu-img create -q -f qcow2 '%s' 1M", img);
	/* find the feature table and rename entry 0's bit to 7 */
	for (;;) {
		uint64_t w = peek64(img, off);
		uint32_t magic = (uint32_t)(w >> 32), len = (uint32_t)w;

		g_assert_cmpuint(magic, !=, 0);
		if (magic == QCOW2_EXT_FEATURES) {
			uint8_t ent[48] = { 0, 7 };

			memcpy(ent + 2, "frobnication", 12);
			patch(img, off + 8, ent, sizeof(ent));
			break;
		}
		off += 8 + ((len + 7) & ~7u);
	}
	patch64(img, 72, 1ull << 7);
	g_assert_cmpint(open_img(img, NULL, &dev, &e), ==, -ENOTSUP);
	g_assert_nonnull(strstr(e.msg, "bit 7 (frobnication)"));
	g_unlink(img);
	g_free(img);
}

/* ---- end to end: qemu writes, we read ------------------------------------ */

static void make_and_check(const char *create_opts, const char *size, const char *writes)
{
	char *img;

	if (!have_qemu())
		return;
	img = tpath("img.qcow2");
	sh("qemu-img create -q -f qcow2 -o '%s' '%s' %s", create_opts, img, size);
	sh("qemu-io -f qcow2 %s '%s' >/dev/null", writes, img);
	check_image(img);
	g_unlink(img);
	g_free(img);
}

static void test_cluster_512(void)
{
	make_and_check("cluster_size=512", "8M", PATTERN_WRITES);
}

static void test_cluster_2m(void)
{
	make_and_check("cluster_size=2M", "16M", PATTERN_WRITES " -c 'write -P 0x77 9m 4m'");
}

static void test_cluster_sizes(void)
{
	static const char *const sizes[] = { "1k", "4k", "16k", "128k", "1M" };

	for (unsigned i = 0; i < G_N_ELEMENTS(sizes); i++) {
		char *o = g_strdup_printf("cluster_size=%s", sizes[i]);

		make_and_check(o, "8M", PATTERN_WRITES);
		g_free(o);
	}
}

static void test_v2(void)
{
	char *base, *img;
	struct bdev *dev;

	make_and_check("compat=0.10", "8M", PATTERN_WRITES);
	if (!have_qemu())
		return;
	/* a v2 overlay keeps its backing format in an extension too */
	base = tpath("v2base.raw");
	img = tpath("v2top.qcow2");
	sh("qemu-img create -q -f raw '%s' 8M && qemu-io -f raw -c 'write -P 0x71 0 8M' '%s' >/dev/null",
	   base, base);
	sh("qemu-img create -q -f qcow2 -o compat=0.10 -b '%s' -F raw '%s'", base, img);
	sh("qemu-io -f qcow2 -c 'write -P 0x72 1m 3k' '%s' >/dev/null", img);
	dev = must_open(img, NULL);
	g_assert_cmpstr(((struct qcow2 *)qcow2_state(dev))->backing_fmt, ==, "raw");
	compare_with_qemu(dev, img, NULL);
	bdev_close(dev);
	sh("rm -f '%s' '%s'", base, img);
	g_free(base);
	g_free(img);
}

static void test_preallocation(void)
{
	make_and_check("preallocation=metadata", "8M", PATTERN_WRITES);
	make_and_check("preallocation=falloc,cluster_size=4k", "8M", PATTERN_WRITES);
	make_and_check("preallocation=metadata,extended_l2=on", "8M", PATTERN_WRITES);
}

static void test_refcount_bits(void)
{
	make_and_check("refcount_bits=1", "8M", PATTERN_WRITES);
	make_and_check("refcount_bits=64", "8M", PATTERN_WRITES);
}

static void test_zero_clusters(void)
{
	/* zero flags over data (zero-alloc), over nothing (zero-plain), partial */
	make_and_check("cluster_size=64k", "8M",
		       "-c 'write -P 0xaa 0 4m' -c 'write -z 64k 128k' -c 'write -z -u 1m 1m' "
		       "-c 'write -z 5m 64k' -c 'write -z 2m 1000'");
}

static void test_extended_l2(void)
{
	char *base, *img;

	make_and_check("extended_l2=on,cluster_size=64k", "8M",
		       "-c 'write -P 0x11 0 2k' -c 'write -P 0x22 6k 2k' -c 'write -z 10k 2k' "
		       "-c 'write -P 0x33 1m 65536' -c 'write -P 0x44 2m 100k' -c 'write -z 3m 64k'");
	make_and_check("extended_l2=on,cluster_size=2M", "16M",
		       "-c 'write -P 0x11 0 64k' -c 'write -P 0x22 200k 3k' -c 'write -z 4m 256k'");
	if (!have_qemu())
		return;
	/* subclusters left unallocated in an allocated cluster read the backing file */
	base = tpath("ext-base.qcow2");
	img = tpath("ext-top.qcow2");
	sh("qemu-img create -q -f qcow2 '%s' 8M", base);
	sh("qemu-io -f qcow2 -c 'write -P 0xbb 0 8M' '%s' >/dev/null", base);
	sh("qemu-img create -q -f qcow2 -o extended_l2=on -b '%s' -F qcow2 '%s'", base, img);
	sh("qemu-io -f qcow2 -c 'write -P 0x11 2k 2k' -c 'write -z 8k 2k' -c 'write -P 0x22 1m 4k' '%s' >/dev/null", img);
	check_image(img);
	g_unlink(img);
	g_unlink(base);
	g_free(img);
	g_free(base);
}

static void compressed(const char *ctype, const char *csize)
{
	char *src, *img;
	struct bdev *dev;

	if (!have_qemu())
		return;
	src = tpath("src.qcow2");
	img = tpath("comp.qcow2");
	sh("qemu-img create -q -f qcow2 '%s' 8M", src);
	/* compressible, incompressible and empty clusters */
	sh("qemu-io -f qcow2 -c 'write -P 0x5a 0 1m' -c 'write -P 0x11 3m 100k' '%s' >/dev/null", src);
	sh("qemu-img convert -c -O qcow2 -o compression_type=%s,cluster_size=%s '%s' '%s'",
	   ctype, csize, src, img);
	/* and one cluster compressed by qemu-io */
	sh("qemu-io -f qcow2 -c 'write -c -P 0x77 6m %s' '%s' >/dev/null", csize, img);
	dev = must_open(img, NULL);
	compare_with_qemu(dev, img, NULL);
	{
		uint64_t run;
		unsigned st, depth;

		g_assert_cmpint(bdev_block_status(dev, 0, dev->size, &run, &st, &depth), ==, 0);
		g_assert_cmpuint(st, ==, 0);
		g_assert_cmpuint(depth, ==, 1);
	}
	bdev_close(dev);
	sh("rm -f '%s' '%s'", src, img);
	g_free(src);
	g_free(img);
}

static void test_compressed_zlib(void)
{
	compressed("zlib", "64k");
	compressed("zlib", "512");
	compressed("zlib", "2M");
}

static void test_compressed_zstd(void)
{
	compressed("zstd", "64k");
	compressed("zstd", "4k");
	compressed("zstd", "2M");
}

static void test_compressed_random(void)
{
	char *raw, *img;

	if (!have_qemu())
		return;
	raw = tpath("rnd.raw");
	img = tpath("rnd.qcow2");
	/* half random (stored uncompressed by qemu), half text (compressed) */
	sh("head -c 2097152 /dev/urandom > '%s' && seq 1 400000 | head -c 2097152 >> '%s'", raw, raw);
	sh("qemu-img convert -c -f raw -O qcow2 -o compression_type=zstd '%s' '%s'", raw, img);
	check_image(img);
	sh("qemu-img convert -c -f raw -O qcow2 -o cluster_size=4k '%s' '%s'", raw, img);
	check_image(img);
	sh("rm -f '%s' '%s'", raw, img);
	g_free(raw);
	g_free(img);
}

static void test_backing_chain(void)
{
	char *dir, *base, *mid, *top;
	struct image_opts nb = { .no_backing = true };
	struct bdev *dev;
	uint64_t run;
	unsigned st, depth;
	uint8_t buf[4096];

	if (!have_qemu())
		return;
	dir = tpath("chain");
	g_assert_cmpint(g_mkdir(dir, 0755), ==, 0);
	base = g_strdup_printf("%s/base.raw", dir);
	mid = g_strdup_printf("%s/mid.qcow2", dir);
	top = g_strdup_printf("%s/top.qcow2", dir);
	/* raw base of 6M under an 8M chain: past its end reads zeroes */
	sh("qemu-img create -q -f raw '%s' 6M && qemu-io -f raw -c 'write -P 0xb0 0 6M' '%s' >/dev/null", base, base);
	/* relative names, resolved from the overlay's directory */
	sh("cd '%s' && qemu-img create -q -f qcow2 -b base.raw -F raw mid.qcow2 8M", dir);
	sh("qemu-io -f qcow2 -c 'write -P 0xc1 1m 192k' -c 'write -z 2m 64k' '%s' >/dev/null", mid);
	sh("cd '%s' && qemu-img create -q -f qcow2 -b mid.qcow2 -F qcow2 top.qcow2 8M", dir);
	sh("qemu-io -f qcow2 -c 'write -P 0xd2 1m 4k' -c 'write -P 0xd3 4m 4k' '%s' >/dev/null", top);
	check_image(top);

	dev = must_open(top, NULL);
	g_assert_cmpstr(qcow2_backing_name(dev), ==, "mid.qcow2");
	/* depth: 1 top, 2 mid, 3 base, 0 nowhere */
	g_assert_cmpint(bdev_block_status(dev, 1 << 20, 4096, &run, &st, &depth), ==, 0);
	g_assert_cmpuint(depth, ==, 1);
	g_assert_cmpint(bdev_block_status(dev, (1 << 20) + 65536, 4096, &run, &st, &depth), ==, 0);
	g_assert_cmpuint(depth, ==, 2);
	g_assert_cmpuint(st, ==, 0);
	g_assert_cmpint(bdev_block_status(dev, 3 << 20, 4096, &run, &st, &depth), ==, 0);
	g_assert_cmpuint(depth, ==, 3);
	g_assert_cmpuint(st, ==, 0);
	g_assert_cmpint(bdev_block_status(dev, 2 << 20, 4096, &run, &st, &depth), ==, 0);
	g_assert_cmpuint(depth, ==, 2);
	g_assert_cmpuint(st, ==, BDEV_ST_ZERO | BDEV_ST_HOLE);
	g_assert_cmpint(bdev_block_status(dev, 7 << 20, 4096, &run, &st, &depth), ==, 0);
	g_assert_cmpuint(depth, ==, 0);
	g_assert_cmpuint(st, ==, BDEV_ST_ZERO | BDEV_ST_HOLE);
	bdev_close(dev);

	/* --no-backing: unallocated reads as zeroes */
	dev = must_open(top, &nb);
	g_assert_cmpint(bdev_pread(dev, buf, sizeof(buf), 0), ==, 0);
	g_assert_true(buf_is_zero(buf, sizeof(buf)));
	g_assert_cmpint(bdev_pread(dev, buf, sizeof(buf), 1 << 20), ==, 0);
	g_assert_cmpuint(buf[0], ==, 0xd2);
	g_assert_cmpint(bdev_block_status(dev, 0, 4096, &run, &st, &depth), ==, 0);
	g_assert_cmpuint(depth, ==, 0);
	bdev_close(dev);

	sh("rm -rf '%s'", dir);
	g_free(base);
	g_free(mid);
	g_free(top);
	g_free(dir);
}

static void test_backing_refusals(void)
{
	char *img;
	struct err e = { 0 };
	struct bdev *dev;

	if (!have_qemu())
		return;
	img = tpath("loop.qcow2");
	/* a chain that loops back (a -> b -> a) is refused */
	sh("qemu-img create -q -f qcow2 -u -b '%s.b' -F qcow2 '%s' 1M", img, img);
	sh("qemu-img create -q -f qcow2 -u -b '%s' -F qcow2 '%s.b' 1M", img, img);
	g_assert_cmpint(open_img(img, NULL, &dev, &e), ==, -ELOOP);
	g_test_message("loop: %s", e.msg);
	sh("rm -f '%s' '%s.b'", img, img);
	/* without a backing format extension the backing file is probed */
	{
		char *base = tpath("nofmt-base.qcow2");
		uint64_t off = 112;
		struct bdev *d;

		sh("qemu-img create -q -f qcow2 '%s' 1M && qemu-io -f qcow2 -c 'write -P 0x5b 0 64k' '%s' >/dev/null",
		   base, base);
		sh("qemu-img create -q -f qcow2 -b '%s' -F qcow2 '%s' 1M", base, img);
		for (;;) {
			uint64_t w = peek64(img, off);

			g_assert_cmpuint(w >> 32, !=, 0);
			if (w >> 32 == QCOW2_EXT_BACKING_FMT) {
				patch32(img, off, 0x12345678); /* now an unknown extension */
				break;
			}
			off += 8 + (((uint32_t)w + 7) & ~7u);
		}
		d = must_open(img, NULL);
		g_assert_null(((struct qcow2 *)qcow2_state(d))->backing_fmt);
		g_assert_cmpuint(((struct qcow2 *)qcow2_state(d))->nexts, ==, 1);
		compare_with_qemu(d, img, NULL);
		bdev_close(d);
		g_unlink(img);
		g_unlink(base);
		g_free(base);
	}
	/* protocol syntax from an image is never followed */
	memset(&e, 0, sizeof(e));
	sh("qemu-img create -q -f qcow2 -u -b 'nbd://127.0.0.1/x' -F raw '%s' 1M", img);
	g_assert_cmpint(open_img(img, NULL, &dev, &e), <, 0);
	g_assert_nonnull(strstr(e.msg, "protocol"));
	g_unlink(img);
	g_free(img);
}

static void test_data_file(void)
{
	char *dir, *img, *img2;

	if (!have_qemu())
		return;
	dir = tpath("df");
	g_assert_cmpint(g_mkdir(dir, 0755), ==, 0);
	img = g_strdup_printf("%s/df.qcow2", dir);
	img2 = g_strdup_printf("%s/dfraw.qcow2", dir);
	/* absolute data-file names (qemu 7.2 resolves relative ones from its cwd) */
	sh("qemu-img create -q -f qcow2 -o data_file='%s/df.data' '%s' 8M", dir, img);
	sh("qemu-io -f qcow2 %s '%s' >/dev/null", PATTERN_WRITES " -c 'write -z 5m 1m'", img);
	check_image(img);
	sh("qemu-img create -q -f qcow2 -o data_file='%s/dfraw.data',data_file_raw=on '%s' 8M", dir, img2);
	sh("qemu-io -f qcow2 %s '%s' >/dev/null", PATTERN_WRITES, img2);
	check_image(img2);
	/* a relative name resolves from the image's directory */
	sh("cd '%s' && qemu-img create -q -f qcow2 -o data_file=rel.data rel.qcow2 4M && "
	   "qemu-io -f qcow2 -c 'write -P 0x42 1m 64k' rel.qcow2 >/dev/null", dir);
	{
		char *rel = g_strdup_printf("%s/rel.qcow2", dir);
		struct bdev *dev = must_open(rel, NULL);
		uint8_t b[512];

		g_assert_cmpint(bdev_pread(dev, b, sizeof(b), 1 << 20), ==, 0);
		g_assert_cmpuint(b[0], ==, 0x42);
		g_assert_cmpuint(qcow2_snapshot_count(dev), ==, 0);
		bdev_close(dev);
		g_free(rel);
	}
	sh("rm -rf '%s'", dir);
	g_free(img);
	g_free(img2);
	g_free(dir);
}

static void test_dirty_lazy_refcounts(void)
{
	char *img, *raw;
	struct bdev *dev;
	gchar *ref;
	gsize ref_len;
	uint8_t *got;

	if (!have_qemu())
		return;
	img = tpath("dirty.qcow2");
	raw = tpath("dirty.raw");
	sh("qemu-img create -q -f qcow2 -o lazy_refcounts=on '%s' 8M", img);
	sh("qemu-io -f qcow2 %s '%s' >/dev/null", PATTERN_WRITES, img);
	sh("qemu-img convert -O raw '%s' '%s'", img, raw);
	/* as left by a crash: dirty bit set (qemu would repair on a r/w open) */
	patch64(img, 72, peek64(img, 72) | QCOW2_INCOMPAT_DIRTY);
	dev = must_open(img, NULL);
	g_assert_true(g_file_get_contents(raw, &ref, &ref_len, NULL));
	got = read_all(dev, 1 << 20);
	g_assert_cmpmem(got, dev->size, ref, ref_len);
	g_free(got);
	g_free(ref);
	bdev_close(dev);
	sh("rm -f '%s' '%s'", img, raw);

	/* a real crash: qemu-io killed by SIGKILL after writing, refcounts
	 * never written (qemu-img check reports errors; reading is fine) */
	sh("qemu-img create -q -f qcow2 -o lazy_refcounts=on '%s' 8M", img);
	sh("qemu-io -f qcow2 %s -c 'sigraise 9' '%s' >/dev/null 2>&1 || true", PATTERN_WRITES, img);
	g_assert_true(peek64(img, 72) & QCOW2_INCOMPAT_DIRTY);
	check_image(img);
	g_unlink(img);
	g_free(img);
	g_free(raw);
}

static void test_snapshots(void)
{
	char *img;
	struct bdev *dev, *snap;
	const struct qcow2_snapshot_info *info;
	struct err e = { 0 };

	if (!have_qemu())
		return;
	img = tpath("snap.qcow2");
	sh("qemu-img create -q -f qcow2 '%s' 8M", img);
	sh("qemu-io -f qcow2 -c 'write -P 0x01 0 2m' -c 'write -P 0x02 5m 64k' '%s' >/dev/null", img);
	sh("qemu-img snapshot -c before '%s'", img);
	sh("qemu-io -f qcow2 -c 'write -P 0x03 1m 2m' -c 'write -z 5m 4k' '%s' >/dev/null", img);
	sh("qemu-img resize -q '%s' 12M", img);
	sh("qemu-img snapshot -c after '%s'", img);
	sh("qemu-io -f qcow2 -c 'write -P 0x04 0 12m' '%s' >/dev/null", img);

	dev = must_open(img, NULL);
	compare_with_qemu(dev, img, NULL);
	g_assert_cmpuint(qcow2_snapshot_count(dev), ==, 2);
	info = qcow2_snapshot_get(dev, 0);
	g_assert_cmpstr(info->id, ==, "1");
	g_assert_cmpstr(info->name, ==, "before");
	g_assert_cmpuint(info->disk_size, ==, 8 << 20);
	g_assert_cmpuint(info->vm_state_size, ==, 0);
	g_assert_cmpuint(info->date_sec, >, 1000000000);
	info = qcow2_snapshot_get(dev, 1);
	g_assert_cmpstr(info->name, ==, "after");
	g_assert_cmpuint(info->disk_size, ==, 12 << 20);
	g_assert_null(qcow2_snapshot_get(dev, 2));

	g_assert_cmpint(qcow2_snapshot_open(dev, 0, &snap, &e), ==, 0);
	g_assert_cmpstr(snap->kind, ==, "snapshot");
	g_assert_true(snap->read_only);
	compare_with_qemu(snap, img, "-l snapshot.id=1");
	g_assert_cmpint(bdev_pwrite(snap, "x", 1, 0, 0), ==, -EROFS);
	bdev_close(snap);
	g_assert_cmpint(qcow2_snapshot_open(dev, 1, &snap, &e), ==, 0);
	compare_with_qemu(snap, img, "-l snapshot.name=after");
	bdev_close(snap);
	g_assert_cmpint(qcow2_snapshot_open(dev, 2, &snap, &e), ==, -ENOENT);
	bdev_close(dev);
	g_unlink(img);
	g_free(img);
}

/* Snapshot entries whose L1 or extra data is malformed. */
static void test_snapshot_bad_l1(void)
{
	char *img;
	struct bdev *dev, *snap;
	struct err e = { 0 };
	uint64_t snap_off;

	if (!have_qemu())
		return;
	img = tpath("snapbad.qcow2");
	sh("qemu-img create -q -f qcow2 '%s' 8M", img);
	sh("qemu-io -f qcow2 -c 'write -P 0x01 0 2m' '%s' >/dev/null", img);
	sh("qemu-img snapshot -c s1 '%s'", img);
	snap_off = peek64(img, 64);
	patch64(img, snap_off, peek64(img, snap_off) + 512); /* unaligned L1 */
	dev = must_open(img, NULL);
	g_assert_cmpuint(qcow2_snapshot_count(dev), ==, 1);
	g_assert_cmpint(qcow2_snapshot_open(dev, 0, &snap, &e), ==, -EINVAL);
	g_assert_nonnull(strstr(e.msg, "snapshot '1' L1 table"));
	bdev_close(dev);
	/* an entry whose L1 is too large for qemu's limit (CVE-2014-0145) */
	patch64(img, snap_off, peek64(img, snap_off) - 512);
	patch32(img, snap_off + 8, 0x10000000);
	dev = must_open(img, NULL);
	memset(&e, 0, sizeof(e));
	g_assert_cmpint(qcow2_snapshot_open(dev, 0, &snap, &e), ==, -EFBIG);
	bdev_close(dev);
	/* an extra data size over 1024 is refused at open */
	patch32(img, snap_off + 36, 2000);
	memset(&e, 0, sizeof(e));
	g_assert_cmpint(open_img(img, NULL, &dev, &e), ==, -EFBIG);
	g_assert_nonnull(strstr(e.msg, "extra data too large"));
	g_unlink(img);
	g_free(img);
}

/* ---- damage: EIO for that range only ------------------------------------ */

static void test_damage(void)
{
	char *img;
	struct bdev *dev;
	uint64_t l1_off, l2_off, e1;
	uint8_t buf[65536];
	uint64_t run;
	unsigned st, depth;

	if (!have_qemu())
		return;
	img = tpath("damage.qcow2");
	sh("qemu-img create -q -f qcow2 '%s' 8M", img);
	sh("qemu-io -f qcow2 -c 'write -P 0x11 0 256k' '%s' >/dev/null", img);
	l1_off = peek64(img, 40);
	l2_off = peek64(img, l1_off) & QCOW2_OFFSET_MASK;
	/* cluster 1 past the end of the file, cluster 2 unaligned */
	e1 = peek64(img, l2_off + 8);
	patch64(img, l2_off + 8, QCOW2_OFLAG_COPIED | 1ull << 40);
	patch64(img, l2_off + 16, peek64(img, l2_off + 16) + 512);
	dev = must_open(img, NULL);
	g_assert_cmpint(bdev_pread(dev, buf, sizeof(buf), 0), ==, 0);
	g_assert_cmpuint(buf[100], ==, 0x11);
	g_assert_cmpint(bdev_pread(dev, buf, 512, 65536 + 512), ==, -EIO);
	g_assert_cmpint(bdev_pread(dev, buf, sizeof(buf), 60000), ==, -EIO);
	g_assert_cmpint(bdev_pread(dev, buf, 512, 2 * 65536), ==, -EIO);
	g_assert_cmpint(bdev_block_status(dev, 2 * 65536, 65536, &run, &st, &depth), ==, -EIO);
	/* each damaged entry is logged once, however often it is read */
	g_assert_cmpuint(qcow2_state(dev)->damage_logged, ==, 2);
	g_assert_cmpint(bdev_pread(dev, buf, sizeof(buf), 3 * 65536), ==, 0);
	g_assert_cmpuint(buf[0], ==, 0x11);
	/* a run stops before damage: status of cluster 0 still answers */
	g_assert_cmpint(bdev_block_status(dev, 0, 4 * 65536, &run, &st, &depth), ==, 0);
	g_assert_cmpuint(run, ==, 65536);
	bdev_close(dev);

	/* a file cut short inside its last data cluster: EIO there, not zeroes */
	{
		char *cut = tpath("cut.qcow2");
		struct stat stbuf;

		sh("qemu-img create -q -f qcow2 '%s' 1M && qemu-io -f qcow2 -c 'write -P 0x11 0 256k' '%s' >/dev/null",
		   cut, cut);
		g_assert_cmpint(stat(cut, &stbuf), ==, 0);
		g_assert_cmpint(truncate(cut, stbuf.st_size - 1000), ==, 0);
		dev = must_open(cut, NULL);
		g_assert_cmpint(bdev_pread(dev, buf, sizeof(buf), 3 * 65536), ==, -EIO);
		g_assert_cmpint(bdev_pread(dev, buf, 512, 3 * 65536), ==, 0);
		g_assert_cmpint(bdev_pread(dev, buf, sizeof(buf), 0), ==, 0);
		g_assert_cmpuint(buf[65535], ==, 0x11);
		bdev_close(dev);
		g_unlink(cut);
		g_free(cut);
	}

	/* L1 entry pointing past the end of the file: that 512 MiB range only */
	patch64(img, l2_off + 8, e1);
	patch64(img, l1_off, QCOW2_OFLAG_COPIED | 1ull << 40);
	dev = must_open(img, NULL);
	g_assert_cmpint(bdev_pread(dev, buf, 512, 0), ==, -EIO);
	bdev_close(dev);
	g_unlink(img);
	g_free(img);
}

static void test_damage_compressed(void)
{
	char *img;
	struct bdev *dev;
	uint64_t l1_off, l2_off, e0, coff, csize;
	uint8_t buf[65536], junk[64];

	if (!have_qemu())
		return;
	img = tpath("cdamage.qcow2");
	sh("qemu-img create -q -f qcow2 '%s' 1M", img);
	sh("qemu-io -f qcow2 -c 'write -c -P 0x11 0 64k' -c 'write -c -P 0x22 64k 64k' '%s' >/dev/null", img);
	l1_off = peek64(img, 40);
	l2_off = peek64(img, l1_off) & QCOW2_OFFSET_MASK;
	e0 = peek64(img, l2_off);
	g_assert_true(e0 & QCOW2_OFLAG_COMPRESSED);
	qcow2_compressed_decode(16, e0, &coff, &csize);
	memset(junk, 0xff, sizeof(junk));
	patch(img, coff, junk, sizeof(junk));
	/* cluster 1's descriptor points past the end of the file */
	patch64(img, l2_off + 8, QCOW2_OFLAG_COMPRESSED | 1ull << 40);
	dev = must_open(img, NULL);
	g_assert_cmpint(bdev_pread(dev, buf, 512, 0), ==, -EIO);
	g_assert_cmpint(bdev_pread(dev, buf, 512, 65536), ==, -EIO);
	g_assert_cmpint(bdev_pread(dev, buf, sizeof(buf), 2 * 65536), ==, 0);
	g_assert_true(buf_is_zero(buf, sizeof(buf)));
	bdev_close(dev);
	g_unlink(img);
	g_free(img);

	/* the decompressor itself: garbage input */
	{
		uint8_t out[4096], src[4096];

		memset(src, 0, sizeof(src));
		g_assert_cmpint(qcow2_decompress(QCOW2_COMPRESS_ZLIB, out, sizeof(out), src, 10), ==, -EIO);
		g_assert_cmpint(qcow2_decompress(QCOW2_COMPRESS_ZSTD, out, sizeof(out), src, 10), ==, -EIO);
		g_assert_cmpint(qcow2_decompress(7, out, sizeof(out), src, 10), ==, -EIO);
	}
}

/* Raw deflate (window 12, as qemu writes) or a zstd frame of n bytes. */
static size_t compress_buf(unsigned type, const uint8_t *in, size_t n, uint8_t *out, size_t cap)
{
	if (type == QCOW2_COMPRESS_ZSTD) {
		size_t r = ZSTD_compress(out, cap, in, n, 3);

		g_assert_false(ZSTD_isError(r));
		return r;
	} else {
		z_stream z;

		memset(&z, 0, sizeof(z));
		g_assert_cmpint(deflateInit2(&z, Z_DEFAULT_COMPRESSION, Z_DEFLATED, -12, 9,
					     Z_DEFAULT_STRATEGY), ==, Z_OK);
		z.next_in = (Bytef *)in;
		z.avail_in = (uInt)n;
		z.next_out = out;
		z.avail_out = (uInt)cap;
		g_assert_cmpint(deflate(&z, Z_FINISH), ==, Z_STREAM_END);
		deflateEnd(&z);
		return cap - z.avail_out;
	}
}

/* A cluster must decompress to exactly one cluster: not less, not more. */
static void test_decompress_exact(void)
{
	enum { CL = 4096 };
	uint8_t in[CL + 1], comp[2 * CL + 512], out[CL];

	for (unsigned i = 0; i < sizeof(in); i++)
		in[i] = (uint8_t)(i % 251 ^ i >> 8);
	for (unsigned type = 0; type <= 1; type++) {
		size_t n;

		n = compress_buf(type, in, CL, comp, sizeof(comp));
		/* trailing bytes of a shared sector are fine */
		memset(comp + n, 0xa5, 100);
		g_assert_cmpint(qcow2_decompress(type, out, CL, comp, n + 100), ==, 0);
		g_assert_cmpmem(out, CL, in, CL);
		g_assert_cmpint(qcow2_decompress(type, out, CL, comp, n), ==, 0);
		/* cut short */
		g_assert_cmpint(qcow2_decompress(type, out, CL, comp, n / 2), ==, -EIO);
		n = compress_buf(type, in, CL - 1, comp, sizeof(comp));
		g_assert_cmpint(qcow2_decompress(type, out, CL, comp, n), ==, -EIO);
		n = compress_buf(type, in, CL + 1, comp, sizeof(comp));
		g_assert_cmpint(qcow2_decompress(type, out, CL, comp, n), ==, -EIO);
	}
}

/* ---- block status against qemu-img map ----------------------------------- */

static bool json_u64(const char *line, const char *key, uint64_t *v)
{
	const char *p = strstr(line, key);

	if (!p)
		return false;
	*v = g_ascii_strtoull(p + strlen(key), NULL, 10);
	return true;
}

/*
 * Every extent qemu-img map reports agrees with our block status: data is
 * data (at the same depth), and what is not data reads as zeroes.
 */
static void compare_map(struct bdev *dev, const char *path)
{
	gchar *out = NULL, *cmd = g_strdup_printf("qemu-img map --output=json '%s'", path);
	gchar **lines;
	gint status;
	uint64_t covered = 0;

	g_assert_true(g_spawn_command_line_sync(cmd, &out, NULL, &status, NULL));
	g_assert_true(g_spawn_check_wait_status(status, NULL));
	lines = g_strsplit(out, "\n", -1);
	for (gchar **l = lines; *l; l++) {
		uint64_t start = 0, length = 0, qdepth = 0, off;
		bool data;

		if (!json_u64(*l, "\"start\": ", &start))
			continue;
		g_assert_true(json_u64(*l, "\"length\": ", &length));
		g_assert_true(json_u64(*l, "\"depth\": ", &qdepth));
		g_assert_cmpuint(start, ==, covered); /* qemu's map has no gaps */
		covered += length;
		data = strstr(*l, "\"data\": true") != NULL;
		for (off = start; off < start + length;) {
			uint64_t run;
			unsigned st, depth;

			g_assert_cmpint(bdev_block_status(dev, off, start + length - off, &run, &st, &depth), ==, 0);
			if (data) {
				g_assert_cmpuint(st & BDEV_ST_HOLE, ==, 0);
				g_assert_cmpuint(depth, ==, qdepth + 1);
			} else {
				g_assert_cmpuint(st & BDEV_ST_ZERO, ==, BDEV_ST_ZERO);
			}
			off += run;
		}
	}
	/* the map compared the whole disk, not nothing */
	g_assert_cmpuint(covered, ==, dev->size);
	g_strfreev(lines);
	g_free(out);
	g_free(cmd);
}

static void test_block_status_map(void)
{
	static const char *const opts[] = {
		"cluster_size=64k", "extended_l2=on", "cluster_size=512", "compat=0.10",
	};
	char *base, *img;

	if (!have_qemu())
		return;
	base = tpath("mapbase.qcow2");
	img = tpath("map.qcow2");
	sh("qemu-img create -q -f qcow2 '%s' 8M && qemu-io -f qcow2 -c 'write -P 1 2m 2m' -c 'write -z 5m 1m' '%s' >/dev/null",
	   base, base);
	for (unsigned i = 0; i < G_N_ELEMENTS(opts); i++) {
		struct bdev *dev;

		sh("qemu-img create -q -f qcow2 -o %s -b '%s' -F qcow2 '%s' 8M", opts[i], base, img);
		sh("qemu-io -f qcow2 -c 'write -P 2 0 2k' -c 'write -P 3 100k 200k' -c 'write -c -P 4 1m 64k' "
		   "-c 'write -z 3m 4k' -c 'write -P 5 5m 4k' '%s' >/dev/null", img);
		dev = must_open(img, NULL);
		compare_map(dev, img);
		compare_with_qemu(dev, img, NULL);
		bdev_close(dev);
	}
	sh("rm -f '%s' '%s'", base, img);
	g_free(base);
	g_free(img);
}

/* ---- hostile metadata: corrupt bytes must never crash ------------------- */

/* Read (up to 64 MiB at each end of) dev and walk its block status. */
static void read_everything(struct bdev *dev)
{
	const uint64_t cap = 64 << 20;
	uint8_t *buf = g_malloc(1 << 20);
	uint64_t run, tail = dev->size > 2 * cap ? dev->size - cap : 0;
	unsigned st, depth;

	for (uint64_t off = 0; off < dev->size; off += 1 << 20) {
		if (off == cap && tail)
			off = tail;
		(void)bdev_pread(dev, buf, MIN(1 << 20, dev->size - off), off);
	}
	for (uint64_t off = 0, n = 0; off < dev->size && n < 100000; n++)
		off += bdev_block_status(dev, off, dev->size - off, &run, &st, &depth) == 0 ? run : 65536;
	g_free(buf);
}

/*
 * Random bytes in the metadata of several kinds of image: opening is
 * refused with a message, or everything reads (EIO allowed) without a
 * crash.  Run under the sanitizers; QCOW2_FUZZ_ITERS makes it longer.
 */
static void test_fuzz_metadata(void)
{
	static const char *const kinds[] = {
		/* 4 KiB clusters keep the metadata in the first few clusters */
		"cluster_size=4k",
		"cluster_size=16k,extended_l2=on",
		"cluster_size=4k,compression_type=zstd,lazy_refcounts=on",
		"cluster_size=512,compat=0.10",
	};
	const char *env = g_getenv("QCOW2_FUZZ_ITERS");
	unsigned iters = env ? (unsigned)atoi(env) : 1000, opened = 0;
	char *good[G_N_ELEMENTS(kinds)], *bad, *base;
	gchar *orig[G_N_ELEMENTS(kinds)];
	gsize len[G_N_ELEMENTS(kinds)];
	GRand *rnd;

	if (!have_qemu())
		return;
	bad = tpath("fuzz-bad.qcow2");
	base = tpath("fuzz-base.qcow2");
	sh("qemu-img create -q -f qcow2 '%s' 2M && qemu-io -f qcow2 -c 'write -P 9 0 2M' '%s' >/dev/null",
	   base, base);
	for (unsigned k = 0; k < G_N_ELEMENTS(kinds); k++) {
		good[k] = tpath("fuzz-good.qcow2");
		sh("qemu-img create -q -f qcow2 -o %s -b '%s' -F qcow2 '%s' 2M", kinds[k], base, good[k]);
		sh("qemu-io -f qcow2 -c 'write -P 1 0 64k' -c 'write -c -P 2 128k 16k' -c 'write -z 256k 16k' "
		   "-c 'write -P 4 300k 1k' '%s' >/dev/null", good[k]);
		sh("qemu-img snapshot -c s1 '%s' && qemu-io -f qcow2 -c 'write -P 3 4k 4k' '%s' >/dev/null",
		   good[k], good[k]);
		g_assert_true(g_file_get_contents(good[k], &orig[k], &len[k], NULL));
	}
	rnd = g_rand_new_with_seed(20261123);
	for (unsigned iter = 0; iter < iters; iter++) {
		unsigned k = iter % G_N_ELEMENTS(kinds);
		gchar *copy = g_memdup2(orig[k], len[k]);
		struct bdev *dev;
		struct err e = { 0 };
		unsigned flips = 1 + g_rand_int_range(rnd, 0, 8);

		for (unsigned f = 0; f < flips; f++) {
			/* sometimes the header, mostly anywhere in the metadata */
			gsize at = g_rand_int_range(rnd, 0, 4) == 0 ? (gsize)g_rand_int_range(rnd, 0, 112)
						       : (gsize)g_rand_int_range(rnd, 0, (gint32)MIN(len[k], 65536));
			copy[at] = (gchar)g_rand_int_range(rnd, 0, 256);
		}
		g_assert_true(g_file_set_contents(bad, copy, (gssize)len[k], NULL));
		g_free(copy);
		if (open_img(bad, NULL, &dev, &e) < 0) {
			g_assert_cmpstr(e.msg, !=, "");
			continue;
		}
		opened++;
		read_everything(dev);
		for (unsigned i = 0; i < qcow2_snapshot_count(dev); i++) {
			struct bdev *snap;

			memset(&e, 0, sizeof(e));
			if (qcow2_snapshot_open(dev, i, &snap, &e) == 0) {
				read_everything(snap);
				bdev_close(snap);
			}
		}
		bdev_close(dev);
	}
	g_test_message("%u of %u damaged images opened and were read through", opened, iters);
	g_assert_cmpuint(opened, >, iters / 10);
	g_rand_free(rnd);
	for (unsigned k = 0; k < G_N_ELEMENTS(kinds); k++) {
		g_free(orig[k]);
		g_unlink(good[k]);
		g_free(good[k]);
	}
	sh("rm -f '%s' '%s'", bad, base);
	g_free(bad);
	g_free(base);
}

/* ---- threads and the cache ----------------------------------------------- */

struct reader {
	struct bdev *dev;
	const uint8_t *ref;
	unsigned seed;
	int failures;
};

static void *reader_main(void *opaque)
{
	struct reader *rd = opaque;
	uint8_t *buf = g_malloc(256 * 1024);

	for (unsigned i = 0; i < 400; i++) {
		uint64_t off = (uint64_t)rand_r(&rd->seed) % rd->dev->size;
		size_t len = 1 + (size_t)rand_r(&rd->seed) % (256 * 1024);

		len = MIN(len, rd->dev->size - off);
		if (bdev_pread(rd->dev, buf, len, off) < 0 || memcmp(buf, rd->ref + off, len))
			rd->failures++;
	}
	g_free(buf);
	return NULL;
}

static void test_threads_small_cache(void)
{
	char *img, *raw;
	struct image_opts small = { .cache_bytes = 1 };
	struct reader rd[8];
	pthread_t th[8];
	struct bdev *dev;
	gchar *ref;
	gsize ref_len;

	if (!have_qemu())
		return;
	img = tpath("threads.qcow2");
	raw = tpath("threads.raw");
	/* 4 KiB clusters over 64 MiB: 128 L2 tables, far more slices than 16 */
	sh("qemu-img create -q -f qcow2 -o cluster_size=4k '%s' 64M", img);
	sh("qemu-io -f qcow2 -c 'write -P 0x11 0 20m' -c 'write -P 0x22 30m 5m' -c 'write -z 40m 1m' "
	   "-c 'write -c -P 0x33 50m 1m' -c 'write -P 0x44 63m 1m' '%s' >/dev/null", img);
	sh("qemu-img convert -O raw '%s' '%s'", img, raw);
	g_assert_true(g_file_get_contents(raw, &ref, &ref_len, NULL));
	dev = must_open(img, &small);
	for (unsigned i = 0; i < 8; i++) {
		rd[i] = (struct reader){ dev, (const uint8_t *)ref, i + 1, 0 };
		pthread_create(&th[i], NULL, reader_main, &rd[i]);
	}
	for (unsigned i = 0; i < 8; i++) {
		pthread_join(th[i], NULL);
		g_assert_cmpint(rd[i].failures, ==, 0);
	}
	bdev_close(dev);
	g_free(ref);
	sh("rm -f '%s' '%s'", img, raw);
	g_free(img);
	g_free(raw);
}

/* Opening is O(header + L1): a 1 TiB image with data at both ends. */
/*
 * bdev_pread_nowait: what needs the disk (an L2 slice not cached, a
 * compressed cluster not decompressed yet) is -EAGAIN, what is in memory
 * reads exactly as bdev_pread does.
 */
static void expect_bytes(const uint8_t *buf, size_t n, uint8_t v)
{
	for (size_t i = 0; i < n; i++)
		if (buf[i] != v)
			g_error("byte %zu is 0x%02x, not 0x%02x", i, buf[i], v);
}

static void test_read_nowait(void)
{
	char *img;
	struct bdev *dev;
	uint8_t buf[8192];

	if (!have_qemu())
		return;
	img = tpath("nowait.qcow2");
	sh("qemu-img create -q -f qcow2 '%s' 1G", img);
	sh("qemu-io -f qcow2 -c 'write -P 0x11 0 1M' -c 'write -c -P 0x22 2M 64k' "
	   "-c 'write -P 0x33 600M 64k' '%s' >/dev/null", img);
	dev = must_open(img, NULL);
	/* nothing cached yet: the L2 table must be read */
	g_assert_cmpint(bdev_pread_nowait(dev, buf, 4096, 0), ==, -EAGAIN);
	g_assert_cmpint(bdev_pread(dev, buf, 4096, 0), ==, 0);
	/* the slice is cached now; the data is in the host's page cache
	 * (qemu-io just wrote it, bdev_pread just read it) */
	memset(buf, 0xee, sizeof(buf));
	g_assert_cmpint(bdev_pread_nowait(dev, buf, 4096, 0), ==, 0);
	expect_bytes(buf, 4096, 0x11);
	/* unallocated, under the same L2 table: zeroes from memory */
	memset(buf, 0xee, sizeof(buf));
	g_assert_cmpint(bdev_pread_nowait(dev, buf, sizeof(buf), 8 << 20), ==, 0);
	expect_bytes(buf, sizeof(buf), 0);
	/* a compressed cluster: not until it has been decompressed once */
	g_assert_cmpint(bdev_pread_nowait(dev, buf, 4096, 2 << 20), ==, -EAGAIN);
	g_assert_cmpint(bdev_pread(dev, buf, 4096, 2 << 20), ==, 0);
	memset(buf, 0xee, sizeof(buf));
	g_assert_cmpint(bdev_pread_nowait(dev, buf, 4096, (2 << 20) + 4096), ==, 0);
	expect_bytes(buf, 4096, 0x22);
	/* another L2 table (512 MiB per table with 64 KiB clusters) */
	g_assert_cmpint(bdev_pread_nowait(dev, buf, 4096, 600 << 20), ==, -EAGAIN);
	/* out of range is -EAGAIN too: bdev_pread says why */
	g_assert_cmpint(bdev_pread_nowait(dev, buf, 4096, dev->size), ==, -EAGAIN);
	bdev_close(dev);
	g_free(img);
}

static void test_big_image(void)
{
	char *img;
	struct bdev *dev;
	uint8_t buf[4096];
	gint64 t0;

	if (!have_qemu())
		return;
	img = tpath("big.qcow2");
	sh("qemu-img create -q -f qcow2 '%s' 1T", img);
	sh("qemu-io -f qcow2 -c 'write -P 0x61 0 4k' -c 'write -P 0x62 1023g 4k' '%s' >/dev/null", img);
	t0 = g_get_monotonic_time();
	dev = must_open(img, NULL);
	g_assert_cmpint(g_get_monotonic_time() - t0, <, 500000);
	g_assert_cmpuint(dev->size, ==, 1ull << 40);
	g_assert_cmpint(bdev_pread(dev, buf, sizeof(buf), 1023ull << 30), ==, 0);
	g_assert_cmpuint(buf[4095], ==, 0x62);
	g_assert_cmpint(bdev_pread(dev, buf, sizeof(buf), 512ull << 30), ==, 0);
	g_assert_true(buf_is_zero(buf, sizeof(buf)));
	g_assert_cmpint(bdev_pwrite(dev, buf, 512, 0, 0), ==, -EROFS);
	bdev_close(dev);
	g_unlink(img);
	g_free(img);
}

int main(int argc, char **argv)
{
	int r;

	g_test_init(&argc, &argv, NULL);
	log_set_level(LOG_LVL_ERR); /* damage tests warn on purpose */
	tmpdir = g_dir_make_tmp("test-qcow2-XXXXXX", NULL);
	g_assert_nonnull(tmpdir);

	g_test_add_func("/qcow2/probe", test_probe);
	g_test_add_func("/qcow2/l2/standard", test_l2_standard);
	g_test_add_func("/qcow2/l2/extended", test_l2_extended);
	g_test_add_func("/qcow2/compressed-descriptor", test_compressed_desc);
	g_test_add_func("/qcow2/cache/lru", test_cache_lru);
	g_test_add_func("/qcow2/header/refusals", test_header_refusals);
	g_test_add_func("/qcow2/header/feature-name", test_header_feature_name);
	g_test_add_func("/qcow2/header/features", test_header_features);
	g_test_add_func("/qcow2/read/cluster-512", test_cluster_512);
	g_test_add_func("/qcow2/read/cluster-2m", test_cluster_2m);
	g_test_add_func("/qcow2/read/cluster-sizes", test_cluster_sizes);
	g_test_add_func("/qcow2/read/v2", test_v2);
	g_test_add_func("/qcow2/read/refcount-bits", test_refcount_bits);
	g_test_add_func("/qcow2/read/preallocation", test_preallocation);
	g_test_add_func("/qcow2/read/zero-clusters", test_zero_clusters);
	g_test_add_func("/qcow2/read/extended-l2", test_extended_l2);
	g_test_add_func("/qcow2/read/compressed-zlib", test_compressed_zlib);
	g_test_add_func("/qcow2/read/compressed-zstd", test_compressed_zstd);
	g_test_add_func("/qcow2/read/compressed-mixed", test_compressed_random);
	g_test_add_func("/qcow2/read/backing-chain", test_backing_chain);
	g_test_add_func("/qcow2/read/backing-refusals", test_backing_refusals);
	g_test_add_func("/qcow2/read/data-file", test_data_file);
	g_test_add_func("/qcow2/read/dirty-lazy-refcounts", test_dirty_lazy_refcounts);
	g_test_add_func("/qcow2/snapshot/read", test_snapshots);
	g_test_add_func("/qcow2/snapshot/bad-l1", test_snapshot_bad_l1);
	g_test_add_func("/qcow2/damage/l2", test_damage);
	g_test_add_func("/qcow2/damage/compressed", test_damage_compressed);
	g_test_add_func("/qcow2/damage/decompress-exact", test_decompress_exact);
	g_test_add_func("/qcow2/status/qemu-img-map", test_block_status_map);
	g_test_add_func("/qcow2/damage/fuzz-metadata", test_fuzz_metadata);
	g_test_add_func("/qcow2/threads/small-cache", test_threads_small_cache);
	g_test_add_func("/qcow2/open/1tib", test_big_image);
	g_test_add_func("/qcow2/read/nowait", test_read_nowait);

	r = g_test_run();
	{
		char *cmd = g_strdup_printf("rm -rf '%s'", tmpdir);

		if (system(cmd) != 0)
			r = r ? r : 1;
		g_free(cmd);
	}
	g_free(tmpdir);
	return r;
}
