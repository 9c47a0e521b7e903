"""The runtime protocol's semantics, run over every installed runtime: the same tiny model
(exported on the fly for the non-PyTorch runtimes) through each, and through the shared generate
loop on top (streaming, stop strings, the context limit)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import infopt
from infopt.errors import ContextLengthError, InvalidArgumentError, RuntimeNotAvailableError
from infopt.runtimes import Runtime, targets


def installed(name: str) -> bool:
    """Installed and able to run here (Core ML predicts only on macOS)."""
    try:
        targets()[name].module("runtime")
    except RuntimeNotAvailableError:
        return False
    return targets()[name].runs_here()


RUNTIMES = [name for name in targets() if installed(name)]
TOKENS = [5, 17, 42, 99, 3, 250, 77, 8, 120, 64]
PROMPT = [{"role": "user", "content": "hello there"}]


def test_the_runtimes_that_run_here_are_installed() -> None:
    # CI must not skip them silently; Core ML is checked up to prediction in test_coreml.py
    assert {"pytorch", "onnxruntime", "openvino", "tflite"} <= set(RUNTIMES)
    assert ("coreml" in RUNTIMES) == (sys.platform == "darwin")


LOADED: dict[str, infopt.Model] = {}


@pytest.fixture(params=RUNTIMES)
def model(request: pytest.FixtureRequest, load_tiny: Any) -> infopt.Model:
    if request.param not in LOADED:  # one load per runtime: every test starts from reset()
        LOADED[request.param] = load_tiny(request.param, 32)
    LOADED[request.param].runtime.reset()
    return LOADED[request.param]


@pytest.fixture
def rt(model: infopt.Model) -> Runtime:
    return model.runtime


def test_satisfies_protocol(rt: Runtime) -> None:
    assert isinstance(rt, Runtime)
    assert rt.max_context == 32 and rt.vocab_size == 384 and rt.position == 0


def test_prefill_shapes_and_only_last(rt: Runtime) -> None:
    full = rt.forward(TOKENS)
    assert full.shape == (len(TOKENS), rt.vocab_size) and full.dtype == np.float32
    rt.reset()
    last = rt.forward(TOKENS, only_last=True)
    assert last.shape == (1, rt.vocab_size)
    np.testing.assert_allclose(last[0], full[-1], atol=1e-5)


def test_incremental_equals_full(rt: Runtime) -> None:
    full = rt.forward(TOKENS)
    rt.reset()
    steps = [rt.forward(TOKENS[:4])] + [rt.forward([t]) for t in TOKENS[4:]]
    assert rt.position == len(TOKENS)
    np.testing.assert_allclose(np.concatenate(steps), full, atol=1e-5)


def test_rewind_then_redecode_equals_never_decoded(rt: Runtime) -> None:
    rt.forward(TOKENS[:6])
    rt.forward([200, 201, 202])  # a rejected draft
    rt.rewind(3)
    assert rt.position == 6
    after_rewind = rt.forward(TOKENS[6:])
    rt.reset()
    rt.forward(TOKENS[:6])
    clean = rt.forward(TOKENS[6:])
    np.testing.assert_allclose(after_rewind, clean, atol=1e-6)


def test_reset_forgets_everything(rt: Runtime) -> None:
    first = rt.forward(TOKENS)
    rt.reset()
    assert rt.position == 0
    np.testing.assert_allclose(rt.forward(TOKENS), first, atol=1e-6)


def test_context_limit_is_a_typed_error_and_changes_nothing(rt: Runtime) -> None:
    rt.forward(TOKENS * 3)  # 30 of 32
    with pytest.raises(ContextLengthError, match="exceed the context window of 32"):
        rt.forward([1, 2, 3])
    assert rt.position == 30
    rt.forward([1, 2])  # exactly full is fine


def test_bad_rewind_and_empty_forward(rt: Runtime) -> None:
    rt.forward(TOKENS[:3])
    with pytest.raises(InvalidArgumentError, match="rewind"):
        rt.rewind(4)
    with pytest.raises(InvalidArgumentError):
        rt.rewind(-1)
    with pytest.raises(InvalidArgumentError):
        rt.forward([])


@pytest.fixture(scope="module")
def reference(tiny_gguf: Path) -> infopt.Model:
    return infopt.load(tiny_gguf, runtime="pytorch", max_context=32)


def test_same_logits_as_the_pytorch_runtime(rt: Runtime, reference: infopt.Model) -> None:
    reference.runtime.reset()
    expected = reference.runtime.forward(TOKENS)
    np.testing.assert_allclose(rt.forward(TOKENS), expected, atol=2e-5)


def test_streaming_equals_one_shot(model: infopt.Model, reference: infopt.Model) -> None:
    stream = model.stream(PROMPT, max_new_tokens=8, stop_token_ids=[])
    text = "".join(stream)
    one_shot = model.generate(PROMPT, max_new_tokens=8, stop_token_ids=[])
    assert stream.result is not None and text == one_shot.text == stream.result.text
    assert (
        one_shot.token_ids
        == reference.generate(PROMPT, max_new_tokens=8, stop_token_ids=[]).token_ids
    )


def test_stop_string_ends_generation(model: infopt.Model) -> None:
    free = model.generate(PROMPT, max_new_tokens=8, stop_token_ids=[])
    stop = free.text[3:6]
    assert stop.strip(), free.text
    stopped = model.generate(PROMPT, max_new_tokens=8, stop_token_ids=[], stop=stop)
    assert stopped.finish_reason == "stop" and stopped.text == free.text[: free.text.index(stop)]


def test_prompt_beyond_the_context_is_refused(model: infopt.Model) -> None:
    with pytest.raises(ContextLengthError):
        model.generate("hello " * 40, max_new_tokens=4)
    assert model.generate(PROMPT, max_new_tokens=3, stop_token_ids=[]).finish_reason == "length"
