/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The qcow2 write path: guest writes with copy-on-write, L2 table
 * allocation and copying, zero writes and discard, flush, and the header
 * bits a writer owns (dirty, autoclear).  The ordering rules are in
 * qcow2-write.h; the refcounts in qcow2-refcount.c.
 *
 * A cluster is written in place only when its refcount is 1 (checked, not
 * taken from the COPIED flag: a crafted image could use COPIED to make a
 * write land in data a snapshot shares).  Anything else — unallocated,
 * zero, compressed, shared — gets a new cluster, filled from the normal
 * read path at the guest offset (old data, backing file, zeroes or the
 * decompressed cluster) and merged with the new bytes; with extended L2
 * only the touched subclusters are filled and marked allocated.
 *
 * A request's clusters are planned together, and their data goes out as
 * one pwrite per run of host-contiguous clusters (as the read path reads
 * runs): 1 pwrite, not 16, for 1 MiB of new 64 KiB clusters.
 */
#include "qcow2-write.h"

#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>

/* metadata changes (dirty L2 slices, frees) before a flush of our own */
#define AUTO_FLUSH_UPDATES 4096
/* clusters planned (allocated) at once by a write, and the bytes: bounds
 * the plan and the copy-on-write buffer of one pwrite */
#define BATCH_CLUSTERS 2048
#define BATCH_BYTES (8ull << 20)

/* ---- header ---------------------------------------------------------------- */

int qcow2_header_write(struct qcow2 *s, uint64_t off, const void *buf, size_t len)
{
	/* header fields are updated in place and synced (notes §2, item 8) */
	return bdev_pwrite(s->file, buf, len, off, BDEV_FUA);
}

/*
 * Before the first change: v3 images get the dirty bit (so a crash is
 * noticed and repaired on the next writable open), and every autoclear bit
 * is cleared — unknown ones by the spec's rule, bitmaps because we do not
 * update them, data-file-raw because zero flags do not zero the data file.
 */
static int ensure_header(struct qcow2 *s)
{
	struct qcow2_writer *w = s->w;
	uint8_t buf[24];
	int r;

	if (w->header_done)
		return 0;
	if (atomic_load(&w->corrupt))
		return -EIO;
	if (s->version >= 3) {
		uint64_t incompat = s->incompat | QCOW2_INCOMPAT_DIRTY;

		put_be64(buf, incompat);
		put_be64(buf + 8, s->compat);
		put_be64(buf + 16, 0);
		r = qcow2_header_write(s, 72, buf, sizeof(buf));
		if (r < 0)
			return r;
		s->incompat = incompat;
		s->autoclear = 0;
		w->set_dirty = true;
	}
	w->header_done = true;
	return 0;
}

/* ---- in-flight guest ranges ---------------------------------------------- */

static void range_lock(struct qcow2_writer *w, struct qcow2_inflight *me,
		       uint64_t first, uint64_t last)
{
	me->first = first;
	me->last = last;
	pthread_mutex_lock(&w->lock);
	for (;;) {
		struct qcow2_inflight *o;

		for (o = w->inflight; o; o = o->next)
			if (o->first <= last && first <= o->last)
				break;
		if (!o)
			break;
		pthread_cond_wait(&w->cond, &w->lock);
	}
	me->next = w->inflight;
	w->inflight = me;
	pthread_mutex_unlock(&w->lock);
}

static void range_unlock(struct qcow2_writer *w, struct qcow2_inflight *me)
{
	struct qcow2_inflight **pp;

	pthread_mutex_lock(&w->lock);
	for (pp = &w->inflight; *pp != me; pp = &(*pp)->next)
		;
	*pp = me->next;
	pthread_cond_broadcast(&w->cond);
	pthread_mutex_unlock(&w->lock);
}

/* ---- L1 / L2 -------------------------------------------------------------- */

static void l1_set(struct qcow2 *s, uint64_t i, uint64_t v)
{
	struct qcow2_writer *w = s->w;

	/* readers load L1 entries without a lock: one aligned store */
	__atomic_store_n(&s->l1.table[i], v, __ATOMIC_RELEASE);
	w->l1_dirty[(i * 8) >> s->cluster_bits] = 1;
	w->any_l1_dirty = true;
	w->updates++;
}

/*
 * A new L2 table for L1 index i: empty, or a copy of the shared table at
 * old (which a snapshot keeps; its refcount drops once L1 is durable).  The
 * data refcounts do not change: each L1 path already counts them.
 */
static int new_l2(struct qcow2 *s, uint64_t i, uint64_t old, uint64_t *out)
{
	struct qcow2_writer *w = s->w;
	uint32_t ss = s->slice_size;
	uint8_t *buf = xcalloc(1, s->cluster_size);
	uint64_t n;
	int r;

	r = qcow2_alloc_clusters(s, 1, &n);
	if (r < 0)
		goto out;
	/* the cluster exists in the file at once (reads check the file size);
	 * zeroes in an unreferenced cluster need no ordering */
	r = qcow2_overlap_check(s, n, s->cluster_size, 0);
	if (r == 0)
		r = bdev_pwrite(s->file, buf, s->cluster_size, n, 0);
	for (uint64_t k = 0; r == 0 && k < s->cluster_size / ss; k++) {
		if (old)
			r = qcow2_cache_read(s->l2_cache, old + k * ss, 0, buf, ss);
		if (r == 0)
			r = qcow2_cache_write(s->l2_cache, n + k * ss, 0, buf, ss);
		w->updates++;
	}
	if (r < 0) {
		qcow2_free_later(s, n, 1);
		goto out;
	}
	qcow2_mset_put(&w->meta, n >> s->cluster_bits, QM_L2);
	if (old) {
		qcow2_mset_clear(&w->meta, old >> s->cluster_bits, QM_L2);
		qcow2_free_later(s, old, 1);
	}
	l1_set(s, i, n | QCOW2_OFLAG_COPIED);
	*out = n;
out:
	free(buf);
	return r;
}

struct l2ref {
	uint64_t slice_off;
	uint32_t in_off;
	bool has_table;
};

/*
 * Where the L2 entry of guest cluster cl lives.  for_write: the table is
 * made to exist and to be ours alone (refcount 1) first.  Lock held.
 */
static int l2_locate(struct qcow2 *s, uint64_t cl, bool for_write, struct l2ref *ref)
{
	uint64_t i = cl >> s->l2_bits, j = cl & ((1ull << s->l2_bits) - 1);
	uint32_t per = s->slice_size / s->l2_entry_size;
	uint64_t e, l2, rc;
	int r;

	memset(ref, 0, sizeof(*ref));
	/* the active L1 covers the disk (checked at open, grown by resize):
	 * an index past it would make l1_set write past the array */
	if (i >= s->l1.size)
		return -EIO;
	r = qcow2_l1_lookup(s, &s->l1, i, &l2);
	if (r < 0)
		return r;
	e = s->l1.table[i];
	if (!l2) {
		if (!for_write)
			return 0;
		r = new_l2(s, i, 0, &l2);
		if (r < 0)
			return r;
	} else if (for_write) {
		r = qcow2_rc_get(s, l2 >> s->cluster_bits, &rc);
		if (r < 0)
			return r;
		if (rc == 0)
			return qcow2_signal_corruption(s, "L2 table at 0x%" PRIx64 " has refcount 0", l2);
		if (rc != 1) {
			r = new_l2(s, i, l2, &l2);
			if (r < 0)
				return r;
		} else if (!(e & QCOW2_OFLAG_COPIED)) {
			l1_set(s, i, e | QCOW2_OFLAG_COPIED);
		}
	}
	ref->has_table = true;
	ref->slice_off = l2 + (j / per) * s->slice_size;
	ref->in_off = (uint32_t)((j % per) * s->l2_entry_size);
	return 0;
}

static int l2_get(struct qcow2 *s, const struct l2ref *ref, uint64_t *ent, uint64_t *bm)
{
	uint8_t b[16];
	int r;

	*bm = 0;
	r = qcow2_cache_read(s->l2_cache, ref->slice_off, ref->in_off, b, s->l2_entry_size);
	if (r < 0)
		return r;
	*ent = be64(b);
	if (s->extended_l2)
		*bm = be64(b + 8);
	return 0;
}

static int l2_set(struct qcow2 *s, const struct l2ref *ref, uint64_t ent, uint64_t bm)
{
	uint8_t b[16];

	put_be64(b, ent);
	put_be64(b + 8, bm);
	s->w->updates++;
	/* one copy under the cache lock: readers see old or new, whole */
	return qcow2_cache_write(s->l2_cache, ref->slice_off, ref->in_off, b, s->l2_entry_size);
}

/* ---- data ------------------------------------------------------------------ */

static uint32_t sc_mask(unsigned first, unsigned last)
{
	return (uint32_t)((last == 31 ? 0xffffffffu : (1u << (last + 1)) - 1) & ~((1u << first) - 1));
}

/* What the old entry of a cluster is, for a writer.  Lock held. */
struct old {
	uint64_t ent, bm;
	uint64_t host;      /* host cluster (data file: the guest offset) */
	bool compressed, has_host, inplace;
};

static int classify(struct qcow2 *s, uint64_t cl, uint64_t ent, uint64_t bm, struct old *o)
{
	uint64_t guest = cl << s->cluster_bits, h, rc;
	const char *why;
	int r;

	memset(o, 0, sizeof(*o));
	o->ent = ent;
	o->bm = bm;
	if (qcow2_l2_decode(s, ent, bm, 0, &h, &why) == QC_INVALID)
		return qcow2_damage(s, guest, "guest offset 0x%" PRIx64 ": L2 entry 0x%016" PRIx64 ": %s",
				    guest, ent, why);
	if (ent & QCOW2_OFLAG_COMPRESSED) {
		o->compressed = true;
		return 0;
	}
	o->host = ent & QCOW2_OFFSET_MASK;
	o->has_host = o->host || (s->data_file && (ent & QCOW2_OFLAG_COPIED));
	if (s->data_file) {
		if (o->has_host && o->host != guest)
			return qcow2_damage(s, guest, "guest offset 0x%" PRIx64 ": data file offset 0x%" PRIx64 " differs",
					    guest, o->host);
		/* host == guest always: writing there is always in place */
		o->host = guest;
		o->inplace = true;
		return 0;
	}
	if (!o->has_host)
		return 0;
	r = qcow2_rc_get(s, o->host >> s->cluster_bits, &rc);
	if (r < 0)
		return r;
	if (rc == 0)
		return qcow2_signal_corruption(s, "guest offset 0x%" PRIx64 " maps to host cluster 0x%" PRIx64
					       " whose refcount is 0", guest, o->host);
	o->inplace = rc == 1;
	return 0;
}

/* Drop the old cluster's references after its L2 entry changed.  Lock held. */
static void release_old(struct qcow2 *s, const struct old *o)
{
	if (o->compressed)
		qcow2_free_compressed_later(s, o->ent);
	else if (o->has_host && !s->data_file)
		qcow2_free_later(s, o->host, 1);
}

/*
 * One guest cluster's part of a write, planned with the lock held: which
 * host cluster gets which bytes, and what its L2 entry becomes.
 */
struct piece {
	uint64_t cl;
	uint32_t a, b;      /* the bytes of the cluster the request writes */
	uint32_t lo, hi;    /* the bytes the host cluster gets: [a, b) and the
			     * copy-on-write around it */
	uint64_t host;      /* that host cluster (data file: the guest offset) */
	uint64_t new_bm;    /* extended L2: the new subcluster bitmap */
	bool plain;         /* in place into allocated (sub)clusters: the entry
			     * stays (gains COPIED if it lacks it) */
	struct old o;
};

/* p is not linked (a write failed): its new cluster goes.  Lock held. */
static void unplan_piece(struct qcow2 *s, const struct piece *p)
{
	if (!p->plain && !p->o.inplace)
		qcow2_free_later(s, p->host, 1);
}

/* Plan the write of [a, b) of guest cluster cl into *p.  Lock held. */
static int plan_piece(struct qcow2 *s, uint64_t cl, uint32_t a, uint32_t b, struct piece *p)
{
	uint64_t scs = 1ull << s->subcluster_bits;
	struct l2ref ref;
	uint64_t ent, bm;
	int r;

	memset(p, 0, sizeof(*p));
	p->cl = cl;
	p->a = a;
	p->b = b;
	r = l2_locate(s, cl, true, &ref);
	if (r == 0)
		r = l2_get(s, &ref, &ent, &bm);
	if (r == 0)
		r = classify(s, cl, ent, bm, &p->o);
	if (r < 0)
		return r;

	if (!s->extended_l2) {
		p->plain = p->o.inplace && p->o.has_host && !(ent & QCOW2_OFLAG_ZERO);
		p->lo = 0;
		p->hi = (uint32_t)s->cluster_size;
	} else {
		unsigned sa = a >> s->subcluster_bits, sb = (b - 1) >> s->subcluster_bits;
		uint32_t alloc = (uint32_t)bm, zero = (uint32_t)(bm >> 32);
		uint32_t touched = sc_mask(sa, sb), span;

		p->plain = p->o.inplace && p->o.has_host && (touched & ~alloc) == 0;
		if (p->o.compressed) {
			span = 0xffffffffu;
			p->new_bm = 0xffffffffu;
		} else {
			/* a shared cluster keeps its allocated subclusters (alloc
			 * is 0 without a host cluster: qcow2_l2_decode checked) */
			span = touched | (p->o.has_host && !p->o.inplace ? alloc : 0);
			p->new_bm = (alloc | touched) | (uint64_t)(zero & ~touched) << 32;
		}
		p->lo = (uint32_t)(__builtin_ctz(span) * scs);
		p->hi = (uint32_t)((32 - __builtin_clz(span)) * scs);
	}
	if (p->plain) {
		/* in place, refcount 1: only the bytes change */
		p->lo = a;
		p->hi = b;
	}

	if (p->o.inplace) {
		p->host = p->o.host; /* data file: classify made it the guest offset */
	} else {
		r = qcow2_alloc_clusters(s, 1, &p->host);
		if (r < 0)
			return r;
	}
	/* checked here, under the lock the metadata set needs; the cluster is
	 * ours until its entry is linked, so no metadata moves into it */
	if (!s->data_file) {
		r = qcow2_overlap_check(s, p->host + p->lo, p->hi - p->lo, 0);
		if (r < 0)
			unplan_piece(s, p);
	}
	return r;
}

/* The data of p is written: point its L2 entry at it.  Lock held. */
static int link_piece(struct qcow2 *s, const struct piece *p)
{
	struct l2ref ref;
	int r;

	if (p->plain && (p->o.ent & QCOW2_OFLAG_COPIED))
		return 0;
	r = l2_locate(s, p->cl, true, &ref);
	if (r < 0)
		return r;
	if (p->plain)
		return l2_set(s, &ref, p->o.ent | QCOW2_OFLAG_COPIED, p->o.bm);
	r = l2_set(s, &ref, p->host | QCOW2_OFLAG_COPIED, p->new_bm);
	if (r == 0 && !p->o.inplace)
		release_old(s, &p->o);
	return r;
}

/* q's bytes follow p's on the host: one pwrite writes both. */
static bool host_contiguous(const struct qcow2 *s, const struct piece *p, const struct piece *q)
{
	return p->hi == s->cluster_size && q->lo == 0 && q->host == p->host + s->cluster_size;
}

/*
 * A large request whose run starts or ends in a new cluster, so that bytes
 * around it must be copied in (the kernel cuts a 1 MiB write from a buffer
 * that is not page-aligned into 1 MiB - 16 bytes and 16 bytes: each first
 * part ends 16 bytes short of a cluster): the copy-on-write bytes [g0, from)
 * and [to, g1) are written on their own and the request's bytes straight
 * from src at host (where g0 goes), instead of copying a whole run into a
 * buffer for a few bytes around it, as qemu writes its COW regions beside
 * the guest's data.
 */
#define SPLIT_RUN_MIN (128u << 10)

static int write_around(struct qcow2 *s, const uint8_t *src, uint64_t host,
			uint64_t g0, uint64_t from, uint64_t to, uint64_t g1)
{
	uint8_t *cow = xmalloc(MAX(from - g0, g1 - to));
	int r = 0;

	if (from > g0) {
		r = qcow2_read(s, &s->l1, cow, from - g0, g0);
		if (r == 0)
			r = bdev_pwrite(s->data, cow, from - g0, host, 0);
	}
	if (r == 0)
		r = bdev_pwrite(s->data, src, to - from, host + (from - g0), 0);
	if (r == 0 && g1 > to) {
		r = qcow2_read(s, &s->l1, cow, g1 - to, to);
		if (r == 0)
			r = bdev_pwrite(s->data, cow, g1 - to, host + (to - g0), 0);
	}
	free(cow);
	return r;
}

/*
 * Write the pieces p[0..n), host-contiguous, with one pwrite.  The request
 * is [off, end) with its bytes at src (NULL: zeroes).  Straight from src
 * when the run is all request bytes; else through a buffer that gets the
 * copy-on-write bytes from the read path at the guest offset (old data,
 * backing file, zeroes or the decompressed cluster), or, for a large
 * request, by write_around.  No lock held.
 */
static int write_run(struct qcow2 *s, const struct piece *p, size_t n,
		     const uint8_t *src, uint64_t off, uint64_t end)
{
	uint64_t g0 = (p[0].cl << s->cluster_bits) + p[0].lo;
	uint64_t g1 = (p[n - 1].cl << s->cluster_bits) + p[n - 1].hi;
	uint64_t host = p[0].host + p[0].lo, from, to;
	uint8_t *buf;
	int r = 0;

	if (src && g0 >= off && g1 <= end)
		return bdev_pwrite(s->data, src + (g0 - off), g1 - g0, host, 0);
	from = MAX(g0, off);
	to = MIN(g1, end);
	if (src && to - from >= SPLIT_RUN_MIN)
		return write_around(s, src + (from - off), host, g0, from, to, g1);
	buf = xmalloc(g1 - g0);
	/* only the request's first and last cluster can need it */
	for (size_t k = 0; k < n && r == 0; k++) {
		uint64_t guest = p[k].cl << s->cluster_bits;

		if (p[k].lo < p[k].a)
			r = qcow2_read(s, &s->l1, buf + (guest + p[k].lo - g0), p[k].a - p[k].lo,
				       guest + p[k].lo);
		if (r == 0 && p[k].b < p[k].hi)
			r = qcow2_read(s, &s->l1, buf + (guest + p[k].b - g0), p[k].hi - p[k].b,
				       guest + p[k].b);
	}
	if (src)
		memcpy(buf + (from - g0), src + (from - off), to - from);
	else
		memset(buf + (from - g0), 0, to - from);
	if (r == 0)
		r = bdev_pwrite(s->data, buf, g1 - g0, host, 0);
	free(buf);
	return r;
}

/*
 * Write [off, off+len) (src NULL: zeroes); the caller holds its in-flight
 * range.  In batches: plan every cluster under the lock (allocating new
 * clusters), write the data with the lock dropped, one pwrite per run of
 * host-contiguous clusters, then link the L2 entries under the lock.  An
 * entry changes only after the data it points at is written (the order
 * qcow2_meta_flush relies on, qcow2-write.h).
 */
static int write_range(struct qcow2 *s, const uint8_t *src, uint64_t off, uint64_t len)
{
	struct qcow2_writer *w = s->w;
	uint64_t end = off + len, pos = off, nclusters;
	struct piece *pieces;
	size_t max;
	int r = 0;

	if (!len)
		return 0;
	nclusters = ((end - 1) >> s->cluster_bits) - (off >> s->cluster_bits) + 1;
	max = (size_t)MIN(nclusters, MIN(BATCH_CLUSTERS, BATCH_BYTES >> s->cluster_bits));
	pieces = xmalloc(max * sizeof(*pieces));
	while (pos < end && r == 0) {
		size_t n = 0, i, j;

		pthread_mutex_lock(&w->lock);
		r = ensure_header(s);
		for (; r == 0 && pos < end && n < max; n++) {
			uint64_t cl = pos >> s->cluster_bits;
			uint32_t a = (uint32_t)(pos & (s->cluster_size - 1));
			uint32_t b = (uint32_t)MIN(s->cluster_size, end - (cl << s->cluster_bits));

			r = plan_piece(s, cl, a, b, &pieces[n]);
			if (r < 0)
				break;
			pos += b - a;
		}
		pthread_mutex_unlock(&w->lock);

		for (i = 0; i < n && r == 0; i = j) {
			for (j = i + 1; j < n && host_contiguous(s, &pieces[j - 1], &pieces[j]); j++)
				;
			r = write_run(s, pieces + i, j - i, src, off, end);
		}

		pthread_mutex_lock(&w->lock);
		for (i = 0; i < n; i++) {
			if (r == 0)
				r = link_piece(s, &pieces[i]);
			if (r < 0)
				unplan_piece(s, &pieces[i]);
		}
		pthread_mutex_unlock(&w->lock);
	}
	free(pieces);
	return r;
}

/*
 * Make [a, b) of guest cluster cl read as zeroes by its L2 entry alone;
 * a and b are subcluster-aligned (cluster-aligned without extended L2).
 * -ENOTSUP when that cannot be done (part of a compressed cluster).
 */
static int zero_piece(struct qcow2 *s, uint64_t cl, uint32_t a, uint32_t b, bool unmap)
{
	struct qcow2_writer *w = s->w;
	uint64_t guest = cl << s->cluster_bits, ent, bm, new_ent, new_bm;
	bool unalloc_is_zero = !s->backing || guest >= s->backing->size;
	struct l2ref ref;
	struct old o;
	int r;

	pthread_mutex_lock(&w->lock);
	r = ensure_header(s);
	if (r == 0)
		r = l2_locate(s, cl, false, &ref);
	if (r < 0 || (!ref.has_table && unalloc_is_zero))
		goto unlock;
	r = l2_locate(s, cl, true, &ref);
	if (r == 0)
		r = l2_get(s, &ref, &ent, &bm);
	if (r == 0)
		r = classify(s, cl, ent, bm, &o);
	if (r < 0)
		goto unlock;

	if (!s->extended_l2) {
		if (s->version < 3) {
			/* no zero flag: unallocated reads zeroes (no backing here) */
			new_ent = 0;
		} else if (o.compressed || !o.has_host) {
			new_ent = QCOW2_OFLAG_ZERO;
		} else if (s->data_file || (o.inplace && !unmap)) {
			new_ent = ent | QCOW2_OFLAG_ZERO; /* keeps its cluster */
		} else {
			new_ent = QCOW2_OFLAG_ZERO;
		}
		if (new_ent == ent)
			goto unlock;
		r = l2_set(s, &ref, new_ent, 0);
		if (r == 0 && !(new_ent & QCOW2_OFFSET_MASK))
			release_old(s, &o);
		goto unlock;
	}

	{
		uint32_t z = sc_mask(a >> s->subcluster_bits, (b - 1) >> s->subcluster_bits);
		uint32_t alloc = (uint32_t)bm, zero = (uint32_t)(bm >> 32);

		if (o.compressed) {
			if (z != 0xffffffffu) {
				r = -ENOTSUP;
				goto unlock;
			}
			r = l2_set(s, &ref, 0, (uint64_t)0xffffffffu << 32);
			if (r == 0)
				release_old(s, &o);
			goto unlock;
		}
		alloc &= ~z;
		zero |= z;
		new_bm = alloc | (uint64_t)zero << 32;
		new_ent = ent;
		if (o.has_host && !s->data_file && !alloc && (unmap || !o.inplace))
			new_ent = 0; /* nothing left in the host cluster */
		if (new_ent == ent && new_bm == bm)
			goto unlock;
		r = l2_set(s, &ref, new_ent, new_bm);
		if (r == 0 && new_ent == 0 && o.has_host)
			release_old(s, &o);
	}
unlock:
	pthread_mutex_unlock(&w->lock);
	return r;
}

/* ---- flush ------------------------------------------------------------------ */

static int write_l1(struct qcow2 *s)
{
	struct qcow2_writer *w = s->w;
	uint64_t per = s->cluster_size / 8;
	uint64_t nclusters = ((uint64_t)s->l1.size * 8 + s->cluster_size - 1) >> s->cluster_bits;
	uint8_t *buf = xmalloc(s->cluster_size);
	int r = 0;

	for (uint64_t k = 0; k < nclusters && r == 0; k++) {
		uint64_t first = k * per, n = MIN(per, s->l1.size - first);

		if (!w->l1_dirty[k])
			continue;
		for (uint64_t i = 0; i < n; i++)
			put_be64(buf + i * 8, s->l1.table[first + i]);
		r = qcow2_overlap_check(s, s->l1.offset + first * 8, n * 8, QM_L1);
		if (r == 0)
			r = bdev_pwrite(s->file, buf, n * 8, s->l1.offset + first * 8, 0);
		if (r == 0)
			w->l1_dirty[k] = 0;
	}
	free(buf);
	if (r == 0)
		w->any_l1_dirty = false;
	return r;
}

int qcow2_meta_flush(struct qcow2 *s)
{
	struct qcow2_writer *w = s->w;
	/* held frees alone (waiting for a reader) need no L2/L1 pass */
	bool meta = w->updates || w->rt_dirty || w->npfree;
	bool applied = false;
	int r;

	if (atomic_load(&w->corrupt))
		return -EIO;
	/* 1-2: refcount increments (and new blocks, a moved table) */
	r = qcow2_rc_write(s);
	/* 3: increments and guest data durable before what points at them */
	if (r == 0 && s->data_file)
		r = bdev_flush(s->data_file);
	if (r == 0)
		r = bdev_flush(s->file);
	if (r < 0 || (!meta && !w->nheld))
		return r;
	/* 4-6: L2, then L1 */
	if (meta) {
		r = qcow2_cache_flush(s->l2_cache);
		if (r == 0 && w->any_l1_dirty) {
			r = bdev_flush(s->file);
			if (r == 0)
				r = write_l1(s);
		}
		if (r == 0)
			r = bdev_flush(s->file);
	}
	/* 7: frees, now that no durable entry names them (and, for some, once
	 * the reads that found them are done) */
	if (r == 0 && qcow2_frees_pending(w)) {
		r = qcow2_rc_apply_frees(s, &applied);
		if (r == 0 && applied)
			r = qcow2_rc_write(s);
		if (r == 0 && applied)
			r = bdev_flush(s->file);
	}
	if (r == 0)
		w->updates = 0;
	qcow2_rc_trim(s);
	return r;
}

static void maybe_flush(struct qcow2 *s)
{
	struct qcow2_writer *w = s->w;

	pthread_mutex_lock(&w->lock);
	if (w->updates > AUTO_FLUSH_UPDATES) {
		int r = qcow2_meta_flush(s);

		if (r < 0)
			log_warn("%s: writing metadata failed: %s", s->path, strerror(-r));
	}
	pthread_mutex_unlock(&w->lock);
}

int qcow2_dev_flush(struct bdev *d)
{
	struct qcow2 *s = d->priv;
	int r;

	if (!s->w)
		return 0;
	pthread_mutex_lock(&s->w->lock);
	r = qcow2_meta_flush(s);
	pthread_mutex_unlock(&s->w->lock);
	return r;
}

/* ---- the device ops ----------------------------------------------------------- */

/* Zero [off, off+len) with its clusters' in-flight range held: by L2
 * entries where whole units allow (by_entries), else as real zeroes. */
static int zero_range_held(struct qcow2 *s, uint64_t off, uint64_t len, bool unmap, bool by_entries)
{
	uint64_t unit = 1ull << s->subcluster_bits, end = off + len, zend = end;
	int r = 0;

	if (!by_entries)
		return write_range(s, NULL, off, len);
	/* the disk's last, partial cluster counts as whole (nothing past it) */
	if (end == s->size)
		zend = align_up(end, s->cluster_size);
	for (uint64_t pos = off; pos < end && r == 0;) {
		uint64_t cl = pos >> s->cluster_bits, cstart = cl << s->cluster_bits;
		uint64_t cend = MIN(cstart + s->cluster_size, end);
		uint64_t zz = MIN(cstart + s->cluster_size, zend);
		uint64_t aa = align_up(pos, unit), bb = align_down(zz, unit);

		if (aa >= bb) {
			r = write_range(s, NULL, pos, cend - pos);
		} else {
			if (pos < aa)
				r = write_range(s, NULL, pos, aa - pos);
			if (r == 0) {
				r = zero_piece(s, cl, (uint32_t)(aa - cstart), (uint32_t)(bb - cstart), unmap);
				if (r == -ENOTSUP)
					r = write_range(s, NULL, aa, MIN(bb, cend) - aa);
			}
			if (r == 0 && bb < cend)
				r = write_range(s, NULL, bb, cend - bb);
		}
		pos = cend;
	}
	return r;
}

/* Write buf to [off, off+len), or zero it (buf NULL: whole units by L2
 * entries, the rest as real zeroes), with its clusters' in-flight range held. */
static int write_locked(struct qcow2 *s, const void *buf, uint64_t off, uint64_t len,
			bool unmap, bool by_entries)
{
	struct qcow2_writer *w = s->w;
	struct qcow2_inflight me;
	int r;

	if (!w || atomic_load(&w->corrupt))
		return -EIO;
	range_lock(w, &me, off >> s->cluster_bits, (off + len - 1) >> s->cluster_bits);
	r = buf ? write_range(s, buf, off, len) : zero_range_held(s, off, len, unmap, by_entries);
	range_unlock(w, &me);
	maybe_flush(s);
	return r;
}

int qcow2_dev_pwrite(struct bdev *d, const void *buf, size_t len, uint64_t off,
		     unsigned flags)
{
	int r = write_locked(d->priv, buf, off, len, false, false);

	if (r == 0 && (flags & BDEV_FUA))
		r = qcow2_dev_flush(d);
	return r;
}

int qcow2_dev_zero(struct bdev *d, uint64_t off, uint64_t len, unsigned flags)
{
	struct qcow2 *s = d->priv;
	int r;

	/* v2 has no zero flag: with a backing file, only real zeroes will do
	 * (the bdev layer writes them) */
	if (s->version < 3 && s->backing)
		return -ENOTSUP;
	r = write_locked(s, NULL, off, len, flags & BDEV_MAY_UNMAP, true);
	if (r == 0 && (flags & BDEV_FUA))
		r = qcow2_dev_flush(d);
	return r;
}

/* Discard (PUNCH_HOLE, TRIM): clusters are freed, and the range always
 * reads back as zeroes (zero flag: a backing file must not show through). */
int qcow2_dev_discard(struct bdev *d, uint64_t off, uint64_t len)
{
	struct qcow2 *s = d->priv;

	return write_locked(s, NULL, off, len, true, !(s->version < 3 && s->backing));
}

/* ---- resize ------------------------------------------------------------------ */

/*
 * A larger L1 table (qemu's qcow2_grow_l1_table order): allocate, refcounts
 * durable, the new table written and synced, then the header names it
 * (synced), then the old table is freed.  Readers may still hold the old
 * array: it is kept until close.  Lock held.
 */
static int grow_l1(struct qcow2 *s, uint64_t entries)
{
	struct qcow2_writer *w = s->w;
	uint64_t bytes = entries * 8, n = (bytes + s->cluster_size - 1) >> s->cluster_bits;
	uint64_t old_clusters = ((uint64_t)s->l1.size * 8 + s->cluster_size - 1) >> s->cluster_bits;
	uint64_t off, *table;
	uint8_t *buf, h[12];
	int r;

	r = qcow2_meta_flush(s); /* the old table is current on disk */
	if (r == 0)
		r = qcow2_alloc_clusters(s, n, &off);
	if (r == 0)
		r = qcow2_rc_write(s);
	if (r == 0)
		r = bdev_flush(s->file);
	if (r < 0)
		return r;
	table = xcalloc(entries, 8);
	memcpy(table, s->l1.table, (size_t)s->l1.size * 8);
	buf = xcalloc(n, s->cluster_size);
	for (uint64_t i = 0; i < entries; i++)
		put_be64(buf + i * 8, table[i]);
	r = qcow2_overlap_check(s, off, n << s->cluster_bits, 0);
	if (r == 0)
		r = bdev_pwrite(s->file, buf, n << s->cluster_bits, off, BDEV_FUA);
	free(buf);
	if (r == 0) {
		put_be32(h, (uint32_t)entries);
		put_be64(h + 4, off);
		r = qcow2_header_write(s, 36, h, sizeof(h));
	}
	if (r < 0) {
		free(table);
		qcow2_free_later(s, off, n);
		return r;
	}
	for (uint64_t c = 0; c < old_clusters; c++)
		qcow2_mset_clear(&w->meta, (s->l1.offset >> s->cluster_bits) + c, QM_L1);
	for (uint64_t c = 0; c < n; c++)
		qcow2_mset_put(&w->meta, (off >> s->cluster_bits) + c, QM_L1);
	if (old_clusters)
		qcow2_free_later(s, s->l1.offset, old_clusters);
	w->l1_retired = realloc(w->l1_retired, (w->nl1_retired + 1) * sizeof(*w->l1_retired));
	if (!w->l1_retired)
		abort();
	w->l1_retired[w->nl1_retired++] = s->l1.table;
	free(w->l1_dirty);
	w->l1_dirty = xcalloc(n, 1);
	w->any_l1_dirty = false;
	/* the table before its size: a reader never indexes past its array */
	__atomic_store_n(&s->l1.table, table, __ATOMIC_RELEASE);
	__atomic_store_n(&s->l1.offset, off, __ATOMIC_RELEASE);
	__atomic_store_n(&s->l1.size, (uint32_t)entries, __ATOMIC_RELEASE);
	return 0;
}

int qcow2_dev_resize(struct bdev *d, uint64_t size)
{
	struct qcow2 *s = d->priv;
	struct qcow2_writer *w = s->w;
	uint64_t old = s->size;
	struct qcow2_inflight me;
	uint8_t h[8];
	int r;

	if (!w || atomic_load(&w->corrupt))
		return -EIO;
	if (size < old)
		return -ENOTSUP; /* shrinking would drop data: refused */
	if (size == old)
		return 0;
	if (size > INT64_MAX || qcow2_size_to_l1(s, size) > QCOW2_MAX_L1_BYTES / 8)
		return -EFBIG;
	/* nothing can be in flight past the old end; hold it all the same */
	range_lock(w, &me, old >> s->cluster_bits, (size - 1) >> s->cluster_bits);
	pthread_mutex_lock(&w->lock);
	r = ensure_header(s);
	if (r == 0 && qcow2_size_to_l1(s, size) > s->l1.size)
		r = grow_l1(s, qcow2_size_to_l1(s, size));
	if (r == 0) {
		put_be64(h, size);
		r = qcow2_header_write(s, 24, h, sizeof(h));
	}
	if (r == 0) {
		s->size = size;
		s->l1.disk_size = size;
	}
	pthread_mutex_unlock(&w->lock);
	/* the new area reads as zeroes, not as what a backing file has there
	 * (qemu zeroes it the same way) */
	if (r == 0 && s->backing && s->backing->size > old)
		r = zero_range_held(s, old, MIN(size, align_up(s->backing->size, s->cluster_size)) - old,
				    true, !(s->version < 3));
	range_unlock(w, &me);
	if (r == 0)
		__atomic_store_n(&d->size, size, __ATOMIC_RELEASE);
	return r;
}

/* ---- open / close ---------------------------------------------------------- */

/* L2 slices are written back only into active L2 tables. */
static int l2_overlap_check(void *opaque, uint64_t off, uint32_t len)
{
	return qcow2_overlap_check(opaque, off, len, QM_L2);
}

int qcow2_writer_open(struct qcow2 *s, struct err *e)
{
	struct qcow2_writer *w = xcalloc(1, sizeof(*w));
	uint64_t l1_clusters;
	int r;

	s->w = w;
	pthread_mutex_init(&w->lock, NULL);
	pthread_cond_init(&w->cond, NULL);
	atomic_init(&w->corrupt, false);
	l1_clusters = ((uint64_t)s->l1.size * 8 + s->cluster_size - 1) >> s->cluster_bits;
	w->l1_dirty = xcalloc(MAX(l1_clusters, 1), 1);
	r = qcow2_rc_init(s, e);
	if (r == 0)
		r = qcow2_meta_build(s, e);
	if (r == 0)
		qcow2_cache_set_check(s->l2_cache, l2_overlap_check, s);
	if (r == 0 && (s->incompat & QCOW2_INCOMPAT_DIRTY)) {
		/* autoclear bits (bitmaps) go first: the rebuild does not count
		 * bitmap clusters, so the bitmaps must stop being valid */
		r = ensure_header(s);
		if (r < 0)
			err_set(e, r, "%s: cannot update the header: %s", s->path, strerror(-r));
		else
			r = qcow2_repair_refcounts(s, e);
		if (r == 0)
			w->set_dirty = true; /* repaired: clean at close */
	}
	if (r < 0) {
		/* nothing was changed: no flush, no header */
		qcow2_cache_set_check(s->l2_cache, NULL, NULL);
		qcow2_rc_free(s);
		qcow2_mset_free(&w->meta);
		free(w->l1_dirty);
		pthread_cond_destroy(&w->cond);
		pthread_mutex_destroy(&w->lock);
		free(w);
		s->w = NULL;
	}
	return r;
}

void qcow2_writer_close(struct qcow2 *s)
{
	struct qcow2_writer *w = s->w;
	int r;

	if (!w)
		return;
	pthread_mutex_lock(&w->lock);
	r = qcow2_meta_flush(s);
	if (r == 0 && w->set_dirty && !atomic_load(&w->corrupt)) {
		uint8_t buf[8];

		put_be64(buf, s->incompat & ~QCOW2_INCOMPAT_DIRTY);
		r = qcow2_header_write(s, 72, buf, 8);
		if (r == 0)
			s->incompat &= ~QCOW2_INCOMPAT_DIRTY;
	}
	if (r < 0)
		log_err("%s: closing the image failed: %s; it may need qemu-img check -r all",
			s->path, strerror(-r));
	pthread_mutex_unlock(&w->lock);
	qcow2_cache_set_check(s->l2_cache, NULL, NULL);
	qcow2_rc_free(s);
	qcow2_mset_free(&w->meta);
	free(w->l1_dirty);
	for (unsigned i = 0; i < w->nl1_retired; i++)
		free(w->l1_retired[i]);
	free(w->l1_retired);
	pthread_cond_destroy(&w->cond);
	pthread_mutex_destroy(&w->lock);
	free(w);
	s->w = NULL;
}
