# ruff: noqa: F811  (pytest fixtures imported from supervisor_fixtures are parameters here)
"""fsb-supervisor's file operations, black box (see test_supervisor_channel.py): stat, list,
mkdir, move, remove, setattr, read and write streams, watch; errors name the path.

Timeouts only bound a failing test; nothing asserts how fast anything is.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
from pathlib import Path
from typing import Any

import pytest

from tests.unit.supervisor_agent import BOUND, DATA, EOF, Conn
from tests.unit.supervisor_fixtures import (
    Sandbox,
    err,
    sandbox,  # noqa: F401 (a fixture)
    supervisor_bin,  # noqa: F401 (a fixture `sandbox` needs)
    wait_until,
)

# -- files ------------------------------------------------------------------------------------


async def test_stat_reports_files_dirs_and_symlinks(sandbox: Sandbox, tmp_path: Path) -> None:
    f = tmp_path / "f.txt"
    f.write_bytes(b"12345")
    f.chmod(0o640)
    (tmp_path / "link").symlink_to("f.txt")
    e = (await sandbox.agent.request("stat", path=str(f)))["entry"]
    assert (e["name"], e["path"], e["type"], e["size"], e["mode"]) == (
        "f.txt",
        str(f),
        "file",
        5,
        0o640,
    )
    assert (e["uid"], e["gid"]) == (os.getuid(), os.getgid())
    assert abs(e["mtime"] - f.stat().st_mtime) < 1e-3
    link = (await sandbox.agent.request("stat", path=str(tmp_path / "link")))["entry"]
    assert (link["type"], link["target"]) == ("symlink", "f.txt")
    assert (await sandbox.agent.request("stat", path=str(tmp_path)))["entry"]["type"] == "dir"
    missing = err(await sandbox.agent.request("stat", path=str(tmp_path / "nope")))
    assert missing == {
        "code": "ENOENT",
        "message": f"stat {tmp_path / 'nope'}: No such file or directory",
        "path": str(tmp_path / "nope"),
    }
    assert err(await sandbox.agent.request("stat", path="relative"))["code"] == "EINVAL"
    assert err(await sandbox.agent.request("stat"))["code"] == "EINVAL"


async def test_list_with_depth_sorted_and_capped(sandbox: Sandbox, tmp_path: Path) -> None:
    d = tmp_path / "tree"
    (d / "b" / "c").mkdir(parents=True)
    (d / "a.txt").write_text("a")
    (d / "b" / "x").write_text("x")
    one = (await sandbox.agent.request("list", path=str(d)))["entries"]
    assert [e["path"] for e in one] == [str(d / "a.txt"), str(d / "b")]
    two = (await sandbox.agent.request("list", path=str(d), depth=2))["entries"]
    assert [e["path"] for e in two] == [str(d / p) for p in ("a.txt", "b", "b/c", "b/x")]
    assert err(await sandbox.agent.request("list", path=str(d / "a.txt")))["code"] == "ENOTDIR"
    assert err(await sandbox.agent.request("list", path=str(d), depth=0))["code"] == "EINVAL"
    big = tmp_path / "big"
    big.mkdir()
    for i in range(10_001):
        (big / str(i)).touch()
    capped = err(await sandbox.agent.request("list", path=str(big)))
    assert capped["code"] == "E2BIG" and str(big) in capped["message"]


async def test_mkdir_parents_mode_and_errors(sandbox: Sandbox, tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "c"
    reply = await sandbox.agent.request("mkdir", path=str(target), mode=0o700)
    assert reply == {"id": reply["id"], "ok": True, "created": True}
    assert target.stat().st_mode & 0o7777 == 0o700
    assert (await sandbox.agent.request("mkdir", path=str(target)))["created"] is False
    (tmp_path / "file").touch()
    assert (
        err(await sandbox.agent.request("mkdir", path=str(tmp_path / "file")))["code"] == "EEXIST"
    )
    no_parent = await sandbox.agent.request("mkdir", path=str(tmp_path / "x" / "y"), parents=False)
    assert err(no_parent)["code"] == "ENOENT"
    mine = f"{os.getuid()}:{os.getgid()}"
    owned = tmp_path / "owned"
    assert (await sandbox.agent.request("mkdir", path=str(owned), user=mine))["created"]
    assert (owned.stat().st_uid, owned.stat().st_gid) == (os.getuid(), os.getgid())


async def test_move_remove_and_setattr(sandbox: Sandbox, tmp_path: Path) -> None:
    src, dst = tmp_path / "src.txt", tmp_path / "dst.txt"
    src.write_text("data")
    moved = await sandbox.agent.request("move", src=str(src), dst=str(dst))
    assert moved["entry"]["path"] == str(dst) and dst.read_text() == "data" and not src.exists()
    assert err(await sandbox.agent.request("move", src=str(src), dst=str(dst)))["code"] == "ENOENT"

    attr = await sandbox.agent.request("setattr", path=str(dst), mode=0o600, mtime=1_000_000.25)
    assert (attr["entry"]["mode"], attr["entry"]["mtime"]) == (0o600, 1_000_000.25)
    assert dst.stat().st_mtime == 1_000_000.25

    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / "f").touch()
    assert (
        err(await sandbox.agent.request("remove", path=str(tree), recursive=False))["code"]
        == "ENOTEMPTY"
    )
    assert (await sandbox.agent.request("remove", path=str(tree)))["ok"]
    assert not tree.exists()
    assert err(await sandbox.agent.request("remove", path=str(tree)))["code"] == "ENOENT"


async def test_move_across_filesystems_copies(sandbox: Sandbox, tmp_path: Path) -> None:
    shm = Path("/dev/shm")
    if not shm.is_dir() or shm.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("no second filesystem (/dev/shm) next to the temp dir")
    src = tmp_path / "tree"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "f").write_text("x")
    (src / "sub" / "f").chmod(0o751)
    os.utime(src / "sub" / "f", (1_000_000, 1_000_000))
    (src / "l").symlink_to("sub/f")
    dst = shm / f"fsb-move-{secrets.token_hex(4)}"
    try:
        reply = await sandbox.agent.request("move", src=str(src), dst=str(dst))
        assert reply["ok"], reply
        assert not src.exists()
        assert (dst / "sub" / "f").read_text() == "x"
        assert (dst / "sub" / "f").stat().st_mode & 0o7777 == 0o751
        assert (dst / "sub" / "f").stat().st_mtime == 1_000_000
        assert os.readlink(dst / "l") == "sub/f"
    finally:
        shutil.rmtree(dst, ignore_errors=True)


async def read_all(conn: Conn) -> bytes:
    data = b""
    while True:
        frame = await asyncio.wait_for(conn.read(), BOUND)
        assert frame is not None, "closed before EOF"
        if frame[0] == EOF:
            assert await asyncio.wait_for(conn.read(), BOUND) is None
            return data
        assert frame[0] == DATA
        data += frame[1]


async def test_read_streams_from_an_offset(sandbox: Sandbox, tmp_path: Path) -> None:
    f = tmp_path / "big.bin"
    content = os.urandom(300_000)  # several DATA frames
    f.write_bytes(content)
    reply, conn = await sandbox.agent.stream("read", path=str(f))
    assert reply["entry"]["size"] == len(content) and conn is not None
    assert await read_all(conn) == content
    _, conn = await sandbox.agent.stream("read", path=str(f), offset=299_990)
    assert conn is not None
    assert await read_all(conn) == content[299_990:]
    assert err((await sandbox.agent.stream("read", path=str(tmp_path)))[0])["code"] == "EISDIR"
    missing = err((await sandbox.agent.stream("read", path=str(tmp_path / "nope")))[0])
    assert missing["code"] == "ENOENT" and missing["message"].startswith(
        f"open {tmp_path / 'nope'}"
    )


async def write(sandbox: Sandbox, path: Path, chunks: list[bytes], **fields: Any) -> dict[str, Any]:
    reply, conn = await sandbox.agent.stream("write", path=str(path), **fields)
    if conn is None:
        return reply
    for c in chunks:
        conn.send(DATA, c)
    conn.send(EOF)
    answer = await conn.read_json()
    assert await asyncio.wait_for(conn.read(), BOUND) is None
    return answer


async def test_write_replaces_atomically_keeping_the_mode(sandbox: Sandbox, tmp_path: Path) -> None:
    f = tmp_path / "deep" / "er" / "f.txt"
    made = await write(sandbox, f, [b"hello ", b"world"], mtime=1_500_000_000.5)
    assert made["ok"] and made["entry"]["size"] == 11 and made["entry"]["mode"] == 0o644
    assert f.read_bytes() == b"hello world" and f.stat().st_mtime == 1_500_000_000.5
    f.chmod(0o751)
    kept = await write(sandbox, f, [b"v2"])
    assert kept["entry"]["mode"] == 0o751 and f.read_bytes() == b"v2"
    applied = await write(sandbox, f, [b"v3"], mode=0o600, user=f"{os.getuid()}:{os.getgid()}")
    assert applied["entry"]["mode"] == 0o600 and f.read_bytes() == b"v3"
    assert sorted(p.name for p in f.parent.iterdir()) == ["f.txt"]  # no temp files left
    assert err(await write(sandbox, tmp_path, [b"x"]))["code"] == "EISDIR"
    no_parents = await write(sandbox, tmp_path / "nope" / "f", [b"x"], parents=False)
    assert err(no_parents)["code"] == "ENOENT"


async def test_write_dropped_before_eof_leaves_the_old_file(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    d = tmp_path / "d"
    d.mkdir()
    f = d / "f.txt"
    f.write_bytes(b"old")
    reply, conn = await sandbox.agent.stream("write", path=str(f))
    assert reply["ok"] and conn is not None
    conn.send(DATA, b"half of the new")
    await conn.drain()
    conn.close()
    await wait_until(lambda: sorted(p.name for p in d.iterdir()) == ["f.txt"], "temp removed")
    assert f.read_bytes() == b"old"


async def test_watch_reports_changes_recursively(sandbox: Sandbox, tmp_path: Path) -> None:
    d = tmp_path / "w"
    (d / "sub").mkdir(parents=True)
    reply, conn = await sandbox.agent.stream("watch", path=str(d), recursive=True)
    assert reply["ok"] and conn is not None
    (d / "a.txt").write_text("x")
    (d / "sub" / "b.txt").touch()
    (d / "a.txt").chmod(0o600)
    (d / "a.txt").rename(d / "c.txt")
    (d / "c.txt").unlink()
    (d / "new").mkdir()
    want = [
        ("create", d / "a.txt"),
        ("write", d / "a.txt"),
        ("create", d / "sub" / "b.txt"),
        ("chmod", d / "a.txt"),
        ("rename", d / "a.txt"),
        ("rename", d / "c.txt"),
        ("remove", d / "c.txt"),
        ("create", d / "new"),
    ]
    seen: list[tuple[str, Path]] = []
    while not all(w in seen for w in want):
        event = await conn.read_json()
        seen.append((event["event"], Path(event["path"])))
        if event["path"] == str(d / "new"):
            assert event["type"] == "dir"
    (d / "new" / "n.txt").touch()  # a directory made after the watch began is watched too
    while (event := await conn.read_json())["path"] != str(d / "new" / "n.txt"):
        pass
    assert event["event"] == "create" and event["type"] == "file"
    conn.close()
    missing = err((await sandbox.agent.stream("watch", path=str(tmp_path / "nope")))[0])
    assert missing["code"] == "ENOENT"
