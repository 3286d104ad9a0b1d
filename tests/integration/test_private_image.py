"""Private images against a real docker-registry with htpasswd auth and real containerd:
a pull with credentials works (the password reaches ctr through a pty, never argv), a pull
without them is PermissionDenied, and the registry probe tells an accepted credential from a
refused one and a private image from a public one. The agent-level rule (a cached private image
only for a caller whose credentials the registry accepts) is `test_cached_private_image_*`."""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from fastsandbox.agent.manager import SandboxManager
from fastsandbox.agent.requests import SandboxRequest
from fastsandbox.agent.runtime.containerd import ContainerdRuntime
from fastsandbox.api.images import PullCredentials
from fastsandbox.errors import PermissionDenied
from fastsandbox.settings import AgentSettings
from tests.infra import (
    ContainerdProc,
    RegistryProc,
    build_demo_image,
    push_image,
    start_registry,
)

pytestmark = pytest.mark.integration

USER, PASSWORD = "puller", "pull-pw-7"
# bcrypt of PASSWORD (computed once; docker-registry's htpasswd wants bcrypt).
HTPASSWD = f"{USER}:$2b$12$Y8ZGwQoD.FX9yKV4R.LWQ.UCzscc2d8KAItdtWpGZxeC7gIX8bS0u\n"
GOOD = PullCredentials(USER, PASSWORD)
BAD = PullCredentials(USER, "wrong-password")
NS = "fsb-private-image"


@pytest.fixture(scope="module")
def private_registry() -> Iterator[tuple[RegistryProc, str]]:
    work = Path(tempfile.mkdtemp(prefix="fsb-private-reg-"))
    reg = start_registry(work, htpasswd=HTPASSWD)
    try:
        layout = build_demo_image(work / "img")
        ref = push_image(layout, reg.addr, "secret/app:1", creds=f"{USER}:{PASSWORD}")
        yield reg, ref
    finally:
        reg.stop()
        shutil.rmtree(work, ignore_errors=True)


@pytest.fixture
async def runtime(
    containerd: ContainerdProc, private_registry: tuple[RegistryProc, str], tmp_path: Path
) -> AsyncIterator[ContainerdRuntime]:
    reg, ref = private_registry
    rt = ContainerdRuntime(containerd.socket, NS, [reg.addr], state_dir=tmp_path / "rt")
    try:
        yield rt
    finally:
        containerd.ctr("images", "rm", ref, namespace=NS, check=False)
        await rt.close()


async def test_pull_needs_credentials_the_registry_accepts(
    runtime: ContainerdRuntime, private_registry: tuple[RegistryProc, str]
) -> None:
    _, ref = private_registry
    with pytest.raises(PermissionDenied) as anonymous:
        await runtime.pull(ref)
    assert PASSWORD not in anonymous.value.message
    with pytest.raises(PermissionDenied):
        await runtime.pull(ref, BAD)
    info = await runtime.pull(ref, GOOD)
    assert info.name == ref


async def test_the_probe_tells_private_from_public_and_good_from_bad(
    runtime: ContainerdRuntime, private_registry: tuple[RegistryProc, str], demo_image: str
) -> None:
    _, ref = private_registry
    assert not await runtime.registry_allows(ref, None)
    assert not await runtime.registry_allows(ref, BAD)
    assert await runtime.registry_allows(ref, GOOD)
    public = ContainerdRuntime(runtime.socket, NS, [demo_image.split("/", 1)[0]])
    try:
        assert await public.registry_allows(demo_image, None)
    finally:
        await public.close()


def _settings(tmp_path: Path, containerd: ContainerdProc, cgroup_parent: str) -> AgentSettings:
    return AgentSettings(
        name="priv-agent",
        pool="p",
        namespace="default",
        listen=f"unix://{tmp_path}/a.sock",
        state_dir=tmp_path / "agent",
        containerd_socket=containerd.socket,
        containerd_namespace=NS,
        cgroup_parent=cgroup_parent,
    )


async def test_cached_private_image_only_for_callers_the_registry_accepts(
    runtime: ContainerdRuntime,
    containerd: ContainerdProc,
    private_registry: tuple[RegistryProc, str],
    cgroup_parent: str,
    tmp_path: Path,
) -> None:
    _, ref = private_registry
    settings = _settings(tmp_path, containerd, cgroup_parent)

    def req(sid: str, creds: PullCredentials | None) -> SandboxRequest:
        return SandboxRequest(
            sandbox_id=sid, image=ref, command=("sleep", "600"), pull_credentials=creds
        )

    made: list[str] = []
    try:
        agent = SandboxManager(runtime, settings)
        await agent.start()
        await agent.create(req("priv-owner", GOOD))
        made.append("priv-owner")
        for sid, creds in (("priv-anon", None), ("priv-bad", BAD)):
            with pytest.raises(PermissionDenied):
                await agent.create(req(sid, creds))
        # A restarted agent finds the image cached and does not know who pulled it: it asks.
        again = SandboxManager(runtime, dataclasses.replace(settings))
        await again.start()
        with pytest.raises(PermissionDenied, match="private"):
            await again.create(req("priv-anon-2", None))
        await again.create(req("priv-owner-2", GOOD))
        made.append("priv-owner-2")
        assert {s.id for s in await runtime.list()} >= set(made)
        assert not {"priv-anon", "priv-bad", "priv-anon-2"} & {s.id for s in await runtime.list()}
    finally:
        for sid in made:
            await runtime.delete(sid, 0)
