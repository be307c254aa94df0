"""The ``prepare`` stage: page JSON + images -> word-crop LMDB shards split by document.

The source is a folder of pages (flat, or AI-Hub's ``Training``/``Validation`` tree with
``01.라벨링데이터`` / ``02.원천데이터`` folders) and/or AI-Hub's ``[라벨]*.zip`` / ``[원천]*.zip``
archives, read in place (``training.data.sources``). Every page or word left out is counted under
a named reason in ``report.json`` with the first places where it happened; bad input never stops
the stage (a linked folder in a source DVC versions does: ``check_paths``).

Outputs under ``out``: ``train/``, ``val/``, ``test/``, each a folder of LMDB shards
(``shard-00000/``…, ``shard_size`` samples each, read as one set by ``LmdbDataset``) with its
``index.json``; ``splits.json`` (which page went where, by its name under ``src``);
``report.json``; ``manifest.json`` (counts per split and shard, label lengths, charset coverage,
content hash).

Pages are cropped by ``workers`` processes; the output is the same whatever their number. Each
shard is written aside and renamed when full, carrying the state needed to go on from it, so a run
killed at any point and started again keeps the finished shards and ends with the same result. One
run writes an ``out`` at a time (``prepare_lock``): a second one stops instead of clearing its shards.

Example:
    >>> report = prepare_pages("data/sample", "data/prepared", PrepareConfig())   # doctest: +SKIP
    >>> report["crops"]["train"]                                                   # doctest: +SKIP
    1432
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import random
import re
import shutil
import unicodedata
import warnings
import zipfile
import zlib
from collections import Counter, defaultdict
from concurrent.futures import Executor, ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Iterable, NamedTuple

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from kocr.atomic import set_lock, sweep_stale, write_json
from kocr.dvc_hashes import dvc_record
from kocr.params import check_keys, require, typed
from training.charset import Charset
from training.data.workers import end_pool, ordered_map, start_pool
from training.data.lmdb_store import SHARD_INDEX, LmdbWriter
from training.data.pages import Page, PageError, crop_box, parse_page, unscored
from training.data.pixels import boxes_on_stored_pixels, mend, note_pixels
from training.data.sources import READ_ERRORS, Member, SourceIndex, image_fit, linked_folders, read_member, scan_source

SPLITS = ("train", "val", "test")
EXAMPLES_KEPT = 10
SIDECAR = "kocr-shard.json"
MANIFEST_FORMAT = "kocr-lmdb-shards/1"
# what reading an image raises: reading its bytes (a file or zip member), then decoding them
IMAGE_ERRORS = (*READ_ERRORS, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError)


class PrepareConfigError(ValueError):
    """A ``prepare:`` knob in params.yaml with a value the stage cannot use."""


@dataclass(frozen=True)
class PrepareConfig:
    """Knobs of the prepare stage (``prepare:`` in params.yaml)."""

    charset: str = "korean_g2"
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    seed: int = 0
    crop_margin: float = 0.1          # EasyOCR's add_margin: int(this x the box's shorter side) on each side
    out_of_charset: str = "drop"      # drop | keep
    image_format: str = ".png"
    stratify: str = "none"            # none | category: split each image.category separately
    shard_size: int = 50000           # samples per LMDB shard
    workers: int = 1                  # cropping processes (1: in the calling process)

    def __post_init__(self) -> None:
        """ParamsError naming the first knob the stage cannot use: before any page is scanned."""
        require(self.out_of_charset in ("drop", "keep"), "prepare.out_of_charset", self.out_of_charset, "drop or keep")
        require(self.stratify in ("none", "category"), "prepare.stratify", self.stratify, "none or category")
        require(self.image_format in IMAGE_FORMATS, "prepare.image_format", self.image_format,
                f"one of {', '.join(IMAGE_FORMATS)}")
        for key in ("shard_size", "workers"):
            require(getattr(self, key) >= 1, f"prepare.{key}", getattr(self, key), "a whole number >= 1")
        for key in ("val_fraction", "test_fraction"):
            require(0 <= getattr(self, key) < 1, f"prepare.{key}", getattr(self, key), "a share in [0, 1)")
        require(self.val_fraction + self.test_fraction < 1, "prepare.val_fraction + test_fraction",
                round(self.val_fraction + self.test_fraction, 9), "below 1: the train split would be empty")
        require(self.crop_margin >= 0, "prepare.crop_margin", self.crop_margin,
                "a share >= 0 of the box's shorter side (EasyOCR's add_margin, 0.1)")
        Charset.from_setting("prepare.charset", self.charset)

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> "PrepareConfig":
        """The ``prepare:`` mapping; an unknown key or a value of the wrong type raises ParamsError naming it."""
        check_keys("prepare", params, cls.__dataclass_fields__)
        return cls(**{k: typed(f"prepare.{k}", v, _PREPARE_TYPES[k]) for k, v in params.items()})


_PREPARE_TYPES = {"charset": str, "val_fraction": float, "test_fraction": float, "seed": int, "crop_margin": float,
                  "out_of_charset": str, "image_format": str, "stratify": str, "shard_size": int, "workers": int}
IMAGE_FORMATS = (".png", ".jpg")


KEPT_REASONS = frozenset({"image_size_differs_from_json", "nfd_normalised", "negative_coordinates", "box_clipped",
                          "image_ambiguous"})  # report.json reasons whose page or word is kept (repaired or noted)


def kept_reasons(config: PrepareConfig) -> frozenset[str]:
    """The reasons of ``report.json`` whose page or word ``prepare`` keeps (NFC-normalised, clamped,
    clipped, the first of several fitting images used; ``out_of_charset`` with ``out_of_charset: keep``);
    every other reason leaves something out."""
    return KEPT_REASONS | ({"out_of_charset"} if config.out_of_charset == "keep" else set())


class Report:
    """Counts and first examples of everything kept or skipped."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = defaultdict(int)
        self.examples: dict[str, list[str]] = defaultdict(list)

    def add(self, reason: str, where: str) -> None:
        self.counts[reason] += 1
        if len(self.examples[reason]) < EXAMPLES_KEPT:
            self.examples[reason].append(where)

    def extend(self, entries: Iterable[tuple[str, str]]) -> None:
        for reason, where in entries:
            self.add(reason, where)

    def merged(self, other: "Report") -> "Report":
        """A new report: this one's entries, then ``other``'s."""
        out = Report()
        for report in (self, other):
            for reason, count in report.counts.items():
                out.counts[reason] += count
                out.examples[reason] = (out.examples[reason] + report.examples[reason])[:EXAMPLES_KEPT]
        return out

    def as_dict(self) -> dict[str, Any]:
        return {reason: {"count": self.counts[reason], "examples": self.examples[reason]}
                for reason in sorted(self.counts)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Report":
        out = cls()
        for reason, entry in data.items():
            out.counts[reason] = entry["count"]
            out.examples[reason] = list(entry["examples"])
        return out


def load_grey(source: str | os.PathLike | bytes) -> np.ndarray:
    """Open an image (a path or its bytes) whatever its mode (CMYK, 16-bit, palette), return uint8
    grey mended as the evaluation reads it (``training.data.pixels.mend``: EXIF turn, deep samples,
    transparency laid over white). Colour JPEGs are decoded straight to grey (libjpeg's luma, what
    ``cv2.imread(path, cv2.IMREAD_GRAYSCALE)`` gives, as EasyOCR and evaluation read them), twice as fast as
    decoding RGB and converting; but one that EXIF turns is decoded in RGB, turned and converted, as
    evaluation reads it (``evaluation.reader.mended_pixels``: libjpeg's luma is up to 30 levels off that
    at sharp colour edges)."""
    with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as img:
        if img.format == "JPEG" and img.mode in ("RGB", "L") and img.getexif().get(0x0112, 1) == 1:
            img.draft("L", img.size)
        img.load()
        mended = mend(img)
        img = img if mended is None else mended
        return np.asarray(img if img.mode == "L" else img.convert("L"))


def boxes_before_exif_turn(page: Page, image_bytes: bytes, shape: tuple[int, ...]) -> str:
    """Why ``page``'s boxes lie on its image as stored, not as its EXIF orientation turns it upright
    (``load_grey``, ``shape``), else "" (``training.data.pixels.boxes_on_stored_pixels``). Only a page
    whose size is the upright image's turned costs a second look at the image's header.
    """
    height, width = shape[:2]
    if (page.width, page.height) != (height, width) or width == height:
        return ""
    with Image.open(io.BytesIO(image_bytes)) as img:
        orientation = img.getexif().get(0x0112, 1)
    return boxes_on_stored_pixels((page.width, page.height), (height, width), orientation)


_AIHUB_PAGE = re.compile(r"^(\d+-\d{4}-\d+)-\d+$")  # <institution>-<year>-<document>-<page>


def document_of(name: str) -> str:
    """The document a page belongs to: AI-Hub names pages ``<institution>-<year>-<document>-<page>``
    (``5350109-1994-0001-0002``), so its first three parts; any other name is a document of its own.

    >>> document_of("Training/인.허가/5350109-1994-0001-0002.json"), document_of("data/page_00007.json")
    ('5350109-1994-0001', 'data/page_00007.json')
    """
    found = _AIHUB_PAGE.match(PurePosixPath(name).stem)
    return found.group(1) if found else name


def split_documents(names: list[str], config: PrepareConfig,
                    categories: dict[str, str] | None = None) -> dict[str, str]:
    """Assign each page to a split by a seeded shuffle of documents: every page of one document goes
    to the same split (:func:`document_of`), so no document's forms and text are seen in training
    and scored in test; never by crop either, so no page feeds two splits. The fractions count
    documents.

    With ``config.stratify == "category"`` and ``categories`` (page -> ``image.category``), each
    category (a document's is its first page's) is shuffled and split on its own, so every split
    holds each category in proportion.
    """
    documents: dict[str, list[str]] = defaultdict(list)
    for name in sorted(names):
        documents[document_of(name)].append(name)
    if config.stratify == "category" and categories is not None:
        groups: dict[str, list[str]] = defaultdict(list)
        for document, pages in documents.items():
            groups[categories.get(pages[0], "")].append(document)
        assignment: dict[str, str] = {}
        for category in sorted(groups):
            assignment.update(_split_group(groups[category], documents, config,
                                           random.Random(f"{config.seed}/{category}")))
        return assignment
    return _split_group(list(documents), documents, config, random.Random(config.seed))


def _split_group(keys: list[str], documents: dict[str, list[str]], config: PrepareConfig,
                 rng: random.Random) -> dict[str, str]:
    order = sorted(keys)
    rng.shuffle(order)
    n = len(order)
    n_test = round(n * config.test_fraction) if n >= 3 else 0
    n_val = round(n * config.val_fraction) if n >= 3 else 0
    if n >= 3:
        n_test, n_val = max(n_test, 1 if config.test_fraction > 0 else 0), max(n_val, 1 if config.val_fraction > 0 else 0)
    assignment = {}
    for i, key in enumerate(order):
        for name in documents[key]:
            assignment[name] = "test" if i < n_test else "val" if i < n_test + n_val else "train"
    return assignment


# -- work done in the cropping processes ------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class PageMeta:
    """A usable page found by the scan: its label and image, and its category for stratification."""

    name: str
    label: Member
    image: Member
    category: str
    digest: str = ""  # BLAKE2b of the label's BLAKE2b and the image's bytes: a corrected label is a new page
    pixels: int = 0   # width x height of the image, from its header


class LabelRead(NamedTuple):
    """The scan's first step for one label (:func:`_read_label`, in a worker): the image it names and its
    category; ``image_name`` None when the label cannot be used (``entries`` say why; the image of its stem is
    then accounted for by it, reported once under the label's reason, not also as ``image_without_label``)."""

    image_name: str | None
    category: str = ""
    digest: bytes = b""  # BLAKE2b of the label's bytes
    entries: tuple[tuple[str, str], ...] = ()


class ImageCheck(NamedTuple):
    """The scan's second step for one page (:func:`_check_image`, in a worker): ``digest`` (PageMeta's)
    None when the image cannot be used (``entries`` say why; the page's image stays accounted for by it)."""

    digest: str | None
    pixels: int = 0
    entries: tuple[tuple[str, str], ...] = ()


_WORKER: dict[str, Any] = {}


def _init_worker(root: Path, config: PrepareConfig) -> None:
    """A worker holds the source's root and the knobs, never the source's index: each page it reads
    comes with its label's and image's ``Member`` (their place in a zip included)."""
    cv2.setNumThreads(1)
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # counted by prepare_pages (note_pixels)
    _WORKER.update(root=root, config=config, charset=Charset.from_spec(config.charset))


def _failed(name: str, exc: Exception) -> tuple[str, str]:
    return "page_failed", f"{name}: {type(exc).__name__}: {exc}"[:300]


def _read_label(label: Member) -> LabelRead:
    """Scan, first step: read and parse one label. The image it names is looked up by the calling
    process, which holds the source's index (:func:`_pair`)."""
    try:
        return _read_label_or_raise(label)
    except Exception as exc:  # noqa: BLE001 - reported as page_failed, like _crop_page
        return LabelRead(None, entries=(_failed(label.name, exc),))


def _read_label_or_raise(label: Member) -> LabelRead:
    try:
        label_bytes = read_member(_WORKER["root"], label)
        page = parse_page(label_bytes, label.name, bad=[])
    except PageError as exc:
        return LabelRead(None, entries=((exc.reason, f"{label.name}: {exc.detail}"[:300]),))
    except (*READ_ERRORS, ValueError) as exc:
        return LabelRead(None, entries=(("unreadable_file", unreadable(label.name, exc)),))
    return LabelRead(page.image_name, page.category, hashlib.blake2b(label_bytes, digest_size=16).digest())


def _check_image(work: tuple[str, Member, bytes]) -> ImageCheck:
    """Scan, second step: (label name, its image, the label's BLAKE2b) -> whether the image is usable,
    its size in pixels and the page's digest."""
    try:
        return _check_image_or_raise(*work)
    except Exception as exc:  # noqa: BLE001 - reported as page_failed, like _crop_page
        return ImageCheck(None, entries=(_failed(work[0], exc),))


def _check_image_or_raise(name: str, image: Member, label_digest: bytes) -> ImageCheck:
    try:
        image_bytes = read_member(_WORKER["root"], image)
    except IMAGE_ERRORS as exc:
        return ImageCheck(None, entries=(image_unread(image.name, exc),))
    try:  # a cheap integrity check, so a broken image never takes a page's place in a split
        with Image.open(io.BytesIO(image_bytes)) as img:
            pixels = img.width * img.height
            img.verify()
    except IMAGE_ERRORS as exc:
        return ImageCheck(None, entries=(image_problem(image.name, image_bytes, exc),))
    digest = hashlib.blake2b(label_digest, digest_size=16)
    digest.update(image_bytes)
    return ImageCheck(digest.hexdigest(), pixels)


ZIP_DAMAGE = (zipfile.BadZipFile, zlib.error, EOFError)  # what reading a damaged zip member raises (a file: OSError)


def damaged_zip(exc: Exception) -> str:
    """Why a zip member could not be read, in words: zlib's ``Error -3 while decompressing data`` or
    zipfile's ``Bad CRC-32`` alone do not say that the archive's copy of the file is damaged."""
    return f"damaged compressed data in ZIP ({str(exc) or type(exc).__name__})"


def unreadable(name: str, exc: Exception) -> str:
    """The ``unreadable_file`` entry's text: the name and why, without the absolute path an OSError holds."""
    if isinstance(exc, ZIP_DAMAGE):
        why = damaged_zip(exc)
    else:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else f"{type(exc).__name__}: {exc}"
    return f"{name}: {why}"[:300]


def image_unread(name: str, exc: Exception) -> tuple[str, str]:
    """The report entry for an image whose bytes could not be read (``exc``, one of IMAGE_ERRORS):
    ``unreadable_file`` for permissions or I/O (the image is there and may be fine), ``image_corrupt``
    for a zip member whose data is damaged (the download's copy is broken: named, with the member)."""
    if isinstance(exc, OSError):
        return "unreadable_file", unreadable(name, exc)
    if isinstance(exc, ZIP_DAMAGE):
        return "image_corrupt", f"{name}: {damaged_zip(exc)}"[:300]
    return image_problem(name, None, exc)


def image_problem(name: str, data: bytes | None, exc: Exception) -> tuple[str, str]:
    """The report entry for an image that does not open: ``image_too_large`` for a page over PIL's
    decompression-bomb limit, else ``image_corrupt`` with why in words that stay the same from run to
    run (PIL's own message for an unidentified file holds a memory address)."""
    if isinstance(exc, Image.DecompressionBombError):
        return "image_too_large", f"{name}: {exc} Scale the scan down to use it"[:300]
    if data is not None and not data:
        why = "the file is empty"
    elif isinstance(exc, UnidentifiedImageError):
        why = "not an image in a format PIL reads (or its header is damaged)"
    else:
        why = f"{type(exc).__name__}: {exc}"
    return "image_corrupt", f"{name}: {why}"[:300]


def _encode(crop: np.ndarray, suffix: str) -> bytes:
    ok, buf = cv2.imencode(suffix, crop)
    if not ok:
        raise ValueError(f"cannot encode crop as {suffix}")
    return buf.tobytes()


def _page_crops(page: Page, grey: np.ndarray, where: str, charset: Charset, config: PrepareConfig,
                report: Report) -> list[tuple[bytes, str]]:
    height, width = grey.shape
    if (page.width, page.height) != (width, height):
        report.add("image_size_differs_from_json", f"{where} ({page.width}x{page.height} vs {width}x{height})")
    crops = []
    for index, word in enumerate(page.words, start=1):
        at = f"{where}#{word.number or index}"  # the annotation's place in the file, skipped ones counted
        raw = word.text.strip()
        text = unicodedata.normalize("NFC", raw)
        if not text:
            report.add("empty_text", at)
            continue
        if unscored(text):  # ###: an illegible word, trained on by no one (evaluate ignores it too)
            report.add("dont_care", at)
            continue
        missing = charset.missing(text)
        if missing and config.out_of_charset == "drop":
            report.add("out_of_charset", f"{at} {''.join(sorted(missing))!r}")
            continue
        if not all(math.isfinite(v) for v in word.bbox):
            report.add("bad_annotation", f"{at}: bbox {word.bbox}")
            continue
        x, y, w, h = word.bbox
        box = crop_box(word.bbox, config.crop_margin, width, height)
        if box is None:  # skipped: not also counted as normalised, clamped or clipped, which say "kept"
            report.add("zero_area_box", at)
            continue
        if missing:  # kept (out_of_charset: keep): here, so a word dropped above is not also "kept_out_of_charset"
            report.add("out_of_charset", f"{at} {''.join(sorted(missing))!r}")
        if text != raw:  # here, as the other repairs: a word dropped above is not also "kept_nfd_normalised"
            report.add("nfd_normalised", at)
        if x < 0 or y < 0:
            report.add("negative_coordinates", at)
        if x + w > width or y + h > height:
            report.add("box_clipped", at)
        x0, y0, x1, y1 = box
        crops.append((_encode(grey[y0:y1, x0:x1], config.image_format), text))
    return crops


class _Entries(list):
    """Report entries of one page, in order (the worker's side of ``Report.add``)."""

    def add(self, reason: str, where: str) -> None:
        self.append((reason, where))


def _crop_page(meta: PageMeta) -> tuple[list[tuple[bytes, str]], list[tuple[str, str]], bool]:
    """One page's crops in word order, its report entries, and whether its image could be read.

    Anything unforeseen on one page is reported as ``page_failed`` (with the error) instead of
    stopping a run over thousands of pages."""
    try:
        return _crop_page_or_raise(meta)
    except Exception as exc:  # noqa: BLE001 - reported, never silent
        return [], [("page_failed", f"{meta.name}: {type(exc).__name__}: {exc}"[:300])], False


def _crop_page_or_raise(meta: PageMeta) -> tuple[list[tuple[bytes, str]], list[tuple[str, str]], bool]:
    root, config = _WORKER["root"], _WORKER["config"]
    entries = _Entries()
    bad: list[tuple[int, str]] = []
    try:
        label_bytes = read_member(root, meta.label)
    except READ_ERRORS as exc:  # unreadable since the scan
        return [], [("unreadable_file", unreadable(meta.name, exc))], False
    try:
        image_bytes = read_member(root, meta.image)
    except IMAGE_ERRORS as exc:
        return [], [image_unread(meta.image.name, exc)], False
    try:
        page = parse_page(label_bytes, meta.name, bad=bad)
        grey = load_grey(image_bytes)
    except PageError as exc:  # changed since the scan
        return [], [(exc.reason, f"{meta.name}: {exc.detail}"[:300])], False
    except IMAGE_ERRORS as exc:
        return [], [image_problem(meta.image.name, image_bytes, exc)], False
    sideways = boxes_before_exif_turn(page, image_bytes, grey.shape)
    if sideways:  # its boxes would crop other pixels than the words: left out, as a page whose image fails
        return [], [("boxes_before_exif_turn", f"{meta.name}: {sideways}"[:300])], False
    for i, detail in bad:
        entries.add("bad_annotation", f"{meta.name}#{i}: {detail}"[:300])
    crops = _page_crops(page, grey, meta.name, _WORKER["charset"], config, entries)  # type: ignore[arg-type]
    return crops, entries, True


# -- the stage ---------------------------------------------------------------------------------------

@dataclass
class _State:
    """Where writing stands; saved inside every finished shard, so a new run can go on from it."""

    split: int = 0                   # index into SPLITS
    page: int = 0                    # next page of that split
    skip: int = 0                    # crops of that page already in finished shards
    shards: dict[str, list[dict]] = field(default_factory=lambda: {s: [] for s in SPLITS})
    report: dict[str, Any] = field(default_factory=dict)
    failed: list[str] = field(default_factory=list)    # pages whose image could not be decoded
    wordless: list[str] = field(default_factory=list)  # pages read whole that gave no crop (every word dropped)
    lengths: dict[str, dict[str, int]] = field(default_factory=lambda: {s: {} for s in SPLITS})
    chars: dict[str, dict[str, int]] = field(default_factory=lambda: {s: {} for s in SPLITS})


def _shard_name(n: int) -> str:
    return f"shard-{n:05d}"


KEYED_MODULES = ("prepare.py", "sources.py", "pages.py", "pixels.py", "lmdb_store.py",
                 "workers.py")  # code the crops come from (workers.py: the order results come back in)


def _run_keys(config: PrepareConfig, charset: Charset, plan: dict[str, list[PageMeta]]) -> dict[str, str]:
    """What each split's shards depend on: the knobs (not ``workers``), the charset, the code that reads
    and crops pages (shards of an older version are never reused) and that split's pages with the digest
    of their label's and image's bytes (a label corrected in place, same size, is a change).

    Only that split's pages: a label corrected in ``test`` leaves the shards of ``train`` and ``val``
    byte for byte as they were (DVC does not retrain). A shard also holds the state of the splits
    before it; ``_resume`` keeps shards only in one unbroken run from the first, so it never takes
    one whose earlier splits were redone."""
    knobs = {k: v for k, v in asdict(config).items() if k != "workers"}
    common = hashlib.sha256(json.dumps(knobs, sort_keys=True).encode())
    common.update(charset.chars.encode())
    here = Path(__file__).parent
    for module in KEYED_MODULES:
        common.update((here / module).read_bytes())
    keys = {}
    for split in SPLITS:
        digest = common.copy()
        for meta in plan[split]:
            digest.update(json.dumps([split, meta.name, meta.image.name, meta.digest], ensure_ascii=False).encode())
        keys[split] = digest.hexdigest()
    return keys


def _resume(out: Path, run_keys: dict[str, str]) -> _State:
    """The state saved in the last shard of an earlier run of the same keys; clears everything else."""
    state, seq = _State(), 0
    keep: set[Path] = set()
    for split in SPLITS:  # shards carry a run-wide sequence number: accept them while it runs on
        n = 0
        while True:
            sidecar = out / split / _shard_name(n) / SIDECAR
            try:
                saved = json.loads(sidecar.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                break
            if saved.get("run_key") != run_keys[split] or saved.get("seq") != seq:
                break
            state = _State(**saved["state"])
            keep.add(sidecar.parent)
            n, seq = n + 1, seq + 1
    for split in SPLITS:
        folder = out / split
        if folder.is_file():
            folder.unlink()
        folder.mkdir(parents=True, exist_ok=True)
        for entry in folder.iterdir():
            if entry not in keep:
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    for name in ("manifest.json", "report.json", "splits.json"):
        (out / name).unlink(missing_ok=True)
    sweep_stale(out)  # a killed run's half-written JSON
    return state


def _write_shards(out: Path, plan: dict[str, list[PageMeta]], config: PrepareConfig, run_keys: dict[str, str],
                  pool: Executor | None, progress: bool) -> _State:
    state = _resume(out, run_keys)
    done = sum(len(plan[s]) for s in SPLITS[: state.split]) + state.page
    bar = tqdm(total=sum(len(v) for v in plan.values()), initial=done, desc="prepare", unit="page",
               disable=not progress)
    report = Report.from_dict(state.report)
    seq = sum(len(v) for v in state.shards.values())
    writer: LmdbWriter | None = None

    def close(writer: LmdbWriter, split: str) -> None:
        nonlocal seq
        state.shards[split].append({"name": writer.path.name, "samples": writer.count, "sha256": writer.sha256})
        state.report = report.as_dict()
        sidecar = {"run_key": run_keys[split], "seq": seq, "state": asdict(state)}
        writer.close({SIDECAR: json.dumps(sidecar, ensure_ascii=False).encode()})
        seq += 1

    def write_index(split: str) -> None:
        write_json(out / split / SHARD_INDEX, {"samples": sum(s["samples"] for s in state.shards[split]),
                                               "shards": state.shards[split]})

    for split in SPLITS[: state.split]:  # finished in an earlier run: _resume cleared their index too
        write_index(split)
    try:
        for split_index in range(state.split, len(SPLITS)):
            split = SPLITS[split_index]
            pages = plan[split]
            lengths = Counter({int(k): v for k, v in state.lengths[split].items()})
            chars = Counter(state.chars[split])
            start, skip = state.page, state.skip
            results = ordered_map(_crop_page, pages[start:], pool)
            for pos, (crops, entries, ok) in enumerate(results, start=start):
                if pos != start or skip == 0:  # a page whose crops began in a finished shard was counted then
                    report.extend(entries)
                    if not ok:
                        state.failed.append(pages[pos].name)
                    elif not crops:
                        state.wordless.append(pages[pos].name)
                for j in range(skip if pos == start else 0, len(crops)):
                    image, label = crops[j]
                    if writer is None:
                        writer = LmdbWriter(out / split / _shard_name(len(state.shards[split])))
                    writer.add(image, label)
                    lengths[len(label)] += 1
                    chars.update(label)
                    if writer.count == config.shard_size:
                        state.page, state.skip = (pos, j + 1) if j + 1 < len(crops) else (pos + 1, 0)
                        state.lengths[split] = {str(k): v for k, v in sorted(lengths.items())}
                        state.chars[split] = dict(sorted(chars.items()))
                        close(writer, split)
                        writer = None
                bar.update(1)
            state.page, state.skip = len(pages), 0
            state.lengths[split] = {str(k): v for k, v in sorted(lengths.items())}
            state.chars[split] = dict(sorted(chars.items()))
            if writer is not None or not state.shards[split]:
                close(writer or LmdbWriter(out / split / _shard_name(0)), split)
                writer = None
            write_index(split)
            state.split, state.page, state.skip = split_index + 1, 0, 0
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    finally:
        bar.close()
    state.report = report.as_dict()
    return state


def _pair(pool: Executor | None, progress: bool, index: SourceIndex) -> list[tuple]:
    """(label, its page or None when it cannot be used, index of the image it claims or None, its report
    entries) for each label in order. The labels are read in the workers, their images looked up here (only
    this process holds the source's index), then the images are checked in the workers: a worker is sent
    the label and image of each page it reads, so it holds nothing per page of the source."""
    labels, images = index.labels, index.images
    scanned: list[tuple] = []
    checks: list[tuple[int, str, bytes]] = []  # (place in scanned, category, label's BLAKE2b): images checked next
    categories: dict[str, str] = {}  # one string per category, not one per page
    reads = ordered_map(_read_label, labels, pool, chunk=16)
    for label, read in tqdm(zip(labels, reads), total=len(labels), desc="scan labels", unit="page",
                            disable=not progress):
        if read.image_name is None:  # a label that failed (page_failed included) accounts for the image of its
            scanned.append((label, None, index.find_image(label, "")[0], read.entries))  # stem: not "without label"
            continue
        image, ambiguous = index.find_image(label, read.image_name)
        if image is None:  # the image may be in a folder prepare cannot read
            where = f"{label.name} (its image may be in a folder reported as unreadable_folder)" if index.unlisted \
                else label.name
            scanned.append((label, None, None, (("image_missing", where),)))
            continue
        checks.append((len(scanned), categories.setdefault(read.category, read.category), read.digest))
        scanned.append((label, None, image, (("image_ambiguous", f"{label.name} -> {images[image].name}"),)
                        if ambiguous else ()))
    work = ((scanned[at][0].name, images[scanned[at][2]], digest) for at, _, digest in checks)
    for (at, category, _), check in tqdm(zip(checks, ordered_map(_check_image, work, pool, chunk=16)),
                                         total=len(checks), desc="scan images", unit="page", disable=not progress):
        label, _, image, entries = scanned[at]
        if check.digest is not None:
            scanned[at] = (label, PageMeta(label.name, label, images[image], category, check.digest, check.pixels),
                           image, entries)
        else:  # the page is reported once, under its reason (page_failed too), and so is its image
            scanned[at] = (label, None, image, entries + check.entries)
    return scanned


def _scan(src: Path, pool: Executor | None, progress: bool, index: SourceIndex) -> tuple[list[PageMeta], Report]:
    report = Report()
    report.extend(index.stray)
    pages: list[PageMeta] = []
    claimed: dict[int, str] = {}
    scanned = []
    for label, meta, image, entries in _pair(pool, progress, index):
        report.extend(entries)
        scanned.append((label, meta, image))
    owner: dict[int, Member] = {}  # usable pages take their images first: the label that fits one best
    for label, meta, image in scanned:  # (the same stem, then folders), then the first in label order
        if meta is None or image is None:
            continue
        if image not in owner or image_fit(label, index.images[image]) > image_fit(owner[image], index.images[image]):
            owner[image] = label
    for label, meta, image in scanned:
        if meta is None or image is None:
            continue
        if owner[image] is not label:
            report.add("image_used_twice", f"{label.name} (already {owner[image].name})")
            continue
        claimed[image] = label.name
        pages.append(meta)
    for label, meta, image in scanned:  # a label that failed accounts for its image (not "without label")
        if meta is None and image is not None:  # but never takes it from a usable page
            claimed.setdefault(image, label.name)
    for i, image in enumerate(index.images):
        if i not in claimed:
            report.add("image_without_label", image.name)
    return pages, report


def check_paths(src: str | os.PathLike, out: str | os.PathLike) -> None:
    """PrepareConfigError, before anything is read, for an ``out`` prepare cannot write (a file, the
    source, a folder whose splits would hold the source) and for a source DVC versions that holds a
    linked folder (DVC leaves out what a linked folder holds, which prepare would read)."""
    src, out = Path(src), Path(out)
    if out.exists() and not out.is_dir():
        raise PrepareConfigError(f"{out}: --out exists and is not a folder")
    if src.is_dir() and out.resolve() == src.resolve():
        raise PrepareConfigError(f"{out}: --out is the source folder; write the crops beside it (e.g. data/prepared)")
    for split in SPLITS:  # prepare empties these of what it did not write: never a source below them
        held = out.resolve() / split
        if src.resolve() == held or held in src.resolve().parents:
            raise PrepareConfigError(f"--src {src} lies in {out / split}, which prepare empties of the files it did "
                                     "not write; pick another --out (e.g. data/prepared)")
    record = dvc_record(src)
    links = linked_folders(src, exclude=out) if record and src.is_dir() else []
    if links:
        name, target = links[0]
        more = f" (and {len(links) - 1} more linked folder{'s' * (len(links) > 2)})" if len(links) > 1 else ""
        again = f"`dvc add {src}` again" if record.endswith(".dvc") else f"rerun {record.split('(', 1)[1][:-1]}"
        raise PrepareConfigError(
            f"{src / name} is a link to {target}{more}: {src} is versioned by {record}, and DVC does not "
            "follow a linked folder, so the data version, `dvc push` and the logged data hash would leave out "
            f"the pages prepare reads there; put the folder itself in its place (move or copy it in, or mount "
            f"the disk there) and {again}")


def prepare_lock(out: str | os.PathLike) -> contextlib.AbstractContextManager[None]:
    """The lock a prepare holds on ``out`` while it writes there: ``.OUT.lock`` beside it, as a set's writer
    holds (``kocr.atomic.set_lock``; removed when the run ends, released by the kernel when it is killed,
    so a killed run never blocks the one that resumes it). A second prepare of the same ``out``, of any
    source, stops at once with ``SetBusyError`` naming the folder and the holder's PID, instead of
    clearing the shards the first one is writing (it would take them for another run's). An ``out`` that is a
    symbolic link is locked as the folder it names, so each name of a folder takes the one lock."""
    return set_lock(_locked_folder(out), "another prepare", "this folder")


def _locked_folder(out: str | os.PathLike) -> Path:
    """``out``, or the folder it names where it is a symbolic link: the folder whose lock a prepare takes."""
    return Path(os.path.realpath(out)) if Path(out).is_symlink() else Path(out)


def prepare_pages(src: str | os.PathLike, out: str | os.PathLike, config: PrepareConfig,
                  progress: bool = True, checked: bool = False, locked: bool = False) -> dict[str, Any]:
    """Run the stage; returns the report (also written to ``out/report.json``). ``checked``: the caller
    has run :func:`check_paths` on these paths (``kocr prepare-aihub`` does, before its MLflow run), so
    a DVC-versioned source is not walked for linked folders twice. ``locked``: the caller holds
    :func:`prepare_lock` of ``out`` (``kocr prepare-aihub`` takes it before its MLflow run); else it is
    taken here, after ``check_paths``."""
    src, out = Path(src), Path(out)
    if not checked:
        check_paths(src, out)
    with contextlib.nullcontext() if locked else prepare_lock(out):
        return _prepare(src, out, config, progress)


def _start_pool(src: Path, config: PrepareConfig) -> ProcessPoolExecutor:
    """The cropping processes, out of the reach of Ctrl-C and SIGTERM (:func:`training.data.workers.start_pool`):
    was, a Ctrl-C in the first seconds also printed tracebacks, and a SIGTERM to the group that killed a
    worker while it sent its pages back left ``kocr prepare-aihub`` hung for ever, its run RUNNING."""
    return start_pool(config.workers, _init_worker, (src, config), preload=[__name__])


def _prepare(src: Path, out: Path, config: PrepareConfig, progress: bool) -> dict[str, Any]:
    index = scan_source(src, exclude=out)
    charset = Charset.from_spec(config.charset)
    pool = _start_pool(src, config) if config.workers > 1 else None
    saved = dict(_WORKER)
    with warnings.catch_warnings():  # _init_worker silences PIL's warning per large page: here, for this run
        _init_worker(src, config)
        try:
            pages, scan_report = _scan(src, pool, progress, index)
            found = {"pages_found": len(index.labels), "images_found": len(index.images)}
            del index  # its lists and lookup table, a few hundred bytes a page: the pages hold what is read next
            for page in pages:  # one line for them all, from an open large_pages() (the kocr command's)
                note_pixels(page.name, page.pixels)
            assignment = split_documents([p.name for p in pages], config, {p.name: p.category for p in pages})
            plan = {split: [p for p in pages if assignment[p.name] == split] for split in SPLITS}
            del assignment, pages
            run_keys = _run_keys(config, charset, plan)
            out.mkdir(parents=True, exist_ok=True)
            state = _write_shards(out, plan, config, run_keys, pool, progress)
        finally:
            if pool is not None:
                end_pool(pool)
            _WORKER.clear()
            _WORKER.update(saved)

    failed = set(state.failed)
    split_pages = {split: [p.name for p in plan[split] if p.name not in failed] for split in SPLITS}
    listed = sum(len(v) for v in split_pages.values())
    summary = {
        "source": str(src),
        **found,
        # pages that gave crops; a page read whole whose every word was dropped (###, out of charset, no
        # box) stays in splits.json (evaluate scores its words) and is counted apart, not as used
        "pages_used": listed - len(state.wordless),
        "pages_without_crops": len(state.wordless),
        "pages": {split: len(split_pages[split]) for split in SPLITS},
        "crops": {split: sum(s["samples"] for s in state.shards[split]) for split in SPLITS},
        "skipped": scan_report.merged(Report.from_dict(state.report)).as_dict(),
    }
    write_json(out / "splits.json", split_pages)
    write_json(out / "report.json", summary)
    write_json(out / "manifest.json", build_manifest(state, summary, config, charset))
    return summary


def build_manifest(state: _State, summary: dict[str, Any], config: PrepareConfig,
                   charset: Charset) -> dict[str, Any]:
    """Counts per split and shard, label-length histogram, charset coverage and the content hash."""
    content = hashlib.sha256()
    splits, coverage = {}, {}
    for split in SPLITS:
        shards = state.shards[split]
        for shard in shards:
            content.update(f"{split}/{shard['name']}:{shard['samples']}:{shard['sha256']}\n".encode())
        splits[split] = {"pages": summary["pages"][split], "samples": sum(s["samples"] for s in shards),
                         "shards": shards}
        seen = state.chars[split]
        inside = [c for c in charset.chars if c in seen]
        coverage[split] = {"characters_seen": len(inside), "fraction": round(len(inside) / len(charset.chars), 4),
                           "outside_charset": {c: n for c, n in seen.items() if c not in charset.index}}
    never = [c for c in charset.chars if c not in state.chars["train"]]
    return {
        "format": MANIFEST_FORMAT,
        "shard_size": config.shard_size,
        "splits": splits,
        "label_length_histogram": {split: state.lengths[split] for split in SPLITS},
        "charset": {"name": config.charset, "size": len(charset.chars), "coverage": coverage,
                    "missing_from_train": "".join(never)},
        "content_sha256": content.hexdigest(),
    }


