"""``robustcaps models``: list built-in architectures and zoo checkpoints."""

from __future__ import annotations

import json

import click


def model_table() -> list[dict]:
    """One row per built-in architecture and per zoo model (API of ``robustcaps models``)."""
    from ..models.registry import architectures, count_params, create_model
    from ..models.zoo import list_zoo

    rows = []
    for name, arch in sorted(architectures().items()):
        model = create_model(name)
        rows.append({
            "name": name,
            "kind": "architecture",
            "params": count_params(model),
            "num_classes": arch.num_classes,
            "input_shape": list(arch.input_shape),
            "outputs": arch.outputs,
            "description": arch.description,
        })
    for name, entry in sorted(list_zoo().items()):
        card = entry.card
        rows.append({
            "name": name,
            "kind": "zoo",
            "arch": card.get("arch"),
            "params": card.get("params"),
            "num_classes": card.get("num_classes"),
            "input_shape": card.get("input_shape"),
            "dataset": card.get("dataset"),
            "test_error": card.get("test_error"),
            "sha256": card.get("sha256"),
            "path": str(entry.path),
            "description": card.get("description", ""),
        })
    return rows


@click.command("models")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def command(as_json: bool) -> None:
    """List built-in architectures and trained zoo models."""
    rows = model_table()
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    header = f"{'name':<18} {'kind':<13} {'params':>10} {'classes':>7} {'input':<10} test error"
    click.echo(header)
    click.echo("-" * len(header))
    for r in rows:
        err = r.get("test_error")
        err_s = ", ".join(f"{k} {v:.2%}" for k, v in err.items() if v is not None) \
            if isinstance(err, dict) else "-"
        shape = "x".join(map(str, r["input_shape"] or []))
        click.echo(f"{r['name']:<18} {r['kind']:<13} {r['params'] or 0:>10,} {r['num_classes']:>7} {shape:<10} {err_s}")
