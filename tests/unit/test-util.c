/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* Unit tests: the bdev wrappers, window and raw devices, name resolution,
 * probing, images and views over a real file. */
#include <errno.h>
#include <glib.h>
#include <glib/gstdio.h>
#include <stdlib.h>
#include <unistd.h>

#include "formats.h"
#include "image.h"

/* ---- an in-memory device ----------------------------------------------- */

struct mem {
	unsigned char *buf;
	unsigned writes;
};

static int mem_pread(struct bdev *d, void *buf, size_t len, uint64_t off)
{
	memcpy(buf, ((struct mem *)d->priv)->buf + off, len);
	return 0;
}

static int mem_pwrite(struct bdev *d, const void *buf, size_t len, uint64_t off, unsigned flags)
{
	struct mem *m = d->priv;

	memcpy(m->buf + off, buf, len);
	m->writes++;
	return 0;
}

static void mem_close(struct bdev *d)
{
	struct mem *m = d->priv;

	g_free(m->buf);
	g_free(m);
}

static const struct bdev_ops mem_ops = {
	.pread = mem_pread, .pwrite = mem_pwrite, .close = mem_close,
};

static struct bdev *mem_new(size_t size)
{
	struct mem *m = g_new0(struct mem, 1);

	m->buf = g_malloc0(size);
	for (size_t i = 0; i < size; i++)
		m->buf[i] = (unsigned char)(i * 7 + 3);
	return bdev_new(&mem_ops, "mem", size, false, m);
}

/* ---- bdev wrappers ------------------------------------------------------ */

static void test_ranges_checked(void)
{
	struct bdev *d = mem_new(4096);
	char buf[16];
	uint64_t run;
	unsigned st, depth;

	g_assert_cmpint(bdev_pread(d, buf, 16, 4080), ==, 0);
	g_assert_cmpint(bdev_pread(d, buf, 16, 4081), ==, -EINVAL);
	g_assert_cmpint(bdev_pread(d, buf, 1, UINT64_MAX), ==, -EINVAL);
	g_assert_cmpint(bdev_pwrite(d, buf, 16, 4090, 0), ==, -EINVAL);
	g_assert_cmpint(bdev_zero(d, 4000, 200, 0), ==, -EINVAL);
	/* no block_status op: one data run */
	g_assert_cmpint(bdev_block_status(d, 100, 1000, &run, &st, &depth), ==, 0);
	g_assert_cmpuint(run, ==, 1000);
	g_assert_cmpuint(st, ==, 0);
	g_assert_cmpint(bdev_block_status(d, 100, 0, &run, &st, &depth), ==, -EINVAL);
	bdev_close(d);
}

static void test_zero_fallback(void)
{
	struct bdev *d = mem_new(8192);
	unsigned char buf[8192];

	g_assert_cmpint(bdev_zero(d, 100, 5000, BDEV_FAST_ZERO), ==, -ENOTSUP);
	g_assert_cmpint(bdev_zero(d, 100, 5000, 0), ==, 0);
	g_assert_cmpint(bdev_pread(d, buf, sizeof(buf), 0), ==, 0);
	for (size_t i = 0; i < sizeof(buf); i++)
		g_assert_cmpuint(buf[i], ==, i >= 100 && i < 5100 ? 0 : (unsigned char)(i * 7 + 3));
	bdev_close(d);
}

static void test_read_only(void)
{
	struct bdev *d = mem_new(4096);
	char buf[16] = { 0 };

	d->read_only = true;
	g_assert_cmpint(bdev_pwrite(d, buf, 16, 0, 0), ==, -EROFS);
	g_assert_cmpint(bdev_zero(d, 0, 16, 0), ==, -EROFS);
	g_assert_cmpint(bdev_discard(d, 0, 16), ==, -EROFS);
	bdev_close(d);
}

static void test_window(void)
{
	struct bdev *d = mem_new(65536);
	struct bdev *w = window_new(d, 4096, 8192, false);
	unsigned char a[100], b[100];

	g_assert_cmpuint(w->size, ==, 8192);
	g_assert_cmpint(bdev_pread(w, a, 100, 10), ==, 0);
	g_assert_cmpint(bdev_pread(d, b, 100, 4106), ==, 0);
	g_assert_cmpmem(a, 100, b, 100);
	g_assert_cmpint(bdev_pread(w, a, 100, 8100), ==, -EINVAL);
	memset(a, 0xee, sizeof(a));
	g_assert_cmpint(bdev_pwrite(w, a, 100, 0, 0), ==, 0);
	g_assert_cmpint(bdev_pread(d, b, 100, 4096), ==, 0);
	g_assert_cmpmem(a, 100, b, 100);
	bdev_close(w);
	bdev_close(d);
}

/* ---- probing and names --------------------------------------------------- */

static void test_magic(void)
{
	char buf[512] = { 0 };

	g_assert_null(image_magic_name(buf, sizeof(buf)));
	memcpy(buf, "QFI\xfb", 4);
	g_assert_cmpstr(image_magic_name(buf, sizeof(buf)), ==, "qcow2");
	memcpy(buf, "vhdxfile", 8);
	g_assert_cmpstr(image_magic_name(buf, sizeof(buf)), ==, "vhdx");
	g_assert_null(image_magic_name(buf, 3));
}

static void test_resolve_name(void)
{
	struct err e = { 0 };
	char *p;

	p = image_resolve_name("/a/b/top.qcow2", "base.raw", "backing file", &e);
	g_assert_cmpstr(p, ==, "/a/b/base.raw");
	free(p);
	p = image_resolve_name("/a/b/top.qcow2", "../c/base.raw", "backing file", &e);
	g_assert_cmpstr(p, ==, "/a/b/../c/base.raw");
	free(p);
	p = image_resolve_name("/a/b/top.qcow2", "/abs/base", "backing file", &e);
	g_assert_cmpstr(p, ==, "/abs/base");
	free(p);
	p = image_resolve_name("top.qcow2", "base", "backing file", &e);
	g_assert_cmpstr(p, ==, "./base");
	free(p);
	g_assert_cmpint(e.code, ==, 0);

	g_assert_null(image_resolve_name("/a/top", "json:{\"file.filename\":\"/etc/passwd\"}", "backing file", &e));
	g_assert_cmpint(e.code, ==, -EINVAL);
	g_assert_nonnull(strstr(e.msg, "json:"));
	memset(&e, 0, sizeof(e));
	g_assert_null(image_resolve_name("/a/top", "nbd://evil/x", "data file", &e));
	g_assert_nonnull(strstr(e.msg, "data file"));
	memset(&e, 0, sizeof(e));
	g_assert_null(image_resolve_name("/a/top", "", "backing file", &e));
	memset(&e, 0, sizeof(e));
	g_assert_null(image_resolve_name("/a/top", "a\nb", "backing file", &e));
	/* a colon after a slash is a path, not a protocol */
	p = image_resolve_name("/a/top", "./x:y", "backing file", NULL);
	g_assert_cmpstr(p, ==, "/a/./x:y");
	free(p);
}

static void test_err_first_wins(void)
{
	struct err e = { 0 };

	g_assert_cmpint(err_set(&e, -EIO, "first %d", 1), ==, -EIO);
	g_assert_cmpint(err_set(&e, -EINVAL, "second"), ==, -EINVAL);
	g_assert_cmpstr(e.msg, ==, "first 1");
	g_assert_cmpint(err_set(NULL, -EPERM, "x"), ==, -EPERM);
}

/* ---- a raw image on disk --------------------------------------------------- */

static char *tmpdir;

static char *make_file(const char *name, size_t size, const void *head, size_t headlen)
{
	char *path = g_build_filename(tmpdir, name, NULL);
	FILE *f = fopen(path, "wb");

	g_assert_nonnull(f);
	g_assert_cmpint(ftruncate(fileno(f), (off_t)size), ==, 0);
	if (head)
		g_assert_cmpuint(fwrite(head, 1, headlen, f), ==, headlen);
	fclose(f);
	return path;
}

static void test_raw_image_views(void)
{
	unsigned char mbr[512] = { 0 };
	struct image_opts o = { 0 };
	struct err e = { 0 };
	struct image *img;
	struct view *v;
	char *path;

	/* one primary partition: type 0x83 at LBA 2048, 2048 sectors */
	mbr[446 + 4] = 0x83;
	mbr[446 + 8] = 0x00; mbr[446 + 9] = 0x08;  /* start 2048 */
	mbr[446 + 12] = 0x00; mbr[446 + 13] = 0x08; /* 2048 sectors */
	mbr[510] = 0x55;
	mbr[511] = 0xaa;
	path = make_file("mbr.raw", 4 << 20, mbr, sizeof(mbr));
	g_assert_cmpint(image_open(path, &o, &img, &e), ==, 0);
	g_assert_cmpstr(img->format, ==, "raw");
	v = image_find_view(img, "disk");
	g_assert_nonnull(v);
	g_assert_cmpuint(v->length, ==, 4 << 20);
	g_assert_true(v->writable);
	v = image_pick_view(img, NULL, 1, NULL, &e);
	g_assert_nonnull(v);
	g_assert_cmpstr(v->name, ==, "p1");
	g_assert_cmpuint(v->offset, ==, 2048 * 512);
	g_assert_cmpuint(v->length, ==, 2048 * 512);
	g_assert_null(image_pick_view(img, NULL, 2, NULL, &e));
	g_assert_nonnull(strstr(e.msg, "p2"));
	image_close(img);
	g_unlink(path);
	g_free(path);
}

static int seen_writes;
static uint64_t seen_off, seen_len;

static void observe(void *opaque, uint64_t off, uint64_t len)
{
	seen_writes++;
	seen_off = off;
	seen_len = len;
}

static void test_observers_and_reread(void)
{
	unsigned char mbr[512] = { 0 };
	struct image_opts o = { 0 };
	struct err e = { 0 };
	struct image *img;
	struct view *p1;
	char *path, buf[64];
	void *h;

	mbr[510] = 0x55;
	mbr[511] = 0xaa;
	path = make_file("obs.raw", 4 << 20, mbr, sizeof(mbr));
	g_assert_cmpint(image_open(path, &o, &img, &e), ==, 0);
	g_assert_null(image_find_view(img, "p1"));
	h = image_add_observer(img, observe, NULL);

	/* a write through p1's future window... first create p1 by writing the table */
	mbr[446 + 4] = 0x83;
	mbr[446 + 9] = 0x08;
	mbr[446 + 13] = 0x04; /* 1024 sectors */
	g_assert_cmpint(bdev_pwrite(img->disk, mbr, 512, 0, 0), ==, 0);
	g_assert_cmpint(seen_writes, ==, 1);
	g_assert_cmpuint(seen_off, ==, 0);
	g_assert_cmpuint(seen_len, ==, 512);
	p1 = image_find_view(img, "p1");
	g_assert_nonnull(p1);
	g_assert_cmpuint(p1->length, ==, 1024 * 512);

	/* writes through the partition are announced at their disk offset */
	memset(buf, 0x5a, sizeof(buf));
	g_assert_cmpint(bdev_pwrite(p1->dev, buf, sizeof(buf), 100, 0), ==, 0);
	g_assert_cmpint(seen_writes, ==, 2);
	g_assert_cmpuint(seen_off, ==, 2048 * 512 + 100);
	g_assert_cmpuint(seen_len, ==, sizeof(buf));

	image_remove_observer(img, h);
	image_close(img);
	g_unlink(path);
	g_free(path);
}

static void test_probed_raw_refuses_magic(void)
{
	struct image_opts o = { 0 };
	struct err e = { 0 };
	struct image *img;
	char *path = make_file("probe.raw", 1 << 20, NULL, 0);

	g_assert_cmpint(image_open(path, &o, &img, &e), ==, 0);
	g_assert_cmpint(bdev_pwrite(img->disk, "QFI\xfb", 4, 0, 0), ==, -EPERM);
	g_assert_cmpint(bdev_pwrite(img->disk, "QFI\xfb", 4, 512, 0), ==, 0);
	g_assert_cmpint(bdev_pwrite(img->disk, "\x55\xaa", 2, 510, 0), ==, 0);
	image_close(img);

	o.format = "raw";
	g_assert_cmpint(image_open(path, &o, &img, &e), ==, 0);
	g_assert_cmpint(bdev_pwrite(img->disk, "QFI\xfb", 4, 0, 0), ==, 0);
	image_close(img);

	/* and now probing refuses it as raw */
	o.format = NULL;
	g_assert_cmpint(image_open(path, &o, &img, &e), <, 0);
	g_unlink(path);
	g_free(path);
}

static void test_lock_conflict(void)
{
	struct image_opts o = { 0 };
	struct err e = { 0 };
	struct image *a, *b;
	char *path = make_file("lock.raw", 1 << 20, NULL, 0);

	g_assert_cmpint(image_open(path, &o, &a, &e), ==, 0);
	g_assert_cmpint(image_open(path, &o, &b, &e), ==, -EAGAIN);
	g_assert_nonnull(strstr(e.msg, "in use"));
	memset(&e, 0, sizeof(e));
	o.read_only = true;
	/* a reader does not share write: refused while a writer is there */
	g_assert_cmpint(image_open(path, &o, &b, &e), ==, -EAGAIN);
	image_close(a);
	g_assert_cmpint(image_open(path, &o, &a, &e), ==, 0);
	g_assert_cmpint(image_open(path, &o, &b, &e), ==, 0);
	image_close(a);
	image_close(b);
	g_unlink(path);
	g_free(path);
}

int main(int argc, char **argv)
{
	int r;

	g_test_init(&argc, &argv, NULL);
	tmpdir = g_dir_make_tmp("imgfs-unit-XXXXXX", NULL);
	g_test_add_func("/bdev/ranges-checked", test_ranges_checked);
	g_test_add_func("/bdev/zero-fallback", test_zero_fallback);
	g_test_add_func("/bdev/read-only", test_read_only);
	g_test_add_func("/window/slice", test_window);
	g_test_add_func("/probe/magic", test_magic);
	g_test_add_func("/names/resolve", test_resolve_name);
	g_test_add_func("/err/first-wins", test_err_first_wins);
	g_test_add_func("/image/raw-views", test_raw_image_views);
	g_test_add_func("/image/observers-and-reread", test_observers_and_reread);
	g_test_add_func("/image/probed-raw-sector0", test_probed_raw_refuses_magic);
	g_test_add_func("/image/locks", test_lock_conflict);
	r = g_test_run();
	g_rmdir(tmpdir);
	g_free(tmpdir);
	return r;
}
