"""`infopt-pack build`, `unpack`, `verify` and `bench`: bundles made, unpacked, checked and
measured."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from infopt.cli.output import (
    Bars,
    emit_json,
    executor_options,
    fmt_bytes,
    friendly_errors,
    json_option,
    quality_text,
    quantize_option,
    short_history,
    table,
)
from infopt.measure.speed import DEFAULT_PEERS

key_option = click.option(
    "--key",
    metavar="PUB",
    type=click.Path(exists=True, dir_okay=False),
    help="A public key (PEM): the bundle must be signed by it (see `build --sign`).",
)


@click.command()
@click.argument("model", required=False)
@click.option(
    "-d",
    "--device",
    help="Plan for this device (see `infopt-pack devices`); a comma-separated list builds one "
    "bundle per device, OUT/<device>, on --executor.",
)
@click.option(
    "--plan",
    "plan_file",
    type=click.Path(exists=True, dir_okay=False),
    help="Or: build from a plan saved by `infopt-pack plan --json` (edit it as you like).",
)
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False), help="Bundle dir.")
@click.option(
    "--runtime",
    help="Override the plan's runtime (one of `infopt-pack devices`' runtimes; a mobile "
    "device's profile picks its own); a comma-separated list puts several artifacts in the "
    "bundle (the first is the default).",
)
@quantize_option
@click.option("--context", type=click.IntRange(min=1), help="Tokens the KV cache must hold.")
@click.option(
    "--batch",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Concurrent sequences the memory plan must fit (KV-cache rows; a server's --slots).",
)
@click.option(
    "--latency-ms",
    type=click.FloatRange(min=0, min_open=True),
    help="Per-token decode latency target.",
)
@click.option(
    "--calibration",
    type=click.Path(exists=True, dir_okay=False),
    help="Calibration text: quantize with GPTQ (without it: round-to-nearest).",
)
@click.option(
    "--speculative",
    metavar="auto|self|ngram|DRAFT",
    help="Put a draft for speculative decoding in the bundle: self = the model quantized to "
    "INT4 (the model's own output at near-INT4 speed); ngram = prompt lookup, no draft model; "
    "auto = the planner's pick; DRAFT = a draft model path (GGUF, HF folder, or a student from "
    "`infopt-pack distill`) sharing the tokenizer. Default: none.",
)
@click.option(
    "--archive",
    type=click.Choice(["tar", "zip"]),
    help="Also write the bundle as one file, OUT.tar or OUT.zip (see `infopt-pack unpack`).",
)
@click.option(
    "--sign",
    "sign",
    metavar="KEY",
    type=click.Path(dir_okay=False),
    help="Sign the manifest (which holds every file's sha256) with this Ed25519 private key "
    "(PEM; `infopt-pack keygen` makes one; an encrypted key reads its passphrase from "
    "$INFOPT_KEY_PASSPHRASE). `verify --key` and `run --key` then require it.",
)
@executor_options("a fleet build's builds (several --device)")
@json_option
@friendly_errors
def build(
    model: str | None,
    device: str | None,
    plan_file: str | None,
    out: str,
    runtime: str | None,
    quantize: str | None,
    context: int | None,
    batch: int,
    latency_ms: float | None,
    calibration: str | None,
    speculative: str | None,
    archive: str | None,
    sign: str | None,
    executor: str,
    address: str | None,
    workers: int,
    as_json: bool,
) -> None:
    """Plan, compress and package MODEL into a self-contained, checksummed bundle directory.

    The bundle is written beside OUT and swapped in at the end: a failed or interrupted build
    leaves OUT as it was.

    \b
    Examples:
      infopt-pack build --device host -o smollm2-host
      infopt-pack build --device host --quantize int4 -o smollm2-int4
      infopt-pack plan --device rtx4090-24gb --json > plan.json   # edit, then:
      infopt-pack build --plan plan.json -o smollm2-4090
      infopt-pack build --device host --runtime onnxruntime,pytorch -o smollm2-ort
      infopt-pack build --device apple-ane -o smollm2-ane        # Core ML .mlpackage
      infopt-pack build --device host --runtime tflite -o smollm2-tflite
      infopt-pack build ./Qwen2-0.5B-Instruct -d host --speculative self -o qwen-spec
      infopt-pack build --device host --sign release.key -o smollm2-signed
      infopt-pack run smollm2-host --prompt "Hi"
    """
    import infopt

    options: dict[str, Any] = dict(
        plan_file=plan_file,
        runtime=runtime,
        context=context,
        batch=batch,
        latency_ms=latency_ms,
        calibration=calibration,
        speculative=speculative,
        quantize=quantize,
        sign=sign,
    )
    if device is not None and "," in device:
        _build_fleet(model, device, out, options, executor, address, workers, archive, as_json)
        return
    bars = Bars(quiet=as_json)
    try:
        summary = infopt.build(model, out, device=device, progress=bars, **options)
    finally:
        bars.close()
    if archive:
        from infopt.bundle.archive import write_archive

        packed = write_archive(out, archive)
        summary["archive"] = {"path": str(packed), "bytes": packed.stat().st_size}
    if as_json:
        emit_json(summary)
        return
    est = summary["predicted"]
    click.echo(f"bundle   {summary['bundle']} ({summary['bytes'] / 1e6:.1f} MB)")
    click.echo(f"plan     {summary['plan']}, runtime {summary['runtime']}")
    if summary["draft"]:
        click.echo(f"draft    {summary['draft']} (speculative decoding)")
    if summary["signed_by"]:
        click.echo(f"signed   by key {summary['signed_by']} (manifest.sig)")
    click.echo(
        f"predicted {fmt_bytes(est['total'])} memory, {est['decode_tok_s']:.1f} tok/s decode "
        f"({summary['context'] // 2} tokens in the cache){short_history(est)}"
    )
    click.echo(f"quality  {quality_text(summary['quality'])}")
    for f in summary["files"]:
        click.echo(f"  {f['path']:<24} {f['size'] / 1e6:>9.1f} MB  sha256 {f['sha256'][:16]}")
    click.echo(f"built in {summary['seconds']:.1f} s")
    if archive:
        click.echo(f"archive  {summary['archive']['path']}")


def _build_fleet(
    model: str | None,
    device: str,
    out: str,
    options: dict[str, Any],
    executor: str,
    address: str | None,
    workers: int,
    archive: str | None,
    as_json: bool,
) -> None:
    from infopt.bundle.fleet import build_fleet, device_list

    if archive:
        raise click.UsageError("--archive builds one bundle: give one --device")
    devices = device_list(device)
    if not as_json:
        click.echo(f"building {len(devices)} bundles on {executor}: {', '.join(devices)}", err=True)
    summary = build_fleet(
        model, out, devices, executor=executor, address=address, workers=workers, **options
    )
    if as_json:
        emit_json(summary)
    else:
        for name, built in summary["built"].items():
            click.echo(
                f"{name:<16} {built['bundle']} ({built['bytes'] / 1e6:.1f} MB), plan "
                f"{built['plan']}, runtime {built['runtime']}, {built['seconds']:.1f} s"
            )
        for name, error in summary["failed"].items():
            click.echo(f"{name:<16} failed: {error}", err=True)
    if summary["failed"]:
        raise SystemExit(1)


@click.command()
@click.argument("archive", type=click.Path(exists=True, dir_okay=False))
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False), help="Bundle dir.")
@key_option
@json_option
@friendly_errors
def unpack(archive: str, out: str, key: str | None, as_json: bool) -> None:
    """Extract a bundle archive (.tar or .zip from `build --archive`) into OUT and verify it.
    Links, devices, absolute or `..` paths and oversized archives are refused before anything
    is written; OUT is replaced only by a verified bundle (with --key: one signed by it)."""
    from infopt.bundle.archive import extract_archive
    from infopt.bundle.signing import read_signature

    manifest = extract_archive(archive, out, public_key=key)
    signature = read_signature(Path(out))
    signer = signature["key_id"] if signature else None
    if as_json:
        emit_json({"bundle": out, "ok": True, "files": manifest["files"], "signed_by": signer})
        return
    click.echo(f"{out}: ok, {len(manifest['files'])} files verified{_signed(signer)}")


def _signed(signer: str | None) -> str:
    return f", signed by key {signer}" if signer else ", not signed"


@click.command()
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.option("--runtime", help="Only this artifact (default: every runtime the bundle carries).")
@click.option("--threads", type=click.IntRange(min=1), default=2, show_default=True)
@click.option(
    "--repeat", type=click.IntRange(min=1), default=3, show_default=True, help="Alternating rounds."
)
@click.option("--compare", is_flag=True, help="Also run the peers (llama.cpp, ORT GenAI, ...).")
@click.option(
    "--peers",
    type=click.Path(file_okay=False),
    default=str(DEFAULT_PEERS),
    show_default=True,
    help="The directory `bash tools/peers/setup_peers.sh DIR` (in an infopt checkout) prepared "
    "for --compare: the peers' virtual environment, models and bench scripts.",
)
@click.option(
    "--numerics",
    type=click.Choice(["fast", "exact", "both"]),
    default="fast",
    show_default=True,
    help="Measure the runtimes' fast kernels, their exact (float32 activations) mode, or both.",
)
@json_option
@friendly_errors
def bench(
    bundle: str,
    runtime: str | None,
    threads: int,
    repeat: int,
    compare: bool,
    peers: str,
    numerics: str,
    as_json: bool,
) -> None:
    """Measure BUNDLE: TTFT (32-token prompt), prefill (512 tokens) and decode (128 greedy
    tokens) speed, per-token latency p50/p95/p99 and peak RSS, each run in a fresh process,
    --repeat rounds alternating; their medians. --compare runs the peers in the same session
    and prints ratios against the best one.

    \b
    Examples:
      infopt-pack bench smollm2-host
      infopt-pack bench smollm2-int4 --runtime onnxruntime --compare
    """
    import infopt
    from infopt.measure.speed import table_cells

    rows = infopt.bench(
        [(Path(bundle).name, bundle)],
        runtime=runtime,
        threads=threads,
        repeat=repeat,
        compare=compare,
        peers=peers,
        log=None if as_json else lambda line: click.echo(line, err=True),
        numerics=["fast", "exact"] if numerics == "both" else [numerics],
    )
    if as_json:
        emit_json(rows)
        return
    head, columns, cells = table_cells(rows, threads, repeat)
    table(columns, cells, title=head)


@click.command()
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@key_option
@json_option
@friendly_errors
def verify(bundle: str, key: str | None, as_json: bool) -> None:
    """Check every file of BUNDLE against its manifest (sizes, sha256, nothing extra or missing,
    no links, no path outside), the manifest against its schema and its claims against the
    files, a signed manifest against its signature (with --key: signed by that key, else
    refused), and read back the artifacts whose target can be read back without running them
    (a Core ML package against the inputs, windows, outputs and states the manifest gives an
    app; needs coremltools, not macOS). Exit code 1 names the first file or field that fails.

    
    Examples:
      infopt-pack verify smollm2-host
      infopt-pack verify smollm2-signed --key release.key.pub"""
    from infopt.bundle import open_bundle
    from infopt.bundle.signing import read_signature

    opened = open_bundle(bundle, public_key=key)
    files = opened.manifest["files"]
    packages = opened.read_back()
    signature = read_signature(Path(bundle))
    signer = signature["key_id"] if signature else None
    if as_json:
        emit_json(
            {
                "bundle": bundle,
                "ok": True,
                "files": files,
                "packages": packages,
                "signed_by": signer,
            }
        )
        return
    click.echo(f"{bundle}: ok, {len(files)} files verified{_signed(signer)}")
    for p in packages:
        click.echo(
            f"{p['package']}: inputs, windows {p['windows']}, outputs and states "
            f"{p['states']} match the manifest; quantized weights: "
            f"{p['quantized_weights'] or 'none'}"
        )


@click.command()
@click.argument("out", type=click.Path(dir_okay=False))
@json_option
@friendly_errors
def keygen(out: str, as_json: bool) -> None:
    """Make an Ed25519 key pair for signing bundles: OUT (the private key, PEM, readable by you
    only) and OUT.pub (the public key to hand to whoever verifies). Neither may exist.

    \b
    Examples:
      infopt-pack keygen release.key
      infopt-pack build --device host --sign release.key -o smollm2-signed
      infopt-pack verify smollm2-signed --key release.key.pub
    (`openssl genpkey -algorithm ed25519 -out release.key` makes a key that works too.)"""
    from infopt.bundle.signing import generate_key

    private, public, kid = generate_key(out)
    if as_json:
        emit_json({"private_key": str(private), "public_key": str(public), "key_id": kid})
        return
    click.echo(f"private key {private} (keep it secret)")
    click.echo(f"public key  {public}")
    click.echo(f"key id      {kid}")
