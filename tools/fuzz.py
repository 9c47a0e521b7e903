"""Fuzz infopt's readers with seeded mutants of sound inputs.

    python -m infopt.tools.fuzz --gguf FILE --bundle DIR --hf DIR [--readers gguf,hf,
        safetensors,manifest,archive,template] [--minutes 10] [--seed 0] [--out DIR] [--json]

Each reader gets mutants of a sound input (bit flips, bytes overwritten with edge values,
little-endian integers set to 0 / 2^31-1 / 2^32-1 / 2^63-1 / 2^64-1, truncations, chunks
deleted or repeated; for the manifest, values of the parsed JSON replaced, deleted or retyped;
for a chat template, dangerous Jinja constructs spliced in) and must answer each with success
or a typed `infopt.InfoptError`; a manifest `verify` accepts must then load and generate on
every artifact that runs here, and an archive that unpacks must give back the bundle it was
packed from (else a "wrong accept"). Cases run in a worker process with a 2 GB address-space limit
and a 10 s deadline: an untyped exception, a hang or running out of memory is a failure, and
its input is written to --out. `tests/unit/test_fuzz.py` runs a few hundred seeded cases of the
same mutators in process.

--gguf: a small GGUF to mutate (the default model's 98 MB file works, slowly); --bundle: a
verified bundle (its manifest, its safetensors weights, and a tar of it are the seeds); --hf: a
Hugging Face model folder (one of its JSON files or safetensors shards is mutated per case; a
sharded folder with an index covers more).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import random
import shutil
import struct
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

EDGE_INTS = (0, 1, 2**31 - 1, 2**32 - 1, 2**63 - 1, 2**64 - 1)
EDGE_BYTES = (0x00, 0xFF, 0x7F, 0x80, 0x20, 0x22, 0x5C)
SPLICES = (  # Jinja constructs a hostile template would use
    "{% for i in range(10**9) %}x{% endfor %}",
    "{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}",
    "{{ 'x' * 10**9 }}",
    "{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}",
    "{{ ''.__class__.__mro__ }}",
    "{{ messages[10**9] }}",
    "{{ raise_exception('no') }}",
    "{{ '%99999999999s'|format(1) }}",
    "{{ 'a'|center(10**11) }}",
    "{% set x = namespace(a=1) %}{{ x.__init__ }}",
    "{{ (1, 2) * 10**10 }}",
    "{{ messages|join(' ' * 10**9) }}",
    "{%",
    "{{",
    "}}",
)
DEADLINE_S = 10.0
RECYCLE_CASES = 50  # cases per worker process
MEMORY_BYTES = 2 << 30


def mutate_bytes(data: bytes, rng: random.Random) -> bytes:
    """One to four random byte-level edits of `data`."""
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        if not out:
            break
        kind = rng.randrange(6)
        at = rng.randrange(len(out))
        if kind == 0:
            out[at] ^= 1 << rng.randrange(8)
        elif kind == 1:
            out[at] = rng.choice(EDGE_BYTES)
        elif kind == 2 and at + 8 <= len(out):
            out[at : at + 8] = struct.pack("<Q", rng.choice(EDGE_INTS))
        elif kind == 3:
            del out[rng.randrange(len(out)) :]
        elif kind == 4:
            del out[at : at + rng.randint(1, 64)]
        else:
            out[at:at] = out[at : at + rng.randint(1, 64)]
    return bytes(out)


def mutate_header(data: bytes, rng: random.Random, header: int) -> bytes:
    """Edits inside the first `header` bytes (where the readers' structure lives) most times."""
    if rng.random() < 0.8 and len(data) > header:
        return mutate_bytes(data[:header], rng) + data[header:]
    return mutate_bytes(data, rng)


def mutate_json(value: Any, rng: random.Random) -> Any:
    """`value` with one leaf replaced, retyped or deleted, somewhere inside."""
    if isinstance(value, dict) and value and rng.random() < 0.8:
        key = rng.choice(list(value))
        if rng.random() < 0.15:
            return {k: v for k, v in value.items() if k != key}
        return {**value, key: mutate_json(value[key], rng)}
    if isinstance(value, list) and value and rng.random() < 0.8:
        i = rng.randrange(len(value))
        return [*value[:i], mutate_json(value[i], rng), *value[i + 1 :]]
    return rng.choice(
        [None, True, -1, 0, 10**12, -(2**63), 1.5, float("nan"), "", "x", "../x", "\u0000",
         "a" * 100, [], {}, [1, "x"], {"a": 1}]
    )  # fmt: skip


def mutate_template(template: str, rng: random.Random) -> str:
    at = rng.randrange(len(template) + 1)
    if rng.random() < 0.7:
        return template[:at] + rng.choice(SPLICES) + template[at:]
    end = min(len(template), at + rng.randint(1, 8))
    return template[:at] + template[end:]


class Seeds:
    """The sound inputs, read once."""

    def __init__(self, gguf: Path, bundle: Path, work: Path, hf: Path | None = None) -> None:
        from infopt.bundle import write_archive
        from infopt.bundle.manifest import MANIFEST, read_manifest
        from infopt.importers import open_model

        self.gguf = gguf.read_bytes()
        self.bundle = Path(tempfile.mkdtemp(dir=work)) / "seed-bundle"  # one per worker
        shutil.copytree(bundle, self.bundle)
        self.manifest = json.loads((self.bundle / MANIFEST).read_text())
        weights = next(
            (self.bundle / f for f in read_manifest(self.bundle)["artifacts"]["pytorch"]["files"]),
            None,
        )
        self.safetensors = weights.read_bytes() if weights else b""
        self.safetensors_name = weights.name if weights else ""
        self.tar = write_archive(self.bundle, "tar").read_bytes()
        self.tokenizer = open_model(gguf).tokenizer
        self.template = self.tokenizer.chat_template or "{{ messages[0]['content'] }}"
        self.hf = hf
        self.hf_files = sorted(
            f.name for f in (hf.iterdir() if hf else ()) if f.suffix in (".json", ".safetensors")
        )


def run_case(reader: str, seeds: Seeds, rng: random.Random, work: Path) -> tuple[str, bytes]:
    """(outcome: ok | typed | untyped: <exception>, the input), one mutant of `reader`."""
    import infopt

    case_dir = Path(tempfile.mkdtemp(dir=work))
    try:
        data, action = _prepare(reader, seeds, rng, case_dir)
        try:
            wrong = action()
        except infopt.InfoptError:
            return "typed", data
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:  # what the fuzzer looks for (a Rust panic is a BaseException)
            return f"untyped: {type(e).__name__}: {str(e)[:200]}", data
        return (f"wrong: {wrong}" if isinstance(wrong, str) else "ok"), data
    finally:
        shutil.rmtree(case_dir, ignore_errors=True)


def _prepare(
    reader: str, seeds: Seeds, rng: random.Random, case: Path
) -> tuple[bytes, Callable[[], object]]:
    import infopt
    from infopt.bundle import extract_archive, verify_bundle
    from infopt.bundle.manifest import MANIFEST
    from infopt.core.weights import load_model

    if reader == "gguf":
        data = mutate_header(seeds.gguf, rng, 16 << 10)
        path = case / "m.gguf"
        path.write_bytes(data)

        def gguf() -> None:
            source = infopt.open_model(path)
            source.tokenizer.encode("hello world")
            for _ in source.iter_weights():
                pass

        return data, gguf
    if reader == "hf":
        if seeds.hf is None:
            raise ValueError("the hf reader needs a Hugging Face folder seed (--hf)")
        folder = case / "hf"
        shutil.copytree(seeds.hf, folder)
        target = folder / rng.choice(seeds.hf_files)
        sound = target.read_bytes()
        if target.suffix == ".json" and rng.random() < 0.7:
            data = json.dumps(mutate_json(json.loads(sound), rng)).encode()
        else:
            data = mutate_header(sound, rng, 4 << 10)
        target.write_bytes(data)

        def hf() -> None:
            from infopt.core.model import load_core

            source = infopt.open_model(folder)
            source.tokenizer.encode("hello world")
            source.tokenizer.render_chat([{"role": "user", "content": "hi"}])
            load_core(source, max_context=16)

        return target.name.encode() + b"\n" + data, hf
    if reader == "safetensors":
        data = mutate_header(seeds.safetensors, rng, 4 << 10)
        path = case / "model.safetensors"
        path.write_bytes(data)
        return data, lambda: load_model(path)
    if reader == "manifest":
        bundle = case / "b"
        shutil.copytree(seeds.bundle, bundle)
        if rng.random() < 0.7:
            data = json.dumps(mutate_json(seeds.manifest, rng)).encode()
        else:
            data = mutate_bytes(json.dumps(seeds.manifest).encode(), rng)
        (bundle / MANIFEST).write_bytes(data)

        def manifest() -> str | None:
            verify_bundle(bundle)
            return _loads_as_verified(bundle, seeds.manifest)

        return data, manifest
    if reader == "archive":
        data = mutate_header(seeds.tar, rng, 8 << 10)
        path = case / "b.tar"
        path.write_bytes(data)

        def archive() -> str | None:
            extract_archive(path, case / "out")
            return _same_tree(seeds.bundle, case / "out")

        return data, archive
    if reader == "template":
        import dataclasses

        text = mutate_template(seeds.template, rng)
        tokenizer = dataclasses.replace(seeds.tokenizer, chat_template=text)
        messages = [{"role": "user", "content": "hi"}]

        def template() -> None:
            tokenizer.render_chat(messages)

        return text.encode(), template
    raise ValueError(f"reader {reader!r}: expected one of {READERS}")


def _loads_as_verified(bundle: Path, seed: dict[str, Any]) -> str | None:
    """A wrong accept, if any, of a manifest `verify` passed: every artifact that runs here
    loads and generates a token (a typed refusal now is one verify should have made). Not
    counted: refusals that depend on this machine rather than the bundle (a runtime not
    installed, a package version range the mutation changed: verify rightly leaves those to
    load)."""
    import infopt
    from infopt.bundle.manifest import read_manifest
    from infopt.runtimes.registry import target

    manifest = read_manifest(bundle)
    for runtime, entry in manifest["artifacts"].items():
        sound = seed["artifacts"].get(runtime)
        if runtime not in ("pytorch", "onnxruntime", "openvino") or not target(runtime).installed():
            continue
        if sound is None or entry.get("requires") != sound.get("requires"):
            continue
        if manifest["runtime"].get("requires") != seed["runtime"].get("requires"):
            continue
        context = min(16, manifest["kv_cache"]["max_context"], entry.get("max_context") or 16)
        try:
            model = infopt.load(bundle, runtime=runtime, max_context=context, draft=False)
            model.generate("hi", max_new_tokens=1)
        except infopt.InfoptError as e:
            return f"verify accepted it, loading on {runtime} refused it: {e}"[:300]
    return None


def _same_tree(seed: Path, out: Path) -> str | None:
    """A wrong accept, if any, of an archive that unpacked: a file that differs from the
    bundle it was packed from (the manifest's hashes should have caught it). The manifest
    itself is left out: nothing but a signature guards an unsigned manifest's own bytes, and
    what it may say is the manifest reader's to check."""
    own = {Path("manifest.json"), Path("manifest.sig")}
    mine = {p.relative_to(seed): p for p in seed.rglob("*") if p.is_file()}
    theirs = {p.relative_to(out): p for p in out.rglob("*") if p.is_file()}
    mine = {k: v for k, v in mine.items() if k not in own}
    theirs = {k: v for k, v in theirs.items() if k not in own}
    if set(mine) != set(theirs):
        return f"unpacked files {sorted(map(str, set(mine) ^ set(theirs)))[:3]} differ in name"
    changed = [str(k) for k in mine if mine[k].read_bytes() != theirs[k].read_bytes()]
    return f"unpacked {changed[:3]} differ from the packed bundle" if changed else None


READERS = ("gguf", "hf", "safetensors", "manifest", "archive", "template")


def _worker(args: tuple[str, str, str, str], jobs: Any, results: Any) -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_BYTES, MEMORY_BYTES))
    gguf, bundle, work, hf = args
    seeds = Seeds(Path(gguf), Path(bundle), Path(work), Path(hf) if hf else None)
    while True:
        job = jobs.get()
        if job is None:
            return
        reader, seed = job
        try:
            outcome, data = run_case(reader, seeds, random.Random(seed), Path(work))
        except MemoryError:
            outcome, data = "memory", b""
        results.put((reader, seed, outcome, data))


def regenerate(args: tuple[str, str, str, str], reader: str, seed: int) -> bytes:
    """The input of case `seed` (mutants are a function of the seed), made again in this
    process without reading it: what a hung or crashed worker took with it."""
    gguf, bundle, work, hf = args
    seeds = Seeds(Path(gguf), Path(bundle), Path(work), Path(hf) if hf else None)
    case = Path(tempfile.mkdtemp(dir=work))
    try:
        data, _ = _prepare(reader, seeds, random.Random(seed), case)
    finally:
        shutil.rmtree(case, ignore_errors=True)
        shutil.rmtree(seeds.bundle.parent, ignore_errors=True)
    return data


def fuzz(
    gguf: Path,
    bundle: Path,
    hf: Path | None,
    readers: list[str],
    minutes: float,
    seed: int,
    out: Path,
) -> dict[str, Counter[str]]:
    """Cases for `minutes` per reader; failing inputs under `out`; counts per outcome."""
    out.mkdir(parents=True, exist_ok=True)
    counts: dict[str, Counter[str]] = {r: Counter() for r in readers}
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="infopt-fuzz-") as work:
        args = (str(gguf), str(bundle), work, str(hf) if hf else "")
        for reader in readers:
            jobs, results = ctx.Queue(), ctx.Queue()
            proc = ctx.Process(target=_worker, args=(args, jobs, results), daemon=True)
            proc.start()
            stop, n, served = time.monotonic() + 60 * minutes, 0, 0
            while time.monotonic() < stop:
                case_seed = seed * 1_000_003 + n
                jobs.put((reader, case_seed))
                try:  # a fresh worker first reads its seeds: a minute more for that
                    _, _, outcome, data = results.get(timeout=DEADLINE_S + 60 * (served == 0))
                    served += 1
                except Exception:  # no answer in time: a hang (or a crash); a fresh worker
                    outcome = "hang" if proc.is_alive() else "crash"
                    data = regenerate(args, reader, case_seed)
                    served = RECYCLE_CASES
                if served >= RECYCLE_CASES:  # runtimes keep per-process state (OpenVINO's
                    # address space grows by megabytes with every compile, and a manifest case
                    # compiles a model): a fresh worker now and then
                    jobs.put(None)
                    proc.join(timeout=5)
                    proc.kill()
                    proc.join()
                    jobs, results = ctx.Queue(), ctx.Queue()
                    proc = ctx.Process(target=_worker, args=(args, jobs, results), daemon=True)
                    proc.start()
                    served = 0
                kind = outcome.split(":")[0]
                counts[reader][kind] += 1
                if kind not in ("ok", "typed"):
                    (out / f"{reader}-{case_seed}.bin").write_bytes(data)
                    (out / f"{reader}-{case_seed}.txt").write_text(outcome + "\n")
                n += 1
            jobs.put(None)
            proc.join(timeout=30)
            proc.kill()
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--gguf", type=Path, required=True)
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--hf", type=Path, help="a Hugging Face model folder (the hf reader's seed)")
    ap.add_argument("--readers", default=",".join(READERS))
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("fuzz-failures"))
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    readers = [r for r in args.readers.split(",") if r]
    unknown = sorted(set(readers) - set(READERS))
    if unknown:
        ap.error(f"unknown readers {unknown}; expected some of {list(READERS)}")
    if "hf" in readers and args.hf is None:
        ap.error("the hf reader needs --hf FOLDER (or leave hf out of --readers)")
    counts = fuzz(args.gguf, args.bundle, args.hf, readers, args.minutes, args.seed, args.out)
    if args.json:
        print(json.dumps({r: dict(c) for r, c in counts.items()}, indent=2))
        return
    print(f"| reader | minutes | cases | ok | typed error | untyped | hang > {DEADLINE_S:g} s | "
          "over 2 GB | crash | wrong accept |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r, c in counts.items():
        print(f"| {r} | {args.minutes:g} | {sum(c.values())} | {c['ok']} | {c['typed']} | "
              f"{c['untyped']} | {c['hang']} | {c['memory']} | {c['crash']} | "
              f"{c['wrong']} |")  # fmt: skip


if __name__ == "__main__":
    main()
