"""Runtimes: one module per target, found by file name (`runtimes/<name>.py`), one protocol.

Sampling, stop conditions, streaming and statistics live once in `infopt.generate`; a runtime
only turns token ids into logits and keeps its KV state.
"""

from __future__ import annotations

import importlib
import pkgutil
import re
from collections.abc import Sequence
from types import ModuleType
from typing import Any, Protocol, runtime_checkable

import numpy as np

from infopt.errors import BundleError, InvalidArgumentError, RuntimeNotAvailableError

# runtime module -> the pip extra that installs its package
EXTRAS = {
    "pytorch": "torch",
    "onnxruntime": "onnx",
    "openvino": "openvino",
    "coreml": "coreml",
    "tflite": "tflite",
}
# a package that may stand in for another (its own version scheme: no range to check)
ALTERNATIVES = {"ai-edge-litert": "tflite-runtime"}


@runtime_checkable
class Runtime(Protocol):
    max_context: int  # positions the KV cache holds
    vocab_size: int
    position: int  # tokens currently in the KV cache

    def forward(self, tokens: Sequence[int], only_last: bool = False) -> np.ndarray:
        """Append `tokens` to the KV state; float32 logits [len(tokens), vocab] ([1, vocab] with
        only_last, which prefill uses to skip the LM head on all but the last position)."""
        ...

    def rewind(self, n: int) -> None:
        """Drop the last n positions (rejected draft tokens)."""
        ...

    def reset(self) -> None: ...


def available() -> list[str]:
    """Names of all runtime modules shipped (installed or not)."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


def runtime_module(name: str) -> ModuleType:
    """The module `infopt.runtimes.<name>`; a typed error for unknown names or missing packages."""
    if name not in available():
        raise RuntimeNotAvailableError(f"unknown runtime {name!r}; available: {available()}")
    try:
        return importlib.import_module(f"{__name__}.{name}")
    except ImportError as e:
        raise RuntimeNotAvailableError(
            f"runtime {name!r} needs a package that is not installed ({e}); "
            f"install it with: pip install 'infopt[{EXTRAS.get(name, name)}]'"
        ) from e


def model_core(source: Any, runtime: str, max_context: int, dtype: str = "float32") -> Any:
    """The model core of an imported model (needs torch), for a runtime that exports it."""
    from infopt.runtimes import pytorch

    if dtype != "float32":
        raise InvalidArgumentError(f"dtype {dtype!r}: the {runtime} runtime computes in float32")
    return pytorch.from_source(source, max_context=max_context, device="cpu").model


def cpu_only(runtime: str, device: str | None) -> None:
    if device not in (None, "cpu", "auto"):
        raise InvalidArgumentError(f"device {device!r}: the {runtime} runtime runs on the CPU")


def _version_tuple(text: str) -> tuple[int, ...]:
    match = re.match(r"\d+(\.\d+)*", text.strip())
    return tuple(int(p) for p in match.group(0).split(".")) if match else ()


def satisfies(version: str, spec: str) -> bool:
    """Whether `version` meets `spec`: comma-separated `>=X.Y` / `<X.Y` / `==X.Y` clauses."""
    have = _version_tuple(version)
    for clause in filter(None, (c.strip() for c in spec.split(","))):
        op = re.match(r"(>=|<=|==|<|>)", clause)
        if op is None:
            raise BundleError(f"version requirement {spec!r}: cannot read clause {clause!r}")
        want = _version_tuple(clause[op.end() :])
        n = max(len(have), len(want))
        a, b = have + (0,) * (n - len(have)), want + (0,) * (n - len(want))
        ok = {">=": a >= b, "<=": a <= b, "==": a == b, "<": a < b, ">": a > b}[op.group(1)]
        if not ok:
            return False
    return True


def check_requirement(bundle: str, runtime: str, requires: dict[str, str] | None) -> None:
    """Refuse a bundle whose artifact was built for another version range of its package."""
    from importlib.metadata import PackageNotFoundError, version

    if not requires or not requires.get("version"):
        return
    package = requires["package"]
    try:
        installed = version(package)
    except PackageNotFoundError:
        alternative = ALTERNATIVES.get(package)
        if alternative and _installed(alternative):
            return
        raise RuntimeNotAvailableError(
            f"{bundle}: runtime {runtime!r} needs {package}{requires['version']}, which is not "
            f"installed; install it with: pip install 'infopt[{EXTRAS.get(runtime, runtime)}]'"
        ) from None
    if not satisfies(installed, requires["version"]):
        raise BundleError(
            f"{bundle}: its {runtime} artifact was built for {package}{requires['version']}, "
            f"and this environment has {package} {installed}; install a matching {package} "
            "or rebuild the bundle here"
        )


def _installed(package: str) -> bool:
    from importlib.metadata import PackageNotFoundError, version

    try:
        version(package)
    except PackageNotFoundError:
        return False
    return True
