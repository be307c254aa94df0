#!/usr/bin/env python3
"""Make the running virtualenv hold what requirements.lock says, and nothing it has dropped.

``pip install -r requirements.lock`` adds and re-pins but never removes: a package dropped from the
lock stays in an existing ``.venv`` after ``git pull && make install``, so that venv drifts from CI's
fresh one and an import that only works through the stale package goes unnoticed. ``make install``
runs this after its pip steps, with the venv's own interpreter::

    .venv/bin/python scripts/sync_venv.py requirements.lock               # uninstall what the lock dropped
    .venv/bin/python scripts/sync_venv.py requirements.lock --warn-only   # only list it

Kept: every locked package, the project itself (``pyproject.toml``'s name, installed editable), pip,
setuptools and wheel, and whatever those depend on in this environment (``Requires-Dist`` with its
markers evaluated here), so platform-specific dependencies the lock does not pin (PyPI's CUDA torch
brings its nvidia-* wheels) are not taken for stale. Names compare PEP 503-normalised; a locked
``torch==2.13.0`` is satisfied by the installed ``2.13.0+cpu`` (PEP 440 ignores the local label).
A locked package missing or at another version is an error (exit 1): pip should have installed it.
Not pip-sync: it would uninstall the editable project and fight the ``+cpu`` torch build.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import re
import subprocess
import sys
import sysconfig
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement
from packaging.version import InvalidVersion, Version

TOOLING = ("pip", "setuptools", "wheel")  # what `pip freeze` leaves out of a lock, and venv itself brings


def canonical(name: str) -> str:
    """A distribution name normalised as PEP 503 does, so ``Foo_Bar`` and ``foo.bar`` are one package.

    >>> canonical("Foo_Bar"), canonical("zope.interface"), canonical("PyYAML")
    ('foo-bar', 'zope-interface', 'pyyaml')
    """
    return re.sub(r"[-_.]+", "-", name).lower()


@dataclass(frozen=True)
class Installed:
    """One distribution in the environment: its name as published, version and ``Requires-Dist`` lines."""

    name: str
    version: str
    requires: tuple[str, ...] = field(default=())


def read_lock(lines: list[str]) -> dict[str, Requirement]:
    """The lock's requirements by canonical name; blank lines, comments and pip options are skipped.

    >>> sorted(read_lock(["# pinned", "Foo_Bar==1.0  # why", "", "--index-url x", "torch==2.13.0"]))
    ['foo-bar', 'torch']
    """
    out = {}
    for line in lines:
        line = line.split(" #", 1)[0].strip()
        if not line or line.startswith(("#", "-")):
            continue
        req = Requirement(line)
        if req.marker is None or req.marker.evaluate():
            out[canonical(req.name)] = req
    return out


def _needs(dist: Installed, extras: frozenset[str]) -> list[Requirement]:
    """What ``dist`` requires here, with ``extras`` of it requested (markers evaluated in this Python)."""
    out = []
    for line in dist.requires:
        try:
            req = Requirement(line)
        except InvalidRequirement:  # a broken METADATA line: keep nothing for it rather than crash
            continue
        if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in ("", *extras)):
            out.append(req)
    return out


def stale(lock: dict[str, Requirement], installed: dict[str, Installed], keep: tuple[str, ...] = ()) -> list[str]:
    """Installed distributions (their published names, sorted) that neither the lock, ``keep``, pip,
    setuptools, wheel nor anything those depend on in this environment needs."""
    todo = [(name, frozenset(req.extras)) for name, req in lock.items()]
    todo += [(canonical(name), frozenset()) for name in (*keep, *TOOLING)]
    seen: set[tuple[str, frozenset[str]]] = set()
    while todo:
        name, extras = todo.pop()
        if (name, extras) in seen or name not in installed:
            continue
        seen.add((name, extras))
        todo += [(canonical(req.name), frozenset(req.extras)) for req in _needs(installed[name], extras)]
    needed = {name for name, _ in seen}
    return sorted((dist.name for key, dist in installed.items() if key not in needed), key=canonical)


def off_lock(lock: dict[str, Requirement], installed: dict[str, Installed]) -> list[str]:
    """Locked packages not installed, or installed at a version the pin does not allow (``2.13.0+cpu``
    satisfies ``==2.13.0``), one line each."""
    out = []
    for name, req in sorted(lock.items()):
        dist = installed.get(name)
        if dist is None:
            out.append(f"{req}: not installed")
            continue
        try:
            ok = req.specifier.contains(Version(dist.version), prereleases=True)
        except InvalidVersion:
            ok = False
        if not ok:
            out.append(f"{req}: {dist.version} installed")
    return out


def environment() -> dict[str, Installed]:
    """The distributions in this interpreter's own site-packages (not on PYTHONPATH, not the system's)."""
    places = sorted({sysconfig.get_path("purelib"), sysconfig.get_path("platlib")})
    out = {}
    for dist in importlib.metadata.distributions(path=places):
        name = dist.metadata["Name"]
        if name:
            out[canonical(name)] = Installed(name, dist.version, tuple(dist.requires or ()))
    return out


def project_name(pyproject: Path) -> str:
    """``[project] name`` of a pyproject.toml."""
    return tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]["name"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("lock", type=Path, help="the lock file, e.g. requirements.lock")
    parser.add_argument("--pyproject", type=Path, default=None,
                        help="the project kept beside the lock (default: pyproject.toml beside the lock)")
    parser.add_argument("--warn-only", action="store_true", help="list the packages the lock dropped, uninstall none")
    args = parser.parse_args(argv)
    pyproject = args.pyproject or args.lock.parent / "pyproject.toml"
    lock = read_lock(args.lock.read_text(encoding="utf-8").splitlines())
    installed = environment()
    wrong = off_lock(lock, installed)
    if wrong:
        print(f"sync_venv: {sys.prefix} does not hold what {args.lock} pins:\n  " + "\n  ".join(wrong),
              file=sys.stderr)
        return 1
    extra = stale(lock, installed, keep=(project_name(pyproject),) if pyproject.is_file() else ())
    if not extra:
        return 0
    listed = ", ".join(extra)
    if args.warn_only:
        print(f"sync_venv: {len(extra)} installed but not in {args.lock} (CI's fresh venv lacks them; kept): {listed}",
              file=sys.stderr)
        return 0
    if sys.prefix == sys.base_prefix:
        print(f"sync_venv: {sys.executable} is not a virtualenv's Python; not uninstalling {listed}", file=sys.stderr)
        return 1
    print(f"sync_venv: uninstalling {len(extra)} not in {args.lock}: {listed}", file=sys.stderr)
    return subprocess.run([sys.executable, "-m", "pip", "uninstall", "-y", "-q", *extra]).returncode


if __name__ == "__main__":
    sys.exit(main())
