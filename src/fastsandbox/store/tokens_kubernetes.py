"""`KubeTokenStore`: tenant token records as Secrets in the controller's namespace.

One Secret per token, `fsb-token-<id>`, labelled `fastsandbox.io/api-token=true`, holding the
token's namespace, times and SHA-256 — never the token. A Secret (not a CRD) because only the
controller's namespace's RBAC should reach it: tenants can be given Sandboxes in their own
namespace without seeing anyone's token records. Every replica reads the same Secrets, so a
token made through one replica works on all (each caches a lookup a few seconds:
`TokenAuthenticator.cache_seconds`).
"""

from __future__ import annotations

import base64
import binascii
from datetime import datetime
from typing import cast

from lightkube import AsyncClient
from lightkube.resources.core_v1 import Secret

from fastsandbox._kube.config import FIELD_MANAGER
from fastsandbox._kube.errors import translate
from fastsandbox.api.labels import API_TOKEN_LABEL
from fastsandbox.control.tokens import TokenRecord
from fastsandbox.errors import NotFound

TOKEN_LABEL = API_TOKEN_LABEL
PREFIX = "fsb-token-"


def _decode(secret: Secret) -> TokenRecord | None:
    data = secret.data or {}
    try:
        fields = {k: base64.b64decode(v).decode() for k, v in data.items()}
        expires = fields.get("expires") or ""
        name = secret.metadata.name if secret.metadata is not None else None
        return TokenRecord(
            id=(name or "").removeprefix(PREFIX),
            namespace=fields["namespace"],
            sha256=fields["sha256"],
            created=datetime.fromisoformat(fields["created"]),
            expires=datetime.fromisoformat(expires) if expires else None,
        )
    except (KeyError, ValueError, binascii.Error, UnicodeDecodeError):
        return None  # not one of ours, or damaged: it authenticates nobody


class KubeTokenStore:
    def __init__(self, client: AsyncClient, namespace: str) -> None:
        self._client = client
        self._namespace = namespace

    def _what(self, ident: str) -> str:
        return f"Secret {self._namespace}/{PREFIX}{ident}"

    async def add(self, record: TokenRecord) -> None:
        body = Secret.from_dict(
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {
                    "name": PREFIX + record.id,
                    "namespace": self._namespace,
                    "labels": {"app.kubernetes.io/part-of": "fastsandbox", TOKEN_LABEL: "true"},
                },
                "type": "Opaque",
                "stringData": {
                    "namespace": record.namespace,
                    "sha256": record.sha256,
                    "created": record.created.isoformat(),
                    "expires": record.expires.isoformat() if record.expires else "",
                },
            }
        )
        try:
            await self._client.create(cast(Secret, body), field_manager=FIELD_MANAGER)
        except Exception as exc:
            raise translate(exc, self._what(record.id)) from None

    async def get(self, ident: str) -> TokenRecord | None:
        try:
            secret = await self._client.get(Secret, PREFIX + ident, namespace=self._namespace)
        except Exception as exc:
            error = translate(exc, self._what(ident))
            if isinstance(error, NotFound):
                return None
            raise error from None
        labels = (secret.metadata.labels or {}) if secret.metadata is not None else {}
        if labels.get(TOKEN_LABEL) != "true":
            return None
        return _decode(secret)

    async def list(self) -> list[TokenRecord]:
        records: list[TokenRecord] = []
        try:
            async for secret in self._client.list(
                Secret, namespace=self._namespace, labels={TOKEN_LABEL: "true"}
            ):
                record = _decode(secret)
                if record is not None:
                    records.append(record)
        except Exception as exc:
            raise translate(exc, f"Secrets {self._namespace}/{PREFIX}*") from None
        return sorted(records, key=lambda r: r.created)

    async def delete(self, ident: str) -> None:
        if await self.get(ident) is None:
            raise NotFound(f"token {ident}: not found (see fsb token list)")
        try:
            await self._client.delete(Secret, PREFIX + ident, namespace=self._namespace)
        except Exception as exc:
            error = translate(exc, self._what(ident))
            if isinstance(error, NotFound):
                raise NotFound(f"token {ident}: not found (see fsb token list)") from None
            raise error from None
