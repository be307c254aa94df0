"""The ``promote`` stage: register the candidate, alias it ``challenger``, move ``champion`` on merit.

``champion`` moves only when the candidate's ``e2e_f1`` beats the champion's on the same evaluation
set (same content hash), scored the same way (same detector settings, IoU threshold and scorer
version: ``eval_scoring_hash``), by at least ``min_delta``. When the champion was scored on another
set or another way, it is scored again on this one first (``rescore``), and that score is kept on
the champion's version (a ``rescored_<metric>.<key>`` tag, :func:`rescore_tag`), so a later promote on
the same set, scored the same way, reuses it instead of scoring the champion again. Decision, both
scores and the hashes become tags on the candidate's version, which gets a description
(:func:`version_description`) when it has none (a rerun of a promote stopped before writing it fills it
in; one someone wrote is kept). The registered model gets a description
(:func:`model_description`) when it has none; one someone wrote is kept.

Example:
    >>> decision = promote(candidate, PromoteConfig(), rescore=lambda uri: 0.4)   # doctest: +SKIP
    >>> decision["promoted"]                                                       # doctest: +SKIP
    True
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from mlflow.exceptions import MlflowException

import mlflow
from kocr.locks import LockError, database_lock, file_lock
from kocr.params import ParamsError, check_keys, typed
from kocr.redact import hide_passwords
from kocr.tracking import NOT_FOUND, filter_value
from kocr import KocrWarning


HIGHER_IS_BETTER = frozenset({f"e2e_{m}{micro}" for m in ("f1", "precision", "recall") for micro in ("", "_micro")}
                             | {f"cleval_{k}_{m}" for k in ("det", "e2e") for m in ("f1", "precision", "recall")}
                             | {"word_accuracy", "norm_ed"})
LOWER_IS_BETTER = frozenset({"cer"})
RANKED = HIGHER_IS_BETTER | LOWER_IS_BETTER  # the scores of metrics/evaluate.json promote can rank by


@dataclass(frozen=True)
class PromoteConfig:
    """Knobs of the promote stage (``promote:`` in params.yaml)."""

    model_name: str = "ko-ocr-recognizer"
    metric: str = "e2e_f1"
    min_delta: float = 0.0
    lock_url: str = ""                # PostgreSQL URL for the lock when tracking goes to a server

    def __post_init__(self) -> None:
        if self.metric not in RANKED:
            raise ParamsError(f"promote.metric: {self.metric!r} is not a score of metrics/evaluate.json "
                              f"to rank by; one of {', '.join(sorted(RANKED))}")

    @staticmethod
    def logged(params: dict[str, Any]) -> dict[str, Any]:
        """``promote:`` as logged to MLflow, where everyone with READ sees it: the lock URL's password hidden."""
        return {k: hide_passwords(v) if k == "lock_url" and isinstance(v, str) else v for k, v in params.items()}

    def gain(self, candidate: float, champion: float) -> float:
        """How much better ``candidate`` scores than ``champion``: lower is better for ``cer``."""
        return champion - candidate if self.metric in LOWER_IS_BETTER else candidate - champion

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> "PromoteConfig":
        """``promote:`` checked before anything is registered: an unknown key (a misspelt ``min_delta``
        would promote on 0) or a value of the wrong type raises ParamsError naming it."""
        check_keys("promote", params, cls.__dataclass_fields__)
        kinds = {"model_name": str, "metric": str, "min_delta": float, "lock_url": str}
        return cls(**{k: typed(f"promote.{k}", v, kinds[k]) for k, v in params.items()})


@dataclass(frozen=True)
class Candidate:
    """What the pipeline produced: the logged model, its score and the evaluation set it was scored on."""

    model_uri: str
    run_id: str
    score: float
    eval_data_hash: str
    eval_scoring_hash: str = ""  # evaluation.evaluate.scoring_hash: how the set was scored


LOCK_URL_ENV = "KOCR_PROMOTE_LOCK_URL"


@contextlib.contextmanager
def promotion_lock(model_name: str, lock_url: str = "") -> Iterator[None]:
    """Serialise champion decisions for ``model_name`` across processes and machines.

    MLflow has no compare-and-set on aliases, so two promotions that both read the old champion
    would both win. The lock is a PostgreSQL advisory lock when ``lock_url`` (else the environment's
    ``KOCR_PROMOTE_LOCK_URL``, which keeps a password out of git, else the tracking URI) is a PostgreSQL
    database, and an exclusive file lock beside the store for SQLite and file stores.
    A tracking server without either falls back to no lock, with a warning: run promotions from one
    place (the retrain workflow's concurrency group does) or set one of them. A lock URL that is set
    but names no PostgreSQL (``postgresql://`` or ``postgres://``) or SQLite file is refused.
    """
    chosen = lock_url or os.environ.get(LOCK_URL_ENV)
    uri = chosen or mlflow.get_tracking_uri()
    lock = None
    if _database_backend(uri) in ("postgresql", "postgres", "sqlite"):
        lock = database_lock(uri, f"kocr-promote:{model_name}")
    if lock is None and chosen:  # asked for a lock it cannot take: never promote unlocked while believing otherwise
        raise LockError(f"{'promote.lock_url' if lock_url else LOCK_URL_ENV} {hide_passwords(chosen)}: not a "
                        "PostgreSQL or SQLite URL (postgresql://USER:PASSWORD@HOST:5432/DB)")
    elif lock is None and (uri.startswith("file:") or "://" not in uri):  # a file store: a lock file beside it
        folder = Path(uri.removeprefix("file://"))
        lock = file_lock(folder.with_name(f"{folder.name}.{model_name}.promote.lock"))
    if lock is not None:
        with lock:
            yield
        return
    warnings.warn(f"promotion of {model_name} is not locked: set {LOCK_URL_ENV} (or promote.lock_url) to a "
                  "PostgreSQL URL when several pipelines may promote at once", KocrWarning, stacklevel=3)
    yield


def _database_backend(uri: str) -> str:
    """SQLAlchemy's backend name of ``uri`` (``postgresql`` for ``postgresql+psycopg2://``, ``postgres``
    for ``postgres://``, ``http`` for a tracking server), or "" when it is no URL at all (a plain path)."""
    import sqlalchemy

    try:
        return sqlalchemy.engine.make_url(uri).get_backend_name()
    except (sqlalchemy.exc.ArgumentError, ValueError):
        return ""


def _champion(client: mlflow.MlflowClient, name: str):
    """The champion's version, or None when there is none; any other registry error is raised
    (a server answering 5xx or 403 must not look like "no champion yet" and promote anything)."""
    try:
        return client.get_model_version_by_alias(name, "champion")
    except MlflowException as exc:
        if exc.error_code in NOT_FOUND:
            return None
        raise


def promote(candidate: Candidate, config: PromoteConfig, rescore: Callable[[str], float],
            evaluated_champion: tuple[str, float, str] | None = None, check: Callable[[str], None] | None = None,
            begin: Callable[[], object] | None = None) -> dict[str, Any]:
    """Register ``candidate`` and decide on ``champion``; returns the decision as a flat dict.

    ``evaluated_champion``: ``(models:/NAME/VERSION, score, run_id)`` of the champion evaluate scored beside
    the candidate, on its set and the same way; used instead of ``rescore`` when the alias still names that
    version, registered from that run (a registered model deleted and made again numbers its versions from 1
    anew: another run's version 1 is not the one evaluate scored, and is re-scored).

    ``check``: called with the champion's ``models:/NAME/VERSION`` when it must be re-scored, before anything
    is written, to refuse (raise) a re-scoring that cannot be comparable (``kocr promote``: other pages than
    those evaluate scored the candidate on, or scored another way). ``begin``: called once, after those
    refusals and before the first write (``kocr promote`` starts its MLflow run there: a refusal starts none).

    The lock is taken first, and the registry read before anything is written: a lock that cannot be had,
    or a refused re-scoring, leaves the registry as it was (no version without a decision, ``challenger``
    unmoved), and ``challenger`` moves in the order decisions do."""
    client = mlflow.MlflowClient()
    metric = config.metric
    with promotion_lock(config.model_name, config.lock_url):
        version = registered_before(client, config.model_name, candidate, metric)
        champion = _champion(client, config.model_name)
        if (check is not None and champion is not None and str(champion.version) != version
                and _known_score(champion, config, candidate, evaluated_champion) is None):
            check(f"models:/{config.model_name}/{champion.version}")  # a refusal here writes nothing
        if begin is not None:
            begin()
        try:
            client.create_registered_model(config.model_name)
        except MlflowException:
            pass  # exists already
        if version is None:
            version = mlflow.register_model(candidate.model_uri, config.model_name,
                                            tags={"source_run_id": candidate.run_id, metric: str(candidate.score),
                                                  "eval_data_hash": candidate.eval_data_hash,
                                                  "eval_scoring_hash": candidate.eval_scoring_hash}).version
        _describe_version(client, config.model_name, version, candidate, metric)
        _describe_model(client, config)  # after the registration: a user the registry refuses stops there, as before
        client.set_registered_model_alias(config.model_name, "challenger", version)
        return _decide(client, config, candidate, version, champion, rescore, evaluated_champion)


def model_description(config: PromoteConfig) -> str:
    """The registered model's description (Markdown, as the MLflow UI shows it): what its versions are,
    the score ``champion`` moves on and how to load the champion, as a pyfunc or an EasyOCR bundle."""
    name, metric = config.model_name, config.metric
    better = "lower" if metric in LOWER_IS_BETTER else "higher"
    return (f"Korean text recogniser fine-tuned by the kocr pipeline: EasyOCR's generation-2 recogniser "
            f"(None-VGG-BiLSTM-CTC, the `korean_g2` layout). Each version is the MLflow pyfunc of one "
            f"`train` run: the checkpoint with the CRAFT detector settings it was evaluated with; it reads "
            f"page images and returns page JSON (word boxes and text).\n\n"
            f"`challenger` names the newest candidate; `champion` moves to a candidate only when its `{metric}` "
            f"({better} is better) on the held-out evaluation set, scored the same way, beats the "
            f"champion's by at least `promote.min_delta` (each version's tags and description give its "
            f"score and set).\n\n"
            f"Load the champion: `mlflow.pyfunc.load_model(\"models:/{name}@champion\")"
            f".predict([\"scan.jpg\"])`. As an EasyOCR drop-in bundle: `kocr export-easyocr --model "
            f"models:/{name}@champion --out models/easyocr --name ko_ocr`, then `easyocr.Reader([\"ko\", "
            f"\"en\"], recog_network=\"ko_ocr\", model_storage_directory=\"models/easyocr/model\", "
            f"user_network_directory=\"models/easyocr/user_network\")`; the bundle's README gives the "
            f"`readtext` settings to read with.")


def _describe_model(client: mlflow.MlflowClient, config: PromoteConfig) -> None:
    """Give the registered model :func:`model_description` when it has none; a description someone
    wrote is kept (clear it to have the next promote write this one). A registry that refuses costs
    only the description (warned), never the promotion."""
    try:
        if not (client.get_registered_model(config.model_name).description or "").strip():
            client.update_registered_model(config.model_name, description=model_description(config))
    except MlflowException as exc:
        warnings.warn(f"{config.model_name}: its description was not set ({exc.message})", KocrWarning, stacklevel=3)


def _describe_version(client: mlflow.MlflowClient, name: str, version: str, candidate: Candidate, metric: str) -> None:
    """Give the candidate's version :func:`version_description` when it has none: the version just registered,
    or one an earlier promote of this candidate registered and was stopped (SIGTERM, Ctrl-C, a kill) before
    describing (:func:`registered_before` finds it, and was: it stayed undescribed for good). A description
    someone wrote on the version since is kept."""
    if not (client.get_model_version(name, version).description or "").strip():
        client.update_model_version(name, version, description=version_description(candidate, metric))


def registered_before(client: mlflow.MlflowClient, name: str, candidate: Candidate, metric: str) -> str | None:
    """The version of ``name`` an earlier promote of this very candidate registered (the same model of
    the same run, with the same ``metric`` score on the same evaluation set scored the same way), or None.

    A promote killed (or stopped by a full disk) after registering, before ``metrics/promote.json`` and
    ``dvc.lock`` were written, is run again by ``dvc repro``; it decides on that version instead of
    registering the model a second time (was: a second version, which then "did not beat" the first
    when the first had been made champion). The newest such version when there are several."""
    found = client.search_model_versions(f"name = {filter_value(name)} and run_id = {filter_value(candidate.run_id)}")
    same = [v for v in found if v.source == candidate.model_uri and v.tags.get(metric) == str(candidate.score)
            and v.tags.get("eval_data_hash") == candidate.eval_data_hash
            and v.tags.get("eval_scoring_hash", "") == candidate.eval_scoring_hash]
    return str(max(int(v.version) for v in same)) if same else None


def version_description(candidate: Candidate, metric: str) -> str:
    """A registry version's description: the run that trained it, the data it trained on (the run's
    ``kocr.data.train`` hash, when the store still holds the run) and its score on the evaluation set,
    e.g. ``trained by run 9f2… on data 3c1…; e2e_f1 0.6123 on eval set 77a…``."""
    trained = ""
    with contextlib.suppress(MlflowException):
        data = mlflow.MlflowClient().get_run(candidate.run_id).data.tags.get("kocr.data.train")
        trained = f" on data {data}" if data else ""
    return (f"trained by run {candidate.run_id}{trained}; {metric} {candidate.score:.4f} on eval set "
            f"{candidate.eval_data_hash}")


BESIDE = "scored on this set beside the candidate by evaluate"  # the reason's words for evaluate's score


def _known_score(champion, config: PromoteConfig, candidate: Candidate,
                 evaluated_champion: tuple[str, float, str] | None) -> tuple[float, str] | None:
    """The champion's score on the candidate's set, scored the same way, known without reading the pages,
    and where it comes from: its recorded score (the same set and scoring), a re-score an earlier promote
    kept on its version, or evaluate's score of it (``evaluated_champion``: the same version number, registered
    from the same run); None when it must be re-scored."""
    metric = config.metric
    same_set = champion.tags.get("eval_data_hash") == candidate.eval_data_hash
    same_way = champion.tags.get("eval_scoring_hash", "") == candidate.eval_scoring_hash
    if same_set and same_way and metric in champion.tags:
        return float(champion.tags[metric]), "its recorded score on the same set"
    kept = rescored(champion.tags, metric, candidate)
    if kept is not None:
        return kept, "re-scored on this set by an earlier promote"
    if (evaluated_champion and evaluated_champion[0] == f"models:/{config.model_name}/{champion.version}"
            and evaluated_champion[2] and evaluated_champion[2] == champion.run_id):
        return evaluated_champion[1], BESIDE
    return None


def _decide(client: mlflow.MlflowClient, config: PromoteConfig, candidate: Candidate, version: str, champion: Any,
            rescore: Callable[[str], float],
            evaluated_champion: tuple[str, float, str] | None = None) -> dict[str, Any]:
    """Compare with ``champion`` (its version, read under the lock before the candidate was registered, or None)
    and move the alias; runs under the promotion lock."""
    metric = config.metric
    decision: dict[str, Any] = {"model_name": config.model_name, "candidate_version": int(version),
                                f"candidate_{metric}": candidate.score, "eval_data_hash": candidate.eval_data_hash,
                                "min_delta": config.min_delta}
    if champion is None:
        promoted, reason, champion_score, margin = True, "no champion before it: the first champion", None, None
    elif str(champion.version) == str(version):  # an earlier promote of this candidate made it champion
        recorded = _recorded_decision(client, config.model_name, version)
        if recorded is not None:  # its decision stands
            return recorded
        # made champion by a promote of an older kocr, which kept no decision
        promoted, champion_score, margin = True, candidate.score, None
        reason = f"v{version} is champion already: an earlier promote of this candidate promoted it"
    else:
        decision["champion_version"] = int(champion.version)
        same_set = champion.tags.get("eval_data_hash") == candidate.eval_data_hash
        same_way = champion.tags.get("eval_scoring_hash", "") == candidate.eval_scoring_hash
        known = _known_score(champion, config, candidate, evaluated_champion)
        if known is not None:
            champion_score, how = known
            if how == BESIDE:  # kept on the champion's version as a re-score of this set
                _keep_rescore(client, config.model_name, champion.version, metric, candidate, champion_score)
        else:
            champion_score = rescore(f"models:/{config.model_name}/{champion.version}")
            how = ("re-scored on this set (it was scored on another)" if not same_set else
                   "re-scored on this set (it was scored another way: detector settings, IoU threshold or "
                   "scorer version)" if not same_way else f"re-scored on this set (its version has no {metric} tag)")
            _keep_rescore(client, config.model_name, champion.version, metric, candidate, champion_score)
        margin = config.gain(candidate.score, champion_score)
        promoted = margin > 0 and margin >= config.min_delta - 1e-9  # 0.57 - 0.56 is 0.00999…: still 0.01
        verb = "beats" if promoted else "does not beat"
        reason = (f"candidate {metric} {candidate.score:.4f} {verb} champion v{champion.version} "
                  f"{champion_score:.4f} ({how}) by min_delta {config.min_delta}")
    decision.update({"promoted": promoted, "reason": reason, f"champion_{metric}": champion_score,
                     f"delta_{metric}": margin})
    if promoted:
        decision["champion_version"] = int(version)
    client.set_model_version_tag(config.model_name, version, "decision",
                                 "promoted" if promoted else "not promoted")
    client.set_model_version_tag(config.model_name, version, "decision_reason", reason)
    client.set_model_version_tag(config.model_name, version, DECISION_TAG, json.dumps(decision))
    if promoted:
        client.set_registered_model_alias(config.model_name, "champion", version)
    return decision


def decision_metrics(decision: dict[str, Any], metric: str) -> dict[str, float]:
    """The numbers a decision was made on, as the promote run's MLflow metrics: ``candidate_<metric>`` and
    ``champion_<metric>`` (the names evaluate gives each model's score: one column for both stages),
    ``delta_<metric>`` (how much the candidate beats the champion by, what ``min_delta`` is compared
    with: ``champion - candidate`` for ``cer``) and ``promoted`` (1 or 0). A first champion has no
    champion's score and no delta: those two are left out, not logged as 0.

    >>> decision_metrics({"candidate_e2e_f1": 0.61, "champion_e2e_f1": 0.58, "delta_e2e_f1": 0.03,
    ...                   "promoted": True}, "e2e_f1")
    {'candidate_e2e_f1': 0.61, 'champion_e2e_f1': 0.58, 'delta_e2e_f1': 0.03, 'promoted': 1.0}
    """
    keys = (f"candidate_{metric}", f"champion_{metric}", f"delta_{metric}")
    scores = {key: float(decision[key]) for key in keys if decision.get(key) is not None}
    return {**scores, "promoted": float(bool(decision["promoted"]))}


def log_on_model_run(candidate: Candidate, scores: dict[str, Any]) -> dict[str, float]:
    """Log the candidate's evaluation ``scores`` (``metrics/evaluate.json``'s ``candidate``, the :data:`RANKED`
    ones) on the run that trained it, the run its registry version names, and on its logged model, under the
    names promote ranks by (``e2e_f1``, ``cer``, …), with the set's and the scoring's hashes as the run's
    ``eval_data_hash`` and ``eval_scoring_hash`` tags; returns what was logged.

    Was: only the evaluate run held them (``candidate_e2e_f1``), so the run owning a model had no ``e2e_f1``
    and the UI's compare view of train runs could not show what the registry promotes by. A store that
    refuses costs these only (warned), never the promotion."""
    logged = {k: float(v) for k, v in scores.items() if k in RANKED and isinstance(v, (int, float))
              and not isinstance(v, bool) and math.isfinite(v)}
    model_id = candidate.model_uri.removeprefix("models:/") if candidate.model_uri.startswith("models:/m-") else None
    client = mlflow.MlflowClient()
    try:
        for key, value in sorted(logged.items()):
            client.log_metric(candidate.run_id, key, value, model_id=model_id)
        client.set_tag(candidate.run_id, "eval_data_hash", candidate.eval_data_hash)
        if candidate.eval_scoring_hash:
            client.set_tag(candidate.run_id, "eval_scoring_hash", candidate.eval_scoring_hash)
    except MlflowException as exc:
        warnings.warn(f"run {candidate.run_id}: its evaluation scores were not logged on it ({exc.message})",
                      KocrWarning, stacklevel=2)
        return {}
    return logged


DECISION_TAG = "kocr.decision"  # the decision as metrics/promote.json holds it, kept on the version


def _recorded_decision(client: mlflow.MlflowClient, name: str, version: str) -> dict[str, Any] | None:
    """The decision an earlier promote kept on ``version`` (``DECISION_TAG``), or None (none kept, or unreadable)."""
    value = client.get_model_version(name, version).tags.get(DECISION_TAG)
    try:
        recorded = json.loads(value) if value is not None else None
    except ValueError:
        return None
    return recorded if isinstance(recorded, dict) and recorded.get("promoted") is True else None


def rescore_tag(metric: str, eval_data_hash: str, eval_scoring_hash: str) -> str:
    """The model-version tag that keeps a champion's ``metric`` re-scored on one evaluation set scored
    one way: ``rescored_<metric>.<16 hex digits>`` (a digest of both hashes: a tag name takes only some
    characters). Its value names both hashes, which :func:`rescored` checks before trusting it."""
    digest = hashlib.sha256(f"{eval_data_hash}\0{eval_scoring_hash}".encode()).hexdigest()[:16]
    return f"rescored_{metric}.{digest}"


def rescored(tags: dict[str, str], metric: str, candidate: Candidate) -> float | None:
    """The champion's ``metric`` kept by an earlier re-score on the candidate's set scored the same way
    (``eval_data_hash`` and ``eval_scoring_hash`` both), or None: no such tag, or one whose value names
    another set or scoring, or is no finite score (edited by hand, cut short)."""
    value = tags.get(rescore_tag(metric, candidate.eval_data_hash, candidate.eval_scoring_hash))
    try:
        kept = json.loads(value) if value is not None else None
        if (not isinstance(kept, dict) or kept.get("eval_data_hash") != candidate.eval_data_hash
                or kept.get("eval_scoring_hash") != candidate.eval_scoring_hash):
            return None
        score = float(kept[metric])
    except (ValueError, TypeError, KeyError):
        return None
    return score if math.isfinite(score) else None


def _keep_rescore(client: mlflow.MlflowClient, name: str, version: str, metric: str, candidate: Candidate,
                  score: float) -> None:
    """Tag the champion's version with its re-score on the candidate's set; a registry that refuses
    only costs the next promote another re-score (warned), never this decision."""
    value = json.dumps({metric: score, "eval_data_hash": candidate.eval_data_hash,
                        "eval_scoring_hash": candidate.eval_scoring_hash})
    try:
        client.set_model_version_tag(name, version, rescore_tag(metric, candidate.eval_data_hash,
                                                                candidate.eval_scoring_hash), value)
    except MlflowException as exc:
        warnings.warn(f"{name} v{version}: its re-score was not kept ({exc.message}); the next promote on "
                      "this set scores it again", KocrWarning, stacklevel=2)
