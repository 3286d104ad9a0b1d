"""The janitor's DaemonSet mode: what the cluster knows (agent Pods on the node, Sandbox records)
decides, with the same rules as the embedded janitor. Fakes at the boundary: a pod lister and
the in-memory store and runtime."""

from __future__ import annotations

from pathlib import Path

import pytest

from fastsandbox.agent.runtime.base import ContainerSpec
from fastsandbox.agent.runtime.fake import FakeRuntime
from fastsandbox.api.models import ObjectMeta, Sandbox, SandboxSpec
from fastsandbox.errors import Unavailable
from fastsandbox.janitor.janitor import Janitor, SnapshotSeen
from fastsandbox.janitor.kubernetes import AgentPod, KubernetesKnownState, OurSnapshots
from fastsandbox.janitor.scanner import AGENT_LABEL, Reason
from fastsandbox.store.memory import MemoryStore

IMAGE = "127.0.0.1:5000/busybox:latest"
NODE = "node-a"
TIMEOUT = 30.0


class FakePods:
    """Agent Pods by node, as the apiserver's field selector would return them."""

    def __init__(self, pods: dict[str, list[AgentPod]] | None = None) -> None:
        self.pods = pods or {}
        self.failing = False
        self.asked: list[str] = []

    async def on_node(self, node: str) -> list[AgentPod]:
        self.asked.append(node)
        if self.failing:
            raise Unavailable("cannot reach the Kubernetes API")
        return list(self.pods.get(node, []))


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def record(store: MemoryStore, name: str, container_id: str, ns: str = "default") -> None:
    sb = Sandbox(
        metadata=ObjectMeta(name=name, namespace=ns),
        spec=SandboxSpec(image=IMAGE, pool_ref="p"),
    )
    sb.status.container_id = container_id
    await store.create(sb)


async def container(rt: FakeRuntime, tmp_path: Path, cid: str, agent: str | None) -> None:
    await rt.pull(IMAGE)
    labels = {AGENT_LABEL: agent} if agent else {}
    await rt.create(
        ContainerSpec(id=cid, image=IMAGE, log_path=str(tmp_path / f"{cid}.log"), labels=labels)
    )


async def test_live_agents_are_the_unfinished_agent_pods_of_this_node() -> None:
    pods = FakePods(
        {
            NODE: [
                AgentPod("default", "p-aaaaa", "Running"),
                AgentPod("team", "p-bbbbb", "Pending"),
                AgentPod("default", "p-ccccc", ""),
                AgentPod("default", "p-ddddd", "Unknown"),
                AgentPod("default", "p-done1", "Succeeded"),
                AgentPod("default", "p-fail1", "Failed"),
            ],
            "node-b": [AgentPod("default", "p-other", "Running")],
        }
    )
    state = KubernetesKnownState(MemoryStore(), pods, NODE)
    assert await state.live_agents() == {"p-aaaaa", "p-bbbbb", "p-ccccc", "p-ddddd"}
    assert pods.asked == [NODE]


async def test_recorded_containers_come_from_sandboxes_in_every_namespace() -> None:
    store = MemoryStore()
    await record(store, "a", "a-00000001")
    await record(store, "b", "b-00000002", ns="team")
    await record(store, "pending", "")
    state = KubernetesKnownState(store, FakePods(), NODE)
    assert await state.recorded_container_ids() == {"a-00000001", "b-00000002"}


def test_a_node_is_required() -> None:
    with pytest.raises(ValueError, match="node"):
        KubernetesKnownState(MemoryStore(), FakePods(), "")


async def test_the_janitor_removes_what_records_and_agent_pods_no_longer_own(
    tmp_path: Path,
) -> None:
    store, rt, clock = MemoryStore(), FakeRuntime(), Clock()
    pods = FakePods(
        {
            NODE: [
                AgentPod("default", "live-aaaaa", "Running"),
                AgentPod("default", "gone-bbbbb", "Running"),
            ]
        }
    )
    await record(store, "kept", "kept-00000001")
    await record(store, "dead", "dead-00000002")
    await container(rt, tmp_path, "kept-00000001", "live-aaaaa")  # recorded, agent live
    await container(rt, tmp_path, "stray-00000003", "live-aaaaa")  # agent live, no record
    await container(rt, tmp_path, "dead-00000002", "gone-bbbbb")  # recorded, agent will go
    await container(rt, tmp_path, "kubelet-0000", None)  # not ours: the kubelet's
    await container(rt, tmp_path, "other-00000004", "elsewhere")  # an agent we never saw
    state = KubernetesKnownState(store, pods, NODE)
    janitor = Janitor(rt, state, orphan_timeout=TIMEOUT, interval=1, clock=clock)

    first = await janitor.scan()
    assert first.waiting == {"stray-00000003": Reason.NO_RECORD} and not first.removed

    # The agent's Pod finishes (its node-local agent is gone): its containers are orphans now.
    pods.pods[NODE] = [
        AgentPod("default", "live-aaaaa", "Running"),
        AgentPod("default", "gone-bbbbb", "Failed"),
    ]
    clock.now += TIMEOUT
    second = await janitor.scan()
    assert second.removed == {"stray-00000003": Reason.NO_RECORD}
    assert second.waiting == {"dead-00000002": Reason.AGENT_GONE}

    clock.now += TIMEOUT
    third = await janitor.scan()
    assert third.removed == {"dead-00000002": Reason.AGENT_GONE}
    left = sorted(s.id for s in await rt.list())
    assert left == ["kept-00000001", "kubelet-0000", "other-00000004"]


async def test_an_unreadable_api_removes_nothing(tmp_path: Path) -> None:
    rt = FakeRuntime()
    pods = FakePods({NODE: [AgentPod("default", "a-aaaaa", "Running")]})
    await container(rt, tmp_path, "stray-00000001", "a-aaaaa")
    janitor = Janitor(
        rt, KubernetesKnownState(MemoryStore(), pods, NODE), orphan_timeout=0, interval=1
    )
    pods.failing = True
    with pytest.raises(Unavailable):
        await janitor.scan()
    assert [s.id for s in await rt.list()] == ["stray-00000001"]


class Snapshots:
    def __init__(self, keys: list[str]) -> None:
        self.keys = keys
        self.removed: list[str] = []

    async def log_paths(self) -> dict[str, str]:
        return {"c": "/x/c.log"}

    async def container_ids(self) -> set[str]:
        return {"c"}

    async def snapshots(self) -> list[SnapshotSeen]:
        return [SnapshotSeen(key=k, active=True, created_at=0.0) for k in self.keys]

    async def remove_snapshot(self, key: str) -> None:
        self.removed.append(key)


async def test_only_snapshots_keyed_like_our_sandboxes_are_swept() -> None:
    cri = "0" * 63 + "f"
    inner = Snapshots([cri, "demo-1a2b3c4d", "extract-123 sha256:abc", "Demo-1a2b3c4d"])
    ours = OurSnapshots(inner)
    assert [s.key for s in await ours.snapshots()] == ["demo-1a2b3c4d"]
    assert await ours.container_ids() == {"c"}
    assert await ours.log_paths() == {"c": "/x/c.log"}
    await ours.remove_snapshot("demo-1a2b3c4d")
    with pytest.raises(ValueError, match="not one of ours"):
        await ours.remove_snapshot(cri)
    assert inner.removed == ["demo-1a2b3c4d"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--interval", "0"], "--interval: must be > 0 seconds"),
        (["--orphan-timeout", "-1"], "--orphan-timeout: must be >= 0 seconds"),
        (["--log-level", "loud"], "--log-level: must be debug, info, warning or error"),
    ],
)
def test_fsb_janitor_checks_its_flags_before_connecting(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from fastsandbox.cli.main import main
    from fastsandbox.errors import InvalidArgument

    assert main(["janitor", "--node", NODE, *args]) == InvalidArgument("").exit_code
    assert message in capsys.readouterr().err
