"""Core ML: a stateful ML Program (.mlpackage, KV cache as model state, fp16, enumerated windows)
for iOS 18 / macOS 15 apps. Built and read back anywhere coremltools installs; predicts only on
macOS 15 or later."""

import platform
import sys
from collections.abc import Mapping
from typing import Any

from infopt.core.schema import INTS, STR
from infopt.errors import UnsupportedPlatformError
from infopt.runtimes.registry import Rows, Target

MIN_MACOS = (15, 0)


def require_macos(what: str) -> None:
    """Core ML prediction exists only on macOS 15+ (stateful models): a typed refusal elsewhere."""
    if sys.platform != "darwin":
        raise UnsupportedPlatformError(
            f"{what}: Core ML runs models only on macOS 15 or later (this is {sys.platform}). "
            "The .mlpackage was built and checked here; run it on a Mac or an iPhone, or load "
            "the bundle with another of its runtimes (runtime=..., CLI --runtime) if it "
            "carries one"
        )
    version = tuple(int(p) for p in platform.mac_ver()[0].split(".")[:2] if p.isdigit())
    if version and version < MIN_MACOS:
        raise UnsupportedPlatformError(
            f"{what}: stateful Core ML models need macOS 15 or later; this Mac has "
            f"{platform.mac_ver()[0]}"
        )


def runs_here() -> bool:
    """Whether Core ML can predict on this machine (macOS 15+)."""
    try:
        require_macos("")
    except UnsupportedPlatformError:
        return False
    return True


def describe(artifact: Mapping[str, Any]) -> Rows:
    """What an app calling the model itself needs: its windows and its states."""
    states = ", ".join(f"{n} {s}" for n, s in artifact["states"].items())
    return [
        ("coreml windows", f"{artifact['windows']} tokens ({artifact['deployment_target']})"),
        ("coreml states", f"{states} {artifact['state_dtype']}; predicts on macOS only"),
    ]


TARGET = Target(
    kv_dtype="fp16",  # the model's state tensors (the Neural Engine computes in fp16)
    title="Core ML",
    extra="coreml",
    requirement="coremltools>=9.0",
    build_modules=("coremltools",),
    symmetric_int4=True,
    fixed_windows=True,
    exact_numerics="none",
    overhead={"npu": 150e6},  # an estimate
    reads_back=True,
    runs_here=runs_here,
    describe=describe,
    artifact_fields={
        "package": STR,
        "deployment_target": STR,
        "compute_precision": STR,
        "windows": INTS,
        "inputs": {"type": "object", "additionalProperties": STR},
        "outputs": {"type": "object", "additionalProperties": STR},
        "states": {"type": "object", "additionalProperties": INTS},
        "state_dtype": STR,
    },
    artifact_required=("package", "windows", "states", "state_dtype", "deployment_target"),
)
