/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Shared by partition.c, partition-mbr.c and partition-gpt.c only: the one
 * place that decides whether a partition found in a table is shown, and the
 * bounded growth of the table.
 */
#ifndef IMGFS_PARTITION_INT_H
#define IMGFS_PARTITION_INT_H

#include <stdbool.h>
#include <stdint.h>

#include "partition.h"

/*
 * Parser contract (partition_mbr_read, partition_gpt_read): *out is filled
 * from scratch; scheme is set only when that kind of table was found and
 * valid, otherwise out is left empty (scheme "", count 0).  They never
 * fail: sector 0, the one read whose failure is an error, is read by
 * partition_table_read; a read error anywhere else (an EBR, a GPT header or
 * array) is damage like a bad CRC: warned, and what can still be read is
 * shown.
 */

#define PART_SECTOR 512u /* logical sector size: imgfs shows 512-byte-sector disks */

/* MBR partition types (SPEC §3): the protective type and the extended containers. */
#define MBR_TYPE_GPT_PROTECTIVE 0xee
static inline bool mbr_type_is_extended(uint8_t t)
{
	/* The same three the Linux kernel treats as containers (msdos.c). */
	return t == 0x05 || t == 0x0f || t == 0x85;
}

/* Does sector (512 bytes) end with the 0x55 0xaa boot signature? */
static inline bool mbr_signature_ok(const uint8_t *sector)
{
	return sector[510] == 0x55 && sector[511] == 0xaa;
}

/*
 * Is [off, off + len) fit to be shown as partition number of scheme on a disk
 * of disk_size bytes, with the table itself in [tbl_off, tbl_off + tbl_len)?
 *
 * The policy, the same for MBR and GPT:
 *  - a zero-length entry is empty: not shown, silently (callers skip those
 *    before calling, this is a backstop);
 *  - a partition that runs past the end of the disk is NOT shown (never
 *    truncated: a truncated window would read as a filesystem cut short,
 *    which is worse than its absence), with a warning naming the values;
 *  - a partition that overlaps the table is not shown, with a warning:
 *    writing to it would rewrite the table.  "The table" is every sector
 *    that holds it: the MBR and each sound EBR; the protective MBR, both GPT
 *    headers and both entry arrays.  A caller checks one such range per
 *    call (the MBR parser checks the other EBRs after its walk).
 */
bool partition_range_ok(const char *scheme, unsigned number,
			uint64_t off, uint64_t len, uint64_t disk_size,
			uint64_t tbl_off, uint64_t tbl_len);

/*
 * A zeroed slot at the end of t->parts (count includes it), or NULL when
 * PART_MAX partitions are already there: the caller warns and stops.  Growth
 * is geometric and bounded by PART_MAX, so a hostile table cannot make us
 * allocate without bound.
 */
struct partition *partition_table_append(struct partition_table *t);

/* Record the 512-byte sector at off as a table sector (EBRs); at most PART_MAX. */
void partition_table_add_sector(struct partition_table *t, uint64_t off);

#endif
