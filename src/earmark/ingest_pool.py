"""The process pool behind ``earmark.ingest``: a bounded queue of analyses, results handed back
to the writing parent in the order of the inputs, and a crashed worker costing the one file
that crashed it.

Kept apart from ``earmark.ingest`` (which reads the inputs and writes the samples) because the
scheduling is a concept of its own:
- Results are handed over in input order, not completion order: a sample's id in the knowledge
  base is its insertion rank, and ties between equally good matches are ordered by it, so with
  completion order two builds of the same collection gave case documents that differed in the
  order of tied evidence. A result that finishes before an earlier, slower one waits (bounded
  by ``held_per_worker``); the workers go on with later inputs meanwhile.
- When a parser crash kills a worker, every analysis in flight fails with
  ``BrokenProcessPool`` and the culprit is unknown, so those jobs are re-run one at a time in a
  new pool, and a job that breaks the pool while running alone (or twice) failed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Generic, TypeVar

Job = TypeVar("Job")
Result = TypeVar("Result")


@dataclass(slots=True)
class _Attempt(Generic[Job]):
    job: Job
    rank: int  # position among the jobs read: results are handed over in this order
    crashes: int = 0


def run_in_pool(
    jobs: Iterator[Job],
    submit: Callable[[ProcessPoolExecutor, Job], Future[Result]],
    finish: Callable[[Job, Result], None],
    crashed: Callable[[Job], None],
    *,
    workers: int,
    queued_per_worker: int,
    held_per_worker: int,
) -> None:
    """Run every job through ``submit`` in ``workers`` processes and hand each result to
    ``finish`` in this process, in the order of ``jobs``; ``crashed`` gets, in its turn, each
    job that killed its worker. At most ``workers * queued_per_worker`` jobs are submitted at
    a time and ``workers * held_per_worker`` finished results wait for an earlier one (both
    held in memory); ``jobs`` is read lazily."""
    suspects: list[_Attempt[Job]] = []  # in flight when a worker died: re-run one at a time
    unsent: list[_Attempt[Job]] = []  # refused by a pool already broken: re-run, not suspected
    held: dict[int, Callable[[], None]] = {}  # by rank: finished, waiting for earlier ranks
    read = delivered = 0  # ranks: jobs read so far, and the next one to hand over
    pool = ProcessPoolExecutor(max_workers=workers)
    pending: dict[Future[Result], _Attempt[Job]] = {}

    def settle(rank: int, hand_over: Callable[[], None]) -> None:
        nonlocal delivered
        held[rank] = hand_over
        while delivered in held:
            held.pop(delivered)()
            delivered += 1

    try:
        while True:
            capacity = 1 if suspects else workers * queued_per_worker
            while len(pending) < capacity and not unsent:
                if suspects:
                    attempt = suspects.pop(0)
                else:
                    # The earliest unfinished job is pending or a suspect, so waiting for
                    # results instead of reading on always lets a held one go.
                    if len(held) >= workers * held_per_worker:
                        break
                    job = next(jobs, None)
                    if job is None:
                        break
                    attempt, read = _Attempt(job, read), read + 1
                try:
                    pending[submit(pool, attempt.job)] = attempt
                except BrokenProcessPool:  # broke since the last wait; this job never ran
                    unsent.append(attempt)
            if not pending and not unsent:
                return
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            broken: list[_Attempt[Job]] = []
            for future in done:
                attempt = pending.pop(future)
                try:
                    result = future.result()
                except BrokenProcessPool:
                    broken.append(attempt)
                    continue
                settle(attempt.rank, _hand_over(finish, attempt.job, result))
            if broken or unsent:
                in_flight = broken + list(pending.values())
                pending.clear()
                pool.shutdown(wait=True, cancel_futures=True)
                pool = ProcessPoolExecutor(max_workers=workers)
                suspects.extend(unsent)
                unsent.clear()
                for attempt in in_flight:
                    attempt.crashes += 1
                    if len(in_flight) == 1 or attempt.crashes > 1:
                        settle(attempt.rank, _crash(crashed, attempt.job))
                    else:
                        suspects.append(attempt)
                suspects.sort(key=lambda a: a.rank)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _hand_over(
    finish: Callable[[Job, Result], None], job: Job, result: Result
) -> Callable[[], None]:
    return lambda: finish(job, result)


def _crash(crashed: Callable[[Job], None], job: Job) -> Callable[[], None]:
    return lambda: crashed(job)
