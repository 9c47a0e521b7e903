"""Core ML: the stateful ML Program of `infopt.coreml_export`, on macOS 15+ (CPU, GPU and
Neural Engine as Core ML chooses).

Every call is padded to the smallest compiled window (1, 8 or 64 tokens) that fits; the KV cache
is the model's own state, written in place; the causal mask is built here (it hides padded and
rewound slots, so `rewind` only moves the position). Speculative drafts are capped by
`verify_window`. Core ML predicts only on macOS: elsewhere loading for generation raises
`UnsupportedPlatformError`, while building, inspecting and validating the package work
(`describe`, `check_package`, `infopt-pack verify`). The prediction path below has not run
on the machines infopt is tested on; `tools/coreml_check.py` checks it on a Mac.
"""

from __future__ import annotations

import platform
import re
import sys
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from infopt.errors import (
    BundleError,
    ContextLengthError,
    InvalidArgumentError,
    UnsupportedPlatformError,
)
from infopt.quiet import quiet_native


def _import_coremltools() -> Any:
    """coremltools, imported without the warnings it (and torchao, torch, which it imports when
    installed) print: one per native proxy off macOS, missing CUDA kernels."""
    with quiet_native("coremltools"):
        import coremltools
    return coremltools


ct = _import_coremltools()

if TYPE_CHECKING:
    from infopt.importers import ModelSource

MIN_MACOS = (15, 0)


def runs_here() -> bool:
    """Whether Core ML can predict on this machine (macOS 15+)."""
    try:
        require_macos("")
    except UnsupportedPlatformError:
        return False
    return True


def require_macos(what: str) -> None:
    """Core ML prediction exists only on macOS 15+ (stateful models): a typed refusal elsewhere."""
    if sys.platform != "darwin":
        raise UnsupportedPlatformError(
            f"{what}: Core ML runs models only on macOS 15 or later (this is {sys.platform}). "
            "The .mlpackage was built and checked here; run it on a Mac or an iPhone, or load "
            "the bundle with another runtime (runtime='onnxruntime', 'openvino' or 'tflite') "
            "if it carries one"
        )
    version = tuple(int(p) for p in platform.mac_ver()[0].split(".")[:2] if p.isdigit())
    if version and version < MIN_MACOS:
        raise UnsupportedPlatformError(
            f"{what}: stateful Core ML models need macOS 15 or later; this Mac has "
            f"{platform.mac_ver()[0]}"
        )


class CoreMLRuntime:
    name = "coreml"

    def __init__(self, model: Any, max_context: int, vocab_size: int, io: dict[str, Any]) -> None:
        self.model = model
        self.windows = sorted(int(w) for w in io["windows"])
        self.cache_len = int(io["states"]["k_cache"][2])
        self.sliding = io.get("sliding_window")
        if max_context > self.cache_len - self.windows[-1]:
            raise InvalidArgumentError(
                f"max_context={max_context} exceeds the {self.cache_len - self.windows[-1]} "
                "positions this Core ML model was compiled for; rebuild with a larger --context"
            )
        self.max_context = max_context
        self.vocab_size = vocab_size
        self.verify_window = self.windows[1] if len(self.windows) > 1 else 1
        self.state = model.make_state()
        self.position = 0

    def forward(self, tokens: Sequence[int], only_last: bool = False) -> np.ndarray:
        n, start = len(tokens), self.position
        if n == 0:
            raise InvalidArgumentError("forward() needs at least one token")
        if start + n > self.max_context:
            raise ContextLengthError(
                f"{start} cached + {n} new tokens exceed the context window of {self.max_context}"
            )
        parts, done = [], 0
        while done < n:
            window = next((w for w in self.windows if w >= n - done), self.windows[-1])
            chunk = list(tokens[done : done + window])
            parts.append(self._run(chunk, window))
            done += len(chunk)
        logits = np.concatenate(parts)
        return logits[-1:] if only_last else logits

    def _run(self, ids: list[int], window: int) -> np.ndarray:
        from infopt.coreml_export import causal_mask

        n, start = len(ids), self.position
        padded = np.zeros((1, window), np.int32)
        padded[0, :n] = ids
        out = self.model.predict(
            {
                "input_ids": padded,
                "causal_mask": causal_mask(start, window, self.cache_len, self.sliding),
                "input_pos": np.array([start], np.int32),
            },
            state=self.state,
        )
        self.position = start + n
        return np.asarray(out["logits"][0, :n], dtype=np.float32)

    def rewind(self, n: int) -> None:
        if not 0 <= n <= self.position:
            raise InvalidArgumentError(f"rewind({n}): only {self.position} positions are cached")
        self.position -= n  # the mask hides slots from `position` on until they are rewritten

    def reset(self) -> None:
        self.state = self.model.make_state()
        self.position = 0


def _compute_units(device: str | None) -> Any:
    units = {
        None: ct.ComputeUnit.ALL,
        "auto": ct.ComputeUnit.ALL,
        "cpu": ct.ComputeUnit.CPU_ONLY,
        "gpu": ct.ComputeUnit.CPU_AND_GPU,
        "ane": ct.ComputeUnit.CPU_AND_NE,
    }
    if device not in units:
        raise InvalidArgumentError(f"device {device!r}: expected one of auto, cpu, gpu, ane")
    return units[device]


def from_bundle(
    root: Path,
    manifest: dict[str, Any],
    *,
    max_context: int,
    device: str | None = None,
    threads: int | None = None,
) -> CoreMLRuntime:
    """The Core ML model of a verified bundle (macOS 15+ only; elsewhere a typed refusal)."""
    artifact = manifest["artifacts"]["coreml"]
    units = _compute_units(device)
    require_macos(f"{root}: the Core ML artifact {artifact['package']}")
    model = ct.models.MLModel(str(root / artifact["package"]), compute_units=units)
    io = {**artifact, "sliding_window": manifest["model"]["config"].get("sliding_window")}
    return CoreMLRuntime(model, max_context, int(manifest["model"]["config"]["vocab_size"]), io)


def from_source(
    source: ModelSource,
    *,
    max_context: int,
    device: str | None = None,
    dtype: str = "float32",
    threads: int | None = None,
) -> CoreMLRuntime:
    """Convert an imported model (needs torch) and load it (macOS 15+ only). Core ML computes
    in fp16 whatever `dtype` says."""
    from infopt.runtimes import pytorch

    require_macos(f"{source.path}")
    core = pytorch.from_source(source, max_context=max_context, device="cpu").model
    return from_model(core, max_context=max_context, device=device)


def from_model(core: Any, *, max_context: int, device: str | None = None) -> CoreMLRuntime:
    """Convert a model core (as compressed, if it is) and load it (macOS 15+ only)."""
    from infopt.coreml_export import FILE, coreml_io, export_coreml

    require_macos("a Core ML model")
    units = _compute_units(device)
    tmp = tempfile.mkdtemp(prefix="infopt-coreml-")  # Core ML reads the package lazily: kept
    export_coreml(core, Path(tmp) / FILE, max_context)
    model = ct.models.MLModel(str(Path(tmp) / FILE), compute_units=units)
    io = {**coreml_io(core, max_context), "sliding_window": core.spec.sliding_window}
    return CoreMLRuntime(model, max_context, core.spec.vocab_size, io)


def describe(path: str | Path) -> dict[str, Any]:
    """Inputs, outputs, states, op counts and quantized weights of a saved .mlpackage, read from
    the file alone (no prediction: works on every platform, without torch)."""
    from coremltools.converters.mil.frontend.milproto.load import load as milproto_load
    from coremltools.converters.mil.mil import types

    array_type = ct.proto.FeatureTypes_pb2.ArrayFeatureType.ArrayDataType.Name
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            mlmodel = ct.models.MLModel(str(path), skip_model_load=True)
        except Exception as e:  # coremltools raises plain exceptions on unreadable packages
            raise BundleError(f"{path}: coremltools cannot read this package ({e})") from e
        spec = mlmodel.get_spec()
        program = milproto_load(
            spec, spec.specificationVersion, file_weights_dir=mlmodel.weights_dir
        )
    d = spec.description
    weights = {}
    ops: dict[str, int] = {}
    for op in program.functions["main"].operations:
        ops[op.op_type] = ops.get(op.op_type, 0) + 1
        if op.op_type == "constexpr_blockwise_shift_scale":
            data, scale = op.data.val, op.scale.val
            weights[re.sub(r"(_quantized)?$", "", op.outputs[0].name, count=1)] = {
                "dtype": types.builtin_to_string(op.data.dtype),
                "codes": data,
                "scales": scale,
                "block": data.shape[1] // scale.shape[1],
                "offset": op.offset is not None,
            }
    return {
        "inputs": {
            f.name: {
                "dtype": array_type(f.type.multiArrayType.dataType),
                "shapes": [list(s.shape) for s in f.type.multiArrayType.enumeratedShapes.shapes]
                or [list(f.type.multiArrayType.shape)],
            }
            for f in d.input
        },
        "outputs": [f.name for f in d.output],
        "states": {
            f.name: {
                "shape": list(f.type.stateType.arrayType.shape),
                "dtype": array_type(f.type.stateType.arrayType.dataType),
            }
            for f in d.state
        },
        "ops": ops,
        "weights": weights,
    }


def check_package(root: Path, artifact: dict[str, Any]) -> dict[str, Any]:
    """A bundle's .mlpackage read back against what its manifest tells an app (inputs, windows,
    outputs, states): a `BundleError` naming each mismatch; else a summary (ops, weight dtypes)."""
    found = describe(root / artifact["package"])
    windows = [int(w) for w in artifact["windows"]]
    length = int(artifact["states"]["k_cache"][2])
    expected = {
        "inputs": sorted(artifact["inputs"]),
        "input_ids shapes": [[1, w] for w in windows],
        "causal_mask shapes": [[1, 1, w, length] for w in windows],
        "outputs": ["logits"],
        "states": {n: {"shape": s, "dtype": "FLOAT16"} for n, s in artifact["states"].items()},
    }
    inputs = found["inputs"]
    actual = {
        "inputs": sorted(inputs),
        "input_ids shapes": inputs.get("input_ids", {}).get("shapes"),
        "causal_mask shapes": inputs.get("causal_mask", {}).get("shapes"),
        "outputs": found["outputs"],
        "states": found["states"],
    }
    wrong = [
        f"{k}: package {actual[k]}, manifest {v}" for k, v in expected.items() if actual[k] != v
    ]
    if wrong:
        raise BundleError(f"{root / artifact['package']} does not match the manifest: {wrong}")
    dtypes: dict[str, int] = {}
    for w in found["weights"].values():
        dtypes[w["dtype"]] = dtypes.get(w["dtype"], 0) + 1
    return {
        "package": artifact["package"],
        "windows": windows,
        "states": sorted(found["states"]),
        "attention_ops": found["ops"].get("scaled_dot_product_attention", 0),
        "quantized_weights": dtypes,
    }
