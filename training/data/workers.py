"""Worker processes that leave Ctrl-C and SIGTERM to the command: the pools of ``kocr prepare-aihub``
(cropping) and ``kocr synth-lines`` (rendering).

Both signals can reach the whole process group (a terminal's Ctrl-C, GNU ``timeout``'s SIGTERM, a CI
runner cancelling a job), and ``kocr`` then stops with one line or status 143, shutting the pool down on
the way out. A worker the signal killed could leave the command hung for ever: one killed while it sent
its results back left the pool's reader waiting for the rest of that message (a ``ProcessPoolExecutor``),
or holding the result queue's lock that ``Pool.terminate`` then waited on (a ``multiprocessing.Pool``).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import threading
import time
from collections import deque
from concurrent.futures import Executor, ProcessPoolExecutor
from multiprocessing import forkserver, resource_tracker, util
from typing import Any, Callable, Iterable, Iterator, Sequence

from kocr.stops import STOPS  # what the worker processes leave to the command


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: fall back to a signal probe
        try:
            os.kill(pid, 0)
            return True
        except ProcessLookupError:
            return False


def _exit_with(pid: int) -> None:
    """A worker's watchdog: a killed command (SIGKILL, OOM) takes its workers with it."""
    while _alive(pid):
        time.sleep(0.5)
    os._exit(1)


UNBLOCK_ENV = "KOCR_FORKSERVER_UNBLOCK"  # read by the forkserver start_pool starts: what to unblock in others' processes
_pool_worker = False  # set in a process as it is unpickled as one of start_pool's workers


class _OthersUnblocked:
    """In a forkserver :func:`start_pool` started with the stops blocked: every process later forked from it
    that is not one of the pool's workers (another ``forkserver`` Process of the same program) gets them
    unblocked again as it starts (multiprocessing's after-fork hooks run before its target), as it would
    have been forked from a forkserver of its own. Was: such a process kept SIGTERM blocked, and a
    ``terminate()`` or ``kill PID`` did nothing."""

    def __init__(self, signals: set[int]) -> None:
        self.signals = signals

    def after_fork(self) -> None:
        signals, self.signals = self.signals, set()  # once: not again in processes forked from this one
        if signals and not _pool_worker:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, signals)


def _in_forkserver() -> _OthersUnblocked | None:
    """At import: in the forkserver :func:`start_pool` started (it preloads this module), the hook above."""
    names = os.environ.pop(UNBLOCK_ENV, "")
    if not names:
        return None
    hook = _OthersUnblocked({int(name) for name in names.split(",")})
    util.register_after_fork(hook, _OthersUnblocked.after_fork)
    return hook


_hook = _in_forkserver()


def _mark_pool_worker() -> None:
    global _pool_worker
    _pool_worker = True


class _PoolWorkerMark:
    """Passed to each worker: unpickled there before multiprocessing's after-fork hooks run, it marks the
    process as one of the pool's, which keeps the stops blocked."""

    def __reduce__(self) -> tuple:
        return _mark_pool_worker, ()


def _start_worker(main_pid: int, initializer: Callable[..., None], initargs: tuple, mark: None = None) -> None:
    signal.pthread_sigmask(signal.SIG_BLOCK, set(STOPS))  # already, unless forked from another's forkserver
    threading.Thread(target=_exit_with, args=(main_pid,), daemon=True).start()
    initializer(*initargs)


def start_pool(workers: int, initializer: Callable[..., None], initargs: tuple,
               preload: Sequence[str] = ()) -> ProcessPoolExecutor:
    """``workers`` processes, all started here, out of the reach of Ctrl-C and SIGTERM; each runs
    ``initializer(*initargs)`` first. The caller shuts the pool down (:func:`end_pool`) on every way out. Was (prepare-aihub): a Ctrl-C in the first seconds also printed the forkserver's
    KeyboardInterrupt traceback (it was importing the preloaded module), or a worker's, or that of a worker
    still starting as the command exited (FileNotFoundError); and a SIGTERM to the group hung the command.

    The forkserver (``preload``: modules it imports once for every worker) is started with SIGINT and
    SIGTERM blocked, so it and every worker forked from it keep them blocked (the command ends them: a
    shutdown, or their watchdog once the command is gone); a Ctrl-C or SIGTERM to the command meanwhile
    waits, and lands once they are all started. The forkserver outlives the pool, and any other process
    the program later starts through it gets them unblocked again (:class:`_OthersUnblocked`)."""
    context = multiprocessing.get_context("forkserver")  # clean single-threaded parents, fast starts
    context.set_forkserver_preload([__name__, *preload])  # this module first: the hook for others' processes
    main = threading.current_thread() is threading.main_thread()
    caught: list[int] = []
    previous = {signum: signal.signal(signum, lambda signum, frame: caught.append(signum))
                for signum in STOPS} if main else {}
    pool = None
    mask = None
    try:
        resource_tracker.ensure_running()  # first: starting it unblocks SIGINT and SIGTERM in this thread again
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, set(STOPS))  # inherited through the forkserver's exec
        added = sorted(int(signum) for signum in set(STOPS) - set(mask))
        if added:  # what the forkserver, if it starts now, unblocks again in the processes not the pool's
            os.environ[UNBLOCK_ENV] = ",".join(map(str, added))
        forkserver.ensure_running()
        pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker,
                                   initargs=(os.getpid(), initializer, initargs, _PoolWorkerMark()))
        launch = getattr(pool, "_launch_processes", None)  # every worker now, not one per early submit
        if launch is not None:
            launch()
        # and the pool's manager thread, which a shutdown waits on to end the workers: without it a shutdown
        # left them starting, and one that read its queues' locks after the command exited failed on them
        pool.submit(int)
    except BaseException:
        if pool is not None:
            end_pool(pool)
        raise
    finally:
        os.environ.pop(UNBLOCK_ENV, None)
        if mask is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        for signum, handler in previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
    if caught:
        try:
            signal.raise_signal(caught[0])
        except BaseException:
            end_pool(pool)
            raise
    return pool


def end_pool(pool: ProcessPoolExecutor) -> None:
    """Shut down a pool :func:`start_pool` made; a broken one (a worker SIGKILLed, OOM-killed or crashed)
    has its remaining workers SIGKILLed first. The executor ends those with SIGTERM, which they keep
    blocked: was, its manager thread waited on them for ever (one blocked on the queue lock the dead
    worker held, or on sending results nobody read), and the command hung here instead of failing with
    BrokenProcessPool (found by h175 in prepare-aihub)."""
    if getattr(pool, "_broken", False):
        for process in list((getattr(pool, "_processes", None) or {}).values()):
            with contextlib.suppress(Exception):
                process.kill()
    pool.shutdown(cancel_futures=True)


def _run_batch(func: Callable, batch: list) -> list:
    return [func(item) for item in batch]


def ordered_map(func: Callable, items: Iterable, pool: Executor | None, chunk: int = 4,
                window: int = 8) -> Iterator[Any]:
    """``map(func, items)`` in order, on ``pool`` with at most ``window`` chunks in flight (bounded memory)."""
    if pool is None:
        yield from map(func, items)
        return
    pending: deque = deque()
    batch: list = []
    for item in items:
        batch.append(item)
        if len(batch) == chunk:
            pending.append(pool.submit(_run_batch, func, batch))
            batch = []
            if len(pending) >= window:
                yield from pending.popleft().result()
    if batch:
        pending.append(pool.submit(_run_batch, func, batch))
    while pending:
        yield from pending.popleft().result()
