"""Model import from GGUF files and HF folders, checked against transformers; bad input refused."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import infopt
from infopt.errors import (
    ModelFormatError,
    ModelNotFoundError,
    UnsupportedModelError,
)
from infopt.importers import open_model
from tests.conftest import CORPUS, hf_model, save_hf_folder, write_gguf

IDS = [1, 40, 77, 120, 5, 300, 12, 9, 64, 200, 31, 2]


def infopt_logits(path: Path) -> np.ndarray:
    return infopt.load(path, runtime="pytorch", max_context=64).runtime.forward(IDS)


def hf_logits(model: Any) -> np.ndarray:
    with torch.inference_mode():
        return model(torch.tensor([IDS])).logits[0].numpy()


def test_gguf_import_matches_the_source_model(tiny_gguf: Path, tiny_hf: Any) -> None:
    np.testing.assert_allclose(infopt_logits(tiny_gguf), hf_logits(tiny_hf), atol=1e-4)


def test_gguf_import_matches_transformers_loading_the_same_file(tiny_gguf: Path) -> None:
    from transformers import AutoModelForCausalLM

    oracle = AutoModelForCausalLM.from_pretrained(
        str(tiny_gguf.parent), gguf_file=tiny_gguf.name, dtype=torch.float32
    ).eval()
    np.testing.assert_allclose(infopt_logits(tiny_gguf), hf_logits(oracle), atol=1e-4)


def test_gguf_metadata(tiny_gguf: Path) -> None:
    src = open_model(tiny_gguf)
    assert src.format == "gguf" and src.spec.architecture == "llama"
    assert (src.spec.num_layers, src.spec.num_heads, src.spec.num_kv_heads) == (2, 4, 2)
    assert not src.spec.tie_word_embeddings
    assert src.tokenizer.eos_token_ids == (2,) and src.tokenizer.chat_template


def test_gguf_tokenizer_equals_the_trained_one(tiny_gguf: Path, tiny_tokenizer: Any) -> None:
    tok = open_model(tiny_gguf).tokenizer
    for text in [*CORPUS, "3.14159 and 2024", "<|im_start|>user\nhi<|im_end|>"]:
        assert tok.encode(text) == tiny_tokenizer.encode(text).ids
        assert tok.decode(tok.encode(text), skip_special_tokens=False) == text


def test_tied_gguf_has_no_output_tensor(tmp_path: Path, tiny_tokenizer: Any) -> None:
    hf = hf_model("llama", tie_word_embeddings=True)
    path = write_gguf(hf, tiny_tokenizer, tmp_path / "tied.gguf")
    assert open_model(path).spec.tie_word_embeddings
    np.testing.assert_allclose(infopt_logits(path), hf_logits(hf), atol=1e-4)


def test_qwen2_gguf_keeps_q_k_unpermuted(tmp_path: Path, tiny_tokenizer: Any) -> None:
    hf = hf_model("qwen2")
    path = write_gguf(hf, tiny_tokenizer, tmp_path / "q.gguf", arch="qwen2", pre="qwen2")
    np.testing.assert_allclose(infopt_logits(path), hf_logits(hf), atol=1e-4)


@pytest.mark.parametrize("shard", [False, True])
def test_hf_folder_import(tmp_path: Path, tiny_hf: Any, tiny_tokenizer: Any, shard: bool) -> None:
    folder = save_hf_folder(tiny_hf, tiny_tokenizer, tmp_path / "m", shard=shard)
    assert (folder / "model.safetensors.index.json").exists() == shard
    src = open_model(folder)
    assert (
        src.format == "hf" and src.tokenizer.encode("hello") == tiny_tokenizer.encode("hello").ids
    )
    np.testing.assert_allclose(infopt_logits(folder), hf_logits(tiny_hf), atol=1e-4)


def test_hf_generation_config_sets_defaults(tmp_path: Path, tiny_folder: Path) -> None:
    folder = Path(shutil.copytree(tiny_folder, tmp_path / "m"))
    (folder / "generation_config.json").write_text(
        json.dumps({"do_sample": True, "temperature": 0.3, "top_p": 0.9, "eos_token_id": [2, 0]})
    )
    src = open_model(folder)
    assert src.generation_defaults == {"temperature": 0.3, "top_p": 0.9}
    assert src.spec.eos_token_ids == (2, 0) and src.tokenizer.eos_token_ids == (2, 0)


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="nope.gguf"):
        open_model(tmp_path / "nope.gguf")


def test_wrong_magic(tmp_path: Path) -> None:
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"GGML" + b"\0" * 100)
    with pytest.raises(
        ModelFormatError, match=r"neither a GGUF file \(magic b.GGML., expected b.GGUF.\)"
    ):
        open_model(bad)


@pytest.mark.parametrize("keep", [0.02, 0.5, 0.99])
def test_truncated_gguf(tmp_path: Path, tiny_gguf: Path, keep: float) -> None:
    data = tiny_gguf.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ModelFormatError, match="cut.gguf"):
        open_model(cut).read_weights()


def test_unsupported_gguf_architecture(tmp_path: Path) -> None:
    import gguf

    w = gguf.GGUFWriter(str(tmp_path / "falcon.gguf"), "falcon")
    w.add_tensor("token_embd.weight", np.zeros((4, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    supported = r"\['gemma2', 'gemma3', 'llama', 'phi3', 'qwen2', 'qwen3'\]"
    with pytest.raises(UnsupportedModelError, match=rf"'falcon'.*supported: {supported}"):
        open_model(tmp_path / "falcon.gguf")


def test_unsupported_hf_architecture(tmp_path: Path, tiny_folder: Path) -> None:
    folder = Path(shutil.copytree(tiny_folder, tmp_path / "m"))
    config = json.loads((folder / "config.json").read_text())
    config["architectures"], config["model_type"] = ["GPT2LMHeadModel"], "gpt2"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match="GPT2LMHeadModel.*LlamaForCausalLM"):
        open_model(folder)


class _Payload:
    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {os.environ['INFOPT_PWNED']}",))


def test_pickle_checkpoints_are_never_unpickled(
    tmp_path: Path, tiny_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = tmp_path / "pwned"
    monkeypatch.setenv("INFOPT_PWNED", str(marker))
    folder = tmp_path / "m"
    folder.mkdir()
    shutil.copy(tiny_folder / "config.json", folder)
    shutil.copy(tiny_folder / "tokenizer.json", folder)
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload()))
    with pytest.raises(ModelFormatError, match="never unpickles"):
        open_model(folder)
    with pytest.raises(ModelFormatError, match="never unpickles"):
        open_model(folder / "pytorch_model.bin")
    assert not marker.exists()
    assert sorted(p.name for p in folder.iterdir()) == [
        "config.json",
        "pytorch_model.bin",
        "tokenizer.json",
    ]  # nothing written


def test_folder_without_tokenizer_or_config(tmp_path: Path, tiny_folder: Path) -> None:
    folder = Path(shutil.copytree(tiny_folder, tmp_path / "m"))
    (folder / "tokenizer.json").unlink()
    with pytest.raises(ModelFormatError, match="tokenizer.json is missing"):
        open_model(folder)
    (folder / "config.json").unlink()
    with pytest.raises(ModelFormatError, match="config.json is missing"):
        open_model(folder)


def test_weights_that_do_not_match_the_config(tmp_path: Path, tiny_folder: Path) -> None:
    folder = Path(shutil.copytree(tiny_folder, tmp_path / "m"))
    config = json.loads((folder / "config.json").read_text())
    config["intermediate_size"] = 96
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelFormatError, match=r"mlp\.(gate|up|down)_proj\.weight. has shape"):
        infopt.load(folder, max_context=16)


def test_a_gguf_keeps_its_q4_1_and_q8_0_blocks_bit_for_bit(tiny_gguf_q41: Path) -> None:
    from gguf import GGUFReader

    from infopt.core.model import load_core
    from infopt.core.quant import QuantEmbedding, QuantizedWeight, QuantLinear
    from infopt.runtimes.pytorch.runtime import PyTorchRuntime

    source = open_model(tiny_gguf_q41)
    floats = dict(source.iter_weights())  # gguf's own dequantization (q/k un-permuted)
    stored = dict(source.iter_stored())
    kinds = {t.tensor_type.name for t in GGUFReader(tiny_gguf_q41).tensors}
    assert {"Q4_1", "Q8_0"} <= kinds
    schemes = {w.scheme.name for w in stored.values() if isinstance(w, QuantizedWeight)}
    assert schemes == {"int4m-g32", "int8-g32"}
    for name, w in stored.items():
        value = w.dequantize() if isinstance(w, QuantizedWeight) else w
        assert torch.equal(value, floats[name]), name
    core = load_core(source, 64, stored=True)
    assert isinstance(core.layers[0].self_attn.q_proj, QuantLinear)
    assert isinstance(core.embed_tokens, QuantEmbedding)
    ids = [5, 17, 42, 99, 3, 250, 77]
    dense = PyTorchRuntime(load_core(source, 64), 64).forward(ids)
    np.testing.assert_array_equal(PyTorchRuntime(core, 64).forward(ids), dense)


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_a_q4_1_gguf_runs_exactly_on_the_exported_runtimes(
    tiny_gguf_q41: Path, runtime: str
) -> None:
    """Q4_1's float offsets go through MatMulNBits with zero zero-points plus the block sums
    (ONNX Runtime) and through the decompressed codes plus the block sums (OpenVINO): with
    fp32 activations the logits are the dequantized model's."""
    from infopt.core.model import load_core
    from infopt.runtimes import target
    from infopt.runtimes.pytorch.runtime import PyTorchRuntime

    source = open_model(tiny_gguf_q41)
    ids = [5, 17, 42, 99, 3, 250, 77, 8, 120]
    expected = PyTorchRuntime(load_core(source, 64), 64).forward(ids)
    rt = (
        target(runtime)
        .module("runtime")
        .from_model(load_core(source, 64, stored=True), max_context=64, numerics="exact")
    )
    np.testing.assert_allclose(rt.forward(ids), expected, atol=5e-5)
