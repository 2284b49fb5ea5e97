/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The mount-daemon bridge (see control.h for the protocol).  Daemon side:
 * one accept thread, and per imgfs-nbd a session thread that runs an NBD
 * server over the passed socket, plus a watcher that stops it when the
 * control connection closes.  Only a peer with the daemon's uid (or root)
 * is served, and the request is bounded (one SEQPACKET message).
 */
#include "control.h"
#include "image.h"
#include "nbd-server.h"
#include "thread.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#define CONTROL_MAGIC   "IMGFS-NBD 1"
#define CONTROL_MSG_MAX 16384
#define CONTROL_STR_MAX 4097 /* NBD_MAX_STRING + NUL */

struct session {
	struct session *next;
	struct nbd_control *ctl;
	int fd;             /* control connection */
	pthread_t thread;
	bool done;
};

struct nbd_control {
	struct image *img;
	char *path;
	int listen_fd;
	int wake[2];
	pthread_t thread;
	pthread_mutex_t lock;
	struct session *sessions;
};

/* ---- the request: key=value lines --------------------------------------- */

struct parsed {
	char view[CONTROL_STR_MAX];
	char snapshot[CONTROL_STR_MAX];
	char export_name[CONTROL_STR_MAX];
	char description[CONTROL_STR_MAX];
	bool has_export, has_desc, has_snapshot;
	int partition;
	bool read_only, persistent, allocation_depth;
	unsigned shared;
	unsigned handshake_limit;
};

static int parse_request(char *msg, struct parsed *p, struct err *e)
{
	char *save = NULL, *line;
	bool magic = false;

	memset(p, 0, sizeof(*p));
	p->partition = -1;
	p->shared = 1;
	strcpy(p->view, "*");
	for (line = strtok_r(msg, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
		char *v = strchr(line, '=');

		if (!magic) {
			if (strcmp(line, CONTROL_MAGIC) != 0)
				return err_set(e, -EPROTO, "not an imgfs-nbd request");
			magic = true;
			continue;
		}
		if (!v)
			return err_set(e, -EPROTO, "bad request line \"%.40s\"", line);
		*v++ = 0;
		if (strlen(v) >= CONTROL_STR_MAX)
			return err_set(e, -ENAMETOOLONG, "%s is too long", line);
		if (!strcmp(line, "view"))
			strcpy(p->view, v);
		else if (!strcmp(line, "snapshot"))
			strcpy(p->snapshot, v), p->has_snapshot = true;
		else if (!strcmp(line, "export"))
			strcpy(p->export_name, v), p->has_export = true;
		else if (!strcmp(line, "description"))
			strcpy(p->description, v), p->has_desc = true;
		else if (!strcmp(line, "partition"))
			p->partition = atoi(v);
		else if (!strcmp(line, "read-only"))
			p->read_only = atoi(v);
		else if (!strcmp(line, "persistent"))
			p->persistent = atoi(v);
		else if (!strcmp(line, "allocation-depth"))
			p->allocation_depth = atoi(v);
		else if (!strcmp(line, "handshake-limit"))
			p->handshake_limit = (unsigned)strtoul(v, NULL, 10);
		else if (!strcmp(line, "shared"))
			p->shared = (unsigned)strtoul(v, NULL, 10);
		/* unknown keys: ignored, for later additions */
	}
	return magic ? 0 : err_set(e, -EPROTO, "empty request");
}

/* ---- daemon side -------------------------------------------------------- */

/* "ok", or "error MESSAGE" when msg is set. */
static void session_reply(int fd, const char *msg)
{
	char buf[600];
	int n = msg ? snprintf(buf, sizeof(buf), "error %s\n", msg)
		    : snprintf(buf, sizeof(buf), "ok\n");

	send(fd, buf, MIN((size_t)n, sizeof(buf) - 1), MSG_NOSIGNAL);
}

struct watch { int fd; struct nbd_server *srv; };

/* EOF (or a shutdown) on the control connection stops the NBD server. */
static void *watcher(void *arg)
{
	struct watch *w = arg;
	struct pollfd pfd = { .fd = w->fd, .events = POLLIN };
	char buf[64];

	for (;;) {
		ssize_t n;

		if (poll(&pfd, 1, -1) < 0 && errno == EINTR)
			continue;
		n = recv(w->fd, buf, sizeof(buf), MSG_DONTWAIT);
		if (n > 0)
			continue; /* nothing more is expected; ignore */
		if (n < 0 && (errno == EAGAIN || errno == EINTR))
			continue;
		break; /* EOF or error */
	}
	nbd_server_stop(w->srv);
	return NULL;
}

/* Every view of the mount, as it is at each lookup (tables get re-read). */
struct all_views {
	struct image *img;
	bool read_only;
};

static unsigned list_all_views(void *opaque, struct nbd_export **out, unsigned *dflt)
{
	struct all_views *a = opaque;
	struct view **views = NULL;
	unsigned nv = image_list_views(a->img, &views, NULL);
	struct nbd_export *x = xcalloc(nv, sizeof(*x));

	*dflt = 0;
	for (unsigned i = 0; i < nv; i++) {
		/* view names and devices live until image_close (views are retired, not freed) */
		if (!strcmp(views[i]->name, "disk"))
			*dflt = i;
		x[i].name = views[i]->name;
		x[i].description = views[i]->name;
		x[i].dev = views[i]->dev;
		x[i].read_only = a->read_only || !views[i]->writable;
	}
	free(views);
	*out = x;
	return nv;
}

/* The server the request asks for: every view, or one. */
static struct nbd_server *make_server(struct nbd_control *ctl, const struct parsed *p,
				      struct all_views *all, struct err *e)
{
	struct nbd_server_opts o = {
		.max_clients = p->shared, .persistent = p->persistent,
		.allocation_depth = p->allocation_depth,
		.handshake_timeout = MIN(p->handshake_limit, 3600u),
	};
	struct nbd_export x;
	struct view *v;

	if (!strcmp(p->view, "*") && p->partition < 0 && !p->has_snapshot) {
		*all = (struct all_views){ ctl->img, p->read_only };
		return nbd_server_new_dynamic(list_all_views, all, &o);
	}
	v = image_pick_view(ctl->img, strcmp(p->view, "*") ? p->view : NULL,
			    p->partition, p->has_snapshot ? p->snapshot : NULL, e);
	if (!v)
		return NULL;
	x.name = p->has_export ? p->export_name : v->name;
	x.description = p->has_desc ? p->description : v->name;
	x.dev = v->dev;
	x.read_only = p->read_only || !v->writable;
	return nbd_server_new(&x, 1, &o);
}

static void session_serve(struct session *s, int nbd_fd, char *msg)
{
	struct all_views all;
	struct err e = { 0 };
	struct parsed p;
	struct watch w;
	pthread_t wt;
	int acc = 0;
	socklen_t sl = sizeof(acc);

	if (getsockopt(nbd_fd, SOL_SOCKET, SO_ACCEPTCONN, &acc, &sl) < 0 || !acc) {
		session_reply(s->fd, "the passed socket is not listening");
		return;
	}
	if (parse_request(msg, &p, &e) < 0 ||
	    !(w.srv = make_server(s->ctl, &p, &all, &e))) {
		session_reply(s->fd, e.msg);
		return;
	}
	w.fd = s->fd;
	if (pthread_create(&wt, NULL, watcher, &w)) {
		session_reply(s->fd, "cannot start a thread");
		nbd_server_free(w.srv);
		return;
	}
	session_reply(s->fd, NULL);
	log_info("nbd: serving %s for imgfs-nbd", p.view);
	nbd_server_run(w.srv, nbd_fd);
	/*
	 * Not persistent and the last client left, or stopped (unmount): tell
	 * imgfs-nbd it was a clean end, unlike a daemon that died.
	 */
	send(s->fd, "done\n", 5, MSG_NOSIGNAL);
	shutdown(s->fd, SHUT_RDWR);
	pthread_join(wt, NULL);
	nbd_server_free(w.srv);
}

static void *session_thread(void *arg)
{
	struct session *s = arg;
	char *msg = xmalloc(CONTROL_MSG_MAX + 1);
	char cbuf[CMSG_SPACE(sizeof(int))];
	struct iovec iov = { msg, CONTROL_MSG_MAX };
	struct msghdr mh = {
		.msg_iov = &iov, .msg_iovlen = 1,
		.msg_control = cbuf, .msg_controllen = sizeof(cbuf),
	};
	struct pollfd pfd = { .fd = s->fd, .events = POLLIN };
	struct cmsghdr *cm;
	int nbd_fd = -1;
	ssize_t n = -1;

	/* A peer that connects and says nothing is dropped after 10 s. */
	if (poll(&pfd, 1, 10000) == 1)
		n = recvmsg(s->fd, &mh, MSG_CMSG_CLOEXEC);
	for (cm = n > 0 ? CMSG_FIRSTHDR(&mh) : NULL; cm; cm = CMSG_NXTHDR(&mh, cm)) {
		if (cm->cmsg_level == SOL_SOCKET && cm->cmsg_type == SCM_RIGHTS) {
			size_t nfd = (cm->cmsg_len - CMSG_LEN(0)) / sizeof(int);
			int fds[4] = { -1, -1, -1, -1 };

			memcpy(fds, CMSG_DATA(cm), MIN(nfd, 4u) * sizeof(int));
			for (size_t i = 0; i < MIN(nfd, 4u); i++) {
				if (nbd_fd < 0)
					nbd_fd = fds[i];
				else
					close(fds[i]);
			}
		}
	}
	if (n > 0 && nbd_fd >= 0 && !(mh.msg_flags & (MSG_TRUNC | MSG_CTRUNC))) {
		msg[n] = 0;
		session_serve(s, nbd_fd, msg);
	} else if (n > 0) {
		session_reply(s->fd, "malformed request (no socket attached)");
	}
	if (nbd_fd >= 0)
		close(nbd_fd);
	free(msg);
	pthread_mutex_lock(&s->ctl->lock);
	s->done = true;
	pthread_mutex_unlock(&s->ctl->lock);
	return NULL;
}

static bool peer_allowed(int fd)
{
	struct ucred cr;
	socklen_t len = sizeof(cr);

	if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cr, &len) < 0)
		return false;
	return cr.uid == getuid() || cr.uid == 0;
}

/* Join sessions that have ended (all of them if all). */
static void reap(struct nbd_control *ctl, bool all)
{
	pthread_mutex_lock(&ctl->lock);
	for (struct session **pp = &ctl->sessions; *pp;) {
		struct session *s = *pp;

		if (all && !s->done)
			/*
			 * The watcher sees EOF and stops the server; the write
			 * side stays open so the session can still say "done".
			 */
			shutdown(s->fd, SHUT_RD);
		if (!s->done && !all) {
			pp = &s->next;
			continue;
		}
		*pp = s->next;
		pthread_mutex_unlock(&ctl->lock);
		pthread_join(s->thread, NULL);
		close(s->fd);
		free(s);
		pthread_mutex_lock(&ctl->lock);
	}
	pthread_mutex_unlock(&ctl->lock);
}

static void *accept_thread(void *arg)
{
	struct nbd_control *ctl = arg;

	for (;;) {
		struct pollfd pfd[2] = {
			{ .fd = ctl->wake[0], .events = POLLIN },
			{ .fd = ctl->listen_fd, .events = POLLIN },
		};
		struct session *s;
		int fd;

		if (poll(pfd, 2, 1000) < 0 && errno != EINTR)
			break;
		if (pfd[0].revents)
			break;
		reap(ctl, false);
		if (!(pfd[1].revents & POLLIN))
			continue;
		fd = accept4(ctl->listen_fd, NULL, NULL, SOCK_CLOEXEC | SOCK_NONBLOCK);
		if (fd < 0)
			continue;
		fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) & ~O_NONBLOCK);
		if (!peer_allowed(fd)) {
			log_warn("nbd: control connection from another user refused");
			close(fd);
			continue;
		}
		s = xcalloc(1, sizeof(*s));
		s->ctl = ctl;
		s->fd = fd;
		pthread_mutex_lock(&ctl->lock);
		if (pthread_create(&s->thread, NULL, session_thread, s)) {
			pthread_mutex_unlock(&ctl->lock);
			close(fd);
			free(s);
			continue;
		}
		s->next = ctl->sessions;
		ctl->sessions = s;
		pthread_mutex_unlock(&ctl->lock);
	}
	return NULL;
}

/* Bind sock_path, replacing a socket nobody listens on any more. */
static int bind_control(const char *path, struct err *e)
{
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	int fd;

	if (strlen(path) >= sizeof(sa.sun_path))
		return err_set(e, -ENAMETOOLONG, "control socket path %s is too long", path);
	strcpy(sa.sun_path, path);
	fd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
	if (fd < 0)
		return err_set(e, -errno, "socket: %s", strerror(errno));
	if (bind(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
		struct stat st;
		int probe;
		bool alive;

		if (errno != EADDRINUSE)
			goto fail;
		probe = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
		alive = probe >= 0 && connect(probe, (struct sockaddr *)&sa, sizeof(sa)) == 0;
		if (probe >= 0)
			close(probe);
		if (alive || lstat(path, &st) < 0 || !S_ISSOCK(st.st_mode)) {
			close(fd);
			return err_set(e, -EADDRINUSE, "control socket %s is in use", path);
		}
		unlink(path); /* left behind by a daemon that died */
		if (bind(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0)
			goto fail;
	}
	chmod(path, 0600);
	if (listen(fd, 16) < 0)
		goto fail;
	return fd;
fail:
	err_set(e, -errno, "control socket %s: %s", path, strerror(errno));
	close(fd);
	return -1;
}

struct nbd_control *nbd_control_start(struct image *img, const char *sock_path,
				      struct err *e)
{
	struct nbd_control *ctl;
	int fd, r;

	fd = bind_control(sock_path, e);
	if (fd < 0)
		return NULL;
	ctl = xcalloc(1, sizeof(*ctl));
	ctl->img = img;
	ctl->path = xstrdup(sock_path);
	ctl->listen_fd = fd;
	pthread_mutex_init(&ctl->lock, NULL);
	if (pipe2(ctl->wake, O_CLOEXEC) < 0) {
		err_set(e, -errno, "pipe: %s", strerror(errno));
		goto fail;
	}
	r = thread_start_unsignalled(&ctl->thread, accept_thread, ctl);
	if (r) {
		err_set(e, -r, "cannot start the NBD control thread");
		close(ctl->wake[0]);
		close(ctl->wake[1]);
		goto fail;
	}
	return ctl;
fail:
	close(fd);
	unlink(sock_path);
	free(ctl->path);
	free(ctl);
	return NULL;
}

void nbd_control_stop(struct nbd_control *ctl)
{
	ssize_t r;

	if (!ctl)
		return;
	r = write(ctl->wake[1], "s", 1);
	(void)r;
	pthread_join(ctl->thread, NULL);
	close(ctl->listen_fd);
	unlink(ctl->path);
	reap(ctl, true);
	close(ctl->wake[0]);
	close(ctl->wake[1]);
	pthread_mutex_destroy(&ctl->lock);
	free(ctl->path);
	free(ctl);
}

/* ---- imgfs-nbd side ----------------------------------------------------- */

static bool add_line(char *buf, size_t *len, const char *key, const char *val,
		     struct err *e)
{
	int n;

	if (strchr(val, '\n'))
		return err_set(e, -EINVAL, "%s \"%s\" holds a newline", key, val), false;
	n = snprintf(buf + *len, CONTROL_MSG_MAX - *len, "%s=%s\n", key, val);
	if (n < 0 || (size_t)n >= CONTROL_MSG_MAX - *len)
		return err_set(e, -ENAMETOOLONG, "%s is too long", key), false;
	*len += n;
	return true;
}

int nbd_control_request(const char *sock_path, int listen_fd,
			const struct nbd_control_request *rq, struct err *e)
{
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	char *msg = xmalloc(CONTROL_MSG_MAX);
	char cbuf[CMSG_SPACE(sizeof(int))] = { 0 };
	char num[32], ans[600];
	size_t len = 0;
	struct iovec iov;
	struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1 };
	struct cmsghdr *cm;
	ssize_t n;
	int fd = -1;
	bool ok;

	len = (size_t)snprintf(msg, CONTROL_MSG_MAX, "%s\n", CONTROL_MAGIC);
	ok = add_line(msg, &len, "view", rq->view ? rq->view : "*", e);
	snprintf(num, sizeof(num), "%d", rq->partition);
	ok = ok && add_line(msg, &len, "partition", num, e);
	if (rq->snapshot)
		ok = ok && add_line(msg, &len, "snapshot", rq->snapshot, e);
	if (rq->export_name)
		ok = ok && add_line(msg, &len, "export", rq->export_name, e);
	if (rq->description)
		ok = ok && add_line(msg, &len, "description", rq->description, e);
	ok = ok && add_line(msg, &len, "read-only", rq->read_only ? "1" : "0", e);
	ok = ok && add_line(msg, &len, "persistent", rq->persistent ? "1" : "0", e);
	ok = ok && add_line(msg, &len, "allocation-depth",
			    rq->allocation_depth ? "1" : "0", e);
	snprintf(num, sizeof(num), "%u", rq->shared);
	ok = ok && add_line(msg, &len, "shared", num, e);
	snprintf(num, sizeof(num), "%u", rq->handshake_limit);
	ok = ok && add_line(msg, &len, "handshake-limit", num, e);
	if (!ok)
		goto out;
	if (strlen(sock_path) >= sizeof(sa.sun_path)) {
		err_set(e, -ENAMETOOLONG, "control socket path %s is too long", sock_path);
		goto out;
	}
	strcpy(sa.sun_path, sock_path);
	fd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
	if (fd < 0 || connect(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
		err_set(e, -errno, "cannot reach the imgfs daemon at %s: %s",
			sock_path, strerror(errno));
		goto fail;
	}
	iov = (struct iovec){ msg, len };
	mh.msg_control = cbuf;
	mh.msg_controllen = sizeof(cbuf);
	cm = CMSG_FIRSTHDR(&mh);
	cm->cmsg_level = SOL_SOCKET;
	cm->cmsg_type = SCM_RIGHTS;
	cm->cmsg_len = CMSG_LEN(sizeof(int));
	memcpy(CMSG_DATA(cm), &listen_fd, sizeof(int));
	if (sendmsg(fd, &mh, MSG_NOSIGNAL) < 0) {
		err_set(e, -errno, "sending to the imgfs daemon at %s: %s",
			sock_path, strerror(errno));
		goto fail;
	}
	do
		n = recv(fd, ans, sizeof(ans) - 1, 0);
	while (n < 0 && errno == EINTR);
	if (n <= 0) {
		err_set(e, -EPROTO, "the imgfs daemon at %s closed the connection", sock_path);
		goto fail;
	}
	ans[n] = 0;
	ans[strcspn(ans, "\n")] = 0;
	if (strcmp(ans, "ok") != 0) {
		err_set(e, -EINVAL, "%s", strncmp(ans, "error ", 6) ? ans : ans + 6);
		goto fail;
	}
	free(msg);
	return fd;
fail:
	if (fd >= 0)
		close(fd);
	fd = -1;
out:
	free(msg);
	return -1;
}
