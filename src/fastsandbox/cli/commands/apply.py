"""`fsb apply -f FILE`: make Sandbox and SandboxPool objects in a YAML file exist as written.

Every document is validated before anything is sent. Pools go first (a sandbox needs its pool).
An absent object is created; a present pool gets its spec replaced (`UpdatePool`; its runtime
cannot change); a present sandbox gets the mutable fields the document names (expireTime, labels,
failurePolicy, recoveryTimeoutSeconds) through `Update`, while a changed immutable field (image,
command, ...) is an error: delete and re-create it. A field the document leaves out is kept.

A new sandbox is created like `fsb run`: its pool may still be starting agents (a pool applied in
the same file, or scaling up for it), so a create that finds no free slot is retried until
`--timeout`; the pool scales up in the background meanwhile.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from fastsandbox.cli.options import Endpoint, Namespace, TokenFile, client

if TYPE_CHECKING:
    from fastsandbox.api.models import Sandbox, SandboxPool
    from fastsandbox.errors import FsbError
    from fastsandbox.sdk.sync import Client

# Sandbox spec fields `Update` cannot change.
IMMUTABLE = (
    "image",
    "pool_ref",
    "command",
    "args",
    "env",
    "working_dir",
    "exposed_ports",
    "resources",
    "lease_seconds",
)


# Bounds on what `fsb apply` reads: a manifest of sandboxes and pools is kilobytes; these stop a
# mistaken file (a log, a binary) or a YAML alias bomb (a few lines whose aliases expand to
# billions of nodes, which validation would walk) before they cost time or memory.
MAX_APPLY_BYTES = 1024 * 1024
MAX_YAML_NODES = 100_000


@dataclass(frozen=True, slots=True)
class Document:
    index: int
    kind: str
    obj: Sandbox | SandboxPool


def load_documents(text: str, namespace: str) -> list[Document]:
    """Parse and validate every document; errors name the document (1-based) and the field."""
    import yaml

    from fastsandbox.api.labels import API_VERSION
    from fastsandbox.api.models import Sandbox, SandboxPool, describe_validation_error
    from fastsandbox.errors import InvalidArgument

    size = len(text.encode(errors="surrogatepass"))
    if size > MAX_APPLY_BYTES:
        raise InvalidArgument(
            f"the file is {size} bytes; fsb apply reads at most {MAX_APPLY_BYTES} bytes "
            "(split it into several files)"
        )
    try:
        _check_expanded_size(yaml.compose_all(text, Loader=yaml.SafeLoader))
        raw_docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        raise InvalidArgument(f"not valid YAML: {exc}") from None
    except RecursionError:
        raise InvalidArgument("not valid YAML: nested too deeply") from None
    if not raw_docs:
        raise InvalidArgument("no documents to apply")
    docs: list[Document] = []
    for i, raw in enumerate(raw_docs, start=1):
        if not isinstance(raw, dict):
            raise InvalidArgument(f"document {i}: expected a mapping with kind, metadata, spec")
        kind = raw.get("kind")
        model: type[Sandbox] | type[SandboxPool]
        if kind == "Sandbox":
            model = Sandbox
        elif kind == "SandboxPool":
            model = SandboxPool
        else:
            raise InvalidArgument(
                f"document {i}: kind must be Sandbox or SandboxPool, got {kind!r}"
            )
        body = {k: v for k, v in raw.items() if k != "status"}
        body.setdefault("apiVersion", API_VERSION)
        raw_meta = body.get("metadata") or {}
        if not isinstance(raw_meta, dict):
            raise InvalidArgument(
                f"document {i} ({kind} ?): metadata: expected a mapping with name, got "
                f"{type(raw_meta).__name__}"
            )
        meta = dict(raw_meta)
        meta["namespace"] = meta.get("namespace") or namespace
        body["metadata"] = meta
        try:
            obj = model.model_validate(body)
        except ValueError as exc:
            from pydantic import ValidationError

            detail = (
                describe_validation_error(exc) if isinstance(exc, ValidationError) else str(exc)
            )
            name = meta.get("name", "?")
            raise InvalidArgument(f"document {i} ({kind} {name}): {detail}") from None
        docs.append(Document(i, kind, obj))
    # Pools first, each kind in file order.
    return sorted(docs, key=lambda d: (d.kind != "SandboxPool", d.index))


def _check_expanded_size(documents: Iterable[Any]) -> None:
    """Refuse YAML whose nodes, aliases expanded, exceed MAX_YAML_NODES (an alias bomb)."""
    from fastsandbox.errors import InvalidArgument

    count = 0
    for root in documents:
        stack = [root] if root is not None else []
        while stack:
            node = stack.pop()
            count += 1
            if count > MAX_YAML_NODES:
                raise InvalidArgument(
                    f"the YAML expands to more than {MAX_YAML_NODES} nodes (aliases included); "
                    "fsb apply refuses it"
                )
            value = node.value
            if isinstance(value, list):
                for item in value:
                    stack.extend(item if isinstance(item, tuple) else (item,))


def apply_pool(fsb: Client, doc: Document) -> str:
    from fastsandbox.api.models import SandboxPool
    from fastsandbox.errors import NotFound

    pool = doc.obj
    assert isinstance(pool, SandboxPool)
    ns, name = pool.metadata.namespace, pool.metadata.name
    try:
        current = fsb.get_pool(name, namespace=ns)
    except NotFound:
        fsb.create_pool_object(pool, namespace=ns)
        return f"pool {ns}/{name} created"
    if current.spec == pool.spec:
        return f"pool {ns}/{name} unchanged"
    fsb.update_pool(pool, namespace=ns)
    return f"pool {ns}/{name} configured"


def apply_sandbox(fsb: Client, doc: Document, timeout: float) -> str:
    from fastsandbox.api.models import Sandbox, SandboxSpec
    from fastsandbox.errors import InvalidArgument, NotFound

    sb = doc.obj
    assert isinstance(sb, Sandbox)
    ns, name = sb.metadata.namespace, sb.metadata.name
    try:
        current = fsb.get(name, namespace=ns)
    except NotFound:
        _create(fsb, sb, timeout)
        return f"sandbox {ns}/{name} created"
    # What the document names, however it spells it (camelCase or snake_case).
    given = sb.spec.model_fields_set
    changed = [
        f"spec.{SandboxSpec.model_fields[field].alias}"
        for field in IMMUTABLE
        if field in given and getattr(sb.spec, field) != getattr(current.spec, field)
    ]
    if changed:
        raise InvalidArgument(
            f"sandbox {ns}/{name}: {', '.join(changed)} cannot change; "
            f"delete it (`fsb delete {name}`) and apply again"
        )
    if "reset_revision" in given and sb.spec.reset_revision != current.spec.reset_revision:
        raise InvalidArgument(
            f"sandbox {ns}/{name}: spec.resetRevision cannot be set by apply yet "
            f"(the Update call has no reset revision); use `fsb reset {name}`"
        )
    update: dict[str, Any] = {}
    if "expire_time" in given:
        if sb.spec.expire_time is None:
            if current.spec.expire_time is not None:
                update["no_expiry"] = True
        elif sb.spec.expire_time != current.spec.expire_time:
            update["expire_time"] = sb.spec.expire_time
    if "failure_policy" in given and sb.spec.failure_policy != current.spec.failure_policy:
        update["failure_policy"] = sb.spec.failure_policy.value
    if (
        "recovery_timeout_seconds" in given
        and sb.spec.recovery_timeout_seconds != current.spec.recovery_timeout_seconds
    ):
        update["recovery_timeout"] = sb.spec.recovery_timeout_seconds
    if "labels" in sb.metadata.model_fields_set:
        want, have = sb.metadata.labels, current.metadata.labels
        labels: dict[str, str | None] = {k: v for k, v in want.items() if have.get(k) != v}
        labels.update({k: None for k in have if k not in want})
        if labels:
            update["labels"] = labels
    if not update:
        return f"sandbox {ns}/{name} unchanged"
    fsb.update(name, namespace=ns, **update)
    return f"sandbox {ns}/{name} configured"


def _create(fsb: Client, sb: Sandbox, timeout: float) -> None:
    from fastsandbox.errors import CapacityExhausted

    spec = sb.spec
    options: dict[str, Any] = {
        "pool": spec.pool_ref,
        "command": spec.command,
        "args": spec.args,
        "env": [{"name": e.name, "value": e.value} for e in spec.env],
        "working_dir": spec.working_dir,
        "ports": spec.exposed_ports,
        "failure_policy": spec.failure_policy.value,
        "recovery_timeout": spec.recovery_timeout_seconds,
        "labels": sb.metadata.labels,
        "namespace": sb.metadata.namespace,
    }
    if spec.expire_time is not None:
        options["expire_time"] = spec.expire_time
    resources = spec.resources.model_dump(exclude_none=True)
    if resources:
        options["resources"] = resources
    if spec.lease_seconds is not None:
        options["lease"] = spec.lease_seconds
    deadline = time.monotonic() + timeout
    delay = 0.2
    while True:
        try:
            fsb.create(sb.metadata.name, spec.image, **options)
            return
        except CapacityExhausted:
            if time.monotonic() + delay > deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 1.5, 2.0)


def apply(
    filename: Annotated[
        str,
        typer.Option(
            "-f",
            "--filename",
            metavar="FILE",
            help="YAML file with Sandbox and SandboxPool documents ('-' reads stdin).",
            show_default=False,
        ),
    ],
    timeout: Annotated[
        float,
        typer.Option(
            "--timeout",
            metavar="SECONDS",
            help="How long a new sandbox may wait for a free slot.",
        ),
    ] = 60.0,
    endpoint: Endpoint = None,
    token_file: TokenFile = None,
    namespace: Namespace = None,
) -> None:
    """Create or update the sandboxes and pools described in a YAML file."""
    from fastsandbox.cli import render
    from fastsandbox.errors import FsbError, InvalidArgument

    if filename == "-":
        text = sys.stdin.read()
    else:
        try:
            text = Path(filename).read_text()
        except OSError as exc:
            raise InvalidArgument(f"cannot read {filename}: {exc.strerror or exc}") from None
    with client(endpoint, token_file, namespace) as fsb:
        docs = load_documents(text, fsb.namespace)
        failures: list[FsbError] = []
        for doc in docs:
            try:
                if doc.kind == "SandboxPool":
                    line = apply_pool(fsb, doc)
                else:
                    line = apply_sandbox(fsb, doc, timeout)
            except FsbError as err:
                failures.append(err)
                continue
            typer.echo(line)
    for failure in failures[:-1]:
        render.error(failure.message)
    if failures:
        raise failures[-1]
