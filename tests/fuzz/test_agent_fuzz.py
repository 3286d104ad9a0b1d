"""Property-based fuzzing of the agent API (issue 12) against a real agent process
(`python -m fastsandbox.agent`, as the fleet starts it) on the session's real containerd and
loopback registry: CreateSandbox with fuzzed specs (ids with slashes and dots, odd env, ports,
limits and labels), DeleteSandbox, PullImage, Logs, Cordon, FileOp and ListProcesses.

Property: every call is answered with a deliberate status (never UNKNOWN or INTERNAL, never a
hang past the call's deadline), an INVALID_ARGUMENT names the field, the agent process is still
alive after every case, and what a case created is deleted by the case, so at the end the
agent's containerd namespace holds nothing. Images always name the loopback registry (or are
empty): no case sends traffic off the machine.

Size: FSB_FUZZ_EXAMPLES (default 500, as CI runs it); `make fuzz` runs 10 000.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastsandbox.agent.runtime.containerd import ContainerdRuntime
from fastsandbox.api._proto.fastsandbox.v1 import agent_pb2, agent_pb2_grpc, io_pb2
from tests.infra import ContainerdProc, RegistryProc
from tests.integration.test_agent_process import AgentProc

pytestmark = pytest.mark.integration

EXAMPLES = int(os.environ.get("FSB_FUZZ_EXAMPLES", "500"))
SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=os.environ.get("FSB_FUZZ_RANDOM") is None,
)
NAMESPACE = "fsb-fuzz-agent"
CALL_TIMEOUT = 60.0
DELIBERATE = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.UNAVAILABLE,  # the registry refused a pull: a runtime failure, said so
}
FIELD = re.compile(
    r"sandbox_id|sandbox id|id\b|image|command|args|env|working_dir|workdir|port|label|cpu|"
    r"memory|pids|disk|log|path|op\b|operation|depth|mode|user|destination|name|namespace|"
    r"tail|since|spec|target|grace",
    re.IGNORECASE,
)

text = st.text(max_size=40)
ids = st.sampled_from(["", "ok-1", "../escape", "a/b", ".", "..", "x" * 200, "UP", "-x"]) | text
int64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
small = st.sampled_from([0, 0, 0, -1, 1, 100, 2**31, 2**62])


class Harness:
    def __init__(self, agent: AgentProc, image: str, registry: str) -> None:
        self.agent = agent
        self.image = image
        self.registry = registry
        self.loop = asyncio.new_event_loop()
        self.loop.run_until_complete(self._start())

    async def _start(self) -> None:
        await self.agent.ready()
        self.channel = grpc.aio.insecure_channel(self.agent.listen)
        self.stub = agent_pb2_grpc.AgentStub(self.channel)  # type: ignore[no-untyped-call]

    async def _call(self, method: str, request: Any) -> tuple[grpc.StatusCode, str, Any]:
        rpc = getattr(self.stub, method)
        try:
            if method == "Logs":
                chunks = [c async for c in rpc(request, timeout=CALL_TIMEOUT)]
                return grpc.StatusCode.OK, "", chunks
            return grpc.StatusCode.OK, "", await rpc(request, timeout=CALL_TIMEOUT)
        except grpc.aio.AioRpcError as e:
            return e.code(), e.details() or "", None

    def call(self, method: str, request: Any) -> tuple[grpc.StatusCode, str, Any]:
        code, details, reply = self.loop.run_until_complete(self._call(method, request))
        assert self.agent.proc is not None and self.agent.proc.poll() is None, (
            f"the agent died on {method}: {self.agent.tail()}"
        )
        assert code in DELIBERATE, f"{method} answered {code.name}: {details}"
        if code is grpc.StatusCode.INVALID_ARGUMENT:
            assert details.strip() and FIELD.search(details), f"{method}: no field: {details}"
        return code, details, reply

    def close(self) -> None:
        self.loop.run_until_complete(self.channel.close())
        self.loop.close()


@pytest.fixture(scope="module")
def harness(
    containerd: ContainerdProc, registry: RegistryProc, demo_image: str, cgroup_parent: str
) -> Iterator[Harness]:
    work = Path(tempfile.mkdtemp(prefix="fsb-fuzz-agent-", dir="/tmp"))
    socket = work / "agent.sock"
    name = f"fuzz-agent-{uuid.uuid4().hex[:8]}"
    argv = [
        sys.executable, "-m", "fastsandbox.agent", f"--name={name}", "--pool=fuzz",
        f"--listen=unix://{socket}", f"--state-dir={work / 'state'}",
        f"--containerd-socket={containerd.socket}", f"--containerd-namespace={NAMESPACE}",
        f"--cgroup-parent={cgroup_parent}", f"--insecure-registry={registry.addr}",
        "--capacity=2", "--grace=0", "--log-format=json",
    ]  # fmt: skip
    agent = AgentProc(argv, f"unix://{socket}", socket, work / "state", work / "agent.log")
    agent.start()
    h = Harness(agent, demo_image, registry.addr)
    try:
        yield h
    finally:
        h.close()
        agent.kill()
        asyncio.run(_remove_all(containerd, registry))
        shutil.rmtree(work, ignore_errors=True)


async def _remove_all(containerd: ContainerdProc, registry: RegistryProc) -> list[str]:
    runtime = ContainerdRuntime(containerd.socket, NAMESPACE, [registry.addr])
    try:
        left = [s.id for s in await runtime.list()]
        for cid in left:
            await runtime.delete(cid, 0)
        return left
    finally:
        await runtime.close()


def images(h: Harness) -> st.SearchStrategy[str]:
    reg = h.registry
    return st.sampled_from(["", f"{reg}/nope:latest", f"{reg}/busybox:nope", h.image]) | text.map(
        lambda t: f"{reg}/{t}"
    )


def specs(h: Harness) -> st.SearchStrategy[agent_pb2.SandboxRuntimeSpec]:
    kv = st.builds(
        agent_pb2.KeyValue,
        key=st.sampled_from(["A", "", "fastsandbox.io/ports"]) | text,
        value=text,
    )
    return st.builds(
        agent_pb2.SandboxRuntimeSpec,
        sandbox_id=ids,
        namespace=st.sampled_from(["default", ""]) | text,
        name=ids,
        image=images(h),
        command=st.sampled_from([["sleep", "30"], [], ["/nonexistent"], [""]])
        | st.lists(text, max_size=2),
        args=st.lists(text, max_size=2),
        env=st.lists(kv, max_size=3),
        working_dir=st.sampled_from(["", "/tmp", "relative", "/nonexistent/dir"]) | text,
        exposed_ports=st.lists(st.integers(-(2**31), 2**31 - 1), max_size=2),
        labels=st.lists(kv, max_size=2),
        cpu_millis=small,
        memory_bytes=st.sampled_from([0, 0, -1, 1, 4096, 64 * 2**20, 2**62]),
        pids_limit=small,
        disk_bytes=st.sampled_from([0, 0, 0, -1, 1]),
        log_max_bytes=small,
    )


def test_fuzzed_creates_are_answered_deliberately_and_leave_nothing(
    harness: Harness, containerd: ContainerdProc, registry: RegistryProc
) -> None:
    h = harness

    @SETTINGS
    @given(specs(h))
    def check(spec: agent_pb2.SandboxRuntimeSpec) -> None:
        code, _, reply = h.call("CreateSandbox", agent_pb2.CreateSandboxRequest(spec=spec))
        if code is grpc.StatusCode.OK:
            sid = reply.sandbox.sandbox_id
            done, details, _ = h.call(
                "DeleteSandbox", agent_pb2.DeleteSandboxRequest(sandbox_id=sid)
            )
            assert done is grpc.StatusCode.OK, details

    check()
    status = h.call("Status", agent_pb2.StatusRequest())[2]
    assert not [s.sandbox_id for s in status.sandboxes], "a case left a sandbox"
    left = asyncio.run(_remove_all(containerd, registry))
    assert not left, f"containers left in containerd: {left}"


def test_fuzzed_other_calls_are_answered_deliberately(harness: Harness) -> None:
    h = harness
    target = st.builds(io_pb2.SandboxTarget, namespace=text, name=ids, sandbox_id=ids)
    deletes = st.builds(
        agent_pb2.DeleteSandboxRequest,
        sandbox_id=ids,
        grace_seconds=st.floats(-5, 2, allow_nan=False),
    )
    logs = st.builds(
        agent_pb2.SandboxLogsRequest,
        sandbox_id=ids,
        follow=st.just(False),
        tail_lines=st.integers(-(2**31), 2**31 - 1),
        since_unix=st.floats(allow_nan=False, allow_infinity=False),
    )
    ops = st.sampled_from(["stat", "list", "remove", "mkdir", "move", "", "nope"]) | text
    file_ops = st.builds(
        io_pb2.FileOpRequest,
        target=target,
        op=ops,
        path=st.sampled_from(["/", "/tmp", "../..", ""]) | text,
        destination=text,
        depth=st.integers(-(2**31), 2**31 - 1),
        recursive=st.booleans(),
        user=text,
    )
    calls = st.one_of(
        deletes.map(lambda r: ("DeleteSandbox", r)),
        images(h).map(lambda i: ("PullImage", agent_pb2.PullImageRequest(image=i))),
        logs.map(lambda r: ("Logs", r)),
        st.booleans().map(lambda c: ("Cordon", agent_pb2.CordonRequest(cordon=c))),
        st.builds(io_pb2.ProcessesRequest, target=target).map(lambda r: ("ListProcesses", r)),
        file_ops.map(lambda r: ("FileOp", r)),
    )

    @SETTINGS
    @given(calls)
    def check(call: tuple[str, Any]) -> None:
        h.call(*call)

    check()
    h.call("Cordon", agent_pb2.CordonRequest(cordon=False))
