"""Asking a registry whether it would serve an image to a caller: one manifest HEAD, with the
Docker registry auth flow (Basic, or a Bearer token fetched from the realm the registry names).

Why: a private image already cached on a node would otherwise be usable by anyone who names it.
Before a cached image is reused, the agent asks its registry whether it is private (an anonymous
HEAD refused) and, if so, whether the caller's pull credentials are accepted (`image_access.py`).

Only the HTTP status is used; nothing the registry says reaches the caller. Credentials travel
only to the allowed registry itself and to the token realm it names.
"""

from __future__ import annotations

import asyncio
import json
import re
import urllib.error
import urllib.parse
import urllib.request

from fastsandbox.api.images import DEFAULT_DOMAIN, PullCredentials, split_domain
from fastsandbox.errors import Unavailable

# Where Docker Hub's API really is (the name `docker.io` does not serve /v2/).
_HUB_API = "registry-1.docker.io"
_ACCEPT = ", ".join(
    (
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.docker.distribution.manifest.v2+json",
    )
)
_PARAM = re.compile(r'(\w+)="([^"]*)"')
TIMEOUT_SECONDS = 10.0


def manifest_url(ref: str, plain_http: bool) -> str:
    host, rest = split_domain(ref)
    name, at, digest = rest.partition("@")
    if at:
        reference = digest
    else:
        name, _, reference = name.rpartition(":")
    api = _HUB_API if host == DEFAULT_DOMAIN else host
    scheme = "http" if plain_http else "https"
    return f"{scheme}://{api}/v2/{name}/manifests/{reference}"


def _head(url: str, authorization: str | None) -> tuple[int, str]:
    """(status, WWW-Authenticate) of a manifest HEAD."""
    headers = {"Accept": _ACCEPT}
    if authorization:
        headers["Authorization"] = authorization
    request = urllib.request.Request(url, method="HEAD", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_SECONDS) as resp:
            return int(resp.status), ""
    except urllib.error.HTTPError as err:
        return err.code, err.headers.get("WWW-Authenticate", "")


def _token(challenge: str, creds: PullCredentials | None) -> str | None:
    params = dict(_PARAM.findall(challenge))
    realm = params.pop("realm", "")
    if not realm.startswith(("https://", "http://")):
        return None
    url = realm + "?" + urllib.parse.urlencode(params)
    headers = {"Authorization": creds.basic()} if creds else {}
    try:
        request = urllib.request.Request(url, headers=headers)
        with urllib.request.urlopen(request, timeout=TIMEOUT_SECONDS) as resp:
            body = json.loads(resp.read(1 << 16))
    except (urllib.error.HTTPError, ValueError):
        return None
    token = body.get("token") or body.get("access_token") if isinstance(body, dict) else None
    return str(token) if token else None


def status_for(ref: str, creds: PullCredentials | None, *, plain_http: bool) -> int:
    """The HTTP status a manifest HEAD of `ref` gets with `creds` (None: anonymous), after the
    auth flow. Raises Unavailable when the registry cannot be reached."""
    url = manifest_url(ref, plain_http)
    host = split_domain(ref)[0]
    try:
        status, challenge = _head(url, creds.basic() if creds else None)
        if status != 401:
            return status
        scheme = challenge.split(" ", 1)[0].lower()
        if scheme == "bearer":
            token = _token(challenge, creds)
            return _head(url, f"Bearer {token}")[0] if token else 401
        return status  # Basic: the credentials (if any) were sent and refused
    except (urllib.error.URLError, OSError) as err:
        reason = type(getattr(err, "reason", err)).__name__
        raise Unavailable(f"cannot reach registry {host} to check access ({reason})") from None


async def allows(ref: str, creds: PullCredentials | None, *, plain_http: bool) -> bool:
    """Whether the registry would serve `ref`'s manifest to `creds` (None: to anyone)."""
    status = await asyncio.to_thread(status_for, ref, creds, plain_http=plain_http)
    return status == 200
