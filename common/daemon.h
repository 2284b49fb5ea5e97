/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * What the two programs, imgfs and imgfs-nbd, do alike as long-running
 * servers.  Not part of the engine: formats/ never runs as a process of its
 * own.
 */
#ifndef IMGFS_DAEMON_H
#define IMGFS_DAEMON_H

/*
 * Tune glibc's malloc for a long-lived multi-threaded server holding the
 * engine's metadata caches; call first thing in main, before any thread.
 */
void daemon_tune_malloc(void);

/* Write our pid and a newline to path.  0, or a negative errno. */
int daemon_write_pid_file(const char *path);

/* Point stdin, stdout and stderr at /dev/null: a daemon keeps no terminal. */
void daemon_detach_stdio(void);

#endif
