"""The gate that ships a recipe release as the project's Korean base: ``python -m kocr.recipe ship``.

``models/base/ko_base.pt`` is replaced only by a checkpoint that reads the same sets better than it.
The gate reads each set of the release's ``metrics.json`` (the held-out sets and the real sets)
with both checkpoints, crop by crop, and ships when

- the release reads more words right that the shipped base misreads than the reverse, counted over
  all the sets together (``fixed > broken``), and
- no set, nor any face of a set that records its faces (the held-out ones), has significantly more
  words broken than fixed (two-sided sign test ``p < alpha``).

A release that passes is copied with its card and metrics over the shipped files (each written to a
temporary name first, so a failed copy leaves the old base whole; then moved in, the weights last,
under a journal from which a ship stopped midway is finished by the next one), and the copied card
gains a "Shipped" section with the comparison. ``--force`` ships a release the gate refuses and says so in
that section.

Example:
    >>> judge({"sets": {"heldout": {"vs_reference": {"fixed": 30, "broken": 12, "p": 0.008}}}}).ship
    True
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from kocr.atomic import file_sha256, fsync_path, write_text

RELEASE_FILES = ("{name}.pt", "MODEL_CARD.md", "metrics.json")


class ShipError(RuntimeError):
    """A release that cannot be compared or copied (a missing file or set); the message says which."""


@dataclass
class Verdict:
    """The gate's decision: ``ship``, the pooled split, one line per set and face, and the reasons to refuse."""

    ship: bool
    fixed: int
    broken: int
    lines: list[str] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"ship": self.ship, "fixed": self.fixed, "broken": self.broken, "sets": self.lines,
                "reasons": self.reasons}


def _split(p: dict[str, Any]) -> str:
    return f"{p['fixed']} fixed, {p['broken']} broken (p = {p['p']:.2g})"


def judge(compared: dict[str, Any], alpha: float = 0.05) -> Verdict:
    """Decide from ``evaluate_sets`` output whose ``vs_reference`` compares the release with the shipped base.

    Sets without ``vs_reference`` (none was compared) count as a reason to refuse: nothing shows the
    release is better there.
    """
    fixed = broken = 0
    lines: list[str] = []
    reasons: list[str] = []
    sets = compared.get("sets", {})
    if not sets:
        reasons.append("no set was compared")
    for name, entry in sets.items():
        paired = entry.get("vs_reference")
        if paired is None:
            reasons.append(f"{name}: not compared with the shipped base")
            continue
        fixed, broken = fixed + paired["fixed"], broken + paired["broken"]
        lines.append(f"{name}: {_split(paired)}")
        parts = [(name, paired)] + [(f"{name}/{font}", p) for font, p in paired.get("by_font", {}).items()]
        for label, p in parts:
            if label != name:
                lines.append(f"  {label}: {_split(p)}")
            if p["broken"] > p["fixed"] and p["p"] < alpha:
                reasons.append(f"{label}: significantly worse, {_split(p)} < {alpha:g}")
    if sets and fixed <= broken:
        reasons.append(f"all sets together: {fixed} fixed, {broken} broken; it must fix more words than it breaks")
    return Verdict(not reasons, fixed, broken, lines, reasons)


def _recorded(entry: dict[str, Any]) -> dict[str, Any]:
    """The identity a metrics file records for a set: ``n`` and ``sha256`` (``kocr.recipe.set_identity``);
    an older file only the count its reader scored (``recipe.n``), the oldest nothing."""
    n = entry.get("n", (entry.get("recipe") or {}).get("n") if isinstance(entry.get("recipe"), dict) else None)
    return {k: v for k, v in (("n", n), ("sha256", entry.get("sha256"))) if v is not None}


def sets_to_compare(metrics: dict[str, Any], shipped: dict[str, Any] | None) -> tuple[dict[str, str], dict[str, str]]:
    """(name -> labels file, name -> why it is not judged): every set of the release's ``metrics.json`` and
    of the shipped base's (the release's file where both name one), so a release evaluated without
    some set (``skipped``: ../shared/realdata not mounted) is still compared on it. Not judged: the sets
    the release skipped that neither names a file for, and a set the two name alike but record as
    another set (its count or its sha256 differ): "better" is decided on the same sets only, so the
    gate refuses there rather than comparing on the release's set in place of the base's."""
    base = {name: entry for name, entry in ((shipped or {}).get("sets") or {}).items()
            if isinstance(entry, dict) and "labels" in entry}
    sets = {name: entry["labels"] for name, entry in base.items()}
    sets.update({name: entry["labels"] for name, entry in metrics.get("sets", {}).items()})
    unjudged: dict[str, str] = {}
    for name, entry in metrics.get("sets", {}).items():
        if name not in base:
            continue
        mine, theirs = _recorded(entry), _recorded(base[name])
        diffs = [f"{key}: the release's {mine[key]}, the base's {theirs[key]}" for key in ("n", "sha256")
                 if key in mine and key in theirs and mine[key] != theirs[key]]
        if diffs:
            del sets[name]
            unjudged[name] = (f"{name}: the release was scored on another set than the base under this name "
                              f"({'; '.join(diffs)}); the gate compares the two on the same sets only: evaluate "
                              f"the release on the base's set ({base[name]['labels']}) as well")
    pages = set(metrics.get("pages") or {}) | set((shipped or {}).get("pages") or {})
    unjudged |= {name: f"{name}: skipped when the release was evaluated ({why}); evaluate it again with the file there"
                 for name, why in (metrics.get("skipped") or {}).items()
                 if name not in sets and name not in pages and name not in unjudged}
    return sets, unjudged


def compare_with_shipped(release_model: Path, shipped_model: Path, metrics: dict[str, Any],
                         sets: dict[str, str] | None = None,
                         records: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Read every set of ``sets`` (default: those named in a release's ``metrics.json``) with both
    checkpoints (``evaluate_sets``, no baselines): the release as ``recipe``, the shipped one as
    ``reference``. Word boxes are widened by the ``add_margin`` the release was scored with
    (EasyOCR's 0.1 where an older release lacks it). ShipError where a set's file is not the set
    ``records`` says it was scored as (``n``, ``sha256``): it changed since, so neither score is of it."""
    from kocr.recipe import evaluate_sets, set_identity

    if sets is None:
        sets = {name: entry["labels"] for name, entry in metrics.get("sets", {}).items()}
    missing = [f"{name} ({path})" for name, path in sets.items() if not Path(path).is_file()]
    if missing:
        raise ShipError("cannot compare on the sets of the release and the shipped base, labels not found: "
                        + ", ".join(missing) + " (run the recipe's synth_heldout stage, or mount ../shared/realdata)")
    from evaluation.score_crops import ScoreInputError, read_labels
    from training.checkpoint import ModelSpecError

    try:
        detector = {"add_margin": metrics["add_margin"]} if "add_margin" in metrics else None
        changed = []
        for name, recorded in (records or {}).items():
            now = set_identity(sets[name], read_labels(sets[name], metrics.get("add_margin", 0.1)))
            diffs = [f"{key} {recorded[key]} when scored, {now[key]} now" for key in ("n", "sha256")
                     if key in recorded and recorded[key] != now[key]]
            if diffs:
                changed.append(f"{name} ({sets[name]}: {'; '.join(diffs)})")
        if changed:
            raise ShipError("cannot compare on the sets the release and the shipped base were scored on, changed "
                            "since: " + ", ".join(changed) + " (render them again as they were, or evaluate the "
                            "release again on the sets here)")
        return evaluate_sets(str(release_model), sets, reference=str(shipped_model), baselines=(), detector=detector)
    except (ScoreInputError, ModelSpecError) as exc:  # a set or checkpoint that cannot be read, named
        raise ShipError(f"cannot compare the release with the shipped base: {exc}") from None


def _read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object from ``path``; None where there is none (a first ship, an older base)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _shipped_section(verdict: Verdict, replaced: str, forced: bool) -> str:
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    head = (f"Shipped {when} by `python -m kocr.recipe ship`, replacing the base with sha256 {replaced}… "
            "Crop by crop against it (words read right only by this model: fixed; only by the replaced "
            f"base: broken), all sets together {verdict.fixed} fixed, {verdict.broken} broken.")
    if forced and not verdict.ship:
        head += " **Shipped with --force although the gate refused it:** " + "; ".join(verdict.reasons) + "."
    items = [f"  - {line.strip()}" if line.startswith(" ") else f"- {line}" for line in verdict.lines]
    return "\n".join(["", "## Shipped", "", head, "", *items, ""])


def _staged(dst: Path) -> Path:
    """Where ``dst`` is written before it is moved in (``.gitignore``: ``.*.shipping``)."""
    return dst.with_name(f".{dst.name}.shipping")


def _journal(to: Path, name: str) -> Path:
    """The record of a ship whose staged files are being moved in: what the next ship finishes."""
    return to / f".{name}.journal.shipping"


def _copy_all(pairs: list[tuple[Path, Path]], card_extra: str, journal: Path) -> None:
    """Write every destination under a temporary name (fsynced), record them in ``journal``, then move
    them all into place, the weights last, and remove the journal. A copy that fails (a full disk) or a
    kill before the journal leaves the shipped files as they were; a kill after it leaves the journal,
    from which the next ship finishes the moves (``finish_interrupted``)."""
    staged: list[tuple[Path, Path]] = []
    writing = journal
    try:
        for src, dst in pairs:
            tmp, writing = _staged(dst), dst
            staged.append((tmp, dst))
            shutil.copyfile(src, tmp)
            if dst.name == "MODEL_CARD.md" and card_extra:
                with tmp.open("a", encoding="utf-8") as fh:
                    fh.write(card_extra)
            fsync_path(tmp)
        staged.sort(key=lambda pair: pair[1].suffix == ".pt")  # the weights last: they say "this release"
        record = [{"staged": tmp.name, "to": dst.name, "sha256": file_sha256(tmp)} for tmp, dst in staged]
        writing = journal
        write_text(journal, json.dumps({"files": record}, indent=1) + "\n", durable=True)
    except OSError as exc:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
        raise ShipError(f"{writing}: could not write ({exc.strerror or exc}); the shipped base "
                        "is unchanged") from None
    for tmp, dst in staged:
        os.replace(tmp, dst)
    journal.unlink()


def finish_interrupted(to: Path, name: str) -> str | None:
    """Finish a ship of ``<to>/<name>.pt`` that was stopped while moving its files in (its journal is
    there): move in what is still staged. Staged files without a journal are a ship stopped before any
    move (the shipped files are whole): they are removed. Returns what was done, or None."""
    journal = _journal(to, name)
    if not journal.is_file():
        for dst in (to / pattern.format(name=name) for pattern in RELEASE_FILES):
            _staged(dst).unlink(missing_ok=True)
        return None
    try:
        record = json.loads(journal.read_text(encoding="utf-8"))["files"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ShipError(f"{journal}: the record of an interrupted ship is unreadable ({exc}); check {to} "
                        "against the release and remove it") from None
    for entry in record:
        tmp, dst = to / entry["staged"], to / entry["to"]
        if tmp.is_file() and file_sha256(tmp) == entry["sha256"]:
            os.replace(tmp, dst)
        elif not (dst.is_file() and file_sha256(dst) == entry["sha256"]):
            raise ShipError(f"{journal}: an interrupted ship cannot be finished: {dst} is neither the file it "
                            f"staged nor the one it moved in; check {to} against the release and remove {journal}")
    journal.unlink()
    return f"finished a ship that was stopped while moving {', '.join(e['to'] for e in record)} into {to}"


def _is_shipped(sources: list[Path], to: Path) -> bool:
    """Whether ``to`` holds the release whole: its weights, its metrics and a card of its weights (one
    naming their sha256, as the card stage writes it: the release's, with a "Shipped" section, or that
    card edited by hand since)."""
    (pt, _, metrics), shipped = sources, [to / src.name for src in sources]
    if not all(p.is_file() for p in shipped):
        return False
    sha256 = file_sha256(pt)
    return (file_sha256(shipped[0]) == sha256 and shipped[2].read_bytes() == metrics.read_bytes()
            and f"sha256 `{sha256}`" in shipped[1].read_text(encoding="utf-8", errors="replace"))


def _load(path: Path, what: str) -> Any:
    """``load_recognizer(path)``, or ShipError in one line naming ``what`` and why it does not load."""
    from training.checkpoint import ArchitectureMismatch, ModelSpecError, load_recognizer

    try:
        return load_recognizer(str(path))
    except (ModelSpecError, ArchitectureMismatch) as exc:
        raise ShipError(f"{what} cannot be loaded: {exc}") from None
    except RuntimeError as exc:  # load_state_dict: tensors of other shapes than the config it holds
        found = [line.strip() for line in str(exc).splitlines()[1:] if line.strip()]
        raise ShipError(f"{what} cannot be loaded: {path}: its weights do not fit the architecture its config "
                        f"names ({len(found)} problem(s), the first: {found[0] if found else exc})") from None


def check_release_checkpoint(pt: Path, target: Path) -> None:
    """ShipError, in one line, unless ``pt`` loads as a recogniser with the charset and the architecture
    of the base it would replace (``target``; where there is none yet, the korean_g2 charset): a file
    that is not a checkpoint, or one for another script or of another size, never replaces the base."""
    from training.charset import Charset

    release = _load(pt, "the release")
    base = _load(target, "the shipped base") if target.is_file() else None
    wanted = base.charset if base else Charset.named("korean_g2")
    where = f"the shipped base's ({target})" if base else "the Korean base's"
    if list(release.charset.chars) != list(wanted.chars):
        raise ShipError(f"{pt}: charset {release.charset.name} ({len(release.charset.chars)} characters) is not "
                        f"{where}, {wanted.name} ({len(wanted.chars)} characters): it cannot replace it")
    if base:
        mine, theirs = release.config.as_dict(), base.config.as_dict()
        diffs = [f"{key} {mine.get(key)} (the base: {theirs.get(key)})" for key in theirs if mine.get(key) != theirs.get(key)]
        if diffs:
            raise ShipError(f"{pt}: another architecture than {where}: {', '.join(diffs)}")


def _check_belongs(sources: list[Path]) -> None:
    """ShipError unless the release's ``metrics.json`` (``model_sha256``) and ``MODEL_CARD.md`` (its
    ``sha256 `…``` ) name its checkpoint: a card stage stopped midway, or files of two releases mixed,
    would ship one checkpoint with another's scores."""
    pt, card, metrics_file = sources
    sha256 = file_sha256(pt)
    recorded = (_read_json(metrics_file) or {}).get("model_sha256")
    again = "; run the recipe's card stage again"
    if not recorded:
        raise ShipError(f"{metrics_file}: records no sha256 of the checkpoint it scored (a release written before "
                        "the evaluate and card stages recorded it); run the recipe's evaluate and card stages again")
    if recorded != sha256:
        raise ShipError(f"{metrics_file}: the scores of another checkpoint (sha256 {str(recorded)[:16]}…) than {pt} "
                        f"({sha256[:16]}…): a card stage stopped midway, or two releases' files mixed{again}")
    if f"sha256 `{sha256}`" not in card.read_text(encoding="utf-8", errors="replace"):
        raise ShipError(f"{card}: does not name {pt} (sha256 {sha256[:16]}…): another checkpoint's card{again}")


def ship_release(release: str | os.PathLike, to: str | os.PathLike, name: str = "ko_base",
                 alpha: float = 0.05, force: bool = False, check: bool = False) -> dict[str, Any]:
    """Compare the release in ``release`` with ``<to>/<name>.pt`` and copy it over when the gate passes
    (or ``force``); ``check`` compares and copies nothing. Whatever the mode, the release's card and
    metrics must name its checkpoint, which must be under 20 MB and load with the base's charset and
    architecture (``check_release_checkpoint``). Returns the verdict as a dict (``ship``: the gate's
    answer, ``shipped``: whether files were copied); raises ``ShipError`` on missing or unusable input."""
    from kocr.recipe import RecipeError, check_checkpoint_size
    from training.checkpoint import file_digest

    release, to = Path(release), Path(to)
    if to.exists() and not to.is_dir():
        raise ShipError(f"{to}: not a folder (--to names the folder that holds {name}.pt)")
    sources = [release / pattern.format(name=name) for pattern in RELEASE_FILES]
    missing = [str(p) for p in sources if not p.is_file()]
    if missing:
        raise ShipError(f"release incomplete, not found: {', '.join(missing)} (run the recipe's card stage)")
    try:
        metrics = json.loads(sources[2].read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ShipError(f"{sources[2]}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
    except UnicodeDecodeError as exc:
        raise ShipError(f"{sources[2]}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    sets = metrics.get("sets") if isinstance(metrics, dict) else None
    if not isinstance(sets, dict) or not all(isinstance(e, dict) and "labels" in e for e in sets.values()):
        raise ShipError(f"{sources[2]}: not the recipe's evaluation (a \"sets\" object whose every set names "
                        "its \"labels\" file)")
    _check_belongs(sources)
    try:
        check_checkpoint_size(sources[0])
    except RecipeError as exc:
        raise ShipError(str(exc)) from None
    target = to / f"{name}.pt"
    check_release_checkpoint(sources[0], target)  # before anything, --force and a first ship too
    pairs = [(src, to / src.name) for src in sources]
    journal = _journal(to, name)
    if check and journal.is_file():
        raise ShipError(f"{journal}: an earlier ship was stopped while moving its files into {to}; run "
                        "python -m kocr.recipe ship without --check to finish it")
    finished = None if check or not to.is_dir() else finish_interrupted(to, name)
    done = {"finished": finished} if finished else {}
    if not target.is_file():
        if not check:
            to.mkdir(parents=True, exist_ok=True)
            _copy_all(pairs, "", journal)
        return {"ship": True, "shipped": not check, "reasons": [],
                "note": f"{target} does not exist: nothing to replace"} | done
    base_sha256 = file_digest(target)
    if base_sha256 == file_digest(sources[0]):
        if _is_shipped(sources, to):
            return {"ship": True, "shipped": False, "reasons": [], "note": f"{target} is already this release"} | done
        # the weights are this release's, its card or metrics are not (a ship stopped before this gate kept
        # a journal): copy them, saying the comparison is not known
        note = (f"{target} was already this release but its card or metrics were not (a ship stopped midway)"
                + ("; nothing copied" if check else "; they are copied now"))
        if not check:
            when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
            _copy_all(pairs[1:], "\n".join([
                "", "## Shipped", "", f"Card and metrics copied {when} by `python -m kocr.recipe ship` beside "
                "weights an earlier ship had copied and was stopped after: the comparison with the base those "
                "weights replaced is not recorded here.", ""]), journal)
        return {"ship": True, "shipped": not check, "reasons": [], "note": note} | done
    shipped_metrics = _read_json(to / sources[2].name)
    sets, unjudged = sets_to_compare(metrics, shipped_metrics)
    records: dict[str, dict[str, Any]] = {}  # what each compared set was scored as, by either side
    for part in (shipped_metrics or {}, metrics):
        for set_name, entry in (part.get("sets") or {}).items():
            if isinstance(entry, dict) and set_name in sets:
                records[set_name] = records.get(set_name, {}) | _recorded(entry)
    verdict = judge(compare_with_shipped(sources[0], target, metrics, sets, records), alpha)
    if unjudged:  # nothing shows the release is not worse there
        verdict = replace(verdict, ship=False, reasons=verdict.reasons + [why for _, why in sorted(unjudged.items())])
    result = verdict.as_dict() | {"base_sha256": base_sha256, "shipped": (verdict.ship or force) and not check}
    if result["shipped"]:
        _copy_all(pairs, _shipped_section(verdict, result["base_sha256"], force), journal)
    return result | done
