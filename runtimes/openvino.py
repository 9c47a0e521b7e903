"""OpenVINO: the stateful IR of `infopt.openvino_export` on the CPU plugin.

The KV cache is the infer request's internal state (the plugin keeps it in place, as in
OpenVINO GenAI's LLM pipeline); `rewind` trims every state to the kept positions, `reset`
resets them. Compiled with the latency hint and the thread count from `load(threads=...)`; the
KV-cache precision follows the bundle's plan. Loading a bundle needs openvino, numpy and
tokenizers; no torch.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import openvino as ov

from infopt.errors import BundleError, ContextLengthError, InvalidArgumentError
from infopt.runtimes import cpu_only, model_core

if TYPE_CHECKING:
    from infopt.importers import ModelSource

PREFILL_CHUNK = 512
KV_PRECISION = {"fp32": "f32", "fp16": "f16", "bf16": "bf16", "int8": "u8"}


def compile_model(path: Path, threads: int | None, kv_dtype: str | None) -> Any:
    config: dict[str, Any] = {
        "PERFORMANCE_HINT": "LATENCY",
        "NUM_STREAMS": 1,
        "INFERENCE_PRECISION_HINT": "f32",
        "KV_CACHE_PRECISION": KV_PRECISION.get(kv_dtype or "fp32", "f32"),
    }
    if threads is not None:
        config["INFERENCE_NUM_THREADS"] = threads
    try:
        return ov.Core().compile_model(str(path), "CPU", config)
    except RuntimeError as e:
        raise BundleError(f"{path}: OpenVINO cannot compile this model ({e})") from e


class OpenVINORuntime:
    name = "openvino"

    def __init__(self, compiled: Any, max_context: int, vocab_size: int) -> None:
        self.compiled = compiled
        self.request = compiled.create_infer_request()
        self.max_context = max_context
        self.vocab_size = vocab_size
        self.position = 0
        self._beam = np.zeros(1, np.int32)

    def forward(self, tokens: Sequence[int], only_last: bool = False) -> np.ndarray:
        n, start = len(tokens), self.position
        if n == 0:
            raise InvalidArgumentError("forward() needs at least one token")
        if start + n > self.max_context:
            raise ContextLengthError(
                f"{start} cached + {n} new tokens exceed the context window of {self.max_context}"
            )
        ids = np.asarray(tokens, dtype=np.int64)
        parts = [
            self._run(ids[b : b + PREFILL_CHUNK], only_last) for b in range(0, n, PREFILL_CHUNK)
        ]
        if only_last:
            return parts[-1]
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def _run(self, ids: np.ndarray, only_last: bool) -> np.ndarray:
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

    def rewind(self, n: int) -> None:
        if not 0 <= n <= self.position:
            raise InvalidArgumentError(f"rewind({n}): only {self.position} positions are cached")
        if n == 0:
            return
        self.position -= n
        if self.position == 0:
            self.request.reset_state()
            return
        for state in self.request.query_state():  # [1, kv_heads, T, D]: keep [0, position)
            whole = state.state
            end = list(whole.shape)
            end[2] = self.position
            # a region of the state's own tensor, no copy (as OpenVINO GenAI trims its cache)
            state.state = ov.Tensor(whole, ov.Coordinate([0] * len(end)), ov.Coordinate(end))

    def reset(self) -> None:
        self.request.reset_state()
        self.position = 0


def from_bundle(
    root: Path,
    manifest: dict[str, Any],
    *,
    max_context: int,
    device: str | None = None,
    threads: int | None = None,
) -> OpenVINORuntime:
    """The compiled model of a verified bundle's OpenVINO artifact."""
    cpu_only("openvino", device)
    artifact = manifest["artifacts"]["openvino"]
    if max_context > int(artifact["max_context"]):
        raise InvalidArgumentError(
            f"max_context={max_context} exceeds the {artifact['max_context']} positions this "
            "OpenVINO model was exported for (its rotary tables); rebuild with a larger --context"
        )
    compiled = compile_model(
        root / artifact["files"][0], threads, manifest["kv_cache"].get("dtype")
    )
    return OpenVINORuntime(compiled, max_context, int(manifest["model"]["config"]["vocab_size"]))


def from_source(
    source: ModelSource,
    *,
    max_context: int,
    device: str | None = None,
    dtype: str = "float32",
    threads: int | None = None,
) -> OpenVINORuntime:
    """Export an imported model (needs torch) to a temporary IR and compile it."""
    core = model_core(source, "openvino", max_context, dtype)
    return from_model(core, max_context=max_context, threads=threads)


def from_model(
    core: Any, *, max_context: int, threads: int | None = None, kv_dtype: str | None = None
) -> OpenVINORuntime:
    """Export a model core (as compressed, if it is) and compile it on OpenVINO's CPU plugin."""
    from infopt.openvino_export import XML, export_openvino

    with tempfile.TemporaryDirectory(prefix="infopt-ov-") as tmp:
        export_openvino(core, Path(tmp) / XML, max_context)
        compiled = compile_model(Path(tmp) / XML, threads, kv_dtype)
    return OpenVINORuntime(compiled, max_context, core.spec.vocab_size)
