"""Real infrastructure for integration tests: a private containerd, a loopback OCI registry, and
the busybox demo image, all started and cleaned up by the test run itself.

Why a module and not only fixtures: integration, contract and e2e suites all need the same
containerd/registry/image; plain functions let each suite wrap them in fixtures of the scope it
wants (see `tests/integration/conftest.py`), and scripts can call them too.

    from tests.infra import start_containerd, start_registry, build_demo_image, push_image

    ctd = start_containerd(tmp_dir)           # own config; socket at tmp_dir/c.sock
    reg = start_registry(tmp_dir)             # docker-registry on 127.0.0.1:<free port>
    layout = build_demo_image(tmp_dir)        # cached in ~/.cache/fastsandbox/demo-image/<key>
    ref = push_image(layout, reg.addr, "busybox:latest")   # -> "127.0.0.1:PORT/busybox:latest"
    ...
    reg.stop(); ctd.stop()                    # stop() also removes every container ctd ran

`missing_requirements()` says why these cannot run here (not root, a binary missing), and
`cannot_run(reason)` acts on it: a skip with that reason on a developer's machine, a failure when
`CI` is set (CI=true), so a broken `scripts/setup` cannot leave CI green with whole tiers skipped.
Everything is started with argv lists, never a shell string.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

import grpc

REPO_ROOT = Path(__file__).resolve().parent.parent
BUILD_SCRIPT = REPO_ROOT / "scripts" / "build-demo-image"
CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fastsandbox"

CONTAINERD_BINARIES = ("containerd", "ctr", "runc", "containerd-shim-runc-v2")
REGISTRY_BINARIES = ("docker-registry", "skopeo")
IMAGE_BINARIES = ("umoci", "busybox")
# unix socket paths are limited to 108 bytes (sun_path) including the NUL.
_MAX_SOCKET_PATH = 107

_CONTAINERD_CONFIG = """version = 2
root = "{root}"
state = "{state}"
disabled_plugins = ["io.containerd.grpc.v1.cri"]

[grpc]
  address = "{socket}"

[debug]
  level = "warn"

[plugins."io.containerd.monitor.v1.cgroups"]
  no_prometheus = true
"""


def in_ci() -> bool:
    """CI sets `CI=true` (GitHub Actions, GitLab, ...); any value but empty/0/false/no counts."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def cannot_run(reason: str) -> NoReturn:
    """This test's tier cannot run here: skip with `reason`, or fail with it under `CI`.

    Why not always skip: a CI run whose setup broke (runc not installed, no root, no Go) would
    otherwise report the integration, e2e, containerd and Kubernetes tiers as skipped and still
    pass. Called from fixtures and tests, so the failure names the test and the reason."""
    import pytest  # here, not at the top: scripts and benchmarks import this module without it

    if in_ci():
        pytest.fail(f"CI is set and this tier cannot run: {reason}", pytrace=False)
    pytest.skip(reason)


def missing_requirements(*, gvisor: bool = False) -> str | None:
    """Why real-infrastructure tests cannot run here, or None when they can."""
    if os.geteuid() != 0:
        return "needs root (containerd, runc and mounts)"
    needed = (
        CONTAINERD_BINARIES + REGISTRY_BINARIES + IMAGE_BINARIES + (("runsc",) if gvisor else ())
    )
    absent = [b for b in needed if shutil.which(b) is None]
    if absent:
        return f"missing binaries: {', '.join(absent)} (run scripts/setup)"
    return None


def _run(
    argv: list[str], *, timeout: float = 60, check: bool = True
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise RuntimeError(
            f"{argv!r} exited {proc.returncode}: {(proc.stderr or proc.stdout)[-800:]}"
        )
    return proc


def _wait_for(
    what: str, ready: object, proc: subprocess.Popen[bytes], log: Path, timeout: float
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        if callable(ready) and ready():
            return
        time.sleep(0.05)
    tail = log.read_text(errors="replace")[-1500:] if log.exists() else ""
    _terminate(proc)
    raise RuntimeError(f"{what} did not become ready (exit {proc.poll()}): {tail}")


def _terminate(proc: subprocess.Popen[bytes], timeout: float = 10) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout)


# -- containerd ----------------------------------------------------------------------------------


@dataclass
class ContainerdProc:
    """A containerd of our own; `socket` is the gRPC address (pass it to ContainerdRuntime)."""

    home: Path
    socket: Path
    proc: subprocess.Popen[bytes]
    log: Path
    _stopped: bool = field(default=False, repr=False)

    def ctr(self, *args: str, namespace: str = "fastsandbox", check: bool = True) -> str:
        """Run `ctr` against this containerd, e.g. `ctd.ctr("snapshots", "ls")`."""
        argv = ["ctr", "-a", str(self.socket), "-n", namespace, *args]
        return _run(argv, check=check).stdout

    def namespaces(self) -> list[str]:
        out = _run(["ctr", "-a", str(self.socket), "namespaces", "ls", "-q"], check=False).stdout
        return [line.strip() for line in out.splitlines() if line.strip()]

    def remove_all_containers(self) -> None:
        """Kill and remove every task, container and active snapshot, in every namespace."""
        for ns in self.namespaces():
            for cid in self.ctr("containers", "ls", "-q", namespace=ns, check=False).split():
                self.ctr("tasks", "kill", "-a", "-s", "SIGKILL", cid, namespace=ns, check=False)
                for _ in range(50):
                    self.ctr("tasks", "rm", "-f", cid, namespace=ns, check=False)
                    if cid not in self.ctr("tasks", "ls", "-q", namespace=ns, check=False).split():
                        break
                    time.sleep(0.1)
                self.ctr("containers", "rm", cid, namespace=ns, check=False)
                self.ctr("snapshots", "rm", cid, namespace=ns, check=False)

    def stop(self) -> None:
        """Remove what the tests left, stop containerd and its shims, unmount, delete `home`."""
        if self._stopped:
            return
        self._stopped = True
        if self.proc.poll() is None:
            with contextlib.suppress(Exception):
                self.remove_all_containers()
        _terminate(self.proc)
        _kill_shims_of(self.socket)
        _unmount_under(self.home)
        shutil.rmtree(self.home, ignore_errors=True)


def _kill_shims_of(sock: Path) -> None:
    """Shims outlive containerd by design; ours are the ones whose argv names our socket."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and b"containerd-shim" in argv[0] and str(sock).encode() in argv:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(entry.name), signal.SIGKILL)


def _unmount_under(path: Path) -> None:
    prefix = str(path.resolve()) + "/"
    mounts = []
    with contextlib.suppress(OSError), open("/proc/self/mountinfo") as f:
        for line in f:
            target = line.split()[4].encode().decode("unicode_escape")
            if target.startswith(prefix):
                mounts.append(target)
    for target in sorted(mounts, key=len, reverse=True):
        _run(["umount", "-l", target], check=False)


def start_containerd(tmpdir: Path, *, timeout: float = 30) -> ContainerdProc:
    """Start containerd with root, state and socket under `tmpdir`; return once it answers."""
    home = Path(tmpdir) / "ctd"
    home.mkdir(parents=True, exist_ok=True)
    sock = home / "c.sock"
    if len(str(sock)) > _MAX_SOCKET_PATH:
        raise ValueError(f"socket path too long for a unix socket: {sock}")
    config = home / "config.toml"
    config.write_text(
        _CONTAINERD_CONFIG.format(root=home / "root", state=home / "state", socket=sock)
    )
    log = home / "containerd.log"
    with log.open("ab") as out:
        proc = subprocess.Popen(
            ["containerd", "--config", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            start_new_session=True,
        )

    def answers() -> bool:
        if not sock.exists():
            return False
        with grpc.insecure_channel(f"unix://{sock}") as channel:
            try:
                grpc.channel_ready_future(channel).result(timeout=0.5)
            except grpc.FutureTimeoutError:
                return False
        return True

    _wait_for("containerd", answers, proc, log, timeout)
    return ContainerdProc(home=home, socket=sock, proc=proc, log=log)


# -- registry ------------------------------------------------------------------------------------


@dataclass
class RegistryProc:
    """docker-registry on loopback; `addr` is `127.0.0.1:PORT` (plain HTTP: insecure registry)."""

    addr: str
    home: Path
    proc: subprocess.Popen[bytes]

    def stop(self) -> None:
        _terminate(self.proc)
        shutil.rmtree(self.home, ignore_errors=True)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as resp:
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def _http_answers(url: str) -> bool:
    """Any HTTP answer (an auth registry's /v2/ is 401)."""
    try:
        with urllib.request.urlopen(url, timeout=1):
            return True
    except urllib.error.HTTPError:
        return True
    except (urllib.error.URLError, OSError):
        return False


def start_registry(
    tmpdir: Path, port: int = 0, *, timeout: float = 20, htpasswd: str | None = None
) -> RegistryProc:
    """Start docker-registry on 127.0.0.1:`port` (0 = a free one), storage under `tmpdir`.
    `htpasswd`: the content of an htpasswd file (bcrypt entries): every request then needs
    Basic auth."""
    home = Path(tmpdir) / "registry"
    home.mkdir(parents=True, exist_ok=True)
    addr = f"127.0.0.1:{port or free_port()}"
    config = home / "config.yml"
    auth = ""
    if htpasswd is not None:
        (home / "htpasswd").write_text(htpasswd)
        auth = f"auth:\n  htpasswd:\n    realm: fsb-test\n    path: {home / 'htpasswd'}\n"
    config.write_text(
        "version: 0.1\n"
        "log:\n  level: warn\n"
        f"storage:\n  filesystem:\n    rootdirectory: {home / 'data'}\n"
        f"http:\n  addr: {addr}\n" + auth
    )
    log = home / "registry.log"
    with log.open("ab") as out:
        proc = subprocess.Popen(
            ["docker-registry", "serve", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            start_new_session=True,
        )
    ready = _http_ok if htpasswd is None else _http_answers
    _wait_for("docker-registry", lambda: ready(f"http://{addr}/v2/"), proc, log, timeout)
    return RegistryProc(addr=addr, home=home, proc=proc)


# -- demo image ----------------------------------------------------------------------------------


def _demo_image_key() -> str:
    """Content key of the demo image: the build script and the busybox it copies."""
    busybox = shutil.which("busybox")
    if busybox is None:
        raise RuntimeError("busybox is missing (apt-get install busybox-static)")
    h = hashlib.sha256(BUILD_SCRIPT.read_bytes())
    h.update(Path(busybox).read_bytes())
    return h.hexdigest()[:16]


def build_demo_image(workdir: Path) -> Path:
    """The busybox demo image as an OCI layout (tag `latest`), built by scripts/build-demo-image
    into `workdir` and cached by content under ~/.cache/fastsandbox/demo-image/<key>."""
    cached = CACHE_DIR / "demo-image" / _demo_image_key()
    if (cached / "index.json").exists():
        return cached
    scratch = Path(workdir) / f"demo-image-{os.getpid()}"
    shutil.rmtree(scratch, ignore_errors=True)
    _run([str(BUILD_SCRIPT), str(scratch)], timeout=120)
    cached.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(scratch, cached)  # atomic: a parallel builder's copy is as good as ours
    except OSError:
        shutil.rmtree(scratch, ignore_errors=True)
    return cached


def push_image(
    layout: Path, registry_addr: str, name: str = "busybox:latest", *, creds: str | None = None
) -> str:
    """Copy tag `latest` of an OCI layout into a plain-HTTP registry; returns the pushed ref.
    `creds`: `user:password` for a registry with auth."""
    ref = f"{registry_addr}/{name}"
    _run(
        [
            "skopeo",
            "copy",
            "--quiet",
            "--dest-tls-verify=false",
            *(["--dest-creds", creds] if creds else []),
            f"oci:{layout}:latest",
            f"docker://{ref}",
        ],
        timeout=120,
    )
    return ref


# -- cgroups -------------------------------------------------------------------------------------


def remove_cgroup(path: str) -> None:
    """rmdir a cgroup (and its empty children) in every hierarchy; v1 and v2 alike."""
    root = Path("/sys/fs/cgroup")
    rel = path.strip("/")
    if not rel:
        return
    candidates = [root / rel] + [d / rel for d in root.iterdir() if d.is_dir()]
    for top in candidates:
        if not top.is_dir():
            continue
        for d in sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
            with contextlib.suppress(OSError):
                d.rmdir()
        with contextlib.suppress(OSError):
            top.rmdir()
