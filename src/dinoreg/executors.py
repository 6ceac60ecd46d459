"""Run independent jobs (one registration pair each) in this process, local processes or Ray.

``run_jobs(fn, jobs, ...)`` yields ``(job, result)`` as jobs complete, whatever the executor:

* ``local`` with one worker: in this process, in order (no start-up cost, easy to debug).
* ``local`` with ``N > 1`` workers: a ``ProcessPoolExecutor`` with the ``spawn`` start method
  (safe with torch threads), each worker running ``initializer(*initargs)`` first.
* ``ray``: each job is a Ray task (``num_cpus`` per task) on the cluster at ``address``
  (``ray://host:10001`` or ``host:6379``), or on a local Ray started for the run with
  ``workers`` CPUs. The initializer runs inside each task before ``fn``.

``fn`` and ``initializer`` must be importable module-level functions and jobs picklable.
An exception raised by ``fn`` is re-raised here, so callers should catch per-job errors inside
``fn`` and return them as results when one failed job must not stop the others.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing
import os
from typing import Any, Callable, Iterable, Iterator, Sequence, TypeVar

from dinoreg.errors import DinoregError

J = TypeVar("J")
R = TypeVar("R")
EXECUTORS = ("local", "ray")


def _with_init(fn: Callable[[J], R], initializer: Callable[..., None] | None, initargs: Sequence[Any],
               job: J) -> R:
    """Run the initializer, then ``fn(job)`` (Ray tasks have no per-worker initializer)."""
    if initializer is not None:
        initializer(*initargs)
    return fn(job)


def run_jobs(fn: Callable[[J], R], jobs: Sequence[J], executor: str = "local", workers: int = 1,
             ray_address: str | None = None, initializer: Callable[..., None] | None = None,
             initargs: Sequence[Any] = ()) -> Iterator[tuple[J, R]]:
    """Yield ``(job, fn(job))`` for every job, in completion order.

    Args:
        fn: the job function (module level, picklable).
        jobs: the jobs.
        executor: ``local`` or ``ray``.
        workers: parallel jobs (local processes, or the CPUs of a local Ray).
        ray_address: an existing Ray cluster; ``None`` starts a local one.
        initializer, initargs: run once per local worker process (or before each Ray task).
    """
    if executor not in EXECUTORS:
        raise DinoregError(f"unknown executor {executor!r}; choose {' or '.join(EXECUTORS)}", "--executor")
    if workers < 1:
        raise DinoregError(f"--workers must be at least 1, got {workers}", "--workers")
    if not jobs:
        return iter(())
    if executor == "ray":
        return _run_ray(fn, jobs, workers, ray_address, initializer, initargs)
    if workers == 1:
        return _run_inline(fn, jobs, initializer, initargs)
    return _run_processes(fn, jobs, workers, initializer, initargs)


def _run_inline(fn: Callable[[J], R], jobs: Iterable[J], initializer: Callable[..., None] | None,
                initargs: Sequence[Any]) -> Iterator[tuple[J, R]]:
    if initializer is not None:
        initializer(*initargs)
    for job in jobs:
        yield job, fn(job)


def _run_processes(fn: Callable[[J], R], jobs: Sequence[J], workers: int,
                   initializer: Callable[..., None] | None, initargs: Sequence[Any]) -> Iterator[tuple[J, R]]:
    ctx = multiprocessing.get_context("spawn")
    with cf.ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=ctx, initializer=initializer,
                                initargs=tuple(initargs)) as pool:
        futures = {pool.submit(fn, job): job for job in jobs}
        try:
            for future in cf.as_completed(futures):
                yield futures[future], future.result()
        except BaseException:
            for future in futures:
                future.cancel()
            raise


def _import_ray() -> Any:
    try:
        import ray
    except ImportError as exc:
        raise DinoregError("--executor ray needs the 'ray' package (pip install ray)") from exc
    return ray


def _run_ray(fn: Callable[[J], R], jobs: Sequence[J], workers: int, address: str | None,
             initializer: Callable[..., None] | None, initargs: Sequence[Any]) -> Iterator[tuple[J, R]]:
    ray = _import_ray()
    started_here = not ray.is_initialized()
    if started_here:
        kwargs: dict[str, Any] = dict(address=address, log_to_driver=False)
        if address is None:  # a local Ray for this run: its workers see this environment's code
            env = {k: os.environ[k] for k in ("PYTHONPATH", "OMP_NUM_THREADS") if k in os.environ}
            kwargs.update(num_cpus=workers, include_dashboard=False, runtime_env={"env_vars": env} if env else None)
        try:
            ray.init(**kwargs)
        except ConnectionError as exc:
            raise DinoregError(f"cannot connect to the Ray cluster ({exc})", address or "local Ray") from exc
    try:
        task = ray.remote(num_cpus=1, max_retries=0)(_with_init)
        refs = {task.remote(fn, initializer, tuple(initargs), job): job for job in jobs}
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            for ref in done:
                yield refs[ref], ray.get(ref)
    finally:
        if started_here:
            ray.shutdown()
