"""Images in containerd's store, for the containerd runtime: pulled, listed, their configs read.

Pull: containerd 1.6 has no server-side Transfer service, so a pull is client work (resolve,
fetch every blob into the content store under a lease, unpack the layers into snapshots, write
the image record). Re-implementing that (registry auth, token refresh, mirrors, media types,
unpack) is a lot of code to get right; the CRI `PullImage` RPC would do it server-side but only
into namespace `k8s.io`. The simplest correct choice is containerd's own client: `ctr images
pull` (one subprocess per pull, off the hot path), with `--plain-http` for the registries named
insecure and `--hosts-dir` for mirrors and credentials. Concurrent pulls of one image run once.
Image names are normalised first (`busybox` → `docker.io/library/busybox:latest`), because ctr
stores exactly the name it is given.

An image's config (process defaults, chain id) is read from the content store once per manifest
digest and cached, so a warm create reads nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import platform
import time
from collections.abc import Mapping, Sequence
from typing import Any

from fastsandbox._aio.keyed import KeyedLocks
from fastsandbox.agent.runtime import registry_probe
from fastsandbox.agent.runtime._containerd_api import ContainerdApi
from fastsandbox.agent.runtime.base import ImageInfo
from fastsandbox.agent.runtime.image_config import ImageConfig, chain_id
from fastsandbox.agent.runtime.pull_errors import classify
from fastsandbox.api.images import PullCredentials, normalize_image_ref, registry_host
from fastsandbox.errors import NotFound, RuntimeFailure

log = logging.getLogger(__name__)

_STDERR_TAIL = 2000

_INDEX_TYPES = {
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
}
_GOARCH = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}


def platform_manifest(ref: str, index: Mapping[str, Any]) -> str:
    """The digest of this machine's linux manifest in an image index."""
    arch = _GOARCH.get(platform.machine(), platform.machine())
    for entry in index.get("manifests") or ():
        plat = entry.get("platform") or {}
        if plat.get("os") == "linux" and plat.get("architecture") == arch:
            return str(entry["digest"])
    raise NotFound(f"image {ref} has no linux/{arch} manifest")


def is_index(media_type: str, document: Mapping[str, Any]) -> bool:
    return media_type in _INDEX_TYPES or "manifests" in document


class ContainerdImages:
    """The images of containerd `namespace` (over `api`, whose socket is `socket`), unpacked
    for `snapshotter`; registries in `insecure_registries` (host:port) are pulled over plain
    HTTP, with `hosts_dir` (ctr's `--hosts-dir`) for mirrors and credentials."""

    def __init__(
        self,
        api: ContainerdApi,
        socket: str,
        namespace: str,
        *,
        snapshotter: str,
        insecure_registries: Sequence[str] = (),
        ctr_binary: str = "ctr",
        hosts_dir: str | None = None,
        pull_timeout: float = 900.0,
    ) -> None:
        self._api = api
        self.socket = socket
        self.namespace = namespace
        self.snapshotter = snapshotter
        self.insecure_registries = frozenset(insecure_registries)
        self.ctr_binary = ctr_binary
        self.hosts_dir = hosts_dir
        self.pull_timeout = pull_timeout
        self._pull_locks = KeyedLocks()
        self._configs: dict[str, ImageConfig] = {}

    async def pull(self, image: str, credentials: PullCredentials | None = None) -> ImageInfo:
        ref = normalize_image_ref(image)
        async with self._pull_locks.hold(ref):
            with contextlib.suppress(NotFound):
                img = await self._api.get_image(ref)
                # An interrupted pull can leave the image record without its unpacked layers;
                # then pull again (ctr skips what is already fetched and unpacks the rest).
                config = await self.config(ref)
                await self._api.stat_snapshot(self.snapshotter, config.chain_id)
                return ImageInfo(name=ref, digest=img.target.digest)
            await self._ctr_pull(ref, credentials)
            img = await self._api.get_image(ref)
            return ImageInfo(name=ref, digest=img.target.digest)

    async def registry_allows(self, image: str, credentials: PullCredentials | None) -> bool:
        ref = normalize_image_ref(image)
        plain = registry_host(ref) in self.insecure_registries
        return await registry_probe.allows(ref, credentials, plain_http=plain)

    def _pull_argv(self, ref: str, username: str | None = None) -> list[str]:
        argv = [self.ctr_binary, "-a", self.socket, "-n", self.namespace, "images", "pull"]
        if registry_host(ref) in self.insecure_registries:
            argv.append("--plain-http")
        if self.hosts_dir:
            argv += ["--hosts-dir", self.hosts_dir]
        if self.snapshotter:
            argv += ["--snapshotter", self.snapshotter]
        if username:
            # Only the user on argv: ctr asks for the password on its terminal (`_ctr_pull`).
            argv += ["--user", username]
        return [*argv, ref]

    async def _ctr_pull(self, ref: str, credentials: PullCredentials | None = None) -> None:
        argv = self._pull_argv(ref, credentials.username if credentials else None)
        started = time.monotonic()
        # The password never goes on argv (any local user reads /proc/*/cmdline) or into the
        # environment: ctr reads it from its console, here a pty only we hold the other end of.
        master, slave = os.openpty() if credentials else (-1, -1)
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=slave if credentials else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
            )
        except FileNotFoundError:
            if credentials:
                os.close(master)
            raise RuntimeFailure(
                f"{self.ctr_binary} not found: install containerd (scripts/setup)"
            ) from None
        finally:
            if credentials:
                os.close(slave)
        try:
            if credentials:
                # Queued on the terminal's line until ctr reads it; kept open until ctr exits.
                os.write(master, credentials.password.encode() + b"\n")
            async with asyncio.timeout(self.pull_timeout):
                _, stderr_bytes = await proc.communicate()
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            raise RuntimeFailure(
                f"pull of {ref} timed out after {self.pull_timeout:.0f}s ({argv!r})"
            ) from None
        finally:
            if credentials:
                os.close(master)
        stderr = stderr_bytes.decode(errors="replace").strip()[-_STDERR_TAIL:]
        if proc.returncode != 0:
            # The remote's words stay in our log; the caller gets ours (pull_errors.py).
            log.debug("pull failed", extra={"image": ref, "argv": argv, "stderr": stderr})
            failure = classify(stderr, registry_host(ref))
            raise failure.kind(f"pull of {ref} failed: {failure.reason}")
        log.info("pulled image", extra={"image": ref, "ms": (time.monotonic() - started) * 1e3})

    async def present(self) -> list[ImageInfo]:
        return sorted(
            (ImageInfo(name=i.name, digest=i.target.digest) for i in await self._api.list_images()),
            key=lambda i: i.name,
        )

    async def _read_json(self, digest: str) -> dict[str, Any]:
        data = await self._api.read_content(digest)
        try:
            value = json.loads(data)
        except ValueError as err:
            raise RuntimeFailure(f"content {digest} is not JSON: {err}") from None
        if not isinstance(value, dict):
            raise RuntimeFailure(f"content {digest} is not a JSON object")
        return value

    async def config(self, ref: str) -> ImageConfig:
        """The process defaults and chain id of a pulled image (NotFound when not pulled)."""
        try:
            image = await self._api.get_image(ref)
        except NotFound:
            raise NotFound(f"image {ref} is not pulled on this node; pull it first") from None
        target = image.target
        cached = self._configs.get(target.digest)
        if cached is not None:
            return cached
        manifest = await self._read_json(target.digest)
        if is_index(target.media_type, manifest):
            manifest = await self._read_json(platform_manifest(ref, manifest))
        config_digest = manifest.get("config", {}).get("digest")
        if not config_digest:
            raise RuntimeFailure(f"image {ref}: manifest has no config")
        config = await self._read_json(config_digest)
        process = config.get("config") or {}
        result = ImageConfig(
            entrypoint=tuple(process.get("Entrypoint") or ()),
            cmd=tuple(process.get("Cmd") or ()),
            env=tuple(process.get("Env") or ()),
            working_dir=process.get("WorkingDir") or "",
            user=process.get("User") or "",
            chain_id=chain_id((config.get("rootfs") or {}).get("diff_ids") or ()),
        )
        self._configs[target.digest] = result
        return result
