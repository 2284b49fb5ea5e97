/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * imgfs-nbd: export an image, one view of a mounted image, or every view
 * of a mount directory over NBD.  Options follow qemu-nbd's.
 *
 * For a path inside an imgfs mount (it carries the user.imgfs.control
 * xattr) nothing opens the image a second time: the listening socket is
 * handed to the mount's daemon (nbd/control.c), which serves it from its
 * own engine for as long as this process lives.
 */
#include "config.h"

#include "control.h"
#include "daemon.h"
#include "formats.h"
#include "image.h"
#include "nbd-proto.h"
#include "nbd-server.h"
#include "util.h"

#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <limits.h>
#include <netdb.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <sys/xattr.h>
#include <unistd.h>

#define LISTEN_FDS_START 3 /* sd_listen_fds(3) */

struct cli {
	const char *path;
	const char *port, *bind, *socket, *export_name, *description;
	const char *format, *snapshot, *pid_file, *view;
	uint64_t offset;
	int partition;
	int fd;                /* --fd, or -1 */
	unsigned shared;
	unsigned handshake_limit;
	bool persistent, read_only, do_fork, allocation_depth;
	int verbose;
};

static volatile sig_atomic_t got_signal;
static struct nbd_server *volatile the_server;
static int sig_pipe[2] = { -1, -1 };

static void on_signal(int sig)
{
	ssize_t r;

	got_signal = sig;
	if (the_server)
		nbd_server_stop(the_server);
	if (sig_pipe[1] >= 0) {
		r = write(sig_pipe[1], "s", 1);
		(void)r;
	}
}

static void usage(FILE *f)
{
	fprintf(f,
"Usage: imgfs-nbd [OPTIONS] PATH\n"
"Export PATH over NBD.  PATH is an image file (qcow2 or raw), a view file\n"
"inside an imgfs mount (mnt/p1), or an imgfs mount directory (every view\n"
"is an export, named by view; the default export is \"disk\").\n"
"\n"
"  -p, --port=PORT          TCP port (default %d)\n"
"  -b, --bind=ADDR          address to listen on (default 127.0.0.1)\n"
"  -k, --socket=PATH        listen on a Unix socket instead of TCP\n"
"      --fd=N               serve the already listening socket N\n"
"                           (systemd socket activation, LISTEN_FDS, works too)\n"
"  -e, --shared=N           clients served at once (default 1, 0 = no limit)\n"
"  -t, --persistent         keep serving after the last client leaves\n"
"  -x, --export-name=NAME   export name (default \"\", or the view's name)\n"
"  -D, --description=TEXT   export description\n"
"  -r, --read-only          export read-only\n"
"  -A, --allocation-depth   offer the qemu:allocation-depth meta context\n"
"  -f, --format=FMT         raw or qcow2 (default: probe)\n"
"  -o, --offset=OFFSET      export from OFFSET bytes into the view\n"
"  -P, --partition=N        export partition N\n"
"  -l, --load-snapshot=NAME export internal snapshot NAME (read-only)\n"
"      --view=NAME          export the view NAME (disk, pN, snap@NAME)\n"
"      --handshake-limit=S  drop clients that have not finished the handshake\n"
"                           after S seconds (default 10)\n"
"      --fork               go to the background once the socket is ready\n"
"      --pid-file=PATH      write the serving process's pid to PATH\n"
"  -v, --verbose            log more (twice: debug)\n"
"  -h, --help               this help\n"
"  -V, --version            the version\n",
		NBD_DEFAULT_PORT);
}

static bool parse_u64(const char *s, uint64_t *out)
{
	char *end;
	unsigned long long v;

	errno = 0;
	v = strtoull(s, &end, 0);
	if (errno || end == s || *end || *s == '-')
		return false;
	*out = v;
	return true;
}

/*
 * The number an option was given (arg of name, "--shared") if it is from
 * min to max; otherwise one line naming the option, the value and what was
 * expected.
 */
static bool parse_option_number(const char *name, const char *arg, uint64_t min,
				uint64_t max, const char *expected, uint64_t *out)
{
	if (parse_u64(arg, out) && *out >= min && *out <= max)
		return true;
	fprintf(stderr, "imgfs-nbd: %s=%s: expected %s\n", name, arg, expected);
	return false;
}

#define STR(x) STR_(x)
#define STR_(x) #x

static int parse_args(int argc, char **argv, struct cli *c)
{
	enum { OPT_FORK = 256, OPT_PID_FILE, OPT_FD, OPT_VIEW, OPT_HANDSHAKE };
	static const struct option longopts[] = {
		{ "port", required_argument, NULL, 'p' },
		{ "bind", required_argument, NULL, 'b' },
		{ "socket", required_argument, NULL, 'k' },
		{ "shared", required_argument, NULL, 'e' },
		{ "persistent", no_argument, NULL, 't' },
		{ "export-name", required_argument, NULL, 'x' },
		{ "description", required_argument, NULL, 'D' },
		{ "read-only", no_argument, NULL, 'r' },
		{ "allocation-depth", no_argument, NULL, 'A' },
		{ "format", required_argument, NULL, 'f' },
		{ "offset", required_argument, NULL, 'o' },
		{ "partition", required_argument, NULL, 'P' },
		{ "load-snapshot", required_argument, NULL, 'l' },
		{ "view", required_argument, NULL, OPT_VIEW },
		{ "fork", no_argument, NULL, OPT_FORK },
		{ "pid-file", required_argument, NULL, OPT_PID_FILE },
		{ "fd", required_argument, NULL, OPT_FD },
		{ "handshake-limit", required_argument, NULL, OPT_HANDSHAKE },
		{ "verbose", no_argument, NULL, 'v' },
		{ "help", no_argument, NULL, 'h' },
		{ "version", no_argument, NULL, 'V' },
		{ 0 }
	};
	uint64_t v;
	int opt;

	memset(c, 0, sizeof(*c));
	c->partition = -1;
	c->fd = -1;
	c->shared = 1;
	while ((opt = getopt_long(argc, argv, "p:b:k:e:tx:D:rAf:o:P:l:vhV", longopts, NULL)) != -1) {
		switch (opt) {
		case 'p': c->port = optarg; break;
		case 'b': c->bind = optarg; break;
		case 'k': c->socket = optarg; break;
		case 'e':
			if (!parse_option_number("--shared", optarg, 0, NBD_SERVER_MAX_CONNS,
						 "0 to " STR(NBD_SERVER_MAX_CONNS), &v))
				return 2;
			c->shared = v;
			break;
		case 't': c->persistent = true; break;
		case 'x': c->export_name = optarg; break;
		case 'D': c->description = optarg; break;
		case 'r': c->read_only = true; break;
		case 'A': c->allocation_depth = true; break;
		case 'f':
			if (strcmp(optarg, "raw") && strcmp(optarg, "qcow2")) {
				fprintf(stderr, "imgfs-nbd: --format=%s: expected raw or qcow2\n", optarg);
				return 2;
			}
			c->format = optarg;
			break;
		case 'o':
			if (!parse_option_number("--offset", optarg, 0, UINT64_MAX,
						 "a byte count", &c->offset))
				return 2;
			break;
		case 'P':
			if (!parse_option_number("--partition", optarg, 1, INT_MAX,
						 "a number from 1", &v))
				return 2;
			c->partition = (int)v;
			break;
		case 'l': c->snapshot = optarg; c->read_only = true; break;
		case OPT_VIEW: c->view = optarg; break;
		case OPT_FORK: c->do_fork = true; break;
		case OPT_PID_FILE: c->pid_file = optarg; break;
		case OPT_FD:
			if (!parse_option_number("--fd", optarg, 0, INT_MAX,
						 "a descriptor number", &v))
				return 2;
			c->fd = (int)v;
			break;
		case OPT_HANDSHAKE:
			if (!parse_option_number("--handshake-limit", optarg, 1, 3600,
						 "1 to 3600 seconds", &v))
				return 2;
			c->handshake_limit = v;
			break;
		case 'v': c->verbose++; break;
		case 'h': usage(stdout); exit(0);
		case 'V': printf("imgfs-nbd %s\n", PACKAGE_VERSION); exit(0);
		default: usage(stderr); return 2;
		}
	}
	if (optind + 1 != argc) {
		fprintf(stderr, "imgfs-nbd: expected one PATH (try --help)\n");
		return 2;
	}
	c->path = argv[optind];
	if ((c->partition > 0) + !!c->snapshot + !!c->view > 1) {
		fprintf(stderr, "imgfs-nbd: -P, -l and --view pick a view: give one\n");
		return 2;
	}
	if ((c->socket || c->fd >= 0) && (c->port || c->bind)) {
		fprintf(stderr, "imgfs-nbd: -p/-b are for TCP: not with -k or --fd\n");
		return 2;
	}
	if (c->socket && c->fd >= 0) {
		fprintf(stderr, "imgfs-nbd: give -k or --fd, not both\n");
		return 2;
	}
	return 0;
}

/* ---- the listening socket ----------------------------------------------- */

/* systemd socket activation: LISTEN_PID is us and LISTEN_FDS >= 1. */
static int socket_activation(void)
{
	const char *pid = getenv("LISTEN_PID"), *fds = getenv("LISTEN_FDS");
	uint64_t p, n;

	if (!pid || !fds || !parse_u64(pid, &p) || !parse_u64(fds, &n))
		return -1;
	if (p != (uint64_t)getpid() || n < 1)
		return -1;
	if (n > 1)
		fprintf(stderr, "imgfs-nbd: LISTEN_FDS=%s: serving only the first socket\n", fds);
	unsetenv("LISTEN_PID");
	unsetenv("LISTEN_FDS");
	unsetenv("LISTEN_FDNAMES");
	fcntl(LISTEN_FDS_START, F_SETFD, FD_CLOEXEC);
	return LISTEN_FDS_START;
}

static int listen_unix(const char *path)
{
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	struct stat st;
	int fd;

	if (strlen(path) >= sizeof(sa.sun_path)) {
		fprintf(stderr, "imgfs-nbd: socket path %s is too long\n", path);
		return -1;
	}
	strcpy(sa.sun_path, path);
	/* Like qemu-nbd: a socket left at the path is replaced; anything else is not. */
	if (lstat(path, &st) == 0 && S_ISSOCK(st.st_mode))
		unlink(path);
	fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0 || bind(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0 ||
	    listen(fd, 128) < 0) {
		fprintf(stderr, "imgfs-nbd: cannot listen on %s: %s\n", path, strerror(errno));
		if (fd >= 0)
			close(fd);
		return -1;
	}
	return fd;
}

static int listen_tcp(const char *host, const char *port)
{
	struct addrinfo hints = {
		.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM,
		.ai_flags = AI_PASSIVE | AI_NUMERICSERV,
	}, *res, *ai;
	int fd = -1, one = 1, r, saved = 0;

	r = getaddrinfo(host, port, &hints, &res);
	if (r) {
		fprintf(stderr, "imgfs-nbd: %s port %s: %s\n", host, port, gai_strerror(r));
		return -1;
	}
	for (ai = res; ai; ai = ai->ai_next) {
		fd = socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC, ai->ai_protocol);
		if (fd < 0)
			continue;
		setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
		if (bind(fd, ai->ai_addr, ai->ai_addrlen) == 0 && listen(fd, 128) == 0)
			break;
		saved = errno;
		close(fd);
		fd = -1;
	}
	freeaddrinfo(res);
	if (fd < 0)
		fprintf(stderr, "imgfs-nbd: cannot listen on %s port %s: %s\n",
			host, port, strerror(saved ? saved : EADDRNOTAVAIL));
	return fd;
}

static int make_listener(struct cli *c, int activated)
{
	int acc = 0;
	socklen_t sl = sizeof(acc);

	if (activated >= 0 || c->fd >= 0) {
		int fd = activated >= 0 ? activated : c->fd;

		if (getsockopt(fd, SOL_SOCKET, SO_ACCEPTCONN, &acc, &sl) < 0 || !acc) {
			fprintf(stderr, "imgfs-nbd: descriptor %d is not a listening socket\n", fd);
			return -1;
		}
		return fd;
	}
	if (c->socket)
		return listen_unix(c->socket);
	return listen_tcp(c->bind ? c->bind : "127.0.0.1",
			  c->port ? c->port : NBD_DEFAULT_PORT_STR);
}

/* ---- --fork: the parent waits until the child is serving ---------------- */

static int ready_fd = -1;
static bool wrote_pid_file;

static int do_fork(void)
{
	int p[2];
	pid_t pid;
	char status = 1;

	if (pipe2(p, O_CLOEXEC) < 0)
		return -1;
	pid = fork();
	if (pid < 0)
		return -1;
	if (pid > 0) {
		close(p[1]);
		if (read(p[0], &status, 1) != 1)
			status = 1; /* the child died before it was ready */
		_exit(status);
	}
	close(p[0]);
	ready_fd = p[1];
	setsid();
	return 0;
}

/* Serving: tell a waiting parent, write the pid file, leave the terminal. */
static void ready(struct cli *c)
{
	if (c->pid_file) {
		int r = daemon_write_pid_file(c->pid_file);

		if (r < 0)
			log_warn("cannot write pid file %s: %s", c->pid_file, strerror(-r));
		else
			wrote_pid_file = true;
	}
	if (ready_fd >= 0) {
		char ok = 0;
		ssize_t r = write(ready_fd, &ok, 1);

		(void)r;
		close(ready_fd);
		ready_fd = -1;
		daemon_detach_stdio();
		log_use_syslog("imgfs-nbd");
	}
}

/* ---- the two ways to serve ---------------------------------------------- */

static int serve_bridge(struct cli *c, const char *ctl_path, int lfd, bool is_dir)
{
	struct nbd_control_request rq = {
		.partition = c->partition, .snapshot = c->snapshot,
		.export_name = c->export_name, .description = c->description,
		.read_only = c->read_only, .persistent = c->persistent,
		.allocation_depth = c->allocation_depth, .shared = c->shared,
		.handshake_limit = c->handshake_limit,
	};
	char view[4200];
	struct err e = { 0 };
	struct pollfd pfd[2];
	bool done = false;
	int cfd;

	if (c->format || c->offset) {
		fprintf(stderr, "imgfs-nbd: %s is in an imgfs mount: -f and -o do not apply\n",
			c->path);
		return 1;
	}
	if (is_dir) {
		rq.view = c->view ? c->view : "*";
	} else {
		ssize_t n = getxattr(c->path, NBD_VIEW_XATTR, view, sizeof(view) - 1);

		if (n <= 0) {
			fprintf(stderr, "imgfs-nbd: %s: no %s attribute: not an imgfs view\n",
				c->path, NBD_VIEW_XATTR);
			return 1;
		}
		view[n] = 0;
		if (c->partition > 0 || c->snapshot || c->view) {
			fprintf(stderr, "imgfs-nbd: %s is already one view (%s):"
				" -P, -l and --view apply to a mount directory\n", c->path, view);
			return 1;
		}
		rq.view = view;
	}
	cfd = nbd_control_request(ctl_path, lfd, &rq, &e);
	if (cfd < 0) {
		fprintf(stderr, "imgfs-nbd: %s: %s\n", c->path, e.msg);
		return 1;
	}
	close(lfd); /* the daemon has its own copy */
	log_info("the imgfs daemon serves %s", c->path);
	ready(c);
	/* Live until a signal, or until the daemon is done ("done", then EOF). */
	pfd[0] = (struct pollfd){ .fd = cfd, .events = POLLIN };
	pfd[1] = (struct pollfd){ .fd = sig_pipe[0], .events = POLLIN };
	while (!got_signal) {
		char buf[64];
		ssize_t n;

		if (poll(pfd, 2, -1) < 0 || !pfd[0].revents)
			continue;
		n = recv(cfd, buf, sizeof(buf), MSG_DONTWAIT);
		if (n > 0) {
			done |= n >= 4 && !memcmp(buf, "done", 4);
			continue;
		}
		if (n < 0 && (errno == EAGAIN || errno == EINTR))
			continue;
		break;
	}
	close(cfd);
	if (!got_signal && !done) {
		log_err("the imgfs daemon serving %s went away", c->path);
		return 1;
	}
	return 0;
}

static int serve_image(struct cli *c, int lfd)
{
	struct image_opts io = { .format = c->format, .read_only = c->read_only };
	struct nbd_server_opts so = {
		.max_clients = c->shared, .persistent = c->persistent,
		.allocation_depth = c->allocation_depth,
		.handshake_timeout = c->handshake_limit,
	};
	struct nbd_export x = { 0 };
	struct bdev *win = NULL;
	struct image *img;
	struct view *v;
	struct err e = { 0 };
	int r;

	if (image_open(c->path, &io, &img, &e) < 0) {
		fprintf(stderr, "imgfs-nbd: %s\n", e.msg);
		return 1;
	}
	v = image_pick_view(img, c->view, c->partition, c->snapshot, &e);
	if (!v) {
		fprintf(stderr, "imgfs-nbd: %s\n", e.msg);
		image_close(img);
		return 1;
	}
	x.dev = v->dev;
	x.read_only = c->read_only || !v->writable;
	if (c->offset) {
		if (c->offset > v->length) {
			fprintf(stderr, "imgfs-nbd: --offset=%llu is past the end of %s (%llu bytes)\n",
				(unsigned long long)c->offset, v->name,
				(unsigned long long)v->length);
			image_close(img);
			return 1;
		}
		win = window_new(v->dev, c->offset, v->length - c->offset, x.read_only);
		x.dev = win;
	}
	x.name = c->export_name ? c->export_name : "";
	x.description = c->description;
	the_server = nbd_server_new(&x, 1, &so);
	if (got_signal)
		nbd_server_stop(the_server); /* it came while we were opening */
	log_info("serving %s (%s, view %s)", img->path, img->format, v->name);
	ready(c);
	r = nbd_server_run(the_server, lfd);
	if (r < 0)
		fprintf(stderr, "imgfs-nbd: %s\n", strerror(-r));
	{
		struct nbd_server *s = the_server;

		the_server = NULL; /* before freeing: the signal handler uses it */
		nbd_server_free(s);
	}
	if (win)
		bdev_close(win);
	if (image_close(img) < 0) {
		log_err("closing %s failed", c->path);
		r = -EIO;
	}
	return r < 0;
}

int main(int argc, char **argv)
{
	struct sigaction sa = { .sa_handler = on_signal };
	char ctl[PATH_MAX];
	struct cli c;
	struct stat st;
	ssize_t n;
	int activated, lfd, r;
	bool bridge = false;

	daemon_tune_malloc();
	log_set_prog("imgfs-nbd");
	r = parse_args(argc, argv, &c);
	if (r)
		return r;
	log_set_level(c.verbose >= 2 ? LOG_LVL_DEBUG :
		      c.verbose ? LOG_LVL_INFO : LOG_LVL_WARN);
	signal(SIGPIPE, SIG_IGN);
	activated = socket_activation();
	if (activated >= 0 && (c.socket || c.fd >= 0 || c.port || c.bind)) {
		fprintf(stderr, "imgfs-nbd: socket activation (LISTEN_FDS): -k, --fd, -p and -b do not apply\n");
		return 2;
	}
	if (stat(c.path, &st) < 0) {
		fprintf(stderr, "imgfs-nbd: %s: %s\n", c.path, strerror(errno));
		return 1;
	}
	n = getxattr(c.path, NBD_CONTROL_XATTR, ctl, sizeof(ctl) - 1);
	if (n > 0) {
		ctl[n] = 0;
		bridge = true;
	} else if (S_ISDIR(st.st_mode)) {
		fprintf(stderr, "imgfs-nbd: %s is a directory but not an imgfs mount"
			" (no %s attribute)\n", c.path, NBD_CONTROL_XATTR);
		return 1;
	}
	if (c.do_fork && do_fork() < 0) {
		fprintf(stderr, "imgfs-nbd: fork: %s\n", strerror(errno));
		return 1;
	}
	if (pipe2(sig_pipe, O_CLOEXEC | O_NONBLOCK) < 0)
		return 1;
	sigaction(SIGTERM, &sa, NULL);
	sigaction(SIGINT, &sa, NULL);
	sigaction(SIGHUP, &sa, NULL);

	lfd = make_listener(&c, activated);
	if (lfd < 0)
		return 1;
	r = bridge ? serve_bridge(&c, ctl, lfd, S_ISDIR(st.st_mode))
		   : serve_image(&c, lfd);
	if (!bridge)
		close(lfd);
	if (c.socket)
		unlink(c.socket);
	if (wrote_pid_file)
		unlink(c.pid_file);
	return r;
}
