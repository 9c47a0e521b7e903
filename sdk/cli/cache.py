"""`infopt-pack cache ls|clear`: the model files converted for a runtime and kept (see
`infopt.bundle.cache`)."""

from __future__ import annotations

from pathlib import Path

import click

from infopt.cli.output import emit_json, friendly_errors, json_option, table


@click.group()
def cache() -> None:
    """The converted model files kept in the cache ($INFOPT_CACHE, else the user cache
    directory): `run model.gguf` converts a file once for its runtime and loads the result
    afterwards."""


@cache.command(name="ls")
@json_option
@friendly_errors
def list_entries(as_json: bool) -> None:
    """List the cached conversions: model, runtime, size, when made, where."""
    from infopt.bundle.cache import cache_root, entries

    found = entries()
    if as_json:
        emit_json({"root": str(cache_root()), "entries": found})
        return
    if not found:  # a title and no rows would read as a table that failed to print
        click.echo(f"{cache_root()}: empty (a model file is converted there on first load)")
        return
    total = sum(e["bytes"] for e in found) / 1e6
    title = f"{cache_root()}: {entries_phrase(len(found))}, {total:.1f} MB"
    cells = [
        (e["model"], e["runtime"], f"{e['bytes'] / 1e6:.1f} MB", e["created"], Path(e["path"]).name)
        for e in found
    ]
    table(["model", "runtime", "size", "made", "where (in the folder above)"], cells, title=title)


def entries_phrase(n: int) -> str:
    return f"{n} entry" if n == 1 else f"{n} entries"


@cache.command()
@json_option
@friendly_errors
def clear(as_json: bool) -> None:
    """Remove every cached conversion (they are made again on the next load)."""
    from infopt.bundle.cache import cache_root
    from infopt.bundle.cache import clear as clear_cache

    removed = clear_cache()
    if as_json:
        emit_json({"root": str(cache_root()), "removed": removed})
        return
    freed = sum(e["bytes"] for e in removed) / 1e6
    click.echo(f"{cache_root()}: removed {entries_phrase(len(removed))}, {freed:.1f} MB")
