/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The file device: a regular file or a block device, by pread/pwrite,
 * fallocate, fdatasync and SEEK_DATA, with qemu-compatible OFD locks.
 */
#include "formats.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/fs.h>
#include <stdlib.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

struct file_dev {
	int fd;
	char *path;
	bool is_blk;
	bool no_nowait;     /* the file system refused RWF_NOWAIT once */
};

static struct file_dev *F(struct bdev *d) { return d->priv; }

/* Reads past EOF give zeroes: qemu pads images only to a sector, and a
 * compressed cluster may end in the last, partial sector.  flags: preadv2's
 * (RWF_NOWAIT), 0 for a plain pread. */
static int read_at(struct bdev *d, void *buf, size_t len, uint64_t off, int flags)
{
	char *p = buf;

	while (len) {
		struct iovec iov = { p, len };
		ssize_t n = preadv2(F(d)->fd, &iov, 1, (off_t)off, flags);

		if (n < 0) {
			if (errno == EINTR)
				continue;
			return -errno;
		}
		if (n == 0) {
			memset(p, 0, len);
			return 0;
		}
		p += n;
		off += (uint64_t)n;
		len -= (size_t)n;
	}
	return 0;
}

static int file_pread(struct bdev *d, void *buf, size_t len, uint64_t off)
{
	return read_at(d, buf, len, off, 0);
}

/* From the page cache only (RWF_NOWAIT): -EAGAIN for any byte not there. */
static int file_pread_nowait(struct bdev *d, void *buf, size_t len, uint64_t off)
{
	int r;

	if (F(d)->no_nowait)
		return -EAGAIN;
	r = read_at(d, buf, len, off, RWF_NOWAIT);
	if (r == -EOPNOTSUPP || r == -EINVAL || r == -ENOSYS)
		F(d)->no_nowait = true;
	return r < 0 ? -EAGAIN : 0;
}

static void size_grow(struct bdev *d, uint64_t end)
{
	uint64_t cur = __atomic_load_n(&d->size, __ATOMIC_RELAXED);

	while (end > cur &&
	       !__atomic_compare_exchange_n(&d->size, &cur, end, true,
					    __ATOMIC_RELAXED, __ATOMIC_RELAXED))
		;
}

/*
 * Write-behind: a large write starts the host's writeback of its own range
 * at once (asynchronously: no durability is promised until a flush).  A
 * client that writes a lot then flushes — fio's end_fsync, qemu-img
 * convert, a guest's sync — otherwise finds the whole range dirty at the
 * flush and waits for the disk after the transfer instead of during it:
 * 1 GiB of 1 MiB writes then fsync through a qcow2 mount went from
 * 2.1-2.3 to 3.0-3.3 GB/s (doc/performance.md).  Small writes are left
 * alone: random 4 KiB writes are often rewritten before their flush.
 */
#define WRITE_BEHIND_MIN (256u << 10)

static void write_behind(int fd, uint64_t start, uint64_t end)
{
	/* advisory: an error here is met again, and reported, by the flush */
	(void)sync_file_range(fd, (off_t)start, (off_t)(end - start), SYNC_FILE_RANGE_WRITE);
}

static int file_pwrite(struct bdev *d, const void *buf, size_t len, uint64_t off,
		       unsigned flags)
{
	const char *p = buf;
	uint64_t end = off + len;
	size_t total = len;

	while (len) {
		ssize_t n = pwrite(F(d)->fd, p, len, (off_t)off);

		if (n < 0) {
			if (errno == EINTR)
				continue;
			return -errno;
		}
		p += n;
		off += (uint64_t)n;
		len -= (size_t)n;
	}
	if (d->growable)
		size_grow(d, end);
	if (flags & BDEV_FUA)
		return fdatasync(F(d)->fd) < 0 ? -errno : 0;
	if (total >= WRITE_BEHIND_MIN)
		write_behind(F(d)->fd, end - total, end);
	return 0;
}

static int file_zero(struct bdev *d, uint64_t off, uint64_t len, unsigned flags)
{
	int mode = (flags & BDEV_MAY_UNMAP) ? FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
					    : FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE;

	if (F(d)->is_blk)
		return -ENOTSUP;
	if (fallocate(F(d)->fd, mode, (off_t)off, (off_t)len) < 0) {
		if (errno == EOPNOTSUPP || errno == ENOSYS)
			return -ENOTSUP;
		return -errno;
	}
	if ((flags & BDEV_FUA) && fdatasync(F(d)->fd) < 0)
		return -errno;
	return 0;
}

static int file_discard(struct bdev *d, uint64_t off, uint64_t len)
{
	if (F(d)->is_blk)
		return 0;
	if (fallocate(F(d)->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
		      (off_t)off, (off_t)len) < 0 && errno != EOPNOTSUPP)
		return -errno;
	return 0;
}

static int file_flush(struct bdev *d)
{
	return fdatasync(F(d)->fd) < 0 ? -errno : 0;
}

/* Allocation from SEEK_DATA/SEEK_HOLE; a file has no backing: depth 1 or 0. */
static int file_block_status(struct bdev *d, uint64_t off, uint64_t len,
			     uint64_t *run, unsigned *status, unsigned *depth)
{
	int fd = F(d)->fd;
	off_t data, hole;

	if (F(d)->is_blk)
		goto all_data;
	data = lseek(fd, (off_t)off, SEEK_DATA);
	if (data < 0) {
		if (errno == ENXIO) { /* no data from off to EOF */
			*run = len;
			*status = BDEV_ST_HOLE | BDEV_ST_ZERO;
			*depth = 0;
			return 0;
		}
		goto all_data;
	}
	if ((uint64_t)data > off) {
		*run = MIN(len, (uint64_t)data - off);
		*status = BDEV_ST_HOLE | BDEV_ST_ZERO;
		*depth = 0;
		return 0;
	}
	hole = lseek(fd, (off_t)off, SEEK_HOLE);
	if (hole < 0 || (uint64_t)hole <= off)
		goto all_data;
	*run = MIN(len, (uint64_t)hole - off);
	*status = 0;
	*depth = 1;
	return 0;
all_data:
	*run = len;
	*status = 0;
	*depth = 1;
	return 0;
}

/* The file's own bytes, then zeroes past its end (as file_pread reads). */
static int64_t file_map(struct bdev *d, uint64_t off, uint64_t len, struct bdev_extents *x)
{
	uint64_t size = __atomic_load_n(&d->size, __ATOMIC_RELAXED);
	uint64_t in = off < size ? MIN(len, size - off) : 0;

	return bdev_extents_pad(x, bdev_extents_add(x, F(d)->fd, off, in) ? (int64_t)in : 0,
				in, len);
}

static void file_close(struct bdev *d)
{
	close(F(d)->fd);
	free(F(d)->path);
	free(F(d));
}

static const struct bdev_ops file_ops = {
	.pread = file_pread,
	.pread_nowait = file_pread_nowait,
	.pwrite = file_pwrite,
	.zero = file_zero,
	.discard = file_discard,
	.flush = file_flush,
	.block_status = file_block_status,
	.close = file_close,
	.map = file_map,
};

int file_fd(struct bdev *file)
{
	return F(file)->fd;
}

/*
 * qemu's image locking (block/file-posix.c, raw_apply_lock_bytes): for each
 * permission bit i a user holds, a shared OFD lock on byte 100 + i; for each
 * bit it does not let others have, a shared lock on byte 200 + i.  A
 * conflict is someone else holding 200 + i for a bit we want, or 100 + i
 * for a bit we refuse to share.  OFD locks belong to the open file
 * description, so two opens in one process conflict like two processes.
 */
#define LOCK_PERM_BASE   100
#define LOCK_SHARED_BASE 200

static const char *perm_name(unsigned bit)
{
	static const char *const names[] = { "consistent read", "write", "write unchanged", "resize" };
	return bit < ARRAY_SIZE(names) ? names[bit] : "?";
}

static int lock_byte(int fd, off_t byte, short type, int cmd)
{
	struct flock fl = {
		.l_type = type, .l_whence = SEEK_SET, .l_start = byte, .l_len = 1,
	};

	if (fcntl(fd, cmd, &fl) < 0)
		return -errno;
	if (cmd == F_OFD_GETLK)
		return fl.l_type == F_UNLCK ? 0 : -EAGAIN;
	return 0;
}

int file_lock(struct bdev *file, unsigned perm, unsigned shared, struct err *e)
{
	int fd = F(file)->fd;
	unsigned i;
	int r;

	/* take ours first, so a racing opener sees them, then test theirs */
	for (i = 0; i < 4; i++) {
		if ((perm & (1u << i)) &&
		    (r = lock_byte(fd, LOCK_PERM_BASE + i, F_RDLCK, F_OFD_SETLK)) < 0)
			goto fail;
		if (!(shared & (1u << i)) &&
		    (r = lock_byte(fd, LOCK_SHARED_BASE + i, F_RDLCK, F_OFD_SETLK)) < 0)
			goto fail;
	}
	for (i = 0; i < 4; i++) {
		if ((perm & (1u << i)) &&
		    lock_byte(fd, LOCK_SHARED_BASE + i, F_WRLCK, F_OFD_GETLK) == -EAGAIN)
			return err_set(e, -EAGAIN,
				       "%s: image is in use: another process does not share '%s' access (Failed to get \"%s\" lock)",
				       F(file)->path, perm_name(i), perm_name(i));
		if (!(shared & (1u << i)) &&
		    lock_byte(fd, LOCK_PERM_BASE + i, F_WRLCK, F_OFD_GETLK) == -EAGAIN)
			return err_set(e, -EAGAIN,
				       "%s: image is in use: another process holds '%s' access (Failed to get shared \"%s\" lock)",
				       F(file)->path, perm_name(i), perm_name(i));
	}
	return 0;
fail:
	if (r == -EINVAL || r == -ENOLCK || r == -EOPNOTSUPP) {
		log_warn("%s: cannot take image locks: %s", F(file)->path, strerror(-r));
		return 0;
	}
	return err_set(e, r, "%s: cannot lock: %s", F(file)->path, strerror(-r));
}

int file_open(const char *path, unsigned flags, struct bdev **out, struct err *e)
{
	bool writable = flags & FILE_WRITABLE;
	struct file_dev *f;
	struct stat st;
	uint64_t size;
	int fd;

	/* O_NONBLOCK: a name taken from an image (a backing or data file) may
	 * be a FIFO or a tty, whose open would block for ever or take a
	 * controlling terminal; they are refused below, after an open that
	 * returns at once.  It does nothing to regular files and block
	 * devices, and is cleared again for them. */
	fd = open(path, (writable ? O_RDWR : O_RDONLY) | O_CLOEXEC | O_NONBLOCK | O_NOCTTY);
	if (fd < 0)
		return err_set(e, -errno, "%s: %s", path, strerror(errno));
	if (fstat(fd, &st) < 0) {
		int r = -errno;
		close(fd);
		return err_set(e, r, "%s: %s", path, strerror(-r));
	}
	if (S_ISBLK(st.st_mode)) {
		if (ioctl(fd, BLKGETSIZE64, &size) < 0) {
			int r = -errno;
			close(fd);
			return err_set(e, r, "%s: cannot get device size: %s", path, strerror(-r));
		}
	} else if (S_ISREG(st.st_mode)) {
		size = (uint64_t)st.st_size;
	} else {
		close(fd);
		return err_set(e, -EINVAL, "%s: not a regular file or block device", path);
	}
	if (fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) & ~O_NONBLOCK) < 0) {
		int r = -errno;
		close(fd);
		return err_set(e, r, "%s: %s", path, strerror(-r));
	}
	f = xcalloc(1, sizeof(*f));
	f->fd = fd;
	f->path = xstrdup(path);
	f->is_blk = S_ISBLK(st.st_mode);
	*out = bdev_new(&file_ops, "file", size, !writable, f);
	(*out)->growable = writable && !f->is_blk;
	if (!(flags & FILE_NO_LOCK)) {
		/* a writer unshares write and resize; a reader unshares write */
		unsigned perm = writable ? QEMU_PERM_ALL : QEMU_PERM_CONSISTENT_READ;
		unsigned shared = writable
			? QEMU_PERM_CONSISTENT_READ | QEMU_PERM_WRITE_UNCHANGED
			: QEMU_PERM_ALL & ~QEMU_PERM_WRITE;
		int r = file_lock(*out, perm, shared, e);

		if (r < 0) {
			bdev_close(*out);
			*out = NULL;
			return r;
		}
	}
	return 0;
}
