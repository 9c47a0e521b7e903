"""The shapes a Core ML artifact is compiled for, shared by its exporter and its runtime (no
torch, no coremltools)."""

from __future__ import annotations

import numpy as np

WINDOWS = (1, 8, 64)  # decode, verify (k+1 <= 8), prefill chunk


def cache_len(max_context: int) -> int:
    return max_context + max(WINDOWS)  # room for a padded window at the end of the context


def causal_mask(start: int, window: int, length: int, sliding: int | None = None) -> np.ndarray:
    """The additive mask [1, 1, window, length] for a window whose first token is at `start`."""
    pos = start + np.arange(window)[:, None]
    keys = np.arange(length)[None, :]
    visible = keys <= pos
    if sliding is not None:
        visible &= keys > pos - sliding
    return np.where(visible, 0.0, -np.inf).astype(np.float16)[None, None]
