"""The gate that ships a recipe release as the project's Korean base: ``python -m kocr.recipe ship``.

``models/base/ko_base.pt`` is replaced only by a checkpoint that reads the same sets better than it.
The gate reads each set of the release's ``metrics.json`` (the held-out sets and the real sets)
with both checkpoints, crop by crop, and ships when

- the release reads more words right that the shipped base misreads than the reverse, counted over
  all the sets together (``fixed > broken``), and
- no set, nor any face of a set that records its faces (the held-out ones), has significantly more
  words broken than fixed (two-sided sign test ``p < alpha``).

A release that passes is copied with its card and metrics over the shipped files (each written to a
temporary name first, so a failed copy leaves the old base whole), and the copied card gains a
"Shipped" section with the comparison. ``--force`` ships a release the gate refuses and says so in
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


def sets_to_compare(metrics: dict[str, Any], shipped: dict[str, Any] | None) -> tuple[dict[str, str], dict[str, str]]:
    """(name -> labels file, name -> why unjudged): every set of the release's ``metrics.json`` and
    of the shipped base's (the release's file where both name one), so a release evaluated without
    some set (``skipped``: ../shared/realdata not mounted) is still compared on it; and the sets the
    release skipped that neither names a file for, which the gate cannot judge."""
    sets = {name: entry["labels"] for name, entry in ((shipped or {}).get("sets") or {}).items()
            if isinstance(entry, dict) and "labels" in entry}
    sets.update({name: entry["labels"] for name, entry in metrics.get("sets", {}).items()})
    pages = set(metrics.get("pages") or {}) | set((shipped or {}).get("pages") or {})
    unjudged = {name: str(why) for name, why in (metrics.get("skipped") or {}).items()
                if name not in sets and name not in pages}
    return sets, unjudged


def compare_with_shipped(release_model: Path, shipped_model: Path, metrics: dict[str, Any],
                         sets: dict[str, str] | None = None) -> dict[str, Any]:
    """Read every set of ``sets`` (default: those named in a release's ``metrics.json``) with both
    checkpoints (``evaluate_sets``, no baselines): the release as ``recipe``, the shipped one as
    ``reference``. Word boxes are widened by the ``add_margin`` the release was scored with
    (EasyOCR's 0.1 where an older release lacks it)."""
    from kocr.recipe import evaluate_sets

    if sets is None:
        sets = {name: entry["labels"] for name, entry in metrics.get("sets", {}).items()}
    missing = [f"{name} ({path})" for name, path in sets.items() if not Path(path).is_file()]
    if missing:
        raise ShipError("cannot compare on the sets of the release and the shipped base, labels not found: "
                        + ", ".join(missing) + " (run the recipe's synth_heldout stage, or mount ../shared/realdata)")
    from evaluation.score_crops import ScoreInputError
    from training.checkpoint import ModelSpecError

    try:
        detector = {"add_margin": metrics["add_margin"]} if "add_margin" in metrics else None
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


def _copy_all(pairs: list[tuple[Path, Path]], card_extra: str) -> None:
    """Write every destination under a temporary name, then move them all into place: a copy that
    fails (a full disk) leaves the shipped files as they were."""
    staged: list[tuple[Path, Path]] = []
    try:
        for src, dst in pairs:
            tmp = dst.with_name(f".{dst.name}.shipping")
            staged.append((tmp, dst))
            shutil.copyfile(src, tmp)
            if dst.name == "MODEL_CARD.md" and card_extra:
                with tmp.open("a", encoding="utf-8") as fh:
                    fh.write(card_extra)
    except OSError as exc:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
        raise ShipError(f"{staged[-1][1]}: could not write ({exc.strerror or exc}); the shipped base "
                        "is unchanged") from None
    for tmp, dst in staged:
        os.replace(tmp, dst)


def ship_release(release: str | os.PathLike, to: str | os.PathLike, name: str = "ko_base",
                 alpha: float = 0.05, force: bool = False, check: bool = False) -> dict[str, Any]:
    """Compare the release in ``release`` with ``<to>/<name>.pt`` and copy it over when the gate passes
    (or ``force``); ``check`` compares and copies nothing. Returns the verdict as a dict (``ship``: the
    gate's answer, ``shipped``: whether files were copied); raises ``ShipError`` on missing input."""
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
    target = to / f"{name}.pt"
    pairs = [(src, to / src.name) for src in sources]
    if not target.is_file():
        if not check:
            to.mkdir(parents=True, exist_ok=True)
            _copy_all(pairs, "")
        return {"ship": True, "shipped": not check, "reasons": [],
                "note": f"{target} does not exist: nothing to replace"}
    base_sha256 = file_digest(target)
    if base_sha256 == file_digest(sources[0]):
        return {"ship": True, "shipped": False, "reasons": [], "note": f"{target} is already this release"}
    sets, unjudged = sets_to_compare(metrics, _read_json(to / sources[2].name))
    verdict = judge(compare_with_shipped(sources[0], target, metrics, sets), alpha)
    if unjudged:  # nothing shows the release is not worse there
        verdict = replace(verdict, ship=False, reasons=verdict.reasons + [
            f"{name}: skipped when the release was evaluated ({why}); evaluate it again with the file there"
            for name, why in sorted(unjudged.items())])
    result = verdict.as_dict() | {"base_sha256": base_sha256, "shipped": (verdict.ship or force) and not check}
    if result["shipped"]:
        _copy_all(pairs, _shipped_section(verdict, result["base_sha256"], force))
    return result
