"""The source scan (training.data.sources): which folders it enters, and the links prepare names for DVC."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from training.data.sources import Unreadable, linked_folders, scan_source


def _page(folder: Path, stem: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{stem}.json").write_bytes(b"{}")
    (folder / f"{stem}.jpg").write_bytes(b"jpg")


def test_linked_folders_names_the_links_the_scan_follows_and_skips_what_it_skips(tmp_path):
    """One filter decides which folders both walks enter: hidden folders, names that are not UTF-8 and
    the excluded output are entered by neither, so a link inside them is neither read nor named; a link
    below a linked folder is read but not named (its top link is)."""
    src, disk = tmp_path / "src", tmp_path / "disk"
    for name in ("top", "deep", "hidden", "odd", "excluded", "inner"):
        _page(disk / name, name)
    _page(src / "real", "r")
    (src / "Training").symlink_to(disk / "top")
    (disk / "top" / "deeper").symlink_to(disk / "deep")            # below a link: read, not named
    (src / "real" / "sub").symlink_to(disk / "inner")              # below a real folder: named
    (src / ".cache").mkdir()
    (src / ".cache" / "link").symlink_to(disk / "hidden")          # in a hidden folder: neither
    odd = os.fsencode(src) + b"/" + "읽기".encode("cp949")
    os.mkdir(odd)
    os.symlink(disk / "odd", odd + b"/link")                       # in a folder named in CP949: neither
    (src / "prepared").mkdir()
    (src / "prepared" / "link").symlink_to(disk / "excluded")      # in the excluded output: neither

    assert linked_folders(src, exclude=src / "prepared") == [("Training", str(disk / "top")),
                                                             ("real/sub", str(disk / "inner"))]
    index = scan_source(src, exclude=src / "prepared")
    assert [m.name for m in index.labels] == ["Training/deeper/deep.json", "Training/top.json",
                                              "real/r.json", "real/sub/inner.json"]
    assert ("stray_folder", ".cache") in index.stray
    assert [reason for reason, _ in index.stray].count("undecodable_name") == 1
    assert linked_folders(src) == [("Training", str(disk / "top")), ("prepared/link", str(disk / "excluded")),
                                   ("real/sub", str(disk / "inner"))]


def test_linked_folders_names_a_link_to_a_folder_that_is_also_in_the_source(tmp_path):
    """Every link to a folder is named, also one to a folder of the source itself (which of the two the
    scan enters, as it enters each real folder once, is not decided here)."""
    src = tmp_path / "src"
    _page(src / "a", "p")
    (src / "b").symlink_to(src / "a")
    assert linked_folders(src) == [("b", str(src / "a"))]
    assert len(scan_source(src).labels) == 1


def test_what_cannot_be_read_is_kept_as_places_and_reported_in_the_same_order(tmp_path):
    src = tmp_path / "src"
    _page(src / "b", "p")
    for name in ("z: broken.zip", "a.zip"):
        (src / "b" / name).write_bytes(b"not a zip")
    index = scan_source(src)
    why = "File is not a zip file"
    assert index.unreadable == [Unreadable("archive_unreadable", "b/a.zip", why),
                                Unreadable("archive_unreadable", "b/z: broken.zip", why)]
    assert [e for e in index.stray if e[0] == "archive_unreadable"] == [place.entry() for place in index.unreadable]
    assert index.unlisted == []


def test_a_folder_reached_twice_is_named_the_same_whatever_order_the_disk_lists_it(tmp_path, monkeypatch):
    """A link and the real folder it points to hold the same pages once: which of the two names the
    pages take must not depend on the order the filesystem lists a folder (tmpfs lists newest first,
    ext4 by hash), or splits.json and the report name them differently from machine to machine."""
    src = tmp_path / "src"
    _page(src / "a", "p")
    (src / "b").symlink_to(src / "a")
    real_walk = os.walk

    def walk(top, **kwargs):  # the same tree, each folder's entries listed in one order, then the other
        for dirpath, dirnames, filenames in real_walk(top, **kwargs):
            dirnames.sort(reverse=reverse)
            yield dirpath, dirnames, filenames

    names = []
    for reverse in (False, True):
        monkeypatch.setattr("training.data.sources.os.walk", walk)
        names.append([m.name for m in scan_source(src).labels])
    assert names == [["a/p.json"], ["a/p.json"]]


def test_a_zip_member_named_in_utf8_keeps_its_name_once_and_is_read_by_it(tmp_path):
    """The scan kept each archive member's name twice (the readable name and, apart, the name the archive
    keys it by): about 160 bytes a member more in the calling process of prepare, for every page."""
    import zipfile

    from tests.test_ingest import _cp949_zip
    from training.data.sources import read_member

    with zipfile.ZipFile(tmp_path / "utf8.zip", "w") as zf:
        zf.writestr("인.허가/서울.json", b"{}")
        zf.writestr("인.허가/back\\slash.json", b"[1]")
    _cp949_zip(tmp_path / "cp949.zip", {"인.허가/부산.json": b"[]"})
    members = {m.name: m for m in scan_source(tmp_path).labels}
    utf8, cp949 = members["utf8.zip/인.허가/서울.json"], members["cp949.zip/인.허가/부산.json"]
    assert utf8.stored == "" and utf8.path == "인.허가/서울.json" and read_member(tmp_path, utf8) == b"{}"
    assert cp949.stored == cp949.path != "인.허가/부산.json" and read_member(tmp_path, cp949) == b"[]"
    slashed = next(m for m in members.values() if "slash" in m.name)
    assert slashed.name.endswith("back/slash.json") and read_member(tmp_path, slashed) == b"[1]"


def test_a_zip_replaced_since_it_was_read_is_read_anew_at_the_places_a_new_scan_finds(tmp_path):
    """The archive handle open_member keeps per process was reused for a zip replaced since (a new
    download, a re-zipped folder): a new scan's places read in the old file (BadZipFile "Truncated file
    header"), for evaluate's extraction and prepare's reads in one process alike."""
    import os
    import zipfile

    from training.data.sources import read_member

    def write(members: dict[str, bytes]) -> None:
        part = tmp_path / "new.zip.part"
        with zipfile.ZipFile(part, "w") as zf:
            for name, data in members.items():
                zf.writestr(name, data)
        os.replace(part, tmp_path / "src" / "pages.zip")  # a new file under the same name

    (tmp_path / "src").mkdir()
    write({"p.json": b'{"v": 1}'})
    first = next(m for m in scan_source(tmp_path / "src").labels if m.name.endswith("p.json"))
    assert read_member(tmp_path / "src", first) == b'{"v": 1}'
    write({"q.json": b"{}" * 50, "p.json": b'{"v": 22}'})  # p.json now lies further in
    again = next(m for m in scan_source(tmp_path / "src").labels if m.name.endswith("p.json"))
    assert again.at != first.at
    assert read_member(tmp_path / "src", again) == b'{"v": 22}'


def test_the_pieces_of_a_split_zip_download_are_named_with_the_command_that_joins_them(tmp_path):
    """An AI-Hub zip downloaded in pieces (X.zip.part0, X.zip.part1, …) was reported as stray_file ("not
    JSON, not an image, not a zip") and its folder as stray_folder; each piece is now split_archive, naming
    the joined zip and the cat that joins the pieces in the order of their numbers."""
    import subprocess
    import zipfile

    labels, images = tmp_path / "Training", tmp_path / "Validation"
    labels.mkdir()
    images.mkdir()
    with zipfile.ZipFile(tmp_path / "whole.zip", "w") as zf:
        for i in range(40):
            zf.writestr(f"인.허가/p{i}.json", os.urandom(300))  # not compressible: 12 pieces below
    data = (tmp_path / "whole.zip").read_bytes()
    size = -(-len(data) // 12)
    for folder, name in ((labels, "[라벨]Training_인.허가.zip"), (images, "[원천]인.허가.zip")):
        for i in range(12):
            (folder / f"{name}.part{i}").write_bytes(data[i * size:(i + 1) * size])
    (tmp_path / "whole.zip").unlink()
    (labels / "[라벨]Training_인.허가.zip.part0").rename(labels / "[라벨]Training_인.허가.zip.part00")  # 00 .. 11: * keeps order
    for i in range(1, 10):
        (labels / f"[라벨]Training_인.허가.zip.part{i}").rename(labels / f"[라벨]Training_인.허가.zip.part0{i}")
    stray = scan_source(tmp_path).stray
    assert {reason for reason, _ in stray} == {"split_archive"} and len(stray) == 24
    by_place = dict(place.split(": ", 1) for _, place in stray)
    said = by_place["Training/[라벨]Training_인.허가.zip.part03"]
    assert said == ("a piece of a split download of [라벨]Training_인.허가.zip, not read; join its pieces in its folder: "
                    "cat '[라벨]Training_인.허가.zip.part'* > '[라벨]Training_인.허가.zip'")
    # part10 sorts before part2 by name: the pieces are listed in the order of their numbers
    said = by_place["Validation/[원천]인.허가.zip.part10"]
    assert said.endswith("cat " + " ".join(f"'[원천]인.허가.zip.part{i}'" for i in range(12)) + " > '[원천]인.허가.zip'")
    for folder, place in ((labels, "Training/[라벨]Training_인.허가.zip.part00"),
                          (images, "Validation/[원천]인.허가.zip.part0")):
        subprocess.run(["bash", "-c", by_place[place].split(" in its folder: ")[1]], cwd=folder, check=True)
    index = scan_source(tmp_path)
    assert len(index.labels) == 80  # the joined zips are read
    assert {where.split(": ", 1)[1] for _, where in index.stray} == {"a piece of a split download of [라벨]Training_인.허가.zip, "
                                                                   "which is here already (joined): not read; delete the pieces",
                                                                   "a piece of a split download of [원천]인.허가.zip, which is "
                                                                   "here already (joined): not read; delete the pieces"}


def _split_zip(folder: Path, name: str, pieces: int, members: int = 20) -> None:
    """A zip of ``members`` incompressible label JSONs, written as ``name.part0`` .. ``name.part{pieces-1}``."""
    import io
    import zipfile

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for i in range(members):
            zf.writestr(f"인.허가/p{i}.json", os.urandom(300))
    data = buffer.getvalue()
    size = -(-len(data) // pieces)
    for i in range(pieces):
        (folder / f"{name}.part{i}").write_bytes(data[i * size:(i + 1) * size])


def test_the_join_command_of_a_split_zip_takes_its_pieces_alone(tmp_path):
    """`cat 'X.zip.part'* > 'X.zip'` also took a browser's unfinished download of a piece
    (X.zip.part3.crdownload, a stray_file) into the zip; where `*` would take another file, the pieces
    are listed one by one."""
    import subprocess

    folder = tmp_path / "Training"
    folder.mkdir()
    name = "[라벨]Training_인.허가 A's.zip"
    _split_zip(folder, name, 3)
    (folder / f"{name}.part3.crdownload").write_bytes(os.urandom(200_000))
    stray = scan_source(tmp_path).stray
    assert ("stray_file", f"Training/{name}.part3.crdownload") in stray
    said = next(place for reason, place in stray if reason == "split_archive")
    command = said.split(" in its folder: ")[1]
    assert "*" not in command and "crdownload" not in command
    subprocess.run(["bash", "-c", command], cwd=folder, check=True)
    index = scan_source(tmp_path)
    assert len(index.labels) == 20  # the joined zip is read
    assert "archive_unreadable" not in dict(index.stray)


def test_pieces_beside_a_joined_zip_that_does_not_read_are_not_said_to_be_deleted(tmp_path):
    """A join cut short (Ctrl-C, a full disk: the zip is as big again as its pieces) leaves X.zip without
    its end; its pieces were reported "here already (joined): delete the pieces", the one whole copy of
    the download. Now: keep them and join again, with the command, which then gives a zip that reads."""
    import subprocess

    folder = tmp_path / "Training"
    folder.mkdir()
    name = "[라벨]Training_인.허가.zip"
    _split_zip(folder, name, 3)
    (folder / name).write_bytes((folder / f"{name}.part0").read_bytes())  # cat stopped after the first piece
    stray = scan_source(tmp_path).stray
    assert ("archive_unreadable", f"Training/{name}: File is not a zip file") in stray
    said = [place for reason, place in stray if reason == "split_archive"]
    assert len(said) == 3 and not any("delete" in place for place in said)
    assert said[0].endswith(f"{name} here is not a readable zip (a join cut short?): keep the pieces and join them "
                            f"again in its folder: cat '{name}.part'* > '{name}'")
    subprocess.run(["bash", "-c", said[0].split(" in its folder: ")[1]], cwd=folder, check=True)
    index = scan_source(tmp_path)
    assert len(index.labels) == 20
    assert all(place.endswith("which is here already (joined): not read; delete the pieces")
               for reason, place in index.stray if reason == "split_archive")


def test_pieces_of_a_split_zip_with_a_gap_in_their_numbers_name_the_missing_ones_not_a_join(tmp_path):
    """X.zip.part0, part1, part3 (part2 not downloaded, or deleted) were given `cat 'X.zip.part'* > 'X.zip'`,
    which builds a zip without part2's bytes that does not read; the missing piece is named instead."""
    folder = tmp_path / "Training"
    folder.mkdir()
    name = "[라벨]Training_인.허가.zip"
    _split_zip(folder, name, 5)
    (folder / f"{name}.part2").unlink()
    (folder / f"{name}.part3").unlink()
    said = [place for reason, place in scan_source(tmp_path).stray if reason == "split_archive"]
    assert len(said) == 3
    for place in said:
        assert place.split(": ", 1)[1] == (f"a piece of a split download of {name}, not read; {name}.part2, "
                                           f"{name}.part3 are missing: download them into its folder, then join "
                                           "the pieces")


@pytest.mark.parametrize("sep, first", [(".part", 0), (".", 1)])
def test_pieces_of_a_split_zip_without_their_first_piece_name_it_missing_not_a_join(sep, first, tmp_path):
    """X.zip.part1, part2, … (part0 not downloaded) or X.zip.002, … (.001 missing) have no gap in their
    numbers, so they were given `cat … > X.zip`, which builds a zip without its start that does not read
    (then said to be 'a join cut short': join again, the same broken zip). The lowest piece not beginning
    as a zip does says the pieces before it are missing."""
    import zipfile

    folder = tmp_path / "Training"
    folder.mkdir()
    name = "[라벨]Training_인.허가.zip"
    _split_zip(folder, name, 4)
    pieces = [folder / f"{name}.part{i}" for i in range(4)]
    if sep == ".":  # 7-Zip's numbering: .001, .002, …
        pieces = [p.rename(folder / f"{name}.{i + first:03d}") for i, p in enumerate(pieces)]
    assert zipfile.is_zipfile(pieces[0]) is False and pieces[0].read_bytes()[:4] == b"PK\x03\x04"
    pieces[0].unlink()
    said = [place for reason, place in scan_source(tmp_path).stray if reason == "split_archive"]
    assert len(said) == 3
    for place in said:
        why = place.split(": ", 1)[1]
        assert "cat " not in why, why
        assert why == (f"a piece of a split download of {name}, not read; {pieces[1].name} does not begin a zip: "
                       "the piece(s) numbered before it are missing: download them into its folder, then join "
                       "the pieces")


def test_a_split_zip_whose_pieces_are_all_there_still_gets_its_join(tmp_path):
    folder = tmp_path / "Training"
    folder.mkdir()
    _split_zip(folder, "a.zip", 3)
    said = [place for reason, place in scan_source(tmp_path).stray if reason == "split_archive"]
    assert len(said) == 3 and all(place.endswith("cat a.zip.part* > a.zip") for place in said), said


@pytest.mark.parametrize("kept", [[0], [0, 1], [1]])
def test_pieces_of_a_split_zip_without_their_last_piece_name_it_missing_not_a_join(kept, tmp_path):
    """A lone X.zip.part0 (or part0 and part1) of a download in three pieces has no gap in its numbers and
    begins as a zip does, so it was given `cat 'X.zip.part'* > 'X.zip'`, whose zip then did not read ("a
    join cut short": join again, the same broken zip). The highest piece not ending as a zip does says the
    pieces after it are missing; a lone middle piece, those before and after it."""
    import subprocess

    folder = tmp_path / "Training"
    folder.mkdir()
    name = "[라벨]Training_인.허가.zip"
    _split_zip(folder, name, 3)
    for i in {0, 1, 2} - set(kept):
        (folder / f"{name}.part{i}").unlink()
    said = [place for reason, place in scan_source(tmp_path).stray if reason == "split_archive"]
    assert len(said) == len(kept)
    first, last = f"{name}.part{kept[0]}", f"{name}.part{kept[-1]}"
    absent = (f"{first} neither begins nor ends a zip: the piece(s) numbered before and after it" if kept == [1]
              else f"{last} does not end a zip: the piece(s) numbered after it")
    for place in said:
        why = place.split(": ", 1)[1]
        assert "cat " not in why, why
        assert why == (f"a piece of a split download of {name}, not read; {absent} are missing: download them "
                       "into its folder, then join the pieces")
    # the pieces all there: the join, whose zip reads
    _split_zip(folder, name, 3)
    said = [place for reason, place in scan_source(tmp_path).stray if reason == "split_archive"]
    subprocess.run(["bash", "-c", said[0].split(" in its folder: ")[1]], cwd=folder, check=True)
    assert len(scan_source(tmp_path).labels) == 20


def test_a_zip_named_as_its_only_piece_gets_its_join(tmp_path):
    """X.zip.part0 alone that is the whole zip (a download in one piece) begins and ends as a zip does:
    its join (a copy) reads."""
    import subprocess

    folder = tmp_path / "Training"
    folder.mkdir()
    _split_zip(folder, "a.zip", 1)
    said = [place for reason, place in scan_source(tmp_path).stray if reason == "split_archive"]
    assert len(said) == 1 and said[0].endswith("cat a.zip.part* > a.zip"), said
    subprocess.run(["bash", "-c", said[0].split(" in its folder: ")[1]], cwd=folder, check=True)
    assert len(scan_source(tmp_path).labels) == 20


def test_pieces_far_apart_in_number_name_the_first_missing_ones_and_count_the_rest(tmp_path):
    """a.zip.part0 and a.zip.part1000000 named each of the 999,999 pieces between them, a 14 MB message on
    each piece's line (a dated a.zip.20240101 beside a.zip.1: 20 million names, hundreds of MB)."""
    folder = tmp_path / "Training"
    folder.mkdir()
    (folder / "a.zip.part0").write_bytes(b"PK\x03\x04" + bytes(60))
    (folder / "a.zip.part1000000").write_bytes(bytes(42) + b"PK\x05\x06" + bytes(18))  # ends as a zip does
    said = [place for reason, place in scan_source(tmp_path).stray if reason == "split_archive"]
    assert len(said) == 2
    shown = ", ".join(f"a.zip.part{i}" for i in range(1, 11))
    assert said[0].split(": ", 1)[1] == (f"a piece of a split download of a.zip, not read; {shown} and 999989 more "
                                         "are missing: download them into its folder, then join the pieces")
