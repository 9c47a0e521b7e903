"""Sampling: masks on known distributions, seeds, penalties, and argument validation."""

from __future__ import annotations

import math

import numpy as np
import pytest

from infopt.decode.sampling import SamplingParams, apply_repetition_penalty, probabilities, sample
from infopt.errors import InvalidArgumentError

# probabilities 0.4, 0.3, 0.2, 0.1 at temperature 1
P = np.array([0.4, 0.3, 0.2, 0.1])
LOGITS = np.log(P).astype(np.float32)


def probs(**kw: float) -> np.ndarray:
    return probabilities(LOGITS, SamplingParams(temperature=1.0, **kw))  # type: ignore[arg-type]


def test_temperature_one_is_softmax() -> None:
    np.testing.assert_allclose(probs(), P, atol=1e-6)


def test_temperature_sharpens_and_flattens() -> None:
    cold = probabilities(LOGITS, SamplingParams(temperature=0.5))
    np.testing.assert_allclose(cold, P**2 / (P**2).sum(), atol=1e-6)
    hot = probabilities(LOGITS, SamplingParams(temperature=2.0))
    np.testing.assert_allclose(hot, np.sqrt(P) / np.sqrt(P).sum(), atol=1e-6)


def test_top_k_keeps_k_best() -> None:
    np.testing.assert_allclose(probs(top_k=2), [4 / 7, 3 / 7, 0, 0], atol=1e-6)
    np.testing.assert_allclose(probs(top_k=10), P, atol=1e-6)


@pytest.mark.parametrize(("top_p", "kept"), [(0.39, 1), (0.5, 2), (0.69, 2), (0.71, 3), (0.95, 4)])
def test_top_p_keeps_smallest_set_reaching_p(top_p: float, kept: int) -> None:
    expected = np.where(np.arange(4) < kept, P, 0)
    np.testing.assert_allclose(probs(top_p=top_p), expected / expected.sum(), atol=1e-6)


def test_min_p_drops_tokens_below_fraction_of_best() -> None:
    # 0.45 * 0.4 = 0.18: keeps 0.4, 0.3, 0.2
    np.testing.assert_allclose(probs(min_p=0.45), [0.4 / 0.9, 0.3 / 0.9, 0.2 / 0.9, 0], atol=1e-6)
    np.testing.assert_allclose(probs(min_p=0.6), [4 / 7, 3 / 7, 0, 0], atol=1e-6)


def test_greedy_is_argmax() -> None:
    rng = np.random.default_rng(0)
    assert sample(LOGITS, SamplingParams(), rng) == 0


def test_same_seed_same_samples_and_frequencies_follow_p() -> None:
    params = SamplingParams(temperature=1.0, seed=7)
    draws = [sample(LOGITS, params, np.random.default_rng(7)) for _ in range(3)]
    assert len(set(draws)) == 1
    rng = np.random.default_rng(123)
    counts = np.bincount([sample(LOGITS, params, rng) for _ in range(20000)], minlength=4)
    np.testing.assert_allclose(counts / counts.sum(), P, atol=0.015)


def test_masked_tokens_are_never_sampled() -> None:
    rng = np.random.default_rng(0)
    params = SamplingParams(temperature=1.0, top_k=2)
    assert {sample(LOGITS, params, rng) for _ in range(2000)} == {0, 1}


def test_repetition_penalty_as_hf() -> None:
    logits = np.array([2.0, -2.0, 1.0, 0.5], dtype=np.float32)
    out = apply_repetition_penalty(logits, [0, 1, 1], 2.0)
    np.testing.assert_allclose(out, [1.0, -4.0, 1.0, 0.5])
    assert (
        sample(logits, SamplingParams(repetition_penalty=3.0), np.random.default_rng(), seen=[0])
        == 2
    )


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", -0.1),
        ("temperature", math.nan),
        ("temperature", math.inf),
        ("temperature", "hot"),
        ("top_k", -1),
        ("top_k", 2.5),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("top_p", math.nan),
        ("min_p", 1.0),
        ("min_p", -0.1),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", math.nan),
        ("seed", -3),
        ("seed", 1.5),
    ],
)
def test_bad_values_are_typed_errors_naming_the_field(field: str, value: object) -> None:
    with pytest.raises(InvalidArgumentError, match=field):
        SamplingParams(**{field: value})  # type: ignore[arg-type]
