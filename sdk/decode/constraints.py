"""Structured output: a token mask from llguidance applied to the logits before sampling, so a
generation follows a JSON schema, a regular expression or a grammar on every runtime.

llguidance (the engine behind llama.cpp's, vLLM's and SGLang's JSON-schema support) computes,
from a grammar and the tokens so far, the set of tokens that can still lead to a valid text;
infopt masks every other token out, feeds the chosen token back, and ends the generation when
the grammar is complete. Its tokenizer view is built once per tokenizer (from the same
`tokenizer.json` infopt tokenizes with) and shared by every request.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from infopt.errors import InvalidArgumentError, RuntimeNotAvailableError

if TYPE_CHECKING:
    from infopt.core.tokenizer import Tokenizer

RESPONSE_FORMATS = ("text", "json_object", "json_schema")


def llguidance_module() -> Any:
    try:
        import llguidance
        import llguidance.numpy
    except ImportError:
        raise RuntimeNotAvailableError(
            "structured output (response_format, regex, grammar) needs llguidance: "
            "pip install llguidance"
        ) from None
    return llguidance


def grammar_for(
    response_format: Mapping[str, Any] | None = None,
    regex: str | None = None,
    grammar: str | None = None,
) -> str | None:
    """The llguidance grammar for at most one of: an OpenAI-style `response_format`
    ({"type": "json_object"} or {"type": "json_schema", "json_schema": {"schema": {...}}}, or
    the schema itself under "schema"), a regular expression, or a grammar in Lark syntax (or
    GBNF, llama.cpp's, converted). None when none is given; a typed error naming the problem
    when one is malformed, before any generation."""
    given = [
        n
        for n, v in (("response_format", response_format), ("regex", regex), ("grammar", grammar))
        if v is not None
    ]
    if len(given) > 1:
        raise InvalidArgumentError(f"{' and '.join(given)}: give at most one constraint")
    if not given:
        return None
    llg = llguidance_module()
    matcher = llg.LLMatcher
    try:
        if regex is not None:
            if not isinstance(regex, str) or not regex:
                raise InvalidArgumentError(f"regex={regex!r}: must be a non-empty string")
            given = [f"regex {regex!r}"]
            text = matcher.grammar_from_regex(regex)
        elif grammar is not None:
            if not isinstance(grammar, str) or not grammar.strip():
                raise InvalidArgumentError(f"grammar={grammar!r}: must be a non-empty string")
            from llguidance.gbnf_to_lark import any_to_lark

            lark = any_to_lark(grammar)  # GBNF (llama.cpp's) converted; Lark as it is
            text = matcher.grammar_from_lark(lark)
        else:
            schema = _schema(response_format)
            if schema is None:
                return None
            text = matcher.grammar_from_json_schema(schema)
    except InvalidArgumentError:
        raise
    except Exception as e:  # llguidance raises ValueError / RuntimeError with its message
        raise InvalidArgumentError(f"{given[0]}: {error_reason(str(e))}") from e
    message = matcher.validate_grammar(text)
    if message:
        raise InvalidArgumentError(f"{given[0]}: {error_reason(message)}")
    return str(text)


def error_reason(message: str) -> str:
    """llguidance's message in one line, without the position in the grammar infopt built
    around a regex (the user never wrote it): its "error: ..." line when it has one."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    reason = next((line[6:].strip() for line in lines if line.startswith("error:")), None)
    if reason is None:
        reason = re.sub(r"^at \d+\(\d+\): ", "", lines[0] if lines else message)
    return reason


def _schema(response_format: Any) -> dict[str, Any] | None:
    """The JSON schema a response_format asks for (None: plain text)."""
    if not isinstance(response_format, Mapping):
        raise InvalidArgumentError(
            f"response_format={response_format!r}: expected a dict with a 'type' of "
            f"{list(RESPONSE_FORMATS)}"
        )
    kind = response_format.get("type")
    if kind not in RESPONSE_FORMATS:
        raise InvalidArgumentError(
            f"response_format type {kind!r}: expected one of {list(RESPONSE_FORMATS)}"
        )
    if kind == "text":
        return None
    if kind == "json_object":
        return _compact({"type": "object"})
    wrapper = response_format.get("json_schema", response_format)
    schema = wrapper.get("schema") if isinstance(wrapper, Mapping) else None
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise InvalidArgumentError(f"response_format schema: not JSON ({e})") from e
    if not isinstance(schema, Mapping):
        raise InvalidArgumentError(
            "response_format type 'json_schema' needs {'json_schema': {'schema': {...}}} "
            "(OpenAI's form) or {'schema': {...}}"
        )
    return _compact(closed_schema(dict(schema)))


def closed_schema(schema: Any) -> Any:
    """`schema` with objects that do not say otherwise closed to other properties, as OpenAI's
    strict structured outputs are: a small model otherwise keeps inventing keys until
    max_new_tokens cuts it short."""
    if isinstance(schema, list):
        return [closed_schema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: closed_schema(v) for k, v in schema.items()}
    if out.get("type") == "object" and "properties" in out:
        out.setdefault("additionalProperties", False)
    return out


def _compact(schema: dict[str, Any]) -> dict[str, Any]:
    """One space after ':' and ',' and no other whitespace (llguidance's option): otherwise
    any run of spaces and newlines is valid between tokens, and a small model can spend its
    whole budget on them."""
    guidance = {"whitespace_flexible": False, **schema.get("x-guidance", {})}
    return {**schema, "x-guidance": guidance}


def tokenizer_view(tokenizer: Tokenizer, vocab_size: int) -> Any:
    """llguidance's view of `tokenizer` (it reads every token: build it once per model and
    keep it, as `Model` does)."""
    llg = llguidance_module()
    try:
        return llg.LLTokenizer(
            tokenizer.backend.to_str(),
            n_vocab=vocab_size,
            eos_token=list(tokenizer.eos_token_ids),
        )
    except Exception as e:  # a vocabulary llguidance cannot read
        raise InvalidArgumentError(
            f"structured output: llguidance cannot use this model's tokenizer ({e})"
        ) from e


class Constraint:
    """One request's matcher: `mask(logits)` keeps only the tokens the grammar allows next,
    `accept(token)` feeds the chosen one, `done` once the grammar is complete."""

    def __init__(self, grammar: str, view: Any) -> None:
        llg = llguidance_module()
        self._np = llg.numpy
        self.matcher = llg.LLMatcher(view, grammar)
        if self.matcher.is_error():
            raise InvalidArgumentError(f"structured output: {self.matcher.get_error()}")
        self._bitmask = self._np.allocate_token_bitmask(1, view.vocab_size)

    def mask(self, logits: np.ndarray) -> np.ndarray:
        """`logits` [V] with the tokens the grammar forbids next set to -inf (a copy)."""
        self._np.fill_next_token_bitmask(self.matcher, self._bitmask, 0)
        out = np.array(logits, dtype=np.float32)[None, :]
        self._np.apply_token_bitmask_inplace(out, self._bitmask)
        return out[0]

    def accept(self, token: int) -> None:
        if not self.matcher.consume_token(token):
            raise InvalidArgumentError(
                f"structured output: token {token} does not continue the constrained text "
                f"({self.matcher.get_error()})"
            )

    def valid_prefix(self, tokens: Sequence[int]) -> int:
        """How many of `tokens`, from the current state, the grammar accepts in a row."""
        return int(self.matcher.validate_tokens(list(tokens)))

    def rollback(self, n: int) -> None:
        if n:
            self.matcher.rollback(n)

    @property
    def done(self) -> bool:
        """The grammar is complete: nothing more may follow."""
        return bool(self.matcher.is_stopped())
