/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The qcow2 write path: state and calls shared by qcow2-refcount.c,
 * qcow2-write.c and qcow2-check.c (and the unit tests).
 *
 * Threads.  One metadata mutex (w->lock) guards the refcount cache, the
 * allocator, L1 updates, L2 entry updates and the pending-free list; it is
 * held for lookups and metadata updates, and across a metadata flush, but
 * never across a guest data write.  Every write, zero or discard registers
 * its guest cluster range as in flight first; an overlapping request waits
 * (copy-on-write must not race another write to the same cluster).
 *
 * Crash safety (notes/qcow2.md §2).  Metadata is write-back, and reaches
 * the disk only in qcow2_meta_flush(), in this order:
 *
 *   1. dirty refcount blocks (increments only: decrements are pending)
 *   2. the refcount table (new refblocks), then the header if it moved
 *   3. fdatasync of the image and the data file: refcount increments and
 *      guest data are durable before anything that points at them
 *   4. dirty L2 slices, 5. dirty L1 clusters (after an fdatasync when
 *      new L2 tables appeared: L2 before L1), 6. fdatasync
 *   7. the pending frees are applied (L2 first, then refcount decrement),
 *      their refblocks written and synced.
 *
 * An L2 entry is only changed after the guest data it points at has been
 * written (pwrite returned), so every L2 entry a flush writes points at
 * data that step 3 made durable.  At every instant the on-disk refcount of
 * a cluster is >= its on-disk references: a crash can only leak.
 * A freed cluster is never reused before the L2 change that freed it is
 * durable (the free is only applied in step 7).
 */
#ifndef IMGFS_QCOW2_WRITE_H
#define IMGFS_QCOW2_WRITE_H

#include "qcow2-int.h"

/* metadata classes for the overlap check (qemu's "cached" template) */
#define QM_HEADER    (1u << 0)
#define QM_L1        (1u << 1)
#define QM_REFTABLE  (1u << 2)
#define QM_REFBLOCK  (1u << 3)
#define QM_SNAPTABLE (1u << 4)
#define QM_L2        (1u << 5)
#define QM_SNAP_L1   (1u << 6)

struct qcow2_rblock {
	uint64_t off;       /* host offset of the refcount block */
	bool dirty;
	uint8_t data[];
};

struct qcow2_mset {         /* host cluster index -> QM_* classes */
	uint64_t *keys;     /* cluster + 1; 0 = empty slot */
	uint8_t *vals;
	size_t cap, used;   /* cap a power of two */
};

struct qcow2_inflight {
	uint64_t first, last;   /* guest clusters */
	struct qcow2_inflight *next;
};

struct qcow2_writer {
	pthread_mutex_t lock;
	pthread_cond_t cond;
	struct qcow2_inflight *inflight;

	bool header_done;       /* dirty bit / autoclear written before the first change */
	bool set_dirty;         /* we set the dirty bit: clear it on clean close */
	atomic_bool corrupt;    /* overlap found: writes refused, reads stay */
	bool repairing;         /* allocate only past every known cluster */

	/* refcounts (§ "Host cluster management") */
	unsigned rc_order;
	uint64_t rc_max;
	uint64_t rb_entries;    /* clusters per refcount block */
	uint64_t *reftable;     /* host order */
	uint64_t rt_entries;
	uint64_t rt_offset;
	uint32_t rt_clusters;
	bool rt_dirty, rt_moved;
	struct qcow2_rblock **rbs; /* by reftable index, loaded lazily */
	uint64_t rbs_loaded;
	uint64_t free_hint;     /* lowest cluster that may be free */
	uint64_t alloc_end;     /* every cluster from here on is free */

	/* frees waiting for the L2 change that made them to be durable */
	uint64_t *pfree;        /* host cluster indexes */
	size_t npfree, pfree_cap;
	/* durable frees waiting for the readers that may still use them:
	 * those counted in readers.count[held_epoch & 1] */
	uint64_t *held;
	size_t nheld, held_cap;
	unsigned held_epoch;
	bool zcache_stale;
	/* reads of the active disk in flight (qcow2_reader_enter), by epoch */
	struct {
		atomic_uint epoch;
		atomic_uint count[2];
	} readers;

	/* L1 clusters to write */
	uint8_t *l1_dirty;
	uint64_t **l1_retired;  /* tables replaced by a grown L1: readers may hold them */
	unsigned nl1_retired;
	bool any_l1_dirty;
	unsigned updates;       /* metadata changes since the last flush */

	struct qcow2_mset meta;
};

/* qcow2-refcount.c: pure entry arithmetic (order = log2 of the width) */
uint64_t qcow2_rc_entry_get(const uint8_t *block, unsigned order, uint64_t idx);
void qcow2_rc_entry_set(uint8_t *block, unsigned order, uint64_t idx, uint64_t v);

/* qcow2-refcount.c: everything below with w->lock held */
int qcow2_rc_init(struct qcow2 *s, struct err *e);
void qcow2_rc_free(struct qcow2 *s);
int qcow2_rc_get(struct qcow2 *s, uint64_t cluster, uint64_t *rc);
/* +1 or -1 now (in memory; written by the next flush).  Callers free with
 * qcow2_free_later(), never with a direct decrement. */
int qcow2_rc_add(struct qcow2 *s, uint64_t cluster, int delta);
/* Set the refcount of a cluster (repair). */
int qcow2_rc_set(struct qcow2 *s, uint64_t cluster, uint64_t v);
/* n contiguous free clusters, refcount set to 1; *off their host offset. */
int qcow2_alloc_clusters(struct qcow2 *s, uint64_t n, uint64_t *off);
/* -1 on each of n clusters from host offset off, once the current L2/L1
 * changes are durable (step 7 above). */
void qcow2_free_later(struct qcow2 *s, uint64_t off, uint64_t n);
/* The host clusters a compressed descriptor's bytes touch, freed later. */
void qcow2_free_compressed_later(struct qcow2 *s, uint64_t entry);
/* Steps 1-2: refblocks, then the refcount table (and header). */
int qcow2_rc_write(struct qcow2 *s);
/*
 * Step 7: apply the durable frees (in memory, and punch freed clusters)
 * once no read that began before their L2 change is still in flight; the
 * rest wait for a later flush (a crash meanwhile only leaks them).  Sets
 * *applied when it changed refcounts.
 */
int qcow2_rc_apply_frees(struct qcow2 *s, bool *applied);
/* Frees not applied yet, durable or not. */
static inline bool qcow2_frees_pending(const struct qcow2_writer *w)
{
	return w->npfree || w->nheld;
}

/*
 * Readers of the active disk's data (no lock needed): a read or a mapping
 * of guest bytes, from the L2 lookup to the last use of the host bytes, is
 * bracketed by these, so that a cluster it found is neither reused nor
 * punched while it reads, even if a discard frees it meanwhile.  The
 * tag from enter goes to exit.
 */
unsigned qcow2_reader_enter(struct qcow2_writer *w);
void qcow2_reader_exit(struct qcow2_writer *w, unsigned tag);
/* Drop clean refcount blocks when the cache is large. */
void qcow2_rc_trim(struct qcow2 *s);

/* qcow2-check.c */
void qcow2_mset_put(struct qcow2_mset *m, uint64_t cluster, unsigned cls);
void qcow2_mset_clear(struct qcow2_mset *m, uint64_t cluster, unsigned cls);
unsigned qcow2_mset_get(const struct qcow2_mset *m, uint64_t cluster);
void qcow2_mset_free(struct qcow2_mset *m);
/* Build the set of metadata clusters of an image opened for writing. */
int qcow2_meta_build(struct qcow2 *s, struct err *e);
/* Before writing [off, off+len) of the image file: does it overlap
 * metadata of a class not in allowed?  On a violation the image is marked
 * corrupt and -EIO returned. */
int qcow2_overlap_check(struct qcow2 *s, uint64_t off, uint64_t len, unsigned allowed);
/* Set the corrupt bit, stop writing (reads stay up); returns -EIO. */
int qcow2_signal_corruption(struct qcow2 *s, const char *fmt, ...)
	__attribute__((format(printf, 2, 3)));
/* Rebuild every refcount from the L1/L2 tables (a dirty image). */
int qcow2_repair_refcounts(struct qcow2 *s, struct err *e);

/* qcow2-write.c */
int qcow2_writer_open(struct qcow2 *s, struct err *e);
void qcow2_writer_close(struct qcow2 *s);
int qcow2_meta_flush(struct qcow2 *s);
int qcow2_header_write(struct qcow2 *s, uint64_t off, const void *buf, size_t len);
int qcow2_dev_pwrite(struct bdev *d, const void *buf, size_t len, uint64_t off,
		     unsigned flags);
int qcow2_dev_zero(struct bdev *d, uint64_t off, uint64_t len, unsigned flags);
int qcow2_dev_discard(struct bdev *d, uint64_t off, uint64_t len);
int qcow2_dev_flush(struct bdev *d);
/* Grow the virtual disk (like qemu-img resize); shrinking is -ENOTSUP. */
int qcow2_dev_resize(struct bdev *d, uint64_t size);

#endif
