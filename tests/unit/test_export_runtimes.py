"""ONNX Runtime and OpenVINO artifacts on tiny models: the exported graphs compute what the model
core computes (fp32 to rounding; quantized weights carried over bit-exactly), across the
architectures and compressions the core supports, and bundles holding them load without torch
being touched, refuse tampering and refuse the wrong package version."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import infopt
from infopt.bundle import MANIFEST, verify_bundle
from infopt.bundle.build import build
from infopt.compress.low_rank import low_rank_model
from infopt.compress.prune import prune_attention_heads, prune_mlp_channels
from infopt.compress.quantize import quantize_model
from infopt.core.quant import QuantScheme, quantize_rtn
from infopt.errors import BundleError, InvalidArgumentError, RuntimeNotAvailableError
from infopt.runtimes.onnxruntime import runtime as ort_rt
from infopt.runtimes.openvino import runtime as ov_rt
from infopt.runtimes.pytorch.runtime import PyTorchRuntime
from infopt.runtimes.registry import satisfies
from tests.conftest import ARCH_CONFIGS, hf_model, save_hf_folder

TOKENS = [5, 17, 42, 99, 3, 250, 77, 8, 120, 64, 11, 12, 13, 14, 15, 16, 17, 18]
EXPORTERS = {"onnxruntime": ort_rt.from_model, "openvino": ov_rt.from_model}
PROMPT = [{"role": "user", "content": "hello there"}]
GREEDY = {"stop_token_ids": [], "temperature": 0}


def core_of(folder: Path) -> Any:
    return infopt.load(folder, runtime="pytorch", max_context=64).runtime.model


def run_script(rt: Any) -> list[np.ndarray]:
    """Prefill, a multi-token chunk after it, single tokens, a rewind and a re-decode."""
    out = [rt.forward(TOKENS[:7]), rt.forward(TOKENS[7:12])]
    out += [rt.forward([t]) for t in TOKENS[12:]]
    rt.rewind(4)
    out.append(rt.forward(TOKENS[3:6], only_last=True))
    return out


def assert_same(core: Any, runtime: str, atol: float, numerics: str = "fast") -> None:
    expected = run_script(PyTorchRuntime(core, 64))
    got = run_script(EXPORTERS[runtime](core, max_context=64, threads=2, numerics=numerics))
    for a, b in zip(expected, got, strict=True):
        assert a.shape == b.shape
        np.testing.assert_allclose(b, a, atol=atol)


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer: Any) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("arch")
    variants = {
        "llama": ("llama", {}),
        "llama-tied": ("llama", {"tie_word_embeddings": True}),
        "qwen2-bias": ("qwen2", {}),
        "mistral-window": ("mistral", {"sliding_window": 8}),
        "llama3-rope-mqa": (
            "llama",
            {
                "num_key_value_heads": 1,
                "rope_scaling": {
                    "rope_type": "llama3",
                    "factor": 8.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 32,
                },
            },
        ),
        **ARCH_CONFIGS,
    }
    return {
        name: save_hf_folder(hf_model(arch, **kw), tiny_tokenizer, root / name)
        for name, (arch, kw) in variants.items()
    }


@pytest.mark.parametrize("runtime", list(EXPORTERS))
@pytest.mark.parametrize(
    "arch",
    ["llama", "llama-tied", "qwen2-bias", "mistral-window", "llama3-rope-mqa", *ARCH_CONFIGS],
)
def test_fp32_graphs_match_the_model_core(
    folders: dict[str, Path], arch: str, runtime: str
) -> None:
    assert_same(core_of(folders[arch]), runtime, atol=2e-5)


SCHEMES = {
    "int4 asym g32, int8 embeddings": {
        "attention": "int4-g32",
        "mlp": "int4-g32",
        "embeddings": "int8",
        "lm_head": "int8",
    },
    "int4 sym g64 attention, int8 mlp": {
        "attention": "int4s-g64",
        "mlp": "int8",
        "embeddings": "int4-g32",
        "lm_head": "int4-g32",
    },
    # a GGUF's own blocks: Q4_1 (a float offset per group) and Q8_0 (INT8 groups)
    "int4 offset g32 (Q4_1), int8 g32 embeddings (Q8_0)": {
        "attention": "int4m-g32",
        "mlp": "int4m-g32",
        "embeddings": "int8-g32",
        "lm_head": "int8-g32",
    },
    "int8 g32 attention, int4 offset g32 elsewhere": {
        "attention": "int8-g32",
        "mlp": "int4m-g32",
        "embeddings": "int4m-g32",
        "lm_head": "int4m-g32",
    },
}


@pytest.mark.parametrize("runtime", list(EXPORTERS))
@pytest.mark.parametrize("scheme", list(SCHEMES))
@pytest.mark.parametrize("arch", ["llama", "llama-tied"])
def test_quantized_weights_are_carried_over_exactly(
    folders: dict[str, Path], arch: str, scheme: str, runtime: str
) -> None:
    # numerics "exact": fp32 activations on every CPU (no int8 rounding of activations by
    # MatMulNBits or OpenVINO's dynamic quantization), so any difference left beyond fp32
    # summation order would be in the weights themselves
    core = core_of(folders[arch])
    quantize_model(core, SCHEMES[scheme])
    assert_same(core, runtime, atol=5e-5, numerics="exact")


@pytest.mark.parametrize("runtime", list(EXPORTERS))
@pytest.mark.parametrize("attention", ["int8", "int4m-g32"])
def test_exact_numerics_carry_quantized_weights_with_a_bias_exactly(
    folders: dict[str, Path], runtime: str, attention: str
) -> None:
    """Qwen2's q/k/v biases on quantized layers: on ONNX Runtime, numerics="exact" computes
    8-bit layers as a float32 MatMul on the dequantized weights, then adds the bias; OpenVINO
    stacks q/k/v into one matrix, their biases into one vector."""
    core = core_of(folders["qwen2-bias"])
    quantize_model(core, {"attention": attention, "mlp": "int8", "embeddings": "int8"})
    assert_same(core, runtime, atol=5e-5, numerics="exact")


@pytest.mark.parametrize("runtime", list(EXPORTERS))
def test_pruned_and_low_rank_models_export(folders: dict[str, Path], runtime: str) -> None:
    core = core_of(folders["llama"])
    prune_mlp_channels(core, 0.5)
    prune_attention_heads(core, kv_heads=1)
    low_rank_model(core, 0.5, groups=("mlp",))
    assert_same(core, runtime, atol=2e-5)


@pytest.mark.parametrize("runtime", list(EXPORTERS))
@pytest.mark.parametrize("arch", list(ARCH_CONFIGS))
def test_newer_architectures_compress_and_export(
    folders: dict[str, Path], arch: str, runtime: str
) -> None:
    """QK-norm, sandwich norms, GeGLU, soft-capping and per-kind RoPE survive structured
    pruning, GPTQ on calibration text, INT8 embeddings and low-rank factors, and the graphs carry
    the compressed weights exactly."""
    core = core_of(folders[arch])
    prune_mlp_channels(core, 0.5)
    prune_attention_heads(core, heads_per_group=1)
    low_rank_model(core, 0.5, groups=("mlp",))
    calibration = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    weights = {"attention": "int4-g32", "embeddings": "int8", "lm_head": "int8"}
    quantize_model(core, weights, method="gptq", calibration=calibration)
    assert_same(core, runtime, atol=5e-5, numerics="exact")


@pytest.mark.parametrize("runtime", list(EXPORTERS))
def test_quantized_low_rank_factors_export_and_save_exactly(
    folders: dict[str, Path], runtime: str, tmp_path: Path
) -> None:
    """Low-rank factors quantized by RTN (ranks a multiple of the group size): two quantized
    matrices in a row, carried exactly into the graphs and through a weight file."""
    from infopt.core.weights import load_model, save_model

    core = core_of(folders["llama"])
    ranks = low_rank_model(core, 0.5, multiple=32)
    assert {r for r in ranks.values() if r is not None} == {32}
    weights = {"attention": "int4-g32", "mlp": "int4-g32", "embeddings": "int8", "lm_head": "int8"}
    quantize_model(core, weights)
    assert sum(isinstance(m, torch.nn.Sequential) for m in core.modules()) == len(
        [r for r in ranks.values() if r]
    )
    assert_same(core, runtime, atol=5e-5, numerics="exact")
    save_model(core, tmp_path / "w.safetensors")
    again = load_model(tmp_path / "w.safetensors")
    expected = run_script(PyTorchRuntime(core, 64))
    for a, b in zip(expected, run_script(PyTorchRuntime(again, 64)), strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(InvalidArgumentError, match="GPTQ on low-rank factors"):
        quantize_model(
            _factorized(folders),
            weights,
            method="gptq",
            calibration=torch.zeros(1, 8, dtype=torch.long),
        )


def _factorized(folders: dict[str, Path]) -> Any:
    core = core_of(folders["llama"])
    low_rank_model(core, 0.5, multiple=32)
    return core


def test_a_plan_with_low_rank_and_int4_builds(tiny_gguf: Path, tmp_path: Path) -> None:
    """What the planner offers to fit a model tightly (INT4 blocks and low-rank factors) builds,
    loads and generates on ONNX Runtime."""
    from infopt.device_profiles import load_profile
    from infopt.importers import load_spec
    from infopt.plan.planner import plan

    p = plan(load_spec(tiny_gguf), load_profile("host"), context=128, quantize="int4")
    p.low_rank_ratio = 0.5
    p.compression["low_rank"] = 0.5
    (tmp_path / "plan.json").write_text(p.to_json())
    out = tmp_path / "b"
    build(tiny_gguf, out, plan_file=tmp_path / "plan.json", runtime="onnxruntime")
    manifest = verify_bundle(out)
    assert manifest["plan"]["low_rank_ratio"] == 0.5
    # each factor counted as a matrix in its scheme (no float matrix left)
    assert set(manifest["compression"]["matrices"]) == {"int8", "int4-g32"}
    r = infopt.load(out).generate("hello", max_new_tokens=8, stop_token_ids=[])
    assert len(r.token_ids) == 8


@pytest.mark.parametrize("runtime", list(EXPORTERS))
def test_fast_numerics_stay_close(folders: dict[str, Path], runtime: str) -> None:
    """The default numerics: ONNX Runtime's MatMulNBits rounds activations to int8 per block
    (accuracy level 4) on every CPU, OpenVINO only on CPUs with VNNI or AMX (elsewhere it is
    exact). Int8 rounding errs by up to 1/254 of a block's largest activation in each of a
    layer's seven matrix products; through two layers that stays within 2 % of the largest
    logit, with the same argmax nearly always."""
    core = core_of(folders["llama"])
    quantize_model(core, SCHEMES["int4 asym g32, int8 embeddings"])
    expected = np.concatenate(run_script(PyTorchRuntime(core, 64)))
    got = np.concatenate(run_script(EXPORTERS[runtime](core, max_context=64)))
    scale = np.abs(expected).max()
    assert np.abs(got - expected).max() < 0.02 * scale
    assert (got.argmax(-1) == expected.argmax(-1)).mean() >= 0.9


def test_exact_numerics_are_refused_where_a_runtime_has_none() -> None:
    from infopt.runtimes.coreml import runtime as coreml_rt

    with pytest.raises(InvalidArgumentError, match="float16"):
        coreml_rt.from_model(None, max_context=8, numerics="exact")
    with pytest.raises(InvalidArgumentError, match="numerics='wrong'"):
        infopt.load(Path("missing"), numerics="wrong")


def test_group_sizes_below_16_are_refused_for_onnx(folders: dict[str, Path]) -> None:
    core = core_of(folders["llama"])
    quantize_model(core, {"attention": "int4-g8", "mlp": "int4-g32"})
    with pytest.raises(InvalidArgumentError, match="at least 16"):
        ort_rt.from_model(core, max_context=64)


def test_quantized_embedding_storage_is_shared_with_the_lm_head(folders: dict[str, Path]) -> None:
    import onnx

    from infopt.runtimes.onnxruntime.export import build_graph

    core = core_of(folders["llama-tied"])
    quantize_model(core, SCHEMES["int4 asym g32, int8 embeddings"])
    graph = build_graph(core, 64).graph
    tables = [t for t in graph.initializer if t.dims[:1] == [core.spec.vocab_size]]
    assert len([t for t in tables if t.data_type == onnx.TensorProto.UINT8]) == 1


def test_the_tied_lm_head_reads_the_table_bytes_through_its_own_initializer(
    folders: dict[str, Path], tmp_path: Path
) -> None:
    import onnx

    from infopt.runtimes.onnxruntime.export import DATA_FILE, export_onnx

    core = core_of(folders["llama-tied"])
    quantize_model(core, SCHEMES["int4 asym g32, int8 embeddings"])
    export_onnx(core, tmp_path / "model.onnx", 64)
    graph = onnx.load_model(str(tmp_path / "model.onnx"), load_external_data=False).graph
    where = {t.name: {e.key: e.value for e in t.external_data} for t in graph.initializer}
    gather = next(n for n in graph.node if n.op_type == "GatherBlockQuantized")
    head = [n for n in graph.node if n.op_type == "MatMulNBits"][-1]
    assert head.input[1] != gather.input[0]  # one initializer each ...
    assert where[head.input[1]] == where[gather.input[0]]  # ... over the same bytes
    assert where[gather.input[0]]["location"] == DATA_FILE
    regions = {(w["offset"], w["length"]) for w in where.values() if w}
    assert (tmp_path / DATA_FILE).stat().st_size <= max(int(o) + int(n) for o, n in regions)
    # shared small constants (rotary tables) keep one initializer: they are not prepacked
    readers = [i for n in graph.node for i in n.input if i == "cos_cache"]
    assert len(readers) == len(core.blocks)


@pytest.fixture(scope="module")
def multi_bundle(tmp_path_factory: pytest.TempPathFactory, tiny_gguf: Path) -> Path:
    out = tmp_path_factory.mktemp("multi") / "b"
    build(tiny_gguf, out, device="host", runtime="onnxruntime,openvino,pytorch", context=128)
    return out


def test_a_bundle_with_three_artifacts_generates_the_same_tokens(multi_bundle: Path) -> None:
    manifest = verify_bundle(multi_bundle)
    assert manifest["runtime"]["name"] == "onnxruntime"
    assert sorted(manifest["artifacts"]) == ["onnxruntime", "openvino", "pytorch"]
    paths = {f["path"] for f in manifest["files"]}
    assert {"model.onnx", "model.onnx.data", "openvino_model.xml", "openvino_model.bin"} <= paths
    results = {
        name: infopt.load(multi_bundle, runtime=name, max_context=64).generate(
            PROMPT, max_new_tokens=16, stop_token_ids=[]
        )
        for name in manifest["artifacts"]
    }
    assert infopt.load(multi_bundle).runtime.name == "onnxruntime"
    ids = {name: r.token_ids for name, r in results.items()}
    assert ids["onnxruntime"] == ids["openvino"] == ids["pytorch"], ids


@pytest.mark.parametrize(
    "name", ["model.onnx", "model.onnx.data", "openvino_model.xml", "openvino_model.bin"]
)
def test_every_artifact_file_is_checked(multi_bundle: Path, tmp_path: Path, name: str) -> None:
    b = tmp_path / "b"
    shutil.copytree(multi_bundle, b)
    data = bytearray((b / name).read_bytes())
    data[len(data) // 2] ^= 0x01
    (b / name).write_bytes(bytes(data))
    for runtime in ("onnxruntime", "openvino"):
        with pytest.raises(BundleError, match=name):
            infopt.load(b, runtime=runtime)


def test_the_wrong_package_version_or_a_missing_package_is_refused(
    multi_bundle: Path, tmp_path: Path
) -> None:
    b = tmp_path / "b"
    shutil.copytree(multi_bundle, b)
    manifest = json.loads((b / MANIFEST).read_text())
    manifest["artifacts"]["onnxruntime"]["requires"]["version"] = ">=99.0"
    manifest["artifacts"]["openvino"]["requires"]["package"] = "openvino-from-the-future"
    (b / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=r"built for onnxruntime>=99\.0.*this environment has"):
        infopt.load(b)
    with pytest.raises(RuntimeNotAvailableError, match=r"pip install 'infopt\[openvino\]'"):
        infopt.load(b, runtime="openvino")


def test_an_openvino_bundle_batches_its_slots_unless_built_before_paged_batching(
    multi_bundle: Path, tmp_path: Path
) -> None:
    """Slots on an OpenVINO bundle run its IR in PagedAttention form, batched, each request's
    greedy tokens those it gets alone (fp32); a bundle without the "batching" entry (built
    before it) keeps one slot, whose requests take turns."""
    alone = infopt.load(multi_bundle, runtime="openvino", max_context=64)
    assert not alone.runtime.batched
    m = infopt.load(multi_bundle, runtime="openvino", max_context=64, slots=3)
    assert m.runtime.batched and m.slots == 3
    prompts = [PROMPT, PROMPT * 3, "Once upon a time"]
    expected = [alone.generate(p, max_new_tokens=12, **GREEDY).token_ids for p in prompts]
    streams = [m.stream(p, max_new_tokens=12, **GREEDY) for p in prompts]
    live = list(streams)
    while live:  # round-robin from one thread: all three decode together
        for s in list(live):
            if next(s, None) is None:
                live.remove(s)
    assert [s.result.token_ids for s in streams] == expected
    assert m.engine.largest_batch >= 2  # joined a running batch
    b = tmp_path / "b"
    shutil.copytree(multi_bundle, b)
    manifest = json.loads((b / MANIFEST).read_text())
    del manifest["artifacts"]["openvino"]["batching"]
    (b / MANIFEST).write_text(json.dumps(manifest))
    old = infopt.load(b, runtime="openvino", max_context=64, slots=3)
    assert not old.runtime.batched and old.slots == 1
    assert old.generate(prompts[1], max_new_tokens=12, **GREEDY).token_ids == expected[1]


def test_version_ranges() -> None:
    assert satisfies("1.32.0", ">=1.32") and satisfies("2026.4.1", ">=2026.4,<2027")
    assert not satisfies("1.31.9", ">=1.32") and not satisfies("2.0", ">=1.2,<2")
    assert satisfies("2.13.0+cpu", ">=2.13") and satisfies("anything", "")


def test_a_larger_context_than_exported_is_refused(multi_bundle: Path) -> None:
    planned = verify_bundle(multi_bundle)["kv_cache"]["max_context"]
    for runtime in ("onnxruntime", "openvino"):
        with pytest.raises(InvalidArgumentError, match="exported for"):
            infopt.load(multi_bundle, runtime=runtime, max_context=planned + 1)


def test_rtn_int8_rows_map_to_exact_blocks() -> None:
    """INT8 per-channel as 8-bit MatMulNBits blocks: same codes (+128), scale repeated."""
    import torch

    from infopt.runtimes.onnxruntime.export import _nbits_weights

    qw = quantize_rtn(torch.randn(8, 96), QuantScheme.parse("int8"))
    b, scales, zeros, block = _nbits_weights(qw)
    assert block == 32 and zeros is None and b.shape == (8, 3, 32)
    deq = (b.reshape(8, 96).astype(np.float32) - 128) * np.repeat(scales, 32, axis=1)
    np.testing.assert_array_equal(deq, qw.dequantize().numpy())


def test_the_profiling_tool_takes_a_pass_apart(multi_bundle: Path) -> None:
    from infopt.measure.speed import tokenizer_rss
    from infopt.tools.ort_profile import profile

    out = profile(str(multi_bundle), tokens=5, runs=3, threads=1)
    ops = out["ms_per_run"]
    assert out["runs"] == 3 and "GroupQueryAttention" in ops
    kernels = sum(ms for op, ms in ops.items() if op != "model_run")
    assert 0 < kernels <= ops["model_run"] * 1.01  # the operators run inside the pass, in turn
    assert tokenizer_rss(str(multi_bundle)) > 0
    # batched decode steps of 3 rows, each row having read the prompt first (not counted)
    batched = profile(str(multi_bundle), tokens=5, runs=3, threads=1, rows=3)
    assert batched["runs"] == 3 and batched["rows"] == 3
    assert 0 < batched["ms_per_run"]["GroupQueryAttention"] <= batched["ms_per_run"]["model_run"]
    assert profile(str(multi_bundle), tokens=5, runs=3, threads=1, rows=1)["runs"] == 3


def test_the_parity_tool_gives_genai_the_bundles_own_ir(multi_bundle: Path, tmp_path: Path) -> None:
    """tools/ov_parity: OpenVINO GenAI's pipeline feeds four inputs and keeps the last logits;
    the folder it gets computes what the bundle's IR computes, with the peers' tokenizer."""
    import openvino as ov

    from infopt.tools.ov_parity import PEER_MODEL, TOKENIZER_FILES, genai_folder, parity

    peers = tmp_path / "peers"
    with pytest.raises(InvalidArgumentError, match="setup_peers.sh"):
        genai_folder(multi_bundle, peers, tmp_path / "g")
    (peers / PEER_MODEL).mkdir(parents=True)
    for name in TOKENIZER_FILES:
        (peers / PEER_MODEL / name).write_text(name)
    folder = genai_folder(multi_bundle, peers, tmp_path / "g")
    assert (folder / "openvino_tokenizer.xml").read_text() == "openvino_tokenizer.xml"
    # a peers folder set up before the tool (its bench script cannot pick SDPA), or two bundles
    # of one name (they label the rows): refused before anything runs
    (peers / "venv" / "bin").mkdir(parents=True)
    (peers / "venv" / "bin" / "python").write_text("")
    (peers / "bench").mkdir()
    (peers / "bench" / "ovgenai_bench.py").write_text("pipe = LLMPipeline(path, 'CPU')")
    with pytest.raises(InvalidArgumentError, match="older than this tool"):
        parity([str(multi_bundle)], peers, 1, 2)
    (peers / "bench" / "ovgenai_bench.py").write_text("os.environ['ATTENTION_BACKEND']")
    with pytest.raises(InvalidArgumentError, match="two are the same"):
        parity([str(multi_bundle), str(multi_bundle)], peers, 1, 2)
    core = ov.Core()
    ours = core.compile_model(str(folder / "openvino_model.xml"), "CPU")
    theirs = core.compile_model(str(multi_bundle / "openvino_model.xml"), "CPU")
    names = [p.get_any_name() for p in ours.inputs]
    assert names == ["input_ids", "attention_mask", "position_ids", "beam_idx"]
    ids = np.array([[1, 5, 9, 2, 7]], np.int64)
    feed = {
        "input_ids": ids,
        "attention_mask": np.ones_like(ids),
        "position_ids": np.arange(ids.shape[1])[None],
        "beam_idx": np.zeros(1, np.int32),
    }
    got = ours.create_infer_request().infer(feed)[0]
    want = theirs.create_infer_request().infer({**feed, "logits_to_keep": np.array([1])})[0]
    assert got.shape == want.shape == (1, 1, want.shape[-1])
    np.testing.assert_array_equal(got, want)
