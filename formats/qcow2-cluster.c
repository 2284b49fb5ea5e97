/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * qcow2 guest-to-host mapping (§ "Cluster mapping", § "Extended L2 Entries")
 * and the read path built on it.
 *
 * A guest range is cut into runs: maximal stretches of (sub)clusters of one
 * type inside one L2 slice — contiguous host data, zeroes, unallocated, or
 * one compressed cluster.  Both reads and block status walk these runs, so
 * they can never disagree.  Everything here works over a struct qcow2_l1,
 * the active table or a snapshot's.
 *
 * Damage (bad entries, offsets outside the file, undecompressable data) is
 * -EIO for the request that meets it, logged; never zeroes or stale bytes.
 */
#include "qcow2-int.h"

#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>

#define MAX_RUN_ENTRIES 64            /* L2 entries copied out per lookup */
#define QCOW2_MAX_HOST_OFFSET ((1ull << 56) - 1)

enum qcow2_sc_type qcow2_l2_decode(const struct qcow2 *s, uint64_t entry,
				   uint64_t bitmap, unsigned sc, uint64_t *host,
				   const char **why)
{
	uint64_t off = entry & QCOW2_OFFSET_MASK;
	uint32_t alloc = (uint32_t)bitmap, zero = (uint32_t)(bitmap >> 32);
	bool has_host;

	*host = 0;
	*why = NULL;
	if (entry & QCOW2_OFLAG_COMPRESSED) {
		if (s->data_file) {
			*why = "compressed cluster in an image with an external data file";
			return QC_INVALID;
		}
		/* compressed clusters have no subclusters: the bitmap is reserved */
		if (s->extended_l2 && bitmap) {
			*why = "compressed cluster with a non-zero subcluster bitmap";
			return QC_INVALID;
		}
		return QC_COMPRESSED;
	}
	if (entry & QCOW2_L2E_RESERVED & ~QCOW2_OFLAG_ZERO) {
		*why = "reserved bits set in L2 entry";
		return QC_INVALID;
	}
	if ((entry & QCOW2_OFLAG_ZERO) && (s->version < 3 || s->extended_l2)) {
		/* v2 has no zero flag; extended L2 uses the bitmap instead */
		*why = "zero flag set where it is reserved";
		return QC_INVALID;
	}
	/* With an external data file, COPIED + offset 0 is host offset 0. */
	has_host = off || (s->data_file && (entry & QCOW2_OFLAG_COPIED));
	if (has_host && !is_aligned(off, s->cluster_size)) {
		*why = "unaligned host cluster offset";
		return QC_INVALID;
	}
	*host = off;
	if (!s->extended_l2) {
		if (entry & QCOW2_OFLAG_ZERO)
			return QC_ZERO;
		return has_host ? QC_NORMAL : QC_UNALLOC;
	}
	if (alloc & zero) {
		*why = "invalid subcluster bitmap (allocated and zero)";
		return QC_INVALID;
	}
	if (!has_host && alloc) {
		*why = "invalid subcluster bitmap (allocated without a host cluster)";
		return QC_INVALID;
	}
	if (alloc >> sc & 1)
		return QC_NORMAL;
	if (zero >> sc & 1)
		return QC_ZERO;
	/* UNALLOCATED_ALLOC too: the host cluster holds nothing for it yet */
	return QC_UNALLOC;
}

void qcow2_compressed_decode(unsigned cluster_bits, uint64_t entry,
			     uint64_t *coffset, uint64_t *csize)
{
	unsigned x = 62 - (cluster_bits - 8);
	uint64_t nsec = ((entry >> x) & ((1ull << (cluster_bits - 8)) - 1)) + 1;

	*coffset = entry & ((1ull << x) - 1);
	*csize = nsec * 512 - (*coffset & 511);
}

struct run {
	enum qcow2_sc_type type;
	uint64_t len;     /* bytes from the requested offset */
	uint64_t host;    /* QC_NORMAL: host offset of the first byte */
	uint64_t entry;   /* QC_COMPRESSED: the descriptor */
	uint64_t where;   /* file offset of its L2 entry: names damage once */
};

/* Bytes from off to the end of the range one L1 entry maps, capped by len. */
static uint64_t to_l1_end(const struct qcow2 *s, uint64_t off, uint64_t len)
{
	uint64_t span = 1ull << (s->cluster_bits + s->l2_bits);

	return MIN(len, span - (off & (span - 1)));
}

int qcow2_l1_lookup(struct qcow2 *s, const struct qcow2_l1 *l1, uint64_t idx,
		    uint64_t *l2_off)
{
	uint64_t e;

	*l2_off = 0;
	/* entries past the table (a snapshot L1 shorter than its disk, §
	 * "Snapshots") are unallocated, as in qemu */
	if (idx >= l1->size)
		return 0;
	e = l1->table[idx];
	*l2_off = e & QCOW2_OFFSET_MASK;
	if (e & QCOW2_L1E_RESERVED)
		return qcow2_damage(s, l1->offset + idx * 8, "%s entry %" PRIu64 " has reserved bits set (0x%016" PRIx64 ")",
				    l1->what, idx, e);
	if (!*l2_off)
		return 0;
	if (!is_aligned(*l2_off, s->cluster_size))
		return qcow2_damage(s, l1->offset + idx * 8, "%s entry %" PRIu64 ": L2 table offset 0x%" PRIx64 " is unaligned",
				    l1->what, idx, *l2_off);
	if (range_exceeds(*l2_off, s->cluster_size, qcow2_file_size(s->file)))
		return qcow2_damage(s, l1->offset + idx * 8, "%s entry %" PRIu64 ": L2 table at 0x%" PRIx64 " lies past the end of the file",
				    l1->what, idx, *l2_off);
	return 0;
}

/* The run starting at guest offset off, at most len bytes (len > 0);
 * nowait: -EAGAIN if its L2 slice is not in the cache. */
static int map_run_from(struct qcow2 *s, const struct qcow2_l1 *l1, uint64_t off,
			uint64_t len, struct run *run, bool nowait)
{
	uint8_t ents[MAX_RUN_ENTRIES * 16];
	uint64_t l2_off, cl = off >> s->cluster_bits;
	uint64_t l2_idx = cl & ((1ull << s->l2_bits) - 1);
	uint32_t per_slice = s->slice_size / s->l2_entry_size;
	uint64_t in_slice = l2_idx % per_slice;
	uint64_t end, pos, n;
	int r;

	memset(run, 0, sizeof(*run));
	r = qcow2_l1_lookup(s, l1, off >> (s->cluster_bits + s->l2_bits), &l2_off);
	if (r < 0)
		return r;
	if (!l2_off) {
		run->type = QC_UNALLOC;
		run->len = to_l1_end(s, off, len);
		return 0;
	}

	/* Copy out the entries this run may use: up to the slice end. */
	end = off + len;
	n = ((end - 1) >> s->cluster_bits) - cl + 1;
	n = MIN(n, MIN(per_slice - in_slice, MAX_RUN_ENTRIES));
	end = MIN(end, (cl + n) << s->cluster_bits);
	r = (nowait ? qcow2_cache_peek : qcow2_cache_read)(s->l2_cache,
			l2_off + (l2_idx - in_slice) * s->l2_entry_size,
			(uint32_t)(in_slice * s->l2_entry_size), ents,
			(uint32_t)(n * s->l2_entry_size));
	if (r < 0)
		return r;

	for (pos = off; pos < end;) {
		uint64_t c = (pos >> s->cluster_bits) - cl;
		uint64_t where = l2_off + (l2_idx + c) * s->l2_entry_size;
		const uint8_t *ep = ents + c * s->l2_entry_size;
		uint64_t entry = be64(ep), bitmap = s->extended_l2 ? be64(ep + 8) : 0;
		unsigned sc = (unsigned)((pos & (s->cluster_size - 1)) >> s->subcluster_bits);
		uint64_t unit = 1ull << s->subcluster_bits;
		uint64_t host, next;
		enum qcow2_sc_type t;
		const char *why;

		t = qcow2_l2_decode(s, entry, bitmap, sc, &host, &why);
		if (t == QC_COMPRESSED)
			unit = s->cluster_size;
		next = MIN(align_down(pos, unit) + unit, end);
		host += pos & (s->cluster_size - 1);

		if (t == QC_NORMAL && s->data_file &&
		    host != pos) {
			t = QC_INVALID;
			why = "data file cluster offset differs from the guest offset";
		}
		if (t == QC_INVALID) {
			if (pos > off)
				break; /* report it when the caller gets there */
			return qcow2_damage(s, where, "guest offset 0x%" PRIx64 " (%s, L2 entry 0x%016" PRIx64 "%s): %s",
					    pos, l1->what, entry,
					    s->extended_l2 ? ", extended" : "", why);
		}
		if (pos == off) {
			run->type = t;
			run->host = host;
			run->entry = entry;
			run->where = where;
		} else if (t != run->type || t == QC_COMPRESSED ||
			   (t == QC_NORMAL && host != run->host + (pos - off))) {
			break;
		}
		pos = next;
		if (t == QC_COMPRESSED)
			break;
	}
	run->len = pos - off;
	return 0;
}

static int map_run(struct qcow2 *s, const struct qcow2_l1 *l1, uint64_t off,
		   uint64_t len, struct run *run)
{
	return map_run_from(s, l1, off, len, run, false);
}

/* Unallocated: the backing file where it has bytes, zeroes past its end. */
static int read_backing(struct qcow2 *s, uint8_t *p, uint64_t len, uint64_t off,
			bool nowait)
{
	uint64_t bsize = s->backing ? s->backing->size : 0;
	uint64_t n = off < bsize ? MIN(len, bsize - off) : 0;
	int r;

	if (n) {
		r = (nowait ? bdev_pread_nowait : bdev_pread)(s->backing, p, n, off);
		if (r < 0)
			return r;
	}
	memset(p + n, 0, len - n);
	return 0;
}

static int read_host(struct qcow2 *s, uint8_t *p, uint64_t len, uint64_t host,
		     uint64_t guest, uint64_t where, bool nowait)
{
	uint64_t fsize = qcow2_file_size(s->data);
	uint64_t n;
	int r;

	/* In the image file, data past EOF is damage (qemu always writes whole
	 * (sub)clusters); an external data file is a raw image, and a raw
	 * image reads zeroes past its end. */
	if (s->data == s->file && range_exceeds(host, len, fsize))
		return qcow2_damage(s, where, "guest offset 0x%" PRIx64 " maps to host offset 0x%" PRIx64
				    ", past the end of the file (%" PRIu64 " bytes)", guest, host, fsize);
	n = host < fsize ? MIN(len, fsize - host) : 0;
	if (n) {
		r = (nowait ? bdev_pread_nowait : bdev_pread)(s->data, p, n, host);
		if (r < 0)
			return r;
	}
	memset(p + n, 0, len - n);
	return 0;
}

/* Decompress the whole cluster for descriptor entry into cbuf. */
static int read_compressed(struct qcow2 *s, uint64_t entry, uint8_t *cbuf, uint64_t guest,
			   uint64_t where)
{
	uint64_t fsize = qcow2_file_size(s->file);
	uint64_t coff, csize, n;
	uint8_t *src;
	int r;

	qcow2_compressed_decode(s->cluster_bits, entry, &coff, &csize);
	if (coff > QCOW2_MAX_HOST_OFFSET || coff < s->cluster_size || coff >= fsize)
		return qcow2_damage(s, where, "guest offset 0x%" PRIx64 ": compressed cluster at host offset 0x%" PRIx64
				    " is outside the file", guest, coff);
	/* qemu pads the file only to a sector: the last sectors may be short */
	n = MIN(csize, fsize - coff);
	src = xmalloc(n);
	r = bdev_pread(s->file, src, n, coff);
	if (r == 0 && qcow2_decompress(s->compression_type, cbuf, s->cluster_size, src, n) < 0)
		r = qcow2_damage(s, where, "guest offset 0x%" PRIx64 ": compressed cluster at host offset 0x%" PRIx64
				 " (%" PRIu64 " bytes) does not decompress to one cluster",
				 guest, coff, csize);
	free(src);
	return r;
}

static int read_from(struct qcow2 *s, const struct qcow2_l1 *l1, void *buf,
		     size_t len, uint64_t off, bool nowait)
{
	uint8_t *p = buf, *cbuf = NULL;
	int r = 0;

	while (len) {
		struct run run;

		r = map_run_from(s, l1, off, len, &run, nowait);
		if (r < 0)
			break;
		switch (run.type) {
		case QC_ZERO:
			memset(p, 0, run.len);
			break;
		case QC_UNALLOC:
			r = read_backing(s, p, run.len, off, nowait);
			break;
		case QC_NORMAL:
			r = read_host(s, p, run.len, run.host, off, run.where, nowait);
			break;
		case QC_COMPRESSED:
			if (nowait) {
				/* decompressing is work for a thread that may wait */
				if (!qcow2_zcache_get(s->zcache, run.entry, p,
						      off & (s->cluster_size - 1), run.len))
					r = -EAGAIN;
				break;
			}
			/* a whole cluster: decompress straight into the caller's
			 * buffer; nobody will ask for parts of it next */
			if (run.len == s->cluster_size) {
				r = read_compressed(s, run.entry, p, off, run.where);
				break;
			}
			/* reads smaller than a cluster come in a row: keep the
			 * last few decompressed clusters */
			if (qcow2_zcache_get(s->zcache, run.entry, p,
					     off & (s->cluster_size - 1), run.len))
				break;
			if (!cbuf)
				cbuf = xmalloc(s->cluster_size);
			r = read_compressed(s, run.entry, cbuf, off, run.where);
			if (r == 0) {
				memcpy(p, cbuf + (off & (s->cluster_size - 1)), run.len);
				qcow2_zcache_put(s->zcache, run.entry, cbuf);
			}
			break;
		case QC_INVALID:
			r = -EIO;
			break;
		}
		if (r < 0)
			break;
		p += run.len;
		off += run.len;
		len -= run.len;
	}
	free(cbuf);
	return r;
}

int qcow2_read(struct qcow2 *s, const struct qcow2_l1 *l1, void *buf,
	       size_t len, uint64_t off)
{
	return read_from(s, l1, buf, len, off, false);
}

int qcow2_read_nowait(struct qcow2 *s, const struct qcow2_l1 *l1, void *buf,
		      size_t len, uint64_t off)
{
	return read_from(s, l1, buf, len, off, true);
}

/* The backing file's bytes where it has them, zeroes past its end. */
static int64_t map_backing(struct qcow2 *s, uint64_t off, uint64_t len,
			   struct bdev_extents *x)
{
	uint64_t bsize = s->backing ? s->backing->size : 0;
	uint64_t n = off < bsize ? MIN(len, bsize - off) : 0;

	return bdev_extents_pad(x, n ? bdev_map(s->backing, off, n, x) : 0, n, len);
}

/* As read_host: the data file's bytes, zeroes past the end of an external
 * one; past the end of the image file is damage: map nothing. */
static int64_t map_host(struct qcow2 *s, uint64_t host, uint64_t len,
			struct bdev_extents *x)
{
	uint64_t fsize = qcow2_file_size(s->data);
	uint64_t n = host < fsize ? MIN(len, fsize - host) : 0;

	if (s->data == s->file && n < len)
		return 0;
	return bdev_extents_pad(x, n ? bdev_map(s->data, host, n, x) : 0, n, len);
}

/* Mappable: plain and zero clusters, and unallocated ones over a mappable
 * backing file; compressed clusters and damage end the mapping (the caller
 * reads those, and gets the error there). */
int64_t qcow2_map(struct qcow2 *s, const struct qcow2_l1 *l1, uint64_t off,
		  uint64_t len, struct bdev_extents *x)
{
	uint64_t done = 0;

	while (done < len) {
		struct run run;
		int64_t m;

		if (map_run(s, l1, off + done, len - done, &run) < 0)
			break;
		switch (run.type) {
		case QC_ZERO:
			m = bdev_extents_add(x, -1, 0, run.len) ? (int64_t)run.len : 0;
			break;
		case QC_UNALLOC:
			m = map_backing(s, off + done, run.len, x);
			break;
		case QC_NORMAL:
			m = map_host(s, run.host, run.len, x);
			break;
		default:
			return (int64_t)done;
		}
		if (m < 0)
			return m;
		done += (uint64_t)m;
		if ((uint64_t)m < run.len)
			break;
	}
	return (int64_t)done;
}

int qcow2_status(struct qcow2 *s, const struct qcow2_l1 *l1, uint64_t off,
		 uint64_t len, uint64_t *out_run, unsigned *status, unsigned *depth)
{
	struct run run;
	int r;

	r = map_run(s, l1, off, len, &run);
	if (r < 0)
		return r;
	*out_run = run.len;
	switch (run.type) {
	case QC_NORMAL:
	case QC_COMPRESSED:
		*status = 0;
		*depth = 1;
		return 0;
	case QC_ZERO:
		/* as qemu-nbd reports zero clusters: no data stored, reads zero */
		*status = BDEV_ST_HOLE | BDEV_ST_ZERO;
		*depth = 1;
		return 0;
	case QC_UNALLOC:
		break;
	case QC_INVALID:
		return -EIO;
	}
	if (s->backing && off < s->backing->size) {
		unsigned d = 0;

		r = bdev_block_status(s->backing, off, MIN(run.len, s->backing->size - off),
				      out_run, status, &d);
		if (r < 0)
			return r;
		*depth = d ? d + 1 : 0;
		return 0;
	}
	*status = BDEV_ST_HOLE | BDEV_ST_ZERO;
	*depth = 0;
	return 0;
}
