"""The registry of targets: each target complete in its own folder, every per-target list derived
from the records, importing them light, and no library module outside a target's folder naming
a target."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from infopt.device_profiles import KINDS
from infopt.runtimes import Runtime, targets
from infopt.runtimes.registry import PARTS, Target

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


@pytest.mark.parametrize("name", list(targets()))
def test_each_target_is_complete(name: str) -> None:
    t = targets()[name]
    folder = ROOT / "runtimes" / name
    assert isinstance(t, Target) and t.name == name == folder.name
    for part in PARTS:  # runtime and exporter always; the read-back check where it says so
        assert (folder / f"{part}.py").is_file() == (part != "check" or t.reads_back), part
    runtime, export = t.module("runtime"), t.module("export")
    for fn in ("from_bundle", "from_source", "from_model"):
        assert callable(getattr(runtime, fn)), fn
    assert callable(export.artifact)
    if t.reads_back:
        assert callable(t.module("check").check_package)
    # the pip extra installs the package in the range the record says
    extras = PYPROJECT["project"]["optional-dependencies"]
    assert t.requirement in extras[t.extra] and t.requirement == t.package + t.versions
    assert not t.build_modules or (t.build_extra or t.extra) in extras  # what building needs
    assert f"infopt.runtimes.{name}" in PYPROJECT["tool"]["setuptools"]["packages"]
    assert set(t.overhead) <= set(KINDS) and all(v > 0 for v in t.overhead.values())
    assert t.title and t.installed_requirement()["package"] == t.package


def test_one_target_runs_model_cores_and_every_runtime_states_the_protocol(
    tiny_gguf: Path,
) -> None:
    assert [t.name for t in targets().values() if t.reference] == ["pytorch"]
    for name, t in targets().items():
        cls = next(
            v
            for v in vars(t.module("runtime")).values()
            if isinstance(v, type) and getattr(v, "name", None) == name
        )
        assert cls.__name__.endswith("Runtime") and cls.__name__.lower() != "runtime"
        for attr in ("name", "device", "batch_exact", "verify_window"):
            assert hasattr(cls, attr), (name, attr)  # stated, not guessed with getattr
    import infopt

    assert isinstance(infopt.load(tiny_gguf, max_context=16).runtime, Runtime)


def test_importing_the_registry_needs_no_torch_and_no_runtime_package() -> None:
    heavy = ["torch", "onnxruntime", "openvino", "coremltools", "ai_edge_litert", "onnx"]
    code = (
        "import sys\n"
        "from infopt.runtimes import targets\n"
        "from infopt.bundle.manifest import schema\n"
        "assert len(targets()) >= 5 and schema()\n"
        f"print([m for m in {heavy!r} if m in sys.modules])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_per_target_lists_come_from_the_records() -> None:
    from infopt.device_profiles import load_profile
    from infopt.device_profiles.host import host_runtimes
    from infopt.plan.costs import runtime_overhead

    assert host_runtimes() == ("onnxruntime", "openvino", "pytorch")  # on every CPU vendor
    assert runtime_overhead("onnxruntime", "cpu") == targets()["onnxruntime"].overhead["cpu"]
    for name in ("a100-80gb", "apple-ane", "intel-cpu"):
        assert set(load_profile(name).runtimes) <= set(targets())
    symmetric = {n for n, t in targets().items() if t.symmetric_int4}
    assert (
        symmetric
        == {n for n, t in targets().items() if t.fixed_windows}
        == {
            "coreml",
            "tflite",
        }
    )


# Where a library module outside runtimes/<target>/ may still name a target, and why.
ALLOWED = {
    # help examples a user copies (the options' own lists come from the registry)
    "sdk/cli/bundle.py": "examples in --help",
    # the peers compared against are named after the systems they are, not after our targets
    "sdk/measure/speed.py": "the peers ONNX Runtime GenAI and OpenVINO GenAI",
    # the reason the symmetric INT4 format keeps bf16-precise scales is one target's storage
    "sdk/core/quant.py": "why symmetric INT4 scales are bf16-precise",
}


def target_words() -> re.Pattern[str]:
    words = set()
    for t in targets().values():
        words.add(t.name)
        words.update(w for w in re.split(r"[()]", t.title) if w.strip())
    alternatives = "|".join(sorted(re.escape(w.strip()) for w in words))
    return re.compile(rf"\b({alternatives})\b", re.IGNORECASE)


def test_no_library_module_outside_a_target_folder_names_a_target() -> None:
    pattern = target_words()
    library = [*ROOT.glob("sdk/**/*.py"), *ROOT.glob("device_profiles/*.py")]
    library += [p for p in ROOT.glob("runtimes/*.py")]
    found = {}
    for path in library:
        rel = path.relative_to(ROOT).as_posix()
        hits = [m.group(0) for m in pattern.finditer(path.read_text())]
        if hits and rel not in ALLOWED:
            found[rel] = sorted(set(hits))
    assert not found, f"target names outside runtimes/<target>/: {found}"
    for rel in ALLOWED:  # an exception that is no longer needed goes from the list
        assert pattern.search((ROOT / rel).read_text()), rel


def test_the_library_never_imports_its_tools() -> None:
    for path in [*ROOT.glob("sdk/**/*.py"), *ROOT.glob("runtimes/**/*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else []
            )
            assert not any(n.startswith("infopt.tools") for n in names), path
