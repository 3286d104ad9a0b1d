"""Size limits of what one request may carry, checked at the edge before anything is made:
env (count, bytes), command + args (count, bytes), labels (count, key and value bytes).

The numbers are in settings.py (defined once). Each refusal is INVALID_ARGUMENT naming the field
and the limit, so a caller knows what to shorten.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from fastsandbox.api.models import Sandbox
from fastsandbox.errors import InvalidArgument
from fastsandbox.settings import (
    MAX_ARGS,
    MAX_ARGS_BYTES,
    MAX_ENV_BYTES,
    MAX_ENV_VARS,
    MAX_LABEL_KEY_BYTES,
    MAX_LABEL_VALUE_BYTES,
    MAX_LABELS,
)


def _size(text: str) -> int:
    return len(text.encode())


def check_labels(labels: Mapping[str, str] | Iterable[tuple[str, str]], field: str) -> None:
    items = list(labels.items()) if isinstance(labels, Mapping) else list(labels)
    if len(items) > MAX_LABELS:
        raise InvalidArgument(f"{field}: {len(items)} labels, at most {MAX_LABELS} are allowed")
    for key, value in items:
        if _size(key) > MAX_LABEL_KEY_BYTES:
            raise InvalidArgument(
                f"{field}: key {key[:40]!r}... is {_size(key)} bytes, "
                f"at most {MAX_LABEL_KEY_BYTES} are allowed"
            )
        if _size(value) > MAX_LABEL_VALUE_BYTES:
            raise InvalidArgument(
                f"{field}[{key!r}]: value is {_size(value)} bytes, "
                f"at most {MAX_LABEL_VALUE_BYTES} are allowed"
            )


def check_sandbox(sb: Sandbox) -> None:
    """Raise InvalidArgument when `sb` carries more than one sandbox may."""
    spec = sb.spec
    if len(spec.env) > MAX_ENV_VARS:
        raise InvalidArgument(
            f"spec.env: {len(spec.env)} variables, at most {MAX_ENV_VARS} are allowed"
        )
    env_bytes = sum(_size(e.name) + _size(e.value) + 2 for e in spec.env)
    if env_bytes > MAX_ENV_BYTES:
        raise InvalidArgument(
            f"spec.env: {env_bytes} bytes in all, at most {MAX_ENV_BYTES} are allowed"
        )
    argv = [*spec.command, *spec.args]
    if len(argv) > MAX_ARGS:
        raise InvalidArgument(
            f"spec.command + spec.args: {len(argv)} items, at most {MAX_ARGS} are allowed"
        )
    argv_bytes = sum(_size(a) + 1 for a in argv)
    if argv_bytes > MAX_ARGS_BYTES:
        raise InvalidArgument(
            f"spec.command + spec.args: {argv_bytes} bytes, at most {MAX_ARGS_BYTES} are allowed"
        )
    check_labels(sb.metadata.labels, "metadata.labels")
