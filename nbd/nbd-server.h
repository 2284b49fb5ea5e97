/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The NBD server library: serves a list of named exports (each a struct
 * bdev) to clients accepted from a listening socket.  One thread per
 * connection reads requests; a few worker threads per connection run them
 * and send replies as they complete, each reply sent whole under the
 * connection's send lock.
 *
 * Used by imgfs-nbd (over an image it opens) and by the imgfs daemon (over
 * its mount's views, through nbd/control.c).
 */
#ifndef IMGFS_NBD_SERVER_H
#define IMGFS_NBD_SERVER_H

#include <stdbool.h>
#include <stdint.h>

#include "bdev.h"

struct nbd_export {
	const char *name;        /* "" is allowed: the default export */
	const char *description; /* may be NULL */
	struct bdev *dev;        /* borrowed: must outlive the server */
	bool read_only;          /* also read-only when dev->read_only */
};

struct nbd_server_opts {
	/*
	 * Connections served at once (qemu-nbd -e); 0 = no limit (a hard
	 * cap of NBD_SERVER_MAX_CONNS still applies).  Connections beyond
	 * the limit wait in the listen backlog until one ends.
	 */
	unsigned max_clients;
	/* Keep serving after the last client leaves (qemu-nbd -t). */
	bool persistent;
	/* Offer the qemu:allocation-depth meta context (qemu-nbd -A). */
	bool allocation_depth;
	/* Export that the empty name "" selects (index into exports); 0 by default. */
	unsigned default_export;
	/* Seconds a client has to finish the handshake; 0 = 10. */
	unsigned handshake_timeout;
	/* Worker threads per connection; 0 = 8. */
	unsigned workers;
};

#define NBD_SERVER_MAX_CONNS 256

struct nbd_server;

/* Copies exports (names and descriptions too); the bdevs stay borrowed. */
struct nbd_server *nbd_server_new(const struct nbd_export *exports, unsigned n,
				  const struct nbd_server_opts *opts);
/*
 * Exports that may change while the server runs (a mount whose partition
 * table is rewritten): list is asked at every LIST, INFO, GO and
 * EXPORT_NAME for a malloc'd array (freed by the server) and the index of
 * the default export.  The strings and bdevs in it must stay valid until
 * the server is freed.  opts->default_export is ignored.
 */
typedef unsigned (*nbd_export_list_fn)(void *opaque, struct nbd_export **out,
				       unsigned *default_export);
struct nbd_server *nbd_server_new_dynamic(nbd_export_list_fn list, void *opaque,
					  const struct nbd_server_opts *opts);
/*
 * Accept and serve clients from listen_fd (not closed) until
 * nbd_server_stop() or, when not persistent, until the last client has
 * left.  Returns 0, or a negative errno if accepting failed.
 */
int nbd_server_run(struct nbd_server *, int listen_fd);
/*
 * Serve one connected socket in the calling thread (closes it at the end).
 * Counts as a client for nbd_server_stop().  For tests and inetd-style use.
 */
void nbd_server_serve_socket(struct nbd_server *, int fd);
/* Ask nbd_server_run to return, and disconnect every client.  Async-signal-safe. */
void nbd_server_stop(struct nbd_server *);
/* After run has returned: waits for any client still ending, frees. */
void nbd_server_free(struct nbd_server *);

/* Map a negative or positive errno to an NBD error value. */
uint32_t nbd_errno_to_wire(int err);

#endif
