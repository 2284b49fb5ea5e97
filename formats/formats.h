/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* Constructors of the devices in formats/, for image.c and open.c. */
#ifndef IMGFS_FORMATS_H
#define IMGFS_FORMATS_H

#include "bdev.h"
#include "util.h"

/* file.c — a regular file or block device. */
#define FILE_WRITABLE   (1u << 0)
#define FILE_NO_LOCK    (1u << 1)
int file_open(const char *path, unsigned flags, struct bdev **out, struct err *e);
/* The file's fd (for locks and fstat). */
int file_fd(struct bdev *file);
/*
 * qemu-compatible OFD byte-range locks: perm is what we use, shared what
 * others may use (QEMU_PERM_* bits).  -EAGAIN with e naming the conflict.
 */
#define QEMU_PERM_CONSISTENT_READ 0x01
#define QEMU_PERM_WRITE           0x02
#define QEMU_PERM_WRITE_UNCHANGED 0x04
#define QEMU_PERM_RESIZE          0x08
#define QEMU_PERM_ALL             0x0f
int file_lock(struct bdev *file, unsigned perm, unsigned shared, struct err *e);

/* raw.c — the raw format over a file.  probed: enforce the sector-0 rule. */
struct bdev *raw_new(struct bdev *file, bool probed, bool read_only);

/* window.c — a byte slice [off, off+len) of base; does not own base. */
struct bdev *window_new(struct bdev *base, uint64_t off, uint64_t len, bool read_only);

/* Magic test used by probing: is this buffer the start of a known image format? */
const char *image_magic_name(const void *buf, size_t len);

#endif
