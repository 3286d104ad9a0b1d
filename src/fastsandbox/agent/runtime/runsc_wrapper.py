"""The runsc wrapper: how gVisor sandboxes run through the runc v2 shim, in their own network
namespace.

Debian ships no runsc shim, so the runc shim runs runsc under the name of a wrapper (its
`BinaryName`). Two flags are always added: `--network=host` (Debian's runsc refuses its own
network stack when started by the shim: "cannot run with network enabled in root network
namespace", even with a namespace path in the spec) and `--host-uds=open` (the supervisor dials
its agent's unix socket through a read-only bind mount; it still cannot create or listen on one).

`--network=host` means runsc's Sentry uses the network namespace it was *started in*: the
shim's, i.e. the agent's. So for `create`/`run` the wrapper reads the bundle's `config.json` and,
when `linux.namespaces` holds a `network` entry with a `path`, starts runsc inside that namespace
(`nsenter --net=PATH`); the sandbox then sees only that namespace's interfaces. A path that
cannot be entered fails the create (nsenter's error reaches the shim): never a silent fallback
to the agent's namespace. What `--network=host` still exposes is in docs/security.md.

Every later subcommand (start, state, kill, exec, ps, delete) must run in that namespace too:
runsc reaches its sandbox's control server over an *abstract* unix socket, and abstract sockets
belong to a network namespace (measured: `start` from outside gets "connecting to control server
... connection refused"). So create records the path in `<runsc root>/fsb-netns/<id>`, and the
front enters it for any subcommand naming that container (outside it when the path is gone, so
a sandbox whose namespace was removed can still be deleted); delete removes the record.

Two files: a `/bin/sh` front that finds the subcommand and container id itself and execs runsc
at once (the shim calls state/start/kill/delete several times per sandbox; a Python start costs
~10-40 ms each), and this module run as a script (`python3 -I -S`, stdlib only) for a `create` or
`run` the front cannot read. The front reads the namespace itself when the agent put it in the
spec's annotation `NETNS_ANNOTATION` too (`annotate`, on every gVisor spec with a path) and the
spec's namespaces name that same path: measured, the Python create cost 53 ms of a cold create
(its imports, on the loaded 2 cores) against ~3 ms for sed in the front. Any spec it cannot
read that way (no annotation, or no matching `"path"`) goes to the script, which reads the JSON:
the fallback is never "outside the namespace". The parsing is pure and unit-tested.

In a Kubernetes agent Pod the spec's `network` entry has no path: runsc itself then starts its
sandbox process in a fresh namespace and runs the createRuntime hook (agent/network/hook.py)
with that process's pid; the control socket stays where runsc ran (the shim's namespace), so
no record is needed there. The front runs such a create itself, with no Python (a real node
has not the agent's interpreter), when the spec holds the literal pathless entry
`{"type": "network"}` and no `"type": "network", "path"` (JSON escapes every quote inside a
string, so no value of the spec can fake either); other spellings go to the script.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import sys
from collections.abc import Sequence
from typing import Any

EXTRA_FLAGS = ("--network=host", "--host-uds=open")
# The spec's network namespace path, also as an annotation the sh front reads with sed.
NETNS_ANNOTATION = "dev.fastsandbox.netns"
RECORD_DIR = "fsb-netns"
DEFAULT_ROOT = "/var/run/runsc"
# Flags (global or a subcommand's) that take the next argument as their value: what the runc
# shim (go-runc) passes, and runsc's own global ones. Go's flag package takes - and --.
_VALUE_FLAG_NAMES = (
    "root", "log", "log-format", "debug-log", "panic-log", "debug-log-format", "platform",
    "network", "host-uds", "file-access", "overlay2", "pid-file", "console-socket", "process",
    "format", "bundle", "b", "resources", "r", "preserve-fds", "cwd", "user", "u", "env", "e",
    "f",
)  # fmt: skip
VALUE_FLAGS = frozenset(f"{dash}{name}" for dash in ("-", "--") for name in _VALUE_FLAG_NAMES)
STARTING_SUBCOMMANDS = frozenset({"create", "run"})


def parse(argv: Sequence[str]) -> tuple[str, str, str, str]:
    """(root, subcommand, container id, bundle) of a runsc argv; "" for what it lacks. The id
    is the subcommand's first positional argument, as in every go-runc call."""
    root, sub, cid, bundle = DEFAULT_ROOT, "", "", ""
    i = 0
    while i < len(argv):
        arg = argv[i]
        name, eq, value = arg.partition("=")
        if arg.startswith("-") and name in VALUE_FLAGS:
            if not eq:
                value = argv[i + 1] if i + 1 < len(argv) else ""
                i += 1
            if name.lstrip("-") == "root" and not sub:
                root = value
            elif name.lstrip("-") in ("bundle", "b") and sub:
                bundle = value
        elif not arg.startswith("-"):
            if not sub:
                sub = arg
            elif not cid:
                cid = arg
        i += 1
    return root, sub, cid, bundle


def log_path(argv: Sequence[str]) -> str | None:
    """runsc's global `--log` file: where the shim reads a failed call's error from (runc's
    JSON log lines; the last `error` entry becomes the create's message)."""
    i = 0
    while i < len(argv) and argv[i].startswith("-"):
        name, eq, value = argv[i].partition("=")
        if name in ("--log", "-log"):
            return value if eq else (argv[i + 1] if i + 1 < len(argv) else None)
        i += 2 if name in VALUE_FLAGS and not eq else 1
    return None  # the subcommand: global flags are over


def fail(argv: Sequence[str], message: str) -> None:
    """Report `message` where the shim looks (the --log file, and stderr) and exit 1."""
    line = f"fastsandbox runsc wrapper: {message}"
    sys.stderr.write(line + "\n")
    log = log_path(argv)
    if log:
        try:
            with open(log, "a") as f:
                f.write(json.dumps({"level": "error", "msg": line}) + "\n")
        except OSError:
            pass
    sys.exit(1)


def netns_path(config: object) -> str | None:
    """The `path` of the spec's `network` namespace entry, or None (no entry, or no path)."""
    if not isinstance(config, dict):
        return None
    namespaces = (config.get("linux") or {}).get("namespaces") or ()
    for ns in namespaces:
        if isinstance(ns, dict) and ns.get("type") == "network":
            path = ns.get("path")
            return path if isinstance(path, str) and path else None
    return None


def record_path(root: str, cid: str) -> str:
    return os.path.join(root, RECORD_DIR, cid)


def create_command(
    runsc: str, argv: Sequence[str], cwd: str, nsenter: str = "nsenter"
) -> tuple[list[str], str | None]:
    """For a create/run argv: the argv to exec, and the network namespace path to record for
    the container (None: the spec names none, runsc runs where the shim is)."""
    base = [runsc, *EXTRA_FLAGS, *argv]
    _, sub, _, bundle = parse(argv)
    if sub not in STARTING_SUBCOMMANDS:
        return base, None
    # runc's default bundle is the working directory.
    with open(os.path.join(bundle or cwd, "config.json"), "rb") as f:
        path = netns_path(json.load(f))
    if path is None:
        return base, None
    return [nsenter, f"--net={path}", "--", *base], path


def annotate(oci: dict[str, Any]) -> dict[str, Any]:
    """`oci` with its network namespace path also in `NETNS_ANNOTATION` (for the front)."""
    path = netns_path(oci)
    if path is None or not _PLAIN_PATH.fullmatch(path):
        return oci  # the script reads it from the JSON
    return {**oci, "annotations": {**(oci.get("annotations") or {}), NETNS_ANNOTATION: path}}


# What the front's sed reads back unchanged (nothing JSON would escape, no space or quote).
_PLAIN_PATH = re.compile(r"/[A-Za-z0-9._/+-]+")


def shell_wrapper(runsc: str, python: str, script: str) -> str:
    """The `/bin/sh` front (see the module docstring)."""
    flags = " ".join(EXTRA_FLAGS)
    value_flags = "|".join(
        sorted(
            VALUE_FLAGS - {f"{d}{n}" for d in ("-", "--") for n in ("root", "log", "bundle", "b")}
        )
    )
    key = NETNS_ANNOTATION.replace(".", "\\.")
    return f"""#!/bin/sh
# Written by fastsandbox (agent/runtime/runsc_wrapper.py): runsc for the runc shim, in the
# network namespace its bundle's spec names.
root={DEFAULT_ROOT}; sub=; id=; skip=; log=; bundle=.
for a in "$@"; do
  if [ -n "$skip" ]; then
    case "$skip" in root) root=$a ;; log) log=$a ;; bundle) bundle=$a ;; esac
    skip=; continue
  fi
  case "$a" in
    --root|-root) [ -z "$sub" ] && skip=root || skip=1 ;;
    --root=*|-root=*) [ -z "$sub" ] && root=${{a#*=}} ;;
    --log|-log) [ -z "$sub" ] && skip=log || skip=1 ;;
    --log=*|-log=*) [ -z "$sub" ] && log=${{a#*=}} ;;
    --bundle|-bundle|--b|-b) skip=bundle ;;
    --bundle=*|-bundle=*|--b=*|-b=*) bundle=${{a#*=}} ;;
    {value_flags}) skip=1 ;;
    -*) ;;
    *) if [ -z "$sub" ]; then sub=$a; else id=$a; break; fi ;;
  esac
done
rec="$root/{RECORD_DIR}/$id"
case "$sub" in create|run)
  # The namespace the agent also put in the annotation, if the spec's namespaces name it;
  # anything else is read by the script (never a start outside the namespace).
  spec="$bundle/config.json"
  ns=$(sed -n 's|.*"{key}": *"\\(/[A-Za-z0-9._/+-]*\\)".*|\\1|p' "$spec" 2>/dev/null)
  named=
  if [ -n "$ns" ]; then
    grep -qF -e "\\"path\\": \\"$ns\\"" -e "\\"path\\":\\"$ns\\"" "$spec" && named=1
  fi
  if [ -z "$named" ] && [ -n "$id" ] && grep -qF '{{"type": "network"}}' "$spec" &&
    ! grep -qF '"type": "network", "path"' "$spec"; then
    # A `network` entry without a path (an agent Pod): runsc makes the namespace itself.
    exec {runsc} {flags} "$@"
  fi
  if [ -z "$named" ] || [ -z "$id" ]; then
    exec {python} -I -S {script} {runsc} "$@"
  fi
  fail() {{
    echo "fastsandbox runsc wrapper: $1" >&2
    [ -z "$log" ] ||
      printf '{{"level": "error", "msg": "fastsandbox runsc wrapper: %s"}}\\n' "$1" >>"$log"
    exit 1
  }}
  [ -e "$ns" ] || fail "network namespace $ns does not exist"
  mkdir -p "$root/{RECORD_DIR}" && echo "$ns" >"$rec" ||
    fail "cannot record the network namespace of $id"
  exec nsenter --net="$ns" -- {runsc} {flags} "$@" ;;
esac
ns=
if [ -n "$id" ] && [ -f "$rec" ]; then read -r ns < "$rec"; fi
if [ -n "$ns" ] && [ -e "$ns" ]; then set -- nsenter --net="$ns" -- {runsc} {flags} "$@"
else set -- {runsc} {flags} "$@"; fi
if [ "$sub" = delete ] && [ -f "$rec" ]; then "$@" && rm -f "$rec"; exit; fi
exec "$@"
"""


def _write_if_changed(path: str, content: str, mode: int) -> None:
    """Replace `path` atomically when its content differs (several agents may share a dir)."""
    with contextlib.suppress(OSError), open(path) as f:
        if f.read() == content:
            return
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(content)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def install(state_dir: str | os.PathLike[str], runsc_binary: str = "runsc") -> str:
    """Write the wrapper (the sh front and a copy of this script) under `state_dir`; return
    the front's path, the runc shim's `BinaryName`. Run by the agent, not by the script."""
    from fastsandbox.errors import RuntimeFailure  # the script itself runs stdlib-only

    runsc = shutil.which(runsc_binary)
    if runsc is None:
        raise RuntimeFailure("runtime gvisor needs runsc: apt-get install runsc")
    if shutil.which("nsenter") is None:
        raise RuntimeFailure("runtime gvisor needs nsenter: apt-get install util-linux")
    os.makedirs(state_dir, exist_ok=True)
    script = os.path.join(state_dir, "runsc-wrapper.py")
    front = os.path.join(state_dir, "runsc-wrapper")
    with open(__file__) as f:
        _write_if_changed(script, f.read(), 0o644)
    python = sys.executable or shutil.which("python3") or "python3"
    _write_if_changed(front, shell_wrapper(runsc, python, script), 0o755)
    return front


def main(args: Sequence[str]) -> None:
    runsc, *argv = args
    try:
        exec_argv, path = create_command(runsc, argv, os.getcwd())
    except (OSError, ValueError) as err:
        fail(argv, f"cannot read the bundle's spec: {err}")
    if path is not None:
        # Fail closed, with the reason: never start in the agent's namespace instead.
        if not os.path.exists(path):
            fail(argv, f"network namespace {path} does not exist")
        root, _, cid, _ = parse(argv)
        record = record_path(root, cid)
        try:
            os.makedirs(os.path.dirname(record), exist_ok=True)
            with open(record, "w") as f:
                f.write(path + "\n")
        except OSError as err:
            fail(argv, f"cannot record the network namespace of {cid}: {err}")
    try:
        os.execvp(exec_argv[0], exec_argv)
    except OSError as err:
        fail(argv, f"cannot run {exec_argv[0]}: {err}")


if __name__ == "__main__":
    main(sys.argv[1:])
