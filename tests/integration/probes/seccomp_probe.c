/* Probes what the sandbox's seccomp profile allows, from inside a real container.
 * Prints one line per probe: "<name> <errno>" (0 = the call succeeded), then "done".
 * Each refused probe is a call that succeeds (or fails with another errno) without the filter,
 * so EPERM proves the profile, not a missing capability. */
#define _GNU_SOURCE
#include <errno.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

static void report(const char *name, long rc)
{
    printf("%s %d\n", name, rc == -1 ? errno : 0);
    fflush(stdout);
}

static long sock(int family, int type)
{
    long fd = socket(family, type, 0);
    if (fd >= 0)
        close((int)fd);
    return fd < 0 ? -1 : 0;
}

int main(void)
{
    report("set_mempolicy", syscall(SYS_set_mempolicy, 0 /* MPOL_DEFAULT */, NULL, 0));
    report("personality_addr_no_randomize", syscall(SYS_personality, 0x0040000));
    report("personality_query", syscall(SYS_personality, 0xffffffffUL) == -1 ? -1 : 0);
    report("unshare_newuser", syscall(SYS_unshare, CLONE_NEWUSER));
    /* setxattrat (463, Linux 6.13): newer than the profile. Unfiltered, fd -1 gives EBADF. */
    report("syscall_463", syscall(463, -1, NULL, 0, NULL, NULL, 0));
    report("io_uring_setup", syscall(SYS_io_uring_setup, 1, NULL));
    report("ptrace_traceme", syscall(SYS_ptrace, 0 /* PTRACE_TRACEME */, 0, 0, 0));
    report("clone_newns", syscall(SYS_clone, CLONE_NEWNS | SIGCHLD, 0, 0, 0, 0));
    report("socket_vsock", sock(40 /* AF_VSOCK */, SOCK_STREAM));
    report("socket_alg", sock(38 /* AF_ALG */, SOCK_SEQPACKET));
    report("socket_inet", sock(AF_INET, SOCK_STREAM));
    report("socket_unix", sock(AF_UNIX, SOCK_STREAM));
    pid_t child = fork();
    if (child == 0) {
        execl("/bin/true", "true", (char *)NULL);
        _exit(127);
    }
    int status = 0;
    long rc = child < 0 ? -1 : waitpid(child, &status, 0);
    report("fork_exec_true", rc < 0 || !WIFEXITED(status) || WEXITSTATUS(status) ? -1 : 0);
    puts("done");
    return 0;
}
