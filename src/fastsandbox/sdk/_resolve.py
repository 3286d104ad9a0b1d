"""Where the server is, how to reach it, as whom — and how its failures become our errors.

The SDK (`_core` re-exports these) and `fsb exec`'s lean client (cli/wire/) share this module,
so both resolve the same endpoint, token, namespace and TLS trust, and turn a gRPC status into
the same `FsbError`. It imports neither grpc nor protobuf nor pathlib: `fsb exec` runs it on
every command, before the one call it makes (docs/performance.md, "CLI").
"""

from __future__ import annotations

import os

from fastsandbox.errors import (
    RETRY_AFTER_KEY,
    FsbError,
    InvalidArgument,
    Unauthenticated,
    Unavailable,
    from_grpc,
    never_answered,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping, Sequence
    from pathlib import Path
    from typing import Any

    import grpc

DEFAULT_NAMESPACE = "default"


def config_path(env: Mapping[str, str]) -> str:
    """`$FSB_CONFIG`, else `$XDG_CONFIG_HOME/fastsandbox/config.yaml` (`~/.config` by default)."""
    if env.get("FSB_CONFIG"):
        return env["FSB_CONFIG"]
    base = env.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return os.path.join(base, "fastsandbox", "config.yaml")


def data_dir(env: Mapping[str, str]) -> str:
    """Where `fsb server` keeps its token by default: `$FSB_DATA_DIR` or the XDG data dir.

    The rule of `settings.default_data_dir`, applied to `env` and without importing settings
    (its dataclasses cost `fsb exec` more than its whole call; tests/unit/test_sdk.py checks
    that the two agree).
    """
    if env.get("FSB_DATA_DIR"):
        return env["FSB_DATA_DIR"]
    base = env.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(base, "fastsandbox")


def load_config(path: str | Path) -> dict[str, Any]:
    """The config file as a mapping; a missing file is an empty config."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise InvalidArgument(f"cannot read config file {path}: {exc.strerror}") from None
    import yaml  # only when there is a file: yaml costs start-up time

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise InvalidArgument(f"config file {path} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise InvalidArgument(f"config file {path}: expected a mapping of keys to values")
    return data


class ClientConfig:
    """Where to connect, how, and as whom; `token` may be missing until a call needs it.

    `tls` False is plaintext (only to a loopback address); otherwise `ca_pem` is the CA to
    trust (None: the system's roots, for a server with a public certificate).
    """

    __slots__ = ("ca_pem", "endpoint", "missing_token", "namespace", "tls", "token")

    def __init__(
        self,
        endpoint: str,
        namespace: str,
        token: str | None,
        missing_token: str = "no API token",
        tls: bool = True,
        ca_pem: bytes | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.namespace = namespace
        self.token = token
        self.missing_token = missing_token
        """What to tell the user when `token` is None and a call is about to be made."""
        self.tls = tls
        self.ca_pem = ca_pem

    def __repr__(self) -> str:
        return (
            f"ClientConfig(endpoint={self.endpoint!r}, namespace={self.namespace!r}, "
            f"tls={self.tls!r}, token={'set' if self.token else None})"
        )

    def metadata(self) -> tuple[tuple[str, str], ...]:
        if not self.token:
            raise Unauthenticated(self.missing_token)
        return (("authorization", f"Bearer {self.token}"),)

    @property
    def channel_key(self) -> tuple[str, bool, bytes | None]:
        """What a channel to this server depends on (the token does not: it goes per call)."""
        return (self.endpoint, self.tls, self.ca_pem)

    def channel(self, options: Sequence[tuple[str, Any]]) -> grpc.aio.Channel:
        import grpc

        if not self.tls:
            return grpc.aio.insecure_channel(self.endpoint, options=options)
        creds = grpc.ssl_channel_credentials(root_certificates=self.ca_pem)
        return grpc.aio.secure_channel(self.endpoint, creds, options=options)


_TOKEN_HINT = "use --token-file, set FSB_TOKEN, or run on the server's machine where {} exists"


def _read_token(path: str, *, given: bool = False) -> tuple[str | None, str]:
    """The token in `path`; `given` (the user named the file) makes a missing file an error."""
    try:
        with open(path, encoding="utf-8") as f:
            token = f.read().strip()
    except FileNotFoundError:
        if given:
            raise InvalidArgument(f"--token-file: {path} does not exist") from None
        return None, "no API token: " + _TOKEN_HINT.format(path)
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or type(exc).__name__
        if given:
            raise InvalidArgument(f"--token-file: cannot read {path} ({reason})") from None
        return None, f"cannot read API token from {path} ({reason}): use --token-file or FSB_TOKEN"
    if not token:
        if given:
            raise InvalidArgument(f"--token-file: {path} is empty")
        return None, f"API token file {path} is empty: " + _TOKEN_HINT.format(path)
    return token, ""


_LOOPBACK = ("127.", "localhost:", "[::1]:", "::1:")


def _loopback(endpoint: str) -> bool:
    if endpoint.startswith("unix:"):
        return True  # a socket file: no network in between
    target = endpoint.removeprefix("dns:///").removeprefix("ipv4:").removeprefix("ipv6:")
    return target.startswith(_LOOPBACK)


def _truthy(value: object) -> bool:
    return str(value).strip().lower() in ("1", "true", "yes", "on")


def _server_info(data: str) -> dict[str, Any]:
    """What `fsb server` wrote about itself into its data dir (`client.json`), or {}."""
    try:
        with open(os.path.join(data, "client.json"), encoding="utf-8") as f:
            text = f.read()
    except (OSError, ValueError):
        return {}
    import json

    try:
        info = json.loads(text)
    except ValueError:
        return {}
    return info if isinstance(info, dict) else {}


def _read_ca(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise InvalidArgument(f"{what}: cannot read {path} ({exc.strerror})") from None


def resolve(
    endpoint: str | None = None,
    token: str | None = None,
    namespace: str | None = None,
    *,
    token_file: str | Path | None = None,
    ca_file: str | Path | None = None,
    insecure: bool | None = None,
    env: Mapping[str, str] | None = None,
) -> ClientConfig:
    """Apply the precedence argument > `FSB_*` environment > config file > the server's data
    dir (its `client.json`, `token`, `tls/ca.crt`) > default.

    Transport: a CA file given (`ca_file`, `FSB_CA_FILE`, config `ca_file`) is trusted; plaintext
    only when asked (`insecure`, `FSB_INSECURE=1`, config `insecure: true`, or the local server
    says it serves plaintext) and only to a loopback address; else TLS trusting the data dir's
    CA when the server made one, else the system's roots.
    """
    env = os.environ if env is None else env
    config = load_config(config_path(env))
    data = data_dir(env)
    server = _server_info(data)

    def pick(arg: object, var: str, key: str, default: str | None) -> str | None:
        for value in (arg, env.get(var), config.get(key)):
            if value not in (None, ""):
                return str(value)
        return default

    local = server.get("endpoint") if isinstance(server.get("endpoint"), str) else None
    resolved_endpoint = pick(endpoint, "FSB_ENDPOINT", "endpoint", local)
    if not resolved_endpoint:
        # Imported only here: settings' dataclasses are the costliest import of `fsb exec`.
        from fastsandbox.settings import DEFAULT_ENDPOINT

        resolved_endpoint = DEFAULT_ENDPOINT

    missing = ""
    resolved_token = pick(token, "FSB_TOKEN", "token", None)
    if resolved_token is None:
        named = pick(token_file, "FSB_TOKEN_FILE", "token_file", None)
        if named is not None:
            resolved_token, missing = _read_token(os.path.expanduser(named), given=True)
        else:
            resolved_token, missing = _read_token(os.path.join(data, "token"))

    same_server = local is not None and local == resolved_endpoint
    ca_named = pick(ca_file, "FSB_CA_FILE", "ca_file", None)
    plain = insecure
    if plain is None:
        wanted = pick(None, "FSB_INSECURE", "insecure", None)
        plain = _truthy(wanted) if wanted is not None else None
    if plain is None:
        plain = same_server and server.get("tls") is False
    ca_pem: bytes | None = None
    local_ca = os.path.join(data, "tls", "ca.crt")
    if ca_named is not None:
        ca_pem, plain = _read_ca(os.path.expanduser(ca_named), "FSB_CA_FILE"), False
    elif not plain and os.path.isfile(local_ca):
        ca_pem = _read_ca(local_ca, "the server's CA")
    if plain and not _loopback(resolved_endpoint):
        raise InvalidArgument(
            f"FSB_INSECURE: plaintext is allowed only to a loopback address, not "
            f"{resolved_endpoint}: the token would cross the network in clear"
        )
    return ClientConfig(
        endpoint=resolved_endpoint,
        namespace=pick(namespace, "FSB_NAMESPACE", "namespace", DEFAULT_NAMESPACE)
        or DEFAULT_NAMESPACE,
        token=resolved_token,
        missing_token=missing,
        tls=not plain,
        ca_pem=ca_pem,
    )


# --------------------------------------------------------------------------- the error seam


def translate_status(
    status: str | None,
    details: str,
    trailing: Iterable[tuple[str, str | bytes]] | None,
    endpoint: str,
) -> FsbError:
    """The one place a failed gRPC call becomes an `FsbError` (and so a CLI exit code), from
    its status name, details and trailing metadata — however the client read them."""
    # Only when nothing answered; a server's own UNAVAILABLE keeps its reason (errors.py).
    if never_answered(status, details):
        if status == "DEADLINE_EXCEEDED":
            return Unavailable(f"no answer from fsb server at {endpoint} in time: retry later")
        return unreachable(endpoint)
    if status == "UNIMPLEMENTED":
        return FsbError(f"the server at {endpoint} does not support this call: upgrade fsb server")
    exc = from_grpc(status, details)
    exc.retry_after = retry_after_in(trailing)
    if exc.retry_after is not None and "retry after" not in details:
        exc.message = f"{details} (retry after {exc.retry_after:g}s)"
        exc.args = (exc.message,)
    return exc


def retry_after_in(trailing: Iterable[tuple[str, str | bytes]] | None) -> float | None:
    """The `retry-after` seconds in a failed call's trailing metadata, if the server sent one."""
    for key, value in trailing or ():
        if key == RETRY_AFTER_KEY:
            try:
                seconds = float(value if isinstance(value, str) else value.decode())
            except ValueError:
                return None
            return seconds if seconds >= 0 else None
    return None


def unreachable(endpoint: str) -> Unavailable:
    """What a client says when no server answered at `endpoint` (as `translate_status` does for
    grpc's own connect failures)."""
    return Unavailable(f"cannot reach fsb server at {endpoint}: is `fsb server` running?")
