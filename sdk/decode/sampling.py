"""Sampling on numpy logits: repetition penalty, temperature, top-k, top-p, min-p (HF semantics)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from infopt.errors import InvalidArgumentError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        def bad(name: str, rule: str) -> InvalidArgumentError:
            return InvalidArgumentError(f"{name}={getattr(self, name)!r}: must be {rule}")

        for name in ("temperature", "top_p", "min_p", "repetition_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise bad(name, "a number")
            if not math.isfinite(value):
                raise bad(name, "finite")
        if self.temperature < 0:
            raise bad("temperature", ">= 0 (0 means greedy)")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise bad("top_k", "an integer >= 0 (0 means off)")
        if not 0 < self.top_p <= 1:
            raise bad("top_p", "in (0, 1]")
        if not 0 <= self.min_p < 1:
            raise bad("min_p", "in [0, 1)")
        if self.repetition_penalty <= 0:
            raise bad("repetition_penalty", "> 0 (1 means off)")
        if self.seed is not None and (
            isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0
        ):
            raise bad("seed", "a non-negative integer or None")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def apply_repetition_penalty(logits: np.ndarray, seen: Sequence[int], penalty: float) -> np.ndarray:
    """CTRL-style penalty on every token already seen (prompt included), as HF does."""
    if penalty == 1.0 or not seen:
        return logits
    out = logits.copy()
    ids = np.fromiter(set(seen), dtype=np.int64)
    values = out[ids]
    out[ids] = np.where(values > 0, values / penalty, values * penalty)
    return out


def probabilities(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """The distribution sampling draws from: temperature, then top-k, top-p, min-p masks."""
    z = logits.astype(np.float64) / params.temperature
    if 0 < params.top_k < z.size:
        kth = np.partition(z, -params.top_k)[-params.top_k]
        z = np.where(z < kth, -np.inf, z)
    z -= z.max()
    p = np.exp(z)
    p /= p.sum()
    if params.top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        before = np.cumsum(p[order]) - p[order]  # mass of strictly better-ranked tokens
        drop = order[before >= params.top_p]
        p[drop] = 0.0
    if params.min_p > 0.0:
        p[p < params.min_p * p.max()] = 0.0
    return p / p.sum()


def sample(
    logits: np.ndarray, params: SamplingParams, rng: np.random.Generator, seen: Sequence[int] = ()
) -> int:
    """One token id from logits [V]."""
    logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.greedy:
        return int(np.argmax(logits))
    p = probabilities(logits, params)
    return min(int(np.searchsorted(np.cumsum(p), rng.random(), side="right")), p.size - 1)
