"""PyTorch runtime: the model core in eager mode, on the CPU or CUDA."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from infopt.core.model import Decoder, load_core, pick_device
from infopt.runtimes.base import Artifact, BaseRuntime, check_numerics

if TYPE_CHECKING:
    from infopt.importers import ModelSource

# Attention reads cache slots [0, window); rounding the window up keeps shapes few and cheap.
WINDOW_STEP = 256


class PyTorchRuntime(BaseRuntime):
    name = "pytorch"
    max_pass = None  # one pass, whatever its length

    def __init__(self, model: Decoder, max_context: int) -> None:
        super().__init__(max_context, model.spec.vocab_size)
        self.model = model.eval()
        self.device = str(model.norm.weight.device)
        self.kernels: dict[str, int] = {}  # quantized layers by the packed form they run in
        if model.max_len != max_context:
            model.setup_cache(max_context)

    def _pass(self, ids: np.ndarray, only_last: bool) -> np.ndarray:
        n, start = len(ids), self.position
        device = self.model.norm.weight.device
        tokens = torch.from_numpy(ids).to(device)[None, :]
        pos = torch.arange(start, start + n, device=device)
        window = min(self.max_context, -(-(start + n) // WINDOW_STEP) * WINDOW_STEP)
        with torch.inference_mode():
            logits = self.model(tokens, pos, window, last_only=only_last)[0]
        self.position = start + n
        return logits.float().cpu().numpy()


def from_source(
    source: ModelSource,
    *,
    max_context: int,
    device: str | None = None,
    dtype: str = "float32",
    threads: int | None = None,
    numerics: str = "fast",
) -> PyTorchRuntime:
    """Build the model core from an imported model's weights (float: exact in either
    `numerics`, at `dtype`)."""
    check_numerics(numerics)
    if threads is not None:
        torch.set_num_threads(threads)
    core = load_core(source, max_context, device=device, dtype=dtype)
    rt = PyTorchRuntime(core, max_context)
    rt.numerics = numerics
    return rt


def from_model(
    core: Decoder, *, max_context: int, threads: int | None = None, numerics: str = "fast"
) -> PyTorchRuntime:
    """Run a model core (as compressed, if it is) as it is: quantized layers dequantize on the
    fly in float32, exact in either `numerics`."""
    check_numerics(numerics)
    if threads is not None:
        torch.set_num_threads(threads)
    rt = PyTorchRuntime(core, max_context)
    rt.numerics = numerics
    return rt


def from_bundle(
    artifact: Artifact,
    *,
    max_context: int,
    device: str | None = None,
    threads: int | None = None,
    numerics: str = "fast",
) -> PyTorchRuntime:
    """The model core from a verified bundle's infopt weight file. numerics "fast": quantized
    layers on the CPU run on PyTorch's packed kernels in bfloat16 (`kernels.pack_model`);
    "exact": they dequantize on the fly in float32 (slower than float32)."""
    from infopt.core.weights import load_model
    from infopt.runtimes.pytorch.kernels import pack_model

    check_numerics(numerics)
    if threads is not None:
        torch.set_num_threads(threads)
    core = load_model(artifact.file(), device=pick_device(device))
    kernels = pack_model(core) if numerics == "fast" else {}
    runtime = PyTorchRuntime(core, max_context)
    runtime.kernels = kernels
    runtime.numerics = numerics
    return runtime
