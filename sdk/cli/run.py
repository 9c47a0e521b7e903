"""`infopt-pack run`: generate from a bundle or a model file, streaming to the terminal."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from infopt.cli.output import Bars, friendly_errors
from infopt.core.defaults import DEFAULT_MAX_CONTEXT, DEFAULT_MAX_NEW_TOKENS
from infopt.runtimes.registry import reference


@click.command()
@click.argument("model", required=False)
@click.option(
    "-p",
    "--prompt",
    required=True,
    help="The prompt. Sent as a user chat message when the model has a chat template (see --raw).",
)
@click.option("--system", help="System message for chat-templated prompts.")
@click.option(
    "--raw", is_flag=True, help="Send the prompt as plain text, without the chat template."
)
@click.option(
    "-n",
    "--max-new-tokens",
    "--max-tokens",
    "max_new_tokens",
    default=DEFAULT_MAX_NEW_TOKENS,
    show_default=True,
    type=click.IntRange(min=1),
)
@click.option(
    "--temperature",
    type=click.FloatRange(min=0),
    help="0 = greedy (the default unless the model's generation config says otherwise).",
)
@click.option("--top-k", type=click.IntRange(min=0), help="0 = off.")
@click.option("--top-p", type=click.FloatRange(0, 1, min_open=True))
@click.option("--min-p", type=click.FloatRange(0, 1, max_open=True))
@click.option("--repetition-penalty", type=click.FloatRange(min=0, min_open=True), help="1 = off.")
@click.option("--stop", multiple=True, help="Stop string (repeatable); not included in the output.")
@click.option(
    "--seed",
    type=click.IntRange(min=0),
    help="Seed for sampling; the same seed gives the same text (without speculation, whose "
    "draft length follows measured timings).",
)
@click.option(
    "--threads", type=click.IntRange(min=1), help="CPU threads (default: the runtime's choice)."
)
@click.option(
    "--max-context",
    "--context",
    "max_context",
    type=click.IntRange(min=1),
    help=f"KV-cache size in tokens (default: min(model, {DEFAULT_MAX_CONTEXT}); a bundle's: the "
    "context it was built for).",
)
@click.option("--device", help="cpu, cuda, cuda:N (default: CUDA when present).")
@click.option(
    "--runtime",
    help="For a bundle: which of its artifacts to run (default: the manifest's). For a model "
    "file: the runtime to run it on (default: the fastest installed here, which converts the "
    f"file once at its own precision and caches the result; {reference().name} reads it as "
    "float32 with nothing converted).",
)
@click.option(
    "--no-cache",
    is_flag=True,
    help="Convert a model file into a temporary directory instead of the cache "
    "(see `infopt-pack cache`).",
)
@click.option(
    "--draft",
    help="Speculative decoding: a draft model (bundle, GGUF, HF folder) sharing the tokenizer, "
    "or 'ngram' for prompt lookup. A bundle built with --speculative uses its own draft.",
)
@click.option(
    "--draft-runtime",
    help="Runtime of the draft model (default: when the target is on a CPU, a bundle's draft "
    "runs where INT4 decodes fastest among the runtimes it carries and this machine has; a "
    "draft model path runs on the target's runtime).",
)
@click.option(
    "--no-speculative", is_flag=True, help="Decode without the bundle's draft (plain decoding)."
)
@click.option(
    "--num-draft-tokens",
    type=click.IntRange(1, 16),
    help="Draft length to start from, 1-16 (it adapts).",
)
@click.option(
    "--numerics",
    type=click.Choice(["fast", "exact"]),
    default="fast",
    show_default=True,
    help="How quantized weights compute: fast = each runtime's fastest kernels, which round "
    "activations (results vary slightly between CPUs); exact = float32 activations against the "
    "stored weights on every CPU (slower; a runtime without such a mode refuses it).",
)
@click.option(
    "--key",
    metavar="PUB",
    type=click.Path(exists=True, dir_okay=False),
    help="A public key (PEM): run the bundle only if it is signed by it (see `build --sign`).",
)
@click.option(
    "--json-schema",
    "json_schema",
    metavar="FILE",
    type=click.Path(exists=True, dir_okay=False),
    help="Answer in JSON that validates against this JSON schema (structured output).",
)
@click.option("--json-object", is_flag=True, help="Answer with a JSON object (any keys).")
@click.option("--regex", help="Answer with text matching this regular expression.")
@click.option(
    "--grammar",
    metavar="FILE",
    type=click.Path(exists=True, dir_okay=False),
    help="Answer with text of this grammar (Lark syntax, or llama.cpp's GBNF).",
)
@click.option(
    "--tools",
    "tools_file",
    metavar="FILE",
    type=click.Path(exists=True, dir_okay=False),
    help="Tools the model may call: a JSON list in OpenAI's form "
    '([{"type": "function", "function": {"name", "description", "parameters"}}]).',
)
@click.option(
    "--tool-choice",
    default=None,
    metavar="auto|required|none|NAME",
    help="With --tools: let the model choose (auto, the default), make it call one "
    "(required), show no tools (none), or make it call the tool NAME.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of streaming.")
@friendly_errors
def run(
    model: str | None,
    prompt: str,
    system: str | None,
    raw: bool,
    max_new_tokens: int,
    temperature: float | None,
    top_k: int | None,
    top_p: float | None,
    min_p: float | None,
    repetition_penalty: float | None,
    stop: tuple[str, ...],
    seed: int | None,
    threads: int | None,
    max_context: int | None,
    device: str | None,
    runtime: str | None,
    no_cache: bool,
    draft: str | None,
    draft_runtime: str | None,
    no_speculative: bool,
    num_draft_tokens: int | None,
    numerics: str,
    key: str | None,
    json_schema: str | None,
    json_object: bool,
    regex: str | None,
    grammar: str | None,
    tools_file: str | None,
    tool_choice: str | None,
    as_json: bool,
) -> None:
    """Generate from MODEL (a bundle, a GGUF file or a Hugging Face folder), streaming the
    answer to the terminal. With a draft (--draft, or a bundle built with --speculative) it
    decodes speculatively, several tokens per pass of the model: greedy text is the model's own
    token for token on float32 weights and with --numerics exact; on INT4/INT8 weights under
    the fast numerics, a pass over several tokens rounds unlike one-token steps, so it can
    part from plain decoding.

    \b
    Examples:
      infopt-pack run --prompt "Write a haiku about the sea."
      infopt-pack run ./SmolLM2-360M-Instruct --prompt "Hi" --temperature 0.7 --seed 1
      infopt-pack run model.gguf --raw --prompt "def fib(n):" --stop $'\\n\\n' --json
      infopt-pack run --draft ngram --prompt "Fix the typos: $(cat notes.txt)"
      infopt-pack run --prompt "A person, as JSON" --json-schema person.schema.json
      infopt-pack run --prompt "Today's date?" --regex '[0-9]{4}-[0-9]{2}-[0-9]{2}'
      infopt-pack run --prompt "Weather in Paris?" --tools tools.json --tool-choice required
    """
    import infopt

    response_format = None
    flags = [
        name
        for name, value in (
            ("--json-schema", json_schema),
            ("--json-object", json_object or None),
            ("--regex", regex),
            ("--grammar", grammar),
        )
        if value is not None
    ]
    if len(flags) > 1:
        raise click.UsageError(f"{' and '.join(flags)}: give at most one output constraint")
    if json_schema is not None:
        try:
            schema = json.loads(Path(json_schema).read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise click.BadParameter(
                f"{json_schema}: not JSON ({e})", param_hint="--json-schema"
            ) from e
        response_format = {"type": "json_schema", "json_schema": {"schema": schema}}
    elif json_object:
        response_format = {"type": "json_object"}
    grammar_text = Path(grammar).read_text(encoding="utf-8") if grammar is not None else None
    if flags:  # a bad constraint is said before the model loads
        from infopt.decode.constraints import grammar_for
        from infopt.errors import InvalidArgumentError

        try:
            grammar_for(response_format, regex, grammar_text)
        except InvalidArgumentError as e:
            raise click.BadParameter(str(e), param_hint=flags[0]) from e

    tools, choice = _tools(tools_file, tool_choice, flags, raw)
    if system is not None and raw:
        raise click.UsageError("--system needs the chat template: drop --raw")

    bars = Bars(quiet=as_json)  # a model file's first conversion for its runtime
    try:
        m = infopt.load(
            model,
            threads=threads,
            max_context=max_context,
            device=device,
            runtime=runtime,
            draft=False if no_speculative else draft,
            draft_runtime=draft_runtime,
            cache=not no_cache,
            progress=bars,
            public_key=key,
            numerics=numerics,
        )
    finally:
        bars.close()
    messages: Any = prompt
    if system is not None and not m.tokenizer.chat_template:  # it would be dropped unsaid
        raise click.UsageError(
            f"{m.source or 'the default model'} has no chat template, so --system has nowhere "
            "to go: put the instruction in --prompt (sent as plain text)"
        )
    if not raw and m.tokenizer.chat_template:
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": prompt}
        ]
    stream = m.stream(
        messages,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        repetition_penalty=repetition_penalty,
        stop=list(stop),
        seed=seed,
        num_draft_tokens=num_draft_tokens,
        response_format=response_format,
        regex=regex,
        grammar=grammar_text,
        tools=tools,
        tool_choice=choice,
    )
    if not as_json:
        wrote = False
        try:
            for delta in stream:
                click.echo(delta, nl=False)
                wrote = wrote or bool(delta)
        except KeyboardInterrupt:
            if wrote:  # the answer's end on its own line: "interrupted" follows on stderr
                click.echo()
            raise
        if wrote or not stream.tool_calls:  # an answer that is only calls: no empty line
            click.echo()
        for call in stream.tool_calls:  # each on a line of its own: name, then its arguments
            click.echo(f"call {call.name} {call.arguments}")
    else:
        for _ in stream:
            pass
    result = stream.result
    assert result is not None
    s = result.stats
    if as_json:
        click.echo(json.dumps({**result.to_dict(), "runtime": m.runtime.name}))
    else:
        speculation = s.speculative
        click.echo(
            f"[{m.runtime.name}: {s.prompt_tokens} prompt tokens, {s.generated_tokens} generated, "
            f"TTFT {s.ttft_s * 1000:.0f} ms, {s.decode_tokens_per_s:.1f} tok/s decode, "
            f"finish: {result.finish_reason}"
            + (
                f"; speculative: {speculation.accepted}/{speculation.drafted} drafts accepted "
                f"({speculation.acceptance_rate:.0%}), ~{speculation.speedup:.2f}x the model alone"
                if speculation and speculation.drafted
                else "; speculative: no drafts proposed, the model decoded alone"
                if speculation
                else ""
            )
            + "]",
            err=True,
        )
    constrained = response_format is not None or regex is not None or grammar is not None
    constrained = constrained or (tools is not None and choice == "required")
    if constrained and result.finish_reason == "length":
        click.echo(
            "note: the answer stopped at --max-new-tokens before its format was complete",
            err=True,
        )


def _tools(
    tools_file: str | None, tool_choice: str | None, flags: list[str], raw: bool
) -> tuple[list[dict[str, Any]] | None, str | dict[str, Any] | None]:
    """--tools and --tool-choice read and checked before the model loads: the tools, and the
    choice as `generate` takes it (a tool's name becomes OpenAI's {"function": {"name"}})."""
    if tools_file is None:
        if tool_choice is not None:
            raise click.UsageError("--tool-choice needs --tools")
        return None, None
    from infopt.decode.tools import TOOL_CHOICES, check_tool_choice, check_tool_schemas, check_tools
    from infopt.errors import InvalidArgumentError

    if flags:
        raise click.UsageError(f"--tools and {flags[0]}: give one or the other")
    if raw:
        raise click.UsageError("--tools needs the chat template: drop --raw")
    try:
        tools = json.loads(Path(tools_file).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise click.BadParameter(f"{tools_file}: not JSON ({e})", param_hint="--tools") from e
    choice: str | dict[str, Any] | None = tool_choice
    if tool_choice is not None and tool_choice not in TOOL_CHOICES:
        choice = {"type": "function", "function": {"name": tool_choice}}
    try:
        checked = check_tools(tools)
        check_tool_choice(choice, checked)
        check_tool_schemas(checked)
    except InvalidArgumentError as e:
        hint = "--tool-choice" if str(e).startswith("tool_choice") else "--tools"
        raise click.BadParameter(str(e), param_hint=hint) from e
    return tools, choice
