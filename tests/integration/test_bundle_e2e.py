"""Bundles of the default model: built for two devices, loaded, generating; the plan for a third
(the Apple Neural Engine); and the host bundle (ONNX Runtime or OpenVINO) run in a fresh virtual
environment holding only infopt and the package its manifest asks for: no torch, no
transformers."""

from __future__ import annotations

from pathlib import Path

import pytest

import infopt
from infopt.bundle import verify_bundle
from infopt.bundle.build import build, make_plan
from infopt.importers import open_model
from tests.integration.conftest import QUESTION, fresh_env_generate


@pytest.fixture(scope="module")
def bundles(module_dir: Path, gguf_path: Path) -> dict[str, Path]:
    root = module_dir
    out = {}
    for device in ("host", "rtx4090-24gb"):
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
    assert plans["rtx4090-24gb"][1] == "pytorch"


def test_default_model_plan_for_the_neural_engine(gguf_path: Path) -> None:
    # Converting all 30 layers to Core ML is a long single-threaded trace, and this machine cannot
    # run the package: what a Neural Engine bundle holds is checked on the tiny model
    # (tests/unit/test_coreml.py), the graph it is converted from on this model's core
    # (test_mobile_real.py). Here: what the planner picks for it.
    plan = make_plan(open_model(gguf_path), "apple-ane", None, 1, None)
    assert (plan.compression["name"], plan.runtime) == ("fp16", "coreml")
    assert plan.static_shapes and plan.compression["kv_dtype"] == "fp16"


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
