"""The shared generate loop, over any runtime, on numpy logits.

Layered as in mlx-lm: `generate_step` yields token ids forever; `stream_generate` turns them into
typed `Response`s (text delta, finish reason, stats) honouring stop tokens, stop strings and
max_new_tokens; `generate` collects one `GenerationResult`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from numbers import Integral
from typing import Any

import numpy as np

from infopt.core.defaults import DEFAULT_MAX_NEW_TOKENS
from infopt.core.tokenizer import StreamDecoder, Tokenizer
from infopt.decode.drafters import Drafter, check_draft_tokens, check_drafter
from infopt.decode.sampling import SamplingParams, sample
from infopt.decode.speculative import SpeculativeStats, speculative_step
from infopt.decode.tools import ToolCall
from infopt.errors import ContextLengthError, InvalidArgumentError
from infopt.runtimes import Runtime, run_prefill

Speculative = bool | str | None  # None: the model's drafter if it has one; "ngram": prompt lookup
SAMPLING = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty")


@dataclass(frozen=True)
class GenerateOptions:
    """Per-call settings of `Model.generate()` and `Model.stream()`, named as in Hugging Face
    `generate()`. A sampling setting left None takes the model's generation defaults (greedy
    unless its generation config samples); `stop_token_ids` None means its EOS tokens."""

    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    temperature: float | None = None  # 0 = greedy
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    stop: str | Sequence[str] | None = None  # strings that end the text (not included in it)
    stop_token_ids: Sequence[int] | None = None
    seed: int | None = None
    speculative: Speculative = None  # None: the model's draft; False: none; "ngram"
    num_draft_tokens: int | None = None  # the draft length to start from (1-16; it adapts)
    # structured output (at most one): OpenAI's response_format ({"type": "json_object"} or
    # {"type": "json_schema", "json_schema": {"schema": ...}}), a regular expression, or a
    # grammar (Lark, or llama.cpp's GBNF)
    response_format: Mapping[str, Any] | None = None
    regex: str | None = None
    grammar: str | None = None
    # tool calling (chat messages only): OpenAI's tools ([{"type": "function", "function":
    # {"name", "description", "parameters"}}]) and tool_choice ("auto", "none", "required" or
    # {"type": "function", "function": {"name": ...}})
    tools: Sequence[Mapping[str, Any]] | None = None
    tool_choice: str | Mapping[str, Any] | None = None
    # several calls in one answer (as llama.cpp's server, one by default: a small model asked
    # for calls otherwise tends to keep making them)
    parallel_tool_calls: bool = False

    def sampling(self, defaults: Mapping[str, object]) -> SamplingParams:
        """The sampling parameters: these options over the model's defaults."""
        given = {k: getattr(self, k) for k in SAMPLING if getattr(self, k) is not None}
        return SamplingParams(**{**defaults, **given}, seed=self.seed)

    def stop_strings(self) -> list[str]:
        if self.stop is not None and not isinstance(self.stop, (str, Sequence)):
            raise InvalidArgumentError(f"stop={self.stop!r}: must be a string or a list of strings")
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if not all(isinstance(s, str) for s in stops):
            raise InvalidArgumentError(f"stop={self.stop!r}: must be a string or a list of strings")
        if "" in stops:  # it would match before any text
            raise InvalidArgumentError(f"stop={self.stop!r}: a stop string cannot be empty")
        return stops

    def stop_ids(self, default: Sequence[int], vocab_size: int) -> list[int]:
        """The token ids that end generation: `stop_token_ids`, else `default` (EOS)."""
        if self.stop_token_ids is None:
            return list(default)
        given = list(self.stop_token_ids)
        bad = [i for i in given if not isinstance(i, Integral) or isinstance(i, bool)]
        ids = [int(i) for i in given if isinstance(i, Integral)]
        bad += [i for i in ids if not 0 <= i < vocab_size]
        if bad:
            raise InvalidArgumentError(
                f"stop_token_ids={self.stop_token_ids!r}: {bad[0]!r} is not a token id of this "
                f"vocabulary (0 to {vocab_size - 1})"
            )
        return ids


def generate_options(options: GenerateOptions | Mapping[str, Any] | None) -> GenerateOptions:
    """`options` as GenerateOptions: given as one, as a mapping of its fields (an unknown
    field is a TypeError naming it, as an unknown keyword is), or None for the defaults."""
    if options is None:
        return GenerateOptions()
    if isinstance(options, GenerateOptions):
        return options
    if isinstance(options, Mapping):
        check_settings(options)
        return GenerateOptions(**options)
    raise TypeError(f"options={options!r}: expected GenerateOptions, a dict of its fields, or None")


def check_settings(settings: Mapping[str, Any]) -> None:
    """A TypeError naming an unknown setting of `generate()` / `stream()`, the nearest known
    one, and all of them (not the dataclass's own message, which names a class users never
    see)."""
    known = [f.name for f in fields(GenerateOptions)]
    for name in settings:
        if name not in known:
            import difflib

            near = difflib.get_close_matches(str(name), known, n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise TypeError(
                f"generate() got an unknown setting {name!r}{hint}; the settings are: "
                + ", ".join(known)
            )


@dataclass
class Stats:
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache
    generated_tokens: int = 0
    ttft_s: float = 0.0  # call start -> first token sampled (prefill included)
    prefill_tokens_per_s: float = 0.0
    decode_tokens_per_s: float = 0.0  # tokens after the first, over the time after the first
    total_s: float = 0.0
    speculative: SpeculativeStats | None = None  # drafted, accepted, acceptance rate, speedup


@dataclass
class Response:
    text: str  # the new text since the previous response (may be "")
    token_id: int
    finish_reason: str | None  # None while running, then "stop", "length" or "tool_calls"
    stats: Stats
    tool_calls: list[ToolCall] = field(default_factory=list)  # calls completed at this one


@dataclass
class GenerationResult:
    text: str  # with tools: the text outside the calls
    token_ids: list[int]
    # "stop" (EOS token or stop string), "length" (max_new_tokens) or "tool_calls" (the answer
    # called tools: `tool_calls`)
    finish_reason: str
    stats: Stats = field(default_factory=Stats)
    tool_calls: list[ToolCall] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (what `infopt-pack run --json` prints, with the runtime's name)."""
        spec = self.stats.speculative
        return {
            "text": self.text,
            "token_ids": self.token_ids,
            "finish_reason": self.finish_reason,
            "tool_calls": [c.to_dict() for c in self.tool_calls],
            "stats": {**vars(self.stats), "speculative": spec.to_dict() if spec else None},
        }


@dataclass
class Delta:
    """One step of a stream: new text (may be "") and the tool calls completed with it."""

    text: str
    tool_calls: list[ToolCall] = field(default_factory=list)


def generate_step(
    runtime: Runtime, prompt_ids: Sequence[int], params: SamplingParams
) -> Iterator[int]:
    """Token ids, one per step, forever. The runtime is reset first; each id is fed back only
    when the next one is asked for, so stopping early wastes no forward pass."""
    rng = np.random.default_rng(params.seed)
    seen = list(prompt_ids) if params.repetition_penalty != 1.0 else []
    runtime.reset()
    logits = run_prefill(runtime, prompt_ids)
    while True:
        token = sample(logits, params, rng, seen)
        yield token
        if seen:
            seen.append(token)
        logits = runtime.forward([token])[-1]


def _held_back(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


def check_request(runtime: Runtime, prompt_ids: Sequence[int], max_new_tokens: int) -> None:
    """Bad requests fail before any work: the token budget and the context window."""
    if (
        isinstance(max_new_tokens, bool)
        or not isinstance(max_new_tokens, int)
        or max_new_tokens < 1
    ):
        raise InvalidArgumentError(f"max_new_tokens={max_new_tokens!r}: must be an integer >= 1")
    if not prompt_ids:
        raise InvalidArgumentError("the prompt is empty: give at least one token of text")
    need = len(prompt_ids) + max_new_tokens
    if need > runtime.max_context:
        raise ContextLengthError(
            f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({max_new_tokens}) = {need} "
            f"exceeds the context window of {runtime.max_context}; shorten the prompt, lower "
            "max_new_tokens, or load with a larger max_context"
        )


def stream_generate(
    runtime: Runtime,
    tokenizer: Tokenizer,
    prompt_ids: Sequence[int],
    *,
    max_new_tokens: int,
    params: SamplingParams,
    stop: Sequence[str] = (),
    stop_token_ids: Sequence[int] = (),
    drafter: Drafter | None = None,
    num_draft_tokens: int = 4,
) -> Iterator[Response]:
    """Responses carrying text deltas; stop strings are never emitted, even in part. With a
    drafter, tokens come from speculative decoding (the same text greedily; the same
    distribution when sampling). Bad requests raise here, before the first response is asked
    for."""
    check_request(runtime, prompt_ids, max_new_tokens)
    if drafter is None:
        steps = generate_step(runtime, prompt_ids, params)
        spec = None
    else:
        check_drafter(runtime, drafter)
        spec = SpeculativeStats(
            drafter=type(drafter).__name__, draft_tokens=check_draft_tokens(num_draft_tokens)
        )
        steps = speculative_step(
            runtime,
            drafter,
            prompt_ids,
            params,
            num_draft_tokens=num_draft_tokens,
            stats=spec,
            max_new_tokens=max_new_tokens,
        )
    return stream_responses(
        steps,
        tokenizer,
        len(prompt_ids),
        max_new_tokens,
        [s for s in stop if s],
        set(stop_token_ids),
        spec,
    )


def stream_responses(
    steps: Iterator[int],
    tokenizer: Tokenizer,
    prompt_len: int,
    max_new_tokens: int,
    stops: list[str],
    stop_ids: set[int],
    spec: SpeculativeStats | None,
    stats: Stats | None = None,
    ended: Callable[[], bool] | None = None,
) -> Iterator[Response]:
    """Responses from token ids; `ended()`, asked after each token, tells that its producer
    stopped there for a reason of its own (a completed grammar): a "stop"."""
    stats = stats or Stats(prompt_tokens=prompt_len, speculative=spec)
    decoder = StreamDecoder(tokenizer)
    text, emitted = "", 0  # all text so far; how much of it has been sent
    start = time.perf_counter()
    first = start
    for n, token in enumerate(steps, start=1):
        now = time.perf_counter()
        if n == 1:
            first = now
            stats.ttft_s = now - start
            stats.prefill_tokens_per_s = prompt_len / max(stats.ttft_s, 1e-9)
        elif now > first:
            stats.decode_tokens_per_s = (n - 1) / (now - first)
        stats.generated_tokens, stats.total_s = n, now - start
        finish = "stop" if token in stop_ids else ("length" if n >= max_new_tokens else None)
        if finish is None and ended is not None and ended():
            finish = "stop"
        if token not in stop_ids:
            text += decoder.push(token)
        if finish:
            text += decoder.flush()
        hit = min((i for i in (text.find(s, emitted) for s in stops) if i >= 0), default=-1)
        if hit >= 0:
            yield Response(text[emitted:hit], token, "stop", stats)
            return
        end = len(text) if finish else len(text) - _held_back(text, stops)
        yield Response(text[emitted:end], token, finish, stats)
        emitted = end
        if finish:
            return


class TextStream:
    """Iterator of text deltas over `stream_generate`; `.result` holds the GenerationResult
    once it is exhausted."""

    def __init__(
        self, responses: Iterator[Response], cancel: Callable[[], None] | None = None
    ) -> None:
        self._responses = responses
        self._cancel = cancel
        self._parts: list[str] = []
        self._ids: list[int] = []
        self.tool_calls: list[ToolCall] = []  # the calls made so far (with tools)
        self.result: GenerationResult | None = None

    def __iter__(self) -> TextStream:
        return self

    def __next__(self) -> str:
        while (delta := self.next_delta()) is not None:
            if delta.text:
                return delta.text
        raise StopIteration

    def next_delta(self) -> Delta | None:
        """The next text or tool calls (what a server streams): a `Delta`, or None once the
        stream has ended (`result` then holds the whole answer)."""
        for r in self._responses:
            self._parts.append(r.text)
            self._ids.append(r.token_id)
            self.tool_calls += r.tool_calls
            if r.finish_reason is not None:
                text = "".join(self._parts)
                if self.tool_calls:  # what surrounds calls is their layout, not an answer
                    text = text.strip()
                self.result = GenerationResult(
                    text, self._ids, r.finish_reason, r.stats, list(self.tool_calls)
                )
            if r.text or r.tool_calls:
                return Delta(r.text, r.tool_calls)
        return None

    def drain(self) -> GenerationResult:
        for _ in self:
            pass
        assert self.result is not None, "stream_generate always ends with a finish_reason"
        return self.result

    def close(self) -> None:
        """Stop early, freeing the model for the next generation (a stream read to its end
        frees it by itself)."""
        close = getattr(self._responses, "close", None)
        if close is not None:
            close()

    def cancel(self) -> None:
        """Stop the generation from any thread, even while another thread waits inside the
        stream: a request still queued leaves the queue, a running one frees its slot at the
        next token, and the stream then ends (`result` stays None)."""
        if self._cancel is not None:
            self._cancel()
        else:
            self.close()

    def __enter__(self) -> TextStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def generate(
    runtime: Runtime,
    tokenizer: Tokenizer,
    prompt_ids: Sequence[int],
    *,
    max_new_tokens: int,
    params: SamplingParams,
    stop: Sequence[str] = (),
    stop_token_ids: Sequence[int] = (),
    drafter: Drafter | None = None,
    num_draft_tokens: int = 4,
) -> GenerationResult:
    """One-shot generation: the whole text, token ids, finish reason and stats."""
    responses = stream_generate(
        runtime,
        tokenizer,
        prompt_ids,
        max_new_tokens=max_new_tokens,
        params=params,
        stop=stop,
        stop_token_ids=stop_token_ids,
        drafter=drafter,
        num_draft_tokens=num_draft_tokens,
    )
    return TextStream(responses).drain()
