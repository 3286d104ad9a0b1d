"""AppArmor for runc sandboxes, where the host has it.

A kernel with AppArmor exposes `/sys/kernel/security/apparmor`; then every runc sandbox runs
under our profile `fastsandbox-default` (`process.apparmorProfile`), loaded once per agent with
`apparmor_parser --replace`. The profile is written here, after the rules containerd's and
Docker's default profiles enforce (not copied): it is a second fence behind the masked and
read-only paths and the seccomp allowlist, for the day one of those has a hole —

- no `mount`, `umount` or `pivot_root` (seccomp refuses them too, MAC refuses them again);
- no writes to the files at the top of `/proc`, to a process's `/proc/PID/` other than the
  caller's own view, or to `/proc/sys` (except the namespaced `kernel/shm*`, `kernel/msg*`,
  `kernel/sem`);
- nothing at all on `/proc/sysrq-trigger`, `/proc/kcore`, `/proc/kmem`, `/proc/mem`,
  `/sys/firmware`, `/sys/kernel/security`; no writes anywhere under `/sys` but the cgroup tree
  (which runc mounts read-only anyway);
- signals and ptrace only within the profile (a sandbox cannot signal or trace host processes,
  which run unconfined or under other profiles); the host may signal in;
- networking, capabilities and file access otherwise as the spec allows (the capability set and
  mounts decide them).

The profile is self-contained (no `#include`), so it loads on a host without the
apparmor-profiles package. When the host has AppArmor and the profile cannot be loaded, creates
fail with the reason (`RuntimeFailure`): a sandbox never silently runs without it. gVisor
sandboxes get no AppArmor profile: runsc does not apply one (the Sentry is their boundary).

This host's kernel has no AppArmor (docs/security.md), so only the unit tests exercise it.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from fastsandbox.errors import RuntimeFailure

log = logging.getLogger(__name__)

PROFILE_NAME = "fastsandbox-default"
SECURITYFS = Path("/sys/kernel/security/apparmor")


def profile_text(name: str = PROFILE_NAME) -> str:
    """The AppArmor policy source of the sandbox profile `name`."""
    return f"""# Written by fastsandbox (agent/runtime/apparmor.py); loaded with apparmor_parser -r.
profile {name} flags=(attach_disconnected,mediate_deleted) {{
  # What the spec grants stays granted: the capability set and the mounts decide.
  network,
  capability,
  file,

  # Mount-table changes: never (seccomp refuses them too).
  deny mount,
  deny umount,
  deny pivot_root,

  # /proc: no writes to its top-level files, to other processes' entries, or to sysctls
  # beyond the IPC ones the sandbox's own IPC namespace holds.
  deny /proc/* w,
  deny /proc/{{[^1-9],[^1-9][^0-9],[^1-9s][^0-9y][^0-9s],[^1-9][^0-9][^0-9][^0-9]*}}/** w,
  deny /proc/sys/[^k]** w,
  deny /proc/sys/kernel/{{?,??,[^sm]**,s[^he]**,m[^s]**,sh[^m]**,se[^m]**,ms[^g]**}} w,
  deny /proc/sysrq-trigger rwklx,
  deny /proc/kcore rwklx,
  deny /proc/kmem rwklx,
  deny /proc/mem rwklx,

  # /sys: firmware and the security filesystem not at all; no writes outside the cgroup tree.
  deny /sys/firmware/** rwklx,
  deny /sys/kernel/security/** rwklx,
  deny /sys/[^f]*/** wklx,
  deny /sys/f[^s]*/** wklx,
  deny /sys/fs/[^c]*/** wklx,
  deny /sys/fs/c[^g]*/** wklx,
  deny /sys/fs/cg[^r]*/** wklx,

  # Signals and ptrace stay inside the profile; the host (unconfined) may signal in.
  signal (receive) peer=unconfined,
  signal (send, receive) peer={name},
  ptrace (trace, read, tracedby, readby) peer={name},
}}
"""


def host_has_apparmor(securityfs: Path = SECURITYFS) -> bool:
    """Whether the running kernel enforces AppArmor (its securityfs directory exists)."""
    return securityfs.is_dir()


def is_loaded(name: str, securityfs: Path = SECURITYFS) -> bool:
    """Whether profile `name` is loaded (`profiles` lists "NAME (MODE)" per line)."""
    try:
        lines = (securityfs / "profiles").read_text().splitlines()
    except OSError:
        return False
    return any(line.rsplit(" (", 1)[0] == name for line in lines)


Runner = Callable[[Sequence[str]], subprocess.CompletedProcess[str]]


def _run(argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, check=False, timeout=60)


def load_profile(
    name: str = PROFILE_NAME,
    *,
    securityfs: Path = SECURITYFS,
    parser: str = "apparmor_parser",
    run: Runner = _run,
) -> None:
    """Load (or replace) profile `name` into the kernel; `RuntimeFailure` with the reason."""
    binary = shutil.which(parser) or (parser if Path(parser).is_absolute() else None)
    if binary is None:
        raise RuntimeFailure(
            f"this host enforces AppArmor ({securityfs} exists) but {parser} is not installed "
            "(apt-get install apparmor): sandboxes are not started without their profile"
        )
    with tempfile.NamedTemporaryFile("w", suffix=".apparmor", delete=False) as f:
        f.write(profile_text(name))
        source = Path(f.name)
    try:
        # -r: replace a loaded profile of that name; -K: no cache, the text is ours and tiny.
        done = run([binary, "-r", "-K", str(source)])
    finally:
        source.unlink(missing_ok=True)
    if done.returncode != 0:
        raise RuntimeFailure(
            f"loading AppArmor profile {name} failed ({binary} exited {done.returncode}): "
            f"{done.stderr.strip()[-2000:]}"
        )
    if not is_loaded(name, securityfs):
        raise RuntimeFailure(
            f"{binary} loaded AppArmor profile {name} but {securityfs / 'profiles'} does not "
            "list it"
        )
    log.info("loaded AppArmor profile", extra={"profile": name})


class AppArmor:
    """The profile runc sandboxes get on this host: loaded on first use, None without AppArmor."""

    def __init__(
        self,
        name: str = PROFILE_NAME,
        *,
        securityfs: Path = SECURITYFS,
        parser: str = "apparmor_parser",
        run: Runner = _run,
    ) -> None:
        self.name = name
        self.securityfs = securityfs
        self.parser = parser
        self._run = run
        self._loaded = False
        self._enabled: bool | None = None

    def enabled(self) -> bool:
        """Whether the host enforces AppArmor (looked up once: a kernel does not gain it)."""
        if self._enabled is None:
            self._enabled = host_has_apparmor(self.securityfs)
        return self._enabled

    def pending(self, runtime: str) -> bool:
        """Whether `profile_for(runtime)` would load the profile first (a subprocess: callers
        on an event loop run it in a thread)."""
        return runtime == "runc" and self.enabled() and not self._loaded

    def profile_for(self, runtime: str) -> str | None:
        """The `process.apparmorProfile` for a sandbox of `runtime` (loading it if needed)."""
        if runtime != "runc" or not self.enabled():
            return None
        if not self._loaded:
            # Loaded on every agent start, not only when missing: an older agent's text of the
            # same name is replaced by this one.
            load_profile(self.name, securityfs=self.securityfs, parser=self.parser, run=self._run)
            self._loaded = True
        return self.name
