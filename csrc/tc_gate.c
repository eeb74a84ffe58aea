/*
 * tc_gate: a prepared run's command, started ahead of its second and held at the gate.
 *
 *     torchcore-gate WAIT_MS      (fd 5: PROGRAM\0ARG\0...\0, then end of file)
 *
 * The executor spawns the gate half a second before the run is due, already in the
 * command's session, with its output pipes, environment and default signal handling, so
 * that when the second comes only the exec of the command is left.  The command line
 * arrives on fd 5 rather than in the gate's own arguments, so nothing that looks for the
 * command in `ps` finds it before it runs.  Then the gate reads one byte from fd 3 (the go pipe, whose write end the launcher holds):
 *
 *   a byte         go: report the start time and exec PROGRAM (found on the gate's PATH);
 *   end of file    the run was cancelled (or the launcher is gone): exit quietly;
 *   WAIT_MS pass   nobody said go in time: the same as a cancel;
 *   executor gone  the status pipe has no reader: the same as a cancel.
 *
 * Just before the exec every signal is put back to its default disposition and the signal
 * mask is emptied: whatever the gate was started with (posix_spawn resets them, and this
 * holds even if a caller did not), a command never inherits an ignored or blocked signal.
 *
 * What happened goes to the executor on fd 4 (the status pipe, close-on-exec, so a
 * successful exec shows as its end of file):
 *
 *   "S<seconds since the epoch>\n"   just before the exec
 *   "E<errno>\n"                      the exec failed (the gate exits 127)
 *   "C\n"                             cancelled (the gate exits 0)
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

enum { GO_FD = 3, STATUS_FD = 4, ARGV_FD = 5 };

static void say(const char *text, size_t length)
{
    while (length > 0) {
        ssize_t n = write(STATUS_FD, text, length);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return;
        text += n;
        length -= (size_t)n;
    }
}

static int usage(void)
{
    static const char text[] = "usage: torchcore-gate WAIT_MS (the command line on fd 5)\n";
    if (write(2, text, sizeof text - 1) < 0)
        return 2;
    return 2;
}

/* The NUL-terminated words on fd 5 as an argv (NULL-terminated), or NULL. */
static char **read_argv(void)
{
    size_t size = 0, capacity = 4096;
    char *text = malloc(capacity);
    if (!text)
        return NULL;
    for (;;) {
        if (size == capacity) {
            char *bigger = realloc(text, capacity * 2);
            if (!bigger) {
                free(text);
                return NULL;
            }
            text = bigger;
            capacity *= 2;
        }
        ssize_t n = read(ARGV_FD, text + size, capacity - size);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0) {
            free(text);
            return NULL;
        }
        if (n == 0)
            break;
        size += (size_t)n;
    }
    close(ARGV_FD);
    size_t words = 0;
    for (size_t i = 0; i < size; i++)
        words += text[i] == '\0';
    if (size == 0 || text[size - 1] != '\0') {
        free(text);
        return NULL;
    }
    char **argv = calloc(words + 1, sizeof *argv);
    if (!argv) {
        free(text);
        return NULL;
    }
    size_t word = 0;
    for (size_t i = 0; i < size; i += strlen(text + i) + 1)
        argv[word++] = text + i;
    return argv;
}

/* 1: go, 0: cancelled (end of file, an error or the wait is over), -1: the executor is gone. */
static int await_go(long wait_ms)
{
    struct timespec now, deadline;
    clock_gettime(CLOCK_MONOTONIC, &deadline);
    deadline.tv_sec += wait_ms / 1000;
    deadline.tv_nsec += (wait_ms % 1000) * 1000000L;
    if (deadline.tv_nsec >= 1000000000L) {
        deadline.tv_sec += 1;
        deadline.tv_nsec -= 1000000000L;
    }
    for (;;) {
        clock_gettime(CLOCK_MONOTONIC, &now);
        long left = (long)(deadline.tv_sec - now.tv_sec) * 1000
                    + (deadline.tv_nsec - now.tv_nsec) / 1000000L;
        if (left <= 0)
            return 0;
        /* The status pipe's write end shows POLLERR once its reader (the executor) is
         * gone: a command must never start without an executor to watch it. */
        struct pollfd pfd[2] = {{.fd = GO_FD, .events = POLLIN}, {.fd = STATUS_FD, .events = 0}};
        int ready = poll(pfd, 2, left > 60000 ? 60000 : (int)left);
        if (ready < 0 && errno == EINTR)
            continue;
        if (ready < 0)
            return 0;
        if (pfd[1].revents & (POLLERR | POLLHUP))
            return -1;
        if (ready == 0 || !(pfd[0].revents & (POLLIN | POLLHUP)))
            continue;
        char byte;
        ssize_t n = read(GO_FD, &byte, 1);
        if (n < 0 && (errno == EINTR || errno == EAGAIN))
            continue;
        return n == 1;
    }
}

/* Every signal at SIG_DFL, none blocked.  The two signals glibc keeps for itself (32 and 33)
 * are refused by its sigaction, and its posix_spawn leaves them ignored in the child: they
 * are reset with the system call itself (an all-zero kernel sigaction is SIG_DFL). */
static void default_signals(void)
{
    struct sigaction dfl;
    memset(&dfl, 0, sizeof dfl);
    dfl.sa_handler = SIG_DFL;
    sigemptyset(&dfl.sa_mask);
    unsigned long long kernel_dfl[4] = {0, 0, 0, 0};
    for (int signum = 1; signum < NSIG; signum++) {
        if (signum == SIGKILL || signum == SIGSTOP)
            continue;
        if (sigaction(signum, &dfl, NULL) < 0)
            syscall(SYS_rt_sigaction, signum, kernel_dfl, NULL, (size_t)((NSIG - 1) / 8));
    }
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
}

int main(int argc, char **argv)
{
    if (argc != 2)
        return usage();
    char *end;
    errno = 0;
    long wait_ms = strtol(argv[1], &end, 10);
    if (errno || *end || wait_ms < 0)
        return usage();
    if (fcntl(STATUS_FD, F_SETFD, FD_CLOEXEC) < 0)
        return 2;
    char **command = read_argv();
    if (!command) {
        say("E22\n", 4);
        return 127;
    }

    int go = await_go(wait_ms);
    if (go <= 0) {
        if (go == 0)
            say("C\n", 2);     /* not when nobody reads it: that write would be a SIGPIPE */
        free(command[0]);       /* the words' text: one block */
        free(command);
        return 0;
    }
    close(GO_FD);
    char line[64];
    struct timespec started;
    clock_gettime(CLOCK_REALTIME, &started);
    int length = snprintf(line, sizeof line, "S%lld.%06ld\n", (long long)started.tv_sec,
                          started.tv_nsec / 1000);
    say(line, (size_t)length);
    default_signals();
    execvp(command[0], command);
    length = snprintf(line, sizeof line, "E%d\n", errno);
    say(line, (size_t)length);
    free(command[0]);
    free(command);
    return 127;
}
