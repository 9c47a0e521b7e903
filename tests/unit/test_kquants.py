"""A GGUF mixing block types as a Q4_K_M file does (Q5_0 matrices, Q4_K and Q6_K where
llama.cpp spends more bits, Q8_0 tables; Q3_K, Q2_K, Q5_K and Q5_1 ones too): each matrix kept
in the infopt scheme that holds it exactly (Q5_0 -> int8-g32, Q4_K -> int4m-g32, Q6_K and Q3_K
-> int8-g16, Q2_K -> int4m-g16, Q5_1 and Q5_K -> int8m-g32, float32 scales for the k-quants),
bit for bit against gguf-py's own dequantizer; the groups named by the scheme of most of their
weights; the default runtimes on those matrices give the float reference's tokens with exact
numerics; a build for the host keeps them and says so. And `int8m` asked for by name."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import infopt
from infopt.bundle import open_bundle
from infopt.bundle.cache import entries
from infopt.cli import main
from infopt.core.quant import QuantizedWeight
from infopt.importers import open_model, stored_weights

gguf = pytest.importorskip("gguf")

# 256 columns everywhere: the k-quants' super-blocks are 256 wide
SHAPE = dict(
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=2,
    num_attention_heads=4,
    # the bench prefills 512 tokens; more than infopt.load's default context of 4096
    max_position_embeddings=8192,
)
MIX = {
    "blk.0.attn_output.weight": "Q4_K",
    "blk.1.attn_output.weight": "Q4_K",
    "blk.0.ffn_down.weight": "Q6_K",
    "blk.1.ffn_down.weight": "Q4_K",
    "blk.1.attn_v.weight": "Q8_0",
    "blk.1.attn_k.weight": "Q3_K",  # rows permuted by llama.cpp: scales of 16 undone with them
    "blk.0.ffn_up.weight": "Q2_K",
    "blk.0.ffn_gate.weight": "Q5_K",
    "blk.1.attn_q.weight": "Q5_1",
    "token_embd.weight": "Q5_1",  # an unsigned 8-bit table with offsets, gathered
}
SCHEMES = {
    "Q5_0": "int8-g32",
    "Q4_K": "int4m-g32",
    "Q6_K": "int8-g16",
    "Q8_0": "int8-g32",
    "Q3_K": "int8-g16",
    "Q2_K": "int4m-g16",
    "Q5_1": "int8m-g32",
    "Q5_K": "int8m-g32",
}
MATRICES = {"int8-g32": 7, "int4m-g32": 3, "int8m-g32": 3, "int8-g16": 2, "int4m-g16": 1}
PROMPT = "hello world"


@pytest.fixture(scope="module")
def written(tiny_tokenizer: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from tests.conftest import hf_model, write_gguf

    raw: dict[str, Any] = {}
    path = tmp_path_factory.mktemp("kmix") / "tiny-q4_k_m.gguf"
    model = hf_model("llama", **SHAPE)
    # a base model's file, as Gemma 3 270M's is: no chat template
    write_gguf(
        model, tiny_tokenizer, path, blocks="Q5_0", mix=MIX, written=raw, chat_template=False
    )
    return {"path": path, "raw": raw}


@pytest.fixture
def empty_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("INFOPT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_each_matrix_is_kept_bit_for_bit_in_its_scheme(written: dict[str, Any]) -> None:
    from infopt.importers.gguf_file import hf_name, unpermute_qk

    source = open_model(written["path"])
    stored = dict(source.iter_stored())
    spec = source.spec
    for gname, raw in written["raw"].items():
        kind = MIX.get(gname, "Q5_0" if gname.startswith("blk.") else "Q8_0")
        expected = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[kind]).astype(np.float32)
        name = hf_name(gname, "llama")
        if name.endswith(("q_proj.weight", "k_proj.weight")):  # llama.cpp's row order, undone
            heads = spec.num_heads if "q_proj" in name else spec.num_kv_heads
            expected = unpermute_qk(expected, heads)
        qw = stored[name]
        assert isinstance(qw, QuantizedWeight) and qw.scheme.name == SCHEMES[kind], gname
        k_quant = kind.endswith("_K")  # Q5_0's and Q5_1's scales are the file's fp16 ones
        assert qw.scales.dtype == (torch.float32 if k_quant else torch.float16), gname
        assert (qw.offsets is not None) == (kind in ("Q4_K", "Q2_K", "Q5_1", "Q5_K")), gname
        assert np.array_equal(qw.dequantize().numpy(), expected), gname


def test_groups_are_named_by_the_scheme_of_most_of_their_weights(
    written: dict[str, Any],
) -> None:
    # attention: 4 matrices in int8-g32 against one int8m-g32, one int8-g16 and two int4m-g32;
    # mlp: 2 in int8-g32 against one each of int8m-g32, int4m-g16, int8-g16 and int4m-g32
    assert stored_weights(written["path"]) == {
        "embeddings": "int8m-g32",
        "lm_head": "int8-g32",
        "attention": "int8-g32",
        "mlp": "int8-g32",
    }


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_the_default_runtimes_run_the_kept_matrices_as_the_float_reference(
    written: dict[str, Any], empty_cache: Path, runtime: str
) -> None:
    path = written["path"]
    fast = infopt.load(path, runtime=runtime, max_context=64, numerics="exact")
    reference = infopt.load(path, runtime="pytorch", max_context=64)
    for prompt in (PROMPT, "The quick brown fox"):
        a = fast.generate(prompt, max_new_tokens=12, stop_token_ids=[])
        b = reference.generate(prompt, max_new_tokens=12, stop_token_ids=[])
        assert a.token_ids == b.token_ids, (runtime, prompt)
    # the fast numerics (int8 activations on ONNX Runtime) run the same matrices
    quick = infopt.load(path, runtime=runtime, max_context=64)
    assert len(quick.generate(PROMPT, max_new_tokens=12, stop_token_ids=[]).token_ids) == 12
    (entry,) = [e for e in entries() if e["runtime"] == runtime]
    manifest = open_bundle(entry["path"]).manifest
    # 7 matrices a layer and the two tables, each in the scheme of its block type
    assert manifest["compression"]["matrices"] == MATRICES
    out = CliRunner().invoke(main, ["inspect", entry["path"]]).output
    assert "int8-g32 ×7, int4m-g32 ×3, int8m-g32 ×3, int8-g16 ×2, int4m-g16 ×1" in out
    if runtime == "onnxruntime":  # the bench measures a model without a chat template too
        from infopt.measure.speed import measure

        figures = measure(entry["path"], runtime, threads=1)
        assert figures["tg128"] > 0 and figures["pp512"] > 0
        # measured with the context infopt.load gives the file, not the entry's whole 8192
        assert figures["max_context"] == 4096
        assert "8192 tokens x batch 1, fp32 at most (a load of the model file takes 4096" in out


def test_a_build_for_the_host_keeps_each_matrix_as_the_file_stores_it(
    written: dict[str, Any], tmp_path: Path
) -> None:
    out = tmp_path / "b"
    runtimes = "onnxruntime,openvino,pytorch"
    args = ["build", str(written["path"]), "-d", "host", "--runtime", runtimes, "-o", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    manifest = open_bundle(out).manifest
    assert manifest["plan"]["compression"]["weights"] == stored_weights(written["path"])
    assert manifest["compression"]["matrices"] == MATRICES
    assert manifest["compression"]["quality"]["kind"] == "exact"
    reference = infopt.load(written["path"], runtime="pytorch", max_context=64)
    want = reference.generate(PROMPT, max_new_tokens=8, stop_token_ids=[]).token_ids
    for runtime in runtimes.split(","):
        got = infopt.load(out, runtime=runtime, numerics="exact").generate(
            PROMPT, max_new_tokens=8, stop_token_ids=[]
        )
        assert got.token_ids == want, runtime


def test_the_agreement_check_runs_a_base_model(written: dict[str, Any], empty_cache: Path) -> None:
    """`runtime_check --model FILE` on a file without a chat template (the chats' text becomes
    plain prompts): the exact row is the float reference's, token for token."""
    from infopt.tools.runtime_check import compare_default

    fast, exact = compare_default(str(written["path"]), tokens=64, new_tokens=6)
    assert exact["numerics"] == "exact" and exact["top1"] == 1.0
    assert exact["greedy_identical"] == exact["prompts"] == fast["prompts"]


def test_int8m_asked_for_builds_and_runs_alike_everywhere(tiny_gguf: Path, tmp_path: Path) -> None:
    """`--quantize int8m-g32` (round-to-nearest on a min-max grid of 256 steps, a float offset
    per group): each runtime's exact numerics give the bundle's own PyTorch tokens."""
    from infopt.core.quant import QuantScheme, quantize_rtn

    w = torch.randn(16, 64)
    qw = quantize_rtn(w, QuantScheme.parse("int8m-g32"))
    assert qw.qweight.dtype == torch.uint8 and int(qw.qweight.max()) == 255
    step = qw.scales.float().repeat_interleave(32, dim=1)
    assert ((qw.dequantize() - w).abs() <= step * 0.51).all()
    out = tmp_path / "b"
    runtimes = "onnxruntime,openvino,pytorch"
    args = ["build", str(tiny_gguf), "--quantize", "int8m-g32", "--runtime", runtimes]
    result = CliRunner().invoke(main, [*args, "-d", "host", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert set(open_bundle(out).manifest["compression"]["matrices"]) == {"int8m-g32"}
    tokens = {
        rt: infopt.load(out, runtime=rt, numerics="exact")
        .generate(PROMPT, max_new_tokens=8, stop_token_ids=[])
        .token_ids
        for rt in runtimes.split(",")
    }
    assert tokens["onnxruntime"] == tokens["openvino"] == tokens["pytorch"]


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_a_tied_int8m_table_is_gathered_and_read_by_the_head(
    tiny_tokenizer: Any, tmp_path: Path, empty_cache: Path, runtime: str
) -> None:
    """A tied model (Gemma 3) whose one table is Q5_1: the runtimes gather rows of the unsigned
    codes plus their offsets, and the head reads the same bytes, as the float reference does."""
    from tests.conftest import ARCH_CONFIGS, hf_model, write_gguf

    arch, config = ARCH_CONFIGS["gemma3"]
    hf = hf_model(arch, **{**config, "query_pre_attn_scalar": config["head_dim"]})
    path = write_gguf(
        hf, tiny_tokenizer, tmp_path / "g.gguf", arch=arch, mix={"token_embd.weight": "Q5_1"}
    )
    weights = stored_weights(path)
    assert weights is not None and weights["embeddings"] == weights["lm_head"] == "int8m-g32"
    fast = infopt.load(path, runtime=runtime, max_context=64, numerics="exact")
    reference = infopt.load(path, runtime="pytorch", max_context=64)
    for prompt in (PROMPT, "The quick brown fox jumps over"):
        a = fast.generate(prompt, max_new_tokens=10, stop_token_ids=[]).token_ids
        assert a == reference.generate(prompt, max_new_tokens=10, stop_token_ids=[]).token_ids


def test_run_refuses_a_system_message_it_would_drop(written: dict[str, Any]) -> None:
    """A base model has no chat template: `run --system` used to drop the message unsaid."""
    path = str(written["path"])
    base = ["run", path, "--runtime", "pytorch", "--prompt", "hi", "-n", "2"]
    result = CliRunner().invoke(main, [*base, "--system", "Be brief."])
    assert result.exit_code == 2 and "no chat template, so --system" in result.output
    result = CliRunner().invoke(main, [*base, "--raw", "--system", "Be brief."])
    assert result.exit_code == 2 and "--system needs the chat template" in result.output
    assert CliRunner().invoke(main, base).exit_code == 0
