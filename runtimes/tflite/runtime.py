"""LiteRT (TFLite): the .tflite model of `infopt.runtimes.tflite.export` on the XNNPACK CPU
delegate.

The model has fixed windows (decode 1, verify 8, prefill 64 tokens, each its own signature;
prefill returns the last position's logits only); the shared fixed-window code pads every call
to the smallest window that fits. This module keeps the KV cache itself, in the input buffers of
the three signatures: after each call only the new entries (`k_new`, `v_new`) are written into
them, so no call copies the whole cache. Runs with `ai-edge-litert` (LiteRT, the maintained
successor of `tflite-runtime`) or `tflite-runtime`, numpy and tokenizers; no torch.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from infopt.core.quiet import quiet_native
from infopt.errors import BundleError, InvalidArgumentError
from infopt.runtimes.base import (
    Artifact,
    FixedWindowRuntime,
    check_numerics,
    check_slots,
    cpu_only,
    exportable_core,
    no_exact_numerics,
)

try:
    from ai_edge_litert.interpreter import Interpreter
except ImportError:  # the older package, same interpreter API
    from tflite_runtime.interpreter import Interpreter

if TYPE_CHECKING:
    from infopt.importers import ModelSource


@dataclass
class _Signature:
    """One fixed-window entry point: its subgraph and tensor indices in the interpreter."""

    window: int
    subgraph: int
    inputs: dict[str, int]
    outputs: dict[str, int]


class TFLiteRuntime(FixedWindowRuntime):
    name = "tflite"

    def __init__(self, interpreter: Any, max_context: int, vocab_size: int) -> None:
        self.interpreter = interpreter
        self._native = interpreter._interpreter  # the wrapper the signature runners call
        self.signatures: dict[str, _Signature] = {}
        for key, sig in interpreter._get_full_signature_list().items():
            index = self._native.GetSubgraphIndexFromSignature(key)
            self._native.AllocateTensors(index)
            window = int(
                interpreter.get_signature_runner(key).get_input_details()["tokens"]["shape"][1]
            )
            self.signatures[key] = _Signature(window, index, sig["inputs"], sig["outputs"])
        missing = {"decode", "verify", "prefill"} - set(self.signatures)
        if missing:
            raise BundleError(f"the .tflite model lacks the signatures {sorted(missing)}")
        self._by_window = {sig.window: key for key, sig in self.signatures.items()}
        for key in self.signatures:  # masked slots still meet V: no NaN from stale memory
            self._view(key, "k_cache").fill(0)
            self._view(key, "v_cache").fill(0)
        compiled = int(self._view("decode", "k_cache").shape[2])  # one slot per position
        if max_context > compiled:
            raise InvalidArgumentError(
                f"max_context={max_context} exceeds the {compiled} positions this model was "
                "compiled for; rebuild with a larger --context"
            )
        last_only = [s.window for s in self.signatures.values() if "last" in s.inputs]
        super().__init__(max_context, vocab_size, sorted(self._by_window), last_only)
        for key in self.signatures:  # XNNPACK packs its weights on a signature's first call:
            window = self.signatures[key].window  # at load, not in the first token's time
            self._run_window(np.zeros((1, window), np.int32), 1, only_last=True)
            self.position = 0  # the slot it wrote is masked until a real token overwrites it

    def _view(self, key: str, name: str) -> np.ndarray:
        """A numpy view of a signature's input buffer (no copy)."""
        sig = self.signatures[key]
        return self._native.tensor(self._native, sig.inputs[name], sig.subgraph)

    def _run_window(self, padded: np.ndarray, n: int, only_last: bool) -> np.ndarray:
        native, start = self._native, self.position
        key = self._by_window[padded.shape[1]]
        sig = self.signatures[key]
        native.SetTensor(sig.inputs["tokens"], padded, sig.subgraph)
        positions = np.arange(start, start + sig.window, dtype=np.int32)
        native.SetTensor(sig.inputs["input_pos"], positions, sig.subgraph)
        if "last" in sig.inputs:
            native.SetTensor(sig.inputs["last"], np.array([n - 1], np.int32), sig.subgraph)
        native.Invoke(sig.subgraph)
        for name in ("k", "v"):
            new = native.GetTensor(sig.outputs[f"{name}_new"], sig.subgraph)[:, :, :n]
            for other in self.signatures:  # every signature reads its own copy of the cache
                self._view(other, f"{name}_cache")[:, :, start : start + n] = new
        self.position = start + n
        logits = native.GetTensor(sig.outputs["logits"], sig.subgraph)[0]
        if "last" in sig.inputs:
            return np.asarray(logits, dtype=np.float32)  # [1, vocab]: the last real position
        return np.asarray(logits[n - 1 : n] if only_last else logits[:n], dtype=np.float32)


# XNNPACK runs quantized weights with dynamic-range kernels only (activations rounded to int8)
DYNAMIC_RANGE = (
    "its kernels for quantized weights round activations to int8 (dynamic range); a float "
    "bundle computes in float32"
)


def load_interpreter(path: Path, threads: int | None, in_memory: bool = False) -> Any:
    try:
        if in_memory:  # a temporary file: read it before it goes
            return Interpreter(model_content=path.read_bytes(), num_threads=threads)
        return Interpreter(model_path=str(path), num_threads=threads)
    except (ValueError, RuntimeError) as e:
        raise BundleError(f"{path}: LiteRT cannot load this model ({e})") from e


def from_bundle(
    artifact: Artifact,
    *,
    max_context: int,
    device: str | None = None,
    threads: int | None = None,
    numerics: str = "fast",
    slots: int = 1,
) -> TFLiteRuntime:
    """The interpreter of a verified bundle's LiteRT artifact, on the XNNPACK CPU delegate."""
    # one slot whatever is asked: its fixed-shape graph holds one KV state; requests take turns
    check_slots(slots)
    cpu_only("tflite", device)
    if artifact.quantized:
        no_exact_numerics("LiteRT", numerics, DYNAMIC_RANGE)
    check_numerics(numerics)
    with quiet_native("LiteRT"):  # it logs the XNNPACK delegate's creation to stderr
        interpreter = load_interpreter(artifact.file(), threads)
        rt = TFLiteRuntime(interpreter, max_context, artifact.vocab_size)
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
) -> TFLiteRuntime:
    """Convert an imported model (needs torch and litert-torch) to a temporary .tflite."""
    # one slot whatever is asked: its fixed-shape graph holds one KV state; requests take turns
    check_slots(slots)
    cpu_only("tflite", device)
    core = exportable_core(source, "tflite", max_context, dtype)
    return from_model(core, max_context=max_context, threads=threads, numerics=numerics)


def from_model(
    core: Any, *, max_context: int, threads: int | None = None, numerics: str = "fast"
) -> TFLiteRuntime:
    """Convert a model core (as compressed, if it is) and load it on LiteRT."""
    from infopt.core.quant import QuantStorage
    from infopt.runtimes.tflite.export import FILE, export_tflite

    if any(isinstance(m, QuantStorage) for m in core.modules()):
        no_exact_numerics("LiteRT", numerics, DYNAMIC_RANGE)
    check_numerics(numerics)
    with tempfile.TemporaryDirectory(prefix="infopt-tflite-") as tmp, quiet_native("LiteRT"):
        export_tflite(core, Path(tmp) / FILE, max_context)
        interpreter = load_interpreter(Path(tmp) / FILE, threads, in_memory=True)
        rt = TFLiteRuntime(interpreter, max_context, core.spec.vocab_size)
    rt.numerics = numerics
    return rt
