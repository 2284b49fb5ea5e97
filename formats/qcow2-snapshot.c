/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Internal snapshots (§ "Snapshots"): the snapshot table, and read-only
 * devices that read a snapshot through its own L1 table.
 *
 * The table is parsed at open (it is small and bounded: 65536 entries,
 * 64 MiB); a snapshot's L1 table is validated and loaded only when its
 * device is opened.  A snapshot device shares the image's L2 cache, backing
 * file and file, and is exactly disk_size bytes long, so the VM state that
 * lives past the disk (§ "Snapshots", bytes 32-35) is never reachable.
 */
#include "qcow2-int.h"

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>

#define SNAP_FIXED 40 /* fixed part of a table entry */

static char *copy_str(const uint8_t *p, size_t len)
{
	char *str = xmalloc(len + 1);

	memcpy(str, p, len);
	str[len] = 0;
	return str;
}

/* Parse entry i at table byte pos; *next gets the following entry's pos. */
static int parse_entry(struct qcow2 *s, unsigned i, uint64_t pos, uint64_t *next,
		       bool *warned, struct err *e)
{
	uint64_t fsize = qcow2_file_size(s->file);
	struct qcow2_snap *sn = &s->snaps[i];
	uint8_t fixed[SNAP_FIXED], *var;
	uint32_t id_len, name_len, var_len;
	uint64_t at;
	int r;

	/* every read is bounded by qemu's 64 MiB table limit and the file */
	if (range_exceeds(pos, SNAP_FIXED, QCOW2_MAX_SNAPSHOTS_BYTES) ||
	    range_exceeds(s->snapshots_offset + pos, SNAP_FIXED, fsize))
		return err_set(e, -EINVAL, "%s: snapshot table entry %u lies past the end of the %s",
			       s->path, i, pos + SNAP_FIXED > QCOW2_MAX_SNAPSHOTS_BYTES ?
			       "64 MiB table limit" : "file");
	at = s->snapshots_offset + pos;
	r = bdev_pread(s->file, fixed, SNAP_FIXED, at);
	if (r < 0)
		return err_set(e, r, "%s: cannot read the snapshot table: %s", s->path, strerror(-r));

	sn->l1_offset = be64(fixed);
	sn->l1_size = be32(fixed + 8);
	id_len = be16(fixed + 12);
	name_len = be16(fixed + 14);
	sn->info.date_sec = be32(fixed + 16);
	sn->info.date_nsec = be32(fixed + 20);
	sn->info.vm_clock_ns = be64(fixed + 24);
	sn->info.vm_state_size = be32(fixed + 32);
	sn->extra_size = be32(fixed + 36);
	if (sn->extra_size > QCOW2_MAX_SNAPSHOT_EXTRA)
		return err_set(e, -EFBIG, "%s: snapshot table entry %u: extra data too large (%u bytes, at most %u)",
			       s->path, i, sn->extra_size, QCOW2_MAX_SNAPSHOT_EXTRA);
	var_len = sn->extra_size + id_len + name_len;
	if (range_exceeds(pos + SNAP_FIXED, var_len, QCOW2_MAX_SNAPSHOTS_BYTES) ||
	    range_exceeds(at + SNAP_FIXED, var_len, fsize))
		return err_set(e, -EINVAL, "%s: snapshot table entry %u runs past the end of the %s",
			       s->path, i, pos + SNAP_FIXED + var_len > QCOW2_MAX_SNAPSHOTS_BYTES ?
			       "64 MiB table limit" : "file");
	var = xmalloc(var_len ? var_len : 1);
	r = bdev_pread(s->file, var, var_len, at + SNAP_FIXED);
	if (r < 0) {
		free(var);
		return err_set(e, r, "%s: cannot read the snapshot table: %s", s->path, strerror(-r));
	}

	/* Extra data (§ "Snapshots", bytes 40-63): each field only if present.
	 * v2 entries may lack disk_size: the snapshot then has the active size,
	 * as qemu assumes. */
	if (sn->extra_size >= 8)
		sn->info.vm_state_size = be64(var);
	sn->info.disk_size = sn->extra_size >= 16 ? be64(var + 8) : s->size;
	sn->info.icount = sn->extra_size >= 24 ? be64(var + 16) : UINT64_MAX;
	if (s->version >= 3 && sn->extra_size < 16 && !*warned) {
		/* qemu-img check calls it corruption; reading copes (once per image) */
		*warned = true;
		log_warn("%s: snapshot table entry %u has %u bytes of extra data (version 3 needs 16)",
			 s->path, i, sn->extra_size);
	}
	sn->info.id = copy_str(var + sn->extra_size, id_len);
	sn->info.name = copy_str(var + sn->extra_size + id_len, name_len);
	free(var);
	*next = pos + align_up(SNAP_FIXED + (uint64_t)var_len, 8);
	return 0;
}

int qcow2_snapshots_load(struct qcow2 *s, struct err *e)
{
	bool warned = false;
	uint64_t pos = 0;
	int r;

	if (!s->nb_snapshots)
		return 0;
	s->snaps = xcalloc(s->nb_snapshots, sizeof(*s->snaps));
	for (unsigned i = 0; i < s->nb_snapshots; i++) {
		r = parse_entry(s, i, pos, &pos, &warned, e);
		s->nsnaps = i + (r == 0); /* for freeing what was parsed */
		if (r < 0)
			return r;
	}
	s->snapshots_size = pos;
	return 0;
}

void qcow2_snapshots_free(struct qcow2 *s)
{
	for (unsigned i = 0; i < s->nsnaps; i++) {
		free(s->snaps[i].info.id);
		free(s->snaps[i].info.name);
	}
	free(s->snaps);
	s->snaps = NULL;
	s->nsnaps = 0;
}

unsigned qcow2_snapshot_count(struct bdev *d)
{
	struct qcow2 *s = qcow2_state(d);

	return s ? s->nsnaps : 0;
}

const struct qcow2_snapshot_info *qcow2_snapshot_get(struct bdev *d, unsigned i)
{
	struct qcow2 *s = qcow2_state(d);

	return s && i < s->nsnaps ? &s->snaps[i].info : NULL;
}

/*
 * The snapshot device: the parent's state, read through another L1.  The
 * L1 is validated at open but read on first use, so an image with many
 * snapshots opens (and lists its views) without reading their tables.
 */
struct snap_dev {
	struct qcow2 *s;
	struct qcow2_l1 l1;
	pthread_mutex_t load_lock;
	atomic_int loaded;      /* 0 not yet, 1 loaded, negative errno: failed */
	uint64_t charged;       /* bytes counted in s->snap_l1_bytes */
	char what[64];
};

static int snap_l1(struct snap_dev *sd)
{
	int st = atomic_load_explicit(&sd->loaded, memory_order_acquire);
	struct err e = { 0 };

	if (st)
		return st < 0 ? st : 0;
	pthread_mutex_lock(&sd->load_lock);
	st = atomic_load_explicit(&sd->loaded, memory_order_relaxed);
	if (!st) {
		uint64_t bytes = (uint64_t)sd->l1.size * 8;

		/* bounded memory: at most QCOW2_MAX_SNAP_L1_TOTAL of snapshot L1s */
		if (__atomic_add_fetch(&sd->s->snap_l1_bytes, bytes, __ATOMIC_RELAXED) >
		    QCOW2_MAX_SNAP_L1_TOTAL) {
			__atomic_sub_fetch(&sd->s->snap_l1_bytes, bytes, __ATOMIC_RELAXED);
			st = err_set(&e, -ENOMEM, "%s: %s: snapshot L1 tables in memory would exceed %" PRIu64 " MiB",
				     sd->s->path, sd->what, QCOW2_MAX_SNAP_L1_TOTAL >> 20);
		} else {
			sd->charged = bytes;
			st = qcow2_load_l1(sd->s, &sd->l1, &e);
		}
		if (st < 0)
			log_warn("%s", e.msg);
		atomic_store_explicit(&sd->loaded, st < 0 ? -EIO : 1, memory_order_release);
		st = st < 0 ? -EIO : 1;
	}
	pthread_mutex_unlock(&sd->load_lock);
	return st < 0 ? st : 0;
}

static int snap_pread(struct bdev *d, void *buf, size_t len, uint64_t off)
{
	struct snap_dev *sd = d->priv;
	int r = snap_l1(sd);

	return r < 0 ? r : qcow2_read(sd->s, &sd->l1, buf, len, off);
}

static int snap_status(struct bdev *d, uint64_t off, uint64_t len,
		       uint64_t *run, unsigned *status, unsigned *depth)
{
	struct snap_dev *sd = d->priv;
	int r = snap_l1(sd);

	return r < 0 ? r : qcow2_status(sd->s, &sd->l1, off, len, run, status, depth);
}

static int64_t snap_map(struct bdev *d, uint64_t off, uint64_t len, struct bdev_extents *x)
{
	struct snap_dev *sd = d->priv;
	int r = snap_l1(sd);

	return r < 0 ? r : qcow2_map(sd->s, &sd->l1, off, len, x);
}

static void snap_close(struct bdev *d)
{
	struct snap_dev *sd = d->priv;

	pthread_mutex_destroy(&sd->load_lock);
	__atomic_sub_fetch(&sd->s->snap_l1_bytes, sd->charged, __ATOMIC_RELAXED);
	free(sd->l1.table);
	free(sd);
}

/* Never writable: pwrite is NULL, and the device is read-only. */
static const struct bdev_ops snap_ops = {
	.pread = snap_pread,
	.block_status = snap_status,
	.close = snap_close,
	.map = snap_map,
};

int qcow2_snapshot_open(struct bdev *d, unsigned i, struct bdev **out, struct err *e)
{
	struct qcow2 *s = qcow2_state(d);
	struct qcow2_snap *sn;
	struct snap_dev *sd;
	int r;

	if (!s || i >= s->nsnaps)
		return err_set(e, -ENOENT, "%s: no snapshot number %u", s ? s->path : "?", i);
	sn = &s->snaps[i];
	if (s->data_file)
		return err_set(e, -ENOTSUP, "%s: snapshot '%s': internal snapshots cannot be used with an external data file",
			       s->path, sn->info.id);
	/* the same checks as for the active L1 (CVE-2014-0145) */
	if (sn->info.disk_size > INT64_MAX ||
	    qcow2_size_to_l1(s, sn->info.disk_size) > QCOW2_MAX_L1_BYTES / 8)
		return err_set(e, -EFBIG, "%s: snapshot '%s': disk size %" PRIu64 " is too big",
			       s->path, sn->info.id, sn->info.disk_size);

	sd = xcalloc(1, sizeof(*sd));
	sd->s = s;
	snprintf(sd->what, sizeof(sd->what), "snapshot '%.40s' L1 table", sn->info.id);
	r = qcow2_check_l1(s, sn->l1_offset, sn->l1_size, sd->what, e);
	if (r < 0) {
		free(sd);
		return r;
	}
	/* An L1 shorter than the disk is allowed: the rest is unallocated
	 * (qemu reads it that way; a disk grown after the snapshot does it). */
	sd->l1.offset = sn->l1_offset;
	/* entries past the disk are never looked up: do not load them */
	sd->l1.size = (uint32_t)MIN(sn->l1_size, qcow2_size_to_l1(s, sn->info.disk_size));
	sd->l1.disk_size = sn->info.disk_size;
	sd->l1.what = sd->what;
	pthread_mutex_init(&sd->load_lock, NULL);
	atomic_init(&sd->loaded, 0);
	*out = bdev_new(&snap_ops, "snapshot", sn->info.disk_size, true, sd);
	return 0;
}
