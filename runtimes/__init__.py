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
from typing import Protocol, runtime_checkable

import numpy as np

from infopt.errors import BundleError, RuntimeNotAvailableError

# runtime module -> the pip extra that installs its package
EXTRAS = {
    "pytorch": "torch",
    "onnxruntime": "onnx",
    "openvino": "openvino",
    "coreml": "coreml",
    "tflite": "tflite",
}


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
