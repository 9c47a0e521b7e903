"""infopt weight files: one safetensors file holding a model core as it is, quantized or not.

The header metadata names the format and version, the ModelSpec and the quantization scheme of
every quantized module, so `load_model` rebuilds the same modules without guessing from names.
A tied embedding/LM-head table is stored once.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from infopt.core.model import Decoder, LowRankLinear, load_state_dict, replace_module
from infopt.core.quant import (
    QuantEmbedding,
    QuantizedWeight,
    QuantLinear,
    QuantScheme,
    QuantStorage,
)
from infopt.core.spec import spec_from_dict
from infopt.errors import InfoptError, ModelFormatError

FORMAT, VERSION = "infopt-weights", "1"


def save_model(model: Decoder, path: str | Path) -> int:
    """Write `model` to `path` atomically (a temporary file renamed at the end); returns bytes."""
    from safetensors.torch import save_file

    schemes = {
        name: m.scheme.name for name, m in model.named_modules() if isinstance(m, QuantStorage)
    }
    low_rank = {name: m.rank for name, m in model.named_modules() if isinstance(m, LowRankLinear)}
    # quantized low-rank factors: two quantized linears in a row (`compress.quantize`)
    low_rank_quant = {
        name: [cast(QuantLinear, m[0]).shape[0], cast(QuantLinear, m[1]).bias is not None]
        for name, m in model.named_modules()
        if isinstance(m, nn.Sequential)
        and len(m) == 2
        and all(isinstance(f, QuantLinear) for f in m)
    }
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.spec.tie_word_embeddings:
        state = {k: v for k, v in state.items() if not k.startswith("lm_head.")}
    header = {
        "format": FORMAT,
        "version": VERSION,
        "spec": model.spec.to_dict(),
        "schemes": schemes,
        "low_rank": low_rank,
        **({"low_rank_quant": low_rank_quant} if low_rank_quant else {}),
    }
    # One metadata key: safetensors writes several in a per-process random order, and the same
    # model must give the same bytes (bundles are checksummed, builds reproducible).
    meta = {"infopt": json.dumps(header, sort_keys=True)}
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        save_file(state, str(tmp), metadata=meta)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path.stat().st_size


def load_model(path: str | Path, device: str | torch.device = "cpu") -> Decoder:
    """Rebuild the model core saved by `save_model`, quantized modules included."""
    from safetensors import safe_open

    from infopt.core.tokenizer import native_errors

    with (
        native_errors(ModelFormatError, f"{path}: not a readable safetensors file"),
        safe_open(str(path), framework="pt", device=str(device)) as f,
    ):
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    try:
        meta = json.loads(meta["infopt"]) if "infopt" in meta else {}
    except (json.JSONDecodeError, RecursionError) as e:
        raise ModelFormatError(f"{path}: unreadable infopt header ({e})") from e
    if not isinstance(meta, dict):
        raise ModelFormatError(f"{path}: the infopt header is not an object")
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise ModelFormatError(
            f"{path}: format {meta.get('format')!r} version "
            f"{meta.get('version')!r}; this infopt reads {FORMAT} {VERSION}"
        )
    if not isinstance(meta.get("spec"), dict) or not isinstance(meta.get("schemes"), dict):
        raise ModelFormatError(f"{path}: the infopt header lacks its 'spec' or 'schemes' object")
    try:
        return _rebuild(meta, tensors, device)
    except (KeyError, AttributeError, TypeError, ValueError, IndexError, RuntimeError) as e:
        # a header and tensors that disagree (names, shapes): the file's fault, said as such
        if isinstance(e, InfoptError):
            raise
        raise ModelFormatError(
            f"{path}: weights and header disagree ({type(e).__name__}: {e})"
        ) from e


def _rebuild(meta: dict[str, Any], tensors: dict[str, torch.Tensor], device: Any) -> Decoder:
    spec = spec_from_dict(meta["spec"])
    with torch.device("meta"):
        model = Decoder(spec)
        for name, (rank, bias) in meta.get("low_rank_quant", {}).items():
            dense = model.get_submodule(name)
            if not isinstance(dense, nn.Linear):
                raise ModelFormatError(f"low-rank module {name!r} is not a linear layer")
            factors = nn.Linear(dense.in_features, rank, bias=False)
            replace_module(model, name, nn.Sequential(
                factors, nn.Linear(rank, dense.out_features, bias=bool(bias))
            ))  # fmt: skip
    for name, scheme_name in meta["schemes"].items():
        if name == "lm_head" and spec.tie_word_embeddings:
            continue  # rebuilt from the embedding table below
        module = model.get_submodule(name)
        qw = _stored(tensors, name, QuantScheme.parse(scheme_name), module)
        quantized: nn.Module = (
            QuantEmbedding(qw)
            if isinstance(module, nn.Embedding)
            else QuantLinear(qw, tensors.pop(f"{name}.bias", None))
        )
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, quantized)
    for name in meta.get("low_rank", {}):
        try:  # shapes only: load_state_dict below installs the tensors themselves
            u, v = (tensors[f"{name}.{k}"].to("meta") for k in ("u", "v"))
        except KeyError as e:
            raise ModelFormatError(f"low-rank module {name!r} is missing tensor {e}") from e
        bias = tensors.get(f"{name}.bias")
        replace_module(model, name, LowRankLinear(u, v, None if bias is None else bias.to("meta")))
    if spec.tie_word_embeddings and isinstance(model.embed_tokens, QuantEmbedding):
        model.lm_head = QuantLinear(model.embed_tokens.quantized())
    load_state_dict(model, tensors, device=device)
    return model.eval()


def _stored(
    tensors: dict[str, torch.Tensor], name: str, scheme: QuantScheme, module: nn.Module
) -> QuantizedWeight:
    if isinstance(module, nn.Embedding):
        shape = (module.num_embeddings, module.embedding_dim)
    elif isinstance(module, nn.Linear):
        shape = (module.out_features, module.in_features)
    else:
        raise ModelFormatError(f"{name!r} is marked quantized but is a {type(module).__name__}")
    try:
        return QuantizedWeight(
            scheme,
            tensors.pop(f"{name}.qweight"),
            tensors.pop(f"{name}.scales"),
            tensors.pop(f"{name}.zeros", None),
            shape,
            tensors.pop(f"{name}.offsets", None),
        )
    except KeyError as e:
        raise ModelFormatError(f"quantized module {name!r} is missing tensor {e}") from e
