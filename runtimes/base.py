"""What every runtime shares, written once: the position in the KV cache and the checks on every
call (`BaseRuntime`), long inputs split into passes, fixed compiled windows with padding
(`FixedWindowRuntime`), and the artifact reference a bundle hands a runtime (`Artifact`).
No torch and no runtime package is imported here."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from infopt.core.defaults import PREFILL_CHUNK
from infopt.errors import ContextLengthError, InvalidArgumentError

if TYPE_CHECKING:
    from infopt.core.model import Decoder
    from infopt.importers import ModelSource

Writers = dict[str, Callable[[Path], object]]  # file path in a bundle -> what writes it
# what a target's `export.artifact(core, max_context, prefix)` returns: its manifest entry and
# the writers of its files
Exported = tuple[dict[str, Any], Writers]


@dataclass(frozen=True)
class Artifact:
    """One runtime's files in a verified bundle (the model's or its draft's), with what its
    runtime needs to load them."""

    root: Path
    entry: Mapping[str, Any]  # the manifest's artifacts[runtime]
    config: Mapping[str, Any]  # the model's config (ModelSpec.to_dict())
    weights: Mapping[str, str] = field(default_factory=dict)  # tensor group -> scheme
    kv_dtype: str | None = None  # the plan's KV-cache dtype

    def file(self, index: int = 0) -> Path:
        return self.root / self.entry["files"][index]

    @property
    def vocab_size(self) -> int:
        return int(self.config["vocab_size"])

    @property
    def quantized(self) -> bool:
        """Whether any tensor group is stored as integers."""
        return any(str(w).startswith("int") for w in self.weights.values())

    def check_context(self, max_context: int, what: str) -> None:
        """Refuse a KV cache larger than the positions the artifact was exported for."""
        if max_context > int(self.entry["max_context"]):
            raise InvalidArgumentError(
                f"max_context={max_context} exceeds the {self.entry['max_context']} positions "
                f"this {what} was exported for; rebuild with a larger --context"
            )


# How a runtime computes against quantized weights. "fast": the runtime's fastest CPU kernels,
# which may round activations (to int8 or bfloat16, on some CPUs only); "exact": float32
# activations against the stored weights, so results differ between CPUs only by float32
# summation order (each target's runtime module says how it gets there). Float weights
# compute in float32 either way.
NUMERICS = ("fast", "exact")


def check_numerics(numerics: object) -> str:
    if numerics not in NUMERICS:
        raise InvalidArgumentError(f"numerics={numerics!r}: expected one of {list(NUMERICS)}")
    return str(numerics)


def no_exact_numerics(runtime: str, numerics: str, why: str) -> None:
    """A typed refusal of numerics="exact" on a runtime that has no such mode (`why`)."""
    if check_numerics(numerics) == "exact":
        raise InvalidArgumentError(f"numerics='exact' is not available on {runtime}: {why}")


def check_slots(slots: object) -> int:
    if isinstance(slots, bool) or not isinstance(slots, int) or slots < 1:
        raise InvalidArgumentError(f"slots={slots!r}: must be a positive integer")
    return slots


def cpu_only(runtime: str, device: str | None) -> None:
    if not isinstance(device, (str, type(None))) or device not in (None, "cpu", "auto"):
        raise InvalidArgumentError(f"device {device!r}: the {runtime} runtime runs on the CPU")


def exportable_core(source: ModelSource, runtime: str, max_context: int, dtype: str) -> Decoder:
    """The float32 model core of an imported model on the CPU (needs torch), for a target that
    exports it before running it."""
    from infopt.core.model import load_core

    if dtype != "float32":
        raise InvalidArgumentError(f"dtype {dtype!r}: the {runtime} runtime computes in float32")
    return load_core(source, max_context, device="cpu")


class BaseRuntime:
    """A runtime's bookkeeping: `position` (tokens in its KV cache), the checks every call makes
    (no empty input, ids inside the vocabulary, the context limit, rewinds within what is
    cached), and inputs longer than `max_pass` split into several passes. Subclasses implement
    `_pass` (one pass of the underlying model) and, if they keep state beyond the position,
    `_rewound` and `_reset`.

    A runtime may hold several KV states, `rows` (one per concurrent request, as the slots of
    llama.cpp's server): `select(row)` picks the one that `forward`, `rewind`, `reset` and
    `position` act on. Where `batched`, `decode_batch` feeds one token to each of rows 0..n-1 in
    one pass, each at its own position; `swap_rows` moves requests' states so that the ones
    decoding together are those first rows."""

    name: str
    device = "cpu"
    numerics = "fast"  # NUMERICS: how it was loaded
    batch_exact = True
    verify_window: int | None = None
    max_pass: int | None = PREFILL_CHUNK  # tokens per pass of the underlying model; None: any
    batched = False  # whether decode_batch runs several rows in one pass

    def __init__(self, max_context: int, vocab_size: int, rows: int = 1) -> None:
        check_slots(rows)
        self.max_context = max_context
        self.vocab_size = vocab_size
        self.rows = rows
        self.positions = [0] * rows
        self.row = 0
        self.changes = 0  # calls that changed a KV state, so a user of rows can tell

    @property
    def position(self) -> int:
        """Tokens in the selected row's KV cache."""
        return self.positions[self.row]

    @position.setter
    def position(self, value: int) -> None:
        self.positions[self.row] = value

    def select(self, row: int) -> None:
        """Make `row` the KV state that forward, rewind, reset and position act on."""
        if not 0 <= row < self.rows:
            raise InvalidArgumentError(f"row {row}: this runtime holds rows 0 to {self.rows - 1}")
        if row != self.row:
            self.row = row
            self._selected()

    def _selected(self) -> None:
        """`self.row` changed; a runtime whose passes read the row from elsewhere switches here."""

    def decode_batch(self, tokens: Sequence[int]) -> np.ndarray:
        """One token for each of rows 0..len(tokens)-1, each at its own position, in one pass:
        logits [len(tokens), vocab]. Only where `batched`."""
        n = len(tokens)
        if not self.batched or not 1 <= n <= self.rows:
            raise InvalidArgumentError(
                f"decode_batch of {n} rows: this runtime batches {self.rows if self.batched else 1}"
            )
        ids = np.asarray(tokens, dtype=np.int64)
        if ids.min() < 0 or ids.max() >= self.vocab_size:
            raise InvalidArgumentError(f"token ids must be in [0, {self.vocab_size})")
        full = [r for r in range(n) if self.positions[r] + 1 > self.max_context]
        if full:
            raise ContextLengthError(
                f"row {full[0]} holds {self.positions[full[0]]} tokens: no room for another in "
                f"the context window of {self.max_context}"
            )
        self.changes += 1
        logits = self._decode_batch(ids)
        for r in range(n):
            self.positions[r] += 1
        return logits

    def _decode_batch(self, ids: np.ndarray) -> np.ndarray:
        """One pass of ids[r] at positions[r] for rows r < len(ids) (not yet advanced)."""
        raise NotImplementedError

    def swap_rows(self, a: int, b: int) -> None:
        """Exchange the KV states of rows a and b."""
        for r in (a, b):
            if not 0 <= r < self.rows:
                raise InvalidArgumentError(f"row {r}: this runtime holds rows 0 to {self.rows - 1}")
        if a == b:
            return
        self.changes += 1
        self._swap_rows(a, b, max(self.positions[a], self.positions[b]))
        self.positions[a], self.positions[b] = self.positions[b], self.positions[a]

    def _swap_rows(self, a: int, b: int, used: int) -> None:
        """Exchange the first `used` cached positions of rows a and b."""
        raise NotImplementedError

    def forward(self, tokens: Sequence[int], only_last: bool = False) -> np.ndarray:
        n = len(tokens)
        if n == 0:
            raise InvalidArgumentError("forward() needs at least one token")
        if self.position + n > self.max_context:
            raise ContextLengthError(
                f"{self.position} cached + {n} new tokens exceed the context window of "
                f"{self.max_context}"
            )
        ids = np.asarray(tokens, dtype=np.int64)
        if ids.min() < 0 or ids.max() >= self.vocab_size:
            raise InvalidArgumentError(f"token ids must be in [0, {self.vocab_size})")
        self.changes += 1
        parts, done = [], 0
        for size in self._split(n, only_last):
            parts.append(self._pass(ids[done : done + size], only_last))
            done += size
        if only_last:
            return parts[-1]
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def _split(self, n: int, only_last: bool) -> list[int]:
        """Token counts of the passes covering n tokens."""
        step = self.max_pass or n
        return [min(step, n - start) for start in range(0, n, step)]

    def _pass(self, ids: np.ndarray, only_last: bool) -> np.ndarray:
        """One pass at `self.position`, which it advances: logits [len(ids) or 1, vocab]."""
        raise NotImplementedError

    def rewind(self, n: int) -> None:
        if not 0 <= n <= self.position:
            raise InvalidArgumentError(f"rewind({n}): only {self.position} positions are cached")
        self.position -= n
        self.changes += 1
        if n:
            self._rewound()

    def _rewound(self) -> None:
        """Positions from `self.position` on were dropped. By default nothing else to do: the
        stale slots are masked out, then overwritten."""

    def reset(self) -> None:
        self.position = 0
        self.changes += 1
        self._reset()

    def _reset(self) -> None:
        """The cache was emptied; state beyond the position is reset here."""


class FixedWindowRuntime(BaseRuntime):
    """A model compiled for a few fixed windows of tokens (decode 1, verify 8, prefill 64, ...):
    each pass is padded to the smallest window that fits, and a longer input takes several.
    Windows in `last_only` return only their last real position's logits, so they serve
    passes whose other logits are not wanted. Speculative drafts are capped by the smallest
    window above one token that returns every position (`verify_window`)."""

    max_pass = None

    def __init__(
        self,
        max_context: int,
        vocab_size: int,
        windows: Sequence[int],
        last_only: Sequence[int] = (),
    ) -> None:
        super().__init__(max_context, vocab_size)
        self.windows = tuple(sorted(int(w) for w in windows))
        self.last_only = frozenset(int(w) for w in last_only)
        every = [w for w in self.windows if w not in self.last_only]
        self.verify_window = next((w for w in every if w > 1), 1)

    def window_for(self, remaining: int, only_last: bool) -> int:
        """The smallest usable window that holds `remaining` tokens, else the largest."""
        usable = [w for w in self.windows if only_last or w not in self.last_only]
        return next((w for w in usable if w >= remaining), usable[-1])

    def _split(self, n: int, only_last: bool) -> list[int]:
        sizes: list[int] = []
        while (done := sum(sizes)) < n:
            sizes.append(min(self.window_for(n - done, only_last), n - done))
        return sizes

    def _pass(self, ids: np.ndarray, only_last: bool) -> np.ndarray:
        window = self.window_for(len(ids), only_last)
        padded = np.zeros((1, window), np.int32)
        padded[0, : len(ids)] = ids
        return self._run_window(padded, len(ids), only_last)

    def _run_window(self, padded: np.ndarray, n: int, only_last: bool) -> np.ndarray:
        """One call of the window `padded.shape[1]` holding n real tokens at `self.position`,
        which it advances by n: logits [n or 1, vocab]."""
        raise NotImplementedError
