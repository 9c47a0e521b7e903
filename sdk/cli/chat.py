"""`infopt-pack chat`: a multi-turn conversation in the terminal, streaming each answer.

Every turn sends the whole conversation; the model's prefix cache keeps that cheap, since only
the new message is prefilled. Answers go to stdout; the banner, notes, errors and the stats
footer go to stderr, so a script piping lines in reads the answers alone."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from infopt.cli.output import Bars, friendly_errors
from infopt.core.defaults import DEFAULT_MAX_CONTEXT, DEFAULT_MAX_NEW_TOKENS
from infopt.errors import InfoptError

if TYPE_CHECKING:
    from infopt.api import Model
    from infopt.decode.generate import GenerationResult, TextStream

COMMANDS = """\
/reset        forget the conversation (the system message stays)
/system TEXT  set the system message (alone: show it)
/help         this list
/exit         quit (Ctrl-D too)
// sends a line that starts with / (//etc/hosts: "/etc/hosts").
In a terminal, a line ending in \\ continues on the next line (read from a pipe, each line
is one message). Ctrl-C stops an answer."""
HISTORY_LENGTH = 1000
PROMPT = "\001\033[1;32m\002>>> \001\033[0m\002"  # \001 \002: readline's zero-width markers


class BadInput(Exception):
    """A line the chat refuses (an unknown command); the conversation goes on."""


@dataclass
class Conversation:
    system: str | None = None
    turns: list[dict[str, str]] = field(default_factory=list)  # user, assistant, user, ...

    def messages(self) -> list[dict[str, str]]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.turns


@click.command(epilog="\b\nIn the chat:\n" + COMMANDS)
@click.argument("model", required=False)
@click.option("--runtime", help="The runtime to run on, or a bundle's artifact (as for `run`).")
@click.option(
    "--threads", type=click.IntRange(min=1), help="CPU threads (default: the runtime's choice)."
)
@click.option(
    "--context",
    "--max-context",
    "max_context",
    type=click.IntRange(min=1),
    help=f"KV-cache size in tokens (default: min(model, {DEFAULT_MAX_CONTEXT}); a bundle's: the "
    "context it was built for). The oldest turns are dropped when the conversation outgrows it.",
)
@click.option("--system", help="System message (change it later with /system TEXT).")
@click.option(
    "-n",
    "--max-tokens",
    "--max-new-tokens",
    "max_tokens",
    default=DEFAULT_MAX_NEW_TOKENS,
    show_default=True,
    type=click.IntRange(min=1),
    help="Longest answer, in tokens.",
)
@click.option(
    "--temperature",
    type=click.FloatRange(min=0),
    help="0 = greedy (the default unless the model's generation config says otherwise).",
)
@click.option(
    "--seed",
    type=click.IntRange(min=0),
    help="Seed for sampling; the same seed gives the same answers (without speculation, whose "
    "draft length follows measured timings).",
)
@click.option(
    "--numerics",
    type=click.Choice(["fast", "exact"]),
    default="fast",
    show_default=True,
    help="How quantized weights compute (as for `run`): fast = each runtime's fastest kernels; "
    "exact = float32 activations against the stored weights on every CPU.",
)
@click.option("--no-stats", is_flag=True, help="No stats line after each answer.")
@friendly_errors
def chat(
    model: str | None,
    runtime: str | None,
    threads: int | None,
    max_context: int | None,
    system: str | None,
    max_tokens: int,
    temperature: float | None,
    seed: int | None,
    numerics: str,
    no_stats: bool,
) -> None:
    """Chat with MODEL (a bundle, a GGUF file or a Hugging Face folder; default: the default
    model): type a message, read the answer as it streams, go on. Line editing and history
    (kept between sessions) where Python has readline. When stdin is not a terminal, each
    line is one user message and only the answers are printed, so chats can be scripted (the
    exit code is 1 if any line was refused).

    \b
    Examples:
      infopt-pack chat
      infopt-pack chat ./Qwen2-0.5B-Instruct --system "Answer in French." --temperature 0.7
      printf 'Hi!\\nAnd in one word?\\n' | infopt-pack chat --no-stats
    """
    import infopt

    interactive = sys.stdin.isatty()
    bars = Bars()  # a model file's first conversion for its runtime
    try:
        m = infopt.load(
            model,
            threads=threads,
            max_context=max_context,
            runtime=runtime,
            progress=bars,
            numerics=numerics,
        )
    finally:
        bars.close()
    if not m.tokenizer.chat_template:
        raise click.ClickException(
            f"{m.source or 'this model'} has no chat template, so it cannot chat; "
            "`infopt-pack run --raw` sends it plain text"
        )
    why = no_room_for_chat(m)
    if why and max_context is not None:
        raise click.BadParameter(f"{m.runtime.max_context} {why}", param_hint="--context")
    if why:
        raise click.ClickException(f"the model's context of {m.runtime.max_context} tokens {why}")
    settings: dict[str, Any] = {"max_new_tokens": max_tokens, "seed": seed}
    if temperature is not None:
        settings["temperature"] = temperature
    conv = Conversation(system=system)
    save_history = _history() if interactive else None
    if interactive:
        note(
            f"{m.source or 'default model'} on {m.runtime.name}, context {m.runtime.max_context}"
            " tokens. /help for commands, Ctrl-D to quit."
        )
    failures = 0
    try:
        for line in _lines(interactive):
            if not line.strip():
                continue
            try:
                if line.startswith("/") and not line.startswith("//"):
                    if not command(line, conv):
                        break
                    continue
                text = line[1:] if line.startswith("//") else line
                turn(m, conv, text, settings, stats=not no_stats, interactive=interactive)
            except (BadInput, InfoptError) as e:
                failures += 1
                name = "" if isinstance(e, BadInput) else f"{type(e).__name__}: "
                click.echo(click.style(f"error: {name}{e}", fg="red"), err=True)
    finally:
        if save_history is not None:
            save_history()
    if failures and not interactive:
        sys.exit(1)  # a script learns that some of its lines were refused


def command(line: str, conv: Conversation) -> bool:
    """Carry out a slash command; False ends the chat."""
    name, *rest = line[1:].split(None, 1) or [""]
    arg = rest[0].strip() if rest else ""
    if name in ("exit", "quit"):
        return False
    if name == "reset":
        conv.turns.clear()
        note("(conversation cleared)")
    elif name == "system":
        if arg:
            conv.system = arg
            note("(system message set)")
        else:
            note(f"system message: {conv.system or '(none)'}")
    elif name == "help":
        note(COMMANDS)
    else:
        raise BadInput(f"unknown command '/{name}'; /help lists the commands")
    return True


def turn(
    m: Model,
    conv: Conversation,
    text: str,
    settings: dict[str, Any],
    stats: bool,
    interactive: bool,
) -> None:
    """One exchange: the user's message in, the answer streamed out and kept in `conv`. A
    message the model refuses (too long, say) leaves `conv` as it was."""
    conv.turns.append({"role": "user", "content": text})
    try:
        stream, first, dropped = _start(m, conv, settings)
    except KeyboardInterrupt:
        conv.turns.pop()
        if not interactive:
            raise
        click.echo(err=True)
        note(click.style("[stopped]", dim=True))
        return
    except BaseException:
        conv.turns.pop()
        raise
    if dropped:
        note(f"(the {dropped} oldest messages were dropped to fit the context)")
    parts = [first] if first else []
    click.echo(first or "", nl=False)
    stopped = False
    try:
        for delta in stream:
            click.echo(delta, nl=False)
            parts.append(delta)
    except KeyboardInterrupt:
        if not interactive:
            raise
        stopped = True
    finally:
        stream.close()
    click.echo()
    conv.turns.append({"role": "assistant", "content": "".join(parts)})
    if stats:
        result = stream.result
        note(click.style(footer(result) if result and not stopped else "[stopped]", dim=True))


def _start(m: Model, conv: Conversation, settings: dict[str, Any]) -> tuple[TextStream, str, int]:
    """A stream of the answer and its first delta. The answer gets at most the room the context
    leaves beside the conversation, and the oldest exchanges are dropped while that room is
    under the smaller of -n and a quarter of the context: a long conversation keeps its latest
    turns, a small context (or a long -n) still gets answers. Returns (stream, first delta,
    messages dropped)."""
    limit, context = settings["max_new_tokens"], m.runtime.max_context
    floor = max(1, min(limit, context // 4))
    dropped = 0
    while True:
        room = context - len(m.encode_prompt(conv.messages()))
        if room >= floor or len(conv.turns) < 3:
            break
        del conv.turns[:2]
        dropped += 2
    # a message too long for any answer: the model's own error says by how much
    stream = m.stream(conv.messages(), **{**settings, "max_new_tokens": max(1, min(limit, room))})
    try:
        return stream, next(stream, ""), dropped
    except BaseException:
        stream.close()
        raise


def no_room_for_chat(m: Model) -> str | None:
    """Why the model's context holds no chat at all (the chat template's framing of a message,
    one token of message and one of answer), or None: it does, or no chat template renders."""
    try:
        framing = len(m.tokenizer.encode_chat([{"role": "user", "content": ""}]))
    except InfoptError:
        return None
    if framing + 2 <= m.runtime.max_context:
        return None
    return (
        f"leaves no room for a chat: the chat template's framing of a message takes {framing} "
        "tokens, and a message and its answer at least one each"
    )


def footer(result: GenerationResult) -> str:
    s = result.stats
    cached = s.cached_tokens
    prompt = f"{s.prompt_tokens} prompt tokens" + (f" ({cached} cached)" if cached else "")
    parts = [
        prompt,
        f"TTFT {s.ttft_s * 1000:.0f} ms",
        f"{s.decode_tokens_per_s:.1f} tok/s",
        f"{s.generated_tokens} generated",
    ]
    if result.finish_reason == "length":
        parts.append("cut at the length limit (-n, or the context)")
    return "[" + ", ".join(parts) + "]"


def note(text: str) -> None:
    click.echo(text, err=True)


def _lines(interactive: bool) -> Iterator[str]:
    """The user's lines: from stdin as they come when it is not a terminal, else read with a
    prompt, joining lines that end in a backslash. Ends at end of input (Ctrl-D)."""
    if not interactive:
        for raw in sys.stdin:
            yield raw.rstrip("\r\n")
        return
    while True:
        try:
            line = input(PROMPT)
            while line.endswith("\\"):
                line = line[:-1] + "\n" + input("... ")
        except EOFError:
            click.echo(err=True)
            return
        except KeyboardInterrupt:  # as in a shell: drop the line, ask again
            click.echo(err=True)
            continue
        yield line


def _history() -> Callable[[], None] | None:
    """Load the history of earlier chats into readline; returns the function that saves it.
    None where Python has no readline (Windows): input() still edits the line."""
    try:
        import readline
    except ImportError:
        return None
    import platformdirs

    path = Path(platformdirs.user_data_dir("infopt")) / "chat_history"
    with contextlib.suppress(OSError):  # none yet, or unreadable: start an empty one
        readline.read_history_file(path)
    readline.set_history_length(HISTORY_LENGTH)

    def save() -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            readline.write_history_file(path)
        except OSError as e:
            note(f"(history not saved: {e})")

    return save
