/*
 * fsb-init: PID 1 of every Fast Sandbox container.
 *
 * Why: the user's process run directly as PID 1 of its PID namespace gets no default signal
 * actions (a plain `sleep` ignores SIGTERM, so every delete waits the whole grace period before
 * SIGKILL) and never reaps the zombies its children leave behind. This helper is bind-mounted
 * read-only at /.fsb/init and the container's argv becomes `/.fsb/init -- <user argv...>`.
 * It forks the user command, forwards termination/job signals to it, reaps every child, and
 * exits with the command's status (128+N when it was killed by signal N), like tini.
 *
 * Exit codes of its own: 2 usage, 126 command not executable (EACCES), 127 command not found
 * or other exec failure; the reason goes to stderr as `fsb-init: exec <cmd>: <strerror>`.
 *
 * Seam: main() only parses a mode and hands an argv to supervise(); a later "warm slot" mode
 * (wait for the exec spec of the next request, then run it) plugs in there.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#define EXIT_USAGE 2
#define EXIT_NOEXEC 126
#define EXIT_NOTFOUND 127

/* Signals a shell or runtime sends to "the container"; they belong to the user's command. */
static const int forwarded[] = {SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2, SIGWINCH};

static void die(const char *what)
{
    fprintf(stderr, "fsb-init: %s: %s\n", what, strerror(errno));
    exit(1);
}

static int is_forwarded(int sig)
{
    for (size_t i = 0; i < sizeof forwarded / sizeof forwarded[0]; i++)
        if (forwarded[i] == sig)
            return 1;
    return 0;
}

/* Runs in the forked child: give the command a clean signal state, then become it. */
static void exec_child(char *const argv[])
{
    struct sigaction dfl;
    memset(&dfl, 0, sizeof dfl);
    dfl.sa_handler = SIG_DFL;
    /* Dispositions inherited from whoever started us (e.g. an ignored SIGPIPE) are not the
     * user's; SIGKILL/SIGSTOP and glibc-reserved signals fail harmlessly. */
    for (int sig = 1; sig < NSIG; sig++)
        sigaction(sig, &dfl, NULL);
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);

    /* Own process group, so a job-wide signal never hits init; skipped on a tty, where a
     * non-foreground group would be stopped by SIGTTIN/SIGTTOU on its first read or write. */
    if (!isatty(STDIN_FILENO))
        setpgid(0, 0);

    execvp(argv[0], argv);
    int err = errno;
    fprintf(stderr, "fsb-init: exec %s: %s\n", argv[0], strerror(err));
    _exit(err == EACCES ? EXIT_NOEXEC : EXIT_NOTFOUND);
}

static int exit_code(int status)
{
    if (WIFEXITED(status))
        return WEXITSTATUS(status);
    if (WIFSIGNALED(status))
        return 128 + WTERMSIG(status);
    return 1;
}

/* Reaps every exited child; returns the main child's exit code once it has gone, else -1. */
static int reap(pid_t main_pid)
{
    int result = -1;
    for (;;) {
        int status;
        pid_t pid = waitpid(-1, &status, WNOHANG);
        if (pid > 0) {
            if (pid == main_pid)
                result = exit_code(status);
            continue;
        }
        if (pid < 0 && errno == EINTR)
            continue;
        return result; /* 0: others still running; ECHILD: none left */
    }
}

/*
 * Starts argv as the main child and returns its exit code. Signals stay blocked in init and
 * are taken synchronously, so none is lost between fork and the loop (they stay pending).
 * When the main child is gone init returns at once, even if grandchildren linger: as PID 1
 * its exit makes the kernel kill the rest of the namespace.
 */
static int supervise(char *const argv[])
{
    sigset_t all, saved;
    sigfillset(&all);
    if (sigprocmask(SIG_SETMASK, &all, &saved) < 0)
        die("sigprocmask");

    pid_t child = fork();
    if (child < 0)
        die("fork");
    if (child == 0)
        exec_child(argv);

    for (;;) {
        siginfo_t info;
        int sig = sigwaitinfo(&all, &info);
        if (sig < 0) {
            if (errno == EINTR)
                continue;
            die("sigwaitinfo");
        }
        if (sig == SIGCHLD) {
            int code = reap(child);
            if (code >= 0)
                return code;
        } else if (is_forwarded(sig)) {
            /* ESRCH: the child already exited; its SIGCHLD is pending and ends the loop. */
            kill(child, sig);
        }
        /* Anything else is dropped: as PID 1 init would ignore it anyway. */
    }
}

static void usage(void)
{
    fprintf(stderr, "usage: fsb-init -- COMMAND [ARG...]\n");
    exit(EXIT_USAGE);
}

int main(int argc, char *argv[])
{
    int first = 1;
    if (argc > 1 && strcmp(argv[1], "--") == 0)
        first = 2;
    else if (argc > 1 && argv[1][0] == '-')
        usage(); /* reserved for modes, e.g. a future warm-slot mode */
    if (first >= argc)
        usage();

    /* Adopt orphaned grandchildren even when not PID 1 (tests, nested runtimes); a no-op
     * for the PID 1 of a namespace, which adopts them anyway. */
    if (prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) < 0)
        die("prctl(PR_SET_CHILD_SUBREAPER)");

    return supervise(&argv[first]);
}
