"""kocr: the Korean OCR fine-tuning platform (the ``kocr`` command is ``kocr.cli``)."""


class KocrWarning(UserWarning):
    """A warning for the user (a font pattern that matches nothing, lines of a text file skipped): ``kocr``
    prints it as one line, ``kocr COMMAND: warning: MESSAGE``, as its other warnings read."""
