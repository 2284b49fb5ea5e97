/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* Partition tables (MBR with EBR chain, GPT) read from a disk device. */
#ifndef IMGFS_PARTITION_H
#define IMGFS_PARTITION_H

#include "bdev.h"

#define PART_MAX 4096 /* bound on partitions shown (EBR chain, GPT entries) */

struct partition {
	unsigned number;    /* N of pN: MBR 1-4 primary, 5+ logical in chain order; GPT entry index (1-based) */
	uint64_t offset;    /* bytes from the start of the disk */
	uint64_t length;    /* bytes */
	char type[40];      /* MBR: "0x83"; GPT: type GUID, lower case, 36 chars */
	char uuid[40];      /* GPT unique partition GUID, "" for MBR */
	char label[160];    /* GPT name as UTF-8, "" for MBR */
	bool bootable;      /* MBR active flag */
};

struct partition_table {
	char scheme[8];     /* "mbr", "gpt" or "" (none found) */
	unsigned count;
	struct partition *parts; /* sorted by number */
	uint64_t table_bytes_head; /* bytes at the disk start the table occupies (MBR: 512, GPT: through the entry array) */
	bool table_at_end;         /* GPT: a backup table at the end of the disk */
	uint64_t table_bytes_tail; /* bytes at the end the backup occupies */
	/*
	 * Added by partitions: more table sectors that are neither head nor
	 * tail, 512 bytes at each byte offset listed (MBR: every EBR of the
	 * extended chain, in chain order, which only goes forward; GPT: the
	 * sectors of an entry array not at LBA 2, of a backup not at the end
	 * of the disk, as after the disk grew).  At most PART_MAX.  A write
	 * there changes the table too.
	 */
	uint64_t *table_sectors;
	unsigned ntable_sectors;
};

/*
 * Read the partition table of disk.  Never fails on a malformed table: bad
 * entries are skipped (each with a log_warn naming it), a table that cannot
 * be read at all gives count 0.  Returns 0, or a negative errno only for an
 * I/O error reading the disk.
 */
int partition_table_read(struct bdev *disk, struct partition_table *out);
void partition_table_free(struct partition_table *t);

/*
 * The parsers partition_table_read chooses between, for unit tests.  mbr is
 * sector 0 of disk (512 bytes), already read and its 0x55aa signature
 * checked by the caller: the one read of it serves the choice and the MBR.
 */
void partition_mbr_read(struct bdev *disk, const uint8_t *mbr, struct partition_table *out);
void partition_gpt_read(struct bdev *disk, struct partition_table *out);

#endif
