"""`infopt-pack devices` and `plan`: the device profiles, and the plan for a model on one."""

from __future__ import annotations

from typing import Any

import click

from infopt.cli.output import (
    MODEL_HELP,
    emit_json,
    executor_options,
    fmt_bytes,
    friendly_errors,
    json_option,
    quantize_option,
    rows,
    short_history,
    table,
)
from infopt.core.defaults import DEFAULT_MAX_CONTEXT
from infopt.plan.search import MIN_TOKENS


def _speculative_row(choice: dict[str, Any]) -> str:
    kind = choice.get("kind", "none")
    if kind == "self":
        return f"INT4 self-draft ({choice['draft']}), {fmt_bytes(choice['bytes'])} in the total"
    return "prompt lookup (n-gram), no draft memory" if kind == "ngram" else "none"


@click.command()
@click.option("--measure-bandwidth", is_flag=True, help="Measure the host's memory bandwidth.")
@json_option
@friendly_errors
def devices(measure_bandwidth: bool, as_json: bool) -> None:
    """List the device profiles (built in, plus `host` read from this machine).

    A profile of your own is any TOML file of the same schema; pass its path as --device.
    """
    from infopt.device_profiles import builtin_names, load_profile

    profiles = [load_profile(n, measure_bandwidth=measure_bandwidth) for n in builtin_names()]
    if as_json:
        emit_json([p.to_dict() for p in profiles])
        return
    table(
        ["name", "kind", "usable", "bandwidth", "weights", "compute", "runtimes", "description"],
        [
            (
                p.name,
                p.kind,
                fmt_bytes(p.usable_bytes),
                f"{p.bandwidth / 1e9:.0f} GB/s",
                ", ".join(p.weight_precisions),
                ", ".join(p.compute_precisions),
                ", ".join(p.runtimes),
                p.description,
            )
            for p in profiles
        ],
    )


@click.command()
@click.argument("model_arg", metavar="[MODEL]", required=False)
@click.option(
    "-m", "--model", help=MODEL_HELP + " A bare config.json is enough. (Or give it as MODEL.)"
)
@click.option(
    "-d",
    "--device",
    required=True,
    help="A profile name (see `infopt-pack devices`), `host`, or a .toml file.",
)
@click.option(
    "--context",
    type=click.IntRange(min=1),
    help=f"Tokens the KV cache must hold (default: min(model's, {DEFAULT_MAX_CONTEXT}), as "
    "`run` and `infopt.load` give it).",
)
@click.option(
    "--batch",
    "--slots",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Concurrent sequences: a server's --slots (each slot's KV cache of --context tokens "
    "also holds the prefix cache, so this counts both).",
)
@click.option(
    "--latency-ms",
    type=click.FloatRange(min=0, min_open=True),
    help="Per-token decode latency target.",
)
@click.option(
    "--scenario",
    type=click.Choice(["code-completion", "chat", "batch"]),
    help="A named latency target: code-completion 50 ms, chat 200 ms, batch none.",
)
@click.option("--measure-bandwidth", is_flag=True, help="For --device host: measure bandwidth.")
@click.option(
    "--speculative",
    type=click.Choice(["none", "auto", "self", "ngram"]),
    default="none",
    show_default=True,
    help="Plan room for a speculative draft: self = an INT4 copy of the model beside it; "
    "ngram = prompt lookup (no memory); auto = self when it fits and the model is above INT4.",
)
@quantize_option
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
@friendly_errors
def plan(
    model_arg: str | None,
    model: str | None,
    device: str,
    context: int | None,
    batch: int,
    latency_ms: float | None,
    scenario: str | None,
    measure_bandwidth: bool,
    speculative: str,
    quantize: str | None,
    as_json: bool,
) -> None:
    """Choose quantization, pruning and low-rank for MODEL on DEVICE, and explain why.

    \b
    Examples:
      infopt-pack plan --device host
      infopt-pack plan --device host --quantize int4
      infopt-pack plan --model llama-2-70b/config.json --device rtx4090-24gb --context 4096
      infopt-pack plan m.gguf --device apple-ane --scenario chat --json
    """
    if model_arg is not None and model is not None and model_arg != model:
        raise click.UsageError(f"two models, {model_arg!r} and --model {model!r}: give one")
    model = model if model is not None else model_arg
    from infopt.core.default_model import default_model_path
    from infopt.device_profiles import load_profile
    from infopt.importers import load_spec, stored_weights
    from infopt.plan.planner import SCENARIOS
    from infopt.plan.planner import plan as make_plan

    spec = load_spec(model if model is not None else default_model_path())
    profile = load_profile(device, measure_bandwidth=measure_bandwidth)
    target = latency_ms if latency_ms is not None else SCENARIOS.get(scenario or "")
    path = model if model is not None else default_model_path()
    p = make_plan(
        spec,
        profile,
        context=context,
        batch=batch,
        latency_ms=target,
        speculative=speculative,
        quantize=quantize,
        file_weights=stored_weights(path),
    )
    if as_json:
        click.echo(p.to_json())
        return
    est, c = p.predicted, p.compression
    table = [
        ("device", f"{profile.name} ({profile.description})"),
        (
            "runtime / compute",
            f"{p.runtime} / {p.compute_precision}"
            + (" / static shapes" if p.static_shapes else ""),
        ),
        ("weights", ", ".join(f"{g} {s}" for g, s in c["weights"].items())),
        ("KV cache", f"{c['kv_dtype']}, {p.context} tokens x batch {p.batch}"),
        ("pruning", f"MLP channels {c['mlp_prune']:.0%}" if c["mlp_prune"] else "none"),
        ("low-rank", f"{c['low_rank']:.0%} of block parameters" if c["low_rank"] else "none"),
        ("speculative", _speculative_row(p.speculative)),
        (
            "memory",
            f"{fmt_bytes(est['total'])} = weights {fmt_bytes(est['weights'])} + KV "
            f"{fmt_bytes(est['kv_cache'])} + activations "
            f"{fmt_bytes(est['activations'])} + overhead {fmt_bytes(est['overhead'])}"
            + (f" + draft {fmt_bytes(est['draft'])}" if est.get("draft") else ""),
        ),
        ("quick formula", f"{fmt_bytes(est['quick_formula'])} (params x bytes x 1.2)"),
        ("headroom", f"{fmt_bytes(p.headroom_bytes)} of {fmt_bytes(p.usable_memory)} usable"),
        (
            "decode",
            f"{est['decode_tok_s']:.1f} tok/s ({est['ms_per_token']:.1f} ms/token, "
            f"{est['bound']}-bound, {p.context // 2} tokens in the cache)" + short_history(est),
        ),
        ("prefill", f"{est['prefill_tok_s']:.0f} tok/s"),
    ]
    click.echo(f"plan: {c['name']}")
    rows(table, indent="  ")
    click.echo("why:")
    for reason in p.reasons:
        click.echo(f"  - {reason}")
    if p.rejected:
        click.echo("rejected (less lossy):")
        for r in p.rejected:
            click.echo(f"  - {r['option']}: {r['reason']}")


@click.command()
@click.argument("model", required=False)
@click.option(
    "-d",
    "--device",
    required=True,
    help="A profile name (see `infopt-pack devices`), `host` (speed measured here), or a .toml.",
)
@click.option(
    "--max-ppl-delta",
    type=float,
    help="Largest perplexity increase over the uncompressed model, as a fraction (0.05: 5 %). "
    "Default 0.05 when --latency-ms is not given either.",
)
@click.option(
    "--latency-ms",
    type=click.FloatRange(min=0, min_open=True),
    help="Per-token decode latency the plan must meet.",
)
@click.option(
    "--context",
    type=click.IntRange(min=1),
    help=f"Tokens the KV cache must hold (default: min(model's, {DEFAULT_MAX_CONTEXT})).",
)
@click.option(
    "--batch",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Concurrent sequences.",
)
@executor_options("candidates")
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Threads per candidate.",
)
@click.option("--wide", is_flag=True, help="More candidates: INT4 tables, symmetric INT4, ...")
@click.option(
    "--no-gptq", "no_gptq", is_flag=True, help="Leave out the GPTQ candidates (the slow ones)."
)
@click.option(
    "--text",
    "text_file",
    type=click.Path(exists=True, dir_okay=False),
    help="Held-out UTF-8 text to score on (default: a short text shipped with infopt).",
)
@click.option(
    "--tokens",
    type=click.IntRange(min=MIN_TOKENS),
    default=1024,
    show_default=True,
    help="Held-out tokens.",
)
@click.option(
    "-o",
    "--out",
    "plan_out",
    type=click.Path(dir_okay=False),
    default="search-plan.json",
    show_default=True,
    help="Where the chosen plan is written, for `build --plan`.",
)
@click.option("--plot", type=click.Path(dir_okay=False), help="Draw the front to this PNG.")
@json_option
@friendly_errors
def search(
    model: str | None,
    device: str,
    max_ppl_delta: float | None,
    latency_ms: float | None,
    context: int | None,
    batch: int,
    executor: str,
    address: str | None,
    workers: int,
    threads: int,
    wide: bool,
    no_gptq: bool,
    text_file: str | None,
    tokens: int,
    plan_out: str,
    plot: str | None,
    as_json: bool,
) -> None:
    """Compress and measure every candidate plan that fits a device; keep the best trade-off.

    Each candidate (INT8, INT4 at each group size by RTN and GPTQ, pruned MLPs, ...) is
    compressed for real and scored on held-out text against the uncompressed model
    (perplexity, KL, top-1); on `--device host` its decode speed is measured, elsewhere
    predicted. Results are cached by content, so a rerun or a --wide search only computes what
    is new. Prints the Pareto front of size, perplexity and speed, and writes the smallest plan
    within the bounds for `infopt-pack build MODEL --plan search-plan.json`.

    \b
    Examples:
      infopt-pack search --device host
      infopt-pack search model.gguf --device rtx4090-24gb --max-ppl-delta 0.02
      infopt-pack search model.gguf --device host --executor ray --address auto
    """
    from infopt.plan.search import search as run_search

    def heard(row: dict[str, Any]) -> None:
        if not as_json:
            where = "cached" if row.get("cached") else f"{row['seconds']:.1f} s"
            click.echo(
                f"  {row['name']}: perplexity {row['perplexity']:.3f} "
                f"({row['ppl_delta']:+.2%}), {row['bytes'] / 1e6:,.1f} MB, "
                f"{row['tok_s']:.1f} tok/s ({where})",
                err=True,
            )

    out = run_search(
        model,
        device,
        context=context,
        batch=batch,
        max_ppl_delta=max_ppl_delta,
        latency_ms=latency_ms,
        executor=executor,
        address=address,
        workers=workers,
        wide=wide,
        gptq=not no_gptq,
        text_file=text_file,
        tokens=tokens,
        threads=threads,
        plan_out=plan_out,
        on_result=heard,
    )
    if plot:
        from infopt.plan.search import plot_front

        plot_front(out, plot)
    if as_json:
        emit_json(out)
        return
    front = set(out["front"])
    table(
        ["candidate", "weights", "memory", "perplexity", "change", "KL", "top-1", "tok/s", "front"],
        [
            (
                r["name"],
                f"{r['bytes'] / 1e6:,.1f} MB",
                f"{r['memory_bytes'] / 1e6:,.1f} MB",
                f"{r['perplexity']:.3f}",
                f"{r['ppl_delta']:+.2%}",
                f"{r['kl']:.4f}",
                f"{r['top1']:.3f}",
                f"{r['tok_s']:.1f} {'measured' if r['speed'] == 'measured' else 'predicted'}",
                "yes" if r["name"] in front else "",
            )
            for r in out["results"]
        ],
        title=f"{out['model']} on {out['device']}",
    )
    for failure in out["failures"]:
        click.echo(f"failed: {failure['name']}: {failure['error']}", err=True)
    if out["chosen"] is None:
        raise click.ClickException(
            "no candidate meets the bounds; loosen --max-ppl-delta / --latency-ms"
        )
    click.echo(f"chosen: {out['chosen']}; plan written to {out['plan_file']}")
    target = f" {model}" if model else ""
    click.echo(f"build it: infopt-pack build{target} --plan {out['plan_file']} -o BUNDLE")
