"""Drafters for speculative decoding: something that proposes the next few tokens cheaply.

`ModelDrafter` runs a draft model on any runtime (an INT4 self-draft, a distilled student, any
model with the same vocabulary), keeping its KV cache in step with the accepted text by rewinding
to the longest common prefix. `NgramDrafter` is prompt lookup: it copies what followed the
latest earlier occurrence of the context's last n tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

from infopt.decode.sampling import SamplingParams, apply_repetition_penalty, probabilities
from infopt.errors import InvalidArgumentError
from infopt.runtimes import Runtime, run_prefill

MAX_DRAFT = 16  # the adaptive draft length's ceiling


class DraftMismatchError(InvalidArgumentError):
    """A draft model that cannot draft for this target (another vocabulary)."""


class Drafter(Protocol):
    vocab_size: int
    default_tokens: int  # the draft length to start from

    def reset(self) -> None: ...

    def prefill(self, context: Sequence[int]) -> None:
        """Take in the prompt before decoding starts (a draft model fills its cache)."""
        ...

    def propose(
        self,
        context: Sequence[int],
        k: int,
        params: SamplingParams,
        rng: np.random.Generator,
    ) -> tuple[list[int], np.ndarray | None]:
        """Up to k tokens to follow `context`, and the distributions they were drawn from
        ([n, vocab]; None for a deterministic drafter)."""
        ...


class ModelDrafter:
    """A draft model on any runtime, its KV cache kept in step with the accepted text by
    rewinding to the longest common prefix."""

    default_tokens = 4

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.vocab_size = runtime.vocab_size
        self._cached: list[int] = []

    def reset(self) -> None:
        self.runtime.reset()
        self._cached = []

    def prefill(self, context: Sequence[int]) -> None:
        self.reset()
        if len(context) > 1:  # the newest token goes in with the first draft
            run_prefill(self.runtime, context[:-1])
        self._cached = list(context[:-1])

    def propose(
        self,
        context: Sequence[int],
        k: int,
        params: SamplingParams,
        rng: np.random.Generator,
    ) -> tuple[list[int], np.ndarray | None]:
        rt = self.runtime
        k = min(k, rt.max_context - len(context) + 1)
        if k < 1:
            return [], None
        same = common_prefix(self._cached, context)
        same = min(same, len(context) - 1)  # at least one token goes in, for its logits
        rt.rewind(rt.position - same)
        logits = rt.forward(context[same:], only_last=True)[-1]
        tokens: list[int] = []
        dists: list[np.ndarray] = []
        penalty = params.repetition_penalty
        for i in range(k):
            seen = [*context, *tokens] if penalty != 1 else []
            z = apply_repetition_penalty(logits, seen, penalty)
            if params.greedy:
                tokens.append(int(np.argmax(z)))
            else:
                q = probabilities(z, params)
                dists.append(q)
                tokens.append(draw(q, rng))
            if i < k - 1:
                logits = rt.forward(tokens[-1:])[-1]
        self._cached = [*context, *tokens[:-1]]
        return tokens, (np.stack(dists) if dists else None)


class NgramDrafter:
    """Prompt lookup (as `prompt_lookup_num_tokens` in transformers): find the latest earlier
    occurrence of the context's last n tokens (n from `max_ngram` down to `min_ngram`) and
    propose the tokens that followed it. No model; gains where the output copies the input."""

    default_tokens = 8

    def __init__(self, vocab_size: int, max_ngram: int = 3, min_ngram: int = 1) -> None:
        if not 1 <= min_ngram <= max_ngram:
            raise InvalidArgumentError(
                f"ngram sizes {min_ngram}..{max_ngram}: need 1 <= min_ngram <= max_ngram"
            )
        self.vocab_size = vocab_size
        self.max_ngram, self.min_ngram = max_ngram, min_ngram

    def reset(self) -> None:
        pass

    def prefill(self, context: Sequence[int]) -> None:
        pass

    def propose(
        self,
        context: Sequence[int],
        k: int,
        params: SamplingParams,
        rng: np.random.Generator,
    ) -> tuple[list[int], np.ndarray | None]:
        ids = np.asarray(context, dtype=np.int64)
        for n in range(min(self.max_ngram, len(ids) - 1), self.min_ngram - 1, -1):
            windows = np.lib.stride_tricks.sliding_window_view(ids[:-1], n)
            hits = np.flatnonzero((windows == ids[-n:]).all(axis=1))
            if hits.size:
                start = int(hits[-1]) + n  # the latest occurrence: most like what comes next
                return ids[start : start + k].tolist(), None
        return [], None


def check_drafter(target: Runtime, drafter: Drafter) -> None:
    if drafter.vocab_size != target.vocab_size:
        raise DraftMismatchError(
            f"the draft's vocabulary has {drafter.vocab_size} tokens and the target's "
            f"{target.vocab_size}: a draft must share the target's tokenizer"
        )


def check_draft_tokens(k: object) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_DRAFT:
        raise InvalidArgumentError(
            f"num_draft_tokens={k!r}: must be an integer from 1 to {MAX_DRAFT}"
        )
    return k


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def draw(p: np.ndarray, rng: np.random.Generator) -> int:
    return min(int(np.searchsorted(np.cumsum(p), rng.random(), side="right")), p.size - 1)
