"""What users would pick instead of us, measured on this machine in the same run as our numbers:
raw `runc`, containerd's `ctr`, and Debian's `docker.io` (a real dockerd on a private socket and
data root, its own containerd, no bridge and no iptables changes to the host).

Every baseline is a command timed from process spawn to process exit (so each includes its own
client's start-up, as a user calling it pays), one sample at a time, with its cleanup outside the
timed span. Used by create_latency.py and exec_latency.py; `pct`/`row`/`summary` format every
benchmark's numbers the same way (p50/p95/p99/max in milliseconds).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

BENCH_TAG = "fsb-bench/busybox:latest"


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


def summary(values: list[float]) -> dict[str, float]:
    return {
        "n": len(values),
        "p50": pct(values, 50),
        "p95": pct(values, 95),
        "p99": pct(values, 99),
        "max": max(values),
        "mean": statistics.fmean(values),
    }


def row(name: str, values: list[float]) -> str:
    s = summary(values)
    return (
        f"{name:<26} n={len(values):<4} p50={s['p50']:8.1f}  p95={s['p95']:8.1f}"
        f"  p99={s['p99']:8.1f}  max={s['max']:8.1f}  ms"
    )


def timed(argv: list[str], env: dict[str, str] | None = None) -> float:
    """Milliseconds from spawning `argv` to its exit; a failure is an error, not a sample.

    Its stdout goes to /dev/null and stderr to a file, never to a pipe: `runc run -d` hands its
    own stdio to the container's process (non-terminal detached mode passes them through), so a
    pipe would be held open by `sleep 3600` and reading it to EOF would wait an hour. That was
    create_latency.py's hang at the `runc run -d` series."""
    with tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.run(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err, env=env,
            check=False,
        )  # fmt: skip
        took = (time.perf_counter() - t0) * 1000
        if proc.returncode != 0:
            err.seek(0)
            text = err.read().decode(errors="replace")[-400:]
            raise RuntimeError(f"{argv[0]} failed ({proc.returncode}): {text}")
    return took


def _retry(argv: list[str], attempts: int = 50, env: dict[str, str] | None = None) -> None:
    for _ in range(attempts):
        if subprocess.run(argv, capture_output=True, env=env, check=False).returncode == 0:
            return
        time.sleep(0.05)


# -- ctr ----------------------------------------------------------------------------------------


def bench_ctr_run(sock: Path, image: str, n: int, namespace: str = "fastsandbox") -> list[float]:
    """`ctr run -d IMAGE ID sleep 3600`: image already unpacked in that containerd."""
    ctr = ["ctr", "-a", str(sock), "-n", namespace]
    out = []
    for i in range(n):
        cid = f"bench-ctr-{os.getpid()}-{i}"
        out.append(timed([*ctr, "run", "-d", image, cid, "sleep", "3600"]))
        subprocess.run([*ctr, "tasks", "kill", "-s", "KILL", cid], capture_output=True)
        _retry([*ctr, "tasks", "delete", cid])
        subprocess.run([*ctr, "containers", "delete", cid], capture_output=True)
    return out


# -- runc ---------------------------------------------------------------------------------------


@dataclass
class RuncBundle:
    """An unpacked busybox bundle and a private runc state root."""

    bundle: Path
    state: Path

    @classmethod
    def unpack(cls, layout: Path, work: Path) -> RuncBundle:
        bundle = work / "runc-bundle"
        shutil.rmtree(bundle, ignore_errors=True)
        subprocess.run(
            ["umoci", "unpack", "--image", f"{layout}:latest", str(bundle)],
            check=True,
            capture_output=True,
        )
        config = json.loads((bundle / "config.json").read_text())
        config["process"]["args"] = ["sleep", "3600"]
        config["process"]["terminal"] = False
        (bundle / "config.json").write_text(json.dumps(config))
        return cls(bundle, work / "runc-state")

    def runc(self, *args: str) -> list[str]:
        return ["runc", "--root", str(self.state), *args]

    def kill(self, cid: str) -> None:
        subprocess.run(self.runc("kill", cid, "KILL"), capture_output=True)
        _retry(self.runc("delete", cid))

    def bench_run(self, n: int) -> list[float]:
        """`runc run -d --bundle B ID`: no containerd at all, the floor for a container start."""
        out = []
        for i in range(n):
            cid = f"bench-runc-{os.getpid()}-{i}"
            out.append(timed(self.runc("run", "-d", "--bundle", str(self.bundle), cid)))
            self.kill(cid)
        return out

    def bench_runsc(self, n: int, *, split: bool = False) -> list[float]:
        """`runsc run --detach` (or `create` then `start`, as the runc shim drives it) on the
        same bundle with the flags our wrapper adds (agent/runtime/runsc_wrapper.py). The
        bundle's `network` namespace entry has no path: runsc puts its sandbox in a fresh one."""
        from fastsandbox.agent.runtime.runsc_wrapper import EXTRA_FLAGS

        runsc = ["runsc", "--root", str(self.state.with_name("runsc-state")), *EXTRA_FLAGS]
        out = []
        for i in range(n):
            cid = f"bench-runsc-{os.getpid()}-{i}"
            if split:
                took = timed([*runsc, "create", "--bundle", str(self.bundle), cid])
                took += timed([*runsc, "start", cid])
            else:
                took = timed([*runsc, "run", "--detach", "--bundle", str(self.bundle), cid])
            out.append(took)
            subprocess.run([*runsc, "kill", cid, "KILL"], capture_output=True)
            _retry([*runsc, "delete", "--force", cid])
        return out

    def bench_exec(self, n: int, argv: tuple[str, ...] = ("true",)) -> list[float]:
        """`runc exec ID true` into one running container."""
        cid = f"bench-runc-exec-{os.getpid()}"
        subprocess.run(
            self.runc("run", "-d", "--bundle", str(self.bundle), cid),
            check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            return [timed(self.runc("exec", cid, *argv)) for _ in range(n)]
        finally:
            self.kill(cid)


# -- docker -------------------------------------------------------------------------------------


class Docker:
    """A private dockerd (Debian's docker.io): own socket, data root and managed containerd; no
    bridge, no iptables, `--network none` containers, so the host is left as it was."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.sock = work / "docker.sock"
        self.env = {**os.environ, "DOCKER_HOST": f"unix://{self.sock}"}
        self._proc: subprocess.Popen[bytes] | None = None

    @staticmethod
    def missing() -> str | None:
        for binary in ("dockerd", "docker"):
            if shutil.which(binary) is None:
                return f"{binary} not found (apt-get install docker.io)"
        return None

    def start(self, timeout: float = 60) -> None:
        self.work.mkdir(parents=True, exist_ok=True)
        argv = [
            "dockerd", "--host", f"unix://{self.sock}", "--data-root", str(self.work / "root"),
            "--exec-root", str(self.work / "exec"), "--pidfile", str(self.work / "docker.pid"),
            "--bridge", "none", "--iptables=false", "--ip6tables=false", "--ip-masq=false",
        ]  # fmt: skip
        log = (self.work / "dockerd.log").open("wb")
        self._proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.docker_ok("version"):
                return
            if self._proc.poll() is not None:
                break
            time.sleep(0.2)
        raise RuntimeError(f"dockerd did not start; see {self.work / 'dockerd.log'}")

    def docker_ok(self, *args: str) -> bool:
        cmd = ["docker", *args]
        return subprocess.run(cmd, capture_output=True, env=self.env).returncode == 0

    def load_layout(self, layout: Path) -> str:
        """Load tag `latest` of an OCI layout as BENCH_TAG."""
        archive = self.work / "image.tar"
        subprocess.run(
            ["skopeo", "copy", "--quiet", f"oci:{layout}:latest",
             f"docker-archive:{archive}:{BENCH_TAG}"],
            check=True, capture_output=True,
        )  # fmt: skip
        subprocess.run(["docker", "load", "-i", str(archive)], check=True, capture_output=True,
                       env=self.env)  # fmt: skip
        return BENCH_TAG

    def bench_run(self, image: str, n: int) -> list[float]:
        """`docker run -d --network none IMAGE sleep 3600`."""
        out = []
        for i in range(n):
            name = f"bench-docker-{os.getpid()}-{i}"
            argv = ["docker", "run", "-d", "--network", "none", "--name", name, image]
            out.append(timed([*argv, "sleep", "3600"], env=self.env))
            subprocess.run(["docker", "rm", "-f", name], capture_output=True, env=self.env)
        return out

    def bench_exec(self, image: str, n: int, argv: tuple[str, ...] = ("true",)) -> list[float]:
        """`docker exec NAME true` into one running container."""
        name = f"bench-docker-exec-{os.getpid()}"
        subprocess.run(
            ["docker", "run", "-d", "--network", "none", "--name", name, image, "sleep", "3600"],
            check=True, capture_output=True, env=self.env,
        )  # fmt: skip
        try:
            return [timed(["docker", "exec", name, *argv], env=self.env) for _ in range(n)]
        finally:
            subprocess.run(["docker", "rm", "-f", name], capture_output=True, env=self.env)

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(timeout=30)
            if self._proc.poll() is None:
                self._proc.kill()
                self._proc.wait()
        # dockerd's managed containerd leaves its shims' mounts under the exec and data roots.
        subprocess.run(["umount", "-R", "-l", str(self.work)], capture_output=True)


@contextlib.contextmanager
def docker_peer(work: Path, layout: Path) -> Iterator[tuple[Docker, str]]:
    """A started private dockerd with the busybox image loaded; stopped afterwards."""
    docker = Docker(work)
    try:
        docker.start()
        yield docker, docker.load_layout(layout)
    finally:
        docker.stop()
