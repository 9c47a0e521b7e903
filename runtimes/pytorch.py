"""PyTorch runtime: the model core in eager mode, on CPU or CUDA."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from infopt.errors import ContextLengthError, InvalidArgumentError
from infopt.model import Decoder, load_state_dict

if TYPE_CHECKING:
    from infopt.importers import ModelSource

# Attention reads cache slots [0, window); rounding the window up keeps shapes few and cheap.
WINDOW_STEP = 256
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class TorchRuntime:
    name = "pytorch"

    def __init__(self, model: Decoder, max_context: int) -> None:
        self.model = model.eval()
        self.device = model.norm.weight.device
        self.max_context = max_context
        self.vocab_size = model.spec.vocab_size
        self.position = 0
        model.setup_cache(max_context)

    def forward(self, tokens: Sequence[int], only_last: bool = False) -> np.ndarray:
        n, start = len(tokens), self.position
        if n == 0:
            raise InvalidArgumentError("forward() needs at least one token")
        if start + n > self.max_context:
            raise ContextLengthError(
                f"{start} cached + {n} new tokens exceed the context window of {self.max_context}"
            )
        ids = torch.tensor([list(tokens)], dtype=torch.long, device=self.device)
        pos = torch.arange(start, start + n, device=self.device)
        window = min(self.max_context, -(-(start + n) // WINDOW_STEP) * WINDOW_STEP)
        with torch.inference_mode():
            logits = self.model(ids, pos, window, last_only=only_last)[0]
        self.position = start + n
        return logits.float().cpu().numpy()

    def rewind(self, n: int) -> None:
        if not 0 <= n <= self.position:
            raise InvalidArgumentError(f"rewind({n}): only {self.position} positions are cached")
        self.position -= n  # stale slots beyond `position` are masked out, then overwritten

    def reset(self) -> None:
        self.position = 0


def pick_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InvalidArgumentError(f"device {device!r} requested but CUDA is not available here")
    return torch.device(device)


def from_source(
    source: ModelSource,
    *,
    max_context: int,
    device: str | None = None,
    dtype: str = "float32",
    threads: int | None = None,
) -> TorchRuntime:
    """Build the model core from an imported model's weights."""
    if dtype not in DTYPES:
        raise InvalidArgumentError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
    if threads is not None:
        torch.set_num_threads(threads)
    target = pick_device(device)
    with torch.device("meta"):
        model = Decoder(source.spec)
    load_state_dict(model, source.iter_weights(), dtype=DTYPES[dtype], device=target)
    return TorchRuntime(model, max_context)


def from_bundle(
    root: Path,
    manifest: dict[str, Any],
    *,
    max_context: int,
    device: str | None = None,
    threads: int | None = None,
) -> TorchRuntime:
    """The model core from a verified bundle's infopt weight file."""
    from infopt.checkpoint import load_model

    if threads is not None:
        torch.set_num_threads(threads)
    files = manifest["artifacts"]["pytorch"]["files"]
    model = load_model(root / files[0], device=pick_device(device))
    return TorchRuntime(model, max_context)
