"""The Core ML artifact, checked as far as Linux allows: the package's inputs, outputs and states
are what the manifest tells an app; its MIL program holds the ops and weight dtypes the plan says,
with infopt's own INT4 codes and scales; the torch graph it is converted from computes the model
core's logits exactly, and the runtime's padding, masks and rewinds (run over that torch graph in
place of Core ML's prediction, which needs macOS) give the PyTorch runtime's logits. Loading for
generation off macOS is a typed error naming macOS."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import infopt
from infopt.bundle import verify_bundle
from infopt.bundle.build import build
from infopt.cli import main
from infopt.compress.quantize import quantize_model
from infopt.errors import BundleError, InvalidArgumentError, UnsupportedPlatformError
from infopt.runtimes.coreml import export as ce
from infopt.runtimes.coreml.check import check_package, read_package
from infopt.runtimes.coreml.runtime import CoreMLRuntime, _caller_window
from infopt.runtimes.pytorch.runtime import PyTorchRuntime
from tests.conftest import ARCH_CONFIGS
from tests.unit.test_export_runtimes import core_of, folders, run_script  # noqa: F401

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")


class TracedProgram:
    """The torch graph coremltools converts, answering Core ML's `make_state` / `predict`: a
    stand-in for the prediction only macOS can run, so the runtime's own logic runs here."""

    def __init__(self, core: Any, max_context: int) -> None:
        self.step = ce.stateful_step(core, max_context, torch.float32)
        self.graph = ce.trace(self.step)

    def make_state(self) -> object:
        for name in ("k_cache", "v_cache"):
            getattr(self.graph, name).zero_()
        return object()

    def predict(self, inputs: dict[str, np.ndarray], state: object) -> dict[str, np.ndarray]:
        with torch.no_grad():
            logits = self.graph(
                torch.from_numpy(inputs["input_ids"]),
                torch.from_numpy(inputs["causal_mask"].astype(np.float32)),
                torch.from_numpy(inputs["input_pos"]),
            )
        return {"logits": logits.numpy()}


@pytest.mark.parametrize("arch", ["llama-tied", "mistral-window", *ARCH_CONFIGS])
def test_the_converted_graph_and_the_runtime_logic_match_the_core(
    folders: dict[str, Path],  # noqa: F811
    arch: str,
) -> None:
    core = core_of(folders[arch])
    program = TracedProgram(core, 64)
    caller_window = _caller_window(core.spec.to_dict())  # None where layers differ
    io = {**ce.coreml_io(core, 64), "sliding_window": caller_window}
    rt = CoreMLRuntime(program, 64, core.spec.vocab_size, io)
    assert rt.verify_window == 8
    expected = run_script(PyTorchRuntime(core, 64))
    got = run_script(rt)  # windows 1, 8 (padded) and 64 (padded), a rewind, only_last
    for a, b in zip(expected, got, strict=True):
        assert a.shape == b.shape
        np.testing.assert_allclose(b, a, atol=1e-5)
    # one window straight through the graph: the same float32 arithmetic as the core, bit for bit
    core.setup_cache(ce.cache_len(64))
    ids = torch.tensor([[5, 17, 42, 99, 3, 250, 77, 8]])
    with torch.no_grad():
        reference = core(ids, torch.arange(8), ce.cache_len(64))
    program.make_state()
    got_window = program.predict(
        {
            "input_ids": ids.int().numpy(),
            "causal_mask": ce.causal_mask(0, 8, ce.cache_len(64), caller_window),
            "input_pos": np.array([0], np.int32),
        },
        state=None,
    )["logits"]
    np.testing.assert_array_equal(got_window, reference.numpy())


def test_generate_streams_stops_and_speculates_through_the_windows(tiny_gguf: Path) -> None:
    # the shared generate loop over the Core ML runtime's logic (on the converted torch graph):
    # the PyTorch runtime's greedy tokens, streamed, and speculation verified in 8-token windows
    from infopt.decode.drafters import ModelDrafter

    reference = infopt.load(tiny_gguf, runtime="pytorch", max_context=64)
    core = reference.runtime.model
    io = {**ce.coreml_io(core, 64), "sliding_window": core.spec.sliding_window}
    rt = CoreMLRuntime(TracedProgram(core, 64), 64, core.spec.vocab_size, io)
    model = infopt.Model(rt, reference.tokenizer, reference.spec)
    prompt = [{"role": "user", "content": "hello there"}]
    plain = reference.generate(prompt, max_new_tokens=30, stop_token_ids=[], speculative=False)
    got = model.generate(prompt, max_new_tokens=30, stop_token_ids=[])
    assert got.token_ids == plain.token_ids
    assert "".join(model.stream(prompt, max_new_tokens=30, stop_token_ids=[])) == got.text
    passes: list[int] = []
    forward = rt.forward

    def spy(tokens: Any, only_last: bool = False) -> np.ndarray:
        passes.append(len(tokens))
        return forward(tokens, only_last)

    rt.forward = spy  # type: ignore[method-assign]
    twin = infopt.load(tiny_gguf, runtime="pytorch", max_context=64)
    model.drafter = ModelDrafter(twin.runtime)  # a perfect draft: long drafts, capped at 7
    spec = model.generate(prompt, max_new_tokens=30, stop_token_ids=[], num_draft_tokens=16)
    assert spec.token_ids == plain.token_ids and spec.stats.speculative is not None
    assert max(passes[1:]) == rt.verify_window == 8
    stop = plain.text[len(plain.text) // 2 :][:3]  # a stop string: cut from the text
    stopped = model.generate(prompt, max_new_tokens=30, stop_token_ids=[], stop=[stop])
    assert stopped.finish_reason == "stop" and stopped.text == plain.text[: plain.text.index(stop)]


def test_quantized_weights_are_infopts_codes_and_scales(
    folders: dict[str, Path],  # noqa: F811
    tmp_path: Path,
) -> None:
    core = core_of(folders["llama"])
    quantize_model(
        core, {"attention": "int4s-g32", "mlp": "int8", "embeddings": "int8", "lm_head": "int8"}
    )
    files = ce.export_coreml(core, tmp_path / ce.FILE, 64)
    assert files == [f"{ce.FILE}/{f}" for f in ce.PACKAGE_FILES]
    found = read_package(tmp_path / ce.FILE)
    layer = core.blocks[1]
    for name, module in (
        ("self_attn.q_proj", layer.self_attn.q_proj),
        ("mlp.up_proj", layer.mlp.up_proj),
    ):
        w = found["weights"][f"core_layers_1_{name.replace('.', '_')}_weight_to_fp16"]
        qw = module.quantized()
        assert w["dtype"] == ("int4" if qw.scheme.bits == 4 else "int8") and not w["offset"]
        assert w["block"] == (qw.scheme.group_size or qw.shape[1])
        rows, cols = qw.shape
        deq = (
            w["codes"].astype(np.float32).reshape(rows, -1, w["block"])
            * w["scales"].astype(np.float32)[..., None]
        )
        if qw.scheme.bits == 4:  # fp16-exact codes x bf16-precision scales: carried over exactly
            np.testing.assert_array_equal(deq.reshape(rows, cols), qw.dequantize().numpy())
        else:  # codes identical; Core ML's fp16 scale of the fp16-rounded weights: one rounding
            np.testing.assert_array_equal(w["codes"], qw.qweight.numpy())
            np.testing.assert_allclose(deq.reshape(rows, cols), qw.dequantize().numpy(), rtol=1e-3)
    kinds = {w["dtype"] for w in found["weights"].values()}
    assert kinds == {"int4", "int8"}
    assert len(found["weights"]) == 7 * core.spec.num_layers + 2  # blocks, embedding, LM head


def test_int4_with_zero_points_is_refused(folders: dict[str, Path], tmp_path: Path) -> None:  # noqa: F811
    core = core_of(folders["llama"])
    quantize_model(core, {"attention": "int4-g32", "mlp": "int4-g32"})
    with pytest.raises(InvalidArgumentError, match=r"int4-g32.*int4s-g32"):
        ce.export_coreml(core, tmp_path / ce.FILE, 64)
    assert not (tmp_path / ce.FILE).exists()


def test_apple_ane_bundle_is_what_an_app_needs(tiny_gguf: Path, tmp_path: Path) -> None:
    out = tmp_path / "ane"
    # as a user runs it: the JSON summary alone on stdout, no converter chatter on stderr
    cmd = [sys.executable, "-m", "infopt.cli", "build", str(tiny_gguf), "-d", "apple-ane"]
    done = subprocess.run(
        [*cmd, "--context", "64", "-o", str(out), "--json"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert "Failed to load" not in done.stderr and "coremltools" not in done.stderr, done.stderr
    manifest = verify_bundle(out)
    assert summary["artifacts"] == ["coreml"] and manifest["runtime"]["artifact_built"]
    art = manifest["artifacts"]["coreml"]
    found = read_package(out / art["package"])
    assert found["states"] == {
        name: {"shape": shape, "dtype": "FLOAT16"} for name, shape in art["states"].items()
    }
    assert set(found["inputs"]) == set(art["inputs"]) and found["outputs"] == ["logits"]
    length = art["states"]["k_cache"][2]
    assert found["inputs"]["input_ids"]["shapes"] == [[1, w] for w in art["windows"]]
    assert found["inputs"]["causal_mask"]["shapes"] == [[1, 1, w, length] for w in art["windows"]]
    for op in ("read_state", "coreml_update_state", "slice_update", "scaled_dot_product_attention"):
        assert found["ops"].get(op), op
    assert set(manifest["plan"]["compression"]["weights"].values()) == {"fp16"}
    assert not found["weights"]  # an fp16 plan: fp16 constants, nothing quantized
    assert check_package(out, art)["windows"] == [1, 8, 64]
    # a manifest that tells an app other shapes than the package has: refused, naming them
    edits = {"windows": [1, 16, 64], "states": {**art["states"], "v_cache": [1, 1, 1, 1]}}
    for key, named in (("windows", "input_ids shapes"), ("states", "states")):
        with pytest.raises(BundleError, match=named):
            check_package(out, {**art, key: edits[key]})
    # the CLI: verify reads the package back, inspect tells the windows and states
    verified = CliRunner().invoke(main, ["verify", str(out)])
    assert verified.exit_code == 0, verified.output
    assert "windows [1, 8, 64], outputs and states ['k_cache', 'v_cache'] match" in verified.output
    shown = CliRunner().invoke(main, ["inspect", str(out)]).output
    assert "coreml windows" in shown and f"k_cache {art['states']['k_cache']}, v_cache" in shown
    if sys.platform != "darwin":
        with pytest.raises(UnsupportedPlatformError, match="macOS"):
            infopt.load(out)


def test_an_int4_plan_is_built_symmetric_for_core_ml(tiny_gguf: Path, tmp_path: Path) -> None:
    from infopt.bundle.build import make_plan
    from infopt.importers import open_model

    plan = json.loads(make_plan(open_model(tiny_gguf), "host", 64, 1, None).to_json())
    groups = {"embeddings": "int8", "lm_head": "int8", "attention": "int4-g32", "mlp": "int4-g32"}
    plan["compression"]["weights"] = groups
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    build(tiny_gguf, tmp_path / "b", plan_file=tmp_path / "plan.json", runtime="coreml")
    manifest = verify_bundle(tmp_path / "b")
    weights = manifest["plan"]["compression"]["weights"]
    assert weights == {**groups, "attention": "int4s-g32", "mlp": "int4s-g32"}
    assert any("attention, mlp quantized as int4s-g32" in r for r in manifest["plan"]["reasons"])
    package = check_package(tmp_path / "b", manifest["artifacts"]["coreml"])
    layers = manifest["model"]["config"]["num_layers"]
    assert package["quantized_weights"] == {"int4": 7 * layers, "int8": 2}
