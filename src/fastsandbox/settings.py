"""One tree of settings for the server and the agent.

Precedence: command-line flags > `FSB_*` environment > config file > the defaults below.
The CLI builds these; daemons receive them whole and never read the environment themselves.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from fastsandbox import __version__
from fastsandbox.api.log_caps import DEFAULT_LOG_MAX_BYTES
from fastsandbox.api.quantity import bytes_exact

# Defaults more than one command or client needs, each spelled here once (a unit test,
# tests/unit/test_constants_once.py, fails when the endpoint is spelled anywhere else in src/).
DEFAULT_ENDPOINT: Final = "127.0.0.1:9090"
"""Where `fsb server` listens and where every client looks first."""
DELETE_GRACE_SECONDS: Final = 10.0
"""SIGTERM → SIGKILL grace on sandbox delete when the request gives none."""
CONTAINERD_SOCKET: Final = Path("/run/containerd/containerd.sock")
"""The system containerd's socket."""
JANITOR_INTERVAL_SECONDS: Final = 10.0
"""How often the janitor looks for orphaned containers, snapshots, logs and FIFOs."""
DEFAULT_SANDBOX_DISK: Final = "1Gi"
"""Writable-layer limit of a sandbox that asks for none (a quantity; sparse: only what is
written costs disk). There is no "unlimited": 0 on the wire means this default."""
IMAGE_CACHE_MAX: Final = "20Gi"
"""Default disk budget of a node's image cache (compressed blobs; unpacked layers come on top)."""
IMAGE_CACHE_MAX_BYTES: Final = int(bytes_exact(IMAGE_CACHE_MAX))
ORPHAN_TIMEOUT_SECONDS: Final = 30.0
"""How long a container must stay orphaned (no record, or its agent gone) before the janitor
removes it: far longer than the few ms between a Fast-mode start and its record."""

# -- request limits at the Fast-Path's edge (control/fastpath/request_limits.py, throttle.py) ---
MAX_MESSAGE_BYTES: Final = 4 * 1024 * 1024
"""Largest gRPC message the Fast-Path accepts (a file chunk, a create request)."""
MAX_ENV_VARS: Final = 256
"""Environment variables of one sandbox."""
MAX_ENV_BYTES: Final = 256 * 1024
"""All of one sandbox's `NAME=value` pairs together (the kernel's exec limit is ~2 MiB)."""
MAX_ARGS: Final = 1024
"""Items of command + args together."""
MAX_ARGS_BYTES: Final = 256 * 1024
"""Bytes of command + args together."""
MAX_LABELS: Final = 64
"""Labels of one object."""
MAX_LABEL_KEY_BYTES: Final = 253
"""A label key (Kubernetes' prefix limit)."""
MAX_LABEL_VALUE_BYTES: Final = 1024
"""A label value."""
RATE_PER_SECOND: Final = 500.0
"""Calls a second one credential may make, sustained (a token bucket)."""
RATE_BURST: Final = 1000
"""Calls one credential may make at once above the sustained rate."""
MAX_STREAMS_PER_CREDENTIAL: Final = 64
"""Concurrent streams (exec/attach, logs, watch, file transfers) of one credential."""


def default_data_dir() -> Path:
    """`~/.local/share/fastsandbox`, or `$XDG_DATA_HOME/fastsandbox`."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "fastsandbox"


@dataclass(slots=True)
class LogSettings:
    level: str = "info"
    """debug | info | warning | error."""
    format: str = "auto"
    """json | console | auto (console on a TTY, else JSON)."""
    file: Path | None = None
    """Also write JSON lines here, rotated at `file_max_bytes` keeping `file_backups`."""
    file_max_bytes: int = 50 * 1024 * 1024
    file_backups: int = 5


@dataclass(slots=True)
class EdgeLimits:
    """What one caller may ask of the Fast-Path: keyed by the credential it presents (a hash
    of its bearer token), so every token, whatever it is allowed to do, has its own share."""

    rate_per_second: float = RATE_PER_SECOND
    """Sustained calls per second per credential; over it: RESOURCE_EXHAUSTED with a
    `retry-after` (seconds) in the trailing metadata."""
    rate_burst: int = RATE_BURST
    """Calls per credential above the sustained rate before it applies."""
    max_streams: int = MAX_STREAMS_PER_CREDENTIAL
    """Concurrent streaming calls per credential (exec, logs, watch, read/write file)."""
    max_message_bytes: int = MAX_MESSAGE_BYTES
    """Largest request message; a bigger one is refused RESOURCE_EXHAUSTED naming the limit."""


@dataclass(slots=True)
class SandboxDefaults:
    """What both control planes (`fsb server`, `fsb controller`) apply to every sandbox."""

    delete_grace_seconds: float = DELETE_GRACE_SECONDS
    """SIGTERM → SIGKILL grace on sandbox delete."""
    default_sandbox_cpu: str = "1"
    """CPU limit of a sandbox that asks for none (a quantity): no sandbox runs unbounded."""
    default_sandbox_memory: str = "512Mi"
    """Memory limit of a sandbox that asks for none."""
    default_sandbox_disk: str = DEFAULT_SANDBOX_DISK
    """Writable-layer size limit of a sandbox that asks for none (its own file system: writes
    past it fail with ENOSPC inside the sandbox)."""
    expired_retention_seconds: float = 24 * 3600.0
    """How long an Expired record is kept for history before it is deleted."""
    heartbeat_seconds: float = 1.0
    """How often the control plane (every replica) polls each agent's Status."""
    edge: EdgeLimits = field(default_factory=EdgeLimits)
    """Per-credential rate limit, stream cap and message size of the Fast-Path."""


@dataclass(slots=True)
class ServerSettings(SandboxDefaults):
    data_dir: Path = field(default_factory=default_data_dir)
    """Holds the SQLite file, the token, agent state, logs and (if we start it) containerd."""
    listen: str = DEFAULT_ENDPOINT
    """Fast-Path gRPC address (HOST:PORT)."""
    containerd_socket: Path | None = None
    """Use this containerd. None: use /run/containerd/containerd.sock when it answers, else
    start our own under the data dir."""
    insecure_registries: list[str] = field(default_factory=list)
    """Registries (HOST:PORT) pulled from over plain HTTP."""
    allowed_registries: list[str] = field(default_factory=list)
    """Registries (HOST[:PORT]) images may come from; empty: docker.io plus
    `insecure_registries`. A sandbox or pool naming another is refused (INVALID_ARGUMENT)."""
    token: str | None = None
    """The admin API token; None reads (or creates) `<data-dir>/token`, mode 0600. Tenant
    tokens (`fsb token create`) live hashed in `<data-dir>/tokens.db`."""
    tls_cert: Path | None = None
    """Serve the Fast-Path with this certificate (PEM chain) and `tls_key`; None: a certificate
    from our own CA in `<data-dir>/tls/`, which local clients trust by themselves."""
    tls_key: Path | None = None
    insecure: bool = False
    """Plaintext Fast-Path: only on a loopback `listen` address (refused otherwise)."""
    default_pool: bool = True
    """Create pool `default-pool` in namespace `default` when it does not exist."""
    network: str = "cni"
    """cni | host. `cni`: every agent has a network namespace of its own on bridge fsb0, and
    private pools' sandboxes one each behind it; when that cannot be made, agents do not start
    (fail closed). `host` — sandboxes on the host network, pools' networkMode ignored — only
    when an administrator sets it. `auto` is read as `cni` (it used to fall back to host)."""
    janitor_interval_seconds: float = JANITOR_INTERVAL_SECONDS
    """How often the janitor looks for orphaned containers, snapshots, logs and FIFOs."""
    orphan_timeout_seconds: float = ORPHAN_TIMEOUT_SECONDS
    """How long a container must stay orphaned (no record, or its agent gone) before the janitor
    removes it: far longer than the few ms between a Fast-mode start and its record."""
    metrics_listen: str | None = None
    """HOST:PORT serving /metrics (Prometheus), /healthz and /readyz; None: not served."""
    image_cache_max_bytes: int = IMAGE_CACHE_MAX_BYTES
    """Disk budget of the node's image cache (content store blobs): over it, the janitor
    deletes least recently used images not in use and not a pool's prewarm image."""
    log: LogSettings = field(default_factory=LogSettings)
    fault_store_delay_file: Path | None = None
    """The fault suite only (tests/fault, `store/faults.py`): a file telling the store how long
    to wait before each write (a slow disk). None: the store never waits."""

    @property
    def db_path(self) -> Path:
        return self.data_dir / "state.db"

    @property
    def token_path(self) -> Path:
        return self.data_dir / "token"

    @property
    def tokens_db_path(self) -> Path:
        return self.data_dir / "tokens.db"

    @property
    def tls_dir(self) -> Path:
        return self.data_dir / "tls"


@dataclass(slots=True)
class ControllerSettings(SandboxDefaults):
    """`fsb controller`: the control plane on Kubernetes (one of several replicas)."""

    kubeconfig: Path | None = None
    """Kubeconfig file; None: `$KUBECONFIG`, else the Pod's service account (in-cluster)."""
    namespace: str | None = None
    """The controller's own namespace (its Lease and token Secrets); None: the kubeconfig
    context's namespace, or the service account's."""
    watch_namespace: str | None = None
    """Adopt agent Pods of this namespace only; None: every namespace."""
    listen: str = DEFAULT_ENDPOINT
    """Fast-Path gRPC address (HOST:PORT); in a Pod, 0.0.0.0:PORT."""
    token: str | None = None
    """API token; None reads Secret `fastsandbox-api-token` (key `token`) in `namespace`,
    creating it with a random token when it does not exist (every replica reads the same).
    This is the admin token; tenant tokens are Secrets labelled `fastsandbox.io/api-token`."""
    tls_cert: Path | None = None
    """Serve the Fast-Path with this certificate (PEM chain) and `tls_key`; None: Secret
    `fastsandbox-fastpath-tls` in `namespace` (our CA and a certificate from it, created once
    and shared by every replica)."""
    tls_key: Path | None = None
    tls_names: list[str] = field(default_factory=list)
    """Extra names (DNS or IP) for the generated certificate, e.g. the Service's address."""
    insecure: bool = False
    """Plaintext Fast-Path: only on a loopback `listen` address (refused otherwise)."""
    kube_auth: bool = True
    """Also accept Kubernetes bearer tokens on the Fast-Path: TokenReview for who, a
    SubjectAccessReview per call for whether (verbs on sandboxes/sandboxpools.fastsandbox.io)."""
    agent_image: str = f"fastsandbox/fastsandbox:{__version__}"
    """Image of the agent Pods (its entrypoint runs `fsb agent`)."""
    identity: str | None = None
    """This replica's name in the Lease; None: `<hostname>-<random>` (unique per process)."""
    lease_duration_seconds: int = 15
    """Leader Lease duration: a dead leader is replaced after at most this plus a renew
    interval (duration / 3); the leader steps down when it cannot renew for 2/3 of it."""
    insecure_registries: list[str] = field(default_factory=list)
    """Registries (HOST:PORT) the agents pull from over plain HTTP."""
    allowed_registries: list[str] = field(default_factory=list)
    """Registries (HOST[:PORT]) images may come from; empty: docker.io plus
    `insecure_registries`. A sandbox or pool naming another is refused (INVALID_ARGUMENT)."""
    containerd_namespace: str = "k8s.io"
    """containerd namespace the agents use: the node's image cache."""
    agent_sync_seconds: float = 2.0
    """How often every replica lists agent Pods (agents another replica started or stopped)."""
    metrics_listen: str | None = None
    """HOST:PORT serving /metrics (Prometheus), /healthz and /readyz; None: not served."""
    log: LogSettings = field(default_factory=LogSettings)


@dataclass(slots=True)
class AgentSettings:
    name: str
    pool: str
    namespace: str
    listen: str
    """unix:///path/agent.sock or HOST:PORT."""
    state_dir: Path
    """Per-agent directory: sandbox logs live under `logs/`."""
    containerd_socket: Path
    containerd_namespace: str = "fastsandbox"
    capacity: int = 5
    runtime: str = "runc"
    agent_ip: str = "127.0.0.1"
    netns_path: str | None = None
    """The agent's network namespace: sandboxes of a shared network join it, private ones are
    wired into it (their veths, rules and published ports live there); None = host network
    (shared only: a private network needs a namespace of the agent's own)."""
    network_mode: str = "shared"
    """private (a namespace per sandbox, agent/network/) | shared (sandboxes join
    `netns_path`). The fleets pass the pool's `networkMode`; "shared" is the default of a
    hand-started agent only."""
    egress: str = "none"
    """Private sandboxes' outbound traffic: none | allow (NAT out of the agent's namespace)."""
    egress_allow: list[str] = field(default_factory=list)
    """With egress allow: only these IPv4 CIDRs (empty: anywhere not forbidden)."""
    forbid: list[str] = field(default_factory=list)
    """CIDRs a private sandbox may never reach besides the built-in ones (loopback,
    link-local/metadata, multicast): the node network (bridge subnet, other agents)."""
    sandbox_subnet: str = "10.211.0.0/22"
    """Private sandboxes' addresses inside the agent's namespace, a /31 each."""
    port_range: tuple[int, int] = (20000, 29999)
    """Host ports (on `agent_ip`) that private sandboxes' declared ports are published on."""
    cgroup_parent: str = "/fastsandbox"
    insecure_registries: list[str] = field(default_factory=list)
    delete_grace_seconds: float = DELETE_GRACE_SECONDS
    init_path: Path | None = None
    """`fsb-supervisor` binary mounted at /.fsb/init as every sandbox's PID 1; None = run the
    sandbox's command as PID 1 (SIGTERM is then ignored unless the command handles it)."""
    logger_path: Path | None = None
    """`fsb-logger`, containerd's `binary://` log driver: keeps stdout and stderr apart, stamps
    each line and caps the log. None = containerd's `file://` (one uncapped file, streams mixed)."""
    log_max_bytes: int = DEFAULT_LOG_MAX_BYTES
    """Cap of one sandbox's captured output when its spec asks for none (newest kept)."""
    default_disk_bytes: int = int(bytes_exact(DEFAULT_SANDBOX_DISK))
    """Writable-layer limit of a sandbox whose request says 0 (never unlimited)."""
    version: str = ""
    token: str | None = None
    """Bearer token every call must carry. Required on a HOST:PORT listen address (anyone who
    reaches the port could otherwise start root containers); a unix socket is guarded by its
    file mode (0600) instead and needs none."""
    insecure_no_token: bool = False
    """Serve HOST:PORT without a token anyway (only for a network nobody else can reach)."""
    tls_cert: Path | None = None
    """Serve HOST:PORT with TLS: this PEM certificate (with `tls_key`); None: plaintext."""
    tls_key: Path | None = None
    pod_uid: str | None = None
    """Running in this Kubernetes Pod: sandboxes join the Pod's network namespace and cgroup
    (found through its CRI sandbox in containerd; these override `netns_path` and
    `cgroup_parent`), and `fsb-supervisor` is copied into `state_dir`, a hostPath at the same
    path."""
    metrics_listen: str | None = None
    """HOST:PORT serving /metrics (Prometheus), /healthz and /readyz; None: not served."""
    warm_slots: int = 0
    """Warm slots kept per hot image (`agent/warm.py`); 0 = none. Needs the supervisor and runc."""
    warm_images: tuple[str, ...] = ()
    """Images always hot (the pool's prewarmImages)."""
    warm_recent: int = 1
    """How many of the most recently served images are hot too."""
    warm_limits: tuple[int, int, int] = (0, 0, 0)
    """The pool's default (cpu millis, memory bytes, pids limit) a create that asks for none
    gets (0 = none): where limits cannot change after start (gVisor), pinned images' slots are
    made with them, so such a create claims one."""
    log: LogSettings = field(default_factory=LogSettings)

    @property
    def enforces_disk_limit(self) -> bool:
        """Whether sandboxes get a size-limited writable layer (a loop-mounted file system per
        sandbox, agent/runtime/disk.py). Not in a Kubernetes Pod: the agent Pod is unprivileged
        and cannot mount, and a mount in its namespace would not reach containerd's shim anyway
        (docs/security.md, "What is not covered"). Nor anywhere else the agent cannot mount (no
        CAP_SYS_ADMIN: an agent in a plain container): every create would fail with EPERM."""
        return self.pod_uid is None and can_mount()

    @property
    def listens_on_tcp(self) -> bool:
        return not self.listen.startswith("unix:")


_CAP_SYS_ADMIN = 21


def can_mount() -> bool:
    """Whether this process holds CAP_SYS_ADMIN (what `mount -o loop` needs)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> _CAP_SYS_ADMIN & 1)
    except OSError:
        pass
    return False
