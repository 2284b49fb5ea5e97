/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * qcow2 write-path checks: the metadata overlap check run before writes
 * (qemu's "cached" template: header, active L1, refcount table and blocks,
 * snapshot table, active L2 tables, snapshot L1 tables), the corrupt bit,
 * and the refcount rebuild for an image left dirty.
 *
 * Trust nothing: an allocator that finds a free cluster the metadata set
 * knows, or a write that lands in metadata, means the image lies; the
 * corrupt bit is set and writing stops, reads stay up (qemu's
 * qcow2_signal_corruption).
 */
#include "qcow2-write.h"

#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>

/* ---- a small hash map: host cluster -> metadata classes ------------------ */

static size_t slot_of(const struct qcow2_mset *m, uint64_t key)
{
	return (size_t)((key * 0x9e3779b97f4a7c15ull) >> 17) & (m->cap - 1);
}

static void mset_grow(struct qcow2_mset *m)
{
	struct qcow2_mset n = { 0 };

	n.cap = m->cap ? m->cap * 2 : 1024;
	n.keys = xcalloc(n.cap, sizeof(*n.keys));
	n.vals = xcalloc(n.cap, 1);
	for (size_t i = 0; i < m->cap; i++) {
		size_t j;

		if (!m->keys[i] || !m->vals[i])
			continue;
		for (j = slot_of(&n, m->keys[i]); n.keys[j]; j = (j + 1) & (n.cap - 1))
			;
		n.keys[j] = m->keys[i];
		n.vals[j] = m->vals[i];
		n.used++;
	}
	free(m->keys);
	free(m->vals);
	*m = n;
}

void qcow2_mset_put(struct qcow2_mset *m, uint64_t cluster, unsigned cls)
{
	uint64_t key = cluster + 1;
	size_t j;

	if ((m->used + 1) * 2 > m->cap)
		mset_grow(m);
	for (j = slot_of(m, key); m->keys[j]; j = (j + 1) & (m->cap - 1))
		if (m->keys[j] == key) {
			m->vals[j] |= (uint8_t)cls;
			return;
		}
	m->keys[j] = key;
	m->vals[j] = (uint8_t)cls;
	m->used++;
}

void qcow2_mset_clear(struct qcow2_mset *m, uint64_t cluster, unsigned cls)
{
	uint64_t key = cluster + 1;

	if (!m->cap)
		return;
	/* the key stays (no tombstones needed); its classes go */
	for (size_t j = slot_of(m, key); m->keys[j]; j = (j + 1) & (m->cap - 1))
		if (m->keys[j] == key) {
			m->vals[j] &= (uint8_t)~cls;
			return;
		}
}

unsigned qcow2_mset_get(const struct qcow2_mset *m, uint64_t cluster)
{
	uint64_t key = cluster + 1;

	if (!m->cap)
		return 0;
	for (size_t j = slot_of(m, key); m->keys[j]; j = (j + 1) & (m->cap - 1))
		if (m->keys[j] == key)
			return m->vals[j];
	return 0;
}

void qcow2_mset_free(struct qcow2_mset *m)
{
	free(m->keys);
	free(m->vals);
	memset(m, 0, sizeof(*m));
}

static void mset_range(struct qcow2 *s, uint64_t off, uint64_t len, unsigned cls)
{
	if (!len)
		return;
	for (uint64_t c = off >> s->cluster_bits; c <= (off + len - 1) >> s->cluster_bits; c++)
		qcow2_mset_put(&s->w->meta, c, cls);
}

static uint64_t snapshot_table_bytes(const struct qcow2 *s)
{
	/* § "Snapshot table": the bytes the parser walked.  Not the sum of
	 * strlen(id) and strlen(name): a hostile ID or name may hold a NUL,
	 * and the protected range would then stop short of the table's end. */
	return s->snapshots_size;
}

/*
 * A snapshot's L1 table is only validated when its view is opened
 * (qcow2_check_l1): here its offset and size are still whatever the
 * snapshot table says.  Only the part inside the file can hold a table
 * to protect; without that bound, one entry claiming 3 G entries put
 * 50 Mi clusters into the set (1.7 GiB, 4 s) for a 5 KiB image, and a
 * few such entries exhaust memory at a writable open.
 */
static void mset_snapshot_l1(struct qcow2 *s, const struct qcow2_snap *sn)
{
	uint64_t fsize = qcow2_file_size(s->file), len = (uint64_t)sn->l1_size * 8;

	if (sn->l1_offset >= fsize)
		return;
	mset_range(s, sn->l1_offset, MIN(len, fsize - sn->l1_offset), QM_SNAP_L1);
}

int qcow2_meta_build(struct qcow2 *s, struct err *e)
{
	struct qcow2_writer *w = s->w;

	(void)e;
	qcow2_mset_put(&w->meta, 0, QM_HEADER);
	mset_range(s, s->l1.offset, (uint64_t)s->l1.size * 8, QM_L1);
	mset_range(s, w->rt_offset, (uint64_t)w->rt_clusters << s->cluster_bits, QM_REFTABLE);
	for (uint64_t i = 0; i < w->rt_entries; i++)
		if (w->reftable[i])
			qcow2_mset_put(&w->meta, w->reftable[i] >> s->cluster_bits, QM_REFBLOCK);
	if (s->nsnaps)
		mset_range(s, s->snapshots_offset, snapshot_table_bytes(s), QM_SNAPTABLE);
	for (unsigned i = 0; i < s->nsnaps; i++)
		mset_snapshot_l1(s, &s->snaps[i]);
	for (uint32_t i = 0; i < s->l1.size; i++) {
		uint64_t l2 = s->l1.table[i] & QCOW2_OFFSET_MASK;

		if (l2)
			qcow2_mset_put(&w->meta, l2 >> s->cluster_bits, QM_L2);
	}
	return 0;
}

int qcow2_signal_corruption(struct qcow2 *s, const char *fmt, ...)
{
	struct qcow2_writer *w = s->w;
	char line[300];
	va_list ap;
	uint8_t buf[8];

	va_start(ap, fmt);
	vsnprintf(line, sizeof(line), fmt, ap);
	va_end(ap);
	if (atomic_exchange(&w->corrupt, true))
		return -EIO;
	log_err("%s: image is corrupt: %s; marking it corrupt and refusing further writes "
		"(reads continue; repair with qemu-img check -r all)", s->path, line);
	if (s->version >= 3) {
		s->incompat |= QCOW2_INCOMPAT_CORRUPT;
		put_be64(buf, s->incompat);
		qcow2_header_write(s, 72, buf, 8);
	}
	return -EIO;
}

int qcow2_overlap_check(struct qcow2 *s, uint64_t off, uint64_t len, unsigned allowed)
{
	struct qcow2_writer *w = s->w;

	if (atomic_load(&w->corrupt))
		return -EIO;
	if (!len)
		return 0;
	for (uint64_t c = off >> s->cluster_bits; c <= (off + len - 1) >> s->cluster_bits; c++) {
		unsigned cls = c == 0 ? QM_HEADER : qcow2_mset_get(&w->meta, c);

		if (cls & ~allowed)
			return qcow2_signal_corruption(s, "a write to host offset 0x%" PRIx64
						       " (%" PRIu64 " bytes) would overwrite metadata (class 0x%x)",
						       off, len, cls & ~allowed);
	}
	return 0;
}

/* ---- refcount rebuild ----------------------------------------------------- */

struct refs {
	uint32_t *n;
	uint64_t count;
	int err;
};

static void ref_range(struct qcow2 *s, struct refs *rf, uint64_t off, uint64_t len)
{
	if (!len)
		return;
	for (uint64_t c = off >> s->cluster_bits; c <= (off + len - 1) >> s->cluster_bits; c++) {
		if (c >= rf->count) {
			log_err("%s: a reference to host offset 0x%" PRIx64 " lies past the end of the file",
				s->path, c << s->cluster_bits);
			rf->err = -EINVAL;
			return;
		}
		rf->n[c]++;
	}
}

static int ref_tree(struct qcow2 *s, struct refs *rf, const uint64_t *l1, uint32_t l1_size)
{
	uint8_t *l2 = xmalloc(s->cluster_size);
	uint64_t per = s->cluster_size / s->l2_entry_size;
	int r = 0;

	for (uint32_t i = 0; i < l1_size && !rf->err; i++) {
		uint64_t l2_off = l1[i] & QCOW2_OFFSET_MASK;

		if (!l2_off)
			continue;
		ref_range(s, rf, l2_off, s->cluster_size);
		if (rf->err)
			break;
		r = bdev_pread(s->file, l2, s->cluster_size, l2_off);
		if (r < 0)
			break;
		for (uint64_t j = 0; j < per; j++) {
			uint64_t ent = be64(l2 + j * s->l2_entry_size);

			if (ent & QCOW2_OFLAG_COMPRESSED) {
				uint64_t coff, csize;

				qcow2_compressed_decode(s->cluster_bits, ent, &coff, &csize);
				ref_range(s, rf, coff, csize);
			} else if ((ent & QCOW2_OFFSET_MASK) && !s->data_file) {
				ref_range(s, rf, ent & QCOW2_OFFSET_MASK, s->cluster_size);
			}
		}
	}
	free(l2);
	return r < 0 ? r : rf->err;
}

int qcow2_repair_refcounts(struct qcow2 *s, struct err *e)
{
	struct qcow2_writer *w = s->w;
	struct refs rf = { 0 };
	int r;

	rf.count = MAX(w->alloc_end, align_up(qcow2_file_size(s->file), s->cluster_size) >> s->cluster_bits);
	rf.n = xcalloc(rf.count, sizeof(*rf.n));
	ref_range(s, &rf, 0, s->cluster_size);
	ref_range(s, &rf, s->l1.offset, (uint64_t)s->l1.size * 8);
	r = ref_tree(s, &rf, s->l1.table, s->l1.size);
	for (unsigned i = 0; r == 0 && i < s->nsnaps; i++) {
		struct qcow2_l1 l1 = {
			.offset = s->snaps[i].l1_offset, .size = s->snaps[i].l1_size,
			.what = "snapshot L1 table",
		};

		r = qcow2_check_l1(s, l1.offset, l1.size, l1.what, e);
		if (r == 0)
			r = qcow2_load_l1(s, &l1, e);
		if (r == 0) {
			ref_range(s, &rf, l1.offset, (uint64_t)l1.size * 8);
			r = ref_tree(s, &rf, l1.table, l1.size);
		}
		free(l1.table);
	}
	if (r == 0 && s->nsnaps)
		ref_range(s, &rf, s->snapshots_offset, snapshot_table_bytes(s));
	if (r == 0)
		ref_range(s, &rf, w->rt_offset, (uint64_t)w->rt_clusters << s->cluster_bits);
	for (uint64_t i = 0; r == 0 && i < w->rt_entries; i++)
		if (w->reftable[i])
			ref_range(s, &rf, w->reftable[i], s->cluster_size);
	if (r == 0)
		r = rf.err;
	if (r < 0) {
		free(rf.n);
		return err_set(e, r, "%s: cannot repair the dirty image (%s); use qemu-img check -r all",
			       s->path, strerror(-r));
	}

	/* new refcount blocks go past every cluster counted here */
	w->repairing = true;
	w->alloc_end = MAX(w->alloc_end, rf.count);
	pthread_mutex_lock(&w->lock);
	for (uint64_t c = 0; r == 0 && c < rf.count; c++)
		r = qcow2_rc_set(s, c, rf.n[c]);
	/* clusters with refcounts past the file (stale) */
	for (uint64_t i = rf.count / w->rb_entries; r == 0 && i < w->rt_entries; i++) {
		uint64_t rc;

		if (!w->reftable[i])
			continue;
		for (uint64_t c = MAX(i * w->rb_entries, rf.count); r == 0 && c < (i + 1) * w->rb_entries; c++) {
			if (c >= w->alloc_end)
				break;
			r = qcow2_rc_get(s, c, &rc);
			if (r == 0 && rc && qcow2_mset_get(&w->meta, c) == 0)
				r = qcow2_rc_set(s, c, 0);
		}
	}
	if (r == 0)
		r = qcow2_meta_flush(s);
	w->repairing = false;
	w->free_hint = 1;
	pthread_mutex_unlock(&w->lock);
	free(rf.n);
	if (r < 0)
		return err_set(e, r, "%s: could not repair the dirty image: %s", s->path, strerror(-r));
	log_info("%s: image was not closed cleanly; refcounts rebuilt", s->path);
	return 0;
}
