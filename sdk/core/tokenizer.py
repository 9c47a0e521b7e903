"""Tokenizer: the `tokenizers` library plus special tokens, chat template and streaming decode.

Built from a Hugging Face `tokenizer.json`, or from the vocabulary a GGUF file stores: byte-level
BPE with its merges (pre-tokenizer chosen from `tokenizer.ggml.pre` as llama.cpp does), or
SentencePiece BPE, whose merges are derived from the vocabulary. Chat templates render in Jinja's
immutable sandbox, so a template shipped inside a model cannot reach Python objects.
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime
import json
import math
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import jinja2
from jinja2.sandbox import MAX_RANGE, ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as _HFTokenizer

from infopt.errors import (
    InfoptError,
    InvalidArgumentError,
    ModelFormatError,
    UnsupportedModelError,
)

# llama.cpp's split regexes for byte-level BPE vocabularies, keyed by `tokenizer.ggml.pre`.
_GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Each entry: the regexes applied in order (llama.cpp `llama-vocab.cpp`). SmolLM splits every
# digit first, as its published tokenizer.json does (Digits(individual_digits=True)).
GGUF_PRE_TOKENIZERS: dict[str, tuple[str, ...]] = {
    "default": (_GPT2_SPLIT,),
    "gpt2": (_GPT2_SPLIT,),
    "smollm": (r"\p{N}", _GPT2_SPLIT),
    "llama-bpe": (_LLAMA3_SPLIT,),
    "llama3": (_LLAMA3_SPLIT,),
    "qwen2": (_QWEN2_SPLIT,),
}
# llama.cpp token types (`tokenizer.ggml.token_type`)
_NORMAL = 1
_UNKNOWN = 2
_CONTROL = 3  # special/control tokens
_USER_DEFINED = 4  # added tokens matched whole in the text, not special
_BYTE = 6  # `<0xNN>`, what SentencePiece's byte fallback emits
# `tokenizer.ggml.model` values this module reads.
GGUF_TOKENIZER_MODELS = {"gpt2": "byte-level BPE", "llama": "SentencePiece BPE"}


@contextlib.contextmanager
def native_errors(error: type[InfoptError], what: str) -> Iterator[None]:
    """A native library's failures on bad input (tokenizers, safetensors) as `error` naming
    `what`: its plain Exceptions, and Rust panics, which surface as pyo3's PanicException (a
    BaseException)."""
    try:
        yield
    except (InfoptError, MemoryError, KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    except BaseException as e:
        raise error(f"{what} ({type(e).__name__}: {str(e)[:200]})") from None


def _tokenizer_failed(e: BaseException, doing: str) -> ModelFormatError:
    if isinstance(e, (KeyboardInterrupt, SystemExit, GeneratorExit)):
        raise e
    return ModelFormatError(f"the model's tokenizer failed {doing} ({type(e).__name__}: {e})")


@dataclass
class Tokenizer:
    backend: _HFTokenizer
    chat_template: str | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    add_bos_token: bool = False
    special_tokens: dict[str, str] = field(default_factory=dict)  # bos/eos/unk/pad -> text

    @property
    def vocab_size(self) -> int:
        return int(self.backend.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        check_text(text, "the prompt")
        try:
            ids: list[int] = self.backend.encode(text, add_special_tokens=add_special_tokens).ids
        except BaseException as e:  # a damaged tokenizer file can make tokenizers panic
            raise _tokenizer_failed(e, "encoding the prompt") from None
        bos = self.bos_token_id
        if add_special_tokens and self.add_bos_token and bos is not None and ids[:1] != [bos]:
            ids = [bos, *ids]
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        try:
            return str(self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens))
        except BaseException as e:
            raise _tokenizer_failed(e, "decoding tokens") from None

    def token_text(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    @cached_property
    def _template(self) -> jinja2.Template:
        if not self.chat_template:
            raise InvalidArgumentError(
                "this model has no chat template; pass a plain prompt string instead of messages"
            )
        env = _BoundedEnvironment(
            trim_blocks=True,
            lstrip_blocks=True,
            extensions=["jinja2.ext.loopcontrols"],
            finalize=_counted_output,
        )
        env.filters["tojson"] = lambda v, indent=None: json.dumps(
            v, ensure_ascii=False, indent=indent
        )
        env.globals["raise_exception"] = _raise_template_error
        env.globals["range"] = _BudgetedRange
        for name in ("center", "indent", "wordwrap", "truncate", "format", "join"):
            env.filters[name] = _bounded_filter(name, env.filters[name])
        env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
        try:
            return env.from_string(self.chat_template)
        except jinja2.TemplateSyntaxError as e:
            raise ModelFormatError(f"chat template does not parse: {e}") from e

    def render_chat(
        self,
        messages: Sequence[dict[str, Any]],
        add_generation_prompt: bool = True,
        **variables: Any,
    ) -> str:
        """The chat template rendered for `messages` ([{"role": ..., "content": ...}, ...]);
        `variables` are more of the template's inputs (`tools`, as Hugging Face passes them)."""
        check_messages(messages)
        template = self._template
        token = _budget.set(_Budget())
        try:
            text = str(
                template.render(
                    messages=list(messages),
                    add_generation_prompt=add_generation_prompt,
                    bos_token=self.special_tokens.get("bos", ""),
                    eos_token=self.special_tokens.get("eos", ""),
                    **variables,
                )
            )
        except TemplateLimitError as e:
            raise ModelFormatError(f"chat template refused: {e}") from None
        except jinja2.TemplateError as e:  # SecurityError included: the sandbox said no
            raise ModelFormatError(
                f"chat template failed to render: {type(e).__name__}: {e}"
            ) from e
        except InfoptError:  # raise_exception(): the template's own refusal, already typed
            raise
        except Exception as e:  # untrusted code: any failure of it is the model file's
            raise ModelFormatError(
                f"chat template failed to render: {type(e).__name__}: {e}"
            ) from None
        finally:
            _budget.reset(token)
        if len(text) > TEMPLATE_LIMITS["characters"]:
            raise ModelFormatError(
                f"chat template refused: its output passed the limit of "
                f"{TEMPLATE_LIMITS['characters']:,} characters"
            )
        return text

    def encode_chat(self, messages: Sequence[dict[str, Any]], **variables: Any) -> list[int]:
        # The template writes any BOS itself, as HF's apply_chat_template assumes.
        return self.encode(self.render_chat(messages, **variables), add_special_tokens=False)


def template_variables(template: str) -> set[str]:
    """The variables a chat template reads from its caller (`messages`, `tools`, ...): what it
    can render. A template that does not parse reads nothing."""
    from jinja2 import meta

    try:
        env = jinja2.Environment(extensions=["jinja2.ext.loopcontrols"])
        return set(meta.find_undeclared_variables(env.parse(template)))
    except jinja2.TemplateSyntaxError:
        return set()


# What rendering a chat template (untrusted: it comes with the model file) may spend. Real
# templates loop over the messages and emit about their length; these leave them wide room.
TEMPLATE_LIMITS = {"seconds": 2.0, "steps": 1_000_000, "characters": 4_000_000}


class TemplateLimitError(Exception):
    """A chat template passed one of TEMPLATE_LIMITS (turned into a ModelFormatError)."""


class _Budget:
    """What one rendering has spent: operations (calls, attribute and item reads, operators,
    loop steps over range()), output characters, and time."""

    def __init__(self) -> None:
        self.deadline = time.monotonic() + TEMPLATE_LIMITS["seconds"]
        self.steps = 0
        self.characters = 0

    def step(self, n: int = 1) -> None:
        self.steps += n
        if self.steps > TEMPLATE_LIMITS["steps"]:
            raise TemplateLimitError(
                f"it passed the limit of {TEMPLATE_LIMITS['steps']:,} operations"
            )
        if self.steps % 256 == 0 and time.monotonic() > self.deadline:
            raise TemplateLimitError(f"it ran past the limit of {TEMPLATE_LIMITS['seconds']:g} s")

    def output(self, size: int) -> None:
        self.characters += size
        if size > TEMPLATE_LIMITS["characters"] or self.characters > TEMPLATE_LIMITS["characters"]:
            raise TemplateLimitError(
                f"its output passed the limit of {TEMPLATE_LIMITS['characters']:,} characters"
            )


_budget: contextvars.ContextVar[_Budget] = contextvars.ContextVar("template_budget")


def _spend(n: int = 1) -> _Budget:
    budget = _budget.get(None) or _Budget()  # outside render_chat: unbounded, never carried
    budget.step(n)
    return budget


def _counted_output(value: Any) -> Any:
    _spend().output(len(str(value)) if value is not None else 0)
    return value


def _sized(value: Any) -> int:
    return len(value) if isinstance(value, (str, bytes, list, tuple)) else 1


class _BudgetedRange:
    """range() for templates: the sandbox's size cap, and a step of the budget per item."""

    def __init__(self, *args: int) -> None:
        self.items = range(*args)
        if len(self.items) > MAX_RANGE:
            raise TemplateLimitError(
                f"range() of {len(self.items):,} items (at most {MAX_RANGE:,})"
            )

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator[int]:
        for i in self.items:
            _spend()
            yield i


_WIDE = re.compile(r"\d{7,}")  # a width or precision of a million or more in a format string


class _BoundedEnvironment(ImmutableSandboxedEnvironment):
    """The sandbox, with every operation counted against the rendering's budget and the
    operations that can build a huge value checked before they run."""

    intercepted_binops = frozenset({"*", "**", "+"})

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        _spend()
        limit = TEMPLATE_LIMITS["characters"]
        if operator == "*" and isinstance(right, int) and isinstance(left, (str, list, tuple)):
            left, right = right, left
        repeats = operator == "*" and isinstance(left, int)
        if repeats and isinstance(right, (str, list, tuple)) and left * len(right) > limit:
            raise TemplateLimitError(f"a repetition of {left:,} × {len(right):,} items")
        if operator == "+" and _sized(left) + _sized(right) > limit:
            raise TemplateLimitError(f"a value of more than {limit:,} items")
        if operator == "**" and isinstance(right, (int, float)) and abs(right) > 64:
            raise TemplateLimitError(f"a power of {right}")
        return super().call_binop(context, operator, left, right)

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        _spend()
        if getattr(__obj, "__name__", "") in ("format", "format_map", "center", "ljust",
                                               "rjust", "zfill", "expandtabs"):  # fmt: skip
            owner = getattr(__obj, "__self__", None)
            numbers = [a for a in (*args, *kwargs.values()) if isinstance(a, int)]
            if (isinstance(owner, str) and _WIDE.search(owner)) or any(
                n > TEMPLATE_LIMITS["characters"] for n in numbers
            ):
                raise TemplateLimitError(f"a {__obj.__name__}() that would build a huge string")
        return super().call(__context, __obj, *args, **kwargs)

    def getattr(self, obj: Any, attribute: str) -> Any:
        _spend()
        return super().getattr(obj, attribute)

    def wrap_str_format(self, value: Any) -> Any:
        owner = getattr(value, "__self__", None)
        if isinstance(owner, str) and _WIDE.search(owner):

            def refuse(*args: Any, **kwargs: Any) -> str:
                raise TemplateLimitError("a str.format() that would build a huge string")

            return refuse
        return super().wrap_str_format(value)

    def getitem(self, obj: Any, argument: Any) -> Any:
        _spend()
        return super().getitem(obj, argument)


def _bounded_filter(name: str, original: Any) -> Any:
    def bounded(*args: Any, **kwargs: Any) -> Any:
        _spend()
        given = (*args, *kwargs.values())
        sizes = [a for a in given if isinstance(a, int) and not isinstance(a, bool)]
        texts = [a for a in given if isinstance(a, str)]
        if any(n > TEMPLATE_LIMITS["characters"] for n in sizes) or (
            name == "format" and any(_WIDE.search(t) for t in texts)
        ):
            raise TemplateLimitError(f"a |{name} filter that would build a huge string")
        return original(*args, **kwargs)

    # the environment or context some filters take first (jinja2's pass_environment marks)
    if hasattr(original, "jinja_pass_arg"):
        bounded.jinja_pass_arg = original.jinja_pass_arg  # type: ignore[attr-defined]

    return bounded


def _raise_template_error(message: str) -> None:
    raise InvalidArgumentError(f"chat template refused the messages: {message}")


ROLES = ("system", "user", "assistant", "tool")


def check_text(text: object, what: str) -> None:
    """A string that can be encoded: text with a lone surrogate (half of a UTF-16 pair, as a
    bad decode can leave) has no UTF-8 form, so no tokens."""
    if not isinstance(text, str):
        raise InvalidArgumentError(f"{what} = {text!r}: expected a string")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidArgumentError(
            f"{what} holds {text[e.start : e.end]!r} at {e.start}, a lone surrogate with no UTF-8 "
            "form; decode the text with errors='replace' first"
        ) from None


def check_messages(messages: Sequence[dict[str, Any]]) -> None:
    if not messages:
        raise InvalidArgumentError("messages is empty; give at least one {'role', 'content'} dict")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or "content" not in m:
            raise InvalidArgumentError(
                f"messages[{i}] = {m!r} is not a {{'role': str, 'content': str}} dict"
            )
        if m["role"] not in ROLES:
            raise InvalidArgumentError(
                f"messages[{i}]['role'] = {m['role']!r}: expected one of {list(ROLES)}"
            )
        check_text(m["content"], f"messages[{i}]['content']")


class StreamDecoder:
    """Turns a growing list of token ids into text deltas, never emitting half a UTF-8 character
    (the offsets trick used by vLLM and HF TextStreamer: re-decode a short tail, not everything)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # start of the tail we re-decode
        self.read = 0  # ids up to here are already emitted as text

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        decode = self.tokenizer.decode
        before = decode(self.ids[self.prefix : self.read])
        after = decode(self.ids[self.prefix :])
        if after.endswith("\ufffd") or len(after) <= len(before):
            return ""  # an incomplete multi-byte character, or a token with no text
        self.prefix, self.read = self.read, len(self.ids)
        return after[len(before) :]

    def flush(self) -> str:
        """Whatever is still held back, at the end of generation, less a character cut short
        at the very end (by a token limit), which decodes to U+FFFD: text the model never
        wrote. It is looked for in the last held tokens (at most four: a character's bytes),
        after text that ends cleanly: tokens that decode to U+FFFD alone are dropped (the text
        before them decoded again: SentencePiece's byte fallback turns a whole run of byte
        tokens into U+FFFD when its end is cut; a stray undecodable byte right before goes
        with them), a token with text before the cut bytes loses its trailing U+FFFD. Other
        U+FFFD stay, as a plain decode has them."""
        decode, ids = self.tokenizer.decode, self.ids[self.prefix :]
        text = decode(ids)
        done = len(decode(self.ids[self.prefix : self.read]))
        held = len(self.ids) - self.read
        for t in range(1, min(4, held) + 1) if text.endswith("\ufffd") else ():
            before = decode(ids[:-t])
            if before.endswith("\ufffd"):
                continue  # the cut reaches further back, or garbage does
            if not decode(ids[-t:]).strip("\ufffd"):
                text = before
            elif text.startswith(before) and len(text.rstrip("\ufffd")) >= len(before):
                text = text.rstrip("\ufffd")
            break
        self.prefix = self.read = len(self.ids)
        return text[done:]


def tokenizer_from_gguf_metadata(meta: dict[str, Any]) -> Tokenizer:
    """Tokenizer from a GGUF's `tokenizer.ggml.*` metadata: byte-level BPE (`gpt2`) or
    SentencePiece BPE (`llama`)."""
    kind = meta.get("tokenizer.ggml.model")
    if kind == "llama":
        return _spm_tokenizer_from_gguf_metadata(meta)
    if kind != "gpt2":
        raise UnsupportedModelError(
            f"GGUF tokenizer model {kind!r} is not supported; supported: "
            + ", ".join(f"{k!r} ({what})" for k, what in GGUF_TOKENIZER_MODELS.items())
            + "; load the model's Hugging Face folder, whose tokenizer.json infopt reads directly"
        )
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in GGUF_PRE_TOKENIZERS:
        raise UnsupportedModelError(
            f"GGUF pre-tokenizer {pre!r} is not supported; supported: {sorted(GGUF_PRE_TOKENIZERS)}"
        )
    tokens = _gguf_tokens(meta)
    raw_merges = meta.get("tokenizer.ggml.merges")
    if not isinstance(raw_merges, list) or not raw_merges:  # BPE without them is another tokenizer
        raise ModelFormatError(
            "GGUF 'tokenizer.ggml.merges' is missing or empty: a byte-level BPE vocabulary "
            "needs its merges"
        )
    if not all(isinstance(m, str) and m.count(" ") >= 1 for m in raw_merges):
        raise ModelFormatError("GGUF 'tokenizer.ggml.merges' holds an entry that is not 'a b'")
    merges = [tuple(m.split(" ", 1)) for m in raw_merges]
    vocab = {t: i for i, t in enumerate(tokens)}
    missing = next((m for m in merges for part in (m[0], m[1], m[0] + m[1]) if part not in vocab),
                   None)  # fmt: skip
    if missing is not None:
        raise ModelFormatError(
            f"GGUF merge {' '.join(missing)!r} names a token the vocabulary does not have "
            "(a damaged vocabulary)"
        )
    with native_errors(ModelFormatError, "GGUF vocabulary cannot be read as BPE"):
        backend = _HFTokenizer(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(rx), behavior="isolated") for rx in GGUF_PRE_TOKENIZERS[pre]]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    backend.decoder = decoders.ByteLevel()
    types = _gguf_token_types(meta, tokens)
    backend.add_special_tokens(
        [
            AddedToken(t, special=True, normalized=False)
            for t, kind in zip(tokens, types, strict=True)
            if kind == _CONTROL
        ]
    )
    backend.add_tokens(
        [
            AddedToken(t, special=False, normalized=False)
            for t, kind in zip(tokens, types, strict=True)
            if kind == _USER_DEFINED
        ]
    )
    return _gguf_tokenizer(meta, tokens, backend, add_bos_default=False)


def _gguf_tokens(meta: dict[str, Any]) -> list[str]:
    tokens = meta.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens):
        raise ModelFormatError("GGUF 'tokenizer.ggml.tokens' is missing or not a list of strings")
    return tokens


def _gguf_token_types(meta: dict[str, Any], tokens: list[str]) -> list[int]:
    types = meta.get("tokenizer.ggml.token_type") or [_NORMAL] * len(tokens)
    if len(types) != len(tokens):
        raise ModelFormatError(f"GGUF has {len(tokens)} tokens but {len(types)} token types")
    return types


def _gguf_special_ids(meta: dict[str, Any]) -> dict[str, Any]:
    """bos/eos/unk/pad -> the id the GGUF names (None where it names none)."""
    return {
        name: meta.get(f"tokenizer.ggml.{key}_token_id")
        for name, key in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding"))
    }


def _gguf_tokenizer(
    meta: dict[str, Any], tokens: list[str], backend: _HFTokenizer, add_bos_default: bool
) -> Tokenizer:
    ids = _gguf_special_ids(meta)
    eos = ids["eos"]
    return Tokenizer(
        backend=backend,
        chat_template=meta.get("tokenizer.chat_template"),
        bos_token_id=ids["bos"],
        eos_token_ids=(eos,) if eos is not None else (),
        add_bos_token=bool(meta.get("tokenizer.ggml.add_bos_token", add_bos_default)),
        special_tokens={k: tokens[v] for k, v in ids.items() if v is not None and v < len(tokens)},
    )


def _spm_tokenizer_from_gguf_metadata(meta: dict[str, Any]) -> Tokenizer:
    """SentencePiece BPE (`tokenizer.ggml.model` "llama": Llama 1/2, Mistral v0.1, Phi-3,
    Gemma 2/3), built as transformers' GGUF converter builds it: a BPE with byte fallback, whose
    merges are derived from the vocabulary (a GGUF stores none for these), spaces written as "▁"
    by the normalizer, which also prepends one where `tokenizer.ggml.add_space_prefix` says so
    (the default, as SentencePiece and llama.cpp do; Gemma 3 says no)."""
    tokens = _gguf_tokens(meta)
    types = _gguf_token_types(meta, tokens)
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in types):
        raise ModelFormatError(
            "GGUF 'tokenizer.ggml.token_type' holds a value that is not an integer"
        )
    scores = meta.get("tokenizer.ggml.scores")
    if not isinstance(scores, list):
        raise ModelFormatError(
            "GGUF 'tokenizer.ggml.scores' is missing: a SentencePiece vocabulary needs its "
            "scores to order its merges"
        )
    if len(scores) != len(tokens):
        raise ModelFormatError(f"GGUF has {len(tokens)} tokens but {len(scores)} token scores")
    if not all(
        isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in scores
    ):
        raise ModelFormatError("GGUF 'tokenizer.ggml.scores' holds a value that is not a number")
    ids = _gguf_special_ids(meta)
    for name, token_id in ids.items():
        if token_id is not None and (not isinstance(token_id, int) or isinstance(token_id, bool)):
            raise ModelFormatError(f"GGUF {name} token id is {token_id!r}, not an integer")
        if token_id is not None and not 0 <= token_id < len(tokens):
            if name in ("bos", "eos"):
                raise ModelFormatError(
                    f"GGUF {name} token id {token_id} is outside the vocabulary of {len(tokens)}"
                )
            ids[name] = None  # llama.cpp too only warns about a stray unknown/padding id
    prepend = meta.get("tokenizer.ggml.add_space_prefix", True)
    if not isinstance(prepend, bool):
        raise ModelFormatError(
            f"GGUF 'tokenizer.ggml.add_space_prefix' is {prepend!r}, not true or false"
        )

    # llama.cpp's converter writes the spaces of user-defined tokens as spaces ("  " in Gemma);
    # the normalizer below turns the text's spaces into "▁", so the vocabulary spells them so too.
    vocab_tokens = list(tokens)
    for i, (t, kind) in enumerate(zip(tokens, types, strict=True)):
        if " " in t and kind in (_NORMAL, _USER_DEFINED):
            vocab_tokens[i] = t.replace(" ", "\u2581")
    vocab = {t: i for i, t in enumerate(vocab_tokens)}
    if len(vocab) != len(set(tokens)):  # a respelled token collides with one already there
        vocab_tokens = list(tokens)
        vocab = {t: i for i, t in enumerate(vocab_tokens)}
    # Gemma's scores do not follow its merge order (user-defined whitespace runs score -1000),
    # its vocabulary's order does; elsewhere the scores are the order, as in SentencePiece.
    by_position = str(meta.get("general.architecture", "")).startswith("gemma")
    rank = [float(-i) for i in range(len(tokens))] if by_position else scores
    merges = _spm_merges(vocab, rank, types)

    unk = ids["unk"]
    if unk is None:
        unk = next((i for i, kind in enumerate(types) if kind == _UNKNOWN), None)
    unk_token = tokens[unk] if unk is not None else None
    with native_errors(ModelFormatError, "GGUF vocabulary cannot be read as SentencePiece BPE"):
        backend = _HFTokenizer(
            models.BPE(
                vocab=vocab, merges=merges, unk_token=unk_token, fuse_unk=True, byte_fallback=True
            )
        )
    replace = normalizers.Replace(" ", "\u2581")
    backend.normalizer = (
        normalizers.Sequence([normalizers.Prepend("\u2581"), replace]) if prepend else replace
    )
    backend.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
        + ([decoders.Strip(" ", 1, 0)] if prepend else [])
    )
    named = {v for v in ids.values() if v is not None}
    backend.add_special_tokens(
        [
            AddedToken(t, special=True, normalized=False)
            for i, (t, kind) in enumerate(zip(tokens, types, strict=True))
            if kind in (_CONTROL, _UNKNOWN) or i in named
        ]
    )
    backend.add_tokens(
        [
            AddedToken(t, special=False, normalized=False)
            for i, (t, kind) in enumerate(zip(tokens, types, strict=True))
            if kind == _USER_DEFINED and i not in named and vocab.get(t) == i
        ]
    )
    tokenizer = _gguf_tokenizer(meta, tokens, backend, add_bos_default=True)
    eos = tokenizer.eos_token_ids
    if meta.get("tokenizer.ggml.add_eos_token") and eos:
        eos_text = tokens[eos[0]]
        backend.post_processor = processors.TemplateProcessing(
            single=f"$A {eos_text}", pair=f"$A {eos_text} $B {eos_text}",
            special_tokens=[(eos_text, eos[0])],
        )  # fmt: skip
    return tokenizer


def _spm_merges(
    vocab: dict[str, int], rank: Sequence[float], types: Sequence[int]
) -> list[tuple[str, str]]:
    """The BPE merges a SentencePiece vocabulary implies: every way to cut each token into two
    tokens, best `rank` first; among the cuts of one token the longer left part first (the order
    of transformers' `generate_merges`). Tokens SentencePiece never builds by merging (control,
    unknown, byte) are not merge results, so text spelling `<0x41>` stays that text."""
    found: list[tuple[float, int, int, int, str, str]] = []
    append = found.append
    for order, (token, i) in enumerate(vocab.items()):
        if len(token) < 2 or types[i] in (_CONTROL, _UNKNOWN, _BYTE):
            continue
        score = rank[i]
        for k in range(len(token) - 1, 0, -1):
            left = token[:k]
            if left in vocab:
                right = token[k:]
                if right in vocab:
                    append((-score, -k, k - len(token), order, left, right))
    found.sort()  # (score desc, left length desc, right length desc, vocabulary order)
    return [(left, right) for _, _, _, _, left, right in found]


def tokenizer_from_hf_files(
    tokenizer_json: str,
    tokenizer_config: dict[str, Any],
    chat_template: str | None,
    eos_token_ids: tuple[int, ...],
) -> Tokenizer:
    """Tokenizer from an HF folder's `tokenizer.json` + `tokenizer_config.json`."""
    with native_errors(
        ModelFormatError, "tokenizer.json: not a tokenizer the tokenizers library reads"
    ):
        backend = _HFTokenizer.from_str(tokenizer_json)
    specials: dict[str, str] = {}
    for name in ("bos", "eos", "unk", "pad"):
        value = tokenizer_config.get(f"{name}_token")
        text = value.get("content") if isinstance(value, dict) else value
        if isinstance(text, str):
            specials[name] = text
    bos = backend.token_to_id(specials["bos"]) if "bos" in specials else None
    if not eos_token_ids and "eos" in specials:
        eos = backend.token_to_id(specials["eos"])
        eos_token_ids = (eos,) if eos is not None else ()
    template = chat_template or tokenizer_config.get("chat_template")
    if isinstance(template, list):  # the named-template form: [{"name": ..., "template": ...}]
        template = next(
            (t.get("template") for t in template if isinstance(t, dict) and t.get("name") ==
             "default"),
            None,
        )  # fmt: skip
    if template is not None and not isinstance(template, str):
        raise ModelFormatError(
            f"tokenizer_config.json: chat_template is {type(template).__name__}, not a string"
        )
    return Tokenizer(
        backend=backend,
        chat_template=template,
        bos_token_id=bos,
        eos_token_ids=eos_token_ids,
        add_bos_token=False,  # tokenizer.json's post-processor adds BOS itself
        special_tokens=specials,
    )
