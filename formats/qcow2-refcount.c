/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * qcow2 refcounts (§ "Host cluster management"): entries of every width,
 * the refcount block cache, the free-cluster allocator, refcount block
 * allocation and refcount table growth.
 *
 * Invariant kept at every instant on disk: a cluster's refcount is at least
 * the number of references to it, so a crash can only leak.  Increments
 * happen in memory at once and reach the disk before the L2/L1 entries that
 * use them (qcow2_meta_flush orders it); decrements wait in a pending list
 * until the change that dropped the reference is durable.
 *
 * Refcount blocks are placed so that they cover themselves where they can:
 * a block for a range that has none goes into that range, whose clusters
 * are all free (refcount 0 means unused).  A grown refcount table goes with
 * the blocks that cover it past the last used cluster, as qemu's
 * qcow2_refcount_area does.
 */
#include "qcow2-write.h"

#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>

#define RB_CACHE_BYTES (16ull << 20)
#define QCOW2_MAX_HOST_CLUSTER_OFFSET ((1ull << 56) - 1)

uint64_t qcow2_rc_entry_get(const uint8_t *b, unsigned order, uint64_t idx)
{
	switch (order) {
	case 0: case 1: case 2: {
		/* narrower than a byte: packed LSB-first (§ "Refcount blocks") */
		uint64_t bit = idx << order;
		unsigned width = 1u << order;

		return (b[bit >> 3] >> (bit & 7)) & ((1u << width) - 1);
	}
	case 3:
		return b[idx];
	case 4:
		return be16(b + idx * 2);
	case 5:
		return be32(b + idx * 4);
	default:
		return be64(b + idx * 8);
	}
}

void qcow2_rc_entry_set(uint8_t *b, unsigned order, uint64_t idx, uint64_t v)
{
	switch (order) {
	case 0: case 1: case 2: {
		uint64_t bit = idx << order;
		unsigned width = 1u << order, sh = (unsigned)(bit & 7);
		unsigned mask = ((1u << width) - 1) << sh;

		b[bit >> 3] = (uint8_t)((b[bit >> 3] & ~mask) | ((unsigned)(v << sh) & mask));
		break;
	}
	case 3:
		b[idx] = (uint8_t)v;
		break;
	case 4:
		put_be16(b + idx * 2, (uint16_t)v);
		break;
	case 5:
		put_be32(b + idx * 4, (uint32_t)v);
		break;
	default:
		put_be64(b + idx * 8, v);
		break;
	}
}

static int load_rb(struct qcow2 *s, uint64_t idx, struct qcow2_rblock **out)
{
	struct qcow2_writer *w = s->w;
	struct qcow2_rblock *rb;
	uint64_t off;
	int r;

	*out = NULL;
	if (idx >= w->rt_entries)
		return 0;
	if (w->rbs[idx]) {
		*out = w->rbs[idx];
		return 0;
	}
	off = w->reftable[idx];
	if (!off)
		return 0;
	rb = xmalloc(sizeof(*rb) + s->cluster_size);
	rb->off = off;
	rb->dirty = false;
	r = bdev_pread(s->file, rb->data, s->cluster_size, off);
	if (r < 0) {
		free(rb);
		return r;
	}
	w->rbs[idx] = rb;
	w->rbs_loaded++;
	*out = rb;
	return 0;
}

int qcow2_rc_init(struct qcow2 *s, struct err *e)
{
	struct qcow2_writer *w = s->w;
	uint64_t fsize = qcow2_file_size(s->file), bytes;
	int r;

	w->rc_order = s->refcount_order;
	w->rc_max = w->rc_order == 6 ? UINT64_MAX : (1ull << (1u << w->rc_order)) - 1;
	w->rb_entries = (s->cluster_size * 8) >> w->rc_order;
	w->rt_offset = s->refcount_table_offset;
	w->rt_clusters = s->refcount_table_clusters;
	bytes = (uint64_t)w->rt_clusters << s->cluster_bits;
	w->rt_entries = bytes / 8;
	if (range_exceeds(w->rt_offset, bytes, fsize))
		return err_set(e, -EINVAL, "%s: refcount table at 0x%" PRIx64 " lies past the end of the file",
			       s->path, w->rt_offset);
	w->reftable = xmalloc(bytes);
	r = bdev_pread(s->file, w->reftable, bytes, w->rt_offset);
	if (r < 0)
		return err_set(e, r, "%s: cannot read the refcount table: %s", s->path, strerror(-r));
	for (uint64_t i = 0; i < w->rt_entries; i++) {
		uint64_t v = be64(&w->reftable[i]);

		/* bits 0-8 reserved; blocks cluster-aligned and inside the file */
		if (v & 0x1ff || (v && (!is_aligned(v, s->cluster_size) ||
					range_exceeds(v, s->cluster_size, fsize))))
			return err_set(e, -EINVAL, "%s: refcount table entry %" PRIu64 " is invalid (0x%" PRIx64 "); "
				       "repair the image with qemu-img check -r all", s->path, i, v);
		w->reftable[i] = v;
	}
	w->rbs = xcalloc(w->rt_entries, sizeof(*w->rbs));

	/* alloc_end: past the file and past the last cluster with a refcount,
	 * found in the last refcount block only (opening stays cheap) */
	w->alloc_end = align_up(fsize, s->cluster_size) >> s->cluster_bits;
	for (uint64_t i = w->rt_entries; i-- > 0;) {
		struct qcow2_rblock *rb;

		if (!w->reftable[i])
			continue;
		r = load_rb(s, i, &rb);
		if (r < 0)
			return err_set(e, r, "%s: cannot read a refcount block: %s", s->path, strerror(-r));
		for (uint64_t j = w->rb_entries; j-- > 0;)
			if (qcow2_rc_entry_get(rb->data, w->rc_order, j)) {
				w->alloc_end = MAX(w->alloc_end, i * w->rb_entries + j + 1);
				break;
			}
		break;
	}
	w->free_hint = 1;
	return 0;
}

void qcow2_rc_free(struct qcow2 *s)
{
	struct qcow2_writer *w = s->w;

	for (uint64_t i = 0; w->rbs && i < w->rt_entries; i++)
		free(w->rbs[i]);
	free(w->rbs);
	free(w->reftable);
	free(w->pfree);
	free(w->held);
}

int qcow2_rc_get(struct qcow2 *s, uint64_t cluster, uint64_t *rc)
{
	struct qcow2_writer *w = s->w;
	struct qcow2_rblock *rb;
	int r = load_rb(s, cluster / w->rb_entries, &rb);

	*rc = 0;
	if (r < 0)
		return r;
	if (rb)
		*rc = qcow2_rc_entry_get(rb->data, w->rc_order, cluster % w->rb_entries);
	return 0;
}

static bool covered(const struct qcow2_writer *w, uint64_t idx)
{
	return idx < w->rt_entries && w->reftable[idx];
}

static int grow_reftable(struct qcow2 *s, uint64_t need);
static int find_free(struct qcow2 *s, uint64_t n, uint64_t *out);

/*
 * A new refcount block for range idx; the clusters [avoid_lo, avoid_hi)
 * are being allocated and must not hold it.  Placed inside its own range
 * where it can (all free: no block means no refcounts), so that it counts
 * itself; else (a repair of a range in use) in a free cluster elsewhere,
 * counted by that cluster's block.
 */
static int new_refblock(struct qcow2 *s, uint64_t idx, uint64_t avoid_lo, uint64_t avoid_hi)
{
	struct qcow2_writer *w = s->w;
	uint64_t base, c, lo;
	struct qcow2_rblock *rb;
	int r;

	if (idx >= w->rt_entries) {
		r = grow_reftable(s, idx + 1);
		if (r < 0)
			return r;
		if (covered(w, idx))
			return 0; /* the growth area covered it */
	}
	base = idx * w->rb_entries;
	/* repairing: stored refcounts cannot be trusted below alloc_end */
	lo = w->repairing ? MAX(base, w->alloc_end) : base;
	if (lo == 0)
		lo = 1; /* never the header */
	for (c = lo; c < base + w->rb_entries; c++)
		if ((c < avoid_lo || c >= avoid_hi) && !qcow2_mset_get(&w->meta, c))
			break;
	if (c >= base + w->rb_entries) { /* no room in its own range */
		r = find_free(s, 1, &c);
		if (r < 0)
			return r;
	}
	if ((c << s->cluster_bits) > QCOW2_MAX_HOST_CLUSTER_OFFSET)
		return -EFBIG;
	rb = xcalloc(1, sizeof(*rb) + s->cluster_size);
	rb->off = c << s->cluster_bits;
	rb->dirty = true;
	w->rbs[idx] = rb;
	w->rbs_loaded++;
	w->reftable[idx] = rb->off;
	w->rt_dirty = true;
	w->alloc_end = MAX(w->alloc_end, c + 1);
	qcow2_mset_put(&w->meta, c, QM_REFBLOCK);
	/* in its own range this lands in the block just made; else c is
	 * free (see qcow2_alloc_clusters for why 1 and not +1) */
	return qcow2_rc_set(s, c, 1);
}

/*
 * Grow the refcount table to at least need entries (+50 %): the new table
 * and the blocks for the ranges it and they occupy go past alloc_end.
 */
static int grow_reftable(struct qcow2 *s, uint64_t need)
{
	struct qcow2_writer *w = s->w;
	uint64_t per = s->cluster_size / 8, N = w->rb_entries;
	uint64_t A = w->alloc_end, E, T, R, first, last, k, old_entries = w->rt_entries;
	uint64_t *table;
	struct qcow2_rblock **rbs;
	int r;

	E = align_up(MAX(need, old_entries + old_entries / 2 + 1), per);
	for (;;) {
		T = E / per;
		R = 0;
		for (;;) { /* blocks for [A, A+R+T): R grows until it settles */
			uint64_t cnt = 0;

			first = A / N;
			last = (A + R + T - 1) / N;
			for (uint64_t i = first; i <= last; i++)
				cnt += !covered(w, i);
			if (cnt == R)
				break;
			R = cnt;
		}
		if (last < E)
			break;
		E = align_up(last + 1 + (last + 1) / 2, per);
	}
	if (E * 8 > QCOW2_MAX_REFTABLE_BYTES)
		return -EFBIG;
	if (((A + R + T) << s->cluster_bits) > QCOW2_MAX_HOST_CLUSTER_OFFSET)
		return -EFBIG;

	table = xcalloc(E, 8);
	memcpy(table, w->reftable, old_entries * 8);
	rbs = xcalloc(E, sizeof(*rbs));
	memcpy(rbs, w->rbs, old_entries * sizeof(*rbs));
	k = A;
	for (uint64_t i = first; i <= last; i++) {
		struct qcow2_rblock *rb;

		if (i < old_entries && w->reftable[i])
			continue;
		rb = xcalloc(1, sizeof(*rb) + s->cluster_size);
		rb->off = k << s->cluster_bits;
		rb->dirty = true;
		rbs[i] = rb;
		table[i] = rb->off;
		w->rbs_loaded++;
		qcow2_mset_put(&w->meta, k, QM_REFBLOCK);
		k++;
	}
	free(w->reftable);
	free(w->rbs);
	w->reftable = table;
	w->rbs = rbs;
	w->rt_entries = E;

	/* the old table is freed once the header names the new one */
	for (uint64_t c = 0; c < w->rt_clusters; c++)
		qcow2_mset_clear(&w->meta, (w->rt_offset >> s->cluster_bits) + c, QM_REFTABLE);
	qcow2_free_later(s, w->rt_offset, w->rt_clusters);
	w->rt_offset = (A + R) << s->cluster_bits;
	w->rt_clusters = (uint32_t)T;
	w->rt_dirty = w->rt_moved = true;
	w->alloc_end = A + R + T;
	for (uint64_t c = A + R; c < A + R + T; c++)
		qcow2_mset_put(&w->meta, c, QM_REFTABLE);

	/* every cluster of the area counts 1 (set, not added: the area lies
	 * past alloc_end); its ranges all have blocks now */
	for (uint64_t c = A; c < A + R + T; c++) {
		r = qcow2_rc_set(s, c, 1);
		if (r < 0)
			return r;
	}
	return 0;
}

int qcow2_rc_add(struct qcow2 *s, uint64_t cluster, int delta)
{
	uint64_t v;
	int r;

	r = qcow2_rc_get(s, cluster, &v);
	if (r < 0)
		return r;
	if (delta > 0 && v == s->w->rc_max)
		return -ERANGE; /* refcount overflow: the caller fails the write */
	if (delta < 0 && v == 0)
		return qcow2_signal_corruption(s, "freeing cluster 0x%" PRIx64 " whose refcount is already 0",
					       cluster << s->cluster_bits);
	return qcow2_rc_set(s, cluster, delta > 0 ? v + 1 : v - 1);
}

int qcow2_rc_set(struct qcow2 *s, uint64_t cluster, uint64_t v)
{
	struct qcow2_writer *w = s->w;
	uint64_t idx = cluster / w->rb_entries;
	struct qcow2_rblock *rb;
	int r;

	if (v > w->rc_max)
		return -ERANGE;
	if (!covered(w, idx)) {
		if (!v)
			return 0;
		r = new_refblock(s, idx, cluster, cluster + 1);
		if (r < 0)
			return r;
	}
	r = load_rb(s, idx, &rb);
	if (r < 0)
		return r;
	if (qcow2_rc_entry_get(rb->data, w->rc_order, cluster % w->rb_entries) != v) {
		qcow2_rc_entry_set(rb->data, w->rc_order, cluster % w->rb_entries, v);
		rb->dirty = true;
	}
	if (v == 0 && cluster < w->free_hint)
		w->free_hint = cluster;
	return 0;
}

/* The first run of n free clusters from the hint (never cluster 0, never a
 * cluster the metadata set knows: a refcount of 0 there is damage).
 * *first_free: the first free cluster seen, where the next search starts. */
static int find_free_from(struct qcow2 *s, uint64_t n, uint64_t *out, uint64_t *first_free)
{
	struct qcow2_writer *w = s->w;
	uint64_t c = MAX(w->free_hint, 1), run = 0;
	int r;

	if (w->repairing)
		c = MAX(c, w->alloc_end);
	for (;;) {
		uint64_t rc = 0;

		if (run == n) {
			*out = c - n;
			if (*first_free == UINT64_MAX)
				*first_free = *out;
			return 0;
		}
		if (((c + n) << s->cluster_bits) > QCOW2_MAX_HOST_CLUSTER_OFFSET)
			return -ENOSPC;
		if (c >= w->alloc_end) { /* everything from here on is free */
			*out = c - run;
			if (*first_free == UINT64_MAX)
				*first_free = *out;
			return 0;
		}
		if (covered(w, c / w->rb_entries)) {
			r = qcow2_rc_get(s, c, &rc);
			if (r < 0)
				return r;
		}
		if (rc == 0 && !qcow2_mset_get(&w->meta, c)) {
			if (*first_free == UINT64_MAX)
				*first_free = c;
			run++;
		} else {
			run = 0;
		}
		c++;
	}
}

static int find_free(struct qcow2 *s, uint64_t n, uint64_t *out)
{
	uint64_t first_free = UINT64_MAX;

	return find_free_from(s, n, out, &first_free);
}

int qcow2_alloc_clusters(struct qcow2 *s, uint64_t n, uint64_t *off)
{
	struct qcow2_writer *w = s->w;
	uint64_t c, first_free = UINT64_MAX;
	int r;

	if (n == 0 || n > w->rb_entries / 2)
		return -EINVAL;
	r = find_free_from(s, n, &c, &first_free);
	if (r < 0)
		return r;
	/* claim the run before blocks or a grown table are placed */
	w->alloc_end = MAX(w->alloc_end, c + n);
	for (uint64_t i = c; i < c + n; i++)
		if (!covered(w, i / w->rb_entries)) {
			r = new_refblock(s, i / w->rb_entries, c, c + n);
			if (r < 0)
				return r;
		}
	/*
	 * Set to 1, not incremented: below alloc_end a free cluster's count
	 * is 0 and the two agree, but past it nothing was read and a stale
	 * count may remain (a refcount block that counts clusters past the
	 * end of the file, missed when the last block is all zeroes).  +1
	 * leaked such a cluster for good, and on a count at its maximum
	 * (1 with refcount_bits=1) failed the write with ERANGE.
	 */
	for (uint64_t i = c; i < c + n; i++) {
		r = qcow2_rc_set(s, i, 1);
		if (r < 0)
			return r;
	}
	/* nothing below first_free is free; below c + 1 either, for n == 1 */
	w->free_hint = n == 1 ? c + 1 : MAX(first_free, w->free_hint);
	*off = c << s->cluster_bits;
	return 0;
}

void qcow2_free_later(struct qcow2 *s, uint64_t off, uint64_t n)
{
	struct qcow2_writer *w = s->w;

	for (uint64_t i = 0; i < n; i++) {
		if (w->npfree == w->pfree_cap) {
			w->pfree_cap = w->pfree_cap ? w->pfree_cap * 2 : 64;
			w->pfree = realloc(w->pfree, w->pfree_cap * sizeof(*w->pfree));
			if (!w->pfree)
				abort();
		}
		w->pfree[w->npfree++] = (off >> s->cluster_bits) + i;
	}
	w->updates++;
}

void qcow2_free_compressed_later(struct qcow2 *s, uint64_t entry)
{
	uint64_t coff, csize, first, last;

	qcow2_compressed_decode(s->cluster_bits, entry, &coff, &csize);
	/* every host cluster the compressed bytes touch holds one reference */
	first = coff >> s->cluster_bits;
	last = (coff + csize - 1) >> s->cluster_bits;
	qcow2_free_later(s, first << s->cluster_bits, last - first + 1);
	s->w->zcache_stale = true;
}

int qcow2_rc_write(struct qcow2 *s)
{
	struct qcow2_writer *w = s->w;
	uint8_t *buf;
	uint64_t bytes;
	int r;

	for (uint64_t i = 0; i < w->rt_entries; i++) {
		struct qcow2_rblock *rb = w->rbs[i];

		if (!rb || !rb->dirty)
			continue;
		r = qcow2_overlap_check(s, rb->off, s->cluster_size, QM_REFBLOCK);
		if (r < 0)
			return r;
		r = bdev_pwrite(s->file, rb->data, s->cluster_size, rb->off, 0);
		if (r < 0)
			return r;
		rb->dirty = false;
	}
	if (!w->rt_dirty)
		return 0;
	/* the blocks are durable before the table names them */
	r = bdev_flush(s->file);
	if (r < 0)
		return r;
	bytes = (uint64_t)w->rt_clusters << s->cluster_bits;
	r = qcow2_overlap_check(s, w->rt_offset, bytes, QM_REFTABLE);
	if (r < 0)
		return r;
	buf = xcalloc(1, bytes);
	for (uint64_t i = 0; i < w->rt_entries; i++)
		put_be64(buf + i * 8, w->reftable[i]);
	r = bdev_pwrite(s->file, buf, bytes, w->rt_offset, BDEV_FUA);
	free(buf);
	if (r < 0)
		return r;
	if (w->rt_moved) {
		uint8_t h[12];

		put_be64(h, w->rt_offset);
		put_be32(h + 8, w->rt_clusters);
		r = qcow2_header_write(s, 48, h, sizeof(h));
		if (r < 0)
			return r;
		s->refcount_table_offset = w->rt_offset;
		s->refcount_table_clusters = w->rt_clusters;
		w->rt_moved = false;
	}
	w->rt_dirty = false;
	return 0;
}

unsigned qcow2_reader_enter(struct qcow2_writer *w)
{
	for (;;) {
		unsigned e = atomic_load(&w->readers.epoch);

		atomic_fetch_add(&w->readers.count[e & 1], 1);
		/* counted before the flip, or seen by it: else count again */
		if (atomic_load(&w->readers.epoch) == e)
			return e & 1;
		atomic_fetch_sub(&w->readers.count[e & 1], 1);
	}
}

void qcow2_reader_exit(struct qcow2_writer *w, unsigned tag)
{
	atomic_fetch_sub(&w->readers.count[tag], 1);
}

/* -1 on each held cluster; punch those that are free now. */
static int apply_held(struct qcow2 *s)
{
	struct qcow2_writer *w = s->w;
	int r = 0;

	for (size_t i = 0; i < w->nheld && r == 0; i++) {
		uint64_t c = w->held[i], rc;

		r = qcow2_rc_add(s, c, -1);
		if (r == 0)
			r = qcow2_rc_get(s, c, &rc);
		/* release the file space (advisory) */
		if (r == 0 && rc == 0 && !s->data_file)
			bdev_discard(s->file, c << s->cluster_bits, s->cluster_size);
	}
	w->nheld = 0;
	return r;
}

/*
 * Frees go through two stages.  Durable ones (pfree, at step 7) become
 * held, and the reader epoch flips: a read that began before the flip, and
 * so may have found one of those clusters in an old L2 entry, is counted in
 * the old epoch's slot; one that began after sees the new entries.  Held
 * frees are applied once that slot is empty.  Waiting for it here instead
 * would stall every writer behind a slow reader (an NBD client that stops
 * reading holds its sendfile's mapping), so a busy slot just defers them.
 */
int qcow2_rc_apply_frees(struct qcow2 *s, bool *applied)
{
	struct qcow2_writer *w = s->w;
	int r = 0;

	for (;;) {
		if (w->nheld) {
			if (atomic_load(&w->readers.count[w->held_epoch & 1]))
				break;
			r = apply_held(s);
			*applied = true;
			if (r < 0)
				break;
		}
		if (!w->npfree)
			break;
		/* pfree becomes held (the empty held array becomes pfree) */
		{
			uint64_t *t = w->held;
			size_t tcap = w->held_cap;

			w->held = w->pfree;
			w->held_cap = w->pfree_cap;
			w->nheld = w->npfree;
			w->pfree = t;
			w->pfree_cap = tcap;
			w->npfree = 0;
		}
		w->held_epoch = atomic_fetch_add(&w->readers.epoch, 1);
	}
	if (*applied && w->zcache_stale && !w->nheld) {
		qcow2_zcache_clear(s->zcache);
		w->zcache_stale = false;
	}
	return r;
}

void qcow2_rc_trim(struct qcow2 *s)
{
	struct qcow2_writer *w = s->w;

	if (w->rbs_loaded * s->cluster_size <= RB_CACHE_BYTES)
		return;
	for (uint64_t i = 0; i < w->rt_entries; i++)
		if (w->rbs[i] && !w->rbs[i]->dirty) {
			free(w->rbs[i]);
			w->rbs[i] = NULL;
			w->rbs_loaded--;
		}
}
