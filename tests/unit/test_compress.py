"""Model-level quantization (RTN, GPTQ), evaluation, and the infopt weight file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import infopt
from infopt.compress.calibration import calibration_batches
from infopt.compress.quantize import quantize_model
from infopt.core.quant import QuantEmbedding, QuantLinear
from infopt.core.weights import load_model, save_model
from infopt.errors import InvalidArgumentError, ModelFormatError
from infopt.measure.quality import score, windows
from tests.conftest import hf_model, write_gguf

W4 = {"embeddings": "int8", "lm_head": "int8", "attention": "int4-g32", "mlp": "int4-g32"}
IDS = list(range(3, 250, 2)) * 2


@pytest.fixture
def tied_gguf(tmp_path: Path, tiny_tokenizer) -> Path:  # type: ignore[no-untyped-def]
    return write_gguf(
        hf_model("llama", tie_word_embeddings=True), tiny_tokenizer, tmp_path / "tied.gguf"
    )


def logits(model: infopt.Model, ids: list[int]) -> np.ndarray:
    model.runtime.reset()
    return model.runtime.forward(ids)


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_quantized_model_saves_and_loads_bit_exactly(
    tmp_path: Path, tied_gguf: Path, method: str
) -> None:
    m = infopt.load(tied_gguf, runtime="pytorch", max_context=256)
    fp = logits(m, IDS[:40])
    cal = calibration_batches(IDS, 64, 4) if method == "gptq" else None
    quantize_model(m.runtime.model, W4, method=method, calibration=cal)
    m.runtime.model.setup_cache(256)
    q = logits(m, IDS[:40])
    assert isinstance(m.runtime.model.embed_tokens, QuantEmbedding)
    assert isinstance(m.runtime.model.lm_head, QuantLinear)
    assert np.abs(q - fp).max() > 0  # it really changed
    assert (q.argmax(-1) == fp.argmax(-1)).mean() > 0.5
    size = save_model(m.runtime.model, tmp_path / "w.safetensors")
    loaded = load_model(tmp_path / "w.safetensors")
    loaded.setup_cache(256)
    with torch.inference_mode():
        again = loaded(torch.tensor([IDS[:40]]), torch.arange(40), 256)[0].numpy()
    np.testing.assert_array_equal(again, q)
    fp_size = save_model(
        infopt.load(tied_gguf, runtime="pytorch", max_context=256).runtime.model,
        tmp_path / "fp.safetensors",
    )
    assert size < 0.45 * fp_size


def test_bad_compression_requests(tied_gguf: Path) -> None:
    m = infopt.load(tied_gguf, runtime="pytorch", max_context=256)
    with pytest.raises(InvalidArgumentError, match="group size 128 does not divide"):
        quantize_model(m.runtime.model, {"attention": "int4-g128", "mlp": "int4-g32"})
    assert not any(isinstance(x, QuantLinear) for x in m.runtime.model.modules())  # untouched
    with pytest.raises(InvalidArgumentError, match="GPTQ needs calibration"):
        quantize_model(m.runtime.model, W4, method="gptq")
    with pytest.raises(InvalidArgumentError, match="too short: 10 tokens"):
        calibration_batches(list(range(10)), 64, 4)
    with pytest.raises(InvalidArgumentError, match="tied embeddings"):
        quantize_model(m.runtime.model, {**W4, "lm_head": "int4-g32"})
    with pytest.raises(InvalidArgumentError, match="group size 128 does not divide .* 64"):
        quantize_model(m.runtime.model, {**W4, "embeddings": "int4-g128", "lm_head": "int4-g128"})
    assert not any(isinstance(x, QuantLinear | QuantEmbedding) for x in m.runtime.model.modules())
    with pytest.raises(InvalidArgumentError, match="method 'awq'"):
        quantize_model(m.runtime.model, W4, method="awq")


def test_weight_file_format_is_checked(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ModelFormatError, match="format None"):
        load_model(tmp_path / "other.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ModelFormatError, match="not a readable safetensors"):
        load_model(tmp_path / "junk.safetensors")


def test_windows_score_every_position_once() -> None:
    for n, window, stride in [(10, 4, 2), (100, 32, 32), (7, 16, 8), (50, 8, 3)]:
        scored = [p for _, end, first in windows(n, window, stride) for p in range(first, end)]
        assert scored == list(range(1, n))
        assert all(end - start <= window for start, end, _ in windows(n, window, stride))
    with pytest.raises(InvalidArgumentError, match="stride"):
        list(windows(10, 4, 5))


def test_evaluate_against_itself_and_a_quantized_copy(tied_gguf: Path) -> None:
    ref = infopt.load(tied_gguf, runtime="pytorch", max_context=64)
    same = score(ref.runtime, IDS[:150], ref.runtime, window=64, stride=32)
    assert same.kl == pytest.approx(0, abs=1e-9) and same.top1 == 1.0
    assert same.perplexity == pytest.approx(same.reference_perplexity)
    # perplexity from the definition, one window (every position once)
    lp = torch.log_softmax(torch.tensor(logits(ref, IDS[:40]), dtype=torch.float64), -1)
    nll = -lp[torch.arange(39), torch.tensor(IDS[1:40])].mean()
    assert score(ref.runtime, IDS[:40], window=64).perplexity == pytest.approx(
        float(torch.exp(nll)), rel=1e-6
    )
    q = infopt.load(tied_gguf, runtime="pytorch", max_context=64)
    quantize_model(q.runtime.model, {**W4, "attention": "int4-g16", "mlp": "int4-g16"})
    worse = score(q.runtime, IDS[:150], ref.runtime, window=64, stride=32)
    assert worse.kl > 0 and worse.top1 < 1.0


def test_cli_eval_plain_and_quantized(tmp_path: Path, tied_gguf: Path) -> None:
    import json

    from click.testing import CliRunner

    from infopt.cli import main
    from tests.conftest import CORPUS

    text = tmp_path / "held_out.txt"
    text.write_text(" ".join(CORPUS) * 3)
    cal = tmp_path / "cal.txt"
    cal.write_text(" ".join(reversed(CORPUS)) * 20)
    runner = CliRunner()
    plain = runner.invoke(
        main, ["eval", str(tied_gguf), "--text", str(text), "--window", "64", "--json"]
    )
    assert plain.exit_code == 0, plain.output
    assert json.loads(plain.stdout)["perplexity"] > 1
    quant = runner.invoke(
        main,
        [
            "eval",
            str(tied_gguf),
            "--text",
            str(text),
            "--window",
            "64",
            "--quantize",
            "int4-g32",
            "--calibration",
            str(cal),
            "--json",
        ],
    )
    assert quant.exit_code == 0, quant.output
    result = json.loads(quant.stdout)
    assert result["kl"] > 0 and 0 < result["top1"] < 1 and result["method"] == "gptq"
    assert type(infopt.evaluate(tied_gguf, text, window=64, quantize="int8")["kl"]) is float
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    bad = runner.invoke(main, ["eval", str(tied_gguf), "--text", str(empty)])
    assert bad.exit_code == 1 and "empty" in bad.stderr
    # counts a window cannot score with are refused by name, never taken as the default
    for option, value in (("--window", "1"), ("--stride", "0"), ("--max-tokens", "1")):
        bad = runner.invoke(main, ["eval", str(tied_gguf), "--text", str(text), option, value])
        assert bad.exit_code == 2 and option in bad.stderr, (option, bad.output)
        name = option[2:].replace("-", "_")
        with pytest.raises(InvalidArgumentError, match=f"{name}={value}: expected an integer"):
            infopt.evaluate(tied_gguf, text, **{name: int(value)})
    with pytest.raises(InvalidArgumentError, match="evaluation text '.*nope.txt': No such file"):
        infopt.evaluate(tied_gguf, tmp_path / "nope.txt")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(InvalidArgumentError, match="not UTF-8 text"):
        infopt.evaluate(tied_gguf, tmp_path / "latin1.txt")


@pytest.mark.parametrize("with_calibration", [False, True])
def test_structured_mlp_pruning_really_shrinks_the_model(
    tmp_path: Path, tied_gguf: Path, with_calibration: bool
) -> None:
    from infopt.compress.prune import prune_mlp_channels

    m = infopt.load(tied_gguf, runtime="pytorch", max_context=256)
    core = m.runtime.model
    before = sum(p.numel() for p in core.parameters())
    cal = calibration_batches(IDS, 64, 4) if with_calibration else None
    keep = prune_mlp_channels(core, 0.5, cal)
    assert keep == 64 and core.spec.intermediate_size == 64  # 128 -> 64 channels
    after = sum(p.numel() for p in core.parameters())
    assert before - after == 2 * 3 * 64 * 64  # 2 blocks x (gate, up, down) x 64 x hidden 64
    assert after == core.spec.num_params
    core.setup_cache(256)
    out = logits(m, IDS[:20])
    assert out.shape == (20, 384) and np.isfinite(out).all()
    save_model(core, tmp_path / "p.safetensors")
    loaded = load_model(tmp_path / "p.safetensors")  # shapes come back from the saved spec
    assert loaded.spec.intermediate_size == 64
    loaded.setup_cache(256)
    with torch.inference_mode():
        np.testing.assert_array_equal(
            loaded(torch.tensor([IDS[:20]]), torch.arange(20), 256)[0].numpy(), out
        )
    with pytest.raises(InvalidArgumentError, match="fraction=1.5"):
        prune_mlp_channels(core, 1.5)


def test_structured_head_pruning_rewires_exactly(tmp_path: Path, tied_gguf: Path) -> None:
    """Heads whose o_proj columns are zero contribute nothing: removing them (a whole KV group,
    then one query head per group) must leave the logits unchanged, and the model smaller."""
    from infopt.compress.prune import prune_attention_heads

    m = infopt.load(tied_gguf, runtime="pytorch", max_context=256)
    core = m.runtime.model
    d = core.spec.head_dim  # tiny: 4 query heads over 2 KV heads, head_dim 16
    with torch.no_grad():
        for blk in core.blocks:  # KV group 0 (query heads 0, 1) and query head 3 are dead
            blk.self_attn.o_proj.weight[:, 0 : 2 * d] = 0
            blk.self_attn.o_proj.weight[:, 3 * d : 4 * d] = 0
    ref = logits(m, IDS[:30])
    before = sum(p.numel() for p in core.parameters())
    cal = calibration_batches(IDS, 64, 4)
    assert prune_attention_heads(core, kv_heads=1, calibration=cal) == (2, 1)
    np.testing.assert_allclose(logits(m, IDS[:30]), ref, atol=1e-4)
    assert prune_attention_heads(core, heads_per_group=1) == (1, 1)
    out = logits(m, IDS[:30])
    np.testing.assert_allclose(out, ref, atol=1e-4)
    after = sum(p.numel() for p in core.parameters())
    assert after == core.spec.num_params
    assert before - after == 2 * (2 * 3 * 64 * d + 2 * 64 * d)  # per block: q+o of 3 heads, k+v
    assert core.blocks[0].self_attn.cache.k.shape[1] == 1  # the KV cache shrank too
    save_model(core, tmp_path / "h.safetensors")
    loaded = load_model(tmp_path / "h.safetensors")
    assert (loaded.spec.num_heads, loaded.spec.num_kv_heads) == (1, 1)
    loaded.setup_cache(256)
    with torch.inference_mode():
        np.testing.assert_array_equal(
            loaded(torch.tensor([IDS[:30]]), torch.arange(30), 256)[0].numpy(), out
        )


def test_structured_pruning_refusals(tied_gguf: Path) -> None:
    from infopt.compress.prune import prune_attention_heads, prune_mlp_channels

    core = infopt.load(tied_gguf, runtime="pytorch", max_context=256).runtime.model
    with pytest.raises(InvalidArgumentError, match="kv_heads=3"):
        prune_attention_heads(core, kv_heads=3)
    with pytest.raises(InvalidArgumentError, match="heads_per_group=0"):
        prune_attention_heads(core, heads_per_group=0)
    with pytest.raises(InvalidArgumentError, match="nothing to remove"):
        prune_attention_heads(core, kv_heads=2)
    quantize_model(core, W4)
    with pytest.raises(InvalidArgumentError, match="prune first"):
        prune_attention_heads(core, kv_heads=1)
    with pytest.raises(InvalidArgumentError, match="prune first"):
        prune_mlp_channels(core, 0.5)
    assert core.spec.num_heads == 4  # nothing changed
