"""Bundles: build from a plan, load anywhere, refuse every changed byte, write atomically."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

import infopt
from infopt.bundle import MANIFEST, verify_bundle, write_bundle
from infopt.bundle.build import build, make_plan
from infopt.cli import main
from infopt.core.spec import spec_from_hf_config
from infopt.device_profiles import load_profile
from infopt.errors import BundleError, InvalidArgumentError, RuntimeNotAvailableError
from infopt.importers import open_model
from tests.conftest import TINY

PROMPT = [{"role": "user", "content": "hello there"}]
CONFIG = spec_from_hf_config({**TINY, "model_type": "llama"}).to_dict()
MINIMAL = {  # what the manifest schema requires, no more
    "model": {
        "architecture": "llama",
        "config": CONFIG,
        "parameters": 1,
        "source": {"name": "tiny"},
    },
    "runtime": {"name": "x", "artifact_built": False},  # a runtime infopt lacks: no artifact
    "kv_cache": {"max_context": 8, "batch": 1, "dtype": None},
    "tokenizer": {},
    "artifacts": {"x": {"files": ["only.bin"]}},
}


@pytest.fixture(scope="module")
def host_bundle(tmp_path_factory: pytest.TempPathFactory, tiny_gguf: Path) -> Path:
    out = tmp_path_factory.mktemp("bundles") / "host"
    build(tiny_gguf, out, device="host", runtime="pytorch")
    return out


def copy(bundle: Path, tmp_path: Path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(bundle, target)
    return target


def test_a_bundle_generates_what_its_source_generates(host_bundle: Path, tiny_gguf: Path) -> None:
    manifest = verify_bundle(host_bundle)
    assert manifest["runtime"]["name"] == "pytorch" and manifest["plan"]["device"] == "host"
    # the plan recorded is the one built: on the runtime asked for, and says so
    assert manifest["plan"]["runtime"] == "pytorch"
    if load_profile("host").runtimes[0] != "pytorch":
        assert any("asked for (--runtime)" in r for r in manifest["plan"]["reasons"])
    assert {f["path"] for f in manifest["files"]} == {"model.safetensors", "tokenizer.json"}
    modes = {(host_bundle / f["path"]).stat().st_mode & 0o777 for f in manifest["files"]}
    assert modes == {0o644}  # readable by every user of a shared bundle
    assert manifest["model"]["source"]["name"] == "tiny.gguf"
    assert manifest["tokenizer"]["eos_token_ids"] == [2] and manifest["tokenizer"]["chat_template"]
    bundled = infopt.load(host_bundle, max_context=128)
    source = infopt.load(tiny_gguf, max_context=128)
    a = bundled.generate(PROMPT, max_new_tokens=12, stop_token_ids=[])
    b = source.generate(PROMPT, max_new_tokens=12, stop_token_ids=[])
    assert a.token_ids == b.token_ids and a.text == b.text
    assert bundled.runtime.max_context == 128
    assert infopt.load(host_bundle).runtime.max_context == manifest["kv_cache"]["max_context"]


def test_build_from_an_edited_plan_quantizes(tmp_path: Path, tiny_gguf: Path) -> None:
    runner = CliRunner()
    planned = runner.invoke(main, ["plan", "-m", str(tiny_gguf), "-d", "host", "--json"])
    plan = json.loads(planned.stdout)
    plan["compression"]["weights"] = {
        "embeddings": "int8",
        "lm_head": "int8",
        "attention": "int4-g32",
        "mlp": "int4-g32",
    }
    plan["pruning"] = {"kind": "structured-mlp-channels", "sparsity": 0.5}
    plan["runtime"] = "onnxruntime"
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    out = tmp_path / "int4"
    result = runner.invoke(
        main, ["build", str(tiny_gguf), "--plan", str(tmp_path / "plan.json"), "-o", str(out)]
    )
    assert result.exit_code == 0, result.stderr
    m = verify_bundle(out)
    assert (
        m["compression"]["quantization"] == "rtn"
        and m["model"]["config"]["intermediate_size"] == 64
    )
    # the manifest's plan is the one built, re-estimated: not the file's figures
    as_built = m["plan"]
    assert as_built["reasons"][0].startswith("int4-g32") and "as built" in as_built["reasons"][0]
    assert as_built["compression"]["mlp_prune"] == 0.5 and as_built["runtime"] == "onnxruntime"
    assert as_built["predicted"]["weights"] < plan["predicted"]["weights"] / 2
    assert m["model"]["parameters"] < open_model(tiny_gguf).spec.num_params
    assert m["compression"]["quality"]["kind"] == "measured"
    model = infopt.load(out, max_context=64)
    assert model.runtime.name == "onnxruntime"
    r = model.generate(PROMPT, max_new_tokens=5, stop_token_ids=[])
    assert len(r.token_ids) == 5
    shown = runner.invoke(main, ["inspect", str(out)])
    assert shown.exit_code == 0 and "for host" in shown.stdout and "model.onnx.data" in shown.stdout
    assert "MLP channels pruned 50%: as built" in shown.stdout
    assert re.search(r"quality +perplexity [\d.]+ against [\d.]+", shown.stdout)
    ok = runner.invoke(main, ["verify", str(out), "--json"])
    assert ok.exit_code == 0 and json.loads(ok.stdout)["ok"]
    run = runner.invoke(main, ["run", str(out), "--prompt", "hi", "-n", "3", "--json"])
    assert run.exit_code == 0, run.stderr


def test_bad_builds_are_refused_and_write_nothing(tmp_path: Path, tiny_gguf: Path) -> None:
    out = tmp_path / "never"
    with pytest.raises(InvalidArgumentError, match=r"a device to plan for \(--device\) or a plan"):
        build(tiny_gguf, out)
    (tmp_path / "p.json").write_text("{}")
    with pytest.raises(InvalidArgumentError, match="not both"):
        build(tiny_gguf, out, device="host", plan_file=tmp_path / "p.json")
    with pytest.raises(InvalidArgumentError, match="runtime 'tensorrt'"):
        build(tiny_gguf, out, device="host", runtime="tensorrt")
    (tmp_path / "junk.json").write_text('{"device": "host"}')
    with pytest.raises(InvalidArgumentError, match="not a plan"):
        build(tiny_gguf, out, plan_file=tmp_path / "junk.json")
    planned = CliRunner().invoke(main, ["plan", "-m", str(tiny_gguf), "-d", "host", "--json"])
    plan = json.loads(planned.stdout)
    plan["compression"]["weights"]["mlp"] = "int4-g128"  # 64 inputs: g128 cannot divide them
    (tmp_path / "bad-plan.json").write_text(json.dumps(plan))
    with pytest.raises(InvalidArgumentError, match="128"):
        build(tiny_gguf, out, plan_file=tmp_path / "bad-plan.json")
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no partial dirs


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "tamper",
    [
        "flip-weights",
        "flip-tokenizer",
        "truncate",
        "add",
        "delete",
        "rename",
        "symlink",
        "manifest-version",
        "manifest-traversal",
        "manifest-absolute",
        "manifest-garbage",
        "manifest-types",
        "no-manifest",
    ],
)
def test_every_tampering_is_refused(host_bundle: Path, tmp_path: Path, tamper: str) -> None:
    b = copy(host_bundle, tmp_path)
    manifest = json.loads((b / MANIFEST).read_text())
    weights, tok = b / "model.safetensors", b / "tokenizer.json"
    if tamper == "flip-weights":
        _flip(weights)
    elif tamper == "flip-tokenizer":
        _flip(tok)
    elif tamper == "truncate":
        os.truncate(weights, weights.stat().st_size - 1)
    elif tamper == "add":
        (b / "extra.bin").write_bytes(b"x")
    elif tamper == "delete":
        tok.unlink()
    elif tamper == "rename":
        tok.rename(b / "tokenizer2.json")
    elif tamper == "symlink":
        tok.unlink()
        tok.symlink_to(host_bundle / "tokenizer.json")
    elif tamper.startswith("manifest-"):
        if tamper == "manifest-version":
            manifest["version"] = 99
        elif tamper == "manifest-traversal":
            manifest["files"][0]["path"] = "../outside.bin"
        elif tamper == "manifest-absolute":
            manifest["files"][0]["path"] = "/etc/passwd"
        elif tamper == "manifest-types":
            manifest["kv_cache"]["max_context"] = "lots"
        (b / MANIFEST).write_text(json.dumps(manifest) if tamper != "manifest-garbage" else "{")
    elif tamper == "no-manifest":
        (b / MANIFEST).unlink()
        (b / MANIFEST).mkdir()
    with pytest.raises(BundleError):
        verify_bundle(b)
    with pytest.raises(BundleError):
        infopt.load(b)
    code = CliRunner().invoke(main, ["verify", str(b)]).exit_code
    assert code == 1


def test_a_failed_write_leaves_the_previous_bundle(host_bundle: Path, tmp_path: Path) -> None:
    b = copy(host_bundle, tmp_path)
    before = {p.name: p.read_bytes() for p in b.iterdir()}

    def broken(path: Path) -> None:
        path.write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(BundleError, match="disk full.*unchanged"):
        write_bundle(b, MINIMAL, {"a.bin": broken})
    assert {p.name: p.read_bytes() for p in b.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["copy"]  # no partial directory left
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "mine.txt").write_text("keep me")
    with pytest.raises(BundleError, match="not a bundle"):
        write_bundle(tmp_path / "notes", {}, {})
    assert (tmp_path / "notes" / "mine.txt").read_text() == "keep me"


def test_replacing_a_bundle_swaps_it_whole(host_bundle: Path, tmp_path: Path) -> None:
    b = copy(host_bundle, tmp_path)
    write_bundle(b, MINIMAL, {"only.bin": lambda p: p.write_bytes(b"new")})
    assert sorted(p.name for p in b.iterdir()) == [MANIFEST, "only.bin"]
    assert verify_bundle(b)["runtime"]["name"] == "x"
    assert [p.name for p in tmp_path.iterdir()] == ["copy"]


def test_a_bundle_without_the_planned_runtime_artifact(tmp_path: Path, tiny_gguf: Path) -> None:
    # a plan (edited by hand) for a runtime this infopt does not ship: a PyTorch artifact instead
    plan = json.loads(make_plan(open_model(tiny_gguf), "host", 64, 1, None).to_json())
    plan["runtime"] = "tensorrt"
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    out = tmp_path / "trt"
    summary = build(tiny_gguf, out, plan_file=tmp_path / "plan.json")
    m = verify_bundle(out)
    assert m["runtime"]["name"] == "tensorrt" and not m["runtime"]["artifact_built"]
    assert summary["artifacts"] == ["pytorch"]
    with pytest.raises(BundleError, match="no 'tensorrt' artifact"):
        infopt.load(out)
    assert (
        infopt.load(out, runtime="pytorch", max_context=64)
        .generate("hi", max_new_tokens=2, stop_token_ids=[])
        .token_ids
    )


@pytest.mark.parametrize("kind", ["tar", "zip"])
def test_archives_round_trip(host_bundle: Path, tmp_path: Path, kind: str) -> None:
    from infopt.bundle import extract_archive, write_archive

    b = copy(host_bundle, tmp_path)
    packed = write_archive(b, kind)
    assert packed == tmp_path / f"copy.{kind}"
    result = CliRunner().invoke(main, ["unpack", str(packed), "-o", str(tmp_path / "out")])
    assert result.exit_code == 0, result.stderr
    assert verify_bundle(tmp_path / "out")["files"] == verify_bundle(b)["files"]
    assert extract_archive(packed, tmp_path / "out")  # over an existing bundle: replaced


def _tar(path: Path, members: list[tuple[str, str, bytes]]) -> Path:
    """A tar with (name, kind, data) members: kind file | symlink | hardlink | chardev."""
    import io
    import tarfile

    with tarfile.open(path, "w") as tar:
        for name, kind, data in members:
            info = tarfile.TarInfo(name)
            if kind == "file":
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
                continue
            info.type = {
                "symlink": tarfile.SYMTYPE,
                "hardlink": tarfile.LNKTYPE,
                "chardev": tarfile.CHRTYPE,
            }[kind]
            info.linkname = data.decode()
            tar.addfile(info)
    return path


@pytest.mark.parametrize(
    "members",
    [
        [("b/manifest.json", "file", b"{}"), ("b/../../escape.txt", "file", b"x")],
        [("b/manifest.json", "file", b"{}"), ("/tmp/abs-escape.txt", "file", b"x")],
        [("b/manifest.json", "file", b"{}"), ("b/link", "symlink", b"/etc/passwd")],
        [("b/manifest.json", "file", b"{}"), ("b/hard", "hardlink", b"/etc/passwd")],
        [("b/manifest.json", "file", b"{}"), ("b/dev", "chardev", b"")],
        [(f"b/f{i}", "file", b"") for i in range(1001)],
        [("b/manifest.json", "file", b"{}"), ("c/other.bin", "file", b"x")],
    ],
    ids=["dotdot", "absolute", "symlink", "hardlink", "device", "too-many", "two-roots"],
)
def test_malicious_archives_write_nothing(
    tmp_path: Path, members: list[tuple[str, str, bytes]]
) -> None:
    from infopt.bundle import extract_archive

    archive = _tar(tmp_path / "evil.tar", members)
    work = tmp_path / "work"
    work.mkdir()
    before = set(tmp_path.rglob("*"))
    with pytest.raises(BundleError):
        extract_archive(archive, work / "out")
    assert set(tmp_path.rglob("*")) == before  # nothing written, inside or outside
    assert not Path("/tmp/abs-escape.txt").exists()
    assert CliRunner().invoke(main, ["unpack", str(archive), "-o", str(work / "o")]).exit_code == 1


def test_a_zip_with_a_symlink_or_traversal_is_refused(tmp_path: Path) -> None:
    import zipfile

    from infopt.bundle import extract_archive

    for name, mode in (("b/link", 0o120777), ("b/../x", 0o100644)):
        path = tmp_path / "evil.zip"
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr("b/manifest.json", "{}")
            info = zipfile.ZipInfo(name)
            info.external_attr = mode << 16
            zf.writestr(info, "/etc/passwd")
        with pytest.raises(BundleError):
            extract_archive(path, tmp_path / "out")
        assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("edit", "key"),
    [
        (lambda m: m["kv_cache"].update(max_context="4096"), "kv_cache.max_context"),
        (lambda m: m["model"]["config"].pop("vocab_size"), "model.config"),
        (lambda m: m["model"]["config"].update(num_layers=0), "model.config.num_layers"),
        (lambda m: m["tokenizer"].update(eos_token_ids=2), "tokenizer.eos_token_ids"),
        (
            lambda m: m["artifacts"]["pytorch"].update(files="model.safetensors"),
            "artifacts.pytorch.files",
        ),
        (lambda m: m["runtime"].pop("name"), "runtime"),
        (lambda m: m.pop("files"), "(top level)"),
        (lambda m: m.update(draft={"kind": "tree"}), "draft"),
        (lambda m: m["files"][0].update(sha256="abc"), "files.0.sha256"),
    ],
)
def test_the_manifest_is_checked_against_its_schema_naming_the_key(
    host_bundle: Path, tmp_path: Path, edit: Any, key: str
) -> None:
    b = copy(host_bundle, tmp_path)
    manifest = json.loads((b / MANIFEST).read_text())
    edit(manifest)
    (b / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=re.escape(f"manifest.json: {key}")):
        infopt.open_bundle(b, verify=False)
    result = CliRunner().invoke(main, ["inspect", str(b)])
    assert result.exit_code == 1 and key in result.stderr


def test_an_artifact_of_a_target_this_version_lacks_leaves_the_others_loadable(
    host_bundle: Path, tmp_path: Path
) -> None:
    b = copy(host_bundle, tmp_path)
    manifest = json.loads((b / MANIFEST).read_text())
    manifest["artifacts"]["executorch"] = {"files": ["model.pte"], "format": "pte"}
    (b / "model.pte").write_bytes(b"pte")
    manifest["files"].append(
        {"path": "model.pte", "size": 3, "sha256": hashlib.sha256(b"pte").hexdigest()}
    )
    (b / MANIFEST).write_text(json.dumps(manifest))
    bundle = infopt.open_bundle(b)
    assert bundle.runtimes == ["executorch", "pytorch"]
    assert infopt.load(b, max_context=32).runtime.name == "pytorch"
    with pytest.raises(RuntimeNotAvailableError, match="unknown runtime 'executorch'"):
        infopt.load(b, runtime="executorch", max_context=32)


def test_a_bundle_refuses_a_dtype_instead_of_ignoring_it(host_bundle: Path) -> None:
    with pytest.raises(InvalidArgumentError, match="dtype='float16'"):
        infopt.load(host_bundle, dtype="float16")


def test_the_manifest_schema_is_valid_and_types_every_model_field() -> None:
    from dataclasses import fields

    import jsonschema

    from infopt.bundle.manifest import schema
    from infopt.core.spec import ModelSpec

    jsonschema.Draft202012Validator.check_schema(schema())
    config = schema()["properties"]["model"]["properties"]["config"]["properties"]
    assert set(config) == {f.name for f in fields(ModelSpec)}


def test_a_build_without_its_converter_stops_before_any_work(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tiny_gguf: Path
) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "onnx" else real(name, *a)
    )
    stages: list[str] = []
    with pytest.raises(RuntimeNotAvailableError, match=r"pip install 'infopt\[onnx\]'"):
        build(tiny_gguf, tmp_path / "b", device="host", runtime="pytorch,onnxruntime",
              progress=lambda stage, *_: stages.append(stage))  # fmt: skip
    assert "load weights" not in stages and not (tmp_path / "b").exists()
    with pytest.raises(BundleError, match="does not exist"):
        infopt.open_bundle(tmp_path / "b")


def test_build_quantize_int4_keeps_a_q4_1_files_blocks(tmp_path: Path, tiny_gguf_q41: Path) -> None:
    out = tmp_path / "q4"
    summary = build(tiny_gguf_q41, out, device="host", runtime="pytorch", quantize="int4")
    m = verify_bundle(out)
    weights = m["plan"]["compression"]["weights"]
    assert weights["attention"] == weights["mlp"] == "int4m-g32"
    assert set(m["compression"]["kept_from_file"]) >= {"attention", "mlp"}
    assert summary["quality"]["kind"] == m["compression"]["quality"]["kind"] == "exact"
    assert m["plan"]["runtime"] == "pytorch" and m["plan"]["method"] == "rtn"
    bundled = infopt.load(out, max_context=64)
    source = infopt.load(tiny_gguf_q41, max_context=64, runtime="pytorch")
    a = bundled.generate(PROMPT, max_new_tokens=8, stop_token_ids=[])
    b = source.generate(PROMPT, max_new_tokens=8, stop_token_ids=[])
    assert a.token_ids == b.token_ids


def test_build_quantize_int8_measures_what_it_cost(tmp_path: Path, tiny_gguf: Path) -> None:
    out = tmp_path / "int8"
    args = ["build", str(tiny_gguf), "-d", "host", "--runtime", "pytorch", "-o", str(out)]
    result = CliRunner().invoke(main, [*args, "--quantize", "int8", "--json"])
    assert result.exit_code == 0, result.stderr
    q = json.loads(result.stdout)["quality"]
    assert q["kind"] == "measured" and q["tokens"] >= 100
    assert q["perplexity"] == pytest.approx(q["reference_perplexity"] * (1 + q["change"]), rel=1e-3)
    assert abs(q["change"]) < 0.05 and q["top1"] > 0.8 and q["kl"] >= 0
    m = verify_bundle(out)
    assert set(m["plan"]["compression"]["weights"].values()) == {"int8"}
    assert m["compression"]["quality"] == q
    assert m["model"]["parameters"] == open_model(tiny_gguf).spec.num_params


def test_build_quantize_refusals(tmp_path: Path, tiny_gguf: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "never"
    args = ["build", str(tiny_gguf), "-o", str(out)]
    bad = runner.invoke(main, [*args, "-d", "host", "--quantize", "int3"])
    assert bad.exit_code == 1 and "'int3'" in bad.stderr
    (tmp_path / "plan.json").write_text("{}")
    both = runner.invoke(main, [*args, "--plan", str(tmp_path / "plan.json"), "--quantize", "int8"])
    assert both.exit_code == 1 and "--quantize" in both.stderr
    assert not out.exists()
