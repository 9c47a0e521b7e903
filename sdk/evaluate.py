"""Quality of a model on a text: sliding-window perplexity, and against a reference model the
mean KL divergence KL(reference || model) and top-1 agreement, over the same positions.

Works over any runtime through the protocol's `forward` (all-position logits).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from infopt.errors import InvalidArgumentError
from infopt.runtimes import Runtime


@dataclass(frozen=True)
class Quality:
    perplexity: float
    tokens: int  # positions scored
    kl: float | None = None  # mean KL(reference || model), nats per token
    top1: float | None = None  # fraction of positions where both argmaxes agree
    reference_perplexity: float | None = None

    def to_dict(self) -> dict[str, float | int | None]:
        return asdict(self)


def windows(n: int, window: int, stride: int) -> Iterator[tuple[int, int, int]]:
    """(start, end, first scored position) covering tokens 1..n-1 once each: every window
    after the first re-reads window - stride tokens of context and scores only the new ones."""
    if not 0 < stride <= window:
        raise InvalidArgumentError(f"stride={stride}: must be in (0, window={window}]")
    if n < 2:
        raise InvalidArgumentError(f"the evaluation text is too short: {n} tokens, need >= 2")
    scored = 1
    start = 0
    while scored < n:
        end = min(start + window, n)
        yield start, end, scored
        scored = end
        start = max(0, end - (window - stride)) if end < n else end


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z -= z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def evaluate(
    runtime: Runtime,
    ids: Sequence[int],
    reference: Runtime | None = None,
    *,
    window: int = 512,
    stride: int | None = None,
) -> Quality:
    """Perplexity of `ids` under `runtime` (and KL / top-1 against `reference`); windows of
    `window` tokens (at most the runtime's context) advance by `stride` (default: half)."""
    window = min(window, runtime.max_context)
    stride = stride or window // 2
    nll, kl, agree, ref_nll, count = 0.0, 0.0, 0, 0.0, 0
    for start, end, first in windows(len(ids), window, stride):
        chunk = list(ids[start:end])
        runtime.reset()
        logp = _log_softmax(runtime.forward(chunk))[first - start - 1 : end - start - 1]
        targets = np.asarray(ids[first:end])
        rows = np.arange(len(targets))
        nll -= logp[rows, targets].sum()
        count += len(targets)
        if reference is not None:
            reference.reset()
            ref = _log_softmax(reference.forward(chunk))[first - start - 1 : end - start - 1]
            ref_nll -= ref[rows, targets].sum()
            kl += (np.exp(ref) * (ref - logp)).sum()
            agree += int((ref.argmax(-1) == logp.argmax(-1)).sum())
    if reference is None:
        return Quality(float(np.exp(nll / count)), count)
    return Quality(
        float(np.exp(nll / count)), count, kl / count, agree / count, float(np.exp(ref_nll / count))
    )
