"""The handwriting faces from pinned npm packages (scripts/install_web_fonts.py)."""

from __future__ import annotations

import hashlib
import importlib.util
import io
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from fontTools import subset
from fontTools.ttLib import TTFont
from PIL import Image, ImageDraw

from tests.conftest import REPO
from training.data.fonts import codepoints, covers, find_fonts, load_font

_spec = importlib.util.spec_from_file_location("install_web_fonts", REPO / "scripts" / "install_web_fonts.py")
web_fonts = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = web_fonts  # dataclasses look their module up there
_spec.loader.exec_module(web_fonts)

HANGUL_SAMPLE = "가나다라마바사아자차카타파하 서울특별시 행정복지센터 읽었습니다 괜찮아요"


def _ink(face, text: str) -> np.ndarray:
    font = load_font(face, 40)
    img = Image.new("L", (40 * len(text) + 20, 64), 255)
    ImageDraw.Draw(img).text((10, 8), text, font=font, fill=0)
    return np.asarray(img) < 128


def test_make_installs_every_pinned_face_and_each_draws_its_own_hangul():
    """`make test` runs scripts/install_system_deps.sh first: the faces are there and are real hands."""
    assert web_fonts.is_installed(Path(web_fonts.DEFAULT_DEST), web_fonts.FAMILIES)
    names = [face.out for fam in web_fonts.FAMILIES for face in fam.faces]
    faces = find_fonts(names)  # the default font folders, as synth-lines searches them
    assert [f.path.rsplit("/", 1)[-1] for f in faces] == names
    reference = _ink(find_fonts(["NanumGothic.ttf"])[0], "서울특별시")
    drawings = []
    for face in faces:
        assert covers(face, HANGUL_SAMPLE + " 0123456789 ABCxyz"), face
        hangul = [cp for cp in codepoints(face) if 0xAC00 <= cp <= 0xD7A3]
        assert len(hangul) >= 2350, (face, len(hangul))  # at least all of KS X 1001
        ink = _ink(face, "서울특별시")
        assert ink.sum() > 200, face
        drawings.append(ink)
        assert ink.shape != reference.shape or (ink != reference).mean() > 0.02, face  # not a fallback face
    for a in range(len(drawings)):  # each file is its own design, not one face copied under many names
        for b in range(a + 1, len(drawings)):
            assert (drawings[a] != drawings[b]).mean() > 0.01, (names[a], names[b])


@pytest.fixture()
def registry(tmp_path):
    """A file:// npm registry holding one package made from a small subset of NanumGothic as WOFF."""
    source = find_fonts(["NanumGothic.ttf"])[0].path
    font = TTFont(source)
    options = subset.Options()
    options.layout_features = []
    subsetter = subset.Subsetter(options)
    subsetter.populate(text="가나다서울 ABC")
    subsetter.subset(font)
    font.flavor = "woff"
    woff = io.BytesIO()
    font.save(woff)
    plain = io.BytesIO()
    font.flavor = None
    font.save(plain)

    def pack(files: dict[str, bytes]) -> bytes:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz") as tar:
            for name, data in files.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        return buf.getvalue()

    root = tmp_path / "registry"
    folder = root / "@fontsource" / "demo-hand" / "-"
    folder.mkdir(parents=True)
    tarball = pack({"package/files/demo-hand-korean-400-normal.woff": woff.getvalue(),
                    "package/LICENSE": b"SIL Open Font License 1.1\n"})
    (folder / "demo-hand-1.0.0.tgz").write_bytes(tarball)
    family = web_fonts.Family("demo-hand", "1.0.0", hashlib.sha256(tarball).hexdigest(),
                              (web_fonts._korean("demo-hand", 400, "DemoHand-Regular.ttf"),))
    return {"url": root.as_uri(), "family": family, "folder": folder, "pack": pack,
            "plain": TTFont(io.BytesIO(plain.getvalue()))}


def test_install_unwraps_the_woff_to_the_same_truetype_font_and_records_its_source(registry, tmp_path):
    dest = tmp_path / "fonts"
    written = web_fonts.install(dest, registry["url"], (registry["family"],), log=lambda _: None)
    assert sorted(p.name for p in written) == ["DemoHand-Regular.ttf", "LICENSE-demo-hand.txt"]
    out = (dest / "DemoHand-Regular.ttf").read_bytes()
    assert out[:4] == b"\x00\x01\x00\x00"  # plain TrueType, not wOFF
    got, want = TTFont(io.BytesIO(out)), registry["plain"]
    assert got.getBestCmap() == want.getBestCmap() and got.getGlyphOrder() == want.getGlyphOrder()
    for name in want.getGlyphOrder():
        assert got["glyf"][name].getCoordinates(got["glyf"])[0] == want["glyf"][name].getCoordinates(want["glyf"])[0]
    assert (dest / "LICENSE-demo-hand.txt").read_bytes() == b"SIL Open Font License 1.1\n"
    assert "DemoHand-Regular.ttf\t@fontsource/demo-hand\t1.0.0\t" in (dest / "SOURCES.tsv").read_text()
    face = find_fonts(["DemoHand-Regular.ttf"], font_dirs=[dest])[0]
    assert covers(face, "서울 ABC") and not covers(face, "부산")
    # a second run finds everything in place and writes nothing; a lost file is put back
    assert web_fonts.install(dest, registry["url"], (registry["family"],), log=lambda _: None) == []
    (dest / "DemoHand-Regular.ttf").unlink()
    assert len(web_fonts.install(dest, registry["url"], (registry["family"],), log=lambda _: None)) == 2


def test_a_changed_tarball_is_refused_by_name_and_nothing_is_written(registry, tmp_path):
    dest = tmp_path / "fonts"
    dest.mkdir()
    (dest / "DemoHand-Regular.ttf").write_bytes(b"earlier install")
    tarball = registry["folder"] / "demo-hand-1.0.0.tgz"
    tarball.write_bytes(tarball.read_bytes()[:-10])  # truncated download
    with pytest.raises(web_fonts.WebFontError, match=r"@fontsource/demo-hand@1.0.0: .* has sha256 .*expected"):
        web_fonts.install(dest, registry["url"], (registry["family"],), log=lambda _: None)
    assert (dest / "DemoHand-Regular.ttf").read_bytes() == b"earlier install"
    assert sorted(p.name for p in dest.iterdir()) == ["DemoHand-Regular.ttf"]
    assert web_fonts.main(["--dest", str(dest), "--registry", str(tmp_path / "nowhere")]) == 1


@pytest.mark.parametrize("files, message", [
    ({"package/LICENSE": b"OFL"}, r"the tarball has no package/files/demo-hand-korean-400-normal.woff"),
    ({"package/files/demo-hand-korean-400-normal.woff": b"wOFF broken", "package/LICENSE": b"OFL"},
     r"@fontsource/demo-hand:package/files/demo-hand-korean-400-normal.woff: not a readable WOFF font"),
])
def test_a_package_without_a_usable_face_names_the_file(registry, tmp_path, files, message):
    tarball = registry["pack"](files)
    (registry["folder"] / "demo-hand-1.0.0.tgz").write_bytes(tarball)
    family = web_fonts.Family("demo-hand", "1.0.0", hashlib.sha256(tarball).hexdigest(), registry["family"].faces)
    with pytest.raises(web_fonts.WebFontError, match=message):
        web_fonts.install(tmp_path / "fonts", registry["url"], (family,), log=lambda _: None)
    assert not (tmp_path / "fonts").exists()


def test_check_says_whether_the_faces_are_installed_and_writes_nothing(tmp_path):
    # install_system_deps.sh asks this without sudo, and calls sudo only when something must be written
    assert web_fonts.main(["--check", "--dest", str(tmp_path)]) == 1 and not any(tmp_path.iterdir())
    installed = Path(web_fonts.DEFAULT_DEST)
    if web_fonts.is_installed(installed, web_fonts.FAMILIES):
        assert web_fonts.main(["--check"]) == 0
