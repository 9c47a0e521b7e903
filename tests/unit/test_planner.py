"""Device profiles, the memory/speed models and the planner, table-driven over real configs."""

from __future__ import annotations

import json
import re
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from infopt.cli import main
from infopt.core.model import Decoder
from infopt.core.spec import spec_from_hf_config
from infopt.device_profiles import builtin_names, load_profile
from infopt.errors import InvalidArgumentError, PlanError, ProfileError
from infopt.importers import load_spec
from infopt.plan.costs import Compression, estimate, kv_cache_bytes, scheme_bytes, weight_bytes
from infopt.plan.planner import HEADROOM, plan, replan
from tests.conftest import TINY

CONFIGS = Path(__file__).parents[1] / "data" / "configs"
MODELS = ["smollm2-135m", "llama-3.2-1b", "llama-2-7b", "llama-2-13b", "llama-2-70b"]
DEVICES = ["a100-80gb", "v100-32gb", "rtx4090-24gb", "intel-cpu", "apple-ane"]


def test_builtin_profiles_load_and_cite_every_figure() -> None:
    assert set(DEVICES) | {"host"} == set(builtin_names())
    for name in DEVICES:
        p = load_profile(name)
        assert p.usable_bytes <= p.memory_bytes and p.bandwidth > 0
        assert all(p.sources[k] for k in ("memory", "bandwidth", "peak_compute", "efficiency"))
    assert "bf16" not in load_profile("v100-32gb").compute_precisions
    assert "bf16" not in load_profile("v100-32gb").weight_precisions
    ane = load_profile("apple-ane")
    assert ane.static_shapes and ane.compute_precisions == ("fp16",)


def test_host_profile_reads_this_machine() -> None:
    host = load_profile("host")
    assert host.kind == "cpu" and host.cores and host.cores >= 1
    assert 0 < host.usable_bytes <= host.memory_bytes
    assert "not measured" in host.sources["bandwidth"]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"bandwidth": "2039 GB"}, r"bandwidth = '2039 GB'.*GB/s"),
        ({"memory": "80"}, r"memory = '80'"),
        ({"colour": "green"}, r"unknown key\(s\) \['colour'\]"),
        ({"peak_compute": {"fp8": "1 TFLOPS"}}, r"peak_compute.fp8: unknown precision"),
        ({"usable_memory": "90 GB"}, r"usable_memory '90 GB' exceeds memory"),
        ({"efficiency": {"decode": 1.5, "prefill": 0.5}}, r"efficiency"),
        ({"sources": {"memory": "x"}}, r"sources"),
        ({"schema": 2}, r"schema = 2"),
    ],
)
def test_bad_profile_files_name_file_and_key(tmp_path: Path, edit: dict, message: str) -> None:
    import tomllib

    from infopt.device_profiles import resources

    text = (resources.files("infopt.device_profiles") / "a100-80gb.toml").read_text()
    data = {**tomllib.loads(text), **edit}
    path = tmp_path / "mine.toml"
    path.write_text(_to_toml(data))
    with pytest.raises(ProfileError, match=message) as err:
        load_profile(path)
    assert "mine.toml" in str(err.value)


def test_missing_key_and_unknown_device(tmp_path: Path) -> None:
    path = tmp_path / "p.toml"
    path.write_text('schema = 1\nname = "x"\n')
    with pytest.raises(ProfileError, match=r"p.toml: missing key\(s\) \['bandwidth'"):
        load_profile(path)
    with pytest.raises(ProfileError, match="unknown device 'tpu-v9'"):
        load_profile("tpu-v9")


def _to_toml(data: dict) -> str:
    lines, tables = [], []
    for k, v in data.items():
        if isinstance(v, dict):
            tables.append(f"[{k}]\n" + "".join(f"{a} = {json.dumps(b)}\n" for a, b in v.items()))
        else:
            lines.append(f"{k} = {json.dumps(v)}")
    return "\n".join(lines) + "\n" + "\n".join(tables)


def test_scheme_bytes_count_scales_and_zero_points() -> None:
    assert scheme_bytes("fp16", 10, 64) == 1280
    assert scheme_bytes("int8", 10, 64) == 640 + 20  # a fp16 scale per row
    assert scheme_bytes("int4-g32", 10, 64) == 320 + 10 * 2 * 2.5  # fp16 scale + 4-bit zero
    assert scheme_bytes("int4s-g32", 10, 64) == 320 + 10 * 2 * 2  # symmetric: no zero-point
    with pytest.raises(InvalidArgumentError, match="group 128 does not divide the input size 576"):
        scheme_bytes("int4-g128", 576, 576)
    with pytest.raises(InvalidArgumentError, match="int3"):
        scheme_bytes("int3", 1, 1)


def test_weight_bytes_match_the_parameter_count() -> None:
    for name in MODELS:
        spec = load_spec(CONFIGS / f"{name}.json")
        fp16 = Compression(
            "fp16", dict.fromkeys(("embeddings", "lm_head", "attention", "mlp"), "fp16")
        )
        groups = weight_bytes(spec, fp16)
        other_params = groups["other"] / 4
        assert (sum(groups.values()) - groups["other"]) / 2 + other_params == spec.num_params


@pytest.mark.parametrize("context", [16, 100])
def test_kv_arithmetic_equals_the_model_cores_cache_tensors(context: int) -> None:
    spec = spec_from_hf_config({**TINY, "architectures": ["LlamaForCausalLM"]})
    model = Decoder(spec)
    model.setup_cache(context, batch=2, dtype=torch.float16)
    real = sum(b.nbytes for n, b in model.named_buffers() if n.endswith((".k", ".v")))
    assert real == kv_cache_bytes(spec, context, 2, "fp16")


def test_kv_arithmetic_knows_sliding_layers_and_a_head_size_of_its_own() -> None:
    """Gemma 3's shape: head_dim 32 (not hidden / heads = 16), one full layer in three."""
    config = {
        **TINY,
        "num_hidden_layers": 3,
        "head_dim": 32,
        "sliding_window": 8,
        "layer_types": ["sliding_attention", "sliding_attention", "full_attention"],
        "architectures": ["Gemma3ForCausalLM"],
    }
    spec = spec_from_hf_config(config)
    model = Decoder(spec)
    model.setup_cache(100, batch=2, dtype=torch.float16)
    real = sum(b.nbytes for n, b in model.named_buffers() if n.endswith((".k", ".v")))
    assert real == kv_cache_bytes(spec, 100, 2, "fp16")  # what the runtimes allocate
    per_position = 2 * spec.num_kv_heads * 32 * 2 * 2  # K and V, heads, head_dim, batch, fp16
    assert kv_cache_bytes(spec, 100, 2, "fp16", windowed=True) == (8 + 8 + 100) * per_position
    assert kv_cache_bytes(spec, 6, 2, "fp16", windowed=True) == 3 * 6 * per_position
    fp16 = Compression("fp16", dict.fromkeys(("embeddings", "lm_head", "attention", "mlp"), "fp16"))
    groups = weight_bytes(spec, fp16)
    assert (sum(groups.values()) - groups["other"]) / 2 + groups["other"] / 4 == spec.num_params
    assert spec.num_params == sum(p.numel() for p in Decoder(spec).parameters())
    reasons = " ".join(plan(spec, load_profile("host"), context=100).reasons)
    assert "2 of 3 layers attend to the last 8 tokens only" in reasons


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("model", MODELS)
def test_every_plan_fits_or_is_refused_with_the_shortfall(device: str, model: str) -> None:
    spec = load_spec(CONFIGS / f"{model}.json")
    profile = load_profile(device)
    context = min(4096, spec.max_position_embeddings)
    try:
        p = plan(spec, profile, context=context)
    except PlanError as e:
        message = str(e)
        assert "bytes" in message and "more than the" in message and "would fit with" in message
        return
    assert p.predicted["total"] <= profile.usable_bytes * (1 - HEADROOM)
    assert p.headroom_bytes >= profile.usable_bytes * HEADROOM
    used = {*p.compression["weights"].values(), p.compression["kv_dtype"], p.compute_precision}
    if device == "v100-32gb":
        assert "bf16" not in used
    if device == "apple-ane":
        assert p.compute_precision == "fp16" and p.static_shapes and "fp32" not in used
    assert p.reasons and all(r["reason"] for r in p.rejected)
    json.dumps(p.to_dict())  # JSON-serializable


def test_the_article_is_wrong_about_70b_fp16_on_a100() -> None:
    spec = load_spec(CONFIGS / "llama-2-70b.json")
    p = plan(spec, load_profile("a100-80gb"), context=4096)
    assert p.compression["weights"]["mlp"].startswith("int4")
    fp16 = next(r for r in p.rejected if r["option"] == "fp16")
    assert "over the budget" in fp16["reason"]
    assert p.predicted["quick_formula"] < 2 * spec.num_params  # quick formula is shown too


def test_70b_on_a_24gb_card_is_fitted_by_named_means_or_refused() -> None:
    spec = load_spec(CONFIGS / "llama-2-70b.json")
    p = plan(spec, load_profile("rtx4090-24gb"), context=4096)
    assert p.compression["mlp_prune"] or p.compression["low_rank"]  # by named means
    assert any("distillation" in r for r in p.reasons)
    with pytest.raises(PlanError, match=r"does not fit rtx4090-24gb.*\d[\d,]+ bytes"):
        plan(spec, load_profile("rtx4090-24gb"), context=4096, batch=64)


def test_latency_target_picks_a_faster_option_or_refuses() -> None:
    spec = load_spec(CONFIGS / "llama-2-7b.json")
    relaxed = plan(spec, load_profile("rtx4090-24gb"), context=2048)
    tight = plan(spec, load_profile("rtx4090-24gb"), context=2048, latency_ms=12)
    assert tight.predicted["ms_per_token"] <= 12 < relaxed.predicted["ms_per_token"]
    assert any("misses the 12 ms target" in r["reason"] for r in tight.rejected)
    with pytest.raises(PlanError, match="no plan meets 0.5 ms/token"):
        plan(spec, load_profile("rtx4090-24gb"), context=2048, latency_ms=0.5)


def test_group_size_that_does_not_divide_576_is_rejected_by_name() -> None:
    spec = load_spec(CONFIGS / "smollm2-135m.json")
    profile = load_profile("apple-ane")
    p = plan(spec, replace(profile, usable_bytes=0.30e9), context=512)
    assert p.compression["weights"]["mlp"] == "int4-g32"
    p = plan(spec, replace(profile, usable_bytes=0.28e9), context=512)
    assert any("int4-g128 does not divide" in r["reason"] for r in p.rejected)
    assert p.compression["weights"]["mlp"] == "int4-g64"  # the coarsest group dividing 576
    # Core ML holds its cache in fp16 whatever a plan asks: no int8-KV option is offered
    assert p.compression["kv_dtype"] == "fp16" and p.compression["mlp_prune"] == 0.25
    assert any("coreml holds its KV cache in fp16" in r["reason"] for r in p.rejected)


def test_plans_state_the_kv_precision_the_runtime_holds() -> None:
    spec = load_spec(CONFIGS / "smollm2-135m.json")
    host = replace(load_profile("host"), runtimes=["onnxruntime", "openvino", "pytorch"])
    on_ort = plan(spec, host, quantize="int8")
    assert on_ort.runtime == "onnxruntime" and on_ort.compression["kv_dtype"] == "fp32"
    assert any("KV cache fp32: the precision onnxruntime holds its cache in" in r
               for r in on_ort.reasons)  # fmt: skip
    as_built = replan(on_ort, spec, host, runtime="pytorch")  # model fp32 where quantized
    assert as_built.compression["kv_dtype"] == "fp32"
    on_ov = replan(on_ort, spec, host, runtime="openvino")  # OpenVINO takes the plan's
    assert on_ov.compression["kv_dtype"] == "fp32"
    bf16 = replace(on_ort, compression={**on_ort.compression, "kv_dtype": "bf16"})
    assert replan(bf16, spec, host, runtime="openvino").compression["kv_dtype"] == "bf16"
    assert replan(bf16, spec, host).compression["kv_dtype"] == "fp32"  # onnxruntime's own


def test_cli_plan_and_devices() -> None:
    runner = CliRunner()
    out = runner.invoke(main, ["devices"]).stdout
    lines = out.splitlines()  # a table: a header, then each profile's row starting with its name
    assert lines[0].split()[:4] == ["name", "kind", "usable", "bandwidth"]
    starts = {line.split()[0] for line in lines[1:] if line and not line.startswith(" ")}
    assert starts == {*DEVICES, "host"}


@pytest.mark.parametrize("columns", [80, 120, 240])
def test_devices_on_a_terminal_of_any_width_keeps_every_column(
    columns: int, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Too narrow for the table (80 or 120 columns), one record per profile; wide enough, the
    table: either way every column of every profile is there, and no line is wider than the
    terminal unless one word is."""
    from infopt.cli.plan import devices

    monkeypatch.setenv("COLUMNS", str(columns))
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    devices.callback(measure_bandwidth=False, as_json=False)  # type: ignore[misc]
    out = re.sub(r"\x1b\[[0-9;]*m", "", capsys.readouterr().out)  # a terminal's header is bold
    lines = [line.rstrip() for line in out.splitlines()]
    assert all(len(line) <= columns for line in lines)
    for name in ("kind", "usable", "bandwidth", "weights", "compute", "runtimes", "description"):
        assert name in out
    assert "Core ML: fp16 compute" in " ".join(out.split())  # the longest description, whole
    if columns < 240:  # records: a profile's name alone, then its cells
        assert {line for line in lines if not line.startswith(" ")} == {*DEVICES, "host"}
        assert sum(line.split()[0] == "kind" for line in lines) == len(DEVICES) + 1
    else:
        assert lines[0].split()[:4] == ["name", "kind", "usable", "bandwidth"]


def test_cli_plan_on_a_model_config() -> None:
    runner = CliRunner()
    result = runner.invoke(
        main,
        [
            "plan",
            "-m",
            str(CONFIGS / "llama-2-70b.json"),
            "-d",
            "a100-80gb",
            "--context",
            "4096",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["compression"]["weights"]["attention"] == "int4-g32"
    text = runner.invoke(
        main,
        ["plan", "-m", str(CONFIGS / "llama-2-13b.json"), "-d", "v100-32gb", "--scenario", "chat"],
    ).stdout
    assert "why:" in text and "rejected (less lossy)" in text and "quick formula" in text
    refused = runner.invoke(
        main, ["plan", "-m", str(CONFIGS / "llama-2-70b.json"), "-d", "intel-cpu"]
    )
    assert refused.exit_code == 1 and "PlanError" in refused.stderr


def test_user_profile_files_and_measured_bandwidth() -> None:
    from infopt.device_profiles.host import copy_bandwidth

    folder = Path(__file__).parents[2] / "tools" / "validation_profiles"
    for path in sorted(folder.glob("*.toml")):
        assert load_profile(path).kind == "gpu"
    assert copy_bandwidth(size=8 << 20, repeat=2) > 1e8


def test_config_json_alone_plans_without_weights(tmp_path: Path) -> None:
    folder = tmp_path / "llama-70b"
    folder.mkdir()
    (folder / "config.json").write_text((CONFIGS / "llama-2-70b.json").read_text())
    assert load_spec(folder).num_params == load_spec(CONFIGS / "llama-2-70b.json").num_params


def test_the_planner_accounts_for_a_self_drafts_memory() -> None:
    spec = load_spec(CONFIGS / "smollm2-135m.json")
    profile = load_profile("intel-cpu")
    alone = plan(spec, profile, context=2048)
    assert alone.speculative == {"kind": "none"}
    with_self = plan(spec, profile, context=2048, speculative="self")
    s = with_self.speculative
    assert s["kind"] == "self" and s["weights"]["attention"] == "int4-g32"
    draft = Compression("d", s["weights"], kv_dtype=with_self.compression["kv_dtype"])
    expected = sum(weight_bytes(spec, draft).values()) + kv_cache_bytes(
        spec, 2048, 1, draft.kv_dtype
    )
    assert s["bytes"] == pytest.approx(expected)
    assert with_self.predicted["total"] == pytest.approx(alone.predicted["total"] + expected)
    # a device where the target fits but not beside its draft: auto falls back to prompt
    # lookup, an explicit self-draft takes a smaller target
    tight = replace(
        profile, usable_bytes=(alone.predicted["total"] + expected / 2) / (1 - HEADROOM)
    )
    auto = plan(spec, tight, context=2048, speculative="auto")
    assert auto.speculative["kind"] == "ngram" and "does not fit" in auto.speculative["reason"]
    assert auto.compression == alone.compression
    forced = plan(spec, tight, context=2048, speculative="self")
    assert forced.compression["name"] != alone.compression["name"]
    assert forced.predicted["total"] <= tight.usable_bytes * (1 - HEADROOM)
    assert any("self-draft" in r["reason"] for r in forced.rejected)
    with pytest.raises(InvalidArgumentError, match="speculative"):
        plan(spec, profile, speculative="fast")


@pytest.mark.parametrize(
    ("quantize", "blocks", "heads", "method"),
    [
        ("int8", "int8", "int8", "rtn"),
        ("int4", "int4-g32", "int8", "rtn"),
        ("int4-gptq", "int4-g32", "int8", "gptq"),
        ("fp16", "fp16", "fp16", "rtn"),
        ("int4s-g64", "int4s-g64", "int8", "rtn"),
        ("int8-g32", "int8-g32", "int8-g32", "rtn"),
    ],
)
def test_quantize_takes_the_storage_asked_for_and_says_so(
    quantize: str, blocks: str, heads: str, method: str
) -> None:
    spec = load_spec(CONFIGS / "smollm2-135m.json")
    p = plan(spec, load_profile("intel-cpu"), context=2048, quantize=quantize)
    w = p.compression["weights"]
    assert (w["attention"], w["mlp"]) == (blocks, blocks)
    assert (w["embeddings"], w["lm_head"]) == (heads, heads)
    assert p.method == method and f"asked for (--quantize {quantize})" in p.reasons[0]
    assert p.predicted["weights"] == pytest.approx(
        sum(weight_bytes(spec, Compression("x", w, kv_dtype="fp16")).values())
    )


def test_quantize_int4_keeps_a_files_int4_blocks_and_refuses_what_does_not_fit() -> None:
    spec = load_spec(CONFIGS / "smollm2-135m.json")
    profile = load_profile("intel-cpu")
    q4_1 = {"embeddings": "int8-g32", "lm_head": "int8-g32", "attention": "int4m-g32"}
    q4_1["mlp"] = "int4m-g32"
    kept = plan(spec, profile, context=2048, quantize="int4", file_weights=q4_1)
    assert kept.compression["weights"] == q4_1 and "as stored in the file" in kept.reasons[0]
    # what the plan without --quantize chooses for the same file: the same plan, its KV cache too
    unasked = plan(spec, profile, context=2048, file_weights=q4_1)
    assert unasked.compression == kept.compression
    assert unasked.predicted["total"] == kept.predicted["total"]
    # GPTQ rounds from floats again: the file's blocks are not its input
    again = plan(spec, profile, context=2048, quantize="int4-gptq", file_weights=q4_1)
    assert again.compression["weights"]["attention"] == "int4-g32" and again.method == "gptq"
    with pytest.raises(InvalidArgumentError, match="'int3'"):
        plan(spec, profile, quantize="int3")
    with pytest.raises(PlanError, match="does not fit"):
        plan(load_spec(CONFIGS / "llama-2-70b.json"), profile, context=4096, quantize="fp16")


def test_cli_plan_quantize() -> None:
    runner = CliRunner()
    model = str(CONFIGS / "smollm2-135m.json")
    args = ["plan", "-m", model, "-d", "intel-cpu", "--context", "2048"]
    ok = runner.invoke(main, [*args, "--quantize", "int8", "--json"])
    assert ok.exit_code == 0, ok.stderr
    assert set(json.loads(ok.stdout)["compression"]["weights"].values()) == {"int8"}
    bad = runner.invoke(main, [*args, "--quantize", "int3"])
    assert bad.exit_code == 1 and "InvalidArgumentError" in bad.stderr and "'int3'" in bad.stderr


def test_a_runtimes_own_decode_efficiency_drives_its_cpu_prediction() -> None:
    from infopt.plan.costs import decode_efficiency, estimate, storage_class
    from infopt.runtimes.registry import targets

    spec = load_spec(CONFIGS / "smollm2-135m.json")
    cpu, gpu = load_profile("intel-cpu"), load_profile("a100-80gb")
    int4 = Compression("int4", {"embeddings": "int8", "lm_head": "int8"} | W4)
    q4_1 = Compression("q4_1", {"embeddings": "int8-g32", "lm_head": "int8-g32"} | Q41)
    assert (storage_class(int4), storage_class(q4_1)) == ("int4", "int4m")
    ort, ov = targets()["onnxruntime"], targets()["openvino"]
    assert decode_efficiency("onnxruntime", cpu, int4) == ort.cpu_decode_efficiency["int4"]
    assert decode_efficiency("onnxruntime", cpu, q4_1) == ort.cpu_decode_efficiency["int4m"]
    assert decode_efficiency("openvino", cpu, q4_1) == ov.cpu_decode_efficiency["int4"]
    assert decode_efficiency("onnxruntime", gpu, int4) == gpu.decode_efficiency  # not measured
    assert decode_efficiency("tensorrt", cpu, int4) == cpu.decode_efficiency
    # memory-bound decode scales with the efficiency, runtime for runtime
    a, b = (estimate(spec, cpu, int4, context=1024, runtime=r) for r in ("onnxruntime", "pytorch"))
    assert a.bound == b.bound == "memory"
    ratio = ort.cpu_decode_efficiency["int4"] / targets()["pytorch"].cpu_decode_efficiency["int4"]
    assert a.decode_tok_s / b.decode_tok_s == pytest.approx(ratio)


W4 = {"attention": "int4-g32", "mlp": "int4-g32"}
Q41 = {"attention": "int4m-g32", "mlp": "int4m-g32"}


def test_a_runtime_prices_the_groups_it_holds_as_float32() -> None:
    # the PyTorch runtime has no kernel for group-wise INT8 (a GGUF's Q8_0) and dequantizes it
    # once at load: four bytes a weight, where ONNX Runtime keeps the blocks
    spec = load_spec(CONFIGS / "smollm2-135m.json")  # tied: the table is the LM head
    host = load_profile("host")
    c = Compression("file", {"embeddings": "int8-g32", "lm_head": "int8-g32", **Q41}, "fp32")
    on_pytorch = estimate(spec, host, c, context=1024, runtime="pytorch")
    on_ort = estimate(spec, host, c, context=1024, runtime="onnxruntime")
    table = spec.vocab_size * spec.hidden_size
    extra = 4 * table - scheme_bytes("int8-g32", spec.vocab_size, spec.hidden_size)
    assert on_pytorch.weights - on_ort.weights == pytest.approx(extra)
    on_gpu = estimate(spec, load_profile("a100-80gb"), c, context=1024, runtime="pytorch")
    assert on_gpu.weights == on_ort.weights  # on CUDA it keeps the codes


def test_with_no_quantize_a_files_own_blocks_come_before_any_float() -> None:
    """A Q4_1 GGUF on a CPU: fp32 would hold the same values in more bytes, so the plan keeps the
    file's blocks (with a float32 cache) and says why; a device that cannot store them, or a
    bundle carrying a runtime that rounds them again, searches as before."""
    spec = load_spec(CONFIGS / "smollm2-135m.json")
    q4_1 = {"embeddings": "int8-g32", "lm_head": "int8-g32", "attention": "int4m-g32"}
    q4_1["mlp"] = "int4m-g32"
    kept = plan(spec, load_profile("intel-cpu"), context=2048, file_weights=q4_1)
    assert kept.compression["weights"] == q4_1 and not kept.rejected
    assert kept.compression["kv_dtype"] == "fp32"
    assert "the file's own precision" in kept.reasons[0]
    assert any("kept as they are: nothing is rounded again" in r for r in kept.reasons)
    short = kept.predicted["decode_tok_s_short"]
    assert kept.predicted["short_history"] == 256 and short > kept.predicted["decode_tok_s"]
    floats = plan(spec, load_profile("intel-cpu"), context=2048)
    assert floats.compression["weights"]["attention"] == "fp32"
    assert kept.predicted["weights"] < floats.predicted["weights"] / 4
    # a bundle that will carry a runtime rounding INT4 to symmetric (LiteRT): floats first
    mobile = plan(spec, load_profile("host"), context=2048, file_weights=q4_1, runtimes=["tflite"])
    assert mobile.compression["weights"]["attention"] == "fp32"
    no_int4 = replace(load_profile("intel-cpu"), weight_precisions=("fp32", "fp16", "int8"))
    searched = plan(spec, no_int4, context=2048, file_weights=q4_1)
    assert searched.compression["weights"]["attention"] == "fp32"
    unquantized = dict.fromkeys(q4_1, "fp32")  # an F32 GGUF: nothing of its own to keep
    assert plan(spec, no_int4, context=2048, file_weights=unquantized).compression == (
        searched.compression
    )
    # a self-draft of a file that is INT4 already would be the model: refused, where going
    # on would plan a float copy several times larger only to draft for it
    with pytest.raises(InvalidArgumentError, match=r"stores INT4 already \(int4m-g32 blocks"):
        plan(spec, load_profile("host"), context=2048, file_weights=q4_1, speculative="self")
    auto = plan(spec, load_profile("host"), context=2048, file_weights=q4_1, speculative="auto")
    assert auto.compression["weights"] == q4_1 and auto.speculative["kind"] == "ngram"
    asked = plan(
        spec,
        load_profile("host"),
        context=2048,
        file_weights=q4_1,
        speculative="self",
        quantize="fp16",
    )
    assert asked.compression["weights"]["attention"] == "fp16"
    assert asked.speculative["kind"] == "self"
    # asked to round the file's blocks to another scheme: the build says what that costs
    from infopt.bundle.build import rounded_again

    int8 = plan(spec, load_profile("host"), context=2048, file_weights=q4_1, quantize="int8")
    note = rounded_again(spec, q4_1, int8, "int8")
    assert note is not None and "rounds their values a second time, in" in note
    assert note.endswith("(leave out --quantize to keep them)")
    # a Q8_0 file asked for int4: no advice to give int4; on a GPU, leaving --quantize out
    # would not keep the blocks either
    q8 = dict.fromkeys(q4_1, "int8-g32")
    int4 = plan(spec, load_profile("host"), context=2048, file_weights=q8, quantize="int4")
    q8_note = rounded_again(spec, q8, int4, "int4")
    assert q8_note is not None and "leave out --quantize" in q8_note and "give int4" not in q8_note
    gpu = plan(spec, load_profile("rtx4090-24gb"), context=2048, file_weights=q4_1, quantize="int8")
    gpu_note = rounded_again(spec, q4_1, gpu, "int8")
    assert gpu_note is not None and "leave out" not in gpu_note
    assert rounded_again(spec, q4_1, kept) is None and rounded_again(spec, q4_1, asked) is None


def test_a_context_of_zero_is_refused_not_taken_for_the_default(tmp_path: Path) -> None:
    spec = load_spec(CONFIGS / "smollm2-135m.json")
    with pytest.raises(InvalidArgumentError, match="context=0"):
        plan(spec, load_profile("intel-cpu"), context=0)
    runner = CliRunner()
    model = str(CONFIGS / "smollm2-135m.json")
    bad = runner.invoke(main, ["plan", "-m", model, "-d", "intel-cpu", "--context", "0"])
    # refused as a usage error naming the option, before any planning
    assert (
        bad.exit_code == 2 and "--context" in bad.stderr and "0 is not in the range" in bad.stderr
    )


def test_plan_takes_the_model_as_an_argument_like_every_command() -> None:
    model = str(CONFIGS / "smollm2-135m.json")
    runner = CliRunner()
    named = runner.invoke(main, ["plan", "-m", model, "-d", "intel-cpu", "--json"])
    given = runner.invoke(main, ["plan", model, "-d", "intel-cpu", "--json"])
    assert named.exit_code == given.exit_code == 0, given.output
    assert json.loads(given.stdout) == json.loads(named.stdout)
    both = runner.invoke(main, ["plan", model, "-m", "other.gguf", "-d", "intel-cpu"])
    assert both.exit_code == 2 and "give one" in both.stderr


def test_a_replanned_build_keeps_the_name_of_the_files_own_blocks() -> None:
    """`build --runtime` other than the plan's, `build --plan`: the recorded plan still says the
    blocks are the file's own (`replan` given the file's schemes), and a short cache's figures
    never claim a start further in than the main figure."""
    spec = load_spec(CONFIGS / "smollm2-135m.json")
    profile = load_profile("intel-cpu")
    q4_1 = {"embeddings": "int8-g32", "lm_head": "int8-g32", "attention": "int4m-g32"}
    q4_1["mlp"] = "int4m-g32"
    kept = plan(spec, profile, context=2048, file_weights=q4_1)
    again = replan(kept, spec, profile, "onnxruntime", file_weights=q4_1)
    assert again.compression["name"] == "int4m-g32 as stored in the file"
    assert any("the model file's own blocks" in r for r in again.reasons)
    assert not replan(kept, spec, profile, "onnxruntime").compression["name"].endswith("file")
    short = plan(spec, profile, context=128, file_weights=q4_1).predicted
    assert short["short_history"] == 64 and short["decode_tok_s_short"] == short["decode_tok_s"]
