"""Decoding over any runtime, on numpy logits: `sampling`, the `generate` loop (steps, a stream
of typed responses, one-shot results), `speculative` decoding and its `drafters`."""
