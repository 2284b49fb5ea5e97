/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * qcow2 internals shared by the qcow2-*.c files (and the unit tests).
 * Section references (§) are to qemu's docs/interop/qcow2.rst.
 *
 * Split by concern:
 *   qcow2.c           header, extensions, feature bits, open/close
 *   qcow2-cluster.c   L1/L2 lookup, entry decoding, read path, block status
 *   qcow2-cache.c     the bounded LRU cache of L2 slices
 *   qcow2-compress.c  deflate / zstd cluster decompression
 *   qcow2-snapshot.c  the snapshot table and read-only snapshot devices
 *   qcow2-refcount.c  refcounts, the allocator, refcount table growth
 *   qcow2-write.c     writes, copy-on-write, zeroes, discard, flush order
 *   qcow2-check.c     the overlap check, the corrupt bit, dirty-image repair
 *                     (the write path's own header: qcow2-write.h)
 *
 * Threads: reads run in parallel with no lock held across I/O.  The active
 * L1 is immutable while the device is read-only; the L2 cache, the
 * decompressed-cluster cache and the damage log each have a short mutex.
 * A write path (DESIGN.md) adds: a metadata mutex around allocation and L2
 * updates (qcow2_cache_write marks slices dirty, qcow2_cache_flush writes
 * them back), in-flight cluster ranges that overlapping requests wait on,
 * an L1 that grows by publishing a new table, and qcow2_zcache_clear()
 * whenever compressed clusters are freed.  Reads of the active disk count
 * themselves in a reader epoch (qcow2_reader_enter; a bdev_map holds its
 * place until bdev_extents_release) and a freed cluster is reused or
 * punched only once every read that may have found it has ended.
 */
#ifndef IMGFS_QCOW2_INT_H
#define IMGFS_QCOW2_INT_H

#include <pthread.h>
#include <stdatomic.h>

#include "qcow2.h"

#define QCOW2_MAGIC 0x514649fbu /* "QFI\xfb" */

/* Header feature bits (§ "Header", bytes 72-95). */
#define QCOW2_INCOMPAT_DIRTY       (1ull << 0)
#define QCOW2_INCOMPAT_CORRUPT     (1ull << 1)
#define QCOW2_INCOMPAT_DATA_FILE   (1ull << 2)
#define QCOW2_INCOMPAT_COMPRESSION (1ull << 3)
#define QCOW2_INCOMPAT_EXTL2       (1ull << 4)
#define QCOW2_INCOMPAT_KNOWN       0x1full
#define QCOW2_COMPAT_LAZY_REFCOUNTS (1ull << 0)
#define QCOW2_AUTOCLEAR_BITMAPS     (1ull << 0)
#define QCOW2_AUTOCLEAR_DATA_RAW    (1ull << 1)

/* Header extension magics (§ "Header extensions"). */
#define QCOW2_EXT_END          0x00000000u
#define QCOW2_EXT_BACKING_FMT  0xe2792acau
#define QCOW2_EXT_FEATURES     0x6803f857u
#define QCOW2_EXT_BITMAPS      0x23852875u
#define QCOW2_EXT_CRYPTO       0x0537be77u
#define QCOW2_EXT_DATA_FILE    0x44415441u

#define QCOW2_COMPRESS_ZLIB 0
#define QCOW2_COMPRESS_ZSTD 1

/* qemu's sanity limits (block/qcow2.h): the floor of what we accept. */
#define QCOW2_MIN_CLUSTER_BITS 9
#define QCOW2_MAX_CLUSTER_BITS 21
#define QCOW2_MAX_L1_BYTES      ((uint64_t)32 << 20)
#define QCOW2_MAX_REFTABLE_BYTES ((uint64_t)8 << 20)
#define QCOW2_MAX_SNAPSHOTS     65536u
#define QCOW2_MAX_SNAPSHOTS_BYTES ((uint64_t)64 << 20)
#define QCOW2_MAX_SNAPSHOT_EXTRA 1024u
#define QCOW2_MAX_BACKING_NAME  1023u
/* Ours: snapshot L1 tables held in memory at once, per image.  Each may be
 * 32 MiB and 65536 snapshots may share one: without a bound, reading every
 * snap@ view of a small hostile file would take 2 TiB. */
#define QCOW2_MAX_SNAP_L1_TOTAL ((uint64_t)256 << 20)

/* L1/L2 entry layout (§ "Cluster mapping"). */
#define QCOW2_OFLAG_COPIED     (1ull << 63)
#define QCOW2_OFLAG_COMPRESSED (1ull << 62)
#define QCOW2_OFLAG_ZERO       (1ull << 0)
#define QCOW2_OFFSET_MASK      0x00fffffffffffe00ull /* bits 9-55 */
#define QCOW2_L1E_RESERVED     0x7f000000000001ffull
#define QCOW2_L2E_RESERVED     0x3f000000000001feull

/* What one (sub)cluster is, after decoding its L2 entry (§ "Extended L2"). */
enum qcow2_sc_type {
	QC_UNALLOC,      /* read from the backing file, or zeroes */
	QC_ZERO,         /* reads as zeroes, never from the backing file */
	QC_NORMAL,       /* data at host offset */
	QC_COMPRESSED,   /* whole cluster, compressed */
	QC_INVALID,      /* a damaged entry: EIO */
};

struct qcow2_cache;
struct qcow2_zcache;
struct qcow2_writer;

/* An L1 table in memory, host byte order: the active one or a snapshot's. */
struct qcow2_l1 {
	uint64_t *table;
	uint32_t size;       /* entries */
	uint64_t offset;     /* in the image file */
	uint64_t disk_size;  /* guest bytes it maps */
	const char *what;    /* "active L1" or "snapshot N L1", for messages */
};

struct qcow2_ext {           /* a header extension we do not interpret: kept */
	uint32_t magic, len;
	uint8_t *data;
};

struct qcow2_snap {          /* one snapshot table entry, parsed */
	struct qcow2_snapshot_info info;
	uint64_t l1_offset;
	uint32_t l1_size;
	uint32_t extra_size;
};

struct qcow2 {
	char *path;
	struct bdev *file;       /* the image file (owned) */
	struct bdev *data;       /* where guest data lives: file, or the external data file */
	struct bdev *data_file;  /* the external data file (owned) or NULL */
	struct bdev *backing;    /* owned, NULL if none or --no-backing */
	bool writable;

	/* header (§ "Header") */
	uint32_t version;
	uint32_t header_length;
	unsigned cluster_bits;
	uint64_t cluster_size;
	uint64_t size;
	uint32_t crypt_method;
	uint64_t refcount_table_offset;
	uint32_t refcount_table_clusters;
	unsigned refcount_order;
	uint32_t nb_snapshots;
	uint64_t snapshots_offset;
	uint64_t incompat, compat, autoclear;
	uint8_t compression_type;

	/* derived geometry */
	bool extended_l2;
	unsigned l2_entry_size;  /* 8, or 16 with extended L2 */
	unsigned l2_bits;        /* log2(entries per L2 table) */
	unsigned subcluster_bits;/* == cluster_bits without extended L2 */
	uint32_t slice_size;     /* bytes of L2 table per cache entry */

	/* extensions */
	char *backing_name;      /* as stored in the image */
	char *backing_fmt;
	char *data_file_name;
	struct qcow2_ext *exts;  /* unknown ones, kept intact for a later rewrite */
	unsigned nexts;
	char *feature_names;     /* raw feature name table, 48-byte entries */
	uint32_t feature_names_len;

	struct qcow2_l1 l1;      /* the active L1 (immutable while read-only) */
	struct qcow2_cache *l2_cache;
	struct qcow2_zcache *zcache;

	struct qcow2_snap *snaps;
	unsigned nsnaps;
	uint64_t snapshots_size; /* bytes of the snapshot table, as parsed */
	uint64_t snap_l1_bytes;  /* snapshot L1 tables in memory (atomic), bounded */

	/* damage reports: each damaged entry logged once, and only so many */
	pthread_mutex_t damage_lock;
	uint64_t damage_seen[32];  /* keys (file offsets of bad entries), ring */
	unsigned damage_logged;

	/* the write path (qcow2-write.h); NULL while read-only */
	struct qcow2_writer *w;
};

/* qcow2.c */
/* The state behind a qcow2 bdev, or NULL if d is not a qcow2 device. */
struct qcow2 *qcow2_state(struct bdev *d);
/* Number of L1 entries needed to map size bytes (64-bit safe). */
uint64_t qcow2_size_to_l1(const struct qcow2 *s, uint64_t size);
/* Validate an L1 table's placement (offset, entries) as qemu does for the
 * active and snapshot L1s; what names it in the message. */
int qcow2_check_l1(const struct qcow2 *s, uint64_t offset, uint64_t entries,
		   const char *what, struct err *e);
/* Read an L1 table into memory (host order). */
int qcow2_load_l1(struct qcow2 *s, struct qcow2_l1 *l1, struct err *e);
/* Log runtime damage once per key (the file offset of the bad entry or
 * data) and at most a bounded number of times per image; returns -EIO. */
int qcow2_damage(struct qcow2 *s, uint64_t key, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));
static inline uint64_t qcow2_file_size(const struct bdev *b)
{
	return __atomic_load_n(&b->size, __ATOMIC_RELAXED);
}

/* qcow2-cluster.c: decoding (pure) */
/* Type of subcluster sc (0..31; 0 without extended L2) given the L2 entry
 * word and (extended L2) its bitmap.  *host gets the host cluster offset;
 * *why a reason when QC_INVALID. */
enum qcow2_sc_type qcow2_l2_decode(const struct qcow2 *s, uint64_t entry,
				   uint64_t bitmap, unsigned sc, uint64_t *host,
				   const char **why);
/* Compressed descriptor (§ "Compressed Clusters Descriptor"). */
void qcow2_compressed_decode(unsigned cluster_bits, uint64_t entry,
			     uint64_t *coffset, uint64_t *csize);

/* qcow2-cluster.c: the L2 table of L1 entry idx, checked to be aligned and
 * inside the file; *l2_off is 0 when unallocated (or idx past the table). */
int qcow2_l1_lookup(struct qcow2 *s, const struct qcow2_l1 *l1, uint64_t idx,
		    uint64_t *l2_off);
/* qcow2-cluster.c: the read path, over any L1 (active or snapshot) */
int qcow2_read(struct qcow2 *s, const struct qcow2_l1 *l1, void *buf,
	       size_t len, uint64_t off);
/* As qcow2_read with no disk I/O (bdev_pread_nowait): -EAGAIN if it would
 * need an L2 slice not in the cache, host bytes not in the page cache, or
 * a compressed cluster not decompressed already. */
int qcow2_read_nowait(struct qcow2 *s, const struct qcow2_l1 *l1, void *buf,
		      size_t len, uint64_t off);
/* bdev_map for the disk that l1 describes. */
int64_t qcow2_map(struct qcow2 *s, const struct qcow2_l1 *l1, uint64_t off,
		  uint64_t len, struct bdev_extents *x);
int qcow2_status(struct qcow2 *s, const struct qcow2_l1 *l1, uint64_t off,
		 uint64_t len, uint64_t *run, unsigned *status, unsigned *depth);

/* qcow2-cache.c */
struct qcow2_cache *qcow2_cache_new(struct bdev *file, uint32_t slice_size,
				    uint64_t max_bytes);
void qcow2_cache_free(struct qcow2_cache *c);
/* Copy n bytes at in_off within the slice at host offset slice_off (aligned
 * to slice_size, already checked to lie inside the file). */
int qcow2_cache_read(struct qcow2_cache *c, uint64_t slice_off, uint32_t in_off,
		     void *dst, uint32_t n);
/* The same, from the cache only: -EAGAIN if the slice is not there. */
int qcow2_cache_peek(struct qcow2_cache *c, uint64_t slice_off, uint32_t in_off,
		     void *dst, uint32_t n);
/* Hooks for the write path: update bytes of a cached slice (loading it if
 * needed: not for a write of the whole slice) and mark it dirty; write
 * dirty slices back. */
int qcow2_cache_write(struct qcow2_cache *c, uint64_t slice_off, uint32_t in_off,
		      const void *src, uint32_t n);
int qcow2_cache_flush(struct qcow2_cache *c);
/* A check run before each slice is written back (the overlap check); a
 * negative return leaves the slice dirty and fails the flush. */
void qcow2_cache_set_check(struct qcow2_cache *c,
			   int (*check)(void *opaque, uint64_t off, uint32_t len),
			   void *opaque);
/* Statistics for tests: misses count the slices read from the disk. */
void qcow2_cache_stats(struct qcow2_cache *c, uint64_t *hits, uint64_t *misses,
		       unsigned *entries);

/* qcow2-compress.c: decompress src into exactly out_len bytes, or -EIO. */
int qcow2_decompress(unsigned type, void *out, size_t out_len,
		     const void *src, size_t src_len);
/*
 * A few recently decompressed clusters, keyed by their descriptor.  A
 * descriptor names immutable bytes while the image is read-only; a write
 * path that frees compressed clusters must call qcow2_zcache_clear().
 */
struct qcow2_zcache *qcow2_zcache_new(size_t cluster_size);
void qcow2_zcache_free(struct qcow2_zcache *z);
/* Copy len bytes at off of the cached cluster for key; false on a miss. */
bool qcow2_zcache_get(struct qcow2_zcache *z, uint64_t key, void *dst,
		      size_t off, size_t len);
void qcow2_zcache_put(struct qcow2_zcache *z, uint64_t key, const void *cluster);
void qcow2_zcache_clear(struct qcow2_zcache *z);

/* qcow2-snapshot.c */
int qcow2_snapshots_load(struct qcow2 *s, struct err *e);
void qcow2_snapshots_free(struct qcow2 *s);

#endif
