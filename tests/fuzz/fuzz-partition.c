/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * libFuzzer harness for the partition table parsers.  The input is a disk:
 * its first 8 bytes (little-endian) give the disk size in bytes (bounded to
 * 1 TiB, at least the data), the rest is the disk's first bytes; past them
 * the disk reads as zeroes.  So a tiny input can describe a huge disk with
 * its tables anywhere the fuzzer finds a way to point.
 *
 * Build (not part of `make`; the engine has no libFuzzer build yet):
 *   clang -g -O1 -fsanitize=fuzzer,address,undefined -D_GNU_SOURCE -Iformats \
 *     tests/fuzz/fuzz-partition.c formats/partition*.c formats/util.c \
 *     formats/bdev.c -lz -pthread -o fuzz-partition
 *   mkdir new && ./fuzz-partition -max_len=40000 new tests/fuzz/corpus/partition
 * (new inputs go to the first directory; the seeds stay as they are).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bdev.h"
#include "partition.h"
#include "util.h"

struct fuzz_disk {
	const uint8_t *data;
	size_t len;
};

static int fuzz_pread(struct bdev *d, void *buf, size_t len, uint64_t off)
{
	const struct fuzz_disk *f = d->priv;
	size_t have = 0;

	if (off < f->len)
		have = MIN(len, f->len - off);
	memcpy(buf, f->data + off, have);
	memset((uint8_t *)buf + have, 0, len - have);
	return 0;
}

static const struct bdev_ops fuzz_ops = { .pread = fuzz_pread };

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct fuzz_disk f;
	struct partition_table t;
	struct bdev *d;
	uint64_t disk_size;

	if (size < 8)
		return 0;
	log_set_level(LOG_LVL_ERR);
	f.data = data + 8;
	f.len = size - 8;
	disk_size = MAX(le64(data) & ((1ull << 40) - 1), f.len);
	d = bdev_new(&fuzz_ops, "fuzz", disk_size, true, &f);
	if (partition_table_read(d, &t) == 0) {
		for (unsigned i = 0; i < t.count; i++) {
			const struct partition *p = &t.parts[i];

			if (!p->length || p->offset < 512 ||
			    range_exceeds(p->offset, p->length, disk_size) ||
			    (i && t.parts[i - 1].number >= p->number))
				abort();
		}
		if (t.count > PART_MAX || t.ntable_sectors > PART_MAX)
			abort();
	}
	partition_table_free(&t);
	bdev_close(d);
	return 0;
}
