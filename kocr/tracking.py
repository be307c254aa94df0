"""MLflow conventions: one parent run per ``dvc repro``, one child run per stage.

Embedded default: ``sqlite:///mlruns.db`` in the project root with artifacts in ``mlartifacts/``;
``MLFLOW_TRACKING_URI`` points everything at a server instead. A stage that ``dvc exp run --queue`` or
``--temp`` runs in a temporary copy of the project (``.dvc/tmp/exps/…``, deleted when the experiment
ends) logs to the store of the user's checkout, which DVC names in ``DVC_ROOT`` (:func:`store_dir`).
Set but empty (a CI secret that is missing or misspelt, ``MLFLOW_TRACKING_URI=`` in an .env file) is
an error, not the embedded store: a run meant for the team's server would otherwise register and
promote in a throwaway local registry.

DVC runs each stage as its own process, so the stages of one ``dvc repro`` find their common
parent run by a pipeline key: ``KOCR_PIPELINE_ID`` when set (CI sets it), else the host name and the
PID and start time of the ``dvc`` process that launched the stage, with where that PID holds (:func:`pid_space`,
shortened: ``dvc-<host>-<space>-<pid>-<start>``). The parent is in ``ko-ocr/finetune`` whatever
experiment a stage logs to (``tune``: ``ko-ocr/tune``). A stage run by hand gets a parent of its own.
``KOCR_PIPELINE_GROUP`` (CI: the retrain workflow's concurrency group) is tagged on the parent: the
group's pipelines never run at once, so another one left RUNNING is stale (:func:`end_stale_in_group`).

Example:
    >>> with stage_run("train", params) as run:     # doctest: +SKIP
    ...     mlflow.log_metric("loss", 0.3, step=1)
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Iterator

import mlflow
import psutil
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import Run, RunStatus
from mlflow.exceptions import MlflowException
from mlflow.utils.search_utils import SearchUtils

from kocr.dvc_hashes import dataset_hash
from kocr.locks import database_lock
from kocr.redact import hide_passwords
from kocr.params import param_strings

DEFAULT_EXPERIMENT = "ko-ocr/finetune"
PIPELINE_KEY_TAG = "kocr.pipeline_key"
DVC_EXP_TAG = "kocr.dvc_exp"  # the DVC experiment's name (`dvc exp show`, `dvc exp apply NAME`)
# KOCR_PIPELINE_GROUP, on a pipeline run: pipelines of one group never run at the same time (the retrain
# workflow's concurrency group), so a RUNNING one of the group that is not the current one is stale
PIPELINE_GROUP_TAG = "kocr.pipeline_group"


class TrackingConfigError(ValueError):
    """``MLFLOW_TRACKING_URI`` set to nothing, or a pipeline key MLflow cannot search for (exit 2 with one
    line naming it)."""


def tracking_uri_from_env() -> str | None:
    """``MLFLOW_TRACKING_URI``, or None when it is unset; TrackingConfigError when it is set but empty."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri is not None and not uri.strip():
        raise TrackingConfigError(
            "MLFLOW_TRACKING_URI is set but empty (a missing or misspelt CI secret, or `MLFLOW_TRACKING_URI=` in an "
            ".env file): set it to the tracking server's URI, or unset it to use the project's sqlite:///mlruns.db")
    return uri


def _dvc_project(folder: Path) -> Path | None:
    """The DVC project ``folder`` is in: the nearest folder, itself or above, holding ``.dvc/``."""
    return next((p for p in (folder, *folder.parents) if (p / ".dvc").is_dir()), None)


def store_dir() -> Path:
    """The folder of the embedded store (``mlruns.db``, ``mlartifacts/``): the current folder, or the
    same folder in the user's checkout when a DVC experiment runs the stage in a temporary copy.

    ``dvc exp run`` sets ``DVC_EXP_NAME`` and ``DVC_ROOT``, the checkout the experiment was queued
    from; ``--queue`` and ``--temp`` run it in a copy under ``.dvc/tmp/exps/``, which DVC deletes
    afterwards, store and artifacts with it (was: runs logged there were lost)."""
    here = Path.cwd().resolve()
    root = os.environ.get("DVC_ROOT")
    if not os.environ.get("DVC_EXP_NAME") or not root or not Path(root).is_dir():
        return here
    copy = _dvc_project(here)
    if copy is None or copy == Path(root).resolve():
        return here
    return Path(root).resolve() / here.relative_to(copy)


def dvc_experiment() -> str | None:
    """The name of the DVC experiment running this stage (``DVC_EXP_NAME``), or None outside one."""
    return os.environ.get("DVC_EXP_NAME") or None


def experiment_copy() -> str | None:
    """The name of the DVC experiment when it runs in a temporary copy of the project (``dvc exp run
    --queue`` or ``--temp``, where ``store_dir()`` is in the user's checkout), else None."""
    name = dvc_experiment()
    return name if name and store_dir() != Path.cwd().resolve() else None


def configure_tracking() -> str:
    """Point MLflow at ``MLFLOW_TRACKING_URI`` or, when it is unset, the embedded SQLite store; returns the URI."""
    uri = tracking_uri_from_env() or f"sqlite:///{store_dir() / 'mlruns.db'}"
    if shown_uri(uri) != uri:  # MLflow prints "View run at <host>" with the URI's user:password in it
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    mlflow.set_tracking_uri(uri)
    if uri.startswith("sqlite:"):
        mlflow.set_registry_uri(uri)
        _create_sqlite_store(uri)
    return uri


_CREATED: set[str] = set()  # SQLite stores this process has seen created (or made) under the lock


def _create_sqlite_store(uri: str) -> None:
    """Create (or find) the tables of the SQLite store ``uri`` under a file lock beside it, once per process.

    MLflow creates a new store's tables, then migrates them step by step, without a lock: two
    processes opening a new ``mlruns.db`` at once (two ``dvc exp`` queue workers, two ``kocr tune``
    workers on one machine) both ran the migrations, and one died on ``duplicate column name: step``
    (was: one of the two failed, every time). Under the lock the first creates the tables and the
    other finds them done."""
    if uri in _CREATED:
        return
    lock = database_lock(uri, "kocr-mlflow-store")
    if lock is None:  # sqlite:// in memory: one process only
        return
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(lock)
        except OSError:  # a folder this process cannot write (a store only read): MLflow says what it can
            return
        mlflow.MlflowClient(uri).search_experiments(max_results=1)
    _CREATED.add(uri)


NOT_FOUND = ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE")  # registry: no such model / no such alias


_SERVER_FAILED = re.compile(r"error code (5\d\d)|too many (5\d\d) error responses")
UNAVAILABLE = frozenset({"502", "503", "504"})  # a gateway's answers: a proxy, or the server not up to answer


def artifact_store_hint(message: str) -> str:
    """What to say before an MLflow error ``message`` of an artifact upload or download (``/mlflow-artifacts/``)
    the server answered with a 5xx, else "": kocr's one error line and a model's download
    (``training.checkpoint``) put it first. A 500 is the server failing the request, most often its
    artifact store (``--artifacts-destination``: the S3 bucket of docs/gpu-server.md, whose endpoint down
    or keys refused reach the client only as a 500), but the server also looks up the user and the
    experiment in its database first (basic auth), so the hint says "most often" and sends to the server's
    log. A 502, 503 or 504 is a gateway's answer: a proxy in front of the server, or the server down or
    overloaded, not its store. Was: every 5xx blamed the artifact store.

    >>> artifact_store_hint("API request to http://s:5000/api/2.0/mlflow-artifacts/artifacts/1/x.png failed "
    ...                     "with exception ... (Caused by ResponseError('too many 500 error responses'))").split(":")[0]
    'the server failed an artifact request (HTTP 500'
    >>> artifact_store_hint("API request to http://s:5000/api/2.0/mlflow-artifacts/artifacts/1/x.png failed "
    ...                     "with error code 503 != 200").split(":")[0]
    'the server, or a proxy in front of it, was unavailable (HTTP 503 to an artifact request'
    >>> artifact_store_hint("API request to http://s:5000/api/2.0/mlflow/runs/create failed with error code 500")
    ''
    """
    found = _SERVER_FAILED.search(message) if "/mlflow-artifacts/" in message else None
    if found is None:
        return ""
    code = found.group(1) or found.group(2)
    if code in UNAVAILABLE:
        return (f"the server, or a proxy in front of it, was unavailable (HTTP {code} to an artifact request: "
                "the server down, restarting or overloaded, or the proxy unable to reach it; the proxy's log "
                "or the server's says which): ")
    return (f"the server failed an artifact request (HTTP {code}: most often its artifact store, mlflow server "
            "--artifacts-destination, e.g. s3://mlflow/artifacts, its S3 endpoint down or its keys refused; the "
            "server's log says what failed): ")


def shown_uri(uri: str) -> str:
    """A tracking or database URI fit for a message: any password in it hidden.

    >>> shown_uri("postgresql+psycopg2://mlflow:secret@db:5432/mlflow")
    'postgresql+psycopg2://mlflow:***@db:5432/mlflow'
    """
    return hide_passwords(uri)


def ensure_experiment(name: str) -> str:
    """The id of experiment ``name``, created (artifacts under ``mlartifacts/`` when local) if new."""
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is not None and experiment.lifecycle_stage == "deleted":  # MLflow refuses runs in it
        raise mlflow.exceptions.MlflowException(
            f"experiment {name!r} (id {experiment.experiment_id}) was deleted: restore it (the MLflow UI, or "
            f"`mlflow experiments restore --experiment-id {experiment.experiment_id}`), or remove it for good "
            f"(`mlflow gc --experiment-ids {experiment.experiment_id}` against the backend store) so the next "
            "run creates it anew")
    if experiment is not None:
        return experiment.experiment_id
    location = None
    if mlflow.get_tracking_uri().startswith("sqlite:"):
        location = (store_dir() / "mlartifacts" / name.replace("/", "_")).as_uri()
    try:
        return mlflow.create_experiment(name, artifact_location=location)
    except mlflow.exceptions.MlflowException:  # created by a concurrent process meanwhile
        return mlflow.get_experiment_by_name(name).experiment_id  # type: ignore[union-attr]


def filter_value(value: str) -> str:
    """``value`` as a string of an MLflow search filter that MLflow reads back as exactly ``value``:
    in single quotes, else (it holds one) in double quotes. MLflow's filter syntax has no escape, so
    a value holding both kinds of quote cannot be written: ValueError. Was: put in single quotes as
    it was, so a key with a ``'`` broke the search, or (``x' and tags.… = '…``) changed what it found.

    >>> print(filter_value("gh-7-1"), filter_value("it's"))
    'gh-7-1' "it's"
    """
    for quote in ("'", '"'):
        literal = f"{quote}{value}{quote}"
        try:
            parsed = SearchUtils.parse_search_filter(f"tags.`key` = {literal}")
        except MlflowException:
            continue
        if len(parsed) == 1 and parsed[0]["value"] == value:
            return literal
    raise ValueError(f"{value!r} holds both a ' and a \", which an MLflow search filter cannot hold")


def checked_key(key: str, where: str) -> str:
    """``key`` when its runs can be searched for by it (:func:`filter_value`), else TrackingConfigError
    naming ``where`` it was set (``KOCR_PIPELINE_ID``, ``--pipeline-id``)."""
    try:
        filter_value(key)
    except ValueError as exc:
        raise TrackingConfigError(f"{where}: pipeline key {exc}; use one without quotes (e.g. gh-<run id>-<attempt>)") \
            from None
    return key


def pipeline_key() -> str | None:
    """Key shared by the stages of one pipeline run, or None outside DVC; TrackingConfigError for a
    ``KOCR_PIPELINE_ID`` that MLflow cannot search for (:func:`checked_key`)."""
    if os.environ.get("KOCR_PIPELINE_ID"):
        return checked_key(os.environ["KOCR_PIPELINE_ID"], "KOCR_PIPELINE_ID")
    try:
        for proc in psutil.Process().parents():
            cmdline = proc.cmdline()
            if any(os.path.basename(part) == "dvc" or part.endswith("/dvc") for part in cmdline[:2]) \
                    or cmdline[1:3] == ["-m", "dvc"]:
                # the host too: two machines logging to one tracking server can each have a dvc of this
                # PID started in the same second (was: dvc-<pid>-<start>, one parent run for both); and
                # where it names one process (boot and PID namespace, as 8 hex digits): containers of one
                # name (--network host, --hostname) number their processes alike, dvc often the same PID
                space = pid_space()
                where = f"-{hashlib.sha256(space.encode()).hexdigest()[:8]}" if space else ""
                return f"dvc-{socket.gethostname()}{where}-{proc.pid}-{int(proc.create_time())}"
    except (psutil.Error, IndexError):
        return None
    return None


def git_commit() -> str | None:
    """HEAD of the project's git repository, or None outside one."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


MANUAL_KEY = "manual"  # the pipeline key of every stage run by hand (no KOCR_PIPELINE_ID, not under dvc repro)


def pipeline_group() -> str | None:
    """``KOCR_PIPELINE_GROUP``, the group whose pipelines never run at the same time (CI sets it to the
    scope of the retrain workflow's concurrency group), or None when it is unset or empty."""
    return os.environ.get("KOCR_PIPELINE_GROUP") or None


def _pipeline_runs(experiment_id: str, key: str, max_results: int = 1000) -> list[Run]:
    """The pipeline runs tagged with pipeline key ``key`` in experiment ``experiment_id``, oldest first."""
    return mlflow.search_runs([experiment_id], filter_string=f"tags.`{PIPELINE_KEY_TAG}` = {filter_value(key)}",
                              output_format="list", max_results=max_results, order_by=["attributes.start_time ASC"])


def _parent_run(experiment_id: str, key: str | None) -> str:
    """The pipeline run of ``key``: one per key, in ``DEFAULT_EXPERIMENT`` whatever experiment the stage
    logs to (``tune``'s run, in ``ko-ocr/tune``, nests under it there), created by its first stage. A
    stage run by hand (no key) gets a parent of its own in its own experiment."""
    if key is not None:
        # was: looked up in the stage's experiment, so a `dvc repro` that ran tune had two parents
        experiment_id = ensure_experiment(DEFAULT_EXPERIMENT)
        found = _pipeline_runs(experiment_id, key, max_results=1)
        if found:
            return found[0].info.run_id
    client = mlflow.MlflowClient()
    tags = {PIPELINE_KEY_TAG: key or MANUAL_KEY, "kocr.kind": "pipeline"}
    if key is not None and (group := pipeline_group()):  # a stage run by hand is in no group
        tags[PIPELINE_GROUP_TAG] = group
    if experiment := dvc_experiment():
        tags[DVC_EXP_TAG] = experiment
    commit = git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    run = client.create_run(experiment_id, run_name="dvc-repro" if key else MANUAL_KEY, tags=tags)
    return run.info.run_id


PID_SPACE_TAG = "kocr.pid_space"


def pid_space() -> str | None:
    """Where ``kocr.pid`` names one process: this boot of this machine's kernel and this process's PID
    namespace (a container has its own), as ``<boot id>/<namespace inode>``; None where /proc cannot
    tell (not Linux). Two processes with the same value see the same PIDs: a hostname alone does not
    say so (a container run with the host's network has the host's name and PIDs of its own; cloned
    machines share names). A namespace's inode is another's only once the first is gone."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text(encoding="ascii").strip()
        namespace = os.readlink("/proc/self/ns/pid")  # pid:[4026531836]
    except OSError:
        return None
    return f"{boot}/{namespace.removeprefix('pid:[').rstrip(']')}" if boot else None


def stage_tags(stage: str, commit: str | None = None) -> dict[str, str]:
    """The tags every stage run carries: ``kocr.stage``, ``kocr.host``, ``kocr.pid`` and, on Linux,
    ``kocr.pid_space`` (:func:`pid_space`), the git commit (``commit``, else HEAD's when in a git
    repository) and, in a ``dvc exp run``, ``kocr.dvc_exp``."""
    tags = {"kocr.stage": stage, "kocr.host": socket.gethostname(), "kocr.pid": str(os.getpid())}
    if space := pid_space():
        tags[PID_SPACE_TAG] = space
    if experiment := dvc_experiment():
        tags[DVC_EXP_TAG] = experiment
    commit = commit or git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    return tags


def nested_stage_tags(parent: Run) -> dict[str, str]:
    """Tags for a run nested under stage run ``parent`` (a tune trial): the stage tags, with the
    parent's stage and commit, and the parent's ``kocr.data.*`` data versions."""
    tags = stage_tags(parent.data.tags.get("kocr.stage", ""), parent.data.tags.get("mlflow.source.git.commit"))
    if not tags["kocr.stage"]:
        del tags["kocr.stage"]
    return tags | {k: v for k, v in parent.data.tags.items() if k.startswith("kocr.data.")}


def inherit_inputs(parent: Run, run_id: str) -> None:
    """Log the dataset inputs of ``parent`` (what :func:`log_dataset` recorded) on run ``run_id`` too."""
    if parent.inputs and parent.inputs.dataset_inputs:
        mlflow.MlflowClient().log_inputs(run_id, datasets=list(parent.inputs.dataset_inputs))


def _open_parent(parent_id: str) -> None:
    """Mark the pipeline run RUNNING again while one of its stages runs (the stage before ended it).

    Its end time, that of the stage before, goes too: the UI shows end - start as the run's duration
    whatever its status, so a pipeline resumed (or killed) in a later stage showed the old span while
    RUNNING. MLflow's API cannot set an end time back to none: 0 is what the UI and ``if end_time``
    read as none. The parent's next end sets it anew."""
    client = mlflow.MlflowClient()
    info = client.get_run(parent_id).info
    if info.status != "RUNNING" or info.end_time:
        # MlflowClient.update_run keeps the end time; the store's update takes one (every store, REST too)
        client._tracking_client.store.update_run_info(parent_id, RunStatus.RUNNING, end_time=0, run_name=None)


def _child_runs(parent_id: str) -> list[Run]:
    """The runs nested directly under ``parent_id``, in every experiment: a pipeline's tune run logs to
    ko-ocr/tune while its parent is in ko-ocr/finetune, and tune's trials nest under it there."""
    return mlflow.search_runs(search_all_experiments=True, output_format="list",
                              filter_string=f"tags.mlflow.parentRunId = '{parent_id}'")


def parent_status(parent_id: str) -> str | None:
    """The status a pipeline run takes from its stage runs: RUNNING while any runs, else the worst
    of each stage's latest run (FAILED, then KILLED, else FINISHED); None when it has none or the
    store cannot search them."""
    try:
        children = _child_runs(parent_id)
    except MlflowException:
        return None
    if not children:
        return None
    if any(run.info.status == "RUNNING" for run in children):
        return "RUNNING"
    latest: dict[str, Run] = {}
    for run in sorted(children, key=lambda r: r.info.start_time or 0):
        latest[run.data.tags.get("kocr.stage", run.info.run_name or run.info.run_id)] = run
    statuses = {run.info.status for run in latest.values()}
    return next((s for s in ("FAILED", "KILLED") if s in statuses), "FINISHED")


def _finish_parent(parent_id: str, status: str) -> None:
    """End the pipeline run with the status its stage runs give it (``status``, the stage that just
    ended, when they cannot be searched); left RUNNING while another stage still runs."""
    client = mlflow.MlflowClient()
    status = parent_status(parent_id) or status
    if status == "RUNNING":
        _open_parent(parent_id)
    else:
        client.set_terminated(parent_id, status=status)


def interrupted(exc: BaseException) -> bool:
    """Whether ``exc`` stops the command from outside, not a failure of its own: Ctrl-C
    (KeyboardInterrupt), or SIGTERM (``kill``, ``timeout``, ``docker stop``), which ``kocr`` turns into
    an exit with status 143. A run it stops ends as KILLED, as MLflow names a run stopped by its user.

    >>> interrupted(SystemExit(143)), interrupted(KeyboardInterrupt()), interrupted(SystemExit(2))
    (True, True, False)
    """
    return isinstance(exc, KeyboardInterrupt) or (isinstance(exc, SystemExit) and exc.code == 128 + signal.SIGTERM)


@contextlib.contextmanager
def stage_run(stage: str, params: dict[str, Any] | None = None, experiment: str | None = None,
              system_metrics: bool = False) -> Iterator[Run]:
    """A child run for ``stage`` under the pipeline's parent run, with params and the git commit.

    The run ends FINISHED, FAILED when the block raises, or KILLED when it is stopped from outside
    (SIGTERM or Ctrl-C: :func:`interrupted`); the pipeline run then takes its status from its stage runs."""
    configure_tracking()
    experiment_id = ensure_experiment(experiment or DEFAULT_EXPERIMENT)
    key = pipeline_key()
    parent_id = _parent_run(experiment_id, key)
    tags = stage_tags(stage)
    status, stopped = "FINISHED", False
    _open_parent(parent_id)
    try:
        with mlflow.start_run(experiment_id=experiment_id, run_name=stage, parent_run_id=parent_id,
                              tags=tags, log_system_metrics=system_metrics) as run:
            try:
                end_dead_siblings(experiment_id, parent_id, stage, run.info.run_id)
                if params:
                    mlflow.log_params(param_strings(params))
                yield run
            except BaseException as exc:
                # MLflow's context ends the run FAILED on any exception, a SIGTERM's or Ctrl-C's too:
                # ended here first, KILLED when it was stopped from outside (its exit then finds it ended)
                status, stopped = ("KILLED", True) if interrupted(exc) else ("FAILED", False)
                active = mlflow.active_run()
                if active is not None and active.info.run_id == run.info.run_id:
                    with stop_goes_on(stopped, f"its {stage} run {run.info.run_id} could not be ended KILLED"):
                        mlflow.end_run(status)  # leaves the active-run stack even when the store refuses
                raise
    finally:
        # The parent is RUNNING while a stage runs; once the stage run has ended, its status follows
        # the stage runs (this one, and any other still running, e.g. a parallel tune worker).
        with stop_goes_on(stopped, f"its pipeline run {parent_id} could not be ended"):
            _finish_parent(parent_id, status)


@contextlib.contextmanager
def stop_goes_on(stopped: bool, what: str, who: str = "kocr") -> Iterator[None]:
    """While a SIGTERM or Ctrl-C stops the command (``stopped``), an error of the MLflow store inside the
    block (busy, down) is said in one line (``who: what (error)``) instead of raised: raised, it replaced the
    stop, and the command exited 2 instead of 143 (or dying by SIGINT), and a tune worker failed its trial
    without queueing the retry. Without a stop the error is raised as it is."""
    try:
        yield
    except Exception as error:
        if not stopped:
            raise
        detail = " ".join(str(error).split())[:300]  # one line, the SQL error too (after "raised as a result of ...")
        print(f"{who}: {what} ({type(error).__name__}: {detail})", file=sys.stderr)


def _end_superseded(client: mlflow.MlflowClient, run_id: str, by: str) -> None:
    """End a run its dead process left RUNNING as KILLED, tagged with the run that took over."""
    client.set_tag(run_id, "kocr.superseded_by", by)
    client.set_terminated(run_id, status="KILLED")


def _settle_parent(client: mlflow.MlflowClient, parent_id: str | None) -> None:
    """End pipeline run ``parent_id`` with the status its stage runs give it, unless one still runs."""
    if parent_id:
        status = parent_status(parent_id)
        if status not in (None, "RUNNING"):
            client.set_terminated(parent_id, status=status)


def _process_gone(tags: dict[str, str], space: str | None, same_pipeline: bool = False) -> bool | None:
    """Whether the process a run's ``kocr.pid`` names is gone: True, False, or None when this process
    cannot tell (no PID, or a PID of another PID space: :func:`pid_space`). A run without the
    ``kocr.pid_space`` tag (an older kocr's) is judged by its PID alone. Under the same pipeline run
    (``same_pipeline``), a run of an earlier boot of this host is gone: the reboot ended its process
    (a host's runs of one pipeline run were ended by PID alone before the tag, a clone of this name's too)."""
    pid = tags.get("kocr.pid", "")
    if not pid.isdigit():
        return None
    if PID_SPACE_TAG in tags:
        if space is None or tags[PID_SPACE_TAG] != space:
            boot = tags[PID_SPACE_TAG].partition("/")[0]
            if same_pipeline and space is not None and boot and boot != space.partition("/")[0]:
                return True
            return None
        if int(pid) == os.getpid():  # this process took over its PID: that process is gone
            return True
    return not psutil.pid_exists(int(pid))


def end_dead_siblings(experiment_id: str, parent_id: str, stage: str, current: str) -> list[str]:
    """Mark KILLED the earlier runs of ``stage`` that a process on this machine left RUNNING when it
    died (SIGKILL, the tracking server down mid-run), tagged with the run that takes over
    (``kocr.superseded_by``), and end their pipeline runs from their stage runs; returns their ids.

    Under any pipeline run (a killed stage of one ``dvc repro`` is ended by the same stage of the next
    ``dvc repro``, whose pipeline key is another) when the run names its PID space (:func:`pid_space`,
    tagged by every stage run) and it is this process's; a run without that tag (an older kocr's) only
    under the same pipeline run, judged by its PID on this host, and so is one of an earlier boot of
    this host under the same pipeline run (the reboot ended it). A run whose process is alive, that
    another machine or PID namespace started, or a tune trial (its worker's stale-trial check ends
    it), is left alone."""
    host, space = socket.gethostname(), pid_space()
    try:
        found = mlflow.search_runs([experiment_id], output_format="list", filter_string=(
            f"tags.`kocr.stage` = {filter_value(stage)} and tags.`kocr.host` = {filter_value(host)} "
            "and attributes.status = 'RUNNING'"))
    except (MlflowException, ValueError):  # a store that cannot search this way: the UI keeps showing them RUNNING
        return []
    client = mlflow.MlflowClient()
    ended = []
    for run in found:
        tags = run.data.tags
        if run.info.run_id == current or tags.get("kocr.host") != host or "kocr.trial" in tags \
                or (PID_SPACE_TAG not in tags and tags.get("mlflow.parentRunId") != parent_id) \
                or not _process_gone(tags, space, tags.get("mlflow.parentRunId") == parent_id):
            continue
        _end_superseded(client, run.info.run_id, current)
        ended.append(run.info.run_id)
        ended += _end_dead_nested(client, run.info.run_id, space, current)
        if tags.get("mlflow.parentRunId") != parent_id:  # this stage's own pipeline run is settled as it ends
            _settle_parent(client, tags.get("mlflow.parentRunId"))
    return ended


def _end_dead_nested(client: mlflow.MlflowClient, run_id: str, space: str | None, by: str) -> list[str]:
    """End as KILLED, tagged ``kocr.superseded_by`` ``by``, the runs nested under the dead stage run
    ``run_id`` (a ``tune`` run's trials, which its worker process ran) that are still RUNNING and whose
    process is gone too; their ids.

    Was: left RUNNING for ever under their KILLED tune run: the next worker of their study would end
    them, but with ``tune.study_name`` empty (the default) each ``dvc repro`` searches a new study, so
    none ever came. A trial whose process still runs, or of another PID space, is left alone."""
    try:
        nested = _child_runs(run_id)
    except MlflowException:
        return []
    ended = []
    for run in nested:
        if run.info.status == "RUNNING" and _process_gone(run.data.tags, space):
            _end_superseded(client, run.info.run_id, by)
            ended.append(run.info.run_id)
    return ended


def supersede(old_id: str, new_id: str) -> bool:
    """Record that run ``new_id`` took over from ``old_id`` (a resumed ``train``): tag the new run
    ``kocr.resumed_from_run``, and when the old run is still RUNNING (its process was killed) tag it
    ``kocr.superseded_by`` and end it (and its pipeline run, from its stage runs) as KILLED. Works
    across pipeline runs. True when the old run was ended here; an old run the store does not hold
    (another tracking store) only gets the tag on the new one."""
    client = mlflow.MlflowClient()
    client.set_tag(new_id, "kocr.resumed_from_run", old_id)
    try:
        old = client.get_run(old_id)
    except MlflowException:
        return False
    if old.info.status != "RUNNING":
        return False
    _end_superseded(client, old_id, new_id)
    parent_id = old.data.tags.get("mlflow.parentRunId")
    if parent_id != new_id:
        _settle_parent(client, parent_id)
    return True


def _end_running(client: mlflow.MlflowClient, parent: Run, status: str, reason: str) -> list[str]:
    """End as ``status``, tagged ``kocr.ended_by`` with ``reason``, the runs under pipeline run ``parent``
    (stage runs, the runs nested under them) that are still RUNNING, then ``parent`` if it is; their ids."""
    running, below = [], [parent.info.run_id]
    while below:
        found = _child_runs(below.pop())
        below += [run.info.run_id for run in found]
        running += [run.info.run_id for run in found if run.info.status == "RUNNING"]
    if parent.info.status == "RUNNING":
        running.append(parent.info.run_id)
    for run_id in running:
        client.set_tag(run_id, "kocr.ended_by", reason)
        client.set_terminated(run_id, status=status)
    return running


def _check_status(status: str) -> None:
    if status not in ("FAILED", "KILLED"):
        raise ValueError(f"status {status!r}: expected FAILED or KILLED")


def end_pipeline(key: str, status: str, reason: str = "kocr end-pipeline") -> list[str]:
    """End as ``status`` (FAILED or KILLED) every run of pipeline ``key`` that is still RUNNING: its
    stage runs, the runs nested under them (tune trials), then its pipeline run; each is tagged
    ``kocr.ended_by`` with ``reason``. Returns their ids, pipeline run last. For a pipeline whose
    processes are gone without ending their runs (a CI job that failed or was cancelled: the runner
    stops the job's container, which SIGKILLs them); runs that had ended keep their status."""
    _check_status(status)
    experiment = mlflow.get_experiment_by_name(DEFAULT_EXPERIMENT)
    if experiment is None:
        return []
    client = mlflow.MlflowClient()
    ended: list[str] = []
    for parent in _pipeline_runs(experiment.experiment_id, key):
        ended += _end_running(client, parent, status, reason)
    return ended


def end_stale_in_group(group: str, keep: set[str], status: str, reason: str) -> dict[str, list[str]]:
    """End, as :func:`end_pipeline` does, the pipelines of ``group`` (tagged ``kocr.pipeline_group`` with
    exactly it) whose pipeline run is RUNNING, but those keyed ``keep`` (the current pipeline's) and
    ``manual``: pipelines of one group never run at the same time, so another one RUNNING is one whose
    processes are gone (the retrain job of a runner whose machine went down). Pipeline runs without the
    tag (from before it existed, a ``dvc repro`` by hand) are left alone, as are ended pipeline runs.
    Returns the ids ended by pipeline key, pipeline run last."""
    _check_status(status)
    if not group:
        raise ValueError("no pipeline group given")
    experiment = mlflow.get_experiment_by_name(DEFAULT_EXPERIMENT)
    if experiment is None:
        return {}
    where = "attributes.status = 'RUNNING' and tags.`kocr.kind` = 'pipeline'"
    with contextlib.suppress(ValueError):  # a group no filter can hold: compared below only
        where += f" and tags.`{PIPELINE_GROUP_TAG}` = {filter_value(group)}"
    client = mlflow.MlflowClient()
    ended: dict[str, list[str]] = {}
    for parent in mlflow.search_runs([experiment.experiment_id], filter_string=where, output_format="list",
                                     order_by=["attributes.start_time ASC"]):
        key = parent.data.tags.get(PIPELINE_KEY_TAG)
        if parent.data.tags.get(PIPELINE_GROUP_TAG) != group or key is None or key == MANUAL_KEY or key in keep:
            continue
        ended.setdefault(key, []).extend(_end_running(client, parent, status, reason))
    return ended


def dataset_digest(data_hash: str) -> str:
    """The digest MLflow shows for a dataset of hash ``data_hash`` (``dataset_hash``; MLflow keeps 36
    characters): DVC's own ``md5`` or ``md5.dir`` as it is, a ``content:`` hash's MD5, and for a folder
    inside a tracked output (``md5.dir/train``) the MD5 of that whole hash: its own for each folder, the
    same each time that version is logged. Was: the first 36 characters, which left ``train`` and ``val``
    of one ``data/prepared`` with its one ``md5.dir`` in MLflow's Datasets view.

    >>> dataset_digest("0123456789abcdef0123456789abcdef.dir")
    '0123456789abcdef0123456789abcdef.dir'
    >>> dataset_digest("0123456789abcdef0123456789abcdef.dir/train") != dataset_digest("0123456789abcdef0123456789abcdef.dir/val")
    True
    """
    if data_hash.startswith("content:"):
        return data_hash.removeprefix("content:")[:36]
    if len(data_hash) <= 36 and "/" not in data_hash:
        return data_hash
    return hashlib.md5(data_hash.encode()).hexdigest()


def log_dataset(path: str | os.PathLike, context: str, name: str | None = None) -> str:
    """Record the data version read by the active run (``mlflow.log_input``); returns the hash."""
    digest, origin = dataset_hash(path)
    with warnings.catch_warnings():  # MLflow registers two equivalent local-file source types
        warnings.simplefilter("ignore", UserWarning)
        source = resolve_dataset_source(Path(path).resolve().as_uri())
    dataset = MetaDataset(source=source, name=name or str(path), digest=dataset_digest(digest))
    for attempt in range(3):
        try:
            mlflow.log_input(dataset, context=context, tags={"kocr.hash_origin": origin, "kocr.hash": digest})
            break
        except MlflowException as exc:
            # Two processes (tuning workers on one store) inserting the same new dataset row at the
            # same moment: one wins, the other's insert breaks the unique key; a retry finds the row.
            if attempt == 2 or ("UNIQUE" not in str(exc).upper() and "duplicate key" not in str(exc)):
                raise
            time.sleep(0.2 * (attempt + 1))
    mlflow.set_tag(f"kocr.data.{context}", digest)
    return digest
