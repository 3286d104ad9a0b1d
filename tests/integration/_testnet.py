"""A CNI network of the tests' own (bridge, subnet, IPAM dir), so tests never share addresses
with a real `fsb server` on the same machine, and teardown can remove the bridge outright."""

from __future__ import annotations

import subprocess
from pathlib import Path

from fastsandbox.fleet.netns import CniNetwork
from tests.infra import cannot_run

TEST_BRIDGE = "fsbtest0"
TEST_SUBNET = "10.209.254.0/24"


def make_network(tmp_path: Path) -> CniNetwork:
    return CniNetwork(
        name="fsbtest", bridge=TEST_BRIDGE, subnet=TEST_SUBNET, ipam_dir=tmp_path / "ipam"
    )


def require_cni() -> None:
    reason = CniNetwork().unavailable_reason()
    if reason is not None:
        cannot_run(reason)


def remove_bridge() -> None:
    subprocess.run(["ip", "link", "delete", TEST_BRIDGE], capture_output=True, check=False)


def bridge_exists() -> bool:
    return (Path("/sys/class/net") / TEST_BRIDGE).exists()


def ip(*args: str) -> str:
    """Run `ip ARGS...` (a few milliseconds; fine to block in a test)."""
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=True).stdout
