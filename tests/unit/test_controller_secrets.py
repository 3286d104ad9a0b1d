"""The controller's shared Secrets (the API token, the Fast-Path TLS material): every replica
ends up with the same value, exactly one creates it, a create that loses the race reads the
winner's, and an unusable Secret is a message saying what to do. The apiserver here is a fake
at the client boundary (Secrets in a dict, `stringData` stored as base64 `data` as it does);
the real one is the Kubernetes tier's (tests/e2e/test_kube_controller.py)."""

from __future__ import annotations

import asyncio
import base64
from typing import Any

import pytest
from lightkube.resources.core_v1 import Secret

from fastsandbox import controller
from fastsandbox.errors import AlreadyExists, FsbError, NotFound
from fastsandbox.settings import ControllerSettings

NS = "fsb-system"


class FakeSecrets:
    """`get`/`create` of Secrets as lightkube's AsyncClient does them, on a dict."""

    def __init__(self) -> None:
        self.data: dict[str, dict[str, str]] = {}
        self.creates = 0
        self.before_create: Any = None  # runs just before a create lands (a racing replica)

    async def get(self, kind: Any, name: str, *, namespace: str) -> Secret:
        await asyncio.sleep(0)
        if name not in self.data:
            raise NotFound(f"secrets {name} not found")
        return Secret.from_dict({"metadata": {"name": name}, "data": dict(self.data[name])})

    async def create(self, body: Secret, *, field_manager: str) -> Secret:
        if self.before_create is not None:
            hook, self.before_create = self.before_create, None
            await hook()
        await asyncio.sleep(0)
        assert body.metadata is not None and body.metadata.name
        name = body.metadata.name
        if name in self.data:
            raise AlreadyExists(f"secrets {name} already exists")
        self.creates += 1
        self.data[name] = {
            k: base64.b64encode(v.encode()).decode() for k, v in (body.stringData or {}).items()
        }
        return body


SETTINGS = ControllerSettings(listen="127.0.0.1:9090")


async def test_replicas_share_one_api_token_made_once() -> None:
    api = FakeSecrets()
    answers = await asyncio.gather(
        *(controller.api_token(api, NS, None) for _ in range(3))  # type: ignore[arg-type]
    )
    tokens = {token for token, _ in answers}
    assert len(tokens) == 1 and all(tokens)
    assert [created for _, created in answers].count(True) == 1
    assert api.creates == 1
    assert await controller.api_token(api, NS, "given") == ("given", False)  # type: ignore[arg-type]


async def test_a_create_that_loses_the_race_reads_the_winners_secret() -> None:
    api = FakeSecrets()

    async def another_replica_wins() -> None:
        api.data[controller.API_TOKEN_SECRET] = {"token": base64.b64encode(b"theirs").decode()}

    api.before_create = another_replica_wins
    assert await controller.api_token(api, NS, None) == ("theirs", False)  # type: ignore[arg-type]


async def test_an_api_token_secret_without_the_key_says_what_to_do() -> None:
    api = FakeSecrets()
    api.data[controller.API_TOKEN_SECRET] = {"other": base64.b64encode(b"x").decode()}
    with pytest.raises(FsbError, match="has no 'token' key: set one, or delete the Secret"):
        await controller.api_token(api, NS, None)  # type: ignore[arg-type]


async def test_replicas_serve_the_same_tls_material() -> None:
    api = FakeSecrets()
    first, second = await asyncio.gather(
        controller.fastpath_tls(api, SETTINGS, NS),  # type: ignore[arg-type]
        controller.fastpath_tls(api, SETTINGS, NS),  # type: ignore[arg-type]
    )
    assert first is not None and second is not None
    assert first == second and first.ca_pem is not None
    assert api.creates == 1
    stored = {k: base64.b64decode(v) for k, v in api.data[controller.TLS_SECRET].items()}
    assert stored == {
        "ca.crt": first.ca_pem,
        "ca.key": stored["ca.key"],
        "tls.crt": first.cert_pem,
        "tls.key": first.key_pem,
    }


async def test_an_unusable_tls_secret_says_what_to_do() -> None:
    api = FakeSecrets()
    api.data[controller.TLS_SECRET] = {"ca.crt": "bm90IGEgY2VydA==", "tls.crt": "!!"}
    with pytest.raises(FsbError, match=r"lacks a usable ca\.crt/ca\.key/tls\.crt/tls\.key"):
        await controller.fastpath_tls(api, SETTINGS, NS)  # type: ignore[arg-type]
