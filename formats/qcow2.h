/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* The qcow2 format device: the public face (internals in qcow2-int.h). */
#ifndef IMGFS_QCOW2_H
#define IMGFS_QCOW2_H

#include "bdev.h"
#include "image.h"
#include "util.h"

/* Does buf (at least 4 bytes) start with the qcow2 magic? */
bool qcow2_probe(const void *buf, size_t len);

/*
 * Open a qcow2 image over file (ownership of file passes to the device, also
 * on failure).  path is the image's path (for resolving backing and data-file
 * names, and for messages).  ctx carries options and the chain so far; the
 * backing file is opened with image_open_dev(..., ctx with depth + 1).
 */
int qcow2_open(struct bdev *file, const char *path, bool writable,
	       struct open_ctx *ctx, struct bdev **out, struct err *e);

/* Internal snapshots (§ "Snapshots" of the qcow2 spec). */
struct qcow2_snapshot_info {
	char *id;            /* unique ID string */
	char *name;          /* may be empty, duplicated, or hold anything */
	uint64_t disk_size;  /* virtual size at the time it was taken */
	uint64_t vm_state_size;
	uint32_t date_sec, date_nsec;
	uint64_t vm_clock_ns;
	uint64_t icount;     /* UINT64_MAX when absent */
};
/* Number of snapshots, and a copy of entry i (strings owned by the device). */
unsigned qcow2_snapshot_count(struct bdev *qcow2);
const struct qcow2_snapshot_info *qcow2_snapshot_get(struct bdev *qcow2, unsigned i);
/* A read-only device showing snapshot i as it was when taken.  Borrows qcow2
 * (close it before qcow2). */
int qcow2_snapshot_open(struct bdev *qcow2, unsigned i, struct bdev **out, struct err *e);

/* Facts for xattrs / --list */
const char *qcow2_backing_name(struct bdev *qcow2); /* NULL if none */

#endif
