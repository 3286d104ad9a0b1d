"""What a container of this agent is made from: a request's `ContainerSpec`, with the labels that
decide ownership and recovery, and the caps (log, disk) a request may ask for.

Kept apart from the manager because two paths build specs — a cold create from a request, a warm
slot from the agent's defaults alone — and they must agree on everything but the request's own
fields, or a claimed slot would differ from a cold sandbox."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

from fastsandbox.agent.network.for_agent import net_labels
from fastsandbox.agent.network.private import SandboxNet
from fastsandbox.agent.requests import SandboxRequest
from fastsandbox.agent.runtime.base import ContainerSpec
from fastsandbox.agent.supervisor import ChannelHub
from fastsandbox.api import labels as label_keys
from fastsandbox.api.images import normalize_image_ref
from fastsandbox.api.models import MIN_LOG_MAX_BYTES
from fastsandbox.api.quantity import MIN_DISK_BYTES
from fastsandbox.errors import InvalidArgument
from fastsandbox.settings import AgentSettings


class SpecBuilder:
    def __init__(self, settings: AgentSettings, channels: ChannelHub | None) -> None:
        self.settings = settings
        self.channels = channels

    @property
    def log_dir(self) -> Path:
        return self.settings.state_dir / "logs"

    def log_path(self, container_id: str) -> Path:
        return self.log_dir / f"{container_id}.log"

    def sandbox(self, req: SandboxRequest, net: SandboxNet | None = None) -> ContainerSpec:
        """The spec of the sandbox `req` asks for, in private network `net` (None: shared)."""
        labels = dict(req.labels)
        # Ours win over the caller's: they decide ownership and how we find sandboxes again.
        labels[label_keys.AGENT_LABEL] = self.settings.name
        labels[label_keys.SANDBOX_ID_LABEL] = req.sandbox_id
        if req.namespace:
            labels[label_keys.NAMESPACE_LABEL] = req.namespace
        if req.name:
            labels[label_keys.NAME_LABEL] = req.name
        if req.exposed_ports:
            labels[label_keys.PORTS_LABEL] = ",".join(str(p) for p in req.exposed_ports)
        netns_path = self.settings.netns_path
        if net is not None:
            # How a restarted agent finds the sandbox's network again, and how the control
            # plane learns its endpoints (the labels travel in every SandboxState).
            labels.update(net_labels(net))
            netns_path = net.path or None  # none in a Pod: runc makes it, net.hook wires it
        return replace(
            self.container(req.sandbox_id, req.image, labels),
            netns_path=netns_path,
            netns_hook=net.hook if net is not None else (),
            command=req.command,
            args=req.args,
            env=req.env,
            working_dir=req.working_dir,
            cpu_millis=req.cpu_millis or None,
            memory_bytes=req.memory_bytes or None,
            pids_limit=req.pids_limit or None,
            log_max_bytes=self.log_cap(req.log_max_bytes),
            disk_bytes=self.disk(req.disk_bytes) if self.settings.enforces_disk_limit else None,
        )

    def container(
        self, container_id: str, image: str, labels: Mapping[str, str], *, warm: bool = False
    ) -> ContainerSpec:
        """What every container of this agent shares (a warm slot is made from this alone)."""
        channels = self.channels
        return ContainerSpec(
            id=container_id,
            image=normalize_image_ref(image),
            log_path=str(self.log_path(container_id)),
            labels=dict(labels),
            netns_path=self.settings.netns_path,
            cgroup_parent=f"{self.settings.cgroup_parent.rstrip('/')}/{self.settings.name}",
            runtime=self.settings.runtime,
            init_path=str(self.settings.init_path) if self.settings.init_path else None,
            channel_dir=str(channels.directory(container_id)) if channels else None,
            init_env=channels.supervisor_env(container_id) if channels else (),
            log_max_bytes=self.settings.log_max_bytes,
            # A warm slot's layer is made at the agent's default size; `sandbox` sets the
            # request's.
            disk_bytes=self.disk(0) if self.settings.enforces_disk_limit else None,
            logger_path=str(self.settings.logger_path) if self.settings.logger_path else None,
            warm=warm,
        )

    def log_cap(self, asked: int) -> int:
        """The log cap for a request asking `asked` bytes (0: the agent's default)."""
        if asked < 0:
            raise InvalidArgument(f"log_max_bytes {asked}: must be 0 (the default) or positive")
        if 0 < asked < MIN_LOG_MAX_BYTES:
            raise InvalidArgument(
                f"log_max_bytes {asked}: must be at least {MIN_LOG_MAX_BYTES} bytes (64 KiB)"
            )
        return asked or self.settings.log_max_bytes

    def disk(self, asked: int) -> int:
        """The writable layer's size for a request asking `asked` bytes (0: the default)."""
        if asked < 0:
            raise InvalidArgument(f"disk_bytes {asked}: must be 0 (the default) or positive")
        if 0 < asked < MIN_DISK_BYTES:
            raise InvalidArgument(f"disk_bytes {asked}: must be at least {MIN_DISK_BYTES} (1Mi)")
        return asked or self.settings.default_disk_bytes
