"""`fsb agent ...`: hands its raw arguments to the agent's own parser.

The agent is started by `fsb server`'s local fleet (or a Kubernetes Pod), not typed by people,
so its flags are owned by `fastsandbox.agent.cli`; this verb only makes it reachable as `fsb`.
"""

from __future__ import annotations

import typer

CONTEXT = {"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []}


def agent(ctx: typer.Context) -> None:
    """Run one agent (started by fsb server; see `fsb agent --help`)."""
    from fastsandbox.agent.cli import main as agent_main

    raise typer.Exit(agent_main(list(ctx.args)))
