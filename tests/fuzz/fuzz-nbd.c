/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * libFuzzer harness for the NBD server: the input is everything a client
 * sends after the server's greeting (client flags, options, requests); the
 * server runs over a socketpair against a 1 MiB in-memory device whose
 * second half is a hole.  Replies are read and thrown away.
 *
 * Build (not part of `make`):
 *   clang -g -O1 -fsanitize=fuzzer,address,undefined -D_GNU_SOURCE -Iformats -Inbd \
 *     tests/fuzz/fuzz-nbd.c nbd/server.c nbd/handshake.c nbd/transmission.c \
 *     formats/util.c formats/bdev.c -pthread -o fuzz-nbd
 *   ./fuzz-nbd -max_len=70000 corpus/     (write a seed first: ./fuzz-nbd --seed corpus/seed)
 */
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "bdev.h"
#include "nbd-proto.h"
#include "nbd-server.h"
#include "util.h"

#define DEV_SIZE (1u << 20)

static uint8_t disk[DEV_SIZE];

static int mem_pread(struct bdev *d, void *buf, size_t len, uint64_t off)
{
	memcpy(buf, disk + off, len);
	return 0;
}

static int mem_pwrite(struct bdev *d, const void *buf, size_t len, uint64_t off,
		      unsigned flags)
{
	return 0; /* accepted and dropped: the bytes do not matter here */
}

static int mem_status(struct bdev *d, uint64_t off, uint64_t len, uint64_t *run,
		      unsigned *status, unsigned *depth)
{
	uint64_t half = DEV_SIZE / 2;

	if (off < half) {
		*run = MIN(len, half - off);
		*status = 0;
		*depth = 1;
	} else {
		*run = len;
		*status = BDEV_ST_HOLE | BDEV_ST_ZERO;
		*depth = 0;
	}
	return 0;
}

static const struct bdev_ops mem_ops = {
	.pread = mem_pread, .pwrite = mem_pwrite, .block_status = mem_status,
};

struct feed { int fd; const uint8_t *data; size_t len; };

static void *writer(void *arg)
{
	struct feed *f = arg;
	size_t off = 0;

	while (off < f->len) {
		ssize_t n = send(f->fd, f->data + off, f->len - off, MSG_NOSIGNAL);

		if (n <= 0)
			break;
		off += n;
	}
	shutdown(f->fd, SHUT_WR);
	return NULL;
}

static void *drainer(void *arg)
{
	struct feed *f = arg;
	char buf[65536];

	while (recv(f->fd, buf, sizeof(buf), 0) > 0)
		;
	return NULL;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	static struct bdev *dev, *ro;
	struct nbd_export x[2];
	struct nbd_server_opts o = { .allocation_depth = true, .workers = 2,
				     .handshake_timeout = 5 };
	struct nbd_server *srv;
	struct feed f;
	pthread_t w, r;
	int sv[2];

	if (!dev) {
		signal(SIGPIPE, SIG_IGN);
		log_set_level(LOG_LVL_ERR);
		for (unsigned i = 0; i < DEV_SIZE / 2; i++)
			disk[i] = i * 31;
		dev = bdev_new(&mem_ops, "mem", DEV_SIZE, false, NULL);
		ro = bdev_new(&mem_ops, "mem", DEV_SIZE, true, NULL);
	}
	x[0] = (struct nbd_export){ "", "fuzz", dev, false };
	x[1] = (struct nbd_export){ "ro", NULL, ro, true };
	srv = nbd_server_new(x, 2, &o);
	if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) < 0)
		abort();
	f = (struct feed){ sv[0], data, size };
	pthread_create(&w, NULL, writer, &f);
	pthread_create(&r, NULL, drainer, &f);
	nbd_server_serve_socket(srv, sv[1]); /* closes sv[1] */
	pthread_join(w, NULL);
	pthread_join(r, NULL);
	close(sv[0]);
	nbd_server_free(srv);
	return 0;
}

/* ---- a seed: a full, valid session -------------------------------------- */

static size_t put_opt(uint8_t *p, uint32_t opt, const void *data, uint32_t len)
{
	put_be64(p, NBD_IHAVEOPT);
	put_be32(p + 8, opt);
	put_be32(p + 12, len);
	if (len)
		memcpy(p + 16, data, len);
	return 16 + len;
}

static size_t put_req(uint8_t *p, uint16_t flags, uint16_t type, uint64_t off, uint32_t len)
{
	put_be32(p, NBD_REQUEST_MAGIC);
	put_be16(p + 4, flags);
	put_be16(p + 6, type);
	put_be64(p + 8, 1);
	put_be64(p + 16, off);
	put_be32(p + 24, len);
	return 28;
}

int write_seed(const char *path);
int write_seed(const char *path)
{
	static const uint8_t meta[] = {
		0, 0, 0, 0, 0, 0, 0, 2,
		0, 0, 0, 15, 'b', 'a', 's', 'e', ':', 'a', 'l', 'l', 'o', 'c', 'a', 't', 'i', 'o', 'n',
		0, 0, 0, 21, 'q', 'e', 'm', 'u', ':', 'a', 'l', 'l', 'o', 'c', 'a', 't', 'i', 'o', 'n',
		'-', 'd', 'e', 'p', 't', 'h',
	};
	static const uint8_t go[] = { 0, 0, 0, 0, 0, 1, 0, NBD_INFO_BLOCK_SIZE };
	uint8_t b[4096];
	size_t n = 0;
	FILE *fp;

	put_be32(b, NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES);
	n = 4;
	n += put_opt(b + n, NBD_OPT_LIST, NULL, 0);
	n += put_opt(b + n, NBD_OPT_STRUCTURED_REPLY, NULL, 0);
	n += put_opt(b + n, NBD_OPT_LIST_META_CONTEXT, meta, sizeof(meta));
	n += put_opt(b + n, NBD_OPT_SET_META_CONTEXT, meta, sizeof(meta));
	n += put_opt(b + n, NBD_OPT_INFO, go, sizeof(go));
	n += put_opt(b + n, NBD_OPT_GO, go, sizeof(go));
	n += put_req(b + n, 0, NBD_CMD_READ, 0, 4096);
	n += put_req(b + n, 0, NBD_CMD_READ, 400000, 400000);
	n += put_req(b + n, NBD_CMD_FLAG_DF, NBD_CMD_READ, 0, 512);
	n += put_req(b + n, 0, NBD_CMD_BLOCK_STATUS, 0, DEV_SIZE);
	n += put_req(b + n, NBD_CMD_FLAG_REQ_ONE, NBD_CMD_BLOCK_STATUS, 0, DEV_SIZE);
	n += put_req(b + n, NBD_CMD_FLAG_FUA, NBD_CMD_WRITE, 0, 8);
	memcpy(b + n, "12345678", 8);
	n += 8;
	n += put_req(b + n, NBD_CMD_FLAG_NO_HOLE, NBD_CMD_WRITE_ZEROES, 0, 4096);
	n += put_req(b + n, 0, NBD_CMD_TRIM, 0, 4096);
	n += put_req(b + n, 0, NBD_CMD_CACHE, 0, 4096);
	n += put_req(b + n, 0, NBD_CMD_FLUSH, 0, 0);
	n += put_req(b + n, 0, NBD_CMD_DISC, 0, 0);
	fp = fopen(path, "wb");
	if (!fp || fwrite(b, 1, n, fp) != n || fclose(fp))
		return 1;
	return 0;
}

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerInitialize(int *argc, char ***argv)
{
	if (*argc >= 3 && !strcmp((*argv)[1], "--seed"))
		exit(write_seed((*argv)[2]));
	return 0;
}
