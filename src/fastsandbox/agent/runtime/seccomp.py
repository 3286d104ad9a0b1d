"""The default seccomp profile of every sandbox: an **allowlist**.

Why an allowlist: a denylist allows every syscall it does not name, including the ones a newer
kernel adds next year — exactly the fresh, little-reviewed kernel surface an exploit looks for.
Here a syscall not named below is refused until someone reviews it and adds it:

- a syscall the host's libseccomp knows and this profile does not allow fails with **EPERM**
  (`defaultErrnoRet`): a policy refusal, said as one (Docker does the same);
- a syscall **newer than the profile** (a number above the newest syscall it names, `futex_requeue`
  = 456 on x86_64) fails with **ENOSYS**: runc ≥ 1.0.2 puts a stub in front of the filter that
  answers ENOSYS past the newest named syscall, deliberately. We keep it: ENOSYS is what an older
  kernel says, so a newer libc in an image falls back to the older call (glibc does for clone3,
  faccessat2, fchmodat2, close_range, ...), where EPERM would make it fail (the 2021 breakage of
  faccessat2 under Docker's old profiles). Either way the call never reaches the kernel;
- `clone3` fails with ENOSYS by its own rule (below), for the same fallback.

Coverage is that of Docker's default profile (moby `profiles/seccomp/default.json`) for a
container without extra capabilities — written from the syscall tables, not copied — with these
differences, each stricter:
- Syscalls Docker allows only with a capability we never grant (CAP_SYS_ADMIN: mount, umount2,
  pivot_root, setns, unshare, sethostname, fanotify_init...; CAP_SYS_PTRACE: ptrace,
  process_vm_readv/writev, kcmp, pidfd_getfd; CAP_SYS_NICE: mbind, set_mempolicy,
  get_mempolicy, migrate_pages, move_pages; CAP_SYS_TIME, CAP_SYS_MODULE, CAP_SYS_BOOT,
  CAP_SYSLOG, CAP_SYS_RAWIO, CAP_SYS_PACCT, CAP_BPF/CAP_PERFMON) are not listed at all.
- `ptrace` is refused even though Docker allows it on kernels ≥ 4.8: a sandbox runs hostile code,
  and debuggers inside a sandbox are not a use case we serve.
- `io_uring_*` and `userfaultfd` are refused (Docker removed io_uring in 2023 for its CVE record;
  userfaultfd widens kernel race windows).
- `socket` is allowed only for AF_UNIX, AF_INET, AF_INET6 and AF_NETLINK; every other family
  (AF_PACKET, AF_VSOCK, AF_ALG, AF_KEY, AF_BLUETOOTH, ...) fails with EPERM. `socketcall` (the
  32-bit multiplexer, whose arguments live in memory seccomp cannot read) is refused by name too.
- Only the native ABI is listed (Docker lists x86, x32 / ARM as well): a syscall through any
  other ABI (`int 0x80` from a 64-bit process, a 32-bit binary, x32) **kills the thread** that
  made it (libseccomp's bad-architecture action, which runc keeps), so no 32-bit syscall
  table is reachable at all. 32-bit binaries do not run in a sandbox.
- `clone` is allowed only without namespace flags; `clone3` fails with ENOSYS (its flags live in
  memory seccomp cannot inspect), so libc falls back to `clone`.
- `personality` is allowed only for the values Docker allows (PER_LINUX, UNAME26,
  PER_LINUX32, their combination, and the query 0xffffffff): no ADDR_NO_RANDOMIZE, READ_IMPLIES_EXEC
  or other persona that weakens exploit mitigations.

A warm slot's profile (`seccomp_profile(warm=True)`) allows one more syscall, `sethostname`:
its supervisor sets the claimed sandbox's hostname itself (native/supervisor/src/hostname.rs),
from a helper that alone holds CAP_SYS_ADMIN and is gone before the user's process starts. The
seccomp filter cannot be changed once installed, so a claimed sandbox keeps that one rule; it
reads the same as a cold one's refusal: without CAP_SYS_ADMIN (which nothing in a claimed
sandbox holds) the kernel answers sethostname with EPERM, the errno this profile would give.
Nothing else CAP_SYS_ADMIN would open (mount, setns, unshare, ...) is allowed there.

Names the host's libseccomp does not know (newer than it) are skipped by runc, so the list may
name syscalls ahead of the host. gVisor (`runtime: gvisor`) enforces the OCI profile only with
runsc's `--oci-seccomp`; its own boundary is the Sentry (docs/security.md).
"""

from __future__ import annotations

import platform
from typing import Any

EPERM = 1
ENOSYS = 38

# The syscalls any ordinary program (shells, libc, Python, compilers, servers) may make.
ALLOWED_SYSCALLS: tuple[str, ...] = (
    # files and directories
    "access", "chdir", "chmod", "chown", "chown32", "close", "close_range", "copy_file_range",
    "creat", "dup", "dup2", "dup3", "faccessat", "faccessat2", "fadvise64", "fadvise64_64",
    "fallocate", "fchdir", "fchmod", "fchmodat", "fchmodat2", "fchown", "fchown32", "fchownat",
    "fcntl", "fcntl64", "fdatasync", "fgetxattr", "flistxattr", "flock", "fremovexattr",
    "fsetxattr", "fstat", "fstat64", "fstatat64", "fstatfs", "fstatfs64", "fsync", "ftruncate",
    "ftruncate64", "futimesat", "getcwd", "getdents", "getdents64", "getxattr", "lchown",
    "lchown32", "lgetxattr", "link", "linkat", "listxattr", "llistxattr", "_llseek",
    "lremovexattr", "lseek", "lsetxattr", "lstat", "lstat64", "mkdir", "mkdirat", "mknod",
    "mknodat", "newfstatat", "open", "openat", "openat2", "pread64", "preadv", "preadv2",
    "pwrite64", "pwritev", "pwritev2", "read", "readahead", "readlink", "readlinkat", "readv",
    "removexattr", "rename", "renameat", "renameat2", "rmdir", "sendfile", "sendfile64",
    "setxattr", "splice", "stat", "stat64", "statfs", "statfs64", "statx", "symlink",
    "symlinkat", "sync", "sync_file_range", "syncfs", "tee", "truncate", "truncate64", "umask",
    "unlink", "unlinkat", "utime", "utimensat", "utimensat_time64", "utimes", "vmsplice",
    "write", "writev", "chroot", "cachestat",
    # file events and readiness
    "epoll_create", "epoll_create1", "epoll_ctl", "epoll_ctl_old", "epoll_pwait",
    "epoll_pwait2", "epoll_wait", "epoll_wait_old", "eventfd", "eventfd2", "fanotify_mark",
    "inotify_add_watch", "inotify_init", "inotify_init1", "inotify_rm_watch", "poll", "ppoll",
    "ppoll_time64", "pselect6", "pselect6_time64", "select", "_newselect", "ioctl", "pipe",
    "pipe2",
    # asynchronous I/O (the classic kind; io_uring is refused)
    "io_cancel", "io_destroy", "io_getevents", "io_pgetevents", "io_pgetevents_time64",
    "io_setup", "io_submit", "ioprio_get", "ioprio_set",
    # memory
    "brk", "madvise", "membarrier", "memfd_create", "memfd_secret", "mincore", "mlock",
    "mlock2", "mlockall", "mmap", "mmap2", "mprotect", "mremap", "msync", "munlock",
    "munlockall", "munmap", "pkey_alloc", "pkey_free", "pkey_mprotect", "remap_file_pages",
    "map_shadow_stack",
    # processes, threads, signals
    "execve", "execveat", "exit", "exit_group", "fork", "vfork", "wait4", "waitid", "waitpid",
    "kill", "tkill", "tgkill", "pidfd_open", "pidfd_send_signal", "process_mrelease", "pause",
    "restart_syscall", "rseq", "rt_sigaction", "rt_sigpending", "rt_sigprocmask",
    "rt_sigqueueinfo", "rt_sigreturn", "rt_sigsuspend", "rt_sigtimedwait",
    "rt_sigtimedwait_time64", "rt_tgsigqueueinfo", "sigaltstack", "signalfd", "signalfd4",
    "sigprocmask", "sigreturn", "set_robust_list", "get_robust_list", "set_tid_address",
    "set_thread_area", "get_thread_area", "futex", "futex_time64", "futex_waitv", "futex_wake",
    "futex_wait", "futex_requeue", "prctl", "seccomp", "capget", "capset", "arch_prctl",
    "landlock_add_rule", "landlock_create_ruleset", "landlock_restrict_self",
    # identity (capabilities decide what may change)
    "getegid", "getegid32", "geteuid", "geteuid32", "getgid", "getgid32", "getgroups",
    "getgroups32", "getpgid", "getpgrp", "getpid", "getppid", "getresgid", "getresgid32",
    "getresuid", "getresuid32", "getsid", "gettid", "getuid", "getuid32", "setfsgid",
    "setfsgid32", "setfsuid", "setfsuid32", "setgid", "setgid32", "setgroups", "setgroups32",
    "setpgid", "setregid", "setregid32", "setresgid", "setresgid32", "setresuid",
    "setresuid32", "setreuid", "setreuid32", "setsid", "setuid", "setuid32",
    # scheduling and limits
    "getcpu", "getpriority", "setpriority", "getrlimit", "setrlimit", "prlimit64", "ugetrlimit",
    "getrusage", "sched_getaffinity", "sched_getattr", "sched_getparam",
    "sched_get_priority_max", "sched_get_priority_min", "sched_getscheduler",
    "sched_rr_get_interval", "sched_rr_get_interval_time64", "sched_setaffinity",
    "sched_setattr", "sched_setparam", "sched_setscheduler", "sched_yield",
    # time (reading it; setting the clock is refused)
    "alarm", "clock_getres", "clock_getres_time64", "clock_gettime", "clock_gettime64",
    "clock_nanosleep", "clock_nanosleep_time64", "getitimer", "gettimeofday", "nanosleep",
    "setitimer", "time", "timer_create", "timer_delete", "timer_getoverrun", "timer_gettime",
    "timer_gettime64", "timer_settime", "timer_settime64", "timerfd_create", "timerfd_gettime",
    "timerfd_gettime64", "timerfd_settime", "timerfd_settime64", "times",
    # sockets (`socket` itself is filtered by family below)
    "accept", "accept4", "bind", "connect", "getpeername", "getsockname", "getsockopt",
    "listen", "recv", "recvfrom", "recvmmsg", "recvmmsg_time64", "recvmsg", "send", "sendmmsg",
    "sendmsg", "sendto", "setsockopt", "shutdown", "socketpair",
    # System V and POSIX IPC (namespaced by the sandbox's IPC namespace)
    "ipc", "msgctl", "msgget", "msgrcv", "msgsnd", "semctl", "semget", "semop", "semtimedop",
    "semtimedop_time64", "shmat", "shmctl", "shmdt", "shmget", "mq_getsetattr", "mq_notify",
    "mq_open", "mq_timedreceive", "mq_timedreceive_time64", "mq_timedsend",
    "mq_timedsend_time64", "mq_unlink",
    # system information
    "getrandom", "sysinfo", "uname",
)  # fmt: skip

# Named so tests (and readers) can check they stay refused; the allowlist must never contain
# them. Not exhaustive — everything unnamed is refused as well.
REFUSED_SYSCALLS: tuple[str, ...] = (
    "init_module", "finit_module", "delete_module", "kexec_load", "kexec_file_load",
    "mount", "umount", "umount2", "pivot_root", "fsopen", "fsconfig", "fsmount", "fspick",
    "move_mount", "open_tree", "mount_setattr", "setns", "unshare", "sethostname",
    "setdomainname", "keyctl", "add_key", "request_key", "bpf", "perf_event_open",
    "userfaultfd", "io_uring_setup", "io_uring_enter", "io_uring_register", "lookup_dcookie",
    "kcmp", "syslog", "_sysctl", "sysfs", "uselib", "nfsservctl", "vhangup", "ptrace",
    "process_vm_readv", "process_vm_writev", "pidfd_getfd", "open_by_handle_at",
    "name_to_handle_at", "settimeofday", "stime", "clock_settime", "clock_settime64",
    "clock_adjtime", "clock_adjtime64", "adjtimex", "swapon", "swapoff", "reboot", "quotactl",
    "quotactl_fd", "acct", "iopl", "ioperm", "vm86", "vm86old", "modify_ldt", "mbind",
    "set_mempolicy", "get_mempolicy", "set_mempolicy_home_node", "migrate_pages", "move_pages",
    "fanotify_init", "socketcall", "personality", "clone", "clone3", "socket",
    "process_madvise",
)  # fmt: skip

# personality(2) values Docker allows: PER_LINUX, UNAME26, PER_LINUX32, UNAME26|PER_LINUX32,
# and 0xffffffff (query the current persona).
PERSONALITY_ALLOWED = (0x0, 0x0008, 0x20000, 0x20008, 0xFFFFFFFF)

SOCKET_FAMILIES = {"AF_UNIX": 1, "AF_INET": 2, "AF_INET6": 10, "AF_NETLINK": 16}

# clone(2) flags that create namespaces.
CLONE_NAMESPACE_FLAGS = {
    "CLONE_NEWNS": 0x00020000,
    "CLONE_NEWCGROUP": 0x02000000,
    "CLONE_NEWUTS": 0x04000000,
    "CLONE_NEWIPC": 0x08000000,
    "CLONE_NEWUSER": 0x10000000,
    "CLONE_NEWPID": 0x20000000,
    "CLONE_NEWNET": 0x40000000,
}
CLONE_NAMESPACE_MASK = 0
for _flag in CLONE_NAMESPACE_FLAGS.values():
    CLONE_NAMESPACE_MASK |= _flag

# The native ABI only. A syscall made through another ABI (int 0x80 or sysenter from a 64-bit
# process: the i386 table; x32; AArch32) matches no architecture of the filter, so libseccomp's
# bad-architecture action applies: SCMP_ACT_KILL_THREAD, which runc leaves as it is (its ENOSYS
# stub covers only the listed architectures). Hostile code gets no second, 32-bit syscall table
# (with `socketcall`, `ipc`, old calls the 64-bit table lacks) to slip past the rules. Listing
# one architecture also makes runc's filter compile 8-12 ms faster on every create.
_ARCHITECTURES = {
    "x86_64": ["SCMP_ARCH_X86_64"],
    "aarch64": ["SCMP_ARCH_AARCH64"],
}


def _allow_if(name: str, index: int, value: int, op: str, value_two: int = 0) -> dict[str, Any]:
    arg: dict[str, Any] = {"index": index, "value": value, "op": op}
    if op == "SCMP_CMP_MASKED_EQ":
        arg["valueTwo"] = value_two
    return {"names": [name], "action": "SCMP_ACT_ALLOW", "args": [arg]}


# What a warm slot's supervisor needs beyond a cold sandbox (see the module doc).
WARM_EXTRA_SYSCALLS: tuple[str, ...] = ("sethostname",)


def seccomp_profile(machine: str | None = None, *, warm: bool = False) -> dict[str, Any]:
    """The OCI `linux.seccomp` object: refuse (EPERM) whatever is not allowed below. `warm`:
    a warm slot's, which also allows `WARM_EXTRA_SYSCALLS`."""
    arch = machine or platform.machine()
    rules: list[dict[str, Any]] = [
        {"names": list(ALLOWED_SYSCALLS), "action": "SCMP_ACT_ALLOW"},
        {"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": ENOSYS},
        # (flags & every namespace flag) == 0
        _allow_if("clone", 0, CLONE_NAMESPACE_MASK, "SCMP_CMP_MASKED_EQ", 0),
    ]
    # Several args in one rule are AND-ed; separate rules are OR-ed: one rule per value.
    rules += [_allow_if("personality", 0, v, "SCMP_CMP_EQ") for v in PERSONALITY_ALLOWED]
    rules += [_allow_if("socket", 0, v, "SCMP_CMP_EQ") for v in SOCKET_FAMILIES.values()]
    if warm:
        rules.append({"names": list(WARM_EXTRA_SYSCALLS), "action": "SCMP_ACT_ALLOW"})
    profile: dict[str, Any] = {
        "defaultAction": "SCMP_ACT_ERRNO",
        "defaultErrnoRet": EPERM,
        "syscalls": rules,
    }
    if arch in _ARCHITECTURES:
        profile["architectures"] = list(_ARCHITECTURES[arch])
    return profile
