"""Pure helpers of the containerd backend: image names, process merging, chain ids, users."""

from __future__ import annotations

import pytest

from fastsandbox.agent.runtime.base import ContainerSpec
from fastsandbox.agent.runtime.image_config import ImageConfig, chain_id, merge_process, parse_user
from fastsandbox.api.images import normalize_image_ref, registry_host
from fastsandbox.errors import InvalidArgument


@pytest.mark.parametrize(
    ("given", "normal"),
    [
        ("busybox", "docker.io/library/busybox:latest"),
        ("busybox:1.36", "docker.io/library/busybox:1.36"),
        ("user/app", "docker.io/user/app:latest"),
        ("docker.io/busybox", "docker.io/library/busybox:latest"),
        ("index.docker.io/library/x:1", "docker.io/library/x:1"),
        ("127.0.0.1:5000/busybox", "127.0.0.1:5000/busybox:latest"),
        ("localhost/x", "localhost/x:latest"),
        ("quay.io/a/b@sha256:" + "a" * 64, "quay.io/a/b@sha256:" + "a" * 64),
        ("busybox@sha256:" + "b" * 64, "docker.io/library/busybox@sha256:" + "b" * 64),
    ],
)
def test_normalize_image_ref(given: str, normal: str) -> None:
    assert normalize_image_ref(given) == normal
    assert normalize_image_ref(normal) == normal


@pytest.mark.parametrize(
    "bad", ["", "  ", "a b", ":latest", "UPPER/case", "x@sha256:short", "a//b"]
)
def test_bad_image_refs(bad: str) -> None:
    with pytest.raises(InvalidArgument):
        normalize_image_ref(bad)


def test_registry_host() -> None:
    assert registry_host("127.0.0.1:5000/busybox:latest") == "127.0.0.1:5000"
    assert registry_host(normalize_image_ref("busybox")) == "docker.io"


IMAGE = ImageConfig(
    entrypoint=("/entry",),
    cmd=("default-arg",),
    env=("PATH=/bin", "A=image", "EMPTY="),
    working_dir="/app",
    user="",
    chain_id="sha256:x",
)


def spec(**kw: object) -> ContainerSpec:
    return ContainerSpec(id="sb", image="img", log_path="/l", **kw)  # type: ignore[arg-type]


def test_image_defaults() -> None:
    assert merge_process(spec(), IMAGE) == (
        ["/entry", "default-arg"],
        ["PATH=/bin", "A=image", "EMPTY="],
        "/app",
    )


def test_command_replaces_entrypoint_and_cmd() -> None:
    argv, _, _ = merge_process(spec(command=("sh", "-c"), args=("echo",)), IMAGE)
    assert argv == ["sh", "-c", "echo"]


def test_args_replace_cmd_only() -> None:
    argv, _, _ = merge_process(spec(args=("x", "y")), IMAGE)
    assert argv == ["/entry", "x", "y"]


def test_env_overrides_by_name_and_cwd() -> None:
    _, env, cwd = merge_process(spec(env=(("A", "spec"), ("B", "1")), working_dir="/w"), IMAGE)
    assert env == ["PATH=/bin", "A=spec", "EMPTY=", "B=1"]
    assert cwd == "/w"


def test_cwd_falls_back_to_root() -> None:
    image = ImageConfig((), ("sh",), (), "", "", "sha256:x")
    assert merge_process(spec(), image)[2] == "/"


def test_chain_id() -> None:
    a, b = "sha256:" + "a" * 64, "sha256:" + "b" * 64
    assert chain_id([a]) == a
    # The OCI image spec's definition: ChainID(L0|L1) = Digest(ChainID(L0) + " " + DiffID(L1)).
    import hashlib

    assert chain_id([a, b]) == "sha256:" + hashlib.sha256(f"{a} {b}".encode()).hexdigest()


@pytest.mark.parametrize(
    ("user", "ids"), [("", (0, 0)), ("root", (0, 0)), ("1000", (1000, 1000)), ("7:8", (7, 8))]
)
def test_parse_user(user: str, ids: tuple[int, int]) -> None:
    assert parse_user(user) == ids


def test_named_users_are_refused_clearly() -> None:
    with pytest.raises(InvalidArgument, match="numeric"):
        parse_user("nobody")
