/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Helpers shared by the unit tests that make images with qemu-img/qemu-io:
 * a temp dir of fresh paths, a shell runner, and the skip when qemu is
 * missing.  Header-only: each test program includes it once.
 */
#ifndef IMGFS_TEST_QEMU_HELPERS_H
#define IMGFS_TEST_QEMU_HELPERS_H

#include <glib.h>
#include <stdarg.h>
#include <sys/wait.h>

static char *tmpdir;
static unsigned seq;

/* Skips the current test (and says why) when qemu-img or qemu-io is missing. */
static G_GNUC_UNUSED bool have_qemu(void)
{
	static int have = -1;

	if (have < 0) {
		char *a = g_find_program_in_path("qemu-img");
		char *b = g_find_program_in_path("qemu-io");

		have = a && b;
		g_free(a);
		g_free(b);
	}
	if (!have)
		g_test_skip("qemu-img/qemu-io not installed");
	return have;
}

/* A fresh path in the temp dir. */
static G_GNUC_UNUSED char *tpath(const char *name)
{
	return g_strdup_printf("%s/%u-%s", tmpdir, seq++, name);
}

/* Run a shell command; returns its exit status; stdout+stderr in *out if asked. */
static int shs(char **out, const char *fmt, ...) G_GNUC_PRINTF(2, 3);
static G_GNUC_UNUSED int shs(char **out, const char *fmt, ...)
{
	gchar *o = NULL, *eo = NULL;
	GError *err = NULL;
	gint status = 0;
	va_list ap;
	char *cmd;
	gchar *argv[] = { (gchar *)"/bin/sh", (gchar *)"-c", NULL, NULL };

	va_start(ap, fmt);
	cmd = g_strdup_vprintf(fmt, ap);
	va_end(ap);
	argv[2] = cmd;
	if (!g_spawn_sync(NULL, argv, NULL, G_SPAWN_DEFAULT, NULL, NULL, &o, &eo, &status, &err))
		g_error("spawn %s: %s", cmd, err->message);
	if (out)
		*out = g_strconcat(o, eo, NULL);
	else if (!WIFEXITED(status) || WEXITSTATUS(status))
		g_printerr("command failed: %s\n%s%s", cmd, o, eo);
	g_free(o);
	g_free(eo);
	g_free(cmd);
	return WIFEXITED(status) ? WEXITSTATUS(status) : 255;
}

/* Run a shell command that must succeed. */
#define sh(...) g_assert_cmpint(shs(NULL, __VA_ARGS__), ==, 0)

#endif
