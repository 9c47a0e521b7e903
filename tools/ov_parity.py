"""infopt's OpenVINO runtime beside OpenVINO GenAI on the same weights, in one session.

    python -m infopt.tools.ov_parity BUNDLE [BUNDLE ...] [--peers /tmp/infopt-peers]
        [--repeat 5] [--threads 2] [--json | --markdown]

The runtime table compares infopt's OpenVINO runtime with OpenVINO GenAI on GenAI's own model
(optimum-intel's export, NNCF's INT4 group 64): other weights and another graph. Here GenAI runs
each bundle's own OpenVINO IR, so both read the same bytes through the same CPU plugin and only
the pipelines and their settings differ:

- the IR as the bundle carries it, with its `logits_to_keep` input fixed to 1 (GenAI's
  LLMPipeline feeds input_ids, attention_mask, position_ids and beam_idx only, and keeps the
  last position's logits, as infopt asks while decoding);
- the tokenizer and detokenizer models of the peers' OpenVINO folder (the same model's
  tokenizer, converted by openvino_tokenizers), with its config files;
- GenAI's stateful pipeline (ATTENTION_BACKEND=SDPA), as infopt's runtime runs one slot. Its
  default, PagedAttention, is the form infopt's runtime takes for several slots (the IR
  rewritten by OpenVINO's SDPA-to-PagedAttention transformation); `batch_bench --runtime
  openvino` compares that one with GenAI's continuous batching.

Also measured, as in the runtime table: GenAI on its own model with its default backend. Every
figure is the median of `--repeat` alternating rounds, each system in a fresh process, so the
machine's drift hits all alike. GenAI compiles with the plugin's defaults (on CPUs with AVX-512
BF16 or AMX: bf16 inference precision and a u8 KV cache); infopt with f32 precision and the
bundle's KV-cache dtype.
"""

from __future__ import annotations

import json
import shutil
import statistics
import tempfile
from pathlib import Path
from typing import Any

from infopt.errors import InfoptError, InvalidArgumentError
from infopt.measure.speed import (
    DEFAULT_PEERS,
    bench_parser,
    log_stderr,
    machine,
    parse_bench_args,
    render_table,
    run_child,
    run_peer_script,
)

REPEAT = 5

SCRIPT = "ovgenai_bench.py"
PEER_MODEL = "ov-int4"  # the peers' OpenVINO GenAI folder (tools/peers/setup_peers.sh)
TOKENIZER_FILES = (
    "openvino_tokenizer.xml",
    "openvino_tokenizer.bin",
    "openvino_detokenizer.xml",
    "openvino_detokenizer.bin",
    "config.json",
    "generation_config.json",
)


def genai_folder(bundle: str | Path, peers: Path, dest: Path) -> Path:
    """A folder OpenVINO GenAI's LLMPipeline loads: the bundle's IR (logits_to_keep fixed to
    1) and the peers' tokenizer models. Returns `dest`."""
    import numpy as np
    import openvino as ov
    from openvino import opset13 as ops

    from infopt.bundle import open_bundle

    source = peers / PEER_MODEL
    missing = [f for f in TOKENIZER_FILES if not (source / f).exists()]
    if missing:
        raise InvalidArgumentError(
            f"{source}: no {', '.join(missing)}; run `bash tools/peers/setup_peers.sh {peers}` "
            "from an infopt checkout first"
        )
    xml = open_bundle(bundle).artifact("openvino").file()
    model = ov.Core().read_model(str(xml))
    for param in model.get_parameters():
        if param.get_friendly_name() == "logits_to_keep":
            one = ops.constant(np.array([1], np.int64))
            for target in list(param.output(0).get_target_inputs()):
                target.replace_source_output(one.output(0))
            model.remove_parameter(param)
    model.validate_nodes_and_infer_types()
    dest.mkdir(parents=True, exist_ok=True)
    ov.save_model(model, str(dest / "openvino_model.xml"), compress_to_fp16=False)
    for name in TOKENIZER_FILES:
        shutil.copyfile(source / name, dest / name)
    return dest


def parity(
    bundles: list[str], peers: Path, repeat: int, threads: int, log: Any = None
) -> list[dict[str, Any]]:
    """Median figures of every system (see the module's doc), one row each."""
    if not (peers / "venv" / "bin" / "python").exists():
        raise InvalidArgumentError(
            f"no peers in {peers} (--peers): run `bash tools/peers/setup_peers.sh {peers}` "
            "from an infopt checkout first"
        )
    script = peers / "bench" / SCRIPT
    if "ATTENTION_BACKEND" not in (script.read_text() if script.exists() else ""):
        raise InvalidArgumentError(
            f"{script}: missing or older than this tool (it cannot pick GenAI's SDPA pipeline); "
            f"run `bash tools/peers/setup_peers.sh {peers}` from an infopt checkout again"
        )
    labels = [Path(b).name for b in bundles]
    if len(set(labels)) != len(labels):
        raise InvalidArgumentError(
            f"bundles {bundles}: their folder names label the rows, and two are the same"
        )
    runs: dict[str, list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="infopt-ov-parity-") as tmp:
        todo: list[tuple[str, str, Any]] = []
        for i, bundle in enumerate(bundles):
            label = Path(bundle).name
            folder = genai_folder(bundle, peers, Path(tmp) / str(i))
            todo.append((f"infopt openvino {label}", label, ("infopt", bundle)))
            todo.append((f"OpenVINO GenAI, infopt's IR {label} (SDPA)", label, ("genai", folder)))
        todo.append(("OpenVINO GenAI, its own int4 model", "", ("own", peers / PEER_MODEL)))
        for _ in range(repeat):
            for name, _label, (kind, path) in todo:
                if kind == "infopt":
                    r: dict[str, Any] | None = run_child(str(path), "openvino", threads)
                else:
                    env = {"ATTENTION_BACKEND": "SDPA"} if kind == "genai" else {}
                    r = run_peer_script(SCRIPT, [str(path)], peers, threads, env)
                if r is None:
                    raise InfoptError(
                        f"{name}: the peer's bench script failed; run it by hand to see why: "
                        f"ATTENTION_BACKEND=SDPA {peers}/venv/bin/python {script} {path}"
                    )
                runs.setdefault(name, []).append(r)
                if log:
                    log(f"{name}: ttft {r['ttft_ms']:.1f} ms, tg128 {r['tg128']:.1f} tok/s")
    rows = []
    for name, label, _ in todo:
        results = runs[name]
        rows.append(
            {
                "system": name,
                "bundle": label,
                "ttft_ms": statistics.median(r["ttft_ms"] for r in results),
                "tg128": statistics.median(r["tg128"] for r in results),
                "runs": [round(r["tg128"], 1) for r in results],
            }
        )
    for row in rows:  # infopt's rows against GenAI on the same IR
        if row["system"].startswith("infopt "):
            peer = next(r for r in rows if r["bundle"] == row["bundle"] and r is not row)
            row["tg128_vs_genai"] = row["tg128"] / peer["tg128"]
            # each round's ratio (the two ran one after the other), then their median: the
            # machine's drift between rounds cancels out
            row["tg128_vs_genai_rounds"] = statistics.median(
                a / b for a, b in zip(row["runs"], peer["runs"], strict=True)
            )
    return rows


def render(rows: list[dict[str, Any]], threads: int, repeat: int, markdown: bool) -> str:
    cols = [
        "system",
        "TTFT ms",
        "tg128 tok/s",
        "tg128 each round",
        "tg128 / GenAI same IR (of medians; median of rounds)",
    ]
    cells = [
        [
            r["system"],
            f"{r['ttft_ms']:.1f}",
            f"{r['tg128']:.1f}",
            ", ".join(f"{v:.1f}" for v in r["runs"]),
            f"{r['tg128_vs_genai']:.2f}×; {r['tg128_vs_genai_rounds']:.2f}×"
            if "tg128_vs_genai" in r
            else "",
        ]
        for r in rows
    ]
    head = f"{machine()}; {threads} threads, medians of {repeat} alternating rounds"
    return render_table(head, cols, cells, markdown)


def main(argv: list[str] | None = None) -> None:
    ap = bench_parser(__doc__, REPEAT)
    ap.add_argument("bundles", nargs="+", help="bundles with an OpenVINO artifact")
    ap.add_argument("--peers", type=Path, default=DEFAULT_PEERS)
    args = parse_bench_args(ap, argv)
    rows = parity(args.bundles, args.peers, args.repeat, args.threads, log=log_stderr)
    if args.json:
        print(json.dumps({"machine": machine(), "threads": args.threads, "rows": rows}))
    else:
        print(render(rows, args.threads, args.repeat, args.markdown))


if __name__ == "__main__":
    main()
