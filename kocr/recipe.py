"""The helpers of the ko-base recipe (recipes/ko-base/dvc.yaml, docs/recipe.md): ``python -m kocr.recipe``.

- ``export-crops LMDB --out DIR``: an LMDB set as PNG crops plus ``labels.tsv`` (image, text, font),
  the input of ``kocr evaluate-crops``;
- ``evaluate``: ``evaluate-crops`` scoring of the recipe model, its starting point and the baselines
  on the held-out-font set (overall and per face) and on every real set of ``recipe.real_sets``
  that exists (a missing one is skipped with a message), and ``evaluate-pages`` scoring of each
  ``recipe.real_pages`` page, into one metrics JSON and an MLflow run (``recipe_evaluate``);
- ``card``: the shipped checkpoint (``<out>/<name>.pt``), its ``metrics.json`` and ``MODEL_CARD.md``;
- ``ship``: the gate that copies a release over ``models/base/`` only when it reads the release's own
  sets better than the checkpoint it replaces (``kocr.recipe_ship``);
- ``check-size``: exit 2 before any work when the params file's size needs a GPU this machine lacks
  (``kocr.recipe_size``).

Example:
    >>> export_crops("recipes/ko-base/data/heldout", "recipes/ko-base/data/heldout_crops")  # doctest: +SKIP
    200
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import itertools
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

from tqdm import tqdm

from kocr import KocrWarning, warnings_as_lines
from kocr.atomic import (OutFolderError, atomic_path, check_out_folder, disk_full_line, file_sha256,
                         named_disk_errors, replaced_folder, write_text)
from kocr.params import check_keys, load_params, name_list, paths_by_name, section, typed

HELDOUT = "heldout"
HELDOUT_LATIN = "heldout_latin"  # the held-out faces, every word in Latin script (synth_lines_heldout_latin)
RECIPE_KEYS = ("baselines", "reference", "real_sets", "real_pages", "detector")  # the recipe: section
# the top level of a recipe params file (recipes/ko-base/params*.yaml); other synth_lines_* sections pass too
RECIPE_SECTIONS = ("size", "synth_lines", "synth_lines_val", "synth_lines_heldout", "synth_lines_heldout_latin",
                   "synth_lines_heldout_signs", "model", "train", "recipe")
HELDOUT_SIGNS = "heldout_signs"  # sign and menu display faces never trained on (synth_lines_heldout_signs)
# a shipped base is git-tracked and must stay "under 20 MB": 20,000,000 bytes, the stricter reading
# (20 MiB would be 20,971,520) and the megabytes the card prints (ko_base.pt: 16,087,585 bytes, 16.1 MB)
MAX_CHECKPOINT_BYTES = 20_000_000


class RecipeError(RuntimeError):
    """A recipe input that cannot be used (a checkpoint too large to ship, …); the message says why."""


def check_checkpoint_size(path: str | os.PathLike) -> int:
    """The size of a checkpoint to ship, in bytes; RecipeError when it is not under ``MAX_CHECKPOINT_BYTES``."""
    size = Path(path).stat().st_size
    if size >= MAX_CHECKPOINT_BYTES:
        raise RecipeError(f"{path}: {size:,} bytes ({size / 1e6:.1f} MB); a shipped base must be under 20 MB "
                          f"({MAX_CHECKPOINT_BYTES:,} bytes): save the model alone (no optimiser state or extra "
                          "tensors in its meta), or a smaller architecture")
    return size


def _exported_here(name: str) -> bool:
    """Whether ``name`` is one ``export_crops`` writes: ``labels.tsv`` or a crop ``NNNNNN.png``."""
    return name == "labels.tsv" or re.fullmatch(r"\d{6,}\.png", name) is not None


def check_export_out(out: Path) -> None:
    """``OutFolderError`` for an ``--out`` that replacing it whole would destroy: a symbolic link, a file, or a
    folder holding anything but crops and ``labels.tsv`` (a folder of the user's, ``.``)."""
    if out.is_symlink():
        raise OutFolderError(f"--out {out}: a symbolic link (to {os.readlink(out)}); give the folder itself, "
                             "or a new path")
    if not out.name or out.resolve() in (Path.cwd(), *Path.cwd().parents):
        raise OutFolderError(f"--out {out}: the working folder (or one above it), which export-crops would "
                             "replace whole; give a new folder")
    check_out_folder(out, _exported_here, "export-crops does not write", "the crop folder")


def export_crops(lmdb_dir: str | os.PathLike, out: str | os.PathLike) -> int:
    """Write every sample of an LMDB set as ``<out>/NNNNNN.png`` and ``<out>/labels.tsv``; returns the count.

    The ``font`` column comes from the set's ``manifest.tsv`` (written by ``kocr synth-lines``) when present.
    Both files are plain TSV: a label's ``"`` is text, written as it is, save a label the reader would take
    for CSV quoting (``"a""b"``), written CSV-quoted (``evaluation.score_crops.tsv_row`` and ``tsv_field``).
    An earlier ``out`` is replaced whole; one holding other files is refused first (``check_export_out``).
    """
    import cv2

    from evaluation.score_crops import tsv_row
    from training.data.lmdb_store import LmdbDataset

    lmdb_dir, out = Path(lmdb_dir), Path(out)
    if not lmdb_dir.is_dir():
        raise FileNotFoundError(f"{lmdb_dir}: " + ("not a folder; give an LMDB set folder (as kocr synth-lines writes)"
                                                   if lmdb_dir.exists() else "LMDB set folder not found"))
    dataset = LmdbDataset(lmdb_dir)
    manifest = lmdb_dir / "manifest.tsv"
    check_export_out(out)
    # written beside ``out`` and moved in whole, the earlier crops moved aside first and removed after
    # (replaced_folder): a kill or a full disk leaves no half set under its name, nor half the earlier one;
    # each row goes to the file as its crop is written, so memory stays flat however many samples the set holds
    with replaced_folder(out) as tmp, _manifest_fonts(manifest) as font_of:
        labels = out / "labels.tsv"
        fh = (tmp / "labels.tsv").open("w", encoding="utf-8", newline="")
        try:
            with named_disk_errors(labels):
                fh.write(tsv_row(["image", "text", "font"], str(labels)))
            for i in tqdm(range(len(dataset)), desc="export-crops", unit="crop"):
                image, label = dataset[i]
                name = f"{i + 1:06d}.png"
                # encoded in memory, then written by Python, which raises on a short write: cv2.imwrite
                # ignores one in the last bytes it buffered, so a file-size limit (ulimit -f) or a disk
                # that filled left a crop cut short, reported written, in a set published as whole
                ok, png = cv2.imencode(".png", image)
                if not ok:
                    raise OSError(f"{out / name}: could not encode the image")
                with named_disk_errors(out / name):  # a full disk names the crop, not the hidden folder
                    (tmp / name).write_bytes(png.tobytes())
                row = tsv_row([name, label, font_of(i + 1)], f"{lmdb_dir} sample {i + 1}")
                with named_disk_errors(labels):
                    fh.write(row)
        except BaseException:
            with contextlib.suppress(OSError):  # the rows still buffered cannot hide the error that stopped it
                fh.close()
            raise
        with named_disk_errors(labels):
            fh.close()
    return len(dataset)


@contextlib.contextmanager
def _manifest_fonts(manifest: Path) -> Iterator[Callable[[int], str]]:
    """Yield ``font_of(index)``: the ``font`` column of ``manifest`` (synth-lines' ``manifest.tsv``) for
    sample ``index``, asked in increasing order; ``""`` without a manifest or a row for it. A manifest
    whose indices never go down (synth-lines writes them 1, 2, 3…) is read along with the samples, one row
    held at a time; any other order is read whole first, the last row of an index winning either way."""
    if not manifest.is_file():
        yield lambda index: ""
        return
    with manifest.open(encoding="utf-8") as fh:
        indices = (int(row["index"]) for row in csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE))
        ordered = all(a <= b for a, b in itertools.pairwise(indices))
    with manifest.open(encoding="utf-8") as fh:
        rows = ((int(row["index"]), row["font"]) for row in csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE))
        if not ordered:
            fonts = dict(rows)
            yield lambda index: fonts.get(index, "")
            return
        ahead = [next(rows, None)]  # the first row not yet passed

        def font_of(index: int) -> str:
            font = ""
            while ahead[0] is not None and ahead[0][0] <= index:
                if ahead[0][0] == index:
                    font = ahead[0][1]
                ahead[0] = next(rows, None)
            return font

        yield font_of


def set_identity(labels: str | os.PathLike, crops: list[Any]) -> dict[str, Any]:
    """What identifies a scored set (``n`` and ``sha256`` in the metrics): its crop or word count, and
    the sha256 of its labels file and of every image it names, in order of first use."""
    path = Path(labels)
    digest = hashlib.sha256(path.read_bytes())
    for image in dict.fromkeys(crop.image for crop in crops):
        digest.update(Path(image).read_bytes())
    return {"n": len(crops), "sha256": digest.hexdigest()}


def evaluate_sets(model: str, sets: dict[str, str], reference: str | None = None,
                  baselines: tuple[str, ...] = ("tesseract",), out: str | os.PathLike | None = None,
                  worst: int = 10, pages: dict[str, str] | None = None,
                  detector: dict[str, Any] | None = None) -> dict[str, Any]:
    """Score ``model`` (as ``recipe``), ``reference`` and the baselines on each labels file of ``sets``
    (a TSV of crops, or a JSON of word boxes widened by ``detector``'s ``add_margin``) and on each
    whole page of ``pages`` (name -> image, its ground truth ``<stem>.txt`` beside it).

    A ``model`` given as a file is recorded by its sha256 (``model_sha256``), so that the card stage
    and the ship gate can tell the scores belong to the checkpoint beside them.
    The margin is recorded (``add_margin``) so that the ship gate reads the word boxes the same way,
    and each set's ``n`` and ``sha256`` (``set_identity``) so that it compares on the same sets.
    A set or page whose file does not exist is listed under ``skipped`` with the reason; a baseline
    that is not installed is left out with a warning (``KocrWarning``). The held-out set (name ``heldout``) is also
    scored per font (``by_font``) when its TSV has a ``font`` column. ``jamo`` says which part of the
    Hangul syllable the recipe model misreads in each set (``_jamo_summary``). Pages are read end to
    end (CRAFT + recognition with ``detector``'s settings, ``kocr evaluate-pages``) into ``pages``.
    """
    from evaluation.metrics import recognition_scores
    from evaluation.reader import DetectorSettings
    from evaluation.score_crops import read_labels, score_crops, write_outputs
    from evaluation.tesseract import tesseract_available

    margin = DetectorSettings.from_params(detector, "recipe.detector").add_margin  # for word boxes on whole images

    models = {"recipe": model, **({"reference": reference} if reference else {})}
    for baseline in baselines:
        if baseline == "tesseract" and not tesseract_available():
            warnings.warn("tesseract (kor+eng) not installed; its rows are left out", KocrWarning, stacklevel=2)
            continue
        models[baseline] = baseline
    result: dict[str, Any] = {"models": models, "sets": {}, "skipped": {}, "add_margin": margin}
    if Path(model).is_file():  # which checkpoint these scores are of: the card stage and ship check it
        result["model_sha256"] = file_sha256(model)
    for name, labels in sets.items():
        path = Path(labels)
        if not path.is_file():
            print(f"python -m kocr.recipe evaluate: note: {path} not found; set {name!r} skipped", file=sys.stderr)
            result["skipped"][name] = f"{path} not found"
            continue
        crops = read_labels(path, margin)
        report = score_crops(crops, models, labels=path)
        entry: dict[str, Any] = {"labels": str(path), **set_identity(path, crops), **report.metrics}
        fonts = [crop.font for crop in crops]
        groups = {font: [i for i, f in enumerate(fonts) if f == font]  # font -> crop indices; none unnamed
                  for font in sorted(set(fonts))} if any(fonts) else {}
        if groups:
            entry["by_font"] = {font: {label: recognition_scores([crops[i].text for i in idx], [texts[i] for i in idx])
                                       for label, texts in report.readings.items()}
                                for font, idx in groups.items()}
        if "reference" in report.readings:
            entry["vs_reference"] = _vs_reference(report, groups)
        entry["jamo"] = _jamo_summary([(crop.text, text) for crop, text in zip(crops, report.readings["recipe"])])
        if out:
            # the generated sets (hundreds of crops) show their worst; the small real sets every crop
            write_outputs(report, Path(out) / name, worst if name.startswith(HELDOUT) else len(crops))
        result["sets"][name] = entry
    if pages:
        result["pages"] = _evaluate_pages(models, pages, detector, out, result["skipped"])
    return result


def _evaluate_pages(models: dict[str, str], pages: dict[str, str], detector: dict[str, Any] | None,
                    out: str | os.PathLike | None, skipped: dict[str, str]) -> dict[str, Any]:
    """Each page read by every model: its scores per model and every model's text lines (``lines``)."""
    from evaluation.reader import DetectorSettings
    from evaluation.score_pages import read_page_item, score_pages

    scored: dict[str, Any] = {}
    for name, image in pages.items():
        path = Path(image)
        text = path.with_suffix(".txt")
        missing = next((p for p in (path, text) if not p.is_file()), None)
        if missing is not None:
            print(f"python -m kocr.recipe evaluate: note: {missing} not found; page {name!r} skipped", file=sys.stderr)
            skipped[name] = f"{missing} not found"
            continue
        item = read_page_item(path, text)
        found = score_pages([item], models, DetectorSettings.from_params(detector, "recipe.detector"), progress=False)
        scored[name] = {"image": str(path), "gt_lines": item.lines,
                        **{label: {k: v for k, v in s.items() if k != "per_page"} for label, s in found.items()},
                        "lines": {label: s["per_page"][0]["lines"] for label, s in found.items()}}
        if out:
            write_text(Path(out) / name / "scores.json", json.dumps(found, ensure_ascii=False, indent=1) + "\n")
    return scored


def mlflow_metrics(result: dict[str, Any]) -> dict[str, float]:
    """Every number of an ``evaluate_sets`` result under a dotted name, as MLflow metrics take them:
    ``sets.heldout.recipe.word_accuracy``, ``sets.heldout.vs_reference.fixed``,
    ``pages.handwritten_page.tesseract.char_f1``, …; texts and lists are left out.

    >>> mlflow_metrics({"sets": {"a": {"recipe": {"cer": 0.1, "n": 3}, "labels": "a.tsv"}}, "seconds": 2.5})
    {'sets.a.recipe.cer': 0.1, 'sets.a.recipe.n': 3.0, 'seconds': 2.5}
    """
    from kocr.params import flatten

    flat = flatten({k: v for k, v in result.items() if k in ("sets", "pages", "seconds")})
    return {name: float(value) for name, value in flat.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool)}


def _vs_reference(report: Any, groups: dict[str, list[int]]) -> dict[str, Any]:
    """The recipe model against its starting point, crop by crop (``paired_words``): words fixed,
    words broken and the sign test's ``p``, overall and per font (``groups``: font -> crop indices)."""
    from evaluation.metrics import paired_words

    gts = [c.text for c in report.crops]
    ref, new = report.readings["reference"], report.readings["recipe"]
    out: dict[str, Any] = paired_words(gts, ref, new)
    if groups:
        out["by_font"] = {font: paired_words(*([seq[i] for i in idx] for seq in (gts, ref, new)))
                          for font, idx in groups.items()}
    return out


def _jamo_summary(pairs: list[tuple[str, str]], top: int = 5) -> dict[str, Any]:
    """Misread syllables by the jamo that differs (``positions``) and the ``top`` most frequent
    (position, ground truth, reading) as records, the form a JSON metrics file and the card take."""
    from evaluation.analysis import jamo_confusions

    found = jamo_confusions(pairs, top)
    return {"positions": found["positions"],
            "top": [{"position": p, "gt": a, "read": b, "count": n} for p, a, b, n in found["top"]]}


def _vs_reference_line(paired: dict[str, Any], reference: str) -> str:
    """The card's sentence on which words this model reads differently from its starting point."""
    def split(p: dict[str, Any]) -> str:
        return f"{p['fixed']} fixed, {p['broken']} broken (sign test p = {p['p']:.2g})"

    fonts = "; ".join(f"{font}: {split(p)}" for font, p in paired.get("by_font", {}).items())
    return (f"Against the reference ({reference}), words read right only by this model / only by the reference: "
            f"{split(paired)}" + (f"; {fonts}." if fonts else "."))


def _jamo_line(jamo: dict[str, Any]) -> str:
    """The card's sentence on where in the syllable the model goes wrong."""
    counts = ", ".join(f"{name} {n}" for name, n in jamo["positions"].items())
    common = ", ".join(f"{t['position']} {t['gt']}→{'(none)' if t['read'] == '-' else t['read']} ({t['count']})"
                       for t in jamo["top"])
    return (f"Syllables read as another syllable, by the jamo that differs: {counts}"
            + (f"; most frequent: {common}." if common else "."))


def _page_lines(page_name: str, entry: dict[str, Any], models: dict[str, str], name: str) -> list[str]:
    """The card's table for one whole page, then the page as this model read it beside the ground truth."""
    out = [f"**{page_name}** (`{entry['image']}`, the whole page read end to end: CRAFT + recognition, "
           "`kocr evaluate-pages`; order-free character F1 and line-matched CER):", "",
           "| model | gt chars | char_precision | char_recall | char_f1 | line_cer |", "|---|---|---|---|---|---|"]
    for label in models:
        if label in entry:
            s = entry[label]
            shown = f"{name} (this)" if label == "recipe" else f"{label} ({models[label]})"
            out.append(f"| {shown} | {s['gt_chars']} | {s['char_precision']:.4f} | {s['char_recall']:.4f} | "
                       f"{s['char_f1']:.4f} | {s['line_cer']:.4f} |")
    read = entry.get("lines", {}).get("recipe", [])
    out += ["", "Ground truth, then this model's lines:", "", "```", *entry.get("gt_lines", []), "---", *read, "```", ""]
    return out


HELDOUT_SECTIONS = {HELDOUT: "synth_lines_heldout", HELDOUT_LATIN: "synth_lines_heldout_latin",
                    HELDOUT_SIGNS: "synth_lines_heldout_signs"}  # scored set -> the params section that draws it


def set_faces(params: dict[str, Any], set_name: str, entry: dict[str, Any] | None) -> tuple[list[str], list[str]]:
    """(faces, absent) of a generated set: the faces it holds as scored (``entry``'s ``by_font``, from the
    font column of its labels.tsv), else those its section's ``fonts`` name; ``absent``: the patterns of
    that ``fonts`` that no face of the set matches (a face not installed where the set was drawn, which
    ``kocr synth-lines`` only warns of).

    >>> set_faces({"synth_lines_heldout": {"fonts": ["UnBatang.ttf", "UnPilgi.ttf"]}}, "heldout",
    ...           {"by_font": {"UnBatang.ttf": {}}})
    (['UnBatang.ttf'], ['UnPilgi.ttf'])
    """
    import fnmatch

    named = [str(f) for f in section(params, fonts_section(params, set_name)).get("fonts") or []]
    drawn = sorted((entry or {}).get("by_font") or {})
    if not drawn:
        return named, []
    absent = [p for p in named if not any(fnmatch.fnmatchcase(face.lower(), Path(p).name.lower()) for face in drawn)]
    return drawn, absent


def fonts_section(params: dict[str, Any], set_name: str) -> str:
    """The params section whose ``fonts`` drew the generated set ``set_name``: its own section when that names
    fonts, else ``synth_lines`` (whose keys ``kocr synth-lines --section`` starts from).

    >>> fonts_section({"synth_lines": {"fonts": ["A.ttf"]}, "synth_lines_heldout": {"count": 5}}, "heldout")
    'synth_lines'
    """
    own = HELDOUT_SECTIONS.get(set_name, "synth_lines")
    return own if section(params, own).get("fonts") else "synth_lines"


def _faces_text(params: dict[str, Any], set_name: str, entry: dict[str, Any] | None) -> str:
    """The card's faces of a generated set, a face its params name but the set lacks flagged in bold."""
    faces, absent = set_faces(params, set_name, entry)
    text = ", ".join(faces)
    if absent:
        text += (f" (**not in the set: {', '.join(absent)}**, named in `{fonts_section(params, set_name)}.fonts` but not "
                 "installed where the set was drawn; no score here is of it)")
    return text


def _section_text(params: dict[str, Any], keys: tuple[str, ...]) -> str:
    import yaml

    return yaml.safe_dump({k: params[k] for k in keys if k in params}, allow_unicode=True, sort_keys=False)


def _accelerator() -> str:
    import torch

    return f"GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "no GPU"


def _score_row(label: str, scores: dict[str, float]) -> str:
    return (f"| {label} | {int(scores['n'])} | {scores['cer']:.4f} | {scores['word_accuracy']:.4f} | "
            f"{scores['norm_ed']:.4f} |")


def _averaged_line(train_metrics: dict[str, Any], base: str) -> str:
    """The card's sentence on ``train.average_with_base``: what was mixed and how the mean reads the val set."""
    share = train_metrics.get("averaged_with_base")
    if not share:
        return ""
    return (f" The shipped checkpoint is not that best step alone but {1 - share:g} x it + {share:g} x its start "
            f"`{base}` (`train.average_with_base`), which reads the val set at CER "
            f"{train_metrics.get('averaged_val_cer', float('nan')):.4f}, word accuracy "
            f"{train_metrics.get('averaged_val_word_accuracy', float('nan')):.4f}; the metrics below are this mean's.")


def uncommitted_changes(paths: list[str | os.PathLike]) -> list[str]:
    """The files under ``paths`` (those inside the git repository of the working directory) that differ
    from the commit checked out: modified, staged, deleted or new and not ignored; [] outside a repository."""
    def git(*args: str) -> subprocess.CompletedProcess[str] | None:
        try:
            return subprocess.run(["git", *args], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None

    top = git("rev-parse", "--show-toplevel")
    if top is None or top.returncode != 0:
        return []
    root = Path(top.stdout.strip()).resolve()
    inside = [str(p) for p in paths if Path(p).resolve() == root or root in Path(p).resolve().parents]
    found = git("status", "--porcelain", "--untracked-files=all", "--", *inside) if inside else None
    if found is None or found.returncode != 0:
        return []
    return sorted({line[3:].split(" -> ")[-1] for line in found.stdout.splitlines() if len(line) > 3})


def _reproduce_lines(commit: str | None, uncommitted: list[str]) -> list[str]:
    """The card's sentence before the reproduce command: the commit it ran at, and whether that
    commit alone holds what the run read."""
    if not commit:
        return []
    if uncommitted:
        shown = ", ".join(f"`{p}`" for p in uncommitted[:8]) + (f" and {len(uncommitted) - 8} more"
                                                                 if len(uncommitted) > 8 else "")
        return [f"At commit `{commit}` plus uncommitted changes to {shown}: that commit alone does not "
                "reproduce this checkpoint, and the changes are not recorded here (commit them before a run "
                "whose card should reproduce it; later commits also change the recipe's params, and a "
                "continuation's start is the base shipped then, not this checkpoint):", ""]
    return [f"At commit `{commit}` (`git checkout {commit[:12]}` first: later commits change the recipe's "
            "params, and a continuation's start is the base shipped then, not this checkpoint):", ""]


def model_card(params: dict[str, Any], train_metrics: dict[str, Any], eval_metrics: dict[str, Any],
               data_counts: dict[str, int], command: str, wall_seconds: dict[str, float], size_mb: float,
               name: str, sha256: str = "", commit: str | None = None, uncommitted: list[str] | None = None) -> str:
    """MODEL_CARD.md text: what the model is, the data, the params, the metrics, how to reproduce it
    (``commit``: the project's git commit the recipe ran at, whose params and start it needs;
    ``uncommitted``: the files that mattered to the run and differed from it)."""
    size = params.get("size", "?")
    lines = [f"# {name}: Korean base recogniser (kocr ko-base recipe, size `{size}`)", ""]
    if size == "cpu":
        lines += ["> **Reduced CPU size.** This checkpoint was trained by the `cpu` preset of the recipe "
                  f"({data_counts.get('train', 0):,} synthetic training images, {train_metrics.get('steps')} steps "
                  "on CPU), not the GPU recipe (`recipes/ko-base/params.yaml`, ~1M images, many times more "
                  "images seen). Read the metrics below before relying on it; the GPU size is the one meant "
                  "to reach the recipe's targets.", ""]
    elif size == "gpu-instalment":
        lines += ["> **GPU instalment.** This checkpoint continues the shipped base for "
                  f"{train_metrics.get('steps')} steps x {section(params, 'train').get('batch_size')} on "
                  f"{data_counts.get('train', 0):,} synthetic training images "
                  f"(`recipes/ko-base/params-gpu-instalment.yaml`, trained on {train_metrics.get('device', '?')}); "
                  "it is not the full GPU recipe from EasyOCR's weights (`recipes/ko-base/params.yaml`).", ""]
    from training.checkpoint import SHIPPED_MODELS

    train = section(params, "train")
    base = str(train.get("base"))
    scored_sets = eval_metrics.get("sets") or {}
    digest = f" (sha256 {train_metrics['base_sha256']}…)" if train_metrics.get("base_sha256") else ""
    lineage = (f" This is a continuation: `{base}` was the shipped `{SHIPPED_MODELS[base].as_posix()}` of the "
               "time, and its own card (data, params, scores) is in the git history of that folder."
               if base in SHIPPED_MODELS else "")
    lines += [
        "EasyOCR gen-2 None-VGG-BiLSTM-CTC recogniser (`model:` below), charset "
        f"`{train.get('charset')}`, started from `{base}`{digest} and trained by `kocr train` on "
        "synthetic word/line images from `kocr synth-lines`"
        + (", with the other sets listed under Data mixed in (`train.mix`)" if train_metrics.get("train_mix") else "")
        + f".{lineage} Loads with "
        f"`training.checkpoint.load_recognizer(\"models/base/{name}.pt\")` and exports with `kocr export-easyocr`.",
        "", "## Reproduce", "", *_reproduce_lines(commit, uncommitted or []),
        "```", command, "```", "",
        f"Machine: {platform.node() or '?'} ({platform.machine()}, {os.cpu_count()} CPU cores, {_accelerator()}), "
        f"Python {platform.python_version()}; written {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}."
        + (f" Trained on {train_metrics['device']}." if train_metrics.get("device") else ""),
        "Wall time: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in wall_seconds.items())
        + " (synthesis and the card take seconds to minutes more).", "",
        "## Data", "",
        f"- train: {data_counts.get('train', 0):,} images, faces {', '.join(params['synth_lines'].get('fonts', []))}",
        *[f"- mixed into training (`train.mix`): `{m['path']}`, {m['samples']:,} samples, {m['share']:.0%} of each "
          "epoch" + (" (the synthetic set above)" if i == 0 else "") for i, m in enumerate(train_metrics.get("train_mix", []))],
        f"- val: {data_counts.get('val', 0):,} images, same faces, seed {params.get('synth_lines_val', {}).get('seed')}",
        # the faces of each held-out set as scored (labels.tsv's font column), not as the params name them
        f"- held-out: {data_counts.get('heldout', 0):,} images in faces never trained on: "
        f"{_faces_text(params, HELDOUT, scored_sets.get(HELDOUT))}",
        *([f"- held-out Latin: {data_counts[HELDOUT_LATIN]:,} images in the unseen faces, every word in "
           f"Latin script (romanised words, measures, sign words): "
           f"{_faces_text(params, HELDOUT_LATIN, scored_sets.get(HELDOUT_LATIN))}"]
          if data_counts.get(HELDOUT_LATIN) else []),
        *([f"- held-out signs: {data_counts[HELDOUT_SIGNS]:,} images in sign and menu display faces never trained "
           f"on: {_faces_text(params, HELDOUT_SIGNS, scored_sets.get(HELDOUT_SIGNS))}"]
          if data_counts.get(HELDOUT_SIGNS) else []), "",
        "## Training", "",
        f"{train_metrics.get('steps')} steps, best val CER {train_metrics.get('best_val_cer', float('nan')):.4f} "
        f"at step {train_metrics.get('best_step')}, val word accuracy {train_metrics.get('val_word_accuracy', float('nan')):.4f}, "
        f"{train_metrics.get('images_per_second')} images/s, checkpoint {size_mb:.1f} MB"
        + (f" (sha256 `{sha256}`)" if sha256 else "") + "."
        + _averaged_line(train_metrics, base), "",
        "## Metrics (kocr evaluate-crops: whole crop read as easyocr.Reader.recognize does)", ""]
    for set_name, entry in eval_metrics.get("sets", {}).items():
        lines += [f"**{set_name}** (`{entry['labels']}`):", "", "| model | n | cer | word_accuracy | norm_ed |",
                  "|---|---|---|---|---|"]
        lines += [_score_row(f"{label} ({eval_metrics['models'][label]})" if label != "recipe" else f"{name} (this)",
                             entry[label]) for label in eval_metrics["models"] if label in entry]
        lines += [_score_row(f"{name} on {font} only", scores["recipe"])
                  for font, scores in entry.get("by_font", {}).items()]
        lines.append("")
        absent = set_faces(params, set_name, entry)[1] if set_name in HELDOUT_SECTIONS else []
        if absent:
            lines += [f"**Not in this set: {', '.join(absent)}** (named in `{fonts_section(params, set_name)}.fonts`, not "
                      "installed where the set was drawn): these scores are of the other faces only.", ""]
        if entry.get("vs_reference"):
            lines += [_vs_reference_line(entry["vs_reference"], eval_metrics["models"].get("reference", "")), ""]
        if entry.get("jamo"):
            lines += [_jamo_line(entry["jamo"]), ""]
    for page_name, entry in eval_metrics.get("pages", {}).items():
        lines += _page_lines(page_name, entry, eval_metrics["models"], name)
    for set_name, reason in eval_metrics.get("skipped", {}).items():
        lines += [f"**{set_name}**: skipped ({reason}).", ""]
    lines += ["## Params", "", "```yaml",
              _section_text(params, ("size", "synth_lines", "synth_lines_val", "synth_lines_heldout",
                                     "synth_lines_heldout_latin", "synth_lines_heldout_signs", "model",
                                     "train")).rstrip(),
              "```", ""]
    return "\n".join(lines)


def write_card(model: str | os.PathLike, train_metrics: str | os.PathLike, eval_metrics: str | os.PathLike,
               data: str | os.PathLike, out: str | os.PathLike, name: str, command: str) -> Path:
    """Copy the checkpoint to ``<out>/<name>.pt``, the evaluation to ``<out>/metrics.json`` and write
    ``<out>/MODEL_CARD.md``; returns the card path. RecipeError when the evaluation is not of this
    checkpoint (its ``model_sha256``). The checkpoint is written last: a release stopped midway holds
    a card and metrics that do not name its checkpoint, which ship refuses."""
    from kocr.tracking import git_commit
    from training.data.lmdb_store import LmdbDataset

    model, out = Path(model), Path(out)
    for path in (model, Path(train_metrics), Path(eval_metrics)):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: " + ("a folder, expected a file" if path.is_dir() else
                                                   "not found (run the recipe's train and evaluate stages first)"))
    size = check_checkpoint_size(model)
    params = load_recipe_params()
    trained = json.loads(Path(train_metrics).read_text(encoding="utf-8"))
    evaluated = json.loads(Path(eval_metrics).read_text(encoding="utf-8"))
    sha256 = file_sha256(model)
    scored = evaluated.get("model_sha256")
    if scored != sha256:
        raise RecipeError(f"{eval_metrics}: " + (f"the scores of another checkpoint (sha256 {scored[:16]}…), not of "
                                                  f"{model} ({sha256[:16]}…)" if scored else
                                                  "records no sha256 of the checkpoint it scored (written before "
                                                  "the evaluate stage recorded it)")
                          + "; run the evaluate stage on it again")
    # training's own record counts what trained, also for a set rendered on another machine (the GPU
    # kit), where a local data/train may be another run's; the held-out sets are counted here
    mixed = trained.get("train_mix") or [{"samples": trained.get("train_samples", 0)}]  # the synthetic set first
    counts = {split: len(LmdbDataset(Path(data) / split))
              for split in ("train", "val", HELDOUT, HELDOUT_LATIN, HELDOUT_SIGNS) if (Path(data) / split).is_dir()}
    counts |= {k: v for k, v in (("train", mixed[0]["samples"]), ("val", trained.get("val_n", 0))) if v}
    # the held-out sets as scored (the metrics' n), not whatever set is rendered here now
    scored = {split: evaluated["sets"][split].get("n", (evaluated["sets"][split].get("recipe") or {}).get("n"))
              for split in (HELDOUT, HELDOUT_LATIN, HELDOUT_SIGNS) if split in (evaluated.get("sets") or {})}
    counts |= {split: int(n) for split, n in scored.items() if n is not None}
    wall = {"train": trained.get("train_seconds", 0.0) + trained.get("validation_seconds", 0.0),
            "evaluate": evaluated.get("seconds", 0.0)}
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "metrics.json", json.dumps(evaluated, ensure_ascii=False, indent=1) + "\n")
    from kocr.params import params_path
    from training.checkpoint import SHIPPED_MODELS

    # what the run read besides the data: the params file, the recipe's dvc.yaml, the code, the start
    start = SHIPPED_MODELS.get(str(section(params, "train").get("base")))
    mattered = [params_path(), params_path().parent / "dvc.yaml", "kocr", "training", "evaluation",
                "pyproject.toml", *([start] if start else [])]
    card = write_text(out / "MODEL_CARD.md", model_card(params, trained, evaluated, counts, command, wall,
                                                        size / 1e6, name, sha256, git_commit(),
                                                        uncommitted_changes(mattered)))
    with atomic_path(out / f"{name}.pt", durable=True) as tmp:
        shutil.copyfile(model, tmp)
    if file_sha256(out / f"{name}.pt") != sha256:
        raise RecipeError(f"{model}: changed while it was copied to {out / (name + '.pt')}; run the card stage again")
    return card


def _named_sets(items: list[str]) -> dict[str, str]:
    """``NAME=LABELS`` strings (``evaluate --set``) as a dict; SystemExit naming a malformed one."""
    sets = {}
    for item in items:
        name, sep, labels = item.partition("=")
        if not sep or not name or not labels:
            raise SystemExit(f"python -m kocr.recipe evaluate: error: --set {item!r}: expected NAME=LABELS")
        sets[name] = labels
    return sets


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m kocr.recipe`` command line: one subparser per helper."""
    parser = argparse.ArgumentParser(prog="python -m kocr.recipe", description=__doc__.splitlines()[0])
    # not dest="command": the card's --command option would overwrite the subcommand's name
    sub = parser.add_subparsers(dest="subcommand", required=True)
    p = sub.add_parser("export-crops", help="an LMDB set as PNG crops + labels.tsv")
    p.add_argument("lmdb")
    p.add_argument("--out", required=True)
    p = sub.add_parser("evaluate", help="evaluate-crops on the held-out set and the real sets (recipe:)")
    p.add_argument("--model", required=True)
    p.add_argument("--heldout", required=True, help="labels.tsv of the held-out-font crops")
    p.add_argument("--set", action="append", default=[], metavar="NAME=LABELS",
                   help="another generated set to score beside the held-out one (e.g. heldout_latin=…/labels.tsv)")
    p.add_argument("--out", required=True, help="readings and worst crops per set")
    p.add_argument("--metrics", required=True, help="metrics JSON (a DVC metrics file)")
    p = sub.add_parser("card", help="ship the checkpoint with MODEL_CARD.md")
    for flag in ("--model", "--train-metrics", "--eval-metrics", "--data", "--out", "--command"):
        p.add_argument(flag, required=True)
    p.add_argument("--name", default="ko_base")
    p = sub.add_parser("ship", help="replace models/base/<name>.pt by the release if it reads its sets better")
    p.add_argument("--release", default="recipes/ko-base/release", help="folder the card stage wrote")
    p.add_argument("--to", default="models/base", help="folder of the shipped base")
    p.add_argument("--name", default="ko_base")
    p.add_argument("--alpha", type=float, default=0.05,
                   help="a set or face with more words broken than fixed at sign-test p below this refuses")
    p.add_argument("--force", action="store_true", help="ship even when the gate refuses (the card says so)")
    p.add_argument("--check", action="store_true",
                   help="compare and report only; copy nothing, exit 0 whether it would ship or refuse (2 as "
                        "without it when the release cannot be compared)")
    p.add_argument("--json", help="also write the verdict to this file (the recipe's ship_check metrics)")
    sub.add_parser("check-size", help="exit 2 when the params file's size needs a GPU this machine lacks")
    return parser


def main(argv: list[str] | None = None) -> None:
    """``python -m kocr.recipe``: a user error (a params mistake, a refused ``--out``, a malformed ``--set``, …)
    ends in its one line on stderr and exit 2, as ``kocr``'s commands, ``ship`` and ``check-size`` end theirs."""
    try:
        _run(argv)
    except SystemExit as exc:
        if not isinstance(exc.code, str):  # argparse's 2, ship's refusal (1), check-size's 2
            raise
        print(exc.code, file=sys.stderr)  # Python would print it too, but exit 1
        raise SystemExit(2) from None


def _run(argv: list[str] | None) -> None:
    """One helper run; a user error is a SystemExit with its line (``main`` makes it exit 2)."""
    args = build_parser().parse_args(argv)
    from evaluation.score_crops import ScoreInputError
    from kocr.params import ParamsError

    try:
        with warnings_as_lines(f"python -m kocr.recipe {args.subcommand}"):  # kocr's warnings as kocr prints them
            {"check-size": cmd_check_size, "export-crops": cmd_export_crops, "evaluate": cmd_evaluate,
             "card": cmd_card, "ship": cmd_ship}[args.subcommand](args)
    # a settings, labels or input mistake (a missing set, checkpoint or params file): one line, exit 2 (main)
    except (ParamsError, ScoreInputError, RecipeError, OutFolderError, FileNotFoundError) as exc:
        raise SystemExit(f"python -m kocr.recipe {args.subcommand}: error: {exc}") from None
    except OSError as exc:  # a full disk, a used-up quota or a file-size limit: kocr's one line, exit 2
        line = disk_full_line(f"python -m kocr.recipe {args.subcommand}", exc, getattr(args, "out", None))
        if line is None:
            raise
        print(line, file=sys.stderr)
        raise SystemExit(2) from None
    except ValueError as exc:  # evaluate's --model that names no checkpoint (not imported here: torch)
        checkpoint = sys.modules.get("training.checkpoint")
        if checkpoint is None or not isinstance(exc, checkpoint.ModelSpecError):
            raise
        raise SystemExit(f"python -m kocr.recipe {args.subcommand}: error: {exc}") from None


def load_recipe_params() -> dict[str, Any]:
    """The recipe params file (``KOCR_PARAMS``), ParamsError naming the file and the key for a top-level key
    that is not a recipe section (``recipes:`` for ``recipe:``, with the close match): outside DVC, which
    names the sections its stages read, such a key was ignored and evaluate ran with no baselines,
    reference or real sets. A ``synth_lines_*`` section of the user's own (for ``--section``) passes."""
    params = load_params()
    known = set(RECIPE_SECTIONS) | {k for k in params if str(k).startswith("synth_lines_")}
    check_keys("top level", params, known, suggest=True)
    return params


def cmd_export_crops(args: argparse.Namespace) -> None:
    """``export-crops``: an LMDB set as PNG crops and ``labels.tsv``."""
    print(f"export-crops: {export_crops(args.lmdb, args.out)} crops -> {args.out}/labels.tsv")


def recipe_settings(params: dict[str, Any]) -> dict[str, Any]:
    """The ``recipe:`` section checked before any work, ParamsError naming the key: no unknown key, ``baselines``
    a list of engine names, ``reference`` a model (or null), ``real_sets`` and ``real_pages`` mappings
    ``{name: path}``, ``detector`` readtext settings (``DetectorSettings``). Null or absent: the defaults."""
    from evaluation.reader import DetectorSettings

    cfg = section(params, "recipe")
    check_keys("recipe", cfg, RECIPE_KEYS)
    detector = section(cfg, "detector", "recipe.detector")
    DetectorSettings.from_params(detector, "recipe.detector")
    return {"baselines": name_list("recipe.baselines", cfg.get("baselines"), "a list of engine names, e.g. [tesseract]"),
            "reference": typed("recipe.reference", cfg.get("reference"), str, optional=True) or None,
            "real_sets": paths_by_name("recipe.real_sets", cfg.get("real_sets")),
            "real_pages": paths_by_name("recipe.real_pages", cfg.get("real_pages")),
            "detector": detector}


def cmd_evaluate(args: argparse.Namespace) -> None:
    """``evaluate``: the recipe's sets (held-out and real) read by the model, its reference and baselines."""
    import time

    import mlflow

    from kocr.tracking import stage_run

    params = load_recipe_params()
    cfg = recipe_settings(params)
    named = _named_sets(args.set)
    given = [(f"--heldout {args.heldout}", args.heldout)] + [(f"--set {n}={p}", p) for n, p in named.items()]
    for flag, path in given:  # sets named on the command line are the point of the run: not skipped as real sets are
        if not Path(path).is_file():
            raise RecipeError(f"{flag}: labels file not found (run the recipe's synth_heldout stage)")
    sets = {HELDOUT: args.heldout, **named, **cfg["real_sets"]}
    start = time.perf_counter()
    with stage_run("recipe_evaluate", {"recipe": section(params, "recipe")}):
        result = evaluate_sets(args.model, sets, reference=cfg["reference"], baselines=tuple(cfg["baselines"]),
                               out=args.out, pages=cfg["real_pages"], detector=cfg["detector"])
        result["seconds"] = round(time.perf_counter() - start, 1)
        mlflow.log_metrics(mlflow_metrics(result))
        mlflow.log_dict(result, "evaluate.json")
        if Path(args.out).is_dir():
            mlflow.log_artifacts(args.out, "evaluate")
    write_text(args.metrics, json.dumps(result, ensure_ascii=False, indent=1) + "\n")
    for name, entry in result["sets"].items():
        print(f"{name}: " + "; ".join(f"{m} cer {entry[m]['cer']:.4f} word_acc {entry[m]['word_accuracy']:.4f}"
                                      for m in result["models"]))
    for name, entry in result.get("pages", {}).items():
        print(f"{name}: " + "; ".join(f"{m} char_f1 {entry[m]['char_f1']:.4f} line_cer {entry[m]['line_cer']:.4f}"
                                      for m in result["models"]))


def cmd_card(args: argparse.Namespace) -> None:
    """``card``: the release folder, the checkpoint with its model card and metrics."""
    card = write_card(args.model, args.train_metrics, args.eval_metrics, args.data, args.out, args.name,
                      args.command)
    print(f"card: {card} and {Path(args.out) / (args.name + '.pt')}")


def cmd_check_size(args: argparse.Namespace | None = None) -> None:
    """``check-size``: the note (if any) on stderr; exit 2 with the reason when the size does not fit."""
    from kocr.params import params_path
    from kocr.recipe_size import check_size

    path, params = str(params_path()), load_recipe_params()
    problem, note = check_size(path, params)
    if problem:
        print(f"check-size: {problem}", file=sys.stderr)
        raise SystemExit(2)
    fits = f"{path}: size `{params.get('size', '?')}` fits this machine"
    print(f"check-size: {note or fits}", file=sys.stderr)


def cmd_ship(args: argparse.Namespace) -> None:
    """``ship``: print the verdict as JSON; exit 1 when the gate refuses (not with ``--check``), 2 when the
    release cannot be compared."""
    from kocr.recipe_ship import ShipError, ship_release

    target = Path(args.to) / f"{args.name}.pt"
    try:
        if args.json and Path(args.json).is_dir():  # found before anything is copied
            raise ShipError(f"--json {args.json}: a folder, expected a file name")
        result = ship_release(args.release, args.to, args.name, args.alpha, args.force, args.check)
    except ShipError as exc:
        print(f"ship: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    text = json.dumps(result, ensure_ascii=False, indent=1)
    print(text)
    if args.json:
        try:
            write_text(args.json, text + "\n")
        except OSError as exc:
            print(f"ship: {args.json}: could not write the verdict ({exc.strerror or exc}); "
                  f"{target} {'was replaced' if result['shipped'] else 'is unchanged'}", file=sys.stderr)
            raise SystemExit(2) from None
    if args.check:
        print(f"ship --check: the gate would {'ship' if result['ship'] else 'refuse'} {args.release} over {target}; "
              "nothing copied", file=sys.stderr)
    elif result["shipped"]:
        print(f"ship: {target} replaced; commit it: git add {args.to} && git commit", file=sys.stderr)
    elif not result["ship"]:
        print(f"ship: refused, {target} unchanged: " + "; ".join(result["reasons"])
              + " (--force ships it anyway)", file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
