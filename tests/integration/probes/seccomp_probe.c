/* Probes a sandbox's confinement from inside a real container: what the seccomp profile allows,
 * the process's privileges, and the masked and read-only paths named on the command line.
 *
 * Prints one line per probe, then "done":
 *   sys <name> <errno>        a syscall (0 = it succeeded)
 *   status <field> <value>    a line of /proc/self/status (Seccomp, NoNewPrivs, Cap*)
 *   nnp <value>               prctl(PR_GET_NO_NEW_PRIVS)
 *   masked <path> null|tmpfs|real|absent   what is mounted over the path
 *   readable <path> <n>       bytes readable from a file (-errno when unreadable) / entries in a directory
 *   ro <path> <0|1>|absent    whether the mount holding <path> is read-only (statvfs)
 *   wopen <path> <errno>      open(O_WRONLY), closed without writing (ENOENT: absent)
 *   create <path> <errno>     creating a new file (removed again when it worked)
 *   compat int80 ok|sigsys|err<N>|n/a   a 32-bit syscall (`int 0x80`, i386 getpid) made by a
 *                             child of this 64-bit process: it returned the pid, the child was
 *                             killed by SIGSYS, or it returned -N (n/a: not x86_64)
 *
 * Each refused syscall probe is a call that succeeds (or fails with another errno) without the
 * filter, so EPERM/ENOSYS proves the profile, not a missing capability; the test runs this same
 * probe unconfined to show every check can fail. Nothing here writes into a host file. */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/statvfs.h>
#include <sys/sysmacros.h>
#include <linux/magic.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

static void report(const char *name, long rc)
{
    printf("sys %s %d\n", name, rc == -1 ? errno : 0);
    fflush(stdout);
}

static long sock(int family, int type)
{
    long fd = socket(family, type, 0);
    if (fd >= 0)
        close((int)fd);
    return fd < 0 ? -1 : 0;
}

/* A child made by a raw clone/clone3 exits at once; the parent reaps it. */
static long reap(long pid)
{
    if (pid == 0)
        _exit(0);
    if (pid > 0)
        waitpid((pid_t)pid, NULL, 0);
    return pid < 0 ? -1 : 0;
}

struct clone_args_v0 {
    uint64_t flags, pidfd, child_tid, parent_tid, exit_signal, stack, stack_size, tls;
};

static void *thread_main(void *arg)
{
    return arg;
}

static void status_lines(void)
{
    static const char *fields[] = {"Seccomp:", "NoNewPrivs:", "CapInh:", "CapPrm:", "CapEff:",
                                   "CapBnd:", "CapAmb:"};
    char line[256];
    FILE *f = fopen("/proc/self/status", "r");
    if (!f)
        return;
    while (fgets(line, sizeof line, f)) {
        for (size_t i = 0; i < sizeof fields / sizeof *fields; i++) {
            size_t n = strlen(fields[i]);
            if (strncmp(line, fields[i], n) == 0) {
                char value[128] = "";
                sscanf(line + n, "%127s", value);
                printf("status %.*s %s\n", (int)(n - 1), fields[i], value);
            }
        }
    }
    fclose(f);
}

static void masked(const char *path)
{
    struct stat st;
    if (stat(path, &st) != 0) {
        printf("masked %s absent\n", path);
        return;
    }
    long n = 0;
    if (S_ISDIR(st.st_mode)) {
        DIR *d = opendir(path);
        struct dirent *e;
        while (d && (e = readdir(d)))
            n += strcmp(e->d_name, ".") && strcmp(e->d_name, "..");
        if (d)
            closedir(d);
    } else {
        char buf[64];
        int fd = open(path, O_RDONLY);
        long got = fd < 0 ? -1 : read(fd, buf, sizeof buf);
        n = got >= 0 ? got : -errno;
        if (fd >= 0)
            close(fd);
    }
    /* What is mounted over it: runc masks a file with /dev/null (char 1:3) and a directory
     * with a read-only tmpfs; "real" = the kernel's own file. */
    struct statfs fs;
    const char *over = "real";
    if (S_ISCHR(st.st_mode) && major(st.st_rdev) == 1 && minor(st.st_rdev) == 3)
        over = "null";
    else if (S_ISDIR(st.st_mode) && statfs(path, &fs) == 0 && fs.f_type == TMPFS_MAGIC)
        over = "tmpfs";
    printf("masked %s %s\n", path, over);
    printf("readable %s %ld\n", path, n);
}

/* A syscall through the i386 ABI from a 64-bit process, in a child (a seccomp kill takes
 * only the thread that made it, here the child's only one). Unfiltered, on a kernel with
 * IA32 emulation, it returns the child's pid. */
static void compat_int80(void)
{
#if defined(__x86_64__)
    pid_t pid = fork();
    if (pid == 0) {
        long rc = 20; /* __NR_getpid in the i386 table */
        __asm__ volatile("int $0x80" : "+a"(rc) : : "memory");
        _exit(rc > 0 ? 0 : (int)(-rc & 0x7f));
    }
    int status = 0;
    if (pid < 0 || waitpid(pid, &status, 0) < 0)
        printf("compat int80 err%d\n", errno);
    else if (WIFSIGNALED(status) && WTERMSIG(status) == SIGSYS)
        puts("compat int80 sigsys");
    else if (WIFEXITED(status) && WEXITSTATUS(status) == 0)
        puts("compat int80 ok");
    else
        printf("compat int80 err%d\n", WIFEXITED(status) ? WEXITSTATUS(status) : -1);
#else
    puts("compat int80 n/a");
#endif
    fflush(stdout);
}

int main(int argc, char **argv)
{
    report("set_mempolicy", syscall(SYS_set_mempolicy, 0 /* MPOL_DEFAULT */, NULL, 0));
    report("personality_addr_no_randomize", syscall(SYS_personality, 0x0040000));
    report("personality_query", syscall(SYS_personality, 0xffffffffUL) == -1 ? -1 : 0);
    report("unshare_newuser", syscall(SYS_unshare, CLONE_NEWUSER));
    /* setxattrat (463, Linux 6.13): newer than the profile. Unfiltered, fd -1 gives EBADF. */
    report("syscall_463", syscall(463, -1, NULL, 0, NULL, NULL, 0));
    /* clone3 with valid arguments: unfiltered it makes a child. */
    struct clone_args_v0 ca = {.exit_signal = SIGCHLD};
    report("clone3", reap(syscall(SYS_clone3, &ca, sizeof ca)));
    /* process_madvise (440): older than the profile's newest syscall, not allowed: EPERM.
     * Unfiltered, pidfd -1 gives EBADF. */
    report("process_madvise", syscall(SYS_process_madvise, -1, NULL, 0, 0, 0));
    report("io_uring_setup", syscall(SYS_io_uring_setup, 1, NULL));
    /* PTRACE_PEEKDATA on a process we do not trace: ESRCH unfiltered. (Not PTRACE_TRACEME:
     * unconfined, that would make PID 1 our tracer and stop us at the next signal.) */
    report("ptrace_peek", syscall(SYS_ptrace, 2 /* PTRACE_PEEKDATA */, getppid(), 0, 0));
    report("clone_newns", reap(syscall(SYS_clone, CLONE_NEWNS | SIGCHLD, 0, 0, 0, 0)));
    report("socket_vsock", sock(40 /* AF_VSOCK */, SOCK_STREAM));
    report("socket_alg", sock(38 /* AF_ALG */, SOCK_SEQPACKET));
    report("socket_key", sock(15 /* AF_KEY */, SOCK_RAW));
    /* A key in the container's own session keyring (runc makes one per container): refused
     * confined; unconfined it is what makes the masked /proc/keys show something. */
    report("add_key", syscall(SYS_add_key, "user", "fsb-probe", "x", 1, -3 /* session */));
    report("socket_inet", sock(AF_INET, SOCK_STREAM));
    report("socket_unix", sock(AF_UNIX, SOCK_STREAM));
    /* glibc ≥ 2.34 starts threads with clone3 and falls back to clone on ENOSYS only. */
    pthread_t thread;
    int err = pthread_create(&thread, NULL, thread_main, NULL);
    if (err == 0)
        pthread_join(thread, NULL);
    errno = err;
    report("pthread_create", err ? -1 : 0);
    pid_t child = fork();
    if (child == 0) {
        execl("/bin/true", "true", (char *)NULL);
        _exit(127);
    }
    int status = 0;
    long rc = child < 0 ? -1 : waitpid(child, &status, 0);
    report("fork_exec_true", rc < 0 || !WIFEXITED(status) || WEXITSTATUS(status) ? -1 : 0);

    compat_int80();
    status_lines();
    printf("nnp %d\n", prctl(PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0));

    const char *mode = "";
    for (int i = 1; i < argc; i++) {
        const char *arg = argv[i];
        if (strncmp(arg, "--", 2) == 0) {
            mode = arg + 2;
        } else if (strcmp(mode, "masked") == 0) {
            masked(arg);
        } else if (strcmp(mode, "ro") == 0) {
            struct statvfs vfs;
            if (statvfs(arg, &vfs) != 0)
                printf("ro %s absent\n", arg);
            else
                printf("ro %s %d\n", arg, vfs.f_flag & ST_RDONLY ? 1 : 0);
        } else if (strcmp(mode, "wopen") == 0) {
            int fd = open(arg, O_WRONLY);
            printf("wopen %s %d\n", arg, fd < 0 ? errno : 0);
            if (fd >= 0)
                close(fd);
        } else if (strcmp(mode, "create") == 0) {
            int fd = open(arg, O_WRONLY | O_CREAT | O_EXCL, 0600);
            printf("create %s %d\n", arg, fd < 0 ? errno : 0);
            if (fd >= 0) {
                close(fd);
                unlink(arg);
            }
        }
    }
    puts("done");
    return 0;
}
