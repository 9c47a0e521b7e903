"""A model file loads on the fastest runtime installed here, at its own precision, converted once
and cached: the cache's keys, hits, damaged entries, concurrent conversions and commands."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from filelock import FileLock

import infopt
from infopt.api import default_runtime
from infopt.bundle import open_bundle
from infopt.bundle.cache import entries
from infopt.cli import main

PROMPT = [{"role": "user", "content": "hello there"}]


@pytest.fixture
def empty_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("INFOPT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def stages(seen: list[str]) -> Any:
    return lambda stage, done, total, detail="": seen.append(stage)


def test_a_model_file_runs_converted_at_its_precision_and_later_from_the_cache(
    tiny_gguf_q41: Path, empty_cache: Path, tmp_path: Path
) -> None:
    assert default_runtime("cpu") in ("onnxruntime", "openvino")  # the host's fast CPU runtimes
    assert default_runtime("cuda") == "pytorch"
    seen: list[str] = []
    m = infopt.load(tiny_gguf_q41, max_context=64, progress=stages(seen))
    converting = {f"converting for {m.runtime.name}: {s}" for s in ("read weights", "write files")}
    assert m.runtime.name == default_runtime() and converting <= set(seen)
    (entry,) = entries()
    assert entry["model"] == "tiny-q4_1.gguf" and entry["runtime"] == m.runtime.name
    bundle = open_bundle(entry["path"])
    assert bundle.weights == {  # the file's own blocks: Q4_1 blocks, Q8_0 tables
        "embeddings": "int8-g32",
        "lm_head": "int8-g32",
        "attention": "int4m-g32",
        "mlp": "int4m-g32",
    }
    assert bundle.max_context == bundle.spec.max_position_embeddings  # any smaller load fits
    first = m.generate(PROMPT, max_new_tokens=8, stop_token_ids=[]).token_ids
    again: list[str] = []
    m2 = infopt.load(tiny_gguf_q41, max_context=32, progress=stages(again))
    assert again == [] and len(entries()) == 1  # a hit: nothing converted
    assert m2.generate(PROMPT, max_new_tokens=8, stop_token_ids=[]).token_ids == first
    # the same bytes under another name: the entry is found by content, not converted again
    copy = tmp_path / "renamed.gguf"
    shutil.copyfile(tiny_gguf_q41, copy)
    m3 = infopt.load(copy, max_context=32, progress=stages(again))
    assert again == [] and len(entries()) == 1
    assert m3.generate(PROMPT, max_new_tokens=8, stop_token_ids=[]).token_ids == first


def test_with_exact_numerics_the_default_runtime_is_the_dequantized_model(
    tiny_gguf_q41: Path, empty_cache: Path
) -> None:
    fast = infopt.load(tiny_gguf_q41, max_context=64, cache=False, numerics="exact")
    reference = infopt.load(tiny_gguf_q41, max_context=64, runtime="pytorch")
    for prompt in (PROMPT, "The quick brown fox"):
        a = fast.generate(prompt, max_new_tokens=16, stop_token_ids=[])
        b = reference.generate(prompt, max_new_tokens=16, stop_token_ids=[])
        assert a.token_ids == b.token_ids
    assert entries() == []  # cache=False: converted into a temporary directory


def test_a_damaged_cache_entry_is_rebuilt_never_loaded(
    tiny_gguf_q41: Path, empty_cache: Path
) -> None:
    infopt.load(tiny_gguf_q41, max_context=32)
    (entry,) = entries()
    data = max(Path(entry["path"]).rglob("*"), key=lambda p: p.stat().st_size)  # the weights
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    seen: list[str] = []
    infopt.load(tiny_gguf_q41, max_context=32, progress=stages(seen))
    assert any(s.endswith("write files") for s in seen)  # converted again
    open_bundle(entry["path"])  # and sound


def test_two_processes_converting_at_once_both_get_a_sound_entry(
    tiny_gguf_q41: Path, tmp_path: Path
) -> None:
    env = {**os.environ, "INFOPT_CACHE": str(tmp_path / "shared-cache")}
    code = (
        "import json, sys, infopt\n"
        "m = infopt.load(sys.argv[1], max_context=32)\n"
        "print(json.dumps(m.generate('hello', max_new_tokens=6, stop_token_ids=[]).token_ids))\n"
    )
    runs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(tiny_gguf_q41)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [r.communicate(timeout=300) for r in runs]
    assert all(r.returncode == 0 for r in runs), [o[1][-800:] for o in outputs]
    assert outputs[0][0] == outputs[1][0]
    folders = [p for p in (tmp_path / "shared-cache").iterdir() if p.is_dir()]
    assert len(folders) == 1  # one entry, no partial directory left
    open_bundle(folders[0])


def test_a_second_process_waits_for_the_first_ones_conversion(
    tiny_gguf_q41: Path, tmp_path: Path
) -> None:
    """While another process holds the key's lock (converting), a load waits rather than write
    the same entry beside it (two writers raced to put it in place, and one failed)."""
    from infopt.bundle.cache import entry_key
    from infopt.importers import content_hash

    cache = tmp_path / "cache"
    cache.mkdir()
    sha = content_hash(tiny_gguf_q41)  # the hash `load` keys the cache by
    code = "import sys, infopt; infopt.load(sys.argv[1], max_context=32); print('loaded')"
    env = {**os.environ, "INFOPT_CACHE": str(cache)}
    with FileLock(cache / f".{entry_key(sha, default_runtime())}.lock"):
        load = subprocess.Popen(
            [sys.executable, "-c", code, str(tiny_gguf_q41)], env=env, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        with pytest.raises(subprocess.TimeoutExpired):
            load.wait(timeout=8)  # waits on the lock, well past a tiny model's conversion
        assert not [p for p in cache.iterdir() if p.is_dir()]  # nothing written meanwhile
    out, err = load.communicate(timeout=120)
    assert load.returncode == 0 and out.strip() == "loaded", err
    (entry,) = [p for p in cache.iterdir() if p.is_dir()]
    open_bundle(entry)


def test_a_bundle_put_in_place_by_another_writer_meanwhile_is_replaced(tmp_path: Path) -> None:
    """`build` to an OUT that another writer creates between the check and the rename: the
    rename fails (OUT is a non-empty directory) and the atomic exchange replaces it."""
    from infopt.bundle.files import swap_into_place

    class AppearsLate(type(Path())):  # type: ignore[misc]
        def exists(self, *args: Any, **kwargs: Any) -> bool:
            return False  # absent when checked; the other writer's OUT is there by the rename

    out, tmp = tmp_path / "out", tmp_path / "tmp"
    out.mkdir()
    (out / "theirs").write_text("x")
    tmp.mkdir()
    (tmp / "ours").write_text("y")
    swap_into_place(tmp, AppearsLate(out))
    assert [p.name for p in out.iterdir()] == ["ours"] and not tmp.exists()


def test_the_cache_commands_and_run_without_the_cache(
    tiny_gguf_q41: Path, empty_cache: Path
) -> None:
    runner = CliRunner()
    args = ["run", str(tiny_gguf_q41), "--raw", "-p", "hi", "-n", "3", "--max-context", "32"]
    done = runner.invoke(main, [*args, "--no-cache", "--json"])
    assert done.exit_code == 0, done.output
    assert json.loads(done.stdout)["token_ids"]  # stdout is the JSON alone
    listed = json.loads(runner.invoke(main, ["cache", "ls", "--json"]).stdout)
    assert listed["entries"] == [] and listed["root"] == str(empty_cache)
    shown = runner.invoke(main, ["cache", "ls"]).stdout  # said, not a table with no rows
    assert shown.startswith(f"{empty_cache}: empty") and "runtime" not in shown
    assert runner.invoke(main, args).exit_code == 0
    listed = json.loads(runner.invoke(main, ["cache", "ls", "--json"]).stdout)
    assert len(listed["entries"]) == 1 and listed["entries"][0]["bytes"] > 0
    shown = runner.invoke(main, ["cache", "ls"], terminal_width=200)
    where = Path(listed["entries"][0]["path"]).name
    assert "tiny-q4_1.gguf" in shown.stdout and "1 entry," in shown.stdout
    assert where in shown.stdout  # the entry's folder, under the root the title names
    # an entry has no plan: inspect says what it stores instead, and that nothing was rounded
    inspected = runner.invoke(main, ["inspect", listed["entries"][0]["path"]])
    assert inspected.exit_code == 0, inspected.output
    assert "none: the model file's own precision (embeddings int8-g32," in inspected.stdout
    assert "the model file's own values, nothing rounded again" in inspected.stdout
    assert "None" not in inspected.stdout
    # a lock file a load left, and one a load is holding: clear removes the first only
    (empty_cache / ".left-behind.lock").write_text("")
    with FileLock(empty_cache / ".held.lock"):
        cleared = json.loads(runner.invoke(main, ["cache", "clear", "--json"]).stdout)
        assert sorted(p.name for p in empty_cache.iterdir()) == [".held.lock"]
    assert len(cleared["removed"]) == 1 and entries() == []


def test_the_reference_runtime_and_bad_settings(tiny_gguf_q41: Path, empty_cache: Path) -> None:
    m = infopt.load(tiny_gguf_q41, max_context=32, runtime="pytorch")
    assert m.runtime.name == "pytorch" and entries() == []  # read as float32, nothing cached
    with pytest.raises(infopt.InvalidArgumentError, match="dtype 'float16'"):
        infopt.load(tiny_gguf_q41, max_context=32, dtype="float16")
    with pytest.raises(infopt.InvalidArgumentError, match="runs on the CPU"):
        infopt.load(tiny_gguf_q41, max_context=32, device="cuda", runtime="onnxruntime")


def test_the_offsets_probe_rewrites_only_what_it_says(tiny_gguf_q41: Path, tmp_path: Path) -> None:
    """tools/ort_offsets: the `as converted` graph is the one `load()` runs; each variant
    changes the offsets terms as its name says, and nothing else."""
    import numpy as np
    import onnx

    from infopt.bundle.cache import converted
    from infopt.tools.ort_offsets import VARIANTS, offsets_terms, write_variant

    ids = [1, 7, 3, 9, 4]
    with converted(tiny_gguf_q41, "onnxruntime") as source:
        terms = len(offsets_terms(onnx.load(str(source / "model.onnx")).graph))
        layers = open_bundle(source).manifest["model"]["config"]["num_layers"]
        assert terms == 4 * layers  # qkv, o, gate_up and down (the Q8_0 LM head has none)
        nodes = len(onnx.load(str(source / "model.onnx")).graph.node)
        out = {}
        for i, variant in enumerate(VARIANTS):
            bundle = tmp_path / str(i)
            assert write_variant(source, bundle, variant) == terms
            graph = onnx.load(str(bundle / "model.onnx")).graph
            extra = {"no offsets": -4 * terms, "fp16 offsets": 2 * terms, "pooled sums": -terms}
            extra = extra.get(variant, 0)
            assert len(graph.node) == nodes + extra
            out[variant] = infopt.load(bundle, numerics="exact").runtime.forward(ids)
        want = infopt.load(source, numerics="exact").runtime.forward(ids)
    np.testing.assert_array_equal(out["as converted"], want)
    assert not np.allclose(out["no offsets"], want, atol=1e-2)
    assert not np.allclose(out["one block"], want, atol=1e-2)
    # float16 offsets: equal where every offset is a float16 value (here all of them are)
    np.testing.assert_allclose(out["fp16 offsets"], want, atol=5e-2, rtol=1e-2)
    # pooled sums: the same sums (as means, the offsets scaled to match), added in another order
    np.testing.assert_allclose(out["pooled sums"], want, atol=1e-4, rtol=1e-4)


def test_a_build_for_the_host_keeps_the_files_blocks(tiny_gguf_q41: Path, tmp_path: Path) -> None:
    """`build --device host` on a Q4_1 GGUF: the file's own blocks, not a float copy of them."""
    from infopt.importers import stored_weights

    out = tmp_path / "b"
    result = CliRunner().invoke(main, ["build", str(tiny_gguf_q41), "-d", "host", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "as stored in the file" in result.stdout and "tokens in it" in result.stdout
    manifest = open_bundle(out).manifest
    assert manifest["plan"]["compression"]["weights"] == stored_weights(tiny_gguf_q41)
    quality = manifest["compression"]["quality"]
    assert quality["kind"] == "exact"
    assert "fast INT4/INT8 kernels round activations" in quality["note"]
    assert infopt.load(out).generate(PROMPT, max_new_tokens=4).token_ids
