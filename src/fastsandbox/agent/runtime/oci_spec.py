"""The OCI runtime spec of a sandbox: containerd's defaults, made secure by default.

Reference: `ctr oci spec` (containerd 1.6) for mounts, masked/readonly paths and namespaces.
Where we differ, and why:

- Capabilities: containerd's default list minus NET_RAW (raw sockets: ARP/ICMP spoofing inside a
  shared network namespace), MKNOD (device nodes), AUDIT_WRITE and SETFCAP (file capabilities
  that would outlive the sandbox's own limits). Untrusted code gets what ordinary programs need.
- `noNewPrivileges`: setuid binaries in an image cannot regain dropped privileges.
- Seccomp is a *denylist* (default action ALLOW; listed syscalls fail with EPERM). An allowlist
  like Docker's is stricter but is a few hundred names that must track the kernel and libc; the
  denylist blocks the same dangerous families Docker's profile blocks — kernel modules and kexec,
  the mount APIs and pivot_root, namespaces (setns, unshare, clone with CLONE_NEW* flags),
  keyrings, bpf, perf, ptrace and cross-process memory access, userfaultfd, io_uring, clock and
  swap control, raw I/O ports, quotas, reboot, accounting — so a sandbox cannot reach kernel
  surface that ordinary programs never use. clone3 gets ENOSYS (its flags live in memory that
  seccomp cannot inspect) so libc falls back to clone, whose flags we can check.
- Limits (`linux_resources`): CPU quota from millicores (period 100 ms) plus shares, a memory
  limit with no swap beyond it (so the OOM killer, not paging, ends a hog), and a pids limit so
  a fork bomb stays inside its sandbox.
- Namespaces: new pid, ipc, uts and mount namespaces; the network namespace is the agent's (a
  path) or the host's when none is given, because sandboxes share their agent's IP by design.

`build_oci_spec` is a pure function: no I/O, so the security properties are unit-tested.
"""

from __future__ import annotations

import platform
from collections.abc import Mapping, Sequence
from typing import Any

OCI_VERSION = "1.0.2-dev"

CTR_DEFAULT_CAPABILITIES = (
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
)
DROPPED_CAPABILITIES = frozenset({"CAP_NET_RAW", "CAP_MKNOD", "CAP_AUDIT_WRITE", "CAP_SETFCAP"})
DEFAULT_CAPABILITIES = tuple(c for c in CTR_DEFAULT_CAPABILITIES if c not in DROPPED_CAPABILITIES)

DEFAULT_PIDS_LIMIT = 1024
# containerd's default open-files limit. A container cannot raise it above the shim's own hard
# limit (it is set after capabilities are dropped), so a larger default fails on some hosts.
DEFAULT_NOFILE = 1024
CPU_PERIOD_US = 100_000
# runc refuses quotas under 1 ms per period.
MIN_CPU_QUOTA_US = 1_000
CPU_SHARES_PER_CPU = 1024
MIN_CPU_SHARES = 2
MAX_HOSTNAME = 63
EPERM = 1
ENOSYS = 38

DENIED_SYSCALLS = (
    # kernel modules and replacing the kernel
    "init_module",
    "finit_module",
    "delete_module",
    "create_module",
    "get_kernel_syms",
    "query_module",
    "kexec_load",
    "kexec_file_load",
    # filesystems and the root: the classic mount API, the new one, pivot_root
    "mount",
    "umount",
    "umount2",
    "pivot_root",
    "fsopen",
    "fsconfig",
    "fsmount",
    "fspick",
    "move_mount",
    "open_tree",
    "mount_setattr",
    # namespaces
    "setns",
    "unshare",
    # kernel keyrings (not namespaced)
    "keyctl",
    "add_key",
    "request_key",
    # kernel attack surface and introspection
    "bpf",
    "perf_event_open",
    "userfaultfd",
    "io_uring_setup",
    "io_uring_enter",
    "io_uring_register",
    "lookup_dcookie",
    "kcmp",
    "syslog",
    "_sysctl",
    "sysfs",
    "uselib",
    "nfsservctl",
    "vhangup",
    # other processes' memory and file handles that bypass path checks
    "ptrace",
    "process_vm_readv",
    "process_vm_writev",
    "open_by_handle_at",
    "name_to_handle_at",
    # the host's clock, swap, power, quotas, accounting, raw I/O
    "settimeofday",
    "stime",
    "clock_settime",
    "clock_settime64",
    "clock_adjtime",
    "clock_adjtime64",
    "adjtimex",
    "swapon",
    "swapoff",
    "reboot",
    "quotactl",
    "quotactl_fd",
    "acct",
    "iopl",
    "ioperm",
    "vm86",
    "vm86old",
)

# clone(2) flags that create namespaces; each one gets its own rule (rules are OR-ed, and seccomp
# has no "masked not equal").
CLONE_NAMESPACE_FLAGS = {
    "CLONE_NEWNS": 0x00020000,
    "CLONE_NEWCGROUP": 0x02000000,
    "CLONE_NEWUTS": 0x04000000,
    "CLONE_NEWIPC": 0x08000000,
    "CLONE_NEWUSER": 0x10000000,
    "CLONE_NEWPID": 0x20000000,
    "CLONE_NEWNET": 0x40000000,
}

_SECCOMP_ARCHES = {
    "x86_64": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
    "aarch64": ["SCMP_ARCH_AARCH64", "SCMP_ARCH_ARM"],
}

MASKED_PATHS = (
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
)
READONLY_PATHS = ("/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger")


def default_mounts() -> list[dict[str, Any]]:
    """containerd's default mounts (`ctr oci spec`)."""
    return [
        {"destination": "/proc", "type": "proc", "source": "proc",
         "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
         "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
        {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
         "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
        {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
         "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
        {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
         "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/sys", "type": "sysfs", "source": "sysfs",
         "options": ["nosuid", "noexec", "nodev", "ro"]},
        {"destination": "/run", "type": "tmpfs", "source": "tmpfs",
         "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
    ]  # fmt: skip


def seccomp_profile(machine: str | None = None) -> dict[str, Any]:
    """The default seccomp profile: allow everything except `DENIED_SYSCALLS` (EPERM), clone
    with namespace flags (EPERM) and clone3 (ENOSYS, so libc falls back to clone)."""
    arch = machine or platform.machine()
    rules: list[dict[str, Any]] = [
        {"names": list(DENIED_SYSCALLS), "action": "SCMP_ACT_ERRNO", "errnoRet": EPERM},
        {"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": ENOSYS},
    ]
    for flag in CLONE_NAMESPACE_FLAGS.values():
        rules.append(
            {
                "names": ["clone"],
                "action": "SCMP_ACT_ERRNO",
                "errnoRet": EPERM,
                "args": [{"index": 0, "value": flag, "valueTwo": flag, "op": "SCMP_CMP_MASKED_EQ"}],
            }
        )
    profile: dict[str, Any] = {"defaultAction": "SCMP_ACT_ALLOW", "syscalls": rules}
    if arch in _SECCOMP_ARCHES:
        profile["architectures"] = list(_SECCOMP_ARCHES[arch])
    return profile


INIT_MOUNT = "/.fsb/init"


def cpu_quota_us(cpu_millis: int) -> int:
    """Millicores → CFS quota per `CPU_PERIOD_US` (1000m = one CPU = 100 ms per 100 ms)."""
    return max(MIN_CPU_QUOTA_US, cpu_millis * CPU_PERIOD_US // 1000)


def cpu_shares(cpu_millis: int) -> int:
    """Millicores → cgroup v1 `cpu.shares` (1024 per CPU, the kernel's minimum is 2). Under
    contention shares divide the CPU in proportion; the quota caps it even when idle. runc maps
    shares to cgroup v2's `cpu.weight` itself."""
    return max(MIN_CPU_SHARES, cpu_millis * CPU_SHARES_PER_CPU // 1000)


def linux_resources(
    cpu_millis: int | None, memory_bytes: int | None, pids_limit: int
) -> dict[str, Any]:
    """The cgroup limits (`linux.resources`), the same for cgroup v1 and v2 (runc translates).

    - pids: always set; `pids_limit <= 0` is a caller error, never "unlimited".
    - memory: `swap` equal to `limit` (OCI's swap is memory + swap), so a sandbox cannot page
      its way past the limit: at the limit the kernel's OOM killer ends it (v1
      `memory.memsw.limit_in_bytes`, v2 `memory.swap.max = 0`).
    - cpu: a CFS quota per `CPU_PERIOD_US` and shares in proportion.
    None (or 0) for cpu/memory leaves that controller to the parent cgroup (the agent's).
    """
    if pids_limit <= 0:
        raise ValueError(f"pids limit must be positive, not {pids_limit}")
    resources: dict[str, Any] = {
        "devices": [{"allow": False, "access": "rwm"}],
        "pids": {"limit": pids_limit},
    }
    if cpu_millis is not None and cpu_millis > 0:
        resources["cpu"] = {
            "quota": cpu_quota_us(cpu_millis),
            "period": CPU_PERIOD_US,
            "shares": cpu_shares(cpu_millis),
        }
    if memory_bytes is not None and memory_bytes > 0:
        resources["memory"] = {"limit": memory_bytes, "swap": memory_bytes}
    return resources


def build_oci_spec(
    *,
    container_id: str,
    args: Sequence[str],
    env: Sequence[str],
    cwd: str,
    cgroups_path: str,
    uid: int = 0,
    gid: int = 0,
    additional_gids: Sequence[int] = (),
    netns_path: str | None = None,
    cpu_millis: int | None = None,
    memory_bytes: int | None = None,
    pids_limit: int = DEFAULT_PIDS_LIMIT,
    nofile: int = DEFAULT_NOFILE,
    capabilities: Sequence[str] = DEFAULT_CAPABILITIES,
    annotations: Mapping[str, str] | None = None,
    machine: str | None = None,
    init_path: str | None = None,
) -> dict[str, Any]:
    """The runtime spec (as JSON-ready dict) for one sandbox container. With `init_path`, the
    static `fsb-init` is bind-mounted read-only at `INIT_MOUNT` and runs as PID 1 in front of
    `args`, forwarding signals and reaping zombies."""
    if not args:
        raise ValueError("a container needs a command: the spec and the image give none")
    mounts = default_mounts()
    if init_path:
        mounts.append(
            {
                "destination": INIT_MOUNT,
                "type": "bind",
                "source": init_path,
                "options": ["rbind", "ro", "nosuid", "nodev"],
            }
        )
        args = [INIT_MOUNT, "--", *args]
    user: dict[str, Any] = {"uid": uid, "gid": gid}
    if additional_gids:
        user["additionalGids"] = list(additional_gids)
    caps = list(capabilities)
    resources = linux_resources(cpu_millis, memory_bytes, pids_limit)
    namespaces: list[dict[str, str]] = [
        {"type": "pid"},
        {"type": "ipc"},
        {"type": "uts"},
        {"type": "mount"},
    ]
    if netns_path:
        namespaces.append({"type": "network", "path": netns_path})
    spec: dict[str, Any] = {
        "ociVersion": OCI_VERSION,
        "process": {
            "terminal": False,
            "user": user,
            "args": list(args),
            "env": list(env),
            "cwd": cwd or "/",
            "capabilities": {"bounding": caps, "effective": caps, "permitted": caps},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": nofile, "soft": nofile}],
            "noNewPrivileges": True,
        },
        "root": {"path": "rootfs", "readonly": False},
        "hostname": container_id[:MAX_HOSTNAME],
        "mounts": mounts,
        "linux": {
            "resources": resources,
            "cgroupsPath": cgroups_path,
            "namespaces": namespaces,
            "seccomp": seccomp_profile(machine),
            "maskedPaths": list(MASKED_PATHS),
            "readonlyPaths": list(READONLY_PATHS),
        },
    }
    if annotations:
        spec["annotations"] = dict(annotations)
    return spec
