"""PyTorch runtime: the model core in eager mode, on the CPU or CUDA."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from infopt.core.model import Decoder, KVCache, attend, load_core, pick_device
from infopt.runtimes.base import Artifact, BaseRuntime, check_numerics

if TYPE_CHECKING:
    from infopt.importers import ModelSource

# Attention reads cache slots [0, window); rounding the window up keeps shapes few and cheap.
WINDOW_STEP = 256


class PyTorchRuntime(BaseRuntime):
    name = "pytorch"
    max_pass = None  # one pass, whatever its length

    def __init__(self, model: Decoder, max_context: int, rows: int = 1) -> None:
        super().__init__(max_context, model.spec.vocab_size, rows)
        self.model = model.eval()
        self.device = str(model.norm.weight.device)
        self.kernels: dict[str, int] = {}  # quantized layers by the packed form they run in
        if model.max_len != max_context:
            model.setup_cache(max_context)
        self.batched = rows > 1
        # With several rows, each layer's cache becomes [rows, ...]; a row's passes run the
        # model core unchanged on a KVCache viewing that row, a batched decode reads the first
        # rows (`_decode_batch`).
        self._full: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._views: list[list[KVCache]] = []
        if rows > 1:
            for block in model.blocks:
                cache = block.self_attn.cache
                assert cache is not None, "setup_cache() made one per layer"
                self._full.append((_rows_like(cache.k, rows), _rows_like(cache.v, rows)))
            self._views = [[_row_view(k, v, r) for k, v in self._full] for r in range(rows)]
            self._selected()

    def _selected(self) -> None:
        if self._views:
            for block, view in zip(self.model.blocks, self._views[self.row], strict=True):
                block.self_attn.cache = view

    def _pass(self, ids: np.ndarray, only_last: bool) -> np.ndarray:
        n, start = len(ids), self.position
        device = self.model.norm.weight.device
        tokens = torch.from_numpy(ids).to(device)[None, :]
        pos = torch.arange(start, start + n, device=device)
        window = _window(start + n, self.max_context)
        with torch.inference_mode():
            logits = self.model(tokens, pos, window, last_only=only_last)[0]
        self.position = start + n
        return logits.float().cpu().numpy()

    def _decode_batch(self, ids: np.ndarray) -> np.ndarray:
        """The model core's forward for one token per row, each row at its own position: the
        same modules, with per-row rotary angles, cache writes and causal masks."""
        model, n = self.model, len(ids)
        device = model.norm.weight.device
        pos = torch.tensor(self.positions[:n], device=device)
        window = _window(max(self.positions[:n]) + 1, self.max_context)
        keys = torch.arange(window, device=device)[None, :]
        masks = {}  # per layer kind: [n, kv heads, query rows, window]
        for kind in set(model.spec.layer_kinds):
            visible = keys <= pos[:, None]
            if (sliding := model.spec.window_of(kind)) is not None:
                visible = visible & (keys > pos[:, None] - sliding)
            masks[kind] = visible[:, None, None, :]
        rows = torch.arange(n, device=device)
        with torch.inference_mode():
            x = model.embed(torch.from_numpy(ids).to(device)[:, None])  # [n, 1, hidden]
            ropes = {
                kind: tuple(t[:, None, None] for t in model.rope_at(kind, pos)) for kind in masks
            }
            for block, (k_all, v_all) in zip(model.blocks, self._full, strict=True):
                a = block.self_attn
                cos, sin = ropes[a.kind]
                q, k, v = a.project(block.input_layernorm(x), cos, sin)  # [n, H, 1, D]
                k_all[rows, :, pos] = k[:, :, 0]
                v_all[rows, :, pos] = v[:, :, 0]
                groups = a.n_heads // a.n_kv
                out = attend(
                    q.reshape(n, a.n_kv, groups, a.head_dim),
                    k_all[:n, :, :window],
                    v_all[:n, :, :window],
                    masks[a.kind],
                    a.scale,
                    a.softcap,
                )
                x = block.attn_residual(x, a.o_proj(out.reshape(n, 1, a.n_heads * a.head_dim)))
                x = block.ffn(x)
            logits = model.head(x)[:, 0]
        return logits.float().cpu().numpy()

    def _swap_rows(self, a: int, b: int, used: int) -> None:
        with torch.inference_mode():
            for pair in self._full:
                for t in pair:
                    held = t[a, :, :used].clone()
                    t[a, :, :used] = t[b, :, :used]
                    t[b, :, :used] = held


def _window(filled: int, max_context: int) -> int:
    """The cache slots a pass attends to: the filled ones, rounded up to WINDOW_STEP."""
    return min(max_context, -(-filled // WINDOW_STEP) * WINDOW_STEP)


def _rows_like(t: torch.Tensor, rows: int) -> torch.Tensor:
    """A zeroed [rows, ...] cache like the one-row `t`; on the CPU through numpy, whose zeroed
    pages become resident only once a row uses them."""
    shape = (rows, *t.shape[1:])
    if t.device.type == "cpu" and t.dtype == torch.float32:
        return torch.from_numpy(np.zeros(shape, np.float32))
    return torch.zeros(shape, dtype=t.dtype, device=t.device)


def _row_view(k: torch.Tensor, v: torch.Tensor, row: int) -> KVCache:
    """A KVCache whose buffers are row `row` of the [rows, ...] caches (writes go through)."""
    view = KVCache(1, 1, 1, 1, k.dtype)
    view.k, view.v = k[row : row + 1], v[row : row + 1]
    return view


def from_source(
    source: ModelSource,
    *,
    max_context: int,
    device: str | None = None,
    dtype: str = "float32",
    threads: int | None = None,
    numerics: str = "fast",
    slots: int = 1,
) -> PyTorchRuntime:
    """Build the model core from an imported model's weights (float: exact in either
    `numerics`, at `dtype`), with `slots` KV states."""
    check_numerics(numerics)
    if threads is not None:
        torch.set_num_threads(threads)
    core = load_core(source, max_context, device=device, dtype=dtype)
    rt = PyTorchRuntime(core, max_context, slots)
    rt.numerics = numerics
    return rt


def from_model(
    core: Decoder,
    *,
    max_context: int,
    threads: int | None = None,
    numerics: str = "fast",
    slots: int = 1,
) -> PyTorchRuntime:
    """Run a model core (as compressed, if it is) as it is: quantized layers dequantize on the
    fly in float32, exact in either `numerics`."""
    check_numerics(numerics)
    if threads is not None:
        torch.set_num_threads(threads)
    rt = PyTorchRuntime(core, max_context, slots)
    rt.numerics = numerics
    return rt


def from_bundle(
    artifact: Artifact,
    *,
    max_context: int,
    device: str | None = None,
    threads: int | None = None,
    numerics: str = "fast",
    slots: int = 1,
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
    runtime = PyTorchRuntime(core, max_context, slots)
    runtime.kernels = kernels
    runtime.numerics = numerics
    return runtime
