"""Speculative decoding: a drafter proposes k tokens, the target scores them in one forward pass.

Another step generator beside `generate_step` (as in mlx-lm), over any runtime through the
protocol's `forward` (k+1 tokens at once) and `rewind`. Acceptance follows Leviathan et al. /
Chen et al.: greedy keeps the drafts that equal the target's argmax (lossless); sampling accepts
a draft token x with probability min(1, p(x)/q(x)) and on rejection samples from
normalize(max(0, p - q)), so the output is distributed exactly as the target's own sampling.
A deterministic drafter (prompt lookup) is the case q = one-hot.

The draft length adapts to acceptance, and speculation switches itself off when it measures no
gain over the target alone. A runtime whose verify pass has a fixed shape states its
`verify_window` (tokens per pass): drafts are then at most that minus one long.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from infopt.decode.constraints import Constraint
from infopt.decode.drafters import (
    MAX_DRAFT,
    Drafter,
    check_draft_tokens,
    check_drafter,
    draw,
)
from infopt.decode.sampling import SamplingParams, apply_repetition_penalty, probabilities, sample
from infopt.runtimes import Runtime, run_prefill

PROBE_STEPS = 3  # plain decode steps timed to know the target's own speed
MIN_TRIAL = 8  # verify passes before speculation may switch itself off
RETRY_AFTER = 64  # plain tokens before a switched-off speculation is first tried again


def verify(
    drafts: Sequence[int],
    draft_probs: np.ndarray | None,
    target_logits: np.ndarray,
    params: SamplingParams,
    rng: np.random.Generator,
    seen: Sequence[int] = (),
) -> tuple[int, int]:
    """(how many drafts are accepted, the token that follows them). target_logits is
    [len(drafts) + 1, vocab]: row i scores the position of drafts[i], the last row the bonus."""
    for i, d in enumerate(drafts):
        z = apply_repetition_penalty(
            target_logits[i], [*seen, *drafts[:i]] if seen else (), params.repetition_penalty
        )
        if params.greedy:
            best = int(np.argmax(z))
            if best != d:
                return i, best
            continue
        p = probabilities(z, params)
        q_d = 1.0 if draft_probs is None else float(draft_probs[i][d])
        if rng.random() * q_d < p[d]:  # accept with probability min(1, p/q)
            continue
        residual = p.copy()
        if draft_probs is None:
            residual[d] = 0.0
        else:
            residual = np.maximum(residual - draft_probs[i], 0.0)
        total = residual.sum()
        return i, draw(residual / total, rng) if total > 0 else draw(p, rng)
    z = apply_repetition_penalty(
        target_logits[len(drafts)], [*seen, *drafts] if seen else (), params.repetition_penalty
    )
    return len(drafts), int(np.argmax(z)) if params.greedy else draw(probabilities(z, params), rng)


def _chosen(
    constraint: Constraint | None,
    logits: np.ndarray,
    params: SamplingParams,
    rng: np.random.Generator,
    seen: Sequence[int],
) -> int:
    """One token sampled from `logits`, masked by and fed to the constraint if there is one."""
    if constraint is None:
        return sample(logits, params, rng, seen)
    token = sample(constraint.mask(logits), params, rng, seen)
    constraint.accept(token)
    return token


def _masked_rows(constraint: Constraint, logits: np.ndarray, drafts: Sequence[int]) -> np.ndarray:
    """Row i of a verify pass masked by the grammar's state after drafts[:i] (the drafts are
    fed to find those states, then rolled back: the verification decides what stays). Once
    the grammar is complete only an end-of-sequence token may follow, and llguidance does not
    record one fed then, so feeding stops there and only what was fed is rolled back."""
    rows = np.empty_like(logits)
    fed = 0
    for i in range(len(drafts) + 1):
        rows[i] = constraint.mask(logits[i])
        if i < len(drafts) and not constraint.done:
            constraint.accept(drafts[i])
            fed += 1
    constraint.rollback(fed)
    return rows


@dataclass
class DraftLength:
    """The draft length with the most expected tokens per second. Model: the first draft token
    is kept with probability a1, each later one (its predecessor kept) with probability ar --
    a prompt-lookup match, or a draft in step with the target, tends to stay right once it
    is -- so a pass of k drafts yields E(k) = 1 + a1 (1 - ar^k) / (1 - ar) tokens, and costs
    k*c (drafting, in units of one target step) + 1 + b*k (scoring k+1 tokens). a1, ar, c and b
    are measured, recent passes weighing most."""

    decay: float = 0.9
    first: tuple[float, float] = (1.2, 2.0)  # decayed (kept, tried); the prior says 0.6
    later: tuple[float, float] = (1.4, 2.0)  # the prior says 0.7
    draft_s: float = 0.0  # decayed drafting seconds, and the tokens they drafted
    drafted: float = 0.0
    extra: float = 0.05  # decayed verify cost beyond one step, per draft token (prior b)
    weight: float = 1.0

    def update(
        self, drafted: int, kept: int, draft_s: float, verify_s: float, step_s: float
    ) -> None:
        d = self.decay
        if drafted:
            self.first = (d * self.first[0] + (kept > 0), d * self.first[1] + 1)
            tried = min(kept, drafted - 1)  # later positions looked at: those after a kept one
            self.later = (d * self.later[0] + max(kept - 1, 0), d * self.later[1] + tried)
            self.draft_s, self.drafted = d * self.draft_s + draft_s, d * self.drafted + drafted
            b = max(verify_s / step_s - 1.0, 0.0) / drafted
            self.extra, self.weight = d * self.extra + b, d * self.weight + 1.0

    def best(self, step_s: float) -> tuple[int, float]:
        """(k, its predicted speedup over the target alone)."""
        a1 = self.first[0] / self.first[1]
        ar = min(self.later[0] / self.later[1], 0.999)
        c = self.draft_s / self.drafted / step_s if self.drafted else 0.3
        b = self.extra / self.weight
        ks = np.arange(1, MAX_DRAFT + 1)
        gain = (1 + a1 * (1 - ar**ks) / (1 - ar)) / (ks * c + 1 + b * ks)
        i = int(np.argmax(gain))
        return int(ks[i]), float(gain[i])


@dataclass
class SpeculativeStats:
    drafter: str = ""
    drafted: int = 0  # draft tokens the target scored
    accepted: int = 0
    verify_steps: int = 0  # target forward passes over drafts
    plain_steps: int = 0  # target forward passes of one token (probes, switched off)
    draft_tokens: int = 0  # the draft length in use at the end
    switched_off: int = 0  # times speculation measured no gain and stopped
    exact: bool = True  # the target computes a k+1-token pass exactly as k+1 single steps
    # seconds and tokens of this call's plain steps (the target alone) and of its speculative
    # ones, each step timed from its start to the next one's (the caller's handling of the
    # tokens it yielded included, which speculation does not shorten)
    _plain_s: float = field(default=0.0, repr=False)
    _plain_n: int = field(default=0, repr=False)
    _spec_s: float = field(default=0.0, repr=False)
    _spec_n: int = field(default=0, repr=False)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def target_tokens_per_s(self) -> float:
        """Tokens per second of the plain steps: the target alone, measured in this call."""
        return self._plain_n / self._plain_s if self._plain_s else 0.0

    @property
    def speculative_tokens_per_s(self) -> float:
        """Tokens per second of the speculative steps."""
        return self._spec_n / self._spec_s if self._spec_s else 0.0

    @property
    def speedup(self) -> float:
        """Estimated: this call's decode tokens/s (plain and speculative steps together) over
        its plain steps' alone, i.e. how much slower the same tokens would have come without a
        draft."""
        if not self.target_tokens_per_s or not self.speculative_tokens_per_s:
            return 0.0
        rate = (self._plain_n + self._spec_n) / (self._plain_s + self._spec_s)
        return rate / self.target_tokens_per_s

    def step_done(self, seconds: float, speculative: bool, tokens: int) -> None:
        """One decode step, timed from its start to the next one's."""
        if speculative:
            self._spec_s, self._spec_n = self._spec_s + seconds, self._spec_n + tokens
        else:
            self._plain_s, self._plain_n = self._plain_s + seconds, self._plain_n + tokens

    def to_dict(self) -> dict[str, float | int | str]:
        return {
            "drafter": self.drafter,
            "drafted": self.drafted,
            "accepted": self.accepted,
            "acceptance_rate": round(self.acceptance_rate, 4),
            "verify_steps": self.verify_steps,
            "plain_steps": self.plain_steps,
            "draft_tokens": self.draft_tokens,
            "switched_off": self.switched_off,
            "exact": self.exact,
            "target_tokens_per_s": round(self.target_tokens_per_s, 2),
            "speculative_tokens_per_s": round(self.speculative_tokens_per_s, 2),
            "speedup": round(self.speedup, 3),
        }


def speculative_step(
    target: Runtime,
    drafter: Drafter,
    prompt_ids: Sequence[int],
    params: SamplingParams,
    *,
    num_draft_tokens: int,
    stats: SpeculativeStats,
    max_new_tokens: int | None = None,
    adaptive: bool = True,
    constraint: Constraint | None = None,
) -> Iterator[int]:
    """Token ids, forever (as `generate_step`), several per target pass when drafts are kept.

    The target's cache holds every token but the newest (`pending`), which goes into the next
    pass together with the drafts that follow it: one forward of k+1 tokens scores k drafts
    and yields the bonus token. Rejected drafts are rewound.

    With a `constraint` (structured output), drafts are cut at the first token the grammar
    refuses, and every verified position's logits are masked by the grammar's state at that
    position, so the output is the constrained output without a draft (greedy: token for
    token; sampled: the same distribution)."""
    check_drafter(target, drafter)
    k = check_draft_tokens(num_draft_tokens)
    stats.exact = target.batch_exact
    # a fixed-shape runtime verifies in a compiled window of k+1 tokens
    window = target.verify_window or MAX_DRAFT + 1
    rng = np.random.default_rng(params.seed)
    penalize = params.repetition_penalty != 1.0
    context = list(prompt_ids)
    target.reset()
    drafter.reset()
    logits = run_prefill(target, context)
    first = _chosen(constraint, logits, params, rng, context if penalize else ())
    context.append(first)
    yield first
    drafter.prefill(context)  # not in the timed passes: a one-off, as the target's prefill
    produced, plain_time, plain_n, off_until = 1, 0.0, 0, 0
    target_rate = 0.0  # the target's own passes per second, which the draft length is chosen by
    last: tuple[float, bool, int] | None = None  # the step before: start, speculative?, tokens
    trial_steps, trial_time, trial_tokens = 0, 0.0, 0  # since speculation was last (re)started
    length = DraftLength()
    while True:
        now = time.perf_counter()
        if last is not None:
            stats.step_done(now - last[0], last[1], last[2])
        budget = target.max_context - target.position - 1
        if max_new_tokens is not None:
            budget = min(budget, max_new_tokens - produced - 1)
        if (adaptive and plain_n < PROBE_STEPS) or produced < off_until or budget < 1:
            t0 = time.perf_counter()
            logits = target.forward(context[-1:])[-1]
            dt = time.perf_counter() - t0
            if plain_n < PROBE_STEPS:  # the target's own speed: the mean of a few steps
                plain_n += 1
                plain_time = dt if plain_n == 1 else plain_time + dt
                target_rate = plain_n / max(plain_time, 1e-9)
            stats.plain_steps += 1
            last = (now, False, 1)
            token = _chosen(constraint, logits, params, rng, context if penalize else ())
            context.append(token)
            produced += 1
            yield token
            continue
        t0 = time.perf_counter()
        drafts, q = drafter.propose(context, min(k, budget, window - 1), params, rng)
        if constraint is not None:  # drafts the grammar refuses could never be kept
            keep = constraint.valid_prefix(drafts)
            drafts, q = drafts[:keep], (q[:keep] if q is not None else None)
        t1 = time.perf_counter()
        logits = target.forward([context[-1], *drafts])
        if constraint is not None:
            logits = _masked_rows(constraint, logits, drafts)
        j, token = verify(drafts, q, logits, params, rng, context if penalize else ())
        target.rewind(len(drafts) - j)
        dt = time.perf_counter() - t0
        stats.verify_steps += 1
        stats.drafted += len(drafts)
        stats.accepted += j
        last = (now, True, j + 1)
        trial_steps += 1
        trial_time += dt
        trial_tokens += j + 1
        predicted = 1.0
        if adaptive:
            step_s = 1.0 / target_rate
            length.update(len(drafts), j, t1 - t0, t0 + dt - t1, step_s)
            k, predicted = length.best(step_s)
        stats.draft_tokens = k
        if (
            adaptive
            and trial_steps >= MIN_TRIAL
            and trial_tokens / max(trial_time, 1e-9) < target_rate
            and predicted < 1.0
        ):  # no gain, measured and predicted: plain decoding for a while, then a fresh trial
            stats.switched_off += 1  # each failed trial waits twice as long as the last
            off_until, plain_n = produced + RETRY_AFTER * 2 ** (stats.switched_off - 1), 0
            trial_steps, trial_time, trial_tokens = 0, 0.0, 0
        for t in [*drafts[:j], token]:
            if constraint is not None:  # fed as each is handed out: `done` stays in step
                constraint.accept(t)
            context.append(t)
            produced += 1
            yield t
