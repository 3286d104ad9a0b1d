"""Every supervisor channel of one agent, under `<state dir>/channels/<sandbox id>/`.

The hub is made with the agent and lives as long as it: `open` on create and, after an agent
restart, for every sandbox found running (its supervisor redials the new socket at the same
path); `remove` on delete, which takes the directory away too. `close` (agent shutdown) stops
listening but keeps the directories, which the running sandboxes still have mounted.
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

from fastsandbox.agent.supervisor.channel import Channel
from fastsandbox.agent.supervisor.client import SupervisorClient
from fastsandbox.agent.supervisor.handshake import load_or_create_key, sandbox_secret

KEY_FILE = "supervisor.key"
# Where the sandbox sees its channel directory and the supervisor binary.
CHANNEL_MOUNT = "/.fsb/run"


class ChannelHub:
    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.root = state_dir / "channels"
        self._key: bytes | None = None
        self._channels: dict[str, Channel] = {}

    @property
    def key(self) -> bytes:
        if self._key is None:
            self._key = load_or_create_key(self.state_dir / KEY_FILE)
        return self._key

    def directory(self, sandbox_id: str) -> Path:
        return self.root / sandbox_id

    def supervisor_env(self, sandbox_id: str) -> tuple[tuple[str, str], ...]:
        """The environment PID 1 needs to dial and prove itself (it scrubs it from children)."""
        return (
            ("FSB_CHANNEL", CHANNEL_MOUNT),
            ("FSB_SUPERVISOR_SECRET", sandbox_secret(self.key, sandbox_id).hex()),
            ("FSB_SANDBOX_ID", sandbox_id),
        )

    async def open(self, sandbox_id: str) -> Channel:
        """The sandbox's channel, listening (idempotent)."""
        channel = self._channels.get(sandbox_id)
        if channel is not None:
            return channel
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        channel = Channel(
            sandbox_id, self.directory(sandbox_id), sandbox_secret(self.key, sandbox_id)
        )
        await channel.start()
        self._channels[sandbox_id] = channel
        return channel

    def get(self, sandbox_id: str) -> Channel | None:
        return self._channels.get(sandbox_id)

    def client(self, sandbox_id: str) -> SupervisorClient | None:
        channel = self._channels.get(sandbox_id)
        return None if channel is None else SupervisorClient(channel)

    async def remove(self, sandbox_id: str) -> None:
        """Stop listening for the sandbox and remove its directory."""
        channel = self._channels.pop(sandbox_id, None)
        if channel is not None:
            await channel.close()
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(self.directory(sandbox_id))

    async def close(self) -> None:
        channels, self._channels = list(self._channels.values()), {}
        for channel in channels:
            await channel.close()
