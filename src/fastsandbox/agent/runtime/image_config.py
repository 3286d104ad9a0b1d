"""An image's process defaults and how a sandbox spec overrides them (Docker's rules).

Pure functions, shared by the cold create and the claim of a warm slot, so both start the same
process for the same spec.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from hashlib import sha256

from fastsandbox.agent.runtime.base import ContainerSpec
from fastsandbox.errors import InvalidArgument, RuntimeFailure


@dataclass(frozen=True, slots=True)
class ImageConfig:
    """What create needs from an image: its process defaults and its rootfs chain id."""

    entrypoint: tuple[str, ...]
    cmd: tuple[str, ...]
    env: tuple[str, ...]
    working_dir: str
    user: str
    chain_id: str


def chain_id(diff_ids: Sequence[str]) -> str:
    """The OCI chain id of a layer stack: the snapshot name of the image's top layer."""
    if not diff_ids:
        raise RuntimeFailure("image has no layers (rootfs.diff_ids is empty)")
    chain = diff_ids[0]
    for diff in diff_ids[1:]:
        chain = "sha256:" + sha256(f"{chain} {diff}".encode()).hexdigest()
    return chain


def merge_process(spec: ContainerSpec, image: ImageConfig) -> tuple[list[str], list[str], str]:
    """argv, env and cwd from the sandbox spec over the image's defaults (Docker's rules):
    a command replaces entrypoint and cmd; args alone replace cmd; env is merged by name."""
    if spec.command:
        argv = [*spec.command, *spec.args]
    else:
        argv = [*image.entrypoint, *(spec.args or image.cmd)]
    env: dict[str, str] = {}
    for item in image.env:
        name, _, value = item.partition("=")
        env[name] = value
    for name, value in spec.env:
        env[name] = value
    cwd = spec.working_dir or image.working_dir or "/"
    return argv, [f"{k}={v}" for k, v in env.items()], cwd


def parse_user(user: str) -> tuple[int, int]:
    """An image's `User` as uid and gid. Only numeric users (and root) are supported: a name
    would need the image's /etc/passwd, which this backend does not read yet."""
    if not user or user in ("root", "0", "root:root", "0:0"):
        return 0, 0
    name, _, group = user.partition(":")
    if not name.isdigit() or (group and not group.isdigit()):
        raise InvalidArgument(
            f"image user {user!r} is a name; only numeric users (uid[:gid]) are supported"
        )
    uid = int(name)
    return uid, int(group) if group else uid
