"""Limits, leases and pull timings against a real `fsb server` (containerd + runc, cgroup v1 here).

Limits come from a pool's `sandboxDefaults` (the sandboxes ask for nothing), and each is verified
by a workload inside the sandbox plus the container's own cgroup files: a memory hog is
OOM-killed and reported `OOMKilled`; a fork bomb stops at the pids limit and the sandbox keeps
running; a busy loop's CPU quota is the configured one and its usage over an interval stays
within quota * interval * a generous factor (no tight timing).

Leases go through the Fast-Path with a bare gRPC stub (no SDK): renewed, the sandbox stays past
its lease; not renewed, it is deleted; and a lease that lapses while the server is down is
collected by the restarted server (re-armed from the store).
"""

from __future__ import annotations

import json
import os
import pty
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from fastsandbox.api._proto.fastsandbox.v1 import fastpath_pb2, fastpath_pb2_grpc
from tests.e2e._kube_server import KubeServer, purge_kube
from tests.e2e._server import FSB, Server, new_server, purge
from tests.e2e.conftest import AnyServer, start_kube_server
from tests.infra import build_demo_image, push_image

pytestmark = pytest.mark.e2e

POOL = "limits"
MEMORY = "32Mi"
PIDS = 32
CPU_MILLIS = 100
# Usage may exceed quota * interval a little (the quota is enforced per 100 ms period, and our
# interval's edges do not line up with periods): a generous factor and a fixed slack.
CPU_FACTOR = 2.0
CPU_SLACK_SECONDS = 0.1


@pytest.fixture(scope="module")
def server(registry_addr: str) -> Iterator[Server]:
    srv = new_server(registry_addr)
    try:
        srv.start()
        yield srv
    finally:
        purge(srv)


def _stub(srv: AnyServer) -> tuple[fastpath_pb2_grpc.FastPathStub, grpc.Channel]:
    creds = grpc.ssl_channel_credentials(root_certificates=srv.ca_file.read_bytes())
    channel = grpc.secure_channel(srv.endpoint, creds)
    return fastpath_pb2_grpc.FastPathStub(channel), channel


def _auth(srv: AnyServer) -> tuple[tuple[str, str], ...]:
    if isinstance(srv, KubeServer):
        token = srv.token
    else:
        token = (srv.data_dir / "token").read_text().strip()
    return (("authorization", f"Bearer {token}"),)


def _make_pool(srv: AnyServer, name: str, spec: dict[str, Any]) -> None:
    stub, channel = _stub(srv)
    with channel:
        body = {"metadata": {"name": name}, "spec": spec}
        stub.CreatePool(fastpath_pb2.PoolRequest(object_json=json.dumps(body)), metadata=_auth(srv))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        got = srv.fsb("pool", "get", name, "-o", "json")
        if got.returncode == 0 and json.loads(got.stdout)["status"]["agents"]["ready"]:
            return
        time.sleep(0.2)
    raise AssertionError(f"pool {name} has no ready agent")


@pytest.fixture(scope="module")
def pool(server: Server) -> str:
    _make_pool(
        server,
        POOL,
        {
            "capacity": {"poolMin": 1, "poolMax": 1},
            "maxSandboxesPerAgent": 10,
            "sandboxDefaults": {"memory": MEMORY, "pids": PIDS, "cpu": f"{CPU_MILLIS}m"},
            "sandboxMax": {"memory": "256Mi", "cpu": "1"},
        },
    )
    return POOL


def _get(srv: AnyServer, name: str) -> dict[str, Any] | None:
    result = srv.fsb("get", name, "-o", "json")
    if result.returncode != 0:
        return None
    data: dict[str, Any] = json.loads(result.stdout)
    return data


def _wait(srv: AnyServer, name: str, check: Any, timeout: float, what: str) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    obj = None
    while time.monotonic() < deadline:
        obj = _get(srv, name)
        if check(obj):
            return obj or {}
        time.sleep(0.2)
    raise AssertionError(f"{name}: {what} not reached in {timeout}s: {obj and obj['status']}")


def _run(srv: AnyServer, name: str, *args: str) -> dict[str, Any]:
    result = srv.fsb("run", name, "-o", "json", *args)
    assert result.returncode == 0, result.stderr
    data: dict[str, Any] = json.loads(result.stdout)
    return data


def _cgroup_dir(srv: Server, container_id: str, controller: str) -> Path:
    """The container's cgroup directory of `controller` (v1), from its task's /proc entry."""
    rows = [line.split() for line in srv.ctr("tasks", "ls").splitlines()[1:]]
    pid = next(int(r[1]) for r in rows if r and r[0] == container_id)
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if controller in controllers.split(","):
            return Path("/sys/fs/cgroup") / controllers / path.lstrip("/")
    raise AssertionError(f"no {controller} cgroup for {container_id}")


def _logs(srv: Server, name: str) -> str:
    return srv.fsb("logs", name).stdout


def test_create_above_the_pool_max_is_refused_naming_both(server: Server, pool: str) -> None:
    for flags, words in (
        (["--memory", "1Gi"], ["spec.resources.memory", "sandboxMax.memory"]),
        (["--memory", "0"], ["spec.resources.memory"]),
        (["--cpu", "0.0001"], ["spec.resources.cpu"]),
        (["--pids", "0"], ["spec.resources.pids"]),
    ):
        result = server.fsb("run", "too-big", "--image", "x", "--pool", pool, *flags)
        assert result.returncode == 2, result.stderr
        for word in words:
            assert word in result.stderr, result.stderr
    assert _get(server, "too-big") is None


def test_a_memory_hog_is_oom_killed_and_reported(
    server: Server, pool: str, demo_image: str
) -> None:
    # The shell keeps 200 MB of output in a variable: anonymous memory, far above 32Mi.
    hog = 'x=$(head -c 200000000 /dev/zero | tr "\\0" a); echo survived'
    _run(server, "hog", "--image", demo_image, "--pool", pool, "--", "sh", "-c", hog)
    obj = _wait(
        server,
        "hog",
        lambda o: o and o["status"]["phase"] in {"Failed", "Succeeded"},
        60,
        "an exit",
    )
    status = obj["status"]
    assert status["phase"] == "Failed", status
    assert status["exitCode"] == 137, status
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert ready["reason"] == "OOMKilled", status
    assert "survived" not in _logs(server, "hog")
    assert server.fsb("delete", "hog", "--wait").returncode == 0


def test_a_fork_bomb_stops_at_the_pids_limit_and_the_sandbox_survives(
    server: Server, pool: str, demo_image: str
) -> None:
    # The bomb runs in a child shell, which dies when a fork fails; its parent only uses
    # builtins afterwards (and `exec`), so it needs no free pid to report and stay up. Bounded
    # at 500 so that a missing limit cannot exhaust the host.
    bomb = (
        "sh -c 'i=0; while [ $i -lt 500 ]; do sleep 600 & i=$((i+1)); echo $i > /tmp/n; done' "
        "2>/dev/null; read n < /tmp/n; echo forked=$n; exec sleep 3600"
    )
    made = _run(server, "bomb", "--image", demo_image, "--pool", pool, "--", "sh", "-c", bomb)
    cid = made["status"]["containerID"]
    deadline = time.monotonic() + 60
    while "forked=" not in (out := _logs(server, "bomb")) and time.monotonic() < deadline:
        time.sleep(0.3)
    assert "forked=" in out, out
    forked = int(out.split("forked=", 1)[1].split()[0])
    assert 0 < forked < PIDS, out
    cgroup = _cgroup_dir(server, cid, "pids")
    assert (cgroup / "pids.max").read_text().strip() == str(PIDS)
    assert int((cgroup / "pids.current").read_text()) <= PIDS
    time.sleep(1)
    obj = _get(server, "bomb")
    assert obj is not None and obj["status"]["phase"] == "Running", obj
    assert server.fsb("delete", "bomb", "--wait").returncode == 0


def test_the_disk_limit_holds_from_inside_and_the_neighbour_is_unaffected(
    server: Server, pool: str, demo_image: str
) -> None:
    """`fsb run --disk 8Mi`: writing 24 MiB inside fails with ENOSPC, the sandbox keeps running
    (an exec works after it), and a sandbox with the default limit writes the same."""
    fill = "dd if=/dev/zero of=/fill bs=1M count=24 2>&1; echo dd-exit=$?"
    for name, flags in (("disk-small", ["--disk", "8Mi"]), ("disk-default", [])):
        _run(server, name, "--image", demo_image, "--pool", pool, *flags, "--", "sleep", "600")
    try:
        small = server.fsb("exec", "disk-small", "--", "sh", "-c", fill)
        assert "No space left on device" in small.stdout and "dd-exit=1" in small.stdout, small
        again = server.fsb("exec", "disk-small", "--", "sh", "-c", "df -k / | tail -1; echo up")
        assert again.returncode == 0 and "up" in again.stdout, again
        size_kib = int(again.stdout.split()[1])
        assert size_kib <= 8 * 1024, again.stdout  # the file system is the limit's size
        big = server.fsb("exec", "disk-default", "--", "sh", "-c", fill)
        assert "dd-exit=0" in big.stdout, big
        assert _get(server, "disk-small")["status"]["phase"] == "Running"  # type: ignore[index]
    finally:
        for name in ("disk-small", "disk-default"):
            server.fsb("delete", name, "--wait")


def test_an_image_from_a_registry_not_allowed_is_refused(server: Server, pool: str) -> None:
    for image in ("127.0.0.1:22/x", "169.254.169.254/latest"):
        result = server.fsb("run", "bad-registry", "--image", image, "--pool", pool)
        assert result.returncode == 2, result.stderr
        assert "spec.image: registry" in result.stderr, result.stderr
        assert "docker.io" in result.stderr and "allowed_registries" in result.stderr
    assert _get(server, "bad-registry") is None


def test_a_busy_loop_gets_its_cpu_quota(server: Server, pool: str, demo_image: str) -> None:
    made = _run(
        server,
        "busy",
        "--image",
        demo_image,
        "--pool",
        pool,
        "--",
        "sh",
        "-c",
        "while :; do :; done",
    )
    cid = made["status"]["containerID"]
    cpu = _cgroup_dir(server, cid, "cpu")
    period = int((cpu / "cpu.cfs_period_us").read_text())
    quota = int((cpu / "cpu.cfs_quota_us").read_text())
    assert quota * 1000 // period == CPU_MILLIS, (quota, period)
    acct = _cgroup_dir(server, cid, "cpuacct") / "cpuacct.usage"
    before, began = int(acct.read_text()), time.monotonic()
    time.sleep(2.0)
    used, interval = (int(acct.read_text()) - before) / 1e9, time.monotonic() - began
    bound = quota / period * interval * CPU_FACTOR + CPU_SLACK_SECONDS
    print(f"busy loop: {used:.3f}s CPU in {interval:.2f}s, quota {quota}/{period}us")
    assert 0 < used <= bound
    assert server.fsb("delete", "busy", "--wait").returncode == 0


def test_a_cold_create_reports_pulled_ms_and_the_cli_says_it_is_pulling(
    server: Server, registry_addr: str, tmp_path: Path
) -> None:
    # Agents of one server share its containerd's image store: an image nobody pulled yet is
    # the demo image under a tag of this run.
    demo_image = push_image(build_demo_image(tmp_path), registry_addr, f"cold-{os.getpid()}:1")
    _make_pool(server, "cold", {"capacity": {"poolMin": 1, "poolMax": 1}})
    # stderr on a terminal: the CLI shows its progress line there.
    master, slave = pty.openpty()
    try:
        proc = subprocess.run(
            [FSB, "run", "cold-1", "--image", demo_image, "--pool", "cold", "-o", "json"],
            stdout=subprocess.PIPE,
            stderr=slave,
            env=server.env,
            text=True,
            timeout=120,
        )
        os.close(slave)
        slave = -1
        said = b""
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:
                break
            if not chunk:
                break
            said += chunk
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)
    assert proc.returncode == 0, said
    timings = json.loads(proc.stdout)["status"]["timings"]
    assert timings["pulledMs"] > 0, timings
    text = said.decode(errors="replace")
    assert f"pulling {demo_image}" in text, text
    assert f"pulled {demo_image} in" in text, text
    # Cached now: no pull, no pulledMs, no progress line.
    again = _run(server, "cold-2", "--image", demo_image, "--pool", "cold")
    assert "pulledMs" not in again["status"]["timings"], again["status"]["timings"]
    for name in ("cold-1", "cold-2"):
        assert server.fsb("delete", name, "--wait").returncode == 0


# -- leases --------------------------------------------------------------------------------


def _create_leased(srv: AnyServer, name: str, image: str, pool: str, lease: int) -> str:
    stub, channel = _stub(srv)
    with channel:
        reply = stub.Create(
            fastpath_pb2.CreateRequest(
                name=name, image=image, pool_ref=pool, command=["sleep", "3600"],
                lease_seconds=lease,
            ),
            metadata=_auth(srv),
        )  # fmt: skip
    container: str = reply.container_id
    return container


def _renew(srv: AnyServer, name: str) -> grpc.StatusCode:
    stub, channel = _stub(srv)
    with channel:
        try:
            stub.RenewLease(fastpath_pb2.RenewLeaseRequest(name=name), metadata=_auth(srv))
        except grpc.RpcError as exc:
            code: grpc.StatusCode = exc.code()
            return code
    return grpc.StatusCode.OK


def test_a_renewed_lease_keeps_the_sandbox_and_a_lapsed_one_deletes_it(
    server: Server, pool: str, demo_image: str
) -> None:
    _renew_then_lapse(server, pool, demo_image)


@pytest.mark.kubernetes
def test_a_lapsed_lease_deletes_the_sandbox_through_the_controller(
    request: pytest.FixtureRequest, demo_image: str
) -> None:
    kube = start_kube_server(request)
    try:
        # Agent Pods make no private networks yet (docs/security.md, "Not covered").
        spec = {"capacity": {"poolMin": 1, "poolMax": 1}, "networkMode": "shared"}
        _make_pool(kube, "leases", spec)
        _renew_then_lapse(kube, "leases", demo_image)
    finally:
        purge_kube(kube)


def _renew_then_lapse(server: AnyServer, pool: str, demo_image: str) -> None:
    lease = 5
    cid = _create_leased(server, "leased", demo_image, pool, lease)
    began = time.monotonic()
    # Renewed every second for longer than the lease: still there.
    while time.monotonic() - began < lease + 3:
        assert _renew(server, "leased") is grpc.StatusCode.OK
        last = time.monotonic()
        time.sleep(1)
    assert _get(server, "leased") is not None
    # Renewal stops: deleted, container included (liveness timeout only).
    _wait(server, "leased", lambda o: o is None, 4 * lease + 20, "deletion")
    # A number for the report, not an assertion: last renewal → record gone (lease 5 s).
    print(f"lease {lease}s: record gone {time.monotonic() - last:.1f}s after the last renewal")
    deadline = time.monotonic() + 20
    while cid in server.containers() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert cid not in server.containers()
    assert _renew(server, "leased") is grpc.StatusCode.NOT_FOUND
    _run(server, "unleased", "--image", demo_image, "--pool", pool, "--", "sleep", "60")
    assert _renew(server, "unleased") is grpc.StatusCode.FAILED_PRECONDITION
    assert server.fsb("delete", "unleased", "--wait").returncode == 0


def test_a_lease_that_lapses_while_the_server_is_down_is_collected_after_restart(
    server: Server, pool: str, demo_image: str
) -> None:
    lease = 5
    cid = _create_leased(server, "restart-leased", demo_image, pool, lease)
    assert _renew(server, "restart-leased") is grpc.StatusCode.OK
    server.stop()
    time.sleep(lease + 1)  # lapses while nobody is there to see it
    server.start()
    _wait(server, "restart-leased", lambda o: o is None, 4 * lease + 30, "deletion after restart")
    deadline = time.monotonic() + 20
    while cid in server.containers() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert cid not in server.containers()
