"""ONNX Runtime: the graph of `infopt.onnx_export` on onnxruntime's CPU kernels.

The KV cache lives in one preallocated buffer per layer and kind, bound with I/O binding as
both the `past` input and the `present` output of GroupQueryAttention, which appends the new
positions in place: no per-token allocation, no copy of the cache. Decode logits land in one
reused buffer. Rewinding only moves the position (the stale slots are masked, then
overwritten). Loading a bundle needs onnxruntime, numpy and tokenizers; no torch.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnxruntime as ort

from infopt.errors import BundleError, ContextLengthError, InvalidArgumentError
from infopt.runtimes import cpu_only, model_core

if TYPE_CHECKING:
    from infopt.importers import ModelSource

PREFILL_CHUNK = 512  # attention scores are [heads, chunk, context]: chunk long prompts


def session_options(threads: int | None) -> ort.SessionOptions:
    """Latency settings: one request at a time, all threads on each operator.

    The pool's threads spin between the operators of a run (waking them for each one would cost
    more than the operator), and stop spinning when the run returns: a speculative draft and its
    target run in turns, on this runtime or another (PyTorch, OpenVINO), and threads left
    spinning would take the cores from the other. Measured on 2 cores: an fp32 OpenVINO target's
    2-token pass takes 45.2 ms after an ONNX Runtime draft step with the process-wide spinning
    pool this replaced and 35.0 ms with this, as alone; the draft step 6.7 and 7.0 ms (6.0-7.0
    alone); without spinning the draft step takes 12.2 ms."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.inter_op_num_threads = 1
    if threads is not None:
        so.intra_op_num_threads = threads
    so.add_session_config_entry("session.intra_op.allow_spinning", "1")
    so.add_session_config_entry("session.force_spinning_stop", "1")
    so.log_severity_level = 3
    return so


class OrtRuntime:
    name = "onnxruntime"

    def __init__(
        self,
        session: ort.InferenceSession,
        max_context: int,
        vocab_size: int,
        batch_exact: bool = True,
    ) -> None:
        # False where MatMulNBits quantizes activations to int8 (INT4/INT8 weights): a pass of
        # several tokens then rounds them unlike a one-token step (logits differ by ~1 on the
        # default model), so speculative greedy output can part from plain decoding
        self.batch_exact = batch_exact
        self.session = session
        self.max_context = max_context
        self.vocab_size = vocab_size
        self.position = 0
        self.binding = session.io_binding()
        for meta in session.get_inputs():
            if meta.name.startswith("past_key_values."):
                _, layer, kind = meta.name.split(".")
                shape = (1, int(meta.shape[1]), max_context, int(meta.shape[3]))
                buf = ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, np.float32))
                self.binding.bind_ortvalue_input(meta.name, buf)
                self.binding.bind_ortvalue_output(f"present.{layer}.{kind}", buf)
        self._logits = np.zeros((1, 1, vocab_size), np.float32)
        self._logits_value = ort.OrtValue.ortvalue_from_numpy(self._logits)
        self._one = np.ones(1, np.int64)

    def forward(self, tokens: Sequence[int], only_last: bool = False) -> np.ndarray:
        n, start = len(tokens), self.position
        if n == 0:
            raise InvalidArgumentError("forward() needs at least one token")
        if start + n > self.max_context:
            raise ContextLengthError(
                f"{start} cached + {n} new tokens exceed the context window of {self.max_context}"
            )
        ids = np.asarray(tokens, dtype=np.int64)
        if only_last:
            for begin in range(0, n, PREFILL_CHUNK):
                logits = self._run(ids[begin : begin + PREFILL_CHUNK], True)
            return logits
        parts = [self._run(ids[b : b + PREFILL_CHUNK], False) for b in range(0, n, PREFILL_CHUNK)]
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def _run(self, ids: np.ndarray, only_last: bool) -> np.ndarray:
        n, b = len(ids), self.binding
        total = self.position + n
        b.bind_cpu_input("input_ids", ids[None, :])
        b.bind_cpu_input("seqlens_k", np.array([total - 1], np.int32))
        b.bind_cpu_input("total_sequence_length", np.array(total, np.int32))
        keep = 1 if only_last or n == 1 else n
        b.bind_cpu_input("logits_to_keep", np.array([keep], np.int64))
        if keep == 1:
            out, value = self._logits, self._logits_value
        else:
            out = np.empty((1, keep, self.vocab_size), np.float32)
            value = ort.OrtValue.ortvalue_from_numpy(out)
        b.bind_ortvalue_output("logits", value)
        self.session.run_with_iobinding(b)
        self.position = total
        return out[0].copy() if keep == 1 else out[0]

    def rewind(self, n: int) -> None:
        if not 0 <= n <= self.position:
            raise InvalidArgumentError(f"rewind({n}): only {self.position} positions are cached")
        self.position -= n

    def reset(self) -> None:
        self.position = 0


def load_session(path: Path, threads: int | None) -> ort.InferenceSession:
    try:
        return ort.InferenceSession(
            str(path), session_options(threads), providers=["CPUExecutionProvider"]
        )
    except Exception as e:  # onnxruntime raises its own untyped exceptions on bad graphs
        raise BundleError(f"{path}: onnxruntime cannot load this graph ({e})") from e


def from_bundle(
    root: Path,
    manifest: dict[str, Any],
    *,
    max_context: int,
    device: str | None = None,
    threads: int | None = None,
) -> OrtRuntime:
    """The session of a verified bundle's ONNX artifact."""
    cpu_only("onnxruntime", device)
    artifact = manifest["artifacts"]["onnxruntime"]
    if max_context > int(artifact["max_context"]):
        raise InvalidArgumentError(
            f"max_context={max_context} exceeds the {artifact['max_context']} positions this "
            "ONNX graph was exported for (its rotary tables); rebuild with a larger --context"
        )
    session = load_session(root / artifact["files"][0], threads)
    weights = ((manifest.get("plan") or {}).get("compression") or {}).get("weights") or {}
    quantized = any(str(w).startswith("int") for w in weights.values())
    vocab = int(manifest["model"]["config"]["vocab_size"])
    return OrtRuntime(session, max_context, vocab, batch_exact=not quantized)


def from_source(
    source: ModelSource,
    *,
    max_context: int,
    device: str | None = None,
    dtype: str = "float32",
    threads: int | None = None,
) -> OrtRuntime:
    """Export an imported model (needs torch) to a temporary ONNX file and load it."""
    core = model_core(source, "onnxruntime", max_context, dtype)
    return from_model(core, max_context=max_context, threads=threads)


def from_model(core: Any, *, max_context: int, threads: int | None = None) -> OrtRuntime:
    """Export a model core (as compressed, if it is) and load it on onnxruntime."""
    from infopt.onnx_export import export_onnx

    with tempfile.TemporaryDirectory(prefix="infopt-onnx-") as tmp:
        export_onnx(core, Path(tmp) / "model.onnx", max_context)
        session = load_session(Path(tmp) / "model.onnx", threads)
    from infopt.quant import QuantStorage

    quantized = any(isinstance(m, QuantStorage) for m in core.modules())
    return OrtRuntime(session, max_context, core.spec.vocab_size, batch_exact=not quantized)
