"""Private networks of one agent's sandboxes: a small pool of ready namespaces, and the calls the
manager makes — `acquire() -> SandboxNet`, `publish(net, sandbox_id, ports)`, `release(net)`.

Why it is shaped this way:
- A create must not wait for `ip netns add` and a veth (four processes, ~20 ms): `ready` namespaces
  are made ahead by one background task and refilled after each acquire; a create takes one
  from the deque (no I/O) and, only when it declares ports, adds their DNAT rules (one
  `iptables-restore` process). If the pool is momentarily empty the create makes one inline
  rather than fail: slower, never less isolated.
- Fail closed: `unavailable` holds why the agent's rules could not be set; every acquire then
  raises FailedPrecondition naming it. Nothing here ever hands out the agent's own namespace.
- Nothing half-made: a slot's namespace, veth, DNAT rules and host ports are released together;
  a prepare that fails part-way deletes its namespace (which takes the veth with it).
- Restart: the agent adopts its sandboxes from their container labels (slot index and published
  ports); every other namespace carrying this agent's tag is deleted, and the agent's chains are
  rewritten whole (`iptables-restore`), DNAT rules of the adopted sandboxes included.
- In a Kubernetes agent Pod (`hook_dir` set) the agent makes no namespace and no veth: runc makes
  the sandbox's namespace and the hook of hook.py wires it, on the host. The agent then runs in
  A itself and sets its rules there directly (no nsenter, which would need CAP_SYS_ADMIN), with
  NET_ADMIN + NET_RAW in its own Pod namespace; an acquire is an address and nothing else.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from fastsandbox.agent.network import hook, plan
from fastsandbox.agent.network.plan import Exhausted, NetConfig, Published, RangeAllocator
from fastsandbox.api import labels
from fastsandbox.errors import CapacityExhausted, FailedPrecondition, RuntimeFailure

log = logging.getLogger(__name__)

NETNS_DIR = Path("/var/run/netns")
DEFAULT_READY = 2
"""Namespaces kept ready per agent: enough for a burst of creates while the refill catches up."""


class Runner(Protocol):
    """Runs one command; raises RuntimeFailure (with its stderr) when it fails."""

    async def run(self, argv: Sequence[str], stdin: str | None = None) -> str: ...


class SubprocessRunner:
    async def run(self, argv: Sequence[str], stdin: str | None = None) -> str:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await proc.communicate(stdin.encode() if stdin is not None else None)
        if proc.returncode != 0:
            detail = err.decode(errors="replace").strip() or out.decode(errors="replace")
            raise RuntimeFailure(
                f"{' '.join(argv[:6])} failed (exit {proc.returncode}): {detail[-400:]}"
            )
        return out.decode(errors="replace")


@dataclass(slots=True)
class SandboxNet:
    """One sandbox's network: its namespace (`path` goes into the OCI spec's
    linux.namespaces, for runc and gVisor alike), address and published ports."""

    index: int
    netns: str
    path: str
    ip: str
    gateway: str
    veth: str
    sandbox_id: str = ""
    hook: tuple[str, ...] = ()
    """In a Pod: the createRuntime hook that wires the namespace runc makes (`path` empty)."""
    published: dict[int, int] = field(default_factory=dict)
    """Declared port → host port on the agent's address."""
    seq: int = 0
    """When it was acquired (`PrivateNetwork.seq`): a sweep spares creates newer than its look."""
    published_as: str = ""
    """The sandbox id its DNAT rules' comments name (they are deleted by exact match), kept
    when a warm slot's net changes hands (`assign`)."""


class PrivateNetwork:
    def __init__(
        self,
        cfg: NetConfig,
        *,
        runner: Runner | None = None,
        ready: int = DEFAULT_READY,
        netns_dir: Path = NETNS_DIR,
        unsupported: str | None = None,
        require_root: bool = True,
        hook_dir: Path | None = None,
    ) -> None:
        self.cfg = cfg
        # Set in a Kubernetes agent Pod: where the network hook is staged (a host path).
        self.hook_dir = hook_dir
        self.hook: Path | None = None
        # Why this agent can never make private networks (it fails every create with it).
        self.unsupported = unsupported
        # Off only with a runner that does not touch the kernel (unit tests).
        self.require_root = require_root
        self.runner: Runner = runner or SubprocessRunner()
        # In a Pod an acquire takes an address only: nothing to make ahead.
        self.ready_target = 0 if hook_dir is not None else ready
        self.netns_dir = netns_dir
        self.unavailable: str | None = "not started"
        self._indexes = RangeAllocator(0, cfg.slots - 1, "sandbox address")
        self._ports = RangeAllocator(*cfg.port_range, what="host port")
        self._ready: collections.deque[SandboxNet] = collections.deque()
        self._by_sandbox: dict[str, SandboxNet] = {}
        self._wake = asyncio.Event()
        self._refill: asyncio.Task[None] | None = None
        self._dnat_lock = asyncio.Lock()
        self.seq = 0
        """Bumped by every acquire."""

    # -- life ----------------------------------------------------------------------------------
    async def start(self, adopt: Mapping[str, Mapping[str, str]]) -> None:
        """Set the agent's rules and adopt live sandboxes: `adopt` maps sandbox id → container
        labels (`INDEX_LABEL`, `PUBLISHED_LABEL`). Never raises: a failure is kept in
        `unavailable`, so each create fails closed with the reason."""
        try:
            reason = self._check()
            if reason is None:
                await self._setup(adopt)
            self.unavailable = reason
        except RuntimeFailure as exc:
            self.unavailable = f"could not set up private networking: {exc.message}"
        if self.unavailable is not None:
            log.error(
                "private networking unavailable; creates will fail",
                extra={"agent": self.cfg.agent, "reason": self.unavailable},
            )
            return
        self._refill = asyncio.get_running_loop().create_task(
            self._refill_loop(), name=f"netns refill {self.cfg.agent}"
        )
        self._wake.set()
        log.info(
            "private networking ready",
            extra={"agent": self.cfg.agent, "adopted": len(self._by_sandbox)},
        )

    def _check(self) -> str | None:
        if self.unsupported is not None:
            return self.unsupported
        if self.require_root and os.geteuid() != 0:
            return "private networking needs root (network namespaces and iptables)"
        if self.hook_dir is not None:
            # The Pod's namespace path is the node's (from the CRI sandbox record): not
            # visible here, so it is the hook that checks it, at each create.
            return None if self.cfg.agent_netns else "the agent's Pod names no network namespace"
        if not self.cfg.agent_netns:
            return (
                "the agent runs on the host network (no --netns-path): a private network "
                "needs a namespace of the agent's own, so the host's rules are never touched"
            )
        if not Path(self.cfg.agent_netns).exists():
            return f"agent network namespace {self.cfg.agent_netns} does not exist"
        return None

    async def _setup(self, adopt: Mapping[str, Mapping[str, str]]) -> None:
        if self.hook_dir is not None:
            try:
                self.hook = hook.stage(self.hook_dir)
            except OSError as exc:
                raise RuntimeFailure(
                    f"cannot stage the network hook in {self.hook_dir}: {exc}"
                ) from None
        published: list[Published] = []
        for sandbox_id, found in adopt.items():
            index = _int(found.get(INDEX_LABEL, ""))
            if index is None or not 0 <= index < self.cfg.slots:
                continue
            net = self._net(index)
            net.sandbox_id = sandbox_id
            net.published = plan.parse_published_label(found.get(PUBLISHED_LABEL, ""))
            self._indexes.mark(index)
            for port, host_port in net.published.items():
                with contextlib.suppress(ValueError):
                    self._ports.mark(host_port)
                published.append(Published(port, host_port, net.ip, sandbox_id))
            self._by_sandbox[sandbox_id] = net
        if self.hook_dir is None:
            # In a Pod the hook turns forwarding on (/proc/sys is read-only in a container).
            await self.runner.run(self._in_a(["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"]))
        try:
            await self.runner.run(
                self._in_a(["iptables-restore", "-w", "--noflush"]),
                plan.static_rules(self.cfg, published),
            )
        except RuntimeFailure as exc:
            if self.hook_dir is None:
                raise
            raise RuntimeFailure(
                f"{exc.message} (an agent Pod of a private pool needs the capabilities "
                "NET_ADMIN and NET_RAW, in its own network namespace only)"
            ) from None
        for table, builtin, ours in plan.jumps(self.cfg):
            try:
                await self.runner.run(
                    self._in_a(["iptables", "-w", "-t", table, "-C", builtin, "-j", ours])
                )
            except RuntimeFailure:
                await self.runner.run(
                    self._in_a(["iptables", "-w", "-t", table, "-I", builtin, "1", "-j", ours])
                )
        if self.hook_dir is not None:
            return  # runc's namespaces die with their containers: nothing of ours to sweep
        # Namespaces of this agent that no adopted sandbox holds: ready ones of the previous
        # life, or leftovers of a crash mid-create. Deleted, never reused: a fresh one is cheap
        # and known clean.
        kept = {n.netns for n in self._by_sandbox.values()}
        for name in self.own_namespaces():
            if name not in kept:
                await self._remove_netns(name)

    def own_namespaces(self) -> list[str]:
        """Every namespace under `netns_dir` carrying this agent's tag."""
        try:
            names = sorted(p.name for p in self.netns_dir.iterdir())
        except FileNotFoundError:
            return []
        return [n for n in names if plan.parse_index(n, self.cfg.tag) is not None]

    async def close(self) -> None:
        """Stop refilling; ready namespaces are deleted (sandboxes keep theirs)."""
        if self._refill is not None:
            self._refill.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refill
            self._refill = None
        while self._ready:
            net = self._ready.popleft()
            await self._drop(net)

    # -- the manager's calls ---------------------------------------------------------------------
    async def acquire(self, sandbox_id: str) -> SandboxNet:
        """A ready namespace for `sandbox_id` (made inline when none is ready)."""
        if self.unavailable is not None:
            raise FailedPrecondition(
                f"agent {self.cfg.agent} cannot make private networks: {self.unavailable}"
            )
        existing = self._by_sandbox.get(sandbox_id)
        if existing is not None:
            return existing  # a retried create
        net = self._ready.popleft() if self._ready else await self._prepare()
        self.seq += 1
        net.seq = self.seq
        net.sandbox_id = sandbox_id
        self._by_sandbox[sandbox_id] = net
        self._wake.set()
        return net

    def assign(self, net: SandboxNet, key: str) -> None:
        """Hand `net` over to `key`: a warm slot's net (acquired under the slot's container id)
        becomes the sandbox's that claims it, and the slot's again when the claim fails. Counts
        as an acquire for `stale` (the new key's container may not show in a look begun
        before)."""
        if self._by_sandbox.get(net.sandbox_id) is not net:
            raise RuntimeFailure(f"network of {net.sandbox_id} is not held (released already)")
        other = self._by_sandbox.get(key)
        if other is not None and other is not net:
            raise FailedPrecondition(f"sandbox {key} holds a network already")
        del self._by_sandbox[net.sandbox_id]
        net.sandbox_id = key
        self._by_sandbox[key] = net
        self.seq += 1
        net.seq = self.seq

    def spare(self) -> int:
        """Addresses an acquire can still get: ready namespaces and unused indexes."""
        return len(self._ready) + self.cfg.slots - len(self._indexes.in_use)

    async def publish(self, net: SandboxNet, ports: Iterable[int]) -> dict[int, int]:
        """Host ports for `ports` (DNAT on the agent's address); returns port → host port.
        All or nothing: CapacityExhausted (no host port left) takes none."""
        wanted = [p for p in sorted(set(ports)) if p not in net.published]
        if not wanted:
            return dict(net.published)
        owner = net.published_as or net.sandbox_id
        taken: list[Published] = []
        try:
            for port in wanted:
                taken.append(Published(port, self._ports.take(), net.ip, owner))
        except Exhausted as exc:
            for p in taken:
                self._ports.release(p.host_port)
            raise CapacityExhausted(
                f"agent {self.cfg.agent} has no host port left to publish on: {exc}"
            ) from None
        try:
            async with self._dnat_lock:
                await self.runner.run(
                    self._in_a(["iptables-restore", "-w", "--noflush"]),
                    "\n".join(plan.dnat_commands(self.cfg, taken, "-A")),
                )
        except RuntimeFailure:
            for p in taken:
                self._ports.release(p.host_port)
            raise
        net.published.update({p.port: p.host_port for p in taken})
        net.published_as = owner
        return dict(net.published)

    def get(self, sandbox_id: str) -> SandboxNet | None:
        return self._by_sandbox.get(sandbox_id)

    def stale(self, existing: Iterable[str], before: int) -> list[SandboxNet]:
        """Nets acquired before `before` (a `seq` read before the runtime was listed) whose
        sandbox is not in `existing`: their container went without a delete through us (the
        janitor, a hand `ctr rm`)."""
        keep = set(existing)
        return [n for sid, n in self._by_sandbox.items() if sid not in keep and n.seq < before]

    async def release(self, net: SandboxNet) -> None:
        """Remove the DNAT rules, the namespace (and veth) and free address and host ports.
        Idempotent: a net released already (or replaced) is left alone."""
        if self._by_sandbox.get(net.sandbox_id) is not net:
            return
        self._by_sandbox.pop(net.sandbox_id, None)
        await self._drop(net)
        self._wake.set()

    async def _drop(self, net: SandboxNet) -> None:
        if net.published:
            owner = net.published_as or net.sandbox_id
            rules = [Published(port, host, net.ip, owner) for port, host in net.published.items()]
            try:
                async with self._dnat_lock:
                    await self.runner.run(
                        self._in_a(["iptables-restore", "-w", "--noflush"]),
                        "\n".join(plan.dnat_commands(self.cfg, rules, "-D")),
                    )
            except RuntimeFailure as exc:
                # Gone already (a half-made publish, a hand cleanup): the port is free anyway.
                log.warning("could not delete DNAT rules", extra={"err": exc.message})
            for host in net.published.values():
                self._ports.release(host)
            net.published = {}
        if self.hook_dir is None:
            await self._remove_netns(net.netns)
        self._indexes.release(net.index)

    def _in_a(self, argv: list[str]) -> list[str]:
        """`argv` run in the agent's namespace A: where the agent itself runs in a Pod."""
        return argv if self.hook_dir is not None else plan.in_netns(self.cfg.agent_netns, argv)

    def _net(self, index: int) -> SandboxNet:
        gateway, ip = self.cfg.addresses(index)
        name = self.cfg.netns_name(index)
        if self.hook_dir is not None:
            assert self.hook is not None, "hook staged at start"
            return SandboxNet(
                index=index, netns=name, path="", ip=ip, gateway=gateway,
                veth=self.cfg.veth_name(index), hook=hook.argv(self.hook, self.cfg, index),
            )  # fmt: skip
        return SandboxNet(
            index=index,
            netns=name,
            path=str(self.netns_dir / name),
            ip=ip,
            gateway=gateway,
            veth=self.cfg.veth_name(index),
        )

    async def _remove_netns(self, name: str) -> None:
        if not (self.netns_dir / name).exists():
            return
        try:
            await self.runner.run(["ip", "netns", "delete", name])
        except RuntimeFailure as exc:
            log.warning(
                "could not delete a sandbox netns", extra={"netns": name, "err": exc.message}
            )

    # -- the ready pool ---------------------------------------------------------------------------
    async def _prepare(self) -> SandboxNet:
        try:
            index = self._indexes.take()
        except Exhausted as exc:
            raise CapacityExhausted(
                f"agent {self.cfg.agent} has no sandbox address left in {self.cfg.subnet}: {exc}"
            ) from None
        if self.hook_dir is not None:
            return self._net(index)  # runc makes the namespace, the hook wires it
        name = self.cfg.netns_name(index)
        try:
            await self._remove_netns(name)  # a leftover of a crash, never a live one (adopted)
            for argv, stdin in plan.prepare_commands(self.cfg, index):
                await self.runner.run(argv, stdin)
        except BaseException:
            with contextlib.suppress(Exception):
                await asyncio.shield(self._remove_netns(name))
            self._indexes.release(index)
            raise
        return self._net(index)

    async def _refill_loop(self) -> None:
        failures = 0
        while True:
            await self._wake.wait()
            self._wake.clear()
            while len(self._ready) < self.ready_target:
                try:
                    self._ready.append(await self._prepare())
                    failures = 0
                except (RuntimeFailure, CapacityExhausted) as exc:
                    failures += 1
                    log.warning(
                        "could not prepare a sandbox netns",
                        extra={"agent": self.cfg.agent, "err": exc.message},
                    )
                    # Creates then prepare inline and fail with the reason themselves.
                    await asyncio.sleep(min(0.5 * failures, 5.0))
                    break

    @property
    def ready_count(self) -> int:
        return len(self._ready)


INDEX_LABEL = labels.NET_INDEX_LABEL
PUBLISHED_LABEL = labels.PUBLISHED_LABEL


def _int(text: str) -> int | None:
    return int(text) if text.isdigit() else None
