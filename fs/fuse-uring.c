/*
 * FUSE over io_uring (kernel >= 6.14) under libfuse 3.14, which knows
 * nothing of it: libfuse decodes requests and encodes replies as always,
 * and this file moves them through the kernel's rings instead of
 * read()/writev() on /dev/fuse.
 *
 * The kernel keeps one request queue per possible CPU and hands a request
 * to the queue of the CPU its caller runs on.  Each queue here has a few
 * threads, each with an io_uring of its own and ring entries (a header
 * buffer and a payload buffer each, registered with the kernel): a request
 * lands in a free entry, the thread decodes it with
 * fuse_session_process_buf(), and the reply, written into the same buffers,
 * goes back with the command that also fetches the next request.  One
 * syscall per request instead of two, and the thread that serves it runs on
 * the caller's CPU.  One entry per thread: a slow read holds up no other
 * request of its queue.
 *
 * libfuse's hooks (fuse_session_custom_io) see every message:
 *  - read: requests from /dev/fuse (FUSE_INIT, interrupts, forgets, and
 *    whatever arrives before the rings are registered); FUSE_INIT tells
 *    whether the kernel offers io_uring;
 *  - writev and splice_send: replies.  A reply to a request that came
 *    through a ring entry is copied into that entry; anything else
 *    (replies to /dev/fuse requests, notifications) is written to
 *    /dev/fuse.  Once the INIT reply is written, the queue threads start
 *    and register their entries (write_init_reply says why the reply does
 *    not carry FUSE_OVER_IO_URING).
 *
 * A reply may come from another thread: only the entry's own thread
 * touches its ring, so the other thread fills the entry and wakes it
 * through an eventfd.
 */
#include "fuse-uring.h"

#define FUSE_USE_VERSION 314
#include <fuse_lowlevel.h>
#include <linux/fuse.h>
#include <liburing.h>

#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/sysinfo.h>
#include <sys/uio.h>
#include <unistd.h>

#include "util.h"

/* ---- the kernel's interface (uapi <linux/fuse.h> 7.42; Debian 12 has 7.38) */

#define URING_INIT_FLAG (1ULL << 41) /* FUSE_OVER_IO_URING, in flags2 */
#define URING_CMD_REGISTER 1
#define URING_CMD_COMMIT_AND_FETCH 2

struct uring_ent_in_out {
	uint64_t flags;
	uint64_t commit_id;  /* the kernel's id of the request: echoed on commit */
	uint32_t payload_sz; /* bytes in the payload buffer, either way */
	uint32_t padding;
	uint64_t reserved;
};

/* The header buffer of a ring entry. */
struct uring_req_header {
	char in_out[128];    /* struct fuse_in_header, then fuse_out_header */
	char op_in[128];     /* the request's first argument (its per-op struct) */
	struct uring_ent_in_out ent;
};

/* The command area of a 128-byte SQE. */
struct uring_cmd_req {
	uint64_t flags;
	uint64_t commit_id;
	uint16_t qid;
	uint8_t padding[6];
};

_Static_assert(sizeof(struct uring_req_header) == 288, "fuse_uring_req_header");
_Static_assert(sizeof(struct uring_cmd_req) == 24, "fuse_uring_cmd_req");

/* ---- state ------------------------------------------------------------------ */

/* Room before the payload for the request's header and first argument, so
 * that a request is contiguous for libfuse without copying its payload. */
#define HEAD_ROOM 4096u

struct qthread;

struct ring_ent {
	struct qthread *t;
	struct uring_req_header *hdr;
	char *payload;
	struct iovec iov[2];
	_Atomic uint64_t unique; /* the request being served, 0 if none */
	uint64_t commit_id;
	atomic_bool answered;    /* the reply is in the buffers: commit it */
};

/*
 * A queue thread and its entry.  A request is answered on the thread that
 * took it, but a reply from elsewhere still works (the eventfd).  What must
 * not happen is a reply that waits for other requests: the entry stays
 * taken until then, and requests the kernel queued while every entry of
 * the queue was taken go out only as an entry of the queue is answered
 * (imgfs.c keeps writable mounts off the rings for that reason).
 */
struct qthread {
	unsigned qid;
	int cpu;                 /* pinned to, or -1 */
	pthread_t tid;
	bool started;
	struct io_uring ring;
	int efd;                 /* wakes the thread: a reply from elsewhere, or stop */
	uint64_t efd_val;
	struct ring_ent ent;
	char *buf;               /* the entry's payload, with HEAD_ROOM before it */
};

static struct {
	struct fuse_session *se;
	int fd;
	unsigned per_queue, nqueues;
	size_t payload_size;
	struct qthread *threads;  /* nqueues * per_queue */
	unsigned nthreads;
	uint64_t init_unique;     /* of FUSE_INIT, while its reply is due */
	bool offered;             /* the kernel offered io_uring in FUSE_INIT */
	atomic_bool started, stopping;
	atomic_ulong served;
	pthread_mutex_t start_lock;
} U = { .start_lock = PTHREAD_MUTEX_INITIALIZER };

static __thread struct ring_ent *cur_ent; /* the entry this thread is serving */

/* ---- the kernel's side --------------------------------------------------- */

bool fuse_uring_possible(const char **why)
{
	FILE *f = fopen("/sys/module/fuse/parameters/enable_uring", "r");
	int c;

	if (!f) {
		*why = "this kernel has no FUSE over io_uring (kernel 6.14 or later, CONFIG_FUSE_IO_URING)";
		return false;
	}
	c = fgetc(f);
	fclose(f);
	if (c != 'Y' && c != 'y' && c != '1') {
		*why = "the fuse module's enable_uring parameter is off "
		       "(echo Y > /sys/module/fuse/parameters/enable_uring)";
		return false;
	}
	return true;
}

/* The kernel has a queue per possible CPU (not only the online ones). */
static unsigned possible_cpus(void)
{
	FILE *f = fopen("/sys/devices/system/cpu/possible", "r");
	unsigned lo, hi = 0, n = 0;
	int c;

	if (f) {
		/* "0-3" or "0,2-5": the highest number + 1 */
		while (fscanf(f, "%u", &lo) == 1) {
			hi = lo;
			c = fgetc(f);
			if (c == '-' && fscanf(f, "%u", &hi) == 1)
				c = fgetc(f);
			n = hi + 1 > n ? hi + 1 : n;
			if (c != ',')
				break;
		}
		fclose(f);
	}
	if (!n) {
		int k = get_nprocs_conf();

		n = k > 0 ? (unsigned)k : 1;
	}
	return n;
}

/* A cleared 128-byte SQE (a thread has at most two outstanding, its
 * entry's command and the eventfd's read: the ring has room, but submit
 * and retry rather than trust it). */
static struct io_uring_sqe *get_sqe(struct qthread *t)
{
	struct io_uring_sqe *sqe = io_uring_get_sqe(&t->ring);

	if (!sqe && io_uring_submit(&t->ring) >= 0)
		sqe = io_uring_get_sqe(&t->ring);
	if (sqe)
		memset(sqe, 0, 128);
	else
		log_err("FUSE io_uring: queue %u: no room in the ring", t->qid);
	return sqe;
}

static bool prep_cmd(struct qthread *t, struct ring_ent *e, uint32_t op)
{
	struct io_uring_sqe *sqe = get_sqe(t);
	struct uring_cmd_req *c;

	if (!sqe)
		return false;
	sqe->opcode = IORING_OP_URING_CMD;
	sqe->fd = U.fd;
	sqe->cmd_op = op;
	if (op == URING_CMD_REGISTER) {
		sqe->addr = (uint64_t)(uintptr_t)e->iov;
		sqe->len = 2;
	}
	c = (struct uring_cmd_req *)sqe->cmd;
	c->qid = (uint16_t)t->qid;
	c->commit_id = e->commit_id;
	io_uring_sqe_set_data(sqe, e);
	return true;
}

static bool prep_efd_read(struct qthread *t)
{
	struct io_uring_sqe *sqe = get_sqe(t);

	if (!sqe)
		return false;
	io_uring_prep_read(sqe, t->efd, &t->efd_val, sizeof(t->efd_val), 0);
	io_uring_sqe_set_data(sqe, &t->efd_val);
	return true;
}

/* The reply is in the entry's buffers: its thread sends it. */
static void answered(struct ring_ent *e)
{
	atomic_store(&e->unique, 0);
	atomic_store(&e->answered, true);
	if (cur_ent != e) {
		uint64_t one = 1;

		if (write(e->t->efd, &one, sizeof(one)) < 0)
			log_warn("FUSE io_uring: waking queue thread: %s", strerror(errno));
	}
}

/* Answer the entry's request with an error of our own (it was malformed). */
static void answer_err(struct ring_ent *e, int err)
{
	struct fuse_out_header oh = { .len = sizeof(oh), .error = -err, .unique = atomic_load(&e->unique) };

	memcpy(e->hdr->in_out, &oh, sizeof(oh));
	e->hdr->ent.payload_sz = 0;
	answered(e);
}

static void serve(struct ring_ent *e)
{
	struct fuse_in_header ih;
	uint32_t pl = e->hdr->ent.payload_sz;
	size_t op;
	char *start;
	struct fuse_buf fb = { 0 };

	memcpy(&ih, e->hdr->in_out, sizeof(ih));
	e->commit_id = e->hdr->ent.commit_id;
	atomic_store(&e->unique, ih.unique);
	atomic_fetch_add(&U.served, 1);
	cur_ent = e;
	/* the first argument is in op_in, the rest in the payload; in_header.len
	 * counts them all */
	if (ih.len < sizeof(ih) + (uint64_t)pl || pl > U.payload_size ||
	    ih.len - sizeof(ih) - pl > sizeof(e->hdr->op_in)) {
		log_err("FUSE io_uring: malformed request (opcode %u, length %u, payload %u)",
			ih.opcode, ih.len, pl);
		answer_err(e, EIO);
		cur_ent = NULL;
		return;
	}
	op = ih.len - sizeof(ih) - pl;
	start = e->payload - op - sizeof(ih);
	memcpy(start, &ih, sizeof(ih));
	memcpy(start + sizeof(ih), e->hdr->op_in, op);
	fb.mem = start;
	fb.size = ih.len;
	fuse_session_process_buf(U.se, &fb);
	/* requests libfuse answers with silence still give their entry back */
	if (!atomic_load(&e->answered) && atomic_load(&e->unique) &&
	    (ih.opcode == FUSE_FORGET || ih.opcode == FUSE_BATCH_FORGET || ih.opcode == FUSE_INTERRUPT))
		answer_err(e, ENOSYS);
	cur_ent = NULL;
}

static void pin(struct qthread *t)
{
	cpu_set_t set;

	if (t->cpu < 0)
		return;
	CPU_ZERO(&set);
	CPU_SET(t->cpu, &set);
	/* advisory: requests are served wherever the thread runs */
	(void)pthread_setaffinity_np(pthread_self(), sizeof(set), &set);
}

static void *qthread_main(void *opaque)
{
	struct qthread *t = opaque;
	int r;

	pin(t);
	if (!prep_cmd(t, &t->ent, URING_CMD_REGISTER) || !prep_efd_read(t)) {
		log_err("FUSE io_uring: queue %u: cannot register an entry", t->qid);
		return NULL;
	}
	for (;;) {
		struct io_uring_cqe *cqe;
		unsigned head, seen = 0;
		bool stop = false;

		r = io_uring_submit_and_wait(&t->ring, 1);
		if (r == -EINTR)
			continue;
		if (r < 0) {
			log_err("FUSE io_uring: queue %u: %s", t->qid, strerror(-r));
			break;
		}
		io_uring_for_each_cqe(&t->ring, head, cqe) {
			void *data = io_uring_cqe_get_data(cqe);
			int res = cqe->res;

			seen++;
			if (data == &t->efd_val) {
				if (atomic_load(&U.stopping) || !prep_efd_read(t))
					stop = true;
			} else if (res < 0) {
				/* the connection is gone (unmounted, aborted) */
				if (res != -ENOTCONN && res != -ECANCELED && res != -ENODEV)
					log_err("FUSE io_uring: queue %u: %s", t->qid, strerror(-res));
				stop = true;
			} else {
				serve(data);
			}
		}
		io_uring_cq_advance(&t->ring, seen);
		if (stop)
			break;
		/* the reply goes back and fetches the next request */
		if (atomic_exchange(&t->ent.answered, false) &&
		    !prep_cmd(t, &t->ent, URING_CMD_COMMIT_AND_FETCH))
			break;
	}
	return NULL;
}

/* Release the threads' buffers and eventfds (none runs; none is set up). */
static void free_threads(void)
{
	for (unsigned i = 0; U.threads && i < U.nthreads; i++) {
		free(U.threads[i].ent.hdr);
		free(U.threads[i].buf);
		if (U.threads[i].efd >= 0)
			close(U.threads[i].efd);
	}
	free(U.threads);
	U.threads = NULL;
	U.nthreads = 0;
}

/* Set up and start the queue threads (the INIT reply is written). */
static void start_threads(size_t payload_size)
{
	cpu_set_t allowed;
	bool have_allowed = sched_getaffinity(0, sizeof(allowed), &allowed) == 0;

	U.payload_size = payload_size;
	U.nthreads = U.nqueues * U.per_queue;
	U.threads = calloc(U.nthreads, sizeof(*U.threads));
	if (!U.threads)
		goto fail;
	for (unsigned i = 0; i < U.nthreads; i++)
		U.threads[i].efd = -1;
	for (unsigned i = 0; i < U.nthreads; i++) {
		struct qthread *t = &U.threads[i];
		struct ring_ent *e = &t->ent;
		struct io_uring_params p = { .flags = IORING_SETUP_SQE128 };
		int r;

		t->qid = i / U.per_queue;
		e->t = t;
		e->hdr = aligned_alloc(4096, 4096);
		t->buf = aligned_alloc(4096, HEAD_ROOM + payload_size);
		if (!e->hdr || !t->buf)
			goto fail;
		memset(e->hdr, 0, 4096);
		e->payload = t->buf + HEAD_ROOM;
		e->iov[0] = (struct iovec){ e->hdr, sizeof(*e->hdr) };
		e->iov[1] = (struct iovec){ e->payload, payload_size };
		t->cpu = have_allowed && t->qid < CPU_SETSIZE && CPU_ISSET(t->qid, &allowed) ? (int)t->qid : -1;
		t->efd = eventfd(0, EFD_CLOEXEC);
		if (t->efd < 0)
			goto fail;
		r = io_uring_queue_init_params(4, &t->ring, &p);
		if (r < 0) {
			log_err("FUSE io_uring: io_uring_queue_init: %s", strerror(-r));
			goto fail;
		}
		t->started = true;
	}
	/* before the first thread runs: from its first request on, replies
	 * must find their entries */
	atomic_store(&U.started, true);
	for (unsigned i = 0; i < U.nthreads; i++) {
		pthread_attr_t a;

		pthread_attr_init(&a);
		pthread_attr_setstacksize(&a, 256 << 10);
		if (pthread_create(&U.threads[i].tid, &a, qthread_main, &U.threads[i]) != 0) {
			pthread_attr_destroy(&a);
			/* the kernel uses the rings only once every queue has an
			 * entry: a queue without threads keeps them all unused */
			log_err("FUSE io_uring: cannot start queue threads: requests stay on /dev/fuse");
			for (unsigned j = i; j < U.nthreads; j++) {
				io_uring_queue_exit(&U.threads[j].ring);
				U.threads[j].started = false;
			}
			break;
		}
		pthread_attr_destroy(&a);
	}
	log_info("FUSE io_uring: %u queues x %u threads, %zu KiB payloads",
		 U.nqueues, U.per_queue, payload_size >> 10);
	return;
fail:
	log_err("FUSE io_uring: cannot set up the queues: requests stay on /dev/fuse");
	for (unsigned i = 0; U.threads && i < U.nthreads; i++) {
		if (U.threads[i].started)
			io_uring_queue_exit(&U.threads[i].ring);
		U.threads[i].started = false;
	}
	free_threads();
}

/* ---- libfuse's hooks ------------------------------------------------------- */

static struct ring_ent *find_ent(uint64_t unique)
{
	if (!unique || !atomic_load(&U.started))
		return NULL;
	if (cur_ent && atomic_load(&cur_ent->unique) == unique)
		return cur_ent;
	for (unsigned i = 0; i < U.nthreads; i++)
		if (atomic_load(&U.threads[i].ent.unique) == unique)
			return &U.threads[i].ent;
	return NULL;
}

static ssize_t hook_read(int fd, void *buf, size_t len, void *userdata)
{
	ssize_t n = read(fd, buf, len);
	const struct fuse_in_header *ih = buf;
	(void)userdata;

	if (n >= (ssize_t)(sizeof(*ih) + offsetof(struct fuse_init_in, flags2) + 4) &&
	    ih->opcode == FUSE_INIT) {
		const struct fuse_init_in *in = (const void *)(ih + 1);
		uint64_t flags = in->flags;

		if (flags & FUSE_INIT_EXT)
			flags |= (uint64_t)in->flags2 << 32;
		U.offered = (flags & URING_INIT_FLAG) != 0;
		U.init_unique = ih->unique;
	}
	return n;
}

/*
 * The INIT reply goes out as libfuse wrote it, then the queues start.  It
 * does not set FUSE_OVER_IO_URING: with that flag the kernel holds every
 * request until each queue has a ring entry, so a queue that failed to
 * register would hang the mount.  Without it, requests keep coming through
 * /dev/fuse until every queue is registered, then through the rings.
 */
static ssize_t write_init_reply(int fd, struct iovec *iov, int count)
{
	struct fuse_init_out out = { 0 };
	size_t payload;
	ssize_t n;

	U.init_unique = 0;
	n = writev(fd, iov, count);
	if (n < 0 || count != 2 || iov[1].iov_len < sizeof(out) ||
	    ((const struct fuse_out_header *)iov[0].iov_base)->error)
		return n;
	if (!U.offered) {
		log_warn("FUSE io_uring: the kernel does not offer it: requests stay on /dev/fuse");
		return n;
	}
	memcpy(&out, iov[1].iov_base, sizeof(out));
	/* the payload buffers must hold the largest request or reply */
	payload = out.max_write;
	if ((size_t)out.max_pages * 4096 > payload)
		payload = (size_t)out.max_pages * 4096;
	if (payload < 32 * 4096)
		payload = 32 * 4096;
	pthread_mutex_lock(&U.start_lock);
	if (!atomic_load(&U.started) && !atomic_load(&U.stopping))
		start_threads(payload);
	pthread_mutex_unlock(&U.start_lock);
	return n;
}

static ssize_t hook_writev(int fd, struct iovec *iov, int count, void *userdata)
{
	const struct fuse_out_header *oh = iov[0].iov_base;
	struct ring_ent *e;
	size_t total = 0, body;
	char *p;
	(void)userdata;

	if (count < 1 || iov[0].iov_len < sizeof(*oh))
		return writev(fd, iov, count);
	if (U.init_unique && oh->unique == U.init_unique)
		return write_init_reply(fd, iov, count);
	e = find_ent(oh->unique);
	if (!e)
		return writev(fd, iov, count);
	for (int i = 0; i < count; i++)
		total += iov[i].iov_len;
	body = total - sizeof(*oh);
	if (body > U.payload_size) {
		log_err("FUSE io_uring: a reply of %zu bytes does not fit its entry", body);
		answer_err(e, EIO);
		return (ssize_t)total;
	}
	memcpy(e->hdr->in_out, oh, sizeof(*oh));
	p = e->payload;
	/* memmove: a reply may quote its request's buffer */
	memmove(p, (char *)iov[0].iov_base + sizeof(*oh), iov[0].iov_len - sizeof(*oh));
	p += iov[0].iov_len - sizeof(*oh);
	for (int i = 1; i < count; i++) {
		memmove(p, iov[i].iov_base, iov[i].iov_len);
		p += iov[i].iov_len;
	}
	e->hdr->ent.payload_sz = (uint32_t)body;
	answered(e);
	return (ssize_t)total;
}

static int read_full(int fd, void *buf, size_t len)
{
	char *p = buf;

	while (len) {
		ssize_t n = read(fd, p, len);

		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			return -1;
		p += n;
		len -= (size_t)n;
	}
	return 0;
}

/* A spliced reply: its header and data are in libfuse's pipe. */
static ssize_t hook_splice_send(int fdin, off_t *offin, int fdout, off_t *offout,
				size_t len, unsigned int flags, void *userdata)
{
	struct fuse_out_header oh;
	struct ring_ent *e;
	size_t body;
	(void)userdata;

	if (!atomic_load(&U.started))
		return splice(fdin, offin, fdout, offout, len, flags);
	if (len < sizeof(oh) || read_full(fdin, &oh, sizeof(oh)) < 0) {
		errno = EIO;
		return -1;
	}
	body = len - sizeof(oh);
	e = find_ent(oh.unique);
	if (e && body <= U.payload_size) {
		if (read_full(fdin, e->payload, body) < 0) {
			answer_err(e, EIO);
			errno = EIO;
			return -1;
		}
		memcpy(e->hdr->in_out, &oh, sizeof(oh));
		e->hdr->ent.payload_sz = (uint32_t)body;
		answered(e);
		return (ssize_t)len;
	}
	{
		/* a /dev/fuse request's reply (or one too big for its entry,
		 * which the kernel refuses): write it whole */
		char *data = malloc(body ? body : 1);
		struct iovec v[2] = { { &oh, sizeof(oh) }, { data, body } };
		ssize_t n = -1;

		if (!data || read_full(fdin, data, body) < 0)
			errno = EIO;
		else if (e)
			answer_err(e, EIO), n = (ssize_t)len;
		else
			n = writev(fdout, v, 2);
		free(data);
		return n;
	}
}

int fuse_uring_install(struct fuse_session *se, unsigned threads)
{
	static const struct fuse_custom_io io = {
		.read = hook_read,
		.writev = hook_writev,
		.splice_send = hook_splice_send,
	};

	U.se = se;
	U.fd = fuse_session_fd(se);
	U.nqueues = possible_cpus();
	/* at least two a queue (one reader's readahead on one CPU goes to one
	 * queue), unless one thread in all was asked for */
	U.per_queue = (threads + U.nqueues - 1) / U.nqueues;
	if (U.per_queue < 2)
		U.per_queue = threads > 1 ? 2 : 1;
	return fuse_session_custom_io(se, &io, U.fd);
}

unsigned long fuse_uring_served(void)
{
	return atomic_load(&U.served);
}

void fuse_uring_stop(void)
{
	pthread_mutex_lock(&U.start_lock);
	atomic_store(&U.stopping, true);
	pthread_mutex_unlock(&U.start_lock);
	if (!atomic_load(&U.started))
		return;
	log_info("FUSE io_uring: %lu requests served through the rings", fuse_uring_served());
	for (unsigned i = 0; i < U.nthreads; i++) {
		uint64_t one = 1;

		if (U.threads[i].started && write(U.threads[i].efd, &one, sizeof(one)) < 0)
			log_warn("FUSE io_uring: stopping queue thread: %s", strerror(errno));
	}
	for (unsigned i = 0; i < U.nthreads; i++) {
		struct qthread *t = &U.threads[i];

		if (!t->started)
			continue;
		pthread_join(t->tid, NULL);
		/* closing the ring cancels its commands: the kernel lets go of the entry */
		io_uring_queue_exit(&t->ring);
		t->started = false;
	}
	/* no reply is due any more (the session loop and the invalidation
	 * thread are done), and the kernel has let go of the buffers */
	atomic_store(&U.started, false);
	free_threads();
}
