"""Numbers more than one pipeline stage relies on, defined once."""

from __future__ import annotations

# Prompt tokens per forward pass: prefill, a draft's prefill and the runtimes' own passes split
# longer inputs, so attention's [heads, chunk, context] scores stay bounded; the planner sizes
# activation memory by it.
PREFILL_CHUNK = 512
# KV-cache positions a model file loads with when `max_context` is not given (capped by the
# model's trained context): enough for chat, small enough for a laptop.
DEFAULT_MAX_CONTEXT = 4096
DEFAULT_MAX_NEW_TOKENS = 256
