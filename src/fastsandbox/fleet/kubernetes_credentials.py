"""Each agent Pod's own credentials: a TLS certificate and a bearer token, in a Secret of its own.

The controller keeps one Secret in its own namespace, `fastsandbox-agent-ca`: the agent CA
(certificate and key) and a token key. Every replica reads the same one (the first makes it).
For each agent Pod it makes, the fleet writes Secret `<pod>-credentials` in the pool's
namespace, mounted read-only into that Pod only:

- `tls.crt`/`tls.key`: the agent's serving certificate, signed by the agent CA, naming
  `<pod>.<namespace>.agent.fastsandbox.internal`. The controller dials the Pod's IP, trusts only
  the agent CA and requires that name (`AgentAuth.server_name`), so it talks to that agent and
  nothing else listening on the address, and nobody on the Pod network reads the traffic.
- `token`: HMAC-SHA256(token key, `<namespace>/<pod>`). The agent requires it on every call; the
  controller computes it from the name, so nothing is stored per agent on the controller's side,
  and an agent (or anything that reads one agent's Secret) learns a token that opens no other
  agent.

The Secret is owned by the pool (garbage-collected with it) and deleted with its Pod.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import secrets
from typing import Any, cast

import httpx2 as httpx
from lightkube import ApiError, AsyncClient
from lightkube.resources.core_v1 import Secret

from fastsandbox import _tls
from fastsandbox._kube.config import FIELD_MANAGER
from fastsandbox._kube.errors import translate
from fastsandbox.api import labels
from fastsandbox.api.labels import API_VERSION
from fastsandbox.api.models import SandboxPool
from fastsandbox.errors import Conflict, FsbError, Unavailable
from fastsandbox.fleet.base import AgentAuth

log = logging.getLogger(__name__)

CA_SECRET = "fastsandbox-agent-ca"
CA_CERT_KEY, CA_KEY_KEY, TOKEN_KEY_KEY = "ca.crt", "ca.key", "token-key"
CREDENTIALS_SUFFIX = "-credentials"
CREDENTIALS_LABEL = labels.AGENT_CREDENTIALS_LABEL
# Where the agent Pod mounts its Secret, and the files in it.
CREDENTIALS_DIR = "/var/run/fastsandbox/agent"
TLS_CERT, TLS_KEY, TOKEN_FILE = "tls.crt", "tls.key", "token"
# Agent certificates outlive any agent Pod in practice; a rolling update replaces older ones.
AGENT_CERT_DAYS = 365


def credentials_secret(pod: str) -> str:
    return f"{pod}{CREDENTIALS_SUFFIX}"


def _decoded(secret: Secret, key: str) -> bytes:
    raw = (secret.data or {}).get(key, "")
    try:
        return base64.b64decode(raw)
    except (binascii.Error, ValueError):
        return b""


class AgentCredentials:
    """The agent CA and token key (loaded once) and the per-agent Secrets made from them."""

    def __init__(self, client: AsyncClient, namespace: str) -> None:
        self.client = client
        self.namespace = namespace
        self._lock = asyncio.Lock()
        self._ca_cert: bytes | None = None
        self._ca_key: bytes | None = None
        self._token_key: bytes | None = None

    @property
    def loaded(self) -> bool:
        return self._ca_cert is not None

    async def load(self) -> None:
        """Read Secret `fastsandbox-agent-ca` of the controller's namespace, making it first if
        there is none (a replica that loses the race reads the winner's)."""
        async with self._lock:
            if self.loaded:
                return
            what = f"Secret {self.namespace}/{CA_SECRET}"
            for _ in range(3):
                try:
                    secret = await self.client.get(Secret, CA_SECRET, namespace=self.namespace)
                except ApiError as exc:
                    if exc.status.code != 404:
                        raise translate(exc, what) from None
                except httpx.HTTPError as exc:
                    raise translate(exc, what) from None
                else:
                    cert, key = _decoded(secret, CA_CERT_KEY), _decoded(secret, CA_KEY_KEY)
                    token_key = _decoded(secret, TOKEN_KEY_KEY)
                    if not (cert and key and token_key):
                        raise FsbError(
                            f"{what} lacks {CA_CERT_KEY}, {CA_KEY_KEY} or {TOKEN_KEY_KEY}: delete "
                            "it and restart the controller to make a new one (agent Pods made "
                            "with the old one must then be replaced)"
                        )
                    self._ca_cert, self._ca_key, self._token_key = cert, key, token_key
                    return
                cert, key = _tls.new_ca("fastsandbox agent CA")
                token_key = secrets.token_bytes(32)
                body = {
                    "apiVersion": "v1",
                    "kind": "Secret",
                    "metadata": {
                        "name": CA_SECRET,
                        "namespace": self.namespace,
                        "labels": {"app.kubernetes.io/part-of": "fastsandbox"},
                    },
                    "type": "Opaque",
                    "data": {
                        CA_CERT_KEY: base64.b64encode(cert).decode(),
                        CA_KEY_KEY: base64.b64encode(key).decode(),
                        TOKEN_KEY_KEY: base64.b64encode(token_key).decode(),
                    },
                }
                try:
                    await self.client.create(
                        cast(Secret, Secret.from_dict(body)), field_manager=FIELD_MANAGER
                    )
                except ApiError as exc:
                    if exc.status.code == 409:
                        continue  # another replica made it first: read theirs
                    raise translate(exc, what) from None
                except httpx.HTTPError as exc:
                    raise translate(exc, what) from None
                log.info("created the agent CA Secret", extra={"secret": what})
                self._ca_cert, self._ca_key, self._token_key = cert, key, token_key
                return
            raise Conflict(f"{what} keeps changing; retry")

    def _require(self) -> tuple[bytes, bytes, bytes]:
        if self._ca_cert is None or self._ca_key is None or self._token_key is None:
            raise Unavailable("the agent CA is not loaded yet (the fleet has not started)")
        return self._ca_cert, self._ca_key, self._token_key

    def token(self, namespace: str, name: str) -> str:
        """Agent `namespace/name`'s bearer token."""
        return _tls.derive_token(self._require()[2], f"{namespace}/{name}")

    def auth(self, namespace: str, name: str) -> AgentAuth:
        """What a channel to agent `namespace/name` needs: its token, the CA, its cert's name."""
        ca_cert, _, _ = self._require()
        return AgentAuth(
            token=self.token(namespace, name),
            root_ca=ca_cert,
            server_name=_tls.agent_server_name(namespace, name),
        )

    def secret_manifest(self, pool: SandboxPool, name: str) -> dict[str, Any]:
        """Secret `<pod>-credentials`: a fresh key and certificate, and the agent's token."""
        ca_cert, ca_key, _ = self._require()
        ns = pool.metadata.namespace
        server_name = _tls.agent_server_name(ns, name)
        cert, key = _tls.issue(
            ca_cert, ca_key, server_name, dns_names=[server_name], days=AGENT_CERT_DAYS
        )
        return {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {
                "name": credentials_secret(name),
                "namespace": ns,
                "labels": {"app.kubernetes.io/part-of": "fastsandbox", CREDENTIALS_LABEL: name},
                "ownerReferences": [
                    {
                        "apiVersion": API_VERSION,
                        "kind": "SandboxPool",
                        "name": pool.metadata.name,
                        "uid": pool.metadata.uid,
                    }
                ],
            },
            "type": "Opaque",
            "data": {
                TLS_CERT: base64.b64encode(cert).decode(),
                TLS_KEY: base64.b64encode(key).decode(),
                TOKEN_FILE: base64.b64encode(self.token(ns, name).encode()).decode(),
            },
        }

    async def create_secret(self, pool: SandboxPool, name: str) -> None:
        """Make agent `name`'s Secret; one left by an earlier try of the same start is kept
        (its token is the same, its certificate from the same CA)."""
        body = Secret.from_dict(self.secret_manifest(pool, name))
        what = f"Secret {pool.metadata.namespace}/{credentials_secret(name)}"
        try:
            await self.client.create(cast(Secret, body), field_manager=FIELD_MANAGER)
        except ApiError as exc:
            if exc.status.code != 409:
                raise translate(exc, what) from None
        except httpx.HTTPError as exc:
            raise translate(exc, what) from None

    async def delete_secret(self, namespace: str, name: str) -> None:
        what = f"Secret {namespace}/{credentials_secret(name)}"
        try:
            await self.client.delete(Secret, credentials_secret(name), namespace=namespace)
        except ApiError as exc:
            if exc.status.code != 404:
                raise translate(exc, what) from None
        except httpx.HTTPError as exc:
            raise translate(exc, what) from None
