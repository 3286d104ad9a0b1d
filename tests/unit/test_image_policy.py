"""Which registries a server pulls from (`allowed_registries`), and what a failed pull says."""

from __future__ import annotations

import pytest

from fastsandbox.agent.runtime.pull_errors import classify
from fastsandbox.api.images import allowed_registries, check_registry
from fastsandbox.errors import InvalidArgument, NotFound, PermissionDenied, Unavailable

SECRET = "ami-id: i-0123 SECRET-BODY"


def test_the_default_is_docker_hub_plus_the_insecure_registries() -> None:
    assert allowed_registries((), ("127.0.0.1:5000",)) == {"docker.io", "127.0.0.1:5000"}
    assert allowed_registries(("ghcr.io",), ("127.0.0.1:5000",)) == {"ghcr.io"}


@pytest.mark.parametrize(
    "image", ["127.0.0.1:22/x", "169.254.169.254/latest/meta-data", "localhost:2375/a:b"]
)
def test_an_image_from_another_registry_is_refused_naming_field_and_list(image: str) -> None:
    allowed = allowed_registries((), ("127.0.0.1:5000",))
    with pytest.raises(InvalidArgument) as info:
        check_registry(image, allowed, "spec.image")
    message = info.value.message
    assert message.startswith("spec.image: registry ")
    assert "127.0.0.1:5000, docker.io" in message and "allowed_registries" in message


def test_allowed_images_are_normalised() -> None:
    allowed = allowed_registries((), ("127.0.0.1:5000",))
    assert check_registry("busybox", allowed, "f") == "docker.io/library/busybox:latest"
    assert check_registry("127.0.0.1:5000/a", allowed, "f") == "127.0.0.1:5000/a:latest"


@pytest.mark.parametrize(
    ("stderr", "kind", "words"),
    [
        (
            'ctr: failed to resolve reference "r/x:1": unexpected status from HEAD request to '
            f"http://r/v2/x/manifests/1: 401 {SECRET}",
            PermissionDenied,
            "HTTP 401",
        ),
        (
            f"ctr: r/x:1: not found - Server message: {SECRET}",
            NotFound,
            "not found",
        ),
        (
            "ctr: failed to copy: httpReadSeeker: failed open: unexpected status code "
            f"http://r/v2/x/blobs/sha256:ab: 500 Internal Server Error - Server message: {SECRET}",
            Exception,
            "HTTP 500",
        ),
        (
            'ctr: failed to do request: Head "http://127.0.0.1:22/v2/": dial tcp 127.0.0.1:22: '
            "connect: connection refused",
            Unavailable,
            "cannot connect",
        ),
        (f"something new: {SECRET}", Exception, "the agent's log"),
    ],
)
def test_a_failed_pull_names_the_kind_never_the_remotes_words(
    stderr: str, kind: type[Exception], words: str
) -> None:
    failure = classify(stderr, "r")
    assert issubclass(failure.kind, kind)
    assert words in failure.reason
    assert "SECRET" not in failure.reason and "ami-id" not in failure.reason
