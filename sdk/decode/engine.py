"""Continuous batching over a runtime's KV rows: the engine behind a shared `Model`.

Each request owns a row (a slot, as in llama.cpp's server) from admission to its last token.
At every step the engine admits queued requests into free rows, feeds one prefill chunk of the
oldest request still reading its prompt (so running streams keep flowing while a long prompt
is read), advances speculative requests by one token, then decodes one token for every other
running request, in one batched pass where the runtime can (`Runtime.batched`), each row at its
own position. Requests join and leave at these token boundaries; sampling, stops, seeds and
speculation stay per request.

A finished request leaves its tokens' KV in its row: the prefix cache. A new request takes the
free row whose cached tokens share the longest prefix with its prompt (the earlier turns of a
chat, a shared system prompt) and prefills only the rest; when none matches, the least recently
used row is overwritten. Its size is the rows' (`slots`), which the planner counts. A prompt
the row has just answered, repeated, prefills again the row's last pass over it (the same
tokens in the same pass, after the same KV), not only its last token: kernels that round a
several-token pass unlike a one-token one (int8 activations) would otherwise hand the repeat
other logits, and the same request, greedy or with the same seed, other text.

No thread of its own: a caller waiting for its next token drives a step when nobody else is
(the one caller of a single stream computes its own tokens, with no hand-off between threads),
and otherwise waits for the driver's step to hand it its tokens. A stream closed early, or a
client gone, frees its row at the next token boundary.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence

import numpy as np

from infopt.core.defaults import PREFILL_CHUNK
from infopt.decode.constraints import Constraint
from infopt.decode.drafters import Drafter, NgramDrafter, common_prefix
from infopt.decode.generate import Stats
from infopt.decode.sampling import SamplingParams, sample
from infopt.decode.speculative import SpeculativeStats, speculative_step
from infopt.errors import InfoptError
from infopt.runtimes import Runtime


class Request:
    """One generation: its prompt, sampling and stop conditions, and where it stands."""

    def __init__(
        self,
        prompt: Sequence[int],
        params: SamplingParams,
        max_new_tokens: int,
        stop_ids: Sequence[int],
        drafter: Drafter | None = None,
        num_draft_tokens: int = 1,
        spec_stats: SpeculativeStats | None = None,
        stats: Stats | None = None,
        constraint: Constraint | None = None,
    ) -> None:
        self.prompt = list(prompt)
        self.constraint = constraint  # structured output: masks the logits, ends the request
        self.stats = stats  # the caller's, where the prefix cache's share is recorded
        self.params = params
        self.max_new_tokens = max_new_tokens
        self.stop_ids = set(stop_ids)
        self.drafter, self.num_draft_tokens, self.spec_stats = drafter, num_draft_tokens, spec_stats
        self.rng = np.random.default_rng(params.seed)
        self.seen: list[int] = list(prompt) if params.repetition_penalty != 1.0 else []
        self.row: int | None = None
        self.fed = 0  # prompt tokens whose KV is in the row
        self.pending: int | None = None  # the newest token, sampled but not yet fed
        self.produced = 0
        self.steps: Iterator[int] | None = None  # a speculative request's token iterator
        self.out: deque[int] = deque()  # tokens for the caller
        self.done = False  # no more tokens will come
        self.cancelled = False
        self.error: BaseException | None = None

    @property
    def ended(self) -> bool:
        """Every token has been read and none will follow (not cancelled): for the caller,
        asked right after it read the last one."""
        return self.done and not self.out and not self.cancelled and self.error is None

    def choose(self, logits: np.ndarray) -> int:
        """The next token: sampled from `logits` masked by the constraint, if any."""
        if self.constraint is not None:
            logits = self.constraint.mask(logits)
        token = sample(logits, self.params, self.rng, self.seen)
        if self.constraint is not None:
            self.constraint.accept(token)
        return token

    @property
    def exclusive_draft(self) -> bool:
        """Whether its drafter keeps state another request must not share (a draft model's KV
        cache); prompt lookup drafts are made per request."""
        return self.drafter is not None and not isinstance(self.drafter, NgramDrafter)


class Engine:
    def __init__(self, runtime: Runtime, batch_wait_s: float = 0.0) -> None:
        self.runtime = runtime
        self.rows = runtime.rows
        # Dynamic batching: an idle engine given fewer requests than free rows waits this long
        # for others arriving together, so they decode as one batch from their first step
        # instead of joining one by one (0: never waits; a lone request pays the wait).
        self.batch_wait_s = batch_wait_s
        self._cond = threading.Condition()
        self._driving = False
        self._queue: deque[Request] = deque()
        self._active: list[Request] = []  # admitted, in admission order
        self._owner: list[Request | None] = [None] * self.rows
        self._cached: list[list[int]] = [[] for _ in range(self.rows)]  # tokens in each row's KV
        # each row's last completed prompt and where the pass that ended it began (its KV
        # before that point is the prompt's own): a repeat of it prefills from there again
        self._answered: list[tuple[tuple[int, ...], int] | None] = [None] * self.rows
        self._used = [0] * self.rows  # when each row was last given to a request
        self._clock = itertools.count(1)
        self._changes = runtime.changes  # the runtime's change count after this engine's last step
        self.batched_passes = 0  # decode passes over several rows at once
        self.largest_batch = 0

    def status(self) -> dict[str, int]:
        """Slots (rows), how many are busy, and how many requests wait for one."""
        with self._cond:
            busy = sum(r is not None for r in self._owner)
            return {"slots": self.rows, "busy": busy, "queued": len(self._queue)}

    def clear_cache(self) -> None:
        """Forget the prefixes the free rows hold: the next requests prefill from scratch."""
        with self._cond:
            for row in range(self.rows):
                if self._owner[row] is None:
                    self._cached[row] = []
                    self._answered[row] = None

    def tokens(self, request: Request) -> Iterator[int]:
        """The request's token ids as they come; it is queued when the first is asked for,
        and closing the iterator early (or an error) frees its row."""
        with self._cond:
            self._queue.append(request)
            self._cond.notify_all()  # an idle driver waiting for companions (batch_wait_s)
        try:
            while (token := self._next(request)) is not None:
                yield token
        finally:
            self.cancel(request)

    def cancel(self, request: Request) -> None:
        """Stop a request: out of the queue at once, out of its row at the next boundary."""
        with self._cond:
            request.cancelled = True
            if not self._driving:
                self._reap()
            self._cond.notify_all()

    def _next(self, request: Request) -> int | None:
        while True:
            with self._cond:
                while True:
                    if request.cancelled:  # what was made but not yet read is dropped
                        return None
                    if request.out:
                        return request.out.popleft()
                    if request.error is not None:
                        raise request.error
                    if request.done:
                        return None
                    if not self._driving:
                        self._driving = True
                        break
                    self._cond.wait()
            try:
                self._step()
            finally:
                with self._cond:
                    self._reap()
                    self._driving = False
                    self._cond.notify_all()

    # ---- the driver's side: only the thread that set _driving runs these ----

    def _step(self) -> None:
        rt = self.runtime
        with self._cond:
            if rt.changes != self._changes:
                # someone ran the runtime directly: what the rows hold is no longer known
                self._cached = [[] for _ in range(self.rows)]
                self._answered = [None] * self.rows
            self._reap()
            if self.batch_wait_s > 0 and not self._active and 0 < len(self._queue) < self.rows:
                deadline = time.monotonic() + self.batch_wait_s
                while len(self._queue) < self.rows and (left := deadline - time.monotonic()) > 0:
                    self._cond.wait(left)
        try:
            with self._cond:
                self._admit()
            # the requests already past their prompt: one whose prompt ends in this step
            # hands its first token out now and joins the batch at the next step
            running = [r for r in self._active if r.steps is None and r.pending is not None]
            self._prefill()
            self._speculate()
            self._decode(running)
        except BaseException as e:  # an interrupt mid-pass, a bug: no row can be trusted
            self._fail([r for r in self._active if not r.done], e)
            raise
        finally:
            self._changes = rt.changes

    def _reap(self) -> None:
        """Drop cancelled requests (with the lock held, by the driver or with none driving)."""
        for req in [r for r in self._active if r.cancelled]:
            self._free(req)
        if any(r.cancelled for r in self._queue):
            for req in [r for r in self._queue if r.cancelled]:
                req.done = True
            self._queue = deque(r for r in self._queue if not r.cancelled)

    def _admit(self) -> None:
        """Queued requests into free rows, first come first served."""
        while self._queue:
            req = self._queue[0]
            free = [r for r in range(self.rows) if self._owner[r] is None]
            if not free:
                return
            if req.exclusive_draft and any(a.exclusive_draft for a in self._active):
                return  # one draft model: its requests take turns
            self._queue.popleft()
            shared = [common_prefix(self._cached[r], req.prompt) for r in range(self.rows)]
            prompt = tuple(req.prompt)
            again = [self._repeat_start(r, prompt, shared[r]) for r in range(self.rows)]
            # a repeat goes back to the row that answered it (see `_answered`), ties aside
            row = max(free, key=lambda r: (shared[r], again[r] is not None, -self._used[r]))
            self._owner[row], req.row, self._used[row] = req, row, next(self._clock)
            self._active.append(req)
            rt = self.runtime
            rt.select(row)
            if req.drafter is not None:  # speculative decoding starts from an empty row
                rt.reset()
                self._cached[row] = []
                self._answered[row] = None
                req.steps = speculative_step(
                    rt,
                    req.drafter,
                    req.prompt,
                    req.params,
                    num_draft_tokens=req.num_draft_tokens,
                    stats=req.spec_stats or SpeculativeStats(),
                    max_new_tokens=req.max_new_tokens,
                    constraint=req.constraint,
                )
                continue
            # at least the prompt's last token is fed again (its logits give the first token);
            # a repeat, its last pass again, as it ran
            start = again[row]
            reuse = start if start is not None else min(shared[row], len(req.prompt) - 1)
            self._answered[row] = None
            if reuse:
                rt.rewind(rt.position - reuse)
            else:
                rt.reset()
            del self._cached[row][reuse:]
            req.fed = reuse
            if req.stats is not None:
                req.stats.cached_tokens = reuse

    def _repeat_start(self, row: int, prompt: tuple[int, ...], shared: int) -> int | None:
        """Where `row`'s last pass over `prompt` began, if `prompt` is the one it last answered
        and all its tokens (`shared` of them are) are still in the row: the record alone is
        not trusted. None otherwise."""
        answered = self._answered[row]
        if answered is None or answered[0] != prompt or shared != len(prompt):
            return None
        return answered[1]

    def _prefill(self) -> None:
        """One chunk of the oldest request still reading its prompt."""
        req = next((r for r in self._active if r.steps is None and r.pending is None), None)
        if req is None or req.row is None:
            return
        rt, row = self.runtime, req.row
        start = req.fed
        chunk = req.prompt[start : start + PREFILL_CHUNK]
        rt.select(row)
        try:
            logits = rt.forward(chunk, only_last=True)[-1]
        except Exception as e:
            self._fail([req], e)
            return
        self._cached[row] += chunk
        req.fed += len(chunk)
        if req.fed == len(req.prompt):
            self._answered[row] = (tuple(req.prompt), start)
            self._choose(req, logits)

    def _speculate(self) -> None:
        """One token of each speculative request (each on its own row)."""
        for req in [r for r in self._active if r.steps is not None and not r.done]:
            assert req.row is not None and req.steps is not None
            self.runtime.select(req.row)
            try:
                token = next(req.steps)
            except Exception as e:
                self._fail([req], e)
                continue
            self._emit(req, token)

    def _decode(self, running: list[Request]) -> None:
        """One token for each of `running` (requests past their prompt): one pass over rows
        0..n-1 where the runtime batches (the requests' rows moved there first), else one pass
        per row."""
        running = [r for r in running if not r.done and r.pending is not None]
        if not running:
            return
        rt = self.runtime
        fed = [r.pending for r in running]
        try:
            if rt.batched and len(running) > 1:
                for i, req in enumerate(running):
                    if req.row != i:
                        assert req.row is not None
                        self._swap(req.row, i)
                logits = rt.decode_batch([t for t in fed if t is not None])
                self.batched_passes += 1
                self.largest_batch = max(self.largest_batch, len(running))
            else:
                parts = []
                for req in running:
                    assert req.row is not None and req.pending is not None
                    rt.select(req.row)
                    parts.append(rt.forward([req.pending])[-1])
                logits = np.stack(parts)
        except Exception as e:
            self._fail(running, e)
            return
        for req, token, row_logits in zip(running, fed, logits, strict=True):
            assert req.row is not None and token is not None
            self._cached[req.row].append(token)
            self._choose(req, row_logits)

    def _choose(self, req: Request, logits: np.ndarray) -> None:
        try:
            token = req.choose(logits)
        except Exception as e:  # a constraint that cannot go on: this request's error only
            self._fail([req], e)
            return
        self._emit(req, token)

    def _swap(self, a: int, b: int) -> None:
        try:
            self.runtime.swap_rows(a, b)
        except BaseException as e:  # half swapped: neither row's KV is what its records say
            with self._cond:
                for row in (a, b):
                    self._cached[row], self._answered[row] = [], None
            self._fail([o for o in (self._owner[a], self._owner[b]) if o is not None], e)
            raise
        with self._cond:  # `clear_cache` reads these from other threads
            self._owner[a], self._owner[b] = self._owner[b], self._owner[a]
            self._cached[a], self._cached[b] = self._cached[b], self._cached[a]
            self._answered[a], self._answered[b] = self._answered[b], self._answered[a]
            self._used[a], self._used[b] = self._used[b], self._used[a]
            for row in (a, b):
                owner = self._owner[row]
                if owner is not None:
                    owner.row = row

    def _emit(self, req: Request, token: int) -> None:
        req.produced += 1
        if req.params.repetition_penalty != 1.0:
            req.seen.append(token)
        finished = (
            token in req.stop_ids
            or req.produced >= req.max_new_tokens
            or (req.constraint is not None and req.constraint.done)
        )
        req.pending = None if finished else token
        with self._cond:
            req.out.append(token)
            if finished:
                self._free(req)
            self._cond.notify_all()

    def _free(self, req: Request) -> None:
        """The request is over; its row keeps its tokens' KV for later prompts (a speculative
        request's row is emptied: what it holds is not tracked)."""
        req.done = True
        if req in self._active:
            self._active.remove(req)
        row = req.row
        if row is None or self._owner[row] is not req:
            return
        self._owner[row], req.row = None, None
        if req.steps is not None:
            req.steps = None
            # a runtime used directly since this engine's last step must still be noticed
            in_sync = self._changes == self.runtime.changes
            self.runtime.select(row)
            self.runtime.reset()
            self._cached[row] = []
            self._answered[row] = None
            if in_sync:
                self._changes = self.runtime.changes

    def _fail(self, requests: Sequence[Request], error: BaseException) -> None:
        """End `requests` with `error` (raised to each caller); their rows are emptied."""
        rt = self.runtime
        with self._cond:
            in_sync = self._changes == rt.changes  # as in `_free`
            for req in requests:
                row = req.row
                req.error = (
                    error
                    if isinstance(error, Exception)
                    else InfoptError(f"generation interrupted ({type(error).__name__})")
                )
                self._free(req)
                if row is not None:
                    rt.select(row)
                    rt.reset()
                    self._cached[row] = []
                    self._answered[row] = None
            if in_sync:
                self._changes = rt.changes
            self._cond.notify_all()
