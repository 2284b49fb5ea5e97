/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Opening a path as an image device: probing, the format, and — through the
 * qcow2 driver calling back here — the backing chain, bounded in depth and
 * refused when it loops.
 */
#include "formats.h"
#include "image.h"
#include "qcow2.h"

#include <errno.h>
#include <libgen.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

/* The qcow2 write path (qcow2-write.c): qcow2 images open writable, with
 * qemu's writer locks.  Build with -DQCOW2_CAN_WRITE=0 to open them
 * read-only (reader locks only). */
#ifndef QCOW2_CAN_WRITE
#define QCOW2_CAN_WRITE 1
#endif

static int chain_push(struct open_ctx *ctx, const char *path, struct err *e)
{
	struct stat st;

	if (stat(path, &st) < 0)
		return err_set(e, -errno, "%s: %s", path, strerror(errno));
	if (ctx->depth > IMAGE_MAX_CHAIN || ctx->n > IMAGE_MAX_CHAIN)
		return err_set(e, -ELOOP, "%s: backing chain deeper than %d images",
			       path, IMAGE_MAX_CHAIN);
	for (unsigned i = 0; i < ctx->n; i++)
		if (ctx->dev[i] == (uint64_t)st.st_dev && ctx->ino[i] == (uint64_t)st.st_ino)
			return err_set(e, -ELOOP, "%s: backing chain loops back to this image", path);
	ctx->dev[ctx->n] = st.st_dev;
	ctx->ino[ctx->n] = st.st_ino;
	ctx->n++;
	return 0;
}

int image_open_dev(const char *path, const char *fmt, bool writable,
		   struct open_ctx *ctx, struct bdev **out, struct err *e)
{
	unsigned char head[512];
	struct bdev *file;
	unsigned flags = 0;
	bool is_qcow2;
	int r;

	r = chain_push(ctx, path, e);
	if (r < 0)
		return r;
	if (fmt && strcmp(fmt, "raw") && strcmp(fmt, "qcow2"))
		return err_set(e, -ENOTSUP, "%s: unsupported format '%s' (raw and qcow2 are)", path, fmt);
	if (ctx->opts && ctx->opts->force_share)
		flags |= FILE_NO_LOCK;

	/* probe on a read-only open: the lock we take depends on the format */
	is_qcow2 = fmt && !strcmp(fmt, "qcow2");
	if (!fmt) {
		const char *other;

		r = file_open(path, FILE_NO_LOCK, &file, e);
		if (r < 0)
			return r;
		/* a file shorter than the probe reads as zeroes past its end */
		memset(head, 0, sizeof(head));
		r = bdev_pread(file, head, MIN(sizeof(head), file->size), 0);
		bdev_close(file);
		if (r < 0)
			return err_set(e, r, "%s: cannot read the header: %s", path, strerror(-r));
		is_qcow2 = qcow2_probe(head, sizeof(head));
		other = is_qcow2 ? NULL : image_magic_name(head, sizeof(head));
		if (other)
			return err_set(e, -EMEDIUMTYPE,
				       "%s: looks like a %s image, which imgfs cannot read; refusing to treat it as raw (use --format=raw if it really is raw)",
				       path, other);
	}
	if (is_qcow2 && !QCOW2_CAN_WRITE)
		writable = false;
	if (writable)
		flags |= FILE_WRITABLE;
	r = file_open(path, flags, &file, e);
	if (r < 0)
		return r;
	if (is_qcow2)
		return qcow2_open(file, path, writable, ctx, out, e);
	*out = raw_new(file, fmt == NULL, !writable);
	return 0;
}

/* qemu's path_has_protocol: a ':' before any '/' names a protocol. */
static bool has_protocol(const char *name)
{
	const char *colon = strchr(name, ':');
	const char *slash = strchr(name, '/');

	return colon && (!slash || colon < slash);
}

char *image_resolve_name(const char *image_path, const char *name,
			 const char *what, struct err *e)
{
	char *dir, *copy, *full;

	if (!name[0]) {
		err_set(e, -EINVAL, "%s: empty %s name", image_path, what);
		return NULL;
	}
	/* CVE-2024-4467: names inside images are hostile; never parse them as
	 * json: or protocol specifications, only as file paths. */
	if (!strncmp(name, "json:", 5) || has_protocol(name)) {
		err_set(e, -EINVAL,
			"%s: %s name '%s' is a protocol or json: specification; only plain file paths are accepted",
			image_path, what, name);
		return NULL;
	}
	for (const char *p = name; *p; p++)
		if ((unsigned char)*p < 0x20) {
			err_set(e, -EINVAL, "%s: %s name holds a control character", image_path, what);
			return NULL;
		}
	if (name[0] == '/')
		return xstrdup(name);
	copy = xstrdup(image_path);
	dir = dirname(copy);
	full = xasprintf("%s/%s", dir, name);
	free(copy);
	return full;
}
