"""`infopt-pack`: the command line, one thin module per group of commands; each command parses
its options and calls the library function the Python API calls too. Every command takes
--json for scripts."""

from __future__ import annotations

import click

from infopt.cli import bundle, cache, chat, info, plan, quality, run, serve


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="infopt")
def main() -> None:
    """infopt: plan, compress, package and run LLMs on edge devices and desktops.

    \b
    Try:
      infopt-pack run --prompt "Explain KV caching in one paragraph."
      infopt-pack inspect
    """


for command in (
    run.run,
    chat.chat,
    serve.serve,
    info.inspect,
    plan.devices,
    plan.plan,
    plan.search,
    quality.evaluate_cmd,
    quality.distill,
    bundle.build,
    bundle.unpack,
    bundle.verify,
    bundle.keygen,
    bundle.bench,
    cache.cache,
):
    main.add_command(command)
