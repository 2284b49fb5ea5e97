/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Compressed clusters (§ "Compressed Clusters Descriptor", header byte 104):
 * deflate as a raw stream with a 4 KiB window (inflateInit2 with -12), or
 * zstd frames with no stored size.  A cluster must decompress to exactly
 * cluster_size bytes; less, more, or a broken stream is -EIO.
 *
 * The input is the descriptor's sector span, which may end past the
 * compressed data (sectors are shared) or be cut short at EOF: decoders stop
 * on the output, not on the input.
 */
#include "qcow2-int.h"

#include <errno.h>
#include <stdlib.h>
#include <zlib.h>
#include <zstd.h>

/*
 * Decompression contexts, one per thread, made on first use and reused:
 * creating a zstd context or a zlib inflate state for every cluster costs
 * more than decompressing a 64 KiB cluster (perf: ZSTD_createDCtx and the
 * page faults of its allocation led the profile).  Per thread, so worker
 * threads decompress in parallel with no lock; freed when a thread exits.
 */
struct zctx {
	z_stream z;
	bool z_ready;
	ZSTD_DCtx *dctx;
};

static pthread_key_t zctx_key;
static pthread_once_t zctx_once = PTHREAD_ONCE_INIT;
static __thread struct zctx *thread_zctx;

static void zctx_free(void *p)
{
	struct zctx *c = p;

	if (c->z_ready)
		inflateEnd(&c->z);
	ZSTD_freeDCtx(c->dctx);
	free(c);
}

static void zctx_key_init(void)
{
	pthread_key_create(&zctx_key, zctx_free);
}

static struct zctx *zctx_get(void)
{
	if (!thread_zctx) {
		pthread_once(&zctx_once, zctx_key_init);
		thread_zctx = calloc(1, sizeof(*thread_zctx));
		if (thread_zctx)
			pthread_setspecific(zctx_key, thread_zctx);
	}
	return thread_zctx;
}

static int inflate_cluster(void *out, size_t out_len, const void *src, size_t src_len)
{
	struct zctx *c = zctx_get();
	uint8_t extra;
	z_stream *zp;
	int zr, r = -EIO;

	if (!c)
		return -ENOMEM;
	if (!c->z_ready) {
		memset(&c->z, 0, sizeof(c->z));
		if (inflateInit2(&c->z, -12) != Z_OK)
			return -ENOMEM;
		c->z_ready = true;
	} else if (inflateReset(&c->z) != Z_OK) {
		return -EIO;
	}
	zp = &c->z;
	zp->next_in = (Bytef *)src;
	zp->avail_in = (uInt)src_len;
	zp->next_out = out;
	zp->avail_out = (uInt)out_len;
	zr = inflate(zp, Z_FINISH);
	if (zp->avail_out == 0) {
		if (zr == Z_STREAM_END) {
			r = 0;
		} else if (zr == Z_OK || zr == Z_BUF_ERROR) {
			/* The output is full but the stream has not ended (its
			 * end marker may lie in a truncated last sector, which
			 * qemu accepts).  It must not hold more data, though. */
			zp->next_out = &extra;
			zp->avail_out = 1;
			zr = inflate(zp, Z_SYNC_FLUSH);
			if (zp->avail_out == 1 && zr != Z_NEED_DICT && zr != Z_DATA_ERROR &&
			    zr != Z_MEM_ERROR)
				r = 0;
		}
	}
	return r;
}

static int zstd_cluster(void *out, size_t out_len, const void *src, size_t src_len)
{
	ZSTD_inBuffer in = { src, src_len, 0 };
	ZSTD_outBuffer o = { out, out_len, 0 };
	struct zctx *c = zctx_get();
	ZSTD_DCtx *dctx;
	uint8_t extra;
	size_t zr = 1;
	int r = -EIO;

	if (!c)
		return -ENOMEM;
	if (!c->dctx) {
		c->dctx = ZSTD_createDCtx();
		if (!c->dctx)
			return -ENOMEM;
		/* a cluster is at most 2 MiB: refuse frames asking for larger windows */
		ZSTD_DCtx_setParameter(c->dctx, ZSTD_d_windowLogMax, 23);
	}
	dctx = c->dctx;
	/* a stream left mid-frame by a damaged cluster must not leak into
	 * this one (parameters such as windowLogMax stay) */
	ZSTD_DCtx_reset(dctx, ZSTD_reset_session_only);
	/* several frames may follow one another; keep going until full */
	while (o.pos < o.size) {
		size_t in_pos = in.pos, out_pos = o.pos;

		zr = ZSTD_decompressStream(dctx, &o, &in);
		if (ZSTD_isError(zr))
			goto out;
		if (in.pos == in_pos && o.pos == out_pos)
			goto out; /* no progress: input exhausted, cluster short */
	}
	/* Full: the frame must end here, with no more output. */
	while (zr != 0) {
		ZSTD_outBuffer x = { &extra, 1, 0 };
		size_t in_pos = in.pos;

		zr = ZSTD_decompressStream(dctx, &x, &in);
		if (ZSTD_isError(zr) || x.pos)
			goto out;
		if (zr != 0 && in.pos == in_pos)
			goto out; /* incomplete frame */
	}
	r = 0;
out:
	return r;
}

int qcow2_decompress(unsigned type, void *out, size_t out_len,
		     const void *src, size_t src_len)
{
	switch (type) {
	case QCOW2_COMPRESS_ZLIB:
		return inflate_cluster(out, out_len, src, src_len);
	case QCOW2_COMPRESS_ZSTD:
		return zstd_cluster(out, out_len, src, src_len);
	default:
		return -EIO;
	}
}

/* The decompressed-cluster cache: a handful of slots, round-robin. */
#define ZCACHE_SLOTS 4

struct qcow2_zcache {
	pthread_mutex_t lock;
	size_t cluster_size;
	unsigned next;
	uint64_t key[ZCACHE_SLOTS];   /* 0: empty (descriptors have bit 62 set) */
	uint8_t *buf[ZCACHE_SLOTS];
};

struct qcow2_zcache *qcow2_zcache_new(size_t cluster_size)
{
	struct qcow2_zcache *z = xcalloc(1, sizeof(*z));

	pthread_mutex_init(&z->lock, NULL);
	z->cluster_size = cluster_size;
	return z;
}

void qcow2_zcache_free(struct qcow2_zcache *z)
{
	if (!z)
		return;
	for (unsigned i = 0; i < ZCACHE_SLOTS; i++)
		free(z->buf[i]);
	pthread_mutex_destroy(&z->lock);
	free(z);
}

bool qcow2_zcache_get(struct qcow2_zcache *z, uint64_t key, void *dst,
		      size_t off, size_t len)
{
	bool hit = false;

	pthread_mutex_lock(&z->lock);
	for (unsigned i = 0; i < ZCACHE_SLOTS; i++)
		if (z->key[i] == key && key) {
			memcpy(dst, z->buf[i] + off, len);
			hit = true;
			break;
		}
	pthread_mutex_unlock(&z->lock);
	return hit;
}

void qcow2_zcache_put(struct qcow2_zcache *z, uint64_t key, const void *cluster)
{
	unsigned i;

	pthread_mutex_lock(&z->lock);
	for (i = 0; i < ZCACHE_SLOTS; i++)
		if (z->key[i] == key)
			goto out; /* another thread got there first */
	i = z->next++ % ZCACHE_SLOTS;
	if (!z->buf[i])
		z->buf[i] = xmalloc(z->cluster_size);
	memcpy(z->buf[i], cluster, z->cluster_size);
	z->key[i] = key;
out:
	pthread_mutex_unlock(&z->lock);
}

void qcow2_zcache_clear(struct qcow2_zcache *z)
{
	pthread_mutex_lock(&z->lock);
	memset(z->key, 0, sizeof(z->key));
	pthread_mutex_unlock(&z->lock);
}
