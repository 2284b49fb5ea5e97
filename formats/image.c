/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * An image: the device stack opened from a path, and its views — disk, one
 * window per partition, one device per qcow2 internal snapshot.
 *
 * Coherency rests on one mechanism: disk is the format device wrapped so
 * that every write, zero or discard that reaches it is announced to the
 * image's observers.  Partitions are windows over that wrapper, so their
 * writes are announced too.  The image itself observes: a write that touches
 * the partition table's sectors re-reads the table and rebuilds the
 * partition views.
 */
#include "image.h"
#include "formats.h"
#include "partition.h"
#include "qcow2.h"

#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

struct image_observer {
	struct image_observer *next;
	image_observer_fn fn;
	void *opaque;
};

/* ---- the observed disk device -------------------------------------------- */

static struct image *IMG(struct bdev *d) { return d->priv; }

static void announce(struct image *img, uint64_t off, uint64_t len);

static int disk_pread(struct bdev *d, void *buf, size_t len, uint64_t off)
{
	return bdev_pread(IMG(d)->top, buf, len, off);
}

static int disk_pread_nowait(struct bdev *d, void *buf, size_t len, uint64_t off)
{
	return bdev_pread_nowait(IMG(d)->top, buf, len, off);
}

static int disk_pwrite(struct bdev *d, const void *buf, size_t len, uint64_t off,
		       unsigned flags)
{
	int r = bdev_pwrite(IMG(d)->top, buf, len, off, flags);

	if (r == 0)
		announce(IMG(d), off, len);
	return r;
}

static int disk_zero(struct bdev *d, uint64_t off, uint64_t len, unsigned flags)
{
	int r = bdev_zero(IMG(d)->top, off, len, flags);

	if (r == 0)
		announce(IMG(d), off, len);
	return r;
}

static int disk_discard(struct bdev *d, uint64_t off, uint64_t len)
{
	int r = bdev_discard(IMG(d)->top, off, len);

	if (r == 0)
		announce(IMG(d), off, len);
	return r;
}

static int disk_flush(struct bdev *d)
{
	return bdev_flush(IMG(d)->top);
}

static int disk_block_status(struct bdev *d, uint64_t off, uint64_t len,
			     uint64_t *run, unsigned *status, unsigned *depth)
{
	return bdev_block_status(IMG(d)->top, off, len, run, status, depth);
}

static int64_t disk_map(struct bdev *d, uint64_t off, uint64_t len, struct bdev_extents *x)
{
	return bdev_map(IMG(d)->top, off, len, x);
}

/* Grow the disk (qcow2: like qemu-img resize); the disk view follows,
 * partitions stay where they are, the table is read again (a GPT's backup
 * belongs at the end). */
static int disk_resize(struct bdev *d, uint64_t size)
{
	struct image *img = IMG(d);
	uint64_t old = d->size;
	int r = bdev_resize(img->top, size);

	if (r < 0)
		return r;
	pthread_rwlock_wrlock(&img->views_lock);
	for (unsigned i = 0; i < img->nviews; i++)
		if (img->views[i]->kind == VIEW_DISK)
			__atomic_store_n(&img->views[i]->length, size, __ATOMIC_RELEASE);
	pthread_rwlock_unlock(&img->views_lock);
	__atomic_store_n(&d->size, size, __ATOMIC_RELEASE);
	announce(img, old, size - old);
	return 0;
}

static const struct bdev_ops disk_ops = {
	.pread = disk_pread,
	.pread_nowait = disk_pread_nowait,
	.pwrite = disk_pwrite,
	.zero = disk_zero,
	.discard = disk_discard,
	.flush = disk_flush,
	.block_status = disk_block_status,
	.close = NULL, /* the image owns top */
	.resize = disk_resize,
	.map = disk_map,
};

/* ---- observers --------------------------------------------------------- */

void *image_add_observer(struct image *img, image_observer_fn fn, void *opaque)
{
	struct image_observer *o = xcalloc(1, sizeof(*o));

	o->fn = fn;
	o->opaque = opaque;
	pthread_rwlock_wrlock(&img->obs_lock);
	o->next = img->observers;
	img->observers = o;
	pthread_rwlock_unlock(&img->obs_lock);
	return o;
}

void image_remove_observer(struct image *img, void *handle)
{
	struct image_observer **pp;

	pthread_rwlock_wrlock(&img->obs_lock);
	for (pp = &img->observers; *pp; pp = &(*pp)->next)
		if (*pp == handle) {
			*pp = (*pp)->next;
			free(handle);
			break;
		}
	pthread_rwlock_unlock(&img->obs_lock);
}

static void reread_partitions(struct image *img);

static int cmp_u64(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;

	return x < y ? -1 : x > y;
}

/* Does a disk write [off, off+len) touch a sector that holds the table? */
static bool touches_table(struct image *img, uint64_t off, uint64_t len)
{
	uint64_t size = img->disk->size, end = off + len;
	bool hit;

	pthread_rwlock_rdlock(&img->part_lock);
	hit = off < img->part_extent_head ||
	      (img->part_extent_tail && end > size - MIN(size, img->part_extent_tail));
	if (!hit && img->npart_sectors) {
		/* the first listed sector that ends after off: does it start before end? */
		unsigned lo = 0, hi = img->npart_sectors;

		while (lo < hi) {
			unsigned mid = lo + (hi - lo) / 2;

			if (img->part_sectors[mid] + 512 <= off)
				lo = mid + 1;
			else
				hi = mid;
		}
		hit = lo < img->npart_sectors && img->part_sectors[lo] < end;
	}
	pthread_rwlock_unlock(&img->part_lock);
	return hit;
}

static void announce(struct image *img, uint64_t off, uint64_t len)
{
	/* writers announce in parallel: observers must be thread-safe */
	pthread_rwlock_rdlock(&img->obs_lock);
	for (struct image_observer *o = img->observers; o; o = o->next)
		o->fn(o->opaque, off, len);
	pthread_rwlock_unlock(&img->obs_lock);
	if (touches_table(img, off, len))
		reread_partitions(img);
}

/* ---- views --------------------------------------------------------------- */

/* Every field of a view is set here, once; the strings are copied. */
static struct view *view_new(const char *name, enum view_kind kind, unsigned number,
			     struct bdev *dev, uint64_t offset, bool writable,
			     const char *type, const char *label, const char *info)
{
	struct view *v = xcalloc(1, sizeof(*v));

	v->name = xstrdup(name);
	v->kind = kind;
	v->number = number;
	v->dev = dev;
	v->offset = offset;
	v->length = dev->size;
	v->writable = writable && !dev->read_only;
	v->type = xstrdup(type);
	v->label = xstrdup(label);
	v->info = xstrdup(info);
	return v;
}

static void view_free(struct view *v)
{
	free(v->name);
	free(v->type);
	free(v->label);
	free(v->info);
	free(v);
}

/* Every view array is built here from empty: its capacity is the next power
 * of two, so appending 65536 snapshot views is not 65536 reallocations. */
static void views_append(struct view ***arr, unsigned *n, struct view *v)
{
	if (*n == 0 || is_pow2(*n)) {
		*arr = realloc(*arr, sizeof(**arr) * (*n ? *n * 2 : 1));
		if (!*arr)
			abort();
	}
	(*arr)[(*n)++] = v;
}

/* Partition views for the table currently on disk. */
static void build_partition_views(struct image *img, struct view ***arr, unsigned *n)
{
	struct partition_table t;
	int r;

	memset(&t, 0, sizeof(t));
	r = partition_table_read(img->disk, &t);
	if (r < 0) {
		log_warn("%s: cannot read the partition table: %s", img->path, strerror(-r));
		return;
	}
	pthread_rwlock_wrlock(&img->part_lock);
	img->part_extent_head = MAX(t.table_bytes_head, 512);
	img->part_extent_tail = t.table_at_end ? t.table_bytes_tail : 0;
	img->part_scheme = !strcmp(t.scheme, "gpt") ? "gpt" : !strcmp(t.scheme, "mbr") ? "mbr" : "";
	free(img->part_sectors);
	img->part_sectors = NULL;
	img->npart_sectors = t.ntable_sectors;
	if (t.ntable_sectors) {
		img->part_sectors = xmalloc(sizeof(uint64_t) * t.ntable_sectors);
		memcpy(img->part_sectors, t.table_sectors, sizeof(uint64_t) * t.ntable_sectors);
		qsort(img->part_sectors, t.ntable_sectors, sizeof(uint64_t), cmp_u64);
	}
	pthread_rwlock_unlock(&img->part_lock);
	for (unsigned i = 0; i < t.count; i++) {
		struct partition *p = &t.parts[i];
		char name[32], info[64];
		struct bdev *w;

		snprintf(name, sizeof(name), "p%u", p->number);
		if (p->uuid[0])
			snprintf(info, sizeof(info), "%s uuid=%s", t.scheme, p->uuid);
		else
			snprintf(info, sizeof(info), "%s%s", t.scheme, p->bootable ? " bootable" : "");
		w = window_new(img->disk, p->offset, p->length, img->disk->read_only);
		views_append(arr, n, view_new(name, VIEW_PARTITION, p->number, w, p->offset,
					      !img->read_only, p->type, p->label, info));
	}
	partition_table_free(&t);
}

/*
 * Snapshot names become file names: one that is empty, not unique, too long,
 * starts with '#' or holds '/' or a control character is shown by ID instead
 * (SPEC §3).  An ID that is not plain (letters, digits, '.', '_', '-'; qemu
 * writes decimal numbers) or not unique is hostile: that snapshot is shown
 * as snap@#?N, N its index, which no usable name or ID can collide with.
 *
 * Uniqueness is found by sorting, not by comparing every pair: an image may
 * hold 65536 snapshots (65536^2 string compares took 27 s at open).
 */
static bool name_chars_ok(const char *n)
{
	if (!n[0] || n[0] == '#' || strlen(n) > NAME_MAX - 5)
		return false;
	for (const char *c = n; *c; c++)
		if (*c == '/' || (unsigned char)*c < 0x20 || *c == 0x7f)
			return false;
	return true;
}

static bool id_chars_ok(const char *id)
{
	if (!id[0] || strlen(id) > NAME_MAX - 6)
		return false;
	for (const char *c = id; *c; c++)
		if (!((*c >= '0' && *c <= '9') || (*c >= 'a' && *c <= 'z') ||
		      (*c >= 'A' && *c <= 'Z') || *c == '.' || *c == '_' || *c == '-'))
			return false;
	return true;
}

struct snap_key { const char *str; unsigned idx; };

static int snap_key_cmp(const void *a, const void *b)
{
	return strcmp(((const struct snap_key *)a)->str, ((const struct snap_key *)b)->str);
}

/* dup[i] = the string of snapshot i (its name, or its ID) is not unique. */
static void mark_duplicates(struct bdev *q, unsigned n, bool by_id, bool *dup)
{
	struct snap_key *k = xmalloc(sizeof(*k) * (n ? n : 1));

	for (unsigned i = 0; i < n; i++) {
		const struct qcow2_snapshot_info *s = qcow2_snapshot_get(q, i);

		k[i].str = by_id ? s->id : s->name;
		k[i].idx = i;
	}
	qsort(k, n, sizeof(*k), snap_key_cmp);
	for (unsigned i = 0; i + 1 < n; i++)
		if (!strcmp(k[i].str, k[i + 1].str))
			dup[k[i].idx] = dup[k[i + 1].idx] = true;
	free(k);
}

/* A snapshot that cannot be opened is skipped with a warning: never fatal. */
static void build_snapshot_views(struct image *img, struct view ***arr, unsigned *n,
				 struct err *e)
{
	bool *name_dup, *id_dup;
	unsigned count;

	if (strcmp(img->format, "qcow2"))
		return;
	count = qcow2_snapshot_count(img->top);
	name_dup = xcalloc(count ? count : 1, sizeof(bool));
	id_dup = xcalloc(count ? count : 1, sizeof(bool));
	mark_duplicates(img->top, count, false, name_dup);
	mark_duplicates(img->top, count, true, id_dup);
	for (unsigned i = 0; i < count; i++) {
		const struct qcow2_snapshot_info *s = qcow2_snapshot_get(img->top, i);
		struct bdev *dev;
		char *name, *info, date[64];
		struct tm tm;
		time_t t = s->date_sec;
		int r;

		r = qcow2_snapshot_open(img->top, i, &dev, e);
		if (r < 0) {
			/* one bad snapshot does not hide the disk: warn, skip */
			log_warn("%s: snapshot id %s: %s", img->path, s->id, e ? e->msg : strerror(-r));
			if (e) {
				e->code = 0;
				e->msg[0] = 0;
			}
			continue;
		}
		if (!name_dup[i] && name_chars_ok(s->name))
			name = xasprintf("snap@%s", s->name);
		else if (!id_dup[i] && id_chars_ok(s->id))
			name = xasprintf("snap@#%s", s->id);
		else
			name = xasprintf("snap@#?%u", i + 1);
		gmtime_r(&t, &tm);
		strftime(date, sizeof(date), "%Y-%m-%dT%H:%M:%SZ", &tm);
		info = xasprintf("id=%s date=%s vm-clock=%02llu:%02llu:%02llu.%03llu vm-state=%llu",
				 s->id, date,
				 (unsigned long long)(s->vm_clock_ns / 3600000000000ULL),
				 (unsigned long long)(s->vm_clock_ns / 60000000000ULL % 60),
				 (unsigned long long)(s->vm_clock_ns / 1000000000ULL % 60),
				 (unsigned long long)(s->vm_clock_ns / 1000000ULL % 1000),
				 (unsigned long long)s->vm_state_size);
		views_append(arr, n, view_new(name, VIEW_SNAPSHOT, i, dev, UINT64_MAX, false,
					      "snapshot", s->name, info));
		free(name);
		free(info);
	}
	free(name_dup);
	free(id_dup);
}

static void reread_partitions(struct image *img)
{
	struct view **nv = NULL, **old;
	unsigned nn = 0, nold;

	pthread_mutex_lock(&img->reread_lock);
	pthread_rwlock_rdlock(&img->views_lock);
	/* keep disk and snapshots, replace partitions */
	for (unsigned i = 0; i < img->nviews; i++)
		if (img->views[i]->kind == VIEW_DISK)
			views_append(&nv, &nn, img->views[i]);
	pthread_rwlock_unlock(&img->views_lock);
	build_partition_views(img, &nv, &nn);
	pthread_rwlock_wrlock(&img->views_lock);
	for (unsigned i = 0; i < img->nviews; i++)
		if (img->views[i]->kind == VIEW_SNAPSHOT)
			views_append(&nv, &nn, img->views[i]);
	old = img->views;
	nold = img->nviews;
	img->views = nv;
	img->nviews = nn;
	img->generation++;
	/* old partition views may still be in use by a front end: retire them,
	 * freed at close */
	for (unsigned i = 0; i < nold; i++)
		if (old[i]->kind == VIEW_PARTITION)
			views_append(&img->retired, &img->nretired, old[i]);
	pthread_rwlock_unlock(&img->views_lock);
	free(old);
	pthread_mutex_unlock(&img->reread_lock);
}

struct view *image_find_view(struct image *img, const char *name)
{
	struct view *found = NULL;

	pthread_rwlock_rdlock(&img->views_lock);
	for (unsigned i = 0; i < img->nviews; i++)
		if (!strcmp(img->views[i]->name, name)) {
			found = img->views[i];
			break;
		}
	pthread_rwlock_unlock(&img->views_lock);
	return found;
}

unsigned image_list_views(struct image *img, struct view ***out, uint64_t *generation)
{
	unsigned n;

	pthread_rwlock_rdlock(&img->views_lock);
	n = img->nviews;
	*out = xmalloc(sizeof(**out) * (n ? n : 1));
	memcpy(*out, img->views, sizeof(**out) * n);
	if (generation)
		*generation = img->generation;
	pthread_rwlock_unlock(&img->views_lock);
	return n;
}

/*
 * -l as qemu-nbd takes it: "snapshot.id=ID", "snapshot.name=NAME", or a bare
 * string matched first as a name, then as an ID.
 */
static struct view *find_snapshot(struct image *img, const char *spec, struct err *e)
{
	const char *id = NULL, *name = NULL;
	struct view *found = NULL;

	if (!strncmp(spec, "snapshot.id=", 12))
		id = spec + 12;
	else if (!strncmp(spec, "snapshot.name=", 14))
		name = spec + 14;
	if (strcmp(img->format, "qcow2")) {
		err_set(e, -ENOENT, "%s: a %s image has no snapshots", img->path, img->format);
		return NULL;
	}
	pthread_rwlock_rdlock(&img->views_lock);
	for (int pass = 0; pass < 2 && !found; pass++) {
		for (unsigned i = 0; i < img->nviews && !found; i++) {
			const struct qcow2_snapshot_info *s;
			struct view *v = img->views[i];

			if (v->kind != VIEW_SNAPSHOT)
				continue;
			s = qcow2_snapshot_get(img->top, v->number);
			if (pass == 0 && !id && !strcmp(s->name, name ? name : spec))
				found = v;
			if (pass == 1 && !name && !strcmp(s->id, id ? id : spec))
				found = v;
		}
	}
	pthread_rwlock_unlock(&img->views_lock);
	if (!found)
		err_set(e, -ENOENT, "%s: no snapshot '%s'", img->path, spec);
	return found;
}

struct view *image_pick_view(struct image *img, const char *view,
			     int partition, const char *snapshot, struct err *e)
{
	struct view *v;
	char name[32];

	if (snapshot)
		return find_snapshot(img, snapshot, e);
	if (partition > 0) {
		snprintf(name, sizeof(name), "p%d", partition);
		view = name;
	}
	if (!view)
		view = "disk";
	v = image_find_view(img, view);
	if (!v)
		err_set(e, -ENOENT, "%s: no view '%s'%s", img->path, view,
			partition > 0 ? " (no such partition)" : "");
	return v;
}

/* ---- open and close ------------------------------------------------------ */

int image_open(const char *path, const struct image_opts *opts,
	       struct image **out, struct err *e)
{
	struct open_ctx ctx = { .opts = opts };
	struct image *img;
	struct bdev *top;
	char *abs;
	int r;

	abs = realpath(path, NULL);
	if (!abs)
		return err_set(e, -errno, "%s: %s", path, strerror(errno));
	r = image_open_dev(abs, opts->format, !opts->read_only, &ctx, &top, e);
	if (r < 0) {
		free(abs);
		return r;
	}
	img = xcalloc(1, sizeof(*img));
	img->path = abs;
	img->format = xstrdup(top->kind);
	img->top = top;
	img->read_only = opts->read_only || top->read_only;
	pthread_rwlock_init(&img->views_lock, NULL);
	pthread_rwlock_init(&img->obs_lock, NULL);
	pthread_mutex_init(&img->reread_lock, NULL);
	pthread_rwlock_init(&img->part_lock, NULL);
	img->disk = bdev_new(&disk_ops, top->kind, top->size, img->read_only, img);
	img->disk->min_block = top->min_block;

	views_append(&img->views, &img->nviews,
		     view_new("disk", VIEW_DISK, 0, img->disk, 0, !img->read_only,
			      img->format, "", ""));
	build_partition_views(img, &img->views, &img->nviews);
	build_snapshot_views(img, &img->views, &img->nviews, e);
	*out = img;
	return 0;
}

int image_close(struct image *img)
{
	int r = 0;

	if (!img)
		return 0;
	if (!img->read_only)
		r = bdev_flush(img->top);
	for (unsigned i = 0; i < img->nviews; i++) {
		if (img->views[i]->kind != VIEW_DISK)
			bdev_close(img->views[i]->dev);
		view_free(img->views[i]);
	}
	for (unsigned i = 0; i < img->nretired; i++) {
		bdev_close(img->retired[i]->dev);
		view_free(img->retired[i]);
	}
	free(img->views);
	free(img->retired);
	bdev_close(img->disk);
	bdev_close(img->top);
	while (img->observers) {
		struct image_observer *o = img->observers;
		img->observers = o->next;
		free(o);
	}
	pthread_rwlock_destroy(&img->views_lock);
	pthread_rwlock_destroy(&img->obs_lock);
	pthread_mutex_destroy(&img->reread_lock);
	pthread_rwlock_destroy(&img->part_lock);
	free(img->part_sectors);
	free(img->format);
	free(img->path);
	free(img);
	return r;
}
