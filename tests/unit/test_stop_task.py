"""`stop_task` (the containerd runtime's delete): a kill that the runtime refuses is not the
end of the delete when the task exits anyway (runsc refuses to signal a sandbox already on its
way out), and is named in the error when it does not."""

from __future__ import annotations

import signal

import pytest

from fastsandbox.agent.runtime.containerd_removal import stop_task
from fastsandbox.api._proto.fastsandbox.v1 import containerd_subset_pb2 as pb
from fastsandbox.errors import RuntimeFailure


class Tasks:
    """The three task calls stop_task makes, with a kill that fails and a task that exits
    (or not) on its own."""

    def __init__(self, *, exits: bool) -> None:
        self.exits = exits
        self.kills: list[int] = []

    async def get_task(self, container_id: str) -> pb.CtdProcess:
        return pb.CtdProcess(id=container_id, status=pb.CTD_TASK_STATUS_RUNNING)

    async def kill(self, container_id: str, sig: int, *, all_processes: bool = False) -> None:
        self.kills.append(sig)
        raise RuntimeFailure(
            f"kill task {container_id} with signal {sig}: connecting to control server at PID "
            "1234: connection refused"
        )

    async def wait(self, container_id: str, timeout: float) -> int | None:
        return 0 if self.exits else None


async def test_a_refused_kill_of_a_task_that_exits_is_a_stop() -> None:
    tasks = Tasks(exits=True)
    assert await stop_task(tasks, "sb-1", grace_seconds=0)  # type: ignore[arg-type]
    assert tasks.kills == [signal.SIGKILL]


async def test_a_refused_kill_of_a_task_that_stays_is_named_in_the_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("fastsandbox.agent.runtime.containerd_removal.KILL_WAIT_SECONDS", 0.01)
    tasks = Tasks(exits=False)
    with pytest.raises(RuntimeFailure, match=r"did not exit .* \(the kill failed: .*refused\)"):
        await stop_task(tasks, "sb-1", grace_seconds=1)  # type: ignore[arg-type]
    assert tasks.kills == [signal.SIGTERM, signal.SIGKILL]
