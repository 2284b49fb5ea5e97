/* SPDX-License-Identifier: LGPL-2.1-or-later */
#include "util.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <syslog.h>
#include <pthread.h>

int err_set(struct err *e, int code, const char *fmt, ...)
{
	va_list ap;

	if (!e || e->code)
		return code;
	e->code = code;
	va_start(ap, fmt);
	vsnprintf(e->msg, sizeof(e->msg), fmt, ap);
	va_end(ap);
	return code;
}

enum log_level log_max_level = LOG_LVL_WARN;
static bool log_syslog;
static const char *log_prog = "imgfs";

void log_set_prog(const char *name)
{
	log_prog = name;
}

void log_set_level(enum log_level max)
{
	log_max_level = max;
}

void log_use_syslog(const char *tag)
{
	if (tag) {
		openlog(tag, LOG_PID, LOG_DAEMON);
		log_syslog = true;
	} else {
		log_syslog = false;
		closelog();
	}
}

void log_msg(enum log_level lvl, const char *fmt, ...)
{
	static const int prio[] = { LOG_ERR, LOG_WARNING, LOG_INFO, LOG_DEBUG };
	static const char *const word[] = { "error", "warning", "info", "debug" };
	char line[1024];
	va_list ap;

	if (lvl > log_max_level)
		return;
	va_start(ap, fmt);
	vsnprintf(line, sizeof(line), fmt, ap);
	va_end(ap);
	if (log_syslog)
		syslog(prio[lvl], "%s", line);
	else
		fprintf(stderr, "%s: %s: %s\n", log_prog, word[lvl], line);
}

bool buf_is_zero(const void *buf, size_t len)
{
	const unsigned char *p = buf;
	size_t i = 0;

	/* check the head bytewise, then compare the buffer against itself */
	for (; i < len && i < 16; i++)
		if (p[i])
			return false;
	return len <= 16 || memcmp(p, p + 16, len - 16) == 0;
}

static void oom(void)
{
	fputs("imgfs: out of memory\n", stderr);
	abort();
}

void *xmalloc(size_t n)
{
	void *p = malloc(n ? n : 1);
	if (!p)
		oom();
	return p;
}

void *xcalloc(size_t n, size_t sz)
{
	void *p = calloc(n ? n : 1, sz ? sz : 1);
	if (!p)
		oom();
	return p;
}

char *xstrdup(const char *s)
{
	char *p = strdup(s);
	if (!p)
		oom();
	return p;
}

char *xasprintf(const char *fmt, ...)
{
	va_list ap;
	char *s;

	va_start(ap, fmt);
	if (vasprintf(&s, fmt, ap) < 0)
		oom();
	va_end(ap);
	return s;
}
