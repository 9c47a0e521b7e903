"""OpenVINO: the stateful IR of `infopt.runtimes.openvino.export` on the CPU plugin.

The KV cache is the infer request's internal state (the plugin keeps it in place, as in
OpenVINO GenAI's LLM pipeline); `rewind` trims every state to the kept positions, `reset`
resets them. Compiled with the latency hint and the thread count from `load(threads=...)`; the
KV-cache precision follows the bundle's plan. Loading a bundle needs openvino, numpy and
tokenizers; no torch.
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


@functools.cache
def core() -> Any:
    """One OpenVINO Core per process: each Core keeps its CPU plugin (thread pools, memory
    arenas) for the life of the process, so a Core per load would grow with every load."""
    return ov.Core()


def compile_model(
    path: Path, threads: int | None, kv_dtype: str | None, numerics: str = "fast"
) -> Any:
    config: dict[str, Any] = {
        **COMPILE_CONFIG,
        **(EXACT_CONFIG if check_numerics(numerics) == "exact" else {}),
        "KV_CACHE_PRECISION": KV_PRECISION.get(kv_dtype or "fp32", "f32"),
    }
    if threads is not None:
        config["INFERENCE_NUM_THREADS"] = threads
    try:
        return core().compile_model(str(path), "CPU", config)
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


def from_bundle(
    artifact: Artifact,
    *,
    max_context: int,
    device: str | None = None,
    threads: int | None = None,
    numerics: str = "fast",
    slots: int = 1,
) -> OpenVINORuntime:
    """The compiled model of a verified bundle's OpenVINO artifact."""
    # one slot whatever is asked: its stateful graph holds one KV state; requests take turns
    check_slots(slots)
    cpu_only("openvino", device)
    artifact.check_context(max_context, "OpenVINO model (its rotary tables)")
    compiled = compile_model(artifact.file(), threads, artifact.kv_dtype, numerics)
    rt = OpenVINORuntime(compiled, max_context, artifact.vocab_size)
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
) -> OpenVINORuntime:
    """Export an imported model (needs torch) to a temporary IR and compile it."""
    # one slot whatever is asked: its stateful graph holds one KV state; requests take turns
    check_slots(slots)
    cpu_only("openvino", device)
    core = exportable_core(source, "openvino", max_context, dtype)
    return from_model(core, max_context=max_context, threads=threads, numerics=numerics)


def from_model(
    core: Any,
    *,
    max_context: int,
    threads: int | None = None,
    kv_dtype: str | None = None,
    numerics: str = "fast",
) -> OpenVINORuntime:
    """Export a model core (as compressed, if it is) and compile it on OpenVINO's CPU plugin."""
    from infopt.runtimes.openvino.export import XML, export_openvino

    with tempfile.TemporaryDirectory(prefix="infopt-ov-") as tmp:
        export_openvino(core, Path(tmp) / XML, max_context)
        compiled = compile_model(Path(tmp) / XML, threads, kv_dtype, numerics)
    rt = OpenVINORuntime(compiled, max_context, core.spec.vocab_size)
    rt.numerics = numerics
    return rt
