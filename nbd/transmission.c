/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Transmission phase (doc/proto.md "Transmission").  The connection's
 * thread reads requests (and WRITE payloads) and queues them; worker
 * threads run them against the export's bdev and send the replies as they
 * complete, so replies may go out of order.  Each reply chunk is sent whole
 * under send_lock, so no two replies' bytes interleave.
 *
 * Memory per connection is bounded: at most NBD_CONN_MAX_INFLIGHT requests
 * and NBD_CONN_MAX_BYTES of payload are queued or running; the reader stops
 * reading until workers free budget.  A WRITE announcing more than
 * NBD_MAX_PAYLOAD is a disconnect: it is never buffered.
 */
#include "nbd-int.h"
#include "thread.h"
#include "util.h"

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

/* Zero runs shorter than this are sent as data: a hole chunk costs more. */
#define HOLE_MIN 4096
/* Content chunks in one sparse READ reply; the rest goes as one data chunk. */
#define READ_MAX_CHUNKS 64

struct chunk {
	uint16_t type;      /* OFFSET_DATA or OFFSET_HOLE */
	uint64_t off;
	uint32_t len;
};

/* ---- replies ---------------------------------------------------------- */

static int send_locked(struct nbd_conn *c, struct iovec *iov, int n)
{
	int r;

	pthread_mutex_lock(&c->send_lock);
	r = c->send_failed ? -EPIPE : nbd_conn_sendv(c, iov, n);
	pthread_mutex_unlock(&c->send_lock);
	if (r < 0)
		shutdown(c->fd, SHUT_RDWR); /* unblock the reader: the peer is gone */
	return r;
}

static void simple_header(uint8_t *h, const struct nbd_req *rq, int err)
{
	put_be32(h, NBD_SIMPLE_REPLY_MAGIC);
	put_be32(h + 4, nbd_errno_to_wire(err));
	put_be64(h + 8, rq->cookie);
}

static int simple_reply(struct nbd_conn *c, const struct nbd_req *rq, int err,
			const void *data, uint32_t len)
{
	uint8_t h[NBD_SIMPLE_REPLY_SIZE];
	struct iovec iov[2] = { { h, sizeof(h) }, { (void *)data, len } };

	simple_header(h, rq, err);
	return send_locked(c, iov, err || !len ? 1 : 2);
}

static void chunk_header(uint8_t *h, const struct nbd_req *rq, uint16_t flags,
			 uint16_t type, uint32_t len)
{
	put_be32(h, NBD_STRUCTURED_REPLY_MAGIC);
	put_be16(h + 4, flags);
	put_be16(h + 6, type);
	put_be64(h + 8, rq->cookie);
	put_be32(h + 16, len);
}

/* One structured chunk: header, a fixed part, then optional data. */
static int chunk_reply(struct nbd_conn *c, const struct nbd_req *rq,
		       uint16_t flags, uint16_t type, const void *fixed,
		       uint32_t flen, const void *data, uint32_t dlen)
{
	uint8_t h[NBD_STRUCTURED_REPLY_SIZE];
	struct iovec iov[3] = {
		{ h, sizeof(h) }, { (void *)fixed, flen }, { (void *)data, dlen },
	};

	chunk_header(h, rq, flags, type, flen + dlen);
	return send_locked(c, iov, dlen ? 3 : flen ? 2 : 1);
}

static int error_chunk(struct nbd_conn *c, const struct nbd_req *rq, int err,
		       bool with_offset, uint64_t off)
{
	uint8_t b[14];

	put_be32(b, nbd_errno_to_wire(err));
	put_be16(b + 4, 0); /* no message */
	put_be64(b + 6, off);
	return chunk_reply(c, rq, NBD_REPLY_FLAG_DONE,
			   with_offset ? NBD_REPLY_TYPE_ERROR_OFFSET : NBD_REPLY_TYPE_ERROR,
			   b, with_offset ? 14 : 6, NULL, 0);
}

/* Errors of READ and BLOCK_STATUS are structured once negotiated. */
static int reply_err(struct nbd_conn *c, const struct nbd_req *rq, int err)
{
	if (c->structured &&
	    (rq->type == NBD_CMD_READ || rq->type == NBD_CMD_BLOCK_STATUS))
		return error_chunk(c, rq, err, false, 0);
	return simple_reply(c, rq, err, NULL, 0);
}

/* ---- commands --------------------------------------------------------- */

static struct bdev *dev(struct nbd_conn *c)
{
	return c->exp->dev;
}

static bool in_range(struct nbd_conn *c, const struct nbd_req *rq)
{
	return !range_exceeds(rq->offset, rq->len, dev(c)->size);
}

/* Split [off, off+len) into data and hole chunks by block status. */
static unsigned plan_sparse(struct nbd_conn *c, uint64_t off, uint32_t len,
			    struct chunk *ch)
{
	uint64_t pos = off, end = off + len;
	unsigned n = 0;

	while (pos < end) {
		uint64_t run;
		unsigned st;
		uint16_t type;
		bool hole;

		if (bdev_block_status(dev(c), pos, end - pos, &run, &st, NULL) < 0) {
			run = end - pos; /* unknown: read it */
			st = 0;
		}
		hole = (st & BDEV_ST_ZERO) && run >= HOLE_MIN;
		type = hole ? NBD_REPLY_TYPE_OFFSET_HOLE : NBD_REPLY_TYPE_OFFSET_DATA;
		if (n && ch[n - 1].type == type) {
			ch[n - 1].len += run;
		} else if (n == READ_MAX_CHUNKS - 1) {
			/* last slot: the rest goes as data */
			ch[n++] = (struct chunk){ NBD_REPLY_TYPE_OFFSET_DATA, pos, end - pos };
			break;
		} else {
			ch[n++] = (struct chunk){ type, pos, run };
		}
		pos += run;
	}
	return n;
}

#define SEND_EXTENTS 16
#define SENDFILE_MIN (8u << 10)

static int send_zeroes(struct nbd_conn *c, uint64_t len, bool more)
{
	static const char zeroes[64 << 10];
	int r = 0;

	while (len && r == 0) {
		struct iovec iov = { (void *)zeroes, (size_t)MIN(len, sizeof(zeroes)) };

		len -= iov.iov_len;
		r = nbd_conn_sendv_flags(c, &iov, 1, more || len ? MSG_MORE : 0);
	}
	return r;
}

/*
 * Zero-copy data: send the reply's header (hdr), then the bytes of
 * [off, off + len) straight from the host files that hold them (sendfile;
 * zeroes from memory), all under send_lock: the page cache goes to the
 * socket without a copy into our buffers.  1: sent; 0: the range does not
 * map whole (a compressed cluster, damage: read it and send that); < 0:
 * the connection failed.
 */
static int send_mapped(struct nbd_conn *c, struct iovec *hdr, int nhdr,
		       uint64_t off, uint32_t len)
{
	struct bdev_extent ext[SEND_EXTENTS];
	struct bdev_extents x = { .ext = ext, .max = SEND_EXTENTS };
	int r;

	if (len < SENDFILE_MIN)
		return 0;
	if (bdev_map(dev(c), off, len, &x) != (int64_t)len) {
		bdev_extents_release(&x);
		return 0;
	}
	/* sendfile reads the disk under send_lock: start those reads now, so
	 * that the workers' cold reads still go to the disk side by side */
	for (unsigned i = 0; i < x.n; i++)
		if (ext[i].fd >= 0)
			(void)posix_fadvise(ext[i].fd, (off_t)ext[i].pos, (off_t)ext[i].len,
					    POSIX_FADV_WILLNEED);
	pthread_mutex_lock(&c->send_lock);
	r = c->send_failed ? -EPIPE : nbd_conn_sendv_flags(c, hdr, nhdr, MSG_MORE);
	for (unsigned i = 0; i < x.n && r == 0; i++)
		r = ext[i].fd < 0 ? send_zeroes(c, ext[i].len, i + 1 < x.n)
				  : nbd_conn_sendfile(c, ext[i].fd, ext[i].pos, ext[i].len);
	pthread_mutex_unlock(&c->send_lock);
	/* a client that stops reading holds this: freed clusters wait, writes do not */
	bdev_extents_release(&x);
	if (r < 0)
		shutdown(c->fd, SHUT_RDWR); /* unblock the reader: the peer is gone */
	return r < 0 ? r : 1;
}

/* A simple READ reply sent by send_mapped; false: read it. */
static bool send_mapped_simple(struct nbd_conn *c, const struct nbd_req *rq)
{
	uint8_t h[NBD_SIMPLE_REPLY_SIZE];
	struct iovec hdr = { h, sizeof(h) };

	simple_header(h, rq, 0);
	return send_mapped(c, &hdr, 1, rq->offset, rq->len) != 0;
}

/*
 * Each worker keeps one read buffer of up to WORKER_BUF_MAX bytes, freed
 * when the worker ends with its connection.  A malloc/free of 256 KiB per
 * READ had glibc trim and refault its heap: ~3000 madvise calls per GiB
 * that nbdcopy read, and twice qemu-nbd's CPU time for the same copy.
 * Larger reads (up to NBD_MAX_PAYLOAD) get a buffer of their own.
 */
#define WORKER_BUF_MAX (1u << 20)
static __thread char *worker_buf;

static char *read_buf(size_t len)
{
	if (len > WORKER_BUF_MAX)
		return xmalloc(len);
	if (!worker_buf)
		worker_buf = xmalloc(WORKER_BUF_MAX);
	return worker_buf;
}

static void put_read_buf(char *buf)
{
	if (buf != worker_buf)
		free(buf);
}

static void cmd_read_structured(struct nbd_conn *c, const struct nbd_req *rq)
{
	struct chunk ch[READ_MAX_CHUNKS];
	unsigned n;
	char *buf;

	if (!rq->len) {
		chunk_reply(c, rq, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_NONE,
			    NULL, 0, NULL, 0);
		return;
	}
	if (rq->flags & NBD_CMD_FLAG_DF) {
		/* Don't fragment: one data chunk. */
		ch[0] = (struct chunk){ NBD_REPLY_TYPE_OFFSET_DATA, rq->offset, rq->len };
		n = 1;
	} else {
		n = plan_sparse(c, rq->offset, rq->len, ch);
	}
	/* a buffer for the whole range, once a data chunk must be read into it
	 * (holes and chunks sent from the files need none) */
	buf = NULL;
	for (unsigned i = 0; i < n; i++) {
		uint16_t fl = i + 1 == n ? NBD_REPLY_FLAG_DONE : 0;
		uint8_t b[12];
		char *p;
		int r;

		put_be64(b, ch[i].off);
		if (ch[i].type == NBD_REPLY_TYPE_OFFSET_HOLE) {
			put_be32(b + 8, ch[i].len);
			r = chunk_reply(c, rq, fl, ch[i].type, b, 12, NULL, 0);
		} else {
			uint8_t h[NBD_STRUCTURED_REPLY_SIZE];
			struct iovec hdr[2] = { { h, sizeof(h) }, { b, 8 } };

			chunk_header(h, rq, fl, ch[i].type, 8 + ch[i].len);
			r = send_mapped(c, hdr, 2, ch[i].off, ch[i].len);
			if (r != 0) {
				if (r < 0)
					break;
				continue;
			}
			if (!buf)
				buf = read_buf(rq->len);
			p = buf + (ch[i].off - rq->offset);
			r = bdev_pread(dev(c), p, ch[i].len, ch[i].off);
			if (r < 0) {
				error_chunk(c, rq, r, true, ch[i].off);
				break;
			}
			r = chunk_reply(c, rq, fl, ch[i].type, b, 8, p, ch[i].len);
		}
		if (r < 0)
			break;
	}
	put_read_buf(buf);
}

static void cmd_read(struct nbd_conn *c, const struct nbd_req *rq)
{
	char *buf;
	int r;

	if (rq->flags & ~(NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_DF) ||
	    ((rq->flags & NBD_CMD_FLAG_DF) && !c->structured) || !in_range(c, rq)) {
		reply_err(c, rq, -EINVAL);
		return;
	}
	if (rq->len > NBD_MAX_PAYLOAD) {
		reply_err(c, rq, -EOVERFLOW);
		return;
	}
	if (c->structured) {
		cmd_read_structured(c, rq);
		return;
	}
	if (send_mapped_simple(c, rq))
		return;
	buf = read_buf(rq->len);
	r = bdev_pread(dev(c), buf, rq->len, rq->offset);
	simple_reply(c, rq, r, buf, rq->len);
	put_read_buf(buf);
}

/* Checks shared by the commands that change data. */
static int check_write(struct nbd_conn *c, const struct nbd_req *rq,
		       uint16_t allowed, int range_err)
{
	if (rq->flags & ~allowed)
		return -EINVAL;
	if (c->tflags & NBD_FLAG_READ_ONLY)
		return -EPERM;
	if (!in_range(c, rq))
		return range_err;
	return 0;
}

static void cmd_write(struct nbd_conn *c, const struct nbd_req *rq)
{
	int r = check_write(c, rq, NBD_CMD_FLAG_FUA, -ENOSPC);

	if (!r)
		r = bdev_pwrite(dev(c), rq->payload, rq->len, rq->offset,
				rq->flags & NBD_CMD_FLAG_FUA ? BDEV_FUA : 0);
	simple_reply(c, rq, r, NULL, 0);
}

static void cmd_zero(struct nbd_conn *c, const struct nbd_req *rq)
{
	int r = check_write(c, rq, NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_NO_HOLE |
			    NBD_CMD_FLAG_FAST_ZERO, -ENOSPC);
	unsigned fl = 0;

	if (!r) {
		if (rq->flags & NBD_CMD_FLAG_FUA)
			fl |= BDEV_FUA;
		if (!(rq->flags & NBD_CMD_FLAG_NO_HOLE))
			fl |= BDEV_MAY_UNMAP;
		if (rq->flags & NBD_CMD_FLAG_FAST_ZERO)
			fl |= BDEV_FAST_ZERO;
		r = bdev_zero(dev(c), rq->offset, rq->len, fl);
	}
	simple_reply(c, rq, r, NULL, 0);
}

static void cmd_trim(struct nbd_conn *c, const struct nbd_req *rq)
{
	int r = check_write(c, rq, NBD_CMD_FLAG_FUA, -EINVAL);

	if (!r)
		r = bdev_discard(dev(c), rq->offset, rq->len);
	if (!r && (rq->flags & NBD_CMD_FLAG_FUA))
		r = bdev_flush(dev(c));
	simple_reply(c, rq, r, NULL, 0);
}

static void cmd_flush(struct nbd_conn *c, const struct nbd_req *rq)
{
	int r = rq->flags & ~NBD_CMD_FLAG_FUA ? -EINVAL : bdev_flush(dev(c));

	simple_reply(c, rq, r, NULL, 0);
}

static void cmd_cache(struct nbd_conn *c, const struct nbd_req *rq)
{
	/* Advisory; the engine's caches fill on use.  Unknown flags refused. */
	int r = rq->flags & ~NBD_CMD_FLAG_FUA || !in_range(c, rq) ? -EINVAL : 0;

	simple_reply(c, rq, r, NULL, 0);
}

/* One BLOCK_STATUS chunk per selected context, the last one flagged DONE. */
static void cmd_block_status(struct nbd_conn *c, const struct nbd_req *rq)
{
	bool one = rq->flags & NBD_CMD_FLAG_REQ_ONE;
	unsigned max = one ? 1 : NBD_MAX_EXTENTS;
	uint8_t *ext[2];             /* [0] base:allocation, [1] allocation-depth */
	unsigned n[2] = { 0, 0 };
	uint32_t last[2] = { 0, 0 };
	bool want[2] = { c->ctx_base, c->ctx_depth };
	uint64_t pos = rq->offset, end = rq->offset + rq->len;
	int r = 0;

	if (rq->flags & ~(NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_REQ_ONE) ||
	    !(want[0] || want[1]) || !rq->len || !in_range(c, rq)) {
		reply_err(c, rq, -EINVAL);
		return;
	}
	/* only the chosen contexts need an extent buffer */
	ext[0] = want[0] ? xmalloc(4 + 8 * (size_t)max) : NULL;
	ext[1] = want[1] ? xmalloc(4 + 8 * (size_t)max) : NULL;
	while (pos < end) {
		uint64_t run;
		unsigned st, depth, v[2];
		bool full = false;

		r = bdev_block_status(dev(c), pos, end - pos, &run, &st, &depth);
		if (r < 0)
			break;
		v[0] = st & (NBD_STATE_HOLE | NBD_STATE_ZERO);
		v[1] = depth;
		for (int k = 0; k < 2; k++) {
			uint8_t *e;

			if (!want[k])
				continue;
			if (n[k] && last[k] == v[k]) {
				/* same value: extend (run <= len < 2^32 in total) */
				e = ext[k] + 4 + 8 * (n[k] - 1);
				put_be32(e, be32(e) + (uint32_t)run);
				continue;
			}
			if (n[k] == max) {
				full = true;
				continue;
			}
			e = ext[k] + 4 + 8 * n[k]++;
			put_be32(e, (uint32_t)run);
			put_be32(e + 4, v[k]);
			last[k] = v[k];
		}
		if (full || one)
			break;
		pos += run;
	}
	if (r < 0 && !n[0] && !n[1]) {
		reply_err(c, rq, r);
	} else {
		/* A later failure just ends the list early: what we have is true. */
		int lastk = want[1] ? 1 : 0;

		for (int k = 0; k < 2; k++) {
			if (!want[k])
				continue;
			put_be32(ext[k], k ? NBD_CTX_ID_DEPTH : NBD_CTX_ID_BASE);
			if (chunk_reply(c, rq, k == lastk ? NBD_REPLY_FLAG_DONE : 0,
					NBD_REPLY_TYPE_BLOCK_STATUS, ext[k],
					4 + 8 * n[k], NULL, 0) < 0)
				break;
		}
	}
	free(ext[0]);
	free(ext[1]);
}

static void run_request(struct nbd_conn *c, const struct nbd_req *rq)
{
	switch (rq->type) {
	case NBD_CMD_READ:         cmd_read(c, rq); break;
	case NBD_CMD_WRITE:        cmd_write(c, rq); break;
	case NBD_CMD_FLUSH:        cmd_flush(c, rq); break;
	case NBD_CMD_TRIM:         cmd_trim(c, rq); break;
	case NBD_CMD_CACHE:        cmd_cache(c, rq); break;
	case NBD_CMD_WRITE_ZEROES: cmd_zero(c, rq); break;
	case NBD_CMD_BLOCK_STATUS: cmd_block_status(c, rq); break;
	default:
		log_debug("nbd: unknown command %u", rq->type);
		simple_reply(c, rq, -EINVAL, NULL, 0);
		break;
	}
}

/*
 * A small READ whose bytes are all in memory (the image file's page cache,
 * the L2 cache) is answered by the connection's own thread: handing it to
 * a worker costs two thread switches, more than the read itself (fio, 4 KiB
 * random reads at iodepth 16 over 2 connections, image in the page cache:
 * 36-42K IOPS through the workers, 60-67K inline).  A read that would wait
 * for the disk, or fail, goes to the workers as before, so cold reads
 * still run side by side and errors are reported in one place.  Structured
 * replies carry it as one data chunk; a read that is all zeroes goes to the
 * workers, which send holes.
 */
#define INLINE_READ_MAX (64u << 10)

static bool read_inline(struct nbd_conn *c, const struct nbd_req *rq)
{
	char *buf;

	if (!rq->len || rq->len > INLINE_READ_MAX || !in_range(c, rq) ||
	    rq->flags & ~(NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_DF) ||
	    ((rq->flags & NBD_CMD_FLAG_DF) && !c->structured))
		return false;
	buf = read_buf(rq->len);
	if (bdev_pread_nowait(dev(c), buf, rq->len, rq->offset) < 0 ||
	    (c->structured && buf_is_zero(buf, rq->len))) {
		put_read_buf(buf);
		return false;
	}
	if (c->structured) {
		uint8_t b[8];

		put_be64(b, rq->offset);
		chunk_reply(c, rq, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_OFFSET_DATA, b, 8,
			    buf, rq->len);
	} else {
		simple_reply(c, rq, 0, buf, rq->len);
	}
	put_read_buf(buf);
	return true;
}

/* ---- queue and workers ------------------------------------------------ */

/*
 * WRITE payloads of POOL_MIN..WORKER_BUF_MAX bytes live in buffers of
 * WORKER_BUF_MAX kept per connection (at most NBD_CONN_SPARE idle, freed
 * with the connection): the reader allocates, a worker frees, and a fresh
 * 256 KiB buffer each time cost glibc a heap trim and page faults (1600
 * madvise calls per GiB that nbdcopy wrote).
 */
#define POOL_MIN (64u << 10)

static bool pooled(uint32_t len)
{
	return len >= POOL_MIN && len <= WORKER_BUF_MAX;
}

static char *payload_get(struct nbd_conn *c, uint32_t len)
{
	char *p = NULL;

	if (!pooled(len))
		return xmalloc(len);
	pthread_mutex_lock(&c->qlock);
	if (c->nspare)
		p = c->spare[--c->nspare];
	pthread_mutex_unlock(&c->qlock);
	return p ? p : xmalloc(WORKER_BUF_MAX);
}

/* Caller holds qlock. */
static void payload_put(struct nbd_conn *c, char *p, uint32_t len)
{
	if (p && pooled(len) && c->nspare < NBD_CONN_SPARE)
		c->spare[c->nspare++] = p;
	else
		free(p);
}

static void *worker(void *arg)
{
	struct nbd_conn *c = arg;

	pthread_mutex_lock(&c->qlock);
	for (;;) {
		struct nbd_req *rq;

		while (!c->qhead && !c->closing)
			pthread_cond_wait(&c->qcond, &c->qlock);
		rq = c->qhead;
		if (!rq)
			break; /* closing and drained */
		c->qhead = rq->next;
		if (!c->qhead)
			c->qtail = NULL;
		pthread_mutex_unlock(&c->qlock);

		run_request(c, rq);

		pthread_mutex_lock(&c->qlock);
		c->inflight--;
		c->inflight_bytes -= rq->cost;
		pthread_cond_signal(&c->space);
		payload_put(c, rq->payload, rq->len);
		free(rq);
	}
	pthread_mutex_unlock(&c->qlock);
	free(worker_buf);
	worker_buf = NULL;
	return NULL;
}

/* Wait for budget (requests and bytes in flight), then queue rq. */
static void enqueue(struct nbd_conn *c, struct nbd_req *rq)
{
	pthread_mutex_lock(&c->qlock);
	while (c->inflight && (c->inflight >= NBD_CONN_MAX_INFLIGHT ||
			       c->inflight_bytes + rq->cost > NBD_CONN_MAX_BYTES))
		pthread_cond_wait(&c->space, &c->qlock);
	c->inflight++;
	c->inflight_bytes += rq->cost;
	if (c->qtail)
		c->qtail->next = rq;
	else
		c->qhead = rq;
	c->qtail = rq;
	pthread_cond_signal(&c->qcond);
	pthread_mutex_unlock(&c->qlock);
}

static bool start_workers(struct nbd_conn *c)
{
	c->workers = xcalloc(c->srv->opts.workers, sizeof(*c->workers));
	for (unsigned i = 0; i < c->srv->opts.workers; i++) {
		if (thread_start_unsignalled(&c->workers[c->nworkers], worker, c))
			break;
		c->nworkers++;
	}
	if (!c->nworkers)
		log_warn("nbd: cannot start worker threads");
	return c->nworkers > 0;
}

static void stop_workers(struct nbd_conn *c)
{
	pthread_mutex_lock(&c->qlock);
	c->closing = true;
	pthread_cond_broadcast(&c->qcond);
	pthread_mutex_unlock(&c->qlock);
	for (unsigned i = 0; i < c->nworkers; i++)
		pthread_join(c->workers[i], NULL);
	free(c->workers);
	c->workers = NULL;
}

/* Read one request (and its payload).  NULL: stop reading. */
static struct nbd_req *read_request(struct nbd_conn *c)
{
	uint8_t h[NBD_REQUEST_SIZE];
	struct nbd_req *rq;

	if (nbd_conn_recv(c, h, sizeof(h)) < 0)
		return NULL;
	if (be32(h) != NBD_REQUEST_MAGIC) {
		log_info("nbd: bad request magic 0x%08x: disconnecting", be32(h));
		return NULL;
	}
	rq = xcalloc(1, sizeof(*rq));
	rq->flags = be16(h + 4);
	rq->type = be16(h + 6);
	rq->cookie = be64(h + 8);
	rq->offset = be64(h + 16);
	rq->len = be32(h + 24);
	if (rq->type == NBD_CMD_WRITE) {
		/* Never buffer more than we would ever accept (proto.md: MAY disconnect). */
		if (rq->len > NBD_MAX_PAYLOAD) {
			log_info("nbd: write of %u bytes is over the %u limit: disconnecting",
				 rq->len, NBD_MAX_PAYLOAD);
			free(rq);
			return NULL;
		}
		rq->payload = payload_get(c, rq->len);
		if (nbd_conn_recv(c, rq->payload, rq->len) < 0) {
			free(rq->payload);
			free(rq);
			return NULL;
		}
		rq->cost = rq->len;
	} else if (rq->type == NBD_CMD_READ) {
		rq->cost = MIN(rq->len, NBD_MAX_PAYLOAD);
	}
	return rq;
}

void nbd_transmission(struct nbd_conn *c)
{
	pthread_mutex_init(&c->send_lock, NULL);
	pthread_mutex_init(&c->qlock, NULL);
	pthread_cond_init(&c->qcond, NULL);
	pthread_cond_init(&c->space, NULL);
	if (start_workers(c)) {
		for (;;) {
			struct nbd_req *rq = read_request(c);

			if (!rq)
				break;
			if (rq->type == NBD_CMD_DISC) {
				/* In-flight requests finish; then we close. */
				free(rq);
				break;
			}
			if (rq->type == NBD_CMD_READ && read_inline(c, rq)) {
				free(rq);
				continue;
			}
			enqueue(c, rq);
		}
	}
	stop_workers(c);
	free(worker_buf); /* this thread's, if read_inline used it */
	worker_buf = NULL;
	while (c->nspare)
		free(c->spare[--c->nspare]);
	pthread_mutex_destroy(&c->send_lock);
	pthread_mutex_destroy(&c->qlock);
	pthread_cond_destroy(&c->qcond);
	pthread_cond_destroy(&c->space);
}
