"""Property-based fuzzing of fsb-supervisor's channel (native/supervisor/PROTOCOL.md): requests
with random fields of random types, and raw frames of random shapes, sent to the real binary.

Properties: every well-framed request gets exactly one reply with its id — `ok` true, or an
errno-named error with a human message — within a bound; the supervisor never crashes, never
drops the control connection for a well-framed request, and after garbage that the protocol says
closes the connection it redials and serves again.

Safety: the fuzzed binary runs on this host, not in a container, so it runs as `nobody` (when the
tests run as root), and operations that change the filesystem only ever get paths inside this
test's own playground directory or paths that cannot resolve (relative, empty, with NUL);
arbitrary paths go only to read-only operations.

Size: FSB_FUZZ_EXAMPLES (default 500 per target, as CI runs it); `make fuzz` runs 10 000.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.unit.supervisor_agent import BOUND, EOF, FakeAgent

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = int(os.environ.get("FSB_FUZZ_EXAMPLES", "500"))
NOBODY = 65534
ERRNO_NAME = re.compile(r"E[A-Z0-9]+")

SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,  # a shared 2-core machine: no per-example time limit, only BOUND per reply
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=os.environ.get("FSB_FUZZ_RANDOM") is None,  # CI: the same cases every run
)

json_scalar = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40)
)
json_value = st.recursive(
    json_scalar,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)  # fmt: skip
segment = st.text(
    alphabet=st.characters(blacklist_characters="/\x00", blacklist_categories=("Cs",)),
    min_size=1,
    max_size=12,
).filter(lambda s: s not in (".", ".."))
unresolvable = st.sampled_from(["", "relative", "a/b", "x\x00y", "/\x00"]) | segment


@pytest.fixture(scope="module")
def supervisor_bin() -> Path:
    result = subprocess.run(
        [str(REPO / "scripts" / "build-native")], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    return REPO / "native" / "bin" / "fsb-supervisor"


class Harness:
    """One fake agent and one supervisor (as nobody) on their own event loop, shared by all
    examples of a test."""

    def __init__(self, binary: Path) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="fsb-fuzz-", dir="/tmp"))
        self.root.chmod(0o755)
        self.channel = self.root / "run"
        self.channel.mkdir(mode=0o755)
        self.play = self.root / "play"
        self.play.mkdir()
        self.play.chmod(0o777)
        self.loop = asyncio.new_event_loop()
        self.secret = secrets.token_bytes(32)
        self.agent = self.loop.run_until_complete(self._start_agent())
        self.log = self.root / "supervisor.log"
        as_nobody = (
            {"user": NOBODY, "group": NOBODY, "extra_groups": []} if os.geteuid() == 0 else {}
        )
        with self.log.open("ab") as err:
            self.proc = subprocess.Popen(
                [str(binary)],
                env={"PATH": "/usr/bin:/bin", "FSB_CHANNEL": str(self.channel),
                     "FSB_SUPERVISOR_SECRET": self.secret.hex(), "FSB_SANDBOX_ID": "fuzz"},
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                **as_nobody,  # type: ignore[arg-type]
            )  # fmt: skip

    async def _start_agent(self) -> FakeAgent:
        agent = await FakeAgent(self.channel, self.secret).start()
        agent.sock.chmod(0o777)  # nobody must be able to connect
        return agent

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def alive(self) -> None:
        code = self.proc.poll()
        assert code is None, f"supervisor died ({code}): {self.log.read_text()[-2000:]}"

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=BOUND)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.run(self.agent.stop())
        self.loop.close()
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture
def harness(supervisor_bin: Path) -> Iterator[Harness]:
    h = Harness(supervisor_bin)
    try:
        yield h
    finally:
        h.close()


def check_reply(reply: dict[str, Any], op: str) -> None:
    assert isinstance(reply.get("ok"), bool), reply
    if not reply["ok"]:
        error = reply["error"]
        assert ERRNO_NAME.fullmatch(error["code"]), (op, reply)
        assert isinstance(error["message"], str) and error["message"].strip(), (op, reply)


def fields(values: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    names = st.sampled_from(["path", "depth", "offset", "recursive", "mode", "mtime", "user",
                             "src", "dst", "parents", "pid", "signal", "argv", "env", "cwd",
                             "pty", "stdin", "timeout_ms", "tag", "stream"])  # fmt: skip
    return st.dictionaries(names, values, max_size=6)


def _safe_path(h: Harness) -> st.SearchStrategy[str]:
    inside = st.lists(segment, max_size=3).map(lambda parts: str(h.play.joinpath(*parts)))
    return inside | unresolvable


READ_ONLY = ["stat", "list", "ps", "attach", "signal", "read", "watch"]
WRITING = ["mkdir", "move", "remove", "setattr", "write"]


def test_random_requests_get_one_well_formed_reply(harness: Harness) -> None:
    h = harness
    any_path = st.text(max_size=200) | st.sampled_from(["/", "/proc", "/etc/passwd", "/dev"])
    read_only = st.tuples(st.sampled_from(READ_ONLY), fields(json_value), any_path, json_value)
    writing = st.tuples(st.sampled_from(WRITING), fields(json_scalar), _safe_path(h), _safe_path(h))
    unknown = st.tuples(st.text(max_size=12), fields(json_value), any_path, json_value)

    @SETTINGS
    @given(st.one_of(read_only, writing, unknown))
    def check(case: tuple[str, dict[str, Any], str, Any]) -> None:
        op, extra, path, other = case
        req = {**extra, "path": path}
        if op in WRITING:
            req["dst"] = other if isinstance(other, str) else path
            req["src"] = path
            req.pop("stream", None)
        if op == "list" and isinstance(req.get("depth"), int):
            req["depth"] = max(-1, min(req["depth"], 2))  # bounded work, not a bounded reply
        if op in ("read", "watch", "write"):
            # A real stream token half the time: the supervisor then dials a data connection.
            reply, conn = h.run(
                h.agent.stream(op, **{k: v for k, v in req.items() if k != "stream"})
            )
            if conn is not None:
                if op == "write":
                    conn.send(EOF)
                conn.close()
        else:
            reply = h.run(h.agent.request(op, **req))
        check_reply(reply, op)
        h.alive()

    check()
    assert h.agent.lost == 0, "a well-framed request made the supervisor drop the channel"


def test_random_execs_get_one_well_formed_reply(harness: Harness) -> None:
    h = harness
    argv0 = st.sampled_from(["true", "echo", "/nonexistent-fsb/x", "", "./x"]) | segment
    argv = st.lists(st.text(max_size=30), max_size=4).flatmap(
        lambda rest: argv0.map(lambda a: [a, *rest])
    ) | json_value  # fmt: skip
    execs = st.fixed_dictionaries(
        {"argv": argv},
        optional={
            "env": st.lists(st.text(max_size=30), max_size=4) | json_value,
            "cwd": _safe_path(h) | st.just("/") | json_value,
            "user": st.text(max_size=12) | st.integers(-5, 2**40) | json_value,
            "pty": st.none()
            | st.fixed_dictionaries({"cols": json_scalar, "rows": json_scalar})
            | json_value,
            "stdin": json_scalar,
            "timeout_ms": st.integers(-(2**63), 2**64) | json_scalar,
            "tag": json_value,
        },
    )

    @SETTINGS
    @given(execs)
    def check(req: dict[str, Any]) -> None:
        reply, conn = h.run(h.agent.stream("exec", **req))
        check_reply(reply, "exec")
        if conn is not None:
            conn.send(EOF)
            with contextlib.suppress(AssertionError, asyncio.IncompleteReadError, ConnectionError):
                h.run(conn.collect())  # true/echo end at once; a bound, never a speed claim
            conn.close()
        h.alive()

    check()
    assert h.agent.lost == 0


def test_random_frames_never_crash_it_and_it_redials(harness: Harness) -> None:
    h = harness
    frames = st.lists(
        st.tuples(st.integers(0, 255), st.binary(max_size=64)), min_size=1, max_size=4
    ) | st.binary(min_size=1, max_size=64).map(lambda raw: [(-1, raw)])  # fmt: skip

    @settings(SETTINGS, max_examples=max(1, EXAMPLES // 5))
    @given(frames)
    def check(batch: list[tuple[int, bytes]]) -> None:
        conn = h.run(h.agent.wait_control())
        lost = h.agent.lost
        for kind, payload in batch:
            if kind < 0:
                conn.writer.write(payload)  # not even a frame header
            else:
                conn.send(kind, payload)
        with contextlib.suppress(ConnectionError):
            h.run(conn.drain())
        if any(kind < 0 for kind, _ in batch):
            # Raw bytes desynchronise a length-prefixed stream for good (the supervisor may be
            # waiting for the rest of a "frame"): an agent would drop such a connection.
            conn.close()
        h.alive()
        # Whatever it did with the garbage (closed the channel, or answered), it serves after.
        assert h.run(_serves_again(h, conn, lost)) is True
        h.alive()

    check()


async def _serves_again(h: Harness, old: Any, lost: int) -> bool:
    """True once a `ps` is answered. Garbage the protocol refuses makes the supervisor close the
    control connection; then wait (bounded) for its redial before asking."""
    loop = asyncio.get_running_loop()
    grace = loop.time() + 0.5
    while h.agent.lost == lost and not old.writer.is_closing() and loop.time() < grace:
        await asyncio.sleep(0.01)
    if h.agent.lost > lost or old.writer.is_closing():
        deadline = loop.time() + BOUND
        while h.agent.control.done() and h.agent.control.result() is old:
            assert loop.time() < deadline, "the supervisor did not redial"
            await asyncio.sleep(0.01)
    reply = await h.agent.request("ps")
    return bool(reply["ok"])
