"""``kocr``: one subcommand per pipeline stage, each reading params.yaml, plus score and predict.

A stage runs by hand exactly as ``dvc repro`` runs it (see dvc.yaml for the command lines).
Errors a user can fix (a missing folder, an unknown model, a model EasyOCR cannot run) print one
line naming the problem and exit 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable

from kocr.params import load_params


def _dump(data: Any, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")


def cmd_synth_pages(args: argparse.Namespace) -> None:
    import mlflow

    from kocr.tracking import stage_run
    from training.data.synth_pages import generate_pages

    cfg = load_params().get("sample", {})
    count = args.count if args.count is not None else cfg.get("count", 20)
    seed = args.seed if args.seed is not None else cfg.get("seed", 0)
    kwargs = {k: cfg[k] for k in ("fonts", "width", "height", "charset_name") if k in cfg}
    if "font_size" in cfg:
        kwargs["font_size"] = tuple(cfg["font_size"])
    with stage_run("sample", {"sample": {**cfg, "count": count, "seed": seed}}):
        written = generate_pages(args.out, count=count, seed=seed, **kwargs)
        mlflow.log_metric("pages", len(written))
    print(f"synth-pages: wrote {len(written)} pages to {args.out}")


def cmd_prepare(args: argparse.Namespace) -> None:
    import mlflow

    from kocr.tracking import log_dataset, stage_run
    from training.data.prepare import PrepareConfig, prepare_pages

    params = load_params()
    config = PrepareConfig.from_params(params.get("prepare", {}))
    with stage_run("prepare", {"prepare": params.get("prepare", {}), "data": params.get("data", {})}):
        log_dataset(args.src, context="source")
        report = prepare_pages(args.src, args.out, config)
        flat = {"pages_used": report["pages_used"],
                **{f"crops_{k}": v for k, v in report["crops"].items()},
                **{f"skipped_{k}": v["count"] for k, v in report["skipped"].items()}}
        mlflow.log_metrics(flat)
        mlflow.log_artifact(str(Path(args.out) / "report.json"))
    if args.metrics:
        _dump(flat, args.metrics)
    skipped = ", ".join(f"{k} {v['count']}" for k, v in report["skipped"].items()) or "nothing"
    print(f"prepare: {report['pages_used']} pages -> crops {report['crops']}; skipped: {skipped}")


def cmd_train(args: argparse.Namespace) -> None:
    import mlflow

    from evaluation.pyfunc_model import log_recognizer
    from evaluation.reader import DetectorSettings
    from kocr.tracking import log_dataset, stage_run
    from training.train import TrainConfig, train

    params = load_params()
    config = TrainConfig.from_params(params)
    with stage_run("train", {"train": params.get("train", {}), "model": params.get("model", {})},
                   system_metrics=True) as run:
        for split in ("train", "val"):
            log_dataset(Path(args.data) / split, context=split)
        summary = train(config, args.data, args.out, metrics_file=args.metrics, plots_dir=args.plots)
        mlflow.log_metrics({f"final_{k}": float(v) for k, v in summary.items() if isinstance(v, (int, float))})
        _log_loss_plot(Path(args.plots))
        info = log_recognizer(Path(args.out) / "model.pt", DetectorSettings.from_params(params.get("detector")))
        _dump({"run_id": run.info.run_id, "model_uri": info.model_uri}, Path(args.out) / "mlflow.json")
    print(f"train: best val CER {summary['best_val_cer']:.4f} at step {summary['best_step']}; "
          f"{summary['images_per_second']} images/s; model {args.out}/model.pt")


def cmd_tune(args: argparse.Namespace) -> None:
    from kocr.tracking import log_dataset, stage_run
    from training.tune import TuneConfig, TuneError, run_tune

    params = load_params()
    try:
        config = TuneConfig.from_params(params.get("tune", {})).with_overrides(
            storage=args.storage, study_name=args.study, n_trials=args.n_trials, timeout_s=args.timeout)
        with stage_run("tune", {k: params.get(k, {}) for k in ("tune", "train", "model")}, experiment="ko-ocr/tune"):
            for split in ("train", "val"):
                log_dataset(Path(args.data) / split, context=split)
            best = run_tune(config, params, args.data, args.out)
    except TuneError as exc:
        raise SystemExit(f"kocr tune: error: {exc}") from None
    print(f"tune: study {best['study']}: best {best['metric']} {best['value']:.4f} (trial {best['trial']}); "
          f"trials {best['trials']}; this worker ran {best['ran']}; {args.out}/best_params.yaml: {best['train']}")


def _log_loss_plot(plots_dir: Path) -> None:
    import csv

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import mlflow

    with (plots_dir / "loss.tsv").open(encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([int(r["step"]) for r in rows], [float(r["loss"]) for r in rows], lw=1)
    ax.set(xlabel="step", ylabel="CTC loss", title="training loss")
    fig.tight_layout()
    mlflow.log_figure(fig, "plots/train_loss.png")
    plt.close(fig)


def _settings(params: dict[str, Any]):
    from evaluation.reader import DetectorSettings

    return DetectorSettings.from_params(params.get("detector"))


def cmd_evaluate(args: argparse.Namespace) -> None:
    import mlflow

    from evaluation.evaluate import eval_set_hash, evaluate_models, test_pages
    from evaluation.tesseract import tesseract_available
    from kocr.tracking import log_dataset, stage_run

    params = load_params()
    cfg = params.get("evaluate", {})
    pages = test_pages(args.source, args.splits, cfg.get("split", "test"))
    if not pages:
        raise SystemExit(f"kocr evaluate: no pages in split {cfg.get('split', 'test')!r} of {args.splits}")
    models = {"base": params.get("train", {}).get("base", "english_g2"), "candidate": args.candidate}
    with stage_run("evaluate", {"evaluate": cfg, "detector": params.get("detector", {})}):
        champion = _champion_uri(params.get("promote", {}).get("model_name", "ko-ocr-recognizer"))
        if champion:
            models["champion"] = champion
        for baseline in cfg.get("baselines", []):
            if baseline == "tesseract" and not tesseract_available():
                print("kocr evaluate: tesseract (kor+eng) not installed; its baseline row is left out", file=sys.stderr)
                continue
            models[baseline] = baseline
        log_dataset(args.source, context="evaluation")
        data_hash = eval_set_hash(pages)
        evaluated = evaluate_models(models, pages, args.predictions, _settings(params),
                                    iou_threshold=cfg.get("iou_threshold", 0.5), pictures_dir=args.pictures,
                                    worst_pages=cfg.get("worst_pages", 3))
        results = {label: e.metrics for label, e in evaluated.items()}
        for label, evaluation in evaluated.items():
            mlflow.log_metrics({f"{label}_{k}": float(v) for k, v in evaluation.metrics.items()})
            mlflow.log_dict(evaluation.analysis, f"analysis/{label}.json")
            for picture in evaluation.pictures:
                mlflow.log_artifact(str(picture), f"worst_pages/{label}")
        mlflow.set_tag("eval_data_hash", data_hash)
        report = evaluation_report(evaluated, len(pages), data_hash)
        mlflow.log_text(report, "evaluate.md")
    _dump({**results, "eval_data_hash": data_hash, "pages": len(pages)}, args.metrics)
    _dump({label: e.analysis for label, e in evaluated.items()}, Path(args.metrics).with_name("evaluate_analysis.json"))
    Path(args.metrics).with_suffix(".md").write_text(report, encoding="utf-8")
    print(report)


def _champion_uri(model_name: str) -> str | None:
    """``models:/NAME@champion`` when the registry has a champion, else None."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        mlflow.MlflowClient().get_model_version_by_alias(model_name, "champion")
    except MlflowException:
        return None
    return f"models:/{model_name}@champion"


def evaluation_report(evaluated: dict, pages: int, data_hash: str) -> str:
    """The Markdown report: metrics side by side, then each model's breakdown and confusions."""
    lines = [f"Evaluation on {pages} held-out pages (set {data_hash[:12]}):", "",
             markdown_table({label: e.metrics for label, e in evaluated.items()}), ""]
    for label, evaluation in evaluated.items():
        a = evaluation.analysis
        kinds = ", ".join(f"{k} {v:.3f} ({a['kind_words'][k]})" for k, v in a["kind_score"].items())
        cats = ", ".join(f"{c} {v:.3f}" for c, v in a["category_f1"].items())
        det = a["detection"]
        top = ", ".join(f"{c['gt']}→{c['pred']} ×{c['count']}" for c in a["confusions"][:8]) or "none"
        lines += [f"**{label}**: word score by kind: {kinds}; page F1 by category: {cats}; "
                  f"detection: {det['split']} split, {det['merged']} merged, {det['missed']} missed; "
                  f"top confusions: {top}", ""]
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
    import mlflow

    from evaluation.evaluate import evaluate_models, test_pages
    from evaluation.promote import Candidate, PromoteConfig, promote
    from kocr.tracking import stage_run

    params = load_params()
    config = PromoteConfig.from_params(params.get("promote", {}))
    logged = json.loads((Path(args.candidate) / "mlflow.json").read_text(encoding="utf-8"))
    evaluated = json.loads(Path(args.metrics).read_text(encoding="utf-8"))
    candidate = Candidate(logged["model_uri"], logged["run_id"], float(evaluated["candidate"][config.metric]),
                          evaluated["eval_data_hash"])

    def rescore(uri: str) -> float:
        pages = test_pages(args.source, args.splits, params.get("evaluate", {}).get("split", "test"))
        scores = evaluate_models({"champion": uri}, pages, Path(args.work) / "champion", _settings(params))
        return scores["champion"].metrics[config.metric]

    with stage_run("promote", {"promote": params.get("promote", {})}):
        decision = promote(candidate, config, rescore)
        mlflow.log_dict(decision, "promote.json")
        mlflow.set_tag("decision", decision["reason"])
    _dump(decision, args.out)
    print(f"promote: {config.model_name} v{decision['candidate_version']} is challenger; {decision['reason']}")


def cmd_export(args: argparse.Namespace) -> None:
    from training.checkpoint import load_recognizer
    from training.export_easyocr import export_easyocr

    params = load_params(required=False)
    name = args.name or params.get("export", {}).get("name", "ko_ocr")
    langs = tuple(params.get("export", {}).get("lang_list", ["ko", "en"]))
    loaded = load_recognizer(args.model)
    paths = export_easyocr(loaded, args.out, name, langs, with_detector=args.with_detector)
    print(f"export-easyocr: {args.model} -> {args.out} ({', '.join(Path(p).name for p in paths.values())})")
    if args.parity_source:
        from evaluation.evaluate import test_pages
        from evaluation.parity import easyocr_parity

        pages = test_pages(args.parity_source, args.splits, params.get("evaluate", {}).get("split", "test")) \
            if args.splits else []
        report = easyocr_parity(args.out, name, loaded, pages, _settings(params).add_margin)
        _dump(report, args.metrics)
        print(f"export-easyocr: easyocr.Reader agrees with the platform on {report['float_agreement']:.1%} of "
              f"{report['crops']} crops unquantized, {report['int8_agreement']:.1%} with int8 quantization")


def cmd_score(args: argparse.Namespace) -> None:
    from evaluation.metrics import score_folders

    print(json.dumps(score_folders(args.gt, args.pred, args.iou), indent=1))


def cmd_predict(args: argparse.Namespace) -> None:
    from training.data.pages import Page, write_page

    if args.model.startswith(("models:/", "runs:/")):
        # a registered or logged model is read through its MLflow pyfunc, with its own detector settings
        import mlflow
        from mlflow.exceptions import MlflowException

        from kocr.tracking import configure_tracking
        from training.checkpoint import ModelSpecError

        configure_tracking()
        try:
            model = mlflow.pyfunc.load_model(args.model)
        except (MlflowException, OSError) as exc:
            raise ModelSpecError(f"cannot load {args.model!r} from MLflow: {str(exc).splitlines()[0]}") from None
        pages = [Page.from_dict(d) for d in model.predict([str(p) for p in args.images])]
    else:
        from evaluation.reader import PageReader
        from training.checkpoint import load_recognizer

        reader = PageReader(load_recognizer(args.model), _settings(load_params(required=False)))
        pages = [reader.read(image) for image in args.images]
    for image, page in zip(args.images, pages):
        if args.out:
            write_page(page, Path(args.out) / (Path(image).stem + ".json"))
        else:
            print(json.dumps(page.to_dict(), ensure_ascii=False))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kocr", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, func: Callable[[argparse.Namespace], None], help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(func=func)
        return p

    p = add("synth-pages", cmd_synth_pages, "generate AI-Hub-format Korean pages (the sample stage)")
    p.add_argument("--out", required=True)
    p.add_argument("--count", type=int)
    p.add_argument("--seed", type=int)

    p = add("prepare-aihub", cmd_prepare, "page JSON + images -> word-crop LMDB split by document")
    p.add_argument("--src", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--metrics", help="write flat counts here (a DVC metrics file)")

    p = add("train", cmd_train, "fine-tune the recogniser (train: and model: in params.yaml)")
    p.add_argument("--data", required=True, help="folder with train/ and val/ LMDB sets")
    p.add_argument("--out", required=True)
    p.add_argument("--metrics", default="metrics/train.json")
    p.add_argument("--plots", default="plots/train")

    p = add("tune", cmd_tune, "search train: knobs with Optuna (tune: in params.yaml); one worker of a study")
    p.add_argument("--data", required=True, help="folder with train/ and val/ LMDB sets")
    p.add_argument("--out", default="tuning", help="best_params.yaml (and the embedded optuna.db) go here")
    p.add_argument("--storage", help="postgresql+psycopg2://… to join workers on other machines (tune.storage)")
    p.add_argument("--study", help="study name; workers with the same storage and name share it (tune.study_name)")
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

    p = add("score", cmd_score, "metrics of two folders of page JSON (ground truth, predictions)")
    p.add_argument("--gt", required=True)
    p.add_argument("--pred", required=True)
    p.add_argument("--iou", type=float, default=0.5)

    p = add("predict", cmd_predict, "read page images; page JSON per image")
    p.add_argument("images", nargs="+")
    p.add_argument("--model", default="models/candidate/model.pt")
    p.add_argument("--out")
    return parser


def main(argv: list[str] | None = None) -> int:
    from training.checkpoint import ArchitectureMismatch, ModelSpecError
    from training.data.pages import PageError
    from training.export_easyocr import ExportError

    args = build_parser().parse_args(argv)
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # keep stage output to progress and results
    try:
        args.func(args)
    except (ModelSpecError, ArchitectureMismatch, ExportError, PageError, FileNotFoundError) as exc:
        print(f"kocr {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
