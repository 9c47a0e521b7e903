"""Import a GGUF file: config, weights, tokenizer and chat template (via `gguf`).

Weights come dequantized to float32, or, asked to keep the file's precision, the matrices of the
block types below as infopt's own storage of the same codes and scales: the values are the
file's, bit for bit. Q4_0, Q4_1 and Q8_0 are such storage already (`int4s-g32`, `int4m-g32`,
`int8-g32`); Q5_0's 5-bit codes fit `int8-g32`, Q5_1's (with a float offset per block)
`int8m-g32`; Q4_K's sub-blocks of 32 are Q4_1's form with a scale d·sc and an offset -dmin·m
each (`int4m-g32`), Q5_K's the same with 5-bit codes (`int8m-g32`), Q2_K's sub-blocks of 16 with
2-bit codes (`int4m-g16`), Q6_K's and Q3_K's sub-blocks of 16 symmetric codes with a scale d·sc
(`int8-g16`). Those k-quant products take float32 (fp16 cannot hold them), so their scales are
kept in float32. Other block types (the i-quants, ...) come as float32, their exact values,
larger.
"""

from __future__ import annotations

import functools
import threading
import warnings
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from infopt.core.spec import ModelSpec, expected_shape
from infopt.core.tokenizer import tokenizer_from_gguf_metadata
from infopt.errors import ModelFormatError, UnsupportedModelError

if TYPE_CHECKING:
    import torch
    from gguf import GGUFReader

    from infopt.core.quant import QuantizedWeight

GGUF_MAGIC = b"GGUF"
# GGML block types kept at their precision: type -> the infopt scheme holding them exactly
BLOCK_SCHEMES = {
    "Q4_0": "int4s-g32",
    "Q4_1": "int4m-g32",
    "Q8_0": "int8-g32",
    "Q5_0": "int8-g32",
    "Q4_K": "int4m-g32",
    "Q6_K": "int8-g16",
    "Q3_K": "int8-g16",
    "Q2_K": "int4m-g16",
    "Q5_1": "int8m-g32",
    "Q5_K": "int8m-g32",
}
# general.architecture -> our family (llama.cpp writes Mistral v0.1 as llama)
SUPPORTED = {a: a for a in ("llama", "qwen2", "qwen3", "gemma2", "gemma3", "phi3")}
# GGUF tensor names -> HF names (per block, then global), as llama.cpp's converter maps them
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_SANDWICH_NAMES = {  # Gemma 2 / 3: ffn_norm is the norm before the MLP
    **_BLOCK_NAMES,
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
_FUSED_NAMES = {  # Phi-3: q/k/v and gate/up in one tensor each, split on import
    **_BLOCK_NAMES,
    "attn_qkv": "self_attn.qkv_proj",
    "ffn_up": "mlp.gate_up_proj",
}
_GLOBAL_NAMES = {"token_embd": "embed_tokens", "output_norm": "norm", "output": "lm_head"}
# Phi-3's LongRoPE factors are tensors in GGUF; the spec carries them (read with the metadata)
_ROPE_FACTORS = ("rope_factors_long.weight", "rope_factors_short.weight")
# Llama 3.1+: llama.cpp's converter stores the llama3 scaling as one divisor per frequency
_ROPE_FREQS = "rope_freqs.weight"
_FACTOR_TENSORS = (*_ROPE_FACTORS, _ROPE_FREQS)


def open_reader(path: Path) -> GGUFReader:
    """A GGUFReader, after checking the magic; malformed files become ModelFormatError. While a
    reader of the same file (path, size, modification time and inode unchanged) is still held
    (by a `ModelSource`, say), it is handed out again rather than parsed anew: gguf-py parses a
    large vocabulary element by element, seconds each time, and one command (`inspect`, `plan`,
    `build`) asks for the file's metadata, types and weights in turn. Nothing is kept once the
    callers let go (a parsed vocabulary is hundreds of MB)."""
    st = Path(path).stat()
    key = (str(path), str(Path(path).resolve()), st.st_size, st.st_mtime_ns, st.st_ino)
    with _READERS_LOCK:
        reader = _READERS.get(key)
    if reader is None:
        reader = _read(Path(path))
        with _READERS_LOCK:
            _READERS[key] = reader
    return reader


_READERS: weakref.WeakValueDictionary[tuple[object, ...], GGUFReader] = (
    weakref.WeakValueDictionary()
)
_READERS_LOCK = threading.Lock()


def _read(path: Path) -> GGUFReader:
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise ModelFormatError(
            f"{path}: not a GGUF file (magic {magic!r}, expected {GGUF_MAGIC!r})"
        )
    scan_header(path)
    try:
        with warnings.catch_warnings():  # numpy's overflow warning on a wild offset: an error
            warnings.simplefilter("error", RuntimeWarning)
            reader = _plain_reader()(path)
    except Exception as e:  # gguf raises ValueError/IndexError/struct errors on damaged files
        raise ModelFormatError(
            f"{path}: damaged or truncated GGUF file ({type(e).__name__}: {e})"
        ) from e
    check_tensor_ranges(reader, path)
    return reader


@functools.cache
def _plain_reader() -> type[GGUFReader]:
    """gguf-py's reader over a plain ndarray view of its memory map. It slices the map once per
    metadata element, and each slice of a `np.memmap` pays that subclass's bookkeeping: a
    vocabulary of a quarter million tokens took several times longer that way. The bytes are
    the same mapped file's, read-only."""
    import numpy as np
    from gguf import GGUFReader

    class PlainReader(GGUFReader):
        @property  # type: ignore[override]
        def data(self) -> np.ndarray:
            return self._plain

        @data.setter
        def data(self, mapped: np.ndarray) -> None:
            self._plain = mapped.view(np.ndarray)

    return PlainReader


# GGUF value types: fixed sizes of the scalar ones (8 is a string, 9 an array)
_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def scan_header(path: Path) -> None:
    """Walk the header's counts and lengths before gguf's reader does: a count or length that
    runs past the file (which would have the reader loop for hours or allocate without bound)
    is a ModelFormatError naming where."""
    import mmap

    with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        size, pos = len(m), 4

        def take(n: int, what: str) -> int:
            nonlocal pos
            if n < 0 or pos + n > size:
                raise ModelFormatError(
                    f"{path}: {what} at byte {pos} runs past the end of the file ({size} bytes)"
                )
            start, pos = pos, pos + n
            return start

        def u(n: int, what: str) -> int:
            start = take(n, what)
            return int.from_bytes(m[start : start + n], "little")

        def string(what: str) -> str:
            n = u(8, what)
            start = take(n, what)
            return m[start : start + n].decode("utf-8", "replace")

        u(4, "the version")
        tensors, kvs = u(8, "the tensor count"), u(8, "the metadata count")
        alignment = 32  # GGUF's default, unless general.alignment says otherwise
        for i in range(kvs):
            if pos >= size:
                raise ModelFormatError(f"{path}: metadata entry {i} of {kvs} is past the file")
            key = string("a metadata key")
            kind = u(4, "a metadata type")
            count, item = 1, kind
            if kind == 9:  # array: element type, count
                item, count = u(4, "an array type"), u(8, "an array length")
            if item == 8:
                if count > (size - pos) // 8:
                    raise ModelFormatError(f"{path}: an array of {count} strings at byte {pos}")
                for _ in range(count):
                    string("a string")
            elif key == "general.alignment" and kind == 4:
                alignment = u(4, "the alignment")
                if alignment == 0 or alignment & (alignment - 1):
                    raise ModelFormatError(
                        f"{path}: general.alignment = {alignment}: must be a power of two"
                    )
            elif item in _SCALAR_SIZES:
                take(count * _SCALAR_SIZES[item], "a metadata value")
            else:
                raise ModelFormatError(f"{path}: metadata value type {item} at byte {pos}")
        extents = []
        for i in range(tensors):
            if pos >= size:
                raise ModelFormatError(f"{path}: tensor entry {i} of {tensors} is past the file")
            name = string("a tensor name")
            dims = u(4, "a tensor's dimension count")
            if dims > 8:
                raise ModelFormatError(f"{path}: a tensor with {dims} dimensions at byte {pos}")
            shape = [u(8, "a tensor's shape") for _ in range(dims)]
            extents.append((name, shape, u(4, "a tensor's type"), u(8, "a tensor's offset")))
        _check_data_fits(path, size, -(-pos // alignment) * alignment, extents)


def _check_data_fits(
    path: Path, size: int, data_start: int, extents: list[tuple[str, list[int], int, int]]
) -> None:
    """A tensor whose bytes (by its type and shape) end past the file: a truncated file (an
    interrupted download, most often), said before gguf's reader fails on it less clearly.
    Types gguf does not know are left to the reader."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    for name, shape, kind, offset in sorted(extents, key=lambda e: e[3]):
        try:
            block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(kind)]
        except (ValueError, KeyError):
            continue
        elements = int(np.prod(shape, dtype=np.float64)) if shape else 1
        start = data_start + offset
        end = start + elements // block * block_bytes
        if start >= size:
            raise ModelFormatError(
                f"{path}: tensor {name!r} starts at byte {start:,}, past the end of the file "
                f"({size:,} bytes): a wrong offset, or a truncated file"
            )
        if end > size:
            raise ModelFormatError(
                f"{path}: tensor {name!r} ends at byte {end:,}, but the file has {size:,} "
                f"bytes: truncated ({end - size:,} bytes or more missing: an interrupted "
                "download or copy?), or a wrong type or shape in the header"
            )


def check_tensor_ranges(reader: GGUFReader, path: Path) -> None:
    """The tensors' bytes (as their types and shapes size them) tile the data section, each
    one's after the previous one's but for alignment padding, inside the file: a relabelled
    type or shape, or a wild offset, is refused, not read as garbage."""
    size, align = path.stat().st_size, max(int(reader.alignment), 1)
    spans = sorted((int(t.data_offset), int(t.n_bytes), t.name) for t in reader.tensors)
    end, previous = int(reader.data_offset), "the header"
    for start, length, name in spans:
        if start < end or start >= end + align:
            raise ModelFormatError(
                f"{path}: tensor {name!r} starts at byte {start}, where {previous!r} ends at "
                f"{end} (a type, shape or offset that does not match the data)"
            )
        end, previous = start + length, name
        if end > size:
            raise ModelFormatError(
                f"{path}: tensor {name!r} ends at byte {end}, past the file's {size} bytes "
                "(truncated, or a wrong offset, type or shape)"
            )


def read_metadata(reader: GGUFReader) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, fld in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        try:
            out[key] = fld.contents()
        except Exception as e:
            raise ModelFormatError(f"GGUF metadata key {key!r} is unreadable: {e}") from e
    return out


def spec_from_gguf(
    meta: dict[str, Any],
    tensor_names: set[str],
    path: Path,
    rope_factors: dict[str, list[float]] | None = None,
) -> ModelSpec:
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED:
        raise UnsupportedModelError(
            f"{path}: GGUF architecture {arch!r} is not supported; supported: {sorted(SUPPORTED)}"
        )

    def key(name: str, default: Any = None, kind: type = int) -> Any:
        full = name if name.startswith("tokenizer.") else f"{arch}.{name}"
        value = meta.get(full, default)
        if value is None:
            raise ModelFormatError(f"{path}: GGUF metadata key '{full}' is missing")
        numeric = isinstance(value, (int, float, np.integer, np.floating))
        if isinstance(value, bool) or not numeric or (kind is int and value != int(value)):
            raise ModelFormatError(
                f"{path}: GGUF metadata key '{full}' = {value!r}: expected "
                f"{'an integer' if kind is int else 'a number'}"
            )
        return kind(value)

    scaling = meta.get(f"{arch}.rope.scaling.type", "none")
    if scaling not in ("none", "linear"):
        raise UnsupportedModelError(
            f"{path}: GGUF rope scaling {scaling!r} is not supported; supported: ['none', 'linear']"
        )
    hidden, heads = key("embedding_length"), key("attention.head_count")
    tokens = meta.get("tokenizer.ggml.tokens") or []
    if heads <= 0 or (hidden % heads and f"{arch}.attention.key_length" not in meta):
        raise ModelFormatError(
            f"{path}: GGUF '{arch}.attention.head_count' = {heads} does not divide "
            f"'{arch}.embedding_length' = {hidden}"
        )
    layers = key("block_count")
    head_dim = key("attention.key_length", 0) or key("rope.dimension_count", hidden // heads)
    if key("rope.dimension_count", head_dim) != head_dim:
        raise UnsupportedModelError(
            f"{path}: RoPE on {key('rope.dimension_count')} of {head_dim} head dimensions "
            "(partial rotary) is not supported"
        )
    eos = key("tokenizer.ggml.eos_token_id", -1)
    bos = key("tokenizer.ggml.bos_token_id", -1)
    rope_scaling = (
        {"rope_type": "linear", "factor": key("rope.scaling.factor", kind=float)}
        if scaling == "linear"
        else None
    )
    # Gemma 2 files written before llama.cpp stored these keys: its defaults (Gemma 2's own)
    window = key("attention.sliding_window", 4096 if arch == "gemma2" else 0) or None
    extra: dict[str, Any] = {}
    if arch in ("gemma2", "gemma3"):
        # llama.cpp's layer pattern (every 2nd / 6th layer full) and attention scale (the 27B
        # models scale by hidden / heads, the others by the head size), as it builds them
        every, big = (2, 46) if arch == "gemma2" else (6, 62)
        kinds = _layer_pattern(meta.get(f"{arch}.attention.sliding_window_pattern", every),
                               layers, path)  # fmt: skip
        extra = {
            "layer_types": kinds if window else None,
            "sandwich_norms": True,
            "hidden_act": "gelu_tanh",
            "embed_scale": float(hidden) ** 0.5,
            "attn_scale": float(hidden // heads if layers == big else head_dim) ** -0.5,
        }
        if arch == "gemma2":
            extra["attn_softcap"] = key("attn_logit_softcapping", 50.0, kind=float) or None
            extra["final_softcap"] = key("final_logit_softcapping", 30.0, kind=float) or None
        else:
            extra["qk_norm"] = True
            extra["final_softcap"] = key("final_logit_softcapping", 0.0, kind=float) or None
            # the local layers' base: the file's, else llama.cpp's fixed one
            extra["rope_local_theta"] = key("rope.freq_base_swa", 10000.0, kind=float)
    if arch == "qwen3":
        extra["qk_norm"] = True
    if _ROPE_FREQS in tensor_names and arch != "phi3":
        if not rope_factors or _ROPE_FREQS not in rope_factors:
            raise ModelFormatError(f"{path}: {_ROPE_FREQS!r} is not a float32 vector")
        if len(rope_factors[_ROPE_FREQS]) != head_dim // 2:
            raise ModelFormatError(
                f"{path}: {_ROPE_FREQS!r} holds {len(rope_factors[_ROPE_FREQS])} factors, "
                f"the head size {head_dim} needs {head_dim // 2}"
            )
        rope_scaling = {"rope_type": "freq_factors", "factors": rope_factors[_ROPE_FREQS]}
    if arch == "phi3" and "rope_factors_long.weight" in tensor_names:
        factors = rope_factors
        if factors is None or not set(_ROPE_FACTORS) <= set(factors):
            raise ModelFormatError(f"{path}: Phi-3 needs both {list(_ROPE_FACTORS)} tensors")
        rope_scaling = {
            "rope_type": "longrope",
            "long_factor": factors["rope_factors_long.weight"],
            "short_factor": factors["rope_factors_short.weight"],
            "original_max_position_embeddings": key("rope.scaling.original_context_length"),
            "attention_factor": key("rope.scaling.attn_factor", 1.0, kind=float),
        }
    return ModelSpec(
        architecture=SUPPORTED[arch],
        vocab_size=key("vocab_size", len(tokens)),
        hidden_size=hidden,
        intermediate_size=key("feed_forward_length"),
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=key("attention.head_count_kv", heads),
        head_dim=head_dim,
        max_position_embeddings=key("context_length"),
        rms_norm_eps=key("attention.layer_norm_rms_epsilon", kind=float),
        rope_theta=key("rope.freq_base", 10000.0, kind=float),
        rope_scaling=rope_scaling,
        tie_word_embeddings="output.weight" not in tensor_names,
        attention_bias=arch == "qwen2",
        sliding_window=window if arch not in ("gemma2", "gemma3") or window else None,
        bos_token_id=bos if bos >= 0 else None,
        eos_token_ids=(eos,) if eos >= 0 else (),
        **extra,
    )


def _layer_pattern(pattern: Any, layers: int, path: Path) -> tuple[str, ...]:
    """Each layer's kind from `sliding_window_pattern`: a period n (every n-th layer full, as
    llama.cpp's `set_swa_pattern`) or one flag per layer (true: sliding)."""
    if isinstance(pattern, list):
        if len(pattern) != layers or not all(isinstance(f, bool) for f in pattern):
            raise ModelFormatError(
                f"{path}: sliding_window_pattern {pattern!r} is not one flag per layer"
            )
        return tuple("sliding" if f else "full" for f in pattern)
    if isinstance(pattern, bool) or not isinstance(pattern, int) or pattern <= 0:
        raise ModelFormatError(f"{path}: sliding_window_pattern = {pattern!r}")
    return tuple("full" if (i + 1) % pattern == 0 else "sliding" for i in range(layers))


def rope_factors(reader: GGUFReader, path: Path) -> dict[str, list[float]] | None:
    """RoPE factor tensors (float32 vectors), if the file has them: Phi-3's LongRoPE ones,
    Llama 3.1+'s `rope_freqs`."""
    out = {}
    for t in reader.tensors:
        if t.name in _FACTOR_TENSORS:
            if t.tensor_type.name != "F32" or len(t.shape) != 1:
                raise ModelFormatError(f"{path}: {t.name!r} is not a float32 vector")
            out[t.name] = [float(v) for v in np.asarray(t.data, dtype=np.float32)]
    return out or None


def check_shapes(reader: GGUFReader, spec: ModelSpec, path: Path) -> None:
    """Every tensor has the shape the metadata implies (a head count or width that does not
    match the weights is refused here, not met as a reshape error while loading)."""
    blocks = {t.name.split(".")[1] for t in reader.tensors if t.name.startswith("blk.")}
    if len(blocks) != spec.num_layers:
        raise ModelFormatError(
            f"{path}: {len(blocks)} blocks of tensors, where the metadata says "
            f"{spec.num_layers} ('block_count')"
        )
    for t in reader.tensors:
        if t.name in _FACTOR_TENSORS:
            continue  # read into the spec already
        name = hf_name(t.name, spec.architecture)
        if name is None:
            raise ModelFormatError(
                f"{path}: unexpected tensor {t.name!r} for a {spec.architecture}"
            )
        shape = tuple(int(d) for d in reversed(t.shape))
        expected = expected_shape(spec, name)
        if expected != shape:
            raise ModelFormatError(
                f"{path}: tensor {t.name!r} is {list(shape)}, where the metadata (hidden "
                f"{spec.hidden_size}, heads {spec.num_heads}/{spec.num_kv_heads} of "
                f"{spec.head_dim}, MLP {spec.intermediate_size}, vocabulary {spec.vocab_size}) "
                f"makes it {list(expected or ())}"
            )


def hf_name(gguf_name: str, architecture: str = "llama") -> str | None:
    """`blk.3.attn_q.weight` -> `layers.3.self_attn.q_proj.weight` (the HF name of a tensor of
    that architecture); None for unknown names."""
    parts = gguf_name.split(".")
    names = {"gemma2": _SANDWICH_NAMES, "gemma3": _SANDWICH_NAMES, "phi3": _FUSED_NAMES}.get(
        architecture, _BLOCK_NAMES
    )
    if parts[0] == "blk" and len(parts) == 4 and parts[2] in names:
        return f"layers.{parts[1]}.{names[parts[2]]}.{parts[3]}"
    if len(parts) == 2 and parts[0] in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[parts[0]]}.{parts[1]}"
    return None


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (interleaved RoPE pairs -> HF's half split)."""
    dim = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, dim, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def iter_weights(
    reader: GGUFReader, spec: ModelSpec, path: Path, keep_blocks: bool = False
) -> Iterator[tuple[str, torch.Tensor | QuantizedWeight]]:
    """Tensors one at a time, under HF names, q/k rows un-permuted for llama (one at a time, so
    a caller converting them keeps one float32 copy alive at most): dequantized to float32, or
    with `keep_blocks` the Q4_0 / Q4_1 / Q5_0 / Q5_1 / Q8_0 / Q2_K–Q6_K matrices as
    `QuantizedWeight`s of the same values (`stored_blocks`)."""
    import torch
    from gguf.quants import dequantize

    from infopt.core.model import split_fused

    for t in reader.tensors:
        if t.name in _FACTOR_TENSORS:
            continue  # read into the spec already
        name = hf_name(t.name, spec.architecture)
        if name is None:
            raise ModelFormatError(
                f"{path}: unexpected tensor {t.name!r} for a {spec.architecture}"
            )
        if keep_blocks and t.tensor_type.name in BLOCK_SCHEMES and len(t.shape) == 2:
            yield from _split_rows(spec, name, stored_blocks(t, name, spec, path))
            continue
        expected = int(np.prod([int(d) for d in t.shape]))
        try:
            array = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        except Exception as e:
            raise ModelFormatError(
                f"{path}: tensor {t.name!r} ({t.tensor_type.name}) cannot be dequantized: {e}"
            ) from e
        if array.size != expected:
            raise ModelFormatError(
                f"{path}: tensor {t.name!r} holds {array.size} values, its "
                f"header says {expected} (truncated file?)"
            )
        array = array.reshape([int(d) for d in reversed(t.shape)])
        if spec.architecture == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = spec.num_heads if "q_proj" in name else spec.num_kv_heads
            array = unpermute_qk(array, heads)
        yield from split_fused(spec, name, torch.from_numpy(np.array(array, np.float32, order="C")))


def _split_rows(
    spec: ModelSpec, name: str, qw: QuantizedWeight
) -> Iterator[tuple[str, QuantizedWeight]]:
    """Phi-3's fused matrices, stored: split into q/k/v and gate/up as `split_fused` splits a
    float one. Rows hold whole blocks, so each part keeps the file's codes and scales."""
    from infopt.core.quant import QuantizedWeight

    if name.endswith("self_attn.qkv_proj.weight"):
        q, kv = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
        parts = [("q", q), ("k", kv), ("v", kv)]
        stem = name.removesuffix("qkv_proj.weight")
    elif name.endswith("mlp.gate_up_proj.weight"):
        half = qw.shape[0] // 2
        parts = [("gate", half), ("up", half)]
        stem = name.removesuffix("gate_up_proj.weight")
    else:
        yield name, qw
        return
    start = 0
    for part, rows in parts:
        cut = slice(start, start + rows)
        yield (
            f"{stem}{part}_proj.weight",
            QuantizedWeight(
                qw.scheme,
                qw.qweight[cut].contiguous(),
                qw.scales[cut].contiguous(),
                None if qw.zeros is None else qw.zeros[cut].contiguous(),
                (rows, qw.shape[1]),
                None if qw.offsets is None else qw.offsets[cut].contiguous(),
            ),
        )
        start += rows


def stored_blocks(t: Any, name: str, spec: ModelSpec, path: Path) -> QuantizedWeight:
    """A matrix of one of the `BLOCK_SCHEMES` types as infopt's storage of the same codes and
    scales (and offsets: the mins of Q4_1, Q5_1, Q2_K, Q4_K and Q5_K): `dequantize()` gives the
    file's values exactly."""
    import torch
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    from infopt.core.quant import QuantizedWeight, QuantScheme, pack_int4

    kind = t.tensor_type.name
    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[kind]]
    k, rows = int(t.shape[0]), int(t.shape[1])
    data = np.asarray(t.data)
    if k % block or data.size != rows * (k // block) * size:
        raise ModelFormatError(
            f"{path}: tensor {t.name!r} ({kind}) holds {data.size} bytes, its "
            f"header says {rows} x {k} weights (truncated file?)"
        )
    blocks = data.reshape(rows, k // block, size)
    if kind in _UNIT_SCALES:
        codes, scales, offsets = _k_codes(kind, blocks)
    else:
        scales = _half(blocks, 0)
        offsets = _half(blocks, 2) if kind == "Q4_1" else None
        if kind == "Q8_0":
            codes = np.ascontiguousarray(blocks[..., 2:]).view(np.int8).reshape(rows, k)
        else:  # byte j of a block: weight j in its low nibble, weight j + 16 in its high one
            qs = blocks[..., 4:] if offsets is not None else blocks[..., 2:]
            codes = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).reshape(rows, k)
    if spec.architecture == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
        heads = spec.num_heads if "q_proj" in name else spec.num_kv_heads
        codes, scales = unpermute_qk(codes, heads), unpermute_qk(scales, heads)
        offsets = unpermute_qk(offsets, heads) if offsets is not None else None
    scheme = QuantScheme.parse(BLOCK_SCHEMES[kind])
    c = torch.from_numpy(np.ascontiguousarray(codes))
    return QuantizedWeight(
        scheme,
        c if scheme.bits == 8 else pack_int4(c),
        torch.from_numpy(np.ascontiguousarray(scales)),
        None,
        (rows, k),
        torch.from_numpy(np.ascontiguousarray(offsets)) if offsets is not None else None,
    )


def _half(blocks: np.ndarray, start: int) -> np.ndarray:
    """[rows, blocks] fp16 at a byte offset of each block."""
    return np.ascontiguousarray(blocks[..., start : start + 2]).view(np.float16)[..., 0]


_ONE = np.array([1], np.float16).view(np.uint8)
# byte ranges of each block that `_k_codes` sets so gguf-py's dequantizer returns bare codes:
# Q5_0's d = 1; Q5_1's d = 1 and m = 0; Q4_K's and Q5_K's d = 1, dmin = 0 and every 6-bit
# sub-block scale 1 and min 0 (packed: bytes 0-3 hold scales 0-3, 4-7 mins 0-3, 8-11 the low
# nibbles of scales 4-7 and mins 4-7, the high bits of 4-7 in the top bits of bytes 0-7); Q6_K's
# 16 int8 scales 1 and its d = 1; Q2_K's 16 (scale, min) nibble pairs (1, 0), d = 1, dmin = 0;
# Q3_K's 6-bit scales, stored plus 32, 33 (low nibbles 1 in bytes 96-103, high bit pairs 2 in
# 104-107), d = 1
_UNIT_SCALES: dict[str, list[tuple[slice, Any]]] = {
    "Q5_0": [(slice(0, 2), _ONE)],
    "Q5_1": [(slice(0, 2), _ONE), (slice(2, 4), 0)],
    "Q5_K": [(slice(0, 2), _ONE), (slice(2, 4), 0), (slice(4, 16), [1] * 4 + [0] * 4 + [1] * 4)],
    "Q4_K": [(slice(0, 2), _ONE), (slice(2, 4), 0), (slice(4, 16), [1] * 4 + [0] * 4 + [1] * 4)],
    "Q6_K": [(slice(192, 208), 1), (slice(208, 210), _ONE)],
    "Q2_K": [(slice(0, 16), 1), (slice(80, 82), _ONE), (slice(82, 84), 0)],
    "Q3_K": [(slice(96, 104), 0x11), (slice(104, 108), 0xAA), (slice(108, 110), _ONE)],
}


def _k_codes(kind: str, blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(codes [rows, k], scales [rows, groups], offsets or None) of the `_UNIT_SCALES` types'
    blocks [rows, blocks, bytes]. The codes are what gguf-py's own dequantizer reads from
    the blocks with their scales set to one (`_UNIT_SCALES`), so its bit layouts are not
    written twice; the scales (and the offsets, minus the mins) are the float32 products it
    multiplies the codes by, exact in float32 (Q5_0's and Q5_1's are the block's own fp16 d
    and m)."""
    from gguf.constants import GGMLQuantizationType
    from gguf.quants import Q4_K, dequantize

    rows, qtype = blocks.shape[0], GGMLQuantizationType[kind]
    unit = blocks.copy()
    for where, value in _UNIT_SCALES[kind]:
        unit[..., where] = value
    codes = dequantize(unit.reshape(rows, -1), qtype)
    offsets = None
    if kind == "Q5_0":
        scales = _half(blocks, 0)
    elif kind == "Q5_1":
        scales, offsets = _half(blocks, 0), _half(blocks, 2)
    elif kind in ("Q4_K", "Q5_K"):
        sc, mins = Q4_K.get_scale_min(np.ascontiguousarray(blocks[..., 4:16]).reshape(-1, 12))
        d = _half(blocks, 0).astype(np.float32).reshape(-1, 1)
        dmin = _half(blocks, 2).astype(np.float32).reshape(-1, 1)
        scales = (d * sc.astype(np.float32)).reshape(rows, -1)
        offsets = -(dmin * mins.astype(np.float32)).reshape(rows, -1)
    elif kind == "Q2_K":
        sc = blocks[..., 0:16]
        d = _half(blocks, 80).astype(np.float32)[..., None]
        scales = (d * (sc & 0x0F).astype(np.float32)).reshape(rows, -1)
        offsets = -(_half(blocks, 82).astype(np.float32)[..., None] * (sc >> 4)).reshape(rows, -1)
    elif kind == "Q3_K":  # 16 6-bit scales stored plus 32: low nibbles, then 2-bit high parts
        packed = blocks[..., 96:108].reshape(-1, 12)
        low = (packed[:, None, :8] >> np.array([0, 4], np.uint8)[None, :, None]).reshape(-1, 16)
        high = packed[:, None, 8:] >> np.array([0, 2, 4, 6], np.uint8)[None, :, None]
        sc = (low & 0x0F) | ((high.reshape(-1, 16) & 0x03) << 4)
        sc32 = (sc.astype(np.int8) - np.int8(32)).astype(np.float32).reshape(*blocks.shape[:2], 16)
        scales = (_half(blocks, 108).astype(np.float32)[..., None] * sc32).reshape(rows, -1)
    else:  # Q6_K
        sc = np.ascontiguousarray(blocks[..., 192:208]).view(np.int8).astype(np.float32)
        scales = (_half(blocks, 208).astype(np.float32)[..., None] * sc).reshape(rows, -1)
    as_int = np.int8 if kind in ("Q5_0", "Q6_K", "Q3_K") else np.uint8  # signed codes
    return codes.astype(as_int), scales, offsets


def stored_weights(path: Path) -> dict[str, str] | None:
    """The scheme infopt keeps each tensor group in when it keeps the file's blocks (see
    `stored_blocks`), read from the tensor types alone; None when it keeps none of them. A
    group whose matrices differ (a Q4_K_M file's Q5_0, Q4_K and Q6_K) is named by the scheme
    holding most of its weights (`group_scheme`); each matrix keeps its own."""
    from infopt.core.quant import group_scheme
    from infopt.plan.costs import GROUPS

    reader = open_reader(path)
    names = {t.name for t in reader.tensors}
    elements: dict[str, dict[str, int]] = {g: {} for g in GROUPS}
    for t in reader.tensors:
        parts = t.name.split(".")
        group = _GROUP_OF.get(parts[2] if parts[0] == "blk" and len(parts) == 4 else parts[0])
        tables = [group] if group else []
        if t.name == "token_embd.weight" and "output.weight" not in names:
            tables.append("lm_head")  # tied: the head is the embedding table
        for g in tables if len(t.shape) == 2 else ():  # matrices only, as `group_schemes` counts
            scheme = BLOCK_SCHEMES.get(t.tensor_type.name, "fp32")
            elements[g][scheme] = elements[g].get(scheme, 0) + int(t.n_elements)
    weights = {g: group_scheme(counts) for g, counts in elements.items()}
    return weights if set(weights.values()) != {"fp32"} else None


_GROUP_OF = {
    "token_embd": "embeddings",
    "output": "lm_head",
    **dict.fromkeys(("attn_q", "attn_k", "attn_v", "attn_output", "attn_qkv"), "attention"),
    **dict.fromkeys(("ffn_gate", "ffn_up", "ffn_down"), "mlp"),
}


def tensor_types(path: Path) -> dict[str, dict[str, int]]:
    """Per tensor type of the file (F32, Q4_1, Q6_K, ...): its tensors, their elements and the
    bytes they take, from the tensor index alone."""
    out: dict[str, dict[str, int]] = {}
    for t in open_reader(path).tensors:
        entry = out.setdefault(t.tensor_type.name, {"tensors": 0, "elements": 0, "bytes": 0})
        entry["tensors"] += 1
        entry["elements"] += int(t.n_elements)
        entry["bytes"] += int(t.n_bytes)
    return dict(sorted(out.items(), key=lambda kv: -kv[1]["elements"]))


def import_gguf(path: Path) -> tuple[ModelSpec, Any, Any, dict[str, Any]]:
    """(spec, tokenizer, weights reader function, generation defaults) for a GGUF file."""
    reader = open_reader(path)
    meta = read_metadata(reader)
    names = {t.name for t in reader.tensors}
    spec = spec_from_gguf(meta, names, path, rope_factors(reader, path))
    check_shapes(reader, spec, path)
    tokenizer = tokenizer_from_gguf_metadata(meta)
    return spec, tokenizer, lambda keep: iter_weights(reader, spec, path, keep), {}
