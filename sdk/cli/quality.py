"""`infopt-pack eval` and `distill`: what compression costs, and recovering from it."""

from __future__ import annotations

import click

from infopt.cli.output import Bars, emit_json, fields, friendly_errors, json_option


@click.command(name="eval")
@click.argument("model", required=False)
@click.option(
    "--text",
    "text_file",
    required=True,
    type=click.Path(exists=True, dir_okay=False),
    help="A UTF-8 text file to score (keep it apart from any calibration text).",
)
@click.option(
    "--quantize",
    help="Also quantize the blocks (int8, int4-g32, int4s-g64, ...; "
    "embeddings and LM head int8) and compare with the unquantized model.",
)
@click.option(
    "--weights",
    type=click.Path(exists=True, dir_okay=False),
    help="An infopt weight file made from MODEL (pruned, distilled, ...): compare it with MODEL.",
)
@click.option(
    "--method",
    type=click.Choice(["rtn", "gptq"]),
    help="How --quantize rounds: rtn (round to nearest) or gptq; by default gptq with "
    "--calibration, else rtn, as `build --quantize` rounds.",
)
@click.option(
    "--calibration",
    type=click.Path(exists=True, dir_okay=False),
    help="Calibration text for GPTQ (default: the text shipped with infopt).",
)
@click.option(
    "--window",
    type=click.IntRange(min=2),
    help="Tokens per window (default: 512, or the model's context if less).",
)
@click.option("--stride", type=click.IntRange(min=1), help="Window step (default: half a window).")
@click.option(
    "--max-tokens", type=click.IntRange(min=2), help="Score only the first N tokens of the text."
)
@click.option("--threads", type=click.IntRange(min=1), help="CPU threads.")
@json_option
@friendly_errors
def evaluate_cmd(
    model: str | None,
    text_file: str,
    quantize: str | None,
    weights: str | None,
    method: str | None,
    calibration: str | None,
    window: int | None,
    stride: int | None,
    max_tokens: int | None,
    threads: int | None,
    as_json: bool,
) -> None:
    """Perplexity of MODEL on a text; with --quantize or --weights, also KL divergence and
    top-1 agreement of the compressed model against MODEL, on the same positions.

    \b
    Examples:
      infopt-pack eval --text held_out.txt
      infopt-pack eval --text held_out.txt --quantize int4-g32 --method gptq --json
      infopt-pack eval --text held_out.txt --weights draft.safetensors
    """
    import infopt

    bars = Bars(quiet=as_json)
    try:
        result = infopt.evaluate(
            model,
            text_file,
            quantize=quantize,
            weights=weights,
            method=method,
            calibration=calibration,
            window=window,
            stride=stride,
            max_tokens=max_tokens,
            threads=threads,
            progress=bars,
        )
    finally:
        bars.close()
    if as_json:
        emit_json(result)
        return
    fields(result, 20)


@click.command()
@click.argument("teacher", required=False)
@click.option(
    "-o", "--out", required=True, type=click.Path(dir_okay=False), help="Student weight file."
)
@click.option(
    "--student",
    type=click.Path(exists=True, dir_okay=False),
    help="An infopt weight file to recover (e.g. a pruned or low-rank TEACHER).",
)
@click.option(
    "--layers",
    type=click.IntRange(min=1),
    help="Or: a draft model of N of TEACHER's layers (evenly spread).",
)
@click.option(
    "--text",
    "text_file",
    type=click.Path(exists=True, dir_okay=False),
    help="Training text (default: text TEACHER samples itself, see --generate).",
)
@click.option(
    "--generate",
    "generate_n",
    type=click.IntRange(min=1),
    default=64,
    show_default=True,
    help="Without --text: how many sequences TEACHER samples to train on.",
)
@click.option(
    "--seq-len",
    type=click.IntRange(min=2),
    default=256,
    show_default=True,
    help="Tokens per sequence.",
)
@click.option("--steps", type=click.IntRange(min=1), default=200, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=4, show_default=True)
@click.option("--lr", type=float, default=2e-4, show_default=True, help="Peak AdamW rate.")
@click.option("--temperature", type=float, default=2.0, show_default=True)
@click.option(
    "--alpha", type=float, default=0.9, show_default=True, help="Weight of the KL term vs labels."
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--state",
    type=click.Path(dir_okay=False),
    help="Resumable state file (default: OUT.state). An existing one is resumed.",
)
@click.option("--threads", type=click.IntRange(min=1), help="CPU threads.")
@json_option
@friendly_errors
def distill(
    teacher: str | None,
    out: str,
    student: str | None,
    layers: int | None,
    text_file: str | None,
    generate_n: int,
    seq_len: int,
    steps: int,
    batch_size: int,
    lr: float,
    temperature: float,
    alpha: float,
    seed: int,
    state: str | None,
    threads: int | None,
    as_json: bool,
) -> None:
    """Train a student to imitate TEACHER (default: the default model) on the CPU: recover a
    pruned/low-rank model (--student) or make a draft model for speculative decoding
    (--layers). Interrupt it any time; the same command resumes from the state file.

    \b
    Examples:
      infopt-pack distill --layers 8 --steps 300 -o draft.safetensors
      infopt-pack distill --student pruned.safetensors --text corpus.txt -o healed.safetensors
      infopt-pack eval --text held_out.txt --weights healed.safetensors
    """
    import infopt
    from infopt.compress.distill import DistillConfig

    config = DistillConfig(
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        temperature=temperature,
        alpha=alpha,
        seed=seed,
        warmup=min(10, steps // 10),
    )
    bars = Bars(quiet=as_json)
    try:
        summary = infopt.distill(
            teacher,
            out,
            student=student,
            layers=layers,
            text=text_file,
            generate=generate_n,
            seq_len=seq_len,
            config=config,
            state=state,
            threads=threads,
            progress=bars,
        )
    finally:
        bars.close()
    if as_json:
        emit_json(summary)
        return
    fields(summary, 14, skip_none=False)
