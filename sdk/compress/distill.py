"""Knowledge distillation on the CPU: a student model core learns a teacher's next-token
distributions, to recover a pruned or factorized model or to train a draft model.

Loss per token (Hinton et al. 2015): `alpha * T^2 * KL(teacher_T || student_T)` plus
`(1 - alpha) * cross-entropy(student, next token)`, where `_T` means softmax at temperature T.
Data are token windows [N, seq_len] from a text the user gives or from text the teacher samples
(`teacher_corpus`). Training is resumable: every `save_every` steps (and on Ctrl-C) the trainable
tensors, AdamW's moments and the step go into one safetensors state file; the batch order is a
pure function of (seed, step), so a resumed run sees exactly the batches it would have seen.
Embeddings and the LM head stay frozen (shared with the teacher's vocabulary); every other
floating-point parameter of the student trains, low-rank factors included. Quantized modules
cannot train: distill first, quantize after.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from infopt.core.model import Decoder
from infopt.core.progress import Progress, silent
from infopt.core.quant import QuantStorage
from infopt.errors import InvalidArgumentError, ModelFormatError

STATE_FORMAT = "infopt-distill-state"
OnStep = Callable[[int, float], None]  # (steps done, loss)


@dataclass(frozen=True)
class DistillConfig:
    steps: int = 200
    batch_size: int = 4
    lr: float = 2e-4
    warmup: int = 10
    temperature: float = 2.0
    alpha: float = 0.9
    weight_decay: float = 0.0
    seed: int = 0
    save_every: int = 25

    def check(self) -> None:
        for name in ("steps", "batch_size", "save_every"):
            if getattr(self, name) < 1:
                raise InvalidArgumentError(f"{name}={getattr(self, name)}: must be at least 1")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise InvalidArgumentError(f"lr={self.lr}: must be a positive number")
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise InvalidArgumentError(f"temperature={self.temperature}: must be positive")
        if not 0 <= self.alpha <= 1:
            raise InvalidArgumentError(f"alpha={self.alpha}: must be in [0, 1]")
        if self.warmup < 0 or self.weight_decay < 0:
            raise InvalidArgumentError("warmup and weight_decay must not be negative")


@dataclass
class DistillReport:
    steps: int
    resumed_from: int
    tokens: int
    seconds: float
    first_loss: float | None
    last_loss: float | None


def student_from_layers(teacher: Decoder, num_layers: int) -> Decoder:
    """A draft-model student: the teacher's embeddings, final norm and head, and `num_layers` of
    its blocks spread evenly from the first to the last (copies; the teacher is unchanged)."""
    total = teacher.spec.num_layers
    if not 1 <= num_layers < total:
        raise InvalidArgumentError(f"num_layers={num_layers}: must be in [1, {total - 1}]")
    keep = sorted({round(i * (total - 1) / max(num_layers - 1, 1)) for i in range(num_layers)})
    student = copy.deepcopy(teacher)
    student.layers = nn.ModuleList(student.layers[i] for i in keep)
    kinds = teacher.spec.layer_types
    student.spec = replace(
        teacher.spec,
        num_layers=len(keep),
        layer_types=None if kinds is None else tuple(kinds[i] for i in keep),
    )
    if student.max_len:
        student.setup_cache(student.max_len)
    return student


@torch.no_grad()
def teacher_corpus(
    teacher: Decoder,
    prefixes: Sequence[Sequence[int]],
    length: int,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 16,
    progress: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Token windows [len(prefixes), length] sampled from the teacher, each continuing its prefix
    (all prefixes the same length). Batched: one forward pass advances `batch_size` rows."""
    if not prefixes or len({len(p) for p in prefixes}) != 1 or not prefixes[0]:
        raise InvalidArgumentError("teacher_corpus needs non-empty prefixes of one length")
    start = len(prefixes[0])
    if length <= start:
        raise InvalidArgumentError(f"length={length}: must exceed the prefix length {start}")
    generator = torch.Generator().manual_seed(seed)
    rows = []
    saved = (teacher.max_len, _cache_batch(teacher))
    try:
        for lo in range(0, len(prefixes), batch_size):
            chunk = torch.tensor([list(p) for p in prefixes[lo : lo + batch_size]])
            teacher.setup_cache(length, batch=len(chunk))
            out = torch.empty(len(chunk), length, dtype=torch.long)
            out[:, :start] = chunk
            logits = teacher(chunk, torch.arange(start), length, last_only=True)
            for t in range(start, length):
                probs = torch.softmax(logits[:, -1].float() / temperature, dim=-1)
                out[:, t] = torch.multinomial(probs, 1, generator=generator)[:, 0]
                if t + 1 < length:
                    logits = teacher(out[:, t : t + 1], torch.tensor([t]), length)
            rows.append(out)
            if progress:
                progress(len(chunk))
    finally:
        if saved[0]:
            teacher.setup_cache(saved[0], batch=saved[1])
    return torch.cat(rows)


def _cache_batch(model: Decoder) -> int:
    cache = model.blocks[0].self_attn.cache
    return cache.k.shape[0] if cache is not None else 1


def trainable_parameters(student: Decoder) -> dict[str, nn.Parameter]:
    """Every floating-point parameter outside the embeddings and LM head, by name."""
    quantized = [n for n, m in student.named_modules() if isinstance(m, QuantStorage)]
    blocks = [n for n in quantized if n.startswith("layers.")]
    if blocks:
        raise InvalidArgumentError(
            f"{blocks[0]} is quantized and cannot train: distill first, then quantize"
        )
    return {
        name: p
        for name, p in student.named_parameters()
        if not name.startswith(("embed_tokens.", "lm_head.")) and p.is_floating_point()
    }


def distill_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    alpha: float,
) -> torch.Tensor:
    """Mean over tokens of alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE."""
    vocab = student_logits.shape[-1]
    s = student_logits.reshape(-1, vocab).float()
    t = teacher_logits.reshape(-1, vocab).float()
    kl = F.kl_div(
        F.log_softmax(s / temperature, -1),
        F.log_softmax(t / temperature, -1),
        log_target=True,
        reduction="batchmean",
    )
    ce = F.cross_entropy(s, labels.reshape(-1)) if alpha < 1 else s.new_zeros(())
    return alpha * temperature**2 * kl + (1 - alpha) * ce


def batch_rows(step: int, batch_size: int, n: int, seed: int) -> list[int]:
    """Rows of batch `step`: consecutive slices of one seeded permutation per epoch."""
    rows = []
    for k in range(step * batch_size, (step + 1) * batch_size):
        epoch, i = divmod(k, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        rows.append(int(perm[i]))
    return rows


def learning_rate(step: int, config: DistillConfig) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    progress = (step - config.warmup) / max(1, config.steps - config.warmup)
    return config.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def train(
    student: Decoder,
    teacher: Decoder,
    data: torch.Tensor,
    config: DistillConfig | None = None,
    state_path: str | Path | None = None,
    progress: OnStep | None = None,
) -> DistillReport:
    """Train `student` (in place) towards `teacher` on token windows `data` [N, seq_len].

    With `state_path`, an existing state file resumes the run (it must come from the same data,
    config and student shapes) and the state is saved every `config.save_every` steps, on Ctrl-C
    and at the end. While it trains, both models' KV caches are sized for training batches
    (they are given back as they were at the end): do not generate with them from `progress`."""
    config = config or DistillConfig()
    config.check()
    if data.dim() != 2 or data.shape[0] < 1 or data.shape[1] < 2:
        raise InvalidArgumentError(
            f"distillation data must be token windows [N, seq_len>=2], got {tuple(data.shape)}"
        )
    if student.spec.vocab_size != teacher.spec.vocab_size:
        raise InvalidArgumentError(
            f"student vocabulary {student.spec.vocab_size} != teacher's {teacher.spec.vocab_size}"
        )
    if int(data.max()) >= student.spec.vocab_size or int(data.min()) < 0:
        raise InvalidArgumentError("distillation data holds token ids outside the vocabulary")
    params = trainable_parameters(student)
    if not params:
        raise InvalidArgumentError("the student has no trainable parameters")
    n, seq_len = data.shape
    fingerprint = _fingerprint(data, config, params)
    optimizer = torch.optim.AdamW(
        list(params.values()), lr=config.lr, weight_decay=config.weight_decay
    )
    start = 0
    path = Path(state_path) if state_path is not None else None
    if path is not None and path.exists():
        start = _load_state(path, fingerprint, params, optimizer)
    saved = [(p, p.requires_grad) for p in student.parameters()]
    for p in student.parameters():
        p.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    student.train()
    teacher_len, student_len = teacher.max_len, student.max_len
    teacher_batch, student_batch = _cache_batch(teacher), _cache_batch(student)
    pos = torch.arange(seq_len - 1)
    first = last = None
    began, done = time.perf_counter(), start
    try:
        with torch.enable_grad():
            for step in range(start, config.steps):
                batch = data[batch_rows(step, config.batch_size, n, config.seed)]
                inputs, labels = batch[:, :-1], batch[:, 1:]
                if (teacher.max_len, _cache_batch(teacher)) != (seq_len - 1, len(batch)):
                    teacher.setup_cache(seq_len - 1, batch=len(batch))
                with torch.no_grad():
                    target = teacher(inputs, pos, seq_len - 1)
                student.setup_cache(seq_len - 1, batch=len(batch))  # fresh cache: no old graph
                loss = distill_loss(
                    student(inputs, pos, seq_len - 1),
                    target,
                    labels,
                    config.temperature,
                    config.alpha,
                )
                if not torch.isfinite(loss):
                    raise InvalidArgumentError(
                        f"distillation diverged at step {step} (loss {loss.item()}); "
                        "lower the learning rate"
                    )
                for group in optimizer.param_groups:
                    group["lr"] = learning_rate(step, config)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0)
                optimizer.step()
                done = step + 1
                last = float(loss.detach())
                first = last if first is None else first
                if path is not None and done % config.save_every == 0:
                    _save_state(path, done, fingerprint, params, optimizer)
                if progress:
                    progress(done, last)
    except KeyboardInterrupt:
        if path is not None:
            _save_state(path, done, fingerprint, params, optimizer)
        raise
    finally:
        student.eval()
        for p, flag in saved:
            p.requires_grad_(flag)
        if teacher_len:
            teacher.setup_cache(teacher_len, batch=teacher_batch)
        if student_len:
            student.setup_cache(student_len, batch=student_batch)
    if path is not None:
        _save_state(path, config.steps, fingerprint, params, optimizer)
    return DistillReport(
        steps=config.steps,
        resumed_from=start,
        tokens=(config.steps - start) * config.batch_size * (seq_len - 1),
        seconds=time.perf_counter() - began,
        first_loss=first,
        last_loss=last,
    )


def _fingerprint(data: torch.Tensor, config: DistillConfig, params: dict[str, nn.Parameter]) -> str:
    h = hashlib.sha256(data.to(torch.int64).numpy().tobytes())
    h.update(json.dumps(asdict(config), sort_keys=True).encode())
    h.update(json.dumps({k: list(p.shape) for k, p in params.items()}).encode())
    return h.hexdigest()


def _save_state(
    path: Path,
    step: int,
    fingerprint: str,
    params: dict[str, nn.Parameter],
    optimizer: torch.optim.Optimizer,
) -> None:
    from safetensors.torch import save_file

    tensors = {f"param/{k}": p.detach().contiguous() for k, p in params.items()}
    state = optimizer.state_dict()["state"]
    for i, name in enumerate(params):
        for key in ("exp_avg", "exp_avg_sq"):
            if i in state:
                tensors[f"{key}/{name}"] = state[i][key].contiguous()
    meta = {"format": STATE_FORMAT, "step": str(step), "fingerprint": fingerprint}
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _load_state(
    path: Path,
    fingerprint: str,
    params: dict[str, nn.Parameter],
    optimizer: torch.optim.Optimizer,
) -> int:
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise ModelFormatError(f"{path}: not a readable distillation state ({e})") from e
    if meta.get("format") != STATE_FORMAT:
        raise ModelFormatError(f"{path}: not an infopt distillation state file")
    if meta.get("fingerprint") != fingerprint:
        raise InvalidArgumentError(
            f"{path} belongs to another run (different data, settings or student); "
            "delete it or pass another state path to start afresh"
        )
    step = int(meta["step"])
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(tensors[f"param/{name}"])
    if step:
        state = optimizer.state_dict()
        state["state"] = {
            i: {
                "step": torch.tensor(float(step)),
                "exp_avg": tensors[f"exp_avg/{name}"],
                "exp_avg_sq": tensors[f"exp_avg_sq/{name}"],
            }
            for i, name in enumerate(params)
        }
        optimizer.load_state_dict(state)
    return step


def distill(
    teacher: str | Path | None,
    out: str | Path,
    *,
    student: str | Path | None = None,
    layers: int | None = None,
    text: str | Path | None = None,
    generate: int = 64,
    seq_len: int = 256,
    config: DistillConfig | None = None,
    state: str | Path | None = None,
    threads: int | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Train a student to imitate `teacher` (a model path; None: the default model) on the CPU
    and write it to `out` (an infopt weight file): either `student`, an infopt weight file made
    from the teacher (a pruned or low-rank model to recover), or a draft of `layers` of the
    teacher's blocks. It trains on `text` (a file), or on `generate` sequences the teacher
    samples itself. Resumable: an existing state file (`state`, default OUT.state) is continued
    exactly where it stopped. Returns a summary (out, bytes, parameters, layers, sequences,
    state, and the training report)."""
    from infopt.compress.calibration import calibration_batches, read_text
    from infopt.core.default_model import default_model_path
    from infopt.core.model import load_core
    from infopt.core.weights import load_model, save_model
    from infopt.importers import open_model

    if (student is None) == (layers is None):
        raise InvalidArgumentError("give exactly one of --student FILE or --layers N")
    if seq_len < 2:
        raise InvalidArgumentError(f"--seq-len {seq_len}: must be at least 2")
    if threads is not None and (isinstance(threads, bool) or threads < 1):
        raise InvalidArgumentError(f"threads={threads!r}: must be a positive integer")
    config = config or DistillConfig()
    config.check()
    source = open_model(teacher if teacher is not None else default_model_path())
    if seq_len > source.spec.max_position_embeddings:
        raise InvalidArgumentError(
            f"--seq-len {seq_len} exceeds TEACHER's context of "
            f"{source.spec.max_position_embeddings}"
        )
    report = progress or silent
    if threads is not None:
        torch.set_num_threads(threads)
    core = load_core(source, seq_len, device=None)  # CUDA when present
    tokenizer = source.tokenizer
    pupil = load_model(student) if student is not None else student_from_layers(core, layers or 0)
    if text is not None:
        ids = tokenizer.encode(read_text(text, "training text"))
        data = calibration_batches(ids, seq_len, 1_000_000)
    else:
        if generate < 1:
            raise InvalidArgumentError(f"--generate {generate}: must be at least 1")
        bos = tokenizer.bos_token_id
        if bos is None:
            raise InvalidArgumentError("TEACHER has no BOS token to sample from: give --text")
        written = [0]

        def on_sequence(n: int) -> None:
            written[0] += n
            report("teacher writes", written[0], generate)

        data = teacher_corpus(
            core, [[bos]] * generate, seq_len, seed=config.seed, progress=on_sequence
        )
    state_path = Path(state) if state else Path(f"{out}.state")

    def on_step(step: int, loss: float) -> None:
        report("distill", step, config.steps, f"loss {loss:.3f}")

    result = train(pupil, core, data, config, state_path, on_step)
    size = save_model(pupil, out)
    return {
        "out": str(out),
        "bytes": size,
        "parameters": sum(p.numel() for p in pupil.parameters()),
        "layers": pupil.spec.num_layers,
        "sequences": int(data.shape[0]),
        "state": str(state_path),
        **asdict(result),
    }
