"""The composition root for Kubernetes: `fsb controller`, sibling of `server.py`.

KubernetesStore (our CRDs) + KubernetesFleet (agents as Pods) + the same control plane + the
Fast-Path, plus leader election. Every replica serves the Fast-Path: creates from any replica are
safe together because each agent refuses a create beyond its capacity and the create then tries
the next agent or answers RESOURCE_EXHAUSTED. Only the replica holding the Lease
`fastsandbox-controller` converges records and sizes pools (`ControlPlane.start_leading`).

Start order: clients → agent CA and token key (Secret `fastsandbox-agent-ca`) → recovery (adopt
agent Pods, rebuild slots) → heartbeats and replica sync → API token, TLS Secret → Fast-Path →
"ready" → campaign for the Lease. Shutdown releases the Lease first (another replica takes over
at once), then stops serving. Agent Pods and sandboxes keep running: they are cluster state,
adopted by whoever comes next.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
import secrets
import socket
import sys
import time
from collections.abc import Callable
from typing import TypeVar, cast

import grpc
from lightkube import AsyncClient
from lightkube.resources.core_v1 import Secret

from fastsandbox._aio.signals import run_until_stopped
from fastsandbox._kube.authn import KubeAuthenticator, KubeAuthorizer
from fastsandbox._kube.config import FIELD_MANAGER, make_client
from fastsandbox._kube.errors import translate
from fastsandbox._kube.lease import LEASE_NAME, KubeLeaseApi, LeaderElector
from fastsandbox.api.images import allowed_registries
from fastsandbox.control.fastpath.access import AccessGuard
from fastsandbox.control.fastpath.authz import (
    Authenticator,
    Authorizer,
    FirstAuthenticator,
    NamespaceAuthorizer,
    TokenAuthenticator,
)
from fastsandbox.control.fastpath.serve import start_fastpath
from fastsandbox.control.fastpath.tls import (
    TlsMaterial,
    ca_usable,
    issue_server_cert,
    new_ca,
    operator_tls,
    server_names,
)
from fastsandbox.control.limits import defaults_of
from fastsandbox.control.plane import ControlPlane, PlaneSettings
from fastsandbox.errors import AlreadyExists, Conflict, FsbError, NotFound
from fastsandbox.fleet.kubernetes import KubernetesFleet
from fastsandbox.logconfig import configure
from fastsandbox.metrics import HealthState, MetricsServer, serve_metrics
from fastsandbox.settings import ControllerSettings
from fastsandbox.store.kubernetes import KubernetesStore
from fastsandbox.store.tokens_kubernetes import KubeTokenStore

log = logging.getLogger(__name__)

API_TOKEN_SECRET = "fastsandbox-api-token"
API_TOKEN_KEY = "token"
TLS_SECRET = "fastsandbox-fastpath-tls"
# A replica's view of a tenant token is at most this old (a revoke through another replica
# takes effect within it; through this one at once).
TOKEN_CACHE_SECONDS = 5.0


def default_identity() -> str:
    """Unique per process: a restarted Pod keeps its hostname but must not inherit the Lease
    as if it had never stopped leading."""
    return f"{socket.gethostname()}-{secrets.token_hex(4)}"


def token_hint(namespace: str) -> str:
    return (
        f"kubectl -n {namespace} get secret {API_TOKEN_SECRET} "
        f"-o jsonpath='{{.data.{API_TOKEN_KEY}}}' | base64 -d"
    )


_T = TypeVar("_T")


def _secret_data(secret: Secret) -> dict[str, bytes]:
    """The Secret's data, decoded; a key that is not base64 is left out (as if missing)."""
    data: dict[str, bytes] = {}
    for key, value in (secret.data or {}).items():
        with contextlib.suppress(binascii.Error, ValueError):
            data[key] = base64.b64decode(value)
    return data


async def shared_secret(
    client: AsyncClient,
    namespace: str,
    name: str,
    *,
    read: Callable[[dict[str, bytes]], _T],
    make: Callable[[], tuple[dict[str, str], _T]],
    label: str,
) -> tuple[_T, bool]:
    """What Secret `name` keeps, read by `read` (which raises when it is unusable); when it is
    missing, made by `make` (its stringData and the value) and stored. Every replica ends up
    with the same value: one creates the Secret, the others read it (a create that loses the
    race reads the winner's). Returns (value, created)."""
    what = f"Secret {namespace}/{name}"
    for _ in range(3):
        try:
            secret = await client.get(Secret, name, namespace=namespace)
        except Exception as exc:
            error = translate(exc, what)
            if not isinstance(error, NotFound):
                raise error from None
        else:
            return read(_secret_data(secret)), False
        string_data, value = make()
        body = Secret.from_dict(
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {
                    "name": name,
                    "namespace": namespace,
                    "labels": {"app.kubernetes.io/part-of": "fastsandbox"},
                },
                "type": "Opaque",
                "stringData": string_data,
            }
        )
        try:
            await client.create(cast(Secret, body), field_manager=FIELD_MANAGER)
        except Exception as exc:
            error = translate(exc, what)
            if isinstance(error, AlreadyExists):
                continue  # another replica made it first: use theirs
            raise error from None
        log.info(f"created the {label} Secret", extra={"secret": what})
        return value, True
    raise Conflict(f"{what} keeps changing; retry")


async def api_token(client: AsyncClient, namespace: str, given: str | None) -> tuple[str, bool]:
    """The Fast-Path token: `given`, else Secret `fastsandbox-api-token` in `namespace`, created
    with a random token when missing. Returns (token, created) — every replica ends up with
    the same token: one creates the Secret, the others read it."""
    if given:
        return given, False

    def read(data: dict[str, bytes]) -> str:
        try:
            token = data.get(API_TOKEN_KEY, b"").decode().strip()
        except UnicodeDecodeError:
            token = ""
        if not token:
            raise FsbError(
                f"Secret {namespace}/{API_TOKEN_SECRET} has no {API_TOKEN_KEY!r} key: set one, "
                "or delete the Secret and restart the controller to generate it"
            )
        return token

    def make() -> tuple[dict[str, str], str]:
        token = secrets.token_urlsafe(32)
        return {API_TOKEN_KEY: token}, token

    return await shared_secret(
        client, namespace, API_TOKEN_SECRET, read=read, make=make, label="API token"
    )


def controller_names(settings: ControllerSettings, namespace: str) -> list[str]:
    """What clients call the controller: its Service's names, loopback, `--tls-name`."""
    service = "fastsandbox-controller"
    cluster = [service, f"{service}.{namespace}", f"{service}.{namespace}.svc"]
    cluster.append(f"{service}.{namespace}.svc.cluster.local")
    return server_names(settings.listen, [*cluster, *settings.tls_names])


async def fastpath_tls(
    client: AsyncClient, settings: ControllerSettings, namespace: str
) -> TlsMaterial | None:
    """The operator's certificate, else our CA and a certificate from it kept in Secret
    `fastsandbox-fastpath-tls` (every replica serves the same; clients trust its `ca.crt`).
    None for --insecure."""
    if settings.insecure:
        return None
    if settings.tls_cert is not None and settings.tls_key is not None:
        return operator_tls(settings.tls_cert, settings.tls_key)
    what = f"Secret {namespace}/{TLS_SECRET}"

    def read(data: dict[str, bytes]) -> TlsMaterial:
        need = ("ca.crt", "ca.key", "tls.crt", "tls.key")
        if not all(data.get(k) for k in need) or not ca_usable(data["ca.crt"], data["ca.key"]):
            raise FsbError(
                f"{what} lacks a usable ca.crt/ca.key/tls.crt/tls.key: delete it and "
                "restart the controller to have it made again, or give --tls-cert/--tls-key"
            )
        return TlsMaterial(cert_pem=data["tls.crt"], key_pem=data["tls.key"], ca_pem=data["ca.crt"])

    def make() -> tuple[dict[str, str], TlsMaterial]:
        ca_cert, ca_key = new_ca("fastsandbox controller CA")
        cert, key = issue_server_cert(ca_cert, ca_key, controller_names(settings, namespace))
        pems = {"ca.crt": ca_cert, "ca.key": ca_key, "tls.crt": cert, "tls.key": key}
        material = TlsMaterial(cert_pem=cert, key_pem=key, ca_pem=ca_cert)
        return {k: v.decode() for k, v in pems.items()}, material

    material, _ = await shared_secret(
        client, namespace, TLS_SECRET, read=read, make=make, label="Fast-Path TLS"
    )
    return material


class Leadership:
    """The elector's callbacks around the plane, with the moments they happened (logs, tests)."""

    def __init__(self, plane: ControlPlane, identity: str) -> None:
        self.plane = plane
        self.identity = identity
        self.since: float | None = None

    async def started(self) -> None:
        self.since = time.monotonic()
        log.info(
            "leading: reconcilers and pool scaling run here", extra={"identity": self.identity}
        )
        # No waiting for agents to start: the loops run at once and retry what cannot fit yet.
        await self.plane.start_leading(wait=False)

    async def stopped(self) -> None:
        # Logged once the leading work has stopped, not when it was asked to: the log is how
        # one tells that two replicas never led at once (tests/fault/test_kube_faults.py).
        await self.plane.stop_leading()
        if self.since is not None:
            log.info(
                "following: serving the Fast-Path only",
                extra={"identity": self.identity, "led_s": round(time.monotonic() - self.since, 1)},
            )
        self.since = None


async def run(
    settings: ControllerSettings,
    *,
    ready: asyncio.Event | None = None,
    stop: asyncio.Event,
    announce: Callable[[str], None] | None = None,
) -> None:
    identity = settings.identity or default_identity()
    client = await make_client(settings.kubeconfig)
    namespace = settings.namespace or client.namespace or "default"
    store = KubernetesStore(await make_client(settings.kubeconfig))
    fleet = KubernetesFleet(
        client,
        agent_image=settings.agent_image,
        namespace=namespace,
        watch_namespace=settings.watch_namespace,
        containerd_namespace=settings.containerd_namespace,
        containerd_state=str(settings.node_containerd_state),
        insecure_registries=settings.insecure_registries,
        grace_seconds=settings.delete_grace_seconds,
        log=settings.log,
        sandbox_defaults=defaults_of(settings),
    )
    plane: ControlPlane | None = None
    server: grpc.aio.Server | None = None
    election: asyncio.Task[None] | None = None
    metrics: MetricsServer | None = None
    health = HealthState(reason="starting: reading the store and the agents")
    try:
        await fleet.load_credentials()  # before any channel to an agent
        plane = ControlPlane(
            store,
            fleet,
            PlaneSettings.of(
                settings,
                agent_auth=fleet.agent_auth,
                shared_agents=True,
                agent_sync_seconds=settings.agent_sync_seconds,
                # Recovery rebuilds the record of a Fast create answered just before a kill -9
                # from the container's request label (`recover` waits for creates in flight at
                # the agents); here the answer leaves before the record's write.
                store_after_reply=True,
                allowed_registries=allowed_registries(
                    settings.allowed_registries, settings.insecure_registries
                ),
            ),
        )
        metrics = await serve_metrics(plane.metrics, health, settings.metrics_listen)
        report = await plane.start_serving()
        token, created = await api_token(client, namespace, settings.token)

        tls = await fastpath_tls(client, settings, namespace)
        tokens = KubeTokenStore(client, namespace)
        tenants = TokenAuthenticator(token, tokens, cache_seconds=TOKEN_CACHE_SECONDS)
        plane.servicer.token_store = tokens
        plane.servicer.token_revoked = tenants.forget
        authenticator: Authenticator = tenants
        authorizer: Authorizer = NamespaceAuthorizer()
        if settings.kube_auth:
            # The cluster's own identities too: TokenReview, then a SubjectAccessReview per call.
            authenticator = FirstAuthenticator([authenticator, KubeAuthenticator(client)])
            authorizer = KubeAuthorizer(client, authorizer)
        guard = AccessGuard(authenticator, authorizer)
        server = await start_fastpath(plane.servicer, guard, settings.listen, tls, settings.edge)

        leadership = Leadership(plane, identity)
        elector = LeaderElector(
            KubeLeaseApi(client, namespace, LEASE_NAME),
            identity,
            lease_duration=settings.lease_duration_seconds,
        )
        election = asyncio.create_task(
            elector.run(leadership.started, leadership.stopped), name="leader-election"
        )
        log.info(
            "ready",
            extra={
                "listen": settings.listen,
                "namespace": namespace,
                "identity": identity,
                "agents": report.agents,
                "records": report.records,
            },
        )
        if announce is not None:
            lines = []
            if not settings.token:
                verb = "created" if created else "in"
                where = f"Secret {namespace}/{API_TOKEN_SECRET}"
                lines.append(f"API token {verb} {where}: {token_hint(namespace)}")
            # Last: scripts (and the tests) wait for this line.
            if tls is not None and tls.ca_pem is not None:
                lines.append(
                    f"clients trust the CA in Secret {namespace}/{TLS_SECRET} (key ca.crt) "
                    "with FSB_CA_FILE"
                )
            lines.append(
                f"fsb controller ready on {settings.listen} ({'TLS' if tls else 'plaintext'}, "
                f"namespace {namespace}, identity "
                f"{identity}, {report.agents} agent(s), {report.records} sandbox record(s))"
            )
            announce("\n".join(lines))
        health.ready()  # every replica serves the Fast-Path, leader or not
        if ready is not None:
            ready.set()
        stop_wait = asyncio.create_task(stop.wait())
        try:
            # The election only ends by a bug; then this replica must not go on serving silently.
            done, _ = await asyncio.wait({stop_wait, election}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop_wait.cancel()
        if election in done:
            election.result()
            raise FsbError("leader election ended unexpectedly")
        log.info("stopping")
    finally:
        if election is not None:
            # First: release the Lease (and stop leading) so another replica takes over now.
            election.cancel()
            with contextlib.suppress(asyncio.CancelledError, FsbError):
                await election
        health.not_ready("stopping")
        if server is not None:
            await server.stop(grace=3)
        if metrics is not None:
            await metrics.stop()
        if plane is not None:
            await plane.close()
        await store.close()
        await client.close()
        log.info("stopped")


def main(settings: ControllerSettings) -> int:
    """Entry point of `fsb controller`: configure logs, run until SIGTERM/SIGINT, exit code."""
    configure(settings.log, component="controller")

    def announce(message: str) -> None:
        sys.stdout.write(message + "\n")
        sys.stdout.flush()

    return run_until_stopped(lambda stop: run(settings, stop=stop, announce=announce))
