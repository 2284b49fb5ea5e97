/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * An opened image: its device stack and its views.  This is what the front
 * ends (fs/, nbd/) hold; they see views and bdevs, never format internals.
 */
#ifndef IMGFS_IMAGE_H
#define IMGFS_IMAGE_H

#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>

#include "bdev.h"
#include "util.h"

#define IMAGE_MAX_CHAIN 64 /* backing chain depth bound (loops are refused too) */

struct image_opts {
	const char *format;  /* "raw", "qcow2" or NULL to probe */
	bool read_only;
	bool no_backing;     /* do not open backing files: unallocated reads as zeroes */
	bool force_share;    /* skip taking locks (inspection only) */
	uint64_t cache_bytes;/* qcow2 metadata cache bound, 0 for the default */
};

/* open.c: open PATH as an image device (probing, raw, qcow2, backing chains). */
struct open_ctx {
	const struct image_opts *opts;
	unsigned depth;                    /* 0 for the top image */
	unsigned n;                        /* chain so far, for loop detection */
	uint64_t dev[IMAGE_MAX_CHAIN + 1];
	uint64_t ino[IMAGE_MAX_CHAIN + 1];
};
/*
 * Open path as format fmt (NULL: probe) for reading (and writing when
 * writable).  Used for the top image and, recursively, for backing files
 * (always read-only).  *probed tells whether raw was chosen by probing.
 */
int image_open_dev(const char *path, const char *fmt, bool writable,
		   struct open_ctx *ctx, struct bdev **out, struct err *e);
/* Resolve a backing/data-file name taken from an image at image_path:
 * plain paths only (no json:, no protocol prefix), relative names from the
 * image's directory.  Returns a malloc'd path or NULL with e set. */
char *image_resolve_name(const char *image_path, const char *name,
			 const char *what, struct err *e);

enum view_kind { VIEW_DISK, VIEW_PARTITION, VIEW_SNAPSHOT };

struct view {
	char *name;          /* "disk", "p1", "snap@NAME" */
	enum view_kind kind;
	struct bdev *dev;    /* what to read and write */
	uint64_t offset;     /* in disk; UINT64_MAX when not a slice of disk */
	uint64_t length;
	bool writable;
	/* for --list */
	char *type;          /* "0x83", a GPT type GUID, "qcow2", "raw", "snapshot" */
	char *label;         /* GPT name, snapshot name, or "" */
	char *info;          /* free text: snapshot date and VM clock, etc. */
	unsigned number;     /* partition number or snapshot index */
};

typedef void (*image_observer_fn)(void *opaque, uint64_t off, uint64_t len);

struct image {
	char *path;          /* absolute */
	char *format;        /* "raw" or "qcow2" */
	bool read_only;
	struct bdev *top;    /* the format device */
	struct bdev *disk;   /* top, wrapped to announce writes to observers */

	pthread_rwlock_t views_lock; /* guards views/nviews (re-read on table writes) */
	struct view **views;
	unsigned nviews;
	uint64_t generation; /* bumped whenever the view list changes */

	/* internal */
	pthread_rwlock_t obs_lock; /* observers list: written on add/remove, read per write */
	struct image_observer *observers;
	struct view **retired; /* partition views of an old table, freed at close */
	unsigned nretired;
	pthread_mutex_t reread_lock;
	const char *part_scheme;   /* "mbr", "gpt" or "" */
	pthread_rwlock_t part_lock;/* guards the table's whereabouts below */
	uint64_t part_extent_head; /* bytes at the start that hold the table */
	uint64_t part_extent_tail; /* bytes at the end (GPT backup) */
	uint64_t *part_sectors;    /* other 512-byte table sectors (EBRs...), sorted */
	unsigned npart_sectors;
};

int image_open(const char *path, const struct image_opts *opts,
	       struct image **out, struct err *e);
/* Flush and close everything (qcow2: dirty bit cleared). Returns flush result. */
int image_close(struct image *img);

/*
 * Views: look up by name (returns a pointer valid until image_close; views
 * are never freed while the image is open, only retired) or copy the list.
 */
struct view *image_find_view(struct image *img, const char *name);
/* Copy of the current view pointers; caller frees the array (not the views). */
unsigned image_list_views(struct image *img, struct view ***out, uint64_t *generation);

/*
 * Observers: called after every successful write, zero or discard that
 * reached disk (from any view, any front end), with the changed disk range.
 * Views that are not slices of disk (snapshots) never change.
 */
void *image_add_observer(struct image *img, image_observer_fn fn, void *opaque);
void image_remove_observer(struct image *img, void *handle);

/* Pick a view the way the CLI options do: view name, -P N, -l NAME|ID. */
struct view *image_pick_view(struct image *img, const char *view,
			     int partition, const char *snapshot, struct err *e);

#endif
