"""infopt: plan, compress, package and run decoder-only LLMs on edge devices and desktops.

import infopt
m = infopt.load()                      # the default model, SmolLM2-135M-Instruct
print(m.generate([{"role": "user", "content": "Hi!"}]).text)

The pipeline's steps are functions here too, as the command line calls them: `infopt.build`
(plan, compress, export, package), `infopt.evaluate` (perplexity, KL, top-1), `infopt.distill`
(train a compressed or draft student), `infopt.bench` (speed and memory of a bundle), and
`infopt.open_bundle` (a verified bundle's manifest, tokenizer and artifacts).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from infopt.api import Model, load
from infopt.bundle import Bundle, open_bundle
from infopt.decode.drafters import DraftMismatchError
from infopt.decode.generate import Delta, GenerateOptions, GenerationResult, Stats, TextStream
from infopt.decode.tools import ToolCall
from infopt.errors import (
    BundleError,
    ContextLengthError,
    DefaultModelMissingError,
    InfoptError,
    InvalidArgumentError,
    MemoryBudgetError,
    ModelFormatError,
    ModelNotFoundError,
    PlanError,
    ProfileError,
    RuntimeNotAvailableError,
    UnsupportedModelError,
    UnsupportedPlatformError,
)
from infopt.importers import ModelSource, open_model

if TYPE_CHECKING:
    from infopt.bundle.build import build
    from infopt.compress.distill import distill
    from infopt.measure.quality import evaluate
    from infopt.measure.speed import bench

__version__ = "0.1.0"
# Imported on first use: all but `bench` need torch, which a bundle whose runtime is not torch
# loads without.
_LAZY = {
    "build": "infopt.bundle.build",
    "distill": "infopt.compress.distill",
    "evaluate": "infopt.measure.quality",
    "bench": "infopt.measure.speed",
}
__all__ = [
    "Bundle",
    "BundleError",
    "ContextLengthError",
    "DefaultModelMissingError",
    "Delta",
    "DraftMismatchError",
    "GenerateOptions",
    "GenerationResult",
    "InfoptError",
    "InvalidArgumentError",
    "MemoryBudgetError",
    "Model",
    "ModelFormatError",
    "ModelNotFoundError",
    "ModelSource",
    "PlanError",
    "ProfileError",
    "RuntimeNotAvailableError",
    "Stats",
    "TextStream",
    "ToolCall",
    "UnsupportedModelError",
    "UnsupportedPlatformError",
    "bench",
    "build",
    "distill",
    "evaluate",
    "load",
    "open_bundle",
    "open_model",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'infopt' has no attribute {name!r}")
