"""ONNX Runtime and OpenVINO on the default model: fp32 bundles generate the PyTorch runtime's very
tokens; INT8 and INT4 bundles stay close to the PyTorch runtime running the same weights."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from infopt.tools.runtime_bench import build_matrix
from infopt.tools.runtime_check import Reference, compare


@pytest.fixture(scope="module")
def matrix(module_dir: Path, fp32_bundle: Path) -> dict[str, str]:
    """The session's fp32 bundle (its self-draft is not loaded: runtime_check decodes plainly),
    and the INT8 and INT4 ones, built at once in processes of their own (their exports are
    single-threaded for the most part)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        jobs = [pool.submit(build_matrix, module_dir, labels=(q,)) for q in ("int8", "int4")]
        built = [pair for job in jobs for pair in job.result()]
    return {"fp32": str(fp32_bundle), **dict(built)}


def test_fp32_bundles_generate_the_pytorch_tokens(
    matrix: dict[str, str], fp32_reference: Reference
) -> None:
    rows = compare(matrix["fp32"], against=fp32_reference)
    assert {r["runtime"] for r in rows} == {"onnxruntime", "openvino"}
    for r in rows:  # 4 prompts (2 chat, 2 plain) x 64 greedy tokens, token for token
        assert r["greedy_identical"] == r["prompts"] == 4, r
        assert r["top1"] == 1.0 and r["max_rel"] < 1e-4, r


@pytest.mark.parametrize("label", ["int8", "int4"])
def test_quantized_bundles_with_exact_numerics_compute_the_same_weights_as_pytorch(
    matrix: dict[str, str], label: str
) -> None:
    # fp32 activations against the stored weights on every CPU: the runtimes differ from the
    # dequantized float32 model only by float32 summation order
    rows = compare(matrix[label], tokens=256, new_tokens=16, numerics=("exact", "fast"))
    exact = [r for r in rows if r["numerics"] == "exact"]
    assert {r["runtime"] for r in exact} == {"onnxruntime", "openvino"}
    for r in exact:
        assert r["top1"] >= 0.995 and r["max_rel"] < 1e-3, r
    # the default: ONNX Runtime rounds activations to int8 in MatMulNBits, OpenVINO on CPUs with
    # VNNI or AMX, PyTorch's packed kernels compute in bfloat16: close, not equal
    fast = [r for r in rows if r["numerics"] == "fast"]
    assert {r["runtime"] for r in fast} == {
        "onnxruntime",
        "openvino",
        "pytorch (packed bf16 kernels)",
    }
    for r in fast:
        assert r["top1"] >= 0.93 and r["max_rel"] < 0.1, r


def test_matrix_bundles_carry_three_artifacts(matrix: dict[str, str]) -> None:
    from infopt.bundle import verify_bundle

    for bundle in matrix.values():
        assert sorted(verify_bundle(Path(bundle))["artifacts"]) == [
            "onnxruntime",
            "openvino",
            "pytorch",
        ]


def test_the_tied_int8_table_is_not_resident_twice(matrix: dict[str, str]) -> None:
    """The int4 bundle's LM head and embedding share one INT8 table on disk (27 MB). Once the
    session exists, the LM head's copy lives in the kernel's packed weights, and of the table's
    pages in the file only what the embedding has looked up may stay resident: none yet (all
    27 MB were, when one initializer served both and prepacking read it through the gather's
    mapping)."""
    import onnx

    graph = Path(matrix["int4"]) / "model.onnx"
    proto = onnx.load_model(str(graph), load_external_data=False).graph
    gather = next(n for n in proto.node if n.op_type == "GatherBlockQuantized")
    table = next(t for t in proto.initializer if t.name == gather.input[0])
    where = {e.key: int(e.value) for e in table.external_data if e.key != "location"}
    start, end = where["offset"], where["offset"] + where["length"]
    script = (  # resident kB of the mappings of the data file that start inside the table
        "import re, sys, onnxruntime as ort\n"
        "s = ort.InferenceSession(sys.argv[1], providers=['CPUExecutionProvider'])\n"
        "start, end = int(sys.argv[2]), int(sys.argv[3])\n"
        "kb, inside = 0, False\n"
        "for line in open('/proc/self/smaps'):\n"
        "    p = line.split()\n"
        "    if re.match(r'^[0-9a-f]+-[0-9a-f]+ ', line):\n"
        "        off = int(p[2], 16)\n"
        "        inside = p[-1].endswith('model.onnx.data') and start <= off + 4095 < end\n"
        "    elif p[0] == 'Rss:' and inside: kb += int(p[1])\n"
        "print(kb)\n"
    )
    command = [sys.executable, "-c", script, str(graph), str(start), str(end)]
    out = subprocess.run(command, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) < 1024, f"{out.stdout.strip()} kB of the table resident"


def test_bench_prints_json_alone_with_json_and_a_table_without(matrix: dict[str, str]) -> None:
    from infopt.measure.speed import table

    bench = [sys.executable, "-m", "infopt.cli", "bench", matrix["int4"], "--repeat", "1"]
    cli = [*bench, "--runtime", "onnxruntime"]  # one artifact's row is enough for the layout
    as_json = subprocess.run([*cli, "--json"], capture_output=True, text=True, check=True)
    (row,) = json.loads(as_json.stdout)  # stdout is the JSON and nothing else
    assert row["tg128"] > 0 and row["ttft_ms"] > 0 and as_json.stderr == ""
    shown = subprocess.run(cli, capture_output=True, text=True, check=True)
    lines = shown.stdout.splitlines()
    # the machine and how its figures were taken (one round: no "medians"), then the table
    assert "flags" in lines[0] and lines[0].endswith("threads, one round")
    row_at = next(i for i, line in enumerate(lines) if line.startswith("infopt onnxruntime int4"))
    assert lines[row_at - 1].split()[0] == "system" and "tg128" in "".join(lines[1:row_at])
    assert len(lines[row_at].split()) >= 12  # the whole row on one line, none of it wrapped
    assert "{" not in shown.stderr and "tg128" in shown.stderr  # progress lines, not JSON
    markdown = table([{**row, "system": "x", "peer": False}], 2, True, 3).splitlines()
    assert markdown[0].endswith("2 threads, medians of 3 alternating rounds")
    assert "flags" in markdown[0] and markdown[4].count("|") == markdown[2].count("|") == 11
