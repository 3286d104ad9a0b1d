"""The OCI runtime spec of a sandbox: containerd's defaults, made secure by default.

Reference: `ctr oci spec` (containerd 1.6) for mounts, masked/readonly paths and namespaces.
Where we differ, and why:

- Capabilities: containerd's default list minus NET_RAW (raw sockets: ARP/ICMP spoofing inside a
  shared network namespace), MKNOD (device nodes), AUDIT_WRITE and SETFCAP (file capabilities
  that would outlive the sandbox's own limits). Untrusted code gets what ordinary programs need.
- A warm slot (`warm=True`) also gives PID 1 CAP_SYS_ADMIN (bounding, effective, permitted;
  never inheritable or ambient) and its seccomp profile `sethostname`: the supervisor hands
  both to a helper at startup and drops the capability from its own sets for good, and the
  helper sets the claimed sandbox's hostname and is gone before the user's process starts
  (native/supervisor/src/hostname.rs). A claimed slot then holds a cold sandbox's sets.
- `noNewPrivileges`: setuid binaries in an image cannot regain dropped privileges.
- Seccomp is an allowlist (`seccomp.py`): what ordinary programs need, Docker's coverage;
  every other syscall, including ones newer than the profile, fails with EPERM.
- Limits (`linux_resources`): CPU quota from millicores (period 100 ms) plus shares, a memory
  limit with no swap beyond it (so the OOM killer, not paging, ends a hog), and a pids limit so
  a fork bomb stays inside its sandbox.
- AppArmor (`apparmor_profile`, set by the runtime where the host has AppArmor): our
  `fastsandbox-default` profile, a second fence behind the masked paths and seccomp.
- Namespaces: new pid, ipc, uts and mount namespaces; the network namespace is the agent's (a
  path) or the host's when none is given, because sandboxes share their agent's IP by design.

`build_oci_spec` is a pure function: no I/O, so the security properties are unit-tested.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from fastsandbox.agent.runtime.seccomp import seccomp_profile

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
# Given to a warm slot's PID 1 only, for the hostname (module doc); dropped before any claim.
WARM_CAPABILITY = "CAP_SYS_ADMIN"

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


INIT_MOUNT = "/.fsb/init"


def supervisor_mode_env(argv: Sequence[str], *, warm: bool) -> list[str]:
    """How PID 1 learns its main command (`FSB_MAIN`, a JSON list) or that it waits for one
    (`FSB_WARM=1`): in its environment, which sandbox code cannot read, not on its command
    line, which it can (/proc/1/cmdline): so a warm and a cold sandbox look the same there."""
    if warm:
        return ["FSB_WARM=1"]
    return [f"FSB_MAIN={json.dumps(list(argv))}"] if argv else []


CHANNEL_MOUNT = "/.fsb/run"


def cpu_quota_us(cpu_millis: int) -> int:
    """Millicores → CFS quota per `CPU_PERIOD_US` (1000m = one CPU = 100 ms per 100 ms)."""
    return max(MIN_CPU_QUOTA_US, cpu_millis * CPU_PERIOD_US // 1000)


def cpu_shares(cpu_millis: int) -> int:
    """Millicores → cgroup v1 `cpu.shares` (1024 per CPU, the kernel's minimum is 2). Under
    contention shares divide the CPU in proportion; the quota caps it even when idle. runc maps
    shares to cgroup v2's `cpu.weight` itself."""
    return max(MIN_CPU_SHARES, cpu_millis * CPU_SHARES_PER_CPU // 1000)


# gVisor (runsc, ptrace platform): the host pids cgroup holds the Sentry, the gofer and a
# ptrace stub per guest process with its threads — measured here, 300 guest `sleep`s held 2318
# host pids (~7.7 each). A guest limit of N processes therefore needs a host limit near 8·N plus
# the Sentry's own threads, or the Sentry cannot start its next thread and the whole sandbox
# dies long before its processes reach N.
GVISOR_PIDS_PER_PROCESS = 8
GVISOR_PIDS_BASE = 128


def host_pids_limit(pids_limit: int, runtime: str) -> int:
    """The host cgroup's pids limit for a sandbox whose processes may number `pids_limit`."""
    if runtime == "gvisor":
        return pids_limit * GVISOR_PIDS_PER_PROCESS + GVISOR_PIDS_BASE
    return pids_limit


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
    netns_hook: Sequence[str] = (),
    cpu_millis: int | None = None,
    memory_bytes: int | None = None,
    pids_limit: int = DEFAULT_PIDS_LIMIT,
    nofile: int = DEFAULT_NOFILE,
    capabilities: Sequence[str] = DEFAULT_CAPABILITIES,
    annotations: Mapping[str, str] | None = None,
    machine: str | None = None,
    init_path: str | None = None,
    channel_dir: str | None = None,
    init_env: Sequence[str] = (),
    warm: bool = False,
    apparmor_profile: str | None = None,
) -> dict[str, Any]:
    """The runtime spec (as JSON-ready dict) for one sandbox container. With `init_path`, the
    static supervisor is bind-mounted read-only at `INIT_MOUNT` and runs as PID 1 in front of
    `args` (with no args it keeps the sandbox up, idle); with `channel_dir` too, that directory
    is mounted read-only at `CHANNEL_MOUNT` and `init_env` (which PID 1 scrubs from every
    child) tells the supervisor how to dial its agent. `warm`: PID 1 is `--warm` (no main
    process until the agent's `start_main`; `args` are ignored)."""
    if warm and not (init_path and channel_dir):
        raise ValueError("a warm container needs the supervisor and its channel")
    if not args and not init_path:
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
        if channel_dir:
            # Read-only: connecting to a socket needs no write access, and sandbox code must
            # not replace the socket with its own.
            mounts.append(
                {
                    "destination": CHANNEL_MOUNT,
                    "type": "bind",
                    "source": channel_dir,
                    "options": ["rbind", "ro", "nosuid", "nodev", "noexec"],
                }
            )
            env = [*env, *init_env]
        env = [*env, *supervisor_mode_env(args, warm=warm)]
        args = [INIT_MOUNT]
    user: dict[str, Any] = {"uid": uid, "gid": gid}
    if additional_gids:
        user["additionalGids"] = list(additional_gids)
    caps = list(capabilities)
    process_caps: dict[str, list[str]] = {"bounding": caps, "effective": caps, "permitted": caps}
    if warm and WARM_CAPABILITY not in caps:
        pid1 = [*caps, WARM_CAPABILITY]
        process_caps = {"bounding": pid1, "effective": pid1, "permitted": pid1}
    resources = linux_resources(cpu_millis, memory_bytes, pids_limit)
    namespaces: list[dict[str, str]] = [
        {"type": "pid"},
        {"type": "ipc"},
        {"type": "uts"},
        {"type": "mount"},
    ]
    if netns_path and netns_hook:
        raise ValueError("a container joins a network namespace or has one wired by a hook")
    if netns_path:
        namespaces.append({"type": "network", "path": netns_path})
    elif netns_hook:
        # A namespace of its own, made by runc; the hook wires it before the process starts.
        namespaces.append({"type": "network"})
    spec: dict[str, Any] = {
        "ociVersion": OCI_VERSION,
        "process": {
            "terminal": False,
            "user": user,
            "args": list(args),
            "env": list(env),
            "cwd": cwd or "/",
            "capabilities": process_caps,
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
            "seccomp": seccomp_profile(machine, warm=warm),
            "maskedPaths": list(MASKED_PATHS),
            "readonlyPaths": list(READONLY_PATHS),
        },
    }
    if apparmor_profile:
        # Only where the host enforces AppArmor (apparmor.py): runc refuses a profile on a
        # kernel without it.
        spec["process"]["apparmorProfile"] = apparmor_profile
    if annotations:
        spec["annotations"] = dict(annotations)
    if netns_hook:
        spec["hooks"] = {"createRuntime": [network_hook(netns_hook)]}
    return spec


HOOK_PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
HOOK_TIMEOUT_SECONDS = 10


def network_hook(argv: Sequence[str]) -> dict[str, Any]:
    """The OCI hook entry running `argv` (argv[0] is an absolute host path). Its own PATH:
    runc would otherwise hand it the shim's environment, whatever that is on the node."""
    if not argv or not argv[0].startswith("/"):
        raise ValueError(f"a hook needs an absolute path: {list(argv)!r}")
    return {
        "path": argv[0],
        "args": list(argv),
        "env": [HOOK_PATH_ENV],
        "timeout": HOOK_TIMEOUT_SECONDS,
    }
