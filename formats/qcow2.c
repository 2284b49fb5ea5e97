/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * qcow2: the header, its extensions and feature bits, and open/close.
 *
 * Every field is checked before it is used as an offset, a length or a
 * count: against qemu's limits (block/qcow2.h, qcow2_do_open) and against
 * the file size, in 64-bit arithmetic.  Opening reads the header, cluster 0
 * (extensions, backing name), the active L1 table and the snapshot table;
 * nothing else, so a 1 TiB image opens as fast as a small one.
 */
#include "qcow2-int.h"
#include "qcow2-write.h"
#include "formats.h"

#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>

#define DEFAULT_CACHE_BYTES (32ull << 20) /* qemu's L2 cache default on Linux */
#define MAX_WARNINGS 64

bool qcow2_probe(const void *buf, size_t len)
{
	return len >= 4 && be32(buf) == QCOW2_MAGIC;
}

uint64_t qcow2_size_to_l1(const struct qcow2 *s, uint64_t size)
{
	unsigned shift = s->cluster_bits + s->l2_bits;

	return (size >> shift) + ((size & ((1ull << shift) - 1)) != 0);
}

int qcow2_damage(struct qcow2 *s, uint64_t key, const char *fmt, ...)
{
	char line[400];
	bool seen = false;
	unsigned n;
	va_list ap;

	/* A damaged image is read over and over by a guest or a copy tool:
	 * say what is wrong once per damaged spot, and not without end. */
	pthread_mutex_lock(&s->damage_lock);
	for (unsigned i = 0; i < MIN(s->damage_logged, ARRAY_SIZE(s->damage_seen)); i++)
		seen |= s->damage_seen[i] == key;
	n = s->damage_logged;
	if (!seen && n <= MAX_WARNINGS) {
		s->damage_seen[n % ARRAY_SIZE(s->damage_seen)] = key;
		s->damage_logged++;
	}
	pthread_mutex_unlock(&s->damage_lock);
	if (seen || n > MAX_WARNINGS)
		return -EIO;
	va_start(ap, fmt);
	vsnprintf(line, sizeof(line), fmt, ap);
	va_end(ap);
	if (n == MAX_WARNINGS)
		log_warn("%s: further damage reports suppressed", s->path);
	else
		log_warn("%s: %s: reading it fails with EIO", s->path, line);
	return -EIO;
}

int qcow2_check_l1(const struct qcow2 *s, uint64_t offset, uint64_t entries,
		   const char *what, struct err *e)
{
	/* qcow2_validate_table(): size capped before multiplying, offset
	 * cluster-aligned, and (ours) the table must lie inside the file. */
	if (entries > QCOW2_MAX_L1_BYTES / 8)
		return err_set(e, -EFBIG, "%s: %s has %" PRIu64 " entries (at most %" PRIu64 ")",
			       s->path, what, entries, QCOW2_MAX_L1_BYTES / 8);
	if (entries && offset == 0)
		return err_set(e, -EINVAL, "%s: %s overlaps the header (offset 0)", s->path, what);
	if (entries && !is_aligned(offset, s->cluster_size))
		return err_set(e, -EINVAL, "%s: %s offset 0x%" PRIx64 " is not cluster-aligned",
			       s->path, what, offset);
	if (entries && range_exceeds(offset, entries * 8, qcow2_file_size(s->file)))
		return err_set(e, -EINVAL, "%s: %s at 0x%" PRIx64 " (%" PRIu64 " entries) lies past the end of the file",
			       s->path, what, offset, entries);
	return 0;
}

int qcow2_load_l1(struct qcow2 *s, struct qcow2_l1 *l1, struct err *e)
{
	size_t bytes = (size_t)l1->size * 8;
	int r;

	l1->table = xmalloc(bytes ? bytes : 1);
	if (!bytes)
		return 0;
	r = bdev_pread(s->file, l1->table, bytes, l1->offset);
	if (r < 0)
		return err_set(e, r, "%s: cannot read the %s: %s", s->path, l1->what, strerror(-r));
	for (uint32_t i = 0; i < l1->size; i++)
		l1->table[i] = be64(&l1->table[i]);
	return 0;
}

/* Strings from the image go into messages: no control characters. */
static void printable(char *str)
{
	for (; *str; str++)
		if ((unsigned char)*str < 0x20 || *str == 0x7f)
			*str = '?';
}

/* Name an incompatible feature bit from the image's feature name table. */
static void feature_name(const struct qcow2 *s, unsigned bit, char *out, size_t outlen)
{
	for (uint32_t i = 0; i + 48 <= s->feature_names_len; i += 48) {
		const char *ent = s->feature_names + i;

		if (ent[0] == 0 /* incompatible */ && (unsigned char)ent[1] == bit) {
			snprintf(out, outlen, " (%.46s)", ent + 2);
			printable(out);
			return;
		}
	}
	out[0] = 0;
}

static char *ext_string(const uint8_t *p, uint32_t len)
{
	char *str = xmalloc(len + 1);

	memcpy(str, p, len);
	str[len] = 0;
	return str;
}

/* § "Bitmaps extension": only meaningful while autoclear bit 0 is set. */
static int check_bitmaps_ext(const struct qcow2 *s, const uint8_t *p, uint32_t len,
			     struct err *e)
{
	uint32_t nb;
	uint64_t dir_size, dir_off;

	if (!(s->autoclear & QCOW2_AUTOCLEAR_BITMAPS))
		return 0; /* stale: qemu ignores (and later drops) it */
	if (len != 24)
		return err_set(e, -EINVAL, "%s: bitmaps extension has length %u (24 expected)",
			       s->path, len);
	nb = be32(p);
	dir_size = be64(p + 8);
	dir_off = be64(p + 16);
	if (nb == 0 || nb > 65535 || be32(p + 4))
		return err_set(e, -EINVAL, "%s: bitmaps extension: invalid bitmap count %u or reserved field",
			       s->path, nb);
	if (!is_aligned(dir_off, s->cluster_size) || dir_size > 1024ull * 65535 ||
	    range_exceeds(dir_off, dir_size, qcow2_file_size(s->file)))
		return err_set(e, -EINVAL, "%s: bitmaps extension: invalid bitmap directory (offset 0x%" PRIx64 ", %" PRIu64 " bytes)",
			       s->path, dir_off, dir_size);
	return 0;
}

/*
 * Header extensions (§ "Header extensions"): from the end of the header to
 * the backing file name (or the end of cluster 0), each {magic, len, data}
 * padded to 8 bytes, ending at magic 0.
 */
static int parse_extensions(struct qcow2 *s, const uint8_t *c0, uint64_t c0_len,
			    uint64_t end, struct err *e)
{
	uint64_t off = s->header_length;
	int r;

	while (off < end) {
		uint32_t magic, len;

		if (end - off < 8)
			return err_set(e, -EINVAL, "%s: header extension at 0x%" PRIx64 " is truncated",
				       s->path, off);
		if (off + 8 > c0_len)
			return err_set(e, -EINVAL, "%s: header extensions run past the end of the file",
				       s->path);
		magic = be32(c0 + off);
		len = be32(c0 + off + 4);
		off += 8;
		if (magic == QCOW2_EXT_END)
			return 0;
		if (len > end - off || off + len > c0_len)
			return err_set(e, -EINVAL, "%s: header extension 0x%08x is too large (%u bytes at 0x%" PRIx64 ")",
				       s->path, magic, len, off);
		switch (magic) {
		case QCOW2_EXT_BACKING_FMT:
			if (len >= 16 || s->backing_fmt)
				return err_set(e, -EINVAL, "%s: invalid backing format extension (length %u)",
					       s->path, len);
			s->backing_fmt = ext_string(c0 + off, len);
			break;
		case QCOW2_EXT_DATA_FILE:
			if (s->data_file_name || len == 0 || memchr(c0 + off, 0, len))
				return err_set(e, -EINVAL, "%s: invalid data file name extension (length %u)",
					       s->path, len);
			s->data_file_name = ext_string(c0 + off, len);
			break;
		case QCOW2_EXT_FEATURES:
			if (!s->feature_names) {
				s->feature_names = (char *)ext_string(c0 + off, len);
				s->feature_names_len = len;
			}
			break;
		case QCOW2_EXT_CRYPTO:
			/* only meaningful with crypt_method 2, which we refuse */
			break;
		case QCOW2_EXT_BITMAPS:
			/* Persistent bitmaps are not used for reading (a later write
			 * path must clear autoclear bit 0 before its first write),
			 * but a malformed extension is refused as qemu does. */
			r = check_bitmaps_ext(s, c0 + off, len, e);
			if (r < 0)
				return r;
			break;
		default: {
			struct qcow2_ext *x;

			s->exts = realloc(s->exts, (s->nexts + 1) * sizeof(*s->exts));
			if (!s->exts)
				abort();
			x = &s->exts[s->nexts++];
			x->magic = magic;
			x->len = len;
			x->data = xmalloc(len ? len : 1);
			memcpy(x->data, c0 + off, len);
			break;
		}
		}
		off += align_up(len, 8);
	}
	return 0;
}

/* The fixed header (§ "Header"): fields, feature bits, limits. */
static int parse_header(struct qcow2 *s, const uint8_t *h, uint64_t avail, struct err *e)
{
	uint64_t fsize = qcow2_file_size(s->file);
	uint64_t unknown;
	char fname[64];

	if (avail < 72 || be32(h) != QCOW2_MAGIC)
		return err_set(e, -EINVAL, "%s: not a qcow2 image (bad magic or truncated header)", s->path);
	s->version = be32(h + 4);
	if (s->version != 2 && s->version != 3)
		return err_set(e, -ENOTSUP, "%s: unsupported qcow2 version %u (2 and 3 are)",
			       s->path, s->version);
	s->cluster_bits = be32(h + 20);
	if (s->cluster_bits < QCOW2_MIN_CLUSTER_BITS || s->cluster_bits > QCOW2_MAX_CLUSTER_BITS)
		return err_set(e, -EINVAL, "%s: unsupported cluster_bits %u (9..21: 512 B to 2 MiB)",
			       s->path, s->cluster_bits);
	s->cluster_size = 1ull << s->cluster_bits;
	s->size = be64(h + 24);
	s->crypt_method = be32(h + 32);
	s->l1.size = be32(h + 36);
	s->l1.offset = be64(h + 40);
	s->refcount_table_offset = be64(h + 48);
	s->refcount_table_clusters = be32(h + 56);
	s->nb_snapshots = be32(h + 60);
	s->snapshots_offset = be64(h + 64);

	if (s->version == 2) {
		s->header_length = 72;
		s->refcount_order = 4;
		s->compression_type = QCOW2_COMPRESS_ZLIB;
	} else {
		if (avail < 104)
			return err_set(e, -EINVAL, "%s: qcow2 v3 header is truncated", s->path);
		s->incompat = be64(h + 72);
		s->compat = be64(h + 80);
		s->autoclear = be64(h + 88);
		s->refcount_order = be32(h + 96);
		s->header_length = be32(h + 100);
		if (s->header_length < 104 || s->header_length > s->cluster_size)
			return err_set(e, -EINVAL, "%s: invalid header_length %u (104..%" PRIu64 ")",
				       s->path, s->header_length, s->cluster_size);
		if (s->header_length > fsize)
			return err_set(e, -EINVAL, "%s: header_length %u runs past the end of the file",
				       s->path, s->header_length);
		/* byte 104 exists iff the header is longer than 104 bytes */
		s->compression_type = s->header_length > 104 ? h[104] : QCOW2_COMPRESS_ZLIB;
	}

	unknown = s->incompat & ~QCOW2_INCOMPAT_KNOWN;
	if (unknown) {
		unsigned bit = (unsigned)__builtin_ctzll(unknown);
		uint64_t bf_off = be64(h + 8);
		struct err ignored = { 0 };

		/* name the feature from the image's own table if it has one */
		parse_extensions(s, h, avail, bf_off && bf_off < s->cluster_size ?
				 bf_off : MIN(s->cluster_size, avail), &ignored);
		feature_name(s, bit, fname, sizeof(fname));
		return err_set(e, -ENOTSUP, "%s: unknown incompatible feature bit %u%s (incompatible_features 0x%" PRIx64 "); refusing to open",
			       s->path, bit, fname, s->incompat);
	}
	if (s->crypt_method)
		return err_set(e, -ENOTSUP, "%s: encrypted image (crypt_method %u%s) is not supported",
			       s->path, s->crypt_method,
			       s->crypt_method == 1 ? ", AES" : s->crypt_method == 2 ? ", LUKS" : ", unknown");
	if (s->refcount_order > 6)
		return err_set(e, -EINVAL, "%s: invalid refcount_order %u (0..6)",
			       s->path, s->refcount_order);
	if (s->compression_type > QCOW2_COMPRESS_ZSTD)
		return err_set(e, -ENOTSUP, "%s: unknown compression_type %u", s->path, s->compression_type);
	if ((s->compression_type != QCOW2_COMPRESS_ZLIB) != !!(s->incompat & QCOW2_INCOMPAT_COMPRESSION))
		return err_set(e, -EINVAL, "%s: compression_type %u disagrees with incompatible bit 3",
			       s->path, s->compression_type);

	s->extended_l2 = s->incompat & QCOW2_INCOMPAT_EXTL2;
	s->l2_entry_size = s->extended_l2 ? 16 : 8;
	s->l2_bits = s->cluster_bits - (s->extended_l2 ? 4 : 3);
	s->subcluster_bits = s->cluster_bits - (s->extended_l2 ? 5 : 0);
	if (s->extended_l2 && s->subcluster_bits < 9)
		return err_set(e, -EINVAL, "%s: extended L2 needs clusters of at least 16 KiB (cluster_bits %u)",
			       s->path, s->cluster_bits);

	/* size: bounded by the L1 limit (qemu: "Image is too big") */
	if (s->size > INT64_MAX || qcow2_size_to_l1(s, s->size) > QCOW2_MAX_L1_BYTES / 8)
		return err_set(e, -EFBIG, "%s: virtual size %" PRIu64 " is too big", s->path, s->size);
	if (s->l1.size < qcow2_size_to_l1(s, s->size))
		return err_set(e, -EINVAL, "%s: L1 table is too small (%u entries for size %" PRIu64 ")",
			       s->path, s->l1.size, s->size);

	/* refcount table: only validated, reading does not use it */
	if (s->refcount_table_clusters == 0)
		return err_set(e, -EINVAL, "%s: refcount table is empty", s->path);
	if ((uint64_t)s->refcount_table_clusters << s->cluster_bits > QCOW2_MAX_REFTABLE_BYTES)
		return err_set(e, -EFBIG, "%s: refcount table too large (%u clusters)",
			       s->path, s->refcount_table_clusters);
	if (s->refcount_table_offset == 0 || !is_aligned(s->refcount_table_offset, s->cluster_size) ||
	    range_exceeds(s->refcount_table_offset,
			  (uint64_t)s->refcount_table_clusters << s->cluster_bits, INT64_MAX))
		return err_set(e, -EINVAL, "%s: invalid refcount table offset 0x%" PRIx64,
			       s->path, s->refcount_table_offset);
	/* qemu always writes the whole table; one past EOF is damage */
	if (range_exceeds(s->refcount_table_offset,
			  (uint64_t)s->refcount_table_clusters << s->cluster_bits, fsize))
		return err_set(e, -EINVAL, "%s: refcount table at 0x%" PRIx64 " (%u clusters) lies past the end of the file",
			       s->path, s->refcount_table_offset, s->refcount_table_clusters);

	if (s->nb_snapshots > QCOW2_MAX_SNAPSHOTS)
		return err_set(e, -EFBIG, "%s: too many snapshots (%u, at most %u)",
			       s->path, s->nb_snapshots, QCOW2_MAX_SNAPSHOTS);
	if (s->nb_snapshots && (s->snapshots_offset == 0 || /* the header */
				!is_aligned(s->snapshots_offset, s->cluster_size) ||
				s->snapshots_offset >= fsize))
		return err_set(e, -EINVAL, "%s: invalid snapshot table offset 0x%" PRIx64,
			       s->path, s->snapshots_offset);

	s->l1.disk_size = s->size;
	s->l1.what = "active L1 table";
	return qcow2_check_l1(s, s->l1.offset, s->l1.size, "active L1 table", e);
}

/*
 * The header cluster, the active L1, the refcount table and the snapshot
 * table never share a cluster in an image qemu wrote.  One that makes them
 * overlap is hostile: a write through one would rewrite the other (qemu's
 * overlap check, iotest 060, refuses such writes at run time; we refuse the
 * image at open, so neither reads nor a later write path ever meet it).
 */
static int check_metadata_overlap(const struct qcow2 *s, struct err *e)
{
	struct { const char *what; uint64_t off, len; } m[4] = {
		{ "the header", 0, s->cluster_size },
		{ "the active L1 table", s->l1.offset, (uint64_t)s->l1.size * 8 },
		{ "the refcount table", s->refcount_table_offset,
		  (uint64_t)s->refcount_table_clusters << s->cluster_bits },
		{ "the snapshot table", s->snapshots_offset, s->snapshots_size },
	};

	/* all offsets are cluster-aligned and inside the file (checked): whole
	 * clusters, so round the lengths up */
	for (unsigned i = 0; i < ARRAY_SIZE(m); i++)
		m[i].len = align_up(m[i].len, s->cluster_size);
	for (unsigned i = 0; i < ARRAY_SIZE(m); i++)
		for (unsigned j = i + 1; j < ARRAY_SIZE(m); j++)
			if (m[i].len && m[j].len && m[i].off < m[j].off + m[j].len &&
			    m[j].off < m[i].off + m[i].len)
				return err_set(e, -EINVAL, "%s: %s (at 0x%" PRIx64 ") overlaps %s (at 0x%" PRIx64 ")",
					       s->path, m[j].what, m[j].off, m[i].what, m[i].off);
	return 0;
}

/* Feature bits that depend on extensions (data file) and the backing name. */
static int parse_cluster0(struct qcow2 *s, struct err *e)
{
	uint64_t fsize = qcow2_file_size(s->file);
	uint64_t c0_len = MIN(4096, fsize);
	uint64_t bf_off, end;
	uint32_t bf_len;
	uint8_t *c0 = xmalloc(MAX(c0_len, 1));
	int r;

	/* the fixed header first; then all of cluster 0 once its size is known */
	r = bdev_pread(s->file, c0, c0_len, 0);
	if (r < 0) {
		err_set(e, r, "%s: cannot read the header: %s", s->path, strerror(-r));
		goto out;
	}
	r = parse_header(s, c0, c0_len, e);
	if (r < 0)
		goto out;
	if (MIN(s->cluster_size, fsize) > c0_len) {
		c0_len = MIN(s->cluster_size, fsize);
		free(c0);
		c0 = xmalloc(c0_len);
		r = bdev_pread(s->file, c0, c0_len, 0);
		if (r < 0) {
			err_set(e, r, "%s: cannot read the header: %s", s->path, strerror(-r));
			goto out;
		}
	}

	bf_off = be64(c0 + 8);
	bf_len = be32(c0 + 16);
	if (bf_off > s->cluster_size) {
		r = err_set(e, -EINVAL, "%s: invalid backing file offset 0x%" PRIx64, s->path, bf_off);
		goto out;
	}
	if (bf_off && (bf_len > QCOW2_MAX_BACKING_NAME || bf_len > s->cluster_size - bf_off)) {
		r = err_set(e, -EINVAL, "%s: backing file name too long (%u bytes)", s->path, bf_len);
		goto out;
	}
	if (bf_off && bf_off + bf_len > c0_len) {
		r = err_set(e, -EINVAL, "%s: backing file name lies past the end of the file", s->path);
		goto out;
	}
	if (bf_off && bf_off < s->header_length) {
		r = err_set(e, -EINVAL, "%s: backing file name overlaps the header (offset %" PRIu64 ")",
			    s->path, bf_off);
		goto out;
	}

	/* v2 images have extensions too (qemu writes the backing format) */
	end = bf_off ? bf_off : s->cluster_size;
	r = parse_extensions(s, c0, c0_len, end, e);
	if (r < 0)
		goto out;
	if (bf_off && bf_len) {
		if (memchr(c0 + bf_off, 0, bf_len)) {
			r = err_set(e, -EINVAL, "%s: backing file name holds a NUL byte", s->path);
			goto out;
		}
		s->backing_name = ext_string(c0 + bf_off, bf_len);
	}

	/* Feature rules that involve extensions (§ "Header", bits 2 and 1). */
	if ((s->autoclear & QCOW2_AUTOCLEAR_DATA_RAW) && !(s->incompat & QCOW2_INCOMPAT_DATA_FILE)) {
		r = err_set(e, -EINVAL, "%s: data-file-raw requires a data file", s->path);
		goto out;
	}
	if ((s->incompat & QCOW2_INCOMPAT_DATA_FILE) && !s->data_file_name) {
		r = err_set(e, -EINVAL, "%s: image needs an external data file but does not name one",
			    s->path);
		goto out;
	}
	if (!(s->incompat & QCOW2_INCOMPAT_DATA_FILE) && s->data_file_name) {
		log_warn("%s: ignoring a data file name without incompatible bit 2", s->path);
		free(s->data_file_name);
		s->data_file_name = NULL;
	}
	if ((s->incompat & QCOW2_INCOMPAT_CORRUPT) && s->writable) {
		r = err_set(e, -EROFS, "%s: image is marked corrupt; it can only be opened read-only "
			    "(repair it with qemu-img check -r all)", s->path);
		goto out;
	}
	r = 0;
out:
	free(c0);
	return r;
}

static int open_data_file(struct qcow2 *s, struct open_ctx *ctx, struct err *e)
{
	unsigned flags = s->writable ? FILE_WRITABLE : 0;
	char *path;
	int r;

	path = image_resolve_name(s->path, s->data_file_name, "data file", e);
	if (!path)
		return e && e->code ? e->code : -EINVAL;
	if (ctx && ctx->opts && ctx->opts->force_share)
		flags |= FILE_NO_LOCK;
	r = file_open(path, flags, &s->data_file, e);
	free(path);
	if (r < 0)
		return r;
	s->data = s->data_file;
	return 0;
}

static int open_backing(struct qcow2 *s, struct open_ctx *ctx, struct err *e)
{
	static const struct image_opts default_opts;
	struct open_ctx child;
	char *path;
	int r;

	if (ctx && ctx->opts && ctx->opts->no_backing)
		return 0; /* unallocated reads as zeroes */
	if (s->backing_fmt && strcmp(s->backing_fmt, "raw") && strcmp(s->backing_fmt, "qcow2")) {
		char fmt[16];

		snprintf(fmt, sizeof(fmt), "%s", s->backing_fmt);
		printable(fmt);
		return err_set(e, -ENOTSUP, "%s: backing file format '%s' is not supported (raw and qcow2 are)",
			       s->path, fmt);
	}
	path = image_resolve_name(s->path, s->backing_name, "backing file", e);
	if (!path)
		return e && e->code ? e->code : -EINVAL;
	/* Old images lack the backing format extension; qemu probes then, and
	 * so do we (open.c refuses raw data that looks like another format). */
	if (!s->backing_fmt)
		log_warn("%s: no backing format recorded; probing %s", s->path, path);
	if (ctx) {
		child = *ctx;
	} else {
		memset(&child, 0, sizeof(child));
		child.opts = &default_opts;
	}
	child.depth++;
	/* Backing files are always read-only; open.c bounds depth and loops. */
	r = image_open_dev(path, s->backing_fmt, false, &child, &s->backing, e);
	free(path);
	return r;
}

static void qcow2_free(struct qcow2 *s)
{
	if (!s)
		return;
	qcow2_writer_close(s); /* flush, then the dirty bit cleared */
	qcow2_snapshots_free(s);
	qcow2_cache_free(s->l2_cache);
	qcow2_zcache_free(s->zcache);
	bdev_close(s->backing);
	bdev_close(s->data_file);
	bdev_close(s->file);
	for (unsigned i = 0; i < s->nexts; i++)
		free(s->exts[i].data);
	free(s->exts);
	free(s->l1.table);
	free(s->backing_name);
	free(s->backing_fmt);
	free(s->data_file_name);
	free(s->feature_names);
	free(s->path);
	pthread_mutex_destroy(&s->damage_lock);
	free(s);
}

/* A read of the active disk: while the image is writable it counts as a
 * reader, since a discard may free what its L2 lookup found before it is read. */
static int read_active(struct qcow2 *s, void *buf, size_t len, uint64_t off, bool nowait)
{
	int (*rd)(struct qcow2 *, const struct qcow2_l1 *, void *, size_t, uint64_t) =
		nowait ? qcow2_read_nowait : qcow2_read;
	unsigned tag;
	int r;

	if (!s->w)
		return rd(s, &s->l1, buf, len, off);
	tag = qcow2_reader_enter(s->w);
	r = rd(s, &s->l1, buf, len, off);
	qcow2_reader_exit(s->w, tag);
	return r;
}

static int qcow2_dev_pread(struct bdev *d, void *buf, size_t len, uint64_t off)
{
	return read_active(d->priv, buf, len, off, false);
}

static int qcow2_dev_pread_nowait(struct bdev *d, void *buf, size_t len, uint64_t off)
{
	return read_active(d->priv, buf, len, off, true);
}

static int qcow2_dev_status(struct bdev *d, uint64_t off, uint64_t len,
			    uint64_t *run, unsigned *status, unsigned *depth)
{
	struct qcow2 *s = d->priv;

	return qcow2_status(s, &s->l1, off, len, run, status, depth);
}

static void qcow2_unpin(void *ctx, unsigned tag)
{
	qcow2_reader_exit(ctx, tag);
}

static int64_t qcow2_dev_map(struct bdev *d, uint64_t off, uint64_t len,
			     struct bdev_extents *x)
{
	struct qcow2 *s = d->priv;

	if (s->w) {
		/* the caller reads the host bytes later: it holds a reader's
		 * place until bdev_extents_release (only one per extents) */
		if (x->unpin)
			return 0;
		x->pin_tag = qcow2_reader_enter(s->w);
		x->pin_ctx = s->w;
		x->unpin = qcow2_unpin;
	}
	return qcow2_map(s, &s->l1, off, len, x);
}

static void qcow2_dev_close(struct bdev *d)
{
	qcow2_free(d->priv);
}

/* Writes (qcow2-write.c) reach these only on a writable open: the bdev
 * wrappers refuse them on a read-only device. */
static const struct bdev_ops qcow2_ops = {
	.pread = qcow2_dev_pread,
	.pread_nowait = qcow2_dev_pread_nowait,
	.pwrite = qcow2_dev_pwrite,
	.zero = qcow2_dev_zero,
	.discard = qcow2_dev_discard,
	.flush = qcow2_dev_flush,
	.block_status = qcow2_dev_status,
	.close = qcow2_dev_close,
	.resize = qcow2_dev_resize,
	.map = qcow2_dev_map,
};

int qcow2_open(struct bdev *file, const char *path, bool writable,
	       struct open_ctx *ctx, struct bdev **out, struct err *e)
{
	struct qcow2 *s = xcalloc(1, sizeof(*s));
	uint64_t cache_bytes = DEFAULT_CACHE_BYTES;
	struct bdev *d;
	int r;

	s->path = xstrdup(path);
	s->file = file;
	s->data = file;
	s->writable = writable;
	pthread_mutex_init(&s->damage_lock, NULL);

	r = parse_cluster0(s, e);
	if (r < 0)
		goto fail;
	r = qcow2_load_l1(s, &s->l1, e);
	if (r < 0)
		goto fail;
	r = qcow2_snapshots_load(s, e);
	if (r < 0)
		goto fail;
	r = check_metadata_overlap(s, e);
	if (r < 0)
		goto fail;
	if (s->incompat & QCOW2_INCOMPAT_DATA_FILE) {
		r = open_data_file(s, ctx, e);
		if (r < 0)
			goto fail;
	}
	if (s->backing_name) {
		r = open_backing(s, ctx, e);
		if (r < 0)
			goto fail;
	}

	/* L2 slices of at most 4 KiB, as qemu uses when the cache cannot
	 * cover the whole disk: a miss costs one small read. */
	s->slice_size = (uint32_t)MIN(s->cluster_size, 4096);
	if (ctx && ctx->opts && ctx->opts->cache_bytes)
		cache_bytes = ctx->opts->cache_bytes;
	s->l2_cache = qcow2_cache_new(s->file, s->slice_size, cache_bytes);
	s->zcache = qcow2_zcache_new(s->cluster_size);

	/* Without its backing file, a partial write would copy zeroes where
	 * the backing file has data: such an image is only read. */
	if (writable && s->backing_name && !s->backing) {
		log_warn("%s: --no-backing: opened read-only (writes would hide the backing file's data)", path);
		writable = false;
	}
	if (writable) {
		r = qcow2_writer_open(s, e);
		if (r < 0)
			goto fail;
	}
	if (!writable && (s->incompat & QCOW2_INCOMPAT_DIRTY))
		log_debug("%s: image is dirty (lazy refcounts); fine for reading", path);

	d = bdev_new(&qcow2_ops, "qcow2", s->size, !writable, s);
	*out = d;
	return 0;
fail:
	qcow2_free(s);
	return r;
}

struct qcow2 *qcow2_state(struct bdev *d)
{
	return d && d->ops == &qcow2_ops ? d->priv : NULL;
}

const char *qcow2_backing_name(struct bdev *d)
{
	struct qcow2 *s = qcow2_state(d);

	return s ? s->backing_name : NULL;
}
