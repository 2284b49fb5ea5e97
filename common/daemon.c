/* SPDX-License-Identifier: LGPL-2.1-or-later */
#include "daemon.h"

#include <errno.h>
#include <fcntl.h>
#include <malloc.h>
#include <stdio.h>
#include <unistd.h>

void daemon_tune_malloc(void)
{
	/* One malloc arena: glibc's default of one per thread (up to 8 per
	 * CPU) scatters the L2 slices that worker threads load and evict
	 * across arenas; peak RSS after random reads over a 2 TiB image fell
	 * from 59 to 37 MiB with no loss of speed.  Small per-request
	 * allocations stay in glibc's per-thread caches. */
	mallopt(M_ARENA_MAX, 1);
	/* Large request buffers (NBD: up to 32 MiB) always come from mmap and
	 * go back to the system when freed: glibc's default threshold rises to
	 * 32 MiB after the first such free, and the heap then keeps them
	 * (memory per client must stay bounded after clients go away). */
	mallopt(M_MMAP_THRESHOLD, 1 << 20);
}

int daemon_write_pid_file(const char *path)
{
	FILE *f = fopen(path, "w");
	int r = 0;

	if (!f)
		return -errno;
	if (fprintf(f, "%d\n", (int)getpid()) < 0)
		r = -errno;
	if (fclose(f) != 0 && r == 0)
		r = -errno;
	return r;
}

void daemon_detach_stdio(void)
{
	int fd = open("/dev/null", O_RDWR);

	if (fd < 0)
		return;
	dup2(fd, 0);
	dup2(fd, 1);
	dup2(fd, 2);
	if (fd > 2)
		close(fd);
}
