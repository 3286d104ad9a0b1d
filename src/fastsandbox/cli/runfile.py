"""`fsb run -f FILE.yaml`: read a Sandbox object or flat keys into `create` options.

The file may be a whole `Sandbox` (apiVersion/kind/metadata/spec, e.g. from `fsb get -o yaml`; its
status is ignored) or a flat mapping of spec keys in either spelling (`poolRef` or `pool_ref`).
Flags given on the command line override the file; validation happens later, in one place (the
SDK builds the spec with the API models), so file and flag errors read the same.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastsandbox.errors import InvalidArgument

# accepted spelling -> `CreateOptions` key (plus `image`, which `create` takes positionally)
_KEYS: dict[str, str] = {
    "image": "image",
    "pool": "pool",
    "poolRef": "pool",
    "pool_ref": "pool",
    "command": "command",
    "args": "args",
    "env": "env",
    "workingDir": "working_dir",
    "working_dir": "working_dir",
    "exposedPorts": "ports",
    "exposed_ports": "ports",
    "ports": "ports",
    "ttl": "ttl",
    "ttlSeconds": "ttl",
    "ttl_seconds": "ttl",
    "expireTime": "expire_time",
    "expire_time": "expire_time",
    "failurePolicy": "failure_policy",
    "failure_policy": "failure_policy",
    "recoveryTimeoutSeconds": "recovery_timeout",
    "recovery_timeout_seconds": "recovery_timeout",
    "recovery_timeout": "recovery_timeout",
    "consistencyMode": "mode",
    "consistency_mode": "mode",
    "mode": "mode",
    "labels": "labels",
    "resources": "resources",
    "leaseSeconds": "lease",
    "lease_seconds": "lease",
    "lease": "lease",
    "idempotencyKey": "idempotency_key",
    "idempotency_key": "idempotency_key",
    "namespace": "namespace",
}
_OBJECT_KEYS = {"apiVersion", "kind", "metadata", "spec", "status"}


def _flat(path: Path, data: dict[str, Any]) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for key, value in data.items():
        target = _KEYS.get(str(key))
        if target is None:
            raise InvalidArgument(f"{path}: unknown key {key!r}; see `fsb run --help`")
        options[target] = value
    return options


def load(path: Path) -> dict[str, Any]:
    """The file's values as `create` keyword arguments (`image` included)."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise InvalidArgument(f"cannot read {path}: {exc.strerror or exc}") from None
    import yaml

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise InvalidArgument(f"{path} is not valid YAML: {' '.join(str(exc).split())}") from None
    if not isinstance(data, dict):
        raise InvalidArgument(f"{path}: expected a mapping (a Sandbox object or spec keys)")
    if not (_OBJECT_KEYS & data.keys()):
        return _flat(path, data)

    if data.get("kind", "Sandbox") != "Sandbox":
        raise InvalidArgument(f"{path}: kind must be Sandbox, not {data.get('kind')!r}")
    unknown = data.keys() - _OBJECT_KEYS
    if unknown:
        raise InvalidArgument(f"{path}: unknown key {sorted(unknown)[0]!r} beside a Sandbox object")
    spec = data.get("spec") or {}
    meta = data.get("metadata") or {}
    if not isinstance(spec, dict) or not isinstance(meta, dict):
        raise InvalidArgument(f"{path}: metadata and spec must be mappings")
    options = _flat(path, spec)
    if meta.get("labels"):
        options["labels"] = meta["labels"]
    if meta.get("namespace"):
        options["namespace"] = meta["namespace"]
    return options
