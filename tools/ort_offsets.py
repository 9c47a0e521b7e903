"""What keeping a GGUF's Q4_1 blocks exact costs on ONNX Runtime, taken apart.

    python -m infopt.tools.ort_offsets [MODEL] [--repeat 3] [--threads 2] [--json | --markdown]

`infopt.load()` converts a Q4_1 file for ONNX Runtime as `MatMulNBits` over the blocks' codes
plus, per quantized linear, the term their float offsets add: the input's per-block sums
(Reshape, ReduceSum) times the offsets ([K/32, N] fp32, MatMul), added to the product (Add).
This tool converts MODEL (the default model unless named) once, then writes variants of that
graph and measures each the way the runtime table does (`infopt.measure.speed`, fresh
processes, alternating rounds, medians):

- `as converted`: the exact graph `infopt.load()` runs;
- `no offsets`: the term left out (wrong outputs: the bound on what the term costs);
- `one block`: the same operators, with each offsets MatMul over one block instead of K/32
  (its weight [1, N]): what the operators cost apart from the offsets' bytes and the MatMul;
- `fp16 offsets`: the offsets MatMul in float16 between two Casts (half the bytes; exact only
  where every offset is a float16 value, and the sums are rounded to float16).
- `pooled sums`: the block sums as one `AveragePool` (block means, the offsets scaled by the
  block size to match: exact, powers of two) instead of Reshape and ReduceSum: one operator
  fewer per term.

Only `as converted` computes the model; the others exist to show where its time goes.
"""

from __future__ import annotations

import json
import shutil
import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from infopt.errors import InvalidArgumentError
from infopt.measure.speed import (
    bench_parser,
    log_stderr,
    machine,
    parse_bench_args,
    render_table,
    run_child,
)

REPEAT = 3

VARIANTS = ("as converted", "no offsets", "one block", "fp16 offsets", "pooled sums")
ONNX_FILES = ("model.onnx", "model.onnx.data")


def offsets_terms(graph: Any) -> list[tuple[Any, Any, Any, Any]]:
    """(Reshape, ReduceSum, MatMul, Add) of every offsets term in the graph, as the exporter
    writes them (`infopt.runtimes.onnxruntime.export`)."""
    made = {o: n for n in graph.node for o in n.output}
    readers: dict[str, list[Any]] = {}
    for n in graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    terms = []
    for n in graph.node:
        if n.op_type == "ReduceSum" and n.input[1].endswith(".sum_axis"):
            (matmul,) = [r for r in readers[n.output[0]] if r.op_type == "MatMul"]
            (add,) = readers[matmul.output[0]]
            terms.append((made[n.input[0]], n, matmul, add))
    return terms


def write_variant(source: Path, out: Path, variant: str) -> int:
    """The bundle `source` with its graph rewritten as `variant` says, at `out` (manifest
    checksums renewed); returns the number of offsets terms rewritten."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    from infopt.bundle.files import sha256_file

    shutil.copytree(source, out, ignore=shutil.ignore_patterns(*ONNX_FILES))
    model = onnx.load(str(source / "model.onnx"))
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    terms = offsets_terms(graph)
    dropped: set[str] = set()
    after: dict[str, list[Any]] = {}
    for reshape, reduce, matmul, add in terms:
        if variant == "no offsets":
            product = next(i for i in add.input if i != matmul.output[0])
            for n in graph.node:
                for k, name in enumerate(n.input):
                    if name == add.output[0]:
                        n.input[k] = product
            dropped |= {reshape.name, reduce.name, matmul.name, add.name}
        elif variant == "one block":
            weight = inits[matmul.input[1]]
            weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight)[:1], weight.name))
            shape = inits[reshape.input[1]]
            blocks = numpy_helper.to_array(shape)
            whole = np.array([0, 0, 1, int(blocks[2]) * int(blocks[3])])
            shape.CopyFrom(numpy_helper.from_array(whole, shape.name))
        elif variant == "fp16 offsets":
            weight = inits[matmul.input[1]]
            half = numpy_helper.to_array(weight).astype(np.float16)
            weight.CopyFrom(numpy_helper.from_array(half, weight.name))
            sums, term = matmul.input[0], matmul.output[0]
            to_half = helper.make_node("Cast", [sums], [sums + ".f16"], to=10)
            to_float = helper.make_node("Cast", [term + ".f16"], [term], to=1)
            matmul.input[0], matmul.output[0] = sums + ".f16", term + ".f16"
            after[reduce.name] = [to_half]
            after[matmul.name] = [to_float]
        elif variant == "pooled sums":
            block = int(numpy_helper.to_array(inits[reshape.input[1]])[3])
            weight = inits[matmul.input[1]]
            scaled = numpy_helper.to_array(weight) * np.float32(block)
            weight.CopyFrom(numpy_helper.from_array(scaled, weight.name))
            pool = helper.make_node(
                "AveragePool",
                [reshape.input[0]],
                [reduce.output[0]],
                name=reduce.name + ".pool",
                kernel_shape=[block],
                strides=[block],
            )
            dropped |= {reshape.name, reduce.name}
            after[reshape.name] = [pool]
    nodes = []
    for n in graph.node:
        nodes += [n] if n.name not in dropped else []
        nodes += after.get(n.name, [])
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.save(
        model,
        str(out / "model.onnx"),
        save_as_external_data=True,
        location="model.onnx.data",
        size_threshold=1024,
    )
    manifest = json.loads((out / "manifest.json").read_text())
    for entry in manifest["files"]:
        path = out / entry["path"]
        path.chmod(0o644)
        entry["size"], entry["sha256"] = path.stat().st_size, sha256_file(path)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return len(terms)


def probe(
    model: str, repeat: int, threads: int, log: Callable[[str], object] | None = None
) -> list[dict[str, Any]]:
    from infopt.bundle.cache import converted

    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in VARIANTS}
    with tempfile.TemporaryDirectory(prefix="infopt-ort-offsets-") as tmp:
        bundles = {}
        with converted(model, "onnxruntime") as source:
            for i, variant in enumerate(VARIANTS):
                bundles[variant] = Path(tmp) / str(i)
                terms = write_variant(source, bundles[variant], variant)
        if not terms:
            raise InvalidArgumentError(
                f"{model}: its conversion has no offsets terms (not a Q4_1 file)"
            )
        for _ in range(repeat):
            for variant in VARIANTS:
                r = run_child(str(bundles[variant]), "onnxruntime", threads)
                runs[variant].append(r)
                if log:
                    log(f"{variant}: tg128 {r['tg128']:.1f} tok/s, ttft {r['ttft_ms']:.1f} ms")
    rows = []
    for variant in VARIANTS:
        rs = runs[variant]
        rows.append(
            {
                "variant": variant,
                "terms": terms,
                **{
                    k: statistics.median(r[k] for r in rs)
                    for k in ("ttft_ms", "pp512", "tg128", "p50_ms")
                },
                "tg128_rounds": [round(r["tg128"], 1) for r in rs],
            }
        )
    base = rows[0]
    for row in rows:
        row["tg128_vs_converted"] = row["tg128"] / base["tg128"]
        row["ms_per_token_vs_converted"] = row["p50_ms"] - base["p50_ms"]
    return rows


def render(rows: list[dict[str, Any]], threads: int, repeat: int, markdown: bool) -> str:
    cols = [
        "graph",
        "TTFT ms (32 tok)",
        "pp512 tok/s",
        "tg128 tok/s",
        "tg128 vs as converted",
        "p50 ms per token (vs as converted)",
    ]
    cells = [
        [
            r["variant"],
            f"{r['ttft_ms']:.1f}",
            f"{r['pp512']:.0f}",
            f"{r['tg128']:.1f}",
            f"{r['tg128_vs_converted']:.2f}×",
            f"{r['p50_ms']:.2f} ({r['ms_per_token_vs_converted']:+.2f})",
        ]
        for r in rows
    ]
    head = (
        f"{machine()}; {threads} threads, medians of {repeat} alternating rounds; "
        f"{rows[0]['terms']} offsets terms"
    )
    return render_table(head, cols, cells, markdown)


def main(argv: list[str] | None = None) -> None:
    from infopt.core.default_model import default_model_path

    ap = bench_parser(__doc__, REPEAT)
    ap.add_argument("model", nargs="?", help="a Q4_1 GGUF (default: the default model)")
    args = parse_bench_args(ap, argv)
    model = args.model or str(default_model_path())
    rows = probe(model, args.repeat, args.threads, log=log_stderr)
    if args.json:
        print(json.dumps({"machine": machine(), "threads": args.threads, "rows": rows}))
    else:
        print(render(rows, args.threads, args.repeat, args.markdown))


if __name__ == "__main__":
    main()
