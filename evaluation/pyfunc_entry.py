"""The logged recogniser's MLflow entry point (models-from-code): the file ``log_recognizer`` logs as the model.

MLflow runs this file when it loads the model, so it imports nothing of the project at the top. Where the
project is installed (``kocr``, ``training`` and ``evaluation`` importable), pages are read with its code;
anywhere else (a plain environment with only the model's pip requirements: ``mlflow models serve``, a
deployment image) with the copy of the reading code logged beside the checkpoint (artifact ``code``).
"""

from __future__ import annotations

import importlib.util
import sys
from typing import Any

import mlflow

CODE_ARTIFACT = "code"  # the artifact holding the copies of the modules the model reads pages with
PACKAGES = ("kocr", "training", "evaluation")


def project_installed() -> bool:
    """Whether the project's three packages are importable here (looked up, not imported)."""
    return all(importlib.util.find_spec(name) is not None for name in PACKAGES)


class LoggedPageReader(mlflow.pyfunc.PythonModel):
    """Loads :class:`evaluation.pyfunc_model.PageReaderModel` from the project, or from the logged copy."""

    def load_context(self, context: Any) -> None:
        if not project_installed():
            sys.path.insert(0, context.artifacts[CODE_ARTIFACT])
        from evaluation.pyfunc_model import PageReaderModel

        self.model = PageReaderModel()
        self.model.load_context(context)
        self.reader = self.model.reader

    def predict(self, context: Any, model_input: list[str], params: dict[str, Any] | None = None) -> list[dict]:
        """Image paths -> one page-JSON dict per image (see ``PageReaderModel.predict``)."""
        return self.model.predict(context, model_input, params)


mlflow.models.set_model(LoggedPageReader())
