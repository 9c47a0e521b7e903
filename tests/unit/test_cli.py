"""`infopt-pack` run / inspect on a tiny GGUF, through click's runner."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from infopt.api import default_runtime
from infopt.cli import main


def invoke(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.stdout, result.stderr


def test_inspect_table_and_json(tiny_gguf: Path) -> None:
    code, out, _ = invoke("inspect", str(tiny_gguf))
    assert code == 0 and "architecture" in out and "llama" in out and "4 / 2 / 16" in out
    code, out, _ = invoke("inspect", str(tiny_gguf), "--json")
    info = json.loads(out)
    assert (
        info["parameters"]
        == info["config"]["vocab_size"] * 64 * 2
        + 2 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128 + 2 * 64)
        + 64
    )
    assert info["tokenizer"]["eos_token_ids"] == [2]


def test_run_json_is_greedy_and_reproducible(tiny_gguf: Path) -> None:
    args = ("run", str(tiny_gguf), "--prompt", "hello", "-n", "5", "--json", "--max-context", "64")
    code, out, _ = invoke(*args)
    assert code == 0, out
    first = json.loads(out)
    assert first["finish_reason"] in ("stop", "length") and len(first["token_ids"]) <= 5
    second = json.loads(invoke(*args)[1])
    assert (second["token_ids"], second["text"]) == (first["token_ids"], first["text"])
    assert first["stats"]["prompt_tokens"] > 0
    assert first["runtime"] == default_runtime()  # which runtime answered


def test_run_streams_text_and_prints_stats(tiny_gguf: Path) -> None:
    code, _, err = invoke(
        "run",
        str(tiny_gguf),
        "--raw",
        "-p",
        "hi",
        "-n",
        "3",
        "--temperature",
        "0.8",
        "--seed",
        "1",
        "--max-context",
        "64",
    )
    assert code == 0 and "prompt tokens" in err and "tok/s" in err
    assert err.splitlines()[-1].startswith(f"[{default_runtime()}: ")


def test_errors_are_one_line_and_exit_1(tmp_path: Path, tiny_gguf: Path) -> None:
    code, _, err = invoke("run", str(tmp_path / "missing.gguf"), "-p", "x")
    assert code == 1 and "ModelNotFoundError" in err and "Traceback" not in err
    code, _, err = invoke("run", str(tiny_gguf), "-p", "x", "--min-p", "nan")
    assert code == 1 and "min_p=nan: must be finite" in err and "Traceback" not in err
    # a value out of its option's range is a usage error (exit 2) naming the option
    code, _, err = invoke("run", str(tiny_gguf), "-p", "x", "--top-p", "2")
    assert code == 2 and "'--top-p': 2.0 is not in the range 0<x<=1" in err


def test_help_teaches() -> None:
    code, out, _ = invoke("run", "--help")
    assert code == 0 and "Examples" in out and "--max-new-tokens" in out


def test_distill_a_draft_resume_and_evaluate_it(tmp_path: Path, tiny_gguf: Path) -> None:
    out = tmp_path / "draft.safetensors"
    args = ["distill", str(tiny_gguf), "--layers", "1", "--steps", "4", "--generate", "8"]
    args += ["--seq-len", "16", "--batch-size", "2", "-o", str(out), "--json"]
    code, stdout, stderr = invoke(*args)
    assert code == 0, stderr
    first = json.loads(stdout)
    assert first["layers"] == 1 and first["resumed_from"] == 0 and first["sequences"] == 8
    assert out.exists() and Path(first["state"]).exists()
    assert first["tokens"] == 4 * 2 * 15  # 16-token windows: 15 predictions each
    code, stdout, _ = invoke(*args)  # same command again: the finished state is picked up
    assert code == 0 and json.loads(stdout)["resumed_from"] == 4
    text = tmp_path / "held_out.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 20)
    code, stdout, stderr = invoke(
        "eval", str(tiny_gguf), "--text", str(text), "--weights", str(out), "--json"
    )
    assert code == 0, stderr
    result = json.loads(stdout)
    assert result["kl"] > 0 and 0 <= result["top1"] <= 1 and result["weights"] == str(out)


def test_distill_refuses_unclear_requests(tmp_path: Path, tiny_gguf: Path) -> None:
    out = tmp_path / "x.safetensors"
    code, _, stderr = invoke("distill", str(tiny_gguf), "-o", str(out))
    assert code == 1 and "exactly one of --student" in stderr
    code, _, stderr = invoke("distill", str(tiny_gguf), "--layers", "2", "-o", str(out))
    assert code == 1 and "num_layers=2" in stderr
    code, _, stderr = invoke(
        "distill", str(tiny_gguf), "--layers", "1", "--lr", "0", "-o", str(out)
    )
    assert code == 1 and "lr=0" in stderr
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("caf\xe9 ".encode("latin-1") * 50)
    code, _, stderr = invoke(
        "distill", str(tiny_gguf), "--layers", "1", "--text", str(latin), "-o", str(out)
    )
    assert code == 1 and "training text" in stderr and "not UTF-8 text" in stderr, stderr
    assert not out.exists()


def test_a_distilled_draft_in_a_bundle_and_prompt_lookup(tmp_path: Path, tiny_gguf: Path) -> None:
    draft = tmp_path / "draft.safetensors"
    args = ["distill", str(tiny_gguf), "--layers", "1", "--steps", "2", "--generate", "4"]
    code, _, stderr = invoke(*args, "--seq-len", "16", "--batch-size", "2", "-o", str(draft))
    assert code == 0, stderr
    bundle = tmp_path / "b"
    code, stdout, stderr = invoke(
        "build", str(tiny_gguf), "-d", "host", "--runtime", "onnxruntime", "--context", "128",
        "--speculative", str(draft), "-o", str(bundle), "--json",
    )  # fmt: skip
    assert code == 0, stderr
    assert json.loads(stdout)["draft"] == "draft.safetensors"
    # the float student is stored quantized as the self-draft is, not at four bytes a weight
    section = json.loads((bundle / "manifest.json").read_text())["draft"]
    assert section["weights"]["mlp"].startswith("int4") and section["weights"]["lm_head"] == "int8"
    run = ["run", str(bundle), "--raw", "-p", "hello hello hello", "-n", "12", "--json"]
    with_draft = json.loads(invoke(*run)[1])
    spec = with_draft["stats"]["speculative"]
    assert spec["drafter"] == "ModelDrafter" and spec["drafted"] > 0
    plain = json.loads(invoke(*run, "--no-speculative")[1])
    assert plain["stats"]["speculative"] is None
    assert plain["token_ids"] == with_draft["token_ids"]
    code, stdout, _ = invoke(*run, "--no-speculative", "--draft", "ngram")
    assert code == 0 and json.loads(stdout)["stats"]["speculative"] is None
    code, stdout, _ = invoke(*run, "--draft", "ngram", "--num-draft-tokens", "3")
    assert json.loads(stdout)["stats"]["speculative"]["drafter"] == "NgramDrafter"
    code, _, stderr = invoke(*run, "--draft", "ngram", "--num-draft-tokens", "0")
    assert code == 2 and "'--num-draft-tokens': 0 is not in the range 1<=x<=16" in stderr
    # a prompt with no n-gram to look up: said so, with no speed-up claimed for nothing drafted
    nothing = ["run", str(bundle), "--raw", "-p", "a b", "-n", "1", "--draft", "ngram"]
    code, _, stderr = invoke(*nothing)
    assert code == 0 and "no drafts proposed" in stderr and "0/0" not in stderr
    # the weight file itself as a draft of the model file, with no bundle: the same tokens
    direct = ["run", str(tiny_gguf), "--runtime", "pytorch", "--raw", "-p", "hello hello hello"]
    direct += ["-n", "12", "--json"]
    code, stdout, stderr = invoke(*direct, "--draft", str(draft))
    assert code == 0, stderr
    drafted = json.loads(stdout)
    assert drafted["stats"]["speculative"]["drafter"] == "ModelDrafter"
    assert drafted["token_ids"] == json.loads(invoke(*direct)[1])["token_ids"]
    code, _, stderr = invoke("run", str(draft), "-p", "hi")  # no tokenizer: said what it is for
    assert code == 1 and "an infopt weight file (as `distill` writes)" in stderr
    code, stdout, _ = invoke("plan", "-d", "host", "-m", str(tiny_gguf), "--speculative", "self")
    assert code == 0 and "INT4 self-draft" in stdout and "+ draft" in stdout
