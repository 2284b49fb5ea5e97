/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* Internals shared by server.c, handshake.c and transmission.c. */
#ifndef IMGFS_NBD_INT_H
#define IMGFS_NBD_INT_H

#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <sys/uio.h>
#include <time.h>

#include "nbd-proto.h"
#include "nbd-server.h"

/* Context ids handed out by SET_META_CONTEXT. */
#define NBD_CTX_ID_BASE  1
#define NBD_CTX_ID_DEPTH 2

/* Bounds on what one connection may have queued or running. */
#define NBD_CONN_MAX_INFLIGHT 32
#define NBD_CONN_MAX_BYTES    (64u << 20)
#define NBD_CONN_SPARE        8

struct nbd_server {
	struct nbd_export *exports; /* static exports, or ... */
	unsigned nexports;
	nbd_export_list_fn list_fn; /* ... asked each time (then exports is NULL) */
	void *list_opaque;
	struct nbd_server_opts opts;

	int wake[2];              /* self-pipe: stop requests and ended connections */
	int stopping;             /* set by nbd_server_stop; atomic (signal-safe) */

	pthread_mutex_t lock;     /* guards the lists and counters below */
	pthread_cond_t cond;      /* a connection ended */
	struct nbd_conn *conns;   /* live connections */
	struct nbd_conn *zombies; /* ended, waiting to be joined */
	unsigned nconns;
	unsigned long served;     /* connections ever accepted */
};

struct nbd_req {
	struct nbd_req *next;
	uint16_t flags, type;
	uint64_t cookie, offset;
	uint32_t len;
	void *payload;            /* WRITE data */
	uint32_t cost;            /* bytes charged to the connection's budget */
};

struct nbd_conn {
	struct nbd_server *srv;
	struct nbd_conn *next;
	int fd;
	pthread_t thread;

	/* handshake state */
	struct timespec deadline;
	bool in_handshake;
	bool no_zeroes;
	bool structured;
	bool ctx_base, ctx_depth;
	char *meta_export;        /* export SET_META_CONTEXT was for */
	unsigned noptions;

	/* transmission */
	struct nbd_export expv;   /* the export picked (a copy: lists may change) */
	const struct nbd_export *exp; /* &expv once picked */
	uint16_t tflags;
	pthread_mutex_t send_lock;
	bool send_failed;

	pthread_mutex_t qlock;
	pthread_cond_t qcond;     /* work queued, or closing */
	pthread_cond_t space;     /* budget freed */
	struct nbd_req *qhead, *qtail;
	unsigned inflight;        /* queued + running */
	uint64_t inflight_bytes;
	bool closing;
	pthread_t *workers;
	unsigned nworkers;
	char *spare[NBD_CONN_SPARE]; /* WRITE payload buffers kept for reuse */
	unsigned nspare;
};

/* server.c: socket I/O.  Each returns 0 or a negative errno (-ECONNRESET on EOF). */
int nbd_conn_recv(struct nbd_conn *c, void *buf, size_t len);
/* Send iov whole; caller holds send_lock in transmission. */
int nbd_conn_sendv(struct nbd_conn *c, struct iovec *iov, int n);
/* The same with sendmsg flags (MSG_MORE: more of this reply follows). */
int nbd_conn_sendv_flags(struct nbd_conn *c, struct iovec *iov, int n, int flags);
/* Send len bytes of fd from pos (sendfile); the caller holds send_lock. */
int nbd_conn_sendfile(struct nbd_conn *c, int fd, uint64_t pos, uint64_t len);
int nbd_conn_send(struct nbd_conn *c, const void *buf, size_t len);

/* handshake.c: true if the client picked an export (c->exp set). */
bool nbd_handshake(struct nbd_conn *c);
/* Export lookup by name ("" = default): copies it to *out, false if none. */
bool nbd_find_export(struct nbd_server *s, const char *name, struct nbd_export *out);
uint16_t nbd_export_tflags(struct nbd_conn *c, const struct nbd_export *exp);

/* transmission.c: serve requests until disconnect. */
void nbd_transmission(struct nbd_conn *c);

#endif
