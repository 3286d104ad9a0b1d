"""What TLS and per-agent tokens cost on the controller → agent link (the Kubernetes shape).

Run:  .venv/bin/python benchmarks/agent_tls.py [-n 500]

One agent server (FakeRuntime: no containerd, so only the RPC is timed) on 127.0.0.1, called
through the control plane's real `AgentClients`: plaintext + token (the baseline, what agents
served before) and TLS + the agent's own token (what agent Pods serve now), taking turns call by
call in the same run. Series:

  status plaintext / status tls   `AgentClient.status()` called → reply, on a warm channel
  first call plaintext / tls      a new channel's first call (connect, and for TLS the handshake)
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.harness import Results

SECTION = "agent-link"


async def _run(n: int, results: Results) -> None:
    from fastsandbox import _tls
    from fastsandbox.agent.runtime.fake import FakeRuntime
    from fastsandbox.agent.server import run
    from fastsandbox.control.agent_client import AgentClients
    from fastsandbox.fleet.base import AgentAuth
    from fastsandbox.settings import AgentSettings
    from tests.infra import free_port

    key = b"k" * 32
    ca = _tls.new_ca("bench CA")
    tmp = Path(tempfile.mkdtemp(prefix="fsb-bench-tls-"))
    servers = []
    agents: dict[str, tuple[str, AgentAuth]] = {}
    for mode in ("plaintext", "tls"):
        name = f"agent-{mode}"
        token = _tls.derive_token(key, f"ns/{name}")
        server_name = _tls.agent_server_name("ns", name)
        cert = keyfile = None
        auth = AgentAuth(token=token)
        if mode == "tls":
            pem, pkey = _tls.issue(*ca, server_name, dns_names=[server_name])
            cert, keyfile = tmp / "a.crt", tmp / "a.key"
            cert.write_bytes(pem)
            keyfile.write_bytes(pkey)
            auth = AgentAuth(token=token, root_ca=ca[0], server_name=server_name)
        listen = f"127.0.0.1:{free_port()}"
        settings = AgentSettings(
            name=name, pool="p", namespace="ns", listen=listen, state_dir=tmp / name,
            containerd_socket=tmp / "none.sock", token=token, tls_cert=cert, tls_key=keyfile,
        )  # fmt: skip
        ready, stop = asyncio.Event(), asyncio.Event()
        task = asyncio.create_task(run(settings, ready=ready, stop=stop, runtime=FakeRuntime()))
        await asyncio.wait_for(ready.wait(), 10)
        servers.append((stop, task))
        agents[mode] = (listen, auth)

    def clients_for(mode: str) -> AgentClients:
        auth = agents[mode][1]
        return AgentClients(auth=lambda _t: auth)

    warm = {mode: clients_for(mode) for mode in agents}
    series: dict[str, list[float]] = {f"status {m}": [] for m in agents}
    series.update({f"first call {m}": [] for m in agents})
    try:
        for mode in agents:  # warm-up, untimed
            await warm[mode].get(agents[mode][0]).status()
        for i in range(n):
            for mode in agents if i % 2 == 0 else reversed(list(agents)):
                started = time.perf_counter()
                await warm[mode].get(agents[mode][0]).status()
                series[f"status {mode}"].append((time.perf_counter() - started) * 1000)
        for _ in range(max(n // 10, 10)):
            for mode in agents:
                fresh = clients_for(mode)
                started = time.perf_counter()
                await fresh.get(agents[mode][0]).status()
                series[f"first call {mode}"].append((time.perf_counter() - started) * 1000)
                await fresh.close()
    finally:
        for clients in warm.values():
            await clients.close()
        for stop, task in servers:
            stop.set()
            await task
    for name, values in series.items():
        boundary = "Status called → reply" if name.startswith("status") else "new channel → reply"
        results.add(SECTION, name, values, boundary)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=500)
    args = parser.parse_args()
    results = Results()
    print(f"[{SECTION}] plaintext + token (baseline) vs TLS + per-agent token, same run")
    asyncio.run(_run(args.n, results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
