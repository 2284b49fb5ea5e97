/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The window device: bytes [off, off + len) of a base device.  Every
 * partition is one, stacked over the image's disk device so its writes are
 * announced to the image's observers like any other write.
 */
#include "formats.h"

#include <stdlib.h>

struct window {
	struct bdev *base;
	uint64_t off;
};

static struct window *W(struct bdev *d) { return d->priv; }

static int win_pread(struct bdev *d, void *buf, size_t len, uint64_t off)
{
	return bdev_pread(W(d)->base, buf, len, W(d)->off + off);
}

static int win_pread_nowait(struct bdev *d, void *buf, size_t len, uint64_t off)
{
	return bdev_pread_nowait(W(d)->base, buf, len, W(d)->off + off);
}

static int win_pwrite(struct bdev *d, const void *buf, size_t len, uint64_t off,
		      unsigned flags)
{
	return bdev_pwrite(W(d)->base, buf, len, W(d)->off + off, flags);
}

static int win_zero(struct bdev *d, uint64_t off, uint64_t len, unsigned flags)
{
	return bdev_zero(W(d)->base, W(d)->off + off, len, flags);
}

static int win_discard(struct bdev *d, uint64_t off, uint64_t len)
{
	return bdev_discard(W(d)->base, W(d)->off + off, len);
}

static int win_flush(struct bdev *d)
{
	return bdev_flush(W(d)->base);
}

static int win_block_status(struct bdev *d, uint64_t off, uint64_t len,
			    uint64_t *run, unsigned *status, unsigned *depth)
{
	return bdev_block_status(W(d)->base, W(d)->off + off, len, run, status, depth);
}

static int64_t win_map(struct bdev *d, uint64_t off, uint64_t len, struct bdev_extents *x)
{
	return bdev_map(W(d)->base, W(d)->off + off, len, x);
}

static void win_close(struct bdev *d)
{
	free(W(d));
}

static const struct bdev_ops window_ops = {
	.pread = win_pread,
	.pread_nowait = win_pread_nowait,
	.pwrite = win_pwrite,
	.zero = win_zero,
	.discard = win_discard,
	.flush = win_flush,
	.block_status = win_block_status,
	.close = win_close,
	.map = win_map,
};

struct bdev *window_new(struct bdev *base, uint64_t off, uint64_t len, bool read_only)
{
	struct window *w = xcalloc(1, sizeof(*w));
	struct bdev *d;

	w->base = base;
	w->off = off;
	d = bdev_new(&window_ops, "window", len, read_only || base->read_only, w);
	d->min_block = base->min_block;
	return d;
}
