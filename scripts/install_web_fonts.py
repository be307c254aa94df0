#!/usr/bin/env python3
"""Korean handwriting faces that Debian does not package, from Google Fonts' npm packages (@fontsource).

Each package is a pinned npm tarball checked against its sha256. Its single "korean" subset file
(WOFF: all 2,350 KS X 1001 syllables or more, ASCII, digits) is unwrapped to a plain TrueType file,
so Pillow, fontconfig and ``training.data.fonts`` find it like any system font. The faces are
licensed under the SIL Open Font License; each family's LICENSE is written beside its files.

Run by scripts/install_system_deps.sh (system python3 with Debian's python3-fonttools, as root) and
usable alone: ``python3 scripts/install_web_fonts.py [--dest DIR] [--registry URL]``. Does nothing
when DEST already holds exactly these files (its SOURCES.tsv records what was installed).
Needs only the standard library and fontTools, so it runs outside the project's virtualenv.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

DEFAULT_DEST = "/usr/share/fonts/truetype/kocr-fontsource"
DEFAULT_REGISTRY = "https://registry.npmjs.org"


@dataclass(frozen=True)
class Face:
    """One weight: the WOFF inside the package and the TrueType file it becomes."""

    woff: str
    out: str


@dataclass(frozen=True)
class Family:
    """One pinned @fontsource package and the faces taken from it."""

    package: str
    version: str
    sha256: str
    faces: tuple[Face, ...]

    def tarball_url(self, registry: str) -> str:
        """The package tarball's address on an npm registry."""
        return f"{registry.rstrip('/')}/@fontsource/{self.package}/-/{self.package}-{self.version}.tgz"


def _korean(package: str, weight: int, out: str) -> Face:
    return Face(f"package/files/{package}-korean-{weight}-normal.woff", out)


FAMILIES: tuple[Family, ...] = (
    Family("gaegu", "5.3.0", "a288e8e1d8ba3b288bee36088ad49f3e393797b96c2cca489efcbce47d918f6f",
           (_korean("gaegu", 300, "Gaegu-Light.ttf"), _korean("gaegu", 400, "Gaegu-Regular.ttf"),
            _korean("gaegu", 700, "Gaegu-Bold.ttf"))),
    Family("hi-melody", "5.3.0", "7c863e00f03dc1bf22282cc73045afce6d517c055f512e6880ca0f14a3ab662c",
           (_korean("hi-melody", 400, "HiMelody-Regular.ttf"),)),
    Family("gamja-flower", "5.3.0", "39b21876792be48fb2701baacab1a75566c2926ae06a109a4ff73510d77d1d7f",
           (_korean("gamja-flower", 400, "GamjaFlower-Regular.ttf"),)),
    Family("poor-story", "5.3.0", "01497fc5e67f86260082878abfbdf266d902d6cfcc328a36f2fb4956f368bf9b",
           (_korean("poor-story", 400, "PoorStory-Regular.ttf"),)),
    Family("east-sea-dokdo", "5.3.0", "339f551a03f269f099637baa38180ec917e6119b6a7b9630e4954e81f59f6a00",
           (_korean("east-sea-dokdo", 400, "EastSeaDokdo-Regular.ttf"),)),
    Family("cute-font", "5.2.8", "03af324a7d4f72f642bc890549061a28d731cc293ccf0d22395440669ecbf14d",
           (_korean("cute-font", 400, "CuteFont-Regular.ttf"),)),
)


class WebFontError(RuntimeError):
    """A package that cannot be fetched, fails its checksum or lacks an expected file."""


def sources_record(families: tuple[Family, ...]) -> str:
    """SOURCES.tsv's text: one row per installed file with the package, version and tarball sha256."""
    rows = ["file\tpackage\tversion\tsha256"]
    for fam in families:
        rows += [f"{face.out}\t@fontsource/{fam.package}\t{fam.version}\t{fam.sha256}" for face in fam.faces]
    rows += [f"LICENSE-{fam.package}.txt\t@fontsource/{fam.package}\t{fam.version}\t{fam.sha256}"
             for fam in families]
    return "\n".join(rows) + "\n"


def is_installed(dest: Path, families: tuple[Family, ...]) -> bool:
    """True when ``dest`` holds every file of ``families`` and a SOURCES.tsv naming exactly them."""
    record = dest / "SOURCES.tsv"
    if not record.is_file() or record.read_text(encoding="utf-8") != sources_record(families):
        return False
    return all((dest / face.out).is_file() for fam in families for face in fam.faces)


def fetch(family: Family, registry: str) -> bytes:
    """The package tarball, checked against its pinned sha256."""
    url = family.tarball_url(registry)
    try:
        with urllib.request.urlopen(url, timeout=120) as response:  # noqa: S310 (pinned https/file URL)
            data = response.read()
    except (OSError, ValueError) as exc:  # ValueError: not a URL urllib can open
        raise WebFontError(f"@fontsource/{family.package}@{family.version}: cannot download {url}: {exc}") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != family.sha256:
        raise WebFontError(f"@fontsource/{family.package}@{family.version}: {url} has sha256 {digest}, "
                           f"expected {family.sha256} (a changed or truncated download); nothing installed")
    return data


def woff_to_ttf(woff: bytes, name: str) -> bytes:
    """The same font as a plain TrueType file (WOFF unwrapped; glyphs, cmap and metrics unchanged)."""
    from fontTools.ttLib import TTFont, TTLibError

    try:
        font = TTFont(io.BytesIO(woff), recalcTimestamp=False)
        font.flavor = None
        buf = io.BytesIO()
        font.save(buf)
    except (TTLibError, OSError, ValueError, KeyError, AssertionError) as exc:
        raise WebFontError(f"{name}: not a readable WOFF font ({exc})") from None
    return buf.getvalue()


def unpack(family: Family, tarball: bytes) -> dict[str, bytes]:
    """Output file name -> bytes: each face as TrueType and the family's LICENSE."""
    files: dict[str, bytes] = {}
    with tarfile.open(fileobj=io.BytesIO(tarball), mode="r:gz") as tar:
        def member(path: str) -> bytes:
            try:
                handle = tar.extractfile(path)
            except KeyError:
                handle = None
            if handle is None:
                raise WebFontError(f"@fontsource/{family.package}@{family.version}: the tarball has no {path}")
            return handle.read()

        for face in family.faces:
            files[face.out] = woff_to_ttf(member(face.woff), f"@fontsource/{family.package}:{face.woff}")
        files[f"LICENSE-{family.package}.txt"] = member("package/LICENSE")
    return files


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def install(dest: str | os.PathLike = DEFAULT_DEST, registry: str = DEFAULT_REGISTRY,
            families: tuple[Family, ...] = FAMILIES, log=print) -> list[Path]:
    """Install ``families`` into ``dest``; returns the files written (none when already installed).

    Every tarball is downloaded and checked before anything is written, so a failed download or
    checksum leaves ``dest`` as it was. Files are replaced atomically; SOURCES.tsv is written last,
    then fontconfig's cache of ``dest`` is refreshed when ``fc-cache`` is installed.
    """
    dest = Path(dest)
    if is_installed(dest, families):
        log(f"web fonts: present in {dest}")
        return []
    unpacked: dict[str, bytes] = {}
    for fam in families:
        log(f"web fonts: @fontsource/{fam.package}@{fam.version}")
        unpacked.update(unpack(fam, fetch(fam, registry)))
    dest.mkdir(parents=True, exist_ok=True)
    written = []
    for name, data in unpacked.items():
        _write_atomic(dest / name, data)
        written.append(dest / name)
    _write_atomic(dest / "SOURCES.tsv", sources_record(families).encode("utf-8"))
    if shutil.which("fc-cache"):  # tools that list fonts through fontconfig (fc-list) see the new faces
        subprocess.run(["fc-cache", str(dest)], check=False, capture_output=True)
    log(f"web fonts: {len(written)} files in {dest}")
    return written


def main(argv: list[str] | None = None) -> int:
    """Command line: install the pinned faces; exits 1 with the reason on failure."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dest", default=DEFAULT_DEST, help=f"install folder (default {DEFAULT_DEST})")
    parser.add_argument("--registry", default=os.environ.get("KOCR_NPM_REGISTRY", DEFAULT_REGISTRY),
                        help="npm registry base URL (default $KOCR_NPM_REGISTRY or the public registry)")
    parser.add_argument("--check", action="store_true",
                        help="install nothing: exit 0 when every pinned face is installed, else 1")
    args = parser.parse_args(argv)
    if args.check:
        return 0 if is_installed(Path(args.dest), FAMILIES) else 1
    try:
        install(args.dest, args.registry)
    except (WebFontError, OSError) as exc:
        print(f"web fonts: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
