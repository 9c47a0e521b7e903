"""Core ML: the stateful ML Program of `infopt.runtimes.coreml.export`, on macOS 15+ (CPU, GPU
and Neural Engine as Core ML chooses).

The shared fixed-window code pads every call to the smallest compiled window (1, 8 or 64 tokens)
that fits; the KV cache is the model's own state, written in place; the causal mask is built
here (it hides padded and rewound slots, so `rewind` only moves the position). Core ML predicts
only on macOS: elsewhere loading for generation raises `UnsupportedPlatformError`, while
building, inspecting and validating the package work (`infopt.runtimes.coreml.check`,
`infopt-pack verify`). The prediction path below has not run on the machines infopt is tested
on; `tools/coreml_check.py` checks it on a Mac.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from infopt.core.quiet import quiet_native
from infopt.errors import InvalidArgumentError
from infopt.runtimes.base import Artifact, FixedWindowRuntime, check_slots, no_exact_numerics
from infopt.runtimes.coreml import require_macos
from infopt.runtimes.coreml.layout import causal_mask


def _import_coremltools() -> Any:
    """coremltools, imported without the warnings it (and torchao, torch, which it imports when
    installed) print: one per native proxy off macOS, missing CUDA kernels."""
    with quiet_native("coremltools", ("coremltools",)):
        import coremltools
    return coremltools


ct = _import_coremltools()

if TYPE_CHECKING:
    from infopt.importers import ModelSource


class CoreMLRuntime(FixedWindowRuntime):
    name = "coreml"

    def __init__(
        self,
        model: Any,
        max_context: int,
        vocab_size: int,
        io: dict[str, Any],
        device: str = "auto",
    ) -> None:
        windows = sorted(int(w) for w in io["windows"])
        self.cache_len = int(io["states"]["k_cache"][2])
        if max_context > self.cache_len - windows[-1]:
            raise InvalidArgumentError(
                f"max_context={max_context} exceeds the {self.cache_len - windows[-1]} "
                "positions this Core ML model was compiled for; rebuild with a larger --context"
            )
        super().__init__(max_context, vocab_size, windows)
        self.model = model
        self.device = device
        self.sliding = io.get("sliding_window")
        self.state = model.make_state()

    def _run_window(self, padded: np.ndarray, n: int, only_last: bool) -> np.ndarray:
        start, window = self.position, padded.shape[1]
        out = self.model.predict(
            {
                "input_ids": padded,
                "causal_mask": causal_mask(start, window, self.cache_len, self.sliding),
                "input_pos": np.array([start], np.int32),
            },
            state=self.state,
        )
        self.position = start + n
        logits = np.asarray(out["logits"][0, :n], dtype=np.float32)
        return logits[-1:] if only_last else logits

    def _reset(self) -> None:
        self.state = self.model.make_state()


COMPUTE_UNITS = {
    None: "ALL",
    "auto": "ALL",
    "cpu": "CPU_ONLY",
    "gpu": "CPU_AND_GPU",
    "ane": "CPU_AND_NE",
}


def _compute_units(device: str | None) -> Any:
    if device not in COMPUTE_UNITS:
        raise InvalidArgumentError(f"device {device!r}: expected one of auto, cpu, gpu, ane")
    return getattr(ct.ComputeUnit, COMPUTE_UNITS[device])


FP16 = "it computes in float16 (the compute precision its package is converted with)"


def from_bundle(
    artifact: Artifact,
    *,
    max_context: int,
    device: str | None = None,
    threads: int | None = None,
    numerics: str = "fast",
    slots: int = 1,
) -> CoreMLRuntime:
    """The Core ML model of a verified bundle (macOS 15+ only; elsewhere a typed refusal)."""
    # one slot whatever is asked: its stateful graph holds one KV state; requests take turns
    check_slots(slots)
    no_exact_numerics("Core ML", numerics, FP16)
    entry = artifact.entry
    units = _compute_units(device)
    require_macos(f"{artifact.root}: the Core ML artifact {entry['package']}")
    model = ct.models.MLModel(str(artifact.root / entry["package"]), compute_units=units)
    io = {**entry, "sliding_window": _caller_window(artifact.config)}
    return CoreMLRuntime(model, max_context, artifact.vocab_size, io, device or "auto")


def from_source(
    source: ModelSource,
    *,
    max_context: int,
    device: str | None = None,
    dtype: str = "float32",
    threads: int | None = None,
    numerics: str = "fast",
    slots: int = 1,
) -> CoreMLRuntime:
    """Convert an imported model (needs torch) and load it (macOS 15+ only). Core ML computes
    in fp16 whatever `dtype` says."""
    # one slot whatever is asked: its stateful graph holds one KV state; requests take turns
    check_slots(slots)
    from infopt.core.model import load_core

    no_exact_numerics("Core ML", numerics, FP16)
    require_macos(f"{source.path}")
    core = load_core(source, max_context, device="cpu")
    return from_model(core, max_context=max_context, device=device)


def from_model(
    core: Any,
    *,
    max_context: int,
    device: str | None = None,
    threads: int | None = None,
    numerics: str = "fast",
) -> CoreMLRuntime:
    """Convert a model core (as compressed, if it is) and load it (macOS 15+ only). `threads`
    is taken as every runtime's `from_model` takes it, and unused: Core ML schedules its own
    compute units."""
    from infopt.runtimes.coreml.export import FILE, coreml_io, export_coreml

    no_exact_numerics("Core ML", numerics, FP16)
    require_macos("a Core ML model")
    units = _compute_units(device)
    tmp = tempfile.mkdtemp(prefix="infopt-coreml-")  # Core ML reads the package lazily: kept
    export_coreml(core, Path(tmp) / FILE, max_context)
    model = ct.models.MLModel(str(Path(tmp) / FILE), compute_units=units)
    io = {**coreml_io(core, max_context), "sliding_window": _caller_window(core.spec.to_dict())}
    return CoreMLRuntime(model, max_context, core.spec.vocab_size, io, device or "auto")


def _caller_window(config: Mapping[str, Any]) -> int | None:
    """The sliding window the caller applies to the mask: the graph applies each sliding layer's
    own, but artifacts exported before it did (every layer sliding) need it from the caller;
    applied twice it changes nothing. Models with full layers too get the plain causal mask."""
    return config.get("sliding_window") if not config.get("layer_types") else None
