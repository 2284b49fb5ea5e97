/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The mount-daemon side of `imgfs-nbd MOUNT/VIEW`: the imgfs daemon listens
 * on a Unix control socket; imgfs-nbd connects, hands over its listening NBD
 * socket (SCM_RIGHTS) and the view name, and the daemon serves NBD clients
 * from its own engine until that control connection closes.
 */
#ifndef IMGFS_NBD_CONTROL_H
#define IMGFS_NBD_CONTROL_H

#include "image.h"

struct nbd_control;

/* Start listening on sock_path (created, mode 0600).  NULL with e set on failure. */
struct nbd_control *nbd_control_start(struct image *img, const char *sock_path, struct err *e);
/* Stop: close the control socket and every export it serves, join threads. */
void nbd_control_stop(struct nbd_control *ctl);

#endif
