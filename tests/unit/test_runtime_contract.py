"""The runtime protocol's semantics, run over every installed runtime (the PyTorch one for now)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import infopt
from infopt.errors import ContextLengthError, InvalidArgumentError
from infopt.runtimes import Runtime, available

RUNTIMES = [name for name in available() if name == "pytorch"]
TOKENS = [5, 17, 42, 99, 3, 250, 77, 8, 120, 64]


@pytest.fixture(params=RUNTIMES)
def rt(request: pytest.FixtureRequest, tiny_gguf: Path) -> Runtime:
    return infopt.load(tiny_gguf, runtime=request.param, max_context=32).runtime


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
