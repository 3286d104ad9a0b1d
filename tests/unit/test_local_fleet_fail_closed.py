"""The embedded fleet never falls back to the host network: `auto` means cni, and an agent whose
namespace cannot be made is not started (issue 10: fail closed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fastsandbox.api.models import ObjectMeta, SandboxPool, SandboxPoolSpec
from fastsandbox.errors import Unavailable
from fastsandbox.fleet.local import LocalFleet
from fastsandbox.fleet.netns import CniNetwork


@pytest.mark.parametrize("mode", ["auto", "cni"])
async def test_no_cni_means_no_agent_not_a_host_network_agent(tmp_path: Path, mode: str) -> None:
    fleet = LocalFleet(
        data_dir=tmp_path / "data",
        containerd_socket=tmp_path / "c.sock",
        network=mode,
        cni=CniNetwork(plugin_dirs=(tmp_path / "no-plugins",)),
        agent_argv=("/bin/false",),  # would be spawned only on the (removed) fallback path
    )
    pool = SandboxPool(metadata=ObjectMeta(name="p"), spec=SandboxPoolSpec())
    try:
        with pytest.raises(Unavailable, match="--network host"):
            await fleet.start_agent(pool, "p-1")
        assert await fleet.agents() == []
        assert not (tmp_path / "data" / "agents" / "p-1").exists()  # nothing half-made
    finally:
        await fleet.close()
