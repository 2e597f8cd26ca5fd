"""The process pool behind ``earmark.ingest``: a bounded queue of analyses, results handed back
to the writing parent, and a crashed worker costing the one file that crashed it.

Kept apart from ``earmark.ingest`` (which reads the inputs and writes the samples) because the
crash handling is a concept of its own: when a parser crash kills a worker, every analysis in
flight fails with ``BrokenProcessPool`` and the culprit is unknown, so those jobs are re-run one
at a time in a new pool, and a job that breaks the pool while running alone (or twice) failed.
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
    crashes: int = 0


def run_in_pool(
    jobs: Iterator[Job],
    submit: Callable[[ProcessPoolExecutor, Job], Future[Result]],
    finish: Callable[[Job, Result], None],
    crashed: Callable[[Job], None],
    *,
    workers: int,
    queued_per_worker: int,
) -> None:
    """Run every job through ``submit`` in ``workers`` processes and hand each result to
    ``finish`` in this process, in completion order; ``crashed`` gets each job that killed
    its worker. At most ``workers * queued_per_worker`` jobs are submitted at a time (their
    inputs are held in memory until they finish); ``jobs`` is read lazily."""
    suspects: list[_Attempt[Job]] = []  # in flight when a worker died: re-run one at a time
    unsent: list[_Attempt[Job]] = []  # refused by a pool already broken: re-run, not suspected
    pool = ProcessPoolExecutor(max_workers=workers)
    pending: dict[Future[Result], _Attempt[Job]] = {}
    try:
        while True:
            capacity = 1 if suspects else workers * queued_per_worker
            while len(pending) < capacity and not unsent:
                if suspects:
                    attempt = suspects.pop(0)
                else:
                    job = next(jobs, None)
                    if job is None:
                        break
                    attempt = _Attempt(job)
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
                finish(attempt.job, result)
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
                        crashed(attempt.job)
                    else:
                        suspects.append(attempt)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
