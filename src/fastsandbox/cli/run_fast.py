"""`fsb run` without typer, the SDK or the models, for the command lines scripts send: one
Create call on the lean client (cli/wire/), the answer printed as `render.created` prints it.

`parse` takes `fsb run`'s options that need nothing but the server — `--image`, `--pool`,
`-e K=V`, `-w DIR`, `-p PORT`, `--ttl S`, `-l K=V`, `--mode`, `--cpu`, `--memory`, `--pids`,
`--disk`, `--idempotency-key`, `--endpoint`, `--token-file`, `-n` (each also `--opt=value`) —
around exactly one NAME, then optionally `--` and the command; anything else (`-o`, `-f`,
`--lease`, `--expire-time`, `--pull-user`, `--help`, a value typer would refuse...) returns
None and typer answers, as before. So does a terminal on stderr: the "pulling IMAGE…" line
(cli/pull_progress.py) is the SDK path's.

The checks `fsb run` makes itself (`-e`/`-l` as K=V, `--ttl` positive, `--mode`) are made here
with the same words; the models' checks (name, image, ports, quantities) are the server's,
which runs the same models with the same field names (control/fastpath/service.py).
"""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence

    from fastsandbox.errors import FsbError
    from fastsandbox.sdk._resolve import ClientConfig

CREATE_PATH = "/fastsandbox.v1.FastPath/Create"
DEFAULT_POOL = "default-pool"  # sdk/_core.DEFAULT_POOL (tests/unit/test_cli_run_fast.py)
_VALUES = {
    "--image": "image", "--pool": "pool", "-w": "workdir", "--workdir": "workdir",
    "--working-dir": "workdir", "--ttl": "ttl", "--mode": "mode", "--cpu": "cpu",
    "--memory": "memory", "--pids": "pids", "--disk": "disk",
    "--idempotency-key": "idempotency_key", "--endpoint": "endpoint",
    "--token-file": "token_file", "-n": "namespace", "--namespace": "namespace",
}  # fmt: skip
_LISTS = {"-e": "env", "--env": "env", "-p": "port", "--port": "port", "-l": "label",
          "--label": "label"}  # fmt: skip
_INTS = ("ttl", "pids")
_ENVVARS = {
    "endpoint": "FSB_ENDPOINT",
    "namespace": "FSB_NAMESPACE",
    "token_file": "FSB_TOKEN_FILE",
}


def parse(argv: Sequence[str]) -> dict[str, object] | None:
    """The arguments after `run` (option -> value; lists for repeatable ones), or None."""
    got: dict[str, object] = {"env": [], "port": [], "label": [], "command": []}
    name: str | None = None
    i = 0
    while i < len(argv):
        word = argv[i]
        if word == "--":
            got["command"] = list(argv[i + 1 :])
            break
        if not word.startswith("-") or word == "-":
            if name is not None:
                return None  # command words without `--`: typer's to place
            name = word
            i += 1
            continue
        key, eq, inline = word.partition("=")
        dest = _VALUES.get(key) or _LISTS.get(key)
        if dest is None or (eq and not key.startswith("--")):
            return None
        if not eq:
            i += 1
            if i >= len(argv):
                return None
            inline = argv[i]
        if dest in _INTS or dest == "port":
            try:
                value: object = int(inline)
            except ValueError:
                return None  # typer's usage error names the option
        else:
            value = inline
        if key in _LISTS:
            list_ = got[dest]
            assert isinstance(list_, list)
            list_.append(value)
        else:
            got[dest] = value
        i += 1
    if name is None:
        return None
    got["name"] = name
    for dest, var in _ENVVARS.items():
        if got.get(dest) is None and os.environ.get(var):
            got[dest] = os.environ[var]
    return got


def _pairs(items: list[str], flag: str, *, env: bool) -> list[tuple[str, str]]:
    from fastsandbox.errors import InvalidArgument

    merged: dict[str, str] = {}
    for i, item in enumerate(items):
        key, sep, value = item.partition("=")
        if env and not sep:
            raise InvalidArgument(f"-e {item!r}: expected K=V (spec.env[{i}])")
        if not env and (not sep or not key):
            raise InvalidArgument(f"-l {item!r}: expected K=V")
        merged.pop(key, None)  # a flag moves the variable to the end, as given
        merged[key] = value
    return list(merged.items())


def request(args: dict[str, object], namespace: str) -> bytes:
    """The CreateRequest `fsb run` sends for `args` (as sdk/_core.create_request builds it)."""
    from fastsandbox.cli.wire import pb
    from fastsandbox.errors import InvalidArgument

    def text(key: str) -> str:
        value = args.get(key)
        return "" if value is None else str(value)

    env = _pairs(list(args["env"]), "-e", env=True)  # type: ignore[call-overload]
    labels = _pairs(list(args["label"]), "-l", env=False)  # type: ignore[call-overload]
    ttl = args.get("ttl")
    if isinstance(ttl, int) and ttl <= 0:
        raise InvalidArgument("spec.ttlSeconds: must be positive")
    mode = text("mode")
    if mode and mode not in ("fast", "strong"):
        raise InvalidArgument(f"mode: must be fast or strong, got {mode!r}")
    limits = (args.get("cpu"), args.get("memory"), args.get("pids"), args.get("disk"))
    resources = None
    if any(v is not None for v in limits):
        resources = (text("cpu"), text("memory"), int(args.get("pids") or 0), text("disk"))  # type: ignore[call-overload]
    command = [str(w) for w in args["command"]]  # type: ignore[attr-defined]
    return pb.create_request(
        namespace=text("namespace") or namespace, name=text("name"), image=text("image"),
        command=command, env=env, working_dir=text("workdir"),
        ports=[int(p) for p in args["port"]],  # type: ignore[attr-defined]
        pool=DEFAULT_POOL if args.get("pool") is None else text("pool"),
        ttl_seconds=ttl if isinstance(ttl, int) else 0, resources=resources, labels=labels,
        mode=mode, idempotency_key=text("idempotency_key"),
    )  # fmt: skip


def answer(reply: bytes) -> list[str]:
    """`render.created`'s lines for a CreateResponse (the object's own timings first, which
    keep "not reached" apart from 0, as sdk/_core.create_result reads them)."""
    from fastsandbox.cli.render_plain import TIMING_KEYS, created_lines
    from fastsandbox.cli.wire import pb

    resp = pb.create_response(reply)
    obj: dict[str, object] = {}
    if resp["object_json"]:
        import json

        try:
            loaded = json.loads(str(resp["object_json"]))
        except ValueError:
            loaded = {}
        obj = loaded if isinstance(loaded, dict) else {}
    meta = obj.get("metadata") if isinstance(obj.get("metadata"), dict) else {}
    status = obj.get("status") if isinstance(obj.get("status"), dict) else {}
    assert isinstance(meta, dict) and isinstance(status, dict)
    wire_timings = status.get("timings")
    got = resp["timings"]
    assert isinstance(got, dict)
    if isinstance(wire_timings, dict):
        timings = {k: wire_timings.get(k) for k in TIMING_KEYS}
    else:
        timings = {k: (got[k] or None) for k in TIMING_KEYS}
        timings["acceptedMs"] = got["acceptedMs"]
    endpoints = resp["endpoints"] or status.get("endpoints") or []
    assert isinstance(endpoints, list)

    def pick(field: str, fallback: object) -> str:
        return str(resp[field] or fallback or "")

    return created_lines(
        namespace=pick("namespace", meta.get("namespace")), name=pick("name", meta.get("name")),
        uid=pick("uid", meta.get("uid")), phase=pick("phase", status.get("phase")),
        agent=pick("agent", status.get("assignedAgent")),
        agent_ip=pick("agent_ip", status.get("agentIp")),
        container_id=pick("container_id", status.get("containerId")),
        endpoints=[str(e) for e in endpoints], timings=timings,
    )  # fmt: skip


def run(args: dict[str, object]) -> int | None:
    """Create and print; the exit code, or None when the SDK path must answer instead.

    That is: stderr is a terminal, the endpoint is one only grpc reaches, or the call failed
    before the server looked at the request (our own checks, no token, nothing listening, the
    token refused). Those are exactly the cases where `fsb run` today answers with its
    client-side validation first, so the SDK path is run to give that same answer; a call the
    server answered (created, or refused naming a field) is reported here.
    """
    from fastsandbox.errors import FsbError, exit_code_of

    if os.isatty(2):
        return None  # the pull progress line is the SDK path's
    try:
        from fastsandbox.cli import exec_lean
        from fastsandbox.sdk._resolve import resolve

        config = resolve(
            _opt(args, "endpoint"), None, _opt(args, "namespace"),
            token_file=_opt(args, "token_file"),
        )  # fmt: skip
        if not exec_lean.usable(config):
            return None
        wire = request(args, config.namespace)
        reply = _create(config, wire)
    except _Answered as answered:
        sys.stderr.write(f"error: {' '.join(answered.cause.message.split())}\n")
        return exit_code_of(answered.cause)
    except (_NotAnswered, FsbError):  # our checks, the resolution, no token: the SDK path's
        return None
    sys.stdout.write("".join(line + "\n" for line in answer(reply)))
    return 0


class _NotAnswered(Exception):
    """The server did not look at the request."""


class _Answered(Exception):
    """The server's refusal, as our error."""

    def __init__(self, cause: FsbError) -> None:
        super().__init__(cause.message)
        self.cause = cause


def _opt(args: dict[str, object], key: str) -> str | None:
    value = args.get(key)
    return None if value is None else str(value)


def _create(config: ClientConfig, wire: bytes) -> bytes:
    from fastsandbox.cli.exec_lean import CONNECT_TIMEOUT_SECONDS
    from fastsandbox.cli.wire import h2
    from fastsandbox.errors import Unavailable
    from fastsandbox.sdk._resolve import translate_status, unreachable

    metadata = config.metadata()
    where = h2.target(config.endpoint)
    assert where is not None
    try:
        sock = h2.connect(
            config.endpoint, tls=config.tls, ca_pem=config.ca_pem, timeout=CONNECT_TIMEOUT_SECONDS
        )
    except OSError:
        raise unreachable(config.endpoint) from None
    try:
        call = h2.Call(
            sock, authority=where[2], path=CREATE_PATH, metadata=metadata, tls=config.tls
        )
        return h2.unary(call, wire)
    except h2.CallError as failure:
        raise translate_status(
            failure.status, failure.details, failure.trailing, config.endpoint
        ) from None
    except OSError as exc:
        raise Unavailable(f"run: the connection to {config.endpoint} failed: {exc}") from None
    finally:
        sock.close()
