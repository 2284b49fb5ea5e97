/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The raw format: the identity over a file.  One rule of its own, qemu's
 * (CVE-2008-2004): when raw was chosen by probing, a write to sector 0 that
 * would make the image probe as another format is refused, so a guest cannot
 * turn its disk into, say, a qcow2 header pointing at host files.
 */
#include "formats.h"

#include <errno.h>
#include <stdlib.h>

struct raw_dev {
	struct bdev *file;
	bool probed;
};

static struct raw_dev *R(struct bdev *d) { return d->priv; }

static int raw_pread(struct bdev *d, void *buf, size_t len, uint64_t off)
{
	return bdev_pread(R(d)->file, buf, len, off);
}

static int raw_pread_nowait(struct bdev *d, void *buf, size_t len, uint64_t off)
{
	return bdev_pread_nowait(R(d)->file, buf, len, off);
}

#define PROBE_BYTES 512

/* Would sector 0, after this write, look like another image format? */
static int raw_check_sector0(struct bdev *d, const void *buf, size_t len, uint64_t off)
{
	unsigned char sector[PROBE_BYTES];
	size_t n;
	int r;

	if (!R(d)->probed || off >= PROBE_BYTES)
		return 0;
	r = bdev_pread(R(d)->file, sector, MIN(PROBE_BYTES, d->size), 0);
	if (r < 0)
		return r;
	n = MIN(len, PROBE_BYTES - off);
	memcpy(sector + off, buf, n);
	if (image_magic_name(sector, MIN(PROBE_BYTES, d->size))) {
		log_warn("refusing a write to sector 0 of a probed raw image: it would start with a %s header (use --format=raw)",
			 image_magic_name(sector, PROBE_BYTES));
		return -EPERM;
	}
	return 0;
}

static int raw_pwrite(struct bdev *d, const void *buf, size_t len, uint64_t off,
		      unsigned flags)
{
	int r = raw_check_sector0(d, buf, len, off);

	return r < 0 ? r : bdev_pwrite(R(d)->file, buf, len, off, flags);
}

static int raw_zero(struct bdev *d, uint64_t off, uint64_t len, unsigned flags)
{
	return bdev_zero(R(d)->file, off, len, flags);
}

static int raw_discard(struct bdev *d, uint64_t off, uint64_t len)
{
	return bdev_discard(R(d)->file, off, len);
}

static int raw_flush(struct bdev *d)
{
	return bdev_flush(R(d)->file);
}

static int raw_block_status(struct bdev *d, uint64_t off, uint64_t len,
			    uint64_t *run, unsigned *status, unsigned *depth)
{
	return bdev_block_status(R(d)->file, off, len, run, status, depth);
}

static int64_t raw_map(struct bdev *d, uint64_t off, uint64_t len, struct bdev_extents *x)
{
	return bdev_map(R(d)->file, off, len, x);
}

static void raw_close(struct bdev *d)
{
	bdev_close(R(d)->file);
	free(R(d));
}

static const struct bdev_ops raw_ops = {
	.pread = raw_pread,
	.pread_nowait = raw_pread_nowait,
	.pwrite = raw_pwrite,
	.zero = raw_zero,
	.discard = raw_discard,
	.flush = raw_flush,
	.block_status = raw_block_status,
	.close = raw_close,
	.map = raw_map,
};

struct bdev *raw_new(struct bdev *file, bool probed, bool read_only)
{
	struct raw_dev *r = xcalloc(1, sizeof(*r));
	struct bdev *d;

	r->file = file;
	r->probed = probed;
	d = bdev_new(&raw_ops, "raw", file->size, read_only || file->read_only, r);
	d->min_block = file->min_block;
	return d;
}

/*
 * Known image magics, for probing.  Only formats whose header a raw guest
 * could forge matter here; a match means "not raw".
 */
const char *image_magic_name(const void *buf, size_t len)
{
	static const struct { const char *name; size_t off; const char *magic; size_t len; } m[] = {
		{ "qcow2", 0, "QFI\xfb", 4 },
		{ "qed", 0, "QED\0", 4 },
		{ "vmdk", 0, "KDMV", 4 },
		{ "vmdk", 0, "COWD", 4 },
		{ "vmdk", 0, "# Disk DescriptorFile", 21 },
		{ "vhdx", 0, "vhdxfile", 8 },
		{ "vpc", 0, "conectix", 8 },
		{ "vdi", 0x40, "\x7f\x10\xda\xbe", 4 },
		{ "parallels", 0, "WithoutFreeSpace", 16 },
		{ "parallels", 0, "WithouFreSpacExt", 16 },
		{ "luks", 0, "LUKS\xba\xbe", 6 },
		{ "bochs", 0, "Bochs Virtual HD Image", 22 },
		{ "cloop", 0, "#!/bin/sh\n#V2.0 Format\n", 23 },
		{ "dmg", 0, "koly", 4 }, /* dmg's trailer magic; rare at 0 */
	};
	const unsigned char *b = buf;

	for (size_t i = 0; i < ARRAY_SIZE(m); i++)
		if (len >= m[i].off + m[i].len && !memcmp(b + m[i].off, m[i].magic, m[i].len))
			return m[i].name;
	return NULL;
}
