"""Qwen3, Gemma 2, Gemma 3 and Phi-3 from files: GGUFs as llama.cpp's converter writes them and
HF folders load to the model transformers computes; self-draft bundles speculate on them; the
older config spellings read the same; what infopt cannot run is refused by name."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import infopt
from infopt.bundle.build import build
from infopt.core.model import load_core
from infopt.core.spec import spec_from_hf_config
from infopt.errors import ModelFormatError, UnsupportedModelError
from infopt.importers import open_model
from tests.conftest import ARCH_CONFIGS, TINY, hf_model, save_hf_folder, write_gguf

IDS = torch.randint(0, 300, (1, 20), generator=torch.Generator().manual_seed(4))  # > windows


def _oracle(name: str, **overrides: Any) -> Any:
    arch, config = ARCH_CONFIGS[name]
    if arch == "gemma3":  # llama.cpp scales Gemma 3's scores by the head size (27B aside)
        overrides = {"query_pre_attn_scalar": config["head_dim"], **overrides}
    return hf_model(arch, **{**config, **overrides})


@pytest.mark.parametrize("name", list(ARCH_CONFIGS))
def test_a_gguf_as_llama_cpp_writes_it_loads_to_the_transformers_model(
    name: str, tmp_path: Path, tiny_tokenizer: Any
) -> None:
    hf = _oracle(name)
    path = write_gguf(hf, tiny_tokenizer, tmp_path / f"{name}.gguf", arch=ARCH_CONFIGS[name][0])
    source = open_model(path)
    reference = spec_from_hf_config(hf.config.to_dict())
    for field in ("layer_kinds", "qk_norm", "sandwich_norms", "hidden_act", "head_dim",
                  "sliding_window", "attn_softcap", "final_softcap", "rope_local_theta",
                  "attn_scale", "embed_scale"):  # fmt: skip
        assert getattr(source.spec, field) == getattr(reference, field), field
    core = load_core(source, max_context=64)
    with torch.inference_mode():
        expected = hf(IDS).logits
        got = core(IDS, torch.arange(IDS.shape[1]), 64)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert "phi3" not in name or "qkv_proj" not in str(dict(core.named_parameters()))


@pytest.mark.parametrize("name", list(ARCH_CONFIGS))
def test_a_hf_folder_loads_to_the_transformers_model(
    name: str, tmp_path: Path, tiny_tokenizer: Any
) -> None:
    """Through the folder importer: Gemma's norms become 1 + w, Phi-3's fused matrices split."""
    arch, config = ARCH_CONFIGS[name]
    hf = hf_model(arch, **config)
    folder = save_hf_folder(hf, tiny_tokenizer, tmp_path / name)
    model = infopt.load(folder, runtime="pytorch", max_context=64)
    logits = np.stack([model.runtime.forward([int(i)]) for i in IDS[0]])[:, 0]
    with torch.inference_mode():
        expected = hf(IDS).logits[0].numpy()
    np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=1e-4)


def test_a_self_draft_bundle_of_a_gemma3_speculates_to_the_same_tokens(
    tmp_path: Path, tiny_tokenizer: Any
) -> None:
    hf = hf_model("gemma3", **ARCH_CONFIGS["gemma3"][1])
    folder = save_hf_folder(hf, tiny_tokenizer, tmp_path / "g3")
    out = tmp_path / "bundle"
    build(folder, out, device="host", runtime="onnxruntime,pytorch", context=64, speculative="self")
    prompt = [{"role": "user", "content": "hello there, how are you"}]
    plain = infopt.load(out, runtime="pytorch", draft=False).generate(
        prompt, max_new_tokens=24, stop_token_ids=[]
    )
    for runtime in ("onnxruntime", "pytorch"):
        got = infopt.load(out, runtime=runtime).generate(
            prompt, max_new_tokens=24, stop_token_ids=[]
        )
        assert got.token_ids == plain.token_ids, runtime
        assert got.stats.speculative is not None and got.stats.speculative.drafted > 0


def test_older_gemma3_configs_read_the_same() -> None:
    """`sliding_window_pattern`, `rope_local_base_freq` and `rope_scaling` (transformers 4.x)."""
    old = {
        **TINY,
        "architectures": ["Gemma3ForCausalLM"],
        "num_hidden_layers": 4,
        "head_dim": 32,
        "sliding_window": 8,
        "sliding_window_pattern": 2,
        "rope_theta": 1e6,
        "rope_local_base_freq": 5000.0,
        "rope_scaling": {"rope_type": "linear", "factor": 8.0},
        "query_pre_attn_scalar": 32,
    }
    spec = spec_from_hf_config(old)
    assert spec.layer_kinds == ("sliding", "full", "sliding", "full")
    assert spec.rope_of("full") == (1e6, {"rope_type": "linear", "factor": 8.0})
    assert spec.rope_of("sliding") == (5000.0, None)
    assert spec.embed_scale == pytest.approx(8.0) and spec.attn_scale == pytest.approx(32**-0.5)
    assert spec.tie_word_embeddings is False  # TINY says so; Gemma's default is tied
    assert spec_from_hf_config({**old, "tie_word_embeddings": None}).tie_word_embeddings


def test_qwen3_sliding_layers_follow_max_window_layers() -> None:
    hf = hf_model("qwen3", use_sliding_window=True, sliding_window=4, max_window_layers=1)
    spec = spec_from_hf_config(hf.config.to_dict())
    assert spec.layer_kinds == ("full", "sliding") and spec.sliding_window == 4
    plain = spec_from_hf_config(hf_model("qwen3").config.to_dict())
    assert plain.layer_kinds == ("full", "full") and plain.sliding_window is None


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"architectures": ["Gemma3ForConditionalGeneration"]}, "Gemma3ForConditionalGeneration"),
        (
            {"architectures": ["Phi3ForCausalLM"], "partial_rotary_factor": 0.75},
            "partial_rotary_factor 0.75",
        ),
        ({"architectures": ["Gemma2ForCausalLM"], "hidden_activation": "relu"}, "'relu'"),
        (
            {"architectures": ["Gemma2ForCausalLM"], "layer_types": ["chunked_attention"] * 2},
            "chunked_attention",
        ),
    ],
)
def test_what_infopt_cannot_run_is_refused_by_name(change: dict[str, Any], message: str) -> None:
    with pytest.raises(UnsupportedModelError, match=message):
        spec_from_hf_config({**TINY, **change})


def test_a_phi3_gguf_without_both_rope_factor_tensors_is_refused(
    tmp_path: Path, tiny_tokenizer: Any
) -> None:
    import gguf

    path = write_gguf(_oracle("phi3"), tiny_tokenizer, tmp_path / "phi3.gguf", arch="phi3")
    reader = gguf.GGUFReader(path)
    writer = gguf.GGUFWriter(str(tmp_path / "cut.gguf"), "phi3")
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        value = field.contents()
        kind = field.types[0]
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, value, kind, sub_type=sub)
    for t in reader.tensors:
        if t.name != "rope_factors_short.weight":
            writer.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelFormatError, match="rope_factors"):
        open_model(tmp_path / "cut.gguf")


def test_a_phi3_gguf_keeps_its_fused_blocks_split_exactly(
    tmp_path: Path, tiny_tokenizer: Any
) -> None:
    """Q4_0 attn_qkv / ffn_up: kept as blocks (split by rows: each row keeps whole blocks), the
    same values as the file dequantized."""
    path = write_gguf(
        _oracle("phi3"), tiny_tokenizer, tmp_path / "p.gguf", arch="phi3", blocks="Q4_0"
    )
    source = open_model(path)
    assert source.stored_weights() == {
        "embeddings": "int8-g32",
        "lm_head": "int8-g32",
        "attention": "int4s-g32",
        "mlp": "int4s-g32",
    }
    stored = load_core(source, max_context=64, stored=True)
    assert type(stored.blocks[0].self_attn.q_proj).__name__ == "QuantLinear"
    assert stored.blocks[0].mlp.up_proj.shape == (128, 64)  # type: ignore[union-attr]
    plain = load_core(source, max_context=64)
    with torch.inference_mode():
        a = stored(IDS, torch.arange(IDS.shape[1]), 64)
        b = plain(IDS, torch.arange(IDS.shape[1]), 64)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_gemma2_gguf_defaults_are_llama_cpps() -> None:
    """Gemma 2 files written before the keys existed: window 4096, soft-caps 50 and 30."""
    from infopt.importers.gguf_file import spec_from_gguf

    meta = {
        "general.architecture": "gemma2",
        "gemma2.embedding_length": 64,
        "gemma2.attention.head_count": 4,
        "gemma2.block_count": 2,
        "gemma2.feed_forward_length": 128,
        "gemma2.context_length": 8192,
        "gemma2.attention.layer_norm_rms_epsilon": 1e-6,
        "gemma2.vocab_size": 300,
    }
    spec = spec_from_gguf(meta, {"token_embd.weight"}, Path("g2.gguf"))
    assert (spec.sliding_window, spec.attn_softcap, spec.final_softcap) == (4096, 50.0, 30.0)
    assert spec.layer_kinds == ("sliding", "full")


def test_gemma_norms_stay_float32_in_a_16_bit_model(tmp_path: Path, tiny_tokenizer: Any) -> None:
    """1 + w rounded to bfloat16 would move each channel by up to 2^-8: Gemma's norms stay
    float32 and multiply in float32, as transformers does; the rest computes in bfloat16."""
    hf = hf_model("gemma3", **ARCH_CONFIGS["gemma3"][1])
    folder = save_hf_folder(hf, tiny_tokenizer, tmp_path / "g3")
    core = load_core(open_model(folder), max_context=64, dtype="bfloat16")
    assert core.norm.weight.dtype == torch.float32
    assert core.blocks[0].self_attn.q_norm.weight.dtype == torch.float32  # type: ignore[union-attr]
    assert core.embed_tokens.weight.dtype == torch.bfloat16
    assert core.float_dtype == torch.bfloat16 and core.rope_cos.dtype == torch.bfloat16
    with torch.inference_mode():
        got = core(IDS, torch.arange(IDS.shape[1]), 64).float()
        expected = hf(IDS).logits
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean() > 0.9


def test_a_draft_student_keeps_its_layers_kinds() -> None:
    from infopt.compress.distill import student_from_layers
    from infopt.core.model import Decoder

    config = {**TINY, "architectures": ["Gemma3ForCausalLM"], "num_hidden_layers": 4,
              "head_dim": 32, "sliding_window": 8, "sliding_window_pattern": 2}  # fmt: skip
    teacher = Decoder(spec_from_hf_config(config))
    student = student_from_layers(teacher, 2)  # layers 0 and 3: sliding, full
    assert student.spec.layer_kinds == ("sliding", "full")


def test_a_bad_query_pre_attn_scalar_is_named() -> None:
    for value in (0, -4):
        with pytest.raises(ModelFormatError, match="query_pre_attn_scalar"):
            spec_from_hf_config(
                {**TINY, "architectures": ["Gemma2ForCausalLM"], "query_pre_attn_scalar": value}
            )


def test_a_llama3_ggufs_rope_freqs_give_transformers_llama3_rope(
    tmp_path: Path, tiny_tokenizer: Any
) -> None:
    """Llama 3.1+ GGUFs carry the llama3 RoPE scaling as `rope_freqs` divisors (llama.cpp's
    converter computes them): read as such, they give transformers' llama3 rotary."""
    rope = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16,
        "rope_theta": 500000.0,
    }
    hf = hf_model("llama", rope_parameters=rope)
    path = write_gguf(hf, tiny_tokenizer, tmp_path / "l3.gguf")
    source = open_model(path)
    assert source.spec.rope_scaling is not None
    assert source.spec.rope_scaling["rope_type"] == "freq_factors"
    core = load_core(source, max_context=64)
    with torch.inference_mode():
        expected = hf(IDS).logits
        got = core(IDS, torch.arange(IDS.shape[1]), 64)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
