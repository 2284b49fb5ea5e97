/* SPDX-License-Identifier: LGPL-2.1-or-later */
#ifndef IMGFS_THREAD_H
#define IMGFS_THREAD_H

#include <pthread.h>
#include <signal.h>

/*
 * pthread_create(t, NULL, fn, arg) with every signal blocked in the new
 * thread (it inherits the mask it is created under).  Signals belong to the
 * main thread: its handlers stop the server and its poll() wakes for them;
 * a server thread that took one instead would see its I/O interrupted.
 * Returns pthread_create's result.
 */
static inline int thread_start_unsignalled(pthread_t *t, void *(*fn)(void *), void *arg)
{
	sigset_t all, old;
	int r;

	sigfillset(&all);
	pthread_sigmask(SIG_SETMASK, &all, &old);
	r = pthread_create(t, NULL, fn, arg);
	pthread_sigmask(SIG_SETMASK, &old, NULL);
	return r;
}

#endif
