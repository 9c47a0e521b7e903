"""Bundles of the default model: built for three devices, loaded, generating; and the host bundle
(ONNX Runtime or OpenVINO) run in a fresh virtual environment holding only infopt and the package
its manifest asks for: no torch, no transformers."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

import infopt
from infopt.bundle import verify_bundle
from infopt.bundle.build import build
from infopt.runtimes.coreml.check import check_package
from tests.integration.conftest import QUESTION, fresh_env_generate


@pytest.fixture(scope="module")
def bundles(module_dir: Path, gguf_path: Path) -> dict[str, Path]:
    root = module_dir
    out = {}
    for device in ("host", "apple-ane", "rtx4090-24gb"):
        out[device] = root / device
        build(gguf_path, out[device], device=device)
    return out


def test_default_model_bundles_plan_load_and_answer(
    bundles: dict[str, Path], smol: infopt.Model
) -> None:
    expected = smol.generate(QUESTION, max_new_tokens=24)
    plans = {}
    for device, path in bundles.items():
        m = verify_bundle(path)
        plans[device] = (m["plan"]["compression"]["name"], m["runtime"]["name"])
        if m["runtime"]["name"] == "coreml" and sys.platform != "darwin":
            with pytest.raises(infopt.UnsupportedPlatformError, match="macOS"):
                infopt.load(path)
            continue  # Core ML predicts only on macOS: its package is checked below
        runtime = None if m["runtime"]["artifact_built"] else "pytorch"
        # the host bundle keeps the file's blocks: with float32 activations they compute what
        # the reference computes, where the fast kernels' int8 activations may part from it
        numerics = "exact" if device == "host" else "fast"
        model = infopt.load(path, runtime=runtime, max_context=256, threads=2, numerics=numerics)
        answer = model.generate(QUESTION, max_new_tokens=24)
        assert "Paris" in answer.text, (device, answer.text)
        if device == "host":  # the file's own values, like the reference: the very same tokens
            assert answer.token_ids == expected.token_ids
    assert plans["host"] == ("int4m-g32 as stored in the file", "onnxruntime")
    assert plans["apple-ane"] == ("fp16", "coreml")
    assert plans["rtx4090-24gb"][1] == "pytorch"
    ane = verify_bundle(bundles["apple-ane"])
    assert ane["plan"]["static_shapes"] and ane["kv_cache"]["dtype"] == "fp16"
    # the .mlpackage read back: what the manifest says, one attention per layer, fp16 weights
    package = check_package(bundles["apple-ane"], ane["artifacts"]["coreml"])
    assert package["attention_ops"] == 30 and package["quantized_weights"] == {}
    assert (
        ane["model"]["source"]["sha256"]
        == verify_bundle(bundles["host"])["model"]["source"]["sha256"]
    )


def test_the_host_bundle_runs_in_a_fresh_env_without_torch(
    bundles: dict[str, Path], tmp_path: Path
) -> None:
    from importlib.metadata import version

    manifest = verify_bundle(bundles["host"])
    requires = manifest["runtime"]["requires"]
    assert requires["package"] in ("onnxruntime", "openvino")
    pin = f"{requires['package']}=={version(requires['package'])}"  # within the manifest's range
    result = fresh_env_generate(tmp_path, bundles["host"], [pin], ["torch", "transformers"])
    here = infopt.load(bundles["host"], max_context=256, threads=2)
    assert result["ids"] == here.generate(QUESTION, max_new_tokens=24).token_ids
