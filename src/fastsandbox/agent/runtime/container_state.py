"""A container's state as containerd records it, read into the `Runtime`'s terms: its status,
exit and why it ended (`state_of`), what a later process in it inherits (`process_defaults_of`),
and the label filter that lists ours (`label_selector`)."""

from __future__ import annotations

import json
import signal
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fastsandbox.agent.runtime.base import ContainerState, ContainerStatus, ProcessDefaults
from fastsandbox.api._proto.fastsandbox.v1 import containerd_subset_pb2 as pb

SIGKILL_EXIT = 128 + signal.SIGKILL
CGROUP_ROOT = Path("/sys/fs/cgroup")

_TASK_STATUS = {
    pb.CTD_TASK_STATUS_CREATED: ContainerStatus.CREATED,
    pb.CTD_TASK_STATUS_RUNNING: ContainerStatus.RUNNING,
    pb.CTD_TASK_STATUS_STOPPED: ContainerStatus.STOPPED,
    pb.CTD_TASK_STATUS_PAUSED: ContainerStatus.RUNNING,
    pb.CTD_TASK_STATUS_PAUSING: ContainerStatus.RUNNING,
}


def _cgroups_path(container: pb.CtdContainer) -> str:
    try:
        spec = json.loads(container.spec.value or b"{}")
    except ValueError:
        return ""
    path = spec.get("linux", {}).get("cgroupsPath", "")
    return path if isinstance(path, str) else ""


def oom_killed(cgroups_path: str, root: Path = CGROUP_ROOT) -> bool:
    """Whether the kernel's OOM killer struck in this cgroup (v1 `memory.oom_control`, v2
    `memory.events`). The cgroup lives until the task is deleted, so a stopped sandbox can still
    tell why its process got SIGKILL."""
    rel = cgroups_path.strip("/")
    if not rel:
        return False
    candidates = [
        (root / "memory" / rel / "memory.oom_control", "oom_kill"),
        (root / rel / "memory.events", "oom_kill"),
        (root / "unified" / rel / "memory.events", "oom_kill"),
    ]
    for path, key in candidates:
        try:
            lines = path.read_text().splitlines()
        except OSError:
            continue
        for line in lines:
            name, _, value = line.partition(" ")
            if name == key and value.strip().isdigit() and int(value) > 0:
                return True
    return False


def _timestamp(ts: Any) -> float | None:
    seconds = float(ts.seconds) + ts.nanos / 1e9
    # containerd sends the zero time (year 1) for "never"; the Unix epoch is as meaningless.
    return seconds if seconds > 0 else None


def state_of(container: pb.CtdContainer, task: pb.CtdProcess | None) -> ContainerState:
    """The state of `container`, whose task is `task` (None: it has none)."""
    labels = dict(container.labels)
    # containerd keeps no start time; the record is made a few ms before the task starts.
    created = _timestamp(container.created_at)
    if task is None:
        # A container without a task runs nothing (e.g. its node rebooted).
        return ContainerState(
            id=container.id,
            status=ContainerStatus.STOPPED,
            labels=labels,
            started_at=created,
            reason="NoTask",
        )
    status = _TASK_STATUS.get(task.status, ContainerStatus.UNKNOWN)
    stopped = status is ContainerStatus.STOPPED
    reason = ""
    if stopped and task.exit_status == SIGKILL_EXIT and oom_killed(_cgroups_path(container)):
        reason = "OOMKilled"
    return ContainerState(
        id=container.id,
        status=status,
        labels=labels,
        pid=0 if stopped else task.pid,
        exit_code=task.exit_status if stopped else None,
        started_at=created,
        exited_at=_timestamp(task.exited_at) if stopped else None,
        reason=reason,
    )


def process_defaults_of(oci: Mapping[str, Any]) -> ProcessDefaults:
    """A sandbox's process env/cwd/user from its OCI spec, without PID 1's own FSB_* vars."""
    process = oci.get("process") or {}
    env = tuple(e for e in process.get("env") or () if not str(e).startswith("FSB_"))
    user = process.get("user") or {}
    uid, gid = int(user.get("uid", 0)), int(user.get("gid", 0))
    return ProcessDefaults(
        env=env, cwd=str(process.get("cwd") or "/"), user=f"{uid}:{gid}" if uid or gid else ""
    )


def label_selector(wanted: Mapping[str, str]) -> str:
    """A containerd filter matching containers whose labels include every pair of `wanted`."""
    return ",".join(f"labels.{_quote(k)}=={_quote(v)}" for k, v in wanted.items())


def _quote(value: str) -> str:
    """A quoted string in containerd's filter syntax (Go strconv quoting rules)."""
    return json.dumps(value)
