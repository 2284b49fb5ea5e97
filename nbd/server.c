/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The server core: the accept loop, connection lifetimes, socket I/O and
 * stopping.  The protocol itself is in handshake.c and transmission.c.
 *
 * Lifetimes: every connection is on srv->conns while it runs; when it
 * ends it moves itself to srv->zombies and wakes the accept loop, which
 * joins it.  nbd_server_stop only writes to a pipe (so a signal handler
 * may call it); the accept loop then shuts down every client socket, which
 * makes their blocked reads and writes return, and waits for them all.
 */
#include "nbd-int.h"
#include "thread.h"
#include "util.h"

#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/sendfile.h>
#include <sys/socket.h>
#include <unistd.h>

uint32_t nbd_errno_to_wire(int err)
{
	if (err < 0)
		err = -err;
	switch (err) {
	case 0: return 0;
	case EPERM: case EROFS: case EACCES: return NBD_EPERM;
	case EIO: return NBD_EIO;
	case ENOMEM: return NBD_ENOMEM;
	case EINVAL: return NBD_EINVAL;
	case ENOSPC: case EDQUOT: case EFBIG: return NBD_ENOSPC;
	case EOVERFLOW: return NBD_EOVERFLOW;
	case ENOTSUP: return NBD_ENOTSUP;
	case ESHUTDOWN: return NBD_ESHUTDOWN;
	default: return NBD_EIO;
	}
}

/* ---- socket I/O ------------------------------------------------------- */

/* Milliseconds left before the handshake deadline (0 when passed). */
static int deadline_ms(const struct timespec *dl)
{
	struct timespec now;
	int64_t ms;

	clock_gettime(CLOCK_MONOTONIC, &now);
	ms = (int64_t)(dl->tv_sec - now.tv_sec) * 1000 +
	     (dl->tv_nsec - now.tv_nsec) / 1000000;
	return ms < 0 ? 0 : (int)MIN(ms, 1 << 30);
}

int nbd_conn_recv(struct nbd_conn *c, void *buf, size_t len)
{
	char *p = buf;

	while (len) {
		ssize_t n;

		if (c->in_handshake) {
			/* The whole handshake has one deadline, not each read. */
			struct pollfd pfd = { .fd = c->fd, .events = POLLIN };
			int ms = deadline_ms(&c->deadline);
			int r = ms ? poll(&pfd, 1, ms) : 0;

			if (r < 0 && errno == EINTR)
				continue;
			if (r <= 0)
				return -ETIMEDOUT;
		}
		n = recv(c->fd, p, len, 0);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			return -errno;
		if (n == 0)
			return -ECONNRESET;
		p += n;
		len -= n;
	}
	return 0;
}

int nbd_conn_sendv(struct nbd_conn *c, struct iovec *iov, int n)
{
	return nbd_conn_sendv_flags(c, iov, n, 0);
}

int nbd_conn_sendv_flags(struct nbd_conn *c, struct iovec *iov, int n, int flags)
{
	while (n > 0) {
		struct msghdr mh = { .msg_iov = iov, .msg_iovlen = n };
		ssize_t w = sendmsg(c->fd, &mh, MSG_NOSIGNAL | flags);

		if (w < 0 && errno == EINTR)
			continue;
		if (w < 0) {
			c->send_failed = true;
			return -errno;
		}
		while (n > 0 && (size_t)w >= iov->iov_len) {
			w -= iov->iov_len;
			iov++;
			n--;
		}
		if (n > 0) {
			iov->iov_base = (char *)iov->iov_base + w;
			iov->iov_len -= w;
		}
	}
	return 0;
}

int nbd_conn_sendfile(struct nbd_conn *c, int fd, uint64_t pos, uint64_t len)
{
	while (len) {
		off_t o = (off_t)pos;
		ssize_t w = sendfile(c->fd, fd, &o, (size_t)MIN(len, 1u << 30));

		if (w < 0 && errno == EINTR)
			continue;
		if (w <= 0) {
			/* the bytes were promised in the header: the stream is lost */
			c->send_failed = true;
			return w < 0 ? -errno : -EIO;
		}
		pos += (uint64_t)w;
		len -= (uint64_t)w;
	}
	return 0;
}

int nbd_conn_send(struct nbd_conn *c, const void *buf, size_t len)
{
	struct iovec iov = { (void *)buf, len };

	return nbd_conn_sendv(c, &iov, 1);
}

/* ---- server object ---------------------------------------------------- */

static struct nbd_server *server_alloc(const struct nbd_server_opts *opts)
{
	struct nbd_server *s = xcalloc(1, sizeof(*s));

	if (opts)
		s->opts = *opts;
	if (!s->opts.handshake_timeout)
		s->opts.handshake_timeout = 10;
	if (!s->opts.workers)
		s->opts.workers = 8;
	if (pipe2(s->wake, O_CLOEXEC | O_NONBLOCK) < 0) {
		log_err("nbd: pipe: %s", strerror(errno));
		abort();
	}
	pthread_mutex_init(&s->lock, NULL);
	pthread_cond_init(&s->cond, NULL);
	return s;
}

struct nbd_server *nbd_server_new(const struct nbd_export *exports, unsigned n,
				  const struct nbd_server_opts *opts)
{
	struct nbd_server *s = server_alloc(opts);

	s->exports = xcalloc(n, sizeof(*s->exports));
	for (unsigned i = 0; i < n; i++) {
		s->exports[i] = exports[i];
		s->exports[i].name = xstrdup(exports[i].name ? exports[i].name : "");
		s->exports[i].description =
			exports[i].description ? xstrdup(exports[i].description) : NULL;
	}
	s->nexports = n;
	if (s->opts.default_export >= n)
		s->opts.default_export = 0;
	return s;
}

struct nbd_server *nbd_server_new_dynamic(nbd_export_list_fn list, void *opaque,
					  const struct nbd_server_opts *opts)
{
	struct nbd_server *s = server_alloc(opts);

	s->list_fn = list;
	s->list_opaque = opaque;
	return s;
}

void nbd_server_stop(struct nbd_server *s)
{
	int saved = errno;
	ssize_t r;

	__atomic_store_n(&s->stopping, 1, __ATOMIC_SEQ_CST);
	r = write(s->wake[1], "s", 1);
	(void)r;
	errno = saved;
}

static void join_zombies(struct nbd_server *s)
{
	struct nbd_conn *z;

	pthread_mutex_lock(&s->lock);
	z = s->zombies;
	s->zombies = NULL;
	pthread_mutex_unlock(&s->lock);
	while (z) {
		struct nbd_conn *next = z->next;

		pthread_join(z->thread, NULL);
		free(z);
		z = next;
	}
}

/* Make every client's blocked I/O return; they then end by themselves. */
static void shutdown_all(struct nbd_server *s)
{
	pthread_mutex_lock(&s->lock);
	for (struct nbd_conn *c = s->conns; c; c = c->next)
		shutdown(c->fd, SHUT_RDWR);
	pthread_mutex_unlock(&s->lock);
}

static void wait_all(struct nbd_server *s)
{
	pthread_mutex_lock(&s->lock);
	while (s->nconns)
		pthread_cond_wait(&s->cond, &s->lock);
	pthread_mutex_unlock(&s->lock);
	join_zombies(s);
}

void nbd_server_free(struct nbd_server *s)
{
	if (!s)
		return;
	shutdown_all(s);
	wait_all(s);
	for (unsigned i = 0; i < s->nexports; i++) {
		free((char *)s->exports[i].name);
		free((char *)s->exports[i].description);
	}
	free(s->exports);
	close(s->wake[0]);
	close(s->wake[1]);
	pthread_mutex_destroy(&s->lock);
	pthread_cond_destroy(&s->cond);
	free(s);
}

/* ---- connections ------------------------------------------------------ */

static struct nbd_conn *conn_new(struct nbd_server *s, int fd)
{
	struct nbd_conn *c = xcalloc(1, sizeof(*c));
	int one = 1;

	c->srv = s;
	c->fd = fd;
	/* Small replies must not wait for Nagle; harmless on Unix sockets. */
	setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	return c;
}

/* Handshake, then transmission, then close; runs in the connection's thread. */
static void conn_serve(struct nbd_conn *c)
{
	struct nbd_server *s = c->srv;
	struct timeval tv = { .tv_sec = s->opts.handshake_timeout };
	struct timeval none = { 0 };

	clock_gettime(CLOCK_MONOTONIC, &c->deadline);
	c->deadline.tv_sec += s->opts.handshake_timeout;
	c->in_handshake = true;
	/* A client that never reads must not hold a handshake send forever. */
	setsockopt(c->fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
	if (nbd_handshake(c)) {
		c->in_handshake = false;
		setsockopt(c->fd, SOL_SOCKET, SO_SNDTIMEO, &none, sizeof(none));
		log_info("nbd: client on export \"%s\"%s", c->exp->name,
			 c->structured ? " (structured replies)" : "");
		nbd_transmission(c);
		log_info("nbd: client on export \"%s\" left", c->exp->name);
	}
	free(c->meta_export);
	c->meta_export = NULL;
}

static void conn_unlink(struct nbd_server *s, struct nbd_conn *c, bool zombie)
{
	struct nbd_conn **pp;
	ssize_t r;

	pthread_mutex_lock(&s->lock);
	for (pp = &s->conns; *pp; pp = &(*pp)->next) {
		if (*pp == c) {
			*pp = c->next;
			break;
		}
	}
	close(c->fd); /* under the lock: shutdown_all never sees a reused fd */
	c->fd = -1;
	if (zombie) {
		c->next = s->zombies;
		s->zombies = c;
	}
	s->nconns--;
	r = write(s->wake[1], "c", 1);
	(void)r;
	pthread_cond_broadcast(&s->cond);
	pthread_mutex_unlock(&s->lock);
}

static void *conn_thread(void *arg)
{
	struct nbd_conn *c = arg;

	conn_serve(c);
	conn_unlink(c->srv, c, true);
	return NULL;
}

static void conn_register(struct nbd_server *s, struct nbd_conn *c)
{
	pthread_mutex_lock(&s->lock);
	c->next = s->conns;
	s->conns = c;
	s->nconns++;
	s->served++;
	pthread_mutex_unlock(&s->lock);
}

void nbd_server_serve_socket(struct nbd_server *s, int fd)
{
	struct nbd_conn *c = conn_new(s, fd);

	conn_register(s, c);
	conn_serve(c);
	conn_unlink(s, c, false);
	free(c);
}

static unsigned conn_limit(struct nbd_server *s)
{
	unsigned m = s->opts.max_clients;

	return m && m < NBD_SERVER_MAX_CONNS ? m : NBD_SERVER_MAX_CONNS;
}

static void accept_one(struct nbd_server *s, int listen_fd)
{
	struct nbd_conn *c;
	int fd, r;

	fd = accept4(listen_fd, NULL, NULL, SOCK_CLOEXEC);
	if (fd < 0) {
		if (errno != EAGAIN && errno != EINTR && errno != ECONNABORTED)
			log_warn("nbd: accept: %s", strerror(errno));
		if (errno == EMFILE || errno == ENFILE)
			usleep(100000); /* do not spin while out of descriptors */
		return;
	}
	c = conn_new(s, fd);
	conn_register(s, c);
	r = thread_start_unsignalled(&c->thread, conn_thread, c);
	if (r) {
		log_warn("nbd: cannot start a connection thread: %s", strerror(r));
		conn_unlink(s, c, false);
		free(c);
	}
}

int nbd_server_run(struct nbd_server *s, int listen_fd)
{
	int ret = 0;
	int fl = fcntl(listen_fd, F_GETFL);

	/* A client that leaves between poll and accept must not block us. */
	if (fl >= 0)
		fcntl(listen_fd, F_SETFL, fl | O_NONBLOCK);
	for (;;) {
		struct pollfd pfd[2] = {
			{ .fd = s->wake[0], .events = POLLIN },
			{ .fd = listen_fd, .events = POLLIN },
		};
		unsigned nconns;
		char drain[64];
		int r;

		join_zombies(s);
		pthread_mutex_lock(&s->lock);
		nconns = s->nconns;
		if (!s->opts.persistent && s->served && !nconns) {
			pthread_mutex_unlock(&s->lock);
			break; /* qemu-nbd without -t: the last client has left */
		}
		pthread_mutex_unlock(&s->lock);
		if (__atomic_load_n(&s->stopping, __ATOMIC_SEQ_CST))
			break;
		/* At the limit, new clients wait in the listen backlog. */
		r = poll(pfd, nconns < conn_limit(s) ? 2 : 1, -1);
		if (r < 0 && errno != EINTR) {
			ret = -errno;
			log_err("nbd: poll: %s", strerror(errno));
			break;
		}
		if (r <= 0)
			continue;
		if (pfd[0].revents)
			while (read(s->wake[0], drain, sizeof(drain)) > 0)
				;
		if (__atomic_load_n(&s->stopping, __ATOMIC_SEQ_CST))
			break;
		if (pfd[1].revents & (POLLERR | POLLNVAL)) {
			ret = -EBADF;
			log_err("nbd: the listening socket failed");
			break;
		}
		if (pfd[1].revents & POLLIN)
			accept_one(s, listen_fd);
	}
	shutdown_all(s);
	wait_all(s);
	return ret;
}
