"""kocr: the Korean OCR fine-tuning platform (the ``kocr`` command is ``kocr.cli``)."""

from __future__ import annotations

import contextlib
import sys
from typing import Iterator


class KocrWarning(UserWarning):
    """A warning for the user (a font pattern that matches nothing, lines of a text file skipped): ``kocr``
    prints it as one line, ``kocr COMMAND: warning: MESSAGE``, as its other warnings read."""


@contextlib.contextmanager
def warnings_as_lines(prog: str) -> Iterator[None]:
    """Inside the block, kocr's own warnings (``KocrWarning``) print as one line on stderr,
    ``PROG: warning: MESSAGE``, as the commands' other warnings do, above a progress bar that is
    running (``tqdm.write``), not after its half-drawn line; Python's default added the file, line
    and category and the ``warnings.warn(...)`` source line. Other warnings show as Python shows them.
    ``kocr`` and ``python -m kocr.recipe`` print their warnings so."""
    import warnings

    shown = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, KocrWarning):
            from tqdm import tqdm

            tqdm.write(f"{prog}: warning: {message}", file=file or sys.stderr)
        else:
            shown(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = shown
