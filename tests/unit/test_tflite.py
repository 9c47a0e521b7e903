"""The LiteRT (TFLite) artifact on tiny models: the converted signatures compute what the model core
computes (fp32 to rounding, through every window: decode, verify, prefill, rewind), quantized
weights land in the .tflite file as the very codes and scales infopt chose, and what LiteRT cannot
hold is refused by name. Each conversion costs ~25 s, so the cases are few and combined."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from infopt.compress.quantize import quantize_model
from infopt.core.quant import QuantLinear, float_copy
from infopt.errors import BundleError, InvalidArgumentError
from infopt.runtimes.pytorch.runtime import PyTorchRuntime
from infopt.runtimes.tflite import runtime as tfl_rt
from infopt.runtimes.tflite.export import PREFILL, VERIFY, check_schemes, export_tflite
from tests.conftest import ARCH_CONFIGS
from tests.unit.test_export_runtimes import core_of, folders, run_script  # noqa: F401

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")


def script_with_windows(rt: Any) -> list[np.ndarray]:
    """run_script plus a prefill longer than one prefill window and all-logits over many verify
    windows: every signature and the padding of each."""
    out = run_script(rt)
    rt.reset()
    ids = [int(i) for i in np.arange(3, 3 + PREFILL + 9) % 380]
    out.append(rt.forward(ids, only_last=True))
    rt.reset()
    out.append(rt.forward(ids[: 2 * VERIFY + 3]))
    return out


# ~20 s a conversion: the cases are the graphs that differ. Sliding windows and QK-norm are Gemma
# 3's and Phi-3's too (Mistral's window and Qwen 3's norm convert to the same operators).
ARCHS = ["qwen2-bias", "llama3-rope-mqa", *(a for a in ARCH_CONFIGS if a != "qwen3")]


def convert(folder: Path, path: Path) -> Path:
    export_tflite(core_of(folder), path, max_context=96)
    return path


@pytest.fixture(scope="module")
def converted(
    folders: dict[str, Path],  # noqa: F811
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, Path]:
    """Each of ARCHS's fp32 conversions, two at a time in processes of their own: a conversion
    is a single-threaded trace, so two fill the two cores."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        folder = tmp_path_factory.mktemp("tflite-archs")
        jobs = {a: pool.submit(convert, folders[a], folder / f"{a}.tflite") for a in ARCHS}
        return {arch: job.result() for arch, job in jobs.items()}


@pytest.mark.parametrize("arch", ARCHS)
def test_fp32_signatures_match_the_model_core(
    folders: dict[str, Path],  # noqa: F811
    converted: dict[str, Path],
    arch: str,
) -> None:
    core = core_of(folders[arch])
    expected = script_with_windows(PyTorchRuntime(core, 96))
    interpreter = tfl_rt.load_interpreter(converted[arch], threads=2, in_memory=True)
    got = script_with_windows(tfl_rt.TFLiteRuntime(interpreter, 96, core.spec.vocab_size))
    for a, b in zip(expected, got, strict=True):
        assert a.shape == b.shape
        np.testing.assert_allclose(b, a, atol=2e-5)


def tflite_weights(rt: tfl_rt.TFLiteRuntime) -> dict[str, np.ndarray]:
    """Every quantized fully-connected weight in the model, dequantized from the file's own
    integer codes and scales, by litert-torch's op name."""
    interp = rt.interpreter
    details = {d["index"]: d for d in interp.get_tensor_details()}
    weights = {}
    for op in interp._get_ops_details():
        if op["op_name"] != "FULLY_CONNECTED":
            continue
        w = details[op["inputs"][1]]
        scales = w["quantization_parameters"]["scales"]
        if not len(scales):
            continue
        codes = interp.get_tensor(w["index"]).astype(np.float32)
        rows, cols = codes.shape
        blocks = scales.size // rows
        grouped = codes.reshape(rows, blocks, cols // blocks) * scales.reshape(rows, blocks, 1)
        weights[w["name"]] = grouped.reshape(rows, cols)
    return weights


def test_quantized_weights_are_the_codes_and_scales_infopt_chose(
    folders: dict[str, Path],  # noqa: F811
) -> None:
    core = core_of(folders["llama-tied"])
    schemes = {"attention": "int4s-g32", "mlp": "int8", "embeddings": "int8", "lm_head": "int8"}
    quantize_model(core, schemes)
    rt = tfl_rt.from_model(core, max_context=64, threads=2)
    found = tflite_weights(rt)
    blocks = core.blocks
    expected = {  # first layer's (subgraph 0 names carry no layer suffix beyond ';1')
        "Linear_q_proj;1": blocks[0].self_attn.q_proj,
        "Linear_o_proj;1": blocks[0].self_attn.o_proj,
        "Linear_down_proj;1": blocks[0].mlp.down_proj,
    }
    for suffix, module in expected.items():
        assert isinstance(module, QuantLinear)
        [name] = [n for n in found if n.endswith(suffix)]
        np.testing.assert_array_equal(found[name], module.quantized().dequantize().numpy())
    [head] = [w for n, w in found.items() if w.shape[0] == core.spec.vocab_size]
    np.testing.assert_array_equal(head, core.lm_head.quantized().dequantize().numpy())
    # activations are quantized per call (XNNPACK's dynamic-range kernels): close, same argmax
    expected_logits = np.concatenate(run_script(PyTorchRuntime(core, 64)))
    got = np.concatenate(run_script(rt))
    assert np.abs(got - expected_logits).max() < 0.03 * np.abs(expected_logits).max()
    assert (got.argmax(-1) == expected_logits.argmax(-1)).mean() >= 0.9


def test_what_litert_cannot_hold_is_refused_by_name(folders: dict[str, Path]) -> None:  # noqa: F811
    core = core_of(folders["llama"])
    quantize_model(core, {"attention": "int4-g32", "mlp": "int8"})
    _, schemes = float_copy(core)
    with pytest.raises(InvalidArgumentError, match=r"int4-g32.*symmetric.*int4s-g32"):
        check_schemes(schemes)
    core = core_of(folders["llama"])
    quantize_model(core, {"attention": "int4s-g16", "mlp": "int8"})
    with pytest.raises(InvalidArgumentError, match="32, 64, 128 or 256"):
        check_schemes(float_copy(core)[1])


def test_a_broken_file_is_a_bundle_error(tmp_path: Path) -> None:
    bad = tmp_path / "model.tflite"
    bad.write_bytes(b"not a flatbuffer")
    with pytest.raises(BundleError, match="LiteRT cannot load"):
        tfl_rt.load_interpreter(bad, threads=1)


def test_a_missing_converter_names_the_extra(
    folders: dict[str, Path],  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    import sys

    from infopt.errors import RuntimeNotAvailableError
    from infopt.runtimes.tflite.export import export_tflite

    monkeypatch.setitem(sys.modules, "litert_torch", None)  # as if not installed
    with pytest.raises(RuntimeNotAvailableError, match=r"infopt\[tflite-convert\]"):
        export_tflite(core_of(folders["llama"]), tmp_path / "m.tflite", 64)
    assert not (tmp_path / "m.tflite").exists()


def test_a_build_missing_its_converter_stops_before_any_work(
    tiny_gguf: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Whether the runtime is asked for (--runtime) or the device's own (apple-ane: Core ML),
    its converter's packages are checked before the model is read or planned."""
    import importlib.util

    from infopt.bundle.build import build
    from infopt.errors import RuntimeNotAvailableError

    real = importlib.util.find_spec
    gone = {"litert_torch", "ai_edge_quantizer", "coremltools"}
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name in gone else real(name, *a)
    )
    seen: list[str] = []
    for device, runtime, message in [
        ("host", "tflite", r"litert_torch, ai_edge_quantizer, which are not installed"),
        ("apple-ane", None, r"coremltools, which is not installed"),
    ]:
        with pytest.raises(RuntimeNotAvailableError, match=message):
            build(
                tiny_gguf,
                tmp_path / "b",
                device=device,
                runtime=runtime,
                progress=lambda stage, *_: seen.append(stage),
            )
    assert seen == [] and not (tmp_path / "b").exists()


def test_a_missing_interpreter_names_the_extra_and_tflite_runtime_stands_in(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import importlib.metadata
    import sys

    from infopt.errors import RuntimeNotAvailableError
    from infopt.runtimes import registry

    tflite = registry.target("tflite")
    for name in ("ai_edge_litert", "ai_edge_litert.interpreter", "tflite_runtime.interpreter"):
        monkeypatch.setitem(sys.modules, name, None)  # neither package importable
    monkeypatch.delitem(sys.modules, "infopt.runtimes.tflite.runtime", raising=False)
    with pytest.raises(RuntimeNotAvailableError, match=r"pip install 'infopt\[tflite\]'"):
        tflite.module("runtime")
    # the manifest asks for ai-edge-litert; the older tflite-runtime, when installed, stands in
    real = importlib.metadata.version

    def version(package: str) -> str:
        if package == "ai-edge-litert":
            raise importlib.metadata.PackageNotFoundError(package)
        return "2.14.0" if package == "tflite-runtime" else real(package)

    monkeypatch.setattr(importlib.metadata, "version", version)
    requires = {"package": "ai-edge-litert", "version": ">=2.3"}
    tflite.check_requirement("b", requires)  # no error: tflite-runtime is there
    monkeypatch.setattr(registry, "_installed", lambda package: False)
    with pytest.raises(RuntimeNotAvailableError, match=r"infopt\[tflite\]"):
        tflite.check_requirement("b", requires)


def test_inspect_tells_an_app_the_signatures(tiny_tflite_bundle: Path) -> None:
    from click.testing import CliRunner

    from infopt.cli import main

    shown = CliRunner().invoke(main, ["inspect", str(tiny_tflite_bundle)])
    assert shown.exit_code == 0, shown.output
    assert "decode 1, verify 8, prefill 64 tokens" in shown.output
    assert "tflite KV cache" in shown.output and "float32, app-held" in shown.output


def test_the_converters_printing_stays_off_stdout_and_stderr(
    tiny_tflite_build: subprocess.CompletedProcess[str],
) -> None:
    # litert-torch and ai-edge-quantizer print progress bars and C++ logs; --json output is the
    # summary alone, and the converter's chatter is not on stderr either
    summary = json.loads(tiny_tflite_build.stdout)
    assert summary["artifacts"] == ["tflite"]
    for chatter in ("Write Model", "flatbuffer_export", "Applying Transformations"):
        assert chatter not in tiny_tflite_build.stderr
    # nor LiteRT's own log line when the bundle runs
    cmd = [sys.executable, "-m", "infopt.cli", "run", summary["bundle"], "--raw", "--prompt", "hi"]
    run = subprocess.run([*cmd, "-n", "4", "--json"], capture_output=True, text=True, check=True)
    assert json.loads(run.stdout)["finish_reason"] in ("stop", "length")
    assert "XNNPACK" not in run.stderr and "INFO" not in run.stderr, run.stderr
