/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * FUSE low-level operations.  Inode 1 is the root: the one view in file
 * mode, or a directory of views.  Every other inode is a view, found by
 * name, so a partition keeps its inode number when the table is re-read.
 */
#include "config.h"
#include "fs.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/xattr.h>
#include <unistd.h>

#define ATTR_TIMEOUT 1.0

static struct fs *FS(fuse_req_t req) { return fuse_req_userdata(req); }

/* A reply that waits until other views' cached pages are dropped. */
struct inval_range {
	fuse_ino_t ino;
	uint64_t off, len;
};
struct deferred {
	fuse_req_t req;
	int err;             /* the reply: an errno, or 0 and ... */
	bool write;          /* ... for a write, the count written */
	size_t written;
	unsigned n, cap;
	struct inval_range r[];
};

/* A FUSE write or fallocate in progress on this thread (see "coherency"). */
static __thread struct {
	fuse_ino_t self;     /* its inode if the kernel keeps that cache itself, or 0 */
	bool defer;          /* collect the ranges to drop for the reply's thread */
	struct deferred *d;  /* those ranges so far, or NULL */
} wr;

static void write_begin(struct fs *fs, fuse_ino_t self);
static void write_end(fuse_req_t req, int err, size_t written, bool write);

/* ---- refusals and errors in the log -------------------------------------- */

/*
 * Every refused or failed request is logged with the image, the view, the
 * offset and the reason — but a program retrying in a loop must not flood
 * the journal: one line per (view, operation, error) per window, and the
 * next line for it says how many were left out.
 */
#define FS_LOG_WINDOW_US (10 * G_USEC_PER_SEC)

struct fs_log_slot {
	char view[64];
	const char *op;      /* a string literal: compared by address */
	int err;
	gint64 since;
	unsigned dropped;
};

static struct fs_log_slot fs_log_slots[32];
static GMutex fs_log_lock;

static bool fs_log_should_print(const char *view, const char *op, int err, unsigned *dropped)
{
	guint h = g_str_hash(view) ^ g_direct_hash(op) ^ (guint)err * 2654435761u;
	struct fs_log_slot *s = &fs_log_slots[h % G_N_ELEMENTS(fs_log_slots)];
	gint64 now = g_get_monotonic_time();
	bool same, print = true;

	g_mutex_lock(&fs_log_lock);
	same = s->op == op && s->err == err && !strncmp(s->view, view, sizeof(s->view));
	*dropped = same ? s->dropped : 0;
	if (same && now - s->since < FS_LOG_WINDOW_US) {
		s->dropped++;
		print = false;
	} else {
		g_strlcpy(s->view, view, sizeof(s->view));
		s->op = op;
		s->err = err;
		s->since = now;
		s->dropped = 0;
	}
	g_mutex_unlock(&fs_log_lock);
	return print;
}

/* op: "read", "write", ...; why: NULL for strerror(err) */
static void fs_log_refusal(struct fs *fs, const char *view, const char *op,
			   uint64_t off, uint64_t len, int err, const char *why)
{
	const char *name = strerrorname_np(err);
	char where[64] = "";
	char more[48] = "";
	unsigned dropped;

	if (!fs_log_should_print(view, op, err, &dropped))
		return;
	if (len)
		snprintf(where, sizeof(where), " of %" PRIu64 " bytes at offset %" PRIu64, len, off);
	else if (off)
		snprintf(where, sizeof(where), " at offset %" PRIu64, off);
	if (dropped)
		snprintf(more, sizeof(more), "; %u more like it not logged", dropped);
	log_warn("%s: view %s: %s%s: %s (%s%s)", fs->img->path, view, op, where,
		 why ? why : strerror(err), name ? name : "?", more);
}

/* ---- nodes --------------------------------------------------------------- */

static struct fs_node *node_for_name(struct fs *fs, const char *name)
{
	struct fs_node *n;

	g_mutex_lock(&fs->nodes_lock);
	n = g_hash_table_lookup(fs->by_name, name);
	if (!n) {
		n = g_new0(struct fs_node, 1);
		n->name = g_strdup(name);
		n->ino = fs->by_ino->len + 1;
		g_ptr_array_add(fs->by_ino, n);
		g_hash_table_insert(fs->by_name, n->name, n);
	}
	g_mutex_unlock(&fs->nodes_lock);
	return n;
}

static struct fs_node *node_by_ino(struct fs *fs, fuse_ino_t ino)
{
	struct fs_node *n = NULL;

	g_mutex_lock(&fs->nodes_lock);
	if (ino >= 1 && ino <= fs->by_ino->len)
		n = g_ptr_array_index(fs->by_ino, ino - 1);
	g_mutex_unlock(&fs->nodes_lock);
	return n;
}

void fs_init_nodes(struct fs *fs)
{
	struct fs_node *root = g_new0(struct fs_node, 1);
	struct view **views;
	unsigned n;

	g_mutex_init(&fs->nodes_lock);
	fs->by_name = g_hash_table_new(g_str_hash, g_str_equal);
	fs->by_ino = g_ptr_array_new();
	root->ino = FUSE_ROOT_ID;
	root->name = fs->dir_mode ? NULL : g_strdup(fs->file_view);
	g_ptr_array_add(fs->by_ino, root);
	if (!fs->dir_mode)
		return;
	/* number the views at mount time in listing order: stable, predictable */
	n = image_list_views(fs->img, &views, NULL);
	for (unsigned i = 0; i < n; i++)
		node_for_name(fs, views[i]->name);
	free(views);
}

void fs_free_nodes(struct fs *fs)
{
	for (unsigned i = 0; i < fs->by_ino->len; i++) {
		struct fs_node *n = g_ptr_array_index(fs->by_ino, i);
		g_free(n->name);
		g_free(n);
	}
	g_ptr_array_free(fs->by_ino, TRUE);
	g_hash_table_destroy(fs->by_name);
	g_mutex_clear(&fs->nodes_lock);
}

/* The view an inode shows now, or NULL (a directory, or a vanished partition). */
static struct view *node_view(struct fs *fs, struct fs_node *n)
{
	return n && n->name ? image_find_view(fs->img, n->name) : NULL;
}

/* ---- attributes ------------------------------------------------------------ */

/* For messages: the view an inode shows, or "/" for the directory. */
static const char *ino_name(struct fs *fs, fuse_ino_t ino)
{
	struct fs_node *n = node_by_ino(fs, ino);

	if (n && n->name)
		return n->name;
	return fs->dir_mode || !fs->file_view ? "/" : fs->file_view;
}

static void view_stat(struct fs *fs, fuse_ino_t ino, struct view *v, struct stat *st)
{
	mode_t perm = fs->image_st.st_mode & 07777 & ~(mode_t)(S_ISUID | S_ISGID | S_ISVTX);

	memset(st, 0, sizeof(*st));
	st->st_ino = ino;
	st->st_mode = S_IFREG | perm;
	if (!v->writable)
		st->st_mode &= ~(mode_t)0222;
	st->st_nlink = 1;
	st->st_uid = fs->image_st.st_uid;
	st->st_gid = fs->image_st.st_gid;
	st->st_size = (off_t)v->length;
	st->st_blksize = 4096;
	st->st_blocks = (blkcnt_t)((v->length + 511) / 512);
	st->st_atim = fs->image_st.st_atim;
	st->st_mtim = fs->image_st.st_mtim;
	st->st_ctim = fs->image_st.st_ctim;
}

static void root_dir_stat(struct fs *fs, struct stat *st)
{
	/* no files can be made in it: no write bits; searchable wherever the
	 * image is readable */
	mode_t perm = fs->image_st.st_mode & 0444;

	memset(st, 0, sizeof(*st));
	st->st_ino = FUSE_ROOT_ID;
	perm |= perm >> 2;
	st->st_mode = S_IFDIR | perm;
	st->st_nlink = 2;
	st->st_uid = fs->image_st.st_uid;
	st->st_gid = fs->image_st.st_gid;
	st->st_size = 0;
	st->st_blksize = 4096;
	st->st_atim = fs->image_st.st_atim;
	st->st_mtim = fs->image_st.st_mtim;
	st->st_ctim = fs->image_st.st_ctim;
}

static int node_stat(struct fs *fs, fuse_ino_t ino, struct stat *st)
{
	struct fs_node *n = node_by_ino(fs, ino);
	struct view *v;

	if (!n)
		return -ENOENT;
	if (ino == FUSE_ROOT_ID && fs->dir_mode) {
		root_dir_stat(fs, st);
		return 0;
	}
	v = node_view(fs, n);
	if (!v)
		return -ENOENT;
	view_stat(fs, ino, v, st);
	return 0;
}

static void op_getattr(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	struct stat st;
	int r = node_stat(FS(req), ino, &st);

	if (r < 0)
		fuse_reply_err(req, -r);
	else
		fuse_reply_attr(req, &st, ATTR_TIMEOUT);
}

static void op_lookup(fuse_req_t req, fuse_ino_t parent, const char *name)
{
	struct fs *fs = FS(req);
	struct fuse_entry_param e;
	struct view *v;

	if (parent != FUSE_ROOT_ID || !fs->dir_mode) {
		fuse_reply_err(req, ENOTDIR);
		return;
	}
	v = image_find_view(fs->img, name);
	if (!v) {
		fuse_reply_err(req, ENOENT);
		return;
	}
	memset(&e, 0, sizeof(e));
	e.ino = node_for_name(fs, name)->ino;
	e.generation = 1;
	e.attr_timeout = ATTR_TIMEOUT;
	/* a partition may vanish when the table is rewritten: short entry cache */
	e.entry_timeout = ATTR_TIMEOUT;
	view_stat(fs, e.ino, v, &e.attr);
	fuse_reply_entry(req, &e);
}

/*
 * Views are devices: their size is the image's.  Truncating to the current
 * size is a no-op (cp and shells open with O_TRUNC); anything else is
 * refused.  Times are accepted and ignored; owners and modes follow the image.
 */
static void op_setattr(fuse_req_t req, fuse_ino_t ino, struct stat *attr,
		       int to_set, struct fuse_file_info *fi)
{
	struct fs *fs = FS(req);
	struct stat st;
	int r = node_stat(fs, ino, &st);

	if (r < 0) {
		fuse_reply_err(req, -r);
		return;
	}
	if (to_set & (FUSE_SET_ATTR_MODE | FUSE_SET_ATTR_UID | FUSE_SET_ATTR_GID)) {
		fs_log_refusal(fs, ino_name(fs, ino), "chmod/chown", 0, 0, EPERM,
			       "modes and owners follow the image file");
		fuse_reply_err(req, EPERM);
		return;
	}
	if ((to_set & FUSE_SET_ATTR_SIZE) && attr->st_size > st.st_size) {
		/* growing the disk view grows the image (qemu-img resize) */
		struct fs_node *n = node_by_ino(fs, ino);
		struct view *v = n ? node_view(fs, n) : NULL;

		r = v && v->kind == VIEW_DISK && v->writable ?
			bdev_resize(v->dev, (uint64_t)attr->st_size) : -ENOTSUP;
		if (r == 0 && node_stat(fs, ino, &st) == 0) {
			fuse_reply_attr(req, &st, ATTR_TIMEOUT);
			return;
		}
		if (r < 0 && r != -ENOTSUP) {
			fs_log_refusal(fs, ino_name(fs, ino), "truncate", (uint64_t)attr->st_size, 0, -r,
				       "growing the image failed");
			fuse_reply_err(req, -r);
			return;
		}
	}
	if ((to_set & FUSE_SET_ATTR_SIZE) && attr->st_size != st.st_size) {
		int e = S_ISDIR(st.st_mode) ? EISDIR : (st.st_mode & 0222) ? EPERM : EROFS;

		fs_log_refusal(fs, ino_name(fs, ino), "truncate", (uint64_t)attr->st_size, 0, e,
			       "a view cannot change size");
		fuse_reply_err(req, e);
		return;
	}
	fuse_reply_attr(req, &st, ATTR_TIMEOUT);
}

/* ---- directory ------------------------------------------------------------- */

static void op_opendir(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	if (ino != FUSE_ROOT_ID || !FS(req)->dir_mode)
		fuse_reply_err(req, ENOTDIR);
	else
		fuse_reply_open(req, fi);
}

static void op_readdir(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off,
		       struct fuse_file_info *fi)
{
	struct fs *fs = FS(req);
	struct view **views;
	unsigned n = image_list_views(fs->img, &views, NULL);
	char *buf = g_malloc(size);
	size_t used = 0;
	/* entries: 0 ".", 1 "..", then views in listing order */
	for (off_t i = off; i < (off_t)n + 2; i++) {
		struct stat st = { 0 };
		const char *name;
		size_t need;

		if (i == 0) {
			name = ".";
			st.st_ino = FUSE_ROOT_ID;
			st.st_mode = S_IFDIR;
		} else if (i == 1) {
			name = "..";
			st.st_ino = FUSE_ROOT_ID;
			st.st_mode = S_IFDIR;
		} else {
			name = views[i - 2]->name;
			st.st_ino = node_for_name(fs, name)->ino;
			st.st_mode = S_IFREG;
		}
		need = fuse_add_direntry(req, buf + used, size - used, name, &st, i + 1);
		if (need > size - used)
			break;
		used += need;
	}
	free(views);
	fuse_reply_buf(req, buf, used);
	g_free(buf);
}

static void op_statfs(fuse_req_t req, fuse_ino_t ino)
{
	struct fs *fs = FS(req);
	struct statvfs sv;
	struct view **views;
	unsigned n = image_list_views(fs->img, &views, NULL);
	uint64_t total = 0;

	for (unsigned i = 0; i < n; i++)
		if (fs->dir_mode || !strcmp(views[i]->name, fs->file_view))
			total += views[i]->length;
	free(views);
	memset(&sv, 0, sizeof(sv));
	sv.f_bsize = 4096;
	sv.f_frsize = 4096;
	sv.f_blocks = (total + 4095) / 4096;
	sv.f_bfree = 0;
	sv.f_bavail = 0;
	sv.f_files = n + 1;
	sv.f_ffree = 0;
	sv.f_namemax = 255;
	if (fs->img->read_only)
		sv.f_flag |= ST_RDONLY;
	fuse_reply_statfs(req, &sv);
}

/* ---- files ----------------------------------------------------------------- */

static void op_open(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	struct fs *fs = FS(req);
	struct fs_node *n = node_by_ino(fs, ino);
	struct view *v = node_view(fs, n);

	if (!v) {
		fuse_reply_err(req, n ? EISDIR : ENOENT);
		return;
	}
	if ((fi->flags & O_ACCMODE) != O_RDONLY && !v->writable) {
		int e = fs->img->read_only || v->kind == VIEW_SNAPSHOT ? EROFS : EACCES;

		fs_log_refusal(fs, v->name, "open for writing", 0, 0, e,
			       v->kind == VIEW_SNAPSHOT ? "snapshots are read-only"
			       : fs->img->read_only ? "the image is open read-only"
			       : "the view is read-only");
		fuse_reply_err(req, e);
		return;
	}
	/* the file handle pins the view: it stays valid (retired, not freed)
	 * if the partition table is rewritten while the file is open */
	fi->fh = (uintptr_t)v;
	/* Keep the kernel page cache across opens: every write path
	 * invalidates it through the image's observers.  With -s there is no
	 * second thread to answer reads while an invalidation waits, so no
	 * page cache at all.  A handle opened for writing bypasses the cache
	 * (direct_io, as qemu's export does): a buffered FUSE write is
	 * write-through and waits for a copy into the page cache and a second
	 * into the daemon, one request at a time (doc/performance.md: 0.6x
	 * qemu's export buffered, 1.5x direct).  Its writes then update no
	 * cached page, so op_write has the observers drop its own inode's
	 * pages too.  --cached-writes keeps writes in the page cache (a
	 * MAP_SHARED mmap of a file opened for writing needs it). */
	fi->keep_cache = !fs->single_thread;
	fi->direct_io = fs->single_thread ||
			((fi->flags & O_ACCMODE) != O_RDONLY && !fs->cached_writes);
	fi->noflush = 1;
	fuse_reply_open(req, fi);
}

static struct view *FV(struct fuse_file_info *fi) { return (struct view *)(uintptr_t)fi->fh; }

/*
 * One read buffer per FUSE worker thread, reused: a malloc/free of 1 MiB
 * per request costs page faults (or an mmap/munmap pair) every time.
 * pread into it + fuse_reply_buf beats libfuse's splice path here
 * (shared/notes/pitfalls.md).  Freed when libfuse retires the thread.
 */
static pthread_key_t read_buf_key;
static pthread_once_t read_buf_once = PTHREAD_ONCE_INIT;
static __thread void *read_buf;

static void read_buf_key_init(void)
{
	pthread_key_create(&read_buf_key, free);
}

static void *thread_read_buf(void)
{
	if (!read_buf) {
		pthread_once(&read_buf_once, read_buf_key_init);
		if (posix_memalign(&read_buf, 4096, FS_MAX_IO))
			return read_buf = NULL;
		pthread_setspecific(read_buf_key, read_buf);
	}
	return read_buf;
}

/*
 * Reply with the bytes spliced from the host files that hold them: the
 * kernel moves page references from the image file's page cache into a pipe
 * and copies once into the FUSE page, where pread + writev copy twice.  Only
 * when the whole range maps (no compressed cluster, no damage) and the reply
 * fits the pipe; false: nothing was sent, read it.
 */
static bool reply_spliced(fuse_req_t req, struct view *v, size_t size, uint64_t off)
{
	static char zeroes[FS_SPLICE_MAX_READ]; /* in .bss: never written */
	struct bdev_extent ext[FS_SPLICE_EXTENTS];
	struct bdev_extents x = { .ext = ext, .max = FS_SPLICE_EXTENTS };
	struct fuse_bufvec *bv;

	if (!FS(req)->splice || size < 2 * 4096 || size > FS_SPLICE_MAX_READ)
		return false;
	/* buf[] is a trailing array: allocated, not declared, past buf[0] */
	if (bdev_map(v->dev, off, size, &x) != (int64_t)size ||
	    !(bv = malloc(sizeof(*bv) + (x.n - 1) * sizeof(bv->buf[0])))) {
		bdev_extents_release(&x);
		return false;
	}
	*bv = FUSE_BUFVEC_INIT(size);
	bv->count = x.n;
	for (unsigned i = 0; i < x.n; i++) {
		struct fuse_buf *fb = &bv->buf[i];

		*fb = (struct fuse_buf){ .size = ext[i].len };
		if (ext[i].fd < 0) {
			fb->mem = zeroes;
		} else {
			fb->flags = FUSE_BUF_IS_FD | FUSE_BUF_FD_SEEK;
			fb->fd = ext[i].fd;
			fb->pos = (off_t)ext[i].pos;
		}
	}
	fuse_reply_data(req, bv, 0);
	bdev_extents_release(&x); /* the bytes are in the reply now */
	free(bv);
	return true;
}

static void op_read(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off,
		    struct fuse_file_info *fi)
{
	struct view *v = FV(fi);
	uint64_t uoff = (uint64_t)off;
	void *buf;
	int r;

	if (off < 0) {
		fuse_reply_err(req, EINVAL);
		return;
	}
	if (uoff >= v->length) {
		fuse_reply_buf(req, NULL, 0);
		return;
	}
	size = (size_t)MIN((uint64_t)size, v->length - uoff);
	if (reply_spliced(req, v, size, uoff))
		return;
	buf = size <= FS_MAX_IO ? thread_read_buf() : malloc(size);
	if (!buf) {
		fuse_reply_err(req, ENOMEM);
		return;
	}
	r = bdev_pread(v->dev, buf, size, uoff);
	if (r < 0) {
		fs_log_refusal(FS(req), v->name, "read", uoff, size, -r, NULL);
		fuse_reply_err(req, -r);
	}
	else
		fuse_reply_buf(req, buf, size);
	if (size > FS_MAX_IO)
		free(buf);
}

static void op_write(fuse_req_t req, fuse_ino_t ino, const char *buf, size_t size,
		     off_t off, struct fuse_file_info *fi)
{
	struct view *v = FV(fi);
	uint64_t uoff = (uint64_t)off;
	unsigned flags = (fi->flags & (O_SYNC | O_DSYNC)) ? BDEV_FUA : 0;
	int r;

	if (!v->writable) {
		fs_log_refusal(FS(req), v->name, "write", uoff, size, EROFS, "the view is read-only");
		fuse_reply_err(req, EROFS);
		return;
	}
	if (off < 0 || uoff > v->length) {
		fs_log_refusal(FS(req), v->name, "write", uoff, size, EINVAL, "past the end of the view");
		fuse_reply_err(req, EINVAL);
		return;
	}
	/* a device does not grow: a write at the end is "no space" */
	if (size > v->length - uoff) {
		if (uoff == v->length) {
			fs_log_refusal(FS(req), v->name, "write", uoff, size, ENOSPC,
				       "at the end of the view (a view does not grow)");
			fuse_reply_err(req, ENOSPC);
			return;
		}
		size = (size_t)(v->length - uoff);
	}
	/* a cached write updates its own pages; after a direct one, drop them
	 * (recent kernels do it themselves, older ones do not) */
	write_begin(FS(req), fi->direct_io ? 0 : ino);
	r = bdev_pwrite(v->dev, buf, size, uoff, flags);
	if (r < 0)
		fs_log_refusal(FS(req), v->name, "write", uoff, size, -r, NULL);
	write_end(req, r < 0 ? -r : 0, size, true);
}

static void op_fsync(fuse_req_t req, fuse_ino_t ino, int datasync, struct fuse_file_info *fi)
{
	int r = bdev_flush(FV(fi)->dev);

	if (r < 0)
		fs_log_refusal(FS(req), FV(fi)->name, "fsync", 0, 0, -r, NULL);
	fuse_reply_err(req, -r);
}

static void op_flush(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	/* writes are not cached here: close() has nothing to push */
	fuse_reply_err(req, 0);
}

static void op_release(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	fuse_reply_err(req, 0);
}

/*
 * fallocate: PUNCH_HOLE reads back as zeroes, always (a discard that may be
 * ignored is not enough); ZERO_RANGE zeroes without deallocating; plain
 * allocation inside the device is a no-op.  Nothing may grow the device.
 */
static void op_fallocate(fuse_req_t req, fuse_ino_t ino, int mode, off_t off,
			 off_t len, struct fuse_file_info *fi)
{
	struct view *v = FV(fi);
	uint64_t uoff = (uint64_t)off, ulen = (uint64_t)len;
	int r;

	if (off < 0 || len <= 0) {
		fuse_reply_err(req, EINVAL);
		return;
	}
	if (!v->writable) {
		fs_log_refusal(FS(req), v->name, "fallocate", uoff, ulen, EROFS, "the view is read-only");
		fuse_reply_err(req, EROFS);
		return;
	}
	if (mode & ~(FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE)) {
		fuse_reply_err(req, EOPNOTSUPP);
		return;
	}
	if (range_exceeds(uoff, ulen, v->length)) {
		if (!(mode & FALLOC_FL_KEEP_SIZE) || uoff >= v->length) {
			fuse_reply_err(req, (mode & FALLOC_FL_KEEP_SIZE) ? 0 : EFBIG);
			return;
		}
		ulen = v->length - uoff;
	}
	/* the kernel drops the range from its own cache */
	write_begin(FS(req), ino);
	if (mode & FALLOC_FL_PUNCH_HOLE)
		r = bdev_zero(v->dev, uoff, ulen, BDEV_MAY_UNMAP);
	else if (mode & FALLOC_FL_ZERO_RANGE)
		r = bdev_zero(v->dev, uoff, ulen, 0);
	else
		r = 0;
	if (r < 0)
		fs_log_refusal(FS(req), v->name, "fallocate", uoff, ulen, -r, NULL);
	write_end(req, -r, 0, false);
}

/* SEEK_DATA / SEEK_HOLE from block status: a hole is a range that reads as
 * zeroes, so cp --sparse and qemu-img convert keep holes. */
static void op_lseek(fuse_req_t req, fuse_ino_t ino, off_t off, int whence,
		     struct fuse_file_info *fi)
{
	struct view *v = FV(fi);
	uint64_t pos = (uint64_t)off;

	if (whence != SEEK_DATA && whence != SEEK_HOLE) {
		fuse_reply_err(req, EINVAL);
		return;
	}
	if (off < 0 || pos >= v->length) {
		fuse_reply_err(req, ENXIO);
		return;
	}
	while (pos < v->length) {
		uint64_t run;
		unsigned st, depth;
		int r = bdev_block_status(v->dev, pos, v->length - pos, &run, &st, &depth);
		bool zero;

		if (r < 0) { /* unknown: call it data */
			if (whence == SEEK_DATA) {
				fuse_reply_lseek(req, (off_t)pos);
				return;
			}
			run = MIN(v->length - pos, (uint64_t)FS_MAX_IO);
			pos += run;
			continue;
		}
		zero = st & BDEV_ST_ZERO;
		if ((whence == SEEK_DATA && !zero) || (whence == SEEK_HOLE && zero)) {
			fuse_reply_lseek(req, (off_t)pos);
			return;
		}
		pos += run;
	}
	if (whence == SEEK_HOLE)
		fuse_reply_lseek(req, (off_t)v->length);
	else
		fuse_reply_err(req, ENXIO);
}

/* ---- extended attributes ------------------------------------------------- */

#define XATTR_PREFIX "user.imgfs."
static const char *const xattr_names[] = {
	"image", "view", "format", "offset", "length", "control",
};

static char *xattr_value(struct fs *fs, struct view *v, const char *key)
{
	if (!strcmp(key, "image"))
		return g_strdup(fs->img->path);
	if (!strcmp(key, "view"))
		return v ? g_strdup(v->name) : NULL;
	if (!strcmp(key, "format"))
		return g_strdup(fs->img->format);
	if (!strcmp(key, "offset"))
		/* a snapshot is no slice of disk: its bytes start at its own 0 */
		return v ? g_strdup_printf("%" PRIu64, v->offset == UINT64_MAX ? 0 : v->offset) : NULL;
	if (!strcmp(key, "length"))
		return v ? g_strdup_printf("%" PRIu64, v->length) : NULL;
	if (!strcmp(key, "control"))
		return fs->control_path ? g_strdup(fs->control_path) : NULL;
	return NULL;
}

static void op_getxattr(fuse_req_t req, fuse_ino_t ino, const char *name, size_t size)
{
	struct fs *fs = FS(req);
	struct fs_node *n = node_by_ino(fs, ino);
	struct view *v = node_view(fs, n);
	char *val;
	size_t len;

	if (!n) {
		fuse_reply_err(req, ENOENT);
		return;
	}
	if (strncmp(name, XATTR_PREFIX, strlen(XATTR_PREFIX))) {
		fuse_reply_err(req, ENODATA);
		return;
	}
	val = xattr_value(fs, v, name + strlen(XATTR_PREFIX));
	if (!val) {
		fuse_reply_err(req, ENODATA);
		return;
	}
	len = strlen(val);
	if (size == 0)
		fuse_reply_xattr(req, len);
	else if (size < len)
		fuse_reply_err(req, ERANGE);
	else
		fuse_reply_buf(req, val, len);
	g_free(val);
}

static void op_listxattr(fuse_req_t req, fuse_ino_t ino, size_t size)
{
	struct fs *fs = FS(req);
	struct fs_node *n = node_by_ino(fs, ino);
	struct view *v = node_view(fs, n);
	GString *list = g_string_new(NULL);

	if (!n) {
		fuse_reply_err(req, ENOENT);
		g_string_free(list, TRUE);
		return;
	}
	for (unsigned i = 0; i < ARRAY_SIZE(xattr_names); i++) {
		char *val = xattr_value(fs, v, xattr_names[i]);

		if (!val)
			continue;
		g_free(val);
		g_string_append(list, XATTR_PREFIX);
		g_string_append(list, xattr_names[i]);
		g_string_append_c(list, '\0');
	}
	if (size == 0)
		fuse_reply_xattr(req, list->len);
	else if (size < list->len)
		fuse_reply_err(req, ERANGE);
	else
		fuse_reply_buf(req, list->str, list->len);
	g_string_free(list, TRUE);
}

static void op_setxattr(fuse_req_t req, fuse_ino_t ino, const char *name,
			const char *value, size_t size, int flags)
{
	fuse_reply_err(req, strncmp(name, XATTR_PREFIX, strlen(XATTR_PREFIX)) ? ENOTSUP : EPERM);
}

static void op_removexattr(fuse_req_t req, fuse_ino_t ino, const char *name)
{
	fuse_reply_err(req, strncmp(name, XATTR_PREFIX, strlen(XATTR_PREFIX)) ? ENOTSUP : EPERM);
}

/* ---- coherency ---------------------------------------------------------- */

/*
 * A disk range changed: the kernel's cached pages of every view that shows
 * it are dropped (fuse_lowlevel_notify_inval_inode) before the write is
 * answered, so a read through any view after the write returns sees it.
 *
 * That call waits for the page locks that reads in flight hold until a FUSE
 * worker answers them.  A worker must not wait there: with a bounded pool,
 * as many concurrent writes as workers would leave no worker to answer the
 * reads, and the mount would hang.  So a FUSE write only collects the
 * ranges (wr.d) and hands them with its reply to one thread of its own,
 * which drops the pages and then answers; the worker goes back to serving.
 * Writes from elsewhere (imgfs-nbd) invalidate on their own thread.
 *
 * The inode written through is skipped when the kernel keeps its cache
 * itself (a cached write holds those page locks: dropping them from inside
 * the write would deadlock).
 */
static gpointer deferred_stop_marker = &deferred_stop_marker;

static void reply(fuse_req_t req, int err, size_t written, bool write)
{
	if (write && !err)
		fuse_reply_write(req, written);
	else
		fuse_reply_err(req, err);
}

static void write_begin(struct fs *fs, fuse_ino_t self)
{
	wr.self = self;
	/* no thread to hand over to (it could not start): invalidate in place */
	wr.defer = fs->deferred != NULL;
	wr.d = NULL;
}

/* Answer a write or fallocate: now, or after its invalidations. */
static void write_end(fuse_req_t req, int err, size_t written, bool write)
{
	struct deferred *d = wr.d;

	wr.self = 0;
	wr.defer = false;
	wr.d = NULL;
	if (!d) {
		reply(req, err, written, write);
		return;
	}
	d->req = req;
	d->err = err;
	d->write = write;
	d->written = written;
	g_async_queue_push(FS(req)->deferred, d);
}

/* Add a range to this thread's write; false: no memory, drop it in place. */
static bool defer_range(fuse_ino_t ino, uint64_t off, uint64_t len)
{
	struct deferred *d = wr.d;

	if (!d || d->n == d->cap) {
		unsigned cap = d ? 2 * d->cap : 4;

		d = realloc(d, sizeof(*d) + cap * sizeof(d->r[0]));
		if (!d)
			return false;
		if (!wr.d)
			d->n = 0;
		d->cap = cap;
		wr.d = d;
	}
	d->r[d->n++] = (struct inval_range){ ino, off, len };
	return true;
}

static gpointer deferred_main(gpointer opaque)
{
	struct fs *fs = opaque;
	struct deferred *d;

	while ((d = g_async_queue_pop(fs->deferred)) != deferred_stop_marker) {
		for (unsigned i = 0; i < d->n; i++)
			fuse_lowlevel_notify_inval_inode(fs->se, d->r[i].ino, (off_t)d->r[i].off,
							 (off_t)d->r[i].len);
		reply(d->req, d->err, d->written, d->write);
		free(d);
	}
	g_mutex_lock(&fs->deferred_lock);
	fs->deferred_done = true;
	g_cond_broadcast(&fs->deferred_cond);
	g_mutex_unlock(&fs->deferred_lock);
	return NULL;
}

void fs_start_deferred(struct fs *fs)
{
	GError *err = NULL;

	if (fs->single_thread)
		return;
	g_mutex_init(&fs->deferred_lock);
	g_cond_init(&fs->deferred_cond);
	fs->deferred_done = false;
	fs->deferred = g_async_queue_new();
	fs->deferred_thread = g_thread_try_new("imgfs-inval", deferred_main, fs, &err);
	if (!fs->deferred_thread) {
		/* writes then invalidate in their worker: as safe as the pool is large */
		log_warn("cannot start the invalidation thread: %s", err->message);
		g_error_free(err);
		g_async_queue_unref(fs->deferred);
		fs->deferred = NULL;
		g_cond_clear(&fs->deferred_cond);
		g_mutex_clear(&fs->deferred_lock);
	}
}

/*
 * After SIGTERM, libfuse ends its workers once their current request is
 * done, and requests still queued in the kernel stay unanswered.  A buffered
 * read among them holds its pages locked, and a write's invalidation of
 * those pages then waits for ever: the caller bounds the wait, aborts the
 * connection (which ends those reads with an error), and joins.
 */
bool fs_stop_deferred(struct fs *fs, unsigned timeout_ms)
{
	gint64 until = g_get_monotonic_time() + (gint64)timeout_ms * G_TIME_SPAN_MILLISECOND;
	bool done;

	if (!fs->deferred)
		return true;
	/* the FUSE workers have ended: nothing is pushed after the marker */
	g_async_queue_push(fs->deferred, deferred_stop_marker);
	g_mutex_lock(&fs->deferred_lock);
	while (!fs->deferred_done)
		if (!g_cond_wait_until(&fs->deferred_cond, &fs->deferred_lock, until))
			break;
	done = fs->deferred_done;
	g_mutex_unlock(&fs->deferred_lock);
	if (done)
		fs_join_deferred(fs);
	return done;
}

void fs_join_deferred(struct fs *fs)
{
	if (!fs->deferred)
		return;
	g_thread_join(fs->deferred_thread);
	g_async_queue_unref(fs->deferred);
	fs->deferred = NULL;
	fs->deferred_thread = NULL;
	g_cond_clear(&fs->deferred_cond);
	g_mutex_clear(&fs->deferred_lock);
}

/* Is view v a slice of disk that overlaps [off, off+len)? */
static bool overlaps(const struct view *v, uint64_t off, uint64_t len)
{
	return v->offset != UINT64_MAX &&
	       off < v->offset + v->length && off + len > v->offset;
}

/* Drop the cached pages of view v (inode ino) that overlap disk [off, off+len). */
static void inval_overlap(struct fs *fs, struct view *v, fuse_ino_t ino,
			  uint64_t off, uint64_t len)
{
	uint64_t start, end;

	if (!overlaps(v, off, len) || ino == wr.self)
		return;
	start = MAX(off, v->offset) - v->offset;
	end = MIN(off + len, v->offset + v->length) - v->offset;
	if (!wr.defer || !defer_range(ino, start, end - start))
		fuse_lowlevel_notify_inval_inode(fs->se, ino, (off_t)start, (off_t)(end - start));
}

void fs_on_disk_write(void *opaque, uint64_t off, uint64_t len)
{
	struct fs *fs = opaque;
	struct view **views;
	unsigned n;

	if (fs->single_thread || !fs->se)
		return;
	if (!fs->dir_mode) {
		/* one view, one inode: no list to copy on every write */
		struct view *v = image_find_view(fs->img, fs->file_view);

		if (v)
			inval_overlap(fs, v, FUSE_ROOT_ID, off, len);
		return;
	}
	n = image_list_views(fs->img, &views, NULL);
	for (unsigned i = 0; i < n; i++)
		if (overlaps(views[i], off, len))
			inval_overlap(fs, views[i], node_for_name(fs, views[i]->name)->ino, off, len);
	free(views);
}

static void op_init(void *userdata, struct fuse_conn_info *conn)
{
	struct fs *fs = userdata;

	/* 1 MiB requests: libfuse derives max_pages from max_write */
	conn->max_write = FS_MAX_IO;
	/* the kernel keeps min(this, the bdi's read_ahead_kb): main() raises the latter */
	conn->max_readahead = FS_READAHEAD_KB * 1024;
	conn->want |= FUSE_CAP_ASYNC_READ & conn->capable;
	conn->want |= FUSE_CAP_PARALLEL_DIROPS & conn->capable;
	/* our invalidations are explicit; mtime changes must not drop caches */
	conn->want &= ~FUSE_CAP_AUTO_INVAL_DATA;
	conn->want &= ~FUSE_CAP_WRITEBACK_CACHE;
	conn->want &= ~(FUSE_CAP_SPLICE_READ | FUSE_CAP_SPLICE_WRITE | FUSE_CAP_SPLICE_MOVE);
	if (fs->splice)
		conn->want |= FUSE_CAP_SPLICE_WRITE & conn->capable;
	/* libfuse insists that init ask for the max_read the mount was given */
	conn->max_read = fs->max_read;
}

const struct fuse_lowlevel_ops fs_ops = {
	.init = op_init,
	.lookup = op_lookup,
	.getattr = op_getattr,
	.setattr = op_setattr,
	.opendir = op_opendir,
	.readdir = op_readdir,
	.statfs = op_statfs,
	.open = op_open,
	.read = op_read,
	.write = op_write,
	.flush = op_flush,
	.release = op_release,
	.fsync = op_fsync,
	.fallocate = op_fallocate,
	.lseek = op_lseek,
	.getxattr = op_getxattr,
	.listxattr = op_listxattr,
	.setxattr = op_setxattr,
	.removexattr = op_removexattr,
};
