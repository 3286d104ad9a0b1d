"""A real etcd + kube-apiserver for the Kubernetes test tier, started the way envtest starts them.

Why not a fake: the Kubernetes shape is only as right as its behaviour against the real
apiserver (validation, resourceVersion conflicts, finalizers, watch semantics), and no registry
these machines reach ships the binaries, so `scripts/build-kube-apiserver` builds kube-apiserver
from the Go module proxy and takes etcd from PyPI, cached in ~/.cache/fastsandbox/k8s-<version>/.
See docs/kubernetes-test-tier.md.

    from tests.k8s_infra import start_kube_apiserver

    api = start_kube_apiserver(tmp_dir)   # etcd + kube-apiserver on loopback, random free ports
    api.kubeconfig                        # client-cert kubeconfig (user `default`, system:masters)
    api.url                               # https://127.0.0.1:PORT
    api.etcdctl("endpoint", "status")     # etcdctl against this etcd
    api.stop()                            # both processes stopped, tmp dir removed

Flags are controller-runtime envtest's (`pkg/internal/testing/controlplane`), plus
`--advertise-address=127.0.0.1 --endpoint-reconciler-type=none` (loopback IPs are invalid in
Endpoints), `--enable-priority-and-fairness=false --profiling=false` (2 shared cores), and
`APIServerIdentity=false`: the identity Lease is renewed every 10 s, and every renewal moves the
store-wide resourceVersion, which would make "nothing happened since version N" untestable.
Certificates are throwaway ECDSA P-256 ones made with the `openssl` CLI (argv lists, no shell).
Nothing listens on anything but 127.0.0.1.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import signal
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tests.infra import free_port

REPO_ROOT = Path(__file__).resolve().parent.parent
BUILD_SCRIPT = REPO_ROOT / "scripts" / "build-kube-apiserver"
# A cold build takes ~6 min on 2 cores; a cached one returns at once.
_BUILD_TIMEOUT = 45 * 60
_CERT_DAYS = "7"


class KubeBinariesUnavailable(RuntimeError):
    """kube-apiserver/etcd are neither cached nor buildable here (no Go toolchain)."""


@dataclass(frozen=True, slots=True)
class KubeBinaries:
    apiserver: Path
    etcd: Path
    etcdctl: Path


def kube_binaries() -> KubeBinaries:
    """Paths of the cached binaries, building them first when missing (waits on the build lock)."""
    try:
        proc = subprocess.run(
            [str(BUILD_SCRIPT)],
            capture_output=True,
            text=True,
            timeout=_BUILD_TIMEOUT,
            check=False,
        )
    except FileNotFoundError as exc:  # pragma: no cover - the script is in the repo
        raise KubeBinariesUnavailable(f"{BUILD_SCRIPT} is missing") from exc
    if proc.returncode != 0:
        tail = proc.stderr[-1500:]
        if "go is missing" in proc.stderr:
            raise KubeBinariesUnavailable(
                f"kube-apiserver is not cached and cannot be built: {tail}"
            )
        raise RuntimeError(f"{BUILD_SCRIPT} exited {proc.returncode}: {tail}")
    found = dict(
        line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line and line.strip()
    )
    etcd = Path(found["ETCD"])
    return KubeBinaries(
        apiserver=Path(found["KUBE_APISERVER"]), etcd=etcd, etcdctl=etcd.with_name("etcdctl")
    )


# -- certificates --------------------------------------------------------------------------------


def _openssl(*args: str) -> None:
    argv = ["openssl", *args]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{argv!r} exited {proc.returncode}: {proc.stderr[-800:]}")


def _ec_key(path: Path) -> None:
    _openssl(
        "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", str(path)
    )


def _ca(directory: Path, name: str) -> tuple[Path, Path]:
    crt, key = directory / f"{name}.crt", directory / f"{name}.key"
    _ec_key(key)
    _openssl(
        "req", "-x509", "-new", "-key", str(key), "-out", str(crt), "-days", _CERT_DAYS,
        "-subj", f"/O=fastsandbox-test/CN={name}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign,digitalSignature",
    )  # fmt: skip
    return crt, key


def _leaf(
    directory: Path, name: str, ca: tuple[Path, Path], subject: str, extensions: list[str]
) -> tuple[Path, Path]:
    crt, key = directory / f"{name}.crt", directory / f"{name}.key"
    _ec_key(key)
    addext = [arg for ext in extensions for arg in ("-addext", ext)]
    _openssl(
        "req", "-x509", "-new", "-key", str(key), "-out", str(crt), "-days", _CERT_DAYS,
        "-CA", str(ca[0]), "-CAkey", str(ca[1]), "-subj", subject, *addext,
    )  # fmt: skip
    return crt, key


@dataclass(frozen=True, slots=True)
class _Certs:
    serving_ca: Path
    client_ca: Path
    client_cert: Path
    client_key: Path
    sa_public: Path
    sa_private: Path


def _make_certs(cert_dir: Path, pki: Path) -> _Certs:
    """kube-apiserver finds `apiserver.{crt,key}` in --cert-dir by name, as envtest relies on."""
    serving_ca = _ca(pki, "serving-ca")
    _leaf(
        cert_dir,
        "apiserver",
        serving_ca,
        "/O=fastsandbox-test/CN=kube-apiserver",
        [
            "basicConstraints=critical,CA:FALSE",
            "keyUsage=critical,digitalSignature,keyEncipherment",
            "extendedKeyUsage=serverAuth",
            "subjectAltName=DNS:localhost,IP:127.0.0.1,IP:10.0.0.1",
        ],
    )
    client_ca = _ca(pki, "client-ca")
    client_cert, client_key = _leaf(
        pki,
        "client",
        client_ca,
        "/O=system:masters/CN=default",
        [
            "basicConstraints=critical,CA:FALSE",
            "keyUsage=critical,digitalSignature,keyEncipherment",
            "extendedKeyUsage=clientAuth",
        ],
    )
    sa_private = pki / "sa-signer.key"
    sa_public = pki / "sa-signer.pub"
    _ec_key(sa_private)
    _openssl("pkey", "-in", str(sa_private), "-pubout", "-out", str(sa_public))
    return _Certs(serving_ca[0], client_ca[0], client_cert, client_key, sa_public, sa_private)


def _kubeconfig(url: str, certs: _Certs) -> dict[str, Any]:
    def b64(path: Path) -> str:
        return base64.b64encode(path.read_bytes()).decode()

    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "fsb-test",
                "cluster": {"server": url, "certificate-authority-data": b64(certs.serving_ca)},
            }
        ],
        "users": [
            {
                "name": "fsb-test",
                "user": {
                    "client-certificate-data": b64(certs.client_cert),
                    "client-key-data": b64(certs.client_key),
                },
            }
        ],
        "contexts": [{"name": "fsb-test", "context": {"cluster": "fsb-test", "user": "fsb-test"}}],
        "current-context": "fsb-test",
    }


# -- processes -----------------------------------------------------------------------------------


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


def _spawn(argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True
        )


def _no_proxy_opener(context: ssl.SSLContext | None = None) -> urllib.request.OpenerDirector:
    # Loopback only: never let an *_proxy variable route a health check elsewhere.
    handlers: list[urllib.request.BaseHandler] = [urllib.request.ProxyHandler({})]
    if context is not None:
        handlers.append(urllib.request.HTTPSHandler(context=context))
    return urllib.request.build_opener(*handlers)


def _wait_until(
    what: str, ready: Any, proc: subprocess.Popen[bytes], log: Path, deadline: float
) -> None:
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        if ready():
            return
        time.sleep(0.05)
    tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
    raise RuntimeError(f"{what} did not become ready (exit {proc.poll()}): {tail}")


@dataclass
class KubeApiserverProc:
    """etcd + kube-apiserver of one test session; `kubeconfig` is what clients load."""

    home: Path
    url: str
    kubeconfig: Path
    etcd_url: str
    binaries: KubeBinaries
    etcd: subprocess.Popen[bytes]
    apiserver: subprocess.Popen[bytes]
    started_in: float
    """Seconds from the first process start to `/readyz` answering 200."""
    apiserver_argv: list[str] = field(default_factory=list, repr=False)
    _ready: Any = field(default=None, repr=False)
    _stopped: bool = field(default=False, repr=False)

    @property
    def apiserver_log(self) -> Path:
        return self.home / "kube-apiserver.log"

    def etcdctl(self, *args: str) -> str:
        """Run etcdctl against this etcd, e.g. `api.etcdctl("compact", "42")`."""
        argv = [str(self.binaries.etcdctl), f"--endpoints={self.etcd_url}", *args]
        proc = subprocess.run(
            argv, capture_output=True, text=True, timeout=30, check=False,
            env={**os.environ, "ETCDCTL_API": "3"},
        )  # fmt: skip
        if proc.returncode != 0:
            raise RuntimeError(f"{argv!r} exited {proc.returncode}: {proc.stderr[-800:]}")
        return proc.stdout

    def etcd_revision(self) -> int:
        status = json.loads(self.etcdctl("endpoint", "status", "-w", "json"))
        return int(status[0]["Status"]["header"]["revision"])

    def restart_apiserver(self, *, timeout: float = 60) -> float:
        """Kill kube-apiserver (SIGKILL, as in a crash: a SIGTERM'd apiserver waits for open
        watches to end) and start it again on the same port and etcd; returns seconds until
        ready. To clients this looks like an apiserver restart or failover."""
        started = time.monotonic()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.apiserver.pid, signal.SIGKILL)
        self.apiserver.wait(10)
        self.apiserver = _spawn(self.apiserver_argv, self.apiserver_log)
        _wait_until(
            "kube-apiserver", self._ready, self.apiserver, self.apiserver_log, started + timeout
        )
        return time.monotonic() - started

    def stop(self) -> None:
        """Stop the apiserver, then etcd, and remove every file they wrote."""
        if self._stopped:
            return
        self._stopped = True
        _terminate(self.apiserver)
        _terminate(self.etcd)
        shutil.rmtree(self.home, ignore_errors=True)


def start_kube_apiserver(tmpdir: Path, *, timeout: float = 60) -> KubeApiserverProc:
    """Start etcd and kube-apiserver under `tmpdir` on free loopback ports; return once ready.

    Raises `KubeBinariesUnavailable` when the binaries are neither cached nor buildable.
    """
    binaries = kube_binaries()
    home = Path(tmpdir) / "kube"
    home.mkdir(parents=True, exist_ok=True)
    cert_dir, pki = home / "api", home / "pki"
    cert_dir.mkdir(exist_ok=True)
    pki.mkdir(exist_ok=True)
    certs = _make_certs(cert_dir, pki)

    etcd_port, peer_port, api_port = free_port(), free_port(), free_port()
    etcd_url = f"http://127.0.0.1:{etcd_port}"
    url = f"https://127.0.0.1:{api_port}"
    kubeconfig = home / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump(_kubeconfig(url, certs), sort_keys=False))

    started = time.monotonic()
    deadline = started + timeout
    etcd_log = home / "etcd.log"
    etcd = _spawn(
        [
            str(binaries.etcd),
            f"--advertise-client-urls={etcd_url}",
            f"--data-dir={home / 'etcd'}",
            f"--listen-client-urls={etcd_url}",
            f"--listen-peer-urls=http://127.0.0.1:{peer_port}",
            "--log-level=warn",
            "--unsafe-no-fsync=true",
        ],
        etcd_log,
    )
    plain = _no_proxy_opener()

    def etcd_healthy() -> bool:
        try:
            with plain.open(f"{etcd_url}/health", timeout=1) as resp:
                return bool(json.loads(resp.read()).get("health") == "true")
        except (urllib.error.URLError, OSError, ValueError):
            return False

    context = ssl.create_default_context(cafile=str(certs.serving_ca))
    context.load_cert_chain(str(certs.client_cert), str(certs.client_key))
    tls = _no_proxy_opener(context)

    def apiserver_ready() -> bool:
        try:
            with tls.open(f"{url}/readyz", timeout=2) as resp:
                return bool(resp.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    argv = [
        str(binaries.apiserver),
        "--advertise-address=127.0.0.1",
        "--allow-privileged=true",
        "--authorization-mode=RBAC",
        "--bind-address=127.0.0.1",
        f"--cert-dir={cert_dir}",
        f"--client-ca-file={certs.client_ca}",
        "--disable-admission-plugins=ServiceAccount",
        "--enable-priority-and-fairness=false",
        "--endpoint-reconciler-type=none",
        f"--etcd-servers={etcd_url}",
        "--feature-gates=APIServerIdentity=false",
        "--profiling=false",
        f"--secure-port={api_port}",
        f"--service-account-issuer={url}/",
        f"--service-account-key-file={certs.sa_public}",
        f"--service-account-signing-key-file={certs.sa_private}",
        "--service-cluster-ip-range=10.0.0.0/24",
        "--v=1",
    ]
    api_log = home / "kube-apiserver.log"
    apiserver: subprocess.Popen[bytes] | None = None
    try:
        _wait_until("etcd", etcd_healthy, etcd, etcd_log, deadline)
        apiserver = _spawn(argv, api_log)
        _wait_until("kube-apiserver", apiserver_ready, apiserver, api_log, deadline)
    except BaseException:
        if apiserver is not None:
            _terminate(apiserver)
        _terminate(etcd)
        raise
    return KubeApiserverProc(
        home=home,
        url=url,
        kubeconfig=kubeconfig,
        etcd_url=etcd_url,
        binaries=binaries,
        etcd=etcd,
        apiserver=apiserver,
        started_in=time.monotonic() - started,
        apiserver_argv=argv,
        _ready=apiserver_ready,
    )
