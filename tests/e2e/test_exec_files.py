"""Exec, files and the SDK end to end, on both shapes: a real server, real containerd + runc, the
real agent and the real supervisor as PID 1 of each sandbox (issue 9, items 2, 3 and 7).

`fsb exec` passes stdin and the exit code through, `-t` gives a TTY whose resize reaches the
process; `fsb cp` moves a 200 MiB file both ways with its sha256 kept while the RSS of the
server and of the agent each grow by less than 64 MiB (printed); the issue's SDK example runs
sync and async."""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import json
import os
import pty
import select
import shutil
import struct
import subprocess
import termios
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from fastsandbox import AsyncSandbox, Client, CommandTimeout, Sandbox
from tests.docs_examples import python_blocks, run_block
from tests.e2e._server import FSB
from tests.e2e.conftest import AnyServer

pytestmark = pytest.mark.e2e

MiB = 1024 * 1024
DOC_BLOCKS = python_blocks("sdk.md")


@pytest.fixture(scope="module")
def server(shaped_server: AnyServer) -> AnyServer:
    return shaped_server


def creds(server: AnyServer) -> dict[str, str]:
    env = server.env
    token = env.get("FSB_TOKEN") or (Path(env["FSB_DATA_DIR"]) / "token").read_text().strip()
    return {"endpoint": env["FSB_ENDPOINT"], "token": token, "ca_file": str(server.ca_file)}


@pytest.fixture
def box(server: AnyServer, demo_image: str) -> Iterator[str]:
    """An idle sandbox (no command: the supervisor keeps it up)."""
    name = f"io-{os.getpid()}-{time.monotonic_ns() % 100000}"
    result = server.fsb("run", name, "--image", demo_image)
    assert result.returncode == 0, result.stderr
    try:
        yield name
    finally:
        server.fsb("delete", name, "--wait")


def test_exec_passes_stdin_and_exit_code(server: AnyServer, box: str) -> None:
    result = subprocess.run(
        [FSB, "exec", box, "-i", "--", "sh", "-c", "tr a-z A-Z; echo err >&2; exit 7"],
        input="hello\n",
        capture_output=True,
        text=True,
        env=server.env,
        timeout=60,
    )
    assert result.returncode == 7, result.stderr
    assert result.stdout == "HELLO\n"
    assert result.stderr == "err\n"
    timed = server.fsb("exec", box, "--timeout", "1", "--", "sleep", "30")
    assert timed.returncode == 124
    assert "command timed out" in timed.stderr


def _read_until(fd: int, needle: bytes, timeout: float = 30.0) -> bytes:
    seen = b""
    deadline = time.monotonic() + timeout
    while needle not in seen:
        if time.monotonic() > deadline:
            raise AssertionError(f"{needle!r} not in {seen!r}")
        if select.select([fd], [], [], 0.5)[0]:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                break
            if not chunk:
                break
            seen += chunk
    return seen


def test_exec_t_gives_a_tty_and_a_resize_reaches_the_process(server: AnyServer, box: str) -> None:
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    script = 'tty; stty size; trap "stty size" WINCH; echo ready; while :; do sleep 0.1; done'
    proc = subprocess.Popen(
        ["setsid", "-c", FSB, "exec", "-it", box, "--", "sh", "-c", script],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        env=server.env,
    )
    try:
        seen = _read_until(master, b"ready")
        assert b"/dev/pts/" in seen, seen
        assert b"24 80" in seen, seen
        fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
        _read_until(master, b"40 120")
        os.write(master, b"\x03")
        assert proc.wait(timeout=30) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
        os.close(slave)


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _agent_pids(server: AnyServer) -> list[int]:
    """The server's agents (`python -m fastsandbox.agent ... <data dir>/...`); none for the
    Kubernetes shape, whose agents are Pods measured elsewhere."""
    data_dir = server.env.get("FSB_DATA_DIR", "")
    if getattr(server, "proc", None) is None or not data_dir:
        return []
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if b"fastsandbox.agent" in cmd and data_dir.encode() in cmd:
            found.append(int(entry.name))
    return found


def _sha(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(MiB):
            h.update(chunk)
    return h.hexdigest()


def test_cp_200_mib_both_ways_keeps_sha256_with_bounded_rss(
    server: AnyServer, box: str, tmp_path: Path
) -> None:
    src = tmp_path / "big.bin"
    with src.open("wb") as f:
        for _ in range(200):
            f.write(os.urandom(MiB))
    proc = getattr(server, "proc", None)
    watched = {"server": proc.pid} if proc is not None else {}
    watched |= {f"agent {p}": p for p in _agent_pids(server)}
    before = {k: _rss(p) for k, p in watched.items()}
    up = server.fsb("cp", str(src), f"{box}:/tmp/big.bin", timeout=600)
    assert up.returncode == 0, up.stderr
    inside = server.fsb("exec", box, "--", "sha256sum", "/tmp/big.bin")
    assert inside.stdout.split()[0] == _sha(src)
    back = tmp_path / "back.bin"
    down = server.fsb("cp", f"{box}:/tmp/big.bin", str(back), timeout=600)
    assert down.returncode == 0, down.stderr
    assert _sha(back) == _sha(src)
    after = {k: _rss(p) for k, p in watched.items()}
    for key in watched:
        grew = after[key] - before[key]
        print(
            f"RSS {key}: {before[key] / MiB:.1f} -> {after[key] / MiB:.1f} MiB "
            f"(+{grew / MiB:.1f} MiB) over a 200 MiB copy each way"
        )
        assert grew < 64 * MiB, key
    missing = server.fsb("cp", f"{box}:/tmp/nope", str(tmp_path))
    assert missing.returncode == 3 and "/tmp/nope" in missing.stderr
    assert missing.stderr.strip().count("\n") == 0


def test_the_issue_sdk_example_sync(server: AnyServer, demo_image: str) -> None:
    with Sandbox.create(
        image=demo_image,
        name=None,
        pool="default-pool",
        command=None,
        env={"A": "1"},
        workdir="/tmp",
        ports=[8080],
        ttl=600,
        lease=None,
        mode="fast",
        **creds(server),
    ) as sb:
        r = sb.commands.run("echo hi; exit 3", timeout=30)
        assert (r.exit_code, r.stdout) == (3, "hi\n")
        lines: list[str] = []
        sb.commands.run("echo $A; pwd", on_stdout=lines.append, on_stderr=lines.append)
        assert "".join(lines) == "1\n/tmp\n"
        h = sb.commands.run("sleep 5", background=True)
        assert h.kill()
        assert h.wait().exit_code == 137
        with pytest.raises(CommandTimeout):
            sb.commands.run("sleep 30", timeout=1)
        t = sb.pty.create(cols=80, rows=24)
        t.send(b"stty size\n")
        t.wait_for_output(b"24 80")
        t.resize(100, 30)
        t.send(b"stty size\n")
        t.wait_for_output(b"30 100")
        t.kill()
        sb.files.write("/tmp/x.txt", "data")
        assert sb.files.read("/tmp/x.txt") == b"data"
        assert "x.txt" in [e.name for e in sb.files.list("/tmp")]
        sb.files.remove("/tmp/x.txt")
        assert not sb.files.exists("/tmp/x.txt")
        list(sb.logs(follow=False))
        sb.set_timeout(120)
        assert sb.name and sb.id and sb.timings is not None
        assert len(sb.endpoints) == 1
        name = sb.name
        with Client(**creds(server)) as client:
            assert name in [s.name for s in client.list()]
    with Client(**creds(server)) as client:
        assert name not in [s.name for s in client.list()]


def test_the_issue_sdk_example_async(server: AnyServer, demo_image: str) -> None:
    async def main() -> None:
        async with await AsyncSandbox.create(
            image=demo_image, env={"A": "1"}, **creds(server)
        ) as sb:
            r = await sb.commands.run("echo $A; exit 3")
            assert (r.exit_code, r.stdout) == (3, "1\n")
            await sb.files.write("/tmp/y", b"\x00\x01" * 300_000)
            assert await sb.files.read("/tmp/y") == b"\x00\x01" * 300_000
            info = await sb.files.stat("/tmp/y")
            assert info.size == 600_000
            again = await AsyncSandbox.connect(sb.name, **creds(server))
            assert (await again.commands.run(["echo", "again"])).stdout == "again\n"
            await again.close()

    asyncio.run(main())


@pytest.mark.parametrize(("name", "code"), DOC_BLOCKS, ids=[b[0] for b in DOC_BLOCKS])
def test_docs_examples(
    server: AnyServer, demo_image: str, name: str, code: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key, value in creds(server).items():
        monkeypatch.setenv(f"FSB_{key.upper()}", value)
    monkeypatch.setenv("FSB_NAMESPACE", "default")
    run_block(code, name, {'image="busybox"': f'image="{demo_image}"'})


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="no kubectl binary")
def test_kubectl_fs_in_the_cluster(server: AnyServer, box: str, tmp_path: Path) -> None:
    """`kubectl fs` with the real kubectl: the namespace comes from the kubeconfig context, the
    endpoint from the controller's Service (asked of the real apiserver). This cluster has no
    kube-proxy, so the Service's ClusterIP only shows up as the address tried; the exec itself
    goes to a replica with --endpoint."""
    kubeconfig = getattr(server, "kubeconfig", None)
    if kubeconfig is None:
        pytest.skip("the embedded shape has no cluster: tests/unit/test_kubectl_fs.py covers it")
    from lightkube.models.core_v1 import ServicePort, ServiceSpec
    from lightkube.models.meta_v1 import ObjectMeta
    from lightkube.resources.core_v1 import Service

    config = yaml.safe_load(Path(kubeconfig).read_text())
    current = config["current-context"]
    for ctx in config["contexts"]:
        if ctx["name"] == current:
            ctx["context"]["namespace"] = "default"  # where the server's sandboxes live
    plugin_config = tmp_path / "kubeconfig"
    plugin_config.write_text(yaml.safe_dump(config))
    system_ns = server.system_namespace  # type: ignore[union-attr]
    admin = server.admin()  # type: ignore[union-attr]
    svc = Service(
        metadata=ObjectMeta(name="fsb-e2e-fastpath", namespace=system_ns),
        spec=ServiceSpec(ports=[ServicePort(name="fastpath", port=9090)]),
    )
    admin.create(svc)
    try:
        created = admin.get(Service, "fsb-e2e-fastpath", namespace=system_ns)
        assert created.spec is not None
        cluster_ip = created.spec.clusterIP
        env = {
            k: v for k, v in server.env.items() if k not in ("FSB_ENDPOINT", "FSB_NAMESPACE")
        } | {
            "PATH": f"{Path(FSB).parent}{os.pathsep}{os.environ['PATH']}",
            "KUBECONFIG": str(plugin_config),
            "FSB_CONTROLLER_SERVICE": f"{system_ns}/fsb-e2e-fastpath",
        }
        ran = subprocess.run(
            [
                "kubectl",
                "fs",
                "exec",
                "--endpoint",
                server.env["FSB_ENDPOINT"],
                box,
                "--",
                "sh",
                "-c",
                "echo from-kubectl; exit 5",
            ],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
        assert ran.returncode == 5, ran.stderr
        assert ran.stdout == "from-kubectl\n"
        unrouted = subprocess.run(
            ["kubectl", "fs", "get", box], capture_output=True, text=True, env=env, timeout=60
        )
        assert unrouted.returncode != 0
        assert f"{cluster_ip}:9090" in unrouted.stderr, unrouted.stderr
    finally:
        admin.delete(Service, "fsb-e2e-fastpath", namespace=system_ns)
        admin.close()


def test_exec_tty_and_files_in_a_gvisor_pool(server: AnyServer, demo_image: str) -> None:
    """The same exec/PTY/files path with runsc underneath (the gVisor kernel shows in dmesg)."""
    made = server.fsb(
        # Shared: gVisor sandboxes refuse private networks until the runsc wrapper enters
        # the spec's namespace (docs/security.md).
        "pool",
        "create",
        "gv",
        "--network-mode",
        "shared",
        "--runtime",
        "gvisor",
        "--min",
        "1",
    )
    assert made.returncode == 0, made.stderr
    try:
        deadline = time.monotonic() + 90  # bounds a failing start only
        while time.monotonic() < deadline:
            got = server.fsb("pool", "get", "gv", "-o", "json")
            if got.returncode == 0 and json.loads(got.stdout)["status"]["agents"]["ready"]:
                break
            time.sleep(0.3)
        with Sandbox.create(image=demo_image, pool="gv", **creds(server)) as sb:
            r = sb.commands.run("dmesg; echo hi; exit 3", timeout=60)
            assert r.exit_code == 3 and r.stdout.endswith("hi\n")
            assert "gVisor" in r.stdout
            t = sb.pty.create(cols=70, rows=20, cmd=["sh", "-c", "tty; stty size"])
            assert t.wait() == 0
            assert b"20 70" in t.output
            sb.files.write("/tmp/g.txt", "gvisor data")
            assert sb.files.read("/tmp/g.txt") == b"gvisor data"
    finally:
        server.fsb("pool", "delete", "gv")
