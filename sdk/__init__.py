"""infopt: plan, compress, package and run decoder-only LLMs on edge devices and desktops.

import infopt
m = infopt.load()                      # the default model, SmolLM2-135M-Instruct
print(m.generate([{"role": "user", "content": "Hi!"}]).text)
"""

from infopt.api import Model, load
from infopt.errors import (
    ContextLengthError,
    DefaultModelMissingError,
    InfoptError,
    InvalidArgumentError,
    ModelFormatError,
    ModelNotFoundError,
    RuntimeNotAvailableError,
    UnsupportedModelError,
    UnsupportedPlatformError,
)
from infopt.generate import GenerationResult, Stats, TextStream
from infopt.importers import ModelSource, open_model

__version__ = "0.1.0"
__all__ = [
    "ContextLengthError",
    "DefaultModelMissingError",
    "GenerationResult",
    "InfoptError",
    "InvalidArgumentError",
    "Model",
    "ModelFormatError",
    "ModelNotFoundError",
    "ModelSource",
    "RuntimeNotAvailableError",
    "Stats",
    "TextStream",
    "UnsupportedModelError",
    "UnsupportedPlatformError",
    "load",
    "open_model",
]
