"""The agent's side of the supervisor channel (native/supervisor/PROTOCOL.md).

- `frames`: the length-prefixed frames every connection carries.
- `handshake`: the agent key, per-sandbox secrets and the mutual proofs.
- `channel`: one unix listener per sandbox; its control connection and data connections.
- `client`: the typed API (exec, attach, ps, signal, file operations, read, write, watch).
- `hub`: every channel of this agent, made on create and re-made after an agent restart.
- `errors`: the one seam where supervisor errors become `fastsandbox.errors` classes.
"""

from fastsandbox.agent.supervisor.channel import Channel
from fastsandbox.agent.supervisor.client import (
    Entry,
    ExitStatus,
    FileReader,
    Output,
    Process,
    ProcessInfo,
    SupervisorClient,
    WatchEvent,
)
from fastsandbox.agent.supervisor.hub import ChannelHub

__all__ = [
    "Channel",
    "ChannelHub",
    "Entry",
    "ExitStatus",
    "FileReader",
    "Output",
    "Process",
    "ProcessInfo",
    "SupervisorClient",
    "WatchEvent",
]
