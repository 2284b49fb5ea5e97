/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* Small shared helpers: errors with a message, logging, byte order, alignment. */
#ifndef IMGFS_UTIL_H
#define IMGFS_UTIL_H

#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

/*
 * An error for the user: the engine returns a negative errno and, when the
 * caller passed a struct err, one line saying what was wrong (naming the file
 * and the value).  The front end prints it.
 */
struct err {
	int code;        /* negative errno, 0 if none */
	char msg[512];
};

/* Set e (if non-NULL, and not already set) and return code. */
int err_set(struct err *e, int code, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));

/* Logging: every layer logs through here; the front end picks the sink. */
enum log_level { LOG_LVL_ERR = 0, LOG_LVL_WARN = 1, LOG_LVL_INFO = 2, LOG_LVL_DEBUG = 3 };
void log_msg(enum log_level lvl, const char *fmt, ...)
	__attribute__((format(printf, 2, 3)));
void log_set_level(enum log_level max);
void log_use_syslog(const char *tag); /* NULL: back to stderr */
void log_set_prog(const char *name);  /* the prefix on stderr (default "imgfs") */
extern enum log_level log_max_level;
#define log_err(...)   log_msg(LOG_LVL_ERR, __VA_ARGS__)
#define log_warn(...)  log_msg(LOG_LVL_WARN, __VA_ARGS__)
#define log_info(...)  log_msg(LOG_LVL_INFO, __VA_ARGS__)
#define log_debug(...) do { if (log_max_level >= LOG_LVL_DEBUG) log_msg(LOG_LVL_DEBUG, __VA_ARGS__); } while (0)

/* Big-endian loads and stores (on-disk formats). */
static inline uint16_t be16(const void *p)
{
	const uint8_t *b = p;
	return (uint16_t)(b[0] << 8 | b[1]);
}
static inline uint32_t be32(const void *p)
{
	const uint8_t *b = p;
	return (uint32_t)b[0] << 24 | (uint32_t)b[1] << 16 | (uint32_t)b[2] << 8 | b[3];
}
static inline uint64_t be64(const void *p)
{
	return (uint64_t)be32(p) << 32 | be32((const uint8_t *)p + 4);
}
static inline uint16_t le16(const void *p)
{
	const uint8_t *b = p;
	return (uint16_t)(b[0] | b[1] << 8);
}
static inline uint32_t le32(const void *p)
{
	const uint8_t *b = p;
	return (uint32_t)b[0] | (uint32_t)b[1] << 8 | (uint32_t)b[2] << 16 | (uint32_t)b[3] << 24;
}
static inline uint64_t le64(const void *p)
{
	return (uint64_t)le32(p) | (uint64_t)le32((const uint8_t *)p + 4) << 32;
}
static inline void put_be16(void *p, uint16_t v)
{
	uint8_t *b = p;
	b[0] = v >> 8; b[1] = v;
}
static inline void put_be32(void *p, uint32_t v)
{
	uint8_t *b = p;
	b[0] = v >> 24; b[1] = v >> 16; b[2] = v >> 8; b[3] = v;
}
static inline void put_be64(void *p, uint64_t v)
{
	put_be32(p, v >> 32);
	put_be32((uint8_t *)p + 4, (uint32_t)v);
}

static inline bool is_pow2(uint64_t v) { return v && !(v & (v - 1)); }
/* a must be a power of two */
static inline uint64_t align_down(uint64_t v, uint64_t a) { return v & ~(a - 1); }
static inline uint64_t align_up(uint64_t v, uint64_t a) { return (v + a - 1) & ~(a - 1); }
static inline bool is_aligned(uint64_t v, uint64_t a) { return (v & (a - 1)) == 0; }
#ifndef MIN
#define MIN(a, b) ((a) < (b) ? (a) : (b))
#endif
#ifndef MAX
#define MAX(a, b) ((a) > (b) ? (a) : (b))
#endif
#ifndef ARRAY_SIZE
#define ARRAY_SIZE(a) (sizeof(a) / sizeof((a)[0]))
#endif

/* true if a + b overflows or exceeds limit */
static inline bool range_exceeds(uint64_t a, uint64_t b, uint64_t limit)
{
	return a > limit || b > limit - a;
}

/* Is the buffer all zero bytes? */
bool buf_is_zero(const void *buf, size_t len);

/* Abort-on-OOM allocation helpers (the engine treats OOM as fatal, like GLib). */
void *xmalloc(size_t n);
void *xcalloc(size_t n, size_t sz);
char *xstrdup(const char *s);
char *xasprintf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

#endif
