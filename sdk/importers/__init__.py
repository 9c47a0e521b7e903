"""Model import: a GGUF file or a Hugging Face folder -> ModelSource (spec, tokenizer, weights).

The format is decided from the content (a folder with config.json, or the GGUF magic), never
from the file name.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from infopt.core.spec import ModelSpec, spec_from_hf_config
from infopt.core.tokenizer import Tokenizer
from infopt.errors import ModelFormatError, ModelNotFoundError
from infopt.importers.gguf_file import GGUF_MAGIC, import_gguf
from infopt.importers.hf_folder import PICKLE_SUFFIXES, import_hf, read_json

if TYPE_CHECKING:
    import torch

    from infopt.core.quant import QuantizedWeight

_PICKLE_MAGICS = (b"PK\x03\x04", b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")


@dataclass
class ModelSource:
    path: Path
    format: str  # "gguf" | "hf"
    spec: ModelSpec
    tokenizer: Tokenizer
    generation_defaults: dict[str, Any]
    _iter_weights: Callable[[bool], Iterator[tuple[str, Any]]] = field(repr=False)

    def iter_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(HF name, tensor) pairs read from disk one at a time (float32 for GGUF)."""
        return self._iter_weights(False)

    def iter_stored(self) -> Iterator[tuple[str, torch.Tensor | QuantizedWeight]]:
        """(HF name, weight) pairs at the file's own precision: a GGUF's Q4_0 / Q4_1 / Q5_0 / Q5_1 /
        Q8_0 / Q2_K–Q6_K matrices as `QuantizedWeight`s of the same values, every other tensor as
        `iter_weights` gives it."""
        return self._iter_weights(True)

    def read_weights(self) -> dict[str, torch.Tensor]:
        """All weights at once, under HF names."""
        return dict(self.iter_weights())

    def summary(self) -> dict[str, Any]:
        """Architecture, parameter count, context and tokenizer facts (no weights read): what
        `infopt-pack inspect MODEL` shows."""
        spec, tok = self.spec, self.tokenizer
        return {
            "path": str(self.path),
            "format": self.format,
            "architecture": spec.architecture,
            "parameters": spec.num_params,
            "context_length": spec.max_position_embeddings,
            "config": spec.to_dict(),
            "tokenizer": {
                "vocab_size": tok.vocab_size,
                "bos_token_id": tok.bos_token_id,
                "eos_token_ids": list(tok.eos_token_ids),
                "add_bos_token": tok.add_bos_token,
                "special_tokens": tok.special_tokens,
                "chat_template": bool(tok.chat_template),
            },
            "generation_defaults": self.generation_defaults,
            "tensor_types": tensor_types(self.path),
        }

    def content_hash(self) -> str:
        """sha256 of the GGUF file, or of config.json + weight files of a folder."""
        return content_hash(self.path)

    def stored_weights(self) -> dict[str, str] | None:
        """Tensor group -> the scheme the file keeps it in where infopt can keep it so too (a
        GGUF's Q4_0 / Q4_1 / Q5_0 / Q5_1 / Q8_0 / Q2_K–Q6_K matrices; "fp32" for the others; a group
        of several, the scheme of most of its weights); None when nothing in the file is stored
        that way."""
        return stored_weights(self.path)


def stored_weights(path: str | Path) -> dict[str, str] | None:
    """`ModelSource.stored_weights` of a model path, from the file's tensor types alone."""
    from infopt.importers import gguf_file

    p = Path(path).expanduser()
    if not p.is_file():
        return None
    with p.open("rb") as f:
        magic = f.read(4)
    return gguf_file.stored_weights(p) if magic == GGUF_MAGIC else None


def tensor_types(path: str | Path) -> dict[str, dict[str, int]]:
    """Per stored type of a model's tensors (a GGUF's F32 / Q4_1 / Q6_K ..., a folder's
    safetensors dtypes): {"tensors", "elements", "bytes"}, largest first, read from the files'
    indexes alone."""
    from infopt.importers import gguf_file

    p = Path(path).expanduser()
    if p.is_file():
        return gguf_file.tensor_types(p)
    out: dict[str, dict[str, int]] = {}
    for f in sorted(p.glob("*.safetensors")):
        for info in _safetensors_index(f).values():
            if not isinstance(info, dict) or "dtype" not in info:
                continue  # __metadata__
            begin, end = info["data_offsets"]
            elements = 1
            for n in info["shape"]:
                elements *= n
            entry = out.setdefault(info["dtype"], {"tensors": 0, "elements": 0, "bytes": 0})
            entry["tensors"] += 1
            entry["elements"] += elements
            entry["bytes"] += end - begin
    return dict(sorted(out.items(), key=lambda kv: -kv[1]["elements"]))


def _safetensors_index(path: Path) -> dict[str, Any]:
    """A safetensors file's header (its tensor index), checked already by `open_model`."""
    with path.open("rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header: dict[str, Any] = json.loads(f.read(size))
    return header


def content_hash(path: str | Path) -> str:
    """sha256 of a model file, or of a folder's *.json and *.safetensors files in name order
    (what identifies a model without parsing it)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise ModelNotFoundError(f"model path {str(p)!r} does not exist")
    h = hashlib.sha256()
    files = (
        [p]
        if p.is_file()
        else sorted(f for f in p.iterdir() if f.suffix in (".json", ".safetensors"))
    )
    for f in files:
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def open_model(path: str | Path) -> ModelSource:
    """Read a model's config and tokenizer (cheap); weights are read by `read_weights()`."""
    p = Path(path).expanduser()
    if not p.exists():
        raise ModelNotFoundError(f"model path {str(p)!r} does not exist")
    if p.is_dir():
        spec, tok, reader, defaults = import_hf(p)
        return ModelSource(p, "hf", spec, tok, defaults, reader)
    with p.open("rb") as f:
        magic = f.read(4)
    if magic == GGUF_MAGIC:
        spec, tok, reader, defaults = import_gguf(p)
        return ModelSource(p, "gguf", spec, tok, defaults, reader)
    if magic.startswith(_PICKLE_MAGICS) or p.suffix in PICKLE_SUFFIXES:
        raise ModelFormatError(
            f"{p}: a pickle checkpoint; infopt never unpickles (it can run "
            "arbitrary code). Give a GGUF file or an HF folder with safetensors"
        )
    if is_weight_file(p):
        raise ModelFormatError(
            f"{p}: an infopt weight file (as `distill` writes), with no tokenizer of its own; "
            "use it beside the model it was made from: as a draft (--draft, load(draft=...)), "
            "build --speculative, or eval --weights"
        )
    if p.suffix == ".safetensors":
        raise ModelFormatError(
            f"{p}: a bare safetensors file; give its folder (with config.json "
            "and tokenizer.json) instead"
        )
    raise ModelFormatError(
        f"{p}: neither a GGUF file (magic {magic!r}, expected {GGUF_MAGIC!r}) "
        "nor a Hugging Face model folder"
    )


def is_weight_file(path: str | Path) -> bool:
    """Whether `path` is a safetensors file with infopt's header (`save_model`'s), not, say,
    one shard of a Hugging Face checkpoint. Reads the header only (no torch)."""
    from safetensors import safe_open

    p = Path(path)
    if not p.is_file() or p.suffix != ".safetensors":
        return False
    try:
        with safe_open(str(p), framework="numpy") as f:
            return "infopt" in (f.metadata() or {})
    except Exception:  # not readable as safetensors at all: not ours
        return False


def load_spec(path: str | Path) -> ModelSpec:
    """Just the architecture: from a `config.json` file, a folder holding one (no weights or
    tokenizer needed), or a GGUF file. What the planner needs, e.g. for a 70B config alone."""
    p = Path(path).expanduser()
    if not p.exists():
        raise ModelNotFoundError(f"model path {str(p)!r} does not exist")
    if p.is_dir() and (p / "config.json").is_file():
        p = p / "config.json"
    if p.is_file() and p.suffix == ".json":
        return spec_from_hf_config(read_json(p))
    return open_model(p).spec
