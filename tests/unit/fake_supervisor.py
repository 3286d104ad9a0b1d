"""A small supervisor written in Python that speaks native/supervisor/PROTOCOL.md, for unit
tests of the agent's channel and I/O RPCs. It dials the agent like the real one (and redials
after a loss), runs processes on the host as the test user (no PTY), and serves file operations
under `root`, which stands in for the sandbox's filesystem."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import hmac
import os
import secrets
import shutil
import signal
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastsandbox.agent.supervisor.frames import FrameType, encode, encode_json, read_frame

RING = 1024 * 1024


class OpError(Exception):
    def __init__(self, code: str, message: str, path: str = "") -> None:
        super().__init__(message)
        self.code, self.message, self.path = code, message, path

    @classmethod
    def of(cls, exc: OSError, verb: str, path: str) -> OpError:
        name = errno.errorcode.get(exc.errno or 0, "EIO")
        return cls(name, f"{verb} {path}: {os.strerror(exc.errno or errno.EIO)}", path)


@dataclass
class Proc:
    pid: int
    argv: list[str]
    tag: str
    proc: asyncio.subprocess.Process
    started_at: float = field(default_factory=time.time)
    ring: bytearray = field(default_factory=bytearray)
    ring_frames: list[bytes] = field(default_factory=list)
    conn: asyncio.StreamWriter | None = None
    exit: dict[str, Any] | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)


class FakeSupervisor:
    def __init__(self, channel_dir: Path, sandbox_id: str, secret_hex: str, root: Path) -> None:
        self.channel_dir = channel_dir
        self.sandbox_id = sandbox_id
        self.secret = bytes.fromhex(secret_hex)
        self.root = root
        self.procs: dict[int, Proc] = {}
        self.controls = 0  # control connections made (redials included)
        self.refused = 0  # handshakes the agent refused
        self.watchers: list[tuple[str, asyncio.StreamWriter]] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._main: asyncio.Task[None] | None = None

    # -- lifecycle --------------------------------------------------------------------------
    def start(self) -> None:
        self._main = asyncio.create_task(self._dial_forever())

    async def stop(self) -> None:
        tasks = [t for t in (self._main, *self._tasks) if t is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for p in self.procs.values():
            if p.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                await p.proc.wait()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _connect(self, role: str, stream: str = "") -> tuple[Any, Any] | None:
        dirfd = os.open(self.channel_dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            reader, writer = await asyncio.open_unix_connection(
                f"/proc/self/fd/{dirfd}/agent.sock", limit=2 * RING
            )
        finally:
            os.close(dirfd)
        first = await read_frame(reader)
        assert first is not None
        agent_nonce = first.json()["nonce"]
        nonce = secrets.token_hex(32)
        hello = {
            "v": 1,
            "role": role,
            "sandbox": self.sandbox_id,
            "nonce": nonce,
            "proof": self._proof("sup", agent_nonce),
            "version": "fake-1",
            "pid": 1,
        }
        if stream:
            hello["stream"] = stream
        writer.write(encode_json(hello))
        await writer.drain()
        answer = await read_frame(reader)
        if answer is None or not answer.json().get("ok"):
            self.refused += 1
            writer.close()
            return None
        if not hmac.compare_digest(answer.json()["proof"], self._proof("agent", nonce)):
            writer.close()
            raise AssertionError("agent sent a wrong proof")
        return reader, writer

    def _proof(self, side: str, nonce: str) -> str:
        return hmac.new(self.secret, f"{side}:{nonce}".encode(), hashlib.sha256).hexdigest()

    async def _dial_forever(self) -> None:
        delay = 0.05
        while True:
            try:
                conn = await self._connect("control")
            except OSError:
                conn = None
            if conn is not None:
                delay = 0.05
                self.controls += 1
                await self._serve_control(*conn)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)

    async def _serve_control(self, reader: Any, writer: Any) -> None:
        lock = asyncio.Lock()
        try:
            while (frame := await read_frame(reader)) is not None:
                self._spawn(self._answer(frame.json(), writer, lock))
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def _answer(self, req: dict[str, Any], writer: Any, lock: asyncio.Lock) -> None:
        op = req.get("op", "")
        after = None
        try:
            handler = getattr(self, f"op_{op}", None)
            if handler is None:
                raise OpError("EINVAL", f"unknown op {op!r}")
            result = await handler(req)
            if isinstance(result, tuple):
                result, after = result
            reply = {"id": req["id"], "ok": True, **result}
        except OpError as e:
            error = {"code": e.code, "message": e.message}
            if e.path:
                error["path"] = e.path
            reply = {"id": req["id"], "ok": False, "error": error}
        async with lock:
            writer.write(encode_json(reply))
            with contextlib.suppress(ConnectionError):
                await writer.drain()
        if after is not None:
            conn = await self._connect("data", req["stream"])
            if conn is not None:
                await after(*conn)

    # -- paths --------------------------------------------------------------------------------
    def host(self, path: Any) -> Path:
        if not isinstance(path, str) or not path.startswith("/"):
            raise OpError("EINVAL", f"path {path!r} is not absolute", str(path))
        return self.root / path.lstrip("/")

    def entry(self, path: str) -> dict[str, Any]:
        h = self.host(path)
        try:
            st = h.lstat()
        except OSError as e:
            raise OpError.of(e, "stat", path) from None
        kind = (
            "symlink"
            if stat.S_ISLNK(st.st_mode)
            else "dir"
            if stat.S_ISDIR(st.st_mode)
            else "file"
            if stat.S_ISREG(st.st_mode)
            else "other"
        )
        e = {
            "name": os.path.basename(path.rstrip("/")) or "/",
            "path": path,
            "type": kind,
            "size": st.st_size,
            "mode": stat.S_IMODE(st.st_mode),
            "uid": st.st_uid,
            "gid": st.st_gid,
            "mtime": st.st_mtime,
        }
        if kind == "symlink":
            e["target"] = os.readlink(h)
        return e

    def notify(self, event: str, path: str, kind: str) -> None:
        for prefix, w in list(self.watchers):
            if path.startswith(prefix):
                w.write(encode_json({"event": event, "path": path, "type": kind}))

    # -- files --------------------------------------------------------------------------------
    async def op_stat(self, req: dict[str, Any]) -> dict[str, Any]:
        return {"entry": self.entry(req["path"])}

    async def op_list(self, req: dict[str, Any]) -> dict[str, Any]:
        path, depth = req["path"].rstrip("/") or "/", int(req.get("depth", 1))
        h = self.host(path)
        if not h.exists():
            raise OpError("ENOENT", f"list {path}: No such file or directory", path)
        if not h.is_dir():
            raise OpError("ENOTDIR", f"list {path}: Not a directory", path)
        out = []
        for dirpath, dirs, files in os.walk(h):
            rel = Path(dirpath).relative_to(h)
            level = 0 if str(rel) == "." else len(rel.parts)
            if level >= depth:
                dirs[:] = []
                continue
            for n in dirs + files:
                out.append(self.entry(f"{path.rstrip('/')}/{rel / n if level else n}"))
        return {"entries": sorted(out, key=lambda e: e["path"])}

    async def op_mkdir(self, req: dict[str, Any]) -> dict[str, Any]:
        h = self.host(req["path"])
        if h.is_dir():
            return {"created": False}
        try:
            h.mkdir(mode=req.get("mode", 0o755), parents=req.get("parents", True))
        except OSError as e:
            raise OpError.of(e, "mkdir", req["path"]) from None
        self.notify("create", req["path"], "dir")
        return {"created": True}

    async def op_move(self, req: dict[str, Any]) -> dict[str, Any]:
        try:
            os.rename(self.host(req["src"]), self.host(req["dst"]))
        except OSError as e:
            raise OpError.of(e, "rename", req["src"]) from None
        return {"entry": self.entry(req["dst"])}

    async def op_remove(self, req: dict[str, Any]) -> dict[str, Any]:
        h = self.host(req["path"])
        try:
            if h.is_dir() and not h.is_symlink():
                shutil.rmtree(h) if req.get("recursive", True) else h.rmdir()
            else:
                h.unlink()
        except OSError as e:
            raise OpError.of(e, "remove", req["path"]) from None
        self.notify("remove", req["path"], "file")
        return {}

    async def op_setattr(self, req: dict[str, Any]) -> dict[str, Any]:
        h = self.host(req["path"])
        try:
            if "mode" in req:
                os.chmod(h, req["mode"])
            if "mtime" in req:
                os.utime(h, (req["mtime"], req["mtime"]))
        except OSError as e:
            raise OpError.of(e, "chmod", req["path"]) from None
        return {"entry": self.entry(req["path"])}

    async def op_read(self, req: dict[str, Any]) -> Any:
        path = req["path"]
        entry = self.entry(path)
        if entry["type"] == "dir":
            raise OpError("EISDIR", f"read {path}: Is a directory", path)
        try:
            f = self.host(path).open("rb")
        except OSError as e:
            raise OpError.of(e, "open", path) from None
        f.seek(int(req.get("offset", 0)))

        async def send(reader: Any, writer: Any) -> None:
            with f:
                while chunk := f.read(64 * 1024):
                    writer.write(encode(FrameType.DATA, chunk))
                    await writer.drain()
                writer.write(encode(FrameType.EOF))
                await writer.drain()
            writer.close()

        return {"entry": entry}, send

    async def op_write(self, req: dict[str, Any]) -> Any:
        path = req["path"]
        h = self.host(path)
        if h.is_dir():
            raise OpError("EISDIR", f"open {path}: Is a directory", path)
        if req.get("parents", True):
            h.parent.mkdir(parents=True, exist_ok=True)
        elif not h.parent.is_dir():
            raise OpError("ENOENT", f"open {path}: No such file or directory", path)

        async def receive(reader: Any, writer: Any) -> None:
            tmp = h.with_name(f".{h.name}.fsb-tmp")
            complete = False
            with tmp.open("wb") as f:
                while (frame := await read_frame(reader)) is not None:
                    if frame.type is FrameType.EOF:
                        complete = True
                        break
                    f.write(frame.payload)
            if not complete:
                tmp.unlink()
                writer.close()
                return
            os.chmod(tmp, req.get("mode", stat.S_IMODE(h.stat().st_mode) if h.exists() else 0o644))
            if "mtime" in req:
                os.utime(tmp, (req["mtime"], req["mtime"]))
            os.replace(tmp, h)
            self.notify("write", path, "file")
            writer.write(encode_json({"ok": True, "entry": self.entry(path)}))
            await writer.drain()
            writer.close()

        return {}, receive

    async def op_watch(self, req: dict[str, Any]) -> Any:
        self.entry(req["path"])

        async def hold(reader: Any, writer: Any) -> None:
            item = (req["path"], writer)
            self.watchers.append(item)
            try:
                await reader.read()  # until the agent closes it
            finally:
                self.watchers.remove(item)
                writer.close()

        return {}, hold

    # -- processes ----------------------------------------------------------------------------
    async def op_exec(self, req: dict[str, Any]) -> Any:
        env = dict(e.split("=", 1) for e in req.get("env") or ())
        env.setdefault("PATH", os.environ.get("PATH", "/usr/bin:/bin"))
        cwd = self.host(req.get("cwd") or "/")
        if not cwd.is_dir():
            raise OpError("ENOENT", f"chdir {req.get('cwd')}: No such file or directory")
        try:
            proc = await asyncio.create_subprocess_exec(
                *req["argv"],
                env=env,
                cwd=cwd,
                start_new_session=True,
                stdin=asyncio.subprocess.PIPE if req.get("stdin") else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
        except OSError as e:
            raise OpError.of(e, "exec", req["argv"][0]) from None
        p = Proc(proc.pid, list(req["argv"]), req.get("tag", ""), proc)
        self.procs[p.pid] = p
        self._spawn(self._pump(p))
        return {"pid": p.pid}, lambda r, w: self._attach(p, r, w)

    async def op_attach(self, req: dict[str, Any]) -> Any:
        p = self.procs.get(int(req["pid"]))
        if p is None:
            raise OpError("ESRCH", f"attach {req['pid']}: No such process")
        return {}, lambda r, w: self._attach(p, r, w)

    async def op_signal(self, req: dict[str, Any]) -> dict[str, Any]:
        p = self.procs.get(int(req["pid"]))
        if p is None or p.exit is not None:
            raise OpError("ESRCH", f"kill {req['pid']}: No such process")
        os.killpg(p.pid, int(req["signal"]))
        return {}

    async def op_ps(self, req: dict[str, Any]) -> dict[str, Any]:
        return {
            "processes": [
                {
                    "pid": p.pid,
                    "argv": p.argv,
                    "tag": p.tag,
                    "pty": False,
                    "started_at": p.started_at,
                    "attached": p.conn is not None,
                    "running": p.exit is None,
                    "exit_code": None if p.exit is None else p.exit["code"],
                    "main": False,
                }
                for p in self.procs.values()
            ]
        }

    def _emit(self, p: Proc, frame: bytes) -> None:
        if p.conn is not None and not p.conn.is_closing():
            p.conn.write(frame)
        else:
            p.ring_frames.append(frame)

    async def _pump(self, p: Proc) -> None:
        async def copy(src: asyncio.StreamReader, kind: FrameType) -> None:
            while chunk := await src.read(64 * 1024):
                self._emit(p, encode(kind, chunk))
                if p.conn is not None:
                    with contextlib.suppress(ConnectionError):
                        await p.conn.drain()

        assert p.proc.stdout is not None and p.proc.stderr is not None
        await asyncio.gather(
            copy(p.proc.stdout, FrameType.STDOUT), copy(p.proc.stderr, FrameType.STDERR)
        )
        rc = await p.proc.wait()
        sig = -rc if rc < 0 else None
        p.exit = {"code": 128 + sig if sig else rc, "signal": sig, "timed_out": False}
        self._emit(p, encode_json({"exit": p.exit}))
        p.done.set()
        if p.conn is not None:
            p.conn.close()

    async def _attach(self, p: Proc, reader: Any, writer: Any) -> None:
        if p.conn is not None:
            p.conn.close()
        for frame in p.ring_frames:
            writer.write(frame)
        p.ring_frames.clear()
        p.conn = writer
        if p.exit is not None:
            writer.close()
            return
        try:
            while (frame := await read_frame(reader)) is not None:
                stdin = p.proc.stdin
                if frame.type is FrameType.DATA and stdin is not None:
                    stdin.write(frame.payload)
                    await stdin.drain()
                elif frame.type is FrameType.EOF and stdin is not None:
                    stdin.close()
                elif frame.type is FrameType.JSON:
                    msg = frame.json()
                    if "signal" in msg and p.exit is None:
                        os.killpg(p.pid, int(msg["signal"]))
        except (ConnectionError, OSError):
            pass
        finally:
            if p.conn is writer:
                p.conn = None
            writer.close()
