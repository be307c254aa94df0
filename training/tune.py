"""The ``tune`` stage: an Optuna search over ``train:`` knobs, one worker or a fleet on one study.

Each trial trains ``tune.steps_per_trial`` steps into a temporary folder with the knobs the sampler
chose (the search space is ``tune.space`` in params.yaml), reports the validation metric every
``tune.report_every`` steps so the pruner can stop a hopeless trial, and is scored by the best
validation value it reached. Every trial is an MLflow run nested under the worker's ``tune`` run.

Storage: empty ``tune.storage`` is an embedded SQLite file ``<out>/optuna.db`` (one worker on one
machine, a new study per run unless one is named: ``--study``, ``tune.study_name``, else
``$KOCR_TUNE_STUDY``); a ``postgresql+psycopg2://`` URL lets workers
on many machines join the same named study. Trials keep a heartbeat; a trial whose worker died is
marked FAIL by the next worker that looks, and queued again with the same knobs; a worker stopped by
SIGTERM or Ctrl-C does so for its own trial at once.

The budget ``tune.n_trials`` counts the whole study's finished (complete or pruned) trials, not
one worker's: workers claim trials under a lock (a PostgreSQL advisory lock, or a file lock beside
the SQLite file), so a fleet finishes exactly that many. Queued trials (retries, ``enqueue_trial``)
are run first and count like the others; a resumed study runs only the trials it still owes.

Outputs: ``<out>/best_params.yaml`` (the best trial's knobs as a ``train:`` mapping, its value,
trial number and study), which ``train`` reads when ``train.use_tuned`` is true; in MLflow the
optimisation history, intermediate values and parameter importances as pictures.

Example:
    >>> config = TuneConfig.from_params(load_params()["tune"])           # doctest: +SKIP
    >>> run_tune(config, load_params(), "data/prepared", "tuning")       # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import hashlib
import itertools
import json
import math
import os
import signal
import socket
import sys
import threading
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import optuna
from optuna.trial import TrialState
from sqlalchemy.engine import make_url as sqlalchemy_url

from kocr.atomic import DISK_FULL, database_full, scratch_folder, write_text
from kocr.locks import connect_args, database_lock, discard_database_lock, discard_unheld_lock_files
from kocr.params import ParamsError, check_keys, data_section, typed
from kocr.redact import hide_passwords as redact  # the storage URL as logs, MLflow and best_params.yaml show it
from training.train import MODEL_KNOBS, TrainConfig, knob_params, train

# tune.metric -> (key of train()'s validation scores, the direction that improves it)
METRICS = {"val_cer": ("cer", "minimize"), "val_loss": ("loss", "minimize"),
           "val_word_accuracy": ("word_accuracy", "maximize"), "val_norm_ed": ("norm_ed", "maximize"),
           "e2e_f1": ("e2e_f1", "maximize")}  # e2e_f1: CRAFT + recognition on the e2e_split pages
PARAM_TYPES = ("float", "int", "categorical")
# Knobs a trial must not choose: the trial budget, where and how it runs, and the tuned-file switch.
NOT_SEARCHABLE = {"steps", "val_every", "device", "num_workers", "base", "charset", "tuned_from", "tuned_keys",
                  "checkpoint_every", "log_every", "log_samples", "patience", "compile"}
WAIT = "wait"
STUDY_ENV = "KOCR_TUNE_STUDY"  # the study's name where neither --study nor tune.study_name gives one
TRIAL_FOLDER = "kocr-trial-"  # a trial trains in $TMPDIR/.kocr-trial-<number>.<machine>-<pid>.<hex>.tmp


class TuneError(ValueError):
    """A ``tune:`` setting or study state the user has to fix; the message names it."""


class TuneConfigError(TuneError, ParamsError):
    """A ``tune:`` setting that cannot work: one line naming the params file and the key."""


@dataclass(frozen=True)
class ParamSpec:
    """One searched knob: ``type`` float | int | categorical, with its range or choices.

    ``key`` is the ``train:`` knob it sets (default: its own name), so two entries can give one knob
    different ranges; ``when`` limits it to trials where other (unconditional) entries took one of
    the listed values, e.g. ``when: {optimizer: [adadelta]}``.
    """

    name: str
    type: str
    key: str
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: tuple[Any, ...] = ()
    when: tuple[tuple[str, tuple[Any, ...]], ...] = ()

    @classmethod
    def from_mapping(cls, name: str, spec: dict[str, Any]) -> "ParamSpec":
        """Parse one ``tune.space`` entry; raises TuneError naming the entry and what is wrong."""
        if not isinstance(spec, dict):
            raise TuneConfigError(f"tune.space.{name}: expected a mapping with type and range, got {spec!r}")
        unknown = set(spec) - {"type", "key", "low", "high", "log", "step", "choices", "when"}
        if unknown:
            raise TuneConfigError(f"tune.space.{name}: unknown fields {', '.join(sorted(unknown))}")
        kind = spec.get("type")
        if kind not in PARAM_TYPES:
            raise TuneConfigError(f"tune.space.{name}.type {kind!r}: expected one of {', '.join(PARAM_TYPES)}")
        key = spec.get("key", name)
        if key not in TrainConfig.__dataclass_fields__ or key in NOT_SEARCHABLE:
            searchable = sorted(set(TrainConfig.__dataclass_fields__) - NOT_SEARCHABLE)
            raise TuneConfigError(f"tune.space.{name}: {key!r} is not a searchable train knob "
                            f"(one of {', '.join(searchable)})")
        when = tuple((other, tuple(values if isinstance(values, list) else [values]))
                     for other, values in (spec.get("when") or {}).items())
        if kind == "categorical":
            choices = spec.get("choices")
            if not isinstance(choices, list) or not choices:
                raise TuneConfigError(f"tune.space.{name}: a categorical entry needs a non-empty choices list")
            return cls(name, kind, key, choices=tuple(choices), when=when)
        cast = float if kind == "float" else int
        try:
            low, high = cast(spec["low"]), cast(spec["high"])  # float(): YAML 1.1 reads 1e-5 as a string
            step = cast(spec["step"]) if spec.get("step") is not None else None
        except KeyError as exc:
            raise TuneConfigError(f"tune.space.{name}: a {kind} entry needs low and high") from exc
        except (TypeError, ValueError, OverflowError) as exc:  # int(.inf) is an OverflowError, int(.nan) a ValueError
            raise TuneConfigError(f"tune.space.{name}: low/high/step must be finite numbers ({exc})") from exc
        # NaN passes every comparison below (all False) and inf passes low <= high: both reached Optuna, which
        # failed trial after trial ("Range exceeds valid bounds", decimal.InvalidOperation)
        bad = [f"{field} {value}" for field, value in (("low", low), ("high", high), ("step", step))
               if value is not None and not math.isfinite(value)]
        if bad:
            raise TuneConfigError(f"tune.space.{name}: {', '.join(bad)}: low, high and step must be finite numbers")
        if step is not None and step <= 0:
            raise TuneConfigError(f"tune.space.{name}: step {step}: expected a step > 0")
        if spec.get("log") and step is not None and (kind == "float" or step != 1):
            # Optuna draws a log scale without a grid: was refused in every trial (ValueError: "The parameter
            # `step` is not supported when `log` is true"), and a joining worker's space check died on it
            raise TuneConfigError(f"tune.space.{name}: step {step} with log: true: a log-scale entry takes no step "
                                  f"(drop one of them{'; an int may have step 1' if kind == 'int' else ''})")
        if low > high or (spec.get("log") and low <= 0):
            raise TuneConfigError(f"tune.space.{name}: need low <= high (and low > 0 with log: true), got {low}, {high}")
        return cls(name, kind, key, low=low, high=high, log=bool(spec.get("log", False)), step=step, when=when)

    def applies(self, chosen: dict[str, Any]) -> bool:
        """Whether this entry is searched in a trial that chose ``chosen`` (by entry name) so far."""
        return all(chosen.get(other) in values for other, values in self.when)

    def distribution(self) -> optuna.distributions.BaseDistribution:
        """The Optuna distribution :meth:`suggest` draws from."""
        if self.type == "categorical":
            return optuna.distributions.CategoricalDistribution(list(self.choices))
        if self.type == "int":
            return optuna.distributions.IntDistribution(int(self.low), int(self.high), log=self.log,
                                                        step=int(self.step or 1))
        return optuna.distributions.FloatDistribution(float(self.low), float(self.high), log=self.log, step=self.step)

    def suggest(self, trial: optuna.trial.Trial) -> Any:
        """Ask the trial for a value (a retried or enqueued trial gets its fixed value back)."""
        if self.type == "categorical":
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.type == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.name, float(self.low), float(self.high), step=self.step, log=self.log)


def parse_space(space: dict[str, Any]) -> tuple[ParamSpec, ...]:
    """``tune.space`` -> specs, unconditional entries first; checks that conditions name unconditional entries."""
    if not isinstance(space, dict) or not space:
        raise TuneConfigError("tune.space: declare at least one knob, e.g. lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}")
    specs = [ParamSpec.from_mapping(name, spec) for name, spec in space.items()]
    plain = {s.name for s in specs if not s.when}
    for spec in specs:
        for other, _ in spec.when:
            if other not in plain:
                raise TuneConfigError(f"tune.space.{spec.name}.when: {other!r} is not an unconditional entry of tune.space")
    keys = Counter(s.key for s in specs if not s.when)
    if any(n > 1 for n in keys.values()):
        raise TuneConfigError(f"tune.space: several unconditional entries set the same knob: {dict(keys)}")
    return tuple(sorted(specs, key=lambda s: bool(s.when)))


def suggest(trial: optuna.trial.Trial, space: tuple[ParamSpec, ...]) -> dict[str, Any]:
    """The ``train:`` overrides of one trial (knob -> value), sampling the entries that apply."""
    chosen: dict[str, Any] = {}
    overrides: dict[str, Any] = {}
    for spec in space:
        if spec.applies(chosen):
            chosen[spec.name] = spec.suggest(trial)
            overrides[spec.key] = chosen[spec.name]
    return overrides


@dataclass(frozen=True)
class TuneConfig:
    """Knobs of the tune stage (``tune:`` in params.yaml)."""

    space: tuple[ParamSpec, ...]
    metric: str = "val_cer"
    direction: str = "minimize"
    n_trials: int = 4
    timeout_s: float = 0.0                   # per worker; 0 = no limit
    steps_per_trial: int = 30
    report_every: int = 10
    pruner: str = "median"                   # median | hyperband | none
    median: dict[str, Any] = field(default_factory=dict)
    hyperband: dict[str, Any] = field(default_factory=dict)
    sampler: dict[str, Any] = field(default_factory=dict)
    study_name: str = ""
    storage: str = ""
    heartbeat_interval_s: int = 10
    grace_period_s: int = 60
    max_retry: int = 2
    e2e_split: str = "val"                   # metric e2e_f1: pages of this split of splits.json (never test)
    e2e_pages: int = 20                      # at most this many of them (CRAFT runs once per page per worker)

    @classmethod
    def from_params(cls, section: dict[str, Any]) -> "TuneConfig":
        """Parse and check ``tune:``; raises TuneConfigError naming the setting to fix."""
        section = dict(section or {})
        space = parse_space(section.pop("space", None))
        try:
            check_keys("tune", section, set(cls.__dataclass_fields__) - {"space"})
            values = {k: _typed_setting(k, v) for k, v in section.items() if v is not None}
        except ParamsError as exc:
            raise TuneConfigError(exc.detail) from None
        config = cls(space=space, **values)
        return config.checked()

    def with_overrides(self, **values: Any) -> "TuneConfig":
        """A copy with the command-line values that were given (None = keep params.yaml's)."""
        return dataclasses.replace(self, **{k: v for k, v in values.items() if v is not None}).checked()

    def with_env_study(self) -> "TuneConfig":
        """A copy named ``$KOCR_TUNE_STUDY`` when neither ``--study`` nor ``tune.study_name`` named the study.

        The retrain workflow sets it per workflow run and commit, so a re-run of a killed run continues
        the study it left (its storage kept, docs/gpu-server.md); a named study keeps its name.
        """
        name = os.environ.get(STUDY_ENV, "").strip()
        return self.with_overrides(study_name=name) if name and not self.study_name else self

    def checked(self) -> "TuneConfig":
        """This config, or TuneConfigError naming the first setting that cannot work."""
        try:
            check_keys("tune.sampler", self.sampler, SAMPLER_KEYS)
            for key, value in self.sampler.items():
                typed(f"tune.sampler.{key}", value, str if key == "type" else int)
        except ParamsError as exc:
            raise TuneConfigError(exc.detail) from None
        if self.sampler.get("n_startup_trials", 0) < 0 or not 0 <= self.sampler.get("seed", 0) < 2**32:
            raise TuneConfigError(f"tune.sampler {self.sampler}: n_startup_trials must be >= 0, seed in "
                                  "[0, 2**32 - 1]")
        if self.timeout_s < 0:
            raise TuneConfigError(f"tune.timeout_s {self.timeout_s!r}: expected seconds > 0, or 0 for no limit")
        if self.e2e_pages < 1:
            raise TuneConfigError(f"tune.e2e_pages {self.e2e_pages!r}: expected a whole number >= 1")
        if self.max_retry < 0:
            raise TuneConfigError(f"tune.max_retry {self.max_retry!r}: expected a whole number >= 0")
        if self.metric == "e2e_f1" and self.e2e_split == "test":
            raise TuneConfigError("tune.e2e_split test: tuning on the test pages would leak them into model choice; "
                            "use val")
        if self.metric not in METRICS:
            raise TuneConfigError(f"tune.metric {self.metric!r}: expected one of {', '.join(METRICS)}")
        if self.direction != METRICS[self.metric][1]:
            raise TuneConfigError(f"tune.direction {self.direction!r}: {self.metric} is improved by "
                            f"{METRICS[self.metric][1]}; say so explicitly")
        if self.pruner not in ("median", "hyperband", "none"):
            raise TuneConfigError(f"tune.pruner {self.pruner!r}: expected median, hyperband or none")
        if self.sampler.get("type", "tpe") not in ("tpe", "random"):
            raise TuneConfigError(f"tune.sampler.type {self.sampler.get('type')!r}: expected tpe or random")
        if self.steps_per_trial < 1 or self.report_every < 1 or self.n_trials < 0:
            raise TuneConfigError("tune: steps_per_trial and report_every must be >= 1, n_trials >= 0")
        if self.heartbeat_interval_s < 1 or self.grace_period_s <= self.heartbeat_interval_s:
            raise TuneConfigError("tune: need heartbeat_interval_s >= 1 and grace_period_s > heartbeat_interval_s")
        try:
            make_pruner(self)  # its keyword arguments, before any study or trial
        except TuneError as exc:
            raise TuneConfigError(str(exc)) from None
        except (TypeError, ValueError) as exc:
            raise TuneConfigError(f"tune.{self.pruner} {getattr(self, self.pruner)}: {exc}") from None
        return self


SAMPLER_KEYS = ("type", "seed", "n_startup_trials")
_SETTING_TYPES = {"metric": str, "direction": str, "n_trials": int, "timeout_s": float, "steps_per_trial": int,
                  "report_every": int, "pruner": str, "median": dict, "hyperband": dict, "sampler": dict,
                  "study_name": str, "storage": str, "heartbeat_interval_s": int, "grace_period_s": int,
                  "max_retry": int, "e2e_split": str, "e2e_pages": int}


def _typed_setting(key: str, value: Any) -> Any:
    """A ``tune:`` scalar as its type, a pruner or sampler setting as a mapping; ParamsError naming it."""
    kind = _SETTING_TYPES[key]
    if kind is dict:
        if not isinstance(value, dict):
            raise ParamsError(f"tune.{key} {value!r}: expected a mapping of settings")
        return dict(value)
    return typed(f"tune.{key}", value, kind)


def check_space(config: TuneConfig, params: dict[str, Any]) -> None:
    """TuneConfigError when an end of a ``tune.space`` range or one of its choices is a value the train
    knob it sets refuses (``lr`` low 0, ``optimizer`` sgd): said once, when the study starts, not by
    trial after failed trial. ``params``' own ``train:`` must be valid first (its ParamsError as it is)."""
    trial_config(params, {}, config)
    for spec in config.space:
        values = spec.choices if spec.type == "categorical" else (spec.low, spec.high)
        for value in values:
            try:
                trial_config(params, {spec.key: value}, config)
            except ParamsError as exc:
                raise TuneConfigError(f"tune.space.{spec.name}: {value!r} cannot be train.{spec.key} "
                                      f"({exc.detail})") from None


# --- storage, study, sampler, pruner ---------------------------------------------------------


def storage_url(config: TuneConfig, out_dir: str | os.PathLike) -> str:
    """``tune.storage``, or the embedded SQLite file ``<out>/optuna.db``.

    In a queued or ``--temp`` DVC experiment, which runs in a copy of the project that DVC deletes
    afterwards, the embedded file and a SQLite file named by a relative path are the ones in the
    user's checkout (``kocr.tracking.store_dir``, as for MLflow's store): was the copy's, lost with it.
    """
    from kocr.tracking import experiment_copy, store_dir

    in_copy = experiment_copy() is not None
    if config.storage:
        if config.storage.startswith("postgresql://"):
            raise TuneError("tune.storage: write postgresql+psycopg2://… (plain postgresql:// means psycopg 3, "
                            "which is not installed)")
        url = sqlalchemy_url(config.storage)
        if not in_copy or url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:") \
                or Path(url.database).is_absolute():
            return config.storage
        database = store_dir() / url.database
        database.parent.mkdir(parents=True, exist_ok=True)
        return url.set(database=str(database)).render_as_string(hide_password=False)
    folder = store_dir() / out_dir if in_copy and not Path(out_dir).is_absolute() else Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(folder / 'optuna.db').resolve()}"


def end_dead_run(run_id: str | None) -> None:
    """Mark the MLflow run of a trial whose worker died (found stale) FAILED, as its worker would have;
    left as it is where this worker's store does not hold it (workers logging to separate stores)."""
    if not run_id:
        return
    import mlflow

    try:
        client = mlflow.MlflowClient()
        if client.get_run(run_id).info.status == "RUNNING":
            client.set_terminated(run_id, "FAILED")
    except mlflow.exceptions.MlflowException:
        pass


def make_storage(url: str, config: TuneConfig) -> optuna.storages.RDBStorage:
    """RDB storage with heartbeats; a trial silent for ``grace_period_s`` is failed (its MLflow run
    too) and queued again."""
    import sqlalchemy

    # PostgreSQL: libpq's connect_timeout (kocr.locks.CONNECT_TIMEOUT_S) unless the URL sets it
    engine_kwargs = ({"connect_args": {"timeout": 30}} if url.startswith("sqlite")
                     else {"pool_pre_ping": True, "connect_args": connect_args(url)})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=config.max_retry)

        def on_stale(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
            end_dead_run(trial.user_attrs.get("mlflow_run_id"))
            retry(study, trial)

        for attempt in range(3):
            try:
                return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs,
                                                  heartbeat_interval=config.heartbeat_interval_s,
                                                  grace_period=config.grace_period_s,
                                                  heartbeat_stale_trial_callback=on_stale)
            except sqlalchemy.exc.SQLAlchemyError as exc:
                # workers starting together on an empty database race to create the tables; a failure
                # to connect is not retried (it would wait out another connect_timeout, and fail alike)
                if attempt == 2 or failed_to_connect(exc):
                    error = storage_error(url, exc)
                    if error is exc:
                        raise
                    raise error from exc
                time.sleep(1.0 + attempt)
    raise AssertionError("unreachable")


def failed_to_connect(exc: Exception) -> bool:
    """Whether psycopg2 raised ``exc`` (SQLAlchemy's, wrapping it) without a SQLSTATE: connecting (host
    unreachable or silent past connect_timeout, login refused, URL rejected), not a statement the
    server refused, as in the race at table creation."""
    orig = getattr(exc, "orig", None)
    return type(orig).__module__.startswith("psycopg2") and getattr(orig, "pgcode", "") is None


def storage_error(url: str, exc: Exception) -> Exception:
    """What a worker that cannot open its storage raises: for a database that cannot be reached or
    refuses the login (SQLAlchemy's ``OperationalError``: server down, wrong host or port, wrong
    password, no such database) or a URL whose query the driver rejects (psycopg2's ``ProgrammingError``
    ``invalid dsn: invalid connection option "foo"`` for ``?foo=bar``), a TuneError of one line naming
    the storage with its password hidden and the driver's reason (was: a traceback of some 150 lines);
    anything else, and a full SQLite database (named as a full disk by :func:`named_database_full`), as it is."""
    import sqlalchemy

    rejected_url = isinstance(exc, sqlalchemy.exc.ProgrammingError) and str(exc.orig).startswith("invalid dsn")
    if not (isinstance(exc, sqlalchemy.exc.OperationalError) or rejected_url) or database_full(exc):
        return exc
    reason = " ".join(str(getattr(exc, "orig", None) or exc).split())
    return TuneError(f"cannot open the Optuna storage {redact(url)}: {redact(reason)}")


def make_sampler(config: TuneConfig, seed: int) -> optuna.samplers.BaseSampler:
    """TPE (``constant_liar`` so parallel workers spread out) or random, seeded per worker."""
    if config.sampler.get("type", "tpe") == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=int(config.sampler.get("n_startup_trials", 10)),
                                      constant_liar=True)


def make_pruner(config: TuneConfig) -> optuna.pruners.BasePruner:
    """Median or Hyperband (resources in training steps, up to ``steps_per_trial``), or none."""
    try:
        if config.pruner == "median":
            return optuna.pruners.MedianPruner(**config.median)
        if config.pruner == "hyperband":
            return optuna.pruners.HyperbandPruner(max_resource=config.steps_per_trial, **config.hyperband)
    except TypeError as exc:
        raise TuneError(f"tune.{config.pruner}: {exc}") from exc
    return optuna.pruners.NopPruner()


def worker_seed(base: int, existing_trials: int, shared: bool) -> int:
    """The sampler seed of this worker: ``base`` for a fresh embedded study (reproducible), moved on
    by the trials already there (a resumed study does not repeat its first draws) and, on a shared
    storage, by host and process (parallel workers do not draw the same startup trials)."""
    seed = base + existing_trials
    if shared:
        digest = hashlib.sha256(f"{socket.gethostname()}:{os.getpid()}:{time.time_ns()}".encode()).digest()
        seed += int.from_bytes(digest[:4], "big")
    return seed % (2**32)


def new_study_name(stamp: str, experiment: str | None, taken: Iterable[str]) -> str:
    """The name of a new unnamed study: ``stamp`` (``tune-<date>-<time>``), then ``-<experiment>`` in a DVC
    experiment copy, with ``-2``, ``-3`` … before it while a study of the name is in ``taken`` (a run of the
    same second would otherwise have joined that study).

    >>> new_study_name("tune-20261207-083350", None, {"tune-20261207-083350"})
    'tune-20261207-083350-2'
    >>> new_study_name("tune-20261207-083350", "lucky-dip", set())
    'tune-20261207-083350-lucky-dip'
    """
    taken, tail = set(taken), f"-{experiment}" if experiment else ""
    name, n = f"{stamp}{tail}", 1
    while name in taken:
        n += 1
        name = f"{stamp}-{n}{tail}"
    return name


def open_study(config: TuneConfig, storage: optuna.storages.RDBStorage, shared: bool) -> optuna.Study:
    """Create the study or join it; checks that a joined study optimises the same metric the same way.

    A queued or ``--temp`` DVC experiment runs a study of its own, its name ended by the experiment's
    (``tune-<date>-<time>-<exp>``, ``<tune.study_name>-<exp>``): the experiments of a grid differ in
    their knobs, budget or space, and one study would mix their trials and share one budget."""
    from kocr.tracking import experiment_copy

    name = config.study_name
    if not name and shared:
        raise TuneError("name the study (--study NAME or tune.study_name) so workers on a shared storage join it")
    existing = {s.study_name: s for s in optuna.get_all_study_summaries(storage, include_best_trial=False)}
    if name:
        if experiment := experiment_copy():
            name = f"{name}-{experiment}"
    else:  # a new study of this run's own: named by the time, -2, -3 … after one of the same second
        name = new_study_name(time.strftime("tune-%Y%m%d-%H%M%S"), experiment_copy(), existing)
    if name in existing and existing[name].direction.name.lower() != config.direction:
        raise TuneError(f"study {name} is {existing[name].direction.name.lower()}d; tune.direction is {config.direction}")
    while True:
        try:  # an unnamed study is this run's alone: one another run made meanwhile under the name is not joined
            study = optuna.create_study(storage=storage, study_name=name, direction=config.direction,
                                        load_if_exists=bool(config.study_name),
                                        sampler=make_sampler(config, worker_seed(
                                            int(config.sampler.get("seed", 0)),
                                            existing[name].n_trials if name in existing else 0, shared)),
                                        pruner=make_pruner(config))
            break
        except optuna.exceptions.DuplicatedStudyError:
            name = new_study_name(time.strftime("tune-%Y%m%d-%H%M%S"), experiment_copy(),
                                  [s.study_name for s in optuna.get_all_study_summaries(storage, False)])
    metric = study.user_attrs.get("kocr.metric")
    if metric is None:
        study.set_user_attr("kocr.metric", config.metric)
        study.set_user_attr("kocr.space", space_fingerprint(config.space))
    elif metric != config.metric:
        raise TuneError(f"study {name} optimises {metric}; tune.metric is {config.metric}")
    elif study.user_attrs.get("kocr.space") != space_fingerprint(config.space):
        check_space_fits(study, config.space)
        print(f"tune: warning: tune.space differs from the one study {name} started with", file=sys.stderr)
    warn_other_budgets(study, config.steps_per_trial)
    return study


STEPS = "steps"  # trial user attribute: the training steps (tune.steps_per_trial) the trial was given


def warn_other_budgets(study: optuna.Study, steps_per_trial: int) -> None:
    """One warning line when the study's complete trials trained another ``steps_per_trial`` than this
    worker's: its trials then mix budgets (not refused, so a retry may run on a worker of another budget)."""
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    other = sorted({t.user_attrs[STEPS] for t in done if STEPS in t.user_attrs} - {steps_per_trial})
    if other:
        print(f"tune: warning: tune.steps_per_trial is {steps_per_trial}; study {study.study_name}'s complete "
              f"trials trained {', '.join(map(str, other))} steps, so its trials mix budgets", file=sys.stderr)


def check_space_fits(study: optuna.Study, space: tuple[ParamSpec, ...]) -> None:
    """TuneError naming the first ``tune.space`` entry that Optuna cannot draw in ``study``: one whose trials
    drew it as another type, on another scale (``log``) or, for a categorical, from other choices (Optuna
    refuses each such draw). Was only warned: the worker then failed three trials in a row
    (``ValueError: CategoricalDistribution does not support dynamic value space``), each left FAIL in the
    shared study. Other differences (a float or int range, a new entry) are Optuna's to take."""
    from optuna.distributions import check_distribution_compatibility

    drawn: dict[str, dict[str, Any]] = {}
    for trial in study.get_trials(deepcopy=False):
        for param, distribution in trial.distributions.items():
            drawn.setdefault(param, {}).setdefault(repr(distribution), distribution)
    for spec in space:
        new = spec.distribution()
        for old in drawn.get(spec.name, {}).values():
            try:
                check_distribution_compatibility(old, new)
            except ValueError as exc:
                raise TuneError(f"tune.space.{spec.name} cannot join study {study.study_name}: its trials drew "
                                f"{spec.name} from {old}, this worker's entry is {new} ({exc}); use the study's "
                                "tune.space, or another study") from None


def space_fingerprint(space: tuple[ParamSpec, ...]) -> str:
    return hashlib.sha256(json.dumps([dataclasses.asdict(s) for s in space], sort_keys=True,
                                     default=str).encode()).hexdigest()[:16]


# --- claiming trials: the study-wide budget, heartbeats ---------------------------------------


def budget_lock_name(study_name: str) -> str:
    """The name of the budget lock of study ``study_name`` (a SQLite storage's lock file is named after it)."""
    return f"kocr-tune:{study_name}"


@contextlib.contextmanager
def budget_lock(url: str, study_name: str) -> Iterator[None]:
    """Serialise counting and creating trials across workers of one study.

    PostgreSQL: a session advisory lock (released by the server if the worker dies); SQLite: an
    exclusive file lock beside the database (``<db>.<hash>.lock``, removed when the worker ends:
    :func:`_run_tune`); other databases: no lock (the budget may then be overshot by up to one trial
    per extra worker).
    """
    lock = database_lock(url, budget_lock_name(study_name))
    if lock is None:
        yield
        return
    with lock:
        yield


def trial_counts(study: optuna.Study) -> Counter[str]:
    """Trials of the study by state name (COMPLETE, PRUNED, FAIL, RUNNING, WAITING)."""
    return Counter(t.state.name for t in study.get_trials(deepcopy=False))


def claim_trial(study: optuna.Study, config: TuneConfig, url: str,
                storage: optuna.storages.RDBStorage) -> optuna.trial.Trial | str | None:
    """The next trial for this worker, ``WAIT`` when the budget is claimed but trials still run
    elsewhere (one of them may die and come back for retry), or None when the study is done.

    Under the budget lock: stale trials are failed first (their retries are queued as WAITING),
    then, while complete + pruned + running trials are fewer than ``n_trials``, a queued trial is
    taken if there is one, else a new one. Queued trials past the budget stay WAITING (a dead
    worker's retry always fits: its failed trial no longer counts). The claimed trial's first heartbeat is recorded
    before the lock is released (a trial without one is never found stale), so a running trial
    seen here without one belongs to no worker: its claimer died before beating, or another tool
    asked for it. It is given a heartbeat, and goes stale (then is retried) like a dead worker's.
    """
    with budget_lock(url, study.study_name):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            # ask() outside Study.optimize warns about heartbeats: this worker beats itself (heartbeat())
            warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
            for orphan in unbeaten_trials(study, storage):
                storage.record_heartbeat(orphan)
            with stops_deferred():  # a stale trial failed without its retry queued would be lost for good
                optuna.storages.fail_stale_trials(study)
            counts = trial_counts(study)
            # queued trials count when they run, as new ones do: enqueued ones must not overshoot the budget
            if counts["COMPLETE"] + counts["PRUNED"] + counts["RUNNING"] >= config.n_trials:
                return WAIT if counts["RUNNING"] else None
            trial = study.ask()
        storage.record_heartbeat(trial._trial_id)
        return trial


def unbeaten_trials(study: optuna.Study, storage: optuna.storages.RDBStorage) -> list[int]:
    """Ids of the study's running trials that have never recorded a heartbeat."""
    import sqlalchemy

    running = [t._trial_id for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))]
    if not running:
        return []
    query = sqlalchemy.text("SELECT trial_id FROM trial_heartbeats WHERE trial_id IN :ids").bindparams(
        sqlalchemy.bindparam("ids", expanding=True))
    with storage.engine.connect() as connection:
        beaten = {row[0] for row in connection.execute(query, {"ids": running})}
    return [trial_id for trial_id in running if trial_id not in beaten]


@contextlib.contextmanager
def heartbeat(storage: optuna.storages.RDBStorage, trial_id: int, interval_s: float) -> Iterator[None]:
    """Record the trial's heartbeat every ``interval_s`` while the block runs."""
    stop = threading.Event()

    def beat() -> None:
        while True:
            try:
                storage.record_heartbeat(trial_id)
            except Exception as exc:  # a lost connection must not kill training; the next beat retries
                print(f"tune: heartbeat of trial id {trial_id} failed: {exc}", file=sys.stderr)
            if stop.wait(interval_s):
                return

    thread = threading.Thread(target=beat, name=f"heartbeat-{trial_id}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


@contextlib.contextmanager
def retried_when_stopped(study: optuna.Study, storage: optuna.storages.RDBStorage, trial: optuna.trial.Trial,
                         url: str) -> Iterator[None]:
    """A worker stopped inside the block (SIGTERM, Ctrl-C: an exit, not an error) fails its running trial
    and queues its retry at once, under the budget lock, as the next worker would only once the trial's
    heartbeat went stale (``grace_period_s``). A SIGKILL is still left to the heartbeat, and so is a
    trial this cannot fail (the storage unreachable): said in one line, and the stop goes on."""
    try:
        yield
    except Exception:
        raise
    except BaseException as exc:
        from kocr.tracking import interrupted

        why = ("Ctrl-C" if isinstance(exc, KeyboardInterrupt) else "SIGTERM") if interrupted(exc) else repr(exc)
        try:
            with budget_lock(url, study.study_name):
                failed = fail_and_retry(study, storage, trial._trial_id)
            if failed:
                print(f"tune: trial {trial.number} stopped by {why}: failed, and queued again (up to "
                      "tune.max_retry times) for the next worker", file=sys.stderr)
        except Exception as error:  # the stop goes on whatever the storage says
            print(f"tune: trial {trial.number} stopped by {why} is left running ({type(error).__name__}: {error}); "
                  f"the next worker retries it {storage.grace_period} s after its last heartbeat", file=sys.stderr)
        raise


def fail_and_retry(study: optuna.Study, storage: optuna.storages.RDBStorage, trial_id: int) -> bool:
    """Fail a running trial and run the storage's stale-trial callback on it (it queues the retry and
    ends the trial's MLflow run if that is still RUNNING), as :func:`optuna.storages.fail_stale_trials`
    does for a stale one; False where the trial had finished (another worker failed it as stale)."""
    with stops_deferred():  # a trial failed without its retry queued would be lost for good: never stale again
        try:
            if not storage.set_trial_state_values(trial_id, state=TrialState.FAIL):
                return False
        except optuna.exceptions.UpdateFinishedTrialError:
            return False
        callback = storage.get_heartbeat_stale_trial_callback()
        if callback is not None:
            callback(study, storage.get_trial(trial_id))
        return True


@contextlib.contextmanager
def stops_deferred() -> Iterator[None]:
    """Inside the block a SIGTERM or Ctrl-C (SIGINT) waits: its handler runs once the block ends, so a
    stop while a trial is failed and queued again (this worker's stopped one, a dead worker's stale one)
    lands after both, not between.
    Only in the main thread, where Python runs signal handlers; elsewhere the block runs as it is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = {signum: signal.signal(signum, lambda signum, frame: caught.append(signum))
                for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
        if caught:
            signal.raise_signal(caught[0])


# --- one trial ---------------------------------------------------------------------------------


def trial_config(params: dict[str, Any], overrides: dict[str, Any], config: TuneConfig) -> TrainConfig:
    """params.yaml's ``train:`` (never the tuned file) with the trial's knobs and the trial budget."""
    section = {**(params.get("train") or {}), **overrides, "use_tuned": False,
               "steps": config.steps_per_trial, "val_every": config.report_every}
    return TrainConfig.from_params({**params, "train": section})


def always_searched(space: tuple[ParamSpec, ...]) -> frozenset[str]:
    """The knobs every trial of ``space`` searches: those of its unconditional entries, and a knob whose
    conditional entries between them cover every choice of the categorical entries they depend on, as
    params.yaml's ``lr`` (``optimizer`` adam or adamw) and ``lr_adadelta`` (adadelta) set ``lr`` in every trial.
    A knob that some trials do not search (a choice no entry's ``when`` lists, or a condition on a
    float or int entry, whose values cannot all be listed) is not one."""
    plain = {spec.name: spec for spec in space if not spec.when}
    searched = {spec.key for spec in plain.values()}
    for key in {spec.key for spec in space if spec.when} - searched:
        specs = [spec for spec in space if spec.key == key]
        names = sorted({other for spec in specs for other, _ in spec.when})
        if any(plain[name].type != "categorical" for name in names) \
                or math.prod(len(plain[name].choices) for name in names) > 10_000:
            continue
        combos = itertools.product(*(plain[name].choices for name in names))
        if all(any(spec.applies(dict(zip(names, combo))) for spec in specs) for combo in combos):
            searched.add(key)
    return frozenset(searched)


def fixed_knob_params(params: dict[str, Any], config: TuneConfig) -> dict[str, str]:
    """The ``tune`` run's ``train.*``/``model.*`` params: the knobs every trial of ``config`` trains
    with that it does not search, with the trial budget (``train.steps`` = ``steps_per_trial``,
    ``train.val_every`` = ``report_every``); the knobs every trial searches (:func:`always_searched`)
    are left out, as no trial trains with params.yaml's value of them (was: only those of unconditional
    entries, so the tune run showed params.yaml's ``train.lr``, which the default space sets in every trial)."""
    return knob_params(trial_config(params, {}, config), leave_out=always_searched(config.space))


def run_trial(trial: optuna.trial.Trial, config: TuneConfig, params: dict[str, Any],
              data_dir: str | os.PathLike, log: bool = True,
              scorer: Callable[..., dict[str, float]] | None = None) -> tuple[TrialState, float | None, str]:
    """Train one trial in a temporary folder; returns (state, value, note) for ``study.tell``.

    Each validation score is reported at its step; when the pruner says so the trial stops there
    (PRUNED). The value is the best validation score reached. A trial another worker has meanwhile
    failed as stale stops at its next report ("lost"; its retry is already queued). With ``log``, a
    nested MLflow run under the active one holds every knob the trial trained with (:func:`knob_params`;
    tag ``kocr.searched`` names the ones the sampler chose), its curves and its value as ``best_<metric>``
    (``best_val_cer``), the best value that metric reached in the trial (a train run's ``best_val_cer``
    is its too; the train run logs its kept checkpoint's other scores as ``at_best_cer_val_<x>``).
    """
    import mlflow

    from kocr.tracking import inherit_inputs, interrupted, nested_stage_tags, stop_goes_on

    key, direction = METRICS[config.metric]
    better = min if direction == "minimize" else max
    reported: list[tuple[float, float]] = []  # (value, val loss) of each validation

    def on_validation(step: int, scores: dict[str, float]) -> None:
        if key not in scores:
            raise TuneError(f"{data_dir}: the validation set is empty; tuning needs validation scores")
        value = float(scores[key])
        reported.append((value, float(scores.get("loss", math.inf))))
        trial.report(value, step)
        if trial.should_prune():
            raise optuna.TrialPruned(f"at step {step}: {config.metric} {value:.4f}")

    run = None
    state, value, note, stopped = TrialState.FAIL, None, "", False
    try:
        trial.set_user_attr(STEPS, config.steps_per_trial)  # this trial's budget, whatever other workers give theirs
        overrides = suggest(trial, config.space)
        if log:
            active = mlflow.active_run()
            # the stage run's tags and data inputs (mlflow.active_run() holds no inputs: read it back)
            parent = mlflow.get_run(active.info.run_id) if active else None
            tags = nested_stage_tags(parent) if parent else {}
            run = mlflow.start_run(run_name=f"trial-{trial.number}", nested=True,
                                   experiment_id=parent.info.experiment_id if parent else None,
                                   tags={**tags, "kocr.study": trial.study.study_name, "kocr.trial": str(trial.number)})
            trial.set_user_attr("mlflow_run_id", run.info.run_id)
            if parent:
                inherit_inputs(parent, run.info.run_id)
            mlflow.set_tag("kocr.searched", ",".join(sorted(overrides)))
        try:
            train_config = trial_config(params, overrides, config)
        except ParamsError:
            if run is not None:  # the knobs it was given, though they make no train config
                mlflow.log_params({f"{'model' if k in MODEL_KNOBS else 'train'}.{k}": v for k, v in overrides.items()})
            raise
        if run is not None:  # every knob it trains with, searched or fixed, and the steps it trains
            mlflow.log_params(knob_params(train_config))
        # $TMPDIR/.kocr-trial-N.TAG-PID.HEX.tmp: a killed worker's folder (checkpoints) goes with the next trial
        with scratch_folder(f"{TRIAL_FOLDER}{trial.number}", sweep=TRIAL_FOLDER) as tmp:
            train(train_config, data_dir, tmp, metrics_file=Path(tmp) / "metrics.json",
                  plots_dir=Path(tmp) / "plots", progress=False, log=log, on_validation=on_validation,
                  scorer=scorer)
        value = better(v for v, _ in reported)
        # the val loss where that value was reached (the lowest such): equal values rank by it, as
        # train keeps its best checkpoint (best_params_document)
        trial.set_user_attr(TIE_BREAK, min(loss for v, loss in reported if v == value))
        state = TrialState.COMPLETE if math.isfinite(value) else TrialState.FAIL
        note = f"{config.metric} {value:.4f}"
    except optuna.TrialPruned as exc:
        state, note = TrialState.PRUNED, f"pruned {exc}"
    except optuna.exceptions.UpdateFinishedTrialError:
        # another worker failed it as stale (this worker's heartbeat came too late) and queued a retry
        state, note = TrialState.FAIL, "lost: already failed as stale by another worker; its retry is queued"
    except Exception as exc:
        state, note = TrialState.FAIL, f"failed: {type(exc).__name__}: {exc}"
        with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
            trial.set_user_attr("error", note[:1000])
        # a full disk, or a full SQLite database (MLflow's store, the Optuna storage): every trial after
        # it would fail the same way
        if isinstance(exc, OSError) and exc.errno in DISK_FULL or database_full(exc):
            raise
    except BaseException as exc:  # SIGTERM (an exit in kocr) or Ctrl-C: the trial's run ends KILLED, as its stage's
        if interrupted(exc):
            stopped = True
        raise
    finally:
        if run is not None:
            # a stop goes on whatever the MLflow store says (busy, down): raised, its error replaced the SIGTERM or
            # Ctrl-C, so the worker failed the trial without queueing its retry (lost for good) and exited 2;
            # retried_when_stopped fails and queues it, and its run is ended there if it can be
            with stop_goes_on(stopped, f"trial {trial.number}: its MLflow run {run.info.run_id} could not be ended "
                              "KILLED", who="tune"):
                try:
                    if value is not None and math.isfinite(value):
                        # best_<metric>: the best value the metric reached, as the tune run names the study's best;
                        # a train run's best_val_cer (its kept checkpoint's, kept for it) is the same thing, and
                        # its other scores there are at_best_cer_val_<x> (train.summary_metrics): no column of
                        # the MLflow UI means two things whatever tune.metric is
                        mlflow.log_metric(f"best_{config.metric}", value)
                    mlflow.set_tag("optuna.state", state.name)
                finally:  # the trial's run is ended (and leaves the active-run stack) even if the store is full
                    mlflow.end_run("KILLED" if stopped else
                                   {TrialState.COMPLETE: "FINISHED", TrialState.PRUNED: "KILLED"}.get(state, "FAILED"))
    return state, value, note


# --- the worker ----------------------------------------------------------------------------------


def e2e_scorer(config: TuneConfig, params: dict[str, Any], data_dir: str | os.PathLike):
    """The end-to-end scorer on the ``e2e_split`` pages of ``<data_dir>/splits.json`` (page folder: data.source)."""
    from evaluation.evaluate import EvaluateConfig, test_pages
    from evaluation.page_scorer import PageSetScorer
    from evaluation.reader import DetectorSettings

    source = data_section(params).get("source", "data/sample")
    pages = test_pages(source, Path(data_dir) / "splits.json", config.e2e_split, limit=config.e2e_pages)
    if not pages:
        raise TuneError(f"{Path(data_dir) / 'splits.json'}: no {config.e2e_split!r} pages for tune.metric e2e_f1")
    print(f"tune: e2e_f1 on {len(pages)} {config.e2e_split} pages of {source} (detected once)", file=sys.stderr)
    return PageSetScorer(pages, DetectorSettings.from_params(params.get("detector")),
                         EvaluateConfig.from_params(params).iou_threshold)  # the gate the evaluate stage scores with


def run_tune(config: TuneConfig, params: dict[str, Any], data_dir: str | os.PathLike,
             out_dir: str | os.PathLike, log: bool = True) -> dict[str, Any]:
    """Run one worker on the study until the study-wide budget or this worker's time is spent.

    Then writes ``<out>/best_params.yaml`` from the whole study (raises TuneError when no trial has
    completed) and, with ``log``, logs the study's pictures and best value to the active MLflow run
    (the worker's ``tune`` run; trials nest under it). Returns a summary.
    """
    url = storage_url(config, out_dir)
    with named_database_full(url):
        return _run_tune(config, params, data_dir, out_dir, url, log)


@contextlib.contextmanager
def named_database_full(storage: str) -> Iterator[None]:
    """Inside the block, SQLite's "database or disk is full" under MLflow's store or the Optuna
    storage (SQLAlchemy's ``OperationalError``, inside MLflow's or Optuna's own error) raises the
    ``OSError`` of a full disk (ENOSPC) naming the database file: MLflow's store when MLflow raised
    it, else the storage. ``kocr tune`` then says so in one line, as for any other full disk. Other
    errors, other OperationalErrors included, pass as they are."""
    try:
        yield
    except Exception as exc:
        if not database_full(exc):
            raise
        url, cause = storage, exc
        for _ in range(20):  # a cause chain is short; this also ends one made circular by hand
            if cause is None:
                break
            if type(cause).__module__.startswith("mlflow."):
                import mlflow

                url = mlflow.get_tracking_uri()
                break
            cause = cause.__cause__
        where = sqlalchemy_url(url).database if url.startswith("sqlite:") else None
        raise OSError(errno.ENOSPC, "No space left on device (SQLite: database or disk is full)",
                      where or redact(url)) from exc


def _run_tune(config: TuneConfig, params: dict[str, Any], data_dir: str | os.PathLike,
              out_dir: str | os.PathLike, url: str, log: bool) -> dict[str, Any]:
    """``run_tune`` with the storage URL resolved (full databases are named by the caller)."""
    shared = not url.startswith("sqlite")
    storage = make_storage(url, config)
    study = open_study(config, storage, shared)
    try:
        return _work_on(study, storage, config, params, data_dir, out_dir, url, log)
    finally:
        # the budget lock's file beside a SQLite storage holds nothing once no worker claims: one per
        # study was left in tuning/ for good (a new study per run). A worker still claiming makes it anew.
        discard_database_lock(url, budget_lock_name(study.study_name))
        discard_unheld_lock_files(url)  # and those of other studies' SIGKILLed workers, which stayed for good


def _work_on(study: optuna.Study, storage: optuna.storages.RDBStorage, config: TuneConfig, params: dict[str, Any],
             data_dir: str | os.PathLike, out_dir: str | os.PathLike, url: str, log: bool) -> dict[str, Any]:
    """Run trials of ``study`` until its budget or this worker's time is spent, then finish it."""
    if log:
        import mlflow

        mlflow.set_tags({"kocr.study": study.study_name, "kocr.storage": recorded_storage(url),  # as best_params.yaml
                         "kocr.worker": f"{socket.gethostname()}:{os.getpid()}"})
    print(f"tune: study {study.study_name} in {redact(url)}: {config.n_trials} trials of "
          f"{config.steps_per_trial} steps, {config.metric} ({config.direction}), pruner {config.pruner}",
          file=sys.stderr)
    scorer = e2e_scorer(config, params, data_dir) if config.metric == "e2e_f1" else None
    started = time.monotonic()
    ran: Counter[str] = Counter()
    failed_in_row, waiting_said = 0, False
    while not config.timeout_s or time.monotonic() - started < config.timeout_s:
        trial = claim_trial(study, config, url, storage)
        if trial is None:
            break
        if trial == WAIT:
            if not waiting_said:
                print(f"tune: budget claimed; waiting for {trial_counts(study)['RUNNING']} running trial(s) "
                      f"(a dead worker's trial is retried after {config.grace_period_s} s)", file=sys.stderr)
                waiting_said = True
            time.sleep(config.heartbeat_interval_s)
            continue
        waiting_said = False
        with retried_when_stopped(study, storage, trial, url), \
                heartbeat(storage, trial._trial_id, config.heartbeat_interval_s):
            try:
                state, value, note = run_trial(trial, config, params, data_dir, log=log, scorer=scorer)
            except Exception:  # a full disk or database (or MLflow failing to end the trial's run): the search stops
                with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
                    study.tell(trial, None, state=TrialState.FAIL)
                raise
        try:
            study.tell(trial, value if state == TrialState.COMPLETE else None, state=state)
        except optuna.exceptions.UpdateFinishedTrialError:  # failed as stale meanwhile; its retry is queued
            note += " (but it was already failed as stale)"
        ran[state.name] += 1
        retried = storage.get_trial(trial._trial_id).system_attrs.get("failed_trial")
        print(f"tune: trial {trial.number}{f' (retry of {retried})' if retried is not None else ''} "
              f"{state.name.lower()}: {note}; {trial.params}", file=sys.stderr)
        failed_in_row = failed_in_row + 1 if state == TrialState.FAIL and not note.startswith("lost") else 0
        if failed_in_row >= 3:
            raise TuneError(f"three trials in a row failed; last: {note}")
    queued = trial_counts(study)["WAITING"]
    if queued:
        print(f"tune: {queued} queued trial(s) left waiting: the study's budget of {config.n_trials} trials is "
              "spent (a larger --n-trials runs them)", file=sys.stderr)
    summary = finish_study(study, config, url, Path(out_dir), log=log)
    return {**summary, "ran": dict(ran)}


TIE_BREAK = "val_loss"  # trial user attribute: the val loss where the trial reached its value


def best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial:
    """The best COMPLETE trial; among trials of equal value (val_cer 1.0 ties on short budgets) the
    one with the lowest val loss there, as train breaks CER ties, then the earliest."""
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    sign = 1.0 if study.direction == optuna.study.StudyDirection.MINIMIZE else -1.0
    return min(done, key=lambda t: (sign * t.value, t.user_attrs.get(TIE_BREAK, math.inf), t.number))


def recorded_storage(url: str) -> str:
    """The storage URL as ``best_params.yaml`` records it: its password hidden, and an SQLite file inside
    the project (the embedded ``tuning/optuna.db``) as a path relative to the project root
    (``sqlite:///tuning/optuna.db``, as ``optuna-dashboard`` takes it there), so the committed file names
    no machine's checkout and stays the same wherever the same study is found. A file outside the
    project keeps its absolute path. Was: the absolute path of whichever checkout ran ``tune``.

    The project root is the DVC project's (the user's checkout in a queued or ``--temp`` experiment,
    whose embedded study lives there: :func:`storage_url`), else the current folder.
    """
    from kocr.tracking import _dvc_project, store_dir

    if not url.startswith("sqlite:"):
        return redact(url)
    parsed = sqlalchemy_url(url)
    if parsed.database in (None, "", ":memory:") or not Path(parsed.database).is_absolute():
        return redact(url)
    here = store_dir()
    root = (_dvc_project(here) or here).resolve()
    try:
        inside = Path(parsed.database).resolve().relative_to(root)
    except ValueError:
        return redact(url)
    return redact(parsed.set(database=inside.as_posix()).render_as_string(hide_password=False))


def best_params_document(study: optuna.Study, config: TuneConfig, url: str) -> dict[str, Any]:
    """What ``best_params.yaml`` holds: the best trial's knobs as ``train:``, its value and where it came from."""
    counts = trial_counts(study)
    if not counts["COMPLETE"]:
        raise TuneError(f"study {study.study_name}: no trial completed ({dict(counts)}); nothing to write")
    best = best_trial(study)
    tuned = {spec.key: best.params[spec.name] for spec in config.space if spec.name in best.params}
    return {"study": study.study_name, "storage": recorded_storage(url), "metric": config.metric,
            "direction": config.direction, "value": float(best.value), "trial": best.number,
            "trials": {k.lower(): counts[k] for k in ("COMPLETE", "PRUNED", "FAIL", "RUNNING", "WAITING")},
            # the steps the best trial trained (a trial from before they were recorded: this worker's)
            "steps_per_trial": int(best.user_attrs.get(STEPS, config.steps_per_trial)), "train": tuned}


def finish_study(study: optuna.Study, config: TuneConfig, url: str, out_dir: Path, log: bool = True) -> dict[str, Any]:
    """Write ``best_params.yaml``; with ``log`` also the pictures, best value and document to MLflow."""
    import yaml

    doc = best_params_document(study, config, url)
    out_dir.mkdir(parents=True, exist_ok=True)
    header = ("# Written by `kocr tune`: the best trial's train: knobs. `train` uses them when\n"
              "# params.yaml has train.use_tuned: true (see docs/tuning.md).\n")
    write_text(out_dir / "best_params.yaml", header + yaml.safe_dump(doc, allow_unicode=True, sort_keys=False))
    if log:
        import mlflow

        mlflow.log_metrics({f"best_{config.metric}": doc["value"], "best_trial": doc["trial"],
                            **{f"trials_{k}": v for k, v in doc["trials"].items()}})
        # best.steps_per_trial: the steps the best trial trained, which a worker of another budget
        # (its own tune.steps_per_trial and train.steps) did not give it
        mlflow.log_params({**{f"best.{k}": v for k, v in doc["train"].items()},
                           "best.steps_per_trial": doc["steps_per_trial"]})
        mlflow.log_dict(doc, "tuning/best_params.yaml")
        log_study_figures(study, config.metric)
    return doc


def log_study_figures(study: optuna.Study, metric: str = "Objective Value") -> list[str]:
    """Optimisation history, intermediate values and (from two completed trials) parameter
    importances as PNGs in the active MLflow run, their value axis (and legend) named ``metric``
    (``val_cer``: which metric, and so which way is better, the picture says); returns the artifact
    paths logged."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as vis

    import mlflow

    complete = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    plots = {"optimization_history": functools.partial(vis.plot_optimization_history, target_name=metric),
             "intermediate_values": vis.plot_intermediate_values}  # takes no name: its axis is named below
    if len(complete) >= 2:
        plots["param_importances"] = functools.partial(vis.plot_param_importances, target_name=metric)
    else:
        print("tune: parameter importances need two completed trials; not drawn", file=sys.stderr)
    logged = []
    for name, plot in plots.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # optuna's matplotlib backend is marked experimental
                ax = plot(study)
        except Exception as exc:  # e.g. importances when every trial scored the same
            print(f"tune: {name} not drawn: {exc}", file=sys.stderr)
            continue
        figure = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
        if name == "intermediate_values":
            ax.set_ylabel(metric)  # optuna's "Intermediate Value" names no metric
        figure.set_size_inches(8, 5)
        figure.tight_layout()
        mlflow.log_figure(figure, f"tuning/{name}.png")
        plt.close(figure)
        logged.append(f"tuning/{name}.png")
    return logged
