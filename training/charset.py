"""The recogniser's character set: CTC encode/decode with blank at index 0 (EasyOCR's layout).

Example:
    >>> cs = Charset.named("korean_g2")
    >>> cs.num_class
    1009
    >>> cs.decode_greedy([0, cs.index["서"], cs.index["서"], 0, cs.index["울"]])
    '서울'
"""

from __future__ import annotations

import os
import re
import unicodedata
import warnings
from pathlib import Path
from typing import Any, Iterable, Sequence

CHARSET_DIR = Path(__file__).with_name("charsets")
BUILTIN_CHARSETS = ("korean_g2", "english_g2")


class Charset:
    """An ordered list of characters; class ``i + 1`` is ``chars[i]`` and class 0 is the CTC blank."""

    def __init__(self, chars: str, name: str = "custom") -> None:
        if len(set(chars)) != len(chars):
            dup = sorted({c for c in chars if chars.count(c) > 1})
            raise ValueError(f"charset {name!r} repeats characters: {''.join(dup)!r}")
        if not chars:
            raise ValueError(f"charset {name!r} is empty")
        self.chars = chars
        self.name = name
        self.index = {c: i + 1 for i, c in enumerate(chars)}

    @classmethod
    def named(cls, name: str) -> "Charset":
        """A built-in charset (``korean_g2``: 1,008 characters; ``english_g2``: 96)."""
        if name not in BUILTIN_CHARSETS:
            raise ValueError(f"unknown charset {name!r}; built-in: {', '.join(BUILTIN_CHARSETS)}")
        return cls((CHARSET_DIR / f"{name}.txt").read_text(encoding="utf-8"), name)

    @classmethod
    def from_spec(cls, spec: str) -> "Charset":
        """A built-in name, or a path to a UTF-8 file holding the characters on one line."""
        if spec in BUILTIN_CHARSETS:
            return cls.named(spec)
        path = Path(spec)
        if not path.is_file():
            raise ValueError(f"charset {spec!r} is neither built-in ({', '.join(BUILTIN_CHARSETS)}) nor a file")
        return cls(read_charset_file(path), path.stem)

    @classmethod
    def from_setting(cls, key: str, spec: Any) -> "Charset":
        """``from_spec`` for a params setting: a spec that names no charset raises ParamsError naming ``key``."""
        from kocr.params import ParamsError, typed

        try:
            return cls.from_spec(typed(key, spec, str))
        except (ValueError, OSError) as exc:
            if isinstance(exc, ParamsError):
                raise
            raise ParamsError(f"{key}: {exc}") from None

    @property
    def num_class(self) -> int:
        """Number of output classes including the blank."""
        return len(self.chars) + 1

    def __len__(self) -> int:
        return len(self.chars)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Charset) and other.chars == self.chars

    def missing(self, text: str) -> set[str]:
        """Characters of ``text`` the charset cannot express."""
        return {c for c in text if c not in self.index}

    def encode(self, text: str) -> list[int]:
        """Class indices of ``text``; raises KeyError naming the first unknown character."""
        try:
            return [self.index[c] for c in text]
        except KeyError as exc:
            raise KeyError(f"character {exc.args[0]!r} of {text!r} is not in charset {self.name}") from None

    def decode_greedy(self, indices: Iterable[int]) -> str:
        """Collapse repeats, then drop blanks (CTC best path)."""
        out, prev = [], 0
        for i in indices:
            i = int(i)
            if i != prev and i != 0:
                out.append(self.chars[i - 1])
            prev = i
        return "".join(out)

    def shared_rows(self, other: "Charset") -> list[tuple[int, int]]:
        """(row in ``other``, row in ``self``) for the blank and every character both hold."""
        pairs = [(0, 0)]
        pairs += [(other.index[c], i) for c, i in self.index.items() if c in other.index]
        return pairs

    def decode_batch(self, index_rows: Sequence[Iterable[int]]) -> list[str]:
        """Greedy-decode each row of a (batch, time) index array."""
        return [self.decode_greedy(row) for row in index_rows]


def read_charset_file(path: Path) -> str:
    """The characters of a charset file: UTF-8 on one line, a byte-order mark (Windows Notepad's) and
    the final line break dropped. ValueError naming the file when it is not UTF-8 (CP949 is named as
    such) or holds decomposed Hangul (NFD jamo, as macOS tools save it): labels are NFC, so a jamo
    class would never match one and a syllable the file meant would be missing."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(f"charset file {path}: {not_utf8(exc)}") from None
    if text.endswith("\r\n"):
        text = text[:-2]
    text = text.rstrip("\n")
    nfc = unicodedata.normalize("NFC", text)
    if nfc != text and any(unicodedata.name(c, "").startswith("HANGUL") and c not in nfc for c in text):
        raise ValueError(f"charset file {path}: holds decomposed Hangul (NFD jamo sequences), which NFC labels "
                         "never contain; save it NFC (unicodedata.normalize('NFC', text))")
    return text


_LINE_END = re.compile(r"\r\n|\r|\n")
# what str.splitlines takes for a line end besides LF and CR (all whitespace to str.split)
OTHER_BREAKS = frozenset("\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029")


def text_lines(text: str, path: str | os.PathLike) -> list[str]:
    r"""The lines of a text file's ``text``, ended at LF, CR LF or CR only (as a labels TSV is read).

    ``str.splitlines`` also cuts at U+2028, U+2029, U+0085, \x0b, \x0c and \x1c-\x1e, so a line holding
    one (a soft break pasted from a web page or Word, which a user cannot see) became two lines unsaid.
    Inside a line each is made a space (all are whitespace to ``str.split``), and a KocrWarning names
    ``path``, the lines holding one and the characters. Used for ``synth-lines``' ``text_file`` and
    ``evaluate-pages``' ground truth.

    >>> import warnings
    >>> with warnings.catch_warnings():
    ...     warnings.simplefilter("ignore")
    ...     text_lines("서울\u2028시청\r\n부산\n", "t.txt")
    ['서울 시청', '부산', '']
    """
    lines = _LINE_END.split(text)
    other_breaks = [number for number, line in enumerate(lines, 1) if any(c in OTHER_BREAKS for c in line)]
    if other_breaks:
        from kocr import KocrWarning

        chars = sorted({f"U+{ord(c):04X}" for n in other_breaks for c in lines[n - 1] if c in OTHER_BREAKS})
        many = len(other_breaks) > 1
        warnings.warn(f"{path}: {len(other_breaks)} line{'s' if many else ''} (line{'s' if many else ''} "
                      f"{', '.join(map(str, other_breaks[:5]))}"
                      f"{', …' if len(other_breaks) > 5 else ''}) hold{'' if many else 's'} a line or page break "
                      f"other than LF or CR LF ({', '.join(chars)}): read as a space within the line, not as a "
                      "line end", KocrWarning, stacklevel=3)
        lines = ["".join(" " if c in OTHER_BREAKS else c for c in line) for line in lines]
    return lines


def not_utf8(exc: UnicodeDecodeError) -> str:
    r"""Why text bytes did not decode, for a message that names the file before it: the line and byte
    of the first bad byte, and whether the whole file reads as CP949 (EUC-KR), the usual encoding of
    Korean text saved by Windows tools.

    >>> try:
    ...     "image\ttext\na.png\t서울\n".encode("cp949").decode("utf-8-sig")
    ... except UnicodeDecodeError as exc:
    ...     print(not_utf8(exc))
    not UTF-8 text (invalid start byte at line 2, byte 17); it reads as CP949 (EUC-KR): save it as UTF-8
    """
    data = bytes(exc.object)
    line = data.count(b"\n", 0, exc.start) + 1
    try:
        data.decode("cp949")
        hint = "it reads as CP949 (EUC-KR): save it as UTF-8"
    except UnicodeDecodeError:
        hint = "save it as UTF-8"
    return f"not UTF-8 text ({exc.reason} at line {line}, byte {exc.start}); {hint}"
