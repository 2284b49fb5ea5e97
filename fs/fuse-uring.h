/* FUSE over io_uring under libfuse 3.14, through its custom I/O hooks. */
#ifndef IMGFS_FUSE_URING_H
#define IMGFS_FUSE_URING_H

#include <stdbool.h>

struct fuse_session;

/*
 * Whether the kernel can serve this mount's requests through io_uring
 * (kernel >= 6.14, the fuse module's enable_uring parameter on); if not,
 * *why says so.
 */
bool fuse_uring_possible(const char **why);

/*
 * Take over the session's I/O (after fuse_session_mount, before the loop).
 * /dev/fuse keeps working as before; when the kernel offers io_uring in
 * FUSE_INIT, the reply accepts it and per-CPU queue threads, each with a
 * ring of its own, serve requests from then on.  threads: about how many
 * queue threads in all (at least one per queue; a queue serves as many
 * requests at once as it has threads).  -errno on failure.
 */
int fuse_uring_install(struct fuse_session *se, unsigned threads);

/* Requests served through the rings so far (0: the kernel never used them). */
unsigned long fuse_uring_served(void);

/* Stop the queue threads and release their rings (after the session loop
 * has returned and before the session is unmounted). */
void fuse_uring_stop(void);

#endif
