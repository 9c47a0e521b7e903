"""Every tensor type gguf-py can dequantize loads to gguf-py's own values, and the types infopt
keeps at their precision are stored with them: a tiny model whose block matrices are stored in
each type (quantized by gguf-py where it can, random blocks where it cannot: the k- and
i-quants) is read back through infopt's importer and compared with `gguf.quants.dequantize` of
the bytes written; `inspect` names the file's types."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from infopt.core.quant import QuantizedWeight
from infopt.importers import open_model, tensor_types
from infopt.importers.gguf_file import BLOCK_SCHEMES

gguf = pytest.importorskip("gguf")

# 256 columns everywhere: the k- and i-quants' blocks are 256 wide
SHAPE = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=1, num_attention_heads=4)
CHECKED = {  # GGUF name -> HF name, the matrices the importer does not permute
    "blk.0.attn_v.weight": "layers.0.self_attn.v_proj.weight",
    "blk.0.attn_output.weight": "layers.0.self_attn.o_proj.weight",
    "blk.0.ffn_gate.weight": "layers.0.mlp.gate_proj.weight",
    "blk.0.ffn_up.weight": "layers.0.mlp.up_proj.weight",
    "blk.0.ffn_down.weight": "layers.0.mlp.down_proj.weight",
}


def dequantizable() -> list[str]:
    out = []
    for kind in gguf.GGMLQuantizationType:
        block, size = gguf.constants.GGML_QUANT_SIZES[kind]
        try:
            gguf.quants.dequantize(np.zeros((1, 256 // block * size), np.uint8), kind)
        except NotImplementedError:
            continue
        if kind.name not in ("F32",):
            out.append(kind.name)
    return out


TYPES = dequantizable()


@pytest.fixture(scope="module")
def model(tiny_tokenizer: Any) -> Any:
    from tests.conftest import hf_model

    return hf_model("llama", **SHAPE)


@pytest.mark.parametrize("kind", TYPES)
def test_each_tensor_type_loads_to_gguf_py_s_values(
    model: Any, tiny_tokenizer: Any, tmp_path: Path, kind: str
) -> None:
    from tests.conftest import write_gguf

    written: dict[str, Any] = {}
    path = write_gguf(
        model, tiny_tokenizer, tmp_path / f"{kind}.gguf", blocks=kind, written=written
    )
    weights = dict(open_model(path).iter_weights())
    # the types infopt keeps at their precision: its codes and scales in their scheme
    stored = dict(open_model(path).iter_stored()) if kind in BLOCK_SCHEMES else {}
    qtype = gguf.GGMLQuantizationType[kind]
    for gname, hf_name in CHECKED.items():
        expected = gguf.quants.dequantize(written[gname], qtype).astype(np.float32)
        got = weights[hf_name].numpy()
        assert got.shape == expected.shape and np.array_equal(got, expected), (kind, gname)
        if stored:
            qw = stored[hf_name]
            assert isinstance(qw, QuantizedWeight) and qw.scheme.name == BLOCK_SCHEMES[kind]
            assert np.array_equal(qw.dequantize().numpy(), expected), (kind, gname)
    # 7 block matrices (and the embedding and output tables, which are Q8_0); norms in F32
    ours = [g for g in written if kind == "Q8_0" or g.startswith("blk.")]
    types = tensor_types(path)
    assert types[kind]["tensors"] == len(ours) and "F32" in types
    assert types[kind]["bytes"] == sum(int(np.asarray(written[g]).nbytes) for g in ours)


def test_a_type_gguf_py_cannot_dequantize_is_a_typed_error(
    model: Any, tiny_tokenizer: Any, tmp_path: Path
) -> None:
    from infopt.errors import ModelFormatError
    from tests.conftest import write_gguf

    path = write_gguf(model, tiny_tokenizer, tmp_path / "q8_1.gguf", blocks="Q8_1")
    with pytest.raises(ModelFormatError, match="Q8_1"):
        dict(open_model(path).iter_weights())


def test_inspect_names_the_types_and_bits_per_weight(
    model: Any, tiny_tokenizer: Any, tmp_path: Path
) -> None:
    from click.testing import CliRunner

    from infopt.cli import main
    from tests.conftest import write_gguf

    path = write_gguf(model, tiny_tokenizer, tmp_path / "q4k.gguf", blocks="Q4_K")
    out = CliRunner().invoke(main, ["inspect", str(path)]).output
    line = next(line for line in out.splitlines() if line.startswith("tensor types"))
    assert "Q4_K ×7" in line and "Q8_0 ×" in line and "bits per weight" in line


def test_a_reader_is_shared_while_held_and_let_go_after(tiny_gguf: Path, tmp_path: Path) -> None:
    """One parse per file while a reader of it is alive (a command asks for the metadata, the
    types and the weights in turn); nothing kept once it is dropped; a rewritten file is read
    anew."""
    import gc
    import shutil
    import weakref

    from infopt.importers.gguf_file import open_reader

    path = tmp_path / "m.gguf"
    shutil.copyfile(tiny_gguf, path)
    first = open_reader(path)
    assert open_reader(path) is first and type(first.data) is np.ndarray  # a plain view
    gone = weakref.ref(first)
    del first
    gc.collect()
    assert gone() is None
    held = open_reader(path)
    path.write_bytes(tiny_gguf.read_bytes() + b"\0" * 64)  # another size: another file
    assert open_reader(path) is not held
