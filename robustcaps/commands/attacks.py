"""``robustcaps attacks``: the registered attacks and the backends implementing each."""

from __future__ import annotations

import json

import click


@click.command("attacks")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def command(as_json: bool) -> None:
    """List the attacks ``robustcaps evaluate --attack`` accepts.

    Backend native is the built-in sweep engine (robustcaps.attacks.native);
    torchattacks and foolbox run the same attack through those libraries. Besides these,
    --attack transfer crafts on a source model and evaluates target models.
    """
    from ..attacks import attack_entry, list_attacks

    rows = [{"name": n, "backends": list(attack_entry(n).backends),
             "description": attack_entry(n).description} for n in list_attacks()]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        click.echo(f"{r['name']:<{width}}  [{', '.join(r['backends'])}]  {r['description']}")
