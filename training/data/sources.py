"""Where the pages of ``prepare`` come from: a folder (flat, or the AI-Hub tree) and AI-Hub's zip archives.

``scan_source`` walks the source once. Every ``*.json`` is a label, every image an image; every
``*.zip`` (``[라벨]Training_인.허가.zip``, ``[원천]Training_인.허가1.zip``, ``TL_*.zip``…) is opened
in place and its members classified the same way, never unzipped. Member names an archive stores
without the UTF-8 flag are decoded as UTF-8 when they are valid UTF-8, else as CP949 (Korean Windows
zip tools). Everything else is stray and reported.

A label is paired with an image by the JSON's ``image.file.name``, else by the label's stem; among
several candidates the one whose folder path shares the longest tail with the label's wins, which
is the mirrored ``01.라벨링데이터`` / ``02.원천데이터`` (or ``[라벨]`` / ``[원천]`` archive) tree.

Example:
    >>> index = scan_source("data/aihub")                      # doctest: +SKIP
    >>> index.labels[0].name                                   # doctest: +SKIP
    'Training/[라벨]Training_인.허가.zip/인.허가/5350109/1994/5350109-1994-0001-0001.json'
    >>> read_member(index.root, index.labels[0])[:12]          # doctest: +SKIP
    b'{"images": ['
"""

from __future__ import annotations

import itertools
import os
import re
import shlex
import struct
import unicodedata
import zipfile
import zlib
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, Callable

from kocr.atomic import set_lock_path
from kocr.dvc_hashes import first_visit

READ_ERRORS = (OSError, EOFError, zipfile.BadZipFile, zlib.error)  # what reading a file or zip member raises
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp")  # as evaluate-pages and predict read
SYSTEM_FILES = {"thumbs.db", "desktop.ini"}
PLATFORM_FILES = {"contact_sheet.png"}  # written by kocr synth-pages beside the pages: not page data
_UTF8_FLAG = 0x800
_PLACE = struct.Struct("<QQIHH")  # a zip member's header offset, compressed size, CRC-32, method, flag bits


@dataclass(frozen=True, slots=True)
class Member:
    """One file of the source: a plain file (``archive`` empty) or a member of a zip archive.

    ``path`` is what reading needs (relative to the source, or the member name as the archive
    keys it); ``name`` is the readable relative name used in reports and splits.json. ``at`` is where
    a member lies in its archive (from the archive's directory, read once by the scan), so reading it
    needs no copy of that directory (:func:`read_member`).

    ``stored`` is ``path`` where it is not ``name`` (less the archive's name and a slash), else empty:
    a member of an archive that stores UTF-8 names keeps its name once, not twice (about 160 bytes a
    member, which the calling process of ``prepare`` holds for every page of the source).
    """

    name: str
    stored: str
    archive: str = ""
    size: int = 0
    at: bytes = b""

    @property
    def path(self) -> str:
        """What reading needs: the file's path relative to the source, or the name the archive keys it by."""
        return self.stored or (self.name[len(self.archive) + 1:] if self.archive else self.name)


@dataclass(frozen=True, slots=True)
class Unreadable:
    """A folder (``unreadable_folder``) or zip archive (``archive_unreadable``) the scan could not read:
    ``where`` relative to the source (``.`` for the source itself) and ``why``."""

    reason: str
    where: str
    why: str

    def entry(self) -> tuple[str, str]:
        """Its stray entry, as the report shows it."""
        return self.reason, f"{self.where}: {self.why}"


@dataclass
class SourceIndex:
    """Labels, images and stray entries of one source, with the image lookup tables."""

    root: Path
    labels: list[Member] = field(default_factory=list)
    images: list[Member] = field(default_factory=list)
    stray: list[tuple[str, str]] = field(default_factory=list)  # (reason, where)
    unreadable: list[Unreadable] = field(default_factory=list)  # also in stray, in its order
    _by_stem: dict[str, list[int]] = field(default_factory=dict, repr=False)  # images by name_key of their stem

    @property
    def unlisted(self) -> list[str]:
        """The folders that could not be read (``unreadable_folder``)."""
        return [place.where for place in self.unreadable if place.reason == "unreadable_folder"]

    def add_unreadable(self, reason: str, where: str, why: str) -> None:
        """Record a folder or archive that cannot be read, and its stray entry."""
        place = Unreadable(reason, where, why)
        self.unreadable.append(place)
        self.stray.append(place.entry())

    def finish(self) -> "SourceIndex":
        """Sort the entries and build the lookup tables (called by ``scan_source``)."""
        self.labels.sort(key=lambda m: m.name)
        self.images.sort(key=lambda m: m.name)
        self.stray.sort()
        self.unreadable.sort(key=Unreadable.entry)
        by_stem: dict[str, list[int]] = defaultdict(list)  # one table: the images of a name are among its stem's
        for i, image in enumerate(self.images):
            by_stem[name_key(PurePosixPath(image.name).name).rsplit(".", 1)[0]].append(i)
        self._by_stem = dict(by_stem)
        return self

    def find_image(self, label: Member, image_name: str) -> tuple[int | None, bool]:
        """(index into ``images`` of the label's image or None, whether several fitted equally).

        Candidates are the images named as the label says and those with the label's stem (a .png
        where the label says .jpg); the one in the folders closest to the label's wins, the named
        one on a tie, so an image of the same name in another part of the source (Validation for a
        Training label) never beats the label's own."""
        base = name_key(image_name.replace("\\", "/").rsplit("/", 1)[-1]) if image_name else ""
        stem = name_key(PurePosixPath(label.name).stem)
        named = {i for i in self._by_stem.get(base.rsplit(".", 1)[0], []) if base
                 and name_key(PurePosixPath(self.images[i].name).name) == base}
        candidates = sorted(named | set(self._by_stem.get(stem, [])))
        if not candidates:
            return None, False
        return _closest(label, candidates, self.images, named)


def name_key(name: str) -> str:
    """How ``prepare`` compares file names: NFC (a macOS zip stores ``서울.png`` decomposed, NFD) and
    lower case (Windows writes ``X.JPG`` for a label's ``X.jpg``)."""
    return unicodedata.normalize("NFC", name).lower()


class AmbiguousName(ValueError):
    """Two files fit one name equally (they differ only in NFC/NFD or case); the message names both."""


def find_file(folder: str | os.PathLike, name: str,
              listings: dict[Path, dict[str, list[str]]] | None = None) -> Path | None:
    """The file or folder ``name`` (relative to ``folder``, or absolute) names, matched as ``prepare``
    pairs a label with its image: the exact path when it exists, else, part by part, the one entry
    whose name equals the part by :func:`name_key`; a backslash separates folders as a slash does
    (a path written on Windows). None when nothing fits.

    Raises AmbiguousName naming both when two entries of one folder fit a part and neither is exact
    (``서울.png`` stored once NFC and once NFD, or ``Scan.jpg`` beside ``scan.JPG``): which one is meant
    is a guess.

    ``listings`` (a dict the caller keeps for one read of many names) holds each folder's entries by
    :func:`name_key` once listed, so a labels file of N rows in a folder of N files lists it once,
    not once per row whose name is not exact (N x N comparisons: hours for 50,000 crops).

    Example:
        >>> find_file("crops", "이미지\\서울.png")   # doctest: +SKIP
        PosixPath('crops/이미지/서울.PNG')
    """
    folder = Path(folder)
    for written in dict.fromkeys((name, name.replace("\\", "/"))):
        if (folder / written).exists():
            return folder / written
    rel = PurePosixPath(name.replace("\\", "/"))
    here = Path(rel.anchor) if rel.is_absolute() else folder
    for part in rel.parts[1:] if rel.is_absolute() else rel.parts:
        if part in (".", "..") or (here / part).exists():
            here = here / part
            continue
        by_key = listings.get(here) if listings is not None else None
        if by_key is None:
            try:
                entries = os.listdir(here)
            except OSError:  # not a folder, or not readable
                return None
            by_key = {}
            for entry in sorted(entries):
                by_key.setdefault(name_key(entry), []).append(entry)
            if listings is not None:
                listings[here] = by_key
        fits = by_key.get(name_key(part), [])
        if len(fits) > 1:
            raise AmbiguousName(f"{' and '.join(str(here / fit) for fit in fits)}: file names that differ only "
                                f"in Unicode normalisation (NFC/NFD) or case both fit {name!r}; keep one")
        if not fits:
            return None
        here = here / fits[0]
    return here


def _folders(member: Member) -> list[str]:
    return [name_key(p) for p in PurePosixPath(member.name).parts[:-1]]


def _folder_fit(label: Member, image: Member) -> tuple[int, int]:
    """How many trailing folders the two share, then how many folders in all."""
    mine, theirs = _folders(label), _folders(image)
    tail = 0
    while tail < min(len(mine), len(theirs)) and mine[-1 - tail] == theirs[-1 - tail]:
        tail += 1
    return tail, len(set(mine) & set(theirs))


def image_fit(label: Member, image: Member) -> tuple[bool, int, int]:
    """How well ``image`` fits ``label`` beyond being named by it: the same stem, then the folders
    they share (as :func:`_closest` ranks them); the larger fits better. Two labels that claim one
    image (one copied the other's ``file.name``) leave it to the label that fits it."""
    same_stem = name_key(PurePosixPath(label.name).stem) == name_key(PurePosixPath(image.name).stem)
    return (same_stem, *_folder_fit(label, image))


def _closest(label: Member, candidates: list[int], images: list[Member],
             named: set[int] = frozenset()) -> tuple[int, bool]:
    """The candidate whose folders share the longest tail (then most folders) with the label's, then
    one the label names; ambiguous when the best two tie on all three."""
    if len(candidates) == 1:
        return candidates[0], False

    def score(i: int) -> tuple[int, int, bool]:
        return (*_folder_fit(label, images[i]), i in named)

    scored = sorted(((score(i), i) for i in candidates), key=lambda s: (-s[0][0], -s[0][1], not s[0][2], s[1]))
    return scored[0][1], len(scored) > 1 and scored[0][0] == scored[1][0]


def member_name(info: zipfile.ZipInfo) -> str:
    """A member's real name: zipfile decodes names stored without the UTF-8 flag as CP437, and some
    Windows tools (PowerShell 5's Compress-Archive) separate folders with backslashes."""
    return _member_text(info).replace("\\", "/")  # 0x5C is never a trail byte of a CP949 Hangul pair


def _member_text(info: zipfile.ZipInfo) -> str:
    if info.flag_bits & _UTF8_FLAG:
        return info.filename
    try:
        raw = info.filename.encode("cp437")
    except UnicodeEncodeError:  # already decoded some other way (metadata_encoding)
        return info.filename
    for encoding in ("utf-8", "cp949"):
        try:
            return raw.decode(encoding)
        except UnicodeDecodeError:
            continue
    return info.filename


def _hidden(part: str) -> bool:
    return part.startswith(".") or part == "__MACOSX"


def stray_file(name: str) -> bool:
    """Whether a file named ``name`` (its base name) is never data, whatever its suffix: hidden
    (``._scan.jpg``, the AppleDouble twin macOS writes beside each file on a non-Mac disk, or
    ``.DS_Store``) or a system file (``Thumbs.db``, ``desktop.ini``)."""
    return name.startswith(".") or name.lower() in SYSTEM_FILES


# a piece of one zip cut into several files for download: X.zip.part0, X.zip.part1, … (or X.zip.001, …)
_PIECE = re.compile(r"(?P<whole>.+\.zip)(?P<sep>\.(?:part)?)(?P<number>\d+)", re.IGNORECASE)


def _piece(name: str) -> re.Match | None:
    """``name`` split into the zip it is a piece of, its separator and number; None for other files
    (and for hidden or system ones, which ``stray_file`` reports, or a name not in UTF-8)."""
    return None if stray_file(name) or not _decodable(name) else _PIECE.fullmatch(name)


def split_pieces(folder: str, names: list[str], here: set[str],
                 readable: Callable[[str], bool] = lambda whole: True,
                 begins: Callable[[str], bool] = lambda piece: True,
                 ends: Callable[[str], bool] = lambda piece: True) -> list[tuple[str, str]]:
    """The ``split_archive`` stray entries of the files ``names`` in ``folder`` (relative to the source)
    that are pieces of a split zip download (``X.zip.part0``, ``X.zip.part1``, …; ``X.zip.001``, …):
    one per piece, saying to join them, with the command (the pieces in the order of their numbers,
    which a shell's ``*`` keeps only while they have as many digits, and the pieces alone: ``*`` is
    not used where it would also take another file of the folder); none of them is a zip ``zipfile``
    reads. ``here``: the folder's file names, to say when the joined zip is there already; ``readable``
    (of its name): whether it opens as a zip, else it is said to be joined again, not the pieces deleted
    (a join cut short, by Ctrl-C or a full disk, leaves a zip without its end). ``begins`` (of a piece's
    name): whether the piece starts as a zip does (:func:`begins_a_zip`); where the lowest-numbered piece
    does not, the pieces before it are said to be missing instead of a join (its numbers alone cannot tell:
    ``part0`` and ``001`` both start a download's numbering). ``ends`` (of a piece's name): whether the
    piece ends as a zip does (:func:`ends_a_zip`); where the highest-numbered piece does not, the pieces
    after it are said to be missing: a lone ``X.zip.part0`` of a download in three pieces (or its first two)
    was given the join, whose zip then did not read ("a join cut short": join again, the same broken zip).

    >>> reason, place = split_pieces("T", ["a.zip.part0", "a.zip.part1", "b.txt"], set())[0]
    >>> print(reason, place)
    split_archive T/a.zip.part0: a piece of a split download of a.zip, not read; join its pieces in its folder: cat a.zip.part* > a.zip
    """
    groups: dict[tuple[str, str], list[tuple[int, str]]] = defaultdict(list)
    for name in names:
        if match := _piece(name):
            groups[match["whole"], match["sep"]].append((int(match["number"]), name))
    entries = []
    for (whole, sep), pieces in groups.items():
        ordered = [name for _, name in sorted(pieces)]
        missing, count = missing_pieces(whole, sep, ordered)
        listed = ", ".join(missing) + (f" and {count - len(missing)} more" if count > len(missing) else "")
        first, last = ordered[0], ordered[-1]
        joined = whole in here and readable(whole)
        starts, stops = joined or begins(first), joined or ends(last)
        if joined:
            why = f"a piece of a split download of {whole}, which is here already (joined): not read; delete the pieces"
        elif not starts or not stops:  # the first or last piece(s) missing: cat would build a zip without its
            too = f" ({listed} too)" if missing else ""  # start or its end, which does not read
            if not starts and not stops:
                absent = (f"{first} neither begins nor ends a zip: the piece(s) numbered before and after it"
                          if first == last else f"{first} does not begin a zip and {last} does not end one: the "
                          f"piece(s) numbered before {first} and after {last}")
            elif not stops:
                absent = f"{last} does not end a zip: the piece(s) numbered after it"
            else:
                absent = f"{first} does not begin a zip: the piece(s) numbered before it"
            why = (f"a piece of a split download of {whole}, not read; {absent} are missing{too}: download them "
                   "into its folder, then join the pieces")
        elif missing:  # cat would join the pieces there are into a zip without the missing ones' bytes
            why = (f"a piece of a split download of {whole}, not read; {listed} "
                   f"{'is' if count == 1 else 'are'} missing: download {'it' if count == 1 else 'them'} "
                   "into its folder, then join the pieces")
        else:
            # the shell's * where it gives the pieces alone, in their order: not where it would also
            # take another file (a browser's unfinished X.zip.part3.crdownload) into the zip
            globbed = sorted(other for other in names if other.startswith(whole + sep))
            shell = (f"{shlex.quote(whole + sep)}*" if globbed == ordered
                     else " ".join(map(shlex.quote, ordered)))
            why = (f"a piece of a split download of {whole}, not read; "
                   + (f"{whole} here is not a readable zip (a join cut short?): keep the pieces and join them "
                      "again " if whole in here else "join its pieces ")
                   + f"in its folder: cat {shell} > {shlex.quote(whole)}")
        entries += [("split_archive", f"{folder}/{name}".lstrip("/") + f": {why}") for name in ordered]
    return entries


MISSING_SHOWN = 10  # missing pieces named one by one; the rest are counted

ZIP_STARTS = (b"PK\x03\x04", b"PK\x07\x08", b"PK\x05\x06")  # a member, a split zip's marker, an empty zip


ZIP_END = b"PK\x05\x06"  # the end of central directory record, the last 22 bytes of a zip and its comment
ZIP_END_SIZE, ZIP_COMMENT_MAX = 22, 65535


def ends_a_zip(path: str | os.PathLike) -> bool:
    """Whether the file ``path`` ends as a zip (or the last piece of one) does: with the end of central
    directory record, whose comment length reaches the end of the file (as ``zipfile`` finds it); True
    where it cannot be read (the scan names an unreadable file elsewhere, not as a missing piece)."""
    try:
        with open(path, "rb") as file:
            size = file.seek(0, os.SEEK_END)
            file.seek(max(0, size - ZIP_END_SIZE - ZIP_COMMENT_MAX))
            tail = file.read()
    except OSError:
        return True
    at = tail.rfind(ZIP_END)
    while at >= 0:
        if at + ZIP_END_SIZE <= len(tail) and \
                at + ZIP_END_SIZE + int.from_bytes(tail[at + 20:at + 22], "little") == len(tail):
            return True
        at = tail.rfind(ZIP_END, 0, at)
    return False


def begins_a_zip(path: str | os.PathLike) -> bool:
    """Whether the file ``path`` starts as a zip (or the first piece of one) does; True where it cannot be read
    (the scan names an unreadable file elsewhere, not as a missing piece)."""
    try:
        with open(path, "rb") as file:
            return file.read(4) in ZIP_STARTS
    except OSError:
        return True


def missing_pieces(whole: str, sep: str, ordered: list[str], shown: int = MISSING_SHOWN) -> tuple[list[str], int]:
    """The names of the first ``shown`` pieces of ``whole`` missing between its first and last piece
    ``ordered`` (in the order of their numbers), written as the others are (``X.zip.part2``; ``X.zip.002``
    where every piece's number has as many digits), and how many are missing. Was every name: two files
    far apart in number (``a.zip.1`` and a dated ``a.zip.20240101``) made a list of 20 million names, and a
    message of hundreds of MB on each piece's line.

    >>> missing_pieces("a.zip", ".part", ["a.zip.part0", "a.zip.part1", "a.zip.part3", "a.zip.part6"])
    (['a.zip.part2', 'a.zip.part4', 'a.zip.part5'], 3)
    >>> missing_pieces("a.zip", ".", ["a.zip.001", "a.zip.003"])
    (['a.zip.002'], 1)
    >>> missing_pieces("a.zip", ".", ["a.zip.1", "a.zip.20240101"], shown=2)
    (['a.zip.2', 'a.zip.3'], 20240099)
    """
    digits = [name[len(whole) + len(sep):] for name in ordered]
    numbers = [int(d) for d in digits]
    width = len(digits[0]) if len({len(d) for d in digits}) == 1 else 0
    there = set(numbers)
    count = numbers[-1] - numbers[0] + 1 - len(there)
    names = (f"{whole}{sep}{n:0{width}d}" for n in range(numbers[0], numbers[-1]) if n not in there)
    return list(itertools.islice(names, shown)), count


def _classify(index: SourceIndex, member: Member) -> None:
    base = PurePosixPath(member.name).name
    suffix = PurePosixPath(base).suffix.lower()
    if stray_file(base):
        index.stray.append(("stray_file", member.name))
    elif base in PLATFORM_FILES:
        return
    elif suffix == ".json":
        index.labels.append(member)
    elif suffix in IMAGE_SUFFIXES:
        index.images.append(member)
    elif suffix == ".zip":  # only a zip's member gets here: a zip on disk is scanned (a download-all archive
        index.stray.append(("archive_in_archive", member.name))  # holding AI-Hub's zips, not read inside)
    else:
        index.stray.append(("stray_file", member.name))


def _scan_archive(index: SourceIndex, rel: str, path: Path) -> bool:
    """Add the members of one zip; returns False (and reports it) when it cannot be read."""
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        index.add_unreadable("archive_unreadable", rel, str(exc))
        return False
    hidden_dirs: set[str] = set()
    for info in infos:
        if info.is_dir():
            continue
        name = member_name(info)
        parts = PurePosixPath(name).parts
        hidden = next((i for i, part in enumerate(parts[:-1]) if _hidden(part)), None)
        if hidden is not None:
            hidden_dirs.add("/".join(parts[: hidden + 1]))
            continue
        at = _PLACE.pack(info.header_offset, info.compress_size, info.CRC, info.compress_type, info.flag_bits)
        stored = "" if info.filename == name else info.filename  # the name it is read by, where not the same
        _classify(index, Member(f"{rel}/{name}", stored, rel, info.file_size, at))
    index.stray += [("stray_folder", f"{rel}/{d}") for d in sorted(hidden_dirs)]
    return True


def _decodable(name: str) -> bool:
    """Whether a file name read from the disk was UTF-8 (Python keeps other bytes as lone surrogates)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _shown(name: str) -> str:
    """A name that is not UTF-8 as ASCII text: every byte outside ASCII as a \\xNN escape."""
    return name.encode("utf-8", "surrogateescape").decode("ascii", "backslashreplace")


def _entered(dirpath: str, dirnames: list[str], skip: Path | None) -> list[str]:
    """The folders of ``dirnames`` (in ``dirpath``) that a walk of the source goes into, in the order
    given: not hidden, named in UTF-8, and not ``skip`` (the stage's own output, resolved). The one
    filter of :func:`scan_source` (which also enters each real folder once: :func:`first_visit`) and
    :func:`linked_folders`."""
    return [d for d in dirnames if not _hidden(d) and _decodable(d)
            and (skip is None or (Path(dirpath) / d).resolve() != skip)]


def linked_folders(src: str | os.PathLike, exclude: str | os.PathLike | None = None) -> list[tuple[str, str]]:
    """(name under ``src``, where it points) of each link to a folder that ``scan_source`` would
    follow, the first ones met (not those below them), in order; ``exclude`` as in ``scan_source``."""
    root = Path(src)
    skip = Path(exclude).resolve() if exclude is not None else None
    links = []
    for dirpath, dirnames, _ in os.walk(root):  # not into links: each is named, not what it holds
        rel_dir = os.path.relpath(dirpath, root).replace(os.sep, "/")
        dirnames[:] = sorted(_entered(dirpath, dirnames, skip))
        for d in dirnames:
            if (Path(dirpath) / d).is_symlink():
                links.append((f"{rel_dir}/{d}".removeprefix("./"), os.readlink(Path(dirpath) / d)))
    return links


def check_source_folder(root: Path) -> None:
    """FileNotFoundError naming ``root`` unless it is a folder (a zip given instead says so)."""
    if root.is_dir():
        return
    if root.exists():
        raise FileNotFoundError(f"{root}: is a file, not a folder; give the folder that holds the "
                                "labels, images and zips")
    raise FileNotFoundError(f"{root}: source folder does not exist")


def scan_source(src: str | os.PathLike, exclude: str | os.PathLike | None = None) -> SourceIndex:
    """Every label, image and stray entry under ``src`` (folders and zip archives), in a stable order.

    ``exclude``: a folder inside ``src`` to leave out (the stage's own output, when it lies there), and the
    ``.NAME.lock`` its writer holds beside it (``prepare_lock``), which is no stray file of the source."""
    root = Path(src)
    check_source_folder(root)
    skip = Path(exclude).resolve() if exclude is not None else None
    skip_lock = set_lock_path(os.path.realpath(exclude)) if exclude is not None else None  # a link's: its folder's
    index = SourceIndex(root)
    useful: set[str] = {""}
    folders: list[str] = []
    seen = {root.resolve()}  # linked folders are followed (a disk mounted elsewhere), each real folder once
    unreadable: list[OSError] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True, onerror=unreadable.append):
        rel_dir = os.path.relpath(dirpath, root).replace(os.sep, "/")
        rel_dir = "" if rel_dir == "." else rel_dir
        found = False  # a page, image or zip here; or a name not in UTF-8, which may be one (not stray either)
        for d in sorted(dirnames):
            if _hidden(d):
                index.stray.append(("stray_folder", f"{rel_dir}/{d}".lstrip("/")))
            elif not _decodable(d):
                index.stray.append(("undecodable_name", _shown(f"{rel_dir}/{d}".lstrip("/"))))
                found = True
        # sorted before first_visit: a folder reached by two names takes the first in name order, as
        # content_hash's walk does, not whichever the filesystem happens to list first
        dirnames[:] = [d for d in sorted(_entered(dirpath, dirnames, skip)) if first_visit(Path(dirpath) / d, seen)]
        folders += [f"{rel_dir}/{d}".lstrip("/") for d in dirnames]
        pieces = split_pieces(rel_dir, filenames, set(filenames),
                              lambda whole: zipfile.is_zipfile(Path(dirpath) / whole),
                              lambda piece: begins_a_zip(Path(dirpath) / piece),
                              lambda piece: ends_a_zip(Path(dirpath) / piece))
        index.stray += pieces
        found = found or bool(pieces)  # a folder of a split zip's pieces holds pages once they are joined
        for name in sorted(filenames):
            if _piece(name):  # reported above
                continue
            if skip_lock is not None and name == skip_lock.name and (Path(dirpath) / name).resolve() == skip_lock:
                continue
            rel = f"{rel_dir}/{name}".lstrip("/")
            if not _decodable(name):  # bytes that are not UTF-8 (a name from a Windows zip tool, say)
                index.stray.append(("undecodable_name", _shown(rel)))
                found = True
                continue
            path = Path(dirpath) / name
            if name.lower().endswith(".zip"):
                found = _scan_archive(index, rel, path) or found
                continue
            before = len(index.labels) + len(index.images)
            try:
                size = path.stat().st_size
            except OSError:  # a dangling link
                index.stray.append(("stray_file", rel))
                continue
            _classify(index, Member(rel, rel, "", size))
            found = found or len(index.labels) + len(index.images) > before
        if found:
            parts = rel_dir.split("/") if rel_dir else []
            useful.update("/".join(parts[:i]) for i in range(len(parts) + 1))
    for error in unreadable:  # permissions, I/O: what it holds is unknown, so neither it nor those above are stray
        rel_dir = os.path.relpath(error.filename, root).replace(os.sep, "/")
        index.add_unreadable("unreadable_folder", rel_dir, str(error.strerror or error))
        parts = rel_dir.split("/") if rel_dir != "." else []
        useful.update("/".join(parts[:i]) for i in range(len(parts) + 1))
    for folder in folders:  # folders holding no page, image or archive anywhere below: report the top one
        parent = folder.rsplit("/", 1)[0] if "/" in folder else ""
        if folder not in useful and parent in useful:
            index.stray.append(("stray_folder", folder))
    return index.finish()


class _Archive(zipfile.ZipFile):
    """A zip opened to read members at the places the scan found (``Member.at``): zipfile's copy of its
    directory (about 700 bytes a member) is never read, so a process that reads a few members of an
    archive of 400,000 holds nothing for the others. A zipfile without this hook reads it whole, as before."""

    def _RealGetContents(self) -> None:  # where zipfile.ZipFile reads the central directory
        pass


def zip_info(member: Member) -> zipfile.ZipInfo:
    """The ZipInfo zipfile reads archive ``member`` by (its size and CRC-32 included), rebuilt from its
    place in the archive (``Member.at``, found by the scan)."""
    info = zipfile.ZipInfo(member.path)
    info.header_offset, info.compress_size, info.CRC, info.compress_type, info.flag_bits = _PLACE.unpack(member.at)
    info.file_size = member.size
    return info


_ARCHIVES: dict[str, tuple[tuple[int, ...], zipfile.ZipFile]] = {}  # path -> (its file's identity, the open zip)
_ARCHIVES_PID = -1


def _identity(stat: os.stat_result) -> tuple[int, ...]:
    """What changes when a file is replaced or rewritten: an archive opened before is then another file,
    whose members lie elsewhere than the places a new scan found."""
    return stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns


def open_member(root: str | os.PathLike, member: Member) -> IO[bytes]:
    """A stream of one archive member's bytes, read at its place as :func:`read_member` reads it (the
    archive stays open per process while its file is the same one; zipfile checks the CRC-32 at the end):
    for copying a large member out without holding it whole, or the archive's directory."""
    global _ARCHIVES_PID
    if _ARCHIVES_PID != os.getpid():
        _ARCHIVES.clear()
        _ARCHIVES_PID = os.getpid()
    key = str(Path(root) / member.archive)
    if not member.at:  # a Member made without its place (not by scan_source): found by name in the directory
        with zipfile.ZipFile(key) as whole:
            return whole.open(member.path)  # the open member keeps the file open
    cached = _ARCHIVES.get(key)
    if cached is not None and cached[0] == _identity(os.stat(key)):
        archive = cached[1]
    else:  # first read, or the zip was replaced since (a new download): the open one would be read at new places
        if cached is not None:
            cached[1].close()  # streams still open from it keep its file until they close
        archive = _Archive(key)
        _ARCHIVES[key] = (_identity(os.fstat(archive.fp.fileno())), archive)
    info = zip_info(member)
    try:
        return archive.open(info)
    except RuntimeError as exc:  # an encrypted member: zipfile names it by what it was given, here the ZipInfo
        raise RuntimeError(str(exc).replace(repr(info), repr(member.path))) from None


def read_member(root: str | os.PathLike, member: Member) -> bytes:
    """The bytes of one file or archive member (archives stay open per process for the next read; the
    member is read at its place, zipfile checking its name, size and CRC-32 as it does)."""
    if not member.archive:
        return (Path(root) / member.path).read_bytes()
    with open_member(root, member) as stream:
        return stream.read()
