/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Partition table parsers (formats/partition*.c): tables built byte by byte
 * in memory, including hostile ones, and real tables written by sfdisk and
 * sgdisk, checked against what `sfdisk --json` says about them.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <glib.h>
#include <glib/gstdio.h>
#include <zlib.h>

#include "bdev.h"
#include "partition.h"
#include "util.h"

#define SECTOR 512u

/* ------------------------------------------------------------------------ */
/* Two tiny devices: a buffer in memory, and a (sparse) file read with pread. */

struct mem_disk {
	uint8_t *buf;
	unsigned reads;  /* counts preads, to prove bounded work */
	uint64_t bad_off, bad_len;  /* reads touching this range fail with EIO */
};

static int mem_pread(struct bdev *d, void *buf, size_t len, uint64_t off)
{
	struct mem_disk *m = d->priv;

	m->reads++;
	if (m->bad_len && off < m->bad_off + m->bad_len && m->bad_off < off + len)
		return -EIO;
	memcpy(buf, m->buf + off, len);
	return 0;
}

static void mem_close(struct bdev *d)
{
	struct mem_disk *m = d->priv;

	g_free(m->buf);
	g_free(m);
}

static const struct bdev_ops mem_ops = {
	.pread = mem_pread,
	.close = mem_close,
};

/* A zeroed in-memory disk of nsect sectors; *buf points at its bytes. */
static struct bdev *mem_disk_new(uint64_t nsect, uint8_t **buf)
{
	struct mem_disk *m = g_new0(struct mem_disk, 1);

	m->buf = g_malloc0(nsect * SECTOR);
	*buf = m->buf;
	return bdev_new(&mem_ops, "mem", nsect * SECTOR, true, m);
}

static unsigned mem_disk_reads(struct bdev *d)
{
	return ((struct mem_disk *)d->priv)->reads;
}

/* Make reads of sectors [sector, sector + n) fail with EIO. */
static void mem_disk_bad(struct bdev *d, uint64_t sector, uint64_t n)
{
	struct mem_disk *m = d->priv;

	m->bad_off = sector * SECTOR;
	m->bad_len = n * SECTOR;
}

static int fd_pread(struct bdev *d, void *buf, size_t len, uint64_t off)
{
	int fd = (int)(intptr_t)d->priv;

	while (len) {
		ssize_t n = pread(fd, buf, len, (off_t)off);

		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			return n < 0 ? -errno : -EIO;
		buf = (uint8_t *)buf + n;
		len -= (size_t)n;
		off += (uint64_t)n;
	}
	return 0;
}

static void fd_close(struct bdev *d)
{
	close((int)(intptr_t)d->priv);
}

static const struct bdev_ops fd_ops = {
	.pread = fd_pread,
	.close = fd_close,
};

static struct bdev *fd_disk_open(const char *path)
{
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	struct stat st;

	g_assert_cmpint(fd, >=, 0);
	g_assert_cmpint(fstat(fd, &st), ==, 0);
	return bdev_new(&fd_ops, "testfile", (uint64_t)st.st_size, true,
			(void *)(intptr_t)fd);
}

/* ------------------------------------------------------------------------ */
/* Building MBRs and EBRs. */

static void mbr_set(uint8_t *sector, unsigned i, uint8_t status, uint8_t type,
		    uint32_t start, uint32_t count)
{
	uint8_t *p = sector + 0x1be + i * 16;

	p[0] = status;
	p[4] = type;
	for (unsigned k = 0; k < 4; k++) {
		p[8 + k] = (uint8_t)(start >> (8 * k));
		p[12 + k] = (uint8_t)(count >> (8 * k));
	}
	sector[510] = 0x55;
	sector[511] = 0xaa;
}

/*
 * An EBR at sector ebr (absolute) of the extended partition starting at
 * sector ext: logical (rel_start, count) relative to the EBR, and a link
 * to the EBR at absolute sector next (0: end of chain).
 */
static void ebr_set(uint8_t *disk, uint32_t ext, uint32_t ebr, uint32_t rel_start,
		    uint32_t count, uint32_t next, uint32_t next_count)
{
	uint8_t *s = disk + (uint64_t)ebr * SECTOR;

	mbr_set(s, 0, 0, count ? 0x83 : 0, rel_start, count);
	if (next)
		mbr_set(s, 1, 0, 0x05, next - ext, next_count);
}

/* ------------------------------------------------------------------------ */
/* Building GPTs: the usual layout, 128 entries of 128 bytes unless changed. */

static const uint8_t guid_linux[16] = { /* 0fc63daf-8483-4772-8e79-3d69d8477de4 */
	0xaf, 0x3d, 0xc6, 0x0f, 0x83, 0x84, 0x72, 0x47,
	0x8e, 0x79, 0x3d, 0x69, 0xd8, 0x47, 0x7d, 0xe4,
};
static const uint8_t guid_esp[16] = { /* c12a7328-f81f-11d2-ba4b-00a0c93ec93b */
	0x28, 0x73, 0x2a, 0xc1, 0x1f, 0xf8, 0xd2, 0x11,
	0xba, 0x4b, 0x00, 0xa0, 0xc9, 0x3e, 0xc9, 0x3b,
};

struct gpt_geom {
	uint32_t nentries;
	uint32_t entry_size;
};

static void put_le32(uint8_t *p, uint32_t v)
{
	for (unsigned k = 0; k < 4; k++)
		p[k] = (uint8_t)(v >> (8 * k));
}

static void put_le64(uint8_t *p, uint64_t v)
{
	put_le32(p, (uint32_t)v);
	put_le32(p + 4, (uint32_t)(v >> 32));
}

static uint64_t gpt_array_sectors(const struct gpt_geom *g)
{
	return ((uint64_t)g->nentries * g->entry_size + SECTOR - 1) / SECTOR;
}

/* Entry i (1-based) of the primary array (LBA 2) of a disk gpt_seal builds. */
static uint8_t *gpt_entry(uint8_t *disk, const struct gpt_geom *g, unsigned i)
{
	return disk + 2 * SECTOR + (uint64_t)(i - 1) * g->entry_size;
}

static void gpt_entry_set(uint8_t *disk, const struct gpt_geom *g, unsigned i,
			  const uint8_t type[16], uint64_t first, uint64_t last,
			  const char *utf16le, size_t utf16le_len, uint64_t attrs)
{
	uint8_t *e = gpt_entry(disk, g, i);

	memcpy(e, type, 16);
	for (unsigned k = 0; k < 16; k++)
		e[16 + k] = (uint8_t)(0x10 * i + k);  /* unique GUID */
	put_le64(e + 32, first);
	put_le64(e + 40, last);
	put_le64(e + 48, attrs);
	memcpy(e + 56, utf16le, MIN(utf16le_len, 72));
}

/* ASCII name into an entry. */
static void gpt_entry_name(uint8_t *disk, const struct gpt_geom *g, unsigned i,
			   const char *name)
{
	uint8_t *e = gpt_entry(disk, g, i);

	memset(e + 56, 0, 72);
	for (unsigned k = 0; name[k] && k < 36; k++)
		e[56 + 2 * k] = (uint8_t)name[k];
}

static void gpt_header_crc(uint8_t *disk, uint64_t lba)
{
	uint8_t *h = disk + lba * SECTOR;

	put_le32(h + 16, 0);
	put_le32(h + 16, (uint32_t)crc32(0, h, 92));
}

/*
 * Write the protective MBR, both headers and both arrays (copying the
 * primary array, which the caller filled first with gpt_entry_set) for a
 * disk of nsect sectors.  Call again after changing entries.
 */
static void gpt_seal(uint8_t *disk, uint64_t nsect, const struct gpt_geom *g)
{
	uint64_t asec = gpt_array_sectors(g);
	uint64_t abytes = (uint64_t)g->nentries * g->entry_size;
	uint64_t backup_array = nsect - 1 - asec;
	uint32_t acrc;

	memset(disk, 0, SECTOR);
	mbr_set(disk, 0, 0, 0xee, 1, (uint32_t)MIN(nsect - 1, 0xffffffffu));
	memmove(disk + backup_array * SECTOR, disk + 2 * SECTOR, abytes);
	acrc = (uint32_t)crc32(0, disk + 2 * SECTOR, (uInt)abytes);

	for (int b = 0; b < 2; b++) {
		uint64_t lba = b ? nsect - 1 : 1;
		uint8_t *h = disk + lba * SECTOR;

		memset(h, 0, SECTOR);
		memcpy(h, "EFI PART", 8);
		put_le32(h + 8, 0x00010000);
		put_le32(h + 12, 92);
		put_le64(h + 24, lba);
		put_le64(h + 32, b ? 1 : nsect - 1);
		put_le64(h + 40, 2 + asec);
		put_le64(h + 48, backup_array - 1);
		memset(h + 56, 0x5a, 16);
		put_le64(h + 72, b ? backup_array : 2);
		put_le32(h + 80, g->nentries);
		put_le32(h + 84, g->entry_size);
		put_le32(h + 88, acrc);
		gpt_header_crc(disk, lba);
	}
}

/* ------------------------------------------------------------------------ */
/* Checking results. */

static const struct partition *find_part(const struct partition_table *t, unsigned n)
{
	for (unsigned i = 0; i < t->count; i++)
		if (t->parts[i].number == n)
			return &t->parts[i];
	return NULL;
}

static void assert_part(const struct partition_table *t, unsigned n,
			uint64_t start_sector, uint64_t nsect)
{
	const struct partition *p = find_part(t, n);

	if (!p)
		g_error("p%u missing", n);
	g_assert_cmpuint(p->offset, ==, start_sector * SECTOR);
	g_assert_cmpuint(p->length, ==, nsect * SECTOR);
}

static void assert_sorted(const struct partition_table *t)
{
	for (unsigned i = 1; i < t->count; i++)
		g_assert_cmpuint(t->parts[i - 1].number, <, t->parts[i].number);
}

static void read_table(struct bdev *d, struct partition_table *t)
{
	g_assert_cmpint(partition_table_read(d, t), ==, 0);
	assert_sorted(t);
}

/* ------------------------------------------------------------------------ */
/* No table at all. */

static void test_none(void)
{
	struct partition_table t;
	uint8_t *b;
	struct bdev *d = mem_disk_new(2048, &b);

	read_table(d, &t);
	g_assert_cmpstr(t.scheme, ==, "");
	g_assert_cmpuint(t.count, ==, 0);
	/* sector 0 is still watched: a new table written there must show */
	g_assert_cmpuint(t.table_bytes_head, ==, 512);
	partition_table_free(&t);
	bdev_close(d);
}

static void test_tiny_disk(void)
{
	struct partition_table t;
	struct mem_disk *m = g_new0(struct mem_disk, 1);
	struct bdev *d;

	m->buf = g_malloc0(100);
	d = bdev_new(&mem_ops, "mem", 100, true, m);
	read_table(d, &t);
	g_assert_cmpuint(t.count, ==, 0);
	partition_gpt_read(d, &t);
	g_assert_cmpuint(t.count, ==, 0);
	partition_table_free(&t);
	bdev_close(d);
}

/* ------------------------------------------------------------------------ */
/* MBR */

static void test_mbr_primaries(void)
{
	struct partition_table t;
	uint8_t *b;
	struct bdev *d = mem_disk_new(16384, &b);

	mbr_set(b, 0, 0x80, 0x83, 2048, 2048);
	/* slot 2 empty */
	mbr_set(b, 2, 0, 0x07, 8192, 100);
	mbr_set(b, 3, 0, 0x83, 9000, 0);   /* zero length: empty */
	read_table(d, &t);
	g_assert_cmpstr(t.scheme, ==, "mbr");
	g_assert_cmpuint(t.count, ==, 2);
	assert_part(&t, 1, 2048, 2048);
	assert_part(&t, 3, 8192, 100);
	g_assert_cmpstr(find_part(&t, 1)->type, ==, "0x83");
	g_assert_cmpstr(find_part(&t, 3)->type, ==, "0x07");
	g_assert_true(find_part(&t, 1)->bootable);
	g_assert_false(find_part(&t, 3)->bootable);
	g_assert_cmpstr(find_part(&t, 1)->uuid, ==, "");
	g_assert_cmpstr(find_part(&t, 1)->label, ==, "");
	g_assert_cmpuint(t.table_bytes_head, ==, 512);
	g_assert_false(t.table_at_end);
	partition_table_free(&t);
	bdev_close(d);
}

static void test_mbr_no_signature(void)
{
	struct partition_table t;
	uint8_t *b;
	struct bdev *d = mem_disk_new(16384, &b);

	mbr_set(b, 0, 0, 0x83, 2048, 2048);
	b[511] = 0;
	read_table(d, &t);
	g_assert_cmpstr(t.scheme, ==, "");
	g_assert_cmpuint(t.count, ==, 0);
	partition_table_free(&t);
	bdev_close(d);
}

/* Extended at sector 4096; EBRs at 4096, 5096, 6096; logicals after each. */
static void test_mbr_logicals(void)
{
	struct partition_table t;
	uint8_t *b;
	struct bdev *d = mem_disk_new(16384, &b);

	mbr_set(b, 0, 0, 0x83, 2048, 2048);
	mbr_set(b, 1, 0, 0x0f, 4096, 8192);
	ebr_set(b, 4096, 4096, 1, 100, 5096, 1000);
	ebr_set(b, 4096, 5096, 2, 200, 6096, 1000);
	ebr_set(b, 4096, 6096, 2048, 300, 0, 0);
	read_table(d, &t);
	g_assert_cmpstr(t.scheme, ==, "mbr");
	g_assert_cmpuint(t.count, ==, 4);
	assert_part(&t, 1, 2048, 2048);
	g_assert_null(find_part(&t, 2));  /* the container is no view */
	assert_part(&t, 5, 4097, 100);
	assert_part(&t, 6, 5098, 200);
	assert_part(&t, 7, 6096 + 2048, 300);
	g_assert_cmpstr(find_part(&t, 5)->type, ==, "0x83");
	g_assert_cmpuint(t.ntable_sectors, ==, 3);
	g_assert_cmpuint(t.table_sectors[0], ==, 4096ull * SECTOR);
	g_assert_cmpuint(t.table_sectors[1], ==, 5096ull * SECTOR);
	g_assert_cmpuint(t.table_sectors[2], ==, 6096ull * SECTOR);
	partition_table_free(&t);
	bdev_close(d);
}

/* An EBR whose link points at itself: the walk ends, nothing hangs. */
static void test_mbr_ebr_self_loop(void)
{
	struct partition_table t;
	uint8_t *b;
	struct bdev *d = mem_disk_new(16384, &b);

	mbr_set(b, 0, 0, 0x05, 4096, 8192);
	ebr_set(b, 4096, 4096, 1, 100, 5096, 100);
	ebr_set(b, 4096, 5096, 1, 100, 5096, 100); /* itself */
	read_table(d, &t);
	g_assert_cmpuint(t.count, ==, 2);
	assert_part(&t, 5, 4097, 100);
	assert_part(&t, 6, 5097, 100);
	/* sector 0 once, each of the two EBRs once */
	g_assert_cmpuint(mem_disk_reads(d), ==, 3);
	partition_table_free(&t);
	bdev_close(d);
}

/* A chain that turns back to an earlier EBR ends there. */
static void test_mbr_ebr_backward(void)
{
	struct partition_table t;
	uint8_t *b;
	struct bdev *d = mem_disk_new(16384, &b);

	mbr_set(b, 0, 0, 0x85, 4096, 8192);
	ebr_set(b, 4096, 4096, 1, 100, 6096, 100);
	ebr_set(b, 4096, 6096, 1, 100, 5096, 100); /* backwards */
	ebr_set(b, 4096, 5096, 1, 100, 4096, 100);  /* never reached */
	read_table(d, &t);
	g_assert_cmpuint(t.count, ==, 2);
	assert_part(&t, 5, 4097, 100);
	assert_part(&t, 6, 6097, 100);
	partition_table_free(&t);
	bdev_close(d);

	/* link to the extended start itself (relative 0 with a size) */
	d = mem_disk_new(16384, &b);
	mbr_set(b, 0, 0, 0x05, 4096, 8192);
	ebr_set(b, 4096, 4096, 1, 100, 0, 0);
	mbr_set(b + 4096ull * SECTOR, 1, 0, 0x05, 0, 100);
	read_table(d, &t);
	g_assert_cmpuint(t.count, ==, 1);
	assert_part(&t, 5, 4097, 100);
	partition_table_free(&t);
	bdev_close(d);
}

/*
 * 6000 EBRs in a forward chain: at most PART_MAX partitions are shown and
 * at most PART_MAX EBRs are read.
 */
static void test_mbr_ebr_long_chain(void)
{
	const uint32_t n = 6000, ext = 2;
	struct partition_table t;
	uint8_t *b;
	struct bdev *d = mem_disk_new(ext + 2 * n + 8, &b);

	mbr_set(b, 0, 0, 0x05, ext, 2 * n);
	for (uint32_t i = 0; i < n; i++)
		ebr_set(b, ext, ext + 2 * i, 1, 1, ext + 2 * (i + 1), 2);
	read_table(d, &t);
	g_assert_cmpuint(t.count, ==, PART_MAX - 4);
	assert_part(&t, 5, ext + 1, 1);
	assert_part(&t, PART_MAX, ext + 2 * (PART_MAX - 5) + 1, 1);
	g_assert_cmpuint(mem_disk_reads(d), <=, PART_MAX + 2);
	g_assert_cmpuint(t.ntable_sectors, <=, PART_MAX);
	partition_table_free(&t);
	bdev_close(d);

	/* A chain of EBRs with empty entries: still bounded reads. */
	d = mem_disk_new(ext + n + 8, &b);
	mbr_set(b, 0, 0, 0x05, ext, n);
	for (uint32_t i = 0; i < n; i++)
		ebr_set(b, ext, ext + i, 0, 0, ext + i + 1, 1);
	read_table(d, &t);
	g_assert_cmpuint(t.count, ==, 0);
	g_assert_cmpuint(mem_disk_reads(d), <=, PART_MAX + 2);
	partition_table_free(&t);
	bdev_close(d);
}

/* Past the end: not shown; numbers stay what the kernel would say. */
static void test_mbr_past_end(void)
{
	struct partition_table t;
	uint8_t *b;
	struct bdev *d = mem_disk_new(16384, &b);

	mbr_set(b, 0, 0, 0x83, 2048, 16384);       /* ends past 16384 */
	mbr_set(b, 1, 0, 0x83, 0xffffffff, 0xffffffff); /* far beyond */
	mbr_set(b, 2, 0, 0x83, 2048, 14336);       /* ends exactly at the end */
	mbr_set(b, 3, 0, 0x05, 1024, 1024);
	ebr_set(b, 1024, 1024, 1, 99999, 1100, 10); /* p5 past end */
	ebr_set(b, 1024, 1100, 1, 10, 30000, 10);   /* p6 fine, link past end */
	read_table(d, &t);
	g_assert_cmpuint(t.count, ==, 2);
	assert_part(&t, 3, 2048, 14336);
	assert_part(&t, 6, 1101, 10);
	partition_table_free(&t);
	bdev_close(d);
}

/* Overlapping the table: a primary at sector 0, a logical on its own EBR. */
static void test_mbr_overlap_table(void)
{
	struct partition_table t;
	uint8_t *b;
	struct bdev *d = mem_disk_new(16384, &b);

	mbr_set(b, 0, 0, 0x83, 0, 2048);
	mbr_set(b, 1, 0, 0x83, 1, 2047);
	mbr_set(b, 2, 0, 0x05, 4096, 4096);
	ebr_set(b, 4096, 4096, 0, 100, 5000, 10);  /* p5 on its EBR */
	ebr_set(b, 4096, 5000, 1, 10, 0, 0);       /* p6 fine */
	read_table(d, &t);
	g_assert_cmpuint(t.count, ==, 2);
	assert_part(&t, 2, 1, 2047);
	assert_part(&t, 6, 5001, 10);
	partition_table_free(&t);
	bdev_close(d);
}

/* A partition spanning another EBR would rewrite the chain: not shown. */
static void test_mbr_overlap_ebr(void)
{
	struct partition_table t;
	uint8_t *b;
	struct bdev *d = mem_disk_new(16384, &b);

	mbr_set(b, 0, 0, 0x83, 2048, 4096);        /* p1 over the first EBR */
	mbr_set(b, 1, 0, 0x83, 12000, 100);        /* p2 fine */
	mbr_set(b, 2, 0, 0x05, 4096, 4096);
	ebr_set(b, 4096, 4096, 1, 2000, 5096, 10); /* p5 over the next EBR */
	ebr_set(b, 4096, 5096, 1, 10, 6000, 10);   /* p6 fine; link to a blank sector */
	read_table(d, &t);
	g_assert_cmpuint(t.count, ==, 2);
	assert_part(&t, 2, 12000, 100);
	assert_part(&t, 6, 5097, 10);
	partition_table_free(&t);
	bdev_close(d);

	/* a link into a partition that finds no EBR there hides nothing */
	d = mem_disk_new(16384, &b);
	mbr_set(b, 2, 0, 0x05, 4096, 4096);
	ebr_set(b, 4096, 4096, 1, 2000, 5096, 10);
	read_table(d, &t);
	g_assert_cmpuint(t.count, ==, 1);
	assert_part(&t, 5, 4097, 2000);
	g_assert_cmpuint(t.ntable_sectors, ==, 2);  /* but 5096 is watched */
	partition_table_free(&t);
	bdev_close(d);
}

/* An EBR chain that starts at sector 0 or outside the disk shows nothing. */
static void test_mbr_extended_bad_start(void)
{
	struct partition_table t;
	uint8_t *b;
	struct bdev *d = mem_disk_new(4096, &b);

	mbr_set(b, 0, 0, 0x05, 0, 100);
	mbr_set(b, 1, 0, 0x05, 8192, 100); /* second extended: ignored */
	mbr_set(b, 2, 0, 0x83, 2048, 10);
	read_table(d, &t);
	g_assert_cmpuint(t.count, ==, 1);
	assert_part(&t, 3, 2048, 10);
	partition_table_free(&t);
	bdev_close(d);

	d = mem_disk_new(4096, &b);
	mbr_set(b, 0, 0, 0x05, 8192, 100);
	read_table(d, &t);
	g_assert_cmpstr(t.scheme, ==, "mbr");
	g_assert_cmpuint(t.count, ==, 0);
	partition_table_free(&t);
	bdev_close(d);
}

/* 0xee with no GPT behind it: the MBR is read, the 0xee entry left out. */
static void test_mbr_protective_without_gpt(void)
{
	struct partition_table t;
	uint8_t *b;
	struct bdev *d = mem_disk_new(16384, &b);

	mbr_set(b, 0, 0, 0xee, 1, 16383);
	mbr_set(b, 1, 0, 0x83, 2048, 100);
	read_table(d, &t);
	g_assert_cmpstr(t.scheme, ==, "mbr");
	g_assert_cmpuint(t.count, ==, 1);
	assert_part(&t, 2, 2048, 100);
	g_assert_cmpuint(t.table_bytes_head, ==, 512);
	partition_table_free(&t);
	bdev_close(d);
}

/* ------------------------------------------------------------------------ */
/* GPT built in memory */

#define GPT_NSECT 65536u /* 32 MiB */

/* p1 ESP "EFI System", p2 "données", p5 "a😀b", all others empty. */
static struct bdev *gpt_sample(uint8_t **bp, const struct gpt_geom *g)
{
	static const char name2[] = "d\0o\0n\0n\0\xe9\0""e\0s\0"; /* données */
	static const char name5[] = "a\0\x3d\xd8\x00\xde""b\0";   /* a U+1F600 b */
	struct bdev *d = mem_disk_new(GPT_NSECT, bp);

	gpt_entry_set(*bp, g, 1, guid_esp, 2048, 4095, "", 0, 0);
	gpt_entry_name(*bp, g, 1, "EFI System");
	gpt_entry_set(*bp, g, 2, guid_linux, 4096, 8191, name2, sizeof(name2) - 1, 1ull << 2);
	gpt_entry_set(*bp, g, 5, guid_linux, 10000, 10000, name5, sizeof(name5) - 1, 0);
	gpt_seal(*bp, GPT_NSECT, g);
	return d;
}

static void check_gpt_sample(struct bdev *d)
{
	struct partition_table t;
	const struct partition *p;

	read_table(d, &t);
	g_assert_cmpstr(t.scheme, ==, "gpt");
	g_assert_cmpuint(t.count, ==, 3);
	assert_part(&t, 1, 2048, 2048);
	assert_part(&t, 2, 4096, 4096);
	assert_part(&t, 5, 10000, 1);
	p = find_part(&t, 1);
	g_assert_cmpstr(p->type, ==, "c12a7328-f81f-11d2-ba4b-00a0c93ec93b");
	g_assert_cmpstr(p->uuid, ==, "13121110-1514-1716-1819-1a1b1c1d1e1f");
	g_assert_cmpstr(p->label, ==, "EFI System");
	g_assert_false(p->bootable);
	p = find_part(&t, 2);
	g_assert_cmpstr(p->type, ==, "0fc63daf-8483-4772-8e79-3d69d8477de4");
	g_assert_cmpstr(p->label, ==, "donn\xc3\xa9" "es");
	g_assert_true(p->bootable);
	g_assert_cmpstr(find_part(&t, 5)->label, ==, "a\xf0\x9f\x98\x80" "b");
	partition_table_free(&t);
}

static void test_gpt_basic(void)
{
	struct gpt_geom g = { 128, 128 };
	struct partition_table t;
	uint8_t *b;
	struct bdev *d = gpt_sample(&b, &g);

	check_gpt_sample(d);
	read_table(d, &t);
	g_assert_cmpuint(t.table_bytes_head, ==, 34 * SECTOR);
	g_assert_true(t.table_at_end);
	g_assert_cmpuint(t.table_bytes_tail, ==, 33 * SECTOR);
	partition_table_free(&t);
	bdev_close(d);
}

/* Entry sizes other than 128, and other entry counts. */
static void test_gpt_geometry(void)
{
	static const struct gpt_geom ok[] = {
		{ 128, 256 }, { 16, 4096 }, { 8, 128 }, { 8000, 128 }, { 5, 384 },
	};

	for (unsigned i = 0; i < G_N_ELEMENTS(ok); i++) {
		uint8_t *b;
		struct bdev *d = gpt_sample(&b, &ok[i]);

		check_gpt_sample(d);
		bdev_close(d);
	}
}

/* Entry 5000 of an 8192-entry array is past PART_MAX: not shown. */
static void test_gpt_index_past_max(void)
{
	struct gpt_geom g = { 8192, 128 };
	struct partition_table t;
	uint8_t *b;
	struct bdev *d = mem_disk_new(GPT_NSECT, &b);

	gpt_entry_set(b, &g, 4096, guid_linux, 3072, 4095, "", 0, 0);
	gpt_entry_set(b, &g, 5000, guid_linux, 4096, 8191, "", 0, 0);
	gpt_seal(b, GPT_NSECT, &g);
	read_table(d, &t);
	g_assert_cmpstr(t.scheme, ==, "gpt");
	g_assert_cmpuint(t.count, ==, 1);
	assert_part(&t, 4096, 3072, 1024);
	partition_table_free(&t);
	bdev_close(d);
}

/* A hybrid MBR (0xee beside other entries) with a valid GPT: the GPT wins. */
static void test_gpt_hybrid(void)
{
	struct gpt_geom g = { 128, 128 };
	uint8_t *b;
	struct bdev *d = gpt_sample(&b, &g);

	mbr_set(b, 0, 0, 0xee, 1, 2047);
	mbr_set(b, 1, 0x80, 0x0c, 2048, 2048);
	check_gpt_sample(d);
	bdev_close(d);
}

/* Damage each part of the primary: the backup is used, same partitions. */
static void test_gpt_backup(void)
{
	struct gpt_geom g = { 128, 128 };
	uint8_t *b;
	struct bdev *d;
	struct partition_table t;

	/* header CRC wrong */
	d = gpt_sample(&b, &g);
	b[SECTOR + 16] ^= 1;
	check_gpt_sample(d);
	bdev_close(d);

	/* a header byte changed (CRC then mismatches) */
	d = gpt_sample(&b, &g);
	b[SECTOR + 40] ^= 0x40;
	check_gpt_sample(d);
	bdev_close(d);

	/* signature gone */
	d = gpt_sample(&b, &g);
	memset(b + SECTOR, 0, SECTOR);
	check_gpt_sample(d);
	read_table(d, &t);
	/* primary area still watched: head is the standard LBA 0-33 */
	g_assert_cmpuint(t.table_bytes_head, ==, 34 * SECTOR);
	g_assert_cmpuint(t.table_bytes_tail, ==, 33 * SECTOR);
	partition_table_free(&t);
	bdev_close(d);

	/* entry array CRC wrong (an entry changed behind the header's back) */
	d = gpt_sample(&b, &g);
	gpt_entry(b, &g, 1)[33] ^= 1;
	check_gpt_sample(d);
	bdev_close(d);

	/* MyLBA wrong (with a correct CRC) */
	d = gpt_sample(&b, &g);
	put_le64(b + SECTOR + 24, 7);
	gpt_header_crc(b, 1);
	check_gpt_sample(d);
	bdev_close(d);

	/* AlternateLBA of a sound primary header names where the backup is,
	 * when the last LBA holds nothing (a disk grown after partitioning) */
	{
		struct bdev *big = mem_disk_new(GPT_NSECT * 2, &b);
		uint8_t *small;
		struct bdev *tmp = gpt_sample(&small, &g);

		memcpy(b, small, (size_t)GPT_NSECT * SECTOR);
		bdev_close(tmp);
		/* sound: the backup, not at the end, is watched by its sectors */
		check_gpt_sample(big);
		read_table(big, &t);
		g_assert_false(t.table_at_end);
		g_assert_cmpuint(t.table_bytes_head, ==, 34 * SECTOR);
		g_assert_cmpuint(t.ntable_sectors, ==, 33);
		g_assert_cmpuint(t.table_sectors[0], ==, (GPT_NSECT - 33ull) * SECTOR);
		g_assert_cmpuint(t.table_sectors[32], ==, (GPT_NSECT - 1ull) * SECTOR);
		partition_table_free(&t);
		/* primary array damaged: the backup is found there */
		gpt_entry(b, &g, 1)[33] ^= 1;
		check_gpt_sample(big);
		bdev_close(big);
	}
}

/* Both copies damaged: no GPT, and the MBR (only the 0xee entry) shows none. */
static void test_gpt_both_bad(void)
{
	struct gpt_geom g = { 128, 128 };
	struct partition_table t;
	uint8_t *b;
	struct bdev *d = gpt_sample(&b, &g);

	b[SECTOR + 16] ^= 1;
	b[(GPT_NSECT - 1) * (uint64_t)SECTOR + 16] ^= 1;
	partition_gpt_read(d, &t);
	g_assert_cmpstr(t.scheme, ==, "");
	g_assert_cmpuint(t.count, ==, 0);
	read_table(d, &t);
	g_assert_cmpstr(t.scheme, ==, "mbr");
	g_assert_cmpuint(t.count, ==, 0);
	partition_table_free(&t);
	bdev_close(d);
}

/*
 * Absurd geometry in both headers, with correct header CRCs: refused
 * before anything is allocated or read.
 */
static void test_gpt_absurd_geometry(void)
{
	static const struct { uint32_t nentries, entry_size; } bad[] = {
		{ 0xffffffff, 128 }, { 0xffffffff, 0xffffffff }, { 128, 0 },
		{ 128, 127 }, { 128, 129 }, { 128, 8192 }, { 0x10000, 128 },
		{ 257, 4096 }, { 1, 0x80000000 },
	};

	for (unsigned i = 0; i < G_N_ELEMENTS(bad); i++) {
		struct gpt_geom g = { 128, 128 };
		struct partition_table t;
		uint8_t *b;
		struct bdev *d = gpt_sample(&b, &g);

		for (int k = 0; k < 2; k++) {
			uint64_t lba = k ? GPT_NSECT - 1 : 1;

			put_le32(b + lba * SECTOR + 80, bad[i].nentries);
			put_le32(b + lba * SECTOR + 84, bad[i].entry_size);
			gpt_header_crc(b, lba);
		}
		read_table(d, &t);
		g_assert_cmpstr(t.scheme, ==, "mbr");
		g_assert_cmpuint(t.count, ==, 0);
		partition_table_free(&t);
		bdev_close(d);
	}
}

/* Header fields pointing anywhere: refused, the backup used. */
static void test_gpt_bad_header_fields(void)
{
	static const struct { unsigned off, width; uint64_t v; } bad[] = {
		{ 12, 4, 91 }, { 12, 4, 513 }, { 12, 4, 0xffffffff },  /* HeaderSize */
		{ 72, 8, 0 }, { 72, 8, 1 },                            /* array on LBA 0 / header */
		{ 72, 8, GPT_NSECT - 1 }, { 72, 8, GPT_NSECT },         /* array past the end */
		{ 72, 8, UINT64_MAX }, { 72, 8, UINT64_MAX / 512 },
	};

	for (unsigned i = 0; i < G_N_ELEMENTS(bad); i++) {
		struct gpt_geom g = { 128, 128 };
		uint8_t *b;
		struct bdev *d = gpt_sample(&b, &g);

		if (bad[i].width == 4)
			put_le32(b + SECTOR + bad[i].off, (uint32_t)bad[i].v);
		else
			put_le64(b + SECTOR + bad[i].off, bad[i].v);
		gpt_header_crc(b, 1);
		check_gpt_sample(d);
		bdev_close(d);
	}
}

/* Bad entries are skipped, one by one; the good ones stay. */
static void test_gpt_bad_entries(void)
{
	struct gpt_geom g = { 128, 128 };
	struct partition_table t;
	uint8_t *b;
	struct bdev *d = gpt_sample(&b, &g);

	gpt_entry_set(b, &g, 3, guid_linux, 60000, GPT_NSECT, "", 0, 0);      /* one past the end */
	gpt_entry_set(b, &g, 4, guid_linux, 1, 2047, "", 0, 0);               /* header */
	gpt_entry_set(b, &g, 6, guid_linux, 30, 2047, "", 0, 0);              /* primary array */
	gpt_entry_set(b, &g, 7, guid_linux, GPT_NSECT - 40, GPT_NSECT - 20, "", 0, 0); /* backup array */
	gpt_entry_set(b, &g, 8, guid_linux, GPT_NSECT - 1, GPT_NSECT - 1, "", 0, 0);   /* backup header */
	gpt_entry_set(b, &g, 9, guid_linux, 3000, 2999, "", 0, 0);            /* ends before start */
	gpt_entry_set(b, &g, 10, guid_linux, UINT64_MAX / 256, UINT64_MAX, "", 0, 0);
	gpt_entry_set(b, &g, 11, guid_linux, 0, 0, "", 0, 0);                 /* protective MBR */
	gpt_entry_set(b, &g, 12, guid_linux, 20000, GPT_NSECT - 34, "", 0, 0); /* last usable: ok */
	gpt_seal(b, GPT_NSECT, &g);
	read_table(d, &t);
	g_assert_cmpstr(t.scheme, ==, "gpt");
	g_assert_cmpuint(t.count, ==, 4);
	assert_part(&t, 1, 2048, 2048);
	assert_part(&t, 2, 4096, 4096);
	assert_part(&t, 5, 10000, 1);
	assert_part(&t, 12, 20000, GPT_NSECT - 34 - 20000 + 1);
	partition_table_free(&t);
	bdev_close(d);
}

/*
 * A primary array away from LBA 2 (the spec allows it anywhere between the
 * header and the first usable LBA): overlap is judged against where it is.
 */
static void test_gpt_array_elsewhere(void)
{
	struct gpt_geom g = { 128, 128 };
	struct partition_table t;
	uint8_t *b;
	struct bdev *d = mem_disk_new(GPT_NSECT, &b);

	gpt_entry_set(b, &g, 1, guid_linux, 10, 999, "", 0, 0);    /* where LBA 2-33 would be */
	gpt_entry_set(b, &g, 2, guid_linux, 1020, 1040, "", 0, 0); /* over the moved array */
	gpt_entry_set(b, &g, 3, guid_linux, 2048, 4095, "", 0, 0);
	gpt_seal(b, GPT_NSECT, &g);
	memmove(b + 1000 * SECTOR, b + 2 * SECTOR, 32 * SECTOR);
	memset(b + 2 * SECTOR, 0, 32 * SECTOR);
	put_le64(b + SECTOR + 72, 1000);
	gpt_header_crc(b, 1);
	read_table(d, &t);
	g_assert_cmpstr(t.scheme, ==, "gpt");
	g_assert_cmpuint(t.count, ==, 2);
	assert_part(&t, 1, 10, 990);
	assert_part(&t, 3, 2048, 2048);
	/* watched: LBA 0-1 as the head, the array by its own sectors */
	g_assert_cmpuint(t.table_bytes_head, ==, 2 * SECTOR);
	g_assert_cmpuint(t.ntable_sectors, ==, 32);
	g_assert_cmpuint(t.table_sectors[0], ==, 1000 * SECTOR);
	g_assert_cmpuint(t.table_sectors[31], ==, 1031 * SECTOR);
	g_assert_true(t.table_at_end);
	partition_table_free(&t);
	bdev_close(d);
}

/* A GPT on a disk too small for one: nothing, no crash. */
static void test_gpt_small_disk(void)
{
	struct partition_table t;
	uint8_t *b;
	struct bdev *d = mem_disk_new(2, &b);

	mbr_set(b, 0, 0, 0xee, 1, 1);
	memcpy(b + SECTOR, "EFI PART", 8);
	read_table(d, &t);
	g_assert_cmpuint(t.count, ==, 0);
	partition_table_free(&t);
	bdev_close(d);
}

/* ------------------------------------------------------------------------ */
/* Random damage: whatever the bytes, the result keeps its promises. */

static void check_invariants(struct bdev *d)
{
	struct partition_table t;

	read_table(d, &t);  /* returns 0, sorted */
	g_assert_cmpuint(t.count, <=, PART_MAX);
	g_assert_cmpuint(t.ntable_sectors, <=, PART_MAX);
	for (unsigned i = 0; i < t.count; i++) {
		const struct partition *p = &t.parts[i];

		g_assert_cmpuint(p->number, >=, 1);
		g_assert_cmpuint(p->length, >, 0);
		/* never over sector 0, nor (GPT) the primary header */
		g_assert_cmpuint(p->offset, >=, strcmp(t.scheme, "gpt") ? SECTOR : 2 * SECTOR);
		g_assert_cmpuint(p->offset, <=, d->size);
		g_assert_cmpuint(p->length, <=, d->size - p->offset);
		g_assert_true(g_utf8_validate(p->label, -1, NULL));
		g_assert_cmpuint(strlen(p->type), <, sizeof(p->type));
		g_assert_cmpuint(strlen(p->uuid), <, sizeof(p->uuid));
	}
	partition_table_free(&t);
}

static void flip(uint8_t *b, uint64_t off, uint64_t len)
{
	unsigned n = (unsigned)g_test_rand_int_range(1, 5);

	while (n--)
		b[off + (uint64_t)g_test_rand_int_range(0, (gint32)len)] =
			(uint8_t)g_test_rand_int_range(0, 256);
}

static void test_random_damage(void)
{
	struct gpt_geom g = { 128, 128 };
	unsigned iterations = g_test_slow() ? 20000 : 600;

	for (unsigned it = 0; it < iterations; it++) {
		uint8_t *b;
		struct bdev *d;

		/* an MBR with three logicals, its entries and EBRs damaged */
		d = mem_disk_new(16384, &b);
		mbr_set(b, 0, 0x80, 0x83, 2048, 2048);
		mbr_set(b, 1, 0, 0x0f, 4096, 8192);
		ebr_set(b, 4096, 4096, 1, 100, 5096, 1000);
		ebr_set(b, 4096, 5096, 2, 200, 6096, 1000);
		ebr_set(b, 4096, 6096, 2048, 300, 0, 0);
		flip(b, 0x1be, 66);
		if (g_test_rand_bit())
			flip(b + 4096ull * SECTOR, 0x1be, 66);
		if (g_test_rand_bit())
			flip(b + 5096ull * SECTOR, 0x1be, 66);
		check_invariants(d);
		bdev_close(d);

		/* a GPT, its headers and entries damaged, CRCs fixed half the time */
		d = gpt_sample(&b, &g);
		if (g_test_rand_bit())
			flip(b, 0x1be, 66);
		if (g_test_rand_bit()) {
			flip(gpt_entry(b, &g, 1), 0, 5 * 128);
			if (g_test_rand_bit()) {
				put_le32(b + SECTOR + 88, (uint32_t)crc32(0, b + 2 * SECTOR, 128 * 128));
				gpt_header_crc(b, 1);
			}
		}
		for (int k = 0; k < 2; k++) {
			uint64_t lba = k ? GPT_NSECT - 1 : 1;

			if (g_test_rand_bit()) {
				flip(b + lba * SECTOR, 8, 84);
				if (g_test_rand_bit())
					gpt_header_crc(b, lba);
			}
		}
		check_invariants(d);
		bdev_close(d);
	}
}

/* ------------------------------------------------------------------------ */
/* Read errors */

/* Only an unreadable sector 0 is an error; elsewhere it is damage. */
static void test_io_errors(void)
{
	struct gpt_geom g = { 128, 128 };
	struct partition_table t;
	uint8_t *b;
	struct bdev *d = mem_disk_new(16384, &b);

	/* sector 0 */
	mbr_set(b, 0, 0, 0x83, 2048, 100);
	mem_disk_bad(d, 0, 1);
	g_assert_cmpint(partition_table_read(d, &t), ==, -EIO);
	g_assert_cmpuint(t.count, ==, 0);
	partition_table_free(&t);
	bdev_close(d);

	/* the second EBR: p1 and p5 stay */
	d = mem_disk_new(16384, &b);
	mbr_set(b, 0, 0, 0x83, 2048, 2048);
	mbr_set(b, 1, 0, 0x0f, 4096, 8192);
	ebr_set(b, 4096, 4096, 1, 100, 5096, 1000);
	ebr_set(b, 4096, 5096, 2, 200, 6096, 1000);
	ebr_set(b, 4096, 6096, 2048, 300, 0, 0);
	mem_disk_bad(d, 5096, 1);
	read_table(d, &t);
	g_assert_cmpuint(t.count, ==, 2);
	assert_part(&t, 1, 2048, 2048);
	assert_part(&t, 5, 4097, 100);
	/* the unreadable EBR is watched: rewriting it must re-read the table */
	g_assert_cmpuint(t.ntable_sectors, ==, 2);
	g_assert_cmpuint(t.table_sectors[1], ==, 5096ull * SECTOR);
	partition_table_free(&t);
	bdev_close(d);

	/* GPT primary header, then primary array: the backup is used */
	d = gpt_sample(&b, &g);
	mem_disk_bad(d, 1, 1);
	check_gpt_sample(d);
	mem_disk_bad(d, 20, 1);
	check_gpt_sample(d);
	/* and both arrays: no GPT, the MBR has nothing else */
	partition_table_free(&t);
	bdev_close(d);
	d = gpt_sample(&b, &g);
	mem_disk_bad(d, 20, GPT_NSECT - 40);
	read_table(d, &t);
	g_assert_cmpstr(t.scheme, ==, "mbr");
	g_assert_cmpuint(t.count, ==, 0);
	partition_table_free(&t);
	bdev_close(d);
}

/* ------------------------------------------------------------------------ */
/* Real tables written by sfdisk and sgdisk, compared with `sfdisk --json`. */

static char *find_tool(const char *name)
{
	static const char *const dirs[] = { "/usr/sbin", "/sbin", "/usr/bin" };
	char *p = g_find_program_in_path(name);

	for (unsigned i = 0; !p && i < G_N_ELEMENTS(dirs); i++) {
		p = g_build_filename(dirs[i], name, NULL);
		if (!g_file_test(p, G_FILE_TEST_IS_EXECUTABLE))
			g_clear_pointer(&p, g_free);
	}
	return p;
}

/* Run argv; the test fails if it does not exit 0.  Returns its stdout. */
static char *run(const char *const *argv)
{
	char *out = NULL, *err = NULL;
	int status;
	GError *error = NULL;

	if (!g_spawn_sync(NULL, (char **)argv, NULL, G_SPAWN_DEFAULT, NULL, NULL,
			  &out, &err, &status, &error))
		g_error("%s: %s", argv[0], error->message);
	if (!g_spawn_check_wait_status(status, &error))
		g_error("%s failed: %s\n%s", argv[0], error->message, err);
	g_free(err);
	return out;
}

static char *tmp_dir;

static char *make_sparse(const char *name, uint64_t bytes)
{
	char *path = g_build_filename(tmp_dir, name, NULL);
	int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);

	g_assert_cmpint(fd, >=, 0);
	g_assert_cmpint(ftruncate(fd, (off_t)bytes), ==, 0);
	close(fd);
	return path;
}

/* One partition as `sfdisk --json` describes it. */
struct ref_part {
	unsigned number;
	uint64_t start, size;  /* sectors */
	char type[40], uuid[40], name[80];
};

/* The value of "key" inside [p, end), as a string (quotes dropped). */
static bool json_field(const char *p, const char *end, const char *key,
		       char *out, size_t outlen)
{
	char *pat = g_strdup_printf("\"%s\":", key);
	const char *k = g_strstr_len(p, end - p, pat);
	size_t n = 0;

	g_free(pat);
	out[0] = '\0';
	if (!k)
		return false;
	k += strlen(key) + 3;
	while (*k == ' ')
		k++;
	if (*k == '"') {
		for (k++; k < end && *k != '"' && n + 1 < outlen; k++)
			out[n++] = *k;
	} else {
		for (; k < end && (g_ascii_isalnum(*k) || *k == '-') && n + 1 < outlen; k++)
			out[n++] = *k;
	}
	out[n] = '\0';
	return true;
}

/*
 * Parse the partitions out of `sfdisk --json` (a fixed, simple layout: one
 * object per partition, "node" first).  pN is the node's trailing number.
 */
static unsigned sfdisk_json(const char *path, struct ref_part *refs, unsigned max)
{
	g_autofree char *sfdisk = find_tool("sfdisk");
	const char *argv[] = { sfdisk, "--json", path, NULL };
	g_autofree char *json = run(argv);
	const char *p = json;
	unsigned n = 0;

	while ((p = strstr(p, "\"node\":")) && n < max) {
		const char *end = strchr(p, '}');
		struct ref_part *r = &refs[n++];
		char node[1024], num[32];
		size_t len;

		g_assert_nonnull(end);
		memset(r, 0, sizeof(*r));
		g_assert_true(json_field(p, end, "node", node, sizeof(node)));
		len = strlen(node);
		while (len && g_ascii_isdigit(node[len - 1]))
			len--;
		r->number = (unsigned)strtoul(node + len, NULL, 10);
		g_assert_true(json_field(p, end, "start", num, sizeof(num)));
		r->start = g_ascii_strtoull(num, NULL, 10);
		g_assert_true(json_field(p, end, "size", num, sizeof(num)));
		r->size = g_ascii_strtoull(num, NULL, 10);
		json_field(p, end, "type", r->type, sizeof(r->type));
		json_field(p, end, "uuid", r->uuid, sizeof(r->uuid));
		json_field(p, end, "name", r->name, sizeof(r->name));
		p = end;
	}
	return n;
}

/* Our reading of path equals sfdisk's: same numbers, starts, sizes (GPT: GUIDs, names). */
static void compare_with_sfdisk(const char *path, const char *ref_path,
				const char *scheme, unsigned expect)
{
	struct ref_part refs[64];
	unsigned n = sfdisk_json(ref_path, refs, G_N_ELEMENTS(refs));
	struct partition_table t;
	struct bdev *d = fd_disk_open(path);

	unsigned shown = 0;

	read_table(d, &t);
	g_assert_cmpstr(t.scheme, ==, scheme);
	for (unsigned i = 0; i < n; i++) {
		const struct partition *p;

		if (strcmp(scheme, "mbr") == 0) {
			unsigned long type = strtoul(refs[i].type, NULL, 16);

			/* sfdisk lists the extended container; it is no view */
			if (type == 0x05 || type == 0x0f || type == 0x85)
				continue;
		}
		shown++;
		p = find_part(&t, refs[i].number);

		if (!p)
			g_error("p%u (sfdisk) not found by imgfs", refs[i].number);
		g_assert_cmpuint(p->offset, ==, refs[i].start * SECTOR);
		g_assert_cmpuint(p->length, ==, refs[i].size * SECTOR);
		if (strcmp(scheme, "gpt") == 0) {
			g_assert_cmpint(g_ascii_strcasecmp(p->type, refs[i].type), ==, 0);
			g_assert_cmpint(g_ascii_strcasecmp(p->uuid, refs[i].uuid), ==, 0);
			g_assert_cmpstr(p->label, ==, refs[i].name);
		} else {
			g_assert_cmpuint(strtoul(p->type, NULL, 16), ==,
					 strtoul(refs[i].type, NULL, 16));
		}
	}
	g_assert_cmpuint(shown, ==, expect);
	g_assert_cmpuint(t.count, ==, shown);
	partition_table_free(&t);
	bdev_close(d);
}

static bool have_tools(const char *a, const char *b)
{
	g_autofree char *pa = find_tool(a);
	g_autofree char *pb = b ? find_tool(b) : NULL;

	if (!pa || (b && !pb)) {
		g_test_skip("sfdisk/sgdisk not installed");
		return false;
	}
	return true;
}

/* 3 primaries and an extended partition holding 5 logicals, by sfdisk. */
static void test_sfdisk_mbr(void)
{
	static const char script[] =
		"label: dos\n"
		"start=2048, size=8MiB, type=83, bootable\n"
		"size=4MiB, type=82\n"
		"size=4MiB, type=7\n"
		"type=5\n"
		"size=2MiB, type=83\n"
		"size=3MiB, type=83\n"
		"size=1MiB, type=c\n"
		"size=2MiB, type=83\n"
		"type=83\n";
	g_autofree char *sfdisk = NULL;
	g_autofree char *path = NULL, *spath = NULL;
	struct partition_table t;
	struct bdev *d;

	if (!have_tools("sfdisk", NULL))
		return;
	sfdisk = find_tool("sfdisk");
	path = make_sparse("mbr.img", 64 << 20);
	spath = g_build_filename(tmp_dir, "mbr.sfdisk", NULL);
	g_assert_true(g_file_set_contents(spath, script, -1, NULL));
	{
		const char *argv[] = { "/bin/sh", "-c", "\"$0\" -q --no-reread --no-tell-kernel \"$1\" < \"$2\"",
				       sfdisk, path, spath, NULL };
		g_free(run(argv));
	}
	compare_with_sfdisk(path, path, "mbr", 8);

	d = fd_disk_open(path);
	read_table(d, &t);
	for (unsigned n = 1; n <= 9; n++)
		if (n == 4)
			g_assert_null(find_part(&t, n));
		else
			g_assert_nonnull(find_part(&t, n));
	g_assert_true(find_part(&t, 1)->bootable);
	g_assert_cmpuint(t.ntable_sectors, ==, 5);
	partition_table_free(&t);
	bdev_close(d);
}

static void sgdisk_run(const char *path, const char *const *args)
{
	g_autofree char *sgdisk = find_tool("sgdisk");
	const char *argv[64] = { sgdisk };
	unsigned n = 1;

	for (; *args; args++)
		argv[n++] = *args;
	argv[n++] = path;
	argv[n] = NULL;
	g_free(run(argv));
}

static const char *const sgdisk_indexes[] = {
	"-n", "1:2048:+1M", "-t", "1:ef00", "-c", "1:EFI system",
	"-n", "2:0:+2M", "-t", "2:8300", "-c", "2:root",
	"-n", "5:0:+1M", "-t", "5:8200",
	"-n", "9:0:+3M", "-c", "9:nine",
	"-n", "128:9437184:+8M", "-t", "128:8302", "-c", "128:beyond 4 GiB",
	NULL,
};

/* GPT entries 1, 2, 5, 9 and 128, the last beyond 4 GiB, by sgdisk. */
static void test_sgdisk_gpt(void)
{
	g_autofree char *path = NULL;
	struct partition_table t;
	struct bdev *d;

	if (!have_tools("sfdisk", "sgdisk"))
		return;
	path = make_sparse("gpt.img", 6ull << 30);
	sgdisk_run(path, sgdisk_indexes);
	compare_with_sfdisk(path, path, "gpt", 5);

	d = fd_disk_open(path);
	read_table(d, &t);
	assert_part(&t, 128, 9437184, 16384);
	g_assert_cmpstr(find_part(&t, 128)->label, ==, "beyond 4 GiB");
	g_assert_cmpstr(find_part(&t, 1)->type, ==, "c12a7328-f81f-11d2-ba4b-00a0c93ec93b");
	g_assert_cmpuint(t.table_bytes_head, ==, 34 * SECTOR);
	g_assert_true(t.table_at_end);
	g_assert_cmpuint(t.table_bytes_tail, ==, 33 * SECTOR);
	partition_table_free(&t);
	bdev_close(d);
}

static void corrupt(const char *path, uint64_t off)
{
	int fd = open(path, O_RDWR | O_CLOEXEC);
	uint8_t c;

	g_assert_cmpint(fd, >=, 0);
	g_assert_cmpint(pread(fd, &c, 1, (off_t)off), ==, 1);
	c ^= 0xff;
	g_assert_cmpint(pwrite(fd, &c, 1, (off_t)off), ==, 1);
	close(fd);
}

/* sgdisk's GPT with the primary header, then the primary array, damaged. */
static void test_sgdisk_gpt_backup(void)
{
	static const char *const what[] = { "header", "array" };

	if (!have_tools("sfdisk", "sgdisk"))
		return;
	for (unsigned i = 0; i < G_N_ELEMENTS(what); i++) {
		g_autofree char *name = g_strdup_printf("gpt-bad-%s.img", what[i]);
		g_autofree char *path = make_sparse(name, 16 << 20);
		g_autofree char *ref = g_build_filename(tmp_dir, "gpt-ref.img", NULL);
		static const char *const args[] = {
			"-n", "1:2048:+1M", "-c", "1:one", "-n", "3:0:+2M", "-c", "3:three",
			"-n", "7:0:0", NULL,
		};

		sgdisk_run(path, args);
		/* an intact copy, for sfdisk to describe */
		{
			g_autofree char *buf = NULL;
			gsize len;

			g_assert_true(g_file_get_contents(path, &buf, &len, NULL));
			g_assert_true(g_file_set_contents(ref, buf, (gssize)len, NULL));
		}
		corrupt(path, i == 0 ? 512 + 40 : 2 * 512 + 20);
		/* sfdisk reads the backup too (it warns); compare with the intact copy */
		compare_with_sfdisk(path, ref, "gpt", 3);
		g_unlink(ref);
	}
}

/* sgdisk -S: a table of 16 entries and one of 512. */
static void test_sgdisk_gpt_table_sizes(void)
{
	static const char *const sizes[] = { "16", "512" };

	if (!have_tools("sfdisk", "sgdisk"))
		return;
	for (unsigned i = 0; i < G_N_ELEMENTS(sizes); i++) {
		g_autofree char *path = make_sparse("gpt-size.img", 64 << 20);
		g_autofree char *n2 = g_strdup_printf("%s:0:+1M", sizes[i]);
		const char *const args[] = {
			"-o", "-S", sizes[i], "-a", "1",
			"-n", "1:0:+1M", "-n", n2, NULL,
		};
		struct partition_table t;
		struct bdev *d;

		sgdisk_run(path, args);
		compare_with_sfdisk(path, path, "gpt", 2);
		d = fd_disk_open(path);
		read_table(d, &t);
		g_assert_nonnull(find_part(&t, (unsigned)atoi(sizes[i])));
		g_assert_cmpuint(t.table_bytes_head, ==,
				 (2 + (uint64_t)atoi(sizes[i]) * 128 / SECTOR) * SECTOR);
		partition_table_free(&t);
		bdev_close(d);
	}
}

static void rm_rf(const char *dir)
{
	GDir *d = g_dir_open(dir, 0, NULL);
	const char *name;

	if (!d)
		return;
	while ((name = g_dir_read_name(d))) {
		g_autofree char *p = g_build_filename(dir, name, NULL);

		g_unlink(p);
	}
	g_dir_close(d);
	g_rmdir(dir);
}

int main(int argc, char **argv)
{
	int r;

	g_test_init(&argc, &argv, NULL);
	tmp_dir = g_dir_make_tmp("test-partition-XXXXXX", NULL);
	g_assert_nonnull(tmp_dir);

	g_test_add_func("/partition/none", test_none);
	g_test_add_func("/partition/tiny-disk", test_tiny_disk);
	g_test_add_func("/partition/mbr/primaries", test_mbr_primaries);
	g_test_add_func("/partition/mbr/no-signature", test_mbr_no_signature);
	g_test_add_func("/partition/mbr/logicals", test_mbr_logicals);
	g_test_add_func("/partition/mbr/ebr-self-loop", test_mbr_ebr_self_loop);
	g_test_add_func("/partition/mbr/ebr-backward", test_mbr_ebr_backward);
	g_test_add_func("/partition/mbr/ebr-long-chain", test_mbr_ebr_long_chain);
	g_test_add_func("/partition/mbr/past-end", test_mbr_past_end);
	g_test_add_func("/partition/mbr/overlap-table", test_mbr_overlap_table);
	g_test_add_func("/partition/mbr/overlap-ebr", test_mbr_overlap_ebr);
	g_test_add_func("/partition/mbr/extended-bad-start", test_mbr_extended_bad_start);
	g_test_add_func("/partition/mbr/protective-without-gpt", test_mbr_protective_without_gpt);
	g_test_add_func("/partition/gpt/basic", test_gpt_basic);
	g_test_add_func("/partition/gpt/geometry", test_gpt_geometry);
	g_test_add_func("/partition/gpt/index-past-max", test_gpt_index_past_max);
	g_test_add_func("/partition/gpt/hybrid", test_gpt_hybrid);
	g_test_add_func("/partition/gpt/backup", test_gpt_backup);
	g_test_add_func("/partition/gpt/both-bad", test_gpt_both_bad);
	g_test_add_func("/partition/gpt/absurd-geometry", test_gpt_absurd_geometry);
	g_test_add_func("/partition/gpt/bad-header-fields", test_gpt_bad_header_fields);
	g_test_add_func("/partition/gpt/bad-entries", test_gpt_bad_entries);
	g_test_add_func("/partition/gpt/array-elsewhere", test_gpt_array_elsewhere);
	g_test_add_func("/partition/gpt/small-disk", test_gpt_small_disk);
	g_test_add_func("/partition/io-errors", test_io_errors);
	g_test_add_func("/partition/random-damage", test_random_damage);
	g_test_add_func("/partition/sfdisk/mbr-logicals", test_sfdisk_mbr);
	g_test_add_func("/partition/sgdisk/gpt-indexes", test_sgdisk_gpt);
	g_test_add_func("/partition/sgdisk/gpt-backup", test_sgdisk_gpt_backup);
	g_test_add_func("/partition/sgdisk/gpt-table-sizes", test_sgdisk_gpt_table_sizes);

	r = g_test_run();
	rm_rf(tmp_dir);
	g_free(tmp_dir);
	return r;
}
