"""Data-parallel training through ``torchrun``: one process per GPU (or per CPU slot with gloo), any number of nodes.

``torchrun`` sets RANK, LOCAL_RANK and WORLD_SIZE; :func:`init_distributed` reads them, joins the
process group (NCCL on CUDA, gloo on CPU) and pins the process to its GPU. Without them training
runs as one plain process. Only rank 0 logs to MLflow and writes checkpoints and metrics.

Example (two processes on one CPU machine, two GPUs on each of two nodes)::

    torchrun --standalone --nproc_per_node 2 -m kocr.cli train --data data/prepared --out models/candidate
    torchrun --nnodes 2 --node_rank 0 --nproc_per_node 2 --rdzv_endpoint host0:29500 -m kocr.cli train ...
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import logging
import os
import signal
import sys
import threading
import time
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NoReturn, ParamSpec, TypeVar

import torch
import torch.distributed as dist


P = ParamSpec("P")
R = TypeVar("R")


@dataclass(frozen=True)
class DistContext:
    """Where this process sits in the job: rank, world size and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def stop_with_torchrun(grace: float = 30.0, poll: float = 1.0, others_after: float = 5.0) -> None:
    """Under torchrun, stop this rank as torchrun would stop it once torchrun itself is gone.

    torchrun starts each rank in a session of its own, so a SIGKILL of torchrun (``kill -9``, the
    OOM killer) reaches no rank: they went on training as orphans, holding their GPUs and
    overwriting the saved state, model and metrics, and a ``--resume`` started meanwhile resumed a
    state those orphans were rewriting (its ranks read different steps) or trained beside them.
    A thread watches the parent: when it changes, rank 0 gets SIGTERM (it ends its MLflow runs as
    KILLED, as for a SIGTERM to torchrun), the other ranks ``others_after`` seconds later (had they
    died first, rank 0's collective would fail and end its runs FAILED; they usually stop before,
    their peer gone), and any rank still alive ``grace`` seconds after its SIGTERM gets SIGKILL, as
    torchrun escalates. Outside torchrun (no TORCHELASTIC_RUN_ID) it does nothing.
    """
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    launcher = os.getppid()

    def watch() -> None:
        while os.getppid() == launcher:
            time.sleep(poll)
        if process_rank() == 0:  # said once, not once per rank, on a line of its own under the progress bar
            from tqdm import tqdm

            with contextlib.suppress(Exception):
                tqdm.write(f"kocr: torchrun (pid {launcher}) is gone: stopping its ranks as it would have",
                           file=sys.stderr)
        else:
            time.sleep(others_after)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(grace)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="kocr-torchrun-watch", daemon=True).start()


def launched_by_torchrun() -> bool:
    """True inside a ``torchrun`` job of more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def under_torchrun() -> bool:
    """True in a process torchrun started (any world size, ``--nproc_per_node 1`` included) or one joined
    by hand (RANK/WORLD_SIZE set): ``kocr train`` then never starts torchrun itself."""
    return "TORCHELASTIC_RUN_ID" in os.environ or "WORLD_SIZE" in os.environ


def processes_wanted(processes: int | str, device: torch.device) -> int:
    """``train.processes`` as a count: ``auto`` is one per visible CUDA device when training on CUDA, else 1.

    More processes than visible GPUs on CUDA is a ParamsError (NCCL would fail on a device that is not there).
    """
    from kocr.params import ParamsError

    if processes == "auto":
        return torch.cuda.device_count() if device.type == "cuda" else 1
    count = int(processes)
    if device.type == "cuda" and count > torch.cuda.device_count():
        raise ParamsError(f"train.processes {count}: this machine shows {torch.cuda.device_count()} CUDA device(s) "
                          "(one process per GPU; auto takes them all)")
    return count


STATUS_DIR = "KOCR_RANK_STATUS_DIR"  # set by run_under_torchrun: each rank writes its exit status there


class InterruptedJob(KeyboardInterrupt):
    """SIGINT (Ctrl-C) ended the torchrun job ``kocr train`` started: rank 0 has said so already."""


def note_rank_status(status: int) -> None:
    """Under :func:`run_under_torchrun`, leave this rank's exit status where the ``kocr train`` that
    started torchrun reads it (torchrun itself exits 1 whatever a rank's status)."""
    folder = os.environ.get(STATUS_DIR)
    if folder and "TORCHELASTIC_RUN_ID" in os.environ:
        with contextlib.suppress(OSError):
            (Path(folder) / f"rank-{process_rank()}").write_text(str(status), encoding="utf-8")


def _job_status(returncode: int, folder: Path) -> int:
    """The job's exit status: 0 when torchrun succeeded; else the lowest non-zero status a rank noted
    (2: a refused input, said once by the rank that found it; 1: a crash; 143: a rank SIGTERMed by
    torchrun after another failed); else torchrun's own (a signal as 128 + its number)."""
    if returncode == 0:
        return 0
    noted = []
    for path in folder.glob("rank-*"):
        with contextlib.suppress(OSError, ValueError):
            noted.append(int(path.read_text(encoding="utf-8")))
    failed = [status for status in noted if status > 0]
    if failed:
        return min(failed)
    return 128 - returncode if returncode < 0 else returncode


class _StopLines(logging.Filter):
    """Drops torchrun's log lines about a stop signal it got: 'Received 15 death signal, shutting down
    workers' and then 'Sending process N closing signal SIGTERM' once per rank (those it sends when a
    rank failed are kept)."""

    def __init__(self) -> None:
        super().__init__()
        self.stopping = False

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        if "death signal" in message:
            self.stopping = True
            return False
        return not (self.stopping and "closing signal" in message)


TORCHRUN_LOGGERS = ("torch.distributed.elastic.agent.server.api", "torch.distributed.elastic.multiprocessing.api")


def torchrun_main(args: list[str]) -> NoReturn:
    """``python -m torch.distributed.run <args>``, as :func:`run_under_torchrun` starts it, ending on a stop
    signal (SIGTERM, SIGINT, SIGHUP) that torchrun passed on to its ranks with status 128 + the signal and,
    but for SIGINT (rank 0 says ``kocr train: interrupted``), one line. Was: torchrun's own traceback
    (``SignalException: Process N got signal: 15``) and its three lines about stopping the ranks."""
    from torch.distributed import run
    from torch.distributed.elastic.multiprocessing.api import SignalException

    quiet = _StopLines()
    for name in TORCHRUN_LOGGERS:
        logging.getLogger(name).addFilter(quiet)
    try:
        run.main(args)
    except SignalException as exc:
        if exc.sigval != signal.SIGINT:
            print(f"kocr train: stopped by {exc.sigval.name} (torchrun stopped its ranks)", file=sys.stderr)
        sys.exit(128 + int(exc.sigval))
    sys.exit(0)


def run_under_torchrun(processes: int, argv: list[str]) -> int:
    """Start torchrun (:func:`torchrun_main`, as ``python -m torch.distributed.run --standalone
    --nproc_per_node processes -m kocr.cli <argv>``) and return the job's exit status (:func:`_job_status`).

    This is how ``kocr train`` with ``train.processes`` > 1 uses several GPUs under ``dvc repro``.
    torchrun runs in a process group of its own, so a Ctrl-C at the terminal reaches it once, passed on
    by this process: SIGTERM and SIGINT to this process are passed to torchrun, which passes them to
    its ranks (rank 0 ends its MLflow runs as KILLED); then SIGTERM ends this process with status 143 (torchrun
    says so in one line) and SIGINT raises :class:`InterruptedJob`. Should this process be SIGKILLed, torchrun gets SIGTERM
    (Linux's parent-death signal) and stops its ranks as on a SIGTERM.
    """
    import ctypes
    import shutil
    import subprocess
    import tempfile

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        prctl = None

    def in_own_group() -> None:  # runs in the child between fork and exec: no imports, no locks
        os.setpgid(0, 0)
        if prctl is not None:
            prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG

    folder = Path(tempfile.mkdtemp(prefix="kocr-ranks-"))
    command = [sys.executable, "-c", "import sys; from training.distributed import torchrun_main; "
               "torchrun_main(sys.argv[1:])", "--standalone", "--nproc_per_node", str(processes), "-m", "kocr.cli", *argv]
    received: list[int] = []
    try:
        proc = subprocess.Popen(command, env={**os.environ, STATUS_DIR: str(folder)}, preexec_fn=in_own_group)

        def forward(signum: int, frame: Any) -> None:
            received.append(signum)
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signum)

        previous = ({signum: signal.signal(signum, forward) for signum in (signal.SIGTERM, signal.SIGINT)}
                    if threading.current_thread() is threading.main_thread() else {})
        try:
            returncode = proc.wait()  # a forwarded signal interrupts it only to run `forward` (PEP 475 retries)
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        status = _job_status(returncode, folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    if signal.SIGINT in received:
        raise InterruptedJob
    if signal.SIGTERM in received:
        return 128 + signal.SIGTERM
    return status


def process_rank() -> int:
    """This process's global rank (0 outside torchrun)."""
    return int(os.environ.get("RANK", "0"))


def init_distributed(device: torch.device) -> DistContext:
    """Join the torchrun process group when launched by torchrun; else a single-process context on ``device``."""
    if not launched_by_torchrun():
        return DistContext(device=device)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DistContext(rank, world, local, device)


def all_agree(flag: bool, ctx: DistContext) -> bool:
    """True only when ``flag`` is true on every rank (e.g. 'my loss is finite'), so all ranks take the same branch."""
    if not ctx.enabled:
        return flag
    value = torch.tensor([1 if flag else 0], dtype=torch.int32,
                         device=ctx.device if ctx.device.type == "cuda" else "cpu")
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def broadcast_flag(flag: bool, ctx: DistContext) -> bool:
    """Rank 0's ``flag`` on every rank (e.g. rank 0 decided to stop early)."""
    if not ctx.enabled:
        return flag
    value = torch.tensor([1 if flag else 0], dtype=torch.int32,
                         device=ctx.device if ctx.device.type == "cuda" else "cpu")
    dist.broadcast(value, src=0)
    return bool(value.item())


def sum_over_ranks(value: float, ctx: DistContext) -> float:
    """The sum of a number over all ranks (e.g. images seen)."""
    if not ctx.enabled:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=ctx.device if ctx.device.type == "cuda" else "cpu")
    dist.all_reduce(tensor)
    return float(tensor.item())


def gather(value: Any, ctx: DistContext) -> list[Any]:
    """Every rank's ``value`` (any picklable object), in rank order, on every rank."""
    if not ctx.enabled:
        return [value]
    values: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(values, value)
    return values


class ReportedElsewhere(SystemExit):
    """Another rank says why the job stops: this one exits with status 2 and prints nothing."""

    def __init__(self) -> None:
        super().__init__(2)


class PeerStopped(ValueError):
    """A collective failed because another rank of the job is gone (its own error, if any, is said there)."""


PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "Connection refused")


def peer_gone(exc: BaseException) -> bool:
    """True for the error a collective raises when another rank's process has died (gloo's wording)."""
    return isinstance(exc, RuntimeError) and any(text in str(exc) for text in PEER_GONE)


def leave_to(ctx: DistContext) -> NoReturn:
    """Exit silently (status 2) once the rank saying why the job stops is gone.

    Leaving at once would let torchrun, seeing this rank fail, SIGTERM that rank before it prints
    its line; that rank joins the barrier at its exit, after printing (or torchrun ends this one).
    """
    _meet_and_leave()  # met by the reporting rank at its exit, or failed once it is gone
    raise ReportedElsewhere


def _meet_and_leave() -> None:
    """Meet the other ranks of a job that stops (a barrier, which fails when one is gone) and leave the
    process group: run by the ranks in :func:`leave_to`, and at its exit (its line printed by then) by
    the rank that said why. A process that exits with a live gloo group can abort in its destructor
    ('terminate called without an active exception', SIGABRT), turning the job's status 2 into -6."""
    with contextlib.suppress(Exception):
        dist.barrier()
    with contextlib.suppress(Exception):
        dist.destroy_process_group()


@dataclass
class _Meeting:
    reached: bool = False


_meeting: ContextVar[_Meeting | None] = ContextVar("kocr_setup_meeting", default=None)


def setup_agreed(outcome: Any, ctx: DistContext) -> list[Any]:
    """Every rank's ``outcome`` of its set-up, in rank order, once every rank got there.

    Under :func:`one_report`, a rank whose set-up failed comes here with its error instead, and then
    every rank stops: the lowest failing rank raises its own error, the others exit silently, so a
    mistake every rank makes (a missing set, a bad knob) is said once, not once per rank.
    """
    meeting = _meeting.get()
    if meeting is not None:
        meeting.reached = True
    outcomes = gather((None, outcome), ctx)
    if any(error is not None for error, _ in outcomes):
        leave_to(ctx)
    return [value for _, value in outcomes]


def one_report(func: Callable[P, R]) -> Callable[P, R]:
    """Wrap ``func`` so that one rank of a torchrun job, not each, says what stopped it.

    An error before :func:`setup_agreed` meets the other ranks there (see it). Past it, a collective
    that fails because another rank died becomes :class:`PeerStopped`: one line, no traceback.
    Outside torchrun ``func`` is simply called.
    """
    @functools.wraps(func)
    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        if not launched_by_torchrun():
            return func(*args, **kwargs)
        meeting = _Meeting()
        token = _meeting.set(meeting)
        try:
            return func(*args, **kwargs)
        except Exception as exc:
            if not dist.is_initialized():
                raise
            ctx = DistContext(process_rank(), int(os.environ["WORLD_SIZE"]))
            if not meeting.reached:
                meeting.reached = True
                try:
                    outcomes = gather((f"{type(exc).__name__}: {exc}", None), ctx)
                except Exception:  # noqa: BLE001 - another rank is gone too: this rank's error is the one to say
                    raise exc from None
                if [rank for rank, (error, _) in enumerate(outcomes) if error is not None][0] != ctx.rank:
                    leave_to(ctx)
                atexit.register(_meet_and_leave)  # once the caller has printed the error
                raise
            if peer_gone(exc):
                raise PeerStopped(f"rank {ctx.rank}: another rank of the job stopped, so this one cannot go on "
                                  f"({str(exc).split('] ')[-1].split('. ')[0]}); that rank's own error, if it "
                                  "printed one, says why") from exc
            raise
        finally:
            _meeting.reset(token)
    return run


def agreed_setup(setup: Callable[[], tuple[R, torch.device]], device_if_failed: Callable[[], torch.device]) -> R:
    """``setup()``'s value: the work before training (reading and checking params.yaml), said once per job.

    ``setup`` returns its value and the device to train on. Outside torchrun it is simply called.
    Under torchrun every rank runs it, joins the process group on that device (on
    ``device_if_failed()``, else the CPU, where it raised: the device the other ranks chose when they
    read the same file, so they pick the same backend) and meets the others as in :func:`one_report`:
    when any rank failed, the lowest failing rank raises its error and the others exit silently with
    status 2 (:class:`ReportedElsewhere`), so a params mistake every rank makes is printed once.
    """
    if not launched_by_torchrun():
        return setup()[0]
    return _setup_once(setup, device_if_failed)


@one_report
def _setup_once(setup: Callable[[], tuple[R, torch.device]], device_if_failed: Callable[[], torch.device]) -> R:
    try:
        value, device = setup()
    except Exception:
        try:
            device = device_if_failed()
        except Exception:  # noqa: BLE001 - the setup's error is the one to say
            device = torch.device("cpu")
        init_distributed(device)  # one_report gathers the errors over the group
        raise
    setup_agreed(None, init_distributed(device))
    return value


def shutdown(ctx: DistContext) -> None:
    """Leave the process group (after a final barrier)."""
    if ctx.enabled and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
