/* SPDX-License-Identifier: MIT */
#include "tc_sys.h"

#include <sys/inotify.h>
#include <sys/timerfd.h>
#include <errno.h>
#include <time.h>
#include <unistd.h>

_Static_assert(TC_IN_MODIFY == IN_MODIFY && TC_IN_ATTRIB == IN_ATTRIB
               && TC_IN_CLOSE_WRITE == IN_CLOSE_WRITE && TC_IN_MOVED_FROM == IN_MOVED_FROM
               && TC_IN_MOVED_TO == IN_MOVED_TO && TC_IN_CREATE == IN_CREATE
               && TC_IN_DELETE == IN_DELETE && TC_IN_DELETE_SELF == IN_DELETE_SELF
               && TC_IN_MOVE_SELF == IN_MOVE_SELF && TC_IN_Q_OVERFLOW == IN_Q_OVERFLOW
               && TC_IN_IGNORED == IN_IGNORED && TC_IN_ONLYDIR == IN_ONLYDIR,
               "the inotify masks of tc_sys.h");

enum { ARM_AHEAD = 366 * 86400 };   /* expiring a year on is harmless: it is armed again */

int tc_clock_watch_arm(int fd)
{
    struct timespec now;
    if (clock_gettime(CLOCK_REALTIME, &now) != 0)
        return -1;
    struct itimerspec spec = {{0, 0}, {now.tv_sec + ARM_AHEAD, 0}};
    return timerfd_settime(fd, TFD_TIMER_ABSTIME | TFD_TIMER_CANCEL_ON_SET, &spec, NULL);
}

int tc_clock_watch_open(void)
{
    int fd = timerfd_create(CLOCK_REALTIME, TFD_NONBLOCK | TFD_CLOEXEC);
    if (fd < 0)
        return -1;
    if (tc_clock_watch_arm(fd) != 0) {
        int saved = errno;
        close(fd);
        errno = saved;
        return -1;
    }
    return fd;
}

int tc_inotify_open(void) { return inotify_init1(IN_NONBLOCK | IN_CLOEXEC); }

int tc_inotify_add(int fd, const char *path, uint32_t mask)
{
    return inotify_add_watch(fd, path, mask);
}

int tc_inotify_rm(int fd, int wd) { return inotify_rm_watch(fd, wd); }
