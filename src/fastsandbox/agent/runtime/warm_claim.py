"""What claiming a warm container changes: its limits, and its record (the OCI spec and labels
containerd keeps for it). Its hostname the supervisor sets itself (`start_main`'s `hostname`).

Why this way, with nothing done from the agent's own process to the sandbox:
- Hostname: a warm slot's PID 1 holds CAP_SYS_ADMIN only at startup, hands it to a helper and
  drops it (native/supervisor/src/hostname.rs); the helper sets the hostname at `start_main`
  and is gone before the main process starts. No host thread joins the sandbox's namespaces,
  so an agent with no capabilities at all (an agent Pod) and gVisor (whose hostname lives in
  the Sentry) claim slots as well.
- Limits: through containerd's task Update (`Tasks.Update`: the runc shim runs `runc update`
  with the cold spec's `linux.resources`), the same cgroup files runc writes at a cold create,
  by the process that owns the cgroup; skipped when the slot already has the request's limits.
  gVisor's runsc has no `update` (and the Sentry sizes itself from the spec it started with),
  so under gVisor a slot is only claimed by a create asking for exactly its limits
  (`limits_fixed`): warm slots are kept per image *and* limits there.
- Record: the container record is rewritten to exactly what a cold create would have stored
  (command, env, cwd, hostname, limits, capabilities, seccomp, labels), so recovery,
  `process_defaults` and the janitor read a claimed slot like any other sandbox.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from fastsandbox.agent.runtime.oci_spec import (
    INIT_MOUNT,
    MAX_HOSTNAME,
    WARM_CAPABILITY,
    supervisor_mode_env,
)
from fastsandbox.agent.runtime.seccomp import WARM_EXTRA_SYSCALLS


def limits_fixed(runtime: str) -> bool:
    """Whether a running sandbox's limits cannot be changed under `runtime` (gVisor)."""
    return runtime == "gvisor"


def cold_seccomp(seccomp: Mapping[str, Any]) -> dict[str, Any]:
    """A warm slot's seccomp profile as the cold one reads (without the warm-only rule)."""
    out = dict(seccomp)
    out["syscalls"] = [
        rule
        for rule in seccomp.get("syscalls") or ()
        if list(rule.get("names") or ()) != list(WARM_EXTRA_SYSCALLS)
    ]
    return out


def claimed_oci(
    oci: Mapping[str, Any],
    *,
    sandbox_id: str,
    argv: Sequence[str],
    env: Sequence[str],
    cwd: str,
    resources: Mapping[str, Any],
) -> dict[str, Any]:
    """The warm container's OCI spec rewritten to the cold spec of the sandbox: PID 1's command
    line as a cold start's, the process env (keeping PID 1's own FSB_* channel variables, which
    a cold spec carries too), cwd, hostname, limits, capabilities and seccomp profile."""
    spec = dict(oci)
    process = dict(spec.get("process") or {})
    own = [
        e
        for e in process.get("env") or ()
        if str(e).startswith("FSB_") and not str(e).startswith(("FSB_WARM=", "FSB_MAIN="))
    ]
    process["args"] = [INIT_MOUNT]
    process["env"] = [*env, *own, *supervisor_mode_env(argv, warm=False)]
    process["cwd"] = cwd or "/"
    caps = process.get("capabilities")
    if isinstance(caps, Mapping):
        process["capabilities"] = {
            k: [c for c in v if c != WARM_CAPABILITY] for k, v in caps.items()
        }
    spec["process"] = process
    spec["hostname"] = sandbox_id[:MAX_HOSTNAME]
    linux = dict(spec.get("linux") or {})
    linux["resources"] = dict(resources)
    if isinstance(linux.get("seccomp"), Mapping):
        linux["seccomp"] = cold_seccomp(linux["seccomp"])
    spec["linux"] = linux
    return spec
