/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The bdev_* wrappers: range and read-only checks in one place, and the
 * fallbacks for devices that lack an op.
 */
#include "bdev.h"
#include "util.h"

#include <errno.h>
#include <stdlib.h>

static bool range_bad(struct bdev *d, uint64_t off, uint64_t len)
{
	return range_exceeds(off, len, d->size);
}

struct bdev *bdev_new(const struct bdev_ops *ops, const char *kind,
		      uint64_t size, bool read_only, void *priv)
{
	struct bdev *d = xcalloc(1, sizeof(*d));

	d->ops = ops;
	d->kind = kind;
	d->size = size;
	d->read_only = read_only;
	d->min_block = 1;
	d->priv = priv;
	return d;
}

int bdev_pread(struct bdev *d, void *buf, size_t len, uint64_t off)
{
	/* a growable device (a file) reads zeroes past its end, as pread does */
	if (d->growable ? range_exceeds(off, len, INT64_MAX) : range_bad(d, off, len))
		return -EINVAL;
	if (!len)
		return 0;
	return d->ops->pread(d, buf, len, off);
}

int bdev_pread_nowait(struct bdev *d, void *buf, size_t len, uint64_t off)
{
	if (!d->ops->pread_nowait ||
	    (d->growable ? range_exceeds(off, len, INT64_MAX) : range_bad(d, off, len)))
		return -EAGAIN;
	if (!len)
		return 0;
	return d->ops->pread_nowait(d, buf, len, off) < 0 ? -EAGAIN : 0;
}

int bdev_pwrite(struct bdev *d, const void *buf, size_t len, uint64_t off,
		unsigned flags)
{
	if (d->read_only || !d->ops->pwrite)
		return -EROFS;
	if (d->growable ? range_exceeds(off, len, INT64_MAX) : range_bad(d, off, len))
		return -EINVAL;
	if (!len)
		return 0;
	return d->ops->pwrite(d, buf, len, off, flags);
}

int bdev_zero(struct bdev *d, uint64_t off, uint64_t len, unsigned flags)
{
	static const size_t chunk = 1 << 20;
	void *zeroes;
	int r = 0;

	if (d->read_only || !d->ops->pwrite)
		return -EROFS;
	if (range_bad(d, off, len))
		return -EINVAL;
	if (!len)
		return 0;
	if (d->ops->zero) {
		r = d->ops->zero(d, off, len, flags);
		if (r != -ENOTSUP || (flags & BDEV_FAST_ZERO))
			return r;
	} else if (flags & BDEV_FAST_ZERO) {
		return -ENOTSUP;
	}
	zeroes = xcalloc(1, chunk);
	while (len) {
		size_t n = MIN(len, chunk);

		r = d->ops->pwrite(d, zeroes, n, off, flags & BDEV_FUA);
		if (r < 0)
			break;
		off += n;
		len -= n;
	}
	free(zeroes);
	return r;
}

int bdev_discard(struct bdev *d, uint64_t off, uint64_t len)
{
	if (d->read_only || !d->ops->pwrite)
		return -EROFS;
	if (range_bad(d, off, len))
		return -EINVAL;
	if (!len || !d->ops->discard)
		return 0;
	return d->ops->discard(d, off, len);
}

int bdev_flush(struct bdev *d)
{
	if (!d->ops->flush)
		return 0;
	return d->ops->flush(d);
}

bool bdev_extents_add(struct bdev_extents *x, int fd, uint64_t pos, uint64_t len)
{
	struct bdev_extent *last = x->n ? &x->ext[x->n - 1] : NULL;

	if (!len)
		return true;
	if (last && last->fd == fd && (fd < 0 || last->pos + last->len == pos)) {
		last->len += len;
		return true;
	}
	if (x->n == x->max)
		return false;
	x->ext[x->n++] = (struct bdev_extent){ fd, fd < 0 ? 0 : pos, len };
	return true;
}

int64_t bdev_extents_pad(struct bdev_extents *x, int64_t m, uint64_t n, uint64_t len)
{
	if (m < 0 || (uint64_t)m < n)
		return m;
	return bdev_extents_add(x, -1, 0, len - n) ? (int64_t)len : m;
}

void bdev_extents_release(struct bdev_extents *x)
{
	if (x->unpin)
		x->unpin(x->pin_ctx, x->pin_tag);
	x->unpin = NULL;
	x->pin_ctx = NULL;
	x->n = 0;
}

int64_t bdev_map(struct bdev *d, uint64_t off, uint64_t len, struct bdev_extents *x)
{
	unsigned n0 = x->n;
	int64_t r;

	if (d->growable ? range_exceeds(off, len, INT64_MAX) : range_bad(d, off, len))
		return -EINVAL;
	if (!len || !d->ops->map)
		return 0;
	r = d->ops->map(d, off, len, x);
	if (r < 0 || (uint64_t)r > len) {
		x->n = n0;
		return r < 0 ? r : -EIO; /* an implementation bug must not read past the range */
	}
	return r;
}

int bdev_block_status(struct bdev *d, uint64_t off, uint64_t len,
		      uint64_t *run, unsigned *status, unsigned *depth)
{
	unsigned dummy;
	int r;

	if (!depth)
		depth = &dummy;
	if (range_bad(d, off, len) || !len)
		return -EINVAL;
	if (!d->ops->block_status) {
		*run = len;
		*status = 0;
		*depth = 1;
		return 0;
	}
	r = d->ops->block_status(d, off, len, run, status, depth);
	if (r == 0 && (*run == 0 || *run > len))
		return -EIO; /* an implementation bug must not become a hang */
	return r;
}

int bdev_resize(struct bdev *d, uint64_t size)
{
	if (d->read_only)
		return -EROFS;
	if (size == d->size)
		return 0;
	if (size < d->size || !d->ops->resize)
		return -ENOTSUP;
	return d->ops->resize(d, size);
}

void bdev_close(struct bdev *d)
{
	if (!d)
		return;
	if (d->ops->close)
		d->ops->close(d);
	free(d);
}
