/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * A bounded LRU cache of L2 table slices, keyed by host offset.
 *
 * Why copy-out: callers get a copy of the entries they asked for, made
 * under the mutex, so no slice is ever pinned or read while another thread
 * evicts it, and the mutex is never held across I/O.  A miss reads the
 * slice with the mutex dropped; if two threads miss on the same slice both
 * read it and the second insert finds the first (harmless, and rare).
 *
 * Keyed by host offset, one cache serves the active L1 and every snapshot
 * L1 of an image: a slice shared by both is cached once.
 *
 * Write-path hooks: qcow2_cache_write() updates a slice and marks it dirty;
 * dirty slices are never evicted until qcow2_cache_flush() writes them.
 * (Write ordering between caches — DESIGN.md — belongs to that write path.)
 */
#include "qcow2-int.h"

#include <errno.h>
#include <stdlib.h>

#define MIN_SLICES 16

struct slice {
	uint64_t off;
	struct slice *hnext;          /* hash chain */
	struct slice *prev, *next;    /* LRU list, most recent first */
	bool dirty;
	bool writing;                 /* being written back: not evictable */
	uint8_t data[];
};

struct qcow2_cache {
	pthread_mutex_t lock;
	struct bdev *file;
	uint32_t slice_size;
	/* the write path's overlap check, run before each write-back */
	int (*check)(void *opaque, uint64_t off, uint32_t len);
	void *check_opaque;
	unsigned max, count;
	unsigned nbuckets;            /* power of two */
	struct slice **buckets;
	struct slice head;            /* LRU sentinel */
	uint64_t hits, misses;
};

static unsigned bucket_of(const struct qcow2_cache *c, uint64_t off)
{
	uint64_t h = off / c->slice_size;

	h *= 0x9e3779b97f4a7c15ull; /* Fibonacci hashing spreads nearby slices */
	return (unsigned)(h >> 32) & (c->nbuckets - 1);
}

struct qcow2_cache *qcow2_cache_new(struct bdev *file, uint32_t slice_size,
				    uint64_t max_bytes)
{
	struct qcow2_cache *c = xcalloc(1, sizeof(*c));
	uint64_t max = max_bytes / slice_size;

	pthread_mutex_init(&c->lock, NULL);
	c->file = file;
	c->slice_size = slice_size;
	c->max = (unsigned)MIN(MAX(max, MIN_SLICES), 1u << 24);
	c->nbuckets = 1;
	while (c->nbuckets < c->max)
		c->nbuckets <<= 1;
	c->buckets = xcalloc(c->nbuckets, sizeof(*c->buckets));
	c->head.prev = c->head.next = &c->head;
	return c;
}

void qcow2_cache_free(struct qcow2_cache *c)
{
	struct slice *sl, *next;

	if (!c)
		return;
	for (sl = c->head.next; sl != &c->head; sl = next) {
		next = sl->next;
		free(sl);
	}
	free(c->buckets);
	pthread_mutex_destroy(&c->lock);
	free(c);
}

static void lru_unlink(struct slice *sl)
{
	sl->prev->next = sl->next;
	sl->next->prev = sl->prev;
}

static void lru_push(struct qcow2_cache *c, struct slice *sl)
{
	sl->next = c->head.next;
	sl->prev = &c->head;
	c->head.next->prev = sl;
	c->head.next = sl;
}

/* Caller holds the lock. */
static struct slice *find(struct qcow2_cache *c, uint64_t off)
{
	struct slice *sl;

	for (sl = c->buckets[bucket_of(c, off)]; sl; sl = sl->hnext)
		if (sl->off == off)
			return sl;
	return NULL;
}

/* Caller holds the lock.  Drop least recently used clean slices. */
static void evict(struct qcow2_cache *c)
{
	struct slice *sl = c->head.prev;

	/* never the front slice: the caller is about to use it */
	while (c->count > c->max && sl != &c->head && sl != c->head.next) {
		struct slice *prev = sl->prev;

		/* a slice being written back stays: evicted now, a reader
		 * could load the old bytes from disk and keep them */
		if (!sl->dirty && !sl->writing) {
			struct slice **pp = &c->buckets[bucket_of(c, sl->off)];

			while (*pp != sl)
				pp = &(*pp)->hnext;
			*pp = sl->hnext;
			lru_unlink(sl);
			free(sl);
			c->count--;
		}
		sl = prev;
	}
}

/* Caller holds the lock; returns the cached slice, moved to the front. */
static struct slice *lookup(struct qcow2_cache *c, uint64_t off)
{
	struct slice *sl = find(c, off);

	if (sl) {
		lru_unlink(sl);
		lru_push(c, sl);
	}
	return sl;
}

/*
 * Returns with the lock held and the slice present, or an error unlocked.
 * !load: the caller overwrites the whole slice before it drops the lock,
 * so a miss inserts it without reading the disk.
 */
static int get_locked(struct qcow2_cache *c, uint64_t off, bool load, struct slice **out)
{
	struct slice *sl, *fresh;
	int r;

	pthread_mutex_lock(&c->lock);
	sl = lookup(c, off);
	if (sl) {
		c->hits++;
		*out = sl;
		return 0;
	}
	c->misses += load;
	pthread_mutex_unlock(&c->lock);

	fresh = xmalloc(sizeof(*fresh) + c->slice_size);
	fresh->off = off;
	fresh->dirty = false;
	fresh->writing = false;
	r = load ? bdev_pread(c->file, fresh->data, c->slice_size, off) : 0;
	if (r < 0) {
		free(fresh);
		return r;
	}

	pthread_mutex_lock(&c->lock);
	sl = lookup(c, off);
	if (sl) {
		free(fresh); /* another thread loaded it meanwhile */
	} else {
		unsigned b = bucket_of(c, off);

		sl = fresh;
		sl->hnext = c->buckets[b];
		c->buckets[b] = sl;
		lru_push(c, sl);
		c->count++;
		evict(c);
	}
	*out = sl;
	return 0;
}

int qcow2_cache_read(struct qcow2_cache *c, uint64_t slice_off, uint32_t in_off,
		     void *dst, uint32_t n)
{
	struct slice *sl;
	int r;

	if (in_off > c->slice_size || n > c->slice_size - in_off)
		return -EINVAL;
	r = get_locked(c, slice_off, true, &sl);
	if (r < 0)
		return r;
	memcpy(dst, sl->data + in_off, n);
	pthread_mutex_unlock(&c->lock);
	return 0;
}

int qcow2_cache_peek(struct qcow2_cache *c, uint64_t slice_off, uint32_t in_off,
		     void *dst, uint32_t n)
{
	struct slice *sl;

	if (in_off > c->slice_size || n > c->slice_size - in_off)
		return -EINVAL;
	pthread_mutex_lock(&c->lock);
	sl = lookup(c, slice_off);
	if (sl) {
		c->hits++;
		memcpy(dst, sl->data + in_off, n);
	}
	pthread_mutex_unlock(&c->lock);
	return sl ? 0 : -EAGAIN;
}

int qcow2_cache_write(struct qcow2_cache *c, uint64_t slice_off, uint32_t in_off,
		      const void *src, uint32_t n)
{
	struct slice *sl;
	int r;

	if (in_off > c->slice_size || n > c->slice_size - in_off)
		return -EINVAL;
	/* a whole slice (a new L2 table) needs nothing from the disk */
	r = get_locked(c, slice_off, n < c->slice_size, &sl);
	if (r < 0)
		return r;
	memcpy(sl->data + in_off, src, n);
	sl->dirty = true;
	pthread_mutex_unlock(&c->lock);
	return 0;
}

/*
 * Write every dirty slice.  Each is copied under the lock and written with
 * the lock dropped; a slice dirtied again meanwhile stays dirty, and is
 * written by the next pass.  A pass collects the dirty offsets in one walk
 * of the list (a walk per slice would hold the lock for a time quadratic in
 * the cache size).
 */
static int write_back(struct qcow2_cache *c, uint64_t off, uint8_t *copy)
{
	struct slice *sl;
	int r;

	pthread_mutex_lock(&c->lock);
	sl = find(c, off);
	if (!sl || !sl->dirty) { /* written by a concurrent flush meanwhile */
		pthread_mutex_unlock(&c->lock);
		return 0;
	}
	memcpy(copy, sl->data, c->slice_size);
	sl->dirty = false;
	sl->writing = true;
	pthread_mutex_unlock(&c->lock);
	r = c->check ? c->check(c->check_opaque, off, c->slice_size) : 0;
	if (r == 0)
		r = bdev_pwrite(c->file, copy, c->slice_size, off, 0);
	pthread_mutex_lock(&c->lock);
	sl = find(c, off);
	if (sl) {
		sl->writing = false;
		if (r < 0)
			sl->dirty = true;
	}
	pthread_mutex_unlock(&c->lock);
	return r;
}

int qcow2_cache_flush(struct qcow2_cache *c)
{
	uint8_t *copy = xmalloc(c->slice_size);
	uint64_t *offs = NULL;
	size_t cap = 0;
	int r = 0;

	for (;;) {
		struct slice *sl;
		size_t n = 0;

		pthread_mutex_lock(&c->lock);
		for (sl = c->head.next; sl != &c->head; sl = sl->next) {
			if (!sl->dirty)
				continue;
			if (n == cap) {
				cap = cap ? cap * 2 : 64;
				offs = realloc(offs, cap * sizeof(*offs));
				if (!offs)
					abort();
			}
			offs[n++] = sl->off;
		}
		pthread_mutex_unlock(&c->lock);
		if (!n)
			break;
		for (size_t i = 0; i < n && r == 0; i++)
			r = write_back(c, offs[i], copy);
		if (r < 0)
			break;
	}
	free(offs);
	free(copy);
	return r;
}

void qcow2_cache_set_check(struct qcow2_cache *c,
			   int (*check)(void *opaque, uint64_t off, uint32_t len),
			   void *opaque)
{
	c->check = check;
	c->check_opaque = opaque;
}

void qcow2_cache_stats(struct qcow2_cache *c, uint64_t *hits, uint64_t *misses,
		       unsigned *entries)
{
	pthread_mutex_lock(&c->lock);
	*hits = c->hits;
	*misses = c->misses;
	*entries = c->count;
	pthread_mutex_unlock(&c->lock);
}
