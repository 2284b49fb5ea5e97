/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Fixed newstyle negotiation (doc/proto.md "Handshake").  Every length the
 * client sends is bounded before anything is allocated: an option payload
 * over NBD_MAX_OPTION_LEN, a bad magic or too many options end the
 * connection; a malformed option gets NBD_REP_ERR_INVALID and negotiation
 * goes on (its payload has always been read whole first, so the stream
 * stays in step).
 */
#include "nbd-int.h"
#include "util.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

/* What an option handler tells the loop. */
enum opt_result { OPT_CONTINUE, OPT_TRANSMIT, OPT_CLOSE };

/* The export list as it is now: the static one, or a fresh one. */
struct xlist {
	struct nbd_export *x;
	unsigned n, dflt;
	bool owned;
};

static void xlist_get(struct nbd_server *s, struct xlist *l)
{
	if (s->list_fn) {
		l->x = NULL;
		l->dflt = 0;
		l->n = s->list_fn(s->list_opaque, &l->x, &l->dflt);
		l->owned = true;
		if (l->dflt >= l->n)
			l->dflt = 0;
	} else {
		l->x = s->exports;
		l->n = s->nexports;
		l->dflt = s->opts.default_export;
		l->owned = false;
	}
}

static void xlist_put(struct xlist *l)
{
	if (l->owned)
		free(l->x);
}

bool nbd_find_export(struct nbd_server *s, const char *name, struct nbd_export *out)
{
	struct xlist l;
	bool found = false;

	xlist_get(s, &l);
	for (unsigned i = 0; i < l.n && !found; i++) {
		if (strcmp(l.x[i].name, name) == 0) {
			*out = l.x[i];
			found = true;
		}
	}
	if (!found && !*name && l.n) {
		*out = l.x[l.dflt];
		found = true;
	}
	xlist_put(&l);
	return found;
}

static bool export_ro(const struct nbd_export *exp)
{
	return exp->read_only || exp->dev->read_only;
}

uint16_t nbd_export_tflags(struct nbd_conn *c, const struct nbd_export *exp)
{
	uint16_t f = NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH | NBD_FLAG_SEND_CACHE;

	if (export_ro(exp))
		f |= NBD_FLAG_READ_ONLY;
	else
		f |= NBD_FLAG_SEND_FUA | NBD_FLAG_SEND_TRIM |
		     NBD_FLAG_SEND_WRITE_ZEROES | NBD_FLAG_SEND_FAST_ZERO;
	if (c->structured)
		f |= NBD_FLAG_SEND_DF;
	/*
	 * Every connection goes through the same engine, so a flush on one
	 * covers writes from all.  But with -e 1 a second connection waits
	 * in the backlog: advertising multi-conn would make clients that
	 * open several connections (nbdcopy) hang, so follow qemu-nbd and
	 * offer it only when more than one client may connect.
	 */
	if (c->srv->opts.max_clients != 1)
		f |= NBD_FLAG_CAN_MULTI_CONN;
	return f;
}

static int send_rep(struct nbd_conn *c, uint32_t opt, uint32_t type,
		    const void *data, uint32_t len)
{
	uint8_t h[20];
	struct iovec iov[2] = { { h, sizeof(h) }, { (void *)data, len } };

	put_be64(h, NBD_REP_MAGIC);
	put_be32(h + 8, opt);
	put_be32(h + 12, type);
	put_be32(h + 16, len);
	return nbd_conn_sendv(c, iov, len ? 2 : 1);
}

static enum opt_result rep(struct nbd_conn *c, uint32_t opt, uint32_t type)
{
	return send_rep(c, opt, type, NULL, 0) < 0 ? OPT_CLOSE : OPT_CONTINUE;
}

static enum opt_result opt_list(struct nbd_conn *c, uint32_t len)
{
	struct xlist l;
	bool failed = false;

	if (len)
		return rep(c, NBD_OPT_LIST, NBD_REP_ERR_INVALID);
	xlist_get(c->srv, &l);
	for (unsigned i = 0; i < l.n && !failed; i++) {
		const struct nbd_export *x = &l.x[i];
		size_t nl = strnlen(x->name, NBD_MAX_STRING);
		size_t dl = x->description ? strnlen(x->description, NBD_MAX_STRING) : 0;
		uint8_t *buf = xmalloc(4 + nl + dl);
		int r;

		put_be32(buf, nl);
		memcpy(buf + 4, x->name, nl);
		if (dl)
			memcpy(buf + 4 + nl, x->description, dl);
		r = send_rep(c, NBD_OPT_LIST, NBD_REP_SERVER, buf, 4 + nl + dl);
		free(buf);
		failed = r < 0;
	}
	xlist_put(&l);
	return failed ? OPT_CLOSE : rep(c, NBD_OPT_LIST, NBD_REP_ACK);
}

static int send_info(struct nbd_conn *c, uint32_t opt, uint16_t type,
		     const void *data, size_t len)
{
	uint8_t buf[2 + NBD_MAX_STRING];

	put_be16(buf, type);
	memcpy(buf + 2, data, len);
	return send_rep(c, opt, NBD_REP_INFO, buf, 2 + len);
}

static char *dup_str(const uint8_t *p, size_t n)
{
	char *s = xmalloc(n + 1);

	memcpy(s, p, n);
	s[n] = 0;
	return s;
}

/*
 * The client has chosen export x (named name, which this frees): enter
 * transmission with it.  Contexts chosen for another export do not carry
 * over (proto.md).
 */
static void select_export(struct nbd_conn *c, char *name, const struct nbd_export *x)
{
	if (c->meta_export && strcmp(c->meta_export, name) != 0)
		c->ctx_base = c->ctx_depth = false;
	free(name);
	c->expv = *x;
	c->exp = &c->expv;
	c->tflags = nbd_export_tflags(c, x);
}

/* NBD_OPT_INFO and NBD_OPT_GO share their request and replies. */
static enum opt_result opt_info_go(struct nbd_conn *c, uint32_t opt,
				   const uint8_t *p, uint32_t len)
{
	struct nbd_export xv, *x = &xv;
	uint32_t namelen;
	uint16_t nreq;
	uint8_t b[12];
	char *name;
	bool want_name = false, want_desc = false;

	if (len < 6)
		return rep(c, opt, NBD_REP_ERR_INVALID);
	namelen = be32(p);
	if (namelen > len - 6 || namelen > NBD_MAX_STRING)
		return rep(c, opt, NBD_REP_ERR_INVALID);
	nreq = be16(p + 4 + namelen);
	if (len != 4 + namelen + 2 + 2 * (uint32_t)nreq)
		return rep(c, opt, NBD_REP_ERR_INVALID);
	for (unsigned i = 0; i < nreq; i++) {
		uint16_t t = be16(p + 6 + namelen + 2 * i);

		want_name |= t == NBD_INFO_NAME;
		want_desc |= t == NBD_INFO_DESCRIPTION;
	}
	name = dup_str(p + 4, namelen);
	if (strlen(name) != namelen) { /* an embedded NUL names nothing */
		free(name);
		return rep(c, opt, NBD_REP_ERR_INVALID);
	}
	if (!nbd_find_export(c->srv, name, x)) {
		free(name);
		return rep(c, opt, NBD_REP_ERR_UNKNOWN);
	}

	put_be16(b, NBD_INFO_EXPORT);
	put_be64(b + 2, x->dev->size);
	put_be16(b + 10, nbd_export_tflags(c, x));
	if (send_rep(c, opt, NBD_REP_INFO, b, 12) < 0)
		goto close;
	if (want_name && send_info(c, opt, NBD_INFO_NAME, x->name,
				   strnlen(x->name, NBD_MAX_STRING)) < 0)
		goto close;
	if (want_desc && x->description &&
	    send_info(c, opt, NBD_INFO_DESCRIPTION, x->description,
		      strnlen(x->description, NBD_MAX_STRING)) < 0)
		goto close;
	/* Always sent: clients that did not ask get the defaults anyway. */
	put_be32(b, NBD_MIN_BLOCK);
	put_be32(b + 4, NBD_PREF_BLOCK);
	put_be32(b + 8, NBD_MAX_PAYLOAD);
	if (send_info(c, opt, NBD_INFO_BLOCK_SIZE, b, 12) < 0)
		goto close;
	if (send_rep(c, opt, NBD_REP_ACK, NULL, 0) < 0)
		goto close;
	if (opt == NBD_OPT_INFO) {
		free(name);
		return OPT_CONTINUE;
	}
	select_export(c, name, x);
	return OPT_TRANSMIT;
close:
	free(name);
	return OPT_CLOSE;
}

static enum opt_result opt_export_name(struct nbd_conn *c, const uint8_t *p,
				       uint32_t len)
{
	struct nbd_export xv, *x = &xv;
	uint8_t b[10 + 124] = { 0 };
	char *name;

	/* No error reply exists for EXPORT_NAME: failure is a disconnect. */
	if (len > NBD_MAX_STRING)
		return OPT_CLOSE;
	name = dup_str(p, len);
	if (strlen(name) != len || !nbd_find_export(c->srv, name, x)) {
		log_info("nbd: client asked for unknown export \"%s\"", name);
		free(name);
		return OPT_CLOSE;
	}
	select_export(c, name, x);
	put_be64(b, x->dev->size);
	put_be16(b + 8, c->tflags);
	if (nbd_conn_send(c, b, c->no_zeroes ? 10 : sizeof(b)) < 0)
		return OPT_CLOSE;
	return OPT_TRANSMIT;
}

/* Does context name match a LIST query (exact, or a namespace wildcard)? */
static bool query_lists(const char *q, const char *ctx)
{
	const char *colon = strchr(ctx, ':');
	size_t ns = colon - ctx + 1;

	if (strcmp(q, ctx) == 0)
		return true;
	/* "base:" and "qemu:" list their namespace (bare "base:" only in LIST) */
	return strlen(q) == ns && strncmp(q, ctx, ns) == 0;
}

static enum opt_result opt_meta(struct nbd_conn *c, uint32_t opt,
				const uint8_t *p, uint32_t len)
{
	bool set = opt == NBD_OPT_SET_META_CONTEXT;
	bool base = false, depth = false;
	struct nbd_export xv;
	uint32_t namelen, nq, pos;
	char *name;

	if (set) {
		/* A SET replaces the previous selection, even when it fails. */
		c->ctx_base = c->ctx_depth = false;
		free(c->meta_export);
		c->meta_export = NULL;
	}
	if (!c->structured)
		return rep(c, opt, NBD_REP_ERR_INVALID);
	if (len < 8)
		return rep(c, opt, NBD_REP_ERR_INVALID);
	namelen = be32(p);
	if (namelen > len - 8 || namelen > NBD_MAX_STRING)
		return rep(c, opt, NBD_REP_ERR_INVALID);
	nq = be32(p + 4 + namelen);
	pos = 8 + namelen;
	/* Validate every query before answering anything. */
	for (uint32_t i = 0, q = pos; i < nq; i++) {
		uint32_t ql;

		if (len - q < 4)
			return rep(c, opt, NBD_REP_ERR_INVALID);
		ql = be32(p + q);
		if (ql > len - q - 4 || ql > NBD_MAX_STRING)
			return rep(c, opt, NBD_REP_ERR_INVALID);
		q += 4 + ql;
		if (i + 1 == nq && q != len)
			return rep(c, opt, NBD_REP_ERR_INVALID);
	}
	if (!nq && pos != len)
		return rep(c, opt, NBD_REP_ERR_INVALID);
	name = dup_str(p + 4, namelen);
	if (strlen(name) != namelen || !nbd_find_export(c->srv, name, &xv)) {
		free(name);
		return rep(c, opt, NBD_REP_ERR_UNKNOWN);
	}
	if (!nq && !set) {
		base = true; /* an empty LIST query lists everything */
		depth = c->srv->opts.allocation_depth;
	}
	for (uint32_t i = 0; i < nq; i++) {
		uint32_t ql = be32(p + pos);
		char *q = dup_str(p + pos + 4, ql);

		pos += 4 + ql;
		if (set) {
			base |= strcmp(q, NBD_CONTEXT_BASE_ALLOCATION) == 0;
			depth |= strcmp(q, NBD_CONTEXT_ALLOCATION_DEPTH) == 0;
		} else {
			base |= query_lists(q, NBD_CONTEXT_BASE_ALLOCATION);
			depth |= query_lists(q, NBD_CONTEXT_ALLOCATION_DEPTH);
		}
		free(q);
	}
	depth &= c->srv->opts.allocation_depth;
	if (base || depth) {
		static const struct { uint32_t id; const char *name; } ctx[2] = {
			{ NBD_CTX_ID_BASE, NBD_CONTEXT_BASE_ALLOCATION },
			{ NBD_CTX_ID_DEPTH, NBD_CONTEXT_ALLOCATION_DEPTH },
		};
		for (int i = 0; i < 2; i++) {
			uint8_t b[4 + 32];
			size_t nl = strlen(ctx[i].name);

			if (!(i ? depth : base))
				continue;
			put_be32(b, set ? ctx[i].id : 0);
			memcpy(b + 4, ctx[i].name, nl);
			if (send_rep(c, opt, NBD_REP_META_CONTEXT, b, 4 + nl) < 0) {
				free(name);
				return OPT_CLOSE;
			}
		}
	}
	if (set) {
		c->ctx_base = base;
		c->ctx_depth = depth;
		c->meta_export = name;
	} else {
		free(name);
	}
	return rep(c, opt, NBD_REP_ACK);
}

static enum opt_result do_option(struct nbd_conn *c, uint32_t opt,
				 const uint8_t *p, uint32_t len)
{
	switch (opt) {
	case NBD_OPT_EXPORT_NAME:
		return opt_export_name(c, p, len);
	case NBD_OPT_ABORT:
		send_rep(c, opt, NBD_REP_ACK, NULL, 0);
		return OPT_CLOSE;
	case NBD_OPT_LIST:
		return opt_list(c, len);
	case NBD_OPT_INFO:
	case NBD_OPT_GO:
		return opt_info_go(c, opt, p, len);
	case NBD_OPT_STRUCTURED_REPLY:
		if (len || c->structured)
			return rep(c, opt, NBD_REP_ERR_INVALID);
		c->structured = true;
		return rep(c, opt, NBD_REP_ACK);
	case NBD_OPT_LIST_META_CONTEXT:
	case NBD_OPT_SET_META_CONTEXT:
		return opt_meta(c, opt, p, len);
	default:
		/* STARTTLS, EXTENDED_HEADERS and anything unknown */
		return rep(c, opt, NBD_REP_ERR_UNSUP);
	}
}

bool nbd_handshake(struct nbd_conn *c)
{
	uint8_t hello[18], h[16];
	uint32_t cflags;

	put_be64(hello, NBD_MAGIC);
	put_be64(hello + 8, NBD_IHAVEOPT);
	put_be16(hello + 16, NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES);
	if (nbd_conn_send(c, hello, sizeof(hello)) < 0 ||
	    nbd_conn_recv(c, h, 4) < 0)
		return false;
	cflags = be32(h);
	if (cflags & ~(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES)) {
		log_info("nbd: client sent unknown flags 0x%x", cflags);
		return false;
	}
	c->no_zeroes = cflags & NBD_FLAG_C_NO_ZEROES;

	for (;;) {
		enum opt_result res;
		uint32_t opt, len;
		uint8_t *p;
		int r;

		if (nbd_conn_recv(c, h, 16) < 0)
			return false;
		if (be64(h) != NBD_IHAVEOPT) {
			log_info("nbd: bad option magic: disconnecting");
			return false;
		}
		opt = be32(h + 8);
		len = be32(h + 12);
		if (len > NBD_MAX_OPTION_LEN || ++c->noptions > NBD_MAX_OPTIONS) {
			log_info("nbd: option %u of %u bytes (the %u-th) is over the limit:"
				 " disconnecting", opt, len, c->noptions);
			return false;
		}
		p = xmalloc(len);
		r = nbd_conn_recv(c, p, len);
		res = r < 0 ? OPT_CLOSE : do_option(c, opt, p, len);
		free(p);
		if (res == OPT_CLOSE)
			return false;
		if (res == OPT_TRANSMIT)
			return true;
	}
}
