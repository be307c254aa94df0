"""``kocr``: one subcommand per pipeline stage, each reading params.yaml, plus score and predict.

A stage runs by hand exactly as ``dvc repro`` runs it (see dvc.yaml for the command lines).
Errors a user can fix (a missing folder, an unknown model, a model EasyOCR cannot run) print one
line naming the problem and exit 2. A params mistake (an unknown key, a value of the wrong type or
out of range) is such an error, said before any data is read or anything is logged: the line names
the params file (``KOCR_PARAMS`` or params.yaml), the full key and the problem. A section set to
null (every key commented out) means every default, as an empty one does.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import os
import re
import signal
import sys
import threading
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, NoReturn

from kocr import KocrWarning, warnings_as_lines
from kocr.atomic import OutFolderError, disk_full_line, file_sha256, replaced_folder, write_text
from kocr.params import ParamsError, check_keys, data_section, load_params, params_path, require, section, typed
from kocr.redact import hide_passwords


def _dump(data: Any, path: str | Path) -> None:
    write_text(path, json.dumps(data, ensure_ascii=False, indent=1) + "\n")  # whole or not at all


CANDIDATE = "models/candidate/model.pt"  # what the train stage writes; kocr predict reads it by default
DEFAULT_SCORED = "english_g2"  # what evaluate-crops and evaluate-pages score without --model
SAMPLE_KEYS = ("fonts", "width", "height", "charset_name", "degrade", "contact_sheet")  # sample: -> generate_pages
SAMPLE_TYPES = {"width": int, "height": int, "charset_name": str, "contact_sheet": int}  # the rest checked apart


def cmd_synth_pages(args: argparse.Namespace) -> None:
    import mlflow

    from kocr.tracking import stage_run
    from training.data.degrade import logged as degrade_logged
    from training.data.synth_pages import check_out, generate_pages, page_settings

    cfg = section(load_params(), "sample")
    check_keys("sample", cfg, {"count", "seed", *SAMPLE_KEYS, "font_size"})
    fonts = cfg.get("fonts")
    if isinstance(fonts, str):
        fonts = [fonts]
    if not fonts:
        raise ParamsError("sample.fonts is required: file-name patterns of the faces "
                          "to draw with, looked for under /usr/share/fonts (e.g. [NanumGothic.ttf, NanumPen.ttf])")
    require(isinstance(fonts, list) and all(isinstance(f, str) and f for f in fonts), "sample.fonts", fonts,
            "a list of font file-name patterns")
    count = args.count if args.count is not None else typed("sample.count", cfg.get("count", 20), int)
    seed = args.seed if args.seed is not None else typed("sample.seed", cfg.get("seed", 0), int)
    kwargs = {k: typed(f"sample.{k}", cfg[k], kind) for k, kind in SAMPLE_TYPES.items() if k in cfg}
    kwargs["fonts"] = fonts
    if "degrade" in cfg:
        kwargs["degrade"] = cfg["degrade"]
    if "font_size" in cfg:
        size = cfg["font_size"]
        require(isinstance(size, list) and len(size) == 2, "sample.font_size", size, "[lo, hi] in pixels")
        kwargs["font_size"] = tuple(typed("sample.font_size", v, int) for v in size)
    require(kwargs.get("contact_sheet", 0) >= 0, "sample.contact_sheet", kwargs.get("contact_sheet"),
            "a whole number >= 0 (0: none)")
    page_settings(count, **{k: v for k, v in kwargs.items() if k != "contact_sheet"})  # before any run or page
    check_out(Path(args.out))  # a link, a file or a folder of the user's: refused before a run is started
    logged = {**cfg, "count": count, "seed": seed}
    if "degrade" in cfg:  # as it means: `degrade: off` is False to PyYAML, and would be logged as False
        logged["degrade"] = degrade_logged(cfg["degrade"])
    with stage_run("sample", {"sample": logged}):
        written = generate_pages(args.out, count=count, seed=seed, **kwargs)
        mlflow.log_metric("pages", len(written))
    print(f"synth-pages: wrote {len(written)} pages to {args.out}")


def cmd_synth_lines(args: argparse.Namespace) -> None:
    import time

    import mlflow

    from kocr.tracking import stage_run
    from training.data.synth_lines import LinesConfig, check_out, check_sources, generate_lines

    params = load_params()
    cfg, origin = section(params, "synth_lines"), {}
    if args.section:  # e.g. a val or held-out set: its keys replace those of synth_lines:
        if args.section not in params:
            raise ParamsError(f"no section {args.section!r} (--section)")
        override = section(params, args.section)
        cfg.update(override)
        origin = dict.fromkeys(override, args.section)  # an error in one of its keys names that section
    config = LinesConfig.from_params(cfg, origin, count=args.count, seed=args.seed, workers=args.workers)
    check_sources(config, origin)  # charset, fonts and background pictures: before a run is started
    check_out(Path(args.out))  # a file, or a folder of the user's: refused before a run is started, never replaced
    with stage_run("synth_lines", {"synth_lines": config.as_params()}):
        start = time.perf_counter()
        # a face named in the params but not installed: the warning names the file and the key it came from
        fonts_key = f"{params_path()}: {origin.get('fonts', 'synth_lines')}.fonts"
        summary = generate_lines(args.out, config, fonts_key=fonts_key)
        seconds = time.perf_counter() - start
        drawn = summary["count"] - summary["resumed"]  # a killed run's samples were kept, not drawn again
        # images_per_second: train's name for its rate, so the two share a column in MLflow's compare view
        mlflow.log_metrics({"samples": summary["count"], "resumed_samples": summary["resumed"],
                            "images_per_second": drawn / max(seconds, 1e-9)})
        if summary["contact_sheet"]:
            mlflow.log_artifact(summary["contact_sheet"])
    print(f"synth-lines: wrote {summary['count']} images to {args.out} in {seconds:.1f} s"
          + (f", {summary['resumed']} of them kept from a killed run" if summary["resumed"] else "")
          + (f" (contact sheet {summary['contact_sheet']})" if summary["contact_sheet"] else ""))


def cmd_import_crops(args: argparse.Namespace) -> None:
    from training.data.import_crops import describe, import_crops
    from training.data.prepare import PrepareConfig

    params = load_params(required=False)
    knobs = PrepareConfig.from_params(section(params, "prepare"))
    summary = import_crops(args.labels, args.out, charset=args.charset or knobs.charset,
                           out_of_charset=args.out_of_charset or knobs.out_of_charset,
                           margin=_settings(params).add_margin)
    print(describe(summary, args.out))


def cmd_prepare(args: argparse.Namespace) -> None:
    import mlflow

    from kocr.tracking import log_dataset, stage_run
    from training.data.prepare import PrepareConfig, check_paths, kept_reasons, prepare_lock, prepare_pages

    params = load_params()
    knobs = {**section(params, "prepare"), **({"workers": args.workers} if args.workers is not None else {})}
    config = PrepareConfig.from_params(knobs)
    check_paths(args.src, args.out)  # before the run logs a data hash that a linked folder would escape
    # data: is checked (a typo is refused) and logged as this run read and wrote it: by hand, --src and --out
    # may name other folders than params.yaml's (under dvc repro they are data.source and data.prepared)
    data = {**data_section(params), "source": args.src, "prepared": args.out}
    # a second prepare of the same --out stops here, before an MLflow run is started for it
    with prepare_lock(args.out), stage_run("prepare", {"prepare": knobs, "data": data}):
        log_dataset(args.src, context="source")
        report = prepare_pages(args.src, args.out, config, checked=True, locked=True)
        kept = kept_reasons(config)  # report.json counts repairs beside drops: the keys tell them apart
        flat = {"pages_used": report["pages_used"], "pages_without_crops": report["pages_without_crops"],
                **{f"crops_{k}": v for k, v in report["crops"].items()},
                **{f"{'kept' if k in kept else 'skipped'}_{k}": v["count"] for k, v in report["skipped"].items()}}
        mlflow.log_metrics(flat)
        mlflow.log_artifact(str(Path(args.out) / "report.json"))
        mlflow.log_artifact(str(Path(args.out) / "manifest.json"))
        manifest = json.loads((Path(args.out) / "manifest.json").read_text(encoding="utf-8"))
        mlflow.set_tag("kocr.prepared.content_sha256", manifest["content_sha256"])
    if args.metrics:
        _dump(flat, args.metrics)
    skipped = ", ".join(f"{k} {v['count']}" for k, v in report["skipped"].items() if k not in kept) or "nothing"
    repaired = ", ".join(f"{k} {v['count']}" for k, v in report["skipped"].items() if k in kept)
    wordless = report["pages_without_crops"]
    print(f"prepare: {report['pages_used']} pages -> crops {report['crops']}"
          + (f" ({wordless} more pages gave no crop: every word dropped)" if wordless else "")
          + f"; skipped: {skipped}" + (f"; kept with a repair or note: {repaired}" if repaired else ""))
    if not report["pages_used"]:
        print(f"prepare: warning: no usable page under {args.src}: none gave a crop (see {args.out}/report.json); "
              "the crop sets are empty, and train will refuse them", file=sys.stderr)


def cmd_train(args: argparse.Namespace) -> int | None:
    from training.distributed import (agreed_setup, launched_by_torchrun, process_rank, processes_wanted,
                                      run_under_torchrun, stop_with_torchrun, under_torchrun)
    from training.train import (TrainConfig, check_sets, discard_state, loss_name, mix_shares, pick_device,
                                summary_metrics, train, train_extras)

    stop_with_torchrun()  # a SIGKILLed torchrun leaves its ranks running: they stop instead

    def setup() -> tuple[tuple[Any, ...], Any]:
        params = load_params()
        config = TrainConfig.from_params(params)
        device = pick_device(config.device)  # cuda on a machine without it: said before any data is read
        settings = _settings(params)  # logged with the model at the end: a mistake in detector: is said now
        state_file = Path(train_extras(section(params, "train"))["state_dir"]) / (
            str(Path(args.out)).strip("/").replace("/", "_") + ".pt")
        return (params, config, settings, state_file), device

    def device_if_failed() -> Any:  # the device the other ranks chose, when they read the same file
        return pick_device(str(section(load_params(), "train").get("device") or "auto"))

    if under_torchrun():
        # under torchrun a mistake in the params every rank reads is said once, by the lowest rank that made it
        params, config, settings, state_file = agreed_setup(setup, device_if_failed)
    else:
        (params, config, settings, state_file), device = setup()
        processes = processes_wanted(train_extras(section(params, "train"))["processes"], device)
        if processes > 1:  # train.processes: this command again under torchrun, one process per GPU
            check_sets(config, args.data)  # a mistyped --data: said here, once, before torchrun starts
            return run_under_torchrun(processes, args.argv)
    if launched_by_torchrun() and process_rank() != 0:
        # the other ranks of a torchrun job train and stay silent: rank 0 tracks, logs and writes
        train(config, args.data, args.out, progress=False, log=False, state_file=state_file, resume=args.resume)
        return
    import mlflow

    from evaluation.pyfunc_model import log_recognizer
    from kocr.tracking import log_dataset, stage_run

    from training.train import train_run_params

    check_sets(config, args.data)  # a mistyped --data: said before a run starts or an earlier output goes
    # every knob with the value that trains (tuned over params.yaml's, defaults of the keys it leaves
    # out), named as a tune trial's run names them, and the settings only kocr train reads
    logged = train_run_params(config, section(params, "train"))
    with stage_run("train", logged, system_metrics=True) as run:
        for split in ("train", "val"):
            log_dataset(Path(args.data) / split, context=split)
        for i, (path, _) in enumerate(mix_shares(config.mix)):  # train.mix (checked): the other sets' versions too
            log_dataset(path, context=f"mix.{i}")
        # an earlier run's mlflow.json beside this run's first model.pt would let promote register that
        # run's model under the score evaluate measured on this one: gone until this run has logged its own;
        # so is its --metrics, which DVC would show as the scores of the model.pt this run saves (a run
        # stopped before its end leaves none; train writes it back when the run ends). Removed once the
        # inputs are checked and the run has started: a mistake or an unreachable store keeps them
        (Path(args.out) / "mlflow.json").unlink(missing_ok=True)
        Path(args.metrics).unlink(missing_ok=True)
        # the state outlives train(): a kill while the model is logged resumes at the last step and
        # only redoes this end, instead of training again from step 0
        summary = train(config, args.data, args.out, metrics_file=args.metrics, plots_dir=args.plots,
                        state_file=state_file, resume=args.resume, keep_state=True)
        mlflow.log_metrics(summary_metrics(summary))  # best_val_cer, final_loss, …: no name of a step series
        if summary.get("resumed_from_step"):  # its metric history starts there; the run killed before holds the rest
            mlflow.set_tag("kocr.resumed_from_step", str(summary["resumed_from_step"]))
        _log_curves(Path(args.plots), loss_name(config))
        info = log_recognizer(Path(args.out) / "model.pt", settings)
        _dump({"run_id": run.info.run_id, "model_uri": info.model_uri}, Path(args.out) / "mlflow.json")
    discard_state(state_file)  # trained, written and logged: nothing left to resume
    best = "val CER" if "val_n" in summary else "training loss (no validation samples)"
    print(f"train: best {best} {summary['best_val_cer']:.4f} at step {summary['best_step']}"
          f"{' (stopped early)' if summary['stopped_early'] else ''}; {summary['images_per_second']} images/s"
          f"{' over ' + str(summary['world_size']) + ' processes' if summary['world_size'] > 1 else ''}; "
          f"model {args.out}/model.pt"
          + (f" ({1 - summary['averaged_with_base']:g} x that step + {summary['averaged_with_base']:g} x the base: "
             f"val CER {summary.get('averaged_val_cer', float('nan')):.4f})" if summary.get("averaged_with_base") else ""))


def cmd_tune(args: argparse.Namespace) -> None:
    from kocr.tracking import log_dataset, stage_run
    from training.tune import TuneConfig, TuneError, check_space, fixed_knob_params, recorded_storage, run_tune

    params = load_params()
    try:
        config = TuneConfig.from_params(section(params, "tune")).with_overrides(
            storage=args.storage, study_name=args.study, n_trials=args.n_trials, timeout_s=args.timeout).with_env_study()
        check_space(config, params)  # train: and every end of tune.space a legal train knob, before any trial
        data_section(params)  # the e2e scorer's pages are data.source's
        if config.metric == "e2e_f1":  # its scorer reads evaluate.iou_threshold and detector:
            from evaluation.evaluate import EvaluateConfig

            EvaluateConfig.from_params(params)
            _settings(params)
        used = {**section(params, "tune"), "n_trials": config.n_trials, "timeout_s": config.timeout_s,
                "study_name": config.study_name, "storage": recorded_storage(config.storage) if config.storage else ""}
        # train.*/model.*: what every trial trains with besides its searched knobs, train.steps its budget
        # (not params.yaml's train.steps: no trial trains that long)
        with stage_run("tune", {"tune": used, **fixed_knob_params(params, config)}, experiment="ko-ocr/tune"):
            for split in ("train", "val"):
                log_dataset(Path(args.data) / split, context=split)
            best = run_tune(config, params, args.data, args.out)
    except TuneError as exc:
        raise CommandError(str(exc)) from None
    print(f"tune: study {best['study']}: best {best['metric']} {best['value']:.4f} (trial {best['trial']}); "
          f"trials {best['trials']}; this worker ran {best['ran']}; {args.out}/best_params.yaml: {best['train']}")


def _log_curves(plots_dir: Path, loss_label: str) -> None:
    """The training loss and the validation CER as one picture in the active MLflow run.

    The loss is drawn per step, faint, under its centred rolling mean (about 1/20 of the steps), on a log
    axis labelled ``loss_label``, the loss trained on (``training.train.loss_name``: CTC, focal CTC with its
    gamma, or cross-entropy); the CER axis starts at 0.
    """
    import csv

    import matplotlib
    import numpy as np

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import mlflow

    def rows(name: str) -> list[dict[str, str]]:
        with (plots_dir / name).open(encoding="utf-8") as fh:
            return list(csv.DictReader(fh, delimiter="\t"))

    loss, val = rows("loss.tsv"), rows("val.tsv")
    steps, values = [int(r["step"]) for r in loss], [float(r["loss"]) for r in loss]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.5))
    window = max(1, len(values) // 20)
    sums = np.concatenate([[0.0], np.cumsum(values)])
    middle = np.arange(len(values))
    starts = np.maximum(0, middle - window // 2)
    ends = np.minimum(len(values), middle - window // 2 + window)
    mean = (sums[ends] - sums[starts]) / (ends - starts)  # centred on each step (fewer at the ends): no lag
    left.plot(steps, values, lw=0.6, alpha=0.3, color="tab:blue", label="per step")
    left.plot(steps, mean, lw=1.5, color="tab:blue", label=f"mean of {window} steps")
    if values and min(values) > 0:
        left.set_yscale("log")
    if window > 1:
        left.legend(loc="upper right", fontsize="small")
    left.set(xlabel="step", ylabel=loss_label, title=f"training {loss_label}")
    if val and "cer" in val[0]:
        right.plot([int(r["step"]) for r in val], [float(r["cer"]) for r in val], marker="o")
    right.set_ylim(bottom=0, top=max([0.05] + [float(r["cer"]) * 1.05 for r in val if "cer" in r]))
    right.set(xlabel="step", ylabel="CER", title="validation CER")
    fig.tight_layout()
    mlflow.log_figure(fig, "plots/train_curves.png")
    plt.close(fig)


def _outside_note(command: str) -> None:
    """Say so when a command that also works outside the project ran without params.yaml: every setting
    was then the default, and EasyOCR's default ``width_ths`` boxes whole lines, not words."""
    path = params_path()
    if not path.is_file():
        print(f"kocr {command}: no {path} in {Path.cwd()}: EasyOCR's default detector settings were used "
              "(width_ths 0.5 boxes whole lines); run from the project root or set KOCR_PARAMS for the "
              "project's", file=sys.stderr)


def _settings(params: dict[str, Any]):
    from evaluation.reader import DetectorSettings

    return DetectorSettings.from_params(params.get("detector"))


def _logged_settings(spec: str):
    """The detector settings logged with a ``models:/`` or ``runs:/`` model (``logged_settings``), or None
    for any other spec and a logged model that records none."""
    if not spec.startswith(("models:/", "runs:/")):
        return None
    from evaluation.pyfunc_model import logged_settings
    from training.checkpoint import quick_fetch, reading_store

    with quick_fetch(spec, reading_store(spec)):
        return logged_settings(spec)


def _shown_settings(settings) -> str:
    """``settings`` as the readtext keywords that differ from EasyOCR's defaults, or "EasyOCR's defaults"."""
    return ", ".join(f"{k}={v!r}" for k, v in settings.changed().items()) or "EasyOCR's defaults"


def cmd_evaluate(args: argparse.Namespace) -> None:
    """The evaluate stage: every model read on the split's pages, its outputs published once all are read.

    They are two folders (``--predictions``, ``--pictures``), each replaced whole, and three files:
    ``--metrics``, ``evaluate_analysis.json`` and ``evaluate.md`` beside it. They cannot all change in
    one rename, so ``--metrics`` (the scores DVC compares and ``promote`` reads) is what says the outputs
    belong together: the three files are removed before the first folder moves in and ``--metrics`` is
    written last. A run stopped among these steps (SIGTERM, Ctrl-C, even SIGKILL) leaves no ``--metrics``
    (``dvc status`` shows it deleted, ``promote`` stops on it) rather than one run's readings under
    another's scores, and running the stage again puts everything back together; a run that fails
    before (while reading) leaves the earlier run's outputs as they were."""
    import mlflow

    from evaluation.evaluate import EvaluateConfig, eval_set_hash, evaluate_models, scoring_hash, test_pages
    from evaluation.promote import PromoteConfig
    from evaluation.tesseract import tesseract_available
    from kocr.tracking import log_dataset, stage_run

    params = load_params()
    config = EvaluateConfig.from_params(params)
    settings = _settings(params)
    base = typed("train.base", section(params, "train").get("base", "english_g2"), str)
    promote_config = PromoteConfig.from_params(section(params, "promote"))
    pages = test_pages(args.source, args.splits, config.split)
    if not pages:
        raise CommandError(f"no pages in split {config.split!r} of {args.splits}")
    from training.data.pages import unscored

    if all(unscored(word.text) for item in pages for word in item.page.words):  # ### is no labelled word either
        raise CommandError(f"the {len(pages)} pages of split {config.split!r} of {args.splits} hold no "
                           "labelled word: nothing to score")
    models = {"base": base, "candidate": args.candidate}
    scored_sha256 = _checkpoint_sha256(args.candidate)  # read now: a train ending while this run scores writes another
    # every detector setting read with, as the train run's logged model records them (detector.<name>)
    with stage_run("evaluate", {"evaluate": section(params, "evaluate"), "detector": settings.readtext_kwargs()}):
        champion, champion_run = _champion_uri(promote_config.model_name) or (None, "")
        if champion:
            models["champion"] = champion
        for baseline in config.baselines:
            if baseline == "tesseract" and not tesseract_available():
                warnings.warn("tesseract (kor+eng) not installed; its baseline row is left out", KocrWarning, stacklevel=2)
                continue
            models[baseline] = baseline
        log_dataset(args.source, context="evaluation")
        data_hash = eval_set_hash(pages)
        iou_threshold = config.iou_threshold
        scoring = scoring_hash(settings, iou_threshold)
        # each folder is replaced whole once every model is read: no page or picture of an earlier run
        # (another worst_pages, a baseline since left out) stays beside this run's, and a failed run
        # leaves the earlier one as it was
        metrics_file = Path(args.metrics)
        analysis_file, report_file = metrics_file.with_name("evaluate_analysis.json"), metrics_file.with_suffix(".md")
        with replaced_folder(args.predictions) as predictions, replaced_folder(args.pictures) as pictures:
            evaluated = evaluate_models(models, pages, predictions, settings, iou_threshold=iou_threshold,
                                        pictures_dir=pictures, worst_pages=config.worst_pages)
            # all read: the earlier run's files go before either folder moves in, --metrics first, and
            # --metrics comes back last, so a run stopped in between leaves no --metrics, never this
            # run's readings or pictures under the earlier run's scores (the docstring)
            for path in (metrics_file, analysis_file, report_file):
                path.unlink(missing_ok=True)
        for evaluation in evaluated.values():
            evaluation.pictures = [Path(args.pictures) / p.relative_to(pictures) for p in evaluation.pictures]
        results = {label: e.metrics for label, e in evaluated.items()}
        report = evaluation_report(evaluated, len(pages), data_hash)
        # the files at once, beside the readings just swapped in (not after minutes of MLflow logging)
        _dump({label: e.analysis for label, e in evaluated.items()}, analysis_file)
        write_text(report_file, report)
        # the champion's version and its run beside its row: promote compares with that score instead of
        # reading the pages again when the alias still names that version of that run (a registered model
        # deleted and made again numbers its versions from 1 anew: champion_score_from_evaluate)
        _dump({**results, "eval_data_hash": data_hash, "eval_scoring_hash": scoring, "pages": len(pages),
               **({"candidate_sha256": scored_sha256} if scored_sha256 else {}),
               **({"champion_version": champion.removeprefix("models:/")} if champion else {}),
               **({"champion_run_id": champion_run} if champion and champion_run else {})}, metrics_file)
        for label, evaluation in evaluated.items():
            mlflow.log_metrics({f"{label}_{k}": float(v) for k, v in evaluation.metrics.items()})
            mlflow.log_dict(evaluation.analysis, f"analysis/{label}.json")
            for picture in evaluation.pictures:
                mlflow.log_artifact(str(picture), f"worst_pages/{label}")
        mlflow.set_tags({"eval_data_hash": data_hash, "eval_scoring_hash": scoring, **_scored_model_tags(models)})
        mlflow.log_text(report, "evaluate.md")
    print(report)


def _checkpoint_sha256(checkpoint: str) -> str | None:
    """The sha256 of ``checkpoint`` when it is a file (train's ``model.pt``), else None (a name such as
    ko_base, a models:/ or runs:/ URI): the weights evaluate scored, which ``promote`` checks are still
    the candidate's. The weights, not the train run: a train run again to the same bytes (a
    behaviour-unchanged edit of a train-only dependency) leaves evaluate's score true, and DVC skips it."""
    path = Path(checkpoint)
    try:
        return file_sha256(path) if path.is_file() else None
    except OSError:
        return None


def _scored_model_tags(models: dict[str, str]) -> dict[str, str]:
    """Tags naming what an evaluate run scored as the candidate, the champion and the base:
    ``kocr.scored.<label>`` (the spec), with ``.sha256`` for a checkpoint file (a path, a shipped or
    pretrained name), ``.version`` (``NAME/VERSION``) and ``.run_id`` for a registry model, and for a
    checkpoint with train's ``mlflow.json`` beside it, that run's ``.run_id``. What cannot be
    resolved is left out: the scores are logged either way."""

    from mlflow.exceptions import MlflowException

    from training.checkpoint import ModelSpecError, _registry_version, _resolve_file

    tags: dict[str, str] = {}
    for label in ("candidate", "champion", "base"):
        spec = models.get(label)
        if not spec:
            continue
        name = f"kocr.scored.{label}"
        tags[name] = spec
        try:
            if spec.startswith("models:/"):
                version = _registry_version(spec)
                if version is not None:
                    tags[f"{name}.version"] = f"{version.name}/{version.version}"
                    tags[f"{name}.run_id"] = version.run_id or ""
                continue
            if spec.startswith(("runs:/", "mlflow-artifacts:/")):
                continue
            path = _resolve_file(spec)
            tags[f"{name}.sha256"] = file_sha256(path)
            logged = path.parent / "mlflow.json"
            if logged.is_file():
                tags[f"{name}.run_id"] = json.loads(logged.read_text(encoding="utf-8")).get("run_id", "")
        except (ModelSpecError, MlflowException, OSError, ValueError):
            continue
    return {k: v for k, v in tags.items() if v}


def _champion_uri(model_name: str) -> tuple[str, str] | None:
    """``models:/NAME/VERSION`` of the version the ``champion`` alias names now and the run it was
    registered from ("" when none), else None (no champion).

    Pinned once, before scoring: ``models:/NAME@champion`` would be resolved again when the model is
    loaded and when the run's tags are written, so a promotion in between would score one version and
    tag the run with another."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from kocr.tracking import NOT_FOUND

    try:
        version = mlflow.MlflowClient().get_model_version_by_alias(model_name, "champion")
    except MlflowException as exc:
        if exc.error_code in NOT_FOUND:
            return None
        raise  # a registry that fails must not drop the champion's row from the report in silence
    return f"models:/{version.name}/{version.version}", version.run_id or ""


def evaluation_report(evaluated: dict, pages: int, data_hash: str) -> str:
    """The Markdown report: metrics side by side, then each model's breakdown, confusions and worst pages
    (ranked as ``outputs/worst_pages/<model>/<rank>.png`` are named)."""
    lines = [f"Evaluation on {pages} held-out pages (set {data_hash[:12]}):", "",
             markdown_table({label: e.metrics for label, e in evaluated.items()}), ""]
    for label, evaluation in evaluated.items():
        a = evaluation.analysis
        kinds = ", ".join(f"{k} {v:.3f} ({a['kind_words'][k]})" for k, v in a["kind_score"].items())
        cats = ", ".join(f"{c} {v:.3f}" for c, v in a["category_f1"].items())
        det = a["detection"]
        top = ", ".join(f"{c['gt']}→{c['pred']} ×{c['count']}" for c in a["confusions"][:8]) or "none"
        worst = ", ".join(f"{rank:02d} {name} ({f1:.3f})" for rank, (name, f1) in enumerate(evaluation.worst, 1))
        lines += [f"**{label}**: word score by kind: {kinds}; page F1 by category: {cats}; "
                  f"detection: {det['split']} split, {det['merged']} merged, {det['missed']} missed; "
                  f"top confusions: {top}" + (f"; worst pages (page F1): {worst}" if worst else ""), ""]
    return "\n".join(lines)


def markdown_table(results: dict[str, dict[str, float]]) -> str:
    """Models side by side as a Markdown table of the headline metrics."""
    keys = ["e2e_f1", "e2e_precision", "e2e_recall", "e2e_f1_micro", "cleval_e2e_f1", "cleval_det_f1",
            "cer", "word_accuracy", "norm_ed"]
    lines = ["| model | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for label, scores in results.items():
        lines.append(f"| {label} | " + " | ".join(f"{scores[k]:.4f}" for k in keys) + " |")
    return "\n".join(lines)


def cmd_promote(args: argparse.Namespace) -> None:
    from dataclasses import asdict

    import mlflow

    from evaluation.evaluate import EvaluateConfig, evaluate_models, test_pages
    from evaluation.promote import RANKED, Candidate, PromoteConfig, decision_metrics, log_on_model_run, promote
    from kocr.locks import LockError
    from kocr.tracking import configure_tracking, stage_run

    params = load_params()
    config = PromoteConfig.from_params(section(params, "promote"))
    evaluate_config, settings = EvaluateConfig.from_params(params), _settings(params)  # the champion's rescoring
    logged = json.loads((Path(args.candidate) / "mlflow.json").read_text(encoding="utf-8"))
    evaluated = json.loads(Path(args.metrics).read_text(encoding="utf-8"))
    if config.metric not in evaluated["candidate"]:  # e.g. cleval_* with CLEval not installed when evaluate ran
        raise ParamsError(f"promote.metric: {config.metric!r} is not in {args.metrics}'s candidate scores "
                          f"({', '.join(k for k in evaluated['candidate'] if k in RANKED)})")
    scored = evaluated.get("candidate_sha256")  # absent from an evaluate.json written before it was recorded
    checkpoint = Path(args.candidate) / "model.pt"
    if scored and scored != _checkpoint_sha256(str(checkpoint)):  # other weights: they would get the other's score
        raise CommandError(f"{args.metrics} scores the candidate checkpoint of sha256 {scored[:12]}, but {checkpoint} "
                           f"{'is another (trained again since)' if checkpoint.is_file() else 'is not there'}: evaluate "
                           "this candidate first (dvc repro evaluate), or it would be registered under another model's score")
    candidate = Candidate(logged["model_uri"], logged["run_id"], float(evaluated["candidate"][config.metric]),
                          evaluated["eval_data_hash"], evaluated.get("eval_scoring_hash", ""))

    read: list = []  # the pages to re-score the champion on, read once

    def check(uri: str) -> list:  # before anything is registered: else compared across sets
        if not read:
            pages = test_pages(args.source, args.splits, evaluate_config.split)
            _check_rescoring(args, evaluate_config, settings, pages, candidate, uri)
            read.append(pages)
        return read[0]

    def rescore(uri: str) -> float:  # scored exactly as the evaluate stage scored the candidate
        scores = evaluate_models({"champion": uri}, check(uri), Path(args.work) / "champion", settings,
                                 iou_threshold=evaluate_config.iou_threshold)
        return scores["champion"].metrics[config.metric]

    # The run starts when promote is about to write (begin): a refusal decided before (the lock, the champion's
    # re-scoring on other pages than evaluate's) writes nothing and starts no run, as the refusals above start
    # none: a FAILED promote run in the UI is one that failed while registering or deciding. Any other error
    # before then (the registry unreadable, the pages unreadable) still ends a promote run FAILED.
    refusals, began = (CommandError, LockError), []
    configure_tracking()  # the store promote reads before its run starts, and its lock's: the run's
    with contextlib.ExitStack() as stack:
        def begin() -> None:  # every knob as promote read it, defaults included: min_delta is a param also when left out
            began.append(True)  # once, even when the run cannot be started
            stack.enter_context(stage_run("promote", {"promote": PromoteConfig.logged(asdict(config))}))

        version = evaluated.get("champion_version")  # the champion evaluate scored beside the candidate
        known = champion_score_from_evaluate(evaluated, f"models:/{version}", config.metric) if version else None
        beside = None if known is None else (f"models:/{version}", known, evaluated.get("champion_run_id", ""))
        try:
            decision = promote(candidate, config, rescore, beside, check=check, begin=begin)
        except Exception as exc:
            if not began and not isinstance(exc, refusals):  # failed before begin, not refused: a FAILED run
                begin()
            raise
        if not began:  # promote calls it before its first write; the decision is logged on the run either way
            begin()
        log_on_model_run(candidate, evaluated["candidate"])  # e2e_f1 … on the train run its version names
        mlflow.log_dict(decision, "promote.json")
        mlflow.log_metrics(decision_metrics(decision, config.metric))  # charted run by run, as evaluate's are
        mlflow.set_tags({"decision": decision["reason"],  # and which registry version this run made
                         "kocr.registered_version": f"{config.model_name}/{decision['candidate_version']}"})
    _dump(decision, args.out)
    role = "champion" if decision["promoted"] else "challenger"  # a promoted version is both; champion serves
    print(f"promote: {config.model_name} v{decision['candidate_version']} is {role}; {decision['reason']}")


def _check_rescoring(args: argparse.Namespace, evaluate_config: Any, settings: Any,
                     pages: list, candidate: Any, uri: str) -> None:
    """Refuse to re-score the champion ``uri`` on pages (or a way) other than those ``--metrics`` scored the
    candidate on: ``pages``, promote's own ``--source``/``--splits``, must hash as its ``eval_data_hash``, and
    params.yaml's detector settings and ``evaluate.iou_threshold`` as its ``eval_scoring_hash`` (when it
    records one). Was: a promote run by hand with other splits, a source or params than evaluate read compared
    the two scores across sets and kept the champion's under the candidate's hashes. Raises CommandError."""
    from evaluation.evaluate import eval_set_hash, scoring_hash

    read = eval_set_hash(pages)
    if read != candidate.eval_data_hash:
        raise CommandError(
            f"the champion {uri} must be re-scored on the candidate's evaluation set, but the {len(pages)} "
            f"{evaluate_config.split!r} pages of --source {args.source} --splits {args.splits} are set {read}, not "
            f"set {candidate.eval_data_hash} that {args.metrics} scored the candidate on: pass the --source and "
            "--splits evaluate read, or run evaluate on this set first (kocr evaluate, dvc repro evaluate)")
    way = scoring_hash(settings, evaluate_config.iou_threshold)
    if candidate.eval_scoring_hash and way != candidate.eval_scoring_hash:
        raise CommandError(
            f"the champion {uri} must be re-scored the way {args.metrics} scored the candidate (eval_scoring_hash "
            f"{candidate.eval_scoring_hash}), but params.yaml's detector settings and evaluate.iou_threshold "
            f"score as {way}: restore those evaluate read, or run evaluate with these first (dvc repro evaluate)")


def champion_score_from_evaluate(evaluated: dict, uri: str, metric: str) -> float | None:
    """The ``metric`` score ``metrics/evaluate.json`` (``evaluated``) gives the champion version ``uri``
    (``models:/NAME/VERSION``), or None when that file scored another version (the alias moved since),
    none, or not on ``metric``. evaluate scores the champion on the candidate's pages, the same way, so
    ``promote`` needs no second reading of them (was: every promote on a new evaluation set read the
    champion's pages again, minutes on real data, for the score evaluate had just written).

    >>> champion_score_from_evaluate({"champion": {"e2e_f1": 0.6}, "champion_version": "m/3"}, "models:/m/3", "e2e_f1")
    0.6
    >>> champion_score_from_evaluate({"champion": {"e2e_f1": 0.6}, "champion_version": "m/3"}, "models:/m/4", "e2e_f1")
    """
    scores = evaluated.get("champion")
    if not isinstance(scores, dict) or metric not in scores or not evaluated.get("champion_version"):
        return None
    return float(scores[metric]) if uri == f"models:/{evaluated['champion_version']}" else None


def cmd_export(args: argparse.Namespace) -> None:
    """Write the EasyOCR bundle; with ``--parity-source`` (the export stage) check it and write ``--metrics``.

    The bundle replaces ``--out`` in one rename before its check (which reads it, minutes), so ``--metrics``
    is removed once the model is loaded, before the export, and written after the check: a run stopped or
    failing in between leaves no ``--metrics``, never the earlier bundle's parity beside the new bundle."""
    from evaluation.evaluate import EvaluateConfig
    from training.checkpoint import load_recognizer, pinned_model
    from training.export_easyocr import LOGGED_SETTINGS, PARAMS_SETTINGS, check_export, shown_model, write_bundle

    if args.parity_source and not args.splits:  # else nothing would be checked, reported as agreeing
        raise CommandError("--parity-source needs --splits: the splits.json whose "
                           "evaluate.split pages the check reads")
    params = load_params(required=False)
    export = section(params, "export")
    check_keys("export", export, ("name", "lang_list"))
    langs = export.get("lang_list", ["ko", "en"])
    name = args.name or typed("export.name", export.get("name", "ko_ocr"), str)
    # the bundle's name, the languages and --out (a folder the export would not replace) are checked once,
    # here, before the model loads: a mistake costs no download; write_bundle does not check them again
    check_export(args.out, name, langs)
    settings = _settings(params)
    split = EvaluateConfig.from_params(params).split if args.parity_source else "test"
    spec, version = pinned_model(args.model)
    loaded = load_recognizer(spec)
    digest = file_sha256(loaded.path) if loaded.path else None
    # in the bundle: a model file by its name, not the folders it lies in here (shown_model)
    provenance = ", ".join([shown_model(args.model), *([version] if version else []),
                            *([f"checkpoint sha256 {digest}"] if digest else [])])
    # a logged model's own settings (those it serves and `kocr predict` reads it with) go into the README
    # and the parity check; params.yaml's only for a checkpoint, which records none
    logged, has_params = _logged_settings(spec), params_path().is_file()
    if logged is not None and logged != settings and has_params:
        print(f"kocr export-easyocr: the bundle README passes the detector settings logged with {args.model} "
              f"({_shown_settings(logged)}), not params.yaml's ({_shown_settings(settings)})", file=sys.stderr)
    settings_from = LOGGED_SETTINGS if logged is not None else PARAMS_SETTINGS if has_params else None
    settings = logged or settings
    if args.parity_source:  # the earlier bundle's parity goes before this bundle moves in, written after its check
        Path(args.metrics).unlink(missing_ok=True)
    paths = write_bundle(loaded, args.out, name, langs, with_detector=args.with_detector,
                         readtext_kwargs=settings.changed(), provenance=provenance, settings_from=settings_from)
    print(f"export-easyocr: {provenance} -> {args.out} ({', '.join(Path(p).name for p in paths.values())})")
    if logged is None:
        _outside_note("export-easyocr")  # a logged model's settings were used instead
    if args.parity_source:  # the pipeline's export stage: the check is tracked as its child run
        import mlflow

        from evaluation.evaluate import test_pages
        from evaluation.parity import easyocr_parity
        from kocr.tracking import stage_run

        with stage_run("export", {"export": export, "detector": settings.readtext_kwargs()}):
            mlflow.set_tags({"kocr.exported_model": args.model, "kocr.exported_from": provenance})
            pages = test_pages(args.parity_source, args.splits, split)
            report = easyocr_parity(args.out, name, loaded, pages, settings.add_margin)
            if not report["crops"]:
                raise CommandError(f"parity: no word on the {split!r} pages of {args.parity_source} "
                                   f"({args.splits}); nothing was checked")
            mlflow.log_metrics({k: float(v) for k, v in report.items() if isinstance(v, (int, float))})
            mlflow.log_artifact(str(paths["readme"]), "easyocr_bundle")
        _dump(report, args.metrics)
        print(f"export-easyocr: easyocr.Reader agrees with the platform on {report['float_agreement']:.1%} of "
              f"{report['crops']} crops unquantized, {report['int8_agreement']:.1%} with int8 quantization")


def cmd_score(args: argparse.Namespace) -> None:
    from evaluation.metrics import score_folders

    for flag, folder in (("--gt", args.gt), ("--pred", args.pred)):
        if not Path(folder).is_dir():  # else every page would score as missing and print zeros
            raise CommandError(f"{flag} {folder}: " + ("not a folder" if Path(folder).exists() else "no such folder"))
    from training.data.pages import iter_page_files

    try:
        scores = score_folders(args.gt, args.pred, args.iou)
    except ValueError as exc:  # a stem that fits two predictions or two pages, a stray non-page JSON
        raise CommandError(str(exc)) from None
    files = sum(1 for _ in iter_page_files(args.gt))
    if not scores["pages"]:
        raise CommandError(f"--gt {args.gt}: " + (f"{files} page JSON files under it, none with a labelled word "
                                                  "inside its image (e2e scores are averaged over such pages)"
                                                  if files else "no page JSON under it to score"))
    if scores["missing_predictions"] == files:  # the wrong folder (a parent, another set's), not a model reading nothing
        raise CommandError(f"--pred {args.pred}: no prediction for any of the {files} pages under --gt {args.gt} "
                           "(a page's prediction is the page JSON at its relative path, or of its file stem)")
    if scores["missing_predictions"]:
        print(f"kocr score: note: {scores['missing_predictions']} of {files} pages have no prediction under --pred "
              f"{args.pred}; each is scored as reading nothing", file=sys.stderr)
    print(json.dumps(scores, indent=1))


def _scored_models(args: argparse.Namespace) -> dict[str, str]:
    """--model specs (every --model's, in order; english_g2 when none) and --baseline engines, each
    labelled by what the user typed. A spec given twice is scored once, and a note says so."""
    specs = [*(args.model or [DEFAULT_SCORED]), *(args.baseline or [])]
    twice = sorted({spec for spec in specs if specs.count(spec) > 1}, key=specs.index)
    if twice:
        print(f"kocr {args.command}: note: {', '.join(twice)} given more than once; scored once", file=sys.stderr)
    return {spec: spec for spec in specs}


def _count(text: str, least: int = 0) -> int:
    """argparse type: a whole number >= 0 (>= ``least``)."""
    value = int(text)
    if value < least:
        raise argparse.ArgumentTypeError(f"expected a count >= {least}, got {value}")
    return value


def _iou(text: str) -> float:
    """argparse type: an IoU threshold in (0, 1], as evaluate.iou_threshold (1.5 or 50 matched no box: zeros)."""
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected an IoU in (0, 1], got {text}")
    return value


def _processes(text: str) -> int:
    """argparse type: a number of processes, 1 or more."""
    return _count(text, least=1)


def _images(text: str) -> int:
    """argparse type: how many images or pages to draw, 1 or more (an empty set trains nothing)."""
    return _count(text, least=1)


@contextlib.contextmanager
def _out_folder(out: str | None) -> Iterator[None]:
    """Make ``--out`` before the models run, so a path that cannot be a folder fails first, not last.

    A command that fails in the block (a model that does not load, no image read) removes the folders
    this made while they are still empty: no empty ``--out`` is left behind, and a folder that was there
    before, or that holds what the run wrote, is kept."""
    from evaluation.score_crops import ScoreInputError

    if not out:
        yield
        return
    made: list[Path] = []

    def remove_made() -> None:
        for folder in reversed(made):
            with contextlib.suppress(OSError):  # not empty: the run wrote there, or someone else did
                folder.rmdir()

    try:
        _make_folder(Path(out), made)
    except OSError as exc:
        remove_made()
        raise ScoreInputError(f"--out {out}: cannot be made a folder ({exc.strerror or exc})") from None
    try:
        yield
    except BaseException:
        remove_made()
        raise


def _make_folder(folder: Path, made: list[Path], parents: bool = True) -> None:
    """``folder.mkdir(parents=True, exist_ok=True)`` that adds to ``made`` (the highest first) each folder
    its own mkdir made: never one that was there (``new/../there`` is ``there``), nor one that another
    process made meanwhile."""
    try:
        folder.mkdir()
    except FileNotFoundError:
        if not parents or folder.parent == folder:
            raise
        _make_folder(folder.parent, made)
        _make_folder(folder, made, parents=False)
    except OSError:
        if not folder.is_dir():
            raise
    else:
        made.append(folder)


def cmd_evaluate_crops(args: argparse.Namespace) -> None:
    from evaluation.score_crops import read_labels, score_crops, write_outputs

    with _out_folder(args.out):
        margin = _settings(load_params(required=False)).add_margin  # box labels are widened as detected boxes are
        report = score_crops(read_labels(args.labels, margin), _scored_models(args), labels=args.labels)
        paired = report.paired()  # empty with one model
        scores: dict[str, Any] = {**report.metrics, **({"paired": paired} if paired else {})}
        print(json.dumps(scores, ensure_ascii=False, indent=1), flush=True)  # first: a failing write loses no score
        if args.out:
            write_outputs(report, args.out, args.worst, scores)
    _outside_note("evaluate-crops")


def cmd_evaluate_pages(args: argparse.Namespace) -> None:
    from evaluation.score_pages import describe_skipped, find_pages, score_pages, write_scores

    with _out_folder(args.out):
        skipped: list[tuple[str, str]] = []
        items = find_pages(args.images, args.text, skipped)
        if skipped:  # before the models run: the set is smaller than the folders, and the user should know
            print(f"kocr evaluate-pages: note: not scored: {describe_skipped(skipped)}", file=sys.stderr)
        scores = score_pages(items, _scored_models(args), _settings(load_params(required=False)))
        if args.out:
            write_scores(scores, args.out)
    print(json.dumps({label: {k: v for k, v in s.items() if k != "per_page"} for label, s in scores.items()},
                     ensure_ascii=False, indent=1))
    _outside_note("evaluate-pages")


def cmd_average(args: argparse.Namespace) -> None:
    from training.checkpoint import file_digest, load_recognizer, save_checkpoint
    from training.weight_average import average_recognizers

    out_path = Path(args.out)
    if out_path.is_dir() or any(p.exists() and not p.is_dir() for p in out_path.parents):
        # torch.save failed there with a RuntimeError or FileExistsError traceback, after every input loaded
        raise CommandError(f"--out {args.out}: " + ("a folder; give the checkpoint file to write, e.g. "
                                                     f"{out_path / 'mean.pt'}" if out_path.is_dir() else
                                                     "its folder is a file"))
    loaded = [load_recognizer(spec) for spec in args.models]
    weights = args.weights or [1.0] * len(loaded)
    try:
        model = average_recognizers(loaded, weights)
    except ValueError as exc:
        print(f"kocr average-checkpoints: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    sources = [{"model": item.source, "file": item.path, "weight": w / sum(weights),
                "sha256": file_digest(item.path)}
               for item, w in zip(loaded, weights)]
    out = save_checkpoint(args.out, model, loaded[0].charset, {"averaged_from": sources})
    print(json.dumps({"out": str(out), "averaged_from": sources}, ensure_ascii=False, indent=1))


class CommandError(RuntimeError):
    """A command's own one-line refusal (exit 2)."""


def cmd_predict(args: argparse.Namespace) -> None:
    from evaluation.reader import UnreadableImage
    from training.data.pages import Page, write_page

    outputs = [Path(args.out) / (Path(image).stem + ".json") for image in args.images] if args.out else []
    clashes = sorted({str(out) for out in outputs if outputs.count(out) > 1})
    if clashes:  # page JSON is named by stem: a.jpg and a.png, or two folders' a.jpg, would overwrite
        same = [str(image) for image, out in zip(args.images, outputs) if str(out) == clashes[0]]
        raise CommandError(f"{' and '.join(same)} would both be written to {clashes[0]}; read them into "
                           "different --out folders")
    if args.model == CANDIDATE and not Path(CANDIDATE).is_file():
        raise CommandError(f"--model defaults to the pipeline's candidate, {CANDIDATE}, and there is none here yet: "
                           "run `dvc repro` first, or pass --model (ko_base, a checkpoint path, models:/…)")
    with _out_folder(args.out):  # a file there failed with a traceback after the first page was read
        logged = args.model.startswith(("models:/", "runs:/"))
        if logged:
            # a registered or logged model is read through its MLflow pyfunc, with its own detector settings
            import mlflow
            from mlflow.exceptions import MlflowException

            from training.checkpoint import ModelSpecError, quick_fetch, reading_store

            store = reading_store(args.model)
            try:
                with quick_fetch(args.model, store):
                    model = mlflow.pyfunc.load_model(args.model)
            except (MlflowException, OSError) as exc:
                raise ModelSpecError(f"cannot load {args.model!r} from MLflow at {store}: "
                                     f"{hide_passwords(str(exc).splitlines()[0])}") from None
            def read(image: str) -> Page:
                try:
                    return Page.from_dict(model.predict([str(image)])[0])
                except MlflowException as exc:  # the pyfunc's refusal of one image: named, the others still read
                    if exc.error_code != "INVALID_PARAMETER_VALUE":
                        raise
                    raise UnreadableImage(exc.message) from None
        else:
            from evaluation.reader import PageReader
            from training.checkpoint import load_recognizer

            reader = PageReader(load_recognizer(args.model), _settings(load_params(required=False)))
            read = reader.read
        failed: list[Exception] = []
        for i, image in enumerate(args.images):  # each page is written as it is read: a bad image loses no other
            try:
                page = read(image)
            except (UnreadableImage, FileNotFoundError) as exc:
                if len(args.images) > 1:
                    print(f"kocr predict: error: {exc}", file=sys.stderr)
                failed.append(exc)
                continue
            if args.out:
                write_page(page, outputs[i])
            else:
                print(json.dumps(page.to_dict(), ensure_ascii=False))
        if not logged:
            _outside_note("predict")  # a models:/ URI reads with the settings logged beside the model instead
        if len(failed) == len(args.images) == 1:
            raise failed[0]
        if failed:
            raise CommandError(f"{len(failed)} of {len(args.images)} images could not be read (each named above); "
                               "the other pages were read")


def cmd_end_pipeline(args: argparse.Namespace) -> None:
    from kocr.tracking import MANUAL_KEY, checked_key, configure_tracking, end_pipeline, end_stale_in_group

    key = args.pipeline_id or os.environ.get("KOCR_PIPELINE_ID")
    if key:
        key = checked_key(key, "--pipeline-id" if args.pipeline_id else "KOCR_PIPELINE_ID")
    if args.stale_in_group is not None:
        group = args.stale_in_group or os.environ.get("KOCR_PIPELINE_GROUP")
        if not group:  # every pipeline without the tag would be "in" an empty group: refused, not guessed
            raise CommandError("--stale-in-group: which group? give it (--stale-in-group GROUP) or set "
                               "KOCR_PIPELINE_GROUP (the value its pipeline runs are tagged kocr.pipeline_group with)")
        configure_tracking()
        ended = end_stale_in_group(group, {key} if key else set(), args.status, args.reason)
        count = sum(len(ids) for ids in ended.values())
        print(f"end-pipeline: group {group}: " + (
            f"{count} runs still RUNNING ended as {args.status}, of pipelines {' '.join(ended)}: "
            + " ".join(run_id for ids in ended.values() for run_id in ids)
            if ended else "no other pipeline still RUNNING") + (f" (kept: {key})" if key else ""))
        return
    if not key:
        raise CommandError("which pipeline? give --pipeline-id or set KOCR_PIPELINE_ID (the key its runs are "
                           "tagged with, kocr.pipeline_key)")
    if key == MANUAL_KEY:  # every hand-run stage's parent has it: ending them all would end live work
        raise CommandError(f"{MANUAL_KEY!r} is the key of every stage run by hand, not of one pipeline; end such runs "
                           "one by one in the MLflow UI")
    configure_tracking()
    ended = end_pipeline(key, args.status, args.reason)
    print(f"end-pipeline: {key}: " + (f"{len(ended)} runs still RUNNING ended as {args.status}: {' '.join(ended)}"
                                      if ended else "no run still RUNNING"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kocr", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, func: Callable[[argparse.Namespace], None], help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(func=func)
        return p

    p = add("synth-pages", cmd_synth_pages, "generate AI-Hub-format Korean pages (the sample stage)")
    p.add_argument("--out", required=True)
    p.add_argument("--count", type=_images)
    p.add_argument("--seed", type=int)

    p = add("synth-lines", cmd_synth_lines, "generate Korean word/line images into an LMDB set (synth_lines:)")
    p.add_argument("--out", required=True, help="the LMDB set folder (a set there is replaced; "
                   "a file or a folder holding other files is refused)")
    p.add_argument("--count", type=_images)
    p.add_argument("--seed", type=int)
    p.add_argument("--workers", type=_count, help="render processes (synth_lines.workers); output is the same")
    p.add_argument("--section", help="params section whose keys override synth_lines: (e.g. a held-out-font set)")

    p = add("prepare-aihub", cmd_prepare, "page JSON + images -> word-crop LMDB split by document")
    p.add_argument("--src", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--metrics", help="write flat counts here (a DVC metrics file)")
    p.add_argument("--workers", type=_processes, help="cropping processes (default: prepare.workers; same output)")

    p = add("train", cmd_train, "fine-tune the recogniser (train: and model: in params.yaml)")
    p.add_argument("--data", required=True, help="folder with train/ and val/ LMDB sets")
    p.add_argument("--out", required=True)
    p.add_argument("--metrics", default="metrics/train.json")
    p.add_argument("--plots", default="plots/train")
    p.add_argument("--resume", action="store_true",
                   help="continue the state a killed run left in train.state_dir (same config and data), else start fresh")

    p = add("tune", cmd_tune, "search train: knobs with Optuna (tune: in params.yaml); one worker of a study")
    p.add_argument("--data", required=True, help="folder with train/ and val/ LMDB sets")
    p.add_argument("--out", default="tuning", help="best_params.yaml (and the embedded optuna.db) go here")
    p.add_argument("--storage", help="postgresql+psycopg2://… to join workers on other machines (tune.storage)")
    p.add_argument("--study", help="study name; workers with the same storage and name share it (tune.study_name, "
                   "else $KOCR_TUNE_STUDY)")
    p.add_argument("--n-trials", type=int, help="study-wide budget of finished trials (tune.n_trials)")
    p.add_argument("--timeout", type=float, help="this worker's wall time in seconds (tune.timeout_s)")

    p = add("evaluate", cmd_evaluate, "end-to-end scores of the base model and the candidate")
    p.add_argument("--source", required=True, help="the page folder prepare read")
    p.add_argument("--splits", required=True, help="splits.json written by prepare")
    p.add_argument("--candidate", required=True)
    p.add_argument("--predictions", required=True)
    p.add_argument("--metrics", default="metrics/evaluate.json")
    p.add_argument("--pictures", default="outputs/worst_pages", help="where the worst pages are drawn")

    p = add("promote", cmd_promote, "register the candidate and move the champion alias on merit")
    p.add_argument("--candidate", required=True, help="train's output folder (holds mlflow.json)")
    p.add_argument("--metrics", default="metrics/evaluate.json")
    p.add_argument("--source", required=True)
    p.add_argument("--splits", required=True)
    p.add_argument("--work", default="outputs/promote")
    p.add_argument("--out", default="metrics/promote.json")

    p = add("export-easyocr", cmd_export, "write an EasyOCR custom-model bundle")
    p.add_argument("--model", required=True, help="checkpoint path, models:/ URI or pretrained name")
    p.add_argument("--out", required=True)
    p.add_argument("--name")
    p.add_argument("--with-detector", action="store_true", help="copy craft_mlt_25k.pth into the bundle")
    p.add_argument("--parity-source", help="page folder: check easyocr.Reader reads the bundle as the platform does")
    p.add_argument("--splits", help="splits.json naming the pages of --parity-source to check")
    p.add_argument("--metrics", default="metrics/export.json", help="where the parity report goes")

    p = add("import-crops", cmd_import_crops, "labelled word crops you have (a TSV: image, text; or a .json of "
            "word boxes) as an LMDB set to train on (--data's train/ or val/, or train.mix)")
    p.add_argument("--labels", required=True, help="TSV with a header (image, text), image paths relative to it; "
                                                    "or a .json of word boxes as evaluate-crops reads")
    p.add_argument("--out", required=True, help="the LMDB set to write (a new folder; a set there is replaced)")
    p.add_argument("--charset", help="charset the labels must fit (default: prepare.charset, korean_g2)")
    p.add_argument("--out-of-charset", choices=["drop", "keep"],
                   help="rows with characters outside it (default: prepare.out_of_charset, drop)")

    p = add("score", cmd_score, "metrics of two folders of page JSON (ground truth, predictions)")
    p.add_argument("--gt", required=True)
    p.add_argument("--pred", required=True)
    p.add_argument("--iou", type=_iou, default=0.5,
                   help="IoU a predicted box needs to meet a labelled one, in (0, 1] (default 0.5)")

    models_help = ("recognisers to score: checkpoint path, ko_base, english_g2, korean_g2, models:/…, runs:/… or "
                   "an export-easyocr bundle folder; "
                   f"several after one --model or over repeated --model (--model A --model B scores both; "
                   f"default: {DEFAULT_SCORED})")
    p = add("evaluate-crops", cmd_evaluate_crops, "score recognisers on labelled word crops (a TSV: image, text) "
            "or on the word boxes of labelled images (a .json)")
    p.add_argument("--labels", required=True,
                   help="TSV with a header (image, text), or a .json of word boxes: one AI-Hub page JSON or "
                        "{image: {words: [{points, transcription}]}}; image paths relative to the file")
    p.add_argument("--model", nargs="+", action="extend", help=models_help)
    p.add_argument("--baseline", action="append", choices=["tesseract"], help="also score Tesseract 5 (psm 7)")
    p.add_argument("--worst", type=_count, default=10, help="how many of the worst crops to draw into --out")
    p.add_argument("--out", help="folder for scores.json, readings.tsv and the worst crops drawn")

    p = add("evaluate-pages", cmd_evaluate_pages, "score page reading against plain-text ground truth (no boxes)")
    p.add_argument("--images", required=True, help="folder of page images")
    p.add_argument("--text", required=True, help="folder of <image stem>.txt ground truth, one line per text line")
    p.add_argument("--model", nargs="+", action="extend", help=models_help)
    p.add_argument("--baseline", action="append", choices=["tesseract"], help="also score Tesseract 5 (psm 3)")
    p.add_argument("--out", help="folder for scores.json with per-page scores and predicted lines")

    p = add("average-checkpoints", cmd_average,
            "the weighted mean of recognisers trained from a common start (one checkpoint, same format)")
    p.add_argument("models", nargs="+", help="two or more: checkpoint paths, ko_base, models:/… or runs:/…")
    p.add_argument("--out", required=True, help="the averaged checkpoint (written atomically)")
    p.add_argument("--weights", type=float, nargs="+", help="one per model (default: equal); normalised to sum 1")

    p = add("predict", cmd_predict, "read page images; page JSON per image")
    p.add_argument("images", nargs="+")
    p.add_argument("--model", default=CANDIDATE,
                   help="recogniser: checkpoint path (default: the pipeline's candidate, %(default)s), "
                        "ko_base, english_g2, korean_g2, models:/… or runs:/…")
    p.add_argument("--out", help="folder for one page JSON per image (default: print each page as one JSON line)")

    p = add("end-pipeline", cmd_end_pipeline, "end the MLflow runs a pipeline left RUNNING (its processes are gone: "
            "a CI job that failed or was cancelled)")
    p.add_argument("--status", required=True, choices=["FAILED", "KILLED"])
    p.add_argument("--pipeline-id", help="its kocr.pipeline_key tag (default: KOCR_PIPELINE_ID); with "
                   "--stale-in-group, the current pipeline's, which is kept")
    p.add_argument("--stale-in-group", nargs="?", const="", metavar="GROUP",
                   help="instead, end every other pipeline of GROUP (default: KOCR_PIPELINE_GROUP) whose pipeline "
                        "run is RUNNING: pipelines of one group never run at once (the retrain workflow's "
                        "concurrency group), so those are ones whose processes are gone; pipeline runs without "
                        "the kocr.pipeline_group tag, and 'manual', are left alone")
    p.add_argument("--reason", default="kocr end-pipeline", help="tagged kocr.ended_by on each run ended")
    return parser


_terminated: list[int] = []  # the signal _terminate_as_exit turned into this process's exit, once one did


@contextlib.contextmanager
def _terminate_as_exit() -> Iterator[None]:
    """SIGTERM (``kill``, ``timeout``, ``docker stop``) ends the command as an exit (status 143), so its
    ``finally`` blocks run: temporary files are removed and a resumable writer keeps what it committed.

    Under torchrun only on rank 0, the one holding the MLflow runs, which would otherwise stay RUNNING:
    the other ranks keep dying at once when torchrun SIGTERMs them (it does when one rank fails).
    A rank 0 blocked in a collective (NCCL) runs the handler only when the call returns; torchrun
    SIGKILLs it 30 s after its SIGTERM, which then leaves the runs RUNNING as before.
    """
    if threading.current_thread() is not threading.main_thread() \
            or ("TORCHELASTIC_RUN_ID" in os.environ and os.environ.get("RANK", "0") != "0"):
        yield
        return

    here = os.getpid()

    def terminate(signum: int, frame: Any) -> None:
        if os.getpid() != here:  # a forked worker (DataLoader, render pool) dies as it always did
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        _terminated.append(signum)
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    """``kocr``: runs the subcommand and returns its exit status. Ctrl-C (SIGINT, a KeyboardInterrupt)
    ends it with one line, ``kocr <command>: interrupted``, once the command's own handlers have run on
    the way out (train keeps its resumable state, a stage's MLflow run ends KILLED). Was: a full
    traceback from wherever the interrupt landed.

    Run as the program (``argv`` None: the ``kocr`` script, ``python -m kocr.cli``) the process then
    dies by SIGINT, as Python ends on an uncaught KeyboardInterrupt, so a calling shell loop
    (``for f in ...; do kocr ...; done``) stops too: bash goes on after a command that exits, even
    with status 130. Called with ``argv`` from Python (a test, a script), the interrupt goes on to
    the caller."""
    where = [_named(sys.argv[1:] if argv is None else argv)]
    status: Any = 1
    leave_now = False
    try:
        with _interrupt_deferred():  # torch loads here: a Ctrl-C inside its C++ start aborted the process
            import training.distributed  # noqa: F401  (read back from sys.modules on the way out)
        status = _main(argv, where)
        return status
    except SystemExit as exc:  # 143 on SIGTERM, 2 from a rank another rank speaks for
        status = exc.code if isinstance(exc.code, int) else 1
        # a SIGTERM's exit, its handlers run: the program leaves at once (docker stop waits 10 s, torchrun 30)
        leave_now = argv is None and bool(_terminated) and status == 128 + _terminated[0]
        raise
    except KeyboardInterrupt as exc:
        _close_progress_bars()  # else the open bar is redrawn over and after the line, as Python exits
        # under torchrun, which passes Ctrl-C on to every rank, said once (by rank 0), not once per rank;
        # not again by the kocr train that started torchrun (train.processes): rank 0 said it
        job = getattr(sys.modules.get("training.distributed"), "InterruptedJob", ())  # () while not loaded yet
        if not isinstance(exc, job) and (
                "TORCHELASTIC_RUN_ID" not in os.environ or os.environ.get("RANK", "0") == "0"):
            print(f"{where[0]}: interrupted", file=sys.stderr)
        if argv is not None:
            raise
        _die_by_sigint()
    finally:
        distributed = sys.modules.get("training.distributed")
        if distributed is not None:  # a rank of a job kocr train started: the status that job exits with
            distributed.note_rank_status(status)
        if leave_now:
            _exit_without_teardown(status)


def _exit_without_teardown(status: int) -> NoReturn:
    """End the process with ``status`` as Python's exit would, less the interpreter's teardown: the other
    threads are waited for and the exit handlers run (MLflow's, multiprocessing's, logging's), the output is
    flushed, and then the process exits. The teardown, a full garbage collection and the clearing of
    every module, freed nothing the system does not free and took 3-4 s of a SIGTERMed ``kocr train``
    (torch and MLflow loaded, 550,000 objects; 2-core machine under load): was, about 5 s from the SIGTERM
    to the exit, with or without DataLoader workers (ending them takes 0.1 s). Skipped too: torch's exit
    handler that logs its compile times at INFO (importing tabulate for it, about 1 s), when nothing
    would show that line. A progress bar left open is closed first, on its own line, as the teardown
    closed it."""
    _close_progress_bars()  # else the shell's prompt, or torchrun's line, went on after the half-drawn bar
    shutdown = getattr(threading, "_shutdown", None)  # what Python runs first at exit: joins non-daemon threads
    if shutdown is not None and threading.current_thread() is threading.main_thread():
        shutdown()
    dynamo = sys.modules.get("torch._dynamo.utils")
    log, dump = getattr(dynamo, "log", None), getattr(dynamo, "dump_compile_times", None)
    if dump is not None and log is not None and not log.isEnabledFor(20):  # logging.INFO
        atexit.unregister(dump)
    _run_exit_handlers()
    os._exit(status)


_NEGATIVE_NUMBER = re.compile(r"^-\d+$|^-\d*\.\d+$")  # what argparse takes as a value, not an option


def _dash_name_joined(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """``argv`` with export-easyocr's ``--name -x`` written ``--name=-x`` where ``-x`` is none of its
    options, so the bundle name rules refuse it saying why (a name beginning with ``-``: ``kocr
    export-easyocr: error: bundle name '-x': begins with '-', ...``). Was argparse's ``argument --name:
    expected one argument``, one being there: it takes a word beginning with ``-`` for an option. A
    ``--name`` followed by one of its options (``--name --with-detector``, the name left out) keeps
    argparse's error."""
    if not argv or argv[0] != "export-easyocr":
        return argv
    commands = next(a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    options = [o for action in commands["export-easyocr"]._actions for o in action.option_strings]

    def takes(token: str, option: str) -> bool:  # whether argparse reads token as option (or a prefix of it)
        head = token.split("=", 1)[0]
        if not head.startswith("--"):
            return token[:2] == option
        return option.startswith(head) and len(head) > 2

    joined: list[str] = [argv[0]]
    rest = iter(argv[1:])
    for token in rest:
        if token == "--":
            joined += [token, *rest]
            break
        named = "=" not in token and [o for o in options if takes(token, o)] == ["--name"]
        value = next(rest, None) if named else None
        if value is None:
            joined.append(token)
        elif (value.startswith("-") and value not in ("-", "--") and " " not in value
              and not _NEGATIVE_NUMBER.match(value) and not any(takes(value, o) for o in options)):
            joined.append(f"{token}={value}")
        else:
            joined += [token, value]
    return joined


def _named(argv: list[str]) -> str:
    """``kocr COMMAND`` for the interrupted line before the command line is parsed (its imports take
    seconds: torch, MLflow): the first word of ``argv`` when it is one of the commands, else ``kocr``.
    Was: ``kocr: interrupted`` for a Ctrl-C in those seconds."""
    first = argv[0] if argv else ""
    commands = next(a.choices for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return f"kocr {first}" if first in commands else "kocr"


@contextlib.contextmanager
def _interrupt_deferred() -> Iterator[None]:
    """Hold a Ctrl-C (SIGINT at Python's handler) that lands in the block until it ends, then raise it:
    raised inside ``import torch``, the KeyboardInterrupt either left a traceback from its import, as
    ``main`` had not yet entered its handler, or crossed torch's C++ start, which then aborted the process
    (``terminate called ... what(): KeyboardInterrupt``, SIGABRT). A SIGINT that is ignored stays so."""
    if threading.current_thread() is not threading.main_thread() \
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return
    held: list[int] = []
    signal.signal(signal.SIGINT, lambda signum, frame: held.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if held:
        raise KeyboardInterrupt


def _run_exit_handlers() -> None:
    """What Python's exit runs before its teardown: the atexit handlers (MLflow's, multiprocessing's,
    logging's, temp folders' finalizers), then stdout and stderr flushed."""
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()


def _die_by_sigint() -> NoReturn:
    """End the process as Python does after an uncaught KeyboardInterrupt: the exit handlers run
    (MLflow's, multiprocessing's, logging's), then it kills itself with SIGINT at its default action.
    Done here rather than left to Python: re-raised, ``kocr train`` exited with status 1 instead
    (something run at exit clears the interpreter's note of the interrupt)."""
    _run_exit_handlers()
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    with contextlib.suppress(Exception):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    os.kill(os.getpid(), signal.SIGINT)
    os._exit(128 + signal.SIGINT)  # not reached unless the signal could not end the process: the shell's status


def _close_progress_bars() -> None:
    """Close the tqdm bars an interrupt left open (their last state stays on screen, on its own line)."""
    module = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(module, "tqdm", None), "_instances", ())):
        with contextlib.suppress(Exception):
            bar.close()


def _error_line(line: str) -> None:
    """Print the command's one error line on a line of its own: a progress bar the error left open (e.g.
    ``train``'s, stopped by a damaged sample mid-run) is closed first, else the line was glued to the end
    of the half-drawn bar (``... 10/400 [00:01<00:56, loss=66.485]kocr train: error: ...``)."""
    _close_progress_bars()
    print(line, file=sys.stderr)


def _main(argv: list[str] | None, where: list[str]) -> int:
    # keep stage output to progress and results: MLflow reads this once, when it is first imported (by the
    # imports below: kocr.tracking), so a new store's "Creating initial MLflow database tables" INFO lines
    # were printed when it was set after them
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    from training.checkpoint import ArchitectureMismatch, ModelSpecError
    from training.data.lmdb_store import LmdbWriteError, SetBusyError
    from training.data.pages import PageError
    from training.data.prepare import PrepareConfigError
    from training.data.import_crops import CropImportError
    from training.data.degrade import SynthConfigError
    from evaluation.reader import UnreadableImage
    from evaluation.source_pages import UnreadablePage, UnwritableCache
    from kocr.locks import LockError
    from evaluation.score_crops import ScoreInputError
    from training.export_easyocr import ExportError
    from kocr.tracking import TrackingConfigError
    from training.data.pixels import large_pages

    parser = build_parser()
    args = parser.parse_args(_dash_name_joined(parser, list(sys.argv[1:] if argv is None else argv)))
    args.argv = list(sys.argv[1:] if argv is None else argv)  # kocr train relaunches itself under torchrun with them
    where[0] = f"kocr {args.command}"
    status = 0
    try:
        with _terminate_as_exit(), warnings_as_lines(f"kocr {args.command}"), large_pages(f"kocr {args.command}"):  # one line for big scans, not one each
            # None for a command that ran; kocr train's is the torchrun job's when it started one (train.processes)
            status = args.func(args) or 0
    except (ModelSpecError, ArchitectureMismatch, ExportError, PageError, SynthConfigError,
            ScoreInputError, CropImportError, PrepareConfigError, SetBusyError, LmdbWriteError, UnreadableImage, ParamsError,
            OutFolderError, UnreadablePage, UnwritableCache,
            LockError, CommandError, TrackingConfigError, FileNotFoundError) as exc:
        _error_line(f"kocr {args.command}: error: {exc}")
        return 2
    except OSError as exc:
        line = disk_full_line(f"kocr {args.command}", exc, getattr(args, "out", None))
        if line is None:
            raise
        _error_line(line)
        return 2
    except ValueError as exc:
        # train's and tune's checks of their data and knobs name the set, sample or knob: one line
        if args.command not in ("train", "tune") or os.environ.get("KOCR_TRACEBACK"):
            raise
        _error_line(f"kocr {args.command}: error: {exc} (KOCR_TRACEBACK=1 for the traceback)")
        return 2
    except Exception as exc:
        # the tracking server down, refusing the credentials, or answering an error: one line naming it
        errors = sys.modules.get("mlflow.exceptions")
        if errors is None or not isinstance(exc, errors.MlflowException) or os.environ.get("KOCR_TRACEBACK"):
            raise
        import mlflow

        from kocr.tracking import artifact_store_hint, shown_uri

        message = shown_uri((getattr(exc, "message", None) or str(exc)).strip().splitlines()[0])
        _error_line(f"kocr {args.command}: error: MLflow at {shown_uri(mlflow.get_tracking_uri())}: "
                    f"{artifact_store_hint(message)}{message} (KOCR_TRACEBACK=1 for the traceback)")
        return 2
    return status


if __name__ == "__main__":
    sys.exit(main())
