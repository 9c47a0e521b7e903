"""Speculative decoding: the acceptance rule against the target's own distribution (a test the
seed article's rule fails), greedy equivalence over every installed runtime, prompt lookup,
bundles carrying a draft, and the typed refusals."""

from __future__ import annotations

import math
import shutil
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import infopt
from infopt.bundle import verify_bundle
from infopt.bundle.build import build
from infopt.decode.drafters import DraftMismatchError, ModelDrafter, NgramDrafter
from infopt.decode.sampling import SamplingParams, probabilities
from infopt.decode.speculative import SpeculativeStats, speculative_step, verify
from infopt.errors import BundleError, InvalidArgumentError
from infopt.runtimes import Runtime
from tests.unit.test_runtime_contract import RUNTIMES

PROMPT = [{"role": "user", "content": "hello there, tell me about the sea"}]


class Distorted:
    """A draft runtime that disagrees with its model often: sharper logits plus a fixed bias
    per token id, so drafts are rejected as well as accepted."""

    def __init__(
        self, inner: Runtime, seed: int = 1, vocab_size: int | None = None, scale: float = 1.5
    ) -> None:
        self.inner = inner
        self.max_context = inner.max_context
        self.vocab_size = vocab_size or inner.vocab_size
        self.bias = np.random.default_rng(seed).normal(0, scale, inner.vocab_size)

    @property
    def position(self) -> int:
        return self.inner.position

    def forward(self, tokens: Sequence[int], only_last: bool = False) -> np.ndarray:
        return (self.inner.forward(tokens, only_last) * 1.5 + self.bias).astype(np.float32)

    def rewind(self, n: int) -> None:
        self.inner.rewind(n)

    def reset(self) -> None:
        self.inner.reset()


def chi_square_critical(df: int, z: float = 3.7) -> float:
    """Wilson-Hilferty: the chi-square quantile at about 1e-4 upper tail."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def chi_square(counts: Counter[int], p: np.ndarray, n: int) -> tuple[float, int]:
    cells = np.flatnonzero(p * n >= 5)
    observed = np.array([counts.get(int(i), 0) for i in cells], dtype=float)
    expected = p[cells] * n
    rest_o, rest_e = n - observed.sum(), n - expected.sum()
    stat = float((((observed - expected) ** 2) / expected).sum())
    if rest_e >= 5:
        stat += (rest_o - rest_e) ** 2 / rest_e
    return stat, len(cells) - (0 if rest_e >= 5 else 1)


def seed_article_rule(
    drafts: Sequence[int], q: np.ndarray, p: np.ndarray, rng: np.random.Generator
) -> int:
    """The rule DESIGN.md calls wrong: accept with probability p(x), else resample from
    max(0, q - p) (the residual the wrong way round)."""
    d = drafts[0]
    if rng.random() < p[d]:
        return d
    residual = np.maximum(q - p, 0.0)
    if residual.sum() == 0:
        residual = p
    return int(rng.choice(p.size, p=residual / residual.sum()))


def sample_many(rule: Callable[[np.random.Generator], int], n: int) -> Counter[int]:
    rng = np.random.default_rng(0)
    return Counter(rule(rng) for _ in range(n))


def test_the_acceptance_rule_keeps_the_target_distribution_and_the_wrong_one_fails() -> None:
    rng = np.random.default_rng(3)
    params = SamplingParams(temperature=1.0)
    target_logits = rng.normal(0, 2, (2, 12)).astype(np.float32)
    p = probabilities(target_logits[0], params)
    q = probabilities(rng.normal(0, 2, 12), params)  # a poor draft: far from p
    n = 20000

    def ours(r: np.random.Generator) -> int:
        d = int(r.choice(12, p=q))
        j, token = verify([d], q[None, :], target_logits, params, r)
        return d if j == 1 else token

    stat, df = chi_square(sample_many(ours, n), p, n)
    assert stat < chi_square_critical(df), (stat, df)
    wrong = sample_many(lambda r: seed_article_rule([int(r.choice(12, p=q))], q, p, r), n)
    stat, df = chi_square(wrong, p, n)
    assert stat > chi_square_critical(df), "the test must be able to fail a wrong rule"


def test_a_deterministic_draft_keeps_the_target_distribution() -> None:
    rng = np.random.default_rng(4)
    params = SamplingParams(temperature=0.8, top_k=6)
    target_logits = rng.normal(0, 2, (2, 10)).astype(np.float32)
    p = probabilities(target_logits[0], params)
    draft = int(np.argsort(p)[-2])  # prompt lookup proposes one token with certainty

    def ours(r: np.random.Generator) -> int:
        j, token = verify([draft], None, target_logits, params, r)
        return draft if j == 1 else token

    n = 20000
    stat, df = chi_square(sample_many(ours, n), p, n)
    assert stat < chi_square_critical(df), (stat, df)


def test_sampled_speculative_text_has_the_target_distribution(tiny_gguf: Path) -> None:
    """End to end on a tiny model: the first three tokens (one from the prefill, two from one
    speculative pass with k=2 and a distorted draft) against the exact joint distribution."""
    target = infopt.load(tiny_gguf, runtime="pytorch", max_context=32).runtime
    draft_model = infopt.load(tiny_gguf, runtime="pytorch", max_context=32)
    draft = Distorted(draft_model.runtime, scale=0.4)
    params = SamplingParams(temperature=1.0, top_k=3)
    prompt = [5, 17, 42, 99]
    exact: dict[tuple[int, ...], float] = {}
    target.reset()
    p1 = probabilities(target.forward(prompt)[-1], params)
    for a in np.flatnonzero(p1):
        target.reset()
        p2 = probabilities(target.forward([*prompt, int(a)])[-1], params)
        for b in np.flatnonzero(p2):
            target.reset()
            p3 = probabilities(target.forward([*prompt, int(a), int(b)])[-1], params)
            for c in np.flatnonzero(p3):
                exact[(int(a), int(b), int(c))] = float(p1[a] * p2[b] * p3[c])
    keys = sorted(exact)
    n, counts = 1500, Counter[int]()
    stats = SpeculativeStats()
    for seed in range(n):
        steps = speculative_step(
            target,
            ModelDrafter(draft),
            prompt,
            SamplingParams(temperature=1.0, top_k=3, seed=seed),
            num_draft_tokens=2,
            stats=stats,
            adaptive=False,
        )
        counts[keys.index((next(steps), next(steps), next(steps)))] += 1
    assert 0.05 < stats.acceptance_rate < 0.95  # both branches of the rule were exercised
    stat, df = chi_square(counts, np.array([exact[k] for k in keys]), n)
    assert stat < chi_square_critical(df), (stat, df)


@pytest.fixture(params=RUNTIMES)
def pair(request: pytest.FixtureRequest, load_tiny: Any) -> tuple[infopt.Model, infopt.Model]:
    target = load_tiny(request.param, 96)
    draft = load_tiny(request.param, 96)
    draft.runtime = Distorted(draft.runtime)  # type: ignore[assignment]
    target.drafter = ModelDrafter(draft.runtime)
    return target, draft


def test_greedy_speculation_gives_the_targets_own_tokens(
    pair: tuple[infopt.Model, infopt.Model],
) -> None:
    target, _ = pair
    for k in (1, 3, 6):
        plain = target.generate(PROMPT, max_new_tokens=40, stop_token_ids=[], speculative=False)
        spec = target.generate(PROMPT, max_new_tokens=40, stop_token_ids=[], num_draft_tokens=k)
        assert spec.token_ids == plain.token_ids and spec.text == plain.text
        s = spec.stats.speculative
        assert s is not None and s.drafted > 0 and 0 < s.accepted < s.drafted
        assert spec.finish_reason == "length" and len(spec.token_ids) == 40


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_eos_and_stop_strings_inside_accepted_drafts(load_tiny: Any, runtime: str) -> None:
    # a perfect draft (the target's own model): every draft is accepted, so the stop lands
    # inside an accepted run of tokens
    target = load_tiny(runtime, 96)
    twin = load_tiny(runtime, 96)
    target.drafter = ModelDrafter(twin.runtime)
    plain = target.generate(PROMPT, max_new_tokens=40, stop_token_ids=[], speculative=False)
    ids = plain.token_ids
    cut = next(i for i in range(12, len(ids)) if ids[i] not in ids[:i])  # past the probe steps
    eos = ids[cut]
    a = target.generate(PROMPT, max_new_tokens=40, stop_token_ids=[eos], speculative=False)
    b = target.generate(PROMPT, max_new_tokens=40, stop_token_ids=[eos], num_draft_tokens=8)
    assert a.token_ids == b.token_ids == plain.token_ids[: cut + 1]
    assert a.finish_reason == b.finish_reason == "stop"
    assert b.stats.speculative is not None and b.stats.speculative.drafted > 0
    assert b.stats.speculative.acceptance_rate == 1.0
    stop = plain.text[len(plain.text) // 2 : len(plain.text) // 2 + 3]
    a = target.generate(PROMPT, max_new_tokens=40, stop_token_ids=[], stop=stop, speculative=False)
    b = target.generate(PROMPT, max_new_tokens=40, stop_token_ids=[], stop=stop)
    assert a.text == b.text and stop not in b.text and b.finish_reason == "stop"


def test_a_fixed_verify_window_caps_the_draft_length(tiny_gguf: Path) -> None:
    m = infopt.load(tiny_gguf, runtime="pytorch", max_context=96)
    twin = infopt.load(tiny_gguf, runtime="pytorch", max_context=96)
    m.drafter = ModelDrafter(twin.runtime)
    passes: list[int] = []
    forward = m.runtime.forward

    def spy(tokens: Sequence[int], only_last: bool = False) -> np.ndarray:
        passes.append(len(tokens))
        return forward(tokens, only_last)

    m.runtime.forward = spy  # type: ignore[method-assign]
    m.runtime.verify_window = 3  # type: ignore[attr-defined]
    plain = m.generate(PROMPT, max_new_tokens=30, stop_token_ids=[], speculative=False)
    passes.clear()
    spec = m.generate(PROMPT, max_new_tokens=30, stop_token_ids=[], num_draft_tokens=8)
    assert spec.token_ids == plain.token_ids
    assert max(passes[1:]) == 3  # the prompt's pass aside, never more than the window


def test_prompt_lookup_copies_from_the_prompt() -> None:
    d = NgramDrafter(vocab_size=100)
    ctx = [1, 2, 3, 4, 5, 6, 9, 9, 2, 3]
    assert d.propose(ctx, 3, SamplingParams(), np.random.default_rng())[0] == [4, 5, 6]
    assert d.propose([7, 8, 9], 3, SamplingParams(), np.random.default_rng())[0] == []
    # the latest occurrence wins
    ctx = [1, 2, 7, 1, 2, 8, 5, 1, 2]
    assert d.propose(ctx, 2, SamplingParams(), np.random.default_rng())[0] == [8, 5]
    with pytest.raises(InvalidArgumentError):
        NgramDrafter(100, max_ngram=1, min_ngram=2)


def test_prompt_lookup_is_lossless(tiny_gguf: Path) -> None:
    m = infopt.load(tiny_gguf, runtime="pytorch", max_context=200)
    text = "the sea is blue and the sky is blue and the sea is deep " * 3
    plain = m.generate(text, max_new_tokens=30, stop_token_ids=[], speculative=False)
    spec = m.generate(text, max_new_tokens=30, stop_token_ids=[], speculative="ngram")
    assert spec.token_ids == plain.token_ids
    assert spec.stats.speculative is not None and spec.stats.speculative.drafted > 0
    sampled = [
        m.generate(
            text, max_new_tokens=12, temperature=0.9, seed=7, speculative=s, stop_token_ids=[]
        ).token_ids
        for s in ("ngram", "ngram")
    ]
    assert sampled[0] == sampled[1]  # a seed still makes sampled output reproducible


def test_bad_requests_are_typed_errors(tiny_gguf: Path, tiny_folder: Path) -> None:
    m = infopt.load(tiny_gguf, runtime="pytorch", max_context=64)
    for k in (0, -1, 17, 2.5, True):
        with pytest.raises(InvalidArgumentError, match="num_draft_tokens"):
            m.generate("hi", max_new_tokens=4, speculative="ngram", num_draft_tokens=k)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="no draft"):
        m.generate("hi", max_new_tokens=4, speculative=True)
    with pytest.raises(InvalidArgumentError, match="speculative="):
        m.generate("hi", max_new_tokens=4, speculative="fast")
    m.drafter = ModelDrafter(Distorted(m.runtime, vocab_size=500))
    with pytest.raises(DraftMismatchError, match="500"):
        m.generate("hi", max_new_tokens=4)
    with pytest.raises(InvalidArgumentError, match="carries no draft"):
        infopt.load(tiny_gguf, runtime="pytorch", max_context=64, draft=True)


def test_a_draft_with_another_tokenizer_is_refused(
    tiny_gguf: Path, tmp_path: Path, tiny_folder: Path
) -> None:
    import json

    other = tmp_path / "other"
    shutil.copytree(tiny_folder, other)
    tok = json.loads((other / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[100:102]
    vocab[a], vocab[b] = vocab[b], vocab[a]  # same size, different ids
    (other / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(DraftMismatchError, match="tokenizer"):
        infopt.load(tiny_gguf, runtime="pytorch", max_context=64, draft=other)


@pytest.fixture(scope="module")
def spec_bundle(tmp_path_factory: pytest.TempPathFactory, tiny_gguf: Path) -> Path:
    out = tmp_path_factory.mktemp("spec") / "b"
    build(
        tiny_gguf,
        out,
        device="host",
        runtime="onnxruntime,openvino,pytorch",
        context=128,
        speculative="self",
    )
    return out


def test_a_self_draft_bundle_speculates_on_every_runtime(spec_bundle: Path) -> None:
    manifest = verify_bundle(spec_bundle)
    draft = manifest["draft"]
    assert draft["kind"] == "model" and draft["source"] == "self-int4"
    assert draft["weights"]["attention"] == "int4-g32"
    assert sorted(draft["artifacts"]) == ["onnxruntime", "openvino", "pytorch"]
    assert all(f.startswith("draft/") for a in draft["artifacts"].values() for f in a["files"])
    assert manifest["plan"]["speculative"]["kind"] == "self"
    plain = infopt.load(spec_bundle, runtime="pytorch", draft=False).generate(
        PROMPT, max_new_tokens=24, stop_token_ids=[]
    )
    for target in ("onnxruntime", "openvino", "pytorch"):
        for draft_runtime in {target, "openvino"}:  # the same runtime, or another one
            m = infopt.load(spec_bundle, runtime=target, draft_runtime=draft_runtime)
            assert isinstance(m.drafter, ModelDrafter)
            assert m.drafter.runtime.name == draft_runtime  # type: ignore[attr-defined]
            r = m.generate(PROMPT, max_new_tokens=24, stop_token_ids=[])
            assert r.token_ids == plain.token_ids, (target, draft_runtime)
            assert r.stats.speculative is not None and r.stats.speculative.drafted > 0


def test_a_bundles_draft_runs_where_int4_is_fast_unless_told(spec_bundle: Path) -> None:
    from types import SimpleNamespace

    from infopt.bundle import Bundle

    for target in ("onnxruntime", "openvino", "pytorch"):  # on a CPU: ONNX Runtime's kernels
        m = infopt.load(spec_bundle, runtime=target, max_context=64)
        assert isinstance(m.drafter, ModelDrafter)
        assert m.drafter.runtime.name == "onnxruntime", target  # type: ignore[attr-defined]

    def draft_runtime(artifacts: dict[str, Any], name: str, device: str) -> str | None:
        bundle = Bundle(spec_bundle, {"draft": {"kind": "model", "artifacts": artifacts}})
        return bundle.draft_runtime_for(SimpleNamespace(name=name, device=device))  # type: ignore[arg-type]

    artifacts = {"pytorch": {}, "onnxruntime": {}}
    assert draft_runtime(artifacts, "pytorch", "cuda:0") == "pytorch"  # stays with it
    assert draft_runtime(artifacts, "pytorch", "cpu") == "onnxruntime"
    assert draft_runtime({"pytorch": {}}, "openvino", "cpu") == "pytorch"  # all it has


def test_a_draft_runtime_the_bundle_lacks_is_named(spec_bundle: Path) -> None:
    with pytest.raises(BundleError, match="draft_runtime"):
        infopt.load(spec_bundle, draft_runtime="tflite")


@pytest.mark.parametrize("name", ["draft/model.onnx.data", "draft/openvino_model.bin"])
def test_draft_files_are_checked(spec_bundle: Path, tmp_path: Path, name: str) -> None:
    b = tmp_path / "b"
    shutil.copytree(spec_bundle, b)
    data = bytearray((b / name).read_bytes())
    data[len(data) // 2] ^= 0x01
    (b / name).write_bytes(bytes(data))
    with pytest.raises(BundleError, match=name):
        infopt.load(b)


def test_ngram_bundles_and_int4_self_draft_refusal(tiny_gguf: Path, tmp_path: Path) -> None:
    out = tmp_path / "ngram"
    summary = build(tiny_gguf, out, device="host", runtime="pytorch", speculative="ngram")
    assert summary["draft"] == "ngram"
    m = infopt.load(out)
    assert isinstance(m.drafter, NgramDrafter)
    assert infopt.load(out, draft=False).drafter is None
    plan = tmp_path / "int4.json"
    from infopt.bundle.build import make_plan
    from infopt.importers import open_model

    p = make_plan(open_model(tiny_gguf), "host", 128, 1, None)
    p.compression["weights"] = dict.fromkeys(p.compression["weights"], "int4-g32")
    plan.write_text(p.to_json())
    with pytest.raises(InvalidArgumentError, match="INT4 already"):
        build(tiny_gguf, tmp_path / "x", plan_file=plan, runtime="pytorch", speculative="self")
    assert not (tmp_path / "x").exists()
    # int8 activations in ONNX Runtime's quantized matmuls: a several-token pass is not exact,
    # and the stats say so (greedy output may part from plain decoding)
    build(tiny_gguf, tmp_path / "q", plan_file=plan, runtime="onnxruntime", speculative="ngram")
    q = infopt.load(tmp_path / "q")
    r = q.generate("the sea the sea the sea", max_new_tokens=8, stop_token_ids=[])
    assert r.stats.speculative is not None and r.stats.speculative.exact is False
    assert m.generate("the sea", max_new_tokens=4).stats.speculative.exact is True  # type: ignore[union-attr]
    with pytest.raises(InvalidArgumentError, match="draft model path"):
        build(tiny_gguf, tmp_path / "y", device="host", speculative="fast")


def test_the_draft_length_follows_acceptance_and_cost() -> None:
    from infopt.decode.speculative import DraftLength

    good = DraftLength()
    for _ in range(30):  # cheap drafts (a tenth of a step each), every one kept
        good.update(drafted=8, kept=8, draft_s=0.8, verify_s=1.3, step_s=1.0)
    k, gain = good.best(step_s=1.0)
    assert k >= 8 and gain > 2
    poor = DraftLength()
    for _ in range(30):  # expensive drafts (half a step), the first always rejected
        poor.update(drafted=2, kept=0, draft_s=1.0, verify_s=1.1, step_s=1.0)
    k, gain = poor.best(step_s=1.0)
    assert k == 1 and gain < 1  # predicted loss: speculation may switch itself off
    runs = DraftLength()
    for i in range(30):  # prompt lookup: no cost, wrong half the time, right all along else
        runs.update(drafted=6, kept=6 if i % 2 else 0, draft_s=0.0, verify_s=1.3, step_s=1.0)
    assert runs.best(step_s=1.0)[0] >= 6


def test_the_speedup_counts_the_time_speculation_cannot_shorten(load_tiny: Any) -> None:
    """The estimate ("~Nx the model alone") times each step up to the next one, the caller's
    handling of the tokens included: a caller slower than the model's passes (a terminal, a
    network) gains nothing from several tokens a pass, and the estimate says about 1x, where
    timing the passes alone claimed several times."""
    import time

    target = load_tiny("onnxruntime", 96)
    draft = load_tiny("onnxruntime", 96)  # the same model: every draft is kept
    ids = target.tokenizer.encode("hello there, tell me about the sea")
    stats = SpeculativeStats()
    steps = speculative_step(
        target.runtime,
        ModelDrafter(draft.runtime),
        ids,
        SamplingParams(temperature=0.0),
        num_draft_tokens=4,
        stats=stats,
        max_new_tokens=40,
    )
    for _, _token in zip(range(40), steps, strict=False):
        time.sleep(0.01)  # the caller's work per token, well above a pass of the tiny model
    assert stats.accepted == stats.drafted > 0 and stats.plain_steps >= 3
    assert 0.7 < stats.speedup < 1.3, stats.to_dict()


def test_the_benchmarks_bound_on_any_draft_length_schedule() -> None:
    from infopt.tools.spec_bench import cost_for, draft_runs, fixed_speedup, oracle_speedup

    assert draft_runs([1, 2, 3, 4, 5], [1, 2, 9, 4, 5]) == [2, 1, 0, 2, 1]
    free = [1.0] * 9  # k = 0..8 drafts, scoring free
    assert oracle_speedup([0] * 40, 0.3, free) == 1.0  # never right: plain steps are cheapest
    assert oracle_speedup(draft_runs([0] * 90, [0] * 90), 0.0, free) == 9.0  # 9 tokens a pass
    # every fourth draft wrong, drafts at half a step: passes of 3 drafts (4 tokens for 2.5
    # steps) beat 1 draft (2 for 1.5), 2 (3 for 2) and longer passes that stop at the miss
    wrong = [0 if i % 4 != 3 else 1 for i in range(400)]
    runs = draft_runs([0] * 400, wrong)
    assert oracle_speedup(runs, 0.5, free) == pytest.approx(1.6)
    costly = [1.0, *(1.0 + 0.1 * k for k in range(1, 9))]  # scoring k drafts costs 0.1 k more
    assert oracle_speedup(runs, 0.5, costly) == pytest.approx(4 / 2.8)
    # without foresight: passes of 3 are the best fixed length here, longer ones waste drafts
    assert fixed_speedup(runs, 0.5, free, 3) == pytest.approx(1.6)
    assert fixed_speedup(runs, 0.5, free, 5) == pytest.approx(4 / 3.5)
    # the dearest draft that still gains 1.6x with passes of 3: 4 / (3c + 1) >= 1.6 -> c <= 0.5
    assert cost_for(runs, free, 1.6) == pytest.approx(0.5, abs=1e-6)
    assert cost_for(runs, free, 4.5) is None  # 4 tokens a pass at most: not even if drafts are free
