"""Import a Hugging Face model folder: config.json, safetensors (sharded too), tokenizer files.

Pickle checkpoints (`*.bin`, `*.pt`, `*.pth`, `*.ckpt`) are never unpickled: loading one can run
arbitrary code. Convert them to safetensors first.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from infopt.core.spec import ModelSpec, expected_shape, spec_from_hf_config
from infopt.core.tokenizer import Tokenizer, native_errors, tokenizer_from_hf_files
from infopt.errors import InfoptError, ModelFormatError

if TYPE_CHECKING:
    import torch

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# generation_config.json keys we honour, mapped to generate() argument names.
GENERATION_KEYS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty")


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFormatError(f"{path}: not readable JSON ({e})") from e
    if not isinstance(data, dict):
        raise ModelFormatError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ModelFormatError(f"{index}: no 'weight_map' object")
        bad = [n for n in weight_map.values() if not _plain_file_name(n)]
        names = set(weight_map.values()) if not bad else set()
        if bad or not names:
            raise ModelFormatError(
                f"{index}: weight_map names {bad[0] if bad else None!r}, not a file name "
                "inside the folder"
            )
        files = [folder / name for name in sorted(names)]
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
        hint = (
            f"; found pickle checkpoints {pickles}, which infopt never unpickles "
            "(convert them to safetensors)"
            if pickles
            else ""
        )
        raise ModelFormatError(f"{folder}: no *.safetensors weights{hint}")
    for f in files:
        if not f.is_file():
            raise ModelFormatError(f"{folder}: shard {f.name!r} named in the index is missing")
    return files


def _plain_file_name(name: object) -> bool:
    return (
        isinstance(name, str)
        and name not in ("", ".", "..")
        and "/" not in name
        and "\\" not in name
        and all(c.isprintable() for c in name)
    )


def iter_weights(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """Tensors one at a time, as stored (bf16 stays bf16)."""
    from safetensors import safe_open

    for f in files:
        damaged = f"{f}: damaged safetensors file"
        with native_errors(ModelFormatError, damaged):
            handle = safe_open(f, framework="pt")
            names = list(handle.keys())
        for name in names:  # the guard around the read only: a consumer's error is its own
            with native_errors(ModelFormatError, damaged):
                tensor = handle.get_tensor(name)
            yield name, tensor


def check_shapes(files: list[Path], spec: ModelSpec) -> None:
    """The tensors the headers list (no tensor data read) have the shapes config.json implies,
    in as many layers as it says: a config that does not match the weights is refused here,
    before a model of its size is laid out."""
    from safetensors import safe_open

    layers: set[int] = set()
    for f in files:
        with (
            native_errors(ModelFormatError, f"{f}: damaged safetensors file"),
            safe_open(f, framework="numpy") as st,
        ):
            shapes = {name: tuple(st.get_slice(name).get_shape()) for name in st.keys()}  # noqa: SIM118
        for raw, shape in shapes.items():
            name = raw.removeprefix("model.")
            parts = name.split(".", 2)
            if parts[0] == "layers" and len(parts) > 1 and parts[1].isdigit():
                layers.add(int(parts[1]))
            expected = expected_shape(spec, name)
            if expected is not None and shape != expected:
                raise ModelFormatError(
                    f"{f}: tensor {raw!r} has shape {shape}, config.json implies {expected}"
                )
    # distinct indices, as many as the config says, all below it: exactly 0 .. n-1 (a set of
    # range(n) would be as large as a damaged config's n)
    if len(layers) != spec.num_layers or max(layers, default=0) >= spec.num_layers:
        raise ModelFormatError(
            f"{files[0].parent}: the weights hold {len(layers)} layers, config.json's "
            f"num_hidden_layers says {spec.num_layers}"
        )


def load_tokenizer(folder: Path, spec: ModelSpec) -> Tokenizer:
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise ModelFormatError(
            f"{folder}: tokenizer.json is missing (infopt needs the fast "
            "tokenizer file; save it with tokenizer.save_pretrained())"
        )
    config_path = folder / "tokenizer_config.json"
    config = read_json(config_path) if config_path.is_file() else {}
    template_path = folder / "chat_template.jinja"
    template = read_text(template_path) if template_path.is_file() else None
    return tokenizer_from_hf_files(read_text(path), config, template, spec.eos_token_ids)


def read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ModelFormatError(f"{path}: not readable UTF-8 text ({e})") from e


def generation_defaults(folder: Path) -> tuple[dict[str, Any], tuple[int, ...]]:
    """(sampling defaults, eos ids) from generation_config.json, if the folder has one."""
    path = folder / "generation_config.json"
    if not path.is_file():
        return {}, ()
    from infopt.decode.generate import GenerateOptions

    config = read_json(path)
    eos = config.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
    if any(not isinstance(i, int) or isinstance(i, bool) for i in eos_ids):
        raise ModelFormatError(f"{path}: eos_token_id = {eos!r}, not token ids")
    if not config.get("do_sample", False):
        return {}, eos_ids
    defaults = {k: config[k] for k in GENERATION_KEYS if config.get(k) is not None}
    try:
        GenerateOptions().sampling(defaults)
    except InfoptError as e:
        raise ModelFormatError(f"{path}: {e}") from None
    return defaults, eos_ids


def import_hf(folder: Path) -> tuple[ModelSpec, Tokenizer, Any, dict[str, Any]]:
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ModelFormatError(
            f"{folder}: config.json is missing; not a Hugging Face model folder (nor an infopt "
            "bundle: no manifest.json)"
        )
    spec = spec_from_hf_config(read_json(config_path))
    defaults, eos_ids = generation_defaults(folder)
    if eos_ids:
        spec = replace(spec, eos_token_ids=eos_ids)
    files = safetensors_files(folder)
    check_shapes(files, spec)
    tokenizer = load_tokenizer(folder, spec)
    if tokenizer.vocab_size > spec.vocab_size:  # its ids would index past the embedding
        raise ModelFormatError(
            f"{folder}: tokenizer.json has {tokenizer.vocab_size} tokens, more than config.json's "
            f"vocab_size {spec.vocab_size}"
        )

    def weights(_keep: bool) -> Iterator[tuple[str, torch.Tensor]]:
        from infopt.core.model import hf_weights  # torch, only once weights are read

        return hf_weights(spec, iter_weights(files))

    return spec, tokenizer, weights, defaults
