/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The GUID partition table (UEFI spec 2.10, §5.3): pN is entry index N
 * (1-based), empty entries skipped (SPEC §3).
 *
 * Layout, in 512-byte LBAs: LBA 0 the protective MBR (checked by
 * partition.c), LBA 1 the primary header, its entry array (usually LBA
 * 2-33), the partitions, then the backup entry array and the backup header
 * on the last LBA.  The header (§5.3.2, little-endian):
 *
 *    0 "EFI PART"       24 MyLBA            72 PartitionEntryLBA
 *    8 Revision         32 AlternateLBA     80 NumberOfPartitionEntries
 *   12 HeaderSize       40 FirstUsableLBA   84 SizeOfPartitionEntry
 *   16 HeaderCRC32      48 LastUsableLBA    88 PartitionEntryArrayCRC32
 *   20 Reserved         56 DiskGUID
 *
 * and an entry (§5.3.3): 0 type GUID, 16 unique GUID, 32 StartingLBA,
 * 40 EndingLBA (inclusive), 48 Attributes, 56 name (36 UTF-16LE units).
 *
 * A header is used only when its signature, HeaderSize (92..512), HeaderCRC32,
 * MyLBA (where we read it), entry geometry and entry-array CRC32 all check.
 * The primary is tried first; when it fails, the backup: at the primary's
 * AlternateLBA if the primary header itself was sound, else (and then) at
 * the last LBA of the disk.
 *
 * Bounds, chosen and enforced before anything is allocated or used:
 *  - SizeOfPartitionEntry a multiple of 128, from 128 to GPT_ENTRY_SIZE_MAX
 *    (the spec says 128 * 2^n; the kernel takes only 128; any multiple is
 *    harmless to read, as only the first 128 bytes of an entry are used);
 *  - NumberOfPartitionEntries * SizeOfPartitionEntry <= GPT_ARRAY_MAX
 *    (1 MiB: 8192 standard entries, 64 times the usual 128);
 *  - the array inside the disk, clear of LBA 0 and of its own header;
 *  - entries past index PART_MAX are not shown.
 * First/LastUsableLBA are not trusted for anything: each partition is
 * checked against the disk size and the table's own sectors instead (the
 * shared policy in partition.c), which is what matters for a view.
 * Partitions that overlap each other are all shown, as the kernel does.
 */
#include "partition.h"
#include "partition-int.h"
#include "util.h"

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <zlib.h>

#define GPT_HEADER_MIN      92u
#define GPT_ENTRY_SIZE_MIN  128u
#define GPT_ENTRY_SIZE_MAX  4096u
#define GPT_ARRAY_MAX       (1u << 20)
#define GPT_NAME_UNITS      36u

struct gpt_header {
	uint64_t my_lba;
	uint64_t alt_lba;
	uint64_t entries_lba;
	uint32_t nentries;
	uint32_t entry_size;
	uint32_t entries_crc;
	uint64_t array_bytes;  /* nentries * entry_size, checked */
};

static uint32_t crc32_buf(const void *buf, size_t len)
{
	return (uint32_t)crc32(crc32(0L, Z_NULL, 0), buf, (uInt)len);
}

static uint64_t sectors_for(uint64_t bytes)
{
	return (bytes + PART_SECTOR - 1) / PART_SECTOR;
}

/*
 * Read and check the header at lba (which: "primary" or "backup" for the
 * messages).  True if sound; if not, false with a warning naming the value.
 * A read error is damage like any other: the other copy may still be read
 * (a qcow2 cluster that fails with EIO must not hide a good backup).
 */
static bool gpt_header_read(struct bdev *disk, uint64_t lba, const char *which,
			   struct gpt_header *h)
{
	uint8_t s[PART_SECTOR];
	uint64_t nsect = disk->size / PART_SECTOR;
	uint32_t hsize, crc;
	int r;

	memset(h, 0, sizeof(*h));
	if (lba == 0 || lba >= nsect) {
		log_warn("GPT: %s header LBA %" PRIu64 " is outside the disk (%" PRIu64
			 " sectors)", which, lba, nsect);
		return false;
	}
	r = bdev_pread(disk, s, sizeof(s), lba * PART_SECTOR);
	if (r < 0) {
		log_warn("GPT: cannot read the %s header at LBA %" PRIu64 ": %s",
			 which, lba, strerror(-r));
		return false;
	}
	if (memcmp(s, "EFI PART", 8) != 0) {
		log_warn("GPT: no %s header at LBA %" PRIu64 " (no \"EFI PART\" signature)",
			 which, lba);
		return false;
	}
	hsize = le32(s + 12);
	if (hsize < GPT_HEADER_MIN || hsize > PART_SECTOR) {
		log_warn("GPT: %s header at LBA %" PRIu64 ": HeaderSize %" PRIu32
			 " is not in %u..%u", which, lba, hsize, GPT_HEADER_MIN, PART_SECTOR);
		return false;
	}
	crc = le32(s + 16);
	memset(s + 16, 0, 4);  /* the CRC is computed with its own field zeroed */
	if (crc32_buf(s, hsize) != crc) {
		log_warn("GPT: %s header at LBA %" PRIu64 ": HeaderCRC32 0x%08" PRIx32
			 " does not match its contents (0x%08" PRIx32 ")",
			 which, lba, crc, crc32_buf(s, hsize));
		return false;
	}
	h->my_lba = le64(s + 24);
	h->alt_lba = le64(s + 32);
	h->entries_lba = le64(s + 72);
	h->nentries = le32(s + 80);
	h->entry_size = le32(s + 84);
	h->entries_crc = le32(s + 88);
	if (h->my_lba != lba) {
		log_warn("GPT: %s header read at LBA %" PRIu64 " says it is at LBA %" PRIu64,
			 which, lba, h->my_lba);
		return false;
	}
	if (h->entry_size < GPT_ENTRY_SIZE_MIN || h->entry_size > GPT_ENTRY_SIZE_MAX ||
	    h->entry_size % GPT_ENTRY_SIZE_MIN) {
		log_warn("GPT: %s header: SizeOfPartitionEntry %" PRIu32 " is not a "
			 "multiple of %u from %u to %u", which, h->entry_size,
			 GPT_ENTRY_SIZE_MIN, GPT_ENTRY_SIZE_MIN, GPT_ENTRY_SIZE_MAX);
		return false;
	}
	h->array_bytes = (uint64_t)h->nentries * h->entry_size; /* < 2^44 */
	if (h->array_bytes > GPT_ARRAY_MAX) {
		log_warn("GPT: %s header: %" PRIu32 " entries of %" PRIu32 " bytes "
			 "exceed the %u-byte bound on the entry array",
			 which, h->nentries, h->entry_size, GPT_ARRAY_MAX);
		return false;
	}
	if (h->entries_lba == 0 || h->entries_lba >= nsect ||
	    sectors_for(h->array_bytes) > nsect - h->entries_lba ||
	    (lba >= h->entries_lba && lba < h->entries_lba + sectors_for(h->array_bytes))) {
		log_warn("GPT: %s header: entry array at LBA %" PRIu64 " (%" PRIu64
			 " bytes) is outside the disk or overlaps LBA 0 or the header",
			 which, h->entries_lba, h->array_bytes);
		return false;
	}
	return true;
}

/*
 * Read h's entry array into a new buffer (*out) and check its CRC.  True if
 * sound; false, with a warning, if not (or if it cannot be read).
 */
static bool gpt_entries_read(struct bdev *disk, const struct gpt_header *h,
			     const char *which, uint8_t **out)
{
	uint8_t *a = xmalloc(h->array_bytes);  /* bounded by GPT_ARRAY_MAX */
	uint32_t crc;
	int r;

	*out = NULL;
	r = bdev_pread(disk, a, h->array_bytes, h->entries_lba * PART_SECTOR);
	if (r < 0) {
		log_warn("GPT: cannot read the %s entry array at LBA %" PRIu64 ": %s",
			 which, h->entries_lba, strerror(-r));
		free(a);
		return false;
	}
	crc = crc32_buf(a, h->array_bytes);
	if (crc != h->entries_crc) {
		log_warn("GPT: %s entry array at LBA %" PRIu64 ": PartitionEntryArrayCRC32 "
			 "0x%08" PRIx32 " does not match its contents (0x%08" PRIx32 ")",
			 which, h->entries_lba, h->entries_crc, crc);
		free(a);
		return false;
	}
	*out = a;
	return true;
}

/* A header and its entries, both sound (else warned, *entries NULL). */
static bool gpt_load(struct bdev *disk, uint64_t lba, const char *which,
		     struct gpt_header *h, bool *header_ok, uint8_t **entries)
{
	*entries = NULL;
	*header_ok = gpt_header_read(disk, lba, which, h);
	return *header_ok && gpt_entries_read(disk, h, which, entries);
}

/* The standard text form: the first three fields little-endian, lower case. */
static void gpt_guid_format(const uint8_t *g, char out[37])
{
	snprintf(out, 37,
		 "%08" PRIx32 "-%04x-%04x-%02x%02x-%02x%02x%02x%02x%02x%02x",
		 le32(g), le16(g + 4), le16(g + 6), g[8], g[9],
		 g[10], g[11], g[12], g[13], g[14], g[15]);
}

static size_t utf8_put(char *out, uint32_t c)
{
	if (c < 0x80) {
		out[0] = (char)c;
		return 1;
	}
	if (c < 0x800) {
		out[0] = (char)(0xc0 | c >> 6);
		out[1] = (char)(0x80 | (c & 0x3f));
		return 2;
	}
	if (c < 0x10000) {
		out[0] = (char)(0xe0 | c >> 12);
		out[1] = (char)(0x80 | (c >> 6 & 0x3f));
		out[2] = (char)(0x80 | (c & 0x3f));
		return 3;
	}
	out[0] = (char)(0xf0 | c >> 18);
	out[1] = (char)(0x80 | (c >> 12 & 0x3f));
	out[2] = (char)(0x80 | (c >> 6 & 0x3f));
	out[3] = (char)(0x80 | (c & 0x3f));
	return 4;
}

/*
 * The 36 UTF-16LE units of a partition name to UTF-8, up to the first NUL.
 * A lone surrogate becomes U+FFFD.  36 units need at most 108 bytes (a
 * surrogate pair is 2 units for 4 bytes), so out (>= 109) always suffices.
 */
static void gpt_name_to_utf8(const uint8_t *name, char *out, size_t outlen)
{
	size_t o = 0;

	for (unsigned i = 0; i < GPT_NAME_UNITS; i++) {
		uint32_t c = le16(name + 2 * i);

		if (c == 0)
			break;
		if (c >= 0xd800 && c < 0xdc00 && i + 1 < GPT_NAME_UNITS &&
		    le16(name + 2 * i + 2) >= 0xdc00 && le16(name + 2 * i + 2) < 0xe000) {
			c = 0x10000 + ((c - 0xd800) << 10) + (le16(name + 2 * i + 2) - 0xdc00);
			i++;
		} else if (c >= 0xd800 && c < 0xe000) {
			c = 0xfffd;
		}
		if (o + 4 >= outlen)
			break;
		o += utf8_put(out + o, c);
	}
	out[o] = '\0';
}

/*
 * Byte ranges that hold the table: a partition over one is not shown.  At
 * most four: LBA 0-1, the primary array, the backup header and array.
 */
struct gpt_regions {
	unsigned n;
	uint64_t off[4], len[4];
};

static void gpt_region_add(struct gpt_regions *r, uint64_t lba, uint64_t sectors)
{
	r->off[r->n] = lba * PART_SECTOR;
	r->len[r->n] = sectors * PART_SECTOR;
	r->n++;
}

/* Watch n sectors from lba (n <= the array bound, so the loop is short). */
static void gpt_watch(struct partition_table *t, uint64_t lba, uint64_t n)
{
	for (uint64_t i = 0; i < n; i++)
		partition_table_add_sector(t, (lba + i) * PART_SECTOR);
}

/* Add the non-empty, valid entries of the array a described by h. */
static void gpt_add_entries(struct bdev *disk, struct partition_table *t,
			    const struct gpt_header *h, const uint8_t *a,
			    const struct gpt_regions *tbl)
{
	static const uint8_t zero_guid[16];
	uint64_t nsect = disk->size / PART_SECTOR;

	for (uint32_t i = 0; i < h->nentries; i++) {
		const uint8_t *e = a + (size_t)i * h->entry_size;
		unsigned number = i + 1;
		uint64_t first, last, off, len;
		struct partition *p;

		if (memcmp(e, zero_guid, 16) == 0)
			continue;  /* empty entry */
		if (number > PART_MAX) {
			log_warn("GPT: entry %u and later are past the bound of %u "
				 "partitions: not shown", number, PART_MAX);
			return;
		}
		first = le64(e + 32);
		last = le64(e + 40);
		if (last < first) {
			log_warn("GPT partition p%u ends (LBA %" PRIu64 ") before it "
				 "starts (LBA %" PRIu64 "): not shown", number, last, first);
			continue;
		}
		if (last >= nsect) {
			/* checked in LBAs first: first * 512 might not fit 64 bits */
			log_warn("GPT partition p%u (LBA %" PRIu64 "-%" PRIu64 ") ends "
				 "past the end of the disk (%" PRIu64 " sectors): not shown",
				 number, first, last, nsect);
			continue;
		}
		off = first * PART_SECTOR;
		len = (last - first + 1) * PART_SECTOR;
		unsigned k = 0;
		while (k < tbl->n && partition_range_ok("GPT", number, off, len, disk->size,
							tbl->off[k], tbl->len[k]))
			k++;
		if (k < tbl->n)
			continue;
		p = partition_table_append(t);
		if (!p)
			return;  /* cannot happen: number <= PART_MAX bounds count */
		p->number = number;
		p->offset = off;
		p->length = len;
		gpt_guid_format(e, p->type);
		gpt_guid_format(e + 16, p->uuid);
		gpt_name_to_utf8(e + 56, p->label, sizeof(p->label));
		p->bootable = le64(e + 48) & (1u << 2); /* legacy BIOS bootable */
	}
}

void partition_gpt_read(struct bdev *disk, struct partition_table *out)
{
	uint64_t nsect = disk->size / PART_SECTOR;
	struct gpt_header h, b = { 0 };
	uint8_t *entries = NULL;
	bool primary_header_ok, backup_header_ok = false, used_backup = false;

	memset(out, 0, sizeof(*out));
	if (nsect < 3)  /* protective MBR, a header, at least one more sector */
		return;

	if (!gpt_load(disk, 1, "primary", &h, &primary_header_ok, &entries)) {
		/* The backup: where a sound primary header says, then the last LBA. */
		uint64_t at[2];
		unsigned n = 0;
		bool ok = false;

		if (primary_header_ok && h.alt_lba != nsect - 1 && h.alt_lba > 1 &&
		    h.alt_lba < nsect)
			at[n++] = h.alt_lba;
		at[n++] = nsect - 1;
		for (unsigned i = 0; i < n && !ok; i++)
			ok = gpt_load(disk, at[i], "backup", &b, &backup_header_ok, &entries);
		if (!ok) {
			log_warn("GPT: neither the primary nor the backup table is valid");
			return;
		}
		log_warn("GPT: the primary table is damaged: using the backup at LBA %"
			 PRIu64, b.my_lba);
		used_backup = true;
	} else if (h.alt_lba > 1 && h.alt_lba < nsect) {
		/* Locate the backup only to watch its sectors (table_bytes_tail). */
		backup_header_ok = gpt_header_read(disk, h.alt_lba, "backup", &b);
		if (!backup_header_ok) {
			/* assume the usual layout: the array just before the header */
			b = h;
			b.my_lba = h.alt_lba;
			b.entries_lba = h.alt_lba > sectors_for(h.array_bytes) ?
				h.alt_lba - sectors_for(h.array_bytes) : h.alt_lba;
		}
	}

	strcpy(out->scheme, "gpt");
	{
		struct gpt_regions tbl = { 0 };
		uint64_t asec;

		/*
		 * Head (table_bytes_head): the protective MBR, the primary
		 * header, and the primary array when it follows them at LBA 2,
		 * where every tool writes it; an array elsewhere is watched by
		 * its own sectors instead, not by a span from LBA 0.  A damaged
		 * primary's array is assumed at LBA 2 with the backup's size.
		 */
		if (used_backup) {
			asec = MIN(2 + sectors_for(b.array_bytes), nsect);
			gpt_region_add(&tbl, 0, asec);
			out->table_bytes_head = asec * PART_SECTOR;
		} else {
			asec = sectors_for(h.array_bytes);
			gpt_region_add(&tbl, 0, 2);
			gpt_region_add(&tbl, h.entries_lba, asec);
			if (h.entries_lba == 2) {
				out->table_bytes_head = (2 + asec) * PART_SECTOR;
			} else {
				out->table_bytes_head = 2 * PART_SECTOR;
				gpt_watch(out, h.entries_lba, asec);
			}
		}
		/*
		 * Tail: the backup header and array.  In the usual layout (the
		 * array right before the header on the last LBA) they are the
		 * table's tail; anywhere else, as on a disk grown since, only
		 * their sectors are watched, not all the space after them.
		 */
		if (used_backup || (h.alt_lba > 1 && h.alt_lba < nsect)) {
			asec = sectors_for(b.array_bytes);
			gpt_region_add(&tbl, b.my_lba, 1);
			gpt_region_add(&tbl, b.entries_lba, asec);
			if (b.my_lba == nsect - 1 && b.entries_lba + asec == b.my_lba &&
			    b.entries_lba * PART_SECTOR >= out->table_bytes_head) {
				out->table_at_end = true;
				out->table_bytes_tail = disk->size - b.entries_lba * PART_SECTOR;
			} else {
				gpt_watch(out, b.entries_lba, asec);
				gpt_watch(out, b.my_lba, 1);
			}
		}
		gpt_add_entries(disk, out, used_backup ? &b : &h, entries, &tbl);
	}
	free(entries);
}
