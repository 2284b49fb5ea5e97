/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The MBR (DOS) partition table: primaries p1-p4 from sector 0, logicals p5,
 * p6, ... from the EBR chain of the extended partition (SPEC §3).
 *
 * Layout of sector 0 and of every EBR: four 16-byte entries at 0x1be
 * (status, CHS, type, CHS, LBA start, sector count, little-endian) and the
 * signature 0x55 0xaa at 510.  CHS fields are ignored, as every modern
 * reader does.
 *
 * Numbering follows the Linux kernel, so that pN is /dev/sdaN: a primary
 * keeps the number of its slot; a logical takes the next number when its
 * entry is non-empty, whether or not it turns out to be shown.  An entry is
 * empty when its sector count is 0 (the kernel's and libfdisk's rule).
 */
#include "partition.h"
#include "partition-int.h"
#include "util.h"

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <string.h>

struct mbr_entry {
	uint8_t status;  /* 0x80: active (bootable) */
	uint8_t type;
	uint32_t start;  /* sectors */
	uint32_t count;  /* sectors */
};

static void mbr_entry_get(const uint8_t *sector, unsigned i, struct mbr_entry *e)
{
	const uint8_t *p = sector + 0x1be + i * 16;

	e->status = p[0];
	e->type = p[4];
	e->start = le32(p + 8);
	e->count = le32(p + 12);
}

/*
 * Add a data partition at off (bytes) described by e, unless the shared
 * policy (partition_range_ok) refuses it.  tbl_off is the sector holding e:
 * the partition must not overlap it.  Returns false when the table is full.
 */
static bool mbr_add(struct partition_table *t, struct bdev *disk, unsigned number,
		    const struct mbr_entry *e, uint64_t off, uint64_t tbl_off)
{
	uint64_t len = (uint64_t)e->count * PART_SECTOR;
	struct partition *p;

	if (!partition_range_ok("MBR", number, off, len, disk->size,
				tbl_off, PART_SECTOR))
		return true;
	p = partition_table_append(t);
	if (!p) {
		log_warn("MBR: more than %u partitions, p%u and later are not shown",
			 PART_MAX, number);
		return false;
	}
	p->number = number;
	p->offset = off;
	p->length = len;
	snprintf(p->type, sizeof(p->type), "0x%02x", e->type);
	p->bootable = e->status & 0x80;
	return true;
}

/*
 * Walk the EBR chain of the extended partition starting at ext (bytes),
 * returning how many sound EBRs (with the signature) it read: the first that
 * many of t->table_sectors.
 * Each EBR has the MBR layout: entry 0 is a logical partition whose start is
 * relative to this EBR; entry 1 links to the next EBR, its start relative to
 * the start of the extended partition; all zero ends the chain.
 *
 * Why the walk ends: every link must move strictly forward (a loop or a
 * backward link ends it with a warning, keeping the logicals found so far),
 * and at most PART_MAX EBRs are read, so even a forward chain of 2^32
 * one-sector steps costs only PART_MAX reads.  There are valid tables that
 * order their EBRs backwards; like nbdkit, we do not accept them.
 */
static unsigned mbr_walk_logical(struct bdev *disk, struct partition_table *t,
				 uint64_t ext)
{
	uint8_t sector[PART_SECTOR];
	uint64_t ebr = ext, next;
	unsigned number = 5;
	unsigned walked;
	struct mbr_entry e;
	int r;

	for (walked = 0;;) {
		if (walked == PART_MAX) {
			log_warn("MBR: EBR chain longer than %u links, the rest is not read",
				 PART_MAX);
			break;
		}
		if (ebr < PART_SECTOR || range_exceeds(ebr, PART_SECTOR, disk->size)) {
			log_warn("MBR: EBR at byte %" PRIu64 " is outside the disk "
				 "(%" PRIu64 " bytes): the logical partitions end there",
				 ebr, disk->size);
			break;
		}
		/* watched even if unreadable or blank: a write may mend it */
		partition_table_add_sector(t, ebr);
		r = bdev_pread(disk, sector, sizeof(sector), ebr);
		if (r < 0) {
			/* damage like any other: keep the partitions found so far */
			log_warn("MBR: cannot read the EBR at byte %" PRIu64 ": %s: "
				 "the logical partitions end there", ebr, strerror(-r));
			break;
		}
		if (!mbr_signature_ok(sector)) {
			log_warn("MBR: EBR at byte %" PRIu64 " has no 0x55aa signature: "
				 "the logical partitions end there", ebr);
			break;
		}
		walked++;  /* counts sound EBRs from here on */

		mbr_entry_get(sector, 0, &e);
		if (e.count && mbr_type_is_extended(e.type)) {
			log_warn("MBR: EBR at byte %" PRIu64 " holds an extended entry "
				 "(type 0x%02x) where a logical partition belongs: ignored",
				 ebr, e.type);
		} else if (e.count) {
			if (number > PART_MAX) {
				log_warn("MBR: more than %u partitions, the rest are not shown",
					 PART_MAX);
				break;
			}
			if (!mbr_add(t, disk, number, &e,
				     ebr + (uint64_t)e.start * PART_SECTOR, ebr))
				break;
			number++;
		}

		mbr_entry_get(sector, 1, &e);
		if (e.start == 0 && e.count == 0)
			break;
		next = ext + (uint64_t)e.start * PART_SECTOR;
		if (next <= ebr) {
			log_warn("MBR: EBR at byte %" PRIu64 " links to byte %" PRIu64
				 ", not forward (a loop or a backward link): "
				 "the logical partitions end there", ebr, next);
			break;
		}
		ebr = next;
	}
	return walked;
}

/*
 * Drop the partitions that overlap one of the first n EBRs (sound ones: a
 * link into the middle of a partition that found no EBR there hides
 * nothing).  Each was already checked against its own EBR; this catches a
 * primary or a logical spanning another's.  The EBRs are in strictly
 * increasing order, so each partition is one binary search.
 */
static void mbr_drop_over_ebrs(struct partition_table *t, unsigned n)
{
	const uint64_t *ebr = t->table_sectors;
	unsigned kept = 0;

	for (unsigned i = 0; i < t->count; i++) {
		struct partition *p = &t->parts[i];
		unsigned lo = 0, hi = n;

		/* the first EBR that ends after the partition starts */
		while (lo < hi) {
			unsigned mid = lo + (hi - lo) / 2;

			if (ebr[mid] + PART_SECTOR <= p->offset)
				lo = mid + 1;
			else
				hi = mid;
		}
		if (lo < n && ebr[lo] < p->offset + p->length) {
			log_warn("MBR partition p%u (offset %" PRIu64 ", length %" PRIu64
				 ") overlaps the EBR at byte %" PRIu64 ": not shown",
				 p->number, p->offset, p->length, ebr[lo]);
			continue;
		}
		t->parts[kept++] = *p;
	}
	t->count = kept;
}

void partition_mbr_read(struct bdev *disk, const uint8_t *mbr, struct partition_table *out)
{
	struct mbr_entry e;
	uint64_t ext = 0;
	unsigned ext_slot = 0;

	memset(out, 0, sizeof(*out));
	strcpy(out->scheme, "mbr");
	out->table_bytes_head = PART_SECTOR;

	for (unsigned i = 0; i < 4; i++) {
		mbr_entry_get(mbr, i, &e);
		if (e.count == 0)
			continue;
		if (e.type == MBR_TYPE_GPT_PROTECTIVE) {
			/* partition.c only comes here when the GPT is not valid */
			log_warn("MBR: p%u is a GPT protective entry (type 0xee) with no "
				 "valid GPT behind it: not shown", i + 1);
			continue;
		}
		if (mbr_type_is_extended(e.type)) {
			/* The container is no view; its logicals are. */
			if (ext_slot) {
				log_warn("MBR: p%u is a second extended partition "
					 "(the first is p%u): its logicals are not read",
					 i + 1, ext_slot);
				continue;
			}
			ext_slot = i + 1;
			ext = (uint64_t)e.start * PART_SECTOR;
			continue;
		}
		mbr_add(out, disk, i + 1, &e, (uint64_t)e.start * PART_SECTOR, 0);
	}

	if (ext_slot)
		mbr_drop_over_ebrs(out, mbr_walk_logical(disk, out, ext));
}
