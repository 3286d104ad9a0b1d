"""`fsb list [-A]`: sandboxes as a table, or `{"items": [...]}` with `-o json|yaml`."""

from __future__ import annotations

from fastsandbox.cli.options import (
    AllNamespaces,
    Endpoint,
    Namespace,
    Output,
    OutputOpt,
    TokenFile,
    client,
)


def list_(
    all_namespaces: AllNamespaces = False,
    output: OutputOpt = Output.table,
    endpoint: Endpoint = None,
    token_file: TokenFile = None,
    namespace: Namespace = None,
) -> None:
    """List sandboxes (NAMESPACE with -A, NAME, PHASE, AGENT, ENDPOINTS, AGE)."""
    from fastsandbox.cli import render

    with client(endpoint, token_file, namespace) as fsb:
        items = fsb.list_raw(all_namespaces=all_namespaces)
    if output is Output.table:
        render.sandbox_table(items, all_namespaces)
    else:
        render.structured({"items": items}, output)
