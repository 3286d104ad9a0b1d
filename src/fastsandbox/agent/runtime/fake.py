"""An in-memory `Runtime` for unit tests of everything above the runtime seam.

It keeps the contract's observable rules (checked by `tests/contract/test_runtime_contract.py`
against this fake and the containerd backend alike): create needs a pulled image, create is
idempotent, delete is idempotent and reports whether anything existed, unknown ids are `NotFound`,
label filters match on every given pair. Processes do not run: a created container stays RUNNING
until a test calls `exit()`, and its log file only holds what a test writes with `write_log()`.

The "registry" is a convention so tests need no setup: every image can be pulled except those
named in `missing` or whose repository's last path segment starts with `nope` or `missing`
(e.g. `127.0.0.1:5000/nope:latest`).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import replace
from pathlib import Path

from fastsandbox.agent.runtime.base import (
    ContainerSpec,
    ContainerState,
    ContainerStatus,
    ImageInfo,
    MainProcess,
    ProcessDefaults,
)
from fastsandbox.api.images import PullCredentials, normalize_image_ref
from fastsandbox.api.labels import WARM_SLOT_LABEL
from fastsandbox.errors import FailedPrecondition, NotFound, PermissionDenied

_PID_BASE = 40_000


class FakeRuntime:
    """In-memory twin of `ContainerdRuntime`. Inspect `specs`, `pulls`, `delete_graces`."""

    def __init__(self, *, missing: Iterable[str] = ()) -> None:
        self.missing = {normalize_image_ref(m) for m in missing}
        # Every spec a container was created from, by id (kept after delete for assertions).
        self.specs: dict[str, ContainerSpec] = {}
        # Image names as asked for, in the order pulls really happened (not the no-op ones).
        self.pulls: list[str] = []
        # The grace period each delete was called with, by id.
        self.delete_graces: dict[str, float] = {}
        self.closed = False
        # Private images and the credential their registry accepts; the probes made.
        self.private: dict[str, PullCredentials] = {}
        self.probes: list[tuple[str, str | None]] = []
        self._images: dict[str, ImageInfo] = {}
        self._containers: dict[str, ContainerState] = {}
        self._next_pid = _PID_BASE
        # The main process each claimed warm slot was given, by container id.
        self.claims: dict[str, MainProcess] = {}

    # -- test helpers -------------------------------------------------------------------------

    def exit(self, container_id: str, code: int, *, reason: str = "") -> None:
        """Make the container's process end with `code`, as if it had exited by itself."""
        state = self._get(container_id)
        self._containers[container_id] = replace(
            state,
            status=ContainerStatus.STOPPED,
            exit_code=code,
            exited_at=time.time(),
            pid=0,
            reason=reason,
        )

    def write_log(self, container_id: str, data: bytes) -> None:
        """Append `data` to the container's log file, as its process would."""
        spec = self.specs[container_id]
        with Path(spec.log_path).open("ab") as f:
            f.write(data)

    def _registry_has(self, ref: str) -> bool:
        if ref in self.missing:
            return False
        repository = ref.rsplit("@", 1)[0].rsplit(":", 1)[0]
        last = repository.rsplit("/", 1)[-1]
        return not last.startswith(("nope", "missing"))

    def _get(self, container_id: str) -> ContainerState:
        try:
            return self._containers[container_id]
        except KeyError:
            raise NotFound(f"container {container_id!r} not found") from None

    # -- Runtime ------------------------------------------------------------------------------

    async def pull(self, image: str, credentials: PullCredentials | None = None) -> ImageInfo:
        ref = normalize_image_ref(image)
        if ref in self._images:
            return self._images[ref]
        if not self._registry_has(ref):
            raise NotFound(f"image {ref!r} not found in its registry")
        if not await self.registry_allows(ref, credentials):
            raise PermissionDenied(f"pull of {ref} failed: registry refused access")
        self.pulls.append(image)
        digest = "sha256:" + hashlib.sha256(ref.encode()).hexdigest()
        info = ImageInfo(name=ref, digest=digest)
        self._images[ref] = info
        return info

    async def registry_allows(self, image: str, credentials: PullCredentials | None) -> bool:
        """Private images (`self.private`: reference -> the one accepted credential) need it;
        every other image is public."""
        ref = normalize_image_ref(image)
        self.probes.append((ref, credentials.username if credentials else None))
        wanted = self.private.get(ref)
        return wanted is None or credentials == wanted

    async def images(self) -> list[ImageInfo]:
        return sorted(self._images.values(), key=lambda i: i.name)

    async def create(self, spec: ContainerSpec) -> ContainerState:
        if spec.id in self._containers:
            return self._containers[spec.id]
        ref = normalize_image_ref(spec.image)
        if ref not in self._images:
            raise NotFound(f"image {ref!r} is not pulled; pull it first")
        # The real shim creates the log file (and its directory) when the task is created.
        log_path = Path(spec.log_path)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log_path.touch()
        self._next_pid += 1
        state = ContainerState(
            id=spec.id,
            status=ContainerStatus.RUNNING,
            labels=dict(spec.labels),
            pid=self._next_pid,
            started_at=time.time(),
        )
        self.specs[spec.id] = spec
        self._containers[spec.id] = state
        return state

    async def claim(
        self,
        container_id: str,
        spec: ContainerSpec,
        start: Callable[[MainProcess], Awaitable[None]],
    ) -> ContainerState:
        state = self._get(container_id)
        if WARM_SLOT_LABEL not in state.labels or state.status is not ContainerStatus.RUNNING:
            raise FailedPrecondition(f"container {container_id} is not a running warm slot")
        main = MainProcess(
            argv=(*spec.command, *spec.args),
            env=tuple(f"{k}={v}" for k, v in spec.env),
            cwd=spec.working_dir or "/",
            # No hostname: a test's supervisor runs on the host, in the host's UTS namespace.
        )
        await start(main)
        self.claims[container_id] = main
        warm = self.specs[container_id]
        # The record now reads as the sandbox's (process_defaults, labels), as containerd's does.
        self.specs[container_id] = replace(spec, id=container_id, log_path=warm.log_path)
        state = replace(state, labels=dict(spec.labels), warm=True)
        self._containers[container_id] = replace(state, warm=False)
        return state

    async def delete(self, container_id: str, grace_seconds: float) -> bool:
        self.delete_graces[container_id] = grace_seconds
        return self._containers.pop(container_id, None) is not None

    async def get(self, container_id: str) -> ContainerState:
        return self._get(container_id)

    async def list(self, labels: Mapping[str, str] | None = None) -> list[ContainerState]:
        wanted = dict(labels or {})
        return [
            s
            for _, s in sorted(self._containers.items())
            if all(s.labels.get(k) == v for k, v in wanted.items())
        ]

    async def process_defaults(self, container_id: str) -> ProcessDefaults:
        self._get(container_id)
        spec = self.specs[container_id]
        # The fake's image has no env or workdir of its own: the sandbox's are all there is.
        return ProcessDefaults(
            env=tuple(f"{k}={v}" for k, v in spec.env), cwd=spec.working_dir or "/"
        )

    async def close(self) -> None:
        self.closed = True
