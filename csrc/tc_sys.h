/* SPDX-License-Identifier: MIT */
/* tc_sys: the two Linux descriptors the supervisor's loop sleeps on and Python 3.10 lacks.
 *
 * - A clock watch: a timerfd on CLOCK_REALTIME armed far ahead with TFD_TIMER_ABSTIME and
 *   TFD_TIMER_CANCEL_ON_SET. It never fires in the ordinary way; when the wall clock is set
 *   (settimeofday, clock_settime, a resume) it becomes readable and read() fails with
 *   ECANCELED, which wakes the loop at once. It must then be armed again.
 * - An inotify instance and its watches (the task file, its directory).
 *
 * Every function returns -1 with errno set on failure, as the system calls do.
 */
#ifndef TC_SYS_H
#define TC_SYS_H

#include <stdint.h>

/* CDEF-BEGIN: from here to the end marker, this is also the cffi declaration */
#define TC_IN_MODIFY 2              /* the values of the <sys/inotify.h> masks (checked there) */
#define TC_IN_ATTRIB 4
#define TC_IN_CLOSE_WRITE 8
#define TC_IN_MOVED_FROM 64
#define TC_IN_MOVED_TO 128
#define TC_IN_CREATE 256
#define TC_IN_DELETE 512
#define TC_IN_DELETE_SELF 1024
#define TC_IN_MOVE_SELF 2048
#define TC_IN_Q_OVERFLOW 16384
#define TC_IN_IGNORED 32768
#define TC_IN_ONLYDIR 16777216

/* A clock watch, armed: a non-blocking, close-on-exec timerfd. */
int tc_clock_watch_open(void);

/* Arm a clock watch again (after its read failed with ECANCELED, or it expired). */
int tc_clock_watch_arm(int fd);

/* A non-blocking, close-on-exec inotify instance. */
int tc_inotify_open(void);

/* inotify_add_watch and inotify_rm_watch. */
int tc_inotify_add(int fd, const char *path, uint32_t mask);
int tc_inotify_rm(int fd, int wd);
/* CDEF-END */

#endif
