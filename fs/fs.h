/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* The FUSE front end: kernel requests onto views, nothing in between. */
#ifndef IMGFS_FS_H
#define IMGFS_FS_H

#define FUSE_USE_VERSION 314
#include <fuse_lowlevel.h>
#include <glib.h>
#include <sys/stat.h>

#include "image.h"

struct fs_node {
	fuse_ino_t ino;
	char *name;          /* view name; NULL for the root directory */
};

struct fs {
	struct image *img;
	struct fuse_session *se;
	bool dir_mode;       /* mountpoint is a directory: every view a file */
	char *file_view;     /* file mode: the one view shown */
	struct stat image_st;/* the image file's mode, owner, times */
	bool single_thread;  /* no page cache: -s cannot serve invalidation */
	bool cached_writes;  /* writes through the page cache, not direct_io */
	bool splice;         /* read replies spliced from the image file */
	unsigned max_threads;/* FUSE worker threads at most */
	unsigned max_read;   /* the mount's max_read, 0 if none */
	char *control_path;  /* NBD control socket, exposed as user.imgfs.control */
	struct nbd_control *control;

	GMutex nodes_lock;
	GHashTable *by_name; /* view name -> struct fs_node*; inodes are stable for a name */
	GPtrArray *by_ino;   /* ino - 1 -> struct fs_node* (index 0 is the root) */
	void *observer;

	/* write replies deferred until other views' pages are dropped (fs-ops.c) */
	GAsyncQueue *deferred;
	GThread *deferred_thread;
	GMutex deferred_lock;
	GCond deferred_cond;
	bool deferred_done;  /* the thread has answered everything queued */
};

/* Requests: max_write, and the readahead the daemon asks the kernel for. */
#define FS_MAX_IO (1u << 20)
#define FS_READAHEAD_KB 2048u
/* Spliced replies: at most FS_SPLICE_EXTENTS pieces of file or zeroes, and
 * requests cut so that a reply (a page per piece, one for the header, one
 * spare) fits a 1 MiB pipe. */
#define FS_SPLICE_EXTENTS 16u
#define FS_SPLICE_MAX_READ ((1u << 20) - 32 * 4096u)

extern const struct fuse_lowlevel_ops fs_ops;
void fs_init_nodes(struct fs *fs);
void fs_free_nodes(struct fs *fs);
/* Observer: invalidate the kernel cache of every view overlapping a disk write. */
void fs_on_disk_write(void *opaque, uint64_t off, uint64_t len);
/* The thread that invalidates for FUSE writes and then answers them: started
 * in the daemon (after the fork), stopped after the FUSE loop has ended and
 * before the session is destroyed.  Stop returns false if the thread has
 * not ended within timeout_ms (an invalidation waits for a read that no
 * worker will answer any more): abort the connection, then join it. */
void fs_start_deferred(struct fs *fs);
bool fs_stop_deferred(struct fs *fs, unsigned timeout_ms);
void fs_join_deferred(struct fs *fs);

#endif
