"""Where a search's (or a fleet build's) independent jobs run: a local process pool, or Ray.

Both take a module-level function and a list of job dicts and report each job once, with its
result or the error of its last attempt. A job whose attempt fails (an exception, or its worker
process killed) runs once more; a result is reported as it arrives, so a caller that caches
results keeps them even when the run is cut short.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import traceback
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any

from infopt.errors import InvalidArgumentError, MemoryBudgetError, RuntimeNotAvailableError

ATTEMPTS = 2  # the first try and one retry
EXECUTORS = ("local", "ray")

Job = dict[str, Any]


@dataclass
class Outcome:
    job: Job
    result: dict[str, Any] | None
    error: str | None  # the last attempt's, when every attempt failed
    attempts: int | None  # None: the executor does not tell


@dataclass(frozen=True)
class Needs:
    """What one job takes: CPUs, and bytes of memory (from the planner's memory model)."""

    cpus: int = 1
    memory: float = 0.0
    gpus: float = 0.0


def make_executor(kind: str, *, workers: int = 1, address: str | None = None) -> Any:
    if kind == "local":
        return LocalExecutor(workers)
    if kind == "ray":
        return RayExecutor(address)
    raise InvalidArgumentError(f"executor {kind!r}: expected one of {list(EXECUTORS)}")


class LocalExecutor:
    """A pool of `workers` processes (spawned: no state shared with the caller)."""

    name = "local"

    def __init__(self, workers: int = 1) -> None:
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise InvalidArgumentError(f"workers={workers!r}: expected an integer >= 1")
        self.workers = workers

    def run(
        self, fn: Callable[[Job], dict[str, Any]], jobs: list[Job], needs: Needs = Needs()
    ) -> Iterator[Outcome]:
        """A dead worker breaks the whole pool and fails every job in it, so a death is charged
        only to a job that ran alone: the jobs a broken pool held run again one at a time."""
        context = multiprocessing.get_context("spawn")
        failures = [0] * len(jobs)
        errors: list[str | None] = [None] * len(jobs)
        batch: list[int] = list(range(len(jobs)))
        alone: list[int] = []
        while batch or alone:
            together = bool(batch)
            todo, batch = (batch, []) if together else ([alone.pop(0)], [])
            workers = self.workers if together else 1
            pool = ProcessPoolExecutor(max_workers=workers, mp_context=context)
            with _stopped_when_abandoned(pool):
                running = {pool.submit(fn, jobs[i]): i for i in todo}
                while running:
                    done, _ = wait(running, return_when=FIRST_COMPLETED)
                    for future in done:
                        i = running.pop(future)
                        try:
                            result = future.result()
                        except BrokenProcessPool as e:
                            if together:  # whose death it was is unknown: each runs alone next
                                alone.append(i)
                                continue
                            errors[i] = f"worker process died ({e})"
                        except Exception as e:  # the job's own error
                            errors[i] = _error_text(e)
                        else:
                            yield Outcome(jobs[i], result, None, failures[i] + 1)
                            continue
                        failures[i] += 1
                        if failures[i] < ATTEMPTS:
                            alone.append(i)
                        else:
                            yield Outcome(jobs[i], None, errors[i], failures[i])


@contextlib.contextmanager
def _stopped_when_abandoned(pool: ProcessPoolExecutor) -> Iterator[None]:
    """Shut `pool` down when done; when the consumer stops early (an exception, Ctrl-C, the
    generator closed), stop its workers at once instead of running the queued jobs out."""
    try:
        yield
    except BaseException:
        # ProcessPoolExecutor has no public way to stop running work before Python 3.14's
        # terminate_workers(): its processes are terminated directly
        for process in list((getattr(pool, "_processes", None) or {}).values()):
            process.terminate()
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown(wait=True)


class RayExecutor:
    """Each job a Ray task on the cluster at `address` ("auto": the running one; None: a local
    instance started here), asking for the CPUs, GPUs and memory the planner says it needs;
    results come back through Ray's object store. A task whose worker dies or that raises is
    retried once by Ray itself."""

    name = "ray"

    def __init__(self, address: str | None = None) -> None:
        try:
            import ray
        except ImportError:
            raise RuntimeNotAvailableError(
                "the Ray executor needs Ray: pip install 'infopt[ray]'"
            ) from None
        self.ray = ray
        self.address = address

    def run(
        self, fn: Callable[[Job], dict[str, Any]], jobs: list[Job], needs: Needs = Needs()
    ) -> Iterator[Outcome]:
        ray = self.ray
        if not ray.is_initialized():
            ray.init(address=self.address, include_dashboard=False, log_to_driver=False)
        options: dict[str, Any] = {
            "num_cpus": needs.cpus,
            "max_retries": ATTEMPTS - 1,  # a dead worker
            "retry_exceptions": True,  # and the job's own error: once more, as the local pool
        }
        if needs.gpus:
            options["num_gpus"] = needs.gpus
        if needs.memory:
            largest = max(
                (n["Resources"].get("memory", 0.0) for n in ray.nodes() if n.get("Alive")),
                default=0.0,
            )
            if needs.memory > largest:  # Ray would keep such a task pending for ever
                raise MemoryBudgetError(
                    f"a job needs {needs.memory / 1e9:.1f} GB of memory; the largest node of "
                    f"this Ray cluster offers {largest / 1e9:.1f} GB"
                )
            options["memory"] = int(needs.memory)
        task = ray.remote(fn).options(**options)
        refs = {task.remote(job): i for i, job in enumerate(jobs)}
        pending = list(refs)
        try:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                ref = done[0]
                i = refs[ref]
                try:
                    result = ray.get(ref)
                except Exception as e:
                    yield Outcome(jobs[i], None, _error_text(e), ATTEMPTS)
                else:
                    yield Outcome(jobs[i], result, None, None)
        finally:
            for ref in pending:  # stopped early: the cluster stops what is left
                ray.cancel(ref, force=True)


def _error_text(e: BaseException) -> str:
    last = traceback.format_exception_only(type(e), e)[-1].strip()
    return last[:500]
