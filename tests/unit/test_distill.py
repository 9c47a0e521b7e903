"""Distillation: students learn, runs resume exactly, teacher text is the teacher's."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from infopt.compress.distill import (
    DistillConfig,
    batch_rows,
    student_from_layers,
    teacher_corpus,
    train,
)
from infopt.compress.low_rank import low_rank_model
from infopt.compress.quantize import quantize_model
from infopt.core.model import Decoder, load_state_dict
from infopt.core.spec import spec_from_hf_config
from infopt.errors import InvalidArgumentError, ModelFormatError
from tests.conftest import hf_model


def teacher() -> Decoder:
    hf = hf_model("llama", tie_word_embeddings=True, num_hidden_layers=3)
    model = Decoder(spec_from_hf_config(hf.config.to_dict()))
    load_state_dict(model, hf.state_dict())
    model.setup_cache(64)
    return model.eval()


@torch.no_grad()
def mean_kl(student: Decoder, reference: Decoder, data: torch.Tensor) -> float:
    t = data.shape[1]
    for m in (student, reference):
        m.setup_cache(t, batch=len(data))
    s, r = student(data, torch.arange(t), t), reference(data, torch.arange(t), t)
    return float(
        F.kl_div(F.log_softmax(s, -1), F.log_softmax(r, -1), log_target=True, reduction="none")
        .sum(-1)
        .mean()
    )


def test_teacher_corpus_is_what_the_teacher_would_say() -> None:
    t = teacher()
    prefixes = [[0, 5], [0, 9], [0, 17]]
    greedy = teacher_corpus(t, prefixes, 12, temperature=1e-6, batch_size=2)
    assert greedy.shape == (3, 12) and greedy[:, :2].tolist() == prefixes
    with torch.no_grad():  # greedy text: every token is the argmax after the ones before it
        t.setup_cache(12, batch=3)
        logits = t(greedy, torch.arange(12), 12)
    assert torch.equal(logits[:, 1:-1].argmax(-1), greedy[:, 2:])
    a = teacher_corpus(t, prefixes, 12, seed=1)
    assert torch.equal(a, teacher_corpus(t, prefixes, 12, seed=1))
    assert not torch.equal(a, teacher_corpus(t, prefixes, 12, seed=2))
    assert t.max_len == 12  # the teacher's cache is given back as it was
    with pytest.raises(InvalidArgumentError, match="length=2"):
        teacher_corpus(t, prefixes, 2)


def test_distillation_brings_a_draft_student_closer_to_its_teacher() -> None:
    t = teacher()
    student = student_from_layers(t, 2)
    assert student.spec.num_layers == 2 and t.spec.num_layers == 3
    data = teacher_corpus(t, [[0]] * 32, 33, seed=0)
    held_out = teacher_corpus(t, [[0]] * 8, 33, seed=99)
    before = mean_kl(student, t, held_out)
    embed = student.embed_tokens.weight.clone()
    report = train(student, t, data, DistillConfig(steps=40, batch_size=8, lr=3e-3, warmup=4))
    after = mean_kl(student, t, held_out)
    assert after < 0.6 * before, (before, after)
    assert report.first_loss is not None and report.last_loss is not None
    assert report.last_loss < report.first_loss and report.tokens == 40 * 8 * 32
    assert torch.equal(student.embed_tokens.weight, embed)  # frozen
    assert student.lm_head.weight is student.embed_tokens.weight  # still tied
    assert not any(p.requires_grad for p in student.parameters())


def test_low_rank_factors_train() -> None:
    t = teacher()
    student = student_from_layers(t, 2)
    low_rank_model(student, 0.5)
    u = student.blocks[0].mlp.up_proj.u.clone()
    train(student, t, teacher_corpus(t, [[0]] * 8, 17), DistillConfig(steps=3, batch_size=4))
    assert not torch.equal(student.blocks[0].mlp.up_proj.u, u)


def test_an_interrupted_run_resumes_exactly(tmp_path: Path) -> None:
    t = teacher()
    data = teacher_corpus(t, [[0]] * 12, 17)
    config = DistillConfig(steps=6, batch_size=4, save_every=100)
    straight = student_from_layers(t, 1)
    train(straight, t, data, config)

    resumed = student_from_layers(t, 1)
    state = tmp_path / "run.state"

    def stop_at_3(step: int, _loss: float) -> None:
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(resumed, t, data, config, state, progress=stop_at_3)
    fresh = student_from_layers(t, 1)  # a new process: weights come from the state file
    report = train(fresh, t, data, config, state)
    assert report.resumed_from == 3
    for (name, a), b in zip(straight.named_parameters(), fresh.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)

    with pytest.raises(InvalidArgumentError, match="another run"):
        train(student_from_layers(t, 1), t, data[:8], config, state)
    (tmp_path / "junk").write_bytes(b"not safetensors")
    with pytest.raises(ModelFormatError, match="junk"):
        train(student_from_layers(t, 1), t, data, config, tmp_path / "junk")


def test_batches_cover_every_row_each_epoch() -> None:
    rows = [r for step in range(3) for r in batch_rows(step, 4, 12, seed=5)]
    assert sorted(rows) == list(range(12))
    assert batch_rows(1, 4, 12, seed=5) == batch_rows(1, 4, 12, seed=5)


def test_bad_requests_are_refused() -> None:
    t = teacher()
    data = torch.zeros(4, 9, dtype=torch.long)
    s = student_from_layers(t, 1)
    for config, match in [
        (DistillConfig(steps=0), "steps=0"),
        (DistillConfig(lr=-1.0), "lr=-1.0"),
        (DistillConfig(temperature=0.0), "temperature=0.0"),
        (DistillConfig(alpha=1.5), "alpha=1.5"),
    ]:
        with pytest.raises(InvalidArgumentError, match=match):
            train(s, t, data, config)
    with pytest.raises(InvalidArgumentError, match="seq_len"):
        train(s, t, data[:, :1])
    with pytest.raises(InvalidArgumentError, match="outside the vocabulary"):
        train(s, t, data + 10_000)
    with pytest.raises(InvalidArgumentError, match="num_layers=3"):
        student_from_layers(t, 3)
    quantize_model(s, {"attention": "int8", "mlp": "int8"})
    with pytest.raises(InvalidArgumentError, match="distill first"):
        train(s, t, data)
