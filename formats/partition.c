/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Which partition table a disk holds (SPEC §3, the pN views), and the rules
 * both parsers share: what is shown, and how the table grows.
 *
 * The choice follows the kernel and the UEFI spec: sector 0 must carry the
 * 0x55aa signature; if one of its four entries is the GPT protective type
 * 0xee (a protective or a hybrid MBR) and a valid GPT is found (primary, or
 * backup when the primary is damaged), the GPT is the table.  Otherwise the
 * MBR is, with any 0xee entry left out (it describes the space of a GPT that
 * is not there, not a partition).
 */
#include "partition.h"
#include "partition-int.h"
#include "util.h"

#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

bool partition_range_ok(const char *scheme, unsigned number,
			uint64_t off, uint64_t len, uint64_t disk_size,
			uint64_t tbl_off, uint64_t tbl_len)
{
	if (len == 0)
		return false;
	if (range_exceeds(off, len, disk_size)) {
		log_warn("%s partition p%u (offset %" PRIu64 ", length %" PRIu64
			 ") ends past the end of the disk (%" PRIu64 " bytes): not shown",
			 scheme, number, off, len, disk_size);
		return false;
	}
	if (tbl_len && off < tbl_off + tbl_len && tbl_off < off + len) {
		log_warn("%s partition p%u (offset %" PRIu64 ", length %" PRIu64
			 ") overlaps the partition table at %" PRIu64 "+%" PRIu64
			 ": not shown", scheme, number, off, len, tbl_off, tbl_len);
		return false;
	}
	return true;
}

/*
 * Both arrays below grow the same way, without a capacity field: the
 * capacity is 8 for 1..8 elements and the next power of two above that, so a
 * full array is one whose length is 8 or a larger power of two.
 */
static bool array_full(unsigned n)
{
	return n == 0 || (n >= 8 && is_pow2(n));
}

struct partition *partition_table_append(struct partition_table *t)
{
	unsigned n = t->count;

	if (n >= PART_MAX)
		return NULL;
	if (array_full(n)) {
		struct partition *p = xcalloc(n ? n * 2 : 8, sizeof(*p));

		if (n)
			memcpy(p, t->parts, n * sizeof(*p));
		free(t->parts);
		t->parts = p;
	}
	memset(&t->parts[n], 0, sizeof(t->parts[n]));
	t->count = n + 1;
	return &t->parts[n];
}

void partition_table_add_sector(struct partition_table *t, uint64_t off)
{
	unsigned n = t->ntable_sectors;

	if (n >= PART_MAX)
		return;
	if (array_full(n)) {
		uint64_t *s = xcalloc(n ? n * 2 : 8, sizeof(*s));

		if (n)
			memcpy(s, t->table_sectors, n * sizeof(*s));
		free(t->table_sectors);
		t->table_sectors = s;
	}
	t->table_sectors[n] = off;
	t->ntable_sectors = n + 1;
}

static int part_cmp(const void *a, const void *b)
{
	const struct partition *pa = a, *pb = b;

	return (pa->number > pb->number) - (pa->number < pb->number);
}

static bool mbr_has_protective(const uint8_t *mbr)
{
	for (unsigned i = 0; i < 4; i++)
		if (mbr[0x1be + i * 16 + 4] == MBR_TYPE_GPT_PROTECTIVE)
			return true;
	return false;
}

int partition_table_read(struct bdev *disk, struct partition_table *out)
{
	uint8_t mbr[PART_SECTOR];
	int r;

	memset(out, 0, sizeof(*out));
	if (disk->size < PART_SECTOR)
		return 0;
	r = bdev_pread(disk, mbr, sizeof(mbr), 0);
	if (r < 0)
		return r;
	if (!mbr_signature_ok(mbr))
		goto none;

	if (mbr_has_protective(mbr)) {
		partition_gpt_read(disk, out);
		if (strcmp(out->scheme, "gpt") == 0)
			goto sort;
		log_warn("sector 0 has a GPT protective entry (type 0xee) but no valid GPT "
			 "was found: reading the MBR instead");
		partition_table_free(out);
	}
	partition_mbr_read(disk, mbr, out);
sort:
	if (out->count > 1)
		qsort(out->parts, out->count, sizeof(out->parts[0]), part_cmp);
	return 0;
none:
	/*
	 * No table, but sector 0 is where one would appear: the image watches
	 * it, so that writing a new table makes its partitions appear.
	 */
	partition_table_free(out);
	out->table_bytes_head = PART_SECTOR;
	return 0;
}

void partition_table_free(struct partition_table *t)
{
	if (!t)
		return;
	free(t->parts);
	free(t->table_sectors);
	memset(t, 0, sizeof(*t));
}
