"""The deployable image (`scripts/build-image`), built for real, pushed to the session's loopback
registry and run by the session's containerd: what deploy/ and the agent Pods rely on is in it.

Part of `make test`: a cold build debootstraps Debian (minutes); scripts/build-image caches the
base layer and the app's wheels under ~/.cache/fastsandbox, so a warm run costs seconds.

`ctr run REF ID ARGV...` replaces the whole argv (entrypoint included) and cannot change the
user, unlike a Pod's `args:` and `runAsUser`; so besides the image itself two config-only tags of
the same layers are pushed, shaped as the manifests use the image: `help` (cmd `--help`: the
entrypoint followed by args, as in a Pod with `args: [--help]`) and `root` (user 0, as agent Pods
and the janitor run).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import grpc
import pytest
import yaml

from fastsandbox.api._proto.fastsandbox.v1 import agent_pb2, agent_pb2_grpc
from fastsandbox.api.models import ObjectMeta, SandboxPool, SandboxPoolSpec
from fastsandbox.fleet.kubernetes import KubernetesFleet
from tests.infra import REPO_ROOT, ContainerdProc, RegistryProc

pytestmark = [
    pytest.mark.image,
    pytest.mark.integration,
    pytest.mark.timeout(1800),
]

BUILD = REPO_ROOT / "scripts" / "build-image"
NAMESPACE = "fsb-image-it"
INIT_PATH = "/usr/local/libexec/fastsandbox/fsb-supervisor"
ENTRYPOINT = "/opt/fastsandbox/bin/fsb"
FSB_UID = 65532
READY_TIMEOUT = 60.0


@dataclass(frozen=True)
class Image:
    name: str  # fastsandbox/fastsandbox:<version>, as the manifests name it
    ref: str  # the image as built, pushed: registry/<name>
    help: str  # same layers, cmd --help
    root: str  # same layers, user 0
    layout: Path
    archive: Path  # --archive: the docker-archive tar to load into nodes


def _run(argv: list[str], timeout: float = 120) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    assert proc.returncode == 0, f"{argv!r} exited {proc.returncode}: {proc.stderr[-3000:]}"
    return proc.stdout


def _push(layout: Path, tag: str, dest: str) -> None:
    _run(["skopeo", "copy", "--quiet", "--dest-tls-verify=false", f"oci:{layout}:{tag}",
          f"docker://{dest}"])  # fmt: skip


@pytest.fixture(scope="module")
def image(
    registry: RegistryProc, containerd: ContainerdProc, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Image]:
    layout = tmp_path_factory.mktemp("image") / "layout"
    archive = layout.parent / "fsb.tar"
    started = time.monotonic()
    argv = [str(BUILD), "--out", str(layout), "--push", registry.addr, "--archive", str(archive)]
    out = _run(argv, timeout=1500)
    print(f"scripts/build-image took {time.monotonic() - started:.0f}s")
    lines = out.split()
    version = _run(["umoci", "list", "--layout", str(layout)]).split()
    assert len(version) == 1, version
    name = f"fastsandbox/fastsandbox:{version[0]}"
    ref = f"{registry.addr}/{name}"
    assert lines == [f"oci:{layout}:{version[0]}", ref]

    for tag, config in {
        "help": ["--config.cmd", "--help"],
        "root": ["--config.user", "0:0"],
    }.items():
        _run(["umoci", "config", "--image", f"{layout}:{version[0]}", "--tag", tag, *config])
        _push(layout, tag, f"{registry.addr}/fastsandbox/fastsandbox:{tag}")
    help_ = f"{registry.addr}/fastsandbox/fastsandbox:help"
    root = f"{registry.addr}/fastsandbox/fastsandbox:root"
    for r in (ref, help_, root):
        containerd.ctr("images", "pull", "--plain-http", r, namespace=NAMESPACE)
    try:
        yield Image(name, ref, help_, root, layout, archive)
    finally:
        for r in (ref, help_, root):
            containerd.ctr("images", "rm", r, namespace=NAMESPACE, check=False)


def _ctr_run(
    containerd: ContainerdProc, cgroup_parent: str, ref: str, *args: str, timeout: float = 120
) -> str:
    """`ctr run --rm` as the Deployments run it (read-only root filesystem); its stdout."""
    cid = f"img-{uuid.uuid4().hex[:8]}"
    argv = ["ctr", "-a", str(containerd.socket), "-n", NAMESPACE, "run", "--rm", "--read-only",
            "--cgroup", f"{cgroup_parent}/{cid}", ref, cid, *args]  # fmt: skip
    return _run(argv, timeout=timeout)


def test_manifests_reference_the_image_the_script_builds(image: Image) -> None:
    images = set()
    for path in (REPO_ROOT / "deploy").glob("*.yaml"):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") in {"Deployment", "DaemonSet"}:
                for container in doc["spec"]["template"]["spec"]["containers"]:
                    images.add(container["image"])
                    if "--agent-image" in container.get("args", []):
                        args = container["args"]
                        images.add(args[args.index("--agent-image") + 1])
    assert images == {image.name}


def test_the_archive_loads_into_containerd_under_the_manifests_name(
    image: Image, containerd: ContainerdProc, cgroup_parent: str
) -> None:
    """`ctr -n k8s.io images import` on a node: the kubelet then finds the manifests' image
    (`imagePullPolicy: IfNotPresent`) without a registry."""
    namespace = f"{NAMESPACE}-import"
    full = f"docker.io/{image.name}"
    try:
        containerd.ctr("images", "import", str(image.archive), namespace=namespace)
        assert full in containerd.ctr("images", "ls", "-q", namespace=namespace).split()
        cid = f"img-{uuid.uuid4().hex[:8]}"
        run = ["run", "--rm", "--read-only", "--cgroup", f"{cgroup_parent}/{cid}", full, cid]
        out = containerd.ctr(*run, "fsb", "janitor", "--help", namespace=namespace)
        assert "--node" in out
    finally:
        containerd.ctr("images", "rm", full, namespace=namespace, check=False)


def test_image_config(image: Image) -> None:
    raw = _run(["skopeo", "inspect", "--config", "--tls-verify=false", f"docker://{image.ref}"])
    config = json.loads(raw)["config"]
    assert config["Entrypoint"] == [ENTRYPOINT]
    assert not config.get("Cmd")
    assert config["User"] == f"{FSB_UID}:{FSB_UID}"
    env = dict(item.split("=", 1) for item in config["Env"])
    assert env["PATH"].startswith("/opt/fastsandbox/bin:")


def test_entrypoint_is_fsb(image: Image, containerd: ContainerdProc, cgroup_parent: str) -> None:
    out = _ctr_run(containerd, cgroup_parent, image.help)
    assert "Usage: fsb" in out, out
    for command in ("controller", "agent", "janitor"):
        assert f"│ {command} " in out, out


@pytest.mark.parametrize(
    ("command", "expect"),
    [
        ("agent", ["--pod-uid", "--containerd-socket"]),
        ("controller", ["--agent-image"]),
        ("janitor", ["--node"]),
    ],
)
def test_every_command_of_the_manifests_starts(
    image: Image, containerd: ContainerdProc, cgroup_parent: str, command: str, expect: list[str]
) -> None:
    out = _ctr_run(containerd, cgroup_parent, image.ref, "fsb", command, "--help")
    for word in expect:
        assert word in out, out


def test_the_agent_pods_container_starts(
    image: Image, containerd: ContainerdProc, cgroup_parent: str
) -> None:
    """The argv an agent Pod's container gets from this image (the fleet's `command`, else the
    entrypoint, then its `args`), with `--help` appended: parses, and is `fsb agent`."""
    pool = SandboxPool(
        metadata=ObjectMeta(name="p1", namespace="team", uid="uid-1"), spec=SandboxPoolSpec()
    )
    fleet = KubernetesFleet(cast(Any, None), agent_image=image.ref)
    (container,) = fleet.pod_manifest(pool, "p1-abcde")["spec"]["containers"]
    values = {"POD_NAME": "p1-abcde", "POD_IP": "10.0.0.7", "POD_UID": "uid-2"}
    args = [re.sub(r"\$\((\w+)\)", lambda m: values.get(m[1], ""), a) for a in container["args"]]
    argv = [*(container.get("command") or [ENTRYPOINT]), *args, "--help"]
    out = _ctr_run(containerd, cgroup_parent, image.ref, *argv)
    assert "usage: fsb agent" in out.lower(), out


# Run by the image's python as uid 65532: the package and its gRPC modules import, the agent
# finds fsb-init at the system path (and it is static: sandboxes' images need not have a libc),
# `ctr` runs, and TLS has CA certificates.
PROBE = """
import json, os, pwd, shutil, ssl, struct, subprocess, sys
import fastsandbox
from fastsandbox.agent.init_binary import find_init
from fastsandbox.api._proto.fastsandbox.v1 import agent_pb2_grpc

def interpreter(path):
    with open(path, "rb") as f:
        elf = f.read()
    assert elf[:4] == b"\\x7fELF", path
    phoff, = struct.unpack_from("<Q", elf, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    types = [struct.unpack_from("<I", elf, phoff + i * phentsize)[0] for i in range(phnum)]
    return 3 in types  # PT_INTERP: dynamically linked

ctr = shutil.which("ctr")
init = find_init()
print(json.dumps({
    "uid": os.getuid(),
    "user": pwd.getpwuid(os.getuid()).pw_name,
    "python": list(sys.version_info[:2]),
    "prefix": sys.prefix,
    "module": fastsandbox.__file__,
    "init": str(init),
    "init_dynamic": interpreter(init),
    "init_exit": subprocess.run([str(init), "--", "/bin/sh", "-c", "exit 3"]).returncode,
    "ctr": ctr,
    "ctr_version": subprocess.run([ctr, "--version"], capture_output=True, text=True).stdout,
    "cas": ssl.create_default_context().cert_store_stats()["x509_ca"],
    "pip": shutil.which("pip"),
}))
"""


def test_python_package_fsb_init_and_ctr_are_in_the_image(
    image: Image, containerd: ContainerdProc, cgroup_parent: str
) -> None:
    out = _ctr_run(containerd, cgroup_parent, image.ref, "python", "-c", "import fastsandbox")
    assert out == ""
    facts = json.loads(_ctr_run(containerd, cgroup_parent, image.ref, "python", "-c", PROBE))
    assert (facts["uid"], facts["user"]) == (FSB_UID, "fastsandbox")
    assert facts["python"] == [3, 11]
    assert facts["prefix"] == "/opt/fastsandbox"
    assert facts["module"].startswith("/opt/fastsandbox/lib/python3.11/site-packages/")
    assert facts["init"] == INIT_PATH
    assert facts["init_dynamic"] is False
    assert facts["init_exit"] == 3
    assert facts["ctr"] == "/usr/bin/ctr"
    assert facts["ctr_version"].startswith("ctr github.com/containerd/containerd")
    assert facts["cas"] > 50
    assert facts["pip"] is None  # no package manager left in the venv


# -- the agent, in the image, against the real containerd -----------------------------------------


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    # Mounted at the same path in the container: containerd opens the agent's log paths on the
    # host (as in an agent Pod's hostPath); short, for the agent's unix socket path.
    path = Path(tempfile.mkdtemp(prefix="fsb-img-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.asynccontextmanager
async def _stub(socket: Path) -> AsyncIterator[agent_pb2_grpc.AgentAsyncStub]:
    channel = grpc.aio.insecure_channel(f"unix://{socket}")
    try:
        yield agent_pb2_grpc.AgentStub(channel)
    finally:
        await channel.close(None)


async def test_agent_in_the_image_pulls_with_its_ctr_and_runs_a_sandbox(
    image: Image,
    containerd: ContainerdProc,
    registry: RegistryProc,
    demo_image: str,
    cgroup_parent: str,
    shared_dir: Path,
) -> None:
    """`fsb agent` as an agent Pod runs it: uid 0, read-only root filesystem, the containerd
    socket mounted at /run/containerd/containerd.sock, state in a directory the host sees at the
    same path. Its image pulls go through the image's own `ctr` (host network here, for the
    loopback registry; a Pod has its own). `--init-path none`: outside a Pod (no --pod-uid) the
    agent would hand containerd the image's fsb-init path, which exists only in the image; in a
    Pod it stages it into the hostPath state directory first (agent/pod.py). `--logger-path
    none` for the same reason: the shim, on the host, starts the log driver."""
    cid = f"img-agent-{uuid.uuid4().hex[:8]}"
    socket = shared_dir / "agent.sock"
    tmp = shared_dir / "tmp"
    tmp.mkdir()
    argv = [
        "ctr", "-a", str(containerd.socket), "-n", NAMESPACE, "run", "--rm", "--read-only",
        "--net-host", "--cgroup", f"{cgroup_parent}/{cid}",
        "--mount", f"type=bind,src={containerd.socket},dst=/run/containerd/containerd.sock,"
        "options=rbind:rw",
        # /tmp first: shared_dir is under /tmp and must be mounted over it, not hidden by it.
        "--mount", f"type=bind,src={tmp},dst=/tmp,options=rbind:rw",
        "--mount", f"type=bind,src={shared_dir},dst={shared_dir},options=rbind:rw",
        image.root, cid,
        "fsb", "agent", "--name", cid, "--pool", "image-it", f"--listen=unix://{socket}",
        f"--state-dir={shared_dir}/agents/{cid}",
        "--containerd-socket=/run/containerd/containerd.sock",
        f"--containerd-namespace={NAMESPACE}", f"--cgroup-parent={cgroup_parent}",
        f"--insecure-registry={registry.addr}", "--init-path=none", "--logger-path=none",
        "--capacity=1",
        "--grace=1", "--log-format=json",
    ]  # fmt: skip
    log = shared_dir / "agent.log"
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out
        )
    try:
        deadline = time.monotonic() + READY_TIMEOUT
        while not socket.exists():
            assert proc.returncode is None, f"agent exited {proc.returncode}: {log.read_text()}"
            assert time.monotonic() < deadline, f"agent never served: {log.read_text()}"
            await asyncio.sleep(0.1)
        async with _stub(socket) as stub:
            status = await stub.Status(agent_pb2.StatusRequest(), timeout=READY_TIMEOUT)
            assert (status.pool, status.capacity) == ("image-it", 1)
            await stub.PullImage(agent_pb2.PullImageRequest(image=demo_image), timeout=120)
            assert demo_image in containerd.ctr("images", "ls", "-q", namespace=NAMESPACE)
            sandbox_id = f"img-sbx-{uuid.uuid4().hex[:8]}"
            spec = agent_pb2.SandboxRuntimeSpec(
                sandbox_id=sandbox_id,
                namespace="default",
                name=sandbox_id,
                image=demo_image,
                command=["sh", "-c", "echo hello from $WHO"],
                env=[agent_pb2.KeyValue(key="WHO", value="the image")],
            )
            await stub.CreateSandbox(agent_pb2.CreateSandboxRequest(spec=spec), timeout=120)
            logs, until = b"", time.monotonic() + 30
            while b"\n" not in logs and time.monotonic() < until:
                call = stub.Logs(agent_pb2.SandboxLogsRequest(sandbox_id=sandbox_id))
                logs = b"".join([chunk.data async for chunk in call])
                await asyncio.sleep(0.1)
            assert logs == b"hello from the image\n"
            await stub.DeleteSandbox(
                agent_pb2.DeleteSandboxRequest(sandbox_id=sandbox_id), timeout=60
            )
        # PID 1 of its container, as in a Pod: SIGTERM must stop it promptly and cleanly.
        containerd.ctr("tasks", "kill", "-s", "SIGTERM", cid, namespace=NAMESPACE)
        assert await asyncio.wait_for(proc.wait(), 30) == 0, log.read_text()
    finally:
        if proc.returncode is None:
            containerd.ctr("tasks", "kill", "-s", "SIGKILL", cid, namespace=NAMESPACE, check=False)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), 30)
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        containerd.ctr("containers", "rm", cid, namespace=NAMESPACE, check=False)
