/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The one block-device interface.  Everything that holds bytes — a file, a
 * raw or qcow2 image, a partition window, a snapshot — is a struct bdev, and
 * the front ends (fs/, nbd/) only ever call the bdev_* wrappers below.
 *
 * Contract for implementations:
 *  - every op returns 0 or a negative errno;
 *  - pread/pwrite transfer the whole length or fail (no short transfers);
 *  - the wrappers have already checked the range against dev->size and the
 *    read-only flag, so ops may assume off + len <= size;
 *  - every op may be called from many threads at once: a device that cannot
 *    allow that guards itself with its own lock.
 */
#ifndef IMGFS_BDEV_H
#define IMGFS_BDEV_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* write / zero flags */
#define BDEV_FUA       (1u << 0) /* durable before the call returns */
#define BDEV_MAY_UNMAP (1u << 1) /* zero: may deallocate */
#define BDEV_FAST_ZERO (1u << 2) /* zero: fail with -ENOTSUP rather than write zeroes slowly */
#define BDEV_NO_FALLBACK BDEV_FAST_ZERO

/* block_status bits (the NBD base:allocation meanings) */
#define BDEV_ST_HOLE (1u << 0) /* not allocated in any layer */
#define BDEV_ST_ZERO (1u << 1) /* reads as zeroes */

struct bdev;

/*
 * Where a range of a device lives in host files, for zero-copy reads
 * (splice, sendfile): extents in order, each a range of a host file or bytes
 * that read as zeroes.  Adjacent pieces are merged.
 */
struct bdev_extent {
	int fd;          /* host file; -1: zeroes */
	uint64_t pos;    /* offset in fd */
	uint64_t len;
};

struct bdev_extents {
	struct bdev_extent *ext;
	unsigned max, n;
	/*
	 * Set by a device that may reuse host space (a writable qcow2): the
	 * extents stay valid, even across a discard and a flush of those bytes,
	 * until bdev_extents_release().  Zero-initialise the struct.
	 */
	void (*unpin)(void *ctx, unsigned tag);
	void *pin_ctx;
	unsigned pin_tag;
};

/* Append a piece; false if it needs an extent and none is left. */
bool bdev_extents_add(struct bdev_extents *x, int fd, uint64_t pos, uint64_t len);
/*
 * For a map op whose range [0, len) ends in zeroes: m of the first n bytes
 * were mapped (m < 0: an error).  Appends the zeroes [n, len) if all n
 * were; returns the bytes mapped, as a map op does.
 */
int64_t bdev_extents_pad(struct bdev_extents *x, int64_t m, uint64_t n, uint64_t len);

struct bdev_ops {
	int (*pread)(struct bdev *, void *buf, size_t len, uint64_t off);
	/* As pread, from memory only (page cache, the device's own caches):
	 * -EAGAIN where it would wait for the disk; optional. */
	int (*pread_nowait)(struct bdev *, void *buf, size_t len, uint64_t off);
	int (*pwrite)(struct bdev *, const void *buf, size_t len, uint64_t off,
		      unsigned flags);
	int (*zero)(struct bdev *, uint64_t off, uint64_t len, unsigned flags);
	int (*discard)(struct bdev *, uint64_t off, uint64_t len);
	int (*flush)(struct bdev *);
	/*
	 * Status of the run starting at off: *run (1 <= *run <= len) bytes all
	 * share *status (BDEV_ST_*) and *depth (1 = this layer holds the data,
	 * 2 = its backing file, ..., 0 = no layer: unallocated).
	 */
	int (*block_status)(struct bdev *, uint64_t off, uint64_t len,
			    uint64_t *run, unsigned *status, unsigned *depth);
	void (*close)(struct bdev *);
	/* Grow to size bytes (the device updates its own size); optional. */
	int (*resize)(struct bdev *, uint64_t size);
	/* Where the bytes live, for bdev_map; optional. */
	int64_t (*map)(struct bdev *, uint64_t off, uint64_t len,
		       struct bdev_extents *x);
};

struct bdev {
	const struct bdev_ops *ops;
	const char *kind;   /* "file", "raw", "qcow2", "window", "snapshot", ... */
	uint64_t size;      /* bytes */
	bool read_only;
	bool growable;      /* writes past size extend it (the file under a qcow2 image) */
	uint32_t min_block; /* preferred minimum I/O size, 1 if any */
	void *priv;         /* the implementation's state */
};

int bdev_pread(struct bdev *, void *buf, size_t len, uint64_t off);
/*
 * bdev_pread if it needs no disk I/O, for a caller that would rather hand a
 * read that blocks to another thread: -EAGAIN if it would (also for a
 * device without the op, and where the read would fail: bdev_pread then
 * says why).  buf is undefined after an error.
 */
int bdev_pread_nowait(struct bdev *, void *buf, size_t len, uint64_t off);
int bdev_pwrite(struct bdev *, const void *buf, size_t len, uint64_t off,
		unsigned flags);
/* Zero a range; falls back to writing zero buffers unless BDEV_FAST_ZERO. */
int bdev_zero(struct bdev *, uint64_t off, uint64_t len, unsigned flags);
/* Advisory: a device without discard ignores it (returns 0). */
int bdev_discard(struct bdev *, uint64_t off, uint64_t len);
int bdev_flush(struct bdev *);
/* Devices without block_status report one data run of depth 1. */
int bdev_block_status(struct bdev *, uint64_t off, uint64_t len,
		      uint64_t *run, unsigned *status, unsigned *depth);
void bdev_close(struct bdev *);
/* Grow a device: -ENOTSUP if it cannot (or for shrinking), -EROFS read-only. */
int bdev_resize(struct bdev *, uint64_t size);
/*
 * Map [off, off + len) onto host files: appends extents to x (x->n counts
 * them) and returns how many bytes from off they cover, a prefix of the
 * range; it stops early where it cannot say (a compressed cluster, damage,
 * a device without the op, no extent left), so 0 means "read it with
 * bdev_pread", which also reports any damage.  < 0: an error.  The host
 * bytes hold what the device held at the time of the call until
 * bdev_extents_release(x), which the caller must call once it has used
 * them, whatever bdev_map returned: until then the device does not reuse
 * those host bytes for other data or punch them out, even if the range is
 * discarded and flushed (a later write to the range may land in place).
 */
int64_t bdev_map(struct bdev *, uint64_t off, uint64_t len, struct bdev_extents *x);
/* End of the caller's use of x's extents; x may be mapped into again. */
void bdev_extents_release(struct bdev_extents *x);

/*
 * A zeroed bdev with ops set, for implementations; never fails (aborts on OOM).
 * bdev_close() calls ops->close (which frees priv and whatever the device
 * owns) and then frees the struct bdev itself.
 */
struct bdev *bdev_new(const struct bdev_ops *ops, const char *kind,
		      uint64_t size, bool read_only, void *priv);

#endif
