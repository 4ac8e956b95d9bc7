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


def verify_zoo() -> dict[str, list[str]]:
    """Problems of each zoo entry by name (empty list: card complete, sha256 matches)."""
    from ..models.zoo import list_zoo, verify_entry

    return {name: verify_entry(entry) for name, entry in sorted(list_zoo().items())}


@click.command("models")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--verify", is_flag=True,
              help="Check every zoo entry's card and weights sha256 (exit 2 on a problem).")
@click.option("--card", "card_name", metavar="NAME", default=None,
              help="Print the model card (Markdown) of a zoo model.")
def command(as_json: bool, verify: bool, card_name: str | None) -> None:
    """List built-in architectures and trained zoo models."""
    from ..errors import ModelLoadError

    if card_name is not None:
        from ..models.zoo import list_zoo, render_card_markdown

        entry = list_zoo().get(card_name)
        if entry is None:
            raise ModelLoadError(f"no zoo model named {card_name!r}; see `robustcaps models`")
        md = entry.path / "card.md"
        click.echo(md.read_text() if md.is_file() else render_card_markdown(entry.card))
        return
    if verify:
        problems = verify_zoo()
        for name, probs in problems.items():
            click.echo(f"{name}: {'ok' if not probs else '; '.join(probs)}")
        bad = sorted(n for n, p in problems.items() if p)
        if bad:
            raise ModelLoadError(f"zoo entries with problems: {', '.join(bad)}")
        return
    rows = model_table()
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    header = (f"{'name':<18} {'kind':<13} {'params':>10} {'classes':>7} {'input':<10} "
              f"{'dataset':<10} test error")
    click.echo(header)
    click.echo("-" * len(header))
    for r in rows:
        err = r.get("test_error")
        err_s = ", ".join(f"{k} {v:.2%}" for k, v in err.items() if v is not None) \
            if isinstance(err, dict) else "-"
        shape = "x".join(map(str, r["input_shape"] or []))
        click.echo(f"{r['name']:<18} {r['kind']:<13} {r['params'] or 0:>10,} {r['num_classes']:>7} "
                   f"{shape:<10} {r.get('dataset') or '-':<10} {err_s}")
