"""The `fsb` CLI end to end, on both shapes (`shape` in tests/e2e/conftest.py): against a real
`fsb server` (real containerd + runc, a real loopback registry, real SQLite), and against
`fsb controller` replicas on a real kube-apiserver whose agents are Pods of a process kubelet
(same containerd, namespace `k8s.io`). Scenarios of the issues' "done when" lists; the few checks
that look inside one shape's storage are guarded by `shape`."""

from __future__ import annotations

import json
import signal
import sqlite3
import time
from collections.abc import Iterator

import pytest

from tests.e2e._server import Server, new_server, purge
from tests.e2e.conftest import AnyServer

pytestmark = pytest.mark.e2e

SLEEP = ["--", "sleep", "3600"]


@pytest.fixture(scope="module")
def server(shaped_server: AnyServer) -> AnyServer:
    return shaped_server


@pytest.fixture
def cleanup(server: AnyServer) -> Iterator[list[str]]:
    """Names (optionally `ns/name`) the test created; deleted after it, whatever happened."""
    names: list[str] = []
    yield names
    for item in names:
        ns, _, name = item.rpartition("/")
        server.fsb("delete", name, "--wait", "-n", ns or "default")


def wait_for_logs(server: AnyServer, name: str, needle: str, timeout: float = 15.0) -> str:
    deadline = time.monotonic() + timeout
    out = ""
    while time.monotonic() < deadline:
        out = server.fsb("logs", name).stdout
        if needle in out:
            return out
        time.sleep(0.2)
    raise AssertionError(f"{needle!r} not in logs of {name}: {out!r}")


def test_env_and_workdir_reach_the_process(server: AnyServer, demo_image: str, cleanup: list[str]):
    cleanup.append("envwd")
    result = server.fsb(
        "run",
        "envwd",
        "--image",
        demo_image,
        "-e",
        "V=hello_from_env",
        "-e",
        "W=two words",
        "-w",
        "/tmp",
        "--",
        "sh",
        "-c",
        'echo "$V"; echo "$W"; pwd; sleep 3600',
    )
    assert result.returncode == 0, result.stderr
    out = wait_for_logs(server, "envwd", "/tmp")
    assert out.splitlines()[:3] == ["hello_from_env", "two words", "/tmp"]


def test_image_defaults_are_used_when_spec_is_empty(
    server: AnyServer, demo_image: str, cleanup: list[str]
) -> None:
    # The demo image's Cmd is /bin/sh with no tty: it exits at once; only creation is checked.
    cleanup.append("defaults")
    result = server.fsb("run", "defaults", "--image", demo_image, "-o", "json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["status"]["containerID"]


def test_list_and_get_show_running_with_agent_and_endpoints(
    server: AnyServer, demo_image: str, cleanup: list[str]
) -> None:
    cleanup.append("web")
    result = server.fsb("run", "web", "--image", demo_image, "-p", "8080", "-o", "json", *SLEEP)
    assert result.returncode == 0, result.stderr
    created = json.loads(result.stdout)
    assert set(created) == {"apiVersion", "kind", "metadata", "spec", "status"}

    got = server.fsb_json("get", "web")
    assert got["apiVersion"] == "fastsandbox.io/v1alpha1"
    assert got["kind"] == "Sandbox"
    status = got["status"]
    assert status["phase"] == "Running"
    assert status["assignedAgent"]
    assert status["containerID"] == created["status"]["containerID"]
    (endpoint,) = status["endpoints"]
    host, port = endpoint.rsplit(":", 1)
    assert host == status["agentIP"]
    pool = server.fsb_json("pool", "get", got["spec"]["poolRef"])
    if pool["spec"].get("networkMode", "private") == "shared":
        assert int(port) == 8080  # the agent's own namespace: the port itself
    else:
        assert int(port) != 8080  # published: a host port of the agent's own for this sandbox
    timings = status["timings"]
    assert 0 <= timings["acceptedMs"] <= timings["scheduledMs"] <= timings["runtimeReadyMs"]

    listed = server.fsb_json("list")
    assert [i["metadata"]["name"] for i in listed["items"]].count("web") == 1
    assert server.fsb_json("list", "-A")["items"]


def test_delete_removes_record_container_and_snapshot(server: AnyServer, demo_image: str) -> None:
    result = server.fsb("run", "gone", "--image", demo_image, "-o", "json", *SLEEP)
    assert result.returncode == 0, result.stderr
    cid = json.loads(result.stdout)["status"]["containerID"]
    assert cid in server.containers()
    assert cid in server.snapshots()

    deleted = server.fsb("delete", "gone", "--wait")
    assert deleted.returncode == 0, deleted.stderr
    assert server.fsb("get", "gone").returncode == 3
    assert cid not in server.containers()
    assert cid not in server.snapshots()


def test_same_name_recreated_three_times_without_waiting(
    server: AnyServer, demo_image: str
) -> None:
    ids = []
    for _ in range(3):
        result = server.fsb("run", "again", "--image", demo_image, "-o", "json", *SLEEP)
        assert result.returncode == 0, result.stderr
        obj = json.loads(result.stdout)
        ids.append((obj["metadata"]["uid"], obj["status"]["containerID"]))
        assert server.fsb("delete", "again", "--wait").returncode == 0
    assert len(set(ids)) == 3


def test_delete_without_wait_finishes_in_the_background(server: AnyServer, demo_image: str):
    assert server.fsb("run", "bg", "--image", demo_image, *SLEEP).returncode == 0
    assert server.fsb("delete", "bg").returncode == 0
    deadline = time.monotonic() + 30
    while server.fsb("get", "bg").returncode != 3:
        assert time.monotonic() < deadline, "record still there 30 s after delete"
        time.sleep(0.2)


@pytest.mark.parametrize(
    ("args", "field"),
    [
        ([], "spec.image: required"),
        (["--image", "IMG", "--pool", ""], "spec.poolRef: required"),
        (["--image", "IMG", "-p", "0"], "spec.exposedPorts[0]: must be 1..65535"),
        (["--image", "IMG", "-p", "65536"], "spec.exposedPorts[0]: must be 1..65535"),
        (["--image", "IMG", "-e", "A=1", "-e", "=x"], "spec.env[1].name: required"),
        (["--image", "IMG", "--failure-policy", "Bogus"], "must be Manual or AutoRecreate"),
    ],
)
def test_validation_errors_name_the_field(
    server: AnyServer, demo_image: str, args: list[str], field: str
) -> None:
    argv = [a.replace("IMG", demo_image) for a in args]
    result = server.fsb("run", "bad", *argv)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert field in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert server.fsb("get", "bad").returncode == 3


def test_unknown_pool_is_not_found(server: AnyServer, demo_image: str) -> None:
    result = server.fsb("run", "nopool", "--image", demo_image, "--pool", "no-such-pool")
    assert result.returncode == 3, result.stderr
    assert "no-such-pool" in result.stderr


def test_bad_token_is_refused(server: AnyServer) -> None:
    result = server.fsb("list", env={"FSB_TOKEN": "wrong"})
    assert result.returncode == 6
    assert "invalid API token" in result.stderr
    # A token on argv is refused before anything is sent, pointing to --token-file.
    result = server.fsb("list", "--token", "wrong")
    assert result.returncode == 2
    assert "--token-file" in result.stderr


def test_capacity_exhausted_then_freed(server: AnyServer, demo_image: str) -> None:
    pool = "cap"
    made = server.fsb(
        "pool", "create", pool, *server.pool_args, "--min", "1", "--max", "1", "--per-agent", "2"
    )
    assert made.returncode == 0, made.stderr
    try:
        _wait_pool_ready(server, pool, agents=1)
        for name in ("cap-1", "cap-2"):
            ok = server.fsb("run", name, "--image", demo_image, "--pool", pool, *SLEEP)
            assert ok.returncode == 0, ok.stderr
        third = server.fsb("run", "cap-3", "--image", demo_image, "--pool", pool, *SLEEP)
        assert third.returncode == 5, third.stderr
        assert server.fsb("get", "cap-3").returncode == 3  # nothing half-made
        assert server.fsb("delete", "cap-1", "--wait").returncode == 0
        again = server.fsb("run", "cap-3", "--image", demo_image, "--pool", pool, *SLEEP)
        assert again.returncode == 0, again.stderr
    finally:
        for name in ("cap-1", "cap-2", "cap-3"):
            server.fsb("delete", name, "--wait")
        server.fsb("pool", "delete", pool)


def test_same_port_lands_on_different_agents(server: AnyServer, demo_image: str) -> None:
    pool = "ports"
    # Shared: sandboxes join their agent's namespace, so a port is exclusive per agent
    # (tests/e2e/test_private_network.py has the private twin: both on one agent).
    made = server.fsb(
        "pool", "create", pool, "--network-mode", "shared", "--min", "2", "--max", "2"
    )
    assert made.returncode == 0, made.stderr
    try:
        _wait_pool_ready(server, pool, agents=2)
        agents = []
        for name in ("port-a", "port-b"):
            out = server.fsb(
                "run",
                name,
                "--image",
                demo_image,
                "--pool",
                pool,
                "-p",
                "8080",
                "-o",
                "json",
                *SLEEP,
            )
            assert out.returncode == 0, out.stderr
            status = json.loads(out.stdout)["status"]
            assert status["endpoints"][0].endswith(":8080")
            agents.append(status["assignedAgent"])
        assert agents[0] != agents[1]
        third = server.fsb(
            "run", "port-c", "--image", demo_image, "--pool", pool, "-p", "8080", *SLEEP
        )
        assert third.returncode == 5, third.stderr
    finally:
        for name in ("port-a", "port-b", "port-c"):
            server.fsb("delete", name, "--wait")
        server.fsb("pool", "delete", pool)


def _record_phases(server: Server, name: str) -> list[tuple[str, str]]:
    """(event type, phase) of every stored change of sandbox `name`, read from the SQLite file."""
    db = sqlite3.connect(f"file:{server.data_dir / 'state.db'}?mode=ro", uri=True)
    try:
        rows = db.execute(
            "SELECT type, body FROM events WHERE kind = 'Sandbox' ORDER BY resource_version"
        ).fetchall()
    finally:
        db.close()
    phases = []
    for kind, body in rows:
        obj = json.loads(body)
        if obj["metadata"]["name"] == name:
            phases.append((kind, obj.get("status", {}).get("phase", "")))
    return phases


def test_fast_and_strong_modes(
    server: AnyServer, shape: str, demo_image: str, cleanup: list[str]
) -> None:
    cleanup.extend(["m-fast", "m-strong"])
    fast = server.fsb(
        "run", "m-fast", "--image", demo_image, "--mode", "fast", "-o", "json", *SLEEP
    )
    strong = server.fsb(
        "run", "m-strong", "--image", demo_image, "--mode", "strong", "-o", "json", *SLEEP
    )
    assert fast.returncode == 0, fast.stderr
    assert strong.returncode == 0, strong.stderr
    strong_obj = json.loads(strong.stdout)
    assert strong_obj["status"]["phase"] == "Running"
    assert server.fsb_json("get", "m-strong")["metadata"]["uid"] == strong_obj["metadata"]["uid"]
    assert server.fsb_json("get", "m-fast")["status"]["phase"] == "Running"
    if shape == "embedded":
        # Strong: the record was stored (Pending) before the container started; Fast: the
        # first stored version is already Running (agent first, record right after). On
        # Kubernetes a create never carries status (the status subresource owns it): a Fast
        # record is created, then its status written, by the replica that started it.
        assert isinstance(server, Server)
        assert _record_phases(server, "m-strong")[0] == ("ADDED", "Pending")
        assert _record_phases(server, "m-fast")[0] == ("ADDED", "Running")


def test_server_kill9_restart_keeps_sandboxes(
    shape: str, server: AnyServer, registry_addr: str, demo_image: str
) -> None:
    # Embedded: a server of its own. Kubernetes: every replica of the module's controller is
    # killed (agents and sandboxes are cluster state and keep running), then started again.
    srv: AnyServer = new_server(registry_addr) if shape == "embedded" else server
    try:
        srv.start()
        assert (
            srv.fsb(
                "pool",
                "create",
                "k9",
                *srv.pool_args,
                "--min",
                "1",
                "--max",
                "1",
                "--per-agent",
                "2",
            ).returncode
            == 0
        )
        _wait_pool_ready(srv, "k9", agents=1)
        made = srv.fsb(
            "run",
            "survivor",
            "--image",
            demo_image,
            "--pool",
            "k9",
            "-o",
            "json",
            "--",
            "sh",
            "-c",
            "echo alive; sleep 3600",
        )
        assert made.returncode == 0, made.stderr
        before = json.loads(made.stdout)
        cid = before["status"]["containerID"]

        srv.stop(signal.SIGKILL)
        assert cid in srv.running_tasks()  # the sandbox outlives the server
        srv.start()

        after = srv.fsb_json("get", "survivor")
        assert after["status"]["phase"] == "Running"
        if before["metadata"].get("uid"):
            # On Kubernetes a Fast answer carries no uid: the apiserver assigns it on the
            # record's write just after; the container id is the identity both shapes keep.
            assert after["metadata"]["uid"] == before["metadata"]["uid"]
        assert after["status"]["containerID"] == cid
        assert cid in srv.running_tasks()
        assert "alive" in wait_for_logs(srv, "survivor", "alive")
        # Its slot is still counted: one more fits, the one after is refused.
        assert (
            srv.fsb("run", "second", "--image", demo_image, "--pool", "k9", *SLEEP).returncode == 0
        )
        third = srv.fsb("run", "third", "--image", demo_image, "--pool", "k9", *SLEEP)
        assert third.returncode == 5, third.stderr
    finally:
        for name in ("survivor", "second", "third"):
            srv.fsb("delete", name, "--wait")
        srv.fsb("pool", "delete", "k9")
        if isinstance(srv, Server):
            purge(srv)


def _wait_pool_ready(server: AnyServer, pool: str, *, agents: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    status: dict = {}  # type: ignore[type-arg]
    while time.monotonic() < deadline:
        result = server.fsb("pool", "get", pool, "-o", "json")
        if result.returncode == 0:
            status = json.loads(result.stdout).get("status", {})
            if status.get("agents", {}).get("ready", 0) >= agents:
                return
        time.sleep(0.3)
    raise AssertionError(f"pool {pool} not ready with {agents} agents: {status}")
