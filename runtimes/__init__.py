"""Runtimes: one folder per target (`runtimes/<name>/`: its runtime, its exporter, its checks and
a metadata record), found by `infopt.runtimes.registry`, behind one protocol.

A runtime only turns token ids into logits and keeps its KV state; sampling, stop conditions,
streaming, speculative decoding and statistics live once, in `infopt.decode`. What runtimes
share (the checks on every call, long inputs split into passes, fixed windows padded) is in
`infopt.runtimes.base`. Each target's `runtime` module makes one three ways:
`from_bundle(artifact, *, max_context, device, threads)` from a verified bundle's artifact,
`from_source(source, *, max_context, device, dtype, threads)` from a model file (converted
first where the target needs it), and `from_model(core, *, max_context, ...)` from a model core
as compressed (its other keywords are the target's own).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np

from infopt.core.defaults import PREFILL_CHUNK
from infopt.errors import InvalidArgumentError
from infopt.runtimes.registry import Target, names, reference, target, targets

__all__ = ["Runtime", "Target", "names", "reference", "run_prefill", "target", "targets"]


@runtime_checkable
class Runtime(Protocol):
    name: str  # the target's name
    device: str  # where it computes: "cpu", "cuda:0", or the target's own device name
    max_context: int  # positions the KV cache holds
    vocab_size: int
    position: int  # tokens currently in the KV cache
    batch_exact: bool  # a k-token pass gives the logits of k one-token steps, exactly
    verify_window: int | None  # the most tokens one verify pass takes (fixed shapes); None: any
    rows: int  # KV states held (one per concurrent request); `select` picks the current one
    batched: bool  # decode_batch feeds rows 0..n-1 one token each in one pass
    changes: int  # counts the calls that changed a KV state

    def select(self, row: int) -> None: ...

    def decode_batch(self, tokens: Sequence[int]) -> np.ndarray:
        """Logits [len(tokens), vocab] of one token for each of rows 0..len(tokens)-1."""
        ...

    def swap_rows(self, a: int, b: int) -> None: ...

    def forward(self, tokens: Sequence[int], only_last: bool = False) -> np.ndarray:
        """Append `tokens` to the KV state; float32 logits [len(tokens), vocab] ([1, vocab] with
        only_last, which prefill uses to skip the LM head on all but the last position)."""
        ...

    def rewind(self, n: int) -> None:
        """Drop the last n positions (rejected draft tokens)."""
        ...

    def reset(self) -> None: ...


def run_prefill(runtime: Runtime, ids: Sequence[int]) -> np.ndarray:
    """Feed a prompt in passes of PREFILL_CHUNK tokens; the logits [vocab] after its last one."""
    if not len(ids):
        raise InvalidArgumentError("the prompt is empty: prefill needs at least one token")
    for start in range(0, len(ids), PREFILL_CHUNK):
        logits = runtime.forward(ids[start : start + PREFILL_CHUNK], only_last=True)[-1]
    return logits
