"""`moe-runtime scale --expert-actors N`: add or remove expert actors on the running cluster (runtime/scale.py).
Registered on cli.app by cli.py."""

from __future__ import annotations

import typer

from moe_runtime.cli import _emit_json, app, err


@app.command("scale")
def scale_cmd(
    expert_actors: int = typer.Option(..., "--expert-actors", min=1, help="how many expert actors to run on"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object as the last stdout line"),
) -> None:
    """Scale the running cluster's expert actors to N: experts move onto new actors (or off leaving ones) with
    their optimizer state, between training steps or while serving."""
    from moe_runtime.ops_cli import _handle_or_exit
    from moe_runtime.runtime.session import SessionError

    handle = _handle_or_exit()
    try:
        report = handle.scale(expert_actors)
    except SessionError as e:
        err.print(f"[red]error:[/red] {e}")
        raise typer.Exit(1) from None
    d = report.to_dict()
    err.print(f"expert actors {d['before']} -> {d['after']} in {d['seconds']:.2f} s "
              f"({d['bytes_moved'] / 2**20:.1f} MiB moved), placement v{d['placement_version']}")
    if as_json:
        _emit_json(d)
