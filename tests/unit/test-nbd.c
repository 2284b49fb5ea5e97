/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The NBD server driven with hand-made protocol bytes over a socketpair,
 * against an in-memory device.  `test-nbd --serve SOCKET [ro]` instead
 * serves that device on a Unix socket, for trying real clients by hand.
 */
#include <errno.h>
#include <glib.h>
#include <pthread.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "bdev.h"
#include "control.h"
#include "image.h"
#include "nbd-proto.h"
#include "nbd-server.h"
#include "util.h"

/* ---- an in-memory device: 64 KiB blocks, each allocated or not ---------- */

#define MEM_SIZE  (4u << 20)
#define MEM_BLOCK (64u << 10)

struct mem {
	uint8_t *data;
	bool alloc[MEM_SIZE / MEM_BLOCK];
	pthread_mutex_t lock;
	unsigned flushes;
};

static int mem_pread(struct bdev *d, void *buf, size_t len, uint64_t off)
{
	struct mem *m = d->priv;

	if (off == 3u << 20) /* a damaged range */
		return -EIO;
	pthread_mutex_lock(&m->lock);
	memcpy(buf, m->data + off, len);
	pthread_mutex_unlock(&m->lock);
	return 0;
}

static int mem_pwrite(struct bdev *d, const void *buf, size_t len, uint64_t off,
		      unsigned flags)
{
	struct mem *m = d->priv;

	pthread_mutex_lock(&m->lock);
	memcpy(m->data + off, buf, len);
	for (uint64_t b = off / MEM_BLOCK; b <= (off + len - 1) / MEM_BLOCK; b++)
		m->alloc[b] = true;
	pthread_mutex_unlock(&m->lock);
	return 0;
}

static int mem_zero(struct bdev *d, uint64_t off, uint64_t len, unsigned flags)
{
	struct mem *m = d->priv;

	if (flags & BDEV_FAST_ZERO)
		return -ENOTSUP;
	pthread_mutex_lock(&m->lock);
	memset(m->data + off, 0, len);
	pthread_mutex_unlock(&m->lock);
	return 0;
}

static int mem_flush(struct bdev *d)
{
	struct mem *m = d->priv;

	__atomic_add_fetch(&m->flushes, 1, __ATOMIC_SEQ_CST);
	return 0;
}

static int mem_status(struct bdev *d, uint64_t off, uint64_t len, uint64_t *run,
		      unsigned *status, unsigned *depth)
{
	struct mem *m = d->priv;
	uint64_t b = off / MEM_BLOCK;
	bool a = m->alloc[b];

	*run = 0;
	while (*run < len && b < MEM_SIZE / MEM_BLOCK && m->alloc[b] == a) {
		*run = MIN(len, (b + 1) * MEM_BLOCK - off);
		b++;
	}
	*status = a ? 0 : BDEV_ST_HOLE | BDEV_ST_ZERO;
	*depth = a ? 1 : 0;
	return 0;
}

static const struct bdev_ops mem_ops = {
	.pread = mem_pread, .pwrite = mem_pwrite, .zero = mem_zero,
	.flush = mem_flush, .block_status = mem_status,
};

/* First MiB allocated with pattern i & 0xff ^ 0x5a, the rest a hole. */
static struct bdev *mem_new(bool ro)
{
	struct mem *m = g_new0(struct mem, 1);

	m->data = g_malloc0(MEM_SIZE);
	for (unsigned i = 0; i < (1u << 20); i++)
		m->data[i] = (i & 0xff) ^ 0x5a;
	for (unsigned b = 0; b < (1u << 20) / MEM_BLOCK; b++)
		m->alloc[b] = true;
	pthread_mutex_init(&m->lock, NULL);
	return bdev_new(&mem_ops, "mem", MEM_SIZE, ro, m);
}

static void mem_free(struct bdev *d)
{
	struct mem *m = d->priv;

	g_free(m->data);
	g_free(m);
	free(d);
}

/* ---- a server on one end of a socketpair -------------------------------- */

struct fixture {
	struct bdev *dev, *rodev;
	struct nbd_server *srv;
	int fd;          /* the client's end */
	pthread_t thread;
	int sfd;
};

static void *serve(void *arg)
{
	struct fixture *f = arg;

	nbd_server_serve_socket(f->srv, f->sfd);
	return NULL;
}

static void fx_start(struct fixture *f, const struct nbd_server_opts *o)
{
	int sv[2];
	struct timeval tv = { .tv_sec = 5 };
	struct nbd_export x[2];

	f->dev = mem_new(false);
	f->rodev = mem_new(false);
	x[0] = (struct nbd_export){ "disk", "the disk", f->dev, false };
	x[1] = (struct nbd_export){ "ro", NULL, f->rodev, true };
	f->srv = nbd_server_new(x, 2, o);
	g_assert_cmpint(socketpair(AF_UNIX, SOCK_STREAM, 0, sv), ==, 0);
	setsockopt(sv[0], SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
	f->fd = sv[0];
	f->sfd = sv[1];
	g_assert_cmpint(pthread_create(&f->thread, NULL, serve, f), ==, 0);
}

static void fx_setup(struct fixture *f, gconstpointer data)
{
	struct nbd_server_opts o = { .allocation_depth = true, .workers = 4 };

	memset(f, 0, sizeof(*f));
	fx_start(f, &o);
}

static void fx_teardown(struct fixture *f, gconstpointer data)
{
	close(f->fd);
	pthread_join(f->thread, NULL);
	nbd_server_free(f->srv);
	mem_free(f->dev);
	mem_free(f->rodev);
}

static void xsend(struct fixture *f, const void *p, size_t n)
{
	g_assert_cmpint(send(f->fd, p, n, MSG_NOSIGNAL), ==, (ssize_t)n);
}

static void xrecv(struct fixture *f, void *p, size_t n)
{
	size_t got = 0;

	while (got < n) {
		ssize_t r = recv(f->fd, (char *)p + got, n - got, 0);

		g_assert_cmpint(r, >, 0);
		got += r;
	}
}

/* true if the server closed the connection (EOF) */
static bool at_eof(struct fixture *f)
{
	char c;
	ssize_t r;

	do
		r = recv(f->fd, &c, 1, 0);
	while (r > 0);
	return r == 0;
}

static void greet(struct fixture *f, uint32_t cflags)
{
	uint8_t b[18], c[4];

	xrecv(f, b, 18);
	g_assert_cmphex(be64(b), ==, NBD_MAGIC);
	g_assert_cmphex(be64(b + 8), ==, NBD_IHAVEOPT);
	g_assert_cmphex(be16(b + 16), ==, NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES);
	put_be32(c, cflags);
	xsend(f, c, 4);
}

static void send_opt(struct fixture *f, uint32_t opt, const void *data, uint32_t len)
{
	uint8_t h[16];

	put_be64(h, NBD_IHAVEOPT);
	put_be32(h + 8, opt);
	put_be32(h + 12, len);
	xsend(f, h, 16);
	if (len)
		xsend(f, data, len);
}

/* Read one option reply; returns its type, data in *data (g_free). */
static uint32_t recv_rep(struct fixture *f, uint32_t opt, uint8_t **data, uint32_t *len)
{
	uint8_t h[20];
	uint32_t l;

	xrecv(f, h, 20);
	g_assert_cmphex(be64(h), ==, NBD_REP_MAGIC);
	g_assert_cmpuint(be32(h + 8), ==, opt);
	l = be32(h + 16);
	g_assert_cmpuint(l, <, 1u << 20);
	*data = g_malloc(l + 1);
	xrecv(f, *data, l);
	if (len)
		*len = l;
	return be32(h + 12);
}

static uint32_t rep_type(struct fixture *f, uint32_t opt)
{
	uint8_t *d;
	uint32_t t = recv_rep(f, opt, &d, NULL);

	g_free(d);
	return t;
}

/* INFO/GO payload for name with info requests */
static size_t info_req(uint8_t *b, const char *name, const uint16_t *req, unsigned n)
{
	size_t l = strlen(name);

	put_be32(b, l);
	memcpy(b + 4, name, l);
	put_be16(b + 4 + l, n);
	for (unsigned i = 0; i < n; i++)
		put_be16(b + 6 + l + 2 * i, req[i]);
	return 6 + l + 2 * n;
}

/* GO to name; returns the transmission flags. */
static uint16_t go(struct fixture *f, const char *name)
{
	uint8_t b[256], *d;
	uint32_t t, l;
	uint16_t flags = 0;

	send_opt(f, NBD_OPT_GO, b, info_req(b, name, NULL, 0));
	while ((t = recv_rep(f, NBD_OPT_GO, &d, &l)) == NBD_REP_INFO) {
		if (be16(d) == NBD_INFO_EXPORT) {
			g_assert_cmpuint(l, ==, 12);
			g_assert_cmpuint(be64(d + 2), ==, MEM_SIZE);
			flags = be16(d + 10);
		}
		g_free(d);
	}
	g_free(d);
	g_assert_cmphex(t, ==, NBD_REP_ACK);
	g_assert_true(flags & NBD_FLAG_HAS_FLAGS);
	return flags;
}

static void structured(struct fixture *f)
{
	send_opt(f, NBD_OPT_STRUCTURED_REPLY, NULL, 0);
	g_assert_cmphex(rep_type(f, NBD_OPT_STRUCTURED_REPLY), ==, NBD_REP_ACK);
}

static void set_meta(struct fixture *f, const char *const *q, unsigned n,
		     unsigned expect_replies)
{
	uint8_t b[512], *d;
	size_t l = 0;
	uint32_t t;
	unsigned got = 0;

	put_be32(b, 4);
	memcpy(b + 4, "disk", 4);
	put_be32(b + 8, n);
	l = 12;
	for (unsigned i = 0; i < n; i++) {
		put_be32(b + l, strlen(q[i]));
		memcpy(b + l + 4, q[i], strlen(q[i]));
		l += 4 + strlen(q[i]);
	}
	send_opt(f, NBD_OPT_SET_META_CONTEXT, b, l);
	while ((t = recv_rep(f, NBD_OPT_SET_META_CONTEXT, &d, NULL)) == NBD_REP_META_CONTEXT) {
		got++;
		g_free(d);
	}
	g_free(d);
	g_assert_cmphex(t, ==, NBD_REP_ACK);
	g_assert_cmpuint(got, ==, expect_replies);
}

static void send_req(struct fixture *f, uint16_t flags, uint16_t type, uint64_t cookie,
		     uint64_t off, uint32_t len, const void *payload)
{
	uint8_t h[28];

	put_be32(h, NBD_REQUEST_MAGIC);
	put_be16(h + 4, flags);
	put_be16(h + 6, type);
	put_be64(h + 8, cookie);
	put_be64(h + 16, off);
	put_be32(h + 24, len);
	xsend(f, h, 28);
	if (payload)
		xsend(f, payload, len);
}

/* Simple reply: returns the error; data (if no error) read into buf. */
static uint32_t simple_reply(struct fixture *f, uint64_t cookie, void *buf, uint32_t len)
{
	uint8_t h[16];

	xrecv(f, h, 16);
	g_assert_cmphex(be32(h), ==, NBD_SIMPLE_REPLY_MAGIC);
	g_assert_cmpuint(be64(h + 8), ==, cookie);
	if (!be32(h + 4) && len)
		xrecv(f, buf, len);
	return be32(h + 4);
}

struct chunk {
	uint16_t flags, type;
	uint64_t cookie;
	uint32_t len;
	uint8_t *data;
};

static void recv_chunk(struct fixture *f, struct chunk *c)
{
	uint8_t h[20];

	xrecv(f, h, 20);
	g_assert_cmphex(be32(h), ==, NBD_STRUCTURED_REPLY_MAGIC);
	c->flags = be16(h + 4);
	c->type = be16(h + 6);
	c->cookie = be64(h + 8);
	c->len = be32(h + 16);
	c->data = g_malloc(c->len + 1);
	xrecv(f, c->data, c->len);
}

static uint8_t expect_byte(uint64_t off)
{
	return off < (1u << 20) ? (off & 0xff) ^ 0x5a : 0;
}

/* ---- tests -------------------------------------------------------------- */

static void test_list(struct fixture *f, gconstpointer d)
{
	uint8_t *data;
	uint32_t len;

	greet(f, NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES);
	send_opt(f, NBD_OPT_LIST, NULL, 0);
	g_assert_cmphex(recv_rep(f, NBD_OPT_LIST, &data, &len), ==, NBD_REP_SERVER);
	g_assert_cmpuint(be32(data), ==, 4);
	g_assert_cmpmem(data + 4, len - 4, "diskthe disk", 12);
	g_free(data);
	g_assert_cmphex(recv_rep(f, NBD_OPT_LIST, &data, &len), ==, NBD_REP_SERVER);
	g_assert_cmpmem(data + 4, len - 4, "ro", 2);
	g_free(data);
	g_assert_cmphex(rep_type(f, NBD_OPT_LIST), ==, NBD_REP_ACK);
	/* data attached to LIST is invalid, and negotiation goes on */
	send_opt(f, NBD_OPT_LIST, "x", 1);
	g_assert_cmphex(rep_type(f, NBD_OPT_LIST), ==, NBD_REP_ERR_INVALID);
	send_opt(f, NBD_OPT_ABORT, NULL, 0);
	g_assert_cmphex(rep_type(f, NBD_OPT_ABORT), ==, NBD_REP_ACK);
	g_assert_true(at_eof(f));
}

static void test_unknown_option(struct fixture *f, gconstpointer d)
{
	greet(f, NBD_FLAG_C_FIXED_NEWSTYLE);
	send_opt(f, 4242, "payload", 7);
	g_assert_cmphex(rep_type(f, 4242), ==, NBD_REP_ERR_UNSUP);
	send_opt(f, NBD_OPT_STARTTLS, NULL, 0);
	g_assert_cmphex(rep_type(f, NBD_OPT_STARTTLS), ==, NBD_REP_ERR_UNSUP);
	/* meta contexts need structured replies first */
	send_opt(f, NBD_OPT_SET_META_CONTEXT, "\0\0\0\0\0\0\0\0", 8);
	g_assert_cmphex(rep_type(f, NBD_OPT_SET_META_CONTEXT), ==, NBD_REP_ERR_INVALID);
	g_assert_true(go(f, "disk") & NBD_FLAG_SEND_WRITE_ZEROES);
}

static void test_info(struct fixture *f, gconstpointer d)
{
	static const uint16_t req[] = { NBD_INFO_NAME, NBD_INFO_DESCRIPTION,
					NBD_INFO_BLOCK_SIZE, 999 };
	uint8_t b[128], *data;
	uint32_t t, len;
	bool seen_bs = false, seen_name = false, seen_desc = false;

	greet(f, NBD_FLAG_C_FIXED_NEWSTYLE);
	send_opt(f, NBD_OPT_INFO, b, info_req(b, "nosuch", NULL, 0));
	g_assert_cmphex(rep_type(f, NBD_OPT_INFO), ==, NBD_REP_ERR_UNKNOWN);
	/* name length overrunning the option */
	put_be32(b, 100);
	send_opt(f, NBD_OPT_INFO, b, 10);
	g_assert_cmphex(rep_type(f, NBD_OPT_INFO), ==, NBD_REP_ERR_INVALID);
	send_opt(f, NBD_OPT_INFO, b, info_req(b, "disk", req, 4));
	while ((t = recv_rep(f, NBD_OPT_INFO, &data, &len)) == NBD_REP_INFO) {
		switch (be16(data)) {
		case NBD_INFO_EXPORT:
			g_assert_cmpuint(be64(data + 2), ==, MEM_SIZE);
			break;
		case NBD_INFO_NAME:
			g_assert_cmpmem(data + 2, len - 2, "disk", 4);
			seen_name = true;
			break;
		case NBD_INFO_DESCRIPTION:
			g_assert_cmpmem(data + 2, len - 2, "the disk", 8);
			seen_desc = true;
			break;
		case NBD_INFO_BLOCK_SIZE:
			g_assert_cmpuint(be32(data + 2), ==, 1);
			g_assert_cmpuint(be32(data + 6), ==, 4096);
			g_assert_cmpuint(be32(data + 10), ==, 32u << 20);
			seen_bs = true;
			break;
		}
		g_free(data);
	}
	g_free(data);
	g_assert_cmphex(t, ==, NBD_REP_ACK);
	g_assert_true(seen_bs && seen_name && seen_desc);
	/* "" is the default export */
	g_assert_false(go(f, "") & NBD_FLAG_READ_ONLY);
}

static void test_export_name(struct fixture *f, gconstpointer d)
{
	uint8_t b[10 + 124];
	uint8_t req[28];

	greet(f, NBD_FLAG_C_FIXED_NEWSTYLE);
	send_opt(f, NBD_OPT_EXPORT_NAME, "ro", 2);
	xrecv(f, b, sizeof(b)); /* with the 124 zero bytes: NO_ZEROES not asked */
	g_assert_cmpuint(be64(b), ==, MEM_SIZE);
	g_assert_true(be16(b + 8) & NBD_FLAG_READ_ONLY);
	g_assert_true(buf_is_zero(b + 10, 124));
	/* write to a read-only export: EPERM; the payload is consumed */
	memset(req, 0, sizeof(req));
	send_req(f, 0, NBD_CMD_WRITE, 7, 0, sizeof(req), req);
	g_assert_cmpuint(simple_reply(f, 7, NULL, 0), ==, NBD_EPERM);
	send_req(f, 0, NBD_CMD_TRIM, 8, 0, 4096, NULL);
	g_assert_cmpuint(simple_reply(f, 8, NULL, 0), ==, NBD_EPERM);
	send_req(f, 0, NBD_CMD_DISC, 9, 0, 0, NULL);
	g_assert_true(at_eof(f));
}

static void test_unknown_export_name(struct fixture *f, gconstpointer d)
{
	greet(f, NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES);
	send_opt(f, NBD_OPT_EXPORT_NAME, "nosuch", 6);
	g_assert_true(at_eof(f));
}

static void test_simple_io(struct fixture *f, gconstpointer d)
{
	uint8_t *buf = g_malloc(65536), *w = g_malloc(65536);

	greet(f, NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES);
	g_assert_false(go(f, "disk") & NBD_FLAG_SEND_DF); /* DF needs structured */
	send_req(f, 0, NBD_CMD_READ, 1, 4000, 65536, NULL);
	g_assert_cmpuint(simple_reply(f, 1, buf, 65536), ==, 0);
	for (unsigned i = 0; i < 65536; i++)
		g_assert_cmpuint(buf[i], ==, expect_byte(4000 + i));
	for (unsigned i = 0; i < 65536; i++)
		w[i] = i * 7;
	send_req(f, NBD_CMD_FLAG_FUA, NBD_CMD_WRITE, 2, 2u << 20, 65536, w);
	g_assert_cmpuint(simple_reply(f, 2, NULL, 0), ==, 0);
	send_req(f, 0, NBD_CMD_READ, 3, 2u << 20, 65536, NULL);
	g_assert_cmpuint(simple_reply(f, 3, buf, 65536), ==, 0);
	g_assert_cmpmem(buf, 65536, w, 65536);
	/* errors the spec names */
	send_req(f, 0, NBD_CMD_READ, 4, MEM_SIZE - 10, 11, NULL);
	g_assert_cmpuint(simple_reply(f, 4, NULL, 0), ==, NBD_EINVAL);
	send_req(f, 0, NBD_CMD_WRITE, 5, MEM_SIZE - 1, 2, "ab");
	g_assert_cmpuint(simple_reply(f, 5, NULL, 0), ==, NBD_ENOSPC);
	send_req(f, 0, NBD_CMD_READ, 6, UINT64_MAX - 1, 4, NULL);
	g_assert_cmpuint(simple_reply(f, 6, NULL, 0), ==, NBD_EINVAL);
	send_req(f, 1u << 9, NBD_CMD_READ, 7, 0, 512, NULL);
	g_assert_cmpuint(simple_reply(f, 7, NULL, 0), ==, NBD_EINVAL);
	send_req(f, NBD_CMD_FLAG_DF, NBD_CMD_READ, 8, 0, 512, NULL);
	g_assert_cmpuint(simple_reply(f, 8, NULL, 0), ==, NBD_EINVAL);
	send_req(f, 0, 99, 9, 0, 0, NULL);
	g_assert_cmpuint(simple_reply(f, 9, NULL, 0), ==, NBD_EINVAL);
	send_req(f, 0, NBD_CMD_BLOCK_STATUS, 10, 0, 512, NULL); /* no context */
	g_assert_cmpuint(simple_reply(f, 10, NULL, 0), ==, NBD_EINVAL);
	send_req(f, 0, NBD_CMD_READ, 11, 0, 0, NULL);            /* zero length */
	g_assert_cmpuint(simple_reply(f, 11, NULL, 0), ==, 0);
	send_req(f, 0, NBD_CMD_READ, 12, 3u << 20, 512, NULL);   /* EIO from the device */
	g_assert_cmpuint(simple_reply(f, 12, NULL, 0), ==, NBD_EIO);
	send_req(f, NBD_CMD_FLAG_FAST_ZERO, NBD_CMD_WRITE_ZEROES, 13, 0, 4096, NULL);
	g_assert_cmpuint(simple_reply(f, 13, NULL, 0), ==, NBD_ENOTSUP);
	send_req(f, NBD_CMD_FLAG_NO_HOLE, NBD_CMD_WRITE_ZEROES, 14, 0, 4096, NULL);
	g_assert_cmpuint(simple_reply(f, 14, NULL, 0), ==, 0);
	send_req(f, 0, NBD_CMD_READ, 15, 0, 4096, NULL);
	g_assert_cmpuint(simple_reply(f, 15, buf, 4096), ==, 0);
	g_assert_true(buf_is_zero(buf, 4096));
	send_req(f, 0, NBD_CMD_FLUSH, 16, 0, 0, NULL);
	g_assert_cmpuint(simple_reply(f, 16, NULL, 0), ==, 0);
	g_assert_cmpuint(((struct mem *)f->dev->priv)->flushes, >=, 1);
	send_req(f, 0, NBD_CMD_CACHE, 17, 0, 4096, NULL);
	g_assert_cmpuint(simple_reply(f, 17, NULL, 0), ==, 0);
	send_req(f, 0, NBD_CMD_TRIM, 18, 0, 4096, NULL);
	g_assert_cmpuint(simple_reply(f, 18, NULL, 0), ==, 0);
	send_req(f, 0, NBD_CMD_READ, 19, 0, (32u << 20) + 1, NULL);
	g_assert_cmpuint(simple_reply(f, 19, NULL, 0), ==, NBD_EINVAL); /* past the end */
	send_req(f, 0, NBD_CMD_DISC, 20, 0, 0, NULL);
	g_assert_true(at_eof(f));
	g_free(buf);
	g_free(w);
}

static void test_structured_read(struct fixture *f, gconstpointer d)
{
	struct chunk c;
	uint64_t covered = 0;
	bool hole = false, data = false;

	greet(f, NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES);
	structured(f);
	g_assert_true(go(f, "disk") & NBD_FLAG_SEND_DF);
	/* 512 KiB of data then 512 KiB of hole */
	send_req(f, 0, NBD_CMD_READ, 1, 512u << 10, 1u << 20, NULL);
	do {
		recv_chunk(f, &c);
		g_assert_cmpuint(c.cookie, ==, 1);
		if (c.type == NBD_REPLY_TYPE_OFFSET_DATA) {
			uint64_t off = be64(c.data);

			for (uint32_t i = 8; i < c.len; i++)
				g_assert_cmpuint(c.data[i], ==, expect_byte(off + i - 8));
			covered += c.len - 8;
			data = true;
		} else if (c.type == NBD_REPLY_TYPE_OFFSET_HOLE) {
			g_assert_cmpuint(be64(c.data), >=, 1u << 20);
			covered += be32(c.data + 8);
			hole = true;
		}
		g_free(c.data);
	} while (!(c.flags & NBD_REPLY_FLAG_DONE));
	g_assert_true(hole && data);
	g_assert_cmpuint(covered, ==, 1u << 20);
	/* DF: one data chunk */
	send_req(f, NBD_CMD_FLAG_DF, NBD_CMD_READ, 2, 512u << 10, 1u << 20, NULL);
	recv_chunk(f, &c);
	g_assert_cmpuint(c.type, ==, NBD_REPLY_TYPE_OFFSET_DATA);
	g_assert_cmpuint(c.len, ==, 8 + (1u << 20));
	g_assert_true(c.flags & NBD_REPLY_FLAG_DONE);
	g_free(c.data);
	/* out of range: a structured error chunk */
	send_req(f, 0, NBD_CMD_READ, 3, MEM_SIZE, 1, NULL);
	recv_chunk(f, &c);
	g_assert_cmpuint(c.type, ==, NBD_REPLY_TYPE_ERROR);
	g_assert_cmpuint(be32(c.data), ==, NBD_EINVAL);
	g_assert_true(c.flags & NBD_REPLY_FLAG_DONE);
	g_free(c.data);
	/* damaged (allocated) range: error with its offset */
	((struct mem *)f->dev->priv)->alloc[(3u << 20) / MEM_BLOCK] = true;
	send_req(f, 0, NBD_CMD_READ, 4, 3u << 20, 4096, NULL);
	recv_chunk(f, &c);
	g_assert_cmpuint(c.type, ==, NBD_REPLY_TYPE_ERROR_OFFSET);
	g_assert_cmpuint(be32(c.data), ==, NBD_EIO);
	g_free(c.data);
}

static void test_block_status(struct fixture *f, gconstpointer d)
{
	static const char *const q[] = { "base:allocation", "qemu:allocation-depth",
					 "nosuch:thing" };
	struct chunk c;
	unsigned chunks = 0;

	greet(f, NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES);
	structured(f);
	set_meta(f, q, 3, 2);
	go(f, "disk");
	send_req(f, 0, NBD_CMD_BLOCK_STATUS, 1, 0, MEM_SIZE, NULL);
	do {
		recv_chunk(f, &c);
		g_assert_cmpuint(c.type, ==, NBD_REPLY_TYPE_BLOCK_STATUS);
		g_assert_cmpuint(c.len, ==, 4 + 16); /* two extents */
		g_assert_cmpuint(be32(c.data + 4), ==, 1u << 20);
		g_assert_cmpuint(be32(c.data + 12), ==, 3u << 20);
		if (be32(c.data) == 1) { /* base:allocation */
			g_assert_cmpuint(be32(c.data + 8), ==, 0);
			g_assert_cmpuint(be32(c.data + 16), ==, NBD_STATE_HOLE | NBD_STATE_ZERO);
		} else {
			g_assert_cmpuint(be32(c.data + 8), ==, 1);
			g_assert_cmpuint(be32(c.data + 16), ==, 0);
		}
		chunks++;
		g_free(c.data);
	} while (!(c.flags & NBD_REPLY_FLAG_DONE));
	g_assert_cmpuint(chunks, ==, 2);
	send_req(f, NBD_CMD_FLAG_REQ_ONE, NBD_CMD_BLOCK_STATUS, 2, 4096, 10, NULL);
	do {
		recv_chunk(f, &c);
		g_assert_cmpuint(c.len, ==, 4 + 8);
		g_assert_cmpuint(be32(c.data + 4), ==, 10);
		g_free(c.data);
	} while (!(c.flags & NBD_REPLY_FLAG_DONE));
	send_req(f, 0, NBD_CMD_BLOCK_STATUS, 3, 0, 0, NULL);
	recv_chunk(f, &c);
	g_assert_cmpuint(c.type, ==, NBD_REPLY_TYPE_ERROR);
	g_free(c.data);
}

/* 24 reads in flight, replies matched by cookie in any order. */
static void test_pipelined(struct fixture *f, gconstpointer d)
{
	enum { N = 24, LEN = 128 << 10 };
	uint8_t *buf = g_malloc(LEN);
	bool seen[N] = { false };

	greet(f, NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES);
	go(f, "disk");
	for (int i = 0; i < N; i++)
		send_req(f, 0, NBD_CMD_READ, 100 + i, (uint64_t)i * 4096, LEN, NULL);
	for (int i = 0; i < N; i++) {
		uint8_t h[16];
		uint64_t k;

		xrecv(f, h, 16);
		g_assert_cmphex(be32(h), ==, NBD_SIMPLE_REPLY_MAGIC);
		g_assert_cmpuint(be32(h + 4), ==, 0);
		k = be64(h + 8) - 100;
		g_assert_cmpuint(k, <, N);
		g_assert_false(seen[k]);
		seen[k] = true;
		xrecv(f, buf, LEN);
		for (unsigned j = 0; j < LEN; j += 997)
			g_assert_cmpuint(buf[j], ==, expect_byte(k * 4096 + j));
	}
	g_free(buf);
}

/* ---- hostile clients ------------------------------------------------------ */

static void test_bad_option_magic(struct fixture *f, gconstpointer d)
{
	greet(f, NBD_FLAG_C_FIXED_NEWSTYLE);
	xsend(f, "0123456789abcdef", 16);
	g_assert_true(at_eof(f));
}

static void test_bad_client_flags(struct fixture *f, gconstpointer d)
{
	greet(f, 0x80);
	g_assert_true(at_eof(f));
}

static void test_oversized_option(struct fixture *f, gconstpointer d)
{
	uint8_t h[16];

	greet(f, NBD_FLAG_C_FIXED_NEWSTYLE);
	put_be64(h, NBD_IHAVEOPT);
	put_be32(h + 8, NBD_OPT_GO);
	put_be32(h + 12, 0xffffffff);
	xsend(f, h, 16);
	g_assert_true(at_eof(f));
}

static void test_oversized_write(struct fixture *f, gconstpointer d)
{
	greet(f, NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES);
	go(f, "disk");
	send_req(f, 0, NBD_CMD_WRITE, 1, 0, (32u << 20) + 1, NULL);
	g_assert_true(at_eof(f));
}

static void test_bad_request_magic(struct fixture *f, gconstpointer d)
{
	greet(f, NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES);
	go(f, "disk");
	xsend(f, "garbage garbage garbage garbage", 28);
	g_assert_true(at_eof(f));
}

static void test_many_options(struct fixture *f, gconstpointer d)
{
	unsigned i;

	greet(f, NBD_FLAG_C_FIXED_NEWSTYLE);
	for (i = 0; i < NBD_MAX_OPTIONS; i++) {
		send_opt(f, 4242, NULL, 0);
		g_assert_cmphex(rep_type(f, 4242), ==, NBD_REP_ERR_UNSUP);
	}
	send_opt(f, 4242, NULL, 0);
	g_assert_true(at_eof(f));
}

static void test_meta_query_overrun(struct fixture *f, gconstpointer d)
{
	uint8_t b[32];

	greet(f, NBD_FLAG_C_FIXED_NEWSTYLE);
	structured(f);
	put_be32(b, 4);
	memcpy(b + 4, "disk", 4);
	put_be32(b + 8, 1);
	put_be32(b + 12, 1000); /* query longer than the option */
	send_opt(f, NBD_OPT_SET_META_CONTEXT, b, 20);
	g_assert_cmphex(rep_type(f, NBD_OPT_SET_META_CONTEXT), ==, NBD_REP_ERR_INVALID);
	put_be32(b + 8, 0xffffffff); /* absurd query count */
	send_opt(f, NBD_OPT_LIST_META_CONTEXT, b, 16);
	g_assert_cmphex(rep_type(f, NBD_OPT_LIST_META_CONTEXT), ==, NBD_REP_ERR_INVALID);
	go(f, "disk");
}

static void handshake_timeout_setup(struct fixture *f, gconstpointer data)
{
	struct nbd_server_opts o = { .handshake_timeout = 1 };

	memset(f, 0, sizeof(*f));
	fx_start(f, &o);
}

static void test_handshake_timeout(struct fixture *f, gconstpointer d)
{
	gint64 t0 = g_get_monotonic_time();
	uint8_t b[18];

	xrecv(f, b, 18);
	/* say nothing: the server gives up after its 1 s limit */
	g_assert_true(at_eof(f));
	g_assert_cmpint(g_get_monotonic_time() - t0, <, 4 * G_USEC_PER_SEC);
}

/* ---- nbd_server_run over a listening Unix socket ------------------------- */

struct runner { struct nbd_server *srv; int lfd; int ret; };

static void *run_thread(void *arg)
{
	struct runner *r = arg;

	r->ret = nbd_server_run(r->srv, r->lfd);
	return NULL;
}

static int listen_unix(char *path)
{
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	int fd = socket(AF_UNIX, SOCK_STREAM, 0);

	g_snprintf(sa.sun_path, sizeof(sa.sun_path), "%s", path);
	unlink(path);
	g_assert_cmpint(bind(fd, (struct sockaddr *)&sa, sizeof(sa)), ==, 0);
	g_assert_cmpint(listen(fd, 8), ==, 0);
	return fd;
}

static int connect_unix(const char *path)
{
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	int fd = socket(AF_UNIX, SOCK_STREAM, 0);
	struct timeval tv = { .tv_sec = 5 };

	g_snprintf(sa.sun_path, sizeof(sa.sun_path), "%s", path);
	g_assert_cmpint(connect(fd, (struct sockaddr *)&sa, sizeof(sa)), ==, 0);
	setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
	return fd;
}

static void test_run_stop(void)
{
	char *dir = g_dir_make_tmp("test-nbd-XXXXXX", NULL);
	char *path = g_build_filename(dir, "sock", NULL);
	struct bdev *dev = mem_new(false);
	struct nbd_export x = { "", NULL, dev, false };
	struct nbd_server_opts o = { .persistent = true, .max_clients = 2 };
	struct runner r = { nbd_server_new(&x, 1, &o), listen_unix(path), -1 };
	struct fixture f1 = { 0 }, f2 = { 0 }, f3 = { 0 };
	uint8_t b[18];
	pthread_t t;

	pthread_create(&t, NULL, run_thread, &r);
	f1.fd = connect_unix(path);
	f2.fd = connect_unix(path);
	greet(&f1, NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES);
	greet(&f2, NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES);
	g_assert_true(go(&f1, "") & NBD_FLAG_CAN_MULTI_CONN);
	/* a third client waits (-e 2): no greeting yet */
	f3.fd = connect_unix(path);
	{
		struct timeval tv = { .tv_usec = 300000 };

		setsockopt(f3.fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
		g_assert_cmpint(recv(f3.fd, b, 1, 0), <, 0);
	}
	close(f2.fd); /* makes room */
	{
		struct timeval tv = { .tv_sec = 5 };

		setsockopt(f3.fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
	}
	greet(&f3, NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES);
	nbd_server_stop(r.srv);
	pthread_join(t, NULL);
	g_assert_cmpint(r.ret, ==, 0);
	g_assert_true(at_eof(&f1));
	g_assert_true(at_eof(&f3));
	close(f1.fd);
	close(f3.fd);
	nbd_server_free(r.srv);
	close(r.lfd);
	mem_free(dev);
	unlink(path);
	rmdir(dir);
	g_free(path);
	g_free(dir);
}

/* Without persistence the server returns once its last client has left. */
static void test_run_not_persistent(void)
{
	char *dir = g_dir_make_tmp("test-nbd-XXXXXX", NULL);
	char *path = g_build_filename(dir, "sock", NULL);
	struct bdev *dev = mem_new(false);
	struct nbd_export x = { "disk", NULL, dev, false };
	struct nbd_server_opts o = { .max_clients = 1 };
	struct runner r = { nbd_server_new(&x, 1, &o), listen_unix(path), -1 };
	struct fixture f1 = { 0 };
	pthread_t t;

	pthread_create(&t, NULL, run_thread, &r);
	f1.fd = connect_unix(path);
	greet(&f1, NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES);
	g_assert_false(go(&f1, "disk") & NBD_FLAG_CAN_MULTI_CONN); /* -e 1 */
	send_req(&f1, 0, NBD_CMD_DISC, 1, 0, 0, NULL);
	g_assert_true(at_eof(&f1));
	close(f1.fd);
	pthread_join(t, NULL);
	g_assert_cmpint(r.ret, ==, 0);
	nbd_server_free(r.srv);
	close(r.lfd);
	mem_free(dev);
	unlink(path);
	rmdir(dir);
	g_free(path);
	g_free(dir);
}

/* ---- exports that change while the server runs -------------------------- */

static unsigned dyn_n = 1;

static unsigned dyn_list(void *opaque, struct nbd_export **out, unsigned *dflt)
{
	struct bdev *dev = opaque;
	struct nbd_export *x = xcalloc(2, sizeof(*x)); /* the server free()s it */

	x[0] = (struct nbd_export){ "a", NULL, dev, false };
	x[1] = (struct nbd_export){ "b", NULL, dev, true };
	*out = x;
	*dflt = dyn_n - 1;
	return dyn_n;
}

static unsigned count_list(struct fixture *f)
{
	uint8_t *d;
	uint32_t t;
	unsigned n = 0;

	send_opt(f, NBD_OPT_LIST, NULL, 0);
	while ((t = recv_rep(f, NBD_OPT_LIST, &d, NULL)) == NBD_REP_SERVER) {
		n++;
		g_free(d);
	}
	g_free(d);
	g_assert_cmphex(t, ==, NBD_REP_ACK);
	return n;
}

static void test_dynamic_exports(void)
{
	struct bdev *dev = mem_new(false);
	struct fixture f = { 0 };
	uint8_t b[64];
	int sv[2];

	f.srv = nbd_server_new_dynamic(dyn_list, dev, NULL);
	g_assert_cmpint(socketpair(AF_UNIX, SOCK_STREAM, 0, sv), ==, 0);
	f.fd = sv[0];
	f.sfd = sv[1];
	pthread_create(&f.thread, NULL, serve, &f);
	greet(&f, NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES);
	dyn_n = 1;
	g_assert_cmpuint(count_list(&f), ==, 1);
	send_opt(&f, NBD_OPT_INFO, b, info_req(b, "b", NULL, 0));
	g_assert_cmphex(rep_type(&f, NBD_OPT_INFO), ==, NBD_REP_ERR_UNKNOWN);
	dyn_n = 2; /* a new view appears */
	g_assert_cmpuint(count_list(&f), ==, 2);
	g_assert_true(go(&f, "") & NBD_FLAG_READ_ONLY); /* the default is now "b" */
	close(f.fd);
	pthread_join(f.thread, NULL);
	nbd_server_free(f.srv);
	mem_free(dev);
}

/* ---- the mount-daemon bridge (control.c) over a real raw image ---------- */

static void test_control_bridge(void)
{
	char *dir = g_dir_make_tmp("test-nbd-XXXXXX", NULL);
	char *img_path = g_build_filename(dir, "img.raw", NULL);
	char *ctl_path = g_build_filename(dir, "ctl", NULL);
	char *nbd_path = g_build_filename(dir, "nbd", NULL);
	struct image_opts io = { .format = "raw" };
	struct nbd_control_request rq = { .view = "disk", .partition = -1, .shared = 2,
					  .persistent = true };
	struct nbd_control *ctl;
	struct image *img;
	struct err e = { 0 };
	struct fixture f = { 0 };
	uint8_t buf[512];
	char ans[16];
	int lfd, cfd;

	g_assert_true(g_file_set_contents(img_path, "", 0, NULL));
	g_assert_cmpint(truncate(img_path, 1 << 20), ==, 0);
	g_assert_cmpint(image_open(img_path, &io, &img, &e), ==, 0);
	ctl = nbd_control_start(img, ctl_path, &e);
	g_assert_nonnull(ctl);
	lfd = listen_unix(nbd_path);

	/* a view that does not exist: an error naming it */
	rq.view = "p7";
	g_assert_cmpint(nbd_control_request(ctl_path, lfd, &rq, &e), <, 0);
	g_assert_nonnull(strstr(e.msg, "p7"));

	memset(&e, 0, sizeof(e));
	rq.view = "disk";
	cfd = nbd_control_request(ctl_path, lfd, &rq, &e);
	g_assert_cmpint(cfd, >=, 0);
	close(lfd); /* the daemon serves its own copy */

	f.fd = connect_unix(nbd_path);
	greet(&f, NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES);
	{
		uint8_t b[64], *d;
		uint32_t t, l;
		uint64_t size = 0;

		send_opt(&f, NBD_OPT_GO, b, info_req(b, "", NULL, 0));
		while ((t = recv_rep(&f, NBD_OPT_GO, &d, &l)) == NBD_REP_INFO) {
			if (be16(d) == NBD_INFO_EXPORT)
				size = be64(d + 2);
			g_free(d);
		}
		g_free(d);
		g_assert_cmphex(t, ==, NBD_REP_ACK);
		g_assert_cmpuint(size, ==, 1 << 20);
	}
	memset(buf, 0xab, sizeof(buf));
	send_req(&f, 0, NBD_CMD_WRITE, 1, 4096, sizeof(buf), buf);
	g_assert_cmpuint(simple_reply(&f, 1, NULL, 0), ==, 0);
	memset(buf, 0, sizeof(buf));
	g_assert_cmpint(bdev_pread(img->disk, buf, sizeof(buf), 4096), ==, 0);
	g_assert_cmpuint(buf[0], ==, 0xab); /* the write went through the image's engine */

	/* stopping the control ends clients and tells imgfs-nbd "done" */
	nbd_control_stop(ctl);
	g_assert_true(at_eof(&f));
	g_assert_cmpint(recv(cfd, ans, sizeof(ans), 0), ==, 5);
	g_assert_cmpmem(ans, 4, "done", 4);
	close(cfd);
	close(f.fd);
	g_assert_false(g_file_test(ctl_path, G_FILE_TEST_EXISTS));
	g_assert_cmpint(image_close(img), ==, 0);
	unlink(nbd_path);
	unlink(img_path);
	rmdir(dir);
	g_free(dir);
	g_free(img_path);
	g_free(ctl_path);
	g_free(nbd_path);
}

/* ---- by-hand server mode -------------------------------------------------- */

static struct nbd_server *hand_srv;

static void on_signal(int sig)
{
	nbd_server_stop(hand_srv);
}

static int serve_by_hand(const char *path, bool ro)
{
	struct bdev *dev = mem_new(ro);
	struct nbd_export x = { "", "test-nbd memory disk", dev, ro };
	struct nbd_server_opts o = { .persistent = true, .allocation_depth = true };
	char *p = g_strdup(path);
	int lfd = listen_unix(p);

	hand_srv = nbd_server_new(&x, 1, &o);
	signal(SIGINT, on_signal);
	signal(SIGTERM, on_signal);
	nbd_server_run(hand_srv, lfd);
	nbd_server_free(hand_srv);
	unlink(p);
	g_free(p);
	mem_free(dev);
	return 0;
}

#define FX(name, fn) g_test_add(name, struct fixture, NULL, fx_setup, fn, fx_teardown)

int main(int argc, char **argv)
{
	signal(SIGPIPE, SIG_IGN);
	if (argc >= 3 && !strcmp(argv[1], "--serve"))
		return serve_by_hand(argv[2], argc > 3 && !strcmp(argv[3], "ro"));
	g_test_init(&argc, &argv, NULL);
	log_set_level(LOG_LVL_ERR);
	FX("/nbd/handshake/list", test_list);
	FX("/nbd/handshake/unknown-option", test_unknown_option);
	FX("/nbd/handshake/info", test_info);
	FX("/nbd/handshake/export-name", test_export_name);
	FX("/nbd/handshake/unknown-export-name", test_unknown_export_name);
	FX("/nbd/transmission/simple", test_simple_io);
	FX("/nbd/transmission/structured-read", test_structured_read);
	FX("/nbd/transmission/block-status", test_block_status);
	FX("/nbd/transmission/pipelined", test_pipelined);
	FX("/nbd/hostile/bad-option-magic", test_bad_option_magic);
	FX("/nbd/hostile/bad-client-flags", test_bad_client_flags);
	FX("/nbd/hostile/oversized-option", test_oversized_option);
	FX("/nbd/hostile/oversized-write", test_oversized_write);
	FX("/nbd/hostile/bad-request-magic", test_bad_request_magic);
	FX("/nbd/hostile/many-options", test_many_options);
	FX("/nbd/hostile/meta-query-overrun", test_meta_query_overrun);
	g_test_add("/nbd/hostile/handshake-timeout", struct fixture, NULL,
		   handshake_timeout_setup, test_handshake_timeout, fx_teardown);
	g_test_add_func("/nbd/run/stop", test_run_stop);
	g_test_add_func("/nbd/run/not-persistent", test_run_not_persistent);
	g_test_add_func("/nbd/run/dynamic-exports", test_dynamic_exports);
	g_test_add_func("/nbd/control/bridge", test_control_bridge);
	return g_test_run();
}
