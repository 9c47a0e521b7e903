"""OpenVINO: the stateful IR of `infopt.runtimes.openvino.export` on the CPU plugin.

One slot: the KV cache is the infer request's internal state (the plugin keeps it in place, as
in OpenVINO GenAI's LLM pipeline); `rewind` trims every state to the kept positions, `reset`
resets them. Several slots (`PagedOpenVINORuntime`): the same IR rewritten at load by
OpenVINO's own SDPA-to-PagedAttention transformation, as OpenVINO GenAI's continuous batching
pipeline runs it: the caches are block tensors the runtime allocates, each row owns a fixed run
of blocks, and one pass decodes every running row at its own position. Compiled with the latency
hint and the thread count from `load(threads=...)`; the KV-cache precision follows the bundle's
plan. Loading a bundle needs openvino, numpy and tokenizers; no torch.
"""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import openvino as ov

from infopt.errors import BundleError
from infopt.runtimes.base import (
    Artifact,
    BaseRuntime,
    check_numerics,
    check_slots,
    cpu_only,
    exportable_core,
)
from infopt.runtimes.openvino import PAGED

if TYPE_CHECKING:
    from infopt.importers import ModelSource

KV_PRECISION = {"fp32": "f32", "fp16": "f16", "bf16": "bf16", "int8": "u8"}
# Latency settings, fp32 compute. On CPUs with VNNI or AMX the plugin also quantizes
# activations dynamically before INT8/INT4 weights (its default there: numerics "fast"), so its
# results depend on the CPU; numerics "exact" turns that off.
COMPILE_CONFIG: dict[str, Any] = {
    "PERFORMANCE_HINT": "LATENCY",
    "NUM_STREAMS": 1,
    "INFERENCE_PRECISION_HINT": "f32",
}
EXACT_CONFIG: dict[str, Any] = {"DYNAMIC_QUANTIZATION_GROUP_SIZE": 0}
CACHE_INPUTS = ("key_cache.", "value_cache.")  # the PagedAttention form's per-layer caches


@functools.cache
def core() -> Any:
    """One OpenVINO Core per process: each Core keeps its CPU plugin (thread pools, memory
    arenas) for the life of the process, so a Core per load would grow with every load."""
    return ov.Core()


def compile_model(
    path: Path,
    threads: int | None,
    kv_dtype: str | None,
    numerics: str = "fast",
    paged: bool = False,
) -> Any:
    """The IR at `path` compiled for the CPU; `paged`: rewritten first for PagedAttention."""
    config: dict[str, Any] = {
        **COMPILE_CONFIG,
        **(EXACT_CONFIG if check_numerics(numerics) == "exact" else {}),
        "KV_CACHE_PRECISION": KV_PRECISION.get(kv_dtype or "fp32", "f32"),
    }
    if threads is not None:
        config["INFERENCE_NUM_THREADS"] = threads
    try:
        if not paged:
            return core().compile_model(str(path), "CPU", config)
        # OpenVINO's Python entry to the rewrite OpenVINO GenAI applies in C++ (optimum-intel
        # imports it from here too)
        from openvino._offline_transformations import paged_attention_transformation

        model = core().read_model(str(path))
        paged_attention_transformation(model)
        return core().compile_model(model, "CPU", config)
    except RuntimeError as e:
        raise BundleError(f"{path}: OpenVINO cannot compile this model ({e})") from e


class OpenVINORuntime(BaseRuntime):
    name = "openvino"

    def __init__(self, compiled: Any, max_context: int, vocab_size: int) -> None:
        super().__init__(max_context, vocab_size)
        self.compiled = compiled
        self.request = compiled.create_infer_request()
        self._beam = np.zeros(1, np.int32)
        # the CPU plugin prepares its kernels on a request's first inference, a cost many times
        # a token's: paid here, at load, so that a first request's time to first token is that
        # of every later one
        self._pass(np.zeros(1, np.int64), only_last=True)
        self.position = 0
        self.request.reset_state()

    def _pass(self, ids: np.ndarray, only_last: bool) -> np.ndarray:
        n, total = len(ids), self.position + len(ids)
        keep = 1 if only_last else n
        self.request.infer(
            {
                "input_ids": ids[None, :],
                "attention_mask": np.ones((1, total), np.int64),
                "position_ids": np.arange(self.position, total, dtype=np.int64)[None, :],
                "beam_idx": self._beam,
                "logits_to_keep": np.array([keep], np.int64),
            },
            share_inputs=True,
        )
        self.position = total
        return np.array(self.request.get_output_tensor(0).data[0], dtype=np.float32)

    def _rewound(self) -> None:
        if self.position == 0:
            self.request.reset_state()
            return
        for state in self.request.query_state():  # [1, kv_heads, T, D]: keep [0, position)
            whole = state.state
            end = list(whole.shape)
            end[2] = self.position
            # a region of the state's own tensor, no copy (as OpenVINO GenAI trims its cache)
            state.state = ov.Tensor(whole, ov.Coordinate([0] * len(end)), ov.Coordinate(end))

    def _reset(self) -> None:
        self.request.reset_state()


class PagedOpenVINORuntime(BaseRuntime):
    """Rows of KV cache in PagedAttention block tensors, decoded together in one pass.

    Row r owns a fixed run of `max_context / block` blocks (the same memory as r full caches,
    which the planner counts), so a row never waits for a free block; `swap_rows` exchanges two
    rows' block lists, no copy. A pass lists, per row in it, its new tokens, its cached length
    and its blocks; the plugin writes the new keys and values into those blocks itself."""

    name = "openvino"
    batched = True

    def __init__(self, compiled: Any, max_context: int, vocab_size: int, rows: int) -> None:
        super().__init__(max_context, vocab_size, rows)
        self.compiled = compiled
        self.request = compiled.create_infer_request()
        caches = [i for i in compiled.inputs if i.get_any_name().startswith(CACHE_INPUTS)]
        # the plugin fixes every dimension but the block count, and the cache precision; the
        # value cache's third one is the block size (the key cache's may add rows of scales)
        value = next(i for i in caches if i.get_any_name().startswith("value_cache."))
        self.block = value.get_partial_shape()[2].get_length()
        per_row = -(-max_context // self.block)
        # zeroed buffers of our own, shared with the tensors: their pages are only touched,
        # hence resident, once a row reaches them (filling a tensor would touch them all)
        self._buffers: list[np.ndarray] = []
        for meta in caches:
            shape = [rows * per_row, *(d.get_length() for d in list(meta.get_partial_shape())[1:])]
            kind = meta.get_element_type()
            self._buffers.append(np.zeros(int(np.prod(shape)) * kind.size, np.uint8))
            self.request.set_tensor(meta.get_any_name(), ov.Tensor(self._buffers[-1], shape, kind))
        first = np.arange(rows) * per_row
        self.blocks = [np.arange(f, f + per_row, dtype=np.int32) for f in first]
        # the plugin prepares its kernels on a request's first inference (see OpenVINORuntime)
        self._pass(np.zeros(1, np.int64), only_last=True)
        self.position = 0

    def _run(self, rows: list[int], ids: np.ndarray, keep: int) -> np.ndarray:
        """One pass: ids split over `rows` in order (one token each, or all to one row)."""
        counts = np.array([1] * len(rows) if len(rows) > 1 else [len(ids)], np.int32)
        past = np.array([self.positions[r] for r in rows], np.int32)
        ends = past + counts
        used = [self.blocks[r][: -(-int(e) // self.block)] for r, e in zip(rows, ends, strict=True)]
        positions = np.concatenate([np.arange(p, e) for p, e in zip(past, ends, strict=True)])
        self.request.infer(
            {
                "input_ids": ids,
                "position_ids": positions.astype(np.int64),
                "past_lens": past,
                "subsequence_begins": _starts(counts),
                "block_indices": np.concatenate(used),
                "block_indices_begins": _starts(np.array([len(u) for u in used])),
                "max_context_len": np.array(int(ends.max()), np.int32),
                "logits_to_keep": np.array([keep], np.int64),
            },
            share_inputs=True,
        )
        logits = self.request.get_output_tensor(0).data  # [1, keep, vocab]
        return np.array(logits.reshape(-1, logits.shape[-1])[-keep:], dtype=np.float32)

    def _pass(self, ids: np.ndarray, only_last: bool) -> np.ndarray:
        logits = self._run([self.row], ids, 1 if only_last else len(ids))
        self.position += len(ids)
        return logits

    def _decode_batch(self, ids: np.ndarray) -> np.ndarray:
        return self._run(list(range(len(ids))), ids, len(ids))

    def _swap_rows(self, a: int, b: int, used: int) -> None:
        self.blocks[a], self.blocks[b] = self.blocks[b], self.blocks[a]


def _starts(counts: np.ndarray) -> np.ndarray:
    """[0, c0, c0 + c1, ...]: where each row's part of a flattened input begins (and the end)."""
    return np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)


def from_bundle(
    artifact: Artifact,
    *,
    max_context: int,
    device: str | None = None,
    threads: int | None = None,
    numerics: str = "fast",
    slots: int = 1,
) -> BaseRuntime:
    """The compiled model of a verified bundle's OpenVINO artifact."""
    check_slots(slots)
    cpu_only("openvino", device)
    artifact.check_context(max_context, "OpenVINO model (its rotary tables)")
    # IRs exported before the paged form (no "batching" entry) hold one KV state: their
    # requests take turns in one slot
    paged = _paged(slots, artifact.kv_dtype) and artifact.entry.get("batching") == PAGED
    compiled = compile_model(artifact.file(), threads, artifact.kv_dtype, numerics, paged)
    return _runtime(compiled, max_context, artifact.vocab_size, numerics, slots if paged else 1)


def _paged(slots: int, kv_dtype: str | None) -> bool:
    """Whether `slots` run in the PagedAttention form: several, and a cache precision its CPU
    kernel takes with float32 compute (not bfloat16: such a plan's requests take turns)."""
    return slots > 1 and kv_dtype != "bf16"


def _runtime(
    compiled: Any, max_context: int, vocab_size: int, numerics: str, slots: int
) -> BaseRuntime:
    rt: BaseRuntime
    if slots > 1:
        rt = PagedOpenVINORuntime(compiled, max_context, vocab_size, slots)
    else:
        rt = OpenVINORuntime(compiled, max_context, vocab_size)
    rt.numerics = numerics
    return rt


def from_source(
    source: ModelSource,
    *,
    max_context: int,
    device: str | None = None,
    dtype: str = "float32",
    threads: int | None = None,
    numerics: str = "fast",
    slots: int = 1,
) -> BaseRuntime:
    """Export an imported model (needs torch) to a temporary IR and compile it."""
    check_slots(slots)
    cpu_only("openvino", device)
    core = exportable_core(source, "openvino", max_context, dtype)
    return from_model(
        core, max_context=max_context, threads=threads, numerics=numerics, slots=slots
    )


def from_model(
    core: Any,
    *,
    max_context: int,
    threads: int | None = None,
    kv_dtype: str | None = None,
    numerics: str = "fast",
    slots: int = 1,
) -> BaseRuntime:
    """Export a model core (as compressed, if it is) and compile it on OpenVINO's CPU plugin;
    several slots in the PagedAttention form."""
    from infopt.runtimes.openvino.export import XML, export_openvino

    check_slots(slots)
    with tempfile.TemporaryDirectory(prefix="infopt-ov-") as tmp:
        export_openvino(core, Path(tmp) / XML, max_context)
        paged = _paged(slots, kv_dtype)
        compiled = compile_model(Path(tmp) / XML, threads, kv_dtype, numerics, paged)
    return _runtime(compiled, max_context, core.spec.vocab_size, numerics, slots if paged else 1)
