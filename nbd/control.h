/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The mount-daemon bridge: `imgfs-nbd mnt/p1` asks the imgfs daemon that
 * owns the mount to serve NBD from its own engine (one cache, one lock).
 *
 * The daemon listens on a Unix SOCK_SEQPACKET control socket (its path is
 * the user.imgfs.control xattr of the mount root and every view file).
 * imgfs-nbd connects, sends one request message — key=value lines — with
 * its listening NBD socket attached (SCM_RIGHTS), and gets "ok" or
 * "error MESSAGE" back.  The daemon then serves NBD clients on that socket
 * until the control connection closes (imgfs-nbd exited), or — when not
 * persistent — until its last NBD client has left, at which point it
 * closes the control connection so imgfs-nbd exits too.
 */
#ifndef IMGFS_NBD_CONTROL_H
#define IMGFS_NBD_CONTROL_H

#include <stdbool.h>

#include "image.h"
#include "util.h"

#define NBD_CONTROL_XATTR "user.imgfs.control"
#define NBD_VIEW_XATTR    "user.imgfs.view"

struct image;
struct nbd_control;

/* Daemon side: listen on sock_path (replacing a stale socket there). */
struct nbd_control *nbd_control_start(struct image *img, const char *sock_path,
				      struct err *e);
/* Disconnect every NBD client and imgfs-nbd, stop listening, remove the socket. */
void nbd_control_stop(struct nbd_control *);

/* What imgfs-nbd asks for. */
struct nbd_control_request {
	const char *view;        /* a view name, or "*" for every view */
	int partition;           /* -P N, or -1 */
	const char *snapshot;    /* -l NAME, or NULL */
	const char *export_name; /* -x, or NULL: the view's name */
	const char *description; /* -D, or NULL */
	bool read_only;
	bool persistent;
	bool allocation_depth;
	unsigned shared;         /* -e; 0 = unlimited */
	unsigned handshake_limit;/* seconds, 0 = default */
};

/*
 * imgfs-nbd side: hand listen_fd to the daemon at sock_path.  Returns the
 * control connection (keep it open while the export should live; EOF on it
 * means the daemon stopped serving), or -1 with e set.
 */
int nbd_control_request(const char *sock_path, int listen_fd,
			const struct nbd_control_request *rq, struct err *e);

#endif
