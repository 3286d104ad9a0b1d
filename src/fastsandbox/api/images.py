"""Image reference normalisation, the way Docker (and containerd's CRI) spell image names.

`ctr images pull` does not normalise: it stores exactly the reference it is given and needs a
fully qualified one. Users write `busybox` or `myuser/app:1`, so every image name is normalised
here before it reaches containerd, and image names reported back are in this form too:
`busybox` → `docker.io/library/busybox:latest`.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Sequence
from dataclasses import dataclass

from fastsandbox.errors import InvalidArgument

DEFAULT_DOMAIN = "docker.io"
_LEGACY_DOMAIN = "index.docker.io"
# The distribution reference grammar: path components, a tag, a digest.
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_NAME = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*(?::[\w][\w.-]{{0,127}})?")
_DIGEST = re.compile(r"[a-z0-9]+(?:[+._-][a-z0-9]+)*:[0-9a-fA-F]{32,}")


def split_domain(ref: str) -> tuple[str, str]:
    """(`registry host`, `rest`) of a reference; the host is Docker Hub when none is given."""
    first, sep, rest = ref.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost"):
        domain = DEFAULT_DOMAIN if first == _LEGACY_DOMAIN else first
        return domain, rest
    return DEFAULT_DOMAIN, ref


def normalize_image_ref(image: str) -> str:
    """`busybox` → `docker.io/library/busybox:latest`; qualified names keep their host."""
    ref = image.strip()
    if not ref or any(c.isspace() for c in ref):
        raise InvalidArgument(f"image reference {image!r} is not valid")
    domain, rest = split_domain(ref)
    if domain == DEFAULT_DOMAIN and "/" not in rest:
        rest = f"library/{rest}"
    name, _, digest = rest.partition("@")
    # A tag is after the last ':' of the last path segment (a host's port is not in `rest`).
    if not digest and ":" not in name.rsplit("/", 1)[-1]:
        name = f"{name}:latest"
    if not _NAME.fullmatch(name) or (digest and not _DIGEST.fullmatch(digest)):
        raise InvalidArgument(f"image reference {image!r} is not valid")
    return f"{domain}/{name}" + (f"@{digest}" if digest else "")


def registry_host(ref: str) -> str:
    """The registry host (with port) a normalised reference is pulled from."""
    return split_domain(ref)[0]


def allowed_registries(configured: Sequence[str], insecure: Sequence[str]) -> frozenset[str]:
    """The registries a server pulls from: the configured list, else Docker Hub plus the
    registries named insecure (the ones an operator set up on purpose)."""
    return frozenset(configured) if configured else frozenset((DEFAULT_DOMAIN, *insecure))


def check_registry(image: str, allowed: frozenset[str], field: str) -> str:
    """`image` normalised, or InvalidArgument naming `field` and the allowed list when its
    registry is not one this server pulls from: a request must not make a node fetch from an
    address it picked (a host's loopback port, a cloud metadata service)."""
    ref = normalize_image_ref(image)
    host = registry_host(ref)
    if host not in allowed:
        raise InvalidArgument(
            f"{field}: registry {host!r} is not allowed; this server pulls only from "
            f"{', '.join(sorted(allowed))} (setting allowed_registries)"
        )
    return ref


@dataclass(frozen=True, slots=True)
class PullCredentials:
    """A registry user and password (or token) given with a create; never stored or logged."""

    username: str
    password: str

    def __post_init__(self) -> None:
        if not self.username or ":" in self.username or any(c in self.username for c in "\r\n"):
            raise InvalidArgument("pull_credentials.username: required, without ':' or newlines")
        if not self.password or any(c in self.password for c in "\r\n"):
            raise InvalidArgument("pull_credentials.password: required, without newlines")

    def __repr__(self) -> str:
        return f"PullCredentials(username={self.username!r}, password=<hidden>)"

    def basic(self) -> str:
        raw = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode()
