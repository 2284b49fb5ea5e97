/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * writelog.so: an LD_PRELOAD write recorder for the power-loss test.
 *
 *   IMGFS_WRITELOG_FILE  the image whose writes are recorded
 *   IMGFS_WRITELOG       the log, appended to (created if missing)
 *
 * Every pwrite/pwrite64/pwritev, fallocate, ftruncate and every completed
 * fdatasync/fsync on a descriptor of that file (the same device and inode,
 * so any path or open flag matches) becomes one record.  tests/lib/
 * powerloss.py replays a prefix of them onto a copy of the image taken
 * before the mount: what a power loss may leave, unlike a SIGKILL, which
 * keeps everything in the host page cache.
 *
 * Record (little-endian):  u32 magic 'WLR1', u32 op, u64 offset, u64 length,
 * u64 CLOCK_MONOTONIC ns, then the bytes of a write (length of them), then
 * u32 'WEND'.  A record without its trailer (the daemon killed while
 * appending) is not a record: the reader stops there.
 *
 * One lock is held around each recorded call and its record, so the log's
 * order is the order the calls happened in: a write logged before a barrier
 * completed before that fdatasync began, and so is durable once it returns;
 * a write logged after it may or may not be.  The lock serialises the
 * daemon's image writes and flushes — a legal schedule, and a slower one.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

enum { WL_WRITE = 1, WL_ZERO = 2, WL_ALLOC = 3, WL_TRUNCATE = 4, WL_BARRIER = 5 };

#define WL_MAGIC 0x31524c57u /* "WLR1" */
#define WL_END   0x444e4557u /* "WEND" */

struct wl_head {
	uint32_t magic, op;
	uint64_t off, len, ns;
};

static pthread_mutex_t wl_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_once_t wl_once = PTHREAD_ONCE_INIT;
static int wl_fd = -1;
static dev_t wl_dev;
static ino_t wl_ino;

static ssize_t (*real_pwrite)(int, const void *, size_t, off_t);
static ssize_t (*real_pwrite64)(int, const void *, size_t, off_t);
static ssize_t (*real_pwritev)(int, const struct iovec *, int, off_t);
static int (*real_fdatasync)(int);
static int (*real_fsync)(int);
static int (*real_fallocate)(int, int, off_t, off_t);
static int (*real_fallocate64)(int, int, off_t, off_t);
static int (*real_ftruncate)(int, off_t);

static void *next_sym(const char *name)
{
	return dlsym(RTLD_NEXT, name);
}

static void wl_init(void)
{
	const char *img = getenv("IMGFS_WRITELOG_FILE");
	const char *log = getenv("IMGFS_WRITELOG");
	struct stat st;

	real_pwrite = next_sym("pwrite");
	real_pwrite64 = next_sym("pwrite64");
	real_pwritev = next_sym("pwritev");
	real_fdatasync = next_sym("fdatasync");
	real_fsync = next_sym("fsync");
	real_fallocate = next_sym("fallocate");
	real_fallocate64 = next_sym("fallocate64");
	real_ftruncate = next_sym("ftruncate");
	if (!img || !log || stat(img, &st) < 0)
		return;
	wl_dev = st.st_dev;
	wl_ino = st.st_ino;
	/* above the low descriptors, which a daemon may close or reuse */
	int fd = open(log, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);

	if (fd >= 0) {
		wl_fd = fcntl(fd, F_DUPFD_CLOEXEC, 100);
		close(fd);
	}
}

/* Is fd the recorded image?  Takes the lock when it is (the caller drops it). */
static int wl_begin(int fd)
{
	struct stat st;

	pthread_once(&wl_once, wl_init);
	if (wl_fd < 0 || fd == wl_fd || fstat(fd, &st) < 0 ||
	    st.st_dev != wl_dev || st.st_ino != wl_ino)
		return 0;
	pthread_mutex_lock(&wl_lock);
	return 1;
}

static void put_all(const void *buf, size_t len)
{
	const char *p = buf;

	while (len) {
		ssize_t n = write(wl_fd, p, len);

		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			abort(); /* a lost record would make the replay lie */
		p += n;
		len -= (size_t)n;
	}
}

/* Append one record; iov holds a write's bytes (none for other ops). */
static void wl_record(uint32_t op, uint64_t off, uint64_t len,
		      const struct iovec *iov, int iovcnt)
{
	struct timespec ts;
	struct wl_head h = { .magic = WL_MAGIC, .op = op, .off = off, .len = len };
	uint32_t end = WL_END;
	uint64_t left = iov ? len : 0;
	int saved = errno;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	h.ns = (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
	put_all(&h, sizeof(h));
	for (int i = 0; i < iovcnt && left; i++) {
		size_t n = iov[i].iov_len < left ? iov[i].iov_len : (size_t)left;

		put_all(iov[i].iov_base, n);
		left -= n;
	}
	put_all(&end, sizeof(end));
	errno = saved;
}

static ssize_t record_write(ssize_t (*real)(int, const void *, size_t, off_t),
			    int fd, const void *buf, size_t len, off_t off)
{
	ssize_t n;

	if (!wl_begin(fd))
		return real(fd, buf, len, off);
	n = real(fd, buf, len, off);
	if (n > 0) {
		struct iovec v = { .iov_base = (void *)buf, .iov_len = (size_t)n };

		wl_record(WL_WRITE, (uint64_t)off, (uint64_t)n, &v, 1);
	}
	pthread_mutex_unlock(&wl_lock);
	return n;
}

ssize_t pwrite(int fd, const void *buf, size_t len, off_t off)
{
	pthread_once(&wl_once, wl_init);
	return record_write(real_pwrite, fd, buf, len, off);
}

ssize_t pwrite64(int fd, const void *buf, size_t len, off_t off)
{
	pthread_once(&wl_once, wl_init);
	return record_write(real_pwrite64, fd, buf, len, off);
}

ssize_t pwritev(int fd, const struct iovec *iov, int iovcnt, off_t off)
{
	ssize_t n;

	if (!wl_begin(fd))
		return real_pwritev(fd, iov, iovcnt, off);
	n = real_pwritev(fd, iov, iovcnt, off);
	if (n > 0)
		wl_record(WL_WRITE, (uint64_t)off, (uint64_t)n, iov, iovcnt);
	pthread_mutex_unlock(&wl_lock);
	return n;
}

/* A barrier only once the sync returned: everything logged before is durable. */
static int record_sync(int (*real)(int), int fd)
{
	int r;

	if (!wl_begin(fd))
		return real(fd);
	r = real(fd);
	if (r == 0)
		wl_record(WL_BARRIER, 0, 0, NULL, 0);
	pthread_mutex_unlock(&wl_lock);
	return r;
}

int fdatasync(int fd)
{
	pthread_once(&wl_once, wl_init);
	return record_sync(real_fdatasync, fd);
}

int fsync(int fd)
{
	pthread_once(&wl_once, wl_init);
	return record_sync(real_fsync, fd);
}

/* Punch hole and zero range read back as zeroes; a plain allocation only
 * moves the end of the file (unless KEEP_SIZE). */
static int record_fallocate(int (*real)(int, int, off_t, off_t),
			    int fd, int mode, off_t off, off_t len)
{
	int r;

	if (!wl_begin(fd))
		return real(fd, mode, off, len);
	r = real(fd, mode, off, len);
	if (r == 0) {
		if (mode & (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE))
			wl_record(WL_ZERO, (uint64_t)off, (uint64_t)len, NULL, 0);
		else if (!(mode & FALLOC_FL_KEEP_SIZE))
			wl_record(WL_ALLOC, (uint64_t)off, (uint64_t)len, NULL, 0);
	}
	pthread_mutex_unlock(&wl_lock);
	return r;
}

int fallocate(int fd, int mode, off_t off, off_t len)
{
	pthread_once(&wl_once, wl_init);
	return record_fallocate(real_fallocate, fd, mode, off, len);
}

int fallocate64(int fd, int mode, off_t off, off_t len)
{
	pthread_once(&wl_once, wl_init);
	return record_fallocate(real_fallocate64, fd, mode, off, len);
}

int ftruncate(int fd, off_t len)
{
	int r;

	pthread_once(&wl_once, wl_init);
	if (!wl_begin(fd))
		return real_ftruncate(fd, len);
	r = real_ftruncate(fd, len);
	if (r == 0)
		wl_record(WL_TRUNCATE, 0, (uint64_t)len, NULL, 0);
	pthread_mutex_unlock(&wl_lock);
	return r;
}
