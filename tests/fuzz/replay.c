/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * Replay driver for the libFuzzer harnesses, built with the normal compiler
 * (and the sanitizers, in a sanitizer build) so that `make check` runs every
 * kept input: the seed corpora and the regressions, each a crash once.
 *
 *   tests/fuzz/fuzz-image [FILE|DIR]...
 *
 * With no arguments it replays $IMGFS_SRCDIR/tests/fuzz/corpus/NAME and
 * tests/fuzz/regressions/NAME, where NAME is the program name without
 * "fuzz-".  Output is TAP, one line per file; each input runs in a child
 * process with a time limit, so a crash or a hang is that file's "not ok"
 * and the run goes on.
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <libgen.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#define TIME_LIMIT 60 /* seconds per input (sanitizer builds are slow) */

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerInitialize(int *argc, char ***argv) __attribute__((weak));

struct list { char **v; size_t n; };

static void add(struct list *l, const char *path)
{
	l->v = realloc(l->v, (l->n + 1) * sizeof(*l->v));
	if (!l->v || !(l->v[l->n] = strdup(path)))
		abort();
	l->n++;
}

static int cmp(const void *a, const void *b)
{
	return strcmp(*(char *const *)a, *(char *const *)b);
}

/* Files under path (recursively, sorted); a missing path adds nothing. */
static void collect(struct list *l, const char *path)
{
	struct stat st;
	struct dirent *de;
	struct list sub = { 0 };
	DIR *d;

	if (stat(path, &st) < 0)
		return;
	if (!S_ISDIR(st.st_mode)) {
		add(l, path);
		return;
	}
	d = opendir(path);
	if (!d)
		return;
	while ((de = readdir(d))) {
		char *p;

		if (de->d_name[0] == '.' || !strcmp(de->d_name, "README"))
			continue;
		if (asprintf(&p, "%s/%s", path, de->d_name) < 0)
			abort();
		add(&sub, p);
		free(p);
	}
	closedir(d);
	if (sub.n)
		qsort(sub.v, sub.n, sizeof(*sub.v), cmp);
	for (size_t i = 0; i < sub.n; i++) {
		collect(l, sub.v[i]);
		free(sub.v[i]);
	}
	free(sub.v);
}

static int run_one(const char *path)
{
	uint8_t *data = NULL;
	size_t size = 0, cap = 0;
	int fd = open(path, O_RDONLY | O_CLOEXEC);

	if (fd < 0)
		return 2;
	for (;;) {
		ssize_t n;

		if (size == cap) {
			cap = cap ? cap * 2 : 65536;
			data = realloc(data, cap);
			if (!data)
				abort();
		}
		n = read(fd, data + size, cap - size);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0) {
			close(fd);
			return 2;
		}
		if (n == 0)
			break;
		size += (size_t)n;
	}
	close(fd);
	/* libFuzzer hands over a buffer of exactly size bytes: so do we, so
	 * that ASan sees any read past its end */
	{
		uint8_t *exact = malloc(size ? size : 1);

		if (!exact)
			abort();
		memcpy(exact, data, size);
		free(data);
		LLVMFuzzerTestOneInput(exact, size);
		free(exact);
	}
	return 0;
}

int main(int argc, char **argv)
{
	struct list files = { 0 };
	char *self = strdup(argv[0]), *name = basename(self);
	unsigned failed = 0;

	if (!strncmp(name, "fuzz-", 5))
		name += 5;
	/* as libFuzzer does: the harness sees the command line first (fuzz-nbd
	 * --seed FILE writes a seed and exits) */
	if (LLVMFuzzerInitialize)
		LLVMFuzzerInitialize(&argc, &argv);
	if (argc > 1 && !strcmp(argv[1], "--tap")) {
		argv++;
		argc--;
	}
	if (argc > 1) {
		for (int i = 1; i < argc; i++)
			collect(&files, argv[i]);
	} else {
		const char *src = getenv("IMGFS_SRCDIR");
		char *p;

		if (asprintf(&p, "%s/tests/fuzz/corpus/%s", src ? src : ".", name) < 0)
			abort();
		collect(&files, p);
		free(p);
		if (asprintf(&p, "%s/tests/fuzz/regressions/%s", src ? src : ".", name) < 0)
			abort();
		collect(&files, p);
		free(p);
	}
	fflush(stdout);
	printf("1..%zu\n", files.n ? files.n : 1);
	if (!files.n)
		printf("ok 1 # SKIP no inputs for %s\n", name);
	for (size_t i = 0; i < files.n; i++) {
		const char *shown = files.v[i];
		const char *src = getenv("IMGFS_SRCDIR");
		int status = 0;
		pid_t pid;

		if (src && !strncmp(shown, src, strlen(src)) && shown[strlen(src)] == '/')
			shown += strlen(src) + 1;
		fflush(stdout);
		pid = fork();
		if (pid < 0)
			abort();
		if (pid == 0) {
			alarm(TIME_LIMIT);
			exit(run_one(files.v[i])); /* exit: LeakSanitizer runs */
		}
		while (waitpid(pid, &status, 0) < 0 && errno == EINTR)
			;
		if (WIFEXITED(status) && WEXITSTATUS(status) == 0) {
			printf("ok %zu - %s\n", i + 1, shown);
		} else {
			failed++;
			if (WIFSIGNALED(status))
				printf("not ok %zu - %s (signal %d%s)\n", i + 1, shown,
				       WTERMSIG(status),
				       WTERMSIG(status) == SIGALRM ? ", time limit" : "");
			else
				printf("not ok %zu - %s (exit %d)\n", i + 1, shown,
				       WEXITSTATUS(status));
		}
		free(files.v[i]);
	}
	free(files.v);
	free(self);
	return failed ? 1 : 0;
}
