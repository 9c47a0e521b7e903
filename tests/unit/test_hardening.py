"""Bad input at the API gets a typed error naming the value, never a library's own exception
(the hardening issue's reproductions)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from infopt import InvalidArgumentError


@pytest.fixture(scope="module")
def model(load_tiny: Any) -> Any:
    return load_tiny("pytorch", 64)


@pytest.mark.parametrize(
    ("prompt", "message"),
    [
        ("hi \ud800", r"lone surrogate"),
        ([{"role": "user", "content": "hi \udfff"}], r"messages\[0\]\['content'\].*surrogate"),
        ([{"role": "user", "content": 5}], r"messages\[0\]\['content'\] = 5: expected a string"),
        ([{"role": "user", "content": None}], r"content'\] = None: expected a string"),
        ([{"role": "wizard", "content": "hi"}], r"'wizard': expected one of \['system', 'user'"),
    ],
)
def test_bad_prompts_are_refused_by_name(model: Any, prompt: Any, message: str) -> None:
    with pytest.raises(InvalidArgumentError, match=message):
        model.generate(prompt, max_new_tokens=2)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"stop": [""]}, r"stop=\[''\]: a stop string cannot be empty"),
        ({"stop": ""}, r"cannot be empty"),
        ({"stop_token_ids": [-1]}, r"-1 is not a token id of this vocabulary \(0 to \d+\)"),
        ({"stop_token_ids": [10**12]}, r"1000000000000 is not a token id"),
        ({"stop_token_ids": ["x"]}, r"'x' is not a token id"),
        ({"stop_token_ids": [True]}, r"True is not a token id"),
    ],
)
def test_bad_stops_are_refused_by_name(model: Any, settings: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidArgumentError, match=message):
        model.generate("hello", max_new_tokens=2, **settings)


def test_numpy_token_ids_are_token_ids(model: Any) -> None:
    first = model.generate("hello", max_new_tokens=3, stop_token_ids=[]).token_ids
    r = model.generate("hello", max_new_tokens=3, stop_token_ids=[np.int64(first[0])])
    assert r.token_ids == first[:1] and r.finish_reason == "stop"


HOSTILE_TEMPLATES = {  # (the template, what the refusal names)
    "{% for i in range(10**9) %}x{% endfor %}": r"range\(\) of 1,000,000,000 items",
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}": (
        r"limit of 1,000,000 operations|limit of 2 s"
    ),
    "{{ 'x' * 10**10 }}": r"repetition of 10,000,000,000",
    "{{ ['x'] * 10**10 }}": r"repetition of 10,000,000,000",
    "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}": r"RecursionError",
    "{% macro f(n) %}{% if n %}{{ f(n-1) }}{{ f(n-1) }}{% endif %}{% endmacro %}{{ f(60) }}": (
        r"limit of 1,000,000 operations|limit of 2 s"
    ),
    "{{ 'x'|center(10**10) }}": r"\|center filter",
    "{{ '%9999999999s'|format('x') }}": r"\|format filter",
    "{{ '{:>9999999999}'.format('x') }}": r"str.format\(\) that would build",
    "{{ 2 ** (10 ** 10) }}": r"a power of",
    "{% set s = 'x' * 1000000 %}{% for i in range(10) %}{{ s }}{% endfor %}": r"characters",
}


@pytest.mark.parametrize("template", HOSTILE_TEMPLATES)
def test_a_hostile_chat_template_is_refused_within_bounds(model: Any, template: str) -> None:
    import dataclasses
    import time

    from infopt import ModelFormatError

    tokenizer = dataclasses.replace(model.tokenizer, chat_template=template)
    start = time.perf_counter()
    with pytest.raises(ModelFormatError, match=HOSTILE_TEMPLATES[template]):
        tokenizer.render_chat([{"role": "user", "content": "hi"}])
    assert time.perf_counter() - start < 10


def test_a_real_chat_template_renders_as_before(model: Any) -> None:
    # the default model's own template, through every bounded operation
    from infopt.core.default_model import default_model_path
    from infopt.importers import open_model

    tokenizer = open_model(default_model_path()).tokenizer
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "x" * 100_000},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "again"},
    ]
    text = tokenizer.render_chat(messages)
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>")
    assert text.endswith("<|im_start|>user\nagain<|im_end|>\n<|im_start|>assistant\n")


LEGACY = Path(__file__).parents[1] / "data" / "legacy" / "tiny-v1"


def _set(*path: str, value: Any) -> Any:
    def edit(manifest: dict[str, Any], _: Path) -> None:
        node = manifest
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value

    return edit


BAD_BUNDLES = {  # (an edit of a sound bundle, what the refusal names)
    "no files list": (lambda m, _: m.pop("files"), r"'files' is a required property"),
    "a NUL in a path": (
        lambda m, _: m["files"].append({"path": "model.onnx\x00x", "size": 1, "sha256": "0" * 64}),
        r"'model.onnx\\x00x' leaves the bundle or is not canonical",
    ),
    "vocabulary smaller than the tokenizer's": (
        _set("model", "config", "vocab_size", value=100),
        r"384 tokens, more than the model's vocabulary",
    ),
    "a config value loading refuses (found by the fuzzer)": (
        _set("model", "config", "sliding_window", value=-1),
        r"model.config: model config: sliding_window = -1",
    ),
    "an exported artifact without its context (found by the fuzzer)": (
        lambda m, _: m["artifacts"]["openvino"].pop("max_context"),
        r"artifacts.openvino lacks max_context",
    ),
    "EOS outside the vocabulary": (
        _set("tokenizer", "eos_token_ids", value=[10**12]),
        r"tokenizer.eos_token_ids: 1000000000000 is not a token id",
    ),
    "layers changed": (
        _set("model", "config", "num_layers", value=7),
        r"plan.model.layers is 2 where the model's config says 7",
    ),
    "the plan's width changed": (
        _set("plan", "model", "hidden_size", value=99),
        r"plan.model.hidden_size is 99",
    ),
    "a runtime infopt lacks": (_set("runtime", "name", value="bogus"), r"no such runtime"),
    "an unreadable version range": (
        lambda m, _: m["artifacts"]["onnxruntime"]["requires"].__setitem__("version", "=!=x"),
        r"artifacts.onnxruntime.requires.version '=!=x': not a version range",
    ),
    "a tokenizer outside the bundle": (
        _set("tokenizer", "file", value="/etc/passwd"),
        r"tokenizer.file '/etc/passwd' is not one of the bundle's files",
    ),
    "a tokenizer beside it": (
        _set("tokenizer", "file", value="../b/tokenizer.json"),
        r"is not one of the bundle's files",
    ),
    "a negative temperature": (
        _set("generation_defaults", "temperature", value=-5),
        r"generation_defaults: temperature=-5",
    ),
    "an extra empty directory": (
        lambda _, b: (b / "extra").mkdir(),
        r"extra: a directory the manifest does not list",
    ),
}


@pytest.mark.parametrize("case", BAD_BUNDLES)
def test_a_bundle_that_contradicts_itself_is_refused_by_verify(case: str, tmp_path: Path) -> None:
    from infopt import BundleError
    from infopt.bundle import verify_bundle
    from infopt.bundle.manifest import MANIFEST

    bundle = tmp_path / "b"
    shutil.copytree(LEGACY, bundle)
    manifest = json.loads((bundle / MANIFEST).read_text())
    edit, message = BAD_BUNDLES[case]
    edit(manifest, bundle)
    (bundle / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=message):
        verify_bundle(bundle)


def test_a_manifest_nested_100000_deep_is_refused(tmp_path: Path) -> None:
    from infopt import BundleError
    from infopt.bundle import verify_bundle
    from infopt.bundle.manifest import MANIFEST

    bundle = tmp_path / "b"
    shutil.copytree(LEGACY, bundle)
    (bundle / MANIFEST).write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(BundleError, match="nested too deeply"):
        verify_bundle(bundle)


def _packed(tmp_path: Path, kind: str) -> Path:
    from infopt.bundle import write_archive

    bundle = tmp_path / "b"
    shutil.copytree(LEGACY, bundle)
    return write_archive(bundle, kind)


def test_a_truncated_archive_is_a_typed_error_and_writes_nothing(tmp_path: Path) -> None:
    from infopt import BundleError
    from infopt.bundle import extract_archive

    packed = _packed(tmp_path, "tar")
    cut = tmp_path / "cut.tar"
    cut.write_bytes(packed.read_bytes()[: packed.stat().st_size // 2])
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(BundleError, match="damaged or truncated|not .* bytes as declared"):
        extract_archive(cut, work / "out")
    assert list(work.iterdir()) == []


@pytest.mark.parametrize("compressed", [False, True])
def test_an_unlisted_or_bomb_member_is_refused_before_a_byte_is_written(
    tmp_path: Path, compressed: bool
) -> None:
    import zipfile

    from infopt import BundleError
    from infopt.bundle import extract_archive

    packed = _packed(tmp_path, "zip")
    with zipfile.ZipFile(packed, "a") as zf:  # 8 MB of zeros: 8 kB deflated
        method = zipfile.ZIP_DEFLATED if compressed else zipfile.ZIP_STORED
        zf.writestr(zipfile.ZipInfo("b/extra.bin"), b"\0" * (8 << 20), compress_type=method)
    work = tmp_path / "work"
    work.mkdir()
    message = r"more than 100×" if compressed else r"'b/extra.bin' .* not a file its manifest lists"
    with pytest.raises(BundleError, match=message):
        extract_archive(packed, work / "out")
    assert list(work.iterdir()) == []  # refused from the headers: nothing unpacked


def _rewrite(src: Path, dst: Path, changes: dict[str, Any]) -> Path:
    """`src` written again with metadata `changes`: key -> (value, GGUFValueType) to set (or
    add), or None to drop; tensors as they are."""
    import gguf

    reader = gguf.GGUFReader(src)
    writer = gguf.GGUFWriter(str(dst), reader.fields["general.architecture"].contents())
    for key, fld in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        if key in changes:
            if changes[key] is not None:
                writer.add_key_value(key, *changes[key])
            continue
        kind = fld.types[0]
        sub = fld.types[1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, fld.contents(), kind, sub_type=sub)
    for key, change in changes.items():  # keys the file lacks
        if key not in reader.fields and change is not None:
            writer.add_key_value(key, *change)
    for t in reader.tensors:
        writer.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


def _cut(src: Path, dst: Path, size: int) -> Path:
    """`src`'s first `size` bytes."""
    dst.write_bytes(src.read_bytes()[:size])
    return dst


def _patch_tensor_info(src: Path, dst: Path, name: str, field: str, value: int) -> Path:
    """`src` with one tensor's type or data offset overwritten in its header."""
    import struct

    raw = bytearray(src.read_bytes())
    at = raw.index(struct.pack("<Q", len(name)) + name.encode()) + 8 + len(name)
    (dims,) = struct.unpack_from("<I", raw, at)
    at += 4 + 8 * dims
    if field == "type":
        struct.pack_into("<I", raw, at, value)
    else:
        struct.pack_into("<Q", raw, at + 4, value)
    dst.write_bytes(bytes(raw))
    return dst


def _gguf_value(name: str) -> Any:
    import gguf

    return gguf.GGUFValueType[name]


BAD_GGUFS = {  # (how to make it from the tiny file, what the refusal names)
    "EOS id stored as a string": (
        lambda src, dst: _rewrite(
            src, dst, {"tokenizer.ggml.eos_token_id": ("x", _gguf_value("STRING"))}
        ),
        r"'tokenizer.ggml.eos_token_id' = 'x': expected an integer",
    ),
    "EOS outside the vocabulary": (
        lambda src, dst: _rewrite(
            src, dst, {"tokenizer.ggml.eos_token_id": (10**6, _gguf_value("UINT32"))}
        ),
        r"token id 1000000 \(BOS/EOS\) is outside the vocabulary",
    ),
    "KV heads that do not match the weights": (
        lambda src, dst: _rewrite(
            src, dst, {"llama.attention.head_count_kv": (4, _gguf_value("UINT32"))}
        ),
        r"tensor 'blk.0.attn_k.weight' is \[\d+, \d+\], where the metadata .* makes it",
    ),
    "a block count of two billion": (  # found by tools/fuzz: it sized a dict per layer
        lambda src, dst: _rewrite(
            src, dst, {"llama.block_count": (2130706434, _gguf_value("UINT32"))}
        ),
        r"2 blocks of tensors, where the metadata says 2130706434",
    ),
    "a negative RoPE base": (
        lambda src, dst: _rewrite(
            src, dst, {"llama.rope.freq_base": (-1.0, _gguf_value("FLOAT32"))}
        ),
        r"rope_theta must be a finite number in \(0, inf\), got -1.0",
    ),
    "a NaN norm epsilon": (
        lambda src, dst: _rewrite(
            src,
            dst,
            {"llama.attention.layer_norm_rms_epsilon": (float("nan"), _gguf_value("FLOAT32"))},
        ),
        r"rms_norm_eps must be a finite number",
    ),
    "no merges": (
        lambda src, dst: _rewrite(src, dst, {"tokenizer.ggml.merges": None}),
        r"'tokenizer.ggml.merges' is missing or empty",
    ),
    "a tensor's type relabelled": (
        lambda src, dst: _patch_tensor_info(src, dst, "token_embd.weight", "type", 1),  # F16
        r"tensor '.*' starts at byte \d+, where 'token_embd.weight' ends at \d+",
    ),
    "an offset of 2**64 - 1": (
        lambda src, dst: _patch_tensor_info(src, dst, "output_norm.weight", "offset", 2**64 - 1),
        r"tensor 'output_norm.weight' starts at byte [\d,]+, past the end of the file",
    ),
    "an alignment of 3": (
        lambda src, dst: _rewrite(src, dst, {"general.alignment": (3, _gguf_value("UINT32"))}),
        r"general.alignment = 3: must be a power of two",
    ),
    "a file cut short (an interrupted download)": (
        lambda src, dst: _cut(src, dst, src.stat().st_size * 2 // 3),
        r"tensor '.*' ends at byte [\d,]+, but the file has [\d,]+ bytes: truncated",
    ),
}


@pytest.mark.parametrize("case", BAD_GGUFS)
def test_a_damaged_gguf_is_refused_by_name_before_any_work(
    case: str, tiny_gguf: Path, tmp_path: Path
) -> None:
    import infopt
    from infopt import ModelFormatError

    make, message = BAD_GGUFS[case]
    bad = make(tiny_gguf, tmp_path / "bad.gguf")
    with pytest.raises(ModelFormatError, match=message):
        infopt.open_model(bad)  # what inspect reads
    with pytest.raises(ModelFormatError, match=message):
        infopt.load(bad, runtime="pytorch", max_context=16)


def test_a_flipped_bit_in_the_vocabulary_is_refused(tiny_gguf: Path, tmp_path: Path) -> None:
    import struct

    import gguf

    from infopt import ModelFormatError, open_model

    merges = gguf.GGUFReader(tiny_gguf).fields["tokenizer.ggml.merges"].contents()
    token = merges[0].split(" ")[0].encode()
    raw = bytearray(tiny_gguf.read_bytes())
    at = raw.index(struct.pack("<Q", len(token)) + token) + 8  # its entry in the token list
    raw[at] ^= 0x01
    bad = tmp_path / "flipped.gguf"
    bad.write_bytes(bytes(raw))
    with pytest.raises(ModelFormatError, match="names a token the vocabulary does not have"):
        open_model(bad)


def test_a_build_removes_what_killed_processes_left_and_nothing_of_a_live_one(
    tmp_path: Path,
) -> None:
    import os
    import subprocess
    import sys

    from infopt.bundle.files import owner_tag, partial_dir

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    out = tmp_path / "bundle"
    left = {
        f".bundle.partial-{dead}-0a1b2c3d": True,  # the old name: pid only, process gone
        f".bundle.partial-{dead}.123-0a1b2c3d": True,
        f".bundle.partial-{os.getpid()}.1-0a1b2c3d": True,  # this pid, reused: another start
        f".bundle.old-{dead}.5-0a1b2c3d": True,  # a replaced bundle being removed
        f".bundle.tar.partial-{dead}.7-0a1b2c3d": False,  # an archive being written (a file)
        f".bundle.partial-{owner_tag()}-0a1b2c3d": None,  # a live build: kept
        ".bundle.partial-notapid": None,  # not ours to judge: kept
    }
    for name, is_dir in left.items():
        if is_dir is False:
            (tmp_path / name).write_bytes(b"x")
        else:
            (tmp_path / name).mkdir()
            (tmp_path / name / "weights.bin").write_bytes(b"x")
    fresh = partial_dir(out)
    kept = {p.name for p in tmp_path.iterdir()} - {fresh.name}
    assert kept == {n for n, d in left.items() if d is None}


def test_what_the_fuzzer_found_is_typed(model: Any) -> None:
    # a template whose operators fail (str + list, unary + on a str), and a weight file's spec
    # missing keys or with a scaling that is not an object: TypeErrors before
    import dataclasses

    from infopt import ModelFormatError
    from infopt.core.spec import spec_from_dict

    for template in ("{{ 'a' + ['b'] }}", "{{ +'a' }}", "{{ 'a' + {} }}"):
        tokenizer = dataclasses.replace(model.tokenizer, chat_template=template)
        with pytest.raises(ModelFormatError, match="TypeError"):
            tokenizer.render_chat([{"role": "user", "content": "hi"}])
    good = model.spec.to_dict()
    with pytest.raises(ModelFormatError, match=r"missing \['hidden_size'\]"):
        spec_from_dict({k: v for k, v in good.items() if k != "hidden_size"})
    with pytest.raises(ModelFormatError, match="rope_scaling = 'x'"):
        spec_from_dict({**good, "rope_scaling": "x"})
    with pytest.raises(ModelFormatError, match="eos_token_ids = 5 is not a list"):
        spec_from_dict({**good, "eos_token_ids": 5})


def test_a_gguf_array_longer_than_the_file_is_refused_at_once(
    tiny_gguf: Path, tmp_path: Path
) -> None:
    # found by tools/fuzz: gguf's reader walked such an array for hours
    import struct
    import time

    from infopt import ModelFormatError, open_model

    key = b"tokenizer.ggml.tokens"
    raw = bytearray(tiny_gguf.read_bytes())
    at = raw.index(struct.pack("<Q", len(key)) + key) + 8 + len(key) + 4 + 4  # its count
    struct.pack_into("<Q", raw, at, 2**62)
    bad = tmp_path / "long.gguf"
    bad.write_bytes(bytes(raw))
    start = time.perf_counter()
    with pytest.raises(ModelFormatError, match=r"an array of 4611686018427387904 strings"):
        open_model(bad)
    assert time.perf_counter() - start < 5


def _edit_json(name: str, change: Any) -> Any:
    """An edit of the sound folder: `change(parsed)` returns the new content of file `name`."""

    def edit(folder: Path) -> None:
        path = folder / name
        path.write_text(json.dumps(change(json.loads(path.read_text()))))

    return edit


def _write(name: str, data: bytes) -> Any:
    return lambda folder: (folder / name).write_bytes(data)


def _with(**values: Any) -> Any:
    return lambda d: {**d, **values}


BAD_FOLDERS = {  # (an edit of a sound HF folder, what the refusal names): found by the fuzzer
    "hidden size a string": (_edit_json("config.json", _with(hidden_size="x")), "hidden_size"),
    "no heads": (_edit_json("config.json", _with(num_attention_heads=0)), "num_attention_heads"),
    "architectures not a list": (
        _edit_json("config.json", _with(architectures=5)),
        "architectures",
    ),
    "rope parameters a string": (
        _edit_json("config.json", _with(rope_parameters="x")),
        "rope_parameters",
    ),
    "llama3 rope without factors": (
        _edit_json("config.json", _with(rope_parameters={"rope_type": "llama3", "factor": 8.0})),
        "low_freq_factor",
    ),
    "eps a string": (_edit_json("config.json", _with(rms_norm_eps="x")), "rms_norm_eps"),
    "eos a string": (_edit_json("config.json", _with(eos_token_id="x")), "token id"),
    "tokenizer not a tokenizer": (_write("tokenizer.json", b'{"a": 1}'), "tokenizers library"),
    "tokenizer not UTF-8": (_write("tokenizer.json", b'{"version": "\xff"}'), "UTF-8"),
    "template a number": (
        _edit_json("tokenizer_config.json", _with(chat_template=5)),
        "chat_template",
    ),
    "sampling default out of range": (
        _edit_json("generation_config.json", _with(do_sample=True, temperature=-5)),
        "temperature",
    ),
    "generation eos a string": (
        _edit_json("generation_config.json", _with(eos_token_id=["x"])),
        "eos_token_id",
    ),
    "vocabulary smaller than the weights'": (
        _edit_json("config.json", _with(vocab_size=100)),
        r"implies \(100, 64\)",
    ),
    "billions of layers": (  # laid out before any check, it hung
        _edit_json("config.json", _with(num_hidden_layers=10**12)),
        "weights hold 2 layers",
    ),
    "a tokenizer larger than the vocabulary": (
        _edit_json(
            "tokenizer.json",
            lambda d: {
                **d,
                "added_tokens": [
                    *d["added_tokens"],
                    {
                        "id": 400,
                        "content": "<x>",
                        "single_word": False,
                        "lstrip": False,
                        "rstrip": False,
                        "normalized": False,
                        "special": True,
                    },
                ],
            },
        ),
        "more than config.json's vocab_size",
    ),
    "a tokenizer file that makes tokenizers panic": (
        _edit_json(
            "tokenizer.json",
            lambda d: {**d, "model": {**d["model"], "continuing_subword_prefix": "../x"}},
        ),
        "PanicException",
    ),
    "an index naming no file": (
        _edit_json(
            "model.safetensors.index.json",
            lambda d: {**d, "weight_map": {k: None for k in d["weight_map"]}},
        ),
        "not a file name",
    ),
    "index naming a path outside": (
        _edit_json(
            "model.safetensors.index.json",
            lambda d: {**d, "weight_map": {k: "../x.safetensors" for k in d["weight_map"]}},
        ),
        "not a file name",
    ),
    "index naming an object": (
        _edit_json(
            "model.safetensors.index.json",
            lambda d: {**d, "weight_map": {k: {"a": 1} for k in d["weight_map"]}},
        ),
        "not a file name",
    ),
}


@pytest.fixture(scope="module")
def sharded_folder(
    tmp_path_factory: pytest.TempPathFactory, tiny_hf: Any, tiny_tokenizer: Any
) -> Path:
    from tests.conftest import save_hf_folder

    folder = tmp_path_factory.mktemp("hf-shards") / "tiny"
    save_hf_folder(tiny_hf, tiny_tokenizer, folder, shard=True)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": 1}))
    return folder


@pytest.mark.parametrize("case", BAD_FOLDERS)
def test_a_damaged_hf_folder_is_refused_by_name_before_any_work(
    case: str, sharded_folder: Path, tmp_path: Path
) -> None:
    import infopt
    from infopt import ModelFormatError

    edit, message = BAD_FOLDERS[case]
    folder = tmp_path / "bad"
    shutil.copytree(sharded_folder, folder)
    edit(folder)
    with pytest.raises(ModelFormatError, match=message):
        infopt.open_model(folder)  # what inspect reads
    with pytest.raises(ModelFormatError, match=message):
        infopt.load(folder, runtime="pytorch", max_context=16)


def test_the_sound_sharded_folder_loads(sharded_folder: Path) -> None:
    import infopt

    model = infopt.load(sharded_folder, runtime="pytorch", max_context=16)
    assert len(model.generate("hello", max_new_tokens=2).token_ids) == 2


def test_api_values_of_the_wrong_kind_are_typed_errors(model: Any, tiny_gguf: Path) -> None:
    import infopt
    from infopt.bundle.build import build

    with pytest.raises(InvalidArgumentError, match="device=5"):
        infopt.load(tiny_gguf, runtime="pytorch", device=5)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="device 'tpu'"):
        infopt.load(tiny_gguf, runtime="pytorch", device="tpu")
    with pytest.raises(InvalidArgumentError, match="stop=5"):
        model.generate("hi", stop=5)
    with pytest.raises(InvalidArgumentError, match="must be integers"):
        build(tiny_gguf, "unused", device="host", context="x")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="numerics='precise'"):
        infopt.load(tiny_gguf, numerics="precise")
    with pytest.raises(InvalidArgumentError, match="computes in float32"):
        infopt.load(tiny_gguf, runtime="pytorch", dtype="bfloat16", numerics="exact")
    with pytest.raises(TypeError, match="model=123"):  # a wrong Python type stays a TypeError
        infopt.load(123)  # type: ignore[arg-type]
