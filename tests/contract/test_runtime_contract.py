"""One contract for every `Runtime`: the in-memory FakeRuntime and the containerd backend.

The same checks run over both; the containerd run (marked `integration`) uses a private
containerd, a loopback registry and the busybox demo image (tests/infra_fixtures.py). Checks that
need a process to really run (log output, exit codes, signals, snapshots) are real-only: the
fake runs no process, so for it those checks would only test themselves.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import os
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from fastsandbox.agent.runtime.base import ContainerSpec, ContainerState, ContainerStatus, Runtime
from fastsandbox.agent.runtime.containerd import MANAGED_LABEL, ContainerdRuntime
from fastsandbox.agent.runtime.fake import FakeRuntime
from fastsandbox.errors import NotFound
from tests.infra import ContainerdProc, cannot_run

_ids = itertools.count()
WAIT_SECONDS = 15.0


@dataclass
class Harness:
    runtime: Runtime
    image: str
    tmp: Path
    cgroup_parent: str
    containerd: ContainerdProc | None = None
    made: list[str] = field(default_factory=list)

    @property
    def real(self) -> bool:
        return self.containerd is not None

    def spec(self, **kw: object) -> ContainerSpec:
        cid = f"ct-{os.getpid()}-{next(_ids)}"
        self.made.append(cid)
        kw.setdefault("image", self.image)
        kw.setdefault("cgroup_parent", self.cgroup_parent)
        return ContainerSpec(id=cid, log_path=str(self.tmp / "logs" / f"{cid}.log"), **kw)  # type: ignore[arg-type]

    def finish(self, cid: str, code: int) -> None:
        """The fake's processes never end by themselves; a real one does."""
        if isinstance(self.runtime, FakeRuntime):
            self.runtime.exit(cid, code)

    async def wait_stopped(self, cid: str) -> ContainerState:
        async with asyncio.timeout(WAIT_SECONDS):
            while (state := await self.runtime.get(cid)).status is not ContainerStatus.STOPPED:
                await asyncio.sleep(0.02)
        return state

    async def wait_log(self, cid: str, text: str) -> str:
        path = self.tmp / "logs" / f"{cid}.log"
        async with asyncio.timeout(WAIT_SECONDS):
            while text not in (content := path.read_text() if path.exists() else ""):
                await asyncio.sleep(0.02)
        return content

    def leftovers(self, cid: str) -> list[str]:
        """What containerd still holds for `cid` (task, container, snapshot)."""
        assert self.containerd is not None
        found = []
        for kind in ("tasks", "containers", "snapshots"):
            lines = self.containerd.ctr(kind, "ls").splitlines()[1:]
            if any(line.split()[0] == cid for line in lines if line.split()):
                found.append(kind)
        return found


@pytest.fixture(params=["fake", pytest.param("containerd", marks=pytest.mark.integration)])
async def h(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Harness]:
    if request.param == "fake":
        fake = FakeRuntime()
        harness = Harness(fake, "127.0.0.1:5000/busybox:latest", tmp_path, "/fastsandbox-test")
    else:
        ctd: ContainerdProc = request.getfixturevalue("containerd")
        image: str = request.getfixturevalue("demo_image")
        cgroup_parent: str = request.getfixturevalue("cgroup_parent")
        registry_host = image.split("/", 1)[0]
        runtime = ContainerdRuntime(
            ctd.socket, "fastsandbox", [registry_host], state_dir=tmp_path / "state"
        )
        harness = Harness(runtime, image, tmp_path, cgroup_parent, containerd=ctd)
    try:
        yield harness
    finally:
        for cid in harness.made:
            await harness.runtime.delete(cid, 0)
        await harness.runtime.close()


def real_only(h: Harness) -> None:
    if not h.real:
        pytest.skip("needs a process that really runs")


async def test_pull_records_the_image(h: Harness) -> None:
    info = await h.runtime.pull(h.image)
    assert info.name == h.image
    assert info.digest.startswith("sha256:")
    assert info in await h.runtime.images()
    assert await h.runtime.pull(h.image) == info


async def test_pull_normalises_short_names(h: Harness) -> None:
    runtime = h.runtime
    if h.containerd is not None:
        # No Docker Hub here: the session's registry stands in for docker.io, as a registry
        # mirror does (containerd's hosts.toml, `--hosts-dir`). `server` replaces docker.io's own
        # endpoint, so a short name that was not normalised, or a mirror that was not used,
        # fails instead of reaching the internet.
        registry = h.image.split("/", 1)[0]
        hosts = h.tmp / "hosts" / "docker.io"
        hosts.mkdir(parents=True)
        (hosts / "hosts.toml").write_text(
            f'server = "http://{registry}"\n\n'
            f'[host."http://{registry}"]\n  capabilities = ["pull", "resolve"]\n'
        )
        copy = ["skopeo", "copy", "--quiet", "--src-tls-verify=false", "--dest-tls-verify=false"]
        await _run(*copy, f"docker://{h.image}", f"docker://{registry}/library/busybox:latest")
        runtime = ContainerdRuntime(
            h.containerd.socket, "fastsandbox", hosts_dir=hosts.parent, state_dir=h.tmp / "hub"
        )
    try:
        info = await runtime.pull("busybox")
        assert info.name == "docker.io/library/busybox:latest"
        assert info.digest.startswith("sha256:")
        assert info in await runtime.images()
    finally:
        if runtime is not h.runtime:
            await runtime.close()
            assert h.containerd is not None
            h.containerd.ctr("images", "rm", "docker.io/library/busybox:latest", check=False)


async def _run(*argv: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await proc.communicate()
    assert proc.returncode == 0, f"{argv!r} exited {proc.returncode}: {out.decode()[-800:]}"


async def test_pull_of_an_unknown_image_is_not_found(h: Harness) -> None:
    registry = h.image.split("/", 1)[0]
    with pytest.raises(NotFound):
        await h.runtime.pull(f"{registry}/nope-{os.getpid()}:latest")


async def test_create_needs_a_pulled_image(h: Harness) -> None:
    registry = h.image.split("/", 1)[0]
    with pytest.raises(NotFound):
        await h.runtime.create(h.spec(image=f"{registry}/never-pulled:latest"))


async def test_command_env_and_workdir_reach_the_process(h: Harness) -> None:
    real_only(h)
    await h.runtime.pull(h.image)
    spec = h.spec(
        command=("sh", "-c"),
        args=('echo "$V $DEMO"; pwd',),
        env=(("V", "hello"), ("DEMO", "overridden")),
        working_dir="/etc",
    )
    state = await h.runtime.create(spec)
    assert state.status in (ContainerStatus.RUNNING, ContainerStatus.STOPPED)
    stopped = await h.wait_stopped(spec.id)
    assert stopped.exit_code == 0
    assert Path(spec.log_path).read_text() == "hello overridden\n/etc\n"


async def test_image_defaults_apply_when_the_spec_is_empty(h: Harness) -> None:
    real_only(h)
    await h.runtime.pull(h.image)
    spec = h.spec()
    await h.runtime.create(spec)
    # The demo image's cmd prints its env and workdir, then stays up until SIGTERM.
    assert "demo fastsandbox in /tmp\n" in await h.wait_log(spec.id, "\n")
    assert (await h.runtime.get(spec.id)).status is ContainerStatus.RUNNING


async def test_args_alone_replace_the_image_cmd(h: Harness) -> None:
    real_only(h)
    await h.runtime.pull(h.image)
    spec = h.spec(args=("sh", "-c", "echo args-only from $(pwd)"))
    await h.runtime.create(spec)
    await h.wait_stopped(spec.id)
    assert Path(spec.log_path).read_text() == "args-only from /tmp\n"


async def test_stdout_and_stderr_share_the_log_file(h: Harness) -> None:
    real_only(h)
    await h.runtime.pull(h.image)
    spec = h.spec(command=("sh", "-c", "echo out; echo err >&2"))
    await h.runtime.create(spec)
    await h.wait_stopped(spec.id)
    assert sorted(Path(spec.log_path).read_text().splitlines()) == ["err", "out"]


async def test_create_is_idempotent(h: Harness) -> None:
    await h.runtime.pull(h.image)
    spec = h.spec(command=("sleep", "60"))
    first = await h.runtime.create(spec)
    second = await h.runtime.create(spec)
    assert first.status is ContainerStatus.RUNNING
    assert (second.id, second.pid) == (first.id, first.pid)
    assert [s.id for s in await h.runtime.list({"run": spec.id})] == []
    assert spec.id in {s.id for s in await h.runtime.list()}


async def test_get_and_list_filter_by_labels(h: Harness) -> None:
    await h.runtime.pull(h.image)
    a = h.spec(command=("sleep", "60"), labels={"fastsandbox.io/agent": "a-1", "team": "x"})
    b = h.spec(command=("sleep", "60"), labels={"fastsandbox.io/agent": "a-2", "team": "x"})
    await h.runtime.create(a)
    await h.runtime.create(b)
    got = await h.runtime.get(a.id)
    assert got.status is ContainerStatus.RUNNING
    assert got.pid > 0
    assert got.labels["fastsandbox.io/agent"] == "a-1"
    assert [s.id for s in await h.runtime.list({"fastsandbox.io/agent": "a-1"})] == [a.id]
    assert [s.id for s in await h.runtime.list({"team": "x"})] == sorted([a.id, b.id])
    assert await h.runtime.list({"team": "x", "fastsandbox.io/agent": "a-3"}) == []


async def test_exit_code_is_reported(h: Harness) -> None:
    await h.runtime.pull(h.image)
    spec = h.spec(command=("sh", "-c", "exit 3"))
    await h.runtime.create(spec)
    h.finish(spec.id, 3)
    state = await h.wait_stopped(spec.id)
    assert state.exit_code == 3
    assert state.exited_at is not None
    listed = {s.id: s for s in await h.runtime.list()}
    assert listed[spec.id].status is ContainerStatus.STOPPED
    assert listed[spec.id].exit_code == 3


async def test_delete_removes_everything_and_is_idempotent(h: Harness) -> None:
    await h.runtime.pull(h.image)
    spec = h.spec(command=("sleep", "60"))
    await h.runtime.create(spec)
    if h.real:
        assert h.leftovers(spec.id) == ["tasks", "containers", "snapshots"]
    assert await h.runtime.delete(spec.id, 5) is True
    with pytest.raises(NotFound):
        await h.runtime.get(spec.id)
    assert spec.id not in {s.id for s in await h.runtime.list()}
    if h.real:
        assert h.leftovers(spec.id) == []
    assert await h.runtime.delete(spec.id, 5) is False


async def test_the_same_id_can_be_created_again_after_delete(h: Harness) -> None:
    await h.runtime.pull(h.image)
    spec = h.spec(command=("sh", "-c", "echo round; sleep 60"))
    for _ in range(3):
        state = await h.runtime.create(spec)
        assert state.status is ContainerStatus.RUNNING
        assert await h.runtime.delete(spec.id, 1) is True


async def test_unknown_id_is_not_found(h: Harness) -> None:
    with pytest.raises(NotFound):
        await h.runtime.get("no-such-container")
    assert await h.runtime.delete("no-such-container", 1) is False


async def test_a_process_that_ignores_sigterm_is_killed_after_grace(h: Harness) -> None:
    real_only(h)
    await h.runtime.pull(h.image)
    script = (
        'trap "echo got-term; T=1" TERM; echo ready; '
        'while :; do if [ -n "$T" ]; then echo still-alive; T=; fi; sleep 0.1; done'
    )
    spec = h.spec(command=("sh", "-c", script))
    await h.runtime.create(spec)
    await h.wait_log(spec.id, "ready\n")
    assert await h.runtime.delete(spec.id, 1.0) is True
    # It saw SIGTERM, survived it, and was still removed: SIGKILL came after the grace.
    lines = Path(spec.log_path).read_text().splitlines()
    assert "got-term" in lines
    assert "still-alive" in lines[lines.index("got-term") :]
    with pytest.raises(NotFound):
        await h.runtime.get(spec.id)
    assert h.leftovers(spec.id) == []


async def test_a_failed_create_leaves_nothing_behind(h: Harness) -> None:
    real_only(h)
    await h.runtime.pull(h.image)
    spec = h.spec(command=("/no/such/binary",))
    with pytest.raises(Exception, match="no such file"):
        await h.runtime.create(spec)
    with pytest.raises(NotFound):
        await h.runtime.get(spec.id)
    assert h.leftovers(spec.id) == []


async def test_containers_carry_the_managed_label(h: Harness) -> None:
    real_only(h)
    await h.runtime.pull(h.image)
    spec = h.spec(command=("sleep", "60"), labels={"k": "v"})
    state = await h.runtime.create(spec)
    assert state.labels == {"k": "v", MANAGED_LABEL: "true"}


def _cgroup_file(cgroup: str, v1_controller: str, v1_name: str, v2_name: str) -> Path:
    root = Path("/sys/fs/cgroup")
    if (root / "cgroup.controllers").exists():  # unified hierarchy (cgroup v2)
        return root / cgroup.strip("/") / v2_name
    return root / v1_controller / cgroup.strip("/") / v1_name


async def test_resource_limits_reach_the_cgroup(h: Harness) -> None:
    real_only(h)
    await h.runtime.pull(h.image)
    spec = h.spec(command=("sleep", "60"), cpu_millis=250, memory_bytes=64 << 20)
    await h.runtime.create(spec)
    cgroup = f"{h.cgroup_parent}/{spec.id}"
    memory = _cgroup_file(cgroup, "memory", "memory.limit_in_bytes", "memory.max")
    assert memory.read_text().strip() == str(64 << 20)
    cpu_v2 = _cgroup_file(cgroup, "cpu", "cpu.cfs_quota_us", "cpu.max")
    assert cpu_v2.read_text().split()[0] == "25000"
    pids = _cgroup_file(cgroup, "pids", "pids.max", "pids.max")
    assert pids.read_text().strip() == "1024"


async def test_the_sandbox_is_confined(h: Harness) -> None:
    real_only(h)
    await h.runtime.pull(h.image)
    spec = h.spec(command=("sh", "-c", "grep -E '^(CapEff|NoNewPrivs|Seccomp):' /proc/self/status"))
    await h.runtime.create(spec)
    await h.wait_stopped(spec.id)
    status = dict(line.split(":\t") for line in Path(spec.log_path).read_text().splitlines())
    assert status["NoNewPrivs"] == "1"
    assert status["Seccomp"] == "2"  # filter mode
    cap_net_raw = 1 << 13
    assert int(status["CapEff"], 16) & cap_net_raw == 0


async def test_gvisor_runs_through_the_runc_shim(h: Harness) -> None:
    real_only(h)
    if shutil.which("runsc") is None:
        cannot_run("runsc is not installed (scripts/setup)")
    await h.runtime.pull(h.image)
    spec = h.spec(command=("sh", "-c", "echo $V; dmesg | head -n 1; exit 4"), env=(("V", "hi"),))
    spec = dataclasses.replace(spec, runtime="gvisor")
    await h.runtime.create(spec)
    state = await h.wait_stopped(spec.id)
    assert state.exit_code == 4
    out = Path(spec.log_path).read_text()
    assert out.startswith("hi\n")
    assert "gVisor" in out  # gVisor's own kernel log, not the host's
    assert await h.runtime.delete(spec.id, 1) is True
    assert h.leftovers(spec.id) == []
