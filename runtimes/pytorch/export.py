"""The PyTorch artifact: the (compressed) model core as an infopt weight file."""

from __future__ import annotations

from infopt.core.model import Decoder
from infopt.core.weights import save_model
from infopt.runtimes.base import Exported
from infopt.runtimes.pytorch import TARGET

FILE = "model.safetensors"


def artifact(core: Decoder, max_context: int, prefix: str = "") -> Exported:
    """The manifest entry of the artifact and the writer of its file (under `prefix`)."""
    path = f"{prefix}{FILE}"
    entry = {
        "files": [path],
        "format": "infopt-weights 1",
        "requires": TARGET.installed_requirement(),
    }
    return entry, {path: lambda target: save_model(core, target)}
